//! `cargo xtask fuzz`: coverage-guided fuzzing of weft-core's parsers with cargo-fuzz
//! (libFuzzer), the targets in `fuzz/`.
//!
//! Runs on the stable toolchain: the targets are built without a sanitizer
//! (`--sanitizer none`; weft-core forbids `unsafe`, so panics, overflows and hangs are what
//! there is to find), with debug assertions and overflow checks on (`-a`). AddressSanitizer
//! needs `-Zsanitizer`: run `RUSTC_BOOTSTRAP=1 cargo fuzz run <target>` by hand for it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, bail};

use super::run_cmd;

/// Build flags, the same for `build` and `run` (any difference rebuilds everything).
const BUILD_FLAGS: &[&str] =
    &["--sanitizer", "none", "--debug-assertions", "--codegen-units", "16"];

/// Installs cargo-fuzz, builds every target and runs each for `seconds_per_target`
/// seconds. Fails if any target finds a crash (and says where the input is).
pub fn run_fuzz(root: &Path, seconds_per_target: u64) -> Result<()> {
    run_targets(root, None, seconds_per_target)
}

/// Like [`run_fuzz`], for one target when `only` names it.
pub fn run_targets(root: &Path, only: Option<&str>, seconds_per_target: u64) -> Result<()> {
    ensure_cargo_fuzz()?;
    let fuzz_dir = root.join("fuzz");
    let all = list_targets(&fuzz_dir)?;
    let targets: Vec<String> = match only {
        Some(name) if all.iter().any(|t| t == name) => vec![name.to_string()],
        Some(name) => bail!("no fuzz target {name:?}; there are: {}", all.join(", ")),
        None => all,
    };

    let started = Instant::now();
    let mut build = cargo_fuzz(&fuzz_dir, "build");
    if let [one] = targets.as_slice() {
        build.arg(one);
    }
    run_cmd(&mut build)?;
    println!("xtask: fuzz targets built in {:.0} s", started.elapsed().as_secs_f64());

    let mut failed = Vec::new();
    for target in &targets {
        if let Err(e) = run_target(&fuzz_dir, target, seconds_per_target) {
            println!("xtask: fuzz {target}: FAILED: {e:#}");
            failed.push(target.as_str());
        }
    }
    println!(
        "xtask: fuzzing took {:.0} s in all (build included)",
        started.elapsed().as_secs_f64()
    );
    println!("fuzz: {} passed, {} failed", targets.len() - failed.len(), failed.len());
    if !failed.is_empty() {
        bail!("fuzzing found crashes in: {}", failed.join(", "));
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> Result<()> {
    let works = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    println!("xtask: installing cargo-fuzz (once; about a minute)");
    if let Err(e) = run_cmd(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"])) {
        // Its lock file can name a crate version the registry no longer serves.
        println!("xtask: --locked install failed ({e}); retrying with fresh dependencies");
        run_cmd(Command::new("cargo").args(["install", "cargo-fuzz"]))?;
    }
    Ok(())
}

/// `cargo fuzz <sub> --fuzz-dir fuzz` with the build flags, in the fuzz crate's own target
/// dir (never the workspace's: other RUSTFLAGS would rebuild each other's artifacts).
fn cargo_fuzz(fuzz_dir: &Path, sub: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["fuzz", sub, "--fuzz-dir"])
        .arg(fuzz_dir)
        .args(BUILD_FLAGS)
        .arg("--target-dir")
        .arg(fuzz_dir.join("target"))
        // A changed RUSTC_BOOTSTRAP also rebuilds everything; stable needs none here.
        .env_remove("RUSTC_BOOTSTRAP")
        .env_remove("CARGO_TARGET_DIR");
    cmd
}

fn list_targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let out = Command::new("cargo")
        .args(["fuzz", "list", "--fuzz-dir"])
        .arg(fuzz_dir)
        .output()
        .context("running `cargo fuzz list`")?;
    if !out.status.success() {
        bail!("`cargo fuzz list` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let targets: Vec<String> =
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect();
    if targets.is_empty() {
        bail!("no fuzz targets in {}", fuzz_dir.display());
    }
    Ok(targets)
}

/// Runs one target for `seconds`, its libFuzzer output in a log file. The corpus grows in
/// `fuzz/corpus/<target>` (not committed); `fuzz/seeds/<target>` is read as well.
fn run_target(fuzz_dir: &Path, target: &str, seconds: u64) -> Result<()> {
    let corpus = fuzz_dir.join("corpus").join(target);
    let seeds = fuzz_dir.join("seeds").join(target);
    let artifacts = fuzz_dir.join("artifacts").join(target);
    let logs = fuzz_dir.join("target").join("fuzz-logs");
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;

    let mut cmd = cargo_fuzz(fuzz_dir, "run");
    cmd.arg(target).arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // A single input that takes this long is a hang.
        .arg("-timeout=10")
        .stdout(log.try_clone()?)
        .stderr(log);
    println!("xtask: $ {} (log: {})", super::show(&cmd), log_path.display());
    let since = SystemTime::now();
    let status = cmd.status().context("cannot start `cargo fuzz run`")?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    if status.success() {
        println!("xtask: fuzz {target}: {}", summary(&text));
        return Ok(());
    }

    // Show the panic message and libFuzzer's report, without backtrace frames.
    let lines: Vec<&str> = text.lines().filter(|l| !is_backtrace_frame(l)).collect();
    let start = lines
        .iter()
        .position(|l| l.contains("panicked at") || l.contains("ERROR: libFuzzer"))
        .unwrap_or(lines.len().saturating_sub(40));
    for line in lines.iter().skip(start).take(40) {
        println!("    {line}");
    }
    let crashes = new_files(&artifacts, since);
    if crashes.is_empty() {
        bail!("`cargo fuzz run {target}` failed ({status}); full log: {}", log_path.display());
    }
    for input in &crashes {
        println!("xtask: fuzz {target}: crashing input: {}", input.display());
        println!(
            "xtask:   reproduce: cargo fuzz run {} {target} {}",
            BUILD_FLAGS.join(" "),
            input.display()
        );
    }
    bail!("crash found ({status}); full log: {}", log_path.display())
}

/// `  12: std::rt::lang_start` or `      at src/main.rs:3:5`.
fn is_backtrace_frame(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("at ") || t.split_once(": ").is_some_and(|(n, _)| n.parse::<u32>().is_ok())
}

/// Runs and speed from libFuzzer's closing lines (`#N DONE ... exec/s: E ...`).
fn summary(log: &str) -> String {
    let done = log.lines().rev().find(|l| l.contains("DONE"));
    let field = |name: &str| {
        done.and_then(|l| {
            let rest = &l[l.find(name)? + name.len()..];
            rest.split_whitespace().next().map(str::to_string)
        })
    };
    let runs = done.and_then(|l| l.split_whitespace().next()).map(|r| r.trim_start_matches('#'));
    format!(
        "ok, {} runs, {} exec/s, coverage {}, corpus {}",
        runs.unwrap_or("?"),
        field("exec/s:").unwrap_or_else(|| "?".into()),
        field("cov:").unwrap_or_else(|| "?".into()),
        field("corp:").unwrap_or_else(|| "?".into()),
    )
}

/// Files in `dir` written since `since` (libFuzzer's crash, leak, timeout or OOM inputs).
fn new_files(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t >= since))
        .map(|e| e.path())
        .collect()
}
