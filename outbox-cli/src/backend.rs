//! Opening a store from its [`StoreLocation`], through each backend crate's public API. The
//! one place that knows the backends; everything else sees `OutboxStore` and
//! `DistributedLock`.

use std::sync::Arc;

use outbox_core::{
    CancellationToken, DistributedLock, ListQuery, OutboxStore, RelayHandle, StoredMessage,
};

use crate::location::StoreLocation;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "dynamodb"))]
use crate::util::CliError;
use crate::util::{CliResult, missing_feature};

/// An open store and the distributed lock that lives beside it.
pub struct Opened {
    /// The outbox.
    pub store: Arc<dyn OutboxStore>,
    /// The backend's lock (shard leases of the relay).
    pub lock: Arc<dyn DistributedLock>,
    backend: Backend,
}

/// The concrete store, for what the traits do not cover (table checks, wake-ups).
#[derive(Clone)]
enum Backend {
    #[cfg(feature = "sqlite")]
    Sqlite,
    #[cfg(feature = "postgres")]
    Postgres(outbox_postgres::PgStore),
    #[cfg(feature = "dynamodb")]
    DynamoDb(Box<(outbox_dynamodb::DynamoDbStore, aws_config::SdkConfig)>),
}

/// Whether to create the tables or insist they exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `outbox init`: create tables, indexes or migrations if missing (idempotent).
    Init,
    /// Every other command: a missing table is an error with a hint to run `outbox init`.
    Existing,
}

#[cfg(feature = "postgres")]
fn run_init(location: &StoreLocation) -> CliError {
    CliError::new(format!("the outbox tables do not exist at {location}"))
        .hint("create them with `outbox init` (check ?schema= and ?prefix= first)")
}

/// Open the store at `location`. With [`Mode::Init`], create what is missing first.
pub async fn open(location: &StoreLocation, mode: Mode) -> CliResult<Opened> {
    open_with_clock(location, mode, None).await
}

/// Like [`open`], with the store reading `clock` (due times, backoff, and lease expiry where
/// the store judges it by its client's clock: SQLite, DynamoDB) instead of the system clock.
pub async fn open_with_clock(
    location: &StoreLocation,
    mode: Mode,
    clock: Option<outbox_core::SharedClock>,
) -> CliResult<Opened> {
    #[cfg(not(any(feature = "sqlite", feature = "postgres", feature = "dynamodb")))]
    let _ = &clock;
    #[cfg(any(feature = "sqlite", feature = "postgres", feature = "dynamodb"))]
    let context = |e: outbox_core::Error| CliError::from(e).context(format_args!("{location}"));
    match location {
        #[cfg(feature = "sqlite")]
        StoreLocation::Sqlite { path, prefix } => {
            let mut config = outbox_sqlite::SqliteConfig::new(path);
            if let Some(c) = clock {
                config = config.with_clock(c);
            }
            if let Some(p) = prefix {
                config = config.with_table_prefix(p);
            }
            let store = match mode {
                Mode::Init => match outbox_sqlite::SqliteStore::connect(config).await {
                    Ok(s) => s.migrate().await.map(|_| s),
                    Err(e) => Err(e),
                },
                Mode::Existing => outbox_sqlite::SqliteStore::connect_existing(config).await,
            };
            let store = match store {
                Ok(s) => s,
                Err(e) if e.kind() == outbox_core::ErrorKind::NotFound => {
                    return Err(CliError::from(e).context(location).hint(
                        "create the outbox with `outbox init` (check the path and ?prefix= first)",
                    ));
                }
                Err(e) => return Err(context(e)),
            };
            Ok(Opened {
                lock: Arc::new(store.lock()),
                store: Arc::new(store),
                backend: Backend::Sqlite,
            })
        }
        #[cfg(feature = "postgres")]
        StoreLocation::Postgres {
            url,
            schema,
            prefix,
        } => {
            let mut config = outbox_postgres::PgConfig::new()
                .with_acquire_timeout(std::time::Duration::from_secs(5));
            if let Some(c) = clock {
                config = config.with_clock(c);
            }
            if let Some(s) = schema {
                config = config.with_schema(s);
            }
            if let Some(p) = prefix {
                config = config.with_table_prefix(p);
            }
            // Its errors name the (redacted) URL already.
            let store = outbox_postgres::PgStore::connect(url, config)
                .await
                .map_err(CliError::from)?;
            match mode {
                Mode::Init => {
                    store.migrate().await.map_err(context)?;
                }
                Mode::Existing => {
                    if store.schema_version().await.map_err(context)? == 0 {
                        return Err(run_init(location));
                    }
                }
            }
            Ok(Opened {
                lock: Arc::new(store.lock()),
                store: Arc::new(store.clone()),
                backend: Backend::Postgres(store),
            })
        }
        #[cfg(feature = "dynamodb")]
        StoreLocation::DynamoDb {
            region,
            endpoint,
            prefix,
        } => {
            let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
            if let Some(r) = region {
                loader = loader.region(aws_config::Region::new(r.clone()));
            }
            if let Some(e) = endpoint {
                loader = loader.endpoint_url(e);
            }
            let sdk = loader.load().await;
            let client = outbox_dynamodb::aws_sdk_dynamodb::Client::new(&sdk);
            let mut config = outbox_dynamodb::DynamoDbConfig::new(prefix.clone());
            if let Some(c) = clock {
                config = config.with_clock(c);
            }
            let store = outbox_dynamodb::DynamoDbStore::new(client, config).map_err(context)?;
            match mode {
                Mode::Init => store.migrate().await.map_err(context)?,
                Mode::Existing => check_dynamodb_tables(&store, location).await?,
            }
            Ok(Opened {
                lock: Arc::new(store.lock()),
                store: Arc::new(store.clone()),
                backend: Backend::DynamoDb(Box::new((store, sdk))),
            })
        }
        #[allow(unreachable_patterns)] // every feature on: every location is handled above
        _ => {
            let _ = mode;
            Err(missing_feature(location.feature()))
        }
    }
}

/// A missing DynamoDB table would otherwise surface as a `ConfigInvalid` from the first
/// operation; name it and point at `outbox init`.
#[cfg(feature = "dynamodb")]
async fn check_dynamodb_tables(
    store: &outbox_dynamodb::DynamoDbStore,
    location: &StoreLocation,
) -> CliResult<()> {
    use outbox_dynamodb::aws_sdk_dynamodb::error::ProvideErrorMetadata;
    let (outbox, inbox, locks) = store.table_names();
    for table in [outbox, inbox, locks] {
        match store
            .client()
            .describe_table()
            .table_name(table)
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) if e.code() == Some("ResourceNotFoundException") => {
                return Err(
                    CliError::new(format!("DynamoDB table {table} does not exist"))
                        .context(location)
                        .hint("create the tables with `outbox init`"),
                );
            }
            Err(e) => {
                return Err(CliError::from(outbox_dynamodb::parse_error(e))
                    .context(format_args!("{location}: describing table {table}")));
            }
        }
    }
    Ok(())
}

impl Opened {
    /// `list` with every filter applied by the backend.
    pub async fn list(&self, query: &ListQuery) -> CliResult<Vec<StoredMessage>> {
        Ok(self.store.list(query).await?)
    }

    /// Wake `relay` on the store's own commit signal, where it has one (PostgreSQL
    /// `LISTEN/NOTIFY`). Returns what it set up, for the log, or `None` (polling only).
    pub async fn listen(
        &self,
        relay: RelayHandle,
        stream_interval: std::time::Duration,
        shutdown: CancellationToken,
    ) -> CliResult<Option<String>> {
        match &self.backend {
            #[cfg(feature = "postgres")]
            Backend::Postgres(store) => {
                store.listen(relay, shutdown).await?;
                Ok(Some(format!("LISTEN {}", store.notify_channel())))
            }
            #[cfg(feature = "dynamodb")]
            Backend::DynamoDb(opened) => {
                let (store, sdk) = opened.as_ref();
                // The same settings (region, endpoint, credentials) as the store's client.
                let client = outbox_dynamodb::aws_sdk_dynamodbstreams::Client::new(sdk);
                let listener = outbox_dynamodb::StreamListener::new(store, client).await?;
                tokio::spawn(listener.run(relay, stream_interval, shutdown));
                Ok(Some(format!(
                    "the DynamoDB stream of {} (read every {})",
                    store.table_names().0,
                    crate::util::human_duration(stream_interval)
                )))
            }
            #[allow(unreachable_patterns)]
            _ => {
                let _ = (relay, stream_interval, shutdown);
                Ok(None)
            }
        }
    }
}
