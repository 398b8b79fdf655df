//! `cargo xtask bench tun`: IP between two hosts through Weft's TUN bridge (`weft-peer up
//! --tun`, release build) against the same through two userspace WireGuards and over the
//! bare link, all in one run on the same namespaces (issue #12 item 11). Needs root
//! (skipped, saying why, without it).
//!
//! Two hosts `a` and `b` on one veth pair, and a server host beside them
//! ([`weft_tests::netns::VethPair`]; nothing leaves the machine). Four paths from `a` to `b`,
//! all set up at once before the first run:
//!
//! - `veth`: `b`'s address on the veth itself.
//! - `tun`: `weft-peer up --tun` on both hosts (MTU 1280, its default), `weft-signal` on
//!   the server host, the WebRTC connection bound to the veth (`--bind`): `b`'s overlay
//!   IPv4 address. IP packets take the fast UDP path (plain datagrams on the ICE pair,
//!   `core/src/node/fastpath.rs`) once it is up; the bench waits for that.
//! - `tun_datachannel`: the same with `up --no-fast-path` (IP packets on the unordered,
//!   unreliable data channel), on a second veth pair of its own (`a2`, `b2` and a server
//!   host: two overlays on one host would claim the same 100.64.0.0/10), measured from
//!   `a2`.
//! - `wireguard_go`: Debian's `wireguard-go` on both hosts, configured with `wg` (keys
//!   made for this run), its UDP on the veth; MTU 1420 (wg-quick's default).
//! - `boringtun`: `boringtun-cli` (crates.io, built by xtask into `target/tools`) the same
//!   way, with `--threads 1` (its best setting on two cores, `TOOLCHAIN.md`;
//!   `WEFT_BENCH_BORINGTUN_THREADS` sets another).
//!
//! Each daemon runs in a mount namespace of its own with a private `/run/wireguard` (every
//! host would otherwise share the control socket's path).
//!
//! Each run measures every path, in an order that rotates from run to run: `iperf3` TCP
//! from `a` to `b` with 4 parallel streams, then with 1 (the first second of each is not
//! counted: slow start), then ICMP echo (`ping`, 50 echoes 20 ms apart, idle link): the
//! kernel of `b` answers through the same tunnel, so ping measures the same thing on all
//! four paths. Throughput is iperf3's received rate; latency the median round trip of a
//! run's echoes. Each figure is the median over [`RUNS`] runs (`WEFT_BENCH_RUNS`), each
//! ratio the median of the runs' ratios (measured back to back). `WEFT_BENCH_SECONDS`
//! (default [`SECONDS`]) sets how long each iperf3 run counts; `WEFT_BENCH_PARTS` (`iperf`,
//! `ping`, comma-separated; both by default) measures only those. The CPU the tunnels' two
//! processes used during the 4-stream runs is printed too (every path is CPU-bound here).
//!
//! `WEFT_BENCH_PERF=DIR` adds one more 4-stream run through Weft with `perf record` (call
//! graphs from DWARF unwinding) on each `weft-peer`: `DIR/perf-a.data` (the sender) and
//! `DIR/perf-b.data` (the receiver). `core/ROUTING.md` ("Measured") says what they showed.
//!
//! Every process runs inside the namespaces; on any exit (an error, a panic, Ctrl-C or
//! SIGTERM) the processes are ended and the namespaces deleted, and a run killed outright
//! is cleaned up by the next one. Prints `BENCH <metric> <value> <unit>` lines.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use weft_tests::files::Scratch;
use weft_tests::native::{NativePeer, SignalProcess, command_on, config_dir, weft_peer_bin};
use weft_tests::netns::{Host, VethPair, netns_missing};

use crate::{cpu_ms, median};

const RUNS: usize = 3;
/// Seconds each iperf3 run counts (after one not counted).
const SECONDS: u64 = 4;
/// One step on a busy machine.
const WAIT: Duration = Duration::from_secs(60);
/// ICMP echoes per ping measurement, and the time between them.
const ECHOES: u32 = 50;
const ECHO_INTERVAL: &str = "0.02";
/// The WireGuards' MTU: wg-quick's default.
const WG_MTU: u16 = 1420;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A way from `a` to `b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Veth,
    Weft,
    WireguardGo,
    Boringtun,
    WeftDataChannel,
}

const WAYS: [Way; 5] =
    [Way::Veth, Way::Weft, Way::WireguardGo, Way::Boringtun, Way::WeftDataChannel];

impl Way {
    /// The name in `BENCH` lines.
    fn metric(self) -> &'static str {
        match self {
            Way::Veth => "veth",
            Way::Weft => "tun",
            Way::WireguardGo => "wireguard_go",
            Way::Boringtun => "boringtun",
            Way::WeftDataChannel => "tun_datachannel",
        }
    }

    fn index(self) -> usize {
        match self {
            Way::Veth => 0,
            Way::Weft => 1,
            Way::WireguardGo => 2,
            Way::Boringtun => 3,
            Way::WeftDataChannel => 4,
        }
    }
}

/// A WireGuard implementation under test.
#[derive(Debug, Clone, Copy)]
enum WireGuard {
    Go,
    Boringtun,
}

impl WireGuard {
    /// Its interface (per host: each runs in a namespace of its own), UDP port and
    /// overlay subnet `10.<net>.0.0/24`.
    fn device(self) -> &'static str {
        match self {
            WireGuard::Go => "wgo0",
            WireGuard::Boringtun => "wgb0",
        }
    }

    fn port(self) -> u16 {
        match self {
            WireGuard::Go => 51820,
            WireGuard::Boringtun => 51821,
        }
    }

    fn net(self) -> u8 {
        match self {
            WireGuard::Go => 101,
            WireGuard::Boringtun => 102,
        }
    }
}

/// Everything the runs measure through, set up; dropping it ends the processes (then the
/// namespaces go with the [`VethPair`], which ends anything left in them).
struct Paths {
    /// `b`'s address on each way, by [`Way::index`].
    targets: [IpAddr; 5],
    /// The processes that carry each way (none for the veth), by [`Way::index`].
    pids: [Vec<u32>; 5],
    weft: [NativePeer; 2],
    /// Weft without the fast path, on the second pair.
    weft_dc: [NativePeer; 2],
    _server: SignalProcess,
    _server_dc: SignalProcess,
    _daemons: Vec<Child>,
    iperf: Child,
    iperf_dc: Child,
}

/// The host each way is measured from.
fn client<'a>(pair: &'a VethPair, dc: &'a VethPair, way: Way) -> &'a Host {
    if way == Way::WeftDataChannel { &dc.a } else { &pair.a }
}

/// Whether `program arg` runs.
fn runs_ok(program: &Path, arg: &str) -> bool {
    std::process::Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The tools the bench runs; a clear error naming what is missing.
fn check_tools(boringtun: &Path) -> Result<()> {
    let mut missing = Vec::new();
    for (program, flag) in [
        ("iperf3", "--version"),
        ("wireguard-go", "--version"),
        ("wg", "--version"),
        ("ping", "-V"),
    ] {
        if !runs_ok(Path::new(program), flag) {
            missing.push(program.to_string());
        }
    }
    if !runs_ok(boringtun, "--version") {
        missing.push(boringtun.display().to_string());
    }
    if !missing.is_empty() {
        bail!(
            "missing {}: run the bench with `cargo xtask bench tun`, which installs them",
            missing.join(", ")
        );
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
pub async fn main() -> Result<()> {
    if let Some(why) = netns_missing() {
        println!("  skipped: {why}");
        return Ok(());
    }
    let boringtun = std::env::var_os("WEFT_BORINGTUN_BIN")
        .map_or_else(|| PathBuf::from("boringtun-cli"), PathBuf::from);
    check_tools(&boringtun)?;
    println!("  weft-peer: {}", weft_peer_bin()?.display());
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Returning drops the bench's future: its processes are killed and the namespaces
    // deleted (by `Drop`) on every way out, Ctrl-C and SIGTERM included.
    tokio::select! {
        result = bench(&boringtun) => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted (Ctrl-C); cleaned up"),
        _ = sigterm.recv() => bail!("terminated (SIGTERM); cleaned up"),
    }
}

async fn bench(boringtun: &Path) -> Result<()> {
    let pair = VethPair::new()?;
    let dc = VethPair::new()?;
    let scratch = Scratch::new("bench-tun")?;
    let mut paths = set_up(&pair, &dc, scratch.path(), boringtun).await?;
    let (runs, seconds) =
        (env_or("WEFT_BENCH_RUNS", RUNS).max(1), env_or("WEFT_BENCH_SECONDS", SECONDS).max(1));
    println!(
        "  MTU: veth 1500, tun 1280, WireGuards {WG_MTU}; {runs} runs of {seconds} s per \
         iperf3 measurement"
    );
    // By [`Way::index`]: each run's figures.
    let mut four: [Vec<f64>; 5] = Default::default();
    let mut one: [Vec<f64>; 5] = Default::default();
    let mut ping: [Vec<f64>; 5] = Default::default();
    let mut cpu: [Vec<f64>; 5] = Default::default();
    let (iperf_on, ping_on) = (part("iperf")?, part("ping")?);
    for run in 0..runs {
        let mut order = WAYS;
        order.rotate_left(run % WAYS.len());
        for way in order.into_iter().filter(|_| iperf_on) {
            let (before, start) = (cpu_of(&paths.pids[way.index()]), Instant::now());
            let from = client(&pair, &dc, way);
            let rate = iperf(from, paths.targets[way.index()], 4, seconds).await?;
            let used = cpu_of(&paths.pids[way.index()]) - before;
            four[way.index()].push(rate);
            cpu[way.index()].push(100.0 * used / (start.elapsed().as_secs_f64() * 1e3));
        }
        for way in order.into_iter().filter(|_| iperf_on) {
            let from = client(&pair, &dc, way);
            one[way.index()].push(iperf(from, paths.targets[way.index()], 1, seconds).await?);
        }
        for way in order.into_iter().filter(|_| ping_on) {
            let from = client(&pair, &dc, way);
            ping[way.index()].push(ping_ms(from, paths.targets[way.index()]).await?);
        }
        let show = |v: &[Vec<f64>; 5], unit: &str, digits: usize| {
            WAYS.iter()
                .filter_map(|w| {
                    Some(format!("{} {:.*}", w.metric(), digits, v[w.index()].get(run)?))
                })
                .collect::<Vec<_>>()
                .join(", ")
                + " "
                + unit
        };
        if iperf_on {
            println!("  run {run}: 4 streams {}", show(&four, "Mbit/s", 0));
            println!("  run {run}: 1 stream  {}", show(&one, "Mbit/s", 0));
        }
        if ping_on {
            println!("  run {run}: ping      {}", show(&ping, "ms", 3));
        }
    }
    let med = |v: &[Vec<f64>; 5], way: Way| median(v[way.index()].clone());
    // The median of the runs' ratios of `way` to `base`.
    let ratio = |v: &[Vec<f64>; 5], way: Way, base: Way| {
        let (w, b) = (&v[way.index()], &v[base.index()]);
        median(w.iter().zip(b).map(|(w, b)| w / b).collect())
    };
    if iperf_on {
        print_throughput(&four, &one, &cpu, med, ratio);
    }
    if ping_on {
        for way in WAYS {
            println!("BENCH {}_ping_ms {:.3} ms", way.metric(), med(&ping, way));
        }
        println!(
            "BENCH tun_ping_vs_wireguard_go_ratio {:.2} x",
            ratio(&ping, Way::Weft, Way::WireguardGo)
        );
        println!(
            "BENCH tun_ping_vs_boringtun_ratio {:.2} x",
            ratio(&ping, Way::Weft, Way::Boringtun)
        );
    }
    if let Some(dir) = std::env::var_os("WEFT_BENCH_PERF") {
        profile(&pair, &paths, Path::new(&dir), seconds).await?;
    }
    let [a, b] = &mut paths.weft;
    let [a2, b2] = &mut paths.weft_dc;
    for peer in [a, b, a2, b2] {
        if !peer.terminate(WAIT).await?.success() {
            bail!("weft-peer did not exit cleanly: {:?}", peer.seen.last());
        }
    }
    paths.iperf.kill().await?;
    paths.iperf_dc.kill().await?;
    Ok(())
}

/// Whether `name` (`iperf` or `ping`) is measured: `WEFT_BENCH_PARTS` (comma-separated),
/// both when unset.
fn part(name: &str) -> Result<bool> {
    let Ok(list) = std::env::var("WEFT_BENCH_PARTS") else { return Ok(true) };
    for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if !["iperf", "ping"].contains(&p) {
            bail!("WEFT_BENCH_PARTS: no part {p:?} (iperf, ping)");
        }
    }
    Ok(list.split(',').any(|p| p.trim() == name))
}

/// The throughput figures and ratios (iperf3), and the CPU the tunnels used.
fn print_throughput(
    four: &[Vec<f64>; 5],
    one: &[Vec<f64>; 5],
    cpu: &[Vec<f64>; 5],
    med: impl Fn(&[Vec<f64>; 5], Way) -> f64,
    ratio: impl Fn(&[Vec<f64>; 5], Way, Way) -> f64,
) {
    for way in [Way::Weft, Way::WeftDataChannel, Way::WireguardGo, Way::Boringtun] {
        println!(
            "  {} CPU during the 4-stream runs: {:.0} % of one core (both hosts' processes)",
            way.metric(),
            median(cpu[way.index()].clone())
        );
    }
    for way in WAYS {
        println!("BENCH {}_mbit_s {:.0} Mbit/s", way.metric(), med(four, way));
    }
    for way in WAYS {
        println!("BENCH {}_1stream_mbit_s {:.0} Mbit/s", way.metric(), med(one, way));
    }
    println!(
        "BENCH tun_vs_datachannel_ratio {:.2} x",
        ratio(four, Way::Weft, Way::WeftDataChannel)
    );
    println!(
        "BENCH tun_vs_datachannel_1stream_ratio {:.2} x",
        ratio(one, Way::Weft, Way::WeftDataChannel)
    );
    for (base, name) in [(Way::WireguardGo, "wireguard_go"), (Way::Boringtun, "boringtun")] {
        println!("BENCH tun_vs_{name}_ratio {:.2} x", ratio(four, Way::Weft, base));
        println!("BENCH tun_vs_{name}_1stream_ratio {:.2} x", ratio(one, Way::Weft, base));
    }
}

/// CPU time (ms) the processes `pids` used so far (0 for a process that is gone).
fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|&pid| cpu_ms(pid).unwrap_or(0.0)).sum()
}

/// Sets up every way from `a` to `b`, and the iperf3 server on `b`, and checks that each
/// way answers a ping.
async fn set_up(pair: &VethPair, dc: &VethPair, scratch: &Path, boringtun: &Path) -> Result<Paths> {
    let server = SignalProcess::start(&pair.server, &[]).await?;
    let server_dc = SignalProcess::start(&dc.server, &[]).await?;
    let (weft_dc, weft_dc_b, _) = weft(dc, &server_dc.ws_url, "dc", &["--no-fast-path"]).await?;
    let (weft, weft_b, dirs) = weft(pair, &server.ws_url, "fast", &[]).await?;
    let weft_pids = weft.iter().filter_map(|p| p.child.id()).collect();
    let dc_pids = weft_dc.iter().filter_map(|p| p.child.id()).collect();
    let mut daemons = Vec::new();
    let mut pids: [Vec<u32>; 5] = [Vec::new(), weft_pids, Vec::new(), Vec::new(), dc_pids];
    let threads: u32 = env_or("WEFT_BENCH_BORINGTUN_THREADS", 1);
    for (kind, way) in [(WireGuard::Go, Way::WireguardGo), (WireGuard::Boringtun, Way::Boringtun)] {
        let started = wireguard(pair, kind, scratch, boringtun, threads).await?;
        pids[way.index()] = started.iter().filter_map(Child::id).collect();
        daemons.extend(started);
    }
    let wg_b = |kind: WireGuard| IpAddr::from([10, kind.net(), 0, 2]);
    let targets = [
        pair.b.ip,
        IpAddr::V4(weft_b),
        wg_b(WireGuard::Go),
        wg_b(WireGuard::Boringtun),
        IpAddr::V4(weft_dc_b),
    ];
    let iperf = iperf_server(&pair.b).await?;
    let iperf_dc = iperf_server(&dc.b).await?;
    for way in WAYS {
        // Reachable: a short ping through each (a first packet may wait for nothing, but
        // give each way a few).
        let target = targets[way.index()];
        let out = client(pair, dc, way)
            .tokio_command("ping")
            .args(["-n", "-q", "-c", "3", "-w", "30", &target.to_string()])
            .kill_on_drop(true)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "{} ({target}) does not answer ping: {}",
                way.metric(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
    }
    // The fast path carries Weft's IP packets once a probe was answered; the other one has
    // it off.
    for ((host, dir), name) in [&pair.a, &pair.b].into_iter().zip(&dirs).zip(["Ada", "Bea"]) {
        wait_fast_path(host, dir).await.with_context(|| format!("{name}'s peer"))?;
    }
    Ok(Paths {
        targets,
        pids,
        weft,
        weft_dc,
        _server: server,
        _server_dc: server_dc,
        _daemons: daemons,
        iperf,
        iperf_dc,
    })
}

/// Waits until the `up` with config dir `dir` on `host` says the fast UDP path to its one
/// peer is up.
async fn wait_fast_path(host: &Host, dir: &Path) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let out = host
            .tokio_command(weft_peer_bin()?)
            .arg("--config-dir")
            .arg(dir)
            .args(["--json", "status"])
            .output()
            .await?;
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if status["peers"][0]["fast_path"] == "up" {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the fast UDP path did not come up: {status}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `weft-peer up --tun ARGS` on `a` and `b` (config dirs named with `tag`), connected over
/// the veth; `b`'s overlay IPv4, and their config dirs.
async fn weft(
    pair: &VethPair,
    ws: &str,
    tag: &str,
    args: &[&str],
) -> Result<([NativePeer; 2], std::net::Ipv4Addr, Vec<PathBuf>)> {
    let out = std::process::Command::new(weft_peer_bin()?).arg("invite").output()?;
    if !out.status.success() {
        bail!("weft-peer invite failed: {out:?}");
    }
    let invite = String::from_utf8(out.stdout)?.trim().to_string();
    let mut peers = Vec::new();
    let mut addrs = Vec::new();
    let mut dirs = Vec::new();
    for (host, name) in [(&pair.a, "Ada"), (&pair.b, "Bea")] {
        let dir = config_dir(&format!("bench-tun-{tag}-{name}"))?;
        let mut up = command_on(host, ws, &dir)?;
        dirs.push(dir);
        up.args(["--invite", &invite, "--name", name, "up", "--tun"]).args(args);
        up.env("RUST_LOG", "error");
        let mut peer = NativePeer::spawn(up)?;
        let tun = peer.expect_event("tun", WAIT).await?;
        let ipv4 = tun["ipv4"].as_str().and_then(|a| a.split_once('/')).map(|(a, _)| a);
        addrs.push(ipv4.context("no IPv4 address on the TUN device")?.parse()?);
        peers.push(peer);
    }
    for (peer, other) in peers.iter_mut().zip(["Bea", "Ada"]) {
        let connected = peer
            .expect("a session", WAIT, |v| {
                v["event"] == "peer_connected" && v["name"] == other && v["ipv4"].is_string()
            })
            .await?;
        if connected["path"] != "direct" {
            bail!("Weft's peers connected through {}, not directly", connected["path"]);
        }
    }
    let [a, b]: [NativePeer; 2] = peers.try_into().map_err(|_| anyhow::anyhow!("two peers"))?;
    Ok(([a, b], addrs[1], dirs))
}

/// A key pair from `wg genkey | wg pubkey`: (private, public), base64.
async fn wg_keys() -> Result<(String, String)> {
    let out = Command::new("wg").arg("genkey").output().await?;
    let private = String::from_utf8(out.stdout)?.trim().to_string();
    let mut pubkey =
        Command::new("wg").arg("pubkey").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    pubkey.stdin.take().context("no stdin")?.write_all(private.as_bytes()).await?;
    let out = pubkey.wait_with_output().await?;
    if !out.status.success() || private.is_empty() {
        bail!("wg genkey/pubkey failed");
    }
    Ok((private, String::from_utf8(out.stdout)?.trim().to_string()))
}

/// Starts `kind` on both hosts and configures it with `wg`: `10.<net>.0.1` on `a` and
/// `.2` on `b`, each the other's only peer at its veth address.
async fn wireguard(
    pair: &VethPair,
    kind: WireGuard,
    scratch: &Path,
    boringtun: &Path,
    threads: u32,
) -> Result<Vec<Child>> {
    let dev = kind.device();
    let keys = [wg_keys().await?, wg_keys().await?];
    let hosts = [&pair.a, &pair.b];
    let mut children = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let log_path = scratch.join(format!("{dev}-{i}.log"));
        let log = std::fs::File::create(&log_path)?;
        // A private /run/wireguard: the control socket's path is the same on every host.
        let mut cmd = host.tokio_command("unshare");
        cmd.args(["-m", "sh", "-c"])
            .arg("mkdir -p /run/wireguard && mount -t tmpfs tmpfs /run/wireguard && exec \"$@\"")
            .arg("sh");
        match kind {
            WireGuard::Go => {
                cmd.args(["wireguard-go", dev]).env("WG_PROCESS_FOREGROUND", "1");
            }
            WireGuard::Boringtun => {
                cmd.arg(boringtun)
                    .args(["--foreground", "--disable-drop-privileges", "--threads"])
                    .arg(threads.to_string())
                    .arg(dev);
            }
        }
        cmd.stdout(log.try_clone()?).stderr(log).kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let pid = child.id().context("the WireGuard daemon exited at once")?;
        let key_path = scratch.join(format!("{dev}-{i}.key"));
        std::fs::write(&key_path, &keys[i].0)?;
        let peer = 1 - i;
        let mut set = Command::new("nsenter");
        set.args(["-t", &pid.to_string(), "-m", "-n", "wg", "set", dev, "listen-port"])
            .arg(kind.port().to_string())
            .arg("private-key")
            .arg(&key_path)
            .args(["peer", &keys[peer].1, "allowed-ips"])
            .arg(format!("10.{}.0.{}/32", kind.net(), peer + 1))
            .arg("endpoint")
            .arg(format!("{}:{}", hosts[peer].ip, kind.port()));
        // The daemon makes its control socket once its device is up: try until it answers.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("{dev} on {} exited ({status}): {log}", host.netns);
            }
            let out = set.output().await?;
            if out.status.success() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("wg set {dev} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ip = |args: &[&str]| {
            let mut cmd = host.command("ip");
            cmd.args(args);
            cmd
        };
        let addr = format!("10.{}.0.{}/24", kind.net(), i + 1);
        for mut cmd in [
            ip(&["addr", "add", &addr, "dev", dev]),
            ip(&["link", "set", dev, "mtu", &WG_MTU.to_string(), "up"]),
        ] {
            let out = cmd.output()?;
            if !out.status.success() {
                bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        children.push(child);
    }
    Ok(children)
}

/// `iperf3 -s` on `host`, once it listens.
async fn iperf_server(host: &Host) -> Result<Child> {
    let mut child = host
        .tokio_command("iperf3")
        .args(["-s", "--forceflush"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let listening = async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("Server listening") {
                return Ok(());
            }
        }
        bail!("iperf3 -s exited")
    };
    tokio::time::timeout(WAIT, listening).await.context("iperf3 -s did not start")??;
    // Keep reading its output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}

/// `iperf3` TCP from `from` to `target` with `streams` parallel streams for `seconds`
/// (after one not counted): the rate received, in Mbit/s.
async fn iperf(from: &Host, target: IpAddr, streams: u32, seconds: u64) -> Result<f64> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let report = loop {
        let mut cmd = from.tokio_command("iperf3");
        cmd.args(["-c", &target.to_string(), "-J", "-O", "1", "-t", &seconds.to_string()])
            .args(["-P", &streams.to_string()])
            .kill_on_drop(true);
        let out = tokio::time::timeout(WAIT + Duration::from_secs(seconds), cmd.output())
            .await
            .with_context(|| format!("iperf3 to {target} did not finish"))??;
        let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!("iperf3 to {target}: {}", String::from_utf8_lossy(&out.stderr))
        })?;
        let Some(error) = report["error"].as_str() else { break report };
        // The server closes its listening socket after a test and opens a new one: a test
        // that comes in between is refused (or finds it busy). Try again.
        let between = error.contains("Connection refused") || error.contains("busy");
        if !between || tokio::time::Instant::now() > deadline {
            bail!("iperf3 to {target}: {error}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 to {target}: no received rate"))?;
    Ok(bits / 1e6)
}

/// [`ECHOES`] ICMP echoes from `from` to `target`: the median round trip in ms.
async fn ping_ms(from: &Host, target: IpAddr) -> Result<f64> {
    let mut cmd = from.tokio_command("ping");
    cmd.args(["-n", "-c", &ECHOES.to_string(), "-i", ECHO_INTERVAL, "-W", "2"])
        .arg(target.to_string())
        .kill_on_drop(true);
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .with_context(|| format!("ping {target} did not finish"))??;
    let text = String::from_utf8_lossy(&out.stdout);
    let times: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split_once("time=")?.1.split_whitespace().next()?.parse().ok())
        .collect();
    if times.len() < ECHOES as usize / 2 {
        bail!("ping {target}: only {} of {ECHOES} echoes answered: {text}", times.len());
    }
    Ok(median(times))
}

/// The system calls `profile` counts (`perf stat`), by name.
const SYSCALLS: [&str; 10] = [
    "read",
    "write",
    "readv",
    "writev",
    "sendmsg",
    "sendmmsg",
    "recvmsg",
    "recvmmsg",
    "epoll_wait",
    "futex",
];

/// One of `host`'s TUN device counters (`/sys/class/net/weft0/statistics/NAME`).
fn tun_counter(host: &Host, name: &str) -> Result<u64> {
    let out =
        host.command("cat").arg(format!("/sys/class/net/weft0/statistics/{name}")).output()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().with_context(|| format!("no {name}"))
}

/// One more 4-stream run through Weft with `perf record` on each `weft-peer`, and `perf
/// stat` counting its system calls and context switches: per 1280 bytes that crossed its
/// TUN device (a full-size packet's worth; the sender reads them, the receiver writes them).
async fn profile(pair: &VethPair, paths: &Paths, dir: &Path, seconds: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let mut perfs = Vec::new();
    let events: Vec<String> = SYSCALLS
        .iter()
        .map(|s| format!("syscalls:sys_enter_{s}"))
        .chain(["context-switches".to_string()])
        .collect();
    for (pid, side) in paths.pids[Way::Weft.index()].iter().zip(["a", "b"]) {
        let pid = pid.to_string();
        let record = Command::new("perf")
            .args(["record", "-F", "499", "--call-graph", "dwarf", "-p", &pid, "-o"])
            .arg(dir.join(format!("perf-{side}.data")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start perf")?;
        let stat = Command::new("perf")
            .args(["stat", "-x", ",", "-e", &events.join(","), "-p", &pid, "-o"])
            .arg(dir.join(format!("stat-{side}.txt")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start perf")?;
        perfs.extend([record, stat]);
    }
    // perf attaches within a moment; the first second of the run is not counted anyway.
    let sent = tun_counter(&pair.a, "tx_bytes")?;
    let received = tun_counter(&pair.b, "rx_bytes")?;
    let rate = iperf(&pair.a, paths.targets[Way::Weft.index()], 4, seconds).await?;
    let sent = tun_counter(&pair.a, "tx_bytes")? - sent;
    let received = tun_counter(&pair.b, "rx_bytes")? - received;
    for perf in &mut perfs {
        if let Some(pid) = perf.id() {
            std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status()?;
        }
        tokio::time::timeout(WAIT, perf.wait()).await??;
    }
    println!(
        "  profiled a 4-stream run through Weft ({rate:.0} Mbit/s under perf): {}/perf-{{a,b}}.data",
        dir.display()
    );
    for (side, bytes, what) in [("a", sent, "sender"), ("b", received, "receiver")] {
        let stat = std::fs::read_to_string(dir.join(format!("stat-{side}.txt")))?;
        let packets = (bytes as f64 / 1280.0).max(1.0);
        let mut per_packet = Vec::new();
        for line in stat.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let fields: Vec<&str> = line.split(',').collect();
            let (Some(count), Some(event)) = (fields.first(), fields.get(2)) else { continue };
            let Ok(count) = count.parse::<f64>() else { continue };
            let name = event.trim_start_matches("syscalls:sys_enter_");
            if count > 0.0 {
                per_packet.push(format!("{name} {:.2}", count / packets));
            }
        }
        println!(
            "  {what} ({:.0} full-size packets' worth through its TUN), per packet: {}",
            packets,
            per_packet.join(", ")
        );
    }
    Ok(())
}
