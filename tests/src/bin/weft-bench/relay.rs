//! `cargo xtask bench relay`: Weft across real NATs (network namespaces with nftables, see
//! `weft_tests::netns`), `weft-signal` with its embedded STUN/TURN server on the public
//! host, release builds of `weft-peer` on hosts behind the routers. Needs root (skipped,
//! saying why, without it). One run:
//!
//! - `nat_matrix_connected`: native peers on every pair of network kinds (routed, behind an
//!   endpoint-independent NAT, behind a symmetric NAT; two sites of each kind, so two
//!   peers of one kind sit behind different routers) join and connect; how many of the six
//!   combinations do, each with the path it took (printed).
//! - `relay_connect_ms` and `direct_connect_ms`: from starting `weft-peer msg` (a process
//!   that joins, connects, runs the handshake and sends) to the message arriving at a peer
//!   that waits with `up`, behind symmetric NATs (only the relay works) and behind
//!   endpoint-independent ones (direct), alternating; medians. `relay_vs_direct_connect_ratio`
//!   is their ratio (target ≤ 1.5).
//! - `relay_mb_s` and `direct_mb_s`: a file `send` → `receive`, timed at the receiver from
//!   `accepted` to `saved` as `bench native` does, through the relay (symmetric NATs) and
//!   direct (endpoint-independent NATs), alternating, with every site's access link limited
//!   to 100 Mbit/s each way (a token bucket; the server's link is not limited): what a user
//!   on a good home or mobile link sees. `relay_vs_direct_ratio` is the median of the
//!   paired runs' ratios (target ≥ 0.8).
//! - The same without limits as `*_cpu_bound_*`: then both peers, the relay and every
//!   router of the simulated internet share this machine's two cores, and the relayed path
//!   costs more CPU (its packets cross the namespaces' routers twice and pass through one
//!   more process), so the ratio says how much more, not what a user would see. Where that
//!   CPU goes (`perf` on weft-signal during a relayed run): the kernel, mostly (forwarding
//!   through the namespaces' veths, bridges and nftables, charged to the sending process,
//!   and a wake-up per datagram); the `turn` crate's own code under 5 %.
//!
//! `relay_server_cpu_ms_per_mb`: CPU time of the `weft-signal` process (signaling and
//! relay) per MB of file relayed, over the relayed runs.
//!
//! - `relay_over_tcp_mb_s` and `relay_over_udp_mb_s`: the same file on 100 Mbit/s access
//!   links, relayed either way, alternating: from a site whose router drops all UDP (the
//!   sender reaches the relay over TURN over TCP) and from a symmetric NAT (TURN over UDP),
//!   to the same receiver behind a symmetric NAT. `relay_over_tcp_vs_udp_ratio` is the
//!   median of the paired runs' ratios.
//!
//! `WEFT_BENCH_PARTS=throughput` runs only the throughput parts, `=tcp` only the last,
//! `=connect` only the connect times, `=matrix` the matrix and the connect times. `WEFT_BENCH_RUNS` (default 5) sets the number of alternating runs, `WEFT_BENCH_MB`
//! (default 64) the file's size in MiB. Prints `BENCH <metric> <value> <unit>` lines.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weft_tests::files::{Scratch, TestFile, blake3_of, generate, mib};
use weft_tests::native::{NativePeer, SignalProcess, command_on, config_dir, weft_peer_bin};
use weft_tests::netns::{Host, Nat, Outbound, SiteSpec, Topology, netns_missing};

use crate::{cpu_ms, median};

const RUNS: usize = 5;
/// The access links' speed in the link-bound part: a good home or 5G uplink.
const ACCESS_MBIT: u32 = 100;
const LONG: Duration = Duration::from_secs(600);
const WAIT: Duration = Duration::from_secs(60);

fn runs() -> usize {
    crate::bench_runs(RUNS)
}

fn file_size() -> u64 {
    mib(std::env::var("WEFT_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(64))
}

/// Datagrams the kernel of `host`'s namespace dropped for want of receive buffer space
/// (`RcvbufErrors` of `/proc/net/snmp`), so far.
fn udp_drops(host: &Host) -> Result<u64> {
    let out = host.command("cat").arg("/proc/net/snmp").output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) =
        (udp.next().context("no Udp line")?, udp.next().context("no Udp values")?);
    let at =
        names.split_whitespace().position(|n| n == "RcvbufErrors").context("no RcvbufErrors")?;
    values.split_whitespace().nth(at).and_then(|v| v.parse().ok()).context("bad RcvbufErrors")
}

/// The kinds of network in the matrix, two sites of each: sites `2k` and `2k + 1`.
const KINDS: [(Nat, &str); 3] = [
    (Nat::None, "routed"),
    (Nat::EndpointIndependent, "endpoint-independent NAT"),
    (Nat::Symmetric, "symmetric NAT"),
];

/// The site after the matrix's: its router lets no UDP out.
const NO_UDP_SITE: usize = 2 * KINDS.len();

/// Site indices of the two sites of kind `k`.
fn sites_of(k: usize) -> (usize, usize) {
    (2 * k, 2 * k + 1)
}

/// A fresh invite for each pairing, so pairs never meet each other.
fn invite(label: &str) -> String {
    let mut s: String = label.chars().filter(char::is_ascii_alphanumeric).collect();
    s.push_str(&"Q".repeat(43));
    s.truncate(43);
    s
}

/// `weft-peer up` on `host` in the network of `invite`, named `name`.
fn up(host: &Host, ws: &str, dir: &Path, invite: &str, name: &str) -> Result<NativePeer> {
    let mut cmd = command_on(host, ws, dir)?;
    cmd.args(["--invite", invite, "--name", name, "up"]);
    NativePeer::spawn(cmd)
}

/// Two peers on `a` and `b` join and connect: the path (`direct`/`relayed`), or why not.
async fn connect_pair(a: &Host, b: &Host, ws: &str, label: &str) -> Result<String> {
    let invite = invite(label);
    let (dir_a, dir_b) = (config_dir("matrix-a")?, config_dir("matrix-b")?);
    let mut ada = up(a, ws, &dir_a, &invite, "Ada")?;
    let mut bea = up(b, ws, &dir_b, &invite, "Bea")?;
    let seen = ada
        .expect("a session with Bea", WAIT, |v| {
            v["event"] == "peer_connected" || v["event"] == "peer_failed"
        })
        .await;
    let _ = tokio::join!(ada.terminate(WAIT), bea.terminate(WAIT));
    for dir in [dir_a, dir_b] {
        let _ = std::fs::remove_dir_all(dir);
    }
    let seen = seen?;
    match seen["path"].as_str() {
        Some(path) if seen["event"] == "peer_connected" => Ok(path.to_string()),
        _ => bail!("no session: {seen}"),
    }
}

/// From starting `msg` on `from` to the message arriving at `up` on `to`.
async fn connect_time(from: &Host, to: &Host, ws: &str, label: &str) -> Result<Duration> {
    let invite = invite(label);
    let (dir_a, dir_b) = (config_dir("connect-a")?, config_dir("connect-b")?);
    let mut bea = up(to, ws, &dir_b, &invite, "Bea")?;
    bea.expect_event("joined", WAIT).await?;
    let mut msg = command_on(from, ws, &dir_a)?;
    msg.args(["--invite", &invite, "--name", "Ada", "msg", "Bea", "first message"]);
    let start = Instant::now();
    let mut ada = NativePeer::spawn(msg)?;
    bea.expect("the message", WAIT, |v| v["event"] == "message").await?;
    let took = start.elapsed();
    if !ada.wait_exit(WAIT).await?.success() {
        bail!("msg failed: {:?}", ada.seen);
    }
    bea.terminate(WAIT).await?;
    for dir in [dir_a, dir_b] {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(took)
}

/// A transfer from `from` to `to`: the receiver's time from `accepted` to `saved`, and the
/// path it took.
async fn transfer(
    from: &Host,
    to: &Host,
    ws: &str,
    file: &TestFile,
    scratch: &Path,
    label: &str,
) -> Result<(Duration, String)> {
    let invite = invite(label);
    let downloads = scratch.join(format!("in-{label}"));
    let (dir_a, dir_b) = (config_dir("relay-ada")?, config_dir("relay-bea")?);
    let mut receive = command_on(to, ws, &dir_b)?;
    receive.args(["--invite", &invite, "--name", "Bea", "receive", "--once"]);
    receive.args(["--accept-from", "Ada", "--dir"]).arg(&downloads);
    let mut bea = NativePeer::spawn(receive)?;
    bea.expect_event("receiving", WAIT).await?;
    let mut send = command_on(from, ws, &dir_a)?;
    send.args(["--invite", &invite, "--name", "Ada", "send", "--to", "Bea"]).arg(&file.path);
    let mut ada = NativePeer::spawn(send)?;
    let timed = async {
        bea.expect_event("accepted", LONG).await?;
        let start = Instant::now();
        bea.expect_event("saved", LONG).await?;
        anyhow::Ok(start.elapsed())
    };
    let (took, sent) = tokio::join!(timed, ada.wait_exit(LONG));
    let took = took?;
    if !sent?.success() {
        bail!("send failed: {:?}", ada.seen);
    }
    bea.wait_exit(WAIT).await?;
    if blake3_of(&downloads.join(&file.name))? != file.root {
        bail!("the received file differs from the sent one");
    }
    let path = bea
        .seen
        .iter()
        .rev()
        .find(|v| v["event"] == "peer_connected" || v["event"] == "path_changed")
        .and_then(|v| v["path"].as_str())
        .unwrap_or("unknown")
        .to_string();
    let dropped = bea.seen.iter().filter(|v| v["event"] == "source_dropped").count();
    if dropped > 0 {
        println!("  ({label}: the receiver dropped its source {dropped} time(s))");
    }
    let _ = std::fs::remove_dir_all(&downloads);
    for dir in [dir_a, dir_b] {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok((took, path))
}

/// Which NAT pairs connect (unless not `matrix`), and the time to a first message, direct
/// and relayed.
async fn matrix_and_connect(topology: &Topology, ws: &str, matrix: bool) -> Result<()> {
    if matrix {
        nat_matrix(topology, ws).await;
    }
    connect_times(topology, ws).await
}

/// How many of the pairings of [`KINDS`] connect, and on which path.
async fn nat_matrix(topology: &Topology, ws: &str) {
    let host = |site: usize| topology.host(site, 0);
    // The matrix: every unordered pair of kinds.
    let mut connected = 0;
    let mut combos = 0;
    for (i, (_, kind_a)) in KINDS.iter().enumerate() {
        for (j, (_, kind_b)) in KINDS.iter().enumerate().skip(i) {
            combos += 1;
            let (a, b) = (sites_of(i).0, sites_of(j).1);
            let label = format!("m{i}{j}");
            let what = format!("{kind_a} ↔ {kind_b}");
            match connect_pair(host(a), host(b), ws, &label).await {
                Ok(path) => {
                    connected += 1;
                    println!("  {what}: {path}");
                }
                Err(e) => println!("  {what}: NOT CONNECTED: {e:#}"),
            }
        }
    }
    println!("BENCH nat_matrix_connected {connected} of_{combos}");
}

/// From starting `msg` to its arrival, direct and relayed, alternating: the medians and
/// their ratio.
async fn connect_times(topology: &Topology, ws: &str) -> Result<()> {
    let host = |site: usize| topology.host(site, 0);
    let (eim, sym) = (sites_of(1), sites_of(2));
    let mut direct_ms = Vec::new();
    let mut relay_ms = Vec::new();
    for run in 0..runs() {
        let d = connect_time(host(eim.0), host(eim.1), ws, &format!("cd{run}")).await?;
        let r = connect_time(host(sym.0), host(sym.1), ws, &format!("cr{run}")).await?;
        println!("  run {run}: first message direct {d:.0?}, relayed {r:.0?}");
        direct_ms.push(d.as_secs_f64() * 1e3);
        relay_ms.push(r.as_secs_f64() * 1e3);
    }
    let (direct_connect, relay_connect) = (median(direct_ms), median(relay_ms));
    println!("BENCH direct_connect_ms {direct_connect:.0} ms");
    println!("BENCH relay_connect_ms {relay_connect:.0} ms");
    println!("BENCH relay_vs_direct_connect_ratio {:.2} x", relay_connect / direct_connect);

    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
pub async fn main() -> Result<()> {
    if let Some(why) = netns_missing() {
        println!("  skipped: {why}");
        return Ok(());
    }
    println!("  weft-peer: {}", weft_peer_bin()?.display());
    let no_udp = SiteSpec { nat: Nat::EndpointIndependent, outbound: Outbound::NoUdp, hosts: 1 };
    let sites: Vec<SiteSpec> =
        KINDS.iter().flat_map(|(nat, _)| [SiteSpec::behind(*nat); 2]).chain([no_udp]).collect();
    let topology = Topology::new(&sites)?;
    let server = SignalProcess::start(topology.server(), &[]).await?;
    let ws = server.ws_url.clone();
    let host = |site: usize| topology.host(site, 0);

    let parts = std::env::var("WEFT_BENCH_PARTS").unwrap_or_default();
    if parts != "throughput" && parts != "tcp" {
        matrix_and_connect(&topology, &ws, parts != "connect").await?;
    }
    if parts == "connect" || parts == "matrix" {
        return Ok(());
    }
    let server_pid = server.child.id().context("weft-signal exited")?;
    let (eim, sym) = (sites_of(1), sites_of(2));
    let scratch = Scratch::new("bench-relay")?;
    let size = file_size();
    let file = generate(scratch.path(), "relay.bin", size, 7)?;
    if parts == "tcp" {
        return relay_over_tcp(&topology, &ws, &file, scratch.path()).await;
    }
    println!("  access links unlimited (everything shares this machine's cores):");
    let (direct, relay, ratio, server_cpu) =
        throughput(&topology, &ws, &file, scratch.path(), server_pid, "cpu").await?;
    println!("BENCH direct_cpu_bound_mb_s {direct:.1} MB/s");
    println!("BENCH relay_cpu_bound_mb_s {relay:.1} MB/s");
    println!("BENCH relay_vs_direct_cpu_bound_ratio {ratio:.2} x");
    let relayed_mb = (size * runs() as u64) as f64 / 1e6;
    let drops = |h: &Host| udp_drops(h).map_or("?".to_string(), |n| n.to_string());
    println!(
        "  UDP receive-buffer drops: server {}, relayed sender {}, relayed receiver {}, direct \
         sender {}, direct receiver {}",
        drops(topology.server()),
        drops(host(sym.0)),
        drops(host(sym.1)),
        drops(host(eim.0)),
        drops(host(eim.1)),
    );
    println!("BENCH relay_server_cpu_ms_per_mb {:.1} ms/MB", server_cpu / relayed_mb);
    topology.limit_sites(Some(ACCESS_MBIT))?;
    println!("  access links limited to {ACCESS_MBIT} Mbit/s each way:");
    let (direct, relay, ratio, _) =
        throughput(&topology, &ws, &file, scratch.path(), server_pid, "link").await?;
    topology.limit_sites(None)?;
    println!("BENCH direct_mb_s {direct:.1} MB/s");
    println!("BENCH relay_mb_s {relay:.1} MB/s");
    println!("BENCH relay_vs_direct_ratio {ratio:.2} x");
    relay_over_tcp(&topology, &ws, &file, scratch.path()).await
}

/// Alternating transfers of `file` to a receiver behind a symmetric NAT, on 100 Mbit/s
/// access links, from a sender that reaches the relay over TURN over UDP (behind a
/// symmetric NAT) and from one that reaches it over TURN over TCP (its site drops UDP).
async fn relay_over_tcp(
    topology: &Topology,
    ws: &str,
    file: &TestFile,
    scratch: &Path,
) -> Result<()> {
    let host = |site: usize| topology.host(site, 0);
    let sym = sites_of(2);
    let mb_s = |took: Duration| file.size as f64 / took.as_secs_f64() / 1e6;
    topology.limit_sites(Some(ACCESS_MBIT))?;
    println!("  relayed over TURN/UDP and TURN/TCP, access links limited to {ACCESS_MBIT} Mbit/s:");
    let (mut udp, mut tcp, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs() {
        let (u, u_path) =
            transfer(host(sym.0), host(sym.1), ws, file, scratch, &format!("tu{run}"))
                .await
                .with_context(|| format!("run {run}, relayed over TURN/UDP"))?;
        let (t, t_path) =
            transfer(host(NO_UDP_SITE), host(sym.1), ws, file, scratch, &format!("tt{run}"))
                .await
                .with_context(|| format!("run {run}, relayed over TURN/TCP"))?;
        if u_path != "relayed" || t_path != "relayed" {
            bail!("run {run}: the paths were {u_path} and {t_path}, not relayed");
        }
        println!("  run {run}: over UDP {:.1} MB/s, over TCP {:.1} MB/s", mb_s(u), mb_s(t));
        udp.push(mb_s(u));
        tcp.push(mb_s(t));
        ratios.push(mb_s(t) / mb_s(u));
    }
    topology.limit_sites(None)?;
    println!("BENCH relay_over_udp_mb_s {:.1} MB/s", median(udp));
    println!("BENCH relay_over_tcp_mb_s {:.1} MB/s", median(tcp));
    println!("BENCH relay_over_tcp_vs_udp_ratio {:.2} x", median(ratios));
    if topology.stray_packets().context("counting stray packets")? != 0 {
        bail!("packets left the topology");
    }
    Ok(())
}

/// Alternating direct (endpoint-independent NATs) and relayed (symmetric NATs) transfers of
/// `file`: the medians of direct and relayed MB/s, the median of the paired ratios, and the
/// relay server's CPU time over the relayed runs (ms).
async fn throughput(
    topology: &Topology,
    ws: &str,
    file: &TestFile,
    scratch: &Path,
    server_pid: u32,
    label: &str,
) -> Result<(f64, f64, f64, f64)> {
    let host = |site: usize| topology.host(site, 0);
    let (eim, sym) = (sites_of(1), sites_of(2));
    let mb_s = |took: Duration| file.size as f64 / took.as_secs_f64() / 1e6;
    let (mut direct, mut relay, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut server_cpu = 0.0;
    for run in 0..runs() {
        let (d, d_path) =
            transfer(host(eim.0), host(eim.1), ws, file, scratch, &format!("{label}d{run}"))
                .await?;
        let cpu_before = cpu_ms(server_pid)?;
        let (r, r_path) =
            transfer(host(sym.0), host(sym.1), ws, file, scratch, &format!("{label}r{run}"))
                .await?;
        server_cpu += cpu_ms(server_pid)? - cpu_before;
        if d_path != "direct" || r_path != "relayed" {
            bail!("run {run}: the paths were {d_path} and {r_path}, not direct and relayed");
        }
        println!("  run {run}: direct {:.1} MB/s, relayed {:.1} MB/s", mb_s(d), mb_s(r));
        direct.push(mb_s(d));
        relay.push(mb_s(r));
        ratios.push(mb_s(r) / mb_s(d));
    }
    Ok((median(direct), median(relay), median(ratios), server_cpu))
}
