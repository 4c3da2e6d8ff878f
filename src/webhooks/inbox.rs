//! The webhook inbox: provider facts recorded durably before we answer, then applied to their
//! messages by the [`applier`](super::applier).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

/// What a provider told us, normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxFact {
    pub provider: &'static str,
    /// The provider's id for this fact (SendGrid's `sg_event_id`, a reply's id): re-sends of
    /// the same fact are dropped by it.
    pub event_id: String,
    pub message_id: Option<uuid::Uuid>,
    pub kind: FactKind,
    pub occurred_at: DateTime<Utc>,
    pub payload: Value,
    /// Set when the fact names no message of ours or cannot be read: kept for inspection.
    pub problem: Option<Problem>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    Unmatched,
    Malformed,
}

/// The kinds of fact the applier knows how to record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactKind {
    Processed,
    Deferred,
    Delivered,
    Bounced,
    Dropped,
    Open,
    Click,
    SpamReport,
    Unsubscribe,
    Reply,
    /// Anything else: kept, never applied.
    Other,
}

impl FactKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            FactKind::Processed => "processed",
            FactKind::Deferred => "deferred",
            FactKind::Delivered => "delivered",
            FactKind::Bounced => "bounced",
            FactKind::Dropped => "dropped",
            FactKind::Open => "open",
            FactKind::Click => "click",
            FactKind::SpamReport => "spam_report",
            FactKind::Unsubscribe => "unsubscribe",
            FactKind::Reply => "reply",
            FactKind::Other => "other",
        }
    }

    pub fn parse(s: &str) -> FactKind {
        [
            FactKind::Processed,
            FactKind::Deferred,
            FactKind::Delivered,
            FactKind::Bounced,
            FactKind::Dropped,
            FactKind::Open,
            FactKind::Click,
            FactKind::SpamReport,
            FactKind::Unsubscribe,
            FactKind::Reply,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .unwrap_or(FactKind::Other)
    }
}

/// Records a batch in one transaction and one statement; returns how many were new (re-sends
/// of a fact already recorded are dropped). The caller answers 2xx only after this returns.
pub async fn record(pool: &PgPool, facts: &[InboxFact]) -> Result<u64, sqlx::Error> {
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
        payloads.push(f.payload.clone());
        let (status, reason) = match f.problem {
            None => ("pending", None),
            Some(Problem::Unmatched) => ("unmatched", Some(unmatched_reason(f))),
            Some(Problem::Malformed) => (
                "malformed",
                f.payload
                    .get("_error")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            ),
        };
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

fn unmatched_reason(f: &InboxFact) -> String {
    match (f.kind, f.message_id) {
        (FactKind::Other, _) => format!("unknown {} event type", f.provider),
        (_, None) => "the payload names no message of ours".into(),
        (_, Some(id)) => format!("message {id} cannot take this fact"),
    }
}

/// Unmatched and malformed input, newest first, for `GET /v1/webhooks/unmatched`.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct Problematic {
    pub id: i64,
    pub provider: String,
    pub event_id: String,
    pub message_id: Option<uuid::Uuid>,
    pub kind: String,
    pub status: String,
    pub reason: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub payload: Value,
}

pub async fn problems(
    pool: &PgPool,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Problematic>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, provider, event_id, message_id, kind, status, reason, occurred_at, received_at, payload \
         FROM webhook_inbox WHERE status IN ('unmatched', 'malformed') \
           AND ($1::bigint IS NULL OR id < $1) \
         ORDER BY id DESC LIMIT $2",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}
