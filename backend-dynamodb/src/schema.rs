//! Table creation (idempotent, waits until active, enables the outbox stream and TTL),
//! verification of existing tables, deletion, and the check (once per store) of the shard
//! count a table records.

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::operation::get_item::GetItemOutput;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ReturnConsumedCapacity,
    ScalarAttributeType, StreamSpecification, StreamViewType, TableDescription, TableStatus,
    TimeToLiveSpecification, TimeToLiveStatus,
};
use outbox_core::{Error, Result};

use crate::codec::{self, PK, SHARD_COUNT, SK, TTL, get_n};
use crate::core::Core;
use crate::error::parse_error;
use crate::meter::{Units, write_units};
use crate::request::{Meta, build_err, send, send_conditional};

/// The stream view the outbox table's stream uses: keys are enough to name the shard.
pub const STREAM_VIEW: StreamViewType = StreamViewType::KeysOnly;

/// What a table must look like.
struct Expected<'a> {
    name: &'a str,
    keys: &'a [(&'a str, ScalarAttributeType, KeyType)],
    stream: bool,
    ttl: bool,
}

fn attr(name: &str, t: ScalarAttributeType) -> Result<AttributeDefinition> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(t)
        .build()
        .map_err(build_err)
}

fn key(name: &str, t: KeyType) -> Result<KeySchemaElement> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(t)
        .build()
        .map_err(build_err)
}

/// Create the outbox, inbox and lock tables if they do not exist, wait until they are active,
/// enable the outbox stream and TTL, and verify every table.
pub(crate) async fn create_tables(
    client: &Client,
    outbox: &str,
    inbox: &str,
    locks: &str,
) -> Result<()> {
    let tables = [
        Expected {
            name: outbox,
            keys: &[
                (PK, ScalarAttributeType::S, KeyType::Hash),
                (SK, ScalarAttributeType::N, KeyType::Range),
            ],
            stream: true,
            ttl: true,
        },
        Expected {
            name: inbox,
            keys: &[
                (PK, ScalarAttributeType::S, KeyType::Hash),
                (SK, ScalarAttributeType::S, KeyType::Range),
            ],
            stream: false,
            ttl: true,
        },
        Expected {
            name: locks,
            keys: &[(PK, ScalarAttributeType::S, KeyType::Hash)],
            stream: false,
            ttl: false,
        },
    ];
    for t in &tables {
        let mut req = client
            .create_table()
            .table_name(t.name)
            .billing_mode(BillingMode::PayPerRequest);
        for (name, ty, kt) in t.keys {
            req = req
                .attribute_definitions(attr(name, ty.clone())?)
                .key_schema(key(name, kt.clone())?);
        }
        if t.stream {
            req = req.stream_specification(
                StreamSpecification::builder()
                    .stream_enabled(true)
                    .stream_view_type(STREAM_VIEW)
                    .build()
                    .map_err(build_err)?,
            );
        }
        match req.send().await {
            Ok(_) => {}
            Err(e) if e.code() == Some("ResourceInUseException") => {}
            Err(e) => return Err(parse_error(e)),
        }
    }
    for t in &tables {
        let desc = wait_active(client, t.name).await?;
        verify(&desc, t)?;
        if t.stream
            && !desc
                .stream_specification()
                .is_some_and(|s| s.stream_enabled())
        {
            enable_stream(client, t.name).await?;
        }
        if t.ttl {
            enable_ttl(client, t.name).await?;
        }
    }
    Ok(())
}

/// Check an existing table's keys and indexes.
fn verify(desc: &TableDescription, t: &Expected<'_>) -> Result<()> {
    let mismatch = |what: String| {
        Err(Error::config(format!(
            "table {} exists but does not match this library's schema: {what}; use another table_prefix, or migrate (see the crate README, \"Schema\")",
            t.name
        )))
    };
    let keys: Vec<(String, KeyType)> = desc
        .key_schema()
        .iter()
        .map(|k| (k.attribute_name().to_owned(), k.key_type().clone()))
        .collect();
    let want: Vec<(String, KeyType)> = t
        .keys
        .iter()
        .map(|(n, _, k)| ((*n).to_owned(), k.clone()))
        .collect();
    if keys != want {
        return mismatch(format!("key schema is {keys:?}, expected {want:?}"));
    }
    for (name, ty, _) in t.keys {
        let have = desc
            .attribute_definitions()
            .iter()
            .find(|a| a.attribute_name() == *name)
            .map(|a| a.attribute_type().clone());
        if have.as_ref() != Some(ty) {
            return mismatch(format!(
                "key attribute {name} has type {have:?}, expected {ty:?}"
            ));
        }
    }
    let indexes: Vec<&str> = desc
        .global_secondary_indexes()
        .iter()
        .filter_map(|i| i.index_name())
        .chain(
            desc.local_secondary_indexes()
                .iter()
                .filter_map(|i| i.index_name()),
        )
        .collect();
    if !indexes.is_empty() {
        return mismatch(format!(
            "it has secondary indexes {indexes:?}, expected none (version 1 of this backend used the indexes `pending` and `parked`)"
        ));
    }
    if t.stream
        && let Some(s) = desc.stream_specification()
        && s.stream_enabled()
        && s.stream_view_type().is_none()
    {
        return mismatch("its stream has no view type".to_owned());
    }
    Ok(())
}

async fn wait_active(client: &Client, table: &str) -> Result<TableDescription> {
    for _ in 0..600 {
        let d = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(parse_error)?;
        if let Some(t) = d.table()
            && t.table_status() == Some(&TableStatus::Active)
        {
            return Ok(t.clone());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(Error::unavailable(format!(
        "table {table} did not become ACTIVE within 5 minutes"
    )))
}

async fn enable_stream(client: &Client, table: &str) -> Result<()> {
    client
        .update_table()
        .table_name(table)
        .stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(STREAM_VIEW)
                .build()
                .map_err(build_err)?,
        )
        .send()
        .await
        .map_err(parse_error)?;
    wait_active(client, table).await.map(|_| ())
}

async fn enable_ttl(client: &Client, table: &str) -> Result<()> {
    let d = client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .map_err(parse_error)?;
    if let Some(t) = d.time_to_live_description() {
        let on = matches!(
            t.time_to_live_status(),
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
        );
        match t.attribute_name() {
            Some(a) if on && a == TTL => return Ok(()),
            Some(a) if on => {
                return Err(Error::config(format!(
                    "table {table} has TTL on attribute {a:?}; this library needs it on {TTL:?} (disable TTL on the table first)"
                )));
            }
            _ => {}
        }
    }
    let spec = TimeToLiveSpecification::builder()
        .attribute_name(TTL)
        .enabled(true)
        .build()
        .map_err(build_err)?;
    match client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(spec)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        // A concurrent create_tables enabled it first.
        Err(e)
            if e.code() == Some("ValidationException")
                && e.message().is_some_and(|m| m.contains("already enabled")) =>
        {
            Ok(())
        }
        Err(e) => Err(parse_error(e)),
    }
}

/// Delete the tables; missing tables are fine.
pub(crate) async fn delete_tables(client: &Client, tables: &[&str]) -> Result<()> {
    for table in tables {
        match client.delete_table().table_name(*table).send().await {
            Ok(_) => {}
            Err(e) if e.code() == Some("ResourceNotFoundException") => {}
            Err(e) => return Err(parse_error(e)),
        }
    }
    Ok(())
}

impl Core {
    /// Check (once per store) that the table records this store's shard count; record it if
    /// the table has none yet (tables created by your own infrastructure-as-code).
    pub(crate) async fn ensure_open(&self) -> Result<()> {
        self.opened
            .get_or_try_init(|| self.check_shard_count())
            .await
            .map(|_| ())
    }

    async fn check_shard_count(&self) -> Result<()> {
        let want = self.config.shard_count;
        for _ in 0..2 {
            let out: GetItemOutput = send(
                &self.meter,
                Meta::read("open"),
                self.client
                    .get_item()
                    .table_name(&self.outbox)
                    .set_key(Some(codec::table_meta_key()))
                    .consistent_read(true)
                    .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                    .send(),
                |_| Units::read(1.0),
            )
            .await?;
            if let Some(item) = out.item() {
                let have: Option<u32> = get_n(item, SHARD_COUNT)?;
                return match have {
                    Some(have) if have == want => Ok(()),
                    Some(have) => Err(Error::config(format!(
                        "table {} was created with shard_count {have}, but this store is configured with shard_count {want}; every writer and relay of a table must use the table's shard count (messages would otherwise go to shards no relay reads)",
                        self.outbox
                    ))),
                    None => Err(Error::config(format!(
                        "table {} has a meta item without a shard count; it was not created by this library",
                        self.outbox
                    ))),
                };
            }
            let mut item = codec::table_meta_key();
            item.insert(SHARD_COUNT.into(), codec::n(want));
            item.insert("v".into(), codec::n(2));
            let size = codec::item_size(&item);
            send_conditional(
                &self.meter,
                "open",
                self.client
                    .put_item()
                    .table_name(&self.outbox)
                    .set_item(Some(item))
                    .condition_expression("attribute_not_exists(#pk)")
                    .expression_attribute_names("#pk", codec::PK)
                    .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                    .send(),
                Units::write(write_units(size)),
            )
            .await?;
        }
        Err(Error::unavailable(format!(
            "could not read the meta item of table {} after recording it; retry",
            self.outbox
        )))
    }
}
