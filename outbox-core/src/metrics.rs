//! Names of the metrics the relay and the inbox processor record through the
//! [`metrics`](https://docs.rs/metrics) facade.
//!
//! Nothing is exported unless the application installs a recorder (for example
//! `metrics-exporter-prometheus`, which `outbox relay --metrics-addr` does). Every metric
//! carries the label `instance` (the relay's `instance_id` or the processor's handler key).

/// Counter: messages confirmed by the broker and marked dispatched.
pub const PUBLISHED: &str = "outbox_relay_published_total";
/// Counter: failed publish attempts specific to a message (counted towards `max_attempts`).
pub const FAILED: &str = "outbox_relay_failed_total";
/// Counter: messages parked (dead-lettered) by the relay.
pub const PARKED: &str = "outbox_relay_parked_total";
/// Counter: batches fetched from the store.
pub const BATCHES: &str = "outbox_relay_batches_total";
/// Gauge: pending messages in the store, sampled by the relay.
pub const PENDING: &str = "outbox_relay_pending";
/// Gauge: parked messages in the store, sampled by the relay.
pub const PARKED_NOW: &str = "outbox_relay_parked";
/// Gauge: age in seconds of the oldest pending message, sampled by the relay (0 when none).
pub const OLDEST_PENDING_AGE: &str = "outbox_relay_oldest_pending_age_seconds";
/// Histogram: seconds from a message's `created_at` to its broker confirmation.
pub const PUBLISH_LATENCY: &str = "outbox_relay_commit_to_publish_seconds";
/// Counter: shard leases acquired.
pub const LEASES_ACQUIRED: &str = "outbox_relay_leases_acquired_total";
/// Counter: shard leases lost (expired or taken over while held).
pub const LEASES_LOST: &str = "outbox_relay_leases_lost_total";
/// Gauge: shard leases held now.
pub const LEASES_HELD: &str = "outbox_relay_leases_held";
/// Gauge: 1 while the relay's circuit breaker is open (broker or store unavailable), else 0.
pub const CIRCUIT_OPEN: &str = "outbox_relay_circuit_open";
/// Counter: deliveries handled by an `InboxProcessor` (handler ran and committed).
pub const INBOX_HANDLED: &str = "outbox_inbox_handled_total";
/// Counter: duplicate deliveries suppressed by the inbox.
pub const INBOX_DUPLICATES: &str = "outbox_inbox_duplicates_total";
/// Counter: deliveries whose handler failed (nacked for redelivery).
pub const INBOX_FAILED: &str = "outbox_inbox_failed_total";
/// Counter: deliveries moved to the dead-letter destination.
pub const INBOX_DEAD_LETTERED: &str = "outbox_inbox_dead_lettered_total";
