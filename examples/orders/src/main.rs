//! `orders`: the production wiring of the example service, on DynamoDB or PostgreSQL. It
//! writes orders and their events; a relay process publishes them (`outbox relay`, see the
//! README).

use clap::{Parser, Subcommand, ValueEnum};
use outbox::dynamodb::{DynamoDbConfig, DynamoDbStore};
use outbox::postgres::{PgConfig, PgStore};
use outbox_example_orders::repos::{DynamoOrders, PgOrders};
use outbox_example_orders::{Order, OrderRepository, OrderService, PlaceError};

#[derive(Debug, Parser)]
#[command(
    name = "orders",
    about = "Place and show orders; their events go through the outbox"
)]
struct Args {
    /// Where orders and the outbox live.
    #[arg(long, value_enum, env = "ORDERS_BACKEND")]
    backend: Backend,
    /// PostgreSQL: the server URL.
    #[arg(long, env = "DATABASE_URL", required_if_eq("backend", "postgres"))]
    database_url: Option<String>,
    /// DynamoDB: the prefix of the outbox's tables (the AWS default credential chain and
    /// region apply).
    #[arg(long, env = "ORDERS_TABLE_PREFIX", default_value = "orders_")]
    prefix: String,
    /// DynamoDB: a local endpoint such as moto's, instead of AWS.
    #[arg(long, env = "ORDERS_DYNAMODB_ENDPOINT")]
    endpoint: Option<String>,
    /// The orders table.
    #[arg(long, default_value = "orders")]
    table: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Backend {
    Postgres,
    Dynamodb,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create the outbox's and the orders' tables (idempotent).
    Migrate,
    /// Place an order: its row and its `orders.placed` event in one transaction.
    Place {
        id: String,
        customer: String,
        total_cents: i64,
    },
    /// Show an order.
    Show { id: String },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orders: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    match args.backend {
        Backend::Postgres => {
            let url = args
                .database_url
                .as_deref()
                .ok_or("--database-url is required")?;
            let store = PgStore::connect(url, PgConfig::new()).await?;
            if matches!(args.cmd, Cmd::Migrate) {
                store.migrate().await?;
            }
            let repo = PgOrders::new(store.clone(), &args.table)?;
            serve(OrderService::new(store, repo), args.cmd).await
        }
        Backend::Dynamodb => {
            let config = DynamoDbConfig::new(args.prefix.clone());
            let store = match &args.endpoint {
                Some(endpoint) => {
                    DynamoDbStore::new(outbox::dynamodb::local_client(endpoint), config)?
                }
                None => DynamoDbStore::from_env(config).await?,
            };
            if matches!(args.cmd, Cmd::Migrate) {
                store.migrate().await?;
            }
            let table = format!("{}{}", args.prefix, args.table);
            let repo = DynamoOrders::new(store.clone(), &table)?;
            serve(OrderService::new(store, repo), args.cmd).await
        }
    }
}

/// The commands, once for every backend.
async fn serve<R: OrderRepository>(
    service: OrderService<R>,
    cmd: Cmd,
) -> Result<(), Box<dyn std::error::Error>> {
    match cmd {
        Cmd::Migrate => {
            service.repository().migrate().await?;
            println!("ready");
        }
        Cmd::Place {
            id,
            customer,
            total_cents,
        } => {
            let order = Order {
                id,
                customer,
                total_cents,
            };
            match service.place(&order).await {
                Ok(event) => println!("placed {} (event {event})", order.id),
                Err(PlaceError::Duplicate(id)) => {
                    return Err(format!("order {id:?} was placed before").into());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Cmd::Show { id } => match service.order(&id).await? {
            Some(o) => println!("{} {} {}", o.id, o.customer, o.total_cents),
            None => return Err(format!("no order {id:?}").into()),
        },
    }
    Ok(())
}
