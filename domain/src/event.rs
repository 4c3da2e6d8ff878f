//! Events: past-tense facts about one message. Their type names and versions are permanent;
//! a payload changes through an upcaster, never by renaming.

use crate::channel::{Channel, Provider};
use crate::ids::{MessageId, ServiceId};
use crate::values::Profile;
use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

/// What a provider said about delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum DeliveryOutcome {
    /// Accepted for processing (SendGrid `processed`): recorded, changes no state.
    Processed,
    Deferred {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        response: Option<String>,
    },
    Delivered {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        response: Option<String>,
    },
    Bounced {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// `bounce` or `blocked`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bounce_type: Option<String>,
    },
    Dropped {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Composed {
    pub id: MessageId,
    pub service_id: ServiceId,
    pub channel: Channel,
    pub provider: Provider,
    pub from: Profile,
    pub to: Vec<Profile>,
    pub subject: Option<String>,
    pub text: Option<String>,
    pub html: Option<String>,
    pub link: Option<String>,
    pub in_reply_to: Option<String>,
    pub composed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Received {
    pub id: MessageId,
    pub service_id: ServiceId,
    pub channel: Channel,
    pub provider: Provider,
    pub from: Profile,
    pub to: Vec<Profile>,
    pub subject: Option<String>,
    pub text: Option<String>,
    /// Our message this one answers, when it answers one.
    pub in_reply_to: Option<MessageId>,
    pub provider_message_id: Option<String>,
    pub received_at: DateTime<Utc>,
}

/// Every event of the Message aggregate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageEvent {
    MessageComposed(Composed),
    MessageReceived(Received),
    MessageScheduled {
        publish_at: DateTime<Utc>,
        scheduled_at: DateTime<Utc>,
    },
    MessageQueued {
        queued_at: DateTime<Utc>,
    },
    MessageCancelled {
        cancelled_at: DateTime<Utc>,
    },
    SendAttemptStarted {
        attempt: u32,
        started_at: DateTime<Utc>,
    },
    MessageSent {
        provider_message_id: Option<String>,
        sent_at: DateTime<Utc>,
    },
    SendAttemptFailed {
        attempt: u32,
        reason: String,
        /// When the next attempt is due; `None` when this was the last one.
        retry_at: Option<DateTime<Utc>>,
        failed_at: DateTime<Utc>,
    },
    MessageFailed {
        reason: String,
        failed_at: DateTime<Utc>,
    },
    /// An attempt started but never called (the service stopped first): as if it had not
    /// been started, so it counts as no attempt, and the message may be sent again at once.
    SendAttemptAbandoned {
        attempt: u32,
        reason: String,
        abandoned_at: DateTime<Utc>,
    },
    /// The request may have reached the provider but no answer came: never retried blindly.
    SendOutcomeUnknown {
        attempt: u32,
        reason: String,
        at: DateTime<Utc>,
    },
    /// An unknown outcome was settled as "not posted": the message may be sent again.
    SendRetryRequested {
        requested_at: DateTime<Utc>,
    },
    DeliveryRecorded {
        fact_id: String,
        #[serde(flatten)]
        outcome: DeliveryOutcome,
        occurred_at: DateTime<Utc>,
    },
    OpenRecorded {
        fact_id: String,
        machine_open: bool,
        occurred_at: DateTime<Utc>,
    },
    ClickRecorded {
        fact_id: String,
        url: Option<String>,
        occurred_at: DateTime<Utc>,
    },
    ReplyRecorded {
        fact_id: String,
        reply_message_id: Option<MessageId>,
        from: Profile,
        occurred_at: DateTime<Utc>,
    },
    SpamReportRecorded {
        fact_id: String,
        occurred_at: DateTime<Utc>,
    },
    UnsubscribeRecorded {
        fact_id: String,
        group_id: Option<i64>,
        occurred_at: DateTime<Utc>,
    },
}

impl MessageEvent {
    /// The permanent type name stored beside the payload.
    pub fn type_name(&self) -> &'static str {
        match self {
            MessageEvent::MessageComposed(_) => "MessageComposed",
            MessageEvent::MessageReceived(_) => "MessageReceived",
            MessageEvent::MessageScheduled { .. } => "MessageScheduled",
            MessageEvent::MessageQueued { .. } => "MessageQueued",
            MessageEvent::MessageCancelled { .. } => "MessageCancelled",
            MessageEvent::SendAttemptStarted { .. } => "SendAttemptStarted",
            MessageEvent::MessageSent { .. } => "MessageSent",
            MessageEvent::SendAttemptFailed { .. } => "SendAttemptFailed",
            MessageEvent::MessageFailed { .. } => "MessageFailed",
            MessageEvent::SendAttemptAbandoned { .. } => "SendAttemptAbandoned",
            MessageEvent::SendOutcomeUnknown { .. } => "SendOutcomeUnknown",
            MessageEvent::SendRetryRequested { .. } => "SendRetryRequested",
            MessageEvent::DeliveryRecorded { .. } => "DeliveryRecorded",
            MessageEvent::OpenRecorded { .. } => "OpenRecorded",
            MessageEvent::ClickRecorded { .. } => "ClickRecorded",
            MessageEvent::ReplyRecorded { .. } => "ReplyRecorded",
            MessageEvent::SpamReportRecorded { .. } => "SpamReportRecorded",
            MessageEvent::UnsubscribeRecorded { .. } => "UnsubscribeRecorded",
        }
    }

    /// When the fact happened: the provider's time where one exists.
    pub fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            MessageEvent::MessageComposed(c) => c.composed_at,
            MessageEvent::MessageReceived(r) => r.received_at,
            MessageEvent::MessageScheduled { scheduled_at, .. } => *scheduled_at,
            MessageEvent::MessageQueued { queued_at } => *queued_at,
            MessageEvent::MessageCancelled { cancelled_at } => *cancelled_at,
            MessageEvent::SendAttemptStarted { started_at, .. } => *started_at,
            MessageEvent::MessageSent { sent_at, .. } => *sent_at,
            MessageEvent::SendAttemptFailed { failed_at, .. } => *failed_at,
            MessageEvent::MessageFailed { failed_at, .. } => *failed_at,
            MessageEvent::SendAttemptAbandoned { abandoned_at, .. } => *abandoned_at,
            MessageEvent::SendOutcomeUnknown { at, .. } => *at,
            MessageEvent::SendRetryRequested { requested_at } => *requested_at,
            MessageEvent::DeliveryRecorded { occurred_at, .. }
            | MessageEvent::OpenRecorded { occurred_at, .. }
            | MessageEvent::ClickRecorded { occurred_at, .. }
            | MessageEvent::ReplyRecorded { occurred_at, .. }
            | MessageEvent::SpamReportRecorded { occurred_at, .. }
            | MessageEvent::UnsubscribeRecorded { occurred_at, .. } => *occurred_at,
        }
    }
}

impl DomainEvent for MessageEvent {
    fn event_type(&self) -> String {
        self.type_name().to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}
