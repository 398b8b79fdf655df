//! One encrypted link to one remote peer, over its WebRTC data channels: the sans-IO
//! state machine that browser and native drivers share.
//!
//! The driver owns the `RTCPeerConnection` (or webrtc-rs peer connection) and tells the
//! link what happens to it; the link runs the handshake ([`crate::handshake`]) bound to
//! the connection's DTLS fingerprints, then the transport ([`crate::transport`]), and says
//! what to send and what happened, in the style of str0m and quinn-proto:
//!
//! ```text
//! driver                                   PeerLink
//!   control channel open  ── channel_open(local SDP, remote SDP, now, rng) ─▶
//!   bytes on a channel    ── receive(bytes, now, rng) ─────────────────────▶
//!   user sends text       ── send_message(text, now) ──────────────────────▶
//!   timer fired           ── handle_timeout(now) ──────────────────────────▶
//!                         ◀── poll_transmit() : bytes for the control channel
//!                         ◀── poll_event()    : Established, Hello, Message, Rtt, Failed
//!                         ◀── poll_timeout()  : when to call handle_timeout next
//! ```
//!
//! Time is a [`Duration`] since an epoch of the driver's choosing; randomness comes from
//! the driver's [`CryptoRng`]. Roles are fixed by the peer ids: the lower id initiates the
//! handshake and is the impolite side of WebRTC perfect negotiation ([`is_polite`]).

use std::collections::VecDeque;
use std::time::Duration;

use hpke::rand_core::CryptoRng;

use crate::frame::{
    FILE_TRANSFER_TYPES, FRAME_DATA, FRAME_FAST_PATH, FRAME_HEADER_LEN, FRAME_ROUTES, Frame,
    MAX_NAME_LEN, encode_frame_with,
};
use crate::handshake::{
    ChannelBinding, HandshakeDeadline, HandshakeError, HandshakeInitiator, HandshakeResponder,
    HandshakeStep, MSG_INIT, MessageKind, message_kind,
};
use crate::identity::{Fingerprint, IdentityKeyPair, PublicIdentity};
use crate::network::{Network, NetworkSecret};
use crate::sdp::{FingerprintProblem, max_message_size, the_dtls_fingerprint};
use crate::signal::PeerId;
use crate::transport::{
    Channel, ChannelSessions, MAX_PACKET_LEN, PACKET_HEADER_LEN, PACKET_OVERHEAD, TAG_LEN,
    TransportError,
};
use zeroize::Zeroizing;

/// Longest chat message, in bytes of UTF-8.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// Transport packets kept while the handshake finishes (a packet on the unreliable
/// channel can overtake the Finish message on the control channel).
const MAX_EARLY_PACKETS: usize = 64;

/// The longest wait between two retransmissions of a handshake message.
const MAX_HANDSHAKE_RETRANSMIT: Duration = Duration::from_secs(4);

/// Whether we are the polite side of WebRTC perfect negotiation with `remote`: the side
/// with the higher peer id. The impolite side (lower id) initiates the handshake.
pub fn is_polite(own: &PeerId, remote: &PeerId) -> bool {
    own > remote
}

/// Timing of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLinkConfig {
    /// How long a handshake may take from the channel opening.
    pub handshake_timeout: Duration,
    /// How long the handshake waits for the peer's answer before sending its last message
    /// again (identical bytes; doubling each time, up to 4 s). A message sent right as a
    /// channel opens can be lost (see `core/HANDSHAKE.md`).
    pub handshake_retransmit: Duration,
    /// How often an established link pings its peer to measure the round trip time.
    pub ping_interval: Duration,
    /// An established link that accepts no packet for this long fails: the peer is gone
    /// (closed its page, lost its network) even if WebRTC has not noticed yet.
    pub idle_timeout: Duration,
}

impl Default for PeerLinkConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: crate::handshake::DEFAULT_HANDSHAKE_TIMEOUT,
            handshake_retransmit: Duration::from_millis(250),
            ping_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
        }
    }
}

/// Where a link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No control channel yet (or it closed): waiting for [`PeerLink::channel_open`].
    Waiting,
    /// The handshake is running.
    Handshaking,
    /// The encrypted session is up.
    Established,
    /// The link failed; [`LinkEvent::Failed`] said why. A new channel starts over.
    Failed,
}

/// Something the driver should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The handshake succeeded: the peer holds `identity`'s private key and the network
    /// secret. Check `fingerprint` against the trust store once the peer's name is known.
    Established {
        /// The peer's long-term key.
        identity: PublicIdentity,
        /// Its fingerprint.
        fingerprint: Fingerprint,
    },
    /// The peer told us its display name (inside the encrypted session).
    Hello {
        /// The name, at most [`MAX_NAME_LEN`] bytes.
        name: String,
    },
    /// A chat message from the peer.
    Message {
        /// The text.
        text: String,
    },
    /// An IP packet from the peer.
    Data(Vec<u8>),
    /// The peer's route announcement, for the node's routing code to decode.
    Routes(Vec<u8>),
    /// A fast-path probe or ack (`crate::node::FastPathMessage`), for the node to decode:
    /// only from packets that came on the fast path (and authenticated with its keys).
    FastPath(Vec<u8>),
    /// A file-transfer frame (type in [`crate::frame::FILE_TRANSFER_TYPES`]) for
    /// [`crate::transfer`] to decode.
    Transfer {
        /// The frame type.
        frame_type: u8,
        /// Its body.
        body: Vec<u8>,
    },
    /// A fresh round-trip-time measurement.
    Rtt(Duration),
    /// The link failed; the reason is for users to read.
    Failed(LinkError),
}

/// Why a link failed or refused a request. `Display` is meant for users.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The encrypted session cannot continue (for example its keys are used up).
    #[error("the encrypted session failed: {0}")]
    Transport(TransportError),
    /// A connection description has no DTLS fingerprint to bind the handshake to.
    #[error("the {0} connection description has no DTLS fingerprint")]
    NoDtlsFingerprint(&'static str),
    /// A connection description names more than one DTLS certificate: the handshake could
    /// bind one while DTLS accepted another.
    #[error("the {0} connection description has more than one DTLS fingerprint")]
    SeveralDtlsFingerprints(&'static str),
    /// A passphrase network's handshake needs the pair's passphrase check first.
    #[error("the passphrase check with this peer has not succeeded")]
    NoPassphraseCheck,
    /// Nothing can be sent before the session is established.
    #[error("no encrypted session with this peer yet")]
    NotEstablished,
    /// Nothing arrived from the peer for [`PeerLinkConfig::idle_timeout`].
    #[error("the peer stopped answering (nothing received for {} s)", .0.as_secs())]
    PeerSilent(Duration),
    /// [`PeerLink::send_transfer`] got a frame type outside the file-transfer range.
    #[error("frame type {0:#04x} is not a file-transfer frame")]
    NotTransferFrame(u8),
    /// A message longer than [`MAX_MESSAGE_LEN`].
    #[error("message of {len} bytes is too long (at most {MAX_MESSAGE_LEN})")]
    MessageTooLong {
        /// Its length.
        len: usize,
    },
}

/// Counters for diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Packets sent.
    pub packets_sent: u64,
    /// Packets that authenticated and were accepted.
    pub packets_received: u64,
    /// Packets dropped: tampered, replayed, too old, or garbage.
    pub packets_rejected: u64,
    /// Bytes of the packets sent (sealed, as they go on the wire inside the data channel).
    pub bytes_sent: u64,
    /// Bytes of the packets accepted.
    pub bytes_received: u64,
    /// When the current session's handshake completed (node time).
    pub established_at: Option<Duration>,
}

enum Handshake {
    Initiator(HandshakeInitiator),
    Responder(HandshakeResponder),
}

impl Handshake {
    fn handle(
        &mut self,
        bytes: &[u8],
        rng: &mut impl CryptoRng,
    ) -> Result<HandshakeStep, HandshakeError> {
        match self {
            Handshake::Initiator(hs) => hs.handle(bytes, rng),
            Handshake::Responder(hs) => hs.handle(bytes, rng),
        }
    }

    fn retransmit(&self) -> Option<Vec<u8>> {
        match self {
            Handshake::Initiator(hs) => hs.retransmit(),
            Handshake::Responder(hs) => hs.retransmit(),
        }
    }
}

/// When to send our last handshake message again, and the wait after that.
#[derive(Clone, Copy)]
struct Retransmit {
    at: Duration,
    interval: Duration,
}

impl Retransmit {
    fn start(now: Duration, interval: Duration) -> Self {
        Self { at: now.saturating_add(interval), interval }
    }

    fn next(self, now: Duration) -> Self {
        let interval = self.interval.saturating_mul(2).min(MAX_HANDSHAKE_RETRANSMIT);
        Self { at: now.saturating_add(interval), interval }
    }
}

enum State {
    Waiting,
    Handshaking {
        handshake: Handshake,
        deadline: HandshakeDeadline,
        /// Armed while we wait for an answer to a message we sent.
        retransmit: Option<Retransmit>,
    },
    Established {
        /// One session per channel: their own keys, counters and replay windows.
        sessions: Box<ChannelSessions>,
        next_ping: Duration,
        last_heard: Duration,
        /// The initiator's finished handshake, kept to answer a retransmitted Response
        /// (our Finish was lost) until the first packet from the peer proves it has it.
        handshake: Option<Handshake>,
    },
    Failed,
}

/// An encrypted link to one peer. See the module docs.
pub struct PeerLink {
    own: PeerId,
    remote: PeerId,
    identity: IdentityKeyPair,
    network: Network,
    /// Passphrase networks: the secret of this pair's PAKE run, which keys the handshake
    /// in place of the network's (`crate::pake`).
    pair_secret: Option<NetworkSecret>,
    /// The current connection's channel binding (set at `channel_open`): what a responder
    /// made after a glare binds to (see `receive_owned`).
    binding: Option<ChannelBinding>,
    own_name: String,
    config: PeerLinkConfig,
    state: State,
    peer_identity: Option<PublicIdentity>,
    peer_name: Option<String>,
    /// Our route announcement, sent with our name on every new session.
    routes: Option<Vec<u8>>,
    early: VecDeque<Vec<u8>>,
    transmits: VecDeque<Vec<u8>>,
    /// File-transfer frames waiting to be sealed together in one packet (see
    /// [`Self::set_max_packet`]): the packet's buffer (header room, then the frames) and
    /// when the first frame came.
    open: Option<(Zeroizing<Vec<u8>>, Duration)>,
    /// The largest packet the connection carries (its data channel's largest message), or
    /// 0 while unknown: chunks are then sealed one to a packet.
    max_packet: usize,
    events: VecDeque<LinkEvent>,
    stats: LinkStats,
    ping_epoch: Duration,
}

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerLink")
            .field("own", &self.own)
            .field("remote", &self.remote)
            .field("state", &self.state())
            .field("peer_name", &self.peer_name)
            .finish_non_exhaustive()
    }
}

/// Shortens `name` to at most [`MAX_NAME_LEN`] bytes at a character boundary.
fn clip_name(name: &str) -> String {
    let mut end = name.len().min(MAX_NAME_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

impl PeerLink {
    /// A link from `own` to `remote` in `network`, announcing `own_name`.
    pub fn new(
        own: PeerId,
        remote: PeerId,
        identity: IdentityKeyPair,
        network: &Network,
        own_name: &str,
        config: PeerLinkConfig,
    ) -> Self {
        Self {
            own,
            remote,
            identity,
            network: network.clone(),
            pair_secret: None,
            binding: None,
            own_name: clip_name(own_name),
            config,
            state: State::Waiting,
            peer_identity: None,
            peer_name: None,
            routes: None,
            early: VecDeque::new(),
            transmits: VecDeque::new(),
            open: None,
            max_packet: 0,
            events: VecDeque::new(),
            stats: LinkStats::default(),
            ping_epoch: Duration::ZERO,
        }
    }

    /// Passphrase networks: the secret this pair's PAKE agreed on, which keys the next
    /// handshakes in place of the network's.
    pub fn set_pair_secret(&mut self, secret: NetworkSecret) {
        self.pair_secret = Some(secret);
    }

    /// The remote peer's id.
    pub fn remote(&self) -> &PeerId {
        &self.remote
    }

    /// We joined again under a new signaling id (a signaling process died): the next
    /// handshake's roles follow it, as the peer's fresh link to our new id does. Kept at
    /// the old id, both sides could take the responder's part and wait for an Init that
    /// never comes (the opposite of a glare, which only `receive_owned` settles).
    pub fn set_own_id(&mut self, own: PeerId) {
        self.own = own;
    }

    /// Whether we are the polite side of perfect negotiation with this peer.
    pub fn is_polite(&self) -> bool {
        is_polite(&self.own, &self.remote)
    }

    /// Whether we initiate the handshake.
    pub fn is_initiator(&self) -> bool {
        !self.is_polite()
    }

    /// Where the link is.
    pub fn state(&self) -> LinkState {
        match self.state {
            State::Waiting => LinkState::Waiting,
            State::Handshaking { .. } => LinkState::Handshaking,
            State::Established { .. } => LinkState::Established,
            State::Failed => LinkState::Failed,
        }
    }

    /// The peer's authenticated key, once established.
    pub fn peer_identity(&self) -> Option<&PublicIdentity> {
        self.peer_identity.as_ref()
    }

    /// The peer's display name, once it said it.
    pub fn peer_name(&self) -> Option<&str> {
        self.peer_name.as_deref()
    }

    /// Counters.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    fn fail(&mut self, error: LinkError) {
        if let LinkError::Handshake(e) = &error {
            if let Some(reject) = e.reject_message() {
                self.transmits.push_back(reject);
            }
        }
        self.state = State::Failed;
        self.early.clear();
        self.open = None;
        self.events.push_back(LinkEvent::Failed(error));
    }

    /// The control channel opened. `local_sdp` and `remote_sdp` are the connection's
    /// current local and remote descriptions; their DTLS fingerprints bind the handshake
    /// to this very connection.
    pub fn channel_open(
        &mut self,
        local_sdp: &str,
        remote_sdp: &str,
        now: Duration,
        rng: &mut impl CryptoRng,
    ) {
        let fingerprint = |sdp, side| match the_dtls_fingerprint(sdp) {
            Ok(fp) => Ok(fp),
            Err(FingerprintProblem::Missing) => Err(LinkError::NoDtlsFingerprint(side)),
            Err(_) => Err(LinkError::SeveralDtlsFingerprints(side)),
        };
        let binding = match (fingerprint(local_sdp, "local"), fingerprint(remote_sdp, "remote")) {
            (Ok(local), Ok(remote)) => ChannelBinding::new(local, remote),
            (Err(e), _) | (_, Err(e)) => return self.fail(e),
        };
        let binding = match binding {
            Ok(b) => b,
            Err(e) => return self.fail(e.into()),
        };
        self.binding = Some(binding.clone());
        // What both sides take: the remote's limit is what we may send, and our own
        // stack may refuse to send more than it would take (webrtc-rs does).
        self.set_max_packet(max_message_size(local_sdp).min(max_message_size(remote_sdp)));
        let deadline = HandshakeDeadline::new(now, self.config.handshake_timeout);
        let secret = match &self.pair_secret {
            Some(secret) => secret,
            None if self.network.needs_pake() => return self.fail(LinkError::NoPassphraseCheck),
            None => self.network.secret(),
        };
        let (handshake, retransmit) = if self.is_initiator() {
            let (hs, init) = HandshakeInitiator::new(rng, &self.identity, secret, &binding);
            self.transmits.push_back(init);
            let retransmit = Retransmit::start(now, self.config.handshake_retransmit);
            (Handshake::Initiator(hs), Some(retransmit))
        } else {
            let hs = HandshakeResponder::new(&self.identity, secret, &binding);
            (Handshake::Responder(hs), None)
        };
        self.state = State::Handshaking { handshake, deadline, retransmit };
        // Anything that arrived before the channel was reported open.
        for bytes in std::mem::take(&mut self.early) {
            self.receive_owned(bytes, now, rng);
        }
    }

    /// The control channel closed or the connection was lost: the session ends, and the
    /// next [`Self::channel_open`] runs a fresh handshake.
    pub fn channel_closed(&mut self) {
        self.state = State::Waiting;
        self.early.clear();
        self.open = None;
    }

    /// The largest message the connection's control channel carries (what the browser or
    /// SCTP stack negotiated with the remote: Chromium's 256 KiB, webrtc-rs' 64 KiB by
    /// default), told by the driver once it knows. File-transfer frames sent one after
    /// another are then sealed together, in packets up to that size (at most
    /// [`MAX_PACKET_LEN`]), when [`Self::flush`] is called: three 64 KiB chunks in one
    /// message instead of three, and each message costs both browsers about as much again
    /// in SCTP, IPC and events (`core/TRANSFER.md`, "Chromium's per-message cost").
    pub fn set_max_packet(&mut self, bytes: usize) {
        self.max_packet = bytes.min(MAX_PACKET_LEN);
    }

    /// Seals the file-transfer frames still waiting (see [`Self::set_max_packet`]) into
    /// their packet, the next [`Self::poll_transmit`]. Frames wait only for this: the
    /// node calls it once it has handled what the driver gave it.
    pub fn flush(&mut self) {
        let Some((mut packet, at)) = self.open.take() else { return };
        let State::Established { sessions, .. } = &mut self.state else { return };
        let len = packet.len() + TAG_LEN;
        packet.resize(len, 0);
        match sessions.get_mut(Channel::Control).seal_in_place(&mut packet, at) {
            Ok(()) => {
                self.stats.packets_sent += 1;
                self.stats.bytes_sent += packet.len() as u64;
                self.transmits.push_back(std::mem::take(&mut *packet));
            }
            Err(e) => self.fail(LinkError::Transport(e)),
        }
    }

    /// Whether file-transfer frames wait for [`Self::flush`].
    pub fn has_unflushed(&self) -> bool {
        self.open.is_some()
    }

    /// Adds a file-transfer frame (see [`Self::send_transfer_with`]) to the packet being
    /// filled, sealing that one first if the frame would not fit. `None` if the frame
    /// cannot share a packet (no size known, or too big to go two to a packet).
    fn pack_transfer<F: FnOnce(&mut Vec<u8>) -> u8>(
        &mut self,
        body_len: usize,
        body: F,
        now: Duration,
    ) -> Result<Option<F>, LinkError> {
        let frame_len = FRAME_HEADER_LEN + body_len;
        if self.max_packet < PACKET_OVERHEAD + 2 * frame_len {
            return Ok(Some(body));
        }
        if let Some((packet, _)) = &self.open {
            if packet.len() + frame_len + TAG_LEN > self.max_packet {
                self.flush();
            }
        }
        if self.state() != LinkState::Established {
            return Err(LinkError::NotEstablished);
        }
        let max_packet = self.max_packet;
        let (packet, _) = self.open.get_or_insert_with(|| {
            let mut packet = Zeroizing::new(Vec::with_capacity(max_packet));
            packet.resize(PACKET_HEADER_LEN, 0);
            (packet, now)
        });
        let start = packet.len();
        let result = match encode_frame_with(packet, body) {
            Ok(t) if !FILE_TRANSFER_TYPES.contains(&t) => Err(LinkError::NotTransferFrame(t)),
            Ok(_) if packet.len() + TAG_LEN > max_packet => {
                Err(LinkError::Transport(TransportError::TooLarge))
            }
            Ok(_) => return Ok(None),
            Err(e) => Err(LinkError::Transport(TransportError::Frame(e))),
        };
        // Not sent: the frames before it stay, an empty packet goes.
        packet.truncate(start);
        if start == PACKET_HEADER_LEN {
            self.open = None;
        }
        result
    }

    /// We are leaving: tells an established peer with a Close frame (the next
    /// [`Self::poll_transmit`]) and ends the session like [`Self::channel_closed`].
    pub fn close(&mut self, now: Duration) {
        if self.state() == LinkState::Established {
            self.send_frames(&[Frame::Close { code: 0 }], now);
        }
        self.channel_closed();
    }

    /// Bytes that arrived on either data channel.
    pub fn receive(&mut self, bytes: &[u8], now: Duration, rng: &mut impl CryptoRng) {
        self.receive_owned(bytes.to_vec(), now, rng);
    }

    /// [`Self::receive`] of bytes the caller gives away: a transport packet is opened in
    /// its own buffer, which becomes the body of the frame it carries if it carries one
    /// (a file chunk, an IP packet), so bulk data is not copied on the way in.
    pub fn receive_owned(&mut self, bytes: Vec<u8>, now: Duration, rng: &mut impl CryptoRng) {
        let kind = message_kind(&bytes);
        let early = match self.state {
            State::Waiting => true,
            State::Handshaking { .. } => kind == Some(MessageKind::Transport),
            State::Established { .. } | State::Failed => false,
        };
        if early {
            if self.early.len() < MAX_EARLY_PACKETS {
                self.early.push_back(bytes);
            } else {
                self.stats.packets_rejected += 1;
            }
            return;
        }
        match &mut self.state {
            State::Waiting => {}
            State::Handshaking { handshake, retransmit, .. } => {
                if kind != Some(MessageKind::Handshake) {
                    self.stats.packets_rejected += 1;
                    return;
                }
                // Glare: the peer sent an Init too, so both sides started as initiator
                // (their views of who is polite differ, as when one side still knows the
                // other under an old server id after a signaling process died). The side
                // whose Init is the larger becomes the responder and answers the other's;
                // the other ignores the Init it got and waits for that answer. Both
                // compare the same two messages, so they agree without a round trip.
                if let Handshake::Initiator(_) = handshake {
                    if bytes.first() == Some(&MSG_INIT) {
                        let ours = handshake.retransmit().unwrap_or_default();
                        let secret = match &self.pair_secret {
                            Some(secret) => secret,
                            None => self.network.secret(),
                        };
                        match &self.binding {
                            Some(binding) if ours.as_slice() > bytes.as_slice() => {
                                tracing::debug!("handshake glare with {}: answering", self.remote);
                                let hs = HandshakeResponder::new(&self.identity, secret, binding);
                                *handshake = Handshake::Responder(hs);
                                *retransmit = None;
                            }
                            _ => {
                                tracing::debug!("handshake glare with {}: waiting", self.remote);
                                return;
                            }
                        }
                    }
                }
                match handshake.handle(&bytes, rng) {
                    Ok(step) => {
                        if step.message.is_some() && retransmit.is_none() {
                            // The responder's Response: resent until the Finish comes.
                            *retransmit =
                                Some(Retransmit::start(now, self.config.handshake_retransmit));
                        }
                        self.advance(step, now, rng);
                    }
                    Err(e) => self.fail(e.into()),
                }
            }
            State::Established { sessions, last_heard, handshake, .. } => {
                if kind != Some(MessageKind::Transport) {
                    // Our Finish was lost and the responder resends its Response: answer
                    // with the same Finish. Anything else is a late or replayed handshake
                    // message: the session stays.
                    let again = handshake
                        .as_mut()
                        .and_then(|hs| hs.handle(&bytes, rng).ok())
                        .and_then(|step| step.message);
                    match again {
                        Some(finish) => self.transmits.push_back(finish),
                        None => self.stats.packets_rejected += 1,
                    }
                    return;
                }
                let len = bytes.len() as u64;
                match sessions.open_frames_owned(bytes, now) {
                    Ok((channel, frames)) => {
                        *last_heard = now;
                        // The peer sends only once established: it has our Finish.
                        *handshake = None;
                        self.stats.packets_received += 1;
                        self.stats.bytes_received += len;
                        // One Pong per packet, for its last Ping: a packet packed with
                        // thousands of 11-byte Pings must not make us send thousands of
                        // packets back.
                        let mut ping = None;
                        for frame in frames {
                            match frame {
                                Frame::Ping { timestamp } => ping = Some(timestamp),
                                // Proof of the fast path only where it came on it.
                                Frame::Unknown { frame_type: FRAME_FAST_PATH, body } => {
                                    if channel == Channel::FastPath {
                                        self.events.push_back(LinkEvent::FastPath(body));
                                    }
                                }
                                frame => self.on_frame(frame, now),
                            }
                        }
                        if let Some(timestamp) = ping {
                            self.send_frames(&[Frame::Pong { timestamp }], now);
                        }
                    }
                    Err(TransportError::Exhausted) => {
                        self.fail(LinkError::Transport(TransportError::Exhausted));
                    }
                    Err(_) => self.stats.packets_rejected += 1,
                }
            }
            State::Failed => self.stats.packets_rejected += 1,
        }
    }

    fn advance(&mut self, step: HandshakeStep, now: Duration, rng: &mut impl CryptoRng) {
        if let Some(msg) = step.message {
            self.transmits.push_back(msg);
        }
        let Some(established) = step.established else { return };
        let fingerprint = established.peer.fingerprint();
        self.peer_identity = Some(established.peer);
        self.ping_epoch = now;
        self.stats.established_at = Some(now);
        let handshake = match std::mem::replace(&mut self.state, State::Waiting) {
            State::Handshaking { handshake: hs @ Handshake::Initiator(_), .. } => Some(hs),
            _ => None,
        };
        self.state = State::Established {
            sessions: Box::new(ChannelSessions::new(
                established.session,
                established.data,
                established.fast_path,
            )),
            next_ping: now.saturating_add(self.config.ping_interval),
            last_heard: now,
            handshake,
        };
        self.events.push_back(LinkEvent::Established { identity: established.peer, fingerprint });
        let hello = Frame::Hello { name: self.own_name.clone() };
        // The first ping right away gives an RTT as soon as the peer answers.
        let ping = Frame::Ping { timestamp: micros(now) };
        match self.routes.clone() {
            Some(body) => {
                let routes = Frame::Unknown { frame_type: FRAME_ROUTES, body };
                self.send_frames(&[hello, routes, ping], now)
            }
            None => self.send_frames(&[hello, ping], now),
        };
        for bytes in std::mem::take(&mut self.early) {
            self.receive_owned(bytes, now, rng);
        }
    }

    fn on_frame(&mut self, frame: Frame, now: Duration) {
        match frame {
            Frame::Message(text) => self.events.push_back(LinkEvent::Message { text }),
            Frame::Data(data) => self.events.push_back(LinkEvent::Data(data)),
            Frame::Hello { name } => {
                // Kept and shown cleaned, whatever the peer sent (see `text::clean_name`).
                let name = crate::text::clean_name(&name, MAX_NAME_LEN);
                self.peer_name = Some(name.clone());
                self.events.push_back(LinkEvent::Hello { name });
            }
            // Answered once per packet, by the caller.
            Frame::Ping { .. } => {}
            Frame::Pong { timestamp } => {
                let rtt = micros(now).saturating_sub(timestamp);
                self.events.push_back(LinkEvent::Rtt(Duration::from_micros(rtt)));
            }
            Frame::Close { .. } => self.channel_closed(),
            Frame::Unknown { frame_type: FRAME_ROUTES, body } => {
                self.events.push_back(LinkEvent::Routes(body));
            }
            Frame::Unknown { frame_type, body } if FILE_TRANSFER_TYPES.contains(&frame_type) => {
                self.events.push_back(LinkEvent::Transfer { frame_type, body });
            }
            // Frames of newer peers.
            _ => {}
        }
    }

    /// Changes the name we announce: sent at once if the session is up (else it goes in
    /// the `Hello` after the handshake). The peer reads the key's trust again under it.
    pub fn set_own_name(&mut self, name: &str, now: Duration) {
        self.own_name = clip_name(name);
        let hello = Frame::Hello { name: self.own_name.clone() };
        let _ = self.send_frames(&[hello], now);
    }

    fn send_frames(&mut self, frames: &[Frame], now: Duration) -> Option<()> {
        // Frames keep their order: file-transfer frames waiting for a packet go first.
        self.flush();
        let State::Established { sessions, .. } = &mut self.state else { return None };
        match sessions.get_mut(Channel::Control).seal_frames(frames, now) {
            Ok(packet) => {
                self.stats.packets_sent += 1;
                self.stats.bytes_sent += packet.len() as u64;
                self.transmits.push_back(packet);
                Some(())
            }
            Err(e) => {
                self.fail(LinkError::Transport(e));
                None
            }
        }
    }

    /// Sends a chat message on the control channel.
    pub fn send_message(&mut self, text: &str, now: Duration) -> Result<(), LinkError> {
        if text.len() > MAX_MESSAGE_LEN {
            return Err(LinkError::MessageTooLong { len: text.len() });
        }
        if self.state() != LinkState::Established {
            return Err(LinkError::NotEstablished);
        }
        self.send_frames(&[Frame::Message(text.to_string())], now).ok_or(LinkError::NotEstablished)
    }

    /// Sends a file-transfer frame (type in [`FILE_TRANSFER_TYPES`]) on the control
    /// channel.
    pub fn send_transfer(
        &mut self,
        frame_type: u8,
        body: Vec<u8>,
        now: Duration,
    ) -> Result<(), LinkError> {
        if !FILE_TRANSFER_TYPES.contains(&frame_type) {
            return Err(LinkError::NotTransferFrame(frame_type));
        }
        if self.state() != LinkState::Established {
            return Err(LinkError::NotEstablished);
        }
        self.send_frames(&[Frame::Unknown { frame_type, body }], now)
            .ok_or(LinkError::NotEstablished)
    }

    /// Sends one file-transfer frame whose body `body` appends to the packet's buffer
    /// (about `body_len` bytes) and whose type it returns (one in [`FILE_TRANSFER_TYPES`]):
    /// a chunk's bytes are copied once, into the packet.
    pub fn send_transfer_with(
        &mut self,
        body_len: usize,
        body: impl FnOnce(&mut Vec<u8>) -> u8,
        now: Duration,
    ) -> Result<(), LinkError> {
        let Some(body) = self.pack_transfer(body_len, body, now)? else { return Ok(()) };
        let State::Established { sessions, .. } = &mut self.state else {
            return Err(LinkError::NotEstablished);
        };
        let mut frame_type = None;
        let sealed = sessions.get_mut(Channel::Control).seal_with(
            FRAME_HEADER_LEN + body_len,
            now,
            |packet| {
                frame_type = Some(encode_frame_with(packet, body)?);
                Ok(())
            },
        );
        match (sealed, frame_type) {
            (Ok(_), Some(t)) if !FILE_TRANSFER_TYPES.contains(&t) => {
                // Sealed but never sent: the counter it used is simply skipped.
                Err(LinkError::NotTransferFrame(t))
            }
            (Ok(packet), _) => {
                self.stats.packets_sent += 1;
                self.stats.bytes_sent += packet.len() as u64;
                self.transmits.push_back(packet);
                Ok(())
            }
            (Err(e), _) => {
                self.fail(LinkError::Transport(e));
                Err(LinkError::NotEstablished)
            }
        }
    }

    /// Sends several file-transfer frames in one packet (small ones, such as chunk
    /// requests: one packet and one seal instead of many).
    pub fn send_transfers(
        &mut self,
        frames: Vec<(u8, Vec<u8>)>,
        now: Duration,
    ) -> Result<(), LinkError> {
        if let Some((t, _)) = frames.iter().find(|(t, _)| !FILE_TRANSFER_TYPES.contains(t)) {
            return Err(LinkError::NotTransferFrame(*t));
        }
        if self.state() != LinkState::Established {
            return Err(LinkError::NotEstablished);
        }
        if frames.is_empty() {
            return Ok(());
        }
        let frames: Vec<Frame> = frames
            .into_iter()
            .map(|(frame_type, body)| Frame::Unknown { frame_type, body })
            .collect();
        self.send_frames(&frames, now).ok_or(LinkError::NotEstablished)
    }

    /// Our route announcement (encoded, see `crate::node::Announcement`): sent now if the
    /// session is up, and with our name whenever a session is established, so that a
    /// peer learns our name and our addresses from the same packet.
    pub fn set_routes(&mut self, body: Vec<u8>, now: Duration) {
        self.routes = Some(body.clone());
        if self.state() == LinkState::Established {
            self.send_frames(&[Frame::Unknown { frame_type: FRAME_ROUTES, body }], now);
        }
    }

    /// Seals `data` (an IP packet) as one packet for the unreliable data channel, with
    /// that channel's keys.
    pub fn seal_data(&mut self, data: &[u8], now: Duration) -> Result<Vec<u8>, LinkError> {
        self.seal_frame(Channel::Data, FRAME_DATA, data, now)
    }

    /// Seals `data` (an IP packet) as one packet for the fast path (a plain UDP datagram
    /// on the selected ICE pair), with the fast path's keys.
    pub fn seal_fast_data(&mut self, data: &[u8], now: Duration) -> Result<Vec<u8>, LinkError> {
        self.seal_frame(Channel::FastPath, FRAME_DATA, data, now)
    }

    /// Seals a fast-path probe or ack (`crate::node::FastPathMessage`'s encoding) as one
    /// packet for the fast path.
    pub fn seal_fast_message(&mut self, body: &[u8], now: Duration) -> Result<Vec<u8>, LinkError> {
        self.seal_frame(Channel::FastPath, FRAME_FAST_PATH, body, now)
    }

    /// One frame of `frame_type` with `body`, sealed alone in a packet of `channel`.
    fn seal_frame(
        &mut self,
        channel: Channel,
        frame_type: u8,
        body: &[u8],
        now: Duration,
    ) -> Result<Vec<u8>, LinkError> {
        let State::Established { sessions, .. } = &mut self.state else {
            return Err(LinkError::NotEstablished);
        };
        let packet = sessions
            .get_mut(channel)
            .seal_with(FRAME_HEADER_LEN + body.len(), now, |packet| {
                encode_frame_with(packet, |out| {
                    out.extend_from_slice(body);
                    frame_type
                })
                .map(drop)
            })
            .map_err(LinkError::Transport)?;
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += packet.len() as u64;
        Ok(packet)
    }

    /// When [`Self::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match &self.state {
            State::Handshaking { deadline, retransmit, .. } => {
                let deadline = deadline.deadline();
                Some(retransmit.map_or(deadline, |r| r.at.min(deadline)))
            }
            State::Established { sessions, next_ping, last_heard, .. } => {
                let silent = last_heard.saturating_add(self.config.idle_timeout);
                let due = (*next_ping).min(silent);
                Some(sessions.poll_timeout().map_or(due, |t| t.min(due)))
            }
            State::Waiting | State::Failed => None,
        }
    }

    /// Runs what is due at `now`: handshake deadline and retransmissions, pings, key
    /// expiry.
    pub fn handle_timeout(&mut self, now: Duration) {
        match &mut self.state {
            State::Handshaking { handshake, deadline, retransmit } => {
                if let Err(e) = deadline.check(now) {
                    self.fail(e.into());
                    return;
                }
                if let Some(r) = retransmit.filter(|r| now >= r.at) {
                    *retransmit = Some(r.next(now));
                    if let Some(msg) = handshake.retransmit() {
                        self.transmits.push_back(msg);
                    }
                }
            }
            State::Established { sessions, next_ping, last_heard, .. } => {
                if now >= last_heard.saturating_add(self.config.idle_timeout) {
                    let silent = now.saturating_sub(*last_heard);
                    self.fail(LinkError::PeerSilent(silent));
                    return;
                }
                sessions.handle_timeout(now);
                if now >= *next_ping {
                    *next_ping = now.saturating_add(self.config.ping_interval);
                    let ping = Frame::Ping { timestamp: micros(now) };
                    self.send_frames(&[ping], now);
                }
            }
            State::Waiting | State::Failed => {}
        }
    }

    /// The next bytes to send on the control channel. Chunks being packed are not among
    /// them until [`Self::flush`] (which [`crate::node::Node`] calls once it is drained).
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }
}

fn micros(t: Duration) -> u64 {
    u64::try_from(t.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityKeyPair;
    use chacha20::ChaCha20Rng;
    use chacha20::rand_core::SeedableRng;

    /// A packet packed with Pings (each frame 11 bytes: thousands fit in one) is answered
    /// with one Pong, not one packet per Ping: no amplification for a hostile member.
    /// Two links with established sessions, over descriptions that say
    /// `a=max-message-size:` `max` (no such line for `None`).
    fn established(max: Option<usize>, rng: &mut ChaCha20Rng) -> (PeerLink, PeerLink) {
        let net = Network::from_invite(&"Q".repeat(43)).unwrap();
        let (pa, pb) = (PeerId::new("aaaa").unwrap(), PeerId::new("bbbb").unwrap());
        let (ia, ib) = (IdentityKeyPair::generate(rng), IdentityKeyPair::generate(rng));
        let config = PeerLinkConfig::default();
        let mut a = PeerLink::new(pa.clone(), pb.clone(), ia, &net, "a", config);
        let mut b = PeerLink::new(pb, pa, ib, &net, "b", config);
        let max = max.map_or(String::new(), |m| format!("a=max-message-size:{m}\r\n"));
        let sdp = |fp: &str| format!("v=0\r\na=fingerprint:sha-256 {fp}\r\n{max}");
        let now = Duration::ZERO;
        a.channel_open(&sdp("AA"), &sdp("BB"), now, rng);
        b.channel_open(&sdp("BB"), &sdp("AA"), now, rng);
        for _ in 0..10 {
            while let Some(p) = a.poll_transmit() {
                b.receive(&p, now, rng);
            }
            while let Some(p) = b.poll_transmit() {
                a.receive(&p, now, rng);
            }
        }
        assert_eq!((a.state(), b.state()), (LinkState::Established, LinkState::Established));
        while b.poll_event().is_some() {}
        (a, b)
    }

    /// Sends `n` 64 KiB chunk-sized transfer frames from `a` (body byte `i`), then a
    /// message; returns the packets `a` sends and what `b` makes of them.
    fn send_chunks(
        a: &mut PeerLink,
        b: &mut PeerLink,
        n: u8,
        rng: &mut ChaCha20Rng,
    ) -> (Vec<usize>, Vec<LinkEvent>) {
        let now = Duration::ZERO;
        let chunk_type = *FILE_TRANSFER_TYPES.start();
        for i in 0..n {
            a.send_transfer_with(
                64 * 1024,
                |out| {
                    out.extend(std::iter::repeat_n(i, 64 * 1024));
                    chunk_type
                },
                now,
            )
            .unwrap();
        }
        a.send_message("after", now).unwrap();
        let mut sizes = Vec::new();
        while let Some(p) = a.poll_transmit() {
            sizes.push(p.len());
            b.receive(&p, now, rng);
        }
        (sizes, std::iter::from_fn(|| b.poll_event()).collect())
    }

    /// Chunks go three to a packet where both descriptions take 256 KiB messages, one to a
    /// packet where either says nothing (64 KiB), in order and intact either way; a frame
    /// of another kind is not held back behind them.
    #[test]
    fn chunks_share_packets_as_large_as_both_sides_take() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        for (max, packets) in
            [(Some(262_144), vec![3, 3, 1]), (None, vec![1; 7]), (Some(65_536), vec![1; 7])]
        {
            let (mut a, mut b) = established(max, &mut rng);
            let (sizes, events) = send_chunks(&mut a, &mut b, 7, &mut rng);
            // The chunks' packets, then the message's.
            let per_packet: Vec<usize> =
                sizes[..sizes.len() - 1].iter().map(|s| s / (64 * 1024)).collect();
            assert_eq!(per_packet, packets, "max-message-size {max:?}");
            assert!(sizes.iter().all(|s| *s <= MAX_PACKET_LEN));
            let bodies: Vec<u8> = events
                .iter()
                .filter_map(|e| match e {
                    LinkEvent::Transfer { body, .. } => {
                        assert!(body.iter().all(|x| *x == body[0]));
                        Some(body[0])
                    }
                    _ => None,
                })
                .collect();
            assert_eq!(bodies, (0..7).collect::<Vec<u8>>());
            assert!(matches!(events.last(), Some(LinkEvent::Message { text }) if text == "after"));
        }
    }

    /// Packed chunks wait for `flush` (the node's drain), and go with it.
    #[test]
    fn packed_chunks_wait_for_the_flush() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let (mut a, _b) = established(Some(262_144), &mut rng);
        let chunk_type = *FILE_TRANSFER_TYPES.start();
        a.send_transfer_with(
            10,
            |out| {
                out.extend([1; 10]);
                chunk_type
            },
            Duration::ZERO,
        )
        .unwrap();
        assert!(a.has_unflushed());
        assert!(a.poll_transmit().is_none());
        a.flush();
        assert!(!a.has_unflushed());
        assert!(a.poll_transmit().is_some());
    }

    #[test]
    fn a_packet_of_pings_gets_one_pong() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (mut a, mut b) = established(None, &mut rng);
        let now = Duration::ZERO;
        let pings: Vec<Frame> = (0..3000).map(|t| Frame::Ping { timestamp: t }).collect();
        a.send_frames(&pings, now).unwrap();
        let packet = a.poll_transmit().unwrap();
        assert!(a.poll_transmit().is_none());
        let before = b.stats().packets_sent;
        b.receive(&packet, now, &mut rng);
        assert_eq!(b.stats().packets_sent - before, 1);
    }
}
