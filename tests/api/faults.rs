//! Fault tests: the real binary killed with SIGKILL while composes, webhooks and provider calls
//! are in flight, then restarted; two instances on one database with one killed mid-load, and
//! with one stopped (SIGTERM) mid-load, which must cut nothing and send nothing twice.
//!
//! Clients and the provider behave as real ones do: a compose that got no answer is sent again
//! with its `Idempotency-Key`, a webhook delivery that got no 2xx is delivered again (one of
//! them is certainly cut mid-request: half its body sent when the kill comes; the others may
//! be cut anywhere, their recording included), and the provider answers slowly enough that
//! the kill cuts calls. Then: every compose made exactly
//! one message, every provider fact is recorded once, every message is sent once, and a second
//! provider call happens only for a call the kill cut, and the history says so.

use crate::helpers::*;
use futures::StreamExt;
use messaging::webhooks::verify::sendgrid_test_signature;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SCALAR: [u8; 32] = [5; 32];
/// How long the stand-in SendGrid takes to answer: calls are in flight when the kill comes.
const PROVIDER_DELAY: Duration = Duration::from_millis(400);
/// Composes sent at once by the test's clients.
const CLIENTS: usize = 8;

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
            // running (four waves of three provider timeouts, and 5 s): a short timeout keeps
            // that wait short.
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

    /// SIGTERM, as an orchestrator stops it: the instance drains and exits by itself; its exit
    /// status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
        // Its grace (25 s by default) bounds the drain; a hang is a failure, not a wait.
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the stopped instance did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// Composes message `key` (its `Idempotency-Key` and its body depend on it alone); the id when
/// the service answered 201, `None` when it gave no answer (the instance died).
async fn compose(
    client: &reqwest::Client,
    base: &str,
    service: &str,
    key: usize,
) -> Option<String> {
    let r = client
        .post(format!("{base}/v1/messages"))
        .bearer_auth(API_KEY)
        .header("Idempotency-Key", format!("fault-{key}"))
        .json(
            &json!({"service_id": service, "to": [{"username": format!("p{key}@example.com")}],
                      "subject": "Hi", "text": "Hello", "send": true}),
        )
        .send()
        .await
        .ok()?;
    // An answer is either success or a bug: only a missing answer may be retried.
    assert_eq!(r.status(), StatusCode::CREATED, "compose {key}");
    let body: Value = r.json().await.ok()?;
    Some(body["id"].as_str().expect("an id").to_string())
}

/// Composes keys 0, 1, 2, ... on the instances in turn, [`CLIENTS`] at a time, until `stop`
/// turns true (so composes are in flight whenever the test kills one); the answers by key.
/// `unanswered` counts those that got no answer, as they come.
async fn compose_until(
    client: reqwest::Client,
    service: String,
    bases: Vec<String>,
    stop: tokio::sync::watch::Receiver<bool>,
    unanswered: Arc<AtomicUsize>,
) -> BTreeMap<usize, Option<String>> {
    futures::stream::iter(0..)
        .take_while(move |_| std::future::ready(!*stop.borrow()))
        .map(|key| {
            let (client, service) = (client.clone(), service.clone());
            let base = bases[key % bases.len()].clone();
            let unanswered = unanswered.clone();
            async move {
                let answer = compose(&client, &base, &service, key).await;
                if answer.is_none() {
                    unanswered.fetch_add(1, Ordering::SeqCst);
                }
                (key, answer)
            }
        })
        .buffer_unordered(CLIENTS)
        .collect()
        .await
}

/// The database URL an instance connects with, its connections named `name` on PostgreSQL.
fn named(url: &str, name: &str) -> String {
    if url.starts_with("postgres") {
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}application_name={name}")
    } else {
        url.to_string()
    }
}

/// After a kill, until PostgreSQL has ended the dead instance's sessions: a COMMIT it had sent
/// still completes, and what the test reads before that would miss it.
async fn sessions_gone(pool: &sqlx::AnyPool, url: &str, name: &str) {
    if !url.starts_with("postgres") {
        return;
    }
    let p = pool;
    until("the killed instance's sessions ended", || async move {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
                .bind(name)
                .fetch_one(p)
                .await
                .unwrap();
        left == 0
    })
    .await;
}

/// Composes every key on its instance, [`CLIENTS`] at a time; the answers by key.
async fn compose_all(
    client: reqwest::Client,
    service: String,
    keys: Vec<(usize, String)>,
) -> BTreeMap<usize, Option<String>> {
    futures::stream::iter(keys)
        .map(|(key, base)| {
            let (client, service) = (client.clone(), service.clone());
            async move { (key, compose(&client, &base, &service, key).await) }
        })
        .buffer_unordered(CLIENTS)
        .collect()
        .await
}

/// Sends again, to `base`, every compose that got no answer; the id of every key.
async fn retry_unanswered(
    client: &reqwest::Client,
    base: &str,
    service: &str,
    answers: BTreeMap<usize, Option<String>>,
) -> BTreeMap<usize, String> {
    let mut ids = BTreeMap::new();
    for (key, answer) in answers {
        let id = match answer {
            Some(id) => id,
            None => compose(client, base, service, key)
                .await
                .expect("the surviving instance answers"),
        };
        ids.insert(key, id);
    }
    ids
}

/// A SendGrid Event Webhook delivery: open events for `ids`, each its own `sg_event_id`.
struct Delivery {
    body: Vec<u8>,
    opens: Vec<(String, String)>,
}

fn opens_delivery(ids: &[String], batch: usize) -> Delivery {
    let now = chrono::Utc::now().timestamp();
    let opens: Vec<(String, String)> = ids
        .iter()
        .map(|id| (format!("open-{batch}-{id}"), id.clone()))
        .collect();
    let events: Vec<Value> = opens
        .iter()
        .map(|(event_id, id)| json!({"event": "open", "sg_event_id": event_id, "timestamp": now, "message_id": id}))
        .collect();
    Delivery {
        body: serde_json::to_vec(&events).unwrap(),
        opens,
    }
}

/// Whether the instance acknowledged the delivery (2xx); any other answer is a bug.
async fn deliver(client: &reqwest::Client, base: &str, delivery: &Delivery) -> bool {
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let (_, signature) = sendgrid_test_signature(&SCALAR, &timestamp, &delivery.body).unwrap();
    let Ok(r) = client
        .post(format!("{base}/webhooks/sendgrid/events"))
        .header("X-Twilio-Email-Event-Webhook-Signature", signature)
        .header("X-Twilio-Email-Event-Webhook-Timestamp", timestamp)
        .body(delivery.body.clone())
        .send()
        .await
    else {
        return false;
    };
    assert!(r.status().is_success(), "webhook answered {}", r.status());
    true
}

/// Starts `delivery` over a socket of its own and stops halfway through its body: a webhook
/// certainly cut by the kill (before its handler runs: the handler takes whole bodies; the
/// deliveries posted during the load may be cut later, while they are recorded).
async fn half_delivered(base: &str, delivery: &Delivery) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let address = base.trim_start_matches("http://");
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let (_, signature) = sendgrid_test_signature(&SCALAR, &timestamp, &delivery.body).unwrap();
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /webhooks/sendgrid/events HTTP/1.1\r\nHost: {address}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\
         X-Twilio-Email-Event-Webhook-Signature: {signature}\r\n\
         X-Twilio-Email-Event-Webhook-Timestamp: {timestamp}\r\n\r\n",
        delivery.body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket
        .write_all(&delivery.body[..delivery.body.len() / 2])
        .await
        .unwrap();
    socket.flush().await.unwrap();
    socket
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

/// SendGrid's mail send, answering after [`PROVIDER_DELAY`]; only with the service's key.
async fn sendgrid() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v3/mail/send"))
        .and(header("authorization", "Bearer SG.k"))
        .respond_with(ResponseTemplate::new(202).set_delay(PROVIDER_DELAY))
        .mount(&server)
        .await;
    server
}

/// The calls the stand-in received (answered or not yet), by message id.
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

async fn ids_with(pool: &sqlx::AnyPool, event_type: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT aggregate_id FROM events WHERE event_type = $1")
        .bind(event_type)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Messages whose provider call was received but whose outcome is not recorded: after a
/// kill, the calls it cut.
async fn unanswered_calls(pool: &sqlx::AnyPool, server: &MockServer) -> BTreeSet<String> {
    let sent: BTreeSet<String> = ids_with(pool, "MessageSent").await.into_iter().collect();
    calls_per_message(server)
        .await
        .into_keys()
        .filter(|id| !sent.contains(id))
        .collect()
}

async fn count_of(pool: &sqlx::AnyPool, id: &str, event_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = $2")
        .bind(id)
        .bind(event_type)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Attempts recovered after their instance died, for `id`.
async fn recovered(pool: &sqlx::AnyPool, id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'SendAttemptFailed' \
         AND CAST(payload AS TEXT) LIKE '%sender stopped%'",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until every message is sent and every fact applied, then checks that each compose
/// made one message, each is sent once, each acknowledged open is recorded once, and a second
/// provider call went only to a message whose first call a kill cut (its history says so).
async fn check(
    pool: &sqlx::AnyPool,
    servers: &[&MockServer],
    ids: &BTreeMap<usize, String>,
    opens: &BTreeMap<String, String>,
) {
    // Facts the killed instance had leased wait for their lease (60 s) to run out before
    // another instance applies them (a run then takes about 62 s here).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let sent = ids_with(pool, "MessageSent").await.len();
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM webhook_inbox WHERE status = 'pending'")
                .fetch_one(pool)
                .await
                .unwrap();
        if sent >= ids.len() && pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sent} of {} sent, {pending} facts pending",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // One message per compose, retries included, and no other.
    let messages: BTreeSet<&String> = ids.values().collect();
    assert_eq!(messages.len(), ids.len(), "two composes made one message");
    let mut composed = ids_with(pool, "MessageComposed").await;
    composed.sort();
    let mut expected: Vec<String> = messages.iter().map(|id| id.to_string()).collect();
    expected.sort();
    assert_eq!(composed, expected, "the log's messages are the composes'");

    let mut calls: HashMap<String, usize> = HashMap::new();
    for server in servers {
        for (id, n) in calls_per_message(server).await {
            *calls.entry(id).or_default() += n;
        }
    }
    for id in &expected {
        assert_eq!(count_of(pool, id, "MessageSent").await, 1, "{id} sent once");
        let n = calls.get(id).copied().unwrap_or(0);
        assert!(n >= 1, "{id} never reached the provider");
        let recovered = recovered(pool, id).await;
        assert!(
            n as i64 <= 1 + recovered,
            "{id}: {n} provider calls, {recovered} cut by a kill"
        );
    }
    // Each acknowledged open once: re-deliveries and the kill changed nothing.
    let mut want: HashMap<&str, i64> = HashMap::new();
    for id in opens.values() {
        *want.entry(id.as_str()).or_default() += 1;
    }
    for (id, n) in want {
        assert_eq!(
            count_of(pool, id, "OpenRecorded").await,
            n,
            "opens recorded for {id}"
        );
    }
}

/// Waits (at most 20 s) until `ready` says the load is where the kill should cut it.
async fn until<F, Fut>(what: &str, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !ready().await {
        assert!(tokio::time::Instant::now() < deadline, "never {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_load_and_restarted_loses_nothing_and_doubles_only_cut_calls() {
    let server = std::sync::Arc::new(sendgrid().await);
    let url = fresh_database().await;
    let client = reqwest::Client::new();
    let first = Instance::start(&named(&url, "fault-first"), &server.uri()).await;
    // After the start: on SQLite the service creates the file.
    let pool = any_pool(&url).await;
    let service = sendgrid_service(&client, &first.base).await;

    // Composes, 8 at a time, while webhook deliveries report opens of what SendGrid has.
    let (stop_load, mut stopped) = tokio::sync::watch::channel(false);
    let unanswered_composes: Arc<AtomicUsize> = Arc::default();
    let composing = tokio::spawn(compose_until(
        client.clone(),
        service.clone(),
        vec![first.base.clone()],
        stop_load.subscribe(),
        unanswered_composes.clone(),
    ));
    let acknowledged_deliveries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let posting = {
        let (client, base, server) = (client.clone(), first.base.clone(), server.clone());
        let counted = acknowledged_deliveries.clone();
        tokio::spawn(async move {
            let mut deliveries = Vec::new();
            let mut batch = 0;
            while !*stopped.borrow_and_update() {
                let received = calls_per_message(&server).await;
                let ids: Vec<String> = received.into_keys().take(10).collect();
                if !ids.is_empty() {
                    let delivery = opens_delivery(&ids, batch);
                    let acknowledged = deliver(&client, &base, &delivery).await;
                    if acknowledged {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    deliveries.push((delivery, acknowledged));
                    batch += 1;
                }
                let _ = tokio::time::timeout(Duration::from_millis(50), stopped.changed()).await;
            }
            deliveries
        })
    };
    // Cut mid-load: composes answered and still coming, provider calls open.
    let d = &acknowledged_deliveries;
    until("webhook deliveries acknowledged", || async move {
        d.load(std::sync::atomic::Ordering::SeqCst) >= 3
    })
    .await;
    let reported: Vec<String> = calls_per_message(&server).await.into_keys().collect();
    let cut_delivery = opens_delivery(&reported, usize::MAX);
    let mut cut_socket = half_delivered(&first.base, &cut_delivery).await;
    // The kill comes as soon as a provider call has just started (one that was not there at
    // the previous look, 10 ms before): it has most of PROVIDER_DELAY to run, so the kill
    // certainly cuts it. (A fixed pause after seeing calls open let a busy machine's calls
    // all finish and be recorded first, between two of the sender's rounds.) The load runs on
    // meanwhile (the clients on their own threads), and after the kill until a compose got no
    // answer: one the kill cut, or one the dead instance refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut open_before = unanswered_calls(&pool, &server).await;
    loop {
        let open = unanswered_calls(&pool, &server).await;
        if open.difference(&open_before).next().is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no provider call started"
        );
        open_before = open;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill();
    let unanswered_so_far = unanswered_composes.as_ref();
    until("a compose without an answer", || async move {
        unanswered_so_far.load(Ordering::SeqCst) > 0
    })
    .await;
    stop_load.send(true).unwrap();
    sessions_gone(&pool, &url, "fault-first").await;
    let cut = unanswered_calls(&pool, &server).await;
    assert!(!cut.is_empty(), "the kill cut no provider call");
    let answers = composing.await.unwrap();
    let mut deliveries = posting.await.unwrap();
    // The half-sent delivery got no answer: SendGrid delivers it again, like any other.
    let mut answer = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut cut_socket, &mut answer).await;
    assert!(
        answer.is_empty(),
        "a half-sent delivery was answered: {}",
        String::from_utf8_lossy(&answer)
    );
    deliveries.push((cut_delivery, false));
    let unanswered = answers.values().filter(|a| a.is_none()).count();
    assert!(
        unanswered > 0 && unanswered < answers.len(),
        "the kill came mid-load: {unanswered} of {} composes unanswered (cut or refused)",
        answers.len()
    );

    // Of the composes that got no answer, those the dead instance had committed (the retry
    // must find their message, not make another: `check` says so). Said, not asserted: the
    // kill lands where it lands.
    let mut committed_unanswered = 0;
    for key in answers.iter().filter(|(_, a)| a.is_none()).map(|(k, _)| k) {
        let composed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE event_type = 'MessageComposed' \
             AND CAST(payload AS TEXT) LIKE $1",
        )
        .bind(format!("%\"p{key}@example.com\"%"))
        .fetch_one(&pool)
        .await
        .unwrap();
        committed_unanswered += composed;
    }

    // The restarted service takes the clients' and the provider's retries, and more load.
    let second = Instance::start(&url, &server.uri()).await;
    let mut ids = retry_unanswered(&client, &second.base, &service, answers).await;
    let mut opens = BTreeMap::new();
    for (delivery, acknowledged) in &deliveries {
        if !acknowledged {
            assert!(deliver(&client, &second.base, delivery).await);
        }
        opens.extend(delivery.opens.iter().cloned());
    }
    // SendGrid may also send an acknowledged delivery again (its acknowledgement lost): the
    // first one, to the restarted instance, records nothing more (`check` counts each open).
    let (acknowledged, _) = deliveries
        .iter()
        .find(|(_, acknowledged)| *acknowledged)
        .expect("deliveries were acknowledged before the kill");
    assert!(deliver(&client, &second.base, acknowledged).await);
    assert!(!opens.is_empty(), "no webhook delivery was made");
    let redelivered = deliveries.iter().filter(|(_, ack)| !ack).count();
    eprintln!(
        "at the kill: {} calls cut, {unanswered} of {} composes unanswered \
         ({committed_unanswered} of them committed); {} webhook deliveries, \
         {redelivered} delivered again",
        cut.len(),
        ids.len(),
        deliveries.len()
    );
    let first_new = ids.keys().max().map_or(0, |k| k + 1);
    let more = (first_new..first_new + 40)
        .map(|k| (k, second.base.clone()))
        .collect();
    for (key, id) in compose_all(client.clone(), service.clone(), more).await {
        ids.insert(key, id.expect("the restarted instance answers"));
    }
    check(&pool, &[&server], &ids, &opens).await;
    // Each cut call's message was sent once all the same: called again after its recovery,
    // or recorded as sent without a second call because SendGrid had reported on it.
    let reported: BTreeSet<&String> = opens.values().collect();
    for id in &cut {
        match calls_per_message(&server).await.get(id).copied() {
            Some(2) => assert_eq!(recovered(&pool, id).await, 1, "{id} recovered once"),
            Some(1) => assert!(reported.contains(id), "{id}: one call, yet sent"),
            calls => panic!("{id}: {calls:?} calls"),
        }
    }
    drop(second);
}

/// Two instances on one fresh PostgreSQL database, each with a stand-in SendGrid of its own
/// (what one sent of the other's work shows), their connections named `{name}-a` and
/// `{name}-b`, and composes alternating between them (both take commands and both send) until
/// `stop_load` says stop; `composing` gives their answers.
struct TwoUnderLoad {
    server_a: MockServer,
    server_b: MockServer,
    url: String,
    pool: sqlx::AnyPool,
    client: reqwest::Client,
    a: Instance,
    b: Instance,
    service: String,
    stop_load: tokio::sync::watch::Sender<bool>,
    composing: tokio::task::JoinHandle<BTreeMap<usize, Option<String>>>,
}

impl TwoUnderLoad {
    async fn start(name: &str) -> Self {
        let (server_a, server_b) = (sendgrid().await, sendgrid().await);
        let url = fresh_postgres_database().await;
        let pool = any_pool(&url).await;
        let client = reqwest::Client::new();
        let a = Instance::start(&named(&url, &format!("{name}-a")), &server_a.uri()).await;
        let b = Instance::start(&named(&url, &format!("{name}-b")), &server_b.uri()).await;
        let service = sendgrid_service(&client, &a.base).await;
        let (stop_load, _) = tokio::sync::watch::channel(false);
        let composing = tokio::spawn(compose_until(
            client.clone(),
            service.clone(),
            vec![a.base.clone(), b.base.clone()],
            stop_load.subscribe(),
            Arc::default(),
        ));
        Self {
            server_a,
            server_b,
            url,
            pool,
            client,
            a,
            b,
            service,
            stop_load,
            composing,
        }
    }
}

#[tokio::test]
async fn two_instances_on_one_postgres_with_one_killed_mid_load_send_everything() {
    // Each instance its own stand-in: what the survivor sent of the killed one's work shows.
    let TwoUnderLoad {
        server_a,
        server_b,
        url,
        pool,
        client,
        a,
        b,
        service,
        stop_load,
        composing,
    } = TwoUnderLoad::start("fault").await;
    let (p, s) = (&pool, &server_a);
    until("calls in flight on the instance to kill", || async move {
        unanswered_calls(p, s).await.len() >= 3
    })
    .await;
    a.kill();
    // A little more load on the survivor, then the load stops.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_load.send(true).unwrap();
    sessions_gone(&pool, &url, "fault-a").await;
    let cut = unanswered_calls(&pool, &server_a).await;
    assert!(!cut.is_empty(), "the kill cut no provider call");
    let answers = composing.await.unwrap();
    assert!(
        answers.values().any(Option::is_none),
        "the kill came mid-load"
    );
    let unanswered = answers.values().filter(|a| a.is_none()).count();
    eprintln!(
        "at the kill: {} calls cut on A, {unanswered} of {} composes unanswered",
        cut.len(),
        answers.len()
    );
    let ids = retry_unanswered(&client, &b.base, &service, answers).await;
    check(&pool, &[&server_a, &server_b], &ids, &BTreeMap::new()).await;
    // The survivor finished the killed instance's cut calls (no fact said SendGrid had them).
    let by_b = calls_per_message(&server_b).await;
    for id in &cut {
        assert!(by_b.contains_key(id), "{id}, cut on A, never sent by B");
        assert_eq!(recovered(&pool, id).await, 1, "{id} recovered once");
    }
    drop(b);
}

/// The same load with one instance stopped as an orchestrator stops it (SIGTERM): it answers
/// the requests it had, finishes its provider calls in flight and records their outcomes
/// before it exits; the survivor takes the rest. Nothing is lost, and nothing is sent twice:
/// no call is cut, so none is made again.
#[tokio::test]
async fn two_instances_on_one_postgres_with_one_stopped_mid_load_send_everything_once() {
    let TwoUnderLoad {
        server_a,
        server_b,
        url: _,
        pool,
        client,
        a,
        b,
        service,
        stop_load,
        composing,
    } = TwoUnderLoad::start("stop").await;
    let (p, s) = (&pool, &server_a);
    until("calls in flight on the instance to stop", || async move {
        unanswered_calls(p, s).await.len() >= 3
    })
    .await;
    let in_flight = unanswered_calls(&pool, &server_a).await;
    let status = a.terminate();
    assert!(status.success(), "a stopped instance exits 0, not {status}");
    // The calls it had in flight were answered and recorded before it exited.
    for id in &in_flight {
        assert_eq!(
            count_of(&pool, id, "MessageSent").await,
            1,
            "{id}: in flight at the stop, not recorded by the stopping instance"
        );
    }
    // A little more load on the survivor (composes sent to the stopped one now get no
    // answer, and are sent again to the survivor), then the load stops.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_load.send(true).unwrap();
    let answers = composing.await.unwrap();
    let unanswered = answers.values().filter(|a| a.is_none()).count();
    eprintln!(
        "at the stop: {} calls in flight on A, {unanswered} of {} composes unanswered",
        in_flight.len(),
        answers.len()
    );
    let ids = retry_unanswered(&client, &b.base, &service, answers).await;
    check(&pool, &[&server_a, &server_b], &ids, &BTreeMap::new()).await;
    let (by_a, by_b) = (
        calls_per_message(&server_a).await,
        calls_per_message(&server_b).await,
    );
    for id in ids.values() {
        let calls = by_a.get(id).unwrap_or(&0) + by_b.get(id).unwrap_or(&0);
        assert_eq!(calls, 1, "{id}: {calls} provider calls");
        assert_eq!(recovered(&pool, id).await, 0, "{id}: a call was cut");
    }
    assert!(!by_b.is_empty() && !by_a.is_empty(), "both instances sent");
    drop(b);
}
