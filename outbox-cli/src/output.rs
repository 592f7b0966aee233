//! What the commands print: aligned tables for people, and the `--json` documents whose
//! schema the README fixes (fields are only ever added).

use std::collections::BTreeMap;
use std::time::Duration;

use outbox_core::{DateTime, Lease, StoredMessage, Utc};
use serde::Serialize;

/// A timestamp as RFC 3339 in UTC with microseconds (the precision stores keep).
pub fn ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn ts_opt(t: Option<DateTime<Utc>>) -> Option<String> {
    t.map(ts)
}

/// Columns padded to their widest cell, two spaces apart; the last column is not padded.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with this header row.
    pub fn new(header: &[&str]) -> Self {
        Table {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    /// Append a row (as many cells as the header).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The rendered table, one line per row.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// One message in `list --json` and `show --json`.
#[derive(Debug, Serialize)]
pub struct MessageJson {
    id: String,
    topic: String,
    key: Option<String>,
    status: &'static str,
    attempts: u32,
    last_error: Option<String>,
    shard: u32,
    sequence: u64,
    created_at: String,
    deliver_after: Option<String>,
    next_attempt_at: Option<String>,
    dispatched_at: Option<String>,
    message_type: String,
    content_type: Option<String>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    headers: BTreeMap<String, String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    baggage: Option<String>,
    payload_size: usize,
    /// The payload when it is UTF-8 text, else `None`.
    payload_text: Option<String>,
}

impl From<&StoredMessage> for MessageJson {
    fn from(m: &StoredMessage) -> Self {
        let msg = &m.message;
        MessageJson {
            id: msg.id.to_string(),
            topic: msg.topic.clone(),
            key: msg.key.clone(),
            status: m.status.as_str(),
            attempts: m.attempts,
            last_error: m.last_error.clone(),
            shard: m.shard,
            sequence: m.sequence,
            created_at: ts(msg.created_at),
            deliver_after: ts_opt(msg.deliver_after),
            next_attempt_at: ts_opt(m.next_attempt_at),
            dispatched_at: ts_opt(m.dispatched_at),
            message_type: msg.message_type.as_str().to_owned(),
            content_type: msg.content_type.clone(),
            correlation_id: msg.correlation_id.clone(),
            reply_to: msg.reply_to.clone(),
            headers: msg.headers.clone(),
            traceparent: msg.trace.traceparent.clone(),
            tracestate: msg.trace.tracestate.clone(),
            baggage: msg.trace.baggage.clone(),
            payload_size: msg.payload.len(),
            payload_text: std::str::from_utf8(&msg.payload).ok().map(str::to_owned),
        }
    }
}

/// Who holds one shard's lease, in `status --json`.
#[derive(Debug, Serialize)]
pub struct ShardJson {
    /// The shard number.
    pub shard: u32,
    /// The lock resource, `{lock_prefix}/shard/{shard}`.
    pub resource: String,
    /// The holder's instance id; `None` when the shard is free.
    pub owner: Option<String>,
    /// The holder's fencing token.
    pub token: Option<u64>,
    /// When the lease expires unless renewed.
    pub expires_at: Option<String>,
}

impl ShardJson {
    /// The row for `shard` on `resource`, held by `lease` if any.
    pub fn new(shard: u32, resource: String, lease: Option<&Lease>) -> Self {
        ShardJson {
            shard,
            resource,
            owner: lease.map(|l| l.owner.clone()),
            token: lease.map(|l| l.token),
            expires_at: lease.map(|l| ts(l.expires_at)),
        }
    }
}

/// `status --json`.
#[derive(Debug, Serialize)]
pub struct StatusJson {
    /// The store, password redacted.
    pub store: String,
    /// Pending messages (due or not).
    pub pending: u64,
    /// Parked (dead-lettered) messages.
    pub parked: u64,
    /// Messages dispatched in the last hour; `None` when the backend cannot count them.
    pub dispatched_last_hour: Option<u64>,
    /// Age of the oldest pending message in seconds; `None` when nothing is pending.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Every shard's lease.
    pub shards: Vec<ShardJson>,
    /// `false` when a `--max-age` or `--max-pending` limit is exceeded.
    pub healthy: bool,
    /// One sentence per exceeded limit.
    pub problems: Vec<String>,
}

/// Seconds as a JSON number.
pub fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}
