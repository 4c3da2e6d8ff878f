//! The README's "A first message" commands, run as written against a freshly started binary,
//! so the walkthrough cannot rot.

use crate::helpers::*;
use std::process::{Command, Stdio};
use std::time::Duration;

fn walkthrough() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme
        .find("## A first message")
        .expect("the section exists")..];
    let start = section.find("```sh\n").expect("a shell block") + "```sh\n".len();
    let end = start + section[start..].find("```").expect("the block ends");
    section[start..end].to_string()
}

#[tokio::test]
async fn the_readme_walkthrough_runs_as_written() {
    for tool in ["bash", "curl", "jq"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status();
        assert!(found.is_ok(), "the README needs `{tool}`; install it");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    // The README's start command (`cargo run --release`: the binary, no arguments) with no
    // configuration but a free port; on the PostgreSQL pass, its production command's
    // DATABASE_URL and key too.
    let mut command = Command::new(env!("CARGO_BIN_EXE_messaging"));
    command
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MESSAGING_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn");
    let mut script_env = Vec::new();
    if !on_sqlite() {
        command
            .arg("serve")
            .env("DATABASE_URL", fresh_database().await)
            .env("MESSAGING_API_KEYS", "change-me");
        script_env.push(("MESSAGING_API_KEYS", "change-me"));
    }
    let mut server = command.spawn().unwrap();
    let client = reqwest::Client::new();
    let mut up = false;
    for _ in 0..200 {
        if client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let script = walkthrough().replace("localhost:8080", &format!("localhost:{port}"));
    if !up {
        let _ = server.kill();
        let _ = server.wait();
        panic!("the service did not start");
    }
    // Twice, as a newcomer trying it again would, on the same data: the second run must work
    // as the first did (its compose is a new request, not a reused key's).
    let mut outputs = Vec::new();
    for _ in 0..2 {
        outputs.push(
            Command::new("bash")
                .args(["-euo", "pipefail", "-c", &script])
                .env_remove("MESSAGING_API_KEYS")
                .envs(script_env.clone())
                .current_dir(dir.path())
                .output()
                .unwrap(),
        );
    }
    let _ = server.kill();
    let _ = server.wait();
    for (run, output) in outputs.iter().enumerate() {
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "run {run}: the walkthrough failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        // It follows the message through the feed to `sent`, and cancels the scheduled one.
        assert!(
            stdout.contains("\"MessageComposed\""),
            "run {run}: {stdout}"
        );
        assert!(stdout.contains("\"MessageSent\""), "run {run}: {stdout}");
        // The feed read from its start shows every run's email so far.
        assert_eq!(
            stdout.matches("[\"pending\",\"sent\"]").count(),
            run + 1,
            "run {run}: the feed shows it: {stdout}"
        );
        assert!(
            stdout.trim_end().ends_with("\"cancelled\""),
            "run {run}: {stdout}"
        );
    }
    // The sandbox wrote each run's email where the README says.
    let outbox = dir.path().join("data/outbox");
    let emails = std::fs::read_dir(&outbox).unwrap().filter(|e| {
        e.as_ref()
            .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "eml"))
    });
    assert_eq!(emails.count(), 2);
    // Where the README says the embedded default keeps its database and its key (this user's
    // only).
    assert_eq!(dir.path().join("data/messaging.db").exists(), on_sqlite());
    assert_eq!(dir.path().join("data/api-key").exists(), on_sqlite());
    if on_sqlite() {
        use std::os::unix::fs::PermissionsExt;
        for private in ["data", "data/api-key", "data/messaging.db"] {
            let mode = std::fs::metadata(dir.path().join(private))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{private} is {mode:o}");
        }
    }
}
