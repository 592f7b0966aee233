//! The workspace transport conformance suite against the real RabbitMQ broker
//! (`OUTBOX_TEST_RABBITMQ_URL`): one exchange, quorum queue and dead-letter queue per case.

mod common;

use outbox_conformance::SetupContext;
use outbox_core::Result;

async fn setup(ctx: SetupContext) -> Result<common::Harness> {
    common::Harness::new(&ctx.name).await
}

fn main() -> std::process::ExitCode {
    outbox_conformance::Suite::new().transport("", setup).run()
}
