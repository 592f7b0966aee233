//! The runner: every case as a trial of a test binary with `harness = false`, through
//! libtest-mimic (the command line and output of `cargo test`: filters, `--list`,
//! `--test-threads`, `--ignored`).
//!
//! A case declares what it needs beyond the contract every backend meets (transactions, a
//! batch limit, an unroutable topic, ...). Where the backend or transport lacks it, the case
//! is reported as `ignored` with the reason, by name, and never counted as passed. So is a
//! case whose service is not running, unless [`REQUIRED_ENV`](crate::harness::REQUIRED_ENV)
//! is `1`, which makes it fail.

use std::any::TypeId;
use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;

use libtest_mimic::{Arguments, Completion, Conclusion, Trial};
use outbox_core::{Result, TransactionalStore};

use crate::harness::{Fixture, NoTransactions, SetupContext, block_on};
use crate::transport::TransportHarness;
use crate::{inbox, lock, relay, store, transport, tx};

/// The future of one running case.
pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

/// One case of the suite, run against a `T`: a backend's [`Fixture`] or a
/// [`TransportHarness`].
pub struct Case<T: ?Sized> {
    /// The test name, e.g. `store_round_trip`.
    pub name: &'static str,
    /// Why the case does not apply to this `T` (`None`: it applies).
    pub not_applicable: fn(&T) -> Option<&'static str>,
    /// The case itself: panics with a description of the violated behaviour.
    pub run: for<'a> fn(&'a T) -> CaseFuture<'a>,
}

impl<T: ?Sized> std::fmt::Debug for Case<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case").field("name", &self.name).finish()
    }
}

// What cases need. Each returns the reason the case does not apply, or `None`.

fn always<T: ?Sized>(_: &T) -> Option<&'static str> {
    None
}

fn transactions<S: TransactionalStore + 'static>(f: &Fixture<S>) -> Option<&'static str> {
    if !f.outbox.capabilities().transactions {
        Some("the backend has no transactions (Capabilities::transactions is false)")
    } else if TypeId::of::<S>() == TypeId::of::<NoTransactions>() {
        Some("the fixture has no transactions (Fixture::without_transactions)")
    } else {
        None
    }
}

fn batch_limit<S: TransactionalStore>(f: &Fixture<S>) -> Option<&'static str> {
    f.outbox
        .capabilities()
        .max_batch
        .is_none()
        .then_some("the backend has no batch limit (Capabilities::max_batch is None)")
}

fn size_limit<S: TransactionalStore>(f: &Fixture<S>) -> Option<&'static str> {
    f.outbox
        .capabilities()
        .max_message_size
        .is_none()
        .then_some("the backend has no size limit (Capabilities::max_message_size is None)")
}

fn unreachable_producer(h: &dyn TransportHarness) -> Option<&'static str> {
    h.unreachable_producer()
        .is_none()
        .then_some("the harness has no unreachable producer")
}

fn unroutable_topic(h: &dyn TransportHarness) -> Option<&'static str> {
    h.unroutable_topic()
        .is_none()
        .then_some("the broker routes every topic (TransportHarness::unroutable_topic is None)")
}

fn broker_size_limit(h: &dyn TransportHarness) -> Option<&'static str> {
    h.max_message_size()
        .is_none()
        .then_some("no known broker size limit (TransportHarness::max_message_size is None)")
}

fn permanent_rejection(h: &dyn TransportHarness) -> Option<&'static str> {
    (h.unroutable_topic().is_none() && h.max_message_size().is_none())
        .then_some("nothing the broker rejects for good: no unroutable topic, no size limit")
}

/// `name [need] => case` lines to a `Vec<Case<_>>`; `need` defaults to `always`.
macro_rules! cases {
    ($($name:ident $([$need:ident])? => $case:path),* $(,)?) => {
        vec![$(Case {
            name: stringify!($name),
            not_applicable: cases!(@need $($need)?),
            run: |f| Box::pin($case(f)),
        }),*]
    };
    (@need) => { always };
    (@need $need:ident) => { $need };
}

/// The outbox store cases (`store_*`): contract items 1–10.
pub fn store_cases<S: TransactionalStore + 'static>() -> Vec<Case<Fixture<S>>> {
    cases! {
        store_round_trip => store::round_trip,
        store_shard_assignment => store::shard_assignment,
        store_transactional_add_commit [transactions] => store::transactional_add_commit,
        store_transactional_add_rollback [transactions] => store::transactional_add_rollback,
        store_duplicate_add_rejected => store::duplicate_add_rejected,
        store_duplicate_within_batch => store::duplicate_within_batch,
        store_duplicate_add_in_transaction [transactions] => store::duplicate_add_in_transaction,
        store_add_batch_in_order => store::add_batch_in_order,
        store_batch_limit [batch_limit] => store::batch_limit,
        store_fetch_only_due => store::fetch_only_due,
        store_fetch_only_requested_shards => store::fetch_only_requested_shards,
        store_fetch_oldest_first_and_limit => store::fetch_oldest_first_and_limit,
        store_mark_dispatched_idempotent => store::mark_dispatched_idempotent,
        store_mark_dispatched_parked => store::mark_dispatched_parked,
        store_mark_failed_backoff => store::mark_failed_backoff,
        store_mark_failed_parks_after_max_attempts => store::mark_failed_parks_after_max_attempts,
        store_requeue_parked => store::requeue_parked,
        store_per_key_failing_head_blocks_key => store::per_key_failing_head_blocks_key,
        store_per_key_parked_head_blocks_key => store::per_key_parked_head_blocks_key,
        store_per_key_delayed_head_blocks_key => store::per_key_delayed_head_blocks_key,
        store_per_key_order_concurrent_writers => store::per_key_order_concurrent_writers,
        store_stats_counts_and_oldest_age => store::stats_counts_and_oldest_age,
        store_purge_dispatched_retention_and_limit => store::purge_dispatched_retention_and_limit,
        store_size_limit [size_limit] => store::size_limit,
        store_invalid_input => store::invalid_input,
        store_longest_names_round_trip => store::longest_names_round_trip,
        store_last_error_rule => store::last_error_rule,
        store_list_filters_and_order => store::list_filters_and_order,
        store_dispatched_since_counts => store::dispatched_since_counts,
    }
}

/// The transaction cases (`tx_*`): every one needs transactions.
pub fn tx_cases<S: TransactionalStore + 'static>() -> Vec<Case<Fixture<S>>> {
    cases! {
        tx_commit_reports_ids_and_shards [transactions] => tx::commit_reports_ids_and_shards,
        tx_invisible_before_commit [transactions] => tx::invisible_before_commit,
        tx_add_order_is_sequence_order [transactions] => tx::add_order_is_sequence_order,
        tx_commit_order_is_fetch_order [transactions] => tx::commit_order_is_fetch_order,
        tx_failed_add_aborts [transactions] => tx::failed_add_aborts,
        tx_duplicate_add_aborts [transactions] => tx::duplicate_add_aborts,
        tx_failed_inbox_insert_aborts [transactions] => tx::failed_inbox_insert_aborts,
        tx_rollback_after_failure [transactions] => tx::rollback_after_failure,
        tx_inbox_duplicate_does_not_abort [transactions] => tx::inbox_duplicate_does_not_abort,
    }
}

/// The inbox cases (`inbox_*`): contract items 1–4.
pub fn inbox_cases<S: TransactionalStore + 'static>() -> Vec<Case<Fixture<S>>> {
    cases! {
        inbox_first_insert_wins => inbox::first_insert_wins,
        inbox_concurrent_insert_one_winner => inbox::concurrent_insert_one_winner,
        inbox_concurrent_transactional_insert_one_winner [transactions] => inbox::concurrent_transactional_insert_one_winner,
        inbox_transactional_insert_commit [transactions] => inbox::transactional_insert_commit,
        inbox_transactional_insert_rollback [transactions] => inbox::transactional_insert_rollback,
        inbox_transactional_duplicate [transactions] => inbox::transactional_duplicate,
        inbox_retention_expiry => inbox::retention_expiry,
        inbox_purge_expired => inbox::purge_expired,
        inbox_invalid_handler_key => inbox::invalid_handler_key,
        inbox_longest_handler_key => inbox::longest_handler_key,
    }
}

/// The distributed lock cases (`lock_*`): contract items 1–4.
pub fn lock_cases<S: TransactionalStore + 'static>() -> Vec<Case<Fixture<S>>> {
    cases! {
        lock_single_holder => lock::single_holder,
        lock_release_then_reacquire => lock::release_then_reacquire,
        lock_expiry_takeover => lock::expiry_takeover,
        lock_renew_extends => lock::renew_extends,
        lock_non_holder_rejected => lock::non_holder_rejected,
        lock_tokens_strictly_increase => lock::tokens_strictly_increase,
        lock_concurrent_acquire_one_winner => lock::concurrent_acquire_one_winner,
        lock_concurrent_takeover_one_winner => lock::concurrent_takeover_one_winner,
        lock_invalid_input => lock::invalid_input,
        lock_invalid_names => lock::invalid_names,
        lock_longest_names => lock::longest_names,
    }
}

/// The relay cases (`relay_*`): relay items 1–7, with the backend's store and lock and the
/// in-memory broker.
pub fn relay_cases<S: TransactionalStore + 'static>() -> Vec<Case<Fixture<S>>> {
    cases! {
        relay_publishes_every_message_exactly_once => relay::publishes_every_message_exactly_once,
        relay_instances_split_work => relay::instances_split_work,
        relay_killed_relay_loses_nothing => relay::killed_relay_loses_nothing,
        relay_broker_down_then_recovers => relay::broker_down_then_recovers,
        relay_parks_after_max_attempts_then_requeue => relay::parks_after_max_attempts_then_requeue,
        relay_per_key_order_survives_failures => relay::per_key_order_survives_failures,
        relay_graceful_shutdown_releases_leases => relay::graceful_shutdown_releases_leases,
        relay_notify_dispatches_immediately => relay::notify_dispatches_immediately,
        relay_run_once_drains_one_batch => relay::run_once_drains_one_batch,
        relay_outage_parks_nothing_in_run => relay::outage_parks_nothing_in_run,
        relay_stale_holder_publishes_nothing => relay::stale_holder_publishes_nothing,
        relay_duplicate_instance_id_refused => relay::duplicate_instance_id_refused,
        relay_shutdown_finishes_batch_in_flight => relay::shutdown_finishes_batch_in_flight,
        relay_racing_relays_never_overlap => relay::racing_relays_never_overlap,
        relay_stale_fetch_publishes_once => relay::stale_fetch_publishes_once,
        relay_killed_at_any_point_loses_nothing => relay::killed_at_any_point_loses_nothing,
        relay_backlog_drains_at_in_flight_cap => relay::backlog_drains_at_in_flight_cap,
        relay_failing_head_holds_back_its_key_when_pipelined => relay::failing_head_holds_back_its_key_when_pipelined,
    }
}

/// Every case a backend runs: store, transaction, inbox, lock and relay, in that order.
pub fn backend_cases<S: TransactionalStore + 'static>() -> Vec<Case<Fixture<S>>> {
    let mut all = store_cases();
    all.extend(tx_cases());
    all.extend(inbox_cases());
    all.extend(lock_cases());
    all.extend(relay_cases());
    all
}

/// The transport cases (`transport_*`): transport items 1–5 against a real broker.
pub fn transport_cases() -> Vec<Case<dyn TransportHarness>> {
    cases! {
        transport_round_trip_every_field => transport::round_trip_every_field,
        transport_per_key_order => transport::per_key_order,
        transport_confirmed_send_is_consumable => transport::confirmed_send_is_consumable,
        transport_send_ordered_chain_in_order => transport::send_ordered_chain_in_order,
        transport_send_ordered_stops_at_permanent_failure [permanent_rejection] => transport::send_ordered_stops_at_permanent_failure,
        transport_delivery_timeout_bounded => transport::delivery_timeout_bounded,
        transport_unreachable_broker_is_retryable [unreachable_producer] => transport::unreachable_broker_is_retryable,
        transport_unroutable_is_permanent [unroutable_topic] => transport::unroutable_is_permanent,
        transport_too_large_is_permanent [broker_size_limit] => transport::too_large_is_permanent,
        transport_nack_redelivers => transport::nack_redelivers,
        transport_unacked_redelivered_after_restart => transport::unacked_redelivered_after_restart,
        transport_dead_letter_after_n_failures => transport::dead_letter_after_n_failures,
        transport_inbox_suppresses_duplicate => transport::inbox_suppresses_duplicate,
        transport_end_to_end_exactly_once => transport::end_to_end_exactly_once,
    }
}

/// The name of every case, as the trials are named (without a group prefix).
pub fn case_names() -> Vec<&'static str> {
    let backend = backend_cases::<NoTransactions>()
        .into_iter()
        .map(|c| c.name);
    backend
        .chain(transport_cases().into_iter().map(|c| c.name))
        .collect()
}

/// The conformance suite as the `main` of a test binary declared with `harness = false`:
/// one trial per case and configuration.
///
/// ```no_run
/// # use outbox_conformance::{Fixture, SetupContext, Suite};
/// # use outbox_core::{memory::MemoryStore, Result};
/// # async fn setup(ctx: SetupContext) -> Result<Fixture<MemoryStore>> { unimplemented!() }
/// fn main() -> std::process::ExitCode {
///     Suite::new().backend("", setup).run()
/// }
/// ```
#[derive(Default)]
pub struct Suite {
    trials: Vec<Trial>,
}

impl std::fmt::Debug for Suite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Suite")
            .field("trials", &self.trials.len())
            .finish()
    }
}

impl Suite {
    /// An empty suite.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every [`backend_cases`] case against fixtures built by `setup` (called once per case,
    /// with a fresh [`SetupContext`]).
    ///
    /// `group` prefixes the trial names (`"custom"` gives `custom::store_round_trip`; `""`
    /// gives `store_round_trip`), so one binary can run the suite against several
    /// configurations.
    pub fn backend<S, F, Fut>(self, group: &str, setup: F) -> Self
    where
        S: TransactionalStore + 'static,
        F: Fn(SetupContext) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<Fixture<S>>>,
    {
        self.fixtures(group, backend_cases(), setup)
    }

    /// Only `cases` (e.g. [`lock_cases`] for a crate that provides only a lock) against
    /// fixtures built by `setup`; see [`backend`](Self::backend).
    pub fn fixtures<S, F, Fut>(
        mut self,
        group: &str,
        cases: Vec<Case<Fixture<S>>>,
        setup: F,
    ) -> Self
    where
        S: TransactionalStore + 'static,
        F: Fn(SetupContext) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<Fixture<S>>>,
    {
        for case in cases {
            let setup = setup.clone();
            self.trials.push(Trial::ignorable_test(
                qualified(group, case.name),
                move || {
                    block_on(async move {
                        let fixture = match crate::harness::setup(case.name, setup).await {
                            Ok(f) => f,
                            Err(reason) => return Ok(Completion::ignored_with(reason)),
                        };
                        if let Some(reason) = (case.not_applicable)(&fixture) {
                            return Ok(Completion::ignored_with(format!(
                                "not applicable: {reason}"
                            )));
                        }
                        (case.run)(&fixture).await;
                        Ok(Completion::Completed)
                    })
                },
            ));
        }
        self
    }

    /// Every [`transport_cases`] case against harnesses built by `setup` (one per case, with
    /// its own destination). `group` prefixes the trial names as in
    /// [`backend`](Self::backend).
    pub fn transport<H, F, Fut>(mut self, group: &str, setup: F) -> Self
    where
        H: TransportHarness + 'static,
        F: Fn(SetupContext) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<H>>,
    {
        for case in transport_cases() {
            let setup = setup.clone();
            self.trials.push(Trial::ignorable_test(
                qualified(group, case.name),
                move || {
                    block_on(async move {
                        let harness = match crate::transport::setup(case.name, setup).await {
                            Ok(h) => h,
                            Err(reason) => return Ok(Completion::ignored_with(reason)),
                        };
                        let harness: &(dyn TransportHarness + 'static) = &harness;
                        if let Some(reason) = (case.not_applicable)(harness) {
                            return Ok(Completion::ignored_with(format!(
                                "not applicable: {reason}"
                            )));
                        }
                        (case.run)(harness).await;
                        Ok(Completion::Completed)
                    })
                },
            ));
        }
        self
    }

    /// Run the trials with the process's command line (what `cargo test` passes) and return
    /// the exit code for `main`.
    pub fn run(self) -> ExitCode {
        self.run_with(&Arguments::from_args()).exit_code()
    }

    /// Run the trials with `args` and return the counts (passed, failed, ignored).
    pub fn run_with(self, args: &Arguments) -> Conclusion {
        libtest_mimic::run(args, self.trials)
    }
}

fn qualified(group: &str, name: &str) -> String {
    if group.is_empty() {
        name.to_owned()
    } else {
        format!("{group}::{name}")
    }
}
