//! Automation: the state-change stream (SSE) and push subscriptions.

use crate::helpers::*;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use messaging::webhooks::verify::verify_push;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

const SECRET: &str = "subscriber-secret-0123456789";

/// Five drafts, each then cancelled: ten state changes.
async fn ten_changes(app: &TestApp) -> Vec<String> {
    let service = app.email_service().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = app
            .compose_email(&service, &format!("p{i}@example.com"), json!({}))
            .await["id"]
            .as_str()
            .unwrap()
            .to_string();
        app.post(&format!("/v1/messages/{id}/cancel"), json!({}))
            .await;
        ids.push(id);
    }
    ids
}

/// Reads server-sent events until `n` have arrived; returns (id, data) pairs.
async fn read_events(mut response: reqwest::Response, n: usize) -> Vec<(i64, Value)> {
    let mut buffer = String::new();
    let mut events = Vec::new();
    while events.len() < n {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), response.chunk())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the stream stays open");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            };
            if let (Some(id), Some(data)) = (field("id:"), field("data:")) {
                events.push((id.parse().unwrap(), serde_json::from_str(&data).unwrap()));
            }
        }
    }
    events
}

#[tokio::test]
async fn the_stream_sends_each_change_and_resumes_from_last_event_id() {
    let app = TestApp::spawn().await;
    let open = |last: Option<i64>| {
        let mut r = app
            .client
            .get(app.url("/v1/state-changes/stream"))
            .bearer_auth(API_KEY);
        if let Some(last) = last {
            r = r.header("Last-Event-ID", last.to_string());
        }
        r.send()
    };
    let first = open(None).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert!(first.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    ten_changes(&app).await;
    let seen = read_events(first, 4).await;
    assert_eq!(seen.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(seen[0].1["state"], "draft");
    assert_eq!(seen[0].1["position"], 1);

    // Reconnect after the fourth: the rest, nothing again.
    let rest = read_events(open(Some(4)).await.unwrap(), 6).await;
    assert_eq!(
        rest.iter().map(|e| e.0).collect::<Vec<_>>(),
        [5, 6, 7, 8, 9, 10]
    );
    // An empty Last-Event-ID is no id: `after` holds.
    let r = app
        .client
        .get(app.url("/v1/state-changes/stream?after=8"))
        .bearer_auth(API_KEY)
        .header("Last-Event-ID", "")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let tail = read_events(r, 2).await;
    assert_eq!(tail.iter().map(|e| e.0).collect::<Vec<_>>(), [9, 10]);
    // A polyfill's `lastEventId` parameter resumes as the header does (and wins over `after`).
    let r = app
        .client
        .get(app.url("/v1/state-changes/stream?after=2&lastEventId=8"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let tail = read_events(r, 2).await;
    assert_eq!(tail.iter().map(|e| e.0).collect::<Vec<_>>(), [9, 10]);
    // One past the feed's end is refused (resuming there would skip every item up to it).
    let r = app
        .client
        .get(app.url("/v1/state-changes/stream"))
        .bearer_auth(API_KEY)
        .header("Last-Event-ID", "11")
        .send()
        .await
        .unwrap();
    let (status, error) = read(r).await;
    assert_error(
        status,
        &error,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Last-Event-ID: is past the end"),
        "{error}"
    );
    // One that is not text is refused, not read as "from the start".
    let r = app
        .client
        .get(app.url("/v1/state-changes/stream?after=8"))
        .bearer_auth(API_KEY)
        .header(
            "Last-Event-ID",
            reqwest::header::HeaderValue::from_bytes(b"\xff4").unwrap(),
        )
        .send()
        .await
        .unwrap();
    let (status, error) = read(r).await;
    assert_error(
        status,
        &error,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Last-Event-ID"),
        "{error}"
    );
    let r = app
        .client
        .get(app.url("/v1/state-changes/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

/// A subscriber that fails its first `failures` deliveries, then accepts; it checks every
/// signature and records what it accepted.
async fn subscriber(failures: usize) -> (String, Arc<Mutex<(usize, Vec<Value>)>>) {
    let seen: Arc<Mutex<(usize, Vec<Value>)>> = Arc::default();
    let state = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let state = state.clone();
            async move {
                let signature = headers["x-messaging-signature"]
                    .to_str()
                    .unwrap()
                    .to_string();
                let now = chrono::Utc::now().timestamp();
                verify_push(SECRET, &signature, &body, now, 300).expect("a valid signature");
                let mut s = state.lock().unwrap();
                s.0 += 1;
                if s.0 <= failures {
                    return AxumStatus::INTERNAL_SERVER_ERROR;
                }
                s.1.push(serde_json::from_slice(&body).unwrap());
                AxumStatus::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

fn accepted_items(seen: &Arc<Mutex<(usize, Vec<Value>)>>) -> Vec<Value> {
    seen.lock()
        .unwrap()
        .1
        .iter()
        .flat_map(|batch| batch["items"].as_array().unwrap().clone())
        .collect()
}

#[tokio::test]
async fn a_subscriber_that_fails_for_a_while_then_recovers_receives_everything_in_order() {
    let app = TestApp::spawn_with(&[("MESSAGING_PUSH_BACKOFF_MS", "100".into())]).await;
    let (url, seen) = subscriber(3).await;
    let (status, sub) = app
        .post(
            "/v1/subscriptions",
            json!({"url": url, "secret": SECRET, "after": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sub}");
    assert!(
        !sub.to_string().contains(SECRET),
        "the secret is write-only"
    );
    let id = sub["id"].as_str().unwrap().to_string();
    ten_changes(&app).await;

    eventually(|| async {
        let (_, s) = app.get(&format!("/v1/subscriptions/{id}")).await;
        s["failures"].as_i64().unwrap_or(0) > 0 && s["last_error"].is_string()
    })
    .await;
    eventually(|| async { accepted_items(&seen).len() >= 10 }).await;
    let positions: Vec<i64> = accepted_items(&seen)
        .iter()
        .map(|i| i["position"].as_i64().unwrap())
        .collect();
    assert_eq!(
        positions,
        (1..=10).collect::<Vec<_>>(),
        "every item, in order, once"
    );
    eventually(|| async {
        let (_, s) = app.get(&format!("/v1/subscriptions/{id}")).await;
        s["cursor"] == 10 && s["lag"] == 0 && s["last_error"].is_null() && s["failures"] == 0
    })
    .await;
    let (_, s) = app.get(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(s["delivered"], 10);

    // Another may start at the feed's end (10), not past it.
    let (status, at_end) = app
        .post(
            "/v1/subscriptions",
            json!({"url": url, "secret": SECRET, "after": 10}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{at_end}");
    assert_eq!(at_end["cursor"], 10);
    let (status, error) = app
        .post(
            "/v1/subscriptions",
            json!({"url": url, "secret": SECRET, "after": 11}),
        )
        .await;
    assert_error(
        status,
        &error,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
}

#[tokio::test]
async fn subscriptions_filter_by_state_and_channel() {
    let app = TestApp::spawn().await;
    let (url, seen) = subscriber(0).await;
    let (status, _) = app
        .post(
            "/v1/subscriptions",
            json!({"url": url, "secret": SECRET, "after": 0, "states": ["cancelled"], "channels": ["email"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // A cancelled X post, before the emails: items go out in feed order, so had the channel
    // filter let it through, it would be among those delivered by the time the emails are.
    let x = app.create_service("twitter", "x", "ourbrand").await;
    let (_, post) = app
        .post("/v1/messages", json!({"service_id": x, "text": "soon"}))
        .await;
    let post = post["id"].as_str().unwrap().to_string();
    let (status, _) = app
        .post(&format!("/v1/messages/{post}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let ids = ten_changes(&app).await;
    eventually(|| async { accepted_items(&seen).len() >= 5 }).await;
    let items = accepted_items(&seen);
    assert!(items.iter().all(|i| i["state"] == "cancelled"));
    let mut got: Vec<String> = items
        .iter()
        .map(|i| i["message_id"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn invalid_subscriptions_are_422_and_unknown_ones_404() {
    let app = TestApp::spawn().await;
    for (body, field) in [
        (json!({"url": "ftp://x", "secret": SECRET}), "url"),
        // URLs no delivery could call.
        (
            json!({"url": "http://example.com:99999/h", "secret": SECRET}),
            "url",
        ),
        (json!({"url": "http://[::1/h", "secret": SECRET}), "url"),
        (json!({"url": "http://:80/h", "secret": SECRET}), "url"),
        (
            json!({"url": "https://example.com/h", "secret": "short"}),
            "secret",
        ),
        // PostgreSQL's text cannot hold a NUL: refused here, not a 500 there.
        (
            json!({"url": "https://example.com/h\u{0}", "secret": SECRET}),
            "url",
        ),
        (
            json!({"url": "https://example.com/h", "secret": format!("{SECRET}\u{0}")}),
            "secret",
        ),
        (
            json!({"url": "https://example.com/h", "secret": SECRET, "states": ["shipped"]}),
            "states",
        ),
        (
            json!({"url": "https://example.com/h", "secret": SECRET, "channels": ["fax"]}),
            "channels",
        ),
        (
            json!({"url": "https://example.com/h", "secret": SECRET, "after": -1}),
            "after",
        ),
        // The feed is empty: nothing is at position 1 yet.
        (
            json!({"url": "https://example.com/h", "secret": SECRET, "after": 1}),
            "after",
        ),
    ] {
        let (status, error) = app.post("/v1/subscriptions", body).await;
        assert_error(
            status,
            &error,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        );
        assert!(
            error["error"]["message"].as_str().unwrap().contains(field),
            "{error}"
        );
    }
    let (status, error) = app
        .get("/v1/subscriptions/01939c3a-0000-7000-8000-000000000000")
        .await;
    assert_error(status, &error, StatusCode::NOT_FOUND, "not_found");
    let (_, list) = app.get("/v1/subscriptions").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn a_slow_subscriber_holds_back_only_itself() {
    let app = TestApp::spawn().await;
    // Answers each delivery after 5 s: (calls, answered).
    let slow_calls = Arc::new(Mutex::new((0usize, 0usize)));
    let calls = slow_calls.clone();
    let slow = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let calls = calls.clone();
            async move {
                calls.lock().unwrap().0 += 1;
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                calls.lock().unwrap().1 += 1;
                AxumStatus::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, slow).await.unwrap() });
    let (fast_url, fast) = subscriber(0).await;
    for url in [&slow_url, &fast_url] {
        let (status, sub) = app
            .post("/v1/subscriptions", json!({"url": url, "secret": SECRET}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{sub}");
    }
    let service = app.email_service().await;
    app.compose_email(&service, "a@example.com", json!({}))
        .await;
    eventually(|| async { slow_calls.lock().unwrap().0 == 1 && accepted_items(&fast).len() == 1 })
        .await;
    // While the slow one still holds its first batch, the fast one gets the next change.
    app.compose_email(&service, "b@example.com", json!({}))
        .await;
    eventually(|| async { accepted_items(&fast).len() == 2 }).await;
    assert_eq!(
        slow_calls.lock().unwrap().1,
        0,
        "the fast subscriber waited for the slow one to answer"
    );
}

/// A subscriber that answers 503 (or 429) with `Retry-After` is given that long before the
/// batch comes again, not the configured backoff's few milliseconds.
#[tokio::test]
async fn a_subscribers_retry_after_is_waited_out() {
    let app = TestApp::spawn_with(&[("MESSAGING_PUSH_BACKOFF_MS", "10".into())]).await;
    let calls: Arc<Mutex<Vec<std::time::Instant>>> = Arc::default();
    let seen = calls.clone();
    let busy = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let seen = seen.clone();
            async move {
                let mut calls = seen.lock().unwrap();
                calls.push(std::time::Instant::now());
                if calls.len() == 1 {
                    (AxumStatus::SERVICE_UNAVAILABLE, [("retry-after", "2")])
                } else {
                    (AxumStatus::OK, [("retry-after", "0")])
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, busy).await.unwrap() });
    let (_, sub) = app
        .post("/v1/subscriptions", json!({"url": url, "secret": SECRET}))
        .await;
    let id = sub["id"].as_str().unwrap().to_string();
    let service = app.email_service().await;
    app.compose_email(&service, "a@example.com", json!({}))
        .await;
    eventually(|| async {
        let (_, s) = app.get(&format!("/v1/subscriptions/{id}")).await;
        s["delivered"] == 1
    })
    .await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "one refusal, one delivery");
    let waited = calls[1] - calls[0];
    assert!(
        waited >= std::time::Duration::from_millis(1900),
        "the batch came again after {waited:?}, not the 2 s asked"
    );
}

#[tokio::test]
async fn a_subscribers_redirect_is_not_followed() {
    let app = TestApp::spawn().await;
    // Where a redirect would send the signed batch: it must never be called.
    let (elsewhere, reached) = subscriber(0).await;
    let target = elsewhere.clone();
    let redirecting = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let target = target.clone();
            async move { (AxumStatus::TEMPORARY_REDIRECT, [("location", target)]) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, redirecting).await.unwrap() });
    let (_, sub) = app
        .post("/v1/subscriptions", json!({"url": url, "secret": SECRET}))
        .await;
    let id = sub["id"].as_str().unwrap().to_string();
    let service = app.email_service().await;
    app.compose_email(&service, "a@example.com", json!({}))
        .await;
    eventually(|| async {
        let (_, s) = app.get(&format!("/v1/subscriptions/{id}")).await;
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("HTTP 307"))
    })
    .await;
    assert_eq!(reached.lock().unwrap().0, 0, "the redirect was followed");
}

#[tokio::test]
async fn a_delivery_whose_lease_ran_out_records_nothing() {
    // A subscription behind the feed whose subscriber refuses everything, then no pusher at
    // all: the service is stopped and its store driven by hand, as two deliveries would.
    let app = TestApp::spawn_with(&[("MESSAGING_PUSH_BACKOFF_MS", "1".into())]).await;
    let (url, seen) = subscriber(usize::MAX).await;
    let (status, sub) = app
        .post("/v1/subscriptions", json!({"url": url, "secret": SECRET}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sub}");
    let id: uuid::Uuid = sub["id"].as_str().unwrap().parse().unwrap();
    let service = app.email_service().await;
    app.compose_email(&service, "a@example.com", json!({}))
        .await;
    eventually(|| async { seen.lock().unwrap().0 >= 1 }).await;
    let database_url = app.stop().await;
    let store = store_only(&database_url).await;
    let end = store
        .state_changes(0, 1000)
        .await
        .unwrap()
        .last()
        .unwrap()
        .position;

    let lease = std::time::Duration::from_millis(300);
    let mut first = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while first.is_empty() {
        // The refused deliveries' backoff (doubling from a millisecond) may not be over yet.
        assert!(tokio::time::Instant::now() < deadline, "never due");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        first = store.lease_push_subscriptions(lease, 10).await.unwrap();
    }
    let first = first.pop().unwrap();
    assert_eq!(first.id, id);
    assert!(
        store
            .lease_push_subscriptions(lease, 10)
            .await
            .unwrap()
            .is_empty(),
        "leased twice at once"
    );
    tokio::time::sleep(lease * 2).await;
    // The first delivery is late: its lease ran out and a second delivery took the subscription.
    let second = store
        .lease_push_subscriptions(std::time::Duration::from_secs(60), 10)
        .await
        .unwrap()
        .pop()
        .expect("the lease ran out: the subscription is due again");
    assert_ne!(first.leased_until, second.leased_until);

    // The late delivery's answers are not recorded: neither frees the subscription under the
    // second delivery, nor moves its cursor, nor counts a failure.
    assert!(!store.push_acknowledged(&first, end, 1).await.unwrap());
    assert!(!store
        .push_failed(&first, 99, "late", std::time::Duration::ZERO)
        .await
        .unwrap());
    let now = store.subscription(id).await.unwrap().unwrap();
    assert_eq!(now.cursor, 0);
    assert_ne!(now.failures, 99);
    assert_ne!(now.last_error.as_deref(), Some("late"));
    assert!(
        now.next_attempt_at > chrono::Utc::now() + chrono::Duration::seconds(30),
        "the second delivery's lease was cut short: {:?}",
        now.next_attempt_at
    );
    assert!(
        store
            .lease_push_subscriptions(lease, 10)
            .await
            .unwrap()
            .is_empty(),
        "leased while the second delivery holds it"
    );

    // The second delivery's answer is.
    assert!(store.push_acknowledged(&second, end, 1).await.unwrap());
    let now = store.subscription(id).await.unwrap().unwrap();
    assert_eq!((now.cursor, now.failures, now.last_error), (end, 0, None));
}

#[tokio::test]
async fn a_subscriber_that_cannot_take_a_whole_batch_gets_smaller_ones() {
    // Refuses any batch of more than two items (as one that times out on large batches
    // would), takes smaller ones.
    let app = TestApp::spawn_with(&[("MESSAGING_PUSH_BACKOFF_MS", "10".into())]).await;
    let taken: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let (t, s) = (taken.clone(), sizes.clone());
    let picky = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let (taken, sizes) = (t.clone(), s.clone());
            async move {
                let batch: Value = serde_json::from_slice(&body).unwrap();
                let items = batch["items"].as_array().unwrap().clone();
                sizes.lock().unwrap().push(items.len());
                if items.len() > 2 {
                    return AxumStatus::PAYLOAD_TOO_LARGE;
                }
                taken.lock().unwrap().extend(items);
                AxumStatus::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, picky).await.unwrap() });
    ten_changes(&app).await;
    // The whole backlog in the feed before the subscription starts (it is projected after
    // the commands are answered).
    eventually(|| async {
        let (_, feed) = app.get("/v1/state-changes?after=0").await;
        feed["next"] == 10
    })
    .await;
    let (status, sub) = app
        .post(
            "/v1/subscriptions",
            json!({"url": url, "secret": SECRET, "after": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sub}");

    // Seven refused deliveries, each followed by a back-off, then a dozen small ones.
    eventually_within(std::time::Duration::from_secs(60), || async {
        taken.lock().unwrap().len() >= 10
    })
    .await;
    let positions: Vec<i64> = taken
        .lock()
        .unwrap()
        .iter()
        .map(|i| i["position"].as_i64().unwrap())
        .collect();
    assert_eq!(
        positions,
        (1..=10).collect::<Vec<_>>(),
        "each once, in order"
    );
    let sizes = sizes.lock().unwrap().clone();
    // The whole backlog (10), refused; 50 items at most, all 10 again, refused; 25, refused;
    // 12, refused; 6, refused; 3, refused; then 1 taken, 2 taken, 4 refused, 2 taken, ...
    assert_eq!(
        sizes[..8],
        [10, 10, 10, 10, 6, 3, 1, 2],
        "halved after each refusal, doubled after each success: {sizes:?}"
    );
    assert!(sizes.len() < 20, "{sizes:?}");
}
