//! The webhook inbox on SQLite.

use super::{later, SqlitePools};
use crate::store::{FactLease, FactSettlement, PendingFact, StoreError};
use crate::webhooks::inbox::{FactKind, InboxFact};
use chrono::{DateTime, Utc};
use messaging_domain::{Channel, MessageId};
use messaging_projections::sqlite::begin_immediate;
use serde_json::Value;
use sqlx::types::Json;
use std::time::Duration;

/// How long an applier holds the facts it leased (as on PostgreSQL).
const LEASE: Duration = Duration::from_secs(60);
/// Rows per INSERT: 8 parameters each, well under SQLite's 32766.
const CHUNK: usize = 1000;

pub(super) async fn record(pools: &SqlitePools, facts: &[InboxFact]) -> Result<u64, StoreError> {
    if facts.is_empty() {
        return Ok(0);
    }
    let received_at = crate::clock::now();
    let mut tx = begin_immediate(&pools.write).await?;
    let mut inserted = 0;
    for chunk in facts.chunks(CHUNK) {
        let mut insert = sqlx::QueryBuilder::new(
            "INSERT INTO webhook_inbox (provider, event_id, message_id, kind, occurred_at, \
             payload, status, reason, received_at) ",
        );
        insert.push_values(chunk, |mut row, f| {
            let (status, reason) = f.stored_status();
            row.push_bind(f.provider)
                .push_bind(&f.event_id)
                .push_bind(f.message_id)
                .push_bind(f.kind.as_str())
                .push_bind(f.occurred_at)
                .push_bind(Json(&f.payload))
                .push_bind(status)
                .push_bind(reason)
                .push_bind(received_at);
        });
        // A provider re-send, or a repeat within the batch, keeps the first row.
        insert.push(" ON CONFLICT (provider, event_id) DO NOTHING");
        inserted += insert.build().execute(&mut *tx).await?.rows_affected();
    }
    tx.commit().await?;
    Ok(inserted)
}

pub(super) async fn outbound_message_id(
    pools: &SqlitePools,
    channel: Channel,
    provider_message_id: &str,
) -> Result<Option<MessageId>, StoreError> {
    let id: Option<uuid::Uuid> = sqlx::query_scalar(
        "SELECT message_id FROM message_list WHERE provider_message_id = ?1 AND channel = ?2 \
         AND direction = 'outbound' LIMIT 1",
    )
    .bind(provider_message_id)
    .bind(channel.as_str())
    .fetch_optional(&pools.read)
    .await?;
    Ok(id.map(MessageId::from_uuid))
}

/// See [`crate::store::Store::rematch_replies`].
pub(super) async fn rematch_replies(
    pools: &SqlitePools,
    channel: Channel,
    provider_message_id: &str,
    message_id: MessageId,
) -> Result<u64, StoreError> {
    let given_back = sqlx::query(
        "UPDATE webhook_inbox SET status = 'pending', waiting = 0, waiting_after = NULL, \
           reason = NULL, locked_until = NULL, message_id = ?3 \
         WHERE status IN ('unmatched', 'pending') AND kind = 'reply' AND message_id IS NULL \
           AND json_extract(payload, '$.answered_post') = ?1 \
           AND json_extract(payload, '$.channel') = ?2",
    )
    .bind(provider_message_id)
    .bind(channel.as_str())
    .bind(message_id.as_uuid())
    .execute(&pools.write)
    .await?
    .rows_affected();
    Ok(given_back)
}

#[derive(sqlx::FromRow)]
struct PendingRow {
    id: i64,
    event_id: String,
    message_id: Option<uuid::Uuid>,
    kind: String,
    occurred_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
    payload: Json<Value>,
}

/// Leases the next pending facts, oldest first (`?1` now, `?2` the lease's end, `?3` when a
/// reply to no known post, or a fact for a message never listed, is given up on), through `webhook_inbox_pending` in that order,
/// stopping at 500.
pub(super) const LEASE_PENDING: &str = "UPDATE webhook_inbox SET locked_until = ?2, \
           waiting = 0, \
           message_id = COALESCE(webhook_inbox.message_id, (SELECT m.message_id \
               FROM message_list m \
               WHERE m.provider_message_id = json_extract(webhook_inbox.payload, '$.answered_post') \
                 AND m.channel = json_extract(webhook_inbox.payload, '$.channel') \
                 AND m.direction = 'outbound' LIMIT 1)), \
           waiting_after = (SELECT last_sequence FROM message_list m \
               WHERE m.message_id = COALESCE(webhook_inbox.message_id, (SELECT p.message_id \
                 FROM message_list p \
                 WHERE p.provider_message_id = json_extract(webhook_inbox.payload, '$.answered_post') \
                   AND p.channel = json_extract(webhook_inbox.payload, '$.channel') \
                   AND p.direction = 'outbound' LIMIT 1))) \
         WHERE id IN (SELECT c.id FROM webhook_inbox c \
               WHERE c.status = 'pending' \
                 AND (c.locked_until IS NULL OR c.locked_until < ?1) \
                 AND (NOT c.waiting OR EXISTS \
                   (SELECT 1 FROM message_list m WHERE m.message_id = c.message_id \
                      AND m.last_sequence > COALESCE(c.waiting_after, 0)) \
                   OR (c.message_id IS NULL AND (c.received_at < ?3 OR EXISTS \
                     (SELECT 1 FROM message_list m \
                      WHERE m.provider_message_id = json_extract(c.payload, '$.answered_post') \
                        AND m.channel = json_extract(c.payload, '$.channel') \
                        AND m.direction = 'outbound'))) \
                   OR (c.received_at < ?3 AND c.message_id IS NOT NULL AND c.reason IS NULL \
                     AND NOT EXISTS \
                     (SELECT 1 FROM message_list m WHERE m.message_id = c.message_id))) \
               ORDER BY c.occurred_at, c.id LIMIT 500) \
         RETURNING id, event_id, message_id, kind, occurred_at, received_at, payload";

pub(super) async fn lease(
    pools: &SqlitePools,
    gave_up_before: DateTime<Utc>,
) -> Result<Vec<PendingFact>, StoreError> {
    let now = crate::clock::now();
    let until = later(now, LEASE);
    let rows: Vec<PendingRow> = sqlx::query_as(LEASE_PENDING)
        .bind(now)
        .bind(until)
        .bind(gave_up_before)
        .fetch_all(&pools.write)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| PendingFact {
            id: r.id,
            event_id: r.event_id,
            message_id: r.message_id.map(MessageId::from_uuid),
            kind: FactKind::parse(&r.kind),
            occurred_at: r.occurred_at,
            received_at: r.received_at,
            payload: r.payload.0,
            leased_until: until,
        })
        .collect())
}

pub(super) async fn settle(
    pools: &SqlitePools,
    settled: &[(FactLease, FactSettlement)],
) -> Result<(), StoreError> {
    if settled.is_empty() {
        return Ok(());
    }
    let now = crate::clock::now();
    let mut tx = begin_immediate(&pools.write).await?;
    for (lease, settlement) in settled {
        let (status, waiting, reason) = match settlement {
            FactSettlement::Applied => ("applied", false, None),
            FactSettlement::Unmatched(reason) => ("unmatched", false, Some(reason.as_str())),
            FactSettlement::Retry(reason) => ("pending", false, Some(reason.as_str())),
            FactSettlement::Wait(reason) => ("pending", true, reason.as_deref()),
        };
        sqlx::query(
            "UPDATE webhook_inbox SET status = ?2, waiting = ?3, reason = ?4, \
               locked_until = NULL, \
               applied_at = CASE WHEN ?2 = 'applied' THEN ?5 END, \
               waiting_after = CASE WHEN ?3 THEN waiting_after END \
             WHERE id = ?1 AND locked_until = ?6",
        )
        .bind(lease.id)
        .bind(status)
        .bind(waiting)
        .bind(reason)
        .bind(now)
        .bind(lease.until)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
