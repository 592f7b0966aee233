//! Names, versioned migrations, and the SQL text of every statement.

use std::sync::Arc;

use outbox_core::{Error, Result};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::config::quote;
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

/// The columns of a message row, as [`crate::codec::read_message`] reads them by name.
const MESSAGE_COLUMNS: &str = "sequence, id, topic, key, payload, headers, content_type, \
     message_type, correlation_id, reply_to, created_at, deliver_after, traceparent, tracestate, \
     baggage, status, attempts, next_attempt_at, last_error, dispatched_at, shard";

/// A statement text, cheap to clone into `sqlx::query`.
pub(crate) type Stmt = AssertSqlSafe<Arc<str>>;

fn stmt(s: String) -> Arc<str> {
    Arc::from(s)
}

/// The SQL text of every statement, built once per store for its schema and prefix.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) messages_table: String,
    pub(crate) insert_messages: Arc<str>,
    pub(crate) get_message: Arc<str>,
    pub(crate) pending_per_key: Arc<str>,
    pub(crate) pending_unordered: Arc<str>,
    pub(crate) mark_dispatched: Arc<str>,
    pub(crate) mark_failed: Arc<str>,
    pub(crate) message_status: Arc<str>,
    pub(crate) requeue_ids: Arc<str>,
    pub(crate) requeue_topic: Arc<str>,
    pub(crate) requeue_all: Arc<str>,
    pub(crate) stats: Arc<str>,
    pub(crate) purge_dispatched: Arc<str>,
    pub(crate) list: Arc<str>,
    pub(crate) dispatched_since: Arc<str>,
    pub(crate) inbox_insert: Arc<str>,
    pub(crate) inbox_contains: Arc<str>,
    pub(crate) inbox_purge: Arc<str>,
    pub(crate) lease_acquire: Arc<str>,
    pub(crate) lease_renew: Arc<str>,
    pub(crate) lease_release: Arc<str>,
    pub(crate) lease_current: Arc<str>,
    pub(crate) lease_get: Arc<str>,
    pub(crate) schema_version: Arc<str>,
}

/// Run a statement of [`Sql`].
pub(crate) fn q(s: &Arc<str>) -> Stmt {
    AssertSqlSafe(s.clone())
}

impl Sql {
    /// Statements for `schema` and `prefix`, which must have been validated.
    pub(crate) fn new(schema: &str, prefix: &str) -> Self {
        let table = |name: &str| format!("{}.{}", quote(schema), quote(&format!("{prefix}{name}")));
        let m = table("messages");
        let i = table("inbox");
        let l = table("leases");
        let cols = MESSAGE_COLUMNS;
        // $2 = now. A pending message is due when neither time lies in the future.
        let due = "(m.deliver_after IS NULL OR m.deliver_after <= $2) \
                   AND (m.next_attempt_at IS NULL OR m.next_attempt_at <= $2)";
        // An earlier message of the same key holds back later ones (PerKey) when it is parked
        // or pending but not due. The first three terms repeat the predicate of the partial
        // index messages_key_blockers, so the planner proves the index applies.
        let blocker = "e.key = m.key AND e.sequence < m.sequence \
             AND e.key IS NOT NULL AND e.status <> 'dispatched' \
             AND (e.status = 'parked' OR e.next_attempt_at IS NOT NULL OR e.deliver_after IS NOT NULL) \
             AND (e.status = 'parked' OR e.next_attempt_at > $2 OR e.deliver_after > $2)";
        // $1 = shards, $2 = now, $3 = limit. Per shard, the `limit` oldest eligible sequences
        // (an index range scan of messages_pending that stops early); of their union the
        // `limit` oldest; then the rows. Keys never span shards, so the per-key rule is
        // decided inside each shard.
        let pending = |extra: &str| {
            stmt(format!(
                "SELECT {cols} FROM {m} WHERE sequence IN (\
                   SELECT x.sequence FROM unnest($1::int4[]) AS s(shard) \
                   CROSS JOIN LATERAL (\
                     SELECT m.sequence FROM {m} AS m \
                     WHERE m.status = 'pending' AND m.shard = s.shard AND {due} {extra} \
                     ORDER BY m.sequence LIMIT $3) AS x \
                   ORDER BY x.sequence LIMIT $3) \
                 ORDER BY sequence"
            ))
        };
        let requeue_set = "status = 'pending', attempts = 0, next_attempt_at = NULL";
        Sql {
            messages_table: m.clone(),
            // One statement: take the per-key advisory locks (sorted, so two batches never
            // deadlock each other), then draw sequences and insert, in slice order. The
            // InitPlan `(SELECT count(*) FROM locks)` runs before the first row is produced,
            // so every sequence of a key is drawn while its lock is held; the lock is held
            // until the transaction ends. See "Commit order" in the README.
            // $1 lock class, $2..$16 the column arrays, $17 notify channel (NULL: none).
            insert_messages: stmt(format!(
                "WITH locks AS MATERIALIZED (\
                   SELECT pg_advisory_xact_lock($1::int4, d.h) FROM (\
                     SELECT DISTINCT hashtext(k) AS h FROM unnest($4::text[]) AS k \
                     WHERE k IS NOT NULL) AS d \
                   ORDER BY d.h), \
                 ins AS (\
                   INSERT INTO {m} (id, topic, key, payload, headers, content_type, message_type, \
                     correlation_id, reply_to, created_at, deliver_after, traceparent, tracestate, \
                     baggage, shard) \
                   SELECT r.id, r.topic, r.key, r.payload, r.headers::jsonb, r.content_type, \
                     r.message_type, r.correlation_id, r.reply_to, r.created_at, r.deliver_after, \
                     r.traceparent, r.tracestate, r.baggage, r.shard \
                   FROM unnest($2::uuid[], $3::text[], $4::text[], $5::bytea[], $6::text[], \
                     $7::text[], $8::text[], $9::text[], $10::text[], $11::timestamptz[], \
                     $12::timestamptz[], $13::text[], $14::text[], $15::text[], $16::int4[]) \
                     WITH ORDINALITY AS r(id, topic, key, payload, headers, content_type, \
                     message_type, correlation_id, reply_to, created_at, deliver_after, \
                     traceparent, tracestate, baggage, shard, ord) \
                   WHERE (SELECT count(*) FROM locks) >= 0 \
                   ORDER BY r.ord \
                   RETURNING shard) \
                 SELECT count(*) AS inserted, \
                   CASE WHEN $17::text IS NOT NULL AND count(*) > 0 THEN \
                     pg_notify($17::text, string_agg(DISTINCT shard::text, ',')) END AS notified \
                 FROM ins"
            )),
            get_message: stmt(format!("SELECT {cols} FROM {m} WHERE id = $1")),
            pending_per_key: pending(&format!(
                "AND (m.key IS NULL OR NOT EXISTS (SELECT 1 FROM {m} AS e WHERE {blocker}))"
            )),
            pending_unordered: pending(""),
            // Rows are locked in sequence order, so concurrent callers never deadlock.
            mark_dispatched: stmt(format!(
                "WITH t AS (SELECT sequence FROM {m} WHERE id = ANY($1::uuid[]) \
                   AND status <> 'dispatched' ORDER BY sequence FOR UPDATE) \
                 UPDATE {m} AS m SET status = 'dispatched', dispatched_at = $2 \
                 FROM t WHERE m.sequence = t.sequence"
            )),
            // $1 id, $2 error, $3 max_attempts, $4 next attempt.
            mark_failed: stmt(format!(
                "UPDATE {m} SET attempts = attempts + 1, last_error = $2, \
                   status = CASE WHEN attempts + 1 >= $3 THEN 'parked' ELSE 'pending' END, \
                   next_attempt_at = CASE WHEN attempts + 1 >= $3 THEN NULL ELSE $4 END \
                 WHERE id = $1 AND status = 'pending' \
                 RETURNING attempts, status"
            )),
            message_status: stmt(format!("SELECT status FROM {m} WHERE id = $1")),
            requeue_ids: stmt(format!(
                "UPDATE {m} SET {requeue_set} WHERE id = ANY($1::uuid[]) AND status = 'parked'"
            )),
            requeue_topic: stmt(format!(
                "UPDATE {m} SET {requeue_set} WHERE topic = $1 AND status = 'parked'"
            )),
            requeue_all: stmt(format!(
                "UPDATE {m} SET {requeue_set} WHERE status = 'parked'"
            )),
            stats: stmt(format!(
                "SELECT (SELECT count(*) FROM {m} WHERE status = 'pending') AS pending, \
                        (SELECT count(*) FROM {m} WHERE status = 'parked') AS parked, \
                        (SELECT min(created_at) FROM {m} WHERE status = 'pending') AS oldest"
            )),
            // Bounded batch, oldest first; rows another purger holds are skipped, not waited for.
            purge_dispatched: stmt(format!(
                "DELETE FROM {m} AS m USING (\
                   SELECT sequence FROM {m} WHERE status = 'dispatched' AND dispatched_at <= $1 \
                   ORDER BY dispatched_at LIMIT $2 FOR UPDATE SKIP LOCKED) AS d \
                 WHERE m.sequence = d.sequence"
            )),
            list: stmt(format!(
                "SELECT {cols} FROM {m} WHERE ($1::text IS NULL OR status = $1) \
                 AND ($2::text IS NULL OR topic = $2) AND ($3::text IS NULL OR key = $3) \
                 ORDER BY sequence LIMIT $4"
            )),
            dispatched_since: stmt(format!(
                "SELECT count(*) FROM {m} WHERE status = 'dispatched' AND dispatched_at >= $1"
            )),
            // An expired entry that was not purged yet counts as absent: it is taken over.
            inbox_insert: stmt(format!(
                "INSERT INTO {i} AS i (message_id, handler_key, inserted_at, expires_at) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (message_id, handler_key) DO UPDATE \
                 SET inserted_at = excluded.inserted_at, expires_at = excluded.expires_at \
                 WHERE i.expires_at <= $3"
            )),
            inbox_contains: stmt(format!(
                "SELECT EXISTS (SELECT 1 FROM {i} \
                 WHERE message_id = $1 AND handler_key = $2 AND expires_at > $3)"
            )),
            inbox_purge: stmt(format!(
                "DELETE FROM {i} AS i USING (\
                   SELECT message_id, handler_key FROM {i} WHERE expires_at <= $1 \
                   ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) AS d \
                 WHERE i.message_id = d.message_id AND i.handler_key = d.handler_key"
            )),
            // Leases. `$now` is the store clock's time, or NULL for the database clock.
            // $1 resource, $2 owner, $3 ttl, $4 now.
            lease_acquire: stmt(format!(
                "INSERT INTO {l} AS l (resource, owner, token, expires_at) \
                 VALUES ($1, $2, 1, coalesce($4::timestamptz, now()) + $3::interval) \
                 ON CONFLICT (resource) DO UPDATE SET \
                   owner = excluded.owner, \
                   token = CASE WHEN l.owner = excluded.owner \
                                 AND l.expires_at > coalesce($4::timestamptz, now()) \
                            THEN l.token ELSE l.token + 1 END, \
                   expires_at = excluded.expires_at \
                 WHERE l.owner IS NULL OR l.owner = excluded.owner \
                    OR l.expires_at <= coalesce($4::timestamptz, now()) \
                 RETURNING token, expires_at, coalesce($4::timestamptz, now()) AS db_now"
            )),
            // $1 resource, $2 owner, $3 token, $4 ttl, $5 now.
            lease_renew: stmt(format!(
                "UPDATE {l} SET expires_at = coalesce($5::timestamptz, now()) + $4::interval \
                 WHERE resource = $1 AND owner = $2 AND token = $3 \
                 RETURNING expires_at, coalesce($5::timestamptz, now()) AS db_now"
            )),
            lease_release: stmt(format!(
                "UPDATE {l} SET owner = NULL WHERE resource = $1 AND owner = $2 AND token = $3"
            )),
            lease_current: stmt(format!(
                "SELECT owner, token, expires_at, coalesce($2::timestamptz, now()) AS db_now \
                 FROM {l} WHERE resource = $1 AND owner IS NOT NULL \
                 AND expires_at > coalesce($2::timestamptz, now())"
            )),
            lease_get: stmt(format!("SELECT owner, token FROM {l} WHERE resource = $1")),
            schema_version: stmt(format!(
                "SELECT coalesce(max(version), 0) FROM {}",
                table("schema_version")
            )),
        }
    }
}

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
