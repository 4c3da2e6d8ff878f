//! SendGrid v3 Mail Send.

use super::*;
use messaging::providers::Accepted;
use wiremock::matchers::{body_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The Mail Send endpoint as documented: method, path, API key, JSON.
fn sendgrid_mock() -> wiremock::MockBuilder {
    Mock::given(method("POST"))
        .and(path("/v3/mail/send"))
        .and(header("authorization", "Bearer SG.test-key"))
        .and(header("content-type", "application/json"))
}

#[tokio::test]
async fn sendgrid_sends_the_documented_body_and_records_x_message_id() {
    let server = MockServer::start().await;
    let mut message = email();
    message.in_reply_to = Some("<original@example.org>".into());
    let expected = json!({
        "personalizations": [{"to": [
            {"email": "ann@example.org", "name": "Ann Smith"},
            {"email": "bob@example.net"}
        ]}],
        "from": {"email": "news@example.com", "name": "Example News"},
        "subject": "Spring update",
        "content": [
            {"type": "text/plain", "value": "Hello in plain text"},
            {"type": "text/html", "value": "<p>Hello in <b>HTML</b></p>"}
        ],
        "custom_args": {"message_id": MESSAGE_ID},
        "headers": {
            "Message-ID": format!("<{MESSAGE_ID}@example.com>"),
            "In-Reply-To": "<original@example.org>",
            "References": "<original@example.org>"
        }
    });
    sendgrid_mock()
        .and(body_json(expected))
        .respond_with(ResponseTemplate::new(202).insert_header("X-Message-Id", "sg-abc123"))
        .expect(1)
        .mount(&server)
        .await;

    let providers = providers(&config(&server.uri()));
    let accepted = providers
        .for_provider(Provider::Sendgrid)
        .send(&sendgrid_account(), &message)
        .await
        .unwrap();
    assert_eq!(
        accepted,
        Accepted {
            provider_message_id: Some("sg-abc123".into())
        }
    );
}

#[tokio::test]
async fn sendgrid_400_is_permanent_with_the_reason_from_the_body() {
    let server = MockServer::start().await;
    sendgrid_mock()
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"errors": [{
            "message": "The from address does not match a verified Sender Identity.",
            "field": "from",
            "help": null
        }]})))
        .expect(1)
        .mount(&server)
        .await;

    let error = providers(&config(&server.uri()))
        .for_provider(Provider::Sendgrid)
        .send(&sendgrid_account(), &email())
        .await
        .unwrap_err();
    let SendError::Permanent { reason } = error else {
        panic!("expected permanent, got {error:?}");
    };
    assert!(
        reason.contains("from: The from address does not match a verified Sender Identity."),
        "{reason}"
    );
    assert!(!reason.contains("SG.test-key"));
}

#[tokio::test]
async fn sendgrid_500_is_transient() {
    let server = MockServer::start().await;
    sendgrid_mock()
        .respond_with(ResponseTemplate::new(500))
        .expect(1)
        .mount(&server)
        .await;
    let error = providers(&config(&server.uri()))
        .for_provider(Provider::Sendgrid)
        .send(&sendgrid_account(), &email())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            SendError::Transient {
                retry_after: None,
                ..
            }
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn sendgrid_429_is_transient_with_retry_after() {
    let server = MockServer::start().await;
    sendgrid_mock()
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "42"))
        .expect(1)
        .mount(&server)
        .await;
    let error = providers(&config(&server.uri()))
        .for_provider(Provider::Sendgrid)
        .send(&sendgrid_account(), &email())
        .await
        .unwrap_err();
    assert!(
        matches!(error, SendError::Transient { retry_after: Some(d), .. } if d == Duration::from_secs(42)),
        "{error:?}"
    );
}

#[tokio::test]
async fn sendgrid_timeout_after_sending_is_transient_because_duplicates_are_detectable() {
    let server = MockServer::start().await;
    sendgrid_mock()
        .respond_with(ResponseTemplate::new(202).set_delay(Duration::from_secs(3)))
        .expect(1)
        .mount(&server)
        .await;
    let mut config = config(&server.uri());
    config.timeout = Duration::from_millis(300);
    let error = providers(&config)
        .for_provider(Provider::Sendgrid)
        .send(&sendgrid_account(), &email())
        .await
        .unwrap_err();
    assert!(matches!(error, SendError::Transient { .. }), "{error:?}");
}
