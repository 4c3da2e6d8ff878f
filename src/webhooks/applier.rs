//! The applier: records each pending inbox fact on its message, in the provider's time order.
//! A fact for a message not known yet waits, and is applied once the message is listed. A reply
//! to a post that was not listed yet when it came (X and Facebook name the post, not our
//! message) waits for a post of ours with that provider id to be listed, for at most
//! [`WAIT_FOR_POST`]: the list may be behind, or being rebuilt. A fact naming a message that
//! never appears is given up on after as long.
//! Facts are claimed with `FOR UPDATE SKIP LOCKED`, so any number of instances can run.

use super::inbox::FactKind;
use crate::store::{CommandError, FactSettlement, PendingFact, Store, StoreError};
use chrono::{DateTime, Utc};
use messaging_domain::{
    Channel, DeliveryOutcome, Fact, MessageCommand, MessageError, MessageId, MessageState, Profile,
    Receive, ServiceRef,
};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What became of one fact.
#[derive(Clone)]
enum Applied {
    Done,
    /// The message is not known yet.
    Wait,
    /// The message cannot take the fact in its state yet (its sending has not started).
    WaitForChange(String),
    /// It can never apply; kept with the reason.
    Unmatched(String),
    /// A passing failure: try again later.
    Retry(String),
}

#[derive(Clone)]
pub struct Applier {
    store: Arc<dyn Store>,
}

/// How a command's result settles the facts it recorded.
fn classify(result: Result<(), CommandError>) -> Applied {
    match result {
        Ok(()) => Applied::Done,
        Err(CommandError::Rejected(MessageError::NotFound)) => Applied::Wait,
        // A cancelled message was never sent, and an inbound one is never sent: no change
        // will ever let them take a provider's fact about a send.
        Err(CommandError::Rejected(
            e @ MessageError::InvalidTransition {
                state: MessageState::Cancelled | MessageState::Received,
                ..
            },
        )) => Applied::Unmatched(format!("{e}: it was never sent, and never will be")),
        Err(CommandError::Rejected(e @ MessageError::InvalidTransition { .. })) => {
            Applied::WaitForChange(e.to_string())
        }
        Err(CommandError::Rejected(e)) => Applied::Unmatched(e.to_string()),
        Err(e) => Applied::Retry(e.to_string()),
    }
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

/// A reply's inbound message id: time-ordered like every message id, and derived from the
/// provider's id for the reply, so applying the same reply twice finds the same message.
fn inbound_id(event_id: &str, at: DateTime<Utc>) -> MessageId {
    let digest = Sha256::digest(event_id.as_bytes());
    let mut random = [0u8; 10];
    random.copy_from_slice(&digest[..10]);
    let millis = u64::try_from(at.timestamp_millis()).unwrap_or_default();
    MessageId::from_uuid(uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid())
}

/// How long a reply waits for the post it answers to be listed before it is kept as unmatched
/// (a reply to a post that is not ours, or not sent through this service, waits this long), and
/// a fact for a message we do not have waits for it.
pub const WAIT_FOR_POST: Duration = Duration::from_secs(3600);

/// The applier runs a round for new events at most this often (waiting facts are applied this
/// much later at most, after their message appears or changes).
const EVENTS_AT_MOST_EVERY: Duration = Duration::from_millis(100);

impl Applier {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Applies what is pending now; returns how many facts were settled.
    pub async fn run_once(&self) -> Result<usize, StoreError> {
        // Leased in one short step, then applied with no transaction open: the commands
        // append events, and an open transaction older than them would hold back every log
        // reader until it ended. A crashed applier's lease expires and the facts are retried
        // (applying a fact twice changes nothing: its id is remembered).
        let gave_up_before = crate::clock::now()
            - chrono::Duration::from_std(WAIT_FOR_POST).unwrap_or(chrono::Duration::MAX);
        let leased = self.store.lease_webhook_facts(gave_up_before).await?;
        if leased.is_empty() {
            return Ok(0);
        }
        let mut settled = 0;
        let mut settlements = Vec::with_capacity(leased.len());
        // Replies that name only the post they answer, and whose post is not listed yet.
        let mut pending = Vec::with_capacity(leased.len());
        for fact in leased {
            match Self::awaiting_post(&fact, gave_up_before) {
                None => pending.push(fact),
                Some(settlement) => {
                    if matches!(settlement, FactSettlement::Unmatched(_)) {
                        settled += 1;
                    }
                    settlements.push((fact.lease(), settlement));
                }
            }
        }
        pending.sort_by_key(|p| (p.occurred_at, p.kind.lifecycle_order(), p.id));
        for (fact, outcome) in self.apply_all(&pending).await {
            let settlement = match outcome {
                Applied::Done => FactSettlement::Applied,
                // A message that was never created (an event for another system's email on a
                // shared SendGrid account, say) would be waited for forever: given up on after
                // as long as a reply waits for its post, and shown as unmatched.
                Applied::Wait if fact.received_at < gave_up_before => {
                    FactSettlement::Unmatched(format!(
                        "no message of ours has id {} (waited {} minutes for it)",
                        fact.message_id.map(|m| m.to_string()).unwrap_or_default(),
                        WAIT_FOR_POST.as_secs() / 60
                    ))
                }
                Applied::Wait => FactSettlement::Wait(None),
                Applied::WaitForChange(reason) => FactSettlement::Wait(Some(reason)),
                Applied::Unmatched(reason) => FactSettlement::Unmatched(reason),
                Applied::Retry(reason) => {
                    tracing::warn!(inbox_id = fact.id, %reason, "webhook fact not applied yet");
                    FactSettlement::Retry(reason)
                }
            };
            if matches!(
                settlement,
                FactSettlement::Applied | FactSettlement::Unmatched(_)
            ) {
                settled += 1;
            }
            settlements.push((fact.lease(), settlement));
        }
        // One step for the whole round. A fact waiting on a known message waits for it to
        // change past the sequence listed when it was leased (not when settled: it may have
        // changed while this round decided).
        self.store.settle_webhook_facts(&settlements).await?;
        Ok(settled)
    }

    /// For a reply recorded with the post it answers but no message: the lease gives it the
    /// post's message once the post is listed, so one still without a message was leased
    /// because it has waited [`WAIT_FOR_POST`] (unmatched now), or just after the post was
    /// listed elsewhere (waits: the next lease finds it). `None` when the fact is ready to
    /// apply.
    fn awaiting_post(fact: &PendingFact, gave_up_before: DateTime<Utc>) -> Option<FactSettlement> {
        if fact.message_id.is_some() || fact.kind != FactKind::Reply {
            return None;
        }
        let post = text(&fact.payload, "answered_post")?;
        let channel = fact
            .payload
            .get("channel")
            .and_then(Value::as_str)
            .and_then(Channel::parse)?;
        Some(if fact.received_at < gave_up_before {
            FactSettlement::Unmatched(format!(
                "no post of ours has {channel} id {post} (waited {} minutes for it)",
                WAIT_FOR_POST.as_secs() / 60
            ))
        } else {
            FactSettlement::Wait(None)
        })
    }

    /// Applies facts in order. Each message's facts go in one batch command (one load of
    /// the message and one append, however many facts: a thousand opens, say), and every
    /// message's command of the round in one `execute_each` (one read and one append for the
    /// round, where the backend allows).
    async fn apply_all<'a>(&self, pending: &'a [PendingFact]) -> Vec<(&'a PendingFact, Applied)> {
        // Each message's facts together, still in the provider's time order (a stable sort).
        let mut pending: Vec<&PendingFact> = pending.iter().collect();
        pending.sort_by_key(|p| p.message_id);
        let mut outcomes = Vec::with_capacity(pending.len());
        let mut runs: Vec<(MessageId, Vec<(&PendingFact, MessageCommand)>)> = Vec::new();
        for p in pending {
            let command = match self.command_for(p).await {
                Ok(command) => command,
                Err(outcome) => {
                    outcomes.push((p, outcome));
                    continue;
                }
            };
            let Some(message_id) = p.message_id else {
                outcomes.push((
                    p,
                    Applied::Unmatched("the payload names no message of ours".into()),
                ));
                continue;
            };
            match runs.last_mut() {
                Some((id, run)) if *id == message_id => run.push((p, command)),
                _ => runs.push((message_id, vec![(p, command)])),
            }
        }
        let commands = runs
            .iter()
            .map(|(id, run)| {
                let command = match run.as_slice() {
                    [(_, only)] => only.clone(),
                    _ => MessageCommand::Batch(run.iter().map(|(_, c)| c.clone()).collect()),
                };
                (*id, command)
            })
            .collect();
        let results = self.store.execute_each(commands).await;
        for ((message_id, run), result) in runs.into_iter().zip(results) {
            match classify(result) {
                // One of several is refused: find which, one by one, so a bad fact never
                // costs the others.
                Applied::Unmatched(_) | Applied::WaitForChange(_) if run.len() > 1 => {
                    for (p, command) in run {
                        outcomes.push((p, self.execute(message_id, command).await));
                    }
                }
                outcome => outcomes.extend(run.into_iter().map(|(p, _)| (p, outcome.clone()))),
            }
        }
        outcomes
    }

    async fn execute(&self, message_id: MessageId, command: MessageCommand) -> Applied {
        classify(self.store.execute(message_id, command).await)
    }

    /// The command that records this fact (for a reply, after receiving the inbound message).
    async fn command_for(&self, p: &PendingFact) -> Result<MessageCommand, Applied> {
        let Some(message_id) = p.message_id else {
            return Err(Applied::Unmatched(
                "the payload names no message of ours".into(),
            ));
        };
        let fact = Fact {
            fact_id: p.event_id.clone(),
            occurred_at: p.occurred_at,
        };
        let v = &p.payload;
        let command = match p.kind {
            FactKind::Processed => MessageCommand::RecordDelivery {
                fact,
                outcome: DeliveryOutcome::Processed,
            },
            FactKind::Deferred => MessageCommand::RecordDelivery {
                fact,
                outcome: DeliveryOutcome::Deferred {
                    response: text(v, "response"),
                },
            },
            FactKind::Delivered => MessageCommand::RecordDelivery {
                fact,
                outcome: DeliveryOutcome::Delivered {
                    response: text(v, "response"),
                },
            },
            FactKind::Bounced => MessageCommand::RecordDelivery {
                fact,
                outcome: DeliveryOutcome::Bounced {
                    reason: text(v, "reason"),
                    bounce_type: text(v, "type"),
                },
            },
            FactKind::Dropped => MessageCommand::RecordDelivery {
                fact,
                outcome: DeliveryOutcome::Dropped {
                    reason: text(v, "reason"),
                },
            },
            FactKind::Open => MessageCommand::RecordOpen {
                fact,
                machine_open: v
                    .get("sg_machine_open")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            },
            FactKind::Click => MessageCommand::RecordClick {
                fact,
                url: text(v, "url"),
            },
            FactKind::SpamReport => MessageCommand::RecordSpamReport { fact },
            FactKind::Unsubscribe => MessageCommand::RecordUnsubscribe {
                fact,
                group_id: v.get("asm_group_id").and_then(Value::as_i64),
            },
            FactKind::Reply => return self.receive_reply(message_id, p).await,
            FactKind::Other => return Err(Applied::Unmatched("not a fact we record".into())),
        };
        Ok(command)
    }

    /// Records the reply as an inbound message from the profile to the original's service,
    /// and returns the command that records it on the original.
    async fn receive_reply(
        &self,
        original: MessageId,
        p: &PendingFact,
    ) -> Result<MessageCommand, Applied> {
        let message = match self.store.load_message(original).await {
            Ok(Some(found)) => found,
            Ok(None) => return Err(Applied::Wait),
            Err(e) => return Err(Applied::Retry(e.to_string())),
        };
        let Some(d) = message.data() else {
            return Err(Applied::Wait);
        };
        let service = match self.store.service(d.service_id).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(Applied::Unmatched(format!(
                    "service {} is gone",
                    d.service_id
                )))
            }
            Err(e) => return Err(Applied::Retry(e.to_string())),
        };
        let v = &p.payload;
        let from = Profile::new(
            text(v, "from_username").unwrap_or_default(),
            text(v, "from_name"),
        );
        let id = inbound_id(&p.event_id, p.occurred_at);
        let receive = MessageCommand::Receive(Receive {
            id,
            service: ServiceRef::from(&service),
            from: from.clone(),
            subject: text(v, "subject"),
            text: text(v, "text"),
            in_reply_to: Some(original),
            provider_message_id: text(v, "provider_message_id"),
            received_at: p.occurred_at,
        });
        match self.store.execute(id, receive).await {
            // Already received by an earlier try: the same reply, the same message.
            Ok(()) | Err(CommandError::Rejected(MessageError::AlreadyExists)) => {}
            Err(e) => return Err(Applied::Retry(e.to_string())),
        }
        Ok(MessageCommand::RecordReply {
            fact: Fact {
                fact_id: p.event_id.clone(),
                occurred_at: p.occurred_at,
            },
            reply_message_id: Some(id),
            from,
        })
    }

    /// Runs until `shutdown`: woken by new inbox rows and by new events (a message a waiting
    /// fact names may have appeared), with a polling fallback.
    pub async fn run(
        self,
        mut inbox: watch::Receiver<u64>,
        mut events: watch::Receiver<u64>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            inbox.borrow_and_update();
            events.borrow_and_update();
            match self.run_once().await {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(error) => tracing::error!(%error, "webhook applier round failed"),
            }
            tokio::select! {
                Ok(()) = inbox.changed() => {}
                // New events concern only facts that wait for their message, a rare case:
                // under a steady load they come every few milliseconds, and a round each time
                // was a lease statement (and the pool's two checks) for nothing. New inbox
                // rows still wake the applier at once.
                Ok(()) = events.changed() => {
                    tokio::select! {
                        Ok(()) = inbox.changed() => {}
                        _ = tokio::time::sleep(EVENTS_AT_MOST_EVERY) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}
