//! The native peer (`weft-peer`) as a real process, for tests: built once with cargo,
//! started with its own config directory, its JSON lines read as events.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// The `weft-peer` binary: `WEFT_PEER_BIN`, or built with `cargo build -p weft-peer` into
/// the target directory this test runs from (once per test process).
pub fn weft_peer_bin() -> Result<PathBuf> {
    bin("weft-peer", "WEFT_PEER_BIN")
}

/// The `weft-signal` binary (`WEFT_SIGNAL_BIN`, or built as [`weft_peer_bin`] is), for
/// tests that run the server as a process of its own (in a network namespace).
pub fn weft_signal_bin() -> Result<PathBuf> {
    bin("weft-signal", "WEFT_SIGNAL_BIN")
}

/// The binaries tests run, built in one cargo invocation: built one at a time, each
/// build would unify its dependencies' features differently and rebuild what the other
/// just built.
const BINS: [&str; 2] = ["weft-peer", "weft-signal"];

fn bin(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(env) {
        return Ok(PathBuf::from(bin));
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let profile_dir = BUILT
        .get_or_init(|| build_bins().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))?;
    let bin = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        bail!("cargo built {name} but {} is not there", bin.display());
    }
    Ok(bin)
}

/// Builds [`BINS`] into the target directory this test runs from; its profile directory.
fn build_bins() -> Result<PathBuf> {
    // A test runs as <target>/<profile>/deps/<test>-<hash>, a bin as
    // <target>/<profile>/<bin>; cargo keeps its lock file in the profile directory.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .ancestors()
        .skip(1)
        .find(|d| d.join(".cargo-lock").is_file())
        .ok_or_else(|| anyhow!("cannot find the target directory from {}", exe.display()))?;
    let target_dir = profile_dir.parent().ok_or_else(|| anyhow!("no target directory"))?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.arg("build").current_dir(&workspace);
    for name in BINS {
        build.args(["-p", name, "--bin", name]);
    }
    build.env("CARGO_TARGET_DIR", target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().context("cannot run cargo to build the binaries")?;
    if !status.success() {
        bail!("cargo build of {BINS:?} failed: {status}");
    }
    Ok(profile_dir.to_path_buf())
}

/// A fresh, empty config directory for one native peer (its identity and trust store).
pub fn config_dir(label: &str) -> Result<PathBuf> {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("weft-native-{label}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A `weft-peer` command with `--server`, `--config-dir`, `--bind` and `--json` set.
pub fn command(server_ws: &str, config_dir: &Path, bind: std::net::IpAddr) -> Result<Command> {
    let mut cmd = Command::new(weft_peer_bin()?);
    peer_args(&mut cmd, server_ws, config_dir, bind);
    Ok(cmd)
}

/// [`command`] run on `host`, in its network namespace.
pub fn command_on(
    host: &crate::netns::Host,
    server_ws: &str,
    config_dir: &Path,
) -> Result<Command> {
    let mut cmd = host.tokio_command(weft_peer_bin()?);
    peer_args(&mut cmd, server_ws, config_dir, host.ip);
    Ok(cmd)
}

/// [`command`] without `--json`: what a person at a terminal sees.
pub fn text_command(server_ws: &str, config_dir: &Path, bind: std::net::IpAddr) -> Result<Command> {
    let mut cmd = Command::new(weft_peer_bin()?);
    base_args(&mut cmd, server_ws, config_dir, bind);
    Ok(cmd)
}

fn peer_args(cmd: &mut Command, server_ws: &str, config_dir: &Path, bind: std::net::IpAddr) {
    base_args(cmd, server_ws, config_dir, bind);
    cmd.arg("--json");
}

fn base_args(cmd: &mut Command, server_ws: &str, config_dir: &Path, bind: std::net::IpAddr) {
    // Nobody answers questions a test did not plan (a test that does gives its own stdin).
    cmd.stdin(Stdio::null());
    cmd.arg("--server")
        .arg(server_ws)
        .arg("--config-dir")
        .arg(config_dir)
        .arg("--bind")
        .arg(bind.to_string())
        .env_remove("WEFT_PASSPHRASE")
        .env_remove("WEFT_INVITE")
        .kill_on_drop(true);
}

/// A running `weft-peer up`, whose JSON lines are read as events.
#[derive(Debug)]
pub struct NativePeer {
    /// The process.
    pub child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Every event read so far.
    pub seen: Vec<Value>,
}

impl NativePeer {
    /// Starts `cmd` (which must print JSON lines), capturing stdout.
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        let mut child = cmd.stdout(Stdio::piped()).spawn().context("cannot start weft-peer")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        Ok(Self { child, lines: BufReader::new(stdout).lines(), seen: Vec::new() })
    }

    /// The next event for which `pred` holds, skipping others; fails after `timeout` or
    /// if the process ends first.
    pub async fn expect(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        self.expect_after(0, what, timeout, pred).await
    }

    /// As [`Self::expect`], but only among the events from `seen[after]` on: one that
    /// comes after an event already seen.
    async fn expect_after(
        &mut self,
        after: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        if let Some(v) = self.seen.iter().skip(after).find(|v| pred(v)) {
            return Ok(v.clone());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let value = self.next_event(deadline, what).await?;
            if pred(&value) {
                return Ok(value);
            }
        }
    }

    /// Reads the next event (and keeps it in `seen`), failing at `deadline` or if the
    /// process ends first.
    async fn next_event(&mut self, deadline: tokio::time::Instant, what: &str) -> Result<Value> {
        let line = tokio::time::timeout_at(deadline, self.lines.next_line())
            .await
            .map_err(|_| anyhow!("timed out waiting for {what}; saw {:?}", self.seen))??;
        let Some(line) = line else {
            bail!("weft-peer exited before {what}; saw {:?}", self.seen);
        };
        let value: Value =
            serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
        self.seen.push(value.clone());
        Ok(value)
    }

    /// Waits until the session that `connected` picks out (a `peer_connected` event) is
    /// on a direct path: that event says so, or a later `path_changed` for the same name
    /// does. ICE may first choose a relay whose check answered before a direct pair's (on
    /// a busy machine); the session moves to the direct pair once it answers
    /// (`vendor/rtc-ice/WEFT-PATCH.md`). Returns the `peer_connected` event, and says on
    /// stderr when the session started relayed.
    pub async fn expect_direct(
        &mut self,
        what: &str,
        timeout: Duration,
        connected: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let first =
            self.expect(what, timeout, |v| v["event"] == "peer_connected" && connected(v)).await?;
        if first["path"] == "direct" {
            return Ok(first);
        }
        let name = first["name"].clone();
        let after = self.seen.iter().position(|v| *v == first).map_or(0, |i| i + 1);
        let started = tokio::time::Instant::now();
        let turned = format!("{what} to turn direct");
        self.expect_after(after, &turned, timeout, |v| {
            v["event"] == "path_changed" && v["name"] == name && v["path"] == "direct"
        })
        .await?;
        eprintln!(
            "{what}: started {} and turned direct {:?} later",
            first["path"],
            started.elapsed()
        );
        Ok(first)
    }

    /// The next event of kind `event`.
    pub async fn expect_event(&mut self, event: &str, timeout: Duration) -> Result<Value> {
        self.expect(event, timeout, |v| v["event"] == event).await
    }

    /// Reads the remaining events until the process closes its output, then waits for
    /// its exit status (at most `timeout` in all).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .map_err(|_| anyhow!("weft-peer did not exit within {timeout:?}"))??;
            let Some(line) = line else { break };
            if let Ok(value) = serde_json::from_str::<Value>(&line) {
                self.seen.push(value);
            }
        }
        Ok(tokio::time::timeout_at(deadline, self.child.wait())
            .await
            .map_err(|_| anyhow!("weft-peer did not exit within {timeout:?}"))??)
    }

    /// Sends SIGTERM (a clean leave) and waits for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().ok_or_else(|| anyhow!("already exited"))?;
        let status =
            std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        Ok(tokio::time::timeout(timeout, self.child.wait()).await??)
    }
}

/// Runs `cmd` to completion (at most `timeout`): status, stdout, stderr.
pub async fn run(
    mut cmd: Command,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, String, String)> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| anyhow!("weft-peer did not finish within {timeout:?}"))??;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A `weft-signal` process (with its embedded STUN/TURN server) on a host of a
/// [`crate::netns::Topology`], killed on drop.
#[derive(Debug)]
pub struct SignalProcess {
    /// The process.
    pub child: Child,
    /// The page, e.g. `http://198.18.0.1:8080/`.
    pub url: String,
    /// The WebSocket endpoint.
    pub ws_url: String,
}

impl SignalProcess {
    /// Starts `weft-signal` on `host`, listening on its address at port 8080, STUN/TURN on
    /// 3478 (each namespace has ports of its own), with `extra` arguments.
    pub async fn start(host: &crate::netns::Host, extra: &[&str]) -> Result<Self> {
        Self::start_on(host, 8080, extra).await
    }

    /// [`SignalProcess::start`] listening on `port`.
    pub async fn start_on(host: &crate::netns::Host, port: u16, extra: &[&str]) -> Result<Self> {
        let mut cmd = host.tokio_command(weft_signal_bin()?);
        cmd.arg("--listen")
            .arg(std::net::SocketAddr::new(host.ip, port).to_string())
            .args(["--turn-port", "3478"])
            .args(extra);
        Self::spawn(cmd).await
    }

    /// Starts `weft-signal` on this machine's loopback, on a free port, without STUN/TURN,
    /// with `extra` arguments (for benchmarks and the cluster tests: several side by side).
    pub async fn start_local(extra: &[&str]) -> Result<Self> {
        let mut cmd = Command::new(weft_signal_bin()?);
        cmd.args(["--listen", "127.0.0.1:0", "--no-turn"]).args(extra);
        Self::spawn(cmd).await
    }

    async fn spawn(mut cmd: Command) -> Result<Self> {
        cmd.env("WEFT_WEB_ROOT", crate::web_root())
            .env("RUST_LOG", "warn,turn=off")
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("cannot start weft-signal")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let url = started("weft-signal", stdout, |line| {
            line.strip_prefix("Weft is running: open ").map(str::to_string)
        })
        .await?;
        let ws_url = format!("{}ws", url.replacen("http", "ws", 1));
        Ok(Self { child, url, ws_url })
    }

    /// Its process id (none once it was waited for).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// `host:port` it listens on.
    pub fn authority(&self) -> &str {
        let rest = self.url.split_once("://").map_or(self.url.as_str(), |(_, r)| r);
        rest.trim_end_matches('/')
    }
}

/// Reads `program`'s `output` until `find` finds what it waits for (at most 30 s), then
/// keeps reading it in the background so that it never blocks on a full pipe.
async fn started<R>(
    program: &str,
    output: R,
    find: impl Fn(&str) -> Option<String>,
) -> Result<String>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    let mut lines = BufReader::new(output).lines();
    let found = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| anyhow!("{program} did not start within 30 s"))??
            .ok_or_else(|| anyhow!("{program} exited at start"))?;
        if let Some(found) = find(&line) {
            break found;
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(found)
}

/// A `nats-server` (Debian's, with JetStream) on a free loopback port, for the cluster
/// tests and benches; killed on drop, its storage directory removed.
#[derive(Debug)]
pub struct NatsServer {
    /// The process.
    pub child: Child,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    dir: PathBuf,
}

impl NatsServer {
    /// Starts one (`nats-server` must be installed: `cargo xtask setup` does).
    pub async fn start() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("weft-nats-{:016x}", rand_u64()));
        std::fs::create_dir_all(&dir)?;
        let mut child = Command::new(nats_server_bin())
            .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
            .arg(&dir)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start nats-server (install it: cargo xtask setup)")?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let url = started("nats-server", stderr, |line| {
            let (_, addr) = line.split_once("Listening for client connections on ")?;
            Some(format!("nats://{}", addr.trim()))
        })
        .await?;
        Ok(Self { child, url, dir })
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `nats-server` binary: `WEFT_NATS_SERVER_BIN`, or `nats-server` on the path.
pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("WEFT_NATS_SERVER_BIN").map_or_else(|| "nats-server".into(), PathBuf::from)
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Why the cluster tests cannot run here (no `nats-server`), or `None`.
pub fn nats_missing() -> Option<String> {
    let found = std::process::Command::new(nats_server_bin())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!found).then(|| "`nats-server` is missing (apt-get install nats-server)".to_string())
}
