//! Child processes: `outbox relay` instances, and signals sent with the `kill` command.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use outbox_core::{Error, Result};
pub use outbox_harness::{Moto, tail};

/// Where the `outbox` binary is: `explicit`, or next to this executable.
///
/// # Errors
/// `ConfigInvalid` naming the missing file and how to build it.
pub fn outbox_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|e| Error::config("cannot locate the current executable").with_source(e))?
            .parent()
            .map(|d| d.join(format!("outbox{}", std::env::consts::EXE_SUFFIX)))
            .ok_or_else(|| Error::config("the current executable has no directory"))?,
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::config(format!(
            "the `outbox` binary was not found at {}: run `cargo build -p outbox-cli` first \
             (same profile and target dir as outbox-chaos), or pass --outbox-bin PATH",
            path.display()
        )))
    }
}

/// Send `signal` (`KILL`, `STOP`, `CONT`, `TERM`) to `pid` with the `kill` command.
pub fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .map_err(|e| Error::unexpected("running `kill`").with_source(e))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::unexpected(format!("kill -{signal} {pid} failed")))
    }
}

/// Wait up to `timeout` for `child` to exit.
pub async fn wait_exit(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| Error::unexpected("waiting for a child").with_source(e))?
        {
            return Ok(Some(status));
        }
        if Instant::now() > end {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running `outbox relay`.
#[derive(Debug)]
pub struct Relay {
    /// Its instance id.
    pub id: String,
    /// Whether it is stopped (SIGSTOP) right now.
    pub paused: bool,
    child: Child,
    log: PathBuf,
}

impl Relay {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A set of `outbox relay` processes of one run, all with the same flags.
#[derive(Debug)]
pub struct Relays {
    bin: PathBuf,
    args: Vec<String>,
    logs: PathBuf,
    prefix: String,
    started: u32,
    /// Processes alive (running or paused).
    pub live: Vec<Relay>,
    /// SIGKILLs sent.
    pub kills: u32,
    /// SIGSTOPs sent.
    pub pauses: u32,
}

impl Relays {
    /// Relays of `bin relay --store store --transport transport extra...`; logs in `logs`,
    /// instance ids `<prefix>-r<n>`.
    pub fn new(
        bin: &Path,
        store: &str,
        transport: &str,
        extra: &[String],
        logs: &Path,
        prefix: &str,
    ) -> Relays {
        let mut args = vec![
            "relay".to_owned(),
            "--store".to_owned(),
            store.to_owned(),
            "--transport".to_owned(),
            transport.to_owned(),
        ];
        args.extend(extra.iter().cloned());
        Relays {
            bin: bin.to_path_buf(),
            args,
            logs: logs.to_path_buf(),
            prefix: prefix.to_owned(),
            started: 0,
            live: Vec::new(),
            kills: 0,
            pauses: 0,
        }
    }

    /// Start one more relay.
    pub fn spawn(&mut self) -> Result<()> {
        self.spawn_with(&[])
    }

    /// Start one more relay with `extra` flags after the common ones.
    pub fn spawn_with(&mut self, extra: &[String]) -> Result<()> {
        self.started += 1;
        let id = format!("{}-r{}", self.prefix, self.started);
        let log = self.logs.join(format!("{id}.log"));
        let file = File::create(&log)
            .map_err(|e| Error::unexpected(format!("creating {}", log.display())).with_source(e))?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .args(extra)
            .args(["--instance-id", &id])
            .env_remove("OUTBOX_STORE")
            .env_remove("OUTBOX_TRANSPORT")
            .env("AWS_ACCESS_KEY_ID", "local")
            .env("AWS_SECRET_ACCESS_KEY", "local")
            .env(
                "RUST_LOG",
                std::env::var("OUTBOX_CHAOS_RELAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .map_err(|e| {
                Error::unexpected(format!("starting {}", self.bin.display())).with_source(e)
            })?;
        self.live.push(Relay {
            id,
            paused: false,
            child,
            log,
        });
        Ok(())
    }

    /// The log file of every relay started so far (`<prefix>-r<n>.log`).
    pub fn logs(&self) -> Vec<PathBuf> {
        (1..=self.started)
            .map(|n| self.logs.join(format!("{}-r{n}.log", self.prefix)))
            .collect()
    }

    /// Relays started so far.
    pub fn started(&self) -> u32 {
        self.started
    }

    /// Fail if a relay exited by itself (it should only ever die from our signals).
    pub fn check_alive(&mut self) -> Result<()> {
        for r in &mut self.live {
            if let Ok(Some(status)) = r.child.try_wait() {
                return Err(Error::unexpected(format!(
                    "relay {} exited by itself ({status}); its log ends with:\n{}",
                    r.id,
                    tail(&r.log, 15)
                )));
            }
        }
        Ok(())
    }

    /// SIGKILL relay `i` and reap it.
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        let mut r = self.live.remove(i);
        signal(r.pid(), "KILL")?;
        self.kills += 1;
        wait_exit(&mut r.child, Duration::from_secs(10)).await?;
        Ok(())
    }

    /// SIGSTOP relay `i`.
    pub fn pause(&mut self, i: usize) -> Result<()> {
        signal(self.live[i].pid(), "STOP")?;
        self.live[i].paused = true;
        self.pauses += 1;
        Ok(())
    }

    /// SIGCONT relay `i`.
    pub fn resume(&mut self, i: usize) -> Result<()> {
        signal(self.live[i].pid(), "CONT")?;
        self.live[i].paused = false;
        Ok(())
    }

    /// SIGTERM every relay and wait for each to exit; a relay that does not exit 0 within
    /// `timeout` is an error (then it is SIGKILLed).
    pub async fn terminate_all(&mut self, timeout: Duration) -> Result<()> {
        for r in &self.live {
            if r.paused {
                signal(r.pid(), "CONT")?;
            }
            signal(r.pid(), "TERM")?;
        }
        let mut problems = Vec::new();
        for mut r in self.live.drain(..) {
            match wait_exit(&mut r.child, timeout).await? {
                Some(s) if s.success() => {}
                Some(s) => problems.push(format!(
                    "relay {} exited with {s} on SIGTERM; its log ends with:\n{}",
                    r.id,
                    tail(&r.log, 15)
                )),
                None => {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                    problems.push(format!(
                        "relay {} did not stop within {timeout:?} of SIGTERM; its log ends \
                         with:\n{}",
                        r.id,
                        tail(&r.log, 15)
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::unexpected(problems.join("\n")))
        }
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for r in &mut self.live {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}
