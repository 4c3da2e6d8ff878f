//! Provider webhooks over HTTP: verified, deduplicated, order-proof, nothing dropped.

use crate::helpers::*;
use chrono::Utc;
use messaging::webhooks::verify::{sendgrid_test_signature, x_crc_response};
use messaging_domain::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeMap;

const SCALAR: [u8; 32] = [7; 32];
const X_SECRET: &str = "x-consumer-secret-for-tests";
const FB_SECRET: &str = "fb-app-secret-for-tests";
const FB_VERIFY: &str = "fb-verify-token";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

async fn webhook_app() -> TestApp {
    let (public_key, _) = sendgrid_test_signature(&SCALAR, "0", b"").unwrap();
    TestApp::spawn_with(&[
        ("MESSAGING_SENDGRID_WEBHOOK_PUBLIC_KEY", public_key),
        ("MESSAGING_X_CONSUMER_SECRET", X_SECRET.into()),
        ("MESSAGING_FACEBOOK_APP_SECRET", FB_SECRET.into()),
        ("MESSAGING_FACEBOOK_VERIFY_TOKEN", FB_VERIFY.into()),
    ])
    .await
}

async fn post_sendgrid(app: &TestApp, body: &[u8]) -> (StatusCode, Value) {
    let timestamp = Utc::now().timestamp().to_string();
    let (_, signature) = sendgrid_test_signature(&SCALAR, &timestamp, body).unwrap();
    let r = app
        .client
        .post(app.url("/webhooks/sendgrid/events"))
        .header("X-Twilio-Email-Event-Webhook-Signature", signature)
        .header("X-Twilio-Email-Event-Webhook-Timestamp", timestamp)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    read(r).await
}

/// A message with this id that has been handed to its provider (`provider_id` recorded).
/// Posts an email to Inbound Parse as SendGrid does (a multipart form); the status.
async fn post_inbound(app: &TestApp, form: reqwest::multipart::Form) -> StatusCode {
    app.client
        .post(app.url("/webhooks/sendgrid/inbound"))
        .multipart(form)
        .send()
        .await
        .unwrap()
        .status()
}

async fn sent_message(app: &TestApp, id: &str, channel: Channel, provider_id: &str) {
    let store = app.store.clone();
    let (provider, username, to) = match channel {
        Channel::Email => (
            Provider::Sendgrid,
            "news@example.com",
            vec![Profile::new("alice@example.com", None)],
        ),
        Channel::Twitter => (Provider::X, "acme_marketing", vec![]),
        Channel::Facebook => (Provider::Facebook, "104857600123456", vec![]),
    };
    let service_id = app
        .create_service(channel.as_str(), provider.as_str(), username)
        .await;
    let service = ServiceRef {
        id: service_id.parse().unwrap(),
        channel,
        provider,
        username: username.into(),
        name: Some("Our Brand".into()),
    };
    let input = MessageInput {
        to,
        subject: Some("Hello".into()),
        text: Some("Hello there".into()),
        ..Default::default()
    };
    let id: MessageId = id.parse().unwrap();
    let now = Utc::now();
    // One batch, recorded together: done one by one, the running service's sender could claim
    // the queued message between `Send` and `StartSendAttempt` and start the attempt itself.
    let commands = vec![
        MessageCommand::Compose(Compose {
            id,
            message: build_message(&service, input).unwrap(),
            dispatch: Dispatch::Draft,
            now,
        }),
        MessageCommand::Send {
            now,
            expected_publish_at: None,
        },
        MessageCommand::StartSendAttempt { now, attempt: 1 },
        MessageCommand::RecordSent {
            provider_message_id: Some(provider_id.into()),
            at: now,
        },
    ];
    store
        .execute(id, MessageCommand::Batch(commands))
        .await
        .unwrap();
}

fn fixture_message_ids() -> Vec<String> {
    let events: Vec<Value> = serde_json::from_slice(&fixture("sendgrid-events.json")).unwrap();
    let mut ids: Vec<String> = events
        .iter()
        .map(|e| e["message_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Final state and counts per message, and the webhook-caused feed items per message.
async fn outcome(
    app: &TestApp,
    ids: &[String],
) -> BTreeMap<String, (Value, Vec<(String, String, String)>)> {
    let mut out = BTreeMap::new();
    for id in ids {
        let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
        let summary = json!([m["state"], m["opens"], m["clicks"], m["replies"]]);
        out.insert(id.clone(), (summary, Vec::new()));
    }
    let (_, feed) = app.get("/v1/state-changes?limit=1000").await;
    for item in feed["items"].as_array().unwrap() {
        let cause = item["cause"].as_str().unwrap();
        if [
            "DeliveryRecorded",
            "OpenRecorded",
            "ClickRecorded",
            "SpamReportRecorded",
            "UnsubscribeRecorded",
        ]
        .contains(&cause)
        {
            let id = item["message_id"].as_str().unwrap().to_string();
            if let Some(entry) = out.get_mut(&id) {
                entry.1.push((
                    item["previous_state"].as_str().unwrap().to_string(),
                    item["state"].as_str().unwrap().to_string(),
                    cause.to_string(),
                ));
            }
        }
    }
    out
}

/// Waits until the applier has looked at the one fact `filter` selects and left it waiting.
async fn waiting_facts(app: &TestApp, filter: &str) {
    let query = format!("SELECT count(*) FROM webhook_inbox WHERE {filter} AND waiting");
    eventually(|| async {
        let waiting: i64 = sqlx::query_scalar(&query)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        waiting == 1
    })
    .await;
}

async fn settled(app: &TestApp) {
    eventually(|| async {
        let gauges = app.store.gauges().await.unwrap();
        let lag: i64 = gauges.projection_lag.iter().map(|(_, lag)| lag).sum();
        gauges.webhook_inbox_pending == 0 && lag == 0
    })
    .await;
}

/// SendGrid's times are whole seconds: a delivery and a machine open often share theirs. In
/// whichever order a batch lists them, they are applied delivery first, so the feed says
/// sent → delivered → opened (a subscriber to `delivered` hears of it) and the message's
/// previous state is `delivered`, the same either way.
#[tokio::test]
async fn facts_of_the_same_second_leave_the_same_feed_in_any_order() {
    let mut outcomes = Vec::new();
    for open_first in [true, false] {
        let app = webhook_app().await;
        let id = uuid::Uuid::now_v7().to_string();
        sent_message(&app, &id, Channel::Email, "sg-1").await;
        let at = Utc::now().timestamp();
        let open = json!({"event": "open", "sg_event_id": "o-1", "timestamp": at,
                          "message_id": id, "sg_machine_open": true});
        let delivered = json!({"event": "delivered", "sg_event_id": "d-1", "timestamp": at,
                               "message_id": id});
        let batch = if open_first {
            json!([open, delivered])
        } else {
            json!([delivered, open])
        };
        let (status, body) = post_sendgrid(&app, batch.to_string().as_bytes()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        eventually(|| async {
            let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
            let (_, feed) = app.get("/v1/state-changes?after=0").await;
            m["state"] == "opened"
                && feed["items"]
                    .as_array()
                    .is_some_and(|items| items.iter().any(|i| i["state"] == "opened"))
        })
        .await;
        let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
        let (_, feed) = app.get("/v1/state-changes?after=0").await;
        let changes: Vec<(Value, Value)> = feed["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (i["previous_state"].clone(), i["state"].clone()))
            .collect();
        outcomes.push((m["previous_state"].clone(), changes));
    }
    assert_eq!(outcomes[0], outcomes[1]);
    let (previous, changes) = &outcomes[0];
    assert_eq!(previous, "delivered");
    assert_eq!(
        changes[changes.len() - 2..],
        [
            (json!("sent"), json!("delivered")),
            (json!("delivered"), json!("opened"))
        ]
    );
}

#[tokio::test]
async fn the_fixture_batch_posted_three_times_shuffled_ends_as_posting_it_once_in_order() {
    let ids = fixture_message_ids();
    let batch = fixture("sendgrid-events.json");
    let mut events: Vec<Value> = serde_json::from_slice(&batch).unwrap();
    events.sort_by_key(|e| e["timestamp"].as_i64());
    let in_order = serde_json::to_vec(&events).unwrap();

    let once = webhook_app().await;
    let thrice = webhook_app().await;
    for app in [&once, &thrice] {
        for id in &ids {
            sent_message(app, id, Channel::Email, &format!("sg-{id}")).await;
        }
    }
    let (status, body) = post_sendgrid(&once, &in_order).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["received"], 10);
    assert_eq!(body["new"], 9, "the duplicate delivered is dropped");

    for seed in [3u64, 11, 29] {
        let mut shuffled = events.clone();
        let mut rng = seed;
        for i in (1..shuffled.len()).rev() {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            shuffled.swap(i, (rng >> 33) as usize % (i + 1));
        }
        let (status, _) = post_sendgrid(&thrice, &serde_json::to_vec(&shuffled).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
    }
    settled(&once).await;
    settled(&thrice).await;
    let expected = outcome(&once, &ids).await;
    assert_eq!(outcome(&thrice, &ids).await, expected);

    let clicked = &expected["0193b6c2-8f1e-7c3a-9d41-5a6e2f0b7c11"];
    assert_eq!(clicked.0, json!(["clicked", 1, 1, 0]));
    assert_eq!(
        clicked.1.iter().map(|c| c.1.as_str()).collect::<Vec<_>>(),
        ["delivered", "opened", "clicked"],
        "processed is recorded but changes nothing"
    );
    let states: Vec<Value> = expected.values().map(|v| v.0[0].clone()).collect();
    for s in [
        "bounced",
        "deferred",
        "dropped",
        "spam_reported",
        "unsubscribed",
    ] {
        assert!(states.contains(&json!(s)), "{s} in {states:?}");
    }
    let (_, m) = once
        .get("/v1/messages/0193b6c2-8f1e-7c3a-9d41-5a6e2f0b7c11")
        .await;
    let processed = m["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["type"] == "DeliveryRecorded")
        .count();
    assert_eq!(
        processed, 2,
        "processed and delivered are both in the history"
    );
    // The list's rows keep the messages' folds without the provider's event ids (only the
    // aggregate's duplicate check needs them): a row does not grow with every open and click.
    let rows: Vec<String> = sqlx::query_scalar("SELECT CAST(message AS TEXT) FROM message_list")
        .fetch_all(&thrice.pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), ids.len());
    for event in &events {
        let fact = event["sg_event_id"].as_str().unwrap();
        assert!(
            rows.iter().all(|row| !row.contains(fact)),
            "{fact} is stored in the list"
        );
    }
}

#[tokio::test]
async fn sendgrid_signatures_are_checked_before_anything_is_recorded() {
    let app = webhook_app().await;
    let body = fixture("sendgrid-events.json");
    let timestamp = Utc::now().timestamp().to_string();
    let (_, signature) = sendgrid_test_signature(&SCALAR, &timestamp, &body).unwrap();
    let send = |sig: Option<String>, ts: Option<String>, body: Vec<u8>| {
        let mut r = app
            .client
            .post(app.url("/webhooks/sendgrid/events"))
            .body(body);
        if let Some(sig) = sig {
            r = r.header("X-Twilio-Email-Event-Webhook-Signature", sig);
        }
        if let Some(ts) = ts {
            r = r.header("X-Twilio-Email-Event-Webhook-Timestamp", ts);
        }
        r.send()
    };
    let mut flipped = body.clone();
    flipped[40] ^= 1;
    let other_ts = (Utc::now().timestamp() + 1).to_string();
    let (_, wrong_key_sig) = sendgrid_test_signature(&[9; 32], &timestamp, &body).unwrap();
    for (sig, ts, body) in [
        (None, Some(timestamp.clone()), body.clone()),
        (Some(signature.clone()), None, body.clone()),
        (Some(signature.clone()), Some(timestamp.clone()), flipped),
        (Some(signature.clone()), Some(other_ts), body.clone()),
        (Some(wrong_key_sig), Some(timestamp.clone()), body.clone()),
        (
            Some("bm90IGEgc2lnbmF0dXJl".into()),
            Some(timestamp.clone()),
            body.clone(),
        ),
    ] {
        let (status, error) = read(send(sig, ts, body).await.unwrap()).await;
        assert_error(status, &error, StatusCode::UNAUTHORIZED, "bad_signature");
    }
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_inbox")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(recorded, 0);
    let (status, _) = read(send(Some(signature), Some(timestamp), body).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);

    // Without a configured key every delivery is refused.
    let bare = TestApp::spawn().await;
    let r = bare
        .client
        .post(bare.url("/webhooks/sendgrid/events"))
        .body("[]")
        .send()
        .await
        .unwrap();
    let (status, error) = read(r).await;
    assert_error(
        status,
        &error,
        StatusCode::SERVICE_UNAVAILABLE,
        "not_configured",
    );
}

#[tokio::test]
async fn an_event_that_arrives_before_its_message_is_applied_when_the_message_appears() {
    let app = webhook_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    let batch = json!([{"email": "alice@example.com", "timestamp": Utc::now().timestamp(), "event": "delivered",
                        "sg_event_id": "early-1", "message_id": id}]);
    let (status, _) = post_sendgrid(&app, batch.to_string().as_bytes()).await;
    assert_eq!(status, StatusCode::OK);
    waiting_facts(&app, "event_id = 'early-1'").await;
    sent_message(&app, &id, Channel::Email, "sg-late").await;
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
        m["state"] == "delivered"
    })
    .await;
}

/// A fact about the send of a message that was cancelled (never sent) can never apply: it is
/// kept as unmatched, with why, instead of waiting for a change that never comes.
#[tokio::test]
async fn a_fact_for_a_cancelled_message_is_kept_as_unmatched() {
    let app = webhook_app().await;
    let service = app.email_service().await;
    let draft = app
        .compose_email(&service, "alice@example.com", json!({}))
        .await;
    let id = draft["id"].as_str().unwrap();
    let (status, _) = app
        .post(&format!("/v1/messages/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    app.wait_listed(id, "cancelled").await;
    let batch = json!([{"email": "alice@example.com", "timestamp": Utc::now().timestamp(),
                        "event": "delivered", "sg_event_id": "to-cancelled-1", "message_id": id}]);
    let (status, _) = post_sendgrid(&app, batch.to_string().as_bytes()).await;
    assert_eq!(status, StatusCode::OK);
    eventually(|| async {
        let (_, problems) = app.get("/v1/webhooks/unmatched").await;
        problems["items"].as_array().unwrap().iter().any(|i| {
            i["status"] == "unmatched"
                && i["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("never sent"))
        })
    })
    .await;
    let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(m["state"], "cancelled");
}

#[tokio::test]
async fn unmatched_and_malformed_input_is_kept_and_never_fails_the_batch() {
    let app = webhook_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &id, Channel::Email, "sg-1").await;
    let now = Utc::now().timestamp();
    let batch = json!([
        {"event": "open", "sg_event_id": "good", "timestamp": now, "message_id": id, "sg_machine_open": true},
        {"event": "open", "sg_event_id": "no-id", "timestamp": now},
        {"event": "group_resubscribe", "sg_event_id": "odd", "timestamp": now, "message_id": id},
        {"event": "open", "timestamp": "yesterday"}
    ]);
    let (status, body) = post_sendgrid(&app, batch.to_string().as_bytes()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
        m["opens"] == 1 && m["state"] == "opened"
    })
    .await;
    let (status, problems) = app.get("/v1/webhooks/unmatched").await;
    assert_eq!(status, StatusCode::OK);
    let items = problems["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{problems}");
    let statuses: Vec<&str> = items
        .iter()
        .map(|i| i["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == "malformed").count(), 1);
    assert!(
        items
            .iter()
            .all(|i| !i["reason"].as_str().unwrap_or("").is_empty()),
        "{problems}"
    );

    // A body that is not JSON at all is kept too, and said to be malformed.
    let (status, _) = post_sendgrid(&app, b"{not json").await;
    assert_eq!(status, StatusCode::OK);
    let (_, problems) = app.get("/v1/webhooks/unmatched?limit=1").await;
    assert_eq!(problems["items"][0]["status"], "malformed");
    assert!(problems["next_cursor"].is_string());
}

#[tokio::test]
async fn provider_text_with_nul_characters_is_recorded_not_refused() {
    // PostgreSQL's jsonb and text cannot hold a NUL: a bounce reason or a reply with one made
    // the whole delivery fail with 500, and the provider's re-sends failed the same way.
    let app = webhook_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &id, Channel::Email, "sg-1").await;
    let now = Utc::now().timestamp();
    let batch = json!([
        {"event": "open", "sg_event_id": "o-1", "timestamp": now, "message_id": id,
         "useragent": "Mail\u{0}Client"},
        {"event": "bounce", "sg_event_id": "b\u{0}1", "timestamp": now + 1, "message_id": id,
         "reason": "550 no\u{0}such user", "type": "bounce"}
    ]);
    let (status, body) = post_sendgrid(&app, batch.to_string().as_bytes()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["new"], 2, "{body}");
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
        m["state"] == "bounced" && m["opens"] == 1
    })
    .await;

    let form = reqwest::multipart::Form::new()
        .text(
            "headers",
            format!("Message-ID: <nul-1@mail.example.net>\r\nIn-Reply-To: <{id}@example.com>\r\n"),
        )
        .text("from", "Al\u{0}ice <ali\u{0}ce@example.com>")
        .text("subject", "Re: Hello")
        .text("text", "Thanks\u{0}!");
    assert_eq!(post_inbound(&app, form).await, StatusCode::OK);
    eventually(|| async {
        let (_, inbound) = app.get("/v1/messages?direction=inbound").await;
        inbound["items"]
            .as_array()
            .unwrap()
            .first()
            .is_some_and(|m| m["text"] == "Thanks\u{fffd}!" && m["from"]["name"] == "Al\u{fffd}ice")
    })
    .await;
    // The list kept up: a message composed after them is listed.
    let service = app.email_service().await;
    let next = app
        .compose_email(&service, "bob@example.com", json!({}))
        .await;
    app.wait_listed(next["id"].as_str().unwrap(), "draft").await;
}

/// Inbound Parse's raw mode ("POST the raw, full MIME message") sends the whole email in one
/// `email` field, with no `headers`, `text` or `html`: the reply is matched by the email's own
/// threading headers and its text read out of its MIME parts (transfer encoding and charset
/// decoded).
#[tokio::test]
async fn a_raw_mime_inbound_email_is_matched_and_read() {
    let app = webhook_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &id, Channel::Email, "sg-1").await;
    app.wait_listed(&id, "sent").await;
    let email = format!(
        "Received: from mail.example.net by mx.sendgrid.net\r\n\
         From: =?UTF-8?Q?Ren=C3=A9e_Doe?= <renee@example.net>\r\n\
         To: news@example.com\r\n\
         Subject: Re: Hello\r\n\
         Message-ID: <raw-1@mail.example.net>\r\n\
         In-Reply-To: <{id}@example.com>\r\n\
         References: <{id}@example.com>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/alternative; boundary=\"b1\"\r\n\
         \r\n\
         --b1\r\n\
         Content-Type: text/plain; charset=iso-8859-1\r\n\
         Content-Transfer-Encoding: quoted-printable\r\n\
         \r\n\
         Merci, c'est tr=E8s clair.\r\n\
         --b1\r\n\
         Content-Type: text/html; charset=utf-8\r\n\
         \r\n\
         <p>Merci, c'est tr\u{e8}s clair.</p>\r\n\
         --b1--\r\n"
    );
    // The fields SendGrid adds in raw mode; `from` and `subject` as it takes them from the
    // headers.
    let form = reqwest::multipart::Form::new()
        .text("email", email)
        .text("to", "news@example.com")
        .text("from", "Renée Doe <renee@example.net>")
        .text("subject", "Re: Hello")
        .text(
            "envelope",
            r#"{"to":["news@example.com"],"from":"renee@example.net"}"#,
        )
        .text(
            "charsets",
            r#"{"to":"UTF-8","from":"UTF-8","subject":"UTF-8"}"#,
        );
    assert_eq!(post_inbound(&app, form).await, StatusCode::OK);
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
        m["state"] == "replied" && m["replies"] == 1
    })
    .await;
    eventually(|| async {
        let (_, list) = app.get("/v1/messages?direction=inbound").await;
        list["items"][0].is_object()
    })
    .await;
    let (_, list) = app.get("/v1/messages?direction=inbound").await;
    let inbound = &list["items"][0];
    assert_eq!(inbound["text"], "Merci, c'est très clair.");
    assert_eq!(inbound["from"]["username"], "renee@example.net");
    assert_eq!(inbound["from"]["name"], "Renée Doe");
    assert_eq!(inbound["subject"], "Re: Hello");
    assert_eq!(inbound["in_reply_to"], id.as_str());
    assert_eq!(inbound["provider_message_id"], "<raw-1@mail.example.net>");
}

#[tokio::test]
async fn an_event_escaping_half_a_surrogate_pair_is_kept_as_malformed_and_costs_no_other() {
    // Each event is stored as its own text from the batch, once read as a value: PostgreSQL
    // refuses a lone surrogate escape in jsonb, and a batch that held one, stored as it came,
    // would fail with 500 at every re-send. Such an event is kept as malformed on its own (the
    // whole batch was, before events were split); a whole pair is a character.
    let app = webhook_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &id, Channel::Email, "sg-1").await;
    let now = Utc::now().timestamp();
    let batch = format!(
        r#"[{{"event": "open", "sg_event_id": "o-1", "timestamp": {now}, "message_id": "{id}"}},
            {{"event": "open", "sg_event_id": "o-2", "timestamp": {now}, "message_id": "{id}",
              "useragent": "Mail \ud83d Client"}},
            {{"event": "click", "sg_event_id": "c-1", "timestamp": {now}, "message_id": "{id}",
              "url": "https://example.com/?a=1\u0026b=\uDC00"}},
            {{"event": "click", "sg_event_id": "c-2", "timestamp": {now}, "message_id": "{id}",
              "url": "https://example.com/\ud83d\udce7?a=1\u0026b=2"}},
            {{"event": "delivered", "sg_event_id": "d-1", "timestamp": {now}, "message_id": "{id}"}}]"#
    );
    let (status, body) = post_sendgrid(&app, batch.as_bytes()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["new"], 5, "{body}");
    // The open, the readable click and the delivery are on the message.
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
        m["opens"] == 1
            && m["clicks"] == 1
            && m["history"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["type"] == "DeliveryRecorded")
    })
    .await;
    let (_, problems) = app.get("/v1/webhooks/unmatched").await;
    let malformed: Vec<&str> = problems["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["status"] == "malformed")
        .map(|p| p["payload"]["_raw"].as_str().unwrap())
        .collect();
    assert_eq!(malformed.len(), 2, "{problems}");
    assert!(
        malformed
            .iter()
            .any(|raw| raw.contains(r"Mail \ud83d Client")),
        "{problems}"
    );
    assert!(
        malformed.iter().any(|raw| raw.contains(r"\uDC00")),
        "{problems}"
    );
    // The pair was read as the character it stands for.
    let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
    assert!(
        m.to_string()
            .contains("https://example.com/\u{1f4e7}?a=1&b=2"),
        "the click's url is kept whole: {m}"
    );
    // A re-send is dropped whole, the malformed events too (each by its text's fingerprint).
    let (status, body) = post_sendgrid(&app, batch.as_bytes()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["new"], 0, "{body}");
}

#[tokio::test]
async fn numbers_jsonb_cannot_hold_as_written_are_stored_as_read() {
    // `1e-16384` and a fraction of 16384 digits are JSON that serde_json reads (as 0 and 1),
    // and that PostgreSQL's numeric cannot hold: stored as they came, they failed the batch.
    let app = webhook_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &id, Channel::Email, "sg-1").await;
    let now = Utc::now().timestamp();
    let long_fraction = format!("1.{}", "0".repeat(16384));
    let batch = format!(
        r#"[{{"event": "open", "sg_event_id": "o-1", "timestamp": {now}, "message_id": "{id}", "score": 1e-16384}},
            {{"event": "click", "sg_event_id": "c-1", "timestamp": {now}, "message_id": "{id}",
              "url": "https://example.com/", "weight": {long_fraction}}}]"#
    );
    let (status, body) = post_sendgrid(&app, batch.as_bytes()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["new"], 2, "{body}");
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
        m["opens"] == 1 && m["clicks"] == 1
    })
    .await;
}

#[tokio::test]
async fn a_batch_of_a_thousand_events_is_recorded_in_one_request() {
    let app = webhook_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &id, Channel::Email, "sg-1").await;
    let now = Utc::now().timestamp();
    let batch: Vec<Value> = (0..1000)
        .map(|i| json!({"event": "open", "sg_event_id": format!("open-{i}"), "timestamp": now + i, "message_id": id}))
        .collect();
    let (status, body) = post_sendgrid(&app, &serde_json::to_vec(&batch).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["new"], 1000);
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
        m["opens"] == 1000
    })
    .await;
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn hmac_base64(secret: &str, body: &[u8]) -> String {
    use base64::Engine;
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn x_crc_is_answered_and_a_reply_to_our_post_is_recorded() {
    let app = webhook_app().await;
    let r = app
        .client
        .get(app.url("/webhooks/twitter?crc_token=challenge-123"))
        .send()
        .await
        .unwrap();
    let (status, body) = read(r).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"response_token": format!("sha256={}", hmac_base64(X_SECRET, b"challenge-123"))})
    );
    assert_eq!(
        body["response_token"],
        x_crc_response(X_SECRET, "challenge-123")
    );

    let original = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &original, Channel::Twitter, "1861234567890123456").await;
    app.wait_listed(&original, "sent").await;
    let delivery = fixture("x-account-activity-reply.json");
    let post = |signature: String| {
        app.client
            .post(app.url("/webhooks/twitter"))
            .header("x-twitter-webhooks-signature", signature)
            .body(delivery.clone())
            .send()
    };
    let (status, error) = read(post("sha256=AAAA".into()).await.unwrap()).await;
    assert_error(status, &error, StatusCode::UNAUTHORIZED, "bad_signature");
    let good = format!("sha256={}", hmac_base64(X_SECRET, &delivery));
    let (status, _) = read(post(good.clone()).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    // X re-sends: the same reply again changes nothing.
    let (status, body) = read(post(good).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["new"], 0);

    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{original}")).await;
        m["state"] == "replied" && m["replies"] == 1
    })
    .await;
    eventually(|| async {
        let (_, inbound) = app.get("/v1/messages?direction=inbound").await;
        inbound["items"].as_array().unwrap().len() == 1
    })
    .await;
    let (_, inbound) = app.get("/v1/messages?direction=inbound").await;
    let reply = &inbound["items"][0];
    assert_eq!(reply["state"], "received");
    assert_eq!(reply["from"]["username"], "jane_doe");
    assert_eq!(reply["text"], "@acme_marketing thanks, that helped!");
    assert_eq!(reply["in_reply_to"], original.as_str());
    assert_eq!(reply["to"][0]["username"], "acme_marketing");
}

/// The CRC answer is the HMAC that signs a delivery, with the same key: a token that is itself
/// a delivery is refused, or anyone could have a forged reply signed by asking for its CRC.
#[tokio::test]
async fn x_crc_does_not_sign_a_delivery_for_whoever_asks() {
    let app = webhook_app().await;
    let original = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &original, Channel::Twitter, "1861234567890123456").await;
    app.wait_listed(&original, "sent").await;
    let delivery = fixture("x-account-activity-reply.json");
    let compact = serde_json::to_vec(&serde_json::from_slice::<Value>(&delivery).unwrap()).unwrap();
    for forged in [delivery, compact] {
        let r = app
            .client
            .get(app.url("/webhooks/twitter"))
            .query(&[("crc_token", std::str::from_utf8(&forged).unwrap())])
            .send()
            .await
            .unwrap();
        let (status, body) = read(r).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "malformed");
        assert!(body.get("response_token").is_none(), "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("crc_token"),
            "{body}"
        );
    }
    // A delivery short enough for the length bound is refused as a JSON document.
    let short = json!({"for_user_id": "2244994945", "tweet_create_events": [{
        "id_str": "1", "in_reply_to_status_id_str": "1861234567890123456",
        "user": {"id_str": "9", "screen_name": "x"}, "text": "hi"}]})
    .to_string();
    assert!(short.len() <= 256, "{}", short.len());
    let r = app
        .client
        .get(app.url("/webhooks/twitter"))
        .query(&[("crc_token", short.as_str())])
        .send()
        .await
        .unwrap();
    let (status, body) = read(r).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "malformed");
    // What the CRC does sign (a short token that is not a JSON object) is no delivery: posted
    // with that signature it is refused, and nothing is kept.
    for token in ["challenge-123", "\"a JSON string\"", "42"] {
        let signature = x_crc_response(X_SECRET, token);
        let r = app
            .client
            .post(app.url("/webhooks/twitter"))
            .header("x-twitter-webhooks-signature", signature)
            .body(token.to_string())
            .send()
            .await
            .unwrap();
        let (status, body) = read(r).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "malformed");
    }
    let (_, unmatched) = app.get("/v1/webhooks/unmatched").await;
    assert_eq!(unmatched["items"], json!([]), "{unmatched}");
    let long = "a".repeat(257);
    let r = app
        .client
        .get(app.url(&format!("/webhooks/twitter?crc_token={long}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Nothing was recorded: the message is as it was sent.
    let (_, m) = app.get(&format!("/v1/messages/{original}")).await;
    assert_eq!(
        (m["state"].clone(), m["replies"].clone()),
        (json!("sent"), json!(0))
    );
}

/// X's other account activity (likes, follows: each a `*_events` array) and deliveries in a
/// shape not known here are kept for inspection, never dropped silently; X's retry of the
/// same delivery adds nothing.
#[tokio::test]
async fn x_activity_other_than_replies_is_kept_as_unmatched() {
    let app = webhook_app().await;
    let post = |delivery: Value| {
        let body = delivery.to_string().into_bytes();
        let signature = format!("sha256={}", hmac_base64(X_SECRET, &body));
        let request = app
            .client
            .post(app.url("/webhooks/twitter"))
            .header("x-twitter-webhooks-signature", signature)
            .body(body)
            .send();
        async move { read(request.await.unwrap()).await }
    };
    let likes = json!({"for_user_id": "2244994945", "favorite_events": [
        {"id": "a7ba59eab0bfcba386f7acedac279542", "created_at": "Mon Mar 26 16:33:26 +0000 2018",
         "favorited_status": {"id_str": "1861234567890123456"}, "user": {"id_str": "1"}},
        {"id": "b7ba59eab0bfcba386f7acedac279543", "created_at": "Mon Mar 26 16:34:26 +0000 2018",
         "favorited_status": {"id_str": "1861234567890123456"}, "user": {"id_str": "2"}}
    ]});
    let (status, body) = post(likes.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["received"].clone(), body["new"].clone()),
        (json!(2), json!(2))
    );
    let (_, body) = post(likes).await;
    assert_eq!(body["new"], 0, "the retry is the same two facts: {body}");
    let (_, body) = post(json!({"for_user_id": "2244994945", "tweet_create_events": {}})).await;
    assert_eq!(body["new"], 1, "{body}");
    // Typing indicators are not kept: nothing to inspect later.
    let (_, body) = post(json!({"for_user_id": "2244994945",
        "direct_message_indicate_typing_events": [{"created_timestamp": "1517359585447"}]}))
    .await;
    assert_eq!(body["received"], 0, "{body}");
    let (_, body) = post(json!({"for_user_id": "2244994945", "something_new": true})).await;
    assert_eq!(body["new"], 1, "{body}");

    let (_, problems) = app.get("/v1/webhooks/unmatched").await;
    let items = problems["items"].as_array().unwrap();
    // Each says what kind of activity it was.
    let likes = items
        .iter()
        .filter(|i| i["payload"]["favorite_events"].is_object())
        .count();
    assert_eq!(likes, 2, "{problems}");
    let statuses: Vec<&str> = items
        .iter()
        .map(|i| i["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        (
            statuses.iter().filter(|s| **s == "unmatched").count(),
            statuses.iter().filter(|s| **s == "malformed").count()
        ),
        (3, 1),
        "{problems}"
    );
}

#[tokio::test]
async fn facebook_challenge_is_answered_and_a_comment_on_our_post_is_a_reply() {
    let app = webhook_app().await;
    let get = |query: &str| {
        app.client
            .get(app.url(&format!("/webhooks/facebook?{query}")))
            .send()
    };
    let r = get(&format!(
        "hub.mode=subscribe&hub.verify_token={FB_VERIFY}&hub.challenge=1158201444"
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "1158201444");
    let r = get("hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=1158201444")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    let original = uuid::Uuid::now_v7().to_string();
    sent_message(
        &app,
        &original,
        Channel::Facebook,
        "104857600123456_998877665544332",
    )
    .await;
    app.wait_listed(&original, "sent").await;
    let delivery = fixture("facebook-feed-comment.json");
    let post = |signature: String| {
        app.client
            .post(app.url("/webhooks/facebook"))
            .header("X-Hub-Signature-256", signature)
            .body(delivery.clone())
            .send()
    };
    let mut tampered = delivery.clone();
    tampered[10] ^= 1;
    let r = app
        .client
        .post(app.url("/webhooks/facebook"))
        .header(
            "X-Hub-Signature-256",
            format!("sha256={}", hmac_hex(FB_SECRET, &delivery)),
        )
        .body(tampered)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (status, _) = read(
        post(format!("sha256={}", hmac_hex(FB_SECRET, &delivery)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{original}")).await;
        m["state"] == "replied" && m["replies"] == 1
    })
    .await;
    eventually(|| async {
        let (_, inbound) = app
            .get("/v1/messages?direction=inbound&channel=facebook")
            .await;
        inbound["items"]
            .as_array()
            .unwrap()
            .first()
            .is_some_and(|m| m["text"] == "Love this post!")
    })
    .await;

    // The page answered Sam's comment (a message of ours, posted as a comment), and Sam
    // answers back: the comment names ours as its parent, and the reply is to our comment,
    // not to the post.
    let our_comment = uuid::Uuid::now_v7().to_string();
    sent_message(
        &app,
        &our_comment,
        Channel::Facebook,
        "998877665544332_111222333444777",
    )
    .await;
    app.wait_listed(&our_comment, "sent").await;
    let mut answer: Value = serde_json::from_slice(&delivery).unwrap();
    let value = &mut answer["entry"][0]["changes"][0]["value"];
    value["comment_id"] = json!("998877665544332_111222333444888");
    value["parent_id"] = json!("998877665544332_111222333444777");
    value["message"] = json!("Thanks for answering!");
    let answer = serde_json::to_vec(&answer).unwrap();
    let (status, _) = read(
        app.client
            .post(app.url("/webhooks/facebook"))
            .header(
                "X-Hub-Signature-256",
                format!("sha256={}", hmac_hex(FB_SECRET, &answer)),
            )
            .body(answer)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{our_comment}")).await;
        m["state"] == "replied" && m["replies"] == 1
    })
    .await;
    let (_, m) = app.get(&format!("/v1/messages/{original}")).await;
    assert_eq!(m["replies"], 1, "the post's own reply only: {m}");

    // The page answering on its own post comes back too: not a reply.
    let mut own: Value = serde_json::from_slice(&delivery).unwrap();
    let value = &mut own["entry"][0]["changes"][0]["value"];
    value["from"] = json!({"id": "104857600123456", "name": "Acme"});
    value["comment_id"] = json!("998877665544332_111222333444999");
    let own = serde_json::to_vec(&own).unwrap();
    let r = app
        .client
        .post(app.url("/webhooks/facebook"))
        .header(
            "X-Hub-Signature-256",
            format!("sha256={}", hmac_hex(FB_SECRET, &own)),
        )
        .body(own)
        .send()
        .await
        .unwrap();
    let (status, body) = read(r).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["received"], 0, "{body}");
}

#[tokio::test]
async fn an_inbound_email_reply_is_matched_by_its_headers() {
    let app = webhook_app().await;
    let original = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &original, Channel::Email, "sg-1").await;
    // Bob answers Carol, who had answered our email: the direct parent is hers (a time-ordered
    // id of no message of ours), a mail client's random id is in the thread too, and ours is
    // further back in References.
    let carol = uuid::Uuid::now_v7();
    let client = "5f0c6a52-9d2b-4e61-a3c7-0d8b7e9f1a24";
    let form = reqwest::multipart::Form::new()
        .text(
            "headers",
            format!(
                "Received: from mx.example.net\r\nMessage-ID: <CAF-reply-1@mail.example.net>\r\n\
                 In-Reply-To: <{carol}@her.example.org>\r\n\
                 References: <{original}@example.com> <{client}@mail.example.net>\r\n\
                 \t<{carol}@her.example.org>\r\nSubject: Re: Hello\r\n"
            ),
        )
        .text("from", "Alice Doe <alice@example.com>")
        .text("to", "news@example.com")
        .text("subject", "Re: Hello")
        .text("text", "Thanks, see you then.")
        .text(
            "envelope",
            r#"{"to":["news@example.com"],"from":"alice@example.com"}"#,
        );
    assert_eq!(post_inbound(&app, form).await, StatusCode::OK);
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{original}")).await;
        m["state"] == "replied"
    })
    .await;
    eventually(|| async {
        let (_, inbound) = app
            .get("/v1/messages?direction=inbound&profile=alice@example.com")
            .await;
        inbound["items"]
            .as_array()
            .unwrap()
            .first()
            .is_some_and(|m| {
                m["subject"] == "Re: Hello"
                    && m["text"] == "Thanks, see you then."
                    && m["from"]["name"] == "Alice Doe"
            })
    })
    .await;
}

/// With a security policy's signature, Inbound Parse's form is verified over its raw bytes
/// before it is read, as the Event Webhook's batches are: unsigned, signed by another key, or
/// changed after signing, it is refused with 401 and nothing is recorded; signed, the reply is
/// matched. Too large a form is still a 413.
#[tokio::test]
async fn a_signed_inbound_email_is_verified_before_it_is_read() {
    const POLICY_SCALAR: [u8; 32] = [9; 32];
    let (policy_key, _) = sendgrid_test_signature(&POLICY_SCALAR, "0", b"").unwrap();
    let (event_key, _) = sendgrid_test_signature(&SCALAR, "0", b"").unwrap();
    let app = TestApp::spawn_with(&[
        ("MESSAGING_SENDGRID_WEBHOOK_PUBLIC_KEY", event_key),
        ("MESSAGING_SENDGRID_INBOUND_PUBLIC_KEY", policy_key),
    ])
    .await;
    let original = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &original, Channel::Email, "sg-1").await;
    let field = |name: &str, value: &str| {
        format!("--xYzZY\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
    };
    let form = [
        field(
            "headers",
            &format!(
                "Message-ID: <signed-reply-1@mail.example.net>\r\nIn-Reply-To: <{original}@example.com>\r\n"
            ),
        ),
        field("from", "Alice Doe <alice@example.com>"),
        field("subject", "Re: Hello"),
        field("text", "Signed and sealed."),
        "--xYzZY--\r\n".to_string(),
    ]
    .concat()
    .into_bytes();
    let timestamp = Utc::now().timestamp().to_string();
    let post = |body: Vec<u8>, signature: Option<(String, String)>| {
        let mut request = app
            .client
            .post(app.url("/webhooks/sendgrid/inbound"))
            .header("content-type", "multipart/form-data; boundary=xYzZY")
            .body(body);
        if let Some((timestamp, signature)) = signature {
            request = request
                .header("X-Twilio-Email-Event-Webhook-Signature", signature)
                .header("X-Twilio-Email-Event-Webhook-Timestamp", timestamp);
        }
        async move { read(request.send().await.unwrap()).await }
    };
    let signed_by = |scalar: &[u8; 32], body: &[u8]| {
        let (_, signature) = sendgrid_test_signature(scalar, &timestamp, body).unwrap();
        Some((timestamp.clone(), signature))
    };
    let mut changed = form.clone();
    let at = changed.windows(6).position(|w| w == b"sealed").unwrap();
    changed[at] = b'S';
    for (body, signature) in [
        (form.clone(), None),
        (form.clone(), signed_by(&SCALAR, &form)),
        (changed, signed_by(&POLICY_SCALAR, &form)),
    ] {
        let (status, error) = post(body, signature).await;
        assert_error(status, &error, StatusCode::UNAUTHORIZED, "bad_signature");
    }
    let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_inbox")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(inbox, 0, "nothing refused is recorded");

    let (status, body) = post(form.clone(), signed_by(&POLICY_SCALAR, &form)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["new"], 1, "{body}");
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{original}")).await;
        m["state"] == "replied" && m["replies"] == 1
    })
    .await;
    // The reply as an inbound message, once the list has it (the detail above is read from
    // the log).
    eventually(|| async {
        let (_, inbound) = app.get("/v1/messages?direction=inbound").await;
        inbound["items"][0]["text"] == "Signed and sealed."
    })
    .await;

    // A signed reply with a 3 MB attachment (past axum's default 2 MB) is taken whole.
    let mut with_attachment = [
        field(
            "headers",
            &format!(
                "Message-ID: <signed-reply-2@mail.example.net>\r\nIn-Reply-To: <{original}@example.com>\r\n"
            ),
        ),
        field("text", "See the attachment."),
        "--xYzZY\r\nContent-Disposition: form-data; name=\"attachment1\"; filename=\"a.bin\"\r\n\r\n"
            .to_string(),
    ]
    .concat()
    .into_bytes();
    with_attachment.extend(std::iter::repeat_n(b'a', 3 << 20));
    with_attachment.extend(b"\r\n--xYzZY--\r\n");
    let (status, body) = post(
        with_attachment.clone(),
        signed_by(&POLICY_SCALAR, &with_attachment),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["new"], 1, "{body}");

    // Over the limit: 413, saying what the limit is, before the signature is even checked.
    let mut large = field("headers", "Message-ID: <large@mail.example.net>\r\n").into_bytes();
    large.extend(std::iter::repeat_n(b'a', 33 << 20));
    let (status, error) = post(large.clone(), signed_by(&SCALAR, &large)).await;
    assert_error(
        status,
        &error,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("32 MB"),
        "{error}"
    );
}

/// Values only malformed input makes: an inbound email's From and `Message-ID` are whatever
/// its sender wrote, a provider's id whatever it answered. Longer than PostgreSQL's indexes
/// take (about 2.7 KB an entry, after compression), or holding a control character, they
/// once stopped the message list for good (its batch retried forever) or failed the inbound
/// email at every retry. The reply is kept once, and the list goes on.
#[tokio::test]
async fn outsized_values_from_outside_are_kept_and_the_list_goes_on() {
    let app = webhook_app().await;
    // Letters and digits that do not compress much (a xorshift; nothing needs to be secret).
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut noise = |n: usize| -> String {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
                alphabet[(state % alphabet.len() as u64) as usize] as char
            })
            .collect()
    };
    // A provider that answered an id no index takes, with a NUL in it.
    let junk = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &junk, Channel::Email, &format!("{}\0", noise(6000))).await;
    let original = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &original, Channel::Email, "sg-1").await;
    let from = format!("{}@example.com", noise(6000));
    let message_id = format!("<{}@mail.example.net>", noise(6000));
    let headers = format!(
        "Message-ID: {message_id}\r\nIn-Reply-To: <{original}@example.com>\r\nSubject: Re: Hello\r\n"
    );
    // Twice: the provider's retry of the same email is the same fact.
    for _ in 0..2 {
        let form = reqwest::multipart::Form::new()
            .text("headers", headers.clone())
            .text("from", format!("Someone <{from}>"))
            .text("to", "news@example.com")
            .text("subject", "Re: Hello")
            .text("text", "An answer from a strange address.");
        assert_eq!(post_inbound(&app, form).await, StatusCode::OK);
    }
    // Sent after the others: listed only if nothing before it holds the list back.
    let last = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &last, Channel::Email, "sg-2").await;
    eventually(|| async {
        let (_, list) = app.get("/v1/messages?limit=100").await;
        let listed = |id: &str| {
            list["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["id"] == id)
        };
        listed(&last) && listed(&junk)
    })
    .await;
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{original}")).await;
        m["state"] == "replied"
    })
    .await;
    // Every fact applied, then every event listed: the list then holds all the replies.
    eventually(|| async { app.store.gauges().await.unwrap().webhook_inbox_pending == 0 }).await;
    eventually(|| async {
        let gauges = app.store.gauges().await.unwrap();
        gauges
            .projection_lag
            .iter()
            .all(|(name, lag)| name != "message_list" || *lag == 0)
    })
    .await;
    let (status, inbound) = app.get("/v1/messages?direction=inbound").await;
    assert_eq!(status, StatusCode::OK);
    let inbound = inbound["items"].as_array().unwrap();
    assert_eq!(inbound.len(), 1, "the retry is the same reply: {inbound:?}");
    // Its sender's address shows in the message as it came.
    assert_eq!(inbound[0]["from"]["username"], from.as_str());
}

/// Requests the webhooks cannot read are answered in the API's error shape, saying what is
/// wrong, not with the framework's plain text (or an empty 405).
#[tokio::test]
async fn unreadable_webhook_requests_get_the_error_shape() {
    let app = webhook_app().await;
    let cases = [
        (
            app.client.get(app.url("/webhooks/sendgrid/events")),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            app.client
                .post(app.url("/webhooks/sendgrid/inbound"))
                .json(&json!({"from": "alice@example.com"})),
            StatusCode::BAD_REQUEST,
            "malformed",
        ),
        (
            app.client
                .get(app.url("/webhooks/twitter?crc_token=a&crc_token=b")),
            StatusCode::BAD_REQUEST,
            "malformed",
        ),
        (
            app.client
                .post(app.url("/webhooks/sendgrid/events"))
                .body(vec![b' '; 9 << 20]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (request, status, code) in cases {
        let (got, body) = read(request.send().await.unwrap()).await;
        assert_error(got, &body, status, code);
    }
    let (_, unmatched) = app.get("/v1/webhooks/unmatched").await;
    assert_eq!(
        unmatched["items"].as_array().unwrap().len(),
        0,
        "{unmatched}"
    );
}

#[tokio::test]
async fn an_inbound_email_with_large_attachments_is_taken_and_an_oversized_one_gets_413() {
    let app = webhook_app().await;
    let original = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &original, Channel::Email, "sg-2").await;
    let form = |attachment: usize| {
        let file = reqwest::multipart::Part::bytes(vec![b'x'; attachment])
            .file_name("report.pdf")
            .mime_str("application/pdf")
            .unwrap();
        reqwest::multipart::Form::new()
            .text(
                "headers",
                format!(
                    "Message-ID: <big-reply@mail.example.net>\r\n\
                     In-Reply-To: <{original}@example.com>\r\n"
                ),
            )
            .text("from", "Alice Doe <alice@example.com>")
            .text("subject", "Re: Hello")
            .text("text", "The report is attached.")
            .part("attachment1", file)
    };
    let post = |form| {
        app.client
            .post(app.url("/webhooks/sendgrid/inbound"))
            .multipart(form)
            .send()
    };
    // SendGrid takes emails of up to 30 MB: a 12 MB attachment is an ordinary reply.
    let (status, body) = read(post(form(12 << 20)).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["new"], 1);
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{original}")).await;
        m["state"] == "replied"
    })
    .await;
    // Past the limit: 413, saying what the limit is.
    let (status, error) = read(post(form(40 << 20)).await.unwrap()).await;
    assert_error(
        status,
        &error,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("32 MB"),
        "{error}"
    );
}

/// Posts the X reply fixture, signed; returns the response body.
async fn post_x_reply(app: &TestApp) -> Value {
    let delivery = fixture("x-account-activity-reply.json");
    let r = app
        .client
        .post(app.url("/webhooks/twitter"))
        .header(
            "x-twitter-webhooks-signature",
            format!("sha256={}", hmac_base64(X_SECRET, &delivery)),
        )
        .body(delivery)
        .send()
        .await
        .unwrap();
    let (status, body) = read(r).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test]
async fn an_x_reply_that_comes_before_its_post_is_listed_waits_for_it() {
    let app = webhook_app().await;
    // No post of ours with that id is listed yet (the list is behind, or being rebuilt).
    assert_eq!(post_x_reply(&app).await["new"], 1);
    // Once the applier has looked at it: waiting, not unmatched.
    waiting_facts(&app, "status = 'pending'").await;
    let (_, problems) = app.get("/v1/webhooks/unmatched").await;
    assert_eq!(problems["items"], json!([]), "waiting, not unmatched");

    let original = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &original, Channel::Twitter, "1861234567890123456").await;
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{original}")).await;
        m["state"] == "replied" && m["replies"] == 1
    })
    .await;
    let (_, problems) = app.get("/v1/webhooks/unmatched").await;
    assert_eq!(problems["items"], json!([]));
}

#[tokio::test]
async fn a_reply_to_a_post_that_is_never_listed_is_kept_as_unmatched_once_it_has_waited() {
    let app = webhook_app().await;
    assert_eq!(post_x_reply(&app).await["new"], 1);
    // As if it had come more than an hour ago.
    sqlx::query(
        "UPDATE webhook_inbox SET received_at = '2000-01-01T00:00:00.000+00:00' \
         WHERE event_id = 'tweet:1861234567890123457'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    // The applier looks again within its polling interval.
    eventually(|| async {
        let (_, problems) = app.get("/v1/webhooks/unmatched").await;
        problems["items"]
            .as_array()
            .unwrap()
            .first()
            .is_some_and(|i| {
                i["status"] == "unmatched"
                    && i["reason"]
                        .as_str()
                        .unwrap()
                        .contains("no post of ours has twitter id 1861234567890123456")
            })
    })
    .await;
}

/// An X or Facebook account connected over HTTP, as the domain names it.
async fn social_service(app: &TestApp, channel: Channel, username: &str) -> ServiceRef {
    let provider = match channel {
        Channel::Facebook => Provider::Facebook,
        _ => Provider::X,
    };
    let id = app
        .create_service(channel.as_str(), provider.as_str(), username)
        .await;
    ServiceRef {
        id: id.parse().unwrap(),
        channel,
        provider,
        username: username.into(),
        name: None,
    }
}

/// A post through `service` whose provider call was made and never answered: the post may or
/// may not exist, and a person resolves it.
async fn post_with_unknown_outcome(app: &TestApp, service: &ServiceRef, text: &str) -> MessageId {
    let id = MessageId::from_uuid(uuid::Uuid::now_v7());
    let now = Utc::now();
    let input = MessageInput {
        text: Some(text.into()),
        ..Default::default()
    };
    let commands = vec![
        MessageCommand::Compose(Compose {
            id,
            message: build_message(service, input).unwrap(),
            dispatch: Dispatch::Draft,
            now,
        }),
        MessageCommand::Send {
            now,
            expected_publish_at: None,
        },
        MessageCommand::StartSendAttempt { now, attempt: 1 },
        MessageCommand::RecordSendOutcomeUnknown {
            attempt: 1,
            reason: "timed out".into(),
            at: now,
        },
    ];
    app.store
        .execute(id, MessageCommand::Batch(commands))
        .await
        .unwrap();
    id
}

/// Resolving `id` as posted with `post` is refused with 422, saying `says`.
async fn resolve_refused(app: &TestApp, id: MessageId, post: &str, says: &str) {
    let (status, error) = app
        .post(
            &format!("/v1/messages/{id}/resolve"),
            json!({"posted": true, "provider_message_id": post}),
        )
        .await;
    assert_error(
        status,
        &error,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains(says), "{message}");
}

/// An X post whose outcome is unknown (its call timed out) is resolved by hand as posted more
/// than an hour after a reply to it came: the reply, kept as unmatched by then, is matched to
/// it, and nothing else is.
#[tokio::test]
async fn a_reply_given_up_on_is_matched_when_its_post_is_resolved_as_posted() {
    let app = webhook_app().await;
    let service = social_service(&app, Channel::Twitter, "acme_marketing").await;
    let id = post_with_unknown_outcome(&app, &service, "Hello there").await;
    // A reply to post 1861234567890123456 comes; no post of ours has that id, and after an
    // hour (as if received long ago) it is kept as unmatched.
    assert_eq!(post_x_reply(&app).await["new"], 1);
    sqlx::query(
        "UPDATE webhook_inbox SET received_at = '2000-01-01T00:00:00.000+00:00' \
         WHERE event_id = 'tweet:1861234567890123457'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    eventually(|| async {
        let (_, problems) = app.get("/v1/webhooks/unmatched").await;
        problems["items"].as_array().unwrap().len() == 1
    })
    .await;

    // A person finds another post (not the one replied to) and records it: the reply stays.
    let other = post_with_unknown_outcome(&app, &service, "Another").await;
    // An id in another form than X's would match no reply: refused, saying which form.
    resolve_refused(
        &app,
        other,
        "https://x.com/acme/status/1861234567890000000",
        "the number at the end of its URL",
    )
    .await;
    let (status, m) = app
        .post(
            &format!("/v1/messages/{other}/resolve"),
            json!({"posted": true, "provider_message_id": "1861234567890000000"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{m}");
    let (_, problems) = app.get("/v1/webhooks/unmatched").await;
    assert_eq!(problems["items"].as_array().unwrap().len(), 1, "{problems}");

    // The post replied to is found and recorded: the reply is matched to it.
    let (status, m) = app
        .post(
            &format!("/v1/messages/{id}/resolve"),
            json!({"posted": true, "provider_message_id": "1861234567890123456"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{m}");
    assert_eq!(m["state"], "sent");
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
        m["state"] == "replied" && m["replies"] == 1
    })
    .await;
    settled(&app).await;
    let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
    let replies = m["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "ReplyRecorded")
        .count();
    assert_eq!(replies, 1, "{m}");
    let history_len_before_again = m["history"].as_array().unwrap().len();
    let (_, problems) = app.get("/v1/webhooks/unmatched").await;
    assert_eq!(problems["items"], json!([]));
    let (_, inbound) = app.get("/v1/messages?direction=inbound").await;
    assert_eq!(inbound["items"].as_array().unwrap().len(), 1, "{inbound}");
    let (_, m) = app.get(&format!("/v1/messages/{other}")).await;
    assert_eq!(m["replies"], 0, "{m}");

    // The same resolution again (its answer lost, say) answers as the first did and records
    // nothing more; another id for the same post is a conflict.
    let (status, again) = app
        .post(
            &format!("/v1/messages/{id}/resolve"),
            json!({"posted": true, "provider_message_id": "1861234567890123456"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["provider_message_id"], "1861234567890123456");
    let (status, error) = app
        .post(
            &format!("/v1/messages/{id}/resolve"),
            json!({"posted": true, "provider_message_id": "1861234567890999999"}),
        )
        .await;
    assert_error(status, &error, StatusCode::CONFLICT, "invalid_transition");
    settled(&app).await;
    let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(m["replies"], 1, "{m}");
    assert_eq!(
        m["history"].as_array().unwrap().len(),
        history_len_before_again,
        "{m}"
    );
}

/// A Facebook post's id is its Graph API id, `<page-id>_<post-id>`, as comments' webhooks name
/// it: a resolve with another form (the URL's number alone) is refused, saying which.
#[tokio::test]
async fn a_facebook_post_is_resolved_with_its_graph_id() {
    let app = webhook_app().await;
    let service = social_service(&app, Channel::Facebook, "104857600123456").await;
    let id = post_with_unknown_outcome(&app, &service, "Hello").await;
    for bad in ["987654321", "104857600123456_", "page_987654321"] {
        resolve_refused(&app, id, bad, "`<page-id>_<post-id>`").await;
    }
    let (status, m) = app
        .post(
            &format!("/v1/messages/{id}/resolve"),
            json!({"posted": true, "provider_message_id": "104857600123456_987654321"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{m}");
    assert_eq!(m["state"], "sent");
    assert_eq!(m["provider_message_id"], "104857600123456_987654321");
}

/// A SendGrid event naming a message we never had (another system's email on a shared account,
/// say) waits for it, then, after an hour, is kept as unmatched with why: it neither waits
/// forever nor hides from the unmatched list.
#[tokio::test]
async fn a_fact_for_a_message_that_never_appears_is_kept_as_unmatched_once_it_has_waited() {
    let app = webhook_app().await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let batch = json!([{"event": "delivered", "sg_event_id": "d-unknown", "timestamp": Utc::now().timestamp(), "message_id": unknown}]);
    let (status, body) = post_sendgrid(&app, &serde_json::to_vec(&batch).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    waiting_facts(&app, "event_id = 'd-unknown' AND status = 'pending'").await;
    let (_, problems) = app.get("/v1/webhooks/unmatched").await;
    assert_eq!(problems["items"], json!([]), "waiting, not unmatched yet");
    // As if it had come more than an hour ago.
    sqlx::query(
        "UPDATE webhook_inbox SET received_at = '2000-01-01T00:00:00.000+00:00' \
         WHERE event_id = 'd-unknown'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    eventually(|| async {
        let (_, problems) = app.get("/v1/webhooks/unmatched").await;
        !problems["items"].as_array().unwrap().is_empty()
    })
    .await;
    let (_, problems) = app.get("/v1/webhooks/unmatched").await;
    let item = &problems["items"][0];
    assert_eq!(item["status"], "unmatched", "{item}");
    assert_eq!(item["message_id"], unknown.as_str(), "{item}");
    let reason = item["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("no message of ours has id {unknown}"))
            && reason.contains("waited 60 minutes"),
        "{reason}"
    );
    settled(&app).await;
}

/// Posts `count` SendGrid opens of message `id` numbered from `from` (their `sg_event_id`s
/// are `open-<n>`: the same numbers again are duplicates).
async fn post_opens(app: &TestApp, id: &str, from: usize, count: usize) {
    let now = Utc::now().timestamp();
    let batch: Vec<Value> = (from..from + count)
        .map(|i| json!({"event": "open", "sg_event_id": format!("open-{i}"), "timestamp": now + i as i64, "message_id": id}))
        .collect();
    let (status, body) = post_sendgrid(app, &serde_json::to_vec(&batch).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn opens_become(app: &TestApp, id: &str, opens: u64) {
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
        m["opens"] == opens
    })
    .await;
    settled(app).await;
    let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(m["opens"], opens, "{m}");
}

/// A message with a long history (an email opened again and again: one event per fact) is
/// decided from its snapshot and the events after it, on both backends; nothing is lost or counted
/// twice, duplicates included, and a snapshot of another fold version or that cannot be read
/// is ignored and replaced.
#[tokio::test]
async fn a_message_with_hundreds_of_facts_keeps_every_one_once_through_its_snapshots() {
    let app = webhook_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    sent_message(&app, &id, Channel::Email, "sg-1").await;
    // In batches, each applied before the next is posted: every one is a command on a message
    // with more history than the last.
    for round in 0..3 {
        post_opens(&app, &id, round * 100, 100).await;
        opens_become(&app, &id, (round as u64 + 1) * 100).await;
    }
    let snapshot = || async {
        let row: Option<(i64, i32, String)> = sqlx::query_as(
            "SELECT sequence, fold_version, fold FROM message_snapshots WHERE aggregate_id = $1",
        )
        .bind(&id)
        .fetch_optional(&app.pool)
        .await
        .unwrap();
        row
    };
    let (sequence, version, _) = snapshot().await.expect("a snapshot of the message");
    assert!(sequence >= 64, "taken at sequence {sequence}");
    assert_eq!(version, Message::FOLD_VERSION);
    // Every fact again (the inbox keeps each once; the message's fold would not count one twice
    // either).
    for round in 0..3 {
        post_opens(&app, &id, round * 100, 100).await;
    }
    settled(&app).await;
    opens_become(&app, &id, 300).await;
    // The inbox dropped those; a fact the message has seen, sent to it as a command, is no news
    // to the fold read from its snapshot either.
    let history = |m: &Value| m["history"].as_array().unwrap().len();
    let (_, before) = app.get(&format!("/v1/messages/{id}")).await;
    let seen = MessageCommand::RecordOpen {
        fact: Fact {
            fact_id: "open-5".into(),
            occurred_at: Utc::now(),
        },
        machine_open: false,
    };
    app.store
        .execute(id.parse().unwrap(), seen)
        .await
        .expect("a duplicate is accepted");
    let (_, after) = app.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(
        history(&after),
        history(&before),
        "no event for a duplicate"
    );
    assert_eq!(after["opens"], 300);

    // A snapshot of another fold version is ignored, and replaced by the next load: one
    // that would count wrongly (no opens, no facts seen) at the message's last sequence.
    let (_, _, fold) = snapshot().await.expect("a snapshot of the message");
    let mut wrong: Value = serde_json::from_str(&fold).unwrap();
    wrong["data"]["opens"] = 0.into();
    wrong["data"]["seen_facts"] = json!([]);
    sqlx::query(
        "UPDATE message_snapshots SET fold_version = 0, fold = $1, \
                sequence = (SELECT max(sequence) FROM events WHERE aggregate_id = $2)",
    )
    .bind(wrong.to_string())
    .bind(&id)
    .execute(&app.pool)
    .await
    .unwrap();
    post_opens(&app, &id, 250, 100).await;
    opens_become(&app, &id, 350).await;
    let (_, version, _) = snapshot().await.expect("a snapshot of the message");
    assert_eq!(version, Message::FOLD_VERSION);
    // One that is not a message (or not JSON) too.
    for (n, unreadable) in ["{\"data\": null}", "not json"].into_iter().enumerate() {
        sqlx::query("UPDATE message_snapshots SET fold = $1")
            .bind(unreadable)
            .execute(&app.pool)
            .await
            .unwrap();
        post_opens(&app, &id, 350 + n * 10, 10).await;
        opens_become(&app, &id, 360 + n as u64 * 10).await;
        let (_, _, fold) = snapshot().await.expect("a snapshot of the message");
        assert!(fold.contains("\"opens\":"), "replaced: {fold}");
    }
    // The history still has every event once: compose, send, attempt, sent and each open.
    let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(
        m["history"].as_array().unwrap().len(),
        4 + 370,
        "{}",
        m["history"]
    );
}

/// Prepares the store's webhook lease on `conn` as `lease`.
async fn prepare_lease(conn: &mut sqlx::PgConnection) {
    use messaging::store::postgres::LEASE_WEBHOOK_FACTS;
    sqlx::raw_sql(&format!(
        "PREPARE lease(timestamptz) AS {LEASE_WEBHOOK_FACTS}"
    ))
    .execute(&mut *conn)
    .await
    .expect("prepare");
}

/// The lease's transaction on `conn`: the store's (`with`), or a plain one.
async fn begin_lease_or_plain(
    conn: &mut sqlx::PgConnection,
    with: bool,
) -> sqlx::Transaction<'_, sqlx::Postgres> {
    if with {
        messaging::store::postgres::begin_webhook_lease(conn)
            .await
            .expect("begin the lease")
    } else {
        sqlx::Connection::begin(conn).await.expect("begin")
    }
}

/// The plan `conn` would run the prepared `lease` with, in the transaction
/// [`begin_lease_or_plain`] makes.
async fn plan_on(conn: &mut sqlx::PgConnection, with: bool) -> String {
    let mut tx = begin_lease_or_plain(conn, with).await;
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE lease(now())")
        .fetch_all(&mut *tx)
        .await
        .expect("explain");
    tx.rollback().await.expect("rollback");
    plan.join("\n")
}

/// The lease is prepared on each pooled connection, and PostgreSQL keeps a generic plan after
/// five runs. Made while the inbox was empty (an applier looks at least every 2 s),
/// that plan can find the leased facts again by scanning the whole inbox (once for each, when
/// the lease was a join back to it: in the bench, with a list of 170k messages and an inbox
/// never analyzed), and it is kept through a burst of facts. Here the inbox's statistics say
/// it is empty (a VACUUM while it was).
/// With the lease's settings no plan of it scans a table: the store's own lease finds the
/// leased facts by key, and the plan kept walks the pending facts in time order and reads
/// every other index at a key.
#[tokio::test]
async fn on_postgresql_a_lease_planned_while_the_inbox_was_empty_finds_its_facts_by_key() {
    use messaging::store::postgres::PgStore;
    use messaging::store::Store;
    use std::time::Duration;

    let pool = migrated_pool().await;
    for statement in [
        "ALTER TABLE webhook_inbox SET (autovacuum_enabled = false)",
        "VACUUM (ANALYZE) webhook_inbox",
    ] {
        sqlx::raw_sql(statement)
            .execute(&pool)
            .await
            .expect(statement);
    }
    let burst = || async {
        sqlx::query(
            "INSERT INTO webhook_inbox (provider, event_id, message_id, kind, occurred_at, payload) \
             SELECT 'sendgrid', 'e' || gen_random_uuid(), gen_random_uuid(), 'delivered', \
                    now() - i * interval '1 millisecond', jsonb_build_object('event', 'delivered') \
             FROM generate_series(1, 20000) AS i",
        )
        .execute(&pool)
        .await
        .expect("facts");
    };
    // Lookups of a fact by its key. A table's sequential scans cannot be counted instead:
    // the migrations' index builds scan it too, and a backend reports its counts late.
    let key_lookups = || async {
        let lookups: i64 = sqlx::query_scalar(
            "SELECT idx_tup_read FROM pg_stat_user_indexes \
             WHERE indexrelid = 'webhook_inbox_pkey'::regclass",
        )
        .fetch_one(&pool)
        .await
        .expect("statistics");
        lookups
    };

    // The store's lease, as an applier runs it: on the empty inbox, then after a burst. On
    // one connection, so that it is that connection's sixth run and more (a pool of several
    // hands them round, each run a first few, planned afresh).
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await
        .expect("a pool of one");
    let store = PgStore::new(one.clone());
    for _ in 0..8 {
        let leased = store
            .lease_webhook_facts(Utc::now() - chrono::Duration::hours(1))
            .await
            .expect("lease");
        assert!(leased.is_empty());
    }
    // PostgreSQL keeps the plan it made then.
    let kept: i64 = sqlx::query_scalar(
        "SELECT COALESCE(max(generic_plans), 0) FROM pg_prepared_statements \
         WHERE statement LIKE 'UPDATE webhook_inbox w SET locked_until%'",
    )
    .fetch_one(&one)
    .await
    .expect("prepared statements");
    assert!(kept > 0, "the lease's plan was not kept");
    burst().await;
    let before = key_lookups().await;
    let leased = store
        .lease_webhook_facts(Utc::now() - chrono::Duration::hours(1))
        .await
        .expect("lease");
    assert_eq!(leased.len(), 500);
    // A backend reports its scans at a transaction's end at most once a second (else within
    // 10 s, when idle): the lease's own connection is asked to report them now (PostgreSQL
    // 15 and later).
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&one)
        .await
        .expect("report the scans");
    // Each of the 500 found again by its key (the plan kept from the empty inbox, without the
    // lease's settings, scans the inbox for them).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while key_lookups().await - before < 500 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store's lease did not find the leased facts by key"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The plans themselves, on two connections that prepared the lease and ran it on the
    // empty inbox: with the settings and without them.
    for statement in ["TRUNCATE webhook_inbox", "VACUUM (ANALYZE) webhook_inbox"] {
        sqlx::raw_sql(statement)
            .execute(&pool)
            .await
            .expect(statement);
    }
    let mut with = pool.acquire().await.expect("a connection");
    let mut without = pool.acquire().await.expect("a connection");
    for (conn, settings) in [(&mut with, true), (&mut without, false)] {
        prepare_lease(conn).await;
        for _ in 0..8 {
            let mut tx = begin_lease_or_plain(conn, settings).await;
            sqlx::raw_sql("EXECUTE lease(now())")
                .execute(&mut *tx)
                .await
                .expect("an empty lease");
            tx.commit().await.expect("commit");
        }
    }
    burst().await;
    // Without the settings the kept plan scans the inbox for the leased facts: what this test
    // guards against.
    let plan = plan_on(&mut without, false).await;
    assert!(plan.contains("Seq Scan on webhook_inbox w"), "{plan}");
    // With them, no table is scanned: the pending facts are walked in time order, up to the
    // 500th, and every other index is read with a condition on its key.
    let plan = plan_on(&mut with, true).await;
    assert!(!plan.contains("Seq Scan"), "{plan}");
    let lines: Vec<&str> = plan.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if (line.contains("Index Scan") || line.contains("Index Only Scan"))
            && !line.contains("webhook_inbox_pending")
        {
            let next = lines.get(i + 1).copied().unwrap_or_default();
            assert!(next.contains("Index Cond"), "{line} reads no key:\n{plan}");
        }
    }
    assert!(
        plan.contains("Index Scan using webhook_inbox_pkey on webhook_inbox w"),
        "{plan}"
    );
    assert!(plan.contains("Index Cond: (id = ANY ("), "{plan}");
    assert!(
        plan.contains("Index Scan using webhook_inbox_pending on webhook_inbox i"),
        "{plan}"
    );
    assert!(!plan.contains("Sort"), "{plan}");
}

/// PostgreSQL's lease walks the pending facts in time order through their index and stops at
/// the round's 500: the ones it leases are the earliest that may be leased (not held by
/// another lease, not waiting), and once the service's upkeep has vacuumed and analyzed the
/// churned inbox, its plan as the store runs it (in the lease's transaction) has no sort (with
/// the index by message it replaced, every pending fact was read and sorted each round).
#[tokio::test]
async fn on_postgresql_the_webhook_lease_reads_the_oldest_pending_facts_through_their_index() {
    use messaging::store::postgres::maintenance::QueueUpkeep;
    use messaging::store::postgres::PgStore;
    use messaging::store::Store;
    use std::time::Duration;

    let pool = migrated_pool().await;
    // Where the server runs autovacuum, it must not analyze the table first.
    sqlx::query("ALTER TABLE webhook_inbox SET (autovacuum_enabled = false)")
        .execute(&pool)
        .await
        .expect("alter");
    // 20k pending facts in shuffled time order; a tenth held by another applier's lease and a
    // tenth waiting for a message nobody composed.
    sqlx::query(
        "INSERT INTO webhook_inbox (provider, event_id, message_id, kind, occurred_at, payload, \
                                    locked_until, waiting) \
         SELECT 'sendgrid', 'e' || i, gen_random_uuid(), 'delivered', \
                now() - ((i * 7919) % 20000) * interval '1 second', \
                jsonb_build_object('event', 'delivered', 'n', i), \
                CASE WHEN i % 10 = 3 THEN now() + interval '1 minute' END, i % 10 = 7 \
         FROM generate_series(1, 20000) AS i",
    )
    .execute(&pool)
    .await
    .expect("facts");
    let mut expected: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM webhook_inbox WHERE locked_until IS NULL AND NOT waiting \
         ORDER BY occurred_at, id LIMIT 500",
    )
    .fetch_all(&pool)
    .await
    .expect("expected");
    assert_eq!(expected.len(), 500);
    let store = PgStore::new(pool.clone());
    let mut leased: Vec<i64> = store
        .lease_webhook_facts(Utc::now() - chrono::Duration::hours(1))
        .await
        .expect("lease")
        .iter()
        .map(|f| f.id)
        .collect();
    leased.sort_unstable();
    expected.sort_unstable();
    assert_eq!(leased, expected);

    // Each fact leased and settled once: two dead row versions each.
    for _ in 0..2 {
        sqlx::query("UPDATE webhook_inbox SET locked_until = NULL")
            .execute(&pool)
            .await
            .expect("churn");
    }
    // The inbox's own upkeep loop, as the service runs it.
    let mut upkeep = QueueUpkeep::inbox();
    // The server's statistics arrive within a second or so of the commit.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let vacuumed = upkeep.round(&pool).await;
        if vacuumed.contains(&"webhook_inbox") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the inbox was not vacuumed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut conn = pool.acquire().await.expect("a connection");
    prepare_lease(&mut conn).await;
    // In the lease's transaction, as the store runs it.
    let plan = plan_on(&mut conn, true).await;
    assert!(
        plan.contains("Index Scan using webhook_inbox_pending on webhook_inbox i"),
        "{plan}"
    );
    assert!(!plan.contains("Sort"), "{plan}");
}
