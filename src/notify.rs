//! Wake-ups: `events` (a commit appended events), `state_changes` (the feed gained items) and
//! the work queues, fanned out to this process's readers and workers through watch channels.
//! A backend feeds them (PostgreSQL from NOTIFY, in `store::postgres::notify`); readers also
//! poll, so a lost wake-up delays them and loses nothing.

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
