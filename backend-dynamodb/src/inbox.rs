//! `InboxStore` and `TransactionalStore` for [`DynamoDbStore`]: one item per (message id,
//! handler key) in the inbox table, inserted with a condition so the first insert wins.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::delete_item::DeleteItemOutput;
use aws_sdk_dynamodb::operation::get_item::GetItemOutput;
use aws_sdk_dynamodb::operation::scan::ScanOutput;
use aws_sdk_dynamodb::types::{Put, ReturnConsumedCapacity};
use futures::{StreamExt, stream};
use outbox_core::rules::check_inbox_entry;
use outbox_core::{
    InboxEntry, InboxStore, InsertOutcome, Result, TransactionalStore, inbox_expiry,
};

use crate::codec::{self, EXPIRES, Item, PK, SK, TTL, get_n, n, s};
use crate::meter::{Units, read_units, write_units};
use crate::request::{Meta, build_err, send, send_conditional};
use crate::store::{DynamoDbStore, PARALLEL};
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

    /// Scans the inbox table for entries expired by this store's clock and deletes up to
    /// `limit` of them, each with a conditional `DeleteItem` (still expired), so an entry
    /// inserted again meanwhile stays and concurrent purges never count one entry twice.
    ///
    /// DynamoDB's TTL deletes expired entries for free (within days of expiry), and expired
    /// entries already count as absent, so this is optional on AWS. Its cost: the scan
    /// reads the table from the start on every call (0.5 RCU per 4 KiB read, eventually
    /// consistent), plus 1 WCU per deleted entry.
    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let now = codec::micros(self.inner.config.clock.now());
        let mut doomed: Vec<Item> = Vec::new();
        let mut start: Option<Item> = None;
        while doomed.len() < limit {
            let out: ScanOutput = send(
                &self.inner.meter,
                Meta::read("inbox_purge_expired"),
                self.inner
                    .client
                    .scan()
                    .table_name(&self.inner.inbox)
                    .filter_expression("#ex <= :now")
                    .projection_expression("#pk, #sk")
                    .expression_attribute_names("#ex", EXPIRES)
                    .expression_attribute_names("#pk", PK)
                    .expression_attribute_names("#sk", SK)
                    .expression_attribute_values(":now", now.clone())
                    .set_exclusive_start_key(start.take())
                    .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                    .send(),
                |o: &ScanOutput| {
                    Units::read(read_units(o.items().iter().map(codec::item_size).sum()) / 2.0)
                },
            )
            .await?;
            doomed.extend(out.items().iter().take(limit - doomed.len()).cloned());
            match out.last_evaluated_key() {
                Some(k) => start = Some(k.clone()),
                None => break,
            }
        }
        let deletes = doomed.into_iter().map(|key| {
            let units = Units::write(write_units(codec::item_size(&key)));
            send_conditional(
                &self.inner.meter,
                "inbox_purge_expired",
                self.inner
                    .client
                    .delete_item()
                    .table_name(&self.inner.inbox)
                    .set_key(Some(key))
                    .condition_expression("#ex <= :now")
                    .expression_attribute_names("#ex", EXPIRES)
                    .expression_attribute_values(":now", now.clone())
                    .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                    .send(),
                units,
            )
        });
        let results: Vec<Result<Option<DeleteItemOutput>>> = stream::iter(deletes)
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut purged = 0;
        for r in results {
            if r?.is_some() {
                purged += 1;
            }
        }
        Ok(purged)
    }
}

#[async_trait]
impl TransactionalStore for DynamoDbStore {
    type Tx = DynamoDbTx;

    async fn begin(&self) -> Result<DynamoDbTx> {
        Ok(self.unit_of_work())
    }
}
