//! The end-to-end handshake: three messages over a WebRTC data channel that authenticate
//! both peers by their long-term keys and the network secret, bind the DTLS connection,
//! and produce a transport [`Session`].
//!
//! Sans-IO: the driver passes in randomness (and time, for [`HandshakeDeadline`]), sends
//! what comes out and feeds in what arrives. Handshake messages travel on a reliable,
//! ordered channel, but a message sent the moment a channel opens can still be lost (a
//! webrtc-rs receiver drops what arrives before its own side of a negotiated channel
//! opened), so lost messages are recoverable by retransmitting identical bytes:
//!
//! - the initiator resends Init ([`HandshakeInitiator::retransmit`]) until the Response
//!   comes; the responder answers that same Init again with its stored Response;
//! - the responder resends the Response ([`HandshakeResponder::retransmit`]) until the
//!   Finish comes; the initiator, already done, answers that same Response with its stored
//!   Finish.
//!
//! Duplicates never run any key exchange again, so no second session can come out of them;
//! an Init other than the one answered is ignored. The driver decides when to retransmit
//! (`PeerLink` does it on a timer with backoff).
//!
//! ```text
//! Initiator                                               Responder
//! Init     = 01 v | I_static | I_pq_ek | nmac1                       ->
//!      <-  Response = 02 v | R_static | enc_auth_R | ct_pq_R | R_pq_ek | mac2 | nmac2
//! Finish   = 03 v | enc_auth_I | ct_pq_I | mac3 | nmac3              ->
//! ```
//!
//! `mac2` and `mac3` are keyed by everything exchanged (both HPKE contexts of the message);
//! `nmacN` is keyed by the network secret alone, over the transcript so far, and is
//! checked first so that garbage, tampering and non-members are refused before any
//! public-key work.
//!
//! See `core/HANDSHAKE.md` for the design and the reasons each property holds.

use std::fmt;
use std::time::Duration;

use hkdf::{Hkdf, HkdfExtract};
use hmac::{Hmac, KeyInit, Mac};
use hpke::rand_core::CryptoRng;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, PskBundle, Serializable};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::identity::{
    IdentityKem, IdentityKeyPair, PUBLIC_IDENTITY_LEN, PublicIdentity, to_array,
};
use crate::network::NetworkSecret;
use crate::transport::{Channel, Session};

/// Version of the handshake (and of the transport it sets up).
pub const HANDSHAKE_VERSION: u8 = 1;

/// First byte of the initiator's first message.
pub const MSG_INIT: u8 = 0x01;
/// First byte of the responder's message.
pub const MSG_RESPONSE: u8 = 0x02;
/// First byte of the initiator's last message.
pub const MSG_FINISH: u8 = 0x03;
/// First byte of a rejection (sent by a side whose handshake failed, as a hint to the other).
pub const MSG_REJECT: u8 = 0x04;

/// Length of an X25519 public key or DHKEM encapsulation.
const X25519_LEN: usize = 32;
/// Length of an X-Wing encapsulation key.
pub const XWING_PUBLIC_KEY_LEN: usize = 1216;
/// Length of an X-Wing ciphertext.
pub const XWING_CIPHERTEXT_LEN: usize = 1120;
/// Length of the handshake MACs (HMAC-SHA256).
const MAC_LEN: usize = 32;
/// Length of the common header: message type and version.
const HEADER_LEN: usize = 2;

/// Length of the Init message in bytes (1282).
pub const INIT_LEN: usize = HEADER_LEN + PUBLIC_IDENTITY_LEN + XWING_PUBLIC_KEY_LEN + MAC_LEN;
/// Length of the Response message in bytes (2466).
pub const RESPONSE_LEN: usize = HEADER_LEN
    + PUBLIC_IDENTITY_LEN
    + X25519_LEN
    + XWING_CIPHERTEXT_LEN
    + XWING_PUBLIC_KEY_LEN
    + 2 * MAC_LEN;
/// Length of the Finish message in bytes (1218).
pub const FINISH_LEN: usize = HEADER_LEN + X25519_LEN + XWING_CIPHERTEXT_LEN + 2 * MAC_LEN;
/// Length of a Reject message in bytes.
pub const REJECT_LEN: usize = 3;

/// Longest DTLS fingerprint string accepted in a [`ChannelBinding`], in bytes.
pub const MAX_DTLS_FINGERPRINT_LEN: usize = 512;

/// A sensible default for [`HandshakeDeadline`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

type HsKdf = hpke::kdf::HkdfSha256;
type HsAead = hpke::aead::ExportOnlyAead;
type PqKem = hpke::kem::XWing;

const PROLOGUE_LABEL: &[u8] = b"weft/v1/handshake prologue";
const INFO_AUTH_R: &[u8] = b"weft/v1/authpsk responder->initiator";
const INFO_PQ_R: &[u8] = b"weft/v1/xwing responder->initiator";
const INFO_AUTH_I: &[u8] = b"weft/v1/authpsk initiator->responder";
const INFO_PQ_I: &[u8] = b"weft/v1/xwing initiator->responder";
const EXPORT_LABEL: &[u8] = b"weft/v1/handshake exporter";
const MAC2_LABEL: &[u8] = b"weft/v1/mac2 key";
const CHAIN2_LABEL: &[u8] = b"weft/v1/chain after response";
const MAC3_LABEL: &[u8] = b"weft/v1/mac3 key";
/// Chain-key labels of each [`Channel`], initiator->responder then responder->initiator.
/// The control channel's are those of the first release (when it was the only one), so
/// its packets are unchanged and older peers keep talking on it.
fn transport_labels(channel: Channel) -> (&'static [u8], &'static [u8]) {
    match channel {
        Channel::Control => {
            (b"weft/v1/transport initiator->responder", b"weft/v1/transport responder->initiator")
        }
        Channel::Data => (
            b"weft/v1/transport data channel initiator->responder",
            b"weft/v1/transport data channel responder->initiator",
        ),
        Channel::FastPath => (
            b"weft/v1/transport fast path initiator->responder",
            b"weft/v1/transport fast path responder->initiator",
        ),
    }
}
const SESSION_ID_LABEL: &[u8] = b"weft/v1/session id";

/// Everything that can make a handshake fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// A MAC did not verify. The peer does not hold the same network secret, or someone
    /// changed the messages or the DTLS fingerprints between the peers.
    #[error(
        "peer is not in the same network (wrong passphrase?) or the connection was tampered with"
    )]
    WrongNetworkSecret,
    /// The peer sent a Reject message. Unauthenticated: a hint for the user, nothing more.
    #[error("the peer rejected the handshake: {0}")]
    Rejected(RejectReason),
    /// A message does not parse (wrong length, invalid key encoding).
    #[error("malformed handshake message: {0}")]
    Malformed(&'static str),
    /// A well-formed message arrived where another was expected (for example two
    /// initiators, or a message after the handshake ended).
    #[error("unexpected handshake message type {got:#04x} (expected {expected:#04x})")]
    UnexpectedMessage {
        /// The type byte received.
        got: u8,
        /// The type byte this side waits for.
        expected: u8,
    },
    /// The peer speaks another version of the handshake.
    #[error("the peer speaks handshake version {theirs}; this peer speaks version {ours}")]
    VersionMismatch {
        /// Our [`HANDSHAKE_VERSION`].
        ours: u8,
        /// The version in the peer's message.
        theirs: u8,
    },
    /// The peer's key is unusable (for example a low-order X25519 point).
    #[error("the peer sent an unusable public key")]
    InvalidPeerKey,
    /// A DTLS fingerprint given to [`ChannelBinding::new`] is empty, too long or not ASCII.
    #[error("invalid DTLS fingerprint: {0}")]
    InvalidChannelBinding(&'static str),
    /// The handshake took longer than its [`HandshakeDeadline`].
    #[error("the handshake timed out")]
    TimedOut,
    /// The handshake already finished or failed; it takes no more messages.
    #[error("the handshake is over (it finished or failed) and takes no more messages")]
    NotWaiting,
}

impl HandshakeError {
    /// A Reject message to send to the peer after this error, if telling it helps the user
    /// on the other side (wrong network secret, version or garbage). `None` for errors that
    /// must not be answered, such as a Reject itself.
    pub fn reject_message(&self) -> Option<Vec<u8>> {
        let reason = match self {
            Self::WrongNetworkSecret => RejectReason::AuthenticationFailed,
            Self::VersionMismatch { .. } => RejectReason::UnsupportedVersion,
            Self::Malformed(_) | Self::InvalidPeerKey | Self::UnexpectedMessage { .. } => {
                RejectReason::Malformed
            }
            _ => return None,
        };
        Some(vec![MSG_REJECT, HANDSHAKE_VERSION, reason.to_byte()])
    }
}

/// Why the peer rejected the handshake, as it says in its Reject message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// The peer's MAC check failed: different network secret, or tampering.
    AuthenticationFailed,
    /// The peer does not speak our version.
    UnsupportedVersion,
    /// The peer could not parse our message.
    Malformed,
    /// A reason code this version does not know.
    Other(u8),
}

impl RejectReason {
    fn to_byte(self) -> u8 {
        match self {
            Self::AuthenticationFailed => 1,
            Self::UnsupportedVersion => 2,
            Self::Malformed => 3,
            Self::Other(b) => b,
        }
    }

    fn from_byte(b: u8) -> Self {
        match b {
            1 => Self::AuthenticationFailed,
            2 => Self::UnsupportedVersion,
            3 => Self::Malformed,
            b => Self::Other(b),
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AuthenticationFailed => f.write_str(
                "peer is not in the same network (wrong passphrase?) or the connection was tampered with",
            ),
            Self::UnsupportedVersion => f.write_str("it does not speak our handshake version"),
            Self::Malformed => f.write_str("it could not parse our handshake message"),
            Self::Other(b) => write!(f, "unknown reason {b}"),
        }
    }
}

/// Which kind of message a received data-channel message is, from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageKind {
    /// A handshake message (Init, Response, Finish or Reject): feed it to the handshake.
    Handshake,
    /// A transport packet: feed it to the [`Session`].
    Transport,
}

/// Classifies a received message by its first byte, so a driver can multiplex the
/// handshake and the transport on one channel. `None` for an empty or unknown message.
pub fn message_kind(bytes: &[u8]) -> Option<MessageKind> {
    match *bytes.first()? {
        MSG_INIT | MSG_RESPONSE | MSG_FINISH | MSG_REJECT => Some(MessageKind::Handshake),
        crate::transport::PACKET_TYPE
        | crate::transport::DATA_PACKET_TYPE
        | crate::transport::FAST_PATH_PACKET_TYPE => Some(MessageKind::Transport),
        _ => None,
    }
}

/// The DTLS certificate fingerprints of the connection the handshake runs over, as the
/// local peer sees them in the SDP (`a=fingerprint:` lines), local and remote.
///
/// Both are hashed into the handshake in role order (initiator's first). If anyone (the
/// signaling server, say) substituted a fingerprint to sit in the middle of DTLS, the two
/// peers see different pairs and the handshake fails.
///
/// The strings are normalized (trimmed, ASCII lowercase, inner whitespace collapsed to one
/// space), so `"sha-256 AB:CD"` and `"SHA-256  ab:cd"` bind the same. When an SDP lists
/// several fingerprints, drivers must pick the same one on both sides (the first).
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelBinding {
    local: String,
    remote: String,
}

impl ChannelBinding {
    /// Checks and normalizes the two fingerprints.
    pub fn new(
        local_dtls_fingerprint: &str,
        remote_dtls_fingerprint: &str,
    ) -> Result<Self, HandshakeError> {
        Ok(Self {
            local: normalize_fingerprint(local_dtls_fingerprint)?,
            remote: normalize_fingerprint(remote_dtls_fingerprint)?,
        })
    }

    /// The normalized local fingerprint.
    pub fn local(&self) -> &str {
        &self.local
    }

    /// The normalized remote fingerprint.
    pub fn remote(&self) -> &str {
        &self.remote
    }
}

impl fmt::Debug for ChannelBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelBinding")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .finish()
    }
}

fn normalize_fingerprint(s: &str) -> Result<String, HandshakeError> {
    if s.len() > MAX_DTLS_FINGERPRINT_LEN {
        return Err(HandshakeError::InvalidChannelBinding("too long"));
    }
    if !s.is_ascii() || s.bytes().any(|b| b.is_ascii_control() && !b.is_ascii_whitespace()) {
        return Err(HandshakeError::InvalidChannelBinding("not printable ASCII"));
    }
    let out = s.split_ascii_whitespace().collect::<Vec<_>>().join(" ").to_ascii_lowercase();
    if out.is_empty() {
        return Err(HandshakeError::InvalidChannelBinding("empty"));
    }
    Ok(out)
}

/// A deadline for a handshake in the caller's time (any epoch the caller chooses, as a
/// [`Duration`] since it). The core never reads a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeDeadline {
    deadline: Duration,
}

impl HandshakeDeadline {
    /// A deadline `timeout` after `started_at`.
    pub fn new(started_at: Duration, timeout: Duration) -> Self {
        Self { deadline: started_at.saturating_add(timeout) }
    }

    /// A deadline [`DEFAULT_HANDSHAKE_TIMEOUT`] after `started_at`.
    pub fn with_default_timeout(started_at: Duration) -> Self {
        Self::new(started_at, DEFAULT_HANDSHAKE_TIMEOUT)
    }

    /// When the handshake expires: the time to wake the driver's timer for.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Time left at `now` (zero once expired).
    pub fn remaining(&self, now: Duration) -> Duration {
        self.deadline.saturating_sub(now)
    }

    /// `Err(HandshakeError::TimedOut)` once `now` reaches the deadline.
    pub fn check(&self, now: Duration) -> Result<(), HandshakeError> {
        if now >= self.deadline { Err(HandshakeError::TimedOut) } else { Ok(()) }
    }
}

/// What handling one message produced.
#[derive(Debug)]
#[must_use]
pub struct HandshakeStep {
    /// A message to send to the peer, if any.
    pub message: Option<Vec<u8>>,
    /// The established session, once the handshake is complete on this side.
    pub established: Option<Established>,
}

/// A completed handshake.
#[derive(Debug)]
pub struct Established {
    /// The transport session of the control channel ([`Channel::Control`]).
    pub session: Session,
    /// The transport session of the data channel ([`Channel::Data`]): its own keys,
    /// counters and replay window.
    pub data: Session,
    /// The transport session of the native fast path ([`Channel::FastPath`]), unused yet.
    pub fast_path: Session,
    /// The peer's long-term key, authenticated by the handshake. The driver must compare
    /// its fingerprint with the one pinned for this peer (or show it for verification on
    /// first contact).
    pub peer: PublicIdentity,
}

/// The running hash of everything both peers agree on: prologue and every message byte.
#[derive(Clone)]
struct Transcript(Sha256);

impl Transcript {
    fn new(binding_initiator: &str, binding_responder: &str) -> Self {
        let mut t = Self(Sha256::new());
        t.absorb(PROLOGUE_LABEL);
        t.absorb(&[HANDSHAKE_VERSION]);
        t.absorb(binding_initiator.as_bytes());
        t.absorb(binding_responder.as_bytes());
        t
    }

    /// Absorbs a length-prefixed piece, so piece boundaries are unambiguous.
    fn absorb(&mut self, piece: &[u8]) {
        self.0.update((piece.len() as u64).to_be_bytes());
        self.0.update(piece);
    }

    fn hash(&self) -> [u8; 32] {
        self.0.clone().finalize().into()
    }
}

#[cfg_attr(test, derive(Clone))]
struct Psk {
    psk: Zeroizing<[u8; 32]>,
    psk_id: Zeroizing<[u8; 16]>,
}

impl Psk {
    fn new(secret: &NetworkSecret) -> Self {
        Self { psk: secret.psk(), psk_id: secret.psk_id() }
    }

    fn bundle(&self) -> Result<PskBundle<'_>, HandshakeError> {
        // Both are non-empty, so the bundle is valid.
        PskBundle::new(self.psk.as_ref(), self.psk_id.as_ref())
            .map_err(|_| HandshakeError::Malformed("psk bundle"))
    }
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Hmac<Sha256> {
    let mut m = match <Hmac<Sha256> as KeyInit>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    m.update(data);
    m
}

fn compute_mac(key: &[u8], th: &[u8; 32]) -> [u8; MAC_LEN] {
    hmac_sha256(key, th).finalize().into_bytes().into()
}

/// Constant-time MAC check.
fn verify_mac(key: &[u8], th: &[u8; 32], tag: &[u8]) -> Result<(), HandshakeError> {
    hmac_sha256(key, th).verify_slice(tag).map_err(|_| HandshakeError::WrongNetworkSecret)
}

fn info(label: &[u8], th: &[u8; 32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(label.len() + th.len());
    v.extend_from_slice(label);
    v.extend_from_slice(th);
    v
}

fn export(
    export: impl FnOnce(&[u8], &mut [u8]) -> Result<(), hpke::HpkeError>,
) -> Result<Zeroizing<[u8; 32]>, HandshakeError> {
    let mut out = Zeroizing::new([0u8; 32]);
    export(EXPORT_LABEL, out.as_mut()).map_err(|_| HandshakeError::Malformed("export"))?;
    Ok(out)
}

/// HKDF-Extract of the concatenated `ikm` pieces, salted by a transcript hash.
fn extract(th: &[u8; 32], ikm: &[&[u8]]) -> Hkdf<Sha256> {
    let mut ex = HkdfExtract::<Sha256>::new(Some(th));
    for piece in ikm {
        ex.input_ikm(piece);
    }
    ex.finalize().1
}

fn expand(hk: &Hkdf<Sha256>, label: &[u8], th: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    if hk.expand_multi_info(&[label, th], out.as_mut()).is_err() {
        unreachable!("HKDF output length within limits");
    }
    out
}

/// The result of the responder's key exchange, used on both sides.
struct ResponseKeys {
    mac2_key: Zeroizing<[u8; 32]>,
    chain: Zeroizing<[u8; 32]>,
}

fn response_keys(
    th2_body: &[u8; 32],
    auth: &Zeroizing<[u8; 32]>,
    pq: &Zeroizing<[u8; 32]>,
) -> ResponseKeys {
    let hk = extract(th2_body, &[auth.as_ref(), pq.as_ref()]);
    ResponseKeys {
        mac2_key: expand(&hk, MAC2_LABEL, th2_body),
        chain: expand(&hk, CHAIN2_LABEL, th2_body),
    }
}

/// The final key schedule, used on both sides. Returns mac3's key and a closure-free
/// struct to finish once mac3 is in the transcript.
fn finish_hkdf(
    th3_body: &[u8; 32],
    chain: &Zeroizing<[u8; 32]>,
    auth: &Zeroizing<[u8; 32]>,
    pq: &Zeroizing<[u8; 32]>,
) -> (Hkdf<Sha256>, Zeroizing<[u8; 32]>) {
    let hk = extract(th3_body, &[chain.as_ref(), auth.as_ref(), pq.as_ref()]);
    let mac3_key = expand(&hk, MAC3_LABEL, th3_body);
    (hk, mac3_key)
}

/// One channel's transport keys from the final HKDF state and the full transcript hash.
fn session_from(
    hk: &Hkdf<Sha256>,
    th_final: &[u8; 32],
    is_initiator: bool,
    channel: Channel,
) -> Session {
    let (i2r_label, r2i_label) = transport_labels(channel);
    let i2r = expand(hk, i2r_label, th_final);
    let r2i = expand(hk, r2i_label, th_final);
    let id = *expand(hk, SESSION_ID_LABEL, th_final);
    if is_initiator {
        Session::for_channel(channel, &i2r, &r2i, id)
    } else {
        Session::for_channel(channel, &r2i, &i2r, id)
    }
}

/// The established handshake: one session per channel.
fn established(
    hk: &Hkdf<Sha256>,
    th_final: &[u8; 32],
    is_initiator: bool,
    peer: PublicIdentity,
) -> Established {
    Established {
        session: session_from(hk, th_final, is_initiator, Channel::Control),
        data: session_from(hk, th_final, is_initiator, Channel::Data),
        fast_path: session_from(hk, th_final, is_initiator, Channel::FastPath),
        peer,
    }
}

/// Checks type, version and length; returns the body after the two header bytes.
fn parse_header(msg: &[u8], expected: u8, len: usize) -> Result<&[u8], HandshakeError> {
    let (&kind, rest) = msg.split_first().ok_or(HandshakeError::Malformed("empty message"))?;
    if kind == MSG_REJECT {
        return Err(match rest {
            [_version, reason] => HandshakeError::Rejected(RejectReason::from_byte(*reason)),
            _ => HandshakeError::Malformed("reject length"),
        });
    }
    let (&version, body) =
        rest.split_first().ok_or(HandshakeError::Malformed("truncated header"))?;
    if !matches!(kind, MSG_INIT | MSG_RESPONSE | MSG_FINISH) {
        return Err(HandshakeError::Malformed("unknown message type"));
    }
    if version != HANDSHAKE_VERSION {
        return Err(HandshakeError::VersionMismatch { ours: HANDSHAKE_VERSION, theirs: version });
    }
    if kind != expected {
        return Err(HandshakeError::UnexpectedMessage { got: kind, expected });
    }
    if msg.len() != len {
        return Err(HandshakeError::Malformed("wrong length"));
    }
    Ok(body)
}

/// Splits `n` bytes off the front of `buf` (callers have checked the total length).
fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], HandshakeError> {
    if buf.len() < n {
        return Err(HandshakeError::Malformed("truncated"));
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Ok(head)
}

fn x25519_pk(bytes: &[u8]) -> Result<<IdentityKem as Kem>::PublicKey, HandshakeError> {
    <IdentityKem as Kem>::PublicKey::from_bytes(bytes).map_err(|_| HandshakeError::InvalidPeerKey)
}

fn x25519_enc(bytes: &[u8]) -> Result<<IdentityKem as Kem>::EncappedKey, HandshakeError> {
    <IdentityKem as Kem>::EncappedKey::from_bytes(bytes).map_err(|_| HandshakeError::InvalidPeerKey)
}

fn xwing_pk(bytes: &[u8]) -> Result<<PqKem as Kem>::PublicKey, HandshakeError> {
    <PqKem as Kem>::PublicKey::from_bytes(bytes).map_err(|_| HandshakeError::InvalidPeerKey)
}

fn xwing_ct(bytes: &[u8]) -> Result<<PqKem as Kem>::EncappedKey, HandshakeError> {
    <PqKem as Kem>::EncappedKey::from_bytes(bytes).map_err(|_| HandshakeError::Malformed("ct"))
}

// ---------------------------------------------------------------------------------------
// Initiator

/// The initiating side of a handshake (by convention, the peer with the lower peer id).
#[cfg_attr(test, derive(Clone))]
pub struct HandshakeInitiator {
    state: InitiatorState,
}

#[cfg_attr(test, derive(Clone))]
enum InitiatorState {
    WaitResponse(Box<InitiatorWait>),
    /// Established: the Response we accepted and the Finish we answered it with, to answer
    /// a retransmitted Response (our Finish was lost) with the very same Finish.
    Done {
        response: Vec<u8>,
        finish: Vec<u8>,
    },
    Over,
}

#[cfg_attr(test, derive(Clone))]
struct InitiatorWait {
    identity: IdentityKeyPair,
    psk: Psk,
    net_mac_key: Zeroizing<[u8; 32]>,
    pq_secret: <PqKem as Kem>::PrivateKey,
    transcript: Transcript,
    /// Our Init, for [`HandshakeInitiator::retransmit`].
    init: Vec<u8>,
}

impl HandshakeInitiator {
    /// Starts a handshake: returns the state and the Init message to send.
    pub fn new(
        rng: &mut impl CryptoRng,
        identity: &IdentityKeyPair,
        network: &NetworkSecret,
        binding: &ChannelBinding,
    ) -> (Self, Vec<u8>) {
        let psk = Psk::new(network);
        let (pq_secret, pq_public) = PqKem::gen_keypair_with_rng(rng);

        let mut msg = Vec::with_capacity(INIT_LEN);
        msg.extend_from_slice(&[MSG_INIT, HANDSHAKE_VERSION]);
        msg.extend_from_slice(identity.public().as_bytes());
        msg.extend_from_slice(&pq_public.to_bytes());

        let mut transcript = Transcript::new(binding.local(), binding.remote());
        transcript.absorb(&msg);
        let net_mac_key = network.handshake_mac_key();
        let nmac1 = compute_mac(net_mac_key.as_ref(), &transcript.hash());
        transcript.absorb(&nmac1);
        msg.extend_from_slice(&nmac1);

        let wait = InitiatorWait {
            identity: identity.clone(),
            psk,
            net_mac_key,
            pq_secret,
            transcript,
            init: msg.clone(),
        };
        (Self { state: InitiatorState::WaitResponse(Box::new(wait)) }, msg)
    }

    /// Handles the Response: on success returns the Finish message to send and the
    /// established session (usable at once; the responder confirms by sending on it).
    ///
    /// Once established, the very same Response again (the responder retransmits it
    /// because our Finish was lost) returns the very same Finish to send again, and no
    /// session; anything else then is [`HandshakeError::NotWaiting`] and changes nothing.
    ///
    /// While waiting, any error ends the handshake; send [`HandshakeError::reject_message`]
    /// if it has one.
    pub fn handle(
        &mut self,
        msg: &[u8],
        rng: &mut impl CryptoRng,
    ) -> Result<HandshakeStep, HandshakeError> {
        match std::mem::replace(&mut self.state, InitiatorState::Over) {
            InitiatorState::WaitResponse(wait) => {
                let step = wait.handle_response(msg, rng)?;
                if let Some(finish) = &step.message {
                    self.state =
                        InitiatorState::Done { response: msg.to_vec(), finish: finish.clone() };
                }
                Ok(step)
            }
            InitiatorState::Done { response, finish } => {
                let again = (msg == response.as_slice()).then(|| finish.clone());
                self.state = InitiatorState::Done { response, finish };
                match again {
                    Some(finish) => Ok(HandshakeStep { message: Some(finish), established: None }),
                    None => Err(HandshakeError::NotWaiting),
                }
            }
            InitiatorState::Over => Err(HandshakeError::NotWaiting),
        }
    }

    /// The Init again (identical bytes) while the Response has not come: the first one
    /// may have been lost. `None` once the handshake finished or failed.
    pub fn retransmit(&self) -> Option<Vec<u8>> {
        match &self.state {
            InitiatorState::WaitResponse(wait) => Some(wait.init.clone()),
            InitiatorState::Done { .. } | InitiatorState::Over => None,
        }
    }

    /// Whether the handshake still waits for a message.
    pub fn is_waiting(&self) -> bool {
        matches!(self.state, InitiatorState::WaitResponse(_))
    }
}

impl InitiatorWait {
    fn handle_response(
        self: Box<Self>,
        msg: &[u8],
        rng: &mut impl CryptoRng,
    ) -> Result<HandshakeStep, HandshakeError> {
        let Self { identity, psk, net_mac_key, pq_secret, mut transcript, init: _ } = *self;
        let mut body = parse_header(msg, MSG_RESPONSE, RESPONSE_LEN)?;
        let r_static_bytes = take(&mut body, PUBLIC_IDENTITY_LEN)?;
        let enc_auth = take(&mut body, X25519_LEN)?;
        let ct_pq = take(&mut body, XWING_CIPHERTEXT_LEN)?;
        let r_pq_bytes = take(&mut body, XWING_PUBLIC_KEY_LEN)?;
        let mac2 = take(&mut body, MAC_LEN)?;
        let nmac2 = take(&mut body, MAC_LEN)?;

        let th1 = transcript.hash();
        transcript.absorb(&msg[..RESPONSE_LEN - 2 * MAC_LEN]);
        let th2_body = transcript.hash();
        transcript.absorb(mac2);
        verify_mac(net_mac_key.as_ref(), &transcript.hash(), nmac2)?;
        transcript.absorb(nmac2);
        let th2 = transcript.hash();
        let r_static = x25519_pk(r_static_bytes)?;
        let enc_auth = x25519_enc(enc_auth)?;
        let ct_pq = xwing_ct(ct_pq)?;
        let r_pq = xwing_pk(r_pq_bytes)?;

        let bundle = psk.bundle()?;
        let auth_ctx = hpke::setup_receiver::<HsAead, HsKdf, IdentityKem>(
            &OpModeR::AuthPsk(r_static.clone(), bundle),
            identity.hpke_secret(),
            &enc_auth,
            &info(INFO_AUTH_R, &th1),
        )
        .map_err(|_| HandshakeError::InvalidPeerKey)?;
        let pq_ctx = hpke::setup_receiver::<HsAead, HsKdf, PqKem>(
            &OpModeR::Psk(bundle),
            &pq_secret,
            &ct_pq,
            &info(INFO_PQ_R, &th1),
        )
        .map_err(|_| HandshakeError::InvalidPeerKey)?;
        drop(pq_secret);
        let auth_r = export(|l, o| auth_ctx.export(l, o))?;
        let pq_r = export(|l, o| pq_ctx.export(l, o))?;

        let keys = response_keys(&th2_body, &auth_r, &pq_r);
        verify_mac(keys.mac2_key.as_ref(), &th2_body, mac2)?;

        // The responder is authenticated; answer with our own encapsulations.
        let (enc_auth_i, auth_ctx_i) = hpke::setup_sender_with_rng::<HsAead, HsKdf, IdentityKem>(
            &OpModeS::AuthPsk(
                (identity.hpke_secret().clone(), x25519_pk(identity.public().as_bytes())?),
                bundle,
            ),
            &r_static,
            &info(INFO_AUTH_I, &th2),
            rng,
        )
        .map_err(|_| HandshakeError::InvalidPeerKey)?;
        let (ct_pq_i, pq_ctx_i) = hpke::setup_sender_with_rng::<HsAead, HsKdf, PqKem>(
            &OpModeS::Psk(bundle),
            &r_pq,
            &info(INFO_PQ_I, &th2),
            rng,
        )
        .map_err(|_| HandshakeError::InvalidPeerKey)?;
        let auth_i = export(|l, o| auth_ctx_i.export(l, o))?;
        let pq_i = export(|l, o| pq_ctx_i.export(l, o))?;

        let mut out = Vec::with_capacity(FINISH_LEN);
        out.extend_from_slice(&[MSG_FINISH, HANDSHAKE_VERSION]);
        out.extend_from_slice(&enc_auth_i.to_bytes());
        out.extend_from_slice(&ct_pq_i.to_bytes());
        transcript.absorb(&out);
        let th3_body = transcript.hash();
        let (hk, mac3_key) = finish_hkdf(&th3_body, &keys.chain, &auth_i, &pq_i);
        let mac3 = compute_mac(mac3_key.as_ref(), &th3_body);
        out.extend_from_slice(&mac3);
        transcript.absorb(&mac3);
        let nmac3 = compute_mac(net_mac_key.as_ref(), &transcript.hash());
        out.extend_from_slice(&nmac3);
        transcript.absorb(&nmac3);
        let th3 = transcript.hash();

        let peer = PublicIdentity::from_bytes(to_array(r_static_bytes));
        Ok(HandshakeStep {
            message: Some(out),
            established: Some(established(&hk, &th3, true, peer)),
        })
    }
}

impl fmt::Debug for HandshakeInitiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandshakeInitiator")
            .field("waiting", &self.is_waiting())
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------
// Responder

/// The responding side of a handshake.
#[cfg_attr(test, derive(Clone))]
pub struct HandshakeResponder {
    state: ResponderState,
}

#[cfg_attr(test, derive(Clone))]
enum ResponderState {
    WaitInit(Box<ResponderInit>),
    WaitFinish(Box<ResponderWait>),
    Over,
}

#[cfg_attr(test, derive(Clone))]
struct ResponderInit {
    identity: IdentityKeyPair,
    psk: Psk,
    net_mac_key: Zeroizing<[u8; 32]>,
    transcript: Transcript,
}

#[cfg_attr(test, derive(Clone))]
struct ResponderWait {
    identity: IdentityKeyPair,
    psk: Psk,
    net_mac_key: Zeroizing<[u8; 32]>,
    pq_secret: <PqKem as Kem>::PrivateKey,
    peer: [u8; PUBLIC_IDENTITY_LEN],
    chain: Zeroizing<[u8; 32]>,
    transcript: Transcript,
    /// The Init we answered: the same bytes again get the same Response.
    init: Vec<u8>,
    /// Our Response, for duplicates of `init` and [`HandshakeResponder::retransmit`].
    response: Vec<u8>,
}

impl HandshakeResponder {
    /// Prepares to answer an Init message.
    pub fn new(
        identity: &IdentityKeyPair,
        network: &NetworkSecret,
        binding: &ChannelBinding,
    ) -> Self {
        let init = ResponderInit {
            identity: identity.clone(),
            psk: Psk::new(network),
            net_mac_key: network.handshake_mac_key(),
            // The initiator's fingerprint first: for us that is the remote one.
            transcript: Transcript::new(binding.remote(), binding.local()),
        };
        Self { state: ResponderState::WaitInit(Box::new(init)) }
    }

    /// Handles the Init message (returns the Response to send) and then the Finish message
    /// (returns the established session).
    ///
    /// While waiting for the Finish, the very same Init again (the initiator retransmits it
    /// because our Response was lost) returns the very same Response again; any other Init
    /// is ignored (an empty step): in an honest run the initiator only ever resends the
    /// same bytes, so another Init is a replay or an injection, and it must not end this
    /// handshake, nor start a second one.
    ///
    /// Any other error ends the handshake; send [`HandshakeError::reject_message`] if it
    /// has one.
    pub fn handle(
        &mut self,
        msg: &[u8],
        rng: &mut impl CryptoRng,
    ) -> Result<HandshakeStep, HandshakeError> {
        match std::mem::replace(&mut self.state, ResponderState::Over) {
            ResponderState::WaitInit(init) => {
                let (wait, response) = init.handle_init(msg, rng)?;
                self.state = ResponderState::WaitFinish(wait);
                Ok(HandshakeStep { message: Some(response), established: None })
            }
            ResponderState::WaitFinish(wait) if msg.first() == Some(&MSG_INIT) => {
                let again = (msg == wait.init.as_slice()).then(|| wait.response.clone());
                self.state = ResponderState::WaitFinish(wait);
                Ok(HandshakeStep { message: again, established: None })
            }
            ResponderState::WaitFinish(wait) => wait.handle_finish(msg),
            ResponderState::Over => Err(HandshakeError::NotWaiting),
        }
    }

    /// The Response again (identical bytes) while the Finish has not come: it, or the
    /// Finish, may have been lost. `None` before the Init and once the handshake is over.
    pub fn retransmit(&self) -> Option<Vec<u8>> {
        match &self.state {
            ResponderState::WaitFinish(wait) => Some(wait.response.clone()),
            ResponderState::WaitInit(_) | ResponderState::Over => None,
        }
    }

    /// Whether the handshake still waits for a message.
    pub fn is_waiting(&self) -> bool {
        !matches!(self.state, ResponderState::Over)
    }
}

impl ResponderInit {
    fn handle_init(
        self: Box<Self>,
        msg: &[u8],
        rng: &mut impl CryptoRng,
    ) -> Result<(Box<ResponderWait>, Vec<u8>), HandshakeError> {
        let Self { identity, psk, net_mac_key, mut transcript } = *self;
        let mut body = parse_header(msg, MSG_INIT, INIT_LEN)?;
        let i_static_bytes = take(&mut body, PUBLIC_IDENTITY_LEN)?;
        let i_pq_bytes = take(&mut body, XWING_PUBLIC_KEY_LEN)?;
        let nmac1 = take(&mut body, MAC_LEN)?;

        // Check membership first: nothing else is done for, or revealed to, a non-member.
        transcript.absorb(&msg[..INIT_LEN - MAC_LEN]);
        verify_mac(net_mac_key.as_ref(), &transcript.hash(), nmac1)?;
        transcript.absorb(nmac1);
        let th1 = transcript.hash();

        let i_static = x25519_pk(i_static_bytes)?;
        let i_pq = xwing_pk(i_pq_bytes)?;
        let bundle = psk.bundle()?;

        let (enc_auth, auth_ctx) = hpke::setup_sender_with_rng::<HsAead, HsKdf, IdentityKem>(
            &OpModeS::AuthPsk(
                (identity.hpke_secret().clone(), x25519_pk(identity.public().as_bytes())?),
                bundle,
            ),
            &i_static,
            &info(INFO_AUTH_R, &th1),
            rng,
        )
        .map_err(|_| HandshakeError::InvalidPeerKey)?;
        let (ct_pq, pq_ctx) = hpke::setup_sender_with_rng::<HsAead, HsKdf, PqKem>(
            &OpModeS::Psk(bundle),
            &i_pq,
            &info(INFO_PQ_R, &th1),
            rng,
        )
        .map_err(|_| HandshakeError::InvalidPeerKey)?;
        let (pq_secret, pq_public) = PqKem::gen_keypair_with_rng(rng);
        let auth_r = export(|l, o| auth_ctx.export(l, o))?;
        let pq_r = export(|l, o| pq_ctx.export(l, o))?;

        let mut out = Vec::with_capacity(RESPONSE_LEN);
        out.extend_from_slice(&[MSG_RESPONSE, HANDSHAKE_VERSION]);
        out.extend_from_slice(identity.public().as_bytes());
        out.extend_from_slice(&enc_auth.to_bytes());
        out.extend_from_slice(&ct_pq.to_bytes());
        out.extend_from_slice(&pq_public.to_bytes());
        transcript.absorb(&out);
        let th2_body = transcript.hash();
        let keys = response_keys(&th2_body, &auth_r, &pq_r);
        let mac2 = compute_mac(keys.mac2_key.as_ref(), &th2_body);
        out.extend_from_slice(&mac2);
        transcript.absorb(&mac2);
        let nmac2 = compute_mac(net_mac_key.as_ref(), &transcript.hash());
        out.extend_from_slice(&nmac2);
        transcript.absorb(&nmac2);

        let wait = ResponderWait {
            identity,
            psk,
            net_mac_key,
            pq_secret,
            peer: to_array(i_static_bytes),
            chain: keys.chain,
            transcript,
            init: msg.to_vec(),
            response: out.clone(),
        };
        Ok((Box::new(wait), out))
    }
}

impl ResponderWait {
    fn handle_finish(self: Box<Self>, msg: &[u8]) -> Result<HandshakeStep, HandshakeError> {
        let Self { identity, psk, net_mac_key, pq_secret, peer, chain, mut transcript, .. } = *self;
        let mut body = parse_header(msg, MSG_FINISH, FINISH_LEN)?;
        let enc_auth = take(&mut body, X25519_LEN)?;
        let ct_pq = take(&mut body, XWING_CIPHERTEXT_LEN)?;
        let mac3 = take(&mut body, MAC_LEN)?;
        let nmac3 = take(&mut body, MAC_LEN)?;

        let th2 = transcript.hash();
        transcript.absorb(&msg[..FINISH_LEN - 2 * MAC_LEN]);
        let th3_body = transcript.hash();
        transcript.absorb(mac3);
        verify_mac(net_mac_key.as_ref(), &transcript.hash(), nmac3)?;
        transcript.absorb(nmac3);
        let th3 = transcript.hash();
        let i_static = x25519_pk(&peer)?;
        let enc_auth = x25519_enc(enc_auth)?;
        let ct_pq = xwing_ct(ct_pq)?;
        let bundle = psk.bundle()?;

        let auth_ctx = hpke::setup_receiver::<HsAead, HsKdf, IdentityKem>(
            &OpModeR::AuthPsk(i_static, bundle),
            identity.hpke_secret(),
            &enc_auth,
            &info(INFO_AUTH_I, &th2),
        )
        .map_err(|_| HandshakeError::InvalidPeerKey)?;
        let pq_ctx = hpke::setup_receiver::<HsAead, HsKdf, PqKem>(
            &OpModeR::Psk(bundle),
            &pq_secret,
            &ct_pq,
            &info(INFO_PQ_I, &th2),
        )
        .map_err(|_| HandshakeError::InvalidPeerKey)?;
        drop(pq_secret);
        let auth_i = export(|l, o| auth_ctx.export(l, o))?;
        let pq_i = export(|l, o| pq_ctx.export(l, o))?;

        let (hk, mac3_key) = finish_hkdf(&th3_body, &chain, &auth_i, &pq_i);
        verify_mac(mac3_key.as_ref(), &th3_body, mac3)?;

        let peer = PublicIdentity::from_bytes(peer);
        Ok(HandshakeStep { message: None, established: Some(established(&hk, &th3, false, peer)) })
    }
}

impl fmt::Debug for HandshakeResponder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            ResponderState::WaitInit(_) => "wait-init",
            ResponderState::WaitFinish(_) => "wait-finish",
            ResponderState::Over => "over",
        };
        f.debug_struct("HandshakeResponder").field("state", &state).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_hpke() {
        assert_eq!(<PqKem as Kem>::PublicKey::size(), XWING_PUBLIC_KEY_LEN);
        assert_eq!(<PqKem as Kem>::EncappedKey::size(), XWING_CIPHERTEXT_LEN);
        assert_eq!(<IdentityKem as Kem>::EncappedKey::size(), X25519_LEN);
        assert_eq!(<IdentityKem as Kem>::PublicKey::size(), PUBLIC_IDENTITY_LEN);
        assert_eq!((INIT_LEN, RESPONSE_LEN, FINISH_LEN), (1282, 2466, 1218));
    }

    #[test]
    fn fingerprints_are_normalized() {
        let a = ChannelBinding::new(" sha-256 AB:CD ", "SHA-256\tef:01").unwrap();
        assert_eq!(a.local(), "sha-256 ab:cd");
        assert_eq!(a.remote(), "sha-256 ef:01");
        assert!(ChannelBinding::new("", "x").is_err());
        assert!(ChannelBinding::new("é", "x").is_err());
        assert!(ChannelBinding::new(&"a".repeat(MAX_DTLS_FINGERPRINT_LEN + 1), "x").is_err());
    }

    use chacha20::ChaCha20Rng;
    use chacha20::rand_core::SeedableRng;

    /// Both sides' states at every step of one handshake, to replay messages against.
    struct Fixture {
        rng: ChaCha20Rng,
        /// The initiator waiting for the Response.
        init: HandshakeInitiator,
        /// A responder waiting for Init.
        fresh: HandshakeResponder,
        /// The responder waiting for Finish.
        wait: HandshakeResponder,
        m1: Vec<u8>,
        m2: Vec<u8>,
        m3: Vec<u8>,
    }

    fn fixture() -> Fixture {
        let mut rng = ChaCha20Rng::seed_from_u64(77);
        let secret = NetworkSecret::from_random_bytes([1; 32]);
        let bi = ChannelBinding::new("sha-256 aa", "sha-256 bb").unwrap();
        let br = ChannelBinding::new("sha-256 bb", "sha-256 aa").unwrap();
        let id_i = IdentityKeyPair::generate(&mut rng);
        let id_r = IdentityKeyPair::generate(&mut rng);
        let (init, m1) = HandshakeInitiator::new(&mut rng, &id_i, &secret, &bi);
        let fresh = HandshakeResponder::new(&id_r, &secret, &br);
        let mut wait = fresh.clone();
        let m2 = wait.handle(&m1, &mut rng).unwrap().message.unwrap();
        let m3 = init.clone().handle(&m2, &mut rng).unwrap().message.unwrap();
        // Sanity: the untouched messages complete the handshake.
        let done = wait.clone().handle(&m3, &mut rng).unwrap();
        assert!(done.established.is_some());
        Fixture { rng, init, fresh, wait, m1, m2, m3 }
    }

    fn flip(msg: &[u8], i: usize) -> Vec<u8> {
        let mut m = msg.to_vec();
        m[i] ^= 1 << (i % 8);
        m
    }

    #[test]
    fn every_flipped_byte_of_every_message_is_rejected() {
        let mut f = fixture();
        for i in 0..f.m1.len() {
            let r = f.fresh.clone().handle(&flip(&f.m1, i), &mut f.rng);
            assert!(r.is_err(), "Init byte {i}");
        }
        for i in 0..f.m2.len() {
            let r = f.init.clone().handle(&flip(&f.m2, i), &mut f.rng);
            assert!(r.is_err(), "Response byte {i}");
        }
        for i in 0..f.m3.len() {
            let r = f.wait.clone().handle(&flip(&f.m3, i), &mut f.rng);
            assert!(r.is_err(), "Finish byte {i}");
        }
    }

    /// Positions to flip in each field of a message: first, middle and last byte.
    fn sample(fields: &[usize]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut start = HEADER_LEN;
        for &len in fields {
            out.extend([start, start + len / 2, start + len - 1]);
            start += len;
        }
        out
    }

    /// Re-seals the network MAC (the last 32 bytes) of a tampered message, as an insider
    /// who knows the network secret could, over `transcript` (the state before it).
    fn reseal(mut m: Vec<u8>, transcript: &Transcript, key: &[u8]) -> Vec<u8> {
        let n = m.len();
        let mut t = transcript.clone();
        t.absorb(&m[..n - 2 * MAC_LEN]);
        t.absorb(&m[n - 2 * MAC_LEN..n - MAC_LEN]);
        let nmac = compute_mac(key, &t.hash());
        m[n - MAC_LEN..].copy_from_slice(&nmac);
        m
    }

    #[test]
    fn tampering_by_an_insider_is_caught_by_the_key_exchange() {
        let mut f = fixture();
        let InitiatorState::WaitResponse(iw) = &f.init.state else {
            panic!("initiator not waiting")
        };
        let fields2 =
            [PUBLIC_IDENTITY_LEN, X25519_LEN, XWING_CIPHERTEXT_LEN, XWING_PUBLIC_KEY_LEN, MAC_LEN];
        for i in sample(&fields2) {
            let m = reseal(flip(&f.m2, i), &iw.transcript, iw.net_mac_key.as_ref());
            let err = f.init.clone().handle(&m, &mut f.rng).unwrap_err();
            assert!(
                matches!(err, HandshakeError::WrongNetworkSecret | HandshakeError::InvalidPeerKey),
                "Response byte {i}: {err:?}"
            );
        }
        let ResponderState::WaitFinish(rw) = &f.wait.state else { panic!("responder not waiting") };
        for i in sample(&[X25519_LEN, XWING_CIPHERTEXT_LEN, MAC_LEN]) {
            let m = reseal(flip(&f.m3, i), &rw.transcript, rw.net_mac_key.as_ref());
            let err = f.wait.clone().handle(&m, &mut f.rng).unwrap_err();
            assert!(
                matches!(err, HandshakeError::WrongNetworkSecret | HandshakeError::InvalidPeerKey),
                "Finish byte {i}: {err:?}"
            );
        }
        // The resealed but untampered messages still work: the check above is not vacuous.
        let m2 = reseal(f.m2.clone(), &iw.transcript, iw.net_mac_key.as_ref());
        assert!(f.init.clone().handle(&m2, &mut f.rng).is_ok());
    }

    #[test]
    fn replayed_finish_and_response_from_another_run_are_rejected() {
        let mut f = fixture();
        // The same responder answers the same Init again with other randomness: a second
        // run, whose Finish must not complete the first.
        let m2_other = f.fresh.clone().handle(&f.m1, &mut ChaCha20Rng::seed_from_u64(5));
        let m2_other = m2_other.unwrap().message.unwrap();
        let m3_other = f.init.clone().handle(&m2_other, &mut f.rng).unwrap().message.unwrap();
        // A Finish made for another Response does not complete this responder's handshake.
        assert_eq!(
            f.wait.clone().handle(&m3_other, &mut f.rng).unwrap_err(),
            HandshakeError::WrongNetworkSecret
        );
        assert!(f.wait.handle(&f.m3, &mut f.rng).is_ok());
    }

    #[test]
    fn deadline() {
        let d = HandshakeDeadline::new(Duration::from_secs(5), Duration::from_secs(10));
        assert_eq!(d.deadline(), Duration::from_secs(15));
        assert!(d.check(Duration::from_secs(14)).is_ok());
        assert_eq!(d.check(Duration::from_secs(15)), Err(HandshakeError::TimedOut));
        assert_eq!(d.remaining(Duration::from_secs(20)), Duration::ZERO);
    }
}
