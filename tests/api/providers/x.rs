//! X API v2 posts, OAuth 1.0a and OAuth 2.0 user tokens.

use super::*;
use messaging::providers::oauth1_signature;
use serde_json::json;
use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};
use wiremock::matchers::{body_json, header, method, path};
use wiremock::{Match, Mock, MockServer, Request, ResponseTemplate};

fn x_oauth1_account() -> Account {
    account(
        Provider::X,
        "example",
        Credentials::XOAuth1 {
            consumer_key: Secret::new("ck-public"),
            consumer_secret: Secret::new("cs-secret"),
            access_token: Secret::new("123-token"),
            access_token_secret: Secret::new("ts-secret"),
        },
    )
}

/// Accepts only a well-formed OAuth 1.0a header whose signature verifies for the request the
/// server actually received (method, URL) with the test account's secrets.
struct ValidOAuth1 {
    consumer_key: &'static str,
    token: &'static str,
    consumer_secret: &'static str,
    token_secret: &'static str,
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .unwrap()
        .into_owned()
}

impl Match for ValidOAuth1 {
    fn matches(&self, request: &Request) -> bool {
        let Some(value) = request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let Some(fields) = value.strip_prefix("OAuth ") else {
            return false;
        };
        let mut params: HashMap<String, String> = HashMap::new();
        for field in fields.split(", ") {
            let Some((k, v)) = field.split_once('=') else {
                return false;
            };
            let Some(v) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
                return false;
            };
            params.insert(k.to_string(), percent_decode(v));
        }
        let expected_keys = [
            "oauth_consumer_key",
            "oauth_nonce",
            "oauth_signature",
            "oauth_signature_method",
            "oauth_timestamp",
            "oauth_token",
            "oauth_version",
        ];
        if params.len() != expected_keys.len()
            || expected_keys.iter().any(|k| !params.contains_key(*k))
        {
            return false;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let Ok(timestamp) = params["oauth_timestamp"].parse::<u64>() else {
            return false;
        };
        if params["oauth_signature_method"] != "HMAC-SHA1"
            || params["oauth_version"] != "1.0"
            || params["oauth_consumer_key"] != self.consumer_key
            || params["oauth_token"] != self.token
            || params["oauth_nonce"].len() < 16
            || now.abs_diff(timestamp) > 60
        {
            return false;
        }
        let signed: Vec<(&str, &str)> = params
            .iter()
            .filter(|(k, _)| k.as_str() != "oauth_signature")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        // wiremock reports origin-form requests as http://localhost/...; the URL the client
        // signed is the one a real server rebuilds from its Host header.
        let Some(host) = request.headers.get("host").and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Ok(url) = url::Url::parse(&format!("http://{host}{}", request.url.path())) else {
            return false;
        };
        let expected = oauth1_signature(
            request.method.as_str(),
            &url,
            &signed,
            self.consumer_secret,
            self.token_secret,
        );
        expected == params["oauth_signature"]
    }
}

fn x_created(id: &str, text: &str) -> ResponseTemplate {
    ResponseTemplate::new(201).set_body_json(json!({"data": {"id": id, "text": text}}))
}

#[tokio::test]
async fn x_posts_with_a_valid_oauth1_signature() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/2/tweets"))
        .and(ValidOAuth1 {
            consumer_key: "ck-public",
            token: "123-token",
            consumer_secret: "cs-secret",
            token_secret: "ts-secret",
        })
        .and(body_json(json!({"text": "Hello, X"})))
        .respond_with(x_created("1445880548472328192", "Hello, X"))
        .expect(1)
        .mount(&server)
        .await;
    let accepted = providers(&config(&server.uri()))
        .for_provider(Provider::X)
        .send(
            &x_oauth1_account(),
            &post(Channel::Twitter, Some("Hello, X"), None),
        )
        .await
        .unwrap();
    assert_eq!(
        accepted.provider_message_id.as_deref(),
        Some("1445880548472328192")
    );
}

#[tokio::test]
async fn x_posts_a_reply_with_the_bearer_token() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/2/tweets"))
        .and(header("authorization", "Bearer x-bearer-token"))
        .and(body_json(json!({
            "text": "Thanks!",
            "reply": {"in_reply_to_tweet_id": "1445880548472328192"}
        })))
        .respond_with(x_created("1445880548472328999", "Thanks!"))
        .expect(1)
        .mount(&server)
        .await;
    let mut message = post(Channel::Twitter, Some("Thanks!"), None);
    message.in_reply_to = Some("1445880548472328192".into());
    let accepted = providers(&config(&server.uri()))
        .for_provider(Provider::X)
        .send(&x_bearer_account(), &message)
        .await
        .unwrap();
    assert_eq!(
        accepted.provider_message_id.as_deref(),
        Some("1445880548472328999")
    );
}

#[tokio::test]
async fn x_timeout_after_sending_is_ambiguous() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/2/tweets"))
        .and(header("authorization", "Bearer x-bearer-token"))
        .respond_with(x_created("1", "late").set_delay(Duration::from_secs(3)))
        .expect(1)
        .mount(&server)
        .await;
    let mut config = config(&server.uri());
    config.timeout = Duration::from_millis(300);
    let error = providers(&config)
        .for_provider(Provider::X)
        .send(
            &x_bearer_account(),
            &post(Channel::Twitter, Some("hi"), None),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, SendError::Ambiguous { .. }), "{error:?}");
}

#[tokio::test]
async fn x_429_uses_the_rate_limit_reset_time() {
    let server = MockServer::start().await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    Mock::given(method("POST"))
        .and(path("/2/tweets"))
        .and(header("authorization", "Bearer x-bearer-token"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("x-rate-limit-reset", (now + 600).to_string().as_str())
                .set_body_json(json!({"title": "Too Many Requests", "detail": "Too Many Requests", "type": "about:blank", "status": 429})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let error = providers(&config(&server.uri()))
        .for_provider(Provider::X)
        .send(
            &x_bearer_account(),
            &post(Channel::Twitter, Some("hi"), None),
        )
        .await
        .unwrap_err();
    let SendError::Transient {
        retry_after: Some(wait),
        ..
    } = error
    else {
        panic!("expected transient with a delay, got {error:?}");
    };
    assert!(
        wait <= Duration::from_secs(600) && wait >= Duration::from_secs(590),
        "{wait:?}"
    );
}

#[tokio::test]
async fn x_429_at_the_daily_post_cap_waits_for_the_caps_reset() {
    // X's answer when the user's 24-hour post cap is used up: the 15-minute window still has
    // room and resets soon, the cap resets in ten hours.
    let server = MockServer::start().await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    Mock::given(method("POST"))
        .and(path("/2/tweets"))
        .and(header("authorization", "Bearer x-bearer-token"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("x-rate-limit-limit", "100")
                .insert_header("x-rate-limit-remaining", "99")
                .insert_header("x-rate-limit-reset", (now + 900).to_string().as_str())
                .insert_header("x-user-limit-24hour-limit", "17")
                .insert_header("x-user-limit-24hour-remaining", "0")
                .insert_header("x-user-limit-24hour-reset", (now + 36_000).to_string().as_str())
                .set_body_json(json!({"title": "Too Many Requests", "detail": "Too Many Requests", "type": "about:blank", "status": 429})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let error = providers(&config(&server.uri()))
        .for_provider(Provider::X)
        .send(
            &x_bearer_account(),
            &post(Channel::Twitter, Some("hi"), None),
        )
        .await
        .unwrap_err();
    let SendError::Transient {
        retry_after: Some(wait),
        ..
    } = error
    else {
        panic!("expected transient with a delay, got {error:?}");
    };
    assert!(
        wait <= Duration::from_secs(36_000) && wait >= Duration::from_secs(35_990),
        "{wait:?}"
    );
}

#[tokio::test]
async fn x_403_is_permanent_with_the_detail() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/2/tweets"))
        .and(header("authorization", "Bearer x-bearer-token"))
        .respond_with(ResponseTemplate::new(403).set_body_json(json!({
            "title": "Forbidden",
            "detail": "You are not allowed to create a Tweet with duplicate content.",
            "type": "about:blank",
            "status": 403
        })))
        .expect(1)
        .mount(&server)
        .await;
    let error = providers(&config(&server.uri()))
        .for_provider(Provider::X)
        .send(
            &x_bearer_account(),
            &post(Channel::Twitter, Some("hi"), None),
        )
        .await
        .unwrap_err();
    let SendError::Permanent { reason } = error else {
        panic!("expected permanent, got {error:?}");
    };
    assert!(reason.contains("duplicate content"), "{reason}");
}

#[tokio::test]
async fn x_oauth1_header_is_exact_for_an_injected_nonce_and_clock() {
    use messaging::providers::x::XClient;
    use messaging::providers::{oauth1_authorization, MessageProvider, OAuth1Keys};
    use std::sync::Arc;

    let server = MockServer::start().await;
    let url = url::Url::parse(&format!("{}/2/tweets", server.uri())).unwrap();
    let expected = oauth1_authorization(
        "POST",
        &url,
        &OAuth1Keys {
            consumer_key: "ck-public",
            consumer_secret: "cs-secret",
            token: "123-token",
            token_secret: "ts-secret",
        },
        "fixed-nonce-0123456789",
        1_700_000_000,
    );
    assert!(expected.starts_with("OAuth oauth_consumer_key=\"ck-public\", oauth_nonce=\"fixed-nonce-0123456789\", oauth_signature=\""));
    Mock::given(method("POST"))
        .and(path("/2/tweets"))
        // A closure, not `header()`: wiremock's header matcher splits values at commas.
        .and(move |request: &Request| {
            request
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                == Some(expected.as_str())
        })
        .respond_with(x_created("42", "hi"))
        .expect(1)
        .mount(&server)
        .await;
    let client = XClient::new(reqwest::Client::new(), &server.uri())
        .unwrap()
        .with_nonce_source(Arc::new(|| {
            ("fixed-nonce-0123456789".to_string(), 1_700_000_000)
        }));
    let accepted = client
        .send(
            &x_oauth1_account(),
            &post(Channel::Twitter, Some("hi"), None),
        )
        .await
        .unwrap();
    assert_eq!(accepted.provider_message_id.as_deref(), Some("42"));
}
