//! Request and capacity accounting: every DynamoDB call the store makes is counted here, with
//! the capacity units it costs by DynamoDB's published rules (computed from the item sizes the
//! store sends and receives) and the capacity the endpoint reported
//! (`ReturnConsumedCapacity = INDEXES`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::types::ConsumedCapacity;

/// Write units of one standard write of an item of `size` bytes: 1 per started KB, at least 1.
pub fn write_units(size: usize) -> f64 {
    size.div_ceil(1024).max(1) as f64
}

/// Read units of one strongly consistent read of `size` bytes: 1 per started 4 KB, at least 1.
/// A `Query` or `Scan` sums the sizes of the items it reads before rounding.
pub fn read_units(size: usize) -> f64 {
    size.div_ceil(4096).max(1) as f64
}

/// Capacity of one request by DynamoDB's rules.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Units {
    /// Read capacity units.
    pub rcu: f64,
    /// Write capacity units.
    pub wcu: f64,
}

impl Units {
    /// Reads only.
    pub fn read(rcu: f64) -> Self {
        Units { rcu, wcu: 0.0 }
    }

    /// Writes only.
    pub fn write(wcu: f64) -> Self {
        Units { rcu: 0.0, wcu }
    }
}

/// Totals of one store operation (`commit`, `fetch_pending`, `mark_dispatched`, ...).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpCost {
    /// DynamoDB requests made (failed ones included).
    pub requests: u64,
    /// Requests whose condition failed (a failed conditional write still consumes capacity).
    pub failed_conditions: u64,
    /// Read capacity units by DynamoDB's rules, computed from the item sizes.
    pub rcu: f64,
    /// Write capacity units by DynamoDB's rules (transactional writes count twice, a failed
    /// conditional write counts like the write it attempted).
    pub wcu: f64,
    /// Read capacity units the endpoint reported (tables and indexes).
    pub reported_rcu: f64,
    /// Write capacity units the endpoint reported (tables and indexes).
    pub reported_wcu: f64,
}

/// Requests and capacity per store operation, since the store was built (or the last
/// [`CostMeter::take`]). Shared by clones of the store.
///
/// The computed figures (`rcu`, `wcu`) follow DynamoDB's published rules and do not depend
/// on the endpoint, so they are the same against moto and AWS for the same items; the
/// reported figures are whatever the endpoint returns (moto's are rough: see the crate README,
/// "Cost").
#[derive(Debug, Clone, Default)]
pub struct CostMeter {
    inner: Arc<Mutex<BTreeMap<&'static str, OpCost>>>,
}

impl CostMeter {
    pub(crate) fn record(
        &self,
        op: &'static str,
        units: Units,
        failed_condition: bool,
        write: bool,
        consumed: &[ConsumedCapacity],
    ) {
        let reported: f64 = consumed
            .iter()
            .filter_map(ConsumedCapacity::capacity_units)
            .sum();
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let e = map.entry(op).or_default();
        e.requests += 1;
        e.failed_conditions += u64::from(failed_condition);
        e.rcu += units.rcu;
        e.wcu += units.wcu;
        if write {
            e.reported_wcu += reported;
        } else {
            e.reported_rcu += reported;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_follow_dynamodb_rounding() {
        assert_eq!(write_units(0), 1.0);
        assert_eq!(write_units(1024), 1.0);
        assert_eq!(write_units(1025), 2.0);
        assert_eq!(read_units(4096), 1.0);
        assert_eq!(read_units(4097), 2.0);
    }
}
