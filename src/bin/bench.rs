//! `cargo run --release --bin bench [-- --quick] [-- --only <scenario>]`
//!
//! Creates a fresh PostgreSQL database, starts the real service in this process against it
//! (providers point at a closed local port; the bench's service uses the sandbox provider with
//! a temporary outbox), runs the scenarios, drops the database, prints a table and writes the
//! figures to `target/bench/<unix time>.json` and `target/bench/latest.json`.
//!
//! Every figure is printed beside a reference measured in the same run on the same database.
//!
//! `scheduler-memory` runs the service as a separate process instead, on a database of its own:
//! the bench re-executes itself as `bench --serve-child` (see `bench/child.rs`), so the
//! service's memory is measured without the bench's.

#[path = "bench/child.rs"]
mod child;

#[path = "bench/commands.rs"]
mod commands;
#[path = "bench/common.rs"]
mod common;
#[path = "bench/http.rs"]
mod http;
#[path = "bench/lag.rs"]
mod lag;
#[path = "bench/rebuild.rs"]
mod rebuild;
#[path = "bench/scheduler.rs"]
mod scheduler;
#[path = "bench/scheduler_memory.rs"]
mod scheduler_memory;
#[path = "bench/webhooks.rs"]
mod webhooks;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use common::{Bench, Figure};
use messaging::config::{Config, Secret};
use messaging::startup::{self, Application};
use messaging::store::postgres::PgStore;
use sqlx::{Connection, PgConnection};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Benchmarks the messaging service against plain-SQL references"
)]
struct Cli {
    /// Smaller sizes, for a smoke run (a few minutes).
    #[arg(long)]
    quick: bool,
    /// Run these scenarios only (comma-separated), in the usual order.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// `lag` at this load (messages/s) instead of half the peak: the same load for runs on
    /// different commits, or one the machine is not saturated by.
    #[arg(long)]
    lag_rate: Option<f64>,
    /// `commands` at these client counts only (comma-separated; 1, 8 and 32 unless given),
    /// for a profile of one of them. The lag load's peak still comes from the counts run.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32])]
    clients: Vec<usize>,
    /// The directory the sandbox provider's outbox (a file per email sent) is made in.
    /// `/dev/shm` (memory) where it exists, else the temporary directory: on this machine's
    /// disk each new file cost an ext4 inode search that took a third of the cores in
    /// "send now", a cost of the stand-in provider and not of the service.
    #[arg(long)]
    outbox_in: Option<PathBuf>,
    /// Leave the bench's database in place afterwards (its name is printed), to look into a
    /// figure with EXPLAIN or psql.
    #[arg(long)]
    keep_database: bool,
    /// Internal: serve like `messaging serve` (settings from the environment) until SIGTERM,
    /// Ctrl-C or the end of standard input. `scheduler-memory` starts the service this way.
    #[arg(long, hide = true)]
    serve_child: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Commands,
    Webhooks,
    #[value(alias = "projection-lag")]
    Lag,
    Rebuild,
    Scheduler,
    /// 100k scheduled over the next hour: lateness of those that come due while watched.
    SchedulerSpread,
    /// The service's own memory (a separate process) as scheduled messages grow.
    SchedulerMemory,
}

const API_KEY: &str = "bench-key-0123";
/// The P-256 secret scalar the bench signs SendGrid batches with (its public key is configured).
const SIGNING_SECRET: [u8; 32] = [7; 32];

#[global_allocator]
static ALLOCATOR: child::CountingAlloc = child::CountingAlloc;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if cli.serve_child {
        child::count_heap();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    let outcome = if cli.serve_child {
        // Standard output carries the heap answers only (see `bench/child.rs`).
        logs.with_writer(std::io::stderr).init();
        child::serve().await
    } else {
        logs.init();
        run(cli).await
    };
    if let Err(error) = outcome {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

/// The server: `MESSAGING_BENCH_DATABASE_URL`, else `DATABASE_URL`, else the local default.
fn server_url() -> String {
    std::env::var("MESSAGING_BENCH_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `url` with its database name replaced.
fn with_database(url: &str, db: &str) -> Result<String> {
    let (rest, query) = match url.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (url, None),
    };
    let scheme_end = rest.find("://").context("the database URL has no scheme")? + 3;
    let base = match rest[scheme_end..].find('/') {
        Some(slash) => &rest[..scheme_end + slash],
        None => rest,
    };
    Ok(match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    })
}

async fn run(cli: Cli) -> Result<()> {
    let started = Instant::now();
    let server = server_url();
    let name = format!("messaging_bench_{}", uuid::Uuid::now_v7().simple());
    let mut admin = PgConnection::connect(&with_database(&server, "postgres")?)
        .await
        .context("cannot reach PostgreSQL (set MESSAGING_BENCH_DATABASE_URL)")?;
    sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
        .execute(&mut admin)
        .await
        .context("creating the bench database")?;
    let outbox_in = cli.outbox_in.clone().unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    });
    let sandbox_dir = outbox_in.join(&name);
    eprintln!("bench: sandbox outbox {}", sandbox_dir.display());
    let outcome = run_in(&cli, &with_database(&server, &name)?, sandbox_dir.clone()).await;
    // Always clean up, whatever happened (`scheduler-memory` drops its own database, unless it
    // failed half-way).
    let dropped = if cli.keep_database {
        eprintln!("bench: kept database {name}");
        Ok(Default::default())
    } else {
        sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
            .execute(&mut admin)
            .await
    };
    let memory_db = scheduler_memory::database_name(&name);
    let _ = sqlx::query(&format!(
        r#"DROP DATABASE IF EXISTS "{memory_db}" WITH (FORCE)"#
    ))
    .execute(&mut admin)
    .await;
    let _ = std::fs::remove_dir_all(&sandbox_dir);
    let (figures, errors) = outcome?;
    dropped.context("dropping the bench database")?;
    print_table(&figures, &errors);
    let path = write_json(&cli, &figures, &errors, started.elapsed())?;
    println!(
        "\n{} figures in {:.0?}; written to {}",
        figures.len(),
        started.elapsed(),
        path.display()
    );
    if !errors.is_empty() {
        anyhow::bail!("{} scenario(s) failed", errors.len());
    }
    Ok(())
}

async fn run_in(cli: &Cli, url: &str, sandbox_dir: PathBuf) -> Result<(Vec<Figure>, Vec<String>)> {
    let (public_key, _) =
        messaging::webhooks::verify::sendgrid_test_signature(&SIGNING_SECRET, "0", b"")
            .map_err(|e| anyhow::anyhow!("deriving the SendGrid test key: {e}"))?;
    let sandbox = sandbox_dir.to_string_lossy().into_owned();
    // The service's settings as environment variables: read here through `from_lookup`, and
    // passed as the environment of the `scheduler-memory` child.
    let service_env: Vec<(&'static str, String)> = vec![
        ("DATABASE_URL", url.to_string()),
        ("MESSAGING_API_KEYS", API_KEY.into()),
        ("MESSAGING_LISTEN", "127.0.0.1:0".into()),
        // Nothing leaves this machine.
        ("MESSAGING_SENDGRID_BASE_URL", "http://127.0.0.1:9".into()),
        ("MESSAGING_X_BASE_URL", "http://127.0.0.1:9".into()),
        ("MESSAGING_FACEBOOK_BASE_URL", "http://127.0.0.1:9".into()),
        ("MESSAGING_SANDBOX_DIR", sandbox),
        // One service sends everything here: do not let its pacing be the bottleneck.
        ("MESSAGING_SEND_RATE_PER_SERVICE", "1000000".into()),
        // Its sandbox calls are file writes: 64 at once (a round of 256), where a real
        // account's SMTP server may refuse more than a few connections.
        ("MESSAGING_SEND_CONCURRENCY", "64".into()),
        ("MESSAGING_SENDGRID_WEBHOOK_PUBLIC_KEY", public_key),
    ];
    let lookup = |k: &str| -> Option<String> {
        service_env
            .iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.clone())
    };
    let config = Config::from_lookup(lookup).context("the bench's service configuration")?;
    let app = Application::build(&config)
        .await
        .context("starting the service")?;
    let base = format!("http://{}", app.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run(async {
        let _ = stopped.await;
    }));

    // The bench's own pool, with the service's session settings; room for every client (the
    // commands reference holds a connection per client).
    let most_clients = cli.clients.iter().copied().max().unwrap_or(0);
    let connections = u32::try_from(most_clients + 2).unwrap_or(u32::MAX).max(34);
    let pool = startup::connect(&Secret::new(url), connections).await?;
    let http = reqwest::Client::new();
    let service = common::create_service(&http, &base, API_KEY, "news@example.com").await?;
    let mut bench = Bench {
        store: Arc::new(PgStore::new(pool.clone())),
        pool,
        http,
        base,
        api_key: API_KEY.into(),
        quick: cli.quick,
        service,
        signing_secret: SIGNING_SECRET,
        peak_send_rate: None,
        lag_rate: cli.lag_rate,
        clients: cli.clients.clone(),
        service_env,
    };
    let mut figures = Vec::new();
    let mut errors = Vec::new();
    let selected = |s: Scenario| cli.only.is_empty() || cli.only.contains(&s);
    for scenario in [
        Scenario::Commands,
        Scenario::Webhooks,
        Scenario::Lag,
        Scenario::Rebuild,
        Scenario::Scheduler,
        Scenario::SchedulerSpread,
        Scenario::SchedulerMemory,
    ] {
        if !selected(scenario) {
            continue;
        }
        let name = scenario
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default();
        eprintln!("bench: {name} ...");
        let t = Instant::now();
        let result = match scenario {
            Scenario::Commands => commands::run(&mut bench).await,
            Scenario::Webhooks => webhooks::run(&mut bench).await,
            Scenario::Lag => lag::run(&mut bench).await,
            Scenario::Rebuild => rebuild::run(&mut bench).await,
            Scenario::Scheduler => scheduler::run(&mut bench).await,
            Scenario::SchedulerSpread => scheduler::run_spread(&mut bench).await,
            Scenario::SchedulerMemory => scheduler_memory::run(&mut bench).await,
        };
        match result {
            Ok(mut f) => figures.append(&mut f),
            Err(e) => {
                eprintln!("bench: {name} failed: {e:#}");
                errors.push(format!("{name}: {e:#}"));
            }
        }
        eprintln!("bench: {name} done in {:.1?}", t.elapsed());
    }
    let _ = stop.send(());
    match tokio::time::timeout(Duration::from_secs(30), server).await {
        Ok(Ok(Err(e))) => errors.push(format!("the service stopped with an error: {e:#}")),
        Err(_) => errors.push("the service did not stop within 30 s".into()),
        _ => {}
    }
    bench.pool.close().await;
    Ok((figures, errors))
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn print_table(figures: &[Figure], errors: &[String]) {
    println!(
        "\n{:<10} {:<62} {:>10} {:<9} {:>10} {:>7} {:<13} met",
        "scenario", "figure", "service", "unit", "reference", "ratio", "target"
    );
    for f in figures {
        let met = match f.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "",
        };
        println!(
            "{:<10} {:<62} {:>10} {:<9} {:>10} {:>7} {:<13} {}",
            f.scenario,
            f.name,
            fmt_value(f.value),
            f.unit,
            f.reference.map(fmt_value).unwrap_or_default(),
            f.ratio.map(|r| format!("{r:.2}")).unwrap_or_default(),
            f.target,
            met
        );
        if let Some(note) = &f.note {
            println!("{:<10}   {note}", "");
        }
    }
    for warning in common::unsettled() {
        println!("WARNING {warning} (what was measured at that point ran on that backlog)");
    }
    for e in errors {
        println!("FAILED {e}");
    }
}

fn write_json(cli: &Cli, figures: &[Figure], errors: &[String], took: Duration) -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let now = chrono::Utc::now();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    // Uncommitted changes make `commit` a different program: said, so runs compare honestly.
    // New files count too where the program is built from (a new module is a change).
    let dirty = std::process::Command::new("git")
        .args([
            "status",
            "--porcelain",
            "--",
            "src",
            "domain",
            "projections",
            "migrations",
            "Cargo.toml",
            "Cargo.lock",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| !o.stdout.is_empty());
    let only: Vec<String> = cli
        .only
        .iter()
        .filter_map(|s| s.to_possible_value().map(|v| v.get_name().to_string()))
        .collect();
    let report = serde_json::json!({
        "at": now,
        "commit": commit,
        "uncommitted_changes": dirty,
        "quick": cli.quick,
        "options": {
            "only": only,
            "clients": cli.clients,
            "lag_rate": cli.lag_rate,
            "outbox_in": cli.outbox_in,
        },
        "unsettled": common::unsettled(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "seconds": took.as_secs_f64(),
        "figures": figures,
        "errors": errors,
    });
    let text = serde_json::to_string_pretty(&report)?;
    let path = dir.join(format!("{}.json", now.timestamp()));
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    // A partial run (`--only`, `--quick`, other client counts, another lag load) would hide
    // the last full one.
    let full =
        cli.only.is_empty() && !cli.quick && cli.clients == [1, 8, 32] && cli.lag_rate.is_none();
    if full {
        std::fs::write(dir.join("latest.json"), &text).context("writing latest.json")?;
    }
    Ok(path)
}
