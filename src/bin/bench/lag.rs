//! Scenario `lag`: at a steady, open-loop load of half the peak in-process "send now" rate
//! (counted until every message was sent: the rate the whole pipeline sustains), the time from a
//! compose's commit (its `execute` returned) until the message list shows it and until the
//! state-change feed has it, measured by a poller on its own connection.

use crate::common::{backlog, closed_loop, execute_compose, quantile, settle, Bench, Figure};
use anyhow::{Context, Result};
use messaging_domain::Dispatch;
use sqlx::{Connection, PgConnection};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};

const SCENARIO: &str = "lag";
/// The poller's pause between two looks (its resolution, with the query's own time).
const POLL: Duration = Duration::from_millis(2);

pub async fn run(bench: &mut Bench) -> Result<Vec<Figure>> {
    let settle_cap = Duration::from_secs(bench.size(10, 60));
    settle(&bench.pool, settle_cap).await?;
    let (rate, load) = match (bench.lag_rate, bench.peak_send_rate) {
        (Some(rate), _) if rate > 0.0 => (rate, "set by --lag-rate".to_string()),
        (_, Some(peak)) if peak > 0.0 => (
            peak / 2.0,
            format!("half of the peak {peak:.0} msg/s sent, from `commands`"),
        ),
        // Run alone (`--only lag`): measure the peak briefly, as `commands` counts it: the
        // messages over the time until every one was sent and projected.
        _ => {
            let (store, service) = (bench.store.clone(), bench.service.clone());
            let r = closed_loop(8, Duration::from_secs(bench.size(1, 2)), move || {
                let (store, service) = (store.clone(), service.clone());
                async move {
                    execute_compose(&store, &service, Dispatch::Now)
                        .await
                        .map(|_| ())
                }
            })
            .await;
            let (after, unread, unsent) = settle(&bench.pool, settle_cap).await?;
            let peak = r.ok as f64 / (r.elapsed + after).as_secs_f64();
            let bound = if unread > 0 || unsent > 0 {
                " (NOT settled: an upper bound)"
            } else {
                ""
            };
            (
                peak / 2.0,
                format!("half of the peak {peak:.0} msg/s sent{bound}, 8 clients until all sent"),
            )
        }
    };
    let rate = rate.max(1.0);
    let duration = Duration::from_secs(bench.size(2, 10));
    let total = (rate * duration.as_secs_f64()) as usize;

    // Each poll planned for its values: a prepared statement's generic plan is made at its
    // sixth run and kept, and with no statistics (autovacuum is off on the machine the bench
    // was made on) it was a sequential scan of the table for every poll.
    let options = bench
        .pool
        .connect_options()
        .as_ref()
        .clone()
        .options([("plan_cache_mode", "force_custom_plan")]);
    let mut conn = PgConnection::connect_with(&options)
        .await
        .context("the poller's connection")?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(uuid::Uuid, Sent)>();
    // Where the feed ends before the load begins: an item projected before this read would
    // be passed over.
    let mut feed = FeedLook::starting_now(&mut conn).await?;
    let cpu_at_start = cpu_times();
    let generator = {
        let (store, service) = (bench.store.clone(), bench.service.clone());
        tokio::spawn(async move {
            let limit = Arc::new(Semaphore::new(64));
            let started = tokio::time::Instant::now();
            let interval = Duration::from_secs_f64(1.0 / rate);
            let mut failures = 0u64;
            let mut tasks = Vec::with_capacity(total);
            for i in 0..total {
                tokio::time::sleep_until(started + interval.mul_f64(i as f64)).await;
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    break;
                };
                let (store, service, tx) = (store.clone(), service.clone(), tx.clone());
                tasks.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    let result = execute_compose(&store, &service, Dispatch::Now).await;
                    let answered = Instant::now();
                    drop(permit);
                    match result {
                        Ok(id) => {
                            let _ = tx.send((id.as_uuid(), Sent { sent, answered }));
                            true
                        }
                        Err(_) => false,
                    }
                }));
            }
            for task in tasks {
                if !matches!(task.await, Ok(true)) {
                    failures += 1;
                }
            }
            (started.elapsed(), failures)
        })
    };

    let mut list_pending: HashMap<uuid::Uuid, Sent> = HashMap::new();
    let mut feed_pending: HashMap<uuid::Uuid, Sent> = HashMap::new();
    let (mut list_lags, mut feed_lags) = (Lags::default(), Lags::default());
    let mut deadline = None;
    let mut cpu_busy = None;
    let mut left_at_end = None;
    loop {
        // Read before draining: everything sent before the generator ended is drained below.
        let finished = generator.is_finished();
        while let Ok((id, at)) = rx.try_recv() {
            list_pending.insert(id, at);
            match feed.early.remove(&id) {
                // In the feed before its id got here: as good as visible at once.
                Some(seen) => {
                    feed.done.insert(id);
                    feed_lags.record(seen, at)
                }
                None => {
                    feed_pending.insert(id, at);
                }
            }
        }
        if finished && deadline.is_none() {
            deadline = Some(Instant::now() + Duration::from_secs(30));
            cpu_busy =
                busy_share(cpu_at_start, cpu_times()).zip(own_share(cpu_at_start, cpu_times()));
            left_at_end = Some((Instant::now(), backlog(&bench.pool).await?));
        }
        if finished && list_pending.is_empty() && feed_pending.is_empty() {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            break;
        }
        look_in_list(&mut conn, &mut list_pending, &mut list_lags).await?;
        feed.look(&mut conn, &mut feed_pending, &mut feed_lags)
            .await?;
        tokio::time::sleep(POLL).await;
    }
    let (elapsed, failures) = generator.await.context("the load generator")?;
    drop(rx);
    // Steady means the sender kept up: what was open when the load ended is the last moments'
    // work, not a backlog that grew all along.
    let (_, unread, unsent) = settle(&bench.pool, settle_cap).await?;
    let drained_after = left_at_end.map(|(ended, _)| ended.elapsed());
    let achieved =
        list_lags.answered.len().max(feed_lags.answered.len()) as f64 / elapsed.as_secs_f64();
    list_lags.sort();
    feed_lags.sort();
    let mut steady = true;
    let load_note = format!(
        "open-loop {rate:.0} msg/s ({load}) for {duration:?}, achieved {achieved:.0}/s, {failures} failed; \
         sender running; poll every {POLL:?}; {}",
        match cpu_busy {
            Some((busy, own)) => format!(
                "the machine's {} cores were {:.0}% busy meanwhile, {:.0}% by this process \
                 (service and bench; the rest is mostly PostgreSQL)",
                std::thread::available_parallelism().map_or(0, |n| n.get()),
                busy * 100.0,
                own * 100.0
            ),
            None => "CPU use unknown".into(),
        }
    );
    let mut figures = vec![Figure::info(
        SCENARIO,
        "steady load (compose + send now)",
        "msg/s",
        achieved,
    )
    .note(load_note)];
    if let (Some((_, (pairs, jobs))), Some(after)) = (left_at_end, drained_after) {
        let settled = unread == 0 && unsent == 0;
        let mut drained = Figure::info(
            SCENARIO,
            "load ended -> every message sent and projected",
            "ms",
            after.as_secs_f64() * 1e3,
        )
        .note(format!(
            "when the load ended: {jobs} send jobs open, {pairs} (event, subscription) pairs unread"
        ));
        if !settled {
            drained = drained.note(format!(
                "NOT settled after {settle_cap:?}: {unsent} send jobs open, {unread} pairs unread"
            ));
        }
        // A steady load leaves only its last moments' work; more than a second of catching up
        // means a backlog grew during the load.
        if !settled || after > Duration::from_secs(1) {
            drained = drained.note("the pipeline did not keep up: NOT a steady load");
            steady = false;
        }
        figures.push(drained);
    }
    for (what, lags, missing) in [
        ("message list", &list_lags, list_pending.len()),
        ("state-change feed", &feed_lags, feed_pending.len()),
    ] {
        figures.push(Figure::info(
            SCENARIO,
            format!("commit -> visible in {what}, p50"),
            "ms",
            quantile(&lags.answered, 0.5),
        ));
        let mut p99 = Figure::below(
            SCENARIO,
            format!("commit -> visible in {what}, p99"),
            "ms",
            quantile(&lags.answered, 0.99),
            100.0,
        )
        .note(format!(
            "from the command's answer (just after its commit); from the command's start, an \
             upper bound: p99 {:.1} ms",
            quantile(&lags.sent, 0.99)
        ));
        if missing > 0 {
            p99 = p99
                .note(format!(
                    "{missing} never seen within 30 s after the load ended"
                ))
                .spoil();
        }
        if !steady {
            p99 = p99.note("NOT a steady load (above)").spoil();
        }
        figures.push(p99);
        figures.push(Figure::info(
            SCENARIO,
            format!("commit -> visible in {what}, max"),
            "ms",
            quantile(&lags.answered, 1.0),
        ));
    }
    Ok(figures)
}

/// When a command of the load was sent, and when its answer came (just after its commit).
#[derive(Clone, Copy)]
struct Sent {
    sent: Instant,
    answered: Instant,
}

/// Lags (ms) from the command's answer, and from its start (an upper bound).
#[derive(Default)]
struct Lags {
    answered: Vec<f64>,
    sent: Vec<f64>,
}

impl Lags {
    fn record(&mut self, seen: Instant, at: Sent) {
        let ms = |from: Instant| seen.saturating_duration_since(from).as_secs_f64() * 1e3;
        self.answered.push(ms(at.answered));
        self.sent.push(ms(at.sent));
    }

    fn sort(&mut self) {
        self.answered.sort_by(f64::total_cmp);
        self.sent.sort_by(f64::total_cmp);
    }
}

/// The poller's reads cost what they read, not what is pending: at a few thousand messages a
/// second, one index lookup per pending id every 2 ms (as an earlier version did) kept a
/// PostgreSQL backend busy, taken from the service it measures.
///
/// The list: rows from the oldest pending id on (message ids are UUIDv7, ordered by time), one
/// range of the primary key.
async fn look_in_list(
    conn: &mut PgConnection,
    pending: &mut HashMap<uuid::Uuid, Sent>,
    lags: &mut Lags,
) -> Result<()> {
    let Some(mut from) = pending.keys().min().copied() else {
        return Ok(());
    };
    // A page at a time, in key order: the ORDER BY and LIMIT keep the plan a range of the
    // primary key however the planner estimates the range.
    loop {
        let found: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT message_id FROM message_list WHERE message_id >= $1 ORDER BY message_id \
             LIMIT $2",
        )
        .bind(from)
        .bind(POLL_PAGE)
        .fetch_all(&mut *conn)
        .await
        .context("polling the message list")?;
        let now = Instant::now();
        let full = found.len() as i64 == POLL_PAGE;
        for id in &found {
            if let Some(at) = pending.remove(id) {
                lags.record(now, at);
            }
        }
        match found.last() {
            Some(last) if full && *last != from && !pending.is_empty() => from = *last,
            _ => return Ok(()),
        }
    }
}

/// Rows per poll query (more are read by the next query). With `LIMIT 10000` the feed's poll
/// was still planned as a sequential scan and sort once the feed held some 70k items (the
/// planner's guess for `position > $1`, with no statistics, is a third of the table): 5 ms a
/// poll; an index range reads only the new rows (0.05 ms).
const POLL_PAGE: i64 = 1000;

/// The feed: only the items after the last one read. Its positions become visible in order
/// (one batch at a time, under the subscription's lock), so nothing is passed over.
struct FeedLook {
    last: i64,
    /// Messages whose first item was read before their id reached the poller, and when.
    early: HashMap<uuid::Uuid, Instant>,
    /// Messages already measured (their later items are not firsts).
    done: std::collections::HashSet<uuid::Uuid>,
}

impl FeedLook {
    async fn starting_now(conn: &mut PgConnection) -> Result<Self> {
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM state_changes")
            .fetch_one(&mut *conn)
            .await
            .context("reading the feed's end")?;
        Ok(Self {
            last,
            early: HashMap::new(),
            done: std::collections::HashSet::new(),
        })
    }

    async fn look(
        &mut self,
        conn: &mut PgConnection,
        pending: &mut HashMap<uuid::Uuid, Sent>,
        lags: &mut Lags,
    ) -> Result<()> {
        // The LIMIT keeps the plan a primary-key range: the table has no statistics yet
        // during a run (no ANALYZE has come round), and without it the plan was a sequential
        // scan and sort of the whole feed, 60 ms a poll at 1.5M items in a full run (so polls
        // came every 60 ms, not every 2, and the feed's lag read higher than the list's).
        // A page at a time until a page is not full.
        loop {
            let items: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
                "SELECT message_id, position FROM state_changes WHERE position > $1 \
                 ORDER BY position LIMIT $2",
            )
            .bind(self.last)
            .bind(POLL_PAGE)
            .fetch_all(&mut *conn)
            .await
            .context("polling the state-change feed")?;
            let now = Instant::now();
            let full = items.len() as i64 == POLL_PAGE;
            for (id, position) in items {
                self.last = position;
                if let Some(at) = pending.remove(&id) {
                    lags.record(now, at);
                    self.done.insert(id);
                } else if !self.done.contains(&id) {
                    self.early.entry(id).or_insert(now);
                }
            }
            if !full {
                return Ok(());
            }
        }
    }
}

/// The machine's CPU time so far: busy, total and this process's, in clock ticks (Linux
/// `/proc/stat`, `/proc/self/stat`).
fn cpu_times() -> Option<(u64, u64, u64)> {
    let (busy, total) = machine_times()?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    // After the command name: state is field 3, utime and stime are fields 14 and 15.
    let fields: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
    let own = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((busy, total, own))
}

fn machine_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    // idle and iowait
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// The share of the machine's CPU time that was busy between two readings: near 1, the
/// load saturates the machine and the lag measures the queueing that comes with it.
fn busy_share(start: Option<(u64, u64, u64)>, end: Option<(u64, u64, u64)>) -> Option<f64> {
    let ((busy0, total0, _), (busy1, total1, _)) = (start?, end?);
    (total1 > total0).then(|| (busy1 - busy0) as f64 / (total1 - total0) as f64)
}

/// The share of the machine's CPU time this process used between two readings.
fn own_share(start: Option<(u64, u64, u64)>, end: Option<(u64, u64, u64)>) -> Option<f64> {
    let ((_, total0, own0), (_, total1, own1)) = (start?, end?);
    (total1 > total0).then(|| own1.saturating_sub(own0) as f64 / (total1 - total0) as f64)
}
