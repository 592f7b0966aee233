//! Versioned migrations, and the hashes naming advisory locks and channels. The SQL text of
//! every statement is [`Sql`](crate::core::Sql) in the leaf `core`.

use outbox_core::{Error, Result};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::core::quote;
use crate::error::parse_error_with;

/// The newest schema version this code knows.
pub const SCHEMA_VERSION: i64 = 1;

/// Numbered migrations. `{s}` is the quoted schema, `{p}` the (validated) table prefix.
/// All of them, with the version rows, run in one transaction under an advisory lock.
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    r#"
CREATE TABLE {s}."{p}messages" (
    sequence        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              uuid        NOT NULL,
    topic           text        NOT NULL,
    key             text,
    payload         bytea       NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '{}',
    content_type    text,
    message_type    text        NOT NULL,
    correlation_id  text,
    reply_to        text,
    created_at      timestamptz NOT NULL,
    deliver_after   timestamptz,
    traceparent     text,
    tracestate      text,
    baggage         text,
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'dispatched', 'parked')),
    attempts        bigint      NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error      text,
    dispatched_at   timestamptz,
    shard           integer     NOT NULL,
    CONSTRAINT "{p}messages_id" UNIQUE (id)
);

CREATE INDEX "{p}messages_pending" ON {s}."{p}messages" (shard, sequence)
    WHERE status = 'pending';
CREATE INDEX "{p}messages_key_blockers" ON {s}."{p}messages" (key, sequence)
    WHERE key IS NOT NULL AND status <> 'dispatched'
      AND (status = 'parked' OR next_attempt_at IS NOT NULL OR deliver_after IS NOT NULL);
CREATE INDEX "{p}messages_dispatched" ON {s}."{p}messages" (dispatched_at)
    WHERE status = 'dispatched';
CREATE INDEX "{p}messages_pending_created" ON {s}."{p}messages" (created_at)
    WHERE status = 'pending';
CREATE INDEX "{p}messages_parked" ON {s}."{p}messages" (topic, sequence)
    WHERE status = 'parked';

CREATE TABLE {s}."{p}inbox" (
    message_id  uuid        NOT NULL,
    handler_key text        NOT NULL,
    inserted_at timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (message_id, handler_key)
);
CREATE INDEX "{p}inbox_expires" ON {s}."{p}inbox" (expires_at);

CREATE TABLE {s}."{p}leases" (
    resource   text        PRIMARY KEY,
    owner      text,
    token      bigint      NOT NULL,
    expires_at timestamptz NOT NULL
);

CREATE TABLE {s}."{p}settings" (
    name  text PRIMARY KEY,
    value text NOT NULL
);
"#,
)];

/// A stable 64-bit FNV-1a hash: the same in every process and version (unlike a per-process
/// random hasher), so every client derives the same advisory lock keys.
pub(crate) fn fnv64(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The advisory lock class (first key of the two-key form) of the per-key write locks of one
/// outbox (schema + prefix). Different outboxes use different classes, so their keys never
/// contend; the two-key and one-key forms never collide with each other.
pub(crate) fn key_lock_class(schema: &str, prefix: &str) -> i32 {
    (fnv64(&format!("outbox-postgres/key/{schema}.{prefix}")) >> 32) as u32 as i32
}

/// The advisory lock (one-key form) serialising migrations of one schema. Per schema, not per
/// prefix, so two prefixes migrating into a new schema do not race on `CREATE SCHEMA`.
pub(crate) fn migration_lock(schema: &str) -> i64 {
    fnv64(&format!("outbox-postgres/migrate/{schema}")) as i64
}

/// Bring the tables of `schema`/`prefix` to [`SCHEMA_VERSION`], then record or check the shard
/// count. One transaction, serialised by `pg_advisory_xact_lock`: concurrent migrators (in any
/// process) wait, then see the version rows of the first and skip. Returns the version.
pub(crate) async fn migrate(
    conn: &mut PgConnection,
    schema: &str,
    prefix: &str,
    shard_count: u32,
) -> Result<i64> {
    let ctx = |what: String| format!("migrating schema {schema:?} prefix {prefix:?}: {what}");
    let s = quote(schema);
    let version_table = format!("{s}.{}", quote(&format!("{prefix}schema_version")));
    let settings_table = format!("{s}.{}", quote(&format!("{prefix}settings")));
    let mut tx = conn
        .begin()
        .await
        .map_err(|e| parse_error_with(e, ctx("begin".into())))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(migration_lock(schema))
        .execute(&mut *tx)
        .await
        .map_err(|e| parse_error_with(e, ctx("taking the migration lock".into())))?;
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS {s}")))
        .execute(&mut *tx)
        .await
        .map_err(|e| parse_error_with(e, ctx("creating the schema".into())))?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {version_table} (\
         version bigint PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )))
    .execute(&mut *tx)
    .await
    .map_err(|e| parse_error_with(e, ctx("creating the version table".into())))?;
    let mut version: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT coalesce(max(version), 0) FROM {version_table}"
    )))
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| parse_error_with(e, ctx("reading the version".into())))?;
    if version > SCHEMA_VERSION {
        return Err(Error::config(format!(
            "schema {schema:?} prefix {prefix:?} has outbox schema version {version}, newer than \
             this version of outbox-postgres knows ({SCHEMA_VERSION}); upgrade outbox-postgres"
        )));
    }
    for (target, sql) in MIGRATIONS {
        if version >= *target {
            continue;
        }
        let sql = sql.replace("{s}", &s).replace("{p}", prefix);
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await
            .map_err(|e| parse_error_with(e, ctx(format!("applying migration {target}"))))?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {version_table} (version) VALUES ($1)"
        )))
        .bind(target)
        .execute(&mut *tx)
        .await
        .map_err(|e| parse_error_with(e, ctx(format!("recording migration {target}"))))?;
        version = *target;
    }
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {settings_table} (name, value) VALUES ('shard_count', $1) \
         ON CONFLICT (name) DO NOTHING"
    )))
    .bind(shard_count.to_string())
    .execute(&mut *tx)
    .await
    .map_err(|e| parse_error_with(e, ctx("recording the shard count".into())))?;
    let stored: String = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT value FROM {settings_table} WHERE name = 'shard_count'"
    )))
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| parse_error_with(e, ctx("reading the shard count".into())))?;
    if stored != shard_count.to_string() {
        return Err(Error::config(format!(
            "shard_count {shard_count} does not match the shard count {stored} recorded for \
             schema {schema:?} prefix {prefix:?}; the shard count is fixed for the lifetime of \
             the stored data"
        )));
    }
    tx.commit()
        .await
        .map_err(|e| parse_error_with(e, ctx("commit".into())))?;
    Ok(version)
}
