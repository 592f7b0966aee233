//! The whole conformance suite against the in-memory backend, twice: with the concrete types
//! behind the fixture's trait objects, and with trait objects wrapped in trait objects again
//! (exercising the forwarding impls for `Arc<dyn ...>` in outbox-core).

mod common;

use std::sync::Arc;

use outbox_conformance::{Fixture, SetupContext};
use outbox_core::memory::{MemoryLock, MemoryStore};
use outbox_core::{DistributedLock, InboxStore, OutboxStore, Result};

use common::{Records, store};

/// Concrete `MemoryStore` / `MemoryLock` coerced into the fixture, with a 64 KiB size limit.
async fn concrete(ctx: SetupContext) -> Result<Fixture<MemoryStore>> {
    common::fixture(ctx, Some(64 * 1024))
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
