//! Time as the stores, leases and the relay see it.
//!
//! Everything that decides "is this due?", "has this lease expired?" or "when is the next
//! attempt?" reads a [`Clock`]. Production code uses [`SystemClock`]; tests use [`ManualClock`]
//! and move time forward explicitly instead of sleeping.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current instant, truncated to whole microseconds (the precision every backend keeps).
    fn now(&self) -> DateTime<Utc>;
}

/// Shared handle to a clock.
pub type SharedClock = Arc<dyn Clock>;

/// Truncate a timestamp to whole microseconds.
pub fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// Add a std [`Duration`] to a timestamp, saturating far in the future instead of overflowing.
pub fn add_duration(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        truncate_micros(Utc::now())
    }
}

/// A clock that only moves when told to. Clones share the same time.
///
/// ```
/// use outbox_core::{Clock, ManualClock};
/// use std::time::Duration;
/// let clock = ManualClock::new();
/// let t0 = clock.now();
/// clock.advance(Duration::from_secs(5));
/// assert_eq!((clock.now() - t0).num_seconds(), 5);
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    /// A manual clock starting at the current wall time.
    pub fn new() -> Self {
        Self::at(Utc::now())
    }

    /// A manual clock starting at `t`.
    pub fn at(t: DateTime<Utc>) -> Self {
        ManualClock {
            now: Arc::new(Mutex::new(truncate_micros(t))),
        }
    }

    /// Move time forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        *now = truncate_micros(add_duration(*now, d));
    }

    /// Set the time to `t` (may move backwards, to test clock skew).
    pub fn set(&self, t: DateTime<Utc>) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) = truncate_micros(t);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}
