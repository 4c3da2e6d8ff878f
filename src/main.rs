//! `messaging`: the service binary. Kept thin: parse the command line, hand over.

use anyhow::Context;
use clap::{Parser, Subcommand};
use messaging::config::Config;
use messaging::startup::{self, Application, Backend};
use messaging_projections::{SqliteSubscription, Subscription};

#[derive(Parser)]
#[command(
    name = "messaging",
    version,
    about = "Event-sourced messaging service: email, X and Facebook"
)]
struct Cli {
    /// `serve` when omitted.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API, webhooks and workers in one process (migrates the database first). The
    /// default: with no DATABASE_URL it runs on SQLite under ./data, with no other set-up.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Read models.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
}

#[derive(Subcommand)]
enum ProjectionsCommand {
    /// Rebuild a read model (or all of them) from position zero of the event log.
    Rebuild {
        /// `message_list`, `state_changes` or `delivery`; all when omitted.
        name: Option<String>,
    },
}

#[tokio::main]
async fn main() {
    init_tracing();
    if let Err(error) = run(Cli::parse()).await {
        // One clear line; the chain says which setting or step failed.
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if std::env::var("MESSAGING_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let config = Config::from_env()?;
            let app = Application::build(&config).await?;
            app.run(startup::shutdown_signal()).await
        }
        Command::Migrate => {
            let config = Config::from_env_for_tools()?;
            Backend::open(&config).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Projections {
            command: ProjectionsCommand::Rebuild { name },
        } => {
            let config = Config::from_env_for_tools()?;
            let names: Vec<&str> = messaging_projections::all()
                .iter()
                .map(|p| p.name())
                .collect();
            if name.as_deref().is_some_and(|n| !names.contains(&n)) {
                anyhow::bail!(
                    "no projection named `{}`; the projections are {}",
                    name.unwrap_or_default(),
                    names.join(", ")
                );
            }
            let wanted = |n: &str| name.as_deref().is_none_or(|w| w == n);
            let backend = Backend::open(&config).await?;
            for name in names.into_iter().filter(|n| wanted(n)) {
                let started = std::time::Instant::now();
                let rebuilt = match &backend {
                    Backend::Postgres(pool) => {
                        let projection = messaging_projections::all()
                            .into_iter()
                            .find(|p| p.name() == name);
                        match projection {
                            Some(p) => Subscription::new(pool.clone(), p).rebuild().await,
                            None => continue,
                        }
                    }
                    Backend::Sqlite { pools, .. } => {
                        let projection = messaging_projections::sqlite::all()
                            .into_iter()
                            .find(|p| p.name() == name);
                        match projection {
                            Some(p) => {
                                SqliteSubscription::new(pools.write.clone(), p)
                                    .rebuild()
                                    .await
                            }
                            None => continue,
                        }
                    }
                };
                let n = rebuilt.with_context(|| format!("rebuilding {name}"))?;
                println!(
                    "{name}: rebuilt from {n} events in {:.2?}",
                    started.elapsed()
                );
            }
            Ok(())
        }
    }
}
