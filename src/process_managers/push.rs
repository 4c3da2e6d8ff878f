//! Push deliveries for Automation: each subscription gets the feed items after its cursor, in
//! order, as signed JSON batches, retried with backoff until a 2xx acknowledges them.
//!
//! A subscription is leased (its `next_attempt_at` pushed past the delivery's timeout) in a
//! short transaction, then delivered with no transaction open: a slow subscriber must not hold
//! back the log readers, which wait for every older transaction. A worker that dies mid-delivery
//! leaves a lease that expires, and the batch is delivered again: at least once, and in the
//! normal case exactly once.

use crate::store::{PushDue, Store, StoreError};
use crate::webhooks::verify::sign_push;
use chrono::Utc;
use messaging_projections::FeedItem;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct PushConfig {
    pub timeout: Duration,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Items in one delivery.
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
}

impl Pusher {
    pub fn new(store: Arc<dyn Store>, config: PushConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(config.timeout).build()?;
        Ok(Self {
            store,
            http,
            config,
        })
    }

    /// Leases the subscriptions that have something to deliver and are due.
    async fn lease(&self) -> Result<Vec<PushDue>, StoreError> {
        let lease = self
            .config
            .timeout
            .saturating_mul(2)
            .saturating_add(Duration::from_secs(5));
        self.store.lease_push_subscriptions(lease).await
    }

    /// One round: every due subscription gets its next batch. Returns how many were attempted.
    pub async fn run_once(&self) -> Result<usize, StoreError> {
        let due = self.lease().await?;
        let attempted = due.len();
        let results = futures::future::join_all(due.into_iter().map(|d| self.deliver(d))).await;
        for r in results {
            r?;
        }
        Ok(attempted)
    }

    async fn deliver(&self, sub: PushDue) -> Result<(), StoreError> {
        // Scan ahead; the filters keep some. The cursor also moves past items they drop.
        let window: Vec<FeedItem> = self
            .store
            .state_changes(sub.cursor, (self.config.batch_size * 10) as i64)
            .await?;
        let keep = |i: &FeedItem| {
            sub.states.as_ref().is_none_or(|s| s.contains(&i.state))
                && sub.channels.as_ref().is_none_or(|c| c.contains(&i.channel))
        };
        let items: Vec<&FeedItem> = window
            .iter()
            .filter(|i| keep(i))
            .take(self.config.batch_size)
            .collect();
        let next_cursor = match items.last() {
            Some(last) if items.len() == self.config.batch_size => last.position,
            _ => window.last().map(|i| i.position).unwrap_or(sub.cursor),
        };
        if items.is_empty() {
            return self.acknowledged(&sub, next_cursor, 0).await;
        }
        let body =
            json!({"subscription_id": sub.id, "items": items, "next": next_cursor}).to_string();
        let signature = sign_push(&sub.secret, Utc::now().timestamp(), body.as_bytes());
        let result = self
            .http
            .post(&sub.url)
            .header("content-type", "application/json")
            .header("X-Messaging-Signature", signature)
            .body(body)
            .send()
            .await;
        match result {
            Ok(r) if r.status().is_success() => {
                self.acknowledged(&sub, next_cursor, items.len()).await
            }
            Ok(r) => {
                let status = r.status();
                let text: String = r
                    .text()
                    .await
                    .unwrap_or_default()
                    .chars()
                    .take(200)
                    .collect();
                self.failed(&sub, format!("HTTP {status}: {text}")).await
            }
            Err(e) => {
                let reason = if e.is_timeout() {
                    "timed out".to_string()
                } else if e.is_connect() {
                    "could not connect".to_string()
                } else {
                    "request failed".to_string()
                };
                self.failed(&sub, reason).await
            }
        }
    }

    async fn acknowledged(
        &self,
        sub: &PushDue,
        cursor: i64,
        delivered: usize,
    ) -> Result<(), StoreError> {
        self.store
            .push_acknowledged(sub.id, cursor, delivered as i64)
            .await
    }

    async fn failed(&self, sub: &PushDue, reason: String) -> Result<(), StoreError> {
        let failures = sub.failures.saturating_add(1);
        let backoff = super::backoff(
            self.config.base_backoff,
            self.config.max_backoff,
            u32::try_from(failures).unwrap_or(u32::MAX),
        );
        tracing::warn!(subscription_id = %sub.id, failures, %reason, retry_in_ms = backoff.as_millis() as u64, "push delivery failed");
        self.store
            .push_failed(sub.id, failures, &reason, backoff)
            .await
    }

    /// Runs until `shutdown`: woken when the feed grows, and at the next retry time.
    pub async fn run(self, mut wake: watch::Receiver<u64>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            wake.borrow_and_update();
            match self.run_once().await {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(error) => tracing::error!(%error, "push round failed"),
            }
            let next: Option<chrono::DateTime<Utc>> =
                self.store.next_push_due().await.unwrap_or(None);
            let sleep = next
                .and_then(|at| (at - Utc::now()).to_std().ok())
                .unwrap_or(Duration::from_secs(5))
                .clamp(Duration::from_millis(10), Duration::from_secs(5));
            tokio::select! {
                Ok(()) = wake.changed() => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}
