//! outbox facade
