//! Operations: `/metrics`, `/v1/openapi.json` against the router, request ids in headers and
//! in every log line of the request.

use crate::helpers::{eventually, tomorrow, TestApp, API_KEY};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::Write;
use std::sync::{Arc, Mutex};

async fn scrape(app: &TestApp) -> String {
    let r = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(r.status(), StatusCode::OK);
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    r.text().await.expect("metrics text")
}

/// The value of the one sample whose line starts with `name{` and has every label given.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_show_requests_by_route_commands_sends_lag_and_queues() {
    let app = TestApp::spawn().await;
    let service = app
        .create_service("email", "sandbox", "news@example.com")
        .await;
    let sent = app
        .compose_email(&service, "alice@example.com", json!({"send": true}))
        .await;
    let scheduled = app
        .compose_email(&service, "bob@example.com", tomorrow())
        .await;
    let id = sent["id"].as_str().expect("id").to_string();
    let (status, _) = app.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.get("/v1/no-such-thing/42").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The sender and the projections run on their own: wait for their numbers.
    eventually(|| async {
        let text = scrape(&app).await;
        sample(
            &text,
            "messaging_sends_total",
            &[("provider", "sandbox"), ("outcome", "sent")],
        ) == Some(1.0)
            && sample(
                &text,
                "messaging_queue_depth",
                &[("queue", "scheduled_sends")],
            ) == Some(1.0)
    })
    .await;
    let text = scrape(&app).await;

    // Latency by route template, never by raw path.
    let by_route = sample(
        &text,
        "messaging_http_request_duration_seconds_count",
        &[
            ("method", "GET"),
            ("route", "/v1/messages/{id}"),
            ("status", "200"),
        ],
    );
    assert_eq!(by_route, Some(1.0), "{text}");
    assert!(!text.contains(&id), "a raw id leaked into labels: {text}");
    assert!(
        !text.contains(scheduled["id"].as_str().expect("id")),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "messaging_http_request_duration_seconds_bucket",
            &[
                ("route", "/v1/messages"),
                ("method", "POST"),
                ("status", "201")
            ],
        )
        .is_some(),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "messaging_http_request_duration_seconds_count",
            &[("route", "unmatched"), ("status", "404")],
        ),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains("no-such-thing"), "{text}");

    // Commands by type and outcome; this app's own registry, so exact counts.
    assert_eq!(
        sample(
            &text,
            "messaging_commands_total",
            &[("command", "compose"), ("outcome", "ok")]
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "messaging_commands_total",
            &[("command", "record_sent"), ("outcome", "ok")]
        ),
        Some(1.0),
        "{text}"
    );
    let appended: f64 = text
        .lines()
        .filter(|l| l.starts_with("messaging_events_appended_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(appended >= 4.0, "{text}");

    // Lag per projection and queue depths, read at scrape time.
    for projection in ["message_list", "state_changes", "delivery"] {
        assert!(
            sample(
                &text,
                "messaging_subscription_lag_events",
                &[("projection", projection)]
            )
            .is_some(),
            "no lag for {projection}: {text}"
        );
    }
    for queue in ["send_jobs_due", "send_jobs", "webhook_inbox_pending"] {
        assert!(
            sample(&text, "messaging_queue_depth", &[("queue", queue)]).is_some(),
            "no depth for {queue}: {text}"
        );
    }
    assert_eq!(
        sample(&text, "messaging_metrics_database_ok", &[]),
        Some(1.0)
    );
}

#[tokio::test]
async fn push_subscription_lag_is_a_gauge_per_subscription() {
    let app = TestApp::spawn().await;
    let (status, sub) = app
        .post(
            "/v1/subscriptions",
            json!({"url": "http://127.0.0.1:9/hook", "secret": "0123456789abcdef0123"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sub}");
    let sub_id = sub["id"].as_str().expect("id");
    let text = scrape(&app).await;
    assert_eq!(
        sample(
            &text,
            "messaging_push_subscription_lag_items",
            &[("subscription", sub_id)]
        ),
        Some(0.0),
        "{text}"
    );
    // Two changes its endpoint (a closed port) never takes: the subscription is two behind.
    let service = app.email_service().await;
    let draft = app
        .compose_email(&service, "a@example.com", json!({}))
        .await;
    let id = draft["id"].as_str().unwrap();
    app.post(&format!("/v1/messages/{id}/cancel"), json!({}))
        .await;
    eventually(|| async {
        let text = scrape(&app).await;
        sample(
            &text,
            "messaging_push_subscription_lag_items",
            &[("subscription", sub_id)],
        ) == Some(2.0)
    })
    .await;
}

/// Routes as the source registers them: `.route("/path", get(..).post(..))`, with the `/v1`
/// prefix for the resource modules that `http::router` nests there.
fn routes_in_source() -> BTreeSet<(String, String)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files: Vec<(std::path::PathBuf, &str)> = vec![];
    for entry in std::fs::read_dir(format!("{root}/src/http")).expect("src/http") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let prefix = match name {
            "mod.rs" => continue,
            "health.rs" | "observability.rs" => "",
            _ => "/v1",
        };
        files.push((path, prefix));
    }
    files.push((format!("{root}/src/webhooks/mod.rs").into(), ""));
    let mut routes = BTreeSet::new();
    for (file, prefix) in files {
        let source = std::fs::read_to_string(&file).expect("read source");
        for (start, _) in source.match_indices(".route(") {
            let rest = &source[start + ".route(".len()..];
            // A call has a path literal first; anything else is prose about `.route(...)`.
            if !rest.trim_start().starts_with('"') {
                continue;
            }
            let open = rest.find('"').expect("a path literal");
            let close = open + 1 + rest[open + 1..].find('"').expect("closing quote");
            let path = &rest[open + 1..close];
            // The call's extent: up to the parenthesis that closes `.route(`.
            let mut depth = 1;
            let mut end = rest.len();
            for (i, c) in rest.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let call = &rest[close..end];
            for method in ["get", "post", "put", "patch", "delete"] {
                let found = call.match_indices(&format!("{method}(")).any(|(i, _)| {
                    i == 0
                        || !call[..i]
                            .chars()
                            .last()
                            .is_some_and(|c| c.is_alphanumeric() || c == '_')
                });
                if found {
                    routes.insert((method.to_uppercase(), format!("{prefix}{path}")));
                }
            }
        }
    }
    routes
}

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, methods) in doc["paths"].as_object().expect("paths") {
        for method in methods.as_object().expect("methods").keys() {
            ops.insert((method.to_uppercase(), path.clone()));
        }
    }
    ops
}

#[tokio::test]
async fn openapi_documents_every_route_and_every_documented_operation_is_routed() {
    let app = TestApp::spawn().await;
    let r = app
        .client
        .get(app.url("/v1/openapi.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "behind the bearer key"
    );
    let (status, doc) = app.get("/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{doc}"
    );
    assert!(doc["components"]["schemas"]["Error"].is_object());
    let compose = &doc["paths"]["/v1/messages"]["post"];
    assert!(compose["requestBody"].is_object(), "{compose}");
    assert!(compose["responses"]["201"].is_object(), "{compose}");
    assert!(compose["responses"]["422"].is_object(), "{compose}");
    // The headers an operation reads are parameters too, so generated clients send them.
    let header_params = |operation: &Value| -> Vec<String> {
        operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "header")
            .filter_map(|p| p["name"].as_str().map(String::from))
            .collect()
    };
    assert_eq!(header_params(compose), ["Idempotency-Key"]);
    assert_eq!(
        header_params(&doc["paths"]["/v1/services/{id}/shares"]["post"]),
        ["Idempotency-Key"]
    );
    assert_eq!(
        header_params(&doc["paths"]["/v1/state-changes/stream"]["get"]),
        ["Last-Event-ID"]
    );

    // Operation ids are identifiers client generators can use, each once; every response an
    // operation refers to is defined.
    let mut ids = BTreeSet::new();
    for methods in doc["paths"].as_object().expect("paths").values() {
        for operation in methods.as_object().expect("methods").values() {
            let id = operation["operationId"].as_str().expect("operationId");
            assert!(
                !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{id}"
            );
            assert!(ids.insert(id.to_string()), "{id} twice");
            for response in operation["responses"]
                .as_object()
                .expect("responses")
                .values()
            {
                if let Some(reference) = response["$ref"].as_str() {
                    let name = reference.trim_start_matches("#/components/responses/");
                    assert!(
                        doc["components"]["responses"][name].is_object(),
                        "{id}: {reference} is not defined"
                    );
                }
            }
        }
    }
    let inbound = &doc["paths"]["/webhooks/sendgrid/inbound"]["post"];
    assert!(inbound["responses"]["413"].is_object(), "{inbound}");
    assert!(doc["components"]["responses"]["MethodNotAllowed"].is_object());

    // Every route in the router is documented, and nothing else is.
    let in_source = routes_in_source();
    assert!(in_source.len() > 20, "the source parse found {in_source:?}");
    let in_doc = documented(&doc);
    let undocumented: Vec<_> = in_source.difference(&in_doc).collect();
    assert!(undocumented.is_empty(), "undocumented: {undocumented:?}");

    // The fallback is recognisable, so the next check means something.
    let (status, body) = app.get("/v1/nothing-here").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("no such route")));

    // Every documented operation reaches a handler: no fallback 404, no 405.
    let placeholder = uuid::Uuid::now_v7().to_string();
    for (method, path) in &in_doc {
        let url = app.url(&path.replace("{id}", &placeholder));
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = app
            .client
            .request(method.clone(), url)
            .bearer_auth(API_KEY)
            .timeout(std::time::Duration::from_secs(10));
        if method != Method::GET {
            request = request.json(&json!({}));
        }
        let r = request.send().await.expect("request");
        let status = r.status();
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path} is documented but not routed"
        );
        if status == StatusCode::NOT_FOUND {
            let body = r.text().await.unwrap_or_default();
            assert!(
                !body.contains("no such route"),
                "{method} {path} is documented but not routed: {body}"
            );
        }
    }
}

#[tokio::test]
async fn request_ids_are_echoed_when_sane_and_generated_otherwise() {
    let app = TestApp::spawn().await;
    let header = |r: &reqwest::Response| {
        r.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let r = app
        .client
        .get(app.url("/healthz"))
        .header("X-Request-Id", "trace-abc_123.4")
        .send()
        .await
        .expect("request");
    assert_eq!(header(&r).as_deref(), Some("trace-abc_123.4"));

    for (path, incoming) in [
        ("/healthz", None),
        ("/v1/messages", None),                         // 401 without a key
        ("/nowhere", None),                             // the fallback
        ("/webhooks/twitter", None),                    // merged after the API router
        ("/healthz", Some("has space and \"quotes\"")), // not sane: replaced
        ("/healthz", Some(&*"x".repeat(200))),
    ] {
        let mut request = app.client.get(app.url(path));
        if let Some(incoming) = incoming {
            request = request.header("X-Request-Id", incoming);
        }
        let r = request.send().await.expect("request");
        let id = header(&r).unwrap_or_else(|| panic!("no X-Request-Id on {path}"));
        let uuid = uuid::Uuid::parse_str(&id).expect("a generated id is a UUID");
        assert_eq!(uuid.get_version_num(), 7, "{id}");
    }
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn every_log_line_of_a_request_carries_its_id_and_no_secret() {
    // `#[tokio::test]` runs the server on this thread, so a thread-local subscriber sees it.
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_env_filter("info")
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // With a single registered dispatcher, tracing computes a callsite's interest from the
    // registering thread's default only: another test's thread (no subscriber) would mark the
    // server's callsites "never". A second live dispatcher makes it ask every one of them.
    let _second = tracing::Dispatch::new(tracing_subscriber::registry());
    tracing::callsite::rebuild_interest_cache();

    let app = TestApp::spawn().await;
    let service = app
        .create_service("email", "sandbox", "news@example.com")
        .await;
    // Services with credentials: their keys and tokens must never be logged.
    app.email_service().await;
    app.create_service("twitter", "x", "ourbrand").await;
    let r = app
        .client
        .post(app.url("/v1/messages"))
        .bearer_auth(API_KEY)
        .header("X-Request-Id", "compose-req-1")
        .json(
            &json!({"service_id": service, "to": [{"username": "alice@example.com"}],
                      "subject": "Hi", "text": "Hello"}),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::CREATED);
    let message: Value = r.json().await.expect("json");
    let id = message["id"].as_str().expect("id").to_string();
    let _ = app
        .client
        .post(app.url("/webhooks/sendgrid/inbound?token=very-secret-token"))
        .header("X-Request-Id", "webhook-req-1")
        .send()
        .await
        .expect("request");

    let logs = String::from_utf8(captured.0.lock().expect("logs").clone()).expect("utf-8");
    let lines: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let of_request: Vec<&Value> = lines
        .iter()
        .filter(|l| l["span"]["request_id"] == "compose-req-1")
        .collect();
    // The handler's line (with the message id) and the finished-request line.
    assert!(
        of_request
            .iter()
            .any(|l| l["fields"]["message_id"] == id.as_str()),
        "{logs}"
    );
    // Every line the handlers log while serving a request is inside its span: here, every
    // service created and every message composed says which request did it.
    let handled: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            ["message composed", "service created"]
                .contains(&l["fields"]["message"].as_str().unwrap_or(""))
        })
        .collect();
    assert_eq!(handled.len(), 4, "{logs}");
    assert!(
        handled.iter().all(|l| l["span"]["request_id"].is_string()),
        "{logs}"
    );
    assert!(
        of_request
            .iter()
            .any(|l| l["span"]["route"] == "/v1/messages"
                && l["fields"]["status"].as_u64() == Some(201)),
        "{logs}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["span"]["request_id"] == "webhook-req-1"),
        "{logs}"
    );
    assert!(!logs.contains(API_KEY), "the API key was logged");
    assert!(
        !logs.contains("Bearer"),
        "an Authorization header was logged"
    );
    assert!(
        !logs.contains("very-secret-token"),
        "a query token was logged"
    );
    for secret in ["SG.secret-value", "x-secret-token"] {
        assert!(!logs.contains(secret), "a service's credential was logged");
    }
}

#[tokio::test]
async fn stopping_ends_open_streams_and_long_polls_instead_of_waiting_for_them() {
    let app = TestApp::spawn().await;
    // An Automation client reading the stream, and one long-polling for a minute.
    let stream = app
        .client
        .get(app.url("/v1/state-changes/stream"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let poll = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/v1/state-changes?wait=60");
        async move { client.get(url).bearer_auth(API_KEY).send().await }
    });
    // Time for the long poll to reach the server, on a busy machine (nothing tells from
    // outside that it has).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    // The server waits for every open request before the stop completes: without an end
    // of their own, these two would hold the shutdown for a minute and for ever.
    tokio::time::timeout(std::time::Duration::from_secs(10), app.stop())
        .await
        .expect("stopped while a stream and a long poll were open");
    // The long poll was answered (nothing new), not cut off.
    let answered = poll.await.unwrap().unwrap();
    assert_eq!(answered.status(), StatusCode::OK);
    let body: Value = answered.json().await.unwrap();
    assert_eq!(body["items"], json!([]));
    // The stream ended as a stream ends, its body complete.
    stream.text().await.expect("the stream ended cleanly");
}
