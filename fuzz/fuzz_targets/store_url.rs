//! Store and transport URLs as `--store` / `--transport` / `OUTBOX_*` take them, the AMQP URL
//! of outbox-rabbitmq and the PostgreSQL URL redaction: any text parses or gives an error,
//! never a panic, and a password planted in the URL never shows in a Display or Debug of the
//! result or the error.

#![no_main]

use libfuzzer_sys::fuzz_target;
use outbox_fuzz::location::{StoreLocation, TransportLocation, scrub};
use outbox_fuzz::{PLANTED_PASSWORD, assert_no_secret};

const SCHEMES: &[&str] = &[
    "postgres",
    "postgresql",
    "amqp",
    "amqps",
    // Not `sqlite`: what follows `sqlite://` is a file path, shown as it is (a path
    // `user:pw@` is a file name, not a credential).
    "dynamodb",
    "kafka",
    "POSTGRES",
    "http",
    "",
];

fn check(url: &str, planted: bool) {
    let guard = |what: &str, text: String| {
        if planted {
            assert_no_secret(what, &text);
        }
    };
    match StoreLocation::parse(url) {
        Ok(l) => {
            guard("StoreLocation Display", l.to_string());
            guard("StoreLocation Debug", format!("{l:?}"));
        }
        Err(e) => {
            guard("store URL error", e.to_string());
            guard("store URL error Debug", format!("{e:?}"));
        }
    }
    match TransportLocation::parse(url) {
        Ok(l) => {
            guard("TransportLocation Display", l.to_string());
            guard("TransportLocation Debug", format!("{l:?}"));
        }
        Err(e) => {
            guard("transport URL error", e.to_string());
            guard("transport URL error Debug", format!("{e:?}"));
        }
    }
    match outbox_rabbitmq::AmqpUrl::parse(url) {
        Ok(u) => {
            guard("AmqpUrl Display", u.to_string());
            guard("AmqpUrl Debug", format!("{u:?}"));
            guard("AmqpUrl::redacted", u.redacted());
        }
        Err(e) => {
            guard("AmqpUrl error", e.to_string());
            guard("AmqpUrl error Debug", format!("{e:?}"));
        }
    }
    guard("redact_url", outbox_postgres::redact_url(url));
    guard("scrub", scrub(url));
}

fuzz_target!(|input: (u8, &str)| {
    let (scheme, rest) = input;
    check(rest, false);
    if !rest.contains(PLANTED_PASSWORD) {
        let scheme = SCHEMES[usize::from(scheme) % SCHEMES.len()];
        check(&format!("{scheme}://user:{PLANTED_PASSWORD}@{rest}"), true);
    }
});
