//! The message list on SQLite: the fold of [`crate::message_list`], written to SQLite's
//! columns (UUIDs as blobs, the profiles as a JSON array, the message as JSON text).

use super::MAX_PARAMETERS;
use crate::event::StoredEvent;
use crate::message_list::{ListRow, Rows};
use crate::subscription::{Projection, ProjectionError};
use crate::MessageList;
use async_trait::async_trait;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

/// Columns bound per row of the upsert.
const COLUMNS: usize = 9;

/// The rows of these messages, a chunk of ids per query.
async fn load(conn: &mut SqliteConnection, ids: &[uuid::Uuid]) -> Result<Rows, ProjectionError> {
    let mut rows = Rows::new(ids);
    for chunk in ids.chunks(MAX_PARAMETERS) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT message_id, message, last_sequence FROM message_list WHERE message_id IN (",
        );
        let mut list = query.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        list.push_unseparated(")");
        let found: Vec<(uuid::Uuid, String, i64)> =
            query.build_query_as().fetch_all(&mut *conn).await?;
        for (id, json, last_sequence) in found {
            rows.found(id, &json, last_sequence)?;
        }
    }
    Ok(rows)
}

/// Writes the changed rows, in multi-row upserts.
async fn store(conn: &mut SqliteConnection, rows: &Rows) -> Result<(), ProjectionError> {
    let changed = rows.changed()?;
    let mut profiles = Vec::with_capacity(changed.len());
    for row in &changed {
        profiles.push(
            serde_json::to_string(&row.profiles)
                .map_err(|e| ProjectionError::Other(e.to_string()))?,
        );
    }
    let rows: Vec<(&ListRow, String)> = changed.iter().zip(profiles).collect();
    for chunk in rows.chunks(MAX_PARAMETERS / COLUMNS) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO message_list (message_id, service_id, channel, direction, state, \
             profiles, message, last_sequence, provider_message_id) ",
        );
        query.push_values(chunk, |mut values, (row, profiles)| {
            values
                .push_bind(row.id)
                .push_bind(row.service_id)
                .push_bind(row.channel)
                .push_bind(row.direction)
                .push_bind(row.state)
                .push_bind(profiles.as_str())
                .push_bind(row.message.as_str())
                .push_bind(row.last_sequence)
                .push_bind(row.provider_message_id.as_deref());
        });
        query.push(
            " ON CONFLICT (message_id) DO UPDATE SET state = excluded.state, \
             profiles = excluded.profiles, message = excluded.message, \
             last_sequence = excluded.last_sequence, \
             provider_message_id = excluded.provider_message_id",
        );
        query.build().execute(&mut *conn).await?;
    }
    // A new row's profiles, for the list filtered by a profile (see the migration that made
    // `message_list_profiles`). A row already stored has its pairs: a message's profiles are
    // set by its first event. `OR IGNORE`: a batch retried after its rows were written.
    let pairs: Vec<(&str, uuid::Uuid)> = changed
        .iter()
        .filter(|row| !row.stored)
        .flat_map(|row| row.profiles.iter().map(|p| (p.as_str(), row.id)))
        .collect();
    for chunk in pairs.chunks(MAX_PARAMETERS / 2) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT OR IGNORE INTO message_list_profiles (profile, message_id) ",
        );
        query.push_values(chunk, |mut values, (profile, id)| {
            values.push_bind(*profile).push_bind(*id);
        });
        query.build().execute(&mut *conn).await?;
    }
    Ok(())
}

#[async_trait]
impl Projection<Sqlite> for MessageList {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    /// Each message's row is read once and written once per batch.
    async fn handle_batch(
        &self,
        conn: &mut SqliteConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        let mut rows = load(&mut *conn, &Rows::ids(events)?).await?;
        rows.apply(events)?;
        store(conn, &rows).await
    }

    async fn reset(&self, conn: &mut SqliteConnection) -> Result<(), ProjectionError> {
        sqlx::query("DELETE FROM message_list_profiles")
            .execute(&mut *conn)
            .await?;
        sqlx::query("DELETE FROM message_list")
            .execute(conn)
            .await?;
        Ok(())
    }
}
