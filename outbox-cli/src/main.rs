#![doc = include_str!("../README.md")]

mod backend;
#[cfg(feature = "sqlite")]
mod demo;
mod location;
mod ops;
mod output;
mod relay;
#[cfg(feature = "sqlite")]
mod store;
mod transport;
mod util;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code of `outbox status` when a `--max-age` or `--max-pending` limit is exceeded.
const EXIT_UNHEALTHY: u8 = 3;

/// Operate a transactional outbox on SQLite, PostgreSQL or DynamoDB, run its relay, or watch
/// one survive a relay crash.
#[derive(Debug, Parser)]
#[command(name = "outbox", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the outbox tables, indexes or migrations (idempotent).
    Init(ops::InitArgs),
    /// Pending, parked, dispatched in the last hour, oldest pending age, shard leases; with
    /// --max-age / --max-pending a health check (exit code 3 when exceeded).
    Status(ops::StatusArgs),
    /// List messages in store order.
    List(ops::ListArgs),
    /// Show one message with its headers, attempts and last error.
    Show(ops::ShowArgs),
    /// Return parked (dead-lettered) messages to pending.
    Requeue(ops::RequeueArgs),
    /// Delete dispatched messages older than a retention, in batches.
    Purge(ops::PurgeArgs),
    /// Publish from the store to a broker until SIGTERM or SIGINT.
    Relay(Box<relay::RelayArgs>),
    /// Run an order service and a billing service on embedded SQLite through the outbox, kill
    /// the relay mid-run, inject broker duplicates, and check that nothing was lost, nothing
    /// was applied twice and per-key order held. No external services needed.
    #[cfg(feature = "sqlite")]
    Demo(demo::DemoArgs),
}

/// Log writer that removes every known password before the line reaches stderr.
struct ScrubbedStderr;

impl Write for ScrubbedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = location::scrub(&String::from_utf8_lossy(buf));
        std::io::stderr().write_all(text.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(|| ScrubbedStderr)
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
            Command::Init(args) => ops::init(args).await.map(|()| ExitCode::SUCCESS),
            Command::Status(args) => ops::status(args).await.map(|healthy| {
                if healthy {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_UNHEALTHY)
                }
            }),
            Command::List(args) => ops::list(args).await.map(|()| ExitCode::SUCCESS),
            Command::Show(args) => ops::show(args).await.map(|()| ExitCode::SUCCESS),
            Command::Requeue(args) => ops::requeue(args).await.map(|()| ExitCode::SUCCESS),
            Command::Purge(args) => ops::purge(args).await.map(|()| ExitCode::SUCCESS),
            Command::Relay(args) => relay::run(*args).await.map(|()| ExitCode::SUCCESS),
            #[cfg(feature = "sqlite")]
            Command::Demo(args) => demo::run(args).await.map(|ok| {
                if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }),
        }
    });
    // Leave in-flight work of background tasks (exporter, listener) behind quickly.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", location::scrub(&e.to_string()));
            if let Some(hint) = e.hint_text() {
                eprintln!("hint: {}", location::scrub(hint));
            }
            ExitCode::FAILURE
        }
    }
}
