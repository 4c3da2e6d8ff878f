//! Wake-ups from PostgreSQL NOTIFY: one channel per kind of [`Wakeups`], fanned out to this
//! process's readers through watch channels. Readers also poll, so a lost connection delays
//! them and loses nothing.

use crate::notify::{bump, channels, Wakeups};
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
    // In CHANNELS order.
    let (senders, wakeups) = channels();
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
            // Listening (again): anything notified while no one listened was missed, so
            // everyone re-reads now, as well as when the connection dropped.
            senders.iter().for_each(bump);
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
    wakeups
}
