//! The whole conformance suite against the in-memory backend, twice: with the concrete types
//! behind the fixture's trait objects, and with trait objects wrapped in trait objects again
//! (exercising the forwarding impls for `Arc<dyn ...>` in outbox-core).

use std::sync::Arc;
use std::time::Duration;

use outbox_conformance::{BusinessRecords, Fixture, SetupContext};
use outbox_core::memory::{MemoryLock, MemoryStore, MemoryTx};
use outbox_core::{DistributedLock, InboxStore, OutboxStore, Result, async_trait};

/// Business records of the memory backend: its key-value records.
struct Records(MemoryStore);

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

fn store(ctx: &SetupContext, max_message_size: Option<usize>) -> Result<MemoryStore> {
    MemoryStore::builder()
        .with_clock(ctx.shared_clock())
        .with_shard_count(16)
        .with_inbox_retention(Duration::from_secs(3600))
        .with_max_message_size(max_message_size)
        .build()
}

/// Concrete `MemoryStore` / `MemoryLock` coerced into the fixture, with a 64 KiB size limit.
async fn concrete(ctx: SetupContext) -> Result<Fixture<MemoryStore>> {
    let store = store(&ctx, Some(64 * 1024))?;
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

/// Trait objects inside trait objects: every call goes through the `Arc<T>` forwarding impls.
async fn wrapped(ctx: SetupContext) -> Result<Fixture<MemoryStore>> {
    let store = store(&ctx, None)?;
    let outbox = Arc::new(store.clone()) as Arc<dyn OutboxStore>;
    let inbox = Arc::new(store.clone()) as Arc<dyn InboxStore>;
    let lock = Arc::new(MemoryLock::new(ctx.shared_clock())) as Arc<dyn DistributedLock>;
    Ok(Fixture {
        outbox: Arc::new(outbox) as Arc<dyn OutboxStore>,
        inbox: Arc::new(inbox) as Arc<dyn InboxStore>,
        lock: Arc::new(lock) as Arc<dyn DistributedLock>,
        tx_store: Arc::new(store.clone()),
        records: Arc::new(Records(store)),
        clock: ctx.clock,
        keep_alive: Vec::new(),
    })
}

fn main() -> std::process::ExitCode {
    outbox_conformance::Suite::new()
        .backend("concrete", concrete)
        .backend("wrapped", wrapped)
        .run()
}
