//! The front end's message list: one row per message, the aggregate's fold plus copies of
//! the fields the list filters on.
//!
//! The fold is shared by both backends (`Rows`); this file writes it to PostgreSQL,
//! `sqlite::message_list` to SQLite.

use crate::event::StoredEvent;
use crate::subscription::{Projection, ProjectionError};
use async_trait::async_trait;
use messaging_domain::{Message, MessageData};
use sqlx::{PgConnection, Postgres};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Default)]
pub struct MessageList {
    /// Set after a batch's INSERT of the rows it starts met a row already there (see
    /// [`continued`]: it cannot, unless the checkpoint was moved back by hand without emptying
    /// the table). From then on this instance upserts every row, so the retried batch and all
    /// later ones overwrite instead of failing again.
    upsert_all: AtomicBool,
}

impl MessageList {
    pub const NAME: &'static str = "message_list";
}

/// One message's row while a batch is applied.
struct Row {
    message: Message,
    last_sequence: i64,
    changed: bool,
    /// Read from the table (the batch updates it) rather than started empty (it inserts it).
    stored: bool,
}

/// The rows a batch touches, loaded once and written once per batch.
pub(crate) struct Rows(HashMap<uuid::Uuid, Row>);

/// One row to write, as both backends store it.
pub(crate) struct ListRow {
    pub id: uuid::Uuid,
    pub service_id: uuid::Uuid,
    pub channel: &'static str,
    pub direction: &'static str,
    pub state: &'static str,
    /// Lower-cased usernames of the sender and the recipients, sorted, without duplicates.
    pub profiles: Vec<String>,
    /// The fold as JSON text (serialized once, straight from the struct).
    pub message: String,
    pub last_sequence: i64,
    pub provider_message_id: Option<String>,
    /// Whether the table holds the row already (see `Row::stored`).
    pub stored: bool,
}

impl Rows {
    /// The messages a batch is about, each once.
    pub(crate) fn ids(events: &[StoredEvent]) -> Result<Vec<uuid::Uuid>, ProjectionError> {
        let mut ids = std::collections::HashSet::new();
        for event in events.iter().filter(|e| e.is_message()) {
            ids.insert(event.message_uuid()?);
        }
        Ok(ids.into_iter().collect())
    }

    /// An empty row per message, for those the table does not hold yet.
    pub(crate) fn new(ids: &[uuid::Uuid]) -> Self {
        Self(
            ids.iter()
                .map(|id| {
                    let row = Row {
                        message: Message::default(),
                        last_sequence: 0,
                        changed: false,
                        stored: false,
                    };
                    (*id, row)
                })
                .collect(),
        )
    }

    /// A row as the table holds it.
    pub(crate) fn found(
        &mut self,
        id: uuid::Uuid,
        json: &str,
        last_sequence: i64,
    ) -> Result<(), ProjectionError> {
        let data: MessageData = serde_json::from_str(json)
            .map_err(|e| ProjectionError::Other(format!("stored message {id}: {e}")))?;
        self.0.insert(
            id,
            Row {
                message: Message::from(data),
                last_sequence,
                changed: false,
                stored: true,
            },
        );
        Ok(())
    }

    /// Folds the batch's events into the rows, in log order.
    pub(crate) fn apply(&mut self, events: &[StoredEvent]) -> Result<(), ProjectionError> {
        for event in events.iter().filter(|e| e.is_message()) {
            let Some(row) = self.0.get_mut(&event.message_uuid()?) else {
                continue;
            };
            // Guarded by the event's sequence: applying an event twice changes nothing.
            if event.sequence <= row.last_sequence {
                continue;
            }
            row.message.apply_event(event.message_event()?);
            row.last_sequence = event.sequence;
            row.changed = true;
        }
        Ok(())
    }

    /// The rows the batch changed, as they are to be written.
    pub(crate) fn changed(&self) -> Result<Vec<ListRow>, ProjectionError> {
        let mut changed = Vec::new();
        for (id, row) in self.0.iter().filter(|(_, r)| r.changed) {
            let Some(d) = row.message.data() else {
                return Err(ProjectionError::Other(format!(
                    "message {id}: its first event does not start a message"
                )));
            };
            let mut profiles: Vec<String> = std::iter::once(&d.from)
                .chain(d.to.iter())
                .map(|p| p.username.to_lowercase())
                .filter(|p| indexable(p))
                .collect();
            profiles.sort();
            profiles.dedup();
            changed.push(ListRow {
                id: *id,
                service_id: d.service_id.as_uuid(),
                channel: d.channel.as_str(),
                direction: d.direction.as_str(),
                state: d.state.as_str(),
                profiles,
                message: stored_fold(d)?,
                last_sequence: row.last_sequence,
                provider_message_id: d.provider_message_id.clone().filter(|p| indexable(p)),
                stored: row.stored,
            });
        }
        Ok(changed)
    }
}

/// A row's `message`: the fold without the provider event ids it has seen. Those only serve
/// the aggregate's duplicate check (the log holds each fact once, and the view shows none of
/// them), and an email to a thousand recipients collects thousands (each delivery, open and
/// click), which every batch touching the message rewrote and every list page parsed.
fn stored_fold(d: &MessageData) -> Result<String, ProjectionError> {
    let without;
    let stored = if d.seen_facts.is_empty() {
        d
    } else {
        without = MessageData {
            seen_facts: Default::default(),
            ..d.clone()
        };
        &without
    };
    serde_json::to_string(stored).map_err(|e| ProjectionError::Other(e.to_string()))
}

/// The batch's messages that have events before it: those whose first event in the batch is
/// not their first (sequence 1). A message the batch starts has no row yet: its row and the
/// checkpoint past its first event are committed together, and only a reset (which empties
/// the table in the same transaction as the checkpoint) moves the checkpoint back. Under a
/// steady load about half a batch's messages are new; in a rebuild, most.
fn continued(events: &[StoredEvent]) -> Result<Vec<uuid::Uuid>, ProjectionError> {
    let mut first = std::collections::HashSet::new();
    let mut continued = Vec::new();
    for event in events.iter().filter(|e| e.is_message()) {
        let id = event.message_uuid()?;
        if first.insert(id) && event.sequence > 1 {
            continued.push(id);
        }
    }
    Ok(continued)
}

/// The rows of `ids`, read from the table for those in `existing` (the others start empty).
async fn load(
    conn: &mut PgConnection,
    ids: &[uuid::Uuid],
    existing: &[uuid::Uuid],
) -> Result<Rows, ProjectionError> {
    let found: Vec<(uuid::Uuid, String, i64)> = if existing.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(
            "SELECT message_id, message::text, last_sequence FROM message_list \
             WHERE message_id = ANY($1)",
        )
        .bind(existing)
        .fetch_all(&mut *conn)
        .await?
    };
    let mut rows = Rows::new(ids);
    for (id, json, last_sequence) in found {
        rows.found(id, &json, last_sequence)?;
    }
    Ok(rows)
}

/// Writes the changed rows: those the batch starts in one multi-row INSERT, those it continues
/// in one multi-row UPDATE, or (`upsert_all`) every one in one upsert. An upsert of a row that
/// is not there yet costs PostgreSQL a speculative insertion (a check of the unique index, a
/// token, a second pass over the tuple); a plain INSERT does not: measured on a rebuild of 100k
/// events (`bench --only rebuild`, alternated, two runs each), 83.4 / 80.8k → 98.5 / 87.4k
/// events/s.
async fn store(conn: &mut PgConnection, rows: &Rows, upsert_all: bool) -> Result<(), StoreError> {
    let (mut started, mut continued) = (Columns::default(), Columns::default());
    for row in rows.changed()? {
        if row.stored && !upsert_all {
            continued.push(row);
        } else {
            started.push(row);
        }
    }
    if !started.id.is_empty() {
        let sql: &str = if upsert_all { &UPSERT } else { &INSERT };
        started
            .bind_all(sqlx::query(sql))
            .execute(&mut *conn)
            .await
            .map_err(|e| match e {
                sqlx::Error::Database(db) if db.is_unique_violation() && !upsert_all => {
                    // The detail names the key ("Key (message_id)=(...) already exists").
                    let detail = db
                        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                        .and_then(|e| e.detail())
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default();
                    StoreError::Present(format!("{db}{detail}"))
                }
                e => StoreError::Projection(e.into()),
            })?;
    }
    if !continued.id.is_empty() {
        let updated = continued
            .bind_all(sqlx::query(&UPDATE))
            .execute(&mut *conn)
            .await
            .map_err(|e| StoreError::Projection(e.into()))?
            .rows_affected();
        // Each was read in this transaction, under the subscription's lock (a rebuild's
        // second writer under the lock its first holds for both; it writes other messages):
        // all are there.
        let expected = continued.id.len() as u64;
        if updated != expected {
            return Err(StoreError::Projection(ProjectionError::Other(format!(
                "{} of the {expected} list rows this batch continues were not there to update",
                expected.saturating_sub(updated)
            ))));
        }
    }
    Ok(())
}

/// Why [`store`] failed.
enum StoreError {
    /// A row the batch starts was in the table already.
    Present(String),
    Projection(ProjectionError),
}

impl From<ProjectionError> for StoreError {
    fn from(e: ProjectionError) -> Self {
        Self::Projection(e)
    }
}

/// The rows' columns as arrays, one row per position: `$1`..`$9`, and `$10` the profiles'
/// separator.
const ROWS: &str = "unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], \
                    $6::text[], $7::text[], $8::bigint[], $9::text[]) \
           AS r(id, service_id, channel, direction, state, profiles, message, last_sequence, \
                provider_message_id)";

static INSERT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO message_list \
           (message_id, service_id, channel, direction, state, profiles, message, \
            last_sequence, provider_message_id) \
         SELECT id, service_id, channel, direction, state, string_to_array(profiles, $10), \
                message, last_sequence, provider_message_id \
         FROM {ROWS}"
    )
});

static UPSERT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} ON CONFLICT (message_id) DO UPDATE SET state = EXCLUDED.state, \
           profiles = EXCLUDED.profiles, message = EXCLUDED.message, \
           last_sequence = EXCLUDED.last_sequence, \
           provider_message_id = EXCLUDED.provider_message_id",
        *INSERT
    )
});

static UPDATE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE message_list SET state = r.state, \
           profiles = string_to_array(r.profiles, $10), message = r.message, \
           last_sequence = r.last_sequence, provider_message_id = r.provider_message_id \
         FROM {ROWS} WHERE message_list.message_id = r.id"
    )
});

/// Cannot appear in a username (a control character), nor in a profile the list keeps (see
/// [`indexable`]).
const PROFILE_SEPARATOR: &str = "\u{1f}";

/// The longest profile or provider id the list indexes, in bytes. No address a message can
/// name is longer (an email address is at most 254 bytes, an X handle 15, a Facebook id a few
/// dozen), nor any provider's id.
const MOST_INDEXED: usize = 512;

/// Whether a profile or provider id goes into the list's indexed columns. PostgreSQL's indexes
/// refuse an entry over about 2.7 KB and its `text` a NUL, and a refused row would stop the
/// list for good (its batch is retried until it succeeds). Only malformed input makes such a
/// value (the From of an inbound email is whatever its sender wrote): it is left out of the
/// columns the list is filtered and looked up by, and the message itself still shows it.
fn indexable(value: &str) -> bool {
    value.len() <= MOST_INDEXED && !value.chars().any(char::is_control)
}

#[derive(Default)]
struct Columns {
    id: Vec<uuid::Uuid>,
    service_id: Vec<uuid::Uuid>,
    channel: Vec<&'static str>,
    direction: Vec<&'static str>,
    state: Vec<&'static str>,
    profiles: Vec<String>,
    message: Vec<String>,
    last_sequence: Vec<i64>,
    provider_message_id: Vec<Option<String>>,
}

impl Columns {
    fn push(&mut self, row: ListRow) {
        self.id.push(row.id);
        self.service_id.push(row.service_id);
        self.channel.push(row.channel);
        self.direction.push(row.direction);
        self.state.push(row.state);
        // Arrays of arrays do not unnest into rows: each row's profiles travel as one text.
        self.profiles.push(row.profiles.join(PROFILE_SEPARATOR));
        self.message.push(row.message);
        self.last_sequence.push(row.last_sequence);
        self.provider_message_id.push(row.provider_message_id);
    }

    /// Binds `$1`..`$10` of [`ROWS`].
    fn bind_all<'q>(
        &'q self,
        query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.id)
            .bind(&self.service_id)
            .bind(&self.channel)
            .bind(&self.direction)
            .bind(&self.state)
            .bind(&self.profiles)
            .bind(&self.message)
            .bind(&self.last_sequence)
            .bind(&self.provider_message_id)
            .bind(PROFILE_SEPARATOR)
    }
}

#[async_trait]
impl Projection<Postgres> for MessageList {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    /// Each message's row is read once and written once per batch, however many of its
    /// events the batch holds (a thousand opens in one webhook batch, say).
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        let mut rows = load(&mut *conn, &Rows::ids(events)?, &continued(events)?).await?;
        rows.apply(events)?;
        let upsert_all = self.upsert_all.load(Ordering::Relaxed);
        match store(conn, &rows, upsert_all).await {
            Ok(()) => Ok(()),
            Err(StoreError::Projection(e)) => Err(e),
            Err(StoreError::Present(error)) => {
                self.upsert_all.store(true, Ordering::Relaxed);
                Err(ProjectionError::Other(format!(
                    "a message this batch starts is in the list already ({error}); \
                     from now on every row is upserted"
                )))
            }
        }
    }

    fn tables(&self) -> &'static [&'static str] {
        &["message_list"]
    }

    /// A message's row is the fold of its own events.
    fn independent_aggregates(&self) -> bool {
        true
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        // TRUNCATE, not DELETE: the rows written next would otherwise meet each old row's
        // dead index entries in the unique checks (DELETE of 50k rows and the re-inserts
        // behind it cost more than the rest of a rebuild).
        sqlx::query("TRUNCATE message_list").execute(conn).await?;
        // With the table empty and the checkpoint back at zero, the rows a batch starts are
        // new again (should this transaction roll back, the next conflict sets it once more).
        self.upsert_all.store(false, Ordering::Relaxed);
        Ok(())
    }
}
