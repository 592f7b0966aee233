#![doc = include_str!("../README.md")]

mod codec;
mod config;
mod core;
mod error;
mod inbox;
#[cfg(feature = "lambda")]
mod lambda;
mod lock;
mod meter;
mod outbox;
mod queue;
mod request;
mod schema;
mod store;
mod stream;
mod uow;

#[doc(hidden)]
pub use codec::decode as decode_item;
pub use codec::{
    ITEM_HEADROOM, MAX_ITEM_SIZE, MAX_MESSAGE_SIZE, MAX_SLOT, MAX_TRANSACTION_ACTIONS,
    MAX_TRANSACTION_BYTES, META_SLOT, item_size,
};
pub use config::{
    DEFAULT_CURSOR_PERSIST_INTERVAL, DEFAULT_DISPATCHED_TTL, DEFAULT_ID_GUARD_TTL,
    DEFAULT_INBOX_RETENTION, DEFAULT_MAX_COMMIT_ATTEMPTS, DEFAULT_SHARD_COUNT, DynamoDbConfig,
    MAX_SHARD_COUNT,
};
pub use core::{BATCH_GET_LIMIT, BATCH_WRITE_LIMIT, LOCATOR_CAPACITY};
pub use error::{CancellationReasons, parse_error};
#[cfg(feature = "lambda")]
pub use lambda::{handle_stream_event, run_lambda};
pub use lock::DynamoDbLock;
pub use meter::{CostMeter, OpCost, Units, read_units, write_units};
pub use store::{DynamoDbStore, local_client};
pub use stream::{StreamListener, local_streams_client, shards_in_keys};
pub use uow::DynamoDbTx;

/// Re-exported (feature `lambda`) so callers name the same event types.
#[cfg(feature = "lambda")]
pub use aws_lambda_events;
/// Re-exported so callers build their unit-of-work entries with the same SDK version.
pub use aws_sdk_dynamodb;
/// Re-exported so callers build the stream listener's client with the same SDK version.
pub use aws_sdk_dynamodbstreams;
