//! Table creation (idempotent, waits until active, enables TTL) and deletion.

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType, TableStatus, TimeToLiveSpecification,
};
use outbox_core::{Error, Result};

use crate::codec::{
    CREATED, DELIVER_AFTER, KEY, NEXT_ATTEMPT, PARKED_INDEX, PARKED_PK, PENDING_INDEX, PENDING_PK,
    PK, SEQ, SK, TOPIC, TTL,
};
use crate::error::parse_error;

fn build_err(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::unexpected("building a table definition failed").with_source(e)
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

fn sparse_index(name: &str, pk: &str, include: &[&str]) -> Result<GlobalSecondaryIndex> {
    let mut projection = Projection::builder().projection_type(ProjectionType::Include);
    for a in include {
        projection = projection.non_key_attributes(*a);
    }
    GlobalSecondaryIndex::builder()
        .index_name(name)
        .key_schema(key(pk, KeyType::Hash)?)
        .key_schema(key(SEQ, KeyType::Range)?)
        .projection(projection.build())
        .build()
        .map_err(build_err)
}

/// Create the outbox, inbox and lock tables if they do not exist, wait until they are active,
/// and enable TTL on the outbox and inbox tables.
pub(crate) async fn create_tables(
    client: &Client,
    outbox: &str,
    inbox: &str,
    locks: &str,
) -> Result<()> {
    create(
        client
            .create_table()
            .table_name(outbox)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr(PK, ScalarAttributeType::S)?)
            .attribute_definitions(attr(PENDING_PK, ScalarAttributeType::N)?)
            .attribute_definitions(attr(PARKED_PK, ScalarAttributeType::N)?)
            .attribute_definitions(attr(SEQ, ScalarAttributeType::N)?)
            .key_schema(key(PK, KeyType::Hash)?)
            .global_secondary_indexes(sparse_index(
                PENDING_INDEX,
                PENDING_PK,
                &[KEY, DELIVER_AFTER, NEXT_ATTEMPT, CREATED],
            )?)
            .global_secondary_indexes(sparse_index(PARKED_INDEX, PARKED_PK, &[KEY, TOPIC])?),
    )
    .await?;
    create(
        client
            .create_table()
            .table_name(inbox)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr(PK, ScalarAttributeType::S)?)
            .attribute_definitions(attr(SK, ScalarAttributeType::S)?)
            .key_schema(key(PK, KeyType::Hash)?)
            .key_schema(key(SK, KeyType::Range)?),
    )
    .await?;
    create(
        client
            .create_table()
            .table_name(locks)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr(PK, ScalarAttributeType::S)?)
            .key_schema(key(PK, KeyType::Hash)?),
    )
    .await?;
    for table in [outbox, inbox, locks] {
        wait_active(client, table).await?;
    }
    for table in [outbox, inbox] {
        enable_ttl(client, table).await?;
    }
    Ok(())
}

/// Send a CreateTable; an existing table is fine. Returns whether it was created.
async fn create(
    req: aws_sdk_dynamodb::operation::create_table::builders::CreateTableFluentBuilder,
) -> Result<bool> {
    match req.send().await {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some("ResourceInUseException") => Ok(false),
        Err(e) => Err(parse_error(e)),
    }
}

async fn wait_active(client: &Client, table: &str) -> Result<()> {
    for _ in 0..600 {
        let d = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(parse_error)?;
        let t = d.table();
        let table_ready = t.and_then(|t| t.table_status()) == Some(&TableStatus::Active);
        let indexes_ready = t.is_none_or(|t| {
            t.global_secondary_indexes().iter().all(|i| {
                i.index_status()
                    .is_none_or(|s| *s == aws_sdk_dynamodb::types::IndexStatus::Active)
            })
        });
        if table_ready && indexes_ready {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(Error::unavailable(format!(
        "table {table} did not become ACTIVE within 5 minutes"
    )))
}

async fn enable_ttl(client: &Client, table: &str) -> Result<()> {
    let d = client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .map_err(parse_error)?;
    let enabled = d.time_to_live_description().is_some_and(|t| {
        t.attribute_name() == Some(TTL)
            && matches!(
                t.time_to_live_status(),
                Some(
                    aws_sdk_dynamodb::types::TimeToLiveStatus::Enabled
                        | aws_sdk_dynamodb::types::TimeToLiveStatus::Enabling
                )
            )
    });
    if enabled {
        return Ok(());
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
