//! Inbox processing: handle each consumer delivery at most once per handler, effectively once.
//!
//! For every delivery, [`InboxProcessor`] opens a transaction on the store, inserts the inbox
//! entry (message id, handler key), runs the handler *with that transaction* (so the handler's
//! own writes, and any outbox messages it adds, commit together with the inbox entry), commits,
//! and only then acknowledges the delivery.
//!
//! - A duplicate (entry already present) is acknowledged without running the handler, and
//!   counted in [`ProcessorStats::duplicates`].
//! - A handler error rolls the transaction back and nacks the delivery, so the broker
//!   redelivers it. From the `max_deliveries`-th failed delivery on, the message is
//!   dead-lettered instead, with the handler's error as the reason. A
//!   [permanent](HandlerError::permanent) handler error (a payload that can never be handled,
//!   such as one that does not decode) dead-letters the message at once.
//! - A store error (cannot begin, insert the inbox entry or commit) counts like a handler
//!   error: the delivery is nacked, and dead-lettered from the `max_deliveries`-th delivery on.
//!
//! [`InboxProcessor::run`] handles deliveries of different keys concurrently (up to
//! [`InboxProcessor::with_concurrency`], default [`DEFAULT_CONCURRENCY`]) and the deliveries
//! of one key one after another, in the order they were received. Deliveries without a key
//! are independent.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering as AtomicOrdering};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{Error, ErrorKind, Result};
use crate::inbox::{InboxEntry, InboxStore, InsertOutcome};
use crate::message::Message;
use crate::metrics as names;
use crate::transport::{Consumer, Delivery};
use crate::tx::{Transaction, TransactionalStore};

/// Why a handler failed. Its text becomes the dead-letter reason.
#[derive(Debug)]
pub struct HandlerError {
    message: String,
    permanent: bool,
}

impl HandlerError {
    /// A handler failure described by `message`: the delivery is retried (up to
    /// `max_deliveries`).
    pub fn new(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            permanent: false,
        }
    }

    /// A failure no redelivery can cure (the payload does not decode, its type is unknown):
    /// [`InboxProcessor`] dead-letters the message at once, with `message` as the reason.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            permanent: true,
        }
    }

    /// Whether this failure dead-letters the message without further deliveries.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HandlerError {}

impl From<crate::Error> for HandlerError {
    fn from(e: crate::Error) -> Self {
        HandlerError::new(e.to_string())
    }
}

/// Application logic run for each new message, inside the store's transaction `Tx`.
#[async_trait]
pub trait MessageHandler<Tx: Send>: Send + Sync {
    /// Handle `message`, writing through `tx`.
    ///
    /// # Behavior
    /// Everything written through `tx` (business data, outbox messages via `tx.add`) commits
    /// atomically with the inbox entry, or not at all when this returns an error.
    async fn handle(&self, message: &Message, tx: &mut Tx) -> Result<(), HandlerError>;
}

/// What happened to one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProcessOutcome {
    /// The handler ran and its effects committed; the delivery was acked.
    Handled,
    /// Already handled before; acked without running the handler.
    Duplicate,
    /// The handler failed; the delivery was nacked for redelivery.
    Retrying,
    /// The handler failed on the last allowed delivery; the message was dead-lettered.
    DeadLettered,
}

/// Counters of an [`InboxProcessor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessorStats {
    /// Deliveries handled and committed.
    pub handled: u64,
    /// Deliveries skipped because the inbox had seen them.
    pub duplicates: u64,
    /// Handler failures that led to a redelivery.
    pub retried: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
}

/// What a health endpoint needs to know about an [`InboxProcessor`]
/// ([`InboxProcessor::health`]); the counterpart of the relay's `RelayHealth`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessorHealth {
    /// The handler key its inbox entries are recorded under.
    pub handler_key: String,
    /// Deliveries being processed right now.
    pub in_progress: usize,
    /// When a delivery was last acknowledged as handled or as a duplicate (wall clock).
    pub last_handled_at: Option<DateTime<Utc>>,
    /// When a delivery last failed (handler, inbox or commit error; wall clock).
    pub last_failure_at: Option<DateTime<Utc>>,
    /// Why it failed.
    pub last_failure: Option<String>,
    /// Totals since the processor was created.
    pub totals: ProcessorStats,
}

#[derive(Debug, Default)]
struct Counters {
    handled: AtomicU64,
    duplicates: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    in_progress: AtomicUsize,
    last: Mutex<Last>,
}

/// When a delivery was last handled, and when and why one last failed.
#[derive(Debug, Default, Clone)]
struct Last {
    handled: Option<DateTime<Utc>>,
    failure: Option<(DateTime<Utc>, String)>,
}

impl Counters {
    fn last(&self) -> std::sync::MutexGuard<'_, Last> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts a delivery as in progress while it lives (also when its future is dropped).
struct InProgress<'a>(&'a AtomicUsize);

impl<'a> InProgress<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, AtomicOrdering::Relaxed);
        InProgress(n)
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, AtomicOrdering::Relaxed);
    }
}

/// Runs a [`MessageHandler`] behind the inbox of a [`TransactionalStore`].
pub struct InboxProcessor<S: TransactionalStore, H> {
    store: Arc<S>,
    handler: H,
    handler_key: String,
    max_deliveries: u32,
    concurrency: usize,
    counters: Counters,
}

impl<S: TransactionalStore, H> fmt::Debug for InboxProcessor<S, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxProcessor")
            .field("handler_key", &self.handler_key)
            .field("max_deliveries", &self.max_deliveries)
            .finish_non_exhaustive()
    }
}

const RECEIVE_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const RECEIVE_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Default number of deliveries before a failing message is dead-lettered.
pub const DEFAULT_MAX_DELIVERIES: u32 = 5;

/// Default number of deliveries [`InboxProcessor::run`] handles at once (of different keys).
pub const DEFAULT_CONCURRENCY: usize = 16;

impl<S, H> InboxProcessor<S, H>
where
    S: TransactionalStore + InboxStore,
    H: MessageHandler<S::Tx>,
{
    /// A processor recording entries under `handler_key` (name it after the handler: the same
    /// message is handled once per key). Dead-letters after [`DEFAULT_MAX_DELIVERIES`];
    /// handles [`DEFAULT_CONCURRENCY`] deliveries at once.
    ///
    /// # Errors
    /// `InvalidInput` for a handler key that breaks the shared name rule
    /// ([`crate::rules::check_name`]: empty, NUL, over [`MAX_FIELD_LEN`](crate::MAX_FIELD_LEN)
    /// bytes), since every delivery would fail its inbox insert.
    pub fn new(store: Arc<S>, handler_key: impl Into<String>, handler: H) -> Result<Self> {
        let handler_key = handler_key.into();
        crate::rules::check_name("InboxProcessor handler key", &handler_key)?;
        Ok(InboxProcessor {
            store,
            handler,
            handler_key,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            concurrency: DEFAULT_CONCURRENCY,
            counters: Counters::default(),
        })
    }

    /// Handle up to `n` deliveries (of different keys) at once in [`run`](Self::run); at
    /// least 1. Deliveries waiting behind a busy key count towards `n`, which bounds memory.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Dead-letter a message on its `n`-th failed delivery (at least 1).
    pub fn with_max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n.max(1);
        self
    }

    /// Counters so far.
    pub fn stats(&self) -> ProcessorStats {
        let c = &self.counters;
        ProcessorStats {
            handled: c.handled.load(AtomicOrdering::Relaxed),
            duplicates: c.duplicates.load(AtomicOrdering::Relaxed),
            retried: c.retried.load(AtomicOrdering::Relaxed),
            dead_lettered: c.dead_lettered.load(AtomicOrdering::Relaxed),
        }
    }

    /// Its health: deliveries in progress, when it last handled one and last failed, and its
    /// totals.
    pub fn health(&self) -> ProcessorHealth {
        let Last {
            handled: last_handled_at,
            failure,
        } = self.counters.last().clone();
        let (last_failure_at, last_failure) = failure.unzip();
        ProcessorHealth {
            handler_key: self.handler_key.clone(),
            in_progress: self.counters.in_progress.load(AtomicOrdering::Relaxed),
            last_handled_at,
            last_failure_at,
            last_failure,
            totals: self.stats(),
        }
    }

    /// Process one delivery: inbox insert + handler in one transaction, commit, then ack.
    ///
    /// # Errors
    /// Store or transport errors. The delivery has then been nacked (when possible), so it
    /// will be delivered again, or dead-lettered on its `max_deliveries`-th delivery; nothing
    /// is lost.
    pub async fn process(
        &self,
        consumer: &dyn Consumer,
        delivery: &Delivery,
    ) -> Result<ProcessOutcome> {
        let m = &delivery.message;
        let span = tracing::info_span!("outbox.inbox.handle", message_id = %m.id, topic = %m.topic,
            key = m.key.as_deref().unwrap_or(""), attempt = delivery.attempt,
            handler = %self.handler_key);
        // With the `opentelemetry` feature: a child of the context the message carries.
        crate::otel::set_parent(&span, &m.trace);
        let _counted = InProgress::new(&self.counters.in_progress);
        self.process_inner(consumer, delivery)
            .instrument(span)
            .await
    }

    async fn process_inner(
        &self,
        consumer: &dyn Consumer,
        delivery: &Delivery,
    ) -> Result<ProcessOutcome> {
        let entry = InboxEntry::new(delivery.message.id, self.handler_key.clone());
        let mut tx = match self.store.begin().await {
            Ok(tx) => tx,
            Err(e) => {
                return self
                    .failed(consumer, delivery, e.to_string(), false, Some(e))
                    .await;
            }
        };
        match tx.inbox_insert(&entry).await {
            Ok(InsertOutcome::Duplicate) => {
                // Nothing was written; a failed rollback only means the connection is gone,
                // and dropping the transaction discards it either way.
                if let Err(e) = tx.rollback().await {
                    tracing::debug!(error = %e, "rollback after duplicate failed");
                }
                return self.ack_duplicate(consumer, delivery).await;
            }
            Ok(InsertOutcome::Inserted) => {}
            Err(e) => {
                drop(tx);
                return self
                    .failed(consumer, delivery, e.to_string(), false, Some(e))
                    .await;
            }
        }
        match self.handler.handle(&delivery.message, &mut tx).await {
            Ok(()) => match tx.commit().await {
                Ok(_) => {
                    // The effects are durable from here on, whatever happens to the ack: a
                    // failed ack means a redelivery, which the inbox turns into a duplicate.
                    self.counters.handled.fetch_add(1, AtomicOrdering::Relaxed);
                    self.count(names::INBOX_HANDLED);
                    self.counters.last().handled = Some(Utc::now());
                    consumer.ack(delivery).await?;
                    Ok(ProcessOutcome::Handled)
                }
                // Backends that detect inbox duplicates at commit (DynamoDB) report them here.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    if self.store_has_entry(&entry).await {
                        self.ack_duplicate(consumer, delivery).await
                    } else {
                        self.failed(consumer, delivery, e.to_string(), false, Some(e))
                            .await
                    }
                }
                Err(e) => {
                    self.failed(consumer, delivery, e.to_string(), false, Some(e))
                        .await
                }
            },
            Err(handler_error) => {
                drop(tx);
                let permanent = handler_error.is_permanent();
                self.failed(
                    consumer,
                    delivery,
                    handler_error.to_string(),
                    permanent,
                    None,
                )
                .await
            }
        }
    }

    /// Receive and process deliveries until `shutdown` is cancelled or the consumer closes.
    /// Deliveries being processed when shutdown is requested are finished first; deliveries
    /// received but waiting behind their key are left unacknowledged (delivered again later).
    ///
    /// Deliveries of different keys are processed concurrently (see
    /// [`with_concurrency`](Self::with_concurrency)), those of one key in receive order.
    /// Retryable `receive` errors (broker unavailable) are logged and retried with a backoff
    /// from 100 ms to 30 s; processing errors are logged and the delivery is left to
    /// redelivery.
    ///
    /// # Errors
    /// The first permanent `receive` error (for example an authorization failure).
    pub async fn run(
        &self,
        consumer: &dyn Consumer,
        shutdown: CancellationToken,
    ) -> Result<ProcessorStats> {
        let mut backoff = RECEIVE_BACKOFF_MIN;
        // Deliveries waiting behind a busy key, per key; a key is busy while it has an entry.
        let mut waiting: HashMap<String, VecDeque<Delivery>> = HashMap::new();
        let mut held = 0usize; // running + waiting
        let mut running = FuturesUnordered::new();
        let start = |d: Delivery| async move {
            if let Err(e) = self.process(consumer, &d).await {
                tracing::warn!(message_id = %d.message.id, error = %e,
                    "delivery not processed; it will be redelivered");
            }
            d.message.key
        };
        let mut fatal = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(key) = running.next(), if !running.is_empty() => {
                    held -= 1;
                    if let Some(k) = key {
                        let next = waiting.get_mut(&k).and_then(VecDeque::pop_front);
                        match next {
                            Some(d) => running.push(start(d)),
                            None => { waiting.remove(&k); }
                        }
                    }
                }
                next = consumer.receive(), if held < self.concurrency => {
                    let delivery = match next {
                        Ok(Some(d)) => d,
                        Ok(None) => break,
                        // Broker away for a while: wait and try again rather than stop.
                        Err(e) if e.is_retryable() => {
                            tracing::warn!(error = %e, ?backoff, "receive failed; retrying");
                            tokio::select! {
                                _ = shutdown.cancelled() => break,
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(RECEIVE_BACKOFF_MAX);
                            continue;
                        }
                        Err(e) => { fatal = Some(e); break; }
                    };
                    backoff = RECEIVE_BACKOFF_MIN;
                    held += 1;
                    match delivery.message.key.clone() {
                        Some(k) => match waiting.get_mut(&k) {
                            Some(queue) => queue.push_back(delivery), // key busy: wait
                            None => {
                                waiting.insert(k, VecDeque::new());
                                running.push(start(delivery));
                            }
                        },
                        None => running.push(start(delivery)),
                    }
                }
            }
        }
        // Finish what is running; waiting deliveries stay unacknowledged.
        while running.next().await.is_some() {}
        fatal.map_or(Ok(self.stats()), Err)
    }

    async fn ack_duplicate(
        &self,
        consumer: &dyn Consumer,
        delivery: &Delivery,
    ) -> Result<ProcessOutcome> {
        consumer.ack(delivery).await?;
        self.counters
            .duplicates
            .fetch_add(1, AtomicOrdering::Relaxed);
        self.counters.last().handled = Some(Utc::now());
        self.count(names::INBOX_DUPLICATES);
        Ok(ProcessOutcome::Duplicate)
    }

    /// The delivery failed (handler, inbox insert or commit): nack it for redelivery, or
    /// dead-letter it on its `max_deliveries`-th delivery (at once when `permanent`). A store
    /// error is returned after the nack so the caller sees it; a handler error is an outcome.
    async fn failed(
        &self,
        consumer: &dyn Consumer,
        delivery: &Delivery,
        reason: String,
        permanent: bool,
        store_error: Option<Error>,
    ) -> Result<ProcessOutcome> {
        self.counters.last().failure = Some((Utc::now(), reason.clone()));
        if permanent || delivery.attempt >= self.max_deliveries {
            consumer.dead_letter(delivery, &reason).await?;
            self.counters
                .dead_lettered
                .fetch_add(1, AtomicOrdering::Relaxed);
            self.count(names::INBOX_DEAD_LETTERED);
            tracing::warn!(message_id = %delivery.message.id, attempt = delivery.attempt,
                error = %reason, "delivery failed; message dead-lettered");
            return Ok(ProcessOutcome::DeadLettered);
        }
        let nacked = consumer.nack(delivery).await;
        self.counters.retried.fetch_add(1, AtomicOrdering::Relaxed);
        self.count(names::INBOX_FAILED);
        tracing::debug!(message_id = %delivery.message.id, attempt = delivery.attempt,
            error = %reason, "delivery failed; nacked");
        match store_error {
            Some(e) => {
                if let Err(nack_error) = nacked {
                    tracing::warn!(message_id = %delivery.message.id, error = %nack_error,
                        "nack failed");
                }
                Err(e)
            }
            None => nacked.map(|()| ProcessOutcome::Retrying),
        }
    }

    fn count(&self, name: &'static str) {
        metrics::counter!(name, "instance" => self.handler_key.clone()).increment(1);
    }

    async fn store_has_entry(&self, entry: &InboxEntry) -> bool {
        // A commit-time AlreadyExists may be the inbox entry (a concurrent duplicate) or an
        // outbox message id the handler added twice: look whether the inbox entry is there.
        self.store.contains(entry).await.unwrap_or(false)
    }
}
