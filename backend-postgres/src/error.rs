//! Mapping of sqlx / PostgreSQL errors to [`outbox_core::Error`], in one place.

use outbox_core::{Error, ErrorKind};

/// Map an sqlx error to the workspace error, keeping it as the source.
///
/// | PostgreSQL / sqlx error | kind | retryable |
/// |---|---|---|
/// | `23505` unique_violation | `AlreadyExists` | no |
/// | `40001` serialization_failure, `40P01` deadlock_detected | `ConditionFailed` | yes |
/// | `08xxx` connection exceptions, `57P01`–`57P03` (admin shutdown, `pg_terminate_backend`, crash, starting up), `53xxx` insufficient resources (too many connections, out of memory, disk full), `55P03` lock_not_available, `57014` query_canceled (statement timeout) | `Unavailable` | yes |
/// | I/O and TLS errors, pool timed out, pool closed, worker crashed | `Unavailable` | yes |
/// | `22xxx` data exceptions (NUL byte, invalid encoding, value out of range), `54xxx` program limits (value or statement too large), `25P02` in_failed_sql_transaction (a statement on a transaction an earlier error aborted) | `InvalidInput` | no |
/// | `42P01` undefined_table, `3F000` invalid_schema_name (schema not migrated), `28xxx` authentication, `3D000` unknown database, `42501` insufficient privilege, a bad connection string | `ConfigInvalid` | no |
/// | anything else | `Unexpected` | no |
pub fn parse_error(err: sqlx::Error) -> Error {
    let (kind, retryable, what) = classify(&err);
    Error::new(kind, what)
        .set_retryable(retryable)
        .with_source(err)
}

/// [`parse_error`] with a message naming what was being done.
pub(crate) fn parse_error_with(err: sqlx::Error, what: impl std::fmt::Display) -> Error {
    let (kind, retryable, generic) = classify(&err);
    Error::new(kind, format!("{what}: {generic}"))
        .set_retryable(retryable)
        .with_source(err)
}

/// The SQLSTATE of a database error.
pub(crate) fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

fn classify(err: &sqlx::Error) -> (ErrorKind, bool, String) {
    use sqlx::Error as E;
    match err {
        E::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            classify_code(&code)
        }
        E::Io(_) | E::Tls(_) => (
            ErrorKind::Unavailable,
            true,
            "the connection to PostgreSQL failed or was lost".to_owned(),
        ),
        E::PoolTimedOut => (
            ErrorKind::Unavailable,
            true,
            "no pooled PostgreSQL connection became free within the acquire timeout".to_owned(),
        ),
        E::PoolClosed => (
            ErrorKind::Unavailable,
            true,
            "the PostgreSQL connection pool is closed".to_owned(),
        ),
        E::WorkerCrashed => (
            ErrorKind::Unavailable,
            true,
            "the PostgreSQL connection's background worker crashed".to_owned(),
        ),
        E::Configuration(_) => (
            ErrorKind::ConfigInvalid,
            false,
            "invalid PostgreSQL connection settings".to_owned(),
        ),
        E::RowNotFound => (ErrorKind::NotFound, false, "no such row".to_owned()),
        E::Encode(_) | E::InvalidArgument(_) => (
            ErrorKind::InvalidInput,
            false,
            "a value cannot be sent to PostgreSQL".to_owned(),
        ),
        _ => (ErrorKind::Unexpected, false, "postgres error".to_owned()),
    }
}

fn classify_code(code: &str) -> (ErrorKind, bool, String) {
    let class = code.get(..2).unwrap_or("");
    let (kind, retryable, what) = match (code, class) {
        ("23505", _) => (
            ErrorKind::AlreadyExists,
            false,
            "a row with the same key already exists",
        ),
        ("40001", _) | ("40P01", _) => (
            ErrorKind::ConditionFailed { index: None },
            true,
            "the transaction conflicted with a concurrent one (serialization failure or \
             deadlock) and was rolled back; retry it",
        ),
        ("57P01", _) | ("57P02", _) | ("57P03", _) | ("57014", _) | ("55P03", _) => (
            ErrorKind::Unavailable,
            true,
            "the PostgreSQL server terminated, cancelled or refused the operation",
        ),
        (_, "08") => (
            ErrorKind::Unavailable,
            true,
            "the connection to PostgreSQL failed",
        ),
        (_, "53") => (
            ErrorKind::Unavailable,
            true,
            "PostgreSQL is out of resources (connections, memory or disk)",
        ),
        (_, "22") => (
            ErrorKind::InvalidInput,
            false,
            "PostgreSQL rejected a value (NUL character, invalid encoding or out of range)",
        ),
        (_, "54") => (
            ErrorKind::InvalidInput,
            false,
            "a value or statement exceeds a PostgreSQL limit",
        ),
        ("42P01", _) | ("3F000", _) => (
            ErrorKind::ConfigInvalid,
            false,
            "the outbox tables do not exist; run PgStore::migrate() first",
        ),
        (_, "28") | ("3D000", _) | ("42501", _) => (
            ErrorKind::ConfigInvalid,
            false,
            "PostgreSQL refused access (authentication, database or privileges)",
        ),
        ("25P02", _) => (
            // A call on a transaction that an earlier failed statement aborted: the
            // `Transaction` contract's refusal (only rollback remains).
            ErrorKind::InvalidInput,
            false,
            "the transaction was aborted by an earlier error and can only be rolled back; \
             nothing of it was written",
        ),
        _ => (ErrorKind::Unexpected, false, "postgres error"),
    };
    (kind, retryable, format!("{what} (SQLSTATE {code})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let k = |c: &str| classify_code(c);
        assert_eq!(k("23505").0, ErrorKind::AlreadyExists);
        assert!(!k("23505").1);
        assert!(k("40001").1 && k("40P01").1);
        for c in ["57P01", "08006", "53300", "57014", "55P03"] {
            assert_eq!(k(c).0, ErrorKind::Unavailable, "{c}");
            assert!(k(c).1, "{c}");
        }
        assert_eq!(k("22021").0, ErrorKind::InvalidInput);
        assert_eq!(k("54000").0, ErrorKind::InvalidInput);
        assert_eq!(k("42P01").0, ErrorKind::ConfigInvalid);
        assert_eq!(k("28P01").0, ErrorKind::ConfigInvalid);
        assert_eq!(k("XX000").0, ErrorKind::Unexpected);
        assert!(k("23505").2.contains("23505"));
    }

    #[test]
    fn client_side_errors() {
        let e = parse_error(sqlx::Error::PoolTimedOut);
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.is_retryable());
        let e = parse_error(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(e.is_retryable());
        assert!(std::error::Error::source(&e).is_some());
        let e = parse_error_with(sqlx::Error::PoolClosed, "adding message x");
        assert!(e.to_string().contains("adding message x"), "{e}");
        assert!(e.is_retryable());
    }
}
