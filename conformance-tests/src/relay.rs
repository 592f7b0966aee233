//! Relay cases: DESIGN.md "Relay" items 1–7, run with the backend's store and lock and the
//! in-memory broker (wrapped by [`FaultyProducer`] to inject broker failures).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::memory::{MemoryBroker, MemoryProducer};
use outbox_core::{
    CancellationToken, Clock, Error, ErrorKind, Message, MessageId, MessageStatus, OutageBackoff,
    OutboxStore, Producer, Relay, RelayConfig, RequeueFilter, Result, RetryPolicy, Transaction,
    TransactionalStore,
};

use crate::harness::Fixture;

const TOPIC: &str = "relay.cases";

/// A producer that forwards to a real in-memory broker and fails or hangs on demand.
#[derive(Debug)]
pub struct FaultyProducer {
    inner: MemoryProducer,
    down: AtomicBool,
    failures: Mutex<HashMap<MessageId, (u32, bool)>>,
    hang_after: Mutex<Option<usize>>,
    confirmed: AtomicUsize,
    hung: tokio::sync::Notify,
    paused: tokio::sync::watch::Sender<bool>,
    in_flight: Mutex<HashSet<MessageId>>,
    overlaps: AtomicUsize,
    delay: Mutex<Duration>,
    pipelined: AtomicBool,
    sent: Mutex<Vec<MessageId>>,
}

impl FaultyProducer {
    /// Forward to `broker`.
    pub fn new(broker: &MemoryBroker) -> Self {
        FaultyProducer {
            inner: broker.producer(),
            down: AtomicBool::new(false),
            failures: Mutex::new(HashMap::new()),
            hang_after: Mutex::new(None),
            confirmed: AtomicUsize::new(0),
            hung: tokio::sync::Notify::new(),
            paused: tokio::sync::watch::channel(false).0,
            in_flight: Mutex::new(HashSet::new()),
            overlaps: AtomicUsize::new(0),
            delay: Mutex::new(Duration::ZERO),
            pipelined: AtomicBool::new(false),
            sent: Mutex::new(Vec::new()),
        }
    }

    /// Every message the broker accepted, in the order it accepted them (all topics).
    pub fn accepted(&self) -> Vec<MessageId> {
        self.sent.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// While `true`, `send_ordered` behaves like a pipelining transport (RabbitMQ with many
    /// unconfirmed publishes): every message of the slice reaches the broker even when an
    /// earlier one fails; the results still stop at the first failure.
    pub fn set_pipelined(&self, pipelined: bool) {
        self.pipelined.store(pipelined, AtomicOrdering::SeqCst);
    }

    /// While paused, sends wait (in flight, unconfirmed) until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Let paused sends go on.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Every send takes this long before it reaches the broker.
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap_or_else(|p| p.into_inner()) = delay;
    }

    /// Sends of a message that started while another send of the same message was in flight.
    pub fn overlaps(&self) -> usize {
        self.overlaps.load(AtomicOrdering::SeqCst)
    }

    /// Sends confirmed so far.
    pub fn confirmed(&self) -> usize {
        self.confirmed.load(AtomicOrdering::SeqCst)
    }

    /// While `true`, every send fails with a retryable `Unavailable` (broker down).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, AtomicOrdering::SeqCst);
    }

    /// The next `times` sends of `id` are rejected by the broker, a failure specific to the
    /// message (`Unexpected`; retryable or permanent). Counts towards `max_attempts`.
    pub fn fail(&self, id: MessageId, times: u32, retryable: bool) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (times, retryable));
    }

    /// After `n` confirmed sends, every further send hangs forever (a relay stuck mid-batch).
    pub fn hang_after(&self, n: usize) {
        *self.hang_after.lock().unwrap_or_else(|p| p.into_inner()) = Some(n);
    }

    /// Resolves once a send has started hanging.
    pub async fn hung(&self) {
        self.hung.notified().await;
    }
}

#[async_trait]
impl Producer for FaultyProducer {
    async fn send(&self, message: &Message) -> Result<()> {
        if !self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(message.id)
        {
            self.overlaps.fetch_add(1, AtomicOrdering::SeqCst);
        }
        let result = self.send_inner(message).await;
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&message.id);
        result
    }

    async fn send_ordered(&self, messages: &[Message]) -> Vec<Result<()>> {
        let pipelined = self.pipelined.load(AtomicOrdering::SeqCst);
        let mut out = Vec::with_capacity(messages.len());
        let mut failed = false;
        for m in messages {
            if failed && !pipelined {
                break;
            }
            let r = self.send(m).await; // pipelined: on the wire whatever came before
            if !failed {
                failed = r.is_err();
                out.push(r);
            }
        }
        out
    }
}

impl FaultyProducer {
    async fn send_inner(&self, message: &Message) -> Result<()> {
        let mut paused = self.paused.subscribe();
        let _ = paused.wait_for(|p| !*p).await;
        let delay = *self.delay.lock().unwrap_or_else(|p| p.into_inner());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.down.load(AtomicOrdering::SeqCst) {
            return Err(Error::unavailable("broker down (injected)"));
        }
        let injected = {
            let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            match f.get_mut(&message.id) {
                Some((n, retryable)) if *n > 0 => {
                    *n -= 1;
                    Some(*retryable)
                }
                _ => None,
            }
        };
        if let Some(retryable) = injected {
            return Err(
                Error::new(ErrorKind::Unexpected, "send rejected (injected)")
                    .set_retryable(retryable),
            );
        }
        let limit = *self.hang_after.lock().unwrap_or_else(|p| p.into_inner());
        if limit.is_some_and(|l| self.confirmed.load(AtomicOrdering::SeqCst) >= l) {
            self.hung.notify_one();
            std::future::pending::<()>().await;
        }
        self.inner.send(message).await?;
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(message.id);
        self.confirmed.fetch_add(1, AtomicOrdering::SeqCst);
        Ok(())
    }
}

fn config(instance: &str) -> RelayConfig {
    RelayConfig {
        instance_id: instance.to_owned(),
        batch_size: 50,
        max_in_flight: 16,
        poll_interval: Duration::from_millis(20),
        lease_ttl: Duration::from_secs(30),
        publish_timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            jitter: false,
            ..RetryPolicy::default()
        },
        ..RelayConfig::default()
    }
}

fn relay<S: TransactionalStore>(
    f: &Fixture<S>,
    producer: Arc<dyn Producer>,
    config: RelayConfig,
) -> Relay {
    Relay::with_clock(
        f.outbox.clone(),
        f.lock.clone(),
        producer,
        config,
        Arc::new(f.clock.clone()),
    )
    .expect("valid relay config")
}

/// `n` messages over `keys` keys (round robin); every fifth message has no key.
async fn add_messages(outbox: &dyn OutboxStore, n: usize, keys: usize) -> Vec<Message> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut b = Message::builder(TOPIC).payload(format!("m{i}").into_bytes());
        if i % 5 != 4 {
            b = b.key(format!("key-{}", i % keys.max(1)));
        }
        let m = b.build().expect("valid message");
        outbox.add(&m).await.expect("add");
        out.push(m);
    }
    out
}

/// Tick until a tick fetches nothing (bounded).
async fn drain(relay: &Relay) {
    for _ in 0..10_000 {
        if relay.tick().await.expect("tick").batches == 0 {
            return;
        }
    }
    panic!("relay did not drain within 10,000 ticks");
}

fn published_ids(broker: &MemoryBroker) -> Vec<MessageId> {
    broker.published(TOPIC).iter().map(|m| m.id).collect()
}

/// Per key, the order in which the broker received the messages.
fn order_by_key(messages: &[Message]) -> HashMap<String, Vec<MessageId>> {
    let mut by_key: HashMap<String, Vec<MessageId>> = HashMap::new();
    for m in messages {
        if let Some(k) = &m.key {
            by_key.entry(k.clone()).or_default().push(m.id);
        }
    }
    by_key
}

/// How long [`wait_published`] waits without progress before failing: far below the
/// cases' hour-long poll intervals, far above one batch on a loaded moto.
const STALL: Duration = Duration::from_secs(15);

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting until {what}");
}

/// Wait until `broker` holds at least `n` messages. A slow store (moto on a loaded machine)
/// may take long, so this fails only on a stall: `stall` without a single new publish.
async fn wait_published(broker: &MemoryBroker, n: usize, stall: Duration) {
    let (mut seen, mut last_progress) = (0, tokio::time::Instant::now());
    while broker.published_count() < n {
        let now = broker.published_count();
        if now > seen {
            (seen, last_progress) = (now, tokio::time::Instant::now());
        }
        assert!(
            last_progress.elapsed() < stall,
            "stalled at {seen} of {n} published for {stall:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Relay 1: every committed message is published, exactly once without failures, in per-key
/// order, and ends dispatched.
pub async fn publishes_every_message_exactly_once<S: TransactionalStore>(f: &Fixture<S>) {
    let broker = MemoryBroker::new();
    let added = add_messages(f.outbox.as_ref(), 300, 20).await;
    let r = relay(f, Arc::new(broker.producer()), config("r1"));
    drain(&r).await;

    let published = broker.published(TOPIC);
    let ids: Vec<MessageId> = published.iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), 300, "published count");
    let distinct: HashSet<MessageId> = ids.iter().copied().collect();
    let expected: HashSet<MessageId> = added.iter().map(|m| m.id).collect();
    assert_eq!(distinct, expected, "published exactly the added messages");
    assert_eq!(
        order_by_key(&published),
        order_by_key(&added),
        "per-key order"
    );
    assert_eq!(r.stats().published, 300);
    let stats = f.outbox.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.parked), (0, 0));
    for m in added.iter().take(10) {
        let s = f.outbox.get(m.id).await.expect("get").expect("stored");
        assert_eq!(s.status, MessageStatus::Dispatched);
        assert!(s.dispatched_at.is_some());
    }
}

/// Relay 2: instances split the shards (disjoint fair shares covering every shard) and, run
/// concurrently, publish every message once.
pub async fn instances_split_work<S: TransactionalStore>(f: &Fixture<S>) {
    let shards = f.outbox.shard_count();
    let n_relays = 3.min(shards as usize);
    let broker = MemoryBroker::new();
    let relays: Vec<Relay> = (0..n_relays)
        .map(|i| relay(f, Arc::new(broker.producer()), config(&format!("r{i}"))))
        .collect();
    let mut held = Vec::new();
    for _round in 0..3 {
        held.clear();
        for r in &relays {
            held.push(r.rebalance().await.expect("rebalance"));
        }
    }
    let fair = (shards as usize).div_ceil(n_relays);
    let mut union = BTreeSet::new();
    for (i, h) in held.iter().enumerate() {
        assert!(!h.is_empty(), "relay {i} holds no shard: {held:?}");
        assert!(
            h.len() <= fair,
            "relay {i} holds more than its fair share: {held:?}"
        );
        for s in h {
            assert!(union.insert(*s), "shard {s} held twice: {held:?}");
        }
    }
    assert_eq!(union, (0..shards).collect(), "every shard held: {held:?}");

    let added = add_messages(f.outbox.as_ref(), 300, 40).await;
    loop {
        let reports = futures::future::join_all(relays.iter().map(|r| r.tick())).await;
        let mut batches = 0;
        for rep in reports {
            batches += rep.expect("tick").batches;
        }
        if batches == 0 {
            break;
        }
    }
    let ids = published_ids(&broker);
    let distinct: HashSet<MessageId> = ids.iter().copied().collect();
    assert_eq!(ids.len(), added.len(), "no message published twice");
    assert_eq!(distinct.len(), added.len(), "every message published");
    if shards > 1 {
        let busy = relays.iter().filter(|r| r.stats().published > 0).count();
        assert!(busy >= 2, "work was not split: {busy} relay(s) published");
    }
}

/// Relay 3: a relay killed mid-batch loses nothing; another instance takes over after the
/// lease expires and publishes everything (duplicates bounded by the batch).
pub async fn killed_relay_loses_nothing<S: TransactionalStore>(f: &Fixture<S>) {
    let broker = MemoryBroker::new();
    let added = add_messages(f.outbox.as_ref(), 120, 10).await;
    let stuck = Arc::new(FaultyProducer::new(&broker));
    stuck.hang_after(10);
    let a = relay(f, stuck.clone(), config("doomed"));
    assert!(!a.rebalance().await.expect("rebalance").is_empty());
    let task = tokio::spawn({
        let a = a.clone();
        async move { a.tick().await }
    });
    tokio::time::timeout(Duration::from_secs(20), stuck.hung())
        .await
        .expect("relay reached the hanging send");
    task.abort(); // the crash: no release, no mark_dispatched
    let _ = task.await;

    let b = relay(f, Arc::new(broker.producer()), config("survivor"));
    assert!(
        b.rebalance().await.expect("rebalance").is_empty(),
        "leases of the crashed relay are still live"
    );
    f.clock
        .advance(config("x").lease_ttl + Duration::from_secs(1));
    assert_eq!(
        b.rebalance().await.expect("rebalance").len(),
        f.outbox.shard_count() as usize,
        "survivor takes over every shard after expiry"
    );
    drain(&b).await;

    let ids = published_ids(&broker);
    let distinct: HashSet<MessageId> = ids.iter().copied().collect();
    let expected: HashSet<MessageId> = added.iter().map(|m| m.id).collect();
    assert_eq!(distinct, expected, "nothing lost");
    assert!(
        ids.len() <= added.len() + config("x").batch_size,
        "duplicates bounded by one batch: {} published",
        ids.len()
    );
    assert_eq!(f.outbox.stats().await.expect("stats").pending, 0);
}

/// Relay 4 and 8: broker down: an outage counts no attempt against any message and parks
/// nothing, however often the relay tries; publishing resumes once the broker is back.
pub async fn broker_down_then_recovers<S: TransactionalStore>(f: &Fixture<S>) {
    let broker = MemoryBroker::new();
    let producer = Arc::new(FaultyProducer::new(&broker));
    let added = add_messages(f.outbox.as_ref(), 20, 4).await;
    let r = relay(f, producer.clone(), config("r"));
    producer.set_down(true);
    // Far more tries than max_attempts (3), with the retry backoff elapsed between them.
    for _ in 0..10 {
        let rep = r.tick().await.expect("tick");
        assert_eq!(
            (rep.published, rep.failed, rep.parked),
            (0, 0, 0),
            "{rep:?}"
        );
        f.clock.advance(Duration::from_secs(120));
    }
    let stats = f.outbox.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.parked), (20, 0), "all still pending");
    for m in &added {
        let s = f.outbox.get(m.id).await.expect("get").expect("stored");
        assert_eq!(
            (s.status, s.attempts, s.next_attempt_at),
            (MessageStatus::Pending, 0, None),
            "an outage is not the message's failure"
        );
    }
    producer.set_down(false);
    drain(&r).await;
    let distinct: HashSet<MessageId> = published_ids(&broker).into_iter().collect();
    assert_eq!(distinct.len(), 20, "everything published after recovery");
    assert_eq!(f.outbox.stats().await.expect("stats").pending, 0);
}

/// Relay (contract 6 through the relay): repeated failures park the message after
/// `max_attempts`, a permanent error parks at once, the parked head holds back its key, and
/// requeue brings it back in order.
pub async fn parks_after_max_attempts_then_requeue<S: TransactionalStore>(f: &Fixture<S>) {
    let broker = MemoryBroker::new();
    let producer = Arc::new(FaultyProducer::new(&broker));
    let head = Message::builder(TOPIC)
        .key("k")
        .payload("head")
        .build()
        .expect("msg");
    let next = Message::builder(TOPIC)
        .key("k")
        .payload("next")
        .build()
        .expect("msg");
    let poison = Message::builder(TOPIC)
        .key("p")
        .payload("poison")
        .build()
        .expect("msg");
    for m in [&head, &next, &poison] {
        f.outbox.add(m).await.expect("add");
    }
    producer.fail(head.id, 100, true);
    producer.fail(poison.id, 1, false);
    let r = relay(f, producer.clone(), config("r"));
    for _ in 0..3 {
        r.tick().await.expect("tick");
        f.clock.advance(Duration::from_secs(61));
    }
    let h = f.outbox.get(head.id).await.expect("get").expect("stored");
    assert_eq!(
        (h.status, h.attempts),
        (MessageStatus::Parked, 3),
        "parked after 3"
    );
    let p = f.outbox.get(poison.id).await.expect("get").expect("stored");
    assert_eq!(
        (p.status, p.attempts),
        (MessageStatus::Parked, 1),
        "permanent error parks at once"
    );
    let n = f.outbox.get(next.id).await.expect("get").expect("stored");
    assert_eq!(
        n.status,
        MessageStatus::Pending,
        "held back behind the parked head"
    );
    assert!(published_ids(&broker).is_empty());
    assert_eq!(f.outbox.stats().await.expect("stats").parked, 2);
    assert_eq!(r.stats().parked, 2);

    producer.fail(head.id, 0, true);
    assert_eq!(
        f.outbox
            .requeue(&RequeueFilter::Ids(vec![head.id]))
            .await
            .expect("requeue"),
        1
    );
    drain(&r).await;
    assert_eq!(
        published_ids(&broker),
        vec![head.id, next.id],
        "key order kept after requeue"
    );
    assert_eq!(f.outbox.stats().await.expect("stats").parked, 1);
}

/// Relay (contract 7 through the relay): a failing head holds back later messages of its key
/// but not other keys; after the retry the key is published in order.
pub async fn per_key_order_survives_failures<S: TransactionalStore>(f: &Fixture<S>) {
    let broker = MemoryBroker::new();
    let producer = Arc::new(FaultyProducer::new(&broker));
    let mut a = Vec::new();
    let mut b = Vec::new();
    for i in 0..3 {
        a.push(
            Message::builder(TOPIC)
                .key("a")
                .payload(format!("a{i}"))
                .build()
                .expect("m"),
        );
        b.push(
            Message::builder(TOPIC)
                .key("b")
                .payload(format!("b{i}"))
                .build()
                .expect("m"),
        );
    }
    for (x, y) in a.iter().zip(&b) {
        f.outbox.add(x).await.expect("add");
        f.outbox.add(y).await.expect("add");
    }
    producer.fail(a[0].id, 1, true);
    let r = relay(f, producer.clone(), config("r"));
    let rep = r.tick().await.expect("tick");
    assert_eq!((rep.published, rep.failed), (3, 1), "{rep:?}");
    assert_eq!(
        published_ids(&broker),
        b.iter().map(|m| m.id).collect::<Vec<_>>()
    );
    assert_eq!(
        r.tick().await.expect("tick").published,
        0,
        "key a waits for its head"
    );
    f.clock.advance(Duration::from_secs(2));
    drain(&r).await;
    let by_key = order_by_key(&broker.published(TOPIC));
    assert_eq!(by_key["a"], a.iter().map(|m| m.id).collect::<Vec<_>>());
    assert_eq!(by_key["b"], b.iter().map(|m| m.id).collect::<Vec<_>>());
}

/// Relay 5: on shutdown the running relay finishes, releases every lease, and another
/// instance can take all shards at once (no expiry wait).
pub async fn graceful_shutdown_releases_leases<S: TransactionalStore>(f: &Fixture<S>) {
    let broker = MemoryBroker::new();
    add_messages(f.outbox.as_ref(), 40, 5).await;
    let r = relay(f, Arc::new(broker.producer()), config("r"));
    let shutdown = CancellationToken::new();
    let running = r.spawn(shutdown.clone());
    wait_published(&broker, 40, STALL).await;
    shutdown.cancel();
    let report = running.await.expect("join").expect("run");
    assert_eq!(report.published, 40);
    for shard in 0..f.outbox.shard_count() {
        let lease = f
            .lock
            .current(&format!("outbox/shard/{shard}"))
            .await
            .expect("current");
        assert!(
            lease.is_none(),
            "shard {shard} still leased after shutdown: {lease:?}"
        );
    }
    let next = relay(f, Arc::new(broker.producer()), config("next"));
    assert_eq!(
        next.rebalance().await.expect("rebalance").len(),
        f.outbox.shard_count() as usize
    );
}

/// Relay 6: after commit, handing the result to the relay publishes at once, with a poll
/// interval far too long to explain it.
pub async fn notify_dispatches_immediately<S: TransactionalStore>(f: &Fixture<S>) {
    let broker = MemoryBroker::new();
    let r = relay(
        f,
        Arc::new(broker.producer()),
        RelayConfig {
            poll_interval: Duration::from_secs(3600),
            ..config("r")
        },
    );
    let shutdown = CancellationToken::new();
    let running = r.spawn(shutdown.clone());
    let m = Message::builder(TOPIC).key("fast").build().expect("m");
    if f.outbox.capabilities().transactions {
        let mut tx = f.tx_store.begin().await.expect("begin");
        tx.add(&m).await.expect("add");
        let committed = tx.commit().await.expect("commit");
        r.handle().notify(&committed);
    } else {
        f.outbox.add(&m).await.expect("add");
        r.handle().wake();
    }
    wait_until("the notified message is published", || {
        broker.published_count() == 1
    })
    .await;
    shutdown.cancel();
    running.await.expect("join").expect("run");
    assert_eq!(published_ids(&broker), vec![m.id]);
}

/// Relay 7: `run_once` drains one batch and returns with its leases released.
pub async fn run_once_drains_one_batch<S: TransactionalStore>(f: &Fixture<S>) {
    let broker = MemoryBroker::new();
    add_messages(f.outbox.as_ref(), 25, 25).await;
    let r = relay(
        f,
        Arc::new(broker.producer()),
        RelayConfig {
            batch_size: 10,
            ..config("lambda")
        },
    );
    let first = r.run_once().await.expect("run_once");
    assert_eq!((first.published, first.batches), (10, 1));
    for shard in 0..f.outbox.shard_count() {
        assert!(
            f.lock
                .current(&format!("outbox/shard/{shard}"))
                .await
                .expect("current")
                .is_none()
        );
    }
    assert_eq!(r.run_once().await.expect("run_once").published, 10);
    assert_eq!(r.run_once().await.expect("run_once").published, 5);
    assert_eq!(r.run_once().await.expect("run_once").published, 0);
    assert_eq!(broker.published_count(), 25);
}

/// Relay 4 and 8 in [`Relay::run`]: the broker is down for far longer than the whole retry
/// backoff sum; nothing is parked or counted, and publishing resumes by itself.
pub async fn outage_parks_nothing_in_run<S: TransactionalStore>(f: &Fixture<S>) {
    let broker = MemoryBroker::new();
    let producer = Arc::new(FaultyProducer::new(&broker));
    let added = add_messages(f.outbox.as_ref(), 30, 6).await;
    producer.set_down(true);
    let r = relay(
        f,
        producer.clone(),
        RelayConfig {
            retry: RetryPolicy {
                max_attempts: 2,
                initial_backoff: Duration::ZERO,
                max_backoff: Duration::ZERO,
                ..RetryPolicy::default()
            },
            outage_backoff: OutageBackoff {
                initial: Duration::from_millis(5),
                max: Duration::from_millis(40),
            },
            ..config("r")
        },
    );
    let shutdown = CancellationToken::new();
    let running = r.spawn(shutdown.clone());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stats = f.outbox.stats().await.expect("stats");
    assert_eq!(
        (stats.pending, stats.parked),
        (30, 0),
        "nothing parked while down"
    );
    producer.set_down(false);
    wait_until("everything is published after the outage", || {
        broker.published_count() >= 30
    })
    .await;
    shutdown.cancel();
    let report = running.await.expect("join").expect("run");
    assert_eq!((report.failed, report.parked), (0, 0), "{report:?}");
    for m in &added {
        let s = f.outbox.get(m.id).await.expect("get").expect("stored");
        assert_eq!((s.status, s.attempts), (MessageStatus::Dispatched, 0));
    }
}

/// Relay 9: a relay whose lease is about to expire starts no send (and does not busy-loop
/// fetching); once another relay took over, the stale one publishes nothing, and its late
/// store writes on messages the new holder dispatched change nothing.
pub async fn stale_holder_publishes_nothing<S: TransactionalStore>(f: &Fixture<S>) {
    let broker = MemoryBroker::new();
    let cfg = config("stale");
    let faults = Faults::new(f);
    let a = Relay::with_clock(
        f.outbox.clone(),
        faults.clone(),
        Arc::new(broker.producer()),
        cfg.clone(),
        Arc::new(f.clock.clone()),
    )
    .expect("valid relay config");
    assert!(!a.rebalance().await.expect("rebalance").is_empty());
    let added = add_messages(f.outbox.as_ref(), 40, 8).await;
    // The lock becomes unreachable, so the leases cannot be renewed; the clock passes the send
    // deadline (expiry - publish_timeout - margin) but not the expiry.
    faults.lock_down.store(true, AtomicOrdering::SeqCst);
    f.clock.advance(
        cfg.lease_ttl - cfg.publish_timeout - cfg.clock_skew_margin + Duration::from_millis(10),
    );
    let rep = a.tick().await.expect("tick");
    assert_eq!(
        (rep.published, rep.batches),
        (0, 0),
        "no send and no fetch this close to lease expiry"
    );
    faults.lock_down.store(false, AtomicOrdering::SeqCst);
    // Expired; another relay takes over.
    f.clock.advance(cfg.lease_ttl);
    let b = relay(f, Arc::new(broker.producer()), config("successor"));
    assert_eq!(
        b.rebalance().await.expect("rebalance").len(),
        f.outbox.shard_count() as usize
    );
    drain(&b).await;
    assert_eq!(
        a.tick().await.expect("tick").published,
        0,
        "stale relay publishes nothing"
    );
    assert!(a.held_shards().await.is_empty(), "stale relay stepped down");
    assert_eq!(broker.published_count(), 40);
    assert_eq!(b.stats().published, 40);
    // The stale relay's late writes: a mark of a dispatched message changes nothing; a late
    // failure record of it reports NotPending and leaves it dispatched.
    let m = &added[0];
    let before = f.outbox.get(m.id).await.expect("get").expect("stored");
    f.outbox.mark_dispatched(&[m.id]).await.expect("late mark");
    let late = f
        .outbox
        .mark_failed(
            m.id,
            &outbox_core::FailedAttempt {
                error: "late".into(),
                next_attempt_at: f.clock.now(),
                max_attempts: 1,
            },
        )
        .await
        .expect("late failure");
    assert_eq!(late, outbox_core::FailureOutcome::NotPending);
    let after = f.outbox.get(m.id).await.expect("get").expect("stored");
    assert_eq!(
        before, after,
        "late writes of a stale holder changed a dispatched message"
    );
}

/// Relay 9: a second live relay with the same `instance_id` is refused with `ConfigInvalid`,
/// by `tick`, `rebalance` and `run`; it holds no lease afterwards.
pub async fn duplicate_instance_id_refused<S: TransactionalStore>(f: &Fixture<S>) {
    let broker = MemoryBroker::new();
    let short = RelayConfig {
        lease_ttl: Duration::from_millis(300),
        publish_timeout: Duration::from_millis(50),
        clock_skew_margin: Duration::from_millis(50),
        ..config("twin")
    };
    let a = relay(f, Arc::new(broker.producer()), short.clone());
    assert!(!a.rebalance().await.expect("first twin").is_empty());
    let b = relay(f, Arc::new(broker.producer()), short);
    for e in [b.tick().await.err(), b.rebalance().await.err()] {
        let e = e.expect("the second twin is refused");
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
        assert!(e.to_string().contains("twin"), "names the instance id: {e}");
    }
    let e = tokio::time::timeout(Duration::from_secs(10), b.run(CancellationToken::new()))
        .await
        .expect("run gives up after one lease_ttl")
        .expect_err("run refuses too");
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    assert!(b.held_shards().await.is_empty());
    assert_eq!(
        a.rebalance().await.expect("first twin unaffected").len(),
        f.outbox.shard_count() as usize
    );
}

/// Relay 5: shutdown with sends in flight: they finish and are marked, every lease is
/// released, and nothing is published after `run` returned.
pub async fn shutdown_finishes_batch_in_flight<S: TransactionalStore>(f: &Fixture<S>) {
    let broker = MemoryBroker::new();
    let producer = Arc::new(FaultyProducer::new(&broker));
    add_messages(f.outbox.as_ref(), 20, 20).await;
    producer.pause();
    let r = relay(f, producer.clone(), config("r"));
    let shutdown = CancellationToken::new();
    let running = r.spawn(shutdown.clone());
    wait_until("sends are in flight", || {
        !producer
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    })
    .await;
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!running.is_finished(), "run waits for the sends in flight");
    producer.resume();
    let report = running.await.expect("join").expect("run");
    let at_return = broker.published_count();
    assert!(
        at_return > 0 && report.published as usize == at_return,
        "{report:?}"
    );
    let stats = f.outbox.stats().await.expect("stats");
    assert_eq!(
        stats.pending as usize,
        20 - at_return,
        "published ones were marked"
    );
    for shard in 0..f.outbox.shard_count() {
        assert!(
            f.lock
                .current(&format!("outbox/shard/{shard}"))
                .await
                .expect("current")
                .is_none(),
            "shard {shard} still leased"
        );
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        broker.published_count(),
        at_return,
        "published after run returned"
    );
}

/// Relay 2: several running relays, each publish slowed to 5 ms, never send one message
/// concurrently and publish each exactly once; every relay does part of the work.
pub async fn racing_relays_never_overlap<S: TransactionalStore>(f: &Fixture<S>) {
    let broker = MemoryBroker::new();
    let producer = Arc::new(FaultyProducer::new(&broker));
    producer.set_delay(Duration::from_millis(5));
    let added = add_messages(f.outbox.as_ref(), 200, 40).await;
    let n = 3.min(f.outbox.shard_count() as usize);
    let relays: Vec<Relay> = (0..n)
        .map(|i| relay(f, producer.clone(), config(&format!("racer-{i}"))))
        .collect();
    for _round in 0..3 {
        for r in &relays {
            r.rebalance().await.expect("rebalance");
        }
    }
    let shutdown = CancellationToken::new();
    let running: Vec<_> = relays.iter().map(|r| r.spawn(shutdown.clone())).collect();
    wait_published(&broker, added.len(), STALL).await;
    shutdown.cancel();
    for r in running {
        r.await.expect("join").expect("run");
    }
    assert_eq!(
        producer.overlaps(),
        0,
        "a message was sent by two relays at once"
    );
    let ids = published_ids(&broker);
    let distinct: HashSet<MessageId> = ids.iter().copied().collect();
    assert_eq!(ids.len(), added.len(), "published exactly once");
    assert_eq!(distinct.len(), added.len());
    assert_eq!(
        order_by_key(&broker.published(TOPIC)),
        order_by_key(&added),
        "per-key order"
    );
    if f.outbox.shard_count() > 1 {
        let busy = relays.iter().filter(|r| r.stats().published > 0).count();
        assert!(busy >= 2, "work was not split: {busy} relay(s) published");
    }
}

/// Relay 1 and 10 with overlapping fetches: the store answers every fetch 20 ms late, so a
/// fetch often returns messages as pending that a chain finished (published and marked)
/// meanwhile; the relay still publishes each message exactly once, in per-key order.
pub async fn stale_fetch_publishes_once<S: TransactionalStore>(f: &Fixture<S>) {
    let broker = MemoryBroker::new();
    let producer = Arc::new(FaultyProducer::new(&broker));
    producer.set_delay(Duration::from_millis(1));
    let added = add_messages(f.outbox.as_ref(), 200, 50).await;
    let slow = Faults::new(f);
    *slow.read_delay.lock().unwrap_or_else(|p| p.into_inner()) = Duration::from_millis(20);
    let r = Relay::with_clock(
        slow,
        f.lock.clone(),
        producer.clone(),
        RelayConfig {
            batch_size: 10,
            ..config("r")
        },
        Arc::new(f.clock.clone()),
    )
    .expect("valid relay config");
    let shutdown = CancellationToken::new();
    let running = r.spawn(shutdown.clone());
    wait_published(&broker, added.len(), STALL).await;
    // Give a late duplicate the time to show.
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.cancel();
    running.await.expect("join").expect("run");
    let ids = published_ids(&broker);
    let distinct: HashSet<MessageId> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), added.len(), "every message published");
    assert_eq!(ids.len(), added.len(), "a stale fetch was published again");
    assert_eq!(
        order_by_key(&broker.published(TOPIC)),
        order_by_key(&added),
        "per-key order"
    );
}

/// Relay 10 at the in-flight cap: a backlog 15 times `max_in_flight` drains in `run` without
/// waiting for a poll (poll interval one hour): each finished chain frees room for the next
/// fetch.
pub async fn backlog_drains_at_in_flight_cap<S: TransactionalStore>(f: &Fixture<S>) {
    let broker = MemoryBroker::new();
    let added = add_messages(f.outbox.as_ref(), 120, 40).await;
    let r = relay(
        f,
        Arc::new(broker.producer()),
        RelayConfig {
            batch_size: 8,
            max_in_flight: 8,
            poll_interval: Duration::from_secs(3600),
            // Lease maintenance (every third of the ttl) also wakes the loop: keep it far
            // beyond the stall limit below.
            lease_ttl: Duration::from_secs(180),
            ..config("capped")
        },
    );
    let shutdown = CancellationToken::new();
    let running = r.spawn(shutdown.clone());
    // A stall waits for the hour's poll; a slow store (moto on a loaded machine) still makes
    // progress.
    wait_published(&broker, added.len(), STALL).await;
    shutdown.cancel();
    running.await.expect("join").expect("run");
    assert_eq!(
        order_by_key(&broker.published(TOPIC)),
        order_by_key(&added),
        "per-key order"
    );
}

/// Relay item 7 on a pipelining transport: a key's head fails for a reason of its own topic
/// (no route for it) while the later messages of the key go to another topic. The later
/// messages are not published before the head: they wait for its confirm, through its
/// retries, so first receipts keep per-key order.
pub async fn failing_head_holds_back_its_key_when_pipelined<S: TransactionalStore>(f: &Fixture<S>) {
    const OTHER: &str = "relay.cases.other";
    let broker = MemoryBroker::new();
    let producer = Arc::new(FaultyProducer::new(&broker));
    producer.set_pipelined(true);
    let head = crate::support::build(Message::builder(OTHER).key("k"));
    f.outbox.add(&head).await.expect("add head");
    let mut later = Vec::new();
    for i in 0..3 {
        let m = crate::support::build(
            Message::builder(TOPIC)
                .key("k")
                .payload(format!("later-{i}").into_bytes()),
        );
        f.outbox.add(&m).await.expect("add");
        later.push(m);
    }
    producer.fail(head.id, 2, true);
    let r = relay(f, producer.clone(), config("pipelined"));
    for _ in 0..3 {
        r.tick().await.expect("tick");
        // Past the retry backoff of the head (1 s, then 2 s).
        f.clock.advance(Duration::from_secs(5));
    }
    drain(&r).await;
    let mut receipts: Vec<MessageId> = broker.published(OTHER).iter().map(|m| m.id).collect();
    assert_eq!(receipts, vec![head.id], "the head, once");
    receipts = broker.published(TOPIC).iter().map(|m| m.id).collect();
    assert_eq!(
        receipts,
        later.iter().map(|m| m.id).collect::<Vec<_>>(),
        "the later messages, once each, in order"
    );
    let accepted = producer.accepted();
    let head_at = accepted.iter().position(|id| *id == head.id);
    let first_later = accepted.iter().position(|id| *id == later[0].id);
    assert!(
        head_at < first_later && head_at.is_some(),
        "a later message of the key reached the broker before its failing head"
    );
}

/// Where a relay can be killed: inside which call it is when its task is aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillPoint {
    /// Awaiting `fetch_pending`.
    Fetch,
    /// Awaiting the broker's confirm of a send.
    Publish,
    /// Awaiting `mark_dispatched` (published, not yet marked).
    Mark,
    /// Awaiting a lease renewal, part way through lease maintenance.
    Maintenance,
}

/// Relay 3 at every kill point: a relay aborted while it fetches, publishes, marks or renews
/// its leases loses nothing; after its leases expire a new instance publishes the rest, with
/// per-key order held at first receipt and duplicates bounded by one batch.
pub async fn killed_at_any_point_loses_nothing<S: TransactionalStore>(f: &Fixture<S>) {
    for point in [
        KillPoint::Fetch,
        KillPoint::Publish,
        KillPoint::Mark,
        KillPoint::Maintenance,
    ] {
        kill_at(f, point).await;
    }
}

async fn kill_at<S: TransactionalStore>(f: &Fixture<S>, point: KillPoint) {
    let broker = MemoryBroker::new();
    let faults = Faults::new(f);
    let producer = Arc::new(FaultyProducer::new(&broker));
    let cfg = RelayConfig {
        batch_size: 10,
        lock_prefix: format!("kill-{point:?}").to_lowercase(),
        ..config(&format!("doomed-{point:?}"))
    };
    // Let a little work through first, so the kill lands in the middle of the run.
    match point {
        KillPoint::Publish => producer.hang_after(5),
        KillPoint::Maintenance => faults.arm(point, 3),
        KillPoint::Fetch | KillPoint::Mark => faults.arm(point, 1),
    }
    let doomed = Relay::with_clock(
        faults.clone(),
        faults.clone(),
        producer.clone(),
        cfg.clone(),
        Arc::new(f.clock.clone()),
    )
    .expect("valid relay config");
    assert!(!doomed.rebalance().await.expect("rebalance").is_empty());
    let added = add_messages(f.outbox.as_ref(), 60, 6).await;
    let task = tokio::spawn({
        // The relay renews every third of `lease_ttl`: each tick is due for maintenance.
        let (doomed, clock, every) = (doomed.clone(), f.clock.clone(), cfg.lease_ttl / 3);
        async move {
            loop {
                if let Err(e) = doomed.tick().await {
                    return e;
                }
                clock.advance(every);
            }
        }
    });
    let reached = async {
        if point == KillPoint::Publish {
            producer.hung().await;
        } else {
            faults.trapped.notified().await;
        }
    };
    tokio::select! {
        _ = reached => {}
        _ = tokio::time::sleep(Duration::from_secs(20)) => panic!("{point:?}: kill point not reached"),
    }
    task.abort(); // the crash: nothing more of this relay runs
    let _ = task.await;

    let survivor = Relay::with_clock(
        f.outbox.clone(),
        f.lock.clone(),
        Arc::new(broker.producer()),
        RelayConfig {
            instance_id: format!("survivor-{point:?}"),
            ..cfg.clone()
        },
        Arc::new(f.clock.clone()),
    )
    .expect("valid relay config");
    f.clock.advance(cfg.lease_ttl + Duration::from_secs(1));
    assert_eq!(
        survivor.rebalance().await.expect("rebalance").len(),
        f.outbox.shard_count() as usize,
        "{point:?}: the survivor takes every shard once the leases expired"
    );
    drain(&survivor).await;

    let published = broker.published(TOPIC);
    let mut seen = HashSet::new();
    let first: Vec<Message> = published
        .iter()
        .filter(|m| seen.insert(m.id))
        .cloned()
        .collect();
    let expected: HashSet<MessageId> = added.iter().map(|m| m.id).collect();
    assert_eq!(seen, expected, "{point:?}: nothing lost");
    assert_eq!(
        order_by_key(&first),
        order_by_key(&added),
        "{point:?}: per-key order at first receipt"
    );
    assert!(
        published.len() <= added.len() + cfg.batch_size,
        "{point:?}: duplicates bounded by one batch: {} published",
        published.len()
    );
    let stats = f.outbox.stats().await.expect("stats");
    assert_eq!(
        (stats.pending, stats.parked),
        (0, 0),
        "{point:?}: nothing left"
    );
    survivor.release().await;
}

/// The backend's store and lock, with faults injected on demand: slow reads, an unreachable
/// lock, and a trap that stops the caller dead inside one kind of call.
#[derive(Debug)]
struct Faults {
    store: Arc<dyn OutboxStore>,
    lock: Arc<dyn outbox_core::DistributedLock>,
    /// Every `fetch_pending` answers this long after reading (a slow network or replica).
    read_delay: Mutex<Duration>,
    /// While `true`, every lock call fails with a retryable `Unavailable`.
    lock_down: AtomicBool,
    /// The armed kill point and how many of its calls still pass.
    trap: Mutex<Option<(KillPoint, usize)>>,
    /// Notified when a call walked into the trap (it never returns).
    trapped: tokio::sync::Notify,
}

impl Faults {
    fn new<S: TransactionalStore>(f: &Fixture<S>) -> Arc<Self> {
        Arc::new(Faults {
            store: f.outbox.clone(),
            lock: f.lock.clone(),
            read_delay: Mutex::new(Duration::ZERO),
            lock_down: AtomicBool::new(false),
            trap: Mutex::new(None),
            trapped: tokio::sync::Notify::new(),
        })
    }

    /// Calls at `point` after the first `pass` ones never return.
    fn arm(&self, point: KillPoint, pass: usize) {
        *self.trap.lock().unwrap_or_else(|p| p.into_inner()) = Some((point, pass));
    }

    /// Pass, or hang forever if the trap at `point` is due.
    async fn at(&self, point: KillPoint) {
        let sprung = {
            let mut trap = self.trap.lock().unwrap_or_else(|p| p.into_inner());
            match trap.as_mut() {
                Some((p, 0)) if *p == point => true,
                Some((p, pass)) if *p == point => {
                    *pass -= 1;
                    false
                }
                _ => false,
            }
        };
        if sprung {
            self.trapped.notify_one();
            std::future::pending::<()>().await;
        }
    }

    fn lock_check(&self) -> Result<()> {
        if self.lock_down.load(AtomicOrdering::SeqCst) {
            return Err(Error::unavailable("lock unreachable (injected)"));
        }
        Ok(())
    }
}

#[async_trait]
impl outbox_core::DistributedLock for Faults {
    async fn acquire(
        &self,
        resource: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<outbox_core::Lease>> {
        self.lock_check()?;
        self.lock.acquire(resource, owner, ttl).await
    }
    async fn renew(&self, lease: &outbox_core::Lease, ttl: Duration) -> Result<outbox_core::Lease> {
        self.lock_check()?;
        self.at(KillPoint::Maintenance).await;
        self.lock.renew(lease, ttl).await
    }
    async fn release(&self, lease: &outbox_core::Lease) -> Result<()> {
        self.lock_check()?;
        self.lock.release(lease).await
    }
    async fn current(&self, resource: &str) -> Result<Option<outbox_core::Lease>> {
        self.lock_check()?;
        self.lock.current(resource).await
    }
}

#[async_trait]
impl OutboxStore for Faults {
    fn capabilities(&self) -> outbox_core::Capabilities {
        self.store.capabilities()
    }
    fn shard_count(&self) -> u32 {
        self.store.shard_count()
    }
    async fn add(&self, message: &Message) -> Result<()> {
        self.store.add(message).await
    }
    async fn add_batch(&self, messages: &[Message]) -> Result<()> {
        self.store.add_batch(messages).await
    }
    async fn get(&self, id: MessageId) -> Result<Option<outbox_core::StoredMessage>> {
        self.store.get(id).await
    }
    async fn fetch_pending(
        &self,
        query: &outbox_core::PendingQuery,
    ) -> Result<Vec<outbox_core::StoredMessage>> {
        self.at(KillPoint::Fetch).await;
        let read = self.store.fetch_pending(query).await;
        let delay = *self.read_delay.lock().unwrap_or_else(|p| p.into_inner());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        read
    }
    async fn mark_dispatched(&self, ids: &[MessageId]) -> Result<()> {
        self.at(KillPoint::Mark).await;
        self.store.mark_dispatched(ids).await
    }
    async fn mark_failed(
        &self,
        id: MessageId,
        attempt: &outbox_core::FailedAttempt,
    ) -> Result<outbox_core::FailureOutcome> {
        self.store.mark_failed(id, attempt).await
    }
    async fn requeue(&self, filter: &RequeueFilter) -> Result<u64> {
        self.store.requeue(filter).await
    }
    async fn stats(&self) -> Result<outbox_core::OutboxStats> {
        self.store.stats().await
    }
    async fn purge_dispatched(&self, retention: Duration, limit: usize) -> Result<u64> {
        self.store.purge_dispatched(retention, limit).await
    }
    async fn list(
        &self,
        query: &outbox_core::ListQuery,
    ) -> Result<Vec<outbox_core::StoredMessage>> {
        self.store.list(query).await
    }
    async fn dispatched_since(&self, since: chrono::DateTime<chrono::Utc>) -> Result<Option<u64>> {
        self.store.dispatched_since(since).await
    }
}
