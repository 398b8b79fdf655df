//! Test support: real servers and real headless Chromium, for Weft's integration tests
//! and benchmarks.
//!
//! Browser tests skip (printing why) only when the capability is really missing, and only
//! when `WEFT_REQUIRE_BROWSER` is unset; `cargo xtask test` sets it, so there they run.
//! Network namespace tests ([`netns`]) do the same with `WEFT_REQUIRE_NETNS`.
#![forbid(unsafe_code)]

pub mod files;
pub mod mitm;
pub mod native;
pub mod netns;
pub mod turn_server;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use thirtyfour::prelude::*;
use weft_signal::{Config, Limits, Server};

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's ChromeDriver, the same version as [`CHROMIUM`].
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Starts [`CHROMIUM`] inside the network namespace named by its `--weft-netns=` argument.
const CHROMIUM_IN_NETNS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/chromium-in-netns.sh");

/// The built web app: `WEFT_WEB_ROOT`, or where `cargo xtask bundle` puts it.
pub fn web_root() -> PathBuf {
    std::env::var_os("WEFT_WEB_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(weft_signal::default_web_root)
}

/// Why Chromium cannot be started here, if it cannot.
pub fn chromium_missing() -> Option<String> {
    if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
        return Some(format!(
            "{CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)"
        ));
    }
    None
}

/// Why browser tests (Chromium and the built web app) cannot run here, if they cannot.
pub fn browser_missing() -> Option<String> {
    if let Some(reason) = chromium_missing() {
        return Some(reason);
    }
    let root = web_root();
    if !root.join("index.html").is_file() || !root.join("a").is_dir() {
        return Some(format!(
            "the web app is not built in {} (cargo xtask bundle)",
            root.display()
        ));
    }
    None
}

/// `true` if browser tests may run; `false` (after printing why) if they must skip.
/// Panics when `WEFT_REQUIRE_BROWSER` is set and the browser is missing.
pub fn browser_available(test: &str) -> bool {
    available(test, browser_missing(), "WEFT_REQUIRE_BROWSER")
}

/// [`browser_available`] for tests that serve their own pages (no web app needed).
pub fn chromium_available(test: &str) -> bool {
    available(test, chromium_missing(), "WEFT_REQUIRE_BROWSER")
}

/// `true` if nothing is `missing`; else prints why `test` skips and returns `false`, or
/// panics if the environment variable `require` is set.
#[allow(clippy::panic, reason = "a test that must run fails loudly rather than skip")]
fn available(test: &str, missing: Option<String>, require: &str) -> bool {
    let Some(reason) = missing else { return true };
    if std::env::var_os(require).is_some() {
        panic!("{test}: required here ({require} is set) but {reason}");
    }
    println!("SKIPPED {test}: {reason}");
    false
}

/// Starts a signaling server on a free loopback port serving [`web_root`].
pub async fn start_server(limits: Limits) -> Result<Server> {
    start_server_at("127.0.0.1:0".parse()?, limits).await
}

/// Starts a signaling server on `listen` (to restart one on the same address).
pub async fn start_server_at(listen: std::net::SocketAddr, limits: Limits) -> Result<Server> {
    start_server_serving(listen, limits, web_root()).await
}

/// Starts a signaling server on `listen` serving the files in `root`.
pub async fn start_server_serving(
    listen: std::net::SocketAddr,
    limits: Limits,
    root: PathBuf,
) -> Result<Server> {
    // The embedded STUN/TURN on a free port: tests run side by side.
    let turn = weft_signal::TurnConfig { port: 0, ..Default::default() };
    let config = Config { listen, web_root: root, tls: None, limits, turn, cluster: None };
    Ok(Server::start(config).await?)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// How [`ChromeDriver::launch`] starts a Chromium.
#[derive(Debug, Default, Clone, Copy)]
pub struct BrowserOptions<'a> {
    /// Save downloads into this directory without asking (several per page allowed).
    pub downloads: Option<&'a std::path::Path>,
    /// Run inside this host's network namespace (see [`ChromeDriver::browser_in`]).
    pub netns: Option<&'a netns::Host>,
    /// Accept any TLS certificate, a self-signed one for HTTPS or for TURN over TLS
    /// included (`--ignore-certificate-errors`: Chromium checks a TURN server's
    /// certificate as it does a website's).
    pub danger_accept_any_certificate: bool,
}

/// A chromedriver process on a free port, killed on drop.
#[derive(Debug)]
pub struct ChromeDriver {
    child: Child,
    url: String,
}

impl ChromeDriver {
    /// Starts chromedriver and waits until it accepts connections.
    pub async fn start() -> Result<Self> {
        let port = free_port()?;
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start chromedriver")?;
        let driver = Self { child, url: format!("http://127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if Instant::now() > deadline {
                bail!("chromedriver did not listen on port {port} within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(driver)
    }

    /// A new headless Chromium process with its own fresh profile.
    pub async fn browser(&self) -> Result<WebDriver> {
        self.browser_saving_to(None).await
    }

    /// A new headless Chromium process that saves downloads into `downloads` without
    /// asking (several per page allowed).
    pub async fn browser_saving_to(
        &self,
        downloads: Option<&std::path::Path>,
    ) -> Result<WebDriver> {
        self.launch(BrowserOptions { downloads, ..BrowserOptions::default() }).await
    }

    /// A new headless Chromium process inside `host`'s network namespace (see
    /// [`netns`]). ChromeDriver stays in this namespace and talks to Chromium over the
    /// pipes of `--remote-debugging-pipe` (inherited through `ip netns exec`), since a
    /// DevTools port would listen on the other namespace's loopback. Quit the browser
    /// before dropping the topology.
    pub async fn browser_in(&self, host: &netns::Host) -> Result<WebDriver> {
        self.launch(BrowserOptions { netns: Some(host), ..BrowserOptions::default() }).await
    }

    /// A new headless Chromium process started as `options` say.
    pub async fn launch(&self, options: BrowserOptions<'_>) -> Result<WebDriver> {
        let BrowserOptions { downloads, netns, danger_accept_any_certificate } = options;
        let mut caps = DesiredCapabilities::chrome();
        if let Some(dir) = downloads {
            caps.add_experimental_option(
                "prefs",
                serde_json::json!({
                    "download.default_directory": dir,
                    "download.prompt_for_download": false,
                    "download.directory_upgrade": true,
                    "profile.default_content_setting_values.automatic_downloads": 1,
                }),
            )?;
        }
        match netns {
            None => caps.set_binary(CHROMIUM)?,
            Some(host) => {
                caps.set_binary(CHROMIUM_IN_NETNS)?;
                caps.add_arg("--remote-debugging-pipe")?;
                caps.add_arg(&format!("--weft-netns={}", host.netns))?;
            }
        }
        for arg in [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--disable-features=WebRtcHideLocalIpsWithMdns",
            "--window-size=1000,800",
        ] {
            caps.add_arg(arg)?;
        }
        if danger_accept_any_certificate {
            caps.add_arg("--ignore-certificate-errors")?;
        }
        WebDriver::new(&self.url, caps).await.context("chromedriver could not start Chromium")
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 100 ms until it yields `Some`, or fails after `timeout` with
/// `what` and the last state `check` reported.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Result<T, String>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await? {
            Ok(value) => return Ok(value),
            Err(state) => state,
        };
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last state: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `script` in the page and returns its result as JSON.
pub async fn js(browser: &WebDriver, script: &str) -> Result<serde_json::Value> {
    Ok(browser.execute(script, Vec::new()).await?.json().clone())
}

/// Deletes the page's IndexedDB database (its identity key, trust stores and resume
/// records): the next join comes with a new key. Fails unless it was deleted (a page
/// still holding it open blocks the deletion).
pub async fn forget_stored_key(browser: &WebDriver) -> Result<()> {
    let script = "const done = arguments[arguments.length - 1];
        const req = indexedDB.deleteDatabase('weft');
        req.onsuccess = () => done('deleted'); req.onerror = () => done('error');
        req.onblocked = () => done('blocked');";
    let result = browser.execute_async(script, Vec::new()).await?.json().clone();
    ensure!(result == "deleted", "the page's IndexedDB was not deleted: {result}");
    Ok(())
}

/// Setup script for [`start_join`]: keeps every `RTCPeerConnection` the page creates
/// (with its configuration and gathered candidates) in `window.__pcs`.
pub const INSTRUMENT_PEER_CONNECTIONS: &str = r#"
    window.__pcs = [];
    const Native = window.RTCPeerConnection;
    window.RTCPeerConnection = function (...args) {
      const pc = new Native(...args);
      const entry = { pc, config: args[0] ?? null, candidates: [] };
      pc.addEventListener("icecandidate", (e) => {
        if (e.candidate && e.candidate.candidate) entry.candidates.push(e.candidate.candidate);
      });
      window.__pcs.push(entry);
      return pc;
    };
    window.RTCPeerConnection.prototype = Native.prototype;
"#;

/// The browser's own view of its connections (recorded by
/// [`INSTRUMENT_PEER_CONNECTIONS`]): the configuration each was made with, the
/// candidates it gathered, and the selected pair's candidate types and local address.
pub async fn rtc_view(browser: &WebDriver) -> Result<serde_json::Value> {
    js(
        browser,
        r#"return (async () => {
          const out = [];
          for (const { pc, config, candidates } of window.__pcs || []) {
            const stats = await pc.getStats();
            let pair = null;
            stats.forEach((s) => {
              if (s.type === "transport" && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
            });
            const local = pair ? stats.get(pair.localCandidateId) : null;
            const remote = pair ? stats.get(pair.remoteCandidateId) : null;
            out.push({
              connectionState: pc.connectionState,
              policy: config ? (config.iceTransportPolicy ?? null) : null,
              iceServers: config ? (config.iceServers ?? null) : null,
              candidates,
              localType: local ? local.candidateType : null,
              localAddress: local ? local.address : null,
              remoteType: remote ? remote.candidateType : null,
              relayProtocol: local ? (local.relayProtocol ?? null) : null,
            });
          }
          return out;
        })();"#,
    )
    .await
}

/// Waits until `browser`'s session (see [`start_join`]) sees a peer named `name` in one of
/// `states` (`"direct"`, `"relayed"`, …); that peer. Fails at once if the join failed.
pub async fn wait_peer(
    browser: &WebDriver,
    name: &str,
    states: &[&str],
    timeout: Duration,
) -> Result<serde_json::Value> {
    wait_for(&format!("the browser to see {name} in {states:?}"), timeout, || async {
        let s = js(
            browser,
            r#"const t = window.t || {}; const s = t.session;
               return { error: t.error ?? null, peers: s ? s.peers() : [],
                        logs: (t.logs || []).slice(-30) };"#,
        )
        .await?;
        if let Some(e) = s["error"].as_str() {
            anyhow::bail!("join failed: {e}");
        }
        let found = s["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name && states.contains(&p["state"].as_str().unwrap_or("")));
        match found {
            Some(p) => Ok(Ok(p.clone())),
            None => Ok(Err(format!("{} logs: {}", s["peers"], s["logs"]))),
        }
    })
    .await
}

/// Waits until `browser`'s page recorded (see [`start_join`]) a message with this text;
/// the message.
pub async fn wait_message(
    browser: &WebDriver,
    text: &str,
    timeout: Duration,
) -> Result<serde_json::Value> {
    wait_for(&format!("message {text:?}"), timeout, || async {
        let messages = js(browser, "return (window.t && window.t.messages) || [];").await?;
        let found = messages.as_array().into_iter().flatten().find(|m| m["text"] == text);
        match found {
            Some(m) => Ok(Ok(m.clone())),
            None => Ok(Err(messages.to_string())),
        }
    })
    .await
}

/// Loads the WASM module in `browser`'s current page and starts
/// `WeftSession.join(options)` in the background. Events (stamped with
/// `performance.now()` as `t`), messages, console warnings/errors and any join error are
/// recorded in `window.t`; the session is `window.t.session` once joined. `setup` is
/// JavaScript run first (for example to instrument `RTCPeerConnection`).
pub async fn start_join(
    browser: &WebDriver,
    options: &serde_json::Value,
    setup: &str,
) -> Result<()> {
    let script = format!(
        r#"
        window.t = {{ events: [], messages: [], logs: [], error: null, session: null, joinAt: performance.now() }};
        for (const level of ["warn", "error", "debug"]) {{
          const original = console[level].bind(console);
          console[level] = (...args) => {{ window.t.logs.push(args.map(String).join(" ")); original(...args); }};
        }}
        window.addEventListener("error", (e) => window.t.logs.push("uncaught: " + e.message));
        window.addEventListener("unhandledrejection", (e) => window.t.logs.push("unhandled: " + e.reason));
        {setup}
        (async () => {{
          try {{
            const m = await import(document.getElementById("weft-module").href);
            await m.default();
            const opts = {options};
            opts.debug = true;
            opts.onEvent = (ev) => {{
              window.t.events.push({{ ...ev, t: performance.now() }});
              if (ev.type === "message") window.t.messages.push(ev);
            }};
            window.t.session = await m.WeftSession.join(opts);
          }} catch (e) {{
            window.t.error = String((e && e.message) || e);
          }}
        }})();
        return true;
        "#
    );
    js(browser, &script).await?;
    Ok(())
}
