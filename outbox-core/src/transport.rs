//! The producer and consumer contract that broker transports implement.

use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::message::Message;

/// Publishes messages to a broker.
#[async_trait]
pub trait Producer: Send + Sync + std::fmt::Debug {
    /// Publish one message.
    ///
    /// # Behavior
    /// - Returns `Ok` only after the broker confirmed the message durably (Kafka `acks=all`,
    ///   RabbitMQ publisher confirm). A message for which `Ok` was returned is never lost by
    ///   the transport.
    /// - Id, topic, key, payload, headers, content type, message type, correlation id,
    ///   reply-to, creation time and trace context reach the consumer unchanged.
    /// - Errors are classified: `is_retryable()` for broker unavailable, timeouts, full queues;
    ///   permanent for a message the broker can never accept (too large, unroutable).
    async fn send(&self, message: &Message) -> Result<()>;

    /// Publish several messages, keeping many in flight; one result per message, in order.
    ///
    /// # Behavior
    /// Each result means the same as [`send`](Self::send) for that message. No ordering is
    /// implied between messages of the batch: callers that need per-key order send a key's
    /// messages one after another.
    async fn send_batch(&self, messages: &[Message]) -> Vec<Result<()>> {
        futures::future::join_all(messages.iter().map(|m| self.send(m))).await
    }

    /// Publish the messages of one key in the given order, keeping several in flight where the
    /// transport preserves their order (one Kafka partition with the idempotent producer; one
    /// AMQP channel); stop at the first failure.
    ///
    /// # Behavior
    /// - Returns one result per message *attempted*, in order: every result but the last is
    ///   `Ok`; if the last is `Err`, the messages after it were not confirmed and the caller
    ///   must treat them as not sent (they are published again later, after the failed one).
    ///   `results.len() < messages.len()` only after an `Err`.
    /// - Each `Ok` means the same as [`send`](Self::send): durably confirmed.
    /// - The broker receives the confirmed prefix in slice order. Messages after a failure
    ///   that were already handed to the broker may still arrive there; each transport
    ///   documents when that can happen.
    /// - An empty slice returns an empty vector.
    ///
    /// The default sends one message at a time (stop-and-wait), which keeps order on any
    /// transport.
    async fn send_ordered(&self, messages: &[Message]) -> Vec<Result<()>> {
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            let r = self.send(m).await;
            let failed = r.is_err();
            out.push(r);
            if failed {
                break;
            }
        }
        out
    }

    /// The longest an unconfirmed send can stay pending inside the transport before it is
    /// abandoned for good, after which it can no longer reach the broker (Kafka:
    /// `message.timeout.ms`; RabbitMQ: the confirm timeout, after which the channel is closed).
    ///
    /// # Behavior
    /// `None` when the transport does not bound it. The relay refuses a producer whose bound
    /// exceeds its `publish_timeout`, so that no send abandoned by the relay can land after
    /// the relay's shard lease expired.
    fn delivery_timeout(&self) -> Option<Duration> {
        None
    }
}

/// One message received from a broker, to be acked, nacked or dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The message as published.
    pub message: Message,
    /// Which delivery of this message this is, starting at 1 (redeliveries count up).
    pub attempt: u32,
    /// Transport-specific handle identifying the delivery for ack/nack.
    pub tag: u64,
}

/// Receives messages from a broker.
#[async_trait]
pub trait Consumer: Send + Sync + std::fmt::Debug {
    /// Wait for the next delivery.
    ///
    /// # Behavior
    /// `Ok(None)` once the consumer is closed and drained. A message that is neither acked nor
    /// dead-lettered is delivered again (after a nack, a restart or a rebalance). After a nack
    /// its `attempt` is greater; after a restart or rebalance it is greater where the broker
    /// counts deliveries (RabbitMQ quorum queues), and may start again at 1 where it does not
    /// (Kafka): each transport documents which.
    async fn receive(&self) -> Result<Option<Delivery>>;

    /// Confirm the delivery was handled; it is not delivered again.
    ///
    /// # Behavior
    /// Call only after the handler's effects (and its inbox entry) are committed.
    async fn ack(&self, delivery: &Delivery) -> Result<()>;

    /// Reject the delivery so it is delivered again.
    ///
    /// # Behavior
    /// The message is redelivered with `attempt + 1`; order relative to later messages of the
    /// same key is kept where the broker can keep it.
    async fn nack(&self, delivery: &Delivery) -> Result<()>;

    /// Move the message to the dead-letter destination with `reason`; it is not delivered again.
    ///
    /// # Behavior
    /// The dead-lettered message keeps its id and headers and records the reason.
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()>;
}
