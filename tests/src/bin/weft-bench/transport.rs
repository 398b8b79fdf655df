//! `cargo xtask bench transport`: the native transport's cipher cost, no browser needed
//! (the `session` benchmark prints the same lines beside its browser metrics).
//!
//! - `transport_seal_native_gb_s`: [`weft_core::transport::Session::seal_into`] (no
//!   allocation) on this build's cipher (`ring`'s assembly ChaCha20-Poly1305),
//!   [`PACKET`]-byte packets, one thread.
//! - `transport_seal_rustcrypto_gb_s`: the baseline: the same session code and packets on
//!   the RustCrypto cipher (the one the wasm build uses), in the same process.
//! - `transport_seal_native_vs_rustcrypto_ratio` = native ÷ RustCrypto.
//! - `transport_seal_open_native_mb_s`: seal and open through the `Vec` APIs, both
//!   operations counted in one figure (the metric `session` has always printed, comparable
//!   with its WASM twin).
//!
//! Each is the median of [`RUNS`] runs, the measurements alternating within the run.
//! GB and MB are 10^9 and 10^6 bytes.

use crate::median;
use std::time::Instant;

use anyhow::Result;
use chacha20::ChaCha20Rng;
use chacha20::rand_core::SeedableRng;
use weft_core::aead::{PacketCipher, RustCryptoChaCha20Poly1305};
use weft_core::perf::{self, Throughput};

/// Plaintext bytes per packet.
pub const PACKET: usize = 1400;
/// Bytes sealed and opened per seal+open run (the WASM measurement uses the same).
pub const SEAL_OPEN_BYTES: u64 = 64 * 1024 * 1024;
const SEAL_BYTES: u64 = 256 * 1024 * 1024;
const RUNS: usize = 7;

/// Medians of the native transport measurements.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub seal_native_gb_s: f64,
    pub seal_rustcrypto_gb_s: f64,
    pub seal_open_native_mb_s: f64,
}

/// Runs the measurements [`RUNS`] times, alternating, and returns the medians.
pub fn measure() -> Result<Report> {
    // Any seed will do: only speed is measured.
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let start = Instant::now();
    let clock = || start.elapsed();
    let (mut native, mut rustcrypto, mut seal_open) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let run: Throughput =
            perf::transport_seal_throughput::<PacketCipher>(&mut rng, PACKET, SEAL_BYTES, clock)?;
        native.push(run.gb_per_s());
        let run = perf::transport_seal_throughput::<RustCryptoChaCha20Poly1305>(
            &mut rng, PACKET, SEAL_BYTES, clock,
        )?;
        rustcrypto.push(run.gb_per_s());
        let run = perf::transport_throughput(&mut rng, PACKET, SEAL_OPEN_BYTES, clock)?;
        seal_open.push(run.mb_per_s());
    }
    Ok(Report {
        seal_native_gb_s: median(native),
        seal_rustcrypto_gb_s: median(rustcrypto),
        seal_open_native_mb_s: median(seal_open),
    })
}

impl Report {
    /// Prints the `BENCH` lines.
    pub fn print(&self) {
        println!("BENCH transport_seal_native_gb_s {:.2} GB/s", self.seal_native_gb_s);
        println!("BENCH transport_seal_rustcrypto_gb_s {:.2} GB/s", self.seal_rustcrypto_gb_s);
        println!(
            "BENCH transport_seal_native_vs_rustcrypto_ratio {:.2} x",
            self.seal_native_gb_s / self.seal_rustcrypto_gb_s
        );
        println!("BENCH transport_seal_open_native_mb_s {:.1} MB/s", self.seal_open_native_mb_s);
    }
}

pub fn main() -> Result<()> {
    measure()?.print();
    Ok(())
}
