//! Private service instances for the scenarios that restart a service: a RabbitMQ node and a
//! PostgreSQL cluster of this run, on free ports, in temporary directories. The shared
//! services are never stopped, restarted or reconfigured; these are, and are removed when
//! dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outbox_core::{Error, Result};

use crate::procs::signal;

pub use outbox_harness::free_port;

/// Run `cmd`, its output appended to `log`; an error naming `what` and the log's end when it
/// fails.
fn run_logged(cmd: &mut Command, log: &Path, what: &str) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::unexpected(format!("opening {}", log.display())).with_source(e))?;
    let err = file
        .try_clone()
        .map_err(|e| Error::unexpected("cloning a log handle").with_source(e))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .status()
        .map_err(|e| Error::unexpected(format!("running {what}")).with_source(e))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::unavailable(format!(
            "{what} failed ({status}): {}",
            crate::procs::tail(log, 8)
        )))
    }
}

/// `chown -R user: dir` (the Debian service packages run their servers as their own user).
fn chown(dir: &Path, user: &str) -> Result<()> {
    let status = Command::new("chown")
        .args(["-R", &format!("{user}:"), &dir.display().to_string()])
        .status()
        .map_err(|e| Error::unexpected("running chown").with_source(e))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::unexpected(format!(
            "chown -R {user}: {} failed",
            dir.display()
        )))
    }
}

fn temp_dir(prefix: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| Error::unexpected("creating a temp dir").with_source(e))
}

/// A private RabbitMQ node (`rabbitmq-server` of the Debian package): its own node name,
/// AMQP and distribution ports, database and log directories, no plugins.
#[derive(Debug)]
pub struct PrivateRabbit {
    dir: tempfile::TempDir,
    /// Its node name, `chaos-<port>@localhost`.
    pub node: String,
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    dist_port: u16,
    log: PathBuf,
}

impl PrivateRabbit {
    /// Start a node and wait until it runs (`rabbitmqctl await_startup`). `None` when
    /// `rabbitmq-server` is not installed.
    pub async fn start(logs: &Path) -> Result<Option<PrivateRabbit>> {
        if !Path::new("/usr/sbin/rabbitmq-server").is_file() {
            return Ok(None);
        }
        let dir = temp_dir("outbox-chaos-rabbit-")?;
        let port = free_port()?;
        let mut dist_port = free_port()?;
        while dist_port == port {
            dist_port = free_port()?;
        }
        std::fs::write(dir.path().join("enabled_plugins"), "")
            .and_then(|()| {
                std::fs::write(
                    dir.path().join("rabbitmq.conf"),
                    format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
                )
            })
            .map_err(|e| Error::unexpected("writing the RabbitMQ config").with_source(e))?;
        chown(dir.path(), "rabbitmq")?;
        let rabbit = PrivateRabbit {
            node: format!("chaos-{port}@localhost"),
            port,
            dist_port,
            log: logs.join(format!("rabbit-{port}.log")),
            dir,
        };
        rabbit.boot().await?;
        Ok(Some(rabbit))
    }

    /// The AMQP URL of the node.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn server(&self) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new("rabbitmq-server");
        cmd.arg("-detached")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"));
        cmd
    }

    fn ctl(&self, args: &[&str]) -> Result<()> {
        let mut cmd = Command::new("rabbitmqctl");
        cmd.args(["-q", "-n", &self.node]).args(args);
        run_logged(
            &mut cmd,
            &self.log,
            &format!("rabbitmqctl {}", args.join(" ")),
        )
    }

    /// Start the Erlang node (also after a kill) and wait for the broker.
    async fn boot(&self) -> Result<()> {
        run_logged(&mut self.server(), &self.log, "rabbitmq-server -detached")?;
        self.await_startup(Duration::from_secs(90)).await
    }

    async fn await_startup(&self, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            // Fails at once while the node has not registered yet: try again.
            match self.ctl(&["await_startup", "--timeout", "30"]) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > end => {
                    return Err(Error::unavailable(format!(
                        "private RabbitMQ node {} not up after {timeout:?}: {e}",
                        self.node
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// `rabbitmqctl stop_app`: the broker stops (every connection is closed), the Erlang node
    /// stays.
    pub fn stop_app(&self) -> Result<()> {
        self.ctl(&["stop_app"])
    }

    /// `rabbitmqctl start_app`, then wait until the broker runs.
    pub async fn start_app(&self) -> Result<()> {
        self.ctl(&["start_app"])?;
        self.await_startup(Duration::from_secs(60)).await
    }

    /// SIGKILL the node's Erlang VM (no clean shutdown: what was confirmed must survive in
    /// the quorum queue's log).
    pub async fn kill(&self) -> Result<()> {
        let pid = self.pid()?;
        signal(pid, "KILL")?;
        let end = Instant::now() + Duration::from_secs(20);
        while Path::new(&format!("/proc/{pid}")).exists() {
            if Instant::now() > end {
                return Err(Error::unexpected(format!(
                    "RabbitMQ node pid {pid} still alive 20 s after SIGKILL"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // epmd forgets the node when its connection closes; wait for that before a restart.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }

    /// Start the node again after [`kill`](Self::kill).
    pub async fn restart(&self) -> Result<()> {
        self.boot().await
    }

    fn pid(&self) -> Result<u32> {
        let path = self.dir.path().join("pid");
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Error::unexpected(format!("no RabbitMQ pid in {}", path.display())))
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if self.ctl(&["stop"]).is_err()
            && let Ok(pid) = self.pid()
        {
            let _ = signal(pid, "KILL");
        }
    }
}

/// A private PostgreSQL cluster (`initdb`, `pg_ctl` of /usr/lib/postgresql/15), run as the
/// `postgres` user (initdb refuses root) in a temporary directory, trust authentication on
/// 127.0.0.1 only, `fsync=off` (the faults here are process restarts, not machine crashes).
#[derive(Debug)]
pub struct PrivatePg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    log: PathBuf,
}

impl PrivatePg {
    /// Create, start and wait for the cluster, with a database `outbox` owned by the
    /// superuser `outbox`. `None` when PostgreSQL's server binaries are not installed.
    pub async fn start(logs: &Path) -> Result<Option<PrivatePg>> {
        let bin = std::env::var_os("OUTBOX_CHAOS_PG_BIN").map_or_else(
            || PathBuf::from("/usr/lib/postgresql/15/bin"),
            PathBuf::from,
        );
        if !bin.join("initdb").is_file() {
            return Ok(None);
        }
        let dir = temp_dir("outbox-chaos-pg-")?;
        chown(dir.path(), "postgres")?;
        let port = free_port()?;
        let pg = PrivatePg {
            log: logs.join(format!("postgres-{port}.log")),
            bin,
            port,
            dir,
        };
        let data = pg.dir.path().join("data");
        run_logged(
            pg.as_postgres(&pg.bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", "outbox", "--auth=trust", "-E", "UTF8", "--no-sync"]),
            &pg.log,
            "initdb",
        )?;
        pg.ctl(&["start"])?;
        run_logged(
            pg.as_postgres(&pg.bin.join("createdb")).args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "outbox",
                "outbox",
            ]),
            &pg.log,
            "createdb",
        )?;
        Ok(Some(pg))
    }

    /// Its URL (database `outbox`, user `outbox`).
    pub fn url(&self) -> String {
        format!("postgres://outbox:outbox@127.0.0.1:{}/outbox", self.port)
    }

    fn as_postgres(&self, program: &Path) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"])
            .arg(program)
            .current_dir(self.dir.path());
        cmd
    }

    fn ctl(&self, action: &[&str]) -> Result<()> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let data = self.dir.path().join("data");
        let server_log = self.dir.path().join("server.log");
        run_logged(
            self.as_postgres(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&server_log)
                .args(["-w", "-t", "60", "-o", &opts])
                .args(action),
            &self.log,
            &format!("pg_ctl {}", action.join(" ")),
        )
    }

    /// `pg_ctl restart -m fast`: every session is terminated, the server stops and starts.
    pub fn restart(&self) -> Result<()> {
        self.ctl(&["restart", "-m", "fast"])
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop", "-m", "immediate"]);
    }
}
