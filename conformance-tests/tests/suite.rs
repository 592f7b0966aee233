//! The runner reports what it did: a case a backend cannot run is counted as ignored, with
//! its reason, never as passed; a case that applies runs and can fail.

mod common;

use std::sync::Arc;

use outbox_conformance::{Arguments, Conclusion, Fixture, SetupContext, Suite};
use outbox_core::memory::{MemoryLock, MemoryStore};
use outbox_core::{Error, ErrorKind, Result};

use common::store;

async fn limited(ctx: SetupContext) -> Result<Fixture<MemoryStore>> {
    common::fixture(ctx, Some(64 * 1024))
}

async fn unlimited(ctx: SetupContext) -> Result<Fixture<MemoryStore>> {
    common::fixture(ctx, None)
}

/// The memory store seen as a backend without transactions.
async fn no_transactions(ctx: SetupContext) -> Result<Fixture<outbox_conformance::NoTransactions>> {
    let store = store(&ctx, None)?;
    Ok(Fixture::without_transactions(
        Arc::new(store.clone()),
        Arc::new(store),
        Arc::new(MemoryLock::new(ctx.shared_clock())),
        ctx.clock,
    ))
}

async fn service_down(_ctx: SetupContext) -> Result<Fixture<MemoryStore>> {
    Err(Error::new(
        ErrorKind::Unavailable,
        "no server on 127.0.0.1:1",
    ))
}

/// Run only the case named `name` (exact match), on one thread.
fn run(suite: Suite, name: &str) -> Conclusion {
    let args = Arguments {
        filter: Some(name.to_owned()),
        exact: true,
        test_threads: Some(1),
        ..Arguments::default()
    };
    suite.run_with(&args)
}

fn counts(c: &Conclusion) -> (u64, u64, u64) {
    (c.num_passed, c.num_ignored, c.num_failed)
}

#[test]
fn a_case_without_its_capability_is_ignored_not_passed() {
    let c = run(Suite::new().backend("", unlimited), "store_size_limit");
    assert_eq!(counts(&c), (0, 1, 0), "no size limit: ignored");
    let c = run(Suite::new().backend("", limited), "store_size_limit");
    assert_eq!(counts(&c), (1, 0, 0), "with a size limit: runs and passes");
    let c = run(Suite::new().backend("", unlimited), "store_batch_limit");
    assert_eq!(counts(&c), (0, 1, 0), "no batch limit: ignored");
}

#[test]
fn transaction_cases_are_ignored_without_transactions() {
    for name in ["tx_failed_add_aborts", "store_transactional_add_commit"] {
        let c = run(Suite::new().backend("", no_transactions), name);
        assert_eq!(
            counts(&c),
            (0, 1, 0),
            "{name} without transactions: ignored"
        );
    }
    let c = run(
        Suite::new().backend("", no_transactions),
        "store_round_trip",
    );
    assert_eq!(
        counts(&c),
        (1, 0, 0),
        "a case that needs nothing still runs"
    );
}

#[test]
fn an_unavailable_service_is_ignored_or_fails_when_required() {
    let required = std::env::var("OUTBOX_TEST_REQUIRED").is_ok_and(|v| v == "1");
    if required {
        eprintln!("expected below: store_round_trip FAILED (a required service is absent)");
    }
    let c = run(Suite::new().backend("", service_down), "store_round_trip");
    if required {
        assert_eq!(counts(&c), (0, 0, 1), "required: an absent service fails");
    } else {
        assert_eq!(counts(&c), (0, 1, 0), "not required: ignored, never passed");
    }
}

#[test]
fn groups_prefix_names_and_every_case_is_a_trial() {
    let suite = Suite::new().backend("a", unlimited).backend("b", unlimited);
    let c = run(suite, "b::store_round_trip");
    assert_eq!(counts(&c), (1, 0, 0));
    let total = outbox_conformance::backend_cases::<MemoryStore>().len() as u64;
    assert_eq!(
        c.num_filtered_out,
        2 * total - 1,
        "one trial per case and group"
    );
}
