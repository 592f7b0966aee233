//! Opening SQLite stores: the one place that knows the `outbox-sqlite` configuration.

use std::path::Path;

use clap::ValueEnum;
use outbox_sqlite::{SqliteConfig, SqliteStore, Synchronous};

use crate::util::CliResult;

/// SQLite durability (`PRAGMA synchronous`) in WAL mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Durability {
    /// `synchronous=FULL`: every commit is fsynced; survives power loss.
    Full,
    /// `synchronous=NORMAL`: commits survive a process crash; the last ones may roll back on
    /// power loss or an OS crash.
    Normal,
}

impl Durability {
    /// How the durability mode is described in output.
    pub fn describe(self) -> &'static str {
        match self {
            Durability::Full => {
                "WAL, synchronous=FULL: every commit is fsynced (survives power loss)"
            }
            Durability::Normal => {
                "WAL, synchronous=NORMAL: commits survive a process crash; \
                 the last ones may roll back on power loss"
            }
        }
    }
}

/// Open (creating if needed) the SQLite store at `path`.
pub async fn open(
    path: &Path,
    prefix: Option<&str>,
    durability: Durability,
) -> CliResult<SqliteStore> {
    let mut config = SqliteConfig::new(path).with_synchronous(match durability {
        Durability::Full => Synchronous::Full,
        Durability::Normal => Synchronous::Normal,
    });
    if let Some(prefix) = prefix {
        config = config.with_table_prefix(prefix);
    }
    let store = SqliteStore::connect(config).await?;
    store.migrate().await?;
    Ok(store)
}
