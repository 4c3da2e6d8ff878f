//! Events as read back from the store.

use crate::subscription::ProjectionError;
use chrono::{DateTime, Utc};
use messaging_domain::{Message, MessageEvent};
use sqlx::PgConnection;
use std::collections::HashMap;

/// One row of the `events` table.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredEvent {
    pub global_position: i64,
    /// The inserting transaction's id (xid8), read as text and parsed.
    #[sqlx(try_from = "String")]
    pub transaction_id: TxId,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    /// The payload's JSON text, decoded straight into the event when it is needed (going
    /// through a `serde_json::Value` tree cost more than the rest of a rebuild's fold).
    pub payload: String,
    pub recorded_at: DateTime<Utc>,
}

/// A PostgreSQL `xid8`, carried as its decimal text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct TxId(pub u64);

impl TryFrom<String> for TxId {
    type Error = std::num::ParseIntError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse().map(TxId)
    }
}

/// The columns a PostgreSQL reader selects, in [`StoredEvent`]'s shape.
///
/// `transaction_id` is selected as text under its own name, and an unqualified `ORDER BY
/// transaction_id` means the output column: order by `events.transaction_id` (the `xid8`),
/// or text order puts transaction 10 before 9 and the index goes unused.
pub const EVENT_COLUMNS: &str = "global_position, transaction_id::text AS transaction_id, \
     aggregate_type, aggregate_id, sequence, event_type, event_version, payload::text AS payload, \
     recorded_at";

/// The events of the messages in `$2` (a text array; `$1` is the aggregate type) whose
/// sequence is below the same position of `$3` (a bigint array; `i64::MAX` for all of them), in
/// (message, sequence) order: one primary-key range per message, whatever the statistics say.
/// As a join with the wanted pairs, or as `aggregate_id = ANY($2)`, a plan made while the
/// table's statistics were missing or stale (a fresh or fast-growing log: no ANALYZE has run
/// yet) used the key's first column alone and filtered every message's events: 16-28 ms a
/// call at 100k events. The lateral subquery (kept apart by `OFFSET 0`) is a lookup of the
/// whole key per message. Run it through [`events_of_messages`].
static EVENTS_OF_MESSAGES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT e.* FROM (SELECT DISTINCT * FROM unnest($2::text[], $3::bigint[])) \
           AS wanted(id, before) \
         CROSS JOIN LATERAL ( \
           SELECT {EVENT_COLUMNS} FROM events \
           WHERE aggregate_type = $1 AND aggregate_id = wanted.id \
             AND sequence < wanted.before OFFSET 0) AS e \
         ORDER BY e.aggregate_id, e.sequence"
    )
});

/// [`EVENTS_OF_MESSAGES`] for `ids`, each below its position of `before`.
///
/// `Sent::Prepared` only on a connection that forces custom plans (a reader's
/// [`KeptConnection::new`](crate::KeptConnection::new)) or disables sequential scans
/// ([`KeptConnection::keeping_plans`](crate::KeptConnection::keeping_plans), a command
/// writer's): elsewhere a generic plan made after the log was vacuumed while empty scans the
/// whole table for every message, and PostgreSQL keeps it (31 ms a call at 200k events, for
/// as long as the connection lives). `Sent::Unprepared` plans it with its values at every
/// call, on any connection, at the cost of a second round trip (sqlx describes it first).
pub async fn events_of_messages<S: AsRef<str> + Sync>(
    conn: &mut PgConnection,
    ids: &[S],
    before: &[i64],
    sent: Sent,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let ids: Vec<&str> = ids.iter().map(AsRef::as_ref).collect();
    sqlx::query_as(&EVENTS_OF_MESSAGES)
        .persistent(sent == Sent::Prepared)
        .bind(Message::TYPE_NAME)
        .bind(&ids)
        .bind(before)
        .fetch_all(conn)
        .await
}

/// How a statement whose plan could depend on a table's statistics is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Prepared once per connection (one round trip a call): on connections that cannot keep
    /// a plan that scans a table.
    Prepared,
    /// Planned with its values at every call (two round trips a call).
    Unprepared,
}

impl StoredEvent {
    /// The Message event inside. Version 1 is the only version so far; an upcaster goes here
    /// when a payload changes.
    pub fn message_event(&self) -> Result<MessageEvent, ProjectionError> {
        if self.event_version != "1" {
            return Err(ProjectionError::UnknownVersion {
                event_type: self.event_type.clone(),
                version: self.event_version.clone(),
            });
        }
        serde_json::from_str(&self.payload).map_err(|e| ProjectionError::Payload {
            position: self.global_position,
            error: e.to_string(),
        })
    }

    /// The message's id (message aggregates are keyed by their UUID).
    pub fn message_uuid(&self) -> Result<uuid::Uuid, ProjectionError> {
        uuid::Uuid::parse_str(&self.aggregate_id).map_err(|e| ProjectionError::Payload {
            position: self.global_position,
            error: format!("aggregate id is not a message id: {e}"),
        })
    }

    pub fn is_message(&self) -> bool {
        self.aggregate_type == Message::TYPE_NAME
    }
}

/// Every event of one message up to and including `up_to` (all when `None`), in order.
pub async fn message_events(
    conn: &mut PgConnection,
    message_id: &str,
    up_to: Option<i64>,
) -> Result<Vec<StoredEvent>, ProjectionError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events \
         WHERE aggregate_type = $1 AND aggregate_id = $2 AND ($3::bigint IS NULL OR sequence <= $3) \
         ORDER BY sequence"
    );
    Ok(sqlx::query_as::<_, StoredEvent>(&sql)
        .bind(Message::TYPE_NAME)
        .bind(message_id)
        .bind(up_to)
        .fetch_all(conn)
        .await?)
}

/// The message as folded from its events up to `up_to`.
pub async fn load_message(
    conn: &mut PgConnection,
    message_id: &str,
    up_to: Option<i64>,
) -> Result<Message, ProjectionError> {
    fold(message_events(conn, message_id, up_to).await?)
}

/// Folds one message's events, in order.
pub(crate) fn fold(events: Vec<StoredEvent>) -> Result<Message, ProjectionError> {
    let mut message = Message::default();
    for e in events {
        message.apply_event(e.message_event()?);
    }
    Ok(message)
}

/// The messages of `wanted`, each still empty, and whether any of them has events before its
/// wanted sequence: when none has (each starts at its first event), there is nothing to read.
pub(crate) fn messages_before(wanted: &[(String, i64)]) -> (HashMap<String, Message>, bool) {
    let messages = wanted
        .iter()
        .map(|(id, _)| (id.clone(), Message::default()))
        .collect();
    let any_before = wanted.iter().any(|(_, sequence)| *sequence > 1);
    (messages, any_before)
}

/// Folds the events read for [`load_messages_before`] (ordered by message and sequence) into
/// their messages.
pub(crate) fn fold_into(
    messages: &mut HashMap<String, Message>,
    events: impl IntoIterator<Item = StoredEvent>,
) -> Result<(), ProjectionError> {
    for e in events {
        if let Some(message) = messages.get_mut(&e.aggregate_id) {
            message.apply_event(e.message_event()?);
        }
    }
    Ok(())
}

/// For each `(message id, sequence)`, the message folded from its events before that
/// sequence: one query for a whole batch instead of one per message.
pub async fn load_messages_before(
    conn: &mut PgConnection,
    wanted: &[(String, i64)],
) -> Result<HashMap<String, Message>, ProjectionError> {
    let (mut messages, any_before) = messages_before(wanted);
    if !any_before {
        return Ok(messages);
    }
    // Only messages with events before their wanted one.
    let (ids, before): (Vec<&str>, Vec<i64>) = wanted
        .iter()
        .filter(|(_, sequence)| *sequence > 1)
        .map(|(id, sequence)| (id.as_str(), *sequence))
        .unzip();
    // Prepared: the readers that run it plan every statement for its values (`KeptConnection`),
    // and unprepared it would cost a second round trip.
    let earlier: Vec<StoredEvent> = sqlx::query_as(&EVENTS_OF_MESSAGES)
        .bind(Message::TYPE_NAME)
        .bind(&ids)
        .bind(&before)
        .fetch_all(conn)
        .await?;
    fold_into(&mut messages, earlier)?;
    Ok(messages)
}
