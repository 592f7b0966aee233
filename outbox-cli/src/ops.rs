//! Operator commands on any store: `init`, `status`, `list`, `show`, `requeue`, `purge`.
//!
//! They go through the `OutboxStore` and `DistributedLock` traits only; [`backend`] opens the
//! store named by the URL.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::time::Duration;

use clap::{ArgGroup, Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use outbox_core::{ListQuery, MessageId, MessageStatus, RelayConfig, RequeueFilter, Utc};

use crate::backend::{self, Mode, Opened};
use crate::location::StoreLocation;
use crate::output::{MessageJson, ShardJson, StatusJson, Table, seconds, ts};
use crate::util::{CliError, CliResult, Context, human_duration, out, parse_duration};

/// Where the outbox lives.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// The store: sqlite://PATH[?prefix=P], postgres://USER:PASS@HOST/DB[?schema=S&prefix=P],
    /// dynamodb://?region=R&endpoint=URL&prefix=P.
    // A String, not a clap value parser: clap would echo a rejected value, password included.
    #[arg(long, value_name = "URL", env = "OUTBOX_STORE", hide_env_values = true)]
    pub store: String,
}

impl StoreArgs {
    /// The parsed location.
    pub fn location(&self) -> CliResult<StoreLocation> {
        StoreLocation::parse(&self.store)
    }

    /// Open the existing outbox (a missing table is an error naming `outbox init`).
    pub async fn open(&self) -> CliResult<(StoreLocation, Opened)> {
        let location = self.location()?;
        let opened = backend::open(&location, Mode::Existing).await?;
        Ok((location, opened))
    }
}

/// `outbox init`: create the tables, indexes or migrations, idempotently.
#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    #[command(flatten)]
    store: StoreArgs,
}

/// `outbox status`: counts, ages and shard leases; optionally a health check.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Unhealthy (exit code 3) when the oldest pending message is older than this (e.g. 30s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    max_age: Option<Duration>,
    /// Unhealthy (exit code 3) when more messages than this are pending.
    #[arg(long, value_name = "N")]
    max_pending: Option<u64>,
    /// Prefix of the relay's lease names (the relay's `lock_prefix`).
    #[arg(long, value_name = "PREFIX", default_value_t = RelayConfig::default().lock_prefix)]
    lock_prefix: String,
}

/// A message state as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    /// Waiting to be published.
    Pending,
    /// Published and confirmed by the broker.
    Dispatched,
    /// Dead-lettered after too many failures.
    Parked,
}

impl From<StateArg> for MessageStatus {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Pending => MessageStatus::Pending,
            StateArg::Dispatched => MessageStatus::Dispatched,
            StateArg::Parked => MessageStatus::Parked,
        }
    }
}

/// `outbox list`: messages in store order.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Only messages in this state.
    #[arg(long, value_enum)]
    state: Option<StateArg>,
    /// Only messages of this topic.
    #[arg(long, value_name = "TOPIC")]
    topic: Option<String>,
    /// Only messages with this key.
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// At most this many messages.
    #[arg(long, default_value_t = 100, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    limit: u32,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

/// `outbox show`: one message with its headers, attempts and last error.
#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The message id.
    #[arg(value_name = "ID", value_parser = parse_id)]
    id: MessageId,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// `outbox requeue`: return parked messages to pending.
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["ids", "all_parked"])))]
pub struct RequeueArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Requeue these parked messages.
    #[arg(value_name = "ID", value_parser = parse_id)]
    ids: Vec<MessageId>,
    /// Requeue every parked message (of `--topic` if given).
    #[arg(long)]
    all_parked: bool,
    /// With `--all-parked`: only parked messages of this topic.
    #[arg(long, value_name = "TOPIC", requires = "all_parked")]
    topic: Option<String>,
    /// Messages requeued per store call.
    #[arg(long, default_value_t = 500, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: u32,
}

/// `outbox purge`: delete dispatched messages older than a retention, in batches.
#[derive(Debug, Clone, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Delete dispatched messages whose dispatch is older than this (e.g. 30s, 15m, 7d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    dispatched_older_than: Duration,
    /// Messages deleted per store call.
    #[arg(long, default_value_t = 1000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    batch: u32,
}

fn parse_id(s: &str) -> Result<MessageId, String> {
    s.parse::<MessageId>().map_err(|e| e.message().to_owned())
}

/// Run `outbox init`.
pub async fn init(args: InitArgs) -> CliResult<()> {
    let location = args.store.location()?;
    if let StoreLocation::Sqlite { path, .. } = &location
        && let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        return Err(CliError::new(format!(
            "directory {} does not exist",
            parent.display()
        )));
    }
    let opened = backend::open(&location, Mode::Init).await?;
    out(format_args!(
        "outbox tables ready at {location} ({} shards)",
        opened.store.shard_count()
    ));
    Ok(())
}

/// Run `outbox status`; `Ok(false)` when a health limit is exceeded.
pub async fn status(args: StatusArgs) -> CliResult<bool> {
    let (location, opened) = args.store.open().await?;
    let stats = opened.store.stats().await.context("reading outbox stats")?;
    let since = Utc::now() - Duration::from_secs(3600);
    let dispatched = opened
        .store
        .dispatched_since(since)
        .await
        .context("counting dispatched messages")?;
    let shards = futures::future::try_join_all((0..opened.store.shard_count()).map(|shard| {
        let resource = outbox_core::shard_lease_name(&args.lock_prefix, shard);
        let lock = opened.lock.clone();
        async move {
            let lease = lock.current(&resource).await?;
            Ok::<_, outbox_core::Error>(ShardJson::new(shard, resource, lease.as_ref()))
        }
    }))
    .await
    .context("reading shard leases")?;

    let mut problems = Vec::new();
    if let (Some(max), Some(age)) = (args.max_age, stats.oldest_pending_age)
        && age > max
    {
        problems.push(format!(
            "the oldest pending message is {} old (--max-age {})",
            human_duration(age),
            human_duration(max)
        ));
    }
    if let Some(max) = args.max_pending
        && stats.pending > max
    {
        problems.push(format!(
            "{} messages are pending (--max-pending {max})",
            stats.pending
        ));
    }
    let report = StatusJson {
        store: location.to_string(),
        pending: stats.pending,
        parked: stats.parked,
        dispatched_last_hour: dispatched,
        oldest_pending_age_seconds: stats.oldest_pending_age.map(seconds),
        shards,
        healthy: problems.is_empty(),
        problems,
    };
    if args.json {
        out(format_args!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(json_error)?
        ));
    } else {
        print_status(&report, stats.oldest_pending_age);
    }
    for p in &report.problems {
        eprintln!("unhealthy: {p}");
    }
    Ok(report.healthy)
}

fn print_status(report: &StatusJson, oldest: Option<Duration>) {
    out(format_args!("store:                {}", report.store));
    out(format_args!("pending:              {}", report.pending));
    out(format_args!("parked:               {}", report.parked));
    out(format_args!(
        "dispatched last hour: {}",
        report
            .dispatched_last_hour
            .map_or_else(|| "n/a".to_owned(), |n| n.to_string())
    ));
    out(format_args!(
        "oldest pending age:   {}",
        oldest.map_or_else(|| "-".to_owned(), human_duration)
    ));
    let held = report.shards.iter().filter(|s| s.owner.is_some()).count();
    out(format_args!(
        "shard leases:         {held} of {} held",
        report.shards.len()
    ));
    let mut table = Table::new(&["SHARD", "OWNER", "TOKEN", "EXPIRES"]);
    for s in &report.shards {
        table.row(vec![
            s.shard.to_string(),
            s.owner.clone().unwrap_or_else(|| "-".to_owned()),
            s.token.map_or_else(|| "-".to_owned(), |t| t.to_string()),
            s.expires_at.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    for line in table.render().lines() {
        out(format_args!("  {line}"));
    }
}

/// Run `outbox list`.
pub async fn list(args: ListArgs) -> CliResult<()> {
    let (_, opened) = args.store.open().await?;
    let messages = opened
        .list(&ListQuery {
            status: args.state.map(MessageStatus::from),
            topic: args.topic.clone(),
            key: args.key.clone(),
            limit: args.limit as usize,
        })
        .await
        .context("listing messages")?;
    if args.json {
        let docs: Vec<MessageJson> = messages.iter().map(MessageJson::from).collect();
        out(format_args!(
            "{}",
            serde_json::to_string_pretty(&docs).map_err(json_error)?
        ));
        return Ok(());
    }
    let mut table = Table::new(&[
        "ID",
        "STATE",
        "TOPIC",
        "KEY",
        "ATTEMPTS",
        "CREATED",
        "LAST ERROR",
    ]);
    for m in &messages {
        table.row(vec![
            m.message.id.to_string(),
            m.status.as_str().to_owned(),
            m.message.topic.clone(),
            m.message.key.clone().unwrap_or_else(|| "-".to_owned()),
            m.attempts.to_string(),
            ts(m.message.created_at),
            m.last_error.clone().unwrap_or_default(),
        ]);
    }
    out(table.render().trim_end());
    if messages.is_empty() {
        eprintln!("no matching messages");
    }
    Ok(())
}

/// Run `outbox show`.
pub async fn show(args: ShowArgs) -> CliResult<()> {
    let (_, opened) = args.store.open().await?;
    let Some(m) = opened
        .store
        .get(args.id)
        .await
        .context("reading the message")?
    else {
        return Err(CliError::new(format!(
            "no message with id {} (never stored, or purged)",
            args.id
        )));
    };
    let doc = MessageJson::from(&m);
    if args.json {
        out(format_args!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(json_error)?
        ));
        return Ok(());
    }
    let value = serde_json::to_value(&doc).map_err(json_error)?;
    let serde_json::Value::Object(fields) = value else {
        return Err(CliError::new("unexpected JSON shape of a message"));
    };
    let mut table = Table::new(&["FIELD", "VALUE"]);
    for (name, v) in fields {
        let text = match v {
            serde_json::Value::Null => "-".to_owned(),
            serde_json::Value::String(s) => s,
            serde_json::Value::Object(map) if map.is_empty() => "-".to_owned(),
            serde_json::Value::Object(map) => map
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(", "),
            other => other.to_string(),
        };
        table.row(vec![name, text]);
    }
    out(table.render().trim_end());
    Ok(())
}

/// A counter that draws a spinner on a terminal (stderr) and nothing elsewhere.
fn progress(what: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {pos} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(what);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Run `outbox requeue`.
pub async fn requeue(args: RequeueArgs) -> CliResult<()> {
    let (_, opened) = args.store.open().await?;
    let batch = args.batch as usize;
    let bar = progress("requeued");
    let mut total = 0u64;
    if args.all_parked {
        // Bounded batches: list a page of parked messages, requeue exactly those ids.
        let mut seen = HashSet::new();
        loop {
            let page = opened
                .list(&ListQuery {
                    status: Some(MessageStatus::Parked),
                    topic: args.topic.clone(),
                    key: None,
                    limit: batch,
                })
                .await
                .context("listing parked messages")?;
            let ids: Vec<MessageId> = page
                .iter()
                .map(|m| m.message.id)
                .filter(|id| seen.insert(*id))
                .collect();
            if ids.is_empty() {
                break;
            }
            let n = opened
                .store
                .requeue(&RequeueFilter::Ids(ids))
                .await
                .context("requeueing")?;
            total += n;
            bar.inc(n);
            if n == 0 {
                break; // a stale listing; nothing left that this run can requeue
            }
        }
    } else {
        for chunk in args.ids.chunks(batch) {
            let n = opened
                .store
                .requeue(&RequeueFilter::Ids(chunk.to_vec()))
                .await
                .context("requeueing")?;
            total += n;
            bar.inc(n);
        }
    }
    bar.finish_and_clear();
    out(format_args!("requeued {total} parked message(s)"));
    if !args.all_parked && (total as usize) < args.ids.len() {
        eprintln!(
            "note: {} of the given id(s) were not parked (unknown, pending or dispatched)",
            args.ids.len() - total as usize
        );
    }
    Ok(())
}

/// Run `outbox purge`.
pub async fn purge(args: PurgeArgs) -> CliResult<()> {
    let (_, opened) = args.store.open().await?;
    let batch = args.batch as usize;
    let bar = progress("purged");
    let mut total = 0u64;
    loop {
        let n = opened
            .store
            .purge_dispatched(args.dispatched_older_than, batch)
            .await
            .context("purging dispatched messages")?;
        total += n;
        bar.inc(n);
        if (n as usize) < batch {
            break;
        }
    }
    bar.finish_and_clear();
    out(format_args!(
        "purged {total} dispatched message(s) older than {}",
        human_duration(args.dispatched_older_than)
    ));
    Ok(())
}

fn json_error(e: serde_json::Error) -> CliError {
    CliError::new(format!("cannot render JSON: {e}"))
}
