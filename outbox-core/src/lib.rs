#![doc = include_str!("../README.md")]

mod clock;
mod error;
mod forward;
mod inbox;
mod lock;
mod message;
mod otel;
mod router;
mod store;
mod text;
mod transport;
mod tx;

pub mod cloudevents;
pub mod memory;
pub mod metrics;
pub mod processor;
pub mod relay;
pub mod rules;

pub use clock::{Clock, ManualClock, SharedClock, SystemClock, add_duration, truncate_micros};
pub use error::{Error, ErrorKind, Result};
pub use inbox::{InboxEntry, InboxStore, InsertOutcome, inbox_expiry};
pub use lock::{DistributedLock, Lease};
pub use message::{
    JSON_CONTENT_TYPE, Message, MessageBuilder, MessageId, MessageStatus, MessageType,
    StoredMessage, TYPE_NAME_HEADER, TypedMessage, is_json_content_type, shard_for,
};
pub use otel::TraceContext;
pub use processor::{
    DEFAULT_CONCURRENCY, DEFAULT_MAX_DELIVERIES, HandlerError, InboxProcessor, MessageHandler,
    ProcessOutcome, ProcessorHealth, ProcessorStats,
};
pub use relay::{
    OutageBackoff, Relay, RelayConfig, RelayHandle, RelayHealth, RetryPolicy, RunReport,
    shard_lease_name,
};
pub use router::{Router, TypedHandler, UnknownType};
pub use rules::MAX_FIELD_LEN;
pub use store::{
    Capabilities, FailedAttempt, FailureOutcome, ListQuery, Ordering, OutboxStats, OutboxStore,
    PendingQuery, RequeueFilter,
};
pub use transport::{Consumer, Delivery, Producer};
pub use tx::{AbortState, Committed, Transaction, TransactionalStore};

/// Re-exported so users and backends name the same versions.
pub use async_trait::async_trait;
pub use bytes::Bytes;
pub use chrono::{DateTime, Utc};
pub use tokio_util::sync::CancellationToken;
