#![doc = include_str!("../README.md")]

mod codec;
mod config;
mod core;
mod error;
mod lock;
mod notify;
mod ops;
mod schema;
mod store;
mod tx;

#[doc(hidden)]
pub use codec::{MessageRow, decode_row};
pub use config::{
    DEFAULT_ACQUIRE_TIMEOUT, DEFAULT_INBOX_RETENTION, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_POOL_SIZE,
    DEFAULT_SCHEMA, DEFAULT_SHARD_COUNT, DEFAULT_TABLE_PREFIX, MAX_MESSAGE_SIZE_LIMIT, PgConfig,
    redact_url,
};
pub use core::LockClock;
pub use error::parse_error;
pub use lock::PgLock;
pub use schema::SCHEMA_VERSION;
pub use store::{PgStore, QueryPlan};
pub use tx::PgTx;

/// Re-exported so callers use the same sqlx version for [`PgTx::conn`] and the `*_in`
/// methods of [`PgStore`].
pub use sqlx;
