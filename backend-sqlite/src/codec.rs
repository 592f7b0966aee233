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

/// Read a row selected with the columns of `schema::MESSAGE_COLUMNS`.
pub(crate) fn read_message(row: &Row<'_>) -> Result<StoredMessage> {
    let sequence: i64 = row.get(0).map_err(sql)?;
    let id: String = row.get(1).map_err(sql)?;
    let id: MessageId = id.parse().map_err(|e| corrupt("id", e))?;
    let payload: Vec<u8> = row.get(4).map_err(sql)?;
    let headers: String = row.get(5).map_err(sql)?;
    let headers: BTreeMap<String, String> =
        serde_json::from_str(&headers).map_err(|e| corrupt("headers", e))?;
    let message_type: String = row.get(7).map_err(sql)?;
    let status: String = row.get(15).map_err(sql)?;
    let status: MessageStatus = status.parse().map_err(|e| corrupt("status", e))?;
    let attempts: i64 = row.get(16).map_err(sql)?;
    let shard: i64 = row.get(20).map_err(sql)?;
    let message = Message {
        id,
        topic: row.get(2).map_err(sql)?,
        key: row.get(3).map_err(sql)?,
        payload: Bytes::from(payload),
        headers,
        content_type: row.get(6).map_err(sql)?,
        message_type: MessageType::parse(&message_type),
        correlation_id: row.get(8).map_err(sql)?,
        reply_to: row.get(9).map_err(sql)?,
        created_at: from_micros("created_at", row.get(10).map_err(sql)?)?,
        deliver_after: opt_from_micros("deliver_after", row.get(11).map_err(sql)?)?,
        trace: TraceContext {
            traceparent: row.get(12).map_err(sql)?,
            tracestate: row.get(13).map_err(sql)?,
            baggage: row.get(14).map_err(sql)?,
        },
    };
    Ok(StoredMessage {
        message,
        status,
        attempts: u32::try_from(attempts).map_err(|e| corrupt("attempts", e))?,
        next_attempt_at: opt_from_micros("next_attempt_at", row.get(17).map_err(sql)?)?,
        last_error: row.get(18).map_err(sql)?,
        dispatched_at: opt_from_micros("dispatched_at", row.get(19).map_err(sql)?)?,
        shard: u32::try_from(shard).map_err(|e| corrupt("shard", e))?,
        sequence: u64::try_from(sequence).map_err(|e| corrupt("sequence", e))?,
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
