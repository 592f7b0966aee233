//! The connection core of a [`DynamoDbStore`](crate::DynamoDbStore): the client, the table
//! names, the configuration, the cost meter and the per-process state (sequence clock, shard
//! locks, message locations, shard cursors) every operation shares, and the request limits.
//!
//! A leaf of the operation modules (`queue`, `outbox`, `inbox`, `uow`, `schema`), which take a
//! [`Core`]: of this crate it imports only `config` and `meter`, the types of two of its fields
//! (`meter` imports nothing of this crate, `config` only the limits in `codec`, which imports
//! nothing).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::Instant;

use aws_sdk_dynamodb::Client;
use outbox_core::{Error, Message, MessageId, Result, shard_for};

use crate::config::DynamoDbConfig;
use crate::meter::CostMeter;

/// Items per `BatchWriteItem` (DynamoDB's limit; enforced here because some emulators accept more).
pub const BATCH_WRITE_LIMIT: usize = 25;
/// Keys per `BatchGetItem`.
pub const BATCH_GET_LIMIT: usize = 100;
/// Ids whose queue position a store remembers (from its own adds and fetches), so that
/// `mark_dispatched` and `mark_failed` address the queue item without reading the id guard.
pub const LOCATOR_CAPACITY: usize = 100_000;
/// Parallel requests of one store call (per-shard reads, per-id updates).
pub(crate) const PARALLEL: usize = 8;
/// Attempts to drain `UnprocessedItems` / `UnprocessedKeys` of batch calls.
pub(crate) const BATCH_ATTEMPTS: u32 = 10;

/// State shared by a store, its clones, its lock and its transactions.
pub(crate) struct Core {
    pub(crate) client: Client,
    pub(crate) config: DynamoDbConfig,
    pub(crate) outbox: String,
    pub(crate) inbox: String,
    pub(crate) locks: String,
    pub(crate) meter: CostMeter,
    /// Last sequence handed out by this process (hybrid logical clock).
    hlc: AtomicU64,
    /// One per shard: commits of this process touching a shard take its lock, so they do not
    /// race each other for the shard's next slot (only other processes can).
    shard_locks: Vec<tokio::sync::Mutex<()>>,
    /// The table's recorded shard count was checked against the configuration.
    pub(crate) opened: tokio::sync::OnceCell<()>,
    /// id -> (shard, slot), bounded.
    locator: Mutex<Locator>,
    /// Cursor, holes and what this store knows about each shard's queue.
    pub(crate) shards: Mutex<HashMap<u32, ShardState>>,
    /// Undecodable queue items this store parked.
    pub(crate) poisoned: AtomicU64,
}

/// Bounded id -> (shard, slot) map; the oldest entries go first.
#[derive(Default)]
struct Locator {
    map: HashMap<MessageId, (u32, u64)>,
    order: VecDeque<MessageId>,
}

impl Locator {
    fn insert(&mut self, id: MessageId, at: (u32, u64)) {
        if self.map.insert(id, at).is_none() {
            self.order.push_back(id);
            while self.order.len() > LOCATOR_CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

/// What this store knows about one slot from its last read (or its own `mark_dispatched`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    /// Dispatched: final.
    Done,
    /// Parked (or an undecodable item, parked): a hole once the cursor passes it.
    Parked,
    /// Pending.
    Open,
}

/// Per-shard state kept by a store instance.
#[derive(Debug, Default)]
pub(crate) struct ShardState {
    /// The meta item was read (or written) by this store.
    pub(crate) loaded: bool,
    pub(crate) cursor: u64,
    pub(crate) cursor_seq: u64,
    pub(crate) holes: BTreeSet<u64>,
    /// Slots above the cursor whose state this store saw or caused.
    pub(crate) known: BTreeMap<u64, Known>,
    /// What was last written to (or read from) the meta item.
    pub(crate) persisted: (u64, BTreeSet<u64>),
    pub(crate) last_persist: Option<Instant>,
}

fn wall_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl Core {
    /// The core of a store on `client` with `config` (validated by the caller): no request is
    /// sent.
    pub(crate) fn new(client: Client, config: DynamoDbConfig) -> Core {
        let shard_count = config.shard_count;
        Core {
            client,
            outbox: config.outbox_table(),
            inbox: config.inbox_table(),
            locks: config.lock_table(),
            config,
            meter: CostMeter::default(),
            hlc: AtomicU64::new(0),
            shard_locks: (0..shard_count)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            opened: tokio::sync::OnceCell::new(),
            locator: Mutex::new(Locator::default()),
            shards: Mutex::new(HashMap::new()),
            poisoned: AtomicU64::new(0),
        }
    }

    pub(crate) fn shard_of(&self, message: &Message) -> u32 {
        shard_for(message.key.as_deref(), &message.id, self.config.shard_count)
    }

    /// Lock the given shards (in ascending order, so lockers never deadlock).
    pub(crate) async fn lock_shards(
        &self,
        shards: &std::collections::BTreeSet<u32>,
    ) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut guards = Vec::with_capacity(shards.len());
        for s in shards {
            if let Some(m) = self.shard_locks.get(*s as usize) {
                guards.push(m.lock().await);
            }
        }
        guards
    }

    /// First of `n` sequences: above `floor` (the shards' last sequences) and above every
    /// sequence this process handed out, and at least the wall clock in microseconds.
    ///
    /// # Errors
    /// `Unexpected` if the sequence space is exhausted (a stored sequence near `u64::MAX`).
    pub(crate) fn next_sequence(&self, floor: u64, n: u64) -> Result<u64> {
        let exhausted = || {
            Error::unexpected(format!(
                "sequence space exhausted: a stored sequence ({floor}) is too close to u64::MAX"
            ))
        };
        let mut last = self.hlc.load(AtomicOrdering::SeqCst);
        loop {
            let base = last
                .checked_add(1)
                .ok_or_else(exhausted)?
                .max(floor.checked_add(1).ok_or_else(exhausted)?)
                .max(wall_micros());
            let end = base
                .checked_add(n.saturating_sub(1))
                .ok_or_else(exhausted)?;
            match self.hlc.compare_exchange(
                last,
                end,
                AtomicOrdering::SeqCst,
                AtomicOrdering::SeqCst,
            ) {
                Ok(_) => return Ok(base),
                Err(now) => last = now,
            }
        }
    }

    /// Remember where a message is.
    pub(crate) fn remember(&self, id: MessageId, shard: u32, slot: u64) {
        self.locator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (shard, slot));
    }

    /// Where this process last saw message `id` (its adds and fetches), if it remembers.
    pub(crate) fn located(&self, id: &MessageId) -> Option<(u32, u64)> {
        self.locator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .get(id)
            .copied()
    }
}
