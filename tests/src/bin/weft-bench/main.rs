//! `weft-bench <name>`: Weft's benchmarks, one binary (`cargo xtask bench <name>` runs it in
//! a release build). Each benchmark prints `BENCH <metric> <value> <unit>` lines; the
//! module of each says what it measures and against which baseline.

mod native;
mod relay;
mod session;
mod signal;
mod transfer;
mod transport;

use anyhow::{Result, bail};

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

fn main() -> Result<()> {
    let name = std::env::args().nth(1).unwrap_or_default();
    match name.as_str() {
        "native" => native::main(),
        "relay" => relay::main(),
        "session" => session::main(),
        "signal" => signal::main(),
        "transfer" => transfer::main(),
        "transport" => transport::main(),
        _ => {
            bail!("usage: weft-bench native|relay|session|signal|transfer|transport (got {name:?})")
        }
    }
}
