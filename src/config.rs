//! Configuration from the environment (see `CONTRACT.md`, "The program"). Bad configuration
//! stops start-up with one line naming the setting; secrets never print.

use std::collections::HashMap;
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
    /// How long a push delivery waits for the subscriber's answer.
    pub push_timeout_ms: u64,
    /// How long a stop waits for in-flight requests and worker rounds before it gives up on
    /// them (what they left is recovered, as after a crash).
    pub shutdown_grace_ms: u64,
}

/// A Graph API version as its paths name it (`v21.0`): another form makes every Facebook call
/// a 404, each post a permanent failure, so it is refused at start-up.
fn graph_version(version: String) -> Result<String, ConfigError> {
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    match version.strip_prefix('v').and_then(|v| v.split_once('.')) {
        Some((major, minor)) if digits(major) && digits(minor) => Ok(version),
        _ => Err(ConfigError {
            setting: "MESSAGING_FACEBOOK_GRAPH_VERSION",
            message: format!("`{version}` is not a Graph API version such as v21.0"),
        }),
    }
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
    /// The `?token=` that SendGrid Inbound Parse must send.
    pub sendgrid_inbound_token: Option<Secret>,
    /// Base64 DER: the public key of the Inbound Parse security policy's signature.
    pub sendgrid_inbound_public_key: Option<Secret>,
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
    /// Provider calls one instance makes at once.
    pub concurrency: usize,
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
        // A number of which 0 (or more than `max`) cannot work: a pool of no connections, a
        // body limit that refuses every body, a timeout that fails every call.
        let positive =
            |setting: &'static str, default: u64, max: u64| -> Result<u64, ConfigError> {
                let n = number(setting, default)?;
                if (1..=max).contains(&n) {
                    Ok(n)
                } else {
                    Err(ConfigError {
                        setting,
                        message: format!("`{n}` is out of range: between 1 and {max}"),
                    })
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
            facebook_graph_version: graph_version(text(
                "MESSAGING_FACEBOOK_GRAPH_VERSION",
                "v21.0",
            ))?,
            timeout_ms: positive("MESSAGING_PROVIDER_TIMEOUT_MS", 10_000, 3_600_000)?,
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
            max_attempts: positive("MESSAGING_SEND_MAX_ATTEMPTS", 5, 1_000)? as u32,
            // 0 would spend every attempt within milliseconds of a failure.
            base_backoff_ms: positive("MESSAGING_SEND_BACKOFF_MS", 2_000, 3_600_000)?,
            lease_ms: positive("MESSAGING_SEND_LEASE_MS", 120_000, 86_400_000)?,
            per_service_rate,
            concurrency: positive("MESSAGING_SEND_CONCURRENCY", 16, 256)? as usize,
        };
        let secret = |setting: &str| {
            lookup(setting)
                .filter(|v| !v.trim().is_empty())
                .map(Secret::new)
        };
        let webhooks = WebhookSettings {
            sendgrid_public_key: secret("MESSAGING_SENDGRID_WEBHOOK_PUBLIC_KEY"),
            sendgrid_inbound_token: secret("MESSAGING_SENDGRID_INBOUND_TOKEN"),
            sendgrid_inbound_public_key: secret("MESSAGING_SENDGRID_INBOUND_PUBLIC_KEY"),
            x_consumer_secret: secret("MESSAGING_X_CONSUMER_SECRET"),
            facebook_app_secret: secret("MESSAGING_FACEBOOK_APP_SECRET"),
            facebook_verify_token: secret("MESSAGING_FACEBOOK_VERIFY_TOKEN"),
        };
        Ok(Self {
            database,
            data_dir,
            listen,
            api_keys,
            max_body_bytes: positive("MESSAGING_MAX_BODY_BYTES", 1024 * 1024, 1 << 30)? as usize,
            database_max_connections: positive("MESSAGING_DATABASE_MAX_CONNECTIONS", 20, 10_000)?
                as u32,
            providers,
            sender,
            webhooks,
            // 0 would retry a failing subscriber at once, round after round.
            push_backoff_ms: positive("MESSAGING_PUSH_BACKOFF_MS", 1_000, 300_000)?,
            push_timeout_ms: positive("MESSAGING_PUSH_TIMEOUT_MS", 10_000, 3_600_000)?,
            shutdown_grace_ms: positive("MESSAGING_SHUTDOWN_GRACE_MS", 25_000, 86_400_000)?,
        })
    }

    /// The environment, over the TOML file `MESSAGING_CONFIG` names if it names one.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_env_and_file(|k| std::env::var(k).ok())
    }

    /// For `migrate` and `projections rebuild`, which serve no API and need no keys.
    pub fn from_env_for_tools() -> Result<Self, ConfigError> {
        Self::from_env_and_file(|k| match k {
            "MESSAGING_API_KEYS" => Some(std::env::var(k).unwrap_or_else(|_| "unused".into())),
            _ => std::env::var(k).ok(),
        })
    }

    /// `env` first, then the file `MESSAGING_CONFIG` (read from `env`) names, if any.
    fn from_env_and_file(env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let Some(path) = env("MESSAGING_CONFIG").filter(|p| !p.trim().is_empty()) else {
            return Self::from_lookup(env);
        };
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
            setting: "MESSAGING_CONFIG",
            message: format!("cannot read `{path}`: {e}"),
        })?;
        Self::from_lookup_and_toml(env, &text, &path)
    }

    /// `lookup` over the settings of a TOML document (`path` names it in errors). Its keys
    /// are the settings' environment names, or the same in lower case without `MESSAGING_`
    /// (`listen`, `api_keys`, `database_url`, `sendgrid_base_url`, ...); values are strings,
    /// numbers, booleans, or arrays of strings (comma-joined: `api_keys = ["a", "b"]`). A key
    /// that names no setting is an error, so a typo is not silently ignored.
    pub fn from_lookup_and_toml(
        lookup: impl Fn(&str) -> Option<String>,
        toml_text: &str,
        path: &str,
    ) -> Result<Self, ConfigError> {
        let file_error = |message: String| ConfigError {
            setting: "MESSAGING_CONFIG",
            message: format!("`{path}`: {message}"),
        };
        let table: toml::Table = toml_text
            .parse()
            .map_err(|e: toml::de::Error| file_error(e.message().to_string()))?;
        let mut settings = HashMap::new();
        for (key, value) in table {
            let name = setting_name(&key);
            // Logging starts before any file is read.
            if matches!(
                name.as_str(),
                "MESSAGING_LOG_FORMAT" | "MESSAGING_RUST_LOG" | "RUST_LOG"
            ) {
                return Err(file_error(format!(
                    "`{key}` is read from the environment only (logging starts before the file)"
                )));
            }
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Array(items) => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| file_error(format!("`{key}`: a list must hold strings")))?
                    .join(","),
                _ => return Err(file_error(format!("`{key}`: not a string, number or list"))),
            };
            settings.insert(name, (key, value));
        }
        // Which settings exist is what the configuration asks for.
        let asked = std::cell::RefCell::new(std::collections::HashSet::new());
        let config = Self::from_lookup(|name| {
            asked.borrow_mut().insert(name.to_string());
            // An empty variable (a template's `${DATABASE_URL:-}`) is unset: it does not hide
            // the file's value (an empty DATABASE_URL over the file's would have run on a
            // private SQLite file).
            lookup(name)
                .filter(|v| !v.trim().is_empty())
                .or_else(|| settings.get(name).map(|(_, v)| v.clone()))
        })?;
        let asked = asked.into_inner();
        let mut unknown: Vec<&str> = settings
            .iter()
            .filter(|(name, _)| !asked.contains(*name))
            .map(|(_, (key, _))| key.as_str())
            .collect();
        unknown.sort_unstable();
        if let Some(first) = unknown.first() {
            return Err(file_error(format!(
                "`{first}` is not a setting (see the README's Configuration)"
            )));
        }
        Ok(config)
    }
}

/// A file key's environment name: `listen` → `MESSAGING_LISTEN`, `database_url` →
/// `DATABASE_URL`; an environment name stays as it is.
fn setting_name(key: &str) -> String {
    let upper = key.to_ascii_uppercase();
    if upper == "DATABASE_URL" || upper.starts_with("MESSAGING_") {
        upper
    } else {
        format!("MESSAGING_{upper}")
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
    fn settings_that_cannot_work_at_zero_are_refused_by_name() {
        for setting in [
            "MESSAGING_MAX_BODY_BYTES",
            "MESSAGING_DATABASE_MAX_CONNECTIONS",
            "MESSAGING_PROVIDER_TIMEOUT_MS",
            "MESSAGING_SEND_MAX_ATTEMPTS",
            "MESSAGING_SEND_LEASE_MS",
            "MESSAGING_SEND_CONCURRENCY",
            "MESSAGING_PUSH_BACKOFF_MS",
            "MESSAGING_PUSH_TIMEOUT_MS",
            "MESSAGING_SHUTDOWN_GRACE_MS",
            "MESSAGING_SEND_BACKOFF_MS",
        ] {
            for bad in ["0", "4294967297"] {
                let err = Config::from_lookup(|k| (k == setting).then(|| bad.to_string()))
                    .map(|_| ())
                    .expect_err(setting);
                assert_eq!(err.setting, setting);
                assert!(err.message.contains("between 1 and"), "{}", err.message);
            }
        }
        let config = Config::from_lookup(|k| {
            (k == "MESSAGING_DATABASE_MAX_CONNECTIONS").then(|| "1".to_string())
        })
        .unwrap();
        assert_eq!(config.database_max_connections, 1);
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
    fn a_toml_file_configures_and_the_environment_wins() {
        let file = r#"
            listen = "0.0.0.0:9000"
            api_keys = ["key-one", "key-two"]
            database_url = "postgres://db.internal/messaging"
            MESSAGING_SEND_RATE_PER_SERVICE = 5
            provider_timeout_ms = 2500
            send_concurrency = 8
        "#;
        let env = |k: &str| (k == "MESSAGING_LISTEN").then(|| "127.0.0.1:7000".to_string());
        let config = Config::from_lookup_and_toml(env, file, "m.toml").unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(config.api_keys.len(), 2);
        assert_eq!(config.api_keys[1].expose(), "key-two");
        assert!(matches!(config.database, Database::Postgres(_)));
        assert_eq!(config.sender.per_service_rate, 5.0);
        assert_eq!(config.sender.concurrency, 8);
        assert_eq!(config.providers.timeout_ms, 2500);

        // An empty variable (a template's `${DATABASE_URL:-}`) does not hide the file's value.
        let empty = |k: &str| (k == "DATABASE_URL").then(String::new);
        let config = Config::from_lookup_and_toml(empty, file, "m.toml").unwrap();
        assert!(matches!(config.database, Database::Postgres(_)));
    }

    #[test]
    fn a_graph_version_is_refused_unless_it_reads_like_one() {
        for bad in ["21.0", "v21", "v", "vX.0", "v21.0/"] {
            let err = Config::from_lookup(|k| {
                (k == "MESSAGING_FACEBOOK_GRAPH_VERSION").then(|| bad.to_string())
            })
            .map(|_| ())
            .expect_err(bad);
            assert_eq!(err.setting, "MESSAGING_FACEBOOK_GRAPH_VERSION");
            assert!(err.message.contains("such as v21.0"), "{}", err.message);
        }
        let config = Config::from_lookup(|k| {
            (k == "MESSAGING_FACEBOOK_GRAPH_VERSION").then(|| "v23.0".to_string())
        })
        .unwrap();
        assert_eq!(config.providers.facebook_graph_version, "v23.0");
    }

    #[test]
    fn a_bad_toml_file_names_the_setting_and_the_key() {
        let none = |_: &str| None;
        for (file, says) in [
            ("listen = ", "m.toml"),
            ("lisen = \"0.0.0.0:1\"", "`lisen` is not a setting"),
            ("[listen]\nport = 1", "`listen`: not a string"),
            ("api_keys = [1, 2]", "a list must hold strings"),
            ("log_format = \"json\"", "from the environment only"),
        ] {
            let err = Config::from_lookup_and_toml(none, file, "m.toml")
                .map(|_| ())
                .unwrap_err();
            assert_eq!(err.setting, "MESSAGING_CONFIG", "{file}");
            assert!(err.message.contains(says), "{file}: {}", err.message);
        }
        // A value the file gives is checked like the environment's, naming its setting.
        let err = Config::from_lookup_and_toml(none, "listen = \"nowhere\"", "m.toml")
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.setting, "MESSAGING_LISTEN");
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
