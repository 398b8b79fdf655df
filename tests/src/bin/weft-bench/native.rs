//! `cargo xtask bench native`: file transfer with the native peer (`weft-peer`, release
//! build, real processes on loopback) through the real signaling server, in one run:
//!
//! - `native_transfer_mb_s`: a [`FILE_SIZE`] file from `weft-peer send` to `weft-peer
//!   receive --once` (encrypted, every chunk verified, written to disk and moved into
//!   place), timed at the receiver from its `accepted` line to its `saved` line (the
//!   sender's hashing happens before the offer and is reported on its own:
//!   `native_sender_hash_mb_s`).
//! - `native_raw_datachannel_mb_s`: the baseline between the **same two kinds of process**:
//!   `weft-peer bench-raw` on both sides opens a plain webrtc-rs connection, built as
//!   Weft's are (the same settings, `native-peer/src/rtc.rs`'s `Tuning::WEFT`), with one
//!   reliable ordered data channel (what Weft's control channel is), signaled over the
//!   encrypted Weft session's messages; the sender pumps the same number of bytes in
//!   64 KiB messages with backpressure (`send` waits while 8 MiB are unacknowledged);
//!   timed at the receiver from the first byte to the last. No AEAD, no hashing, no disk:
//!   the transport's ceiling. (Doing the baseline in-process would have needed Weft
//!   in-process too for a fair comparison, and the native peer is a binary, so both run
//!   as two processes.)
//! - `native_raw_untuned_mb_s`: the same with `bench-raw --untuned`, every connection of
//!   both processes built with webrtc-rs's defaults; `native_raw_tuned_vs_untuned_ratio`
//!   is what Weft's tuning gives (`native-peer/WEBRTC_RS.md` says what each setting did).
//! - `native_transfer_vs_raw_ratio` = Weft ÷ raw (the tuned raw channel).
//! - `browser_native_mb_s`: real headless Chromium sends the file to `weft-peer receive`,
//!   timed the same way (needs Chromium and the built bundle; skipped, saying why, if
//!   they are missing).
//!
//! Weft, untuned raw and raw runs alternate, [`RUNS`] of each (`WEFT_BENCH_RUNS` sets
//! another number); each speed is the median of its runs, and each ratio the median of the
//! paired (back to back) runs' ratios, less swayed by the machine's load drifting.
//! `WEFT_BENCH_MB` sets the file size in MiB.
//! Prints `BENCH <metric> <value> <unit>` lines (MB = 10^6 bytes).

use crate::median;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weft_signal::{Limits, Server};
use weft_tests::files::{self, Scratch, TestFile, blake3_of, generate, mib, send_files, upload};
use weft_tests::mitm::local_ice_ip;
use weft_tests::native::{NativePeer, command, config_dir, weft_peer_bin};
use weft_tests::{ChromeDriver, browser_missing, js, start_server};

const RUNS: usize = 5;

fn runs() -> usize {
    crate::bench_runs(RUNS)
}

const LONG: Duration = Duration::from_secs(1800);
const WAIT: Duration = Duration::from_secs(60);
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn file_size() -> u64 {
    let mb = std::env::var("WEFT_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    mib(mb)
}

fn mb_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e6
}

/// Waits for `receiver`'s `accepted` and then `saved` lines; the time between them.
async fn time_receive(receiver: &mut NativePeer, file: &TestFile) -> Result<Duration> {
    receiver.expect_event("accepted", LONG).await?;
    let start = Instant::now();
    let saved = receiver.expect_event("saved", LONG).await?;
    let took = start.elapsed();
    if saved["root"] != file.root.as_str() {
        bail!("saved the wrong file: {saved}");
    }
    Ok(took)
}

/// The received file must be the sent one.
fn check(received: &Path, file: &TestFile) -> Result<()> {
    let root = blake3_of(received)?;
    if root != file.root {
        bail!("{} does not match the sent file", received.display());
    }
    Ok(())
}

/// One Weft transfer native → native; returns the receiver's time and the sender's
/// hashing time.
async fn weft_run(
    server: &Server,
    scratch: &Path,
    file: &TestFile,
    run: usize,
) -> Result<(Duration, Duration)> {
    let invite = "Q".repeat(43);
    let downloads = scratch.join(format!("native-in-{run}"));
    let (dir_a, dir_b) = (config_dir("bench-ada")?, config_dir("bench-bea")?);
    let mut receive = command(&server.ws_url(), &dir_b, LOOPBACK)?;
    receive.args(["--invite", &invite, "--name", "Bea", "receive", "--once"]);
    receive.args(["--accept-from", "Ada", "--dir"]).arg(&downloads);
    let mut bea = NativePeer::spawn(receive)?;
    bea.expect_event("receiving", WAIT).await?;
    let mut send = command(&server.ws_url(), &dir_a, LOOPBACK)?;
    send.args(["--invite", &invite, "--name", "Ada", "send", "--to", "Bea"]).arg(&file.path);
    let mut ada = NativePeer::spawn(send)?;
    let hash_start = Instant::now();
    ada.expect_event("hashed", LONG).await?;
    let hashed = hash_start.elapsed();
    let (took, sent) = tokio::join!(time_receive(&mut bea, file), ada.wait_exit(LONG));
    let took = took?;
    if !sent?.success() {
        bail!("weft-peer send failed: {:?}", ada.seen);
    }
    if !bea.wait_exit(WAIT).await?.success() {
        bail!("weft-peer receive failed: {:?}", bea.seen);
    }
    check(&downloads.join(&file.name), file)?;
    let _ = std::fs::remove_dir_all(&downloads);
    for dir in [dir_a, dir_b] {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok((took, hashed))
}

/// One raw data channel run between two `weft-peer bench-raw` processes, with Weft's
/// settings or (`untuned`) webrtc-rs's defaults: MB/s.
async fn raw_run(server: &Server, size: u64, untuned: bool) -> Result<f64> {
    let invite = "Q".repeat(43);
    let (dir_a, dir_b) = (config_dir("raw-ada")?, config_dir("raw-bea")?);
    let mut recv = command(&server.ws_url(), &dir_b, LOOPBACK)?;
    recv.args(["--invite", &invite, "--name", "Bea", "bench-raw", "--peer", "Ada"]);
    if untuned {
        recv.arg("--untuned");
    }
    let mut bea = NativePeer::spawn(recv)?;
    let mut send = command(&server.ws_url(), &dir_a, LOOPBACK)?;
    send.args(["--invite", &invite, "--name", "Ada", "bench-raw", "--peer", "Bea", "--bytes"]);
    send.arg(size.to_string());
    if untuned {
        send.arg("--untuned");
    }
    let mut ada = NativePeer::spawn(send)?;
    let (done, sent) = tokio::join!(bea.expect_event("raw_done", LONG), ada.wait_exit(LONG));
    let done = done?;
    if !sent?.success() {
        bail!("bench-raw send failed: {:?}", ada.seen);
    }
    bea.wait_exit(WAIT).await?;
    if done["bytes"].as_u64() != Some(size) {
        bail!("the raw receiver got {done}");
    }
    for dir in [dir_a, dir_b] {
        let _ = std::fs::remove_dir_all(dir);
    }
    done["mb_s"].as_f64().context("no mb_s")
}

/// Chromium → native: the receiver's time.
async fn browser_run(
    server: &Server,
    scratch: &Path,
    file: &TestFile,
    run: usize,
) -> Result<Duration> {
    let ip = local_ice_ip()?;
    let driver = ChromeDriver::start().await?;
    let alice = driver.browser().await?;
    alice.goto(server.url()).await?;
    let invite = "g".repeat(43);
    files::start_join(&alice, &invite, "Alice").await?;
    let downloads = scratch.join(format!("browser-in-{run}"));
    let dir = config_dir("bench-nat")?;
    let mut receive = command(&server.ws_url(), &dir, ip)?;
    receive.args(["--invite", &invite, "--name", "Nat", "receive", "--once"]);
    receive.args(["--accept-from", "Alice", "--dir"]).arg(&downloads);
    let mut nat = NativePeer::spawn(receive)?;
    files::wait_connected(&alice, 1).await?;
    let peers = js(&alice, "return window.t.session.peers();").await?;
    let nat_id = peers[0]["peerId"].as_str().context("no peer id")?.to_string();
    upload(&alice, "f", &[file]).await?;
    send_files(&alice, "f", &[(file, file.name.as_str())], &nat_id, LONG).await?;
    let took = time_receive(&mut nat, file).await?;
    if !nat.wait_exit(WAIT).await?.success() {
        bail!("weft-peer receive failed: {:?}", nat.seen);
    }
    check(&downloads.join(&file.name), file)?;
    let _ = alice.quit().await;
    let _ = std::fs::remove_dir_all(&downloads);
    let _ = std::fs::remove_dir_all(dir);
    Ok(took)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
pub async fn main() -> Result<()> {
    let bin = weft_peer_bin()?;
    println!("  weft-peer: {}", bin.display());
    let size = file_size();
    let scratch = Scratch::new("bench-native")?;
    println!("  files in {}", scratch.path().display());
    let file = generate(scratch.path(), "bench.bin", size, 42)?;
    let server = start_server(Limits::default()).await?;

    let mut weft = Vec::new();
    let mut hash = Vec::new();
    let mut untuned = Vec::new();
    let mut raw = Vec::new();
    for run in 0..runs() {
        let (took, hashed) = weft_run(&server, scratch.path(), &file, run).await?;
        println!("  run {run}: weft {:.1} MB/s ({took:?})", mb_s(size, took));
        weft.push(mb_s(size, took));
        hash.push(mb_s(size, hashed));
        let u = raw_run(&server, size, true).await?;
        println!("  run {run}: raw untuned {u:.1} MB/s");
        untuned.push(u);
        let r = raw_run(&server, size, false).await?;
        println!("  run {run}: raw {r:.1} MB/s");
        raw.push(r);
    }
    let paired = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(a, b)| a / b).collect());
    let shown = |a: &[f64], b: &[f64]| {
        a.iter().zip(b).map(|(a, b)| format!("{:.2}", a / b)).collect::<Vec<_>>().join(" ")
    };
    println!("  paired ratios weft/raw: {}", shown(&weft, &raw));
    println!("  paired ratios raw/untuned: {}", shown(&raw, &untuned));
    let (vs_raw, tuning_gain) = (paired(&weft, &raw), paired(&raw, &untuned));
    println!("BENCH native_transfer_mb_s {:.1} MB/s", median(weft));
    println!("BENCH native_raw_untuned_mb_s {:.1} MB/s", median(untuned));
    println!("BENCH native_raw_datachannel_mb_s {:.1} MB/s", median(raw));
    println!("BENCH native_raw_tuned_vs_untuned_ratio {tuning_gain:.2} x");
    println!("BENCH native_transfer_vs_raw_ratio {vs_raw:.2} x");
    println!("BENCH native_sender_hash_mb_s {:.1} MB/s", median(hash));

    match browser_missing() {
        Some(reason) => println!("  SKIPPED browser_native_mb_s: {reason}"),
        None => {
            let mut browser = Vec::new();
            for run in 0..runs() {
                let took = browser_run(&server, scratch.path(), &file, run).await?;
                println!("  run {run}: browser -> native {:.1} MB/s", mb_s(size, took));
                browser.push(mb_s(size, took));
            }
            println!("BENCH browser_native_mb_s {:.1} MB/s", median(browser));
        }
    }
    server.shutdown(Duration::from_secs(2)).await;
    drop(scratch);
    Ok(())
}
