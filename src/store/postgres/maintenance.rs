//! Vacuuming the work queues. `send_jobs` and `scheduled_sends` churn: every row is inserted,
//! leased (updated) and deleted within seconds or minutes, each step leaving a dead row
//! version behind. Clearing them is autovacuum's job, but its rounds come a minute apart at
//! best (and never where it is turned off, as on this project's test machines), while a busy
//! sender leaves hundreds of thousands in a minute; every claim then steps over them in the
//! indexes (12 ms a claim instead of under 1 ms, measured in the bench's full run, where
//! `send_jobs` held 371k dead versions for one live row). So the service vacuums them itself,
//! with ANALYZE (the planner otherwise has no statistics for a table that went from empty to
//! 100k rows), once enough are dead.

use sqlx::PgPool;
use std::time::Duration;
use tokio::sync::watch;

/// The tables watched.
const QUEUES: [&str; 2] = ["send_jobs", "scheduled_sends"];

/// Dead row versions above which a table is vacuumed, when they also outnumber half the live
/// rows (a big backlog is not vacuumed again for each few thousand sends).
const DEAD: i64 = 20_000;

/// How often the counts are read (PostgreSQL's statistics, no table is scanned).
const EVERY: Duration = Duration::from_secs(2);

/// Vacuums (and analyzes) each queue whose dead row versions passed the threshold; returns the
/// tables vacuumed. One instance at a time per table: an advisory lock taken without waiting
/// (a VACUUM of a table would wait for another's to end).
pub async fn vacuum_queues(pool: &PgPool) -> Result<Vec<&'static str>, sqlx::Error> {
    let mut vacuumed = Vec::new();
    for table in QUEUES {
        let counts: Option<(i64, i64)> = sqlx::query_as(
            "SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables \
             WHERE relid = to_regclass($1)",
        )
        .bind(table)
        .fetch_optional(pool)
        .await?;
        let Some((live, dead)) = counts else {
            continue;
        };
        if dead < DEAD || dead < live / 2 {
            continue;
        }
        let mut conn = pool.acquire().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(format!("messaging vacuum {table}"))
            .fetch_one(&mut *conn)
            .await?;
        if !locked {
            continue;
        }
        // Not in a transaction block: one statement without parameters (the simple protocol).
        let statement = match table {
            "send_jobs" => "VACUUM (ANALYZE) send_jobs",
            _ => "VACUUM (ANALYZE) scheduled_sends",
        };
        let vacuum = sqlx::Executor::execute(&mut *conn, statement).await;
        sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
            .bind(format!("messaging vacuum {table}"))
            .execute(&mut *conn)
            .await?;
        vacuum?;
        tracing::info!(table, dead, live, "vacuumed a work queue");
        vacuumed.push(table);
    }
    Ok(vacuumed)
}

/// Runs [`vacuum_queues`] every few seconds until `shutdown`.
pub async fn run(pool: PgPool, mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        if let Err(error) = vacuum_queues(&pool).await {
            tracing::warn!(%error, "vacuuming the work queues failed; trying again later");
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.changed() => {}
        }
    }
}
