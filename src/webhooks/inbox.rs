//! The webhook inbox: provider facts recorded durably before we answer, then applied to their
//! messages by the [`applier`](super::applier).

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::Digest;

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
    pub payload: Payload,
    /// Set when the fact names no message of ours or cannot be read: kept for inspection.
    pub problem: Option<Problem>,
}

/// A fact's payload as JSON text: the provider's own text of it when it came as one JSON value
/// (a SendGrid event whose numbers are integers: see `sendgrid::parse_event`), else the value
/// we read or built from what it sent. Kept as text so that a batch
/// is stored without writing every event out again, twice, and copying it once: the
/// endpoint's own work on a batch of 1000 went from 3.4 to 1.8 ms.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(transparent)]
pub struct Payload(Box<RawValue>);

impl Payload {
    /// The provider's text of one JSON value, as it came.
    pub fn raw(raw: Box<RawValue>) -> Self {
        Self(raw)
    }

    pub fn from_value(value: &Value) -> Self {
        // Writing a `Value` out cannot fail (its keys are strings); `null` stands in anyway.
        Self(serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned()))
    }

    pub fn text(&self) -> &str {
        self.0.get()
    }

    /// The payload read as a value.
    pub fn value(&self) -> Value {
        serde_json::from_str(self.0.get()).unwrap_or(Value::Null)
    }

    /// Whether a key or a string of it holds a NUL. JSON text can only write one escaped, so
    /// the text is searched first and read as a value only when an escape may be one.
    fn has_nul(&self) -> bool {
        self.text().contains("\\u0000") && has_nul(&self.value())
    }
}

/// Two payloads are the same when their texts are.
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.text() == other.text()
    }
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

    /// Where the kind comes in an email's life, for facts of the same time (SendGrid's times
    /// are whole seconds: a machine open often shares its second with the delivery): applied
    /// in this order, the same facts leave the same state changes in the feed whatever order
    /// they came in.
    pub fn lifecycle_order(&self) -> u8 {
        match self {
            FactKind::Processed => 0,
            FactKind::Deferred => 1,
            FactKind::Delivered | FactKind::Bounced | FactKind::Dropped => 2,
            FactKind::Open => 3,
            FactKind::Click => 4,
            FactKind::Reply => 5,
            FactKind::SpamReport | FactKind::Unsubscribe => 6,
            FactKind::Other => 7,
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

/// What stands in for a NUL in a provider's text: PostgreSQL's `text` and `jsonb` cannot hold
/// one, and a batch holding one was refused whole (answered 500, re-sent and refused again).
const NUL_STANDIN: &str = "\u{fffd}";

/// The longest event id stored as it came, in bytes. Ids are unique per provider through a
/// btree index, which refuses an entry over about 2.7 KB, and a batch holding one was refused
/// whole. Providers' own ids are far shorter; an inbound email's `Message-ID` is whatever its
/// sender wrote. A longer id is stored as its SHA-256, so that duplicates stay duplicates.
const MOST_EVENT_ID: usize = 256;

fn storable_id(id: &str) -> String {
    let id = id.replace('\0', NUL_STANDIN);
    if id.len() <= MOST_EVENT_ID {
        return id;
    }
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(id.as_bytes()))
    )
}

impl InboxFact {
    /// The facts as they can be stored: every NUL in an id or the payload (a key or a string)
    /// replaced by U+FFFD, and an id longer than [`MOST_EVENT_ID`] by its hash. Borrowed when
    /// there is none, as there nearly never is.
    pub fn storable(facts: &[InboxFact]) -> std::borrow::Cow<'_, [InboxFact]> {
        if !facts.iter().any(|f| {
            f.event_id.contains('\0') || f.event_id.len() > MOST_EVENT_ID || f.payload.has_nul()
        }) {
            return std::borrow::Cow::Borrowed(facts);
        }
        let mut facts = facts.to_vec();
        for f in &mut facts {
            f.event_id = storable_id(&f.event_id);
            if f.payload.has_nul() {
                let mut value = f.payload.value();
                without_nul(&mut value);
                f.payload = Payload::from_value(&value);
            }
        }
        std::borrow::Cow::Owned(facts)
    }

    /// The status and reason its inbox row is recorded with: `pending` when it has no
    /// problem, `unmatched` with why, or `malformed` with the parse error (if the payload
    /// carries one in `_error`).
    pub fn stored_status(&self) -> (&'static str, Option<String>) {
        match self.problem {
            None => ("pending", None),
            Some(Problem::Unmatched) => ("unmatched", Some(unmatched_reason(self))),
            Some(Problem::Malformed) => (
                "malformed",
                self.payload
                    .value()
                    .get("_error")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            ),
        }
    }
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn without_nul(value: &mut Value) {
    match value {
        Value::String(s) => *s = s.replace('\0', NUL_STANDIN),
        Value::Array(items) => items.iter_mut().for_each(without_nul),
        Value::Object(map) => {
            let entries = std::mem::take(map);
            for (k, mut v) in entries {
                without_nul(&mut v);
                map.insert(k.replace('\0', NUL_STANDIN), v);
            }
        }
        _ => {}
    }
}

fn unmatched_reason(f: &InboxFact) -> String {
    match (f.kind, f.message_id) {
        (FactKind::Other, _) => format!("unknown {} event type", f.provider),
        (_, None) => "the payload names no message of ours".into(),
        (_, Some(id)) => format!("message {id} cannot take this fact"),
    }
}

/// Unmatched and malformed input, newest first, for `GET /v1/webhooks/unmatched`.
#[derive(Debug, serde::Serialize)]
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
