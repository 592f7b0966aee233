//! Shared helpers of the integration tests: the server URL, per-test schemas and their cleanup.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use outbox_core::{Error, ErrorKind, Result};
use outbox_postgres::{PgConfig, PgStore};
use sqlx::Connection;

/// The variable naming the test server.
pub const URL_ENV: &str = "OUTBOX_TEST_POSTGRES_URL";

/// The server URL, or an `Unavailable` error (the harness turns it into a SKIPPED line, or a
/// failure with `OUTBOX_TEST_REQUIRED=1`).
pub fn url() -> Result<String> {
    std::env::var(URL_ENV)
        .ok()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| Error::unavailable(format!("{URL_ENV} not set")))
}

/// For tests outside the conformance harness: the URL, or `None` after printing SKIPPED
/// (panics instead when `OUTBOX_TEST_REQUIRED=1`).
pub fn url_or_skip(test: &str) -> Option<String> {
    match url() {
        Ok(u) => Some(u),
        Err(e) => {
            if std::env::var("OUTBOX_TEST_REQUIRED").is_ok_and(|v| v == "1") {
                panic!("{test}: {e} and OUTBOX_TEST_REQUIRED=1");
            }
            eprintln!("SKIPPED {test}: {URL_ENV} not set");
            None
        }
    }
}

/// A schema name (at most 41 bytes) unique to `name` and this run.
pub fn schema_name(name: &str) -> String {
    let suffix: String = (0..8).map(|_| fastrand::lowercase()).collect();
    let base: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(31)
        .collect();
    format!("t_{base}_{suffix}")
        .chars()
        .take(41)
        .collect::<String>()
}

/// Drops its schema (and everything in it) when dropped, on a thread of its own so it works
/// from inside or outside a runtime.
pub struct DropSchema {
    pub url: String,
    pub schema: String,
}

impl Drop for DropSchema {
    fn drop(&mut self) {
        let url = self.url.clone();
        let schema = self.schema.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&url).await {
                    let _ = sqlx::query("SET lock_timeout = '10s'")
                        .execute(&mut conn)
                        .await;
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                    )))
                    .execute(&mut conn)
                    .await;
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

/// A migrated store in a fresh schema, its cleanup guard, and the URL.
pub async fn store(name: &str, config: PgConfig) -> Option<(PgStore, DropSchema)> {
    let url = url_or_skip(name)?;
    let schema = schema_name(name);
    let store = PgStore::connect(
        &url,
        config
            .with_schema(&schema)
            .with_acquire_timeout(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let guard = DropSchema {
        url: url.clone(),
        schema,
    };
    store.migrate().await.unwrap();
    Some((store, guard))
}

/// Assert the kind of an error result.
pub fn assert_kind<T: std::fmt::Debug>(r: Result<T>, kind: ErrorKind, what: &str) -> Error {
    match r {
        Ok(v) => panic!("{what}: expected {kind:?}, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{what}: {e}");
            e
        }
    }
}
