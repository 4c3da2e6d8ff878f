use messaging::config::Config;
use messaging::startup::Application;
use messaging::store::Store;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::any::AnyPoolOptions;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AnyPool, Connection, PgConnection, PgPool};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub const API_KEY: &str = "test-key-0123";

/// The server that holds the test databases: `MESSAGING_TEST_DATABASE_URL`, else
/// `DATABASE_URL`, else the local default.
pub fn admin_url() -> String {
    std::env::var("MESSAGING_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn with_database(url: &str, db: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("a valid database URL");
    parsed.set_path(&format!("/{db}"));
    parsed.to_string()
}

/// The backend the suite runs on: `MESSAGING_TEST_BACKEND=sqlite` for the embedded default,
/// PostgreSQL otherwise. `scripts/test` runs the suite on both.
pub fn on_sqlite() -> bool {
    match std::env::var("MESSAGING_TEST_BACKEND").as_deref() {
        Ok("sqlite") => true,
        Ok("postgres") | Err(_) => false,
        Ok(other) => panic!("MESSAGING_TEST_BACKEND={other}: use sqlite or postgres"),
    }
}

/// Creates an empty database of its own for one test and returns its URL: a new PostgreSQL
/// database, or a new SQLite file under the system's temporary directory.
pub async fn fresh_database() -> String {
    if on_sqlite() {
        let dir = std::env::temp_dir().join("messaging-tests");
        std::fs::create_dir_all(&dir).expect("a directory for the test databases");
        let file = dir.join(format!(
            "messaging_test_{}.db",
            uuid::Uuid::now_v7().simple()
        ));
        return format!("sqlite://{}", file.display());
    }
    fresh_postgres_database().await
}

/// A new PostgreSQL database, whatever the suite's backend (for PostgreSQL-only tests).
pub async fn fresh_postgres_database() -> String {
    let name = format!("messaging_test_{}", uuid::Uuid::now_v7().simple());
    let mut admin = PgConnection::connect(&admin_url())
        .await
        .expect("PostgreSQL must be reachable for the integration tests (see README)");
    sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
        .execute(&mut admin)
        .await
        .expect("create test database");
    with_database(&admin_url(), &name)
}

/// A migrated fresh database, for tests below the HTTP layer.
pub async fn migrated_pool() -> PgPool {
    let url = fresh_postgres_database().await;
    // As the service's own connections: a session left in a transaction (seen once, not
    // explained yet: a checkpoint's INSERT in a transaction nobody ended) is cut off after a
    // while, failing the test instead of holding every reader of the server back for ever.
    let options = sqlx::postgres::PgConnectOptions::from_str(&url)
        .expect("a PostgreSQL URL")
        .options([("idle_in_transaction_session_timeout", "60000")]);
    let pool = PgPoolOptions::new()
        .max_connections(20)
        .connect_with(options)
        .await
        .expect("connect");
    messaging::startup::migrate(&pool).await.expect("migrate");
    pool
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    /// The test's own connection to the service's database, for checks (either backend).
    pub pool: AnyPool,
    /// The store the service runs on, for commands a test issues directly.
    pub store: Arc<dyn Store>,
    pub database_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// The service's configuration for a test; `overrides` win over the test defaults.
pub fn test_config(database_url: &str, overrides: &[(&str, String)]) -> Config {
    Config::from_lookup(|k| {
        if let Some((_, v)) = overrides.iter().find(|(name, _)| *name == k) {
            return Some(v.clone());
        }
        match k {
            "DATABASE_URL" => Some(database_url.to_string()),
            "MESSAGING_API_KEYS" => Some(format!("other-key,{API_KEY}")),
            "MESSAGING_LISTEN" => Some("127.0.0.1:0".into()),
            "MESSAGING_MAX_BODY_BYTES" => Some("65536".into()),
            // Tests run side by side on one server: keep each instance's pool small.
            "MESSAGING_DATABASE_MAX_CONNECTIONS" => Some("8".into()),
            // Short backoffs keep retry tests quick; the policy is the same.
            "MESSAGING_SEND_BACKOFF_MS" => Some("200".into()),
            "MESSAGING_PROVIDER_TIMEOUT_MS" => Some("2000".into()),
            // Nothing leaves this machine: providers a test does not stand in for are a closed
            // local port, and the sandbox writes under the system's temporary directory.
            "MESSAGING_SENDGRID_BASE_URL"
            | "MESSAGING_X_BASE_URL"
            | "MESSAGING_FACEBOOK_BASE_URL" => Some("http://127.0.0.1:9".into()),
            "MESSAGING_SANDBOX_DIR" => Some(
                std::env::temp_dir()
                    .join("messaging-test-outbox")
                    .to_string_lossy()
                    .into_owned(),
            ),
            _ => None,
        }
    })
    .expect("test configuration")
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_on(fresh_database().await).await
    }

    /// Starts the service with some settings changed (provider base URLs, ...).
    pub async fn spawn_with(overrides: &[(&str, String)]) -> Self {
        Self::start(fresh_database().await, overrides).await
    }

    /// Starts the service on an existing database (for restarts).
    pub async fn spawn_on(database_url: String) -> Self {
        Self::start(database_url, &[]).await
    }

    pub async fn start(database_url: String, overrides: &[(&str, String)]) -> Self {
        let app = Application::build(&test_config(&database_url, overrides))
            .await
            .expect("the service starts");
        let addr = app.local_addr().expect("bound");
        let store = app.store();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            app.run(async {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
        });
        let pool = any_pool(&database_url).await;
        Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            pool,
            store,
            database_url,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stops the service gracefully and waits for it.
    pub async fn stop(mut self) -> String {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server stopped cleanly");
        }
        self.database_url.clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .client
            .get(self.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("request");
        read(r).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .client
            .post(self.url(path))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
            .await
            .expect("request");
        read(r).await
    }

    pub async fn create_service(&self, channel: &str, provider: &str, username: &str) -> String {
        let credentials = match provider {
            "sendgrid" => json!({"api_key": "SG.secret-value"}),
            "x" => json!({"bearer_token": "x-secret-token"}),
            "facebook" => json!({"page_access_token": "fb-secret-token"}),
            _ => json!({}),
        };
        let (status, body) = self
            .post(
                "/v1/services",
                json!({"channel": channel, "provider": provider, "name": "Our Brand",
                       "username": username, "credentials": credentials}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().expect("id").to_string()
    }

    pub async fn email_service(&self) -> String {
        self.create_service("email", "sendgrid", "news@example.com")
            .await
    }

    /// Composes an email to `to` and returns its view.
    pub async fn compose_email(&self, service_id: &str, to: &str, extra: Value) -> Value {
        let mut body = json!({"service_id": service_id, "to": [{"username": to}],
                              "subject": "Hello", "text": "Hi there"});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let (status, view) = self.post("/v1/messages", body).await;
        assert_eq!(status, StatusCode::CREATED, "{view}");
        view
    }

    /// An email composed with `send: true` through a new SendGrid service, once its provider
    /// call has started (its first attempt is recorded); its id.
    pub async fn email_in_flight(&self) -> String {
        let service = self.email_service().await;
        let id = self
            .compose_email(&service, "a@example.com", json!({"send": true}))
            .await["id"]
            .as_str()
            .expect("id")
            .to_string();
        eventually(|| async {
            let (_, m) = self.get(&format!("/v1/messages/{id}")).await;
            m["attempts"] == 1
        })
        .await;
        id
    }

    /// Waits until the message list shows `id` in `state`.
    /// An email sent (its provider call recorded as answered) and then opened `opens` times,
    /// each open a command of its own: a message with a long history.
    pub async fn email_opened(&self, opens: i64) -> messaging_domain::MessageId {
        use messaging_domain::{Fact, MessageCommand};
        let service = self.email_service().await;
        let draft = self
            .compose_email(&service, "ann@example.com", json!({}))
            .await;
        let id: messaging_domain::MessageId = draft["id"].as_str().unwrap().parse().unwrap();
        let now = chrono::Utc::now();
        self.store
            .execute(
                id,
                MessageCommand::Batch(vec![
                    MessageCommand::Send {
                        now,
                        expected_publish_at: None,
                    },
                    MessageCommand::StartSendAttempt { now, attempt: 1 },
                    MessageCommand::RecordSent {
                        provider_message_id: Some("sg-1".into()),
                        at: now,
                    },
                ]),
            )
            .await
            .unwrap();
        for n in 0..opens {
            let fact = Fact {
                fact_id: format!("open-{n}"),
                occurred_at: now + chrono::Duration::seconds(n),
            };
            let open = MessageCommand::RecordOpen {
                fact,
                machine_open: false,
            };
            self.store.execute(id, open).await.unwrap();
        }
        id
    }

    pub async fn wait_listed(&self, id: &str, state: &str) {
        eventually(|| async {
            let (_, body) = self.get("/v1/messages?limit=500").await;
            body["items"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["id"] == id && m["state"] == state)
        })
        .await;
    }
}

/// The store alone on a database, with no worker running (no scheduler, sender or pusher):
/// for driving the store's contract by hand. The service on that database must be stopped
/// first (SQLite serves one process).
pub async fn store_only(database_url: &str) -> Arc<dyn Store> {
    use messaging::startup::Backend;
    match Backend::open(&test_config(database_url, &[]))
        .await
        .expect("the database opens")
    {
        Backend::Postgres(pool) => Arc::new(messaging::store::postgres::PgStore::new(pool)),
        Backend::Sqlite { pools, lock } => {
            // The lock file is held as long as this test runs.
            std::mem::forget(lock);
            let (bell, _) = messaging::notify::in_process();
            Arc::new(messaging::store::sqlite::SqliteStore::new(pools, bell))
        }
    }
}

/// A small pool on either backend, for a test's own queries.
pub async fn any_pool(database_url: &str) -> AnyPool {
    static DRIVERS: std::sync::Once = std::sync::Once::new();
    DRIVERS.call_once(sqlx::any::install_default_drivers);
    AnyPoolOptions::new()
        .max_connections(if on_sqlite() { 1 } else { 5 })
        .connect(database_url)
        .await
        .expect("connect")
}

pub async fn read(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// Polls `check` until it holds, for at most ten seconds: read models are eventually
/// consistent, and this bound is generous, not a speed claim.
pub async fn eventually<F, Fut>(check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_within(Duration::from_secs(10), check).await
}

/// [`eventually`] with its own bound, for a wait made of many round trips and back-offs,
/// which a machine busy with the whole suite (CI) stretches.
pub async fn eventually_within<F, Fut>(bound: Duration, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + bound;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "an error says what to fix: {body}"
    );
}

/// Compose options that schedule a message a day ahead: a stable state, whatever the sender
/// is doing.
pub fn tomorrow() -> Value {
    json!({"publish_at": (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339()})
}

/// How many events of `event_type` the message `id` has in the log.
pub async fn events_of_type(pool: &PgPool, id: &str, event_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = $2")
        .bind(id)
        .bind(event_type)
        .fetch_one(pool)
        .await
        .unwrap()
}
