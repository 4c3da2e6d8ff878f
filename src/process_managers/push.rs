//! Push deliveries for Automation: each subscription gets the feed items after its cursor, in
//! order, as signed JSON batches, retried with backoff until a 2xx acknowledges them.
//!
//! A subscription is leased (its `next_attempt_at` pushed past the delivery's timeout) in a
//! short transaction, then delivered with no transaction open: a slow subscriber must not hold
//! back the log readers, which wait for every older transaction. A worker that dies mid-delivery
//! leaves a lease that expires, and the batch is delivered again: at least once, and in the
//! normal case exactly once.

use crate::webhooks::verify::sign_push;
use chrono::Utc;
use messaging_projections::FeedItem;
use serde_json::json;
use sqlx::PgPool;
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

#[derive(Debug, sqlx::FromRow)]
struct Due {
    id: uuid::Uuid,
    url: String,
    secret: String,
    states: Option<Vec<String>>,
    channels: Option<Vec<String>>,
    cursor: i64,
    failures: i32,
}

#[derive(Clone)]
pub struct Pusher {
    pool: PgPool,
    http: reqwest::Client,
    config: PushConfig,
}

impl Pusher {
    pub fn new(pool: PgPool, config: PushConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(config.timeout).build()?;
        Ok(Self { pool, http, config })
    }

    /// Leases the subscriptions that have something to deliver and are due.
    async fn lease(&self) -> Result<Vec<Due>, sqlx::Error> {
        let lease_ms = (self.config.timeout.as_millis() as f64) * 2.0 + 5_000.0;
        sqlx::query_as(
            "UPDATE subscriptions s SET next_attempt_at = now() + $1 * interval '1 millisecond' \
             FROM (SELECT id FROM subscriptions \
                   WHERE next_attempt_at <= now() \
                     AND cursor < (SELECT COALESCE(MAX(position), 0) FROM state_changes) \
                   ORDER BY next_attempt_at LIMIT 16 FOR UPDATE SKIP LOCKED) due \
             WHERE s.id = due.id \
             RETURNING s.id, s.url, s.secret, s.states, s.channels, s.cursor, s.failures",
        )
        .bind(lease_ms)
        .fetch_all(&self.pool)
        .await
    }

    /// One round: every due subscription gets its next batch. Returns how many were attempted.
    pub async fn run_once(&self) -> Result<usize, sqlx::Error> {
        let due = self.lease().await?;
        let attempted = due.len();
        let results = futures::future::join_all(due.into_iter().map(|d| self.deliver(d))).await;
        for r in results {
            r?;
        }
        Ok(attempted)
    }

    async fn deliver(&self, sub: Due) -> Result<(), sqlx::Error> {
        // Scan ahead; the filters keep some. The cursor also moves past items they drop.
        let window: Vec<FeedItem> = sqlx::query_as(
            "SELECT position, message_id, channel, service_id, previous_state, state, cause, \
                    occurred_at, recorded_at \
             FROM state_changes WHERE position > $1 ORDER BY position LIMIT $2",
        )
        .bind(sub.cursor)
        .bind((self.config.batch_size * 10) as i64)
        .fetch_all(&self.pool)
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
        sub: &Due,
        cursor: i64,
        delivered: usize,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE subscriptions SET cursor = GREATEST(cursor, $2), delivered = delivered + $3, \
             failures = 0, last_error = NULL, next_attempt_at = now(), \
             last_attempt_at = CASE WHEN $3 > 0 THEN now() ELSE last_attempt_at END \
             WHERE id = $1",
        )
        .bind(sub.id)
        .bind(cursor)
        .bind(delivered as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn failed(&self, sub: &Due, reason: String) -> Result<(), sqlx::Error> {
        let failures = sub.failures.saturating_add(1);
        let backoff = super::backoff(
            self.config.base_backoff,
            self.config.max_backoff,
            u32::try_from(failures).unwrap_or(u32::MAX),
        );
        tracing::warn!(subscription_id = %sub.id, failures, %reason, retry_in_ms = backoff.as_millis() as u64, "push delivery failed");
        sqlx::query(
            "UPDATE subscriptions SET failures = $2, last_error = $3, last_attempt_at = now(), \
             next_attempt_at = now() + $4 * interval '1 millisecond' WHERE id = $1",
        )
        .bind(sub.id)
        .bind(failures)
        .bind(reason)
        .bind(backoff.as_millis() as f64)
        .execute(&self.pool)
        .await?;
        Ok(())
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
            let next: Option<chrono::DateTime<Utc>> = sqlx::query_scalar(
                "SELECT min(next_attempt_at) FROM subscriptions \
                 WHERE cursor < (SELECT COALESCE(MAX(position), 0) FROM state_changes)",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap_or(None);
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
