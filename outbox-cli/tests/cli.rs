//! End-to-end tests of the `outbox` binary: the demo, the operator subcommands on a real
//! SQLite outbox file, and bad input.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::Path;
use std::process::{Command, Output};

use outbox_core::{FailedAttempt, Message, MessageId, OutboxStore, Utc};
use outbox_sqlite::{SqliteConfig, SqliteStore};

fn outbox(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(args)
        .env_remove("OUTBOX_DB")
        .env_remove("OUTBOX_TABLE_PREFIX")
        .output()
        .expect("run the outbox binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output) {
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
fn assert_rejected(o: &Output, needles: &[&str]) {
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

/// An outbox file with 2 pending, 2 dispatched and 1 parked message; returns their ids.
struct Fixture {
    _dir: tempfile::TempDir,
    db: String,
    pending: Vec<MessageId>,
    dispatched: Vec<MessageId>,
    parked: MessageId,
}

fn fixture(prefix: Option<&str>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (pending, dispatched, parked) = rt.block_on(async {
        let mut config = SqliteConfig::new(&path);
        if let Some(p) = prefix {
            config = config.with_table_prefix(p);
        }
        let store = SqliteStore::open(config).await.unwrap();
        let msg = |topic: &str, key: &str| {
            Message::builder(topic)
                .key(key)
                .payload(b"{}".to_vec())
                .content_type("application/json")
                .build()
                .unwrap()
        };
        let messages = [
            msg("orders", "a"),
            msg("orders", "b"),
            msg("payments", "c"),
            msg("payments", "d"),
            msg("payments", "e"),
        ];
        for m in &messages {
            store.add(m).await.unwrap();
        }
        let ids: Vec<MessageId> = messages.iter().map(|m| m.id).collect();
        store.mark_dispatched(&ids[0..2]).await.unwrap();
        store
            .mark_failed(
                ids[2],
                &FailedAttempt {
                    error: "broker says no".to_owned(),
                    next_attempt_at: Utc::now(),
                    max_attempts: 1,
                },
            )
            .await
            .unwrap();
        (ids[3..5].to_vec(), ids[0..2].to_vec(), ids[2])
    });
    Fixture {
        db: path.to_str().unwrap().to_owned(),
        _dir: dir,
        pending,
        dispatched,
        parked,
    }
}

#[test]
fn status_reports_counts_as_text_and_json() {
    let f = fixture(None);
    let o = outbox(&["status", "--db", &f.db]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.contains("pending:            2"), "{out}");
    assert!(out.contains("parked:             1"), "{out}");
    assert!(out.contains("oldest pending age:"), "{out}");

    let o = outbox(&["status", "--db", &f.db, "--json"]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["pending"], 2);
    assert_eq!(v["parked"], 1);
    assert!(v["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0);
}

#[test]
fn list_filters_by_status_and_topic() {
    let f = fixture(None);
    let o = outbox(&["list", "--db", &f.db]);
    assert_ok(&o);
    assert_eq!(stdout(&o).lines().count(), 5, "{}", stdout(&o));

    let o = outbox(&["list", "--db", &f.db, "--status", "parked"]);
    assert_ok(&o);
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains(&f.parked.to_string()), "{out}");
    assert!(out.contains("broker says no"), "{out}");

    let o = outbox(&[
        "list",
        "--db",
        &f.db,
        "--status",
        "dispatched",
        "--limit",
        "1",
    ]);
    assert_ok(&o);
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains(&f.dispatched[0].to_string()), "{out}");

    let o = outbox(&[
        "list", "--db", &f.db, "--topic", "payments", "--status", "pending",
    ]);
    assert_ok(&o);
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 2, "{out}");
    for id in &f.pending {
        assert!(out.contains(&id.to_string()), "{out}");
    }

    let o = outbox(&["list", "--db", &f.db, "--topic", "nothing-here"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "");
}

#[test]
fn requeue_returns_parked_messages() {
    let f = fixture(None);
    // Not parked: nothing to do.
    let o = outbox(&["requeue", "--db", &f.db, "--id", &f.pending[0].to_string()]);
    assert_ok(&o);
    assert!(stdout(&o).contains("requeued 0"), "{}", stdout(&o));

    let o = outbox(&["requeue", "--db", &f.db, "--id", &f.parked.to_string()]);
    assert_ok(&o);
    assert!(stdout(&o).contains("requeued 1"), "{}", stdout(&o));

    let o = outbox(&["status", "--db", &f.db, "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        (v["pending"].as_u64(), v["parked"].as_u64()),
        (Some(3), Some(0))
    );

    let o = outbox(&["requeue", "--db", &f.db, "--all"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("requeued 0"), "{}", stdout(&o));
    let o = outbox(&["requeue", "--db", &f.db, "--topic", "payments"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("requeued 0"), "{}", stdout(&o));
}

#[test]
fn purge_deletes_only_old_dispatched_messages() {
    let f = fixture(None);
    let o = outbox(&["purge", "--db", &f.db, "--older-than", "7d"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("purged 0"), "{}", stdout(&o));

    std::thread::sleep(std::time::Duration::from_millis(20));
    let o = outbox(&["purge", "--db", &f.db, "--older-than", "0s", "--batch", "1"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("purged 2"), "{}", stdout(&o));

    let o = outbox(&["list", "--db", &f.db]);
    assert_eq!(stdout(&o).lines().count(), 3, "{}", stdout(&o));
    let o = outbox(&["status", "--db", &f.db, "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        (v["pending"].as_u64(), v["parked"].as_u64()),
        (Some(2), Some(1))
    );
}

#[test]
fn table_prefix_selects_the_outbox() {
    let f = fixture(Some("shop_"));
    let o = outbox(&["status", "--db", &f.db, "--prefix", "shop_", "--json"]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["pending"], 2);
    let o = outbox(&["status", "--db", &f.db, "--prefix", "bad prefix!"]);
    assert_rejected(&o, &["prefix"]);
    // A mistyped prefix is an error, not an empty outbox.
    let o = outbox(&["status", "--db", &f.db]);
    assert_rejected(&o, &["no outbox", "outbox_"]);
    let o = outbox(&["list", "--db", &f.db, "--prefix", "shpo_"]);
    assert_rejected(&o, &["no outbox", "shpo_"]);
}

#[test]
fn init_creates_an_empty_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("new.db");
    let db = db.to_str().unwrap();
    assert_ok(&outbox(&["init", "--db", db]));
    let o = outbox(&["status", "--db", db, "--json"]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["pending"], 0);
    assert!(v["oldest_pending_age_seconds"].is_null());
    let missing_dir = dir.path().join("no/such/dir/x.db");
    assert_rejected(
        &outbox(&["init", "--db", missing_dir.to_str().unwrap()]),
        &["does not exist"],
    );
}

#[test]
fn operator_commands_reject_bad_input() {
    let f = fixture(None);
    assert_rejected(
        &outbox(&["purge", "--db", &f.db, "--older-than", "banana"]),
        &["--older-than", "banana", "invalid duration"],
    );
    assert_rejected(
        &outbox(&["purge", "--db", &f.db, "--older-than", "7"]),
        &["missing unit"],
    );
    assert_rejected(
        &outbox(&["purge", "--db", &f.db, "--older-than", "7d", "--batch", "0"]),
        &["--batch"],
    );
    assert_rejected(&outbox(&["purge", "--db", &f.db]), &["--older-than"]);
    assert_rejected(
        &outbox(&["requeue", "--db", &f.db]),
        &["--all", "--id", "--topic"],
    );
    assert_rejected(
        &outbox(&["requeue", "--db", &f.db, "--all", "--topic", "x"]),
        &["--all", "--topic"],
    );
    assert_rejected(
        &outbox(&["requeue", "--db", &f.db, "--id", "not-a-uuid"]),
        &["not-a-uuid", "invalid message id"],
    );
    assert_rejected(
        &outbox(&["list", "--db", &f.db, "--status", "lost"]),
        &["--status", "lost"],
    );
    assert_rejected(
        &outbox(&["list", "--db", &f.db, "--limit", "0"]),
        &["--limit"],
    );

    let missing = Path::new(&f.db).with_file_name("missing.db");
    let missing = missing.to_str().unwrap();
    for cmd in [
        vec!["status", "--db", missing],
        vec!["list", "--db", missing],
        vec!["requeue", "--db", missing, "--all"],
        vec!["purge", "--db", missing, "--older-than", "1d"],
    ] {
        assert_rejected(&outbox(&cmd), &["missing.db", "does not exist"]);
        assert!(
            !Path::new(missing).exists(),
            "a missing database must not be created"
        );
    }
    // Not a database at all.
    let junk = Path::new(&f.db).with_file_name("junk.db");
    std::fs::write(
        &junk,
        b"this is not sqlite, just text that is long enough to be a header..",
    )
    .unwrap();
    assert_rejected(
        &outbox(&["status", "--db", junk.to_str().unwrap()]),
        &["junk.db"],
    );
}
