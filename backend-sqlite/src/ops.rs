//! The synchronous statements shared by every entry point: the async store, [`SqliteTx`]
//! and the `*_in` methods for callers' own rusqlite transactions. One implementation of each
//! write.
//!
//! [`SqliteTx`]: crate::SqliteTx

use outbox_core::rules::{batch_error, check_inbox_entry};
use outbox_core::{
    DateTime, Error, ErrorKind, InboxEntry, InsertOutcome, Message, Result, Utc, inbox_expiry,
    shard_for,
};
use rusqlite::{Connection, TransactionBehavior, params};

use crate::codec::{headers_json, to_micros};
use crate::core::Core;
use crate::error::parse_error_with;

/// Check a message before writing it: the model's own invariants, then the size limit.
pub(crate) fn check_message(core: &Core, message: &Message) -> Result<()> {
    outbox_core::rules::check_message(message)?;
    message.check_size(core.max_message_size)
}

/// Insert one message as pending. The caller's transaction decides atomicity.
pub(crate) fn insert_message(conn: &Connection, core: &Core, message: &Message) -> Result<()> {
    check_message(core, message)?;
    insert_checked(conn, core, message)
}

/// Insert several messages, in order; every message is checked before the first is written.
pub(crate) fn insert_messages(conn: &Connection, core: &Core, messages: &[Message]) -> Result<()> {
    for (i, m) in messages.iter().enumerate() {
        check_message(core, m).map_err(|e| batch_error(e, i))?;
    }
    for (i, m) in messages.iter().enumerate() {
        insert_checked(conn, core, m).map_err(|e| batch_error(e, i))?;
    }
    Ok(())
}

fn insert_checked(conn: &Connection, core: &Core, m: &Message) -> Result<()> {
    let ctx = |e| parse_error_with(e, format_args!("adding message {}", m.id));
    let headers = headers_json(&m.headers)?;
    let shard = shard_for(m.key.as_deref(), &m.id, core.shard_count);
    let mut stmt = conn.prepare_cached(&core.sql.insert_message).map_err(ctx)?;
    stmt.execute(params![
        m.id.to_string(),
        m.topic,
        m.key,
        m.payload.as_ref(),
        headers,
        m.content_type,
        m.message_type.as_str(),
        m.correlation_id,
        m.reply_to,
        to_micros(m.created_at),
        m.deliver_after.map(to_micros),
        m.trace.traceparent,
        m.trace.tracestate,
        m.trace.baggage,
        i64::from(shard),
    ])
    .map_err(|e| {
        let e = ctx(e);
        if e.kind() == ErrorKind::AlreadyExists {
            Error::new(
                ErrorKind::AlreadyExists,
                format!("a message with id {} already exists", m.id),
            )
            .with_source(e)
        } else {
            e
        }
    })?;
    Ok(())
}

/// Insert an inbox entry at `now`: `Inserted` if the pair is absent or its entry expired,
/// `Duplicate` if a live entry exists.
pub(crate) fn inbox_insert(
    conn: &Connection,
    core: &Core,
    entry: &InboxEntry,
    now: DateTime<Utc>,
) -> Result<InsertOutcome> {
    check_inbox_entry(entry)?;
    let ctx = |e| {
        parse_error_with(
            e,
            format_args!(
                "inserting inbox entry ({}, {:?})",
                entry.message_id, entry.handler_key
            ),
        )
    };
    let expires = inbox_expiry(now, core.inbox_retention);
    let mut stmt = conn.prepare_cached(&core.sql.inbox_insert).map_err(ctx)?;
    let changed = stmt
        .execute(params![
            entry.message_id.to_string(),
            entry.handler_key,
            to_micros(now),
            to_micros(expires)
        ])
        .map_err(ctx)?;
    Ok(if changed == 0 {
        InsertOutcome::Duplicate
    } else {
        InsertOutcome::Inserted
    })
}

/// Run `f` in a `BEGIN IMMEDIATE` transaction and commit; roll back if `f` fails.
pub(crate) fn write<T>(
    conn: &mut Connection,
    f: impl FnOnce(&Connection) -> Result<T>,
) -> Result<T> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| parse_error_with(e, "beginning a write transaction"))?;
    let value = f(&tx)?;
    tx.commit()
        .map_err(|e| parse_error_with(e, "committing a write transaction"))?;
    Ok(value)
}

/// Run `f` in a read (deferred) transaction, so several statements see one snapshot.
pub(crate) fn read<T>(
    conn: &mut Connection,
    f: impl FnOnce(&Connection) -> Result<T>,
) -> Result<T> {
    let tx = conn
        .transaction()
        .map_err(|e| parse_error_with(e, "beginning a read transaction"))?;
    let value = f(&tx)?;
    tx.commit()
        .map_err(|e| parse_error_with(e, "ending a read transaction"))?;
    Ok(value)
}
