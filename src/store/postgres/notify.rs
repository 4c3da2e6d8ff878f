//! Wake-ups from PostgreSQL NOTIFY: one channel per kind of [`Wakeups`], fanned out to this
//! process's readers through watch channels. Readers also poll, so a lost connection delays
//! them and loses nothing.

use crate::notify::Wakeups;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::time::Duration;
use tokio::sync::watch;

/// The NOTIFY channels, one per [`Wakeups`] field and named like it.
const CHANNELS: [&str; 5] = [
    "events",
    "state_changes",
    "schedule",
    "send_jobs",
    "webhook_inbox",
];

/// Starts the listener task; it runs until `shutdown` turns true.
pub fn spawn_listener(pool: PgPool, mut shutdown: watch::Receiver<bool>) -> Wakeups {
    let (events_tx, events) = watch::channel(0u64);
    let (feed_tx, state_changes) = watch::channel(0u64);
    let (schedule_tx, schedule) = watch::channel(0u64);
    let (jobs_tx, send_jobs) = watch::channel(0u64);
    let (inbox_tx, webhook_inbox) = watch::channel(0u64);
    // In CHANNELS order.
    let senders = [events_tx, feed_tx, schedule_tx, jobs_tx, inbox_tx];
    let bump = |tx: &watch::Sender<u64>| tx.send_modify(|v| *v = v.wrapping_add(1));
    tokio::spawn(async move {
        loop {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for notifications; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            };
            if let Err(error) = listener.listen_all(CHANNELS).await {
                tracing::warn!(%error, "LISTEN failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            loop {
                tokio::select! {
                    received = listener.try_recv() => match received {
                        Ok(Some(n)) => {
                            let i = CHANNELS.iter().position(|c| *c == n.channel());
                            if let Some(tx) = i.and_then(|i| senders.get(i)) {
                                bump(tx);
                            }
                        }
                        // The connection dropped: notifications may have been missed, so wake
                        // everyone to re-read, then reconnect.
                        Ok(None) | Err(_) => {
                            senders.iter().for_each(bump);
                            break;
                        }
                    },
                    _ = shutdown.changed() => return,
                }
            }
        }
    });
    Wakeups {
        events,
        state_changes,
        schedule,
        send_jobs,
        webhook_inbox,
    }
}
