//! The workspace transport conformance suite against the Kafka-protocol broker in
//! `OUTBOX_TEST_KAFKA_BROKERS`. Every case gets its own topic, consumer group and
//! dead-letter topic.

mod common;

use common::KafkaHarness;
use outbox_conformance::SetupContext;
use outbox_core::Result;

async fn setup(ctx: SetupContext) -> Result<KafkaHarness> {
    KafkaHarness::new(&ctx.name, 3).await
}

fn main() -> std::process::ExitCode {
    outbox_conformance::Suite::new().transport("", setup).run()
}
