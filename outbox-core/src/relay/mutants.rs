//! Planted relay flaws, for the conformance suite's mutation tests (`tests/mutants.rs`): each
//! breaks one relay behaviour so the suite can show that a case catches it. Compiled only with
//! the `mutants` feature, which nothing but the suite's own tests enables; never enable it in
//! production.

use std::sync::atomic::{AtomicU8, Ordering};

/// One broken relay behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RelayFlaw {
    /// No flaw.
    None = 0,
    /// Count an outage (retryable `Unavailable`) as a failed attempt of the message.
    CountOutages = 1,
    /// Start sends whatever the lease's send deadline.
    IgnoreDeadline = 2,
    /// Mark a chain dispatched before the broker confirmed it.
    MarkBeforeConfirm = 3,
    /// Admit a fetched message that a chain finished after the fetch started.
    AdmitStaleReads = 4,
    /// Pipeline a whole chain in one run, whatever its topics and its head's past failures.
    PipelineWholeChain = 5,
}

static PLANTED: AtomicU8 = AtomicU8::new(0);

/// Plant `flaw` in every relay of this process (`RelayFlaw::None` removes it).
pub fn plant(flaw: RelayFlaw) {
    PLANTED.store(flaw as u8, Ordering::SeqCst);
}

/// Whether `flaw` is planted.
pub(crate) fn planted(flaw: RelayFlaw) -> bool {
    PLANTED.load(Ordering::SeqCst) == flaw as u8
}
