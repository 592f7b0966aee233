//! `InboxStore` and `TransactionalStore` for [`DynamoDbStore`]: one item per (message id,
//! handler key) in the inbox table, inserted with a condition so the first insert wins.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::get_item::GetItemOutput;
use aws_sdk_dynamodb::types::{Put, ReturnConsumedCapacity};
use outbox_core::rules::check_inbox_entry;
use outbox_core::{
    InboxEntry, InboxStore, InsertOutcome, Result, TransactionalStore, inbox_expiry,
};

use crate::codec::{self, EXPIRES, PK, SK, TTL, get_n, n, s};
use crate::meter::{Units, read_units, write_units};
use crate::request::{Meta, build_err, send, send_conditional};
use crate::store::DynamoDbStore;
use crate::uow::DynamoDbTx;

impl DynamoDbStore {
    /// The conditional Put of an inbox entry: absent, or present but expired.
    pub(crate) fn inbox_put(&self, entry: &InboxEntry) -> Result<Put> {
        check_inbox_entry(entry)?;
        let now = self.inner.config.clock.now();
        let expires = inbox_expiry(now, self.inner.config.inbox_retention);
        Put::builder()
            .table_name(&self.inner.inbox)
            .item(PK, s(entry.message_id.to_string()))
            .item(SK, s(&entry.handler_key))
            .item(EXPIRES, codec::micros(expires))
            .item(TTL, n(expires.timestamp().max(0)))
            .condition_expression("attribute_not_exists(#pk) OR #ex <= :now")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#ex", EXPIRES)
            .expression_attribute_values(":now", codec::micros(now))
            .build()
            .map_err(build_err)
    }
}

#[async_trait]
impl InboxStore for DynamoDbStore {
    async fn insert(&self, entry: &InboxEntry) -> Result<InsertOutcome> {
        let p = self.inbox_put(entry)?;
        let units = Units::write(write_units(codec::item_size(p.item())));
        let out = send_conditional(
            &self.inner.meter,
            "inbox_insert",
            self.inner
                .client
                .put_item()
                .table_name(p.table_name())
                .set_item(Some(p.item().clone()))
                .set_condition_expression(p.condition_expression().map(str::to_owned))
                .set_expression_attribute_names(p.expression_attribute_names().cloned())
                .set_expression_attribute_values(p.expression_attribute_values().cloned())
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                .send(),
            units,
        )
        .await?;
        Ok(if out.is_some() {
            InsertOutcome::Inserted
        } else {
            InsertOutcome::Duplicate
        })
    }

    async fn contains(&self, entry: &InboxEntry) -> Result<bool> {
        check_inbox_entry(entry)?;
        let out: GetItemOutput = send(
            &self.inner.meter,
            Meta::read("inbox_contains"),
            self.inner
                .client
                .get_item()
                .table_name(&self.inner.inbox)
                .key(PK, s(entry.message_id.to_string()))
                .key(SK, s(&entry.handler_key))
                .consistent_read(true)
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                .send(),
            |o: &GetItemOutput| Units::read(read_units(o.item().map_or(0, codec::item_size))),
        )
        .await?;
        let now = self.inner.config.clock.now().timestamp_micros();
        match out.item() {
            None => Ok(false),
            Some(item) => Ok(get_n::<i64>(item, EXPIRES)?.is_some_and(|ex| now < ex)),
        }
    }

    fn retention(&self) -> Duration {
        self.inner.config.inbox_retention
    }

    /// DynamoDB's TTL deletes expired entries (lazily); expired entries already count as
    /// absent. Returns 0.
    async fn purge_expired(&self, _limit: usize) -> Result<u64> {
        Ok(0)
    }
}

#[async_trait]
impl TransactionalStore for DynamoDbStore {
    type Tx = DynamoDbTx;

    async fn begin(&self) -> Result<DynamoDbTx> {
        Ok(self.unit_of_work())
    }
}
