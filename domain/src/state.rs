//! Message states and the rank that makes provider-reported states order-proof.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Every state a message can be in (see `CONTRACT.md`, "States").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageState {
    Draft,
    Scheduled,
    Pending,
    Sent,
    Failed,
    Cancelled,
    Deferred,
    Delivered,
    Opened,
    Clicked,
    Replied,
    Bounced,
    Dropped,
    SpamReported,
    Unsubscribed,
    Received,
}

impl MessageState {
    pub const ALL: [MessageState; 16] = [
        MessageState::Draft,
        MessageState::Scheduled,
        MessageState::Pending,
        MessageState::Sent,
        MessageState::Failed,
        MessageState::Cancelled,
        MessageState::Deferred,
        MessageState::Delivered,
        MessageState::Opened,
        MessageState::Clicked,
        MessageState::Replied,
        MessageState::Bounced,
        MessageState::Dropped,
        MessageState::SpamReported,
        MessageState::Unsubscribed,
        MessageState::Received,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            MessageState::Draft => "draft",
            MessageState::Scheduled => "scheduled",
            MessageState::Pending => "pending",
            MessageState::Sent => "sent",
            MessageState::Failed => "failed",
            MessageState::Cancelled => "cancelled",
            MessageState::Deferred => "deferred",
            MessageState::Delivered => "delivered",
            MessageState::Opened => "opened",
            MessageState::Clicked => "clicked",
            MessageState::Replied => "replied",
            MessageState::Bounced => "bounced",
            MessageState::Dropped => "dropped",
            MessageState::SpamReported => "spam_reported",
            MessageState::Unsubscribed => "unsubscribed",
            MessageState::Received => "received",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// The order-proof rank of a provider-reported state, `None` for lifecycle states
    /// (draft, scheduled, pending, failed, cancelled, received) that providers never report.
    ///
    /// `CONTRACT.md` ranks bounced and dropped equal. A state must be a function of the *set*
    /// of facts, so equal ranks need a fixed tie-break or the arrival order would decide:
    /// bounced ranks one step above dropped (a bounce is the later, more specific verdict).
    pub fn provider_rank(&self) -> Option<u8> {
        Some(match self {
            MessageState::Sent => 1,
            MessageState::Deferred => 2,
            MessageState::Delivered => 3,
            MessageState::Opened => 4,
            MessageState::Clicked => 5,
            MessageState::Replied => 6,
            MessageState::Unsubscribed => 7,
            MessageState::SpamReported => 8,
            MessageState::Dropped => 9,
            MessageState::Bounced => 10,
            _ => return None,
        })
    }
}

impl fmt::Display for MessageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
