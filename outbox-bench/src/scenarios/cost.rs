//! DynamoDB cost: requests and capacity per message for a standalone add, an add in a unit
//! of work with one business Put, dispatch, the relay's reads, and an idle relay's reads
//! per minute, at 256 B, 1 KiB and 4 KiB payloads.
//!
//! Counted by the backend's meter ([`outbox_dynamodb::CostMeter`]); next to it the same
//! figures on paper from DynamoDB's published rules applied to the items as stored (read
//! back after the add and after dispatch) and the tables as described, and Brighter V10's
//! figures for the same message under its schema (four indexes projecting `ALL`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::memory::MemoryBroker;
use outbox_core::{
    CancellationToken, Error, OutboxStore, Relay, RelayConfig, Result, Transaction,
    TransactionalStore,
};
use outbox_dynamodb::OpCost;
use outbox_dynamodb::aws_sdk_dynamodb::types::{AttributeValue, Put};

use crate::backends::{Backend, DynamoBackend};
use crate::cli::{Case, Word};
use crate::common::{Ctx, messages};
use crate::dynamo::{self, Item, TableDef};
use crate::report::fmt;

const SCENARIO: &str = "dynamodb-cost";

/// Payload sizes measured.
pub const PAYLOADS: [usize; 3] = [256, 1024, 4096];

/// Totals of a phase, per message.
#[derive(Debug, Clone, Copy, Default)]
struct PerMsg {
    requests: f64,
    wcu: f64,
    rcu: f64,
}

/// Whether a metered operation is one of the lease table's (`DynamoDbLock`'s).
fn is_lease(op: &str) -> bool {
    op.starts_with("lock_")
}

fn per_msg(costs: &BTreeMap<&'static str, OpCost>, n: usize, only: Option<&[&str]>) -> PerMsg {
    let n = n.max(1) as f64;
    let mut t = PerMsg::default();
    for (op, c) in costs {
        if only.is_some_and(|o| !o.contains(op)) {
            continue;
        }
        t.requests += c.requests as f64 / n;
        t.wcu += c.wcu / n;
        t.rcu += c.rcu / n;
    }
    t
}

/// Run the cost scenario.
pub async fn run(ctx: &mut Ctx, case: Case) -> Result<()> {
    if case != [Word::Dynamodb] {
        return Err(Error::invalid_input("dynamodb-cost: unknown case"));
    }
    let mut table = String::from(
        "| mode | payload | item B (ours / Brighter) | operation | requests/msg (meter) | WCU/msg meter (moto) | WCU/msg paper | RCU/msg meter (moto) | RCU/msg paper | Brighter WCU/msg paper |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for size in PAYLOADS {
        ctx.status(format!("dynamodb-cost {size} B"));
        let backend = DynamoBackend::new(ctx).await?;
        let r = measure(ctx, &backend, size, &mut table).await;
        let c = backend.cleanup().await;
        r.and(c)?;
    }
    ctx.progress.inc(1);
    ctx.report.tables.push(table);
    Ok(())
}

/// The stored queue item of the message `probe` stands for (the backend's own encoding, from
/// `message_item`): a strongly consistent Query of its shard's partition for its id.
async fn get_item(backend: &DynamoBackend, _def: &TableDef, probe: &Item) -> Result<Item> {
    let store = backend.dynamo();
    let (table, _, _) = store.table_names();
    let (Some(pk), Some(id)) = (probe.get("pk"), probe.get("i")) else {
        return Err(Error::unexpected(
            "message item without its partition or id",
        ));
    };
    let mut start = None;
    loop {
        let page = store
            .client()
            .query()
            .table_name(table)
            .consistent_read(true)
            .key_condition_expression("pk = :q")
            .filter_expression("i = :i")
            .expression_attribute_values(":q", pk.clone())
            .expression_attribute_values(":i", id.clone())
            .set_exclusive_start_key(start.take())
            .send()
            .await
            .map_err(outbox_dynamodb::parse_error)?;
        if let Some(item) = page.items().first() {
            return Ok(item.clone());
        }
        match page.last_evaluated_key() {
            Some(k) => start = Some(k.clone()),
            None => return Err(Error::unexpected("stored message item not found")),
        }
    }
}

async fn measure(
    ctx: &mut Ctx,
    backend: &DynamoBackend,
    size: usize,
    table: &mut String,
) -> Result<()> {
    let n = ctx.count(10, 2);
    let store = &backend.dynamo();
    let meter = store.meter();
    let client = store.client();
    let (outbox, _, _) = store.table_names();
    let def = dynamo::describe(client, outbox).await?;
    let business = format!("{}orders", store.config().table_prefix);
    dynamo::create_simple_table(client, &business, "id").await?;

    // Standalone adds.
    let standalone = messages("cost", n, 1_000, size)?;
    meter.take();
    for m in &standalone {
        store.add(m).await?;
    }
    let add = per_msg(&meter.take(), n, None);

    // Adds in a unit of work with one business Put each (the meter counts whole commits).
    let in_uow = messages("cost", n, 1_000, size)?;
    meter.take();
    for (i, m) in in_uow.iter().enumerate() {
        let mut uow = store.begin().await?;
        uow.put(
            Put::builder()
                .table_name(&business)
                .item("id", AttributeValue::S(format!("order-{i}")))
                .item("total", AttributeValue::N("1999".into()))
                .build()
                .map_err(|e| Error::invalid_input(e.to_string()))?,
        );
        uow.add(m).await?;
        uow.commit().await?;
    }
    let uow_costs = per_msg(&meter.take(), n, None);

    // The stored item, before and after dispatch.
    let mut probe = store.message_item(&standalone[0]);
    let shard = outbox_core::shard_for(
        standalone[0].key.as_deref(),
        &standalone[0].id,
        store.shard_count(),
    );
    probe.insert("pk".into(), AttributeValue::S(format!("q#{shard}")));
    let before = get_item(backend, &def, &probe).await?;

    // Dispatch everything with a relay: its reads, and its marks.
    let total = 2 * n;
    let broker = MemoryBroker::new();
    let relay = Relay::new(
        backend.store(),
        backend.lock(),
        Arc::new(broker.producer()),
        RelayConfig {
            lock_prefix: ctx.name("lease"),
            ..RelayConfig::default()
        },
    )?;
    meter.take();
    let mut published = 0;
    let start = Instant::now();
    while published < total as u64 {
        let report = relay.run_once().await?;
        published += report.published;
        if start.elapsed() > Duration::from_secs(120) {
            return Err(Error::unavailable(
                "dynamodb-cost: relay did not dispatch everything",
            ));
        }
    }
    let relay_costs = meter.take();
    let dispatch = per_msg(&relay_costs, total, Some(&["mark_dispatched"]));
    let (lease_costs, reads_only): (BTreeMap<_, _>, BTreeMap<_, _>) = relay_costs
        .into_iter()
        .filter(|(op, _)| *op != "mark_dispatched")
        .partition(|(op, _)| is_lease(op));
    let reads = per_msg(&reads_only, total, None);
    let leases = per_msg(&lease_costs, total, None);
    let after = get_item(backend, &def, &probe).await?;

    // Idle: a running relay with nothing to do (measured at 1 KiB; it does not depend on
    // the payload).
    let idle = if size == 1024 {
        let secs = if ctx.quick { 1.5 } else { 10.0 };
        let shutdown = CancellationToken::new();
        let idle_relay = Relay::new(
            backend.store(),
            backend.lock(),
            Arc::new(broker.producer()),
            RelayConfig {
                lock_prefix: ctx.name("lease"),
                ..RelayConfig::default()
            },
        )?;
        let task = idle_relay.spawn(shutdown.clone());
        tokio::time::sleep(Duration::from_millis(500)).await; // leases taken
        meter.take();
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        let costs = meter.take();
        shutdown.cancel();
        task.await
            .map_err(|e| Error::unexpected("relay task failed").with_source(e))??;
        let per_minute = |m: PerMsg| PerMsg {
            requests: m.requests * 60.0 / secs,
            wcu: m.wcu * 60.0 / secs,
            rcu: m.rcu * 60.0 / secs,
        };
        let (lease_ops, store_ops): (BTreeMap<_, _>, BTreeMap<_, _>) =
            costs.into_iter().partition(|(op, _)| is_lease(op));
        // On paper: every read returns nothing (1 RCU, strongly consistent) and every write
        // (the cursor items of the queue) is under 1 KB (1 WCU).
        let requests_where = |write: bool| -> f64 {
            store_ops
                .values()
                .filter(|c| (c.wcu > 0.0) == write)
                .map(|c| c.requests as f64 * 60.0 / secs)
                .sum()
        };
        let paper = (requests_where(true), requests_where(false)); // (WCU, RCU) per minute
        Some((
            per_minute(per_msg(&store_ops, 1, None)),
            paper,
            per_minute(per_msg(&lease_ops, 1, None)),
        ))
    } else {
        None
    };
    dynamo::delete_tables(client, &[&business]).await?;

    // Paper figures.
    // Every add is one TransactWriteItems: the queue item (the whole message) and a small id
    // guard item (< 1 KB, 2 WCU transactional), after a strongly consistent read of the
    // shard's tail (the last queue item and the shard's meta item, about 1 RCU).
    let (guard_wcu, counter_rcu) = (2.0, 1.0);
    let paper_add = dynamo::put_wcu(&def, &before, true) + guard_wcu;
    let paper_uow = paper_add;
    let paper_dispatch = dynamo::update_wcu(&def, &before, &after);
    // The relay reads each shard's queue with a strongly consistent Query that returns the
    // message items themselves: a Query is billed by the bytes it returns in 4 KB units,
    // rounded up, at least 1 RCU (0.5 only for eventually consistent reads). With the
    // messages spread one per shard, each one costs its own item's units and every other
    // read request (empty queries, meta items) 1 RCU.
    let item_rcu = dynamo::rcu(dynamo::size(&before));
    let paper_reads = (reads.requests - 1.0).max(0.0) + item_rcu;
    let bt = dynamo::brighter_table();
    let (b_before, b_after) = dynamo::brighter_items(&standalone[0]);
    let b_add = dynamo::put_wcu(&bt, &b_before, false);
    let b_uow = dynamo::put_wcu(&bt, &b_before, true);
    let b_dispatch = dynamo::update_wcu(&bt, &b_before, &b_after);

    let mode_name = "queue (v2)";
    let sizes = format!("{} / {}", dynamo::size(&before), dynamo::size(&b_before));
    let mut line = |op: &str, m: PerMsg, wcu_paper: String, rcu_paper: String, brighter: String| {
        let _ = writeln!(
            table,
            "| {mode_name} | {size} B | {sizes} | {op} | {} | {} | {wcu_paper} | {} | {rcu_paper} | {brighter} |",
            fmt(m.requests),
            fmt(m.wcu),
            fmt(m.rcu)
        );
    };
    line(
        "add, standalone",
        add,
        fmt(paper_add),
        fmt(counter_rcu),
        fmt(b_add),
    );
    line(
        "add in a unit of work (+1 business Put)",
        uow_costs,
        fmt(paper_uow),
        fmt(counter_rcu),
        fmt(b_uow),
    );
    line(
        "dispatch (relay's mark)",
        dispatch,
        fmt(paper_dispatch),
        "0".into(),
        fmt(b_dispatch),
    );
    line(
        "relay's reads",
        reads,
        "0".into(),
        format!("≈ {}", fmt(paper_reads)),
        "—".into(),
    );
    // A lease item is under 1 KB: every conditional write on it is 1 WCU, applied or not.
    line(
        "relay's leases (acquire, renew, release)",
        leases,
        fmt(leases.requests),
        "0".into(),
        "—".into(),
    );
    if let Some((store_ops, (paper_wcu, paper_rcu), leases)) = idle {
        line(
            "idle relay's queue reads and cursor writes, per minute",
            store_ops,
            fmt(paper_wcu),
            fmt(paper_rcu),
            "—".into(),
        );
        line(
            "idle relay's leases, per minute",
            leases,
            fmt(leases.requests),
            "0".into(),
            "—".into(),
        );
    }
    let ours = paper_uow + paper_dispatch;
    let theirs = b_uow + b_dispatch;
    let label = format!("{size} B payload");
    let r = &mut ctx.report;
    r.add(
        SCENARIO,
        &label,
        "add + dispatch in a unit of work, paper",
        "WCU/msg",
        &[ours],
    );
    r.add(
        SCENARIO,
        &label,
        "Brighter V10, same message, paper",
        "WCU/msg",
        &[theirs],
    );
    r.add(SCENARIO, &label, "ours / Brighter", "×", &[ours / theirs]);
    Ok(())
}
