//! Request and capacity accounting: every DynamoDB call the store makes is counted here, with
//! the capacity DynamoDB reported (`ReturnConsumedCapacity = INDEXES`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::types::ConsumedCapacity;

/// Totals of one store operation (`add`, `commit`, `fetch_pending`, `mark_dispatched`, ...).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpCost {
    /// DynamoDB requests made.
    pub requests: u64,
    /// Read capacity units DynamoDB reported (table and indexes).
    pub reported_rcu: f64,
    /// Write capacity units DynamoDB reported (table and indexes).
    pub reported_wcu: f64,
}

/// Requests and reported capacity per store operation, since the store was built (or the last
/// [`CostMeter::take`]). Shared by clones of the store.
///
/// The reported figures are whatever the endpoint returns: real DynamoDB reports exact units
/// (tables and indexes); moto reports rough or no figures (see the crate README, "Cost").
#[derive(Debug, Clone, Default)]
pub struct CostMeter {
    inner: Arc<Mutex<BTreeMap<&'static str, OpCost>>>,
}

impl CostMeter {
    pub(crate) fn record(&self, op: &'static str, write: bool, consumed: &[ConsumedCapacity]) {
        let units: f64 = consumed
            .iter()
            .filter_map(ConsumedCapacity::capacity_units)
            .sum();
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let e = map.entry(op).or_default();
        e.requests += 1;
        if write {
            e.reported_wcu += units;
        } else {
            e.reported_rcu += units;
        }
    }

    pub(crate) fn record_one(
        &self,
        op: &'static str,
        write: bool,
        consumed: Option<&ConsumedCapacity>,
    ) {
        self.record(op, write, consumed.map(std::slice::from_ref).unwrap_or(&[]));
    }

    /// A copy of the totals.
    pub fn snapshot(&self) -> BTreeMap<&'static str, OpCost> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The totals, resetting them to zero.
    pub fn take(&self) -> BTreeMap<&'static str, OpCost> {
        std::mem::take(&mut *self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
