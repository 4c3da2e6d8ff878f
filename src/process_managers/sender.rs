//! The sender: one process manager for every channel, driven by `send_jobs`.
//!
//! A worker claims due jobs (`FOR UPDATE SKIP LOCKED`; each service with a job due gets its
//! share of the round, so one busy account cannot starve the others, yet takes more of a round
//! the others do not fill when its rate allows) and takes a lease on each. For each job it
//! records `StartSendAttempt` first: that command is the fence that makes the provider call
//! happen once even if two workers ever hold the same job, since only one can start the
//! attempt. Then it calls the provider and records the classified outcome:
//!
//! - accepted: `RecordSent` with the provider's id;
//! - transient: `RecordSendFailure` with a retry time (exponential backoff with jitter, or the
//!   provider's `Retry-After` / rate-limit reset when later), until the last attempt fails it;
//! - permanent: `RecordSendFailure` without a retry: the message is `failed` with the reason;
//! - ambiguous (X, Facebook): `RecordSendOutcomeUnknown`, never retried blindly.
//!
//! A worker that dies during the provider call leaves the attempt open; when its lease expires
//! another worker recovers the job: email is retried (its stable Message-ID and `custom_args`
//! make a duplicate detectable), a post is recorded as an unknown outcome.

use crate::providers::{
    parse_credentials, Account, Credentials, OutgoingMessage, Providers, SendError, XRefresh,
};
use crate::store::{CommandError, PerService, SendJob, Store, StoreError};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use messaging_domain::{
    Channel, Message, MessageCommand, MessageData, MessageError, MessageId, MessageState, Provider,
    ServiceId,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex};

/// A round claims this many times the sender's concurrency: its bulk calls go this many
/// waves deep.
pub const WAVES: u32 = 4;

/// How the sender paces and retries.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Provider attempts before a transient failure becomes final.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubled for each one after, with ±25 % jitter.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// How long a claimed job is held before another worker may recover it.
    pub lease: Duration,
    /// Jobs sent at once by one worker.
    pub concurrency: usize,
    /// Jobs one round claims for one service at least (when it has them): more when the
    /// other services leave the round room, up to the larger of this and half a second of
    /// its rate (see [`PerService`]).
    pub per_service_per_round: i64,
    /// Sends per second allowed for one service by one worker (a token bucket), and its burst.
    pub per_service_rate: f64,
    pub per_service_burst: f64,
    /// No attempt's provider call can still be running this long after the attempt started:
    /// an attempt open for longer was abandoned (its worker died) and may be recovered; a
    /// younger one may still be in a live call. A bulk round starts its attempts together and
    /// makes the calls [`WAVES`] waves deep, so this is [`WAVES`] of the longest call, and some.
    pub call_outlived_after: Duration,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(300),
            lease: Duration::from_secs(120),
            concurrency: 16,
            per_service_per_round: 50,
            per_service_rate: 20.0,
            per_service_burst: 40.0,
            call_outlived_after: Duration::from_secs(125),
        }
    }
}

/// The longest a job of a round waits for its service's send token; one that would wait
/// longer is given back, due when the token is.
const WAIT_FOR_A_TOKEN_AT_MOST: Duration = Duration::from_secs(2);

/// A token bucket per service, so one busy account is paced without holding others back.
#[derive(Default)]
struct RateLimiter {
    buckets: Mutex<HashMap<ServiceId, (f64, tokio::time::Instant)>>,
}

impl RateLimiter {
    /// Takes a token, now or ahead of time (the bucket may go below zero: the tokens promised
    /// to earlier callers); returns how long until it is really there. One not used is given
    /// back with [`Self::refund`].
    async fn reserve(&self, service: ServiceId, rate: f64, burst: f64) -> Duration {
        let mut buckets = self.buckets.lock().await;
        let tokens = refilled(&mut buckets, service, rate, burst);
        *tokens -= 1.0;
        if *tokens >= 0.0 {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64(-*tokens / rate.max(f64::MIN_POSITIVE))
            .unwrap_or(Duration::MAX)
            .min(Duration::from_secs(3600))
    }

    /// Gives back a token [`Self::reserve`] took and that will not be used.
    async fn refund(&self, service: ServiceId, burst: f64) {
        if let Some((tokens, _)) = self.buckets.lock().await.get_mut(&service) {
            *tokens = (*tokens + 1.0).min(burst);
        }
    }

    /// Takes a token if one is there now.
    async fn try_take(&self, service: ServiceId, rate: f64, burst: f64) -> bool {
        let mut buckets = self.buckets.lock().await;
        let tokens = refilled(&mut buckets, service, rate, burst);
        let there = *tokens >= 1.0;
        if there {
            *tokens -= 1.0;
        }
        there
    }
}

/// The service's tokens, refilled at `rate` (up to `burst`) for the time since they were last
/// counted; a new bucket starts full.
fn refilled(
    buckets: &mut HashMap<ServiceId, (f64, tokio::time::Instant)>,
    service: ServiceId,
    rate: f64,
    burst: f64,
) -> &mut f64 {
    let now = tokio::time::Instant::now();
    let (tokens, last) = buckets.entry(service).or_insert((burst, now));
    *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(burst);
    *last = now;
    tokens
}

#[derive(Clone)]
pub struct Sender {
    store: Arc<dyn Store>,
    providers: Arc<Providers>,
    config: SenderConfig,
    limiter: Arc<RateLimiter>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// True once the service is stopping (set by [`Sender::run`]): no provider call is begun
    /// after it, so a round ends with the calls already running (see [`SendError::NotCalled`]).
    stopping: Option<watch::Receiver<bool>>,
    /// One X token renewal at a time per service (see [`Sender::account`]).
    renewals: Arc<std::sync::Mutex<HashMap<ServiceId, Arc<Mutex<()>>>>>,
}

/// What happened to one claimed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    Sent,
    RetryScheduled,
    Failed,
    Unknown,
    /// Nothing to do (already sent, cancelled, or another worker has it).
    Skipped,
}

impl Sender {
    pub fn new(store: Arc<dyn Store>, providers: Arc<Providers>, config: SenderConfig) -> Self {
        Self {
            store,
            providers,
            config,
            limiter: Arc::default(),
            metrics: None,
            stopping: None,
            renewals: Arc::default(),
        }
    }

    /// Whether the service is stopping: calls not begun yet are left for later.
    fn stopping(&self) -> bool {
        self.stopping.as_ref().is_some_and(|s| *s.borrow())
    }

    /// Counts send outcomes by provider.
    pub fn with_metrics(self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..self
        }
    }

    /// Claims due jobs and leases them.
    async fn claim(&self, limit: i64) -> Result<Vec<SendJob>, StoreError> {
        // A service's share of the round goes up to what its rate sends in half a second (or
        // the floor, as before, for a slow rate): a busy service's bucket is about empty at
        // each claim, and a job claimed beyond its tokens waits for them on the one-job path,
        // holding the whole round back.
        let per_service = PerService {
            least: self.config.per_service_per_round,
            most: ((self.config.per_service_rate * 0.5) as i64)
                .max(self.config.per_service_per_round),
        };
        self.store
            .claim_send_jobs(limit, per_service, self.config.lease)
            .await
    }

    /// Claims one round of due jobs and sends them; returns what happened to each.
    ///
    /// The common case (a pending email with no attempt open) goes in bulk: the round's
    /// messages are read in one query, their attempts started as one batch of commands, the
    /// provider calls made concurrently, and the outcomes recorded in batches as calls
    /// finish. Anything else (an attempt to recover, a message the provider already reported
    /// on, a job with nothing left to send) takes the one-job path, and so do posts: in
    /// bulk, a crash between the round's starts and its calls would leave attempts open that
    /// recovery must record as unknown outcomes (a post is never retried blindly), posts that
    /// were never made among them. An email's open attempt is retried on recovery, its
    /// stable Message-ID making a duplicate detectable, so only emails share a round's window.
    pub async fn run_once(&self) -> Result<Vec<JobOutcome>, StoreError> {
        let jobs = self
            .claim(self.config.concurrency as i64 * i64::from(WAVES))
            .await?;
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<MessageId> = jobs.iter().map(|job| job.message_id).collect();
        let messages = self.store.load_messages(&ids).await?;
        let (mut plain, mut other) = (Vec::new(), Vec::new());
        for job in jobs {
            match messages.get(&job.message_id).and_then(|m| m.data()) {
                // In bulk only with its service's token in hand: the bulk path calls every
                // provider at once, so a job that must wait for its turn waits on the one-job
                // path, which takes the token just before it starts the attempt and calls
                // (the calls stay paced, and the message can be cancelled while it waits).
                Some(d) if d.channel == Channel::Email && ready_to_send(d) => {
                    let paced = self
                        .limiter
                        .try_take(
                            job.service_id,
                            self.config.per_service_rate,
                            self.config.per_service_burst,
                        )
                        .await;
                    if paced {
                        plain.push((job, d));
                    } else {
                        other.push(job);
                    }
                }
                _ => other.push(job),
            }
        }
        // The bulk first: its tokens were taken just now.
        let mut outcomes = self.send_batch(plain).await;
        let one_by_one: Vec<JobOutcome> = futures::stream::iter(other)
            .map(|job| self.process_logged(job, messages.get(&job.message_id)))
            .buffer_unordered(self.config.concurrency)
            .collect()
            .await;
        outcomes.extend(one_by_one);
        Ok(outcomes)
    }

    /// One job on its own; an error is logged and the job left to be recovered.
    async fn process_logged(&self, job: SendJob, message: Option<&Message>) -> JobOutcome {
        let id = job.message_id;
        match self.process(&job, message).await {
            Ok(outcome) => outcome,
            Err(error) => {
                // The lease expires and the job is recovered: nothing is lost.
                tracing::error!(message_id = %id, %error, "send job failed; it will be recovered");
                JobOutcome::Skipped
            }
        }
    }

    /// Jobs whose messages are ready to send, each with its service's token taken: start
    /// every attempt in one batch, call the providers, record the outcomes in waves as the
    /// calls finish (one batch each).
    async fn send_batch(&self, jobs: Vec<(SendJob, &MessageData)>) -> Vec<JobOutcome> {
        let mut outcomes = Vec::with_capacity(jobs.len());
        // Stopping since the claim: nothing started, every job given back.
        if self.stopping() {
            for (job, _) in &jobs {
                if let Err(error) = self.given_back(job).await {
                    tracing::warn!(message_id = %job.message_id, %error, "a claimed job was not given back; it waits for its lease's end");
                }
                outcomes.push(JobOutcome::Skipped);
            }
            return outcomes;
        }
        // Each service's account read once for the round, before any attempt starts: the
        // reads (a pool's wait each) would otherwise run on the time recovery allows a call
        // (`call_outlived_after` counts from the attempt's start).
        let mut accounts: HashMap<ServiceId, Result<Account, SendError>> = HashMap::new();
        for (job, _) in &jobs {
            if let std::collections::hash_map::Entry::Vacant(entry) = accounts.entry(job.service_id)
            {
                entry.insert(self.account(job.service_id).await);
            }
        }
        // The fence: only one worker can start each attempt.
        let now = crate::clock::now();
        let starts = jobs
            .iter()
            .map(|(job, d)| {
                let attempt = d.attempts + 1;
                (
                    job.message_id,
                    MessageCommand::StartSendAttempt { now, attempt },
                )
            })
            .collect();
        let started = self.store.execute_each(starts).await;
        let mut to_send = Vec::with_capacity(jobs.len());
        for ((job, d), result) in jobs.into_iter().zip(started) {
            match result {
                Ok(()) => to_send.push((job, d)),
                Err(CommandError::Rejected(MessageError::InvalidTransition { .. })) => {
                    outcomes.push(JobOutcome::Skipped)
                }
                Err(error) => {
                    tracing::error!(message_id = %job.message_id, %error, "send job failed; it will be recovered");
                    outcomes.push(JobOutcome::Skipped);
                }
            }
        }
        // Owned inputs, so each call's future borrows nothing but the sender.
        let calls: Vec<_> = to_send
            .into_iter()
            .map(|(job, d)| {
                let account = accounts.get(&job.service_id).cloned().unwrap_or_else(|| {
                    Err(SendError::Transient {
                        reason: format!("service {} was not read", job.service_id),
                        retry_after: None,
                    })
                });
                let recorded = (job.message_id, d.channel, d.provider, d.attempts + 1);
                (recorded, account, outgoing(d))
            })
            .collect();
        // Outcomes recorded as calls finish: each wave is every answer that came while the
        // previous wave was being recorded, so an email sent stays unrecorded (and would be
        // sent again by a recovery) only for about two waves' time. The calls go on while a
        // wave is recorded (both halves are polled together); when the calls were a stream
        // read between waves, a wave's recording held back the next calls, and a round of 64
        // then took about eight waves, a commit each.
        let (answered, mut answers) = tokio::sync::mpsc::unbounded_channel();
        let calling = async move {
            futures::stream::iter(calls)
                .map(|(recorded, account, outgoing)| async move {
                    if self.stopping() {
                        let reason = "not sent: the service stopped before the provider call";
                        return (
                            recorded,
                            Err(SendError::NotCalled {
                                reason: reason.into(),
                            }),
                        );
                    }
                    let result = match account {
                        Ok(account) => {
                            let provider = self.providers.for_provider(account.provider);
                            provider.send(&account, &outgoing).await
                        }
                        Err(error) => Err(error),
                    };
                    (recorded, result)
                })
                .buffer_unordered(self.config.concurrency)
                .for_each(|answer| {
                    // The receiver lives until every answer is recorded.
                    let _ = answered.send(answer);
                    std::future::ready(())
                })
                .await;
            // Ends the recording once the last wave is in.
            drop(answered);
        };
        let recording = async {
            let mut recorded = Vec::new();
            while let Some(first) = answers.recv().await {
                let mut wave = vec![first];
                while let Ok(next) = answers.try_recv() {
                    wave.push(next);
                }
                recorded.extend(self.record_wave(wave).await);
            }
            recorded
        };
        let ((), recorded) = tokio::join!(calling, recording);
        outcomes.extend(recorded);
        outcomes
    }

    /// The earliest time a job becomes claimable.
    pub async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.store.next_send_job_due().await
    }

    async fn execute(&self, id: MessageId, command: MessageCommand) -> Result<(), CommandError> {
        self.store.execute(id, command).await
    }

    /// One job, its message as the round read it (`None`: no such message).
    async fn process(
        &self,
        job: &SendJob,
        message: Option<&Message>,
    ) -> Result<JobOutcome, CommandError> {
        let (id, service_id) = (job.message_id, job.service_id);
        let Some(d) = message.and_then(Message::data) else {
            return Ok(JobOutcome::Skipped);
        };
        if d.provider_has_it() && d.sent_at.is_none() {
            return self.provider_has_it(id).await;
        }
        if d.attempt_in_progress {
            // A job claimable while its attempt is open is normally one whose worker died
            // (its lease ran out). But a lease can also be lost while the call is running (a
            // rebuild of `delivery` re-creates every job unleased): recovering then would
            // retry an email still being sent, or call a live post unknown. Only an attempt
            // older than any call can be is recovered; a younger one is left to its lease.
            // A fold from before the start was kept: as old as can be. A start that looks
            // later than now (another instance's clock ahead): just started.
            let age = match d.attempt_started_at {
                None => Duration::MAX,
                Some(at) => (crate::clock::now() - at)
                    .to_std()
                    .unwrap_or(Duration::ZERO),
            };
            if age < self.config.call_outlived_after {
                // Looked at again once no call can still be running, not at this claim's
                // lease end: with a lease shorter than that wait (the defaults: 120 s against
                // 125), the next claim found it still too young, and recovery took two leases.
                let due = d
                    .attempt_started_at
                    .and_then(|at| crate::clock::after(at, self.config.call_outlived_after));
                return match due {
                    Some(due) => self.given_back_until(job, Some(due)).await,
                    None => Ok(JobOutcome::Skipped),
                };
            }
            return self.recover(id, d).await;
        }
        if d.lifecycle != MessageState::Pending || d.outcome_unknown || d.sent_at.is_some() {
            // Nothing left to send (the projection removes such jobs; this one raced it). The
            // round's read may be seconds old by now: the job is deleted only as this claim
            // holds it, not if the message was queued again since.
            self.store
                .delete_send_job(job)
                .await
                .map_err(|e| CommandError::Store(e.to_string()))?;
            return Ok(JobOutcome::Skipped);
        }
        // Stopping: nothing started, and the job is given back for the next claim (here after
        // the restart, or by another instance) rather than held to its lease's end.
        if self.stopping() {
            return self.given_back(job).await;
        }
        // The service's token: waited for when it comes soon; else the job is given back, due
        // when the token is, so that a slow rate does not hold the whole round (and the jobs
        // of other services queued after it began) behind this one, nor outlast its lease.
        let (rate, burst) = (self.config.per_service_rate, self.config.per_service_burst);
        let wait = self.limiter.reserve(service_id, rate, burst).await;
        if wait > WAIT_FOR_A_TOKEN_AT_MOST {
            self.limiter.refund(service_id, burst).await;
            let due = crate::clock::after(crate::clock::now(), wait);
            return self.given_back_until(job, due).await;
        }
        tokio::time::sleep(wait).await;
        if self.stopping() {
            self.limiter.refund(service_id, burst).await;
            return self.given_back(job).await;
        }
        // Read (and an X token renewed) before the attempt starts: a renewal is a call of its
        // own, and the time recovery allows the attempt counts from its start.
        let account = self.account(service_id).await;
        // The fence: only one worker can start this attempt.
        match self
            .execute(
                id,
                MessageCommand::StartSendAttempt {
                    now: crate::clock::now(),
                    attempt: d.attempts + 1,
                },
            )
            .await
        {
            Ok(()) => {}
            Err(CommandError::Rejected(MessageError::InvalidTransition { .. })) => {
                return Ok(JobOutcome::Skipped)
            }
            Err(e) => return Err(e),
        }
        let attempt = d.attempts + 1;
        let result = match account {
            Ok(account) => {
                let outgoing = outgoing(d);
                let provider = self.providers.for_provider(account.provider);
                provider.send(&account, &outgoing).await
            }
            Err(error) => Err(error),
        };
        self.record(id, d.channel, d.provider, attempt, result)
            .await
    }

    /// A claimed job left untouched, given back (see [`Store::release_send_job`]).
    async fn given_back(&self, job: &SendJob) -> Result<JobOutcome, CommandError> {
        self.given_back_until(job, None).await
    }

    /// [`Self::given_back`], claimable again at `due_at` (at once when `None`).
    async fn given_back_until(
        &self,
        job: &SendJob,
        due_at: Option<chrono::DateTime<Utc>>,
    ) -> Result<JobOutcome, CommandError> {
        self.store
            .release_send_job(job, due_at)
            .await
            .map_err(|e| CommandError::Store(e.to_string()))?;
        Ok(JobOutcome::Skipped)
    }

    /// Records a wave of provider answers as one batch of commands.
    async fn record_wave(
        &self,
        results: Vec<(Attempted, Result<crate::providers::Accepted, SendError>)>,
    ) -> Vec<JobOutcome> {
        let mut outcomes = Vec::with_capacity(results.len());
        let mut commands = Vec::with_capacity(results.len());
        let mut recorded = Vec::with_capacity(results.len());
        for ((id, channel, provider, attempt), result) in results {
            let (command, outcome) = self.outcome(id, channel, attempt, result);
            commands.push((id, command));
            recorded.push((id, provider, outcome));
        }
        let results = self.store.execute_each(commands).await;
        for ((id, provider, outcome), result) in recorded.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    if let Some(metrics) = &self.metrics {
                        metrics.send(provider.as_str(), outcome);
                    }
                    outcomes.push(outcome);
                }
                Err(error) => {
                    // The attempt stays open: when the lease expires the job is recovered.
                    tracing::error!(message_id = %id, %error, "could not record a send outcome; it will be recovered");
                    outcomes.push(JobOutcome::Skipped);
                }
            }
        }
        outcomes
    }

    /// The service's account. A database error is transient (the attempt is retried like a
    /// provider that could not be reached); a service gone or credentials that cannot be used
    /// fail the message, since no retry fixes them. An X OAuth 2.0 token about to expire is
    /// renewed first (see [`Self::renewed`]).
    async fn account(&self, service_id: ServiceId) -> Result<Account, SendError> {
        let (service, stored) = self.stored_credentials(service_id).await?;
        let mut credentials = parse_stored(service_id, service.provider, &stored)?;
        if due_renewal(&credentials).is_some() {
            // One renewal at a time per service in this instance: the jobs of one round (the
            // one-job path runs many at once) would each spend the same refresh token, and X
            // takes it once. The others find the renewed token, read again here, when the
            // first is done.
            let lock = self.renewal_lock(service_id);
            let _renewing = lock.lock().await;
            let (_, stored) = self.stored_credentials(service_id).await?;
            credentials = parse_stored(service_id, service.provider, &stored)?;
            if let Some(refresh) = due_renewal(&credentials).cloned() {
                credentials = match self
                    .renewed(service_id, service.provider, stored, &refresh)
                    .await
                {
                    Ok(renewed) => renewed,
                    // The token it has still works for a while: used, and renewed again at
                    // the next round.
                    Err(error)
                        if refresh
                            .expires_at
                            .is_some_and(|at| at > crate::clock::now()) =>
                    {
                        tracing::warn!(%service_id, %error, "x access token not renewed yet; the current one is used until it expires");
                        credentials
                    }
                    Err(error) => return Err(error),
                };
            }
        }
        Ok(Account {
            service_id,
            provider: service.provider,
            username: service.username,
            name: service.name,
            credentials,
        })
    }

    /// The service and its stored credentials (see [`Self::account`] for the errors).
    async fn stored_credentials(
        &self,
        service_id: ServiceId,
    ) -> Result<(crate::store::Service, serde_json::Value), SendError> {
        self.store
            .service_credentials(service_id)
            .await
            .map_err(|e| SendError::Transient {
                reason: format!("cannot read service {service_id}: {e}"),
                retry_after: None,
            })?
            .ok_or_else(|| SendError::Permanent {
                reason: format!("service {service_id} no longer exists"),
            })
    }

    fn renewal_lock(&self, service_id: ServiceId) -> Arc<Mutex<()>> {
        let mut locks = self
            .renewals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.entry(service_id).or_default().clone()
    }

    /// An X account's OAuth 2.0 access token renewed, and stored for every instance with the
    /// refresh token X gave in exchange (the one used is spent), only if the stored
    /// credentials are still the ones renewed. When another instance renewed them first (X
    /// then refuses this one's spent refresh token, or this one's store finds them changed),
    /// that renewal is used once it is stored. Errors are transient: the attempt is retried.
    async fn renewed(
        &self,
        service_id: ServiceId,
        provider: Provider,
        stored: serde_json::Value,
        refresh: &XRefresh,
    ) -> Result<Credentials, SendError> {
        let renewed = match self.providers.x().renew(refresh).await {
            Ok(renewed) => renewed,
            Err(error) => {
                tracing::warn!(%service_id, %error, "x access token not renewed");
                return self.renewed_elsewhere(service_id, &stored, error).await;
            }
        };
        let now = crate::clock::now();
        // X documents two hours; an answer without a lifetime is taken to be as long.
        let lasts = renewed.expires_in.unwrap_or(X_TOKEN_LIFETIME);
        let expires_at = crate::clock::after(now, lasts).unwrap_or(now);
        let mut credentials = stored.clone();
        if let Some(fields) = credentials.as_object_mut() {
            fields.insert("bearer_token".into(), renewed.access_token.expose().into());
            if let Some(token) = &renewed.refresh_token {
                fields.insert("refresh_token".into(), token.expose().into());
            }
            fields.insert(
                "expires_at".into(),
                expires_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                    .into(),
            );
        }
        // Checked before it is stored: an answer that cannot be used is not kept.
        let parsed =
            parse_credentials(provider, &credentials).map_err(|e| SendError::Transient {
                reason: format!("x token: the renewed credentials cannot be used: {e}"),
                retry_after: None,
            })?;
        // The old refresh token is spent: the new one is lost if this write is, and the
        // account with it. A few tries before giving up.
        let mut tries = 0;
        loop {
            tries += 1;
            match self
                .store
                .replace_service_credentials(service_id, &credentials, Some(&stored))
                .await
            {
                Ok(true) => {
                    tracing::info!(%service_id, "x access token renewed");
                    return Ok(parsed);
                }
                Ok(false) => {
                    let error = SendError::Transient {
                        reason: format!("service {service_id} is gone or its credentials changed"),
                        retry_after: None,
                    };
                    return self.renewed_elsewhere(service_id, &stored, error).await;
                }
                Err(e) if tries < STORE_RENEWAL_TRIES => {
                    tracing::warn!(%service_id, error = %e, "the renewed x access token was not stored yet; trying again");
                    tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                }
                Err(e) => {
                    tracing::error!(%service_id, error = %e, "the renewed x access token could not be stored: the account must be connected again");
                    return Err(SendError::Transient {
                        reason: format!(
                            "the renewed X access token could not be stored ({e}); if sends \
                             keep failing, connect the account again and PUT its new credentials"
                        ),
                        retry_after: None,
                    });
                }
            }
        }
    }

    /// The credentials another instance renewed while this one tried (read again a few times,
    /// for its renewal to be stored), else `error`.
    async fn renewed_elsewhere(
        &self,
        service_id: ServiceId,
        stored: &serde_json::Value,
        error: SendError,
    ) -> Result<Credentials, SendError> {
        for wait in [0, 250, 500, 1000] {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            if let Ok((service, now)) = self.stored_credentials(service_id).await {
                if now != *stored {
                    return parse_stored(service_id, service.provider, &now);
                }
            }
        }
        Err(error)
    }

    async fn record(
        &self,
        id: MessageId,
        channel: Channel,
        provider: Provider,
        attempt: u32,
        result: Result<crate::providers::Accepted, SendError>,
    ) -> Result<JobOutcome, CommandError> {
        let (command, outcome) = self.outcome(id, channel, attempt, result);
        self.execute(id, command).await?;
        if let Some(metrics) = &self.metrics {
            metrics.send(provider.as_str(), outcome);
        }
        Ok(outcome)
    }

    /// The command that records a provider's answer to one attempt (logged here), and the
    /// job's outcome once it is recorded.
    fn outcome(
        &self,
        id: MessageId,
        channel: Channel,
        attempt: u32,
        result: Result<crate::providers::Accepted, SendError>,
    ) -> (MessageCommand, JobOutcome) {
        let now = crate::clock::now();
        match result {
            Ok(accepted) => {
                tracing::info!(message_id = %id, %channel, attempt, provider_message_id = accepted.provider_message_id.as_deref().unwrap_or(""), "sent");
                (
                    MessageCommand::RecordSent {
                        provider_message_id: accepted.provider_message_id,
                        at: now,
                    },
                    JobOutcome::Sent,
                )
            }
            Err(SendError::Transient {
                reason,
                retry_after,
            }) if attempt < self.config.max_attempts => {
                let wait =
                    super::backoff(self.config.base_backoff, self.config.max_backoff, attempt)
                        .max(retry_after.unwrap_or_default())
                        .min(super::LONGEST_PROVIDER_WAIT);
                // To the microsecond, as the service's times are (a provider's Retry-After
                // date is read to the nanosecond).
                let retry_at =
                    crate::clock::after(now, wait).unwrap_or(now + chrono::Duration::days(1));
                tracing::warn!(message_id = %id, attempt, %reason, retry_in_ms = wait.as_millis() as u64, "send failed; will retry");
                (
                    MessageCommand::RecordSendFailure {
                        attempt,
                        reason,
                        retry_at: Some(retry_at),
                        at: now,
                    },
                    JobOutcome::RetryScheduled,
                )
            }
            Err(SendError::Transient { reason, .. }) => {
                tracing::warn!(message_id = %id, attempt, %reason, "send failed on the last attempt");
                (
                    MessageCommand::RecordSendFailure {
                        attempt,
                        reason: format!("{reason} (gave up after {attempt} attempts)"),
                        retry_at: None,
                        at: now,
                    },
                    JobOutcome::Failed,
                )
            }
            Err(SendError::Permanent { reason }) => {
                tracing::warn!(message_id = %id, attempt, %reason, "provider refused the message");
                (
                    MessageCommand::RecordSendFailure {
                        attempt,
                        reason,
                        retry_at: None,
                        at: now,
                    },
                    JobOutcome::Failed,
                )
            }
            // The attempt was started but its call never begun: undone (it counts as no
            // attempt, and the message may be changed again until one is made), due again at
            // once. No provider attempt to count.
            Err(SendError::NotCalled { reason }) => {
                tracing::info!(message_id = %id, attempt, %reason, "send attempt abandoned before its call; due again");
                (
                    MessageCommand::AbandonSendAttempt {
                        attempt,
                        reason,
                        at: now,
                    },
                    JobOutcome::Skipped,
                )
            }
            Err(SendError::Ambiguous { reason }) => {
                tracing::warn!(message_id = %id, attempt, %reason, "send outcome unknown; not retried");
                (
                    MessageCommand::RecordSendOutcomeUnknown {
                        attempt,
                        reason,
                        at: now,
                    },
                    JobOutcome::Unknown,
                )
            }
        }
    }

    /// The provider already reported on the message (a webhook said delivered, opened, ...)
    /// though our record of its answer was lost: it has the message, so it is sent, and
    /// calling again would only send it twice.
    async fn provider_has_it(&self, id: MessageId) -> Result<JobOutcome, CommandError> {
        tracing::info!(message_id = %id, "the provider reported on it already: recorded as sent");
        self.execute(
            id,
            MessageCommand::RecordSent {
                provider_message_id: None,
                at: crate::clock::now(),
            },
        )
        .await?;
        Ok(JobOutcome::Sent)
    }

    /// A previous worker started an attempt and never recorded its outcome.
    async fn recover(&self, id: MessageId, d: &MessageData) -> Result<JobOutcome, CommandError> {
        let reason = "the sender stopped during the provider call".to_string();
        let result = match d.channel {
            // Email may be retried: duplicates are detectable by Message-ID and custom_args.
            Channel::Email => Err(SendError::Transient {
                reason,
                retry_after: None,
            }),
            Channel::Twitter | Channel::Facebook => Err(SendError::Ambiguous {
                reason: format!("{reason}; the post may have been published"),
            }),
        };
        // The attempt read as abandoned, by its number: if another worker recovered it and
        // started the next one meanwhile (this round's read is seconds old), that one is live,
        // and closing it would send its email again.
        match self
            .record(id, d.channel, d.provider, d.attempts, result)
            .await
        {
            Err(CommandError::Rejected(MessageError::InvalidTransition { .. })) => {
                tracing::info!(message_id = %id, attempt = d.attempts, "the attempt to recover was closed by another worker already");
                Ok(JobOutcome::Skipped)
            }
            other => other,
        }
    }

    /// Runs until `shutdown` turns true, woken by NOTIFY `send_jobs` and at the next due time.
    pub async fn run(
        mut self,
        mut wake: watch::Receiver<u64>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        self.stopping = Some(shutdown.clone());
        loop {
            if *shutdown.borrow() {
                return;
            }
            wake.borrow_and_update();
            match self.run_once().await {
                Ok(outcomes) if !outcomes.is_empty() => continue,
                Ok(_) => {}
                Err(error) => tracing::error!(%error, "sender round failed"),
            }
            let sleep = match self.next_due().await {
                Ok(Some(at)) => (at - crate::clock::now())
                    .to_std()
                    .unwrap_or(Duration::from_millis(50)),
                Ok(None) => Duration::from_secs(5),
                Err(_) => Duration::from_secs(1),
            }
            .clamp(Duration::from_millis(10), Duration::from_secs(5));
            tokio::select! {
                Ok(()) = wake.changed() => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}

/// An attempt made in a bulk round: the message, its channel and provider, the attempt number.
type Attempted = (MessageId, Channel, Provider, u32);

/// A message the sender may start an attempt on without looking further: pending, no attempt
/// open, no unknown outcome, not sent, no fact from the provider (not even `processed`).
fn ready_to_send(d: &MessageData) -> bool {
    d.lifecycle == MessageState::Pending
        && !d.attempt_in_progress
        && !d.outcome_unknown
        && d.sent_at.is_none()
        && !d.provider_has_it()
}

/// Tries at storing a renewed token before the renewal is given up (the new refresh token
/// with it).
const STORE_RENEWAL_TRIES: u64 = 4;

/// How long X's OAuth 2.0 access tokens last, when its answer does not say.
const X_TOKEN_LIFETIME: Duration = Duration::from_secs(7200);

/// Credentials as stored, parsed; unusable ones fail the message.
fn parse_stored(
    service_id: ServiceId,
    provider: Provider,
    stored: &serde_json::Value,
) -> Result<Credentials, SendError> {
    parse_credentials(provider, stored).map_err(|e| SendError::Permanent {
        reason: format!("service {service_id} has unusable credentials: {e}"),
    })
}

/// What renews these credentials' X access token, when it is to be renewed before it is used.
fn due_renewal(credentials: &Credentials) -> Option<&XRefresh> {
    match credentials {
        Credentials::XBearer {
            refresh: Some(refresh),
            ..
        } if needs_renewal(refresh) => Some(refresh),
        _ => None,
    }
}

/// How long before its expiry an OAuth 2.0 access token is renewed: a round's calls start
/// within it.
const RENEW_BEFORE_EXPIRY: chrono::Duration = chrono::Duration::minutes(5);

/// Whether an X access token is to be renewed before it is used: it expires soon, or when is
/// not known (credentials given without `expires_at`: renewed at the first send, known after).
fn needs_renewal(refresh: &XRefresh) -> bool {
    refresh
        .expires_at
        .is_none_or(|at| at < crate::clock::now() + RENEW_BEFORE_EXPIRY)
}

fn outgoing(d: &MessageData) -> OutgoingMessage {
    OutgoingMessage {
        message_id: d.id,
        channel: d.channel,
        from: d.from.clone(),
        to: d.to.clone(),
        subject: d.subject.clone(),
        text: d.text.clone(),
        html: d.html.clone(),
        link: d.link.clone(),
        in_reply_to: d.in_reply_to.clone(),
    }
}
