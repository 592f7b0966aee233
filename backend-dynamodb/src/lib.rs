#![doc = include_str!("../README.md")]

mod codec;
mod config;
mod error;
mod lock;
mod meter;
mod schema;
mod store;
mod uow;

pub use codec::{ITEM_HEADROOM, MAX_ITEM_SIZE, PARKED_INDEX, PENDING_INDEX, item_size};
pub use config::{
    DEFAULT_DISPATCHED_TTL, DEFAULT_INBOX_RETENTION, DEFAULT_MAX_COMMIT_ATTEMPTS,
    DEFAULT_SHARD_COUNT, DynamoDbConfig, MAX_SHARD_COUNT, Sequencing,
};
pub use error::{CancellationReasons, parse_error};
pub use lock::DynamoDbLock;
pub use meter::{CostMeter, OpCost};
pub use store::{
    BATCH_GET_LIMIT, BATCH_WRITE_LIMIT, DynamoDbStore, MAX_MESSAGE_SIZE, local_client,
};
pub use uow::{DynamoDbUnitOfWork, MAX_TRANSACTION_ACTIONS, MAX_TRANSACTION_BYTES};

/// Re-exported so callers build their unit-of-work entries with the same SDK version.
pub use aws_sdk_dynamodb;
