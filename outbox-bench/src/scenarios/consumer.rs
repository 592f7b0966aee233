//! Consumer: `InboxProcessor` on PostgreSQL consuming from RabbitMQ and from Kafka (1,000
//! keys), against a hand-written loop doing the same work (receive; insert the inbox row and
//! one business row in one transaction; commit; ack) with the same concurrency (one
//! processing loop on one consumer of the same transport).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::{
    CancellationToken, Consumer, Error, HandlerError, InboxProcessor, Message, MessageHandler,
    Producer, Result,
};
use outbox_kafka::{ConsumerOptions, KafkaConsumer};
use outbox_postgres::sqlx::{self, AssertSqlSafe};
use outbox_postgres::{DEFAULT_TABLE_PREFIX, PgTx};
use outbox_rabbitmq::{ConsumerConfig, RabbitMqConsumer, declare_topology};

use crate::backends::{Backend, PgBackend};
use crate::cli::{Case, Word, case_label};
use crate::common::{
    Ctx, Series, drop_topics, drop_topology, kafka_config, kafka_producer, kafka_topic, messages,
    pg_exec, rabbit_producer, rate,
};
use crate::layers::CountingConsumer;
use crate::stats;

const SCENARIO: &str = "consumer";

struct Orders {
    insert: String,
}

#[async_trait]
impl MessageHandler<PgTx> for Orders {
    async fn handle(
        &self,
        message: &Message,
        tx: &mut PgTx,
    ) -> std::result::Result<(), HandlerError> {
        sqlx::query(AssertSqlSafe(self.insert.clone()))
            .bind(message.id.as_uuid())
            .execute(tx.conn())
            .await
            .map_err(|e| HandlerError::new(e.to_string()))?;
        Ok(())
    }
}

/// Run one PostgreSQL←broker pair.
pub async fn run(ctx: &mut Ctx, case: Case) -> Result<()> {
    if !matches!(case, [Word::Postgres, Word::Rabbitmq | Word::Kafka]) {
        return Err(Error::invalid_input("consumer: unknown case"));
    }
    let backend = PgBackend::new(ctx, false).await?;
    let schema = backend.schema.clone();
    pg_exec(
        &backend.store,
        format!("CREATE TABLE \"{schema}\".bench_orders (id uuid PRIMARY KEY, total bigint NOT NULL DEFAULT 1999)"),
    )
    .await?;
    let result = measure(ctx, case, &backend).await;
    let c = backend.cleanup().await;
    result.and(c)
}

/// Where one run's messages are and how to consume them.
enum Source {
    Rabbit(outbox_rabbitmq::Topology),
    Kafka(String),
}

async fn measure(ctx: &mut Ctx, case: Case, backend: &PgBackend) -> Result<()> {
    let label = format!("{}, 1000 keys", case_label(case));
    let n = ctx.count(1_000, 50);
    let schema = &backend.schema;
    let insert_order = format!("INSERT INTO \"{schema}\".bench_orders (id) VALUES ($1)");
    let insert_inbox = format!(
        "INSERT INTO \"{schema}\".\"{DEFAULT_TABLE_PREFIX}inbox\" (message_id, handler_key, \
         inserted_at, expires_at) VALUES ($1, $2, now(), now() + interval '7 days') \
         ON CONFLICT DO NOTHING"
    );
    // One queue or topic and one consumer for the whole case, so that a Kafka group joins
    // once; each run adds its messages and is timed from its first delivery to its last ack.
    let (source, producer, topic) = source(ctx, case).await?;
    let consumer: Box<dyn Consumer> = match &source {
        Source::Rabbit(t) => Box::new(
            RabbitMqConsumer::connect(ConsumerConfig::from_topology(ctx.services.amqp()?, t))
                .await?,
        ),
        Source::Kafka(topic) => Box::new(KafkaConsumer::new(
            // A topic created a moment ago: look it up again soon rather than in 5 minutes.
            &kafka_config(ctx)
                .set("topic.metadata.refresh.interval.ms", "500")
                .set("fetch.wait.max.ms", "10"),
            ConsumerOptions::new(ctx.name("g"), [topic.clone()]),
        )?),
    };
    let counted = CountingConsumer::new(consumer);
    let result = async {
        let (mut lib, mut hand) = (Series::default(), Series::default());
        for pass in ctx.pass_range() {
            let count = if pass == 0 { (n / 4).max(10) } else { n };
            ctx.status(format!("consumer {label}: pass {pass}"));
            for library in [true, false] {
                ctx.phase("setup");
                for chunk in messages(&topic, count, 1_000, 1024)?.chunks(500) {
                    for r in producer.send_batch(chunk).await {
                        r?;
                    }
                }
                counted.reset();
                let side = if library { "lib" } else { "raw-loop" };
                ctx.phase(&format!("{side} consumer {label}"));
                let shutdown = CancellationToken::new();
                let done = async {
                    let end = crate::common::wait_for(
                        "every delivery acked",
                        Duration::from_secs(300),
                        Duration::from_millis(2),
                        || counted.acked() >= count as u64,
                    )
                    .await
                    .map(|_| Instant::now());
                    shutdown.cancel();
                    end
                };
                let work = async {
                    if library {
                        let processor = InboxProcessor::new(
                            Arc::new(backend.store.clone()),
                            "bench-inbox-processor",
                            Orders {
                                insert: insert_order.clone(),
                            },
                        )?;
                        processor.run(&counted, shutdown.clone()).await.map(|_| ())
                    } else {
                        hand_loop(backend, &counted, &shutdown, &insert_inbox, &insert_order).await
                    }
                };
                let (end, worked) = tokio::join!(done, work);
                worked?;
                let end = end?;
                let first = counted
                    .first_received()
                    .ok_or_else(|| Error::unexpected("no delivery received"))?;
                let r = rate(count, end.saturating_duration_since(first));
                if library {
                    lib.record(pass, r)
                } else {
                    hand.record(pass, r)
                }
            }
            ctx.progress.inc(1);
        }
        Ok::<_, Error>((lib, hand))
    }
    .await;
    drop(counted);
    let cleaned = match &source {
        Source::Rabbit(t) => drop_topology(ctx, t).await,
        Source::Kafka(topic) => drop_topics(ctx, std::slice::from_ref(topic)).await,
    };
    let (lib, hand) = result?;
    cleaned?;
    let ratio = stats::ratios(&lib.0, &hand.0).unwrap_or_default();
    let r = &mut ctx.report;
    r.add(SCENARIO, &label, "InboxProcessor", "msg/s", &lib.0);
    r.add(SCENARIO, &label, "hand-written loop", "msg/s", &hand.0);
    r.add(
        SCENARIO,
        &label,
        "InboxProcessor / hand-written",
        "×",
        &ratio,
    );
    r.notes.push(format!(
        "consumer {label}: {n} messages of 1 KiB per run, one processing loop each, timed \
         from the first delivery to the last ack"
    ));
    Ok(())
}

/// A fresh queue or topic of this run, the library's producer to it, and the topic to use.
async fn source(ctx: &mut Ctx, case: Case) -> Result<(Source, Arc<dyn Producer>, String)> {
    Ok(match case {
        [_, Word::Rabbitmq] => {
            let name = ctx.name("cx");
            let t = outbox_rabbitmq::Topology::new(name.clone(), format!("{name}_q"));
            declare_topology(&ctx.services.amqp()?, &t).await?;
            let p = rabbit_producer(ctx, &t.exchange)?;
            (Source::Rabbit(t), p, "bench.consume".to_owned())
        }
        _ => {
            let topic = kafka_topic(ctx, crate::brokers::KAFKA_PARTITIONS).await?;
            (Source::Kafka(topic.clone()), kafka_producer(ctx)?, topic)
        }
    })
}

/// The hand-written consumer: receive; in one transaction insert the inbox row (skip the
/// business row and ack if it was there) and the business row; commit; ack.
async fn hand_loop(
    backend: &PgBackend,
    consumer: &dyn Consumer,
    shutdown: &CancellationToken,
    insert_inbox: &str,
    insert_order: &str,
) -> Result<()> {
    let pool = backend.store.pool();
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            d = consumer.receive() => d?,
        };
        let Some(d) = delivery else { return Ok(()) };
        let mut tx = pool.begin().await.map_err(outbox_postgres::parse_error)?;
        let inserted = sqlx::query(AssertSqlSafe(insert_inbox.to_owned()))
            .bind(d.message.id.as_uuid())
            .bind("bench-hand-written")
            .execute(&mut *tx)
            .await
            .map_err(outbox_postgres::parse_error)?
            .rows_affected();
        if inserted == 1 {
            sqlx::query(AssertSqlSafe(insert_order.to_owned()))
                .bind(d.message.id.as_uuid())
                .execute(&mut *tx)
                .await
                .map_err(outbox_postgres::parse_error)?;
        }
        tx.commit().await.map_err(outbox_postgres::parse_error)?;
        consumer.ack(&d).await?;
    }
}
