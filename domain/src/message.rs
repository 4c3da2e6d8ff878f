//! The Message aggregate: `decide` checks a command against the current state and returns the
//! events it causes; `apply` folds an event into the state. Both are pure.

use crate::channel::{Channel, Direction, Provider};
use crate::command::{Compose, Dispatch, Fact, MessageCommand, Receive};
use crate::event::{Composed, DeliveryOutcome, MessageEvent, Received};
use crate::ids::{MessageId, ServiceId};
use crate::state::MessageState;
use crate::values::Profile;
use chrono::{DateTime, SubsecRound, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Why a command was refused. Match on it: each variant maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("no such message")]
    NotFound,
    #[error("the message already exists")]
    AlreadyExists,
    #[error("cannot {action} a message that is {state}")]
    InvalidTransition {
        action: &'static str,
        state: MessageState,
    },
    #[error("cannot {action} on {channel}")]
    NotSupportedOnChannel {
        action: &'static str,
        channel: Channel,
    },
    #[error("publish_at ({publish_at}) must be in the future")]
    ScheduleInPast { publish_at: DateTime<Utc> },
    /// Times are RFC 3339 with four-digit years everywhere they are stored and compared
    /// (the embedded store compares them as text, where `+10000-...` sorts before `2026-...`).
    #[error("publish_at ({publish_at}) must be before the year 10000")]
    ScheduleTooFar { publish_at: DateTime<Utc> },
    #[error("the message was rescheduled: it is no longer due at {expected}")]
    StaleSchedule { expected: DateTime<Utc> },
}

/// What is known of one message: the fold of its events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageData {
    pub id: MessageId,
    pub service_id: ServiceId,
    pub channel: Channel,
    pub provider: Provider,
    pub direction: Direction,
    pub from: Profile,
    pub to: Vec<Profile>,
    pub subject: Option<String>,
    pub text: Option<String>,
    pub html: Option<String>,
    pub link: Option<String>,
    pub in_reply_to: Option<String>,
    /// The state set by our own lifecycle (draft, scheduled, pending, failed, cancelled,
    /// received).
    pub lifecycle: MessageState,
    /// The highest-ranked provider-reported state so far, if any: it outranks the lifecycle.
    pub reported: Option<MessageState>,
    pub state: MessageState,
    pub previous_state: Option<MessageState>,
    pub publish_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
    pub provider_message_id: Option<String>,
    pub attempts: u32,
    pub attempt_in_progress: bool,
    /// When the last attempt started (while `attempt_in_progress`, when the open one did).
    /// Absent from folds stored before it was kept.
    #[serde(default)]
    pub attempt_started_at: Option<DateTime<Utc>>,
    pub outcome_unknown: bool,
    pub last_error: Option<String>,
    pub opens: u32,
    pub clicks: u32,
    pub replies: u32,
    /// Provider event ids already recorded: a duplicate changes nothing. The aggregate's
    /// own (its commands decide by it); the message list stores its folds without them.
    #[serde(default)]
    pub seen_facts: BTreeSet<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The aggregate. `None` until the message is composed or received.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    data: Option<MessageData>,
}

impl From<MessageData> for Message {
    /// Restores a message from a stored fold (a read model's copy).
    fn from(data: MessageData) -> Self {
        Self { data: Some(data) }
    }
}

impl Message {
    /// The aggregate type name stored with every event.
    pub const TYPE_NAME: &'static str = "Message";

    /// The version of the fold a stored snapshot of a message was made by. Raise it whenever
    /// [`Message::apply_event`] would fold the same events into a different message, or the
    /// message's serialized shape changes: snapshots of any other version are then ignored
    /// (and replaced), and messages are folded from their events again.
    pub const FOLD_VERSION: i32 = 1;

    pub fn data(&self) -> Option<&MessageData> {
        self.data.as_ref()
    }

    pub fn state(&self) -> Option<MessageState> {
        self.data.as_ref().map(|d| d.state)
    }

    /// Checks `command` and returns the events it causes. An empty list means the command was
    /// already satisfied (a duplicate provider fact, a repeated cancel): nothing to record.
    pub fn decide(&self, command: MessageCommand) -> Result<Vec<MessageEvent>, MessageError> {
        if let MessageCommand::Batch(commands) = command {
            let mut state = self.clone();
            let mut events = Vec::new();
            for command in commands {
                for event in state.decide(command)? {
                    state.apply_event(event.clone());
                    events.push(event);
                }
            }
            return Ok(events);
        }
        let action = command.action();
        let data = match (&self.data, command) {
            (None, MessageCommand::Compose(c)) => return decide_compose(c),
            (None, MessageCommand::Receive(r)) => return Ok(vec![received(r)]),
            (None, _) => return Err(MessageError::NotFound),
            (Some(_), MessageCommand::Compose(_) | MessageCommand::Receive(_)) => {
                return Err(MessageError::AlreadyExists)
            }
            (Some(d), command) => (d, command),
        };
        let (d, command) = data;
        let invalid = || MessageError::InvalidTransition {
            action,
            state: d.state,
        };
        if d.direction == Direction::Inbound {
            return Err(invalid());
        }
        // Before the provider is called, a message can still be changed.
        let changeable = matches!(
            d.lifecycle,
            MessageState::Draft | MessageState::Scheduled | MessageState::Pending
        ) && d.attempts == 0
            && !d.attempt_in_progress;
        match command {
            MessageCommand::Compose(_) | MessageCommand::Receive(_) => {
                Err(MessageError::AlreadyExists)
            }
            // Handled above, before the state is looked at.
            MessageCommand::Batch(_) => Ok(vec![]),
            MessageCommand::Schedule { publish_at, now } => {
                let publish_at = storage_precision(publish_at);
                if !changeable {
                    return Err(invalid());
                }
                check_publish_at(publish_at, now)?;
                Ok(vec![MessageEvent::MessageScheduled {
                    publish_at,
                    scheduled_at: now,
                }])
            }
            MessageCommand::Send {
                now,
                expected_publish_at,
            } => {
                if let Some(expected) = expected_publish_at {
                    if d.lifecycle != MessageState::Scheduled || d.publish_at != Some(expected) {
                        return Err(MessageError::StaleSchedule { expected });
                    }
                }
                match d.lifecycle {
                    MessageState::Pending if changeable => Ok(vec![]),
                    MessageState::Draft | MessageState::Scheduled => {
                        Ok(vec![MessageEvent::MessageQueued { queued_at: now }])
                    }
                    _ => Err(invalid()),
                }
            }
            MessageCommand::Cancel { now } => {
                if d.lifecycle == MessageState::Cancelled {
                    return Ok(vec![]);
                }
                if !changeable {
                    return Err(invalid());
                }
                Ok(vec![MessageEvent::MessageCancelled { cancelled_at: now }])
            }
            MessageCommand::StartSendAttempt { now, attempt } => {
                // Sent (its lifecycle stays pending: the provider's reports take over) is as
                // final as a fact: a sender that read the message before another one sent it
                // must not send it again. Nor may one that read it before another attempt.
                if attempt != d.attempts + 1
                    || d.lifecycle != MessageState::Pending
                    || d.sent_at.is_some()
                    || d.attempt_in_progress
                    || d.outcome_unknown
                    || d.provider_has_it()
                {
                    return Err(invalid());
                }
                Ok(vec![MessageEvent::SendAttemptStarted {
                    attempt: d.attempts + 1,
                    started_at: now,
                }])
            }
            MessageCommand::RecordSent {
                provider_message_id,
                at,
            } => {
                if d.sent_at.is_some() {
                    return Ok(vec![]);
                }
                if d.attempts == 0 {
                    return Err(invalid());
                }
                Ok(vec![MessageEvent::MessageSent {
                    provider_message_id,
                    sent_at: at,
                }])
            }
            MessageCommand::RecordSendFailure {
                attempt,
                reason,
                retry_at,
                at,
            } => {
                if !d.attempt_in_progress || d.attempts != attempt {
                    return Err(invalid());
                }
                let mut events = vec![MessageEvent::SendAttemptFailed {
                    attempt: d.attempts,
                    reason: reason.clone(),
                    retry_at,
                    failed_at: at,
                }];
                if retry_at.is_none() {
                    events.push(MessageEvent::MessageFailed {
                        reason,
                        failed_at: at,
                    });
                }
                Ok(events)
            }
            MessageCommand::AbandonSendAttempt {
                attempt,
                reason,
                at,
            } => {
                if !d.attempt_in_progress || d.attempts != attempt {
                    return Err(invalid());
                }
                Ok(vec![MessageEvent::SendAttemptAbandoned {
                    attempt: d.attempts,
                    reason,
                    abandoned_at: at,
                }])
            }
            MessageCommand::RecordSendOutcomeUnknown {
                attempt,
                reason,
                at,
            } => {
                if !d.attempt_in_progress || d.attempts != attempt {
                    return Err(invalid());
                }
                Ok(vec![MessageEvent::SendOutcomeUnknown {
                    attempt: d.attempts,
                    reason,
                    at,
                }])
            }
            MessageCommand::ResolveSendOutcome {
                posted,
                provider_message_id,
                send_again,
                at,
            } => {
                if !d.outcome_unknown {
                    return Err(invalid());
                }
                Ok(vec![if posted {
                    MessageEvent::MessageSent {
                        provider_message_id,
                        sent_at: at,
                    }
                } else if send_again {
                    MessageEvent::SendRetryRequested { requested_at: at }
                } else {
                    MessageEvent::MessageFailed {
                        reason: "not posted, and not to be sent again (resolved by hand)".into(),
                        failed_at: at,
                    }
                }])
            }
            MessageCommand::RecordDelivery { fact, outcome } => {
                d.check_fact(action, &fact, true)?;
                Ok(d.unseen(&fact, || MessageEvent::DeliveryRecorded {
                    fact_id: fact.fact_id.clone(),
                    outcome,
                    occurred_at: fact.occurred_at,
                }))
            }
            MessageCommand::RecordOpen { fact, machine_open } => {
                d.check_fact(action, &fact, true)?;
                Ok(d.unseen(&fact, || MessageEvent::OpenRecorded {
                    fact_id: fact.fact_id.clone(),
                    machine_open,
                    occurred_at: fact.occurred_at,
                }))
            }
            MessageCommand::RecordClick { fact, url } => {
                d.check_fact(action, &fact, true)?;
                Ok(d.unseen(&fact, || MessageEvent::ClickRecorded {
                    fact_id: fact.fact_id.clone(),
                    url,
                    occurred_at: fact.occurred_at,
                }))
            }
            MessageCommand::RecordReply {
                fact,
                reply_message_id,
                from,
            } => {
                d.check_fact(action, &fact, false)?;
                Ok(d.unseen(&fact, || MessageEvent::ReplyRecorded {
                    fact_id: fact.fact_id.clone(),
                    reply_message_id,
                    from,
                    occurred_at: fact.occurred_at,
                }))
            }
            MessageCommand::RecordSpamReport { fact } => {
                d.check_fact(action, &fact, true)?;
                Ok(d.unseen(&fact, || MessageEvent::SpamReportRecorded {
                    fact_id: fact.fact_id.clone(),
                    occurred_at: fact.occurred_at,
                }))
            }
            MessageCommand::RecordUnsubscribe { fact, group_id } => {
                d.check_fact(action, &fact, true)?;
                Ok(d.unseen(&fact, || MessageEvent::UnsubscribeRecorded {
                    fact_id: fact.fact_id.clone(),
                    group_id,
                    occurred_at: fact.occurred_at,
                }))
            }
        }
    }

    /// Folds one event into the state.
    pub fn apply_event(&mut self, event: MessageEvent) {
        if let Some(d) = self.data.as_mut() {
            let before = d.state;
            d.apply(&event);
            d.state = d.reported.unwrap_or(d.lifecycle);
            if d.state != before {
                d.previous_state = Some(before);
            }
            return;
        }
        self.data = match event {
            MessageEvent::MessageComposed(c) => Some(MessageData::composed(c)),
            MessageEvent::MessageReceived(r) => Some(MessageData::received(r)),
            // Only the first event creates a message; nothing else can come first.
            _ => None,
        };
    }
}

/// A time to publish at: after `now`, and before the year 10000.
fn check_publish_at(publish_at: DateTime<Utc>, now: DateTime<Utc>) -> Result<(), MessageError> {
    use chrono::Datelike;
    if publish_at <= now {
        return Err(MessageError::ScheduleInPast { publish_at });
    }
    if publish_at.year() > 9999 {
        return Err(MessageError::ScheduleTooFar { publish_at });
    }
    Ok(())
}

fn decide_compose(c: Compose) -> Result<Vec<MessageEvent>, MessageError> {
    let m = c.message;
    let service = m.service();
    let mut events = vec![MessageEvent::MessageComposed(Composed {
        id: c.id,
        service_id: service.id,
        channel: service.channel,
        provider: service.provider,
        from: m.from().clone(),
        to: m.to().to_vec(),
        subject: m.subject().map(str::to_string),
        text: m.text().map(str::to_string),
        html: m.html().map(str::to_string),
        link: m.link().map(str::to_string),
        in_reply_to: m.in_reply_to().map(str::to_string),
        composed_at: c.now,
    })];
    match c.dispatch {
        Dispatch::Draft => {}
        Dispatch::At(publish_at) => {
            check_publish_at(publish_at, c.now)?;
            events.push(MessageEvent::MessageScheduled {
                publish_at: storage_precision(publish_at),
                scheduled_at: c.now,
            })
        }
        Dispatch::Now => events.push(MessageEvent::MessageQueued { queued_at: c.now }),
    }
    Ok(events)
}

/// Times the schedule compares are kept to the microsecond, the precision PostgreSQL stores:
/// the scheduler fires with the `publish_at` it read back, which must equal the recorded one.
fn storage_precision(at: DateTime<Utc>) -> DateTime<Utc> {
    at.trunc_subsecs(6)
}

fn received(r: Receive) -> MessageEvent {
    MessageEvent::MessageReceived(Received {
        id: r.id,
        service_id: r.service.id,
        channel: r.service.channel,
        provider: r.service.provider,
        from: r.from,
        to: vec![Profile::new(r.service.username, r.service.name)],
        subject: r.subject,
        text: r.text,
        in_reply_to: r.in_reply_to,
        provider_message_id: r.provider_message_id,
        received_at: r.received_at,
    })
}

impl MessageData {
    fn composed(c: Composed) -> Self {
        Self {
            id: c.id,
            service_id: c.service_id,
            channel: c.channel,
            provider: c.provider,
            direction: Direction::Outbound,
            from: c.from,
            to: c.to,
            subject: c.subject,
            text: c.text,
            html: c.html,
            link: c.link,
            in_reply_to: c.in_reply_to,
            lifecycle: MessageState::Draft,
            reported: None,
            state: MessageState::Draft,
            previous_state: None,
            publish_at: None,
            sent_at: None,
            provider_message_id: None,
            attempts: 0,
            attempt_in_progress: false,
            attempt_started_at: None,
            outcome_unknown: false,
            last_error: None,
            opens: 0,
            clicks: 0,
            replies: 0,
            seen_facts: BTreeSet::new(),
            created_at: c.composed_at,
            updated_at: c.composed_at,
        }
    }

    fn received(r: Received) -> Self {
        Self {
            id: r.id,
            service_id: r.service_id,
            channel: r.channel,
            provider: r.provider,
            direction: Direction::Inbound,
            from: r.from,
            to: r.to,
            subject: r.subject,
            text: r.text,
            html: None,
            link: None,
            in_reply_to: r.in_reply_to.map(|id| id.to_string()),
            lifecycle: MessageState::Received,
            reported: None,
            state: MessageState::Received,
            previous_state: None,
            publish_at: None,
            sent_at: None,
            provider_message_id: r.provider_message_id,
            attempts: 0,
            attempt_in_progress: false,
            attempt_started_at: None,
            outcome_unknown: false,
            last_error: None,
            opens: 0,
            clicks: 0,
            replies: 0,
            seen_facts: BTreeSet::new(),
            created_at: r.received_at,
            updated_at: r.received_at,
        }
    }

    /// A provider fact needs a message whose sending has started (the provider may report
    /// before our own record of its answer lands), and a channel that has such facts.
    fn check_fact(
        &self,
        action: &'static str,
        _fact: &Fact,
        email_only: bool,
    ) -> Result<(), MessageError> {
        if email_only && self.channel != Channel::Email {
            return Err(MessageError::NotSupportedOnChannel {
                action,
                channel: self.channel,
            });
        }
        if self.attempts == 0 {
            return Err(MessageError::InvalidTransition {
                action,
                state: self.state,
            });
        }
        Ok(())
    }

    /// The provider has reported something about the message (any fact: SendGrid's
    /// `processed`, which changes no state, says as much as `delivered` that it has it), so
    /// another attempt would send it twice.
    pub fn provider_has_it(&self) -> bool {
        !self.seen_facts.is_empty()
    }

    fn unseen(&self, fact: &Fact, event: impl FnOnce() -> MessageEvent) -> Vec<MessageEvent> {
        if self.seen_facts.contains(&fact.fact_id) {
            vec![]
        } else {
            vec![event()]
        }
    }

    /// Moves the reported state up, never down: the state is the highest-ranked fact.
    fn report(&mut self, state: MessageState) {
        let rank = |s: Option<MessageState>| s.and_then(|s| s.provider_rank()).unwrap_or(0);
        if rank(Some(state)) > rank(self.reported) {
            self.reported = Some(state);
        }
    }

    fn fact(&mut self, fact_id: &str, occurred_at: DateTime<Utc>) {
        self.seen_facts.insert(fact_id.to_string());
        self.touch(occurred_at);
    }

    fn touch(&mut self, at: DateTime<Utc>) {
        if at > self.updated_at {
            self.updated_at = at;
        }
    }

    fn apply(&mut self, event: &MessageEvent) {
        match event {
            MessageEvent::MessageComposed(_) | MessageEvent::MessageReceived(_) => {}
            MessageEvent::MessageScheduled {
                publish_at,
                scheduled_at,
            } => {
                self.lifecycle = MessageState::Scheduled;
                self.publish_at = Some(*publish_at);
                self.touch(*scheduled_at);
            }
            MessageEvent::MessageQueued { queued_at } => {
                self.lifecycle = MessageState::Pending;
                self.touch(*queued_at);
            }
            MessageEvent::MessageCancelled { cancelled_at } => {
                self.lifecycle = MessageState::Cancelled;
                self.touch(*cancelled_at);
            }
            MessageEvent::SendAttemptStarted {
                attempt,
                started_at,
            } => {
                self.attempts = *attempt;
                self.attempt_in_progress = true;
                self.attempt_started_at = Some(*started_at);
                self.touch(*started_at);
            }
            MessageEvent::MessageSent {
                provider_message_id,
                sent_at,
            } => {
                self.attempt_in_progress = false;
                self.outcome_unknown = false;
                self.sent_at = Some(*sent_at);
                if provider_message_id.is_some() {
                    self.provider_message_id.clone_from(provider_message_id);
                }
                self.report(MessageState::Sent);
                self.touch(*sent_at);
            }
            MessageEvent::SendAttemptFailed {
                reason, failed_at, ..
            } => {
                self.attempt_in_progress = false;
                self.last_error = Some(reason.clone());
                self.touch(*failed_at);
            }
            MessageEvent::SendAttemptAbandoned {
                attempt,
                abandoned_at,
                ..
            } => {
                // Counted as no attempt: the one before it (if any) is the last made.
                self.attempts = attempt.saturating_sub(1);
                self.attempt_in_progress = false;
                self.attempt_started_at = None;
                self.touch(*abandoned_at);
            }
            MessageEvent::MessageFailed { reason, failed_at } => {
                self.lifecycle = MessageState::Failed;
                // An unknown outcome given up is settled.
                self.outcome_unknown = false;
                self.last_error = Some(reason.clone());
                self.touch(*failed_at);
            }
            MessageEvent::SendOutcomeUnknown { reason, at, .. } => {
                self.attempt_in_progress = false;
                self.outcome_unknown = true;
                self.last_error = Some(reason.clone());
                self.touch(*at);
            }
            MessageEvent::SendRetryRequested { requested_at } => {
                self.outcome_unknown = false;
                self.touch(*requested_at);
            }
            MessageEvent::DeliveryRecorded {
                fact_id,
                outcome,
                occurred_at,
            } => {
                self.fact(fact_id, *occurred_at);
                match outcome {
                    DeliveryOutcome::Processed => {}
                    DeliveryOutcome::Deferred { .. } => self.report(MessageState::Deferred),
                    DeliveryOutcome::Delivered { .. } => self.report(MessageState::Delivered),
                    DeliveryOutcome::Bounced { .. } => self.report(MessageState::Bounced),
                    DeliveryOutcome::Dropped { .. } => self.report(MessageState::Dropped),
                }
            }
            MessageEvent::OpenRecorded {
                fact_id,
                occurred_at,
                ..
            } => {
                self.fact(fact_id, *occurred_at);
                self.opens += 1;
                self.report(MessageState::Opened);
            }
            MessageEvent::ClickRecorded {
                fact_id,
                occurred_at,
                ..
            } => {
                self.fact(fact_id, *occurred_at);
                self.clicks += 1;
                self.report(MessageState::Clicked);
            }
            MessageEvent::ReplyRecorded {
                fact_id,
                occurred_at,
                ..
            } => {
                self.fact(fact_id, *occurred_at);
                self.replies += 1;
                self.report(MessageState::Replied);
            }
            MessageEvent::SpamReportRecorded {
                fact_id,
                occurred_at,
            } => {
                self.fact(fact_id, *occurred_at);
                self.report(MessageState::SpamReported);
            }
            MessageEvent::UnsubscribeRecorded {
                fact_id,
                occurred_at,
                ..
            } => {
                self.fact(fact_id, *occurred_at);
                self.report(MessageState::Unsubscribed);
            }
        }
    }
}

impl Aggregate for Message {
    const TYPE: &'static str = Self::TYPE_NAME;
    type Command = MessageCommand;
    type Event = MessageEvent;
    type Error = MessageError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        self.apply_event(event);
    }
}
