//! The native figure of the transfer path's CPU cost (both sides in one thread):
//! `cargo run --release -p weft-core --example transfer_cpu`. The browser's figure comes
//! from `benchTransferCpu` in the same code.
#![allow(clippy::expect_used)]

use std::time::Instant;

use chacha20::ChaCha20Rng;
use chacha20::rand_core::SeedableRng;

fn main() {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let start = Instant::now();
    let (transfer, hashing) =
        weft_core::perf::transfer_throughput(&mut rng, 256 << 20, || start.elapsed())
            .expect("the transfer benchmark runs");
    println!("transfer {:.1} MB/s, hashing {:.1} MB/s", transfer.mb_per_s(), hashing.mb_per_s());
}
