//! Conversions between the message model and PostgreSQL values.

use std::collections::BTreeMap;

use outbox_core::{
    Bytes, DateTime, Error, Message, MessageId, MessageStatus, MessageType, Result, StoredMessage,
    TraceContext, Utc,
};
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::error::parse_error_with;

fn corrupt(column: &str, detail: impl std::fmt::Display) -> Error {
    Error::unexpected(format!("stored message has an invalid {column}: {detail}"))
}

fn col<'r, T>(row: &'r PgRow, name: &str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(name)
        .map_err(|e| parse_error_with(e, format_args!("reading column {name}")))
}

/// The columns of a stored message as PostgreSQL returns them, before any check: what
/// [`decode_row`] turns into a [`StoredMessage`]. Public (hidden) so the fuzz targets and the
/// bad-input tests can decode rows without a database.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct MessageRow {
    /// `sequence`.
    pub sequence: i64,
    /// `id`.
    pub id: Uuid,
    /// `topic`.
    pub topic: String,
    /// `key`.
    pub key: Option<String>,
    /// `payload`.
    pub payload: Vec<u8>,
    /// `headers` (`jsonb`), an object of strings when sound.
    pub headers: serde_json::Value,
    /// `content_type`.
    pub content_type: Option<String>,
    /// `message_type`.
    pub message_type: String,
    /// `correlation_id`.
    pub correlation_id: Option<String>,
    /// `reply_to`.
    pub reply_to: Option<String>,
    /// `created_at`.
    pub created_at: DateTime<Utc>,
    /// `deliver_after`.
    pub deliver_after: Option<DateTime<Utc>>,
    /// `traceparent`.
    pub traceparent: Option<String>,
    /// `tracestate`.
    pub tracestate: Option<String>,
    /// `baggage`.
    pub baggage: Option<String>,
    /// `status`.
    pub status: String,
    /// `attempts`.
    pub attempts: i64,
    /// `next_attempt_at`.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// `last_error`.
    pub last_error: Option<String>,
    /// `dispatched_at`.
    pub dispatched_at: Option<DateTime<Utc>>,
    /// `shard`.
    pub shard: i32,
}

/// Read a row selected with the message columns.
pub(crate) fn read_message(row: &PgRow) -> Result<StoredMessage> {
    decode_row(MessageRow {
        sequence: col(row, "sequence")?,
        id: col(row, "id")?,
        topic: col(row, "topic")?,
        key: col(row, "key")?,
        payload: col(row, "payload")?,
        headers: col(row, "headers")?,
        content_type: col(row, "content_type")?,
        message_type: col(row, "message_type")?,
        correlation_id: col(row, "correlation_id")?,
        reply_to: col(row, "reply_to")?,
        created_at: col(row, "created_at")?,
        deliver_after: col(row, "deliver_after")?,
        traceparent: col(row, "traceparent")?,
        tracestate: col(row, "tracestate")?,
        baggage: col(row, "baggage")?,
        status: col(row, "status")?,
        attempts: col(row, "attempts")?,
        next_attempt_at: col(row, "next_attempt_at")?,
        last_error: col(row, "last_error")?,
        dispatched_at: col(row, "dispatched_at")?,
        shard: col(row, "shard")?,
    })
}

/// Check and convert the columns of a stored message.
///
/// # Errors
/// [`ErrorKind::Unexpected`](outbox_core::ErrorKind::Unexpected) naming the column when a
/// value is not what this crate writes (headers that are not a JSON object of strings, an
/// unknown status, a negative count).
#[doc(hidden)]
pub fn decode_row(row: MessageRow) -> Result<StoredMessage> {
    let headers: BTreeMap<String, String> =
        serde_json::from_value(row.headers).map_err(|e| corrupt("headers", e))?;
    let status: MessageStatus = row.status.parse().map_err(|e| corrupt("status", e))?;
    let message = Message {
        id: MessageId::from_uuid(row.id),
        topic: row.topic,
        key: row.key,
        payload: Bytes::from(row.payload),
        headers,
        content_type: row.content_type,
        message_type: MessageType::parse(&row.message_type),
        correlation_id: row.correlation_id,
        reply_to: row.reply_to,
        created_at: row.created_at,
        deliver_after: row.deliver_after,
        trace: TraceContext {
            traceparent: row.traceparent,
            tracestate: row.tracestate,
            baggage: row.baggage,
        },
    };
    Ok(StoredMessage {
        message,
        status,
        attempts: u32::try_from(row.attempts).map_err(|e| corrupt("attempts", e))?,
        next_attempt_at: row.next_attempt_at,
        last_error: row.last_error,
        dispatched_at: row.dispatched_at,
        shard: u32::try_from(row.shard).map_err(|e| corrupt("shard", e))?,
        sequence: u64::try_from(row.sequence).map_err(|e| corrupt("sequence", e))?,
    })
}

/// The column arrays of a multi-row insert (`unnest`), in slice order.
#[derive(Default)]
pub(crate) struct Columns {
    pub(crate) id: Vec<Uuid>,
    pub(crate) topic: Vec<String>,
    pub(crate) key: Vec<Option<String>>,
    pub(crate) payload: Vec<Vec<u8>>,
    pub(crate) headers: Vec<String>,
    pub(crate) content_type: Vec<Option<String>>,
    pub(crate) message_type: Vec<String>,
    pub(crate) correlation_id: Vec<Option<String>>,
    pub(crate) reply_to: Vec<Option<String>>,
    pub(crate) created_at: Vec<DateTime<Utc>>,
    pub(crate) deliver_after: Vec<Option<DateTime<Utc>>>,
    pub(crate) traceparent: Vec<Option<String>>,
    pub(crate) tracestate: Vec<Option<String>>,
    pub(crate) baggage: Vec<Option<String>>,
    pub(crate) shard: Vec<i32>,
}

impl Columns {
    pub(crate) fn push(&mut self, m: &Message, shard: u32) -> Result<()> {
        self.id.push(m.id.as_uuid());
        self.topic.push(m.topic.clone());
        self.key.push(m.key.clone());
        self.payload.push(m.payload.to_vec());
        self.headers
            .push(serde_json::to_string(&m.headers).map_err(|e| {
                Error::invalid_input("headers cannot be encoded as JSON").with_source(e)
            })?);
        self.content_type.push(m.content_type.clone());
        self.message_type.push(m.message_type.as_str().to_owned());
        self.correlation_id.push(m.correlation_id.clone());
        self.reply_to.push(m.reply_to.clone());
        self.created_at.push(m.created_at);
        self.deliver_after.push(m.deliver_after);
        self.traceparent.push(m.trace.traceparent.clone());
        self.tracestate.push(m.trace.tracestate.clone());
        self.baggage.push(m.trace.baggage.clone());
        self.shard.push(i32::try_from(shard).map_err(|_| {
            Error::unexpected(format!("shard {shard} does not fit a PostgreSQL integer"))
        })?);
        Ok(())
    }
}

/// A count or limit as a PostgreSQL bigint (saturating).
pub(crate) fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
