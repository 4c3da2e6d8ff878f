//! Facebook Graph API: `POST {base}/{version}/{page-id}/feed` with `message` and/or `link`,
//! answered `200` with `{"id": "<page>_<post>"}`. A reply (`in_reply_to`: a post or comment
//! id) is a comment on it: `POST {base}/{version}/{object-id}/comments` with `message` (a
//! comment has no `link` field; the link goes at the end of the text), answered with its id.
//!
//! Graph takes its parameters, `access_token` included, from a form-encoded POST body as
//! readily as from the query string (its own SDKs post them so). The token goes in the body:
//! URLs end up in access logs and proxies, bodies do not.
//!
//! A post is not idempotent, so an answer lost after sending is Ambiguous. Graph reports
//! throttling as a 4xx with a rate-limit error code (4, 17, 32, 613, 80000-80014) or `is_transient: true`
//! rather than as a 429; those are Transient, since a throttled request was not acted on.
//! They are retried when Graph says access comes back (`estimated_time_to_regain_access`, in
//! minutes, in the `X-Business-Use-Case-Usage` header), else after a minute at least: a page's
//! throttle lasts minutes, and the sender's default backoff would spend every attempt in half
//! a minute.

use super::http::{self, AfterSend};
use super::{wrong_credentials, Accepted, Account, Credentials, MessageProvider};
use super::{OutgoingMessage, ProvidersError, SendError};
use messaging_domain::Provider;
use reqwest::Url;
use serde_json::Value;
use std::time::SystemTime;

/// Graph error codes that mean "throttled: try later" (application, user, page and custom
/// rate limits; 341, the application's limit; 368, temporarily blocked, which Graph's error
/// table also says to wait out; 80000-80014 are the business use case limits that come with
/// `X-Business-Use-Case-Usage`).
fn rate_limited(code: i64) -> bool {
    [4, 17, 32, 341, 368, 613].contains(&code) || (80000..=80014).contains(&code)
}

/// How long a throttled call waits when Graph gives no estimate.
const THROTTLED_AT_LEAST: std::time::Duration = std::time::Duration::from_secs(60);

/// Graph's estimate of when a throttled app or page may call again: the longest
/// `estimated_time_to_regain_access` (minutes) in `X-Business-Use-Case-Usage`
/// (`{"<business id>": [{"type": "pages", "call_count": .., "estimated_time_to_regain_access": 19}]}`).
fn regain_access(headers: &reqwest::header::HeaderMap) -> Option<std::time::Duration> {
    let usage: Value = headers
        .get("x-business-use-case-usage")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| serde_json::from_str(v).ok())?;
    let minutes = usage
        .as_object()?
        .values()
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(|u| u.get("estimated_time_to_regain_access")?.as_u64())
        .max()?;
    (minutes > 0).then(|| {
        std::time::Duration::from_secs(minutes.saturating_mul(60))
            .min(crate::process_managers::LONGEST_PROVIDER_WAIT)
    })
}

pub struct FacebookClient {
    http: reqwest::Client,
    base_url: Url,
    version: String,
}

impl FacebookClient {
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        graph_version: &str,
    ) -> Result<Self, ProvidersError> {
        Ok(Self {
            http,
            base_url: http::base_url(base_url)?,
            version: graph_version.trim_matches('/').to_string(),
        })
    }
}

/// The form fields of a page post, without the token.
pub fn feed_fields(message: &OutgoingMessage) -> Result<Vec<(&'static str, String)>, SendError> {
    if message.in_reply_to.is_some() {
        return comment_fields(message);
    }
    let mut fields = Vec::new();
    if let Some(text) = &message.text {
        fields.push(("message", text.clone()));
    }
    if let Some(link) = &message.link {
        fields.push(("link", link.clone()));
    }
    if fields.is_empty() {
        return Err(SendError::Permanent {
            reason: "a Facebook post needs text or a link".into(),
        });
    }
    Ok(fields)
}

/// The form fields of a comment (a reply), without the token: the text, the link after it.
fn comment_fields(message: &OutgoingMessage) -> Result<Vec<(&'static str, String)>, SendError> {
    let text = [message.text.as_deref(), message.link.as_deref()]
        .into_iter()
        .flatten()
        .filter(|s| !s.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n\n");
    if text.is_empty() {
        return Err(SendError::Permanent {
            reason: "a Facebook comment needs text or a link".into(),
        });
    }
    Ok(vec![("message", text)])
}

/// Where a message goes: the page's feed, or the comments of the object it answers.
fn edge<'a>(account: &'a Account, message: &'a OutgoingMessage) -> [&'a str; 2] {
    match &message.in_reply_to {
        Some(object) => [object.as_str(), "comments"],
        None => [account.username.as_str(), "feed"],
    }
}

/// Graph's error body: `{"error": {"message", "type", "code", "is_transient", ...}}`.
struct GraphError {
    message: Option<String>,
    throttled: bool,
}

fn graph_error(body: &Value) -> Option<GraphError> {
    let error = body.get("error")?;
    let code = error.get("code").and_then(Value::as_i64);
    let is_transient = error
        .get("is_transient")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Some(GraphError {
        message: error
            .get("message")
            .and_then(Value::as_str)
            .map(String::from),
        throttled: is_transient || code.is_some_and(rate_limited),
    })
}

#[async_trait::async_trait]
impl MessageProvider for FacebookClient {
    async fn send(
        &self,
        account: &Account,
        message: &OutgoingMessage,
    ) -> Result<Accepted, SendError> {
        let Credentials::Facebook { page_access_token } = &account.credentials else {
            return Err(wrong_credentials(Provider::Facebook));
        };
        let result = async {
            let mut form = feed_fields(message)?;
            form.push(("access_token", page_access_token.expose().to_string()));
            let [object, edge] = edge(account, message);
            let url = http::endpoint(&self.base_url, &[&self.version, object, edge]);
            let response = self
                .http
                .post(url)
                .form(&form)
                .send()
                .await
                .map_err(|e| http::transport_error("facebook", e, AfterSend::Ambiguous))?;
            let status = response.status();
            if status.is_success() {
                // Published; an unreadable id does not make a retry safe.
                let id = response
                    .json::<Value>()
                    .await
                    .ok()
                    .and_then(|b| b.get("id").and_then(Value::as_str).map(String::from));
                if id.is_none() {
                    tracing::warn!(%status, "facebook accepted the post but its id could not be read");
                }
                return Ok(Accepted {
                    provider_message_id: id,
                });
            }
            let headers = response.headers().clone();
            let body = response.text().await.unwrap_or_default();
            let parsed = serde_json::from_str::<Value>(&body)
                .ok()
                .as_ref()
                .and_then(graph_error);
            let throttled = parsed.as_ref().is_some_and(|e| e.throttled);
            let reason = parsed.and_then(|e| e.message);
            let error = http::status_error(
                "facebook",
                status,
                &headers,
                reason,
                SystemTime::now(),
                AfterSend::Ambiguous,
            );
            // Graph's own word that the request was throttled or may be retried comes
            // before the status's class (a 500 with `is_transient` is not an unknown outcome).
            Err(match error {
                SendError::Permanent { reason } | SendError::Ambiguous { reason } if throttled => {
                    SendError::Transient {
                        reason,
                        retry_after: Some(regain_access(&headers).unwrap_or(THROTTLED_AT_LEAST)),
                    }
                }
                other => other,
            })
        }
        .await;
        let result = result.map_err(|e| http::redact(e, &[page_access_token.expose()]));
        match &result {
            Ok(accepted) => tracing::info!(
                message_id = %message.message_id,
                provider_message_id = ?accepted.provider_message_id,
                "facebook accepted the post"
            ),
            Err(error) => {
                tracing::warn!(message_id = %message.message_id, %error, "facebook post failed")
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn throttling_codes_and_transient_flags_are_recognised() {
        let limited = json!({"error": {"message": "(#32) Page request limit reached", "type": "OAuthException", "code": 32}});
        assert!(graph_error(&limited).unwrap().throttled);
        let flagged = json!({"error": {"message": "Try again", "code": 2, "is_transient": true}});
        assert!(graph_error(&flagged).unwrap().throttled);
        let refused = json!({"error": {"message": "(#200) Permissions error", "type": "OAuthException", "code": 200}});
        let refused = graph_error(&refused).unwrap();
        assert!(!refused.throttled);
        assert_eq!(refused.message.as_deref(), Some("(#200) Permissions error"));
        assert!(graph_error(&json!({"data": []})).is_none());
    }
}
