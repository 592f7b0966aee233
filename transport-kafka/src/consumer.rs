//! [`KafkaConsumer`]: a consumer-group member with manual commits, local redelivery and a
//! dead-letter topic.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{Consumer, Delivery, Error, ErrorKind, Message, Result};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::producer::FutureProducer;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::error::parse_error;
use crate::headers::{self, RawHeaders};
use crate::producer::{Record, produce};

/// Suffix of the default dead-letter topic: messages of `orders` go to `orders.dlq`.
pub const DEFAULT_DLQ_SUFFIX: &str = ".dlq";

/// Default [`ConsumerOptions::commit_every`].
pub const DEFAULT_COMMIT_EVERY: usize = 256;

/// Default [`ConsumerOptions::commit_interval`].
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(5);

/// What a [`KafkaConsumer`] reads and where its dead letters go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerOptions {
    /// The consumer group (`group.id`): consumers of one group share the partitions.
    pub group_id: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// One dead-letter topic for all `topics`; `None` (default): `<topic>.dlq` per topic.
    pub dead_letter_topic: Option<String>,
    /// Commit as soon as this many acks (and dead letters) are uncommitted (default
    /// [`DEFAULT_COMMIT_EVERY`]). 1: commit after every ack.
    pub commit_every: usize,
    /// Commit at the latest this long after an ack (default [`DEFAULT_COMMIT_INTERVAL`]).
    /// Zero: commit after every ack.
    pub commit_interval: Duration,
}

impl ConsumerOptions {
    /// Consume `topics` in group `group_id`, dead-lettering to `<topic>.dlq`.
    pub fn new<T: Into<String>>(
        group_id: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
    ) -> Self {
        ConsumerOptions {
            group_id: group_id.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            dead_letter_topic: None,
            commit_every: DEFAULT_COMMIT_EVERY,
            commit_interval: DEFAULT_COMMIT_INTERVAL,
        }
    }

    /// Send every dead letter to `topic`.
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// The dead-letter topic of messages consumed from `topic`.
    pub fn dead_letter_topic_for(&self, topic: &str) -> String {
        match &self.dead_letter_topic {
            Some(t) => t.clone(),
            None => format!("{topic}{DEFAULT_DLQ_SUFFIX}"),
        }
    }
}

/// The topic, partition and offset of a record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordPosition {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
}

/// A received record, owned.
#[derive(Clone)]
struct Raw {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: RawHeaders,
}

impl Raw {
    fn of(m: &BorrowedMessage<'_>) -> Raw {
        Raw {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: headers::from_record_headers(m.headers()),
        }
    }

    fn tp(&self) -> Tp {
        (self.topic.clone(), self.partition)
    }
}

type Tp = (String, i32);

/// Local bookkeeping of one assigned partition.
#[derive(Default)]
struct PartitionState {
    /// Changes on every assignment; deliveries of an older assignment are stale.
    epoch: u64,
    /// Offsets received and not yet acked or dead-lettered -> deliveries so far.
    unsettled: BTreeMap<i64, u32>,
    /// One past the highest offset received.
    next: Option<i64>,
    /// The last offset committed by this consumer.
    committed: Option<i64>,
}

impl PartitionState {
    /// The offset to commit: the lowest unsettled one, or past everything received.
    fn committable(&self) -> Option<i64> {
        self.unsettled.keys().next().copied().or(self.next)
    }
}

struct InFlight {
    raw: Raw,
    epoch: u64,
    attempt: u32,
    message: Message,
}

/// What `receive` hands out next.
enum Next {
    Deliver(Delivery),
    /// Not an outbox message: goes to the dead-letter topic instead.
    Undecodable {
        raw: Raw,
        epoch: u64,
        reason: String,
    },
}

/// A nacked record waiting for redelivery.
struct Redelivery {
    raw: Raw,
    epoch: u64,
}

#[derive(Default)]
struct State {
    next_tag: u64,
    next_epoch: u64,
    partitions: HashMap<Tp, PartitionState>,
    in_flight: HashMap<u64, InFlight>,
    redeliveries: VecDeque<Redelivery>,
}

impl State {
    fn assign(&mut self, tp: Tp) {
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        self.partitions.insert(
            tp,
            PartitionState {
                epoch,
                ..PartitionState::default()
            },
        );
    }

    fn revoke(&mut self, tp: &Tp) {
        self.partitions.remove(tp);
        self.in_flight
            .retain(|_, f| (&f.raw.topic, f.raw.partition) != (&tp.0, tp.1));
        self.redeliveries
            .retain(|r| (&r.raw.topic, r.raw.partition) != (&tp.0, tp.1));
    }

    fn is_current(&self, raw: &Raw, epoch: u64) -> bool {
        self.partitions
            .get(&raw.tp())
            .is_some_and(|p| p.epoch == epoch)
    }

    /// Offsets that moved past the last commit (every committable one with `all`),
    /// optionally only of `only`.
    fn to_commit(&self, only: Option<&[Tp]>, all: bool) -> Vec<(Tp, i64)> {
        self.partitions
            .iter()
            .filter(|(tp, _)| only.is_none_or(|o| o.contains(tp)))
            .filter_map(|(tp, p)| {
                let c = p.committable()?;
                (all || p.committed.is_none_or(|done| c > done)).then(|| (tp.clone(), c))
            })
            .collect()
    }

    /// Record `offsets` as committed (they only move forward).
    fn committed(&mut self, offsets: Vec<(Tp, i64)>) {
        for (tp, offset) in offsets {
            if let Some(p) = self.partitions.get_mut(&tp) {
                p.committed = Some(p.committed.map_or(offset, |c| c.max(offset)));
            }
        }
    }
}

struct Shared {
    group_id: String,
    state: Mutex<State>,
    /// Serialises commits, so committed offsets only move forward.
    commit_lock: Mutex<()>,
    notify: Notify,
    /// Acks (and dead letters) settled since the last commit was started.
    uncommitted: AtomicUsize,
    /// A timed commit is scheduled.
    commit_scheduled: AtomicBool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commit every settled offset (of `only`, if given; with `all` also those this
    /// consumer believes committed already). With [`CommitMode::Sync`] blocking until the
    /// broker answered; with [`CommitMode::Async`] the request is only queued, the offsets
    /// are taken as committed at once, and a failure reported to
    /// [`ConsumerContext::commit_callback`] makes the next commit send them again.
    fn commit<C: rdkafka::consumer::Consumer<Ctx>>(
        &self,
        consumer: &C,
        only: Option<&[Tp]>,
        all: bool,
        mode: CommitMode,
    ) -> Result<()> {
        let _serial = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        if only.is_none() {
            self.uncommitted.store(0, Ordering::SeqCst);
        }
        let offsets = self.state().to_commit(only, all);
        if offsets.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &offsets {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                .map_err(|e| parse_error(e, "building the commit list", None))?;
        }
        consumer.commit(&tpl, mode).map_err(|e| {
            parse_error(
                e,
                &format!("committing offsets of group {}", self.group_id),
                None,
            )
        })?;
        self.state().committed(offsets);
        Ok(())
    }

    /// Start an asynchronous commit of everything settled; failures are logged (and the
    /// offsets sent again with the next commit).
    fn commit_now<C: rdkafka::consumer::Consumer<Ctx>>(&self, consumer: &C) {
        if let Err(e) = self.commit(consumer, None, false, CommitMode::Async) {
            tracing::warn!(group = %self.group_id, error = %e,
                "offset commit failed; the next commit retries it");
        }
    }
}

/// The consumer context: keeps local state in step with the group's assignment.
struct Ctx {
    shared: Arc<Shared>,
}

impl ClientContext for Ctx {}

fn tps(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ConsumerContext for Ctx {
    /// A failed asynchronous commit: forget that its offsets were committed, so that the
    /// next commit (timed, by count, or on revocation) sends them again.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let Err(e) = result else {
            return;
        };
        tracing::warn!(group = %self.shared.group_id, error = %e,
            "asynchronous offset commit failed; committing again with the next commit");
        let mut st = self.shared.state();
        for element in offsets.elements() {
            let tp = (element.topic().to_owned(), element.partition());
            if let (Some(p), Offset::Offset(o)) = (st.partitions.get_mut(&tp), element.offset())
                && p.committed == Some(o)
            {
                p.committed = None;
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked = tps(tpl);
                // Commit what was acked before the partitions go to another member
                // (synchronously, and all of it: an asynchronous commit still in flight may
                // yet fail), then forget them: later acks of their deliveries are refused
                // (LeaseLost), and the new owner redelivers everything not committed here.
                if let Err(e) = self
                    .shared
                    .commit(consumer, Some(&revoked), true, CommitMode::Sync)
                {
                    tracing::warn!(error = %e, "commit on partition revocation failed; \
                        the new owner redelivers the uncommitted messages");
                }
                let _serial = self
                    .shared
                    .commit_lock
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let mut st = self.shared.state();
                for tp in &revoked {
                    st.revoke(tp);
                }
                tracing::debug!(group = %self.shared.group_id, partitions = ?revoked, "partitions revoked");
            }
            Rebalance::Assign(tpl) => {
                let assigned = tps(tpl);
                let mut st = self.shared.state();
                for tp in &assigned {
                    st.assign(tp.clone());
                }
                tracing::debug!(group = %self.shared.group_id, partitions = ?assigned, "partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.shared.group_id, error = %e, "rebalance error");
            }
        }
    }
}

/// A [`Consumer`] in a Kafka consumer group, with manual offset commits.
///
/// - `enable.auto.commit=false` and `enable.auto.offset.store=false` (always), and
///   `auto.offset.reset=earliest` unless set: a new group starts at the beginning.
/// - Offsets are committed up to the **lowest unsettled offset** of each partition, so
///   out-of-order acks never commit past a message still being handled. Commits are
///   asynchronous and batched: [`ack`](Consumer::ack) settles the delivery and returns; the
///   consumer commits once [`ConsumerOptions::commit_every`] acks are uncommitted, or
///   [`ConsumerOptions::commit_interval`] after an ack, whichever comes first. A crash
///   loses at most the acks of that window: they are delivered again (the inbox suppresses
///   them).
/// - [`nack`](Consumer::nack) keeps the record in a local redelivery queue that
///   [`receive`](Consumer::receive) serves before new records: the next delivery is the same
///   message with `attempt + 1`. Its offset stays uncommitted until it is settled.
/// - [`dead_letter`](Consumer::dead_letter) produces the record (same key, value and headers,
///   plus `outbox.dlq.*` headers) to the dead-letter topic, waits for the confirmation, then
///   settles and commits it. A record that is not an outbox message (no `outbox.id`) is
///   dead-lettered by `receive` itself, with the decoding error as reason.
/// - On rebalance the acked offsets of the revoked partitions are committed and their local
///   state is dropped; acking a delivery of a revoked partition fails with `LeaseLost` (the
///   new owner delivers it again, and the inbox suppresses the duplicate).
/// - Attempts are counted in memory per partition offset: they restart at 1 after a restart
///   or a rebalance.
pub struct KafkaConsumer {
    consumer: Arc<StreamConsumer<Ctx>>,
    dlq: FutureProducer,
    shared: Arc<Shared>,
    options: ConsumerOptions,
    config: KafkaConfig,
    max_bytes: usize,
    closed: CancellationToken,
}

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("options", &self.options)
            .field("config", &self.config)
            .field("closed", &self.closed.is_cancelled())
            .finish_non_exhaustive()
    }
}

/// Consumer settings this crate needs; setting them to anything else is an error.
const FIXED: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
];

impl KafkaConsumer {
    /// Join `options.group_id` and subscribe to `options.topics`.
    ///
    /// # Errors
    /// `InvalidInput` for an empty group or topic list; `ConfigInvalid` for bad librdkafka
    /// settings or `enable.auto.commit` / `enable.auto.offset.store` set to `true`.
    pub fn new(config: &KafkaConfig, options: ConsumerOptions) -> Result<Self> {
        if options.group_id.is_empty() {
            return Err(Error::invalid_input("consumer group id must not be empty"));
        }
        if options.topics.is_empty() || options.topics.iter().any(String::is_empty) {
            return Err(Error::invalid_input(
                "a consumer needs at least one topic, and topic names must not be empty",
            ));
        }
        if options.dead_letter_topic.as_deref() == Some("") {
            return Err(Error::invalid_input("dead-letter topic must not be empty"));
        }
        if options.commit_every == 0 {
            return Err(Error::invalid_input(
                "ConsumerOptions::commit_every must be at least 1",
            ));
        }
        for (key, value) in FIXED {
            if let Some(v) = config.get(key)
                && !v.trim().eq_ignore_ascii_case(value)
            {
                return Err(Error::config(format!(
                    "{key}={v} is not allowed: the Kafka consumer commits offsets itself after \
                     each ack ({key}={value})"
                )));
            }
        }
        let mut overrides: Vec<(&str, &str)> = vec![("group.id", options.group_id.as_str())];
        overrides.extend(FIXED.iter().copied());
        if config.get("auto.offset.reset").is_none() {
            overrides.push(("auto.offset.reset", "earliest"));
        }
        let shared = Arc::new(Shared {
            group_id: options.group_id.clone(),
            state: Mutex::new(State::default()),
            commit_lock: Mutex::new(()),
            notify: Notify::new(),
            uncommitted: AtomicUsize::new(0),
            commit_scheduled: AtomicBool::new(false),
        });
        let consumer: StreamConsumer<Ctx> = config
            .client_config(&overrides)
            .create_with_context(Ctx {
                shared: Arc::clone(&shared),
            })
            .map_err(|e| parse_error(e, "creating the Kafka consumer", None))?;
        let topics: Vec<&str> = options.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| parse_error(e, "subscribing the Kafka consumer", None))?;
        let mut dlq_overrides = vec![("enable.idempotence", "true"), ("acks", "all")];
        if config.get("message.timeout.ms").is_none() && config.get("delivery.timeout.ms").is_none()
        {
            dlq_overrides.push(("message.timeout.ms", "30000"));
        }
        let dlq: FutureProducer = config
            .client_config(&dlq_overrides)
            .create()
            .map_err(|e| parse_error(e, "creating the dead-letter producer", None))?;
        Ok(KafkaConsumer {
            consumer: Arc::new(consumer),
            dlq,
            shared,
            options,
            config: config.clone(),
            max_bytes: config.message_max_bytes()?,
            closed: CancellationToken::new(),
        })
    }

    /// The options the consumer was built with.
    pub fn options(&self) -> &ConsumerOptions {
        &self.options
    }

    /// Stop delivering: `receive` returns `Ok(None)` from now on. Acks, nacks and dead
    /// letters of outstanding deliveries still work. Dropping the consumer leaves the group,
    /// committing what was acked.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Commit every acked offset now and wait for the broker's answer (acks are committed
    /// in batches by themselves; this is for a clean hand-over, or to see a commit error).
    ///
    /// # Errors
    /// The commit failure, classified by [`parse_error`].
    pub async fn commit(&self) -> Result<()> {
        let consumer = Arc::clone(&self.consumer);
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || {
            shared.commit(consumer.as_ref(), None, true, CommitMode::Sync)
        })
        .await
        .map_err(|e| Error::unexpected("the commit task failed").with_source(e))?
    }

    /// One more settled delivery: commit at once after `commit_every` of them, else make
    /// sure a commit follows within `commit_interval`.
    fn commit_soon(&self) {
        let uncommitted = self.shared.uncommitted.fetch_add(1, Ordering::SeqCst) + 1;
        if uncommitted >= self.options.commit_every || self.options.commit_interval.is_zero() {
            self.shared.commit_now(self.consumer.as_ref());
            return;
        }
        if self.shared.commit_scheduled.swap(true, Ordering::SeqCst) {
            return;
        }
        let consumer: Weak<StreamConsumer<Ctx>> = Arc::downgrade(&self.consumer);
        let shared = Arc::downgrade(&self.shared);
        let interval = self.options.commit_interval;
        tokio::spawn(async move {
            tokio::time::sleep(interval).await;
            // Gone: dropping the consumer committed on leaving the group.
            if let (Some(consumer), Some(shared)) = (consumer.upgrade(), shared.upgrade()) {
                shared.commit_scheduled.store(false, Ordering::SeqCst);
                shared.commit_now(consumer.as_ref());
            }
        });
    }

    /// Where the record of the outstanding delivery `d` is; `None` once it was settled or
    /// its partition revoked. For logs and diagnostics.
    pub fn record_position(&self, d: &Delivery) -> Option<RecordPosition> {
        self.shared
            .state()
            .in_flight
            .get(&d.tag)
            .map(|f| RecordPosition {
                topic: f.raw.topic.clone(),
                partition: f.raw.partition,
                offset: f.raw.offset,
            })
    }

    /// The next queued redelivery whose partition is still assigned.
    fn next_redelivery(&self) -> Option<Next> {
        let mut st = self.shared.state();
        while let Some(r) = st.redeliveries.pop_front() {
            if st.is_current(&r.raw, r.epoch)
                && let Some(next) = Self::register(&mut st, r.raw, r.epoch)
            {
                return Some(next);
            }
        }
        None
    }

    /// Count a delivery of `raw` and hand it out (or hand it to the dead-letter path when it
    /// is not an outbox message). `None` if its partition is not assigned.
    fn register(st: &mut State, raw: Raw, epoch: u64) -> Option<Next> {
        let p = st.partitions.get_mut(&raw.tp())?;
        let deliveries = p.unsettled.entry(raw.offset).or_insert(0);
        *deliveries += 1;
        let attempt = *deliveries;
        let message = match headers::decode(
            &raw.topic,
            raw.key.as_deref(),
            raw.payload.as_deref(),
            &raw.headers,
        ) {
            Ok(m) => m,
            Err(e) => {
                return Some(Next::Undecodable {
                    raw,
                    epoch,
                    reason: format!("undecodable record: {e}"),
                });
            }
        };
        st.next_tag += 1;
        let tag = st.next_tag;
        st.in_flight.insert(
            tag,
            InFlight {
                raw,
                epoch,
                attempt,
                message: message.clone(),
            },
        );
        Some(Next::Deliver(Delivery {
            message,
            attempt,
            tag,
        }))
    }

    /// Take in a record fresh from the broker. `None`: nothing to hand out (a record of this
    /// assignment seen before, or of a partition no longer assigned).
    fn accept(&self, raw: Raw) -> Option<Next> {
        let mut st = self.shared.state();
        if !st.partitions.contains_key(&raw.tp()) {
            // Assignment events precede their messages; be lenient all the same.
            st.assign(raw.tp());
        }
        let p = st.partitions.get_mut(&raw.tp())?;
        if p.unsettled.contains_key(&raw.offset) || p.next.is_some_and(|n| raw.offset < n) {
            // Already received in this assignment (a replay after an internal seek).
            return None;
        }
        p.next = Some(raw.offset + 1);
        let epoch = p.epoch;
        Self::register(&mut st, raw, epoch)
    }

    /// Dead-letter a record that is not an outbox message, so it does not block its
    /// partition. On failure it is queued again and the error returned.
    async fn dead_letter_undecodable(&self, raw: Raw, epoch: u64, reason: &str) -> Result<()> {
        tracing::warn!(topic = %raw.topic, partition = raw.partition, offset = raw.offset,
            %reason, "dead-lettering a record that is not an outbox message");
        match self.produce_dead_letter(&raw, reason, 1).await {
            Ok(()) => {
                self.settle(&raw, epoch);
                self.commit_soon();
                Ok(())
            }
            Err(e) => {
                self.requeue(raw, epoch);
                Err(e)
            }
        }
    }

    async fn produce_dead_letter(&self, raw: &Raw, reason: &str, attempt: u32) -> Result<()> {
        let mut h = raw.headers.clone();
        for (k, v) in [
            (headers::DLQ_REASON, reason.to_owned()),
            (headers::DLQ_TOPIC, raw.topic.clone()),
            (headers::DLQ_PARTITION, raw.partition.to_string()),
            (headers::DLQ_OFFSET, raw.offset.to_string()),
            (headers::DLQ_ATTEMPT, attempt.to_string()),
            (headers::DLQ_GROUP, self.options.group_id.clone()),
        ] {
            h.push((k.to_owned(), Some(v.into_bytes())));
        }
        let topic = self.options.dead_letter_topic_for(&raw.topic);
        let record = Record {
            topic: topic.clone(),
            key: raw.key.clone(),
            payload: raw.payload.clone().unwrap_or_default(),
            headers: h,
        };
        let context = format!(
            "dead-lettering {}/{}@{} to {topic}",
            raw.topic, raw.partition, raw.offset
        );
        produce(
            &self.dlq,
            &record,
            self.max_bytes,
            self.config.send_queue_timeout(),
            &context,
        )
        .await
    }

    /// Mark `raw` done in its partition (if still assigned in `epoch`).
    fn settle(&self, raw: &Raw, epoch: u64) {
        let mut st = self.shared.state();
        if let Some(p) = st.partitions.get_mut(&raw.tp())
            && p.epoch == epoch
        {
            p.unsettled.remove(&raw.offset);
        }
    }

    /// Queue `raw` for redelivery, before later records of its partition.
    fn requeue(&self, raw: Raw, epoch: u64) {
        {
            let mut st = self.shared.state();
            if !st.is_current(&raw, epoch) {
                return;
            }
            let at = st
                .redeliveries
                .iter()
                .position(|r| r.raw.tp() == raw.tp() && r.raw.offset > raw.offset)
                .unwrap_or(st.redeliveries.len());
            st.redeliveries.insert(at, Redelivery { raw, epoch });
        }
        self.shared.notify.notify_waiters();
    }

    /// Remove the in-flight delivery `d`.
    fn take(&self, d: &Delivery, what: &str) -> Result<InFlight> {
        let mut st = self.shared.state();
        let f = st.in_flight.remove(&d.tag).ok_or_else(|| {
            Error::new(
                ErrorKind::LeaseLost,
                format!(
                    "cannot {what} message {} (delivery tag {}): not an outstanding delivery of \
                     this consumer (already settled, or its partition was revoked in a \
                     rebalance and will be redelivered by its new owner)",
                    d.message.id, d.tag
                ),
            )
        })?;
        if !st.is_current(&f.raw, f.epoch) {
            return Err(Error::new(
                ErrorKind::LeaseLost,
                format!(
                    "cannot {what} message {}: partition {}/{} was revoked",
                    d.message.id, f.raw.topic, f.raw.partition
                ),
            ));
        }
        Ok(f)
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    /// Next delivery: a nacked record first, else the next record from the broker.
    ///
    /// # Errors
    /// Permanent consumer errors (authorization, configuration). Temporary ones (broker
    /// down, coordinator moving) are logged and waited out.
    async fn receive(&self) -> Result<Option<Delivery>> {
        loop {
            if self.closed.is_cancelled() {
                return Ok(None);
            }
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = match self.next_redelivery() {
                Some(next) => next,
                None => {
                    let raw = tokio::select! {
                        _ = self.closed.cancelled() => return Ok(None),
                        _ = &mut notified => continue,
                        m = self.consumer.recv() => match m {
                            Ok(m) => Raw::of(&m),
                            Err(e) => {
                                let e = parse_error(e, "receiving from Kafka", None);
                                if e.is_retryable() || e.kind() == ErrorKind::NotFound {
                                    tracing::warn!(error = %e, "Kafka consumer error; retrying");
                                    continue;
                                }
                                return Err(e);
                            }
                        },
                    };
                    match self.accept(raw) {
                        Some(next) => next,
                        None => continue,
                    }
                }
            };
            match next {
                Next::Deliver(d) => return Ok(Some(d)),
                Next::Undecodable { raw, epoch, reason } => {
                    self.dead_letter_undecodable(raw, epoch, &reason).await?;
                }
            }
        }
    }

    /// Settle the delivery; its partition is committed up to the lowest unsettled offset
    /// with the next batched commit ([`ConsumerOptions::commit_every`] /
    /// [`commit_interval`](ConsumerOptions::commit_interval)). Commit failures are logged
    /// and retried with the next commit.
    ///
    /// # Errors
    /// `LeaseLost` if the delivery is unknown or its partition was revoked.
    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let f = self.take(delivery, "ack")?;
        self.settle(&f.raw, f.epoch);
        self.commit_soon();
        Ok(())
    }

    /// Queue the record for redelivery with `attempt + 1`, ahead of new records.
    ///
    /// # Errors
    /// `LeaseLost` if the delivery is unknown or its partition was revoked.
    async fn nack(&self, delivery: &Delivery) -> Result<()> {
        let f = self.take(delivery, "nack")?;
        self.requeue(f.raw, f.epoch);
        Ok(())
    }

    /// Produce the record to the dead-letter topic with `reason`, then settle it (committed
    /// as an ack is).
    ///
    /// # Errors
    /// `LeaseLost` as for `ack`; a failed dead-letter produce (the record is then queued for
    /// redelivery, so nothing is lost).
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()> {
        let f = self.take(delivery, "dead-letter")?;
        if let Err(e) = self.produce_dead_letter(&f.raw, reason, f.attempt).await {
            self.requeue(f.raw, f.epoch);
            return Err(e);
        }
        tracing::debug!(message_id = %f.message.id, %reason, "message dead-lettered");
        self.settle(&f.raw, f.epoch);
        self.commit_soon();
        Ok(())
    }
}

/// A record read from a dead-letter topic: the original message and why it got there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message as originally published (its `topic` is the original topic).
    pub message: Message,
    /// The reason given to [`Consumer::dead_letter`].
    pub reason: String,
    /// Partition of the original record.
    pub partition: i32,
    /// Offset of the original record.
    pub offset: i64,
    /// The delivery attempt that dead-lettered it.
    pub attempt: u32,
    /// The consumer group that dead-lettered it.
    pub group: String,
}

impl DeadLetter {
    /// Decode a record consumed from a dead-letter topic.
    ///
    /// # Errors
    /// `InvalidInput` if the record lacks the `outbox.dlq.*` headers or is not an outbox
    /// message.
    pub fn decode(record: &impl rdkafka::Message) -> Result<DeadLetter> {
        let raw = headers::from_record_headers(record.headers());
        let need = |name: &str| -> Result<String> {
            headers::get(&raw, name)?
                .map(str::to_owned)
                .ok_or_else(|| Error::invalid_input(format!("dead letter has no {name} header")))
        };
        let number = |name: &str| -> Result<i64> {
            let v = need(name)?;
            v.parse()
                .map_err(|_| Error::invalid_input(format!("header {name} is not a number: {v:?}")))
        };
        let topic = need(headers::DLQ_TOPIC)?;
        let message = headers::decode(&topic, record.key(), record.payload(), &raw)?;
        Ok(DeadLetter {
            message,
            reason: need(headers::DLQ_REASON)?,
            partition: i32::try_from(number(headers::DLQ_PARTITION)?)
                .map_err(|_| Error::invalid_input("dead-letter partition out of range"))?,
            offset: number(headers::DLQ_OFFSET)?,
            attempt: u32::try_from(number(headers::DLQ_ATTEMPT)?)
                .map_err(|_| Error::invalid_input("dead-letter attempt out of range"))?,
            group: need(headers::DLQ_GROUP)?,
        })
    }
}

/// Decode any outbox record (as [`KafkaConsumer`] does) into its [`Message`].
///
/// # Errors
/// `InvalidInput` naming what is missing or malformed.
pub fn decode_message(record: &impl rdkafka::Message) -> Result<Message> {
    let raw = headers::from_record_headers(record.headers());
    headers::decode(record.topic(), record.key(), record.payload(), &raw)
}
