//! The transport cases against the in-memory broker, which is a product transport too.

use std::sync::Arc;
use std::time::Duration;

use outbox_conformance::{SetupContext, TransportHarness};
use outbox_core::memory::MemoryBroker;
use outbox_core::{Consumer, Message, Producer, Result, async_trait};

const LIMIT: usize = 64 * 1024;

struct Harness {
    broker: MemoryBroker,
    topic: String,
    subscription: String,
}

#[async_trait]
impl TransportHarness for Harness {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn producer(&self) -> Arc<dyn Producer> {
        Arc::new(self.broker.producer())
    }

    async fn consumer(&self) -> Result<Box<dyn Consumer>> {
        // A new connection: the broker takes back what earlier consumers left unacked.
        self.broker.redeliver_unacked(&self.subscription);
        Ok(Box::new(
            self.broker.subscribe(&self.subscription, &[&self.topic]),
        ))
    }

    async fn dead_letters(&self, expected: usize) -> Result<Vec<(Message, String)>> {
        for _ in 0..200 {
            let dead = self.broker.dead_letters(&self.subscription);
            if dead.len() >= expected {
                return Ok(dead);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(self.broker.dead_letters(&self.subscription))
    }

    fn unreachable_producer(&self) -> Option<Arc<dyn Producer>> {
        let down = MemoryBroker::new();
        down.set_available(false);
        Some(Arc::new(down.producer()))
    }

    fn max_message_size(&self) -> Option<usize> {
        Some(LIMIT)
    }

    /// A memory send is complete (or failed) when the call returns: nothing stays pending.
    fn max_delivery_timeout(&self) -> Option<Duration> {
        None
    }
}

async fn setup(ctx: SetupContext) -> Result<Harness> {
    Ok(Harness {
        broker: MemoryBroker::new().with_max_message_size(LIMIT),
        topic: format!("{}.events", ctx.name),
        subscription: format!("{}.sub", ctx.name),
    })
}

fn main() -> std::process::ExitCode {
    outbox_conformance::Suite::new().transport("", setup).run()
}
