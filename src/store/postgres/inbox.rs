//! The webhook inbox: facts recorded before the provider is answered, leased and settled by
//! the applier with `FOR UPDATE SKIP LOCKED`, and the lookups the webhooks need.

use crate::store::{FactLease, FactSettlement, PendingFact, StoreError};
use crate::webhooks::inbox::{FactKind, InboxFact, Problematic};
use chrono::{DateTime, Utc};
use messaging_domain::{Channel, MessageId};
use serde_json::Value;
use sqlx::PgPool;

/// Records a batch in one statement (one transaction); re-sends are dropped by the unique key.
pub(super) async fn record(pool: &PgPool, facts: &[InboxFact]) -> Result<u64, StoreError> {
    if facts.is_empty() {
        return Ok(0);
    }
    let mut providers = Vec::with_capacity(facts.len());
    let mut event_ids = Vec::with_capacity(facts.len());
    let mut message_ids = Vec::with_capacity(facts.len());
    let mut kinds = Vec::with_capacity(facts.len());
    let mut times = Vec::with_capacity(facts.len());
    let mut payloads = Vec::with_capacity(facts.len());
    let mut statuses = Vec::with_capacity(facts.len());
    let mut reasons: Vec<Option<String>> = Vec::with_capacity(facts.len());
    for f in facts {
        providers.push(f.provider);
        event_ids.push(f.event_id.as_str());
        message_ids.push(f.message_id);
        kinds.push(f.kind.as_str());
        times.push(f.occurred_at);
        // Its text as it is: written as `jsonb` without being read as a value first.
        payloads.push(sqlx::types::Json(&f.payload));
        let (status, reason) = f.stored_status();
        statuses.push(status);
        reasons.push(reason);
    }
    let inserted = sqlx::query(
        "INSERT INTO webhook_inbox (provider, event_id, message_id, kind, occurred_at, payload, status, reason) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::timestamptz[], \
                              $6::jsonb[], $7::text[], $8::text[]) \
         ON CONFLICT (provider, event_id) DO NOTHING",
    )
    .bind(&providers)
    .bind(&event_ids)
    .bind(&message_ids)
    .bind(&kinds)
    .bind(&times)
    .bind(&payloads)
    .bind(&statuses)
    .bind(&reasons)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(inserted)
}

/// Our sent post with this provider id on this channel, if any.
pub(super) async fn outbound_message_id(
    pool: &PgPool,
    channel: Channel,
    provider_message_id: &str,
) -> Result<Option<MessageId>, StoreError> {
    let id: Option<uuid::Uuid> = sqlx::query_scalar(
        "SELECT message_id FROM message_list WHERE provider_message_id = $1 AND channel = $2 \
         AND direction = 'outbound' LIMIT 1",
    )
    .bind(provider_message_id)
    .bind(channel.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(id.map(MessageId::from_uuid))
}

/// See [`crate::store::Store::rematch_replies`]. A hand-resolved outcome is rare: the rows
/// are found by a walk of the unmatched and pending ones, not by an index of their own.
pub(super) async fn rematch_replies(
    pool: &PgPool,
    channel: Channel,
    provider_message_id: &str,
    message_id: MessageId,
) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    let given_back = sqlx::query(
        "UPDATE webhook_inbox SET status = 'pending', waiting = false, waiting_after = NULL, \
           reason = NULL, locked_until = NULL, message_id = $3 \
         WHERE status IN ('unmatched', 'pending') AND kind = 'reply' AND message_id IS NULL \
           AND payload->>'answered_post' = $1 AND payload->>'channel' = $2",
    )
    .bind(provider_message_id)
    .bind(channel.as_str())
    .bind(message_id.as_uuid())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if given_back > 0 {
        // The inbox's trigger wakes the appliers on inserts only.
        sqlx::query("SELECT pg_notify('webhook_inbox', '')")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
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
    payload: Value,
    locked_until: DateTime<Utc>,
}

/// The applier's lease: the oldest 500 pending facts that are not leased and not waiting (or
/// whose wait is over), walked in time order through `webhook_inbox_pending` and stopped at
/// the 500th (a plan test pins it), then updated by key (`= ANY(ARRAY(..))`, as the queues'
/// claims: no join back to the inbox that a plan could make a scan of it per fact). The
/// facts' payloads are read only for the 500 leased: when PostgreSQL sorts instead (its plan
/// for a table without statistics may), the rows it sorts are an id and a time, not every
/// pending fact's payload (the sort then spilled 20 MB to disk with 40k pending). A reply
/// that names only the post it answers looks the post up by its provider id (for its message
/// and again for that message's sequence, and first in the filter when it waits for the post;
/// the other facts have their message already), a scalar subquery each so that no plan
/// hashes the whole list for it. `$1`: replies to posts never listed, and facts waiting for a
/// message never listed (a plain wait: no reason, as a wait for the message to change has),
/// are given up on once received before it (leased once more: the applier keeps them as
/// unmatched unless the log has the message after all).
pub const LEASE: &str = "UPDATE webhook_inbox w SET locked_until = now() + interval '60 seconds', \
       waiting = false, \
       message_id = COALESCE(w.message_id, (SELECT p.message_id FROM message_list p \
           WHERE p.provider_message_id = w.payload->>'answered_post' \
             AND p.channel = w.payload->>'channel' AND p.direction = 'outbound' LIMIT 1)), \
       waiting_after = (SELECT m.last_sequence FROM message_list m \
           WHERE m.message_id = COALESCE(w.message_id, (SELECT p.message_id FROM message_list p \
             WHERE p.provider_message_id = w.payload->>'answered_post' \
               AND p.channel = w.payload->>'channel' AND p.direction = 'outbound' LIMIT 1))) \
     WHERE w.id = ANY(ARRAY( \
       SELECT i.id FROM webhook_inbox i \
       WHERE i.status = 'pending' \
         AND (i.locked_until IS NULL OR i.locked_until < now()) \
         AND (NOT i.waiting OR EXISTS \
           (SELECT 1 FROM message_list m WHERE m.message_id = i.message_id \
              AND m.last_sequence > COALESCE(i.waiting_after, 0)) \
           OR (i.message_id IS NULL AND (i.received_at < $1 OR COALESCE( \
             (SELECT true FROM message_list m \
              WHERE m.provider_message_id = i.payload->>'answered_post' \
                AND m.channel = i.payload->>'channel' \
                AND m.direction = 'outbound' LIMIT 1), false))) \
           OR (i.received_at < $1 AND i.message_id IS NOT NULL AND i.reason IS NULL AND NOT EXISTS \
             (SELECT 1 FROM message_list m WHERE m.message_id = i.message_id))) \
       ORDER BY i.occurred_at, i.id LIMIT 500 FOR UPDATE SKIP LOCKED)) \
     RETURNING w.id, w.event_id, w.message_id, w.kind, w.occurred_at, w.received_at, \
               w.payload, w.locked_until";

/// Run before [`LEASE`] in its transaction: no plan of it may scan a table. The lease is
/// prepared once per pooled connection, and after five runs PostgreSQL may keep a generic plan
/// for it. One made while the inbox was empty (an applier looks at least every 2 s, and every
/// 100 ms while events are appended) scanned the whole inbox for the facts it had picked: when
/// the lease was a join back to the inbox, once for each of them (0.3 to 1.2 s a lease once
/// 20k facts had come in, in the bench's full run: 1.7k facts applied a second instead of 5k
/// to 8k), and as `= ANY` still once a lease, in an inbox that keeps every fact. With
/// sequential scans off every plan finds them by key (a test shows the kept plan without this
/// setting). Custom plans were tried too: planned for an inbox whose statistics said it was
/// empty, one read every pending fact and sorted them.
const LEASE_SETTINGS: &str = "SET LOCAL enable_seqscan = off";

/// A transaction on `conn` for [`LEASE`], with [`LEASE_SETTINGS`] (the store's lease runs in
/// one; a test plans the lease in one). On a connection already in a transaction it is a
/// savepoint, and the setting lasts until the outer transaction ends (unless the savepoint is
/// rolled back).
pub async fn begin_lease(
    conn: &mut sqlx::PgConnection,
) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, sqlx::Error> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    sqlx::query(LEASE_SETTINGS).execute(&mut *tx).await?;
    Ok(tx)
}

pub(super) async fn lease(
    pool: &PgPool,
    gave_up_before: DateTime<Utc>,
) -> Result<Vec<PendingFact>, StoreError> {
    // One short transaction: the facts are applied with no transaction open, since the
    // commands append events and an open transaction older than them would hold back every
    // log reader. A leased fact is no longer waiting (if its lease runs out unsettled, it is
    // leased again as any other), and keeps the sequence listed now for a `Wait` settlement. A
    // reply that names only the post it answers takes the message of that post once it is
    // listed, kept on the row: from then on it waits on its message like any other fact.
    let mut conn = pool.acquire().await?;
    let mut tx = begin_lease(&mut conn).await?;
    let rows: Vec<PendingRow> = sqlx::query_as(LEASE)
        .bind(gave_up_before)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows
        .into_iter()
        .map(|r| PendingFact {
            id: r.id,
            event_id: r.event_id,
            message_id: r.message_id.map(MessageId::from_uuid),
            kind: FactKind::parse(&r.kind),
            occurred_at: r.occurred_at,
            received_at: r.received_at,
            payload: r.payload,
            leased_until: r.locked_until,
        })
        .collect())
}

pub(super) async fn settle(
    pool: &PgPool,
    settled: &[(FactLease, FactSettlement)],
) -> Result<(), StoreError> {
    if settled.is_empty() {
        return Ok(());
    }
    let (mut ids, mut statuses, mut waits, mut reasons) = (vec![], vec![], vec![], vec![]);
    let mut leases = Vec::with_capacity(settled.len());
    for (lease, settlement) in settled {
        let (status, waiting, reason) = match settlement {
            FactSettlement::Applied => ("applied", false, None),
            FactSettlement::Unmatched(reason) => ("unmatched", false, Some(reason.clone())),
            FactSettlement::Retry(reason) => ("pending", false, Some(reason.clone())),
            FactSettlement::Wait(reason) => ("pending", true, reason.clone()),
        };
        ids.push(lease.id);
        leases.push(lease.until);
        statuses.push(status);
        waits.push(waiting);
        reasons.push(reason);
    }
    // One statement for the whole round. A waiting fact keeps the sequence its lease saw:
    // the message may have changed while the applier decided, and a fact waiting for a change
    // already made would wait for ever.
    sqlx::query(
        "UPDATE webhook_inbox w SET status = u.status, waiting = u.waiting, reason = u.reason, \
           locked_until = NULL, \
           applied_at = CASE WHEN u.status = 'applied' THEN now() END, \
           waiting_after = CASE WHEN u.waiting THEN w.waiting_after END \
         FROM unnest($1::bigint[], $2::text[], $3::bool[], $4::text[], $5::timestamptz[]) \
           AS u(id, status, waiting, reason, leased_until) \
         WHERE w.id = u.id AND w.locked_until = u.leased_until",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&waits)
    .bind(&reasons)
    .bind(&leases)
    .execute(pool)
    .await?;
    Ok(())
}

pub(super) async fn problems(
    pool: &PgPool,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Problematic>, StoreError> {
    let rows: Vec<crate::store::ProblemRow> = sqlx::query_as(
        "SELECT id, provider, event_id, message_id, kind, status, reason, occurred_at, received_at, payload \
         FROM webhook_inbox WHERE status IN ('unmatched', 'malformed') \
           AND ($1::bigint IS NULL OR id < $1) \
         ORDER BY id DESC LIMIT $2",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Problematic::from).collect())
}
