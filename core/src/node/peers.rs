//! What the node knows of each other member: its connection, its link, its key and
//! trust, and the plain view of all that ([`PeerInfo`]) that user interfaces show.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::IpNet;

use super::fastpath::{FastPath, FastPathState};
use super::overlay::Overlay;
use crate::identity::Fingerprint;
use crate::peer::{LinkError, LinkState, PeerLink};
use crate::signal::PeerId;
use crate::trust::Trust;

/// A connection the node asked the driver to make ([`super::Output::Connect`]). Numbers
/// are never reused, so events of a replaced connection are recognised and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// ICE connectivity of a connection, as far as the platform tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IceState {
    /// Gathering or checking.
    Checking,
    /// A path works.
    Connected,
    /// The path stopped working; ICE may recover by itself.
    Disconnected,
    /// No path works (the platform may be restarting ICE).
    Failed,
}

/// A peer's connection, simplified for users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// WebRTC is connecting.
    Connecting,
    /// The handshake is running.
    Handshaking,
    /// Encrypted session over a direct path.
    Direct,
    /// Encrypted session through a TURN relay.
    Relayed,
    /// Failed; [`PeerInfo::reason`] says why.
    Failed,
}

impl PeerState {
    /// Lowercase name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Handshaking => "handshaking",
            Self::Direct => "direct",
            Self::Relayed => "relayed",
            Self::Failed => "failed",
        }
    }
}

/// How this side reaches the TURN server its end of a relayed path goes through (the
/// browser's `relayProtocol`): over UDP unless the network blocks it, then TCP, then TLS
/// (often on 443).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayTransport {
    /// TURN over UDP.
    Udp,
    /// TURN over TCP.
    Tcp,
    /// TURN over TLS (`turns:`).
    Tls,
}

impl RelayTransport {
    /// Lowercase name, as in JSON and the browser's stats (`udp`, `tcp`, `tls`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
        }
    }

    /// The transport named as [`RelayTransport::as_str`] names it (a browser's
    /// `relayProtocol`); `None` for anything else.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Udp, Self::Tcp, Self::Tls].into_iter().find(|t| t.as_str() == name)
    }

    /// The transport a STUN/TURN URL (RFC 7065) reaches its server over: `turns:` is TLS,
    /// `turn:` is UDP unless it says `?transport=tcp`. `None` for a URL that is no TURN URL.
    pub fn of_turn_url(url: &str) -> Option<Self> {
        let (scheme, rest) = url.split_once(':')?;
        let tcp = rest.split_once('?').is_some_and(|(_, query)| {
            query.split('&').any(|p| p.eq_ignore_ascii_case("transport=tcp"))
        });
        match scheme.to_ascii_lowercase().as_str() {
            "turns" => Some(Self::Tls),
            "turn" if tcp => Some(Self::Tcp),
            "turn" => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for RelayTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Udp => "TURN/UDP",
            Self::Tcp => "TURN/TCP",
            Self::Tls => "TURN/TLS",
        })
    }
}

/// Why a peer's connection failed. `Display` is for users.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerFailure {
    /// The encrypted link failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The connection closed again and again; the node gave up until the peer rejoins.
    #[error("the connection keeps dropping; gave up")]
    KeepsDropping,
    /// The passphrase check with this peer failed: it uses another passphrase (or is
    /// guessing). Retried with a growing wait.
    #[error("peer is not in the same network (wrong passphrase?): the passphrase check failed")]
    WrongPassphrase,
    /// ICE found no path (yet); it keeps trying.
    #[error("no network path to this peer; retrying (a TURN server in iceServers may help)")]
    NoPath,
}

/// What the node knows of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its id on the signaling server.
    pub peer_id: PeerId,
    /// Where its connection is.
    pub state: PeerState,
    /// Why it failed.
    pub reason: Option<PeerFailure>,
    /// Its display name, once said inside the session.
    pub name: Option<String>,
    /// Its key's fingerprint, once authenticated.
    pub fingerprint: Option<Fingerprint>,
    /// `new`, `known`, `verified` or `changed`.
    pub trust: Option<Trust>,
    /// For a relayed session whose relay is on our end: how we reach that TURN server.
    /// `None` when direct, or when only the peer's end is relayed (its transport to its
    /// relay is not visible here).
    pub relay_transport: Option<RelayTransport>,
    /// Another pinned name its name looks like, pinned to another key ("аlice" with a
    /// Cyrillic "а" for "alice"): show it loudly beside the name.
    pub looks_like: Option<String>,
    /// Round-trip time (session pings, or ICE).
    pub rtt: Option<Duration>,
    /// Its overlay IPv4 address, once it announced it (and nobody ranking higher claims
    /// the same).
    pub ipv4: Option<Ipv4Addr>,
    /// Its overlay IPv6 address, once it announced it.
    pub ipv6: Option<Ipv6Addr>,
    /// The subnet and exit routes of it that we accepted and use.
    pub routes: Vec<IpNet>,
    /// Packets it sent us with a source address not routed to it, dropped.
    pub dropped_spoofed: u64,
    /// Bytes sealed to it in the current session (what goes into the data channels).
    pub bytes_sent: u64,
    /// Bytes from it that authenticated, in the current session.
    pub bytes_received: u64,
    /// How long ago the current session's handshake completed (as of the node's latest
    /// input), once established.
    pub last_handshake: Option<Duration>,
    /// The fast UDP path between two native peers: `Up` when IP packets go as plain UDP
    /// on the selected pair, else they go on the data channel (`Unavailable` for a
    /// browser or a relayed pair, `Probing`, `Fallback` after it stopped answering).
    pub fast_path: FastPathState,
    /// What it asked of file transfer past the caps and was refused (and told why):
    /// `transfer::Refusals::of_peer`, over the node's life under this peer id.
    pub transfer_refusals: u64,
}

impl PeerInfo {
    /// A peer known by its id only, in `state`, nothing else known or counted yet (for
    /// drivers' and tests' own views).
    pub fn new(peer_id: PeerId, state: PeerState) -> Self {
        Self {
            peer_id,
            state,
            reason: None,
            name: None,
            fingerprint: None,
            trust: None,
            relay_transport: None,
            looks_like: None,
            rtt: None,
            ipv4: None,
            ipv6: None,
            routes: Vec::new(),
            dropped_spoofed: 0,
            bytes_sent: 0,
            bytes_received: 0,
            last_handshake: None,
            fast_path: FastPathState::default(),
            transfer_refusals: 0,
        }
    }
}

/// One other member of the room.
#[derive(Debug)]
pub(crate) struct PeerSlot {
    /// The current connection; events of others are ignored.
    pub conn: ConnId,
    pub link: PeerLink,
    pub ice: IceState,
    pub relayed: bool,
    pub relay_transport: Option<RelayTransport>,
    pub link_rtt: Option<Duration>,
    pub path_rtt: Option<Duration>,
    pub fingerprint: Option<Fingerprint>,
    pub trust: Option<Trust>,
    pub looks_like: Option<String>,
    pub failure: Option<PeerFailure>,
    /// Fresh connections made since the last established session.
    pub reconnects: u32,
    /// Its id is no longer in the room (it left, or either side's signaling connection
    /// was replaced), but its session works: kept until the connection closes or fails,
    /// or a new connection to the same key is established.
    pub orphan: bool,
    /// `PeerLeft` was reported for it.
    pub announced_left: bool,
    /// `PeerConnected` was reported for the current session.
    pub announced_up: bool,
    /// What was last reported by `Event::Peer`.
    pub shown: Option<PeerInfo>,
    /// When to look for a direct path for this relayed session.
    pub upgrade_due: Option<Duration>,
    /// How long to stay relayed before the next look.
    pub upgrade_wait: Duration,
    /// The pair the driver can send fast-path datagrams on (its last
    /// `ConnectionEvent::FastPath`).
    pub fast_pair: Option<u64>,
    /// The fast path's state machine.
    pub fast: FastPath,
}

impl PeerSlot {
    pub(crate) fn new(conn: ConnId, link: PeerLink, upgrade_first: Duration) -> Self {
        Self {
            conn,
            link,
            ice: IceState::Checking,
            relayed: false,
            relay_transport: None,
            link_rtt: None,
            path_rtt: None,
            fingerprint: None,
            trust: None,
            looks_like: None,
            failure: None,
            reconnects: 0,
            orphan: false,
            announced_left: false,
            announced_up: false,
            shown: None,
            upgrade_due: None,
            upgrade_wait: upgrade_first,
            fast_pair: None,
            fast: FastPath::new(),
        }
    }

    pub(crate) fn is_established(&self) -> bool {
        self.link.state() == LinkState::Established
    }

    /// What the node knows of it; `refusals`: what file transfer refused it.
    pub(crate) fn info(
        &self,
        peer_id: &PeerId,
        overlay: &Overlay,
        now: Duration,
        refusals: u64,
    ) -> PeerInfo {
        let (state, reason) = match self.link.state() {
            LinkState::Established if self.relayed => (PeerState::Relayed, None),
            LinkState::Established => (PeerState::Direct, None),
            LinkState::Handshaking => (PeerState::Handshaking, None),
            LinkState::Failed => (PeerState::Failed, self.failure.clone()),
            LinkState::Waiting if self.failure.is_some() => {
                (PeerState::Failed, self.failure.clone())
            }
            LinkState::Waiting if self.ice == IceState::Failed => {
                (PeerState::Failed, Some(PeerFailure::NoPath))
            }
            LinkState::Waiting => (PeerState::Connecting, None),
        };
        let stats = self.link.stats();
        let (ipv4, ipv6, routes, dropped_spoofed) = match self.link.peer_identity() {
            Some(key) => overlay.peer_view(key),
            None => (None, None, Vec::new(), 0),
        };
        PeerInfo {
            peer_id: peer_id.clone(),
            state,
            reason,
            name: self.link.peer_name().map(str::to_string),
            fingerprint: self.fingerprint,
            trust: self.trust,
            relay_transport: self.relay_transport.filter(|_| state == PeerState::Relayed),
            looks_like: self.looks_like.clone(),
            rtt: self.link_rtt.or(self.path_rtt),
            ipv4,
            ipv6,
            routes,
            dropped_spoofed,
            bytes_sent: stats.bytes_sent,
            bytes_received: stats.bytes_received,
            last_handshake: stats
                .established_at
                .filter(|_| self.is_established())
                .map(|at| now.saturating_sub(at)),
            fast_path: self.fast.state(),
            transfer_refusals: refusals,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RelayTransport;

    #[test]
    fn a_turn_url_says_how_its_server_is_reached() {
        let cases = [
            ("turn:198.51.100.1:3478", Some(RelayTransport::Udp)),
            ("turn:198.51.100.1:3478?transport=udp", Some(RelayTransport::Udp)),
            ("turn:relay.example:3478?transport=tcp", Some(RelayTransport::Tcp)),
            ("TURN:[2001:db8::1]:3478?Transport=TCP", Some(RelayTransport::Tcp)),
            ("turns:relay.example:443?transport=tcp", Some(RelayTransport::Tls)),
            ("turns:relay.example", Some(RelayTransport::Tls)),
            ("stun:198.51.100.1:3478", None),
            ("relay", None),
        ];
        for (url, want) in cases {
            assert_eq!(RelayTransport::of_turn_url(url), want, "{url}");
        }
        for t in [RelayTransport::Udp, RelayTransport::Tcp, RelayTransport::Tls] {
            assert_eq!(RelayTransport::from_name(t.as_str()), Some(t));
        }
        assert_eq!(RelayTransport::from_name("dtls"), None);
    }
}
