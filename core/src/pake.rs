//! The pairwise PAKE of passphrase networks: before anything derived from the passphrase
//! is sent, each pair of members proves to each other that they know it, with SPAKE2
//! (RustCrypto's `spake2`, symmetric mode on Ed25519), over signaling.
//!
//! Why: a passphrase network's room is derived from its name alone, so anyone who knows
//! the name — the signaling server included, which may add members of its own — meets
//! its members. Had anything keyed by the passphrase reached such a member (the
//! handshake's first message and its network MAC did, before), every passphrase guess
//! could be checked offline at one Argon2id each. A PAKE run gives the other side one
//! guess: its messages are points blinded by the password, and the key each side gets
//! depends on a Diffie-Hellman secret nobody else holds, so a transcript checks no
//! password offline. Members count and space out failed runs ([`crate::node`]).
//!
//! One run, both sides at once (neither waits for the other; `HANDSHAKE.md`):
//!
//! ```text
//! Start   = 02 | SPAKE2 message (33)                          each side, to the other
//! Confirm = 03 | transcript id (16) | HMAC(K_confirm, label || own msg || peer msg) (32)
//! ```
//!
//! carried base64url as [`SignalPayload::Opaque`] (a sealed payload starts with `01`).
//! The transcript id names the run (a hash of both messages, sorted), so a confirmation
//! of an older run is told apart from a wrong one. From the SPAKE2 key `K`:
//! `PRK = HKDF-Extract(transcript hash, K)`, `K_confirm = Expand(PRK, "weft/v1/pake
//! confirm")` and the pair's own network secret `Expand(PRK, "weft/v1/pake pair secret")`,
//! which keys the pair's sealed signaling and its handshake (PSK and network MAC) in place
//! of the passphrase's.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use hpke::rand_core::CryptoRng;
use sha2::{Digest, Sha256};
use spake2::{Ed25519Group, Identity, Password, Spake2};
use zeroize::Zeroizing;

use crate::network::NetworkSecret;
use crate::signal::{PeerId, RoomId, SignalPayload};

/// First byte of a Start.
const START: u8 = 2;
/// First byte of a Confirm.
const CONFIRM: u8 = 3;
/// A SPAKE2 message: its side byte and a compressed Ed25519 point.
pub const SPAKE_MSG_LEN: usize = 33;
/// Bytes of a transcript id.
pub const TRANSCRIPT_ID_LEN: usize = 16;
const MAC_LEN: usize = 32;

const IDENTITY_LABEL: &[u8] = b"weft/v1/pake identity";
const TRANSCRIPT_LABEL: &[u8] = b"weft/v1/pake transcript";
const CONFIRM_LABEL: &[u8] = b"weft/v1/pake confirm";
const PAIR_SECRET_LABEL: &[u8] = b"weft/v1/pake pair secret";

/// A PAKE message, as it travels through the server.
#[derive(Clone, PartialEq, Eq)]
pub enum PakeMessage {
    /// A side's SPAKE2 message.
    Start {
        /// The message.
        msg: [u8; SPAKE_MSG_LEN],
    },
    /// A side's key confirmation for the run named by `transcript`.
    Confirm {
        /// Which run.
        transcript: [u8; TRANSCRIPT_ID_LEN],
        /// The proof.
        mac: [u8; MAC_LEN],
    },
}

impl std::fmt::Debug for PakeMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Start { .. } => f.write_str("Start"),
            Self::Confirm { .. } => f.write_str("Confirm"),
        }
    }
}

/// Why a PAKE message or run failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PakeError {
    /// Not a PAKE message of this version, or of the wrong length.
    #[error("a malformed passphrase check message")]
    Malformed,
    /// The other side's SPAKE2 message is not a valid point (or is ours sent back).
    #[error("a passphrase check message that is not valid")]
    BadMessage,
    /// The other side's confirmation does not match: it used another passphrase.
    #[error("peer is not in the same network (wrong passphrase?): the passphrase check failed")]
    WrongPassphrase,
}

/// What a signaling payload of a passphrase network is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A PAKE message.
    Pake(PakeMessage),
    /// Sealed under a pair's key (`sealed.rs`).
    Sealed,
    /// A description or candidate in clear: from a peer that does not run the PAKE.
    Clear,
}

impl PakeMessage {
    /// The payload that carries it.
    pub fn to_payload(&self) -> SignalPayload {
        let mut bytes = Vec::with_capacity(1 + TRANSCRIPT_ID_LEN + MAC_LEN);
        match self {
            Self::Start { msg } => {
                bytes.push(START);
                bytes.extend_from_slice(msg);
            }
            Self::Confirm { transcript, mac } => {
                bytes.push(CONFIRM);
                bytes.extend_from_slice(transcript);
                bytes.extend_from_slice(mac);
            }
        }
        SignalPayload::Opaque { data: URL_SAFE_NO_PAD.encode(bytes) }
    }

    /// Parses the bytes of a PAKE message (untrusted; never panics).
    pub fn decode(bytes: &[u8]) -> Result<Self, PakeError> {
        match bytes.split_first() {
            Some((&START, rest)) => {
                let msg = rest.try_into().map_err(|_| PakeError::Malformed)?;
                Ok(Self::Start { msg })
            }
            Some((&CONFIRM, rest)) if rest.len() == TRANSCRIPT_ID_LEN + MAC_LEN => {
                let (t, m) = rest.split_at(TRANSCRIPT_ID_LEN);
                let transcript = t.try_into().map_err(|_| PakeError::Malformed)?;
                let mac = m.try_into().map_err(|_| PakeError::Malformed)?;
                Ok(Self::Confirm { transcript, mac })
            }
            _ => Err(PakeError::Malformed),
        }
    }
}

/// Sorts a signaling payload of a passphrase network (untrusted; never panics).
pub fn classify(payload: &SignalPayload) -> Result<Incoming, PakeError> {
    let SignalPayload::Opaque { data } = payload else { return Ok(Incoming::Clear) };
    // A Confirm is 66 characters; anything longer is not a PAKE message. Only its first
    // byte is needed to tell, so only a short prefix is decoded for sealed payloads.
    let head = data.get(..4).ok_or(PakeError::Malformed)?;
    let first = URL_SAFE_NO_PAD.decode(head).map_err(|_| PakeError::Malformed)?;
    match first.first() {
        Some(&START | &CONFIRM) => {
            let bytes = URL_SAFE_NO_PAD.decode(data).map_err(|_| PakeError::Malformed)?;
            Ok(Incoming::Pake(PakeMessage::decode(&bytes)?))
        }
        _ => Ok(Incoming::Sealed),
    }
}

/// One side of a run that sent its Start and waits for the other's.
pub struct PakeRun {
    spake: Spake2<Ed25519Group>,
    own: [u8; SPAKE_MSG_LEN],
}

impl std::fmt::Debug for PakeRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PakeRun")
    }
}

/// A finished run: the pair's keys, to be trusted once the other side's confirmation
/// checks ([`PakeKeys::check`]).
#[derive(Clone)]
pub struct PakeKeys {
    transcript: [u8; TRANSCRIPT_ID_LEN],
    confirm_key: Zeroizing<[u8; 32]>,
    own: [u8; SPAKE_MSG_LEN],
    peer: [u8; SPAKE_MSG_LEN],
    pair: NetworkSecret,
}

impl std::fmt::Debug for PakeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PakeKeys(<redacted>)")
    }
}

fn put(buf: &mut Vec<u8>, part: &[u8]) {
    buf.extend_from_slice(&(part.len() as u64).to_be_bytes());
    buf.extend_from_slice(part);
}

fn confirm_mac(key: &[u8; 32], from: &[u8], to: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(CONFIRM_LABEL);
    mac.update(from);
    mac.update(to);
    mac
}

impl PakeRun {
    /// Starts a run between `own` and `remote` in `room` of the passphrase network whose
    /// secret is `secret`: returns the run and the Start to send.
    pub fn start(
        secret: &NetworkSecret,
        room: &RoomId,
        own: &PeerId,
        remote: &PeerId,
        rng: &mut impl CryptoRng,
    ) -> (Self, PakeMessage) {
        // Both sides name the run alike: the room and both ids, in order.
        let (lo, hi) = if own < remote { (own, remote) } else { (remote, own) };
        let mut id = Vec::new();
        put(&mut id, IDENTITY_LABEL);
        for part in [room.as_str(), lo.as_str(), hi.as_str()] {
            put(&mut id, part.as_bytes());
        }
        let password = Password::new(secret.pake_password().as_ref());
        let (spake, msg) =
            Spake2::<Ed25519Group>::start_symmetric_with_rng(&password, &Identity::new(&id), rng);
        let own: [u8; SPAKE_MSG_LEN] =
            msg.as_slice().try_into().unwrap_or_else(|_| unreachable!("33-byte message"));
        (Self { spake, own }, PakeMessage::Start { msg: own })
    }

    /// Our Start of this run.
    pub fn start_message(&self) -> PakeMessage {
        PakeMessage::Start { msg: self.own }
    }

    /// Finishes with the other side's Start: the keys, and the Confirm to send.
    pub fn finish(self, peer: &[u8; SPAKE_MSG_LEN]) -> Result<(PakeKeys, PakeMessage), PakeError> {
        // Our own message sent back would make its confirmation match ours.
        if *peer == self.own {
            return Err(PakeError::BadMessage);
        }
        let own = self.own;
        let key = Zeroizing::new(self.spake.finish(peer).map_err(|_| PakeError::BadMessage)?);
        let (lo, hi) = if own < *peer { (&own, peer) } else { (peer, &own) };
        let mut h = Sha256::new();
        h.update(TRANSCRIPT_LABEL);
        h.update(lo);
        h.update(hi);
        let hash: [u8; 32] = h.finalize().into();
        let hk = Hkdf::<Sha256>::new(Some(&hash), &key);
        let mut confirm_key = Zeroizing::new([0u8; 32]);
        let mut pair = Zeroizing::new([0u8; 32]);
        if hk.expand(CONFIRM_LABEL, confirm_key.as_mut()).is_err()
            || hk.expand(PAIR_SECRET_LABEL, pair.as_mut()).is_err()
        {
            unreachable!("HKDF output length within limits");
        }
        let mut transcript = [0u8; TRANSCRIPT_ID_LEN];
        transcript.copy_from_slice(&hash[..TRANSCRIPT_ID_LEN]);
        let mac = confirm_mac(&confirm_key, &own, peer).finalize().into_bytes().into();
        let keys = PakeKeys {
            transcript,
            confirm_key,
            own,
            peer: *peer,
            pair: NetworkSecret::from_random_bytes(*pair),
        };
        Ok((keys, PakeMessage::Confirm { transcript, mac }))
    }
}

impl PakeKeys {
    /// The run's id, which the other side's Confirm must name.
    pub fn transcript(&self) -> &[u8; TRANSCRIPT_ID_LEN] {
        &self.transcript
    }

    /// Checks the other side's confirmation (in constant time).
    pub fn check(&self, mac: &[u8; MAC_LEN]) -> Result<(), PakeError> {
        confirm_mac(&self.confirm_key, &self.peer, &self.own)
            .verify_slice(mac)
            .map_err(|_| PakeError::WrongPassphrase)
    }

    /// The pair's own network secret: its handshake and sealed signaling use it.
    pub fn pair_secret(&self) -> &NetworkSecret {
        &self.pair
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::network::{Network, PassphraseParams};
    use chacha20::ChaCha20Rng;
    use chacha20::rand_core::SeedableRng;

    const TINY: PassphraseParams =
        PassphraseParams { memory_kib: 8, iterations: 1, parallelism: 1 };

    fn ids() -> (RoomId, PeerId, PeerId) {
        (RoomId::new("room").unwrap(), PeerId::new("a").unwrap(), PeerId::new("b").unwrap())
    }

    fn run(pa: &str, pb: &str, seed: u64) -> (Result<(), PakeError>, Result<(), PakeError>, bool) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let (room, a, b) = ids();
        let na = Network::from_passphrase("n", pa, &TINY).unwrap();
        let nb = Network::from_passphrase("n", pb, &TINY).unwrap();
        let (ra, sa) = PakeRun::start(na.secret(), &room, &a, &b, &mut rng);
        let (rb, sb) = PakeRun::start(nb.secret(), &room, &b, &a, &mut rng);
        let from = |m: PakeMessage| match classify(&m.to_payload()).unwrap() {
            Incoming::Pake(PakeMessage::Start { msg }) => msg,
            other => panic!("{other:?}"),
        };
        let (ka, ca) = ra.finish(&from(sb)).unwrap();
        let (kb, cb) = rb.finish(&from(sa)).unwrap();
        assert_eq!(ka.transcript(), kb.transcript(), "both name the run alike");
        let mac = |m: PakeMessage| match classify(&m.to_payload()).unwrap() {
            Incoming::Pake(PakeMessage::Confirm { mac, .. }) => mac,
            other => panic!("{other:?}"),
        };
        let same = ka.pair_secret().psk().as_ref() == kb.pair_secret().psk().as_ref();
        (ka.check(&mac(cb)), kb.check(&mac(ca)), same)
    }

    #[test]
    fn the_same_passphrase_agrees_and_another_is_told_apart() {
        assert_eq!(run("correct horse", "correct horse", 1), (Ok(()), Ok(()), true));
        let wrong = Err(PakeError::WrongPassphrase);
        assert_eq!(run("correct horse", "incorrect horse", 2), (wrong, wrong, false));
    }

    #[test]
    fn the_pair_secret_is_neither_the_network_secret_nor_reused() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (room, a, b) = ids();
        let n = Network::from_passphrase("n", "pw", &TINY).unwrap();
        let mut psks = Vec::new();
        for _ in 0..2 {
            let (ra, sa) = PakeRun::start(n.secret(), &room, &a, &b, &mut rng);
            let (rb, sb) = PakeRun::start(n.secret(), &room, &b, &a, &mut rng);
            let (PakeMessage::Start { msg: ma }, PakeMessage::Start { msg: mb }) = (sa, sb) else {
                panic!()
            };
            let (ka, _) = ra.finish(&mb).unwrap();
            let (kb, _) = rb.finish(&ma).unwrap();
            assert_eq!(ka.pair_secret().psk().as_ref(), kb.pair_secret().psk().as_ref());
            psks.push(ka.pair_secret().psk());
        }
        assert_ne!(psks[0].as_ref(), psks[1].as_ref(), "each run its own keys");
        assert_ne!(psks[0].as_ref(), n.secret().psk().as_ref());
    }

    #[test]
    fn our_own_start_sent_back_is_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let (room, a, b) = ids();
        let n = Network::from_passphrase("n", "pw", &TINY).unwrap();
        let (ra, sa) = PakeRun::start(n.secret(), &room, &a, &b, &mut rng);
        let PakeMessage::Start { msg } = sa else { panic!() };
        assert_eq!(ra.finish(&msg).unwrap_err(), PakeError::BadMessage);
    }

    #[test]
    fn malformed_messages_are_refused_without_panicking() {
        assert_eq!(PakeMessage::decode(&[]), Err(PakeError::Malformed));
        assert_eq!(PakeMessage::decode(&[2; 10]), Err(PakeError::Malformed));
        assert_eq!(PakeMessage::decode(&[3; 48]), Err(PakeError::Malformed));
        assert!(PakeMessage::decode(&[3; 49]).is_ok());
        assert!(PakeMessage::decode(&[2; 34]).is_ok());
        for data in ["", "A", "AgAA", "!!!!", "Aw", "AQAAAAAA"] {
            let _ = classify(&SignalPayload::Opaque { data: data.into() });
        }
        let sealed = SignalPayload::Opaque { data: URL_SAFE_NO_PAD.encode([1u8; 40]) };
        assert_eq!(classify(&sealed), Ok(Incoming::Sealed));
        let clear = SignalPayload::Offer { sdp: "v=0".into() };
        assert_eq!(classify(&clear), Ok(Incoming::Clear));
        for i in 0..=255u8 {
            let _ = PakeMessage::decode(&[i; 34]);
            let _ = classify(&SignalPayload::Opaque { data: URL_SAFE_NO_PAD.encode([i; 49]) });
        }
    }
}
