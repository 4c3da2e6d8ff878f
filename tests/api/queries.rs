//! The message list and the state-change feed.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};

/// The ids of every page of `first` (a list path with `limit=5`), following `next_cursor`.
async fn pages_of_five(app: &TestApp, first: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("{first}&cursor={c}"),
            None => first.to_string(),
        };
        let (status, page) = app.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 5);
        seen.extend(items.iter().map(|m| m["id"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return seen,
        }
    }
}

/// A message's profiles are set by its first event: a row continued by later batches
/// (scheduled, then cancelled) is still found by its sender's and its recipients' profiles,
/// and by a profile with another filter (on SQLite through the (profile, message) pairs
/// written with its first row).
#[tokio::test]
async fn a_message_continued_after_its_first_row_is_still_found_by_its_profiles() {
    let app = TestApp::spawn().await;
    let email = app.email_service().await;
    let draft = app
        .compose_email(&email, "Carol@Example.com", json!({}))
        .await;
    let id = draft["id"].as_str().unwrap().to_string();
    app.wait_listed(&id, "draft").await;
    for (path, body, state) in [
        ("schedule", tomorrow(), "scheduled"),
        ("cancel", json!({}), "cancelled"),
    ] {
        let (status, answer) = app.post(&format!("/v1/messages/{id}/{path}"), body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        app.wait_listed(&id, state).await;
    }
    let from = draft["from"]["username"].as_str().unwrap().to_string();
    for query in [
        "profile=carol@example.com".to_string(),
        format!("profile={from}"),
        "profile=CAROL@example.com&state=cancelled".to_string(),
    ] {
        let (status, page) = app.get(&format!("/v1/messages?{query}")).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let ids: Vec<&str> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [id.as_str()], "{query}");
    }
}

#[tokio::test]
async fn list_filters_and_paginates_without_duplicates_or_gaps() {
    let app = TestApp::spawn().await;
    let email = app.email_service().await;
    let x = app.create_service("twitter", "x", "ourbrand").await;
    let mut all = Vec::new();
    for i in 0..23 {
        let extra = if i % 3 == 0 { tomorrow() } else { json!({}) };
        let to = if i % 2 == 0 {
            "alice@example.com"
        } else {
            "bob@example.com"
        };
        all.push(
            app.compose_email(&email, to, extra).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    for i in 0..4 {
        let (status, post) = app
            .post(
                "/v1/messages",
                json!({"service_id": x, "text": format!("post {i}")}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        all.push(post["id"].as_str().unwrap().to_string());
    }
    let last = all.last().unwrap().clone();
    app.wait_listed(&last, "draft").await;

    // Pages of 5 cover everything exactly once, newest first.
    let seen = pages_of_five(&app, "/v1/messages?limit=5").await;
    let mut newest_first = all.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    let count = |path: String| {
        let app = &app;
        async move {
            let (status, body) = app.get(&path).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["items"].as_array().unwrap().len()
        }
    };
    assert_eq!(
        count(format!("/v1/messages?limit=500&service_id={x}")).await,
        4
    );
    assert_eq!(
        count("/v1/messages?limit=500&channel=email".into()).await,
        23
    );
    assert_eq!(
        count("/v1/messages?limit=500&state=scheduled".into()).await,
        8
    );
    assert_eq!(
        count("/v1/messages?limit=500&direction=inbound".into()).await,
        0
    );
    assert_eq!(
        count("/v1/messages?limit=500&profile=alice@example.com".into()).await,
        12
    );
    assert_eq!(
        count("/v1/messages?limit=500&profile=Bob@Example.com".into()).await,
        11
    );
    // A profile's pages (on SQLite read along the profiles table's key) cover its messages
    // exactly once, newest first, as one page of them all does.
    let (_, whole) = app
        .get("/v1/messages?limit=500&profile=alice@example.com")
        .await;
    let whole: Vec<String> = whole["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    let paged = pages_of_five(&app, "/v1/messages?limit=5&profile=ALICE@example.com").await;
    // Alice is the recipient of every other email composed, from the first: newest first.
    let alices: Vec<String> = all.iter().step_by(2).take(12).rev().cloned().collect();
    assert_eq!(paged, alices);
    assert_eq!(whole, alices);
    // Beside another filter too (on SQLite read along the profiles table while the profile
    // is narrow): Alice's drafts are her emails but every third from the first, two pages.
    let paged = pages_of_five(
        &app,
        "/v1/messages?limit=5&profile=Alice@Example.com&state=draft",
    )
    .await;
    let drafts: Vec<String> = (0..23)
        .filter(|i| i % 2 == 0 && i % 3 != 0)
        .rev()
        .map(|i| all[i].clone())
        .collect();
    assert_eq!(drafts.len(), 8);
    assert_eq!(paged, drafts);
    let paged = pages_of_five(
        &app,
        &format!("/v1/messages?limit=5&profile=alice@example.com&channel=email&service_id={email}"),
    )
    .await;
    assert_eq!(paged, alices);

    for bad in [
        "state=shipped",
        "channel=fax",
        "limit=0",
        "limit=x",
        "cursor=zzz",
        "direction=up",
    ] {
        let (status, body) = app.get(&format!("/v1/messages?{bad}")).await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        );
        let field = bad.split('=').next().unwrap();
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{body}"
        );
    }
    // A name that is not a state is answered with the states there are.
    let (_, body) = app.get("/v1/messages?state=Sent").await;
    assert_eq!(
        body["error"]["message"],
        "state: `Sent` is not a message state (one of: draft, scheduled, pending, sent, failed, \
         cancelled, deferred, delivered, opened, clicked, replied, bounced, dropped, \
         spam_reported, unsubscribed, received)"
    );
}

#[tokio::test]
async fn the_feed_has_one_item_per_state_change_with_growing_positions() {
    let app = TestApp::spawn().await;
    let service = app.email_service().await;
    let a = app
        .compose_email(&service, "a@example.com", tomorrow())
        .await;
    let b = app
        .compose_email(&service, "b@example.com", json!({}))
        .await;
    let b_id = b["id"].as_str().unwrap();
    app.post(&format!("/v1/messages/{b_id}/cancel"), json!({}))
        .await;
    // A repeated cancel changes no state and adds no item.
    app.post(&format!("/v1/messages/{b_id}/cancel"), json!({}))
        .await;

    let mut items = Vec::new();
    eventually(|| async {
        let (_, feed) = app.get("/v1/state-changes?limit=2").await;
        feed["items"].as_array().unwrap().len() == 2
    })
    .await;
    let mut after = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Every event projected (looked at before the page is read): the feed then holds all
        // it ever will for these commands.
        let gauges = app.store.gauges().await.unwrap();
        let projected = gauges
            .projection_lag
            .iter()
            .any(|(name, lag)| name == "state_changes" && *lag == 0);
        let (status, feed) = app
            .get(&format!("/v1/state-changes?after={after}&limit=2"))
            .await;
        assert_eq!(status, StatusCode::OK, "{feed}");
        let page = feed["items"].as_array().unwrap().clone();
        if page.is_empty() {
            assert_eq!(feed["next"], after);
            if projected {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the feed is still projecting after 30 s: {items:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        after = feed["next"].as_i64().unwrap();
        items.extend(page);
    }
    assert_eq!(items.len(), 4, "{items:?}");
    let positions: Vec<i64> = items
        .iter()
        .map(|i| i["position"].as_i64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    let changes: Vec<(String, String, String)> = items
        .iter()
        .map(|i| {
            (
                i["message_id"].as_str().unwrap().to_string(),
                i["previous_state"].as_str().unwrap_or("").to_string(),
                i["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let a_id = a["id"].as_str().unwrap().to_string();
    assert_eq!(
        changes,
        vec![
            (a_id.clone(), "".into(), "draft".into()),
            (a_id, "draft".into(), "scheduled".into()),
            (b_id.to_string(), "".into(), "draft".into()),
            (b_id.to_string(), "draft".into(), "cancelled".into()),
        ]
    );
    assert_eq!(items[3]["cause"], "MessageCancelled");
    assert_eq!(items[0]["channel"], "email");
    assert_eq!(items[0]["service_id"], service);
}

#[tokio::test]
async fn every_change_is_recorded_no_earlier_than_it_occurred() {
    let app = TestApp::spawn().await;
    let service = app.email_service().await;
    for n in 0..30 {
        app.compose_email(&service, &format!("r{n}@example.com"), tomorrow())
            .await;
    }
    eventually(|| async {
        let (_, feed) = app.get("/v1/state-changes?limit=500").await;
        feed["items"].as_array().unwrap().len() == 60
    })
    .await;
    let (_, feed) = app.get("/v1/state-changes?limit=500").await;
    let items = feed["items"].as_array().unwrap();
    let time = |item: &serde_json::Value, field: &str| {
        chrono::DateTime::parse_from_rfc3339(item[field].as_str().unwrap()).unwrap()
    };
    for item in items {
        assert!(
            time(item, "recorded_at") >= time(item, "occurred_at"),
            "recorded before it occurred: {item}"
        );
    }
}

#[tokio::test]
async fn a_long_poll_returns_as_soon_as_a_change_lands() {
    let app = TestApp::spawn().await;
    let service = app.email_service().await;
    let (_, feed) = app.get("/v1/state-changes").await;
    assert_eq!(feed["items"].as_array().unwrap().len(), 0);
    assert_eq!(feed["next"], 0);

    let waiter = {
        let client = app.client.clone();
        let url = app.url("/v1/state-changes?after=0&wait=30");
        tokio::spawn(async move {
            let started = Instant::now();
            let r = client.get(url).bearer_auth(API_KEY).send().await.unwrap();
            let (status, body) = read(r).await;
            (status, body, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the poll waits while nothing changes"
    );
    let id = app
        .compose_email(&service, "a@example.com", json!({}))
        .await["id"]
        .clone();
    let (status, body, elapsed) = waiter.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["items"][0]["message_id"], id);
    // Far below the 30 s wait: it returned on the change, not at the deadline.
    assert!(
        elapsed < Duration::from_secs(15),
        "returned after {elapsed:?}"
    );

    // With nothing new, `wait` returns empty when the time is up.
    let (status, body) = app.get("/v1/state-changes?after=1&wait=1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["items"].as_array().unwrap().len(), 0);
    assert_eq!(body["next"], 1);
    // A position the feed never reached (a cursor from before a rebuild, a made-up one) is
    // refused, not waited on: waiting would skip every item up to it.
    let (status, body) = app.get("/v1/state-changes?after=2&wait=1").await;
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
            .starts_with("after: is past the end"),
        "{body}"
    );
    for bad in ["after=-1", "wait=61", "limit=1001"] {
        let (status, body) = app.get(&format!("/v1/state-changes?{bad}")).await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        );
    }
}

/// While the feed has events of the log still to project, a position past its end may be one
/// it served before the database server crashed (its batches do not wait for their WAL flush)
/// and will serve again: up to as many positions past its end as events to come are read as
/// any other (nothing there yet), not refused; further is a 422, and once the feed has caught
/// up, so is any position past its end.
#[tokio::test]
async fn on_postgresql_a_position_a_feed_still_catching_up_may_reach_is_not_refused() {
    use sqlx::Connection;
    let app = TestApp::spawn_on(fresh_postgres_database().await).await;
    let service = app.email_service().await;
    app.compose_email(&service, "a@example.com", json!({}))
        .await;
    eventually(|| async {
        let (_, feed) = app.get("/v1/state-changes").await;
        feed["next"] == 1
    })
    .await;
    // The feed's reader held back, as by a rebuild: a new event waits to be projected.
    // Position 3 is out of reach before and after the feed catches up (one item, one to come).
    let three_is_refused = || async {
        let (status, body) = app.get("/v1/state-changes?after=3").await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        );
    };
    let mut holder = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtext('subscription:' || 'state_changes'))")
        .execute(&mut holder)
        .await
        .unwrap();
    app.compose_email(&service, "b@example.com", json!({}))
        .await;
    let (status, body) = app.get("/v1/state-changes?after=2").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"items": [], "next": 2}));
    three_is_refused().await;
    holder.close().await.unwrap();
    eventually(|| async {
        let (_, feed) = app.get("/v1/state-changes").await;
        feed["next"] == 2
    })
    .await;
    three_is_refused().await;
}

/// PostgreSQL may run a prepared statement with a generic plan (one for any parameters) from
/// its sixth run on: the list's query for a filter must name that filter alone, so that even
/// the generic plan reads through the filter's index instead of walking the whole list from
/// its newest row (what `($1 IS NULL OR state = $1)` for every filter was planned as).
#[tokio::test]
async fn on_postgresql_the_list_is_read_through_the_index_its_filter_has_in_a_generic_plan() {
    use messaging::store::postgres::list_query;
    use messaging::store::ListFilter;
    use messaging_domain::{MessageId, ServiceId};

    let pool = migrated_pool().await;
    // 30k messages over 30 services and six states, with the statistics a vacuum would leave.
    sqlx::query(
        "INSERT INTO message_list \
           (message_id, service_id, channel, direction, state, profiles, message, last_sequence) \
         SELECT gen_random_uuid(), \
                ('00000000-0000-7000-8000-0000000000' || lpad((i % 30)::text, 2, '0'))::uuid, \
                'email', 'outbound', \
                (ARRAY['draft','scheduled','queued','sent','failed','cancelled'])[1 + i % 6], \
                ARRAY['r' || (i % 1000) || '@example.com'], '{}', 1 \
         FROM generate_series(1, 30000) AS i",
    )
    .execute(&pool)
    .await
    .expect("rows");
    sqlx::query("ANALYZE message_list")
        .execute(&pool)
        .await
        .expect("analyze");

    let mut conn = pool.acquire().await.expect("a connection");
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .expect("set");
    let service = ServiceId::from_uuid(
        uuid::Uuid::parse_str("00000000-0000-7000-8000-000000000007").expect("uuid"),
    );
    let before = MessageId::from_uuid(uuid::Uuid::now_v7());
    let by_state = ListFilter {
        state: Some("failed".into()),
        before: Some(before),
        limit: 51,
        ..ListFilter::default()
    };
    let by_service = ListFilter {
        service_id: Some(service),
        limit: 51,
        ..ListFilter::default()
    };
    let cases = [
        (
            list_query("SELECT message::text", &by_state)
                .sql()
                .to_owned(),
            "'failed', '00000000-0000-7000-8000-ffffffffffff', 51",
            "message_list_state",
        ),
        (
            list_query("SELECT message::text", &by_service)
                .sql()
                .to_owned(),
            "'00000000-0000-7000-8000-000000000007', 51",
            "message_list_service",
        ),
    ];
    for (n, (sql, args, index)) in cases.iter().enumerate() {
        sqlx::raw_sql(&format!("PREPARE list_{n} AS {sql}"))
            .execute(&mut *conn)
            .await
            .expect("prepare");
        let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN EXECUTE list_{n}({args})"))
            .fetch_all(&mut *conn)
            .await
            .expect("explain");
        let plan = plan.join("\n");
        assert!(
            plan.contains(&format!("Index Scan using {index}")),
            "{sql}\n{plan}"
        );
        assert!(!plan.contains("Sort"), "{sql}\n{plan}");
    }

    // The test can tell: the form it replaced, planned the same way, does not use the index.
    sqlx::raw_sql(
        "PREPARE old_list AS SELECT message::text FROM message_list \
         WHERE ($1::text IS NULL OR state = $1) AND ($2::uuid IS NULL OR message_id < $2) \
         ORDER BY message_id DESC LIMIT $3",
    )
    .execute(&mut *conn)
    .await
    .expect("prepare");
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN EXECUTE old_list('failed', '00000000-0000-7000-8000-ffffffffffff', 51)",
    )
    .fetch_all(&mut *conn)
    .await
    .expect("explain");
    let plan = plan.join("\n");
    assert!(!plan.contains("message_list_state"), "{plan}");
}

/// A message's history a page at a time: the pages, followed by `next`, are the detail's
/// history exactly (the states before and after each event included), whether or not the
/// message has a snapshot (PostgreSQL takes one of a message with this many events).
#[tokio::test]
async fn a_long_history_is_read_a_page_at_a_time_and_the_pages_are_the_whole_history() {
    let app = TestApp::spawn().await;
    let id = app.email_opened(130).await.to_string();
    let (_, detail) = app.get(&format!("/v1/messages/{id}")).await;
    let whole = detail["history"].as_array().unwrap().clone();
    assert_eq!(whole.len(), 4 + 130);

    let mut paged = Vec::new();
    let mut after = json!(0);
    let mut pages = 0;
    while !after.is_null() {
        let (status, page) = app
            .get(&format!("/v1/messages/{id}/history?after={after}&limit=40"))
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 40);
        paged.extend(items.iter().cloned());
        after = page["next"].clone();
        pages += 1;
        assert!(pages <= 5, "the pages do not end: {page}");
    }
    assert_eq!(pages, 4, "40 + 40 + 40 + 14");
    assert_eq!(paged, whole);

    // Any page starts where it is asked to, with the state the message had there.
    let (_, page) = app
        .get(&format!("/v1/messages/{id}/history?after=3&limit=2"))
        .await;
    assert_eq!(page["items"].as_array().unwrap(), &whole[3..5]);
    assert_eq!(page["next"], 5);
    let (_, page) = app.get(&format!("/v1/messages/{id}/history")).await;
    assert_eq!(page["items"].as_array().unwrap(), &whole[..100]);
    let (status, page) = app
        .get(&format!("/v1/messages/{id}/history?after=134"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page, json!({"items": [], "next": null}));

    // Bad input is named; an unknown message is a 404.
    for (query, field) in [
        ("after=-1", "after"),
        ("after=x", "after"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
    ] {
        let (status, body) = app.get(&format!("/v1/messages/{id}/history?{query}")).await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        );
        assert!(body.to_string().contains(field), "{query}: {body}");
    }
    let unknown = uuid::Uuid::now_v7();
    for query in ["", "?after=5"] {
        let (status, body) = app
            .get(&format!("/v1/messages/{unknown}/history{query}"))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
}
