//! Provider clients against stand-ins: wiremock servers that accept only the exact documented
//! request, and a real SMTP server (the `mailin` protocol engine on a tokio socket). No
//! database needed. Shared fixtures here; one module per provider.

mod facebook;
mod sandbox;
mod sendgrid;
mod smtp;
mod x;

use messaging::config::Secret;
use messaging::providers::{
    parse_credentials, Account, Credentials, OutgoingMessage, ProviderConfig, Providers, SendError,
    SmtpTls,
};
use messaging_domain::{Channel, MessageId, Profile, Provider, ServiceId};
use serde_json::json;
use std::time::Duration;

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

pub(super) fn sendgrid_account() -> Account {
    account(
        Provider::Sendgrid,
        "news@example.com",
        Credentials::Sendgrid {
            api_key: Secret::new("SG.test-key"),
        },
    )
}

fn x_bearer_account() -> Account {
    account(
        Provider::X,
        "example",
        Credentials::XBearer {
            bearer_token: Secret::new("x-bearer-token"),
            refresh: None,
        },
    )
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
