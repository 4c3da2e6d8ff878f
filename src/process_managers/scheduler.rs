//! The scheduler: queues each scheduled message at its `publish_at`.
//!
//! It sleeps until the earliest `publish_at` in `scheduled_sends` (an index lookup, so memory
//! and work do not grow with the number scheduled), woken early by NOTIFY `schedule` when a
//! message is scheduled sooner. Due rows are claimed with `FOR UPDATE SKIP LOCKED`, so many
//! instances can run; each firing carries the `publish_at` it fired for, so a reschedule or a
//! cancel that races it wins and nothing is queued twice.

use crate::store::{CommandError, ScheduledSend, Store, StoreError};
use chrono::{DateTime, Utc};
use messaging_domain::{MessageCommand, MessageError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The longest the scheduler sleeps without looking again (a safety net for lost wake-ups).
const MAX_SLEEP: Duration = Duration::from_secs(5);

/// How long the scheduler waits to look again at a due row it could not lease (locked by a
/// writer): a few writes' time, far below the lateness the schedule allows.
const LOCKED_DUE_PAUSE: Duration = Duration::from_millis(20);

/// How long to sleep for the schedule's next due time: until it (now if it is past), at most
/// [`MAX_SLEEP`], and that when nothing is scheduled.
fn until(next: Option<DateTime<Utc>>) -> Duration {
    next.map_or(MAX_SLEEP, |at| {
        (at - crate::clock::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
    })
    .min(MAX_SLEEP)
}

#[derive(Clone)]
pub struct Scheduler {
    store: Arc<dyn Store>,
    batch_size: i64,
}

impl Scheduler {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            batch_size: 500,
        }
    }

    /// Queues every message due now, round after round, until none is left or `shutdown`
    /// turns true; returns how many were queued.
    pub async fn fire_due(&self, shutdown: &watch::Receiver<bool>) -> Result<usize, StoreError> {
        let mut fired = 0;
        loop {
            if *shutdown.borrow() {
                return Ok(fired);
            }
            // Leased in one short step, then fired with no transaction open: an open
            // transaction older than the events the firings append would hold back every log
            // reader until it ended.
            let due = self.store.lease_due_schedules(self.batch_size).await?;
            let claimed = due.len();
            // The whole round as one batch of commands: a few statements, not a few per
            // message (firing one at a time kept up with ~500 messages a second).
            let now = crate::clock::now();
            let commands = due
                .iter()
                .map(|due| {
                    let command = MessageCommand::Send {
                        now,
                        expected_publish_at: Some(due.publish_at),
                    };
                    (due.message_id, command)
                })
                .collect();
            let results = self.store.execute_each(commands).await;
            let (mut done, mut retry) = (Vec::new(), Vec::new());
            for (due, result) in due.into_iter().zip(results) {
                let ScheduledSend {
                    message_id: id,
                    publish_at,
                } = due;
                match result {
                    Ok(()) => {
                        fired += 1;
                        tracing::info!(message_id = %id, %publish_at, "scheduled message queued");
                        done.push(due);
                    }
                    // Rescheduled, cancelled or gone since the row was written: the log
                    // decides, and this firing is void.
                    Err(CommandError::Rejected(
                        e @ (MessageError::StaleSchedule { .. }
                        | MessageError::InvalidTransition { .. }
                        | MessageError::NotFound),
                    )) => {
                        tracing::debug!(message_id = %id, reason = %e, "scheduled firing void");
                        done.push(due);
                    }
                    Err(error) => {
                        tracing::warn!(message_id = %id, %error, "could not queue a due message; retrying");
                        retry.push(due);
                    }
                }
            }
            // Only these firings' rows: a reschedule written meanwhile stays, unleased. Both
            // run whatever the other did: a failed finish must not keep the retries leased.
            let finished = self.store.finish_schedules(&done).await;
            let released = self.store.release_schedules(&retry).await;
            finished?;
            released?;
            if done.is_empty() && !retry.is_empty() {
                // Nothing of the round could be queued: the next round would lease the same
                // rows at once. Report it, and let the caller pause.
                return Err(StoreError::new(format!(
                    "none of {} due messages could be queued",
                    retry.len()
                )));
            }
            if (claimed as i64) < self.batch_size {
                return Ok(fired);
            }
        }
    }

    /// The earliest `publish_at` still waiting.
    pub async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.store.next_schedule_due().await
    }

    /// Runs until `shutdown` turns true (or its sender is dropped).
    pub async fn run(self, mut wake: watch::Receiver<u64>, mut shutdown: watch::Receiver<bool>) {
        let mut woken = false;
        loop {
            if *shutdown.borrow() {
                return;
            }
            wake.borrow_and_update();
            // Woken because messages were scheduled (a NOTIFY for each batch the delivery
            // projection writes): most are due later, so look before leasing. A lease that
            // finds nothing is a write statement; under a steady load of scheduled messages
            // this was two statements per wake-up instead of one.
            // Nothing scheduled at all (cancelled since the NOTIFY, say) is nothing due either;
            // an error reading it leases anyway, as a timed wake-up does.
            let nothing_due = if woken {
                match self.next_due().await {
                    Ok(next) if next.is_none_or(|at| at > crate::clock::now()) => Some(until(next)),
                    _ => None,
                }
            } else {
                None
            };
            let sleep = match nothing_due {
                Some(sleep) => sleep,
                None => self.fire_and_look_ahead(&shutdown).await,
            };
            woken = tokio::select! {
                Ok(()) = wake.changed() => true,
                _ = tokio::time::sleep(sleep) => false,
                // Its sender gone is a stop too: waiting on it would return at once, round
                // after round.
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
            };
        }
    }

    /// Fires what is due; returns how long to sleep until the next is.
    async fn fire_and_look_ahead(&self, shutdown: &watch::Receiver<bool>) -> Duration {
        let (failed, fired) = match self.fire_due(shutdown).await {
            Ok(fired) => (false, fired),
            Err(error) => {
                tracing::error!(%error, "scheduler round failed; pausing");
                (true, 0)
            }
        };
        match self.next_due().await {
            Ok(_) if failed => Duration::from_secs(1),
            // Due but not leased: its row is locked by a writer (a cancel or reschedule being
            // projected, a rebuild), which the lease skips. Looked at again shortly, not at
            // once: that was two statements in a loop for as long as the lock was held.
            Ok(next) if fired == 0 && next.is_some_and(|at| at <= crate::clock::now()) => {
                LOCKED_DUE_PAUSE
            }
            Ok(next) => until(next),
            Err(error) => {
                tracing::error!(%error, "scheduler cannot read the schedule");
                Duration::from_secs(1)
            }
        }
    }
}
