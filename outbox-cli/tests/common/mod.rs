//! Helpers of the CLI tests: run the real `outbox` binary, read its output, and find the
//! shared services (skipping with a printed reason, or failing under `OUTBOX_TEST_REQUIRED=1`).

#![allow(dead_code, clippy::unwrap_used)] // each test file uses a part; tests may unwrap

use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};

/// The `outbox` binary with no `OUTBOX_*` location variables inherited.
pub fn cmd() -> assert_cmd::Command {
    let mut c = assert_cmd::Command::new(env!("CARGO_BIN_EXE_outbox"));
    c.env_remove("OUTBOX_STORE")
        .env_remove("OUTBOX_TRANSPORT")
        .env_remove("OUTBOX_METRICS_ADDR")
        .env("AWS_ACCESS_KEY_ID", "local")
        .env("AWS_SECRET_ACCESS_KEY", "local")
        .env("AWS_REGION", "us-east-1");
    c
}

/// Run `outbox ARGS...`.
pub fn outbox(args: &[&str]) -> Output {
    cmd().args(args).output().expect("run the outbox binary")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code 0 and no panic.
pub fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "expected success, got {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
    assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
}

/// Bad input: non-zero exit, a message naming the problem, and no panic.
pub fn assert_rejected(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure\nstdout:\n{}\nstderr:\n{err}",
        stdout(o)
    );
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}:\n{err}");
    }
}

/// The JSON document on stdout.
pub fn json(o: &Output) -> serde_json::Value {
    assert_ok(o);
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", stdout(o)))
}

/// A name no other test or run uses (letters, digits and `_`).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The value of a service variable, or `None` after printing why the test is skipped
/// (a panic instead when `OUTBOX_TEST_REQUIRED=1`).
pub fn service(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var("OUTBOX_TEST_REQUIRED").is_ok_and(|v| v == "1") => {
            panic!("{test}: {var} not set and OUTBOX_TEST_REQUIRED=1")
        }
        _ => {
            eprintln!("skipping {test}: {var} not set (source the services env file)");
            None
        }
    }
}
