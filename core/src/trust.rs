//! Trust on first use, with verification: which identity key each named peer had before,
//! and whether a person compared its short code.
//!
//! Peers are pinned by the display name they announce inside the encrypted session
//! ([`crate::frame::Frame::Hello`]). The first key seen for a name is pinned; the same key
//! again is [`Trust::Known`] (or [`Trust::Verified`] once a person compared short codes);
//! a *different* key for a pinned name is [`Trust::Changed`], which drivers must show
//! loudly. The pin does not move until the user accepts the new key.
//!
//! The store is plain data: drivers persist it ([`TrustStore::to_json`]) in IndexedDB or a
//! file, per network.

use serde::{Deserialize, Serialize};

use crate::identity::{Fingerprint, IdentityKeyPair};
use crate::sorted::SortedMap;

/// What the store says about a peer's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "trust")]
pub enum Trust {
    /// First contact under this name: pinned now, not verified.
    New,
    /// The pinned key, not verified by a person.
    Known,
    /// The pinned key, and a person compared its short code.
    Verified,
    /// A different key than the one pinned for this name: an impostor, or a reinstall.
    Changed {
        /// Whether the old key had been verified (the louder warning).
        verified_before: bool,
    },
}

impl Trust {
    /// Short lowercase name: `new`, `known`, `verified`, `changed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Trust::New => "new",
            Trust::Known => "known",
            Trust::Verified => "verified",
            Trust::Changed { .. } => "changed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pin {
    /// Hex of the fingerprint.
    fingerprint: String,
    verified: bool,
}

/// Pinned keys by peer name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustStore {
    #[serde(default)]
    /// Every name pinned in this network: one per member ever met, hundreds at most, so a
    /// sorted `Vec` (`sorted.rs`), serialized as `BTreeMap` was (a JSON object).
    peers: SortedMap<String, Pin>,
    /// We use an identity of this network's own here ([`TrustStore::own_identity`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    network_identity: bool,
}

/// A stored trust file that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("unreadable trust store: {0}")]
pub struct TrustStoreError(#[from] serde_json::Error);

impl TrustStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The identity we use in this network, from the device's `device` identity: one of
    /// the network's own ([`IdentityKeyPair::for_network`]), so that nobody can link our
    /// devices' presence across networks by key, in networks where we start afresh
    /// (nothing pinned yet), recorded here so that it stays; the device's key where this
    /// store already pinned peers before per-network identities existed, since those peers
    /// pinned that key for us and would see it change.
    pub fn own_identity(
        &mut self,
        device: &IdentityKeyPair,
        network: &crate::network::Network,
    ) -> IdentityKeyPair {
        if self.peers.is_empty() {
            self.network_identity = true;
        }
        if self.network_identity { device.for_network(network) } else { device.clone() }
    }

    /// Looks `name`'s key up, pinning it on first contact.
    pub fn observe(&mut self, name: &str, fingerprint: &Fingerprint) -> Trust {
        let hex = fingerprint.to_hex();
        match self.peers.get(name) {
            None => {
                self.peers.insert(name.to_string(), Pin { fingerprint: hex, verified: false });
                Trust::New
            }
            Some(pin) if pin.fingerprint == hex => {
                if pin.verified {
                    Trust::Verified
                } else {
                    Trust::Known
                }
            }
            Some(pin) => Trust::Changed { verified_before: pin.verified },
        }
    }

    /// What the store says about `name`'s key without changing anything.
    pub fn check(&self, name: &str, fingerprint: &Fingerprint) -> Option<Trust> {
        let pin = self.peers.get(name)?;
        Some(if pin.fingerprint != fingerprint.to_hex() {
            Trust::Changed { verified_before: pin.verified }
        } else if pin.verified {
            Trust::Verified
        } else {
            Trust::Known
        })
    }

    /// Another pinned name that `name` looks like (`аlice` with a Cyrillic `а` for
    /// `alice`, see [`crate::text::skeleton`]) whose key is not `fingerprint`: an
    /// impostor's name, or a coincidence the user should see either way. Verified names
    /// are named first.
    pub fn look_alike(&self, name: &str, fingerprint: &Fingerprint) -> Option<&str> {
        let hex = fingerprint.to_hex();
        let skeleton = crate::text::skeleton(name);
        let alikes: Vec<(&String, &Pin)> = self
            .peers
            .iter()
            .filter(|(other, pin)| {
                other.as_str() != name
                    && pin.fingerprint != hex
                    && crate::text::skeleton(other) == skeleton
            })
            .collect();
        let verified = alikes.iter().find(|(_, pin)| pin.verified);
        verified.or(alikes.first()).map(|(other, _)| other.as_str())
    }

    /// A person compared the short code of `fingerprint` with `name`'s own and they match.
    /// Pins the key if `name` had none; does nothing if `name` is pinned to another key
    /// (accept it first with [`Self::accept_new_key`]).
    pub fn verify(&mut self, name: &str, fingerprint: &Fingerprint) -> Trust {
        let hex = fingerprint.to_hex();
        let pin = self
            .peers
            .entry(name.to_string())
            .or_insert_with(|| Pin { fingerprint: hex.clone(), verified: false });
        if pin.fingerprint == hex {
            pin.verified = true;
            Trust::Verified
        } else {
            Trust::Changed { verified_before: pin.verified }
        }
    }

    /// The user accepts a changed key for `name` (for example after a reinstall): it
    /// becomes the pin, unverified.
    pub fn accept_new_key(&mut self, name: &str, fingerprint: &Fingerprint) {
        self.peers
            .insert(name.to_string(), Pin { fingerprint: fingerprint.to_hex(), verified: false });
    }

    /// Every pinned name with its key's fingerprint (hex) and whether it was verified,
    /// by name.
    pub fn pinned(&self) -> impl Iterator<Item = (&str, &str, bool)> {
        self.peers.iter().map(|(name, pin)| (name.as_str(), pin.fingerprint.as_str(), pin.verified))
    }

    /// Forgets `name`.
    pub fn forget(&mut self, name: &str) {
        self.peers.remove(name);
    }

    /// The store as JSON, for the driver to persist.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A store persisted by [`Self::to_json`].
    pub fn from_json(json: &str) -> Result<Self, TrustStoreError> {
        Ok(serde_json::from_str(json)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(b: u8) -> Fingerprint {
        Fingerprint::from_bytes([b; 32])
    }

    /// A device shows a key of each network's own in the networks it starts afresh (a
    /// member of two networks cannot link it by key), the same one every time; where it
    /// had already met peers under its device key, it keeps that key.
    #[test]
    fn each_new_network_gets_its_own_identity_and_keeps_it() {
        use crate::network::Network;
        let device = IdentityKeyPair::from_secret_bytes(&[5; 32]);
        let (one, two) = (
            Network::from_invite(&"Q".repeat(43)).unwrap(),
            Network::from_invite(&"g".repeat(43)).unwrap(),
        );
        let mut store_one = TrustStore::new();
        let in_one = store_one.own_identity(&device, &one);
        let in_two = TrustStore::new().own_identity(&device, &two);
        let keys = [device.public(), in_one.public(), in_two.public()].map(|k| k.fingerprint());
        assert!(keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2], "{keys:?}");
        // Saved and loaded with a peer pinned meanwhile: still the network's own.
        store_one.observe("bea", &fp(1));
        let mut again = TrustStore::from_json(&store_one.to_json()).unwrap();
        assert_eq!(again.own_identity(&device, &one).public(), in_one.public());
        // A store from before, with peers pinned and no mark: the device's key stays.
        let mut old =
            TrustStore::from_json(r#"{"peers":{"bea":{"fingerprint":"01","verified":false}}}"#)
                .unwrap();
        assert_eq!(old.own_identity(&device, &one).public(), device.public());
    }

    #[test]
    fn first_use_pins_then_known_then_verified() {
        let mut t = TrustStore::new();
        assert_eq!(t.observe("alice", &fp(1)), Trust::New);
        assert_eq!(t.observe("alice", &fp(1)), Trust::Known);
        assert_eq!(t.verify("alice", &fp(1)), Trust::Verified);
        assert_eq!(t.observe("alice", &fp(1)), Trust::Verified);
        assert_eq!(t.check("bob", &fp(1)), None);
    }

    #[test]
    fn a_changed_key_is_reported_and_not_silently_repinned() {
        let mut t = TrustStore::new();
        t.observe("alice", &fp(1));
        t.verify("alice", &fp(1));
        assert_eq!(t.observe("alice", &fp(2)), Trust::Changed { verified_before: true });
        assert_eq!(t.observe("alice", &fp(2)), Trust::Changed { verified_before: true });
        assert_eq!(t.verify("alice", &fp(2)), Trust::Changed { verified_before: true });
        t.accept_new_key("alice", &fp(2));
        assert_eq!(t.observe("alice", &fp(2)), Trust::Known);
        assert_eq!(t.observe("alice", &fp(1)), Trust::Changed { verified_before: false });
    }

    #[test]
    fn persists_as_json() {
        let mut t = TrustStore::new();
        t.observe("alice", &fp(1));
        t.verify("bob", &fp(2));
        let back = TrustStore::from_json(&t.to_json()).unwrap();
        assert_eq!(back, t);
        assert!(TrustStore::from_json("{not json").is_err());
        assert_eq!(TrustStore::from_json("{}").unwrap(), TrustStore::new());
    }
}
