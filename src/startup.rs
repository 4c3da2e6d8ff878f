//! Start-up: the database (PostgreSQL, or the embedded SQLite default), migrations, the
//! workers and the HTTP server, in one process.

use crate::config::{Config, Database, Secret};
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::notify::{self, Wakeups};
use crate::process_managers::push::{PushConfig, Pusher};
use crate::process_managers::scheduler::Scheduler;
use crate::process_managers::sender::{Sender, SenderConfig};
use crate::providers::{ProviderConfig, Providers};
use crate::store::postgres::notify::spawn_listener;
use crate::store::postgres::{PgStore, MIGRATOR};
use crate::store::sqlite::{SqlitePools, SqliteStore};
use crate::store::Store;
use crate::webhooks::{
    self, applier::Applier, verify::SendgridVerifier, WebhookSecrets, WebhookState,
};
use anyhow::Context;
use axum::serve::ListenerExt;
use messaging_projections::{SqliteSubscription, Subscription};
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The database a process runs on, connected and migrated.
pub enum Backend {
    Postgres(PgPool),
    Sqlite {
        pools: SqlitePools,
        /// Held while the process runs: one process per SQLite file.
        lock: std::fs::File,
    },
}

impl Backend {
    /// Connects to the configured database (creating it if missing) and applies the
    /// migrations.
    pub async fn open(config: &Config) -> anyhow::Result<Self> {
        match &config.database {
            Database::Postgres(url) => {
                let pool = connect(url, config.database_max_connections).await?;
                migrate(&pool).await?;
                Ok(Self::Postgres(pool))
            }
            Database::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    create_private_dir(dir)?;
                }
                let lock = lock_sqlite_file(path)?;
                create_private_file(path)?;
                let pools = SqlitePools::open(path, config.database_max_connections)
                    .await
                    .with_context(|| {
                        format!("cannot open the SQLite database {}", path.display())
                    })?;
                crate::store::sqlite::MIGRATOR
                    .run(&pools.write)
                    .await
                    .context("applying database migrations failed")?;
                let released = crate::store::sqlite::release_leases_of_the_dead(&pools)
                    .await
                    .context("releasing the leases of the process that held the file before")?;
                if released > 0 {
                    tracing::info!(
                        released,
                        "took over the leases of the process that held the file before"
                    );
                }
                Ok(Self::Sqlite { pools, lock })
            }
        }
    }
}

/// Creates the database file if missing, readable by this user only: it holds the services'
/// credentials (SQLite gives its journal files the same mode).
fn create_private_file(path: &std::path::Path) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// Takes the lock file next to the database: the SQLite backend serves one process (its
/// workers coordinate in memory), so a second one stops at start-up and says why.
fn lock_sqlite_file(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = std::path::PathBuf::from(lock_path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot create the lock file {}", lock_path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another messaging process is using {}: the SQLite backend serves one process \
             (set DATABASE_URL=postgres://... to run several)",
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", lock_path.display()))
        }
    }
}

/// The bearer keys: `MESSAGING_API_KEYS`, else (the embedded default only: the configuration
/// refuses PostgreSQL without keys) the key in `<data dir>/api-key`, generated on first start,
/// readable by this user only. Called once the SQLite lock is held.
pub fn api_keys(config: &Config) -> anyhow::Result<Vec<Secret>> {
    if !config.api_keys.is_empty() {
        return Ok(config.api_keys.clone());
    }
    let path = config.data_dir.join("api-key");
    if let Some(key) = read_key(&path)? {
        tracing::info!(path = %path.display(), "no MESSAGING_API_KEYS: using the key in this file");
        return Ok(vec![key]);
    }
    create_private_dir(&config.data_dir)?;
    let key = format!("msk_{}", hex::encode(rand::random::<[u8; 24]>()));
    // Written whole to a file of its own, then linked into place: the key file is never seen
    // half-written, and a key that appeared meanwhile is kept.
    let tmp = config.data_dir.join(format!(
        ".api-key.{}",
        hex::encode(rand::random::<[u8; 6]>())
    ));
    let written = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        std::io::Write::write_all(&mut file, format!("{key}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, &path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => {
            tracing::info!(path = %path.display(), "no MESSAGING_API_KEYS: generated an API key in this file");
            Ok(vec![Secret::new(key)])
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key(&path)?
            .map(|key| vec![key])
            .with_context(|| format!("{} is empty: delete it to get a new key", path.display())),
        Err(e) => Err(e).with_context(|| format!("cannot write {}", path.display())),
    }
}

fn read_key(path: &std::path::Path) -> anyhow::Result<Option<Secret>> {
    match std::fs::read_to_string(path) {
        Ok(key) if !key.trim().is_empty() => Ok(Some(Secret::new(key.trim()))),
        Ok(_) => anyhow::bail!("{} is empty: delete it to get a new key", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Creates `dir` if missing, readable by this user only (it holds the database, with the
/// services' credentials, and the API key).
fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Connects with the session settings every connection needs, creating the database first
/// if the server does not have it yet.
pub async fn connect(url: &Secret, max_connections: u32) -> anyhow::Result<PgPool> {
    let url = url.expose();
    let options = PgConnectOptions::from_str(url)
        .context("DATABASE_URL is not a valid PostgreSQL URL")?
        // One session stuck in a transaction would hold back every subscription reader
        // (they only read below the oldest running transaction): cut it off.
        .options([("idle_in_transaction_session_timeout", "60000")])
        // Every statement here is short; JIT compiling one costs more than running it
        // (measured: 205 ms of JIT for a 0.1 ms `/metrics` gauge query over 100k events,
        // chosen because the estimate of the correlated count crossed jit_above_cost).
        .options([("jit", "off")]);
    // The database itself first, once and directly (a pool would retry a refused connection
    // until its acquire timeout): the server's maintenance database (`postgres`), where one
    // is created, may be closed to this role (managed servers, PgBouncer), and is needed only
    // when the database is missing.
    let probe = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options);
    // As long as the pool would wait (a host that drops the attempt silently would otherwise
    // hold start-up for the system's TCP timeout).
    let probed = tokio::time::timeout(Duration::from_secs(10), probe)
        .await
        .map_err(|_| {
            anyhow::anyhow!("cannot connect to the database at DATABASE_URL: no answer within 10 s")
        })?;
    match probed {
        Ok(probe) => {
            let _ = sqlx::Connection::close(probe).await;
        }
        Err(e) if is_missing_database(&e) => match sqlx::Postgres::create_database(url).await {
            Ok(()) => tracing::info!("created the database named in DATABASE_URL"),
            // Another instance starting at the same time created it first.
            Err(e) if is_sqlstate(&e, "42P04") => {}
            Err(e) => {
                return Err(e).context(
                    "the database named in DATABASE_URL does not exist and cannot be created",
                )
            }
        },
        Err(e) => return Err(e).context("cannot connect to the database at DATABASE_URL"),
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .context("cannot connect to the database at DATABASE_URL")
}

/// PostgreSQL's "database does not exist".
fn is_missing_database(error: &sqlx::Error) -> bool {
    is_sqlstate(error, "3D000")
}

fn is_sqlstate(error: &sqlx::Error, sqlstate: &str) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == sqlstate)
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("applying database migrations failed")?;
    log_is_behind_the_clusters_transactions(pool).await
}

/// Refuses a log whose events carry transaction ids this cluster has not reached: a log
/// restored from a dump into another cluster, whose counter starts lower. Readers tail the log
/// by transaction id, so every new event would sort before their checkpoints and never be
/// read (nothing listed, nothing sent), silently.
async fn log_is_behind_the_clusters_transactions(pool: &PgPool) -> anyhow::Result<()> {
    let ahead: Option<(String, String)> = sqlx::query_as(
        // The newest stored id (an index step) against the next id this cluster will assign
        // (read from a snapshot, so that checking assigns none); an id is epoch * 2^32 + xid,
        // so the epoch after the newest one's puts every new id above every stored one.
        "SELECT newest::text, (div(newest::text::numeric, 4294967296) + 1)::text \
         FROM (SELECT transaction_id AS newest FROM events \
               ORDER BY transaction_id DESC LIMIT 1) e \
         WHERE newest >= pg_snapshot_xmax(pg_current_snapshot())",
    )
    .fetch_optional(pool)
    .await
    .context("cannot read the event log's newest transaction id")?;
    match ahead {
        None => Ok(()),
        Some((newest, epoch)) => anyhow::bail!(
            "the event log holds transaction ids up to {newest}, ahead of this PostgreSQL \
             cluster's (a restore into another cluster?): new events would never reach the \
             read models. Stop PostgreSQL, raise its transaction id epoch past the log's \
             (pg_resetwal --epoch={epoch} on the stopped cluster's data directory), then start \
             it and this service again"
        ),
    }
}

fn provider_config(config: &Config) -> ProviderConfig {
    let p = &config.providers;
    ProviderConfig {
        sendgrid_base_url: p.sendgrid_base_url.clone(),
        x_base_url: p.x_base_url.clone(),
        facebook_base_url: p.facebook_base_url.clone(),
        facebook_graph_version: p.facebook_graph_version.clone(),
        timeout: Duration::from_millis(p.timeout_ms),
        sandbox_dir: p.sandbox_dir.clone().into(),
    }
}

/// A stop waits `MESSAGING_SHUTDOWN_GRACE_MS` for the provider calls in flight; one that
/// takes longer is cut off, and a cut-off X or Facebook post becomes an unknown outcome for a
/// person to resolve (a cut-off email is sent again). Said at start-up when an HTTP provider
/// call may outlast the grace.
fn warn_of_a_short_grace(config: &Config) {
    if config.shutdown_grace_ms < config.providers.timeout_ms {
        tracing::warn!(
            grace_ms = config.shutdown_grace_ms,
            provider_timeout_ms = config.providers.timeout_ms,
            "MESSAGING_SHUTDOWN_GRACE_MS is shorter than MESSAGING_PROVIDER_TIMEOUT_MS: a stop \
             can cut an X or Facebook call off, and a post cut off is an unknown outcome to \
             resolve by hand"
        );
    }
}

fn webhook_secrets(config: &Config) -> anyhow::Result<WebhookSecrets> {
    let w = &config.webhooks;
    // A SendGrid public key as SendGrid shows it, refused at start-up naming its setting.
    let verifier = |key: &Option<Secret>, setting: &str| {
        key.as_ref()
            .map(|key| SendgridVerifier::from_base64_der(key.expose()))
            .transpose()
            .map_err(|e| anyhow::anyhow!("configuration: {setting}: {e}"))
    };
    let sendgrid_verifier = verifier(
        &w.sendgrid_public_key,
        "MESSAGING_SENDGRID_WEBHOOK_PUBLIC_KEY",
    )?;
    let sendgrid_inbound_verifier = verifier(
        &w.sendgrid_inbound_public_key,
        "MESSAGING_SENDGRID_INBOUND_PUBLIC_KEY",
    )?;
    if w.sendgrid_inbound_token.is_none() && sendgrid_inbound_verifier.is_none() {
        // Inbound Parse is signed only under a security policy: without its key or the token,
        // anyone who can reach the endpoint can record a reply. Kept open (the contract's
        // inbound webhook needs no secret), but said once at start-up.
        tracing::warn!(
            "neither MESSAGING_SENDGRID_INBOUND_PUBLIC_KEY nor MESSAGING_SENDGRID_INBOUND_TOKEN \
             is set: /webhooks/sendgrid/inbound accepts any caller; attach a security policy \
             with a signature to the Parse setting and set its public key, or set the token \
             and add ?token=... to the URL SendGrid posts to"
        );
    }
    Ok(WebhookSecrets {
        sendgrid_verifier,
        sendgrid_inbound_verifier,
        sendgrid_inbound_token: w.sendgrid_inbound_token.clone(),
        x_consumer_secret: w.x_consumer_secret.clone(),
        facebook_app_secret: w.facebook_app_secret.clone(),
        facebook_verify_token: w.facebook_verify_token.clone(),
    })
}

fn sender_config(config: &Config) -> SenderConfig {
    let s = &config.sender;
    SenderConfig {
        max_attempts: s.max_attempts,
        base_backoff: Duration::from_millis(s.base_backoff_ms),
        lease: Duration::from_millis(s.lease_ms),
        per_service_rate: s.per_service_rate,
        per_service_burst: (s.per_service_rate * 2.0).max(1.0),
        concurrency: s.concurrency,
        call_outlived_after: crate::providers::longest_call(Duration::from_millis(
            config.providers.timeout_ms,
        ))
        .saturating_mul(crate::process_managers::sender::WAVES)
            + Duration::from_secs(5),
        ..SenderConfig::default()
    }
}

/// The running service: API, webhooks and workers.
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    shutdown: watch::Sender<bool>,
    /// Turned true when the server stops taking requests: open streams and long polls end
    /// then, so that the in-flight requests the server waits for can all finish.
    draining: watch::Sender<bool>,
    workers: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
    /// How long a stop waits for in-flight work (`MESSAGING_SHUTDOWN_GRACE_MS`).
    grace: Duration,
    store: Arc<dyn Store>,
    /// The SQLite file's lock, held until the process ends.
    _lock: Option<std::fs::File>,
}

impl Application {
    /// Connects, migrates, binds the listener (port 0 picks a free one), then starts the
    /// workers. Everything that can fail is done before the first worker starts: a worker
    /// started by a build that then failed would run on with no one to stop it.
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        // Settings that can be wrong are checked before anything starts.
        let webhook_secrets = Arc::new(webhook_secrets(config)?);
        warn_of_a_short_grace(config);
        let backend = Backend::open(config).await?;
        let api_keys = api_keys(config)?;
        tracing::info!(database = %config.database.describe(), "database ready");
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on MESSAGING_LISTEN={}", config.listen))?;
        let providers = Providers::new(&provider_config(config))
            .context("setting up the provider clients (check MESSAGING_*_BASE_URL)")?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let metrics = Arc::new(Metrics::new().context("setting up the metrics registry")?);
        // The workers, started once nothing can fail any more.
        let mut workers: Vec<(&'static str, WorkerStart)> = Vec::new();
        let (store, wakeups, lock): (Arc<dyn Store>, Wakeups, _) = match backend {
            Backend::Postgres(pool) => {
                let wakeups = spawn_listener(pool.clone(), shutdown_rx.clone());
                for projection in messaging_projections::all() {
                    let subscription = Subscription::new(pool.clone(), projection);
                    subscription.ensure_checkpoint().await?;
                    let (wake, stop) = (wakeups.events.clone(), shutdown_rx.clone());
                    workers.push(worker(subscription.name(), move || {
                        subscription.clone().run(wake.clone(), stop.clone())
                    }));
                }
                let (maintained, stop) = (pool.clone(), shutdown_rx.clone());
                workers.push(worker("queue upkeep", move || {
                    crate::store::postgres::maintenance::run(maintained.clone(), stop.clone())
                }));
                let store = PgStore::new(pool).with_metrics(metrics.clone());
                (Arc::new(store), wakeups, None)
            }
            Backend::Sqlite { pools, lock } => {
                let (bell, wakeups) = notify::in_process();
                for projection in messaging_projections::sqlite::all() {
                    let rings = bell.clone();
                    let subscription = SqliteSubscription::new(pools.write.clone(), projection)
                        .on_commit(Arc::new(move || rings.read_models()));
                    subscription.ensure_checkpoint().await?;
                    let (wake, stop) = (wakeups.events.clone(), shutdown_rx.clone());
                    workers.push(worker(subscription.name(), move || {
                        subscription.clone().run(wake.clone(), stop.clone())
                    }));
                }
                let store = SqliteStore::new(pools, bell).with_metrics(metrics.clone());
                (Arc::new(store), wakeups, Some(lock))
            }
        };
        let pusher = Pusher::new(
            store.clone(),
            PushConfig {
                base_backoff: Duration::from_millis(config.push_backoff_ms),
                timeout: Duration::from_millis(config.push_timeout_ms),
                ..PushConfig::default()
            },
        )
        .context("setting up the push delivery client")?;
        let scheduler = Scheduler::new(store.clone());
        let (wake, stop) = (wakeups.schedule.clone(), shutdown_rx.clone());
        workers.push(worker("scheduler", move || {
            scheduler.clone().run(wake.clone(), stop.clone())
        }));
        let sender = Sender::new(store.clone(), Arc::new(providers), sender_config(config))
            .with_metrics(metrics.clone());
        let (wake, stop) = (wakeups.send_jobs.clone(), shutdown_rx.clone());
        workers.push(worker("sender", move || {
            sender.clone().run(wake.clone(), stop.clone())
        }));
        let applier = Applier::new(store.clone());
        let (inbox, events, stop) = (
            wakeups.webhook_inbox.clone(),
            wakeups.events.clone(),
            shutdown_rx.clone(),
        );
        workers.push(worker("webhook applier", move || {
            applier
                .clone()
                .run(inbox.clone(), events.clone(), stop.clone())
        }));
        let (wake, stop) = (wakeups.state_changes.clone(), shutdown_rx.clone());
        workers.push(worker("push", move || {
            pusher.clone().run(wake.clone(), stop.clone())
        }));
        // From here nothing fails: the workers start, each supervised.
        let workers = workers
            .into_iter()
            .map(|(name, start)| (name, supervised(name, shutdown_rx.clone(), start)))
            .collect();
        let webhook_state = WebhookState {
            store: store.clone(),
            secrets: webhook_secrets,
        };
        let state_store = store.clone();
        let (draining, draining_rx) = watch::channel(false);
        let state = AppState {
            store,
            api_key_digests: Arc::new(api_keys.iter().map(|k| http::digest(k.expose())).collect()),
            feed_wake: wakeups.state_changes,
            draining: draining_rx,
            metrics: metrics.clone(),
        };
        // Request ids, logs and metrics wrap every route, the webhooks' too: after the merge.
        // The wrong-method answer set again once the webhooks are in: a fallback applies to
        // the routes the router has when it is set.
        let router = http::observability::layer(
            http::router(state, config.max_body_bytes)
                .merge(webhooks::router(webhook_state))
                .method_not_allowed_fallback(http::method_not_allowed),
            metrics,
        );
        Ok(Self {
            listener,
            router,
            shutdown,
            draining,
            workers,
            grace: Duration::from_millis(config.shutdown_grace_ms),
            store: state_store,
            _lock: lock,
        })
    }

    /// The store the service runs on (for tests and tools in the same process).
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until `stop` resolves, then lets in-flight requests and batches finish, for at
    /// most the shutdown grace: past it, what is still running is left (and named in the log),
    /// to be recovered as after a crash, rather than held until an orchestrator's SIGKILL.
    pub async fn run(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = self.local_addr()?;
        tracing::info!(%addr, "listening");
        // Answers go out as soon as they are written: with Nagle's algorithm a response could
        // wait for the client's acknowledgement of the previous one on a kept-alive connection.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::warn!(%error, "cannot set TCP_NODELAY on a connection");
            }
        });
        // The server waits for every open request before it returns: a state-change stream
        // never ends by itself and a long poll may wait a minute, so both are told to end.
        // The workers are told at the same moment: no new round (a claim, a provider call)
        // begins while the server drains, which may take as long as its slowest request.
        let draining = self.draining;
        let shutdown = Arc::new(self.shutdown);
        let (stopping, stopped) = tokio::sync::oneshot::channel();
        let stop = {
            let shutdown = shutdown.clone();
            async move {
                stop.await;
                let _ = draining.send(true);
                let _ = shutdown.send(true);
                let _ = stopping.send(tokio::time::Instant::now());
            }
        };
        let (workers, grace) = (self.workers, self.grace);
        let aborts: Vec<_> = workers.iter().map(|(_, w)| w.abort_handle()).collect();
        let unfinished = Arc::new(std::sync::Mutex::new(Vec::new()));
        let remaining = unfinished.clone();
        let finishing = async move {
            let served = axum::serve(listener, self.router)
                .with_graceful_shutdown(stop)
                .await
                .context("HTTP server failed");
            // Served or failed (then without a stop), the workers finish their rounds and stop.
            let _ = shutdown.send(true);
            if let Ok(mut names) = remaining.lock() {
                *names = workers.iter().map(|(name, _)| *name).collect();
            }
            for (name, worker) in workers {
                let _ = worker.await;
                if let Ok(mut names) = remaining.lock() {
                    names.retain(|n| *n != name);
                }
            }
            served
        };
        let deadline = async move {
            match stopped.await {
                Ok(at) => tokio::time::sleep_until(at + grace).await,
                // The server failed before any stop: no deadline, the error ends the run.
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            served = finishing => served,
            () = deadline => {
                let names = unfinished.lock().map(|n| n.join(", ")).unwrap_or_default();
                tracing::warn!(
                    grace_ms = grace.as_millis() as u64,
                    workers = %if names.is_empty() { "none (requests still open)".into() } else { names },
                    "shutdown grace ran out: leaving what is still running to be recovered"
                );
                // Cut as a crash would cut them (each round is recoverable), not left running
                // detached in a runtime that may live on.
                for abort in aborts {
                    abort.abort();
                }
                Ok(())
            }
        }
    }
}

/// A worker's run, boxed so that the workers' different futures share one type.
type WorkerFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Starts a worker's run (again, after a panic).
type WorkerStart = Box<dyn Fn() -> WorkerFuture + Send + Sync>;

/// A worker by name, with what starts its run.
fn worker<F, Fut>(name: &'static str, start: F) -> (&'static str, WorkerStart)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    (name, Box::new(move || Box::pin(start())))
}

/// Runs a worker until it returns (at shutdown). A panic is logged and the worker started
/// again a second later: a bug hit in one round must not stop sending, scheduling or
/// projecting for the rest of the process's life, with nothing but a line on stderr to say so.
fn supervised<F>(
    name: &'static str,
    shutdown: watch::Receiver<bool>,
    start: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> WorkerFuture + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            // Aborting the supervisor (a shutdown past its grace) aborts the run with it.
            let mut run = AbortOnDrop(tokio::spawn(start()));
            match (&mut run.0).await {
                Ok(()) => return,
                Err(error) if error.is_panic() => {
                    let panic = error.into_panic();
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(worker = name, panic = %why, "worker panicked; restarting it in 1 s");
                    if *shutdown.borrow() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(_) => return,
            }
        }
    })
}

/// A task aborted when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// SIGTERM or Ctrl-C: what `messaging serve` stops on (then finishes in-flight work).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down: finishing in-flight work");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_worker_that_panics_is_started_again_and_one_that_returns_is_not() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let (_shutdown, stop) = watch::channel(false);
        let worker = supervised("test", stop, move || {
            let runs = counted.clone();
            Box::pin(async move {
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("a bug in the first round");
                }
            })
        });
        tokio::time::timeout(Duration::from_secs(10), worker)
            .await
            .expect("the worker ended after its second run")
            .expect("the supervisor itself did not fail");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}
