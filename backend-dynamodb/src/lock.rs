//! [`DynamoDbLock`]: leases with fencing tokens on conditional writes.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::update_item::UpdateItemOutput;
use aws_sdk_dynamodb::types::{ReturnConsumedCapacity, ReturnValue};
use outbox_core::rules::{check_lease, check_lease_names, check_lease_ttl, check_name, lease_lost};
use outbox_core::{
    DateTime, DistributedLock, Error, Lease, Result, SharedClock, Utc, add_duration,
};

use crate::codec::{EXPIRES, Item, OWNER, PK, TOKEN, get_n, get_s, micros, n, s};
use crate::meter::{CostMeter, Units};
use crate::request::{Meta, send, send_conditional};

/// Leases with fencing tokens, one item per resource in the lock table.
///
/// - **Acquire** is a conditional `UpdateItem`: it succeeds if the item is absent, released
///   (no owner) or expired (`ex <= now`), sets the owner and expiry and adds 1 to the token
///   (`ADD tk 1`), so the token strictly increases across takeovers; exactly one of many
///   concurrent acquirers wins the condition. If that fails and the caller already holds an
///   unexpired lease, a second conditional update extends it with the same token.
/// - **Renew** and **release** are conditional on `owner = :me AND token = :mine`; a failed
///   condition is `LeaseLost`. Release removes the owner but keeps the token.
/// - **Expiry is judged by the client's clock** (the store's [`Clock`](outbox_core::Clock)):
///   every instance writes and compares `expires_at` from its own clock, so leases assume the
///   clocks of cooperating instances differ by much less than the lease TTL (NTP / Amazon Time
///   Sync keep EC2 hosts within milliseconds; keep TTLs in seconds or more). A holder must
///   stop acting before its own `expires_at`; fencing tokens protect downstream systems from a
///   holder that stalls past it.
#[derive(Clone)]
pub struct DynamoDbLock {
    client: Client,
    table: String,
    clock: SharedClock,
    meter: CostMeter,
}

impl std::fmt::Debug for DynamoDbLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbLock")
            .field("table", &self.table)
            .field("clock", &self.clock)
            .finish()
    }
}

fn lease_from(resource: &str, item: Option<&Item>) -> Result<Lease> {
    let item = item.ok_or_else(|| Error::unexpected("lock update returned no attributes"))?;
    let expires: i64 = get_n(item, EXPIRES)?.unwrap_or(0);
    Ok(Lease {
        resource: resource.to_owned(),
        owner: get_s(item, OWNER).unwrap_or_default().to_owned(),
        token: get_n(item, TOKEN)?.unwrap_or(0),
        expires_at: DateTime::<Utc>::from_timestamp_micros(expires)
            .ok_or_else(|| Error::unexpected("lock expiry out of range"))?,
    })
}

impl DynamoDbLock {
    /// A lock on `table` (created by [`DynamoDbStore::migrate`](crate::DynamoDbStore::migrate)),
    /// judging expiry by `clock`.
    ///
    /// Its requests are counted on a meter of its own; [`DynamoDbStore::lock`](crate::DynamoDbStore::lock)
    /// counts them on the store's ([`DynamoDbStore::meter`](crate::DynamoDbStore::meter)).
    pub fn new(client: Client, table: impl Into<String>, clock: SharedClock) -> Self {
        DynamoDbLock {
            client,
            table: table.into(),
            clock,
            meter: CostMeter::default(),
        }
    }

    /// The same lock, counting its requests on `meter` (as `lock_acquire`, `lock_renew`,
    /// `lock_release`, `lock_current`).
    pub fn with_meter(mut self, meter: CostMeter) -> Self {
        self.meter = meter;
        self
    }

    /// The meter this lock counts its requests on.
    pub fn meter(&self) -> &CostMeter {
        &self.meter
    }

    /// A conditional update of one lease item (under 1 KB: 1 WCU, also when the condition
    /// fails); `None` when the condition failed.
    async fn conditional(
        &self,
        op: &'static str,
        req: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder,
    ) -> Result<Option<UpdateItemOutput>> {
        send_conditional(
            &self.meter,
            op,
            req.return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send(),
            Units::write(1.0),
        )
        .await
    }
}

#[async_trait]
impl DistributedLock for DynamoDbLock {
    async fn acquire(&self, resource: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>> {
        check_lease_names(resource, owner)?;
        check_lease_ttl(ttl)?;
        let now = self.clock.now();
        let expires = add_duration(now, ttl);
        let take = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(PK, s(resource))
            .update_expression("SET #ow = :o, #ex = :e ADD #tk :one")
            .condition_expression(
                "attribute_not_exists(#pk) OR attribute_not_exists(#ow) OR #ex <= :now",
            )
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#ow", OWNER)
            .expression_attribute_names("#ex", EXPIRES)
            .expression_attribute_names("#tk", TOKEN)
            .expression_attribute_values(":o", s(owner))
            .expression_attribute_values(":e", micros(expires))
            .expression_attribute_values(":now", micros(now))
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::AllNew);
        if let Some(out) = self.conditional("lock_acquire", take).await? {
            return lease_from(resource, out.attributes()).map(Some);
        }
        // Held: by us (a renew with the same token) or by someone else.
        let renew = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(PK, s(resource))
            .update_expression("SET #ex = :e")
            .condition_expression("#ow = :o AND #ex > :now")
            .expression_attribute_names("#ow", OWNER)
            .expression_attribute_names("#ex", EXPIRES)
            .expression_attribute_values(":o", s(owner))
            .expression_attribute_values(":e", micros(expires))
            .expression_attribute_values(":now", micros(now))
            .return_values(ReturnValue::AllNew);
        match self.conditional("lock_acquire", renew).await? {
            Some(out) => lease_from(resource, out.attributes()).map(Some),
            None => Ok(None),
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        check_lease(lease)?;
        check_lease_ttl(ttl)?;
        let expires = add_duration(self.clock.now(), ttl);
        let req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(PK, s(&lease.resource))
            .update_expression("SET #ex = :e")
            .condition_expression("#ow = :o AND #tk = :t")
            .expression_attribute_names("#ow", OWNER)
            .expression_attribute_names("#ex", EXPIRES)
            .expression_attribute_names("#tk", TOKEN)
            .expression_attribute_values(":o", s(&lease.owner))
            .expression_attribute_values(":t", n(lease.token))
            .expression_attribute_values(":e", micros(expires))
            .return_values(ReturnValue::AllNew);
        match self.conditional("lock_renew", req).await? {
            Some(out) => lease_from(&lease.resource, out.attributes()),
            None => Err(lease_lost(lease, "it was released or taken over")),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        check_lease(lease)?;
        let req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(PK, s(&lease.resource))
            .update_expression("SET #ex = :zero REMOVE #ow")
            .condition_expression("#ow = :o AND #tk = :t")
            .expression_attribute_names("#ow", OWNER)
            .expression_attribute_names("#ex", EXPIRES)
            .expression_attribute_names("#tk", TOKEN)
            .expression_attribute_values(":o", s(&lease.owner))
            .expression_attribute_values(":t", n(lease.token))
            .expression_attribute_values(":zero", n(0));
        match self.conditional("lock_release", req).await? {
            Some(_) => Ok(()),
            None => Err(lease_lost(lease, "the caller is not the holder")),
        }
    }

    async fn current(&self, resource: &str) -> Result<Option<Lease>> {
        check_name("lease resource", resource)?;
        let req = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(PK, s(resource))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send();
        // A lease item is under 4 KB: 1 RCU, strongly consistent.
        let out = send(&self.meter, Meta::read("lock_current"), req, |_| {
            Units::read(1.0)
        })
        .await?;
        let now = self.clock.now().timestamp_micros();
        match out.item() {
            Some(item) if get_s(item, OWNER).is_some() => {
                let lease = lease_from(resource, Some(item))?;
                Ok((lease.expires_at.timestamp_micros() > now).then_some(lease))
            }
            _ => Ok(None),
        }
    }
}
