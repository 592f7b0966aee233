#![doc = include_str!("../README.md")]

mod backends;
mod brokers;
mod cli;
mod common;
mod dynamo;
mod layers;
mod raw;
mod report;
mod scenarios;
mod stats;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::{Cli, case_label};
use crate::common::Ctx;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Smoke mode: one measured pass after the warm-up.
    let passes = if cli.quick { 1 } else { cli.passes };
    let plan = match cli::plan(cli.scenario, &cli.filters) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("outbox-bench: {e}");
            return ExitCode::from(2);
        }
    };
    // A bar only for a person watching: stderr a terminal, stdout not redirected, no JSON.
    let interactive =
        std::io::stderr().is_terminal() && std::io::stdout().is_terminal() && cli.json.is_none();
    let steps: u64 = plan
        .runs
        .iter()
        .map(|(s, cases)| scenarios::steps(*s, cases.len(), passes))
        .sum();
    let progress = if interactive {
        let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut ctx = Ctx::new(cli.quick, passes, progress);
    ctx.marks = !interactive;
    let started = ctx.started;
    for (scenario, cases) in &plan.runs {
        for case in cases {
            let what = format!("{} {}", scenario.name(), case_label(case));
            ctx.status(what.clone());
            let t = Instant::now();
            if let Err(e) = scenarios::run(&mut ctx, *scenario, case).await {
                let msg = format!("{what}: {e}");
                ctx.progress
                    .suspend(|| eprintln!("outbox-bench: FAILED {msg}"));
                ctx.report.failures.push(msg);
            } else if !interactive {
                eprintln!(
                    "outbox-bench: {what} done in {:.1} s (from {:.1} s to {:.1} s of the run)",
                    t.elapsed().as_secs_f64(),
                    t.duration_since(started).as_secs_f64(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    scenarios::judge(&mut ctx);
    ctx.progress.finish_and_clear();
    ctx.report.notes.push(format!(
        "run {} took {:.0} s{}",
        ctx.run_id,
        started.elapsed().as_secs_f64(),
        if ctx.quick {
            " (--quick: tiny counts, targets not judged)"
        } else {
            ""
        }
    ));
    print!("{}", ctx.report.markdown());
    if let Some(path) = &cli.json {
        let written = serde_json::to_vec_pretty(&ctx.report)
            .map_err(|e| e.to_string())
            .and_then(|json| std::fs::write(path, json).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("outbox-bench: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if ctx.report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
