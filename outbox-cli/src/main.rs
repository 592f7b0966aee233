#![doc = include_str!("../README.md")]

mod demo;
mod ops;
mod store;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Operate a transactional outbox, or watch one survive a relay crash.
#[derive(Debug, Parser)]
#[command(name = "outbox", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an order service and a billing service on embedded SQLite through the outbox, kill
    /// the relay mid-run, inject broker duplicates, and check that nothing was lost, nothing
    /// was applied twice and per-key order held. No external services needed.
    Demo(demo::DemoArgs),
    /// Create the outbox tables in a SQLite file.
    Init(ops::InitArgs),
    /// Show pending and parked counts and the age of the oldest pending message.
    Status(ops::StatusArgs),
    /// List messages, one per line, in store order.
    List(ops::ListArgs),
    /// Return parked (dead-lettered) messages to pending.
    Requeue(ops::RequeueArgs),
    /// Delete dispatched messages older than a retention, in batches.
    Purge(ops::PurgeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Init(args) => ops::init(args).await.map(|()| true),
            Command::Status(args) => ops::status(args).await.map(|()| true),
            Command::List(args) => ops::list(args).await.map(|()| true),
            Command::Requeue(args) => ops::requeue(args).await.map(|()| true),
            Command::Purge(args) => ops::purge(args).await.map(|()| true),
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
