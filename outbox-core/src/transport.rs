//! The producer and consumer contract that broker transports implement.

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
