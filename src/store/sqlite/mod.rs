//! The embedded backend: one SQLite file in WAL mode, for trying the service, development and
//! small single-node deployments.
//!
//! Writes go through a pool of one connection, so they are serialized inside the process and
//! never meet `database is locked`; reads use their own pool and never wait for a writer (WAL).
//! One process owns the file (an exclusive lock file next to it says so at start-up), so the
//! leases and claims PostgreSQL needs across instances reduce to plain updates here.

use crate::metrics::Metrics;
use crate::notify::Bell;
use crate::store::commands::MessageCqrs;
use crate::store::{
    CommandError, FactSettlement, Gauges, IdempotencyClaim, ListFilter, NewSubscription,
    PendingFact, PerService, PushDue, PushSubscription, ScheduledSend, SendJob, Service, Store,
    StoreError,
};
use crate::webhooks::inbox::{InboxFact, Problematic};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::persist::{
    PersistedEventRepository, PersistedEventStore, PersistenceError, ReplayStream, SerializedEvent,
    SerializedSnapshot,
};
use cqrs_es::{Aggregate, CqrsFramework};
use messaging_domain::{Channel, Message, MessageCommand, MessageData, MessageId, ServiceId};
use messaging_projections::sqlite::begin_immediate;
use messaging_projections::{FeedItem, HistoryItem};
use serde_json::Value;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::types::Json;
use sqlx::Row;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

mod commands;
mod gauges;
mod inbox;
mod jobs;
mod push;

/// Ends every lease in the file: called at start-up, once this process holds the file's lock,
/// so every lease found was taken by a process that is gone (one process per file). Its
/// fired schedules, claimed send jobs and leased webhook facts are then taken up at once
/// instead of when their leases run out (up to 30 s for a schedule). A send job whose
/// attempt had started is still recovered only once no call can be running (the sender's
/// `call_outlived_after`). A push delivery's lease is released on a subscription without
/// failures only: on one that failed it is not told apart from the retry's back-off. Returns
/// how many rows were released.
pub async fn release_leases_of_the_dead(pools: &SqlitePools) -> Result<u64, StoreError> {
    let now = crate::clock::now();
    let mut tx = begin_immediate(&pools.write).await?;
    let mut released = 0;
    released += sqlx::query(
        "UPDATE scheduled_sends SET locked_until = NULL WHERE locked_until IS NOT NULL",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // A claim moved the job's due time to its lease's end: due now instead.
    released += sqlx::query(
        "UPDATE send_jobs SET locked_until = NULL, \
                due_at = CASE WHEN due_at > ?1 THEN ?1 ELSE due_at END \
         WHERE locked_until IS NOT NULL",
    )
    .bind(now)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    released += sqlx::query(
        "UPDATE webhook_inbox SET locked_until = NULL \
         WHERE locked_until IS NOT NULL AND status = 'pending'",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // A push delivery's lease is its subscription's next attempt moved ahead; a subscription
    // without failures has no other reason to wait (one that failed keeps its back-off, which
    // its lease may also be: it cannot be told apart, and a restart must not hurry a retry).
    released += sqlx::query(
        "UPDATE subscriptions SET next_attempt_at = ?1 \
         WHERE failures = 0 AND next_attempt_at > ?1",
    )
    .bind(now)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(released)
}

/// A profile filter with another one beside it is read along the profiles table when the
/// profile has fewer pairs than this (before the page's cursor): then at most this many rows
/// are looked at, whatever the other filter. A profile with more (the sender's own address is
/// in every message it sent) leaves the page to the other filter's index, as before.
const NARROW_PROFILE: i64 = 1000;

/// Whether `f`'s profile is read along `message_list_profiles` (see [`list_query`]): alone,
/// always; beside another filter, when it has fewer than `narrow` pairs before the cursor (a
/// count that stops at `narrow`).
async fn walk_profile(pool: &SqlitePool, f: &ListFilter, narrow: i64) -> Result<bool, sqlx::Error> {
    let Some(username) = f.profile.as_deref() else {
        return Ok(false);
    };
    if !f.has_column_filters() {
        return Ok(true);
    }
    let before = f.before.map_or(uuid::Uuid::max(), |b| b.as_uuid());
    let (pairs,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM (SELECT 1 FROM message_list_profiles \
         WHERE profile = ?1 AND message_id < ?2 LIMIT ?3)",
    )
    .bind(username.to_lowercase())
    .bind(before)
    .bind(narrow)
    .fetch_one(pool)
    .await?;
    Ok(pairs < narrow)
}

/// The message list's query on SQLite (see [`crate::store::list_query`]): `profiles` is a
/// JSON array. With `by_profile` (see [`walk_profile`]), the page is read along
/// `message_list_profiles`'s key instead (one range of it, newest first: see its migration),
/// each row joined by its key and checked against the other filters; `select` then names
/// columns of `message_list` that the profiles table does not have. (The table's migration
/// says a profile beside another filter is read through that filter's index: so it was
/// before [`walk_profile`], and an applied migration is never edited.)
fn list_query<'a>(
    select: &str,
    f: &'a ListFilter,
    by_profile: bool,
) -> sqlx::QueryBuilder<'a, sqlx::Sqlite> {
    if let (Some(username), true) = (f.profile.as_deref(), by_profile) {
        let mut q = sqlx::QueryBuilder::new(select);
        // CROSS JOIN: SQLite keeps that order, the profile's range outermost.
        q.push(
            " FROM message_list_profiles p CROSS JOIN message_list m \
             ON m.message_id = p.message_id WHERE p.profile = ",
        )
        .push_bind(username.to_lowercase());
        crate::store::push_column_filters(&mut q, f, "m.");
        if let Some(before) = f.before {
            q.push(" AND p.message_id < ").push_bind(before.as_uuid());
        }
        q.push(" ORDER BY p.message_id DESC LIMIT ")
            .push_bind(f.limit);
        return q;
    }
    crate::store::list_query(
        select,
        f,
        (
            "EXISTS (SELECT 1 FROM json_each(profiles) WHERE value = ",
            ")",
        ),
    )
}

pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// `now` + `by`, for leases and retry times (written from Rust so that every stored time has
/// the same text form, and text order is time order).
/// Clamped to the year 9999: later years print with a sign, which would break text order.
fn later(now: DateTime<Utc>, by: Duration) -> DateTime<Utc> {
    let end = chrono::NaiveDate::from_ymd_opt(9999, 12, 31)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(DateTime::<Utc>::MAX_UTC, |t| t.and_utc());
    crate::clock::after(now, by).map_or(end, |t| t.min(end))
}

/// A stored time read back through an SQL aggregate (which loses the column's type).
fn parse_time(text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::new(format!("stored time `{text}`: {e}")))
}

/// The two pools over one file: every write through `write` (one connection), reads through
/// `read`.
#[derive(Clone)]
pub struct SqlitePools {
    pub write: SqlitePool,
    pub read: SqlitePool,
}

impl SqlitePools {
    /// Opens (creating if missing) the database file in WAL mode.
    pub async fn open(path: &Path, readers: u32) -> Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before it is acknowledged (a webhook's 2xx promises
            // the fact is kept), power cut included.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        // The writer stays open: it keeps the WAL and its index alive for the read-only
        // readers.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await?;
        let read = SqlitePoolOptions::new()
            .max_connections(readers.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self { write, read })
    }
}

/// cqrs-es' event repository over the SQLite `events` table.
///
/// Not the third-party `sqlite-es` crate: its table has no global position (a bare rowid,
/// which VACUUM may renumber, is all a reader could checkpoint), and it recognises a
/// concurrent append only by the primary-key error code. Event-store mode only.
pub struct SqliteEventRepository {
    write: SqlitePool,
    read: SqlitePool,
    /// Rung at each commit, here rather than by the caller: a caller dropped after the
    /// commit (a client that went away) would leave the readers to their next poll.
    bell: Bell,
}

const SELECT_EVENTS: &str = "SELECT aggregate_type, aggregate_id, sequence, event_type, \
     event_version, payload, metadata FROM events \
     WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND sequence > ?3 ORDER BY sequence";

fn unknown(e: impl std::error::Error + Send + Sync + 'static) -> PersistenceError {
    PersistenceError::UnknownError(Box::new(e))
}

impl SqliteEventRepository {
    async fn select<A: Aggregate>(
        &self,
        aggregate_id: &str,
        after: i64,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let rows = sqlx::query(SELECT_EVENTS)
            .bind(A::TYPE)
            .bind(aggregate_id)
            .bind(after)
            .fetch_all(&self.read)
            .await
            .map_err(|e| PersistenceError::ConnectionError(Box::new(e)))?;
        rows.iter()
            .map(|row| {
                let sequence: i64 = row.try_get("sequence").map_err(unknown)?;
                let Json(payload): Json<Value> = row.try_get("payload").map_err(unknown)?;
                let Json(metadata): Json<Value> = row.try_get("metadata").map_err(unknown)?;
                Ok(SerializedEvent {
                    aggregate_id: row.try_get("aggregate_id").map_err(unknown)?,
                    sequence: sequence as usize,
                    aggregate_type: row.try_get("aggregate_type").map_err(unknown)?,
                    event_type: row.try_get("event_type").map_err(unknown)?,
                    event_version: row.try_get("event_version").map_err(unknown)?,
                    payload,
                    metadata,
                })
            })
            .collect()
    }
}

impl PersistedEventRepository for SqliteEventRepository {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.select::<A>(aggregate_id, -1).await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.select::<A>(aggregate_id, last_sequence as i64).await
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        _aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        Ok(None)
    }

    /// Appends in one transaction; another writer's event at the same sequence makes it an
    /// optimistic-lock error, which the caller answers by deciding again.
    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        if snapshot_update.is_some() {
            return Err(PersistenceError::UnknownError(
                "snapshots are not used with the SQLite backend".into(),
            ));
        }
        let conflict = |e: sqlx::Error| match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                PersistenceError::OptimisticLockError
            }
            _ => PersistenceError::ConnectionError(Box::new(e)),
        };
        let mut tx = begin_immediate(&self.write).await.map_err(conflict)?;
        // The time of recording to the microsecond, as PostgreSQL's `now()` has it, taken once
        // the write lock is held: the column's default (`strftime`) has milliseconds, which put
        // an event recorded in the millisecond it occurred before its occurrence.
        let recorded_at = crate::clock::now();
        for event in events {
            sqlx::query(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                 event_version, payload, metadata, recorded_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .bind(&event.aggregate_type)
            .bind(&event.aggregate_id)
            .bind(event.sequence as i64)
            .bind(&event.event_type)
            .bind(&event.event_version)
            .bind(Json(&event.payload))
            .bind(Json(&event.metadata))
            .bind(recorded_at)
            .execute(&mut *tx)
            .await
            .map_err(conflict)?;
        }
        tx.commit().await.map_err(conflict)?;
        self.bell.events();
        Ok(())
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        let events = self.get_events::<A>(aggregate_id).await?;
        replay(events).await
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        Err(PersistenceError::UnknownError(
            "replaying every aggregate through cqrs-es is not used: projections are durable \
             subscriptions"
                .into(),
        ))
    }
}

async fn replay(events: Vec<SerializedEvent>) -> Result<ReplayStream, PersistenceError> {
    let (mut feed, stream) = ReplayStream::new(events.len().max(1));
    for event in events {
        // The stream's buffer holds them all: this never waits.
        if feed.push(Ok(event)).await.is_err() {
            break;
        }
    }
    Ok(stream)
}

pub struct SqliteStore {
    pools: SqlitePools,
    cqrs: MessageCqrs<SqliteEventRepository>,
    metrics: Option<Arc<Metrics>>,
    /// Rings this process's readers after a commit (there is no NOTIFY).
    bell: Bell,
    /// Commands on one message take turns through its stripe: each is decided against the
    /// fold the one before it left (two deciding at once would collide on the log's key and
    /// one would go through cqrs-es), and [`Store::execute_and_load`] answers with the message
    /// as its own command left it.
    stripes: Vec<tokio::sync::Mutex<()>>,
}

/// Stripes of [`SqliteStore::stripes`]: commands on different messages rarely share one.
const STRIPES: usize = 64;

impl SqliteStore {
    fn stripe(&self, id: MessageId) -> &tokio::sync::Mutex<()> {
        let index = (id.as_uuid().as_u128() % STRIPES as u128) as usize;
        &self.stripes[index]
    }

    pub fn new(pools: SqlitePools, bell: Bell) -> Self {
        let repo = SqliteEventRepository {
            write: pools.write.clone(),
            read: pools.read.clone(),
            bell: bell.clone(),
        };
        let cqrs = CqrsFramework::new(PersistedEventStore::new_event_store(repo), vec![], ());
        Self {
            pools,
            cqrs,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            metrics: None,
            bell,
        }
    }

    /// Counts commands by type and outcome, and the events they append.
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        Self {
            cqrs: self.cqrs.append_query(metrics.event_counter()),
            metrics: Some(metrics),
            ..self
        }
    }

    pub fn pools(&self) -> &SqlitePools {
        &self.pools
    }
}

/// A subscription with its lag: feed items after its cursor.
const SUBSCRIPTION_VIEW: &str = "SELECT s.id, s.url, s.states, s.channels, s.cursor, \
       MAX((SELECT COALESCE(MAX(position), 0) FROM state_changes) - s.cursor, 0) AS lag, \
       s.delivered, s.failures, s.last_error, s.last_attempt_at, s.next_attempt_at, s.created_at \
     FROM subscriptions s";

/// A page of webhook facts that could not be used, newest first, before id `?1` (all when
/// NULL): a range of `webhook_inbox_problems` (a NULL tested apart would walk it from the top).
const WEBHOOK_PROBLEMS: &str = "\
    SELECT id, provider, event_id, message_id, kind, status, reason, occurred_at, received_at, \
           payload \
    FROM webhook_inbox WHERE status IN ('unmatched', 'malformed') \
      AND id < COALESCE(?1, 9223372036854775807) \
    ORDER BY id DESC LIMIT ?2";

#[derive(sqlx::FromRow)]
struct SubscriptionRow {
    id: uuid::Uuid,
    url: String,
    states: Option<Json<Vec<String>>>,
    channels: Option<Json<Vec<String>>>,
    cursor: i64,
    lag: i64,
    delivered: i64,
    failures: i32,
    last_error: Option<String>,
    last_attempt_at: Option<DateTime<Utc>>,
    next_attempt_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
}

impl From<SubscriptionRow> for PushSubscription {
    fn from(r: SubscriptionRow) -> Self {
        Self {
            id: r.id,
            url: r.url,
            states: r.states.map(|Json(s)| s),
            channels: r.channels.map(|Json(c)| c),
            cursor: r.cursor,
            lag: r.lag,
            delivered: r.delivered,
            failures: r.failures,
            last_error: r.last_error,
            last_attempt_at: r.last_attempt_at,
            next_attempt_at: r.next_attempt_at,
            created_at: r.created_at,
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn execute(&self, id: MessageId, command: MessageCommand) -> Result<(), CommandError> {
        let _turn = self.stripe(id).lock().await;
        self.run_command(id, command).await.map(|_| ())
    }

    async fn execute_and_load(
        &self,
        id: MessageId,
        command: MessageCommand,
    ) -> Result<Message, CommandError> {
        // In the command's turn: no other command on this message lands in between.
        let _turn = self.stripe(id).lock().await;
        match self.run_command(id, command).await? {
            commands::Ran::Decided(message) => Ok(*message),
            commands::Ran::ByCqrs => crate::store::load_after_command(self, id).await,
        }
    }

    async fn load_message(&self, id: MessageId) -> Result<Option<Message>, StoreError> {
        let mut conn = self.pools.read.acquire().await?;
        let loaded =
            messaging_projections::sqlite::event::load_fold(&mut conn, &id.to_string()).await?;
        Ok(loaded
            .messages
            .into_values()
            .next()
            .map(|folded| folded.message)
            .filter(|message| message.data().is_some()))
    }

    async fn message(
        &self,
        id: MessageId,
    ) -> Result<Option<(Message, Vec<HistoryItem>)>, StoreError> {
        let mut conn = self.pools.read.acquire().await?;
        let events =
            messaging_projections::sqlite::message_events(&mut conn, &id.to_string(), None).await?;
        crate::store::with_history(events)
    }

    async fn create_service(
        &self,
        service: &Service,
        credentials: &Value,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO services (id, channel, provider, name, username, credentials, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(service.id.as_uuid())
        .bind(service.channel.as_str())
        .bind(service.provider.as_str())
        .bind(&service.name)
        .bind(&service.username)
        .bind(Json(credentials))
        .bind(service.created_at)
        .execute(&self.pools.write)
        .await?;
        Ok(())
    }

    async fn replace_service_credentials(
        &self,
        id: ServiceId,
        credentials: &Value,
        expected: Option<&Value>,
    ) -> Result<bool, StoreError> {
        // Read and compared as values (SQLite's `json()` keeps the keys' order: a row written
        // by hand could never match as text), and replaced, in one write transaction.
        let mut tx = begin_immediate(&self.pools.write).await?;
        let current: Option<Json<Value>> =
            sqlx::query_scalar("SELECT credentials FROM services WHERE id = ?1")
                .bind(id.as_uuid())
                .fetch_optional(&mut *tx)
                .await?;
        let Some(Json(current)) = current else {
            return Ok(false);
        };
        if expected.is_some_and(|expected| *expected != current) {
            return Ok(false);
        }
        sqlx::query("UPDATE services SET credentials = ?2 WHERE id = ?1")
            .bind(id.as_uuid())
            .bind(Json(credentials))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn service(&self, id: ServiceId) -> Result<Option<Service>, StoreError> {
        let row: Option<crate::store::ServiceRow> = sqlx::query_as(
            "SELECT id, channel, provider, name, username, created_at FROM services WHERE id = ?1",
        )
        .bind(id.as_uuid())
        .fetch_optional(&self.pools.read)
        .await?;
        row.map(Service::try_from).transpose()
    }

    async fn service_credentials(
        &self,
        id: ServiceId,
    ) -> Result<Option<(Service, Value)>, StoreError> {
        let row: Option<crate::store::ServiceWithCredentials> = sqlx::query_as(
            "SELECT id, channel, provider, name, username, created_at, credentials \
             FROM services WHERE id = ?1",
        )
        .bind(id.as_uuid())
        .fetch_optional(&self.pools.read)
        .await?;
        row.map(|r| Ok((Service::try_from(r.service)?, r.credentials)))
            .transpose()
    }

    async fn services(&self) -> Result<Vec<Service>, StoreError> {
        let rows: Vec<crate::store::ServiceRow> = sqlx::query_as(
            "SELECT id, channel, provider, name, username, created_at FROM services \
             ORDER BY created_at, id",
        )
        .fetch_all(&self.pools.read)
        .await?;
        rows.into_iter().map(Service::try_from).collect()
    }

    async fn claim_idempotency_key(
        &self,
        key: &str,
        request_hash: &str,
        id: MessageId,
    ) -> Result<IdempotencyClaim, StoreError> {
        let writer = &self.pools.write;
        let insert = move || async move {
            sqlx::query(
                "INSERT INTO idempotency_keys (key, request_hash, message_id) \
                 VALUES (?1, ?2, ?3) ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(request_hash)
            .bind(id.as_uuid())
            .execute(writer)
            .await
            .map(|done| done.rows_affected() == 1)
        };
        // From the writer: the row it just refused is visible there, unless given back.
        let read = move || async move {
            sqlx::query_as("SELECT message_id, request_hash FROM idempotency_keys WHERE key = ?1")
                .bind(key)
                .fetch_optional(writer)
                .await
        };
        crate::store::claim_key(insert, read).await
    }

    async fn release_idempotency_key(&self, key: &str, id: MessageId) -> Result<(), StoreError> {
        // Not if the message exists after all (another request under the key composed it).
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE key = ?1 AND message_id = ?2 \
             AND NOT EXISTS (SELECT 1 FROM events WHERE aggregate_type = ?3 \
                             AND aggregate_id = ?4)",
        )
        .bind(key)
        .bind(id.as_uuid())
        .bind(Message::TYPE_NAME)
        .bind(id.to_string())
        .execute(&self.pools.write)
        .await?;
        Ok(())
    }

    async fn list_messages(&self, f: &ListFilter) -> Result<Vec<Message>, StoreError> {
        let by_profile = walk_profile(&self.pools.read, f, NARROW_PROFILE).await?;
        let rows: Vec<(Json<MessageData>,)> = list_query("SELECT message", f, by_profile)
            .build_query_as()
            .fetch_all(&self.pools.read)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(Json(data),)| Message::from(data))
            .collect())
    }

    async fn state_changes(&self, after: i64, limit: i64) -> Result<Vec<FeedItem>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT position, message_id, channel, service_id, previous_state, state, cause, \
                    occurred_at, recorded_at \
             FROM state_changes WHERE position > ?1 ORDER BY position LIMIT ?2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pools.read)
        .await?)
    }

    async fn create_subscription(
        &self,
        new: &NewSubscription,
    ) -> Result<PushSubscription, StoreError> {
        let id = uuid::Uuid::now_v7();
        let now = crate::clock::now();
        sqlx::query(
            "INSERT INTO subscriptions (id, url, secret, states, channels, cursor, \
                                        next_attempt_at, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, \
                     COALESCE(?6, (SELECT COALESCE(MAX(position), 0) FROM state_changes)), \
                     ?7, ?7)",
        )
        .bind(id)
        .bind(&new.url)
        .bind(&new.secret)
        .bind(new.states.as_ref().map(Json))
        .bind(new.channels.as_ref().map(Json))
        .bind(new.after)
        .bind(now)
        .execute(&self.pools.write)
        .await?;
        let row: SubscriptionRow = sqlx::query_as(&format!("{SUBSCRIPTION_VIEW} WHERE s.id = ?1"))
            .bind(id)
            .fetch_one(&self.pools.write)
            .await?;
        Ok(row.into())
    }

    async fn subscription(&self, id: uuid::Uuid) -> Result<Option<PushSubscription>, StoreError> {
        let row: Option<SubscriptionRow> =
            sqlx::query_as(&format!("{SUBSCRIPTION_VIEW} WHERE s.id = ?1"))
                .bind(id)
                .fetch_optional(&self.pools.read)
                .await?;
        Ok(row.map(Into::into))
    }

    async fn subscriptions(&self) -> Result<Vec<PushSubscription>, StoreError> {
        let rows: Vec<SubscriptionRow> =
            sqlx::query_as(&format!("{SUBSCRIPTION_VIEW} ORDER BY s.created_at, s.id"))
                .fetch_all(&self.pools.read)
                .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn delete_subscription(&self, id: uuid::Uuid) -> Result<bool, StoreError> {
        let deleted = sqlx::query("DELETE FROM subscriptions WHERE id = ?1")
            .bind(id)
            .execute(&self.pools.write)
            .await?
            .rows_affected();
        Ok(deleted > 0)
    }

    async fn webhook_problems(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Problematic>, StoreError> {
        let rows: Vec<crate::store::ProblemRow> = sqlx::query_as(WEBHOOK_PROBLEMS)
            .bind(before)
            .bind(limit)
            .fetch_all(&self.pools.read)
            .await?;
        Ok(rows.into_iter().map(Problematic::from).collect())
    }

    async fn ready(&self) -> Result<(), StoreError> {
        crate::store::check_migrations(&MIGRATOR, &self.pools.read).await
    }

    async fn lease_due_schedules(&self, limit: i64) -> Result<Vec<ScheduledSend>, StoreError> {
        jobs::lease_due_schedules(&self.pools, limit).await
    }

    async fn finish_schedules(&self, fired: &[ScheduledSend]) -> Result<(), StoreError> {
        jobs::finish_schedules(&self.pools, fired).await
    }

    async fn release_schedules(&self, fired: &[ScheduledSend]) -> Result<(), StoreError> {
        jobs::release_schedules(&self.pools, fired).await
    }

    async fn next_schedule_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        jobs::next_schedule_due(&self.pools).await
    }

    async fn claim_send_jobs(
        &self,
        limit: i64,
        per_service: PerService,
        lease: Duration,
    ) -> Result<Vec<SendJob>, StoreError> {
        jobs::claim_send_jobs(&self.pools, limit, per_service, lease).await
    }

    async fn next_send_job_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        jobs::next_send_job_due(&self.pools).await
    }

    async fn release_send_job(
        &self,
        job: &SendJob,
        due_at: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        jobs::release_send_job(&self.pools, job, due_at).await
    }

    async fn delete_send_job(&self, job: &SendJob) -> Result<(), StoreError> {
        jobs::delete_send_job(&self.pools, job).await
    }

    async fn record_webhook_facts(&self, facts: &[InboxFact]) -> Result<u64, StoreError> {
        let inserted = inbox::record(&self.pools, facts).await?;
        self.bell.webhook_inbox();
        Ok(inserted)
    }

    async fn outbound_message_id(
        &self,
        channel: Channel,
        provider_message_id: &str,
    ) -> Result<Option<MessageId>, StoreError> {
        inbox::outbound_message_id(&self.pools, channel, provider_message_id).await
    }

    async fn lease_webhook_facts(
        &self,
        gave_up_before: DateTime<Utc>,
    ) -> Result<Vec<PendingFact>, StoreError> {
        inbox::lease(&self.pools, gave_up_before).await
    }

    async fn rematch_replies(
        &self,
        channel: Channel,
        provider_message_id: &str,
        message_id: MessageId,
    ) -> Result<u64, StoreError> {
        let given_back =
            inbox::rematch_replies(&self.pools, channel, provider_message_id, message_id).await?;
        if given_back > 0 {
            self.bell.webhook_inbox();
        }
        Ok(given_back)
    }

    async fn settle_webhook_facts(
        &self,
        settled: &[(crate::store::FactLease, FactSettlement)],
    ) -> Result<(), StoreError> {
        inbox::settle(&self.pools, settled).await
    }

    async fn lease_push_subscriptions(
        &self,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<PushDue>, StoreError> {
        push::lease(&self.pools, lease, limit).await
    }

    async fn push_acknowledged(
        &self,
        leased: &PushDue,
        cursor: i64,
        delivered: i64,
    ) -> Result<bool, StoreError> {
        push::acknowledged(&self.pools, leased, cursor, delivered).await
    }

    async fn push_failed(
        &self,
        leased: &PushDue,
        failures: i32,
        reason: &str,
        retry_in: Duration,
    ) -> Result<bool, StoreError> {
        push::failed(&self.pools, leased, failures, reason, retry_in).await
    }

    async fn next_push_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        push::next_due(&self.pools).await
    }

    async fn gauges(&self) -> Result<Gauges, StoreError> {
        gauges::read(&self.pools).await
    }

    async fn feed_end(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM state_changes")
                .fetch_one(&self.pools.read)
                .await?,
        )
    }

    async fn projection_lag(&self, name: &str) -> Result<i64, StoreError> {
        messaging_projections::sqlite::lag(&self.pools.read, name)
            .await
            .map_err(StoreError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn migrated() -> SqlitePool {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .expect("in-memory SQLite");
        MIGRATOR.run(&pool).await.expect("migrations");
        pool
    }

    /// SQLite's plan, one line per step: `SCAN t` reads the whole table, `SEARCH t USING
    /// INDEX i (...)` a range of an index, `USE TEMP B-TREE FOR ORDER BY` sorts what it read.
    async fn plan_of(mut q: sqlx::QueryBuilder<'_, sqlx::Sqlite>, pool: &SqlitePool) -> String {
        let rows: Vec<(i64, i64, i64, String)> = q
            .build_query_as()
            .fetch_all(pool)
            .await
            .expect("EXPLAIN QUERY PLAN");
        rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("\n")
    }

    fn filter() -> ListFilter {
        ListFilter {
            service_id: None,
            channel: None,
            state: None,
            direction: None,
            profile: None,
            before: None,
            limit: 50,
        }
    }

    #[tokio::test]
    async fn the_list_is_read_through_the_index_its_filter_has() {
        let pool = migrated().await;
        let explain = "EXPLAIN QUERY PLAN SELECT message";

        let state = ListFilter {
            state: Some("failed".into()),
            before: Some(MessageId::from_uuid(uuid::Uuid::now_v7())),
            ..filter()
        };
        let plan = plan_of(list_query(explain, &state, false), &pool).await;
        assert!(
            plan.contains("SEARCH message_list USING INDEX message_list_state (state=?"),
            "{plan}"
        );

        let service = ListFilter {
            service_id: Some(ServiceId::from_uuid(uuid::Uuid::now_v7())),
            ..filter()
        };
        let plan = plan_of(list_query(explain, &service, false), &pool).await;
        assert!(
            plan.contains("SEARCH message_list USING INDEX message_list_service (service_id=?"),
            "{plan}"
        );

        // Both: one range of the index on the two, already in the page's order.
        let both = ListFilter {
            service_id: Some(ServiceId::from_uuid(uuid::Uuid::now_v7())),
            state: Some("failed".into()),
            before: Some(MessageId::from_uuid(uuid::Uuid::now_v7())),
            ..filter()
        };
        let plan = plan_of(list_query(explain, &both, false), &pool).await;
        assert!(
            plan.contains(
                "SEARCH message_list USING INDEX message_list_service_state \
                 (service_id=? AND state=?"
            ),
            "{plan}"
        );
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");

        // A profile alone: one range of the profiles table's key, newest first.
        let profile = ListFilter {
            profile: Some("Ann@Example.com".into()),
            before: Some(MessageId::from_uuid(uuid::Uuid::now_v7())),
            ..filter()
        };
        let plan = plan_of(list_query(explain, &profile, true), &pool).await;
        assert!(
            plan.contains("SEARCH p USING PRIMARY KEY (profile=? AND message_id<?)"),
            "{plan}"
        );
        assert!(!plan.contains("SCAN"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");

        // A narrow profile beside other filters: the same range, each row looked up by its
        // key and checked, never the other filters' indexes.
        let beside = ListFilter {
            profile: Some("ann@example.com".into()),
            state: Some("sent".into()),
            service_id: Some(ServiceId::from_uuid(uuid::Uuid::now_v7())),
            before: Some(MessageId::from_uuid(uuid::Uuid::now_v7())),
            ..filter()
        };
        let plan = plan_of(list_query(explain, &beside, true), &pool).await;
        assert!(
            plan.contains("SEARCH p USING PRIMARY KEY (profile=? AND message_id<?)"),
            "{plan}"
        );
        assert!(
            plan.contains("SEARCH m USING INDEX sqlite_autoindex_message_list_1 (message_id=?)"),
            "{plan}"
        );
        assert!(!plan.contains("SCAN"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");

        // No filter, or one without an index of its own: the newest first along the key,
        // stopping at the page's end, never a sort of the whole list.
        for (f, by_profile) in [
            (filter(), false),
            (
                ListFilter {
                    channel: Some(Channel::Email),
                    profile: Some("Ann".into()),
                    ..filter()
                },
                false,
            ),
        ] {
            let plan = plan_of(list_query(explain, &f, by_profile), &pool).await;
            assert!(!plan.contains("TEMP B-TREE"), "{plan}");
        }
    }

    /// Rows of the list and their pairs, written as the projection writes them: `(profiles,
    /// state)` per message, oldest first; the ids, oldest first.
    async fn listed(pool: &SqlitePool, rows: &[(&[&str], &str)]) -> Vec<uuid::Uuid> {
        let service = uuid::Uuid::now_v7();
        let mut ids = Vec::new();
        for (profiles, state) in rows {
            let id = uuid::Uuid::now_v7();
            sqlx::query(
                "INSERT INTO message_list (message_id, service_id, channel, direction, state, \
                 profiles, message, last_sequence) \
                 VALUES (?1, ?2, 'email', 'outbound', ?3, ?4, ?5, 1)",
            )
            .bind(id)
            .bind(service)
            .bind(*state)
            .bind(serde_json::to_string(profiles).expect("JSON"))
            // The row's id again, for the page to be read by a query on either table.
            .bind(id.to_string())
            .execute(pool)
            .await
            .expect("list row");
            for profile in *profiles {
                sqlx::query(
                    "INSERT INTO message_list_profiles (profile, message_id) VALUES (?1, ?2)",
                )
                .bind(*profile)
                .bind(id)
                .execute(pool)
                .await
                .expect("pair");
            }
            ids.push(id);
        }
        ids
    }

    #[tokio::test]
    async fn a_profile_beside_another_filter_is_walked_only_while_it_is_narrow() {
        let pool = migrated().await;
        // "me" sends all six; "ann" gets two of them, one sent.
        let ids = listed(
            &pool,
            &[
                (&["me", "ann"], "sent"),
                (&["me", "bob"], "sent"),
                (&["me", "ann"], "draft"),
                (&["me", "bob"], "sent"),
                (&["me", "bob"], "draft"),
                (&["me", "bob"], "sent"),
            ],
        )
        .await;
        let with = |profile: &str, state: Option<&str>, before: Option<uuid::Uuid>| ListFilter {
            profile: Some(profile.into()),
            state: state.map(Into::into),
            before: before.map(MessageId::from_uuid),
            ..filter()
        };
        let narrow = 3;
        let walks = |f: ListFilter| {
            let pool = pool.clone();
            async move { walk_profile(&pool, &f, narrow).await.expect("count") }
        };
        // Alone, a profile is always walked; beside a state, only with fewer pairs than
        // `narrow` before the cursor.
        assert!(walks(with("me", None, None)).await);
        assert!(!walks(with("me", Some("sent"), None)).await);
        assert!(walks(with("me", Some("sent"), Some(ids[2]))).await);
        assert!(walks(with("ann", Some("sent"), None)).await);
        assert!(!walks(filter()).await);

        // Both ways of reading a page give the same rows, newest first.
        let page = |f: ListFilter, by_profile: bool| {
            let pool = pool.clone();
            async move {
                let rows: Vec<(String,)> = list_query("SELECT message", &f, by_profile)
                    .build_query_as()
                    .fetch_all(&pool)
                    .await
                    .expect("page");
                rows.into_iter()
                    .map(|(id,)| id.parse().expect("an id"))
                    .collect::<Vec<uuid::Uuid>>()
            }
        };
        for (f, expected) in [
            (with("ann", Some("sent"), None), vec![ids[0]]),
            (
                with("me", Some("sent"), None),
                vec![ids[5], ids[3], ids[1], ids[0]],
            ),
            (with("me", Some("sent"), Some(ids[3])), vec![ids[1], ids[0]]),
            (with("bob", Some("draft"), None), vec![ids[4]]),
        ] {
            assert_eq!(page(f.clone(), true).await, expected);
            assert_eq!(page(f, false).await, expected);
        }
    }

    #[tokio::test]
    async fn the_next_due_times_are_read_through_indexes() {
        let pool = migrated().await;
        for sql in [jobs::NEXT_SCHEDULE_DUE, jobs::NEXT_SEND_JOB_DUE] {
            let explain = format!("EXPLAIN QUERY PLAN {sql}");
            let rows: Vec<(i64, i64, i64, String)> = sqlx::query_as(&explain)
                .bind(Utc::now())
                .fetch_all(&pool)
                .await
                .expect("EXPLAIN QUERY PLAN");
            let tables: Vec<&String> = rows
                .iter()
                .map(|r| &r.3)
                .filter(|d| d.contains("scheduled_sends") || d.contains("send_jobs"))
                .collect();
            assert!(!tables.is_empty(), "{rows:?}");
            for step in tables {
                assert!(step.contains(" INDEX "), "{sql}: {step}");
                assert!(!step.contains("TEMP B-TREE"), "{sql}: {step}");
            }
        }
    }

    /// The sender's claim and the webhook applier's lease read their queues through indexes,
    /// in the order they take rows in, and sort no more than what they take: with a backlog
    /// (100k jobs due, 50k facts pending) a whole-queue sort each round cost 150 ms and 61 ms.
    /// The problems page and a message's first events are read as index ranges.
    #[tokio::test]
    async fn the_queues_are_taken_from_in_index_order() {
        let pool = migrated().await;
        let plan = |sql: String| {
            let pool = pool.clone();
            async move {
                let rows: Vec<(i64, i64, i64, String)> =
                    sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                        .bind(Utc::now())
                        .bind(Utc::now())
                        .bind(5)
                        .bind(64)
                        .bind(64)
                        .fetch_all(&pool)
                        .await
                        .expect("EXPLAIN QUERY PLAN");
                rows.into_iter().map(|r| r.3).collect::<Vec<_>>()
            }
        };
        let claim = plan(jobs::CLAIM_SEND_JOBS.to_owned()).await;
        assert!(
            claim
                .iter()
                .any(|s| s.contains("send_jobs_by_service (service_id=? AND due_at<?)")),
            "{claim:#?}"
        );
        for step in &claim {
            // The one scan is the first service's lookup (`ORDER BY service_id LIMIT 1`): it
            // stops at the index's first entry.
            assert!(
                !step.starts_with("SCAN send_jobs")
                    || step == "SCAN send_jobs USING COVERING INDEX send_jobs_by_service",
                "{claim:#?}"
            );
            assert!(!step.contains("send_jobs_due"), "{claim:#?}");
        }
        let lease = plan(inbox::LEASE_PENDING.to_owned()).await;
        assert!(
            lease
                .iter()
                .any(|s| s.contains("SCAN c USING INDEX webhook_inbox_pending")),
            "{lease:#?}"
        );
        assert!(
            !lease.iter().any(|s| s.contains("TEMP B-TREE")),
            "{lease:#?}"
        );
        let problems = plan(WEBHOOK_PROBLEMS.to_owned()).await;
        assert!(
            problems
                .iter()
                .any(|s| s.contains("webhook_inbox_problems (id<?)")),
            "{problems:#?}"
        );
    }

    /// A command on a message with a long history is decided from its snapshot: one is taken
    /// with the command that read 64 events past the last (in its transaction, at its last
    /// sequence), and the next command is decided against the snapshot's fold with the events
    /// after it: a planted snapshot that counts differently shows through in the command's
    /// answer, a fact it has seen is a duplicate, and one of another fold version or of another
    /// message is passed over (and replaced).
    #[tokio::test]
    async fn a_command_on_a_long_message_is_decided_from_its_snapshot() {
        use messaging_domain::{
            build_message, Compose, Dispatch, Fact, MessageInput, Profile, Provider, ServiceRef,
        };
        let dir = tempfile::tempdir().expect("a directory");
        let pools = SqlitePools::open(&dir.path().join("m.db"), 2)
            .await
            .expect("open");
        MIGRATOR.run(&pools.write).await.expect("migrations");
        let (bell, _wakeups) = crate::notify::in_process();
        let store = SqliteStore::new(pools.clone(), bell);
        let service = ServiceRef {
            id: ServiceId::from_uuid(uuid::Uuid::nil()),
            channel: Channel::Email,
            provider: Provider::Sendgrid,
            username: "news@example.com".into(),
            name: None,
        };
        let id = MessageId::from_uuid(uuid::Uuid::now_v7());
        let input = MessageInput {
            to: vec![Profile::new("ann@example.com", None)],
            subject: Some("s".into()),
            text: Some("t".into()),
            ..Default::default()
        };
        let now = Utc::now();
        let compose = MessageCommand::Compose(Compose {
            id,
            message: build_message(&service, input).expect("a message"),
            dispatch: Dispatch::Now,
            now,
        });
        store.execute(id, compose).await.expect("composed");
        for command in [
            MessageCommand::StartSendAttempt { now, attempt: 1 },
            MessageCommand::RecordSent {
                provider_message_id: Some("sg-1".into()),
                at: now,
            },
        ] {
            store.execute(id, command).await.expect("sent");
        }
        let open = |n: i64| MessageCommand::RecordOpen {
            fact: Fact {
                fact_id: format!("open-{n}"),
                occurred_at: now + chrono::Duration::seconds(n),
            },
            machine_open: false,
        };
        let snapshot = || async {
            sqlx::query_as::<_, (i64, i32, String)>(
                "SELECT sequence, fold_version, fold FROM message_snapshots \
                 WHERE aggregate_id = ?1",
            )
            .bind(id.to_string())
            .fetch_optional(&pools.read)
            .await
            .expect("read")
        };
        let opens = |message: Option<Message>| {
            message
                .and_then(|m| m.data().map(|d| d.opens))
                .expect("the message")
        };
        let last = || async {
            sqlx::query_scalar::<_, i64>("SELECT max(sequence) FROM events WHERE aggregate_id = ?1")
                .bind(id.to_string())
                .fetch_one(&pools.read)
                .await
                .expect("read")
        };
        // Opens one by one until the log holds 64 events of the message: each command so far
        // read fewer than 64.
        let mut n = 0;
        while last().await < 64 {
            store.execute(id, open(n)).await.expect("opened");
            n += 1;
        }
        assert!(snapshot().await.is_none(), "no command read 64 events yet");
        // This one reads 64: its snapshot is the fold after its own event, the 65th.
        store.execute(id, open(n)).await.expect("opened");
        let (sequence, version, fold) = snapshot().await.expect("a snapshot");
        assert_eq!((sequence, version), (65, Message::FOLD_VERSION));
        assert_eq!(
            store.load_message(id).await.map(opens).unwrap(),
            n as u32 + 1
        );

        // One that counts 1000 opens and has seen a fact not sent yet, at that sequence: the
        // next open is decided against it (1001), and that fact is a duplicate to it.
        let mut planted: Value = serde_json::from_str(&fold).expect("JSON");
        planted["data"]["opens"] = 1000.into();
        planted["data"]["seen_facts"]
            .as_array_mut()
            .expect("the facts seen")
            .push("open-999".into());
        sqlx::query("UPDATE message_snapshots SET fold = ?1")
            .bind(planted.to_string())
            .execute(&pools.write)
            .await
            .expect("planted");
        let answered = store
            .execute_and_load(id, open(n + 1))
            .await
            .expect("opened");
        assert_eq!(opens(Some(answered)), 1001);
        assert_eq!(store.load_message(id).await.map(opens).unwrap(), 1001);
        let before = last().await;
        store
            .execute(id, open(999))
            .await
            .expect("a duplicate is accepted");
        assert_eq!(
            last().await,
            before,
            "no event for a fact the snapshot has seen"
        );
        // Of another fold version: ignored, the events are folded from the first.
        sqlx::query("UPDATE message_snapshots SET fold_version = 0")
            .execute(&pools.write)
            .await
            .expect("another version");
        assert_eq!(
            store.load_message(id).await.map(opens).unwrap(),
            n as u32 + 2
        );
        // Nor is one of another message used.
        sqlx::query("UPDATE message_snapshots SET fold_version = ?1, fold = replace(fold, ?2, ?3)")
            .bind(Message::FOLD_VERSION)
            .bind(id.to_string())
            .bind(uuid::Uuid::nil().to_string())
            .execute(&pools.write)
            .await
            .expect("another message's");
        store.execute(id, open(n + 2)).await.expect("opened");
        assert_eq!(
            store.load_message(id).await.map(opens).unwrap(),
            n as u32 + 3
        );
        let (sequence, version, fold) = snapshot().await.expect("a snapshot");
        assert_eq!((sequence, version), (67, Message::FOLD_VERSION));
        assert!(
            fold.contains(&id.to_string()),
            "replaced by the message's own"
        );
        // An unreadable one is replaced by a command that appends nothing too (a duplicate).
        sqlx::query("UPDATE message_snapshots SET fold = 'not json'")
            .execute(&pools.write)
            .await
            .expect("spoiled");
        store
            .execute(id, open(0))
            .await
            .expect("a duplicate is accepted");
        assert_eq!(last().await, 67, "nothing appended");
        let (sequence, _, fold) = snapshot().await.expect("a snapshot");
        assert_eq!(sequence, 67);
        assert!(fold.contains(&id.to_string()), "replaced: {fold}");
    }

    #[tokio::test]
    async fn start_up_ends_every_lease_a_dead_process_left() {
        let dir = tempfile::tempdir().expect("a directory");
        let pools = SqlitePools::open(&dir.path().join("m.db"), 2)
            .await
            .expect("open");
        MIGRATOR.run(&pools.write).await.expect("migrations");
        let now = Utc::now();
        let hour = now + chrono::Duration::hours(1);
        let id = || uuid::Uuid::now_v7();
        sqlx::query(
            "INSERT INTO scheduled_sends (message_id, publish_at, locked_until) \
             VALUES (?1, ?2, ?3)",
        )
        .bind(id())
        .bind(now)
        .bind(hour)
        .execute(&pools.write)
        .await
        .expect("schedule");
        // A claimed job: its due time is its lease's end.
        sqlx::query(
            "INSERT INTO send_jobs (message_id, service_id, channel, provider, due_at, \
                                    locked_until) VALUES (?1, ?2, 'email', 'smtp', ?3, ?3)",
        )
        .bind(id())
        .bind(id())
        .bind(hour)
        .execute(&pools.write)
        .await
        .expect("job");
        sqlx::query(
            "INSERT INTO webhook_inbox (provider, event_id, kind, occurred_at, payload, \
                                        locked_until) VALUES ('sendgrid', 'e1', 'delivered', ?1, '{}', ?2)",
        )
        .bind(now)
        .bind(hour)
        .execute(&pools.write)
        .await
        .expect("fact");
        // A subscription leased by a delivery, and one waiting out its back-off.
        for failures in [0, 3] {
            sqlx::query(
                "INSERT INTO subscriptions (id, url, secret, failures, next_attempt_at, \
                                            created_at) VALUES (?1, 'http://a', 's', ?2, ?3, ?4)",
            )
            .bind(id())
            .bind(failures)
            .bind(hour)
            .bind(now)
            .execute(&pools.write)
            .await
            .expect("subscription");
        }

        assert_eq!(
            release_leases_of_the_dead(&pools).await.expect("release"),
            4
        );
        let waiting: Vec<(i32, DateTime<Utc>)> =
            sqlx::query_as("SELECT failures, next_attempt_at FROM subscriptions ORDER BY failures")
                .fetch_all(&pools.read)
                .await
                .expect("subscriptions");
        assert!(
            waiting[0].1 <= Utc::now(),
            "leased: due now, not {:?}",
            waiting[0]
        );
        assert_eq!(waiting[1].1, hour, "its back-off is kept");
        let leased: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM scheduled_sends WHERE locked_until IS NOT NULL) \
                  + (SELECT count(*) FROM send_jobs WHERE locked_until IS NOT NULL) \
                  + (SELECT count(*) FROM webhook_inbox WHERE locked_until IS NOT NULL)",
        )
        .fetch_one(&pools.read)
        .await
        .expect("count");
        assert_eq!(leased, 0);
        let due: DateTime<Utc> = sqlx::query_scalar("SELECT due_at FROM send_jobs")
            .fetch_one(&pools.read)
            .await
            .expect("due");
        assert!(due <= Utc::now(), "the job is due now, not at {due}");
    }

    #[tokio::test]
    async fn the_next_schedule_due_is_the_earliest_free_time_or_lease_expiry() {
        let pool = migrated().await;
        let now = Utc::now();
        let at = |minutes: i64| now + chrono::Duration::minutes(minutes);
        let next = |pool: SqlitePool| async move {
            let t: Option<String> = sqlx::query_scalar(jobs::NEXT_SCHEDULE_DUE)
                .bind(Utc::now())
                .fetch_one(&pool)
                .await
                .expect("next due");
            t.as_deref().map(parse_time).transpose().expect("a time")
        };
        let insert = |publish_at: DateTime<Utc>, locked_until: Option<DateTime<Utc>>| {
            sqlx::query(
                "INSERT INTO scheduled_sends (message_id, publish_at, locked_until) \
                 VALUES (?1, ?2, ?3)",
            )
            .bind(MessageId::from_uuid(uuid::Uuid::now_v7()).as_uuid())
            .bind(publish_at)
            .bind(locked_until)
        };
        assert_eq!(next(pool.clone()).await, None);

        // Only a leased row: the lease's end (the two-argument min() would say NULL).
        insert(at(-5), Some(at(20)))
            .execute(&pool)
            .await
            .expect("insert");
        assert_eq!(next(pool.clone()).await, Some(at(20)));

        // A free row later than that lease's end, then one earlier.
        insert(at(30), None).execute(&pool).await.expect("insert");
        assert_eq!(next(pool.clone()).await, Some(at(20)));
        insert(at(10), None).execute(&pool).await.expect("insert");
        assert_eq!(next(pool.clone()).await, Some(at(10)));

        // A row whose lease ran out counts by its own time (due already).
        insert(at(-60), Some(at(-1)))
            .execute(&pool)
            .await
            .expect("insert");
        assert_eq!(next(pool.clone()).await, Some(at(-60)));
    }
}
