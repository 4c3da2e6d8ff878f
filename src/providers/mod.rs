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
    /// X: the post id answered; Facebook: the post or comment commented on; email: the
    /// Message-ID answered.
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
    /// OAuth 2.0 user token, and what renews it when it can be renewed.
    XBearer {
        bearer_token: Secret,
        refresh: Option<XRefresh>,
    },
    Facebook {
        page_access_token: Secret,
    },
    Sandbox,
}

/// An OAuth 2.0 refresh token (granted with the `offline.access` scope) and the app it was
/// granted to: the sender renews the access token with them before it expires.
#[derive(Clone)]
pub struct XRefresh {
    pub refresh_token: Secret,
    pub client_id: String,
    /// A confidential client's secret (sent as HTTP Basic with the client id); none for a
    /// public client.
    pub client_secret: Option<Secret>,
    /// When the access token expires; unknown until the first renewal when not given.
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
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
    /// Never sent to the provider: the attempt was started but the service stopped before
    /// its call began. Safe to send again at once, whatever the channel.
    #[error("not called: {reason}")]
    NotCalled { reason: String },
}

mod credentials;
mod email;
mod http;
pub(crate) use http::retry_after;
mod oauth1;

pub mod facebook;
pub mod sandbox;
pub mod sendgrid;
pub mod smtp;
pub mod x;

pub use credentials::parse_credentials;
pub use oauth1::{oauth1_authorization, oauth1_signature, OAuth1Keys};

use std::path::PathBuf;

/// One provider's way of sending a message. The sender picks the implementation with
/// [`Providers::for_provider`] and records the classified outcome.
#[async_trait::async_trait]
pub trait MessageProvider: Send + Sync {
    async fn send(
        &self,
        account: &Account,
        message: &OutgoingMessage,
    ) -> Result<Accepted, SendError>;
}

/// Where the providers live and how long a call may take. Base URLs are injectable so that
/// tests and sandboxes can point them at a stand-in (`MESSAGING_*_BASE_URL`).
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub sendgrid_base_url: String,
    pub x_base_url: String,
    pub facebook_base_url: String,
    pub facebook_graph_version: String,
    /// The whole provider call, connection included (HTTP) or each SMTP command.
    pub timeout: Duration,
    /// The sandbox's outbox: `.eml` files and `posts.jsonl`.
    pub sandbox_dir: PathBuf,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            sendgrid_base_url: "https://api.sendgrid.com".into(),
            x_base_url: "https://api.x.com".into(),
            facebook_base_url: "https://graph.facebook.com".into(),
            facebook_graph_version: "v21.0".into(),
            timeout: Duration::from_secs(10),
            sandbox_dir: PathBuf::from("./data/outbox"),
        }
    }
}

/// The longest a provider call can take with this timeout: an HTTP call is bounded by it, an
/// SMTP conversation by three of it (`smtp::CONVERSATION`).
pub fn longest_call(timeout: Duration) -> Duration {
    timeout.saturating_mul(smtp::CONVERSATION)
}

/// The providers could not be set up (a bad base URL, or the TLS stack failed to load).
#[derive(Debug, thiserror::Error)]
pub enum ProvidersError {
    #[error("provider base URL `{url}` is not a valid URL: {reason}")]
    BaseUrl { url: String, reason: String },
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
}

/// One client per provider, built once and shared by every send.
pub struct Providers {
    sendgrid: sendgrid::SendgridClient,
    smtp: smtp::SmtpClient,
    x: x::XClient,
    facebook: facebook::FacebookClient,
    sandbox: sandbox::SandboxProvider,
}

impl Providers {
    pub fn new(config: &ProviderConfig) -> Result<Self, ProvidersError> {
        // One HTTP client (one connection pool) for every HTTP provider; each provider client
        // holds a cheap clone of it.
        let http = http::client(config.timeout)?;
        Ok(Self {
            sendgrid: sendgrid::SendgridClient::new(http.clone(), &config.sendgrid_base_url)?,
            smtp: smtp::SmtpClient::new(config.timeout),
            x: x::XClient::new(http.clone(), &config.x_base_url)?,
            facebook: facebook::FacebookClient::new(
                http,
                &config.facebook_base_url,
                &config.facebook_graph_version,
            )?,
            sandbox: sandbox::SandboxProvider::new(config.sandbox_dir.clone()),
        })
    }

    /// X's client, for what it does besides sending (renewing OAuth 2.0 tokens).
    pub fn x(&self) -> &x::XClient {
        &self.x
    }

    pub fn for_provider(&self, provider: Provider) -> &dyn MessageProvider {
        match provider {
            Provider::Sendgrid => &self.sendgrid,
            Provider::Smtp => &self.smtp,
            Provider::X => &self.x,
            Provider::Facebook => &self.facebook,
            Provider::Sandbox => &self.sandbox,
        }
    }
}

/// The account's credentials are not the kind this provider needs: a wiring mistake that no
/// retry fixes.
fn wrong_credentials(provider: Provider) -> SendError {
    SendError::Permanent {
        reason: format!(
            "the account's credentials are not {} credentials",
            provider.as_str()
        ),
    }
}
