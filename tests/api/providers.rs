//! Provider clients against stand-ins: wiremock servers that accept only the exact documented
//! request, and a real SMTP server (the `mailin` protocol engine on a tokio socket). No
//! database needed.

use messaging::config::Secret;
use messaging::providers::{
    oauth1_signature, parse_credentials, Accepted, Account, Credentials, OutgoingMessage,
    ProviderConfig, Providers, SendError, SmtpTls,
};
use messaging_domain::{Channel, MessageId, Profile, Provider, ServiceId};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wiremock::matchers::{body_json, header, method, path, query_param_is_missing};
use wiremock::{Match, Mock, MockServer, Request, ResponseTemplate};

const MESSAGE_ID: &str = "0190a0b0-0000-7000-8000-00000000abcd";

fn config(server: &str) -> ProviderConfig {
    ProviderConfig {
        sendgrid_base_url: server.into(),
        x_base_url: server.into(),
        facebook_base_url: server.into(),
        timeout: Duration::from_secs(5),
        ..ProviderConfig::default()
    }
}

fn providers(config: &ProviderConfig) -> Providers {
    Providers::new(config).expect("providers build")
}

fn account(provider: Provider, username: &str, credentials: Credentials) -> Account {
    Account {
        service_id: ServiceId::from_uuid(uuid::Uuid::now_v7()),
        provider,
        username: username.into(),
        name: "Example".into(),
        credentials,
    }
}

fn email() -> OutgoingMessage {
    OutgoingMessage {
        message_id: MESSAGE_ID.parse::<MessageId>().unwrap(),
        channel: Channel::Email,
        from: Profile::new("news@example.com", Some("Example News".into())),
        to: vec![
            Profile::new("ann@example.org", Some("Ann Smith".into())),
            Profile::new("bob@example.net", None),
        ],
        subject: Some("Spring update".into()),
        text: Some("Hello in plain text".into()),
        html: Some("<p>Hello in <b>HTML</b></p>".into()),
        link: None,
        in_reply_to: None,
    }
}

fn post(channel: Channel, text: Option<&str>, link: Option<&str>) -> OutgoingMessage {
    OutgoingMessage {
        message_id: MESSAGE_ID.parse::<MessageId>().unwrap(),
        channel,
        from: Profile::new("examplepage", None),
        to: vec![],
        subject: None,
        text: text.map(String::from),
        html: None,
        link: link.map(String::from),
        in_reply_to: None,
    }
}

fn sendgrid_account() -> Account {
    account(
        Provider::Sendgrid,
        "news@example.com",
        Credentials::Sendgrid {
            api_key: Secret::new("SG.test-key"),
        },
    )
}

/// The Mail Send endpoint as documented: method, path, API key, JSON.
fn sendgrid_mock() -> wiremock::MockBuilder {
    Mock::given(method("POST"))
        .and(path("/v3/mail/send"))
        .and(header("authorization", "Bearer SG.test-key"))
        .and(header("content-type", "application/json"))
}

// ---------------------------------------------------------------- SendGrid

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

/// A port on which nothing listens: bound, then released.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

#[tokio::test]
async fn connection_refused_is_transient_even_for_posts() {
    let providers = providers(&config(&closed_port_url()));
    let error = providers
        .for_provider(Provider::Sendgrid)
        .send(&sendgrid_account(), &email())
        .await
        .unwrap_err();
    assert!(matches!(error, SendError::Transient { .. }), "{error:?}");

    // Nothing reached X, so even a non-idempotent post is safe to retry.
    let error = providers
        .for_provider(Provider::X)
        .send(
            &x_bearer_account(),
            &post(Channel::Twitter, Some("hi"), None),
        )
        .await
        .unwrap_err();
    let SendError::Transient { reason, .. } = error else {
        panic!("expected transient, got {error:?}");
    };
    assert!(reason.contains("could not connect"), "{reason}");
    assert!(!reason.contains("x-bearer-token"));
}

// ---------------------------------------------------------------- X

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

fn x_bearer_account() -> Account {
    account(
        Provider::X,
        "example",
        Credentials::XBearer {
            bearer_token: Secret::new("x-bearer-token"),
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
async fn x_403_is_permanent_with_the_detail() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/2/tweets"))
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

// ---------------------------------------------------------------- Facebook

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
async fn facebook_rate_limit_code_is_transient() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v21.0/546349135390552/feed"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {
            "message": "(#32) Page request limit reached",
            "type": "OAuthException",
            "code": 32
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
    assert!(matches!(error, SendError::Transient { .. }), "{error:?}");
}

#[tokio::test]
async fn facebook_timeout_after_sending_is_ambiguous() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v21.0/546349135390552/feed"))
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

// ---------------------------------------------------------------- Sandbox

#[tokio::test]
async fn sandbox_writes_a_real_eml_file_and_post_lines() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox");
    let config = ProviderConfig {
        sandbox_dir: outbox.clone(),
        ..ProviderConfig::default()
    };
    let providers = providers(&config);
    let sandbox = providers.for_provider(Provider::Sandbox);
    let sandbox_account = account(Provider::Sandbox, "news@example.com", Credentials::Sandbox);

    let mut message = email();
    message.in_reply_to = Some("original@example.org".into());
    let accepted = sandbox.send(&sandbox_account, &message).await.unwrap();
    let id = accepted.provider_message_id.unwrap();
    let eml = std::fs::read_to_string(outbox.join(format!("{id}.eml"))).unwrap();
    assert!(
        eml.contains(&format!("Message-ID: <{MESSAGE_ID}@example.com>")),
        "{eml}"
    );
    assert!(
        eml.contains("From: \"Example News\" <news@example.com>"),
        "{eml}"
    );
    assert!(eml.contains("Subject: Spring update"), "{eml}");
    assert!(eml.contains("In-Reply-To: <original@example.org>"), "{eml}");
    assert!(eml.contains("Hello in plain text"), "{eml}");

    let first = sandbox
        .send(
            &sandbox_account,
            &post(Channel::Twitter, Some("hello"), None),
        )
        .await
        .unwrap();
    let second = sandbox
        .send(
            &sandbox_account,
            &post(Channel::Facebook, None, Some("https://example.com/")),
        )
        .await
        .unwrap();
    let lines: Vec<Value> = std::fs::read_to_string(outbox.join("posts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["channel"], "twitter");
    assert_eq!(lines[0]["text"], "hello");
    assert_eq!(lines[0]["message_id"], MESSAGE_ID);
    assert_eq!(
        lines[0]["provider_message_id"].as_str(),
        first.provider_message_id.as_deref()
    );
    assert!(first.provider_message_id.unwrap().starts_with("sandbox-"));
    assert_eq!(lines[1]["channel"], "facebook");
    assert_eq!(lines[1]["link"], "https://example.com/");
    assert_eq!(
        lines[1]["provider_message_id"].as_str(),
        second.provider_message_id.as_deref()
    );
}

// ---------------------------------------------------------------- Credentials

#[test]
fn credentials_from_the_api_shape_drive_the_right_client() {
    let parsed = parse_credentials(
        Provider::Smtp,
        &json!({"host": "127.0.0.1", "port": 2525, "tls": "none"}),
    )
    .unwrap();
    assert!(matches!(
        parsed,
        Credentials::Smtp {
            tls: SmtpTls::None,
            port: 2525,
            ..
        }
    ));
    // A mismatched account is a wiring mistake reported as permanent, not a panic.
    let err = parse_credentials(Provider::X, &json!({"api_key": "k"})).unwrap_err();
    assert!(err.contains("api_key"));
}

#[tokio::test]
async fn a_provider_given_another_providers_credentials_refuses_permanently() {
    let providers = providers(&ProviderConfig::default());
    let error = providers
        .for_provider(Provider::X)
        .send(
            &sendgrid_account(),
            &post(Channel::Twitter, Some("hi"), None),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, SendError::Permanent { .. }), "{error:?}");
}

// ---------------------------------------------------------------- SMTP

mod smtp {
    use super::*;
    use mailin::{response, AuthMechanism, Handler, Response, SessionBuilder};
    use std::net::IpAddr;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    #[derive(Debug, Clone, Default)]
    struct Received {
        from: String,
        to: Vec<String>,
        data: Vec<u8>,
        login: Option<(String, String)>,
    }

    /// Records each accepted mail. `rcpt_reply` lets a test refuse recipients.
    #[derive(Clone)]
    struct Recorder {
        current: Received,
        inbox: Arc<Mutex<Vec<Received>>>,
        rcpt_reply: Option<Response>,
    }

    impl Handler for Recorder {
        fn mail(&mut self, _ip: IpAddr, _domain: &str, from: &str) -> Response {
            self.current.from = from.to_string();
            response::OK
        }
        fn rcpt(&mut self, to: &str) -> Response {
            if let Some(reply) = &self.rcpt_reply {
                return reply.clone();
            }
            self.current.to.push(to.to_string());
            response::OK
        }
        fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
            self.current.data.extend_from_slice(buf);
            Ok(())
        }
        fn data_end(&mut self) -> Response {
            let done = std::mem::take(&mut self.current);
            self.current.login = done.login.clone();
            self.inbox.lock().unwrap().push(done);
            response::OK
        }
        fn auth_plain(&mut self, _authz: &str, user: &str, password: &str) -> Response {
            if user == "mailer" && password == "s3cret-pass" {
                self.current.login = Some((user.into(), password.into()));
                response::AUTH_OK
            } else {
                response::INVALID_CREDENTIALS
            }
        }
    }

    /// A real SMTP server on 127.0.0.1: mailin's protocol state machine on a tokio socket.
    /// No TLS, so the client runs with `tls: none`; AUTH PLAIN is offered when `auth`.
    async fn start_server(
        auth: bool,
        rcpt_reply: Option<Response>,
    ) -> (u16, Arc<Mutex<Vec<Received>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let inbox = Arc::new(Mutex::new(Vec::new()));
        let recorder = Recorder {
            current: Received::default(),
            inbox: inbox.clone(),
            rcpt_reply,
        };
        tokio::spawn(async move {
            let mut builder = SessionBuilder::new("test-smtp");
            // With AUTH offered, mailin requires it before MAIL FROM.
            if auth {
                builder
                    .enable_auth(AuthMechanism::Plain)
                    .insecure_enable_plaintext_auth();
            }
            while let Ok((stream, peer)) = listener.accept().await {
                let mut session = builder.build(peer.ip(), recorder.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut reader = BufReader::new(read);
                    let greeting = session.greeting().buffer().unwrap();
                    write.write_all(&greeting).await.unwrap();
                    let mut line = Vec::new();
                    loop {
                        line.clear();
                        if reader.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let reply = session.process(&line);
                        match reply.action {
                            mailin::Action::NoReply => {}
                            mailin::Action::Reply => {
                                write.write_all(&reply.buffer().unwrap()).await.unwrap();
                            }
                            mailin::Action::Close | mailin::Action::UpgradeTls => {
                                let _ = write.write_all(&reply.buffer().unwrap()).await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        (port, inbox)
    }

    fn smtp_account(port: u16, login: bool) -> Account {
        account(
            Provider::Smtp,
            "news@example.com",
            Credentials::Smtp {
                host: "127.0.0.1".into(),
                port,
                username: login.then(|| "mailer".to_string()),
                password: login.then(|| Secret::new("s3cret-pass")),
                tls: SmtpTls::None,
            },
        )
    }

    /// Unfolds header continuation lines and returns the value of `name`.
    fn header_value(message: &str, name: &str) -> Option<String> {
        let head = message.split("\r\n\r\n").next()?;
        let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
        unfolded.split("\r\n").find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    #[tokio::test]
    async fn smtp_delivers_a_threaded_multipart_email_with_our_message_id() {
        let (port, inbox) = start_server(true, None).await;
        let mut message = email();
        message.in_reply_to = Some("<original@example.org>".into());
        let accepted = providers(&ProviderConfig::default())
            .for_provider(Provider::Smtp)
            .send(&smtp_account(port, true), &message)
            .await
            .unwrap();
        let expected_id = format!("<{MESSAGE_ID}@example.com>");
        assert_eq!(
            accepted.provider_message_id.as_deref(),
            Some(expected_id.as_str())
        );

        let received = inbox.lock().unwrap().clone();
        assert_eq!(received.len(), 1);
        let mail = &received[0];
        assert_eq!(mail.from, "news@example.com");
        assert_eq!(mail.to, vec!["ann@example.org", "bob@example.net"]);
        assert_eq!(
            mail.login,
            Some(("mailer".to_string(), "s3cret-pass".to_string()))
        );
        let data = String::from_utf8(mail.data.clone()).unwrap();
        assert_eq!(header_value(&data, "Message-ID").unwrap(), expected_id);
        assert_eq!(
            header_value(&data, "From").unwrap(),
            "\"Example News\" <news@example.com>"
        );
        assert_eq!(
            header_value(&data, "To").unwrap(),
            "\"Ann Smith\" <ann@example.org>, bob@example.net"
        );
        assert_eq!(header_value(&data, "Subject").unwrap(), "Spring update");
        assert_eq!(
            header_value(&data, "In-Reply-To").unwrap(),
            "<original@example.org>"
        );
        assert_eq!(
            header_value(&data, "References").unwrap(),
            "<original@example.org>"
        );
        assert!(header_value(&data, "Content-Type")
            .unwrap()
            .starts_with("multipart/alternative"));
        assert!(data.contains("Hello in plain text"), "{data}");
        assert!(data.contains("<p>Hello in <b>HTML</b></p>"), "{data}");
    }

    #[tokio::test]
    async fn smtp_text_only_without_login() {
        let (port, inbox) = start_server(false, None).await;
        let mut message = email();
        message.html = None;
        message.to.truncate(1);
        providers(&ProviderConfig::default())
            .for_provider(Provider::Smtp)
            .send(&smtp_account(port, false), &message)
            .await
            .unwrap();
        let received = inbox.lock().unwrap().clone();
        let data = String::from_utf8(received[0].data.clone()).unwrap();
        assert_eq!(received[0].login, None);
        assert!(header_value(&data, "Content-Type")
            .unwrap()
            .starts_with("text/plain"));
        assert!(header_value(&data, "In-Reply-To").is_none());
        assert!(data.contains("Hello in plain text"));
    }

    #[tokio::test]
    async fn smtp_5yz_is_permanent_and_4yz_transient() {
        let (port, _) = start_server(true, Some(response::NO_MAILBOX)).await;
        let error = providers(&ProviderConfig::default())
            .for_provider(Provider::Smtp)
            .send(&smtp_account(port, true), &email())
            .await
            .unwrap_err();
        assert!(matches!(error, SendError::Permanent { .. }), "{error:?}");

        let (port, _) =
            start_server(true, Some(Response::custom(450, "Mailbox busy".into()))).await;
        let error = providers(&ProviderConfig::default())
            .for_provider(Provider::Smtp)
            .send(&smtp_account(port, true), &email())
            .await
            .unwrap_err();
        assert!(matches!(error, SendError::Transient { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn smtp_wrong_password_is_permanent_and_never_echoed() {
        let (port, _) = start_server(true, None).await;
        let mut account = smtp_account(port, true);
        if let Credentials::Smtp { password, .. } = &mut account.credentials {
            *password = Some(Secret::new("wrong-pass-123"));
        }
        let error = providers(&ProviderConfig::default())
            .for_provider(Provider::Smtp)
            .send(&account, &email())
            .await
            .unwrap_err();
        assert!(matches!(error, SendError::Permanent { .. }), "{error:?}");
        assert!(!error.to_string().contains("wrong-pass-123"));
    }

    #[tokio::test]
    async fn smtp_connection_refused_is_transient() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let error = providers(&ProviderConfig::default())
            .for_provider(Provider::Smtp)
            .send(&smtp_account(port, false), &email())
            .await
            .unwrap_err();
        assert!(matches!(error, SendError::Transient { .. }), "{error:?}");
    }
}
