//! The connection core of a [`PgStore`](crate::PgStore): the pool, the names and settings every
//! operation needs, and the SQL text of every statement. A leaf: it imports no other module
//! of this crate, and every operation module (`ops`, `tx`, `lock`, `notify`) takes a [`Core`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::SharedClock;
use sqlx::{AssertSqlSafe, PgPool};

/// State shared by a store, its clones, its lock and its transactions.
pub(crate) struct Core {
    pub(crate) pool: PgPool,
    /// The schema (validated, unquoted).
    pub(crate) schema: String,
    /// The table prefix (validated).
    pub(crate) table_prefix: String,
    pub(crate) sql: Sql,
    pub(crate) shard_count: u32,
    pub(crate) max_message_size: usize,
    pub(crate) inbox_retention: Duration,
    pub(crate) clock: SharedClock,
    pub(crate) lock_clock: LockClock,
    pub(crate) key_lock_class: i32,
    pub(crate) notify: bool,
    pub(crate) channel: String,
    /// The connection URL with its password redacted, when known.
    pub(crate) url: Option<String>,
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.url)
            .field("schema", &self.schema)
            .field("table_prefix", &self.table_prefix)
            .field("shard_count", &self.shard_count)
            .field("lock_clock", &self.lock_clock)
            .field("notify", &self.notify)
            .finish_non_exhaustive()
    }
}

/// Which clock decides lease expiry in [`PgLock`](crate::PgLock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LockClock {
    /// The database server's `now()` (the default, for production). Every contender judges
    /// expiry by the same clock, so client clock skew does not matter. The `expires_at` of a
    /// returned [`Lease`](outbox_core::Lease) is translated to the caller's clock
    /// conservatively: the caller's time just before the request plus the remaining time the
    /// database reported, never later than the real expiry.
    #[default]
    Database,
    /// The store's configured [`Clock`](outbox_core::Clock) (see
    /// [`PgConfig::with_clock`](crate::PgConfig::with_clock)). For tests that move time with a
    /// `ManualClock`; in production every contender's clock must agree within a margin much
    /// smaller than the lease TTL.
    Store,
}

/// Quote a validated identifier. Validation already excludes `"`; quoting anyway means a name
/// is never parsed as a keyword and never case-folded.
pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The columns of a message row, as `codec::read_message` reads them by name.
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
