//! A rebuild beside the live read model, on PostgreSQL.
//!
//! A projection that names its tables ([`Projection::tables`](crate::Projection::tables)) is
//! rebuilt into copies of them in a schema of its own (`rebuild_<name>`), while the live tables
//! stay whole and readable: stale, since the rebuild holds the subscription's lock and they stop
//! moving until it ends, but never empty or half-built. The copies start with the live tables'
//! columns, defaults and checks, and the constraints that own an index (primary key, unique,
//! exclusion), which the projection's writes rely on (a row found by its key, a duplicate
//! refused); every other index is built once the copies are full (one sort each instead of an
//! index insertion per row), then the copies are analyzed. One transaction then drops the live
//! tables, moves the copies into their schema (each index and constraint keeps its name) and
//! sets the checkpoint where the rebuild's read ended. A rebuild that stops before that leaves
//! the live tables and their checkpoint as they were; the next rebuild of the same projection
//! drops what it left.
//!
//! The rebuild's writer reaches the copies by their names through its `search_path` (their
//! schema first), so a projection's SQL is the same whether it writes the live tables or the
//! copies. Other sessions' prepared statements are analyzed again on their next use, against
//! the tables the names then resolve to: PostgreSQL re-analyzes a cached statement whose tables
//! changed. Grants on the live tables are not carried over (this service's migrations make
//! none).

use crate::subscription::ProjectionError;
use sqlx::{Connection, PgConnection};

/// One live table and its copy.
struct Table {
    /// `pg_class` oid of the live table.
    oid: sqlx::postgres::types::Oid,
    /// Its schema, quoted.
    schema: String,
    /// Schema-qualified and quoted, as `pg_get_indexdef` writes it: `public.message_list`.
    live: String,
    /// The copy, schema-qualified and quoted.
    copy: String,
}

/// Copies of a read model's tables being filled by a rebuild.
pub(crate) struct Shadow {
    /// The copies' schema, quoted.
    schema: String,
    tables: Vec<Table>,
}

/// A name quoted as an SQL identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

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
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut *tx)
            .await?;
        let mut copies = Vec::with_capacity(tables.len());
        for table in tables {
            let found: Option<(sqlx::postgres::types::Oid, String, String, String)> =
                sqlx::query_as(
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
            let copy = format!("{schema}.{relname}");
            // Columns, defaults, NOT NULL and CHECK constraints, storage and comments; the
            // indexes come below, those of constraints now and the others at the end.
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
            copies.push(Table {
                oid,
                schema: table_schema,
                live,
                copy,
            });
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
        })
    }

    /// Builds the copies' other indexes and foreign keys, analyzes them, and in one transaction
    /// puts them in the live tables' place and the checkpoint at `(transaction_id,
    /// global_position)` with `handled` events.
    pub(crate) async fn swap(
        self,
        conn: &mut PgConnection,
        name: &str,
        checkpoint: (String, i64),
        handled: u64,
    ) -> Result<(), ProjectionError> {
        for table in &self.tables {
            let definitions: Vec<String> = sqlx::query_scalar(
                "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i \
                 WHERE i.indrelid = $1 AND NOT EXISTS ( \
                   SELECT 1 FROM pg_constraint c \
                   WHERE c.conrelid = i.indrelid AND c.conindid = i.indexrelid) \
                 ORDER BY i.indexrelid",
            )
            .bind(table.oid)
            .fetch_all(&mut *conn)
            .await?;
            for definition in definitions {
                sqlx::query(&index_on_copy(&definition, table)?)
                    .execute(&mut *conn)
                    .await?;
            }
            for (constraint, definition) in constraints(&mut *conn, table.oid, "'f'").await? {
                sqlx::query(&format!(
                    "ALTER TABLE {} ADD CONSTRAINT {} {definition}",
                    table.copy,
                    quoted(&constraint)
                ))
                .execute(&mut *conn)
                .await?;
            }
            sqlx::query(&format!("ANALYZE {}", table.copy))
                .execute(&mut *conn)
                .await?;
        }
        // The live tables' lock is asked for with a short timeout and asked again after a
        // pause: a request that waits queues every new reader of those tables behind it, so a
        // reader that holds them long (a transaction left open) must not stall the rest.
        let deadline = std::time::Instant::now() + SWAP_WITHIN;
        loop {
            let mut tx = conn.begin().await?;
            match self.replace(&mut tx, name, &checkpoint, handled).await {
                Ok(()) => {
                    tx.commit().await?;
                    break;
                }
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE)
                        && std::time::Instant::now() < deadline =>
                {
                    tx.rollback().await?;
                    tokio::time::sleep(SWAP_PAUSE).await;
                }
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE) =>
                {
                    tx.rollback().await?;
                    return Err(ProjectionError::Other(format!(
                        "the rebuilt `{name}` could not take the live tables' place: other \
                         sessions held them for {SWAP_WITHIN:?} (a transaction left open?); \
                         the live tables are as they were, rebuild again"
                    )));
                }
                Err(e) => {
                    tx.rollback().await?;
                    return Err(e.into());
                }
            }
        }
        sqlx::query("RESET search_path").execute(&mut *conn).await?;
        Ok(())
    }
}

impl Shadow {
    /// In the caller's transaction: the live tables dropped, the copies moved into their
    /// schema, the checkpoint set.
    async fn replace(
        &self,
        tx: &mut PgConnection,
        name: &str,
        checkpoint: &(String, i64),
        handled: u64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "SET LOCAL lock_timeout = {}",
            SWAP_LOCK_WAIT.as_millis()
        ))
        .execute(&mut *tx)
        .await?;
        let live: Vec<&str> = self.tables.iter().map(|t| t.live.as_str()).collect();
        sqlx::query(&format!(
            "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            live.join(", ")
        ))
        .execute(&mut *tx)
        .await?;
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
        Ok(())
    }
}

/// SQLSTATE `lock_not_available`: `lock_timeout` ran out.
const LOCK_NOT_AVAILABLE: &str = "55P03";
/// How long one try of the swap waits for the live tables' lock (readers arriving meanwhile
/// wait behind it), the pause before the next try, and how long it keeps trying.
const SWAP_LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(200);
const SWAP_PAUSE: std::time::Duration = std::time::Duration::from_millis(300);
const SWAP_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// The live table's constraints of the given types (`contype` values, quoted), by name.
async fn constraints(
    conn: &mut PgConnection,
    table: sqlx::postgres::types::Oid,
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
            oid: sqlx::postgres::types::Oid(1),
            schema: "public".into(),
            live: "public.message_list".into(),
            copy: "\"rebuild_message_list\".message_list".into(),
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
