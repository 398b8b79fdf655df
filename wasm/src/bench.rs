//! Measurements for `cargo xtask bench session` (and `transfer`), run in the page by the
//! benchmark driver.
//! They call the same core routines as the native side of the benchmark.

use std::time::Duration;

use wasm_bindgen::prelude::*;
use weft_core::network::{Network, PassphraseParams};
use weft_core::perf;

use crate::session::{now, rng};

/// Seals and opens `total_bytes` in packets of `packet_len` (one thread) and returns the
/// throughput in MB/s.
#[wasm_bindgen(js_name = benchTransport)]
pub fn bench_transport(packet_len: usize, total_bytes: f64) -> Result<f64, JsError> {
    let total = total_bytes.max(0.0) as u64;
    let result = perf::transport_throughput(&mut rng(), packet_len, total, now)
        .map_err(|e| JsError::new(&e.to_string()))?;
    Ok(result.mb_per_s())
}

/// Milliseconds that joining a passphrase network spends in Argon2id (both derivations,
/// with the parameters every peer uses).
#[wasm_bindgen(js_name = benchPassphraseKdf)]
pub fn bench_passphrase_kdf() -> Result<f64, JsError> {
    let start: Duration = now();
    Network::from_passphrase(
        "bench network",
        "a passphrase of ordinary length",
        &PassphraseParams::INTERACTIVE,
    )
    .map_err(|e| JsError::new(&e.to_string()))?;
    Ok((now() - start).as_secs_f64() * 1000.0)
}

/// Moves `total_bytes` between two transfer engines in this thread (requests, reads from
/// memory, seal/open, BLAKE3 verification): `[transfer MB/s, hashing MB/s]`. Only in the
/// bundle `cargo xtask bench transfer` builds (the `bench-hooks` feature).
#[cfg(feature = "bench-hooks")]
#[wasm_bindgen(js_name = benchTransferCpu)]
pub fn bench_transfer_cpu(total_bytes: f64) -> Result<Vec<f64>, JsError> {
    let total = total_bytes.max(0.0) as u64;
    let (transfer, hashing) = perf::transfer_throughput(&mut rng(), total, now)
        .map_err(|e| JsError::new(&e.to_string()))?;
    Ok(vec![transfer.mb_per_s(), hashing.mb_per_s()])
}
