//! The operator commands (`init`, `status`, `list`, `show`, `requeue`, `purge`) run as the
//! real binary against SQLite, PostgreSQL and moto's DynamoDB; the effects are checked in the
//! store itself. Also every error path, with a password in the URL that must never appear.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{assert_ok, assert_rejected, json, outbox, service, stderr, stdout, unique};
use outbox_core::{
    DistributedLock, FailedAttempt, Message, MessageId, MessageStatus, OutboxStore, Utc,
};
use serde_json::Value;

/// A store under test: its `--store` URL, and the same store opened from Rust.
struct Fixture {
    store: Arc<dyn OutboxStore>,
    lock: Arc<dyn DistributedLock>,
    /// Whether the backend counts `dispatched_since` (else the CLI prints null / n/a).
    counts_dispatched: bool,
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

fn id_strings(ids: &[MessageId]) -> Vec<String> {
    ids.iter().map(ToString::to_string).collect()
}

fn message(topic: &str, key: &str) -> Message {
    Message::builder(topic)
        .key(key)
        .payload(br#"{"n":1}"#.to_vec())
        .content_type("application/json")
        .header("tenant", "acme")
        .build()
        .unwrap()
}

/// Run the binary off the async worker threads.
async fn run(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        outbox(&args)
    })
    .await
    .unwrap()
}

macro_rules! cli {
    ($($arg:expr),* $(,)?) => { run(vec![$($arg.to_string()),*]).await };
}

/// The whole operator workflow on one backend. `open` opens the store from Rust once the
/// CLI created its tables.
async fn operator_workflow(url: &str, open: impl AsyncFnOnce() -> Fixture) {
    // Before init: a clear error naming `outbox init`, exit code 1.
    let o = cli!("status", "--store", url);
    assert_rejected(&o, &["not exist", "outbox init"]);
    assert_eq!(o.status.code(), Some(1));
    assert_ok(&cli!("init", "--store", url));
    assert_ok(&cli!("init", "--store", url)); // idempotent
    let f = open().await;
    let store = &f.store;

    let a = message("orders", "k1");
    let b = message("orders", "k2");
    let c = message("payments", "k1");
    let d = message("orders", "k1");
    for m in [&a, &b, &c, &d] {
        store.add(m).await.unwrap();
    }
    store.mark_dispatched(&[b.id]).await.unwrap();
    let attempt = FailedAttempt {
        error: "broker said no".into(),
        next_attempt_at: Utc::now(),
        max_attempts: 1,
    };
    store.mark_failed(c.id, &attempt).await.unwrap();
    let lease = f
        .lock
        .acquire("outbox/shard/3", "test-holder", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();

    // status: counts, age, leases; JSON schema.
    let s = json(&cli!("status", "--store", url, "--json"));
    assert_eq!(s["pending"], 2, "{s}");
    assert_eq!(s["parked"], 1, "{s}");
    if f.counts_dispatched {
        assert_eq!(s["dispatched_last_hour"], 1, "{s}");
    } else {
        assert!(s["dispatched_last_hour"].is_null(), "{s}");
    }
    assert!(
        s["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0,
        "{s}"
    );
    let shards = s["shards"].as_array().unwrap();
    assert_eq!(shards.len() as u32, store.shard_count());
    assert_eq!(shards[3]["owner"], "test-holder", "{s}");
    assert_eq!(shards[3]["token"], lease.token, "{s}");
    assert_eq!(shards[3]["resource"], "outbox/shard/3");
    assert!(shards[2]["owner"].is_null(), "{s}");
    assert_eq!(s["healthy"], true);
    assert!(!s["store"].as_str().unwrap().is_empty());
    let text = stdout(&cli!("status", "--store", url));
    assert!(text.contains("pending:              2"), "{text}");
    assert!(text.contains("test-holder"), "{text}");
    if !f.counts_dispatched {
        assert!(text.contains("dispatched last hour: n/a"), "{text}");
    }

    // Health check: exit code 3 and a reason when a limit is exceeded, 0 otherwise.
    let o = cli!("status", "--store", url, "--max-pending", "1");
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("2 messages are pending"),
        "{}",
        stderr(&o)
    );
    let o = cli!("status", "--store", url, "--max-age", "0s", "--json");
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["healthy"], false);
    assert!(
        s["problems"][0].as_str().unwrap().contains("--max-age"),
        "{s}"
    );
    let o = cli!(
        "status",
        "--store",
        url,
        "--max-age",
        "1h",
        "--max-pending",
        "2"
    );
    assert_ok(&o);

    // list: filters by state, topic and key, in store order.
    let all = json(&cli!("list", "--store", url, "--json"));
    assert_eq!(ids(&all), id_strings(&[a.id, b.id, c.id, d.id]));
    let k1 = json(&cli!("list", "--store", url, "--key", "k1", "--json"));
    assert_eq!(ids(&k1), id_strings(&[a.id, c.id, d.id]));
    let q = cli!(
        "list", "--store", url, "--state", "pending", "--topic", "orders", "--key", "k1", "--json"
    );
    assert_eq!(ids(&json(&q)), id_strings(&[a.id, d.id]));
    let q = cli!(
        "list", "--store", url, "--key", "k1", "--limit", "1", "--json"
    );
    assert_eq!(ids(&json(&q)), id_strings(&[a.id]));
    let parked = json(&cli!("list", "--store", url, "--state", "parked", "--json"));
    assert_eq!(ids(&parked), id_strings(&[c.id]));
    assert_eq!(parked[0]["last_error"], "broker said no");
    assert_eq!(parked[0]["status"], "parked");
    let table = stdout(&cli!("list", "--store", url, "--state", "dispatched"));
    assert!(table.starts_with("ID "), "{table}");
    assert!(table.contains(&b.id.to_string()) && !table.contains(&a.id.to_string()));

    // show: headers, attempts, last error; an unknown id is an error.
    let m = json(&cli!("show", "--store", url, c.id, "--json"));
    assert_eq!(m["id"], c.id.to_string());
    assert_eq!(m["attempts"], 1);
    assert_eq!(m["last_error"], "broker said no");
    assert_eq!(m["headers"]["tenant"], "acme");
    assert_eq!(m["key"], "k1");
    assert_eq!(m["content_type"], "application/json");
    assert_eq!(m["payload_text"], r#"{"n":1}"#);
    let text = stdout(&cli!("show", "--store", url, c.id));
    assert!(
        text.contains("tenant=acme") && text.contains("broker said no"),
        "{text}"
    );
    let missing = MessageId::new();
    assert_rejected(
        &cli!("show", "--store", url, missing),
        &["no message with id"],
    );

    // requeue: by id (a pending id is noted, not touched), then --all-parked.
    let o = cli!("requeue", "--store", url, a.id);
    assert_ok(&o);
    assert!(stdout(&o).contains("requeued 0"), "{}", stdout(&o));
    assert!(stderr(&o).contains("were not parked"), "{}", stderr(&o));
    let o = cli!(
        "requeue",
        "--store",
        url,
        "--all-parked",
        "--topic",
        "orders"
    );
    assert!(stdout(&o).contains("requeued 0"), "{}", stdout(&o));
    assert_eq!(
        store.get(c.id).await.unwrap().unwrap().status,
        MessageStatus::Parked
    );
    let o = cli!("requeue", "--store", url, "--all-parked", "--batch", "1");
    assert!(stdout(&o).contains("requeued 1"), "{}", stdout(&o));
    let back = store.get(c.id).await.unwrap().unwrap();
    assert_eq!((back.status, back.attempts), (MessageStatus::Pending, 0));
    store.mark_failed(c.id, &attempt).await.unwrap();
    let o = cli!("requeue", "--store", url, c.id, d.id);
    assert!(stdout(&o).contains("requeued 1"), "{}", stdout(&o));
    assert_eq!(
        store.get(c.id).await.unwrap().unwrap().status,
        MessageStatus::Pending
    );

    // purge: only dispatched messages older than the retention.
    let o = cli!("purge", "--store", url, "--dispatched-older-than", "1h");
    assert!(stdout(&o).contains("purged 0"), "{}", stdout(&o));
    assert!(store.get(b.id).await.unwrap().is_some());
    let o = cli!(
        "purge",
        "--store",
        url,
        "--dispatched-older-than",
        "0s",
        "--batch",
        "1"
    );
    assert!(stdout(&o).contains("purged 1"), "{}", stdout(&o));
    assert!(store.get(b.id).await.unwrap().is_none(), "purged");
    for m in [&a, &c, &d] {
        assert!(store.get(m.id).await.unwrap().is_some(), "pending kept");
    }
    f.lock.release(&lease).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_operator_commands() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let url = format!("sqlite://{}", path.display());
    operator_workflow(&url, async || {
        let store = outbox_sqlite::SqliteStore::connect(outbox_sqlite::SqliteConfig::new(&path))
            .await
            .unwrap();
        store.migrate().await.unwrap();
        Fixture {
            lock: Arc::new(store.lock()),
            store: Arc::new(store),
            counts_dispatched: true,
        }
    })
    .await;
    // A mistyped prefix is an error, not a new empty outbox.
    let o = cli!("status", "--store", format!("{url}?prefix=typo_"));
    assert_rejected(&o, &["no outbox tables", "\"typo_\"", "outbox init"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_operator_commands() {
    let Some(base) = service("OUTBOX_TEST_POSTGRES_URL", "postgres_operator_commands") else {
        return;
    };
    let schema = unique("cli");
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}schema={schema}");
    let mut opened = None;
    operator_workflow(&url, async || {
        let store = outbox_postgres::PgStore::connect(
            &base,
            outbox_postgres::PgConfig::new().with_schema(&schema),
        )
        .await
        .unwrap();
        opened = Some(store.clone());
        Fixture {
            lock: Arc::new(store.lock()),
            store: Arc::new(store),
            counts_dispatched: true,
        }
    })
    .await;
    // The JSON names the store without its password.
    let s = json(&cli!("status", "--store", url, "--json"));
    let shown = s["store"].as_str().unwrap();
    assert!(shown.contains(&format!("schema={schema}")), "{shown}");
    if let Some((_, rest)) = base.split_once("://")
        && let Some((userinfo, _)) = rest.split_once('@')
        && let Some((user, password)) = userinfo.split_once(':')
    {
        assert!(shown.contains(&format!("{user}:***@")), "{shown}");
        assert!(!shown.contains(&format!(":{password}@")), "{shown}");
    }
    let store = opened.unwrap();
    sqlx_drop_schema(&store, &schema).await;
}

async fn sqlx_drop_schema(store: &outbox_postgres::PgStore, schema: &str) {
    outbox_postgres::sqlx::query(outbox_postgres::sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(store.pool())
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_operator_commands() {
    let Some(endpoint) = service(
        "OUTBOX_TEST_DYNAMODB_ENDPOINT",
        "dynamodb_operator_commands",
    ) else {
        return;
    };
    let prefix = format!("{}_", unique("cli"));
    let url = format!("dynamodb://?region=us-east-1&endpoint={endpoint}&prefix={prefix}");
    let mut opened = None;
    operator_workflow(&url, async || {
        let store = outbox_dynamodb::DynamoDbStore::new(
            outbox_dynamodb::local_client(&endpoint),
            outbox_dynamodb::DynamoDbConfig::new(prefix.clone()),
        )
        .unwrap();
        opened = Some(store.clone());
        Fixture {
            lock: Arc::new(store.lock()),
            store: Arc::new(store),
            counts_dispatched: false,
        }
    })
    .await;
    opened.unwrap().delete_tables().await.unwrap();
}

/// A password that must never be printed.
const SECRET: &str = "Hunter2-cli-s3cret";

/// Every error path: bad URL, unknown scheme, unreachable service, missing table, bad
/// values; each exits non-zero with a clear message, and never prints the password, not even
/// in debug logs.
#[test]
fn errors_are_clear_and_never_show_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("app.db").display());
    assert_ok(&outbox(&["init", "--store", &db]));
    let pg_down = format!("postgres://app:{SECRET}@127.0.0.1:1/app");
    let amqp_down = format!("amqp://guest:{SECRET}@127.0.0.1:1/%2f");
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec!["status".into(), "--store".into(), "app.db".into()],
            vec!["expected sqlite://"],
        ),
        (
            vec![
                "status".into(),
                "--store".into(),
                format!("mysql://app:{SECRET}@db/app"),
            ],
            vec!["unknown scheme \"mysql\"", "app:***@db"],
        ),
        (
            vec![
                "list".into(),
                "--store".into(),
                format!("postgres://app:{SECRET}@/app"),
            ],
            vec!["invalid store URL"],
        ),
        (
            vec![
                "status".into(),
                "--store".into(),
                "dynamodb://tbl?region=x".into(),
            ],
            vec!["put everything in the query"],
        ),
        (
            vec!["status".into(), "--store".into(), pg_down.clone()],
            vec!["127.0.0.1:1"],
        ),
        (
            vec![
                "status".into(),
                "--store".into(),
                format!("{db}?prefix=nope_"),
            ],
            vec!["no outbox tables", "outbox init"],
        ),
        (
            vec![
                "relay".into(),
                "--store".into(),
                db.clone(),
                "--transport".into(),
                amqp_down.clone(),
            ],
            vec!["127.0.0.1:1"],
        ),
        (
            vec![
                "relay".into(),
                "--store".into(),
                db.clone(),
                "--transport".into(),
                format!("nats://u:{SECRET}@h:4222"),
            ],
            vec!["unknown scheme \"nats\""],
        ),
        (
            vec![
                "relay".into(),
                "--store".into(),
                pg_down.clone(),
                "--transport".into(),
                "kafka://h:1".into(),
            ],
            vec!["127.0.0.1:1"],
        ),
        (
            vec![
                "relay".into(),
                "--store".into(),
                db.clone(),
                "--transport".into(),
                "kafka://h:1".into(),
                "--lease-ttl".into(),
                "3s".into(),
                "--publish-timeout".into(),
                "2s".into(),
            ],
            vec!["invalid relay configuration", "publish_timeout"],
        ),
        (
            vec![
                "status".into(),
                "--store".into(),
                db.clone(),
                "--max-age".into(),
                "soon".into(),
            ],
            vec!["--max-age", "invalid duration"],
        ),
        (
            vec![
                "show".into(),
                "--store".into(),
                db.clone(),
                "not-an-id".into(),
            ],
            vec!["not-an-id"],
        ),
        (
            vec!["requeue".into(), "--store".into(), db.clone()],
            vec!["--all-parked"],
        ),
    ];
    for (args, needles) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = common::cmd()
            .args(&args)
            .env("RUST_LOG", "debug")
            .output()
            .unwrap();
        assert_rejected(&o, &needles);
        for text in [stdout(&o), stderr(&o)] {
            assert!(
                !text.contains(SECRET),
                "{args:?} printed the password:\n{text}"
            );
        }
    }

    // From the environment too, and `--help` does not show the variable's value.
    for args in [vec!["status"], vec!["status", "--help"]] {
        let o = common::cmd()
            .args(&args)
            .env("OUTBOX_STORE", &pg_down)
            .env("RUST_LOG", "debug")
            .output()
            .unwrap();
        for text in [stdout(&o), stderr(&o)] {
            assert!(
                !text.contains(SECRET),
                "{args:?} printed the password:\n{text}"
            );
        }
        if args.len() == 1 {
            assert_rejected(&o, &["127.0.0.1:1"]);
        } else {
            assert_ok(&o);
        }
    }
}

/// The password of a reachable PostgreSQL does not show in `--json`, text output or logs.
#[test]
fn postgres_password_is_redacted_on_success_paths() {
    let Some(base) = service("OUTBOX_TEST_POSTGRES_URL", "postgres_password_is_redacted") else {
        return;
    };
    // The server trusts local connections, so any password connects: use a recognisable one.
    let Some((scheme, rest)) = base.split_once("://") else {
        panic!("OUTBOX_TEST_POSTGRES_URL is not a URL");
    };
    let host_part = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let user = rest
        .rsplit_once('@')
        .and_then(|(u, _)| u.split(':').next())
        .unwrap_or("postgres");
    let schema = unique("cli_redact");
    let url = format!("{scheme}://{user}:{SECRET}@{host_part}?schema={schema}");
    let init = common::cmd()
        .args(["init", "--store", &url])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    if !init.status.success() && stderr(&init).contains("password") {
        eprintln!(
            "skipping: this PostgreSQL checks passwords: {}",
            stderr(&init)
        );
        return;
    }
    assert_ok(&init);
    for args in [
        vec!["status", "--store", &url, "--json"],
        vec!["status", "--store", &url],
        vec!["list", "--store", &url, "--json"],
        vec!["purge", "--store", &url, "--dispatched-older-than", "1d"],
    ] {
        let o = common::cmd()
            .args(&args)
            .env("RUST_LOG", "debug")
            .output()
            .unwrap();
        assert_ok(&o);
        for text in [stdout(&o), stderr(&o), stdout(&init), stderr(&init)] {
            assert!(
                !text.contains(SECRET),
                "{args:?} printed the password:\n{text}"
            );
        }
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = outbox_postgres::PgStore::connect(&base, outbox_postgres::PgConfig::new())
            .await
            .unwrap();
        sqlx_drop_schema(&store, &schema).await;
    });
}
