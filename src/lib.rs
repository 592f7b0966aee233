#![cfg_attr(feature = "sqlite", doc = include_str!("../README.md"))]
#![cfg_attr(
    not(feature = "sqlite"),
    doc = "Reliable messaging between services: transactional outbox, inbox, leases and relay. \
           Enable the `sqlite` feature (and later `postgres`, `dynamodb`, `kafka`, `rabbitmq`) \
           for storage backends and transports; see the README."
)]
//!
//! Everything in [`outbox_core`] is re-exported at the root; each backend is a module behind
//! its cargo feature.

pub use outbox_core::*;

/// DynamoDB storage (feature `dynamodb`): outbox, inbox, lock and unit of work.
#[cfg(feature = "dynamodb")]
pub use outbox_dynamodb as dynamodb;

/// PostgreSQL storage (feature `postgres`): outbox, inbox, lock and migrations on sqlx.
#[cfg(feature = "postgres")]
pub use outbox_postgres as postgres;

/// SQLite storage (feature `sqlite`): outbox, inbox and lock on an embedded SQLite file.
#[cfg(feature = "sqlite")]
pub use outbox_sqlite as sqlite;

/// RabbitMQ transport (feature `rabbitmq`): publisher-confirmed producer, inbox-guarded consumer.
#[cfg(feature = "rabbitmq")]
pub use outbox_rabbitmq as rabbitmq;

/// Kafka transport (feature `kafka`): idempotent `acks=all` producer, group consumer with
/// manual commits and a dead-letter topic.
#[cfg(feature = "kafka")]
pub use outbox_kafka as kafka;
