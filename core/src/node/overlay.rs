//! The node's overlay IP state: its own addresses and their claim, every peer's
//! announcement, the routing table built from them under the local policy, and the two
//! packet paths (TUN to peer, peer to TUN) with cryptokey routing. The node calls in here;
//! this module decides. Design in `core/ROUTING.md`.

use crate::sorted::{SortedMap, SortedSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::address::{
    OVERLAY_IPV4, ipv4_candidate, ipv4_candidate_index, ipv6_address, ipv6_prefix,
};
use super::ip::{self, Unreachable};
use super::route::{Announcement, Rank, Route, RouteKind, RoutePolicy, RouteTable};
use crate::identity::{Fingerprint, PublicIdentity};
use crate::network::Network;

/// ICMP errors the node writes to its TUN device per second, at most (after a burst of as
/// many): a program probing unreachable addresses in a loop costs little.
pub const ICMP_ERRORS_PER_SECOND: u32 = 100;

/// How long a node that found other members in the room keeps its IPv4 claim tentative
/// while it waits for their announcements.
pub const SETTLE_TIME: Duration = Duration::from_secs(10);

/// What the node routes and takes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoutingConfig {
    /// The driver has a TUN device: packets for us become [`super::Output::TunWrite`], and
    /// peers learn that we take packets. Without one (a browser) the node still has and
    /// shows addresses, and peers answer packets to it with ICMP unreachable.
    pub tun: bool,
    /// Subnets behind this node to offer to peers (`--advertise-routes`).
    pub advertise_subnets: Vec<IpNet>,
    /// Offer to be an exit node: announce `0.0.0.0/0` and `::/0`.
    pub advertise_exit: bool,
    /// What to accept from peers, and whom to serve.
    pub policy: RoutePolicy,
    /// Use, and answer probes of, the fast UDP path between native peers (`fastpath.rs`)
    /// where the driver reports one; only with `tun`. Off by default (a browser has none);
    /// the native peer turns it on unless `up --no-fast-path`.
    pub fast_path: bool,
}

/// Packets and announcements counted, since the node started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouteCounters {
    /// IP packets from the TUN sealed to a peer.
    pub sent: u64,
    /// IP packets from peers written to the TUN.
    pub received: u64,
    /// Packets from a peer whose source address is not routed to that peer (spoofed).
    pub dropped_spoofed: u64,
    /// Packets from a peer refused by the policy or for nothing we route: the sum of the
    /// four `refused_*` counters.
    pub dropped_refused: u64,
    /// Packets to our own address from a peer not allowed to reach it (`own_to`).
    pub refused_address: u64,
    /// Packets to a subnet we advertise from a peer not allowed to use it (`serve_to`).
    pub refused_subnet: u64,
    /// Packets through our exit from a peer not allowed to use it (`serve_to`).
    pub refused_exit: u64,
    /// Packets for an address that is neither ours nor behind a route we advertise (or
    /// another member's overlay address: a node never forwards between members).
    pub refused_unrouted: u64,
    /// Packets from peers while we have no TUN device.
    pub dropped_no_tun: u64,
    /// Bytes that are not an IP packet, from the TUN or from a peer.
    pub dropped_malformed: u64,
    /// Packets from the TUN that could not be delivered: answered with ICMP destination
    /// unreachable, or dropped where no ICMP error may be sent or the rate limit
    /// ([`ICMP_ERRORS_PER_SECOND`]) is reached.
    pub unreachable: u64,
    /// Announced routes refused by the policy or by their key.
    pub routes_refused: u64,
}

/// One route of the table, as users and drivers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteView {
    /// The destinations.
    pub prefix: IpNet,
    /// What it is for.
    pub kind: RouteKind,
    /// The key of the peer that carries it.
    pub fingerprint: Fingerprint,
    /// Whether this peer's route is the one used for this prefix (others announced the
    /// same prefix and rank lower).
    pub in_use: bool,
}

/// The node's own overlay state: what a driver needs to configure its TUN device (its
/// addresses, and the routes to send into it) and what `status` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayStatus {
    /// Our IPv4 address in 100.64.0.0/10 (`None` only if all our candidates are taken).
    pub ipv4: Option<Ipv4Addr>,
    /// Our IPv6 address in the network's ULA prefix.
    pub ipv6: Ipv6Addr,
    /// The overlay's IPv4 range, 100.64.0.0/10.
    pub ipv4_net: Ipv4Net,
    /// The network's IPv6 ULA /48.
    pub ipv6_net: Ipv6Net,
    /// Whether our IPv4 claim is firm (see `core/ROUTING.md`).
    pub firm: bool,
    /// The routing table: every route announced to us and accepted.
    pub routes: Vec<RouteView>,
    /// Counters.
    pub counters: RouteCounters,
}

/// What the node knows of one peer's routes, by its key.
#[derive(Debug, Clone, Default)]
struct PeerRoutes {
    announcement: Option<Announcement>,
    /// The user verified its key.
    verified: bool,
    /// The name its key is pinned under in the trust store (`None`: unknown yet, or the
    /// name is pinned to another key).
    pinned_name: Option<String>,
    /// It has an established session now.
    online: bool,
    /// Packets it sent us that we dropped as spoofed.
    dropped_spoofed: u64,
}

/// Why a packet from a peer was not delivered (which counter it raises).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Address,
    Subnet,
    Exit,
    Unrouted,
}

/// Where a packet from the TUN goes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outbound {
    /// Seal it to this peer on its data channel.
    Peer(PublicIdentity),
    /// Write this ICMP error back to the TUN.
    Icmp(Vec<u8>),
    /// Drop it (counted).
    Drop,
}

/// The overlay state of a node.
#[derive(Debug)]
pub(crate) struct Overlay {
    config: RoutingConfig,
    key: PublicIdentity,
    ipv6_net: Ipv6Net,
    ipv6: Ipv6Addr,
    /// Our IPv4 claim: the address and its candidate index.
    ipv4: Option<(Ipv4Addr, u32)>,
    firm: bool,
    /// When the claim becomes firm if not before.
    firm_at: Option<Duration>,
    /// Keys that announced while our claim was tentative.
    heard: SortedSet<PublicIdentity>,
    /// How many other members the room had when we joined: once as many announced, our
    /// claim is firm.
    members_at_join: usize,
    peers: SortedMap<PublicIdentity, PeerRoutes>,
    table: RouteTable,
    counters: RouteCounters,
    /// ICMP errors that may still be sent now, and when the allowance was last refilled.
    icmp_allowance: (u32, Duration),
    /// What was last reported to the driver (without counters).
    shown: Option<OverlayStatus>,
}

impl Overlay {
    pub(crate) fn new(config: RoutingConfig, network: &Network, key: PublicIdentity) -> Self {
        let mut this = Self {
            config,
            key,
            ipv6_net: ipv6_prefix(network),
            ipv6: ipv6_address(network, &key),
            ipv4: Some((ipv4_candidate(&key, 0), 0)),
            firm: false,
            firm_at: None,
            heard: SortedSet::new(),
            members_at_join: 0,
            peers: SortedMap::new(),
            table: RouteTable::default(),
            counters: RouteCounters::default(),
            icmp_allowance: (ICMP_ERRORS_PER_SECOND, Duration::ZERO),
            shown: None,
        };
        this.rebuild();
        this
    }

    pub(crate) fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ipv4.map(|(a, _)| a)
    }

    pub(crate) fn table(&self) -> &RouteTable {
        &self.table
    }

    /// What we announce to every peer.
    pub(crate) fn announcement(&self) -> Announcement {
        let mut routes = Vec::new();
        if let Some((a, _)) = self.ipv4 {
            routes.push((RouteKind::Own, IpNet::from(IpAddr::V4(a))));
        }
        routes.push((RouteKind::Own, IpNet::from(IpAddr::V6(self.ipv6))));
        for net in &self.config.advertise_subnets {
            routes.push((RouteKind::Subnet, net.trunc()));
        }
        if self.config.advertise_exit {
            for any in [IpAddr::from(Ipv4Addr::UNSPECIFIED), IpAddr::from(Ipv6Addr::UNSPECIFIED)] {
                if let Ok(net) = IpNet::new(any, 0) {
                    routes.push((RouteKind::Exit, net));
                }
            }
        }
        routes.truncate(super::route::MAX_ANNOUNCED_ROUTES);
        Announcement { accepts_packets: self.has_tun(), firm: self.firm, routes }
    }

    /// We joined the room with these other members: until each has announced (or
    /// [`SETTLE_TIME`] passed), our IPv4 claim is tentative. Alone, it is firm at once.
    /// Returns whether anything we announce changed.
    pub(crate) fn joined(&mut self, now: Duration, others: usize) -> bool {
        if self.firm {
            return false;
        }
        if others == 0 {
            return self.make_firm();
        }
        self.members_at_join = others;
        self.firm_at.get_or_insert(now + SETTLE_TIME);
        false
    }

    fn make_firm(&mut self) -> bool {
        self.firm_at = None;
        self.heard.clear();
        let changed = !self.firm;
        self.firm = true;
        changed
    }

    pub(crate) fn poll_timeout(&self) -> Option<Duration> {
        self.firm_at
    }

    /// Returns whether anything we announce changed.
    pub(crate) fn handle_timeout(&mut self, now: Duration) -> bool {
        if self.firm_at.is_some_and(|t| now >= t) { self.make_firm() } else { false }
    }

    /// A session with `key` is up.
    pub(crate) fn peer_up(&mut self, key: PublicIdentity) -> bool {
        self.peers.entry(key).or_default().online = true;
        self.rebuild()
    }

    /// What the trust store says of `key`: whether the user verified it, and the name it
    /// is pinned under. Returns whether that changed anything (the table was rebuilt; our
    /// own claim does not depend on trust).
    pub(crate) fn set_trust(
        &mut self,
        key: &PublicIdentity,
        verified: bool,
        pinned_name: Option<String>,
    ) -> bool {
        match self.peers.get_mut(key) {
            Some(p) if p.verified != verified || p.pinned_name != pinned_name => {
                p.verified = verified;
                p.pinned_name = pinned_name;
                self.rebuild();
                true
            }
            _ => false,
        }
    }

    /// The session with `key` ended; its routes stay (ranked after peers with sessions)
    /// until it is forgotten.
    pub(crate) fn peer_down(&mut self, key: &PublicIdentity) -> bool {
        match self.peers.get_mut(key) {
            Some(p) if p.online => {
                p.online = false;
                self.rebuild()
            }
            _ => false,
        }
    }

    /// `key` left the network: its routes go.
    pub(crate) fn forget(&mut self, key: &PublicIdentity) -> bool {
        self.peers.remove(key).is_some() && self.rebuild()
    }

    /// `key` announced its routes. Returns whether anything we announce changed.
    pub(crate) fn announced(&mut self, key: PublicIdentity, announcement: Announcement) -> bool {
        self.peers.entry(key).or_default().announcement = Some(announcement);
        let mut changed = self.rebuild();
        if !self.firm && self.firm_at.is_some() {
            self.heard.insert(key);
            if self.heard.len() >= self.members_at_join {
                changed |= self.make_firm();
            }
        }
        changed
    }

    /// Whether the fast path is on (it carries only IP packets, so only with a TUN).
    pub(crate) fn fast_path_enabled(&self) -> bool {
        self.config.fast_path && self.has_tun()
    }

    /// Whether IP packets go through this node: a TUN device, in a build that can have one
    /// (the `tun` feature; off in the browser, whose module then carries none of the
    /// packet paths: a constant `false` here lets the compiler drop them).
    fn has_tun(&self) -> bool {
        cfg!(feature = "tun") && self.config.tun
    }

    /// Whether `key` announced that it takes IP packets.
    pub(crate) fn accepts_packets(&self, key: &PublicIdentity) -> bool {
        self.peers.get(key).and_then(|p| p.announcement.as_ref()).is_some_and(|a| a.accepts_packets)
    }

    /// The own addresses of `key` in use, and the other routes of it in use.
    pub(crate) fn peer_view(
        &self,
        key: &PublicIdentity,
    ) -> (Option<Ipv4Addr>, Option<Ipv6Addr>, Vec<IpNet>, u64) {
        let (mut v4, mut v6, mut other) = (None, None, Vec::new());
        for (route, used) in self.table.routes() {
            if !used || route.peer != *key {
                continue;
            }
            match (route.kind, route.prefix) {
                (RouteKind::Own, IpNet::V4(n)) => v4 = Some(n.addr()),
                (RouteKind::Own, IpNet::V6(n)) => v6 = Some(n.addr()),
                (_, prefix) => other.push(prefix),
            }
        }
        let spoofed = self.peers.get(key).map_or(0, |p| p.dropped_spoofed);
        (v4, v6, other, spoofed)
    }

    /// Rebuilds the table from every announcement under the policy, then checks our own
    /// IPv4 claim against the others' (re-picking if it lost). Returns whether anything we
    /// announce changed.
    fn rebuild(&mut self) -> bool {
        let mut candidates = Vec::new();
        let mut refused = 0u64;
        let policy = &self.config.policy;
        for (key, p) in &self.peers {
            let Some(a) = &p.announcement else { continue };
            let fp = key.fingerprint();
            for (kind, prefix) in &a.routes {
                let mut rank = Rank {
                    kind: *kind,
                    tentative: false,
                    candidate: 0,
                    offline: !p.online,
                    peer: *key,
                };
                let ok = match (kind, prefix) {
                    (RouteKind::Own, IpNet::V4(n)) => match ipv4_candidate_index(key, n.addr()) {
                        Some(i) => {
                            rank.tentative = !a.firm;
                            rank.candidate = i;
                            // Ownership does not depend on who is online.
                            rank.offline = false;
                            true
                        }
                        None => false,
                    },
                    (RouteKind::Own, IpNet::V6(n)) => {
                        rank.offline = false;
                        n.addr() == ipv6_address_of(self.ipv6_net, key)
                    }
                    (RouteKind::Subnet, net) => {
                        let name = p.pinned_name.as_deref();
                        policy.subnets_from.allows(&fp, p.verified, name)
                            && !self.overlaps_overlay(net)
                    }
                    (RouteKind::Exit, _) => {
                        policy.exit_from.allows(&fp, p.verified, p.pinned_name.as_deref())
                    }
                };
                if ok {
                    candidates.push((rank, Route { prefix: *prefix, kind: *kind, peer: *key }));
                } else {
                    refused += 1;
                }
            }
        }
        // Counted once per announcement received or policy change, not per packet.
        self.counters.routes_refused = refused;
        let own_claims: Vec<(Ipv4Addr, Rank)> = candidates
            .iter()
            .filter_map(|(rank, r)| match (r.kind, r.prefix) {
                (RouteKind::Own, IpNet::V4(n)) => Some((n.addr(), *rank)),
                _ => None,
            })
            .collect();
        let moved = self.check_own_claim(&own_claims);
        // Our own addresses rank like anyone's: a weaker claim of one of them loses to us
        // here too, and is not routed to its claimant.
        if let Some((a, index)) = self.ipv4 {
            let rank = Rank {
                kind: RouteKind::Own,
                tentative: !self.firm,
                candidate: index,
                offline: false,
                peer: self.key,
            };
            let prefix = IpNet::from(IpAddr::V4(a));
            candidates.push((rank, Route { prefix, kind: RouteKind::Own, peer: self.key }));
        }
        let rank = Rank {
            kind: RouteKind::Own,
            tentative: false,
            candidate: 0,
            offline: false,
            peer: self.key,
        };
        let prefix = IpNet::from(IpAddr::V6(self.ipv6));
        candidates.push((rank, Route { prefix, kind: RouteKind::Own, peer: self.key }));
        self.table = RouteTable::build(candidates);
        moved
    }

    /// Keeps our IPv4 claim unless another claim of the same address ranks higher; then
    /// takes our first candidate nobody claims. Returns whether it changed.
    fn check_own_claim(&mut self, claims: &[(Ipv4Addr, Rank)]) -> bool {
        let Some((addr, index)) = self.ipv4 else { return false };
        let mine = Rank {
            kind: RouteKind::Own,
            tentative: !self.firm,
            candidate: index,
            offline: false,
            peer: self.key,
        };
        let beaten = claims.iter().any(|(a, rank)| *a == addr && *rank < mine);
        if !beaten {
            return false;
        }
        let taken: SortedSet<Ipv4Addr> = claims.iter().map(|(a, _)| *a).collect();
        self.ipv4 = (0..super::address::MAX_IPV4_CANDIDATES)
            .map(|i| (ipv4_candidate(&self.key, i), i))
            .find(|(a, _)| !taken.contains(a));
        tracing::info!("our overlay IPv4 address was claimed by another member; moving");
        true
    }

    fn overlaps_overlay(&self, net: &IpNet) -> bool {
        match net {
            IpNet::V4(n) => n.contains(&OVERLAY_IPV4) || OVERLAY_IPV4.contains(n),
            IpNet::V6(n) => n.contains(&self.ipv6_net) || self.ipv6_net.contains(n),
        }
    }

    fn is_own(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.ipv4() == Some(a),
            IpAddr::V6(a) => a == self.ipv6,
        }
    }

    fn in_overlay(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => OVERLAY_IPV4.contains(&a),
            IpAddr::V6(a) => self.ipv6_net.contains(&a),
        }
    }

    /// Whether `key` may send a packet to `dst` through us: to our own address (`own_to`),
    /// to a subnet we advertise or anywhere else if we are an exit node (`serve_to`);
    /// never to another member's overlay address. `Err`: why not, as the counter to raise.
    fn may_deliver(&self, key: &PublicIdentity, dst: IpAddr) -> Result<(), Refused> {
        let (verified, name) = match self.peers.get(key) {
            Some(p) => (p.verified, p.pinned_name.as_deref()),
            None => (false, None),
        };
        let fp = key.fingerprint();
        let policy = &self.config.policy;
        let (allowed, refused) = if self.is_own(dst) {
            (policy.own_to.allows(&fp, verified, name), Refused::Address)
        } else if self.in_overlay(dst) {
            (false, Refused::Unrouted)
        } else if self.config.advertise_subnets.iter().any(|n| n.contains(&dst)) {
            (policy.serve_to.allows(&fp, verified, name), Refused::Subnet)
        } else if self.config.advertise_exit {
            (policy.serve_to.allows(&fp, verified, name), Refused::Exit)
        } else {
            (false, Refused::Unrouted)
        };
        if allowed { Ok(()) } else { Err(refused) }
    }

    /// A packet from the TUN: where it goes. `online(key)` says whether the peer has a
    /// session now.
    pub(crate) fn outbound(
        &mut self,
        now: Duration,
        packet: &[u8],
        online: impl Fn(&PublicIdentity) -> bool,
    ) -> Outbound {
        let Some((_, dst)) = ip::addresses(packet) else {
            self.counters.dropped_malformed += 1;
            return Outbound::Drop;
        };
        let route = self.table.lookup(dst).filter(|r| {
            // Inside the overlay's own ranges only members' addresses count: an unknown
            // member address is unreachable, never sent to an exit node.
            !self.in_overlay(dst) || r.kind == RouteKind::Own
        });
        let why = match route {
            Some(r) if r.peer != self.key && online(&r.peer) && self.accepts_packets(&r.peer) => {
                self.counters.sent += 1;
                return Outbound::Peer(r.peer);
            }
            Some(_) => Unreachable::Host,
            None if self.in_overlay(dst) => Unreachable::Host,
            None => Unreachable::Net,
        };
        self.counters.unreachable += 1;
        if !self.take_icmp_allowance(now) {
            return Outbound::Drop;
        }
        let from = match dst {
            IpAddr::V4(_) => self.ipv4().map(IpAddr::V4),
            IpAddr::V6(_) => Some(IpAddr::V6(self.ipv6)),
        };
        match from.and_then(|from| ip::unreachable(packet, from, why)) {
            Some(icmp) => Outbound::Icmp(icmp),
            None => Outbound::Drop,
        }
    }

    /// Whether one more ICMP error may be sent now (a token bucket refilled at
    /// [`ICMP_ERRORS_PER_SECOND`]).
    fn take_icmp_allowance(&mut self, now: Duration) -> bool {
        let (left, since) = &mut self.icmp_allowance;
        let elapsed = now.saturating_sub(*since);
        let refill = elapsed.as_millis() * u128::from(ICMP_ERRORS_PER_SECOND) / 1000;
        if refill > 0 {
            let refill = u32::try_from(refill).unwrap_or(u32::MAX);
            *left = left.saturating_add(refill).min(ICMP_ERRORS_PER_SECOND);
            *since = now;
        }
        if *left == 0 {
            return false;
        }
        *left -= 1;
        true
    }

    /// A packet from peer `key`: whether it may be written to the TUN. Its source must be
    /// routed to that very peer (cryptokey routing, as WireGuard's allowed IPs); its
    /// destination must be ours, or behind a route we serve it.
    pub(crate) fn inbound(&mut self, key: &PublicIdentity, packet: &[u8]) -> bool {
        if !self.has_tun() {
            self.counters.dropped_no_tun += 1;
            return false;
        }
        let Some((src, dst)) = ip::addresses(packet) else {
            self.counters.dropped_malformed += 1;
            return false;
        };
        if self.table.lookup(src).is_none_or(|r| r.peer != *key) {
            self.counters.dropped_spoofed += 1;
            if let Some(p) = self.peers.get_mut(key) {
                p.dropped_spoofed += 1;
            }
            return false;
        }
        if let Err(why) = self.may_deliver(key, dst) {
            self.counters.dropped_refused += 1;
            let counter = match why {
                Refused::Address => &mut self.counters.refused_address,
                Refused::Subnet => &mut self.counters.refused_subnet,
                Refused::Exit => &mut self.counters.refused_exit,
                Refused::Unrouted => &mut self.counters.refused_unrouted,
            };
            *counter += 1;
            return false;
        }
        self.counters.received += 1;
        true
    }

    /// Our addresses, the table (our own routes aside) and the counters.
    /// The network's IPv6 ULA prefix.
    #[cfg(feature = "dns")]
    pub(crate) fn ipv6_net(&self) -> Ipv6Net {
        self.ipv6_net
    }

    pub(crate) fn status(&self) -> OverlayStatus {
        OverlayStatus {
            ipv4: self.ipv4(),
            ipv6: self.ipv6,
            ipv4_net: OVERLAY_IPV4,
            ipv6_net: self.ipv6_net,
            firm: self.firm,
            routes: self
                .table
                .routes()
                .filter(|(r, _)| r.peer != self.key)
                .map(|(r, in_use)| RouteView {
                    prefix: r.prefix,
                    kind: r.kind,
                    fingerprint: r.peer.fingerprint(),
                    in_use,
                })
                .collect(),
            counters: self.counters,
        }
    }

    /// The status to report to the driver, if it changed (counters aside).
    pub(crate) fn changed_status(&mut self) -> Option<OverlayStatus> {
        let mut status = self.status();
        status.counters = RouteCounters::default();
        if self.shown.as_ref() == Some(&status) {
            return None;
        }
        self.shown = Some(status.clone());
        status.counters = self.counters;
        Some(status)
    }
}

fn ipv6_address_of(net: Ipv6Net, key: &PublicIdentity) -> Ipv6Addr {
    // The same derivation as `ipv6_address`, from the prefix we already hold.
    let iid = super::address::ipv6_interface_id(key);
    let mut a = net.network().octets();
    a[8..].copy_from_slice(&iid);
    Ipv6Addr::from(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::Network;
    use crate::node::route::PeerFilter;

    fn overlay() -> (Overlay, Network) {
        let network = Network::from_invite(&"Q".repeat(43)).unwrap_or_else(|_| unreachable!());
        let config = RoutingConfig { tun: true, ..RoutingConfig::default() };
        (Overlay::new(config, &network, PublicIdentity::from_bytes([1; 32])), network)
    }

    fn host(a: IpAddr) -> IpNet {
        IpNet::from(a)
    }

    #[test]
    fn own_addresses_are_checked_against_the_announcing_key() {
        let (mut o, network) = overlay();
        let k = PublicIdentity::from_bytes([2; 32]);
        let other = PublicIdentity::from_bytes([3; 32]);
        o.peer_up(k);
        // Someone else's addresses, an address that is none of k's candidates.
        let bogus = Announcement {
            accepts_packets: true,
            firm: true,
            routes: vec![
                (RouteKind::Own, host(IpAddr::V4(ipv4_candidate(&other, 0)))),
                (RouteKind::Own, host(IpAddr::V6(ipv6_address(&network, &other)))),
                (RouteKind::Own, host(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1)))),
                // A subnet inside the overlay's own range, from an unverified peer.
                (RouteKind::Subnet, "100.64.0.0/16".parse().unwrap_or_else(|_| unreachable!())),
            ],
        };
        o.announced(k, bogus);
        assert_eq!(o.table().len(), 2, "our own two addresses only");
        assert_eq!(o.status().counters.routes_refused, 4);
        // Its own, including a later candidate (it moved after a collision).
        let good = Announcement {
            accepts_packets: true,
            firm: true,
            routes: vec![
                (RouteKind::Own, host(IpAddr::V4(ipv4_candidate(&k, 5)))),
                (RouteKind::Own, host(IpAddr::V6(ipv6_address(&network, &k)))),
            ],
        };
        o.announced(k, good);
        assert_eq!(o.table().len(), 4);
        assert_eq!(o.peer_view(&k).0, Some(ipv4_candidate(&k, 5)));
        assert_eq!(o.status().counters.routes_refused, 0);
        // Even verified and allowed, a subnet overlapping the overlay is refused.
        o.set_trust(&k, true, None);
        let overlapping = Announcement {
            accepts_packets: true,
            firm: true,
            routes: vec![(
                RouteKind::Subnet,
                "100.0.0.0/8".parse().unwrap_or_else(|_| unreachable!()),
            )],
        };
        o.announced(k, overlapping);
        assert_eq!(o.table().len(), 2);
    }

    /// Two keys (any 32 bytes will do here) whose first candidates collide.
    fn colliding() -> (PublicIdentity, PublicIdentity) {
        let mut seen = std::collections::BTreeMap::new();
        for i in 0u32.. {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&i.to_be_bytes());
            let k = PublicIdentity::from_bytes(b);
            if let Some(other) = seen.insert(ipv4_candidate(&k, 0), k) {
                return (other, k); // `other` was made first: the lower bytes
            }
        }
        unreachable!()
    }

    fn claim(addr: Ipv4Addr, firm: bool) -> Announcement {
        Announcement {
            accepts_packets: true,
            firm,
            routes: vec![(RouteKind::Own, IpNet::from(IpAddr::V4(addr)))],
        }
    }

    #[test]
    fn our_claim_moves_only_for_a_higher_ranked_claim_of_the_same_address() {
        let (lo, hi) = colliding();
        assert!(lo < hi);
        let network = Network::from_invite(&"Q".repeat(43)).unwrap_or_else(|_| unreachable!());
        let x = ipv4_candidate(&lo, 0);
        let new = |key| Overlay::new(RoutingConfig::default(), &network, key);

        // We hold x firmly; a lower key's tentative claim of x does not move us.
        let mut o = new(hi);
        o.joined(Duration::ZERO, 0);
        assert!(!o.announced(lo, claim(x, false)));
        assert_eq!(o.ipv4(), Some(x));
        // Its claim is in the table, but ours wins there too: it is not routed to it.
        assert_eq!(o.peer_view(&lo).0, None);
        // Firm against firm, same candidate index: the lower key keeps x, we move on.
        assert!(o.announced(lo, claim(x, true)));
        assert_eq!(o.ipv4(), Some(ipv4_candidate(&hi, 1)));
        assert_eq!(o.peer_view(&lo).0, Some(x));

        // Tentative (we found members when we joined), against a firm claim: we move,
        // whatever the keys.
        let mut o = new(lo);
        o.joined(Duration::ZERO, 2);
        assert!(o.announced(hi, claim(x, true)));
        assert_eq!(o.ipv4(), Some(ipv4_candidate(&lo, 1)));
        assert!(!o.status().firm, "one of two members announced");
        // Firm once every member we found announced, or after the settle time.
        let mut o2 = new(lo);
        o2.joined(Duration::ZERO, 2);
        assert_eq!(o2.poll_timeout(), Some(SETTLE_TIME));
        assert!(o2.handle_timeout(SETTLE_TIME));
        assert!(o2.status().firm);
    }

    fn udp(src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let builder = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                etherparse::PacketBuilder::ipv4(s.octets(), d.octets(), 64)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                etherparse::PacketBuilder::ipv6(s.octets(), d.octets(), 64)
            }
            _ => unreachable!(),
        };
        let builder = builder.udp(1, 2);
        let mut out = Vec::new();
        builder.write(&mut out, b"x").unwrap_or_else(|_| unreachable!());
        out
    }

    #[test]
    fn an_exit_node_never_forwards_to_a_member_address() {
        let network = Network::from_invite(&"Q".repeat(43)).unwrap_or_else(|_| unreachable!());
        let policy = RoutePolicy { serve_to: PeerFilter::members(), ..RoutePolicy::default() };
        let config =
            RoutingConfig { tun: true, advertise_exit: true, policy, ..Default::default() };
        let mut o = Overlay::new(config, &network, PublicIdentity::from_bytes([1; 32]));
        let k = PublicIdentity::from_bytes([2; 32]);
        let other = PublicIdentity::from_bytes([3; 32]);
        o.peer_up(k);
        o.announced(k, claim(ipv4_candidate(&k, 0), true));
        let from = IpAddr::V4(ipv4_candidate(&k, 0));
        assert!(o.inbound(&k, &udp(from, IpAddr::V4(Ipv4Addr::new(9, 9, 9, 9)))));
        assert!(!o.inbound(&k, &udp(from, IpAddr::V4(ipv4_candidate(&other, 0)))));
        let c = o.status().counters;
        assert_eq!((c.refused_unrouted, c.dropped_refused, c.received), (1, 1, 1));
    }
}
