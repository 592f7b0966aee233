//! End-to-end tests of `outbox demo`: the embedded order and billing services survive a
//! relay crash and broker duplicates.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use common::{assert_ok, assert_rejected, outbox, stdout};

/// The value of a summary row such as `  lost          0   note`.
fn summary_value(out: &str, label: &str) -> Option<String> {
    out.lines().find_map(|l| {
        let rest = l.trim_start().strip_prefix(label)?;
        rest.starts_with("  ")
            .then(|| rest.split_whitespace().next().map(str::to_owned))
            .flatten()
    })
}

#[test]
fn demo_loses_nothing_and_applies_nothing_twice() {
    let o = outbox(&["demo", "--orders", "300", "--quiet"]);
    assert_ok(&o);
    let out = stdout(&o);
    assert_eq!(summary_value(&out, "lost").as_deref(), Some("0"), "{out}");
    assert_eq!(
        summary_value(&out, "duplicate effects").as_deref(),
        Some("0"),
        "{out}"
    );
    assert_eq!(
        summary_value(&out, "order violations").as_deref(),
        Some("0"),
        "{out}"
    );
    assert_eq!(
        summary_value(&out, "orders written").as_deref(),
        Some("300"),
        "{out}"
    );
    assert_eq!(
        summary_value(&out, "messages stored").as_deref(),
        Some("600"),
        "{out}"
    );
    assert_eq!(
        summary_value(&out, "handled").as_deref(),
        Some("600"),
        "{out}"
    );
    assert_eq!(
        summary_value(&out, "outbox pending").as_deref(),
        Some("0"),
        "{out}"
    );
    assert_eq!(
        summary_value(&out, "relay restarts").as_deref(),
        Some("1"),
        "{out}"
    );
    let dups: u64 = summary_value(&out, "duplicates suppressed")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        dups >= 600 / 50,
        "the broker's duplicates must reach the inbox:\n{out}"
    );
    assert!(out.contains("relay 1 killed"), "{out}");
    assert!(out.contains("result: OK"), "{out}");
}

#[test]
fn demo_keeps_files_in_a_given_dir_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let kept = dir.path().join("kept");
    let o = outbox(&[
        "demo",
        "--orders",
        "20",
        "--quiet",
        "--keep",
        "--dir",
        kept.to_str().unwrap(),
    ]);
    assert_ok(&o);
    assert!(kept.join("orders.db").is_file());
    assert!(kept.join("billing.db").is_file());
    // A second run refuses to reuse the databases.
    let o = outbox(&[
        "demo",
        "--orders",
        "20",
        "--quiet",
        "--dir",
        kept.to_str().unwrap(),
    ]);
    assert_rejected(&o, &["orders.db", "already exists"]);

    let gone = dir.path().join("gone");
    let o = outbox(&[
        "demo",
        "--orders",
        "20",
        "--quiet",
        "--dir",
        gone.to_str().unwrap(),
    ]);
    assert_ok(&o);
    assert!(!gone.join("orders.db").exists());
    assert!(!gone.join("billing.db").exists());
}

#[test]
fn demo_rejects_bad_options() {
    assert_rejected(&outbox(&["demo", "--orders", "0"]), &["--orders", "0"]);
    assert_rejected(
        &outbox(&["demo", "--orders", "many"]),
        &["--orders", "many"],
    );
    assert_rejected(&outbox(&["demo", "--writers", "0"]), &["--writers"]);
    assert_rejected(
        &outbox(&["demo", "--kill-at", "1.5"]),
        &["--kill-at", "between 0 and 1"],
    );
    assert_rejected(
        &outbox(&["demo", "--kill-at", "x"]),
        &["--kill-at", "not a number"],
    );
    assert_rejected(
        &outbox(&["demo", "--timeout", "soon"]),
        &["--timeout", "invalid duration"],
    );
}
