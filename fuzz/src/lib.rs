//! Shared code of the fuzz targets.
//!
//! The `outbox` command is a binary crate, so its parsing modules are compiled in here from
//! its own sources (`#[path]`): the targets fuzz exactly the code the CLI runs.

#![forbid(unsafe_code)]

/// The CLI's error type and duration parsing (`outbox-cli/src/util.rs`).
#[path = "../../outbox-cli/src/util.rs"]
#[allow(dead_code, missing_docs)]
pub mod util;

/// The CLI's store and transport URLs and their redaction (`outbox-cli/src/location.rs`).
#[path = "../../outbox-cli/src/location.rs"]
#[allow(dead_code, missing_docs)]
pub mod location;

/// The relay's flags and `--config` file (`outbox-cli/src/relay/config.rs`).
#[path = "../../outbox-cli/src/relay/config.rs"]
#[allow(dead_code, missing_docs)]
mod relay_config;

/// The relay configuration from the text of a `--config` file, with no flags: defaults, then
/// the file, validated. The error text as the CLI prints it.
pub fn relay_config(text: &str) -> Result<outbox_core::RelayConfig, String> {
    relay_config::relay_config_from_text(text, relay_config::Knobs::default(), "fuzz.toml")
        .map_err(|e| e.to_string())
}

/// A fixed password the URL targets plant in every URL; no output may contain it.
pub const PLANTED_PASSWORD: &str = "Pl4ntedS3cret";

/// Panic when `text` (anything printed about a URL) shows the planted password.
pub fn assert_no_secret(what: &str, text: &str) {
    assert!(
        !text.contains(PLANTED_PASSWORD),
        "{what} echoes the password: {text}"
    );
}

use arbitrary::{Result as ArbResult, Unstructured};
use outbox_core::Message;
use outbox_core::cloudevents::CloudEvents;

/// Either one of `known` (the names and values the codecs look for) or arbitrary text, so
/// the fuzzer reaches the decoders' branches quickly.
pub fn pick_text(u: &mut Unstructured<'_>, known: &[&str]) -> ArbResult<String> {
    if !known.is_empty() && u.ratio(3, 4)? {
        Ok((*u.choose(known)?).to_owned())
    } else {
        u.arbitrary()
    }
}

/// A UUID in one of the forms the id parser may meet: canonical, upper case, simple, or
/// arbitrary text.
pub fn id_text(u: &mut Unstructured<'_>) -> ArbResult<String> {
    let id = uuid::Uuid::from_u128(u.arbitrary()?);
    Ok(match u.int_in_range(0..=4u8)? {
        0 => id.hyphenated().to_string(),
        1 => id.hyphenated().to_string().to_uppercase(),
        2 => id.simple().to_string(),
        3 => uuid::Uuid::now_v7().to_string(),
        _ => u.arbitrary()?,
    })
}

/// A timestamp in microseconds: mostly near now, sometimes at or past the edges chrono can
/// represent.
pub fn micros(u: &mut Unstructured<'_>) -> ArbResult<i64> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => 1_764_000_000_000_000 + i64::from(u.arbitrary::<i32>()?),
        1 => *u.choose(&[i64::MIN, i64::MAX, 0, -1, 8_210_266_876_799_999_999])?,
        _ => u.arbitrary()?,
    })
}

/// An optional CloudEvents configuration with an arbitrary `source`.
pub fn cloud_events(u: &mut Unstructured<'_>) -> ArbResult<Option<CloudEvents>> {
    if u.arbitrary()? {
        let source: String = pick_text(u, &["/billing", "", "urn:x", "\0"])?;
        Ok(CloudEvents::new(source).ok())
    } else {
        Ok(None)
    }
}

/// What the relay does with a message read from a store: encode it for each broker. Stored
/// messages come from any writer (or a corrupted row), so the encoders must return an error,
/// never panic, whatever the message holds.
pub fn publish_encoders(message: &Message, cloud_events: Option<&CloudEvents>) {
    let _ = message.validate();
    let _ = outbox_kafka::headers::encode(message, cloud_events);
    let _ = outbox_rabbitmq::encode_properties(message, cloud_events);
}
