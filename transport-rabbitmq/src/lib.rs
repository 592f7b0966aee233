#![doc = include_str!("../README.md")]

mod codec;
mod conn;
mod consumer;
mod error;
mod producer;
mod topology;
mod url;

pub use codec::{
    CLOUD_EVENTS_PREFIX, HEADER_CONTENT_TYPE, HEADER_CORRELATION_ID, HEADER_CREATED_AT,
    HEADER_DEAD_LETTER_ATTEMPTS, HEADER_DEAD_LETTER_QUEUE, HEADER_DEAD_LETTER_REASON,
    HEADER_DEAD_LETTERED_AT, HEADER_DELIVER_AFTER, HEADER_DELIVERY_COUNT, HEADER_ESCAPED_HEADERS,
    HEADER_KEY, HEADER_REPLY_TO, HEADER_TOPIC, HEADER_TYPE, MAX_SHORT_STRING, TRACE_HEADERS,
};
#[doc(hidden)]
pub use codec::{decode as decode_properties, encode as encode_properties};
pub use conn::ConnectionConfig;
pub use consumer::{ConsumerConfig, DeadLetter, RabbitMqConsumer, fetch_dead_letters};
pub use producer::{
    DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_WINDOW, MAX_WINDOW, ProducerConfig, RabbitMqProducer, Route,
};
pub use topology::{ExchangeType, QueueType, Topology, declare_topology, delete_topology};
pub use url::AmqpUrl;
