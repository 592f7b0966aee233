//! Mapping of DynamoDB errors to [`outbox_core::Error`], in one place.

use std::fmt;

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::CancellationReason;
use outbox_core::{Error, ErrorKind};

/// Map an SDK error to the workspace error, keeping the SDK error as the source.
///
/// | DynamoDB error | kind | retryable |
/// |---|---|---|
/// | `ConditionalCheckFailedException` | `ConditionFailed { index: None }` | no |
/// | `ProvisionedThroughputExceededException`, `ThrottlingException`, `RequestLimitExceeded`, `TransactionConflictException`, `InternalServerError`, `ServiceUnavailable`, `LimitExceededException` | `Unavailable` | yes |
/// | `TransactionInProgressException` (the same `ClientRequestToken` is still being applied: the request **may still land**; the unit of work resends the identical request, which applies at most once) | `Unavailable` | yes |
/// | timeouts, connection failures, unreadable responses, HTTP 5xx without an error code | `Unavailable` | yes |
/// | `ResourceNotFoundException` (a missing table) | `ConfigInvalid` | no |
/// | `ValidationException`, `SerializationException` | `InvalidInput` | no |
/// | `ItemCollectionSizeLimitExceededException` | `LimitExceeded` | no |
/// | `IdempotentParameterMismatchException` (a `ClientRequestToken` reused with a different request within 10 minutes; the unit of work first checks whether its own request landed) | `InvalidInput` | no |
/// | credentials / signing (`UnrecognizedClientException`, `AccessDeniedException`, ...) | `ConfigInvalid` | no |
/// | anything else | `Unexpected` | no |
///
/// `TransactionCanceledException` is mapped entry by entry by the unit of work (see
/// [`DynamoDbTx`](crate::DynamoDbTx)); here it becomes `Unexpected` with the
/// reasons in the message.
pub fn parse_error<E>(err: SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (kind, retryable, what) = match &err {
        SdkError::TimeoutError(_) => (ErrorKind::Unavailable, true, "request timed out".into()),
        SdkError::DispatchFailure(_) => (
            ErrorKind::Unavailable,
            true,
            "could not reach DynamoDB".into(),
        ),
        SdkError::ResponseError(_) => (
            ErrorKind::Unavailable,
            true,
            "unreadable response from DynamoDB".into(),
        ),
        SdkError::ConstructionFailure(_) => (
            ErrorKind::InvalidInput,
            false,
            "the request could not be built".into(),
        ),
        SdkError::ServiceError(s)
            if s.err().code().is_none() && s.raw().status().is_server_error() =>
        {
            (
                ErrorKind::Unavailable,
                true,
                format!("DynamoDB answered HTTP {}", s.raw().status().as_u16()),
            )
        }
        SdkError::ServiceError(s) => classify_code(s.err().code(), s.err().message()),
        _ => (ErrorKind::Unexpected, false, "DynamoDB error".into()),
    };
    let what = format!(
        "{what}: {}",
        aws_sdk_dynamodb::error::DisplayErrorContext(&err)
    );
    Error::new(kind, what)
        .set_retryable(retryable)
        .with_source(err)
}

/// Kind, retryability and a description for a DynamoDB error code.
pub(crate) fn classify_code(
    code: Option<&str>,
    message: Option<&str>,
) -> (ErrorKind, bool, String) {
    let code_s = code.unwrap_or("unknown");
    let describe = |what: &str| match message {
        Some(m) => format!("{what} ({code_s}: {m})"),
        None => format!("{what} ({code_s})"),
    };
    match code_s {
        "ConditionalCheckFailedException" | "ConditionalCheckFailed" => (
            ErrorKind::ConditionFailed { index: None },
            false,
            describe("condition failed"),
        ),
        "ProvisionedThroughputExceededException"
        | "ProvisionedThroughputExceeded"
        | "ThrottlingException"
        | "ThrottlingError"
        | "RequestLimitExceeded"
        | "TransactionConflictException"
        | "TransactionConflict"
        | "InternalServerError"
        | "ServiceUnavailable"
        | "LimitExceededException" => (
            ErrorKind::Unavailable,
            true,
            describe("DynamoDB is throttling, busy or conflicting; retry"),
        ),
        "TransactionInProgressException" => (
            ErrorKind::Unavailable,
            true,
            describe(
                "a transaction with this ClientRequestToken is still in progress and may still be applied; resend the identical request (same token), which DynamoDB applies at most once",
            ),
        ),
        "IdempotentParameterMismatchException" => (
            ErrorKind::InvalidInput,
            false,
            describe(
                "this ClientRequestToken was used in the last 10 minutes for a different request; use a new token for a different unit of work",
            ),
        ),
        "ResourceNotFoundException" => (
            ErrorKind::ConfigInvalid,
            false,
            describe("table or index not found; create the tables (DynamoDbStore::migrate)"),
        ),
        "ValidationException" | "ValidationError" | "SerializationException" => (
            ErrorKind::InvalidInput,
            false,
            describe("DynamoDB rejected the request"),
        ),
        "ItemCollectionSizeLimitExceededException" | "ItemCollectionSizeLimitExceeded" => (
            ErrorKind::LimitExceeded {
                count: 10 * 1024 * 1024,
                limit: 10 * 1024 * 1024,
            },
            false,
            describe("item collection size limit (10 GB) exceeded"),
        ),
        "UnrecognizedClientException"
        | "AccessDeniedException"
        | "InvalidSignatureException"
        | "MissingAuthenticationTokenException"
        | "ExpiredTokenException" => (
            ErrorKind::ConfigInvalid,
            false,
            describe("DynamoDB rejected the credentials"),
        ),
        _ => (ErrorKind::Unexpected, false, describe("DynamoDB error")),
    }
}

/// The cancellation reasons of a `TransactionCanceledException`, one per transaction entry,
/// formatted for error messages (`[0] None; [1] ConditionalCheckFailed: ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancellationReasons(pub Vec<(Option<String>, Option<String>)>);

impl CancellationReasons {
    pub(crate) fn from_sdk(reasons: &[CancellationReason]) -> Self {
        CancellationReasons(
            reasons
                .iter()
                .map(|r| (r.code().map(str::to_owned), r.message().map(str::to_owned)))
                .collect(),
        )
    }

    /// The code of entry `i` (`None` for "None" or missing).
    pub fn code(&self, i: usize) -> Option<&str> {
        self.0
            .get(i)
            .and_then(|(c, _)| c.as_deref())
            .filter(|c| *c != "None")
    }
}

impl fmt::Display for CancellationReasons {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (code, msg)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "[{i}] {}", code.as_deref().unwrap_or("None"))?;
            if let Some(m) = msg {
                write!(f, ": {m}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for CancellationReasons {}
