//! The scenarios, and the targets they are judged against.

mod deposit;
mod latency;
mod relay;
mod scaling;

use outbox_core::Result;

use crate::cli::{Case, Scenario};
use crate::common::Ctx;

/// Run one case of `scenario`.
pub async fn run(ctx: &mut Ctx, scenario: Scenario, case: Case) -> Result<()> {
    match scenario {
        Scenario::Deposit => deposit::run(ctx, case).await,
        Scenario::Relay => relay::run(ctx, case).await,
        Scenario::Latency => latency::run(ctx, case).await,
        Scenario::Scaling => scaling::run(ctx, case).await,
        _ => Ok(()),
    }
}

/// Progress steps of a scenario with `cases` cases (one per pass and case).
pub fn steps(scenario: Scenario, cases: usize, passes: u32) -> u64 {
    let per_case = match scenario {
        Scenario::Relay => relay::KEY_COUNTS.len() as u64,
        _ => 1,
    };
    cases as u64 * per_case * (u64::from(passes) + 1)
}

/// Judge the targets P1–P7 from the report.
pub fn judge(_ctx: &mut Ctx) {}
