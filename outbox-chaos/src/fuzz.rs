//! `outbox-chaos fuzz`: build every cargo-fuzz (libFuzzer) target of the workspace's `fuzz/`
//! crate and run each for a bounded time; fail when one finds a crash.
//!
//! The build goes to a target directory outside the clone (default
//! `$HOME/.cache/outbox-fuzz-target`, or `OUTBOX_FUZZ_TARGET_DIR`), so a CI cache can keep it
//! warm across clean clones; each target's corpus lives there too (`corpus/<target>`) and
//! grows from run to run. Crashing inputs are written by libFuzzer to
//! `fuzz/artifacts/<target>/`; keep each as a regression `#[test]` in the crate it broke.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use clap::Args;

/// The targets `fuzz/Cargo.toml` declares, in the order they run.
pub const TARGETS: [&str; 7] = [
    "store_url",
    "relay_config",
    "sqlite_row",
    "postgres_row",
    "dynamodb_item",
    "kafka_headers",
    "amqp_properties",
];

/// Arguments of `outbox-chaos fuzz`.
#[derive(Debug, Clone, Args)]
pub struct FuzzArgs {
    /// How long each target runs (libFuzzer `-max_total_time`).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Only this target (repeatable; default: every target).
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,
    /// The fuzz crate (default: `fuzz/` of the workspace this binary was built from, else of
    /// the current directory).
    #[arg(long, value_name = "DIR")]
    fuzz_dir: Option<PathBuf>,
    /// Where to build and keep the corpora (default `$OUTBOX_FUZZ_TARGET_DIR`, else
    /// `$HOME/.cache/outbox-fuzz-target`); keep it outside the clone.
    #[arg(long, value_name = "DIR")]
    target_dir: Option<PathBuf>,
    /// The toolchain cargo-fuzz runs with (it needs nightly).
    #[arg(long, default_value = "nightly")]
    toolchain: String,
}

/// One target's outcome.
struct Outcome {
    target: String,
    runs: Option<u64>,
    seconds: f64,
    passed: bool,
    detail: String,
}

fn fuzz_dir(args: &FuzzArgs) -> Result<PathBuf, String> {
    if let Some(dir) = &args.fuzz_dir {
        return Ok(dir.clone());
    }
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let here = PathBuf::from("fuzz");
    [built_from, here]
        .into_iter()
        .find(|d| d.join("Cargo.toml").is_file())
        .ok_or_else(|| "no fuzz/Cargo.toml found; pass --fuzz-dir".to_owned())
}

fn target_dir(args: &FuzzArgs) -> Result<PathBuf, String> {
    if let Some(dir) = &args.target_dir {
        return Ok(dir.clone());
    }
    if let Some(dir) = std::env::var_os("OUTBOX_FUZZ_TARGET_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").ok_or("HOME is not set; pass --target-dir")?;
    Ok(PathBuf::from(home).join(".cache/outbox-fuzz-target"))
}

/// `cargo +<toolchain> fuzz <sub> --fuzz-dir <dir> --sanitizer none`, building into
/// `target_dir`. No sanitizer: the workspace forbids `unsafe`, so what the fuzzers look for
/// is panics (a Rust panic aborts the libFuzzer process) and slow or huge inputs; the
/// instrumentation for coverage stays.
fn cargo_fuzz(args: &FuzzArgs, sub: &str, fuzz_dir: &Path, target_dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{}", args.toolchain))
        .arg("fuzz")
        .arg(sub)
        .arg("--fuzz-dir")
        .arg(fuzz_dir)
        .args(["--sanitizer", "none"])
        .env("CARGO_TARGET_DIR", target_dir);
    cmd
}

/// The `Done N runs in S second(s)` line libFuzzer prints at the end.
fn runs_from(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        l.strip_prefix("Done ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

fn run_target(
    args: &FuzzArgs,
    target: &str,
    fuzz_dir: &Path,
    target_dir: &Path,
) -> Result<Outcome, String> {
    let corpus = target_dir.join("corpus").join(target);
    let seeds = fuzz_dir.join("seeds").join(target);
    std::fs::create_dir_all(&corpus).map_err(|e| format!("creating {}: {e}", corpus.display()))?;
    let log_path = target_dir.join("logs").join(format!("{target}.log"));
    if let Some(parent) = log_path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    let log = std::fs::File::create(&log_path)
        .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
    let mut cmd = cargo_fuzz(args, "run", fuzz_dir, target_dir);
    cmd.arg(target).arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={}", args.seconds))
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .stdout(Stdio::null())
        .stderr(log);
    let started = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| format!("running cargo fuzz run {target}: {e}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let runs = runs_from(&text);
    let detail = if status.success() {
        String::new()
    } else {
        // The panic message and the artifact path are near the end.
        let tail: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.contains("panicked")
                    || l.contains("artifact_prefix")
                    || l.contains("Test unit written")
                    || l.contains("ERROR")
                    || l.contains("error")
            })
            .take(8)
            .collect();
        format!(
            "{status}; log {}\n    {}",
            log_path.display(),
            tail.join("\n    ")
        )
    };
    Ok(Outcome {
        target: target.to_owned(),
        runs,
        seconds,
        passed: status.success(),
        detail,
    })
}

/// Run `outbox-chaos fuzz`.
pub fn run(args: FuzzArgs) -> ExitCode {
    match try_run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn try_run(args: &FuzzArgs) -> Result<bool, String> {
    for t in &args.targets {
        if !TARGETS.contains(&t.as_str()) {
            return Err(format!(
                "unknown fuzz target {t:?}; the targets are {}",
                TARGETS.join(", ")
            ));
        }
    }
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    let fuzz_dir = fuzz_dir(args)?;
    let target_dir = target_dir(args)?;
    let probe = Command::new("cargo")
        .arg(format!("+{}", args.toolchain))
        .args(["fuzz", "--version"])
        .output()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !probe.status.success() {
        return Err(format!(
            "cargo-fuzz is not installed for toolchain {} (cargo install cargo-fuzz; rustup \
             toolchain install {}): {}",
            args.toolchain,
            args.toolchain,
            String::from_utf8_lossy(&probe.stderr).trim()
        ));
    }
    eprintln!(
        "outbox-chaos fuzz: {} target(s), {}s each; fuzz crate {}; build and corpora in {}",
        targets.len(),
        args.seconds,
        fuzz_dir.display(),
        target_dir.display()
    );
    let started = Instant::now();
    let status = cargo_fuzz(args, "build", &fuzz_dir, &target_dir)
        .status()
        .map_err(|e| format!("running cargo fuzz build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo fuzz build failed: {status}"));
    }
    let build_seconds = started.elapsed().as_secs_f64();
    eprintln!("outbox-chaos fuzz: built in {build_seconds:.0}s");
    let mut outcomes = Vec::new();
    for t in targets {
        let o = run_target(args, t, &fuzz_dir, &target_dir)?;
        eprintln!(
            "  {:<16} {:>10} runs in {:>4.0}s  {}",
            o.target,
            o.runs.map_or_else(|| "?".to_owned(), |r| r.to_string()),
            o.seconds,
            if o.passed { "ok" } else { "CRASH" }
        );
        if !o.passed {
            eprintln!("    {}", o.detail);
        }
        outcomes.push(o);
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.target.as_str())
        .collect();
    println!(
        "fuzz: {} target(s), {}s each, build {build_seconds:.0}s, {:.0}s in total; {}",
        outcomes.len(),
        args.seconds,
        started.elapsed().as_secs_f64(),
        if failed.is_empty() {
            "no crash".to_owned()
        } else {
            format!(
                "CRASHES in {} (inputs in {}/artifacts/)",
                failed.join(", "),
                fuzz_dir.display()
            )
        }
    );
    Ok(failed.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_run_count() {
        let log = "#1024 pulse\nDone 123456 runs in 11 second(s)\nstat::x: 1\n";
        assert_eq!(runs_from(log), Some(123_456));
        assert_eq!(runs_from("nothing"), None);
    }

    #[test]
    fn targets_match_the_fuzz_crate() {
        let manifest = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/Cargo.toml"),
        )
        .unwrap_or_default();
        for t in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{t}\"")),
                "fuzz/Cargo.toml declares no target {t}"
            );
        }
        assert_eq!(manifest.matches("[[bin]]").count(), TARGETS.len());
    }
}
