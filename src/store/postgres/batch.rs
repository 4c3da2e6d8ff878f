//! Commands, one per message, in at most two statements (a third, now and then, stores a long
//! message's snapshot): read the messages at once (each from its snapshot, if it has one)
//! (a Compose reads nothing: it succeeds only on a new message), decide each in Rust with the
//! aggregate's own `decide`, append every new event in one multi-row INSERT. Every PostgreSQL
//! command goes this way: a client's alone or in a group (see [`super::group`]), a worker's
//! round (the scheduler fires hundreds of messages at once). Through cqrs-es each command
//! costs a read and a transaction of its own (BEGIN, one INSERT per event, COMMIT).
//!
//! The INSERT is one statement, so it is atomic. When the server refuses it (another writer
//! appended to one of the messages since it was read, or a Compose's id exists: the primary key
//! rejects the whole statement; a deadlock; any error the server reports), nothing was
//! written: the batch is decided once more from a fresh read of every message, then, if that
//! fails too, each command falls back to [`commands::execute`](super::super::commands), which
//! retries conflicts one message at a time, so a failure fails only the commands it concerns.
//! The sender's batches read nothing first: the folds of a round's messages, as it read them,
//! are kept for its batch of starts, and the folds the starts leave for its outcomes (see
//! [`Shared::remember`]). A kept fold that went stale (another instance, or cqrs-es's
//! fallback, appended since) makes the INSERT collide on the log's key at the sequence after
//! it: nothing is written and the batch is decided again from a fresh read, as for any
//! conflict. A refusal, or a decision with nothing to record, makes no INSERT to collide: on
//! a kept fold it is not taken as the answer either, and the batch is decided again from a
//! fresh read first. A fold is kept only once its INSERT succeeded, so it never runs ahead of
//! the log.
//!
//! When the statement's fate is unknown (the connection broke once it was sent), nothing is
//! run again: every command whose rows were in it reports the store error, as a lost commit
//! does on the cqrs-es path; a refusal, or a command with nothing to record, keeps its answer. Rows go in in (message, sequence) order, so two batches over the same
//! messages take their key locks in the same order. The rows are the ones postgres-es writes
//! (event type and version from `DomainEvent`, serde JSON payload, empty metadata).

use super::super::commands::{execute, MessageCqrs};
use super::group::Shared;
use crate::metrics::{command_name, Metrics};
use crate::store::{CommandError, StoreError, SNAPSHOT_AFTER};
use cqrs_es::DomainEvent;
use messaging_domain::{Message, MessageCommand, MessageEvent, MessageId};
use messaging_projections::event::{load_folds, Sent};
use messaging_projections::Folds;
use postgres_es::PostgresEventRepository;
use sqlx::postgres::{PgDatabaseError, PgSeverity};
use sqlx::{PgConnection, PgPool};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// Where a batch's read and INSERT run (one connection for both: sqlx checks a pooled
/// connection with a round trip when it is taken and again when it is given back).
pub(super) enum On<'a> {
    /// A connection the caller keeps (a command writer's).
    Kept(&'a mut PgConnection),
    /// One taken from the pool, given back before any fallback (which takes its own).
    Pool(&'a PgPool),
}

/// A command's result: what it was decided against and appended when it was decided here,
/// `None` when cqrs-es ran it (the fallback).
pub(super) type Outcome = Result<Option<Decided>, CommandError>;

/// Whether the command may have appended events: it did, or its outcome is not known (the
/// connection broke after the INSERT was sent). A wake-up too many costs one NOTIFY.
pub(super) fn may_have_appended(outcome: &Outcome) -> bool {
    !matches!(outcome, Err(CommandError::Rejected(_)))
}

/// A command decided here: the message's fold it was decided against, and its new events.
pub(super) struct Decided {
    before: Message,
    events: Vec<MessageEvent>,
}

impl Decided {
    /// The message as the command left it (folded only for a caller that wants it).
    pub(super) fn message(self) -> Message {
        let mut message = self.before;
        for event in self.events {
            message.apply_event(event);
        }
        message
    }
}

/// One result per command, in order, and whether the connection itself failed (anything but
/// an error the server reported for the statement alone): a kept one must then be replaced.
/// Commands on the same message twice run one by one.
pub(super) async fn execute_each(
    writer: &Shared,
    on: On<'_>,
    commands: Vec<(MessageId, MessageCommand)>,
) -> (Vec<Outcome>, bool) {
    let (cqrs, metrics) = (&writer.cqrs, writer.metrics.as_deref());
    let distinct: HashSet<MessageId> = commands.iter().map(|(id, _)| *id).collect();
    if distinct.len() < commands.len() {
        // cqrs-es appends without the kept folds: drop them rather than collide on them.
        writer.forget(&distinct);
        return (one_by_one(cqrs, metrics, commands).await, false);
    }
    let outcome = match on {
        // A client's commands (on a writer's kept connection) neither use nor keep folds:
        // their messages were mostly not read here lately, and a client's command costs
        // nothing more for them. They do drop any kept fold of their messages.
        On::Kept(conn) => attempt(conn, &commands, Sent::Prepared, (&writer.folds, false)).await,
        On::Pool(pool) => match pool.acquire().await {
            Ok(mut conn) => {
                let folds = (&writer.folds, true);
                attempt(&mut conn, &commands, Sent::Unprepared, folds).await
            }
            Err(error) => {
                // cqrs-es appends without the kept folds (as above): a fold kept now would
                // be stale once it has, and a refusal decided on it would go unchecked.
                writer.forget(&distinct);
                Err(Failed::NothingWritten {
                    reason: error.to_string(),
                    connection_ok: true,
                })
            }
        },
    };
    let connection_failed = outcome.as_ref().err().is_some_and(Failed::broke_connection);
    let results = match outcome {
        Ok(results) => results,
        // Each command again on its own, so a conflict is retried where it happened and a
        // message that cannot be read or written fails alone.
        Err(Failed::NothingWritten { reason, .. }) => {
            tracing::debug!(%reason, commands = commands.len(), "batch append fell back to one command at a time");
            return (one_by_one(cqrs, metrics, commands).await, connection_failed);
        }
        // The commands whose rows were in the INSERT cannot be answered; the others (refused,
        // or nothing to record) are, as decided.
        Err(Failed::Unknown { reason, known }) => {
            tracing::error!(%reason, commands = commands.len(), "batch append's outcome is unknown");
            known
                .into_iter()
                .map(|known| known.unwrap_or_else(|| Err(CommandError::Store(reason.clone()))))
                .collect()
        }
    };
    if let Some(metrics) = metrics {
        let decided = results.iter().filter_map(|r| r.as_ref().ok()?.as_ref());
        metrics.events_appended(decided.flat_map(|d| d.events.iter()));
        for ((_, command), result) in commands.iter().zip(&results) {
            metrics.command(command_name(command), result);
        }
    }
    (results, connection_failed)
}

/// The batch on one connection; after a refusal on a connection still fine (a Compose whose
/// id exists, or a writer that appended in between), read every message afresh and decide
/// again, once.
async fn attempt(
    conn: &mut PgConnection,
    commands: &[(MessageId, MessageCommand)],
    sent: Sent,
    folds: (&Mutex<Folds>, bool),
) -> Appended {
    let outcome = decide_and_append(&mut *conn, commands, Read::Needed, sent, folds).await;
    match &outcome {
        Err(failed @ Failed::NothingWritten { reason, .. }) if !failed.broke_connection() => {
            tracing::debug!(%reason, commands = commands.len(), "batch append decided again");
            decide_and_append(conn, commands, Read::All, sent, folds).await
        }
        _ => outcome,
    }
}

impl Shared {
    /// Keeps messages as just read, each with its last sequence.
    pub(super) fn remember(&self, read: &HashMap<String, (Message, i64)>) {
        let mut folds = lock(&self.folds);
        for (id, (message, last)) in read {
            if message.data().is_some() {
                folds.put(id.clone(), *last, message.clone());
            }
        }
    }

    fn forget(&self, ids: &HashSet<MessageId>) {
        let mut folds = lock(&self.folds);
        for id in ids {
            folds.take_latest(&id.to_string());
        }
    }
}

/// The kept folds (a panic elsewhere while holding them leaves nothing half-done: each
/// `take` and `put` is whole).
fn lock(folds: &Mutex<Folds>) -> std::sync::MutexGuard<'_, Folds> {
    folds
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One result per command, in order.
type Appended = Result<Vec<Outcome>, Failed>;

/// Why a batch was not appended.
enum Failed {
    /// The server refused the statement, or it was never sent: running it again is safe.
    /// `connection_ok` is false when the connection may be broken (not to be used again).
    NothingWritten { reason: String, connection_ok: bool },
    /// The connection failed once the INSERT was sent: it may have been committed. `known`
    /// holds the answers of the commands that added no rows (refused, or nothing to record),
    /// decided on the read before the INSERT and true whatever became of it; `None` for those
    /// whose rows were in it.
    Unknown {
        reason: String,
        known: Vec<Option<Outcome>>,
    },
}

impl Failed {
    /// Whether the connection may be broken (a kept one is then replaced).
    fn broke_connection(&self) -> bool {
        match self {
            Self::NothingWritten { connection_ok, .. } => !connection_ok,
            Self::Unknown { .. } => true,
        }
    }

    /// The INSERT of `decided`'s rows failed with `error`.
    fn of_insert(error: sqlx::Error, decided: Vec<Outcome>) -> Self {
        if refused(&error) {
            return Self::NothingWritten {
                reason: error.to_string(),
                connection_ok: true,
            };
        }
        let known = decided
            .into_iter()
            .map(|outcome| match &outcome {
                Ok(Some(d)) if !d.events.is_empty() => None,
                _ => Some(outcome),
            })
            .collect();
        Self::Unknown {
            reason: error.to_string(),
            known,
        }
    }
}

/// Whether the server answered a statement with an ERROR: the statement (its own transaction)
/// did not commit, and the session goes on. A FATAL or PANIC ends the session, and may come
/// after the commit (a server shutting down).
fn refused(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(e) => e
            .try_downcast_ref::<PgDatabaseError>()
            .is_some_and(|e| matches!(e.severity(), PgSeverity::Error)),
        _ => false,
    }
}

/// Which messages a batch reads before deciding.
#[derive(Clone, Copy, PartialEq)]
enum Read {
    /// All but those of Compose commands.
    Needed,
    /// Every one.
    All,
}

async fn one_by_one(
    cqrs: &MessageCqrs<PostgresEventRepository>,
    metrics: Option<&Metrics>,
    commands: Vec<(MessageId, MessageCommand)>,
) -> Vec<Outcome> {
    let mut results = Vec::with_capacity(commands.len());
    for (id, command) in commands {
        results.push(execute(cqrs, metrics, id, command).await.map(|()| None));
    }
    results
}

/// Each message that has events, folded, with its last sequence: one query for them all
/// (prepared only on a command writer's connection: see [`Sent`]), starting from a message's
/// snapshot where it has one. A message read through [`SNAPSHOT_AFTER`] events or more gets a
/// new snapshot, written before this returns (a refused write is only logged: the snapshot is
/// a cache), and so does one whose snapshot could not be read.
pub(super) async fn load_many(
    conn: &mut PgConnection,
    ids: &[String],
    sent: Sent,
) -> Result<HashMap<String, (Message, i64)>, StoreError> {
    let all = vec![i64::MAX; ids.len()];
    let loaded = load_folds(&mut *conn, ids, &all, sent).await?;
    let mut to_snapshot: Vec<String> = loaded
        .messages
        .iter()
        .filter(|(_, folded)| folded.events_read >= SNAPSHOT_AFTER)
        .map(|(id, _)| id.clone())
        .collect();
    let replace = loaded.unreadable.is_some();
    if let Some(id) = loaded.unreadable {
        if !to_snapshot.contains(&id) {
            to_snapshot.push(id);
        }
    }
    let messages: HashMap<String, (Message, i64)> = loaded
        .messages
        .into_iter()
        .map(|(id, folded)| (id, (folded.message, folded.through)))
        .collect();
    if !to_snapshot.is_empty() {
        take_snapshots(conn, &messages, to_snapshot, replace).await?;
    }
    Ok(messages)
}

/// Stores the folds of `ids` as their snapshots, each replacing an older one (or one of
/// another fold version; any one with `replace`). A fold is of the log as read, so it is
/// right whenever it is used.
/// An ERROR the server reports (the statement alone failed) is logged and otherwise ignored;
/// anything else means the connection may be broken, and is returned.
async fn take_snapshots(
    conn: &mut PgConnection,
    messages: &HashMap<String, (Message, i64)>,
    mut ids: Vec<String>,
    replace: bool,
) -> Result<(), StoreError> {
    // In key order, so that two writers snapshotting the same messages lock them in one order.
    ids.sort();
    let (mut sequences, mut folds) = (Vec::new(), Vec::new());
    let mut taken = Vec::new();
    for id in ids {
        let Some((message, last)) = messages.get(&id) else {
            continue;
        };
        match serde_json::to_string(message) {
            Ok(fold) => {
                taken.push(id);
                sequences.push(*last);
                folds.push(fold);
            }
            Err(e) => {
                tracing::warn!(message_id = %id, error = %e, "a message snapshot could not be written")
            }
        }
    }
    let written = sqlx::query(
        "INSERT INTO message_snapshots (aggregate_id, sequence, fold_version, fold) \
         SELECT a, s, $4, f FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(a, s, f) \
         ON CONFLICT (aggregate_id) DO UPDATE \
           SET sequence = EXCLUDED.sequence, fold_version = EXCLUDED.fold_version, \
               fold = EXCLUDED.fold, taken_at = now() \
         WHERE $5 OR message_snapshots.sequence < EXCLUDED.sequence \
            OR message_snapshots.fold_version <> EXCLUDED.fold_version",
    )
    .bind(&taken)
    .bind(&sequences)
    .bind(&folds)
    .bind(Message::FOLD_VERSION)
    .bind(replace)
    .execute(conn)
    .await;
    match written {
        Ok(_) => Ok(()),
        Err(e) if refused(&e) => {
            tracing::warn!(error = %e, snapshots = taken.len(), "message snapshots not written");
            Ok(())
        }
        // The session may be gone (a FATAL, a broken connection): the batch must not go on
        // to its INSERT on it, whose failure would then read as an unknown outcome.
        Err(e) => Err(e.into()),
    }
}

/// Whether `command` is decided without reading the message: a Compose succeeds only on a
/// message with no events, and its id is new (a UUIDv7 made for it, or an idempotent retry's).
/// Its events go in from sequence 1; if the message exists after all, the primary key rejects
/// them and the fallback reads and decides (`AlreadyExists`). Inbound `Receive` is not
/// included: its id comes from the provider's message id and duplicates are common.
fn creates(command: &MessageCommand) -> bool {
    matches!(command, MessageCommand::Compose(_))
}

async fn decide_and_append(
    conn: &mut PgConnection,
    commands: &[(MessageId, MessageCommand)],
    read: Read,
    sent: Sent,
    (folds, use_kept): (&Mutex<Folds>, bool),
) -> Appended {
    let ids: Vec<String> = commands.iter().map(|(id, _)| id.to_string()).collect();
    // The kept folds are taken out whatever happens: put back only once appended. Read::All
    // (deciding again after a refusal) trusts none of them.
    let mut messages: HashMap<String, (Message, i64)> = HashMap::new();
    // The messages decided on a kept fold: only an append proves such a fold current (a
    // stale one collides on the log's key), so one that refuses or changes nothing is no
    // answer (see below).
    let mut from_kept: HashSet<String> = HashSet::new();
    {
        let mut folds = lock(folds);
        for (id, (_, command)) in ids.iter().zip(commands) {
            let kept = folds.take_latest(id);
            if let Some((last, message)) = kept.filter(|_| use_kept && read == Read::Needed) {
                if !creates(command) {
                    messages.insert(id.clone(), (message, last));
                    from_kept.insert(id.clone());
                }
            }
        }
    }
    let existing: Vec<String> = ids
        .iter()
        .zip(commands)
        .filter(|(id, (_, command))| {
            (read == Read::All || !creates(command)) && !messages.contains_key(*id)
        })
        .map(|(id, _)| id.clone())
        .collect();
    if !existing.is_empty() {
        // Nothing written; the connection may be what failed.
        let read =
            load_many(&mut *conn, &existing, sent)
                .await
                .map_err(|e| Failed::NothingWritten {
                    reason: e.to_string(),
                    connection_ok: false,
                })?;
        messages.extend(read);
    }
    let mut results = Vec::with_capacity(commands.len());
    let mut to_keep = Vec::with_capacity(commands.len());
    let (mut agg_ids, mut sequences, mut types, mut versions, mut payloads) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (aggregate_id, (_, command)) in ids.into_iter().zip(commands) {
        let (message, last) = messages.remove(&aggregate_id).unwrap_or_default();
        let decided = message.decide(command.clone());
        if from_kept.contains(&aggregate_id) && decided.as_ref().map_or(true, Vec::is_empty) {
            // A refusal (or nothing to record) on a fold that may be stale: another instance,
            // or cqrs-es's fallback, may have appended since it was kept, and a stale fold
            // refuses what the log allows (an outcome on a fold from before its start, a
            // send on a fold from before a reschedule) without any INSERT to collide. Nothing
            // is written yet: the batch is decided again from a fresh read of every message.
            return Err(Failed::NothingWritten {
                reason: format!(
                    "message {aggregate_id}: a kept fold refused the command or changed nothing"
                ),
                connection_ok: true,
            });
        }
        match decided {
            Ok(events) => {
                // Kept only while a provider call is open (the sender's start, for its
                // outcome a moment later): a fold kept longer would more likely be stale by
                // the time it is used (a webhook applied on another instance), and a stale
                // one costs the whole batch a refused INSERT.
                if use_kept {
                    let mut after = message.clone();
                    for event in &events {
                        after.apply_event(event.clone());
                    }
                    if after.data().is_some_and(|d| d.attempt_in_progress) {
                        to_keep.push((aggregate_id.clone(), last + events.len() as i64, after));
                    }
                }
                for (n, event) in events.iter().enumerate() {
                    agg_ids.push(aggregate_id.clone());
                    sequences.push(last + 1 + n as i64);
                    types.push(event.event_type());
                    versions.push(event.event_version());
                    payloads.push(serde_json::to_string(event).map_err(|e| {
                        Failed::NothingWritten {
                            reason: format!("serialising an event: {e}"),
                            connection_ok: true,
                        }
                    })?);
                }
                results.push(Ok(Some(Decided {
                    before: message,
                    events,
                })));
            }
            Err(e) => results.push(Err(CommandError::Rejected(e))),
        }
    }
    if !agg_ids.is_empty() {
        let inserted = sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                                 event_version, payload, metadata) \
             SELECT $1, a, s, t, v, p::json, '{}'::json \
             FROM unnest($2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[]) \
                  AS u(a, s, t, v, p) \
             ORDER BY a, s",
        )
        .bind(Message::TYPE_NAME)
        .bind(&agg_ids)
        .bind(&sequences)
        .bind(&types)
        .bind(&versions)
        .bind(&payloads)
        .execute(conn)
        .await;
        if let Err(error) = inserted {
            return Err(Failed::of_insert(error, results));
        }
    }
    let mut folds = lock(folds);
    for (id, last, message) in to_keep {
        folds.put(id, last, message);
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use messaging_domain::{MessageError, MessageState};

    /// A connection lost once the INSERT was sent leaves only the commands whose rows were in
    /// it unanswered: a refusal and a command with nothing to record keep their answers.
    #[test]
    fn an_insert_of_unknown_outcome_still_answers_the_commands_it_held_no_rows_of() {
        let with_rows = Decided {
            before: Message::default(),
            events: vec![MessageEvent::SendRetryRequested {
                requested_at: chrono::Utc::now(),
            }],
        };
        let nothing = Decided {
            before: Message::default(),
            events: vec![],
        };
        let refused = CommandError::Rejected(MessageError::InvalidTransition {
            action: "cancel",
            state: MessageState::Sent,
        });
        let decided = vec![Ok(Some(with_rows)), Err(refused), Ok(Some(nothing))];
        let lost = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let Failed::Unknown { known, .. } = Failed::of_insert(lost, decided) else {
            panic!("a lost connection after the INSERT was sent is an unknown outcome");
        };
        assert!(known[0].is_none(), "its rows may or may not be committed");
        assert!(matches!(
            known[1],
            Some(Err(CommandError::Rejected(
                MessageError::InvalidTransition { .. }
            )))
        ));
        assert!(matches!(&known[2], Some(Ok(Some(d))) if d.events.is_empty()));
    }
}
