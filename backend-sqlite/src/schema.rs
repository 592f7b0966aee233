//! Versioned migrations. The SQL text of every statement is [`Sql`](crate::core::Sql) in the
//! leaf `core`.

use outbox_core::{Error, Result};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::error::parse_error_with;

/// The newest schema version this code knows.
pub const SCHEMA_VERSION: i64 = 1;

/// Numbered migrations; `{p}` stands for the table prefix. Each runs in its own
/// `BEGIN IMMEDIATE` transaction together with the insert of its version row.
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    r#"
CREATE TABLE {p}messages (
    sequence        INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT    NOT NULL UNIQUE,
    topic           TEXT    NOT NULL,
    key             TEXT,
    payload         BLOB    NOT NULL,
    headers         TEXT    NOT NULL DEFAULT '{}',
    content_type    TEXT,
    message_type    TEXT    NOT NULL,
    correlation_id  TEXT,
    reply_to        TEXT,
    created_at      INTEGER NOT NULL,
    deliver_after   INTEGER,
    traceparent     TEXT,
    tracestate      TEXT,
    baggage         TEXT,
    status          TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'dispatched', 'parked')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    last_error      TEXT,
    dispatched_at   INTEGER,
    shard           INTEGER NOT NULL
) STRICT;

CREATE INDEX {p}messages_pending ON {p}messages (shard, sequence)
    WHERE status = 'pending';
CREATE INDEX {p}messages_key_blockers ON {p}messages (key, sequence)
    WHERE key IS NOT NULL AND status <> 'dispatched'
      AND (status = 'parked' OR next_attempt_at IS NOT NULL OR deliver_after IS NOT NULL);
CREATE INDEX {p}messages_dispatched ON {p}messages (dispatched_at)
    WHERE status = 'dispatched';
CREATE INDEX {p}messages_pending_created ON {p}messages (created_at)
    WHERE status = 'pending';
CREATE INDEX {p}messages_parked ON {p}messages (topic, sequence)
    WHERE status = 'parked';

CREATE TABLE {p}inbox (
    message_id  TEXT    NOT NULL,
    handler_key TEXT    NOT NULL,
    inserted_at INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (message_id, handler_key)
) STRICT;
CREATE INDEX {p}inbox_expires ON {p}inbox (expires_at);

CREATE TABLE {p}leases (
    resource   TEXT    PRIMARY KEY NOT NULL,
    owner      TEXT,
    token      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT;

CREATE TABLE {p}settings (
    name  TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) STRICT;
"#,
)];

/// Bring the schema of `prefix` to [`SCHEMA_VERSION`] and check the recorded shard count.
///
/// Each migration runs in its own `BEGIN IMMEDIATE` transaction, which serialises concurrent
/// migrators (in this process or others): the second one sees the version row of the first
/// and skips the migration. Blocking.
pub(crate) fn migrate(
    conn: &mut Connection,
    prefix: &str,
    shard_count: u32,
    now: i64,
) -> Result<i64> {
    let version_table = format!("{prefix}schema_version");
    let ctx = |what: &str| format!("migrating sqlite schema of prefix {prefix:?}: {what}");
    let mut version = 0;
    for (target, sql) in MIGRATIONS {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| parse_error_with(e, ctx("begin")))?;
        tx.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {version_table} (\
             version INTEGER PRIMARY KEY NOT NULL, applied_at INTEGER NOT NULL) STRICT"
        ))
        .map_err(|e| parse_error_with(e, ctx("creating the version table")))?;
        version = current_version(&tx, &version_table)
            .map_err(|e| parse_error_with(e, ctx("reading the version")))?;
        if version > SCHEMA_VERSION {
            return Err(Error::config(format!(
                "the sqlite database has schema version {version} for table prefix {prefix:?}, \
                 newer than this version of outbox-sqlite knows ({SCHEMA_VERSION}); upgrade \
                 outbox-sqlite"
            )));
        }
        if version < *target {
            tx.execute_batch(&sql.replace("{p}", prefix))
                .map_err(|e| parse_error_with(e, ctx(&format!("applying migration {target}"))))?;
            tx.execute(
                &format!("INSERT INTO {version_table} (version, applied_at) VALUES (?1, ?2)"),
                params![target, now],
            )
            .map_err(|e| parse_error_with(e, ctx(&format!("recording migration {target}"))))?;
            version = *target;
        }
        tx.commit()
            .map_err(|e| parse_error_with(e, ctx(&format!("committing migration {target}"))))?;
    }
    check_shard_count(conn, prefix, shard_count)?;
    Ok(version)
}

fn current_version(conn: &Connection, version_table: &str) -> rusqlite::Result<i64> {
    conn.query_row(
        &format!("SELECT coalesce(max(version), 0) FROM {version_table}"),
        [],
        |r| r.get(0),
    )
}

/// Record the shard count on first open; fail if a different one was recorded.
fn check_shard_count(conn: &mut Connection, prefix: &str, shard_count: u32) -> Result<()> {
    let ctx = |e| parse_error_with(e, format!("checking the shard count of prefix {prefix:?}"));
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(ctx)?;
    tx.execute(
        &format!("INSERT INTO {prefix}settings (name, value) VALUES ('shard_count', ?1) ON CONFLICT (name) DO NOTHING"),
        params![shard_count.to_string()],
    )
    .map_err(ctx)?;
    let stored: Option<String> = tx
        .query_row(
            &format!("SELECT value FROM {prefix}settings WHERE name = 'shard_count'"),
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(ctx)?;
    tx.commit().map_err(ctx)?;
    match stored {
        Some(s) if s == shard_count.to_string() => Ok(()),
        other => Err(Error::config(format!(
            "shard_count {shard_count} does not match the shard count {} recorded for table \
             prefix {prefix:?}; the shard count is fixed for the lifetime of the stored data",
            other.as_deref().unwrap_or("(none)")
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::core::Sql;

    fn migrated() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(
            migrate(&mut conn, "outbox_", 16, 0).unwrap(),
            SCHEMA_VERSION
        );
        assert_eq!(
            migrate(&mut conn, "outbox_", 16, 0).unwrap(),
            SCHEMA_VERSION
        );
        conn
    }

    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let mut rows = stmt.raw_query(); // parameters left unbound (NULL) for planning
        let mut lines = Vec::new();
        while let Some(row) = rows.next().unwrap() {
            lines.push(row.get::<_, String>(3).unwrap());
        }
        lines.join("\n")
    }

    /// The relay's queries use the partial indexes; a regression here turns every fetch into
    /// a scan of the table or of a key's whole backlog.
    #[test]
    fn relay_queries_use_the_partial_indexes() {
        let conn = migrated();
        let sql = Sql::new("outbox_");
        let p = plan(&conn, &sql.pending_per_key);
        assert!(p.contains("USING INDEX outbox_messages_pending"), "{p}");
        assert!(
            p.contains("USING INDEX outbox_messages_key_blockers"),
            "{p}"
        );
        assert!(!p.contains("TEMP B-TREE"), "no sort: {p}");
        let p = plan(&conn, &sql.pending_unordered);
        assert!(p.contains("USING INDEX outbox_messages_pending"), "{p}");
        assert!(!p.contains("TEMP B-TREE"), "no sort: {p}");
        let p = plan(&conn, &sql.purge_dispatched);
        assert!(p.contains("outbox_messages_dispatched"), "{p}");
        let p = plan(&conn, &sql.stats);
        assert!(p.contains("outbox_messages_pending_created"), "{p}");
        let p = plan(&conn, &sql.inbox_purge);
        assert!(p.contains("outbox_inbox_expires"), "{p}");
    }
}
