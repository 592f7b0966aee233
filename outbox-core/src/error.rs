//! The one error type of the workspace.
//!
//! Every backend and transport maps its native errors to an [`ErrorKind`] in a single
//! `parse_error`-style function, and marks each error *temporary* (worth retrying) or
//! *permanent*. Callers branch on [`Error::kind`] and [`Error::is_retryable`], never on messages.

use std::fmt;

/// What went wrong, independent of the backend that reported it.
///
/// Some kinds carry the figures a caller needs to act on them (sizes, limits, the index of the
/// failing entry in a batch or transaction).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The addressed message, lease or entry does not exist.
    NotFound,
    /// A message (or inbox entry) with the same identity already exists; nothing was written.
    AlreadyExists,
    /// A condition attached to a write did not hold (optimistic concurrency, a caller's own
    /// condition inside a unit of work). `index` names the failing entry when known.
    ConditionFailed {
        /// Position of the failing entry in the transaction or batch, if the backend reports it.
        index: Option<usize>,
    },
    /// The caller no longer holds the lease it acted on (expired, released or taken over).
    LeaseLost,
    /// A message is larger than the backend (or broker) accepts. Nothing was truncated or written.
    PayloadTooLarge {
        /// Size of the rejected message in bytes, as the backend measures it.
        size: usize,
        /// The backend's limit in bytes.
        limit: usize,
    },
    /// A request exceeded a count limit of the backend (for example DynamoDB's 100 actions per
    /// transaction). Nothing was written.
    LimitExceeded {
        /// The count the request had.
        count: usize,
        /// The backend's limit.
        limit: usize,
    },
    /// The backend or transport does not support this operation.
    Unsupported,
    /// The caller passed an invalid argument (empty topic, bad identifier, ...).
    InvalidInput,
    /// The configuration is invalid (bad table name, shard count 0, ...).
    ConfigInvalid,
    /// A payload could not be encoded or decoded as the requested type: wrong content type,
    /// malformed body, unknown message type. Permanent: the same bytes never decode.
    Decode,
    /// The backend or broker is unreachable, overloaded, throttling or timed out.
    Unavailable,
    /// Anything else. Usually a bug or an unexpected state of the backend.
    Unexpected,
}

impl ErrorKind {
    /// Whether errors of this kind are temporary by default.
    pub fn default_retryable(self) -> bool {
        matches!(self, ErrorKind::Unavailable)
    }

    /// A short, stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::ConditionFailed { .. } => "condition_failed",
            ErrorKind::LeaseLost => "lease_lost",
            ErrorKind::PayloadTooLarge { .. } => "payload_too_large",
            ErrorKind::LimitExceeded { .. } => "limit_exceeded",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::ConfigInvalid => "config_invalid",
            ErrorKind::Decode => "decode",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Unexpected => "unexpected",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::PayloadTooLarge { size, limit } => {
                write!(f, "payload too large ({size} bytes, limit {limit})")
            }
            ErrorKind::LimitExceeded { count, limit } => {
                write!(f, "limit exceeded ({count}, limit {limit})")
            }
            ErrorKind::ConditionFailed { index: Some(i) } => {
                write!(f, "condition failed (entry {i})")
            }
            other => f.write_str(other.as_str()),
        }
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error of every fallible operation in the workspace.
///
/// ```
/// use outbox_core::{Error, ErrorKind};
/// let e = Error::new(ErrorKind::Unavailable, "broker down");
/// assert!(e.is_retryable());
/// assert_eq!(e.kind(), ErrorKind::Unavailable);
/// ```
pub struct Error {
    kind: ErrorKind,
    message: String,
    retryable: bool,
    source: Option<Source>,
}

/// Shorthand for `Result<T, outbox_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind`; temporary or permanent by the kind's default.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            retryable: kind.default_retryable(),
            source: None,
        }
    }

    /// Attach the underlying (native) error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Mark the error temporary (worth retrying) or permanent, overriding the kind's default.
    pub fn set_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Shorthand for [`ErrorKind::InvalidInput`].
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    /// Shorthand for [`ErrorKind::ConfigInvalid`].
    pub fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::ConfigInvalid, message)
    }

    /// Shorthand for a temporary [`ErrorKind::Unavailable`].
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unavailable, message)
    }

    /// Shorthand for [`ErrorKind::Unexpected`].
    pub fn unexpected(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unexpected, message)
    }

    /// Shorthand for [`ErrorKind::PayloadTooLarge`].
    pub fn payload_too_large(size: usize, limit: usize) -> Self {
        Error::new(
            ErrorKind::PayloadTooLarge { size, limit },
            format!("message of {size} bytes exceeds the limit of {limit} bytes"),
        )
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The human-readable description, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind)
            .field("message", &self.message)
            .field("retryable", &self.retryable);
        if let Some(s) = &self.source {
            d.field("source", &format_args!("{s}"));
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.kind,
            if self.retryable {
                "temporary"
            } else {
                "permanent"
            },
            self.message
        )?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_default_retryability() {
        assert!(Error::unavailable("x").is_retryable());
        assert!(!Error::new(ErrorKind::AlreadyExists, "x").is_retryable());
        assert!(
            Error::new(ErrorKind::ConditionFailed { index: None }, "conflict")
                .set_retryable(true)
                .is_retryable()
        );
    }

    #[test]
    fn display_names_kind_status_and_figures() {
        let e = Error::payload_too_large(500_000, 400_000);
        let s = e.to_string();
        assert!(
            s.contains("500000") && s.contains("400000") && s.contains("permanent"),
            "{s}"
        );
        assert_eq!(
            e.kind(),
            ErrorKind::PayloadTooLarge {
                size: 500_000,
                limit: 400_000
            }
        );
    }
}
