#![doc = include_str!("../README.md")]

pub mod harness;
pub mod inbox;
pub mod lock;
pub mod relay;
pub mod store;
mod support;
pub mod transport;
pub mod tx;

pub use harness::{BusinessRecords, Fixture, NoTransaction, NoTransactions, SetupContext};
pub use transport::TransportHarness;

// Adding a case: write `pub async fn name<S: TransactionalStore>(f: &Fixture<S>)` in its
// module, then add one `group_name => $crate::module::name,` line to the group's list below.
// Transport cases take a `&dyn TransportHarness` instead of a `Fixture`.

/// Every case: store, transaction, inbox, lock and relay. One `#[test]` per case, named after it.
///
/// `$setup` is an `async fn(SetupContext) -> outbox_core::Result<Fixture<S>>` (any expression
/// callable like one). See the crate documentation for a complete example.
#[macro_export]
macro_rules! conformance_tests {
    ($setup:expr) => {
        $crate::store_tests!($setup);
        $crate::tx_tests!($setup);
        $crate::inbox_tests!($setup);
        $crate::lock_tests!($setup);
        $crate::relay_tests!($setup);
    };
}

/// The relay cases (`relay_*`): relay items 1–7, with the backend's store and lock and the
/// in-memory broker.
#[macro_export]
macro_rules! relay_tests {
    ($setup:expr) => {
        $crate::__relay_cases!(tests[$setup]);
    };
}

/// The outbox store cases (`store_*`): contract items 1–10.
#[macro_export]
macro_rules! store_tests {
    ($setup:expr) => {
        $crate::__store_cases!(tests[$setup]);
    };
}

/// The transaction cases (`tx_*`).
#[macro_export]
macro_rules! tx_tests {
    ($setup:expr) => {
        $crate::__tx_cases!(tests[$setup]);
    };
}

/// The inbox cases (`inbox_*`): contract items 1–4.
#[macro_export]
macro_rules! inbox_tests {
    ($setup:expr) => {
        $crate::__inbox_cases!(tests[$setup]);
    };
}

/// The distributed lock cases (`lock_*`): contract items 1–4.
#[macro_export]
macro_rules! lock_tests {
    ($setup:expr) => {
        $crate::__lock_cases!(tests[$setup]);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __store_cases {
    ($mode:ident [$($arg:tt)*]) => {
        $crate::__emit! {$mode [$($arg)*]
            store_round_trip => $crate::store::round_trip,
            store_shard_assignment => $crate::store::shard_assignment,
            store_transactional_add_commit => $crate::store::transactional_add_commit,
            store_transactional_add_rollback => $crate::store::transactional_add_rollback,
            store_duplicate_add_rejected => $crate::store::duplicate_add_rejected,
            store_duplicate_within_batch => $crate::store::duplicate_within_batch,
            store_duplicate_add_in_transaction => $crate::store::duplicate_add_in_transaction,
            store_add_batch_in_order => $crate::store::add_batch_in_order,
            store_batch_limit => $crate::store::batch_limit,
            store_fetch_only_due => $crate::store::fetch_only_due,
            store_fetch_only_requested_shards => $crate::store::fetch_only_requested_shards,
            store_fetch_oldest_first_and_limit => $crate::store::fetch_oldest_first_and_limit,
            store_mark_dispatched_idempotent => $crate::store::mark_dispatched_idempotent,
            store_mark_dispatched_parked => $crate::store::mark_dispatched_parked,
            store_mark_failed_backoff => $crate::store::mark_failed_backoff,
            store_mark_failed_parks_after_max_attempts => $crate::store::mark_failed_parks_after_max_attempts,
            store_requeue_parked => $crate::store::requeue_parked,
            store_per_key_failing_head_blocks_key => $crate::store::per_key_failing_head_blocks_key,
            store_per_key_parked_head_blocks_key => $crate::store::per_key_parked_head_blocks_key,
            store_per_key_delayed_head_blocks_key => $crate::store::per_key_delayed_head_blocks_key,
            store_per_key_order_concurrent_writers => $crate::store::per_key_order_concurrent_writers,
            store_stats_counts_and_oldest_age => $crate::store::stats_counts_and_oldest_age,
            store_purge_dispatched_retention_and_limit => $crate::store::purge_dispatched_retention_and_limit,
            store_size_limit => $crate::store::size_limit,
            store_invalid_input => $crate::store::invalid_input,
            store_longest_names_round_trip => $crate::store::longest_names_round_trip,
            store_last_error_rule => $crate::store::last_error_rule,
            store_list_filters_and_order => $crate::store::list_filters_and_order,
            store_dispatched_since_counts => $crate::store::dispatched_since_counts,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __tx_cases {
    ($mode:ident [$($arg:tt)*]) => {
        $crate::__emit! {$mode [$($arg)*]
            tx_commit_reports_ids_and_shards => $crate::tx::commit_reports_ids_and_shards,
            tx_invisible_before_commit => $crate::tx::invisible_before_commit,
            tx_add_order_is_sequence_order => $crate::tx::add_order_is_sequence_order,
            tx_commit_order_is_fetch_order => $crate::tx::commit_order_is_fetch_order,
            tx_failed_add_aborts => $crate::tx::failed_add_aborts,
            tx_duplicate_add_aborts => $crate::tx::duplicate_add_aborts,
            tx_failed_inbox_insert_aborts => $crate::tx::failed_inbox_insert_aborts,
            tx_rollback_after_failure => $crate::tx::rollback_after_failure,
            tx_inbox_duplicate_does_not_abort => $crate::tx::inbox_duplicate_does_not_abort,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __inbox_cases {
    ($mode:ident [$($arg:tt)*]) => {
        $crate::__emit! {$mode [$($arg)*]
            inbox_first_insert_wins => $crate::inbox::first_insert_wins,
            inbox_concurrent_insert_one_winner => $crate::inbox::concurrent_insert_one_winner,
            inbox_concurrent_transactional_insert_one_winner => $crate::inbox::concurrent_transactional_insert_one_winner,
            inbox_transactional_insert_commit => $crate::inbox::transactional_insert_commit,
            inbox_transactional_insert_rollback => $crate::inbox::transactional_insert_rollback,
            inbox_transactional_duplicate => $crate::inbox::transactional_duplicate,
            inbox_retention_expiry => $crate::inbox::retention_expiry,
            inbox_purge_expired => $crate::inbox::purge_expired,
            inbox_invalid_handler_key => $crate::inbox::invalid_handler_key,
            inbox_longest_handler_key => $crate::inbox::longest_handler_key,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __lock_cases {
    ($mode:ident [$($arg:tt)*]) => {
        $crate::__emit! {$mode [$($arg)*]
            lock_single_holder => $crate::lock::single_holder,
            lock_release_then_reacquire => $crate::lock::release_then_reacquire,
            lock_expiry_takeover => $crate::lock::expiry_takeover,
            lock_renew_extends => $crate::lock::renew_extends,
            lock_non_holder_rejected => $crate::lock::non_holder_rejected,
            lock_tokens_strictly_increase => $crate::lock::tokens_strictly_increase,
            lock_concurrent_acquire_one_winner => $crate::lock::concurrent_acquire_one_winner,
            lock_concurrent_takeover_one_winner => $crate::lock::concurrent_takeover_one_winner,
            lock_invalid_input => $crate::lock::invalid_input,
            lock_invalid_names => $crate::lock::invalid_names,
            lock_longest_names => $crate::lock::longest_names,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __relay_cases {
    ($mode:ident [$($arg:tt)*]) => {
        $crate::__emit! {$mode [$($arg)*]
            relay_publishes_every_message_exactly_once => $crate::relay::publishes_every_message_exactly_once,
            relay_instances_split_work => $crate::relay::instances_split_work,
            relay_killed_relay_loses_nothing => $crate::relay::killed_relay_loses_nothing,
            relay_broker_down_then_recovers => $crate::relay::broker_down_then_recovers,
            relay_parks_after_max_attempts_then_requeue => $crate::relay::parks_after_max_attempts_then_requeue,
            relay_per_key_order_survives_failures => $crate::relay::per_key_order_survives_failures,
            relay_graceful_shutdown_releases_leases => $crate::relay::graceful_shutdown_releases_leases,
            relay_notify_dispatches_immediately => $crate::relay::notify_dispatches_immediately,
            relay_run_once_drains_one_batch => $crate::relay::run_once_drains_one_batch,
            relay_outage_parks_nothing_in_run => $crate::relay::outage_parks_nothing_in_run,
            relay_stale_holder_publishes_nothing => $crate::relay::stale_holder_publishes_nothing,
            relay_duplicate_instance_id_refused => $crate::relay::duplicate_instance_id_refused,
            relay_shutdown_finishes_batch_in_flight => $crate::relay::shutdown_finishes_batch_in_flight,
            relay_racing_relays_never_overlap => $crate::relay::racing_relays_never_overlap,
            relay_stale_fetch_publishes_once => $crate::relay::stale_fetch_publishes_once,
            relay_killed_at_any_point_loses_nothing => $crate::relay::killed_at_any_point_loses_nothing,
            relay_backlog_drains_at_in_flight_cap => $crate::relay::backlog_drains_at_in_flight_cap,
            relay_failing_head_holds_back_its_key_when_pipelined => $crate::relay::failing_head_holds_back_its_key_when_pipelined,
        }
    };
}

/// The transport cases (`transport_*`): transport items 1–5 against a real broker.
///
/// `$setup` is an `async fn(SetupContext) -> outbox_core::Result<H>` where
/// `H: TransportHarness`; return an `ErrorKind::Unavailable` error when the broker is absent.
#[macro_export]
macro_rules! transport_tests {
    ($setup:expr) => {
        $crate::__transport_cases!(transport_tests[$setup]);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __transport_cases {
    ($mode:ident [$($arg:tt)*]) => {
        $crate::__emit! {$mode [$($arg)*]
            transport_round_trip_every_field => $crate::transport::round_trip_every_field,
            transport_per_key_order => $crate::transport::per_key_order,
            transport_confirmed_send_is_consumable => $crate::transport::confirmed_send_is_consumable,
            transport_send_ordered_chain_in_order => $crate::transport::send_ordered_chain_in_order,
            transport_send_ordered_stops_at_permanent_failure => $crate::transport::send_ordered_stops_at_permanent_failure,
            transport_delivery_timeout_bounded => $crate::transport::delivery_timeout_bounded,
            transport_unreachable_broker_is_retryable => $crate::transport::unreachable_broker_is_retryable,
            transport_unroutable_is_permanent => $crate::transport::unroutable_is_permanent,
            transport_too_large_is_permanent => $crate::transport::too_large_is_permanent,
            transport_nack_redelivers => $crate::transport::nack_redelivers,
            transport_unacked_redelivered_after_restart => $crate::transport::unacked_redelivered_after_restart,
            transport_dead_letter_after_n_failures => $crate::transport::dead_letter_after_n_failures,
            transport_inbox_suppresses_duplicate => $crate::transport::inbox_suppresses_duplicate,
            transport_end_to_end_exactly_once => $crate::transport::end_to_end_exactly_once,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __emit {
    (tests [$setup:expr] $($name:ident => $case:path),* $(,)?) => {$(
        #[test]
        fn $name() {
            $crate::harness::block_on(async {
                if let ::std::option::Option::Some(fixture) =
                    $crate::harness::setup(::std::stringify!($name), $setup).await
                {
                    $case(&fixture).await;
                }
            });
        }
    )*};
    (transport_tests [$setup:expr] $($name:ident => $case:path),* $(,)?) => {$(
        #[test]
        fn $name() {
            $crate::harness::block_on(async {
                if let ::std::option::Option::Some(harness) =
                    $crate::transport::setup(::std::stringify!($name), $setup).await
                {
                    $case(&harness).await;
                }
            });
        }
    )*};
    (names [] $($name:ident => $case:path),* $(,)?) => {
        &[$(::std::stringify!($name)),*]
    };
}

/// Names of every case, as the generated tests are named.
pub const CASES: &[&[&str]] = &[
    __store_cases!(names[]),
    __tx_cases!(names[]),
    __inbox_cases!(names[]),
    __lock_cases!(names[]),
    __relay_cases!(names[]),
    __transport_cases!(names[]),
];

#[cfg(test)]
mod tests {
    #[test]
    fn readme_lists_every_case() {
        let readme = include_str!("../README.md");
        for name in super::CASES.iter().flat_map(|g| g.iter()) {
            assert!(
                readme.contains(&format!("`{name}`")),
                "README.md does not list case {name}"
            );
        }
    }
}
