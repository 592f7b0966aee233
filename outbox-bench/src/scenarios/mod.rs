//! The scenarios, and the targets they are judged against.

mod consumer;
mod cost;
mod deposit;
mod latency;
mod relay;
mod scaling;

use outbox_core::Result;

use crate::cli::{Case, Scenario};
use crate::common::Ctx;
use crate::report::{TargetResult, fmt};

/// Run one case of `scenario`.
pub async fn run(ctx: &mut Ctx, scenario: Scenario, case: Case) -> Result<()> {
    match scenario {
        Scenario::Deposit => deposit::run(ctx, case).await,
        Scenario::Relay => relay::run(ctx, case).await,
        Scenario::Latency => latency::run(ctx, case).await,
        Scenario::Scaling => scaling::run(ctx, case).await,
        Scenario::DynamodbCost => cost::run(ctx, case).await,
        Scenario::Consumer => consumer::run(ctx, case).await,
    }
}

/// Progress steps of a scenario with `cases` cases (one per pass and case).
pub fn steps(scenario: Scenario, cases: usize, passes: u32) -> u64 {
    let per_case = match scenario {
        Scenario::Relay => relay::KEY_COUNTS.len() as u64,
        _ => 1,
    };
    if scenario == Scenario::DynamodbCost {
        return cases as u64 * per_case; // one pass: meter counts do not vary
    }
    cases as u64 * per_case * (u64::from(passes) + 1)
}

/// One figure a target is judged on: (scenario, case, quantity), and the bound.
struct Check {
    scenario: &'static str,
    case: &'static str,
    quantity: &'static str,
    bound: Bound,
}

#[derive(Clone, Copy)]
enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

const fn at_least(
    scenario: &'static str,
    case: &'static str,
    quantity: &'static str,
    v: f64,
) -> Check {
    Check {
        scenario,
        case,
        quantity,
        bound: Bound::AtLeast(v),
    }
}

const fn at_most(
    scenario: &'static str,
    case: &'static str,
    quantity: &'static str,
    v: f64,
) -> Check {
    Check {
        scenario,
        case,
        quantity,
        bound: Bound::AtMost(v),
    }
}

/// The targets, each with the medians it is judged on.
const TARGETS: &[(&str, &str, &[Check])] = &[
    (
        "P1",
        "relay ≥ 0.8× min(raw broker, raw store), PostgreSQL→RabbitMQ and →Kafka, 1,000 keys",
        &[
            at_least(
                "relay",
                "postgres→rabbitmq, 1000 keys",
                "relay / min(i, ii)",
                0.8,
            ),
            at_least(
                "relay",
                "postgres→kafka, 1000 keys",
                "relay / min(i, ii)",
                0.8,
            ),
        ],
    ),
    (
        "P2",
        "deposit b/c ≤ 1.05 on PostgreSQL",
        &[at_most("deposit", "postgres", "b/c", 1.05)],
    ),
    (
        "P3",
        "commit→confirm p99 ≤ 10 ms with notify; ≤ 50 ms with LISTEN/NOTIFY only",
        &[
            at_most("latency", "postgres→rabbitmq", "notify: p99", 10.0),
            at_most("latency", "postgres→kafka", "notify: p99", 10.0),
            at_most(
                "latency",
                "postgres→rabbitmq",
                "LISTEN/NOTIFY only: p99",
                50.0,
            ),
            at_most("latency", "postgres→kafka", "LISTEN/NOTIFY only: p99", 50.0),
        ],
    ),
    (
        "P4",
        "DynamoDB default mode ≤ 0.5× Brighter's WCU per message, add + dispatch in a unit of work, each payload size",
        &[
            at_most("dynamodb-cost", "256 B payload", "ours / Brighter", 0.5),
            at_most("dynamodb-cost", "1024 B payload", "ours / Brighter", 0.5),
            at_most("dynamodb-cost", "4096 B payload", "ours / Brighter", 0.5),
        ],
    ),
    (
        "P5",
        "4 relays ≥ 3.5× one under 5 ms publish latency",
        &[at_least(
            "scaling",
            "postgres→rabbitmq, 5 ms publish latency, 1000 keys",
            "speedup 4 vs 1",
            3.5,
        )],
    ),
    (
        "P6",
        "SQLite → in-memory ≥ 50k msg/s (1,000 keys)",
        &[at_least(
            "relay",
            "sqlite→memory, 1000 keys",
            "relay",
            50_000.0,
        )],
    ),
    (
        "P7",
        "InboxProcessor ≥ 0.8× the hand-written consumer loop",
        &[
            at_least(
                "consumer",
                "postgres→rabbitmq, 1000 keys",
                "InboxProcessor / hand-written",
                0.8,
            ),
            at_least(
                "consumer",
                "postgres→kafka, 1000 keys",
                "InboxProcessor / hand-written",
                0.8,
            ),
        ],
    ),
];

/// Judge the targets P1–P7 from the medians in the report. In quick mode, or when a
/// figure is missing (its case did not run), a target is shown but not judged.
pub fn judge(ctx: &mut Ctx) {
    let mut results = Vec::new();
    for (id, target, checks) in TARGETS {
        let mut figures = Vec::new();
        let mut met = Some(true);
        for c in *checks {
            match ctx.report.median(c.scenario, c.case, c.quantity) {
                Some(v) => {
                    let ok = match c.bound {
                        Bound::AtLeast(b) => v >= b,
                        Bound::AtMost(b) => v <= b,
                    };
                    met = met.map(|m| m && ok);
                    figures.push(format!("{} {}: {}", c.case, c.quantity, fmt(v)));
                }
                None => {
                    met = None;
                    figures.push(format!("{} {}: not run", c.case, c.quantity));
                }
            }
        }
        results.push(TargetResult {
            id,
            target,
            figure: figures.join("; "),
            met: if ctx.quick { None } else { met },
        });
    }
    ctx.report.targets = results;
}
