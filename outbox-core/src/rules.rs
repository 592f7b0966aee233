//! The rules every backend shares: what a name, key or header may hold, the defaults, and the
//! errors a rule or a lease check produces.
//!
//! One definition here instead of one per backend, so the same input is refused (or stored)
//! the same way everywhere. The rules are the strictest that every backend can store:
//!
//! - **No NUL character** anywhere in text: PostgreSQL `text` and `jsonb` cannot hold U+0000.
//! - **At most [`MAX_FIELD_LEN`] bytes** (1024) for names and other short text: DynamoDB sort
//!   keys hold at most 1024 bytes (the inbox's handler key is one), partition keys 2048 (lease
//!   names, message ids); PostgreSQL's b-tree entries hold about 2700 bytes; SQLite has no
//!   limit of its own. The length is counted in UTF-8 bytes, not characters.
//! - **Valid UTF-8** is given by `&str`; nothing to check.
//!
//! Header values and trace fields have no length rule of their own (the message size limit
//! counts them) but must not hold NUL either. Backends call these functions and only map
//! their native errors; the message model ([`Message::validate`](crate::Message::validate))
//! uses the same functions.

use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::inbox::InboxEntry;
use crate::lock::Lease;
use crate::message::Message;

pub use crate::text::{MAX_FIELD_LEN, check_name, check_no_nul, check_text};

/// Default number of shards of every store.
pub const DEFAULT_SHARD_COUNT: u32 = 16;

/// Default inbox dedup window of every store: 7 days.
pub const DEFAULT_INBOX_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Default table prefix of the SQL backends.
pub const DEFAULT_TABLE_PREFIX: &str = "outbox_";

/// Default largest accepted message of the backends whose storage sets no lower limit (as
/// [`Message::encoded_size`](crate::Message::encoded_size) measures it): 10 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 10 * 1024 * 1024;

/// Longest stored `last_error`, in bytes: 1024. A longer error text is cut (see
/// [`error_text`]) so it fits in every backend's item or row next to the message.
pub const MAX_LAST_ERROR: usize = 1024;

/// The error text a store keeps as `last_error` for `error`: NUL replaced by U+FFFD (the
/// text is diagnostics, so it is kept rather than refused), cut at a character boundary to
/// at most [`MAX_LAST_ERROR`] bytes, ending in `...` when cut.
pub fn error_text(error: &str) -> String {
    let text = error.replace('\0', "\u{fffd}");
    if text.len() <= MAX_LAST_ERROR {
        return text;
    }
    let mut end = MAX_LAST_ERROR - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Check a configured shard count: between 1 and `max`, the backend's own bound.
///
/// # Errors
/// `ConfigInvalid` naming `shard_count` otherwise.
pub fn check_shard_count(count: u32, max: u32) -> Result<()> {
    if count == 0 || count > max {
        return Err(Error::config(format!(
            "shard_count must be between 1 and {max}, got {count}"
        )));
    }
    Ok(())
}

/// Check a configured message size limit: between 1 and `max` bytes, the backend's own bound
/// (its largest storable row or item).
///
/// # Errors
/// `ConfigInvalid` naming `max_message_size` otherwise.
pub fn check_max_message_size(limit: usize, max: usize) -> Result<()> {
    if limit == 0 || limit > max {
        return Err(Error::config(format!(
            "max_message_size must be between 1 and {max} bytes, got {limit}"
        )));
    }
    Ok(())
}

/// Check a configured inbox retention: more than zero (a zero dedup window never detects a
/// duplicate) and small enough to add to a timestamp.
///
/// # Errors
/// `ConfigInvalid` naming `inbox_retention` otherwise.
pub fn check_inbox_retention(retention: Duration) -> Result<()> {
    if retention.is_zero() {
        return Err(Error::config(
            "inbox_retention must be more than zero (a zero dedup window never detects a \
             duplicate)",
        ));
    }
    if chrono::Duration::from_std(retention).is_err() {
        return Err(Error::config(format!(
            "inbox_retention {retention:?} is too large"
        )));
    }
    Ok(())
}

/// Check a message before a store writes it: [`Message::validate`], with the message's id
/// in the error. The size limit is the store's own ([`Message::check_size`]).
///
/// # Errors
/// `InvalidInput` naming the message and the offending field.
pub fn check_message(message: &Message) -> Result<()> {
    message
        .validate()
        .map_err(|e| Error::new(e.kind(), format!("message {}: {}", message.id, e.message())))
}

/// Check an inbox entry: its handler key is a name ([`check_name`]).
///
/// # Errors
/// `InvalidInput` naming the entry's message when the handler key breaks the rule.
pub fn check_inbox_entry(entry: &InboxEntry) -> Result<()> {
    check_name("inbox handler_key", &entry.handler_key).map_err(|e| {
        Error::new(
            e.kind(),
            format!("{} (message {})", e.message(), entry.message_id),
        )
    })
}

/// Check the names of a lease request: resource and owner are names ([`check_name`]).
///
/// # Errors
/// `InvalidInput` when either breaks the rule.
pub fn check_lease_names(resource: &str, owner: &str) -> Result<()> {
    check_name("lease resource", resource)?;
    check_name("lease owner", owner)
}

/// Check a lease passed back to `renew` or `release`: its names ([`check_lease_names`]).
///
/// # Errors
/// `InvalidInput` when a name breaks the rule (no acquire can have returned such a lease).
pub fn check_lease(lease: &Lease) -> Result<()> {
    check_lease_names(&lease.resource, &lease.owner)
}

/// Check a lease TTL: more than zero.
///
/// # Errors
/// `InvalidInput` for a zero TTL.
pub fn check_lease_ttl(ttl: Duration) -> Result<()> {
    if ttl.is_zero() {
        return Err(Error::invalid_input("lease ttl must be more than zero"));
    }
    Ok(())
}

/// The `LeaseLost` error for `lease`, saying `why` (for example "it was released").
pub fn lease_lost(lease: &Lease, why: &str) -> Error {
    Error::new(
        ErrorKind::LeaseLost,
        format!(
            "lease on {:?} held by {:?} with token {} is lost: {why}",
            lease.resource, lease.owner, lease.token
        ),
    )
}

/// A fencing token read from storage as a signed integer (SQL `bigint`/`INTEGER`).
///
/// # Errors
/// `Unexpected` for a negative stored token (tokens start at 1 and only grow).
pub fn lease_token(stored: i64) -> Result<u64> {
    u64::try_from(stored)
        .map_err(|_| Error::unexpected(format!("stored lease token {stored} is negative")))
}

/// The fencing token of `lease` as the signed integer SQL stores.
///
/// # Errors
/// `LeaseLost` for a token over `i64::MAX`: no store issued it.
pub fn signed_token(lease: &Lease) -> Result<i64> {
    i64::try_from(lease.token).map_err(|_| lease_lost(lease, "unknown token"))
}

/// The error of entry `index` of a batch: same kind and retryability, the message says which
/// entry failed and that nothing of the batch was written; `e` is kept as the source.
pub fn batch_error(e: Error, index: usize) -> Error {
    let retryable = e.is_retryable();
    Error::new(
        e.kind(),
        format!(
            "batch entry {index}: {}; nothing of the batch was written",
            e.message()
        ),
    )
    .set_retryable(retryable)
    .with_source(e)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::MessageId;

    fn kind(r: Result<()>) -> Option<ErrorKind> {
        r.err().map(|e| e.kind())
    }

    #[test]
    fn names_follow_one_rule() {
        let longest = "é".repeat(MAX_FIELD_LEN / 2);
        assert_eq!(longest.len(), MAX_FIELD_LEN);
        assert_eq!(kind(check_name("n", &longest)), None);
        assert_eq!(kind(check_name("n", "a")), None);
        // One byte over, in fewer characters than the limit: bytes count, not characters.
        let over = format!("{longest}a");
        assert!(over.chars().count() < MAX_FIELD_LEN);
        for bad in ["", "a\0b", "\0", over.as_str()] {
            assert_eq!(
                kind(check_name("n", bad)),
                Some(ErrorKind::InvalidInput),
                "{bad:?}"
            );
        }
        assert_eq!(kind(check_text("k", "")), None);
        assert_eq!(kind(check_text("k", &over)), Some(ErrorKind::InvalidInput));
        assert_eq!(
            kind(check_no_nul("v", &"x".repeat(10 * MAX_FIELD_LEN))),
            None
        );
        let e = check_no_nul("header \"h\"", "a\0").unwrap_err();
        assert!(
            e.message().contains("header \"h\"") && e.message().contains("NUL"),
            "{e}"
        );
    }

    #[test]
    fn inbox_and_lease_checks_name_the_field() {
        let entry = InboxEntry {
            message_id: MessageId::new(),
            handler_key: "h\0".to_owned(),
        };
        let e = check_inbox_entry(&entry).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.message().contains("handler_key"), "{e}");
        assert!(e.message().contains(&entry.message_id.to_string()), "{e}");
        let e = check_lease_names("r", "").unwrap_err();
        assert!(e.message().contains("lease owner"), "{e}");
        let e = check_lease_names("r\0", "o").unwrap_err();
        assert!(e.message().contains("lease resource"), "{e}");
        assert_eq!(
            kind(check_lease_ttl(Duration::ZERO)),
            Some(ErrorKind::InvalidInput)
        );
        assert_eq!(kind(check_lease_ttl(Duration::from_micros(1))), None);
    }

    #[test]
    fn error_texts_are_clean_and_bounded() {
        assert_eq!(error_text("broker down"), "broker down");
        assert_eq!(error_text("a\0b"), "a\u{fffd}b");
        let long = "ü".repeat(MAX_LAST_ERROR);
        let cut = error_text(&long);
        assert!(
            cut.len() <= MAX_LAST_ERROR && cut.ends_with("..."),
            "{}",
            cut.len()
        );
        assert!(long.starts_with(cut.trim_end_matches("...")));
        let exact = "x".repeat(MAX_LAST_ERROR);
        assert_eq!(error_text(&exact), exact);
    }

    #[test]
    fn config_rules() {
        assert!(check_shard_count(1, 1).is_ok());
        for (n, max) in [(0, 16), (17, 16)] {
            let e = check_shard_count(n, max).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
            assert!(e.message().contains("shard_count"), "{e}");
        }
        assert!(check_inbox_retention(DEFAULT_INBOX_RETENTION).is_ok());
        for d in [Duration::ZERO, Duration::MAX] {
            let e = check_inbox_retention(d).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
            assert!(e.message().contains("inbox_retention"), "{e}");
        }
    }

    #[test]
    fn tokens_and_batch_errors() {
        assert_eq!(lease_token(7).unwrap(), 7);
        assert_eq!(lease_token(-1).unwrap_err().kind(), ErrorKind::Unexpected);
        let mut huge = Lease {
            resource: "r".to_owned(),
            owner: "o".to_owned(),
            token: u64::MAX,
            expires_at: chrono::Utc::now(),
        };
        assert_eq!(
            signed_token(&huge).unwrap_err().kind(),
            ErrorKind::LeaseLost
        );
        huge.token = 9;
        assert_eq!(signed_token(&huge).unwrap(), 9);
        let e = batch_error(Error::unavailable("down"), 3);
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.is_retryable());
        assert!(e.message().starts_with("batch entry 3: down"), "{e}");
        let lease = Lease {
            resource: "r".to_owned(),
            owner: "o".to_owned(),
            token: 4,
            expires_at: chrono::Utc::now(),
        };
        let e = lease_lost(&lease, "it was released");
        assert_eq!(e.kind(), ErrorKind::LeaseLost);
        assert!(e.message().ends_with("is lost: it was released"), "{e}");
    }
}
