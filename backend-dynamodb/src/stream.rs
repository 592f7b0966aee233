//! [`StreamListener`]: wakes a running relay for exactly the shards that got new messages, from
//! the outbox table's DynamoDB stream. The stream is only a wake-up: which message is
//! published next is always decided by a strongly consistent read of the shard's queue.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use aws_sdk_dynamodbstreams::Client as StreamsClient;
use aws_sdk_dynamodbstreams::types::{AttributeValue, OperationType, ShardIteratorType};
use outbox_core::relay::RelayHandle;
use outbox_core::{CancellationToken, Error, Result};

use crate::codec::{META_SLOT, PK, SK, shard_of_pk};

fn streams_err<E>(what: &str, e: E) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    Error::unavailable(format!("DynamoDB Streams: {what} failed")).with_source(e)
}

/// A DynamoDB Streams client for a local endpoint (moto): region `us-east-1`, dummy
/// credentials (like [`local_client`](crate::local_client)).
pub fn local_streams_client(endpoint: &str) -> StreamsClient {
    let conf = aws_sdk_dynamodbstreams::Config::builder()
        .behavior_version(aws_sdk_dynamodbstreams::config::BehaviorVersion::latest())
        .region(aws_sdk_dynamodbstreams::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_dynamodbstreams::config::Credentials::new(
            "local",
            "local",
            None,
            None,
            "outbox-local",
        ))
        .build();
    StreamsClient::from_conf(conf)
}

/// The outbox shard named by a stream record's keys, if the record is a message's queue item
/// (`pk = q#<shard>`, `sk` below the meta slot) or a wake-up item that `requeue` wrote
/// (`pk = w#<shard>`).
pub fn shards_in_keys(pk: Option<&str>, sk: Option<&str>) -> Option<u32> {
    let pk = pk?;
    if let Some(shard) = crate::codec::shard_of_wake_pk(pk) {
        return Some(shard);
    }
    let shard = shard_of_pk(pk)?;
    let slot: u64 = sk?.parse().ok()?;
    (slot != META_SLOT).then_some(shard)
}

fn key_str<'a>(keys: &'a HashMap<String, AttributeValue>, name: &str) -> Option<&'a str> {
    match keys.get(name)? {
        AttributeValue::S(v) | AttributeValue::N(v) => Some(v),
        _ => None,
    }
}

/// Reads the outbox table's stream and reports which shards got new messages (`INSERT`
/// records of queue items). Starts at the stream's end (`LATEST`): messages committed before
/// are found by the relay's first sweep.
#[derive(Debug)]
pub struct StreamListener {
    client: StreamsClient,
    stream_arn: String,
    /// Iterator per open stream shard (`None`: the shard is closed and drained).
    iterators: BTreeMap<String, Option<String>>,
}

impl StreamListener {
    /// The listener behind [`StreamListener::new`]: on the stream of `outbox_table`, which
    /// `dynamodb` describes.
    pub(crate) async fn open(
        dynamodb: &aws_sdk_dynamodb::Client,
        outbox_table: &str,
        client: StreamsClient,
    ) -> Result<Self> {
        let d = dynamodb
            .describe_table()
            .table_name(outbox_table)
            .send()
            .await
            .map_err(crate::error::parse_error)?;
        let arn = d
            .table()
            .and_then(|t| t.latest_stream_arn())
            .ok_or_else(|| {
                Error::config(format!(
                    "table {outbox_table} has no stream; create it with DynamoDbStore::migrate"
                ))
            })?
            .to_owned();
        let mut l = StreamListener {
            client,
            stream_arn: arn,
            iterators: BTreeMap::new(),
        };
        l.discover().await?;
        Ok(l)
    }

    /// Find stream shards not seen yet (new ones start at their beginning, since they were
    /// created after the listener started; the first ones at `LATEST`).
    async fn discover(&mut self) -> Result<()> {
        let first = self.iterators.is_empty();
        let mut start: Option<String> = None;
        loop {
            let out = self
                .client
                .describe_stream()
                .stream_arn(&self.stream_arn)
                .set_exclusive_start_shard_id(start.take())
                .send()
                .await
                .map_err(|e| streams_err("DescribeStream", e))?;
            let Some(desc) = out.stream_description() else {
                return Ok(());
            };
            for shard in desc.shards() {
                let Some(id) = shard.shard_id() else { continue };
                if self.iterators.contains_key(id) {
                    continue;
                }
                let closed = shard
                    .sequence_number_range()
                    .and_then(|r| r.ending_sequence_number())
                    .is_some();
                let kind = if first && !closed {
                    ShardIteratorType::Latest
                } else if first {
                    // Closed before we started: nothing new in it.
                    self.iterators.insert(id.to_owned(), None);
                    continue;
                } else {
                    ShardIteratorType::TrimHorizon
                };
                let it = self
                    .client
                    .get_shard_iterator()
                    .stream_arn(&self.stream_arn)
                    .shard_id(id)
                    .shard_iterator_type(kind)
                    .send()
                    .await
                    .map_err(|e| streams_err("GetShardIterator", e))?;
                self.iterators
                    .insert(id.to_owned(), it.shard_iterator().map(str::to_owned));
            }
            match desc.last_evaluated_shard_id() {
                Some(id) => start = Some(id.to_owned()),
                None => return Ok(()),
            }
        }
    }

    /// Read every open stream shard once; the outbox shards that got new messages.
    ///
    /// # Errors
    /// DynamoDB Streams errors (retryable `Unavailable`).
    pub async fn poll_once(&mut self) -> Result<BTreeSet<u32>> {
        let mut woken = BTreeSet::new();
        let ids: Vec<String> = self.iterators.keys().cloned().collect();
        let mut closed_any = false;
        for id in ids {
            let Some(Some(it)) = self.iterators.get(&id).cloned() else {
                continue;
            };
            let out = self
                .client
                .get_records()
                .shard_iterator(it)
                .send()
                .await
                .map_err(|e| streams_err("GetRecords", e))?;
            for r in out.records() {
                if r.event_name() != Some(&OperationType::Insert) {
                    continue;
                }
                if let Some(keys) = r.dynamodb().and_then(|d| d.keys())
                    && let Some(shard) = shards_in_keys(key_str(keys, PK), key_str(keys, SK))
                {
                    woken.insert(shard);
                }
            }
            let next = out.next_shard_iterator().map(str::to_owned);
            closed_any |= next.is_none();
            self.iterators.insert(id, next);
        }
        if closed_any || self.iterators.values().all(Option::is_none) {
            self.discover().await?;
        }
        Ok(woken)
    }

    /// Until `shutdown`: poll the stream every `interval` and wake `relay` for the shards that
    /// got new messages (`RelayHandle::notify_shards`). Errors are logged and retried.
    pub async fn run(
        mut self,
        relay: RelayHandle,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        while !shutdown.is_cancelled() {
            match self.poll_once().await {
                Ok(shards) if !shards.is_empty() => relay.notify_shards(shards),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "outbox stream listener: poll failed; retrying")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
