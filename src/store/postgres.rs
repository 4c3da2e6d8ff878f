//! The PostgreSQL backend: cqrs-es + postgres-es in event-store mode for commands, plain SQL
//! for services, idempotency keys and the read models.

mod batch;
mod gauges;
mod group;
mod inbox;
pub use inbox::{begin_lease as begin_webhook_lease, LEASE as LEASE_WEBHOOK_FACTS};
mod jobs;
pub mod maintenance;
pub mod notify;
mod push;

use super::{
    CommandError, FactSettlement, Gauges, IdempotencyClaim, ListFilter, NewSubscription,
    PendingFact, PerService, PushDue, PushSubscription, ScheduledSend, SendJob, Service,
    ServiceRow, ServiceWithCredentials, Store, StoreError,
};
use crate::metrics::Metrics;
use crate::webhooks::inbox::{InboxFact, Problematic};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::CqrsFramework;
use messaging_domain::{Channel, Message, MessageCommand, MessageData, MessageId, ServiceId};
use messaging_projections::event::{
    load_messages_before_sent, message_events, message_events_page, Sent,
};
use messaging_projections::{FeedItem, HistoryItem, KeptConnection};
use postgres_es::PostgresEventRepository;
use sqlx::migrate::Migrator;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A subscription with its lag: feed items after its cursor.
const SUBSCRIPTION_VIEW: &str = "SELECT s.id, s.url, s.states, s.channels, s.cursor, \
       GREATEST((SELECT COALESCE(MAX(position), 0) FROM state_changes) - s.cursor, 0) AS lag, \
       s.delivered, s.failures, s.last_error, s.last_attempt_at, s.next_attempt_at, s.created_at \
     FROM subscriptions s";

pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// The message list's query on PostgreSQL (see [`crate::store::list_query`]): a profile is
/// an element of the `profiles` array.
pub fn list_query<'a>(select: &str, f: &'a ListFilter) -> sqlx::QueryBuilder<'a, sqlx::Postgres> {
    crate::store::list_query(select, f, ("profiles @> ARRAY[", "]"))
}

pub struct PgStore {
    pool: PgPool,
    /// The command side: the pool, cqrs-es (event-store mode) and the metrics.
    writer: Arc<group::Shared>,
    /// Client commands appended in groups, started on the first command.
    group: std::sync::OnceLock<group::Group>,
    /// Wakes the task that tells every instance's readers that events were committed.
    committed: Arc<tokio::sync::Notify>,
    /// Services already read. What is kept never changes once created (only the credentials
    /// can be replaced, and they are not kept here: the sender reads them for each round), so
    /// every instance can keep what it read: this saves a query per composed message. Only
    /// found services are kept (one created on another instance is read on first use); if a
    /// service's kept fields ever become mutable, this cache must go.
    services: std::sync::RwLock<HashMap<ServiceId, Service>>,
}

/// How many services [`PgStore`] keeps; past that it starts again from empty.
const SERVICES_KEPT: usize = 10_000;

/// The commit notifier's pause after each NOTIFY. Under a steady load readers do not wait for
/// wake-ups (after a batch that was not full they read again after
/// [`GATHER`](messaging_projections::subscription::GATHER), 25 ms); a wake-up matters to a reader
/// that found nothing, and reaches it about this much later than the commit at most (plus the
/// NOTIFY's round trip, or a reconnect when the notifier's connection was lost).
const NOTIFY_AT_MOST_EVERY: Duration = Duration::from_millis(5);

/// Sends NOTIFY `events` after commits, at most once per few milliseconds however many
/// commands commit: readers in every instance (this one included, through its listener) wake
/// without a NOTIFY inside each appending transaction.
fn spawn_commit_notifier(pool: PgPool) -> Arc<tokio::sync::Notify> {
    let committed = Arc::new(tokio::sync::Notify::new());
    let weak = Arc::downgrade(&committed);
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            // Its own connection, kept: through the pool each NOTIFY cost three round trips
            // (the pool checks a connection when it is taken and when it is given back). Its
            // one statement touches no table: it keeps its plan.
            let mut own = KeptConnection::keeping_plans();
            loop {
                // Ends once the store is gone.
                let Some(committed) = weak.upgrade() else {
                    own.close().await;
                    return;
                };
                let woken =
                    tokio::time::timeout(Duration::from_secs(1), committed.notified()).await;
                drop(committed);
                if woken.is_err() {
                    continue;
                }
                // Readers poll as well: a lost wake-up only delays them.
                let sent = match own.ready(&pool).await {
                    Ok(conn) => sqlx::query("SELECT pg_notify('events', '')")
                        .execute(conn)
                        .await
                        .map(drop),
                    Err(error) => Err(error),
                };
                if let Err(error) = sent {
                    own.discard();
                    tracing::debug!(%error, "could not notify readers");
                }
                tokio::time::sleep(NOTIFY_AT_MOST_EVERY).await;
            }
        });
    }
    committed
}

/// The command side over `pool`. Event-store mode only: the snapshot and aggregate-store modes
/// of cqrs-es 0.5.0 apply each event twice. No cqrs-es queries but the metrics' event
/// counter: projections are durable subscriptions.
fn writer(
    pool: &PgPool,
    metrics: Option<Arc<Metrics>>,
    committed: Arc<tokio::sync::Notify>,
) -> Arc<group::Shared> {
    let repo = PostgresEventRepository::new(pool.clone());
    let cqrs = CqrsFramework::new(PersistedEventStore::new_event_store(repo), vec![], ());
    let cqrs = match &metrics {
        Some(metrics) => cqrs.append_query(metrics.event_counter()),
        None => cqrs,
    };
    Arc::new(group::Shared {
        pool: pool.clone(),
        cqrs,
        metrics,
        committed,
        folds: Default::default(),
    })
}

impl PgStore {
    pub fn new(pool: PgPool) -> Self {
        let committed = spawn_commit_notifier(pool.clone());
        Self {
            writer: writer(&pool, None, committed.clone()),
            committed,
            group: std::sync::OnceLock::new(),
            pool,
            services: std::sync::RwLock::default(),
        }
    }

    /// Counts commands by type and outcome, and the events they append.
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        Self {
            writer: writer(&self.pool, Some(metrics), self.committed.clone()),
            group: std::sync::OnceLock::new(),
            ..self
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A client's command through the group writers (which ring the commit notifier).
    async fn execute_grouped(&self, id: MessageId, command: MessageCommand) -> batch::Outcome {
        self.group
            .get_or_init(|| group::Group::start(self.writer.clone()))
            .execute(id, command)
            .await
    }
}

#[async_trait]
impl Store for PgStore {
    /// Appended with the commands other callers send meanwhile (see [`group`]): a read (none
    /// for a Compose) and one INSERT for the whole group, where the cqrs-es path takes a read
    /// and BEGIN, one INSERT per event, COMMIT for each command. Any failure of that append (a
    /// conflict, the database) falls back to cqrs-es with its conflict retries.
    async fn execute(&self, id: MessageId, command: MessageCommand) -> Result<(), CommandError> {
        self.execute_grouped(id, command).await.map(|_| ())
    }

    /// The writer's own fold of the message (no second read), unless cqrs-es ran the command.
    async fn execute_and_load(
        &self,
        id: MessageId,
        command: MessageCommand,
    ) -> Result<Message, CommandError> {
        match self.execute_grouped(id, command).await? {
            Some(decided) => Ok(decided.message()),
            None => crate::store::load_after_command(self, id).await,
        }
    }

    async fn execute_each(
        &self,
        commands: Vec<(MessageId, MessageCommand)>,
    ) -> Vec<Result<(), CommandError>> {
        let (results, _) =
            batch::execute_each(&self.writer, batch::On::Pool(&self.pool), commands).await;
        if results.iter().any(batch::may_have_appended) {
            self.committed.notify_one();
        }
        results.into_iter().map(|r| r.map(|_| ())).collect()
    }

    async fn load_message(&self, id: MessageId) -> Result<Option<Message>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let message = messaging_projections::load_message(&mut conn, &id.to_string(), None).await?;
        Ok(message.data().is_some().then_some(message))
    }

    async fn load_messages(
        &self,
        ids: &[MessageId],
    ) -> Result<HashMap<MessageId, Message>, StoreError> {
        let keys: Vec<String> = ids.iter().map(MessageId::to_string).collect();
        let mut conn = self.pool.acquire().await?;
        let loaded = batch::load_many(&mut conn, &keys, Sent::Unprepared).await;
        drop(conn);
        let mut folded = match loaded {
            Ok(folded) => {
                // Kept for the commands the caller is about to run on them (the sender's
                // starts): they then read nothing (see `batch::execute_each`).
                self.writer.remember(&folded);
                folded
            }
            // One message that cannot be read must not hide the others: one at a time, the
            // unreadable ones left out (logged).
            Err(error) => {
                tracing::warn!(%error, "reading messages together failed; reading them one by one");
                return Ok(crate::store::load_each(self, ids).await);
            }
        };
        Ok(ids
            .iter()
            .zip(&keys)
            .filter_map(|(id, key)| {
                let (message, _) = folded.remove(key)?;
                message.data().is_some().then_some((*id, message))
            })
            .collect())
    }

    async fn message(
        &self,
        id: MessageId,
    ) -> Result<Option<(Message, Vec<HistoryItem>)>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let events = message_events(&mut conn, &id.to_string(), None).await?;
        crate::store::with_history(events)
    }

    async fn message_history(
        &self,
        id: MessageId,
        after: i64,
        limit: i64,
    ) -> Result<Option<Vec<HistoryItem>>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let key = id.to_string();
        let page = message_events_page(&mut conn, &key, after, limit).await?;
        // The message through `after`: its snapshot (where one comes before) and the events
        // after it, for the state before the page's first event.
        let wanted = [(key.clone(), after.saturating_add(1))];
        let start = load_messages_before_sent(&mut conn, &wanted, Sent::Unprepared)
            .await?
            .remove(&key)
            .unwrap_or_default();
        if page.is_empty() && start.data().is_none() {
            // No events after `after`, and none up to it: no such message.
            return Ok(None);
        }
        let mut events = Vec::with_capacity(page.len());
        for e in page {
            events.push((e.sequence, e.message_event()?, e.recorded_at));
        }
        Ok(Some(
            messaging_projections::view::history_from(start, events).1,
        ))
    }

    async fn create_service(
        &self,
        service: &Service,
        credentials: &serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO services (id, channel, provider, name, username, credentials, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(service.id.as_uuid())
        .bind(service.channel.as_str())
        .bind(service.provider.as_str())
        .bind(&service.name)
        .bind(&service.username)
        .bind(credentials)
        .bind(service.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn replace_service_credentials(
        &self,
        id: ServiceId,
        credentials: &serde_json::Value,
        expected: Option<&serde_json::Value>,
    ) -> Result<bool, StoreError> {
        let replaced = sqlx::query(
            "UPDATE services SET credentials = $2 \
             WHERE id = $1 AND ($3::jsonb IS NULL OR credentials = $3::jsonb)",
        )
        .bind(id.as_uuid())
        .bind(credentials)
        .bind(expected)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(replaced > 0)
    }

    async fn service(&self, id: ServiceId) -> Result<Option<Service>, StoreError> {
        if let Some(known) = self.services.read().ok().and_then(|s| s.get(&id).cloned()) {
            return Ok(Some(known));
        }
        let row: Option<ServiceRow> = sqlx::query_as(
            "SELECT id, channel, provider, name, username, created_at FROM services WHERE id = $1",
        )
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        let service = row.map(Service::try_from).transpose()?;
        if let (Some(service), Ok(mut kept)) = (&service, self.services.write()) {
            if kept.len() >= SERVICES_KEPT {
                kept.clear();
            }
            kept.insert(id, service.clone());
        }
        Ok(service)
    }

    async fn service_credentials(
        &self,
        id: ServiceId,
    ) -> Result<Option<(Service, serde_json::Value)>, StoreError> {
        let row: Option<ServiceWithCredentials> = sqlx::query_as(
            "SELECT id, channel, provider, name, username, created_at, credentials \
             FROM services WHERE id = $1",
        )
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((Service::try_from(r.service)?, r.credentials)))
            .transpose()
    }

    async fn services(&self) -> Result<Vec<Service>, StoreError> {
        let rows: Vec<ServiceRow> = sqlx::query_as(
            "SELECT id, channel, provider, name, username, created_at FROM services \
             ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Service::try_from).collect()
    }

    async fn claim_idempotency_key(
        &self,
        key: &str,
        request_hash: &str,
        id: MessageId,
    ) -> Result<IdempotencyClaim, StoreError> {
        let pool = &self.pool;
        let insert = move || async move {
            sqlx::query(
                "INSERT INTO idempotency_keys (key, request_hash, message_id) \
                 VALUES ($1, $2, $3) ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(request_hash)
            .bind(id.as_uuid())
            .execute(pool)
            .await
            .map(|done| done.rows_affected() == 1)
        };
        let read = move || async move {
            sqlx::query_as("SELECT message_id, request_hash FROM idempotency_keys WHERE key = $1")
                .bind(key)
                .fetch_optional(pool)
                .await
        };
        crate::store::claim_key(insert, read).await
    }

    async fn release_idempotency_key(&self, key: &str, id: MessageId) -> Result<(), StoreError> {
        // Not if the message exists after all (another request under the key composed it).
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE key = $1 AND message_id = $2 \
             AND NOT EXISTS (SELECT 1 FROM events WHERE aggregate_type = $3 \
                             AND aggregate_id = $4)",
        )
        .bind(key)
        .bind(id.as_uuid())
        .bind(Message::TYPE_NAME)
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_messages(&self, f: &ListFilter) -> Result<Vec<Message>, StoreError> {
        let rows: Vec<(String,)> = list_query("SELECT message::text", f)
            .build_query_as()
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|(json,)| {
                serde_json::from_str::<MessageData>(&json)
                    .map(Message::from)
                    .map_err(|e| StoreError::new(format!("message_list row: {e}")))
            })
            .collect()
    }

    async fn state_changes(&self, after: i64, limit: i64) -> Result<Vec<FeedItem>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT position, message_id, channel, service_id, previous_state, state, cause, \
                    occurred_at, recorded_at \
             FROM state_changes WHERE position > $1 ORDER BY position LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn create_subscription(
        &self,
        new: &NewSubscription,
    ) -> Result<PushSubscription, StoreError> {
        let id = uuid::Uuid::now_v7();
        sqlx::query(
            "INSERT INTO subscriptions (id, url, secret, states, channels, cursor) \
             VALUES ($1, $2, $3, $4, $5, \
                     COALESCE($6, (SELECT COALESCE(MAX(position), 0) FROM state_changes)))",
        )
        .bind(id)
        .bind(&new.url)
        .bind(&new.secret)
        .bind(&new.states)
        .bind(&new.channels)
        .bind(new.after)
        .execute(&self.pool)
        .await?;
        self.subscription(id)
            .await?
            .ok_or_else(|| StoreError::new(format!("subscription {id} vanished")))
    }

    async fn subscription(&self, id: uuid::Uuid) -> Result<Option<PushSubscription>, StoreError> {
        Ok(
            sqlx::query_as(&format!("{SUBSCRIPTION_VIEW} WHERE s.id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn subscriptions(&self) -> Result<Vec<PushSubscription>, StoreError> {
        Ok(
            sqlx::query_as(&format!("{SUBSCRIPTION_VIEW} ORDER BY s.created_at, s.id"))
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn delete_subscription(&self, id: uuid::Uuid) -> Result<bool, StoreError> {
        let deleted = sqlx::query("DELETE FROM subscriptions WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(deleted > 0)
    }

    async fn ready(&self) -> Result<(), StoreError> {
        let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await?;
        if applied.unwrap_or(0) < latest {
            return Err(StoreError::new(format!(
                "migrations pending: database at {}, binary expects {latest}",
                applied.unwrap_or(0)
            )));
        }
        Ok(())
    }

    async fn lease_due_schedules(&self, limit: i64) -> Result<Vec<ScheduledSend>, StoreError> {
        jobs::lease_due_schedules(&self.pool, limit).await
    }

    async fn finish_schedules(&self, fired: &[ScheduledSend]) -> Result<(), StoreError> {
        jobs::finish_schedules(&self.pool, fired).await
    }

    async fn release_schedules(&self, fired: &[ScheduledSend]) -> Result<(), StoreError> {
        jobs::release_schedules(&self.pool, fired).await
    }

    async fn next_schedule_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        jobs::next_schedule_due(&self.pool).await
    }

    async fn claim_send_jobs(
        &self,
        limit: i64,
        per_service: PerService,
        lease: Duration,
    ) -> Result<Vec<SendJob>, StoreError> {
        jobs::claim_send_jobs(&self.pool, limit, per_service, lease).await
    }

    async fn next_send_job_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        jobs::next_send_job_due(&self.pool).await
    }

    async fn release_send_job(
        &self,
        job: &SendJob,
        due_at: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        jobs::release_send_job(&self.pool, job, due_at).await
    }

    async fn delete_send_job(&self, job: &SendJob) -> Result<(), StoreError> {
        jobs::delete_send_job(&self.pool, job).await
    }

    async fn record_webhook_facts(&self, facts: &[InboxFact]) -> Result<u64, StoreError> {
        inbox::record(&self.pool, facts).await
    }

    async fn outbound_message_id(
        &self,
        channel: Channel,
        provider_message_id: &str,
    ) -> Result<Option<MessageId>, StoreError> {
        inbox::outbound_message_id(&self.pool, channel, provider_message_id).await
    }

    async fn lease_webhook_facts(
        &self,
        gave_up_before: DateTime<Utc>,
    ) -> Result<Vec<PendingFact>, StoreError> {
        inbox::lease(&self.pool, gave_up_before).await
    }

    async fn settle_webhook_facts(
        &self,
        settled: &[(crate::store::FactLease, FactSettlement)],
    ) -> Result<(), StoreError> {
        inbox::settle(&self.pool, settled).await
    }

    async fn rematch_replies(
        &self,
        channel: Channel,
        provider_message_id: &str,
        message_id: MessageId,
    ) -> Result<u64, StoreError> {
        inbox::rematch_replies(&self.pool, channel, provider_message_id, message_id).await
    }

    async fn webhook_problems(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Problematic>, StoreError> {
        inbox::problems(&self.pool, before, limit).await
    }

    async fn lease_push_subscriptions(
        &self,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<PushDue>, StoreError> {
        push::lease(&self.pool, lease, limit).await
    }

    async fn push_acknowledged(
        &self,
        leased: &PushDue,
        cursor: i64,
        delivered: i64,
    ) -> Result<bool, StoreError> {
        push::acknowledged(&self.pool, leased, cursor, delivered).await
    }

    async fn push_failed(
        &self,
        leased: &PushDue,
        failures: i32,
        reason: &str,
        retry_in: Duration,
    ) -> Result<bool, StoreError> {
        push::failed(&self.pool, leased, failures, reason, retry_in).await
    }

    async fn next_push_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        push::next_due(&self.pool).await
    }

    async fn gauges(&self) -> Result<Gauges, StoreError> {
        gauges::read(&self.pool).await
    }

    async fn feed_end(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM state_changes")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn projection_lag(&self, name: &str) -> Result<i64, StoreError> {
        messaging_projections::subscription::lag(&self.pool, name)
            .await
            .map_err(StoreError::from)
    }
}
