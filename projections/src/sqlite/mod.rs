//! The embedded default backend: the same subscriptions and read models on SQLite.
//!
//! SQLite has one writer at a time, so events commit in position order and a reader can
//! checkpoint the position alone: it reads `global_position > checkpoint` in order, handles
//! the batch and moves the checkpoint in the same transaction. That transaction starts with
//! `BEGIN IMMEDIATE` ([`begin_immediate`], which writers should use too): it takes the write
//! lock before reading the checkpoint, so two readers of one subscription take turns, and no
//! transaction ever has to upgrade a read lock to a write lock (which fails at once with
//! `SQLITE_BUSY` instead of waiting when another writer got in first).
//!
//! Only one process opens the database (the embedded single-node mode): [`BatchOutcome`]'s
//! `Behind` and `Locked` never happen here. There is no NOTIFY either:
//! [`Subscription::on_commit`] tells the caller, in process, when a batch committed, to wake
//! the readers of the models.

pub mod delivery;
pub mod event;
pub mod feed;
pub mod message_list;

pub use event::{load_message, load_messages_before, message_events, EVENT_COLUMNS};

use crate::event::StoredEvent;
use crate::subscription::{catch_up_with, run_until_shutdown, Pace};
use crate::{
    BatchOutcome, DeliveryJobs, MessageList, Projection, ProjectionError, StateChangeFeed,
};
use futures_util::TryStreamExt;
use sqlx::{Sqlite, SqlitePool, Transaction};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The most parameters one statement binds: SQLite allows 32766; multi-row statements are
/// cut into chunks below this.
pub(crate) const MAX_PARAMETERS: usize = 30_000;

/// Begins a write transaction with `BEGIN IMMEDIATE`: it waits (up to the busy timeout) for
/// the write lock before any statement runs, so it never has to upgrade a read lock.
///
/// The begin runs on a task of its own. sqlx 0.8.6's `begin_with` awaits once more after a
/// custom BEGIN succeeded (to check that it opened a transaction) before it hands out the
/// `Transaction`: a caller cancelled there (a reader task aborted) would return the connection
/// to the pool inside a transaction that holds the write lock, and every other writer would
/// fail with "database is locked". Spawned, the begin always completes, and a transaction
/// nobody waits for any more is dropped, which rolls it back.
pub async fn begin_immediate(
    pool: &SqlitePool,
) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
    let pool = pool.clone();
    match tokio::spawn(async move { pool.begin_with("BEGIN IMMEDIATE").await }).await {
        Ok(begun) => begun,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        // Only when the runtime shuts down.
        Err(_) => Err(sqlx::Error::WorkerCrashed),
    }
}

/// Every projection this service runs on SQLite: the same three, with the same names, as on
/// PostgreSQL.
pub fn all() -> Vec<Arc<dyn Projection<Sqlite>>> {
    vec![
        Arc::new(MessageList::default()),
        Arc::new(StateChangeFeed::new()),
        Arc::new(DeliveryJobs),
    ]
}

/// A durable subscription on SQLite: the PostgreSQL [`crate::Subscription`]'s API, plus
/// [`Subscription::on_commit`].
#[derive(Clone)]
pub struct Subscription {
    pool: SqlitePool,
    projection: Arc<dyn Projection<Sqlite>>,
    batch_size: i64,
    batch_bytes: usize,
    poll_interval: Duration,
    on_commit: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl Subscription {
    pub fn new(pool: SqlitePool, projection: Arc<dyn Projection<Sqlite>>) -> Self {
        Self {
            pool,
            projection,
            batch_size: 1000,
            batch_bytes: crate::subscription::BATCH_BYTES,
            poll_interval: Duration::from_millis(500),
            on_commit: None,
        }
    }

    pub fn with_batch_size(mut self, batch_size: i64) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The payload text at which a batch is cut
    /// ([`BATCH_BYTES`](crate::subscription::BATCH_BYTES) unless set).
    pub fn with_batch_bytes(mut self, batch_bytes: usize) -> Self {
        self.batch_bytes = batch_bytes.max(1);
        self
    }

    /// How long [`Self::run`] waits for a wake-up before it looks anyway (500 ms unless set).
    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }

    /// Called after every commit of a batch that handled events, once the read model's rows
    /// are visible: the embedded backend's stand-in for NOTIFY, to wake the model's readers
    /// (scheduler, sender, feed) in process. It runs on the reader's task: keep it short.
    pub fn on_commit(mut self, f: Arc<dyn Fn() + Send + Sync>) -> Self {
        self.on_commit = Some(f);
        self
    }

    pub fn name(&self) -> &'static str {
        self.projection.name()
    }

    /// Creates the checkpoint row if it does not exist yet.
    pub async fn ensure_checkpoint(&self) -> Result<(), ProjectionError> {
        sqlx::query(
            "INSERT INTO subscription_checkpoints (name) VALUES (?1) ON CONFLICT DO NOTHING",
        )
        .bind(self.name())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Reads and handles at most one batch: `Handled` or `Idle`, never `Behind` or `Locked`.
    pub async fn run_batch(&self) -> Result<BatchOutcome, ProjectionError> {
        let mut tx = begin_immediate(&self.pool).await?;
        let checkpoint: Option<i64> = sqlx::query_scalar(
            "SELECT last_global_position FROM subscription_checkpoints WHERE name = ?1",
        )
        .bind(self.name())
        .fetch_optional(&mut *tx)
        .await?;
        let last_pos = match checkpoint {
            Some(position) => position,
            None => {
                // Nobody else can create it meanwhile: this transaction holds the write lock.
                sqlx::query("INSERT INTO subscription_checkpoints (name) VALUES (?1)")
                    .bind(self.name())
                    .execute(&mut *tx)
                    .await?;
                0
            }
        };
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE global_position > ?1 \
             ORDER BY global_position LIMIT ?2"
        );
        // Cut at the batch's bytes, as on PostgreSQL.
        let mut events: Vec<StoredEvent> = Vec::new();
        {
            let mut rows = sqlx::query_as::<_, StoredEvent>(&sql)
                .bind(last_pos)
                .bind(self.batch_size)
                .fetch(&mut *tx);
            let mut bytes = 0;
            while let Some(event) = rows.try_next().await? {
                bytes += event.payload.len();
                events.push(event);
                if bytes >= self.batch_bytes {
                    break;
                }
            }
        }
        // Every early return ends the transaction explicitly, releasing the write lock now
        // rather than when the pooled connection is next used.
        let Some(last) = events.last() else {
            // Keeps a checkpoint created above; otherwise there is nothing to commit.
            tx.commit().await?;
            return Ok(BatchOutcome::Idle);
        };
        let next_pos = last.global_position;
        if let Err(error) = self.projection.handle_batch(&mut tx, &events).await {
            tx.rollback().await?;
            return Err(error);
        }
        sqlx::query(
            "UPDATE subscription_checkpoints SET last_global_position = ?2, \
             events_handled = events_handled + ?3, \
             updated_at = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now') WHERE name = ?1",
        )
        .bind(self.name())
        .bind(next_pos)
        .bind(events.len() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if let Some(on_commit) = &self.on_commit {
            on_commit();
        }
        Ok(crate::subscription::batch_outcome(
            &events,
            self.batch_size,
            self.batch_bytes,
        ))
    }

    /// Handles batches until the log is read to its end; returns how many events.
    pub async fn catch_up(&self) -> Result<u64, ProjectionError> {
        self.ensure_checkpoint().await?;
        catch_up_with(|| self.run_batch()).await
    }

    /// Empties the read model and its checkpoint in one transaction (after a running
    /// instance's batch: both take the write lock), then reads the whole log again.
    pub async fn rebuild(&self) -> Result<u64, ProjectionError> {
        self.ensure_checkpoint().await?;
        let mut tx = begin_immediate(&self.pool).await?;
        self.projection.reset(&mut tx).await?;
        sqlx::query(
            "UPDATE subscription_checkpoints SET last_global_position = 0, events_handled = 0, \
             updated_at = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now') WHERE name = ?1",
        )
        .bind(self.name())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.catch_up().await
    }

    /// Runs until `shutdown` turns true: woken by `wake` (bumped in process after events are
    /// appended), with a polling fallback. Errors are logged and retried with backoff; the
    /// reader never dies on one bad batch.
    pub async fn run(self, wake: watch::Receiver<u64>, shutdown: watch::Receiver<bool>) {
        let name = self.name();
        let pace = Pace {
            batch_size: self.batch_size,
            poll_interval: self.poll_interval,
            gather: self.projection.gather(),
        };
        run_until_shutdown(name, pace, wake, shutdown, || self.run_batch()).await
    }
}

/// How far a subscription is behind the log, for `/metrics` and `/v1/subscriptions`.
pub async fn lag(pool: &SqlitePool, name: &str) -> Result<i64, ProjectionError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM events e, subscription_checkpoints c WHERE c.name = ?1 \
         AND e.global_position > c.last_global_position",
    )
    .bind(name)
    .fetch_one(pool)
    .await?)
}
