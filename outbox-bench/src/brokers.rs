//! The brokers under test: the library's producer and the raw client of each.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use outbox_core::memory::MemoryBroker;
use outbox_core::{Producer, Result};
use outbox_rabbitmq::Topology;

use crate::common::{
    Ctx, drop_topics, drop_topology, kafka_producer, kafka_topic, rabbit_producer, rabbit_topology,
};
use crate::raw::{RawKafka, RawRabbit};

/// Partitions of the Kafka topics this program creates.
pub const KAFKA_PARTITIONS: i32 = 8;

/// A broker: where the relay publishes, and the raw baseline.
#[async_trait]
pub trait Broker: Send + Sync {
    /// The library's producer.
    fn producer(&self) -> Arc<dyn Producer>;
    /// The topic messages of this pass go to.
    fn topic(&self) -> String;
    /// The exchange published to (RabbitMQ only).
    fn exchange(&self) -> Option<String> {
        None
    }
    /// Publish `n` messages from memory with the raw client; return when all are confirmed.
    async fn raw_publish(&self, n: usize, keys: usize, payload: &Bytes) -> Result<()>;
    /// Publish one message with the raw client and wait for its confirm; the time it took.
    async fn raw_publish_one(&self, payload: &Bytes) -> Result<std::time::Duration> {
        let start = std::time::Instant::now();
        self.raw_publish(1, 1, payload).await?;
        Ok(start.elapsed())
    }
    /// Start a new pass: empty what the last one left (queue, topic, memory).
    async fn next_pass(&mut self, ctx: &mut Ctx) -> Result<()>;
    /// Remove what was created.
    async fn cleanup(&self, ctx: &Ctx) -> Result<()>;
}

/// The in-memory broker (a new one per pass, so nothing accumulates).
pub struct Memory {
    broker: MemoryBroker,
    producer: Arc<dyn Producer>,
}

impl Memory {
    /// A new broker.
    pub fn new() -> Self {
        let broker = MemoryBroker::new();
        Memory {
            producer: Arc::new(broker.producer()),
            broker,
        }
    }
}

#[async_trait]
impl Broker for Memory {
    fn producer(&self) -> Arc<dyn Producer> {
        self.producer.clone()
    }

    fn topic(&self) -> String {
        "bench".to_owned()
    }

    async fn raw_publish(&self, n: usize, keys: usize, payload: &Bytes) -> Result<()> {
        let messages = crate::common::messages_with(&self.topic(), n, keys, payload)?;
        for r in self.broker.producer().send_batch(&messages).await {
            r?;
        }
        Ok(())
    }

    async fn next_pass(&mut self, _ctx: &mut Ctx) -> Result<()> {
        *self = Memory::new();
        Ok(())
    }

    async fn cleanup(&self, _ctx: &Ctx) -> Result<()> {
        Ok(())
    }
}

/// RabbitMQ: a topic exchange and quorum queue of this run; purged between passes.
pub struct Rabbit {
    topology: Topology,
    producer: Arc<dyn Producer>,
    raw: RawRabbit,
}

impl Rabbit {
    /// Declare the topology and connect both clients.
    pub async fn new(ctx: &mut Ctx) -> Result<Self> {
        let topology = rabbit_topology(ctx).await?;
        Ok(Rabbit {
            producer: rabbit_producer(ctx, &topology.exchange)?,
            raw: RawRabbit::connect(&ctx.services.rabbitmq, &topology.exchange).await?,
            topology,
        })
    }
}

#[async_trait]
impl Broker for Rabbit {
    fn producer(&self) -> Arc<dyn Producer> {
        self.producer.clone()
    }

    fn topic(&self) -> String {
        "bench.relay".to_owned()
    }

    fn exchange(&self) -> Option<String> {
        Some(self.topology.exchange.clone())
    }

    async fn raw_publish(&self, n: usize, keys: usize, payload: &Bytes) -> Result<()> {
        self.raw.publish(&self.topic(), n, keys, payload).await
    }

    async fn raw_publish_one(&self, payload: &Bytes) -> Result<std::time::Duration> {
        self.raw.publish_one(&self.topic(), payload).await
    }

    async fn next_pass(&mut self, _ctx: &mut Ctx) -> Result<()> {
        self.raw.purge(&self.topology.queue).await
    }

    async fn cleanup(&self, ctx: &Ctx) -> Result<()> {
        drop_topology(ctx, &self.topology).await
    }
}

/// Kafka: a new topic per pass (deleted after it), so the in-memory broker does not grow.
pub struct Kafka {
    producer: Arc<dyn Producer>,
    raw: RawKafka,
    topic: Option<String>,
}

impl Kafka {
    /// Both clients; the first topic comes with the first pass.
    pub fn new(ctx: &Ctx) -> Result<Self> {
        Ok(Kafka {
            producer: kafka_producer(ctx)?,
            raw: RawKafka::new(&ctx.services.kafka)?,
            topic: None,
        })
    }
}

#[async_trait]
impl Broker for Kafka {
    fn producer(&self) -> Arc<dyn Producer> {
        self.producer.clone()
    }

    fn topic(&self) -> String {
        self.topic.clone().unwrap_or_default()
    }

    async fn raw_publish(&self, n: usize, keys: usize, payload: &Bytes) -> Result<()> {
        self.raw.publish(&self.topic(), n, keys, payload).await
    }

    async fn raw_publish_one(&self, payload: &Bytes) -> Result<std::time::Duration> {
        self.raw.publish_one(&self.topic(), payload).await
    }

    async fn next_pass(&mut self, ctx: &mut Ctx) -> Result<()> {
        if let Some(old) = self.topic.take() {
            drop_topics(ctx, &[old]).await?;
        }
        self.topic = Some(kafka_topic(ctx, KAFKA_PARTITIONS).await?);
        Ok(())
    }

    async fn cleanup(&self, ctx: &Ctx) -> Result<()> {
        drop_topics(ctx, self.topic.as_slice()).await
    }
}
