#![doc = include_str!("../README.md")]

mod check;
mod ctx;
mod env;
mod fuzz;
mod private;
mod procs;
mod report;
mod restarts;
mod scenarios;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::ctx::{Ctx, Scenario};
use crate::env::Pair;
use crate::report::Row;

/// Fault suite: kills, pauses and races real `outbox relay` and `InboxProcessor` processes
/// against the real local services, and counts every message end to end.
#[derive(Debug, Parser)]
#[command(name = "outbox-chaos", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Args)]
struct RunArgs {
    /// Fewer messages and faults (the CI run).
    #[arg(long)]
    quick: bool,
    /// Only this pair (default: every pair the scenario runs on).
    #[arg(long, value_enum)]
    pair: Option<Pair>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The `outbox` binary (default: `outbox` next to this executable).
    #[arg(long)]
    outbox_bin: Option<PathBuf>,
    /// Seed of the random choices (kill moments, victims); random by default, printed.
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the child processes' logs (their directory is printed).
    #[arg(long)]
    keep_logs: bool,
    /// With `all`: leave out this scenario (repeatable), e.g. one that fails on a known bug.
    #[arg(long, value_enum)]
    skip: Vec<Scenario>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Every implemented scenario on every pair it runs on.
    All(RunArgs),
    /// 1: relays SIGKILLed at random moments and restarted, at times 2–3 at once.
    RelayCrash(RunArgs),
    /// 2: a relay SIGSTOPped past its lease, another takes over, then SIGCONT.
    RelayPause(RunArgs),
    /// 5: four relays, no faults: nothing published twice.
    RacingRelays(RunArgs),
    /// 6: InboxProcessor processes SIGKILLed mid-handler: one effect per message.
    ConsumerCrash(RunArgs),
    /// 7: unroutable messages are parked, their keys held back, then requeued in order.
    Poison(RunArgs),
    /// 3: a private RabbitMQ node stopped and killed mid-run: publishing resumes by itself.
    BrokerRestart(RunArgs),
    /// 4: a private PostgreSQL cluster restarted and its sessions terminated mid-run.
    DbRestart(RunArgs),
    /// 8: two relays whose clocks differ, below and above the clock-skew margin.
    ClockSkew(RunArgs),
    /// Build the cargo-fuzz targets (fuzz/) and run each for --seconds; fails on a crash.
    Fuzz(fuzz::FuzzArgs),
    /// A consumer process for consumer-crash (internal).
    #[command(hide = true)]
    InboxWorker(worker::WorkerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The library's own logs of this process (the checking consumer, the writers), e.g.
    // OUTBOX_CHAOS_LOG=outbox_rabbitmq=info; off by default.
    if let Ok(filter) = std::env::var("OUTBOX_CHAOS_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (scenarios, args) = match cli.command {
        Cmd::InboxWorker(args) => {
            return match runtime.block_on(Box::pin(worker::worker(args))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Cmd::Fuzz(args) => return fuzz::run(args),
        Cmd::All(a) => (Scenario::ALL.to_vec(), a),
        Cmd::RelayCrash(a) => (vec![Scenario::RelayCrash], a),
        Cmd::RelayPause(a) => (vec![Scenario::RelayPause], a),
        Cmd::RacingRelays(a) => (vec![Scenario::RacingRelays], a),
        Cmd::ConsumerCrash(a) => (vec![Scenario::ConsumerCrash], a),
        Cmd::Poison(a) => (vec![Scenario::Poison], a),
        Cmd::BrokerRestart(a) => (vec![Scenario::BrokerRestart], a),
        Cmd::DbRestart(a) => (vec![Scenario::DbRestart], a),
        Cmd::ClockSkew(a) => (vec![Scenario::ClockSkew], a),
    };
    // Boxed: in debug builds the AWS SDK's futures are large, and a future nested this deep
    // would not fit on the main thread's stack.
    match runtime.block_on(Box::pin(run(scenarios, args))) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(scenarios: Vec<Scenario>, args: RunArgs) -> outbox_core::Result<bool> {
    let bin = procs::outbox_bin(args.outbox_bin.as_deref())?;
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let logs = tempfile::Builder::new()
        .prefix("outbox-chaos-logs-")
        .tempdir()
        .map_err(|e| outbox_core::Error::unexpected("creating a log dir").with_source(e))?;
    eprintln!(
        "outbox-chaos: seed {seed}{}; relay binary {}; logs in {}",
        if args.quick { ", quick" } else { "" },
        bin.display(),
        logs.path().display()
    );
    let mut ctx = Ctx::new(args.quick, seed, bin, logs.path().to_path_buf());
    let started = std::time::Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    for s in scenarios {
        if args.skip.contains(&s) {
            eprintln!("== {} skipped (--skip)", s.name());
            continue;
        }
        let pairs: Vec<Pair> = match args.pair {
            Some(p) => {
                if !s.pairs().contains(&p) {
                    if args.pair.is_some() && rows.is_empty() && s.pairs().len() < 3 {
                        eprintln!("== {} does not run on {} (skipped)", s.name(), p.name());
                    }
                    continue;
                }
                vec![p]
            }
            None => s.pairs().to_vec(),
        };
        for p in pairs {
            rows.push(scenarios::run(&mut ctx, s, p).await);
        }
    }
    if rows.is_empty() {
        return Err(outbox_core::Error::invalid_input(
            "nothing to run: the scenario does not run on that pair",
        ));
    }
    let all_passed = rows.iter().all(|r| r.passed);
    println!("{}", report::markdown(&rows));
    println!(
        "seed {seed}; {:.0}s in total; {}",
        started.elapsed().as_secs_f64(),
        if all_passed {
            "every check passed"
        } else {
            "SOME CHECKS FAILED"
        }
    );
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "seed": seed,
            "quick": args.quick,
            "seconds": started.elapsed().as_secs_f64(),
            "passed": all_passed,
            "results": rows,
        });
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| outbox_core::Error::unexpected("encoding JSON").with_source(e))?;
        std::fs::write(path, text).map_err(|e| {
            outbox_core::Error::unexpected(format!("writing {}", path.display())).with_source(e)
        })?;
    }
    if args.keep_logs || !all_passed {
        let kept = logs.keep();
        eprintln!("logs kept in {}", kept.display());
    }
    Ok(all_passed)
}
