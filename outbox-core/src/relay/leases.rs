//! Lease maintenance: the instance guard, the member lease and a fair share of shard leases.
//!
//! Renewal never depends on anything else succeeding: held leases are renewed first, each on
//! its own, and a lock read error during rebalancing only postpones the rebalance. A shard
//! with work in flight is never released: it is marked *draining* (no new fetches) and
//! released once its work finished.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

use crate::clock::add_duration;
use crate::error::{Error, ErrorKind, Result};
use crate::lock::Lease;
use crate::metrics as names;

use super::Inner;

/// The leases one relay holds.
#[derive(Debug, Default)]
pub(super) struct Leases {
    /// `{prefix}/instance/{instance_id}`: refuses a second live relay with the same id.
    pub(super) guard: Option<Lease>,
    /// `{prefix}/member/{slot}`: counted by every relay to compute fair shares.
    pub(super) member: Option<Lease>,
    /// Shard leases held.
    pub(super) shards: BTreeMap<u32, Lease>,
    /// Held shards that must be released once their work in flight finished.
    pub(super) draining: BTreeSet<u32>,
    /// When the next (unforced) maintenance is due, by the relay's clock.
    pub(super) next_maintenance: Option<DateTime<Utc>>,
}

impl Leases {
    /// Shards this relay may start new work on at `now`: held, not draining, and with enough
    /// lease left that a send started now is confirmed or abandoned before the lease expires.
    pub(super) fn sendable(&self, inner: &Inner, now: DateTime<Utc>) -> Vec<u32> {
        self.shards
            .keys()
            .copied()
            .filter(|s| self.may_send(inner, *s, now))
            .collect()
    }

    /// Whether a send for `shard` may start at `now`.
    pub(super) fn may_send(&self, inner: &Inner, shard: u32, now: DateTime<Utc>) -> bool {
        !self.draining.contains(&shard)
            && self
                .shards
                .get(&shard)
                .is_some_and(|l| now <= inner.send_deadline(l) || super::flawed!(IgnoreDeadline))
    }
}

/// The lock resource of `shard`'s lease for relays with `lock_prefix`
/// ([`RelayConfig::lock_prefix`](crate::RelayConfig::lock_prefix)): `{lock_prefix}/shard/{shard}`.
/// Tools that inspect leases (`outbox status`) use it to find them.
pub fn shard_lease_name(lock_prefix: &str, shard: u32) -> String {
    format!("{lock_prefix}/shard/{shard}")
}

impl Inner {
    pub(super) fn shard_resource(&self, shard: u32) -> String {
        shard_lease_name(&self.config.lock_prefix, shard)
    }

    /// The held-leases gauge, set whenever the set of held shard leases changes.
    fn set_leases_held(&self, leases: &Leases) {
        self.gauge(names::LEASES_HELD, leases.shards.len() as f64);
    }

    fn member_resource(&self, slot: u32) -> String {
        format!("{}/member/{slot}", self.config.lock_prefix)
    }

    fn guard_resource(&self) -> String {
        format!(
            "{}/instance/{}",
            self.config.lock_prefix, self.config.instance_id
        )
    }

    /// Latest instant at which a send under `lease` may start.
    pub(super) fn send_deadline(&self, lease: &Lease) -> DateTime<Utc> {
        let margin = self.config.publish_timeout + self.config.clock_skew_margin;
        chrono::Duration::from_std(margin)
            .ok()
            .and_then(|d| lease.expires_at.checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// Renew what is held; then, every third of the TTL (or when `force`d), rebalance: count
    /// members, release surplus shards that have no work in flight (`busy`), mark the others
    /// draining, take free ones up to the fair share.
    ///
    /// # Errors
    /// `ConfigInvalid` when another live relay holds this relay's instance guard; lock
    /// errors of the rebalance (held leases are renewed regardless).
    pub(super) async fn maintain(
        &self,
        leases: &mut Leases,
        busy: &BTreeSet<u32>,
        force: bool,
    ) -> Result<()> {
        let now = self.clock.now();
        if !force && leases.next_maintenance.is_some_and(|t| now < t) {
            return Ok(());
        }
        leases.next_maintenance = Some(add_duration(now, self.config.renew_every()));

        // 1. Renew everything held, each lease on its own.
        let mut renew_failed = false;
        if let Some(g) = leases.guard.take() {
            leases.guard = self.renew_or_drop(g, &mut renew_failed).await;
        }
        if let Some(m) = leases.member.take() {
            leases.member = self.renew_or_drop(m, &mut renew_failed).await;
        }
        for (shard, lease) in std::mem::take(&mut leases.shards) {
            match self.renew_or_drop(lease, &mut renew_failed).await {
                Some(l) => {
                    leases.shards.insert(shard, l);
                }
                None => {
                    leases.draining.remove(&shard);
                    self.count(names::LEASES_LOST, 1);
                }
            }
        }
        self.set_leases_held(leases);
        if renew_failed {
            // Try again soon rather than a whole renew interval later.
            leases.next_maintenance = Some(add_duration(now, self.config.renew_every() / 4));
        }
        self.release_drained(leases, busy).await;

        // 2. The instance guard: refuse to share an instance id with another live relay.
        if leases.guard.is_none() {
            match self
                .lock
                .acquire(&self.guard_resource(), &self.owner, self.config.lease_ttl)
                .await?
            {
                Some(g) => leases.guard = Some(g),
                None => {
                    let holder = self
                        .lock
                        .current(&self.guard_resource())
                        .await
                        .ok()
                        .flatten();
                    self.release_all(leases).await;
                    return Err(Error::config(format!(
                        "another live relay uses instance_id {:?} (lease {} held by {}{}); \
                         instance ids must be unique among running relays",
                        self.config.instance_id,
                        self.guard_resource(),
                        holder.as_ref().map_or("?", |l| l.owner.as_str()),
                        holder
                            .as_ref()
                            .map(|l| format!(" until {}", l.expires_at))
                            .unwrap_or_default(),
                    )));
                }
            }
        }

        // 3. Membership and fair share. An error here leaves the renewed leases as they are.
        self.rebalance(leases, busy).await
    }

    async fn rebalance(&self, leases: &mut Leases, busy: &BTreeSet<u32>) -> Result<()> {
        let ttl = self.config.lease_ttl;
        let shard_count = self.store.shard_count();
        if leases.member.is_none() {
            for slot in 0..shard_count {
                if let Some(l) = self
                    .lock
                    .acquire(&self.member_resource(slot), &self.owner, ttl)
                    .await?
                {
                    leases.member = Some(l);
                    break;
                }
            }
        }
        let Some(member) = &leases.member else {
            // More relays than shards: stand by, giving up what is not busy.
            self.shed(leases, 0, busy).await;
            return Ok(());
        };
        let my_slot = member
            .resource
            .rsplit('/')
            .next()
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
        // Live members, and how many of them have a lower slot than ours.
        let (mut members, mut rank) = (0u32, 0u32);
        for slot in 0..shard_count {
            let live = slot == my_slot
                || self
                    .lock
                    .current(&self.member_resource(slot))
                    .await?
                    .is_some();
            if live {
                members += 1;
                if slot < my_slot {
                    rank += 1;
                }
            }
        }
        let target = fair_share(shard_count, members, rank);
        self.shed(leases, target, busy).await;
        // Take free shards up to the target, starting at this member's natural range.
        let start = rank.saturating_mul(shard_count / members.max(1));
        for i in 0..shard_count {
            if leases.shards.len() >= target {
                break;
            }
            let shard = (start + i) % shard_count;
            if !leases.shards.contains_key(&shard) {
                self.try_acquire_shard(leases, shard).await?;
            }
        }
        Ok(())
    }

    /// Keep at most `target` shards that are not draining: release surplus idle shards at
    /// once (highest first) and mark surplus busy ones draining.
    async fn shed(&self, leases: &mut Leases, target: usize, busy: &BTreeSet<u32>) {
        let mut keep = leases.shards.len() - leases.draining.len().min(leases.shards.len());
        let candidates: Vec<u32> = leases.shards.keys().rev().copied().collect();
        for shard in candidates {
            if keep <= target {
                break;
            }
            if leases.draining.contains(&shard) {
                continue;
            }
            keep -= 1;
            if busy.contains(&shard) {
                leases.draining.insert(shard);
            } else if let Some(l) = leases.shards.remove(&shard) {
                self.release_quietly(&l).await;
            }
        }
        self.set_leases_held(leases);
    }

    /// Release draining shards whose work in flight finished.
    pub(super) async fn release_drained(&self, leases: &mut Leases, busy: &BTreeSet<u32>) {
        let done: Vec<u32> = leases
            .draining
            .iter()
            .filter(|s| !busy.contains(s))
            .copied()
            .collect();
        for shard in done {
            leases.draining.remove(&shard);
            if let Some(l) = leases.shards.remove(&shard) {
                self.release_quietly(&l).await;
            }
        }
        self.set_leases_held(leases);
    }

    /// Acquire the free ones of `shards` (unknown shard numbers are ignored).
    pub(super) async fn acquire_shards(&self, leases: &mut Leases, shards: &[u32]) -> Result<()> {
        let shard_count = self.store.shard_count();
        let wanted: BTreeSet<u32> = shards
            .iter()
            .copied()
            .filter(|s| *s < shard_count)
            .collect();
        for shard in wanted {
            if !leases.shards.contains_key(&shard) {
                self.try_acquire_shard(leases, shard).await?;
            }
        }
        Ok(())
    }

    async fn try_acquire_shard(&self, leases: &mut Leases, shard: u32) -> Result<()> {
        if let Some(l) = self
            .lock
            .acquire(
                &self.shard_resource(shard),
                &self.owner,
                self.config.lease_ttl,
            )
            .await?
        {
            tracing::debug!(shard, token = l.token, "relay: shard lease acquired");
            self.count(names::LEASES_ACQUIRED, 1);
            leases.shards.insert(shard, l);
            self.set_leases_held(leases);
        }
        Ok(())
    }

    async fn renew_or_drop(&self, lease: Lease, failed: &mut bool) -> Option<Lease> {
        match self.lock.renew(&lease, self.config.lease_ttl).await {
            Ok(l) => Some(l),
            Err(e) if e.kind() == ErrorKind::LeaseLost => {
                tracing::warn!(resource = %lease.resource, "relay: lease lost");
                None
            }
            Err(e) => {
                *failed = true;
                tracing::warn!(resource = %lease.resource, error = %e, "relay: renew failed");
                // Keep it only while it is certainly still ours.
                (lease.expires_at > self.clock.now()).then_some(lease)
            }
        }
    }

    async fn release_quietly(&self, lease: &Lease) {
        if let Err(e) = self.lock.release(lease).await {
            tracing::debug!(resource = %lease.resource, error = %e, "relay: release failed");
        }
    }

    /// Release every lease (shutdown, or a refused start). Callers make sure nothing is in
    /// flight.
    pub(super) async fn release_all(&self, leases: &mut Leases) {
        for (_, lease) in std::mem::take(&mut leases.shards) {
            self.release_quietly(&lease).await;
        }
        leases.draining.clear();
        self.set_leases_held(leases);
        for lease in [leases.member.take(), leases.guard.take()]
            .into_iter()
            .flatten()
        {
            self.release_quietly(&lease).await;
        }
        leases.next_maintenance = None;
    }
}

/// Shards the member of rank `rank` (0-based, by member slot) should hold when `members`
/// relays share `shards`: `shards / members`, plus one for the first `shards % members` ranks,
/// so the shares add up to exactly `shards` and differ by at most one.
pub(super) fn fair_share(shards: u32, members: u32, rank: u32) -> usize {
    let members = members.max(1);
    (shards / members + u32::from(rank < shards % members)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_shares_cover_every_shard_and_differ_by_at_most_one() {
        for shards in 1..40u32 {
            for members in 1..12u32 {
                let shares: Vec<usize> = (0..members)
                    .map(|r| fair_share(shards, members, r))
                    .collect();
                assert_eq!(shares.iter().sum::<usize>(), shards as usize);
                let (min, max) = (shares.iter().min(), shares.iter().max());
                assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{shares:?}");
            }
        }
        assert_eq!(fair_share(4, 3, 0), 2);
        assert_eq!(fair_share(4, 3, 2), 1);
    }
}
