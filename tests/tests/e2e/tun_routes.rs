//! Subnet routes, access control and exit nodes through real TUN devices in network
//! namespaces (issue #12 items 5, 6 and 7), with the helpers of `tun.rs`: a peer offers
//! the LAN behind its host (`--advertise-routes`), peers that accept it (`--accept-routes`)
//! reach the LAN's server at its own address, peers that do not have no route, and a
//! peer the router does not allow (`--allow`) is refused and counted; a peer offers to be
//! an exit node (`--advertise-exit-node`) and a client sends everything through it
//! (`--exit-node`), while its own connections stay on the underlay; every route, rule,
//! firewall table and sysctl is restored afterwards, after a clean exit, after a `kill
//! -9` and `weft-peer down`, and by the next `up`; without `nft`, `up` says what to install;
//! with `--snat-subnet-routes=false` the LAN sees the peers' own addresses; a subnet that
//! holds the peers' own public addresses does not swallow the tunnel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{BufReader, Lines};
use tokio::process::ChildStdout;
use weft_core::identity::IdentityKeyPair;
use weft_core::network::Network;
use weft_core::trust::TrustStore;
use weft_tests::native::{SignalProcess, config_dir, weft_peer_bin};
use weft_tests::netns::{Host, Nat, SiteSpec, Topology, netns_available};

use crate::tun::{
    TunPeer, WAIT, config_dir_with, connected, invite, ping, probe, probe_ready, start_with,
    start_with_env, status, stop, tcp_copy,
};

/// The LAN behind the router peer (`Topology::add_lan_behind`'s first).
const LAN: &str = "198.19.200.0/24";
/// Its server, and the router peer's address on it.
const LAN_SERVER: &str = "198.19.200.2";
const LAN_ROUTER: &str = "198.19.200.1";

/// A key made from `label` (so a test knows its peers' keys before they start).
pub(crate) fn key(label: &str) -> IdentityKeyPair {
    IdentityKeyPair::from_secret_bytes(blake3::hash(label.as_bytes()).as_bytes())
}

/// A config dir with `key` as identity, whose trust store for `invite`'s network has
/// each of `verified` pinned and verified, as `weft-peer trust verify` leaves it.
pub(crate) fn dir_verifying(
    label: &str,
    key: &IdentityKeyPair,
    invite: &str,
    verified: &[(&str, &IdentityKeyPair)],
) -> PathBuf {
    let dir = config_dir_with(label, key);
    let network = Network::from_invite(invite).unwrap();
    let mut trust = TrustStore::new();
    for (name, key) in verified {
        // The key `name` shows in this network (its own there: it starts afresh).
        trust.verify(name, &key.for_network(&network).public().fingerprint());
    }
    let trust_dir = dir.join("trust");
    std::fs::create_dir_all(&trust_dir).unwrap();
    std::fs::write(trust_dir.join(format!("{}.json", network.room_id())), trust.to_json()).unwrap();
    dir
}

/// `ip ARGS` on `host`: its output.
pub(crate) fn ip(host: &Host, args: &[&str]) -> String {
    let out = host.command("ip").args(args).output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Where `host` sends packets for `dst`.
pub(crate) fn route_get(host: &Host, dst: &str) -> String {
    ip(host, &["route", "get", dst])
}

/// Waits until `host` routes `dst` into its TUN device (or, with `into: false`, not).
pub(crate) async fn wait_route(host: &Host, dst: &str, into: bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while route_get(host, dst).contains("dev weft0") != into {
        assert!(tokio::time::Instant::now() < deadline, "route to {dst}: {}", route_get(host, dst));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The host's routing state that Weft may change: policy rules and the routes of every
/// table (both families), nftables, forwarding (both families).
pub(crate) fn network_state(host: &Host) -> String {
    let nft = host.command("nft").args(["list", "ruleset"]).output().unwrap();
    let sysctl = |name: &str| {
        let out = host.command("sysctl").args(["-n", name]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let resolv = host.command("cat").arg("/etc/resolv.conf").output().unwrap();
    format!(
        "rules:\n{}{}routes:\n{}nft:\n{}ip_forward: {}ipv6 forwarding: {}resolv.conf:\n{}",
        ip(host, &["rule", "list"]),
        ip(host, &["-6", "rule", "list"]),
        ip(host, &["route", "show", "table", "all"]),
        String::from_utf8_lossy(&nft.stdout),
        sysctl("net.ipv4.ip_forward"),
        sysctl("net.ipv6.conf.all.forwarding"),
        String::from_utf8_lossy(&resolv.stdout)
    )
}

/// `weft-netprobe tcp ADDR` from `host` until it answers (the address the server saw),
/// at most [`WAIT`]: the path may still be settling.
pub(crate) async fn seen_by(host: &Host, addr: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (ok, out) = probe(host, &["tcp", addr]).await;
        if ok {
            return out.trim().to_string();
        }
        assert!(tokio::time::Instant::now() < deadline, "{addr} never answered: {out}");
    }
}

/// The addresses `name` resolves to on `host` (the system's resolver), sorted.
pub(crate) async fn resolve(host: &Host, name: &str) -> Vec<String> {
    let (ok, out) = probe(host, &["resolve", name]).await;
    assert!(ok, "{name} does not resolve: {out}");
    let mut addrs: Vec<String> = out.lines().map(str::to_string).collect();
    addrs.sort();
    addrs
}

/// The `refused` counters of `peer`'s status.
pub(crate) async fn refused(peer: &TunPeer) -> Value {
    status(peer).await["counters"]["refused"].clone()
}

/// Stops `peer` cleanly; its network changes are undone (no state file left).
pub(crate) async fn stop_restored(peer: TunPeer) {
    let state = peer.dir.join("netconf.json");
    stop(peer).await;
    assert!(!state.exists(), "the state file outlived weft-peer");
}

/// Waits until `peer`'s refusal counters, from `before`, pass `done` (they are counted as
/// the packets arrive).
pub(crate) async fn wait_refused(peer: &TunPeer, before: &Value, done: impl Fn(&Value) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let after = refused(peer).await;
        if done(&after) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{before} -> {after}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `peer` routes the subnet `net` into its device and reaches `server` on it (on `lan`,
/// which runs `weft-netprobe serve` on port 9100): the server sees `router`'s address
/// (masqueraded: it needs no route back to the overlay), a TCP copy arrives whole, and
/// `status` shows the route in use.
pub(crate) async fn reaches_subnet(
    peer: &TunPeer,
    lan: &Host,
    net: &str,
    server: &str,
    router: &str,
) {
    let host = &peer.host;
    wait_route(host, server, true).await;
    let seen = seen_by(host, &SocketAddr::new(server.parse().unwrap(), 9100).to_string()).await;
    let router = match router.parse().unwrap() {
        IpAddr::V4(a) => format!("{a}:"),
        IpAddr::V6(a) => format!("[{a}]:"),
    };
    assert!(seen.starts_with(&router), "the LAN saw {seen}, not {router}");
    let rate = tcp_copy(host, lan, server).await;
    eprintln!("TCP to {net} (debug build): {rate:.1} Mbit/s");
    let status = status(peer).await;
    let routes = status["routes"].as_array().unwrap();
    assert!(
        routes.iter().any(|r| r["prefix"] == net && r["kind"] == "subnet" && r["in_use"] == true),
        "{status}"
    );
}

/// The namespaces of a subnet test (`None`, after saying why, where they cannot be made):
/// two hosts behind one NAT (Ada's and Cy's), one behind another (Bea's), and a LAN behind
/// Bea's host.
pub(crate) fn subnet_sites(test: &str) -> Option<(Topology, Host)> {
    if !netns_available(test) {
        return None;
    }
    let two_hosts = SiteSpec { hosts: 2, ..SiteSpec::behind(Nat::EndpointIndependent) };
    let mut topology =
        Topology::new(&[two_hosts, SiteSpec::behind(Nat::EndpointIndependent)]).unwrap();
    let lan = topology.add_lan_behind(1, 0).unwrap();
    Some((topology, lan))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subnet_is_reached_by_peers_that_accept_it_and_only_if_allowed() {
    let test = "a_subnet_is_reached_by_peers_that_accept_it_and_only_if_allowed";
    let Some((topology, lan)) = subnet_sites(test) else { return };
    let server = SignalProcess::start(topology.server(), &[]).await.unwrap();
    let invite = invite();
    let (ada_key, bea_key) = (key("routes ada"), key("routes bea"));
    let (ada_host, cy_host, bea_host) =
        (topology.host(0, 0), topology.host(0, 1), topology.host(1, 0));
    let before = network_state(ada_host);
    let bea_before = network_state(bea_host);

    // Bea offers her LAN and lets Ada (by name) use it; Ada verified Bea's key and accepts
    // routes from verified peers; Cy verified Bea's key too but accepts no routes.
    let dir = config_dir_with("routes-bea", &bea_key);
    let offer = ["--advertise-routes", LAN, "--allow", "Ada"];
    let mut bea = start_with(bea_host, &server, &invite, "Bea", dir, &offer).await;
    let dir = dir_verifying("routes-ada", &ada_key, &invite, &[("Bea", &bea_key)]);
    let mut ada = start_with(ada_host, &server, &invite, "Ada", dir, &["--accept-routes"]).await;
    let dir = dir_verifying("routes-cy", &key("routes cy"), &invite, &[("Bea", &bea_key)]);
    let mut cy = start_with(cy_host, &server, &invite, "Cy", dir, &[]).await;
    connected(&mut ada, &bea, "Bea").await;
    connected(&mut cy, &bea, "Bea").await;
    connected(&mut bea, &ada, "Ada").await;

    // Bea forwards, clamps TCP's MSS to the route's MTU, and masquerades.
    let bea_state = network_state(bea_host);
    assert!(bea_state.contains("ip_forward: 1"), "{bea_state}");
    assert!(bea_state.contains("tcp option maxseg size set rt mtu"), "{bea_state}");
    assert!(bea_state.contains("masquerade"), "{bea_state}");

    // Ada routes the LAN into her device; the LAN's server answers her, and sees Bea's
    // address on the LAN (masquerading: it needs no route back to the overlay).
    let (serve, _) = probe_ready(&lan, &["serve", "9100"]).await;
    reaches_subnet(&ada, &lan, LAN, LAN_SERVER, LAN_ROUTER).await;

    // Cy did not accept routes: no route, the server is out of her reach.
    assert!(
        !route_get(cy_host, LAN_SERVER).contains("weft0"),
        "{}",
        route_get(cy_host, LAN_SERVER)
    );
    assert!(!probe(cy_host, &["tcp", &format!("{LAN_SERVER}:9100")]).await.0);
    let cy_status = status(&cy).await;
    assert_eq!(cy_status["counters"]["routes_refused"], 1, "{cy_status}");

    // Dee, on Cy's host, accepts Bea's routes (by name), but Bea does not allow her: the
    // route is there, her packets are refused and counted, to the LAN and to Bea's own
    // address (an `--allow` list is also who reaches the node's address).
    stop(cy).await;
    let dee_dir = config_dir("routes-dee").unwrap();
    let mut dee =
        start_with(cy_host, &server, &invite, "Dee", dee_dir, &["--accept-routes=Bea"]).await;
    connected(&mut dee, &bea, "Bea").await;
    wait_route(cy_host, LAN_SERVER, true).await;
    let before_refused = refused(&bea).await;
    assert!(!probe(cy_host, &["tcp", &format!("{LAN_SERVER}:9100")]).await.0);
    assert_eq!(ping(&dee, &bea.ipv4, 2, 56, &[]).await, 0, "Bea answered a peer not allowed");
    // The refusals are counted (each SYN and echo request one).
    let count = |v: &Value, k: &str| v[k].as_u64().unwrap();
    wait_refused(&bea, &before_refused, |after| {
        count(after, "subnet") > count(&before_refused, "subnet")
            && count(after, "address") >= count(&before_refused, "address") + 2
    })
    .await;
    // Ada, allowed, still reaches both.
    assert_eq!(ping(&ada, &bea.ipv4, 2, 56, &[]).await, 2);
    assert!(seen_by(ada_host, &format!("{LAN_SERVER}:9100")).await.starts_with(LAN_ROUTER));

    end_restored(serve, [dee, ada, bea], &[(ada_host, &before), (bea_host, &bea_before)]).await;
    drop(server);
    drop(topology);
}

/// Ends `serve` (a `weft-netprobe` waiting for its stdin to close) and stops `peers` in
/// order, each cleanly and with its changes undone; then each host is as it was before.
pub(crate) async fn end_restored<const N: usize>(
    mut serve: tokio::process::Child,
    peers: [TunPeer; N],
    hosts: &[(&Host, &String)],
) {
    drop(serve.stdin.take());
    let _ = serve.wait().await;
    for peer in peers {
        stop_restored(peer).await;
    }
    for (host, before) in hosts {
        assert_eq!(&&network_state(host), before, "{} is not as it was", host.netns);
    }
}
/// `weft-peer down --json` with `dir` on `host`: its answer.
pub(crate) async fn down(host: &Host, dir: &Path) -> Value {
    let mut cmd = host.tokio_command(weft_peer_bin().unwrap());
    cmd.arg("--config-dir").arg(dir).args(["--json", "down"]);
    let out = tokio::time::timeout(WAIT, cmd.output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Starts Ada on `host` using Bea as a required exit node; waits for the session and for
/// her host to route the internet into her device.
async fn exit_client(
    host: &Host,
    server: &SignalProcess,
    invite: &str,
    dir: PathBuf,
    bea: &TunPeer,
) -> TunPeer {
    let options = ["--exit-node", "Bea", "--exit-node-required"];
    let mut ada = start_with(host, server, invite, "Ada", dir, &options).await;
    connected(&mut ada, bea, "Bea").await;
    wait_route(host, "198.18.0.1", true).await;
    ada
}

/// Ends `peer` with SIGKILL: it undoes nothing.
pub(crate) async fn kill(mut peer: TunPeer) -> PathBuf {
    peer.peer.child.start_kill().unwrap();
    peer.peer.child.wait().await.unwrap();
    peer.dir
}

/// Two sites behind endpoint-independent NATs, the signaling server, a new network's
/// invite, and a host on the internet that tells whom it sees (`weft-netprobe serve` on
/// port 9100 of the server's namespace, 198.18.0.1).
struct Internet {
    // Dropped in this order: the processes before the namespaces.
    _serve: tokio::process::Child,
    /// A DNS server on the internet host (port 53), which every site host's
    /// `/etc/resolv.conf` names: it knows `example.test` and says who asked.
    dns: Lines<BufReader<ChildStdout>>,
    _dns: tokio::process::Child,
    server: SignalProcess,
    topology: Topology,
    invite: String,
}

/// [`Internet`] for `test`; `None` (after saying why) where namespaces cannot be made.
async fn internet(test: &str) -> Option<Internet> {
    if !netns_available(test) {
        return None;
    }
    let topology = Topology::new(&[SiteSpec::behind(Nat::EndpointIndependent); 2]).unwrap();
    let server = SignalProcess::start(topology.server(), &[]).await.unwrap();
    let (serve, _) = probe_ready(topology.server(), &["serve", "9100"]).await;
    let dns_args = ["dns-serve", "198.18.0.1:53", &format!("{EXAMPLE}={EXAMPLE_IP}")];
    let (dns_server, dns) = probe_ready(topology.server(), &dns_args).await;
    for site in 0..2 {
        let etc = Path::new("/etc/netns").join(&topology.host(site, 0).netns);
        std::fs::write(etc.join("resolv.conf"), "nameserver 198.18.0.1\n").unwrap();
    }
    Some(Internet { _serve: serve, dns, _dns: dns_server, server, topology, invite: invite() })
}

/// The internet host [`Internet`] runs.
const INTERNET: &str = "198.18.0.1:9100";
/// A name [`Internet`]'s DNS server knows, and its address.
const EXAMPLE: &str = "example.test";
const EXAMPLE_IP: &str = "192.0.2.7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_node_carries_all_traffic_and_the_host_is_restored_even_after_a_crash() {
    let test = "an_exit_node_carries_all_traffic_and_the_host_is_restored_even_after_a_crash";
    let Some(mut net) = internet(test).await else { return };
    let Internet { server, topology, invite, dns, .. } = &mut net;
    let (ada_host, bea_host) = (topology.host(0, 0), topology.host(1, 0));
    let (ada_public, bea_public) = (topology.site_public_ip(0), topology.site_public_ip(1));
    let (before, bea_before) = (network_state(ada_host), network_state(bea_host));
    let internet = INTERNET;
    assert!(seen_by(ada_host, internet).await.starts_with(&format!("{ada_public}:")));

    let dir = config_dir("exit-bea").unwrap();
    let offer = ["--advertise-exit-node", "--allow", "Ada"];
    let mut bea = start_with(bea_host, server, invite, "Bea", dir, &offer).await;
    let ada_dir = config_dir("exit-ada").unwrap();
    let ada = exit_client(ada_host, server, invite, ada_dir, &bea).await;
    connected(&mut bea, &ada, "Ada").await;

    // Everything goes through Bea (the internet sees her site), a TCP copy too; Weft's
    // own traffic stays on the underlay: the signaling socket's mark and the WebRTC
    // sockets' source addresses are routed by the main table.
    assert!(seen_by(ada_host, internet).await.starts_with(&format!("{bea_public}:")));
    let sink_host = topology.server().clone();
    let rate = tcp_copy(ada_host, &sink_host, "198.18.0.1").await;
    eprintln!("TCP through the exit node (debug build): {rate:.1} Mbit/s");
    let marked = ip(ada_host, &["route", "get", "198.18.0.1", "mark", "0x5746"]);
    assert!(marked.contains("dev eth0"), "{marked}");
    let from_eth0 = ip(ada_host, &["route", "get", "198.18.0.1", "from", &ada_host.ip.to_string()]);
    assert!(from_eth0.contains("dev eth0"), "{from_eth0}");
    assert_eq!(ping(&ada, &bea.ipv4, 2, 56, &[]).await, 2);
    // Without LAN access, her own LAN is through the exit too.
    assert!(route_get(ada_host, "198.19.1.254").contains("dev weft0"));
    let bea_status = status(&bea).await;
    assert_eq!(bea_status["counters"]["refused"]["exit"], 0, "{bea_status}");
    // Names: members' through Weft's resolver, the rest forwarded to her resolver on the
    // internet, through the exit node too (it sees Bea's site ask).
    let mut both = [bea.ipv4.clone(), bea.ipv6.clone()];
    both.sort();
    assert_eq!(resolve(ada_host, "bea.weft").await, both);
    assert_eq!(resolve(ada_host, EXAMPLE).await, [EXAMPLE_IP]);
    let asked = tokio::time::timeout(WAIT, dns.next_line()).await.unwrap().unwrap().unwrap();
    assert_eq!(asked, format!("asked {EXAMPLE}. from {bea_public}"));

    // Ada crashes: her device goes, the kill switch stays; nothing leaks to the underlay.
    let ada_dir = kill(ada).await;
    assert!(!probe(ada_host, &["tcp", internet]).await.0, "traffic leaked after a crash");
    let after_crash = route_get(ada_host, "198.18.0.1");
    assert!(after_crash.contains("No route to host"), "{after_crash}\n{}", network_state(ada_host));
    // `down` undoes everything: the host is as before, and reaches the internet directly.
    let undone = down(ada_host, &ada_dir).await;
    assert_eq!(undone["stopped"], false, "{undone}");
    assert!(undone["undone"].as_u64().unwrap() > 0, "{undone}");
    assert_eq!(network_state(ada_host), before, "Ada's host is not as it was after down");
    assert!(seen_by(ada_host, internet).await.starts_with(&format!("{ada_public}:")));

    // Crashed again, the next `up` undoes the leftovers before it starts, and `down`
    // stops a running `up`, which undoes its own.
    let ada = exit_client(ada_host, server, invite, ada_dir, &bea).await;
    let ada_dir = kill(ada).await;
    let ada = exit_client(ada_host, server, invite, ada_dir.clone(), &bea).await;
    assert!(seen_by(ada_host, internet).await.starts_with(&format!("{bea_public}:")));
    let undone = down(ada_host, &ada_dir).await;
    assert_eq!(undone["stopped"], true, "{undone}");
    let mut ada = ada;
    ada.peer.wait_exit(WAIT).await.unwrap();
    assert_eq!(network_state(ada_host), before, "Ada's host is not as it was after a restart");

    // Not required, the exit carries traffic while it is there, and the host takes the
    // underlay again when it goes.
    // (The same key: Bea allows the key pinned as "Ada".)
    // With LAN access, her LAN is reached directly.
    let options = ["--exit-node", "Bea", "--exit-node-allow-lan-access"];
    let mut ada = start_with(ada_host, server, invite, "Ada", ada_dir, &options).await;
    connected(&mut ada, &bea, "Bea").await;
    wait_route(ada_host, "198.18.0.1", true).await;
    assert!(route_get(ada_host, "198.19.1.254").contains("dev eth0"));
    assert!(seen_by(ada_host, internet).await.starts_with(&format!("{bea_public}:")));
    stop_restored(bea).await;
    assert_eq!(network_state(bea_host), bea_before, "Bea's host is not as it was");
    wait_route(ada_host, "198.18.0.1", false).await;
    assert!(seen_by(ada_host, internet).await.starts_with(&format!("{ada_public}:")));
    stop_restored(ada).await;
    assert_eq!(network_state(ada_host), before, "Ada's host is not as it was");
    drop(net);
}

/// A subnet router whose host has `iptables` but no `nft` forwards with iptables: the
/// same MSS clamping and masquerading (the LAN sees the router's address), in chains of
/// Weft's own that are gone once it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subnet_router_without_nft_forwards_with_iptables() {
    let test = "a_subnet_router_without_nft_forwards_with_iptables";
    if !netns_available(test) {
        return;
    }
    let Some(tools) = path_without_nft() else {
        eprintln!("SKIP {test}: iptables is not installed (cargo xtask test installs it)");
        return;
    };
    let mut topology = Topology::new(&[SiteSpec::behind(Nat::EndpointIndependent); 2]).unwrap();
    let lan = topology.add_lan_behind(1, 0).unwrap();
    let server = SignalProcess::start(topology.server(), &[]).await.unwrap();
    let invite = invite();
    let (ada_host, bea_host) = (topology.host(0, 0), topology.host(1, 0));
    let bea_before = network_state(bea_host);
    let rules_before = iptables_save(bea_host);

    let bea_key = key("iptables bea");
    let dir = config_dir_with("iptables-bea", &bea_key);
    let offer = ["--advertise-routes", LAN, "--allow", "Ada"];
    let path = tools.path().to_str().unwrap().to_string();
    let mut bea =
        start_with_env(bea_host, &server, &invite, "Bea", dir, &offer, &[("PATH", &path)]).await;
    let dir = dir_verifying("iptables-ada", &key("iptables ada"), &invite, &[("Bea", &bea_key)]);
    let mut ada = start_with(ada_host, &server, &invite, "Ada", dir, &["--accept-routes"]).await;
    connected(&mut ada, &bea, "Bea").await;
    connected(&mut bea, &ada, "Ada").await;

    let rules = iptables_save(bea_host);
    assert!(rules.contains("-A WEFT-FORWARD -i weft0 -p tcp"), "{rules}");
    assert!(rules.contains("--clamp-mss-to-pmtu"), "{rules}");
    assert!(rules.contains("-j MASQUERADE"), "{rules}");
    assert!(!network_state(bea_host).contains("table inet weft"), "nftables used after all");
    wait_route(ada_host, LAN_SERVER, true).await;
    let (mut serve, _) = probe_ready(&lan, &["serve", "9100"]).await;
    let seen = seen_by(ada_host, &format!("{LAN_SERVER}:9100")).await;
    assert!(seen.starts_with(&format!("{LAN_ROUTER}:")), "the LAN saw {seen}");
    tcp_copy(ada_host, &lan, LAN_SERVER).await;

    stop_restored(bea).await;
    // iptables (over nf_tables) keeps the tables and base chains it made, empty: the rules
    // are what must be as before.
    let rules_after = iptables_save(bea_host);
    let rules_only =
        |s: &str| s.lines().filter(|l| l.starts_with("-A")).collect::<Vec<_>>().join("\n");
    assert!(!rules_after.contains("WEFT"), "Weft's chains outlived it: {rules_after}");
    assert_eq!(rules_only(&rules_after), rules_only(&rules_before));
    let but_nft = |s: &str| {
        let (head, rest) = s.split_once("nft:").unwrap();
        format!("{head}{}", &rest[rest.find("ip_forward:").unwrap()..])
    };
    assert_eq!(but_nft(&network_state(bea_host)), but_nft(&bea_before), "Bea's host changed");
    stop(ada).await;
    serve.kill().await.unwrap();
}

/// A folder for `PATH` with the tools `up` uses but `nft` (`ip`, `iptables`,
/// `ip6tables`), or `None` if iptables is not installed.
fn path_without_nft() -> Option<TempPath> {
    let dir = std::env::temp_dir().join(format!("weft-no-nft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for tool in ["ip", "iptables", "ip6tables"] {
        let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists());
        match found {
            Some(target) => {
                let link = dir.join(tool);
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(target, link).unwrap();
            }
            None if tool == "ip6tables" => {}
            None => return None,
        }
    }
    Some(TempPath(dir))
}

/// A folder removed when dropped.
struct TempPath(PathBuf);

impl TempPath {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The host's iptables rules (`iptables-save`), without its comment lines (which carry
/// the time).
fn iptables_save(host: &Host) -> String {
    let out = host.command("iptables-save").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Forwarding needs `nft`: without it `up` stops at once, saying what to install, and
/// leaves nothing behind (it has joined nothing yet). Run in a namespace of its own.
#[tokio::test]
async fn forwarding_without_nft_says_what_to_install() {
    if !netns_available("forwarding_without_nft_says_what_to_install") {
        return;
    }
    let topology = Topology::new(&[SiteSpec::behind(Nat::None)]).unwrap();
    let host = topology.host(0, 0);
    let dir = config_dir("routes-no-nft").unwrap();
    // weft-peer with a PATH that has no `nft`.
    let mut cmd = host.tokio_command("env");
    cmd.arg("PATH=/nonexistent").arg(weft_peer_bin().unwrap()).arg("--config-dir").arg(&dir);
    cmd.args(["up", "--tun", "--advertise-routes", "10.9.0.0/16"]);
    let out = tokio::time::timeout(WAIT, cmd.output()).await.unwrap().unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: `nft` is missing: install nftables (it is needed to forward packets for peers \
         (--advertise-routes, --advertise-exit-node))"
    );
    assert!(!dir.join("netconf.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--snat-subnet-routes=false`: the LAN's server sees the peer's own overlay address (it
/// routes the overlay back through the router peer), while what the same peer sends
/// through the router's exit is still masqueraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subnet_router_can_leave_peers_their_addresses() {
    let test = "a_subnet_router_can_leave_peers_their_addresses";
    let Some(mut net) = internet(test).await else { return };
    let lan = net.topology.add_lan_behind(1, 0).unwrap();
    let back =
        lan.command("ip").args(["route", "add", "100.64.0.0/10", "via", LAN_ROUTER]).output();
    assert!(back.unwrap().status.success());
    let Internet { server, topology, invite, .. } = &net;
    let (ada_host, bea_host) = (topology.host(0, 0), topology.host(1, 0));
    let (mut lan_serve, _) = probe_ready(&lan, &["serve", "9100"]).await;

    let offer = [
        "--advertise-routes",
        LAN,
        "--snat-subnet-routes=false",
        "--advertise-exit-node",
        "--allow",
        "Ada",
    ];
    let dir = config_dir("snat-bea").unwrap();
    let mut bea = start_with(bea_host, server, invite, "Bea", dir, &offer).await;
    let dir = config_dir("snat-ada").unwrap();
    let accept = ["--accept-routes=Bea", "--exit-node", "Bea"];
    let mut ada = start_with(ada_host, server, invite, "Ada", dir, &accept).await;
    connected(&mut ada, &bea, "Bea").await;
    connected(&mut bea, &ada, "Ada").await;
    wait_route(ada_host, LAN_SERVER, true).await;
    wait_route(ada_host, "198.18.0.1", true).await;
    let seen = seen_by(ada_host, &format!("{LAN_SERVER}:9100")).await;
    assert!(seen.starts_with(&format!("{}:", ada.ipv4)), "the LAN saw {seen}");
    let seen = seen_by(ada_host, INTERNET).await;
    assert!(
        seen.starts_with(&format!("{}:", topology.site_public_ip(1))),
        "the internet saw {seen}"
    );

    drop(lan_serve.stdin.take());
    let _ = lan_serve.wait().await;
    stop_restored(ada).await;
    stop_restored(bea).await;
    drop(net);
}

/// A subnet that holds the signaling server and every peer's public address (here the
/// whole simulated internet, 198.18.0.0/15): what Ada sends there goes through Bea, but
/// Weft's own traffic stays on the underlay (the marked signaling socket, the WebRTC
/// sockets' source addresses), so the tunnel never carries itself and keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subnet_holding_the_peers_own_addresses_does_not_swallow_the_tunnel() {
    let test = "a_subnet_holding_the_peers_own_addresses_does_not_swallow_the_tunnel";
    let Some(net) = internet(test).await else { return };
    let Internet { server, topology, invite, .. } = &net;
    let (ada_host, bea_host) = (topology.host(0, 0), topology.host(1, 0));
    let offer = ["--advertise-routes", "198.18.0.0/15", "--allow", "Ada"];
    let mut bea =
        start_with(bea_host, server, invite, "Bea", config_dir("wide-bea").unwrap(), &offer).await;
    let accept = ["--accept-routes=Bea"];
    let mut ada =
        start_with(ada_host, server, invite, "Ada", config_dir("wide-ada").unwrap(), &accept).await;
    connected(&mut ada, &bea, "Bea").await;
    connected(&mut bea, &ada, "Ada").await;
    wait_route(ada_host, "198.18.0.1", true).await;
    let bea_public = topology.site_public_ip(1).to_string();
    let own = ip(ada_host, &["route", "get", &bea_public, "from", &ada_host.ip.to_string()]);
    assert!(own.contains("dev eth0"), "{own}");
    let marked = ip(ada_host, &["route", "get", "198.18.0.1", "mark", "0x5746"]);
    assert!(marked.contains("dev eth0"), "{marked}");
    assert!(seen_by(ada_host, INTERNET).await.starts_with(&format!("{bea_public}:")));
    let rate = tcp_copy(ada_host, topology.server(), "198.18.0.1").await;
    eprintln!("TCP through a subnet router to the internet (debug build): {rate:.1} Mbit/s");
    assert_eq!(ping(&ada, &bea.ipv4, 2, 56, &[]).await, 2);
    stop_restored(ada).await;
    stop_restored(bea).await;
    drop(net);
}
