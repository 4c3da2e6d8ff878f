//! The durable subscription reader on PostgreSQL, and what every backend shares: the
//! [`Projection`] trait, the batch outcomes and the reader's loop (`crate::sqlite` has the
//! embedded backend's reader).
//!
//! Positions (`global_position`) become visible out of order when transactions commit out of
//! order, so a reader that checkpoints the position alone skips events. Each event row carries
//! the id of the transaction that inserted it; the reader only takes rows whose transaction id
//! is below the oldest transaction still running (`pg_snapshot_xmin`), which can never gain
//! rows again, ordered by `(transaction_id, global_position)`, and checkpoints that pair.
//!
//! Each batch takes a transaction-level advisory lock keyed by the subscription's name
//! (`pg_try_advisory_xact_lock(hashtext('subscription:' || name))`, computed by the server so
//! every process derives the same key), so one instance processes a subscription at a time
//! across processes; the lock goes with the transaction's commit or rollback, a crashed
//! session's included. The checkpoint is read by a later statement than the one that took the
//! lock, so under READ COMMITTED its snapshot sees the previous holder's commit (PostgreSQL
//! releases a transaction's locks only after its commit is visible). The checkpoint is updated
//! in the same transaction as the projection's writes: a crash mid-batch rolls both back
//! together. Two names whose keys collide only take turns.
//!
//! Why not a row lock: `FOR UPDATE` gives a transaction its id at its first statement, and a
//! running transaction id holds `pg_snapshot_xmin` down for every reader, so each batch (and
//! each idle wake-up) held all other subscriptions back from its lock to its commit. An
//! advisory lock assigns no id: a batch takes one at its first write, so an idle or behind
//! batch never does, and a working one holds the others back only while it writes (the
//! projection's statements and the checkpoint update), not while it locks and reads. That
//! window is inherent to writing the read model and the checkpoint in one transaction.
//!
//! The skip-freedom argument is unchanged: the bound is read before the batch writes anything,
//! and a running batch's id can only lower other readers' bounds (they wait, never skip).
//! A batch's id is assigned after its read, so it is above every `transaction_id` that read
//! returned: anything the batch itself wrote to the log would lie after its new checkpoint.

use crate::event::{StoredEvent, TxId, EVENT_COLUMNS};
use crate::kept::KeptConnection;
use crate::shadow::Shadow;
use async_trait::async_trait;
use futures_util::TryStreamExt;
use sqlx::{Connection, PgConnection, PgPool, Postgres};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("event at position {position} has an unreadable payload: {error}")]
    Payload { position: i64, error: String },
    #[error("no upcaster for {event_type} version {version}")]
    UnknownVersion { event_type: String, version: String },
    #[error("{0}")]
    Other(String),
}

/// A read model fed by a subscription, on one backend (`sqlx::Postgres` or `sqlx::Sqlite`).
/// Each read model implements it once per backend: the fold is shared, only the SQL differs.
#[async_trait]
pub trait Projection<DB: sqlx::Database>: Send + Sync + 'static {
    /// The subscription's name: its checkpoint's key, and the CLI's name for a rebuild.
    fn name(&self) -> &'static str;

    /// Applies a batch, in log order, inside one transaction. Errors roll the whole batch
    /// back, checkpoint included.
    async fn handle_batch(
        &self,
        conn: &mut DB::Connection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError>;

    /// Empties the read model, for a rebuild from position zero.
    async fn reset(&self, conn: &mut DB::Connection) -> Result<(), ProjectionError>;

    /// The tables that hold this read model and nothing else, for a rebuild beside them (on
    /// PostgreSQL, see [`crate::shadow`]): the live ones stay whole until the rebuilt copies
    /// take their place. Empty (the default): a rebuild empties the live tables with
    /// [`Self::reset`] and fills them again, batch by batch.
    fn tables(&self) -> &'static [&'static str] {
        &[]
    }

    /// The channel a rebuild beside the live tables ([`Self::tables`]) NOTIFYs when the copies
    /// take their place, in the same transaction: the one the read model's own batches NOTIFY
    /// (the feed's `state_changes`; the copies' batches send none). `None` (the default): no
    /// NOTIFY at the swap. A read model rebuilt in place NOTIFYs from its batches as usual.
    fn channel(&self) -> Option<&'static str> {
        None
    }

    /// A batch's work split in two, for a rebuild beside the live tables that reads the log in
    /// its order: what needs only the events and the log (folds, and reads of the log on
    /// `log`, a connection of its own) is done here, batch after batch in log order, while
    /// the batch before is being written; the write is the returned [`Prepared`], run on the
    /// writer in the batch's transaction. `None` (the default): the rebuild calls
    /// [`Self::handle_batch`] instead. A projection answers the same way for every batch:
    /// the writer would otherwise handle a batch after the next one was already prepared.
    async fn prepare(
        &self,
        _log: &mut DB::Connection,
        _events: &[StoredEvent],
    ) -> Result<Option<Box<dyn Prepared<DB>>>, ProjectionError> {
        Ok(None)
    }

    /// Whether each aggregate's rows depend on that aggregate's own events alone, in their
    /// order (not on other aggregates' events, nor on the log's order across aggregates).
    /// A rebuild beside the live tables then reads the log aggregate by aggregate and writes
    /// its batches side by side on two connections: each batch starts the aggregates it
    /// holds, so no batch reads back what another wrote (except the rest of an aggregate too
    /// long for one batch, which waits for the batches before it). False unless the
    /// projection says so.
    fn independent_aggregates(&self) -> bool {
        false
    }

    /// How long its reader lets new events gather after a batch that was not full
    /// ([`GATHER`] unless the projection says otherwise).
    fn gather(&self) -> Duration {
        GATHER
    }
}

/// A batch made ready by [`Projection::prepare`]: its writes, to run in the batch's transaction.
#[async_trait]
pub trait Prepared<DB: sqlx::Database>: Send {
    async fn write(self: Box<Self>, conn: &mut DB::Connection) -> Result<(), ProjectionError>;
}

/// What one call of [`Subscription::run_batch`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Handled this many events and committed them with the checkpoint.
    Handled(usize),
    /// The same, a batch cut at its bytes ([`BATCH_BYTES`]) before its count: more may wait.
    Cut(usize),
    /// Nothing new.
    Idle,
    /// Newer events exist but an older transaction is still running: try again shortly.
    Behind,
    /// Another instance holds the subscription right now.
    Locked,
}

/// Takes the subscription's advisory lock for the rest of the transaction, if no one holds it.
/// The key is derived by the server, so it is the same in every process on that server.
/// Also commits the batch without waiting for its WAL flush (see [`ASYNC_COMMIT`]).
const TRY_LOCK: &str = "SELECT pg_try_advisory_xact_lock(hashtext('subscription:' || $1)) \
                        FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit";
/// A projection's batch commits without waiting for the disk: its rows and its checkpoint are
/// one transaction, so a crash that loses the last batches loses both, and they are handled
/// again from the log (which every command appends with a full flush). Any later synchronous
/// commit (a command, a send attempt) flushes the WAL before it, batches included, so nothing
/// done on the strength of a projected row (a send job claimed, a schedule fired) can outlive
/// the row. Readers stop waiting for an fsync per batch, and commands share the disk with
/// fewer flushes.
const ASYNC_COMMIT: &str = "SET synchronous_commit = off";
/// The same lock for a whole session (a rebuild's), waiting for a running batch to finish.
/// Session and transaction-level advisory locks on one key conflict with each other.
const SESSION_LOCK: &str = "SELECT pg_advisory_lock(hashtext('subscription:' || $1))";

/// The most payload text a batch carries, past its first event: a batch is cut there
/// whatever its count. A count alone let a burst of large emails (a newsletter is one message
/// per recipient, each with the whole html) make batches of a thousand ~1 MB events: a
/// gigabyte read by each reader and copied again into each projection's statement, and past
/// PostgreSQL's 1 GB limit for one parameter the same batch failed for ever.
pub const BATCH_BYTES: usize = 8 << 20;

#[derive(Clone)]
pub struct Subscription {
    pool: PgPool,
    projection: Arc<dyn Projection<Postgres>>,
    batch_size: i64,
    batch_bytes: usize,
    poll_interval: Duration,
}

impl Subscription {
    pub fn new(pool: PgPool, projection: Arc<dyn Projection<Postgres>>) -> Self {
        Self {
            pool,
            projection,
            batch_size: 1000,
            batch_bytes: BATCH_BYTES,
            poll_interval: Duration::from_millis(500),
        }
    }

    pub fn with_batch_size(mut self, batch_size: i64) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The payload text at which a batch is cut ([`BATCH_BYTES`] unless set).
    pub fn with_batch_bytes(mut self, batch_bytes: usize) -> Self {
        self.batch_bytes = batch_bytes.max(1);
        self
    }

    /// How long [`Self::run`] waits for a wake-up before it looks anyway (500 ms unless set).
    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }

    pub fn name(&self) -> &'static str {
        self.projection.name()
    }

    /// Creates the checkpoint row if it does not exist yet.
    pub async fn ensure_checkpoint(&self) -> Result<(), ProjectionError> {
        sqlx::query(
            "INSERT INTO subscription_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING",
        )
        .bind(self.name())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Reads and handles at most one batch.
    pub async fn run_batch(&self) -> Result<BatchOutcome, ProjectionError> {
        let mut conn = self.pool.acquire().await?;
        let outcome = self.batch_on(&mut conn).await;
        if matches!(outcome, Ok(BatchOutcome::Handled(_) | BatchOutcome::Cut(_))) {
            // A batch's statements run to megabytes (a thousand events in, a thousand rows
            // out) and sqlx keeps a connection's buffers at their largest: without this,
            // every pooled connection that ever ran a batch would hold that much.
            conn.shrink_buffers();
        }
        outcome
    }

    async fn batch_on(&self, conn: &mut PgConnection) -> Result<BatchOutcome, ProjectionError> {
        let started = std::time::Instant::now();
        let mut tx = conn.begin().await?;
        // Every early return ends the transaction explicitly: a dropped sqlx transaction
        // only queues its ROLLBACK, and the pooled connection would keep the subscription
        // locked until it is next used.
        let locked: bool = sqlx::query_scalar(TRY_LOCK)
            .bind(self.name())
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            tx.rollback().await?;
            return Ok(BatchOutcome::Locked);
        }
        // A separate statement from the lock's, so its snapshot is taken after the lock was
        // granted and sees the checkpoint the previous holder committed.
        let checkpoint: Option<(String, i64)> = sqlx::query_as(
            "SELECT last_transaction_id::text, last_global_position FROM subscription_checkpoints \
             WHERE name = $1",
        )
        .bind(self.name())
        .fetch_optional(&mut *tx)
        .await?;
        // No checkpoint row yet (`ensure_checkpoint` not run): nothing to resume from.
        let Some((last_tx, last_pos)) = checkpoint else {
            tx.rollback().await?;
            return Ok(BatchOutcome::Locked);
        };
        // Cut at the batch's bytes by the server, which sends only the rows kept: the
        // payloads' running size over the batch's rows, in their order (already the index's,
        // so no sort), and the rows before the cap is reached, the first one always.
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM ( \
               SELECT b.*, sum(octet_length(b.payload::text)) \
                        OVER (ORDER BY b.transaction_id, b.global_position) \
                      - octet_length(b.payload::text) AS bytes_before \
               FROM (SELECT * FROM events \
                     WHERE (transaction_id, global_position) > ($1::xid8, $2) \
                       AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                     ORDER BY events.transaction_id, events.global_position LIMIT $3) b) events \
             WHERE bytes_before < $4 \
             ORDER BY events.transaction_id, events.global_position"
        );
        let events: Vec<StoredEvent> = sqlx::query_as(&sql)
            .bind(&last_tx)
            .bind(last_pos)
            .bind(self.batch_size)
            .bind(i64::try_from(self.batch_bytes).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
        if events.is_empty() {
            // Whether the log's last row lies past the checkpoint: one step of the index
            // from its end. (`EXISTS (... WHERE (..) > (..))` was planned generically as a
            // sequential scan that read the whole log on every idle wake-up.)
            let newer: Option<bool> = sqlx::query_scalar(
                "SELECT (transaction_id, global_position) > ($1::xid8, $2) FROM events \
                 ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
            )
            .bind(&last_tx)
            .bind(last_pos)
            .fetch_optional(&mut *tx)
            .await?;
            let newer = newer.unwrap_or(false);
            tx.rollback().await?;
            return Ok(if newer {
                BatchOutcome::Behind
            } else {
                BatchOutcome::Idle
            });
        }
        if let Err(error) = self.projection.handle_batch(&mut tx, &events).await {
            tx.rollback().await?;
            return Err(error);
        }
        self.advance(&mut tx, &events).await?;
        tx.commit().await?;
        // The batch's transaction holds a transaction id from its first write to its commit,
        // and no reader reads past it meanwhile: a slow `handle_batch` delays every
        // subscription, not only its own.
        tracing::debug!(
            subscription = self.name(),
            events = events.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "batch handled"
        );
        Ok(batch_outcome(&events, self.batch_size, self.batch_bytes))
    }

    /// Handles batches until nothing is left that is safe to read; returns how many events.
    /// Waits briefly while an older transaction holds newer events back.
    pub async fn catch_up(&self) -> Result<u64, ProjectionError> {
        self.ensure_checkpoint().await?;
        catch_up_with(|| self.run_batch()).await
    }

    /// Reads the whole log again into the read model.
    ///
    /// A projection that names its tables ([`Projection::tables`]) is rebuilt beside them
    /// ([`crate::shadow`]): the live tables stay whole until the rebuilt copies take their
    /// place, with the checkpoint, in one transaction; a rebuild that stops before that
    /// leaves them and their checkpoint as they were. Any other is emptied with its
    /// checkpoint in one transaction and filled again in place, each batch committed with its
    /// checkpoint as in [`Self::run_batch`], so an interrupted rebuild resumes from its last
    /// batch.
    ///
    /// The log is read ahead while the batches are written: one connection streams the events
    /// (everything below the oldest running transaction when the read starts, in checkpoint
    /// order) while another applies them batch by batch. Beside the live tables, a projection
    /// whose rows depend on each aggregate's events alone
    /// ([`Projection::independent_aggregates`]) reads them aggregate by aggregate instead,
    /// and two connections write its batches side by side (each batch its own aggregates);
    /// its copies take over at the greatest checkpoint pair the read returned. The writer
    /// holds the subscription's lock at session level for the whole rebuild (waiting for a
    /// running instance to finish its batch), so no other instance takes a batch between two
    /// of ours (a read-ahead batch can never be stale) and other subscriptions keep moving
    /// meanwhile; it is a connection of its own, outside the pool, so that however the
    /// rebuild ends the lock ends with it.
    /// What was committed after the read began is then read by [`Self::catch_up`].
    pub async fn rebuild(&self) -> Result<u64, ProjectionError> {
        self.ensure_checkpoint().await?;
        let mut writer = PgConnection::connect_with(&self.pool.connect_options()).await?;
        sqlx::query(SESSION_LOCK)
            .bind(self.name())
            .execute(&mut writer)
            .await?;
        sqlx::query(ASYNC_COMMIT).execute(&mut writer).await?;
        let tables = self.projection.tables();
        let shadow = if tables.is_empty() {
            None
        } else {
            Some(Shadow::create(&mut writer, self.name(), tables).await?)
        };
        let rebuilt = self.rebuild_on(&mut writer, shadow.as_ref()).await;
        if let (Err(_), Some(shadow)) = (&rebuilt, &shadow) {
            shadow.discard(&mut writer).await;
        }
        let total = rebuilt?;
        // Closing the connection ends the session lock.
        writer.close().await?;
        Ok(total + self.catch_up().await?)
    }

    /// The rebuild's reset, read and writes on its `writer` (which holds the lock), into
    /// `shadow`'s copies when there are any; returns how many events it handled.
    async fn rebuild_on(
        &self,
        writer: &mut PgConnection,
        shadow: Option<&Shadow>,
    ) -> Result<u64, ProjectionError> {
        let mut tx = writer.begin().await?;
        // Beside the live tables this empties the new copies (and resets whatever the
        // projection keeps about its tables); in place, the live tables.
        self.projection.reset(&mut tx).await?;
        if shadow.is_none() {
            sqlx::query(
                "UPDATE subscription_checkpoints SET last_transaction_id = '0', \
                 last_global_position = 0, events_handled = 0, updated_at = now() WHERE name = $1",
            )
            .bind(self.name())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;

        let options = self.pool.connect_options();
        // A second connection beside the writer: in a rebuild by aggregate it writes batches
        // too (whichever comes next), in log order it prepares them (`Projection::prepare`),
        // and at the end it builds half of the copies' indexes. It does not hold the
        // subscription's lock: the writer's session lock covers the whole rebuild.
        let mut helper = match shadow {
            Some(shadow) => {
                let mut helper = PgConnection::connect_with(&options).await?;
                sqlx::query(ASYNC_COMMIT).execute(&mut helper).await?;
                shadow.enter(&mut helper).await?;
                Some(helper)
            }
            None => None,
        };
        let order = if shadow.is_some() && self.projection.independent_aggregates() {
            ReadOrder::ByAggregate
        } else {
            ReadOrder::Log
        };
        let (batches, to_write) = tokio::sync::mpsc::channel::<(u64, Vec<StoredEvent>)>(2);
        let reader = tokio::spawn(read_log(
            (*options).clone(),
            (self.batch_size as usize, self.batch_bytes),
            order,
            batches,
        ));
        let to_write = tokio::sync::Mutex::new(to_write);
        let written = watch::Sender::new(Written::default());
        let in_place = shadow.is_none();
        let wrote = match (order, helper.as_mut()) {
            (ReadOrder::ByAggregate, Some(helper)) => tokio::try_join!(
                self.write_batches(&mut *writer, &to_write, &written, in_place),
                self.write_batches(helper, &to_write, &written, in_place),
            )
            .map(|(a, b)| a + b),
            (ReadOrder::Log, Some(helper)) => {
                let (prepared, to_commit) = tokio::sync::mpsc::channel(1);
                tokio::try_join!(
                    self.prepare_batches(helper, &to_write, prepared),
                    self.write_prepared(&mut *writer, to_commit),
                )
                .map(|((), total)| total)
            }
            (_, None) => {
                self.write_batches(&mut *writer, &to_write, &written, in_place)
                    .await
            }
        };
        // The reader stops at its next batch once nobody takes them.
        drop(to_write);
        let read = reader
            .await
            .map_err(|e| ProjectionError::Other(format!("the rebuild's reader stopped: {e}")))?;
        let total = wrote?;
        // Where the read ended: the copies take the live tables' place there.
        let (transaction_id, position) = read?;
        if let Some(shadow) = shadow {
            let checkpoint = (transaction_id.0.to_string(), position);
            shadow
                .swap(
                    &mut *writer,
                    helper.as_mut(),
                    (self.name(), self.projection.channel()),
                    checkpoint,
                    total,
                )
                .await?;
        }
        if let Some(helper) = helper {
            // After the swap: a failure to say goodbye changes nothing.
            let _ = helper.close().await;
        }
        Ok(total)
    }

    /// A rebuild's preparer, beside its copies in log order: prepares each read batch in turn
    /// ([`Projection::prepare`], reading the log on `log`) and hands it to
    /// [`Self::write_prepared`], one batch ahead of it at most.
    async fn prepare_batches(
        &self,
        log: &mut PgConnection,
        to_write: &tokio::sync::Mutex<tokio::sync::mpsc::Receiver<(u64, Vec<StoredEvent>)>>,
        prepared: tokio::sync::mpsc::Sender<PreparedBatch>,
    ) -> Result<(), ProjectionError> {
        let mut to_write = to_write.lock().await;
        while let Some((_, events)) = to_write.recv().await {
            let batch = match self.projection.prepare(&mut *log, &events).await? {
                Some(writes) => PreparedBatch::Ready(events.len(), writes),
                None => PreparedBatch::Events(events),
            };
            if prepared.send(batch).await.is_err() {
                // The writer stopped: its error is the one reported.
                break;
            }
        }
        Ok(())
    }

    /// A rebuild's writer behind [`Self::prepare_batches`]: writes each batch in a transaction
    /// of its own, in order; returns how many events it handled.
    async fn write_prepared(
        &self,
        conn: &mut PgConnection,
        mut prepared: tokio::sync::mpsc::Receiver<PreparedBatch>,
    ) -> Result<u64, ProjectionError> {
        let mut total = 0u64;
        while let Some(batch) = prepared.recv().await {
            let mut tx = conn.begin().await?;
            total += match batch {
                PreparedBatch::Ready(events, writes) => {
                    writes.write(&mut tx).await?;
                    events as u64
                }
                PreparedBatch::Events(events) => {
                    self.projection.handle_batch(&mut tx, &events).await?;
                    events.len() as u64
                }
            };
            tx.commit().await?;
        }
        Ok(total)
    }

    /// One of a rebuild's writers: takes the read batches in turn and handles each in a
    /// transaction of its own (with the checkpoint, `in_place`), until none are left; returns
    /// how many events it handled. A batch that continues an aggregate the batch before it
    /// began (its first event is not the aggregate's first) waits until every earlier batch
    /// is written: only a rebuild by aggregate has several writers, and there each batch
    /// starts its aggregates, except when one aggregate filled [`AGGREGATE_SPLIT`] batches.
    async fn write_batches(
        &self,
        conn: &mut PgConnection,
        to_write: &tokio::sync::Mutex<tokio::sync::mpsc::Receiver<(u64, Vec<StoredEvent>)>>,
        written: &watch::Sender<Written>,
        in_place: bool,
    ) -> Result<u64, ProjectionError> {
        let mut earlier = written.subscribe();
        let mut total = 0u64;
        loop {
            let next = to_write.lock().await.recv().await;
            let Some((index, events)) = next else {
                return Ok(total);
            };
            if events.first().is_some_and(|e| e.sequence > 1) {
                earlier
                    .wait_for(|w| w.through >= index)
                    .await
                    .map_err(|e| ProjectionError::Other(e.to_string()))?;
            }
            let mut tx = conn.begin().await?;
            self.projection.handle_batch(&mut tx, &events).await?;
            if in_place {
                self.advance(&mut tx, &events).await?;
            }
            tx.commit().await?;
            total += events.len() as u64;
            written.send_modify(|w| w.done(index));
        }
    }

    /// Moves the checkpoint past `events` (non-empty, in log order), in the batch's transaction.
    async fn advance(
        &self,
        conn: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        let Some(last) = events.last() else {
            return Ok(());
        };
        sqlx::query(
            "UPDATE subscription_checkpoints SET last_transaction_id = $2::xid8, \
             last_global_position = $3, events_handled = events_handled + $4, updated_at = now() \
             WHERE name = $1",
        )
        .bind(self.name())
        .bind(last.transaction_id.0.to_string())
        .bind(last.global_position)
        .bind(events.len() as i64)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Runs until `shutdown` turns true: woken by `wake` (NOTIFY on new events), with a
    /// polling fallback. Errors are logged and retried with backoff; the reader never dies on
    /// one bad batch.
    ///
    /// Its batches run on a connection it keeps ([`KeptConnection`]), not one taken from the
    /// pool for each: a batch is seven statements, and the pool's checks were two more round
    /// trips. (Tried once before with generic plans, which froze the message list's read of a
    /// batch's rows as a sequential scan; a kept connection plans each statement for its values.)
    pub async fn run(self, wake: watch::Receiver<u64>, shutdown: watch::Receiver<bool>) {
        let name = self.name();
        let pace = Pace {
            batch_size: self.batch_size,
            poll_interval: self.poll_interval,
            gather: self.projection.gather(),
        };
        let kept = tokio::sync::Mutex::new(KeptConnection::new());
        run_until_shutdown_saying(
            name,
            pace,
            wake,
            shutdown,
            || async { self.run_batch_kept(&mut *kept.lock().await).await },
            || oldest_transaction(&self.pool),
        )
        .await;
        kept.lock().await.close().await;
    }

    /// [`Self::run_batch`] on a kept connection, forgotten after an error.
    async fn run_batch_kept(
        &self,
        kept: &mut KeptConnection,
    ) -> Result<BatchOutcome, ProjectionError> {
        let conn = kept.ready(&self.pool).await?;
        let outcome = self.batch_on(conn).await;
        match outcome {
            Ok(BatchOutcome::Handled(_) | BatchOutcome::Cut(_)) => conn.shrink_buffers(),
            Ok(_) => {}
            Err(_) => kept.discard(),
        }
        outcome
    }
}

/// The order a rebuild reads the log in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ReadOrder {
    /// The checkpoint's order, `(transaction_id, global_position)`, in batches of the batch
    /// size.
    Log,
    /// Aggregate by aggregate, each one's events in sequence (the log's primary key), for a
    /// projection whose rows depend on each aggregate's events alone
    /// ([`Projection::independent_aggregates`]). A batch ends where an aggregate does once it
    /// holds the batch size, so batches can be written side by side; it ends mid-aggregate
    /// only once it holds [`AGGREGATE_SPLIT`] times the batch size.
    ByAggregate,
}

/// A batch between a rebuild's preparer and its writer.
enum PreparedBatch {
    /// Prepared: this many events, and their writes.
    Ready(usize, Box<dyn Prepared<Postgres>>),
    /// Not preparable: the writer handles the events.
    Events(Vec<StoredEvent>),
}

/// How many batches' worth of events a batch of a rebuild by aggregate holds before it ends
/// in the middle of an aggregate (and the batch that continues it waits for the ones before).
const AGGREGATE_SPLIT: usize = 16;

/// Which of a rebuild's batches are written (their indexes from 0, in read order).
#[derive(Default)]
struct Written {
    /// Every batch below this one is written.
    through: u64,
    /// Written batches above `through`.
    beyond: std::collections::BTreeSet<u64>,
}

impl Written {
    fn done(&mut self, index: u64) {
        self.beyond.insert(index);
        while self.beyond.remove(&self.through) {
            self.through += 1;
        }
    }
}

/// A rebuild's read of the log: everything below the oldest running transaction when it
/// starts, in `order`, sent as numbered batches until the writers stop taking them. Returns
/// the greatest checkpoint pair among the events read (the last one's, in log order): where
/// the rebuilt read model takes over.
///
/// The log is walked through its indexes rather than sorted: the planner's choice for the
/// whole log in checkpoint order is a parallel scan and a sort that spills to disk (at 100k
/// events, 190 ms before the first row, 30 MB of temporary files, three processes on two
/// cores), where the `events_tail` index gives the first row at once and all of them in 75 ms
/// (EXPLAIN ANALYZE on the bench's log); the read's own connection has sorts disabled to
/// that end. That connection is outside the pool: however the rebuild ends, the read ends with
/// it (a pooled connection would first drain the rest of the log). Its upper bound is computed once, as a parameter (a scalar
/// subquery): in aggregate order it is a filter, and called for each row the snapshot
/// functions took half the read's time (0.84 s against 1.63 s for 1.71M events, EXPLAIN ANALYZE).
async fn read_log(
    options: sqlx::postgres::PgConnectOptions,
    (batch_size, batch_bytes): (usize, usize),
    order: ReadOrder,
    batches: tokio::sync::mpsc::Sender<(u64, Vec<StoredEvent>)>,
) -> Result<(TxId, i64), sqlx::Error> {
    let mut conn = PgConnection::connect_with(&options).await?;
    sqlx::query("SET enable_sort = off")
        .execute(&mut conn)
        .await?;
    let order_by = match order {
        ReadOrder::Log => "events.transaction_id, events.global_position",
        ReadOrder::ByAggregate => "aggregate_type, aggregate_id, sequence",
    };
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events \
         WHERE transaction_id < (SELECT pg_snapshot_xmin(pg_current_snapshot())) \
         ORDER BY {order_by}"
    );
    let mut last = (TxId(0), 0);
    let mut index = 0u64;
    let mut batch: Vec<StoredEvent> = Vec::with_capacity(batch_size);
    let mut bytes = 0;
    {
        let mut rows = sqlx::query_as::<_, StoredEvent>(&sql).fetch(&mut conn);
        while let Some(event) = rows.try_next().await? {
            last = last.max((event.transaction_id, event.global_position));
            // By count or by bytes, as a live batch; by aggregate, split within a message
            // only past either's share.
            let full = (batch.len() >= batch_size || bytes >= batch_bytes)
                && match order {
                    ReadOrder::Log => true,
                    ReadOrder::ByAggregate => {
                        batch.len() >= batch_size * AGGREGATE_SPLIT
                            || bytes >= batch_bytes.saturating_mul(AGGREGATE_SPLIT)
                            || batch.last().is_some_and(|last| {
                                last.aggregate_id != event.aggregate_id
                                    || last.aggregate_type != event.aggregate_type
                            })
                    }
                };
            if full {
                bytes = 0;
                let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
                if batches.send((index, full)).await.is_err() {
                    // The writers stopped (their error is the one reported).
                    return Ok(last);
                }
                index += 1;
            }
            bytes += event.payload.len();
            batch.push(event);
        }
    }
    if !batch.is_empty() {
        let _ = batches.send((index, batch)).await;
    }
    // Everything was read: a failure to say goodbye loses nothing.
    let _ = conn.close().await;
    Ok(last)
}

/// Runs batches until none is left to handle; returns how many events were handled.
pub(crate) async fn catch_up_with<F, Fut>(mut run_batch: F) -> Result<u64, ProjectionError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<BatchOutcome, ProjectionError>>,
{
    let mut total = 0u64;
    loop {
        match run_batch().await? {
            BatchOutcome::Handled(n) | BatchOutcome::Cut(n) => total += n as u64,
            BatchOutcome::Behind | BatchOutcome::Locked => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            BatchOutcome::Idle => return Ok(total),
        }
    }
}

/// After a batch that was not full, how long a reader lets new events gather before it reads
/// again. Without it, under a steady load every subscription ran two transactions per
/// event (one that handled it, one that found nothing), each a handful of statements: most of
/// PostgreSQL's CPU, taken from the commands themselves. 25 ms rather than 10: three readers'
/// batches (each a transaction of about seven statements) were still a large share of the
/// cores under load. Measured with the bench (`--only commands,lag --clients 1,8`, three runs
/// each, alternated): in-process composes at 1 client 2079 → 2611 msg/s on average, at 8
/// clients 4435 → 5171, lag p99 (list / feed) 34 / 28 → 52 / 43 ms. A wake-up after an idle
/// spell is read at once; only a steady stream waits for it. The default of
/// [`Projection::gather`]: a projection on the sending path (delivery) gathers for less.
pub const GATHER: Duration = Duration::from_millis(25);

/// What handling `events` was: [`BatchOutcome::Cut`] when the batch stopped short of its count
/// with its bytes reached (more may wait: read again at once).
pub(crate) fn batch_outcome(
    events: &[StoredEvent],
    batch_size: i64,
    batch_bytes: usize,
) -> BatchOutcome {
    let bytes: usize = events.iter().map(|e| e.payload.len()).sum();
    if (events.len() as i64) < batch_size && bytes >= batch_bytes {
        BatchOutcome::Cut(events.len())
    } else {
        BatchOutcome::Handled(events.len())
    }
}

/// How a reader paces its batches.
pub(crate) struct Pace {
    pub batch_size: i64,
    pub poll_interval: Duration,
    /// See [`Projection::gather`].
    pub gather: Duration,
}

/// A reader's loop, whatever the backend: a batch after each wake-up or poll interval, the
/// next one at once while batches come back full, after the projection's gather pause
/// ([`GATHER`] by default) when one was not, backoff after errors.
pub(crate) async fn run_until_shutdown<F, Fut>(
    name: &'static str,
    pace: Pace,
    wake: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    run_batch: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<BatchOutcome, ProjectionError>>,
{
    let no_one = || std::future::ready(None);
    run_until_shutdown_saying(name, pace, wake, shutdown, run_batch, no_one).await;
}

/// [`run_until_shutdown`], with `blocker` to say what holds the reader back when it has been
/// [`BatchOutcome::Behind`] for long (see [`BehindWatch`]).
pub(crate) async fn run_until_shutdown_saying<F, Fut, B, BFut>(
    name: &'static str,
    pace: Pace,
    mut wake: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
    mut run_batch: F,
    blocker: B,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<BatchOutcome, ProjectionError>>,
    B: Fn() -> BFut,
    BFut: Future<Output = Option<String>>,
{
    let mut failures = 0u32;
    let mut behind = BehindWatch::default();
    loop {
        if *shutdown.borrow() {
            return;
        }
        wake.borrow_and_update();
        let outcome = run_batch().await;
        let now = std::time::Instant::now();
        if !matches!(outcome, Ok(BatchOutcome::Behind)) {
            behind.clear();
        } else if let Some(waited) = behind.warning_due(now) {
            let held_by = blocker()
                .await
                .unwrap_or_else(|| "a transaction still running on the server".into());
            tracing::warn!(
                subscription = name,
                waited_s = waited.as_secs(),
                %held_by,
                "the read model waits for an older transaction to end: it reads only events \
                 below the oldest one running, and nothing new is projected (or sent) until \
                 it ends"
            );
        }
        let pause = match outcome {
            Ok(BatchOutcome::Cut(_)) => {
                failures = 0;
                continue;
            }
            Ok(BatchOutcome::Handled(n)) if n as i64 >= pace.batch_size => {
                failures = 0;
                continue;
            }
            Ok(BatchOutcome::Handled(_)) => {
                failures = 0;
                // Not a wake-up: only the pause (or shutdown) ends it.
                tokio::select! {
                    _ = tokio::time::sleep(pace.gather) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            Ok(BatchOutcome::Behind) => behind.pause(now),
            Ok(BatchOutcome::Idle | BatchOutcome::Locked) => {
                failures = 0;
                pace.poll_interval
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let pause = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                tracing::error!(subscription = name, %error, retry_in_ms = pause.as_millis() as u64, "projection batch failed");
                pause
            }
        };
        let woken_by_events = failures == 0 && !behind.long(now);
        tokio::select! {
            // A closed wake channel (the listener stopped) leaves the poll to wake us.
            Ok(()) = wake.changed(), if woken_by_events => {}
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// How long a reader has found newer events it may not read yet ([`BatchOutcome::Behind`]).
/// Usually a few milliseconds (a command committing); a transaction left open anywhere on the
/// server holds every reader back until it ends, and that is said in the log, once it has
/// lasted [`BehindWatch::WARN_AFTER`] and again every [`BehindWatch::WARN_EVERY`], while the
/// reader looks again less often.
#[derive(Debug, Default)]
pub struct BehindWatch {
    since: Option<std::time::Instant>,
    warned: Option<std::time::Instant>,
}

impl BehindWatch {
    pub const WARN_AFTER: Duration = Duration::from_secs(10);
    pub const WARN_EVERY: Duration = Duration::from_secs(60);
    /// Looked at again this soon for the first second (a command's commit is that short)...
    pub const PAUSE: Duration = Duration::from_millis(5);
    /// ...and this soon after (six statements each time, in every instance).
    pub const LONG_PAUSE: Duration = Duration::from_millis(100);

    /// The reader is not behind (any other outcome).
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// The reader found itself behind at `now`: how long it has been, when that is to be said.
    pub fn warning_due(&mut self, now: std::time::Instant) -> Option<Duration> {
        let since = *self.since.get_or_insert(now);
        let waited = now.saturating_duration_since(since);
        let due = waited >= Self::WARN_AFTER
            && self
                .warned
                .is_none_or(|at| now.saturating_duration_since(at) >= Self::WARN_EVERY);
        if due {
            self.warned = Some(now);
        }
        due.then_some(waited)
    }

    /// How long to wait before looking again.
    pub fn pause(&self, now: std::time::Instant) -> Duration {
        if self.long(now) {
            Self::LONG_PAUSE
        } else {
            Self::PAUSE
        }
    }

    /// Behind for a second or more: new events' wake-ups are no reason to look again (the old
    /// transaction's end sends none), only the pause is.
    pub fn long(&self, now: std::time::Instant) -> bool {
        self.since
            .is_some_and(|since| now.saturating_duration_since(since) >= Duration::from_secs(1))
    }
}

/// What holds back the readers of the server `pool` is on: its oldest transaction that has an
/// id (or a prepared one), found by its id's age (another role's session shows its id but not
/// its start), named by what `pg_stat_activity` shows this role of it. Never its statement
/// (it may hold data).
pub async fn oldest_transaction(pool: &PgPool) -> Option<String> {
    #[derive(sqlx::FromRow)]
    struct Running {
        pid: i32,
        datname: Option<String>,
        usename: Option<String>,
        application_name: Option<String>,
        state: Option<String>,
        age: Option<f64>,
    }
    let running: Option<Running> = sqlx::query_as(
        "SELECT pid, datname::text AS datname, usename::text AS usename, application_name, \
                    state, EXTRACT(EPOCH FROM now() - xact_start)::float8 AS age \
             FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
             ORDER BY age(backend_xid) DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .ok()
    .flatten();
    let prepared: Option<(String, Option<String>, f64)> = sqlx::query_as(
        "SELECT gid, database::text, EXTRACT(EPOCH FROM now() - prepared)::float8 \
         FROM pg_prepared_xacts ORDER BY prepared LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .ok()
    .flatten();
    let text = |v: &Option<String>| v.as_deref().unwrap_or("?").to_string();
    let mut said = Vec::new();
    if let Some(r) = running {
        said.push(format!(
            "backend {} (database {}, user {}, application `{}`, {}), its transaction open {:.0} s",
            r.pid,
            text(&r.datname),
            text(&r.usename),
            text(&r.application_name),
            text(&r.state),
            r.age.unwrap_or(0.0)
        ));
    }
    if let Some((gid, db, age)) = prepared {
        said.push(format!(
            "prepared transaction `{gid}` (database {}), prepared {age:.0} s ago",
            text(&db)
        ));
    }
    (!said.is_empty()).then(|| said.join("; "))
}

/// How far a subscription is behind the log, for `/metrics` and `/v1/subscriptions`.
pub async fn lag(pool: &PgPool, name: &str) -> Result<i64, ProjectionError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM events e, subscription_checkpoints c WHERE c.name = $1 \
         AND (e.transaction_id, e.global_position) > (c.last_transaction_id, c.last_global_position)",
    )
    .bind(name)
    .fetch_one(pool)
    .await?)
}

#[cfg(test)]
mod behind_tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_reader_behind_for_long_looks_less_often_and_says_so_once_a_minute() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut watch = BehindWatch::default();
        // A command committing: a few quick looks, nothing said.
        assert_eq!(watch.warning_due(at(0)), None);
        assert_eq!(watch.pause(at(0)), BehindWatch::PAUSE);
        assert_eq!(watch.warning_due(at(999)), None);
        assert_eq!(watch.pause(at(999)), BehindWatch::PAUSE);
        // Past a second: looked at less often.
        assert_eq!(watch.pause(at(1_000)), BehindWatch::LONG_PAUSE);
        assert_eq!(watch.warning_due(at(9_999)), None);
        assert!(watch.long(at(1_000)));
        // Said at ten seconds, then not again for a minute.
        assert_eq!(watch.warning_due(at(10_000)), Some(Duration::from_secs(10)));
        assert_eq!(watch.warning_due(at(10_100)), None);
        assert_eq!(watch.warning_due(at(69_999)), None);
        assert_eq!(watch.warning_due(at(70_000)), Some(Duration::from_secs(70)));
        // Caught up: a new wait starts from nothing.
        watch.clear();
        assert_eq!(watch.warning_due(at(80_000)), None);
        assert_eq!(watch.pause(at(80_000)), BehindWatch::PAUSE);
    }
}
