//! The workspace conformance suite against `PgStore` on the real server
//! (`OUTBOX_TEST_POSTGRES_URL`), in two configurations: the defaults (schema per case, leases on
//! the store clock so the suite can move time), and a custom prefix with a 64 KiB limit and
//! `NOTIFY` on. Every case gets its own schema, dropped afterwards.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use outbox_conformance::{BusinessRecords, Fixture, SetupContext};
use outbox_core::{Result, async_trait};
use outbox_postgres::{LockClock, PgConfig, PgStore, PgTx, parse_error};

/// The caller's own rows: a `records` table in the case's schema, written on the
/// transaction's connection.
struct Records {
    store: PgStore,
    table: String,
}

#[async_trait]
impl BusinessRecords<PgTx> for Records {
    async fn write(&self, tx: &mut PgTx, key: &str) -> Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} (key) VALUES ($1)",
            self.table
        )))
        .bind(key)
        .execute(tx.conn())
        .await
        .map_err(parse_error)?;
        Ok(())
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE key = $1)",
            self.table
        )))
        .bind(key)
        .fetch_one(self.store.pool())
        .await
        .map_err(parse_error)
    }
}

async fn fixture(ctx: SetupContext, config: PgConfig) -> Result<Fixture<PgStore>> {
    let url = common::url()?;
    let schema = common::schema_name(&ctx.name);
    let guard = common::DropSchema {
        url: url.clone(),
        schema: schema.clone(),
    };
    let store = PgStore::connect(
        &url,
        config
            .with_schema(&schema)
            .with_clock(ctx.shared_clock())
            .with_lock_clock(LockClock::Store)
            .with_inbox_retention(Duration::from_secs(3600))
            .with_pool_size(8)
            .with_acquire_timeout(Duration::from_secs(60)),
    )
    .await?;
    store.migrate().await?;
    let table = format!("\"{schema}\".records");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (key text PRIMARY KEY)"
    )))
    .execute(store.pool())
    .await
    .map_err(parse_error)?;
    Ok(Fixture {
        outbox: Arc::new(store.clone()),
        inbox: Arc::new(store.clone()),
        lock: Arc::new(store.lock()),
        tx_store: Arc::new(store.clone()),
        records: Arc::new(Records {
            store: store.clone(),
            table,
        }),
        clock: ctx.clock,
        // Dropped after the case: the store (closing nothing: the pool closes when the last
        // clone goes), then the schema.
        keep_alive: vec![Box::new(guard)],
    })
}

/// Defaults.
async fn setup(ctx: SetupContext) -> Result<Fixture<PgStore>> {
    fixture(ctx, PgConfig::new()).await
}

/// Another prefix, a 64 KiB size limit, and `NOTIFY` in every add.
async fn setup_custom(ctx: SetupContext) -> Result<Fixture<PgStore>> {
    let config = PgConfig::new()
        .with_table_prefix("app_outbox_")
        .with_max_message_size(64 * 1024)
        .with_shard_count(7)
        .with_notify(true);
    fixture(ctx, config).await
}

fn main() -> std::process::ExitCode {
    outbox_conformance::Suite::new()
        .backend("", setup)
        .backend("custom", setup_custom)
        .run()
}
