//! The offline sandbox.

use super::*;
use serde_json::Value;

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
