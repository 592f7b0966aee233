//! The distributed lock (lease) contract.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// A held lease on a resource.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lease {
    /// The locked resource name.
    pub resource: String,
    /// Who holds it.
    pub owner: String,
    /// Fencing token: strictly greater for every new holder of the resource (a renew keeps it).
    /// Pass it to downstream systems so a stale holder's writes can be rejected.
    pub token: u64,
    /// When the lease lapses unless renewed (by the lock's clock).
    pub expires_at: DateTime<Utc>,
}

/// Leases with fencing tokens, so several relay instances cooperate safely.
///
/// Expiry is judged by the lock's clock (see each backend for its clock-skew assumptions).
/// Holders must renew well before `expires_at` and stop acting on a resource as soon as a
/// renew fails with `LeaseLost`.
#[async_trait]
pub trait DistributedLock: Send + Sync + std::fmt::Debug {
    /// Try to take the lease on `resource` for `ttl`.
    ///
    /// # Behavior
    /// - `Ok(Some(lease))` if the resource was free, released, or its lease expired; the new
    ///   lease's `token` is strictly greater than any token ever issued for the resource.
    /// - `Ok(None)` if another owner holds an unexpired lease. If `owner` itself holds an
    ///   unexpired lease, the call behaves like a renew and returns the same token; if its own
    ///   lease has expired, the call is a new acquisition with a greater token.
    /// - With many concurrent callers on a free resource, exactly one gets `Some`.
    /// - Empty resource or owner, or a zero ttl, fail with `InvalidInput`.
    async fn acquire(&self, resource: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>>;

    /// Extend a held lease to `now + ttl`.
    ///
    /// # Behavior
    /// Returns the updated lease (same token). Fails with `LeaseLost` if `lease.owner` no longer
    /// holds the resource with `lease.token` (expired and taken over, or released). Renewing an
    /// expired lease that nobody took over succeeds.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease>;

    /// Give up a held lease so another owner can take it at once.
    ///
    /// # Behavior
    /// Fails with `LeaseLost` if the caller is not the current holder (same owner and token).
    /// The next acquire by anyone gets a greater token.
    async fn release(&self, lease: &Lease) -> Result<()>;

    /// The current unexpired lease on `resource`, if any.
    ///
    /// # Behavior
    /// `None` when the resource is free, released, or its lease has expired.
    async fn current(&self, resource: &str) -> Result<Option<Lease>>;
}
