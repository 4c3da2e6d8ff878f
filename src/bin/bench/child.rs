//! The service in a process of its own, for figures that must not count the bench: the bench
//! re-executes its own binary as `bench --serve-child`, which serves exactly like
//! `messaging serve` (configuration from the environment, `Application::build`, `run`), so
//! `cargo run --bin bench` needs no other binary built.
//!
//! The child stops on SIGTERM or Ctrl-C like `messaging serve`, and also when its standard
//! input closes: the bench holds the other end of that pipe, so a bench that dies without
//! running its destructors does not leave a service behind. `ServiceProcess` kills and reaps
//! it when dropped, whatever happened.

use anyhow::{anyhow, Context, Result};
use messaging::config::Config;
use messaging::startup::Application;
use std::io::Read;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// `bench --serve-child`: the service, configured from the environment.
pub async fn serve() -> Result<()> {
    let config = Config::from_env()?;
    let app = Application::build(&config).await?;
    app.run(stop_signal()).await
}

/// SIGTERM, Ctrl-C, or end of standard input (the parent is gone).
async fn stop_signal() {
    let (closed, stdin_closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = closed.send(());
    });
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
        _ = stdin_closed => {},
    }
}

/// A running `bench --serve-child`; killed and reaped on drop.
pub struct ServiceProcess {
    child: Child,
    /// Held open for the child's lifetime: closing it tells the child to stop.
    _stdin: Option<ChildStdin>,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
}

impl ServiceProcess {
    /// Starts the child with exactly `env` as its service settings (the bench's own
    /// `DATABASE_URL` and `MESSAGING_*` variables are not passed on), on a free local port, and
    /// waits (at most `ready_within`) until `/readyz` answers 200.
    pub async fn start(
        env: &[(&'static str, String)],
        http: &reqwest::Client,
        ready_within: Duration,
    ) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port for the service")?
            .port();
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let mut command = Command::new(exe);
        command
            .arg("--serve-child")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (name, _) in std::env::vars_os() {
            let inherited = name.to_string_lossy();
            if inherited == "DATABASE_URL" || inherited.starts_with("MESSAGING_") {
                command.env_remove(&name);
            }
        }
        for (name, value) in env {
            if *name != "MESSAGING_LISTEN" {
                command.env(name, value);
            }
        }
        command.env("MESSAGING_LISTEN", format!("127.0.0.1:{port}"));
        let mut child = command.spawn().context("starting `bench --serve-child`")?;
        let stdin = child.stdin.take();
        let mut service = Self {
            child,
            _stdin: stdin,
            base: format!("http://127.0.0.1:{port}"),
        };
        let started = Instant::now();
        loop {
            if let Some(status) = service.child.try_wait()? {
                return Err(anyhow!(
                    "the service process exited before it was ready: {status}"
                ));
            }
            let ready = http
                .get(format!("{}/readyz", service.base))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ready {
                return Ok(service);
            }
            if started.elapsed() > ready_within {
                return Err(anyhow!(
                    "the service process was not ready within {ready_within:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's memory now, from `/proc/<pid>/status`; an error if it has exited.
    pub fn memory(&mut self) -> Result<Memory> {
        if let Some(status) = self.child.try_wait()? {
            return Err(anyhow!("the service process exited: {status}"));
        }
        Memory::of(self.pid())
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        // SIGKILL cannot be ignored, so the wait is short.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss: u64,
    /// `VmHWM`: the most that was ever resident.
    pub peak: u64,
}

impl Memory {
    /// Reads `VmRSS` and `VmHWM` from `/proc/<pid>/status` (Linux).
    pub fn of(pid: u32) -> Result<Self> {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let kb = |field: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
                .ok_or_else(|| anyhow!("no {field} in {path}"))
        };
        Ok(Self {
            rss: kb("VmRSS:")?,
            peak: kb("VmHWM:")?,
        })
    }
}
