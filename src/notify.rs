//! Wake-ups from PostgreSQL NOTIFY: `events` (a commit appended events) and `state_changes`
//! (the feed gained items), fanned out to this process's readers through watch channels.
//! Readers also poll, so a lost connection delays them and loses nothing.

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::time::Duration;
use tokio::sync::watch;

pub struct Wakeups {
    pub events: watch::Receiver<u64>,
    pub state_changes: watch::Receiver<u64>,
}

/// Starts the listener task; it runs until `shutdown` turns true.
pub fn spawn_listener(pool: PgPool, mut shutdown: watch::Receiver<bool>) -> Wakeups {
    let (events_tx, events) = watch::channel(0u64);
    let (feed_tx, state_changes) = watch::channel(0u64);
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
            if let Err(error) = listener.listen_all(["events", "state_changes"]).await {
                tracing::warn!(%error, "LISTEN failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            loop {
                tokio::select! {
                    received = listener.try_recv() => match received {
                        Ok(Some(n)) => {
                            let tx = if n.channel() == "events" { &events_tx } else { &feed_tx };
                            tx.send_modify(|v| *v = v.wrapping_add(1));
                        }
                        // The connection dropped: notifications may have been missed, so wake
                        // everyone to re-read, then reconnect.
                        Ok(None) | Err(_) => {
                            events_tx.send_modify(|v| *v = v.wrapping_add(1));
                            feed_tx.send_modify(|v| *v = v.wrapping_add(1));
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
    }
}
