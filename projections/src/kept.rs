//! A connection one long-running worker keeps between its statements, outside the pool.
//!
//! sqlx checks a pooled connection with a round trip when it is taken (`test_before_acquire`)
//! and again, unconditionally, when it is given back: two round trips around each use, which
//! a worker running one statement at a time all day (a command writer) pays on every one. A
//! kept connection is checked only when it has been idle for [`CHECK_AFTER`] (as connection
//! pools such as HikariCP do), since the server may have closed it meanwhile, and a statement
//! sent on a dead connection fails; a write sent so has an unknown outcome, where a failed
//! check only costs a new connection. When the connection itself fails (anything but an error
//! the server reports for one statement) the worker [`discard`](KeptConnection::discard)s it:
//! the next use opens a new one.
//!
//! By default ([`KeptConnection::new`]) its statements are planned for their values each time
//! (`plan_cache_mode = force_custom_plan`). A prepared statement's generic plan is made once,
//! at its sixth run, and kept for the session's life unless the table's statistics change;
//! with autovacuum off (as on the machine the benchmarks run on) they never do. Measured with
//! subscription readers on kept connections: the message list's read of a batch's rows kept
//! the plan it got when the table was nearly empty, a sequential scan, and took 1.0–1.5 s a
//! batch once the table had grown (the list fell 14–20 s behind in the bench's `lag` after
//! `commands`; 54–64 ms p50 on pooled connections or with custom plans). Pooled connections are
//! replaced after 30 minutes; a kept one is not. Generic plans with sequential scans disabled
//! (as the writers have, below) are no cure for the readers: made while the list is empty, the
//! same read of a batch's rows was planned as a walk of the whole `(state, message_id)` index
//! (every index looks free on an empty table; a temporary test showed it). Planning every
//! reader statement costs about 0.3 s of PostgreSQL's time in the bench's 4 s of "send now" at
//! 8 clients; the generic plans' gain in the lag scenario (list p99 68, 95 → 53, 58 ms) is not
//! worth plans that depend on when a table was first read.
//!
//! A worker whose every statement is known, and every one of whose reads goes through an
//! index, keeps its plans instead ([`KeptConnection::keeping_plans`]): the command writers,
//! whose INSERT of a group's events was planned afresh for every group (a third of its time on
//! the server, and at one client half of PostgreSQL's planning), and the commit notifier.
//! Sequential scans are disabled there (`enable_seqscan = off`: a scan becomes the planner's
//! last resort, taken only where no index serves, which none of these statements needs): the
//! writers' read of messages' events
//! ([`fold_rows`](crate::event::fold_rows)), planned generically after the
//! log had been vacuumed while empty, was a scan of the whole log for every message (31 ms a
//! call at 200k events, for the connection's life); with scans disabled it is the primary key's
//! lookup however the statistics stand. (Sent unprepared instead, the read cost sqlx a second
//! round trip to describe it at every command: a quarter of the rate of commands on existing
//! messages at one client.) Their plans are forced generic (`plan_cache_mode =
//! force_generic_plan`): left to PostgreSQL's `auto`, the read of messages was planned afresh
//! at every call all the same (its generic plan, costed for arrays of unknown length, looked
//! dearer than the custom ones), 0.14 ms of planning for 0.05 ms of execution, in all 0.9 s of
//! PostgreSQL's time in the bench's 4 s of "schedule a draft" at 8 clients
//! (`pg_stat_statements` with `track_planning`); the generic plan is the same index lookups.

use sqlx::{Connection, PgConnection, PgPool};
use std::time::{Duration, Instant};

/// A kept connection idle for this long is checked (one round trip) before its next use.
pub const CHECK_AFTER: Duration = Duration::from_secs(1);

/// See the module's documentation. Opened with the pool's options (its session settings) when
/// first needed.
pub struct KeptConnection {
    conn: Option<PgConnection>,
    used: Instant,
    /// `force_custom_plan` when true (the default); `force_generic_plan`, with sequential
    /// scans disabled, when false.
    custom_plans: bool,
}

impl Default for KeptConnection {
    fn default() -> Self {
        Self::new()
    }
}

impl KeptConnection {
    /// Every statement planned for its values (see the module's documentation).
    pub fn new() -> Self {
        Self {
            conn: None,
            used: Instant::now(),
            custom_plans: true,
        }
    }

    /// Prepared statements are planned once, generically, and no plan scans a table: only
    /// for workers whose every read has an index to go through (see the module's
    /// documentation).
    pub fn keeping_plans() -> Self {
        Self {
            custom_plans: false,
            ..Self::new()
        }
    }

    /// The connection, checked first if it has been idle, or a new one. The check and the
    /// connect are bounded by the pool's acquire timeout, as a pooled connection's are (a
    /// server that stopped answering would otherwise hold the worker until TCP gives up).
    pub async fn ready(&mut self, pool: &PgPool) -> Result<&mut PgConnection, sqlx::Error> {
        let limit = pool.options().get_acquire_timeout();
        let idle = self.used.elapsed() >= CHECK_AFTER;
        self.used = Instant::now();
        let mut kept = self.conn.take();
        if let (true, Some(conn)) = (idle, kept.as_mut()) {
            if !matches!(tokio::time::timeout(limit, conn.ping()).await, Ok(Ok(()))) {
                kept = None;
            }
        }
        let conn = match kept {
            Some(conn) => conn,
            None => {
                // See the module's documentation.
                let settings: &[(&str, &str)] = if self.custom_plans {
                    &[("plan_cache_mode", "force_custom_plan")]
                } else {
                    &[
                        ("plan_cache_mode", "force_generic_plan"),
                        ("enable_seqscan", "off"),
                    ]
                };
                let options = pool
                    .connect_options()
                    .as_ref()
                    .clone()
                    .options(settings.iter().copied());
                tokio::time::timeout(limit, PgConnection::connect_with(&options))
                    .await
                    .map_err(|_| sqlx::Error::PoolTimedOut)??
            }
        };
        Ok(self.conn.insert(conn))
    }

    /// Forgets the connection (closing its socket): after a failure it may be broken, or in
    /// the middle of something.
    pub fn discard(&mut self) {
        self.conn = None;
    }

    /// Ends the session politely, when the worker stops.
    pub async fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
    }
}
