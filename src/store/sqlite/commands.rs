//! Commands on SQLite, as on PostgreSQL: the message read from its snapshot and the events
//! after it (one statement), the command decided in Rust with the aggregate's own `decide`,
//! its events appended in one `BEGIN IMMEDIATE` transaction. Through cqrs-es every command
//! read every event since the compose: an email opened and clicked by thousands of recipients
//! (one event per fact) cost each new fact a read of all the others.
//!
//! A message read through [`SNAPSHOT_AFTER`] events past its snapshot (or whose snapshot could
//! not be read) gets a new one in the same transaction as the command's events: its fold
//! after them, at their last sequence. Should the append collide with another writer's events
//! (the log's key on message and sequence: nothing written), the command runs through cqrs-es,
//! which decides again from the log and retries conflicts. Commands on one message already
//! take turns ([`SqliteStore::execute`]'s stripes), and one process owns the file, so that
//! should not happen.

use super::SqliteStore;
use crate::metrics::command_name;
use crate::store::commands::execute;
use crate::store::{unavailable, CommandError, SNAPSHOT_AFTER};
use cqrs_es::DomainEvent;
use messaging_domain::{Message, MessageCommand, MessageId};
use messaging_projections::sqlite::begin_immediate;
use messaging_projections::sqlite::event::load_fold;
use sqlx::types::Json;
use sqlx::SqliteConnection;

/// What the command path did.
pub(super) enum Ran {
    /// Decided here: the message as the command left it.
    Decided(Box<Message>),
    /// cqrs-es ran it (after a collision): the message is to be read back.
    ByCqrs,
}

/// A store failure as a command's error: unavailable when no connection could be had.
fn failed(e: impl std::error::Error + 'static) -> CommandError {
    if unavailable(&e) {
        CommandError::Unavailable(e.to_string())
    } else {
        CommandError::Store(e.to_string())
    }
}

impl SqliteStore {
    /// Runs a command (the caller holds its message's turn) and counts it by type and
    /// outcome, and its events.
    pub(super) async fn run_command(
        &self,
        id: MessageId,
        command: MessageCommand,
    ) -> Result<Ran, CommandError> {
        let name = command_name(&command);
        let result = match self.decide_and_append(id, &command).await {
            Ok(Some(after)) => Ok(Ran::Decided(Box::new(after))),
            Ok(None) => {
                tracing::debug!(message_id = %id, "a command's append collided; cqrs-es runs it");
                // Counted there.
                return execute(&self.cqrs, self.metrics.as_deref(), id, command)
                    .await
                    .map(|()| Ran::ByCqrs);
            }
            Err(e) => Err(e),
        };
        if let Some(metrics) = &self.metrics {
            metrics.command(name, &result);
        }
        result
    }

    /// One try: the message as the command left it, or `None` when its events collided with
    /// events already in the log (nothing written).
    async fn decide_and_append(
        &self,
        id: MessageId,
        command: &MessageCommand,
    ) -> Result<Option<Message>, CommandError> {
        let aggregate_id = id.to_string();
        let loaded = {
            let mut conn = self.pools.read.acquire().await.map_err(failed)?;
            load_fold(&mut conn, &aggregate_id).await.map_err(failed)?
        };
        let replace = loaded.unreadable.is_some();
        let (message, last, snapshot_due) = match loaded.messages.into_values().next() {
            None => (Message::default(), 0, false),
            Some(folded) => {
                let due = folded.events_read >= SNAPSHOT_AFTER || replace;
                (folded.message, folded.through, due)
            }
        };
        let events = match message.decide(command.clone()) {
            Ok(events) if !events.is_empty() => events,
            decided => {
                // Nothing to append (a duplicate fact, a refusal): the snapshot the read called
                // for is still taken, or every read would go through the same events again.
                if snapshot_due {
                    self.keep_snapshot(id, &message, last, replace).await;
                }
                return decided
                    .map(|_| Some(message))
                    .map_err(CommandError::Rejected);
            }
        };
        let mut after = message;
        let mut rows = Vec::with_capacity(events.len());
        for event in &events {
            let payload = serde_json::to_value(event)
                .map_err(|e| CommandError::Store(format!("serialising an event: {e}")))?;
            rows.push((event.event_type(), event.event_version(), payload));
            after.apply_event(event.clone());
        }
        let snapshot = if snapshot_due {
            serde_json::to_string(&after)
                .map_err(|e| tracing::warn!(message_id = %id, error = %e, "a message snapshot could not be written"))
                .ok()
        } else {
            None
        };
        let mut tx = begin_immediate(&self.pools.write).await.map_err(failed)?;
        // The time of recording to the microsecond, taken once the write lock is held (see the
        // event repository's `persist`).
        let recorded_at = crate::clock::now();
        let metadata = Json(serde_json::json!({}));
        for (n, (event_type, event_version, payload)) in rows.iter().enumerate() {
            let inserted = sqlx::query(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                 event_version, payload, metadata, recorded_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .bind(Message::TYPE_NAME)
            .bind(&aggregate_id)
            .bind(last + 1 + n as i64)
            .bind(event_type)
            .bind(event_version)
            .bind(Json(payload))
            .bind(&metadata)
            .bind(recorded_at)
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(_) => {}
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                    tx.rollback().await.map_err(failed)?;
                    return Ok(None);
                }
                Err(e) => return Err(failed(e)),
            }
        }
        if let Some(fold) = snapshot {
            // A cache: should this statement fail alone, the command still stands (the next
            // one tries again); an error that ends the transaction fails the commit below.
            let taken = store_snapshot(
                &mut tx,
                &aggregate_id,
                last + rows.len() as i64,
                &fold,
                replace,
            )
            .await;
            if let Err(e) = taken {
                tracing::warn!(message_id = %id, error = %e, "a message snapshot could not be written");
            }
        }
        // The commit and the bell on a task of their own: a future dropped during the commit
        // (its client gone) would leave the readers unrung, waiting for their next poll,
        // though the commit went on. A failed commit only wakes them for nothing.
        let bell = self.bell.clone();
        tokio::spawn(async move {
            let committed = tx.commit().await;
            bell.events();
            committed
        })
        .await
        .map_err(|e| CommandError::Store(e.to_string()))?
        .map_err(failed)?;
        if let Some(metrics) = &self.metrics {
            metrics.events_appended(&events);
        }
        Ok(Some(after))
    }

    /// Stores `message`, folded through `last`, as its snapshot, in a transaction of its own.
    /// Best effort: a failure is logged.
    async fn keep_snapshot(&self, id: MessageId, message: &Message, last: i64, replace: bool) {
        let kept = async {
            let fold = serde_json::to_string(message).map_err(|e| e.to_string())?;
            let mut tx = begin_immediate(&self.pools.write)
                .await
                .map_err(|e| e.to_string())?;
            store_snapshot(&mut tx, &id.to_string(), last, &fold, replace)
                .await
                .map_err(|e| e.to_string())?;
            tx.commit().await.map_err(|e| e.to_string())
        };
        if let Err(e) = kept.await {
            tracing::warn!(message_id = %id, error = %e, "a message snapshot could not be written");
        }
    }
}

/// Stores a message's fold through `sequence` as its snapshot, replacing an older one or one
/// of another fold version (any one with `replace`: it could not be read).
async fn store_snapshot(
    conn: &mut SqliteConnection,
    aggregate_id: &str,
    sequence: i64,
    fold: &str,
    replace: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO message_snapshots (aggregate_id, sequence, fold_version, fold) \
         VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (aggregate_id) DO UPDATE SET sequence = excluded.sequence, \
           fold_version = excluded.fold_version, fold = excluded.fold, \
           taken_at = excluded.taken_at \
         WHERE ?5 OR message_snapshots.sequence < excluded.sequence \
            OR message_snapshots.fold_version <> excluded.fold_version",
    )
    .bind(aggregate_id)
    .bind(sequence)
    .bind(Message::FOLD_VERSION)
    .bind(fold)
    .bind(replace)
    .execute(conn)
    .await?;
    Ok(())
}
