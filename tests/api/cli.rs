//! The `messaging` binary: migrate, projections rebuild, and start-up errors.

use crate::helpers::*;
use std::process::Command;

fn messaging(database_url: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_messaging"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}

#[tokio::test]
async fn migrate_creates_the_database_and_rebuild_restores_the_read_models() {
    // A database that does not exist yet: `migrate` creates it.
    let url = fresh_database()
        .await
        .replace("messaging_test_", "messaging_test_new_");
    let out = messaging(&url, &["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("migrations applied"));

    let app = TestApp::spawn_on(url.clone()).await;
    let service = app.email_service().await;
    let id = app
        .compose_email(&service, "a@example.com", tomorrow())
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    app.wait_listed(&id, "scheduled").await;
    let before: Vec<String> =
        sqlx::query_scalar("SELECT CAST(message AS TEXT) FROM message_list ORDER BY message_id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let url = app.stop().await;

    // Lose the read model, then rebuild it from the log.
    let pool = any_pool(&url).await;
    sqlx::query("DELETE FROM message_list")
        .execute(&pool)
        .await
        .unwrap();
    let out = messaging(&url, &["projections", "rebuild", "message_list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("message_list: rebuilt from 2 events"),
        "{stdout}"
    );
    let after: Vec<String> =
        sqlx::query_scalar("SELECT CAST(message AS TEXT) FROM message_list ORDER BY message_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(before, after);

    let out = messaging(&url, &["projections", "rebuild", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("message_list, state_changes, delivery"));
}

#[test]
fn bad_configuration_stops_start_up_with_one_line_naming_the_setting() {
    let cases: [(&[(&str, &str)], &str); 9] = [
        (
            &[
                ("DATABASE_URL", "postgres://u:hunter2@127.0.0.1/x"),
                ("MESSAGING_API_KEYS", "k"),
                ("MESSAGING_LOG_FORMAT", "yaml"),
            ],
            "MESSAGING_LOG_FORMAT",
        ),
        (
            &[
                ("DATABASE_URL", "postgres://u:hunter2@127.0.0.1/x"),
                ("MESSAGING_API_KEYS", "k"),
                ("RUST_LOG", "info,sqlx=loud"),
            ],
            "RUST_LOG",
        ),
        (
            &[("DATABASE_URL", "postgres://u:hunter2@127.0.0.1/x")],
            "MESSAGING_API_KEYS",
        ),
        (&[("DATABASE_URL", "sqlite://")], "DATABASE_URL"),
        (
            &[("DATABASE_URL", "mysql://x"), ("MESSAGING_API_KEYS", "k")],
            "DATABASE_URL",
        ),
        (
            &[
                ("DATABASE_URL", "postgres://u:hunter2@127.0.0.1/x"),
                ("MESSAGING_API_KEYS", " , "),
            ],
            "MESSAGING_API_KEYS",
        ),
        (
            &[
                ("DATABASE_URL", "postgres://u:hunter2@127.0.0.1/x"),
                ("MESSAGING_API_KEYS", "k"),
                ("MESSAGING_LISTEN", "everywhere"),
            ],
            "MESSAGING_LISTEN",
        ),
        // Webhook keys are checked before anything starts (a database reached, a port
        // bound): here with a database that is not there.
        (
            &[
                ("DATABASE_URL", "postgres://u:hunter2@127.0.0.1/x"),
                ("MESSAGING_API_KEYS", "k"),
                ("MESSAGING_SENDGRID_WEBHOOK_PUBLIC_KEY", "not-a-key"),
            ],
            "MESSAGING_SENDGRID_WEBHOOK_PUBLIC_KEY",
        ),
        (
            &[
                ("DATABASE_URL", "postgres://u:hunter2@127.0.0.1/x"),
                ("MESSAGING_API_KEYS", "k"),
                ("MESSAGING_SENDGRID_INBOUND_PUBLIC_KEY", "bm90IGEga2V5"),
            ],
            "MESSAGING_SENDGRID_INBOUND_PUBLIC_KEY",
        ),
    ];
    for (env, setting) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_messaging"))
            .arg("serve")
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(setting), "{stderr}");
        assert!(
            !stderr.contains("hunter2"),
            "no secret in the error: {stderr}"
        );
    }
}

#[tokio::test]
async fn a_second_process_on_the_same_sqlite_file_stops_at_start_up_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("one.db").display());
    let app = TestApp::spawn_on(url.clone()).await;
    let out = Command::new(env!("CARGO_BIN_EXE_messaging"))
        .arg("serve")
        .env_clear()
        .env("DATABASE_URL", &url)
        .env("MESSAGING_API_KEYS", "k")
        .env("MESSAGING_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another messaging process is using") && stderr.contains("postgres://"),
        "{stderr}"
    );
    // The first one was not disturbed.
    let (status, _) = app.get("/v1/messages").await;
    assert_eq!(status, reqwest::StatusCode::OK);
    // Once it stops, the file is free again.
    app.stop().await;
    let out = messaging(&url, &["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_toml_file_named_by_messaging_config_configures_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let file = dir.path().join("messaging.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:{port}\"\napi_keys = [\"file-key\"]\ndata_dir = \"{}\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    /// Stops the service however the test ends.
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Running(
        Command::new(env!("CARGO_BIN_EXE_messaging"))
            .arg("serve")
            .env_clear()
            .env("MESSAGING_CONFIG", &file)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/messages");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        match client.get(&url).bearer_auth("file-key").send().await {
            Ok(r) => break r.status(),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(e) => panic!("the service never listened on the file's address: {e}"),
        }
    };
    assert_eq!(
        status,
        reqwest::StatusCode::OK,
        "the file's key is accepted"
    );
    let r = client.get(&url).bearer_auth("other").send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    assert!(dir.path().join("data").join("messaging.db").exists());
    drop(child);

    // A key that names no setting stops start-up with one line saying which.
    std::fs::write(&file, "lisen = \"127.0.0.1:1\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_messaging"))
        .arg("serve")
        .env_clear()
        .env("MESSAGING_CONFIG", &file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("MESSAGING_CONFIG") && stderr.contains("`lisen` is not a setting"),
        "{stderr}"
    );
}
