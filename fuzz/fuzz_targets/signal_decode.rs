//! The signaling JSON decoders on arbitrary text (the server decodes what clients send,
//! clients what the server relays): never panic, and a decoded message encodes to text
//! that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_core::signal::{MAX_MESSAGE_BYTES, decode_client, decode_server, encode};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);

    if let Ok(msg) = decode_client(&text) {
        let wire = encode(&msg);
        // Defaults written out in full (`"sdp_mid":null`) can push a message that was just
        // under the size limit over it; anything within the limit must round-trip.
        if wire.len() <= MAX_MESSAGE_BYTES {
            assert_eq!(decode_client(&wire), Ok(msg), "client message round trip: {wire}");
        }
    }

    if let Ok(msg) = decode_server(&text) {
        let wire = encode(&msg);
        if wire.len() <= MAX_MESSAGE_BYTES {
            assert_eq!(decode_server(&wire), Ok(msg), "server message round trip: {wire}");
        }
    }
});
