//! The `opentelemetry` feature end to end: a message built inside a span carries its W3C
//! trace context through a SQLite outbox, the relay and RabbitMQ, and the consumer's handling
//! span is that span's child (OpenTelemetry SDK, in-memory exporter).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use outbox_core::{
    Consumer, HandlerError, InboxProcessor, Message, MessageHandler, OutboxStore, ProcessOutcome,
    Relay, RelayConfig, Transaction, TransactionalStore, async_trait,
};
use outbox_rabbitmq::RabbitMqProducer;
use outbox_sqlite::{SqliteConfig, SqliteStore, SqliteTx};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// Records the OpenTelemetry context of the span it runs in, and adds a follow-up message
/// (which then carries the handling span's context).
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Option<SpanContext>>>,
    follow_up: Arc<Mutex<Option<Message>>>,
}

#[async_trait]
impl MessageHandler<SqliteTx> for Recorder {
    async fn handle(&self, message: &Message, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        let cx = tracing::Span::current().context();
        *self.seen.lock().unwrap() = Some(cx.span().span_context().clone());
        let reply = Message::builder("billing.done")
            .key(message.id.to_string())
            .build()?;
        tx.add(&reply).await?;
        *self.follow_up.lock().unwrap() = Some(reply);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_span_is_a_child_of_the_depositing_span_through_rabbitmq() {
    let iso = isolated!("otel");
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-test")));
    // The only test of this binary: the global subscriber sees the spans of every thread.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let orders = SqliteStore::connect(SqliteConfig::new(dir.path().join("orders.db")))
        .await
        .unwrap();
    orders.migrate().await.unwrap();
    let billing = SqliteStore::connect(SqliteConfig::new(dir.path().join("billing.db")))
        .await
        .unwrap();
    billing.migrate().await.unwrap();

    // Deposit inside the application's span.
    let place_order = tracing::info_span!("place_order", order = 42);
    let producer_cx = place_order.context().span().span_context().clone();
    assert!(producer_cx.is_valid());
    let message = place_order.in_scope(|| {
        Message::builder(iso.topic())
            .key("order-42")
            .payload("placed")
            .build()
            .unwrap()
    });
    let mut tx = orders.begin().await.unwrap();
    tx.add(&message).await.unwrap();
    tx.commit().await.unwrap();
    drop(place_order);
    assert_eq!(
        message.trace.traceparent.as_deref(),
        Some(format!("00-{}-{}-01", producer_cx.trace_id(), producer_cx.span_id()).as_str()),
        "the builder captured the current span's context"
    );
    // Outside any span nothing is captured.
    assert!(Message::builder("t").build().unwrap().trace.is_empty());

    // Relay through the broker.
    let relay = Relay::new(
        Arc::new(orders.clone()),
        Arc::new(orders.lock()),
        Arc::new(RabbitMqProducer::new(iso.producer_config()).unwrap()),
        RelayConfig::default(),
    )
    .unwrap();
    assert_eq!(relay.run_once().await.unwrap().published, 1);

    // Consume.
    let recorder = Recorder::default();
    let processor =
        InboxProcessor::new(Arc::new(billing.clone()), "billing", recorder.clone()).unwrap();
    let consumer = iso.consumer().await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.receive())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(delivery.message.id, message.id);
    assert_eq!(
        delivery.message.trace, message.trace,
        "carried by the broker"
    );
    assert_eq!(
        processor.process(&consumer, &delivery).await.unwrap(),
        ProcessOutcome::Handled
    );

    // The handler ran in a span of the producer's trace...
    let handling = recorder.seen.lock().unwrap().clone().unwrap();
    assert_eq!(handling.trace_id(), producer_cx.trace_id());
    assert_ne!(handling.span_id(), producer_cx.span_id());
    // ... whose exported parent is the depositing span.
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let handle = spans
        .iter()
        .find(|s| s.name == "outbox.inbox.handle")
        .unwrap_or_else(|| {
            panic!(
                "no handling span among {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(handle.span_context.trace_id(), producer_cx.trace_id());
    assert_eq!(handle.parent_span_id, producer_cx.span_id());
    assert_eq!(handle.span_context.span_id(), handling.span_id());
    let deposit = spans.iter().find(|s| s.name == "place_order").unwrap();
    assert_eq!(deposit.span_context.span_id(), producer_cx.span_id());

    // A message the handler adds continues the trace from the handling span.
    let follow_up = recorder.follow_up.lock().unwrap().clone().unwrap();
    assert_eq!(
        follow_up.trace.traceparent.as_deref(),
        Some(format!("00-{}-{}-01", handling.trace_id(), handling.span_id()).as_str())
    );
    assert_eq!(billing.stats().await.unwrap().pending, 1);
}
