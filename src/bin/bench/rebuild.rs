//! Scenario `rebuild`: `Subscription::rebuild()` of `message_list` and `state_changes` over the
//! whole log (topped up to N events), against a plain ordered, streamed read of the same rows.
//! Each is rebuilt beside its live table and swapped in at the end (`messaging_projections::shadow`):
//! the figure includes the copy's index builds, its ANALYZE and the swap. The reference is the
//! read as the planner plans it (on a large log a parallel scan and a sort); the rebuild walks
//! the log's index instead, which on its own reads faster (see `Subscription::rebuild`).

use crate::common::{insert_messages, settle, Bench, Figure};
use anyhow::{Context, Result};
use chrono::Utc;
use futures::TryStreamExt;
use messaging_domain::Dispatch;
use messaging_projections::event::EVENT_COLUMNS;
use messaging_projections::{MessageList, StateChangeFeed, StoredEvent, Subscription};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SCENARIO: &str = "rebuild";

pub async fn run(bench: &mut Bench) -> Result<Vec<Figure>> {
    let target: i64 = bench.size(10_000, 100_000);
    let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&bench.pool)
        .await?;
    if existing < target {
        // Compose + schedule a year ahead: two events per message, nothing fires.
        let messages = ((target - existing + 1) / 2) as usize;
        let far = Utc::now() + chrono::Duration::days(365);
        insert_messages(&bench.pool, &bench.service, messages, |_| Dispatch::At(far)).await?;
    }
    settle(&bench.pool, Duration::from_secs(bench.size(60, 300))).await?;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&bench.pool)
        .await?;

    // The plain read twice: as the planner plans it (on a large log a parallel scan and a
    // sort), and walking the log's index as the rebuild does. The faster is the reference.
    // A first read, not counted, leaves both the same cache.
    ordered_read(bench, true).await?;
    let mut figures = Vec::new();
    let mut reference = 0f64;
    for (how, sort) in [("as planned", true), ("through its index", false)] {
        let (read, rate) = ordered_read(bench, sort).await?;
        reference = reference.max(rate);
        figures.push(Figure::info(
            SCENARIO,
            format!("reference: ordered streamed read of {read} events, {how}"),
            "events/s",
            rate,
        ));
    }
    let reference_name = "ordered streamed read of events, the faster of the two";

    let projections: [Arc<dyn messaging_projections::Projection<sqlx::Postgres>>; 2] = [
        Arc::new(MessageList::default()),
        Arc::new(StateChangeFeed::new()),
    ];
    for projection in projections {
        let name = projection.name();
        let by_message = projection.independent_aggregates();
        let started = Instant::now();
        let handled = Subscription::new(bench.pool.clone(), projection)
            .rebuild()
            .await
            .with_context(|| format!("rebuilding {name}"))?;
        let elapsed = started.elapsed();
        // The rate is of what the rebuild says it handled: one that stopped short of the log
        // is an error, not a fast rebuild (its catch-up may add what came after the count).
        if handled < events as u64 {
            anyhow::bail!("rebuilding {name} handled {handled} of the log's {events} events");
        }
        figures.push(
            Figure::versus(
                SCENARIO,
                format!("rebuild {name} over {events} events"),
                "events/s",
                events as f64 / elapsed.as_secs_f64(),
                reference,
                reference_name,
                Some(0.5),
            )
            .note(format!(
                "{elapsed:.2?}; batches of 1000 into a copy beside the live table, {how}, the \
                 copy's other indexes built two at a time and analyzed at the end",
                how = if by_message {
                    "the log read message by message on a connection of its own, two writers"
                } else {
                    "the log read ahead on a connection of its own, each batch folded on a \
                     second one while the one before is written"
                }
            )),
        );
    }
    Ok(figures)
}

/// Streams the whole log in checkpoint order, sorted if `sort` allows the planner to (else
/// through the index); returns how many events and how many a second.
async fn ordered_read(bench: &Bench, sort: bool) -> Result<(u64, f64)> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events \
         ORDER BY events.transaction_id, events.global_position"
    );
    // `SET LOCAL`: the pooled connection goes back as it came, whatever happens.
    let mut tx = bench.pool.begin().await?;
    sqlx::query(if sort {
        "SET LOCAL enable_sort = on"
    } else {
        "SET LOCAL enable_sort = off"
    })
    .execute(&mut *tx)
    .await?;
    let started = Instant::now();
    let read: u64 = sqlx::query_as::<_, StoredEvent>(&sql)
        .fetch(&mut *tx)
        .try_fold(0u64, |n, _| async move { Ok(n + 1) })
        .await
        .context("the ordered read")?;
    let rate = read as f64 / started.elapsed().as_secs_f64();
    tx.rollback().await?;
    Ok((read, rate))
}
