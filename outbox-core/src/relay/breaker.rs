//! The circuit breaker: while the broker or the store is unavailable the whole relay pauses,
//! with a doubling, jittered, capped pause, and counts nothing against any message.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::config::OutageBackoff;

#[derive(Debug, Default)]
struct State {
    /// Consecutive outages without a success in between.
    trips: u32,
    /// Sends and fetches wait until then.
    open_until: Option<Instant>,
}

/// Shared by the relay's tasks; cheap to consult.
#[derive(Debug, Default)]
pub(super) struct Breaker {
    state: Mutex<State>,
}

impl Breaker {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record an outage; opens (or keeps open, longer) the circuit. Returns the pause when
    /// this call opened it.
    pub(super) fn trip(&self, policy: &OutageBackoff, what: &str, error: &str) -> Option<Duration> {
        let mut s = self.state();
        let now = Instant::now();
        if s.open_until.is_some_and(|t| now < t) {
            return None; // already open: one outage, many failing sends
        }
        s.trips = s.trips.saturating_add(1);
        let pause = policy.pause(s.trips);
        s.open_until = Some(now + pause);
        if s.trips == 1 {
            tracing::warn!(%error, ?pause, "relay: circuit open: {what} unavailable; pausing");
        } else {
            tracing::debug!(%error, ?pause, trips = s.trips, "relay: circuit still open: {what}");
        }
        Some(pause)
    }

    /// Record a success; closes the circuit.
    pub(super) fn success(&self) {
        let mut s = self.state();
        if s.trips > 0 {
            tracing::info!(trips = s.trips, "relay: circuit closed: publishing again");
        }
        s.trips = 0;
        s.open_until = None;
    }

    /// When the circuit is open, the instant it half-opens (work may be tried again).
    pub(super) fn open_until(&self) -> Option<Instant> {
        let s = self.state();
        s.open_until.filter(|t| Instant::now() < *t)
    }
}
