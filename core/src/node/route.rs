//! The routing table: which peer (by its long-term key, never by its server-assigned id)
//! carries packets for which prefix, the route announcements peers send each other inside
//! their encrypted sessions, and the local policy that accepts or refuses what they
//! announce. Longest prefix wins; ties are broken as [`RouteTable`] says. Design in
//! `core/ROUTING.md`.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::identity::{Fingerprint, PublicIdentity};
use crate::sorted::SortedMap;

/// Version of the announcement format.
pub const ANNOUNCEMENT_VERSION: u8 = 1;
/// Most routes one announcement carries.
pub const MAX_ANNOUNCED_ROUTES: usize = 255;

const FLAG_ACCEPTS_PACKETS: u8 = 0x01;
const FLAG_FIRM: u8 = 0x02;
const KNOWN_FLAGS: u8 = FLAG_ACCEPTS_PACKETS | FLAG_FIRM;

/// What a route is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    /// One of the peer's own overlay addresses (a /32 or /128).
    Own,
    /// A subnet behind the peer (`--advertise-routes`).
    Subnet,
    /// A default route (`0.0.0.0/0` or `::/0`): the peer offers to be an exit node.
    Exit,
}

impl RouteKind {
    fn to_byte(self) -> u8 {
        match self {
            Self::Own => 0,
            Self::Subnet => 1,
            Self::Exit => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Own),
            1 => Some(Self::Subnet),
            2 => Some(Self::Exit),
            _ => None,
        }
    }

    /// Lowercase name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Own => "own",
            Self::Subnet => "subnet",
            Self::Exit => "exit",
        }
    }
}

/// Everything a peer routes, as it announces it: sent inside the encrypted session on the
/// control channel (frame [`crate::frame::FRAME_ROUTES`]) when the session is established
/// and whenever it changes. Each announcement replaces the previous one.
///
/// ```text
/// version (1) | flags | count | count × (kind | family (4 or 6) | prefix length | address (4 or 16))
/// ```
///
/// Flags: `0x01` the sender takes IP packets (it has a TUN device), `0x02` its IPv4 claim
/// is firm (it heard every member it knew of; see `core/ROUTING.md`). Kinds: 0 own
/// address, 1 subnet, 2 exit (a default route).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Announcement {
    /// The sender takes IP packets (a native peer with a TUN device; not a browser).
    pub accepts_packets: bool,
    /// The sender's IPv4 claim is firm (see `core/ROUTING.md`, "Collisions").
    pub firm: bool,
    /// The routes.
    pub routes: Vec<(RouteKind, IpNet)>,
}

/// Why bytes are not an [`Announcement`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AnnouncementError {
    /// The input ends early or has bytes left over.
    #[error("truncated or overlong route announcement")]
    Length,
    /// Another version of the format.
    #[error("route announcement version {0} (this peer reads version {ANNOUNCEMENT_VERSION})")]
    Version(u8),
    /// Unknown flag bits.
    #[error("unknown route announcement flags {0:#04x}")]
    Flags(u8),
    /// An unknown route kind.
    #[error("unknown route kind {0}")]
    Kind(u8),
    /// A family other than 4 or 6.
    #[error("unknown address family {0}")]
    Family(u8),
    /// A prefix longer than its family allows, or with bits set past its length.
    #[error("invalid prefix")]
    Prefix,
    /// A kind whose prefix length does not fit it (an own address that is not a host
    /// route, an exit route that is not a default route, a default route as a subnet).
    #[error("a {0} route with prefix length {1}")]
    KindMismatch(&'static str, u8),
    /// More than [`MAX_ANNOUNCED_ROUTES`] routes.
    #[error("more than {MAX_ANNOUNCED_ROUTES} routes")]
    TooMany,
}

impl Announcement {
    /// The encoding.
    pub fn encode(&self) -> Result<Vec<u8>, AnnouncementError> {
        let count = u8::try_from(self.routes.len()).map_err(|_| AnnouncementError::TooMany)?;
        let mut flags = 0;
        if self.accepts_packets {
            flags |= FLAG_ACCEPTS_PACKETS;
        }
        if self.firm {
            flags |= FLAG_FIRM;
        }
        let mut out = vec![ANNOUNCEMENT_VERSION, flags, count];
        for (kind, net) in &self.routes {
            check_kind(*kind, net)?;
            out.push(kind.to_byte());
            match net.addr() {
                IpAddr::V4(a) => {
                    out.extend_from_slice(&[4, net.prefix_len()]);
                    out.extend_from_slice(&a.octets());
                }
                IpAddr::V6(a) => {
                    out.extend_from_slice(&[6, net.prefix_len()]);
                    out.extend_from_slice(&a.octets());
                }
            }
        }
        Ok(out)
    }

    /// Decodes untrusted bytes; never panics, allocates at most for 255 routes.
    pub fn decode(bytes: &[u8]) -> Result<Self, AnnouncementError> {
        let [version, flags, count, rest @ ..] = bytes else {
            return Err(AnnouncementError::Length);
        };
        let mut rest: &[u8] = rest;
        if *version != ANNOUNCEMENT_VERSION {
            return Err(AnnouncementError::Version(*version));
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(AnnouncementError::Flags(*flags));
        }
        let mut routes = Vec::with_capacity(usize::from(*count));
        for _ in 0..*count {
            let &[kind, family, len, ref tail @ ..] = rest else {
                return Err(AnnouncementError::Length);
            };
            let kind = RouteKind::from_byte(kind).ok_or(AnnouncementError::Kind(kind))?;
            let (addr, tail): (IpAddr, &[u8]) = match family {
                4 => {
                    let (a, t) = tail.split_first_chunk::<4>().ok_or(AnnouncementError::Length)?;
                    ((*a).into(), t)
                }
                6 => {
                    let (a, t) = tail.split_first_chunk::<16>().ok_or(AnnouncementError::Length)?;
                    ((*a).into(), t)
                }
                f => return Err(AnnouncementError::Family(f)),
            };
            let net = IpNet::new(addr, len).map_err(|_| AnnouncementError::Prefix)?;
            if net.trunc() != net {
                return Err(AnnouncementError::Prefix);
            }
            check_kind(kind, &net)?;
            routes.push((kind, net));
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(AnnouncementError::Length);
        }
        Ok(Self {
            accepts_packets: flags & FLAG_ACCEPTS_PACKETS != 0,
            firm: flags & FLAG_FIRM != 0,
            routes,
        })
    }
}

fn check_kind(kind: RouteKind, net: &IpNet) -> Result<(), AnnouncementError> {
    let len = net.prefix_len();
    let ok = match kind {
        RouteKind::Own => len == net.max_prefix_len(),
        RouteKind::Exit => len == 0,
        RouteKind::Subnet => len > 0,
    };
    if ok { Ok(()) } else { Err(AnnouncementError::KindMismatch(kind.as_str(), len)) }
}

/// A peer as the user names it on a command line (`--allow`, `--exit-node`,
/// `--accept-routes`): the display name its key is pinned under in the trust store, its
/// safety code (the 30 digits, spaces optional), or 8 to 64 hex digits of its key's
/// fingerprint. Matched against a peer's key and the name that key is pinned under, so a
/// name never lets in another key than the one pinned for it (trust on first use: the first
/// key seen under a name is pinned; see [`crate::trust`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRef(String);

/// Why a word names no peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerRefError {
    /// Nothing but spaces.
    #[error("an empty peer name")]
    Empty,
}

impl PeerRef {
    /// The word, trimmed.
    pub fn new(word: &str) -> Result<Self, PeerRefError> {
        let word = word.trim();
        if word.is_empty() {
            return Err(PeerRefError::Empty);
        }
        Ok(Self(word.to_string()))
    }

    /// The word as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this names the peer with key `fingerprint`, pinned under `pinned_name` (if
    /// its key is the one pinned for that name).
    pub fn matches(&self, fingerprint: &Fingerprint, pinned_name: Option<&str>) -> bool {
        let word = self.0.as_str();
        if pinned_name == Some(word) {
            return true;
        }
        // A safety code without spaces is also hex: both are tried.
        let hex = word.to_ascii_lowercase();
        let is_hex = (8..=64).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit());
        if is_hex && fingerprint.to_hex().starts_with(&hex) {
            return true;
        }
        let digits = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
        let only_code = word.chars().all(|c| c.is_ascii_digit() || c == ' ');
        only_code && digits(word) == digits(&fingerprint.short_code())
    }
}

impl PeerRef {
    /// Whether this names the member `info` describes: by the name its key is pinned
    /// under (not once its key changed: then only its key names it), by its key
    /// (fingerprint or safety code), or by its peer id for this session. Every command that
    /// takes a peer (`send --to`, `receive --accept-from`, `msg`, `trust`, `--allow`)
    /// resolves it this one way.
    pub fn names(&self, info: &super::PeerInfo) -> bool {
        if info.peer_id.as_str() == self.0 {
            return true;
        }
        let Some(fp) = &info.fingerprint else { return false };
        self.matches(fp, super::pinned_name(info.trust, info.name.as_deref()).as_deref())
    }

    /// Whether this is `info`'s display name while its key is not the one pinned for that
    /// name: the user named a peer whose key changed, which only its key can name now.
    pub fn names_changed_key(&self, info: &super::PeerInfo) -> bool {
        matches!(info.trust, Some(crate::trust::Trust::Changed { .. }))
            && info.name.as_deref() == Some(self.0.as_str())
    }
}

impl fmt::Display for PeerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which peers a rule lets in: every member (if `members`), verified peers (if `verified`),
/// the listed keys, and the peers the user named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFilter {
    /// Every member of the network.
    pub members: bool,
    /// Peers whose key the user verified (compared short codes).
    pub verified: bool,
    /// These keys, verified or not.
    pub keys: Vec<Fingerprint>,
    /// These peers, by pinned name, safety code or fingerprint, verified or not.
    pub named: Vec<PeerRef>,
}

impl PeerFilter {
    /// Verified peers only (the default).
    pub fn verified() -> Self {
        Self { members: false, verified: true, keys: Vec::new(), named: Vec::new() }
    }

    /// Nobody.
    pub fn nobody() -> Self {
        Self { members: false, verified: false, keys: Vec::new(), named: Vec::new() }
    }

    /// Every member.
    pub fn members() -> Self {
        Self { members: true, ..Self::nobody() }
    }

    /// Whether a peer with this key, verified or not, pinned under `pinned_name` (when its
    /// key is the pinned one), is let in.
    pub fn allows(
        &self,
        fingerprint: &Fingerprint,
        verified: bool,
        pinned_name: Option<&str>,
    ) -> bool {
        self.members
            || (self.verified && verified)
            || self.keys.iter().any(|k| k == fingerprint)
            || self.named.iter().any(|r| r.matches(fingerprint, pinned_name))
    }
}

impl Default for PeerFilter {
    fn default() -> Self {
        Self::verified()
    }
}

/// What this node accepts from others and lets them do. Own addresses are accepted from
/// every member (checked against its key); the rest is up to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePolicy {
    /// Whose subnet routes are installed. Default: verified peers.
    pub subnets_from: PeerFilter,
    /// Whose exit-node offer (default routes) is installed. Default: verified peers.
    pub exit_from: PeerFilter,
    /// Who may send packets through this node to the subnets and exit it advertises.
    /// Default: verified peers.
    pub serve_to: PeerFilter,
    /// Who may send packets to this node's own overlay addresses. Default: every member.
    pub own_to: PeerFilter,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        Self {
            subnets_from: PeerFilter::verified(),
            exit_from: PeerFilter::verified(),
            serve_to: PeerFilter::verified(),
            own_to: PeerFilter::members(),
        }
    }
}

/// One route: a prefix, what it is, and the key of the peer that carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The destinations.
    pub prefix: IpNet,
    /// What the route is for.
    pub kind: RouteKind,
    /// The peer that carries it.
    pub peer: PublicIdentity,
}

/// How a candidate route ranks against others for the same prefix (lower wins): kind
/// (own before subnet before exit), then firm claims before tentative ones, then the
/// lower IPv4 candidate index (own addresses), then peers with a session before those
/// without, then the lower key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Rank {
    pub kind: RouteKind,
    pub tentative: bool,
    pub candidate: u32,
    pub offline: bool,
    pub peer: PublicIdentity,
}

/// A longest-prefix-match table over IPv4 and IPv6 routes, keyed by peers' keys.
///
/// Lookups go from the longest prefix length present to the shortest, one hash lookup
/// each. Several peers may announce the same prefix: the one with the lowest [`Rank`]
/// wins, the others are kept as losers (shown, not used) so that a winner's departure
/// needs no new announcement.
#[derive(Default, Clone)]
pub struct RouteTable {
    v4: Vec<(u8, HashMap<u32, Route>)>,
    v6: Vec<(u8, HashMap<u128, Route>)>,
    /// Every candidate route, winners and losers, by prefix then rank.
    all: SortedMap<IpNet, Vec<(Rank, Route)>>,
}

impl fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteTable").field("prefixes", &self.all.len()).finish_non_exhaustive()
    }
}

fn mask4(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask6(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl RouteTable {
    /// A table of these candidate routes.
    pub(crate) fn build(candidates: Vec<(Rank, Route)>) -> Self {
        let mut all: SortedMap<IpNet, Vec<(Rank, Route)>> = SortedMap::new();
        for (rank, route) in candidates {
            all.entry(route.prefix).or_default().push((rank, route));
        }
        let mut v4: SortedMap<u8, HashMap<u32, Route>> = SortedMap::new();
        let mut v6: SortedMap<u8, HashMap<u128, Route>> = SortedMap::new();
        for (prefix, routes) in all.iter_mut() {
            crate::sorted::sort_by(routes, |a, b| a.0.cmp(&b.0));
            // Only packets are looked up: a build without TUN devices (the browser's)
            // keeps no index, and its module no hash maps for one.
            if !cfg!(feature = "tun") {
                continue;
            }
            let Some((_, winner)) = routes.first() else { continue };
            match prefix {
                IpNet::V4(n) => {
                    v4.entry(n.prefix_len())
                        .or_default()
                        .insert(u32::from(n.network()), winner.clone());
                }
                IpNet::V6(n) => {
                    v6.entry(n.prefix_len())
                        .or_default()
                        .insert(u128::from(n.network()), winner.clone());
                }
            }
        }
        Self { v4: v4.into_iter().rev().collect(), v6: v6.into_iter().rev().collect(), all }
    }

    /// The route for `dst`: the longest prefix containing it, and of those announced for
    /// that prefix, the best ranked. Always `None` without the `tun` feature (nothing
    /// routes packets there).
    pub fn lookup(&self, dst: IpAddr) -> Option<&Route> {
        match dst {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().find_map(|(len, m)| m.get(&(a & mask4(*len))))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().find_map(|(len, m)| m.get(&(a & mask6(*len))))
            }
        }
    }

    /// Every route, by prefix, with whether it is the one in use for its prefix.
    pub fn routes(&self) -> impl Iterator<Item = (&Route, bool)> {
        self.all.values().flat_map(|rs| rs.iter().enumerate().map(|(i, (_, r))| (r, i == 0)))
    }

    /// The routes of one peer in use.
    pub fn routes_of(&self, peer: &PublicIdentity) -> Vec<IpNet> {
        self.routes().filter(|(r, used)| *used && r.peer == *peer).map(|(r, _)| r.prefix).collect()
    }

    /// How many prefixes the table has.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    fn key(b: u8) -> PublicIdentity {
        PublicIdentity::from_bytes([b; 32])
    }

    fn rank(kind: RouteKind, offline: bool, peer: u8) -> Rank {
        Rank { kind, tentative: false, candidate: 0, offline, peer: key(peer) }
    }

    /// The table against the obvious model: among the routes containing the address, the
    /// longest prefix, then the lowest rank.
    fn model(routes: &[(Rank, Route)], dst: IpAddr) -> Option<PublicIdentity> {
        routes
            .iter()
            .filter(|(_, r)| r.prefix.contains(&dst))
            .max_by(|(ra, a), (rb, b)| {
                a.prefix.prefix_len().cmp(&b.prefix.prefix_len()).then(rb.cmp(ra))
            })
            .map(|(_, r)| r.peer)
    }

    proptest! {
        #[test]
        fn lookup_matches_the_model(
            entries in prop::collection::vec((any::<u32>(), 0u8..=32, 0u8..4, any::<bool>(), 0u8..3), 0..40),
            probes in prop::collection::vec(any::<u32>(), 1..40),
        ) {
            let routes: Vec<(Rank, Route)> = entries
                .iter()
                .map(|(addr, len, peer, offline, kind)| {
                    let kind = [RouteKind::Own, RouteKind::Subnet, RouteKind::Exit][usize::from(*kind)];
                    let prefix = IpNet::new(IpAddr::V4(Ipv4Addr::from(*addr)), *len).unwrap().trunc();
                    (rank(kind, *offline, *peer), Route { prefix, kind, peer: key(*peer) })
                })
                .collect();
            let table = RouteTable::build(routes.clone());
            for p in probes.iter().copied().chain(entries.iter().map(|e| e.0)) {
                let dst = IpAddr::V4(Ipv4Addr::from(p));
                prop_assert_eq!(table.lookup(dst).map(|r| r.peer), model(&routes, dst));
            }
        }

        #[test]
        fn announcements_round_trip_and_decoding_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..300),
            routes in prop::collection::vec((any::<u128>(), 1u8..=128, any::<bool>()), 0..20),
            flags in 0u8..4,
        ) {
            let _ = Announcement::decode(&bytes);
            let routes: Vec<(RouteKind, IpNet)> = routes
                .iter()
                .map(|(a, len, v4)| {
                    let net = if *v4 {
                        IpNet::new(IpAddr::V4(Ipv4Addr::from(*a as u32)), (*len).min(32))
                    } else {
                        IpNet::new(IpAddr::V6(Ipv6Addr::from(*a)), *len)
                    };
                    let net = net.unwrap().trunc();
                    let kind = if net.prefix_len() == net.max_prefix_len() { RouteKind::Own } else { RouteKind::Subnet };
                    (kind, net)
                })
                .collect();
            let a = Announcement { accepts_packets: flags & 1 != 0, firm: flags & 2 != 0, routes };
            let encoded = a.encode().unwrap();
            prop_assert_eq!(Announcement::decode(&encoded).unwrap(), a);
            // Every strict prefix of a valid encoding is refused.
            for cut in 0..encoded.len() {
                prop_assert!(Announcement::decode(&encoded[..cut]).is_err());
            }
        }
    }

    #[test]
    fn the_decoder_refuses_what_does_not_fit() {
        let ok = Announcement {
            accepts_packets: true,
            firm: false,
            routes: vec![(RouteKind::Exit, "0.0.0.0/0".parse().unwrap())],
        };
        let bytes = ok.encode().unwrap();
        assert_eq!(bytes, [1, 1, 1, 2, 4, 0, 0, 0, 0, 0]);
        let refused = |b: &[u8]| Announcement::decode(b).unwrap_err();
        assert_eq!(refused(&[2, 0, 0]), AnnouncementError::Version(2));
        assert_eq!(refused(&[1, 4, 0]), AnnouncementError::Flags(4));
        assert_eq!(refused(&[1, 0, 1, 9, 4, 0, 0, 0, 0, 0]), AnnouncementError::Kind(9));
        assert_eq!(refused(&[1, 0, 1, 1, 5, 0, 0, 0, 0, 0]), AnnouncementError::Family(5));
        // Host bits past the length, a length past the family's.
        assert_eq!(refused(&[1, 0, 1, 1, 4, 8, 10, 0, 0, 1]), AnnouncementError::Prefix);
        assert_eq!(refused(&[1, 0, 1, 1, 4, 33, 10, 0, 0, 0]), AnnouncementError::Prefix);
        // An own address that is not a host route; an exit that is not a default route; a
        // default route as a subnet.
        assert!(matches!(
            refused(&[1, 0, 1, 0, 4, 8, 10, 0, 0, 0]),
            AnnouncementError::KindMismatch(..)
        ));
        assert!(matches!(
            refused(&[1, 0, 1, 2, 4, 8, 10, 0, 0, 0]),
            AnnouncementError::KindMismatch(..)
        ));
        assert!(matches!(
            refused(&[1, 0, 1, 1, 4, 0, 0, 0, 0, 0]),
            AnnouncementError::KindMismatch(..)
        ));
        // Trailing bytes.
        assert_eq!(refused(&[bytes.as_slice(), &[0]].concat()), AnnouncementError::Length);
        let too_many = Announcement {
            routes: vec![(RouteKind::Exit, "::/0".parse().unwrap()); 256],
            ..Announcement::default()
        };
        assert_eq!(too_many.encode(), Err(AnnouncementError::TooMany));
    }

    #[test]
    fn a_peer_is_named_by_its_pinned_name_safety_code_or_fingerprint() {
        let fp = key(7).fingerprint();
        let word = |w: &str| PeerRef::new(w).unwrap_or_else(|_| unreachable!());
        let hex = fp.to_hex();
        let code = fp.short_code();
        assert!(word(" bea ").matches(&fp, Some("bea")), "trimmed");
        assert!(!word("bea").matches(&fp, None), "a name counts only where it is pinned");
        assert!(!word("bea").matches(&fp, Some("cy")));
        assert!(word(&hex).matches(&fp, None));
        assert!(word(&hex[..8].to_uppercase()).matches(&fp, None));
        assert!(!word(&hex[..7]).matches(&fp, None), "8 hex digits at least");
        assert!(word(&code).matches(&fp, None));
        assert!(word(&code.replace(' ', "")).matches(&fp, None));
        assert!(!word(&code[..11]).matches(&fp, None), "the whole code");
        assert!(!word(&hex).matches(&key(8).fingerprint(), None));
        assert_eq!(PeerRef::new("  "), Err(PeerRefError::Empty));
        let filter = PeerFilter { named: vec![word(&code)], ..PeerFilter::nobody() };
        assert!(filter.allows(&fp, false, None));
        assert!(!filter.allows(&key(8).fingerprint(), true, None));
        assert!(PeerFilter::members().allows(&key(8).fingerprint(), false, None));
    }

    #[test]
    fn ties_rank_kind_then_firmness_then_candidate_then_sessions_then_key() {
        let p: IpNet = "10.1.0.0/16".parse().unwrap();
        let route = |peer: u8| Route { prefix: p, kind: RouteKind::Subnet, peer: key(peer) };
        let online_high = (rank(RouteKind::Subnet, false, 9), route(9));
        let offline_low = (rank(RouteKind::Subnet, true, 1), route(1));
        let table = RouteTable::build(vec![offline_low.clone(), online_high.clone()]);
        let dst = "10.1.2.3".parse().unwrap();
        assert_eq!(table.lookup(dst).map(|r| r.peer), Some(key(9)), "a session first");
        let online_low = (rank(RouteKind::Subnet, false, 1), route(1));
        let table = RouteTable::build(vec![online_high, online_low]);
        assert_eq!(table.lookup(dst).map(|r| r.peer), Some(key(1)), "then the lower key");
        let used: Vec<bool> = table.routes().map(|(_, used)| used).collect();
        assert_eq!(used, [true, false]);
    }
}
