//! Deposit: transactions that insert one business row (a) alone, (b) plus messages through
//! the library in the same transaction, (c) plus the same message rows written by a
//! hand-written INSERT (or Put) into a plain table with the library's indexes: the floor.

use std::time::Instant;

use async_trait::async_trait;
use outbox_core::{Error, Message, Result, Transaction, TransactionalStore, shard_for};
use outbox_dynamodb::DynamoDbStore;
use outbox_dynamodb::aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem};
use outbox_postgres::PgStore;
use outbox_postgres::sqlx::{self, AssertSqlSafe};
use outbox_sqlite::rusqlite::params;
use outbox_sqlite::{SqliteConfig, SqliteStore};

use crate::backends::dynamo_tables;
use crate::cli::{Case, Word, case_label};
use crate::common::{Ctx, Series, drop_schema, messages, pg_exec, pg_store};
use crate::dynamo;

const SCENARIO: &str = "deposit";

/// What a transaction writes besides the business row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Nothing.
    Alone,
    /// The messages, through the library.
    Lib,
    /// The same message rows, by hand.
    Floor,
}

#[async_trait]
trait Depositor: Send + Sync {
    /// One transaction: a business row keyed `id`, plus `messages` as `variant` says.
    async fn deposit(&self, variant: Variant, id: uuid::Uuid, messages: &[Message]) -> Result<()>;
    /// Remove what the case created.
    async fn cleanup(&self) -> Result<()>;
}

/// Run the deposit scenario for one backend.
pub async fn run(ctx: &mut Ctx, case: Case) -> Result<()> {
    let depositor: Box<dyn Depositor> = match case {
        [Word::Sqlite] => Box::new(SqliteDeposit::new(ctx).await?),
        [Word::Postgres] => Box::new(PgDeposit::new(ctx).await?),
        [Word::Dynamodb] => Box::new(DynamoDeposit::new(ctx).await?),
        _ => return Err(Error::invalid_input("deposit: unknown case")),
    };
    let n = match case {
        [Word::Dynamodb] => ctx.count(10, 3),
        _ => ctx.count(150, 5),
    };
    let result = measure(ctx, case, depositor.as_ref(), n).await;
    let cleaned = depositor.cleanup().await;
    result.and(cleaned)
}

async fn measure(ctx: &mut Ctx, case: Case, d: &dyn Depositor, n: usize) -> Result<()> {
    let label = case_label(case);
    let plan: [(&str, Variant, usize); 5] = [
        ("a", Variant::Alone, 1),
        ("b", Variant::Lib, 1),
        ("c", Variant::Floor, 1),
        ("b10", Variant::Lib, 10),
        ("c10", Variant::Floor, 10),
    ];
    let mut series: Vec<Series> = vec![Series::default(); plan.len()];
    for pass in ctx.pass_range() {
        ctx.status(format!("deposit {label}: pass {pass}"));
        // Interleaved: a, lib, floor, lib, floor in every pass.
        for (i, (name, variant, per_tx)) in plan.iter().enumerate() {
            let batches: Vec<Vec<Message>> = (0..n)
                .map(|_| messages("deposit", *per_tx, 1_000, 1024))
                .collect::<Result<_>>()?;
            ctx.phase(&format!("{name} deposit {label}"));
            let start = Instant::now();
            for msgs in &batches {
                d.deposit(*variant, uuid::Uuid::now_v7(), msgs).await?;
            }
            let us_per_tx = start.elapsed().as_secs_f64() * 1e6 / n as f64;
            series[i].record(pass, us_per_tx);
        }
        ctx.progress.inc(1);
    }
    let r = &mut ctx.report;
    let names = [
        "a: business row alone",
        "b: + 1 message (library)",
        "c: + 1 row by hand (floor)",
        "b10: + 10 messages (library)",
        "c10: + 10 rows by hand (floor)",
    ];
    for (s, name) in series.iter().zip(names) {
        r.add(SCENARIO, &label, name, "µs/tx", &s.0);
    }
    let ratio = |x: &Series, y: &Series| crate::stats::ratios(&x.0, &y.0).unwrap_or_default();
    let diff =
        |x: &Series, y: &Series| -> Vec<f64> { x.0.iter().zip(&y.0).map(|(a, b)| a - b).collect() };
    let [a, b, c, b10, c10] = &series[..] else {
        return Err(Error::unexpected("deposit: five series"));
    };
    r.add(SCENARIO, &label, "b/a", "×", &ratio(b, a));
    r.add(SCENARIO, &label, "b/c", "×", &ratio(b, c));
    r.add(SCENARIO, &label, "b−a", "µs/tx", &diff(b, a));
    r.add(SCENARIO, &label, "b−c", "µs/tx", &diff(b, c));
    r.add(SCENARIO, &label, "b10/c10", "×", &ratio(b10, c10));
    r.add(SCENARIO, &label, "b10−c10", "µs/tx", &diff(b10, c10));
    r.notes.push(format!(
        "deposit {label}: {n} sequential transactions per variant per pass, 1 KiB payloads"
    ));
    Ok(())
}

// ---- SQLite ---------------------------------------------------------------------------

struct SqliteDeposit {
    store: SqliteStore,
    _dir: tempfile::TempDir,
    floor_insert: String,
}

impl SqliteDeposit {
    async fn new(_ctx: &mut Ctx) -> Result<Self> {
        let dir = tempfile::tempdir()
            .map_err(|e| Error::unexpected("creating a temporary directory").with_source(e))?;
        let store = SqliteStore::connect(SqliteConfig::new(dir.path().join("deposit.db"))).await?;
        store.migrate().await?;
        let messages = format!("{}messages", store.config().table_prefix());
        // The floor: the library's own DDL (table and indexes), under another name.
        let conn = store.open_connection()?;
        let ddl: Vec<String> = {
            let mut stmt = conn
                .prepare("SELECT sql FROM sqlite_master WHERE tbl_name = ?1 AND sql IS NOT NULL")
                .map_err(outbox_sqlite::parse_error)?;
            let rows = stmt
                .query_map([&messages], |r| r.get::<_, String>(0))
                .map_err(outbox_sqlite::parse_error)?;
            rows.collect::<std::result::Result<_, _>>()
                .map_err(outbox_sqlite::parse_error)?
        };
        if ddl.is_empty() {
            return Err(Error::unexpected(format!("no DDL found for {messages}")));
        }
        for sql in ddl {
            conn.execute_batch(&sql.replace(&messages, "floor_messages"))
                .map_err(outbox_sqlite::parse_error)?;
        }
        conn.execute_batch(
            "CREATE TABLE bench_orders (id TEXT PRIMARY KEY, total INTEGER NOT NULL) STRICT",
        )
        .map_err(outbox_sqlite::parse_error)?;
        Ok(SqliteDeposit {
            store,
            _dir: dir,
            floor_insert: "INSERT INTO floor_messages (id, topic, key, payload, headers, \
                content_type, message_type, correlation_id, reply_to, created_at, deliver_after, \
                traceparent, tracestate, baggage, status, attempts, shard) \
                VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 'pending', 0, ?15)"
                .to_owned(),
        })
    }
}

#[async_trait]
impl Depositor for SqliteDeposit {
    async fn deposit(&self, variant: Variant, id: uuid::Uuid, msgs: &[Message]) -> Result<()> {
        let mut tx = self.store.begin().await?;
        let floor = (variant == Variant::Floor).then(|| (self.floor_insert.clone(), msgs.to_vec()));
        let shards = self.store.config().shard_count();
        tx.execute(move |c| {
            c.prepare_cached("INSERT INTO bench_orders (id, total) VALUES (?1, ?2)")?
                .execute(params![id.to_string(), 1999])?;
            if let Some((sql, msgs)) = floor {
                let mut st = c.prepare_cached(&sql)?;
                for m in &msgs {
                    let headers = serde_json::to_string(&m.headers).map_err(|e| {
                        outbox_sqlite::rusqlite::Error::ToSqlConversionFailure(e.into())
                    })?;
                    st.execute(params![
                        m.id.to_string(),
                        m.topic,
                        m.key,
                        m.payload.as_ref(),
                        headers,
                        m.content_type,
                        m.message_type.as_str(),
                        m.correlation_id,
                        m.reply_to,
                        m.created_at.timestamp_micros(),
                        m.deliver_after.map(|t| t.timestamp_micros()),
                        m.trace.traceparent,
                        m.trace.tracestate,
                        m.trace.baggage,
                        i64::from(shard_for(m.key.as_deref(), &m.id, shards)),
                    ])?;
                }
            }
            Ok(())
        })
        .await?;
        if variant == Variant::Lib {
            add(&mut tx, msgs).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn cleanup(&self) -> Result<()> {
        Ok(()) // the temporary directory goes with the struct
    }
}

async fn add<T: Transaction>(tx: &mut T, msgs: &[Message]) -> Result<()> {
    match msgs {
        [one] => tx.add(one).await,
        many => tx.add_batch(many).await,
    }
}

// ---- PostgreSQL -----------------------------------------------------------------------

struct PgDeposit {
    store: PgStore,
    schema: String,
    business: String,
    floor_one: String,
    floor_many: String,
}

const PG_COLUMNS: &str = "id, topic, key, payload, headers, content_type, message_type, \
    correlation_id, reply_to, created_at, deliver_after, traceparent, tracestate, baggage, shard";

impl PgDeposit {
    async fn new(ctx: &mut Ctx) -> Result<Self> {
        let schema = ctx.name("dep");
        let store = pg_store(ctx, &schema, false).await?;
        let lib = store.messages_table().to_owned();
        let floor = format!("\"{schema}\".floor_messages");
        // The floor: a plain table with the library table's columns, defaults, identity,
        // constraints and indexes (LIKE .. INCLUDING ALL copies them from the live table).
        pg_exec(
            &store,
            format!(
                "CREATE TABLE {floor} (LIKE {lib} INCLUDING ALL); \
                 CREATE TABLE \"{schema}\".bench_orders (id uuid PRIMARY KEY, total bigint NOT NULL)"
            ),
        )
        .await?;
        Ok(PgDeposit {
            business: format!("INSERT INTO \"{schema}\".bench_orders (id, total) VALUES ($1, $2)"),
            floor_one: format!(
                "INSERT INTO {floor} ({PG_COLUMNS}) VALUES \
                 ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
            ),
            floor_many: format!(
                "INSERT INTO {floor} ({PG_COLUMNS}) SELECT id, topic, key, payload, headers::jsonb, \
                 content_type, message_type, correlation_id, reply_to, created_at, deliver_after, \
                 traceparent, tracestate, baggage, shard FROM unnest($1::uuid[], $2::text[], \
                 $3::text[], $4::bytea[], $5::text[], $6::text[], $7::text[], $8::text[], \
                 $9::text[], $10::timestamptz[], $11::timestamptz[], $12::text[], $13::text[], \
                 $14::text[], $15::int4[]) AS r(id, topic, key, payload, headers, content_type, \
                 message_type, correlation_id, reply_to, created_at, deliver_after, traceparent, \
                 tracestate, baggage, shard)"
            ),
            store,
            schema,
        })
    }

    async fn floor(&self, conn: &mut sqlx::PgConnection, msgs: &[Message]) -> Result<()> {
        let shards = self.store.config().shard_count();
        let shard = |m: &Message| shard_for(m.key.as_deref(), &m.id, shards) as i32;
        let headers = |m: &Message| serde_json::to_string(&m.headers).unwrap_or_default();
        let q = if let [m] = msgs {
            sqlx::query(AssertSqlSafe(self.floor_one.clone()))
                .bind(m.id.as_uuid())
                .bind(&m.topic)
                .bind(&m.key)
                .bind(m.payload.as_ref())
                .bind(headers(m))
                .bind(&m.content_type)
                .bind(m.message_type.as_str())
                .bind(&m.correlation_id)
                .bind(&m.reply_to)
                .bind(m.created_at)
                .bind(m.deliver_after)
                .bind(&m.trace.traceparent)
                .bind(&m.trace.tracestate)
                .bind(&m.trace.baggage)
                .bind(shard(m))
        } else {
            let col =
                |f: &dyn Fn(&Message) -> Option<String>| msgs.iter().map(f).collect::<Vec<_>>();
            sqlx::query(AssertSqlSafe(self.floor_many.clone()))
                .bind(msgs.iter().map(|m| m.id.as_uuid()).collect::<Vec<_>>())
                .bind(msgs.iter().map(|m| m.topic.clone()).collect::<Vec<_>>())
                .bind(col(&|m| m.key.clone()))
                .bind(msgs.iter().map(|m| m.payload.to_vec()).collect::<Vec<_>>())
                .bind(msgs.iter().map(headers).collect::<Vec<_>>())
                .bind(col(&|m| m.content_type.clone()))
                .bind(
                    msgs.iter()
                        .map(|m| m.message_type.as_str().to_owned())
                        .collect::<Vec<_>>(),
                )
                .bind(col(&|m| m.correlation_id.clone()))
                .bind(col(&|m| m.reply_to.clone()))
                .bind(msgs.iter().map(|m| m.created_at).collect::<Vec<_>>())
                .bind(msgs.iter().map(|m| m.deliver_after).collect::<Vec<_>>())
                .bind(col(&|m| m.trace.traceparent.clone()))
                .bind(col(&|m| m.trace.tracestate.clone()))
                .bind(col(&|m| m.trace.baggage.clone()))
                .bind(msgs.iter().map(shard).collect::<Vec<_>>())
        };
        q.execute(conn)
            .await
            .map_err(outbox_postgres::parse_error)?;
        Ok(())
    }
}

#[async_trait]
impl Depositor for PgDeposit {
    async fn deposit(&self, variant: Variant, id: uuid::Uuid, msgs: &[Message]) -> Result<()> {
        let mut tx = self.store.begin().await?;
        sqlx::query(AssertSqlSafe(self.business.clone()))
            .bind(id)
            .bind(1999_i64)
            .execute(tx.conn())
            .await
            .map_err(outbox_postgres::parse_error)?;
        match variant {
            Variant::Alone => {}
            Variant::Lib => add(&mut tx, msgs).await?,
            Variant::Floor => self.floor(tx.conn(), msgs).await?,
        }
        tx.commit().await?;
        Ok(())
    }

    async fn cleanup(&self) -> Result<()> {
        drop_schema(&self.store, &self.schema).await
    }
}

// ---- DynamoDB -------------------------------------------------------------------------

struct DynamoDeposit {
    store: DynamoDbStore,
    /// The case's private server (see `DynamoBackend`), dropped with the case.
    _moto: Option<outbox_harness::Moto>,
    _logs: tempfile::TempDir,
    business: String,
    floor: String,
    floor_key: String,
}

impl DynamoDeposit {
    async fn new(ctx: &mut Ctx) -> Result<Self> {
        let prefix = format!("{}_", ctx.name("dep"));
        let logs = tempfile::tempdir()
            .map_err(|e| Error::unexpected("creating a temporary directory").with_source(e))?;
        let (moto, store) = dynamo_tables(&ctx.services.dynamodb, logs.path(), &prefix).await?;
        let business = format!("{prefix}orders");
        let floor = format!("{prefix}floor");
        let client = store.client();
        dynamo::create_simple_table(client, &business, "id").await?;
        let (outbox, _, _) = store.table_names();
        let floor_key = dynamo::copy_table(client, outbox, &floor).await?;
        Ok(DynamoDeposit {
            store,
            _moto: moto,
            _logs: logs,
            business,
            floor,
            floor_key,
        })
    }

    fn business_put(&self, id: uuid::Uuid) -> Result<Put> {
        Put::builder()
            .table_name(&self.business)
            .item("id", AttributeValue::S(id.to_string()))
            .item("total", AttributeValue::N("1999".into()))
            .condition_expression("attribute_not_exists(id)")
            .build()
            .map_err(|e| Error::invalid_input(e.to_string()))
    }
}

#[async_trait]
impl Depositor for DynamoDeposit {
    async fn deposit(&self, variant: Variant, id: uuid::Uuid, msgs: &[Message]) -> Result<()> {
        match variant {
            Variant::Alone | Variant::Lib => {
                let mut uow = self.store.begin().await?;
                uow.put(self.business_put(id)?);
                if variant == Variant::Lib {
                    add(&mut uow, msgs).await?;
                }
                uow.commit().await?;
            }
            Variant::Floor => {
                let mut req = self.store.client().transact_write_items().transact_items(
                    TransactWriteItem::builder()
                        .put(self.business_put(id)?)
                        .build(),
                );
                for m in msgs {
                    // The library's item for this message at a fresh slot of its partition
                    // (a writer of the floor table appends, as the library does).
                    static SLOT: std::sync::atomic::AtomicU64 =
                        std::sync::atomic::AtomicU64::new(1);
                    let mut item = self.store.message_item(m);
                    let slot = SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    item.insert("sk".into(), AttributeValue::N(slot.to_string()));
                    let put = Put::builder()
                        .table_name(&self.floor)
                        .set_item(Some(item))
                        .condition_expression("attribute_not_exists(#k)")
                        .expression_attribute_names("#k", &self.floor_key)
                        .build()
                        .map_err(|e| Error::invalid_input(e.to_string()))?;
                    req = req.transact_items(TransactWriteItem::builder().put(put).build());
                }
                req.send().await.map_err(outbox_dynamodb::parse_error)?;
            }
        }
        Ok(())
    }

    async fn cleanup(&self) -> Result<()> {
        dynamo::delete_tables(self.store.client(), &[&self.business, &self.floor]).await?;
        self.store.delete_tables().await
    }
}
