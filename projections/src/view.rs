//! The message view the API shows: a copy of the aggregate's fold, never computed anew.

use chrono::{DateTime, Utc};
use messaging_domain::{Message, MessageData, MessageEvent, Profile};
use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MessageView {
    pub id: String,
    pub channel: &'static str,
    pub direction: &'static str,
    pub service_id: String,
    pub provider: &'static str,
    /// True when the service's provider is the offline sandbox.
    pub sandbox: bool,
    pub from: Profile,
    pub to: Vec<Profile>,
    pub subject: Option<String>,
    pub text: Option<String>,
    pub html: Option<String>,
    pub link: Option<String>,
    pub in_reply_to: Option<String>,
    pub state: &'static str,
    pub previous_state: Option<&'static str>,
    pub publish_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
    pub provider_message_id: Option<String>,
    pub attempts: u32,
    /// A provider call may have reached X or Facebook but no answer came: it is not retried;
    /// a person or a check decides.
    pub send_outcome_unknown: bool,
    pub last_error: Option<String>,
    pub opens: u32,
    pub clicks: u32,
    pub replies: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<&MessageData> for MessageView {
    fn from(d: &MessageData) -> Self {
        Self {
            id: d.id.to_string(),
            channel: d.channel.as_str(),
            direction: d.direction.as_str(),
            service_id: d.service_id.to_string(),
            provider: d.provider.as_str(),
            sandbox: d.provider == messaging_domain::Provider::Sandbox,
            from: d.from.clone(),
            to: d.to.clone(),
            subject: d.subject.clone(),
            text: d.text.clone(),
            html: d.html.clone(),
            link: d.link.clone(),
            in_reply_to: d.in_reply_to.clone(),
            state: d.state.as_str(),
            previous_state: d.previous_state.map(|s| s.as_str()),
            publish_at: d.publish_at,
            sent_at: d.sent_at,
            provider_message_id: d.provider_message_id.clone(),
            attempts: d.attempts,
            send_outcome_unknown: d.outcome_unknown,
            last_error: d.last_error.clone(),
            opens: d.opens,
            clicks: d.clicks,
            replies: d.replies,
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

/// One event of a message's history, with the state it left the message in.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HistoryItem {
    pub sequence: i64,
    #[serde(rename = "type")]
    pub event_type: &'static str,
    pub state: &'static str,
    pub previous_state: Option<&'static str>,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    /// The event's own facts (reason, provider id, url, ...).
    pub data: serde_json::Value,
}

/// Folds events into the message and its history: the state before and after each event.
pub fn history(
    events: impl IntoIterator<Item = (i64, MessageEvent, DateTime<Utc>)>,
) -> (Message, Vec<HistoryItem>) {
    history_from(Message::default(), events)
}

/// [`history`] of the events after those `message` was folded from.
pub fn history_from(
    mut message: Message,
    events: impl IntoIterator<Item = (i64, MessageEvent, DateTime<Utc>)>,
) -> (Message, Vec<HistoryItem>) {
    let mut items = Vec::new();
    for (sequence, event, recorded_at) in events {
        let before = message.state();
        let event_type = event.type_name();
        let occurred_at = event.occurred_at();
        let data = serde_json::to_value(&event)
            .ok()
            .and_then(|v| v.get(event_type).cloned())
            .unwrap_or(serde_json::Value::Null);
        message.apply_event(event);
        let Some(state) = message.state() else {
            continue;
        };
        items.push(HistoryItem {
            sequence,
            event_type,
            state: state.as_str(),
            previous_state: before.map(|s| s.as_str()),
            occurred_at,
            recorded_at,
            data,
        });
    }
    (message, items)
}
