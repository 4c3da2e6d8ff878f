//! Push deliveries for Automation: each subscription gets the feed items after its cursor, in
//! order, as signed JSON batches, retried with backoff until a 2xx acknowledges them.
//!
//! A subscription is leased (its `next_attempt_at` pushed past the delivery's timeout) in a
//! short transaction, then delivered with no transaction open: a slow subscriber must not hold
//! back the log readers, which wait for every older transaction. A worker that dies mid-delivery
//! leaves a lease that expires, and the batch is delivered again: at least once, and in the
//! normal case exactly once.
//!
//! A lease that runs out hands the subscription to the next delivery, so one that is late
//! (its feed read or its acknowledgement waited for a connection) must not act on it any more:
//! no call starts once too little of the lease is left to finish it, and an answer is recorded
//! only while the lease is still the delivery's (its end is the token). Otherwise a late
//! acknowledgement would free the subscription under the next delivery, and a batch could
//! arrive after a newer one.
//!
//! Each delivery runs on its own ([`Pusher::run`] keeps up to [`IN_FLIGHT`] at once and leases
//! more as they finish), so a subscriber that answers slowly holds back only itself. Redirects
//! are not followed (a subscriber's answer cannot send the signed batch elsewhere) and of an
//! error answer only its first kilobyte is read.

use crate::store::{PushDue, Store, StoreError};
use crate::webhooks::verify::sign_push;
use chrono::Utc;
use messaging_projections::FeedItem;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Deliveries one worker runs at once.
pub const IN_FLIGHT: usize = 16;

/// Of an error answer's body, what is read (and the first 200 characters kept as the reason).
const ERROR_BODY_BYTES: usize = 1024;

#[derive(Debug, Clone)]
pub struct PushConfig {
    pub timeout: Duration,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Items in one delivery at most. A subscription's batches are halved after each failed
    /// delivery (down to 1) and doubled after each acknowledged one: a subscriber that cannot
    /// take a whole batch within the timeout still gets everything, in smaller ones, and a
    /// batch of one shows which item it refuses.
    pub batch_size: usize,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            batch_size: 100,
        }
    }
}

#[derive(Clone)]
pub struct Pusher {
    store: Arc<dyn Store>,
    http: reqwest::Client,
    config: PushConfig,
    /// Subscriptions whose batches are smaller than `batch_size` now, with their size (this
    /// process's memory: another instance, or a restart, starts again at `batch_size`).
    smaller: Arc<std::sync::Mutex<HashMap<uuid::Uuid, usize>>>,
}

impl Pusher {
    pub fn new(store: Arc<dyn Store>, config: PushConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            store,
            http,
            config,
            smaller: Arc::default(),
        })
    }

    fn batch_size(&self, id: uuid::Uuid) -> usize {
        self.smaller
            .lock()
            .ok()
            .and_then(|sizes| sizes.get(&id).copied())
            .unwrap_or(self.config.batch_size)
    }

    /// After a delivery of `size` items: twice as many next time once acknowledged, half as
    /// many once failed.
    fn resize(&self, id: uuid::Uuid, size: usize, acknowledged: bool) {
        let next = if acknowledged {
            size.saturating_mul(2)
        } else {
            (size / 2).max(1)
        };
        if let Ok(mut sizes) = self.smaller.lock() {
            if next >= self.config.batch_size {
                sizes.remove(&id);
            } else {
                sizes.insert(id, next);
            }
        }
    }

    /// How long a lease lasts: a delivery's call and the reads and writes around it.
    fn lease_length(&self) -> Duration {
        self.config
            .timeout
            .saturating_mul(2)
            .saturating_add(Duration::from_secs(5))
    }

    /// Leases up to `limit` subscriptions that have something to deliver and are due, each
    /// with the instant its lease is over at the latest, in this process's clock (measured from
    /// before the lease was asked for, so never later than the store's).
    async fn lease(&self, limit: usize) -> Result<Vec<(PushDue, Instant)>, StoreError> {
        let lease = self.lease_length();
        let asked = Instant::now();
        let due = self
            .store
            .lease_push_subscriptions(lease, limit as i64)
            .await?;
        Ok(due.into_iter().map(|sub| (sub, asked + lease)).collect())
    }

    async fn deliver(&self, sub: PushDue, lease_ends: Instant) -> Result<(), StoreError> {
        // Scan ahead; the filters keep some. The cursor also moves past items they drop.
        let window: Vec<FeedItem> = self
            .store
            .state_changes(sub.cursor, (self.config.batch_size * 10) as i64)
            .await?;
        let batch_size = self.batch_size(sub.id);
        let keep = |i: &FeedItem| {
            sub.states.as_ref().is_none_or(|s| s.contains(&i.state))
                && sub.channels.as_ref().is_none_or(|c| c.contains(&i.channel))
        };
        let items: Vec<&FeedItem> = window.iter().filter(|i| keep(i)).take(batch_size).collect();
        let next_cursor = match items.last() {
            Some(last) if items.len() == batch_size => last.position,
            _ => window.last().map(|i| i.position).unwrap_or(sub.cursor),
        };
        if items.is_empty() {
            return self.acknowledged(&sub, next_cursor, 0).await;
        }
        // The call may take `timeout`; a second to spare for recording its answer.
        if Instant::now() + self.config.timeout + Duration::from_secs(1) > lease_ends {
            tracing::warn!(subscription_id = %sub.id, "push lease too near its end to call; left to the next delivery");
            return Ok(());
        }
        let body =
            json!({"subscription_id": sub.id, "items": items, "next": next_cursor}).to_string();
        let signature = sign_push(
            &sub.secret,
            crate::clock::now().timestamp(),
            body.as_bytes(),
        );
        let result = self
            .http
            .post(&sub.url)
            .header("content-type", "application/json")
            .header("X-Messaging-Signature", signature)
            .body(body)
            .send()
            .await;
        let acknowledged = matches!(&result, Ok(r) if r.status().is_success());
        self.resize(sub.id, batch_size, acknowledged);
        match result {
            Ok(r) if r.status().is_success() => {
                self.acknowledged(&sub, next_cursor, items.len()).await
            }
            Ok(mut r) => {
                let status = r.status();
                let mut body = Vec::new();
                while body.len() < ERROR_BODY_BYTES {
                    match r.chunk().await {
                        Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                        _ => break,
                    }
                }
                body.truncate(ERROR_BODY_BYTES);
                let text: String = String::from_utf8_lossy(&body).chars().take(200).collect();
                // A subscriber that says how long it needs (429 or 503 with Retry-After) is
                // given that long, within the backoff's ceiling.
                let asked = [429, 503]
                    .contains(&status.as_u16())
                    .then(|| {
                        crate::providers::retry_after(r.headers(), std::time::SystemTime::now())
                    })
                    .flatten();
                self.failed(&sub, format!("HTTP {status}: {text}"), asked)
                    .await
            }
            Err(e) => {
                let reason = if e.is_timeout() {
                    "timed out".to_string()
                } else if e.is_connect() {
                    "could not connect".to_string()
                } else {
                    "request failed".to_string()
                };
                self.failed(&sub, reason, None).await
            }
        }
    }

    async fn acknowledged(
        &self,
        sub: &PushDue,
        cursor: i64,
        delivered: usize,
    ) -> Result<(), StoreError> {
        let held = self
            .store
            .push_acknowledged(sub, cursor, delivered as i64)
            .await?;
        if !held {
            self.lease_lost(sub, "acknowledged");
        }
        Ok(())
    }

    async fn failed(
        &self,
        sub: &PushDue,
        reason: String,
        asked: Option<Duration>,
    ) -> Result<(), StoreError> {
        let failures = sub.failures.saturating_add(1);
        let backoff = super::backoff(
            self.config.base_backoff,
            self.config.max_backoff,
            u32::try_from(failures).unwrap_or(u32::MAX),
        )
        .max(asked.unwrap_or_default().min(self.config.max_backoff));
        tracing::warn!(subscription_id = %sub.id, failures, %reason, retry_in_ms = backoff.as_millis() as u64, "push delivery failed");
        let held = self
            .store
            .push_failed(sub, failures, &reason, backoff)
            .await?;
        if !held {
            self.lease_lost(sub, "failed");
        }
        Ok(())
    }

    /// A delivery's answer came after its lease was taken by another delivery (or the
    /// subscription was deleted): not recorded, the other delivery's answer will be.
    fn lease_lost(&self, sub: &PushDue, outcome: &str) {
        // Whoever holds it now sizes its batches (and a deleted one leaves no entry behind).
        if let Ok(mut sizes) = self.smaller.lock() {
            sizes.remove(&sub.id);
        }
        tracing::info!(subscription_id = %sub.id, outcome, "push lease ran out before the delivery's answer was recorded; not recorded");
    }

    /// Runs until `shutdown` (then lets the deliveries in flight finish): woken when the feed
    /// grows, when a delivery ends, and at the next retry time. Each delivery is a task of its
    /// own; more are leased while fewer than [`IN_FLIGHT`] run.
    pub async fn run(self, mut wake: watch::Receiver<u64>, mut shutdown: watch::Receiver<bool>) {
        let mut in_flight: JoinSet<Result<(), StoreError>> = JoinSet::new();
        loop {
            if *shutdown.borrow() {
                while let Some(done) = in_flight.join_next().await {
                    log_delivery(done);
                }
                return;
            }
            // Every slot taken: only a delivery's end (or shutdown) frees one.
            if in_flight.len() >= IN_FLIGHT {
                tokio::select! {
                    Some(done) = in_flight.join_next() => log_delivery(done),
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            wake.borrow_and_update();
            match self.lease(IN_FLIGHT - in_flight.len()).await {
                Ok(due) if !due.is_empty() => {
                    for (sub, lease_ends) in due {
                        let pusher = self.clone();
                        in_flight.spawn(async move { pusher.deliver(sub, lease_ends).await });
                    }
                    // Look again at once for more, while slots are free.
                    continue;
                }
                Ok(_) => {}
                Err(error) => tracing::error!(%error, "push round failed"),
            }
            let next: Option<chrono::DateTime<Utc>> =
                self.store.next_push_due().await.unwrap_or(None);
            let sleep = next
                .and_then(|at| (at - crate::clock::now()).to_std().ok())
                .unwrap_or(Duration::from_secs(5))
                .clamp(Duration::from_millis(10), Duration::from_secs(5));
            tokio::select! {
                Ok(()) = wake.changed() => {}
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => log_delivery(done),
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}

/// A delivery task's end: its store error (the lease expires and it is retried), or a panic.
fn log_delivery(done: Result<Result<(), StoreError>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "push delivery not recorded"),
        Err(error) => tracing::error!(%error, "push delivery task failed"),
    }
}
