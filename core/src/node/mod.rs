//! One node of the overlay: every decision above a single link, once, for every platform.
//!
//! A [`Node`] owns the signaling client's policy (join, heartbeat, reconnect with
//! backoff), one [`PeerLink`] per other member with the connection policy around it
//! (which peers to connect, when a connection is rebuilt or given up, orphans that
//! outlive a server restart), trust on first use with verification, and the file-transfer
//! [`Engine`] with its wire glue (encoding, batching small frames into one packet),
//! progress and record-save throttling and upload pacing. It is sans-IO in the shape of
//! str0m's `Rtc` and quinn-proto's `Endpoint`:
//!
//! ```text
//! driver                                         Node
//!   WebSocket / RTCPeerConnection / disk  ── handle_input(now, Input, rng) ──▶
//!   user asks                             ── send_message / offer / accept / verify_peer ..
//!                                         ◀── poll_output(): Output (open a socket or a
//!                                              connection, transmit, read, write, save,
//!                                              events for the user)
//!                                         ◀── poll_timeout(): when to call
//!                                              handle_input(now, Input::Timeout, rng)
//! ```
//!
//! The driver never encodes or decodes a protocol message: it moves signaling text and
//! channel bytes, makes the WebRTC connections it is told to (numbered by [`ConnId`]),
//! and does the file I/O. Time is a [`Duration`] since the driver's epoch; randomness
//! comes from the driver. Connections are numbered so that events of a replaced one are
//! ignored. See `core/NODE.md` for the policy and why.
//!
//! The overlay's IP routing lives here too (`overlay.rs`, `route.rs`, `address.rs`,
//! `ip.rs`): addresses, route announcements, the longest-prefix table keyed by peers'
//! keys, cryptokey routing of packets between the TUN ([`Input::TunPacket`],
//! [`Output::TunWrite`]) and the peers' data channels. See `core/ROUTING.md`.

mod accept;
mod address;
#[cfg(feature = "dns")]
pub mod dns;
mod fastpath;
mod files;
mod ip;
mod limits;
mod names;
mod overlay;
mod pake;
mod peers;
mod route;
mod signaling;

use std::collections::VecDeque;
use std::time::Duration;

use hpke::rand_core::CryptoRng;

pub use self::accept::{AcceptPolicy, DeclineReason, OfferVerdict};
pub use self::address::{
    MAX_IPV4_CANDIDATES, OVERLAY_IPV4, RESOLVER_V4, ipv4_candidate, ipv4_candidate_index,
    ipv6_address, ipv6_interface_id, ipv6_prefix,
};
pub use self::fastpath::{
    DEAD_AFTER, FastPath, FastPathMessage, FastPathMessageError, FastPathState, KEEPALIVE,
    PROBE_FIRST_INTERVAL, PROBE_MAX_INTERVAL,
};
pub use self::files::{
    DownloadStore, DownloadView, FileEvent, IncomingView, OfferState, OutgoingView, SavedTo,
    TransfersView,
};
pub use self::limits::{ConnectionLimits, TransferLimits};
pub use self::names::FileNames;
pub use self::overlay::{
    ICMP_ERRORS_PER_SECOND, OverlayStatus, RouteCounters, RouteView, RoutingConfig, SETTLE_TIME,
};
pub use self::peers::{ConnId, IceState, PeerFailure, PeerInfo, PeerState, RelayTransport};
pub use self::route::{
    ANNOUNCEMENT_VERSION, Announcement, AnnouncementError, MAX_ANNOUNCED_ROUTES, PeerFilter,
    PeerRef, PeerRefError, Route, RouteKind, RoutePolicy, RouteTable,
};
pub use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use self::overlay::{Outbound, Overlay};

use self::files::{FileGlue, Outgoing, PacedRead};
use self::peers::PeerSlot;
use self::signaling::{SignalingChange, SignalingClient, SocketAction};
use crate::identity::{Fingerprint, IdentityKeyPair, PublicIdentity};
use crate::network::Network;
use crate::peer::{LinkError, LinkEvent, LinkState, PeerLink, PeerLinkConfig, is_polite};
use crate::signal::{
    ClientMessage, ErrorCode, IceServer, MembershipEvent, PeerId, RoomId, SignalPayload,
};
use crate::sorted::{SortedMap, SortedSet};
use crate::transfer::{
    CancelReason, Cv, DownloadRecord, DownloadState, Engine, EngineConfig, FailReason, OfferItem,
    Output as EngineOutput, Root, ShareFailReason, TransferError, TransferEvent,
};
use crate::trust::{Trust, TrustStore};

/// File-transfer messages up to this size go several to one packet per peer.
const BATCH_FRAME: usize = 1024;
/// A batch of small frames is sealed once it reaches this size.
const BATCH_BYTES: usize = 16 * 1024;

/// Timing and limits of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeTiming {
    /// How often the server is pinged; two unanswered pings mean the connection is dead.
    pub heartbeat: Duration,
    /// How long opening the signaling connection may take.
    pub connect_timeout: Duration,
    /// Fresh connections made for one peer after its connection closed or went silent,
    /// before giving up until it rejoins.
    pub max_reconnects: u32,
    /// Least time between two progress reports of one file (or one upload).
    pub progress_every: Duration,
    /// Least time between two saves of the download records.
    pub save_every: Duration,
    /// How often the selected path of each connection is read.
    pub path_every: Duration,
    /// How long a session stays relayed before the node looks for a direct path (an ICE
    /// restart, which keeps the relayed path until a better one works); each attempt that
    /// finds none doubles the wait, up to [`NodeTiming::upgrade_max`].
    pub upgrade_first: Duration,
    /// The longest wait between two looks for a direct path.
    pub upgrade_max: Duration,
    /// Attempts the first join gets: if the node was never in the room after this many
    /// (the server unreachable, or refusing us), it stops with
    /// [`StopReason::Unreachable`] or [`StopReason::Refused`] instead of retrying, so a
    /// caller waiting for the join learns why within bounded time. `None`: retry forever.
    pub first_join_attempts: Option<u32>,
}

impl Default for NodeTiming {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            max_reconnects: 5,
            progress_every: PROGRESS_EVERY,
            save_every: Duration::from_millis(500),
            path_every: Duration::from_secs(2),
            upgrade_first: Duration::from_secs(5),
            upgrade_max: Duration::from_secs(600),
            first_join_attempts: None,
        }
    }
}

/// What a node is.
#[derive(Debug)]
pub struct NodeConfig {
    /// Our long-term key.
    pub identity: IdentityKeyPair,
    /// The network (its room, PSK).
    pub network: Network,
    /// Our display name.
    pub name: String,
    /// The network's trust store, as saved.
    pub trust: TrustStore,
    /// Where downloads go.
    pub downloads: DownloadStore,
    /// The first offer number; random, so a restarted node's offers do not collide with
    /// its earlier ones.
    pub first_offer_id: u64,
    /// Timing of the node.
    pub timing: NodeTiming,
    /// Timing of each link.
    pub link: PeerLinkConfig,
    /// Tuning of the transfer engine.
    pub engine: EngineConfig,
    /// STUN/TURN servers the user chose (`iceServers`, `--ice-server`): used instead of
    /// the ones the signaling server hands out. `None`: the server's.
    pub ice_servers: Option<Vec<IceServer>>,
    /// Overlay IP: whether we have a TUN device, what we advertise, what we accept.
    pub routing: RoutingConfig,
    /// How many signaling servers the driver was given (processes of one cluster, say):
    /// the node connects to the first and, each time a connection is lost or cannot be
    /// made, tries the next, round the list ([`Output::SignalingConnect`]).
    pub signaling_servers: usize,
}

impl NodeConfig {
    /// A configuration with default timing.
    pub fn new(
        identity: IdentityKeyPair,
        network: Network,
        name: impl Into<String>,
        trust: TrustStore,
        downloads: DownloadStore,
        first_offer_id: u64,
    ) -> Self {
        Self {
            identity,
            network,
            name: name.into(),
            trust,
            downloads,
            first_offer_id,
            timing: NodeTiming::default(),
            link: PeerLinkConfig::default(),
            engine: EngineConfig::default(),
            ice_servers: None,
            routing: RoutingConfig::default(),
            signaling_servers: 1,
        }
    }
}

/// Which data channel of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Channel 0: reliable and ordered (handshake, messages, file transfer).
    Control,
    /// Channel 1: unordered and unreliable (IP packets).
    Data,
}

impl Channel {
    /// Both channels, in stream-id order.
    pub const ALL: [Channel; 2] = [Channel::Control, Channel::Data];

    /// Its negotiated SCTP stream id (both sides create the channels themselves, with
    /// these ids, so neither waits for the other's `DATA_CHANNEL_OPEN`).
    pub fn id(self) -> u16 {
        match self {
            Channel::Control => 0,
            Channel::Data => 1,
        }
    }

    /// Its label.
    pub fn label(self) -> &'static str {
        match self {
            Channel::Control => "control",
            Channel::Data => "data",
        }
    }

    /// Whether it delivers in order and retransmits; the data channel does neither (no
    /// retransmits at all), as IP below TCP must not.
    pub fn reliable(self) -> bool {
        matches!(self, Channel::Control)
    }
}

/// Least time between two progress reports of one file: downloads and uploads (the node's
/// [`NodeTiming::progress_every`] by default) and the drivers' hashing before an offer.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// How long the polite side of a new connection waits for the impolite side's offer
/// before making its own (in case the impolite side never learned of it).
pub const POLITE_OFFER_WAIT: Duration = Duration::from_secs(3);

/// What happened to a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// The connection wants this sent to the remote peer (offer, answer, candidate).
    LocalSignal(SignalPayload),
    /// The control channel opened; the connection's descriptions, whose DTLS
    /// fingerprints the handshake binds to.
    ControlOpen {
        /// The local description's SDP.
        local_sdp: String,
        /// The remote description's SDP.
        remote_sdp: String,
    },
    /// Bytes arrived on either channel.
    Received(Vec<u8>),
    /// ICE connectivity changed (where the platform says).
    Ice(IceState),
    /// A reading of the selected path.
    Path {
        /// Either end is a TURN relay candidate.
        relayed: bool,
        /// When our end is a relay candidate, how we reach its TURN server.
        relay_transport: Option<RelayTransport>,
        /// STUN round-trip time of the pair, when measured.
        rtt: Option<Duration>,
    },
    /// Whether the driver can send datagrams straight on the selected ICE pair's socket
    /// to its remote address (the fast path, [`Output::FastPathSend`]): `Some(pair)` names
    /// the pair (a new value is a new pair), `None` if it cannot (no pair yet, a relayed or
    /// TCP pair, a platform without raw sockets: a browser never reports it).
    FastPath {
        /// The pair, as the driver numbers them.
        pair: Option<u64>,
    },
    /// The connection failed or closed; it carries nothing any more.
    Closed {
        /// Why, for logs.
        reason: String,
    },
    /// The remote peer offered something this connection cannot take (a new DTLS
    /// transport, or an offer crossing ours on the polite side): the node replaces the
    /// connection and gives the new one this offer.
    RemoteRestarted(SignalPayload),
}

/// Why a chunk could not be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteFailure {
    /// No space left on the disk.
    DiskFull,
    /// The browser's storage quota is used up (or the disk is full).
    QuotaExceeded,
    /// There is nowhere to store downloads (the browser's storage cannot be opened).
    NoStorage(String),
    /// The streamed download could not be started.
    StreamNotStarted(String),
    /// A write larger than the writer takes (a driver bug).
    TooLarge,
    /// Anything else, in the platform's words.
    Other(String),
}

/// Something the driver saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The signaling WebSocket opened.
    SignalingOpened,
    /// A text frame from the server.
    SignalingText(String),
    /// The signaling WebSocket closed or could not be opened.
    SignalingClosed {
        /// Why, in plain words.
        reason: String,
    },
    /// Something happened to connection `conn`.
    Connection {
        /// Which one.
        conn: ConnId,
        /// What.
        event: ConnectionEvent,
    },
    /// An [`Output::Read`] finished.
    ReadDone {
        /// For whom.
        peer: PeerId,
        /// Which file.
        root: Root,
        /// Which chunk.
        index: u32,
        /// The bytes, or why not (in the platform's words).
        result: Result<Vec<u8>, String>,
    },
    /// An [`Output::Write`] finished. A driver that does not sync every write syncs the
    /// file before it persists a record that claims the chunk ([`Output::SaveRecords`]).
    WriteDone {
        /// Which file.
        root: Root,
        /// Which chunk.
        index: u32,
        /// Whether it worked.
        result: Result<(), WriteFailure>,
    },
    /// Storing the download `root` failed as a whole (its stream could not be opened,
    /// say): it fails.
    StoreFailed {
        /// Which file.
        root: Root,
        /// Why.
        failure: WriteFailure,
    },
    /// An [`Output::SaveRecords`] finished, whether or not every record could be saved
    /// (a driver tells the user of one that could not; the next save tries again).
    RecordsSaved,
    /// An [`Output::FinishFile`] finished.
    FileSaved {
        /// Which file.
        root: Root,
        /// Where it is, or why it could not be put there.
        result: Result<SavedTo, String>,
    },
    /// An IP packet read from the TUN device (the OS sends it into the overlay). The node
    /// seals it to the peer its destination routes to ([`Output::Transmit`] on the data
    /// channel), or answers with an ICMP error ([`Output::TunWrite`]).
    TunPacket(Vec<u8>),
    /// The host's resolvers' reply to an [`Output::DnsForward`], or `None` if none
    /// answered in time (the node then answers SERVFAIL). Only with the `dns` feature.
    DnsForwarded {
        /// The forward's id.
        id: u64,
        /// The reply, as received.
        reply: Option<Vec<u8>>,
    },
    /// [`Node::poll_timeout`] passed.
    Timeout,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Open the signaling WebSocket to the `server`th of the driver's signaling servers
    /// (see [`NodeConfig::signaling_servers`]; closing any open one), then report
    /// [`Input::SignalingOpened`], texts, and [`Input::SignalingClosed`].
    SignalingConnect {
        /// Which server, from 0.
        server: usize,
    },
    /// Send this text on the signaling WebSocket.
    SignalingSend(String),
    /// Close the signaling WebSocket (no [`Input::SignalingClosed`] needed).
    SignalingClose,
    /// Make a WebRTC connection to `peer` with the two negotiated channels; `polite` is
    /// our role in perfect negotiation (the impolite side offers first).
    Connect {
        /// Its number, for every event and command.
        conn: ConnId,
        /// To whom.
        peer: PeerId,
        /// Our role.
        polite: bool,
        /// The STUN/TURN servers to gather candidates with (see [`NodeConfig::ice_servers`]).
        ice_servers: Vec<IceServer>,
    },
    /// Apply this remote description or candidate to `conn`.
    Signal {
        /// Which connection.
        conn: ConnId,
        /// What the remote peer sent.
        payload: SignalPayload,
    },
    /// Send `bytes` on `channel` of `conn`.
    Transmit {
        /// Which connection.
        conn: ConnId,
        /// Which channel.
        channel: Channel,
        /// The sealed packet.
        bytes: Vec<u8>,
    },
    /// Send `bytes` (a sealed fast-path packet) as one UDP datagram on the selected ICE
    /// pair of `conn` (the one its last [`ConnectionEvent::FastPath`] named); drop it if
    /// there is none. Only after the driver reported such a pair.
    FastPathSend {
        /// Which connection.
        conn: ConnId,
        /// The sealed packet.
        bytes: Vec<u8>,
    },
    /// Close `conn` and forget it. `graceful`: let what was sent on it go first (we are
    /// leaving and said Close).
    Disconnect {
        /// Which connection.
        conn: ConnId,
        /// Flush first.
        graceful: bool,
    },
    /// Look for a better path for `conn` without dropping the one it has: take these
    /// STUN/TURN servers (fresh credentials) and restart ICE. Only the impolite side asks
    /// (it offers), so both sides never restart at once.
    RestartIce {
        /// Which connection.
        conn: ConnId,
        /// The STUN/TURN servers to gather the new candidates with.
        ice_servers: Vec<IceServer>,
    },
    /// Read the selected path of `conn` and report [`ConnectionEvent::Path`] (where the
    /// platform does not report it by itself).
    ReadPath {
        /// Which connection.
        conn: ConnId,
    },
    /// Read `len` bytes at `offset` of file `root` (shared, or downloaded here), then
    /// report [`Input::ReadDone`].
    Read {
        /// For whom.
        peer: PeerId,
        /// Which file.
        root: Root,
        /// Which chunk.
        index: u32,
        /// Where.
        offset: u64,
        /// How much.
        len: usize,
    },
    /// Write verified `data` at `offset` of the download `root`, then report
    /// [`Input::WriteDone`].
    Write {
        /// Which file.
        root: Root,
        /// Which chunk.
        index: u32,
        /// Where.
        offset: u64,
        /// The verified bytes.
        data: Vec<u8>,
    },
    /// Delete the download `root`: its partial (or kept) data and its record.
    Discard {
        /// Which file.
        root: Root,
    },
    /// The download `root` is complete and verified: close it and put it in its place
    /// (written data is durable first), then report [`Input::FileSaved`].
    FinishFile {
        /// Which file.
        root: Root,
        /// The paths it was offered under.
        paths: Vec<String>,
        /// Its size.
        size: u64,
        /// Its record, to save before moving it (stores that keep records).
        record: Option<DownloadRecord>,
    },
    /// Persist these resume records (data they claim synced first), then report
    /// [`Input::RecordsSaved`].
    SaveRecords(Vec<DownloadRecord>),
    /// Persist the trust store.
    SaveTrust(TrustStore),
    /// Write this IP packet to the TUN device: a packet from a peer that passed
    /// cryptokey routing, or an ICMP error for a packet we could not deliver.
    TunWrite(Vec<u8>),
    /// Ask the host's own resolvers this DNS query (a name the `.weft` resolver does not
    /// know), each for at most `dns::FORWARD_TIMEOUT`, and report the first reply with
    /// [`Input::DnsForwarded`]. Only with the `dns` feature.
    DnsForward {
        /// The forward's id.
        id: u64,
        /// The DNS message to send.
        query: Vec<u8>,
    },
    /// Our overlay addresses or the routing table changed (also once at start): configure
    /// the TUN device's addresses and the routes that lead into it.
    Overlay(OverlayStatus),
    /// Something for the user.
    Event(Event),
}

/// The signaling connection, as users see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalingEvent {
    /// An attempt to connect starts.
    Connecting {
        /// From 1.
        attempt: u32,
    },
    /// The connection failed or dropped; sessions go on, and the next attempt is in
    /// `retry_in`.
    Lost {
        /// Why.
        reason: String,
        /// When.
        retry_in: Duration,
    },
    /// The server refused us for good (only an update helps).
    Stopped {
        /// Why.
        reason: StopReason,
    },
    /// We left.
    Left,
}

/// Why the signaling server refused us for good. `Display` is for users.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StopReason {
    /// The server speaks another protocol version: only an update helps.
    #[error("the server refused our protocol version: {message}")]
    UnsupportedVersion {
        /// The server's words.
        message: String,
    },
    /// The first join failed [`NodeTiming::first_join_attempts`] times without reaching
    /// the server's room.
    #[error("cannot reach the signaling server ({attempts} attempts; last: {last})")]
    Unreachable {
        /// Attempts made.
        attempts: u32,
        /// Why the last one failed.
        last: String,
    },
    /// The server refused our first join (full, or too many from our address).
    #[error("the signaling server refused to let us join: {message}")]
    Refused {
        /// Why.
        code: ErrorCode,
        /// The server's words.
        message: String,
    },
}

/// Something for the user.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The signaling connection changed.
    Signaling(SignalingEvent),
    /// Joined (again) under `peer_id`, with these other members.
    Joined {
        /// Our id.
        peer_id: PeerId,
        /// The others.
        peers: Vec<PeerId>,
    },
    /// A member joined.
    PeerJoined(PeerId),
    /// A member left (or its id went away with a server restart, or its kept connection
    /// ended).
    PeerLeft(PeerId),
    /// What we know of a peer changed (state, name, key, trust, path).
    Peer(PeerInfo),
    /// An encrypted session is up and its key was checked against the trust store.
    PeerConnected(PeerInfo),
    /// A peer's key differs from the one pinned for its name: warn loudly.
    KeyChanged(PeerInfo),
    /// A peer's connection failed.
    PeerFailed(PeerInfo),
    /// A member's passphrase check failed again (a wrong passphrase, or someone guessing
    /// it online: the server's own member, say). Show it: "N failed passphrase attempts
    /// from …". The next attempt from it is answered no sooner than `retry_in`.
    PassphraseFailures {
        /// Its id on the signaling server (no key is known before the check).
        peer: PeerId,
        /// Failed attempts from this id so far.
        failures: u32,
        /// Failed attempts from anyone so far.
        total: u64,
        /// When the next attempt from it may be answered.
        retry_in: Duration,
    },
    /// A chat message.
    Message {
        /// From whom.
        peer_id: PeerId,
        /// Its display name.
        name: String,
        /// The text.
        text: String,
        /// Its key's trust under that name when the message came (`None`: not read yet,
        /// as right after a rename): show it beside the message.
        trust: Option<Trust>,
        /// Another pinned name its name looks like, under another key: show it loudly.
        looks_like: Option<String>,
    },
    /// The signaling server refused something.
    ServerError {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// File transfer.
    File(FileEvent),
}

/// Why a request was refused. `Display` is for users.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// No such peer.
    #[error("no peer {0} in this network")]
    NoSuchPeer(String),
    /// The peer has no encrypted session yet.
    #[error("peer {0} is not connected yet")]
    NotConnected(PeerId),
    /// Nobody has an encrypted session with us.
    #[error("no peer is connected")]
    NobodyConnected,
    /// The peer's key is not known yet.
    #[error("peer {0} has not completed a handshake yet")]
    NoHandshakeYet(PeerId),
    /// Verifying a key other than the pinned one.
    #[error("{0} is pinned to another key; accept the new key before verifying it")]
    PinnedToAnotherKey(String),
    /// The link refused.
    #[error("peer {peer}: {error}")]
    Link {
        /// Which peer.
        peer: PeerId,
        /// Why.
        error: LinkError,
    },
    /// The transfer engine refused.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// Offers cannot be accepted here.
    #[error("this peer stores no downloads (no download folder)")]
    NoDownloadStore,
}

/// The name a peer's key is pinned under, if its key is the pinned one (a changed key is
/// not: `--allow NAME` never lets in another key than the pinned one).
pub(crate) fn pinned_name(trust: Option<Trust>, name: Option<&str>) -> Option<String> {
    match trust {
        Some(Trust::New | Trust::Known | Trust::Verified) => name.map(str::to_string),
        Some(Trust::Changed { .. }) | None => None,
    }
}

/// What draining a link changed for the overlay.
#[derive(Debug, Clone, Copy)]
struct OverlayChanges {
    /// A session was established.
    established: bool,
    /// The link failed.
    failed: bool,
    /// The peer announced its routes (already applied).
    announced: bool,
}

/// The node. See the module docs.
#[derive(Debug)]
pub struct Node {
    identity: IdentityKeyPair,
    network: Network,
    name: String,
    timing: NodeTiming,
    link_config: PeerLinkConfig,
    signaling: SignalingClient,
    peers: SortedMap<PeerId, PeerSlot>,
    /// Which peer each current connection belongs to.
    conns: SortedMap<ConnId, PeerId>,
    next_conn: u64,
    trust: TrustStore,
    engine: Engine,
    /// Peers the engine was told have a session.
    engine_peers: SortedSet<PeerId>,
    files: FileGlue,
    path_due: Option<Duration>,
    /// The user's STUN/TURN servers, which win over the server's.
    user_ice: Option<Vec<IceServer>>,
    /// The signaling server's latest STUN/TURN servers for us.
    server_ice: Vec<IceServer>,
    /// Overlay IP: addresses, announcements, the routing table.
    overlay: Overlay,
    /// The peer id whose established session carries each key's traffic.
    by_key: SortedMap<PublicIdentity, PeerId>,
    /// Seals what we send members through the server and opens what they send (invite
    /// networks; see [`crate::sealed`]).
    sealer: Option<crate::sealed::SignalSealer>,
    /// Signaling payloads that did not open (forged, rewritten, misdirected), dropped.
    refused_signals: u64,
    /// The latest time a driver gave us (for ages in what we report).
    clock: Duration,
    /// Queries to the `.weft` resolver forwarded to the host's resolvers, by forward id.
    #[cfg(feature = "dns")]
    dns_forwards: std::collections::HashMap<u64, dns::Query>,
    #[cfg(feature = "dns")]
    next_dns_forward: u64,
    /// Passphrase networks: the PAKE run with each other member (`pake.rs`).
    pairs: SortedMap<PeerId, pake::Pair>,
    /// Passphrase networks: failed PAKE runs, and when the next may finish.
    guard: pake::PakeGuard,
    /// Passphrase networks: signaling payloads from members, not yet taken.
    pake_inbox: VecDeque<(PeerId, SignalPayload)>,
    /// The engine has its capability key, from the first input's randomness (before any
    /// peer, so before any offer).
    capability_key_set: bool,
    out: VecDeque<Output>,
    /// Peers whose links hold chunks not yet sealed (sealed by [`Self::poll_output`]).
    unflushed: SortedSet<PeerId>,
}

fn jitter(rng: &mut impl CryptoRng) -> f64 {
    f64::from(rng.next_u32()) / f64::from(u32::MAX)
}

impl Node {
    /// A node that has not connected yet: call [`Node::start`].
    pub fn new(config: NodeConfig) -> Self {
        let NodeConfig { identity, network, name, trust, downloads, first_offer_id, .. } = config;
        let user_ice = config.ice_servers;
        let room = network.room_id().clone();
        let overlay = Overlay::new(config.routing, &network, *identity.public());
        let sealer = network.signal_sealer();
        let mut engine = Engine::new(config.engine, first_offer_id);
        engine.set_identity(Root::from_bytes(*identity.public().as_bytes()));
        Self {
            identity,
            network,
            name,
            timing: config.timing,
            link_config: config.link,
            signaling: SignalingClient::new(
                room,
                config.timing.heartbeat,
                config.timing.connect_timeout,
                config.timing.first_join_attempts,
                config.signaling_servers,
            ),
            peers: SortedMap::new(),
            conns: SortedMap::new(),
            next_conn: 0,
            trust,
            engine,
            capability_key_set: false,
            engine_peers: SortedSet::new(),
            files: FileGlue::new(downloads),
            path_due: None,
            user_ice,
            server_ice: Vec::new(),
            overlay,
            by_key: SortedMap::new(),
            sealer,
            refused_signals: 0,
            clock: Duration::ZERO,
            #[cfg(feature = "dns")]
            dns_forwards: std::collections::HashMap::new(),
            #[cfg(feature = "dns")]
            next_dns_forward: 0,
            pairs: SortedMap::new(),
            guard: pake::PakeGuard::default(),
            pake_inbox: VecDeque::new(),
            out: VecDeque::new(),
            unflushed: SortedSet::new(),
        }
    }

    // -----------------------------------------------------------------------------------
    // The sans-IO interface

    /// Connects to the signaling server (once).
    pub fn start(&mut self, now: Duration) {
        self.sync_overlay(now, false);
        let (mut act, mut changes) = (Vec::new(), Vec::new());
        self.signaling.start(now, &mut act, &mut changes);
        self.apply_signaling(now, act, changes);
    }

    /// Takes one input; then drain [`Node::poll_output`].
    pub fn handle_input(&mut self, now: Duration, input: Input, rng: &mut impl CryptoRng) {
        self.clock = self.clock.max(now);
        if !self.capability_key_set {
            let mut key = [0; 32];
            rng.fill_bytes(&mut key);
            self.engine.set_capability_key(key);
            self.capability_key_set = true;
        }
        match input {
            Input::SignalingOpened => {
                let mut act = Vec::new();
                self.signaling.opened(now, &mut act);
                self.apply_signaling(now, act, Vec::new());
            }
            Input::SignalingText(text) => {
                let (mut act, mut changes) = (Vec::new(), Vec::new());
                if let Err(e) = self.signaling.text(&text, &mut act, &mut changes) {
                    tracing::warn!("ignoring a bad message from the server: {e}");
                }
                self.apply_signaling(now, act, changes);
            }
            Input::SignalingClosed { reason } => {
                let mut changes = Vec::new();
                self.signaling.closed(now, reason, jitter(rng), &mut changes);
                self.apply_signaling(now, Vec::new(), changes);
            }
            Input::Connection { conn, event } => self.on_connection(now, conn, event, rng),
            Input::ReadDone { peer, root, index, result } => {
                self.on_read_done(now, peer, root, index, result);
            }
            Input::WriteDone { root, index, result } => match result {
                Ok(()) => {
                    self.engine.write_done(&root, index, now);
                    self.mark_dirty(&root, now);
                    self.maybe_progress(&root, now, false);
                }
                Err(failure) => self.store_failed(now, &root, failure),
            },
            Input::StoreFailed { root, failure } => self.store_failed(now, &root, failure),
            Input::RecordsSaved => {
                self.files.saving = false;
                // A file completed during the save is put in place only now, so that the
                // save cannot write its old record back after the file's record is gone.
                for (key, root, paths, size) in std::mem::take(&mut self.files.finish_after_save) {
                    self.finish_file(key, root, paths, size);
                }
                if !self.files.dirty.is_empty() && self.files.save_due.is_none() {
                    self.files.save_due = Some(now + self.timing.save_every);
                }
            }
            Input::FileSaved { root, result } => self.on_file_saved(root, result),
            Input::TunPacket(packet) => {
                if cfg!(feature = "tun") {
                    self.on_tun_packet(now, packet);
                }
                return;
            }
            Input::DnsForwarded { id, reply } => {
                #[cfg(feature = "dns")]
                self.on_dns_forwarded(id, reply);
                #[cfg(not(feature = "dns"))]
                let _ = (id, reply);
                return;
            }
            Input::Timeout => self.handle_timeout(now, rng),
        }
        while let Some((from, payload)) = self.pake_inbox.pop_front() {
            self.on_pake_signal(now, &from, payload, rng);
        }
        self.pump(now);
    }

    fn store_failed(&mut self, now: Duration, root: &Root, failure: WriteFailure) {
        let reason = match failure {
            WriteFailure::DiskFull => FailReason::DiskFull,
            WriteFailure::QuotaExceeded => FailReason::QuotaExceeded,
            WriteFailure::NoStorage(e) => FailReason::NoStorage(e),
            WriteFailure::StreamNotStarted(e) => FailReason::StreamNotStarted(e),
            WriteFailure::TooLarge => FailReason::WriteTooLarge,
            WriteFailure::Other(e) => FailReason::Write(e),
        };
        self.engine.write_failed(root, reason);
        self.mark_dirty(root, now);
    }

    /// The next thing to do.
    ///
    /// Chunks sent while handling inputs wait in their links to share packets (see
    /// [`PeerLink::set_max_packet`]) until everything else is out: a driver that hands
    /// over several inputs before draining (the page does, for reads that finished
    /// together) gets them packed.
    pub fn poll_output(&mut self) -> Option<Output> {
        if self.out.is_empty() && !self.unflushed.is_empty() {
            for peer in std::mem::take(&mut self.unflushed) {
                if let Some(slot) = self.peers.get_mut(&peer) {
                    slot.link.flush();
                }
                self.flush_link(&peer);
            }
        }
        self.out.pop_front()
    }

    /// When to call `handle_input(now, Input::Timeout, ..)` next. A driver may wake
    /// earlier; that is harmless.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let links = self.peers.values().filter_map(|p| p.link.poll_timeout());
        let paced = self.files.paced.front().map(|r| r.at);
        links
            .chain(self.signaling.poll_timeout())
            .chain(self.engine.poll_timeout())
            .chain(self.files.save_due)
            .chain(self.path_due)
            .chain(self.peers.values().filter_map(|p| p.upgrade_due))
            .chain(self.peers.values().filter_map(|p| p.fast.poll_timeout()))
            .chain(paced)
            .chain(self.overlay.poll_timeout())
            .chain(self.pairs.values().filter_map(pake::Pair::due))
            .min()
    }

    fn handle_timeout(&mut self, now: Duration, rng: &mut impl CryptoRng) {
        if self.overlay.handle_timeout(now) {
            self.sync_overlay(now, true);
        }
        let (mut act, mut changes) = (Vec::new(), Vec::new());
        self.signaling.handle_timeout(now, jitter(rng), &mut act, &mut changes);
        self.apply_signaling(now, act, changes);
        self.pake_timeouts(now, rng);
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now);
        }
        let due: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.link.poll_timeout().is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(slot) = self.peers.get_mut(&id) {
                slot.link.handle_timeout(now);
            }
            self.drive(now, &id);
        }
        if self.files.save_due.is_some_and(|t| t <= now) {
            self.files.save_due = None;
            self.save_dirty(now);
        }
        if self.path_due.is_some_and(|t| t <= now) {
            self.path_due = None;
            self.read_paths(now);
        }
        self.look_for_direct_paths(now);
        self.probe_fast_paths(now);
        while self.files.paced.front().is_some_and(|r| r.at <= now) {
            if let Some(r) = self.files.paced.pop_front() {
                let PacedRead { peer, root, index, offset, len, .. } = r;
                self.out.push_back(Output::Read { peer, root, index, offset, len });
            }
        }
    }

    fn emit(&mut self, event: Event) {
        self.out.push_back(Output::Event(event));
    }

    // -----------------------------------------------------------------------------------
    // Signaling

    fn apply_signaling(
        &mut self,
        now: Duration,
        act: Vec<SocketAction>,
        changes: Vec<SignalingChange>,
    ) {
        for a in act {
            self.out.push_back(match a {
                SocketAction::Connect { server } => Output::SignalingConnect { server },
                SocketAction::Send(text) => Output::SignalingSend(text),
                SocketAction::Close => Output::SignalingClose,
            });
        }
        for change in changes {
            match change {
                SignalingChange::Connecting { attempt } => {
                    self.emit(Event::Signaling(SignalingEvent::Connecting { attempt }));
                }
                SignalingChange::Lost { reason, retry_in } => {
                    // Sessions stay: they do not need the server.
                    self.emit(Event::Signaling(SignalingEvent::Lost { reason, retry_in }));
                }
                SignalingChange::Stopped { reason } => {
                    self.emit(Event::Signaling(SignalingEvent::Stopped { reason }));
                }
                SignalingChange::Membership(event) => self.on_membership(now, event),
            }
        }
    }

    fn on_membership(&mut self, now: Duration, event: MembershipEvent) {
        match event {
            MembershipEvent::Joined { peer_id, peers } => {
                if self.overlay.joined(now, peers.len()) {
                    self.sync_overlay(now, true);
                }
                // Sessions kept from before this join take their next handshake's roles
                // from our new id, as the peers' new links to it do.
                for slot in self.peers.values_mut() {
                    slot.link.set_own_id(peer_id.clone());
                }
                self.emit(Event::Joined { peer_id, peers: peers.clone() });
                self.resync(now, &peers);
            }
            MembershipEvent::PeerJoined(peer) => {
                self.emit(Event::PeerJoined(peer.clone()));
                self.add_peer(now, &peer);
            }
            MembershipEvent::PeerLeft(peer) => {
                self.emit(Event::PeerLeft(peer.clone()));
                self.retire(now, &peer);
            }
            MembershipEvent::Signal { from, payload } => self.on_signal(now, &from, payload),
            MembershipEvent::Pong => {}
            MembershipEvent::Error { code, message } => {
                self.emit(Event::ServerError { code, message });
            }
            // For connections made from now on; the server sends these before its welcome,
            // so the first connections have them too.
            MembershipEvent::IceServers { servers, ttl } => {
                tracing::debug!(servers = servers.len(), ?ttl, "ICE servers from the server");
                self.server_ice = servers;
            }
        }
    }

    fn send_signal(&mut self, to: &PeerId, payload: SignalPayload, rng: &mut impl CryptoRng) {
        // Not in the room (yet or any more): nobody to address it from.
        let Some(own) = self.signaling.own_id() else { return };
        let payload = if self.network.needs_pake() {
            // Sealed under the pair's key once its PAKE confirmed; held until then.
            let Some(pair) = self.pairs.get_mut(to) else { return };
            match pair.sealer() {
                Some(sealer) => sealer.seal(own, to, &payload, rng),
                None => return pair.hold(payload),
            }
        } else {
            match &self.sealer {
                Some(sealer) => sealer.seal(own, to, &payload, rng),
                None => payload,
            }
        };
        self.send_payload(to, payload);
    }

    /// Sends `payload` to `to` through the server as it is.
    fn send_payload(&mut self, to: &PeerId, payload: SignalPayload) {
        let mut act = Vec::new();
        self.signaling.send(&ClientMessage::Signal { to: to.clone(), payload }, &mut act);
        for a in act {
            if let SocketAction::Send(text) = a {
                self.out.push_back(Output::SignalingSend(text));
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // The connection policy

    /// After a (re)join the server's list is the whole truth. Connections to ids no
    /// longer listed are dropped, unless their session works: the peer is probably still
    /// there under a new id (an orphan, see [`PeerSlot::orphan`]).
    fn resync(&mut self, now: Duration, peers: &[PeerId]) {
        let stale: Vec<PeerId> =
            self.peers.keys().filter(|id| !peers.contains(id)).cloned().collect();
        for id in stale {
            match self.peers.get_mut(&id) {
                Some(slot) if slot.is_established() => slot.orphan = true,
                _ => self.drop_peer(now, &id),
            }
        }
        for id in peers {
            if !self.peers.contains_key(id) {
                self.add_peer(now, id);
            }
        }
    }

    fn new_conn(&mut self, remote: &PeerId) -> Option<ConnId> {
        let own = self.signaling.own_id()?.clone();
        self.next_conn += 1;
        let conn = ConnId(self.next_conn);
        self.conns.insert(conn, remote.clone());
        let ice_servers = self.user_ice.clone().unwrap_or_else(|| self.server_ice.clone());
        self.out.push_back(Output::Connect {
            conn,
            peer: remote.clone(),
            polite: is_polite(&own, remote),
            ice_servers,
        });
        Some(conn)
    }

    fn disconnect(&mut self, conn: ConnId, graceful: bool) {
        self.conns.remove(&conn);
        self.out.push_back(Output::Disconnect { conn, graceful });
    }

    /// A fresh connection to `remote` (replacing any earlier one under that id).
    fn add_peer(&mut self, now: Duration, remote: &PeerId) {
        let Some(own) = self.signaling.own_id().cloned() else { return };
        if *remote == own {
            return;
        }
        if self.peers.contains_key(remote) {
            self.drop_peer(now, remote);
        }
        let Some(conn) = self.new_conn(remote) else { return };
        let mut link = PeerLink::new(
            own,
            remote.clone(),
            self.identity.clone(),
            &self.network,
            &self.name,
            self.link_config,
        );
        link.set_routes(self.announcement(), now);
        self.peers.insert(remote.clone(), PeerSlot::new(conn, link, self.timing.upgrade_first));
        if self.path_due.is_none() {
            self.path_due = Some(now + self.timing.path_every);
        }
        if self.network.needs_pake() {
            // Started by the next timeout (at once), where randomness is at hand.
            self.pairs.insert(remote.clone(), pake::Pair::new(pake::PairState::Due { at: now }));
        }
        self.show(remote);
    }

    /// Closes and forgets `remote`, telling the user unless told already.
    fn drop_peer(&mut self, now: Duration, remote: &PeerId) {
        self.set_engine_peer(remote, false, now);
        self.pairs.remove(remote);
        if let Some(slot) = self.peers.remove(remote) {
            self.disconnect(slot.conn, false);
            if !slot.announced_left {
                self.emit(Event::PeerLeft(remote.clone()));
            }
            if let Some(key) = slot.link.peer_identity().copied() {
                self.key_lost(now, key, remote);
            }
        }
    }

    /// The slot `remote` of `key` is gone: its traffic moves to another established slot
    /// of the same key (a kept orphan, or the new id after a server restart), or the key's
    /// routes go.
    fn key_lost(&mut self, now: Duration, key: PublicIdentity, remote: &PeerId) {
        if self.by_key.get(&key) != Some(remote) {
            return;
        }
        self.by_key.remove(&key);
        let other = self
            .peers
            .iter()
            .find(|(_, p)| p.is_established() && p.link.peer_identity() == Some(&key))
            .map(|(id, _)| id.clone());
        let changed = match other {
            Some(id) => {
                self.by_key.insert(key, id);
                false
            }
            None if self.peers.values().any(|p| p.link.peer_identity() == Some(&key)) => {
                self.overlay.peer_down(&key)
            }
            None => self.overlay.forget(&key),
        };
        self.sync_overlay(now, changed);
    }

    /// Reports a changed overlay status to the driver; with `announce`, first tells every
    /// peer with a session what we announce now.
    fn sync_overlay(&mut self, now: Duration, announce: bool) {
        if announce {
            let body = self.announcement();
            let ids: Vec<PeerId> = self.peers.keys().cloned().collect();
            for id in ids {
                if let Some(slot) = self.peers.get_mut(&id) {
                    slot.link.set_routes(body.clone(), now);
                }
                self.flush_link(&id);
            }
        }
        if let Some(status) = self.overlay.changed_status() {
            self.out.push_back(Output::Overlay(status));
        }
    }

    /// Our route announcement, encoded.
    fn announcement(&self) -> Vec<u8> {
        // Our own routes are at most 2 addresses, our subnets and 2 exits; the list is
        // cut at the format's limit, so encoding cannot fail.
        self.overlay.announcement().encode().unwrap_or_default()
    }

    /// An IP packet from the TUN device.
    /// A query to the `.weft` resolver: answered from the members, or forwarded.
    #[cfg(feature = "dns")]
    fn on_dns_query(&mut self, query: dns::Query) {
        match dns::answer(&query.message, &self.dns_directory()) {
            dns::Answer::Reply(reply) => self.dns_reply(&query, &reply),
            dns::Answer::Ignore => {}
            dns::Answer::Forward if self.dns_forwards.len() >= dns::MAX_FORWARDS => {
                if let Some(reply) = dns::servfail(&query.message) {
                    self.dns_reply(&query, &reply);
                }
            }
            dns::Answer::Forward => {
                let id = self.next_dns_forward;
                self.next_dns_forward += 1;
                self.out.push_back(Output::DnsForward { id, query: query.message.clone() });
                self.dns_forwards.insert(id, query);
            }
        }
    }

    #[cfg(feature = "dns")]
    fn on_dns_forwarded(&mut self, id: u64, reply: Option<Vec<u8>>) {
        let Some(query) = self.dns_forwards.remove(&id) else { return };
        // Only a reply to this query goes back: a resolver's answer with another id (or
        // none) is not passed to the program that asked.
        let reply = reply
            .filter(|r| {
                dns::header_id(r).is_some() && dns::header_id(r) == dns::header_id(&query.message)
            })
            .or_else(|| dns::servfail(&query.message));
        if let Some(reply) = reply {
            self.dns_reply(&query, &reply);
        }
    }

    #[cfg(feature = "dns")]
    fn dns_reply(&mut self, query: &dns::Query, reply: &[u8]) {
        match ip::udp_packet(query.resolver, query.client, reply) {
            Some(packet) => self.out.push_back(Output::TunWrite(packet)),
            None => tracing::debug!("a DNS reply of {} bytes does not fit a packet", reply.len()),
        }
    }

    /// Who the `.weft` resolver finds by which name: us, and every member with an
    /// established session, by name only while its key is the one pinned under that name
    /// and its name looks like no other pinned name (`dns.rs`).
    #[cfg(feature = "dns")]
    fn dns_directory(&self) -> dns::Directory {
        let own = self.overlay.status();
        let mut members = vec![dns::Member {
            name: dns::dns_label(&self.name),
            // Our own name is ours on this host, whoever else takes it.
            rank: 3,
            short_code: dns::short_code_label(&self.identity.public().fingerprint().short_code()),
            ipv4: own.ipv4,
            ipv6: Some(own.ipv6),
        }];
        for info in self.peers.iter().map(|(id, p)| {
            p.info(id, &self.overlay, self.clock, self.engine.refusals().of_peer(id))
        }) {
            let Some(fingerprint) = info.fingerprint else { continue };
            if !matches!(info.state, PeerState::Direct | PeerState::Relayed)
                || (info.ipv4.is_none() && info.ipv6.is_none())
            {
                continue;
            }
            let rank = match info.trust {
                Some(Trust::Verified) => Some(2),
                Some(Trust::Known) => Some(1),
                Some(Trust::New) => Some(0),
                Some(Trust::Changed { .. }) | None => None,
            };
            let name = info
                .name
                .as_deref()
                .filter(|_| rank.is_some() && info.looks_like.is_none())
                .and_then(dns::dns_label);
            members.push(dns::Member {
                name,
                rank: rank.unwrap_or(0),
                short_code: dns::short_code_label(&fingerprint.short_code()),
                ipv4: info.ipv4,
                ipv6: info.ipv6,
            });
        }
        dns::Directory::new(members)
    }

    fn on_tun_packet(&mut self, now: Duration, packet: Vec<u8>) {
        #[cfg(feature = "dns")]
        if let Some(query) =
            dns::query_in(&packet, dns::resolver_v6(self.overlay.ipv6_net().network()))
        {
            self.on_dns_query(query);
            return;
        }
        let peers = &self.peers;
        let by_key = &self.by_key;
        let online = |key: &PublicIdentity| {
            by_key.get(key).and_then(|id| peers.get(id)).is_some_and(|p| p.is_established())
        };
        match self.overlay.outbound(now, &packet, online) {
            Outbound::Peer(key) => {
                let Some(id) = self.by_key.get(&key) else { return };
                let Some(slot) = self.peers.get_mut(id) else { return };
                // The fast path once it is proven, else the data channel (`fastpath.rs`).
                let sealed = if slot.fast.is_up() {
                    slot.fast.sent(now);
                    slot.link
                        .seal_fast_data(&packet, now)
                        .map(|bytes| Output::FastPathSend { conn: slot.conn, bytes })
                } else {
                    slot.link.seal_data(&packet, now).map(|bytes| Output::Transmit {
                        conn: slot.conn,
                        channel: Channel::Data,
                        bytes,
                    })
                };
                match sealed {
                    Ok(output) => self.out.push_back(output),
                    Err(e) => tracing::debug!("cannot seal an IP packet to {id}: {e}"),
                }
            }
            Outbound::Icmp(icmp) => self.out.push_back(Output::TunWrite(icmp)),
            Outbound::Drop => {}
        }
    }

    /// The server says `remote` left. A working session is kept as an orphan: when the
    /// server goes down it reports everyone leaving, yet the peers are still there. A
    /// peer that really left closes its connection, which ends the orphan.
    fn retire(&mut self, now: Duration, remote: &PeerId) {
        let Some(slot) = self.peers.get_mut(remote) else { return };
        slot.announced_left = true;
        if slot.is_established() {
            slot.orphan = true;
        } else {
            self.drop_peer(now, remote);
        }
    }

    /// Replaces the connection of `remote`, keeping its link (which runs a new handshake
    /// when the new control channel opens).
    fn reconnect(&mut self, now: Duration, remote: &PeerId) -> Option<ConnId> {
        let conn = self.new_conn(remote)?;
        self.set_engine_peer(remote, false, now);
        let slot = self.peers.get_mut(remote)?;
        let old = std::mem::replace(&mut slot.conn, conn);
        slot.link.channel_closed();
        slot.ice = IceState::Checking;
        slot.relayed = false;
        slot.relay_transport = None;
        slot.path_rtt = None;
        slot.link_rtt = None;
        slot.upgrade_due = None;
        slot.fast_pair = None;
        slot.fast = FastPath::new();
        slot.reconnects += 1;
        self.disconnect(old, false);
        Some(conn)
    }

    fn on_signal(&mut self, now: Duration, from: &PeerId, payload: SignalPayload) {
        if self.network.needs_pake() {
            // Taken in order once randomness is at hand (end of `handle_input`).
            return self.pake_inbox.push_back((from.clone(), payload));
        }
        let payload = match (&self.sealer, self.signaling.own_id()) {
            (None, _) => payload,
            (Some(sealer), Some(own)) => match sealer.open(from, own, &payload) {
                Ok(payload) => payload,
                Err(e) => {
                    self.refused_signals += 1;
                    tracing::warn!("dropped a signaling payload from {from}: {e}");
                    return;
                }
            },
            (Some(_), None) => return,
        };
        if !self.peers.contains_key(from) {
            // An offer from an id we do not know (we missed its join, or it raced our
            // welcome): a new peer. Anything else for an unknown id is stale.
            if !matches!(payload, SignalPayload::Offer { .. }) && !self.signaling.in_room(from) {
                return;
            }
            self.add_peer(now, from);
        }
        if let Some(slot) = self.peers.get(from) {
            self.out.push_back(Output::Signal { conn: slot.conn, payload });
        }
    }

    fn on_connection(
        &mut self,
        now: Duration,
        conn: ConnId,
        event: ConnectionEvent,
        rng: &mut impl CryptoRng,
    ) {
        let Some(remote) = self.conns.get(&conn).cloned() else { return };
        let Some(slot) = self.peers.get_mut(&remote) else { return };
        if slot.conn != conn {
            return;
        }
        // Bytes (the hot path) change nothing the fast path's eligibility depends on.
        let received = matches!(event, ConnectionEvent::Received(_));
        match event {
            ConnectionEvent::LocalSignal(payload) => {
                if !slot.orphan {
                    self.send_signal(&remote, payload, rng);
                }
                return;
            }
            ConnectionEvent::ControlOpen { local_sdp, remote_sdp } => {
                slot.failure = None;
                slot.link.channel_open(&local_sdp, &remote_sdp, now, rng);
            }
            ConnectionEvent::Received(bytes) => slot.link.receive_owned(bytes, now, rng),
            ConnectionEvent::Ice(state) => {
                slot.ice = state;
                if state == IceState::Failed && slot.orphan {
                    // Nobody to renegotiate with: the server no longer knows this id.
                    self.drop_peer(now, &remote);
                    return;
                }
                if state == IceState::Connected {
                    self.out.push_back(Output::ReadPath { conn });
                }
            }
            ConnectionEvent::Path { relayed, relay_transport, rtt } => {
                slot.relayed = relayed;
                slot.relay_transport = relay_transport.filter(|_| relayed);
                slot.path_rtt = rtt;
                if !relayed {
                    slot.upgrade_due = None;
                    slot.upgrade_wait = self.timing.upgrade_first;
                } else if slot.upgrade_due.is_none()
                    && self.signaling.own_id().is_some_and(|own| !is_polite(own, &remote))
                {
                    slot.upgrade_due = Some(now + slot.upgrade_wait);
                }
            }
            ConnectionEvent::FastPath { pair } => {
                // The selected pair moved (to or from a direct one): read the path now, so
                // a session that started on the relay shows `direct` as soon as it moves,
                // not at the next periodic reading.
                let moved = pair != slot.fast_pair;
                slot.fast_pair = pair;
                if moved && (slot.ice == IceState::Connected || slot.is_established()) {
                    self.out.push_back(Output::ReadPath { conn });
                }
            }
            ConnectionEvent::Closed { reason } => {
                tracing::debug!("connection {conn} to {remote} closed: {reason}");
                if let Some(key) = slot.link.peer_identity().copied() {
                    if self.by_key.get(&key) == Some(&remote) {
                        let moved = self.overlay.peer_down(&key);
                        self.sync_overlay(now, moved);
                    }
                }
                let Some(slot) = self.peers.get_mut(&remote) else { return };
                slot.link.channel_closed();
                slot.link_rtt = None;
                slot.announced_up = false;
                let in_room = !slot.orphan && self.signaling.in_room(&remote);
                let retry = slot.reconnects < self.timing.max_reconnects;
                self.set_engine_peer(&remote, false, now);
                if in_room && retry {
                    self.reconnect(now, &remote);
                } else if in_room {
                    if let Some(slot) = self.peers.get_mut(&remote) {
                        slot.failure = Some(PeerFailure::KeepsDropping);
                        let info = slot.info(
                            &remote,
                            &self.overlay,
                            self.clock,
                            self.engine.refusals().of_peer(&remote),
                        );
                        self.emit(Event::PeerFailed(info));
                    }
                } else {
                    self.drop_peer(now, &remote);
                    return;
                }
            }
            ConnectionEvent::RemoteRestarted(offer) => {
                if let Some(conn) = self.reconnect(now, &remote) {
                    self.out.push_back(Output::Signal { conn, payload: offer });
                }
            }
        }
        self.drive(now, &remote);
        if !received {
            self.update_fast_path(now, &remote);
        }
    }

    /// Whether `remote`'s fast path is eligible now, and on which pair (see `fastpath.rs`):
    /// enabled here, a session, a pair the driver can send on that is not relayed, and a
    /// peer that takes IP packets (we have a TUN, as enabling it requires).
    fn update_fast_path(&mut self, now: Duration, remote: &PeerId) {
        // Never eligible in a build without TUN devices (`Overlay::fast_path_enabled`):
        // said here as a constant, so that none of the fast path is in the browser's module.
        if !cfg!(feature = "tun") {
            return;
        }
        let enabled = self.overlay.fast_path_enabled();
        let Some(slot) = self.peers.get_mut(remote) else { return };
        let takes = slot.link.peer_identity().is_some_and(|k| self.overlay.accepts_packets(k));
        let pair =
            slot.fast_pair.filter(|_| enabled && takes && !slot.relayed && slot.is_established());
        let was = slot.fast.state();
        slot.fast.set_pair(now, pair);
        if slot.fast.state() != was {
            self.probe_fast_paths(now);
        }
    }

    /// Probes due on fast paths (and paths given up for not answering).
    fn probe_fast_paths(&mut self, now: Duration) {
        if !cfg!(feature = "tun") {
            return;
        }
        for (remote, slot) in &mut self.peers {
            if slot.fast.poll_timeout().is_none_or(|t| t > now) {
                continue;
            }
            let Some(probe) = slot.fast.handle_timeout(now) else { continue };
            match slot.link.seal_fast_message(&probe.encode(), now) {
                Ok(bytes) => self.out.push_back(Output::FastPathSend { conn: slot.conn, bytes }),
                Err(e) => tracing::debug!("cannot seal a fast-path probe to {remote}: {e}"),
            }
        }
    }

    /// Probes and acks that came on `remote`'s fast path: a probe is answered on the fast
    /// path (when it is enabled here), an ack may bring ours up.
    fn on_fast_path_messages(&mut self, now: Duration, remote: &PeerId, bodies: Vec<Vec<u8>>) {
        // Without TUN devices no fast path is ever up here, and probes go unanswered.
        if !cfg!(feature = "tun") {
            return;
        }
        let enabled = self.overlay.fast_path_enabled();
        let Some(slot) = self.peers.get_mut(remote) else { return };
        for body in bodies {
            match FastPathMessage::decode(&body) {
                Ok(FastPathMessage::Probe(nonce)) if enabled => {
                    let ack = FastPathMessage::Ack(nonce).encode();
                    match slot.link.seal_fast_message(&ack, now) {
                        Ok(bytes) => {
                            self.out.push_back(Output::FastPathSend { conn: slot.conn, bytes });
                        }
                        Err(e) => tracing::debug!("cannot seal a fast-path ack to {remote}: {e}"),
                    }
                }
                Ok(FastPathMessage::Probe(_)) => {}
                Ok(FastPathMessage::Ack(nonce)) => {
                    if slot.fast.acked(nonce) {
                        tracing::debug!("the fast path to {remote} is up");
                    }
                }
                Err(e) => tracing::debug!("bad fast-path message from {remote}: {e}"),
            }
        }
    }

    /// Moves the link's sealed packets to its connection's control channel.
    fn flush_link(&mut self, remote: &PeerId) {
        let Some(slot) = self.peers.get_mut(remote) else { return };
        while let Some(bytes) = slot.link.poll_transmit() {
            self.out.push_back(Output::Transmit {
                conn: slot.conn,
                channel: Channel::Control,
                bytes,
            });
        }
    }

    /// Drains the link of `remote` after any input: transmits out, events handled; pins
    /// the key once both key and name are known; reports any change.
    fn drive(&mut self, now: Duration, remote: &PeerId) {
        self.flush_link(remote);
        let Some(slot) = self.peers.get_mut(remote) else { return };
        let mut established = None;
        let mut transfer = Vec::new();
        let mut packets = Vec::new();
        let (mut announced, mut announce_ours) = (false, false);
        let mut failed = false;
        let mut silent = false;
        let mut events = Vec::new();
        let mut fast = Vec::new();
        while let Some(event) = slot.link.poll_event() {
            match event {
                LinkEvent::Established { fingerprint, .. } => {
                    slot.reconnects = 0;
                    slot.failure = None;
                    slot.fingerprint = Some(fingerprint);
                    slot.trust = None;
                    slot.announced_up = false;
                    established = Some(fingerprint);
                }
                // A name said again mid-session, maybe another one: the key's trust is
                // read again under it (below), so a member verified as "mallory" that
                // calls itself "alice" shows as "alice" with a changed key (or a new one),
                // never as "alice, verified".
                LinkEvent::Hello { .. } => slot.trust = None,
                LinkEvent::Message { text } => events.push(Event::Message {
                    peer_id: remote.clone(),
                    name: slot.link.peer_name().unwrap_or_default().to_string(),
                    text,
                    trust: slot.trust,
                    looks_like: slot.looks_like.clone(),
                }),
                LinkEvent::Transfer { frame_type, body } => transfer.push((frame_type, body)),
                LinkEvent::Data(packet) => packets.push(packet),
                // Applied at once, so that the events below show the peer's addresses.
                LinkEvent::Routes(body) => {
                    let Some(key) = slot.link.peer_identity().copied() else { continue };
                    match Announcement::decode(&body) {
                        Ok(a) => {
                            announced = true;
                            announce_ours |= self.overlay.announced(key, a);
                        }
                        Err(e) => tracing::warn!("bad route announcement from {remote}: {e}"),
                    }
                }
                LinkEvent::Rtt(rtt) => slot.link_rtt = Some(rtt),
                LinkEvent::FastPath(body) => fast.push(body),
                LinkEvent::Failed(error) => {
                    silent = matches!(error, LinkError::PeerSilent(_));
                    slot.failure = Some(PeerFailure::Link(error));
                    slot.announced_up = false;
                    failed = true;
                }
            }
        }
        // Pin the key once both the key and the name are known.
        let mut save_trust = false;
        if slot.trust.is_none() && slot.is_established() {
            if let (Some(fp), Some(name)) = (&slot.fingerprint, slot.link.peer_name()) {
                let trust = self.trust.observe(name, fp);
                slot.trust = Some(trust);
                slot.looks_like = self.trust.look_alike(name, fp).map(str::to_string);
                save_trust = true;
                if let Trust::Changed { .. } = trust {
                    events.push(Event::KeyChanged(slot.info(
                        remote,
                        &self.overlay,
                        self.clock,
                        self.engine.refusals().of_peer(remote),
                    )));
                }
            }
        }
        if slot.trust.is_some() && !slot.announced_up && slot.is_established() {
            slot.announced_up = true;
            events.push(Event::PeerConnected(slot.info(
                remote,
                &self.overlay,
                self.clock,
                self.engine.refusals().of_peer(remote),
            )));
        }
        if failed {
            events.push(Event::PeerFailed(slot.info(
                remote,
                &self.overlay,
                self.clock,
                self.engine.refusals().of_peer(remote),
            )));
        }
        // A peer that already left the room and whose link failed is gone.
        let gone = slot.orphan && slot.link.state() == LinkState::Failed;
        let conn = slot.conn;
        for event in events {
            self.emit(event);
        }
        if save_trust {
            self.out.push_back(Output::SaveTrust(self.trust.clone()));
        }
        if gone {
            self.drop_peer(now, remote);
            return;
        }
        if let Some(fp) = established {
            self.drop_orphans_of(now, remote, &fp);
            self.set_engine_peer(remote, true, now);
            self.out.push_back(Output::ReadPath { conn });
        }
        let overlay = OverlayChanges { established: established.is_some(), failed, announced };
        self.drive_overlay(now, remote, overlay, packets, announce_ours);
        self.on_fast_path_messages(now, remote, fast);
        if established.is_some() || announced || failed {
            if established.is_some() {
                // A new session: whatever the old one proved does not hold for it.
                if let Some(slot) = self.peers.get_mut(remote) {
                    slot.fast = FastPath::new();
                }
            }
            self.update_fast_path(now, remote);
        }
        for (frame_type, body) in transfer {
            self.engine.handle_frame(remote, frame_type, body, now);
        }
        if failed {
            self.set_engine_peer(remote, false, now);
        }
        // A peer that went silent but is still in the room: its path probably died (a
        // relay went away, a network changed). A fresh connection finds a new one.
        let retry = self
            .peers
            .get(remote)
            .is_some_and(|p| !p.orphan && p.reconnects < self.timing.max_reconnects);
        if silent && retry && self.signaling.in_room(remote) {
            self.show(remote);
            if self.reconnect(now, remote).is_some() {
                if let Some(slot) = self.peers.get_mut(remote) {
                    slot.failure = None;
                }
            }
        }
        self.show(remote);
    }

    /// The overlay's part of draining a link: a new session gets our announcement and
    /// carries its key's traffic from now on; announcements and IP packets from the peer
    /// go to the overlay; a failed session stops carrying.
    fn drive_overlay(
        &mut self,
        now: Duration,
        remote: &PeerId,
        OverlayChanges { established, failed, announced }: OverlayChanges,
        packets: Vec<Vec<u8>>,
        mut announce: bool,
    ) {
        let Some(slot) = self.peers.get(remote) else { return };
        let Some(key) = slot.link.peer_identity().copied() else { return };
        // Unknown until the peer said its name (the key is pinned by name): until then a
        // key keeps what it had, so a reconnecting verified peer keeps its routes.
        let verified = slot.trust.map(|t| t == Trust::Verified);
        let pinned = pinned_name(slot.trust, slot.link.peer_name());
        let mut changed = established || failed || announced || announce;
        if established {
            // Our announcement went with our name (`PeerLink::set_routes`).
            self.by_key.insert(key, remote.clone());
            announce |= self.overlay.peer_up(key);
        }
        if let Some(verified) = verified {
            changed |= self.overlay.set_trust(&key, verified, pinned);
        }
        if failed && self.by_key.get(&key) == Some(remote) {
            announce |= self.overlay.peer_down(&key);
        }
        for packet in packets {
            // Any session of the key delivers (an orphan's last packets are as good:
            // the key is the same).
            if self.overlay.inbound(&key, &packet) {
                self.out.push_back(Output::TunWrite(packet));
            }
        }
        // Most inputs (a transfer chunk, an IP packet) change nothing here.
        if changed || announce {
            self.sync_overlay(now, announce);
        }
    }

    /// A connection kept from before a signaling reconnect is replaced by a new one to
    /// the same key.
    fn drop_orphans_of(&mut self, now: Duration, current: &PeerId, fp: &Fingerprint) {
        let orphans: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(id, p)| *id != current && p.orphan && p.fingerprint.as_ref() == Some(fp))
            .map(|(id, _)| id.clone())
            .collect();
        for id in orphans {
            self.drop_peer(now, &id);
        }
    }

    /// Reports `remote` if what users know of it changed.
    fn show(&mut self, remote: &PeerId) {
        let Some(slot) = self.peers.get_mut(remote) else { return };
        let info =
            slot.info(remote, &self.overlay, self.clock, self.engine.refusals().of_peer(remote));
        if slot.shown.as_ref() != Some(&info) {
            slot.shown = Some(info.clone());
            self.emit(Event::Peer(info));
        }
    }

    /// Relayed sessions whose wait is over look for a direct path: networks change (a
    /// phone moves onto Wi-Fi, a NAT's mapping rules differ from one hour to the next),
    /// and a relay costs everyone bandwidth and latency. The impolite side restarts ICE
    /// with the current STUN/TURN servers; the relayed path carries on until ICE has
    /// found a better one, so a look that finds nothing costs nothing but the checks.
    fn look_for_direct_paths(&mut self, now: Duration) {
        let Some(own) = self.signaling.own_id().cloned() else { return };
        let ice_servers = self.user_ice.clone().unwrap_or_else(|| self.server_ice.clone());
        let max = self.timing.upgrade_max;
        for (remote, slot) in &mut self.peers {
            if slot.upgrade_due.is_none_or(|t| t > now) {
                continue;
            }
            slot.upgrade_due = None;
            let ours = !is_polite(&own, remote) && !slot.orphan;
            if !(ours && slot.relayed && slot.is_established()) {
                continue;
            }
            tracing::debug!("{remote} is relayed: looking for a direct path");
            slot.upgrade_wait = (slot.upgrade_wait * 2).min(max);
            self.out.push_back(Output::RestartIce {
                conn: slot.conn,
                ice_servers: ice_servers.clone(),
            });
        }
    }

    fn read_paths(&mut self, now: Duration) {
        let conns: Vec<ConnId> = self
            .peers
            .values()
            .filter(|p| p.ice == IceState::Connected || p.is_established())
            .map(|p| p.conn)
            .collect();
        for conn in conns {
            self.out.push_back(Output::ReadPath { conn });
        }
        // Path readings change what users see.
        let ids: Vec<PeerId> = self.peers.keys().cloned().collect();
        for id in ids {
            self.show(&id);
        }
        if !self.peers.is_empty() {
            self.path_due = Some(now + self.timing.path_every);
        }
    }

    // -----------------------------------------------------------------------------------
    // File transfer glue

    fn set_engine_peer(&mut self, peer: &PeerId, up: bool, now: Duration) {
        if up && self.engine_peers.insert(peer.clone()) {
            if let Some(key) = self.peers.get(peer).and_then(|s| s.link.peer_identity()) {
                self.engine.peer_identity(peer, Root::from_bytes(*key.as_bytes()));
            }
            self.engine.peer_connected(peer, now);
        } else if !up && self.engine_peers.remove(peer) {
            self.engine.peer_disconnected(peer, now);
        }
    }

    /// Does what the engine asks until it asks nothing more: small messages to one peer
    /// share a packet; reads wait for the upload limit.
    fn pump(&mut self, now: Duration) {
        let mut batches: SortedMap<PeerId, Vec<(u8, Vec<u8>)>> = SortedMap::new();
        let mut touched = SortedSet::new();
        while let Some(output) = self.engine.poll_output() {
            match output {
                EngineOutput::Send { peer, msg } => {
                    // A chunk is encoded straight into its packet (one copy of its bytes);
                    // other messages are small enough to encode on their own first.
                    let body_len = msg.body_len_hint();
                    let encoded = match (body_len <= BATCH_FRAME).then(|| msg.encode()) {
                        Some((frame_type, body)) if body.len() <= BATCH_FRAME => {
                            batches.entry(peer).or_default().push((frame_type, body));
                            continue;
                        }
                        encoded => encoded,
                    };
                    // A big message: what was batched for this peer goes first.
                    if let Some(batch) = batches.remove(&peer) {
                        self.send_batch(&peer, batch, now);
                    }
                    if let Some(slot) = self.peers.get_mut(&peer) {
                        let sent = match encoded {
                            Some((frame_type, body)) => {
                                slot.link.send_transfer(frame_type, body, now)
                            }
                            None => slot.link.send_transfer_with(
                                body_len,
                                |out| msg.encode_into(out),
                                now,
                            ),
                        };
                        if let Err(e) = sent {
                            tracing::debug!("cannot send a transfer message to {peer}: {e}");
                        }
                        if slot.link.has_unflushed() {
                            self.unflushed.insert(peer.clone());
                        }
                    }
                    touched.insert(peer);
                }
                EngineOutput::Read { peer, root, index, offset, len } => {
                    let wait = self.files.upload_wait(len, now);
                    if wait.is_zero() && self.files.paced.is_empty() {
                        self.out.push_back(Output::Read { peer, root, index, offset, len });
                    } else {
                        let at = now + wait;
                        self.files.paced.push_back(PacedRead {
                            at,
                            peer,
                            root,
                            index,
                            offset,
                            len,
                        });
                    }
                }
                EngineOutput::Write { root, index, offset, data } => {
                    self.out.push_back(Output::Write { root, index, offset, data });
                }
                EngineOutput::Discard { root } => {
                    self.files.dirty.remove(&root);
                    self.files.meters.remove(&root);
                    self.out.push_back(Output::Discard { root });
                }
                EngineOutput::Event(event) => self.on_transfer_event(event, now),
            }
        }
        for (peer, batch) in batches {
            self.send_batch(&peer, batch, now);
            touched.insert(peer);
        }
        for peer in touched {
            self.flush_link(&peer);
        }
    }

    fn send_batch(&mut self, peer: &PeerId, frames: Vec<(u8, Vec<u8>)>, now: Duration) {
        let Some(slot) = self.peers.get_mut(peer) else { return };
        // Packets stay well under the data channel's message size.
        let mut batch = Vec::new();
        let mut bytes = 0;
        for (frame_type, body) in frames {
            bytes += body.len() + 5;
            batch.push((frame_type, body));
            if bytes >= BATCH_BYTES {
                if let Err(e) = slot.link.send_transfers(std::mem::take(&mut batch), now) {
                    tracing::debug!("cannot send transfer messages to {peer}: {e}");
                }
                bytes = 0;
            }
        }
        if let Err(e) = slot.link.send_transfers(batch, now) {
            tracing::debug!("cannot send transfer messages to {peer}: {e}");
        }
    }

    fn on_transfer_event(&mut self, event: TransferEvent, now: Duration) {
        match &event {
            TransferEvent::Answered { peer, offer_id, accepted } => {
                if let Some(o) = self.files.outgoing.get_mut(&(peer.clone(), *offer_id)) {
                    o.state = if *accepted { OfferState::Accepted } else { OfferState::Declined };
                }
                if !*accepted {
                    self.drop_unoffered_streams(peer, *offer_id);
                }
            }
            TransferEvent::Delivered { peer, root } => {
                let engine = &self.engine;
                for ((p, _), o) in self.files.outgoing.iter_mut() {
                    // The offer's items name a file by a stream key, `root` by its root.
                    let item = o.items.iter().find(|i| engine.same_shared_file(&i.root, root));
                    if let (true, Some(item)) = (p == peer, item) {
                        o.delivered.insert(item.root);
                        if o.items.iter().all(|i| o.delivered.contains(&i.root)) {
                            o.state = OfferState::Delivered;
                        }
                    }
                }
            }
            TransferEvent::Cancelled { peer, offer_id, outgoing, .. } => {
                if let Some(o) = self.files.outgoing.get_mut(&(peer.clone(), *offer_id)) {
                    o.state = OfferState::Cancelled;
                }
                if *outgoing {
                    self.drop_unoffered_streams(peer, *offer_id);
                }
            }
            TransferEvent::FileComplete { root, key, paths, size } => {
                self.maybe_progress(root, now, true);
                self.finish_file(*key, *root, paths.clone(), *size);
                return;
            }
            TransferEvent::FileFailed { root, .. } => {
                if self.files.store == DownloadStore::Streamed {
                    // A streamed download cannot continue where it stopped.
                    self.engine.forget(root);
                } else {
                    self.mark_dirty(root, now);
                }
            }
            TransferEvent::ShareFailed { root, .. } => {
                self.files.shared_sizes.remove(root);
                self.files.streamed.remove(root);
            }
            _ => {}
        }
        self.emit(Event::File(FileEvent::Engine(event)));
    }

    /// A download is complete: the driver puts it in its place; the user hears of it
    /// once it is there ([`Input::FileSaved`]).
    /// `key` is where the download is stored, `root` its hash (the same unless it was
    /// offered under a stream key).
    fn finish_file(&mut self, key: Root, root: Root, paths: Vec<String>, size: u64) {
        self.files.dirty.remove(&key);
        self.files.dirty.remove(&root);
        if self.files.saving && self.files.store.keeps_records() {
            self.files.finish_after_save.push((key, root, paths, size));
            return;
        }
        let record = match self.files.store {
            DownloadStore::Kept | DownloadStore::Folder => self.engine.record(&key),
            DownloadStore::Streamed | DownloadStore::None => None,
        };
        if self.files.store == DownloadStore::Streamed {
            // The file leaves the node: there is nothing to serve it from.
            self.engine.unshare(&key);
        }
        self.files.finishing.insert(key, (root, paths.clone(), size));
        self.out.push_back(Output::FinishFile { root: key, paths, size, record });
    }

    fn on_file_saved(&mut self, key: Root, result: Result<SavedTo, String>) {
        let Some((root, paths, size)) = self.files.finishing.remove(&key) else { return };
        match result {
            Ok(to) => self.emit(Event::File(FileEvent::Saved { root, key, paths, size, to })),
            // Not in its place after all (a streamed download the browser never took, a
            // move that failed): the file failed, whatever the engine thought, rather than
            // vanish as "complete".
            Err(e) => self.engine.write_failed(&root, FailReason::NotSaved(e)),
        }
    }

    fn on_read_done(
        &mut self,
        now: Duration,
        peer: PeerId,
        root: Root,
        index: u32,
        result: Result<Vec<u8>, String>,
    ) {
        match result {
            Ok(mut data) => {
                let hook = self.files.corrupt.iter().position(|(r, n)| {
                    *n == index && r.is_none_or(|r| self.engine.same_shared_file(&r, &root))
                });
                if let Some(pos) = hook {
                    self.files.corrupt.remove(pos);
                    let mid = data.len() / 2;
                    if let Some(b) = data.get_mut(mid) {
                        *b ^= 0x40;
                    }
                }
                let len = data.len() as u64;
                self.engine.read_done(&peer, &root, index, data);
                self.count_upload(peer, root, len, now);
            }
            Err(e) => {
                self.engine.read_failed(&peer, &root, ShareFailReason::Read(e));
            }
        }
    }

    fn count_upload(&mut self, peer: PeerId, root: Root, len: u64, now: Duration) {
        let size = self
            .files
            .shared_sizes
            .get(&root)
            .copied()
            .or_else(|| self.engine.progress(&root).map(|p| p.size))
            .unwrap_or(0);
        let every = self.timing.progress_every;
        let entry = self.files.uploads.entry((peer.clone(), root)).or_insert((0, None));
        entry.0 += len;
        let due = entry.1.is_none_or(|t| now.saturating_sub(t) >= every) || entry.0 >= size;
        if due {
            entry.1 = Some(now);
            let sent_bytes = entry.0;
            // Read by its local key if shared before it was hashed: shown by its root
            // once known.
            let root = self.engine.shared_root(&root).unwrap_or(root);
            self.emit(Event::File(FileEvent::Upload { peer, root, sent_bytes, size }));
        }
    }

    fn view(&mut self, root: &Root, now: Duration) -> Option<DownloadView> {
        let progress = self.engine.progress(root)?;
        let meter = self.files.meters.entry(*root).or_default();
        let speed_bps = if progress.state == DownloadState::Active {
            meter.sample(now, progress.done_bytes, self.timing.progress_every)
        } else {
            0.0
        };
        let left = progress.size.saturating_sub(progress.done_bytes) as f64;
        let eta = (speed_bps > 0.0).then(|| Duration::from_secs_f64(left / speed_bps));
        Some(DownloadView { progress, speed_bps, eta })
    }

    fn maybe_progress(&mut self, root: &Root, now: Duration, force: bool) {
        let every = self.timing.progress_every;
        let due = self
            .files
            .meters
            .get(root)
            .and_then(|m| m.emitted_at)
            .is_none_or(|t| now.saturating_sub(t) >= every);
        if !(due || force) {
            return;
        }
        if let Some(view) = self.view(root, now) {
            if let Some(m) = self.files.meters.get_mut(root) {
                m.emitted_at = Some(now);
            }
            self.emit(Event::File(FileEvent::Progress(view)));
        }
    }

    fn mark_dirty(&mut self, root: &Root, now: Duration) {
        if !self.files.store.keeps_records() || self.files.finishing.contains_key(root) {
            return;
        }
        self.files.dirty.insert(*root);
        if self.files.save_due.is_none() && !self.files.saving {
            self.files.save_due = Some(now + self.timing.save_every);
        }
    }

    /// The records of downloads marked dirty (a download may be marked under its stream
    /// key and under its root: one record each).
    fn take_dirty_records(&mut self) -> Vec<DownloadRecord> {
        let mut records: Vec<DownloadRecord> = std::mem::take(&mut self.files.dirty)
            .iter()
            .filter_map(|r| self.engine.record(r))
            .collect();
        // By root, the last record of each root kept (a sort and a dedup rather than a
        // map: one map type fewer in the browser's module).
        crate::sorted::sort_by(&mut records, |a, b| a.root.cmp(&b.root));
        records.reverse();
        records.dedup_by_key(|r| r.root);
        records.reverse();
        records
    }

    fn save_dirty(&mut self, now: Duration) {
        if self.files.saving {
            self.files.save_due = Some(now + self.timing.save_every);
            return;
        }
        let records = self.take_dirty_records();
        if !records.is_empty() {
            self.files.saving = true;
            self.out.push_back(Output::SaveRecords(records));
        }
    }

    // -----------------------------------------------------------------------------------
    // Commands

    /// Sends `text` to `to`, or to every peer with a session; how many it went to.
    pub fn send_message(
        &mut self,
        now: Duration,
        to: Option<&PeerId>,
        text: &str,
    ) -> Result<u32, NodeError> {
        let targets: Vec<PeerId> = match to {
            Some(id) => {
                let slot =
                    self.peers.get(id).ok_or_else(|| NodeError::NoSuchPeer(id.to_string()))?;
                if !slot.is_established() {
                    return Err(NodeError::NotConnected(id.clone()));
                }
                vec![id.clone()]
            }
            None => self.established_peers(),
        };
        let mut sent = 0;
        for id in targets {
            let Some(slot) = self.peers.get_mut(&id) else { continue };
            match slot.link.send_message(text, now) {
                Ok(()) => sent += 1,
                Err(error) if to.is_some() => return Err(NodeError::Link { peer: id, error }),
                Err(_) => {}
            }
            self.drive(now, &id);
        }
        Ok(sent)
    }

    /// The user compared `peer`'s short code: marks its key verified.
    pub fn verify_peer(&mut self, peer: &PeerId) -> Result<(), NodeError> {
        let (name, fp) = self.peer_key(peer)?;
        if let Trust::Changed { .. } = self.trust.verify(&name, &fp) {
            return Err(NodeError::PinnedToAnotherKey(name));
        }
        self.update_trust(&name);
        Ok(())
    }

    /// The user accepts `peer`'s changed key.
    pub fn accept_new_key(&mut self, peer: &PeerId) -> Result<(), NodeError> {
        let (name, fp) = self.peer_key(peer)?;
        self.trust.accept_new_key(&name, &fp);
        self.update_trust(&name);
        Ok(())
    }

    fn peer_key(&self, peer: &PeerId) -> Result<(String, Fingerprint), NodeError> {
        let slot = self.peers.get(peer).ok_or_else(|| NodeError::NoSuchPeer(peer.to_string()))?;
        match (slot.link.peer_name(), &slot.fingerprint) {
            (Some(name), Some(fp)) => Ok((name.to_string(), *fp)),
            _ => Err(NodeError::NoHandshakeYet(peer.clone())),
        }
    }

    /// Re-reads the trust of every peer named `name`, saves and reports.
    fn update_trust(&mut self, name: &str) {
        let ids: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.link.peer_name() == Some(name))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            if let Some(slot) = self.peers.get_mut(id) {
                if let Some(fp) = &slot.fingerprint {
                    slot.trust = self.trust.check(name, fp);
                    slot.looks_like = self.trust.look_alike(name, fp).map(str::to_string);
                }
                if let Some(key) = slot.link.peer_identity() {
                    // Trust decides which subnet and exit routes are accepted (our own
                    // claim does not depend on it: nothing new to announce).
                    let verified = slot.trust == Some(Trust::Verified);
                    let pinned = pinned_name(slot.trust, slot.link.peer_name());
                    self.overlay.set_trust(key, verified, pinned);
                }
            }
            self.show(id);
        }
        if let Some(status) = self.overlay.changed_status() {
            self.out.push_back(Output::Overlay(status));
        }
        self.out.push_back(Output::SaveTrust(self.trust.clone()));
    }

    /// Serves a hashed file.
    pub fn share(&mut self, root: Root, size: u64, cvs: Vec<Cv>) -> Result<(), NodeError> {
        self.engine.share(root, size, cvs)?;
        self.files.shared_sizes.insert(root, size);
        Ok(())
    }

    /// Serves a file before it is hashed, so that it can be offered at once; returns the
    /// key the driver reads it by ([`Output::Read`]). The driver hashes it front to back
    /// ([`crate::transfer::FileHasher`]) and reports the CVs as they come
    /// ([`Node::file_hashed`]), then the digest ([`Node::file_hash_done`]), or that it
    /// cannot ([`Node::file_hash_failed`]). See `core/TRANSFER.md`, "Offer at once".
    pub fn share_streamed(&mut self, size: u64) -> Root {
        self.files.streamed_shares += 1;
        let mut h = blake3::Hasher::new_keyed(&self.stream_secret());
        h.update(b"local");
        h.update(&self.files.streamed_shares.to_be_bytes());
        h.update(&size.to_be_bytes());
        let local = Root::from(h.finalize());
        self.engine.share_streamed(local, size);
        self.files.shared_sizes.insert(local, size);
        self.files.streamed.insert(local);
        local
    }

    /// Whether the file shared before it was hashed under `local` is still shared: a
    /// driver that is hashing it stops when it is not (every offer of it was declined or
    /// cancelled, or it could not be read), and lets go of the file.
    pub fn hashing_wanted(&self, local: &Root) -> bool {
        self.files.streamed.contains(local)
    }

    /// After our offer to `peer` ended unaccepted (declined or cancelled): stops sharing
    /// each of its files that was shared only to be offered ([`Node::share_streamed`]) and
    /// is named by no other offer still pending, accepted or delivered.
    fn drop_unoffered_streams(&mut self, peer: &PeerId, offer_id: u64) {
        let Some(ended) = self.files.outgoing.get(&(peer.clone(), offer_id)) else { return };
        let engine = &self.engine;
        let locals: Vec<Root> = ended
            .items
            .iter()
            .filter_map(|i| engine.share_key(&i.root))
            .filter(|l| self.files.streamed.contains(l))
            .collect();
        for local in locals {
            let wanted = self.files.outgoing.values().any(|o| {
                !matches!(o.state, OfferState::Cancelled | OfferState::Declined)
                    && o.items.iter().any(|i| self.engine.same_shared_file(&i.root, &local))
            });
            if !wanted {
                tracing::debug!("no offer wants a file being hashed any more: unshared");
                self.engine.unshare(&local);
                self.files.streamed.remove(&local);
                self.files.shared_sizes.remove(&local);
            }
        }
    }

    /// The next CVs of a file shared with [`Node::share_streamed`], in order.
    pub fn file_hashed(&mut self, now: Duration, local: &Root, cvs: &[Cv]) {
        self.engine.hashed(local, cvs);
        self.pump(now);
    }

    /// A file shared with [`Node::share_streamed`] is hashed; its digest must agree with
    /// the CVs reported before (else it changed while it was hashed, and is no longer
    /// shared). Returns its root.
    pub fn file_hash_done(
        &mut self,
        now: Duration,
        local: &Root,
        digest: crate::transfer::FileDigest,
    ) -> Result<Root, NodeError> {
        let root = digest.root;
        let result = self.engine.hash_done(local, digest);
        if let Err(e) = &result {
            self.engine.share_failed(local, ShareFailReason::Read(e.to_string()));
        }
        self.pump(now);
        result?;
        Ok(root)
    }

    /// A file shared with [`Node::share_streamed`] could not be read to hash it.
    pub fn file_hash_failed(&mut self, now: Duration, local: &Root, reason: String) {
        self.engine.share_failed(local, ShareFailReason::Read(reason));
        self.pump(now);
    }

    /// The key stream keys are derived with: from our identity, so an offer made again
    /// after a restart names its files as before.
    fn stream_secret(&self) -> [u8; 32] {
        blake3::derive_key("weft 2026 transfer stream keys", &self.identity.secret_bytes()[..])
    }

    /// Offers shared files to `to` under the given paths; the offer's number.
    pub fn offer(
        &mut self,
        now: Duration,
        to: &PeerId,
        files: &[(Root, String)],
    ) -> Result<u64, NodeError> {
        if !self.peers.contains_key(to) {
            return Err(NodeError::NoSuchPeer(to.to_string()));
        }
        let secret = self.stream_secret();
        let recipient =
            self.peers.get(to).and_then(|s| s.link.peer_identity()).map(|k| *k.as_bytes());
        let recipient: &[u8] = match &recipient {
            Some(k) => k,
            None => to.as_str().as_bytes(),
        };
        let id = self.engine.offer_with(to, files, |_, size, path| {
            crate::transfer::hash::stream_key(&secret, recipient, size, path)
        })?;
        // As the peer knows them: the page follows each file by that key.
        let items = self.engine.offer_items_sent(to, id).unwrap_or_default();
        let outgoing =
            Outgoing { items, state: OfferState::Pending, delivered: Default::default() };
        self.files.outgoing.insert((to.clone(), id), outgoing);
        self.pump(now);
        Ok(id)
    }

    /// Accepts `peer`'s offer: its files download into the node's store.
    pub fn accept(&mut self, now: Duration, peer: &PeerId, offer_id: u64) -> Result<(), NodeError> {
        if self.files.store == DownloadStore::None {
            return Err(NodeError::NoDownloadStore);
        }
        self.engine.accept(peer, offer_id, now)?;
        self.pump(now);
        Ok(())
    }

    /// Sets the budget for downloads taken without asking (the user's `--max-pending`;
    /// `transfer::PendingBudget::DEFAULT` otherwise).
    pub fn set_pending_budget(&mut self, budget: crate::transfer::PendingBudget) {
        self.engine.set_pending_budget(budget);
    }

    /// Accepts `peer`'s offer by a rule, nobody asked (`AcceptPolicy` said so): within
    /// the budget for downloads still to write (`transfer::PendingBudget`), given
    /// `free_space` on the download disk if the driver knows it. Past it the offer is
    /// refused, the peer told why, and the error says it.
    pub fn accept_unasked(
        &mut self,
        now: Duration,
        peer: &PeerId,
        offer_id: u64,
        free_space: Option<u64>,
    ) -> Result<(), NodeError> {
        if self.files.store == DownloadStore::None {
            return Err(NodeError::NoDownloadStore);
        }
        let result = self.engine.accept_unasked(peer, offer_id, free_space, now);
        self.pump(now);
        Ok(result?)
    }

    /// Declines `peer`'s offer.
    pub fn decline(
        &mut self,
        now: Duration,
        peer: &PeerId,
        offer_id: u64,
    ) -> Result<(), NodeError> {
        self.engine.decline(peer, offer_id)?;
        self.pump(now);
        Ok(())
    }

    /// Cancels an offer we made (`outgoing`) or received; the peer is told.
    pub fn cancel(
        &mut self,
        now: Duration,
        peer: &PeerId,
        offer_id: u64,
        outgoing: bool,
        reason: CancelReason,
    ) -> Result<(), NodeError> {
        self.engine.cancel(peer, offer_id, outgoing, reason)?;
        self.pump(now);
        Ok(())
    }

    /// Pauses or resumes the download `root`.
    pub fn set_paused(
        &mut self,
        now: Duration,
        root: &Root,
        paused: bool,
    ) -> Result<(), NodeError> {
        self.engine.set_paused(root, paused, now)?;
        self.mark_dirty(root, now);
        self.pump(now);
        Ok(())
    }

    /// Forgets the download `root` (any of its names) and deletes what is stored of it,
    /// under the name it was stored by (its key: a stream key if it was offered before it
    /// was hashed). A complete one is no longer served either: its bytes are gone.
    pub fn forget_download(&mut self, now: Duration, root: &Root) {
        let Some(progress) = self.engine.progress(root) else { return };
        let key = progress.key;
        let complete = progress.state == DownloadState::Complete;
        self.engine.forget(&key);
        for name in [root, &key] {
            self.files.dirty.remove(name);
            self.files.meters.remove(name);
        }
        if complete {
            self.engine.unshare(&key);
            self.out.push_back(Output::Discard { root: key });
        }
        self.pump(now);
    }

    /// Restores a saved download; connected peers are asked who holds it. `data_present`:
    /// whether its stored data still exists (if not, it starts over).
    pub fn restore_download(
        &mut self,
        now: Duration,
        mut record: DownloadRecord,
        data_present: bool,
    ) {
        if self.engine.progress(&record.root).is_some() {
            return;
        }
        if !data_present {
            record.have.iter_mut().for_each(|b| *b = 0);
            record.state = DownloadState::Active;
        }
        let root = record.root;
        let hash = record.hash.unwrap_or(root);
        let complete = record.state == DownloadState::Complete;
        let paths = record.paths.clone();
        let size = record.size;
        self.engine.restore(record);
        if complete && self.files.store == DownloadStore::Folder {
            // It was complete but not yet in its place when the node stopped.
            self.finish_file(root, hash, paths, size);
        } else if let Some(view) = self.view(&root, now) {
            self.emit(Event::File(FileEvent::Restored(view)));
        }
        // Peers connected already learn of it now.
        let peers: Vec<PeerId> = self.engine_peers.iter().cloned().collect();
        for peer in peers {
            self.engine.peer_disconnected(&peer, now);
            self.engine.peer_connected(&peer, now);
        }
        self.pump(now);
    }

    /// Limits what this node serves to `bytes_per_s` over all peers (`None`: no limit).
    pub fn set_upload_limit(&mut self, bytes_per_s: Option<f64>) {
        self.files.upload_limit = bytes_per_s.filter(|r| r.is_finite() && *r > 0.0);
        self.files.upload_next = Duration::ZERO;
    }

    /// Test hook: the next read of chunk `index` (of `root`, or of any file) is damaged
    /// before it is sent, as a bad disk or a hostile sender would.
    pub fn debug_corrupt_chunk(&mut self, root: Option<Root>, index: u32) {
        self.files.corrupt.push((root, index));
    }

    /// Leaves: records saved, a Close frame to every peer with a session, connections
    /// closed (gracefully: the Close frames go first), `leave` to the server.
    pub fn leave(&mut self, now: Duration) {
        let records = self.take_dirty_records();
        if !records.is_empty() {
            self.out.push_back(Output::SaveRecords(records));
        }
        let ids: Vec<PeerId> = self.peers.keys().cloned().collect();
        for id in &ids {
            if let Some(slot) = self.peers.get_mut(id) {
                slot.link.close(now);
            }
            self.flush_link(id);
        }
        for (_, slot) in std::mem::take(&mut self.peers) {
            self.disconnect(slot.conn, true);
        }
        self.conns.clear();
        let mut act = Vec::new();
        self.signaling.leave(&mut act);
        self.apply_signaling(now, act, Vec::new());
        self.emit(Event::Signaling(SignalingEvent::Left));
    }

    // -----------------------------------------------------------------------------------
    // Queries

    /// Our id on the signaling server, once joined.
    pub fn own_id(&self) -> Option<&PeerId> {
        self.signaling.own_id()
    }

    /// Signaling payloads that did not open and were dropped: forged, rewritten or
    /// misdirected by the server, or sent by someone without the network's secret.
    pub fn refused_signals(&self) -> u64 {
        self.refused_signals
    }

    /// What peers asked of file transfer past its caps (`transfer::TransferLimits`) and
    /// were refused, counted by kind; each refused peer was told why.
    pub fn transfer_refusals(&self) -> &crate::transfer::Refusals {
        self.engine.refusals()
    }

    /// The network's room.
    pub fn room(&self) -> &RoomId {
        self.signaling.room()
    }

    /// Our display name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Changes our display name, for new sessions and, at once, for every peer we have a
    /// session with (each reads our key's trust again under the new name).
    pub fn set_name(&mut self, now: Duration, name: &str) {
        self.name = name.to_string();
        let ids: Vec<PeerId> = self.peers.keys().cloned().collect();
        for id in ids {
            if let Some(slot) = self.peers.get_mut(&id) {
                slot.link.set_own_name(name, now);
            }
            self.drive(now, &id);
        }
    }

    /// Whether the node is joined to its room now.
    pub fn is_joined(&self) -> bool {
        self.signaling.is_joined()
    }

    /// Whether the node left or was refused for good.
    pub fn is_stopped(&self) -> bool {
        self.signaling.is_stopped()
    }

    /// Our overlay addresses, the routing table and its counters (for `status`).
    pub fn overlay(&self) -> OverlayStatus {
        self.overlay.status()
    }

    /// The routing table, to look up or list: every accepted route, and our own two
    /// addresses (routed to our own key, so that a weaker claim of one loses to ours).
    pub fn route_table(&self) -> &RouteTable {
        self.overlay.table()
    }

    /// Every other member we know of (and kept sessions), by peer id.
    pub fn peers(&self) -> Vec<PeerInfo> {
        self.peers.iter().map(|(id, p)| self.info(id, p)).collect()
    }

    /// What we know of `peer`.
    pub fn peer(&self, peer: &PeerId) -> Option<PeerInfo> {
        self.peers.get(peer).map(|p| self.info(peer, p))
    }

    fn info(&self, id: &PeerId, p: &PeerSlot) -> PeerInfo {
        p.info(id, &self.overlay, self.clock, self.engine.refusals().of_peer(id))
    }

    /// The display name `peer` announced, if any.
    pub fn peer_name(&self, peer: &PeerId) -> Option<&str> {
        self.peers.get(peer).and_then(|p| p.link.peer_name())
    }

    /// The current connection of `peer`.
    pub fn connection(&self, peer: &PeerId) -> Option<ConnId> {
        self.peers.get(peer).map(|p| p.conn)
    }

    /// Peers with an encrypted session.
    pub fn established_peers(&self) -> Vec<PeerId> {
        self.peers.iter().filter(|(_, p)| p.is_established()).map(|(id, _)| id.clone()).collect()
    }

    /// The trust store.
    pub fn trust(&self) -> &TrustStore {
        &self.trust
    }

    /// Where downloads go from now on (a browser learns whether it can keep files only
    /// once its writer starts).
    pub fn set_download_store(&mut self, store: DownloadStore) {
        self.files.store = store;
    }

    /// Where downloads go.
    pub fn download_store(&self) -> DownloadStore {
        self.files.store
    }

    /// The transfer engine, to read.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The key `peer` was offered the shared file `name` (any of its names: local key,
    /// stream key, root) under in one of our offers, if it was: the name that peer's
    /// events and our offer's items know it by.
    pub fn offered_key(&self, peer: &PeerId, name: &Root) -> Option<Root> {
        self.files
            .outgoing
            .iter()
            .filter(|((p, _), _)| p == peer)
            .flat_map(|(_, o)| &o.items)
            .find(|i| self.engine.same_shared_file(&i.root, name))
            .map(|i| i.root)
    }

    /// The items of an offer we made.
    pub fn offer_items(&self, peer: &PeerId, offer_id: u64) -> Option<Vec<OfferItem>> {
        self.engine.offer_items(peer, offer_id)
    }

    /// Everything in flight.
    pub fn transfers(&mut self, now: Duration) -> TransfersView {
        let roots: Vec<Root> = self.engine.downloads().iter().map(|d| d.root).collect();
        let downloads = roots.iter().filter_map(|r| self.view(r, now)).collect();
        let outgoing = self
            .files
            .outgoing
            .iter()
            .map(|((peer, id), o)| OutgoingView {
                peer: peer.clone(),
                offer_id: *id,
                items: o.items.clone(),
                state: o.state,
                sent_bytes: o
                    .items
                    .iter()
                    .map(|i| {
                        // Counted by the key the file is read by.
                        let read = self.engine.share_key(&i.root).unwrap_or(i.root);
                        self.files.uploads.get(&(peer.clone(), read)).map_or(0, |u| u.0)
                    })
                    .sum(),
                total_bytes: o.items.iter().map(|i| i.size).sum(),
            })
            .collect();
        let incoming = self
            .engine
            .pending_offers()
            .into_iter()
            .map(|(peer, offer_id, items)| IncomingView { peer, offer_id, items })
            .collect();
        TransfersView { downloads, outgoing, incoming }
    }
}
