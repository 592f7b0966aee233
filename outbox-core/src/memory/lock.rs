//! [`MemoryLock`]: leases with fencing tokens in process memory.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::clock::{SharedClock, SystemClock, add_duration};
use crate::error::{Error, Result};
use crate::lock::{DistributedLock, Lease};
use crate::rules::{check_lease, check_lease_names, check_lease_ttl, check_name, lease_lost};

/// A [`DistributedLock`] for the instances of one process (several relays in a test or demo).
///
/// Expiry is judged by the injected clock: a lease is live while `now < expires_at`.
/// Fencing tokens start at 1 and are strictly increasing per resource, across expiries,
/// takeovers and releases (the last token of a resource is kept after release).
/// Clones share the same leases; every method is safe to call concurrently.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use outbox_core::{DistributedLock, ManualClock, memory::MemoryLock};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> outbox_core::Result<()> {
/// let clock = ManualClock::new();
/// let lock = MemoryLock::new(Arc::new(clock.clone()));
/// let a = lock.acquire("shard-0", "relay-a", Duration::from_secs(10)).await?.unwrap();
/// assert!(lock.acquire("shard-0", "relay-b", Duration::from_secs(10)).await?.is_none());
/// clock.advance(Duration::from_secs(10));
/// let b = lock.acquire("shard-0", "relay-b", Duration::from_secs(10)).await?.unwrap();
/// assert!(b.token > a.token);
/// assert!(lock.renew(&a, Duration::from_secs(10)).await.is_err()); // LeaseLost
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryLock {
    inner: Arc<LockInner>,
}

struct LockInner {
    clock: SharedClock,
    resources: Mutex<HashMap<String, Resource>>,
}

#[derive(Debug, Default)]
struct Resource {
    /// The last token issued for the resource (0: never held).
    last_token: u64,
    /// The current (possibly expired) holder; `None` after release.
    holder: Option<Holder>,
}

#[derive(Debug, Clone)]
struct Holder {
    owner: String,
    token: u64,
    expires_at: DateTime<Utc>,
}

impl MemoryLock {
    /// A lock judging expiry by `clock`.
    pub fn new(clock: SharedClock) -> Self {
        MemoryLock {
            inner: Arc::new(LockInner {
                clock,
                resources: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Resource>> {
        self.inner
            .resources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn lease(resource: &str, holder: &Holder) -> Lease {
        Lease {
            resource: resource.to_owned(),
            owner: holder.owner.clone(),
            token: holder.token,
            expires_at: holder.expires_at,
        }
    }
}

impl Default for MemoryLock {
    /// A lock on the [`SystemClock`].
    fn default() -> Self {
        Self::new(Arc::new(SystemClock))
    }
}

impl fmt::Debug for MemoryLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLock")
            .field("clock", &self.inner.clock)
            .field("resources", &self.lock().len())
            .finish()
    }
}

#[async_trait]
impl DistributedLock for MemoryLock {
    async fn acquire(&self, resource: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>> {
        check_lease_names(resource, owner)?;
        check_lease_ttl(ttl)?;
        let now = self.inner.clock.now();
        let expires_at = add_duration(now, ttl);
        let mut resources = self.lock();
        let res = resources.entry(resource.to_owned()).or_default();
        if let Some(holder) = res.holder.as_mut()
            && now < holder.expires_at
        {
            if holder.owner != owner {
                return Ok(None);
            }
            // The holder acquiring again: a renew, same token.
            holder.expires_at = expires_at;
            return Ok(Some(Self::lease(resource, holder)));
        }
        let token = res.last_token.checked_add(1).ok_or_else(|| {
            Error::unexpected(format!("fencing tokens of lock {resource:?} exhausted"))
        })?;
        res.last_token = token;
        let holder = Holder {
            owner: owner.to_owned(),
            token,
            expires_at,
        };
        let lease = Self::lease(resource, &holder);
        res.holder = Some(holder);
        Ok(Some(lease))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        check_lease(lease)?;
        check_lease_ttl(ttl)?;
        let now = self.inner.clock.now();
        let mut resources = self.lock();
        let holder = resources
            .get_mut(&lease.resource)
            .and_then(|r| r.holder.as_mut())
            .filter(|h| h.owner == lease.owner && h.token == lease.token)
            .ok_or_else(|| lease_lost(lease, "it was released or taken over"))?;
        // An expired lease nobody took over is still ours to renew.
        holder.expires_at = add_duration(now, ttl);
        Ok(Self::lease(&lease.resource, holder))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        check_lease(lease)?;
        let mut resources = self.lock();
        let res = resources
            .get_mut(&lease.resource)
            .filter(|r| {
                r.holder
                    .as_ref()
                    .is_some_and(|h| h.owner == lease.owner && h.token == lease.token)
            })
            .ok_or_else(|| lease_lost(lease, "the caller is not the holder"))?;
        // Keep `last_token` so the next holder gets a greater one.
        res.holder = None;
        Ok(())
    }

    async fn current(&self, resource: &str) -> Result<Option<Lease>> {
        check_name("lease resource", resource)?;
        let now = self.inner.clock.now();
        let resources = self.lock();
        Ok(resources
            .get(resource)
            .and_then(|r| r.holder.as_ref())
            .filter(|h| now < h.expires_at)
            .map(|h| Self::lease(resource, h)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::{Clock, ErrorKind, ManualClock};

    const TTL: Duration = Duration::from_secs(10);

    fn lock() -> (ManualClock, MemoryLock) {
        let clock = ManualClock::new();
        (clock.clone(), MemoryLock::new(Arc::new(clock)))
    }

    #[tokio::test]
    async fn tokens_strictly_increase_across_takeover_and_release() {
        let (clock, lock) = lock();
        let a = lock.acquire("r", "a", TTL).await.unwrap().unwrap();
        assert!(lock.acquire("r", "b", TTL).await.unwrap().is_none());

        // Holder acquiring again = renew with the same token.
        clock.advance(Duration::from_secs(5));
        let again = lock.acquire("r", "a", TTL).await.unwrap().unwrap();
        assert_eq!(again.token, a.token);
        assert_eq!(
            again.expires_at,
            clock.now() + chrono::Duration::seconds(10)
        );

        // Expiry, takeover.
        clock.advance(TTL);
        assert!(lock.current("r").await.unwrap().is_none());
        let b = lock.acquire("r", "b", TTL).await.unwrap().unwrap();
        assert!(b.token > a.token);
        assert_eq!(
            lock.renew(&a, TTL).await.unwrap_err().kind(),
            ErrorKind::LeaseLost
        );
        assert_eq!(
            lock.release(&a).await.unwrap_err().kind(),
            ErrorKind::LeaseLost
        );

        // Release, then a new holder (even the same owner) gets a greater token.
        lock.release(&b).await.unwrap();
        assert!(lock.current("r").await.unwrap().is_none());
        assert_eq!(
            lock.release(&b).await.unwrap_err().kind(),
            ErrorKind::LeaseLost
        );
        let b2 = lock.acquire("r", "b", TTL).await.unwrap().unwrap();
        assert!(b2.token > b.token);

        // The same owner re-acquiring after its own expiry is a new holder too.
        clock.advance(TTL);
        let b3 = lock.acquire("r", "b", TTL).await.unwrap().unwrap();
        assert!(b3.token > b2.token);
        assert_eq!(
            lock.renew(&b2, TTL).await.unwrap_err().kind(),
            ErrorKind::LeaseLost
        );

        // Tokens are per resource.
        let other = lock.acquire("s", "a", TTL).await.unwrap().unwrap();
        assert_eq!(other.token, 1);
    }

    #[tokio::test]
    async fn renew_of_expired_lease_not_taken_over_succeeds() {
        let (clock, lock) = lock();
        let a = lock.acquire("r", "a", TTL).await.unwrap().unwrap();
        clock.advance(TTL * 2);
        let renewed = lock.renew(&a, TTL).await.unwrap();
        assert_eq!(renewed.token, a.token);
        assert_eq!(lock.current("r").await.unwrap(), Some(renewed.clone()));
        let forged = Lease {
            owner: "b".into(),
            ..renewed
        };
        assert_eq!(
            lock.renew(&forged, TTL).await.unwrap_err().kind(),
            ErrorKind::LeaseLost
        );
    }

    #[tokio::test]
    async fn invalid_input_is_rejected() {
        let (_, lock) = lock();
        for (r, o, ttl) in [("", "a", TTL), ("r", "", TTL), ("r", "a", Duration::ZERO)] {
            assert_eq!(
                lock.acquire(r, o, ttl).await.unwrap_err().kind(),
                ErrorKind::InvalidInput
            );
        }
        let a = lock.acquire("r", "a", TTL).await.unwrap().unwrap();
        assert_eq!(
            lock.renew(&a, Duration::ZERO).await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_acquirers_exactly_one_wins() {
        let (_, lock) = lock();
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let lock = lock.clone();
                tokio::spawn(async move { lock.acquire("r", &format!("o{i}"), TTL).await })
            })
            .collect();
        let mut winners = 0;
        for t in tasks {
            if t.await.unwrap().unwrap().is_some() {
                winners += 1;
            }
        }
        assert_eq!(winners, 1);
    }
}
