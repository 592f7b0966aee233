//! Producer and consumer layers the scenarios put around the library's own: a publish
//! latency, confirm timestamps, delivery counts. Each forwards every trait method.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::{Consumer, Delivery, Message, MessageId, Producer, Result};

/// Adds a fixed latency in front of a real producer, as a broker round trip would.
///
/// `send` waits `delay` then sends. `send_batch` and `send_ordered` wait `delay` **once per
/// call**, then forward the whole slice: they stand for pipelined publishes, whose round
/// trips overlap on a real network, so a pipelined call costs one round trip, not one per
/// message. A relay that publishes one message per call therefore pays 5 ms per message; a
/// relay that pipelines a key's chain pays it once per chain.
#[derive(Debug)]
pub struct DelayProducer {
    inner: Arc<dyn Producer>,
    delay: Duration,
}

impl DelayProducer {
    /// `inner` behind `delay`.
    pub fn new(inner: Arc<dyn Producer>, delay: Duration) -> Self {
        DelayProducer { inner, delay }
    }
}

#[async_trait]
impl Producer for DelayProducer {
    async fn send(&self, message: &Message) -> Result<()> {
        tokio::time::sleep(self.delay).await;
        self.inner.send(message).await
    }

    async fn send_batch(&self, messages: &[Message]) -> Vec<Result<()>> {
        tokio::time::sleep(self.delay).await;
        self.inner.send_batch(messages).await
    }

    async fn send_ordered(&self, messages: &[Message]) -> Vec<Result<()>> {
        tokio::time::sleep(self.delay).await;
        self.inner.send_ordered(messages).await
    }

    fn delivery_timeout(&self) -> Option<Duration> {
        self.inner.delivery_timeout().map(|d| d + self.delay)
    }
}

/// Records when each message's publish was confirmed (when the call that sent it returned
/// `Ok` for it: the moment the relay learns of the confirm).
#[derive(Debug)]
pub struct ConfirmClock {
    inner: Arc<dyn Producer>,
    confirmed: Arc<Mutex<HashMap<MessageId, Instant>>>,
}

impl ConfirmClock {
    /// Record the confirms of `inner`.
    pub fn new(inner: Arc<dyn Producer>) -> Self {
        ConfirmClock {
            inner,
            confirmed: Arc::default(),
        }
    }

    /// The shared map of confirm times.
    pub fn confirms(&self) -> Arc<Mutex<HashMap<MessageId, Instant>>> {
        self.confirmed.clone()
    }

    fn record(&self, messages: &[Message], results: &[Result<()>]) {
        let now = Instant::now();
        let mut map = self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        for (m, r) in messages.iter().zip(results) {
            if r.is_ok() {
                map.entry(m.id).or_insert(now);
            }
        }
    }
}

#[async_trait]
impl Producer for ConfirmClock {
    async fn send(&self, message: &Message) -> Result<()> {
        let r = self.inner.send(message).await;
        if r.is_ok() {
            self.record(std::slice::from_ref(message), &[Ok(())]);
        }
        r
    }

    async fn send_batch(&self, messages: &[Message]) -> Vec<Result<()>> {
        let r = self.inner.send_batch(messages).await;
        self.record(messages, &r);
        r
    }

    async fn send_ordered(&self, messages: &[Message]) -> Vec<Result<()>> {
        let r = self.inner.send_ordered(messages).await;
        self.record(messages, &r);
        r
    }

    fn delivery_timeout(&self) -> Option<Duration> {
        self.inner.delivery_timeout()
    }
}

/// Counts acknowledged deliveries and notes when the first delivery arrived, so that a
/// consumer's rate excludes the broker's subscription set-up (a Kafka group join).
#[derive(Debug)]
pub struct CountingConsumer<C> {
    inner: C,
    first: Mutex<Option<Instant>>,
    acked: AtomicU64,
}

impl<C: Consumer> CountingConsumer<C> {
    /// Count the deliveries of `inner`.
    pub fn new(inner: C) -> Self {
        CountingConsumer {
            inner,
            first: Mutex::new(None),
            acked: AtomicU64::new(0),
        }
    }

    /// Deliveries acked so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(AtomicOrdering::Relaxed)
    }

    /// When the first delivery was received.
    pub fn first_received(&self) -> Option<Instant> {
        *self.first.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start counting again (between runs on the same consumer).
    pub fn reset(&self) {
        *self.first.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.acked.store(0, AtomicOrdering::Relaxed);
    }
}

#[async_trait]
impl<C: Consumer> Consumer for CountingConsumer<C> {
    async fn receive(&self) -> Result<Option<Delivery>> {
        let d = self.inner.receive().await;
        if let Ok(Some(_)) = &d {
            self.first
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(Instant::now);
        }
        d
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        self.inner.ack(delivery).await?;
        self.acked.fetch_add(1, AtomicOrdering::Relaxed);
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery) -> Result<()> {
        self.inner.nack(delivery).await
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()> {
        self.inner.dead_letter(delivery, reason).await
    }
}
