//! `weft-bench <name>`: Weft's benchmarks, one binary (`cargo xtask bench <name>` runs it in
//! a release build). Each benchmark prints `BENCH <metric> <value> <unit>` lines; the
//! module of each says what it measures and against which baseline.

mod native;
mod relay;
mod session;
mod signal;
mod signal_cluster;
mod signal_load;
mod transfer;
mod transport;
mod tun;

use anyhow::{Context, Result, bail};

/// The median of `v` (the mean of the middle two for an even count; 0 for none).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// How many alternating runs a benchmark makes: `WEFT_BENCH_RUNS`, else `default`.
pub(crate) fn bench_runs(default: usize) -> usize {
    std::env::var("WEFT_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(default).max(1)
}

/// CPU time (user + system) a process used so far, in milliseconds.
pub(crate) fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) end with ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("bad /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).context("no utime")?;
    let sys: u64 = fields.get(12).and_then(|f| f.parse().ok()).context("no stime")?;
    // Linux reports in USER_HZ, 100 per second.
    Ok((ticks + sys) as f64 * 10.0)
}

fn main() -> Result<()> {
    let name = std::env::args().nth(1).unwrap_or_default();
    match name.as_str() {
        "native" => native::main(),
        "relay" => relay::main(),
        "session" => session::main(),
        "signal" => signal::main(),
        "transfer" => transfer::main(),
        "transport" => transport::main(),
        "tun" => tun::main(),
        _ => {
            bail!(
                "usage: weft-bench native|relay|session|signal|transfer|transport|tun (got \
                 {name:?})"
            )
        }
    }
}
