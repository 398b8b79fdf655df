//! The PAKE messages of passphrase networks (`pake::PakeMessage::decode`, and `classify`
//! on the text of an `opaque` payload, both from whoever signals us): never panics, and
//! what decodes is carried by its payload to exactly the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_core::pake::{Incoming, PakeMessage, classify};
use weft_core::signal::SignalPayload;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = PakeMessage::decode(data) {
        let payload = msg.to_payload();
        assert_eq!(classify(&payload), Ok(Incoming::Pake(msg)), "a message changed on the way");
    }
    let text = String::from_utf8_lossy(data).into_owned();
    let _ = classify(&SignalPayload::Opaque { data: text });
});
