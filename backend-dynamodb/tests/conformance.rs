//! The workspace conformance suite against `DynamoDbStore` on a real endpoint (moto in CI,
//! from `OUTBOX_TEST_DYNAMODB_ENDPOINT`), in both sequencing modes. Every case gets its own
//! tables (prefix from `SetupContext::name`), deleted after the case.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use outbox_conformance::{Fixture, SetupContext};
use outbox_core::Result;
use outbox_dynamodb::{DynamoDbConfig, DynamoDbStore, Sequencing};

/// Defaults: exact per-shard sequence counters.
async fn setup(ctx: SetupContext) -> Result<Fixture<DynamoDbStore>> {
    let config = DynamoDbConfig::default().with_inbox_retention(Duration::from_secs(3600));
    common::fixture(ctx, config).await
}

/// Writer-clock sequencing, 8 shards.
async fn setup_writer_clock(ctx: SetupContext) -> Result<Fixture<DynamoDbStore>> {
    let config = DynamoDbConfig::default()
        .with_inbox_retention(Duration::from_secs(3600))
        .with_sequencing(Sequencing::WriterClock)
        .with_shard_count(8);
    common::fixture(ctx, config).await
}

outbox_conformance::conformance_tests!(setup);

mod writer_clock {
    use super::*;
    outbox_conformance::conformance_tests!(setup_writer_clock);
}
