//! Providers: the one place that talks to SendGrid, SMTP servers, X and Facebook (and the
//! offline sandbox). Each client holds an HTTP client with a timeout and an injectable base URL,
//! and classifies every failure so the sender knows whether a retry is safe.

use crate::config::Secret;
use messaging_domain::{Channel, MessageId, Profile, Provider, ServiceId};
use std::time::Duration;

/// A message as the sender hands it to a provider.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    pub message_id: MessageId,
    pub channel: Channel,
    pub from: Profile,
    pub to: Vec<Profile>,
    pub subject: Option<String>,
    pub text: Option<String>,
    pub html: Option<String>,
    pub link: Option<String>,
    /// X: the post id answered; email: the Message-ID answered.
    pub in_reply_to: Option<String>,
}

/// How an SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    None,
    StartTls,
    Tls,
}

/// A service's credentials, parsed from what `POST /v1/services` stored. Never printed.
#[derive(Clone)]
pub enum Credentials {
    Sendgrid {
        api_key: Secret,
    },
    Smtp {
        host: String,
        port: u16,
        username: Option<String>,
        password: Option<Secret>,
        tls: SmtpTls,
    },
    /// OAuth 1.0a user context.
    XOAuth1 {
        consumer_key: Secret,
        consumer_secret: Secret,
        access_token: Secret,
        access_token_secret: Secret,
    },
    /// OAuth 2.0 user token.
    XBearer {
        bearer_token: Secret,
    },
    Facebook {
        page_access_token: Secret,
    },
    Sandbox,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(***)")
    }
}

/// The connected account a message goes out from.
#[derive(Debug, Clone)]
pub struct Account {
    pub service_id: ServiceId,
    pub provider: Provider,
    /// The account's own address, handle or page id.
    pub username: String,
    pub name: String,
    pub credentials: Credentials,
}

/// The provider took the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The provider's id for it (SendGrid's `X-Message-Id`, the post id, ...).
    pub provider_message_id: Option<String>,
}

/// Why a provider call did not succeed, classified for the sender.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Safe to try again: nothing was sent (connection refused, 5xx, 429), or duplicates are
    /// detectable (email). `retry_after` is the provider's own hint when it gave one.
    #[error("transient: {reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The provider refused the message (4xx): retrying will not help.
    #[error("permanent: {reason}")]
    Permanent { reason: String },
    /// The request may have reached the provider but no answer came: for X and Facebook a
    /// retry could post twice, so the sender records this and never retries blindly.
    #[error("ambiguous: {reason}")]
    Ambiguous { reason: String },
}
