//! A rebuild beside the live read model, on PostgreSQL.
//!
//! A projection that names its tables ([`Projection::tables`](crate::Projection::tables)) is
//! rebuilt into copies of them in a schema of its own (`rebuild_<name>`), while the live tables
//! stay whole and readable: stale, since the rebuild holds the subscription's lock and they stop
//! moving until it ends, but never empty or half-built. The copies start with the live tables'
//! columns, defaults and checks, and their unique indexes (those of primary keys, unique and
//! exclusion constraints among them), which the projection's writes rely on (a row found by
//! its key, a duplicate refused, an `ON CONFLICT` target); every other index and any foreign
//! key is made once the copies are full (one sort each instead of an index insertion per row),
//! then the copies are analyzed. One transaction then checks that the live tables have not
//! changed shape since the copies were made (a migration run meanwhile would otherwise be
//! undone), gives the copies the live tables' grants as they are then, drops the live tables,
//! moves the copies into their schema (each index and constraint keeps its name), sets the
//! checkpoint where the rebuild's read ended and NOTIFYs the projection's channel
//! ([`Projection::channel`](crate::Projection::channel)), if it has one. A rebuild that stops
//! before that leaves the live tables and their checkpoint as they were; one that fails drops
//! its copies, and one that was killed leaves them to the next rebuild of the same projection,
//! which drops them first.
//!
//! The rebuild's writer reaches the copies by their names through its `search_path` (their
//! schema first), so a projection's SQL is the same whether it writes the live tables or the
//! copies. Other sessions' prepared statements are analyzed again on their next use, against
//! the tables the names then resolve to: PostgreSQL re-analyzes a cached statement whose tables
//! changed. A table with what a copy would not carry over, or what would keep it from being
//! dropped (triggers, row security or policies, extended statistics, a sequence it owns, column
//! grants, views or foreign keys on it from elsewhere, a publication, no write-ahead log, an
//! owner other than the rebuilding role), is refused before anything is made; the rebuild's
//! role must also be allowed to create schemas.

use crate::subscription::ProjectionError;
use sqlx::postgres::types::Oid;
use sqlx::{Connection, PgConnection};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// One live table and its copy.
struct Table {
    /// `pg_class` oid of the live table.
    oid: Oid,
    /// Its schema, quoted.
    schema: String,
    /// Schema-qualified and quoted, as `pg_get_indexdef` writes it: `public.message_list`.
    live: String,
    /// The copy, schema-qualified and quoted.
    copy: String,
    /// The live table's shape when the copy was made ([`SHAPE`]).
    shape: String,
    /// What the copy gets once it is full: the live table's other indexes, as statements on
    /// the copy (read with the copy, under the original `search_path`).
    at_the_end: Vec<String>,
    /// Then its foreign keys, likewise.
    keys_at_the_end: Vec<String>,
}

/// Copies of a read model's tables being filled by a rebuild.
pub(crate) struct Shadow {
    /// The copies' schema, quoted.
    schema: String,
    tables: Vec<Table>,
    /// The connection's `search_path` before the copies' schema was put first: catalog text
    /// (`pg_get_constraintdef`, `format_type`) qualifies a name the path shadows, so the live
    /// tables' shape and definitions are read under this one.
    search_path: String,
}

/// Runs `statements` from `next` on (shared with other connections running it too), until
/// none is left.
async fn build(
    conn: &mut PgConnection,
    statements: &[&str],
    next: &AtomicUsize,
) -> Result<(), sqlx::Error> {
    while let Some(statement) = statements.get(next.fetch_add(1, Ordering::Relaxed)) {
        sqlx::query(statement).execute(&mut *conn).await?;
    }
    Ok(())
}

/// A name quoted as an SQL identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What a copy would not carry over, named for an error; an empty array when there is none.
const UNCARRIED: &str = "\
    SELECT array_remove(ARRAY[ \
      CASE WHEN EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = c.oid AND NOT tgisinternal) \
           THEN 'triggers' END, \
      CASE WHEN c.relrowsecurity THEN 'row security' END, \
      CASE WHEN EXISTS (SELECT 1 FROM pg_statistic_ext WHERE stxrelid = c.oid) \
           THEN 'extended statistics' END, \
      CASE WHEN EXISTS (SELECT 1 FROM pg_depend d JOIN pg_class s ON s.oid = d.objid \
                        WHERE d.refobjid = c.oid AND d.refclassid = 'pg_class'::regclass \
                          AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') \
                          AND s.relkind = 'S') \
           THEN 'a sequence it owns (a serial or identity column)' END, \
      CASE WHEN EXISTS (SELECT 1 FROM pg_depend d \
                        WHERE d.refobjid = c.oid AND d.refclassid = 'pg_class'::regclass \
                          AND d.classid = 'pg_rewrite'::regclass) \
           THEN 'views or rules on it' END, \
      CASE WHEN EXISTS (SELECT 1 FROM pg_constraint f \
                        WHERE f.confrelid = c.oid AND f.conrelid <> c.oid) \
           THEN 'foreign keys from other tables' END, \
      CASE WHEN EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = c.oid) THEN 'policies' END, \
      CASE WHEN EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = c.oid AND attacl IS NOT NULL) \
           THEN 'column grants' END, \
      CASE WHEN EXISTS (SELECT 1 FROM pg_publication_rel WHERE prrelid = c.oid) \
           THEN 'a publication' END, \
      CASE WHEN c.relpersistence <> 'p' THEN 'no write-ahead log (unlogged)' END, \
      CASE WHEN c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user) \
           THEN 'another owner than the role rebuilding it' END \
    ], NULL)::text[] FROM pg_class c WHERE c.oid = $1";

/// A table's shape, as text: its columns (type, NOT NULL, default), constraints and indexes.
/// Compared before the swap: a migration that altered the live table while its copy was
/// filled would be undone by the swap.
const SHAPE: &str = "\
    SELECT coalesce(string_agg(line, E'\\n' ORDER BY line), '') FROM ( \
      SELECT format('column %s %s %s %s %s %s %s %s %s', a.attnum, a.attname, \
                    format_type(a.atttypid, a.atttypmod), a.attcollation, a.attnotnull, \
                    a.attidentity, a.attgenerated, a.attacl, \
                    pg_get_expr(d.adbin, d.adrelid)) AS line \
      FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
      WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
      UNION ALL \
      SELECT format('table %s %s %s', relpersistence, reloptions, relreplident) \
      FROM pg_class WHERE oid = $1 \
      UNION ALL \
      SELECT format('constraint %s %s', conname, pg_get_constraintdef(oid)) \
      FROM pg_constraint WHERE conrelid = $1 \
      UNION ALL \
      SELECT 'index ' || pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = $1 \
    ) shape";

/// The live table's indexes that no constraint owns, unique ones (`true`) or the others.
const LOOSE_INDEXES: &str = "\
    SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i \
    WHERE i.indrelid = $1 AND (i.indisunique OR i.indisexclusion) = $2 \
      AND NOT EXISTS (SELECT 1 FROM pg_constraint c \
                      WHERE c.conrelid = i.indrelid AND c.conindid = i.indexrelid \
                        AND c.contype IN ('p', 'u', 'x')) \
    ORDER BY i.indexrelid";

/// The live table's grants to others than its owner, as statements on `$2` (the copy).
const GRANTS: &str = "\
    SELECT format('GRANT %s ON %s TO %s%s', g.privilege_type, $2::text, \
                  CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END, \
                  CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END) \
    FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) g \
    LEFT JOIN pg_roles r ON r.oid = g.grantee \
    WHERE c.oid = $1 AND g.grantee <> c.relowner";

impl Shadow {
    /// Creates empty copies of `tables` in `rebuild_<name>` (dropping what an earlier rebuild
    /// left there) and points the connection's `search_path` at them. The caller holds the
    /// subscription's lock, so no other rebuild of it is using that schema.
    pub(crate) async fn create(
        conn: &mut PgConnection,
        name: &str,
        tables: &[&str],
    ) -> Result<Self, ProjectionError> {
        let schema = quoted(&format!("rebuild_{name}"));
        let mut tx = conn.begin().await?;
        let search_path: String = sqlx::query_scalar("SELECT current_setting('search_path')")
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut *tx)
            .await?;
        let mut copies = Vec::with_capacity(tables.len());
        for table in tables {
            let found: Option<(Oid, String, String, String)> = sqlx::query_as(
                "SELECT c.oid, quote_ident(n.nspname), \
                        quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
                        quote_ident(c.relname) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid = to_regclass($1)",
            )
            .bind(quoted(table))
            .fetch_optional(&mut *tx)
            .await?;
            let Some((oid, table_schema, live, relname)) = found else {
                return Err(ProjectionError::Other(format!(
                    "cannot rebuild `{name}` beside its tables: no table `{table}` (run `messaging migrate`)"
                )));
            };
            // Held until the copy is made: no migration changes the table between the reads
            // of its shape and definitions and the copy (readers are not held back).
            sqlx::query(&format!("LOCK TABLE {live} IN SHARE MODE"))
                .execute(&mut *tx)
                .await?;
            let uncarried: Vec<String> = sqlx::query_scalar(UNCARRIED)
                .bind(oid)
                .fetch_one(&mut *tx)
                .await?;
            if !uncarried.is_empty() {
                return Err(ProjectionError::Other(format!(
                    "cannot rebuild `{name}` beside its tables: `{table}` has {}, which a copy \
                     would not carry over",
                    uncarried.join(", ")
                )));
            }
            let shape: String = sqlx::query_scalar(SHAPE)
                .bind(oid)
                .fetch_one(&mut *tx)
                .await?;
            let copy = format!("{schema}.{relname}");
            // Columns, defaults, NOT NULL and CHECK constraints, storage and comments; then the
            // unique indexes, those of constraints first; the others at the end.
            sqlx::query(&format!(
                "CREATE TABLE {copy} (LIKE {live} INCLUDING ALL EXCLUDING INDEXES)"
            ))
            .execute(&mut *tx)
            .await?;
            for (constraint, definition) in constraints(&mut tx, oid, "'p', 'u', 'x'").await? {
                sqlx::query(&format!(
                    "ALTER TABLE {copy} ADD CONSTRAINT {} {definition}",
                    quoted(&constraint)
                ))
                .execute(&mut *tx)
                .await?;
            }
            let mut table = Table {
                oid,
                schema: table_schema,
                live,
                copy,
                shape,
                at_the_end: Vec::new(),
                keys_at_the_end: Vec::new(),
            };
            for index in table.indexes_on_copy(&mut tx, true).await? {
                sqlx::query(&index).execute(&mut *tx).await?;
            }
            table.at_the_end = table.indexes_on_copy(&mut tx, false).await?;
            for (constraint, definition) in constraints(&mut tx, oid, "'f'").await? {
                table.keys_at_the_end.push(format!(
                    "ALTER TABLE {} ADD CONSTRAINT {} {definition}",
                    table.copy,
                    quoted(&constraint)
                ));
            }
            copies.push(table);
        }
        // The copies' schema first: the projection's unqualified names reach them, and
        // everything else (the log, the checkpoints) is found where it was.
        sqlx::query(
            "SELECT set_config('search_path', $1 || ', ' || current_setting('search_path'), false)",
        )
        .bind(&schema)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Self {
            schema,
            tables: copies,
            search_path,
        })
    }

    /// Points another connection's `search_path` at the copies, as [`Self::create`] did the
    /// rebuild's writer's.
    pub(crate) async fn enter(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("SELECT set_config('search_path', $1 || ', ' || $2, false)")
            .bind(&self.schema)
            .bind(&self.search_path)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// Builds the copies' other indexes (shared with `helper`, when there is one, two at a
    /// time) and then their foreign keys, analyzes them, and in one transaction puts them in the live
    /// tables' place, the checkpoint of the subscription `name` at `(transaction_id,
    /// global_position)` with `handled` events, and a NOTIFY on `channel` (if any: the copies
    /// were written without one).
    pub(crate) async fn swap(
        &self,
        conn: &mut PgConnection,
        helper: Option<&mut PgConnection>,
        (name, channel): (&str, Option<&str>),
        checkpoint: (String, i64),
        handled: u64,
    ) -> Result<(), ProjectionError> {
        let statements: Vec<&str> = self
            .tables
            .iter()
            .flat_map(|t| t.at_the_end.iter().map(String::as_str))
            .collect();
        let next = AtomicUsize::new(0);
        match helper {
            // Each index is its own sort of the full copy: on two connections two run at once.
            Some(helper) => {
                tokio::try_join!(
                    build(&mut *conn, &statements, &next),
                    build(helper, &statements, &next)
                )?;
            }
            None => build(&mut *conn, &statements, &next).await?,
        }
        // Foreign keys one at a time, once every index is there: each locks the tables on
        // both of its sides, and two side by side could deadlock.
        for table in &self.tables {
            for statement in &table.keys_at_the_end {
                sqlx::query(statement).execute(&mut *conn).await?;
            }
        }
        for table in &self.tables {
            sqlx::query(&format!("ANALYZE {}", table.copy))
                .execute(&mut *conn)
                .await?;
        }
        // The live tables' lock is asked for with a short timeout, and asked again after a
        // pause: a request that waits queues every new reader of those tables behind it, so a
        // reader that holds them long (a transaction left open) must not stall the rest. After
        // a while each try waits longer than PostgreSQL's `deadlock_timeout` (1 s by default),
        // past which an autovacuum of the table that held it back cancels itself.
        let started = Instant::now();
        loop {
            let wait = if started.elapsed() < PATIENT_AFTER {
                SWAP_LOCK_WAIT
            } else {
                SWAP_LOCK_WAIT_PATIENT
            };
            let mut tx = conn.begin().await?;
            match self
                .replace(&mut tx, (name, channel), &checkpoint, handled, wait)
                .await
            {
                Ok(()) => {
                    tx.commit().await?;
                    break;
                }
                Err(Refused::Lock) if started.elapsed() < SWAP_WITHIN => {
                    tx.rollback().await?;
                    tokio::time::sleep(SWAP_PAUSE).await;
                }
                Err(refused) => {
                    tx.rollback().await?;
                    return Err(match refused {
                        Refused::Lock => ProjectionError::Other(format!(
                            "the rebuilt `{name}` could not take the live tables' place: other \
                             sessions held them for {SWAP_WITHIN:?} (a transaction left open?); \
                             the live tables are as they were, rebuild again"
                        )),
                        Refused::Changed(table) => ProjectionError::Other(format!(
                            "the live table {table} changed while `{name}` was rebuilt (a \
                             migration?): it is left as it is, rebuild again"
                        )),
                        Refused::Sql(e) => e.into(),
                    });
                }
            }
        }
        sqlx::query("RESET search_path").execute(&mut *conn).await?;
        Ok(())
    }

    /// Drops the copies (after a failed rebuild), and gives the connection its own
    /// `search_path` back. Best effort: the next rebuild drops what is left.
    pub(crate) async fn discard(&self, conn: &mut PgConnection) {
        let dropped = sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .execute(&mut *conn)
            .await;
        if let Err(e) = dropped {
            tracing::warn!(schema = %self.schema, error = %e, "a failed rebuild's copies are left for the next rebuild");
        }
        let _ = sqlx::query("RESET search_path").execute(&mut *conn).await;
    }

    /// In the caller's transaction: the copies locked, then the live tables (waiting at most
    /// `wait`), their shapes checked, the live tables dropped, the copies moved into their
    /// schema, the checkpoint set, the channel NOTIFYed.
    async fn replace(
        &self,
        tx: &mut PgConnection,
        (name, channel): (&str, Option<&str>),
        checkpoint: &(String, i64),
        handled: u64,
        wait: Duration,
    ) -> Result<(), Refused> {
        // Catalog text is read as it was when the copies were made (see `search_path`); the
        // statements below name every table they touch by its schema.
        sqlx::query("SELECT set_config('search_path', $1, true)")
            .bind(&self.search_path)
            .execute(&mut *tx)
            .await?;
        // The service does not read the copies; an autovacuum that holds one gives way once
        // the request has waited past `deadlock_timeout`, and anything else (a dump, a session
        // left open) makes this try give up after a while, as for the live tables.
        self.lock(tx, |t| &t.copy, COPY_LOCK_WAIT).await?;
        self.lock(tx, |t| &t.live, wait).await?;
        for table in &self.tables {
            let shape: String = sqlx::query_scalar(SHAPE)
                .bind(table.oid)
                .fetch_one(&mut *tx)
                .await?;
            if shape != table.shape {
                return Err(Refused::Changed(table.live.clone()));
            }
            // The grants as they are now (a GRANT or REVOKE while the copy was filled included).
            let grants: Vec<String> = sqlx::query_scalar(GRANTS)
                .bind(table.oid)
                .bind(&table.copy)
                .fetch_all(&mut *tx)
                .await?;
            for grant in grants {
                sqlx::query(&grant).execute(&mut *tx).await?;
            }
        }
        for table in &self.tables {
            sqlx::query(&format!("DROP TABLE {}", table.live))
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!(
                "ALTER TABLE {} SET SCHEMA {}",
                table.copy, table.schema
            ))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(&format!("DROP SCHEMA {}", self.schema))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE subscription_checkpoints SET last_transaction_id = $2::xid8, \
             last_global_position = $3, events_handled = $4, updated_at = now() WHERE name = $1",
        )
        .bind(name)
        .bind(&checkpoint.0)
        .bind(checkpoint.1)
        .bind(i64::try_from(handled).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        // Delivered at the commit, with the tables: a long-poll woken by it reads the new ones.
        if let Some(channel) = channel {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(channel)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }
    /// Locks the tables `table` names (the copies or the live ones) for the rest of the
    /// transaction, waiting at most `wait`.
    async fn lock(
        &self,
        tx: &mut PgConnection,
        table: fn(&Table) -> &str,
        wait: Duration,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!("SET LOCAL lock_timeout = {}", wait.as_millis()))
            .execute(&mut *tx)
            .await?;
        let names: Vec<&str> = self.tables.iter().map(table).collect();
        sqlx::query(&format!(
            "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            names.join(", ")
        ))
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

impl Table {
    /// The live table's indexes that no constraint owns, the unique ones (`unique`) or the
    /// others, as statements that make them on the copy.
    async fn indexes_on_copy(
        &self,
        conn: &mut PgConnection,
        unique: bool,
    ) -> Result<Vec<String>, ProjectionError> {
        let definitions: Vec<String> = sqlx::query_scalar(LOOSE_INDEXES)
            .bind(self.oid)
            .bind(unique)
            .fetch_all(&mut *conn)
            .await?;
        definitions
            .iter()
            .map(|definition| index_on_copy(definition, self))
            .collect()
    }
}

/// Why a try of the swap did not go through.
enum Refused {
    /// A live table's lock was not had in time.
    Lock,
    /// This live table's shape changed since its copy was made.
    Changed(String),
    Sql(sqlx::Error),
}

impl From<sqlx::Error> for Refused {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db)
                if matches!(
                    db.code().as_deref(),
                    Some(LOCK_NOT_AVAILABLE | DEADLOCK_DETECTED)
                ) =>
            {
                Self::Lock
            }
            _ => Self::Sql(e),
        }
    }
}

/// SQLSTATE `lock_not_available`: `lock_timeout` ran out.
const LOCK_NOT_AVAILABLE: &str = "55P03";
/// SQLSTATE `deadlock_detected`: a reader took the tables in another order; it or the swap
/// was cancelled. Either way, try again.
const DEADLOCK_DETECTED: &str = "40P01";
/// How long one try waits for the copies' lock.
const COPY_LOCK_WAIT: Duration = Duration::from_secs(5);
/// How long one try of the swap waits for the live tables' lock (readers arriving meanwhile
/// wait behind it); after [`PATIENT_AFTER`] of refused tries, how long each waits then; the
/// pause between tries; and how long it keeps trying: over twice the service's
/// `idle_in_transaction_session_timeout` (60 s), which ends a transaction left open.
const SWAP_LOCK_WAIT: Duration = Duration::from_millis(200);
const SWAP_LOCK_WAIT_PATIENT: Duration = Duration::from_millis(1500);
const PATIENT_AFTER: Duration = Duration::from_secs(10);
const SWAP_PAUSE: Duration = Duration::from_millis(300);
const SWAP_WITHIN: Duration = Duration::from_secs(150);

/// The live table's constraints of the given types (`contype` values, quoted), by name.
async fn constraints(
    conn: &mut PgConnection,
    table: Oid,
    types: &str,
) -> Result<Vec<(String, String)>, ProjectionError> {
    Ok(sqlx::query_as(&format!(
        "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint \
         WHERE conrelid = $1 AND contype IN ({types}) ORDER BY conname"
    ))
    .bind(table)
    .fetch_all(conn)
    .await?)
}

/// `CREATE INDEX name ON public.t USING ...` as the same index on the copy (same name, in the
/// copy's schema).
fn index_on_copy(definition: &str, table: &Table) -> Result<String, ProjectionError> {
    let on = format!(" ON {} USING ", table.live);
    match definition.split_once(&on) {
        Some((head, tail)) => Ok(format!("{head} ON {} USING {tail}", table.copy)),
        None => Err(ProjectionError::Other(format!(
            "cannot copy the index `{definition}`: it does not read `... ON {} USING ...`",
            table.live
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_is_made_again_on_the_copy_under_its_own_name() {
        let table = Table {
            oid: Oid(1),
            schema: "public".into(),
            live: "public.message_list".into(),
            copy: "\"rebuild_message_list\".message_list".into(),
            shape: String::new(),
            at_the_end: Vec::new(),
            keys_at_the_end: Vec::new(),
        };
        assert_eq!(
            index_on_copy(
                "CREATE INDEX message_list_provider_id ON public.message_list USING btree \
                 (provider_message_id) WHERE (provider_message_id IS NOT NULL)",
                &table
            )
            .unwrap(),
            "CREATE INDEX message_list_provider_id ON \"rebuild_message_list\".message_list \
             USING btree (provider_message_id) WHERE (provider_message_id IS NOT NULL)"
        );
        assert!(index_on_copy(
            "CREATE INDEX x ON public.state_changes USING btree (position)",
            &table
        )
        .is_err());
    }

    #[test]
    fn names_are_quoted_as_identifiers() {
        assert_eq!(quoted("rebuild_message_list"), "\"rebuild_message_list\"");
        assert_eq!(quoted("a\"b"), "\"a\"\"b\"");
    }
}
