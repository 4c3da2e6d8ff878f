//! Configuration from the environment (see `CONTRACT.md`, "The program"). Bad configuration
//! stops start-up with one line naming the setting; secrets never print.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A value that must never reach a log line or a response.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {setting}: {message}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Which database holds the log and the read models.
    pub database: Database,
    /// Where the embedded default keeps its files: the SQLite database, the generated API
    /// key, the sandbox outbox (`MESSAGING_DATA_DIR`, `./data`).
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Bearer keys for `/v1/*`; empty means the key file under `data_dir` (created on first
    /// start), so the embedded default runs with no configuration.
    pub api_keys: Vec<Secret>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    pub database_max_connections: u32,
    pub providers: ProviderSettings,
    pub sender: SenderSettings,
    pub webhooks: WebhookSettings,
    /// Backoff before a failed push delivery is retried (doubles, ±25 % jitter, ≤ 5 min).
    pub push_backoff_ms: u64,
}

/// The backend `DATABASE_URL` selects.
#[derive(Debug, Clone)]
pub enum Database {
    /// `postgres://...`: production, any number of instances.
    Postgres(Secret),
    /// `sqlite://PATH`, or `DATABASE_URL` unset (`<data dir>/messaging.db`): the embedded
    /// default, one process.
    Sqlite(PathBuf),
}

impl Database {
    fn parse(url: Option<String>, data_dir: &Path) -> Result<Self, ConfigError> {
        let Some(url) = url.filter(|u| !u.trim().is_empty()) else {
            return Ok(Self::Sqlite(data_dir.join("messaging.db")));
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(Secret::new(url)));
        }
        let path = url
            .trim()
            .strip_prefix("sqlite://")
            .or_else(|| url.trim().strip_prefix("sqlite:"));
        match path {
            Some(path)
                if !path.is_empty()
                    && !path.contains(':')
                    && !path.contains('?')
                    && !path.contains('%') =>
            {
                Ok(Self::Sqlite(PathBuf::from(path)))
            }
            _ => Err(ConfigError {
                setting: "DATABASE_URL",
                message: "must be postgres://..., sqlite://PATH to a file (no options, no \
                          percent-encoding), or unset for ./data/messaging.db"
                    .into(),
            }),
        }
    }

    /// For logs: the backend and, for SQLite, the file (a PostgreSQL URL may hold a password).
    pub fn describe(&self) -> String {
        match self {
            Self::Postgres(_) => "PostgreSQL".into(),
            Self::Sqlite(path) => format!("SQLite at {}", path.display()),
        }
    }
}

/// Webhook secrets. Each webhook refuses every delivery until its secret is set.
#[derive(Debug, Clone, Default)]
pub struct WebhookSettings {
    /// Base64 DER, as SendGrid shows it.
    pub sendgrid_public_key: Option<Secret>,
    /// The `?token=` that SendGrid Inbound Parse must send (it signs nothing).
    pub sendgrid_inbound_token: Option<Secret>,
    pub x_consumer_secret: Option<Secret>,
    pub facebook_app_secret: Option<Secret>,
    pub facebook_verify_token: Option<Secret>,
}

/// Where the providers are and how long a call may take (`MESSAGING_*_BASE_URL` so tests and
/// sandboxes can point them elsewhere).
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    pub sendgrid_base_url: String,
    pub x_base_url: String,
    pub facebook_base_url: String,
    pub facebook_graph_version: String,
    pub timeout_ms: u64,
    /// The sandbox provider's outbox.
    pub sandbox_dir: String,
}

/// How the sender retries and paces.
#[derive(Debug, Clone)]
pub struct SenderSettings {
    pub max_attempts: u32,
    pub base_backoff_ms: u64,
    pub lease_ms: u64,
    /// Sends per second for one service, per instance.
    pub per_service_rate: f64,
}

impl Config {
    /// Reads the configuration from `lookup` (the process environment in production).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let text = |setting: &str, default: &str| lookup(setting).unwrap_or_else(|| default.into());
        let data_dir = PathBuf::from(text("MESSAGING_DATA_DIR", "./data"));
        let database = Database::parse(lookup("DATABASE_URL"), &data_dir)?;
        let listen = lookup("MESSAGING_LISTEN").unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen = listen.parse().map_err(|_| ConfigError {
            setting: "MESSAGING_LISTEN",
            message: format!("`{listen}` is not a host:port address such as 127.0.0.1:8080"),
        })?;
        let api_keys = match lookup("MESSAGING_API_KEYS") {
            None => Vec::new(),
            Some(keys) => {
                let keys: Vec<Secret> = keys
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(Secret::new)
                    .collect();
                if keys.is_empty() {
                    return Err(ConfigError {
                        setting: "MESSAGING_API_KEYS",
                        message: "holds no key: give bearer keys (comma-separated) for /v1/*, \
                                  or unset it to use the generated key file"
                            .into(),
                    });
                }
                keys
            }
        };
        if api_keys.is_empty() && matches!(database, Database::Postgres(_)) {
            return Err(ConfigError {
                setting: "MESSAGING_API_KEYS",
                message: "give bearer keys (comma-separated) for /v1/*: with PostgreSQL, every \
                          instance must accept the same keys (only the embedded default \
                          generates one)"
                    .into(),
            });
        }
        let number = |setting: &'static str, default: u64| -> Result<u64, ConfigError> {
            match lookup(setting) {
                None => Ok(default),
                Some(v) => v.parse().map_err(|_| ConfigError {
                    setting,
                    message: format!("`{v}` is not a whole number"),
                }),
            }
        };
        let url = |setting: &'static str, default: &str| -> Result<String, ConfigError> {
            let value = text(setting, default);
            if value.starts_with("http://") || value.starts_with("https://") {
                Ok(value.trim_end_matches('/').to_string())
            } else {
                Err(ConfigError {
                    setting,
                    message: format!("`{value}` is not an http(s) URL"),
                })
            }
        };
        let providers = ProviderSettings {
            sendgrid_base_url: url("MESSAGING_SENDGRID_BASE_URL", "https://api.sendgrid.com")?,
            x_base_url: url("MESSAGING_X_BASE_URL", "https://api.x.com")?,
            facebook_base_url: url("MESSAGING_FACEBOOK_BASE_URL", "https://graph.facebook.com")?,
            facebook_graph_version: text("MESSAGING_FACEBOOK_GRAPH_VERSION", "v21.0"),
            timeout_ms: number("MESSAGING_PROVIDER_TIMEOUT_MS", 10_000)?,
            sandbox_dir: lookup("MESSAGING_SANDBOX_DIR")
                .unwrap_or_else(|| data_dir.join("outbox").to_string_lossy().into_owned()),
        };
        let per_service_rate = match lookup("MESSAGING_SEND_RATE_PER_SERVICE") {
            None => 100.0,
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|r| *r > 0.0 && r.is_finite())
                .ok_or(ConfigError {
                    setting: "MESSAGING_SEND_RATE_PER_SERVICE",
                    message: format!("`{v}` is not a positive number of sends per second"),
                })?,
        };
        let sender = SenderSettings {
            max_attempts: number("MESSAGING_SEND_MAX_ATTEMPTS", 5)?.max(1) as u32,
            base_backoff_ms: number("MESSAGING_SEND_BACKOFF_MS", 2_000)?,
            lease_ms: number("MESSAGING_SEND_LEASE_MS", 120_000)?,
            per_service_rate,
        };
        let secret = |setting: &str| {
            lookup(setting)
                .filter(|v| !v.trim().is_empty())
                .map(Secret::new)
        };
        let webhooks = WebhookSettings {
            sendgrid_public_key: secret("MESSAGING_SENDGRID_WEBHOOK_PUBLIC_KEY"),
            sendgrid_inbound_token: secret("MESSAGING_SENDGRID_INBOUND_TOKEN"),
            x_consumer_secret: secret("MESSAGING_X_CONSUMER_SECRET"),
            facebook_app_secret: secret("MESSAGING_FACEBOOK_APP_SECRET"),
            facebook_verify_token: secret("MESSAGING_FACEBOOK_VERIFY_TOKEN"),
        };
        Ok(Self {
            database,
            data_dir,
            listen,
            api_keys,
            max_body_bytes: number("MESSAGING_MAX_BODY_BYTES", 1024 * 1024)? as usize,
            database_max_connections: number("MESSAGING_DATABASE_MAX_CONNECTIONS", 20)? as u32,
            providers,
            sender,
            webhooks,
            push_backoff_ms: number("MESSAGING_PUSH_BACKOFF_MS", 1_000)?,
        })
    }

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// For `migrate` and `projections rebuild`, which serve no API and need no keys.
    pub fn from_env_for_tools() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| match k {
            "MESSAGING_API_KEYS" => Some(std::env::var(k).unwrap_or_else(|_| "unused".into())),
            _ => std::env::var(k).ok(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_without_api_keys_names_the_setting() {
        let err = Config::from_lookup(|k| {
            (k == "DATABASE_URL").then(|| "postgres://localhost/x".to_string())
        })
        .map(|_| ())
        .unwrap_err();
        assert_eq!(err.setting, "MESSAGING_API_KEYS");
    }

    #[test]
    fn an_api_key_setting_without_a_key_names_the_setting() {
        let err = Config::from_lookup(|k| (k == "MESSAGING_API_KEYS").then(|| " , ".to_string()))
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.setting, "MESSAGING_API_KEYS");
    }

    #[test]
    fn no_configuration_at_all_is_the_embedded_default() {
        let config = Config::from_lookup(|_| None).unwrap();
        assert!(config.api_keys.is_empty());
        match config.database {
            Database::Sqlite(path) => assert_eq!(path, Path::new("./data/messaging.db")),
            other => panic!("expected SQLite, got {other:?}"),
        }
        assert_eq!(config.providers.sandbox_dir, "./data/outbox");
    }

    #[test]
    fn database_urls_select_the_backend() {
        let parse = |url: &str| Database::parse(Some(url.into()), Path::new("d"));
        assert!(matches!(parse("postgres://x/y"), Ok(Database::Postgres(_))));
        assert!(
            matches!(parse("sqlite://a/b.db"), Ok(Database::Sqlite(p)) if p == Path::new("a/b.db"))
        );
        assert!(matches!(parse("sqlite:b.db"), Ok(Database::Sqlite(p)) if p == Path::new("b.db")));
        for bad in [
            "mysql://x",
            "sqlite://",
            "sqlite::memory:",
            "sqlite:file::memory:",
            "sqlite:b.db?mode=ro",
            "sqlite://a%20b.db",
        ] {
            assert_eq!(parse(bad).unwrap_err().setting, "DATABASE_URL", "{bad}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
