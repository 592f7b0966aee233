//! The inbox operations of a [`Core`] behind `InboxStore` for
//! [`DynamoDbStore`](crate::DynamoDbStore): one item per (message id, handler key) in the
//! inbox table, inserted with a condition so the first insert wins.

use aws_sdk_dynamodb::operation::delete_item::DeleteItemOutput;
use aws_sdk_dynamodb::operation::get_item::GetItemOutput;
use aws_sdk_dynamodb::operation::scan::ScanOutput;
use aws_sdk_dynamodb::types::{Put, ReturnConsumedCapacity};
use futures::{StreamExt, stream};
use outbox_core::rules::check_inbox_entry;
use outbox_core::{InboxEntry, InsertOutcome, Result, inbox_expiry};

use crate::codec::{self, EXPIRES, Item, PK, SK, TTL, get_n, n, s};
use crate::core::{Core, PARALLEL};
use crate::meter::{Units, read_units, write_units};
use crate::request::{Meta, build_err, send, send_conditional};

impl Core {
    /// The conditional Put of an inbox entry: absent, or present but expired.
    pub(crate) fn inbox_put(&self, entry: &InboxEntry) -> Result<Put> {
        check_inbox_entry(entry)?;
        let now = self.config.clock.now();
        let expires = inbox_expiry(now, self.config.inbox_retention);
        Put::builder()
            .table_name(&self.inbox)
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

/// `InboxStore` for [`DynamoDbStore`](crate::DynamoDbStore).
impl Core {
    pub(crate) async fn inbox_insert(&self, entry: &InboxEntry) -> Result<InsertOutcome> {
        let p = self.inbox_put(entry)?;
        let units = Units::write(write_units(codec::item_size(p.item())));
        let out = send_conditional(
            &self.meter,
            "inbox_insert",
            self.client
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

    pub(crate) async fn inbox_contains(&self, entry: &InboxEntry) -> Result<bool> {
        check_inbox_entry(entry)?;
        let out: GetItemOutput = send(
            &self.meter,
            Meta::read("inbox_contains"),
            self.client
                .get_item()
                .table_name(&self.inbox)
                .key(PK, s(entry.message_id.to_string()))
                .key(SK, s(&entry.handler_key))
                .consistent_read(true)
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                .send(),
            |o: &GetItemOutput| Units::read(read_units(o.item().map_or(0, codec::item_size))),
        )
        .await?;
        let now = self.config.clock.now().timestamp_micros();
        match out.item() {
            None => Ok(false),
            Some(item) => Ok(get_n::<i64>(item, EXPIRES)?.is_some_and(|ex| now < ex)),
        }
    }

    /// The body of `InboxStore::purge_expired` (see there).
    pub(crate) async fn inbox_purge_expired(&self, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let now = codec::micros(self.config.clock.now());
        let mut doomed: Vec<Item> = Vec::new();
        let mut start: Option<Item> = None;
        while doomed.len() < limit {
            let out: ScanOutput = send(
                &self.meter,
                Meta::read("inbox_purge_expired"),
                self.client
                    .scan()
                    .table_name(&self.inbox)
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
                &self.meter,
                "inbox_purge_expired",
                self.client
                    .delete_item()
                    .table_name(&self.inbox)
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
