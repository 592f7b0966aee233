//! Operator subcommands on a SQLite outbox file: `init`, `status`, `list`, `requeue`, `purge`.
//!
//! Everything except `init` goes through the [`OutboxStore`] trait only, so the same code
//! would serve any backend.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgGroup, Args, ValueEnum};
use outbox_core::{ListQuery, MessageId, MessageStatus, OutboxStore, RequeueFilter};

use crate::store;
use crate::util::{CliError, CliResult, Context, human_duration, parse_duration};

/// Where the outbox lives.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// Path of the SQLite database file holding the outbox.
    #[arg(long, value_name = "PATH", env = "OUTBOX_DB")]
    pub db: PathBuf,
    /// Prefix of the outbox tables (the backend's default when omitted).
    #[arg(long, value_name = "PREFIX", env = "OUTBOX_TABLE_PREFIX")]
    pub prefix: Option<String>,
}

impl DbArgs {
    /// Open the existing outbox file; a missing file is an error rather than a new empty store.
    async fn open_existing(&self) -> CliResult<outbox_sqlite::SqliteStore> {
        if !self.db.is_file() {
            return Err(CliError::new(format!(
                "database file {} does not exist (create one with `outbox init --db {}`)",
                self.db.display(),
                self.db.display()
            )));
        }
        self.check_tables()?;
        self.open().await
    }

    /// Refuse to work on a file that holds no outbox under this prefix: opening the store
    /// would create empty tables there, and a mistyped `--prefix` would then report an empty
    /// outbox instead of an error.
    fn check_tables(&self) -> CliResult<()> {
        let prefix = self
            .prefix
            .as_deref()
            .unwrap_or(outbox_sqlite::DEFAULT_TABLE_PREFIX);
        let conn = rusqlite::Connection::open_with_flags(
            &self.db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .context(format_args!("opening {}", self.db.display()))?;
        let table = format!("{prefix}messages");
        let found: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
                [&table],
                |r| r.get(0),
            )
            .context(format_args!("reading {}", self.db.display()))?;
        if found {
            Ok(())
        } else {
            Err(CliError::new(format!(
                "{} holds no outbox with table prefix {prefix:?} (no table {table}); check \
                 --prefix, or create the tables with `outbox init`",
                self.db.display()
            )))
        }
    }

    async fn open(&self) -> CliResult<outbox_sqlite::SqliteStore> {
        store::open(&self.db, self.prefix.as_deref(), store::Durability::Full)
            .await
            .context(format_args!("opening {}", self.db.display()))
    }
}

/// `outbox init`: create the outbox tables in a SQLite file.
#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    #[command(flatten)]
    db: DbArgs,
}

/// `outbox status`: pending and parked counts and the age of the oldest pending message.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// A message status as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    /// Waiting to be published.
    Pending,
    /// Published and confirmed by the broker.
    Dispatched,
    /// Dead-lettered after too many failures.
    Parked,
}

impl From<StatusArg> for MessageStatus {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Pending => MessageStatus::Pending,
            StatusArg::Dispatched => MessageStatus::Dispatched,
            StatusArg::Parked => MessageStatus::Parked,
        }
    }
}

/// `outbox list`: one line per message, in store order.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Only messages with this status.
    #[arg(long, value_enum)]
    status: Option<StatusArg>,
    /// Only messages of this topic.
    #[arg(long, value_name = "TOPIC")]
    topic: Option<String>,
    /// At most this many messages.
    #[arg(long, default_value_t = 100, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    limit: u32,
}

/// `outbox requeue`: return parked messages to pending.
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["all", "id", "topic"])))]
pub struct RequeueArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Requeue every parked message.
    #[arg(long)]
    all: bool,
    /// Requeue the parked message with this id (repeatable).
    #[arg(long, value_name = "ID", num_args = 1.., value_parser = parse_id)]
    id: Vec<MessageId>,
    /// Requeue every parked message of this topic.
    #[arg(long, value_name = "TOPIC")]
    topic: Option<String>,
}

/// `outbox purge`: delete dispatched messages older than a retention, in batches.
#[derive(Debug, Clone, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Delete dispatched messages whose dispatch is older than this (e.g. 30s, 15m, 7d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    older_than: Duration,
    /// Messages deleted per transaction.
    #[arg(long, default_value_t = 1000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    batch: u32,
}

fn parse_id(s: &str) -> Result<MessageId, String> {
    s.parse::<MessageId>().map_err(|e| e.message().to_owned())
}

/// Run `outbox init`.
pub async fn init(args: InitArgs) -> CliResult<()> {
    if let Some(parent) = args.db.db.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        return Err(CliError::new(format!(
            "directory {} does not exist",
            parent.display()
        )));
    }
    let store = args.db.open().await?;
    println!(
        "outbox tables ready in {} ({} shards)",
        args.db.db.display(),
        store.shard_count()
    );
    Ok(())
}

/// Run `outbox status`.
pub async fn status(args: StatusArgs) -> CliResult<()> {
    let store = args.db.open_existing().await?;
    let stats = store.stats().await.context("reading outbox stats")?;
    if args.json {
        let value = serde_json::json!({
            "db": path_text(&args.db.db),
            "pending": stats.pending,
            "parked": stats.parked,
            "oldest_pending_age_seconds": stats.oldest_pending_age.map(|d| d.as_secs_f64()),
        });
        println!("{value}");
    } else {
        println!("pending:            {}", stats.pending);
        println!("parked:             {}", stats.parked);
        println!(
            "oldest pending age: {}",
            stats
                .oldest_pending_age
                .map_or_else(|| "-".to_owned(), human_duration)
        );
    }
    Ok(())
}

/// Run `outbox list`.
pub async fn list(args: ListArgs) -> CliResult<()> {
    let store = args.db.open_existing().await?;
    let messages = store
        .list(&ListQuery {
            status: args.status.map(MessageStatus::from),
            topic: args.topic.clone(),
            limit: args.limit as usize,
        })
        .await
        .context("listing messages")?;
    for m in &messages {
        let mut line = format!(
            "{}  {:<10}  topic={}  key={}  attempts={}  created={}",
            m.message.id,
            m.status.as_str(),
            m.message.topic,
            m.message.key.as_deref().unwrap_or("-"),
            m.attempts,
            ts(m.message.created_at),
        );
        if let Some(at) = m.dispatched_at {
            line.push_str(&format!("  dispatched={}", ts(at)));
        }
        if let Some(at) = m
            .next_attempt_at
            .filter(|_| m.status == MessageStatus::Pending)
        {
            line.push_str(&format!("  next_attempt={}", ts(at)));
        }
        if let Some(err) = &m.last_error {
            line.push_str(&format!("  last_error={err:?}"));
        }
        println!("{line}");
    }
    if messages.is_empty() {
        eprintln!("no matching messages");
    }
    Ok(())
}

/// A timestamp as RFC 3339 in UTC with microseconds (the precision stores keep).
fn ts(t: outbox_core::DateTime<outbox_core::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Run `outbox requeue`.
pub async fn requeue(args: RequeueArgs) -> CliResult<()> {
    let store = args.db.open_existing().await?;
    let filter = if args.all {
        RequeueFilter::All
    } else if let Some(topic) = &args.topic {
        RequeueFilter::Topic(topic.clone())
    } else {
        RequeueFilter::Ids(args.id.clone())
    };
    let n = store.requeue(&filter).await.context("requeueing")?;
    println!("requeued {n} parked message(s)");
    if let RequeueFilter::Ids(ids) = &filter
        && (n as usize) < ids.len()
    {
        eprintln!(
            "note: {} of the given id(s) were not parked (unknown, pending or dispatched)",
            ids.len() - n as usize
        );
    }
    Ok(())
}

/// Run `outbox purge`.
pub async fn purge(args: PurgeArgs) -> CliResult<()> {
    let store = args.db.open_existing().await?;
    let batch = args.batch as usize;
    let mut total = 0u64;
    loop {
        let n = store
            .purge_dispatched(args.older_than, batch)
            .await
            .context("purging dispatched messages")?;
        total += n;
        if (n as usize) < batch {
            break;
        }
    }
    println!(
        "purged {total} dispatched message(s) older than {}",
        human_duration(args.older_than)
    );
    Ok(())
}

fn path_text(p: &Path) -> String {
    p.display().to_string()
}
