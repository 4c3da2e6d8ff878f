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

/// Why a stored Message event could not be read.
enum Undecodable {
    Version,
    Payload(serde_json::Error),
}

/// A stored Message event of `version`, from its payload's JSON text: the one place its stored
/// form is read. Version 1 is the only version so far; an upcaster goes here when a payload
/// changes.
fn decode(version: &str, payload: &str) -> Result<MessageEvent, Undecodable> {
    if version != "1" {
        return Err(Undecodable::Version);
    }
    serde_json::from_str(payload).map_err(Undecodable::Payload)
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

/// For each `(message id, before)` of `$2` and `$3` (`$1` is the aggregate type): the
/// message's snapshot of fold version `$4` taken before `before`, if it has one (a row without
/// `event_version`: see [`FoldRow`]), then its events after that snapshot's sequence and before
/// `before` (all of them before it, without a snapshot), in (message, sequence) order.
/// Snapshots are written by the command side (`message_snapshots`; SQLite has its own, read
/// by `sqlite::event`) for messages with long histories.
///
/// Per message, a lookup of the snapshot's key and one primary-key range of the log, whatever
/// the statistics say. As a join with the wanted pairs, or as `aggregate_id = ANY($2)`, a plan
/// made while the table's statistics were missing or stale (a fresh or fast-growing log: no
/// ANALYZE has run yet) used the key's first column alone and filtered every message's events:
/// 16-28 ms a call at 100k events. The lateral subquery (kept apart by `OFFSET 0`) is a lookup
/// of the whole key per message. As a CTE of the messages joined to their snapshots, then a
/// UNION with their events, it cost 10-40 µs more a read than the events alone (pgbench, 4
/// messages, prepared); this form, none measurable. Run it through [`fold_rows`].
const FOLD_ROWS: &str = "\
    SELECT w.id AS aggregate_id, e.sequence, e.event_version, e.payload \
    FROM (SELECT DISTINCT * FROM unnest($2::text[], $3::bigint[])) AS w(id, before) \
    CROSS JOIN LATERAL ( \
      SELECT * FROM ( \
        SELECT s.sequence, NULL::text AS event_version, s.fold AS payload \
        FROM message_snapshots s \
        WHERE s.aggregate_id = w.id AND s.fold_version = $4 AND s.sequence < w.before \
        UNION ALL \
        SELECT sequence, event_version, payload::text FROM events \
        WHERE aggregate_type = $1 AND aggregate_id = w.id AND sequence < w.before \
          AND sequence > COALESCE((SELECT s.sequence FROM message_snapshots s \
                                   WHERE s.aggregate_id = w.id AND s.fold_version = $4 \
                                     AND s.sequence < w.before), 0) \
      ) AS u OFFSET 0) AS e \
    ORDER BY 1, 2";

/// A row of [`fold_rows`]: a message's snapshot (its fold through `sequence`), or one of its
/// events.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FoldRow {
    pub aggregate_id: String,
    pub sequence: i64,
    /// `None` for a snapshot.
    pub event_version: Option<String>,
    /// The event's or the snapshot's JSON text.
    pub payload: String,
}

impl FoldRow {
    pub fn is_snapshot(&self) -> bool {
        self.event_version.is_none()
    }

    /// The message a snapshot row holds; an error says why it cannot be used (not JSON, not a
    /// composed or received message: serde makes an empty message of any JSON object, or
    /// another message than the row's).
    pub fn snapshot(&self) -> Result<Message, String> {
        let why = |e: &dyn std::fmt::Display| {
            format!(
                "snapshot of message {} at sequence {}: {e}",
                self.aggregate_id, self.sequence
            )
        };
        match serde_json::from_str::<Message>(&self.payload) {
            Ok(message) => match message.data() {
                Some(d) if d.id.to_string() == self.aggregate_id => Ok(message),
                Some(d) => Err(why(&format!("it is of message {}", d.id))),
                None => Err(why(&"no message in it")),
            },
            Err(e) => Err(why(&e)),
        }
    }

    /// The event an event row holds.
    pub fn event(&self) -> Result<MessageEvent, ProjectionError> {
        let version = self.event_version.as_deref().unwrap_or_default();
        decode(version, &self.payload).map_err(|e| {
            let why = match e {
                Undecodable::Version => {
                    format!("has version `{version}`, which this release cannot read")
                }
                Undecodable::Payload(e) => e.to_string(),
            };
            ProjectionError::Other(format!(
                "event {} of message {}: {why}",
                self.sequence, self.aggregate_id
            ))
        })
    }
}

/// [`FOLD_ROWS`] for `ids`, each before its position of `before` (`i64::MAX` for all its
/// events), from snapshots of `fold_version` (`None`: from every message's first event).
///
/// `Sent::Prepared` only on a connection that forces custom plans (a reader's
/// [`KeptConnection::new`](crate::KeptConnection::new)) or disables sequential scans
/// ([`KeptConnection::keeping_plans`](crate::KeptConnection::keeping_plans), a command
/// writer's): elsewhere a generic plan made after the log was vacuumed while empty scans the
/// whole table for every message, and PostgreSQL keeps it (31 ms a call at 200k events, for
/// as long as the connection lives). `Sent::Unprepared` plans it with its values at every
/// call, on any connection, at the cost of a second round trip (sqlx describes it first).
pub async fn fold_rows<S: AsRef<str> + Sync>(
    conn: &mut PgConnection,
    ids: &[S],
    before: &[i64],
    fold_version: Option<i32>,
    sent: Sent,
) -> Result<Vec<FoldRow>, sqlx::Error> {
    let ids: Vec<&str> = ids.iter().map(AsRef::as_ref).collect();
    sqlx::query_as(FOLD_ROWS)
        .persistent(sent == Sent::Prepared)
        .bind(Message::TYPE_NAME)
        .bind(&ids)
        .bind(before)
        .bind(fold_version)
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
        decode(&self.event_version, &self.payload).map_err(|e| match e {
            Undecodable::Version => ProjectionError::UnknownVersion {
                event_type: self.event_type.clone(),
                version: self.event_version.clone(),
            },
            Undecodable::Payload(e) => ProjectionError::Payload {
                position: self.global_position,
                error: e.to_string(),
            },
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

/// At most `limit` of a message's events after sequence `after`, in order: one range of the
/// log's key. Planned for its values at every call (it runs on pooled connections: see
/// [`fold_rows`]).
pub async fn message_events_page(
    conn: &mut PgConnection,
    message_id: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, ProjectionError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events \
         WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 \
         ORDER BY sequence LIMIT $4"
    );
    Ok(sqlx::query_as::<_, StoredEvent>(&sql)
        .persistent(false)
        .bind(Message::TYPE_NAME)
        .bind(message_id)
        .bind(after)
        .bind(limit)
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

/// For each `(message id, sequence)`, the message folded from its events before that
/// sequence: one query for a whole batch instead of one per message, starting from the
/// message's snapshot where it has one from before that sequence (a snapshot that cannot be
/// read is passed over: the batch is read again from every message's first event).
pub async fn load_messages_before(
    conn: &mut PgConnection,
    wanted: &[(String, i64)],
) -> Result<HashMap<String, Message>, ProjectionError> {
    // Prepared: the readers that run it plan every statement for its values (`KeptConnection`),
    // and unprepared it would cost a second round trip.
    load_messages_before_sent(conn, wanted, Sent::Prepared).await
}

/// [`load_messages_before`], sent as `sent` says (see [`fold_rows`]).
pub async fn load_messages_before_sent(
    conn: &mut PgConnection,
    wanted: &[(String, i64)],
    sent: Sent,
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
    for (id, folded) in load_folds(conn, &ids, &before, sent).await?.messages {
        messages.insert(id, folded.message);
    }
    Ok(messages)
}

/// A message as [`load_folds`] folded it.
pub struct Folded {
    pub message: Message,
    /// The sequence of the last event (or of the snapshot) it was folded through.
    pub through: i64,
    /// How many events were read past its snapshot (all of them without one).
    pub events_read: usize,
}

/// What [`load_folds`] read.
pub struct Loaded {
    /// Each message with events before its `before`.
    pub messages: HashMap<String, Folded>,
    /// The message whose snapshot could not be read (written by a release whose fold had the
    /// same version but not the same shape, or damaged): every message was then folded from
    /// its events alone, and that snapshot is to be replaced.
    pub unreadable: Option<String>,
}

/// Each of `ids` folded from its events before its position of `before`, starting from its
/// snapshot where one comes before (one [`fold_rows`] query for them all; a second, from every
/// message's first event, when a snapshot cannot be read).
pub async fn load_folds<S: AsRef<str> + Sync>(
    conn: &mut PgConnection,
    ids: &[S],
    before: &[i64],
    sent: Sent,
) -> Result<Loaded, ProjectionError> {
    let rows = fold_rows(&mut *conn, ids, before, Some(Message::FOLD_VERSION), sent).await?;
    fold_or_read_again(rows, || fold_rows(conn, ids, before, None, sent)).await
}

/// Folds rows read from snapshots of this release's fold version and the events after them
/// (on either backend); when a snapshot cannot be read, folds the rows `again` reads instead,
/// with no snapshot (no fold version matches NULL), and names the message whose snapshot is to
/// be replaced.
pub(crate) async fn fold_or_read_again<F, Fut>(
    rows: Vec<FoldRow>,
    again: F,
) -> Result<Loaded, ProjectionError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<FoldRow>, sqlx::Error>>,
{
    match fold_loaded_rows(rows)? {
        Ok(messages) => Ok(Loaded {
            messages,
            unreadable: None,
        }),
        Err((id, why)) => {
            tracing::warn!(unreadable = %why, "a message snapshot could not be read; folding from the events");
            let messages = fold_loaded_rows(again().await?)?
                .map_err(|(_, why)| ProjectionError::Other(why))?;
            Ok(Loaded {
                messages,
                unreadable: Some(id),
            })
        }
    }
}

/// Messages folded from [`fold_rows`], or the id of one whose snapshot could not be read, and
/// why.
type FoldedOrUnreadable = Result<HashMap<String, Folded>, (String, String)>;

/// The rows (ordered by message and sequence) folded.
fn fold_loaded_rows(rows: Vec<FoldRow>) -> Result<FoldedOrUnreadable, ProjectionError> {
    let mut messages: HashMap<String, Folded> = HashMap::new();
    for row in rows {
        if row.is_snapshot() {
            match row.snapshot() {
                Ok(message) => {
                    let folded = Folded {
                        message,
                        through: row.sequence,
                        events_read: 0,
                    };
                    messages.insert(row.aggregate_id, folded);
                }
                Err(why) => return Ok(Err((row.aggregate_id, why))),
            }
            continue;
        }
        let event = row.event()?;
        let folded = messages.entry(row.aggregate_id).or_insert_with(|| Folded {
            message: Message::default(),
            through: 0,
            events_read: 0,
        });
        folded.message.apply_event(event);
        folded.through = row.sequence;
        folded.events_read += 1;
    }
    Ok(Ok(messages))
}
