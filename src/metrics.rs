//! Prometheus metrics: counters and histograms updated as work happens, plus gauges read from
//! the database when `/metrics` is scraped (lag and queue depths are facts of the shared
//! database, not of one process, so every instance reports the same numbers for them).
//!
//! Each [`Application`](crate::startup::Application) owns its own [`Metrics`] and registry
//! rather than a process-global recorder: several instances (the integration tests start many
//! in one process) then count independently, and nothing has to be installed exactly once.

use crate::process_managers::sender::JobOutcome;
use crate::store::{CommandError, Gauges, Store, StoreError};
use async_trait::async_trait;
use cqrs_es::{DomainEvent, EventEnvelope, Query};
use messaging_domain::{Message, MessageCommand, MessageEvent};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::sync::Arc;
use std::time::Duration;

/// How long a scrape waits for the gauges read from the database.
const GAUGES_TIMEOUT: Duration = Duration::from_secs(2);

/// The metrics one running service keeps.
pub struct Metrics {
    registry: Registry,
    http_requests: HistogramVec,
    commands: IntCounterVec,
    events: IntCounterVec,
    sends: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let http_requests = HistogramVec::new(
            HistogramOpts::new(
                "messaging_http_request_duration_seconds",
                "HTTP requests by method, matched route template and status, and their latency",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["method", "route", "status"],
        )?;
        let commands = IntCounterVec::new(
            Opts::new(
                "messaging_commands_total",
                "Message commands executed, by command type and outcome (ok, rejected, busy, error)",
            ),
            &["command", "outcome"],
        )?;
        let events = IntCounterVec::new(
            Opts::new(
                "messaging_events_appended_total",
                "Events appended to the log by this instance, by event type",
            ),
            &["event_type"],
        )?;
        let sends = IntCounterVec::new(
            Opts::new(
                "messaging_sends_total",
                "Provider send attempts by provider and recorded outcome (sent, retry, failed, unknown)",
            ),
            &["provider", "outcome"],
        )?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(commands.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(sends.clone()))?;
        Ok(Self {
            registry,
            http_requests,
            commands,
            events,
            sends,
        })
    }

    /// One finished HTTP request. `route` is the matched template (`/v1/messages/{id}`), never
    /// the raw path: ids in labels would make a series per message.
    pub fn http_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        self.http_requests
            .with_label_values(&[method, route, &status.to_string()])
            .observe(elapsed.as_secs_f64());
    }

    /// One `Store::execute` call, after its conflict retries.
    pub fn command<T>(&self, command: &'static str, result: &Result<T, CommandError>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(CommandError::Rejected(_)) => "rejected",
            Err(CommandError::Busy) => "busy",
            Err(CommandError::Store(_)) => "error",
            Err(CommandError::Unavailable(_)) => "unavailable",
        };
        self.commands.with_label_values(&[command, outcome]).inc();
    }

    /// Events appended without cqrs-es (the batch command path), counted as its query does.
    pub fn events_appended<'a>(&self, events: impl IntoIterator<Item = &'a MessageEvent>) {
        for event in events {
            self.events.with_label_values(&[event.type_name()]).inc();
        }
    }

    /// The outcome the sender recorded for one attempt.
    pub fn send(&self, provider: &str, outcome: JobOutcome) {
        let outcome = match outcome {
            JobOutcome::Sent => "sent",
            JobOutcome::RetryScheduled => "retry",
            JobOutcome::Failed => "failed",
            JobOutcome::Unknown => "unknown",
            JobOutcome::Skipped => return,
        };
        self.sends.with_label_values(&[provider, outcome]).inc();
    }

    /// A cqrs-es query that counts committed events. It is only a counter: losing a count in
    /// a crash is acceptable, unlike a read model (those are durable subscriptions).
    pub fn event_counter(self: &Arc<Self>) -> Box<dyn Query<Message>> {
        Box::new(EventCounter(self.clone()))
    }

    /// The text exposition: this instance's counters, then gauges read from the database
    /// now. When the database does not answer, the counters are still served and
    /// `messaging_metrics_database_ok` is 0.
    pub async fn render(&self, store: &dyn Store) -> Result<String, prometheus::Error> {
        let mut families = self.registry.gather();
        let database_ok = IntGauge::new(
            "messaging_metrics_database_ok",
            "1 when the gauges read from the database at this scrape could be read",
        )?;
        // Bounded well inside a scrape's timeout (Prometheus: 10 s by default): a database
        // that hangs, or a pool with no connection free, would otherwise cost the whole
        // scrape, the counters with it.
        match tokio::time::timeout(GAUGES_TIMEOUT, database_gauges(store)).await {
            Ok(Ok(gauges)) => {
                families.extend(gauges.gather());
                database_ok.set(1);
            }
            Ok(Err(error)) => tracing::warn!(%error, "metrics: database gauges unavailable"),
            Err(_) => tracing::warn!(
                timeout = ?GAUGES_TIMEOUT,
                "metrics: database gauges unavailable: no answer in time"
            ),
        }
        let status = Registry::new();
        status.register(Box::new(database_ok))?;
        families.extend(status.gather());
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
enum GaugeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("registry: {0}")]
    Registry(#[from] prometheus::Error),
}

struct EventCounter(Arc<Metrics>);

#[async_trait]
impl Query<Message> for EventCounter {
    async fn dispatch(&self, _aggregate_id: &str, events: &[EventEnvelope<Message>]) {
        for event in events {
            self.0
                .events
                .with_label_values(&[&event.payload.event_type()])
                .inc();
        }
    }
}

/// The label for a command type: stable, snake_case, one per variant.
pub fn command_name(command: &MessageCommand) -> &'static str {
    match command {
        MessageCommand::Compose(_) => "compose",
        MessageCommand::Receive(_) => "receive",
        MessageCommand::Schedule { .. } => "schedule",
        MessageCommand::Send { .. } => "send",
        MessageCommand::Cancel { .. } => "cancel",
        MessageCommand::StartSendAttempt { .. } => "start_send_attempt",
        MessageCommand::RecordSent { .. } => "record_sent",
        MessageCommand::RecordSendFailure { .. } => "record_send_failure",
        MessageCommand::RecordSendOutcomeUnknown { .. } => "record_send_outcome_unknown",
        MessageCommand::AbandonSendAttempt { .. } => "abandon_send_attempt",
        MessageCommand::ResolveSendOutcome { .. } => "resolve_send_outcome",
        MessageCommand::RecordDelivery { .. } => "record_delivery",
        MessageCommand::RecordOpen { .. } => "record_open",
        MessageCommand::RecordClick { .. } => "record_click",
        MessageCommand::RecordReply { .. } => "record_reply",
        MessageCommand::RecordSpamReport { .. } => "record_spam_report",
        MessageCommand::RecordUnsubscribe { .. } => "record_unsubscribe",
        MessageCommand::Batch(_) => "batch",
    }
}

/// Lag and queue depths, read at scrape time from the store into a registry of their own
/// (a fresh one each scrape, so a deleted push subscription leaves no stale series).
async fn database_gauges(store: &dyn Store) -> Result<Registry, GaugeError> {
    let Gauges {
        projection_lag,
        send_jobs_due,
        send_jobs,
        scheduled_sends,
        webhook_inbox_pending,
        push_lag: subscriptions,
    } = store.gauges().await?;
    let registry = Registry::new();
    let lag = IntGaugeVec::new(
        Opts::new(
            "messaging_subscription_lag_events",
            "Events in the log after each projection's checkpoint",
        ),
        &["projection"],
    )?;
    let queues = IntGaugeVec::new(
        Opts::new(
            "messaging_queue_depth",
            "Work waiting now: send_jobs_due, send_jobs (all), scheduled_sends, webhook_inbox_pending",
        ),
        &["queue"],
    )?;
    let push_lag = IntGaugeVec::new(
        Opts::new(
            "messaging_push_subscription_lag_items",
            "Feed items after each push subscription's cursor",
        ),
        &["subscription"],
    )?;
    registry.register(Box::new(lag.clone()))?;
    registry.register(Box::new(queues.clone()))?;
    registry.register(Box::new(push_lag.clone()))?;

    for (name, n) in projection_lag {
        lag.with_label_values(&[&name]).set(n);
    }

    for (queue, n) in [
        ("send_jobs_due", send_jobs_due),
        ("send_jobs", send_jobs),
        ("scheduled_sends", scheduled_sends),
        ("webhook_inbox_pending", webhook_inbox_pending),
    ] {
        queues.with_label_values(&[queue]).set(n);
    }

    for (id, n) in subscriptions {
        push_lag.with_label_values(&[&id.to_string()]).set(n);
    }
    Ok(registry)
}
