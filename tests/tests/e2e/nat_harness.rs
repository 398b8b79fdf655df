//! The network namespace harness (`weft_tests::netns`) behaves like the NATs it models: a
//! `weft-netprobe` server on the public host reports the address it sees, and probes on
//! hosts behind each kind of router show the mapping (endpoint-independent or not), the
//! routed case, a UDP-blocking firewall, one that lets only TCP to 443 out, hole punching,
//! Chromium inside a namespace, and the cleanup.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use weft_tests::netns::{
    Host, Nat, Outbound, SiteSpec, Topology, namespaces_with_prefix, netns_available,
};
use weft_tests::{ChromeDriver, chromium_available};

const PROBE: &str = env!("CARGO_BIN_EXE_weft-netprobe");
/// The probe server's ports: one UDP socket and one TCP listener on each.
const PORTS: [u16; 3] = [3478, 3479, 3480];
/// How long a step may take on a busy machine before the test fails.
const WAIT: Duration = Duration::from_secs(20);

/// A process in a namespace, its stdout lines on a channel; killed on drop.
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Running {
    fn start(host: &Host, args: &[&str]) -> Self {
        let mut child = host
            .command(PROBE)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Self { child, stdin, lines }
    }

    /// The next line, or `None` if none came within `timeout`.
    fn line_within(&self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => panic!("the probe exited"),
        }
    }

    fn send_line(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The probe server on the public host, once it is listening on `ports`.
fn serve(topology: &Topology, ports: &[u16]) -> Running {
    let mut args = vec!["serve".to_string()];
    args.extend(ports.iter().map(u16::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Running::start(topology.server(), &args);
    assert_eq!(server.line_within(WAIT).as_deref(), Some("ready"));
    server
}

fn server_addrs(topology: &Topology) -> Vec<SocketAddr> {
    PORTS.iter().map(|&port| SocketAddr::new(topology.public_ip(), port)).collect()
}

/// From one UDP socket on `host`, the address each server port saw (`None`: no answer).
fn udp_seen(topology: &Topology, host: &Host) -> Vec<Option<SocketAddr>> {
    let servers: Vec<String> = server_addrs(topology).iter().map(ToString::to_string).collect();
    let out = host.command(PROBE).arg("udp").args(&servers).output().unwrap();
    assert!(out.status.success(), "probe failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let seen: Vec<Option<SocketAddr>> = stdout
        .lines()
        .map(|line| match line.split_once(' ').unwrap().1 {
            "none" => None,
            addr => Some(addr.parse().unwrap()),
        })
        .collect();
    assert_eq!(seen.len(), PORTS.len(), "{stdout}");
    seen
}

/// The address the server saw a TCP connection from `host` to its `port` come from.
fn tcp_seen(topology: &Topology, host: &Host, port: u16) -> Result<SocketAddr, String> {
    let server = SocketAddr::new(topology.public_ip(), port);
    let out = host.command(PROBE).args(["tcp", &server.to_string()]).output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout).unwrap().trim().parse().unwrap())
}

/// Behind one router with `nat`: the site's public address, and the address each server
/// port saw one UDP socket of its host at.
fn mappings_behind(nat: Nat) -> (IpAddr, Vec<SocketAddr>) {
    let topology = Topology::new(&[SiteSpec::behind(nat)]).unwrap();
    let _server = serve(&topology, &PORTS);
    let seen = udp_seen(&topology, topology.host(0, 0)).into_iter().map(Option::unwrap).collect();
    (topology.site_public_ip(0), seen)
}

#[test]
fn endpoint_independent_nat_keeps_one_public_address_for_every_destination() {
    if !netns_available("endpoint_independent_nat_keeps_one_public_address_for_every_destination") {
        return;
    }
    let (public_ip, seen) = mappings_behind(Nat::EndpointIndependent);
    assert_eq!(seen[0].ip(), public_ip, "{seen:?}");
    assert!(seen.iter().all(|s| *s == seen[0]), "one mapping for every destination: {seen:?}");
}

#[test]
fn symmetric_nat_maps_each_destination_to_its_own_port() {
    if !netns_available("symmetric_nat_maps_each_destination_to_its_own_port") {
        return;
    }
    let (public_ip, seen) = mappings_behind(Nat::Symmetric);
    assert!(seen.iter().all(|s| s.ip() == public_ip), "{seen:?}");
    // Random ports: two of three may meet by chance (1 in 20,000), all three hardly ever.
    assert!(seen.iter().any(|s| s.port() != seen[0].port()), "a port per destination: {seen:?}");
}

#[test]
fn routed_site_shows_the_hosts_own_address() {
    if !netns_available("routed_site_shows_the_hosts_own_address") {
        return;
    }
    let topology =
        Topology::new(&[SiteSpec { nat: Nat::None, outbound: Outbound::All, hosts: 2 }]).unwrap();
    let _server = serve(&topology, &PORTS);
    for i in 0..2 {
        let host = topology.host(0, i);
        let seen = udp_seen(&topology, host);
        assert!(seen.iter().all(|s| s.unwrap().ip() == host.ip), "{host:?}: {seen:?}");
        assert_eq!(tcp_seen(&topology, host, PORTS[0]).unwrap().ip(), host.ip);
    }
}

#[test]
fn blocked_udp_gets_no_answer_but_tcp_connects() {
    if !netns_available("blocked_udp_gets_no_answer_but_tcp_connects") {
        return;
    }
    let blocked = SiteSpec { nat: Nat::EndpointIndependent, outbound: Outbound::NoUdp, hosts: 1 };
    let topology = Topology::new(&[blocked, SiteSpec::behind(Nat::EndpointIndependent)]).unwrap();
    let _server = serve(&topology, &PORTS);
    // The server answers UDP (site 1), just not to site 0.
    assert!(udp_seen(&topology, topology.host(1, 0)).iter().all(Option::is_some));
    let seen = udp_seen(&topology, topology.host(0, 0));
    assert!(seen.iter().all(Option::is_none), "UDP got through: {seen:?}");
    assert_eq!(
        tcp_seen(&topology, topology.host(0, 0), PORTS[0]).unwrap().ip(),
        topology.site_public_ip(0)
    );
}

#[test]
fn only_tcp_to_443_gets_out_of_an_https_only_site() {
    if !netns_available("only_tcp_to_443_gets_out_of_an_https_only_site") {
        return;
    }
    let https_only =
        SiteSpec { nat: Nat::EndpointIndependent, outbound: Outbound::OnlyTcp443, hosts: 1 };
    let topology = Topology::new(&[https_only]).unwrap();
    let _server = serve(&topology, &[PORTS[0], PORTS[1], PORTS[2], 443]);
    let host = topology.host(0, 0);
    let seen = udp_seen(&topology, host);
    assert!(seen.iter().all(Option::is_none), "UDP got through: {seen:?}");
    assert!(tcp_seen(&topology, host, PORTS[0]).is_err(), "TCP to another port got through");
    assert_eq!(tcp_seen(&topology, host, 443).unwrap().ip(), topology.site_public_ip(0));
}

/// Two `weft-netprobe punch` processes that have learned each other's mapped address
/// from the server and are sending to it.
struct PunchPair {
    sides: [Running; 2],
    mapped: [SocketAddr; 2],
}

impl PunchPair {
    fn start(topology: &Topology, a: &Host, b: &Host) -> Self {
        let server = SocketAddr::new(topology.public_ip(), PORTS[0]).to_string();
        let mut sides = [a, b].map(|host| Running::start(host, &["punch", &server]));
        let mapped = sides.each_ref().map(|side| {
            let line = side.line_within(WAIT).expect("no mapped address");
            line.strip_prefix("mapped ").unwrap().parse::<SocketAddr>().unwrap()
        });
        sides[0].send_line(&mapped[1].to_string());
        sides[1].send_line(&mapped[0].to_string());
        Self { sides, mapped }
    }

    /// Whether side `i` has heard from the other side's mapped address (waiting up to
    /// `timeout` for it).
    fn heard(&self, i: usize, timeout: Duration) -> bool {
        match self.sides[i].line_within(timeout) {
            None => false,
            Some(line) => {
                assert_eq!(line, format!("heard {}", self.mapped[1 - i]), "side {i}");
                true
            }
        }
    }
}

#[test]
fn hole_punching_works_between_endpoint_independent_nats_not_symmetric_ones() {
    if !netns_available("hole_punching_works_between_endpoint_independent_nats_not_symmetric_ones")
    {
        return;
    }
    let eim = SiteSpec::behind(Nat::EndpointIndependent);
    let symmetric = SiteSpec::behind(Nat::Symmetric);
    let topology = Topology::new(&[eim, eim, symmetric, symmetric]).unwrap();
    let _server = serve(&topology, &PORTS[..1]);
    let symmetric_pair = PunchPair::start(&topology, topology.host(2, 0), topology.host(3, 0));
    let symmetric_started = Instant::now();
    let eim_pair = PunchPair::start(&topology, topology.host(0, 0), topology.host(1, 0));
    assert!(eim_pair.heard(0, WAIT) && eim_pair.heard(1, WAIT), "EIM sites did not connect");
    // The symmetric pair has been sending both ways for at least as long, and 3 s at least
    // (30 datagrams each way), without any getting through.
    let window = symmetric_started.elapsed().max(Duration::from_secs(3));
    let rest = window.saturating_sub(symmetric_started.elapsed());
    assert!(!symmetric_pair.heard(0, rest), "a datagram crossed two symmetric NATs");
    assert!(!symmetric_pair.heard(1, Duration::ZERO), "a datagram crossed two symmetric NATs");
    assert_eq!(topology.stray_packets().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_behind_a_nat_loads_a_page_from_the_public_server() {
    let test = "chromium_behind_a_nat_loads_a_page_from_the_public_server";
    if !netns_available(test) || !chromium_available(test) {
        return;
    }
    let topology = Topology::new(&[SiteSpec::behind(Nat::EndpointIndependent)]).unwrap();
    let _server = serve(&topology, &[8080]);
    let driver = ChromeDriver::start().await.unwrap();
    let browser = driver.browser_in(topology.host(0, 0)).await.unwrap();
    let loaded = async {
        browser.goto(&format!("http://{}:8080/", topology.public_ip())).await?;
        let seen = browser.find(thirtyfour::By::Id("seen")).await?.text().await?;
        anyhow::Ok(seen)
    }
    .await;
    browser.quit().await.unwrap();
    let seen: SocketAddr = loaded.unwrap().parse().unwrap();
    assert_eq!(seen.ip(), topology.site_public_ip(0), "the page came through the NAT");
    assert_eq!(topology.stray_packets().unwrap(), 0, "Chromium sent packets out of the topology");
}

#[test]
fn dropping_the_topology_deletes_its_namespaces() {
    if !netns_available("dropping_the_topology_deletes_its_namespaces") {
        return;
    }
    // A namespace left by a killed run: no process has pid 99999999 (above pid_max); our
    // pid in the counter's place keeps parallel runs of this test apart. Another process
    // building a topology right now may remove it before `ip netns add` is done with it,
    // so its status is not checked: either way it must be gone below.
    let stale = format!("weft-99999999-{}-srv", std::process::id());
    let _ = std::process::Command::new("ip").args(["netns", "add", &stale]).status().unwrap();
    let sites = [
        SiteSpec { nat: Nat::EndpointIndependent, outbound: Outbound::All, hosts: 2 },
        SiteSpec::behind(Nat::Symmetric),
        SiteSpec { nat: Nat::None, outbound: Outbound::NoUdp, hosts: 1 },
    ];
    let topology = Topology::new(&sites).unwrap();
    assert!(namespaces_with_prefix(&stale).unwrap().is_empty(), "the stale namespace is left");
    let prefix = topology.prefix();
    // internet, server, 3 routers, 4 hosts
    assert_eq!(namespaces_with_prefix(&prefix).unwrap().len(), 9);
    drop(topology);
    assert_eq!(namespaces_with_prefix(&prefix).unwrap(), Vec::<String>::new());
}
