//! The one way the store talks to DynamoDB: [`metered`] sends a request, meters it (also when
//! it fails) and hands back the SDK result; [`send`] and [`send_conditional`] map its error.

use std::future::Future;

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::ConsumedCapacity;
use outbox_core::{Error, Result};

use crate::error::parse_error;
use crate::meter::{CostMeter, Units};

/// Outputs that may carry consumed capacity.
pub(crate) trait Consumed {
    /// The capacity DynamoDB reported, if any.
    fn consumed(&self) -> Vec<ConsumedCapacity>;
}

macro_rules! consumed_one {
    ($($t:ty),*) => {$(
        impl Consumed for $t {
            fn consumed(&self) -> Vec<ConsumedCapacity> {
                self.consumed_capacity().into_iter().cloned().collect()
            }
        }
    )*};
}

macro_rules! consumed_many {
    ($($t:ty),*) => {$(
        impl Consumed for $t {
            fn consumed(&self) -> Vec<ConsumedCapacity> {
                self.consumed_capacity().to_vec()
            }
        }
    )*};
}

use aws_sdk_dynamodb::operation as op;
consumed_one!(
    op::get_item::GetItemOutput,
    op::put_item::PutItemOutput,
    op::update_item::UpdateItemOutput,
    op::delete_item::DeleteItemOutput,
    op::query::QueryOutput,
    op::scan::ScanOutput
);
consumed_many!(
    op::batch_get_item::BatchGetItemOutput,
    op::batch_write_item::BatchWriteItemOutput,
    op::transact_write_items::TransactWriteItemsOutput
);

/// Whether an SDK error is a failed condition (`ConditionalCheckFailedException`).
pub(crate) fn is_condition_failed<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.code() == Some("ConditionalCheckFailedException")
}

/// Whether the meter counts an error as a failed condition: a failed single-item condition,
/// or a cancelled transaction (its conditions or conflicts failed).
fn counts_as_failed_condition<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    is_condition_failed(e) || e.code() == Some("TransactionCanceledException")
}

/// What a request is, for the meter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    /// The store operation it belongs to.
    pub op: &'static str,
    /// A write (reported capacity counts as WCU) or a read.
    pub write: bool,
}

impl Meta {
    pub(crate) fn read(op: &'static str) -> Self {
        Meta { op, write: false }
    }

    pub(crate) fn write(op: &'static str) -> Self {
        Meta { op, write: true }
    }
}

/// Send a request and meter it: on success with `on_ok(&output)`'s units and the reported
/// capacity; on a service error (a failed condition, a cancelled transaction, throttling) with
/// `on_err`'s units (DynamoDB charges a failed conditional write like the write); a request
/// that never reached DynamoDB counts as a request without units.
pub(crate) async fn metered<O, E, F>(
    meter: &CostMeter,
    meta: Meta,
    fut: F,
    on_ok: impl FnOnce(&O) -> Units,
    on_err: Units,
) -> std::result::Result<O, SdkError<E, HttpResponse>>
where
    O: Consumed,
    E: ProvideErrorMetadata,
    F: Future<Output = std::result::Result<O, SdkError<E, HttpResponse>>>,
{
    let out = fut.await;
    match &out {
        Ok(o) => meter.record(meta.op, on_ok(o), false, meta.write, &o.consumed()),
        Err(e @ SdkError::ServiceError(_)) => meter.record(
            meta.op,
            on_err,
            counts_as_failed_condition(e),
            meta.write,
            &[],
        ),
        Err(_) => meter.record(meta.op, Units::default(), false, meta.write, &[]),
    }
    out
}

/// [`metered`] with the error mapped by [`parse_error`].
pub(crate) async fn send<O, E, F>(
    meter: &CostMeter,
    meta: Meta,
    fut: F,
    on_ok: impl FnOnce(&O) -> Units,
) -> Result<O>
where
    O: Consumed,
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    F: Future<Output = std::result::Result<O, SdkError<E, HttpResponse>>>,
{
    metered(meter, meta, fut, on_ok, Units::default())
        .await
        .map_err(parse_error)
}

/// A conditional single-item write: `Some(output)` when it applied, `None` when its condition
/// failed (metered with `units` either way), other errors mapped.
pub(crate) async fn send_conditional<O, E, F>(
    meter: &CostMeter,
    op: &'static str,
    fut: F,
    units: Units,
) -> Result<Option<O>>
where
    O: Consumed,
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    F: Future<Output = std::result::Result<O, SdkError<E, HttpResponse>>>,
{
    match metered(meter, Meta::write(op), fut, |_| units, units).await {
        Ok(o) => Ok(Some(o)),
        Err(e) if is_condition_failed(&e) => Ok(None),
        Err(e) => Err(parse_error(e)),
    }
}

/// An error building a request (a missing required field: a bug, never the caller's input).
pub(crate) fn build_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> Error {
    Error::unexpected("building a DynamoDB request failed").with_source(e)
}
