//! The publishing pipeline: what is in flight, one key's chain from send to mark, grouped
//! marks, and how a failure is recorded.
//!
//! A *chain* is the due messages of one key in store order (or a single message without a key,
//! or under [`Ordering::Unordered`]). It goes to the transport in
//! [`Producer::send_ordered`](crate::Producer::send_ordered) calls, one per *run* (see `send_runs`), each started only after the previous run was
//! confirmed, all of them bounded by `publish_timeout`; its confirmed prefix is marked
//! dispatched through the shared
//! [`Marker`], which groups the marks of every chain confirmed meanwhile into one store call.
//! The chain (its ids and its key) stays *in flight* until its marks and its failure record
//! are written, so no later fetch can hand the same message or the same key to a second chain.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};

use tracing::Instrument;

use crate::clock::add_duration;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Message, MessageId, StoredMessage};
use crate::metrics as names;
use crate::store::{FailedAttempt, FailureOutcome, Ordering, OutboxStore};

use super::Inner;

/// One key's due messages (store order), or one message.
pub(super) type Chain = Vec<StoredMessage>;

/// How a chain is cut into runs that are pipelined (a run goes to the transport in one
/// [`Producer::send_ordered`](crate::Producer::send_ordered) call; the next run starts once
/// it was confirmed).
///
/// A pipelining transport has the later messages of a run on the wire before the broker
/// answers for the first, so a failure of the first that the later ones do not share
/// reorders the key: they are delivered, and the failed one arrives after them when it is
/// retried. Failures that are specific to one message mostly come from its topic (no route
/// for it, an unknown or forbidden topic), so a run never spans two topics. And a head that
/// failed before goes alone until it is confirmed, so a message that keeps failing for a
/// reason of its own does not let the rest of its key through at every attempt.
pub(super) fn send_runs(chain: &[StoredMessage]) -> Vec<std::ops::Range<usize>> {
    if super::flawed!(PipelineWholeChain) && !chain.is_empty() {
        return std::iter::once(0..chain.len()).collect();
    }
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, m) in chain.iter().enumerate() {
        let extends = i > 0
            && !(i == 1 && chain[0].attempts > 0)
            && chain[i - 1].message.topic == m.message.topic;
        match runs.last_mut() {
            Some(run) if extends => run.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

/// A finished chain: what to take out of the in-flight set.
#[derive(Debug)]
pub(super) struct ChainDone {
    pub(super) shard: u32,
    pub(super) key: Option<String>,
    pub(super) ids: Vec<MessageId>,
}

impl ChainDone {
    /// The in-flight entries of `chain`.
    pub(super) fn of(chain: &Chain, ordering: Ordering) -> Self {
        let head = chain.first();
        ChainDone {
            shard: head.map_or(0, |m| m.shard),
            key: match ordering {
                Ordering::PerKey => head.and_then(|m| m.message.key.clone()),
                Ordering::Unordered => None,
            },
            ids: chain.iter().map(|m| m.message.id).collect(),
        }
    }
}

/// Messages and keys handed to chains and not yet finished, and the recently finished ones.
///
/// A fetch that started before a chain's marks committed may still return the chain's
/// messages as pending, after the chain finished. So every finished id is remembered with the
/// *epoch* (a counter of finished chains) at which it finished, and a fetch that started at
/// an earlier epoch leaves those ids out.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    ids: HashSet<MessageId>,
    keys: HashSet<String>,
    shards: BTreeMap<u32, usize>,
    epoch: u64,
    finished: HashMap<MessageId, u64>,
    fetches: BTreeMap<u64, usize>,
}

/// A fetch in progress: admit its result with the epoch it started at.
#[derive(Debug)]
pub(super) struct Fetching {
    since: u64,
}

impl InFlight {
    /// Messages in flight.
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Shards with work in flight (never released under it).
    pub(super) fn busy_shards(&self) -> BTreeSet<u32> {
        self.shards.keys().copied().collect()
    }

    /// Register a fetch about to read the store.
    pub(super) fn fetching(&mut self) -> Fetching {
        if self.fetches.is_empty() {
            // No fetch is older than now: ids finished so far were marked before any later
            // read, so nothing needs remembering.
            self.finished.clear();
        }
        *self.fetches.entry(self.epoch).or_default() += 1;
        Fetching { since: self.epoch }
    }

    /// The fetch is over (its result admitted or dropped).
    pub(super) fn fetched(&mut self, fetch: &Fetching) {
        if let Some(n) = self.fetches.get_mut(&fetch.since) {
            *n -= 1;
            if *n == 0 {
                self.fetches.remove(&fetch.since);
            }
        }
        let oldest = self.fetches.keys().next().copied().unwrap_or(self.epoch);
        self.finished.retain(|_, e| *e > oldest);
    }

    /// Split a fetched batch into chains, leaving out messages in flight or finished since the
    /// fetch started, and, under per-key order, every message of a key that has a chain in
    /// flight. Returns the chains and whether anything was left out for a busy key or a stale
    /// read (worth fetching again once a chain is done).
    pub(super) fn admit(
        &self,
        batch: Vec<StoredMessage>,
        ordering: Ordering,
        fetch: &Fetching,
    ) -> (Vec<Chain>, bool) {
        let mut out: Vec<Chain> = Vec::new();
        let mut by_key: BTreeMap<String, usize> = BTreeMap::new();
        let mut waiting = false;
        for m in batch {
            let id = m.message.id;
            if self.ids.contains(&id) {
                continue; // expected: the query asks for the messages in flight too
            }
            if self.finished.get(&id).is_some_and(|e| *e > fetch.since)
                && !super::flawed!(AdmitStaleReads)
            {
                waiting = true; // a stale read of a message finished meanwhile
                continue;
            }
            match (&m.message.key, ordering) {
                (Some(k), Ordering::PerKey) => {
                    if self.keys.contains(k) {
                        waiting = true;
                        continue;
                    }
                    match by_key.get(k) {
                        Some(&i) => out[i].push(m),
                        None => {
                            by_key.insert(k.clone(), out.len());
                            out.push(vec![m]);
                        }
                    }
                }
                _ => out.push(vec![m]),
            }
        }
        (out, waiting)
    }

    /// Record a chain as started.
    pub(super) fn start(&mut self, chain: &Chain, ordering: Ordering) {
        let Some(head) = chain.first() else { return };
        self.ids.extend(chain.iter().map(|m| m.message.id));
        if let (Some(k), Ordering::PerKey) = (&head.message.key, ordering) {
            self.keys.insert(k.clone());
        }
        *self.shards.entry(head.shard).or_default() += chain.len();
    }

    /// Record a chain as finished.
    pub(super) fn finish(&mut self, done: &ChainDone) {
        self.epoch += 1;
        for id in &done.ids {
            self.ids.remove(id);
            if !self.fetches.is_empty() {
                self.finished.insert(*id, self.epoch);
            }
        }
        if let Some(k) = &done.key {
            self.keys.remove(k);
        }
        if let Some(n) = self.shards.get_mut(&done.shard) {
            *n = n.saturating_sub(done.ids.len());
            if *n == 0 {
                self.shards.remove(&done.shard);
            }
        }
    }
}

/// Whether a publish error means the broker (as a whole) is unavailable rather than that this
/// message failed: retryable and of kind `Unavailable` (unreachable, timed out, overloaded).
/// Outages back the whole relay off and count no attempt against the message.
pub(super) fn is_outage(e: &Error) -> bool {
    e.is_retryable() && e.kind() == ErrorKind::Unavailable
}

/// Marks waiting for a leader, each with the channel its chain awaits the result on.
type MarkQueue = Vec<(Vec<MessageId>, tokio::sync::oneshot::Sender<Result<()>>)>;

/// Groups the marks of concurrently confirmed chains into one `mark_dispatched` call: the
/// first caller becomes the leader and flushes whatever queued up while its call ran.
#[derive(Debug, Default)]
pub(super) struct Marker {
    queue: Mutex<MarkQueue>,
    leader: AtomicBool,
}

/// Resets the leader flag even if the leader's task is cancelled mid-call.
struct Leading<'a>(&'a AtomicBool);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.0.store(false, AtomicOrdering::SeqCst);
    }
}

impl Marker {
    fn queue(&self) -> std::sync::MutexGuard<'_, MarkQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mark `ids` dispatched, together with whatever other chains marked meanwhile.
    pub(super) async fn mark(&self, store: &dyn OutboxStore, ids: Vec<MessageId>) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.queue().push((ids, tx));
        while !self.leader.swap(true, AtomicOrdering::SeqCst) {
            let _leading = Leading(&self.leader);
            loop {
                let batch = std::mem::take(&mut *self.queue());
                if batch.is_empty() {
                    break;
                }
                let all: Vec<MessageId> = batch
                    .iter()
                    .flat_map(|(ids, _)| ids.iter().copied())
                    .collect();
                let result = store.mark_dispatched(&all).await;
                for (_, tx) in batch {
                    let _ = tx.send(result.as_ref().map(|_| ()).map_err(copy_error));
                }
            }
            drop(_leading);
            // A request queued between the last take and the reset needs a leader.
            if self.queue().is_empty() {
                break;
            }
        }
        rx.await
            .unwrap_or_else(|_| Err(Error::unavailable("mark cancelled: the relay stopped")))
    }
}

fn copy_error(e: &Error) -> Error {
    Error::new(e.kind(), e.to_string()).set_retryable(e.is_retryable())
}

impl Inner {
    /// Publish one chain, mark its confirmed prefix, record its failure. Never fails: every
    /// outcome is recorded on the messages, in the counters and in the breaker.
    pub(super) async fn run_chain(self: Arc<Self>, chain: Chain) -> ChainDone {
        let done = ChainDone::of(&chain, self.config.ordering);
        let Some(head) = chain.first() else {
            return done;
        };
        let span = tracing::info_span!("outbox.relay.publish",
            message_id = %head.message.id, topic = %head.message.topic,
            key = head.message.key.as_deref().unwrap_or(""), attempt = head.attempts + 1,
            messages = chain.len());
        let messages: Vec<Message> = chain.iter().map(|m| m.message.clone()).collect();
        let timeout = self.config.publish_timeout;
        if super::flawed!(MarkBeforeConfirm) {
            let _ = self.store.mark_dispatched(&done.ids).await;
        }
        // Results in chain order, up to the first failure; runs confirmed before a timeout
        // keep theirs.
        let mut results: Vec<Result<()>> = Vec::with_capacity(messages.len());
        let sent = tokio::time::timeout(timeout, async {
            for run in send_runs(&chain) {
                let want = run.len();
                let part = self.producer.send_ordered(&messages[run]).await;
                let whole = part.len() >= want && part.iter().take(want).all(Result::is_ok);
                results.extend(part.into_iter().take(want));
                if !whole {
                    break;
                }
            }
        })
        .instrument(span.clone())
        .await;
        let mut confirmed = 0;
        let mut failure = None;
        for r in results {
            match r {
                Ok(()) => confirmed += 1,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if sent.is_err() && failure.is_none() {
            failure = Some(Error::unavailable(format!(
                "broker did not confirm within publish_timeout ({timeout:?})"
            )));
        }
        if confirmed > 0 {
            self.breaker.success();
            self.mark_confirmed(&chain[..confirmed])
                .instrument(span.clone())
                .await;
        }
        if let Some((e, m)) = failure.zip(chain.get(confirmed)) {
            if is_outage(&e) && !super::flawed!(CountOutages) {
                // Not this message's fault: nothing is counted against it.
                let _enter = span.enter();
                self.breaker
                    .trip(&self.config.outage_backoff, "broker", &e.to_string());
            } else if let Err(store_err) = self.record_failure(m, &e).instrument(span).await {
                tracing::warn!(message_id = %m.message.id, error = %store_err,
                    "relay: could not record a failed attempt; the message stays due");
                if store_err.is_retryable() {
                    self.breaker
                        .trip(&self.config.outage_backoff, "store", &store_err.to_string());
                }
            }
        }
        done
    }

    /// Mark confirmed messages dispatched, retrying a few times through a store outage. If it
    /// still fails, they stay pending and are published again later (at-least-once).
    async fn mark_confirmed(&self, confirmed: &[StoredMessage]) {
        let ids: Vec<MessageId> = confirmed.iter().map(|m| m.message.id).collect();
        for attempt in 1..=3u32 {
            match self.marker.mark(self.store.as_ref(), ids.clone()).await {
                Ok(()) => {
                    let n = ids.len() as u64;
                    self.counters
                        .published
                        .fetch_add(n, AtomicOrdering::Relaxed);
                    self.count(names::PUBLISHED, n);
                    let now = self.clock.now();
                    *self
                        .last_published
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(now);
                    let histogram = metrics::histogram!(names::PUBLISH_LATENCY,
                        "instance" => self.config.instance_id.clone());
                    for m in confirmed {
                        let age = (now - m.message.created_at).num_microseconds().unwrap_or(0);
                        histogram.record(age.max(0) as f64 / 1e6);
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, messages = ids.len(),
                        "relay: marking published messages failed");
                    if !e.is_retryable() || attempt == 3 {
                        break;
                    }
                    let pause = self
                        .breaker
                        .trip(&self.config.outage_backoff, "store", &e.to_string())
                        .unwrap_or(self.config.outage_backoff.initial);
                    tokio::time::sleep(pause).await;
                }
            }
        }
        tracing::warn!(
            messages = ids.len(),
            "relay: published messages left unmarked; they will be published again"
        );
    }

    /// Record a failure specific to `m`: count the attempt and schedule a retry, or park.
    pub(super) async fn record_failure(&self, m: &StoredMessage, e: &Error) -> Result<()> {
        let retry = &self.config.retry;
        let attempts = m.attempts.saturating_add(1);
        let max_attempts = if retry.park_on_permanent && !e.is_retryable() {
            attempts // park now
        } else {
            retry.max_attempts
        };
        let outcome = self
            .store
            .mark_failed(
                m.message.id,
                &FailedAttempt {
                    error: e.to_string(),
                    next_attempt_at: add_duration(self.clock.now(), retry.backoff(attempts)),
                    max_attempts,
                },
            )
            .await?;
        self.counters.failed.fetch_add(1, AtomicOrdering::Relaxed);
        self.count(names::FAILED, 1);
        match outcome {
            FailureOutcome::Parked { attempts } => {
                self.counters.parked.fetch_add(1, AtomicOrdering::Relaxed);
                self.count(names::PARKED, 1);
                tracing::warn!(message_id = %m.message.id, topic = %m.message.topic, attempts,
                    error = %e, "relay: message parked");
            }
            FailureOutcome::Retrying {
                attempts,
                next_attempt_at,
            } => {
                tracing::debug!(message_id = %m.message.id, attempts, %next_attempt_at,
                    error = %e, "relay: publish failed; will retry");
            }
            FailureOutcome::NotPending => {}
        }
        Ok(())
    }

    /// Add `n` to the counter `name` of this instance.
    pub(super) fn count(&self, name: &'static str, n: u64) {
        metrics::counter!(name, "instance" => self.config.instance_id.clone()).increment(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(topic: &str, attempts: u32, sequence: u64) -> StoredMessage {
        let message = Message::builder(topic).key("k").build().expect("valid");
        StoredMessage {
            message,
            status: crate::MessageStatus::Pending,
            attempts,
            next_attempt_at: None,
            last_error: None,
            dispatched_at: None,
            shard: 0,
            sequence,
        }
    }

    fn one(run: std::ops::Range<usize>) -> Vec<std::ops::Range<usize>> {
        std::iter::once(run).collect()
    }

    #[test]
    fn runs_never_span_two_topics() {
        let chain: Vec<StoredMessage> = ["a", "a", "b", "b", "b", "a"]
            .iter()
            .enumerate()
            .map(|(i, t)| stored(t, 0, i as u64))
            .collect();
        assert_eq!(send_runs(&chain), vec![0..2, 2..5, 5..6]);
        assert_eq!(send_runs(&chain[..1]), one(0..1));
        assert!(send_runs(&[]).is_empty());
    }

    #[test]
    fn a_head_that_failed_before_goes_alone() {
        let chain = vec![stored("a", 2, 1), stored("a", 0, 2), stored("a", 0, 3)];
        assert_eq!(send_runs(&chain), vec![0..1, 1..3]);
        let fresh = vec![stored("a", 0, 1), stored("a", 0, 2)];
        assert_eq!(send_runs(&fresh), one(0..2));
    }
}
