//! Capabilities: who may fetch a file from us (`core/TRANSFER.md`, "Who may fetch what").
//!
//! Every file a node offers has a [`Capability`] of that node's: 256 bits derived from
//! a key filled from the driver's randomness, the same in every offer the node makes of
//! that file, so the receivers of one sender's file can fetch it from each other. It
//! travels only inside offers. A fetch never carries it: it carries a [`Proof`], a MAC
//! keyed by the capability over the name asked for and the asker's identity key, so a
//! query sent to every connected member (as a download looking for sources does) hands
//! none of them anything they could use under their own key.

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::hash::Root;

/// The right to fetch one sender's file, as its offer hands it out.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Capability([u8; 32]);

/// A capability shown for one name by one key: what a fetch carries.
#[derive(Clone, Copy, Default, Serialize, Deserialize)]
pub struct Proof([u8; 16]);

impl Capability {
    /// The bytes it travels as.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The capability of a node's shared file held under `local`, from the node's
    /// capability key (random, from the driver).
    pub fn derive(key: &[u8; 32], local: &Root) -> Self {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(b"weft 2026 file capability");
        h.update(local.as_bytes());
        Self(*h.finalize().as_bytes())
    }

    /// The proof that the member with identity tag `asker` holds this capability, for
    /// a request naming the file `name` (a root or a stream key).
    pub fn proof(&self, name: &Root, asker: &Root) -> Proof {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"weft 2026 fetch proof");
        h.update(name.as_bytes());
        h.update(asker.as_bytes());
        let mut out = [0; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        Proof(out)
    }

    /// Whether `proof` is this capability's for `name` and `asker` (in constant time).
    pub fn opens(&self, proof: &Proof, name: &Root, asker: &Root) -> bool {
        self.proof(name, asker) == *proof
    }
}

impl Proof {
    /// The bytes it travels as.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl PartialEq for Proof {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Proof {}

// Neither is ever logged: a capability in a log is a capability given away.
impl std::fmt::Debug for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Capability(..)")
    }
}

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Proof(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_opens_only_for_its_name_and_its_asker() {
        let cap = Capability::derive(&[7; 32], &Root::from([1; 32]));
        let (name, bob, carol) = (Root::from([2; 32]), Root::from([3; 32]), Root::from([4; 32]));
        let proof = cap.proof(&name, &bob);
        assert!(cap.opens(&proof, &name, &bob));
        assert!(!cap.opens(&proof, &name, &carol), "another key");
        assert!(!cap.opens(&proof, &Root::from([5; 32]), &bob), "another file");
        let other = Capability::derive(&[8; 32], &Root::from([1; 32]));
        assert!(!other.opens(&proof, &name, &bob), "another sender's capability");
        assert_ne!(cap, Capability::derive(&[7; 32], &Root::from([9; 32])), "per file");
        assert_eq!(format!("{cap:?} {proof:?}"), "Capability(..) Proof(..)");
    }
}
