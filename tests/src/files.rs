//! Helpers for the file-transfer browser tests and benchmark: deterministic test files
//! hashed natively with BLAKE3, getting local files into a page (an `<input type=file>`
//! filled by chromedriver), a page-side session recorder with hooks, calls into the page
//! that may take long, and waiting for transfer events.
//!
//! In a page joined with [`join`], `window.t` holds `events` (each stamped with
//! `performance.now()` as `t`), `logs` (console warnings and errors), `error` (a join
//! failure), `session`, `on` (functions called with each event, in a microtask so they may
//! call back into the session) and `pcs` (every `RTCPeerConnection` the page made; the
//! unwrapped constructor is `window.t.NativePC`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use thirtyfour::prelude::*;
use weft_signal::{Limits, Server};

use crate::{ChromeDriver, js, start_server, wait_for};

/// How long to wait for a peer, a connection, an event of a small transfer.
pub const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Files on disk

/// A scratch directory on a real disk (under Cargo's target directory, not a possibly
/// RAM-backed `/tmp`), removed with everything in it on drop. `WEFT_SCRATCH_DIR` overrides
/// where it goes.
#[derive(Debug)]
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    /// A new, empty directory named after `tag`.
    pub fn new(tag: &str) -> Result<Self> {
        let base = match std::env::var_os("WEFT_SCRATCH_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => target_dir().map_or_else(std::env::temp_dir, |t| t.join("weft-scratch")),
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!("{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self { dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Cargo's target directory that holds the running executable (it has `CACHEDIR.TAG`).
fn target_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors().skip(1).find(|d| d.join("CACHEDIR.TAG").is_file()).map(Path::to_path_buf)
}

/// A generated file and what it must arrive as.
#[derive(Debug, Clone)]
pub struct TestFile {
    /// Its file name (unique among the files of a test).
    pub name: String,
    /// Where it is on disk.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Its BLAKE3 hash, 64 hex digits (what `b3sum` prints): the file's name in Weft.
    pub root: String,
}

/// SplitMix64: fast, deterministic, and good enough that no two chunks repeat.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Writes `size` pseudo-random bytes from `seed` to `dir/name` and hashes them natively
/// with BLAKE3 as they are written.
pub fn generate(dir: &Path, name: &str, size: u64, seed: u64) -> Result<TestFile> {
    const BUF: usize = 1 << 20;
    let path = dir.join(name);
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = BufWriter::with_capacity(BUF, file);
    let mut rng = SplitMix64(seed ^ 0x5745_4654_0000_0000);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; BUF];
    let mut left = size;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
        let n = usize::try_from(left.min(BUF as u64))?;
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    let root = hasher.finalize().to_hex().to_string();
    Ok(TestFile { name: name.to_string(), path, size, root })
}

/// BLAKE3 of a file on disk, natively (to double-check [`generate`]).
pub fn blake3_of(path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut file = File::open(path)?;
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hasher.finalize().to_hex().to_string())
}

// ---------------------------------------------------------------------------------------
// Pages and sessions

/// Records events, logs and peer connections in `window.t`, then joins in the background.
const JOIN_SCRIPT: &str = r#"
  const options = arguments[0];
  window.t = { events: [], logs: [], error: null, session: null, on: [], pcs: [], calls: {},
               nextCall: 0, joinAt: performance.now() };
  for (const level of ["warn", "error"]) {
    const original = console[level].bind(console);
    console[level] = (...args) => { window.t.logs.push(level + ": " + args.map(String).join(" ")); original(...args); };
  }
  window.addEventListener("error", (e) => window.t.logs.push("uncaught: " + e.message));
  window.addEventListener("unhandledrejection", (e) => window.t.logs.push("unhandled: " + e.reason));
  const Native = window.RTCPeerConnection;
  window.t.NativePC = Native;
  window.RTCPeerConnection = function (...args) {
    const pc = new Native(...args);
    window.t.pcs.push(pc);
    return pc;
  };
  window.RTCPeerConnection.prototype = Native.prototype;
  // Timers Weft's module sets (their caller is its glue or a snippet of it), until they
  // fire or are cleared: `leave()` must leave none.
  window.t.timers = new Map();
  for (const [set, clear, once] of [["setTimeout", "clearTimeout", true],
                                    ["setInterval", "clearInterval", false]]) {
    const nativeSet = window[set].bind(window), nativeClear = window[clear].bind(window);
    window[set] = function (fn, ms, ...args) {
      // A benchmark turns this off (`t.trackTimers = false`): the stack trace costs more
      // than the timer, on every one the module sets.
      if (window.t.trackTimers === false) return nativeSet(fn, ms, ...args);
      const caller = (new Error().stack || "").split("\n")[2] || "";
      if (typeof fn !== "function" || !/weft[_-]wasm/.test(caller)) return nativeSet(fn, ms, ...args);
      const id = nativeSet((...a) => { if (once) window.t.timers.delete(id); return fn(...a); }, ms, ...args);
      window.t.timers.set(id, `${set}(${ms} ms) from ${caller.trim()}`);
      return id;
    };
    window[clear] = function (id) { window.t.timers.delete(id); return nativeClear(id); };
  }
  (async () => {
    try {
      const m = await import(document.getElementById("weft-module").href);
      await m.default();
      window.t.module = m;
      options.onEvent = (ev) => {
        const e = { ...ev, t: performance.now() };
        window.t.events.push(e);
        for (const hook of window.t.on) {
          queueMicrotask(() => {
            try { hook(e); } catch (err) { window.t.logs.push("hook threw: " + err); }
          });
        }
      };
      window.t.session = await m.WeftSession.join(options);
    } catch (e) {
      window.t.error = String((e && e.message) || e);
    }
  })();
  return true;
"#;

/// A new invite, from the WASM module in `browser`'s page.
pub async fn create_invite(browser: &WebDriver) -> Result<String> {
    let v = call_raw(
        browser,
        r#"const m = await import(document.getElementById("weft-module").href); await m.default(); return m.createInvite();"#,
        WAIT,
    )
    .await?;
    Ok(v.as_str().context("createInvite returned no string")?.to_string())
}

/// Loads the WASM module in the current page and starts joining `invite` as `name`
/// (see the module docs for what the page then records).
pub async fn start_join(browser: &WebDriver, invite: &str, name: &str) -> Result<()> {
    browser_join(browser, json!({ "invite": invite, "name": name })).await
}

/// [`start_join`] with any `WeftSession.join` options (`onEvent` and `debug` are set).
pub async fn start_join_with(browser: &WebDriver, options: Value) -> Result<()> {
    browser_join(browser, options).await
}

async fn browser_join(browser: &WebDriver, options: Value) -> Result<()> {
    browser.execute(JOIN_SCRIPT, vec![options]).await?;
    Ok(())
}

/// One browser of a [`Net`]: its display name, extra `WeftSession.join` options, and
/// where its downloads go (`None`: Chromium's default, unused by the OPFS store).
#[derive(Debug, Clone)]
pub struct Member {
    /// Display name.
    pub name: String,
    /// Merged into the join options (e.g. `{ "downloads": "stream" }`).
    pub join: Value,
    /// Chromium's download folder.
    pub downloads: Option<PathBuf>,
}

impl Member {
    /// A member with default options.
    pub fn new(name: &str) -> Self {
        Self { name: name.to_string(), join: json!({}), downloads: None }
    }
}

/// Waits until `browser`'s session is joined with `count` peers whose encrypted sessions
/// are up; returns its own peer id.
pub async fn wait_connected(browser: &WebDriver, count: usize) -> Result<String> {
    wait_for(&format!("{count} connected peers"), WAIT, || async {
        let s = js(
            browser,
            r#"const t = window.t || {}, s = t.session;
               return { error: t.error ?? null, ownId: s ? (s.ownId ?? null) : null,
                        peers: s ? s.peers() : [], logs: (t.logs || []).slice(-10) };"#,
        )
        .await?;
        if let Some(e) = s["error"].as_str() {
            bail!("join failed: {e}");
        }
        let peers = s["peers"].as_array().cloned().unwrap_or_default();
        let up = peers
            .iter()
            .filter(|p| {
                (p["state"] == "direct" || p["state"] == "relayed") && p["name"].is_string()
            })
            .count();
        match s["ownId"].as_str() {
            Some(id) if up == count && peers.len() == count => Ok(Ok(id.to_string())),
            _ => Ok(Err(format!("peers {} logs {}", s["peers"], s["logs"]))),
        }
    })
    .await
}

/// A signaling server, chromedriver, and one joined Chromium per name, all connected to
/// each other in a new invite network.
#[derive(Debug)]
pub struct Net {
    /// The signaling server.
    pub server: Server,
    /// The chromedriver that started the browsers (killed on drop).
    pub driver: ChromeDriver,
    /// One browser per name, in order.
    pub browsers: Vec<WebDriver>,
    /// Their peer ids, in the same order.
    pub ids: Vec<String>,
    /// The network's invite.
    pub invite: String,
}

impl Net {
    /// Starts everything and waits until every browser has an encrypted session with
    /// every other one.
    pub async fn start(names: &[&str]) -> Result<Self> {
        let members: Vec<Member> = names.iter().map(|n| Member::new(n)).collect();
        Self::start_members(&members).await
    }

    /// [`Net::start`] with per-member join options and download folders.
    pub async fn start_members(members: &[Member]) -> Result<Self> {
        let server = start_server(Limits::default()).await?;
        Self::start_on(server, members, "").await
    }

    /// [`Net::start_members`] on `server`, every browser on the page at `page` (a path
    /// relative to the server's root, "" for the app itself).
    pub async fn start_on(server: Server, members: &[Member], page: &str) -> Result<Self> {
        let driver = ChromeDriver::start().await?;
        let mut browsers = Vec::new();
        for m in members {
            let b = driver.browser_saving_to(m.downloads.as_deref()).await?;
            b.goto(format!("{}{page}", server.url())).await?;
            browsers.push(b);
        }
        let first = browsers.first().context("no browsers")?;
        let invite = create_invite(first).await?;
        for (b, m) in browsers.iter().zip(members) {
            let mut options = json!({ "invite": invite, "name": m.name });
            if let (Some(o), Some(extra)) = (options.as_object_mut(), m.join.as_object()) {
                o.extend(extra.clone());
            }
            browser_join(b, options).await?;
        }
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        let mut ids = Vec::new();
        for b in &browsers {
            ids.push(wait_connected(b, names.len() - 1).await?);
        }
        Ok(Self { server, driver, browsers, ids, invite })
    }

    /// Prints each page's recent events and logs (when a test failed), then quits every
    /// browser and stops the server.
    pub async fn close(self, failed: bool) {
        if failed {
            for (i, b) in self.browsers.iter().enumerate() {
                println!("--- browser {i} ({}):\n{}", self.ids[i], diagnostics(b).await);
            }
        }
        for b in self.browsers {
            let _ = b.quit().await;
        }
        self.server.shutdown(Duration::from_secs(2)).await;
    }
}

/// The page's last events (without progress/upload noise), logs and transfers, for a
/// failure message.
pub async fn diagnostics(browser: &WebDriver) -> String {
    let v = js(
        browser,
        r#"const t = window.t || {};
           const ev = (t.events || []).filter((e) => e.type !== "progress" && e.type !== "upload" && e.type !== "hashing");
           const last = (t.events || []).filter((e) => e.type === "progress" || e.type === "upload").slice(-4);
           let transfers = null;
           try { transfers = t.session ? t.session.transfers() : null; } catch (e) { transfers = String(e); }
           return { error: t.error ?? null, events: ev.slice(-30), lastProgress: last,
                    logs: (t.logs || []).slice(-30), transfers };"#,
    )
    .await;
    match v {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
        Err(e) => format!("(cannot read the page: {e})"),
    }
}

/// Runs `body` (an async function body; `s` is the session, `t` is `window.t`) in the page
/// and waits up to `timeout` for what it returns (JSON-compatible). Unlike
/// `execute_async`, no script timeout applies.
pub async fn call(browser: &WebDriver, body: &str, timeout: Duration) -> Result<Value> {
    call_raw(browser, &format!("const t = window.t, s = t && t.session;\n{body}"), timeout).await
}

async fn call_raw(browser: &WebDriver, body: &str, timeout: Duration) -> Result<Value> {
    let script = format!(
        r#"window.__calls = window.__calls || {{ next: 0 }};
           const id = ++window.__calls.next;
           window.__calls[id] = null;
           (async () => {{ {body} }})().then(
             (v) => {{ window.__calls[id] = {{ ok: v === undefined ? null : v }}; }},
             (e) => {{ window.__calls[id] = {{ err: String((e && e.message) || e) }}; }});
           return id;"#
    );
    let id = js(browser, &script).await?;
    let id = id.as_u64().context("no call id")?;
    let out = wait_for("a call into the page", timeout, || async {
        let v = js(
            browser,
            &format!(
                "const r = window.__calls[{id}]; if (r) delete window.__calls[{id}]; return r;"
            ),
        )
        .await?;
        Ok(if v.is_null() { Err("pending".to_string()) } else { Ok(v) })
    })
    .await?;
    if let Some(err) = out.get("err") {
        bail!("in the page: {}", err.as_str().unwrap_or_default());
    }
    Ok(out.get("ok").cloned().unwrap_or(Value::Null))
}

/// Adds a hook called with each later event: `body` is a function body with `ev`, `s`
/// (the session) and `t` (`window.t`) in scope; it may be async.
pub async fn add_hook(browser: &WebDriver, body: &str) -> Result<()> {
    js(
        browser,
        &format!(
            "window.t.on.push(async (ev) => {{ const t = window.t, s = t.session;\n{body}\n}}); return true;"
        ),
    )
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Files into a page

/// Puts local `files` into a new `<input type=file multiple>` named `key` in the page
/// (chromedriver reads them from disk), and waits until the input holds them all.
pub async fn upload(browser: &WebDriver, key: &str, files: &[&TestFile]) -> Result<()> {
    let id = format!("weft-upload-{key}");
    js(
        browser,
        &format!(
            r#"const i = document.createElement("input");
               i.type = "file"; i.multiple = true; i.id = {id};
               document.body.prepend(i); return true;"#,
            id = json!(id)
        ),
    )
    .await?;
    let input = browser.find(By::Id(&id)).await?;
    let paths: Vec<String> = files
        .iter()
        .map(|f| std::fs::canonicalize(&f.path).map(|p| p.to_string_lossy().to_string()))
        .collect::<std::io::Result<_>>()?;
    input.send_keys(paths.join("\n")).await?;
    let expected: Vec<Value> = files.iter().map(|f| json!([f.name, f.size])).collect();
    wait_for(&format!("the page to hold {} files", files.len()), WAIT, || async {
        let got = js(
            browser,
            &format!(
                "return [...document.getElementById({}).files].map((f) => [f.name, f.size]);",
                json!(id)
            ),
        )
        .await?;
        let mut got_sorted = got.as_array().cloned().unwrap_or_default();
        got_sorted.sort_by_key(Value::to_string);
        let mut want = expected.clone();
        want.sort_by_key(Value::to_string);
        Ok(if got_sorted == want { Ok(()) } else { Err(got.to_string()) })
    })
    .await
}

/// A JavaScript expression for the entries of upload `key`, each with the path
/// `paths[name]` (or its own name).
pub fn entries_js(key: &str, paths: &[(&TestFile, &str)]) -> String {
    let map: serde_json::Map<String, Value> =
        paths.iter().map(|(f, p)| (f.name.clone(), json!(p))).collect();
    format!(
        "[...document.getElementById({}).files].map((f) => ({{ file: f, path: ({})[f.name] ?? f.name }}))",
        json!(format!("weft-upload-{key}")),
        Value::Object(map)
    )
}

/// `sendFiles` of upload `key` (with `paths`) to `to`; returns its answer
/// (`[{ peerId, offerId }]`). Hashing happens first, so this may take a while.
pub async fn send_files(
    browser: &WebDriver,
    key: &str,
    paths: &[(&TestFile, &str)],
    to: &str,
    timeout: Duration,
) -> Result<Vec<Value>> {
    let v = call(
        browser,
        &format!("return await s.sendFiles({}, {});", entries_js(key, paths), json!(to)),
        timeout,
    )
    .await?;
    v.as_array().cloned().with_context(|| format!("sendFiles answered {v}"))
}

/// `shareFiles` of upload `key` (with `paths`); returns its answer (`[{ root, path, size }]`).
pub async fn share_files(
    browser: &WebDriver,
    key: &str,
    paths: &[(&TestFile, &str)],
    timeout: Duration,
) -> Result<Vec<Value>> {
    let v =
        call(browser, &format!("return await s.shareFiles({});", entries_js(key, paths)), timeout)
            .await?;
    v.as_array().cloned().with_context(|| format!("shareFiles answered {v}"))
}

// ---------------------------------------------------------------------------------------
// Events and transfers

/// Every recorded event matching the JavaScript predicate `pred` (over `ev`).
pub async fn events(browser: &WebDriver, pred: &str) -> Result<Vec<Value>> {
    let v = js(browser, &format!("return window.t.events.filter((ev) => {pred});")).await?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// Waits for the first event matching `pred` (a JavaScript expression over `ev`); fails at
/// once if an event matching `fail` (if given) shows up first, or the join failed.
pub async fn wait_event(
    browser: &WebDriver,
    what: &str,
    pred: &str,
    fail: Option<&str>,
    timeout: Duration,
) -> Result<Value> {
    let fail = fail.unwrap_or("false");
    wait_for(what, timeout, || async {
        let v = js(
            browser,
            &format!(
                r#"const t = window.t;
                   if (!t) return {{ state: "no recorder in the page" }};
                   if (t.error) return {{ bad: "join failed: " + t.error }};
                   const bad = t.events.find((ev) => {fail});
                   if (bad) return {{ bad }};
                   const found = t.events.find((ev) => {pred});
                   if (found) return {{ found }};
                   const recent = t.events.filter((e) => e.type !== "upload" && e.type !== "hashing").slice(-6);
                   return {{ state: {{ recent, logs: t.logs.slice(-6) }} }};"#
            ),
        )
        .await?;
        if let Some(bad) = v.get("bad") {
            bail!("while waiting for {what}: {bad}");
        }
        match v.get("found") {
            Some(found) => Ok(Ok(found.clone())),
            None => Ok(Err(v["state"].to_string())),
        }
    })
    .await
}

/// A JavaScript predicate: an event of type `ty` whose field `field` equals `value`.
pub fn is_event(ty: &str, field: &str, value: &str) -> String {
    format!("ev.type === {} && ev[{}] === {}", json!(ty), json!(field), json!(value))
}

/// `session.transfers()`.
pub async fn transfers(browser: &WebDriver) -> Result<Value> {
    js(browser, "return window.t.session.transfers();").await
}

/// A predicate (JavaScript, on `ev`) for an event of type `ty` about the file `name`: its
/// `key` (the name it was offered under, in every event) or its `root` (its BLAKE3 hash,
/// once known).
pub fn is_file_event(ty: &str, name: &str) -> String {
    let name = json!(name);
    format!("ev.type === {} && (ev.key === {name} || ev.root === {name})", json!(ty))
}

/// The receiver's download of `name` (its key or root) in `transfers()`, if it lists one.
pub async fn download(browser: &WebDriver, name: &str) -> Result<Option<Value>> {
    let t = transfers(browser).await?;
    Ok(t["downloads"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["key"] == name || d["root"] == name).cloned()))
}

/// Waits for the `file_complete` of `name` (its key or root), failing early on its
/// `file_failed`.
pub async fn wait_complete(browser: &WebDriver, name: &str, timeout: Duration) -> Result<Value> {
    wait_event(
        browser,
        &format!("file_complete of {name}"),
        &is_file_event("file_complete", name),
        Some(&is_file_event("file_failed", name)),
        timeout,
    )
    .await
}

/// The key each item of an `offer` event (or an outgoing offer) was offered under, by path.
pub fn offered_keys(offer: &Value) -> Result<HashMap<String, String>> {
    offer["items"]
        .as_array()
        .context("offer without items")?
        .iter()
        .map(|i| {
            let path = i["path"].as_str().context("item without path")?;
            let key = i["key"].as_str().context("item without key")?;
            Ok((path.to_string(), key.to_string()))
        })
        .collect()
}

/// `hashDownloaded(root)`: the receiver's BLAKE3 of the bytes it stored.
pub async fn hash_downloaded(browser: &WebDriver, root: &str, timeout: Duration) -> Result<String> {
    let v =
        call(browser, &format!("return await s.hashDownloaded({});", json!(root)), timeout).await?;
    Ok(v.as_str().with_context(|| format!("hashDownloaded answered {v}"))?.to_string())
}

/// Waits for the offer `offer_id` from `from` to arrive, and returns it.
pub async fn wait_offer(browser: &WebDriver, from: &str, offer_id: &Value) -> Result<Value> {
    wait_event(
        browser,
        &format!("offer {offer_id} from {from}"),
        &format!(
            "ev.type === 'offer' && ev.peerId === {} && ev.offerId === {offer_id}",
            json!(from)
        ),
        None,
        WAIT,
    )
    .await
}

/// `acceptOffer(from, offerId)`.
pub async fn accept(browser: &WebDriver, from: &str, offer_id: &Value) -> Result<()> {
    call(browser, &format!("s.acceptOffer({}, {offer_id}); return true;", json!(from)), WAIT)
        .await?;
    Ok(())
}

/// The largest `sentBytes` in `upload` events of `name` (key or root) to `peer`, if any.
pub async fn uploaded(browser: &WebDriver, name: &str, peer: &str) -> Result<Option<u64>> {
    let pred = format!("{} && ev.peerId === {}", is_file_event("upload", name), json!(peer));
    let ups = events(browser, &pred).await?;
    Ok(ups.iter().filter_map(|u| u["sentBytes"].as_u64()).max())
}

/// Payload bytes received on every data channel of every peer connection the page made.
pub const BYTES_RECEIVED_JS: &str = r#"
  let bytes = 0;
  for (const pc of window.t.pcs) {
    try {
      const stats = await pc.getStats();
      stats.forEach((r) => { if (r.type === "data-channel") bytes += r.bytesReceived || 0; });
    } catch (e) { /* closed */ }
  }
"#;

/// Every file in the page's origin-private file system: `[{ path, size }]` (`size` null,
/// with `error`, if it cannot be read, e.g. while a worker holds it open).
pub async fn opfs_files(browser: &WebDriver) -> Result<Vec<Value>> {
    let v = call(browser, OPFS_LIST_JS, WAIT).await?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// An async function body listing OPFS (see [`opfs_files`]).
pub const OPFS_LIST_JS: &str = r#"
  async function list(dir, prefix) {
    const out = [];
    for await (const [name, h] of dir.entries()) {
      if (h.kind === "file") {
        try { out.push({ path: prefix + name, size: (await h.getFile()).size }); }
        catch (e) { out.push({ path: prefix + name, size: null, error: String(e) }); }
      } else {
        out.push(...await list(h, prefix + name + "/"));
      }
    }
    return out;
  }
  return await list(await navigator.storage.getDirectory(), "");
"#;

/// Milliseconds since `start`, for TIMING lines.
pub fn ms(start: Instant) -> u128 {
    start.elapsed().as_millis()
}

/// `n` MiB.
pub const fn mib(n: u64) -> u64 {
    n * 1024 * 1024
}
