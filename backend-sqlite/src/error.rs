//! Mapping of SQLite errors to [`outbox_core::Error`], in one place.

use outbox_core::{Error, ErrorKind};
use rusqlite::ErrorCode;
use rusqlite::ffi;

/// Map a rusqlite error to the workspace error, keeping it as the source.
///
/// | SQLite error | kind |
/// |---|---|
/// | `SQLITE_CONSTRAINT_UNIQUE`, `SQLITE_CONSTRAINT_PRIMARYKEY` | `AlreadyExists` |
/// | `SQLITE_BUSY`, `SQLITE_LOCKED` (after the busy timeout) | `Unavailable` (retryable) |
/// | `SQLITE_TOOBIG` | `InvalidInput` |
/// | `SQLITE_CANTOPEN`, `SQLITE_NOTADB`, `SQLITE_READONLY`, `SQLITE_PERM` | `ConfigInvalid` |
/// | anything else | `Unexpected` |
pub fn parse_error(err: rusqlite::Error) -> Error {
    let (kind, what) = classify(&err);
    Error::new(kind, what).with_source(err)
}

/// [`parse_error`] with a message naming what was being done (the SQLite error stays the
/// source).
pub(crate) fn parse_error_with(err: rusqlite::Error, what: impl std::fmt::Display) -> Error {
    let (kind, generic) = classify(&err);
    Error::new(kind, format!("{what}: {generic}")).with_source(err)
}

fn classify(err: &rusqlite::Error) -> (ErrorKind, &'static str) {
    match err {
        rusqlite::Error::SqliteFailure(e, _) => match e.code {
            ErrorCode::ConstraintViolation
                if e.extended_code == ffi::SQLITE_CONSTRAINT_UNIQUE
                    || e.extended_code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                (
                    ErrorKind::AlreadyExists,
                    "a row with the same key already exists",
                )
            }
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => (
                ErrorKind::Unavailable,
                "the database is locked by another connection (busy timeout elapsed)",
            ),
            ErrorCode::TooBig => (
                ErrorKind::InvalidInput,
                "a value exceeds SQLite's size limit",
            ),
            ErrorCode::CannotOpen
            | ErrorCode::NotADatabase
            | ErrorCode::ReadOnly
            | ErrorCode::PermissionDenied => (
                ErrorKind::ConfigInvalid,
                "the database file cannot be opened or written",
            ),
            _ => (ErrorKind::Unexpected, "sqlite error"),
        },
        _ => (ErrorKind::Unexpected, "sqlite error"),
    }
}

/// The error for a spawned blocking task that panicked or was cancelled.
pub(crate) fn join_error(err: tokio::task::JoinError) -> Error {
    Error::unexpected("sqlite worker task failed (panicked or was cancelled)").with_source(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)
    }

    #[test]
    fn kinds() {
        let e = parse_error(failure(ffi::SQLITE_CONSTRAINT_UNIQUE));
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert!(!e.is_retryable());
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            parse_error(failure(ffi::SQLITE_CONSTRAINT_PRIMARYKEY)).kind(),
            ErrorKind::AlreadyExists
        );
        assert_eq!(
            parse_error(failure(ffi::SQLITE_CONSTRAINT_CHECK)).kind(),
            ErrorKind::Unexpected
        );
        let busy = parse_error(failure(ffi::SQLITE_BUSY));
        assert_eq!(busy.kind(), ErrorKind::Unavailable);
        assert!(busy.is_retryable());
        assert!(parse_error(failure(ffi::SQLITE_LOCKED)).is_retryable());
        assert_eq!(
            parse_error(failure(ffi::SQLITE_CANTOPEN)).kind(),
            ErrorKind::ConfigInvalid
        );
        assert_eq!(
            parse_error(rusqlite::Error::QueryReturnedNoRows).kind(),
            ErrorKind::Unexpected
        );
    }

    #[test]
    fn context_keeps_kind_and_retryability() {
        let e = parse_error_with(failure(ffi::SQLITE_BUSY), "adding message x");
        assert!(e.is_retryable());
        assert!(e.to_string().contains("adding message x"), "{e}");
    }
}
