//! SMTP submission with lettre's async transport (tokio, rustls). One transport per send,
//! because host and login belong to the account, not to the service.
//!
//! Classification: a 5yz reply is the server refusing for good (Permanent); everything else
//! (connection refused, TLS failure, timeout, 4yz, a dropped connection) is Transient. A
//! connection lost after DATA may leave a delivered copy behind; for email that is acceptable
//! because our stable Message-ID lets a duplicate be recognised.
//!
//! lettre's `timeout` bounds only the TCP connect on its tokio transport: its reads, writes and
//! the TLS handshake wait forever, so a server that accepts and then never greets (or stops
//! answering after DATA) would hold the sender's round, and every message behind it, for good.
//! The whole conversation is therefore bounded here too ([`CONVERSATION`] times the timeout).

use super::{email, wrong_credentials, Accepted, Account, Credentials, MessageProvider};
use super::{OutgoingMessage, SendError, SmtpTls};
use lettre::transport::smtp::authentication::Credentials as SmtpCredentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use messaging_domain::Provider;
use std::time::Duration;

pub struct SmtpClient {
    timeout: Duration,
}

/// The whole SMTP conversation (connect, greeting, TLS, login, envelope, data) may take this
/// many times the provider timeout, which lettre applies to the connect alone.
pub(super) const CONVERSATION: u32 = 3;

impl SmtpClient {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }

    fn transport(
        &self,
        host: &str,
        port: u16,
        login: Option<SmtpCredentials>,
        tls: SmtpTls,
    ) -> Result<AsyncSmtpTransport<Tokio1Executor>, SendError> {
        let tls = match tls {
            SmtpTls::None => Tls::None,
            // Required, not Opportunistic: a server that stops offering STARTTLS must not
            // receive the password in clear text.
            SmtpTls::StartTls => Tls::Required(tls_parameters(host)?),
            SmtpTls::Tls => Tls::Wrapper(tls_parameters(host)?),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .tls(tls)
            .timeout(Some(self.timeout));
        if let Some(login) = login {
            builder = builder.credentials(login);
        }
        Ok(builder.build())
    }
}

fn tls_parameters(host: &str) -> Result<TlsParameters, SendError> {
    TlsParameters::new(host.to_string()).map_err(|e| SendError::Permanent {
        reason: format!("smtp: cannot set up TLS for the configured host: {e}"),
    })
}

/// Sorts lettre's errors: only a permanent (5yz) reply is final.
fn classify(error: &lettre::transport::smtp::Error) -> SendError {
    if error.is_permanent() {
        SendError::Permanent {
            reason: format!("smtp: the server refused the message: {error}"),
        }
    } else {
        let what = if error.is_timeout() {
            "timed out"
        } else if error.is_transient() {
            "the server deferred the message"
        } else {
            "connection failed"
        };
        SendError::Transient {
            reason: format!("smtp: {what}: {error}"),
            retry_after: None,
        }
    }
}

#[async_trait::async_trait]
impl MessageProvider for SmtpClient {
    async fn send(
        &self,
        account: &Account,
        message: &OutgoingMessage,
    ) -> Result<Accepted, SendError> {
        let Credentials::Smtp {
            host,
            port,
            username,
            password,
            tls,
        } = &account.credentials
        else {
            return Err(wrong_credentials(Provider::Smtp));
        };
        let email = email::build(message)?;
        let message_id = email::message_id_header(message)?;
        let login = match (username, password) {
            (Some(user), Some(password)) => Some(SmtpCredentials::new(
                user.clone(),
                password.expose().to_string(),
            )),
            _ => None,
        };
        let transport = self.transport(host, *port, login, *tls)?;
        let whole = self.timeout.saturating_mul(CONVERSATION);
        let sent = match tokio::time::timeout(whole, transport.send(email)).await {
            Ok(sent) => sent.map_err(|e| classify(&e)),
            // Transient, as lettre's own timeouts are: an email sent twice is recognisable
            // by its Message-ID.
            Err(_) => Err(SendError::Transient {
                reason: format!(
                    "smtp: timed out: no complete answer from the server within {} s",
                    whole.as_secs_f64()
                ),
                retry_after: None,
            }),
        };
        match sent {
            Ok(response) => {
                tracing::info!(
                    message_id = %message.message_id,
                    smtp_code = %response.code(),
                    "smtp server accepted the email"
                );
                Ok(Accepted {
                    provider_message_id: Some(message_id),
                })
            }
            Err(error) => {
                // lettre never echoes the password; redact anyway, cheaply, in case a
                // server's reply quotes what it was given.
                let error = match password {
                    Some(p) => super::http::redact(error, &[p.expose()]),
                    None => error,
                };
                tracing::warn!(message_id = %message.message_id, %error, "smtp send failed");
                Err(error)
            }
        }
    }
}
