#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
//!
//! Everything in [`outbox_core`] is re-exported at the root; each backend is a module behind
//! its cargo feature.

pub use outbox_core::*;

/// DynamoDB storage (feature `dynamodb`): outbox, inbox, lock and unit of work.
#[cfg(feature = "dynamodb")]
#[cfg_attr(docsrs, doc(cfg(feature = "dynamodb")))]
pub use outbox_dynamodb as dynamodb;

/// PostgreSQL storage (feature `postgres`): outbox, inbox, lock and migrations on sqlx.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use outbox_postgres as postgres;

/// SQLite storage (feature `sqlite`): outbox, inbox and lock on an embedded SQLite file.
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use outbox_sqlite as sqlite;

/// RabbitMQ transport (feature `rabbitmq`): publisher-confirmed producer, inbox-guarded consumer.
#[cfg(feature = "rabbitmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
pub use outbox_rabbitmq as rabbitmq;

/// Kafka transport (feature `kafka`): idempotent `acks=all` producer, group consumer with
/// manual commits and a dead-letter topic.
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use outbox_kafka as kafka;
