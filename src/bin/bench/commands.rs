//! Scenario `commands`: compose+send throughput at 1, 8 and 32 concurrent clients, in-process
//! through `PgStore::execute` and over HTTP, against plain single-row INSERTs of an event-shaped
//! row at the same concurrency.

use crate::common::{
    closed_loop, compose, compose_body, execute_compose, insert_messages, settle, settle_before,
    Bench, Figure, LoopResult,
};
use crate::http::Connections;
use anyhow::{anyhow, Context, Result};
use chrono::Utc;
use messaging::store::Store;
use messaging_domain::{Dispatch, Message, MessageCommand, MessageId};
use std::sync::Arc;
use std::time::Duration;

const SCENARIO: &str = "commands";

pub async fn run(bench: &mut Bench) -> Result<Vec<Figure>> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_events \
         (LIKE events INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING INDEXES)",
    )
    .execute(&bench.pool)
    .await
    .context("creating the scratch table bench_events")?;
    // The reference row carries a real MessageComposed payload, so it is the size of one.
    let (_, command) = compose(&bench.service, Dispatch::Now)?;
    let composed = Message::default()
        .decide(command)
        .map_err(|e| anyhow!("{e}"))?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("compose decided no event"))?;
    let payload = serde_json::to_string(&composed)?;

    let duration = Duration::from_secs_f64(bench.size(0.7, 4.0));
    let settle_cap = Duration::from_secs(bench.size(3, 30));
    let far = || Utc::now() + chrono::Duration::days(365);
    let mut figures = Vec::new();
    let mut peak: f64 = 0.0;
    for clients in bench.clients.clone() {
        let mut compose_rate = 0.0;
        // Through the pool, as an application inserts: sqlx checks a connection with a round
        // trip when it is taken and again when it is given back.
        let backlog = settle_before(&bench.pool, settle_cap).await?;
        eprintln!("bench: commands: reference through the pool, {clients} clients");
        let pool = bench.pool.clone();
        let payload_ = payload.clone();
        let pooled = closed_loop(clients, duration, move || {
            let (pool, payload) = (pool.clone(), payload_.clone());
            async move {
                let mut conn = pool.acquire().await?;
                insert_reference_row(&mut conn, payload).await
            }
        })
        .await;
        figures.push(
            errors_note(
                Figure::info(
                    SCENARIO,
                    format!("reference through the pool: single-row INSERT, {clients} clients"),
                    "rows/s",
                    pooled.rate(),
                ),
                &pooled,
            )
            .after_backlog(&backlog),
        );
        // The reference the service is measured against, before its phases and again after
        // them: the ratios are to the mean of the two (one measure taken before eight phases
        // was up to a minute older than the last of them, and it moves).
        let (before, backlog_before) =
            reference(bench, clients, duration, settle_cap, &payload).await?;
        let reference_name = format!("INSERT 1 event row, {clients} clients");
        let mut measured = Vec::new();

        // Scheduled a year ahead: the pure command cost (the sender has nothing to do).
        for (label, scheduled) in [
            ("scheduled (pure command)", true),
            ("send now (sender running)", false),
        ] {
            let backlog = settle_before(&bench.pool, settle_cap).await?;
            let sent_before = if scheduled {
                0
            } else {
                sent_count(&bench.pool).await?
            };
            eprintln!("bench: commands: in-process, {label}, {clients} clients");
            let (store, service) = (bench.store.clone(), bench.service.clone());
            let in_process = closed_loop(clients, duration, move || {
                let (store, service) = (store.clone(), service.clone());
                async move {
                    let dispatch = if scheduled {
                        Dispatch::At(far())
                    } else {
                        Dispatch::Now
                    };
                    execute_compose(&store, &service, dispatch)
                        .await
                        .map(|_| ())
                }
            })
            .await;
            // "Send now": the target is on the rate until every message is sent (below); the
            // loop's own rate counts the composes alone.
            let mut figure = Figure::versus(
                SCENARIO,
                format!("in-process compose, {label}, {clients} clients"),
                "msg/s",
                in_process.rate(),
                before,
                reference_name.clone(),
                scheduled.then_some(0.5),
            );
            if !scheduled {
                figure = figure.note(
                    "composes only, 2 events each; the sender sends them (sandbox) meanwhile; \
                     the target is on the rate until all are sent",
                );
            }
            if scheduled {
                compose_rate = in_process.rate();
            }
            measured.push(errors_note(figure, &in_process).after_backlog(&backlog));
            if !scheduled {
                let (sent, settled) = until_sent(
                    format!("in-process compose, send now, {clients} clients: until all sent"),
                    &in_process,
                    bench,
                    (settle_cap, sent_before),
                    before,
                )
                .await?;
                // The lag load's peak: what the whole pipeline sustains, not the composes'
                // rate while the sender falls behind (an unsettled run's is only a bound).
                if settled {
                    peak = peak.max(sent.value);
                }
                measured.push(sent.after_backlog(&backlog));
            }

            let backlog = settle_before(&bench.pool, settle_cap).await?;
            let sent_before = if scheduled {
                0
            } else {
                sent_count(&bench.pool).await?
            };
            eprintln!("bench: commands: HTTP, {label}, {clients} clients");
            let (http, service) = (
                Arc::new(Connections::new(&bench.base, &bench.api_key)?),
                bench.service.clone(),
            );
            let over_http = closed_loop(clients, duration, move || {
                let http = http.clone();
                let body = serde_json::to_vec(&compose_body(&service, scheduled.then(far)));
                async move {
                    // Read whole, as a client reads the message it created.
                    let (status, answer) = http.post_json("/v1/messages", body?).await?;
                    if status.as_u16() != 201 {
                        return Err(anyhow!(
                            "POST /v1/messages: {status}: {}",
                            String::from_utf8_lossy(&answer)
                        ));
                    }
                    Ok(())
                }
            })
            .await;
            let mut figure = Figure::versus(
                SCENARIO,
                format!("HTTP compose, {label}, {clients} clients"),
                "msg/s",
                over_http.rate(),
                before,
                reference_name.clone(),
                scheduled.then_some(0.5),
            );
            if !scheduled {
                figure = figure.note(
                    "composes only; the sender sends them (sandbox) meanwhile; the target is \
                     on the rate until all are sent",
                );
            }
            measured.push(errors_note(figure, &over_http).after_backlog(&backlog));
            if !scheduled {
                let (sent, _) = until_sent(
                    format!("HTTP compose, send now, {clients} clients: until all sent"),
                    &over_http,
                    bench,
                    (settle_cap, sent_before),
                    before,
                )
                .await?;
                measured.push(sent.after_backlog(&backlog));
            }
        }
        measured.extend(
            existing_messages(
                bench,
                clients,
                duration,
                compose_rate,
                settle_cap,
                (before, &reference_name),
            )
            .await?,
        );
        let (after, backlog_after) =
            reference(bench, clients, duration, settle_cap, &payload).await?;
        let mean = (before + after) / 2.0;
        // A reference slowed by a backlog flatters every ratio against it.
        let reference_backlog = backlog_before.or(backlog_after);
        let mut reference_figure = Figure::info(
            SCENARIO,
            format!("reference: single-row INSERT, {clients} clients"),
            "rows/s",
            mean,
        )
        .note(format!(
            "each client on a connection of its own; the mean of {before:.0} before the \
             service's phases and {after:.0} after them"
        ));
        if (after - before).abs() > 0.2 * mean {
            reference_figure = reference_figure
                .note("the two differ by more than 20 %: the machine's speed moved during the run");
        }
        figures.push(reference_figure.after_backlog(&reference_backlog));
        figures.extend(measured.into_iter().map(|f| {
            let f = f.rebase(mean);
            match &reference_backlog {
                Some(_) => f
                    .note("NOT against a settled reference: its INSERTs ran on a backlog")
                    .spoil(),
                None => f,
            }
        }));
    }
    // The last phase's work too, before the next scenario (or `scripts/cpu-per-phase`'s last
    // window) begins.
    settle(&bench.pool, settle_cap).await?;
    bench.peak_send_rate = Some(peak);
    Ok(figures)
}

/// The reference's rate: single-row INSERTs, each client on a connection of its own held for
/// the whole run (the INSERT and nothing else). Any failed INSERT fails the run: a reference
/// that counted only its successes would flatter every ratio. Also says what backlog it ran
/// on, if settling gave up before it.
async fn reference(
    bench: &Bench,
    clients: usize,
    duration: Duration,
    settle_cap: Duration,
    payload: &str,
) -> Result<(f64, Option<String>)> {
    let backlog = settle_before(&bench.pool, settle_cap).await?;
    eprintln!("bench: commands: reference, {clients} clients");
    let mut held = Vec::with_capacity(clients);
    for _ in 0..clients {
        held.push(bench.pool.acquire().await?);
    }
    let held = Arc::new(std::sync::Mutex::new(held));
    let (held_, payload_) = (held.clone(), payload.to_string());
    let reference = closed_loop(clients, duration, move || {
        let (held, payload) = (held_.clone(), payload_.clone());
        async move {
            let mut conn = held
                .lock()
                .map_err(|_| anyhow!("a client panicked"))?
                .pop()
                .ok_or_else(|| anyhow!("more clients than connections"))?;
            let result = insert_reference_row(&mut conn, payload).await;
            held.lock()
                .map_err(|_| anyhow!("a client panicked"))?
                .push(conn);
            result
        }
    })
    .await;
    drop(held);
    if reference.errors > 0 {
        return Err(anyhow!(
            "the reference's INSERTs failed {} times (first: {})",
            reference.errors,
            reference.first_error.as_deref().unwrap_or("?")
        ));
    }
    Ok((reference.rate(), backlog))
}

/// A command on a message that exists (every command but Compose: a send, a cancel, a
/// provider's delivery report): the message's events are read, the command decided against
/// them, its events appended. Drafts are written beforehand (not timed), as many as twice the
/// composes the same clients managed, and each is scheduled a year ahead: the command alone,
/// with nothing for the sender to do.
async fn existing_messages(
    bench: &Bench,
    clients: usize,
    duration: Duration,
    compose_rate: f64,
    settle_cap: Duration,
    reference: (f64, &str),
) -> Result<Vec<Figure>> {
    let drafts = (compose_rate * duration.as_secs_f64() * 2.0).ceil() as usize + 1000;
    let far = || Utc::now() + chrono::Duration::days(365);
    let mut figures = Vec::new();
    for over_http in [false, true] {
        // The previous phase's work (its subscriptions) finishes before the drafts are written,
        // so that a phase's CPU can be told from the writing (`scripts/cpu-per-phase`).
        settle(&bench.pool, settle_cap).await?;
        eprintln!("bench: commands: writing {drafts} drafts");
        let ids = insert_messages(&bench.pool, &bench.service, drafts, |_| Dispatch::Draft).await?;
        let backlog = settle_before(&bench.pool, settle_cap).await?;
        let how = if over_http { "HTTP" } else { "in-process" };
        eprintln!("bench: commands: {how}, schedule a draft, {clients} clients ({drafts} drafts)");
        let ids = Arc::new(std::sync::Mutex::new(ids));
        let next = move || -> Result<MessageId> {
            ids.lock()
                .map_err(|_| anyhow!("a client panicked"))?
                .pop()
                .ok_or_else(|| anyhow!("no draft left: the bench wrote too few"))
        };
        let result = if over_http {
            let http = Arc::new(Connections::new(&bench.base, &bench.api_key)?);
            closed_loop(clients, duration, move || {
                let (http, id) = (http.clone(), next());
                async move {
                    let url = format!("/v1/messages/{}/schedule", id?);
                    let body = serde_json::to_vec(&serde_json::json!({ "publish_at": far() }))?;
                    let (status, answer) = http.post_json(&url, body).await?;
                    if status.as_u16() != 200 {
                        return Err(anyhow!(
                            "POST {url}: {status}: {}",
                            String::from_utf8_lossy(&answer)
                        ));
                    }
                    Ok(())
                }
            })
            .await
        } else {
            let store = bench.store.clone();
            closed_loop(clients, duration, move || {
                let (store, id) = (store.clone(), next());
                async move {
                    let command = MessageCommand::Schedule {
                        publish_at: far(),
                        now: Utc::now(),
                    };
                    store
                        .execute(id?, command)
                        .await
                        .map_err(|e| anyhow!("schedule: {e}"))
                }
            })
            .await
        };
        let figure = Figure::versus(
            SCENARIO,
            format!("{how} schedule a draft (read, decide, append), {clients} clients"),
            "msg/s",
            result.rate(),
            reference.0,
            reference.1,
            Some(0.5),
        )
        .note("the path of every command but Compose: the message's events read first");
        figures.push(errors_note(figure, &result).after_backlog(&backlog));
    }
    Ok(figures)
}

/// "Send now" end to end: the loop's messages over its time plus the time until every one was
/// sent and every subscription had read it. The loop's own rate counts composes only: a sender
/// that falls behind during the loop (and sends after it) leaves the composes more of the cores,
/// and one that keeps up takes them; this figure counts both halves of the work.
/// `(cap, sent_before)`: how long to wait for it to settle, and how many `MessageSent` the log
/// held before the loop (a send that failed also closes its job: only a count of the sends
/// says every message was sent).
async fn until_sent(
    name: String,
    result: &LoopResult,
    bench: &Bench,
    (cap, sent_before): (Duration, i64),
    reference_rate: f64,
) -> Result<(Figure, bool)> {
    let (after, events, jobs) = settle(&bench.pool, cap).await?;
    let sent = sent_count(&bench.pool).await? - sent_before;
    let total = result.elapsed + after;
    let mut figure = Figure::versus(
        SCENARIO,
        name,
        "msg/s",
        result.ok as f64 / total.as_secs_f64(),
        reference_rate,
        "INSERT 1 event row, same clients",
        Some(0.5),
    )
    .note(format!(
        "{} composed in {:.1?}; every one sent and projected {:.1?} later (looked at every 50 ms)",
        result.ok, result.elapsed, after
    ));
    if sent < result.ok as i64 {
        figure = figure
            .note(format!(
                "only {sent} of the {} composed were sent (the others failed): not a rate of sends",
                result.ok
            ))
            .spoil();
    }
    let settled = events == 0 && jobs == 0;
    if !settled {
        figure = figure
            .note(format!(
                "NOT settled after {cap:?}: {jobs} send jobs open, {events} (event, subscription) pairs unread; the rate is an upper bound"
            ))
            .spoil();
    }
    Ok((figure, settled))
}

/// Failed calls (a shared server can run out of connections) are not counted, only reported;
/// more than 1 % of them fails the figure's target.
fn errors_note(mut figure: Figure, result: &LoopResult) -> Figure {
    if result.errors > 0 {
        let share = result.errors as f64 / (result.errors + result.ok) as f64;
        figure = figure.note(format!(
            "{} of {} calls failed ({:.1} %); first: {}",
            result.errors,
            result.errors + result.ok,
            share * 100.0,
            result.first_error.as_deref().unwrap_or("?")
        ));
        if share > 0.01 {
            figure = figure.spoil();
        }
    }
    figure
}

/// The reference's row: an event-shaped row with a real `MessageComposed` payload.
async fn insert_reference_row(conn: &mut sqlx::PgConnection, payload: String) -> Result<()> {
    sqlx::query(
        "INSERT INTO bench_events (aggregate_type, aggregate_id, sequence, event_type, \
                                   event_version, payload, metadata) \
         VALUES ('Message', $1, 1, 'MessageComposed', '1', $2::json, '{}'::json)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(payload)
    .execute(conn)
    .await?;
    Ok(())
}

/// How many `MessageSent` the log holds.
async fn sent_count(pool: &sqlx::PgPool) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'MessageSent'")
            .fetch_one(pool)
            .await?,
    )
}
