//! The [`OrderRepository`] of each backend: the only code that differs between them. Each
//! writes the order with the backend's own way of writing inside the outbox transaction
//! (the table in the top-level README).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox::dynamodb::aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, Put,
    ScalarAttributeType, TableStatus,
};
use outbox::dynamodb::{DynamoDbStore, DynamoDbTx};
use outbox::memory::{MemoryStore, MemoryTx};
use outbox::postgres::{PgStore, PgTx, sqlx};
use outbox::sqlite::{SqliteStore, SqliteTx, rusqlite};
use outbox::{Error, ErrorKind, Transaction, TransactionalStore};

use crate::{Order, OrderRepository};

/// A table name the repositories accept: ASCII letters, digits and `_`, optionally one
/// `schema.` in front (PostgreSQL), at most 63 bytes per part. Names are spliced into SQL, so
/// nothing else is let through.
fn check_table(name: &str, allow_schema: bool) -> outbox::Result<()> {
    let parts: Vec<&str> = name.split('.').collect();
    let ok = (parts.len() == 1 || (allow_schema && parts.len() == 2))
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 63
                && !p.starts_with(|c: char| c.is_ascii_digit())
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "orders table name {name:?}: use letters, digits and _ only"
        )))
    }
}

fn duplicate(id: &str) -> Error {
    Error::new(ErrorKind::AlreadyExists, format!("order {id:?} exists"))
}

/// Orders in a SQLite table, written with [`SqliteTx::execute`].
#[derive(Debug, Clone)]
pub struct SqliteOrders {
    store: SqliteStore,
    table: String,
}

impl SqliteOrders {
    /// Orders in `table` of `store`'s database.
    ///
    /// # Errors
    /// `ConfigInvalid` for a table name other than letters, digits and `_`.
    pub fn new(store: SqliteStore, table: &str) -> outbox::Result<Self> {
        check_table(table, false)?;
        Ok(SqliteOrders {
            store,
            table: table.to_owned(),
        })
    }
}

#[async_trait]
impl OrderRepository for SqliteOrders {
    type Store = SqliteStore;

    async fn migrate(&self) -> outbox::Result<()> {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (id TEXT PRIMARY KEY, customer TEXT NOT NULL, \
             total_cents INTEGER NOT NULL)",
            self.table
        );
        let mut tx = self.store.begin().await?;
        tx.execute(move |c| c.execute_batch(&sql)).await?;
        tx.commit().await.map(drop)
    }

    async fn insert(&self, tx: &mut SqliteTx, order: &Order) -> outbox::Result<()> {
        let sql = format!(
            "INSERT INTO {} (id, customer, total_cents) VALUES (?1, ?2, ?3)",
            self.table
        );
        let o = order.clone();
        tx.execute(move |c| c.execute(&sql, rusqlite::params![o.id, o.customer, o.total_cents]))
            .await
            .map(drop)
    }

    async fn get(&self, id: &str) -> outbox::Result<Option<Order>> {
        let sql = format!(
            "SELECT id, customer, total_cents FROM {} WHERE id = ?1",
            self.table
        );
        let id = id.to_owned();
        let mut tx = self.store.begin().await?;
        let found = tx
            .execute(move |c| {
                use rusqlite::OptionalExtension as _;
                c.query_row(&sql, [id], |r| {
                    Ok(Order {
                        id: r.get(0)?,
                        customer: r.get(1)?,
                        total_cents: r.get(2)?,
                    })
                })
                .optional()
            })
            .await?;
        tx.rollback().await?;
        Ok(found)
    }
}

/// Orders in a PostgreSQL table, written with sqlx on [`PgTx::conn`].
#[derive(Debug, Clone)]
pub struct PgOrders {
    store: PgStore,
    table: String,
}

impl PgOrders {
    /// Orders in `table` (`name` or `schema.name`) of `store`'s database.
    ///
    /// # Errors
    /// `ConfigInvalid` for a table name other than letters, digits and `_`.
    pub fn new(store: PgStore, table: &str) -> outbox::Result<Self> {
        check_table(table, true)?;
        Ok(PgOrders {
            store,
            table: table.to_owned(),
        })
    }
}

#[async_trait]
impl OrderRepository for PgOrders {
    type Store = PgStore;

    async fn migrate(&self) -> outbox::Result<()> {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, customer text NOT NULL, \
             total_cents bigint NOT NULL)",
            self.table
        );
        // The table name passed check_table: letters, digits, `_` and one `.`.
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(self.store.pool())
            .await
            .map_err(outbox::postgres::parse_error)
            .map(drop)
    }

    async fn insert(&self, tx: &mut PgTx, order: &Order) -> outbox::Result<()> {
        let sql = format!(
            "INSERT INTO {} (id, customer, total_cents) VALUES ($1, $2, $3)",
            self.table
        );
        // The table name passed check_table: letters, digits, `_` and one `.`.
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&order.id)
            .bind(&order.customer)
            .bind(order.total_cents)
            .execute(tx.conn())
            .await
            .map_err(outbox::postgres::parse_error)
            .map(drop)
    }

    async fn get(&self, id: &str) -> outbox::Result<Option<Order>> {
        let sql = format!(
            "SELECT id, customer, total_cents FROM {} WHERE id = $1",
            self.table
        );
        let row: Option<(String, String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(self.store.pool())
            .await
            .map_err(outbox::postgres::parse_error)?;
        Ok(row.map(|(id, customer, total_cents)| Order {
            id,
            customer,
            total_cents,
        }))
    }
}

/// Orders in a DynamoDB table of their own, written as a conditional `Put` staged with
/// [`DynamoDbTx::put`] (one `TransactWriteItems` with the message).
#[derive(Debug, Clone)]
pub struct DynamoOrders {
    store: DynamoDbStore,
    table: String,
}

impl DynamoOrders {
    /// Orders in the table `table`, through `store`'s client.
    ///
    /// # Errors
    /// `ConfigInvalid` for a table name other than letters, digits and `_`.
    pub fn new(store: DynamoDbStore, table: &str) -> outbox::Result<Self> {
        check_table(table, false)?;
        Ok(DynamoOrders {
            store,
            table: table.to_owned(),
        })
    }

    /// Delete the orders table (tests clean up with it).
    ///
    /// # Errors
    /// DynamoDB errors other than a missing table.
    pub async fn delete_table(&self) -> outbox::Result<()> {
        match self
            .store
            .client()
            .delete_table()
            .table_name(&self.table)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(outbox::dynamodb::parse_error(e)),
        }
    }
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

#[async_trait]
impl OrderRepository for DynamoOrders {
    type Store = DynamoDbStore;

    async fn migrate(&self) -> outbox::Result<()> {
        let client = self.store.client();
        let key = |kind| {
            KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(kind)
                .build()
                .map_err(|e| Error::invalid_input(e.to_string()))
        };
        let created = client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(key(KeyType::Hash)?)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("id")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(|e| Error::invalid_input(e.to_string()))?,
            )
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_in_use_exception()) => {}
            Err(e) => return Err(outbox::dynamodb::parse_error(e)),
        }
        // A new table takes a moment to become active on AWS.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let d = client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
                .map_err(outbox::dynamodb::parse_error)?;
            if d.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::unavailable(format!(
                    "table {} not active after 120 s",
                    self.table
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn insert(&self, tx: &mut DynamoDbTx, order: &Order) -> outbox::Result<()> {
        let put = Put::builder()
            .table_name(&self.table)
            .item("id", s(&order.id))
            .item("customer", s(&order.customer))
            .item(
                "total_cents",
                AttributeValue::N(order.total_cents.to_string()),
            )
            .condition_expression("attribute_not_exists(id)")
            .build()
            .map_err(|e| Error::invalid_input(e.to_string()))?;
        tx.put(put);
        Ok(())
    }

    async fn get(&self, id: &str) -> outbox::Result<Option<Order>> {
        let out = self
            .store
            .client()
            .get_item()
            .table_name(&self.table)
            .key("id", s(id))
            .consistent_read(true)
            .send()
            .await
            .map_err(outbox::dynamodb::parse_error)?;
        let Some(item) = out.item() else {
            return Ok(None);
        };
        let text = |name: &str| match item.get(name) {
            Some(AttributeValue::S(v)) => Ok(v.clone()),
            _ => Err(Error::unexpected(format!("order {id:?}: no text {name}"))),
        };
        let total_cents = match item.get("total_cents") {
            Some(AttributeValue::N(v)) => v
                .parse()
                .map_err(|_| Error::unexpected(format!("order {id:?}: total {v:?}")))?,
            _ => return Err(Error::unexpected(format!("order {id:?}: no total"))),
        };
        Ok(Some(Order {
            id: text("id")?,
            customer: text("customer")?,
            total_cents,
        }))
    }

    /// The conditional `Put` fails the whole commit with `ConditionFailed` when the id is
    /// taken (DynamoDB checks it inside the transaction).
    fn is_duplicate(&self, e: &Error) -> bool {
        matches!(
            e.kind(),
            ErrorKind::AlreadyExists | ErrorKind::ConditionFailed { .. }
        )
    }
}

/// Orders as records of the in-memory backend ([`MemoryTx::put_record`]), for tests and
/// demos. The duplicate check reads the record in the transaction: the memory backend has no
/// conditional record writes, so two concurrent placements of one id could both commit.
#[derive(Debug, Clone)]
pub struct MemoryOrders {
    store: MemoryStore,
}

impl MemoryOrders {
    /// Orders as records of `store`.
    pub fn new(store: MemoryStore) -> Self {
        MemoryOrders { store }
    }
}

fn record_key(id: &str) -> String {
    format!("order/{id}")
}

#[async_trait]
impl OrderRepository for MemoryOrders {
    type Store = MemoryStore;

    async fn migrate(&self) -> outbox::Result<()> {
        Ok(())
    }

    async fn insert(&self, tx: &mut MemoryTx, order: &Order) -> outbox::Result<()> {
        let key = record_key(&order.id);
        if tx.record(&key).is_some() {
            return Err(duplicate(&order.id));
        }
        let value = serde_json::to_vec(order)
            .map_err(|e| Error::invalid_input(format!("encoding the order: {e}")))?;
        tx.put_record(key, value);
        Ok(())
    }

    async fn get(&self, id: &str) -> outbox::Result<Option<Order>> {
        self.store
            .record(&record_key(id))
            .map(|v| {
                serde_json::from_slice(&v)
                    .map_err(|e| Error::unexpected(format!("order {id:?} does not decode: {e}")))
            })
            .transpose()
    }
}
