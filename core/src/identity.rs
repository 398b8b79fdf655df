//! Long-term peer identities: an X25519 key pair per peer, and the fingerprint people
//! compare to verify each other.
//!
//! Storage is the drivers' job: they keep [`IdentityKeyPair::secret_bytes`] somewhere safe
//! and rebuild the pair with [`IdentityKeyPair::from_secret_bytes`]. Peers are not known in
//! advance: the handshake carries each side's [`PublicIdentity`], and the driver pins it on
//! first contact (trust on first use) and shows its [`Fingerprint::short_code`] so the two
//! people can compare codes out of band.

use std::fmt;

use hpke::rand_core::CryptoRng;
use hpke::{Deserializable, Kem, Serializable};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// The KEM of long-term identities: DHKEM(X25519, HKDF-SHA256).
pub(crate) type IdentityKem = hpke::kem::X25519HkdfSha256;

/// Length of a [`PublicIdentity`] in bytes.
pub const PUBLIC_IDENTITY_LEN: usize = 32;

/// Length of the secret half of an [`IdentityKeyPair`] in bytes.
pub const IDENTITY_SECRET_LEN: usize = 32;

/// Domain separator of [`Fingerprint`]s.
const FINGERPRINT_LABEL: &[u8] = b"weft/v1/identity fingerprint";

/// Number of five-digit groups in a [`Fingerprint::short_code`].
pub const SHORT_CODE_GROUPS: usize = 6;

/// A peer's long-term X25519 key pair.
///
/// The secret half is erased from memory when the pair is dropped.
#[derive(Clone)]
pub struct IdentityKeyPair {
    secret: <IdentityKem as Kem>::PrivateKey,
    public: PublicIdentity,
}

impl IdentityKeyPair {
    /// Generates a new identity from the caller's random number generator.
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        let mut seed = Zeroizing::new([0u8; IDENTITY_SECRET_LEN]);
        rng.fill_bytes(seed.as_mut());
        Self::from_secret_bytes(&seed)
    }

    /// Rebuilds an identity from bytes earlier returned by [`Self::secret_bytes`].
    ///
    /// Every 32-byte string is a valid X25519 secret key, so this cannot fail.
    pub fn from_secret_bytes(secret: &[u8; IDENTITY_SECRET_LEN]) -> Self {
        // X25519 private keys of any 32 bytes are valid (they are clamped), so the length is
        // the only thing `from_bytes` checks, and ours is right by type. Fall back to
        // deriving from the bytes rather than panicking, should that ever change.
        let secret = <IdentityKem as Kem>::PrivateKey::from_bytes(secret)
            .unwrap_or_else(|_| IdentityKem::derive_keypair(secret).0);
        let public = PublicIdentity { bytes: to_array(&IdentityKem::sk_to_pk(&secret).to_bytes()) };
        Self { secret, public }
    }

    /// This device's identity in `network`: a key of its own for each network, derived
    /// from this one and the network's secret (HKDF-SHA256, salt from the secret under
    /// its own label), so a member of one network cannot tell that a key it meets in
    /// another belongs to the same device, and the device stores one key only.
    pub fn for_network(&self, network: &crate::network::Network) -> Self {
        let salt = network.secret().identity_salt();
        let hk = hkdf::Hkdf::<Sha256>::new(Some(salt.as_ref()), self.secret_bytes().as_ref());
        let mut seed = Zeroizing::new([0u8; IDENTITY_SECRET_LEN]);
        // 32 bytes is far below HKDF-SHA256's limit.
        if hk.expand(b"weft/v1/network identity", seed.as_mut()).is_err() {
            unreachable!("HKDF output length within limits");
        }
        Self::from_secret_bytes(&seed)
    }

    /// The secret key, for the driver to store. Keep it out of logs.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; IDENTITY_SECRET_LEN]> {
        Zeroizing::new(to_array(&self.secret.to_bytes()))
    }

    /// The public half, which the handshake sends to peers.
    pub fn public(&self) -> &PublicIdentity {
        &self.public
    }

    pub(crate) fn hpke_secret(&self) -> &<IdentityKem as Kem>::PrivateKey {
        &self.secret
    }
}

impl fmt::Debug for IdentityKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityKeyPair")
            .field("public", &self.public)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A peer's long-term public key (X25519, 32 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicIdentity {
    bytes: [u8; PUBLIC_IDENTITY_LEN],
}

impl PublicIdentity {
    /// Wraps 32 bytes received from a peer or read from storage.
    ///
    /// Any 32 bytes are accepted here: a key that cannot be used (a low-order point) makes
    /// the handshake fail instead.
    pub fn from_bytes(bytes: [u8; PUBLIC_IDENTITY_LEN]) -> Self {
        Self { bytes }
    }

    /// The raw key.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_IDENTITY_LEN] {
        &self.bytes
    }

    /// The fingerprint of this key, to pin and to show.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut h = Sha256::new();
        h.update(FINGERPRINT_LABEL);
        h.update(self.bytes);
        Fingerprint(h.finalize().into())
    }
}

impl fmt::Debug for PublicIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicIdentity({})", self.fingerprint().short_code())
    }
}

/// SHA-256 of a [`PublicIdentity`] under a Weft-specific label.
///
/// Compare fingerprints with `==` (constant time). People compare [`Self::short_code`].
#[derive(Clone, Copy, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Wraps a fingerprint read back from the driver's pin store.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The full 32-byte fingerprint, for pinning.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A short code for people to read to each other: six groups of five decimal digits
    /// (`"04213 99120 00871 55309 62014 11880"`), about 99 bits of the fingerprint.
    ///
    /// Each group is 5 bytes of the fingerprint read as a big-endian number, modulo 100 000,
    /// the same construction as Signal's safety numbers. An attacker who wants a key with
    /// a given code must find a second preimage of about 2^99 work.
    pub fn short_code(&self) -> String {
        let mut out = String::with_capacity(SHORT_CODE_GROUPS * 6);
        for (i, chunk) in self.0.chunks_exact(5).take(SHORT_CODE_GROUPS).enumerate() {
            let n = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)) % 100_000;
            if i > 0 {
                out.push(' ');
            }
            out.push_str(&format!("{n:05}"));
        }
        out
    }

    /// Lowercase hex of the full fingerprint.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl PartialEq for Fingerprint {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::hash::Hash for Fingerprint {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.short_code())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short_code())
    }
}

/// Copies a slice of known length into an array (zero-padded or truncated otherwise; the
/// callers pass exact lengths).
pub(crate) fn to_array<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = s.len().min(N);
    out[..n].copy_from_slice(&s[..n]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_round_trip_keeps_public_key() {
        let a = IdentityKeyPair::from_secret_bytes(&[7u8; 32]);
        let b = IdentityKeyPair::from_secret_bytes(&a.secret_bytes());
        assert_eq!(a.public(), b.public());
    }

    #[test]
    fn short_code_shape() {
        let id = IdentityKeyPair::from_secret_bytes(&[1u8; 32]);
        let code = id.public().fingerprint().short_code();
        assert_eq!(code.len(), SHORT_CODE_GROUPS * 6 - 1);
        assert!(code.split(' ').all(|g| g.len() == 5 && g.bytes().all(|c| c.is_ascii_digit())));
        let other = IdentityKeyPair::from_secret_bytes(&[2u8; 32]);
        assert_ne!(code, other.public().fingerprint().short_code());
    }
}
