//! ChaCha20-Poly1305 (RFC 8439) for transport packets: one small interface,
//! [`PacketAead`], with two implementations, and [`PacketCipher`], the one this build uses
//! (chosen by target, so it cannot be misconfigured):
//!
//! - native targets: [`RingChaCha20Poly1305`], `ring`'s assembly (AVX2 / AVX-512 / NEON),
//!   several times faster than portable Rust;
//! - `wasm32`: [`RustCryptoChaCha20Poly1305`], the RustCrypto crate, whose ChaCha20 runs
//!   on the vendored `simd128` backend (`vendor/chacha20`); `ring`'s assembly does not
//!   exist there, and `ring` is not a dependency of the wasm build at all.
//!
//! The RustCrypto implementation is compiled on every target (`hpke` needs the crate
//! anyway): the benchmark measures it in the same run as a baseline, and the tests check
//! that both produce the same bytes.
//!
//! Key erasure: the RustCrypto cipher erases its key when dropped (`zeroize`); `ring`'s
//! key types offer no such thing, so on native targets a dropped packet key stays in freed
//! memory until it is reused.

use std::fmt;

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};

/// Key length in bytes.
pub const KEY_LEN: usize = 32;
/// Nonce length in bytes.
pub const NONCE_LEN: usize = 12;
/// Authentication tag length in bytes.
pub const TAG_LEN: usize = 16;

/// The [`PacketAead`] this build uses: `ring` on native targets.
#[cfg(not(target_arch = "wasm32"))]
pub type PacketCipher = RingChaCha20Poly1305;
/// The [`PacketAead`] this build uses: RustCrypto on `wasm32`.
#[cfg(target_arch = "wasm32")]
pub type PacketCipher = RustCryptoChaCha20Poly1305;

/// Sealing input too long for the cipher, or opening input that did not authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("AEAD operation failed")]
pub struct AeadError;

/// ChaCha20-Poly1305 with a detached tag, working in a buffer the caller owns.
///
/// Object-safe: a [`crate::session::Session`] holds its cipher as a `Box<dyn PacketAead>`,
/// so that the session's code is not generic and is compiled in this crate (see the crate
/// docs).
pub trait PacketAead: Send + Sync {
    /// A cipher with this key.
    fn new(key: &[u8; KEY_LEN]) -> Self
    where
        Self: Sized;

    /// Encrypts `buf` in place and returns the tag over `aad` and the ciphertext. Fails
    /// only for inputs longer than the cipher allows (about 256 GiB).
    fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadError>;

    /// Verifies `tag` over `aad` and the ciphertext in `buf`, and decrypts `buf` in place.
    /// On failure `buf` holds no plaintext (the ciphertext, or zeroes), nothing more is
    /// promised.
    fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AeadError>;
}

/// ChaCha20-Poly1305 from `ring` (assembly): the native targets' [`PacketCipher`].
#[cfg(not(target_arch = "wasm32"))]
pub struct RingChaCha20Poly1305(ring::aead::LessSafeKey);

#[cfg(not(target_arch = "wasm32"))]
impl fmt::Debug for RingChaCha20Poly1305 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingChaCha20Poly1305").finish_non_exhaustive()
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl PacketAead for RingChaCha20Poly1305 {
    fn new(key: &[u8; KEY_LEN]) -> Self {
        use ring::aead::{CHACHA20_POLY1305, LessSafeKey, UnboundKey};
        match UnboundKey::new(&CHACHA20_POLY1305, key) {
            Ok(key) => Self(LessSafeKey::new(key)),
            Err(_) => unreachable!("a 32-byte key is valid for ChaCha20-Poly1305"),
        }
    }

    fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadError> {
        use ring::aead::{Aad, Nonce};
        let tag = self
            .0
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
            .map_err(|_| AeadError)?;
        tag.as_ref().try_into().map_err(|_| AeadError)
    }

    fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AeadError> {
        use ring::aead::{Aad, Nonce, Tag};
        self.0
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                Tag::from(*tag),
                buf,
                0..,
            )
            .map(|_| ())
            .map_err(|_| AeadError)
    }
}

/// ChaCha20-Poly1305 from the RustCrypto crates: the `wasm32` [`PacketCipher`], and the
/// baseline elsewhere.
pub struct RustCryptoChaCha20Poly1305(ChaCha20Poly1305);

impl fmt::Debug for RustCryptoChaCha20Poly1305 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RustCryptoChaCha20Poly1305").finish_non_exhaustive()
    }
}

impl PacketAead for RustCryptoChaCha20Poly1305 {
    fn new(key: &[u8; KEY_LEN]) -> Self {
        Self(ChaCha20Poly1305::new(&(*key).into()))
    }

    fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadError> {
        let tag = self
            .0
            .encrypt_inout_detached(&(*nonce).into(), aad, buf.into())
            .map_err(|_| AeadError)?;
        Ok(tag.into())
    }

    fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AeadError> {
        self.0
            .decrypt_inout_detached(&(*nonce).into(), aad, buf.into(), &(*tag).into())
            .map_err(|_| AeadError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20::ChaCha20Rng;
    use chacha20::rand_core::{Rng, SeedableRng};

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// RFC 8439 §2.8.2.
    fn rfc8439_vector<C: PacketAead>() {
        let key: [u8; 32] =
            unhex("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
                .try_into()
                .unwrap();
        let nonce: [u8; 12] = unhex("070000004041424344454647").try_into().unwrap();
        let aad = unhex("50515253c0c1c2c3c4c5c6c7");
        let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only \
                          one tip for the future, sunscreen would be it.";
        let ciphertext = unhex(
            "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6
             3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36
             92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc
             3ff4def08e4b7a9de576d26586cec64b6116",
        );
        let tag: [u8; 16] = unhex("1ae10b594f09e26a7e902ecbd0600691").try_into().unwrap();

        let cipher = C::new(&key);
        let mut buf = plaintext.to_vec();
        assert_eq!(cipher.seal_in_place(&nonce, &aad, &mut buf).unwrap(), tag);
        assert_eq!(buf, ciphertext);
        cipher.open_in_place(&nonce, &aad, &mut buf, &tag).unwrap();
        assert_eq!(buf, plaintext);
    }

    #[test]
    fn rustcrypto_matches_rfc8439() {
        rfc8439_vector::<RustCryptoChaCha20Poly1305>();
    }

    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn ring_matches_rfc8439() {
        rfc8439_vector::<RingChaCha20Poly1305>();
    }

    /// Seals with `A`, checks `B` seals the same bytes, opens with `B`, and checks that
    /// `B` refuses an altered tag, ciphertext, AAD or nonce.
    fn agree<A: PacketAead, B: PacketAead>(rng: &mut ChaCha20Rng, len: usize) {
        let mut key = [0u8; KEY_LEN];
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut key);
        rng.fill_bytes(&mut nonce);
        let mut aad = vec![0u8; (rng.next_u32() % 40) as usize];
        rng.fill_bytes(&mut aad);
        let mut plaintext = vec![0u8; len];
        rng.fill_bytes(&mut plaintext);
        let (a, b) = (A::new(&key), B::new(&key));

        let mut sealed_a = plaintext.clone();
        let tag_a = a.seal_in_place(&nonce, &aad, &mut sealed_a).unwrap();
        let mut sealed_b = plaintext.clone();
        let tag_b = b.seal_in_place(&nonce, &aad, &mut sealed_b).unwrap();
        assert_eq!((&sealed_a, tag_a), (&sealed_b, tag_b), "length {len}");

        let mut opened = sealed_a.clone();
        b.open_in_place(&nonce, &aad, &mut opened, &tag_a).unwrap();
        assert_eq!(opened, plaintext);

        let mut bad_tag = tag_a;
        bad_tag[(rng.next_u32() % 16) as usize] ^= 1 << (rng.next_u32() % 8);
        assert!(b.open_in_place(&nonce, &aad, &mut sealed_a.clone(), &bad_tag).is_err());
        if len > 0 {
            let mut bad_ct = sealed_a.clone();
            bad_ct[rng.next_u32() as usize % len] ^= 0x80;
            assert!(b.open_in_place(&nonce, &aad, &mut bad_ct, &tag_a).is_err());
        }
        let mut bad_aad = aad.clone();
        bad_aad.push(0);
        assert!(b.open_in_place(&nonce, &bad_aad, &mut sealed_a.clone(), &tag_a).is_err());
        let mut bad_nonce = nonce;
        bad_nonce[11] ^= 1;
        assert!(b.open_in_place(&bad_nonce, &aad, &mut sealed_a.clone(), &tag_a).is_err());
    }

    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn ring_and_rustcrypto_agree() {
        let mut rng = ChaCha20Rng::seed_from_u64(8439);
        let mut lens = vec![0, 1, 15, 16, 17, 63, 64, 65, 255, 256, 1400, 1401, 4096, 65536];
        lens.extend((0..200).map(|_| rng.next_u32() as usize % 3000));
        for len in lens {
            agree::<RingChaCha20Poly1305, RustCryptoChaCha20Poly1305>(&mut rng, len);
            agree::<RustCryptoChaCha20Poly1305, RingChaCha20Poly1305>(&mut rng, len);
        }
    }
}
