//! The Lambda entry point (cargo feature `lambda`): a function subscribed to the outbox
//! table's DynamoDB stream drains exactly the shards that got new messages and reports, as
//! partial-batch failures, the records of shards it could not drain.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use lambda_runtime::{LambdaEvent, service_fn};
use outbox_core::relay::Relay;
use outbox_core::{OutboxStore, PendingQuery};

use crate::codec::{PK, SK};
use crate::stream::shards_in_keys;

/// Most `run_once_for` rounds per invocation (each publishes up to `batch_size` messages).
const MAX_ROUNDS: usize = 16;

/// The outbox shard a stream record announces (an `INSERT` of a queue item).
fn shard_of_record(record: &EventRecord) -> Option<u32> {
    if record.event_name != "INSERT" {
        return None;
    }
    let keys = serde_json::to_value(&record.change.keys).ok()?;
    let key = |name: &str| -> Option<String> {
        let v = keys.get(name)?;
        v.get("S")
            .or_else(|| v.get("N"))
            .and_then(|x| x.as_str())
            .map(str::to_owned)
    };
    shards_in_keys(key(PK).as_deref(), key(SK).as_deref())
}

/// Handle one DynamoDB Streams event: run the relay for the shards whose queues got new
/// messages (`Relay::run_once_for`, repeated while full batches come back), then report the
/// records of every shard that still has due messages (its lease is held elsewhere, or the
/// store failed) as `batchItemFailures`, so Lambda retries from the earliest of them. Records
/// of other items (dispatch updates, the meta items, TTL deletions) are not work and never
/// fail. The stream only wakes the relay: what is published, and in which order, comes from
/// the strongly consistent read of each shard's queue.
pub async fn handle_stream_event(
    relay: &Relay,
    store: &dyn OutboxStore,
    event: Event,
) -> DynamoDbEventResponse {
    let mut by_shard: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for r in &event.records {
        if let (Some(shard), Some(seq)) = (shard_of_record(r), r.change.sequence_number.clone()) {
            by_shard.entry(shard).or_default().push(seq);
        }
    }
    let shards: Vec<u32> = by_shard.keys().copied().collect();
    let mut failed: BTreeSet<u32> = BTreeSet::new();
    if !shards.is_empty() {
        let batch = relay.config().batch_size as u64;
        let mut ok = true;
        for _ in 0..MAX_ROUNDS {
            match relay.run_once_for(&shards).await {
                Ok(report) if report.published + report.failed >= batch => {}
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox lambda: run_once_for failed");
                    ok = false;
                    break;
                }
            }
        }
        for shard in &shards {
            let left = if ok {
                store
                    .fetch_pending(&PendingQuery {
                        shards: vec![*shard],
                        limit: 1,
                        ordering: relay.config().ordering,
                    })
                    .await
                    .map(|v| !v.is_empty())
                    .unwrap_or(true)
            } else {
                true
            };
            if left {
                failed.insert(*shard);
            }
        }
    }
    let mut response = DynamoDbEventResponse::default();
    for shard in failed {
        for seq in by_shard.remove(&shard).unwrap_or_default() {
            let mut f = DynamoDbBatchItemFailure::default();
            f.item_identifier = Some(seq);
            response.batch_item_failures.push(f);
        }
    }
    response
}

/// Run a Lambda function (`lambda_runtime`) that handles the outbox table's stream events
/// with [`handle_stream_event`]. Configure the event source mapping with
/// `FunctionResponseTypes = ["ReportBatchItemFailures"]`.
///
/// # Errors
/// Errors of the Lambda runtime.
pub async fn run_lambda(
    relay: Relay,
    store: Arc<dyn OutboxStore>,
) -> Result<(), lambda_runtime::Error> {
    lambda_runtime::run(service_fn(move |ev: LambdaEvent<Event>| {
        let (relay, store) = (relay.clone(), store.clone());
        async move {
            Ok::<_, lambda_runtime::Error>(handle_stream_event(&relay, &*store, ev.payload).await)
        }
    }))
    .await
}
