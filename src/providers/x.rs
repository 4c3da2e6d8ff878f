//! X API v2: `POST {base}/2/tweets` with `{"text": ..., "reply": {"in_reply_to_tweet_id": ...}}`,
//! answered `201 Created` with `{"data": {"id": ..., "text": ...}}`.
//!
//! Auth is OAuth 1.0a user context (a signed `Authorization: OAuth ...` header) or an OAuth 2.0
//! user token (`Authorization: Bearer ...`). A post is not idempotent: if the answer is lost
//! after the request went out, the post may exist, so that case is Ambiguous, never retried
//! blindly.

use super::http::{self, AfterSend};
use super::oauth1::{oauth1_authorization, OAuth1Keys};
use super::{wrong_credentials, Accepted, Account, Credentials, MessageProvider, XRefresh};
use super::{OutgoingMessage, ProvidersError, SendError};
use crate::config::Secret;
use messaging_domain::Provider;
use rand::distributions::Alphanumeric;
use rand::Rng;
use reqwest::header::AUTHORIZATION;
use reqwest::Url;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;

/// Gives the OAuth nonce and timestamp (seconds since the epoch) for one request. Injectable
/// so that a signed request can be reproduced exactly in a test.
pub type NonceSource = Arc<dyn Fn() -> (String, u64) + Send + Sync>;

pub struct XClient {
    http: reqwest::Client,
    base_url: Url,
    nonce_source: NonceSource,
}

impl XClient {
    pub fn new(http: reqwest::Client, base_url: &str) -> Result<Self, ProvidersError> {
        Ok(Self {
            http,
            base_url: http::base_url(base_url)?,
            nonce_source: Arc::new(random_nonce),
        })
    }

    /// Replaces the random nonce and the clock (for tests).
    pub fn with_nonce_source(mut self, source: NonceSource) -> Self {
        self.nonce_source = source;
        self
    }
}

fn random_nonce() -> (String, u64) {
    let nonce: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    (nonce, now)
}

/// The request body. Pure, so that tests can compare it exactly.
pub fn create_post_body(message: &OutgoingMessage) -> Result<Value, SendError> {
    // The message builder already appended any link to the text; a link alone still posts.
    let text = message
        .text
        .as_deref()
        .or(message.link.as_deref())
        .ok_or_else(|| SendError::Permanent {
            reason: "an X post needs text".into(),
        })?;
    let mut body = json!({ "text": text });
    if let Some(answered) = &message.in_reply_to {
        body["reply"] = json!({ "in_reply_to_tweet_id": answered });
    }
    Ok(body)
}

/// A renewed OAuth 2.0 access token, as X's token endpoint answers.
pub struct RenewedToken {
    pub access_token: Secret,
    /// X rotates refresh tokens: the one used is spent, this one replaces it (kept when an
    /// answer has none).
    pub refresh_token: Option<Secret>,
    pub expires_in: Option<Duration>,
}

/// The token endpoint's error body (RFC 6749 section 5.2), or X's problem details.
fn token_error(body: &Value) -> Option<String> {
    let text = |key: &str| body.get(key).and_then(Value::as_str);
    match (text("error"), text("error_description")) {
        (Some(error), Some(description)) => Some(format!("{error}: {description}")),
        (Some(error), None) => Some(error.to_string()),
        _ => reason(body),
    }
}

impl XClient {
    /// Renews an OAuth 2.0 access token: `POST {base}/2/oauth2/token` with
    /// `grant_type=refresh_token`, the refresh token and the client id as a form, and HTTP
    /// Basic with the client id and secret for a confidential client. Nothing is posted, so
    /// every failure may be retried (a refresh token X no longer takes fails every time, and
    /// the message with it once its attempts are spent: the reason says to connect again).
    pub async fn renew(&self, refresh: &XRefresh) -> Result<RenewedToken, SendError> {
        let url = http::endpoint(&self.base_url, &["2", "oauth2", "token"]);
        let mut secrets = vec![refresh.refresh_token.expose()];
        let mut request = self.http.post(url).form(&[
            ("refresh_token", refresh.refresh_token.expose()),
            ("grant_type", "refresh_token"),
            ("client_id", refresh.client_id.as_str()),
        ]);
        if let Some(secret) = &refresh.client_secret {
            secrets.push(secret.expose());
            request = request.basic_auth(&refresh.client_id, Some(secret.expose()));
        }
        let result = async {
            let response = request
                .send()
                .await
                .map_err(|e| http::transport_error("x token", e, AfterSend::Retry))?;
            let status = response.status();
            if !status.is_success() {
                let headers = response.headers().clone();
                let reason = http::error_reason(response, token_error).await;
                let error = http::status_error(
                    "x token",
                    status,
                    &headers,
                    reason,
                    SystemTime::now(),
                    AfterSend::Retry,
                );
                let reason = match error {
                    SendError::Transient { reason, .. }
                    | SendError::Permanent { reason }
                    | SendError::Ambiguous { reason }
                    | SendError::NotCalled { reason } => reason,
                };
                return Err(SendError::Transient {
                    reason: format!(
                        "the OAuth 2.0 access token could not be renewed ({reason}); if this \
                         lasts, connect the account again and PUT its new credentials"
                    ),
                    retry_after: http::retry_after(&headers, SystemTime::now()),
                });
            }
            let body: Value = response.json().await.map_err(|e| SendError::Transient {
                reason: format!("x token: the answer could not be read: {e}"),
                retry_after: None,
            })?;
            let text = |key: &str| body.get(key).and_then(Value::as_str).map(Secret::new);
            let access_token = text("access_token").ok_or_else(|| SendError::Transient {
                reason: "x token: the answer has no access_token".into(),
                retry_after: None,
            })?;
            Ok(RenewedToken {
                access_token,
                refresh_token: text("refresh_token"),
                expires_in: body
                    .get("expires_in")
                    .and_then(Value::as_u64)
                    .map(Duration::from_secs),
            })
        }
        .await;
        result.map_err(|e| http::redact(e, &secrets))
    }
}

/// X's error bodies: problem details (`detail`, `title`) and/or `errors[].message`.
fn reason(body: &Value) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    let text = |key: &str| body.get(key).and_then(Value::as_str).map(String::from);
    if let Some(detail) = text("detail").or_else(|| text("title")) {
        parts.push(detail);
    }
    if let Some(errors) = body.get("errors").and_then(Value::as_array) {
        parts.extend(
            errors
                .iter()
                .filter_map(|e| e.get("message").and_then(Value::as_str))
                .filter(|m| !parts.iter().any(|p| p == m))
                .map(String::from)
                .collect::<Vec<_>>(),
        );
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

#[async_trait::async_trait]
impl MessageProvider for XClient {
    async fn send(
        &self,
        account: &Account,
        message: &OutgoingMessage,
    ) -> Result<Accepted, SendError> {
        let url = http::endpoint(&self.base_url, &["2", "tweets"]);
        let (authorization, secrets) = match &account.credentials {
            Credentials::XOAuth1 {
                consumer_key,
                consumer_secret,
                access_token,
                access_token_secret,
            } => {
                let keys = OAuth1Keys {
                    consumer_key: consumer_key.expose(),
                    consumer_secret: consumer_secret.expose(),
                    token: access_token.expose(),
                    token_secret: access_token_secret.expose(),
                };
                let (nonce, timestamp) = (self.nonce_source)();
                (
                    oauth1_authorization("POST", &url, &keys, &nonce, timestamp),
                    vec![
                        consumer_secret.expose(),
                        access_token.expose(),
                        access_token_secret.expose(),
                    ],
                )
            }
            Credentials::XBearer { bearer_token, .. } => (
                format!("Bearer {}", bearer_token.expose()),
                vec![bearer_token.expose()],
            ),
            _ => return Err(wrong_credentials(Provider::X)),
        };
        let result = async {
            let body = create_post_body(message)?;
            let response = self
                .http
                .post(url)
                .header(AUTHORIZATION, authorization)
                .json(&body)
                .send()
                .await
                .map_err(|e| http::transport_error("x", e, AfterSend::Ambiguous))?;
            let status = response.status();
            if status.is_success() {
                // The post exists now. If its id cannot be read it is still accepted: a retry
                // would post it twice.
                let id = response.json::<Value>().await.ok().and_then(|b| {
                    b.pointer("/data/id")
                        .and_then(Value::as_str)
                        .map(String::from)
                });
                if id.is_none() {
                    tracing::warn!(%status, "x accepted the post but its id could not be read");
                }
                return Ok(Accepted {
                    provider_message_id: id,
                });
            }
            let headers = response.headers().clone();
            let reason = http::error_reason(response, reason).await;
            Err(http::status_error(
                "x",
                status,
                &headers,
                reason,
                SystemTime::now(),
                AfterSend::Ambiguous,
            ))
        }
        .await;
        let result = result.map_err(|e| http::redact(e, &secrets));
        match &result {
            Ok(accepted) => tracing::info!(
                message_id = %message.message_id,
                provider_message_id = ?accepted.provider_message_id,
                "x accepted the post"
            ),
            Err(error) => tracing::warn!(message_id = %message.message_id, %error, "x post failed"),
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_combine_detail_and_errors_without_repeats() {
        let body = json!({
            "title": "Forbidden",
            "detail": "You are not allowed to create a Tweet with duplicate content.",
            "type": "about:blank",
            "status": 403
        });
        assert_eq!(
            reason(&body).as_deref(),
            Some("You are not allowed to create a Tweet with duplicate content.")
        );
        let body = json!({
            "errors": [{"message": "text: too long"}, {"message": "reply: unknown tweet"}],
            "title": "Invalid Request",
        });
        assert_eq!(
            reason(&body).as_deref(),
            Some("Invalid Request; text: too long; reply: unknown tweet")
        );
        assert_eq!(reason(&json!({})), None);
    }

    #[test]
    fn random_nonces_differ() {
        let (a, _) = random_nonce();
        let (b, t) = random_nonce();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(t > 1_600_000_000);
    }
}
