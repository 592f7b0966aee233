//! [`parse_error`]: the one place where rdkafka errors become `outbox_core` errors.

use outbox_core::{Error, ErrorKind};
use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};

/// Map an rdkafka error to an [`outbox_core::Error`] with its kind and retryability.
///
/// `context` says what was being done (it starts the error text); `size` is
/// `(record bytes, limit)` of the record being produced, reported in
/// [`ErrorKind::PayloadTooLarge`].
///
/// | librdkafka / broker error | kind | retryable |
/// |---|---|---|
/// | message too large (`MSG_SIZE_TOO_LARGE`, `MESSAGE_BATCH_TOO_LARGE`) | `PayloadTooLarge` | no |
/// | unknown topic or partition (auto-creation off) | `NotFound` | no |
/// | invalid message, record, topic or argument | `InvalidInput` | no |
/// | invalid configuration, failed authentication or authorization | `ConfigInvalid` | no |
/// | unsupported feature or version | `Unsupported` | no |
/// | queue full, timeouts, broker down, transport, leader/coordinator moves, rebalance | `Unavailable` | yes |
/// | client dropped | `Unavailable` | yes |
/// | anything else (fatal idempotence state, unknown codes) | `Unexpected` | yes |
///
/// Unknown and fatal errors are retryable on purpose: a relay parks a message on a permanent
/// error, and a message must never be parked for a reason that is not about the message.
pub fn parse_error(error: KafkaError, context: &str, size: Option<(usize, usize)>) -> Error {
    let text = format!("{context}: {error}");
    let kind_of = |code: Code| -> (ErrorKind, bool) {
        match code {
            Code::MessageSizeTooLarge | Code::MessageBatchTooLarge => {
                let (size, limit) = size.unwrap_or((0, 0));
                (ErrorKind::PayloadTooLarge { size, limit }, false)
            }
            Code::UnknownTopicOrPartition
            | Code::UnknownTopic
            | Code::UnknownPartition
            | Code::UnknownTopicId => (ErrorKind::NotFound, false),
            Code::InvalidMessage
            | Code::InvalidRecord
            | Code::InvalidTopic
            | Code::InvalidArgument
            | Code::InvalidMessageSize
            | Code::InvalidTimestamp
            | Code::BadMessage => (ErrorKind::InvalidInput, false),
            Code::InvalidConfig
            | Code::InvalidRequiredAcks
            | Code::Authentication
            | Code::SaslAuthenticationFailed
            | Code::TopicAuthorizationFailed
            | Code::ClusterAuthorizationFailed
            | Code::GroupAuthorizationFailed
            | Code::TransactionalIdAuthorizationFailed
            | Code::IllegalSASLState
            | Code::UnsupportedSASLMechanism
            | Code::SSL
            | Code::UnacceptableCredential
            | Code::InvalidSessionTimeout
            | Code::InvalidGroupId => (ErrorKind::ConfigInvalid, false),
            Code::UnsupportedFeature | Code::UnsupportedVersion => (ErrorKind::Unsupported, false),
            Code::QueueFull
            | Code::MessageTimedOut
            | Code::OperationTimedOut
            | Code::RequestTimedOut
            | Code::TimedOutQueue
            | Code::AllBrokersDown
            | Code::BrokerTransportFailure
            | Code::BrokerNotAvailable
            | Code::NetworkException
            | Code::Resolve
            | Code::ReplicaNotAvailable
            | Code::LeaderNotAvailable
            | Code::NotLeaderForPartition
            | Code::PreferredLeaderNotAvailable
            | Code::NotEnoughReplicas
            | Code::NotEnoughReplicasAfterAppend
            | Code::CoordinatorNotAvailable
            | Code::CoordinatorLoadInProgress
            | Code::NotCoordinator
            | Code::RebalanceInProgress
            | Code::IllegalGeneration
            | Code::UnknownMemberId
            | Code::WaitingForCoordinator
            | Code::KafkaStorageError
            | Code::BrokerDestroy
            | Code::DestroyBroker
            | Code::FencedLeaderEpoch
            | Code::UnknownLeaderEpoch
            | Code::OffsetNotAvailable
            | Code::Retry
            | Code::NoOffset
            | Code::ThrottlingQuotaExceeded
            | Code::AssignmentLost => (ErrorKind::Unavailable, true),
            _ => (ErrorKind::Unexpected, true),
        }
    };
    let (kind, retryable) = match &error {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => {
            (ErrorKind::ConfigInvalid, false)
        }
        KafkaError::Canceled | KafkaError::NoMessageReceived => (ErrorKind::Unavailable, true),
        KafkaError::Nul(_) => (ErrorKind::InvalidInput, false),
        other => match other.rdkafka_error_code() {
            Some(code) => kind_of(code),
            None => (ErrorKind::Unexpected, true),
        },
    };
    Error::new(kind, text)
        .set_retryable(retryable)
        .with_source(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let e = parse_error(
            KafkaError::MessageProduction(Code::MessageSizeTooLarge),
            "send",
            Some((10, 5)),
        );
        assert_eq!(e.kind(), ErrorKind::PayloadTooLarge { size: 10, limit: 5 });
        assert!(!e.is_retryable());
        for code in [Code::QueueFull, Code::MessageTimedOut, Code::AllBrokersDown] {
            let e = parse_error(KafkaError::MessageProduction(code), "send", None);
            assert_eq!(e.kind(), ErrorKind::Unavailable);
            assert!(e.is_retryable());
        }
        let e = parse_error(
            KafkaError::MessageProduction(Code::UnknownTopicOrPartition),
            "send",
            None,
        );
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(!e.is_retryable());
        assert!(
            e.to_string().starts_with("not_found (permanent): send"),
            "{e}"
        );
        let e = parse_error(KafkaError::ClientCreation("bad".into()), "build", None);
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
    }
}
