//! W3C trace context: the [`TraceContext`] a message carries, and its exchange with
//! `tracing` spans (the `opentelemetry` feature). A leaf: it imports no other module of this
//! crate.
//!
//! Without the feature, nothing is captured and nothing is restored: the trace context is
//! whatever the application sets on the builder.
//!
//! With it, [`Message::builder`](crate::Message::builder) captures the OpenTelemetry context
//! of the current `tracing` span (through `tracing-opentelemetry`) as `traceparent` and
//! `tracestate`, and [`InboxProcessor`](crate::InboxProcessor) makes its handling span a
//! child of the context a delivery carries.

use serde::{Deserialize, Serialize};

/// W3C trace context carried with a message and restored on the consumer side.
///
/// Transports carry these as the headers `traceparent`, `tracestate` and `baggage`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct TraceContext {
    /// `traceparent`, e.g. `00-<trace-id>-<span-id>-01`.
    pub traceparent: Option<String>,
    /// `tracestate`, vendor-specific data.
    pub tracestate: Option<String>,
    /// `baggage`, application key-value pairs.
    pub baggage: Option<String>,
}

impl TraceContext {
    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        self.traceparent.is_none() && self.tracestate.is_none() && self.baggage.is_none()
    }
}

/// The trace context of the current `tracing` span, when it belongs to a sampled or
/// unsampled but valid OpenTelemetry trace; empty otherwise (and always without the feature).
#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn current_trace_context() -> TraceContext {
    TraceContext::default()
}

/// Make `span` a child of the context `trace` carries (no-op without the feature).
#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn set_parent(_span: &tracing::Span, _trace: &TraceContext) {}

#[cfg(feature = "opentelemetry")]
pub(crate) use imp::{current_trace_context, set_parent};

#[cfg(feature = "opentelemetry")]
mod imp {
    use std::str::FromStr;

    use opentelemetry::Context;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceContext;

    /// The W3C `traceparent` version this crate writes.
    const VERSION: &str = "00";

    pub(crate) fn current_trace_context() -> TraceContext {
        let span = tracing::Span::current();
        if span.is_disabled() {
            return TraceContext::default();
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            return TraceContext::default();
        }
        let state = sc.trace_state().header();
        TraceContext {
            traceparent: Some(format_traceparent(&sc)),
            tracestate: (!state.is_empty()).then_some(state),
            baggage: None,
        }
    }

    pub(crate) fn set_parent(span: &tracing::Span, trace: &TraceContext) {
        if let Some(sc) = trace
            .traceparent
            .as_deref()
            .and_then(|tp| parse_traceparent(tp, trace.tracestate.as_deref().unwrap_or_default()))
        {
            let cx = Context::new().with_remote_span_context(sc);
            if let Err(e) = span.set_parent(cx) {
                tracing::debug!(error = %e, "cannot set the parent of the handling span");
            }
        }
    }

    pub(super) fn format_traceparent(sc: &SpanContext) -> String {
        format!(
            "{VERSION}-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    }

    /// Parse a W3C `traceparent` (and `tracestate`) into a remote span context; `None` for a
    /// malformed value, the invalid version `ff`, or all-zero ids (the W3C rules: later
    /// versions may append fields, which are ignored).
    pub(super) fn parse_traceparent(traceparent: &str, tracestate: &str) -> Option<SpanContext> {
        let mut parts = traceparent.trim().split('-');
        let version = parts.next()?;
        let (trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?);
        let is_hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_hex(version, 2)
            || version.eq_ignore_ascii_case("ff")
            || (version == VERSION && parts.next().is_some())
            || !is_hex(trace_id, 32)
            || !is_hex(span_id, 16)
            || !is_hex(flags, 2)
        {
            return None;
        }
        let trace_id = TraceId::from_hex(trace_id).ok()?;
        let span_id = SpanId::from_hex(span_id).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        let state = TraceState::from_str(tracestate).unwrap_or_default();
        let sc = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state);
        sc.is_valid().then_some(sc)
    }
}

#[cfg(all(test, feature = "opentelemetry"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::imp::{format_traceparent, parse_traceparent};

    #[test]
    fn traceparent_round_trip_and_rejects() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(tp, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE").unwrap();
        assert_eq!(format_traceparent(&sc), tp);
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_state().header(),
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad, "").is_none(), "{bad}");
        }
        // A later version may append fields.
        assert!(
            parse_traceparent(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                ""
            )
            .is_some()
        );
    }
}
