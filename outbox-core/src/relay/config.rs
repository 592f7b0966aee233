//! The relay's knobs: [`RelayConfig`], [`RetryPolicy`] and [`OutageBackoff`], with production
//! defaults and one validation.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::rules::check_name;
use crate::store::Ordering;

/// When to retry a message whose publish failed for a reason specific to it, and when to give
/// up. Outages (the broker or store unavailable) never count here; see [`OutageBackoff`].
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Park a message after this many failed attempts specific to it. Default 10.
    pub max_attempts: u32,
    /// Delay after the first failure. Default 1 s.
    pub initial_backoff: Duration,
    /// Upper bound of the delay. Default 5 min.
    pub max_backoff: Duration,
    /// Growth factor per failure. Default 2.
    pub multiplier: f64,
    /// Randomise each delay between 50 % and 100 % of its value, so many failing messages do not
    /// retry in lockstep. Default true.
    pub jitter: bool,
    /// Park at once on a permanent publish error (`!is_retryable()`, e.g. too large for the
    /// broker, unroutable) instead of retrying. Default true. `requeue` brings parked messages
    /// back after the cause is fixed.
    pub park_on_permanent: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            multiplier: 2.0,
            jitter: true,
            park_on_permanent: true,
        }
    }
}

impl RetryPolicy {
    /// The delay before the next attempt after `attempts` failures (1 = first failure).
    pub fn backoff(&self, attempts: u32) -> Duration {
        exponential(
            self.initial_backoff,
            self.max_backoff,
            self.multiplier,
            attempts,
            self.jitter,
        )
    }

    fn validate(&self) -> Result<()> {
        if self.max_attempts == 0 {
            return Err(Error::config("retry.max_attempts must be at least 1"));
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(Error::config(format!(
                "retry.multiplier must be a finite number >= 1, got {}",
                self.multiplier
            )));
        }
        if self.initial_backoff > self.max_backoff {
            return Err(Error::config(
                "retry.initial_backoff must not exceed retry.max_backoff",
            ));
        }
        Ok(())
    }
}

/// How long the whole relay pauses when the broker or the store is unavailable (the circuit
/// breaker): doubling from `initial` up to `max`, with jitter, reset by the next success.
#[derive(Debug, Clone, PartialEq)]
pub struct OutageBackoff {
    /// First pause. Default 100 ms.
    pub initial: Duration,
    /// Longest pause. Default 30 s.
    pub max: Duration,
}

impl Default for OutageBackoff {
    fn default() -> Self {
        OutageBackoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

impl OutageBackoff {
    /// The pause after `trips` consecutive outages (1 = the first), jittered to 50–100 %.
    pub fn pause(&self, trips: u32) -> Duration {
        exponential(self.initial, self.max, 2.0, trips, true)
    }
}

/// `initial * multiplier^(n-1)`, capped at `max`, optionally jittered to 50–100 %.
fn exponential(
    initial: Duration,
    max: Duration,
    multiplier: f64,
    n: u32,
    jitter: bool,
) -> Duration {
    let exp = n.saturating_sub(1).min(64) as i32;
    let base = (initial.as_secs_f64() * multiplier.max(1.0).powi(exp))
        .min(max.as_secs_f64())
        .max(0.0);
    let secs = if jitter {
        base * (0.5 + 0.5 * fastrand::f64())
    } else {
        base
    };
    Duration::from_secs_f64(secs)
}

/// Every knob of the relay, with production defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    /// Name of this instance in leases. Default: `relay-<uuid>`. Must be unique among live
    /// relays: a second live relay with the same id is refused (see the module docs).
    pub instance_id: String,
    /// Most messages fetched per store query. Default 500.
    pub batch_size: usize,
    /// Most messages in flight at once: fetched and handed to the broker but not yet marked
    /// dispatched. Bounds the relay's memory to about `max_in_flight` times the message size.
    /// Default 2,000.
    pub max_in_flight: usize,
    /// How often to look for due messages when not woken. Default 500 ms.
    pub poll_interval: Duration,
    /// Lease time-to-live; renewed every third of it. Default 30 s.
    pub lease_ttl: Duration,
    /// Longest wait for the broker's confirmation of one send (or one key's ordered send).
    /// Default 10 s. No send starts later than `lease expiry - publish_timeout -
    /// clock_skew_margin`, so none can be confirmed after the lease is gone.
    pub publish_timeout: Duration,
    /// How much the clocks of the relays and the lock may disagree. Default 2 s.
    /// `publish_timeout + clock_skew_margin` must not exceed half of `lease_ttl`.
    pub clock_skew_margin: Duration,
    /// Retry and parking policy for failures specific to a message.
    pub retry: RetryPolicy,
    /// Pause of the whole relay while the broker or store is unavailable.
    pub outage_backoff: OutageBackoff,
    /// Per-key ordering (default) or none.
    pub ordering: Ordering,
    /// Prefix of lease names, to run independent relays against one lock. Default `outbox`.
    pub lock_prefix: String,
    /// How often [`Relay::run`](super::Relay::run) samples the store's counts for the
    /// `outbox_relay_pending`, `..._parked` and `..._oldest_pending_age_seconds` gauges.
    /// Default 15 s.
    pub stats_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            instance_id: format!("relay-{}", uuid::Uuid::now_v7().simple()),
            batch_size: 500,
            max_in_flight: 2_000,
            poll_interval: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
            clock_skew_margin: Duration::from_secs(2),
            retry: RetryPolicy::default(),
            outage_backoff: OutageBackoff::default(),
            ordering: Ordering::PerKey,
            lock_prefix: "outbox".to_owned(),
            stats_interval: Duration::from_secs(15),
        }
    }
}

impl RelayConfig {
    /// Check the configuration; [`Relay::new`](super::Relay::new) calls it.
    ///
    /// # Errors
    /// `ConfigInvalid` naming the offending field.
    pub fn validate(&self) -> Result<()> {
        // The instance id is every lease's owner and the prefix starts every lease name:
        // both follow the shared name rule, or every acquire would fail.
        let config = |e: Error| Error::config(e.message().to_owned());
        check_name("instance_id", &self.instance_id).map_err(config)?;
        check_name("lock_prefix", &self.lock_prefix).map_err(config)?;
        check_name(
            "lock_prefix (with \"/shard/<n>\", a lease name)",
            &super::shard_lease_name(&self.lock_prefix, u32::MAX),
        )
        .map_err(config)?;
        if self.batch_size == 0 {
            return Err(Error::config("batch_size must be at least 1"));
        }
        if self.max_in_flight == 0 {
            return Err(Error::config("max_in_flight must be at least 1"));
        }
        if self.poll_interval.is_zero() {
            return Err(Error::config("poll_interval must be greater than zero"));
        }
        if self.stats_interval.is_zero() {
            return Err(Error::config("stats_interval must be greater than zero"));
        }
        if self.lease_ttl < Duration::from_millis(30) {
            return Err(Error::config("lease_ttl must be at least 30 ms"));
        }
        if self.publish_timeout.is_zero()
            || (self.publish_timeout + self.clock_skew_margin) * 2 > self.lease_ttl
        {
            return Err(Error::config(format!(
                "publish_timeout ({:?}) must be non-zero, and publish_timeout + \
                 clock_skew_margin ({:?}) at most half of lease_ttl ({:?})",
                self.publish_timeout, self.clock_skew_margin, self.lease_ttl
            )));
        }
        if self.outage_backoff.initial.is_zero()
            || self.outage_backoff.initial > self.outage_backoff.max
        {
            return Err(Error::config(
                "outage_backoff.initial must be non-zero and at most outage_backoff.max",
            ));
        }
        self.retry.validate()
    }

    pub(super) fn renew_every(&self) -> Duration {
        self.lease_ttl / 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy {
            jitter: false,
            ..RetryPolicy::default()
        };
        assert_eq!(p.backoff(1), Duration::from_secs(1));
        assert_eq!(p.backoff(2), Duration::from_secs(2));
        assert_eq!(p.backoff(4), Duration::from_secs(8));
        assert_eq!(p.backoff(40), Duration::from_secs(300));
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(300));
        let j = RetryPolicy::default();
        for _ in 0..100 {
            let d = j.backoff(3);
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_secs(4),
                "{d:?}"
            );
        }
        let o = OutageBackoff::default();
        for _ in 0..100 {
            let d = o.pause(30);
            assert!(d >= Duration::from_secs(15) && d <= Duration::from_secs(30));
        }
    }

    #[test]
    fn config_validation_names_the_field() {
        let msg = |c: RelayConfig| c.validate().unwrap_err().to_string();
        assert!(
            msg(RelayConfig {
                batch_size: 0,
                ..RelayConfig::default()
            })
            .contains("batch_size")
        );
        assert!(
            msg(RelayConfig {
                publish_timeout: Duration::from_secs(14),
                ..RelayConfig::default()
            })
            .contains("publish_timeout")
        );
        assert!(
            msg(RelayConfig {
                retry: RetryPolicy {
                    multiplier: f64::NAN,
                    ..RetryPolicy::default()
                },
                ..RelayConfig::default()
            })
            .contains("multiplier")
        );
        assert!(
            msg(RelayConfig {
                outage_backoff: OutageBackoff {
                    initial: Duration::ZERO,
                    max: Duration::from_secs(1)
                },
                ..RelayConfig::default()
            })
            .contains("outage_backoff")
        );
        // The shared name rule for lease owners and names.
        let longest_prefix = "p".repeat(crate::MAX_FIELD_LEN - "/shard/4294967295".len());
        for (instance_id, lock_prefix, field) in [
            ("", "outbox", "instance_id"),
            ("relay\0a", "outbox", "instance_id"),
            ("relay", "", "lock_prefix"),
            ("relay", "out\0box", "lock_prefix"),
            ("relay", &format!("{longest_prefix}p"), "lock_prefix"),
        ] {
            let c = RelayConfig {
                instance_id: instance_id.to_owned(),
                lock_prefix: lock_prefix.to_owned(),
                ..RelayConfig::default()
            };
            let e = c.validate().unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::ConfigInvalid, "{e}");
            assert!(e.message().contains(field), "{field}: {e}");
        }
        RelayConfig {
            lock_prefix: longest_prefix,
            ..RelayConfig::default()
        }
        .validate()
        .unwrap();
        RelayConfig::default().validate().unwrap();
    }
}
