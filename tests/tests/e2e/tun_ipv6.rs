//! IPv6 through subnet routes and exit nodes (issue #12 items 5 and 6), with real TUN
//! devices in network namespaces, as `tun_routes.rs` does for IPv4: a peer offers an IPv6
//! LAN behind its host (a ULA /64 of its own, not the overlay's /48); a peer that accepts
//! it and is allowed reaches the LAN's server, a peer the router does not allow is refused
//! and counted, and a host of the same LAN outside the offered prefix stays out of reach
//! even when a peer routes it into its device. A peer uses another as exit node for IPv6:
//! an "internet" namespace with documentation addresses (`2001:db8::/32`) sees the exit's
//! uplink, not the client's own; when the exit goes, or the client crashes, nothing leaks
//! to the client's own uplink (the kill switch), and every route, rule and sysctl is
//! restored afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use weft_tests::native::{SignalProcess, config_dir};
use weft_tests::netns::{
    IPV6_INTERNET_HOST, Nat, SiteSpec, Topology, ipv6_uplink, netns_available,
};

use crate::tun::{
    config_dir_with, connected, invite, probe, probe_ready, start_with, status, tcp_copy,
};
use crate::tun_routes::{
    dir_verifying, down, end_restored, ip, key, kill, network_state, reaches_subnet, refused,
    route_get, seen_by, stop_restored, subnet_sites, wait_refused, wait_route,
};

/// The IPv6 LAN behind the router peer, its server, and the router's address on it.
const LAN6: &str = "fd0e:5746:c8::/64";
const LAN6_SERVER: &str = "fd0e:5746:c8::2";
const LAN6_ROUTER: &str = "fd0e:5746:c8::1";
/// A second /64 on the same link: the router's host reaches it, but offers only [`LAN6`].
const OTHER6: &str = "fd0e:5746:c9::/64";
const OTHER6_SERVER: &str = "fd0e:5746:c9::2";

/// `weft-netprobe tcp [addr]:9100` from `host`, once: whether it answered.
async fn answers(host: &weft_tests::netns::Host, addr: &str) -> bool {
    probe(host, &["tcp", &format!("[{addr}]:9100")]).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_subnet_is_reached_by_peers_that_accept_it_and_only_if_allowed() {
    let test = "an_ipv6_subnet_is_reached_by_peers_that_accept_it_and_only_if_allowed";
    let Some((topology, lan)) = subnet_sites(test) else { return };
    let (ada_host, cy_host, bea_host) =
        (topology.host(0, 0), topology.host(0, 1), topology.host(1, 0));
    // The LAN has IPv6: both /64s on one link, Bea's host on both.
    bea_host.add_ipv6("lan0", &[&format!("{LAN6_ROUTER}/64"), "fd0e:5746:c9::1/64"]).unwrap();
    lan.add_ipv6("eth0", &[&format!("{LAN6_SERVER}/64"), &format!("{OTHER6_SERVER}/64")]).unwrap();
    let server = SignalProcess::start(topology.server(), &[]).await.unwrap();
    let invite = invite();
    let (ada_key, bea_key) = (key("routes6 ada"), key("routes6 bea"));
    let (before, bea_before) = (network_state(ada_host), network_state(bea_host));
    let (serve, _) = probe_ready(
        &lan,
        &["serve", &format!("[{LAN6_SERVER}]:9100"), &format!("[{OTHER6_SERVER}]:9100")],
    )
    .await;
    // Bea's own host reaches both.
    for addr in [LAN6_SERVER, OTHER6_SERVER] {
        assert!(answers(bea_host, addr).await, "{addr} from Bea's host");
    }

    // Bea offers the one /64 and lets Ada (by name) use it; Ada verified Bea's key and
    // accepts routes from verified peers; Cy accepts Bea's routes by name, but Bea does not
    // allow her.
    let dir = config_dir_with("routes6-bea", &bea_key);
    let offer = ["--advertise-routes", LAN6, "--allow", "Ada"];
    let mut bea = start_with(bea_host, &server, &invite, "Bea", dir, &offer).await;
    let dir = dir_verifying("routes6-ada", &ada_key, &invite, &[("Bea", &bea_key)]);
    let mut ada = start_with(ada_host, &server, &invite, "Ada", dir, &["--accept-routes"]).await;
    let dir = config_dir("routes6-cy").unwrap();
    let mut cy = start_with(cy_host, &server, &invite, "Cy", dir, &["--accept-routes=Bea"]).await;
    connected(&mut ada, &bea, "Bea").await;
    connected(&mut cy, &bea, "Bea").await;
    connected(&mut bea, &ada, "Ada").await;

    // Bea forwards IPv6 and masquerades.
    let bea_state = network_state(bea_host);
    assert!(bea_state.contains("ipv6 forwarding: 1"), "{bea_state}");
    assert!(bea_state.contains("masquerade"), "{bea_state}");

    // Ada routes the /64 into her device; the LAN's server answers her, and sees Bea's
    // address on the LAN (masqueraded: it has no route back to the overlay).
    reaches_subnet(&ada, &lan, LAN6, LAN6_SERVER, LAN6_ROUTER).await;

    // The host outside the offered prefix: Ada has no route to it; routed into her device
    // by hand, her node has no route either and answers unreachable: nothing reaches Bea.
    assert!(!route_get(ada_host, OTHER6_SERVER).contains("weft0"), "{}", {
        route_get(ada_host, OTHER6_SERVER)
    });
    assert!(!answers(ada_host, OTHER6_SERVER).await, "{OTHER6_SERVER} reached without a route");
    let by_hand = ["-6", "route", "add", OTHER6, "dev", "weft0"];
    assert!(ada_host.command("ip").args(by_hand).status().unwrap().success());
    let unreachable_before = status(&ada).await["counters"]["unreachable"].as_u64().unwrap();
    let bea_unrouted = refused(&bea).await["unrouted"].clone();
    assert!(!answers(ada_host, OTHER6_SERVER).await, "{OTHER6_SERVER} reached outside {LAN6}");
    let ada_status = status(&ada).await;
    assert!(
        ada_status["counters"]["unreachable"].as_u64().unwrap() > unreachable_before,
        "{ada_status}"
    );
    assert_eq!(
        refused(&bea).await["unrouted"],
        bea_unrouted,
        "Ada sent Bea what she does not route"
    );
    let by_hand = ["-6", "route", "del", OTHER6, "dev", "weft0"];
    assert!(ada_host.command("ip").args(by_hand).status().unwrap().success());

    // Cy has the route, but Bea refuses her packets and counts them; Ada still gets in.
    wait_route(cy_host, LAN6_SERVER, true).await;
    let before_refused = refused(&bea).await;
    assert!(!answers(cy_host, LAN6_SERVER).await, "Bea let a peer she does not allow in");
    let subnet = |v: &Value| v["subnet"].as_u64().unwrap();
    wait_refused(&bea, &before_refused, |after| subnet(after) > subnet(&before_refused)).await;
    assert!(answers(ada_host, LAN6_SERVER).await);

    end_restored(serve, [cy, ada, bea], &[(ada_host, &before), (bea_host, &bea_before)]).await;
    drop(server);
    drop(topology);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_node_carries_ipv6_and_nothing_leaks_when_it_goes() {
    let test = "an_exit_node_carries_ipv6_and_nothing_leaks_when_it_goes";
    if !netns_available(test) {
        return;
    }
    let mut topology = Topology::new(&[SiteSpec::behind(Nat::EndpointIndependent); 2]).unwrap();
    let (ada_host, bea_host) = (topology.host(0, 0).clone(), topology.host(1, 0).clone());
    let inet6 = topology.add_ipv6_internet(&[&ada_host, &bea_host]).unwrap();
    let server = SignalProcess::start(topology.server(), &[]).await.unwrap();
    let invite = invite();
    let internet = format!("[{IPV6_INTERNET_HOST}]:9100");
    let (mut serve, _) = probe_ready(&inet6, &["serve", &internet]).await;
    let (ada_uplink, bea_uplink) = (ipv6_uplink(0), ipv6_uplink(1));
    let (before, bea_before) = (network_state(&ada_host), network_state(&bea_host));
    // Without Weft, Ada reaches the internet by her own uplink.
    assert!(seen_by(&ada_host, &internet).await.starts_with(&format!("[{ada_uplink}]:")));

    let dir = config_dir("exit6-bea").unwrap();
    let offer = ["--advertise-exit-node", "--allow", "Ada"];
    let mut bea = start_with(&bea_host, &server, &invite, "Bea", dir, &offer).await;
    let options = ["--exit-node", "Bea", "--exit-node-required"];
    let dir = config_dir("exit6-ada").unwrap();
    let mut ada = start_with(&ada_host, &server, &invite, "Ada", dir, &options).await;
    connected(&mut ada, &bea, "Bea").await;
    connected(&mut bea, &ada, "Ada").await;
    let host6 = IPV6_INTERNET_HOST.to_string();
    wait_route(&ada_host, &host6, true).await;

    // Her IPv6 goes through Bea, masqueraded (the internet sees Bea's uplink), a TCP copy
    // too; Weft's own sockets (marked) stay on the underlay.
    let bea_state = network_state(&bea_host);
    assert!(bea_state.contains("ipv6 forwarding: 1"), "{bea_state}");
    assert!(seen_by(&ada_host, &internet).await.starts_with(&format!("[{bea_uplink}]:")));
    let rate = tcp_copy(&ada_host, &inet6, &host6).await;
    eprintln!("TCP over IPv6 through the exit node (debug build): {rate:.1} Mbit/s");
    let marked = ip(&ada_host, &["route", "get", &host6, "mark", "0x5746"]);
    assert!(marked.contains("dev eth6"), "{marked}");
    let bea_status = status(&bea).await;
    assert_eq!(bea_status["counters"]["refused"]["exit"], 0, "{bea_status}");

    // The exit goes: Ada's IPv6 stays in her device (her node answers unreachable) and
    // never takes her own uplink.
    stop_restored(bea).await;
    assert_eq!(network_state(&bea_host), bea_before, "Bea's host is not as it was");
    assert!(route_get(&ada_host, &host6).contains("dev weft0"), "{}", route_get(&ada_host, &host6));
    assert!(!probe(&ada_host, &["tcp", &internet]).await.0, "IPv6 leaked without the exit");
    // Ada crashes: her device goes, the unreachable route stays.
    let ada_dir = kill(ada).await;
    let after_crash = route_get(&ada_host, &host6);
    assert!(!after_crash.contains("dev eth6"), "{after_crash}\n{}", network_state(&ada_host));
    let leaked = probe(&ada_host, &["tcp", &internet]).await;
    assert!(
        !leaked.0,
        "IPv6 leaked after a crash: {leaked:?}\n{after_crash}\n{}",
        network_state(&ada_host)
    );
    // `down` undoes everything: the host is as before and reaches the internet directly.
    let undone = down(&ada_host, &ada_dir).await;
    assert!(undone["undone"].as_u64().unwrap() > 0, "{undone}");
    assert_eq!(network_state(&ada_host), before, "Ada's host is not as it was after down");
    assert!(seen_by(&ada_host, &internet).await.starts_with(&format!("[{ada_uplink}]:")));
    let _ = std::fs::remove_dir_all(&ada_dir);

    drop(serve.stdin.take());
    let _ = serve.wait().await;
    drop(server);
    drop(topology);
}
