//! The transport: authenticated encryption of packets between two peers after the
//! handshake, on channels that may lose or reorder packets.
//!
//! A packet is
//!
//! ```text
//! type | epoch (u32 BE) | counter (u64 BE) | ChaCha20-Poly1305(plaintext) | tag (16)
//! ```
//!
//! with the 13-byte header as associated data. The type byte names the [`Channel`] the
//! packet belongs to (0x10 control, 0x11 data, 0x12 the future native fast path): each
//! channel has its own [`Session`] (keys, counters, replay window), so a burst on one
//! channel cannot push a late packet of another out of its window, and a packet sealed
//! for one channel does not open on another. Each direction has its own key chain; the
//! epoch names the key. The nonce is the counter (zero-padded to 12 bytes), which starts
//! at 0 in every epoch and only increases, so no (key, nonce) pair repeats. The receiver
//! keeps a [`ReplayWindow`] per epoch, updated only after the tag verifies.
//!
//! Rekeying is a one-way KDF ratchet: after [`TransportConfig::rekey_after_messages`]
//! packets or [`TransportConfig::rekey_after_time`], the sender moves to the next epoch,
//! whose key is derived from the previous chain key, and erases the old one. The receiver
//! follows when a packet of a later epoch verifies, and keeps the previous epoch's key for
//! [`TransportConfig::previous_key_lifetime`] for packets still in flight.
//!
//! The cipher is [`crate::aead::PacketCipher`] (assembly on native targets), held as a
//! `Box<dyn PacketAead>` so that nothing here is generic over it: the browser build
//! compiles this crate for speed and weft-core for size (see the crate docs). Besides the
//! `Vec`-returning [`Session::seal`] and [`Session::open`], a session seals into and opens
//! in buffers the caller owns ([`Session::seal_into`], [`Session::seal_in_place`],
//! [`Session::open_in_place`]), which allocate nothing.

use std::fmt;
use std::time::Duration;

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::aead::{KEY_LEN, NONCE_LEN, PacketAead, PacketCipher};
use crate::frame::{Frame, FrameError};

/// First byte of a transport packet of the control channel ([`Channel::Control`]).
pub const PACKET_TYPE: u8 = 0x10;
/// First byte of a transport packet of the data channel ([`Channel::Data`]).
pub const DATA_PACKET_TYPE: u8 = 0x11;
/// First byte of a transport packet of the native fast path ([`Channel::FastPath`]).
pub const FAST_PATH_PACKET_TYPE: u8 = 0x12;

/// Which packet stream of a link a packet belongs to. Each has its own keys (derived from
/// the handshake with its own labels), counters and replay window, and its own first
/// byte. All three bytes lie in 16..=19, which RFC 7983 leaves to none of STUN, DTLS,
/// TURN channels or RTP, so the fast path can share a UDP socket with ICE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// The reliable, ordered data channel (id 0): handshake, messages, file transfer.
    Control,
    /// The unordered, unreliable data channel (id 1): IP packets.
    Data,
    /// Reserved: sealed packets sent as plain UDP on the ICE path between native peers.
    FastPath,
}

impl Channel {
    /// Every channel, in order.
    pub const ALL: [Channel; 3] = [Channel::Control, Channel::Data, Channel::FastPath];

    /// The first byte of this channel's packets.
    pub fn packet_type(self) -> u8 {
        match self {
            Self::Control => PACKET_TYPE,
            Self::Data => DATA_PACKET_TYPE,
            Self::FastPath => FAST_PATH_PACKET_TYPE,
        }
    }

    /// The channel a packet says it belongs to, from its first byte.
    pub fn of_packet(packet: &[u8]) -> Option<Self> {
        match *packet.first()? {
            PACKET_TYPE => Some(Self::Control),
            DATA_PACKET_TYPE => Some(Self::Data),
            FAST_PATH_PACKET_TYPE => Some(Self::FastPath),
            _ => None,
        }
    }
}
/// Length of a packet header (type, epoch, counter).
pub const PACKET_HEADER_LEN: usize = 13;
/// Length of the AEAD tag.
pub const TAG_LEN: usize = crate::aead::TAG_LEN;
/// Bytes a packet adds to its plaintext.
pub const PACKET_OVERHEAD: usize = PACKET_HEADER_LEN + TAG_LEN;
/// Largest packet accepted or produced (the data-channel message limit most browsers
/// accept).
pub const MAX_PACKET_LEN: usize = 256 * 1024;
/// Largest plaintext one packet carries.
pub const MAX_PLAINTEXT_LEN: usize = MAX_PACKET_LEN - PACKET_OVERHEAD;

/// Counters a [`ReplayWindow`] remembers below the highest one seen.
pub const REPLAY_WINDOW_SIZE: u64 = ((RING_BLOCKS - 1) * BLOCK_BITS) as u64;

/// Hard cap on packets per epoch, whatever the configuration says.
pub const MAX_MESSAGES_PER_EPOCH: u64 = 1 << 60;

const BLOCK_BITS: usize = 64;
const RING_BLOCKS: usize = 64;

const PACKET_KEY_LABEL: &[u8] = b"weft/v1/packet key";
const NEXT_CHAIN_LABEL: &[u8] = b"weft/v1/next chain key";

/// Rekeying and key-retention settings. Both peers may use different values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportConfig {
    /// Move to a new key after this many packets in one epoch (capped at
    /// [`MAX_MESSAGES_PER_EPOCH`]).
    pub rekey_after_messages: u64,
    /// Move to a new key when the current one was first used this long ago.
    pub rekey_after_time: Duration,
    /// How long the receiver keeps the previous epoch's key after moving to a new one.
    pub previous_key_lifetime: Duration,
    /// How many epochs ahead of its current one the receiver follows (when every packet
    /// of the epochs between was lost).
    pub max_epoch_skip: u32,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            rekey_after_messages: 1 << 24,
            rekey_after_time: Duration::from_secs(120),
            previous_key_lifetime: Duration::from_secs(10),
            max_epoch_skip: 8,
        }
    }
}

/// Why a packet was not produced or not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Shorter than a header and a tag.
    #[error("packet too short")]
    Truncated,
    /// The caller's buffer cannot hold the packet.
    #[error("buffer too small: the packet needs {needed} bytes")]
    BufferTooSmall {
        /// Bytes the packet needs.
        needed: usize,
    },
    /// The first byte is not a transport packet type.
    #[error("not a transport packet")]
    NotTransport,
    /// A transport packet of another [`Channel`] than this session's.
    #[error("a packet of another channel")]
    WrongChannel,
    /// Longer than [`MAX_PACKET_LEN`] (or a plaintext longer than [`MAX_PLAINTEXT_LEN`]).
    #[error("packet larger than {MAX_PACKET_LEN} bytes")]
    TooLarge,
    /// The tag did not verify: the packet was altered, or is not from this session.
    #[error("packet failed authentication")]
    Authentication,
    /// This counter was already accepted in this epoch.
    #[error("replayed or duplicate packet")]
    Replay,
    /// The counter is older than the replay window.
    #[error("packet older than the replay window")]
    TooOld,
    /// The packet's epoch is not one this side holds a key for (too old, expired or too
    /// far ahead).
    #[error("packet from an unknown or expired key epoch {0}")]
    UnknownEpoch(u32),
    /// The session used up its key epochs; start a new handshake.
    #[error("session exhausted: start a new handshake")]
    Exhausted,
    /// The plaintext is not a valid frame sequence.
    #[error("invalid frames: {0}")]
    Frame(#[from] FrameError),
}

/// Why a [`ReplayWindow`] refused a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayRejection {
    /// Already seen.
    Duplicate,
    /// More than [`REPLAY_WINDOW_SIZE`] below the highest counter seen.
    TooOld,
}

impl From<ReplayRejection> for TransportError {
    fn from(r: ReplayRejection) -> Self {
        match r {
            ReplayRejection::Duplicate => Self::Replay,
            ReplayRejection::TooOld => Self::TooOld,
        }
    }
}

/// A sliding anti-replay window over 64-bit counters (RFC 6479's bitmap ring, as in
/// wireguard-go): accepts each counter at most once, and only counters no more than
/// [`REPLAY_WINDOW_SIZE`] below the highest accepted.
///
/// Call [`Self::check`] before decrypting (cheap early reject) and [`Self::update`] only
/// after the packet authenticated.
#[derive(Clone)]
pub struct ReplayWindow {
    /// Highest counter accepted, if any.
    last: Option<u64>,
    ring: [u64; RING_BLOCKS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayWindow").field("last", &self.last).finish_non_exhaustive()
    }
}

impl ReplayWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self { last: None, ring: [0; RING_BLOCKS] }
    }

    fn slot(counter: u64) -> (usize, u64) {
        let block = (counter / BLOCK_BITS as u64) as usize % RING_BLOCKS;
        (block, 1u64 << (counter % BLOCK_BITS as u64))
    }

    /// Whether `counter` would be accepted now (does not record it).
    pub fn check(&self, counter: u64) -> Result<(), ReplayRejection> {
        let Some(last) = self.last else {
            return Ok(());
        };
        if counter > last {
            return Ok(());
        }
        if last - counter > REPLAY_WINDOW_SIZE {
            return Err(ReplayRejection::TooOld);
        }
        let (block, bit) = Self::slot(counter);
        if self.ring[block] & bit != 0 { Err(ReplayRejection::Duplicate) } else { Ok(()) }
    }

    /// Records `counter` if it is acceptable; call only for authenticated packets.
    pub fn update(&mut self, counter: u64) -> Result<(), ReplayRejection> {
        self.check(counter)?;
        let newer = match self.last {
            None => {
                self.ring = [0; RING_BLOCKS];
                true
            }
            Some(last) if counter > last => {
                let last_block = last / BLOCK_BITS as u64;
                let new_block = counter / BLOCK_BITS as u64;
                let advance = (new_block - last_block).min(RING_BLOCKS as u64);
                for i in 1..=advance {
                    let b = ((last_block + i) % RING_BLOCKS as u64) as usize;
                    self.ring[b] = 0;
                }
                true
            }
            Some(_) => false,
        };
        if newer {
            self.last = Some(counter);
        }
        let (block, bit) = Self::slot(counter);
        self.ring[block] |= bit;
        Ok(())
    }

    /// The highest counter accepted so far.
    pub fn highest(&self) -> Option<u64> {
        self.last
    }
}

/// One step of a direction's key chain: the packet key of this epoch and the chain key of
/// the next.
fn ratchet(chain: &[u8; 32]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let mut key = Zeroizing::new([0u8; 32]);
    let mut next = Zeroizing::new([0u8; 32]);
    // A 32-byte chain key is a valid PRK, and 32-byte outputs are within HKDF's limits.
    match Hkdf::<Sha256>::from_prk(chain) {
        Ok(hk) => {
            if hk.expand(PACKET_KEY_LABEL, key.as_mut()).is_err()
                || hk.expand(NEXT_CHAIN_LABEL, next.as_mut()).is_err()
            {
                unreachable!("HKDF output length within limits");
            }
        }
        Err(_) => unreachable!("32-byte PRK is valid for HKDF-SHA256"),
    }
    (key, next)
}

fn nonce(counter: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

fn header(channel: Channel, epoch: u32, counter: u64) -> [u8; PACKET_HEADER_LEN] {
    let mut h = [0u8; PACKET_HEADER_LEN];
    h[0] = channel.packet_type();
    h[1..5].copy_from_slice(&epoch.to_be_bytes());
    h[5..].copy_from_slice(&counter.to_be_bytes());
    h
}

/// A cipher under a key, of the kind a session was made with: how a session makes the
/// cipher of its next epoch.
type NewCipher = fn(&[u8; KEY_LEN]) -> Box<dyn PacketAead>;

fn new_cipher<C: PacketAead + 'static>(key: &[u8; KEY_LEN]) -> Box<dyn PacketAead> {
    Box::new(C::new(key))
}

struct SendState {
    epoch: u32,
    cipher: Box<dyn PacketAead>,
    next_chain: Zeroizing<[u8; 32]>,
    counter: u64,
    started_at: Option<Duration>,
}

impl SendState {
    fn new(new_cipher: NewCipher, chain: &[u8; 32], epoch: u32) -> Self {
        let (key, next_chain) = ratchet(chain);
        Self { epoch, cipher: new_cipher(&key), next_chain, counter: 0, started_at: None }
    }
}

struct RecvEpoch {
    epoch: u32,
    cipher: Box<dyn PacketAead>,
    window: ReplayWindow,
}

impl RecvEpoch {
    fn new(new_cipher: NewCipher, key: &[u8; 32], epoch: u32) -> Self {
        Self { epoch, cipher: new_cipher(key), window: ReplayWindow::new() }
    }

    /// Authenticates `header` and `body` (ciphertext, then tag) and decrypts the
    /// ciphertext in place; records the counter only if the tag verified. Returns the
    /// plaintext's length.
    fn open(
        &mut self,
        header: &[u8],
        body: &mut [u8],
        counter: u64,
    ) -> Result<usize, TransportError> {
        self.window.check(counter)?;
        let ct_len = body.len().checked_sub(TAG_LEN).ok_or(TransportError::Truncated)?;
        let (ct, tag) = body.split_at_mut(ct_len);
        let tag: [u8; TAG_LEN] = (&*tag).try_into().map_err(|_| TransportError::Truncated)?;
        self.cipher
            .open_in_place(&nonce(counter), header, ct, &tag)
            .map_err(|_| TransportError::Authentication)?;
        self.window.update(counter)?;
        Ok(ct_len)
    }
}

/// Checks a packet's length and type (that of `channel`), and reads its epoch and
/// counter.
fn parse_header(packet: &[u8], channel: Channel) -> Result<(u32, u64), TransportError> {
    if packet.len() > MAX_PACKET_LEN {
        return Err(TransportError::TooLarge);
    }
    if packet.len() < PACKET_OVERHEAD {
        return Err(TransportError::Truncated);
    }
    match Channel::of_packet(packet) {
        None => return Err(TransportError::NotTransport),
        Some(c) if c != channel => return Err(TransportError::WrongChannel),
        Some(_) => {}
    }
    let header: &[u8; PACKET_HEADER_LEN] =
        packet[..PACKET_HEADER_LEN].try_into().map_err(|_| TransportError::Truncated)?;
    let [_, e0, e1, e2, e3, c @ ..] = *header;
    let epoch = u32::from_be_bytes([e0, e1, e2, e3]);
    let counter = u64::from_be_bytes(c);
    Ok((epoch, counter))
}

/// An established session of one [`Channel`]: seals outgoing packets and opens incoming
/// ones.
///
/// Made by the handshake (weft-core's `handshake`). Time is the caller's: pass `now` as a
/// [`Duration`] since any epoch, the same one on every call.
///
/// Its packet cipher is this build's fastest, [`PacketCipher`]; the benchmarks and tests
/// also run sessions on the other implementation ([`Session::with_cipher`]).
pub struct Session {
    channel: Channel,
    config: TransportConfig,
    new_cipher: NewCipher,
    send: SendState,
    recv: RecvEpoch,
    /// Chain key of the receiver's next epoch.
    recv_next_chain: Zeroizing<[u8; 32]>,
    previous: Option<(RecvEpoch, Duration)>,
    session_id: [u8; 32],
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("channel", &self.channel)
            .field("send_epoch", &self.send.epoch)
            .field("send_counter", &self.send.counter)
            .field("recv_epoch", &self.recv.epoch)
            .field("has_previous_key", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A control-channel session from the two directions' initial chain keys. For the
    /// handshake (weft-core's `handshake`), benchmarks and tests: a session's chain keys
    /// come from a handshake.
    pub fn new(send_chain: &[u8; 32], recv_chain: &[u8; 32], session_id: [u8; 32]) -> Self {
        Self::for_channel(Channel::Control, send_chain, recv_chain, session_id)
    }

    /// A session of `channel` from the two directions' initial chain keys (see
    /// [`Self::new`]).
    pub fn for_channel(
        channel: Channel,
        send_chain: &[u8; 32],
        recv_chain: &[u8; 32],
        session_id: [u8; 32],
    ) -> Self {
        Self::with_cipher::<PacketCipher>(channel, send_chain, recv_chain, session_id)
    }

    /// [`Self::for_channel`] on the packet cipher `C` instead of [`PacketCipher`]: for
    /// benchmarks and tests comparing the two implementations.
    pub fn with_cipher<C: PacketAead + 'static>(
        channel: Channel,
        send_chain: &[u8; 32],
        recv_chain: &[u8; 32],
        session_id: [u8; 32],
    ) -> Self {
        let new_cipher: NewCipher = new_cipher::<C>;
        let (recv_key, recv_next_chain) = ratchet(recv_chain);
        Self {
            channel,
            config: TransportConfig::default(),
            new_cipher,
            send: SendState::new(new_cipher, send_chain, 0),
            recv: RecvEpoch::new(new_cipher, &recv_key, 0),
            recv_next_chain,
            previous: None,
            session_id,
        }
    }

    /// Replaces the rekeying settings.
    pub fn set_config(&mut self, config: TransportConfig) {
        self.config = config;
    }

    /// The rekeying settings in force.
    pub fn config(&self) -> &TransportConfig {
        &self.config
    }

    /// A value both peers share and nobody else knows, naming this session (for binding
    /// higher layers to it). Not a key: do not encrypt with it.
    pub fn session_id(&self) -> &[u8; 32] {
        &self.session_id
    }

    /// The channel whose packets this session seals and opens.
    pub fn channel(&self) -> Channel {
        self.channel
    }

    /// The epoch of the key this side sends with.
    pub fn send_epoch(&self) -> u32 {
        self.send.epoch
    }

    /// The newest epoch this side has received.
    pub fn recv_epoch(&self) -> u32 {
        self.recv.epoch
    }

    /// Encrypts `plaintext` into a new packet.
    pub fn seal(&mut self, plaintext: &[u8], now: Duration) -> Result<Vec<u8>, TransportError> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(TransportError::TooLarge);
        }
        let mut packet = vec![0; PACKET_OVERHEAD + plaintext.len()];
        self.seal_into(plaintext, &mut packet, now)?;
        Ok(packet)
    }

    /// Encrypts `plaintext` into a packet at the start of `out`, which needs room for
    /// `plaintext.len() + PACKET_OVERHEAD` bytes, and returns the packet's length.
    /// Allocates nothing. After an error, what `out` holds is unspecified.
    pub fn seal_into(
        &mut self,
        plaintext: &[u8],
        out: &mut [u8],
        now: Duration,
    ) -> Result<usize, TransportError> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(TransportError::TooLarge);
        }
        let len = PACKET_OVERHEAD + plaintext.len();
        let packet = out.get_mut(..len).ok_or(TransportError::BufferTooSmall { needed: len })?;
        packet[PACKET_HEADER_LEN..len - TAG_LEN].copy_from_slice(plaintext);
        self.seal_in_place(packet, now)?;
        Ok(len)
    }

    /// Seals the packet that `packet` (all of it) becomes: its plaintext is already in
    /// place, `packet[PACKET_HEADER_LEN..packet.len() - TAG_LEN]`; the header is written
    /// over the first [`PACKET_HEADER_LEN`] bytes and the tag over the last [`TAG_LEN`].
    /// For building the plaintext where the packet will be, with no copy.
    pub fn seal_in_place(
        &mut self,
        packet: &mut [u8],
        now: Duration,
    ) -> Result<(), TransportError> {
        if packet.len() > MAX_PACKET_LEN {
            return Err(TransportError::TooLarge);
        }
        let tag_at = packet
            .len()
            .checked_sub(TAG_LEN)
            .filter(|&at| at >= PACKET_HEADER_LEN)
            .ok_or(TransportError::BufferTooSmall { needed: PACKET_OVERHEAD })?;
        self.maybe_rekey(now)?;
        self.send.started_at.get_or_insert(now);
        let counter = self.send.counter;
        let (hdr, rest) = packet.split_at_mut(PACKET_HEADER_LEN);
        hdr.copy_from_slice(&header(self.channel, self.send.epoch, counter));
        let (body, tag) = rest.split_at_mut(tag_at - PACKET_HEADER_LEN);
        tag.copy_from_slice(
            &self
                .send
                .cipher
                .seal_in_place(&nonce(counter), hdr, body)
                .map_err(|_| TransportError::TooLarge)?,
        );
        self.send.counter = counter + 1;
        Ok(())
    }

    /// Encodes `frames` and encrypts them into one packet (encoded in the packet's own
    /// buffer, with no plaintext copy).
    pub fn seal_frames(
        &mut self,
        frames: &[Frame],
        now: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let plaintext_len: usize = frames.iter().map(Frame::encoded_len).sum();
        self.seal_with(plaintext_len, now, |packet| {
            frames.iter().try_for_each(|frame| frame.encode_into(packet))
        })
    }

    /// Encrypts into one packet the plaintext that `write` appends to the buffer it is
    /// given (about `plaintext_len` bytes): frames encoded in the packet's own buffer, so
    /// a large body is copied once, into the packet.
    pub fn seal_with(
        &mut self,
        plaintext_len: usize,
        now: Duration,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), FrameError>,
    ) -> Result<Vec<u8>, TransportError> {
        let capacity = PACKET_OVERHEAD + plaintext_len.min(MAX_PLAINTEXT_LEN);
        // Erased if it is dropped before sealing, with plaintext in it.
        let mut packet = Zeroizing::new(Vec::with_capacity(capacity));
        packet.resize(PACKET_HEADER_LEN, 0);
        write(&mut packet)?;
        if packet.len() - PACKET_HEADER_LEN > MAX_PLAINTEXT_LEN {
            return Err(TransportError::TooLarge);
        }
        let len = packet.len() + TAG_LEN;
        packet.resize(len, 0);
        self.seal_in_place(&mut packet, now)?;
        Ok(std::mem::take(&mut *packet))
    }

    fn maybe_rekey(&mut self, now: Duration) -> Result<(), TransportError> {
        let limit = self.config.rekey_after_messages.clamp(1, MAX_MESSAGES_PER_EPOCH);
        let by_count = self.send.counter >= limit;
        let by_time = self
            .send
            .started_at
            .is_some_and(|t| now.saturating_sub(t) >= self.config.rekey_after_time);
        if by_count || by_time {
            let epoch = self.send.epoch.checked_add(1).ok_or(TransportError::Exhausted)?;
            // The old send state is dropped here: its chain key is erased, and so is its
            // packet key where the cipher erases its key (RustCrypto; not ring, see
            // `crate::aead`).
            self.send = SendState::new(self.new_cipher, &self.send.next_chain.clone(), epoch);
        }
        Ok(())
    }

    /// Authenticates and decrypts a packet into a new buffer.
    ///
    /// Rejects anything altered, replayed, older than the replay window, or from an epoch
    /// whose key is gone. No state changes unless the packet authenticates.
    pub fn open(&mut self, packet: &[u8], now: Duration) -> Result<Vec<u8>, TransportError> {
        self.handle_timeout(now);
        // Refuse what cannot be a packet before copying it.
        parse_header(packet, self.channel)?;
        let mut buf = packet.to_vec();
        let len = self.open_in_place(&mut buf, now)?.len();
        buf.copy_within(PACKET_HEADER_LEN..PACKET_HEADER_LEN + len, 0);
        buf.truncate(len);
        Ok(buf)
    }

    /// Authenticates and decrypts `packet` in place and returns its plaintext, a part of
    /// `packet`. Allocates nothing. Accepts and rejects exactly what [`Self::open`] does;
    /// after an error, `packet` holds no plaintext (and may no longer hold the ciphertext).
    pub fn open_in_place<'p>(
        &mut self,
        packet: &'p mut [u8],
        now: Duration,
    ) -> Result<&'p mut [u8], TransportError> {
        self.handle_timeout(now);
        let (epoch, counter) = parse_header(packet, self.channel)?;
        let (header, body) = packet.split_at_mut(PACKET_HEADER_LEN);
        let len = self.open_body(header, body, epoch, counter, now)?;
        Ok(&mut body[..len])
    }

    /// Opens the body (ciphertext, then tag) of a packet with this header in place, with
    /// the key of its epoch, and returns the plaintext's length.
    fn open_body(
        &mut self,
        header: &[u8],
        body: &mut [u8],
        epoch: u32,
        counter: u64,
        now: Duration,
    ) -> Result<usize, TransportError> {
        if epoch == self.recv.epoch {
            return self.recv.open(header, body, counter);
        }
        if let Some((prev, _)) = self.previous.as_mut() {
            if prev.epoch == epoch {
                return prev.open(header, body, counter);
            }
        }
        let ahead = epoch.saturating_sub(self.recv.epoch);
        if ahead == 0 || ahead > self.config.max_epoch_skip {
            return Err(TransportError::UnknownEpoch(epoch));
        }
        // A later epoch: derive its key, and move there only if the packet verifies.
        let mut chain = self.recv_next_chain.clone();
        for _ in 1..ahead {
            chain = ratchet(&chain).1;
        }
        let (key, next_chain) = ratchet(&chain);
        let mut fresh = RecvEpoch::new(self.new_cipher, &key, epoch);
        let len = fresh.open(header, body, counter)?;
        let old = std::mem::replace(&mut self.recv, fresh);
        self.previous = Some((old, now.saturating_add(self.config.previous_key_lifetime)));
        self.recv_next_chain = next_chain;
        Ok(len)
    }

    /// Opens a packet and decodes its frames.
    pub fn open_frames(
        &mut self,
        packet: &[u8],
        now: Duration,
    ) -> Result<Vec<Frame>, TransportError> {
        let plaintext = Zeroizing::new(self.open(packet, now)?);
        Ok(Frame::decode_all(&plaintext)?)
    }

    /// [`Self::open_frames`] on a packet the caller gives away: opened in its own buffer,
    /// which becomes the body of a lone bytes frame (a file chunk, an IP packet) with no
    /// new buffer and no copy but one move ([`Frame::decode_all_owned`]). Accepts and
    /// rejects exactly what [`Self::open_frames`] does.
    pub fn open_frames_owned(
        &mut self,
        mut packet: Vec<u8>,
        now: Duration,
    ) -> Result<Vec<Frame>, TransportError> {
        // After an error the packet holds no plaintext (see `open_in_place`).
        let len = self.open_in_place(&mut packet, now)?.len();
        packet.truncate(PACKET_HEADER_LEN + len);
        Ok(Frame::decode_all_owned(packet, PACKET_HEADER_LEN)?)
    }

    /// When [`Self::handle_timeout`] next has something to do (erase the previous
    /// epoch's key), if ever.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.previous.as_ref().map(|(_, at)| *at)
    }

    /// Erases the previous epoch's key once its lifetime is over. [`Self::open`] calls it
    /// too; call it from a timer to erase keys promptly on an idle session.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.previous.as_ref().is_some_and(|(_, at)| now >= *at) {
            self.previous = None;
        }
    }
}

/// The sessions of one link, one per [`Channel`], made together by one handshake.
pub struct ChannelSessions {
    control: Session,
    data: Session,
    fast_path: Session,
}

impl fmt::Debug for ChannelSessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelSessions")
            .field("control", &self.control)
            .field("data", &self.data)
            .field("fast_path", &self.fast_path)
            .finish()
    }
}

impl ChannelSessions {
    /// The three sessions of a handshake.
    pub fn new(control: Session, data: Session, fast_path: Session) -> Self {
        Self { control, data, fast_path }
    }

    /// The session of `channel`.
    pub fn get_mut(&mut self, channel: Channel) -> &mut Session {
        match channel {
            Channel::Control => &mut self.control,
            Channel::Data => &mut self.data,
            Channel::FastPath => &mut self.fast_path,
        }
    }

    /// The session of `channel`, to read.
    pub fn get(&self, channel: Channel) -> &Session {
        match channel {
            Channel::Control => &self.control,
            Channel::Data => &self.data,
            Channel::FastPath => &self.fast_path,
        }
    }

    /// Opens a packet with the session of the channel its first byte names, and decodes
    /// its frames.
    pub fn open_frames(
        &mut self,
        packet: &[u8],
        now: Duration,
    ) -> Result<(Channel, Vec<Frame>), TransportError> {
        let channel = Channel::of_packet(packet).ok_or(TransportError::NotTransport)?;
        Ok((channel, self.get_mut(channel).open_frames(packet, now)?))
    }

    /// [`Self::open_frames`] on a packet the caller gives away
    /// ([`Session::open_frames_owned`]).
    pub fn open_frames_owned(
        &mut self,
        packet: Vec<u8>,
        now: Duration,
    ) -> Result<(Channel, Vec<Frame>), TransportError> {
        let channel = Channel::of_packet(&packet).ok_or(TransportError::NotTransport)?;
        Ok((channel, self.get_mut(channel).open_frames_owned(packet, now)?))
    }

    /// The earliest [`Session::poll_timeout`] of the three.
    pub fn poll_timeout(&self) -> Option<Duration> {
        Channel::ALL.iter().filter_map(|c| self.get(*c).poll_timeout()).min()
    }

    /// [`Session::handle_timeout`] on all three.
    pub fn handle_timeout(&mut self, now: Duration) {
        for c in Channel::ALL {
            self.get_mut(c).handle_timeout(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Session, Session) {
        let a = [1u8; 32];
        let b = [2u8; 32];
        (Session::new(&a, &b, [0; 32]), Session::new(&b, &a, [0; 32]))
    }

    #[test]
    fn round_trip_and_reflection_rejected() {
        let (mut a, mut b) = pair();
        let now = Duration::ZERO;
        let p = a.seal(b"hi", now).unwrap();
        assert_eq!(p.len(), 2 + PACKET_OVERHEAD);
        // A packet reflected back to its sender does not open: each direction has its key.
        assert_eq!(a.open(&p, now), Err(TransportError::Authentication));
        assert_eq!(b.open(&p, now).unwrap(), b"hi");
        assert_eq!(b.open(&p, now), Err(TransportError::Replay));
    }

    #[test]
    fn time_based_rekey_and_previous_key_expiry() {
        let (mut a, mut b) = pair();
        let cfg = TransportConfig {
            rekey_after_time: Duration::from_secs(60),
            previous_key_lifetime: Duration::from_secs(5),
            ..TransportConfig::default()
        };
        a.set_config(cfg);
        b.set_config(cfg);
        let old = a.seal(b"old", Duration::from_secs(1)).unwrap();
        let new = a.seal(b"new", Duration::from_secs(61)).unwrap();
        assert_eq!(a.send_epoch(), 1);
        assert_eq!(b.open(&new, Duration::from_secs(62)).unwrap(), b"new");
        assert_eq!(b.recv_epoch(), 1);
        assert_eq!(b.poll_timeout(), Some(Duration::from_secs(67)));
        b.handle_timeout(Duration::from_secs(67));
        assert_eq!(b.open(&old, Duration::from_secs(68)), Err(TransportError::UnknownEpoch(0)));
    }

    /// Packets sealed before the AEAD moved to its own module, `aead.rs` (captured from the
    /// RustCrypto-only implementation): the format, nonces and key ratchet are unchanged,
    /// whichever cipher the session runs on.
    fn packets_match_the_recorded_known_answers<C: PacketAead + 'static>() {
        use sha2::Digest;
        let mut a = Session::with_cipher::<C>(Channel::Control, &[1u8; 32], &[2u8; 32], [0; 32]);
        let mut b = Session::with_cipher::<C>(Channel::Control, &[2u8; 32], &[1u8; 32], [0; 32]);
        // Two packets per epoch: epochs 0, 1 and 2.
        a.set_config(TransportConfig { rekey_after_messages: 2, ..TransportConfig::default() });
        let mut all = Vec::new();
        for (i, len) in [0usize, 1, 15, 64, 1400].into_iter().enumerate() {
            let plaintext: Vec<u8> = (0..len).map(|j| (j * 7 + i) as u8).collect();
            let now = Duration::from_secs(i as u64);
            let packet = a.seal(&plaintext, now).unwrap();
            assert_eq!(b.open(&packet, now).unwrap(), plaintext);
            all.extend_from_slice(&packet);
        }
        let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(
            hex(&all[..PACKET_OVERHEAD * 3 + 1 + 15]),
            "10000000000000000000000000b3cdb062d9127a5510ed30e76a32e496\
             100000000000000000000000012b6df73b61f65101b9b13350744e50a840\
             10000000010000000000000000fc478d3184ff0eb91c9c42e5032ed56f13ae1e48bc68eb7e02269acdeca447"
        );
        assert_eq!(all.len(), 1625);
        assert_eq!(
            hex(&sha2::Sha256::digest(&all)),
            "305cc54a4c994309bef257263b5e6c755cf5f53b2ddca6fc151ffcb3c2d31f0d"
        );
    }

    #[test]
    fn packets_match_the_recorded_known_answers_with_this_builds_cipher() {
        packets_match_the_recorded_known_answers::<PacketCipher>();
    }

    #[test]
    fn packets_match_the_recorded_known_answers_with_rustcrypto() {
        packets_match_the_recorded_known_answers::<crate::aead::RustCryptoChaCha20Poly1305>();
    }

    #[test]
    fn caller_buffer_apis_match_the_allocating_ones() {
        use crate::frame::encode_frames;
        // Two copies of one session: `*1` through the `Vec` APIs, `*2` through the others.
        let (mut a1, mut b1) = pair();
        let (mut a2, mut b2) = pair();
        let cfg = TransportConfig { rekey_after_messages: 3, ..TransportConfig::default() };
        a1.set_config(cfg);
        a2.set_config(cfg);
        let mut buf = [0u8; 2048];
        for (i, len) in [0, 1, 100, 1400, 2048 - PACKET_OVERHEAD].into_iter().enumerate() {
            let plaintext = vec![i as u8; len];
            let now = Duration::from_secs(i as u64);
            let packet = a1.seal(&plaintext, now).unwrap();
            let n = a2.seal_into(&plaintext, &mut buf, now).unwrap();
            assert_eq!(&buf[..n], &packet[..]);
            assert_eq!(b1.open(&packet, now).unwrap(), plaintext);
            assert_eq!(b2.open_in_place(&mut buf[..n], now).unwrap(), &plaintext[..]);
            assert_eq!(b2.open_in_place(&mut packet.clone(), now), Err(TransportError::Replay));
        }
        assert_eq!(a2.send_epoch(), 1);
        let now = Duration::from_secs(9);

        // Too small a buffer: refused, and no counter spent.
        assert_eq!(
            a2.seal_into(b"abc", &mut [0; PACKET_OVERHEAD + 2], now),
            Err(TransportError::BufferTooSmall { needed: PACKET_OVERHEAD + 3 })
        );
        assert_eq!(
            a2.seal_in_place(&mut [0; PACKET_OVERHEAD - 1], now),
            Err(TransportError::BufferTooSmall { needed: PACKET_OVERHEAD })
        );

        // The plaintext built in the packet's own buffer.
        let mut packet = vec![0xee; PACKET_OVERHEAD + 5];
        packet[PACKET_HEADER_LEN..PACKET_HEADER_LEN + 5].copy_from_slice(b"hello");
        a2.seal_in_place(&mut packet, now).unwrap();
        assert_eq!(packet, a1.seal(b"hello", now).unwrap());

        // Frames encoded in the packet's buffer: the same packet as encoding, then sealing.
        let frames =
            [Frame::Message("hi".into()), Frame::Ping { timestamp: 7 }, Frame::Data(vec![])];
        assert_eq!(
            a1.seal_frames(&frames, now).unwrap(),
            a2.seal(&encode_frames(&frames).unwrap(), now).unwrap()
        );
        assert_eq!(b1.open_frames(&a2.seal_frames(&frames, now).unwrap(), now).unwrap(), frames);
    }

    #[test]
    fn open_in_place_rejects_what_open_rejects() {
        let (mut a, mut b1) = pair();
        let (_, mut b2) = pair();
        let now = Duration::ZERO;
        let packet = a.seal(b"payload", now).unwrap();
        let mut altered = Vec::new();
        for i in 0..packet.len() {
            let mut p = packet.clone();
            p[i] ^= 0x01;
            altered.push(p);
        }
        for len in [0, 1, PACKET_HEADER_LEN, PACKET_OVERHEAD - 1, PACKET_OVERHEAD, packet.len() - 1]
        {
            altered.push(packet[..len].to_vec());
        }
        altered.push([packet.as_slice(), &[0]].concat());
        altered.push(vec![PACKET_TYPE; MAX_PACKET_LEN + 1]);
        for p in &altered {
            let by_open = b1.open(p, now).map(|_| ());
            let in_place = b2.open_in_place(&mut p.clone(), now).map(|_| ());
            assert!(by_open.is_err());
            assert_eq!(by_open, in_place, "{p:02x?}");
        }
        assert_eq!(b2.open_in_place(&mut packet.clone(), now).unwrap(), b"payload");
    }

    #[test]
    fn window_basics() {
        let mut w = ReplayWindow::new();
        assert!(w.update(5).is_ok());
        assert_eq!(w.update(5), Err(ReplayRejection::Duplicate));
        assert!(w.update(3).is_ok());
        assert!(w.update(5 + REPLAY_WINDOW_SIZE).is_ok());
        assert_eq!(w.check(5), Err(ReplayRejection::Duplicate));
        assert!(w.check(6).is_ok());
        assert_eq!(w.check(4), Err(ReplayRejection::TooOld));
        assert!(w.update(u64::MAX).is_ok());
        assert_eq!(w.check(u64::MAX), Err(ReplayRejection::Duplicate));
    }
}
