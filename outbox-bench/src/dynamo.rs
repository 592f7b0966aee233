//! DynamoDB helpers: tables of this program (business items, the floor), and capacity on
//! paper from DynamoDB's published rules, applied to measured items and described tables.
//!
//! The rules (on-demand and provisioned alike):
//! - a write of an item costs 1 WCU per started KiB of the item (an update: of the larger of
//!   the item before and after); inside `TransactWriteItems` twice that;
//! - each global secondary index whose key attributes the item has holds an entry (the
//!   index keys, the table key and the projected attributes: all of them for `ALL`); writing,
//!   changing or removing an entry costs 1 WCU per started KiB of the entry; an update that
//!   changes an entry's key deletes the old entry and writes a new one;
//! - a strongly consistent read costs 1 RCU per started 4 KiB (eventually consistent: half);
//!   a `Query` is billed on the total size of what it read, at least 0.5 RCU.

use std::collections::HashMap;
use std::time::Duration;

use outbox_core::{Error, Result};
use outbox_dynamodb::aws_sdk_dynamodb::Client;
use outbox_dynamodb::aws_sdk_dynamodb::error::ProvideErrorMetadata;
use outbox_dynamodb::aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, Projection, ProjectionType, ScalarAttributeType, TableStatus,
};

/// A DynamoDB item.
pub type Item = HashMap<String, AttributeValue>;

fn build_err(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::unexpected("building a DynamoDB request failed").with_source(e)
}

/// Create an on-demand table with a string hash key `key`, and wait until it is active.
pub async fn create_simple_table(client: &Client, table: &str, key: &str) -> Result<()> {
    client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(key)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(build_err)?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name(key)
                .key_type(KeyType::Hash)
                .build()
                .map_err(build_err)?,
        )
        .send()
        .await
        .map_err(outbox_dynamodb::parse_error)?;
    wait_active(client, table).await
}

/// Create `target` with the key schema, attribute definitions and global secondary indexes
/// of `source` (as DescribeTable reports them). Returns the hash key's attribute name.
pub async fn copy_table(client: &Client, source: &str, target: &str) -> Result<String> {
    let d = client
        .describe_table()
        .table_name(source)
        .send()
        .await
        .map_err(outbox_dynamodb::parse_error)?;
    let t = d
        .table()
        .ok_or_else(|| Error::unexpected(format!("DescribeTable {source}: no table")))?;
    let mut req = client
        .create_table()
        .table_name(target)
        .billing_mode(BillingMode::PayPerRequest)
        .set_attribute_definitions(Some(t.attribute_definitions().to_vec()))
        .set_key_schema(Some(t.key_schema().to_vec()));
    for g in t.global_secondary_indexes() {
        req = req.global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .set_index_name(g.index_name().map(str::to_owned))
                .set_key_schema(Some(g.key_schema().to_vec()))
                .set_projection(g.projection().cloned())
                .build()
                .map_err(build_err)?,
        );
    }
    req.send().await.map_err(outbox_dynamodb::parse_error)?;
    wait_active(client, target).await?;
    t.key_schema()
        .iter()
        .find(|k| *k.key_type() == KeyType::Hash)
        .map(|k| k.attribute_name().to_owned())
        .ok_or_else(|| Error::unexpected(format!("{source} has no hash key")))
}

async fn wait_active(client: &Client, table: &str) -> Result<()> {
    for _ in 0..600 {
        let d = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(outbox_dynamodb::parse_error)?;
        if d.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(Error::unavailable(format!(
        "table {table} did not become active"
    )))
}

/// Delete tables; missing ones are fine.
pub async fn delete_tables(client: &Client, tables: &[&str]) -> Result<()> {
    for table in tables {
        match client.delete_table().table_name(*table).send().await {
            Ok(_) => {}
            Err(e) if e.code() == Some("ResourceNotFoundException") => {}
            Err(e) => return Err(outbox_dynamodb::parse_error(e)),
        }
    }
    Ok(())
}

/// What an index projects.
#[derive(Debug, Clone, PartialEq)]
pub enum Proj {
    /// Every attribute.
    All,
    /// Keys only.
    KeysOnly,
    /// Keys and these attributes.
    Include(Vec<String>),
}

/// A global secondary index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexDef {
    /// Its name.
    pub name: String,
    /// Hash key, then range key if any.
    pub keys: Vec<String>,
    /// Its projection.
    pub projection: Proj,
}

/// A table's key and indexes.
#[derive(Debug, Clone, PartialEq)]
pub struct TableDef {
    /// Table key attributes.
    pub key: Vec<String>,
    /// Global secondary indexes.
    pub indexes: Vec<IndexDef>,
}

/// The definition of a live table.
pub async fn describe(client: &Client, table: &str) -> Result<TableDef> {
    let d = client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(outbox_dynamodb::parse_error)?;
    let t = d
        .table()
        .ok_or_else(|| Error::unexpected(format!("DescribeTable {table}: no table")))?;
    let keys = |ks: &[KeySchemaElement]| {
        let mut v: Vec<&KeySchemaElement> = ks.iter().collect();
        v.sort_by_key(|k| *k.key_type() != KeyType::Hash);
        v.into_iter()
            .map(|k| k.attribute_name().to_owned())
            .collect::<Vec<_>>()
    };
    let projection = |p: Option<&Projection>| match p.and_then(|p| p.projection_type()) {
        Some(ProjectionType::All) => Proj::All,
        Some(ProjectionType::Include) => Proj::Include(
            p.map(|p| p.non_key_attributes().to_vec())
                .unwrap_or_default(),
        ),
        _ => Proj::KeysOnly,
    };
    Ok(TableDef {
        key: keys(t.key_schema()),
        indexes: t
            .global_secondary_indexes()
            .iter()
            .map(|g| IndexDef {
                name: g.index_name().unwrap_or_default().to_owned(),
                keys: keys(g.key_schema()),
                projection: projection(g.projection()),
            })
            .collect(),
    })
}

/// Size of an item as DynamoDB bills it (attribute names plus values), by the backend's own
/// measure.
pub fn size(item: &Item) -> usize {
    outbox_dynamodb::item_size(item)
}

/// The entry `item` has in `index` (its attributes), or `None` if it lacks the index keys.
fn entry(table: &TableDef, index: &IndexDef, item: &Item) -> Option<Item> {
    if !index.keys.iter().all(|k| item.contains_key(k)) {
        return None;
    }
    let keep = |name: &str| {
        index.keys.iter().any(|k| k == name)
            || table.key.iter().any(|k| k == name)
            || match &index.projection {
                Proj::All => true,
                Proj::KeysOnly => false,
                Proj::Include(attrs) => attrs.iter().any(|a| a == name),
            }
    };
    Some(
        item.iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

/// Write units for `bytes`: 1 per started KiB, at least 1.
pub fn wcu(bytes: usize) -> f64 {
    bytes.div_ceil(1024).max(1) as f64
}

/// Strongly consistent read units for `bytes`: 1 per started 4 KiB, at least 1.
pub fn rcu(bytes: usize) -> f64 {
    bytes.div_ceil(4096).max(1) as f64
}

/// WCU of putting a new `item` (`transactional`: inside `TransactWriteItems`), indexes
/// included.
pub fn put_wcu(table: &TableDef, item: &Item, transactional: bool) -> f64 {
    let base = wcu(size(item)) * if transactional { 2.0 } else { 1.0 };
    let indexes: f64 = table
        .indexes
        .iter()
        .filter_map(|i| entry(table, i, item))
        .map(|e| wcu(size(&e)))
        .sum();
    base + indexes
}

/// WCU of updating `before` into `after` (outside a transaction), indexes included.
pub fn update_wcu(table: &TableDef, before: &Item, after: &Item) -> f64 {
    let base = wcu(size(before).max(size(after)));
    let indexes: f64 = table
        .indexes
        .iter()
        .map(
            |i| match (entry(table, i, before), entry(table, i, after)) {
                (None, None) => 0.0,
                (Some(b), None) => wcu(size(&b)),
                (None, Some(a)) => wcu(size(&a)),
                (Some(b), Some(a)) => {
                    let key_changed = i.keys.iter().any(|k| b.get(k) != a.get(k));
                    if key_changed {
                        wcu(size(&b)) + wcu(size(&a))
                    } else if b != a {
                        wcu(size(&b).max(size(&a)))
                    } else {
                        0.0
                    }
                }
            },
        )
        .sum();
    base + indexes
}

/// Brighter V10's outbox table: base key `MessageId`, four indexes projecting `ALL` (from
/// its published schema).
pub fn brighter_table() -> TableDef {
    let idx = |name: &str, hash: &str, range: &str| IndexDef {
        name: name.to_owned(),
        keys: vec![hash.to_owned(), range.to_owned()],
        projection: Proj::All,
    };
    TableDef {
        key: vec!["MessageId".to_owned()],
        indexes: vec![
            idx("Outstanding", "TopicShard", "OutstandingCreatedTime"),
            idx(
                "OutstandingAllTopics",
                "OutstandingCreatedTime",
                "MessageId",
            ),
            idx("Delivered", "TopicShard", "DeliveryTime"),
            idx("DeliveredAllTopics", "DeliveryTime", "MessageId"),
        ],
    }
}

/// The item Brighter V10 stores for `message` while outstanding, and after dispatch.
///
/// Attributes as its schema lists them, with the values it writes for a plain event: the
/// id, body, content type, correlation id, times in .NET ticks (18 digits), topic shard
/// `{topic}_{n}`, topic, partition key, message type, header bag (JSON), character
/// encoding, ISO created-at, handled count, delay, and the CloudEvents type, source and spec
/// version. Dispatch removes `OutstandingCreatedTime` and sets `DeliveryTime` and
/// `DeliveredAt`. Empty optional attributes (reply-to, subject, data schema, trace, job and
/// workflow ids) are left out, which favours Brighter.
pub fn brighter_items(message: &outbox_core::Message) -> (Item, Item) {
    let s = |v: &str| AttributeValue::S(v.to_owned());
    let n = |v: &str| AttributeValue::N(v.to_owned());
    let ticks = "638700000000000000";
    let id = message.id.to_string();
    let mut item: Item = HashMap::new();
    item.insert("MessageId".into(), s(&id));
    item.insert(
        "Body".into(),
        AttributeValue::B(message.payload.to_vec().into()),
    );
    item.insert(
        "ContentType".into(),
        s(message
            .content_type
            .as_deref()
            .unwrap_or("application/json")),
    );
    item.insert("CorrelationId".into(), s(&id));
    item.insert("CreatedTime".into(), n(ticks));
    item.insert("OutstandingCreatedTime".into(), n(ticks));
    item.insert("TopicShard".into(), s(&format!("{}_2", message.topic)));
    item.insert("Topic".into(), s(&message.topic));
    if let Some(k) = &message.key {
        item.insert("PartitionKey".into(), s(k));
    }
    item.insert("MessageType".into(), s("MT_EVENT"));
    item.insert("HeaderBag".into(), s("{}"));
    item.insert("CharacterEncoding".into(), s("UTF8"));
    item.insert("CreatedAt".into(), s("2026-12-01T09:00:00.0000000Z"));
    item.insert("HandledCount".into(), n("0"));
    item.insert("DelayedMilliseconds".into(), n("0"));
    item.insert("Type".into(), s("goparamore.io.Paramore.Brighter.Message"));
    item.insert("Source".into(), s("http://goparamore.io"));
    item.insert("SpecVersion".into(), s("1.0"));
    let mut after = item.clone();
    after.remove("OutstandingCreatedTime");
    after.insert("DeliveryTime".into(), n(ticks));
    after.insert("DeliveredAt".into(), s("2026-12-01"));
    (item, after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brighter_add_and_dispatch_follow_the_rules() {
        // A 700-byte body: the item is just over 1 KiB with Brighter's attribute names.
        let m = outbox_core::Message::builder("orders")
            .key("k")
            .payload(vec![b'x'; 700])
            .build()
            .expect("message");
        let t = brighter_table();
        let (before, after) = brighter_items(&m);
        let w = wcu(size(&before));
        // Two outstanding indexes hold the whole item; the delivered ones nothing yet.
        assert_eq!(put_wcu(&t, &before, false), 3.0 * w);
        assert_eq!(put_wcu(&t, &before, true), 4.0 * w);
        // Dispatch: the item, two index deletes, two index puts of the whole item.
        let wa = wcu(size(&after));
        assert_eq!(
            update_wcu(&t, &before, &after),
            w.max(wa) + 2.0 * w + 2.0 * wa
        );
    }

    #[test]
    fn include_projection_keeps_entries_small() {
        let t = TableDef {
            key: vec!["pk".into()],
            indexes: vec![IndexDef {
                name: "pending".into(),
                keys: vec!["pp".into(), "sq".into()],
                projection: Proj::Include(vec!["k".into()]),
            }],
        };
        let mut item: Item = HashMap::new();
        item.insert("pk".into(), AttributeValue::S("id".into()));
        item.insert("pp".into(), AttributeValue::N("3".into()));
        item.insert("sq".into(), AttributeValue::N("17".into()));
        item.insert("k".into(), AttributeValue::S("key".into()));
        item.insert("p".into(), AttributeValue::B(vec![0u8; 3000].into()));
        // 3 KiB item, a tiny index entry.
        assert_eq!(put_wcu(&t, &item, false), 3.0 + 1.0);
        assert_eq!(put_wcu(&t, &item, true), 6.0 + 1.0);
        let mut after = item.clone();
        after.remove("pp");
        assert_eq!(
            update_wcu(&t, &item, &after),
            3.0 + 1.0,
            "item + entry delete"
        );
        assert_eq!(rcu(size(&item)), 1.0);
    }
}
