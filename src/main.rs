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
    if let Err(error) = init_tracing() {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
    if let Err(error) = run(Cli::parse()).await {
        // One clear line; the chain says which setting or step failed.
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

/// Starts logging as `RUST_LOG` and `MESSAGING_LOG_FORMAT` say (read from the environment
/// only: logging starts before any configuration file is read). A value that cannot be used
/// stops start-up, as any other bad setting does, rather than logging some other way.
fn init_tracing() -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => {
            tracing_subscriber::EnvFilter::try_new(&directives)
                .map_err(|e| format!("RUST_LOG: `{directives}` is not a log filter: {e}"))?
        }
        _ => tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=info"),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match std::env::var("MESSAGING_LOG_FORMAT") {
        Err(std::env::VarError::NotPresent) => builder.init(),
        Ok(format) => match format.trim().to_ascii_lowercase().as_str() {
            "" | "text" => builder.init(),
            "json" => builder.json().init(),
            _ => {
                return Err(format!(
                    "MESSAGING_LOG_FORMAT: `{format}` is neither `json` nor `text`"
                ))
            }
        },
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err("MESSAGING_LOG_FORMAT: not valid UTF-8; use `json` or `text`".into())
        }
    }
    Ok(())
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
