//! The service in a process of its own, for figures that must not count the bench: the bench
//! re-executes its own binary as `bench --serve-child`, which serves exactly like
//! `messaging serve` (configuration from the environment, `Application::build`, `run`), so
//! `cargo run --bin bench` needs no other binary built.
//!
//! The child stops on SIGTERM or Ctrl-C like `messaging serve`, and also when its standard
//! input closes: the bench holds the other end of that pipe, so a bench that dies without
//! running its destructors does not leave a service behind. `ServiceProcess` kills and reaps
//! it when dropped, whatever happened.
//!
//! Besides `/proc/<pid>/status`, the child answers each `heap` line on its standard input with
//! `heap <live bytes> <peak live bytes>` on its standard output: the bytes its allocations hold
//! (counted by `CountingAlloc`), which allocator retention and fragmentation do not blur. Its
//! logs go to standard error, so standard output carries only these answers.

use anyhow::{anyhow, Context, Result};
use messaging::config::Config;
use messaging::startup::Application;
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::time::{Duration, Instant};

/// The system allocator, counting live bytes once `count_heap` has been called (only in
/// `--serve-child`: the in-process scenarios pay one relaxed load per call).
pub struct CountingAlloc;

static COUNTING: AtomicBool = AtomicBool::new(false);
/// Signed: blocks allocated before counting started may be freed after.
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn counted(grow: isize) {
    let live = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
    if grow > 0 {
        PEAK.fetch_max(live, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `System`; the counting only reads the layouts.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc(layout);
        if !ptr.is_null() && COUNTING.load(Ordering::Relaxed) {
            counted(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc_zeroed(layout);
        if !ptr.is_null() && COUNTING.load(Ordering::Relaxed) {
            counted(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        if COUNTING.load(Ordering::Relaxed) {
            counted(-(layout.size() as isize));
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = System.realloc(ptr, layout, new_size);
        if !new.is_null() && COUNTING.load(Ordering::Relaxed) {
            counted(new_size as isize - layout.size() as isize);
        }
        new
    }
}

/// Starts counting live heap bytes (the first thing `--serve-child` does).
pub fn count_heap() {
    COUNTING.store(true, Ordering::Relaxed);
}

/// `bench --serve-child`: the service, configured from the environment.
pub async fn serve() -> Result<()> {
    let config = Config::from_env()?;
    let app = Application::build(&config).await?;
    app.run(stop_signal()).await
}

/// SIGTERM, Ctrl-C, or end of standard input (the parent is gone). Until then, answers the
/// `heap` lines on standard input.
async fn stop_signal() {
    let (closed, stdin_closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut out = std::io::stdout();
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line.trim() == "heap" {
                let live = LIVE.load(Ordering::Relaxed);
                let peak = PEAK.load(Ordering::Relaxed);
                if writeln!(out, "heap {live} {peak}")
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    break;
                }
            }
        }
        let _ = closed.send(());
    });
    tokio::select! {
        _ = messaging::startup::shutdown_signal() => {},
        _ = stdin_closed => {},
    }
}

/// A running `bench --serve-child`; killed and reaped on drop.
pub struct ServiceProcess {
    child: Child,
    /// Held open for the child's lifetime: closing it tells the child to stop.
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
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
            .stdout(Stdio::piped())
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
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(anyhow!("the service process has no stdin or stdout pipe"));
        };
        let mut service = Self {
            child,
            stdin,
            stdout: BufReader::new(stdout),
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

    /// The child's memory now, from `/proc/<pid>/status` and its heap count; an error if it
    /// has exited.
    pub fn memory(&mut self) -> Result<Memory> {
        if let Some(status) = self.child.try_wait()? {
            return Err(anyhow!("the service process exited: {status}"));
        }
        let mut memory = Memory::of(self.pid())?;
        // The child answers at once from a thread of its own.
        writeln!(self.stdin, "heap")
            .and_then(|()| self.stdin.flush())
            .context("asking the service process for its heap")?;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .context("reading the service process's heap")?;
        let parsed = line.strip_prefix("heap ").and_then(|rest| {
            let mut words = rest.split_whitespace();
            let live: i64 = words.next()?.parse().ok()?;
            let peak: i64 = words.next()?.parse().ok()?;
            Some((live.max(0) as u64, peak.max(0) as u64))
        });
        let (live, peak) =
            parsed.ok_or_else(|| anyhow!("the service process answered `{}`", line.trim()))?;
        memory.heap = live;
        memory.heap_peak = peak;
        Ok(memory)
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
    /// `RssAnon`: the resident heap, stacks and other anonymous memory.
    pub anon: u64,
    /// `RssFile`: resident pages of mapped files, mostly the binary's own code.
    pub file: u64,
    /// Bytes the process's allocations hold (its own count), and the most they ever held.
    pub heap: u64,
    pub heap_peak: u64,
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
            anon: kb("RssAnon:")?,
            file: kb("RssFile:")?,
            heap: 0,
            heap_peak: 0,
        })
    }
}
