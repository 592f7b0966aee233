//! Shared test support: endpoint from the environment, a store with fresh tables per test,
//! the caller's own `records` table, and a guard that deletes the tables afterwards.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use outbox_conformance::{BusinessRecords, Fixture, SetupContext};
use outbox_core::{Error, Result, SharedClock, async_trait};
use outbox_dynamodb::aws_sdk_dynamodb::Client;
use outbox_dynamodb::aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, Put,
    ScalarAttributeType,
};
use outbox_dynamodb::{DynamoDbConfig, DynamoDbStore, DynamoDbTx, local_client};

/// Where the test DynamoDB (moto) listens.
pub const ENDPOINT_ENV: &str = "OUTBOX_TEST_DYNAMODB_ENDPOINT";

pub fn endpoint() -> Option<String> {
    std::env::var(ENDPOINT_ENV).ok().filter(|v| !v.is_empty())
}

/// For tests outside the conformance harness: the endpoint, or `None` after printing why
/// (panics instead when `OUTBOX_TEST_REQUIRED=1`).
pub fn endpoint_or_skip(test: &str) -> Option<String> {
    match endpoint() {
        Some(e) => Some(e),
        None => {
            if std::env::var("OUTBOX_TEST_REQUIRED").is_ok_and(|v| v == "1") {
                panic!("{test}: {ENDPOINT_ENV} not set and OUTBOX_TEST_REQUIRED=1");
            }
            eprintln!("SKIPPED {test}: {ENDPOINT_ENV} not set");
            None
        }
    }
}

/// Deletes the tables of a test when dropped (on its own thread and runtime, so it works from
/// any context).
pub struct Tables {
    endpoint: String,
    names: Vec<String>,
}

impl Tables {
    /// A guard deleting these tables.
    pub fn new(endpoint: &str, names: &[&str]) -> Self {
        Tables {
            endpoint: endpoint.to_owned(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
        }
    }
}

impl Drop for Tables {
    fn drop(&mut self) {
        let endpoint = self.endpoint.clone();
        let names = std::mem::take(&mut self.names);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let client = local_client(&endpoint);
                for n in names {
                    let _ = client.delete_table().table_name(n).send().await;
                }
            });
        })
        .join();
    }
}

/// The caller's own table name for a store.
pub fn records_table(store: &DynamoDbStore) -> String {
    format!("{}records", store.config().table_prefix)
}

pub async fn create_records_table(client: &Client, name: &str) -> Result<()> {
    client
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .map_err(outbox_dynamodb::parse_error)?;
    Ok(())
}

/// A fresh store (tables created) with `config` on `endpoint`, plus the `records` table.
pub async fn store_with(endpoint: &str, config: DynamoDbConfig) -> Result<(DynamoDbStore, Tables)> {
    let client = local_client(endpoint);
    let store = DynamoDbStore::new(client.clone(), config)?;
    let (o, i, l) = store.table_names();
    let records = records_table(&store);
    let guard = Tables {
        endpoint: endpoint.to_owned(),
        names: vec![o.to_owned(), i.to_owned(), l.to_owned(), records.clone()],
    };
    store.migrate().await?;
    create_records_table(&client, &records).await?;
    Ok((store, guard))
}

/// A fresh store named after a test, with a unique prefix.
pub async fn fresh(endpoint: &str, test: &str, clock: SharedClock) -> (DynamoDbStore, Tables) {
    let suffix: String = (0..6).map(|_| fastrand::lowercase()).collect();
    let config = DynamoDbConfig::new(format!("{test}_{suffix}_")).with_clock(clock);
    store_with(endpoint, config).await.unwrap()
}

/// The caller's own items: a `Put` into the records table, conditional on absence.
pub struct Records {
    pub store: DynamoDbStore,
}

pub fn record_put(store: &DynamoDbStore, key: &str) -> Put {
    Put::builder()
        .table_name(records_table(store))
        .item("id", AttributeValue::S(key.to_owned()))
        .item("v", AttributeValue::S("x".to_owned()))
        .condition_expression("attribute_not_exists(id)")
        .build()
        .unwrap()
}

pub async fn record_exists(store: &DynamoDbStore, key: &str) -> Result<bool> {
    let out = store
        .client()
        .get_item()
        .table_name(records_table(store))
        .key("id", AttributeValue::S(key.to_owned()))
        .consistent_read(true)
        .send()
        .await
        .map_err(outbox_dynamodb::parse_error)?;
    Ok(out.item().is_some())
}

#[async_trait]
impl BusinessRecords<DynamoDbTx> for Records {
    async fn write(&self, tx: &mut DynamoDbTx, key: &str) -> Result<()> {
        tx.put(record_put(&self.store, key));
        Ok(())
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        record_exists(&self.store, key).await
    }
}

/// A conformance fixture for `config` (prefix and clock are set here).
pub async fn fixture(ctx: SetupContext, config: DynamoDbConfig) -> Result<Fixture<DynamoDbStore>> {
    let Some(endpoint) = endpoint() else {
        return Err(Error::unavailable(format!("{ENDPOINT_ENV} not set")));
    };
    let config = DynamoDbConfig {
        table_prefix: format!("{}_", ctx.name),
        clock: ctx.shared_clock(),
        ..config
    };
    let (store, guard) = store_with(&endpoint, config).await?;
    Ok(Fixture {
        outbox: Arc::new(store.clone()),
        inbox: Arc::new(store.clone()),
        lock: Arc::new(store.lock()),
        tx_store: Arc::new(store.clone()),
        records: Arc::new(Records { store }),
        clock: ctx.clock,
        keep_alive: vec![Box::new(guard)],
    })
}
