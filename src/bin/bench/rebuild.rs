//! Scenario `rebuild`: `Subscription::rebuild()` of `message_list` and `state_changes` over the
//! whole log (topped up to N events), against a plain ordered, streamed read of the same rows.
//! Each is rebuilt beside its live table and swapped in at the end (`messaging_projections::shadow`):
//! the figure includes the copy's index builds, its ANALYZE and the swap.

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

    let started = Instant::now();
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events \
         ORDER BY events.transaction_id, events.global_position"
    );
    let read: u64 = sqlx::query_as::<_, StoredEvent>(&sql)
        .fetch(&bench.pool)
        .try_fold(0u64, |n, _| async move { Ok(n + 1) })
        .await
        .context("the ordered read")?;
    let reference = read as f64 / started.elapsed().as_secs_f64();
    let reference_name = "ordered streamed read of events";

    let mut figures = vec![Figure::info(
        SCENARIO,
        format!("reference: ordered streamed read of {read} events"),
        "events/s",
        reference,
    )];
    let projections: [Arc<dyn messaging_projections::Projection<sqlx::Postgres>>; 2] = [
        Arc::new(MessageList::default()),
        Arc::new(StateChangeFeed::new()),
    ];
    for projection in projections {
        let name = projection.name();
        let started = Instant::now();
        Subscription::new(bench.pool.clone(), projection)
            .rebuild()
            .await
            .with_context(|| format!("rebuilding {name}"))?;
        let elapsed = started.elapsed();
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
                "{elapsed:.2?}; batches of 1000 into a copy beside the live table, the log read ahead \
                 on a second connection, the copy's indexes built and analyzed at the end"
            )),
        );
    }
    Ok(figures)
}
