#![doc = include_str!("../README.md")]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_core::{Error, Result};
use outbox_kafka::KafkaConfig;
use outbox_rabbitmq::{AmqpUrl, ConnectionConfig};

/// Addresses of the local services, from the `OUTBOX_TEST_*` variables that
/// `scripts/services.sh` exports, with the local defaults.
#[derive(Debug, Clone)]
pub struct Services {
    /// PostgreSQL URL.
    pub postgres: String,
    /// RabbitMQ URL.
    pub rabbitmq: String,
    /// DynamoDB endpoint (moto).
    pub dynamodb: String,
    /// Kafka bootstrap servers.
    pub kafka: String,
}

impl Services {
    /// From the environment.
    pub fn from_env() -> Self {
        let var = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_owned())
        };
        Services {
            postgres: var(
                "OUTBOX_TEST_POSTGRES_URL",
                "postgres://outbox:outbox@127.0.0.1:5432/outbox",
            ),
            rabbitmq: var(
                "OUTBOX_TEST_RABBITMQ_URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ),
            dynamodb: var("OUTBOX_TEST_DYNAMODB_ENDPOINT", "http://127.0.0.1:8000"),
            kafka: var("OUTBOX_TEST_KAFKA_BROKERS", "127.0.0.1:9092"),
        }
    }

    /// The RabbitMQ connection settings.
    ///
    /// # Errors
    /// `ConfigInvalid` when the URL does not parse.
    pub fn amqp(&self) -> Result<ConnectionConfig> {
        Ok(ConnectionConfig::new(AmqpUrl::parse(
            self.rabbitmq.clone(),
        )?))
    }

    /// The Kafka client settings.
    pub fn kafka_config(&self) -> KafkaConfig {
        KafkaConfig::new(self.kafka.clone())
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released: another process may still take it).
///
/// # Errors
/// `Unexpected` when no port can be bound.
pub fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::unexpected("finding a free port").with_source(e))
}

/// The last `lines` lines of the file at `path` (empty when it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A private moto server: a `moto_server_atomic` child process (moto answering one request at a
/// time, as `scripts/services.sh` writes it) on a free port, killed when dropped.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    /// Its endpoint, `http://127.0.0.1:<port>`.
    pub endpoint: String,
}

impl Moto {
    /// The moto executable: `OUTBOX_MOTO_SERVER` when set, else the one
    /// `scripts/services.sh` installed (`$OUTBOX_SERVICES_DIR`, default
    /// `~/.cache/outbox-services`, then `venv/bin/moto_server_atomic`). `None` when there is none.
    pub fn executable() -> Option<PathBuf> {
        let bin = match std::env::var_os("OUTBOX_MOTO_SERVER") {
            Some(p) => PathBuf::from(p),
            None => std::env::var_os("OUTBOX_SERVICES_DIR")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME")
                        .map(|h| PathBuf::from(h).join(".cache/outbox-services"))
                })?
                .join("venv/bin/moto_server_atomic"),
        };
        bin.is_file().then_some(bin)
    }

    /// Start a fresh server on a free port, its stderr in `log`, and wait until it listens
    /// (at most 60 s). `Ok(None)` when no moto is installed.
    ///
    /// # Errors
    /// `Unavailable` when it exits or does not listen in time (with the log's tail);
    /// `Unexpected` when it cannot be started.
    pub async fn start(log: &Path) -> Result<Option<Moto>> {
        let Some(bin) = Moto::executable() else {
            return Ok(None);
        };
        let port = free_port()?;
        let file = File::create(log)
            .map_err(|e| Error::unexpected("creating the moto log").with_source(e))?;
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .map_err(|e| Error::unexpected(format!("starting {}", bin.display())).with_source(e))?;
        let mut moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let end = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = moto.child.try_wait() {
                return Err(Error::unavailable(format!(
                    "moto exited ({status}): {}",
                    tail(log, 10)
                )));
            }
            if Instant::now() > end {
                return Err(Error::unavailable("moto did not listen within 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Some(moto))
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
