//! Commands: what someone asks of a message. Everything external (the time, the service, the
//! provider's answer) is resolved before the command and carried in it.

use crate::builder::{OutboundMessage, ServiceRef};
use crate::event::DeliveryOutcome;
use crate::ids::MessageId;
use crate::values::Profile;
use chrono::{DateTime, Utc};

/// What to do with a message once composed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dispatch {
    /// Keep it as a draft.
    Draft,
    /// Send at this time.
    At(DateTime<Utc>),
    /// Queue it for sending now.
    Now,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compose {
    pub id: MessageId,
    pub message: OutboundMessage,
    pub dispatch: Dispatch,
    pub now: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receive {
    pub id: MessageId,
    pub service: ServiceRef,
    pub from: Profile,
    pub subject: Option<String>,
    pub text: Option<String>,
    pub in_reply_to: Option<MessageId>,
    pub provider_message_id: Option<String>,
    pub received_at: DateTime<Utc>,
}

/// A provider fact's identity and time: the provider's event id deduplicates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    pub fact_id: String,
    pub occurred_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageCommand {
    Compose(Compose),
    /// An inbound message from a profile to one of our services.
    Receive(Receive),
    Schedule {
        publish_at: DateTime<Utc>,
        now: DateTime<Utc>,
    },
    /// Queue for sending now. The scheduler passes the `publish_at` it fired for, so a
    /// reschedule that raced the firing wins.
    Send {
        now: DateTime<Utc>,
        expected_publish_at: Option<DateTime<Utc>>,
    },
    Cancel {
        now: DateTime<Utc>,
    },
    /// The sender is about to call the provider; from here on the message cannot be cancelled.
    /// `attempt` is the one it starts: one more than the attempts the sender read, so that a
    /// sender deciding on a read from before another worker's attempt (one that failed and
    /// waits for its retry) starts nothing.
    StartSendAttempt {
        now: DateTime<Utc>,
        attempt: u32,
    },
    RecordSent {
        provider_message_id: Option<String>,
        at: DateTime<Utc>,
    },
    /// A failed attempt; `retry_at: None` makes it final. `attempt` is the one it closes: only
    /// while that one is open (a worker recovering an attempt it read as abandoned must not
    /// close a later, live one).
    RecordSendFailure {
        attempt: u32,
        reason: String,
        retry_at: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    },
    /// `attempt` as for [`MessageCommand::RecordSendFailure`].
    RecordSendOutcomeUnknown {
        attempt: u32,
        reason: String,
        at: DateTime<Utc>,
    },
    /// The open attempt was never called (the service stopped first): undone, not failed.
    /// Only that attempt: a later one (another worker's, once a lease ran out) stays open.
    AbandonSendAttempt {
        attempt: u32,
        reason: String,
        at: DateTime<Utc>,
    },
    /// A person (or a check against the provider) settles an unknown outcome: the post was
    /// published (with its id when known), or it was not, and is sent again (`send_again`) or
    /// given up (failed).
    ResolveSendOutcome {
        posted: bool,
        provider_message_id: Option<String>,
        send_again: bool,
        at: DateTime<Utc>,
    },
    RecordDelivery {
        fact: Fact,
        outcome: DeliveryOutcome,
    },
    RecordOpen {
        fact: Fact,
        machine_open: bool,
    },
    RecordClick {
        fact: Fact,
        url: Option<String>,
    },
    RecordReply {
        fact: Fact,
        reply_message_id: Option<MessageId>,
        from: Profile,
    },
    RecordSpamReport {
        fact: Fact,
    },
    RecordUnsubscribe {
        fact: Fact,
        group_id: Option<i64>,
    },
    /// Several commands decided in turn, each against the state the previous ones left, and
    /// recorded together or not at all (a webhook batch's facts about one message).
    Batch(Vec<MessageCommand>),
}

impl MessageCommand {
    /// A short name for errors and logs.
    pub fn action(&self) -> &'static str {
        match self {
            MessageCommand::Compose(_) => "compose",
            MessageCommand::Receive(_) => "receive",
            MessageCommand::Schedule { .. } => "schedule",
            MessageCommand::Send { .. } => "send",
            MessageCommand::Cancel { .. } => "cancel",
            MessageCommand::StartSendAttempt { .. } => "start a send attempt",
            MessageCommand::RecordSent { .. } => "record sent",
            MessageCommand::RecordSendFailure { .. } => "record a send failure",
            MessageCommand::RecordSendOutcomeUnknown { .. } => "record an unknown send outcome",
            MessageCommand::AbandonSendAttempt { .. } => "abandon a send attempt of",
            MessageCommand::ResolveSendOutcome { .. } => "resolve the send outcome of",
            MessageCommand::RecordDelivery { .. } => "record a delivery",
            MessageCommand::RecordOpen { .. } => "record an open",
            MessageCommand::RecordClick { .. } => "record a click",
            MessageCommand::RecordReply { .. } => "record a reply",
            MessageCommand::RecordSpamReport { .. } => "record a spam report",
            MessageCommand::RecordUnsubscribe { .. } => "record an unsubscribe",
            MessageCommand::Batch(_) => "apply a batch to",
        }
    }
}
