//! The projections on SQLite, the embedded default: the read models a log projects to, that a
//! rebuild and a replay give the same rows, that a failing batch leaves no trace, that two
//! readers of one subscription take turns, and that the same log projects to the same rows on
//! PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_trait::async_trait;
use chrono::{DateTime, Duration, TimeZone, Utc};
use messaging_domain::*;
use messaging_projections::sqlite::{self, Subscription as SqliteSubscription};
use messaging_projections::{
    BatchOutcome, DeliveryJobs, FeedItem, MessageList, Projection, ProjectionError,
    StateChangeFeed, StoredEvent, Subscription,
};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Sqlite, SqliteConnection, SqlitePool};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Databases

/// A migrated SQLite database in a temporary file, removed with it.
struct Db {
    pool: SqlitePool,
    _dir: tempfile::TempDir,
}

async fn sqlite_db() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("messaging.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal);
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .unwrap();
    Migrator::new(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../migrations/sqlite"
    )))
    .await
    .unwrap()
    .run(&pool)
    .await
    .unwrap();
    Db { pool, _dir: dir }
}

/// The server that holds the test databases, as in the service's API tests.
fn admin_url() -> String {
    std::env::var("MESSAGING_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A migrated PostgreSQL database of its own.
async fn pg_db() -> PgPool {
    let name = format!("messaging_test_{}", uuid::Uuid::now_v7().simple());
    let mut admin = PgConnection::connect(&admin_url())
        .await
        .expect("PostgreSQL must be reachable for the comparison tests (see README)");
    sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
        .execute(&mut admin)
        .await
        .unwrap();
    let options = PgConnectOptions::from_str(&admin_url())
        .unwrap()
        .database(&name);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    Migrator::new(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../migrations/postgres"
    )))
    .await
    .unwrap()
    .run(&pool)
    .await
    .unwrap();
    pool
}

// ---------------------------------------------------------------------------------------------
// A log of real Message events

fn at(ms: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap() + Duration::milliseconds(ms)
}

/// One appended event, as the store appends it: payload is the event's serde JSON, its type
/// the variant's name, version 1.
#[derive(Clone)]
struct Appended {
    aggregate_id: String,
    sequence: i64,
    event: MessageEvent,
    recorded_at: DateTime<Utc>,
}

/// Decides commands against each message's fold, as the store does, and keeps the events.
#[derive(Default)]
struct Log {
    messages: HashMap<String, (Message, i64)>,
    events: Vec<Appended>,
    clock: i64,
}

type Step = Box<dyn Fn(DateTime<Utc>) -> MessageCommand>;

impl Log {
    /// A time after every time so far; recorded times are whole milliseconds, which both
    /// backends keep exactly.
    fn tick(&mut self) -> DateTime<Utc> {
        self.clock += 1_003;
        at(self.clock)
    }

    fn run(&mut self, id: MessageId, step: &Step) {
        let now = self.tick();
        let command = step(now);
        let recorded_at = self.tick();
        let (message, sequence) = self.messages.entry(id.to_string()).or_default();
        let events = message
            .decide(command)
            .unwrap_or_else(|e| panic!("message {id}: {e}"));
        for event in events {
            message.apply_event(event.clone());
            *sequence += 1;
            self.events.push(Appended {
                aggregate_id: id.to_string(),
                sequence: *sequence,
                event,
                recorded_at,
            });
        }
    }

    /// Runs the scripts interleaved, one step of each message in turn.
    fn interleave(&mut self, scripts: Vec<(MessageId, Vec<Step>)>) {
        let longest = scripts.iter().map(|(_, s)| s.len()).max().unwrap_or(0);
        for round in 0..longest {
            for (id, steps) in &scripts {
                if let Some(step) = steps.get(round) {
                    self.run(*id, step);
                }
            }
        }
    }
}

fn email_service() -> ServiceRef {
    ServiceRef {
        id: ServiceId::from_uuid(uuid::Uuid::now_v7()),
        channel: Channel::Email,
        provider: Provider::Sendgrid,
        username: "News@Example.com".into(),
        name: Some("News".into()),
    }
}

fn x_service() -> ServiceRef {
    ServiceRef {
        id: ServiceId::from_uuid(uuid::Uuid::now_v7()),
        channel: Channel::Twitter,
        provider: Provider::X,
        username: "OurBrand".into(),
        name: None,
    }
}

fn compose(service: &ServiceRef, id: MessageId, i: usize, dispatch: Dispatch) -> Step {
    let input = if service.channel == Channel::Email {
        MessageInput {
            // Mixed case and the sender among the recipients: the list keeps each once,
            // lower-cased.
            to: vec![
                Profile::new(format!("Person{i}@Example.com"), None),
                Profile::new("news@example.com", None),
                Profile::new(format!("person{i}@example.com"), None),
            ],
            subject: Some(format!("Subject {i}")),
            text: Some("Hello".into()),
            ..Default::default()
        }
    } else {
        MessageInput {
            text: Some(format!("Post number {i}")),
            ..Default::default()
        }
    };
    let message = build_message(service, input).unwrap();
    Box::new(move |now| {
        let dispatch = match &dispatch {
            Dispatch::At(offset) => Dispatch::At(now + (*offset - at(0))),
            d => d.clone(),
        };
        MessageCommand::Compose(Compose {
            id,
            message: message.clone(),
            dispatch,
            now,
        })
    })
}

/// `Dispatch::At` relative to the compose time.
fn in_minutes(minutes: i64) -> Dispatch {
    Dispatch::At(at(0) + Duration::minutes(minutes))
}

fn fact(id: MessageId, n: u32) -> impl Fn(DateTime<Utc>) -> Fact {
    move |now| Fact {
        fact_id: format!("{id}-{n}"),
        occurred_at: now,
    }
}

/// `n` messages through every path the read models care about: drafts, schedules and
/// reschedules, sends that succeed, fail, are retried, end unknown or are cancelled, provider
/// facts, inbound messages; on two channels.
fn history(n: usize) -> Log {
    let email = email_service();
    let x = x_service();
    let mut scripts: Vec<(MessageId, Vec<Step>)> = Vec::new();
    for i in 0..n {
        let id = MessageId::from_uuid(uuid::Uuid::now_v7());
        let service = if i % 3 == 2 { &x } else { &email };
        let start: Step = Box::new(|now| MessageCommand::StartSendAttempt { now, attempt: 1 });
        let sent = move |pid: String| -> Step {
            Box::new(move |now| MessageCommand::RecordSent {
                provider_message_id: Some(pid.clone()),
                at: now,
            })
        };
        let retry_in = |minutes: i64| -> Step {
            Box::new(move |now| MessageCommand::RecordSendFailure {
                attempt: 1,
                reason: "busy".into(),
                retry_at: Some(now + Duration::minutes(minutes)),
                at: now,
            })
        };
        let steps: Vec<Step> = match i % 11 {
            // A draft, cancelled.
            0 => vec![
                compose(service, id, i, Dispatch::Draft),
                Box::new(|now| MessageCommand::Cancel { now }),
            ],
            // Sent, then opened, delivered and clicked (email facts only on email).
            1 => {
                let mut steps = vec![
                    compose(service, id, i, Dispatch::Now),
                    start,
                    sent(format!("p-{i}")),
                ];
                if service.channel == Channel::Email {
                    let open = fact(id, 1);
                    let open_again = fact(id, 2);
                    let delivered = fact(id, 3);
                    let click = fact(id, 4);
                    steps.push(Box::new(move |now| MessageCommand::RecordDelivery {
                        fact: delivered(now),
                        outcome: DeliveryOutcome::Delivered { response: None },
                    }));
                    steps.push(Box::new(move |now| MessageCommand::RecordOpen {
                        fact: open(now),
                        machine_open: false,
                    }));
                    steps.push(Box::new(move |now| MessageCommand::RecordOpen {
                        fact: open_again(now),
                        machine_open: true,
                    }));
                    steps.push(Box::new(move |now| MessageCommand::RecordClick {
                        fact: click(now),
                        url: Some("https://example.com/a".into()),
                    }));
                }
                steps
            }
            // Scheduled, rescheduled, fired, failed once with a retry, then sent.
            2 => vec![
                compose(service, id, i, in_minutes(60)),
                Box::new(|now| MessageCommand::Schedule {
                    publish_at: now + Duration::minutes(120),
                    now,
                }),
                Box::new(|now| MessageCommand::Send {
                    now,
                    expected_publish_at: None,
                }),
                Box::new(|now| MessageCommand::StartSendAttempt { now, attempt: 1 }),
                retry_in(5),
                Box::new(|now| MessageCommand::StartSendAttempt { now, attempt: 2 }),
                sent(format!("p-{i}")),
            ],
            // Scheduled, then cancelled.
            3 => vec![
                compose(service, id, i, in_minutes(30)),
                Box::new(|now| MessageCommand::Cancel { now }),
            ],
            // Failed twice, the second time for good.
            4 => vec![
                compose(service, id, i, Dispatch::Now),
                start,
                retry_in(1),
                Box::new(|now| MessageCommand::StartSendAttempt { now, attempt: 2 }),
                Box::new(|now| MessageCommand::RecordSendFailure {
                    attempt: 2,
                    reason: "rejected".into(),
                    retry_at: None,
                    at: now,
                }),
            ],
            // Unknown outcome, settled as not posted, sent again.
            5 => vec![
                compose(service, id, i, Dispatch::Now),
                start,
                Box::new(|now| MessageCommand::RecordSendOutcomeUnknown {
                    attempt: 1,
                    reason: "timeout".into(),
                    at: now,
                }),
                Box::new(|now| MessageCommand::ResolveSendOutcome {
                    posted: false,
                    provider_message_id: None,
                    send_again: true,
                    at: now,
                }),
                Box::new(|now| MessageCommand::StartSendAttempt { now, attempt: 2 }),
                sent(format!("p-{i}")),
            ],
            // A draft, or a queued message, scheduled later: still scheduled at the end (and
            // no longer queued).
            6 => vec![
                compose(
                    service,
                    id,
                    i,
                    if (i / 11) % 2 == 0 {
                        Dispatch::Draft
                    } else {
                        Dispatch::Now
                    },
                ),
                Box::new(|now| MessageCommand::Schedule {
                    publish_at: now + Duration::minutes(45),
                    now,
                }),
            ],
            // Queued: still waiting for the sender at the end.
            7 => vec![compose(service, id, i, Dispatch::Now)],
            // Failed with a retry: waiting for it at the end.
            8 => vec![compose(service, id, i, Dispatch::Now), start, retry_in(10)],
            // Unknown outcome settled as not posted: queued again at the end.
            9 => vec![
                compose(service, id, i, Dispatch::Now),
                start,
                Box::new(|now| MessageCommand::RecordSendOutcomeUnknown {
                    attempt: 1,
                    reason: "timeout".into(),
                    at: now,
                }),
                Box::new(|now| MessageCommand::ResolveSendOutcome {
                    posted: false,
                    provider_message_id: None,
                    send_again: true,
                    at: now,
                }),
            ],
            // Received from someone.
            _ => {
                let service = service.clone();
                vec![Box::new(move |now| {
                    MessageCommand::Receive(Receive {
                        id,
                        service: service.clone(),
                        from: Profile::new(format!("Someone{i}"), None),
                        subject: None,
                        text: Some("Hi".into()),
                        in_reply_to: None,
                        provider_message_id: Some(format!("in-{i}")),
                        received_at: now,
                    })
                })]
            }
        };
        scripts.push((id, steps));
    }
    let mut log = Log::default();
    log.interleave(scripts);
    log
}

async fn append_sqlite(pool: &SqlitePool, events: &[Appended]) {
    for e in events {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata, recorded_at) \
             VALUES (?1, ?2, ?3, ?4, '1', ?5, '{}', ?6)",
        )
        .bind(Message::TYPE_NAME)
        .bind(&e.aggregate_id)
        .bind(e.sequence)
        .bind(e.event.type_name())
        .bind(serde_json::to_string(&e.event).unwrap())
        .bind(e.recorded_at)
        .execute(pool)
        .await
        .unwrap();
    }
}

async fn append_pg(pool: &PgPool, events: &[Appended]) {
    for e in events {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata, recorded_at) \
             VALUES ($1, $2, $3, $4, '1', CAST($5 AS json), '{}', $6)",
        )
        .bind(Message::TYPE_NAME)
        .bind(&e.aggregate_id)
        .bind(e.sequence)
        .bind(e.event.type_name())
        .bind(serde_json::to_string(&e.event).unwrap())
        .bind(e.recorded_at)
        .execute(pool)
        .await
        .unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// What the read models should hold, folded here from the log

struct Expected {
    list: BTreeMap<uuid::Uuid, (Message, i64)>,
    feed: Vec<WantItem>,
    scheduled: BTreeMap<uuid::Uuid, DateTime<Utc>>,
    jobs: BTreeMap<uuid::Uuid, DateTime<Utc>>,
}

struct WantItem {
    message_id: uuid::Uuid,
    previous_state: Option<String>,
    state: String,
    cause: String,
    occurred_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
    event_position: i64,
}

fn expected(events: &[Appended]) -> Expected {
    let mut list: BTreeMap<uuid::Uuid, (Message, i64)> = BTreeMap::new();
    let mut feed = Vec::new();
    let mut scheduled = BTreeMap::new();
    let mut jobs = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        let id = uuid::Uuid::parse_str(&e.aggregate_id).unwrap();
        let (message, last) = list.entry(id).or_default();
        let before = message.state();
        message.apply_event(e.event.clone());
        *last = e.sequence;
        let after = message.state();
        if after != before {
            feed.push(WantItem {
                message_id: id,
                previous_state: before.map(|s| s.as_str().to_string()),
                state: after.unwrap().as_str().to_string(),
                cause: e.event.type_name().to_string(),
                occurred_at: e.event.occurred_at(),
                recorded_at: e.recorded_at,
                event_position: i as i64 + 1,
            });
        }
        match &e.event {
            MessageEvent::MessageScheduled { publish_at, .. } => {
                scheduled.insert(id, *publish_at);
                jobs.remove(&id);
            }
            MessageEvent::MessageQueued { queued_at } => {
                scheduled.remove(&id);
                jobs.insert(id, *queued_at);
            }
            MessageEvent::SendRetryRequested { requested_at } => {
                jobs.insert(id, *requested_at);
            }
            MessageEvent::SendAttemptFailed {
                retry_at: Some(retry_at),
                ..
            } => {
                if let Some(due) = jobs.get_mut(&id) {
                    *due = *retry_at;
                }
            }
            MessageEvent::MessageCancelled { .. } => {
                scheduled.remove(&id);
                jobs.remove(&id);
            }
            MessageEvent::MessageSent { .. }
            | MessageEvent::MessageFailed { .. }
            | MessageEvent::SendOutcomeUnknown { .. } => {
                jobs.remove(&id);
            }
            _ => {}
        }
    }
    Expected {
        list,
        feed,
        scheduled,
        jobs,
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the read models back

type ListRow = (
    uuid::Uuid,
    uuid::Uuid,
    String,
    String,
    String,
    Vec<String>,
    serde_json::Value,
    i64,
    Option<String>,
);
/// The message list as SQLite stores it: profiles and message as JSON text.
type SqliteListRow = (
    uuid::Uuid,
    uuid::Uuid,
    String,
    String,
    String,
    String,
    String,
    i64,
    Option<String>,
);
type JobRow = (
    uuid::Uuid,
    uuid::Uuid,
    String,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    i32,
);

/// Every read model's rows, decoded, in a backend-independent shape.
#[derive(Debug, PartialEq)]
struct Models {
    list: Vec<ListRow>,
    feed: Vec<(FeedItem, i64)>,
    scheduled: Vec<(uuid::Uuid, DateTime<Utc>, Option<DateTime<Utc>>)>,
    jobs: Vec<JobRow>,
}

const LIST_SQL: &str = "SELECT message_id, service_id, channel, direction, state, profiles, \
     message, last_sequence, provider_message_id FROM message_list ORDER BY message_id";
/// PostgreSQL's `message` is text, as SQLite's: read as JSON to compare the values.
const PG_LIST_SQL: &str = "SELECT message_id, service_id, channel, direction, state, profiles, \
     message::json, last_sequence, provider_message_id FROM message_list ORDER BY message_id";
const FEED_SQL: &str = "SELECT position, message_id, channel, service_id, previous_state, \
     state, cause, occurred_at, recorded_at FROM state_changes ORDER BY position";
const EVENT_POSITIONS_SQL: &str = "SELECT event_position FROM state_changes ORDER BY position";
const SCHEDULED_SQL: &str =
    "SELECT message_id, publish_at, locked_until FROM scheduled_sends ORDER BY message_id";
const JOBS_SQL: &str = "SELECT message_id, service_id, channel, provider, due_at, \
     locked_until, claims FROM send_jobs ORDER BY message_id";

async fn sqlite_models(pool: &SqlitePool) -> Models {
    // The list's (profile, message) pairs are exactly its rows' profiles, both ways.
    let (missing, stray): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM message_list m, json_each(m.profiles) j \
                 WHERE NOT EXISTS (SELECT 1 FROM message_list_profiles p \
                                   WHERE p.profile = j.value AND p.message_id = m.message_id)), \
                (SELECT count(*) FROM message_list_profiles p \
                 WHERE NOT EXISTS (SELECT 1 FROM message_list m, json_each(m.profiles) j \
                                   WHERE m.message_id = p.message_id AND j.value = p.profile))",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((missing, stray), (0, 0), "profile pairs: missing, stray");
    let rows: Vec<SqliteListRow> = sqlx::query_as(LIST_SQL).fetch_all(pool).await.unwrap();
    let list = rows
        .into_iter()
        .map(|r| {
            let profiles: Vec<String> = serde_json::from_str(&r.5).unwrap();
            let message: serde_json::Value = serde_json::from_str(&r.6).unwrap();
            (r.0, r.1, r.2, r.3, r.4, profiles, message, r.7, r.8)
        })
        .collect();
    let items: Vec<FeedItem> = sqlx::query_as(FEED_SQL).fetch_all(pool).await.unwrap();
    let positions: Vec<i64> = sqlx::query_scalar(EVENT_POSITIONS_SQL)
        .fetch_all(pool)
        .await
        .unwrap();
    Models {
        list,
        feed: items.into_iter().zip(positions).collect(),
        scheduled: sqlx::query_as(SCHEDULED_SQL).fetch_all(pool).await.unwrap(),
        jobs: sqlx::query_as(JOBS_SQL).fetch_all(pool).await.unwrap(),
    }
}

async fn pg_models(pool: &PgPool) -> Models {
    let list: Vec<ListRow> = sqlx::query_as(PG_LIST_SQL).fetch_all(pool).await.unwrap();
    let items: Vec<FeedItem> = sqlx::query_as(FEED_SQL).fetch_all(pool).await.unwrap();
    let positions: Vec<i64> = sqlx::query_scalar(EVENT_POSITIONS_SQL)
        .fetch_all(pool)
        .await
        .unwrap();
    Models {
        list,
        feed: items.into_iter().zip(positions).collect(),
        scheduled: sqlx::query_as(SCHEDULED_SQL).fetch_all(pool).await.unwrap(),
        jobs: sqlx::query_as(JOBS_SQL).fetch_all(pool).await.unwrap(),
    }
}

/// The tables exactly as stored, every column as SQLite returns it: for "nothing changed".
async fn raw_tables(pool: &SqlitePool) -> Vec<Vec<String>> {
    let mut tables = Vec::new();
    for (table, order) in [
        ("message_list", "message_id"),
        ("message_list_profiles", "profile, message_id"),
        ("state_changes", "position"),
        ("scheduled_sends", "message_id"),
        ("send_jobs", "message_id"),
    ] {
        // quote() renders any value, blobs included, as an SQL literal.
        let columns: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT 'quote(' || name || ')' FROM pragma_table_info('{table}') ORDER BY cid"
        ))
        .fetch_all(pool)
        .await
        .unwrap();
        let rows: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT {} FROM {table} ORDER BY {order}",
            columns.join(" || ',' || ")
        ))
        .fetch_all(pool)
        .await
        .unwrap();
        tables.push(rows);
    }
    tables
}

async fn checkpoint(pool: &SqlitePool, name: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT last_global_position, events_handled FROM subscription_checkpoints \
         WHERE name = ?1",
    )
    .bind(name)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn catch_up_all(pool: &SqlitePool, batch_size: i64) {
    for projection in sqlite::all() {
        SqliteSubscription::new(pool.clone(), projection)
            .with_batch_size(batch_size)
            .catch_up()
            .await
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn catch_up_projects_the_log_into_every_read_model() {
    let db = sqlite_db().await;
    let log = history(33);
    append_sqlite(&db.pool, &log.events).await;
    let total = log.events.len() as i64;

    for projection in sqlite::all() {
        let name = projection.name();
        assert_eq!(
            sqlite::lag(&db.pool, name).await.unwrap(),
            0,
            "no checkpoint"
        );
        let sub = SqliteSubscription::new(db.pool.clone(), projection).with_batch_size(8);
        sub.ensure_checkpoint().await.unwrap();
        assert_eq!(sqlite::lag(&db.pool, name).await.unwrap(), total);
        assert_eq!(sub.catch_up().await.unwrap(), total as u64, "{name}");
        assert_eq!(sqlite::lag(&db.pool, name).await.unwrap(), 0);
        assert_eq!(checkpoint(&db.pool, name).await, (total, total));
        assert_eq!(sub.run_batch().await.unwrap(), BatchOutcome::Idle);
    }

    let want = expected(&log.events);
    let got = sqlite_models(&db.pool).await;

    assert_eq!(got.list.len(), want.list.len());
    for (row, (id, (message, last_sequence))) in got.list.iter().zip(&want.list) {
        let d = message.data().unwrap();
        let mut profiles: Vec<String> = std::iter::once(&d.from)
            .chain(&d.to)
            .map(|p| p.username.to_lowercase())
            .collect();
        profiles.sort();
        profiles.dedup();
        assert_eq!(row.0, *id);
        assert_eq!(row.1, d.service_id.as_uuid());
        assert_eq!(row.2, d.channel.as_str());
        assert_eq!(row.3, d.direction.as_str());
        assert_eq!(row.4, d.state.as_str());
        assert_eq!(row.5, profiles);
        // The fold, without the provider event ids it has seen (the aggregate's alone).
        let mut stored = serde_json::to_value(d).unwrap();
        stored["seen_facts"] = serde_json::json!([]);
        assert_eq!(row.6, stored);
        assert_eq!(row.7, *last_sequence);
        assert_eq!(row.8, d.provider_message_id);
    }
    // Lower-cased, each once: the sender appears among the recipients in another case.
    let email = got.list.iter().find(|r| r.2 == "email").unwrap();
    assert!(
        email.5.contains(&"news@example.com".to_string()),
        "{:?}",
        email.5
    );
    assert_eq!(email.5.len(), 2, "{:?}", email.5);

    assert_eq!(got.feed.len(), want.feed.len());
    for (n, ((item, event_position), w)) in got.feed.iter().zip(&want.feed).enumerate() {
        assert_eq!(item.position, n as i64 + 1);
        assert_eq!(item.message_id, w.message_id);
        assert_eq!(item.previous_state, w.previous_state);
        assert_eq!(item.state, w.state);
        assert_eq!(item.cause, w.cause);
        assert_eq!(item.occurred_at, w.occurred_at);
        assert_eq!(item.recorded_at, w.recorded_at);
        assert_eq!(*event_position, w.event_position);
        let d = want.list[&w.message_id].0.data().unwrap().clone();
        assert_eq!(item.channel, d.channel.as_str());
        assert_eq!(item.service_id, d.service_id.as_uuid());
    }

    let scheduled: BTreeMap<_, _> = got.scheduled.iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(scheduled, want.scheduled);
    assert!(!scheduled.is_empty());
    assert!(got.scheduled.iter().all(|r| r.2.is_none()));

    let jobs: BTreeMap<_, _> = got.jobs.iter().map(|r| (r.0, r.4)).collect();
    assert_eq!(jobs, want.jobs);
    assert!(
        jobs.len() >= 3,
        "queued, retry due, settled unknown: {jobs:?}"
    );
    for job in &got.jobs {
        let d = want.list[&job.0].0.data().unwrap().clone();
        assert_eq!(job.1, d.service_id.as_uuid());
        assert_eq!(job.2, d.channel.as_str());
        assert_eq!(job.3, d.provider.as_str());
        assert_eq!((job.5, job.6), (None, 0));
    }
}

#[tokio::test]
async fn a_rebuild_gives_identical_rows() {
    let db = sqlite_db().await;
    let log = history(30);
    // Half the log, then the rest: the readers carry state across catch-ups and batches.
    let (first, rest) = log.events.split_at(log.events.len() / 2);
    append_sqlite(&db.pool, first).await;
    catch_up_all(&db.pool, 3).await;
    append_sqlite(&db.pool, rest).await;
    catch_up_all(&db.pool, 5).await;
    let incremental = raw_tables(&db.pool).await;
    assert!(incremental.iter().all(|t| !t.is_empty()));

    for projection in sqlite::all() {
        let name = projection.name();
        let n = SqliteSubscription::new(db.pool.clone(), projection)
            .rebuild()
            .await
            .unwrap();
        assert_eq!(n, log.events.len() as u64, "{name}");
    }
    assert_eq!(raw_tables(&db.pool).await, incremental);
}

/// Batches cut at their payload's bytes (here every event alone) project the same rows as
/// batches of a thousand.
#[tokio::test]
async fn batches_cut_at_their_bytes_project_the_same_rows() {
    let log = history(20);
    let whole = sqlite_db().await;
    append_sqlite(&whole.pool, &log.events).await;
    catch_up_all(&whole.pool, 1000).await;

    let cut = sqlite_db().await;
    append_sqlite(&cut.pool, &log.events).await;
    for projection in sqlite::all() {
        let sub = SqliteSubscription::new(cut.pool.clone(), projection).with_batch_bytes(1);
        assert_eq!(sub.run_batch().await.unwrap(), BatchOutcome::Cut(1));
        sub.catch_up().await.unwrap();
    }
    assert_eq!(raw_tables(&cut.pool).await, raw_tables(&whole.pool).await);
}

#[tokio::test]
async fn handling_batches_again_changes_nothing_where_postgresql_guarantees_it() {
    let db = sqlite_db().await;
    let log = history(22);
    append_sqlite(&db.pool, &log.events).await;
    catch_up_all(&db.pool, 1000).await;
    let before = raw_tables(&db.pool).await;
    let total = log.events.len() as i64;

    // The message list is guarded by each row's last sequence: any batch, again, is a no-op.
    // The delivery rows, replayed in order from zero, end where they were.
    for projection in [
        Arc::new(MessageList::default()) as Arc<dyn Projection<Sqlite>>,
        Arc::new(DeliveryJobs),
    ] {
        let name = projection.name();
        for batch_size in [1, 4, 1000] {
            sqlx::query(
                "UPDATE subscription_checkpoints SET last_global_position = 0 WHERE name = ?1",
            )
            .bind(name)
            .execute(&db.pool)
            .await
            .unwrap();
            let n = SqliteSubscription::new(db.pool.clone(), projection.clone())
                .with_batch_size(batch_size)
                .catch_up()
                .await
                .unwrap();
            assert_eq!(n, total as u64);
            assert_eq!(
                raw_tables(&db.pool).await,
                before,
                "{name}, batches of {batch_size}"
            );
        }
    }

    // The feed numbers each event's item once: a batch handed to it again fails (the event
    // position is unique, on PostgreSQL as here) and leaves the feed and checkpoint as they were.
    sqlx::query(
        "UPDATE subscription_checkpoints SET last_global_position = 3 WHERE name = 'state_changes'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let feed = SqliteSubscription::new(db.pool.clone(), Arc::new(StateChangeFeed::new()));
    let error = feed.run_batch().await.unwrap_err();
    assert!(error.to_string().contains("UNIQUE"), "{error}");
    assert_eq!(raw_tables(&db.pool).await, before);
    assert_eq!(checkpoint(&db.pool, "state_changes").await.0, 3);
}

/// Fails after handling `remaining` events (across batches): a crash in the middle of a
/// batch, after its first events were written.
struct CrashAfter {
    inner: Arc<dyn Projection<Sqlite>>,
    remaining: AtomicUsize,
}

#[async_trait]
impl Projection<Sqlite> for CrashAfter {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn handle_batch(
        &self,
        conn: &mut SqliteConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        let handled = events.len().min(self.remaining.load(Ordering::SeqCst));
        self.remaining.fetch_sub(handled, Ordering::SeqCst);
        if handled > 0 {
            self.inner.handle_batch(conn, &events[..handled]).await?;
        }
        if handled < events.len() {
            return Err(ProjectionError::Other("crashed mid-batch".into()));
        }
        Ok(())
    }
    async fn reset(&self, conn: &mut SqliteConnection) -> Result<(), ProjectionError> {
        self.inner.reset(conn).await
    }
}

#[tokio::test]
async fn a_failing_batch_rolls_back_both_the_model_and_the_checkpoint() {
    let db = sqlite_db().await;
    let log = history(25);
    append_sqlite(&db.pool, &log.events).await;

    for projection in sqlite::all() {
        let name = projection.name();
        // One good batch, then one that crashes after writing part of its events.
        let good = SqliteSubscription::new(db.pool.clone(), projection.clone()).with_batch_size(9);
        assert_eq!(good.run_batch().await.unwrap(), BatchOutcome::Handled(9));
        let tables = raw_tables(&db.pool).await;
        let commits = Arc::new(AtomicUsize::new(0));
        let counted = commits.clone();
        let crashing = SqliteSubscription::new(
            db.pool.clone(),
            Arc::new(CrashAfter {
                inner: projection.clone(),
                remaining: AtomicUsize::new(5),
            }),
        )
        .with_batch_size(9)
        .on_commit(Arc::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        }));
        let error = crashing.run_batch().await.unwrap_err();
        assert!(error.to_string().contains("crashed"), "{name}: {error}");
        assert_eq!(
            raw_tables(&db.pool).await,
            tables,
            "{name}: nothing written"
        );
        assert_eq!(checkpoint(&db.pool, name).await, (9, 9), "{name}");
        assert_eq!(commits.load(Ordering::SeqCst), 0, "no commit, no wake-up");

        // Killed wherever it is, a running reader leaves a consistent state too.
        let (_wake_tx, wake) = tokio::sync::watch::channel(0u64);
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let running = tokio::spawn(
            SqliteSubscription::new(db.pool.clone(), projection.clone())
                .with_batch_size(4)
                .run(wake, stop),
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        running.abort();
        let _ = running.await;
        // Restarted, it carries on from its checkpoint.
        good.catch_up().await.unwrap();
    }
    let resumed = raw_tables(&db.pool).await;

    // An event no projection can read stops the batch holding it, good events before it
    // included.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) VALUES (?1, ?2, 99, 'MessageQueued', '7', '{}', '{}')",
    )
    .bind(Message::TYPE_NAME)
    .bind(&log.events[0].aggregate_id)
    .execute(&db.pool)
    .await
    .unwrap();
    let list = SqliteSubscription::new(db.pool.clone(), Arc::new(MessageList::default()));
    let error = list.run_batch().await.unwrap_err();
    assert!(
        matches!(error, ProjectionError::UnknownVersion { .. }),
        "{error}"
    );
    assert_eq!(raw_tables(&db.pool).await, resumed);
    let total = log.events.len() as i64;
    assert_eq!(checkpoint(&db.pool, "message_list").await.0, total);
    assert_eq!(sqlite::lag(&db.pool, "message_list").await.unwrap(), 1);

    // Without the unreadable event, a rebuild from zero gives what the crashes left.
    let fresh = sqlite_db().await;
    append_sqlite(&fresh.pool, &log.events).await;
    catch_up_all(&fresh.pool, 1000).await;
    assert_eq!(raw_tables(&fresh.pool).await, resumed);
}

#[tokio::test]
async fn a_reader_cancelled_anywhere_never_leaves_the_write_lock_held() {
    let db = sqlite_db().await;
    // Few connections, so that one a cancelled reader spoiled is soon reused, and a short
    // busy timeout, so that a held lock fails fast.
    let options = SqliteConnectOptions::new()
        .filename(db._dir.path().join("messaging.db"))
        .busy_timeout(std::time::Duration::from_millis(500));
    let pool = SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .unwrap();
    let log = history(11);
    append_sqlite(&pool, &log.events).await;
    for i in 0..300 {
        let sub = SqliteSubscription::new(pool.clone(), Arc::new(MessageList::default()))
            .with_batch_size(2);
        let running = tokio::spawn(async move { sub.run_batch().await });
        // Cancelled after a varying number of steps: before, within and after the begin.
        for _ in 0..i % 40 {
            tokio::task::yield_now().await;
        }
        running.abort();
        let _ = running.await;
        let tx = sqlite::begin_immediate(&pool)
            .await
            .unwrap_or_else(|e| panic!("after a reader cancelled at step {}: {e}", i % 40));
        tx.commit().await.unwrap();
        if i % 40 == 39 {
            sqlx::query("UPDATE subscription_checkpoints SET last_global_position = 0")
                .execute(&pool)
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
async fn on_commit_follows_each_batch_that_handled_events() {
    let db = sqlite_db().await;
    let log = history(12);
    append_sqlite(&db.pool, &log.events).await;
    let total = log.events.len();
    let commits = Arc::new(AtomicUsize::new(0));
    let counted = commits.clone();
    let sub = SqliteSubscription::new(db.pool.clone(), Arc::new(DeliveryJobs))
        .with_batch_size(5)
        .on_commit(Arc::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        }));
    assert_eq!(sub.catch_up().await.unwrap(), total as u64);
    assert_eq!(commits.load(Ordering::SeqCst), total.div_ceil(5));
    // Idle batches call nothing.
    assert_eq!(sub.run_batch().await.unwrap(), BatchOutcome::Idle);
    assert_eq!(commits.load(Ordering::SeqCst), total.div_ceil(5));
}

#[tokio::test]
async fn a_running_reader_wakes_on_its_channel_and_stops_on_shutdown() {
    let db = sqlite_db().await;
    let log = history(11);
    let (first, rest) = log.events.split_at(10);
    append_sqlite(&db.pool, first).await;
    let committed = Arc::new(tokio::sync::Notify::new());
    let notify = committed.clone();
    let (wake_tx, wake) = tokio::sync::watch::channel(0u64);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let reader = tokio::spawn(
        SqliteSubscription::new(db.pool.clone(), Arc::new(MessageList::default()))
            // Only the wake-up channel can start a second batch within the test's time.
            .with_poll_interval(std::time::Duration::from_secs(600))
            .on_commit(Arc::new(move || notify.notify_one()))
            .run(wake, stop),
    );
    let within = std::time::Duration::from_secs(5);
    tokio::time::timeout(within, committed.notified())
        .await
        .expect("the first batch is handled at start");
    assert_eq!(sqlite::lag(&db.pool, "message_list").await.unwrap(), 0);

    // Once the reader is idle, new events wait for a wake-up (the poll is ten minutes away).
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    append_sqlite(&db.pool, rest).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(
        sqlite::lag(&db.pool, "message_list").await.unwrap(),
        rest.len() as i64
    );
    wake_tx.send_modify(|n| *n += 1);
    tokio::time::timeout(within, committed.notified())
        .await
        .expect("woken by the channel");
    assert_eq!(sqlite::lag(&db.pool, "message_list").await.unwrap(), 0);

    stop_tx.send(true).unwrap();
    tokio::time::timeout(within, reader)
        .await
        .expect("stops on shutdown")
        .unwrap();
}

/// Records every event it is handed, in the order handed.
struct Recorder;

#[async_trait]
impl Projection<Sqlite> for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    async fn handle_batch(
        &self,
        conn: &mut SqliteConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        for e in events {
            // The unique key makes a second delivery of one event fail the batch loudly.
            sqlx::query("INSERT INTO recorded (global_position) VALUES (?1)")
                .bind(e.global_position)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
    async fn reset(&self, conn: &mut SqliteConnection) -> Result<(), ProjectionError> {
        sqlx::query("DELETE FROM recorded").execute(conn).await?;
        Ok(())
    }
}

#[tokio::test]
async fn concurrent_writers_and_two_readers_see_each_event_once_in_order() {
    let db = sqlite_db().await;
    sqlx::query(
        "CREATE TABLE recorded (seq INTEGER PRIMARY KEY AUTOINCREMENT, \
         global_position INTEGER UNIQUE NOT NULL)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let sub = SqliteSubscription::new(db.pool.clone(), Arc::new(Recorder)).with_batch_size(16);
    sub.ensure_checkpoint().await.unwrap();
    const WRITERS: usize = 4;
    const TRANSACTIONS: usize = 30;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                let mut written = 0;
                for t in 0..TRANSACTIONS {
                    let mut tx = sqlite::begin_immediate(&pool).await.unwrap();
                    let n = 1 + (w + t) % 3;
                    for i in 0..n {
                        sqlx::query(
                            "INSERT INTO events (aggregate_type, aggregate_id, sequence, \
                             event_type, event_version, payload, metadata) \
                             VALUES ('Probe', ?1, ?2, 'Probed', '1', '{}', '{}')",
                        )
                        .bind(format!("w{w}-t{t}"))
                        .bind(i as i64 + 1)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    }
                    // Hold some transactions open while the others wait.
                    tokio::time::sleep(std::time::Duration::from_millis(
                        ((w * 7 + t * 13) % 4) as u64,
                    ))
                    .await;
                    tx.commit().await.unwrap();
                    written += n;
                }
                written
            })
        })
        .collect();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let sub = sub.clone();
            tokio::spawn(async move {
                for _ in 0..150 {
                    let outcome = sub.run_batch().await.expect("a batch never fails");
                    assert!(
                        matches!(outcome, BatchOutcome::Handled(_) | BatchOutcome::Idle),
                        "{outcome:?}"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            })
        })
        .collect();
    let mut total = 0;
    for w in writers {
        total += w.await.unwrap();
    }
    for r in readers {
        r.await.unwrap();
    }
    sub.catch_up().await.unwrap();

    let seen: Vec<i64> = sqlx::query_scalar("SELECT global_position FROM recorded ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(seen.len(), total, "every event exactly once");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in position order");
    assert_eq!(
        checkpoint(&db.pool, "recorder").await,
        (seen[total - 1], total as i64)
    );
}

#[tokio::test]
async fn the_same_log_projects_to_the_same_rows_on_postgresql_and_sqlite() {
    let log = history(44);
    let db = sqlite_db().await;
    let pg = pg_db().await;
    append_sqlite(&db.pool, &log.events).await;
    append_pg(&pg, &log.events).await;

    // Different batch sizes: the rows do not depend on how the log was cut.
    catch_up_all(&db.pool, 3).await;
    for projection in messaging_projections::all() {
        Subscription::new(pg.clone(), projection)
            .catch_up()
            .await
            .unwrap();
    }
    let on_sqlite = sqlite_models(&db.pool).await;
    let on_pg = pg_models(&pg).await;
    assert_eq!(on_sqlite.list.len(), 44);
    assert!(!on_sqlite.feed.is_empty());
    assert!(!on_sqlite.scheduled.is_empty());
    assert!(!on_sqlite.jobs.is_empty());
    assert_eq!(on_sqlite, on_pg);

    for name in ["message_list", "state_changes", "delivery"] {
        assert_eq!(
            sqlite::lag(&db.pool, name).await.unwrap(),
            messaging_projections::subscription::lag(&pg, name)
                .await
                .unwrap()
        );
    }

    // The store's reads: one message's events and its fold, whole or up to a sequence.
    let mut sqlite_conn = db.pool.acquire().await.unwrap();
    let mut pg_conn = pg.acquire().await.unwrap();
    let ids: Vec<String> = log.messages.keys().cloned().collect();
    for id in &ids {
        for up_to in [None, Some(1), Some(3)] {
            let a = sqlite::message_events(&mut sqlite_conn, id, up_to)
                .await
                .unwrap();
            let b = messaging_projections::event::message_events(&mut pg_conn, id, up_to)
                .await
                .unwrap();
            let key = |e: &StoredEvent| {
                (
                    e.global_position,
                    e.sequence,
                    e.event_type.clone(),
                    e.payload.clone(),
                    e.recorded_at,
                    e.message_event().unwrap(),
                )
            };
            assert_eq!(
                a.iter().map(key).collect::<Vec<_>>(),
                b.iter().map(key).collect::<Vec<_>>()
            );
            let folded = sqlite::load_message(&mut sqlite_conn, id, up_to)
                .await
                .unwrap();
            assert_eq!(
                folded,
                messaging_projections::load_message(&mut pg_conn, id, up_to)
                    .await
                    .unwrap()
            );
            if up_to.is_none() {
                assert_eq!(&folded, &log.messages[id].0);
            }
        }
    }
    let wanted: Vec<(String, i64)> = ids.iter().map(|id| (id.clone(), 3)).collect();
    assert_eq!(
        sqlite::load_messages_before(&mut sqlite_conn, &wanted)
            .await
            .unwrap(),
        messaging_projections::event::load_messages_before(&mut pg_conn, &wanted)
            .await
            .unwrap()
    );
}

/// The feed's and the delivery projection's read of messages before a batch starts from a
/// message's snapshot from before the wanted sequence (a planted one that counts differently
/// shows through), passes over one from at or after it, one of another fold version and one
/// that cannot be read (the batch is then read from every message's first event), and gives
/// a message without one its fold from its first event.
#[tokio::test]
async fn the_read_before_a_batch_starts_from_a_snapshot_taken_before_it() {
    let db = sqlite_db().await;
    let email = email_service();
    let (long, short) = (
        MessageId::from_uuid(uuid::Uuid::now_v7()),
        MessageId::from_uuid(uuid::Uuid::now_v7()),
    );
    let mut log = Log::default();
    for id in [long, short] {
        log.run(id, &compose(&email, id, 0, Dispatch::Now));
        log.run(
            id,
            &(Box::new(|now| MessageCommand::StartSendAttempt { now, attempt: 1 }) as Step),
        );
        let sent: Step = Box::new(|now| MessageCommand::RecordSent {
            provider_message_id: Some("sg".into()),
            at: now,
        });
        log.run(id, &sent);
    }
    for n in 0..10 {
        let open = fact(long, n);
        let step: Step = Box::new(move |now| MessageCommand::RecordOpen {
            fact: open(now),
            machine_open: false,
        });
        log.run(long, &step);
    }
    append_sqlite(&db.pool, &log.events).await;
    let last = |id: MessageId| log.messages[&id.to_string()].1;
    let (long_last, short_last) = (last(long), last(short));
    // The fold through sequence `through`, as a snapshot would hold it, with `opens` set.
    let fold_through = |through: i64, opens: u32| {
        let mut message = Message::default();
        for e in log
            .events
            .iter()
            .filter(|e| e.aggregate_id == long.to_string() && e.sequence <= through)
        {
            message.apply_event(e.event.clone());
        }
        let mut value = serde_json::to_value(&message).unwrap();
        value["data"]["opens"] = opens.into();
        value.to_string()
    };
    let plant = |sequence: i64, version: i32, fold: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO message_snapshots (aggregate_id, sequence, fold_version, fold) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (aggregate_id) DO UPDATE \
                 SET sequence = excluded.sequence, fold_version = excluded.fold_version, \
                     fold = excluded.fold",
            )
            .bind(long.to_string())
            .bind(sequence)
            .bind(version)
            .bind(fold)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    let opens_before = |through: i64| {
        let pool = db.pool.clone();
        let wanted = vec![
            (long.to_string(), through),
            (short.to_string(), short_last + 1),
        ];
        async move {
            let mut conn = pool.acquire().await.unwrap();
            let read = sqlite::event::load_messages_before(&mut conn, &wanted)
                .await
                .unwrap();
            let short_state = read[&short.to_string()].data().map(|d| d.state);
            assert_eq!(
                short_state,
                Some(MessageState::Sent),
                "the other message, from its first event"
            );
            read[&long.to_string()].data().map(|d| d.opens).unwrap()
        }
    };
    assert_eq!(
        opens_before(long_last + 1).await,
        10,
        "no snapshot: every event"
    );
    // Composed and queued, attempt, sent: the opens are sequences 5 to 14. A snapshot through
    // sequence 8 (4 opens) counting 100: the events after it add the other 6.
    assert_eq!(long_last, 14);
    plant(8, Message::FOLD_VERSION, fold_through(8, 100)).await;
    assert_eq!(opens_before(long_last + 1).await, 106);
    assert_eq!(
        opens_before(9).await,
        100,
        "a snapshot just before the wanted sequence"
    );
    assert_eq!(
        opens_before(8).await,
        3,
        "one at the wanted sequence is passed over"
    );
    plant(8, 0, fold_through(8, 100)).await;
    assert_eq!(
        opens_before(long_last + 1).await,
        10,
        "another fold version"
    );
    plant(8, Message::FOLD_VERSION, "not json".into()).await;
    assert_eq!(opens_before(long_last + 1).await, 10, "an unreadable one");
}
