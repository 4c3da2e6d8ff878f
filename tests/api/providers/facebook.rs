//! Facebook Graph page posts.

use super::*;
use wiremock::matchers::{body_string_contains, method, path, query_param_is_missing};
use wiremock::{Match, Mock, MockServer, Request, ResponseTemplate};

fn facebook_account() -> Account {
    account(
        Provider::Facebook,
        "546349135390552",
        Credentials::Facebook {
            page_access_token: Secret::new("EAAB-page-token"),
        },
    )
}

/// Matches a form-encoded body with exactly these fields.
struct FormBody(Vec<(&'static str, &'static str)>);

impl Match for FormBody {
    fn matches(&self, request: &Request) -> bool {
        let content_type = request
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if content_type != "application/x-www-form-urlencoded" {
            return false;
        }
        let mut got: Vec<(String, String)> = url::form_urlencoded::parse(&request.body)
            .into_owned()
            .collect();
        let mut want: Vec<(String, String)> = self
            .0
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        got.sort();
        want.sort();
        got == want
    }
}

#[tokio::test]
async fn facebook_posts_to_the_page_feed_with_the_token_in_the_body() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v21.0/546349135390552/feed"))
        .and(query_param_is_missing("access_token"))
        .and(FormBody(vec![
            ("message", "For all Math geniuses :)"),
            ("link", "https://projecteuler.net/"),
            ("access_token", "EAAB-page-token"),
        ]))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "546349135390552_1116691191689674"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let accepted = providers(&config(&server.uri()))
        .for_provider(Provider::Facebook)
        .send(
            &facebook_account(),
            &post(
                Channel::Facebook,
                Some("For all Math geniuses :)"),
                Some("https://projecteuler.net/"),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        accepted.provider_message_id.as_deref(),
        Some("546349135390552_1116691191689674")
    );
}

#[tokio::test]
async fn facebook_400_is_permanent_with_the_error_message() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v21.0/546349135390552/feed"))
        .and(body_string_contains("access_token=EAAB-page-token"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {
            "message": "(#200) The user hasn't authorized the application to perform this action",
            "type": "OAuthException",
            "code": 200,
            "fbtrace_id": "AbCdEf"
        }})))
        .expect(1)
        .mount(&server)
        .await;
    let error = providers(&config(&server.uri()))
        .for_provider(Provider::Facebook)
        .send(
            &facebook_account(),
            &post(Channel::Facebook, Some("hi"), None),
        )
        .await
        .unwrap_err();
    let SendError::Permanent { reason } = error else {
        panic!("expected permanent, got {error:?}");
    };
    assert!(
        reason.contains("(#200) The user hasn't authorized the application"),
        "{reason}"
    );
}

#[tokio::test]
async fn facebook_rate_limit_code_is_transient_and_waits_as_graph_says() {
    let throttled = json!({"error": {
        "message": "(#32) Page request limit reached",
        "type": "OAuthException",
        "code": 32
    }});
    let usage = r#"{"546349135390552": [{"type": "pages", "call_count": 100, "total_cputime": 12, "total_time": 14, "estimated_time_to_regain_access": 19}]}"#;
    // Graph's error table says to wait these out too: the application's limit (341) and a
    // temporary block (368).
    let limited = json!({"error": {
        "message": "(#341) Application limit reached",
        "type": "OAuthException",
        "code": 341
    }});
    let blocked = json!({"error": {
        "message": "(#368) The action attempted has been deemed abusive or is otherwise disallowed",
        "type": "OAuthException",
        "code": 368
    }});
    for (throttled, header, waits) in [
        (&throttled, Some(usage), Duration::from_secs(19 * 60)),
        // No estimate: a minute at least, not the sender's seconds-long backoff.
        (&throttled, None, Duration::from_secs(60)),
        (&limited, None, Duration::from_secs(60)),
        (&blocked, None, Duration::from_secs(60)),
    ] {
        let server = MockServer::start().await;
        let mut answer = ResponseTemplate::new(400).set_body_json(throttled.clone());
        if let Some(usage) = header {
            answer = answer.insert_header("X-Business-Use-Case-Usage", usage);
        }
        Mock::given(method("POST"))
            .and(path("/v21.0/546349135390552/feed"))
            .and(body_string_contains("access_token=EAAB-page-token"))
            .respond_with(answer)
            .expect(1)
            .mount(&server)
            .await;
        let error = providers(&config(&server.uri()))
            .for_provider(Provider::Facebook)
            .send(
                &facebook_account(),
                &post(Channel::Facebook, Some("hi"), None),
            )
            .await
            .unwrap_err();
        match error {
            SendError::Transient { retry_after, .. } => assert_eq!(retry_after, Some(waits)),
            other => panic!("expected transient, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn facebook_timeout_after_sending_is_ambiguous() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v21.0/546349135390552/feed"))
        .and(body_string_contains("access_token=EAAB-page-token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "1_2"}))
                .set_delay(Duration::from_secs(3)),
        )
        .expect(1)
        .mount(&server)
        .await;
    let mut config = config(&server.uri());
    config.timeout = Duration::from_millis(300);
    let error = providers(&config)
        .for_provider(Provider::Facebook)
        .send(
            &facebook_account(),
            &post(Channel::Facebook, Some("hi"), None),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, SendError::Ambiguous { .. }), "{error:?}");
}

#[tokio::test]
async fn facebook_500_that_says_it_is_transient_is_retried_and_a_bare_500_is_unknown() {
    for (body, transient) in [
        (
            json!({"error": {"message": "An unexpected error has occurred. Please retry your request later.",
                             "type": "OAuthException", "code": 2, "is_transient": true}}),
            true,
        ),
        (
            json!({"error": {"message": "Unknown error", "code": 1}}),
            false,
        ),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v21.0/546349135390552/feed"))
            .and(body_string_contains("access_token=EAAB-page-token"))
            .respond_with(ResponseTemplate::new(500).set_body_json(body))
            .expect(1)
            .mount(&server)
            .await;
        let error = providers(&config(&server.uri()))
            .for_provider(Provider::Facebook)
            .send(
                &facebook_account(),
                &post(Channel::Facebook, Some("hi"), None),
            )
            .await
            .unwrap_err();
        match (transient, &error) {
            (true, SendError::Transient { .. }) | (false, SendError::Ambiguous { .. }) => {}
            _ => panic!("transient {transient}: got {error:?}"),
        }
    }
}
