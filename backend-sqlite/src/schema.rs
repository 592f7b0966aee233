//! Table names, versioned migrations and the SQL text of every statement.

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

/// The columns of a message row, in the order [`crate::codec::read_message`] reads them.
const MESSAGE_COLUMNS: &str = "sequence, id, topic, key, payload, headers, content_type, \
     message_type, correlation_id, reply_to, created_at, deliver_after, traceparent, tracestate, \
     baggage, status, attempts, next_attempt_at, last_error, dispatched_at, shard";

/// The condition under which an earlier message of a key holds back later ones (PerKey):
/// parked, or pending but not due at `:now`. The first three terms repeat the WHERE clause
/// of the `messages_key_blockers` partial index word for word, so SQLite uses it.
fn blocker_condition(alias: &str) -> String {
    format!(
        "{a}.key IS NOT NULL AND {a}.status <> 'dispatched' \
         AND ({a}.status = 'parked' OR {a}.next_attempt_at IS NOT NULL OR {a}.deliver_after IS NOT NULL) \
         AND ({a}.status = 'parked' OR {a}.next_attempt_at > :now OR {a}.deliver_after > :now)",
        a = alias
    )
}

/// The SQL text of every statement, built once per store for its prefix.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) prefix: String,
    pub(crate) insert_message: String,
    pub(crate) get_message: String,
    pub(crate) pending_per_key: String,
    pub(crate) pending_unordered: String,
    pub(crate) message_by_sequence: String,
    pub(crate) mark_dispatched: String,
    pub(crate) failed_state: String,
    pub(crate) mark_retrying: String,
    pub(crate) mark_parked: String,
    pub(crate) requeue_id: String,
    pub(crate) requeue_topic: String,
    pub(crate) requeue_all: String,
    pub(crate) stats: String,
    pub(crate) purge_dispatched: String,
    pub(crate) list: String,
    pub(crate) dispatched_since: String,
    pub(crate) inbox_insert: String,
    pub(crate) inbox_contains: String,
    pub(crate) inbox_purge: String,
    pub(crate) lease_get: String,
    pub(crate) lease_insert: String,
    pub(crate) lease_take: String,
    pub(crate) lease_extend: String,
    pub(crate) lease_release: String,
}

impl Sql {
    /// Statements for `prefix`, which must have been validated.
    pub(crate) fn new(prefix: &str) -> Self {
        let m = format!("{prefix}messages");
        let i = format!("{prefix}inbox");
        let l = format!("{prefix}leases");
        let cols = MESSAGE_COLUMNS;
        let due = "(m.deliver_after IS NULL OR m.deliver_after <= :now) \
                   AND (m.next_attempt_at IS NULL OR m.next_attempt_at <= :now)";
        let pending_base = format!(
            "SELECT m.sequence FROM {m} AS m \
             WHERE m.status = 'pending' AND m.shard = :shard AND {due}"
        );
        Sql {
            prefix: prefix.to_owned(),
            insert_message: format!(
                "INSERT INTO {m} (id, topic, key, payload, headers, content_type, message_type, \
                 correlation_id, reply_to, created_at, deliver_after, traceparent, tracestate, \
                 baggage, status, attempts, shard) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 'pending', 0, ?15)"
            ),
            get_message: format!("SELECT {cols} FROM {m} WHERE id = ?1"),
            pending_per_key: format!(
                "{pending_base} AND (m.key IS NULL OR NOT EXISTS (\
                 SELECT 1 FROM {m} AS e WHERE e.key = m.key AND e.sequence < m.sequence AND {blk})) \
                 ORDER BY m.sequence LIMIT :limit",
                blk = blocker_condition("e")
            ),
            pending_unordered: format!("{pending_base} ORDER BY m.sequence LIMIT :limit"),
            message_by_sequence: format!("SELECT {cols} FROM {m} WHERE sequence = ?1"),
            mark_dispatched: format!(
                "UPDATE {m} SET status = 'dispatched', dispatched_at = ?2 \
                 WHERE id = ?1 AND status <> 'dispatched'"
            ),
            failed_state: format!("SELECT status, attempts FROM {m} WHERE id = ?1"),
            mark_retrying: format!(
                "UPDATE {m} SET attempts = ?2, last_error = ?3, next_attempt_at = ?4 \
                 WHERE id = ?1 AND status = 'pending'"
            ),
            mark_parked: format!(
                "UPDATE {m} SET status = 'parked', attempts = ?2, last_error = ?3, \
                 next_attempt_at = NULL WHERE id = ?1 AND status = 'pending'"
            ),
            requeue_id: format!(
                "UPDATE {m} SET status = 'pending', attempts = 0, next_attempt_at = NULL \
                 WHERE id = ?1 AND status = 'parked'"
            ),
            requeue_topic: format!(
                "UPDATE {m} SET status = 'pending', attempts = 0, next_attempt_at = NULL \
                 WHERE topic = ?1 AND status = 'parked'"
            ),
            requeue_all: format!(
                "UPDATE {m} SET status = 'pending', attempts = 0, next_attempt_at = NULL \
                 WHERE status = 'parked'"
            ),
            stats: format!(
                "SELECT (SELECT count(*) FROM {m} WHERE status = 'pending'), \
                        (SELECT count(*) FROM {m} WHERE status = 'parked'), \
                        (SELECT min(created_at) FROM {m} WHERE status = 'pending')"
            ),
            purge_dispatched: format!(
                "DELETE FROM {m} WHERE sequence IN (\
                 SELECT sequence FROM {m} WHERE status = 'dispatched' AND dispatched_at <= ?1 \
                 ORDER BY dispatched_at LIMIT ?2)"
            ),
            list: format!(
                "SELECT {cols} FROM {m} WHERE (?1 IS NULL OR status = ?1) \
                 AND (?2 IS NULL OR topic = ?2) AND (?3 IS NULL OR key = ?3) \
                 ORDER BY sequence LIMIT ?4"
            ),
            dispatched_since: format!(
                "SELECT count(*) FROM {m} WHERE status = 'dispatched' AND dispatched_at >= ?1"
            ),
            inbox_insert: format!(
                "INSERT INTO {i} (message_id, handler_key, inserted_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (message_id, handler_key) DO UPDATE \
                 SET inserted_at = excluded.inserted_at, expires_at = excluded.expires_at \
                 WHERE {i}.expires_at <= ?3"
            ),
            inbox_contains: format!(
                "SELECT EXISTS (SELECT 1 FROM {i} \
                 WHERE message_id = ?1 AND handler_key = ?2 AND expires_at > ?3)"
            ),
            inbox_purge: format!(
                "DELETE FROM {i} WHERE rowid IN (\
                 SELECT rowid FROM {i} WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)"
            ),
            lease_get: format!("SELECT owner, token, expires_at FROM {l} WHERE resource = ?1"),
            lease_insert: format!(
                "INSERT INTO {l} (resource, owner, token, expires_at) VALUES (?1, ?2, ?3, ?4)"
            ),
            lease_take: format!(
                "UPDATE {l} SET owner = ?2, token = ?3, expires_at = ?4 WHERE resource = ?1"
            ),
            lease_extend: format!(
                "UPDATE {l} SET expires_at = ?4 WHERE resource = ?1 AND owner = ?2 AND token = ?3"
            ),
            lease_release: format!(
                "UPDATE {l} SET owner = NULL WHERE resource = ?1 AND owner = ?2 AND token = ?3"
            ),
        }
    }
}

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
