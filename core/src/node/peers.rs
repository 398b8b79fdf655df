//! What the node knows of each other member: its connection, its link, its key and
//! trust, and the plain view of all that ([`PeerInfo`]) that user interfaces show.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::IpNet;

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
}

/// One other member of the room.
#[derive(Debug)]
pub(crate) struct PeerSlot {
    /// The current connection; events of others are ignored.
    pub conn: ConnId,
    pub link: PeerLink,
    pub ice: IceState,
    pub relayed: bool,
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
}

impl PeerSlot {
    pub(crate) fn new(conn: ConnId, link: PeerLink, upgrade_first: Duration) -> Self {
        Self {
            conn,
            link,
            ice: IceState::Checking,
            relayed: false,
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
        }
    }

    pub(crate) fn is_established(&self) -> bool {
        self.link.state() == LinkState::Established
    }

    pub(crate) fn info(&self, peer_id: &PeerId, overlay: &Overlay) -> PeerInfo {
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
            looks_like: self.looks_like.clone(),
            rtt: self.link_rtt.or(self.path_rtt),
            ipv4,
            ipv6,
            routes,
            dropped_spoofed,
        }
    }
}
