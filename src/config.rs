//! Configuration from the environment (see `CONTRACT.md`, "The program"). Bad configuration
//! stops start-up with one line naming the setting; secrets never print.

use std::fmt;
use std::net::SocketAddr;

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
    /// `postgres://...`. (The embedded SQLite default is a later step; see the README.)
    pub database_url: Secret,
    pub listen: SocketAddr,
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
        let database_url = lookup("DATABASE_URL").ok_or(ConfigError {
            setting: "DATABASE_URL",
            message: "set it to a postgres:// URL (the embedded SQLite default is not built yet)"
                .into(),
        })?;
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(ConfigError {
                setting: "DATABASE_URL",
                message: "must start with postgres:// or postgresql://".into(),
            });
        }
        let listen = lookup("MESSAGING_LISTEN").unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen = listen.parse().map_err(|_| ConfigError {
            setting: "MESSAGING_LISTEN",
            message: format!("`{listen}` is not a host:port address such as 127.0.0.1:8080"),
        })?;
        let api_keys: Vec<Secret> = lookup("MESSAGING_API_KEYS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(Secret::new)
            .collect();
        if api_keys.is_empty() {
            return Err(ConfigError {
                setting: "MESSAGING_API_KEYS",
                message: "give at least one bearer key (comma-separated) for /v1/*".into(),
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
        let text = |setting: &str, default: &str| lookup(setting).unwrap_or_else(|| default.into());
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
            sandbox_dir: text("MESSAGING_SANDBOX_DIR", "./data/outbox"),
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
            database_url: Secret::new(database_url),
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
    fn a_missing_api_key_names_the_setting() {
        let err = Config::from_lookup(|k| {
            (k == "DATABASE_URL").then(|| "postgres://localhost/x".to_string())
        })
        .map(|_| ())
        .unwrap_err();
        assert_eq!(err.setting, "MESSAGING_API_KEYS");
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
