//! [`MemoryBroker`]: an in-process message broker with a [`Producer`] and competing
//! [`Consumer`]s, for demos and tests of code that publishes or consumes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::error::{Error, ErrorKind, Result};
use crate::message::{Message, MessageId};
use crate::transport::{Consumer, Delivery, Producer};

/// An in-memory message broker: topics, subscriptions, acknowledgements, redelivery and
/// dead letters, with inspection and fault-injection helpers.
///
/// - [`producer`](Self::producer) gives a [`Producer`]: every sent message is appended to its
///   topic's log ([`published`](Self::published)) and enqueued to every subscription of the
///   topic. `send` returns once that happened, so a confirmed message is never lost.
/// - [`subscribe`](Self::subscribe) gives a [`Consumer`]. Consumers with the same
///   subscription name compete for one queue (each message goes to one of them); different
///   subscriptions each get every message. A new subscription (or a topic newly added to one)
///   starts with the topic's whole history, like a Kafka consumer group reading from the
///   earliest offset, so subscribing after publishing loses nothing.
/// - Un-acked deliveries are tracked; [`Consumer::nack`] puts the message back at the front of
///   the queue (keeping per-key order), [`Consumer::dead_letter`] moves it to the
///   subscription's [`dead_letters`](Self::dead_letters).
/// - Faults: [`set_available`](Self::set_available) makes `send` fail with a retryable
///   `Unavailable` error, [`redeliver_unacked`](Self::redeliver_unacked) simulates a consumer
///   crash, [`redeliver`](Self::redeliver) a duplicate delivery.
///
/// Clones share the same broker. Every method is safe to call concurrently.
///
/// ```
/// use outbox_core::{Consumer, Message, Producer, memory::MemoryBroker};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> outbox_core::Result<()> {
/// let broker = MemoryBroker::new();
/// let consumer = broker.subscribe("billing", &["orders"]);
/// broker.producer().send(&Message::builder("orders").payload("hi").build()?).await?;
///
/// let delivery = consumer.receive().await?.expect("a delivery");
/// assert_eq!(delivery.attempt, 1);
/// consumer.ack(&delivery).await?;
/// assert_eq!(broker.published("orders").len(), 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Mutex<BrokerState>>,
}

struct BrokerState {
    available: bool,
    closed: bool,
    max_message_size: Option<usize>,
    /// Last delivery tag handed out.
    last_tag: u64,
    /// Last publish position (orders the backlog replayed to new subscriptions).
    last_position: u64,
    /// Per topic, every confirmed message with its publish position.
    logs: HashMap<String, Vec<(u64, Message)>>,
    published_count: usize,
    subscriptions: HashMap<String, Subscription>,
}

struct Subscription {
    topics: BTreeSet<String>,
    /// Messages waiting to be delivered, front first.
    queue: VecDeque<Message>,
    /// Delivered, not yet acked, nacked or dead-lettered: tag -> message.
    in_flight: BTreeMap<u64, Message>,
    /// How many times each message was delivered in this subscription.
    deliveries: HashMap<MessageId, u32>,
    dead_letters: Vec<(Message, String)>,
    notify: Arc<Notify>,
}

impl Subscription {
    fn new() -> Self {
        Subscription {
            topics: BTreeSet::new(),
            queue: VecDeque::new(),
            in_flight: BTreeMap::new(),
            deliveries: HashMap::new(),
            dead_letters: Vec::new(),
            notify: Arc::new(Notify::new()),
        }
    }
}

impl MemoryBroker {
    /// An empty, available broker without a size limit.
    pub fn new() -> Self {
        MemoryBroker {
            inner: Arc::new(Mutex::new(BrokerState {
                available: true,
                closed: false,
                max_message_size: None,
                last_tag: 0,
                last_position: 0,
                logs: HashMap::new(),
                published_count: 0,
                subscriptions: HashMap::new(),
            })),
        }
    }

    /// Reject messages whose [`Message::encoded_size`] exceeds `limit` bytes with a permanent
    /// [`ErrorKind::PayloadTooLarge`] error, like a real broker's maximum message size.
    pub fn with_max_message_size(self, limit: usize) -> Self {
        self.lock().max_message_size = Some(limit);
        self
    }

    /// A producer publishing to this broker.
    pub fn producer(&self) -> MemoryProducer {
        MemoryProducer {
            broker: self.clone(),
        }
    }

    /// A consumer of `subscription`, which receives the messages of `topics`.
    ///
    /// Creates the subscription on first use, starting with the whole history of its topics.
    /// Subscribing again with the same name gives another competing consumer of the same
    /// queue; topics not yet part of the subscription are added (with their history).
    pub fn subscribe(&self, subscription: &str, topics: &[&str]) -> MemoryConsumer {
        let mut st = self.lock();
        let BrokerState {
            logs,
            subscriptions,
            ..
        } = &mut *st;
        let sub = subscriptions
            .entry(subscription.to_owned())
            .or_insert_with(Subscription::new);
        let mut backlog: Vec<&(u64, Message)> = Vec::new();
        for topic in topics {
            if sub.topics.insert((*topic).to_owned())
                && let Some(log) = logs.get(*topic)
            {
                backlog.extend(log.iter());
            }
        }
        backlog.sort_by_key(|(position, _)| *position);
        let had_backlog = !backlog.is_empty();
        sub.queue
            .extend(backlog.into_iter().map(|(_, message)| message.clone()));
        if had_backlog {
            sub.notify.notify_waiters();
        }
        MemoryConsumer {
            broker: self.clone(),
            subscription: subscription.to_owned(),
            notify: Arc::clone(&sub.notify),
        }
    }

    /// Make the broker reachable (`true`, the default) or not: while unavailable, `send` fails
    /// with a retryable [`ErrorKind::Unavailable`] error. Consumers are not affected.
    pub fn set_available(&self, available: bool) {
        self.lock().available = available;
    }

    /// Whether `send` currently succeeds (available and not closed).
    pub fn is_available(&self) -> bool {
        let st = self.lock();
        st.available && !st.closed
    }

    /// Shut the broker down: consumers return `Ok(None)` from `receive` once their queue is
    /// drained, and `send` fails with a retryable [`ErrorKind::Unavailable`] error.
    pub fn close(&self) {
        let st = {
            let mut st = self.lock();
            st.closed = true;
            st.subscriptions
                .values()
                .map(|s| Arc::clone(&s.notify))
                .collect::<Vec<_>>()
        };
        for notify in st {
            notify.notify_waiters();
        }
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Every message confirmed on `topic`, in publish order (duplicates included).
    pub fn published(&self, topic: &str) -> Vec<Message> {
        self.lock()
            .logs
            .get(topic)
            .map(|log| log.iter().map(|(_, m)| m.clone()).collect())
            .unwrap_or_default()
    }

    /// Number of messages confirmed on all topics (duplicates included).
    pub fn published_count(&self) -> usize {
        self.lock().published_count
    }

    /// The messages dead-lettered in `subscription`, with their reasons, oldest first.
    pub fn dead_letters(&self, subscription: &str) -> Vec<(Message, String)> {
        self.lock()
            .subscriptions
            .get(subscription)
            .map(|s| s.dead_letters.clone())
            .unwrap_or_default()
    }

    /// Number of messages waiting in `subscription`'s queue (not delivered yet).
    pub fn queued(&self, subscription: &str) -> usize {
        self.lock()
            .subscriptions
            .get(subscription)
            .map_or(0, |s| s.queue.len())
    }

    /// Number of deliveries of `subscription` neither acked, nacked nor dead-lettered.
    pub fn unacked(&self, subscription: &str) -> usize {
        self.lock()
            .subscriptions
            .get(subscription)
            .map_or(0, |s| s.in_flight.len())
    }

    /// Simulate a consumer crash: every un-acked delivery of `subscription` goes back to the
    /// front of its queue, in original delivery order, to be delivered again with a greater
    /// `attempt`. Acking one of the old deliveries afterwards fails with `NotFound`.
    /// Returns how many deliveries were put back.
    pub fn redeliver_unacked(&self, subscription: &str) -> usize {
        let mut st = self.lock();
        let Some(sub) = st.subscriptions.get_mut(subscription) else {
            return 0;
        };
        let in_flight = std::mem::take(&mut sub.in_flight);
        let count = in_flight.len();
        for (_, message) in in_flight.into_iter().rev() {
            sub.queue.push_front(message);
        }
        if count > 0 {
            sub.notify.notify_waiters();
        }
        count
    }

    /// Simulate a duplicate delivery by the broker: enqueue another copy of the message
    /// `message_id`, already delivered in `subscription`, at the back of its queue. It is
    /// delivered with a greater `attempt`; an inbox in front of the handler suppresses it.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] if the subscription does not exist or the message was never
    /// delivered in it.
    pub fn redeliver(&self, subscription: &str, message_id: MessageId) -> Result<()> {
        let mut st = self.lock();
        let BrokerState {
            logs,
            subscriptions,
            ..
        } = &mut *st;
        let sub = subscriptions.get_mut(subscription).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("memory broker has no subscription {subscription:?}"),
            )
        })?;
        let not_delivered = || {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "message {message_id} was never delivered in subscription {subscription:?}"
                ),
            )
        };
        if !sub.deliveries.contains_key(&message_id) {
            return Err(not_delivered());
        }
        let message = sub
            .topics
            .iter()
            .filter_map(|t| logs.get(t))
            .find_map(|log| {
                log.iter()
                    .rev()
                    .find(|(_, m)| m.id == message_id)
                    .map(|(_, m)| m.clone())
            })
            .ok_or_else(not_delivered)?;
        sub.queue.push_back(message);
        sub.notify.notify_waiters();
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, BrokerState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, message: &Message) -> Result<()> {
        message.validate()?;
        let mut st = self.lock();
        if let Some(limit) = st.max_message_size {
            let size = message.encoded_size();
            if size > limit {
                return Err(Error::payload_too_large(size, limit));
            }
        }
        if st.closed {
            return Err(Error::unavailable("memory broker is closed"));
        }
        if !st.available {
            return Err(Error::unavailable(
                "memory broker is unavailable (set_available(false))",
            ));
        }
        st.last_position += 1;
        let position = st.last_position;
        st.published_count += 1;
        st.logs
            .entry(message.topic.clone())
            .or_default()
            .push((position, message.clone()));
        for sub in st.subscriptions.values_mut() {
            if sub.topics.contains(&message.topic) {
                sub.queue.push_back(message.clone());
                sub.notify.notify_waiters();
            }
        }
        Ok(())
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("MemoryBroker")
            .field("available", &st.available)
            .field("closed", &st.closed)
            .field("max_message_size", &st.max_message_size)
            .field("topics", &st.logs.len())
            .field("published", &st.published_count)
            .field("subscriptions", &st.subscriptions.len())
            .finish()
    }
}

/// The [`Producer`] of a [`MemoryBroker`] (see [`MemoryBroker::producer`]).
#[derive(Debug, Clone)]
pub struct MemoryProducer {
    broker: MemoryBroker,
}

#[async_trait]
impl Producer for MemoryProducer {
    /// Append to the topic's log and enqueue to its subscriptions.
    ///
    /// # Errors
    /// Retryable [`ErrorKind::Unavailable`] while the broker is unavailable or closed;
    /// permanent [`ErrorKind::PayloadTooLarge`] over the broker's size limit; permanent
    /// [`ErrorKind::InvalidInput`] for an invalid message (empty topic, ...).
    async fn send(&self, message: &Message) -> Result<()> {
        self.broker.publish(message)
    }
}

/// A [`Consumer`] of one subscription of a [`MemoryBroker`] (see [`MemoryBroker::subscribe`]).
///
/// Clones are further competing consumers of the same subscription.
#[derive(Clone)]
pub struct MemoryConsumer {
    broker: MemoryBroker,
    subscription: String,
    notify: Arc<Notify>,
}

impl MemoryConsumer {
    /// The subscription this consumer reads.
    pub fn subscription(&self) -> &str {
        &self.subscription
    }

    /// Remove the in-flight delivery `d` and apply `f` to the subscription and its message.
    fn settle(
        &self,
        d: &Delivery,
        what: &str,
        f: impl FnOnce(&mut Subscription, Message),
    ) -> Result<()> {
        let mut st = self.broker.lock();
        let sub = st
            .subscriptions
            .get_mut(&self.subscription)
            .ok_or_else(|| self.unknown(d, what))?;
        let message = sub
            .in_flight
            .remove(&d.tag)
            .ok_or_else(|| self.unknown(d, what))?;
        f(sub, message);
        Ok(())
    }

    fn unknown(&self, d: &Delivery, what: &str) -> Error {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "cannot {what} delivery tag {} (message {}) in subscription {:?}: not an \
                 outstanding delivery (already settled, redelivered, or from another subscription)",
                d.tag, d.message.id, self.subscription
            ),
        )
    }
}

impl fmt::Debug for MemoryConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryConsumer")
            .field("subscription", &self.subscription)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn receive(&self) -> Result<Option<Delivery>> {
        loop {
            // Register interest before looking, so a publish in between is not missed.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.broker.lock();
                let BrokerState {
                    subscriptions,
                    last_tag,
                    closed,
                    ..
                } = &mut *st;
                let sub = subscriptions.get_mut(&self.subscription).ok_or_else(|| {
                    Error::unexpected(format!(
                        "memory broker lost subscription {:?}",
                        self.subscription
                    ))
                })?;
                if let Some(message) = sub.queue.pop_front() {
                    *last_tag += 1;
                    let tag = *last_tag;
                    let count = sub.deliveries.entry(message.id).or_insert(0);
                    *count = count.saturating_add(1);
                    let attempt = *count;
                    sub.in_flight.insert(tag, message.clone());
                    return Ok(Some(Delivery {
                        message,
                        attempt,
                        tag,
                    }));
                }
                if *closed {
                    return Ok(None);
                }
            }
            notified.await;
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        self.settle(delivery, "ack", |_, _| {})
    }

    /// Put the message back at the front of the queue; it is delivered next, with
    /// `attempt + 1`.
    async fn nack(&self, delivery: &Delivery) -> Result<()> {
        self.settle(delivery, "nack", |sub, message| {
            sub.queue.push_front(message);
            sub.notify.notify_waiters();
        })
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()> {
        self.settle(delivery, "dead-letter", |sub, message| {
            sub.dead_letters.push((message, reason.to_owned()));
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use std::time::Duration;

    use super::*;

    fn msg(topic: &str, key: &str) -> Message {
        Message::builder(topic)
            .key(key)
            .payload("p")
            .build()
            .unwrap()
    }

    async fn recv(c: &MemoryConsumer) -> Delivery {
        tokio::time::timeout(Duration::from_secs(5), c.receive())
            .await
            .expect("a delivery within 5s")
            .unwrap()
            .expect("not closed")
    }

    #[tokio::test]
    async fn competing_consumers_and_fan_out() {
        let broker = MemoryBroker::new();
        let a1 = broker.subscribe("a", &["t"]);
        let a2 = broker.subscribe("a", &["t"]);
        let b = broker.subscribe("b", &["t", "u"]);
        let p = broker.producer();
        let sent: Vec<Message> = (0..4).map(|i| msg("t", &format!("k{i}"))).collect();
        for m in &sent {
            p.send(m).await.unwrap();
        }
        p.send(&msg("u", "x")).await.unwrap();

        let mut got_a = Vec::new();
        for c in [&a1, &a2, &a1, &a2] {
            let d = recv(c).await;
            c.ack(&d).await.unwrap();
            got_a.push(d.message.id);
        }
        assert_eq!(got_a, sent.iter().map(|m| m.id).collect::<Vec<_>>());
        assert_eq!(broker.queued("a"), 0);

        let mut got_b = Vec::new();
        for _ in 0..5 {
            let d = recv(&b).await;
            b.ack(&d).await.unwrap();
            got_b.push(d.message.topic);
        }
        assert_eq!(got_b, ["t", "t", "t", "t", "u"]);
        assert_eq!(broker.published("t").len(), 4);
        assert_eq!(broker.published_count(), 5);
    }

    #[tokio::test]
    async fn late_subscription_gets_history() {
        let broker = MemoryBroker::new();
        let m1 = msg("t", "k");
        let m2 = msg("u", "k");
        broker.producer().send(&m1).await.unwrap();
        broker.producer().send(&m2).await.unwrap();
        let c = broker.subscribe("late", &["u", "t"]);
        assert_eq!(recv(&c).await.message, m1);
        assert_eq!(recv(&c).await.message, m2);
    }

    #[tokio::test]
    async fn nack_redelivers_first_with_next_attempt() {
        let broker = MemoryBroker::new();
        let c = broker.subscribe("s", &["t"]);
        let (m1, m2) = (msg("t", "k"), msg("t", "k"));
        broker.producer().send(&m1).await.unwrap();
        broker.producer().send(&m2).await.unwrap();

        let d = recv(&c).await;
        assert_eq!((d.message.id, d.attempt), (m1.id, 1));
        c.nack(&d).await.unwrap();
        assert_eq!(c.ack(&d).await.unwrap_err().kind(), ErrorKind::NotFound);
        let d2 = recv(&c).await;
        assert_eq!((d2.message.id, d2.attempt), (m1.id, 2));
        assert_ne!(d2.tag, d.tag);
        c.ack(&d2).await.unwrap();
        let d3 = recv(&c).await;
        assert_eq!((d3.message.id, d3.attempt), (m2.id, 1));
    }

    #[tokio::test]
    async fn crash_redelivers_unacked_in_order() {
        let broker = MemoryBroker::new();
        let c = broker.subscribe("s", &["t"]);
        let ms: Vec<Message> = (0..3).map(|_| msg("t", "k")).collect();
        for m in &ms {
            broker.producer().send(m).await.unwrap();
        }
        let d1 = recv(&c).await;
        let d2 = recv(&c).await;
        assert_eq!(broker.unacked("s"), 2);
        assert_eq!(broker.redeliver_unacked("s"), 2);
        assert_eq!(c.ack(&d1).await.unwrap_err().kind(), ErrorKind::NotFound);
        let got: Vec<(MessageId, u32)> = [recv(&c).await, recv(&c).await, recv(&c).await]
            .iter()
            .map(|d| (d.message.id, d.attempt))
            .collect();
        assert_eq!(got, vec![(ms[0].id, 2), (ms[1].id, 2), (ms[2].id, 1)]);
        assert_eq!(d2.attempt, 1);
    }

    #[tokio::test]
    async fn dead_letter_and_duplicate_delivery() {
        let broker = MemoryBroker::new();
        let c = broker.subscribe("s", &["t"]);
        let other = broker.subscribe("other", &["t"]);
        let (m1, m2) = (msg("t", "a"), msg("t", "b"));
        broker.producer().send(&m1).await.unwrap();
        broker.producer().send(&m2).await.unwrap();

        let d = recv(&c).await;
        assert_eq!(
            other.ack(&d).await.unwrap_err().kind(),
            ErrorKind::NotFound,
            "a tag of another subscription"
        );
        c.dead_letter(&d, "poison").await.unwrap();
        assert_eq!(
            broker.dead_letters("s"),
            vec![(m1.clone(), "poison".to_owned())]
        );
        assert!(broker.dead_letters("other").is_empty());

        let d = recv(&c).await;
        assert_eq!(d.message.id, m2.id);
        c.ack(&d).await.unwrap();
        broker.redeliver("s", m2.id).unwrap();
        let dup = recv(&c).await;
        assert_eq!((dup.message.id, dup.attempt), (m2.id, 2));
        assert_eq!(
            broker.redeliver("s", MessageId::new()).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            broker.redeliver("nope", m2.id).unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }

    #[tokio::test]
    async fn receive_waits_for_publish_and_close() {
        let broker = MemoryBroker::new();
        let c = broker.subscribe("s", &["t"]);
        let waiting = {
            let c = c.clone();
            tokio::spawn(async move { c.receive().await })
        };
        tokio::task::yield_now().await;
        let m = msg("t", "k");
        broker.producer().send(&m).await.unwrap();
        let d = waiting.await.unwrap().unwrap().unwrap();
        assert_eq!(d.message, m);

        let waiting = {
            let c = c.clone();
            tokio::spawn(async move { c.receive().await })
        };
        tokio::task::yield_now().await;
        broker.producer().send(&msg("t", "k")).await.unwrap();
        broker.close();
        // The queued message is drained first, then the consumer reports closed.
        assert!(waiting.await.unwrap().unwrap().is_some());
        assert!(c.receive().await.unwrap().is_none());
        let e = broker.producer().send(&m).await.unwrap_err();
        assert!(e.is_retryable());
    }

    #[tokio::test]
    async fn close_wakes_idle_consumers() {
        let broker = MemoryBroker::new();
        let c = broker.subscribe("s", &["t"]);
        let waiting = tokio::spawn(async move { c.receive().await });
        tokio::task::yield_now().await;
        broker.close();
        let got = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken by close")
            .unwrap()
            .unwrap();
        assert!(got.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn competing_consumers_share_every_message_exactly_once() {
        let broker = MemoryBroker::new();
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let c = broker.subscribe("s", &["t"]);
                tokio::spawn(async move {
                    let mut ids = Vec::new();
                    while let Some(d) = c.receive().await.unwrap() {
                        c.ack(&d).await.unwrap();
                        ids.push(d.message.id);
                    }
                    ids
                })
            })
            .collect();
        let p = broker.producer();
        let mut sent = std::collections::HashSet::new();
        for i in 0..1000 {
            let m = msg("t", &format!("k{i}"));
            sent.insert(m.id);
            p.send(&m).await.unwrap();
            if i % 100 == 0 {
                tokio::task::yield_now().await;
            }
        }
        broker.close();
        let mut got = std::collections::HashSet::new();
        for w in workers {
            let ids = tokio::time::timeout(Duration::from_secs(10), w)
                .await
                .expect("workers finish after close")
                .unwrap();
            for id in ids {
                assert!(got.insert(id), "delivered twice");
            }
        }
        assert_eq!(got, sent);
        assert_eq!(broker.unacked("s"), 0);
    }

    #[tokio::test]
    async fn unavailable_is_retryable_and_too_large_is_permanent() {
        let broker = MemoryBroker::new().with_max_message_size(100);
        let p = broker.producer();
        broker.set_available(false);
        let e = p.send(&msg("t", "k")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.is_retryable());
        assert_eq!(broker.published_count(), 0);
        broker.set_available(true);
        p.send(&msg("t", "k")).await.unwrap();

        let big = Message::builder("t")
            .payload(vec![1u8; 200])
            .build()
            .unwrap();
        let e = p.send(&big).await.unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::PayloadTooLarge {
                size: big.encoded_size(),
                limit: 100
            }
        );
        assert!(!e.is_retryable());
        assert_eq!(broker.published_count(), 1);
    }
}
