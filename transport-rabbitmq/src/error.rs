//! The one place where RabbitMQ / lapin failures become [`outbox_core::Error`]s.

use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use outbox_core::{Error, ErrorKind};

/// Every way a RabbitMQ operation can fail, as reported by lapin or the broker.
#[derive(Debug)]
pub(crate) enum Failure {
    /// An error from lapin: I/O, channel or connection state, or a broker protocol error
    /// (channel or connection closed by the broker with a reply code).
    Lapin(lapin::Error),
    /// The broker returned a `mandatory` message (`basic.return`): no queue is bound for it.
    Returned {
        /// AMQP reply code, 312 NO_ROUTE for an unroutable message.
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// The broker negatively confirmed a publish (`basic.nack`): an internal error or a
    /// queue refusing new messages (`x-overflow: reject-publish`).
    Nacked,
    /// No answer within the configured time.
    Timeout(Duration),
    /// The channel was not in confirm mode, so the broker did not confirm the publish.
    NotConfirmed,
    /// The channel went away before the broker confirmed the publish.
    Unconfirmed,
}

impl From<lapin::Error> for Failure {
    fn from(e: lapin::Error) -> Self {
        Failure::Lapin(e)
    }
}

/// Map a failure to an error kind and retryability. `context` says what was being done
/// (`"publish to exchange \"orders\" with routing key \"x\""`).
///
/// - retryable [`ErrorKind::Unavailable`]: I/O errors (refused, reset), missed heartbeats,
///   a channel or connection that is closed or not ready, `CONNECTION_FORCED` (an operator or
///   a broker restart closed the connection), `RESOURCE_LOCKED`, `RESOURCE_ERROR`,
///   `INTERNAL_ERROR`, `CHANNEL_ERROR`, a negative confirm, a timeout;
/// - permanent [`ErrorKind::NotFound`]: a returned (unroutable) message, an exchange or queue
///   that does not exist (`NOT_FOUND`);
/// - permanent [`ErrorKind::PayloadTooLarge`]: `CONTENT_TOO_LARGE`, or `PRECONDITION_FAILED`
///   for a message over the broker's `max_message_size`;
/// - permanent [`ErrorKind::ConfigInvalid`]: `ACCESS_REFUSED`, `NOT_ALLOWED` (vhost),
///   `INVALID_PATH`, other `PRECONDITION_FAILED` (a queue or exchange redeclared with other
///   arguments), authentication and protocol-version failures;
/// - permanent [`ErrorKind::Unexpected`]: protocol violations (frame, syntax, command) and
///   client bugs.
pub(crate) fn parse_error(failure: Failure, context: &str) -> Error {
    match failure {
        Failure::Returned { code, text } => Error::new(
            ErrorKind::NotFound,
            format!(
                "{context}: unroutable, the broker returned the mandatory message \
                 ({code} {text}); no queue is bound for this routing key"
            ),
        ),
        Failure::Nacked => Error::unavailable(format!(
            "{context}: the broker nacked the message (internal error or a queue refusing \
             new messages); it was not stored"
        )),
        Failure::NotConfirmed => Error::unavailable(format!(
            "{context}: the channel was not in confirm mode; the publish is unconfirmed"
        )),
        Failure::Unconfirmed => Error::unavailable(format!(
            "{context}: the channel closed before the broker confirmed the publish; it may \
             or may not have been stored"
        )),
        Failure::Timeout(d) => Error::unavailable(format!(
            "{context}: no answer from the broker within {} ms",
            d.as_millis()
        )),
        Failure::Lapin(e) => {
            let (kind, retryable) = classify_lapin(&e);
            let message = context.to_owned();
            let error = match kind {
                ErrorKind::PayloadTooLarge { .. } => {
                    let (size, limit) = match &e.kind() {
                        lapin::ErrorKind::ProtocolError(p) => sizes(p.get_message().as_str()),
                        _ => (0, 0),
                    };
                    Error::new(ErrorKind::PayloadTooLarge { size, limit }, message)
                }
                kind => Error::new(kind, message),
            };
            error.set_retryable(retryable).with_source(e)
        }
    }
}

fn classify_lapin(e: &lapin::Error) -> (ErrorKind, bool) {
    use lapin::ErrorKind as L;
    match e.kind() {
        L::IOError(_)
        | L::MissingHeartbeatError
        | L::InvalidChannel(_)
        | L::InvalidChannelState(..)
        | L::InvalidConnectionState(_)
        | L::ChannelsLimitReached
        | L::RuntimeShutdownError(_) => (ErrorKind::Unavailable, true),
        L::ProtocolError(p) => match p.kind() {
            AMQPErrorKind::Soft(soft) => match soft {
                AMQPSoftError::NOROUTE | AMQPSoftError::NOTFOUND => (ErrorKind::NotFound, false),
                AMQPSoftError::CONTENTTOOLARGE => too_large(),
                AMQPSoftError::ACCESSREFUSED => (ErrorKind::ConfigInvalid, false),
                AMQPSoftError::PRECONDITIONFAILED => {
                    let text = p.get_message().as_str();
                    if text.contains("max size") || text.contains("larger than") {
                        too_large()
                    } else {
                        (ErrorKind::ConfigInvalid, false)
                    }
                }
                AMQPSoftError::RESOURCELOCKED | AMQPSoftError::NOCONSUMERS => {
                    (ErrorKind::Unavailable, true)
                }
            },
            AMQPErrorKind::Hard(hard) => match hard {
                AMQPHardError::CONNECTIONFORCED
                | AMQPHardError::CHANNELERROR
                | AMQPHardError::RESOURCEERROR
                | AMQPHardError::INTERNALERROR => (ErrorKind::Unavailable, true),
                AMQPHardError::NOTALLOWED | AMQPHardError::INVALIDPATH => {
                    (ErrorKind::ConfigInvalid, false)
                }
                AMQPHardError::FRAMEERROR
                | AMQPHardError::SYNTAXERROR
                | AMQPHardError::COMMANDINVALID
                | AMQPHardError::UNEXPECTEDFRAME
                | AMQPHardError::NOTIMPLEMENTED => (ErrorKind::Unexpected, false),
            },
        },
        L::AuthProviderError(_) | L::InvalidProtocolVersion(_) => (ErrorKind::ConfigInvalid, false),
        // Non-exhaustive: parsing, serialisation, runtime and future misuse are client bugs.
        _ => (ErrorKind::Unexpected, false),
    }
}

fn too_large() -> (ErrorKind, bool) {
    (ErrorKind::PayloadTooLarge { size: 0, limit: 0 }, false)
}

/// The two sizes of RabbitMQ's "message size 200 is larger than configured max size 100".
fn sizes(text: &str) -> (usize, usize) {
    let numbers: Vec<usize> = text
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    match numbers.as_slice() {
        [.., size, limit] => (*size, *limit),
        _ => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::AMQPError;

    fn protocol(kind: AMQPErrorKind, text: &str) -> Failure {
        Failure::Lapin(lapin::ErrorKind::ProtocolError(AMQPError::new(kind, text.into())).into())
    }

    #[test]
    fn classification() {
        let io = Failure::Lapin(
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused").into(),
        );
        let e = parse_error(io, "connect");
        assert_eq!((e.kind(), e.is_retryable()), (ErrorKind::Unavailable, true));

        let forced = protocol(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "CONNECTION_FORCED - test",
        );
        assert!(parse_error(forced, "publish").is_retryable());

        let e = parse_error(
            Failure::Returned {
                code: 312,
                text: "NO_ROUTE".into(),
            },
            "publish",
        );
        assert_eq!((e.kind(), e.is_retryable()), (ErrorKind::NotFound, false));

        let e = parse_error(
            protocol(
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
                "PRECONDITION_FAILED - message size 200 is larger than configured max size 100",
            ),
            "publish",
        );
        assert_eq!(
            e.kind(),
            ErrorKind::PayloadTooLarge {
                size: 200,
                limit: 100
            }
        );
        assert!(!e.is_retryable());

        let e = parse_error(
            protocol(
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
                "ACCESS_REFUSED",
            ),
            "publish",
        );
        assert_eq!(
            (e.kind(), e.is_retryable()),
            (ErrorKind::ConfigInvalid, false)
        );
        assert!(parse_error(Failure::Nacked, "publish").is_retryable());
        assert!(parse_error(Failure::Timeout(Duration::from_secs(1)), "publish").is_retryable());
    }
}
