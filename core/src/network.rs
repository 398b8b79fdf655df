//! Networks: the shared secret that makes a set of peers one network.
//!
//! A [`NetworkSecret`] comes either from a random invite ([`NetworkSecret::from_random_bytes`],
//! shared as [`NetworkSecret::to_invite`]) or from a passphrase stretched with Argon2id and
//! salted by the network's name ([`NetworkSecret::from_passphrase`]).
//!
//! Everything else is derived from the secret with HKDF-SHA256 under distinct labels, so
//! the derived values are independent of each other:
//!
//! - the [`RoomId`] given to the signaling server ([`NetworkSecret::room_id`]): the server
//!   learns neither the secret nor the network's name from it;
//! - the HPKE pre-shared key and its id, which the handshake mixes into every key;
//! - the key of the network MAC that ends every handshake message.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use hpke::rand_core::CryptoRng;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::signal::RoomId;

/// Length of a network secret, and of an invite's payload, in bytes.
pub const NETWORK_SECRET_LEN: usize = 32;

/// Length of an invite string: base64url without padding of [`NETWORK_SECRET_LEN`] bytes.
pub const INVITE_LEN: usize = 43;

/// Longest passphrase accepted, in bytes (a bound on work, not a security limit).
pub const MAX_PASSPHRASE_LEN: usize = 1024;

/// Longest network name accepted, in bytes.
pub const MAX_NETWORK_NAME_LEN: usize = 256;

const NETWORK_SALT_LABEL: &[u8] = b"weft/v1/network name salt";
const NETWORK_EXTRACT_SALT: &[u8] = b"weft/v1/network secret";
const ROOM_ID_LABEL: &[u8] = b"weft/v1/room id";
const PSK_LABEL: &[u8] = b"weft/v1/hpke psk";
const PSK_ID_LABEL: &[u8] = b"weft/v1/hpke psk id";
const HANDSHAKE_MAC_LABEL: &[u8] = b"weft/v1/handshake network mac key";
const OVERLAY_GLOBAL_ID_LABEL: &[u8] = b"weft/v1/overlay ipv6 global id";
const SIGNAL_SEAL_LABEL: &[u8] = b"weft/v1/signal seal";
const IDENTITY_SALT_LABEL: &[u8] = b"weft/v1/network identity salt";
const PAKE_PASSWORD_LABEL: &[u8] = b"weft/v1/pake password";

/// Argon2id cost parameters for [`NetworkSecret::from_passphrase`].
///
/// Every peer of a network must use the same parameters, or they derive different secrets.
/// Use [`PassphraseParams::INTERACTIVE`] in real code; tests may use tiny values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassphraseParams {
    /// Memory, in KiB (at least 8 × `parallelism`).
    pub memory_kib: u32,
    /// Number of passes over the memory (at least 1).
    pub iterations: u32,
    /// Degree of parallelism (at least 1). Computed sequentially here; it still changes the
    /// result, so keep it at 1.
    pub parallelism: u32,
}

impl PassphraseParams {
    /// OWASP's interactive recommendation for Argon2id: 19 MiB, 2 passes, 1 lane. About a
    /// second in a browser's WebAssembly.
    pub const INTERACTIVE: Self = Self { memory_kib: 19 * 1024, iterations: 2, parallelism: 1 };
}

impl Default for PassphraseParams {
    fn default() -> Self {
        Self::INTERACTIVE
    }
}

/// Why a passphrase could not be turned into a [`NetworkSecret`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PassphraseError {
    /// The passphrase is empty.
    #[error("the passphrase is empty")]
    EmptyPassphrase,
    /// The passphrase is longer than [`MAX_PASSPHRASE_LEN`] bytes.
    #[error("the passphrase is longer than {MAX_PASSPHRASE_LEN} bytes")]
    PassphraseTooLong,
    /// The network name is longer than [`MAX_NETWORK_NAME_LEN`] bytes.
    #[error("the network name is longer than {MAX_NETWORK_NAME_LEN} bytes")]
    NameTooLong,
    /// The network name is empty.
    #[error("the network name is empty")]
    EmptyName,
    /// Argon2 refused the parameters.
    #[error("invalid Argon2id parameters: {0}")]
    InvalidParams(String),
}

/// Why a string is not a valid invite.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InviteError {
    /// The invite has the wrong length.
    #[error(
        "malformed invite: expected {INVITE_LEN} characters of base64url, got {got} characters"
    )]
    WrongLength {
        /// Characters received (after trimming surrounding whitespace).
        got: usize,
    },
    /// The invite contains a character outside `A-Z a-z 0-9 - _`, or non-canonical trailing
    /// bits.
    #[error("malformed invite: only the characters A-Z a-z 0-9 - _ may appear")]
    InvalidCharacters,
    /// The right characters, but not an invite this program made (the last character
    /// holds unused bits that must be zero): probably mistyped.
    #[error("not a valid invite: its last character is wrong (mistyped or cut short?)")]
    NotCanonical,
}

/// The secret shared by all peers of a network. Erased from memory on drop.
#[derive(Clone)]
pub struct NetworkSecret {
    secret: Zeroizing<[u8; NETWORK_SECRET_LEN]>,
}

impl NetworkSecret {
    /// Wraps 256 random bits (a new network). The caller draws them from a CSPRNG.
    pub fn from_random_bytes(bytes: [u8; NETWORK_SECRET_LEN]) -> Self {
        Self { secret: Zeroizing::new(bytes) }
    }

    /// Draws a new random secret from the caller's generator.
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        let mut secret = Zeroizing::new([0u8; NETWORK_SECRET_LEN]);
        rng.fill_bytes(secret.as_mut());
        Self { secret }
    }

    /// Stretches a passphrase with Argon2id, salted by the network's name.
    ///
    /// The salt is SHA-256 of a label and the name, so any name (even an empty one) gives a
    /// full-length salt, and the same passphrase in two networks gives unrelated secrets.
    /// Both strings are used byte for byte (no Unicode normalization, no trimming): drivers
    /// should normalize user input the same way everywhere.
    pub fn from_passphrase(
        network_name: &str,
        passphrase: &str,
        params: &PassphraseParams,
    ) -> Result<Self, PassphraseError> {
        if passphrase.is_empty() {
            return Err(PassphraseError::EmptyPassphrase);
        }
        if passphrase.len() > MAX_PASSPHRASE_LEN {
            return Err(PassphraseError::PassphraseTooLong);
        }
        if network_name.len() > MAX_NETWORK_NAME_LEN {
            return Err(PassphraseError::NameTooLong);
        }
        let mut h = Sha256::new();
        h.update(NETWORK_SALT_LABEL);
        h.update((network_name.len() as u64).to_be_bytes());
        h.update(network_name.as_bytes());
        let salt = h.finalize();

        let secret = argon2id(passphrase.as_bytes(), &salt, params)?;
        Ok(Self { secret })
    }

    /// The invite string: base64url without padding of the secret ([`INVITE_LEN`] characters).
    /// Anyone holding it joins the network: share it only over a channel you trust.
    pub fn to_invite(&self) -> Zeroizing<String> {
        Zeroizing::new(URL_SAFE_NO_PAD.encode(self.secret.as_ref()))
    }

    /// Parses an invite made by [`Self::to_invite`]. Surrounding whitespace is ignored.
    pub fn from_invite(invite: &str) -> Result<Self, InviteError> {
        let invite = invite.trim();
        if !invite.is_ascii() {
            return Err(InviteError::InvalidCharacters);
        }
        if invite.len() != INVITE_LEN {
            return Err(InviteError::WrongLength { got: invite.len() });
        }
        let mut secret = Zeroizing::new([0u8; NETWORK_SECRET_LEN]);
        match URL_SAFE_NO_PAD.decode_slice(invite, secret.as_mut()) {
            Ok(NETWORK_SECRET_LEN) => Ok(Self { secret }),
            Ok(n) => Err(InviteError::WrongLength { got: n }),
            Err(base64::DecodeSliceError::DecodeError(base64::DecodeError::InvalidLastSymbol(
                ..,
            ))) => Err(InviteError::NotCanonical),
            Err(_) => Err(InviteError::InvalidCharacters),
        }
    }

    /// The room id to give the signaling server: base64url of 32 bytes derived from the
    /// secret under its own label (43 characters).
    pub fn room_id(&self) -> RoomId {
        let bytes = self.derive::<32>(ROOM_ID_LABEL);
        let text = URL_SAFE_NO_PAD.encode(bytes.as_ref());
        // base64url without padding uses exactly the characters `RoomId` allows, and 43 is
        // within its length limit.
        RoomId::new(text).unwrap_or_else(|_| unreachable!("base64url is a valid room id"))
    }

    /// The HPKE pre-shared key.
    pub(crate) fn psk(&self) -> Zeroizing<[u8; 32]> {
        self.derive::<32>(PSK_LABEL)
    }

    /// The HPKE pre-shared key's id (not secret by HPKE's rules, but derived from the
    /// secret so that it differs between networks).
    pub(crate) fn psk_id(&self) -> Zeroizing<[u8; 16]> {
        self.derive::<16>(PSK_ID_LABEL)
    }

    /// Key of the network MAC that ends every handshake message.
    pub(crate) fn handshake_mac_key(&self) -> Zeroizing<[u8; 32]> {
        self.derive::<32>(HANDSHAKE_MAC_LABEL)
    }

    /// The 40-bit global id of the network's IPv6 ULA prefix (RFC 4193 `fdXX:XXXX:XXXX::/48`),
    /// under its own label: public (every member's address shows it) and independent of
    /// every other value derived here.
    pub(crate) fn overlay_global_id(&self) -> [u8; 5] {
        *self.derive::<5>(OVERLAY_GLOBAL_ID_LABEL)
    }

    /// Salt of a device's identity in this network ([`crate::identity::IdentityKeyPair::for_network`]).
    pub(crate) fn identity_salt(&self) -> Zeroizing<[u8; 32]> {
        self.derive::<32>(IDENTITY_SALT_LABEL)
    }

    /// Key of sealed signaling payloads (`sealed.rs`).
    pub(crate) fn signal_seal_key(&self) -> Zeroizing<[u8; 32]> {
        self.derive::<32>(SIGNAL_SEAL_LABEL)
    }

    /// What a passphrase network's members prove to each other with the pairwise PAKE
    /// (`pake.rs`): the Argon2id-stretched passphrase, under its own label.
    pub(crate) fn pake_password(&self) -> Zeroizing<[u8; 32]> {
        self.derive::<32>(PAKE_PASSWORD_LABEL)
    }

    fn derive<const N: usize>(&self, label: &[u8]) -> Zeroizing<[u8; N]> {
        let hk = Hkdf::<Sha256>::new(Some(NETWORK_EXTRACT_SALT), self.secret.as_ref());
        let mut out = Zeroizing::new([0u8; N]);
        // N is at most 32 here, far below HKDF-SHA256's limit of 8160 bytes.
        if hk.expand(label, out.as_mut()).is_err() {
            unreachable!("HKDF output length within limits");
        }
        out
    }
}

impl fmt::Debug for NetworkSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NetworkSecret(<redacted>)")
    }
}

const RENDEZVOUS_SALT_LABEL: &[u8] = b"weft/v1/rendezvous salt";
const RENDEZVOUS_ROOM_LABEL: &[u8] = b"weft/v1/rendezvous room id";

/// A network as a peer joins it: the secret, and the room where its members meet.
///
/// - An **invite network** meets in a room derived from its 256-bit secret: the server
///   learns nothing it could guess.
/// - A **passphrase network** meets in a room derived from its *name* alone, stretched with
///   Argon2id, and the passphrase becomes the secret. So someone who types the right name
///   with a wrong passphrase meets the members and is refused by the handshake with a
///   clear reason, instead of waiting alone in an empty room. The price: the server can
///   test guesses of the network name at Argon2id's cost (never of the passphrase without
///   the name), and two unrelated networks with the same name share a room (each sees the
///   other's members as "different passphrase"). Use invites when that matters.
#[derive(Clone, Debug)]
pub struct Network {
    secret: NetworkSecret,
    room: RoomId,
    name: Option<String>,
    from_invite: bool,
}

impl Network {
    /// A new invite network with a random secret from the caller's generator.
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        Self::with_secret(NetworkSecret::generate(rng))
    }

    /// The network an invite string names.
    pub fn from_invite(invite: &str) -> Result<Self, InviteError> {
        Ok(Self::with_secret(NetworkSecret::from_invite(invite)?))
    }

    fn with_secret(secret: NetworkSecret) -> Self {
        let room = secret.room_id();
        Self { secret, room, name: None, from_invite: true }
    }

    /// A passphrase network: two Argon2id computations (the room from the name, the secret
    /// from the passphrase salted by the name), about two seconds in a browser with
    /// [`PassphraseParams::INTERACTIVE`].
    pub fn from_passphrase(
        name: &str,
        passphrase: &str,
        params: &PassphraseParams,
    ) -> Result<Self, PassphraseError> {
        if name.is_empty() {
            return Err(PassphraseError::EmptyName);
        }
        let secret = NetworkSecret::from_passphrase(name, passphrase, params)?;
        let salt: [u8; 32] = Sha256::digest(RENDEZVOUS_SALT_LABEL).into();
        let stretched = argon2id(name.as_bytes(), &salt, params)?;
        let hk = Hkdf::<Sha256>::new(Some(NETWORK_EXTRACT_SALT), stretched.as_ref());
        let mut room = [0u8; 32];
        if hk.expand(RENDEZVOUS_ROOM_LABEL, &mut room).is_err() {
            unreachable!("HKDF output length within limits");
        }
        let room = RoomId::new(URL_SAFE_NO_PAD.encode(room))
            .unwrap_or_else(|_| unreachable!("base64url is a valid room id"));
        Ok(Self { secret, room, name: Some(name.to_string()), from_invite: false })
    }

    /// The room id to join on the signaling server.
    pub fn room_id(&self) -> &RoomId {
        &self.room
    }

    /// The shared secret (PSK and MAC keys of the handshake derive from it).
    pub fn secret(&self) -> &NetworkSecret {
        &self.secret
    }

    /// The invite string, for an invite network.
    pub fn invite(&self) -> Option<Zeroizing<String>> {
        self.from_invite.then(|| self.secret.to_invite())
    }

    /// What seals signaling payloads between members: invite networks only (see
    /// [`crate::sealed`]).
    pub fn signal_sealer(&self) -> Option<crate::sealed::SignalSealer> {
        self.from_invite.then(|| {
            crate::sealed::SignalSealer::new(&self.secret.signal_seal_key(), self.room.clone())
        })
    }

    /// Whether each pair of members must first run the PAKE (`pake.rs`): passphrase
    /// networks, whose secret could be guessed offline from anything keyed by it.
    pub fn needs_pake(&self) -> bool {
        !self.from_invite
    }

    /// The network's name, for a passphrase network.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

fn argon2id(
    input: &[u8],
    salt: &[u8],
    params: &PassphraseParams,
) -> Result<Zeroizing<[u8; NETWORK_SECRET_LEN]>, PassphraseError> {
    let argon_params = argon2::Params::new(
        params.memory_kib,
        params.iterations,
        params.parallelism,
        Some(NETWORK_SECRET_LEN),
    )
    .map_err(|e| PassphraseError::InvalidParams(e.to_string()))?;
    let argon =
        argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, argon_params);
    let mut out = Zeroizing::new([0u8; NETWORK_SECRET_LEN]);
    argon
        .hash_password_into(input, salt, out.as_mut())
        .map_err(|e| PassphraseError::InvalidParams(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: PassphraseParams =
        PassphraseParams { memory_kib: 8, iterations: 1, parallelism: 1 };

    #[test]
    fn invite_round_trip() {
        let s = NetworkSecret::from_random_bytes([0xA5; 32]);
        let inv = s.to_invite();
        assert_eq!(inv.len(), INVITE_LEN);
        let back = NetworkSecret::from_invite(&format!("  {}\n", inv.as_str())).unwrap();
        assert_eq!(back.secret.as_ref(), s.secret.as_ref());
    }

    #[test]
    fn malformed_invites_are_rejected() {
        assert_eq!(
            NetworkSecret::from_invite("abc").unwrap_err(),
            InviteError::WrongLength { got: 3 }
        );
        let bad = "!".repeat(INVITE_LEN);
        assert_eq!(NetworkSecret::from_invite(&bad).unwrap_err(), InviteError::InvalidCharacters);
        // Standard base64 (with '+' and '/') is not base64url.
        let std_b64 = format!("{}+", "A".repeat(INVITE_LEN - 1));
        assert_eq!(
            NetworkSecret::from_invite(&std_b64).unwrap_err(),
            InviteError::InvalidCharacters
        );
        // Non-canonical last character (trailing bits set).
        let noncanon = format!("{}B", "A".repeat(INVITE_LEN - 1));
        assert_eq!(NetworkSecret::from_invite(&noncanon).unwrap_err(), InviteError::NotCanonical);
        // Multi-byte characters are not counted as bytes.
        let unicode = "é".repeat(INVITE_LEN);
        assert!(NetworkSecret::from_invite(&unicode).is_err());
    }

    #[test]
    fn passphrase_depends_on_name_and_passphrase() {
        let a = NetworkSecret::from_passphrase("home", "correct horse", &TINY).unwrap();
        let a2 = NetworkSecret::from_passphrase("home", "correct horse", &TINY).unwrap();
        let b = NetworkSecret::from_passphrase("work", "correct horse", &TINY).unwrap();
        let c = NetworkSecret::from_passphrase("home", "correct horsf", &TINY).unwrap();
        assert_eq!(a.room_id(), a2.room_id());
        assert_ne!(a.room_id(), b.room_id());
        assert_ne!(a.room_id(), c.room_id());
        assert_eq!(
            NetworkSecret::from_passphrase("home", "", &TINY).unwrap_err(),
            PassphraseError::EmptyPassphrase
        );
        let bad = PassphraseParams { memory_kib: 1, ..TINY };
        assert!(matches!(
            NetworkSecret::from_passphrase("home", "x", &bad),
            Err(PassphraseError::InvalidParams(_))
        ));
    }

    #[test]
    fn passphrase_networks_meet_by_name_and_differ_by_passphrase() {
        let a = Network::from_passphrase("home", "correct horse", &TINY).unwrap();
        let wrong = Network::from_passphrase("home", "wrong horse", &TINY).unwrap();
        let other = Network::from_passphrase("work", "correct horse", &TINY).unwrap();
        assert_eq!(a.room_id(), wrong.room_id(), "same name, same room");
        assert_ne!(a.room_id(), other.room_id());
        assert_ne!(a.secret().psk().as_ref(), wrong.secret().psk().as_ref());
        assert_eq!(a.name(), Some("home"));
        assert!(a.invite().is_none());
        // The room reveals neither the name nor the secret's own room id.
        assert!(!a.room_id().as_str().contains("home"));
        assert_ne!(a.room_id(), &a.secret().room_id());
        assert_eq!(
            Network::from_passphrase("", "x", &TINY).unwrap_err(),
            PassphraseError::EmptyName
        );
    }

    #[test]
    fn invite_networks_meet_by_secret() {
        let n = Network::from_invite(&"A".repeat(INVITE_LEN)).unwrap();
        let invite = n.invite().unwrap();
        let again = Network::from_invite(&invite).unwrap();
        assert_eq!(n.room_id(), again.room_id());
        assert_eq!(n.room_id(), &n.secret().room_id());
        assert!(n.name().is_none());
    }

    #[test]
    fn derived_values_are_independent() {
        let s = NetworkSecret::from_random_bytes([9; 32]);
        let room = s.derive::<32>(ROOM_ID_LABEL);
        let psk = s.psk();
        let mac = s.handshake_mac_key();
        assert_ne!(room.as_ref(), psk.as_ref());
        assert_ne!(psk.as_ref(), mac.as_ref());
        assert_ne!(mac.as_ref(), s.signal_seal_key().as_ref());
        assert_ne!(room.as_ref(), s.signal_seal_key().as_ref());
        assert_ne!(room.as_ref(), s.secret.as_ref());
        assert_ne!(&psk[..16], s.psk_id().as_ref());
        let id = s.room_id();
        assert_eq!(id.as_str().len(), 43);
        assert!(!id.as_str().contains(s.to_invite().as_str()));
    }
}
