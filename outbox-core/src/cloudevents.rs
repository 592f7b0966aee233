//! CloudEvents 1.0 attributes of a message, for the transports' binary content mode.
//!
//! A transport with CloudEvents enabled sends every message as a CloudEvent in *binary
//! content mode*: the payload is the event's `data`, unchanged, and the attributes travel as
//! headers (Kafka: `ce_<name>` headers plus `content-type`; AMQP: `cloudEvents:<name>`
//! application properties plus the `content-type` property). One definition here, so both
//! transports send the same values:
//!
//! | attribute | value |
//! |---|---|
//! | `id` | the message id (UUID, hyphenated) |
//! | `type` | the message's type name ([`Message::type_name`]), else its topic |
//! | `source` | [`CloudEvents::source`], configured per producer |
//! | `specversion` | [`SPEC_VERSION`] (`1.0`) |
//! | `time` | `created_at`, RFC 3339 UTC with microseconds |
//! | `datacontenttype` | the content type, when set (carried as the protocol's content type) |
//!
//! Our own consumers ignore these headers: every field still travels in the transport's own
//! headers, so a message round-trips unchanged.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::error::{Error, Result};
use crate::message::Message;
use crate::rules::MAX_FIELD_LEN;

/// The CloudEvents specification version sent.
pub const SPEC_VERSION: &str = "1.0";

/// The attribute names sent as headers, in order (`datacontenttype` is carried by the
/// protocol's content type instead).
pub const ATTRIBUTE_NAMES: [&str; 5] = ["id", "type", "source", "specversion", "time"];

/// CloudEvents binary content mode settings of a producer.
///
/// ```
/// use outbox_core::cloudevents::CloudEvents;
/// let ce = CloudEvents::new("/billing-service").unwrap();
/// let m = outbox_core::Message::builder("orders.placed").build().unwrap();
/// let attrs = ce.attributes(&m);
/// assert_eq!(attrs[1], ("type", "orders.placed".to_owned()));
/// assert_eq!(attrs[2], ("source", "/billing-service".to_owned()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CloudEvents {
    source: String,
}

impl CloudEvents {
    /// Send CloudEvents with `source` (a URI-reference naming the producing context, e.g.
    /// `/billing` or `https://example.com/billing`).
    ///
    /// # Errors
    /// `ConfigInvalid` for an empty source, one with whitespace or control characters, or
    /// one over [`MAX_FIELD_LEN`] bytes.
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        if source.is_empty() {
            return Err(Error::config("CloudEvents source must not be empty"));
        }
        if source.len() > MAX_FIELD_LEN {
            return Err(Error::config(format!(
                "CloudEvents source is {} bytes long; the limit is {MAX_FIELD_LEN}",
                source.len()
            )));
        }
        if source.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::config(format!(
                "CloudEvents source {source:?} is not a URI-reference (whitespace or control \
                 characters)"
            )));
        }
        Ok(CloudEvents { source })
    }

    /// The configured `source` attribute.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The attributes of `message` named in [`ATTRIBUTE_NAMES`], in that order, as text.
    pub fn attributes(&self, message: &Message) -> [(&'static str, String); 5] {
        [
            ("id", message.id.to_string()),
            ("type", event_type(message).to_owned()),
            ("source", self.source.clone()),
            ("specversion", SPEC_VERSION.to_owned()),
            ("time", format_time(message.created_at)),
        ]
    }
}

/// The CloudEvents `type` of `message`: its type name, else its topic.
pub fn event_type(message: &Message) -> &str {
    message.type_name().unwrap_or(&message.topic)
}

/// A time as CloudEvents (RFC 3339) text: UTC, microseconds, `Z`.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn attributes_of_a_typed_and_an_untyped_message() {
        let ce = CloudEvents::new("https://example.com/billing").unwrap();
        let t = DateTime::parse_from_rfc3339("2026-12-01T12:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let m = Message::builder("orders")
            .type_name("com.example.order.placed")
            .created_at(t)
            .build()
            .unwrap();
        let a = ce.attributes(&m);
        assert_eq!(
            a.clone().map(|(k, _)| k),
            ATTRIBUTE_NAMES,
            "names in the documented order"
        );
        assert_eq!(a[0].1, m.id.to_string());
        assert_eq!(a[1].1, "com.example.order.placed");
        assert_eq!(a[2].1, "https://example.com/billing");
        assert_eq!(a[3].1, "1.0");
        assert_eq!(a[4].1, "2026-12-01T12:00:00.123456Z");
        let untyped = Message::builder("orders").build().unwrap();
        assert_eq!(ce.attributes(&untyped)[1].1, "orders");
    }

    #[test]
    fn bad_sources_are_config_errors() {
        for bad in ["", "has space", "a\nb", &"s".repeat(MAX_FIELD_LEN + 1)] {
            let e = CloudEvents::new(bad).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::ConfigInvalid, "{bad:?}");
        }
    }
}
