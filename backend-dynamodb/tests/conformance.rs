//! The workspace conformance suite against `DynamoDbStore` on a real endpoint (moto in CI,
//! from `OUTBOX_TEST_DYNAMODB_ENDPOINT`), with the default configuration and with 4 shards.
//! Every case gets its own tables (prefix from `SetupContext::name`), deleted after the case.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use outbox_conformance::{Fixture, SetupContext};
use outbox_core::Result;
use outbox_dynamodb::{DynamoDbConfig, DynamoDbStore};

/// Defaults (16 shards).
async fn setup(ctx: SetupContext) -> Result<Fixture<DynamoDbStore>> {
    let config = DynamoDbConfig::default().with_inbox_retention(Duration::from_secs(3600));
    common::fixture(ctx, config).await
}

fn main() -> std::process::ExitCode {
    outbox_conformance::Suite::new().backend("", setup).run()
}
