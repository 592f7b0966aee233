#![doc = include_str!("../README.md")]

mod config;
mod consumer;
mod error;
pub mod headers;
mod producer;

pub use config::{DEFAULT_SEND_QUEUE_TIMEOUT, ENV_PREFIX, KafkaConfig};
pub use consumer::{
    ConsumerOptions, DEFAULT_COMMIT_EVERY, DEFAULT_COMMIT_INTERVAL, DEFAULT_DLQ_SUFFIX, DeadLetter,
    KafkaConsumer, RecordPosition, decode_message,
};
pub use error::parse_error;
pub use producer::{DEFAULT_LINGER_MS, DEFAULT_MESSAGE_TIMEOUT, KafkaProducer, create_topics};

/// Re-exported so callers name the same rdkafka version.
pub use rdkafka;
