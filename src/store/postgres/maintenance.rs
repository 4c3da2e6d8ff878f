//! Vacuuming the work queues. `send_jobs` and `scheduled_sends` churn: every row is inserted,
//! leased (updated) and deleted within seconds or minutes, each step leaving a dead row
//! version behind. Clearing them is autovacuum's job, but its rounds come a minute apart at
//! best (and never where it is turned off, as on this project's test machines), while a busy
//! sender leaves hundreds of thousands in a minute; every claim then steps over them in the
//! indexes (12 ms a claim instead of under 1 ms, measured in the bench's full run, where
//! `send_jobs` held 371k dead versions for one live row). So the service vacuums them itself,
//! with ANALYZE (the planner otherwise has no statistics for a table that went from empty to
//! 100k rows), once enough are dead. The webhook inbox too: its facts stay (the history of
//! what providers said) but each is updated twice on its way (leased, settled), and without
//! statistics PostgreSQL plans the applier's lease as a read and sort of every pending fact
//! instead of a walk of the oldest through their index.

use sqlx::PgPool;
use std::time::Duration;
use tokio::sync::watch;

/// A table watched, with its vacuum (a statement without parameters: VACUUM cannot run in a
/// transaction block, so it goes by the simple protocol, its table named in it).
type Watched = (&'static str, &'static str);

/// The work queues: small tables, vacuumed in a fraction of a second.
const QUEUES: &[Watched] = &[
    ("send_jobs", "VACUUM (ANALYZE) send_jobs"),
    ("scheduled_sends", "VACUUM (ANALYZE) scheduled_sends"),
];

/// The webhook inbox, watched on a loop of its own: it keeps every fact, so its vacuum can
/// take long, and the queues' must not wait for it.
const INBOX: &[Watched] = &[("webhook_inbox", "VACUUM (ANALYZE) webhook_inbox")];

/// Dead row versions, more than the last vacuum left, above which a table is vacuumed, when
/// they also outnumber half the live rows (a big backlog is not vacuumed again for each few
/// thousand sends).
const DEAD: i64 = 20_000;

/// How often the counts are read (PostgreSQL's statistics, no table is scanned).
const EVERY: Duration = Duration::from_secs(2);

/// The upkeep's memory between rounds: the dead row versions each table still had right after
/// its last vacuum. Versions an older transaction can still see (a rebuild streaming the log,
/// a session idle in a transaction) survive a VACUUM; without this, every round would vacuum
/// the table again for nothing while they last.
pub struct QueueUpkeep {
    tables: &'static [Watched],
    left_after_vacuum: std::collections::HashMap<&'static str, i64>,
}

impl QueueUpkeep {
    fn of(tables: &'static [Watched]) -> Self {
        Self {
            tables,
            left_after_vacuum: Default::default(),
        }
    }

    /// The work queues' upkeep.
    pub fn queues() -> Self {
        Self::of(QUEUES)
    }

    /// The webhook inbox's upkeep.
    pub fn inbox() -> Self {
        Self::of(INBOX)
    }

    /// Vacuums (and analyzes) each of its tables whose dead row versions grew past the threshold
    /// since its last vacuum; returns the tables vacuumed. One instance at a time per table:
    /// an advisory lock taken without waiting (a VACUUM of a table would wait for another's
    /// to end). A table that fails is logged and the next one still looked at.
    pub async fn round(&mut self, pool: &PgPool) -> Vec<&'static str> {
        let mut vacuumed = Vec::new();
        for &(table, vacuum) in self.tables {
            match self.table(pool, table, vacuum).await {
                Ok(true) => vacuumed.push(table),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(table, %error, "vacuuming a work queue failed; trying again later")
                }
            }
        }
        vacuumed
    }

    async fn table(
        &mut self,
        pool: &PgPool,
        table: &'static str,
        vacuum: &'static str,
    ) -> Result<bool, sqlx::Error> {
        let Some((live, dead)) = counts(pool, table).await? else {
            return Ok(false);
        };
        let left = self.left_after_vacuum.get(table).copied().unwrap_or(0);
        if dead - left < DEAD || dead < live / 2 {
            return Ok(false);
        }
        let mut conn = pool.acquire().await?;
        let key = format!("messaging vacuum {table}");
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(&key)
            .fetch_one(&mut *conn)
            .await?;
        if !locked {
            return Ok(false);
        }
        let vacuumed = sqlx::Executor::execute(&mut *conn, vacuum).await;
        sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
            .bind(&key)
            .execute(&mut *conn)
            .await?;
        vacuumed?;
        // VACUUM reports what it could not remove when it ends.
        let left = counts(pool, table).await?.map_or(0, |(_, dead)| dead);
        self.left_after_vacuum.insert(table, left);
        tracing::info!(table, dead, live, left, "vacuumed a table");
        Ok(true)
    }
}

/// A table's live and dead row versions, from the server's statistics.
async fn counts(pool: &PgPool, table: &str) -> Result<Option<(i64, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables WHERE relid = to_regclass($1)",
    )
    .bind(table)
    .fetch_optional(pool)
    .await
}

/// Runs the queues' and the inbox's upkeep, each a round every few seconds, until `shutdown`.
pub async fn run(pool: PgPool, shutdown: watch::Receiver<bool>) {
    tokio::join!(
        rounds(&pool, QueueUpkeep::queues(), shutdown.clone()),
        rounds(&pool, QueueUpkeep::inbox(), shutdown)
    );
}

async fn rounds(pool: &PgPool, mut upkeep: QueueUpkeep, mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        upkeep.round(pool).await;
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.changed() => {}
        }
    }
}
