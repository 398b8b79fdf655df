//! `cargo xtask bench transfer`: file transfer between real headless Chromium processes
//! (Alice sends, Bob receives, Carol is a second seeder), all in one run:
//!
//! - `weft_transfer_mb_s`: a [`FILE_SIZE`] file, encrypted and verified, from `acceptOffer`
//!   to `file_complete` in Bob's page (hashing happens before the offer and is reported
//!   on its own: `sender_hash_mb_s`).
//! - `raw_datachannel_mb_s`: the baseline, between the same two browsers and the same
//!   `File`: a separate plain `RTCPeerConnection` pair (signaled over the Weft session's
//!   messages), one reliable ordered data channel, the sender reading the file with
//!   `Blob.slice` ([`READ`] bytes ahead) and sending [`MESSAGE`]-byte messages with
//!   `bufferedAmount` backpressure (pause above [`HIGH_WATER`], resume on
//!   `bufferedamountlow` at [`LOW_WATER`]: the same marks Weft's control channel uses). Its
//!   time runs from the first send to the last byte at the receiver (both pages' clocks are
//!   the machine's clock: `performance.timeOrigin + performance.now()`).
//! - `transfer_vs_raw_ratio` = Weft ÷ raw; `swarm_mb_s` (Alice and Carol seed, Bob fetches
//!   from both) and `swarm_vs_single_ratio` = swarm ÷ single.
//! - `receiver_peak_rss_mb`: Bob's renderer process, sampled every 200 ms while it receives
//!   a [`RSS_FILE_SIZE`] file; also the peak sum over Bob's whole Chromium process tree.
//!
//! `WEFT_BENCH_PARTS=speed` (or `rss`) runs only that part. Each speed is the median of
//! [`RUNS`] runs. Prints `BENCH <metric> <value> <unit>` lines
//! (MB = 10^6 bytes).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use thirtyfour::WebDriver;
use weft_tests::browser_missing;
use weft_tests::files::{
    Net, Scratch, TestFile, add_hook, call, entries_js, generate, hash_downloaded, mib, upload,
};
use weft_tests::{js, wait_for};

const FILE_SIZE: u64 = mib(256);
const RSS_FILE_SIZE: u64 = mib(2048);
const RUNS: usize = 2;
const MESSAGE: u64 = 64 * 1024;
const READ: u64 = 1024 * 1024;
const HIGH_WATER: u64 = 1024 * 1024;
const LOW_WATER: u64 = 256 * 1024;
const LONG: Duration = Duration::from_secs(1800);

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

/// The receiver accepts offers of `t.bench.current.root` at once, and records the times.
const RECEIVER_HOOK: &str = r#"
  const c = t.bench && t.bench.current;
  if (!c) return;
  if (ev.type === "offer" && ev.items.some((i) => i.root === c.root)) {
    c.acceptAt = performance.now();
    s.acceptOffer(ev.peerId, ev.offerId);
  } else if (ev.type === "file_complete" && ev.root === c.root) {
    c.completeAt = performance.now();
  } else if (ev.type === "file_failed" && ev.root === c.root) {
    c.failed = ev.reason;
  } else if (ev.type === "source_added" && ev.root === c.root) {
    c.sources.push(ev.peerId);
  } else if (ev.type === "chunk_rejected") {
    c.rejected += 1;
  }
"#;

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
) -> Result<(f64, Vec<String>)> {
    let root = json!(file.root);
    call(
        bob,
        &format!(
            "if (s.transfers().downloads.some((d) => d.root === {root})) await s.forgetDownload({root});
             t.bench = t.bench || {{}};
             t.bench.current = {{ root: {root}, acceptAt: null, completeAt: null, sources: [], rejected: 0 }};
             return true;"
        ),
        Duration::from_secs(120),
    )
    .await?;
    let send = call(
        alice,
        &format!(
            "const t0 = performance.now();
             const r = await s.sendFiles({}, {});
             return {{ ms: performance.now() - t0, r }};",
            entries_js(key, &[(file, &file.name)]),
            json!(bob_id)
        ),
        LONG,
    )
    .await?;
    println!(
        "  sendFiles (hash + offer) of {} took {:.0} ms",
        file.name,
        send["ms"].as_f64().unwrap_or(0.0)
    );
    let c = wait_for(&format!("Bob to receive {}", file.name), LONG, || async {
        let c = js(bob, "return window.t.bench.current;").await?;
        if let Some(reason) = c["failed"].as_str() {
            bail!("the download failed: {reason}");
        }
        Ok(if c["completeAt"].is_number() { Ok(c) } else { Err(c.to_string()) })
    })
    .await?;
    let took = c["completeAt"].as_f64().unwrap_or(0.0) - c["acceptAt"].as_f64().unwrap_or(0.0);
    if let Some(flag) = completed {
        flag.store(true, Ordering::Relaxed);
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
    Ok((took, sources))
}

/// One raw data channel run: milliseconds from Alice's first send to Bob's last byte.
async fn raw_run(alice: &WebDriver, bob: &WebDriver, bob_id: &str, run: usize) -> Result<f64> {
    let sent = call(
        alice,
        &format!(
            "const f = document.getElementById('weft-upload-f').files[0];
             return await t.rawSend({run}, f, {}, {HIGH_WATER}, {LOW_WATER}, {MESSAGE}, {READ});",
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
}

/// Every process of the Chromium started with `--user-data-dir=<dir>` (the browser and all
/// its descendants), with its resident memory now.
fn chromium_tree(user_data_dir: &str) -> Vec<Proc> {
    let flag = format!("--user-data-dir={user_data_dir}");
    let mut parent = HashMap::new();
    let mut cmdlines = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The fields after the command name (which may hold spaces) in parentheses.
        let Some(rest) = stat.rsplit_once(')').map(|r| r.1) else { continue };
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()).unwrap_or(0);
        parent.insert(pid, ppid);
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
            Proc { pid, renderer, rss_kb }
        })
        .collect()
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

async fn bench(net: &Net, scratch: &Scratch) -> Result<()> {
    // `WEFT_BENCH_PARTS=speed` or `=rss` runs only that part.
    let parts = std::env::var("WEFT_BENCH_PARTS").unwrap_or_else(|_| "speed,rss".into());
    add_hook(&net.browsers[1], RECEIVER_HOOK).await?;
    if parts.contains("speed") {
        speed(net, scratch).await?;
    }
    if parts.contains("rss") {
        rss(net, scratch).await?;
    }
    Ok(())
}

/// Weft vs. the raw data channel, and two seeders vs. one.
async fn speed(net: &Net, scratch: &Scratch) -> Result<()> {
    let (alice, bob, carol) = (&net.browsers[0], &net.browsers[1], &net.browsers[2]);
    let (alice_id, bob_id, carol_id) = (&net.ids[0], &net.ids[1], &net.ids[2]);
    let file = generate(scratch.path(), "bench.bin", FILE_SIZE, 7)?;
    upload(alice, "f", &[&file]).await?;
    upload(carol, "f", &[&file]).await?;
    for b in [alice, bob] {
        js(b, RAW_JS).await?;
    }

    // Hashing alone, in Alice's page (shareFiles hashes and seeds without offering).
    let hashed = call(
        alice,
        &format!(
            "const t0 = performance.now(); const r = await s.shareFiles({});
             return {{ ms: performance.now() - t0, r }};",
            entries_js("f", &[(&file, &file.name)])
        ),
        LONG,
    )
    .await?;
    if hashed["r"][0]["root"] != file.root.as_str() {
        bail!("shareFiles named the file {}, not {}", hashed["r"], file.root);
    }
    let hash_ms = hashed["ms"].as_f64().unwrap_or(0.0);

    let (mut raw, mut weft) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let r = raw_run(alice, bob, bob_id, run).await?;
        println!("  run {run}: raw data channel {:.1} MB/s ({r:.0} ms)", mb_s(FILE_SIZE, r));
        raw.push(mb_s(FILE_SIZE, r));
        let (w, sources) = weft_run(alice, bob, bob_id, "f", &file, None).await?;
        println!(
            "  run {run}: Weft {:.1} MB/s ({w:.0} ms, sources {sources:?})",
            mb_s(FILE_SIZE, w)
        );
        weft.push(mb_s(FILE_SIZE, w));
    }

    // Carol seeds the same file: Bob fetches from both.
    let shared = call(
        carol,
        &format!(
            "const t0 = performance.now(); const r = await s.shareFiles({});
             return {{ ms: performance.now() - t0, r }};",
            entries_js("f", &[(&file, &file.name)])
        ),
        LONG,
    )
    .await?;
    println!("  Carol's shareFiles (hash) took {:.0} ms", shared["ms"].as_f64().unwrap_or(0.0));
    let mut swarm = Vec::new();
    let mut swarm_sources = usize::MAX;
    for run in 0..RUNS {
        let (w, sources) = weft_run(alice, bob, bob_id, "f", &file, None).await?;
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
    let forget = format!("await s.forgetDownload({}); return true;", json!(file.root));
    call(bob, &forget, LONG).await?;

    let (raw_m, weft_m, swarm_m) = (median(raw), median(weft), median(swarm));
    println!("BENCH weft_transfer_mb_s {weft_m:.1} MB/s");
    println!("BENCH raw_datachannel_mb_s {raw_m:.1} MB/s");
    println!("BENCH transfer_vs_raw_ratio {:.2} x", weft_m / raw_m);
    println!("BENCH swarm_mb_s {swarm_m:.1} MB/s");
    println!("BENCH swarm_vs_single_ratio {:.2} x", swarm_m / weft_m);
    println!("BENCH swarm_sources_min {swarm_sources} sources");
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
    let user_data_dir = bob
        .capabilities()
        .get("chrome")
        .and_then(|c| c["userDataDir"].as_str())
        .context("chromedriver did not say where Bob's profile is")?
        .to_string();
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
    let result = weft_run(alice, bob, bob_id, "g", &big, Some(&*stop)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let (took, _) = result?;
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
    let result = bench(&net, &scratch).await;
    net.close(result.is_err()).await;
    drop(scratch);
    result
}
