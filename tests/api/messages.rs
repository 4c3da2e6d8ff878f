//! Message commands over HTTP.

use crate::helpers::*;
use chrono::{Duration, Utc};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn compose_schedule_send_and_cancel_move_the_message_through_its_states() {
    let app = TestApp::spawn().await;
    let service = app.email_service().await;

    let draft = app
        .compose_email(&service, "alice@example.com", json!({}))
        .await;
    assert_eq!(draft["state"], "draft");
    assert_eq!(draft["channel"], "email");
    assert_eq!(draft["direction"], "outbound");
    assert_eq!(draft["from"]["username"], "news@example.com");
    let id = draft["id"].as_str().unwrap().to_string();
    let version = uuid::Uuid::parse_str(&id).unwrap().get_version_num();
    assert_eq!(version, 7, "message ids are UUIDv7");

    let at = (Utc::now() + Duration::hours(1)).to_rfc3339();
    let (status, scheduled) = app
        .post(
            &format!("/v1/messages/{id}/schedule"),
            json!({"publish_at": at}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{scheduled}");
    assert_eq!(scheduled["state"], "scheduled");
    assert_eq!(scheduled["previous_state"], "draft");
    assert!(scheduled["publish_at"].is_string());

    let (status, queued) = app
        .post(&format!("/v1/messages/{id}/send"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{queued}");
    assert_eq!(queued["state"], "pending");

    let (status, cancelled) = app
        .post(&format!("/v1/messages/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["state"], "cancelled");
    assert_eq!(cancelled["previous_state"], "pending");

    // The detail shows every event, in order, with the state each left behind.
    let (status, detail) = app.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    let history: Vec<(String, String)> = detail["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["type"].as_str().unwrap().to_string(),
                h["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        history,
        [
            ("MessageComposed", "draft"),
            ("MessageScheduled", "scheduled"),
            ("MessageQueued", "pending"),
            ("MessageCancelled", "cancelled"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert_eq!(detail["history"][3]["previous_state"], "pending");
    assert_eq!(detail["history"][0]["sequence"], 1);

    app.wait_listed(&id, "cancelled").await;
}

/// A command's answer is the message as that command left it (the writer's own fold of its
/// events, not a read afterwards): the same view a GET shows when nothing came after, and,
/// for concurrent reschedules of one message, each its own `publish_at`.
#[tokio::test]
async fn a_commands_answer_is_the_message_as_the_command_left_it() {
    let app = TestApp::spawn().await;
    let service = app.email_service().await;
    let draft = app
        .compose_email(&service, "alice@example.com", json!({}))
        .await;
    let id = draft["id"].as_str().unwrap().to_string();
    let without_history = |mut detail: serde_json::Value| {
        detail.as_object_mut().unwrap().remove("history");
        detail
    };

    let at = (Utc::now() + Duration::hours(1)).to_rfc3339();
    let (status, scheduled) = app
        .post(
            &format!("/v1/messages/{id}/schedule"),
            json!({"publish_at": at}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{scheduled}");
    let (_, detail) = app.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(scheduled, without_history(detail));

    let times: Vec<String> = (1..=12)
        .map(|h| (Utc::now() + Duration::hours(h)).to_rfc3339())
        .collect();
    let path = format!("/v1/messages/{id}/schedule");
    let answers = futures::future::join_all(
        times
            .iter()
            .map(|at| app.post(&path, json!({"publish_at": at}))),
    )
    .await;
    for (at, (status, answer)) in times.iter().zip(&answers) {
        assert_eq!(*status, StatusCode::OK, "{answer}");
        assert_eq!(answer["state"], "scheduled");
        let shown: chrono::DateTime<Utc> = answer["publish_at"].as_str().unwrap().parse().unwrap();
        let asked: chrono::DateTime<Utc> = at.parse().unwrap();
        // Times are kept to the microsecond.
        assert_eq!(
            shown.timestamp_micros(),
            asked.timestamp_micros(),
            "an answer showed another command's schedule: {answer}"
        );
    }

    let (status, cancelled) = app
        .post(&format!("/v1/messages/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    let (_, detail) = app.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(detail["history"].as_array().unwrap().len(), 15);
    assert_eq!(cancelled, without_history(detail));
}

#[tokio::test]
async fn compose_with_publish_at_schedules_and_with_send_queues() {
    let app = TestApp::spawn().await;
    let service = app.email_service().await;
    let at = (Utc::now() + Duration::minutes(5)).to_rfc3339();
    let scheduled = app
        .compose_email(&service, "a@example.com", json!({"publish_at": at}))
        .await;
    assert_eq!(scheduled["state"], "scheduled");
    let queued = app
        .compose_email(&service, "b@example.com", json!({"send": true}))
        .await;
    assert_eq!(queued["state"], "pending");
}

#[tokio::test]
async fn x_and_facebook_posts_without_recipients_go_to_the_service_profile() {
    let app = TestApp::spawn().await;
    let x = app.create_service("twitter", "x", "@ourbrand").await;
    let (status, post) = app
        .post(
            "/v1/messages",
            json!({"service_id": x, "text": "Launch day 🚀 https://example.com/launch"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{post}");
    assert_eq!(post["channel"], "twitter");
    assert_eq!(post["to"][0]["username"], "ourbrand");

    let fb = app
        .create_service("facebook", "facebook", "104857600123456")
        .await;
    let (status, post) = app
        .post(
            "/v1/messages",
            json!({"service_id": fb, "link": "https://example.com/post"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{post}");
    assert_eq!(post["to"][0]["username"], "104857600123456");
}

#[tokio::test]
async fn invalid_transitions_are_409_and_change_nothing() {
    let app = TestApp::spawn().await;
    let service = app.email_service().await;
    let id = app
        .compose_email(&service, "a@example.com", json!({}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) = app
        .post(&format!("/v1/messages/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);

    let (status, body) = app
        .post(&format!("/v1/messages/{id}/send"), json!({}))
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_transition");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("cancelled"));
    let at = (Utc::now() + Duration::hours(1)).to_rfc3339();
    let (status, body) = app
        .post(
            &format!("/v1/messages/{id}/schedule"),
            json!({"publish_at": at}),
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_transition");

    let (_, detail) = app.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(detail["state"], "cancelled");
    assert_eq!(detail["history"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn cancel_after_the_provider_call_started_is_409() {
    // A provider that takes its time: the call is in flight while the user cancels.
    let sendgrid = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::path("/v3/mail/send"))
        .and(wiremock::matchers::header(
            "authorization",
            "Bearer SG.secret-value",
        ))
        .respond_with(
            wiremock::ResponseTemplate::new(202).set_delay(std::time::Duration::from_millis(1200)),
        )
        .expect(1)
        .mount(&sendgrid)
        .await;
    let app = TestApp::spawn_with(&[("MESSAGING_SENDGRID_BASE_URL", sendgrid.uri())]).await;
    let id = app.email_in_flight().await;
    let (status, body) = app
        .post(&format!("/v1/messages/{id}/cancel"), json!({}))
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "invalid_transition");
    // Refused while the call was still in flight, not because it had already finished.
    let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(m["state"], "pending", "{m}");
    eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
        m["state"] == "sent"
    })
    .await;
}

#[tokio::test]
async fn invalid_fields_are_422_naming_the_field() {
    let app = TestApp::spawn().await;
    let service = app.email_service().await;
    let x = app.create_service("twitter", "x", "ourbrand").await;
    let fb = app
        .create_service("facebook", "facebook", "104857600123456")
        .await;
    let cases = [
        (
            json!({"service_id": service, "to": [], "subject": "s", "text": "t"}),
            "to",
        ),
        (
            json!({"service_id": service, "to": [{"username": "not-an-address"}], "subject": "s", "text": "t"}),
            "to[0].username",
        ),
        (
            json!({"service_id": service, "to": [{"username": "a@example.com"}], "text": "t"}),
            "subject",
        ),
        (
            json!({"service_id": service, "to": [{"username": "a@example.com"}], "subject": "s", "text": "t",
                "publish_at": "2001-01-01T00:00:00Z"}),
            "publish_at",
        ),
        (
            json!({"service_id": service, "to": [{"username": "a@example.com"}], "subject": "s", "text": "t",
                "publish_at": "next tuesday"}),
            "publish_at",
        ),
        (
            json!({"service_id": "00000000-0000-7000-8000-000000000000", "text": "t"}),
            "service_id",
        ),
        (json!({"service_id": x, "text": "x".repeat(281)}), "text"),
        (
            json!({"service_id": fb, "text": "t", "to": [{"username": "a".repeat(101)}]}),
            "to[0].username",
        ),
        (
            json!({"service_id": x, "text": "日本語".repeat(47)}),
            "text",
        ),
    ];
    for (body, field) in cases {
        let (status, error) = app.post("/v1/messages", body.clone()).await;
        assert_error(
            status,
            &error,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        );
        assert!(
            error["error"]["message"].as_str().unwrap().contains(field),
            "the message names `{field}`: {error} for {body}"
        );
    }
    // Nothing was composed by any of them.
    let (_, detail) = app.get("/v1/messages").await;
    assert_eq!(detail["items"].as_array().unwrap().len(), 0);
    let (status, error) = app
        .post(
            "/v1/messages/00000000-0000-7000-8000-000000000000/schedule",
            json!({"publish_at": 5}),
        )
        .await;
    assert_error(
        status,
        &error,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("publish_at"));
}

#[tokio::test]
async fn requests_without_a_valid_key_are_401() {
    let app = TestApp::spawn().await;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic dGVzdA=="),
        Some(API_KEY),
    ] {
        let mut r = app.client.get(app.url("/v1/messages"));
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        let (status, body) = read(r.send().await.unwrap()).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let r = app
        .client
        .post(app.url("/v1/services"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    // Health needs no key.
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// A misspelt field or parameter is refused, naming it, instead of ignored: `publishAt` would
/// otherwise leave a draft that is never sent, and `status=` list every message.
#[tokio::test]
async fn unknown_fields_and_parameters_are_refused_by_name() {
    let app = TestApp::spawn().await;
    let service = app.email_service().await;
    let (status, body) = app
        .post(
            "/v1/messages",
            json!({"service_id": service, "to": [{"username": "a@example.com"}],
                   "subject": "Hi", "text": "Hello", "publishAt": "2099-01-01T00:00:00Z"}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`publishAt`") && message.contains("publish_at"),
        "{message}"
    );
    let (status, body) = app
        .post(
            "/v1/messages",
            json!({"service_id": service, "to": [{"username": "a@example.com", "email": "b"}],
                   "subject": "Hi", "text": "Hello"}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`email`"),
        "{body}"
    );
    let (status, body) = app
        .post(
            &format!("/v1/services/{service}/shares"),
            json!({"text": "Hi", "publish_time": "2099-01-01T00:00:00Z"}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    let (status, body) = app
        .post(
            "/v1/subscriptions",
            json!({"url": "http://127.0.0.1:9/hook", "secret": "0123456789abcdef",
                   "state": ["bounced"]}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`state`"),
        "{body}"
    );
    for path in ["/v1/messages?status=failed", "/v1/state-changes?afterr=3"] {
        let (status, body) = app.get(path).await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        );
        let name = path.split(['?', '=']).nth(1).unwrap();
        assert!(
            body["error"]["message"].as_str().unwrap().contains(name),
            "{path}: {body}"
        );
    }
    // A time without its offset says what a time must be.
    let draft = app
        .compose_email(&service, "a@example.com", json!({}))
        .await;
    let (status, body) = app
        .post(
            &format!("/v1/messages/{}/schedule", draft["id"].as_str().unwrap()),
            json!({"publish_at": "2099-01-01T09:00:00"}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("publish_at: must be an RFC 3339 time"),
        "{message}"
    );
    // A secret given as a number is refused without being shown back.
    let (status, body) = app
        .post(
            "/v1/subscriptions",
            json!({"url": "http://127.0.0.1:9/hook", "secret": 98765432109876543u64}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    assert!(!body.to_string().contains("98765432109876543"), "{body}");
    // A body that is not an object says so, without naming the service's types.
    let (status, body) = app.post("/v1/messages", json!(null)).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    assert_eq!(
        body["error"]["message"],
        "body: invalid type: null, expected a JSON object"
    );
    // Nothing was composed or subscribed by the refused requests (the draft above aside).
    let (_, list) = app.get("/v1/messages").await;
    let listed: Vec<&serde_json::Value> = list["items"].as_array().unwrap().iter().collect();
    assert!(listed.iter().all(|m| m["id"] == draft["id"]), "{list}");
    let (_, subscriptions) = app.get("/v1/subscriptions").await;
    assert_eq!(subscriptions["items"], json!([]), "{subscriptions}");
}

#[tokio::test]
async fn malformed_unknown_and_oversized_requests_get_clear_errors() {
    let app = TestApp::spawn().await;
    let send = |body: String| {
        app.client
            .post(app.url("/v1/messages"))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let (status, body) = read(send("{\"service_id\": ".into()).await.unwrap()).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "malformed_json");
    let big = format!("{{\"text\": \"{}\"}}", "a".repeat(70_000));
    let (status, body) = read(send(big).await.unwrap()).await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    let (status, body) = read(
        app.client
            .post(app.url("/v1/messages"))
            .bearer_auth(API_KEY)
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );

    let (status, body) = app.get("/v1/messages/not-a-uuid").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = app
        .post(
            "/v1/messages/01939c3a-0000-7000-8000-000000000000/send",
            json!({}),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = app.get("/v1/nothing-here").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn every_v1_answer_has_the_error_shape_and_needs_a_key() {
    let app = TestApp::spawn().await;
    // An unknown route and a wrong method need a key first, like every /v1 call.
    for (method, path) in [("GET", "/v1/nothing-here"), ("PUT", "/v1/messages")] {
        let r = app
            .client
            .request(method.parse().unwrap(), app.url(path))
            .send()
            .await
            .unwrap();
        let (status, body) = read(r).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let r = app
        .client
        .put(app.url("/v1/messages"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    let (status, body) = read(r).await;
    assert_error(
        status,
        &body,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    // The scheme is case-insensitive.
    let r = app
        .client
        .get(app.url("/v1/messages"))
        .header("Authorization", format!("bearer {API_KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A repeated query parameter is an invalid field, in our shape.
    for path in [
        "/v1/messages?state=sent&state=draft",
        "/v1/state-changes?limit=1&limit=2",
    ] {
        let (status, body) = app.get(path).await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        );
    }
    // A bad resume position names the parameter it came from.
    let (status, body) = app.get("/v1/state-changes/stream?after=abc").await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("after:"),
        "{body}"
    );
}

#[tokio::test]
async fn concurrent_composes_with_one_idempotency_key_create_one_message() {
    let app = TestApp::spawn().await;
    let service = app.email_service().await;
    let later = (Utc::now() + Duration::days(1)).to_rfc3339();
    let body = json!({"service_id": service, "to": [{"username": "a@example.com"}],
                      "subject": "Once", "text": "only once", "publish_at": later});
    let requests = (0..8).map(|_| {
        app.client
            .post(app.url("/v1/messages"))
            .bearer_auth(API_KEY)
            .header("Idempotency-Key", "order-42")
            .json(&body)
            .send()
    });
    let responses = futures::future::join_all(requests).await;
    let mut ids = std::collections::BTreeSet::new();
    for r in responses {
        let (status, view) = read(r.unwrap()).await;
        assert_eq!(status, StatusCode::CREATED, "{view}");
        ids.insert(view["id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 1, "one message for one key");
    let id = ids.into_iter().next().unwrap();
    let (_, detail) = app.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(
        detail["history"].as_array().unwrap().len(),
        2,
        "composed and queued once"
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(events, 2);

    // The same key with another body is refused and creates nothing.
    let mut other = body.clone();
    other["subject"] = json!("Something else");
    let r = app
        .client
        .post(app.url("/v1/messages"))
        .bearer_auth(API_KEY)
        .header("Idempotency-Key", "order-42")
        .json(&other)
        .send()
        .await
        .unwrap();
    let (status, error) = read(r).await;
    assert_error(
        status,
        &error,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(events, 2);
}

/// A Compose refused (its `publish_at` already past) made nothing under its key: the key is
/// given back, so the corrected request can use it, and it then belongs to that request.
#[tokio::test]
async fn a_refused_compose_gives_its_idempotency_key_back() {
    let app = TestApp::spawn().await;
    let service = app.email_service().await;
    let compose = |body: serde_json::Value| {
        let request = app
            .client
            .post(app.url("/v1/messages"))
            .bearer_auth(API_KEY)
            .header("Idempotency-Key", "order-7")
            .json(&body)
            .send();
        async move { read(request.await.unwrap()).await }
    };
    let mut body = json!({"service_id": service, "to": [{"username": "a@example.com"}],
                          "subject": "Later", "text": "t", "publish_at": "2001-01-01T00:00:00Z"});
    let (status, error) = compose(body.clone()).await;
    assert_error(
        status,
        &error,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    let refused = body.clone();
    body["publish_at"] = json!((Utc::now() + Duration::days(1)).to_rfc3339());
    let (status, first) = compose(body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (status, again) = compose(body).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert_eq!(first["id"], again["id"], "the retry finds the same message");
    let (status, error) = compose(refused).await;
    assert_error(
        status,
        &error,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    );
    // Nothing else was composed: once the list shows the message, it shows it alone.
    eventually(|| async {
        let (_, list) = app.get("/v1/messages").await;
        let items = list["items"].as_array().unwrap().clone();
        assert!(items.len() <= 1, "{list}");
        items.first().is_some_and(|m| m["id"] == first["id"])
    })
    .await;
}

#[tokio::test]
async fn a_retry_under_its_idempotency_key_finds_its_message_after_publish_at_has_passed() {
    let app = TestApp::spawn().await;
    let service = app.email_service().await;
    // Far enough for the first compose to land before it on a busy machine.
    let at = Utc::now() + Duration::seconds(3);
    let soon = at.to_rfc3339();
    let body = json!({"service_id": service, "to": [{"username": "a@example.com"}],
                      "subject": "Soon", "text": "in a moment", "publish_at": soon});
    let compose = || {
        app.client
            .post(app.url("/v1/messages"))
            .bearer_auth(API_KEY)
            .header("Idempotency-Key", "order-43")
            .json(&body)
            .send()
    };
    let (status, first) = read(compose().await.unwrap()).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    // The client never saw that answer and retries once publish_at has passed.
    let until = (at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(until + std::time::Duration::from_millis(200)).await;
    let (status, retried) = read(compose().await.unwrap()).await;
    assert_eq!(status, StatusCode::CREATED, "{retried}");
    assert_eq!(retried["id"], first["id"]);
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type IN ('MessageComposed', 'MessageScheduled')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(events, 2, "composed and scheduled once");

    // Without the key, a publish_at in the past is still refused, naming the field.
    let (status, error) = app.post("/v1/messages", body.clone()).await;
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
            .contains("publish_at"),
        "{error}"
    );
}

#[tokio::test]
async fn nothing_is_lost_across_a_restart() {
    let app = TestApp::spawn().await;
    let service = app.email_service().await;
    let id = app
        .compose_email(&service, "a@example.com", tomorrow())
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    app.wait_listed(&id, "scheduled").await;
    let url = app.stop().await;

    let app = TestApp::spawn_on(url).await;
    let (status, detail) = app.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(detail["state"], "scheduled");
    let (status, _) = app
        .post(&format!("/v1/messages/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    app.wait_listed(&id, "cancelled").await;
    let (_, feed) = app.get("/v1/state-changes?after=2&wait=10").await;
    let states: Vec<&str> = feed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["cancelled"]);
    let (_, feed) = app.get("/v1/state-changes").await;
    assert_eq!(feed["items"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn share_builds_the_post_for_the_channel_and_queues_or_schedules_it() {
    let app = TestApp::spawn().await;
    let x = app.create_service("twitter", "x", "ourbrand").await;
    let (status, post) = app
        .post(
            &format!("/v1/services/{x}/shares"),
            json!({"text": "Read this", "link": "https://example.com/a"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{post}");
    assert_eq!(post["state"], "pending");
    assert_eq!(post["text"], "Read this https://example.com/a");
    assert_eq!(post["to"][0]["username"], "ourbrand");

    let fb = app
        .create_service("facebook", "facebook", "104857600123456")
        .await;
    let at = (Utc::now() + Duration::hours(2)).to_rfc3339();
    let (status, post) = app
        .post(
            &format!("/v1/services/{fb}/shares"),
            json!({"link": "https://example.com/b", "publish_at": at}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{post}");
    assert_eq!(post["state"], "scheduled");
    assert_eq!(post["link"], "https://example.com/b");

    let email = app.email_service().await;
    // An email's link goes in its body, as a post's goes in its text: after the text, and
    // after the html as an anchor; a link alone is the body.
    let (status, mail) = app
        .post(
            &format!("/v1/services/{email}/shares"),
            json!({"to": [{"username": "a@example.com"}], "subject": "New", "text": "Read this",
                   "link": "https://example.com/c?a=1&b=2"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{mail}");
    assert_eq!(mail["text"], "Read this\n\nhttps://example.com/c?a=1&b=2");
    let (status, mail) = app
        .post(
            "/v1/messages",
            json!({"service_id": email, "to": [{"username": "a@example.com"}], "subject": "New",
                   "html": "<p>Read this</p>", "link": "https://example.com/c?a=1&b=2"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{mail}");
    assert_eq!(mail["text"], serde_json::Value::Null);
    assert_eq!(
        mail["html"],
        "<p>Read this</p>\n<p><a href=\"https://example.com/c?a=1&amp;b=2\">https://example.com/c?a=1&amp;b=2</a></p>"
    );
    let (status, mail) = app
        .post(
            &format!("/v1/services/{email}/shares"),
            json!({"to": [{"username": "a@example.com"}], "subject": "New",
                   "link": "https://example.com/d"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{mail}");
    assert_eq!(mail["text"], "https://example.com/d");
    let (status, error) = app
        .post(
            &format!("/v1/services/{email}/shares"),
            json!({"text": "hi"}),
        )
        .await;
    assert_error(
        status,
        &error,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("to"));
    let (status, error) = app
        .post(
            "/v1/services/01939c3a-0000-7000-8000-000000000000/shares",
            json!({"text": "hi"}),
        )
        .await;
    assert_error(status, &error, StatusCode::NOT_FOUND, "not_found");
    let (status, error) = app
        .post(&format!("/v1/services/{x}/shares"), json!({"text": ""}))
        .await;
    assert_error(
        status,
        &error,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
}

#[tokio::test]
async fn many_concurrent_writers_all_succeed_and_every_message_goes_out() {
    // On SQLite every write of the API, the projections and the workers queues for one
    // connection: none of them may surface `database is locked` (or anything else) to a user.
    let app = TestApp::spawn().await;
    let service = app
        .create_service("email", "sandbox", "news@example.com")
        .await;
    let composes = (0..64).map(|i| {
        let (app, service) = (&app, &service);
        async move {
            app.post(
                "/v1/messages",
                json!({"service_id": service, "to": [{"username": format!("r{i}@example.com")}],
                       "subject": "Hello", "text": "Hi", "send": true}),
            )
            .await
        }
    });
    let created = futures::future::join_all(composes).await;
    let mut ids = Vec::new();
    for (status, body) in created {
        assert_eq!(status, StatusCode::CREATED, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        app.wait_listed(id, "sent").await;
    }
}

/// Every time the service shows (the view, its history and the facts in it, the feed) is to the
/// microsecond, on either backend, and the same time reads the same wherever it is shown.
#[tokio::test]
async fn times_are_shown_to_the_microsecond_and_alike_wherever_they_appear() {
    fn times<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::String(s) if chrono::DateTime::parse_from_rfc3339(s).is_ok() => {
                out.push(s)
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| times(v, out)),
            serde_json::Value::Object(o) => o.values().for_each(|v| times(v, out)),
            _ => {}
        }
    }
    fn fraction_digits(s: &str) -> usize {
        s.split_once('.').map_or(0, |(_, f)| {
            f.chars().take_while(char::is_ascii_digit).count()
        })
    }

    let app = TestApp::spawn().await;
    let service = app.email_service().await;
    let draft = app
        .compose_email(&service, "alice@example.com", json!({}))
        .await;
    let id = draft["id"].as_str().unwrap().to_string();
    let (status, _) = app
        .post(
            &format!("/v1/messages/{id}/schedule"),
            json!({"publish_at": "2099-01-01T00:00:00.123456789Z"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app
        .post(&format!("/v1/messages/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    app.wait_listed(&id, "cancelled").await;

    let (_, detail) = app.get(&format!("/v1/messages/{id}")).await;
    let (_, list) = app.get("/v1/messages?limit=500").await;
    // The feed may be behind the list: its three items (draft, scheduled, cancelled) first.
    eventually(|| async {
        let (_, feed) = app.get("/v1/state-changes?after=0&limit=100").await;
        feed["items"]
            .as_array()
            .is_some_and(|items| items.len() == 3)
    })
    .await;
    let (_, feed) = app.get("/v1/state-changes?after=0&limit=100").await;
    let mut shown = Vec::new();
    for v in [&detail, &list, &feed] {
        times(v, &mut shown);
    }
    // created, updated and publish_at in two views, the history's and the feed's times.
    assert!(shown.len() >= 20, "{shown:?}");
    for t in &shown {
        assert!(
            fraction_digits(t) <= 6,
            "{t} is shown beyond the microsecond"
        );
    }
    let history = detail["history"].as_array().unwrap();
    assert_eq!(detail["created_at"], history[0]["occurred_at"]);
    assert_eq!(detail["updated_at"], history[2]["occurred_at"]);
    assert_eq!(detail["publish_at"], "2099-01-01T00:00:00.123456Z");
    let listed = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
        .unwrap();
    for field in ["created_at", "updated_at", "publish_at"] {
        assert_eq!(listed[field], detail[field], "{field}");
    }
}
