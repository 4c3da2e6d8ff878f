//! The store port: everything the service asks of its database, behind one trait, so that a
//! second backend (the embedded SQLite default) can implement the same behaviour.

use crate::webhooks::inbox::{FactKind, InboxFact, Problematic};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use messaging_domain::Message;
use messaging_domain::{Channel, MessageCommand, MessageError, MessageId, Provider, ServiceId};
use messaging_projections::{FeedItem, HistoryItem};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

mod commands;
pub mod postgres;
pub mod sqlite;

/// Why a command did not land.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Rejected(#[from] MessageError),
    /// The message kept changing under us; retrying did not help.
    #[error("the message is being changed concurrently; try again")]
    Busy,
    #[error("store: {0}")]
    Store(String),
    /// The database could not be reached in time (no connection free, or none could be
    /// made): nothing was written, and the same command may simply be sent again.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// How many events read past a message's snapshot (or from its first event) make the load
/// take a new snapshot of it. Most messages have a handful of events and never get one; an
/// email opened and clicked by thousands of recipients gets one every this many facts, so a
/// command on it reads at most about this many events besides the snapshot.
pub(crate) const SNAPSHOT_AFTER: usize = 64;

#[derive(Debug, thiserror::Error)]
#[error("store: {message}")]
pub struct StoreError {
    pub message: String,
    /// See [`CommandError::Unavailable`]: the caller may try again.
    pub unavailable: bool,
}

impl StoreError {
    pub fn new(message: impl Into<String>) -> Self {
        StoreError {
            message: message.into(),
            unavailable: false,
        }
    }
}

/// Whether an error, or one it was caused by, says no connection to the database could be
/// had: every connection busy past the pool's wait (`PoolTimedOut`) or the pool closed (the
/// service stopping). Nothing was sent to the database then. Not a refused or failed
/// statement, nor a connection lost mid-statement (whose outcome may be unknown).
pub fn unavailable(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(e) = e.downcast_ref::<sqlx::Error>() {
            return matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed);
        }
        cause = e.source();
    }
    false
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError {
            unavailable: unavailable(&e),
            message: e.to_string(),
        }
    }
}

impl From<messaging_projections::ProjectionError> for StoreError {
    fn from(e: messaging_projections::ProjectionError) -> Self {
        StoreError {
            unavailable: unavailable(&e),
            message: e.to_string(),
        }
    }
}

/// A connected account. Credentials are stored, never read back through the API.
#[derive(Debug, Clone, Serialize)]
pub struct Service {
    pub id: ServiceId,
    pub channel: Channel,
    pub provider: Provider,
    pub name: String,
    pub username: String,
    pub created_at: DateTime<Utc>,
}

/// A push subscription, as the API shows it (the secret is never shown).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct PushSubscription {
    pub id: uuid::Uuid,
    pub url: String,
    pub states: Option<Vec<String>>,
    pub channels: Option<Vec<String>>,
    /// The last feed position delivered (or passed over by the filters).
    pub cursor: i64,
    /// Feed items after the cursor, whether or not the filters will keep them.
    pub lag: i64,
    pub delivered: i64,
    pub failures: i32,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub next_attempt_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// A new push subscription. No `Debug`: it holds the secret.
#[derive(Clone)]
pub struct NewSubscription {
    pub url: String,
    pub secret: String,
    pub states: Option<Vec<String>>,
    pub channels: Option<Vec<String>>,
    /// Start after this position; `None` starts after the newest item (only new changes).
    pub after: Option<i64>,
}

impl From<&Service> for messaging_domain::ServiceRef {
    /// The account as a command carries it.
    fn from(service: &Service) -> Self {
        Self {
            id: service.id,
            channel: service.channel,
            provider: service.provider,
            username: service.username.clone(),
            name: Some(service.name.clone()),
        }
    }
}

/// What the idempotency table said about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// The key is new: it now names `id`.
    Claimed,
    /// The key was used before, for this message, with this request hash.
    Existing { id: MessageId, request_hash: String },
}

/// Claims an `Idempotency-Key` on either backend: `insert` tries to take the key (true when
/// it did), `read` says who holds it. A key found taken may be given back before it is read
/// (its compose was refused): then it is claimed again. Each round trip sees the other
/// request's change, so a few tries do; past them, busy (503: the caller may retry).
pub(crate) async fn claim_key<I, IF, R, RF>(
    mut insert: I,
    mut read: R,
) -> Result<IdempotencyClaim, StoreError>
where
    I: FnMut() -> IF,
    IF: std::future::Future<Output = Result<bool, sqlx::Error>>,
    R: FnMut() -> RF,
    RF: std::future::Future<Output = Result<Option<(uuid::Uuid, String)>, sqlx::Error>>,
{
    for _ in 0..3 {
        if insert().await? {
            return Ok(IdempotencyClaim::Claimed);
        }
        if let Some((message_id, request_hash)) = read().await? {
            return Ok(IdempotencyClaim::Existing {
                id: MessageId::from_uuid(message_id),
                request_hash,
            });
        }
    }
    Err(StoreError {
        message: "an Idempotency-Key kept being claimed and given back; retry the request".into(),
        unavailable: true,
    })
}

/// Filters of the message list; `None` means any.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub service_id: Option<ServiceId>,
    pub channel: Option<Channel>,
    pub state: Option<String>,
    pub direction: Option<String>,
    pub profile: Option<String>,
    /// Only messages older than this one (the cursor).
    pub before: Option<MessageId>,
    pub limit: i64,
}

impl ListFilter {
    /// Whether any filter on the list's own columns is given (see [`push_column_filters`]).
    pub fn has_column_filters(&self) -> bool {
        self.service_id.is_some()
            || self.channel.is_some()
            || self.state.is_some()
            || self.direction.is_some()
    }
}

/// The message list's query with only the filters given, on either backend: each combination
/// is a statement of its own, planned with the index it can use. With `($1 IS NULL OR state =
/// $1)` for every filter, SQLite planned a scan of the whole list whatever was given, and a
/// PostgreSQL generic plan (which it may pick after a statement's fifth run) can use none of
/// the list's indexes but the key, walking the list from its newest row until it has a page.
/// `profile` is the SQL around the one lower-cased username a profile filter binds (the
/// projections store usernames lower-cased in Rust: a database's `lower()` depends on its
/// locale).
pub fn list_query<'a, DB>(
    select: &str,
    f: &'a ListFilter,
    profile: (&str, &str),
) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    uuid::Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut q = sqlx::QueryBuilder::new(select);
    q.push(" FROM message_list WHERE 1 = 1");
    push_column_filters(&mut q, f, "");
    if let Some(username) = f.profile.as_deref() {
        q.push(" AND ")
            .push(profile.0)
            .push_bind(username.to_lowercase())
            .push(profile.1);
    }
    if let Some(before) = f.before {
        q.push(" AND message_id < ").push_bind(before.as_uuid());
    }
    q.push(" ORDER BY message_id DESC LIMIT ")
        .push_bind(f.limit);
    q
}

/// `f`'s filters on the list's own columns (service, channel, state, direction: those of
/// [`ListFilter::has_column_filters`]), each as
/// ` AND <prefix><column> = ` a bound value: `prefix` names the list's table where the query
/// joins another (`m.`).
pub fn push_column_filters<'a, DB>(
    q: &mut sqlx::QueryBuilder<'a, DB>,
    f: &'a ListFilter,
    prefix: &str,
) where
    DB: sqlx::Database,
    uuid::Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    if let Some(service) = f.service_id {
        q.push(format_args!(" AND {prefix}service_id = "))
            .push_bind(service.as_uuid());
    }
    if let Some(channel) = f.channel {
        q.push(format_args!(" AND {prefix}channel = "))
            .push_bind(channel.as_str());
    }
    if let Some(state) = f.state.as_deref() {
        q.push(format_args!(" AND {prefix}state = "))
            .push_bind(state);
    }
    if let Some(direction) = f.direction.as_deref() {
        q.push(format_args!(" AND {prefix}direction = "))
            .push_bind(direction);
    }
}

/// A scheduled send the scheduler leased, with the `publish_at` it was leased at: the firing
/// is for that time only (a reschedule written since is a different firing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSend {
    pub message_id: MessageId,
    pub publish_at: DateTime<Utc>,
}

/// A send job the sender claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendJob {
    pub message_id: MessageId,
    pub service_id: ServiceId,
    /// The end of this claim's lease (`locked_until` as claimed).
    pub leased_until: DateTime<Utc>,
}

/// How many of one service's due jobs one claim may take: `least` always (when it has them),
/// and more when the claim's `limit` divided evenly among the services with a job claimable
/// now is more, up to `most`. One busy service then takes the room a round has left (up to
/// `most`), while several busy services share it (as long as they are few enough for each
/// to get `least`; beyond that the earliest due jobs win).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerService {
    pub least: i64,
    pub most: i64,
}

/// A pending webhook inbox fact the applier leased.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingFact {
    /// The inbox row's id: ascending in the order rows were recorded.
    pub id: i64,
    pub event_id: String,
    pub message_id: Option<MessageId>,
    /// The stored kind, parsed (a kind this build does not know is `Other`).
    pub kind: FactKind,
    pub occurred_at: DateTime<Utc>,
    /// When the webhook delivered it.
    pub received_at: DateTime<Utc>,
    pub payload: serde_json::Value,
    /// The end of this lease (`locked_until` as leased): settling needs it, so that an
    /// applier whose lease ran out cannot settle a fact another applier has leased since.
    pub leased_until: DateTime<Utc>,
}

impl PendingFact {
    /// What settles this fact.
    pub fn lease(&self) -> FactLease {
        FactLease {
            id: self.id,
            until: self.leased_until,
        }
    }
}

/// One lease of one inbox fact: its row and the lease's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FactLease {
    pub id: i64,
    pub until: DateTime<Utc>,
}

/// How the applier settled one leased fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FactSettlement {
    /// Recorded on its message: `applied`, `applied_at` = now, no reason.
    Applied,
    /// It can never apply: `unmatched`, with the reason.
    Unmatched(String),
    /// A passing failure: stays `pending`, not waiting (leasable again at once), with the
    /// reason.
    Retry(String),
    /// Its message is unknown, or cannot take it yet: stays `pending` and waiting until the
    /// message is listed with a newer sequence than when the fact was leased; with the
    /// reason, if any.
    Wait(Option<String>),
}

/// A push subscription the pusher leased for one delivery. Its `Debug` leaves the secret out.
#[derive(Clone, PartialEq, Eq)]
pub struct PushDue {
    pub id: uuid::Uuid,
    pub url: String,
    pub secret: String,
    /// Feed states to deliver; `None` means every state.
    pub states: Option<Vec<String>>,
    /// Channels to deliver; `None` means every channel.
    pub channels: Option<Vec<String>>,
    /// The last feed position delivered (or passed over by the filters).
    pub cursor: i64,
    /// Failed deliveries since the last acknowledged one.
    pub failures: i32,
    /// The lease's end, as stored (its `next_attempt_at`): the lease's token. The delivery's
    /// acknowledgement or failure is recorded only while the subscription still holds it.
    pub leased_until: DateTime<Utc>,
}

impl std::fmt::Debug for PushDue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushDue")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("secret", &"***")
            .field("states", &self.states)
            .field("channels", &self.channels)
            .field("cursor", &self.cursor)
            .field("failures", &self.failures)
            .field("leased_until", &self.leased_until)
            .finish()
    }
}

/// Lag and queue depths, read when `/metrics` is scraped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Per projection (subscription checkpoint), by name in name order: events in the log
    /// after its checkpoint.
    pub projection_lag: Vec<(String, i64)>,
    /// Send jobs a claim could take now: `due_at` <= now and no lease running (a claim moves
    /// `due_at` to the lease's end).
    pub send_jobs_due: i64,
    /// All send jobs.
    pub send_jobs: i64,
    /// All scheduled sends.
    pub scheduled_sends: i64,
    /// Webhook inbox facts with status `pending` (waiting or not).
    pub webhook_inbox_pending: i64,
    /// Per push subscription, in id order: feed items after its cursor (never negative).
    pub push_lag: Vec<(uuid::Uuid, i64)>,
}

/// A `services` row as both backends read it.
#[derive(sqlx::FromRow)]
pub(crate) struct ServiceRow {
    pub id: uuid::Uuid,
    pub channel: String,
    pub provider: String,
    pub name: String,
    pub username: String,
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct ServiceWithCredentials {
    #[sqlx(flatten)]
    pub service: ServiceRow,
    pub credentials: serde_json::Value,
}

impl TryFrom<ServiceRow> for Service {
    type Error = StoreError;
    fn try_from(r: ServiceRow) -> Result<Self, Self::Error> {
        Ok(Service {
            id: ServiceId::from_uuid(r.id),
            channel: Channel::parse(&r.channel).ok_or_else(|| {
                StoreError::new(format!("service {}: channel {}", r.id, r.channel))
            })?,
            provider: Provider::parse(&r.provider).ok_or_else(|| {
                StoreError::new(format!("service {}: provider {}", r.id, r.provider))
            })?,
            name: r.name,
            username: r.username,
            created_at: r.created_at,
        })
    }
}

/// A `webhook_inbox` row as `webhook_problems` reads it.
#[derive(sqlx::FromRow)]
pub(crate) struct ProblemRow {
    pub id: i64,
    pub provider: String,
    pub event_id: String,
    pub message_id: Option<uuid::Uuid>,
    pub kind: String,
    pub status: String,
    pub reason: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub payload: serde_json::Value,
}

impl From<ProblemRow> for Problematic {
    fn from(r: ProblemRow) -> Self {
        Self {
            id: r.id,
            provider: r.provider,
            event_id: r.event_id,
            message_id: r.message_id,
            kind: r.kind,
            status: r.status,
            reason: r.reason,
            occurred_at: r.occurred_at,
            received_at: r.received_at,
            payload: r.payload,
        }
    }
}

/// [`Store::load_message`] for each message, one at a time; one that cannot be read is logged
/// and left out.
pub(crate) async fn load_each<S: Store + ?Sized>(
    store: &S,
    ids: &[MessageId],
) -> HashMap<MessageId, Message> {
    let mut messages = HashMap::with_capacity(ids.len());
    for id in ids {
        match store.load_message(*id).await {
            Ok(Some(message)) => {
                messages.insert(*id, message);
            }
            Ok(None) => {}
            Err(error) => tracing::error!(message_id = %id, %error, "cannot read the message"),
        }
    }
    messages
}

/// A message just commanded, read back (for [`Store::execute_and_load`] where no fold is at
/// hand).
pub(crate) async fn load_after_command<S: Store + ?Sized>(
    store: &S,
    id: MessageId,
) -> Result<Message, CommandError> {
    store
        .load_message(id)
        .await
        .map_err(|e| CommandError::Store(e.to_string()))?
        .ok_or_else(|| CommandError::Store(format!("message {id} vanished after a command")))
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Runs a command on a message, retrying optimistic-concurrency conflicts.
    async fn execute(&self, id: MessageId, command: MessageCommand) -> Result<(), CommandError>;
    /// Runs one command on each of several messages, with the same outcome per command as
    /// [`Store::execute`] one at a time, but in as few round trips as the backend allows
    /// (the workers' bulk path). One result per command, in order; one command rejected does
    /// not hold back the others.
    async fn execute_each(
        &self,
        commands: Vec<(MessageId, MessageCommand)>,
    ) -> Vec<Result<(), CommandError>> {
        let mut results = Vec::with_capacity(commands.len());
        for (id, command) in commands {
            results.push(self.execute(id, command).await);
        }
        results
    }
    /// [`Store::execute`], then the message as the command left it, for a response that shows
    /// it: a backend that decided the command against the message returns that fold and its
    /// new events (no second read); this default reads the message back.
    async fn execute_and_load(
        &self,
        id: MessageId,
        command: MessageCommand,
    ) -> Result<Message, CommandError> {
        self.execute(id, command).await?;
        load_after_command(self, id).await
    }
    /// The message folded from the log, without building its history (for the workers);
    /// `None` if there is no such message.
    async fn load_message(&self, id: MessageId) -> Result<Option<Message>, StoreError>;
    /// [`Store::load_message`] for several messages, in as few round trips as the backend
    /// allows; a message that does not exist is absent from the map (so is one whose events
    /// cannot be read, logged, when the others can).
    async fn load_messages(
        &self,
        ids: &[MessageId],
    ) -> Result<HashMap<MessageId, Message>, StoreError> {
        Ok(load_each(self, ids).await)
    }
    /// The message folded from the log, with its history; `None` if there is no such message.
    async fn message(
        &self,
        id: MessageId,
    ) -> Result<Option<(Message, Vec<HistoryItem>)>, StoreError>;

    /// One page of a message's history: its events after sequence `after`, at most `limit`,
    /// each with the state before and after it; `None` if there is no such message. This
    /// default folds the whole history (SQLite); PostgreSQL starts from the message's snapshot
    /// and reads only the page's events.
    async fn message_history(
        &self,
        id: MessageId,
        after: i64,
        limit: i64,
    ) -> Result<Option<Vec<HistoryItem>>, StoreError> {
        let limit = usize::try_from(limit).unwrap_or(0);
        Ok(self.message(id).await?.map(|(_, history)| {
            history
                .into_iter()
                .filter(|item| item.sequence > after)
                .take(limit)
                .collect()
        }))
    }

    async fn create_service(
        &self,
        service: &Service,
        credentials: &serde_json::Value,
    ) -> Result<(), StoreError>;
    async fn service(&self, id: ServiceId) -> Result<Option<Service>, StoreError>;
    /// The service with its stored credentials, for the sender alone.
    async fn service_credentials(
        &self,
        id: ServiceId,
    ) -> Result<Option<(Service, serde_json::Value)>, StoreError>;
    async fn services(&self) -> Result<Vec<Service>, StoreError>;
    /// Replaces service `id`'s credentials with `credentials`, only while they are still
    /// `expected` when given (a renewal made from what was read, that another instance may
    /// have made first). Returns whether they were replaced (false for an unknown service).
    async fn replace_service_credentials(
        &self,
        id: ServiceId,
        credentials: &serde_json::Value,
        expected: Option<&serde_json::Value>,
    ) -> Result<bool, StoreError>;

    async fn claim_idempotency_key(
        &self,
        key: &str,
        request_hash: &str,
        id: MessageId,
    ) -> Result<IdempotencyClaim, StoreError>;

    /// Gives back a key claimed for `id` once its request's Compose was refused, so that the
    /// corrected request may use the key again; kept if a message `id` exists after all.
    async fn release_idempotency_key(&self, key: &str, id: MessageId) -> Result<(), StoreError>;

    /// The message list read model, newest first.
    async fn list_messages(&self, filter: &ListFilter) -> Result<Vec<Message>, StoreError>;
    /// Feed items after `after`, oldest first.
    async fn state_changes(&self, after: i64, limit: i64) -> Result<Vec<FeedItem>, StoreError>;

    async fn create_subscription(
        &self,
        subscription: &NewSubscription,
    ) -> Result<PushSubscription, StoreError>;
    async fn subscription(&self, id: uuid::Uuid) -> Result<Option<PushSubscription>, StoreError>;
    async fn subscriptions(&self) -> Result<Vec<PushSubscription>, StoreError>;
    /// Whether there was one to delete.
    async fn delete_subscription(&self, id: uuid::Uuid) -> Result<bool, StoreError>;

    /// Whether the database answers and every migration is applied.
    async fn ready(&self) -> Result<(), StoreError>;

    // ---- Scheduler ----
    // `scheduled_sends` holds one row per scheduled message (`message_id`, `publish_at`,
    // `locked_until`), written by the delivery projection. The scheduler leases due rows,
    // fires each (a `Send` command carrying that `publish_at`), then finishes or releases
    // exactly the row it fired, matched on message and `publish_at`. "Now" is the store's
    // clock. Any number of instances may run at once: no row is leased by two at a time
    // while its lease holds; an expired lease (a crashed scheduler) makes the row due again.

    /// Leases up to `limit` due rows (`publish_at` <= now, and `locked_until` NULL or < now),
    /// earliest `publish_at` first, for 30 seconds (`locked_until` = now + 30 s), in one
    /// atomic step; a row another instance is leasing at that moment is skipped, not waited
    /// for. Returns each leased row's message and `publish_at`.
    async fn lease_due_schedules(&self, limit: i64) -> Result<Vec<ScheduledSend>, StoreError>;
    /// For each firing, deletes the message's row if its `publish_at` is still the firing's
    /// (a firing that is done, or void); a row rescheduled since is left alone. Nothing to
    /// delete is no error.
    async fn finish_schedules(&self, fired: &[ScheduledSend]) -> Result<(), StoreError>;
    /// For each firing, clears the lease (`locked_until` = NULL) of the message's row if its
    /// `publish_at` is still the firing's, so the next round fires it again; a row rescheduled
    /// since is left alone. Nothing to release is no error.
    async fn release_schedules(&self, fired: &[ScheduledSend]) -> Result<(), StoreError>;
    /// The earliest time a row can be leased: the earliest `publish_at` of the rows not
    /// leased (or whose lease has expired) or the earliest expiry of a lease still held,
    /// whichever is sooner; may be in the past. `None` when there are no rows. Told in this
    /// process's clock (the store's "now" may differ from it): the caller sleeps until it.
    async fn next_schedule_due(&self) -> Result<Option<DateTime<Utc>>, StoreError>;

    // ---- Sender ----
    // `send_jobs` holds one row per message waiting to be sent (`message_id`, `service_id`,
    // `due_at`, `locked_until`, `claims`), written by the delivery projection. The sender
    // claims due jobs with a lease; the message's `StartSendAttempt` command, not the lease,
    // is the fence against sending twice. "Now" is the store's clock. Any number of instances
    // may run at once: no job is claimed by two at a time while its lease holds.

    /// Claims due jobs (`due_at` <= now, and `locked_until` NULL or < now), at most `limit`
    /// in all and of each service (its earliest `due_at` first) at most its share (see
    /// [`PerService`]; which services fill `limit` is unspecified), in one atomic step: each
    /// claimed job gets `locked_until` and `due_at` = now + `lease` (its due time is the lease's
    /// end, when it may be claimed again) and `claims` + 1. A job another instance
    /// is claiming at that moment is skipped, not waited for, and one leased meanwhile is not
    /// claimed. Returns each claimed job's message and service.
    async fn claim_send_jobs(
        &self,
        limit: i64,
        per_service: PerService,
        lease: Duration,
    ) -> Result<Vec<SendJob>, StoreError>;
    /// The earliest time a job can be claimed: the earliest `due_at` of the jobs not leased
    /// (or whose lease has expired) or the earliest expiry of a lease still held, whichever
    /// is sooner; may be in the past. `None` when there are no jobs. In this process's clock.
    async fn next_send_job_due(&self) -> Result<Option<DateTime<Utc>>, StoreError>;
    /// Deletes the job as `job` claimed it (the message had nothing left to send when the
    /// claim read it): only while `locked_until` is still that claim's lease, so a job the
    /// message queued again since (which clears the lease) or another claim is kept. No job
    /// is no error.
    async fn delete_send_job(&self, job: &SendJob) -> Result<(), StoreError>;
    /// Gives back a job `job` claimed and left untouched (the service is stopping, or its
    /// service's send rate has no token for it soon): claimable again at `due_at` (at once when
    /// `None`), not at its lease's end; only while its lease is still that claim's (as
    /// [`Store::delete_send_job`]).
    async fn release_send_job(
        &self,
        job: &SendJob,
        due_at: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError>;

    // ---- Webhook inbox ----
    // `webhook_inbox` holds every fact a provider webhook told us, recorded before we answer
    // the provider, unique by (`provider`, `event_id`). A row's `status` is `pending` (to
    // apply), `applied`, `unmatched` (never applies) or `malformed` (unreadable); a pending
    // row may be `waiting` for its message to be listed (or to change past `waiting_after`,
    // the message's `last_sequence` listed when it was last leased) and may be leased
    // (`locked_until`) by an applier. "Now" is the store's clock. Any number of appliers may run at once.

    /// Records a batch atomically (all or none): each new fact becomes a row with the status
    /// and reason [`InboxFact::stored_status`] gives it, received now; a fact whose
    /// (`provider`, `event_id`) is already recorded (a provider re-send) is dropped, leaving
    /// the existing row untouched, and of facts repeated within the batch only the first is
    /// recorded. Wakes the appliers. Returns how many rows were new.
    async fn record_webhook_facts(&self, facts: &[InboxFact]) -> Result<u64, StoreError>;
    /// The id of one of our outbound messages on `channel` whose provider id is
    /// `provider_message_id`, as the message list has it; `None` if the list has none.
    async fn outbound_message_id(
        &self,
        channel: Channel,
        provider_message_id: &str,
    ) -> Result<Option<MessageId>, StoreError>;
    /// Leases, for 60 seconds (`locked_until` = now + 60 s), up to 500 facts that are
    /// `pending`, unleased (`locked_until` NULL or < now), and either not `waiting`, or waiting
    /// on a message now in the message list with `last_sequence` > `waiting_after` (NULL
    /// counts as 0), or (a reply that names no message, only the post it answers) waiting with
    /// no `message_id` and either received before `gave_up_before` or answering a post now in
    /// the message list (an outbound row whose `provider_message_id` is the payload's
    /// `answered_post`), or waiting with no `reason` on a message not in the message list and
    /// received before `gave_up_before`; choosing the earliest by (`occurred_at`, `id`), in one atomic step; a
    /// fact another applier is leasing at that moment is skipped, not waited for. Each leased
    /// row stops `waiting` (a lease that runs out unsettled leaves it leasable), and its
    /// `waiting_after` becomes its message's `last_sequence` in the message list now (NULL
    /// when not listed): the state the applier's decision is at least as new as.
    /// Returns the leased facts in no particular order.
    async fn lease_webhook_facts(
        &self,
        gave_up_before: DateTime<Utc>,
    ) -> Result<Vec<PendingFact>, StoreError>;
    /// Settles leased facts, each by its [`FactLease`] (a row whose `locked_until` is no
    /// longer the lease's end was leased again since, and is left to its new lessee; so is a
    /// missing row), atomically (all or none): sets
    /// its status, `waiting` and `reason` as [`FactSettlement`] says, clears its lease, sets
    /// `applied_at` to now when applied (NULL otherwise), and keeps `waiting_after` (the
    /// sequence listed when it was leased) when waiting, NULL otherwise: a message that
    /// changed while the applier decided has a newer sequence listed, so the fact is leased
    /// again rather than waiting for a change already made.
    async fn settle_webhook_facts(
        &self,
        settled: &[(FactLease, FactSettlement)],
    ) -> Result<(), StoreError>;
    /// Gives the replies kept as unmatched, or still pending, that answer post
    /// `provider_message_id` on `channel` (their payload's `answered_post` and `channel`) and
    /// name no message to `message_id`, our post with that id now: each becomes `pending`, not
    /// `waiting`, unleased (an applier's lease of it settles nothing), with no reason and
    /// `message_id` set, in one atomic step, and the appliers are woken. For a post whose id
    /// is known only now (an unknown outcome resolved by hand), after or while its replies
    /// wait their hour. Returns how many were given.
    async fn rematch_replies(
        &self,
        channel: Channel,
        provider_message_id: &str,
        message_id: MessageId,
    ) -> Result<u64, StoreError>;
    /// Webhook input that names no message of ours or could not be read (`unmatched` or
    /// `malformed`), newest (highest id) first: up to `limit` rows, only ids below `before`
    /// when given.
    async fn webhook_problems(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Problematic>, StoreError>;

    // ---- Push deliveries ----
    // `subscriptions` holds each push subscription's `cursor` (the last feed position it
    // was given or passed over), counters, last error and `next_attempt_at`. A subscription
    // is *behind* when its cursor is below the newest feed position (0 for an empty feed).
    // The pusher leases a subscription by moving its `next_attempt_at` past the delivery's
    // timeout, reads the feed after the cursor with `state_changes`, delivers with no
    // transaction open, then acknowledges or fails it. "Now" is the store's clock. Any number
    // of instances may run at once: no subscription is leased by two at a time.

    /// Leases up to `limit` subscriptions that are due (`next_attempt_at` <= now) and behind,
    /// earliest `next_attempt_at` first, by setting `next_attempt_at` = now + `lease`, in one
    /// atomic step; a subscription another instance is leasing at that moment is skipped,
    /// not waited for. Returns what a delivery needs of each.
    async fn lease_push_subscriptions(
        &self,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<PushDue>, StoreError>;
    /// Records an acknowledged delivery of `delivered` items (0 when the filters kept nothing
    /// in the window read): `cursor` = the greater of the stored cursor and `cursor`,
    /// `delivered` += `delivered`, `failures` = 0, `last_error` = NULL, `next_attempt_at` =
    /// now (due again at once), and `last_attempt_at` = now only if `delivered` > 0, all only
    /// while the subscription's `next_attempt_at` is still `leased.leased_until` (the lease is
    /// still this delivery's). Returns whether it was: `false` when the lease ran out and
    /// another delivery took the subscription (that one is delivering the batch again, and
    /// its own answer will be recorded), or the subscription was deleted meanwhile.
    async fn push_acknowledged(
        &self,
        leased: &PushDue,
        cursor: i64,
        delivered: i64,
    ) -> Result<bool, StoreError>;
    /// Records a failed delivery: `failures` = `failures` (the caller's new count),
    /// `last_error` = `reason`, `last_attempt_at` = now, `next_attempt_at` = now + `retry_in`;
    /// the cursor stays. Only while the lease is still `leased`'s, as for `push_acknowledged`;
    /// returns whether it was.
    async fn push_failed(
        &self,
        leased: &PushDue,
        failures: i32,
        reason: &str,
        retry_in: Duration,
    ) -> Result<bool, StoreError>;
    /// The earliest `next_attempt_at` among subscriptions that are behind (may be in the
    /// past); `None` when none is behind. In this process's clock.
    async fn next_push_due(&self) -> Result<Option<DateTime<Utc>>, StoreError>;

    // ---- Gauges ----
    // Read by `/metrics` at scrape time: facts of the shared database, so every instance
    // reports the same numbers.

    /// Reads [`Gauges`] now; the three groups (projection lag, queue depths, push lag) may
    /// be read at slightly different moments, not as one snapshot.
    async fn gauges(&self) -> Result<Gauges, StoreError>;
    /// How many events of the log subscription `name` (`message_list`, `state_changes`,
    /// `delivery`) has not handled yet.
    async fn projection_lag(&self, name: &str) -> Result<i64, StoreError>;
    /// The feed's last position (0 while it is empty).
    async fn feed_end(&self) -> Result<i64, StoreError>;
}

/// A message's events (in sequence order) folded with its history; `None` when it has none.
fn with_history(
    events: Vec<messaging_projections::StoredEvent>,
) -> Result<Option<(Message, Vec<HistoryItem>)>, StoreError> {
    if events.is_empty() {
        return Ok(None);
    }
    let mut folded = Vec::with_capacity(events.len());
    for e in events {
        folded.push((e.sequence, e.message_event()?, e.recorded_at));
    }
    Ok(Some(messaging_projections::view::history(folded)))
}

/// Whether every migration this binary carries is applied.
async fn check_migrations<'a, E>(
    migrator: &sqlx::migrate::Migrator,
    db: E,
) -> Result<(), StoreError>
where
    E: sqlx::Executor<'a>,
    i64: sqlx::Type<E::Database> + for<'r> sqlx::Decode<'r, E::Database>,
    Option<i64>: for<'r> sqlx::Decode<'r, E::Database>,
    for<'q> <E::Database as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, E::Database>,
    usize: sqlx::ColumnIndex<<E::Database as sqlx::Database>::Row>,
{
    let latest = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(db)
            .await?;
    if applied.unwrap_or(0) < latest {
        return Err(StoreError::new(format!(
            "migrations pending: database at {}, binary expects {latest}",
            applied.unwrap_or(0)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_leased_subscription_prints_without_its_secret() {
        let due = super::PushDue {
            id: uuid::Uuid::nil(),
            url: "https://automation.example/hook".into(),
            secret: "whsec-do-not-print".into(),
            states: None,
            channels: None,
            cursor: 3,
            failures: 0,
            leased_until: chrono::Utc::now(),
        };
        let printed = format!("{due:?}");
        assert!(!printed.contains("whsec-do-not-print"), "{printed}");
        assert!(printed.contains("automation.example"), "{printed}");
    }
}
