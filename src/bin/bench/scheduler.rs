//! Scenario `scheduler`: N messages scheduled over a short window in the near future; lateness
//! from `publish_at` to the provider call, the figure the targets are on: to the call's
//! answer (`MessageSent.sent_at`, an upper bound of the call's time; a message not sent counts
//! as infinitely late), with the call's start (`SendAttemptStarted.started_at`, a lower bound)
//! and the firing (`MessageQueued` recorded) beside it. The service's memory is measured apart,
//! in a process of its own (`scheduler-memory`): this process holds the bench too.
//!
//! The schedule is written directly in bulk (`common::insert_messages`: the exact rows
//! postgres-es writes), not through commands, so 100k are ready in seconds. From there on
//! everything is the real path: the `delivery` subscription writes `scheduled_sends`, the
//! scheduler fires, the sender sends.

use crate::common::{create_service, insert_messages, settle, Bench, Figure};
use anyhow::{anyhow, Context, Result};
use chrono::Utc;
use messaging_domain::Dispatch;
use std::time::{Duration, Instant};

const SCENARIO: &str = "scheduler";

/// Count, p50, p99, max (ms) to `MessageQueued`, then the same to `SendAttemptStarted`, then
/// to `MessageSent` (where a message not sent is infinitely late).
#[derive(sqlx::FromRow)]
struct Lateness {
    queued: i64,
    q50: Option<f64>,
    q99: Option<f64>,
    qmax: Option<f64>,
    sent: i64,
    s50: Option<f64>,
    s99: Option<f64>,
    answered: i64,
    a50: Option<f64>,
    a99: Option<f64>,
    amax: Option<f64>,
}

/// The figures every scheduler scenario reports; the targets are on the provider call.
fn lateness_figures(scenario: &'static str, row: &Lateness, of: usize) -> Vec<Figure> {
    let nan = |v: Option<f64>| v.unwrap_or(f64::NAN);
    let mut figures = vec![
        Figure::below(
            scenario,
            "publish_at -> provider call answered (MessageSent), p50",
            "ms",
            nan(row.a50),
            50.0,
        ),
        Figure::below(
            scenario,
            "publish_at -> provider call answered (MessageSent), p99",
            "ms",
            nan(row.a99),
            250.0,
        ),
        Figure::info(
            scenario,
            "publish_at -> provider call answered (MessageSent), max",
            "ms",
            nan(row.amax),
        )
        .note(format!(
            "{} of {of} sent (one not sent counts as infinitely late)",
            row.answered
        )),
        Figure::info(
            scenario,
            "publish_at -> provider call started (SendAttemptStarted), p50",
            "ms",
            nan(row.s50),
        ),
        Figure::info(
            scenario,
            "publish_at -> provider call started (SendAttemptStarted), p99",
            "ms",
            nan(row.s99),
        )
        .note(format!("{} of {of} started", row.sent)),
        Figure::info(
            scenario,
            "publish_at -> MessageQueued recorded, p50",
            "ms",
            nan(row.q50),
        ),
        Figure::info(
            scenario,
            "publish_at -> MessageQueued recorded, p99",
            "ms",
            nan(row.q99),
        ),
        Figure::info(
            scenario,
            "publish_at -> MessageQueued recorded, max",
            "ms",
            nan(row.qmax),
        )
        .note(format!("{} of {of} queued", row.queued)),
    ];
    if (row.answered as usize) < of {
        for f in figures.iter_mut().filter(|f| f.met.is_some()) {
            f.met = Some(false);
        }
    }
    figures
}

pub async fn run(bench: &mut Bench) -> Result<Vec<Figure>> {
    let n: usize = bench.size(5_000, 100_000);
    // The window opens after the bulk insert and the delivery subscription have had time to
    // write the schedule (checked and reported below).
    let (opens, spread) = bench.size((4.0, 5.0), (40.0, 20.0));
    settle(&bench.pool, Duration::from_secs(bench.size(15, 120))).await?;
    let service = create_service(
        &bench.http,
        &bench.base,
        &bench.api_key,
        "scheduled@example.com",
    )
    .await?;
    let started = Instant::now();
    let t0 = Utc::now();
    let window_start = t0 + chrono::Duration::milliseconds((opens * 1e3) as i64);
    let window_end = window_start + chrono::Duration::milliseconds((spread * 1e3) as i64);
    let step = (spread * 1e3) / n as f64;
    let ids = insert_messages(&bench.pool, &service, n, |i| {
        Dispatch::At(window_start + chrono::Duration::microseconds((i as f64 * step * 1e3) as i64))
    })
    .await?;
    let inserted = started.elapsed();
    let ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    // The schedule is ready when the delivery subscription has read every one of its events.
    let projected = loop {
        let lag = messaging_projections::subscription::lag(&bench.pool, "delivery").await?;
        if lag == 0 || started.elapsed() > Duration::from_secs_f64(opens + spread + 120.0) {
            break started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Then until every due row has fired.
    let cap = Duration::from_secs_f64(opens + spread + bench.size(10.0, 180.0));
    // The watcher's own queries stay cheap (EXISTS, by index): it polls while the service is
    // measured, and a count over the table every 100 ms took 9-17 ms of PostgreSQL's time.
    loop {
        let left: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM scheduled_sends WHERE publish_at <= $1)",
        )
        .bind(window_end)
        .fetch_one(&bench.pool)
        .await?;
        let delivery_lag =
            messaging_projections::subscription::lag(&bench.pool, "delivery").await?;
        if (Utc::now() > window_end && !left && delivery_lag == 0) || started.elapsed() > cap {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fired_by = started.elapsed();
    // Give the sender time to start the sends (sandbox: local files), within a bound.
    let send_cap = Duration::from_secs(bench.size(5, 180));
    let send_started = Instant::now();
    while send_started.elapsed() < send_cap && jobs_left(&bench.pool).await? {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let row = lateness(&bench.pool, &ids).await?;
    if row.queued == 0 {
        return Err(anyhow!(
            "none of the {n} scheduled messages was queued within {cap:?}"
        ));
    }
    let setup = format!(
        "{n} scheduled over {spread} s opening at +{opens} s; bulk insert took {:.1} s, schedule projected at +{:.1} s; all due rows fired by +{:.1} s",
        inserted.as_secs_f64(),
        projected.as_secs_f64(),
        fired_by.as_secs_f64()
    );
    let late_note = if projected.as_secs_f64() > opens {
        " (the schedule was not fully projected when the window opened: lateness includes that)"
    } else {
        ""
    };
    let mut figures =
        vec![Figure::info(SCENARIO, "setup", "msgs", n as f64).note(format!("{setup}{late_note}"))];
    figures.extend(lateness_figures(SCENARIO, &row, n));
    Ok(figures)
}

/// Lateness of these messages: `publish_at` to `MessageQueued` recorded, to the provider
/// call's start (`SendAttemptStarted`) and to its answer (`MessageSent`).
async fn lateness(pool: &sqlx::PgPool, ids: &[String]) -> Result<Lateness> {
    let row: Lateness = sqlx::query_as(
            "WITH s AS (SELECT e.aggregate_id, \
                               (e.payload->'MessageScheduled'->>'publish_at')::timestamptz AS publish_at \
                        FROM events e WHERE e.aggregate_type = 'Message' \
                          AND e.aggregate_id = ANY($1) AND e.event_type = 'MessageScheduled'), \
                  l AS (SELECT \
                     (SELECT extract(epoch FROM min(q.recorded_at) - s.publish_at) * 1000 FROM events q \
                      WHERE q.aggregate_type = 'Message' AND q.aggregate_id = s.aggregate_id \
                        AND q.event_type = 'MessageQueued')::float8 AS queued, \
                     (SELECT extract(epoch FROM min((a.payload->'SendAttemptStarted'->>'started_at')::timestamptz) \
                                                - s.publish_at) * 1000 FROM events a \
                      WHERE a.aggregate_type = 'Message' AND a.aggregate_id = s.aggregate_id \
                        AND a.event_type = 'SendAttemptStarted')::float8 AS started, \
                     (SELECT extract(epoch FROM min((m.payload->'MessageSent'->>'sent_at')::timestamptz) \
                                                - s.publish_at) * 1000 FROM events m \
                      WHERE m.aggregate_type = 'Message' AND m.aggregate_id = s.aggregate_id \
                        AND m.event_type = 'MessageSent')::float8 AS answered \
                     FROM s) \
             SELECT count(queued) AS queued, \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY queued) AS q50, \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY queued) AS q99, max(queued) AS qmax, \
                    count(started) AS sent, percentile_cont(0.5) WITHIN GROUP (ORDER BY started) AS s50, \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY started) AS s99, \
                    count(answered) AS answered, \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY coalesce(answered, 'Infinity')) AS a50, \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY coalesce(answered, 'Infinity')) AS a99, \
                    max(coalesce(answered, 'Infinity')) AS amax \
             FROM l",
        )
        .bind(ids)
        .fetch_one(pool)
        .await
        .context("reading the lateness")?;
    Ok(row)
}

/// Scenario `scheduler-spread`: many messages scheduled over the next hour (the target's
/// "a hundred thousand scheduled"), and the lateness of those that come due while we watch.
/// Unlike `scheduler`, the firing rate is what a real schedule asks (about 28/s at 100k over an
/// hour), so this measures the wake-at-the-next-due-time design, not firing throughput.
pub async fn run_spread(bench: &mut Bench) -> Result<Vec<Figure>> {
    const SCENARIO: &str = "scheduler-spread";
    let n: usize = bench.size(20_000, 100_000);
    let spread = 3600.0;
    // Time for the bulk insert and for the subscriptions to project it, then the watch.
    let (opens, observe) = bench.size((15.0, 20.0), (60.0, 30.0));
    settle(&bench.pool, Duration::from_secs(bench.size(15, 120))).await?;
    let service = create_service(
        &bench.http,
        &bench.base,
        &bench.api_key,
        "spread@example.com",
    )
    .await?;
    let started = Instant::now();
    let window_start = Utc::now() + chrono::Duration::milliseconds((opens * 1e3) as i64);
    let step_us = spread * 1e6 / n as f64;
    let ids = insert_messages(&bench.pool, &service, n, |i| {
        Dispatch::At(window_start + chrono::Duration::microseconds((i as f64 * step_us) as i64))
    })
    .await?;
    let projected = loop {
        let lag = messaging_projections::subscription::lag(&bench.pool, "delivery").await?;
        if lag == 0 || started.elapsed() > Duration::from_secs_f64(opens + 120.0) {
            break started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let watch_end = Duration::from_secs_f64(opens + observe + 2.0);
    if let Some(left) = watch_end.checked_sub(started.elapsed()) {
        tokio::time::sleep(left).await;
    }
    let due = ((observe * 1e6) / step_us) as usize;
    let watched: Vec<String> = ids.iter().take(due).map(|id| id.to_string()).collect();
    let row = lateness(&bench.pool, &watched).await?;
    let note =
        format!(
        "{n} scheduled over {spread} s; {} came due in the {observe} s watched (from +{opens} s); \
         schedule projected at +{:.1} s{}",
        watched.len(),
        projected.as_secs_f64(),
        if projected.as_secs_f64() > opens { " (late: lateness includes it)" } else { "" }
    );
    let mut figures = vec![Figure::info(SCENARIO, "setup", "msgs", n as f64).note(note)];
    figures.extend(lateness_figures(SCENARIO, &row, watched.len()));
    Ok(figures)
}

/// Whether any send job is left (one index step; `backlog` counts every one).
async fn jobs_left(pool: &sqlx::PgPool) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM send_jobs)")
            .fetch_one(pool)
            .await?,
    )
}
