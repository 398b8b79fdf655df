//! A small internet in network namespaces, with real NAT routers: for tests of how peers
//! connect across NATs (STUN, TURN, relay fallback).
//!
//! [`Topology::new`] builds, from a list of [`SiteSpec`]s, one namespace per box below and
//! veth links between them; everything lives in `198.18.0.0/15` (the benchmark range, never
//! routed on a real network), and no namespace has a link to the machine's own network:
//!
//! ```text
//!                 server 198.18.0.1  (public_ip(); Topology::server())
//!                    │ 198.18.0.0/24
//!               ┌────┴─────┐
//!               │ internet │  a router: 198.18.k.254 on link k, no NAT; drops (and
//!               │          │  counts: stray_packets()) what is not for 198.18.0.0/15
//!               └┬────────┬┘
//!   198.18.1.0/24│        │198.18.2.0/24 ...
//!     ┌──────────┴──┐  ┌──┴──────────┐
//!     │ router of   │  │ router of   │  WAN 198.18.(s+1).1: the site's public address
//!     │ site 0: Nat │  │ site 1: Nat │  (nftables: NAT kind, firewall, outbound)
//!     └──────┬──────┘  └──────┬──────┘  LAN bridge 198.19.(s+1).254
//!        198.19.1.0/24     198.19.2.0/24
//!      host(0,0) host(0,1)  host(1,0)      hosts 198.19.(s+1).(i+1), `eth0` + default route
//! ```
//!
//! Every namespace has `lo` up, IPv6 off and its own loopback as resolver
//! (`/etc/netns/<name>/resolv.conf`, which `ip netns exec` puts over `/etc/resolv.conf`):
//! Chromium looks up names even when given an address, and would otherwise send them
//! toward the machine's resolver. Every host has a non-loopback interface and a default
//! route (Chromium gathers no ICE candidates without one). Processes run inside a
//! namespace through `ip netns exec` ([`Host::command`]); Chromium through
//! [`crate::ChromeDriver::browser_in`].
//!
//! The NAT kinds, set on a site's router with nftables ([`Nat`]):
//! - [`Nat::EndpointIndependent`]: `masquerade`. Linux keeps the source port when it is
//!   free, so a socket keeps one public ip:port whatever it sends to (endpoint-independent
//!   mapping), and only replies from an ip:port it sent to come back in (address-and-port
//!   dependent filtering): a "port-restricted cone", the common home router (RFC 4787).
//!   Hole punching works through it.
//! - [`Nat::Symmetric`]: `masquerade fully-random`: a new random public port per
//!   destination, as on some mobile carriers' NATs and many corporate firewalls. What a
//!   server tells a peer about its address is useless to anyone else, so hole punching
//!   between two of them fails and only a relay (TURN) connects them.
//! - [`Nat::None`]: the site is routed; its hosts have public addresses of their own.
//!
//! Behind a NAT, only flows the LAN opened come in, and every router drops what comes to
//! itself from the internet unasked, as home routers do. That matters beyond realism: a
//! peer's early hole-punching packet that reached the router would leave a conntrack entry
//! that makes Linux map the LAN's next flow to that peer to another port, and hole punching
//! would fail even through endpoint-independent NAT (seen: without the rule, the hole
//! punching self-test fails). [`SiteSpec::outbound`] can make the router drop all UDP from
//! the LAN to the internet (TCP passes: [`Outbound::NoUdp`]), like a corporate firewall
//! that leaves only TURN over TCP or TLS, or all but TCP to port 443
//! ([`Outbound::OnlyTcp443`]), like a network that lets only HTTPS out and so leaves only
//! TURN over TLS on 443.
//!
//! Limits of Linux as a NAT model: a public port already in use by another LAN host's flow
//! to the same destination is not kept, so two hosts of one site may see different
//! mappings than one would; mappings expire with the kernel's UDP conntrack timeouts
//! (`nf_conntrack_udp_timeout`, 30 s, and 120 s for a flow with replies) rather than a
//! router's; the routers have no hairpinning rules (for a host reaching another host of
//! its own site at its public address); ICMP errors for open flows pass as related.
//!
//! Names: every namespace is called `weft-<pid>-<n>-<role>` (`n` counts topologies in the
//! process), so parallel tests and processes never collide, and [`Topology::new`] first
//! deletes namespaces of processes that no longer exist (a killed run). Dropping the
//! [`Topology`] deletes its namespaces, which deletes their interfaces. End the processes
//! started inside first: a namespace lives on, nameless, while a process is still in it.
//!
//! For what crosses one link (benchmarks of tunnels), [`VethPair`] is smaller: two hosts on
//! one veth pair and a server host beside them, named and cleaned up the same way.
//!
//! Tests skip (printing why) when the machine cannot do this ([`netns_missing`]), unless
//! `WEFT_REQUIRE_NETNS` is set, which `cargo xtask test` does.

use std::ffi::OsStr;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Where `ip netns exec` finds files to bind over `/etc` inside a namespace.
const ETC_NETNS_DIR: &str = "/etc/netns";
/// Every namespace's resolver: its own loopback, where nothing answers, so that no lookup
/// sends a packet toward the machine's real resolver (Chromium makes some).
const RESOLV_CONF: &str = "nameserver 127.0.0.1\n";
/// The first part of every namespace name this module makes.
const PREFIX: &str = "weft";
/// Hosts of a site and sites of a topology each fit in one octet of an address.
const MAX_SITES: usize = 200;
const MAX_HOSTS: usize = 200;

/// How a site's router connects its LAN to the internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Routed, no NAT: the site's hosts are reachable at their own addresses.
    None,
    /// Endpoint-independent mapping, address-and-port-dependent filtering ("port-restricted
    /// cone"): nftables `masquerade`.
    EndpointIndependent,
    /// A new public port for every destination: nftables `masquerade fully-random`.
    Symmetric,
}

/// What a site's router lets out from its LAN to the internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    /// Everything.
    All,
    /// All but UDP.
    NoUdp,
    /// Only TCP to port 443.
    OnlyTcp443,
}

/// One site: a router with a NAT of some kind and `hosts` hosts on its LAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteSpec {
    /// What the router does to the LAN's traffic.
    pub nat: Nat,
    /// What the router lets out.
    pub outbound: Outbound,
    /// How many hosts sit on the LAN (at least one).
    pub hosts: usize,
}

impl SiteSpec {
    /// One host behind a router with `nat` that lets everything out.
    pub fn behind(nat: Nat) -> Self {
        Self { nat, outbound: Outbound::All, hosts: 1 }
    }
}

/// A machine of the topology: a namespace and its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The namespace's name, for `ip netns exec`.
    pub netns: String,
    /// Its address: public for the server, on the site's LAN for a host.
    pub ip: IpAddr,
}

impl Host {
    /// `ip netns exec <netns> <program>`: add arguments and run it as usual. `ip` execs the
    /// program, so the child's pid is the program's own and killing it kills the program.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"]).arg(&self.netns).arg(program);
        cmd
    }

    /// [`Host::command`] for tokio.
    pub fn tokio_command(&self, program: impl AsRef<OsStr>) -> tokio::process::Command {
        self.command(program).into()
    }

    /// Turns IPv6 on for the interface `dev` alone (the namespaces have it off) and gives
    /// it `addrs` (`ADDR/LEN`), usable at once (no duplicate address detection).
    pub fn add_ipv6(&self, dev: &str, addrs: &[&str]) -> Result<()> {
        enable_ipv6(&self.netns, dev)?;
        let batch: String =
            addrs.iter().map(|a| format!("addr add {a} dev {dev} nodad\n")).collect();
        run(Command::new("ip").args(["-n", &self.netns, "-batch", "-"]), &batch)
    }
}

/// `net.ipv6.conf.DEV.disable_ipv6=0` in `netns`, without duplicate address detection
/// (`accept_dad=0` first): its link-local address and routes are there at once, not a
/// second later, so a test that compares the host's routes before and after sees the same.
fn enable_ipv6(netns: &str, dev: &str) -> Result<()> {
    let settings = [
        format!("net.ipv6.conf.{dev}.accept_dad=0"),
        format!("net.ipv6.conf.{dev}.disable_ipv6=0"),
    ];
    run(Command::new("ip").args(["netns", "exec", netns, "sysctl", "-q", "-w"]).args(settings), "")
}

#[derive(Debug)]
struct Site {
    router: Host,
    hosts: Vec<Host>,
}

/// A server on an internet and sites behind routers, each in its own namespace; dropping it
/// deletes them. See the [module docs](self).
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    namespaces: Vec<String>,
    internet: String,
    server: Host,
    sites: Vec<Site>,
}

impl Topology {
    /// Builds the namespaces, links, addresses, routes and NAT rules for `sites` (site `s`
    /// is `198.19.(s+1).0/24`). Every step is a command that returns only once the kernel
    /// has done it, so the topology is ready when this returns.
    pub fn new(sites: &[SiteSpec]) -> Result<Self> {
        if sites.len() > MAX_SITES || sites.iter().any(|s| s.hosts == 0 || s.hosts > MAX_HOSTS) {
            bail!("a topology has at most {MAX_SITES} sites of 1 to {MAX_HOSTS} hosts each");
        }
        remove_stale_namespaces()?;
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{PREFIX}-{}-{n}", std::process::id());
        let host = |role: String, ip: Ipv4Addr| Host {
            netns: format!("{prefix}-{role}"),
            ip: IpAddr::V4(ip),
        };
        let internet = format!("{prefix}-inet");
        let server = host("srv".into(), wan_ip(0));
        let site_hosts: Vec<Site> = sites
            .iter()
            .enumerate()
            .map(|(s, spec)| Site {
                router: host(format!("r{s}"), wan_ip(octet(s))),
                hosts: (0..spec.hosts)
                    .map(|i| host(format!("h{s}-{i}"), lan_ip(octet(s), octet(i))))
                    .collect(),
            })
            .collect();
        let mut namespaces = vec![internet.clone(), server.netns.clone()];
        for site in &site_hosts {
            namespaces.push(site.router.netns.clone());
            namespaces.extend(site.hosts.iter().map(|h| h.netns.clone()));
        }
        // From here on, dropping `topology` (on any error) deletes what was made.
        let topology =
            Self { prefix, namespaces, internet: internet.clone(), server, sites: site_hosts };
        // The namespaces and the veth pairs between them, each end made in its namespace.
        let mut root = namespaces_batch(&topology.namespaces)?;
        let veth = |a: &str, a_ns: &str, b: &str, b_ns: &str| {
            format!("link add {a} netns {a_ns} type veth peer name {b} netns {b_ns}\n")
        };
        root += &veth("link0", &internet, "wan", &topology.server.netns);
        for (s, site) in topology.sites.iter().enumerate() {
            root += &veth(&format!("link{}", octet(s)), &internet, "wan", &site.router.netns);
            for (i, h) in site.hosts.iter().enumerate() {
                root += &veth(&format!("h{i}"), &site.router.netns, "eth0", &h.netns);
            }
        }
        run(Command::new("ip").args(["-batch", "-"]), &root)?;

        // The internet first, then the routers, then the hosts: each gateway is up before
        // the routes through it are added.
        let mut inet = up("link0", internet_ip(0));
        for (s, spec) in sites.iter().enumerate() {
            let net = octet(s);
            inet += &up(&format!("link{net}"), internet_ip(net));
            if spec.nat == Nat::None {
                inet += &format!("route add {}/24 via {}\n", lan_ip(net, 0), wan_ip(net));
            }
        }
        configure(&internet, true, &inet)?;
        nft(&internet, STRAY_RULESET)?;
        for (s, (spec, site)) in sites.iter().zip(&topology.sites).enumerate() {
            let net = octet(s);
            let mut router = up("wan", wan_ip(net));
            router += &format!("route add default via {}\n", internet_ip(net));
            router += "link add lan type bridge\nlink set lan up\n";
            for i in 0..site.hosts.len() {
                router += &format!("link set h{i} master lan\nlink set h{i} up\n");
            }
            router += &format!("addr add {}/24 dev lan\n", lan_ip(net, GATEWAY));
            configure(&site.router.netns, true, &router)?;
            nft(&site.router.netns, &ruleset(spec))?;
        }
        for (s, site) in topology.sites.iter().enumerate() {
            for (i, h) in site.hosts.iter().enumerate() {
                let gateway = lan_ip(octet(s), GATEWAY);
                let batch = format!(
                    "{}route add default via {gateway}\n",
                    up("eth0", lan_ip(octet(s), octet(i)))
                );
                configure(&h.netns, false, &batch)?;
            }
        }
        let batch = format!("{}route add default via {}\n", up("wan", wan_ip(0)), internet_ip(0));
        configure(&topology.server.netns, false, &batch)?;
        Ok(topology)
    }

    /// Adds a LAN behind host `i` of site `site` (a subnet the host can route to, as a
    /// home server behind a peer): a namespace with `eth0` at `198.19.(200+n).2/24`, linked
    /// to a new interface `lan0` of the host at `.1`; `n` counts the LANs of this topology.
    /// The LAN's host has no default route: it reaches only its own /24, so whatever comes
    /// to it from elsewhere must be answered to the host's `.1` (a host that masquerades).
    /// Its namespace goes with the topology.
    pub fn add_lan_behind(&mut self, site: usize, i: usize) -> Result<Host> {
        let n = self.namespaces.iter().filter(|ns| ns.contains("-lan")).count();
        let net = 200 + u8::try_from(n).context("too many LANs")?;
        let host = self.sites[site].hosts[i].clone();
        let lan = Host { netns: format!("{}-lan{n}", self.prefix), ip: IpAddr::V4(lan_ip(net, 2)) };
        let etc = Path::new(ETC_NETNS_DIR).join(&lan.netns);
        std::fs::create_dir_all(&etc)?;
        std::fs::write(etc.join("resolv.conf"), RESOLV_CONF)?;
        self.namespaces.push(lan.netns.clone());
        let root = format!(
            "netns add {lan}
link add lan0 netns {host} type veth peer name eth0 netns {lan}
",
            lan = lan.netns,
            host = host.netns
        );
        run(Command::new("ip").args(["-batch", "-"]), &root)?;
        configure(&lan.netns, false, &up("eth0", lan_ip(net, 2)))?;
        run(
            Command::new("ip").args(["-n", &host.netns, "-batch", "-"]),
            &up("lan0", lan_ip(net, 1)),
        )?;
        Ok(lan)
    }

    /// An IPv6 internet beside the IPv4 one, for `hosts` (hosts of this topology): a
    /// namespace that routes `2001:db8::/32` (the documentation range, never routed on a
    /// real network) and is itself the internet's host at [`IPV6_INTERNET_HOST`] (on its
    /// loopback). Host `k` of `hosts` gets an uplink `eth6` at `2001:db8:(k+1)::1/64`
    /// ([`ipv6_uplink`]), the namespace `::ffff` on that link, and a default IPv6 route
    /// through it: a native IPv6 uplink, no NAT, as ISPs give. Only those interfaces have
    /// IPv6. The namespace goes with the topology.
    ///
    /// ```text
    ///   host k ── eth6 2001:db8:(k+1)::1/64 ═══ 2001:db8:(k+1)::ffff ── inet6 (2001:db8:ffff::1)
    /// ```
    pub fn add_ipv6_internet(&mut self, hosts: &[&Host]) -> Result<Host> {
        let inet6 =
            Host { netns: format!("{}-inet6", self.prefix), ip: IpAddr::V6(IPV6_INTERNET_HOST) };
        let etc = Path::new(ETC_NETNS_DIR).join(&inet6.netns);
        std::fs::create_dir_all(&etc)?;
        std::fs::write(etc.join("resolv.conf"), RESOLV_CONF)?;
        self.namespaces.push(inet6.netns.clone());
        let mut root = format!("netns add {}\n", inet6.netns);
        for (k, host) in hosts.iter().enumerate() {
            root += &format!(
                "link add v6link{k} netns {} type veth peer name eth6 netns {}\n",
                inet6.netns, host.netns
            );
        }
        run(Command::new("ip").args(["-batch", "-"]), &root)?;
        run(
            Command::new("ip").args(["netns", "exec", &inet6.netns, "sysctl", "-q", "-w"]).args([
                "net.ipv6.conf.all.disable_ipv6=0",
                "net.ipv6.conf.default.disable_ipv6=0",
                "net.ipv6.conf.all.forwarding=1",
            ]),
            "",
        )?;
        let mut batch = format!("link set lo up\naddr add {IPV6_INTERNET_HOST}/128 dev lo\n");
        for (k, host) in hosts.iter().enumerate() {
            let uplink = ipv6_uplink(k);
            // `2001:db8:(k+1)::ffff`.
            let gateway = Ipv6Addr::from(u128::from(uplink) | 0xffff);
            batch += &format!("link set v6link{k} up\naddr add {gateway}/64 dev v6link{k} nodad\n");
            host.add_ipv6("eth6", &[&format!("{uplink}/64")])?;
            let up = format!("link set eth6 up\nroute add default via {gateway} dev eth6\n");
            run(Command::new("ip").args(["-n", &host.netns, "-6", "-batch", "-"]), &up)?;
        }
        run(Command::new("ip").args(["-n", &inet6.netns, "-6", "-batch", "-"]), &batch)?;
        Ok(inet6)
    }

    /// The public server (`198.18.0.1`), on the internet with no NAT.
    pub fn server(&self) -> &Host {
        &self.server
    }

    /// The server's address.
    pub fn public_ip(&self) -> IpAddr {
        self.server.ip
    }

    /// Host `i` of site `site`, both counted from 0. Panics if there is no such host, like
    /// indexing a slice.
    pub fn host(&self, site: usize, i: usize) -> &Host {
        &self.sites[site].hosts[i]
    }

    /// The public address of a site's router: where its NATed hosts appear to come from.
    pub fn site_public_ip(&self, site: usize) -> IpAddr {
        self.sites[site].router.ip
    }

    /// Lets UDP between sites through the internet, or drops it (a network where only
    /// the server is reachable over UDP: peer-to-peer checks fail, the relay works). It
    /// can change while a test runs, as networks do. Returns how many datagrams between
    /// sites were dropped since the last call that blocked them (0 when none were).
    pub fn set_udp_between_sites(&self, allowed: bool) -> Result<u64> {
        let exec = |args: &[&str]| {
            Command::new("ip").args(["netns", "exec", &self.internet, "nft"]).args(args).output()
        };
        let listing = exec(&["list", "table", "ip", "p2p"])?;
        let dropped = if listing.status.success() {
            let text = String::from_utf8_lossy(&listing.stdout).into_owned();
            let count = text
                .split_once("counter packets ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok());
            let out = exec(&["delete", "table", "ip", "p2p"])?;
            if !out.status.success() {
                bail!("nft delete failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            count.with_context(|| format!("no counter in the p2p table: {text}"))?
        } else {
            0
        };
        if !allowed {
            let server = self.server.ip;
            nft(
                &self.internet,
                &format!(
                    "table ip p2p {{\n chain forward {{\n type filter hook forward priority \
                     filter; policy accept;\n meta l4proto udp ip saddr != {server} ip daddr != \
                     {server} counter drop\n }}\n}}\n"
                ),
            )?;
        }
        Ok(dropped)
    }

    /// Limits every site's access link to `mbit` Mbit/s each way (a token bucket on the
    /// router's uplink and on the internet's link toward it; the server's link stays
    /// unlimited, as a data centre's would), or lifts the limit (`None`). Home and mobile
    /// links, not the machine's CPU, are what bound real transfers.
    pub fn limit_sites(&self, mbit: Option<u32>) -> Result<()> {
        for (s, site) in self.sites.iter().enumerate() {
            let link = format!("link{}", octet(s));
            for (netns, dev) in [(&site.router.netns, "wan"), (&self.internet, link.as_str())] {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns, "tc", "qdisc"]);
                match mbit {
                    Some(m) => cmd.args(["replace", "dev", dev, "root", "tbf", "rate"]).args([
                        format!("{m}mbit"),
                        "burst".into(),
                        "64kb".into(),
                        "latency".into(),
                        "50ms".into(),
                    ]),
                    None => cmd.args(["del", "dev", dev, "root"]),
                };
                let out = cmd.output()?;
                // Deleting a limit that is not there is fine.
                if !out.status.success() && mbit.is_some() {
                    bail!("tc failed: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
            }
        }
        Ok(())
    }

    /// How many packets the namespaces sent toward addresses outside the topology
    /// (`198.18.0.0/15`): the internet router counts and drops them. Tests should find 0 (a
    /// lookup or STUN request to a real server is a bug in the test).
    pub fn stray_packets(&self) -> Result<u64> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.internet, "nft", "list", "chain", "ip", "weft"])
            .arg("prerouting")
            .output()?;
        if !out.status.success() {
            bail!("nft list failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let listing = String::from_utf8_lossy(&out.stdout);
        let count = listing
            .split_once("counter packets ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok());
        count.with_context(|| format!("no counter in the internet's ruleset: {listing}"))
    }

    /// The start of every namespace name of this topology (`weft-<pid>-<n>-`).
    pub fn prefix(&self) -> String {
        format!("{}-", self.prefix)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = delete_namespaces(&self.namespaces) {
            eprintln!("netns: cleaning up {}: {e:#}", self.prefix);
        }
    }
}

/// Two hosts joined by one veth pair, and a server host linked to each by a veth of its
/// own: for benchmarks of what crosses one link (`bench tun`: raw, through WireGuard, through
/// Weft), with the server (signaling, STUN) beside that link, not on it. Nothing links it to
/// the machine's network. Dropping it ends every process still inside its namespaces and
/// deletes them.
///
/// ```text
///   a ── eth0 198.18.0.1/24 ═══ veth ═══ 198.18.0.2/24 eth0 ── b
///   │ eth1 198.19.1.1/24                 198.19.2.1/24 eth1 │
///   └──── 198.19.1.254 ── server 198.19.0.1 ── 198.19.2.254 ─┘
/// ```
///
/// `a.ip` and `b.ip` are their `eth0` addresses (bind to them to use the shared link); the
/// server's address is on its loopback, routed to over each host's `eth1`, and the server
/// routes the hosts' `eth0` addresses back the same way (so a STUN request from a socket
/// bound to `eth0` is answered). IPv6 is off, as in [`Topology`].
#[derive(Debug)]
pub struct VethPair {
    prefix: String,
    namespaces: Vec<String>,
    /// The first host.
    pub a: Host,
    /// The second host.
    pub b: Host,
    /// The server host.
    pub server: Host,
}

impl VethPair {
    /// Builds the three namespaces and their links; ready when this returns.
    pub fn new() -> Result<Self> {
        remove_stale_namespaces()?;
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{PREFIX}-{}-pair{n}", std::process::id());
        let host = |role: &str, ip: Ipv4Addr| Host {
            netns: format!("{prefix}-{role}"),
            ip: IpAddr::V4(ip),
        };
        let a = host("a", Ipv4Addr::new(198, 18, 0, 1));
        let b = host("b", Ipv4Addr::new(198, 18, 0, 2));
        let server = host("srv", Ipv4Addr::new(198, 19, 0, 1));
        let namespaces = vec![a.netns.clone(), b.netns.clone(), server.netns.clone()];
        // From here on, dropping `pair` (on any error) deletes what was made.
        let pair = Self { prefix, namespaces, a, b, server };
        let (a, b, srv) = (&pair.a.netns, &pair.b.netns, &pair.server.netns);
        let mut root = namespaces_batch(&pair.namespaces)?;
        root += &format!("link add eth0 netns {a} type veth peer name eth0 netns {b}\n");
        root += &format!("link add eth1 netns {a} type veth peer name to-a netns {srv}\n");
        root += &format!("link add eth1 netns {b} type veth peer name to-b netns {srv}\n");
        run(Command::new("ip").args(["-batch", "-"]), &root)?;
        let server_ip = pair.server.ip;
        for (k, h) in [&pair.a, &pair.b].into_iter().enumerate() {
            let site = octet(k);
            let batch = format!(
                "link set eth0 up\naddr add {}/24 dev eth0\n{}route add {server_ip}/32 via {}\n",
                h.ip,
                up("eth1", lan_ip(site, 1)),
                lan_ip(site, GATEWAY),
            );
            configure(&h.netns, false, &batch)?;
        }
        let mut batch = format!("addr add {server_ip}/32 dev lo\n");
        for (k, (dev, h)) in [("to-a", &pair.a), ("to-b", &pair.b)].into_iter().enumerate() {
            batch += &up(dev, lan_ip(octet(k), GATEWAY));
            batch += &format!("route add {}/32 via {}\n", h.ip, lan_ip(octet(k), 1));
        }
        configure(srv, false, &batch)?;
        Ok(pair)
    }

    /// The start of every namespace name of this pair (`weft-<pid>-pair<n>-`).
    pub fn prefix(&self) -> String {
        format!("{}-", self.prefix)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        if let Err(e) = delete_namespaces(&self.namespaces) {
            eprintln!("netns: cleaning up {}: {e:#}", self.prefix);
        }
    }
}

/// Writes each namespace's `/etc/netns` resolver file; the `ip -batch` lines that add the
/// namespaces.
fn namespaces_batch(names: &[String]) -> Result<String> {
    let mut batch = String::new();
    for ns in names {
        let etc = Path::new(ETC_NETNS_DIR).join(ns);
        std::fs::create_dir_all(&etc)?;
        std::fs::write(etc.join("resolv.conf"), RESOLV_CONF)?;
        batch += &format!("netns add {ns}\n");
    }
    Ok(batch)
}

/// Ends every process still inside the named namespaces (`SIGKILL`, by pid: a daemon a
/// test or benchmark started and did not end, or one left by a killed run), then deletes
/// the namespaces (with their interfaces) and their `/etc/netns` files, going on past those
/// already gone. Without the first step a daemon would keep its namespace alive, nameless.
fn delete_namespaces(names: &[String]) -> Result<()> {
    for ns in names {
        kill_processes_in(ns);
        let _ = std::fs::remove_dir_all(Path::new(ETC_NETNS_DIR).join(ns));
    }
    let batch: String = names
        .iter()
        .filter(|ns| Path::new(NETNS_DIR).join(ns).exists())
        .map(|ns| format!("netns del {ns}\n"))
        .collect();
    if batch.is_empty() {
        return Ok(());
    }
    run(Command::new("ip").args(["-force", "-batch", "-"]), &batch)
}

/// Sends `SIGKILL` to every process in the namespace `ns` (`ip netns pids`), if it exists.
fn kill_processes_in(ns: &str) {
    if !Path::new(NETNS_DIR).join(ns).exists() {
        return;
    }
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else { return };
    let pids: Vec<String> =
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect();
    if !pids.is_empty() {
        let _ = Command::new("kill").arg("-KILL").args(&pids).stderr(Stdio::null()).status();
    }
}

/// The host of [`Topology::add_ipv6_internet`]'s IPv6 internet.
pub const IPV6_INTERNET_HOST: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);

/// The uplink address of the `k`th host given to [`Topology::add_ipv6_internet`]:
/// `2001:db8:(k+1)::1`.
pub fn ipv6_uplink(k: usize) -> Ipv6Addr {
    let net = u16::try_from(k + 1).unwrap_or(u16::MAX);
    Ipv6Addr::new(0x2001, 0xdb8, net, 0, 0, 0, 0, 1)
}

/// Site `s`, or host `i` of a site, counted from 1 in addresses (`new` checks the bounds).
fn octet(index: usize) -> u8 {
    u8::try_from(index + 1).unwrap_or(u8::MAX)
}

/// The internet router's link `k` (0: the server, `s + 1`: site `s`) is `198.18.k.0/24`;
/// the server or site router is `.1` on it,
fn wan_ip(link: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, link, 1)
}

/// ... and the internet router `.254`.
fn internet_ip(link: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, link, 254)
}

/// Site `s`'s LAN is `198.19.(s+1).0/24`: host `i` is `.(i+1)`, the router [`GATEWAY`].
fn lan_ip(net: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, net, host)
}

const GATEWAY: u8 = 254;

/// `ip -batch` lines that bring `dev` up with `ip/24`.
fn up(dev: &str, ip: Ipv4Addr) -> String {
    format!("link set {dev} up\naddr add {ip}/24 dev {dev}\n")
}

/// Sets a namespace's sysctls (IPv6 off, forwarding for routers) and runs `batch` in it
/// with `lo` up first.
fn configure(netns: &str, forward: bool, batch: &str) -> Result<()> {
    let forward = format!("net.ipv4.ip_forward={}", u8::from(forward));
    run(
        Command::new("ip").args(["netns", "exec", netns, "sysctl", "-q", "-e", "-w"]).args([
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
            &forward,
        ]),
        "",
    )?;
    run(Command::new("ip").args(["-n", netns, "-batch", "-"]), &format!("link set lo up\n{batch}"))
}

/// Loads an nftables ruleset in a namespace.
fn nft(netns: &str, ruleset: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "exec", netns, "nft", "-f", "-"]), ruleset)
}

/// The internet router's ruleset: what comes in for an address outside the topology is
/// counted ([`Topology::stray_packets`]) and dropped.
const STRAY_RULESET: &str = r#"
table ip weft {
    chain prerouting {
        type filter hook prerouting priority filter; policy accept;
        ip daddr != 198.18.0.0/15 counter drop
    }
}
"#;

/// The nftables ruleset of a site's router (WAN `wan`, LAN bridge `lan`).
fn ruleset(spec: &SiteSpec) -> String {
    let masquerade = match spec.nat {
        Nat::None => "",
        Nat::EndpointIndependent => r#"oifname "wan" masquerade"#,
        Nat::Symmetric => r#"oifname "wan" masquerade fully-random"#,
    };
    // Behind a NAT only what the LAN opened comes in; a routed site is open.
    let inbound = if spec.nat == Nat::None {
        ""
    } else {
        r#"iifname "wan" ct state established,related accept
           iifname "wan" drop"#
    };
    let outbound = match spec.outbound {
        Outbound::All => "",
        Outbound::NoUdp => r#"iifname "lan" oifname "wan" meta l4proto udp drop"#,
        Outbound::OnlyTcp443 => {
            r#"iifname "lan" oifname "wan" tcp dport 443 accept
               iifname "lan" oifname "wan" drop"#
        }
    };
    format!(
        r#"
table ip weft {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        {masquerade}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        {outbound}
        {inbound}
    }}
}}
"#
    )
}

/// Runs `cmd` with `stdin` as its input; fails with its stderr unless it succeeds.
fn run(cmd: &mut Command, stdin: &str) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}\ninput:\n{stdin}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The named namespaces whose names start with `prefix`, and those whose `/etc/netns`
/// files are left.
pub fn namespaces_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for dir in [NETNS_DIR, ETC_NETNS_DIR] {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Deletes the namespaces this module made in processes that have exited.
fn remove_stale_namespaces() -> Result<()> {
    let stale: Vec<String> = namespaces_with_prefix(&format!("{PREFIX}-"))?
        .into_iter()
        .filter(|ns| {
            let pid = ns.split('-').nth(1).unwrap_or_default();
            pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists()
        })
        .collect();
    // Another process may be removing the same ones.
    delete_namespaces(&stale).or_else(|e| {
        eprintln!("netns: removing stale namespaces: {e:#}");
        Ok(())
    })
}

/// Why this process cannot build a [`Topology`], if it cannot: `ip` or `nft` missing, or
/// no `CAP_SYS_ADMIN` and `CAP_NET_ADMIN` (run as root).
pub fn netns_missing() -> Option<String> {
    for (program, version, package) in [("ip", "-V", "iproute2"), ("nft", "--version", "nftables")]
    {
        let found = Command::new(program)
            .arg(version)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("`{program}` is missing (apt-get install {package})"));
        }
    }
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if caps & (1 << CAP_NET_ADMIN) == 0 || caps & (1 << CAP_SYS_ADMIN) == 0 {
        return Some("network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN (root)".into());
    }
    None
}

/// `true` if network namespace tests may run; `false` (after printing why) if they must
/// skip. Panics when `WEFT_REQUIRE_NETNS` is set and they cannot run.
pub fn netns_available(test: &str) -> bool {
    crate::available(test, netns_missing(), "WEFT_REQUIRE_NETNS")
}
