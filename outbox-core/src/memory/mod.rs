//! The in-memory backend: an outbox + inbox store with transactions, a distributed lock and a
//! message broker, all in process memory.
//!
//! These honour the full contract of the traits they implement (the conformance suite runs
//! against them), so code written against [`OutboxStore`](crate::OutboxStore),
//! [`InboxStore`](crate::InboxStore), [`TransactionalStore`](crate::TransactionalStore),
//! [`DistributedLock`](crate::DistributedLock), [`Producer`](crate::Producer) and
//! [`Consumer`](crate::Consumer) behaves the same here as on a database and a real broker.
//! Use them in unit tests, demos and single-process tools; nothing survives the process.
//!
//! - [`MemoryStore`]: outbox messages, inbox entries, and *records* (a key-value map standing
//!   in for the application's own tables), written atomically through [`MemoryTx`].
//! - [`MemoryLock`]: leases with fencing tokens, so several relays in one process cooperate.
//! - [`MemoryBroker`]: topics and subscriptions with [`MemoryProducer`] and competing
//!   [`MemoryConsumer`]s, acks, redelivery, dead letters and fault injection.
//!
//! Time (what is due, lease expiry, inbox retention) comes from an injected
//! [`Clock`](crate::Clock); tests pass a [`ManualClock`](crate::ManualClock) and move time
//! forward instead of sleeping.
//!
//! # Example
//!
//! ```
//! use outbox_core::memory::MemoryStore;
//! use outbox_core::{
//!     Message, MessageStatus, Ordering, OutboxStore, PendingQuery, Transaction,
//!     TransactionalStore,
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> outbox_core::Result<()> {
//! let store = MemoryStore::new();
//!
//! // The business write and the message commit together, or not at all.
//! let mut tx = store.begin().await?;
//! tx.put_record("order/42", r#"{"status":"placed"}"#);
//! let placed = Message::builder("orders.placed").key("order-42").payload("42").build()?;
//! tx.add(&placed).await?;
//! let committed = tx.commit().await?; // hand `committed` to the relay for fast dispatch
//! assert_eq!(committed.ids, vec![placed.id]);
//! assert_eq!(store.record("order/42").as_deref(), Some(&br#"{"status":"placed"}"#[..]));
//!
//! // A rolled-back transaction leaves no trace.
//! let mut tx = store.begin().await?;
//! tx.put_record("order/43", "x");
//! tx.add(&Message::builder("orders.placed").build()?).await?;
//! tx.rollback().await?;
//! assert_eq!(store.record_count(), 1);
//!
//! // What a relay would publish now.
//! let due = store
//!     .fetch_pending(&PendingQuery {
//!         shards: (0..store.shard_count()).collect(),
//!         limit: 100,
//!         ordering: Ordering::PerKey,
//!     })
//!     .await?;
//! assert_eq!(due.len(), 1);
//! assert_eq!(due[0].status, MessageStatus::Pending);
//! # Ok(())
//! # }
//! ```

mod broker;
mod lock;
mod store;

pub use broker::{MemoryBroker, MemoryConsumer, MemoryProducer};
pub use lock::MemoryLock;
pub use store::{
    DEFAULT_INBOX_RETENTION, DEFAULT_SHARD_COUNT, MemoryStore, MemoryStoreBuilder, MemoryTx,
};
