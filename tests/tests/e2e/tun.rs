//! IP over the overlay through real TUN devices (`weft-peer up --tun`), in network
//! namespaces (see `weft_tests::netns`): `weft-signal` on the public host, one peer on a
//! host behind each of two endpoint-independent NATs. The peers' devices get their overlay
//! addresses from the node; programs on the hosts then reach each other by overlay IPv4
//! and IPv6 (`weft-peer ping`, and a TCP copy with a checksum through `weft-netprobe`,
//! both ways), a packet with a source address its peer does not hold is dropped by
//! the receiver (cryptokey routing) and counted in `status`, a restarted peer is reached
//! again, an address the node moves (a collision) moves on the device, IP packets keep
//! flowing while the ICE pair changes and the fast path follows it, the device goes
//! when the peer exits, and without root `up --tun` says so. A browser in the same network
//! shows in `status` with its addresses, and packets to it get ICMP unreachable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use weft_core::identity::IdentityKeyPair;
use weft_core::network::Network;
use weft_core::node::ipv4_candidate;
use weft_tests::native::{NativePeer, SignalProcess, command_on, config_dir, weft_peer_bin};
use weft_tests::netns::{Host, Nat, SiteSpec, Topology, netns_available};
use weft_tests::{ChromeDriver, chromium_available, wait_peer};

/// One step on a busy machine.
pub(crate) const WAIT: Duration = Duration::from_secs(60);
/// Bytes copied over TCP each way.
pub(crate) const COPY_BYTES: u64 = 3 * 1024 * 1024 + 7;
/// ICMP data in a full-size echo request: a 1280-byte IPv4 packet (the device's MTU).
const FULL_V4: usize = 1280 - 20 - 8;
/// The same for IPv6.
const FULL_V6: usize = 1280 - 40 - 8;

const NAMES: [&str; 2] = ["Ada", "Bea"];

/// A peer running `up --tun` on a host, and its overlay addresses.
pub(crate) struct TunPeer {
    pub(crate) peer: NativePeer,
    pub(crate) host: Host,
    pub(crate) dir: PathBuf,
    pub(crate) ipv4: String,
    pub(crate) ipv6: String,
}

/// A new network's invite.
pub(crate) fn invite() -> String {
    let out = std::process::Command::new(weft_peer_bin().unwrap()).arg("invite").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Starts `up --tun` as `name` on `host`; waits for its device's addresses.
async fn start(
    host: &Host,
    server: &SignalProcess,
    invite: &str,
    name: &str,
    dir: PathBuf,
) -> TunPeer {
    start_with(host, server, invite, name, dir, &[]).await
}

/// [`start`] with more options of `up`.
pub(crate) async fn start_with(
    host: &Host,
    server: &SignalProcess,
    invite: &str,
    name: &str,
    dir: PathBuf,
    extra: &[&str],
) -> TunPeer {
    start_with_env(host, server, invite, name, dir, extra, &[]).await
}

/// [`start_with`], with these environment variables for `weft-peer` (and `ip`, which
/// starts it in the namespace).
pub(crate) async fn start_with_env(
    host: &Host,
    server: &SignalProcess,
    invite: &str,
    name: &str,
    dir: PathBuf,
    extra: &[&str],
    env: &[(&str, &str)],
) -> TunPeer {
    let mut up = command_on(host, &server.ws_url, &dir).unwrap();
    up.args(["--invite", invite, "--name", name, "up", "--tun"]).args(extra);
    up.envs(env.iter().copied());
    let mut peer = NativePeer::spawn(up).unwrap();
    let tun = peer.expect_event("tun", WAIT).await.unwrap();
    assert_eq!(tun["device"], "weft0", "{tun}");
    assert_eq!(tun["mtu"], 1280, "{tun}");
    let addr = |key: &str| {
        let (addr, len) = tun[key].as_str().unwrap().split_once('/').unwrap();
        assert_eq!(len, if key == "ipv4" { "10" } else { "48" }, "{tun}");
        addr.to_string()
    };
    let (ipv4, ipv6) = (addr("ipv4"), addr("ipv6"));
    TunPeer { peer, host: host.clone(), dir, ipv4, ipv6 }
}

/// Waits until `peer` has a session with `other` that carries `other`'s addresses.
pub(crate) async fn connected(peer: &mut TunPeer, other: &TunPeer, other_name: &str) {
    let (v4, v6) = (other.ipv4.clone(), other.ipv6.clone());
    peer.peer
        .expect("a session with overlay addresses", WAIT, |v| {
            v["event"] == "peer_connected"
                && v["name"] == other_name
                && v["ipv4"] == v4.as_str()
                && v["ipv6"] == v6.as_str()
        })
        .await
        .unwrap();
}

/// What a test of two peers has: the namespaces, the server, the network's invite, and
/// Ada and Bea, each on a host behind an endpoint-independent NAT, connected.
struct Net {
    // Dropped in this order: the server's process before its namespace.
    server: SignalProcess,
    topology: Topology,
    invite: String,
}

/// [`Net`] for `test`; `None` (after saying why) where namespaces cannot be made.
async fn two_peers(test: &str) -> Option<(Net, [TunPeer; 2])> {
    if !netns_available(test) {
        return None;
    }
    let topology = Topology::new(&[SiteSpec::behind(Nat::EndpointIndependent); 2]).unwrap();
    let server = SignalProcess::start(topology.server(), &[]).await.unwrap();
    let invite = invite();
    let peers = pair(&topology, &server, &invite).await;
    Some((Net { server, topology, invite }, peers))
}

/// Ada and Bea connected.
async fn pair(topology: &Topology, server: &SignalProcess, invite: &str) -> [TunPeer; 2] {
    let mut ada =
        start(topology.host(0, 0), server, invite, NAMES[0], config_dir("tun-ada").unwrap()).await;
    let mut bea =
        start(topology.host(1, 0), server, invite, NAMES[1], config_dir("tun-bea").unwrap()).await;
    connected(&mut ada, &bea, NAMES[1]).await;
    connected(&mut bea, &ada, NAMES[0]).await;
    [ada, bea]
}

/// Runs `weft-netprobe ARGS` on `host`: whether it succeeded, and what it printed.
pub(crate) async fn probe(host: &Host, args: &[&str]) -> (bool, String) {
    let mut cmd = host.tokio_command(env!("CARGO_BIN_EXE_weft-netprobe"));
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(WAIT * 2, cmd.output()).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    (out.status.success(), format!("{text}{err}"))
}

/// Starts `weft-netprobe ARGS` on `host` (stdin piped: closing it ends some probes) and
/// waits for its "ready"; the process and the rest of its output.
pub(crate) async fn probe_ready(
    host: &Host,
    args: &[&str],
) -> (tokio::process::Child, Lines<BufReader<tokio::process::ChildStdout>>) {
    let mut child = host
        .tokio_command(env!("CARGO_BIN_EXE_weft-netprobe"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap();
    assert_eq!(ready.as_deref(), Some("ready"), "{args:?}");
    (child, lines)
}

/// `weft-peer ping TARGET -c COUNT -s SIZE` through `from`'s running `up` (TARGET: an
/// address, or a peer's name with `-6` or not in `extra`): how many of `count` were
/// answered.
pub(crate) async fn ping(
    from: &TunPeer,
    target: &str,
    count: u16,
    size: usize,
    extra: &[&str],
) -> u64 {
    let mut cmd = from.host.tokio_command(weft_peer_bin().unwrap());
    cmd.arg("--config-dir").arg(&from.dir).args(["--json", "ping", target]);
    cmd.args(["-c", &count.to_string(), "-s", &size.to_string()]).args(extra);
    let out = tokio::time::timeout(WAIT, cmd.output()).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let done: Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "ping_done")
        .unwrap_or_else(|| panic!("ping {target}: {out:?}"));
    let received = done["received"].as_u64().unwrap();
    assert_eq!(out.status.success(), received > 0, "{out:?}");
    received
}

/// Copies [`COPY_BYTES`] over TCP from `from` to `to`'s `addr` (checked end to end); the
/// rate in Mbit/s.
pub(crate) async fn tcp_copy(from: &Host, to: &Host, addr: &str) -> f64 {
    let listen = if addr.contains(':') { format!("[{addr}]:9000") } else { format!("{addr}:9000") };
    let (mut sink, mut lines) = probe_ready(to, &["tcp-sink", &listen]).await;
    let (ok, out) = probe(from, &["tcp-send", &listen, &COPY_BYTES.to_string()]).await;
    assert!(ok, "tcp-send to {listen}: {out}");
    let received = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().unwrap();
    let sent = out.lines().find_map(|l| l.strip_prefix("ok ")).unwrap();
    assert!(sent.starts_with(&received), "sent {sent}, the sink read {received}");
    sink.wait().await.unwrap();
    sent.rsplit(' ').next().unwrap().parse().unwrap()
}

/// `weft-peer status --json` on `peer`'s host and config dir: the running `up` answers.
pub(crate) async fn status(peer: &TunPeer) -> Value {
    let mut cmd = peer.host.tokio_command(weft_peer_bin().unwrap());
    cmd.arg("--config-dir").arg(&peer.dir).args(["--json", "status"]);
    let out = tokio::time::timeout(WAIT, cmd.output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{out:?}");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["running"], true, "{status}");
    status
}

/// Whether `host` has a network device `name`.
pub(crate) fn has_device(host: &Host, name: &str) -> bool {
    let out = host.command("ip").args(["link", "show", "dev", name]).output().unwrap();
    out.status.success()
}

/// Ends `peer` cleanly and removes its config dir; its device and control socket go.
pub(crate) async fn stop(mut peer: TunPeer) {
    assert!(peer.peer.terminate(WAIT).await.unwrap().success());
    assert!(!has_device(&peer.host, "weft0"), "the TUN device outlived weft-peer");
    assert!(!peer.dir.join("weft-peer.sock").exists(), "the control socket outlived weft-peer");
    let _ = std::fs::remove_dir_all(&peer.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_peers_reach_each_other_by_overlay_ip_through_tun_devices() {
    let test = "native_peers_reach_each_other_by_overlay_ip_through_tun_devices";
    let Some((net, [ada, bea])) = two_peers(test).await else { return };
    for (from, to) in [(&ada, &bea), (&bea, &ada)] {
        // A first packet may wait for nothing: the session is up and both took addresses.
        assert_eq!(ping(from, &to.ipv4, 3, 56, &[]).await, 3, "IPv4 {} -> {}", from.ipv4, to.ipv4);
        assert_eq!(ping(from, &to.ipv6, 3, 56, &[]).await, 3, "IPv6 {} -> {}", from.ipv6, to.ipv6);
        // Full-size packets (the device's MTU) pass whole.
        assert_eq!(ping(from, &to.ipv4, 2, FULL_V4, &[]).await, 2, "1280-byte IPv4");
        assert_eq!(ping(from, &to.ipv6, 2, FULL_V6, &[]).await, 2, "1280-byte IPv6");
    }
    for (from, to) in [(&ada, &bea), (&bea, &ada)] {
        let v4 = tcp_copy(&from.host, &to.host, &to.ipv4).await;
        let v6 = tcp_copy(&from.host, &to.host, &to.ipv6).await;
        eprintln!(
            "TCP {COPY_BYTES} bytes over the overlay (debug build): IPv4 {v4:.1} Mbit/s, IPv6 {v6:.1} Mbit/s"
        );
    }
    // A second `up --tun` on the host cannot take the device, and says so.
    let mut second = ada.host.tokio_command(weft_peer_bin().unwrap());
    second.args(["up", "--tun"]);
    let out = tokio::time::timeout(WAIT, second.output()).await.unwrap().unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: cannot create the TUN device weft0: it exists and is busy (choose --tun-name)"
    );
    // `status` asks the running `up`: its device, addresses and counters.
    // By name: Ada's host resolves Bea's name (and safety code) to her addresses, and a
    // TCP copy to it arrives; a name nobody has does not resolve.
    let mut both = [bea.ipv4.clone(), bea.ipv6.clone()];
    both.sort();
    assert_eq!(crate::tun_routes::resolve(&ada.host, "bea.weft").await, both);
    let listen = format!("{}:9001", bea.ipv4);
    let (mut sink, mut lines) = probe_ready(&bea.host, &["tcp-sink", &listen]).await;
    let (ok, out) = probe(&ada.host, &["tcp-send", "Bea.weft:9001", "100000"]).await;
    assert!(ok, "tcp-send to Bea.weft: {out}");
    let received = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().unwrap();
    assert!(out.contains(&format!("ok {received}")), "sent {out}, the sink read {received}");
    sink.wait().await.unwrap();
    assert!(!probe(&ada.host, &["resolve", "nobody.weft"]).await.0);
    let status = status(&ada).await;
    assert_eq!(status["tun"]["device"], "weft0", "{status}");
    assert_eq!(status["ipv4"], ada.ipv4.as_str(), "{status}");
    assert!(status["counters"]["sent"].as_u64().unwrap() > 2 * COPY_BYTES / 1280, "{status}");
    assert!(status["counters"]["received"].as_u64().unwrap() > 2 * COPY_BYTES / 1280, "{status}");
    assert_eq!(status["counters"]["dropped_spoofed"], 0, "{status}");
    assert_eq!(status["peers"][0]["ipv4"], bea.ipv4.as_str(), "{status}");
    // Per peer: the bytes of this session each way (both copies went each way, sealed),
    // and how long ago its handshake was.
    let bea_status = &status["peers"][0];
    assert!(bea_status["bytes_sent"].as_u64().unwrap() > 2 * COPY_BYTES, "{status}");
    assert!(bea_status["bytes_received"].as_u64().unwrap() > 2 * COPY_BYTES, "{status}");
    assert!(bea_status["last_handshake_s"].as_u64().unwrap() < 600, "{status}");
    assert_eq!(net.topology.stray_packets().unwrap(), 0);
    stop(ada).await;
    stop(bea).await;
}

/// The nftables table this test adds to a host: counts (and with `drop`, drops) UDP
/// datagrams whose payload starts with the fast path's first byte (0x12), both ways.
fn fast_path_rule(host: &Host, drop: bool) {
    let verdict = if drop { "counter drop" } else { "counter" };
    let ruleset = format!(
        "table inet weftfast {{}}\nflush table inet weftfast\ntable inet weftfast {{\n\
         chain output {{ type filter hook output priority 0; udp length > 8 @th,64,8 0x12 {verdict}; }}\n\
         chain input {{ type filter hook input priority 0; udp length > 8 @th,64,8 0x12 {verdict}; }}\n}}\n"
    );
    let mut nft = host.command("nft").arg("-f").arg("-").stdin(Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    nft.stdin.take().unwrap().write_all(ruleset.as_bytes()).unwrap();
    assert!(nft.wait().unwrap().success(), "nft -f: {ruleset}");
}

/// Fast-path datagrams (`what`: `packets` or `bytes`) the rule on `host` counted, sent and
/// received. Packets as the hooks see them: a UDP GSO send (or a GRO receive) of many
/// datagrams counts once, its bytes all.
fn fast_path_count(host: &Host, what: &str) -> u64 {
    let out = host.command("nft").args(["-j", "list", "table", "inet", "weftfast"]).output();
    let json: Value = serde_json::from_slice(&out.unwrap().stdout).unwrap();
    let items = json["nftables"].as_array().unwrap();
    items
        .iter()
        .filter_map(|i| i["rule"]["expr"].as_array())
        .flatten()
        .filter_map(|e| e["counter"][what].as_u64())
        .sum()
}

/// Fast-path datagrams (or batches of them) the rule on `host` counted.
fn fast_path_datagrams(host: &Host) -> u64 {
    fast_path_count(host, "packets")
}

/// Bytes of fast-path datagrams the rule on `host` counted.
fn fast_path_bytes(host: &Host) -> u64 {
    fast_path_count(host, "bytes")
}

/// Waits until `peer`'s `status` says its one peer's IP packets go as `fast_path` (`up`:
/// the fast UDP path; `fallback`: the data channel after the fast path stopped
/// answering); the status.
async fn wait_fast_path(peer: &TunPeer, fast_path: &str) -> Value {
    let what = format!("the fast path {fast_path}");
    wait_status(peer, &what, WAIT, |s| s["peers"][0]["fast_path"] == fast_path).await
}

/// Polls `peer`'s `status` until `done` holds of it (failing with `what` after
/// `timeout`); the status.
async fn wait_status(
    peer: &TunPeer,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let status = status(peer).await;
        if done(&status) {
            return status;
        }
        assert!(tokio::time::Instant::now() < deadline, "not {what}: {status}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Between two native peers IP packets go as plain UDP datagrams on the ICE pair (first
/// byte 0x12), not through SCTP/DTLS: `status` says `fast UDP`, and an nftables counter on
/// Ada's host sees the TCP copy's packets as such datagrams. A firewall rule that drops
/// only those datagrams (both ways, on Ada's host) sends the traffic back to the data
/// channel: a copy still arrives whole and `status` says so; without the rule the fast
/// path comes back and carries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_packets_take_the_fast_udp_path_and_fall_back_to_the_data_channel() {
    let test = "ip_packets_take_the_fast_udp_path_and_fall_back_to_the_data_channel";
    let Some((net, [ada, bea])) = two_peers(test).await else { return };
    fast_path_rule(&ada.host, false);
    let status = wait_fast_path(&ada, "up").await;
    assert_eq!(status["peers"][0]["path"], "direct", "{status}");
    wait_fast_path(&bea, "up").await;
    let text = ada.host.command(weft_peer_bin().unwrap());
    let mut text = text;
    text.arg("--config-dir").arg(&ada.dir).arg("status");
    let out = String::from_utf8(text.output().unwrap().stdout).unwrap();
    assert!(out.contains("Bea") && out.contains("direct (fast UDP)"), "{out}");

    // Carried on the fast path: the copy's segments (and the other way its ACKs).
    let before = fast_path_bytes(&ada.host);
    let there = tcp_copy(&ada.host, &bea.host, &bea.ipv4).await;
    let back = tcp_copy(&bea.host, &ada.host, &ada.ipv6).await;
    let carried = fast_path_bytes(&ada.host) - before;
    eprintln!("fast UDP path (debug build): {there:.0} and {back:.0} Mbit/s, {carried} bytes");
    assert!(carried > 2 * COPY_BYTES, "{carried} bytes of fast-path datagrams");

    // Dropped: a copy started now survives the switch (TCP resends what was lost before
    // the fast path was given up), and both sides say the data channel carries.
    fast_path_rule(&ada.host, true);
    tcp_copy(&ada.host, &bea.host, &bea.ipv4).await;
    let status = wait_fast_path(&ada, "fallback").await;
    assert_eq!(status["peers"][0]["path"], "direct", "{status}");
    wait_fast_path(&bea, "fallback").await;
    let dropped = fast_path_datagrams(&ada.host);
    let there = tcp_copy(&ada.host, &bea.host, &bea.ipv4).await;
    let back = tcp_copy(&bea.host, &ada.host, &ada.ipv4).await;
    // Only probes met the rule meanwhile.
    let probes = fast_path_datagrams(&ada.host) - dropped;
    eprintln!("data channel (debug build): {there:.0} and {back:.0} Mbit/s, {probes} probes");
    assert!(probes < 100, "{probes} fast-path datagrams during the data-channel copies");
    let mut text = ada.host.command(weft_peer_bin().unwrap());
    text.arg("--config-dir").arg(&ada.dir).arg("status");
    let out = String::from_utf8(text.output().unwrap().stdout).unwrap();
    assert!(out.contains("the fast UDP path stopped answering"), "{out}");

    // Allowed again: the next probes bring it back, and it carries.
    fast_path_rule(&ada.host, false);
    wait_fast_path(&ada, "up").await;
    wait_fast_path(&bea, "up").await;
    tcp_copy(&ada.host, &bea.host, &bea.ipv4).await;
    assert!(fast_path_bytes(&ada.host) > COPY_BYTES, "not carried again");
    assert_eq!(net.topology.stray_packets().unwrap(), 0);
    stop(ada).await;
    stop(bea).await;
}

/// The ICE pair changes under a flow of IP packets, and the fast path follows it: two
/// peers behind endpoint-independent NATs whose UDP to each other is dropped meet through
/// the relay (the fast path unavailable: a relay carries only ICE and DTLS); TCP copies,
/// each checked whole, run one after another while UDP between the sites is let through.
/// ICE moves the session to the direct pair (renomination, or the node's look for a direct
/// path) under the copies, the fast path is proven on the new pair and carries them; then
/// UDP between the sites is dropped again: the copies go on (the fast path given up, the
/// session back on the relay) and, let through once more, the fast path comes back up.
/// No copy fails, and the session is moved, never rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_packets_keep_flowing_while_the_ice_pair_changes_and_the_fast_path_follows() {
    let test = "ip_packets_keep_flowing_while_the_ice_pair_changes_and_the_fast_path_follows";
    if !netns_available(test) {
        return;
    }
    let topology = Topology::new(&[SiteSpec::behind(Nat::EndpointIndependent); 2]).unwrap();
    topology.set_udp_between_sites(false).unwrap();
    let server = SignalProcess::start(topology.server(), &[]).await.unwrap();
    let invite = invite();
    let [mut ada, bea] = pair(&topology, &server, &invite).await;
    let relayed = status(&ada).await;
    assert_eq!(relayed["peers"][0]["fast_path"], "unavailable", "{relayed}");
    assert!(relayed["peers"][0]["path"].as_str().unwrap().starts_with("relayed"), "{relayed}");
    fast_path_rule(&ada.host, false);

    // Copies from Ada to Bea, one after another, until told to stop: how many arrived
    // whole (`tcp_copy` checks each).
    let copies = std::sync::atomic::AtomicU32::new(0);
    let flowing = std::sync::atomic::AtomicBool::new(true);
    let (from, to, addr) = (ada.host.clone(), bea.host.clone(), bea.ipv4.clone());
    let flow = async {
        while flowing.load(std::sync::atomic::Ordering::SeqCst) {
            tcp_copy(&from, &to, &addr).await;
            copies.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    };
    let copied = || copies.load(std::sync::atomic::Ordering::SeqCst);
    // Waits until one more copy than `n` arrived (a cut path takes ICE's consent timeout,
    // about 30 s, to be left for the relay: twice [`WAIT`]).
    let one_more = |n: u32| async move {
        let deadline = tokio::time::Instant::now() + 2 * WAIT;
        while copied() <= n {
            assert!(tokio::time::Instant::now() < deadline, "no copy arrived");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let started = std::time::Instant::now();
    let change = async {
        one_more(0).await;
        // Direct: the session moves under the copies and the fast path comes up on the
        // new pair, and carries.
        let dropped = topology.set_udp_between_sites(true).unwrap();
        assert!(dropped > 0, "no direct attempt was made (and blocked)");
        let direct = |v: &Value| {
            v["event"] == "path_changed" && v["name"] == NAMES[1] && v["path"] == "direct"
        };
        ada.peer.expect("a direct path", WAIT, direct).await.unwrap();
        // Both sides say the fast path is up, and it carries a whole copy (the one under
        // way may have started on the data channel: the next one is all after).
        let carried = || async {
            wait_fast_path(&ada, "up").await;
            wait_fast_path(&bea, "up").await;
            let before = fast_path_bytes(&ada.host);
            one_more(copied() + 1).await;
            let carried = fast_path_bytes(&ada.host) - before;
            assert!(carried > COPY_BYTES, "the fast path did not carry: {carried} bytes");
        };
        carried().await;
        eprintln!("direct, on the fast path: {:?}", started.elapsed());
        // Cut: the fast path is given up (the pair stopped answering, or the session
        // moved back to the relay) and the copies go on.
        let n = copied();
        topology.set_udp_between_sites(false).unwrap();
        let given_up = |s: &Value| s["peers"][0]["fast_path"] != "up";
        wait_status(&ada, "the fast path given up after the cut", WAIT, given_up).await;
        // A copy started after the cut arrives too.
        one_more(n + 1).await;
        let cut = status(&ada).await;
        eprintln!(
            "cut: {:?}, {} {}",
            started.elapsed(),
            cut["peers"][0]["path"],
            cut["peers"][0]["fast_path"]
        );
        // Through again: the node's next look for a direct path finds it. Looks back off
        // (5, 10, 20 s... after the session went relayed), so when the relayed copy took
        // T on a busy machine the next look can be about 2T away: wait for it as long as
        // for that copy. Then the fast path comes back up, and carries.
        topology.set_udp_between_sites(true).unwrap();
        let direct =
            |s: &Value| s["peers"][0]["path"].as_str().is_some_and(|p| p.starts_with("direct"));
        wait_status(&ada, "direct again", 2 * WAIT, direct).await;
        carried().await;
        eprintln!("back on the fast path: {:?}", started.elapsed());
        flowing.store(false, std::sync::atomic::Ordering::SeqCst);
    };
    tokio::join!(flow, change);
    eprintln!("{} copies of {COPY_BYTES} bytes arrived whole across the changes", copied());
    for peer in [&ada, &bea] {
        let sessions = peer.peer.seen.iter().filter(|v| v["event"] == "peer_connected").count();
        assert_eq!(sessions, 1, "the session was rebuilt, not moved: {:?}", peer.peer.seen);
    }
    assert_eq!(topology.stray_packets().unwrap(), 0);
    stop(ada).await;
    stop(bea).await;
    drop(server);
}

/// With `up --no-fast-path` on one side, IP packets stay on the data channel both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fast_path_keeps_ip_packets_on_the_data_channel() {
    let test = "no_fast_path_keeps_ip_packets_on_the_data_channel";
    if !netns_available(test) {
        return;
    }
    let topology = Topology::new(&[SiteSpec::behind(Nat::EndpointIndependent); 2]).unwrap();
    let server = SignalProcess::start(topology.server(), &[]).await.unwrap();
    let invite = invite();
    let dir = config_dir("tun-ada").unwrap();
    let mut ada = start(topology.host(0, 0), &server, &invite, NAMES[0], dir).await;
    let dir = config_dir("tun-bea").unwrap();
    let extra = ["--no-fast-path"];
    let mut bea = start_with(topology.host(1, 0), &server, &invite, NAMES[1], dir, &extra).await;
    connected(&mut ada, &bea, NAMES[1]).await;
    connected(&mut bea, &ada, NAMES[0]).await;
    fast_path_rule(&ada.host, false);
    tcp_copy(&ada.host, &bea.host, &bea.ipv4).await;
    tcp_copy(&bea.host, &ada.host, &ada.ipv4).await;
    let ada_status = status(&ada).await;
    assert_ne!(ada_status["peers"][0]["fast_path"], "up", "{ada_status}");
    assert_eq!(status(&bea).await["peers"][0]["fast_path"], "unavailable");
    // Ada's probes (a few a minute), nothing else.
    assert!(fast_path_datagrams(&ada.host) < 50);
    stop(ada).await;
    stop(bea).await;
    drop(server);
}

/// Cryptokey routing with real packets: Ada's host sends Bea, through Ada's device, UDP
/// datagrams whose source is not Ada's overlay address (an unclaimed overlay address, an
/// address outside the overlay). Ada's node seals them to Bea like any packet to Bea's
/// address; Bea's node drops them, as from a key that does not hold that source, and
/// counts them against Ada. The same datagram from Ada's own address arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_with_a_spoofed_source_address_is_dropped() {
    let test = "a_packet_with_a_spoofed_source_address_is_dropped";
    let Some((_net, [ada, bea])) = two_peers(test).await else { return };
    let (mut listener, mut lines) = probe_ready(&bea.host, &["udp-listen", "7777"]).await;
    let to = format!("{}:7777", bea.ipv4);
    for (source, text) in [("100.64.0.9", "spoofed-overlay"), ("192.0.2.77", "spoofed-outside")] {
        let (ok, out) = probe(&ada.host, &["udp-from", source, &to, text]).await;
        assert!(ok, "{out}");
    }
    // Then a genuine one: once it is in, the spoofed ones (sent first, on one path) had
    // their chance to arrive.
    let genuine = async {
        loop {
            let (ok, out) = probe(&ada.host, &["udp-from", &ada.ipv4, &to, "genuine"]).await;
            assert!(ok, "{out}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let heard = async {
        let mut heard = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.ends_with(" genuine");
            heard.push(line);
            if done {
                return heard;
            }
        }
        panic!("the listener stopped: {heard:?}");
    };
    let heard = tokio::select! {
        heard = heard => heard,
        () = genuine => unreachable!(),
        () = tokio::time::sleep(WAIT) => panic!("the genuine datagram never arrived"),
    };
    assert!(heard.iter().all(|l| !l.contains("spoofed")), "a spoofed datagram arrived: {heard:?}");
    assert!(heard[0].starts_with(&format!("got {}:", ada.ipv4)), "{heard:?}");
    drop(listener.stdin.take());
    let status = status(&bea).await;
    assert_eq!(status["counters"]["dropped_spoofed"], 2, "{status}");
    let from_ada = &status["peers"][0];
    assert_eq!(from_ada["name"], "Ada", "{status}");
    assert_eq!(from_ada["dropped_spoofed"], 2, "{status}");
    // The sender's node does not judge its own packets' sources: Ada counted none.
    assert_eq!(self::status(&ada).await["counters"]["dropped_spoofed"], 0);
    stop(ada).await;
    stop(bea).await;
}

/// Bea stops (her device goes, Ada's node answers packets to her with ICMP unreachable)
/// and starts again with the same key: she gets the same addresses and both reach each
/// other again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_reached_again_at_the_same_addresses() {
    let test = "a_restarted_peer_is_reached_again_at_the_same_addresses";
    let Some((net, [mut ada, mut bea])) = two_peers(test).await else { return };
    assert_eq!(ping(&ada, "Bea", 2, 56, &[]).await, 2);
    let (old_v4, old_v6, dir) = (bea.ipv4.clone(), bea.ipv6.clone(), bea.dir.clone());
    assert!(bea.peer.terminate(WAIT).await.unwrap().success());
    assert!(!has_device(&bea.host, "weft0"));
    ada.peer.expect_event("peer_left", WAIT).await.unwrap();
    assert_eq!(ping(&ada, &old_v4, 2, 56, &[]).await, 0, "Bea answered while stopped");
    ada.peer.seen.clear();
    let host = bea.host.clone();
    bea = start(&host, &net.server, &net.invite, NAMES[1], dir).await;
    assert_eq!((bea.ipv4.as_str(), bea.ipv6.as_str()), (old_v4.as_str(), old_v6.as_str()));
    connected(&mut ada, &bea, NAMES[1]).await;
    connected(&mut bea, &ada, NAMES[0]).await;
    assert_eq!(ping(&ada, "Bea", 3, 56, &[]).await, 3, "Ada -> restarted Bea");
    assert_eq!(ping(&bea, "Ada", 3, 56, &["-6"]).await, 3, "restarted Bea -> Ada");
    let status = status(&ada).await;
    assert!(status["counters"]["unreachable"].as_u64().unwrap() >= 2, "{status}");
    stop(ada).await;
    stop(bea).await;
}

/// Without the right to make a TUN device, `up --tun` stops at once with words that say
/// what to do (and touches nothing else: it has not joined anything yet).
#[tokio::test]
async fn up_tun_without_root_says_what_it_needs() {
    if !netns_available("up_tun_without_root_says_what_it_needs") {
        return;
    }
    let out = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(weft_peer_bin().unwrap())
        .args(["up", "--tun", "--tun-name", "weftnoroot0"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        stderr.trim(),
        "error: cannot create the TUN device weftnoroot0: not permitted (run as root, or give \
         weft-peer CAP_NET_ADMIN)"
    );
}

/// Two keys whose first overlay IPv4 candidates are the same address (a birthday search
/// over keys made from counted secrets: about 2^11 of them).
/// Two device keys whose identities in `network` (the keys peers see, see
/// `IdentityKeyPair::for_network`) have the same first IPv4 candidate: (device key, its
/// identity in the network) each.
fn colliding_keys(network: &Network) -> [(IdentityKeyPair, IdentityKeyPair); 2] {
    let mut seen: HashMap<Ipv4Addr, (IdentityKeyPair, IdentityKeyPair)> = HashMap::new();
    for i in 0u64.. {
        let secret = *blake3::hash(format!("weft tun collision {i}").as_bytes()).as_bytes();
        let device = IdentityKeyPair::from_secret_bytes(&secret);
        let key = device.for_network(network);
        let first = ipv4_candidate(key.public(), 0);
        if let Some(other) = seen.insert(first, (device.clone(), key.clone())) {
            return [other, (device, key)];
        }
    }
    unreachable!()
}

/// A config dir holding `key` as its identity (as `weft-peer` stores it).
pub(crate) fn config_dir_with(label: &str, key: &IdentityKeyPair) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = config_dir(label).unwrap();
    let hex: String = key.secret_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join("identity.key"))
        .unwrap();
    std::io::Write::write_all(&mut file, format!("{hex}\n").as_bytes()).unwrap();
    dir
}

/// The IPv4 addresses on `host`'s device `weft0`.
fn device_ipv4(host: &Host) -> Vec<String> {
    let out =
        host.command("ip").args(["-4", "-o", "addr", "show", "dev", "weft0"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace().skip_while(|w| *w != "inet").nth(1).map(str::to_string)
        })
        .collect()
}

/// The node moves its address (`core/ROUTING.md`, collisions) and the driver follows: Bea's
/// key's first address is Ada's, who had it first. Bea's device starts with it (a
/// tentative claim), then, once Ada's firm claim is heard, has Bea's second candidate
/// instead (the old address removed), and both reach each other at the addresses they
/// ended with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_address_moves_on_the_device_too() {
    if !netns_available("a_moved_address_moves_on_the_device_too") {
        return;
    }
    let invite = invite();
    let [(first, first_key), (second, second_key)] =
        colliding_keys(&Network::from_invite(&invite).unwrap());
    let x = ipv4_candidate(first_key.public(), 0);
    let y = ipv4_candidate(second_key.public(), 1);
    let topology = Topology::new(&[SiteSpec::behind(Nat::EndpointIndependent); 2]).unwrap();
    let server = SignalProcess::start(topology.server(), &[]).await.unwrap();
    let dir_a = config_dir_with("tun-move-ada", &first);
    let mut ada = start(topology.host(0, 0), &server, &invite, NAMES[0], dir_a).await;
    assert_eq!(ada.ipv4, x.to_string());
    ada.peer.expect_event("joined", WAIT).await.unwrap();
    let dir_b = config_dir_with("tun-move-bea", &second);
    let mut bea = start(topology.host(1, 0), &server, &invite, NAMES[1], dir_b).await;
    assert_eq!(bea.ipv4, x.to_string(), "Bea's first claim is her first candidate");
    let moved = bea
        .peer
        .expect("a second address", WAIT, |v| {
            v["event"] == "tun" && v["ipv4"] != format!("{x}/10").as_str()
        })
        .await
        .unwrap();
    assert_eq!(moved["ipv4"], format!("{y}/10"), "{moved}");
    bea.ipv4 = y.to_string();
    assert_eq!(device_ipv4(&bea.host), [format!("{y}/10")]);
    assert_eq!(device_ipv4(&ada.host), [format!("{x}/10")]);
    // Ada's "connected" may have come before Bea moved: ask her running node.
    let deadline = tokio::time::Instant::now() + WAIT;
    while status(&ada).await["peers"][0]["ipv4"] != y.to_string().as_str() {
        assert!(tokio::time::Instant::now() < deadline, "Ada never saw Bea at {y}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ping(&ada, &y.to_string(), 2, 56, &[]).await, 2, "Ada -> Bea at her new address");
    assert_eq!(ping(&bea, &x.to_string(), 2, 56, &[]).await, 2, "Bea -> Ada");
    stop(ada).await;
    stop(bea).await;
    drop(server);
}

/// A browser is a member with addresses but no TUN device: `status` on a native peer shows
/// its overlay addresses (and the page shows the native peer's), and packets to it are
/// answered with ICMP unreachable by the native peer's own node, never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_peer_shows_its_overlay_address_and_is_unreachable_by_ip() {
    let test = "a_browser_peer_shows_its_overlay_address_and_is_unreachable_by_ip";
    if !netns_available(test) || !chromium_available(test) {
        return;
    }
    let topology = Topology::new(&[SiteSpec::behind(Nat::EndpointIndependent); 2]).unwrap();
    let server = SignalProcess::start(topology.server(), &[]).await.unwrap();
    let invite = invite();
    let driver = ChromeDriver::start().await.unwrap();
    let alice = driver.browser_in(topology.host(0, 0)).await.unwrap();
    let checked = async {
        alice.goto(&format!("http://{}:8080/", topology.public_ip())).await?;
        let options = serde_json::json!({ "invite": invite, "name": "Alice" });
        weft_tests::start_join(&alice, &options, "").await?;
        let dir = config_dir("tun-browser").unwrap();
        let mut ada = start(topology.host(1, 0), &server, &invite, NAMES[0], dir).await;
        let seen = ada
            .peer
            .expect("Alice's addresses", WAIT, |v| {
                v["event"] == "peer_connected" && v["name"] == "Alice" && v["ipv4"].is_string()
            })
            .await?;
        let in_status = status(&ada).await;
        let alice_there = &in_status["peers"][0];
        assert_eq!(alice_there["name"], "Alice", "{in_status}");
        assert_eq!(alice_there["ipv4"], seen["ipv4"], "{in_status}");
        assert!(alice_there["ipv6"].is_string(), "{in_status}");
        let ada_in_page = wait_peer(&alice, "Ada", &["direct", "relayed"], WAIT).await?;
        assert_eq!(ada_in_page["ipv4"], ada.ipv4.as_str(), "{ada_in_page}");
        let before = in_status["counters"]["unreachable"].as_u64().unwrap();
        assert_eq!(ping(&ada, "Alice", 2, 56, &[]).await, 0, "a browser answered a ping");
        let after = status(&ada).await["counters"]["unreachable"].as_u64().unwrap();
        assert!(after >= before + 2, "{before} -> {after}");
        assert_eq!(status(&ada).await["counters"]["sent"], 0, "a packet went to a browser");
        stop(ada).await;
        anyhow::Ok(())
    }
    .await;
    alice.quit().await.unwrap();
    checked.unwrap();
    drop(server);
}
