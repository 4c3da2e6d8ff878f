//! SendGrid v3 Mail Send: `POST {base}/v3/mail/send`, answered `202 Accepted` with the
//! message's SendGrid id in `X-Message-Id`.
//!
//! Our message id travels twice: as the custom arg `message_id` (so the Event Webhook names
//! our message) and inside our own `Message-ID` header (so replies and duplicates can be
//! matched). That is why a lost answer is retried for email: a duplicate is recognisable.

use super::http::{self, AfterSend};
use super::{email, wrong_credentials, Accepted, Account, Credentials, MessageProvider};
use super::{OutgoingMessage, ProvidersError, SendError};
use messaging_domain::{Profile, Provider};
use reqwest::{StatusCode, Url};
use serde_json::{json, Map, Value};
use std::time::SystemTime;

pub struct SendgridClient {
    http: reqwest::Client,
    base_url: Url,
}

impl SendgridClient {
    pub fn new(http: reqwest::Client, base_url: &str) -> Result<Self, ProvidersError> {
        Ok(Self {
            http,
            base_url: http::base_url(base_url)?,
        })
    }
}

/// The Mail Send body. Pure, so that tests can compare it exactly.
pub fn mail_send_body(message: &OutgoingMessage) -> Result<Value, SendError> {
    let address = |p: &Profile| {
        let mut a = Map::new();
        a.insert("email".into(), Value::String(p.username.clone()));
        if let Some(name) = p.name.as_deref().filter(|n| !n.trim().is_empty()) {
            a.insert("name".into(), Value::String(name.to_string()));
        }
        Value::Object(a)
    };
    if message.to.is_empty() {
        return Err(SendError::Permanent {
            reason: "an email needs at least one recipient".into(),
        });
    }
    // The API requires text/plain first, then text/html.
    let mut content = Vec::new();
    if let Some(text) = &message.text {
        content.push(json!({"type": "text/plain", "value": text}));
    }
    if let Some(html) = &message.html {
        content.push(json!({"type": "text/html", "value": html}));
    }
    if content.is_empty() {
        return Err(SendError::Permanent {
            reason: "an email needs text or html".into(),
        });
    }
    let mut headers = Map::new();
    headers.insert(
        "Message-ID".into(),
        Value::String(email::message_id_header(message)?),
    );
    if let Some(answered) = &message.in_reply_to {
        let answered = email::angle_bracketed(answered);
        headers.insert("In-Reply-To".into(), Value::String(answered.clone()));
        headers.insert("References".into(), Value::String(answered));
    }
    Ok(json!({
        "personalizations": [{"to": message.to.iter().map(address).collect::<Vec<_>>()}],
        "from": address(&message.from),
        "subject": message.subject.clone().unwrap_or_default(),
        "content": content,
        "custom_args": {"message_id": message.message_id.to_string()},
        "headers": headers,
    }))
}

/// SendGrid's error body: `{"errors": [{"message": "...", "field": "..."}]}`.
fn reason(body: &Value) -> Option<String> {
    let messages: Vec<String> = body
        .get("errors")?
        .as_array()?
        .iter()
        .filter_map(|e| {
            let message = e.get("message")?.as_str()?;
            Some(match e.get("field").and_then(Value::as_str) {
                Some(field) => format!("{field}: {message}"),
                None => message.to_string(),
            })
        })
        .collect();
    (!messages.is_empty()).then(|| messages.join("; "))
}

#[async_trait::async_trait]
impl MessageProvider for SendgridClient {
    async fn send(
        &self,
        account: &Account,
        message: &OutgoingMessage,
    ) -> Result<Accepted, SendError> {
        let Credentials::Sendgrid { api_key } = &account.credentials else {
            return Err(wrong_credentials(Provider::Sendgrid));
        };
        let result = async {
            let body = mail_send_body(message)?;
            let url = http::endpoint(&self.base_url, &["v3", "mail", "send"]);
            let response = self
                .http
                .post(url)
                .bearer_auth(api_key.expose())
                .json(&body)
                .send()
                .await
                .map_err(|e| http::transport_error("sendgrid", e, AfterSend::Retry))?;
            let status = response.status();
            if status.is_success() {
                let id = response
                    .headers()
                    .get("x-message-id")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from);
                if status != StatusCode::ACCEPTED || id.is_none() {
                    tracing::warn!(%status, has_id = id.is_some(), "sendgrid: unexpected success answer");
                }
                return Ok(Accepted {
                    provider_message_id: id,
                });
            }
            let headers = response.headers().clone();
            let reason = http::error_reason(response, reason).await;
            Err(http::status_error(
                "sendgrid",
                status,
                &headers,
                reason,
                SystemTime::now(),
                AfterSend::Retry,
            ))
        }
        .await;
        let result = result.map_err(|e| http::redact(e, &[api_key.expose()]));
        match &result {
            Ok(accepted) => tracing::info!(
                message_id = %message.message_id,
                provider_message_id = ?accepted.provider_message_id,
                "sendgrid accepted the email"
            ),
            Err(error) => {
                tracing::warn!(message_id = %message.message_id, %error, "sendgrid send failed")
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
    fn error_reasons_name_the_field() {
        let body = json!({"errors": [
            {"message": "The from address does not match a verified Sender Identity.", "field": "from", "help": null},
            {"message": "Bad thing"}
        ]});
        assert_eq!(
            reason(&body).as_deref(),
            Some("from: The from address does not match a verified Sender Identity.; Bad thing")
        );
        assert_eq!(reason(&json!({"errors": []})), None);
        assert_eq!(reason(&json!({"other": 1})), None);
    }
}
