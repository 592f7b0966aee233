//! The workspace conformance suite against `SqliteStore`, in two configurations:
//! the defaults (WAL, `synchronous=FULL`, 4 connections, 10 MiB messages) and a rollback
//! journal with `synchronous=NORMAL`, 2 connections, a 64 KiB limit and a custom prefix.
//! Every case gets its own database file.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use outbox_conformance::{BusinessRecords, Fixture, SetupContext};
use outbox_core::{Error, Result, async_trait};
use outbox_sqlite::{JournalMode, SqliteConfig, SqliteStore, SqliteTx, Synchronous};

/// The caller's own rows: a `records` table written through `SqliteTx::execute`.
struct Records(SqliteStore);

#[async_trait]
impl BusinessRecords<SqliteTx> for Records {
    async fn write(&self, tx: &mut SqliteTx, key: &str) -> Result<()> {
        let key = key.to_owned();
        tx.execute(move |c| c.execute("INSERT INTO records (key) VALUES (?1)", [key]))
            .await?;
        Ok(())
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let store = self.0.clone();
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            let conn = store.open_connection()?;
            conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM records WHERE key = ?1)",
                [key],
                |r| r.get(0),
            )
            .map_err(outbox_sqlite::parse_error)
        })
        .await
        .map_err(|e| Error::unexpected("records.exists task failed").with_source(e))?
    }
}

async fn fixture(
    ctx: SetupContext,
    config: SqliteConfig,
    dir: tempfile::TempDir,
) -> Result<Fixture<SqliteStore>> {
    let store = SqliteStore::connect(
        config
            .with_clock(ctx.shared_clock())
            .with_inbox_retention(Duration::from_secs(3600)),
    )
    .await?;
    store.migrate().await?;
    let s = store.clone();
    tokio::task::spawn_blocking(move || {
        s.open_connection()?
            .execute_batch("CREATE TABLE records (key TEXT PRIMARY KEY NOT NULL)")
            .map_err(outbox_sqlite::parse_error)
    })
    .await
    .map_err(|e| Error::unexpected("creating the records table failed").with_source(e))??;
    Ok(Fixture {
        outbox: Arc::new(store.clone()),
        inbox: Arc::new(store.clone()),
        lock: Arc::new(store.lock()),
        tx_store: Arc::new(store.clone()),
        records: Arc::new(Records(store)),
        clock: ctx.clock,
        keep_alive: vec![Box::new(dir)],
    })
}

fn temp_file(ctx: &SetupContext) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{}.db", ctx.name));
    (dir, path)
}

/// Defaults.
async fn setup(ctx: SetupContext) -> Result<Fixture<SqliteStore>> {
    let (dir, path) = temp_file(&ctx);
    fixture(ctx, SqliteConfig::new(path), dir).await
}

/// Rollback journal, `synchronous=NORMAL`, a small pool, a size limit and another prefix.
async fn setup_rollback_journal(ctx: SetupContext) -> Result<Fixture<SqliteStore>> {
    let (dir, path) = temp_file(&ctx);
    let config = SqliteConfig::new(path)
        .with_journal_mode(JournalMode::Delete)
        .with_synchronous(Synchronous::Normal)
        .with_pool_size(2)
        .with_max_message_size(64 * 1024)
        .with_table_prefix("app_outbox_");
    fixture(ctx, config, dir).await
}

fn main() -> std::process::ExitCode {
    outbox_conformance::Suite::new()
        .backend("", setup)
        .backend("rollback_journal", setup_rollback_journal)
        .run()
}
