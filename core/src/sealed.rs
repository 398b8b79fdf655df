//! Sealed signaling: what one member sends another through the server (SDP offers and
//! answers, ICE candidates) is encrypted and authenticated under a key only members hold.
//!
//! Without it the server reads every member's IP addresses and DTLS fingerprints before
//! anyone proves membership, and can answer offers itself. Sealed, it sees sizes and
//! timing; a payload it rewrites, replays to another member or sends as another member
//! fails to open and is dropped (and counted).
//!
//! Format, carried as [`SignalPayload::Opaque`]: base64url (no padding) of
//! `version (1) || nonce (12) || ciphertext || tag (16)`, ChaCha20-Poly1305 under
//! `HKDF(network secret, "weft/v1/signal seal")`, with a random nonce (a network's members
//! send far fewer than the 2^32 messages random 96-bit nonces allow under one key) and
//! `"weft/v1/signal" || room || from || to` (each length-prefixed) as associated data, so
//! a payload is bound to its room, its sender's and its recipient's server-assigned ids.
//! The plaintext is the JSON of the inner [`SignalPayload`].
//!
//! Only invite networks seal: their room is derived from the secret, so everyone in the
//! room holds the key. A passphrase network's room is derived from its name alone, and a
//! member who typed a wrong passphrase must still hear why the handshake refuses it; it
//! gets sealed signaling with the pairwise PAKE (`SECURITY.md`).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hpke::rand_core::CryptoRng;
use zeroize::Zeroizing;

use crate::aead::{KEY_LEN, NONCE_LEN, PacketAead, PacketCipher, TAG_LEN};
use crate::signal::{PeerId, RoomId, SignalPayload};

/// The format's version byte.
const VERSION: u8 = 1;
const AAD_LABEL: &[u8] = b"weft/v1/signal";

/// Seals and opens the signaling payloads of one network.
pub struct SignalSealer {
    cipher: PacketCipher,
    room: RoomId,
}

/// Why a payload did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// A payload in clear where a sealed one was expected.
    #[error("a signaling payload that is not sealed")]
    NotSealed,
    /// Not base64url, too short, or of another version.
    #[error("a malformed sealed signaling payload")]
    Malformed,
    /// Did not authenticate: another key, or rewritten, or meant for another pair.
    #[error("a sealed signaling payload that does not authenticate")]
    Forged,
    /// Opened, but the inside is not a signaling payload.
    #[error("a sealed signaling payload with an unreadable inside")]
    BadInside,
}

impl SignalSealer {
    /// The sealer of the network whose seal key is `key`, meeting in `room`.
    pub(crate) fn new(key: &[u8; KEY_LEN], room: RoomId) -> Self {
        Self { cipher: PacketCipher::new(key), room }
    }

    fn aad(&self, from: &PeerId, to: &PeerId) -> Vec<u8> {
        let mut aad = Vec::with_capacity(AAD_LABEL.len() + 3 * 66);
        aad.extend_from_slice(AAD_LABEL);
        for part in [self.room.as_str(), from.as_str(), to.as_str()] {
            // Ids are at most 64 bytes (`signal.rs`): one length byte each.
            aad.push(u8::try_from(part.len()).unwrap_or(u8::MAX));
            aad.extend_from_slice(part.as_bytes());
        }
        aad
    }

    /// `payload` from `from` to `to`, sealed.
    pub fn seal(
        &self,
        from: &PeerId,
        to: &PeerId,
        payload: &SignalPayload,
        rng: &mut impl CryptoRng,
    ) -> SignalPayload {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        // Serializing a plain enum of strings cannot fail.
        let inside = Zeroizing::new(serde_json::to_vec(payload).unwrap_or_default());
        let mut out = Vec::with_capacity(1 + NONCE_LEN + inside.len() + TAG_LEN);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&inside);
        let aad = self.aad(from, to);
        let body = &mut out[1 + NONCE_LEN..];
        // Fails only past about 256 GiB.
        let tag = self.cipher.seal_in_place(&nonce, &aad, body).unwrap_or([0; TAG_LEN]);
        out.extend_from_slice(&tag);
        SignalPayload::Opaque { data: URL_SAFE_NO_PAD.encode(&out) }
    }

    /// The payload `from` sealed for `to`.
    pub fn open(
        &self,
        from: &PeerId,
        to: &PeerId,
        payload: &SignalPayload,
    ) -> Result<SignalPayload, OpenError> {
        let SignalPayload::Opaque { data } = payload else { return Err(OpenError::NotSealed) };
        // Zeroed when dropped: it holds the plaintext once opened.
        let mut bytes =
            Zeroizing::new(URL_SAFE_NO_PAD.decode(data).map_err(|_| OpenError::Malformed)?);
        if bytes.len() < 1 + NONCE_LEN + TAG_LEN || bytes[0] != VERSION {
            return Err(OpenError::Malformed);
        }
        let (head, rest) = bytes.split_at_mut(1 + NONCE_LEN);
        let (body, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        let nonce: [u8; NONCE_LEN] = head[1..].try_into().map_err(|_| OpenError::Malformed)?;
        let tag: [u8; TAG_LEN] = (&*tag).try_into().map_err(|_| OpenError::Malformed)?;
        let aad = self.aad(from, to);
        self.cipher.open_in_place(&nonce, &aad, body, &tag).map_err(|_| OpenError::Forged)?;
        // As text, as every other JSON the browser reads: one serde_json reader in its
        // module, not two (not UTF-8 is as bad inside as any other error).
        match std::str::from_utf8(body).map(serde_json::from_str) {
            // Sealed twice is not a thing a member sends.
            Ok(Ok(SignalPayload::Opaque { .. }) | Err(_)) | Err(_) => Err(OpenError::BadInside),
            Ok(Ok(inner)) => Ok(inner),
        }
    }
}

impl std::fmt::Debug for SignalSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignalSealer(<key>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::Network;
    use chacha20::ChaCha20Rng;
    use chacha20::rand_core::SeedableRng;

    fn id(s: &str) -> PeerId {
        PeerId::new(s).unwrap()
    }

    #[test]
    fn sealed_payloads_open_only_for_their_pair_room_and_key() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let net = Network::generate(&mut rng);
        let sealer = net.signal_sealer().unwrap();
        let offer = SignalPayload::Offer { sdp: "v=0\r\na=fingerprint:sha-256 AB\r\n".into() };
        let sealed = sealer.seal(&id("a"), &id("b"), &offer, &mut rng);
        let SignalPayload::Opaque { data } = &sealed else { panic!("{sealed:?}") };
        assert!(!data.contains("fingerprint") && !data.contains("v=0"));
        assert_eq!(sealer.open(&id("a"), &id("b"), &sealed), Ok(offer.clone()));
        // Replayed to another member, or claimed by another sender.
        assert_eq!(sealer.open(&id("a"), &id("c"), &sealed), Err(OpenError::Forged));
        assert_eq!(sealer.open(&id("c"), &id("b"), &sealed), Err(OpenError::Forged));
        // Another network's key.
        let other = Network::generate(&mut rng).signal_sealer().unwrap();
        assert_eq!(other.open(&id("a"), &id("b"), &sealed), Err(OpenError::Forged));
        // Rewritten by one bit.
        let mut bytes = URL_SAFE_NO_PAD.decode(data).unwrap();
        bytes[20] ^= 1;
        let flipped = SignalPayload::Opaque { data: URL_SAFE_NO_PAD.encode(&bytes) };
        assert_eq!(sealer.open(&id("a"), &id("b"), &flipped), Err(OpenError::Forged));
        // In clear, or malformed.
        assert_eq!(sealer.open(&id("a"), &id("b"), &offer), Err(OpenError::NotSealed));
        for data in ["", "!!", "AQ"] {
            let bad = SignalPayload::Opaque { data: data.into() };
            assert_eq!(sealer.open(&id("a"), &id("b"), &bad), Err(OpenError::Malformed));
        }
        // Two seals of one payload differ (random nonces).
        assert_ne!(sealer.seal(&id("a"), &id("b"), &offer, &mut rng), sealed);
    }

    #[test]
    fn passphrase_networks_do_not_seal_yet() {
        let params =
            crate::network::PassphraseParams { memory_kib: 8, iterations: 1, parallelism: 1 };
        let net = Network::from_passphrase("team", "pass", &params).unwrap();
        assert!(net.signal_sealer().is_none());
    }
}
