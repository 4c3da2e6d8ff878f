//! Events as read back from the SQLite store.

use crate::event::{fold, fold_or_read_again, messages_before, FoldRow, Loaded, StoredEvent};
use crate::subscription::ProjectionError;
use messaging_domain::Message;
use sqlx::SqliteConnection;
use std::collections::HashMap;

/// The columns a reader selects, in [`StoredEvent`]'s shape. SQLite has no transaction ids:
/// commit order is position order, so every event reads as transaction 0.
pub const EVENT_COLUMNS: &str = "global_position, '0' AS transaction_id, aggregate_type, \
     aggregate_id, sequence, event_type, event_version, payload, recorded_at";

/// [`message_events`]' statement: one range of the log's index, bounded by `?3` when given (a
/// NULL tested apart would read every event of the message, as for a delivery plan that needs
/// only the first).
fn message_events_sql() -> String {
    format!(
        "SELECT {EVENT_COLUMNS} FROM events \
         WHERE aggregate_type = ?1 AND aggregate_id = ?2 \
           AND sequence <= COALESCE(?3, 9223372036854775807) \
         ORDER BY sequence"
    )
}

/// Every event of one message up to and including `up_to` (all when `None`), in order.
pub async fn message_events(
    conn: &mut SqliteConnection,
    message_id: &str,
    up_to: Option<i64>,
) -> Result<Vec<StoredEvent>, ProjectionError> {
    Ok(sqlx::query_as::<_, StoredEvent>(&message_events_sql())
        .bind(Message::TYPE_NAME)
        .bind(message_id)
        .bind(up_to)
        .fetch_all(conn)
        .await?)
}

/// The message as folded from its events up to `up_to`.
pub async fn load_message(
    conn: &mut SqliteConnection,
    message_id: &str,
    up_to: Option<i64>,
) -> Result<Message, ProjectionError> {
    fold(message_events(conn, message_id, up_to).await?)
}

/// For each `(message id, sequence)`, the message folded from its events before that
/// sequence: one query for a whole batch instead of one per message, starting from the
/// message's snapshot where it has one from before that sequence (a snapshot that cannot be
/// read is passed over: the batch is read again from every message's first event). The
/// wanted pairs travel as one JSON parameter, however many there are.
pub async fn load_messages_before(
    conn: &mut SqliteConnection,
    wanted: &[(String, i64)],
) -> Result<HashMap<String, Message>, ProjectionError> {
    let (mut messages, any_before) = messages_before(wanted);
    if !any_before {
        return Ok(messages);
    }
    let wanted_json =
        serde_json::to_string(wanted).map_err(|e| ProjectionError::Other(e.to_string()))?;
    let rows = |fold_version: Option<i32>| {
        sqlx::query_as::<_, FoldRow>(FOLD_ROWS_BEFORE)
            .bind(Message::TYPE_NAME)
            .bind(wanted_json.clone())
            .bind(fold_version)
    };
    let read = rows(Some(Message::FOLD_VERSION))
        .fetch_all(&mut *conn)
        .await?;
    let again = move || rows(None).fetch_all(conn);
    for (id, folded) in fold_or_read_again(read, again).await?.messages {
        if let Some(message) = messages.get_mut(&id) {
            *message = folded.message;
        }
    }
    Ok(messages)
}

/// [`FOLD_ROWS`] for every `[id, sequence]` of the JSON array `?2`: each message's snapshot of
/// fold version `?3` from before its sequence, then its events after the snapshot and before
/// the sequence, ordered by message and sequence. `CROSS JOIN` fixes the wanted pairs as the
/// outer loop (SQLite keeps a cross join's order): without statistics its planner preferred
/// the log's index on the aggregate type alone as the outer loop, every message event of the log
/// read for each batch. The snapshot's sequence is looked up from the wanted pair alone (not
/// from the event row), so that it bounds the search of the log's index from below: one range
/// of each message's events.
const FOLD_ROWS_BEFORE: &str = "\
    SELECT aggregate_id, sequence, event_version, payload FROM ( \
      SELECT s.aggregate_id, s.sequence, NULL AS event_version, s.fold AS payload \
      FROM json_each(?2) AS wanted CROSS JOIN message_snapshots s \
        ON s.aggregate_id = json_extract(wanted.value, '$[0]') AND s.fold_version = ?3 \
       AND s.sequence < json_extract(wanted.value, '$[1]') \
      UNION ALL \
      SELECT e.aggregate_id, e.sequence, e.event_version, e.payload \
      FROM json_each(?2) AS wanted CROSS JOIN events e \
        ON e.aggregate_type = ?1 AND e.aggregate_id = json_extract(wanted.value, '$[0]') \
       AND e.sequence < json_extract(wanted.value, '$[1]') \
       AND e.sequence > COALESCE((SELECT s.sequence FROM message_snapshots s \
                                  WHERE s.aggregate_id = json_extract(wanted.value, '$[0]') \
                                    AND s.fold_version = ?3 \
                                    AND s.sequence < json_extract(wanted.value, '$[1]')), 0) \
    ) ORDER BY aggregate_id, sequence";

/// One message's snapshot of fold version `?3` (a row without `event_version`), then its
/// events after that snapshot's sequence (all of them without one), in sequence order: the
/// rows [`load_fold`] folds, in one statement (one read snapshot of the database).
const FOLD_ROWS: &str = "\
    SELECT aggregate_id, sequence, NULL AS event_version, fold AS payload \
    FROM message_snapshots WHERE aggregate_id = ?2 AND fold_version = ?3 \
    UNION ALL \
    SELECT aggregate_id, sequence, event_version, payload FROM events \
    WHERE aggregate_type = ?1 AND aggregate_id = ?2 \
      AND sequence > COALESCE((SELECT sequence FROM message_snapshots \
                               WHERE aggregate_id = ?2 AND fold_version = ?3), 0) \
    ORDER BY 2";

/// The message folded from its snapshot, where it has one of this release's fold version,
/// and the events after it; from every event when the snapshot cannot be read (named in
/// `unreadable`). No message in it: the message has no events.
pub async fn load_fold(
    conn: &mut SqliteConnection,
    message_id: &str,
) -> Result<Loaded, ProjectionError> {
    let rows = |fold_version: Option<i32>| {
        sqlx::query_as::<_, FoldRow>(FOLD_ROWS)
            .bind(Message::TYPE_NAME)
            .bind(message_id)
            .bind(fold_version)
    };
    let read = rows(Some(Message::FOLD_VERSION))
        .fetch_all(&mut *conn)
        .await?;
    let again = move || rows(None).fetch_all(conn);
    fold_or_read_again(read, again).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::migrate::Migrator;
    use sqlx::sqlite::SqlitePoolOptions;
    use std::path::Path;

    /// The steps of SQLite's plan for `sql`.
    async fn plan(sql: &str) -> Vec<String> {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .expect("in-memory SQLite");
        Migrator::new(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../migrations/sqlite"
        )))
        .await
        .expect("migrations")
        .run(&pool)
        .await
        .expect("migrated");
        let rows: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                .bind(Message::TYPE_NAME)
                .bind("[]")
                .bind(Message::FOLD_VERSION)
                .fetch_all(&pool)
                .await
                .expect("EXPLAIN QUERY PLAN");
        rows.into_iter().map(|(_, _, _, step)| step).collect()
    }

    /// The log is read as one range of each message's events, bounded below by its snapshot
    /// and above by the wanted sequence: the events before the snapshot are never visited, nor
    /// are other messages' (the wanted pairs are the outer loop).
    #[tokio::test]
    async fn each_message_is_read_from_its_snapshot_as_one_range_of_the_log() {
        for (name, sql) in [
            ("FOLD_ROWS", FOLD_ROWS),
            ("FOLD_ROWS_BEFORE", FOLD_ROWS_BEFORE),
        ] {
            let steps = plan(sql).await;
            assert!(
                steps.iter().any(|s| s.contains("USING INDEX")
                    && s.contains("aggregate_id=?")
                    && s.contains("sequence>?")),
                "{name}: {steps:#?}"
            );
            assert!(
                !steps
                    .iter()
                    .any(|s| s.starts_with("SCAN e") || s.starts_with("SCAN events")),
                "{name}: {steps:#?}"
            );
        }
        let steps = plan(&message_events_sql()).await;
        assert!(
            steps
                .iter()
                .any(|s| s.contains("(aggregate_type=? AND aggregate_id=? AND sequence<?)")),
            "{steps:#?}"
        );
        let steps = plan(FOLD_ROWS_BEFORE).await;
        let log = steps
            .iter()
            .position(|s| s.starts_with("SEARCH e "))
            .expect("the log searched");
        assert!(
            steps[log]
                .contains("(aggregate_type=? AND aggregate_id=? AND sequence>? AND sequence<?)"),
            "{steps:#?}"
        );
        assert!(
            steps[..log].iter().any(|s| s.starts_with("SCAN wanted")),
            "the wanted pairs are the outer loop: {steps:#?}"
        );
    }
}
