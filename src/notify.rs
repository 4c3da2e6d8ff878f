//! Wake-ups: `events` (a commit appended events), `state_changes` (the feed gained items) and
//! the work queues, fanned out to this process's readers and workers through watch channels.
//! A backend feeds them (PostgreSQL from NOTIFY, in `store::postgres::notify`; the embedded
//! backend rings a [`Bell`] after its own commits); readers also
//! poll, so a lost wake-up delays them and loses nothing.

use std::sync::Arc;
use tokio::sync::watch;

/// One watch channel per kind of wake-up; a receiver sees a new value after each one.
pub struct Wakeups {
    /// New events were committed.
    pub events: watch::Receiver<u64>,
    /// The feed gained items.
    pub state_changes: watch::Receiver<u64>,
    /// A message was scheduled or rescheduled.
    pub schedule: watch::Receiver<u64>,
    /// A send job became due (queued, or a retry was scheduled).
    pub send_jobs: watch::Receiver<u64>,
    /// Provider webhooks landed in the inbox.
    pub webhook_inbox: watch::Receiver<u64>,
}

/// The senders of a fresh set of wake-ups, in field order (`events`, `state_changes`,
/// `schedule`, `send_jobs`, `webhook_inbox`), and their receivers.
pub fn channels() -> ([watch::Sender<u64>; 5], Wakeups) {
    let (events_tx, events) = watch::channel(0u64);
    let (feed_tx, state_changes) = watch::channel(0u64);
    let (schedule_tx, schedule) = watch::channel(0u64);
    let (jobs_tx, send_jobs) = watch::channel(0u64);
    let (inbox_tx, webhook_inbox) = watch::channel(0u64);
    let wakeups = Wakeups {
        events,
        state_changes,
        schedule,
        send_jobs,
        webhook_inbox,
    };
    (
        [events_tx, feed_tx, schedule_tx, jobs_tx, inbox_tx],
        wakeups,
    )
}

/// Wakes the receivers of `tx`.
pub fn bump(tx: &watch::Sender<u64>) {
    tx.send_modify(|v| *v = v.wrapping_add(1));
}

/// Wakes this process's readers and workers directly: the embedded backend's NOTIFY (one
/// process owns its database, so nobody else needs telling).
#[derive(Clone)]
pub struct Bell(Arc<[watch::Sender<u64>; 5]>);

impl Bell {
    /// A command committed events.
    pub fn events(&self) {
        bump(&self.0[0]);
    }

    /// A projection batch committed: the feed, the schedule and the send jobs may have
    /// changed, and a webhook fact waiting for its message may now apply.
    pub fn read_models(&self) {
        self.0[1..5].iter().for_each(bump);
    }

    /// Provider webhooks landed in the inbox.
    pub fn webhook_inbox(&self) {
        bump(&self.0[4]);
    }
}

/// Wake-ups rung by the process itself, for the embedded backend.
pub fn in_process() -> (Bell, Wakeups) {
    let (senders, wakeups) = channels();
    (Bell(Arc::new(senders)), wakeups)
}
