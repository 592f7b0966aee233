#![doc = include_str!("../README.md")]

mod codec;
mod config;
mod core;
mod error;
mod lock;
mod ops;
mod schema;
mod store;
mod tx;

#[doc(hidden)]
pub use codec::{MessageRow, decode_row};
pub use config::{
    DEFAULT_BUSY_TIMEOUT, DEFAULT_INBOX_RETENTION, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_POOL_SIZE,
    DEFAULT_SHARD_COUNT, DEFAULT_TABLE_PREFIX, JournalMode, MAX_MESSAGE_SIZE_LIMIT, MAX_POOL_SIZE,
    SqliteConfig, Synchronous,
};
pub use error::parse_error;
pub use lock::SqliteLock;
pub use schema::SCHEMA_VERSION;
pub use store::SqliteStore;
pub use tx::SqliteTx;

/// Re-exported so callers use the same rusqlite version for [`SqliteTx::execute`] and the
/// `*_in` methods of [`SqliteStore`].
pub use rusqlite;
