//! What every scenario shares: the figure type, the load runner, statistics, bulk event
//! writing, settling the workers between runs.

use anyhow::{anyhow, Context, Result};
use chrono::{DateTime, Utc};
use messaging::store::postgres::PgStore;
use messaging::store::Store;
use messaging_domain::{
    build_message, Compose, Dispatch, Message, MessageCommand, MessageId, MessageInput, Profile,
    ServiceRef,
};
use serde::Serialize;
use sqlx::PgPool;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One measured figure, with the reference measured in the same run and the target.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub scenario: &'static str,
    pub name: String,
    pub unit: &'static str,
    pub value: f64,
    pub reference: Option<f64>,
    pub reference_name: Option<String>,
    pub ratio: Option<f64>,
    /// The target of a figure compared with its reference: at least this ratio.
    #[serde(skip)]
    pub min_ratio: Option<f64>,
    /// Its target counts as not met whatever the figure (errors, a backlog under it).
    #[serde(skip)]
    pub spoiled: bool,
    pub target: String,
    /// `None` when the figure has no target (context only).
    pub met: Option<bool>,
    pub note: Option<String>,
}

impl Figure {
    /// A figure with no target: context for the others.
    pub fn info(
        scenario: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        value: f64,
    ) -> Self {
        Self {
            scenario,
            name: name.into(),
            unit,
            value,
            reference: None,
            reference_name: None,
            ratio: None,
            min_ratio: None,
            spoiled: false,
            target: String::new(),
            met: None,
            note: None,
        }
    }

    /// A throughput compared with a reference; the target is `min_ratio` × the reference.
    pub fn versus(
        scenario: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        value: f64,
        reference: f64,
        reference_name: impl Into<String>,
        min_ratio: Option<f64>,
    ) -> Self {
        let ratio = if reference > 0.0 {
            value / reference
        } else {
            f64::NAN
        };
        Self {
            reference: Some(reference),
            reference_name: Some(reference_name.into()),
            ratio: Some(ratio),
            min_ratio,
            target: min_ratio
                .map(|r| format!(">= {r}x ref"))
                .unwrap_or_default(),
            met: min_ratio.map(|r| ratio >= r),
            ..Self::info(scenario, name, unit, value)
        }
    }

    /// A figure that must stay below `limit`.
    pub fn below(
        scenario: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        value: f64,
        limit: f64,
    ) -> Self {
        Self {
            target: format!("< {limit} {unit}"),
            met: Some(value < limit),
            ..Self::info(scenario, name, unit, value)
        }
    }

    /// Adds a reference that is shown but not targeted.
    pub fn with_reference(mut self, reference: f64, name: impl Into<String>) -> Self {
        self.reference = Some(reference);
        self.reference_name = Some(name.into());
        self.ratio = (reference > 0.0).then(|| self.value / reference);
        self
    }

    /// The same figure against another measure of its reference (the mean of the reference
    /// measured before and after, say): ratio and verdict again.
    pub fn rebase(mut self, reference: f64) -> Self {
        if self.reference.is_none() {
            return self;
        }
        let ratio = if reference > 0.0 {
            self.value / reference
        } else {
            f64::NAN
        };
        self.reference = Some(reference);
        self.ratio = Some(ratio);
        self.met = self.min_ratio.map(|min| !self.spoiled && ratio >= min);
        self
    }

    /// Its target counts as not met, whatever the figure.
    pub fn spoil(mut self) -> Self {
        self.spoiled = true;
        if self.met.is_some() {
            self.met = Some(false);
        }
        self
    }

    /// Measured on a backlog another phase left (its settling gave up): noted, and no target
    /// counts as met.
    pub fn after_backlog(mut self, backlog: &Option<String>) -> Self {
        if let Some(backlog) = backlog {
            self = self
                .note(format!("NOT measured on a settled service: {backlog}"))
                .spoil();
        }
        self
    }

    /// Adds a note (appended to any earlier one).
    pub fn note(mut self, note: impl Into<String>) -> Self {
        let note = note.into();
        self.note = Some(match self.note.take() {
            Some(earlier) => format!("{earlier}; {note}"),
            None => note,
        });
        self
    }
}

/// What the scenarios run against.
pub struct Bench {
    /// The bench's own pool (the app has its own, as in production).
    pub pool: PgPool,
    pub store: Arc<PgStore>,
    pub http: reqwest::Client,
    /// `http://127.0.0.1:<port>` of the app started in this process.
    pub base: String,
    pub api_key: String,
    pub quick: bool,
    pub service: ServiceRef,
    /// The scalar the SendGrid public key configured in the app was derived from.
    pub signing_secret: [u8; 32],
    /// The best in-process "send now" rate `commands` measured until every message was sent
    /// and projected (what the whole pipeline sustains), for `lag`.
    pub peak_send_rate: Option<f64>,
    /// `--lag-rate`: the load for `lag`, instead of half the peak.
    pub lag_rate: Option<f64>,
    /// `--clients`: the client counts `commands` runs.
    pub clients: Vec<usize>,
    /// The in-process service's settings as environment variables (`DATABASE_URL`,
    /// `MESSAGING_*`), for a service started as a separate process.
    pub service_env: Vec<(&'static str, String)>,
}

impl Bench {
    /// `quick` or `full`, picked by `--quick`.
    pub fn size<T>(&self, quick: T, full: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

/// The text of every benchmark message: a short, ordinary email.
const BODY: &str = "Hi Alice, our spring collection is out: twenty new designs, free shipping \
                    this week, and a ten percent discount for subscribers. See you soon!";

/// A Compose command for a new email from `service`.
pub fn compose(service: &ServiceRef, dispatch: Dispatch) -> Result<(MessageId, MessageCommand)> {
    let input = MessageInput {
        to: vec![Profile::new("alice@example.com", Some("Alice".into()))],
        subject: Some("Spring collection".into()),
        text: Some(BODY.into()),
        ..MessageInput::default()
    };
    let message = build_message(service, input).map_err(|e| anyhow!("building a message: {e}"))?;
    let id = MessageId::from_uuid(uuid::Uuid::now_v7());
    let command = MessageCommand::Compose(Compose {
        id,
        message,
        dispatch,
        now: Utc::now(),
    });
    Ok((id, command))
}

/// Composes one message through `PgStore::execute`.
pub async fn execute_compose(
    store: &PgStore,
    service: &ServiceRef,
    dispatch: Dispatch,
) -> Result<MessageId> {
    let (id, command) = compose(service, dispatch)?;
    store
        .execute(id, command)
        .await
        .map_err(|e| anyhow!("compose: {e}"))?;
    Ok(id)
}

/// The JSON body of `POST /v1/messages` for the same message.
pub fn compose_body(service: &ServiceRef, publish_at: Option<DateTime<Utc>>) -> serde_json::Value {
    let mut body = serde_json::json!({
        "service_id": service.id.to_string(),
        "to": [{"username": "alice@example.com", "name": "Alice"}],
        "subject": "Spring collection",
        "text": BODY,
    });
    match publish_at {
        Some(at) => body["publish_at"] = serde_json::json!(at),
        None => body["send"] = serde_json::json!(true),
    }
    body
}

/// What a closed-loop run did.
pub struct LoopResult {
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub first_error: Option<String>,
}

impl LoopResult {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `op` back to back from `clients` concurrent clients for `duration`.
pub async fn closed_loop<F, Fut>(clients: usize, duration: Duration, op: F) -> LoopResult
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (op, ok, errors, first_error) =
                (op.clone(), ok.clone(), errors.clone(), first_error.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    match op().await {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            if let Ok(mut first) = first_error.lock() {
                                first.get_or_insert_with(|| format!("{e:#}"));
                            }
                            errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    let first_error = first_error.lock().ok().and_then(|mut f| f.take());
    LoopResult {
        ok: ok.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        first_error,
    }
}

/// The `p` quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Writes `n` messages' events directly, in the exact rows postgres-es writes (the aggregate's
/// own `decide`, serde JSON payloads, `event_version` "1", empty metadata), a few thousand
/// messages per statement and transaction. Much faster than commands; used to set up data.
pub async fn insert_messages(
    pool: &PgPool,
    service: &ServiceRef,
    n: usize,
    dispatch: impl Fn(usize) -> Dispatch,
) -> Result<Vec<MessageId>> {
    const CHUNK: usize = 2_000;
    let mut ids = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let end = (start + CHUNK).min(n);
        let (mut agg_ids, mut seqs, mut types, mut payloads) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in start..end {
            let (id, command) = compose(service, dispatch(i))?;
            let events = Message::default()
                .decide(command)
                .map_err(|e| anyhow!("deciding a bench message: {e}"))?;
            for (seq, event) in events.iter().enumerate() {
                agg_ids.push(id.to_string());
                seqs.push(seq as i64 + 1);
                types.push(event.type_name());
                payloads.push(serde_json::to_string(event).context("serialising an event")?);
            }
            ids.push(id);
        }
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
                                 payload, metadata) \
             SELECT 'Message', a, s, t, '1', p::json, '{}'::json \
             FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[]) AS u(a, s, t, p)",
        )
        .bind(&agg_ids)
        .bind(&seqs)
        .bind(&types)
        .bind(&payloads)
        .execute(pool)
        .await
        .context("bulk-inserting events")?;
        start = end;
    }
    Ok(ids)
}

/// Events not yet handled by each subscription, summed, plus send jobs still open.
pub async fn backlog(pool: &PgPool) -> Result<(i64, i64)> {
    let (events, jobs): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events e, subscription_checkpoints c \
                 WHERE (e.transaction_id, e.global_position) > (c.last_transaction_id, c.last_global_position)), \
                (SELECT count(*) FROM send_jobs)",
    )
    .fetch_one(pool)
    .await
    .context("reading the backlog")?;
    Ok((events, jobs))
}

/// Waits (at most `cap`) until every subscription has caught up and no send job is open, so the
/// next run does not pay for the previous one. Returns how long it took and what was left.
pub async fn settle(pool: &PgPool, cap: Duration) -> Result<(Duration, i64, i64)> {
    let started = Instant::now();
    loop {
        let (events, jobs) = backlog(pool).await?;
        if events == 0 && jobs == 0 {
            return Ok((started.elapsed(), events, jobs));
        }
        if started.elapsed() >= cap {
            let warning = format!(
                "settling gave up after {cap:?}: {jobs} send jobs open, {events} (event, subscription) pairs unread"
            );
            eprintln!("bench: {warning}");
            if let Ok(mut all) = UNSETTLED.lock() {
                all.push(warning);
            }
            return Ok((started.elapsed(), events, jobs));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every settling that gave up in this run: what came next was measured on a backlog.
static UNSETTLED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The warnings of [`settle`] so far, for the output.
pub fn unsettled() -> Vec<String> {
    UNSETTLED.lock().map(|w| w.clone()).unwrap_or_default()
}

/// Settles before a measurement; says what was left when settling gave up.
pub async fn settle_before(pool: &PgPool, cap: Duration) -> Result<Option<String>> {
    let (_, events, jobs) = settle(pool, cap).await?;
    Ok((events > 0 || jobs > 0).then(|| {
        format!("{jobs} send jobs open, {events} (event, subscription) pairs unread before it")
    }))
}

/// Connects a sandbox email service through the API and returns it as commands carry it.
pub async fn create_service(
    http: &reqwest::Client,
    base: &str,
    api_key: &str,
    username: &str,
) -> Result<ServiceRef> {
    let response = http
        .post(format!("{base}/v1/services"))
        .bearer_auth(api_key)
        .json(
            &serde_json::json!({"channel": "email", "provider": "sandbox", "name": "Bench",
                                  "username": username, "credentials": {}}),
        )
        .send()
        .await
        .context("POST /v1/services")?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.context("POST /v1/services: body")?;
    if status.as_u16() != 201 {
        return Err(anyhow!("POST /v1/services: {status}: {body}"));
    }
    let id = body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("POST /v1/services: no id in {body}"))?;
    Ok(ServiceRef {
        id,
        channel: messaging_domain::Channel::Email,
        provider: messaging_domain::Provider::Sandbox,
        username: username.to_string(),
        name: Some("Bench".into()),
    })
}
