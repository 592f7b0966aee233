//! The writes shared by every entry point: the store's own methods, [`PgTx`] and the `*_in`
//! methods for callers' own connections and transactions. One implementation of each.
//!
//! [`PgTx`]: crate::PgTx

use outbox_core::rules::{batch_error, check_inbox_entry};
use outbox_core::{
    DateTime, Error, ErrorKind, InboxEntry, InsertOutcome, Message, Result, Utc, inbox_expiry,
    shard_for,
};
use sqlx::PgConnection;

use crate::codec::Columns;
use crate::core::{Core, q};
use crate::error::{parse_error_with, sqlstate};

/// Check a message before writing it: the shared rules (which keep out what PostgreSQL text
/// cannot hold), then the size limit.
pub(crate) fn check_message(core: &Core, message: &Message) -> Result<()> {
    outbox_core::rules::check_message(message)?;
    message.check_size(core.max_message_size)
}

/// Insert `messages` as pending, in order, with one statement on `conn`: per-key advisory
/// locks first, then sequences in slice order. Every message is checked before anything is
/// sent. Atomic on its own (one statement); inside a transaction the locks are held until it
/// ends.
pub(crate) async fn insert_messages(
    conn: &mut PgConnection,
    core: &Core,
    messages: &[Message],
) -> Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let batch = messages.len() > 1;
    let mut cols = Columns::default();
    for (i, m) in messages.iter().enumerate() {
        check_message(core, m).map_err(|e| if batch { batch_error(e, i) } else { e })?;
        cols.push(m, shard_for(m.key.as_deref(), &m.id, core.shard_count))?;
    }
    let what = if batch {
        format!("adding a batch of {} messages", messages.len())
    } else {
        format!("adding message {}", messages[0].id)
    };
    let channel = core.notify.then(|| core.channel.clone());
    let result = sqlx::query(q(&core.sql.insert_messages))
        .bind(core.key_lock_class)
        .bind(cols.id)
        .bind(cols.topic)
        .bind(cols.key)
        .bind(cols.payload)
        .bind(cols.headers)
        .bind(cols.content_type)
        .bind(cols.message_type)
        .bind(cols.correlation_id)
        .bind(cols.reply_to)
        .bind(cols.created_at)
        .bind(cols.deliver_after)
        .bind(cols.traceparent)
        .bind(cols.tracestate)
        .bind(cols.baggage)
        .bind(cols.shard)
        .bind(channel)
        .execute(conn)
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(e) if sqlstate(&e).as_deref() == Some("23505") => {
            let detail = match &e {
                sqlx::Error::Database(db) => db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .and_then(|d| d.detail())
                    .map(str::to_owned),
                _ => None,
            };
            let suffix = if batch {
                "; nothing of the batch was written"
            } else {
                ""
            };
            Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{what}: a message with the same id already exists{}{suffix}",
                    detail.map(|d| format!(" ({d})")).unwrap_or_default()
                ),
            )
            .with_source(e))
        }
        Err(e) => Err(parse_error_with(e, what)),
    }
}

/// Insert an inbox entry at `now`: `Inserted` if the pair is absent or its entry expired,
/// `Duplicate` if a live entry exists. A concurrent insert of the same pair waits for the
/// other transaction and then sees its entry, so exactly one wins.
pub(crate) async fn inbox_insert(
    conn: &mut PgConnection,
    core: &Core,
    entry: &InboxEntry,
    now: DateTime<Utc>,
) -> Result<InsertOutcome> {
    check_inbox_entry(entry)?;
    let expires = inbox_expiry(now, core.inbox_retention);
    let done = sqlx::query(q(&core.sql.inbox_insert))
        .bind(entry.message_id.as_uuid())
        .bind(&entry.handler_key)
        .bind(now)
        .bind(expires)
        .execute(conn)
        .await
        .map_err(|e| {
            parse_error_with(
                e,
                format_args!(
                    "inserting inbox entry ({}, {:?})",
                    entry.message_id, entry.handler_key
                ),
            )
        })?;
    Ok(if done.rows_affected() == 0 {
        InsertOutcome::Duplicate
    } else {
        InsertOutcome::Inserted
    })
}
