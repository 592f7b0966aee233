//! The in-memory backend as a conformance fixture, shared by the suite's own test binaries.

use std::sync::Arc;
use std::time::Duration;

use outbox_conformance::{BusinessRecords, Fixture, SetupContext};
use outbox_core::memory::{MemoryLock, MemoryStore, MemoryTx};
use outbox_core::{Result, async_trait};

/// Business records of the memory backend: its key-value records.
pub struct Records(pub MemoryStore);

#[async_trait]
impl BusinessRecords<MemoryTx> for Records {
    async fn write(&self, tx: &mut MemoryTx, key: &str) -> Result<()> {
        tx.put_record(key, "conformance");
        Ok(())
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.0.record(key).is_some())
    }
}

/// A memory store on the context's clock: 16 shards, 1 h inbox retention.
pub fn store(ctx: &SetupContext, max_message_size: Option<usize>) -> Result<MemoryStore> {
    MemoryStore::builder()
        .with_clock(ctx.shared_clock())
        .with_shard_count(16)
        .with_inbox_retention(Duration::from_secs(3600))
        .with_max_message_size(max_message_size)
        .build()
}

/// The memory store and a memory lock, seen through the fixture's trait objects.
pub fn fixture(ctx: SetupContext, max_message_size: Option<usize>) -> Result<Fixture<MemoryStore>> {
    let store = store(&ctx, max_message_size)?;
    Ok(Fixture {
        outbox: Arc::new(store.clone()),
        inbox: Arc::new(store.clone()),
        lock: Arc::new(MemoryLock::new(ctx.shared_clock())),
        tx_store: Arc::new(store.clone()),
        records: Arc::new(Records(store)),
        clock: ctx.clock,
        keep_alive: Vec::new(),
    })
}
