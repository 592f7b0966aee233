//! Conversions between the message model and SQLite values.

use std::collections::BTreeMap;

use outbox_core::{
    Bytes, DateTime, Error, Message, MessageId, MessageStatus, MessageType, Result, StoredMessage,
    TraceContext, Utc,
};
use rusqlite::Row;

/// A timestamp as integer microseconds since the Unix epoch (exact for every `DateTime<Utc>`
/// chrono can represent).
pub(crate) fn to_micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// The inverse of [`to_micros`].
pub(crate) fn from_micros(column: &str, micros: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros).ok_or_else(|| {
        Error::unexpected(format!(
            "stored {column} {micros} is not a valid timestamp in microseconds"
        ))
    })
}

fn opt_from_micros(column: &str, micros: Option<i64>) -> Result<Option<DateTime<Utc>>> {
    micros.map(|m| from_micros(column, m)).transpose()
}

/// A count or limit as an SQLite integer (saturating).
pub(crate) fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A row count from SQLite as `u64`.
pub(crate) fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

pub(crate) fn headers_json(headers: &BTreeMap<String, String>) -> Result<String> {
    serde_json::to_string(headers)
        .map_err(|e| Error::invalid_input("headers cannot be encoded as JSON").with_source(e))
}

fn sql(e: rusqlite::Error) -> Error {
    crate::error::parse_error(e)
}

fn corrupt(column: &str, detail: impl std::fmt::Display) -> Error {
    Error::unexpected(format!("stored message has an invalid {column}: {detail}"))
}

/// The columns of a stored message as SQLite returns them, before any check: what
/// [`decode_row`] turns into a [`StoredMessage`]. Public (hidden) so the fuzz targets and the
/// bad-input tests can decode rows without a database.
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct MessageRow {
    /// `sequence`.
    pub sequence: i64,
    /// `id` (a hyphenated UUID when sound).
    pub id: String,
    /// `topic`.
    pub topic: String,
    /// `key`.
    pub key: Option<String>,
    /// `payload`.
    pub payload: Vec<u8>,
    /// `headers`, a JSON object of strings when sound.
    pub headers: String,
    /// `content_type`.
    pub content_type: Option<String>,
    /// `message_type`.
    pub message_type: String,
    /// `correlation_id`.
    pub correlation_id: Option<String>,
    /// `reply_to`.
    pub reply_to: Option<String>,
    /// `created_at`, microseconds since the epoch.
    pub created_at: i64,
    /// `deliver_after`, microseconds since the epoch.
    pub deliver_after: Option<i64>,
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
    /// `next_attempt_at`, microseconds since the epoch.
    pub next_attempt_at: Option<i64>,
    /// `last_error`.
    pub last_error: Option<String>,
    /// `dispatched_at`, microseconds since the epoch.
    pub dispatched_at: Option<i64>,
    /// `shard`.
    pub shard: i64,
}

/// Read a row selected with the columns of `schema::MESSAGE_COLUMNS`.
pub(crate) fn read_message(row: &Row<'_>) -> Result<StoredMessage> {
    decode_row(MessageRow {
        sequence: row.get(0).map_err(sql)?,
        id: row.get(1).map_err(sql)?,
        topic: row.get(2).map_err(sql)?,
        key: row.get(3).map_err(sql)?,
        payload: row.get(4).map_err(sql)?,
        headers: row.get(5).map_err(sql)?,
        content_type: row.get(6).map_err(sql)?,
        message_type: row.get(7).map_err(sql)?,
        correlation_id: row.get(8).map_err(sql)?,
        reply_to: row.get(9).map_err(sql)?,
        created_at: row.get(10).map_err(sql)?,
        deliver_after: row.get(11).map_err(sql)?,
        traceparent: row.get(12).map_err(sql)?,
        tracestate: row.get(13).map_err(sql)?,
        baggage: row.get(14).map_err(sql)?,
        status: row.get(15).map_err(sql)?,
        attempts: row.get(16).map_err(sql)?,
        next_attempt_at: row.get(17).map_err(sql)?,
        last_error: row.get(18).map_err(sql)?,
        dispatched_at: row.get(19).map_err(sql)?,
        shard: row.get(20).map_err(sql)?,
    })
}

/// Check and convert the columns of a stored message.
///
/// # Errors
/// [`ErrorKind::Unexpected`](outbox_core::ErrorKind::Unexpected) naming the column when a
/// value is not what this crate writes (an id that is no UUID, headers that are not a JSON
/// object of strings, an unknown status, a timestamp or count out of range).
#[doc(hidden)]
pub fn decode_row(row: MessageRow) -> Result<StoredMessage> {
    let id: MessageId = row.id.parse().map_err(|e| corrupt("id", e))?;
    let headers: BTreeMap<String, String> =
        serde_json::from_str(&row.headers).map_err(|e| corrupt("headers", e))?;
    let status: MessageStatus = row.status.parse().map_err(|e| corrupt("status", e))?;
    let message = Message {
        id,
        topic: row.topic,
        key: row.key,
        payload: Bytes::from(row.payload),
        headers,
        content_type: row.content_type,
        message_type: MessageType::parse(&row.message_type),
        correlation_id: row.correlation_id,
        reply_to: row.reply_to,
        created_at: from_micros("created_at", row.created_at)?,
        deliver_after: opt_from_micros("deliver_after", row.deliver_after)?,
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
        next_attempt_at: opt_from_micros("next_attempt_at", row.next_attempt_at)?,
        last_error: row.last_error,
        dispatched_at: opt_from_micros("dispatched_at", row.dispatched_at)?,
        shard: u32::try_from(row.shard).map_err(|e| corrupt("shard", e))?,
        sequence: u64::try_from(row.sequence).map_err(|e| corrupt("sequence", e))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micros_round_trip_at_the_extremes() {
        for t in [
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MAX_UTC,
            DateTime::<Utc>::UNIX_EPOCH,
        ] {
            let t = outbox_core::truncate_micros(t);
            assert_eq!(from_micros("t", to_micros(t)).unwrap(), t);
        }
        assert!(from_micros("t", i64::MAX).is_err());
    }
}
