//! Fault tests: the real binary killed with SIGKILL while it sends and ingests, then restarted;
//! two instances on one database with one killed mid-load. Nothing accepted is lost; a send is
//! doubled only where the crash cut a provider call short, and then it shows in the history.

use crate::helpers::*;
use messaging::webhooks::verify::sendgrid_test_signature;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SCALAR: [u8; 32] = [5; 32];

struct Instance {
    child: Child,
    base: String,
}

impl Instance {
    async fn start(database_url: &str, sendgrid: &str) -> Instance {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (public_key, _) = sendgrid_test_signature(&SCALAR, "0", b"").unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_messaging"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", database_url)
            .env("MESSAGING_API_KEYS", API_KEY)
            .env("MESSAGING_LISTEN", format!("127.0.0.1:{port}"))
            .env("MESSAGING_SENDGRID_BASE_URL", sendgrid)
            .env("MESSAGING_SENDGRID_WEBHOOK_PUBLIC_KEY", public_key)
            .env("MESSAGING_SEND_LEASE_MS", "2000")
            // A killed instance's open attempts are recovered once no call can still be
            // running (four waves of three provider timeouts, and 5 s): the stand-in answers
            // at once, so a short timeout keeps that wait short.
            .env("MESSAGING_PROVIDER_TIMEOUT_MS", "1000")
            .env("MESSAGING_DATABASE_MAX_CONNECTIONS", "8")
            .env("MESSAGING_SEND_BACKOFF_MS", "200")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Owned by the guard from here: killed and reaped however the test ends.
        let instance = Instance {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if client
                .get(format!("{}/healthz", instance.base))
                .send()
                .await
                .is_ok()
            {
                return instance;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the service did not start");
    }

    fn kill(mut self) {
        // SIGKILL: no shutdown, no flush, whatever was in flight is cut.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn compose(client: &reqwest::Client, base: &str, service: &str, i: usize) -> Option<String> {
    let r = client
        .post(format!("{base}/v1/messages"))
        .bearer_auth(API_KEY)
        .json(
            &json!({"service_id": service, "to": [{"username": format!("p{i}@example.com")}],
                      "subject": "Hi", "text": "Hello", "send": true}),
        )
        .send()
        .await
        .ok()?;
    (r.status() == StatusCode::CREATED).then_some(())?;
    let body: Value = r.json().await.ok()?;
    body["id"].as_str().map(str::to_string)
}

async fn post_opens(client: &reqwest::Client, base: &str, ids: &[String], batch: usize) -> bool {
    let now = chrono::Utc::now().timestamp();
    let events: Vec<Value> = ids
        .iter()
        .map(|id| json!({"event": "open", "sg_event_id": format!("open-{batch}-{id}"), "timestamp": now, "message_id": id}))
        .collect();
    let body = serde_json::to_vec(&events).unwrap();
    let timestamp = now.to_string();
    let (_, signature) = sendgrid_test_signature(&SCALAR, &timestamp, &body).unwrap();
    client
        .post(format!("{base}/webhooks/sendgrid/events"))
        .header("X-Twilio-Email-Event-Webhook-Signature", signature)
        .header("X-Twilio-Email-Event-Webhook-Timestamp", timestamp)
        .body(body)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

async fn sendgrid_service(client: &reqwest::Client, base: &str) -> String {
    let r = client
        .post(format!("{base}/v1/services"))
        .bearer_auth(API_KEY)
        .json(
            &json!({"channel": "email", "provider": "sendgrid", "name": "News",
                      "username": "news@example.com", "credentials": {"api_key": "SG.k"}}),
        )
        .send()
        .await
        .unwrap();
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn sendgrid() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v3/mail/send"))
        .respond_with(ResponseTemplate::new(202).set_delay(Duration::from_millis(30)))
        .mount(&server)
        .await;
    server
}

async fn calls_per_message(server: &MockServer) -> HashMap<String, usize> {
    let mut calls = HashMap::new();
    for r in server.received_requests().await.unwrap() {
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        *calls
            .entry(
                body["custom_args"]["message_id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
            .or_insert(0) += 1;
    }
    calls
}

/// Waits until every accepted message is sent and every acknowledged open applied, then
/// checks that nothing was lost or doubled beyond what a cut provider call explains.
async fn check(pool: &sqlx::AnyPool, server: &MockServer, accepted: &[String], opens: &[String]) {
    // Facts the killed instance had leased wait for their lease (60 s) to run out before
    // another instance applies them: seen once in a full run, the check gave up at 60 s with
    // ten facts pending that were applied a moment later.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let sent: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT aggregate_id) FROM events WHERE event_type = 'MessageSent'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM webhook_inbox WHERE status = 'pending'")
                .fetch_one(pool)
                .await
                .unwrap();
        if sent as usize >= accepted.len() && pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sent} of {} sent, {pending} facts pending",
            accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every accepted compose is in the log exactly once.
    let composed: Vec<String> =
        sqlx::query_scalar("SELECT aggregate_id FROM events WHERE event_type = 'MessageComposed'")
            .fetch_all(pool)
            .await
            .unwrap();
    for id in accepted {
        assert_eq!(
            composed.iter().filter(|c| *c == id).count(),
            1,
            "{id} composed once"
        );
    }
    // Every send reached the provider; a second call only where a crash cut the first short,
    // and the history says so.
    let calls = calls_per_message(server).await;
    for id in accepted {
        let n = calls.get(id).copied().unwrap_or(0);
        assert!(n >= 1, "{id} never reached the provider");
        if n > 1 {
            let recovered: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'SendAttemptFailed' \
                 AND CAST(payload AS TEXT) LIKE '%sender stopped%'",
            )
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
            assert!(
                recovered >= 1,
                "{id} sent {n} times without a recorded crash"
            );
        }
    }
    let doubled = calls.values().filter(|n| **n > 1).count();
    assert!(
        doubled <= 32,
        "{doubled} doubled: more than the calls in flight at a kill"
    );
    // Every acknowledged webhook fact was recorded and applied.
    for id in opens {
        let opened: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'OpenRecorded'",
        )
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
        assert!(opened >= 1, "the acknowledged open for {id} was lost");
    }
}

#[tokio::test]
async fn killed_mid_load_and_restarted_loses_nothing_and_doubles_only_cut_calls() {
    let server = sendgrid().await;
    let url = fresh_database().await;
    let client = reqwest::Client::new();
    let first = Instance::start(&url, &server.uri()).await;
    let service = sendgrid_service(&client, &first.base).await;

    let mut accepted = Vec::new();
    let mut acknowledged_opens = Vec::new();
    for i in 0..120 {
        if let Some(id) = compose(&client, &first.base, &service, i).await {
            accepted.push(id);
        }
        if i % 20 == 19 {
            // Providers report on what they received: opens for messages SendGrid has.
            let received = calls_per_message(&server).await;
            let batch: Vec<String> = accepted
                .iter()
                .filter(|id| received.contains_key(*id))
                .rev()
                .take(10)
                .cloned()
                .collect();
            if post_opens(&client, &first.base, &batch, i).await {
                acknowledged_opens.extend(batch);
            }
        }
    }
    first.kill();

    let second = Instance::start(&url, &server.uri()).await;
    for i in 120..160 {
        if let Some(id) = compose(&client, &second.base, &service, i).await {
            accepted.push(id);
        }
    }
    let pool = any_pool(&url).await;
    check(&pool, &server, &accepted, &acknowledged_opens).await;
    drop(second);
}

#[tokio::test]
async fn two_instances_on_one_postgres_with_one_killed_mid_load_send_everything() {
    let server = sendgrid().await;
    let url = fresh_postgres_database().await;
    let client = reqwest::Client::new();
    let a = Instance::start(&url, &server.uri()).await;
    let b = Instance::start(&url, &server.uri()).await;
    let service = sendgrid_service(&client, &a.base).await;
    let mut accepted = Vec::new();
    for i in 0..200 {
        // Alternate: both instances take commands and both send.
        let base = if i % 2 == 0 { &a.base } else { &b.base };
        if let Some(id) = compose(&client, base, &service, i).await {
            accepted.push(id);
        }
    }
    a.kill();
    let pool = any_pool(&url).await;
    check(&pool, &server, &accepted, &[]).await;
    drop(b);
}
