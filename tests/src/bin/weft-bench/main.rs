//! `weft-bench <name>`: Weft's benchmarks, one binary (`cargo xtask bench <name>` runs it in
//! a release build). Each benchmark prints `BENCH <metric> <value> <unit>` lines; the
//! module of each says what it measures and against which baseline.

mod native;
mod session;
mod signal;
mod transfer;
mod transport;

use anyhow::{Result, bail};

fn main() -> Result<()> {
    let name = std::env::args().nth(1).unwrap_or_default();
    match name.as_str() {
        "native" => native::main(),
        "session" => session::main(),
        "signal" => signal::main(),
        "transfer" => transfer::main(),
        "transport" => transport::main(),
        _ => bail!("usage: weft-bench native|session|signal|transfer|transport (got {name:?})"),
    }
}
