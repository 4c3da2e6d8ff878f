//! The state-change feed for Automation: one item per state change, with the state before and
//! after. Positions are assigned here, by the one active feed projector, in log order: they
//! only grow, an item never appears behind a position already served, and a rebuild numbers
//! the items the same way.

use crate::event::{load_messages_before, StoredEvent};
use crate::subscription::{Prepared, Projection, ProjectionError};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use messaging_domain::Message;
use serde::Serialize;
use sqlx::{PgConnection, Postgres};
use std::collections::HashMap;
use std::sync::Mutex;

/// The feed's projection. It remembers the folds of the messages it has just handled, so the
/// next batch that continues them reads nothing back from the log.
#[derive(Default)]
pub struct StateChangeFeed {
    folds: Mutex<Folds>,
}

/// Messages folded through a known sequence, by id. The log never changes, so the fold of a
/// message's events through sequence `s` stays right whichever instance or rebuild comes
/// next; it is used only for a batch whose first event of that message is `s + 1` (another
/// instance may have handled the events between), and otherwise read from the log again.
/// Bounded: two generations of at most [`FOLDS`] messages and about [`FOLD_BYTES`] each; the
/// older is dropped when the newer fills.
#[derive(Default)]
pub struct Folds {
    current: HashMap<String, (i64, Message)>,
    previous: HashMap<String, (i64, Message)>,
    /// What the current generation's folds weigh, as [`weight`] counts (not lowered when
    /// one is taken back out: a generation may end a little early).
    current_bytes: usize,
}

/// Messages per generation of [`Folds`]. A message's events reach the feed within tens of
/// milliseconds of each other while it is sent (compose, attempt, outcome), a few hundred
/// messages at full speed. (8192 in all held 7 MB of live heap with the bench's small
/// emails, which its memory figure showed.)
const FOLDS: usize = 512;

/// Bytes per generation of [`Folds`], so that large messages (a body may be a megabyte) keep
/// fewer folds, not more memory; a fold heavier than this alone is not kept.
const FOLD_BYTES: usize = 2 << 20;

/// Roughly the memory a fold holds: its texts, recipients and remembered fact ids.
fn weight(message: &Message) -> usize {
    let Some(d) = message.data() else {
        return 64;
    };
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    512 + text(&d.subject)
        + text(&d.text)
        + text(&d.html)
        + text(&d.link)
        + text(&d.last_error)
        + d.to
            .iter()
            .map(|p| 64 + p.username.len() + text(&p.name))
            .sum::<usize>()
        + d.seen_facts.iter().map(|f| 48 + f.len()).sum::<usize>()
}

impl Folds {
    /// The fold of `id` through exactly `through`, taken out (one through another sequence
    /// is dropped).
    pub fn take(&mut self, id: &str, through: i64) -> Option<Message> {
        let current = self.current.remove(id);
        let previous = self.previous.remove(id);
        match current.or(previous) {
            Some((sequence, message)) if sequence == through => Some(message),
            _ => None,
        }
    }

    /// Whatever fold of `id` is kept, with the sequence it runs through, taken out.
    pub fn take_latest(&mut self, id: &str) -> Option<(i64, Message)> {
        let current = self.current.remove(id);
        let previous = self.previous.remove(id);
        current.or(previous)
    }

    /// Keeps the fold of `id` through `through` (replacing any other of it).
    pub fn put(&mut self, id: String, through: i64, message: Message) {
        let weight = weight(&message);
        if weight > FOLD_BYTES {
            return;
        }
        if self.current.len() >= FOLDS || self.current_bytes + weight > FOLD_BYTES {
            self.previous = std::mem::take(&mut self.current);
            self.current_bytes = 0;
        }
        self.current_bytes += weight;
        self.current.insert(id, (through, message));
    }
}

/// A batch's new items, column by column, for one multi-row insert.
#[derive(Default)]
struct Items {
    message_id: Vec<uuid::Uuid>,
    channel: Vec<&'static str>,
    service_id: Vec<uuid::Uuid>,
    previous_state: Vec<Option<&'static str>>,
    state: Vec<&'static str>,
    cause: Vec<&'static str>,
    occurred_at: Vec<DateTime<Utc>>,
    recorded_at: Vec<DateTime<Utc>>,
    event_position: Vec<i64>,
}

/// One feed item, as the API serves it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq)]
pub struct FeedItem {
    pub position: i64,
    pub message_id: uuid::Uuid,
    pub channel: String,
    pub service_id: uuid::Uuid,
    pub previous_state: Option<String>,
    pub state: String,
    pub cause: String,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
}

impl StateChangeFeed {
    pub const NAME: &'static str = "state_changes";

    pub fn new() -> Self {
        Self::default()
    }

    fn folds(&self) -> std::sync::MutexGuard<'_, Folds> {
        // A panic while the lock was held leaves at worst a fold that is not used again.
        self.folds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Each message of the batch (in `first_seen`'s shape) whose state before the batch is
    /// remembered, and the ones to load (`load_messages_before`, which reads nothing for a
    /// message the batch starts).
    pub(crate) fn remembered(
        &self,
        wanted: Vec<(String, i64)>,
    ) -> (HashMap<String, Message>, Vec<(String, i64)>) {
        let mut folds = self.folds();
        let mut found = HashMap::with_capacity(wanted.len());
        let mut missing = Vec::new();
        for (id, sequence) in wanted {
            match folds.take(&id, sequence - 1) {
                Some(message) => {
                    found.insert(id, message);
                }
                None => missing.push((id, sequence)),
            }
        }
        (found, missing)
    }

    /// Remembers the batch's messages as its events left them.
    pub(crate) fn remember(&self, events: &[&StoredEvent], messages: HashMap<String, Message>) {
        let mut through: HashMap<&str, i64> = HashMap::with_capacity(messages.len());
        for event in events {
            through.insert(event.aggregate_id.as_str(), event.sequence);
        }
        let mut folds = self.folds();
        for (id, message) in messages {
            if let Some(sequence) = through.get(id.as_str()).copied() {
                folds.put(id, sequence, message);
            }
        }
    }
}

impl StateChangeFeed {
    /// The batch's new items. Each message's state before its first event in the batch is
    /// remembered from the batch before, or read from the log on `log` in one query, and
    /// then carried forward.
    async fn items(
        &self,
        log: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<Items, ProjectionError> {
        let events = message_events(events);
        let (mut messages, missing) = self.remembered(first_seen(&events));
        messages.extend(load_messages_before(&mut *log, &missing).await?);
        let new = new_items(&events, &mut messages)?;
        self.remember(&events, messages);
        let mut items = Items::default();
        for item in new {
            items.message_id.push(item.message_id);
            items.channel.push(item.channel);
            items.service_id.push(item.service_id);
            items.previous_state.push(item.previous_state);
            items.state.push(item.state);
            items.cause.push(item.cause);
            items.occurred_at.push(item.occurred_at);
            items.recorded_at.push(item.recorded_at);
            items.event_position.push(item.event_position);
        }
        Ok(items)
    }
}

impl Items {
    /// Numbered in log order from the current end: one writer holds the checkpoint lock.
    async fn insert(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        if self.message_id.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO state_changes (position, message_id, channel, service_id, \
               previous_state, state, cause, occurred_at, recorded_at, event_position) \
             SELECT (SELECT COALESCE(MAX(position), 0) FROM state_changes) + n, \
                    message_id, channel, service_id, previous_state, state, cause, \
                    occurred_at, recorded_at, event_position \
             FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[], \
                         $7::timestamptz[], $8::timestamptz[], $9::bigint[]) WITH ORDINALITY \
               AS i(message_id, channel, service_id, previous_state, state, cause, \
                    occurred_at, recorded_at, event_position, n) \
             ORDER BY n",
        )
        .bind(&self.message_id)
        .bind(&self.channel)
        .bind(&self.service_id)
        .bind(&self.previous_state)
        .bind(&self.state)
        .bind(&self.cause)
        .bind(&self.occurred_at)
        .bind(&self.recorded_at)
        .bind(&self.event_position)
        .execute(conn)
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Prepared<Postgres> for Items {
    async fn write(self: Box<Self>, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        self.insert(conn).await
    }
}

/// One new feed item, before it is numbered.
pub(crate) struct NewItem {
    pub message_id: uuid::Uuid,
    pub channel: &'static str,
    pub service_id: uuid::Uuid,
    pub previous_state: Option<&'static str>,
    pub state: &'static str,
    pub cause: &'static str,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub event_position: i64,
}

/// The batch's message events, in log order.
pub(crate) fn message_events(events: &[StoredEvent]) -> Vec<&StoredEvent> {
    events.iter().filter(|e| e.is_message()).collect()
}

/// Each message of the batch with the sequence of its first event in it: the fold of the
/// events before that is its state before the batch.
pub(crate) fn first_seen(events: &[&StoredEvent]) -> Vec<(String, i64)> {
    let mut seen = std::collections::HashSet::new();
    events
        .iter()
        .filter(|e| seen.insert(e.aggregate_id.as_str()))
        .map(|e| (e.aggregate_id.clone(), e.sequence))
        .collect()
}

/// The batch's state changes, in log order. `messages` holds each message's state before its
/// first event in the batch and is carried forward.
pub(crate) fn new_items(
    events: &[&StoredEvent],
    messages: &mut HashMap<String, Message>,
) -> Result<Vec<NewItem>, ProjectionError> {
    let mut items = Vec::new();
    for event in events {
        let Some(message) = messages.get_mut(&event.aggregate_id) else {
            continue;
        };
        let before = message.state();
        let payload = event.message_event()?;
        let cause = payload.type_name();
        let occurred_at = payload.occurred_at();
        message.apply_event(payload);
        let (Some(d), after) = (message.data(), message.state()) else {
            continue;
        };
        if after == before {
            continue;
        }
        items.push(NewItem {
            message_id: d.id.as_uuid(),
            channel: d.channel.as_str(),
            service_id: d.service_id.as_uuid(),
            previous_state: before.map(|s| s.as_str()),
            state: d.state.as_str(),
            cause,
            occurred_at,
            recorded_at: event.recorded_at,
            event_position: event.global_position,
        });
    }
    Ok(items)
}

/// The channel the feed's writers NOTIFY (the service's feed long-polls listen on it).
const CHANNEL: &str = "state_changes";

#[async_trait]
impl Projection<Postgres> for StateChangeFeed {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    /// Items are numbered in log order. The state before an event is the fold of the events
    /// before it (the log is this projection's only source, so it depends on no other), loaded
    /// once per message per batch and then carried forward.
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        let items = self.items(&mut *conn, events).await?;
        if items.message_id.is_empty() {
            return Ok(());
        }
        items.insert(&mut *conn).await?;
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// In a rebuild the folds (and the reads of the log they need) are done while the batch
    /// before is written; the write is the INSERT alone (no NOTIFY: nobody reads the copy).
    async fn prepare(
        &self,
        log: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<Option<Box<dyn Prepared<Postgres>>>, ProjectionError> {
        Ok(Some(Box::new(self.items(log, events).await?)))
    }

    fn tables(&self) -> &'static [&'static str] {
        &["state_changes"]
    }

    fn channel(&self) -> Option<&'static str> {
        Some(CHANNEL)
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        // TRUNCATE, not DELETE: the rows written next would otherwise meet each old row's
        // dead index entries in the unique checks (DELETE of 50k rows and the re-inserts
        // behind it cost more than the rest of a rebuild).
        sqlx::query("TRUNCATE state_changes").execute(conn).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use messaging_domain::{
        build_message, Channel, Compose, Dispatch, MessageCommand, MessageId, MessageInput,
        Profile, Provider, ServiceId, ServiceRef,
    };

    /// A composed email whose text is `size` bytes.
    fn email(size: usize) -> Message {
        let service = ServiceRef {
            id: ServiceId::from_uuid(uuid::Uuid::nil()),
            channel: Channel::Email,
            provider: Provider::Sendgrid,
            username: "news@example.com".into(),
            name: None,
        };
        let input = MessageInput {
            to: vec![Profile::new("a@example.com".to_string(), None)],
            subject: Some("s".into()),
            text: Some("x".repeat(size)),
            ..Default::default()
        };
        let compose = MessageCommand::Compose(Compose {
            id: MessageId::from_uuid(uuid::Uuid::now_v7()),
            message: build_message(&service, input).expect("a valid email"),
            dispatch: Dispatch::Draft,
            now: Utc::now(),
        });
        let mut message = Message::default();
        for event in message.decide(compose).expect("composed") {
            message.apply_event(event);
        }
        message
    }

    fn held(folds: &Folds) -> (usize, usize) {
        let all = folds.current.values().chain(folds.previous.values());
        let weights: Vec<usize> = all.map(|(_, m)| weight(m)).collect();
        (weights.len(), weights.iter().sum())
    }

    #[test]
    fn large_messages_keep_fewer_folds_not_more_memory() {
        let mut folds = Folds::default();
        for i in 0..100 {
            folds.put(format!("m{i}"), 1, email(200 << 10));
        }
        let (count, bytes) = held(&folds);
        assert!(bytes <= 2 * FOLD_BYTES, "{bytes} bytes in {count} folds");
        assert!(count >= 10, "{count}");
        // Heavier than a generation alone: not kept.
        folds.put("huge".into(), 1, email(FOLD_BYTES));
        assert!(folds.take("huge", 1).is_none());
        // Small ones: at most two generations of FOLDS.
        for i in 0..10 * FOLDS {
            folds.put(format!("s{i}"), 1, email(10));
        }
        assert!(held(&folds).0 <= 2 * FOLDS);
    }

    #[test]
    fn a_fold_is_used_only_where_the_batch_continues_it() {
        let mut folds = Folds::default();
        folds.put("m".into(), 3, email(10));
        assert!(
            folds.take("m", 2).is_none(),
            "folded through 3, asked for 2"
        );
        // A miss drops it: the batch reads the message from the log and remembers that.
        assert!(folds.take("m", 3).is_none());
        folds.put("m".into(), 3, email(10));
        assert!(folds.take("m", 3).is_some());
    }
}
