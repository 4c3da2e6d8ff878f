//! The state-change feed on SQLite: the items of [`crate::feed`], numbered from the current
//! end under the write lock the batch's transaction holds.

use super::event::load_messages_before;
use super::MAX_PARAMETERS;
use crate::event::StoredEvent;
use crate::feed::{first_seen, message_events, new_items};
use crate::subscription::{Projection, ProjectionError};
use crate::StateChangeFeed;
use async_trait::async_trait;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

/// Columns bound per item.
const COLUMNS: usize = 10;

#[async_trait]
impl Projection<Sqlite> for StateChangeFeed {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    async fn handle_batch(
        &self,
        conn: &mut SqliteConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        let events = message_events(events);
        let (mut messages, missing) = self.remembered(first_seen(&events));
        messages.extend(load_messages_before(&mut *conn, &missing).await?);
        let items = new_items(&events, &mut messages)?;
        self.remember(&events, messages);
        if items.is_empty() {
            return Ok(());
        }
        // Numbered in log order from the current end: the batch holds the write lock.
        let end: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM state_changes")
            .fetch_one(&mut *conn)
            .await?;
        let numbered: Vec<_> = (end + 1..).zip(&items).collect();
        for chunk in numbered.chunks(MAX_PARAMETERS / COLUMNS) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO state_changes (position, message_id, channel, service_id, \
                 previous_state, state, cause, occurred_at, recorded_at, event_position) ",
            );
            query.push_values(chunk, |mut values, (position, item)| {
                values
                    .push_bind(*position)
                    .push_bind(item.message_id)
                    .push_bind(item.channel)
                    .push_bind(item.service_id)
                    .push_bind(item.previous_state)
                    .push_bind(item.state)
                    .push_bind(item.cause)
                    .push_bind(item.occurred_at)
                    .push_bind(item.recorded_at)
                    .push_bind(item.event_position);
            });
            query.build().execute(&mut *conn).await?;
        }
        Ok(())
    }

    async fn reset(&self, conn: &mut SqliteConnection) -> Result<(), ProjectionError> {
        sqlx::query("DELETE FROM state_changes")
            .execute(conn)
            .await?;
        Ok(())
    }
}
