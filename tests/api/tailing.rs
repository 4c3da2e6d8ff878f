//! Tailing the log: transactions that commit out of order, concurrent readers, and a reader
//! killed mid-batch.

use crate::helpers::*;
use async_trait::async_trait;
use chrono::Utc;
use messaging::store::postgres::PgStore;
use messaging::store::{PerService, Store};
use messaging_domain::*;
use messaging_projections::{
    BatchOutcome, MessageList, Projection, ProjectionError, StateChangeFeed, StoredEvent,
    Subscription,
};
use sqlx::{Connection, PgConnection, PgPool, Postgres};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Records every event it is handed, in the order handed.
struct Recorder;

#[async_trait]
impl Projection<Postgres> for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        for e in events {
            // The unique key makes a second delivery of one event fail the batch loudly.
            sqlx::query("INSERT INTO recorded (global_position, transaction_id) VALUES ($1, $2)")
                .bind(e.global_position)
                .bind(e.transaction_id.0 as i64)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("DELETE FROM recorded").execute(conn).await?;
        Ok(())
    }
}

async fn recorder_setup() -> (PgPool, Subscription) {
    let pool = migrated_pool().await;
    sqlx::query(
        "CREATE TABLE recorded (seq bigserial PRIMARY KEY, global_position bigint UNIQUE NOT NULL, \
         transaction_id bigint NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let sub = Subscription::new(pool.clone(), Arc::new(Recorder)).with_batch_size(16);
    sub.ensure_checkpoint().await.unwrap();
    (pool, sub)
}

async fn insert_probe(conn: &mut PgConnection, aggregate: &str, sequence: i64) {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) VALUES ('Probe', $1, $2, 'Probed', '1', '{}', '{}')",
    )
    .bind(aggregate)
    .bind(sequence)
    .execute(conn)
    .await
    .unwrap();
}

async fn recorded(pool: &PgPool) -> Vec<(i64, i64)> {
    sqlx::query_as("SELECT transaction_id, global_position FROM recorded ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_event_committed_late_is_not_skipped() {
    let (pool, sub) = recorder_setup().await;
    // A takes the first position but commits last.
    let mut a = pool.begin().await.unwrap();
    insert_probe(&mut a, "a", 1).await;
    for name in ["b", "c"] {
        let mut tx = pool.begin().await.unwrap();
        insert_probe(&mut tx, name, 1).await;
        tx.commit().await.unwrap();
    }
    // B and C are committed, but reading them now would move the checkpoint past A.
    assert_eq!(sub.run_batch().await.unwrap(), BatchOutcome::Behind);
    assert!(recorded(&pool).await.is_empty());

    a.commit().await.unwrap();
    assert_eq!(sub.catch_up().await.unwrap(), 3);
    let seen = recorded(&pool).await;
    assert_eq!(seen.iter().map(|s| s.1).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(sub.run_batch().await.unwrap(), BatchOutcome::Idle);
}

/// Records the positions of each batch it is given.
#[derive(Default)]
struct Batches(std::sync::Mutex<Vec<Vec<i64>>>);

#[async_trait]
impl Projection<Postgres> for Batches {
    fn name(&self) -> &'static str {
        "batches"
    }
    async fn handle_batch(
        &self,
        _conn: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        let positions = events.iter().map(|e| e.global_position).collect();
        self.0.lock().unwrap().push(positions);
        Ok(())
    }
    async fn reset(&self, _conn: &mut PgConnection) -> Result<(), ProjectionError> {
        self.0.lock().unwrap().clear();
        Ok(())
    }
}

/// A batch is cut at its payload's bytes as well as at its count (a burst of large emails made
/// gigabyte batches, and past PostgreSQL's 1 GB parameter a batch that failed for ever): the
/// server sends only the rows before the cap is reached (a batch passes it by its last event
/// at most), the reader reads on at once, and live or rebuilt, every event is seen once, in
/// order.
#[tokio::test]
async fn a_batch_is_cut_at_its_bytes_and_every_event_is_still_seen_once() {
    let pool = migrated_pool().await;
    let batches = Arc::new(Batches::default());
    let sub = Subscription::new(pool.clone(), batches.clone())
        .with_batch_size(16)
        .with_batch_bytes(1000);
    sub.ensure_checkpoint().await.unwrap();
    for (n, size) in [600, 600, 600, 2500, 10].into_iter().enumerate() {
        let payload = serde_json::json!({ "text": "x".repeat(size) }).to_string();
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata) VALUES ('Probe', $1, 1, 'Probed', '1', $2::json, '{}')",
        )
        .bind(format!("p{n}"))
        .bind(payload)
        .execute(&pool)
        .await
        .unwrap();
    }
    let cut: Vec<Vec<i64>> = vec![vec![1, 2], vec![3, 4], vec![5]];
    // 600 + 600 bytes reach the cap: two events, not sixteen; then 600 and 2500.
    assert_eq!(sub.run_batch().await.unwrap(), BatchOutcome::Cut(2));
    assert_eq!(sub.run_batch().await.unwrap(), BatchOutcome::Cut(2));
    assert_eq!(sub.run_batch().await.unwrap(), BatchOutcome::Handled(1));
    assert_eq!(*batches.0.lock().unwrap(), cut);
    assert_eq!(sub.run_batch().await.unwrap(), BatchOutcome::Idle);

    // A rebuild reads the log in batches cut the same way.
    assert_eq!(sub.rebuild().await.unwrap(), 5);
    assert_eq!(*batches.0.lock().unwrap(), cut);
}

/// A transaction left open holds every reader back (they read only below the oldest running
/// one): what holds them is named for the log, by what the server shows of it, never by its
/// statement.
#[tokio::test]
async fn a_transaction_left_open_is_named_as_what_holds_the_readers_back() {
    use messaging_projections::subscription::oldest_transaction;
    let (pool, sub) = recorder_setup().await;
    use sqlx::ConnectOptions;
    let mut stuck = (*pool.connect_options())
        .clone()
        .application_name("nightly-report")
        .connect()
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; SELECT pg_current_xact_id(); SELECT 'secret-literal-42'")
        .execute(&mut stuck)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    insert_probe(&mut conn, "a", 1).await;
    assert_eq!(sub.run_batch().await.unwrap(), BatchOutcome::Behind);
    let said = oldest_transaction(&pool)
        .await
        .expect("something holds the readers");
    assert!(
        said.contains("application `nightly-report`") && said.contains("idle in transaction"),
        "{said}"
    );
    assert!(!said.contains("secret-literal-42"), "{said}");
    sqlx::raw_sql("COMMIT").execute(&mut stuck).await.unwrap();
    assert_eq!(sub.catch_up().await.unwrap(), 1);
}

#[tokio::test]
async fn concurrent_writers_committing_out_of_order_are_each_seen_once_in_a_valid_order() {
    let (pool, sub) = recorder_setup().await;
    const WRITERS: usize = 6;
    const TRANSACTIONS: usize = 40;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut written = 0;
                for t in 0..TRANSACTIONS {
                    let mut tx = pool.begin().await.unwrap();
                    let n = 1 + (w + t) % 3;
                    for i in 0..n {
                        insert_probe(&mut tx, &format!("w{w}-t{t}"), i as i64 + 1).await;
                    }
                    // Hold some transactions open while others commit.
                    tokio::time::sleep(Duration::from_millis(((w * 7 + t * 13) % 9) as u64)).await;
                    tx.commit().await.unwrap();
                    written += n;
                }
                written
            })
        })
        .collect();
    // Two readers of the same subscription race each other and the writers.
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let sub = sub.clone();
            tokio::spawn(async move {
                for _ in 0..400 {
                    sub.run_batch().await.expect("a batch never fails");
                    tokio::time::sleep(Duration::from_millis(1)).await;
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

    let seen = recorded(&pool).await;
    assert_eq!(seen.len(), total, "every event exactly once");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "handed over in (transaction id, position) order"
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events as usize, total);
}

/// Fails after handling `remaining` events: a crash in the middle of a batch, after the
/// batch's first events were written.
struct CrashAfter {
    inner: Arc<dyn Projection<Postgres>>,
    remaining: AtomicUsize,
}

#[async_trait]
impl Projection<Postgres> for CrashAfter {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
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
    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        self.inner.reset(conn).await
    }
}

/// Composes email `i` from one SendGrid account through `PgStore::execute`.
async fn composed(store: &PgStore, i: usize, dispatch: Dispatch) -> MessageId {
    let (id, compose) = compose_command(i, dispatch);
    store.execute(id, compose).await.unwrap();
    id
}

/// A Compose command for a new email to `p{i}@example.com`, and the new message's id.
fn compose_command(i: usize, dispatch: Dispatch) -> (MessageId, MessageCommand) {
    // No `services` row is needed below the API.
    let service = ServiceRef {
        id: ServiceId::from_uuid(uuid::Uuid::nil()),
        channel: Channel::Email,
        provider: Provider::Sendgrid,
        username: "news@example.com".into(),
        name: None,
    };
    let id = MessageId::from_uuid(uuid::Uuid::now_v7());
    let input = MessageInput {
        to: vec![Profile::new(format!("p{i}@example.com"), None)],
        subject: Some("s".into()),
        text: Some("t".into()),
        ..Default::default()
    };
    let compose = MessageCommand::Compose(Compose {
        id,
        message: build_message(&service, input).unwrap(),
        dispatch,
        now: Utc::now(),
    });
    (id, compose)
}

async fn write_history(pool: &PgPool) {
    let store = PgStore::new(pool.clone());
    for i in 0..30u32 {
        let dispatch = if i % 4 == 0 {
            Dispatch::Draft
        } else {
            Dispatch::Now
        };
        let id = composed(&store, i as usize, dispatch).await;
        let now = Utc::now();
        let fact = |n: u32| Fact {
            fact_id: format!("{i}-{n}"),
            occurred_at: now,
        };
        let mut commands = Vec::new();
        if i % 4 != 0 {
            commands.push(MessageCommand::StartSendAttempt { now, attempt: 1 });
            commands.push(MessageCommand::RecordSent {
                provider_message_id: Some(format!("sg-{i}")),
                at: now,
            });
            for n in 0..(i % 5) {
                commands.push(MessageCommand::RecordOpen {
                    fact: fact(n),
                    machine_open: false,
                });
            }
            if i % 3 == 0 {
                commands.push(MessageCommand::RecordDelivery {
                    fact: fact(99),
                    outcome: DeliveryOutcome::Delivered { response: None },
                });
            }
        } else {
            commands.push(MessageCommand::Cancel { now });
        }
        for c in commands {
            store.execute(id, c).await.unwrap();
        }
    }
}

async fn snapshot(
    pool: &PgPool,
) -> (
    Vec<(uuid::Uuid, String, serde_json::Value, i64)>,
    Vec<String>,
) {
    let list = sqlx::query_as(
        "SELECT message_id, state, message::json, last_sequence FROM message_list ORDER BY message_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let feed =
        sqlx::query_scalar("SELECT row_to_json(s)::text FROM state_changes s ORDER BY position")
            .fetch_all(pool)
            .await
            .unwrap();
    (list, feed)
}

#[tokio::test]
async fn a_subscription_killed_mid_batch_ends_identical_to_a_rebuild_from_zero() {
    let pool = migrated_pool().await;
    write_history(&pool).await;
    let projections: [Arc<dyn Projection<Postgres>>; 2] = [
        Arc::new(MessageList::default()),
        Arc::new(StateChangeFeed::new()),
    ];

    for (k, projection) in projections.iter().enumerate() {
        // Crash twice in the middle of batches...
        for crash_after in [11 + k, 40] {
            let crashing = Subscription::new(
                pool.clone(),
                Arc::new(CrashAfter {
                    inner: projection.clone(),
                    remaining: AtomicUsize::new(crash_after),
                }),
            )
            .with_batch_size(7);
            crashing.ensure_checkpoint().await.unwrap();
            let error = crashing.catch_up().await.unwrap_err();
            assert!(error.to_string().contains("crashed"), "{error}");
        }
        // ...and kill a running reader abruptly, wherever it is.
        let (_wake_tx, wake) = tokio::sync::watch::channel(0u64);
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let running = tokio::spawn(
            Subscription::new(pool.clone(), projection.clone())
                .with_batch_size(5)
                .run(wake, stop),
        );
        tokio::time::sleep(Duration::from_millis(15)).await;
        running.abort();
        let _ = running.await;
        // Restart: it carries on from its checkpoint.
        Subscription::new(pool.clone(), projection.clone())
            .catch_up()
            .await
            .unwrap();
    }
    let resumed = snapshot(&pool).await;
    assert_eq!(resumed.0.len(), 30);
    assert!(!resumed.1.is_empty());

    // In small batches: the list's written side by side, the feed's folded one ahead.
    for projection in projections {
        Subscription::new(pool.clone(), projection)
            .with_batch_size(4)
            .rebuild()
            .await
            .unwrap();
    }
    let rebuilt = snapshot(&pool).await;
    assert_eq!(resumed, rebuilt);
}

/// Holds back the batch that holds one message's first event (and then fails it, when
/// `fail`), and records, batch by batch as each is written, where that message's events in it
/// begin, and which backends wrote batches into a rebuild's copy.
struct HoldFirstOf {
    inner: Arc<dyn Projection<Postgres>>,
    message: String,
    fail: bool,
    written: std::sync::Mutex<Vec<i64>>,
    backends: std::sync::Mutex<std::collections::HashSet<i32>>,
}

impl HoldFirstOf {
    fn new(inner: Arc<dyn Projection<Postgres>>, message: String, fail: bool) -> Self {
        Self {
            inner,
            message,
            fail,
            written: Default::default(),
            backends: Default::default(),
        }
    }
}

#[async_trait]
impl Projection<Postgres> for HoldFirstOf {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        let first = events
            .iter()
            .filter(|e| e.aggregate_id == self.message)
            .map(|e| e.sequence)
            .min();
        if first == Some(1) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if self.fail {
                return Err(ProjectionError::Other("failed on purpose".into()));
            }
        }
        // The backends that write into the rebuild's copy (its schema first on their path).
        let (backend, path): (i32, String) =
            sqlx::query_as("SELECT pg_backend_pid(), current_setting('search_path')")
                .fetch_one(&mut *conn)
                .await?;
        if path.contains("rebuild_") {
            self.backends.lock().unwrap().insert(backend);
        }
        self.inner.handle_batch(conn, events).await?;
        if let Some(first) = first {
            self.written.lock().unwrap().push(first);
        }
        Ok(())
    }
    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        self.inner.reset(conn).await
    }
    fn tables(&self) -> &'static [&'static str] {
        self.inner.tables()
    }
    fn channel(&self) -> Option<&'static str> {
        self.inner.channel()
    }
    fn independent_aggregates(&self) -> bool {
        self.inner.independent_aggregates()
    }
}

/// The list is rebuilt message by message (its rows depend on each message's events alone),
/// by two writers side by side; a message whose events fill more than the batches it may
/// hold is split, and the batch that continues it waits for the one before. The result is the
/// list its reader builds in log order, and the checkpoint is the log's last event, not the
/// last message's: what is appended after the rebuild is read once.
#[tokio::test]
async fn a_list_rebuilt_message_by_message_on_two_writers_is_the_list_read_in_log_order() {
    let pool = migrated_pool().await;
    let store = PgStore::new(pool.clone());
    let now = Utc::now();
    let open = |fact_id: String| MessageCommand::RecordOpen {
        fact: Fact {
            fact_id,
            occurred_at: now,
        },
        machine_open: false,
    };
    // Twelve emails sent, their events interleaved in the log; one of them opened 40 times.
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(composed(&store, i, Dispatch::Now).await);
    }
    for id in &ids {
        let start = MessageCommand::StartSendAttempt { now, attempt: 1 };
        store.execute(*id, start).await.unwrap();
    }
    for (i, id) in ids.iter().enumerate() {
        let sent = MessageCommand::RecordSent {
            provider_message_id: Some(format!("sg-{i}")),
            at: now,
        };
        store.execute(*id, sent).await.unwrap();
    }
    for n in 0..40 {
        store
            .execute(ids[5], open(format!("open-{n}")))
            .await
            .unwrap();
    }
    for (i, id) in ids.iter().enumerate().take(6) {
        store.execute(*id, open(format!("late-{i}"))).await.unwrap();
    }

    let list: Arc<dyn Projection<Postgres>> = Arc::new(MessageList::default());
    Subscription::new(pool.clone(), list.clone())
        .with_batch_size(3)
        .catch_up()
        .await
        .unwrap();
    let read_in_log_order = snapshot(&pool).await.0;
    assert_eq!(read_in_log_order.len(), 12);

    // The catch-up above ended with nothing past its checkpoint, so no transaction older
    // than the log's last is running (other tests' databases share the cluster's): the
    // rebuild's own read takes the whole log, not the catch-up after its swap.
    // Batches of 2 events: the long message is split after 32 of its events.
    let held = Arc::new(HoldFirstOf::new(list.clone(), ids[5].to_string(), false));
    let handled = Subscription::new(pool.clone(), held.clone())
        .with_batch_size(2)
        .rebuild()
        .await
        .unwrap();
    assert_eq!(snapshot(&pool).await.0, read_in_log_order);
    let written = held.written.lock().unwrap().clone();
    assert!(
        written.len() >= 2,
        "the long message was not split: {written:?}"
    );
    assert!(
        written.windows(2).all(|w| w[0] < w[1]),
        "its parts were written out of order: {written:?}"
    );
    let backends = held.backends.lock().unwrap().len();
    assert_eq!(backends, 2, "the copy written by {backends} connections");
    // Every event once: the catch-up after the swap found nothing past its checkpoint.
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(handled, events as u64);

    let checkpoint_now = || async {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT last_transaction_id::text, last_global_position \
             FROM subscription_checkpoints WHERE name = 'message_list'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let log_end: (String, i64) = sqlx::query_as(
        "SELECT transaction_id::text, global_position FROM events \
         ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(checkpoint_now().await, log_end);

    // A writer that fails while the other waits for it: the rebuild ends with its error, its
    // copy is dropped, and the live list and its checkpoint are as they were.
    let failing = Arc::new(HoldFirstOf::new(list.clone(), ids[5].to_string(), true));
    let failed = tokio::time::timeout(
        Duration::from_secs(60),
        Subscription::new(pool.clone(), failing)
            .with_batch_size(2)
            .rebuild(),
    )
    .await
    .expect("the rebuild ended");
    let error = failed.unwrap_err().to_string();
    assert!(error.contains("failed on purpose"), "{error}");
    assert_eq!(snapshot(&pool).await.0, read_in_log_order);
    assert_eq!(checkpoint_now().await, log_end);
    let copies: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'rebuild_message_list'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(copies, 0, "the failed rebuild's copy is left");

    store.execute(ids[0], open("after".into())).await.unwrap();
    composed(&store, 99, Dispatch::Draft).await;
    Subscription::new(pool.clone(), list)
        .catch_up()
        .await
        .unwrap();
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT message_id::text, last_sequence FROM message_list ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    let log: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, max(sequence) FROM events GROUP BY aggregate_id ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows, log);
}

/// The list INSERTs the rows a batch starts, without an upsert's check: a message's row and
/// the checkpoint past its first event are committed together. A checkpoint moved back by hand
/// over rows left in place breaks that; the batch then fails once, rolled back whole, and is
/// retried with every row upserted, which leaves the list as it was.
#[tokio::test]
async fn a_list_checkpoint_moved_back_over_its_rows_costs_one_failed_batch() {
    let pool = migrated_pool().await;
    write_history(&pool).await;
    let list = Subscription::new(pool.clone(), Arc::new(MessageList::default()));
    list.catch_up().await.unwrap();
    // Every column, the copies the list filters on included.
    let rows = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT row_to_json(m)::text FROM message_list m ORDER BY message_id",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let before = rows().await;
    assert_eq!(before.len(), 30);
    let moved_back = "UPDATE subscription_checkpoints SET last_transaction_id = '0', \
                      last_global_position = 0 WHERE name = 'message_list'";
    sqlx::query(moved_back).execute(&pool).await.unwrap();

    let error = list.run_batch().await.unwrap_err();
    assert!(error.to_string().contains("in the list already"), "{error}");
    let position: i64 = sqlx::query_scalar(
        "SELECT last_global_position FROM subscription_checkpoints WHERE name = 'message_list'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(position, 0, "the failed batch moved the checkpoint");

    assert!(list.catch_up().await.unwrap() > 0);
    assert_eq!(rows().await, before);
}

/// Transaction ids are numbers: the reader orders by the `xid8` column, not by the text it
/// selects it as (text order puts transaction 10 before 9, and a batch that ended on 10 would
/// have checkpointed past 9's events for good).
#[tokio::test]
async fn events_are_read_in_transaction_id_order_across_a_digit_boundary() {
    let (pool, sub) = recorder_setup().await;
    let sub = sub.with_batch_size(1);
    // Ids far below any running transaction, as a log written long ago holds; one more digit
    // for the later one.
    for (aggregate, transaction_id) in [("a", 9), ("b", 10), ("c", 99), ("d", 100)] {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata, transaction_id) \
             VALUES ('Probe', $1, 1, 'Probed', '1', '{}', '{}', $2::text::xid8)",
        )
        .bind(aggregate)
        .bind(transaction_id.to_string())
        .execute(&pool)
        .await
        .unwrap();
    }
    assert_eq!(sub.catch_up().await.unwrap(), 4);
    let order: Vec<i64> = recorded(&pool).await.into_iter().map(|(t, _)| t).collect();
    assert_eq!(order, vec![9, 10, 99, 100]);
}

/// A rebuild reads the log ahead while it writes: with small batches, writers appending
/// meanwhile and another instance's reader running on the same projection, it ends where a
/// quiet rebuild ends, and the other reader never takes a batch in between (the feed would
/// number an event twice and its unique key would fail the batch).
#[tokio::test]
async fn a_rebuild_under_load_with_another_reader_running_ends_as_a_quiet_one() {
    let pool = migrated_pool().await;
    write_history(&pool).await;
    let projections: [Arc<dyn Projection<Postgres>>; 2] = [
        Arc::new(MessageList::default()),
        Arc::new(StateChangeFeed::new()),
    ];
    let (wake_tx, wake) = tokio::sync::watch::channel(0u64);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut others = Vec::new();
    for projection in &projections {
        let other = Subscription::new(pool.clone(), projection.clone())
            .with_batch_size(3)
            .with_poll_interval(Duration::from_millis(5));
        other.ensure_checkpoint().await.unwrap();
        others.push(tokio::spawn(other.run(wake.clone(), stop.clone())));
    }
    let writer = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for _ in 0..3 {
                write_history(&pool).await;
                let _ = wake_tx.send(0);
            }
            wake_tx
        })
    };
    for projection in &projections {
        for _ in 0..2 {
            Subscription::new(pool.clone(), projection.clone())
                .with_batch_size(7)
                .rebuild()
                .await
                .unwrap();
        }
    }
    let _wake_tx = writer.await.unwrap();
    stop_tx.send(true).unwrap();
    for other in others {
        other.await.unwrap();
    }
    for projection in &projections {
        Subscription::new(pool.clone(), projection.clone())
            .catch_up()
            .await
            .unwrap();
    }
    let after_load = snapshot(&pool).await;
    assert_eq!(
        after_load.0.len(),
        120,
        "every message of the four histories"
    );

    for projection in projections {
        Subscription::new(pool.clone(), projection)
            .rebuild()
            .await
            .unwrap();
    }
    assert_eq!(after_load, snapshot(&pool).await);
}

/// A rebuild stopped half-way (its task dropped) leaves no lock behind and the live read
/// model as it was: the subscription carries on from its own checkpoint, and the next rebuild
/// drops the half-built copy and ends as a rebuild from zero does.
#[tokio::test]
async fn a_rebuild_dropped_half_way_releases_the_subscription() {
    let pool = migrated_pool().await;
    for _ in 0..4 {
        write_history(&pool).await;
    }
    let feed = || Subscription::new(pool.clone(), Arc::new(StateChangeFeed::new()));
    feed().catch_up().await.unwrap();
    let (_, whole) = snapshot(&pool).await;
    let slow = Arc::new(Slow(Arc::new(StateChangeFeed::new())));
    let rebuild = {
        let pool = pool.clone();
        tokio::spawn(async move {
            Subscription::new(pool, slow)
                .with_batch_size(5)
                .rebuild()
                .await
        })
    };
    // Stop it once it has committed a few batches to its copy (not after a fixed time: a slow
    // start on a busy machine would stop it before its first batch).
    copy_has(&pool, "rebuild_state_changes.state_changes", 10).await;
    rebuild.abort();
    assert!(rebuild.await.unwrap_err().is_cancelled());
    assert_eq!(
        snapshot(&pool).await.1,
        whole,
        "the live feed is untouched by the rebuild that stopped"
    );
    write_history(&pool).await;
    let carried_on = tokio::time::timeout(Duration::from_secs(20), feed().catch_up())
        .await
        .expect("the subscription is not left locked")
        .unwrap();
    assert!(carried_on > 0);
    let (_, resumed) = snapshot(&pool).await;
    assert_eq!(
        &resumed[..whole.len()],
        &whole[..],
        "it carried on from its own end"
    );
    assert!(resumed.len() > whole.len());

    feed().rebuild().await.unwrap();
    assert_eq!(resumed, snapshot(&pool).await.1);
    let leftovers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'rebuild\\_%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        leftovers, 0,
        "the rebuild dropped the copy it found and its own schema"
    );
}

/// Waits (a minute at most) until a rebuild's copy of a table holds `rows` rows.
async fn copy_has(pool: &PgPool, table: &str, rows: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while rows_in_copy(pool, table).await < rows {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rebuild writes {table} beside the live table"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Three histories in the log and the list caught up with them, then a slow rebuild of the
/// list started, returned once its copy is being filled.
async fn list_rebuild_under_way(
    pool: &PgPool,
) -> tokio::task::JoinHandle<Result<u64, ProjectionError>> {
    for _ in 0..3 {
        write_history(pool).await;
    }
    Subscription::new(pool.clone(), Arc::new(MessageList::default()))
        .catch_up()
        .await
        .unwrap();
    let slow = Subscription::new(
        pool.clone(),
        Arc::new(Slow(Arc::new(MessageList::default()))),
    )
    .with_batch_size(5);
    let rebuild = tokio::spawn(async move { slow.rebuild().await });
    copy_has(pool, "rebuild_message_list.message_list", 5).await;
    rebuild
}

/// Rows in a rebuild's copy of a table, 0 while (or once) there is no such table.
async fn rows_in_copy(pool: &PgPool, table: &str) -> i64 {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(pool)
        .await
        .unwrap();
    if !exists {
        return 0;
    }
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The list and the feed as their readers see them: each list row's message and sequence, and
/// the feed's items, in order.
async fn read_models(conn: &mut PgConnection) -> (Vec<(uuid::Uuid, i64)>, i64) {
    let list = sqlx::query_as("SELECT message_id, last_sequence FROM message_list ORDER BY 1")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    let feed = sqlx::query_scalar("SELECT count(*) FROM state_changes")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    (list, feed)
}

/// While the list and the feed are rebuilt, their readers see them whole (as they stood when
/// the rebuild began: the rebuild holds their subscriptions still), never emptied or
/// half-built, and a reader's prepared statements go on working once the rebuilt tables have
/// taken the live ones' place: the same indexes and constraints, under the same names, and the
/// same grants.
#[tokio::test]
async fn the_list_and_the_feed_stay_whole_while_they_are_rebuilt() {
    let pool = migrated_pool().await;
    for _ in 0..3 {
        write_history(&pool).await;
    }
    let projections: [Arc<dyn Projection<Postgres>>; 2] = [
        Arc::new(MessageList::default()),
        Arc::new(StateChangeFeed::new()),
    ];
    for projection in &projections {
        Subscription::new(pool.clone(), projection.clone())
            .catch_up()
            .await
            .unwrap();
    }
    let before = snapshot(&pool).await;
    let schema = |pool: PgPool| async move {
        let indexes: Vec<(String, String)> = sqlx::query_as(
            "SELECT indexname::text, indexdef FROM pg_indexes \
             WHERE tablename IN ('message_list', 'state_changes') ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let constraints: Vec<(String, String)> = sqlx::query_as(
            "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE conrelid IN ('message_list'::regclass, 'state_changes'::regclass) ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let grants: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT relname::text, relacl::text FROM pg_class \
             WHERE oid IN ('message_list'::regclass, 'state_changes'::regclass) ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        (indexes, constraints, grants)
    };
    // A reporting role's grant is carried over.
    sqlx::query("GRANT SELECT ON message_list TO PUBLIC")
        .execute(&pool)
        .await
        .unwrap();
    let schema_before = schema(pool.clone()).await;
    assert_eq!(schema_before.0.len(), 8, "{schema_before:?}");
    assert!(
        schema_before.2[0]
            .1
            .as_deref()
            .unwrap_or("")
            .contains("=r/"),
        "{schema_before:?}"
    );

    // One reader on one connection, its statements prepared before the rebuild.
    let mut reader = PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    let whole = read_models(&mut reader).await;
    assert_eq!(whole.0.len(), 90);
    let rebuilding = {
        let pool = pool.clone();
        let projections = projections.clone();
        tokio::spawn(async move {
            for projection in projections {
                Subscription::new(pool.clone(), Arc::new(Slow(projection)))
                    .with_batch_size(10)
                    .rebuild()
                    .await
                    .unwrap();
            }
        })
    };
    let mut reads = 0;
    while !rebuilding.is_finished() {
        assert_eq!(read_models(&mut reader).await, whole, "read {reads}");
        reads += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    rebuilding.await.unwrap();
    assert!(reads > 20, "the rebuild was watched ({reads} reads)");
    assert_eq!(read_models(&mut reader).await, whole);
    assert_eq!(snapshot(&pool).await, before);
    assert_eq!(schema(pool.clone()).await, schema_before);

    // The rebuilt tables are the live ones: the subscriptions carry on into them.
    write_history(&pool).await;
    for projection in &projections {
        let carried = Subscription::new(pool.clone(), projection.clone())
            .catch_up()
            .await
            .unwrap();
        assert!(carried > 0);
    }
    assert_eq!(read_models(&mut reader).await.0.len(), 120);
}

/// The feed rebuilt beside the live one (its batches written without a NOTIFY: nobody reads
/// the copy) wakes those who wait on it when it takes the live one's place: a long-poll would
/// otherwise sleep through the swap until its timeout or the next new item.
#[tokio::test]
async fn a_rebuilt_feed_wakes_its_listeners_when_it_takes_the_live_ones_place() {
    let pool = migrated_pool().await;
    write_history(&pool).await;
    let feed: Arc<dyn Projection<Postgres>> = Arc::new(StateChangeFeed::new());
    Subscription::new(pool.clone(), feed.clone())
        .catch_up()
        .await
        .unwrap();
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen("state_changes").await.unwrap();
    let rebuilt = Subscription::new(pool.clone(), feed.clone())
        .rebuild()
        .await
        .unwrap();
    assert!(rebuilt > 0);
    let woken = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await;
    assert!(
        matches!(woken, Ok(Ok(ref n)) if n.channel() == "state_changes"),
        "no NOTIFY at the swap: {woken:?}"
    );
}

/// A reader that holds the live list in a transaction left open does not fail the rebuild or
/// queue every other reader behind it: the swap asks for the tables with a short lock timeout
/// and asks again until they are free.
#[tokio::test]
async fn a_rebuild_waits_for_a_reader_holding_the_live_list_then_takes_its_place() {
    let pool = migrated_pool().await;
    write_history(&pool).await;
    let list = || Subscription::new(pool.clone(), Arc::new(MessageList::default()));
    list().catch_up().await.unwrap();
    let before = snapshot(&pool).await;
    let mut holder = pool.begin().await.unwrap();
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM message_list")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    assert_eq!(held, 30);
    let rebuild = {
        let list = list();
        tokio::spawn(async move { list.rebuild().await })
    };
    // The swap is asking for the live list's lock, and being refused while the reader holds it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = 'message_list'::regclass \
                            AND mode = 'AccessExclusiveLock' AND NOT granted)",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting {
            break;
        }
        assert!(!rebuild.is_finished(), "the swap waits for the reader");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the swap asks for the lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!rebuild.is_finished(), "the swap waits for the reader");
    // Other readers are not held behind the waiting swap (each try gives up after 200 ms).
    tokio::time::timeout(Duration::from_secs(5), async {
        for _ in 0..5 {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM message_list")
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(n, 30);
        }
    })
    .await
    .expect("readers are not held behind the waiting swap");
    holder.commit().await.unwrap();
    let handled = tokio::time::timeout(Duration::from_secs(30), rebuild)
        .await
        .expect("the swap goes through once the reader is done")
        .unwrap()
        .unwrap();
    assert!(handled > 0);
    assert_eq!(snapshot(&pool).await, before);
}

/// A rebuild never undoes a change made to its live table while it ran (a migration applied
/// by a newer instance starting meanwhile): the swap finds the table's shape changed, leaves it
/// as it is and drops the copy. A table with what a copy would not carry (a trigger) is refused
/// before anything is made.
#[tokio::test]
async fn a_rebuild_leaves_a_live_table_changed_meanwhile_as_it_is() {
    let pool = migrated_pool().await;
    let list = || Subscription::new(pool.clone(), Arc::new(MessageList::default()));
    let rebuild = list_rebuild_under_way(&pool).await;
    sqlx::query("ALTER TABLE message_list ADD COLUMN note text")
        .execute(&pool)
        .await
        .unwrap();
    let error = rebuild.await.unwrap().expect_err("the swap is refused");
    assert!(
        error
            .to_string()
            .contains("changed while `message_list` was rebuilt"),
        "{error}"
    );
    let note: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns \
                        WHERE table_schema = 'public' AND table_name = 'message_list' \
                          AND column_name = 'note')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(note, "the live table keeps its new column");
    let copies: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'rebuild\\_%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(copies, 0, "the failed rebuild dropped its copy");
    // The subscription was not left locked, and the list is whole.
    write_history(&pool).await;
    assert!(list().catch_up().await.unwrap() > 0);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM message_list")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 120);

    sqlx::query(
        "CREATE FUNCTION nothing() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER audit BEFORE INSERT ON message_list FOR EACH ROW EXECUTE FUNCTION nothing()",
    )
    .execute(&pool)
    .await
    .unwrap();
    let error = list().rebuild().await.expect_err("refused");
    assert!(error.to_string().contains("has triggers"), "{error}");
    sqlx::query("DROP TRIGGER audit ON message_list")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("CREATE VIEW sent AS SELECT message_id FROM message_list WHERE state = 'sent'")
        .execute(&pool)
        .await
        .unwrap();
    let error = list().rebuild().await.expect_err("refused");
    assert!(
        error.to_string().contains("views or rules on it"),
        "{error}"
    );
    let copies: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'rebuild\\_%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(copies, 0, "nothing made");
    assert!(list().catch_up().await.is_ok());
}

/// A grant made while the copy is filled is not lost: the copy takes the live table's grants
/// as they are at the swap.
#[tokio::test]
async fn a_grant_made_during_a_rebuild_is_carried_to_the_rebuilt_table() {
    let pool = migrated_pool().await;
    let rebuild = list_rebuild_under_way(&pool).await;
    sqlx::query("GRANT SELECT ON message_list TO PUBLIC")
        .execute(&pool)
        .await
        .unwrap();
    assert!(!rebuild.is_finished(), "granted while the copy was filled");
    rebuild
        .await
        .unwrap()
        .expect("a grant is no change of shape");
    let public_reads: bool =
        sqlx::query_scalar("SELECT has_table_privilege('public', 'message_list', 'SELECT')")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(public_reads, "the grant was carried over");
}

/// Takes its time over each batch.
struct Slow(Arc<dyn Projection<Postgres>>);

#[async_trait]
impl Projection<Postgres> for Slow {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        tokio::time::sleep(Duration::from_millis(10)).await;
        self.0.handle_batch(conn, events).await
    }
    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        self.0.reset(conn).await
    }
    fn tables(&self) -> &'static [&'static str] {
        self.0.tables()
    }
    fn channel(&self) -> Option<&'static str> {
        self.0.channel()
    }
    fn independent_aggregates(&self) -> bool {
        self.0.independent_aggregates()
    }
}

/// Client commands are appended on connections the writers keep between groups. When those
/// connections are gone without a word (a network cut, a server that hung up), a command after
/// a pause still succeeds: a writer checks a connection that has been idle before it sends an
/// INSERT on it (an INSERT sent on a dead connection has an unknown outcome and is reported as
/// a store error) and opens a new one.
#[tokio::test]
async fn commands_after_every_connection_was_cut_succeed() {
    use sqlx::postgres::PgPoolOptions;

    let (direct, options, server) = behind_a_proxy().await;
    let proxy = HangUpProxy::start(server).await;
    let proxied = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.host("127.0.0.1").port(proxy.port))
        .await
        .unwrap();
    let store = PgStore::new(proxied);
    let later = || Dispatch::At(Utc::now() + chrono::Duration::hours(1));
    let first = composed(&store, 0, later()).await;
    proxy.hang_up();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = composed(&store, 1, later()).await;
    let third = composed(&store, 2, later()).await;
    for id in [first, second, third] {
        let composed = events_of_type(&direct, &id.to_string(), "MessageComposed").await;
        assert_eq!(composed, 1, "message {id}");
    }
}

/// A kept connection plans each statement for its values: a generic plan made while a table
/// was nearly empty would otherwise stay for the connection's life (see `KeptConnection`).
#[tokio::test]
async fn a_kept_connection_plans_each_statement_for_its_values() {
    let pool = migrated_pool().await;
    let mut kept = messaging_projections::KeptConnection::new();
    let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(kept.ready(&pool).await.unwrap())
        .await
        .unwrap();
    assert_eq!(mode, "force_custom_plan");
    let pooled: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pooled, "auto", "only kept connections are set so");
    kept.close().await;
    let mut keeping = messaging_projections::KeptConnection::keeping_plans();
    let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(keeping.ready(&pool).await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        mode, "force_generic_plan",
        "a command writer's connection keeps its plans"
    );
    keeping.close().await;
}

/// The writers' read of messages (their snapshots and events) is prepared (one round trip) on
/// the connections that keep their plans, and never becomes a scan of the log or of the
/// snapshots there: after the log was vacuumed while empty, PostgreSQL's generic plan for it is
/// a sequential scan, kept once chosen (shown here on a connection otherwise at the server's
/// defaults that plans generically at once); a writer's connection disables scans, so its plan stays the primary keys'
/// lookups as the log grows. Elsewhere the read is unprepared.
#[tokio::test]
async fn the_writers_read_of_messages_events_never_scans_the_log() {
    use messaging_domain::Message;
    use messaging_projections::event::{fold_rows, Sent};
    use sqlx::{Connection, Row};

    let pool = migrated_pool().await;
    sqlx::query("VACUUM ANALYZE events")
        .execute(&pool)
        .await
        .unwrap();
    let mut kept = messaging_projections::KeptConnection::keeping_plans();
    let writer = kept.ready(&pool).await.unwrap();
    let mut plain = PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    // The generic plan from the first run: with the server's defaults PostgreSQL may keep
    // planning this read for its values (its custom plans cost less than the generic one);
    // whether it does depends on cost estimates, and the writers must not depend on them.
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut plain)
        .await
        .unwrap();
    let mut unprepared = pool.acquire().await.unwrap();
    let ids = [uuid::Uuid::now_v7().to_string()];
    for _ in 0..8 {
        for (conn, sent) in [
            (&mut *writer, Sent::Prepared),
            (&mut plain, Sent::Prepared),
            (&mut unprepared, Sent::Unprepared),
        ] {
            let events = fold_rows(conn, &ids, &[i64::MAX], Some(Message::FOLD_VERSION), sent)
                .await
                .unwrap();
            assert!(events.is_empty());
        }
    }
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
                             payload, metadata) \
         SELECT 'Message', g::text, 1, 'MessageComposed', '1', '{}', '{}' \
         FROM generate_series(1, 20000) AS g",
    )
    .execute(&pool)
    .await
    .unwrap();

    async fn plan(conn: &mut PgConnection) -> Option<String> {
        let name: Option<String> = sqlx::query_scalar(
            "SELECT name FROM pg_prepared_statements WHERE statement LIKE '%CROSS JOIN LATERAL%' \
             AND statement NOT LIKE '%pg_prepared_statements%'",
        )
        .fetch_optional(&mut *conn)
        .await
        .unwrap();
        let explain = format!(
            "EXPLAIN EXECUTE {}('Message', ARRAY['17'], ARRAY[9223372036854775807]::bigint[], {})",
            name?,
            Message::FOLD_VERSION
        );
        let lines = sqlx::raw_sql(&explain).fetch_all(&mut *conn).await.unwrap();
        Some(
            lines
                .iter()
                .map(|l| l.get::<String, _>(0))
                .collect::<Vec<_>>()
                .join("\n"),
        )
    }
    let shown = plan(&mut plain)
        .await
        .expect("prepared on the plain connection");
    assert!(
        shown.contains("Seq Scan on events"),
        "the hazard this guards against did not arise:\n{shown}"
    );
    let kept_plan = plan(writer)
        .await
        .expect("prepared on the writer's connection");
    assert!(
        kept_plan.contains("events_pkey")
            && kept_plan.contains("message_snapshots_pkey")
            && !kept_plan.contains("Seq Scan"),
        "a writer's read scans the log or the snapshots:\n{kept_plan}"
    );
    assert_eq!(
        plan(&mut unprepared).await,
        None,
        "the pooled read was prepared"
    );
    let found = fold_rows(
        writer,
        &["17"],
        &[i64::MAX],
        Some(Message::FOLD_VERSION),
        Sent::Prepared,
    )
    .await
    .unwrap();
    assert_eq!(found.len(), 1);
    // Planned once for all: PostgreSQL's `auto` planned it afresh at every call (0.14 ms of
    // planning to 0.05 ms of execution), its generic plan costed dearer than custom ones.
    let (generic, custom): (i64, i64) = sqlx::query_as(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements \
         WHERE statement LIKE '%CROSS JOIN LATERAL%' AND statement NOT LIKE '%pg_prepared_statements%'",
    )
    .fetch_one(&mut *writer)
    .await
    .unwrap();
    assert_eq!(custom, 0, "the writer's read was planned for its values");
    assert!(generic >= 9, "{generic} generic plans used");
    kept.close().await;
}

/// A fresh migrated database for a test that reaches it through a proxy: a direct pool for
/// checks, the options to connect with (to point at the proxy), and the server's address.
async fn behind_a_proxy() -> (
    PgPool,
    sqlx::postgres::PgConnectOptions,
    std::net::SocketAddr,
) {
    use std::str::FromStr;

    let url = fresh_postgres_database().await;
    let direct = PgPool::connect(&url).await.unwrap();
    messaging::startup::migrate(&direct).await.unwrap();
    let options = sqlx::postgres::PgConnectOptions::from_str(&url).unwrap();
    let server = tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await
        .unwrap()
        .next()
        .unwrap();
    (direct, options, server)
}

/// A TCP proxy to PostgreSQL that can close every connection it carries at once, without a
/// word to either side; connections made afterwards are carried as usual.
struct HangUpProxy {
    port: u16,
    hang_up: tokio::sync::watch::Sender<u64>,
}

impl HangUpProxy {
    async fn start(server: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (hang_up, hung_up) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            loop {
                let (mut client, _) = listener.accept().await.unwrap();
                let mut upstream = tokio::net::TcpStream::connect(server).await.unwrap();
                let mut hung_up = hung_up.clone();
                hung_up.borrow_and_update();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = hung_up.changed() => {}
                    }
                    // Both sockets dropped here: closed with nothing more sent.
                });
            }
        });
        Self { port, hang_up }
    }

    fn hang_up(&self) {
        self.hang_up.send_modify(|n| *n += 1);
    }
}

/// The batch command path reads every message, then appends in one statement: a writer that
/// appends to one of the messages in between makes the statement fail on the primary key. The
/// batch must then write nothing of its own and run each command again on its own.
#[tokio::test]
async fn a_batch_of_commands_that_loses_a_race_falls_back_and_loses_nothing() {
    let pool = migrated_pool().await;
    let store = PgStore::new(pool.clone());
    let publish_at = Utc::now() + chrono::Duration::hours(1);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(composed(&store, i, Dispatch::At(publish_at)).await);
    }
    let last = |id: MessageId| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT max(sequence) FROM events WHERE aggregate_id = $1")
                .bind(id.to_string())
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let raced = ids[2];
    let before = last(raced).await;

    // Another writer appends to one message (the same schedule again) and holds its commit.
    let mut other = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
                             payload, metadata) \
         SELECT aggregate_type, aggregate_id, sequence + 1, event_type, event_version, payload, \
                metadata FROM events WHERE aggregate_id = $1 AND sequence = $2",
    )
    .bind(raced.to_string())
    .bind(before)
    .execute(&mut *other)
    .await
    .unwrap();
    let commands = ids
        .iter()
        .map(|id| {
            let send = MessageCommand::Send {
                now: Utc::now(),
                expected_publish_at: None,
            };
            (*id, send)
        })
        .collect();
    let batch = {
        let store = Arc::new(store);
        tokio::spawn(async move { store.execute_each(commands).await })
    };
    // The batch has read the messages and waits on the other writer's row.
    let mut waited = 0;
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        waited += 1;
        assert!(waited < 500, "the batch never reached the append");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    other.commit().await.unwrap();

    let results = batch.await.unwrap();
    assert_eq!(results.len(), 5);
    for (id, result) in ids.iter().zip(&results) {
        assert!(result.is_ok(), "{id}: {result:?}");
    }
    for id in &ids {
        let queued: Vec<i64> = sqlx::query_scalar(
            "SELECT sequence FROM events \
             WHERE aggregate_id = $1 AND event_type = 'MessageQueued' ORDER BY sequence",
        )
        .bind(id.to_string())
        .fetch_all(&pool)
        .await
        .unwrap();
        let expected = if *id == raced { before + 2 } else { before + 1 };
        assert_eq!(
            queued,
            vec![expected],
            "{id}: queued once, after the other writer"
        );
        assert_eq!(last(*id).await, expected);
    }
}

/// In a batch, a command the aggregate rejects is reported as rejected and the others land.
#[tokio::test]
async fn a_rejected_command_in_a_batch_does_not_hold_back_the_others() {
    let pool = migrated_pool().await;
    let store = PgStore::new(pool.clone());
    let mut commands = Vec::new();
    for i in 0..4 {
        let id = composed(&store, i, Dispatch::Draft).await;
        commands.push((id, MessageCommand::Cancel { now: Utc::now() }));
    }
    // A draft cannot start a send attempt: refused.
    commands[1].1 = MessageCommand::StartSendAttempt {
        now: Utc::now(),
        attempt: 1,
    };
    // Never composed: unknown.
    let unknown = MessageId::from_uuid(uuid::Uuid::now_v7());
    commands.push((unknown, MessageCommand::Cancel { now: Utc::now() }));
    let ids: Vec<MessageId> = commands.iter().map(|(id, _)| *id).collect();

    let results = store.execute_each(commands).await;
    let rejected: Vec<bool> = results
        .iter()
        .map(|r| matches!(r, Err(messaging::store::CommandError::Rejected(_))))
        .collect();
    assert_eq!(
        rejected,
        vec![false, true, false, false, true],
        "{results:?}"
    );
    for (n, id) in ids.iter().enumerate() {
        let message = store.load_message(*id).await.unwrap();
        match n {
            4 => assert!(message.is_none()),
            1 => assert_eq!(message.unwrap().state(), Some(MessageState::Draft)),
            _ => assert_eq!(
                message.unwrap().state(),
                Some(MessageState::Cancelled),
                "message {n}"
            ),
        }
        let cancels = events_of_type(&pool, &id.to_string(), "MessageCancelled").await;
        assert_eq!(cancels, i64::from(n != 1 && n != 4), "message {n}");
    }
}

/// Records the `synchronous_commit` its batches run under.
struct CommitMode(Arc<std::sync::Mutex<Vec<String>>>);

#[async_trait]
impl Projection<Postgres> for CommitMode {
    fn name(&self) -> &'static str {
        "commit_mode"
    }
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        _events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        let mode: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&mut *conn)
            .await?;
        self.0.lock().unwrap().push(mode);
        Ok(())
    }
    async fn reset(&self, _conn: &mut PgConnection) -> Result<(), ProjectionError> {
        Ok(())
    }
}

#[tokio::test]
async fn projection_batches_commit_asynchronously_and_leave_commands_synchronous() {
    let url = fresh_postgres_database().await;
    // One connection: the batches and the command below share it.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    messaging::startup::migrate(&pool).await.unwrap();
    let modes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sub = Subscription::new(pool.clone(), Arc::new(CommitMode(modes.clone())));
    sub.ensure_checkpoint().await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    insert_probe(&mut conn, "a", 1).await;
    drop(conn);

    // Waits while transactions of other tests (the horizon is the whole server's) hold it back.
    assert_eq!(sub.catch_up().await.unwrap(), 1);
    sub.rebuild().await.unwrap();
    assert_eq!(*modes.lock().unwrap(), ["off", "off"]);

    // The setting was the batch's own: the pooled connection appends commands with a flush.
    let after: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(after, "on");
    // And what the batch projected was committed: the checkpoint moved past the event.
    let handled: i64 = sqlx::query_scalar(
        "SELECT events_handled FROM subscription_checkpoints WHERE name = 'commit_mode'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(handled, 1);
}

/// Client commands sent at once are appended in groups (one INSERT and one commit for several),
/// and each caller still gets its own command's answer: composes land, a compose on an id that
/// exists, a refused command and an unknown message are refused alone, and two cancels of one
/// message sent at once go in different groups (one cancellation recorded, both satisfied).
#[tokio::test]
async fn commands_sent_at_once_are_appended_together_and_each_gets_its_own_answer() {
    use messaging::store::CommandError;
    let pool = migrated_pool().await;
    let store = Arc::new(PgStore::new(pool.clone()));
    let mut drafts = Vec::new();
    for i in 0..4 {
        drafts.push(composed(&store, 100 + i, Dispatch::Draft).await);
    }

    // (command, whether it must be refused)
    let mut commands = Vec::new();
    let mut new_ids = Vec::new();
    for i in 0..48 {
        let (id, compose) = compose_command(i, Dispatch::Now);
        new_ids.push(id);
        commands.push((id, compose, false));
    }
    for draft in &drafts[..3] {
        for _ in 0..2 {
            commands.push((*draft, MessageCommand::Cancel { now: Utc::now() }, false));
        }
    }
    let (_, mut again) = compose_command(200, Dispatch::Now);
    if let MessageCommand::Compose(c) = &mut again {
        c.id = drafts[3];
    }
    commands.push((drafts[3], again, true));
    commands.push((
        drafts[3],
        MessageCommand::StartSendAttempt {
            now: Utc::now(),
            attempt: 1,
        },
        true,
    ));
    let unknown = MessageId::from_uuid(uuid::Uuid::now_v7());
    commands.push((unknown, MessageCommand::Cancel { now: Utc::now() }, true));

    let tasks: Vec<_> = commands
        .into_iter()
        .map(|(id, command, refused)| {
            let store = store.clone();
            let name = format!("{command:?}").chars().take(40).collect::<String>();
            tokio::spawn(async move { (id, name, refused, store.execute(id, command).await) })
        })
        .collect();
    for task in tasks {
        let (id, name, refused, result) = task.await.unwrap();
        if refused {
            assert!(
                matches!(result, Err(CommandError::Rejected(_))),
                "{name} on {id}: {result:?}"
            );
        } else {
            assert!(result.is_ok(), "{name} on {id}: {result:?}");
        }
    }

    for id in &new_ids {
        let message = store.load_message(*id).await.unwrap().expect("composed");
        assert_eq!(message.state(), Some(MessageState::Pending));
    }
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    for (n, draft) in drafts.iter().enumerate() {
        let message = store.load_message(*draft).await.unwrap().unwrap();
        let expected = if n < 3 {
            MessageState::Cancelled
        } else {
            MessageState::Draft
        };
        assert_eq!(message.state(), Some(expected), "draft {n}");
    }
    assert_eq!(
        count("SELECT count(*) FROM events WHERE event_type = 'MessageCancelled'").await,
        3
    );
    // The drafts' 4 events, and a MessageComposed and a MessageQueued per new message.
    assert_eq!(count("SELECT count(*) FROM events").await, 4 + 3 + 2 * 48);
    assert_eq!(
        count("SELECT count(*) FROM events WHERE event_type = 'MessageComposed'").await,
        4 + 48
    );
    // Grouped: the 48 composes went in in fewer transactions than there were composes.
    let transactions = count(
        "SELECT count(DISTINCT transaction_id) FROM events WHERE event_type = 'MessageQueued'",
    )
    .await;
    assert!(
        transactions < 48,
        "{transactions} transactions for 48 composes"
    );
}

/// A message queued to send now and listed, with an open recorded for it (`open-1`) before
/// its send is: what a provider's early webhook leaves. The store, the list's subscription,
/// the message and the time used.
async fn queued_with_an_early_open(
    pool: &PgPool,
) -> (Arc<PgStore>, Subscription, MessageId, chrono::DateTime<Utc>) {
    use messaging::webhooks::inbox::{FactKind, InboxFact, Payload};
    let store = Arc::new(PgStore::new(pool.clone()));
    let list = Subscription::new(pool.clone(), Arc::new(MessageList::default()));
    let id = composed(&store, 0, Dispatch::Now).await;
    list.catch_up().await.unwrap();
    let now = Utc::now();
    store
        .record_webhook_facts(&[InboxFact {
            provider: "sendgrid",
            event_id: "open-1".into(),
            message_id: Some(id.as_uuid()),
            kind: FactKind::Open,
            occurred_at: now,
            payload: Payload::from_value(&serde_json::json!({"event": "open"})),
            problem: None,
        }])
        .await
        .unwrap();
    (store, list, id, now)
}

/// Records the message's send as the sender does, and lets the list show it.
async fn record_sent(
    store: &PgStore,
    list: &Subscription,
    id: MessageId,
    now: chrono::DateTime<Utc>,
) {
    for command in [
        MessageCommand::StartSendAttempt { now, attempt: 1 },
        MessageCommand::RecordSent {
            provider_message_id: Some("sg-1".into()),
            at: now,
        },
    ] {
        store.execute(id, command).await.unwrap();
    }
    list.catch_up().await.unwrap();
}

/// A fact the applier could not apply yet (an open for a message whose send is not recorded)
/// while the message changed under it (the sender recorded the send, the list caught up)
/// is tried again, not left waiting for a change that was already made.
#[tokio::test]
async fn a_fact_refused_while_its_message_changed_is_tried_again() {
    use messaging::store::FactSettlement;
    use messaging::webhooks::applier::Applier;

    let pool = migrated_pool().await;
    let (store, list, id, now) = queued_with_an_early_open(&pool).await;

    // The applier's round, taken apart: lease, decide, and (later) settle.
    let leased = store
        .lease_webhook_facts(Utc::now() - chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    let refused = store
        .execute(
            id,
            MessageCommand::RecordOpen {
                fact: Fact {
                    fact_id: "open-1".into(),
                    occurred_at: now,
                },
                machine_open: false,
            },
        )
        .await;
    assert!(
        matches!(
            refused,
            Err(messaging::store::CommandError::Rejected(
                MessageError::InvalidTransition { .. }
            ))
        ),
        "{refused:?}"
    );
    // Meanwhile the sender records the send, and the list shows it.
    record_sent(&store, &list, id, now).await;
    store
        .settle_webhook_facts(&[(leased[0].lease(), FactSettlement::Wait(None))])
        .await
        .unwrap();

    // Nothing else will happen to the message: the fact must be applied now.
    let applied = Applier::new(store.clone()).run_once().await.unwrap();
    assert_eq!(applied, 1, "the waiting open was not tried again");
    let opens = events_of_type(&pool, &id.to_string(), "OpenRecorded").await;
    assert_eq!(opens, 1);
}

/// Two instances' feed projectors take turns, one event each, so each sees every other event
/// of a message: what one remembers of a message is out of date by the time it sees the
/// message again, and must be read again. The feed ends as a fresh projector rebuilds it.
#[tokio::test]
async fn feed_projectors_taking_turns_number_the_same_items_as_a_rebuild() {
    let pool = migrated_pool().await;
    let store = PgStore::new(pool.clone());
    let turns = [
        Subscription::new(pool.clone(), Arc::new(StateChangeFeed::new())).with_batch_size(1),
        Subscription::new(pool.clone(), Arc::new(StateChangeFeed::new())).with_batch_size(1),
    ];
    turns[0].ensure_checkpoint().await.unwrap();
    let mut turn = 0;
    let now = Utc::now();
    for i in 0..6 {
        let (id, compose) = compose_command(i, Dispatch::Draft);
        let commands = [
            compose,
            MessageCommand::Schedule {
                publish_at: now + chrono::Duration::days(1),
                now,
            },
            MessageCommand::Send {
                now,
                expected_publish_at: None,
            },
            MessageCommand::StartSendAttempt { now, attempt: 1 },
            MessageCommand::RecordSendFailure {
                attempt: 1,
                reason: "busy".into(),
                retry_at: Some(now),
                at: now,
            },
            MessageCommand::StartSendAttempt { now, attempt: 2 },
            MessageCommand::RecordSent {
                provider_message_id: Some(format!("sg-{i}")),
                at: now,
            },
        ];
        for command in commands {
            store.execute(id, command).await.unwrap();
            // Behind: another test's transaction, older than the event, is still open.
            loop {
                match turns[turn % 2].run_batch().await.unwrap() {
                    BatchOutcome::Handled(1) => break,
                    BatchOutcome::Behind => tokio::time::sleep(Duration::from_millis(5)).await,
                    other => panic!("{other:?}"),
                }
            }
            turn += 1;
        }
    }
    let (_, taking_turns) = snapshot(&pool).await;
    assert!(taking_turns.len() >= 6 * 4, "{}", taking_turns.len());
    // In batches of 2: each is folded while the one before is written.
    Subscription::new(pool.clone(), Arc::new(StateChangeFeed::new()))
        .with_batch_size(2)
        .rebuild()
        .await
        .unwrap();
    let (_, rebuilt) = snapshot(&pool).await;
    assert_eq!(taking_turns, rebuilt);
}

/// A TCP proxy to PostgreSQL that cuts one connection off mid-statement. The first statement
/// whose text contains `trigger` is prepared as usual (sqlx sends the text, waits for the
/// description, then binds and executes by name); the chunk after it (the execution) still
/// goes to the server, which runs and commits it, but the client is disconnected before any
/// answer comes back. Later connections pass untouched.
struct CuttingProxy {
    port: u16,
    cuts: Arc<AtomicUsize>,
}

impl CuttingProxy {
    async fn start(server: std::net::SocketAddr, trigger: &'static [u8]) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cuts = Arc::new(AtomicUsize::new(0));
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let counted = cuts.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let upstream = tokio::net::TcpStream::connect(server).await.unwrap();
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = upstream.into_split();
                let cut = Arc::new(tokio::sync::Notify::new());
                let (armed, counted, cut_down) = (armed.clone(), counted.clone(), cut.clone());
                // Server to client, until the cut.
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        tokio::select! {
                            read = from_server.read(&mut buf) => match read {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if to_client.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            },
                            _ = cut_down.notified() => return,
                        }
                    }
                });
                // Client to server; the trigger's chunk is forwarded after the cut is made.
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut prepared = false;
                    loop {
                        let n = match from_client.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let hit = prepared;
                        if hit {
                            cut.notify_one();
                            counted.fetch_add(1, Ordering::SeqCst);
                        }
                        if armed.load(Ordering::SeqCst)
                            && buf[..n].windows(trigger.len()).any(|w| w == trigger)
                        {
                            armed.store(false, Ordering::SeqCst);
                            prepared = true;
                        }
                        if to_server.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        if hit {
                            // Let the server run what it was sent, then hang up on it too.
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            return;
                        }
                    }
                });
            }
        });
        Self { port, cuts }
    }
}

/// An append whose connection breaks once the INSERT was sent may have been committed: its
/// commands report a store error and are not run again (a second run could record a fact
/// twice or refuse a command that in fact succeeded). Here the server did commit it: the
/// message is in the log once, and the caller, asking again, is told it exists.
#[tokio::test]
async fn an_append_cut_off_once_sent_is_reported_as_unknown_and_not_run_again() {
    use messaging::store::CommandError;
    use sqlx::postgres::{PgPoolOptions, PgSslMode};

    let (direct, options, server) = behind_a_proxy().await;
    let proxy = CuttingProxy::start(server, b"INSERT INTO events").await;
    // Plain text, so the proxy sees the statement; one connection, so the INSERT's text is
    // sent (a statement is prepared once per connection).
    let proxied = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            options
                .host("127.0.0.1")
                .port(proxy.port)
                .ssl_mode(PgSslMode::Disable),
        )
        .await
        .unwrap();
    let store = PgStore::new(proxied);

    let (id, compose) = compose_command(0, Dispatch::Now);
    let result = store.execute(id, compose.clone()).await;
    assert_eq!(
        proxy.cuts.load(Ordering::SeqCst),
        1,
        "the INSERT was not cut"
    );
    assert!(
        matches!(result, Err(CommandError::Store(_))),
        "an append of unknown outcome must say so: {result:?}"
    );
    // The server runs what it received on its own time (slowly, under a loaded test run).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let events = loop {
        let events: Vec<String> = sqlx::query_scalar(
            "SELECT event_type FROM events WHERE aggregate_id = $1 ORDER BY sequence",
        )
        .bind(id.to_string())
        .fetch_all(&direct)
        .await
        .unwrap();
        if !events.is_empty() || tokio::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(events, ["MessageComposed", "MessageQueued"]);
    // The store works on (a new connection), and the caller learns what happened by asking.
    let again = store.execute(id, compose).await;
    assert!(
        matches!(
            again,
            Err(CommandError::Rejected(MessageError::AlreadyExists))
        ),
        "{again:?}"
    );
}

/// A waiting fact woken by its message's change, whose applier dies before settling it, is
/// leased again once the lease runs out: the message need not change once more. An applier
/// whose lease ran out cannot settle the fact once another has leased it.
#[tokio::test]
async fn a_woken_fact_whose_applier_died_is_leased_again_and_a_late_settlement_is_ignored() {
    use messaging::store::FactSettlement;

    let pool = migrated_pool().await;
    let (store, list, id, now) = queued_with_an_early_open(&pool).await;
    // Tried before the message was sent: it waits.
    let first = store
        .lease_webhook_facts(Utc::now() - chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    store
        .settle_webhook_facts(&[(first[0].lease(), FactSettlement::Wait(None))])
        .await
        .unwrap();
    assert!(store
        .lease_webhook_facts(Utc::now() - chrono::Duration::hours(1))
        .await
        .unwrap()
        .is_empty());
    // The message is sent: the fact is woken and leased, and its applier dies with it.
    record_sent(&store, &list, id, now).await;
    let woken = store
        .lease_webhook_facts(Utc::now() - chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(woken.len(), 1);
    // Its lease runs out (as 60 s would).
    sqlx::query("UPDATE webhook_inbox SET locked_until = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    let again = store
        .lease_webhook_facts(Utc::now() - chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "the woken fact was left waiting");

    // The first applier was only slow: its late settlement, on the state it saw, is ignored
    // (the fact is the second applier's now), and the second one's counts.
    store
        .settle_webhook_facts(&[(woken[0].lease(), FactSettlement::Wait(None))])
        .await
        .unwrap();
    let (status, waiting, locked_until): (String, bool, Option<chrono::DateTime<Utc>>) =
        sqlx::query_as("SELECT status, waiting, locked_until FROM webhook_inbox")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), waiting, locked_until),
        ("pending", false, Some(again[0].leased_until))
    );
    store
        .settle_webhook_facts(&[(again[0].lease(), FactSettlement::Applied)])
        .await
        .unwrap();
    let status: String = sqlx::query_scalar("SELECT status FROM webhook_inbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "applied");
}

/// The work queues are vacuumed (and analyzed) by the service once enough dead row versions
/// pile up: every sent job leaves several, and claims step over them until they are cleared.
#[tokio::test]
async fn a_queue_full_of_dead_rows_is_vacuumed_and_analyzed() {
    use messaging::store::postgres::maintenance::QueueUpkeep;
    let pool = migrated_pool().await;
    let mut upkeep = QueueUpkeep::queues();
    // Where the server runs autovacuum, it must not clear them first.
    sqlx::query("ALTER TABLE send_jobs SET (autovacuum_enabled = false)")
        .execute(&pool)
        .await
        .unwrap();
    // Nothing dead yet: nothing to do.
    assert!(upkeep.round(&pool).await.is_empty());
    let counted = || async {
        sqlx::query_scalar::<_, f32>("SELECT reltuples FROM pg_class WHERE relname = 'send_jobs'")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(counted().await, -1.0, "never vacuumed nor analyzed yet");
    sqlx::query(
        "INSERT INTO send_jobs (message_id, service_id, channel, provider, due_at) \
         SELECT gen_random_uuid(), gen_random_uuid(), 'email', 'sandbox', now() \
         FROM generate_series(1, 25000)",
    )
    .execute(&pool)
    .await
    .unwrap();
    // A reader whose snapshot still sees the rows (a rebuild streaming the log, say): the
    // VACUUM cannot remove them while it lasts.
    let mut reader = pool.acquire().await.unwrap();
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *reader)
        .await
        .unwrap();
    sqlx::query("SELECT count(*) FROM send_jobs")
        .execute(&mut *reader)
        .await
        .unwrap();
    sqlx::query("DELETE FROM send_jobs")
        .execute(&pool)
        .await
        .unwrap();
    // The server's statistics arrive within a second or so of the commit.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let vacuumed = loop {
        let vacuumed = upkeep.round(&pool).await;
        if !vacuumed.is_empty() || tokio::time::Instant::now() > deadline {
            break vacuumed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(vacuumed, ["send_jobs"]);
    // VACUUM (ANALYZE) counted the table's rows: none live.
    assert_eq!(counted().await, 0.0);
    // What it could not remove does not make every round vacuum again.
    assert!(
        upkeep.round(&pool).await.is_empty(),
        "vacuumed again for nothing"
    );
    sqlx::query("COMMIT").execute(&mut *reader).await.unwrap();
}

#[tokio::test]
async fn a_claims_late_delete_keeps_a_job_its_message_queued_again() {
    let pool = migrated_pool().await;
    let store = PgStore::new(pool.clone());
    let (message, service) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    sqlx::query(
        "INSERT INTO send_jobs (message_id, service_id, channel, provider, due_at) \
         VALUES ($1, $2, 'email', 'sendgrid', now())",
    )
    .bind(message)
    .bind(service)
    .execute(&pool)
    .await
    .unwrap();
    let jobs = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM send_jobs")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let claimed = store
        .claim_send_jobs(
            10,
            PerService {
                least: 10,
                most: 10,
            },
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    // Meanwhile the message was queued again: the delivery projection makes its job due
    // and clears the lease, as a MessageQueued does.
    sqlx::query("UPDATE send_jobs SET due_at = now(), locked_until = NULL")
        .execute(&pool)
        .await
        .unwrap();
    // The claim's delete, decided on what it read before, leaves that job alone.
    store.delete_send_job(&claimed[0]).await.unwrap();
    assert_eq!(jobs(pool.clone()).await, 1);
    // A claim deletes what it holds.
    let again = store
        .claim_send_jobs(
            10,
            PerService {
                least: 10,
                most: 10,
            },
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    store.delete_send_job(&again[0]).await.unwrap();
    assert_eq!(jobs(pool.clone()).await, 0);
}

#[tokio::test]
async fn a_log_with_transaction_ids_ahead_of_the_cluster_is_refused_at_start_up() {
    // As after a restore into another cluster: the stored ids are past the ones it assigns,
    // so every new event would sort before the readers' checkpoints and never be read.
    let pool = migrated_pool().await;
    messaging::startup::migrate(&pool)
        .await
        .expect("an empty log starts");
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata, transaction_id) \
         VALUES ('Message', 'restored', 1, 'MessageCancelled', '1', '{}', '{}', \
                 (pg_snapshot_xmax(pg_current_snapshot())::text::bigint + 1000000)::text::xid8)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let error = messaging::startup::migrate(&pool)
        .await
        .expect_err("a log ahead of the cluster is refused");
    let message = format!("{error:#}");
    assert!(
        message.contains("ahead of this PostgreSQL cluster's")
            && message.contains("pg_resetwal --epoch="),
        "{message}"
    );
}

#[tokio::test]
async fn a_command_whose_caller_went_away_still_wakes_every_reader() {
    // The wake-up used to be rung by the caller once it had its answer: a client that went
    // away while its command was appended left every instance's readers to their next poll.
    let pool = migrated_pool().await;
    let store = PgStore::new(pool.clone());
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen("events").await.unwrap();
    // Holds the writer's INSERT back until its caller is gone.
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let (id, compose) = compose_command(0, Dispatch::Draft);
    let gone = tokio::time::timeout(Duration::from_millis(300), store.execute(id, compose)).await;
    assert!(gone.is_err(), "the caller must go away before the append");
    blocker.commit().await.unwrap();
    let notified = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await;
    assert!(notified.is_ok(), "no NOTIFY events after the append");
    let appended: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
        .bind(id.to_string())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(appended, 1, "the command was appended all the same");
}

/// The types of a message's events in order, checking there is no gap: each command
/// appended right after the event its fold ended with.
async fn event_types(pool: &PgPool, id: MessageId) -> Vec<String> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT sequence, event_type FROM events WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(id.to_string())
    .fetch_all(pool)
    .await
    .unwrap();
    let sequences: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(sequences, (1..=rows.len() as i64).collect::<Vec<_>>());
    rows.into_iter().map(|r| r.1).collect()
}

/// A worker's batches decide against the folds the store kept (the sender's round as it read
/// it, then the folds its starts left) without reading the messages again: a fold another
/// instance has since made stale must never decide. Store `b` stands for another instance on
/// the same log.
#[tokio::test]
async fn a_fold_kept_by_one_instance_never_decides_over_another_instances_append() {
    let pool = migrated_pool().await;
    let (a, b) = (PgStore::new(pool.clone()), PgStore::new(pool.clone()));
    let now = Utc::now;
    let queued = |i: usize| {
        let a = &a;
        async move {
            let id = composed(a, i, Dispatch::Now).await;
            // As the sender reads its round: `a` keeps these folds.
            let read = a.load_messages(&[id]).await.unwrap();
            assert!(!read[&id].data().unwrap().attempt_in_progress);
            id
        }
    };
    let start = || MessageCommand::StartSendAttempt {
        now: now(),
        attempt: 1,
    };
    let sent = || MessageCommand::RecordSent {
        provider_message_id: Some("p".into()),
        at: now(),
    };

    // Cancelled elsewhere after `a` read it: `a`'s start is refused, nothing appended.
    let cancelled = queued(0).await;
    b.execute(cancelled, MessageCommand::Cancel { now: now() })
        .await
        .unwrap();
    // Untouched elsewhere: started and recorded from the kept folds.
    let plain = queued(1).await;
    // Its outcome recorded elsewhere after `a` started it: `a`'s outcome adds nothing.
    let raced = queued(2).await;

    let started = a
        .execute_each(vec![
            (cancelled, start()),
            (plain, start()),
            (raced, start()),
        ])
        .await;
    assert!(
        matches!(
            started[0],
            Err(messaging::store::CommandError::Rejected(
                MessageError::InvalidTransition { .. }
            ))
        ),
        "{:?}",
        started[0]
    );
    assert!(started[1].is_ok() && started[2].is_ok(), "{started:?}");
    b.execute(raced, sent()).await.unwrap();
    let recorded = a.execute_each(vec![(plain, sent()), (raced, sent())]).await;
    assert!(recorded.iter().all(Result::is_ok), "{recorded:?}");

    assert_eq!(
        event_types(&pool, cancelled).await,
        ["MessageComposed", "MessageQueued", "MessageCancelled"]
    );
    let through_sent = [
        "MessageComposed",
        "MessageQueued",
        "SendAttemptStarted",
        "MessageSent",
    ];
    assert_eq!(event_types(&pool, plain).await, through_sent);
    assert_eq!(event_types(&pool, raced).await, through_sent);
}

/// A refusal decided on a kept fold makes no INSERT that could collide with what another
/// instance appended since: it is checked against a fresh read before it is the answer. (Each
/// of these was refused on the stale fold: an outcome recorded as never started, whose email
/// the sender's recovery would then have sent again; a send refused as `StaleSchedule`, whose
/// schedule the scheduler would then have dropped.)
#[tokio::test]
async fn a_refusal_on_a_fold_kept_by_one_instance_is_checked_against_the_log() {
    let pool = migrated_pool().await;
    let (a, b) = (PgStore::new(pool.clone()), PgStore::new(pool.clone()));
    let now = Utc::now;

    // `a` reads it before its send attempt (as the sender reads its round and keeps the
    // folds); `b` starts the attempt; `a` is asked to record the provider's answer.
    let started = composed(&a, 0, Dispatch::Now).await;
    a.load_messages(&[started]).await.unwrap();
    b.execute(
        started,
        MessageCommand::StartSendAttempt {
            now: now(),
            attempt: 1,
        },
    )
    .await
    .unwrap();
    // `a` reads it while scheduled at one time; `b` reschedules it; `a`'s scheduler fires
    // the new time.
    let first = now() + chrono::Duration::hours(1);
    let later = first + chrono::Duration::hours(1);
    let rescheduled = composed(&a, 1, Dispatch::At(first)).await;
    a.load_messages(&[rescheduled]).await.unwrap();
    b.execute(
        rescheduled,
        MessageCommand::Schedule {
            publish_at: later,
            now: now(),
        },
    )
    .await
    .unwrap();
    // The time as stored (a read of one message keeps no fold).
    let expected_publish_at = b.load_message(rescheduled).await.unwrap().unwrap();
    let expected_publish_at = expected_publish_at.data().unwrap().publish_at;
    assert!(expected_publish_at.is_some_and(|at| at != first));
    let results = a
        .execute_each(vec![
            (
                started,
                MessageCommand::RecordSent {
                    provider_message_id: Some("p".into()),
                    at: now(),
                },
            ),
            (
                rescheduled,
                MessageCommand::Send {
                    now: now(),
                    expected_publish_at,
                },
            ),
        ])
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(
        event_types(&pool, started).await,
        [
            "MessageComposed",
            "MessageQueued",
            "SendAttemptStarted",
            "MessageSent"
        ]
    );
    assert_eq!(
        event_types(&pool, rescheduled).await,
        [
            "MessageComposed",
            "MessageScheduled",
            "MessageScheduled",
            "MessageQueued"
        ]
    );
}

/// The feed's read of messages before a batch starts from a message's snapshot (taken by the
/// commands on it) where one precedes the batch, and gives the same folds as reading every
/// event, at any sequence.
#[tokio::test]
async fn the_feeds_read_of_a_long_message_starts_from_its_snapshot_and_folds_the_same() {
    use messaging_projections::event::load_messages_before;
    use sqlx::Connection;

    // One command per open: each reads the message, and one of them takes its snapshot.
    let app = TestApp::spawn().await;
    let id = app.email_opened(150).await;
    let mut conn = PgConnection::connect(&app.database_url).await.unwrap();
    let snapshot: i64 =
        sqlx::query_scalar("SELECT sequence FROM message_snapshots WHERE aggregate_id = $1")
            .bind(id.to_string())
            .fetch_one(&mut conn)
            .await
            .expect("the commands took a snapshot");
    let last = 4 + 150;
    assert!((64..=last).contains(&snapshot), "snapshot at {snapshot}");

    // Before the snapshot's sequence, at it, just after it and after the last event.
    let points = [10, snapshot, snapshot + 1, last + 1];
    async fn folds_at(conn: &mut PgConnection, id: MessageId, points: &[i64]) -> Vec<Message> {
        let mut out = Vec::new();
        for point in points {
            let wanted = [(id.to_string(), *point)];
            let mut read = load_messages_before(conn, &wanted).await.unwrap();
            out.push(read.remove(&wanted[0].0).unwrap());
        }
        out
    }
    let from_snapshot = folds_at(&mut conn, id, &points).await;
    let whole = app
        .store
        .load_message(id)
        .await
        .unwrap()
        .expect("the message");
    assert_eq!(from_snapshot[3], whole, "through the last event");
    assert_eq!(from_snapshot[3].data().unwrap().opens, 150);

    // The same folds from the events alone.
    sqlx::query("UPDATE message_snapshots SET fold_version = 0")
        .execute(&mut conn)
        .await
        .unwrap();
    let from_events = folds_at(&mut conn, id, &points).await;
    assert_eq!(from_snapshot, from_events);

    // It is read: a snapshot that says otherwise changes the fold after it (and only that).
    let mut other = serde_json::to_value(&whole).unwrap();
    other["data"]["opens"] = 7.into();
    sqlx::query("UPDATE message_snapshots SET fold_version = $1, fold = $2")
        .bind(Message::FOLD_VERSION)
        .bind(other.to_string())
        .execute(&mut conn)
        .await
        .unwrap();
    let tampered = folds_at(&mut conn, id, &points).await;
    assert_eq!(tampered[0], from_events[0]);
    assert_ne!(tampered[3], from_events[3]);

    // One that cannot be read is passed over.
    sqlx::query("UPDATE message_snapshots SET fold = 'not json'")
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(folds_at(&mut conn, id, &points).await, from_events);
}

/// The delivery projection's deletes and retries find their rows by primary key however many
/// ids a batch holds and however large the schedule is: planned with the ids in hand, a delete
/// of a few hundred read the whole table (the retry's join was planned by key even before its
/// key condition; it is checked so that it stays so).
#[tokio::test]
async fn the_delivery_projections_deletes_and_retries_go_by_key_at_any_batch_size() {
    use messaging_projections::delivery::{DELETE_JOBS, DELETE_SCHEDULES, RETRY_JOBS};
    let pool = migrated_pool().await;
    for statement in [
        "INSERT INTO scheduled_sends (message_id, publish_at) \
         SELECT gen_random_uuid(), now() + interval '1 day' FROM generate_series(1, 100000)",
        "INSERT INTO send_jobs (message_id, service_id, channel, provider, due_at) \
         SELECT gen_random_uuid(), gen_random_uuid(), 'email', 'sendgrid', now() \
         FROM generate_series(1, 100000)",
        "VACUUM ANALYZE scheduled_sends, send_jobs",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    for n in [1, 50, 500, 5000] {
        let ids: Vec<uuid::Uuid> = (0..n).map(|_| uuid::Uuid::now_v7()).collect();
        let times = vec![Utc::now(); n];
        for statement in [DELETE_SCHEDULES, DELETE_JOBS, RETRY_JOBS] {
            let explain = format!("EXPLAIN {statement}");
            let mut query = sqlx::query_scalar(&explain).bind(&ids);
            if statement == RETRY_JOBS {
                query = query.bind(&times);
            }
            let plan: Vec<String> = query.fetch_all(&pool).await.unwrap();
            let plan = plan.join("\n");
            assert!(
                plan.contains("_pkey") && !plan.contains("Seq Scan"),
                "{n} ids, {statement}:\n{plan}"
            );
        }
    }
    // Still deletes what it names, and nothing else.
    let some: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT message_id FROM scheduled_sends LIMIT 3")
            .fetch_all(&pool)
            .await
            .unwrap();
    let deleted = sqlx::query(DELETE_SCHEDULES)
        .bind(&some)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(deleted.rows_affected(), 3);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM scheduled_sends")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 99_997);
}
