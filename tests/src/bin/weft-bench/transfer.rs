//! `cargo xtask bench transfer`: file transfer between real headless Chromium processes
//! (Alice sends, Bob receives, Carol is a second seeder: she got the files from Alice
//! first, so she holds Alice's capability for them), all in one run:
//!
//! - `weft_transfer_mb_s`: a [`FILE_SIZE`] file, encrypted and verified, from `acceptOffer`
//!   to `file_complete` in Bob's page. Each run sends a `File` the page has not seen, so
//!   it is offered at once and hashed while the chunks flow, as a user's first send is
//!   (the page's hashing alone is reported on its own: `sender_hash_mb_s`).
//! - `raw_datachannel_mb_s`: the baseline, between the same two browsers and the same
//!   `File`: a separate plain `RTCPeerConnection` pair (signaled over the Weft session's
//!   messages), one reliable ordered data channel, the sender reading the file with
//!   `Blob.slice` ([`READ`] bytes ahead) and sending [`MESSAGE`]-byte messages with
//!   `bufferedAmount` backpressure (pause above [`HIGH_WATER`], resume on
//!   `bufferedamountlow` at [`LOW_WATER`]: the same marks Weft's control channel uses). Its
//!   time runs from the first send to the last byte at the receiver (both pages' clocks are
//!   the machine's clock: `performance.timeOrigin + performance.now()`).
//! - `click_to_first_byte_ms`: from `sendFiles` of a sparse 10 GiB file to Bob's first
//!   stored byte (offered at once, hashed while chunks flow), beside
//!   `click_to_first_byte_hash_first_est_ms`, what hashing it first would cost (the
//!   page's hashing speed on [`FILE_SIZE`] in the same run, scaled). `WEFT_BENCH_PARTS=click`.
//! - `transfer_vs_raw_from_click_ratio`: raw time ÷ Weft time from `sendFiles` to Bob's
//!   `file_complete` (the streamed path: offer before root), median over the paired runs.
//! - `transfer_vs_raw_ratio` = Weft ÷ raw (medians); `transfer_vs_raw_paired_median`, the
//!   median over runs of each run's Weft ÷ raw (measured back to back); `swarm_mb_s` (Alice and Carol seed, Bob fetches
//!   from both) and `swarm_vs_single_ratio` = swarm ÷ single.
//! - `receiver_peak_rss_mb`: Bob's renderer process, sampled every 200 ms while it receives
//!   a [`RSS_FILE_SIZE`] file; also the peak sum over Bob's whole Chromium process tree.
//!
//! - `swarm_vs_single_uplink_ratio`: the same, with every seeder's upload limited to
//!   [`UPLINK`] (`setUploadLimit`), as a home uplink would limit it: on loopback nothing
//!   else limits a seeder but the CPU, which one transfer already fills on a small
//!   machine. `uplink_single_mb_s` and `uplink_swarm_mb_s`, a [`UPLINK_FILE_SIZE`] file.
//! - Where the CPU went in each run: CPU milliseconds per MB of each browser's process
//!   tree and of its busiest threads, and how busy the whole machine was
//!   (`weft_machine_busy_pct` near 100 means the transfer was limited by this machine's
//!   CPU, and a second seeder cannot make it faster).
//!
//! - Data-channel messages per MB each way and their mean size, for the raw page and for
//!   Weft (every `RTCDataChannel.send` counted in both pages), printed with each run.
//! - `WEFT_BENCH_RAW_ALT=<bytes>`: each pair also times a raw run with messages of that
//!   size (say 262144, Chromium's limit), before or after the usual one by turns, with its
//!   CPU per MB: what Chromium's per-message cost is (`core/TRANSFER.md`).
//!   `WEFT_BENCH_RAW_MESSAGE=<bytes>` changes the raw page's message size itself.
//! - `WEFT_BENCH_PIN=1`: each run also measures a raw and a Weft transfer with each
//!   browser pinned to a core of its own (`taskset`, Alice's whole process tree on CPU 0
//!   and Bob's on CPU 1), as two users' machines would run them: `BENCH pinned_…` figures
//!   beside the shared ones.
//! - `WEFT_BENCH_BASELINE_WEB_ROOT`: another build of the bundle (say main's, copied aside)
//!   served to a second pair of browsers; each run also times a Weft transfer there,
//!   before or after this build's by turns (alternating), for a same-run A/B:
//!   `BENCH baseline_…` figures. Copy main's `target/web-dist-bench` (what this bench
//!   serves: the module with `benchTransferCpu`) for the baseline's CPU floor too; a
//!   shipped `target/web-dist` has no floor.
//!
//! `WEFT_BENCH_PARTS=speed` (or `rss`) runs only that part; `pairs` only the raw/Weft
//! pairs of the speed part (no uplink or swarm runs). `WEFT_BENCH_PROFILE=1` runs
//! the senders' and receiver's main threads under the DevTools sampling profiler during
//! each Weft run and prints the functions with the most self time. Each speed is the median of
//! [`RUNS`] runs (`WEFT_BENCH_RUNS` sets another number). Prints `BENCH <metric> <value> <unit>` lines
//! (MB = 10^6 bytes).

use crate::median;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use thirtyfour::WebDriver;
use weft_tests::files::{
    Member, Net, Scratch, TestFile, accept, add_hook, call, entries_js, generate, hash_downloaded,
    mib, send_files, upload, wait_complete, wait_offer,
};
use weft_tests::{browser_missing, start_server_serving};
use weft_tests::{js, wait_for};

const FILE_SIZE: u64 = mib(256);
const RSS_FILE_SIZE: u64 = mib(2048);
/// The file of `click_to_first_byte_ms` (sparse: it takes no disk).
const CLICK_FILE_SIZE: u64 = mib(10 * 1024);
/// Each seeder's upload limit (`setUploadLimit`) in the uplink runs: 5 MB/s, a 40 Mbit/s
/// home uplink. On loopback nothing else limits a seeder but this machine's CPU, which one
/// transfer already fills; the uplink runs show what a second seeder is for.
const UPLINK: f64 = 5e6;
const UPLINK_FILE_SIZE: u64 = mib(64);
const RUNS: usize = 5;

fn runs() -> usize {
    std::env::var("WEFT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(RUNS)
}
const MESSAGE: u64 = 64 * 1024;

/// The raw page's message size: [`MESSAGE`], or `WEFT_BENCH_RAW_MESSAGE` bytes (up to
/// Chromium's 256 KiB) to see what Chromium's per-message cost is.
fn raw_message() -> u64 {
    std::env::var("WEFT_BENCH_RAW_MESSAGE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=256 * 1024).contains(n))
        .unwrap_or(MESSAGE)
}
const READ: u64 = 1024 * 1024;
const HIGH_WATER: u64 = 1024 * 1024;
const LOW_WATER: u64 = 256 * 1024;
const LONG: Duration = Duration::from_secs(1800);
/// A download whose state has not changed for this long has stalled.
const STALL: Duration = Duration::from_secs(120);

/// The raw data channel baseline, in both pages: signaling over the Weft session's
/// messages (prefix `WEFTRAW `), receiver counting bytes, sender with backpressure.
const RAW_JS: &str = r#"
  const t = window.t;
  t.raw = { runs: {} };
  t.rawMsg = (peerId, obj) => t.session.sendMessage("WEFTRAW " + JSON.stringify(obj), peerId);
  t.rawState = (run) => (t.raw.runs[run] ??= { chain: Promise.resolve(), bytes: 0, first: null, last: null });
  t.rawHandle = async (peerId, msg, st) => {
    if (msg.kind === "offer") {
      const pc = (st.pc = new t.NativePC({ iceServers: [] }));
      st.expected = msg.size;
      pc.onicecandidate = (e) => { if (e.candidate) t.rawMsg(peerId, { run: msg.run, kind: "cand", c: e.candidate.toJSON() }); };
      pc.ondatachannel = (e) => {
        const dc = e.channel;
        dc.binaryType = "arraybuffer";
        dc.onmessage = (m) => {
          const now = performance.timeOrigin + performance.now();
          if (st.first === null) st.first = now;
          st.bytes += m.data.byteLength;
          if (st.bytes >= st.expected && st.last === null) { st.last = now; dc.send("done"); }
        };
      };
      await pc.setRemoteDescription(msg.sdp);
      await pc.setLocalDescription();
      t.rawMsg(peerId, { run: msg.run, kind: "answer", sdp: pc.localDescription.toJSON() });
    } else if (msg.kind === "answer") {
      await st.pc.setRemoteDescription(msg.sdp);
    } else if (msg.kind === "cand") {
      await st.pc.addIceCandidate(msg.c);
    }
  };
  t.on.push((ev) => {
    if (ev.type !== "message" || !ev.text.startsWith("WEFTRAW ")) return;
    const msg = JSON.parse(ev.text.slice(8));
    const st = t.rawState(msg.run);
    st.chain = st.chain.then(() => t.rawHandle(ev.peerId, msg, st)).catch((e) => t.logs.push("raw: " + e));
  });
  t.rawSend = async (run, file, peerId, high, low, msgSize, readSize) => {
    const st = t.rawState(run);
    const pc = (st.pc = new t.NativePC({ iceServers: [] }));
    const dc = pc.createDataChannel("raw", { ordered: true });
    dc.binaryType = "arraybuffer";
    pc.onicecandidate = (e) => { if (e.candidate) t.rawMsg(peerId, { run, kind: "cand", c: e.candidate.toJSON() }); };
    const opened = new Promise((resolve, reject) => { dc.onopen = resolve; dc.onerror = reject; });
    const done = new Promise((resolve) => { dc.onmessage = (m) => resolve(m.data); });
    await pc.setLocalDescription();
    t.rawMsg(peerId, { run, kind: "offer", size: file.size, sdp: pc.localDescription.toJSON() });
    await opened;
    dc.bufferedAmountLowThreshold = low;
    const start = performance.timeOrigin + performance.now();
    let next = file.slice(0, readSize).arrayBuffer();
    for (let off = 0; off < file.size; off += readSize) {
      const buf = await next;
      if (off + readSize < file.size) next = file.slice(off + readSize, off + 2 * readSize).arrayBuffer();
      for (let p = 0; p < buf.byteLength; p += msgSize) {
        if (dc.bufferedAmount > high) {
          await new Promise((resolve) => { dc.onbufferedamountlow = () => { dc.onbufferedamountlow = null; resolve(); }; });
        }
        dc.send(new Uint8Array(buf, p, Math.min(msgSize, buf.byteLength - p)));
      }
    }
    await done;
    pc.close();
    return { start };
  };
  return true;
"#;

/// The receiver accepts offers of `t.bench.current` (by root or name) at once, and records
/// the times.
const RECEIVER_HOOK: &str = r#"
  const c = t.bench && t.bench.current;
  if (!c) return;
  const at = () => performance.timeOrigin + performance.now();
  // Offered before it is hashed, a file's key is a stream key (its root unknown): every
  // later event names it by that key.
  const item = ev.type === "offer" && ev.items.find((i) => i.key === c.root || i.path === c.name);
  if (item) {
    c.acceptAt = at();
    c.key = item.key;
    try {
      s.acceptOffer(ev.peerId, ev.offerId);
    } catch (e) {
      c.failed = "acceptOffer: " + e;
    }
  } else if (ev.type === "progress" && ev.key === c.key && ev.doneBytes > 0) {
    c.firstByteAt ??= at();
  } else if (ev.type === "file_complete" && ev.key === c.key) {
    if (ev.root === c.root) c.completeAt = at();
    else c.failed = "completed with root " + ev.root;
  } else if (ev.type === "file_failed" && ev.key === c.key) {
    c.failed = ev.reason;
  } else if (ev.type === "source_added" && ev.key === c.key) {
    c.sources.push(ev.peerId);
  } else if (ev.type === "chunk_rejected") {
    c.rejected += 1;
  }
"#;

/// Counts what the receiver's page asks of its download writer (a worker) and what it
/// answers, by wrapping `Worker.prototype.postMessage`: a stalled download's dump then says
/// whether writes were sent and not answered (the worker), answered and not taken in (the
/// page), or never sent. (Session 11 saw two downloads stop with all 192 chunks of the
/// receiver's budget handed to the writer and none acknowledged.)
const WRITER_STATS_JS: &str = r#"
  if (window.__weftWriter) return true;
  const st = window.__weftWriter = { sent: 0, sentChunks: 0, answers: 0, answeredChunks: 0, failed: 0, lastSent: null, lastAnswer: null };
  const seen = new WeakSet();
  const post = Worker.prototype.postMessage;
  Worker.prototype.postMessage = function (msg, transfer) {
    if (msg && typeof msg.op === "string") {
      if (!seen.has(this)) {
        seen.add(this);
        this.addEventListener("message", (ev) => {
          const m = ev.data || {};
          if (m.id === undefined && !Array.isArray(m.ids)) return;
          st.answers += 1;
          if (Array.isArray(m.ids)) st.answeredChunks += m.ids.length;
          if (!m.ok) st.failed += 1;
          st.lastAnswer = { ok: m.ok, error: m.error || null, t: performance.now() };
        });
      }
      st.sent += 1;
      if (msg.op === "writes") st.sentChunks += msg.ids.length;
      st.lastSent = { op: msg.op, name: msg.name || (msg.names && msg.names[0]) || null, t: performance.now() };
    }
    return post.call(this, msg, transfer);
  };
  return true;
"#;

/// Counts every data-channel message a page sends, by channel label (`raw` for the
/// baseline, `control` for Weft's reliable channel), by wrapping
/// `RTCDataChannel.prototype.send` (wasm-bindgen's glue calls `channel.send` too).
const SEND_STATS_JS: &str = r#"
  if (window.__weftSends) return true;
  const st = window.__weftSends = {};
  const send = RTCDataChannel.prototype.send;
  RTCDataChannel.prototype.send = function (data) {
    const s = (st[this.label] ??= { n: 0, bytes: 0 });
    s.n += 1;
    s.bytes += typeof data === "string" ? data.length : data.byteLength;
    return send.call(this, data);
  };
  return true;
"#;

/// Messages and bytes a page has sent so far, summed over its channels.
async fn sends(browser: &WebDriver) -> Result<(f64, f64)> {
    let st = js(browser, "return window.__weftSends || {};").await?;
    let (mut n, mut bytes) = (0.0, 0.0);
    for v in st.as_object().into_iter().flat_map(|o| o.values()) {
        n += v["n"].as_f64().unwrap_or(0.0);
        bytes += v["bytes"].as_f64().unwrap_or(0.0);
    }
    Ok((n, bytes))
}

/// Counts the messages Alice and Bob send during one run.
struct SendMeter<'a> {
    pages: [&'a WebDriver; 2],
    before: [(f64, f64); 2],
}

impl<'a> SendMeter<'a> {
    async fn start(alice: &'a WebDriver, bob: &'a WebDriver) -> Result<Self> {
        Ok(Self { pages: [alice, bob], before: [sends(alice).await?, sends(bob).await?] })
    }

    /// Prints messages per MB moved and their mean size, each way.
    async fn finish(&self, what: &str, bytes: u64) -> Result<()> {
        let mb = bytes as f64 / 1e6;
        let mut parts = Vec::new();
        for ((page, before), way) in self.pages.iter().zip(&self.before).zip(["A->B", "B->A"]) {
            let (n, b) = sends(page).await?;
            let (n, b) = (n - before.0, b - before.1);
            parts.push(format!(
                "{way} {:.1} msgs/MB of {:.0} B",
                n / mb,
                if n > 0.0 { b / n } else { 0.0 }
            ));
        }
        println!("    {what} messages: {}", parts.join(", "));
        Ok(())
    }
}

/// Pins each browser's whole process tree (every thread) to one CPU (`cpus[i]` for
/// `dirs[i]`), or lets every browser use every CPU again (`None`). New threads and
/// processes inherit it. Carol (a third browser, idle in the pinned runs) shares CPU 0.
fn pin(dirs: &[(String, String)], cpus: Option<&[&str]>) -> Result<()> {
    let all = format!("0-{}", std::thread::available_parallelism().map_or(1, |n| n.get()) - 1);
    for (i, (_, dir)) in dirs.iter().enumerate() {
        let cpu = cpus.map_or(all.as_str(), |c| c[i % c.len()]);
        for p in chromium_tree(dir) {
            let out = std::process::Command::new("taskset")
                .args(["-a", "-p", "-c", cpu, &p.pid.to_string()])
                .output()
                .context("taskset (util-linux) is needed for WEFT_BENCH_PIN")?;
            // A process that exited meanwhile is no failure.
            if !out.status.success() && std::path::Path::new(&format!("/proc/{}", p.pid)).exists() {
                bail!("taskset {cpu} {}: {}", p.pid, String::from_utf8_lossy(&out.stderr));
            }
        }
    }
    Ok(())
}

fn env_on(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

fn mb_s(bytes: u64, ms: f64) -> f64 {
    bytes as f64 / 1e6 / (ms / 1e3)
}

/// Bob's download of `file` from whoever offers it (Alice) and whoever shares it:
/// milliseconds from `acceptOffer` to `file_complete`, and the sources it used.
async fn weft_run(
    alice: &WebDriver,
    bob: &WebDriver,
    bob_id: &str,
    key: &str,
    file: &TestFile,
    completed: Option<&AtomicBool>,
    cpu: &[(String, String)],
) -> Result<(Took, Vec<String>, CpuUse)> {
    let root = json!(file.root);
    let name = json!(file.name);
    call(
        bob,
        &format!(
            "if (s.transfers().downloads.some((d) => d.root === {root})) await s.forgetDownload({root});
             t.bench = t.bench || {{}};
             t.bench.current = {{ root: {root}, name: {name}, acceptAt: null, completeAt: null, sources: [], rejected: 0 }};
             return true;"
        ),
        Duration::from_secs(120),
    )
    .await?;
    let send = call(
        alice,
        &format!(
            "const t0 = performance.now(), clickAt = performance.timeOrigin + t0;
             const r = await s.sendFiles({}, {});
             return {{ ms: performance.now() - t0, clickAt, r }};",
            entries_js(key, &[(file, &file.name)]),
            json!(bob_id)
        ),
        LONG,
    )
    .await?;
    // From the offer on (the sender's hashing is measured on its own).
    let meter = CpuMeter::start(cpu);
    let profile = profiling() && !cpu.is_empty();
    if profile {
        profile_start(alice).await?;
        profile_start(bob).await?;
    }
    println!(
        "  sendFiles (offer) of {} took {:.0} ms",
        file.name,
        send["ms"].as_f64().unwrap_or(0.0)
    );
    // A download that stops moving is a bug to see, not a wait of half an hour.
    let progress = std::cell::RefCell::new((String::new(), Instant::now()));
    let c = wait_for(&format!("Bob to receive {}", file.name), LONG, || async {
        let c = js(
            bob,
            "const c = window.t.bench.current, s = window.t.session;
             c.download = s.transfers().downloads.find((d) => d.key === c.key) || null;
             c.writer = window.__weftWriter || null;
             c.now = performance.now();
             return c;",
        )
        .await?;
        if let Some(reason) = c["failed"].as_str() {
            bail!("the download failed: {reason}");
        }
        if c["completeAt"].is_number() {
            return Ok(Ok(c));
        }
        let mut p = progress.borrow_mut();
        let now = c["download"].to_string();
        if now != p.0 {
            *p = (now, Instant::now());
        } else if p.1.elapsed() > STALL {
            bail!("the download made no progress for {STALL:?}: {c}");
        }
        Ok(Err(c.to_string()))
    })
    .await?;
    let cpu_use = meter.finish(file.size);
    if profile {
        profile_stop("Alice", alice, file.size).await?;
        profile_stop("Bob", bob, file.size).await?;
    }
    let took = c["completeAt"].as_f64().unwrap_or(0.0) - c["acceptAt"].as_f64().unwrap_or(0.0);
    let from_click =
        c["completeAt"].as_f64().unwrap_or(0.0) - send["clickAt"].as_f64().unwrap_or(0.0);
    if let Some(flag) = completed {
        flag.store(true, Ordering::Relaxed);
    }
    // How the receiver's page batched its writes (cumulative over the bench).
    let w = &c["writer"];
    if let (Some(sent), Some(chunks)) = (w["sent"].as_f64(), w["sentChunks"].as_f64()) {
        println!("    writer so far: {chunks} chunks in {sent} messages");
    }
    if c["rejected"].as_u64().unwrap_or(0) > 0 {
        println!("  WARNING: {} chunks rejected", c["rejected"]);
    }
    let sources = c["sources"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let stored = hash_downloaded(bob, &file.root, LONG).await?;
    if stored != file.root {
        bail!("Bob stored bytes that hash to {stored}, not {}", file.root);
    }
    Ok((Took { accept: took, click: from_click }, sources, cpu_use))
}

/// How long a download took: from the receiver's accept, and from the sender's click
/// (`sendFiles`) to the receiver's `file_complete` (both pages' clocks are the machine's).
#[derive(Debug, Clone, Copy)]
struct Took {
    accept: f64,
    click: f64,
}

/// With `WEFT_BENCH_PROFILE=1`, the pages' main threads run under the DevTools sampling
/// profiler during each Weft run, and the functions with the most self time are printed.
fn profiling() -> bool {
    env_on("WEFT_BENCH_PROFILE")
}

async fn profile_start(browser: &WebDriver) -> Result<()> {
    let cdp = browser.cdp();
    cdp.send_raw("Profiler.enable", json!({})).await?;
    cdp.send_raw("Profiler.setSamplingInterval", json!({ "interval": 200 })).await?;
    cdp.send_raw("Profiler.start", json!({})).await?;
    Ok(())
}

/// Stops the profiler and prints the top functions by self time, in ms per MB moved.
async fn profile_stop(name: &str, browser: &WebDriver, bytes: u64) -> Result<()> {
    let out = browser.cdp().send_raw("Profiler.stop", json!({})).await?;
    let profile = &out["profile"];
    let mut names = HashMap::new();
    for node in profile["nodes"].as_array().into_iter().flatten() {
        let f = &node["callFrame"];
        let url = f["url"].as_str().unwrap_or("");
        let file = url.rsplit('/').next().unwrap_or("");
        let func = f["functionName"].as_str().filter(|n| !n.is_empty()).unwrap_or("(anonymous)");
        names.insert(node["id"].as_u64().unwrap_or(0), format!("{func} [{file}]"));
    }
    let mut self_us: HashMap<&str, f64> = HashMap::new();
    let samples = profile["samples"].as_array().cloned().unwrap_or_default();
    let deltas = profile["timeDeltas"].as_array().cloned().unwrap_or_default();
    // Each sample's time is the delta to the next one.
    for (i, id) in samples.iter().enumerate() {
        let dt = deltas.get(i + 1).and_then(|d| d.as_f64()).unwrap_or(0.0);
        if let Some(n) = names.get(&id.as_u64().unwrap_or(0)) {
            *self_us.entry(n.as_str()).or_default() += dt;
        }
    }
    let mut top: Vec<(&str, f64)> = self_us.into_iter().collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mb = bytes as f64 / 1e6;
    println!("    {name}'s main thread, self time in ms per MB:");
    let total: f64 = top.iter().map(|t| t.1).sum();
    println!("      {:6.2}  (all samples)", total / 1e3 / mb);
    for (f, us) in top.iter().take(40) {
        println!("      {:6.2}  {f}", us / 1e3 / mb);
    }
    Ok(())
}

/// One raw data channel run: milliseconds from Alice's first send to Bob's last byte.
async fn raw_run(
    alice: &WebDriver,
    bob: &WebDriver,
    bob_id: &str,
    run: usize,
    message: u64,
) -> Result<f64> {
    let sent = call(
        alice,
        &format!(
            "const f = document.getElementById('weft-upload-f').files[0];
             return await t.rawSend({run}, f, {}, {HIGH_WATER}, {LOW_WATER}, {message}, {READ});",
            json!(bob_id)
        ),
        LONG,
    )
    .await?;
    let got = js(
        bob,
        &format!(
            "const st = window.t.raw.runs[{run}]; return {{ bytes: st.bytes, last: st.last }};"
        ),
    )
    .await?;
    if got["bytes"] != FILE_SIZE {
        bail!("raw run {run}: Bob received {} bytes", got["bytes"]);
    }
    let start = sent["start"].as_f64().context("no start time")?;
    let last = got["last"].as_f64().context("no last byte time")?;
    Ok(last - start)
}

/// One process of a Chromium tree.
struct Proc {
    pid: u32,
    renderer: bool,
    rss_kb: u64,
    /// User plus system CPU time so far, in clock ticks.
    cpu_ticks: u64,
}

/// Every process of the Chromium started with `--user-data-dir=<dir>` (the browser and all
/// its descendants), with its resident memory now.
fn chromium_tree(user_data_dir: &str) -> Vec<Proc> {
    let flag = format!("--user-data-dir={user_data_dir}");
    let mut parent = HashMap::new();
    let mut cpu = HashMap::new();
    let mut cmdlines = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The fields after the command name (which may hold spaces) in parentheses.
        let Some(rest) = stat.rsplit_once(')').map(|r| r.1) else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        // Fields 4 (ppid), 14 (utime) and 15 (stime) of proc(5), counted from `state` (3).
        parent.insert(pid, u32::try_from(field(1)).unwrap_or(0));
        cpu.insert(pid, field(11) + field(12));
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            // Zygote-forked children rewrite their title into one space-separated string.
            let args: Vec<String> = cmd
                .split(|b| *b == 0 || *b == b' ')
                .map(|a| String::from_utf8_lossy(a).to_string())
                .collect();
            cmdlines.insert(pid, args);
        }
    }
    let mut tree: HashSet<u32> =
        cmdlines.iter().filter(|(_, args)| args.contains(&flag)).map(|(pid, _)| *pid).collect();
    loop {
        let more: Vec<u32> = parent
            .iter()
            .filter(|(pid, ppid)| tree.contains(ppid) && !tree.contains(pid))
            .map(|(pid, _)| *pid)
            .collect();
        if more.is_empty() {
            break;
        }
        tree.extend(more);
    }
    tree.into_iter()
        .map(|pid| {
            let rss_kb = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                })
                .unwrap_or(0);
            // A page's renderer (not the headless shell's own WebUI renderer).
            let renderer = cmdlines.get(&pid).is_some_and(|args| {
                args.iter().any(|a| a == "--type=renderer")
                    && !args.iter().any(|a| a == "--top-chrome-webui")
            });
            Proc { pid, renderer, rss_kb, cpu_ticks: cpu.get(&pid).copied().unwrap_or(0) }
        })
        .collect()
}

/// CPU ticks of every thread in a Chromium tree, summed by process kind and thread name
/// (`renderer/CrRendererMain`, `renderer/DedicatedWorker …`): where a page's work runs.
fn thread_ticks(user_data_dir: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for p in chromium_tree(user_data_dir) {
        let cmd = std::fs::read(format!("/proc/{}/cmdline", p.pid)).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let kind = cmd
            .split(' ')
            .find_map(|a| a.strip_prefix("--type="))
            .map_or("browser".to_string(), str::to_string);
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", p.pid)) else { continue };
        for task in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
            let Some((head, rest)) = stat.rsplit_once(')') else { continue };
            let name = head.split_once('(').map_or("?", |h| h.1);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
            *out.entry(format!("{kind}/{name}")).or_default() += field(11) + field(12);
        }
    }
    out
}

/// Busy and total CPU ticks of the whole machine (all cores), from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return (0, 0) };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Where the CPU went during one run: each browser's whole process tree, and how busy the
/// machine was. Tells a transfer limited by CPU from one limited by something else.
struct CpuMeter {
    dirs: Vec<(String, String)>,
    trees: Vec<u64>,
    threads: Vec<HashMap<String, u64>>,
    machine: (u64, u64),
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    /// CPU milliseconds of all the browsers together per MB moved.
    ms_per_mb: f64,
    /// Share of the machine's CPU time (all cores) that was busy, in percent.
    busy_pct: f64,
}

impl CpuMeter {
    fn start(dirs: &[(String, String)]) -> Self {
        let trees = dirs
            .iter()
            .map(|(_, dir)| chromium_tree(dir).iter().map(|p| p.cpu_ticks).sum())
            .collect();
        let threads = dirs.iter().map(|(_, dir)| thread_ticks(dir)).collect();
        Self { dirs: dirs.to_vec(), trees, threads, machine: machine_ticks() }
    }

    fn finish(&self, bytes: u64) -> CpuUse {
        let (busy, total) = machine_ticks();
        let mb = bytes as f64 / 1e6;
        let mut parts = Vec::new();
        let mut sum = 0.0;
        for (((name, dir), before), threads) in self.dirs.iter().zip(&self.trees).zip(&self.threads)
        {
            let now: u64 = chromium_tree(dir).iter().map(|p| p.cpu_ticks).sum();
            let ms = now.saturating_sub(*before) as f64 / TICKS_PER_S * 1e3;
            sum += ms;
            parts.push(format!("{name} {:.1}", ms / mb));
            // The busiest threads (names shared by several threads are summed).
            let mut top: Vec<(String, u64)> = thread_ticks(dir)
                .into_iter()
                .map(|(k, v)| {
                    let d = v.saturating_sub(threads.get(&k).copied().unwrap_or(0));
                    (k, d)
                })
                .filter(|(_, d)| *d as f64 / TICKS_PER_S * 1e3 / mb >= 1.0)
                .collect();
            top.sort_by_key(|t| std::cmp::Reverse(t.1));
            if !top.is_empty() {
                let top: Vec<String> = top
                    .iter()
                    .take(8)
                    .map(|(k, d)| format!("{k} {:.1}", *d as f64 / TICKS_PER_S * 1e3 / mb))
                    .collect();
                println!("      {name}: {}", top.join(", "));
            }
        }
        let busy_pct = 100.0 * (busy.saturating_sub(self.machine.0)) as f64
            / (total.saturating_sub(self.machine.1)).max(1) as f64;
        println!(
            "    CPU ms per MB: {} (all browsers {:.1}); machine {busy_pct:.0} % busy",
            parts.join(", "),
            sum / mb
        );
        CpuUse { ms_per_mb: sum / mb, busy_pct }
    }
}

#[derive(Default, Debug, Clone, Copy)]
struct Peaks {
    renderer_kb: u64,
    tree_kb: u64,
    samples: u64,
}

/// Samples `user_data_dir`'s Chromium every 200 ms until `stop`.
fn sample_rss(user_data_dir: String, stop: Arc<AtomicBool>, peaks: Arc<Mutex<Peaks>>) {
    let start = Instant::now();
    let mut printed = 0;
    while !stop.load(Ordering::Relaxed) {
        let procs = chromium_tree(&user_data_dir);
        let renderer = procs.iter().filter(|p| p.renderer).map(|p| p.rss_kb).max().unwrap_or(0);
        // Where the peaks happen, to tell steady growth from a spike.
        if renderer > printed + 20 * 1024 {
            printed = renderer;
            println!(
                "  renderer RSS {} MB at {:.1} s",
                renderer / 1024,
                start.elapsed().as_secs_f64()
            );
        }
        let tree: u64 = procs.iter().map(|p| p.rss_kb).sum();
        if let Ok(mut p) = peaks.lock() {
            p.renderer_kb = p.renderer_kb.max(renderer);
            p.tree_kb = p.tree_kb.max(tree);
            p.samples += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

async fn bench(net: &Net, scratch: &Scratch, baseline: Option<&Net>) -> Result<()> {
    // `WEFT_BENCH_PARTS=speed`, `=rss` or `=click` runs only that part.
    let parts = std::env::var("WEFT_BENCH_PARTS").unwrap_or_else(|_| "speed,rss,click".into());
    // The harness records where the module's timers come from, with a stack trace per
    // `setTimeout`: a cost no user's page has, on every one (`WEFT_BENCH_TRACK_TIMERS=1`
    // keeps it).
    let track = env_on("WEFT_BENCH_TRACK_TIMERS");
    for n in std::iter::once(net).chain(baseline) {
        for b in &n.browsers {
            js(b, &format!("window.t.trackTimers = {track}; return true;")).await?;
        }
        add_hook(&n.browsers[1], RECEIVER_HOOK).await?;
        js(&n.browsers[1], WRITER_STATS_JS).await?;
        for b in &n.browsers[..2] {
            js(b, SEND_STATS_JS).await?;
        }
    }
    if parts.contains("speed") || parts.contains("pairs") {
        speed(net, scratch, !parts.contains("speed"), baseline).await?;
    }
    if parts.contains("rss") {
        rss(net, scratch).await?;
    }
    if parts.contains("click") {
        click(net, scratch).await?;
    }
    Ok(())
}

/// `click_to_first_byte_ms`: from Alice's `sendFiles` of a [`CLICK_FILE_SIZE`] file to
/// the first stored byte in Bob's page (the offer goes out at once; hashing runs while
/// chunks flow). The file is sparse (`set_len`: it reads as zeros and takes no disk), and
/// Bob cancels once the first bytes are stored, so nothing near its size is written.
/// Beside it, what hashing it first would cost: the time Alice's page takes to hash the
/// [`FILE_SIZE`] file (`shareFiles`), scaled to this size, plus the measured first byte.
async fn click(net: &Net, scratch: &Scratch) -> Result<()> {
    let (alice, bob, bob_id) = (&net.browsers[0], &net.browsers[1], &net.ids[1]);
    let sample = generate(scratch.path(), "hash-sample.bin", FILE_SIZE, 11)?;
    upload(alice, "hs", &[&sample]).await?;
    let hash_ms = share(alice, "hs", &sample).await?;
    let path = scratch.path().join("huge.bin");
    std::fs::File::create(&path)?.set_len(CLICK_FILE_SIZE)?;
    let huge = TestFile { name: "huge.bin".into(), path, size: CLICK_FILE_SIZE, root: "?".into() };
    upload(alice, "h", &[&huge]).await?;
    let mut firsts = Vec::new();
    for run in 0..runs().min(3) {
        call(
            bob,
            &format!(
                "t.bench = t.bench || {{}};
                 t.bench.current = {{ root: null, name: {}, acceptAt: null, firstByteAt: null,
                                     completeAt: null, sources: [], rejected: 0 }};
                 return true;",
                json!(huge.name)
            ),
            LONG,
        )
        .await?;
        let send = call(
            alice,
            &format!(
                "const clickAt = performance.timeOrigin + performance.now();
                 const r = await s.sendFiles({}, {});
                 return {{ clickAt, r }};",
                entries_js("h", &[(&huge, &huge.name)]),
                json!(bob_id)
            ),
            LONG,
        )
        .await?;
        let c = wait_for("Bob's first stored byte", LONG, || async {
            let c = js(bob, "return window.t.bench.current;").await?;
            if let Some(reason) = c["failed"].as_str() {
                bail!("the download failed: {reason}");
            }
            Ok(if c["firstByteAt"].is_number() { Ok(c) } else { Err(c.to_string()) })
        })
        .await?;
        let first =
            c["firstByteAt"].as_f64().unwrap_or(0.0) - send["clickAt"].as_f64().unwrap_or(0.0);
        println!("  run {run}: click to first byte of 10 GiB {first:.0} ms");
        firsts.push(first);
        // Bob stops it: the sender hears of it, and the partial file goes.
        let offer_id = send["r"][0]["offerId"].clone();
        let alice_id = json!(net.ids[0]);
        call(
            bob,
            &format!(
                "s.cancelTransfer({alice_id}, {offer_id}, \"bench done\", false);
                 const d = s.transfers().downloads.find((d) => d.key === {key});
                 if (d) await s.forgetDownload(d.key);
                 return true;",
                key = json!(c["key"])
            ),
            LONG,
        )
        .await?;
    }
    let first = median(firsts);
    let scale = CLICK_FILE_SIZE as f64 / FILE_SIZE as f64;
    println!("BENCH click_to_first_byte_ms {first:.0} ms");
    println!("BENCH click_to_first_byte_hash_first_est_ms {:.0} ms", hash_ms * scale + first);
    println!("BENCH sender_hash_10gib_est_ms {:.0} ms", hash_ms * scale);
    Ok(())
}

/// Where a browser's profile is: it names the browser's processes.
fn user_data_dir(browser: &WebDriver) -> Result<String> {
    Ok(browser
        .capabilities()
        .get("chrome")
        .and_then(|c| c["userDataDir"].as_str())
        .context("chromedriver did not say where the browser's profile is")?
        .to_string())
}

/// `shareFiles` of `file` (put in the page under `key`): hashes it and seeds it without
/// offering it. Returns the milliseconds it took.
async fn share(browser: &WebDriver, key: &str, file: &TestFile) -> Result<f64> {
    let shared = call(
        browser,
        &format!(
            "const t0 = performance.now(); const r = await s.shareFiles({});
             return {{ ms: performance.now() - t0, r }};",
            entries_js(key, &[(file, &file.name)])
        ),
        LONG,
    )
    .await?;
    if shared["r"][0]["root"] != file.root.as_str() {
        bail!("shareFiles named the file {}, not {}", shared["r"], file.root);
    }
    Ok(shared["ms"].as_f64().unwrap_or(0.0))
}

/// `setUploadLimit` in a page (`None`: no limit).
async fn limit(browser: &WebDriver, bytes_per_s: Option<f64>) -> Result<()> {
    let rate = bytes_per_s.map_or("null".to_string(), |r| r.to_string());
    call(browser, &format!("s.setUploadLimit({rate}); return true;"), LONG).await?;
    Ok(())
}

/// Alice and Bob of one network (this build's, or the baseline's), the profile folders
/// of its browsers (for the CPU meter), and how its lines are labelled.
struct Side<'a> {
    alice: &'a WebDriver,
    bob: &'a WebDriver,
    bob_id: &'a str,
    dirs: &'a [(String, String)],
    label: &'a str,
}

/// A raw run and then a Weft run (of a `File` the page has not seen, under `key`)
/// between Alice and Bob: the raw time, the Weft times, and the CPU each used.
async fn pair(
    side: &Side<'_>,
    file: &TestFile,
    run: usize,
    key: &str,
) -> Result<(f64, CpuUse, Took, CpuUse)> {
    let Side { alice, bob, bob_id, dirs, label } = *side;
    // The raw page's main threads under the same profiler, to compare with Weft's.
    if profiling() {
        profile_start(alice).await?;
        profile_start(bob).await?;
    }
    // `WEFT_BENCH_RAW_ALT=<bytes>`: a second raw run with messages of that size, before
    // or after the first by turns, with its own CPU figures (Chromium's per-message cost).
    let alt = std::env::var("WEFT_BENCH_RAW_ALT").ok().and_then(|v| v.parse::<u64>().ok());
    let alt_run = |first: bool| async move {
        let Some(size) = alt.filter(|_| (run % 2 == 0) == first) else { return Ok(()) };
        let m = CpuMeter::start(dirs);
        let r = raw_run(alice, bob, bob_id, run + 1000, size).await?;
        println!(
            "  run {run}: {label}raw data channel, {size} B messages, {:.1} MB/s",
            mb_s(FILE_SIZE, r)
        );
        m.finish(FILE_SIZE);
        anyhow::Ok(())
    };
    alt_run(true).await?;
    let msgs = SendMeter::start(alice, bob).await?;
    let meter = CpuMeter::start(dirs);
    let r = raw_run(alice, bob, bob_id, run, raw_message()).await?;
    if profiling() {
        profile_stop("raw Alice", alice, FILE_SIZE).await?;
        profile_stop("raw Bob", bob, FILE_SIZE).await?;
    }
    println!("  run {run}: {label}raw data channel {:.1} MB/s ({r:.0} ms)", mb_s(FILE_SIZE, r));
    let raw_cpu = meter.finish(FILE_SIZE);
    msgs.finish("raw", FILE_SIZE).await?;
    alt_run(false).await?;
    let (w, cpu) = weft_once(side, file, run, key).await?;
    Ok((r, raw_cpu, w, cpu))
}

/// One Weft run of a `File` the page never saw (offered at once and hashed while the
/// chunks flow, as a user's first send is; a `File` sent before is offered with its root
/// known), put in Alice's page under `key`.
async fn weft_once(
    side: &Side<'_>,
    file: &TestFile,
    run: usize,
    key: &str,
) -> Result<(Took, CpuUse)> {
    let Side { alice, bob, bob_id, dirs, label } = *side;
    upload(alice, key, &[file]).await?;
    let msgs = SendMeter::start(alice, bob).await?;
    let (w, sources, cpu) = weft_run(alice, bob, bob_id, key, file, None, dirs).await?;
    msgs.finish("Weft", FILE_SIZE).await?;
    println!(
        "  run {run}: {label}Weft {:.1} MB/s ({:.0} ms; from the click {:.1} MB/s, {:.0} ms; \
         sources {sources:?})",
        mb_s(FILE_SIZE, w.accept),
        w.accept,
        mb_s(FILE_SIZE, w.click),
        w.click,
    );
    Ok((w, cpu))
}

/// Bytes each in-page floor measurement moves.
const FLOOR_BYTES: u64 = mib(64);

/// The CPU per MB that integrity and encryption need in a page, measured in `page`:
/// `benchTransferCpu` moves [`FLOOR_BYTES`] between two transfer engines in one thread
/// (requests, seal, open, BLAKE3 verification of each chunk: both sides' per-byte work
/// but for the browser's own), beside the sender's streamed hashing (BLAKE3 of the
/// file). With both browsers on one machine's saturated cores, Weft can at best reach
/// `raw_ms ÷ (raw_ms + floor)` of the raw channel. With `baseline`, the same alternately
/// in the baseline's page (a same-run A/B of the module's per-chunk speed, free of the
/// data channel's noise).
async fn floor(page: &WebDriver, baseline: Option<&WebDriver>, raw_ms: f64) -> Result<()> {
    // `benchTransferCpu` is only in the bench variant of the module (weft-wasm's
    // `bench-hooks`, which `cargo xtask bench transfer` builds into target/web-dist-bench);
    // a baseline copied from a shipped bundle has none: its floor is left out.
    const HAS_FLOOR: &str = "return typeof t.module.benchTransferCpu === 'function';";
    if js(page, HAS_FLOOR).await? != json!(true) {
        bail!("this bundle has no benchTransferCpu: build it with `cargo xtask bench transfer`");
    }
    let baseline = match baseline {
        Some(b) if js(b, HAS_FLOOR).await? != json!(true) => {
            println!(
                "bench transfer: the baseline's module has no benchTransferCpu (a shipped \
                 bundle; copy target/web-dist-bench for its floor): no baseline floor"
            );
            None
        }
        other => other,
    };
    let (mut own, mut base) = (Vec::new(), Vec::new());
    for round in 0..4 {
        let (first, second) =
            if round % 2 == 0 { (Some(page), baseline) } else { (baseline, Some(page)) };
        for b in [first, second].into_iter().flatten() {
            let m = floor_once(b).await?;
            if std::ptr::eq(b, page) { own.push(m) } else { base.push(m) }
        }
    }
    let split = |v: &[(f64, f64)]| {
        (median(v.iter().map(|m| m.0).collect()), median(v.iter().map(|m| m.1).collect()))
    };
    let (engines, hashing) = split(&own);
    println!("BENCH page_transfer_engines_ms_per_mb {engines:.2} ms/MB");
    println!("BENCH page_hash_ms_per_mb {hashing:.2} ms/MB");
    println!("BENCH page_crypto_floor_ms_per_mb {:.2} ms/MB", engines + hashing);
    println!("BENCH best_ratio_on_shared_cores {:.2} x", raw_ms / (raw_ms + engines + hashing));
    if !base.is_empty() {
        let (b_engines, b_hashing) = split(&base);
        println!("BENCH baseline_page_transfer_engines_ms_per_mb {b_engines:.2} ms/MB");
        println!("BENCH baseline_page_hash_ms_per_mb {b_hashing:.2} ms/MB");
    }
    Ok(())
}

/// One `benchTransferCpu` in `page`: ms per MB of the two engines, and of hashing.
async fn floor_once(page: &WebDriver) -> Result<(f64, f64)> {
    let v =
        call(page, &format!("return Array.from(t.module.benchTransferCpu({FLOOR_BYTES}));"), LONG)
            .await?;
    let mbps = |i: usize| v[i].as_f64().filter(|x| *x > 0.0).context("benchTransferCpu");
    Ok((1e3 / mbps(0)?, 1e3 / mbps(1)?))
}

/// Medians of CPU use: ms per MB and the machine's busy share.
fn cpu_medians(v: &[CpuUse]) -> (f64, f64) {
    (
        median(v.iter().map(|c| c.ms_per_mb).collect()),
        median(v.iter().map(|c| c.busy_pct).collect()),
    )
}

/// Weft vs. the raw data channel, and two seeders vs. one (unless `pairs_only`); Weft on
/// `baseline` (another bundle) beside it, if given.
async fn speed(
    net: &Net,
    scratch: &Scratch,
    pairs_only: bool,
    baseline: Option<&Net>,
) -> Result<()> {
    let (alice, bob, carol) = (&net.browsers[0], &net.browsers[1], &net.browsers[2]);
    let (alice_id, bob_id, carol_id) = (&net.ids[0], &net.ids[1], &net.ids[2]);
    let file = generate(scratch.path(), "bench.bin", FILE_SIZE, 7)?;
    upload(alice, "f", &[&file]).await?;
    let small = generate(scratch.path(), "uplink.bin", UPLINK_FILE_SIZE, 9)?;
    upload(alice, "u", &[&small]).await?;
    for b in [alice, bob] {
        js(b, RAW_JS).await?;
    }

    // Hashing alone, in Alice's page (shareFiles hashes and seeds without offering), of
    // its own `File`: `sendFiles` of a `File` shared before would reuse its root.
    upload(alice, "h", &[&file]).await?;
    let hash_ms = share(alice, "h", &file).await?;

    let dirs: Vec<(String, String)> = [("Alice", alice), ("Bob", bob), ("Carol", carol)]
        .into_iter()
        .map(|(name, b)| Ok((name.to_string(), user_data_dir(b)?)))
        .collect::<Result<_>>()?;
    let (mut raw, mut weft, mut click_ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut raw_cpu, mut weft_cpu) = (Vec::new(), Vec::new());
    let pinning = env_on("WEFT_BENCH_PIN");
    let (mut pinned_ratios, mut pinned_raw_cpu, mut pinned_weft_cpu) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut base_ratios, mut base_cpu, mut own_vs_base) = (Vec::new(), Vec::new(), Vec::new());
    let base = match baseline {
        Some(b) => {
            upload(&b.browsers[0], "f", &[&file]).await?;
            let dirs: Vec<(String, String)> = [("Alice", &b.browsers[0]), ("Bob", &b.browsers[1])]
                .into_iter()
                .map(|(name, b)| Ok((format!("baseline {name}"), user_data_dir(b)?)))
                .collect::<Result<_>>()?;
            Some((b, dirs))
        }
        None => None,
    };
    for run in 0..runs() {
        // The baseline's Weft run, before this build's on odd runs and after it on even.
        let base_run = || async {
            let Some((b, dirs)) = &base else { return Ok(None) };
            let (alice, bob, bob_id) = (&b.browsers[0], &b.browsers[1], b.ids[1].as_str());
            let side = Side { alice, bob, bob_id, dirs, label: "baseline " };
            weft_once(&side, &file, run, &format!("b{run}")).await.map(Some)
        };
        let early = if run % 2 == 1 { base_run().await? } else { None };
        let side = Side { alice, bob, bob_id, dirs: &dirs, label: "" };
        let (r, rc, w, wc) = pair(&side, &file, run, &format!("f{run}")).await?;
        let late = if run % 2 == 0 { base_run().await? } else { None };
        if let Some((bw, bc)) = early.or(late) {
            base_ratios.push(r / bw.click);
            own_vs_base.push(bw.click / w.click);
            base_cpu.push(bc);
        }
        raw_cpu.push(rc);
        weft_cpu.push(wc);
        raw.push(mb_s(FILE_SIZE, r));
        weft.push(mb_s(FILE_SIZE, w.accept));
        // The raw channel has nothing to do before its first send: its time is from the
        // click too.
        click_ratios.push(r / w.click);
        if pinning {
            pin(&dirs, Some(&["0", "1"]))?;
            let pinned = Side { label: "pinned ", ..side };
            let result = pair(&pinned, &file, 1000 + run, &format!("p{run}")).await;
            pin(&dirs, None)?;
            let (r, rc, w, wc) = result?;
            pinned_ratios.push(r / w.click);
            pinned_raw_cpu.push(rc);
            pinned_weft_cpu.push(wc);
        }
    }
    if pairs_only {
        println!("BENCH transfer_vs_raw_from_click_ratio {:.2} x", median(click_ratios.clone()));
        let ((raw_ms, raw_busy), (weft_ms, weft_busy)) =
            (cpu_medians(&raw_cpu), cpu_medians(&weft_cpu));
        println!("BENCH raw_cpu_ms_per_mb {raw_ms:.1} ms/MB");
        println!("BENCH weft_cpu_ms_per_mb {weft_ms:.1} ms/MB");
        println!("BENCH raw_machine_busy_pct {raw_busy:.0} %");
        println!("BENCH weft_machine_busy_pct {weft_busy:.0} %");
    }
    if pinning {
        let ((raw_ms, _), (weft_ms, _)) =
            (cpu_medians(&pinned_raw_cpu), cpu_medians(&pinned_weft_cpu));
        println!("BENCH pinned_transfer_vs_raw_from_click_ratio {:.2} x", median(pinned_ratios));
        println!("BENCH pinned_raw_cpu_ms_per_mb {raw_ms:.1} ms/MB");
        println!("BENCH pinned_weft_cpu_ms_per_mb {weft_ms:.1} ms/MB");
    }
    if base.is_some() {
        let (base_ms, _) = cpu_medians(&base_cpu);
        println!("BENCH baseline_transfer_vs_raw_from_click_ratio {:.2} x", median(base_ratios));
        println!("BENCH baseline_weft_cpu_ms_per_mb {base_ms:.1} ms/MB");
        println!("BENCH weft_vs_baseline_from_click_paired_median {:.2} x", median(own_vs_base));
    }
    floor(alice, base.as_ref().map(|(b, _)| &b.browsers[0]), cpu_medians(&raw_cpu).0).await?;
    if pairs_only {
        return Ok(());
    }

    // The same with Alice's upload limited, as a home uplink would: what one seeder gives.
    limit(alice, Some(UPLINK)).await?;
    let mut uplink_single = Vec::new();
    for run in 0..runs() {
        let (w, _, _) = weft_run(alice, bob, bob_id, "u", &small, None, &dirs).await?;
        println!("  run {run}: one seeder at its uplink {:.1} MB/s", mb_s(small.size, w.accept));
        uplink_single.push(mb_s(small.size, w.accept));
    }
    limit(alice, None).await?;

    // Carol gets the same files from Alice (the same `File`s, so the same shares and the
    // same capability as Alice's offers to Bob): she seeds them to Alice's other
    // receivers, and Bob fetches from both.
    for (key, f) in [("u", &small), ("f", &file)] {
        let sent = send_files(alice, key, &[(f, &f.name)], carol_id, LONG).await?;
        let offer_id = sent.first().context("no offer sent")?["offerId"].clone();
        wait_offer(carol, alice_id, &offer_id).await?;
        let at = Instant::now();
        accept(carol, alice_id, &offer_id).await?;
        wait_complete(carol, &f.root, LONG).await?;
        println!("  Carol got {} from Alice in {:.0} ms", f.name, at.elapsed().as_millis());
    }
    let mut swarm = Vec::new();
    let mut swarm_cpu = Vec::new();
    let mut swarm_sources = usize::MAX;
    for run in 0..runs() {
        let (w, sources, cpu) = weft_run(alice, bob, bob_id, "f", &file, None, &dirs).await?;
        let w = w.accept;
        swarm_cpu.push(cpu);
        let used: HashSet<&String> = sources.iter().collect();
        let both = used.contains(alice_id) && used.contains(carol_id);
        println!(
            "  run {run}: swarm {:.1} MB/s ({w:.0} ms, sources {sources:?}{})",
            mb_s(FILE_SIZE, w),
            if both { "" } else { " — NOT both seeders" }
        );
        swarm_sources = swarm_sources.min(used.len());
        swarm.push(mb_s(FILE_SIZE, w));
    }
    limit(alice, Some(UPLINK)).await?;
    limit(carol, Some(UPLINK)).await?;
    let mut uplink_swarm = Vec::new();
    for run in 0..runs() {
        let (w, sources, _) = weft_run(alice, bob, bob_id, "u", &small, None, &dirs).await?;
        let w = w.accept;
        println!(
            "  run {run}: two seeders at their uplinks {:.1} MB/s (sources {})",
            mb_s(small.size, w),
            sources.len()
        );
        uplink_swarm.push(mb_s(small.size, w));
    }
    limit(alice, None).await?;
    limit(carol, None).await?;
    for root in [&file.root, &small.root] {
        let forget = format!("await s.forgetDownload({}); return true;", json!(root));
        call(bob, &forget, LONG).await?;
    }

    let (up_single, up_swarm) = (median(uplink_single), median(uplink_swarm));
    println!("BENCH uplink_single_mb_s {up_single:.1} MB/s");
    println!("BENCH uplink_swarm_mb_s {up_swarm:.1} MB/s");
    println!("BENCH swarm_vs_single_uplink_ratio {:.2} x", up_swarm / up_single);
    // Each run measures raw then Weft back to back: the median of those pairs' ratios is
    // less swayed by the machine's load drifting between runs.
    let paired = median(weft.iter().zip(&raw).map(|(w, r)| w / r).collect());
    let (raw_m, weft_m, swarm_m) = (median(raw), median(weft), median(swarm));
    println!("BENCH weft_transfer_mb_s {weft_m:.1} MB/s");
    println!("BENCH raw_datachannel_mb_s {raw_m:.1} MB/s");
    println!("BENCH transfer_vs_raw_ratio {:.2} x", weft_m / raw_m);
    println!("BENCH transfer_vs_raw_paired_median {paired:.2} x");
    println!("BENCH transfer_vs_raw_from_click_ratio {:.2} x", median(click_ratios));
    println!("BENCH swarm_mb_s {swarm_m:.1} MB/s");
    println!("BENCH swarm_vs_single_ratio {:.2} x", swarm_m / weft_m);
    println!("BENCH swarm_sources_min {swarm_sources} sources");
    // CPU use (the timed windows include the pages' own checks around each run).
    let ((raw_ms, raw_busy), (weft_ms, weft_busy), (_, swarm_busy)) =
        (cpu_medians(&raw_cpu), cpu_medians(&weft_cpu), cpu_medians(&swarm_cpu));
    println!("BENCH raw_cpu_ms_per_mb {raw_ms:.1} ms/MB");
    println!("BENCH weft_cpu_ms_per_mb {weft_ms:.1} ms/MB");
    println!("BENCH raw_machine_busy_pct {raw_busy:.0} %");
    println!("BENCH weft_machine_busy_pct {weft_busy:.0} %");
    println!("BENCH swarm_machine_busy_pct {swarm_busy:.0} %");
    println!("BENCH sender_hash_mb_s {:.1} MB/s", mb_s(FILE_SIZE, hash_ms));
    println!("BENCH sender_hash_ms {hash_ms:.0} ms");
    Ok(())
}

/// The receiver's memory while it receives a 2 GiB file.
async fn rss(net: &Net, scratch: &Scratch) -> Result<()> {
    let (alice, bob) = (&net.browsers[0], &net.browsers[1]);
    let bob_id = &net.ids[1];
    let big = generate(scratch.path(), "rss.bin", RSS_FILE_SIZE, 8)?;
    upload(alice, "g", &[&big]).await?;
    let user_data_dir = user_data_dir(bob)?;
    let before = chromium_tree(&user_data_dir);
    if before.is_empty() {
        bail!("no Chromium process with --user-data-dir={user_data_dir}");
    }
    let renderer_before = before.iter().filter(|p| p.renderer).map(|p| p.rss_kb).max().unwrap_or(0);
    println!(
        "  Bob's Chromium: {} processes ({} renderers: {:?}), renderer RSS {} MB before",
        before.len(),
        before.iter().filter(|p| p.renderer).count(),
        before.iter().filter(|p| p.renderer).map(|p| p.pid).collect::<Vec<_>>(),
        renderer_before / 1024
    );
    let stop = Arc::new(AtomicBool::new(false));
    let peaks = Arc::new(Mutex::new(Peaks::default()));
    let sampler = {
        let (stop, peaks, dir) = (stop.clone(), peaks.clone(), user_data_dir.clone());
        std::thread::spawn(move || sample_rss(dir, stop, peaks))
    };
    let started = Instant::now();
    // Sampling stops when the download completes: the check that follows (hashing the
    // stored 2 GiB in the page) is the benchmark's, not part of receiving.
    let result = weft_run(alice, bob, bob_id, "g", &big, Some(&*stop), &[]).await;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let (took, _, _) = result?;
    let took = took.accept;
    let peaks = *peaks.lock().map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    println!(
        "  2 GiB run: {:.0} s in all, {} RSS samples",
        started.elapsed().as_secs_f64(),
        peaks.samples
    );
    let forget = format!("await s.forgetDownload({}); return true;", json!(big.root));
    call(bob, &forget, LONG).await?;
    println!("BENCH weft_2gib_transfer_mb_s {:.1} MB/s", mb_s(RSS_FILE_SIZE, took));
    println!("BENCH receiver_peak_rss_mb {} MB", peaks.renderer_kb / 1024);
    println!("BENCH receiver_renderer_rss_before_mb {} MB", renderer_before / 1024);
    println!("BENCH receiver_browser_tree_peak_rss_mb {} MB", peaks.tree_kb / 1024);
    Ok(())
}

#[tokio::main]
pub async fn main() -> Result<()> {
    if let Some(reason) = browser_missing() {
        bail!("the transfer benchmark needs Chromium and the built bundle: {reason}");
    }
    let scratch = Scratch::new("bench-transfer")?;
    println!("  files in {}", scratch.path().display());
    let net = Net::start(&["Alice", "Bob", "Carol"]).await?;
    let baseline = match std::env::var_os("WEFT_BENCH_BASELINE_WEB_ROOT") {
        Some(root) => {
            let limits = weft_signal::Limits::default();
            let server = start_server_serving("127.0.0.1:0".parse()?, limits, root.into()).await?;
            let members: Vec<Member> = ["Alice", "Bob"].iter().map(|n| Member::new(n)).collect();
            Some(Net::start_on(server, &members, "").await?)
        }
        None => None,
    };
    let result = bench(&net, &scratch, baseline.as_ref()).await;
    if let Some(b) = baseline {
        b.close(result.is_err()).await;
    }
    net.close(result.is_err()).await;
    drop(scratch);
    result
}
