//! Forwarding impls so `Arc<dyn OutboxStore>`, `Box<dyn DistributedLock>` and friends can be
//! passed wherever a generic store, lock or transport is expected.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::Result;
use crate::inbox::{InboxEntry, InboxStore, InsertOutcome};
use crate::lock::{DistributedLock, Lease};
use crate::message::{Message, MessageId, StoredMessage};
use crate::store::{
    Capabilities, FailedAttempt, FailureOutcome, ListQuery, OutboxStats, OutboxStore, PendingQuery,
    RequeueFilter,
};
use crate::transport::{Consumer, Delivery, Producer};

macro_rules! forward {
    ($($ptr:ident),*) => {$(
        #[async_trait]
        impl<T: OutboxStore + ?Sized> OutboxStore for $ptr<T> {
            fn capabilities(&self) -> Capabilities { (**self).capabilities() }
            fn shard_count(&self) -> u32 { (**self).shard_count() }
            async fn add(&self, message: &Message) -> Result<()> { (**self).add(message).await }
            async fn add_batch(&self, messages: &[Message]) -> Result<()> {
                (**self).add_batch(messages).await
            }
            async fn get(&self, id: MessageId) -> Result<Option<StoredMessage>> {
                (**self).get(id).await
            }
            async fn fetch_pending(&self, query: &PendingQuery) -> Result<Vec<StoredMessage>> {
                (**self).fetch_pending(query).await
            }
            async fn mark_dispatched(&self, ids: &[MessageId]) -> Result<()> {
                (**self).mark_dispatched(ids).await
            }
            async fn mark_failed(&self, id: MessageId, attempt: &FailedAttempt)
                -> Result<FailureOutcome> {
                (**self).mark_failed(id, attempt).await
            }
            async fn requeue(&self, filter: &RequeueFilter) -> Result<u64> {
                (**self).requeue(filter).await
            }
            async fn stats(&self) -> Result<OutboxStats> { (**self).stats().await }
            async fn purge_dispatched(&self, retention: Duration, limit: usize) -> Result<u64> {
                (**self).purge_dispatched(retention, limit).await
            }
            async fn list(&self, query: &ListQuery) -> Result<Vec<StoredMessage>> {
                (**self).list(query).await
            }
            async fn dispatched_since(&self, since: DateTime<Utc>) -> Result<Option<u64>> {
                (**self).dispatched_since(since).await
            }
        }

        #[async_trait]
        impl<T: InboxStore + ?Sized> InboxStore for $ptr<T> {
            async fn insert(&self, entry: &InboxEntry) -> Result<InsertOutcome> {
                (**self).insert(entry).await
            }
            async fn contains(&self, entry: &InboxEntry) -> Result<bool> {
                (**self).contains(entry).await
            }
            fn retention(&self) -> Duration { (**self).retention() }
            async fn purge_expired(&self, limit: usize) -> Result<u64> {
                (**self).purge_expired(limit).await
            }
        }

        #[async_trait]
        impl<T: DistributedLock + ?Sized> DistributedLock for $ptr<T> {
            async fn acquire(&self, resource: &str, owner: &str, ttl: Duration)
                -> Result<Option<Lease>> {
                (**self).acquire(resource, owner, ttl).await
            }
            async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
                (**self).renew(lease, ttl).await
            }
            async fn release(&self, lease: &Lease) -> Result<()> { (**self).release(lease).await }
            async fn current(&self, resource: &str) -> Result<Option<Lease>> {
                (**self).current(resource).await
            }
        }

        #[async_trait]
        impl<T: Producer + ?Sized> Producer for $ptr<T> {
            async fn send(&self, message: &Message) -> Result<()> { (**self).send(message).await }
            async fn send_batch(&self, messages: &[Message]) -> Vec<Result<()>> {
                (**self).send_batch(messages).await
            }
            async fn send_ordered(&self, messages: &[Message]) -> Vec<Result<()>> {
                (**self).send_ordered(messages).await
            }
            fn delivery_timeout(&self) -> Option<Duration> { (**self).delivery_timeout() }
        }

        #[async_trait]
        impl<T: Consumer + ?Sized> Consumer for $ptr<T> {
            async fn receive(&self) -> Result<Option<Delivery>> { (**self).receive().await }
            async fn ack(&self, delivery: &Delivery) -> Result<()> { (**self).ack(delivery).await }
            async fn nack(&self, delivery: &Delivery) -> Result<()> {
                (**self).nack(delivery).await
            }
            async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()> {
                (**self).dead_letter(delivery, reason).await
            }
        }
    )*};
}

forward!(Arc, Box);
