//! `SignalSealer::open` on whatever a hostile server forwards as a member's payload: never
//! panics, never opens (nothing but a member can make a payload that authenticates), and
//! what a member seals opens to the same payload.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20::ChaCha20Rng;
use chacha20::rand_core::SeedableRng;
use libfuzzer_sys::fuzz_target;
use weft_core::network::{Network, NetworkSecret};
use weft_core::signal::{PeerId, SignalPayload};

fuzz_target!(|data: &[u8]| {
    let network = Network::from_invite(&NetworkSecret::from_random_bytes([7; 32]).to_invite())
        .expect("a canonical invite");
    let sealer = network.signal_sealer().expect("invite networks seal");
    let (a, b) = (PeerId::new("a").unwrap(), PeerId::new("b").unwrap());
    // As text, and as the base64url of the bytes (to reach the checks after decoding).
    let text = String::from_utf8_lossy(data).into_owned();
    let encoded = URL_SAFE_NO_PAD.encode(data);
    for data in [text.clone(), encoded] {
        let forged = SignalPayload::Opaque { data };
        assert!(sealer.open(&a, &b, &forged).is_err(), "a forged payload opened");
    }
    // A payload a member could send: sealed, it opens to itself.
    let inner = SignalPayload::Offer { sdp: text };
    let mut rng = ChaCha20Rng::seed_from_u64(u64::from(data.first().copied().unwrap_or(0)));
    let sealed = sealer.seal(&a, &b, &inner, &mut rng);
    assert_eq!(sealer.open(&a, &b, &sealed), Ok(inner));
});
