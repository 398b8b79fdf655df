//! `Frame::decode` / `Frame::decode_all` on arbitrary bytes (a packet's plaintext comes
//! from the peer): never panics, and what decodes re-encodes to exactly the same bytes
//! (the encoding is canonical), which decode to the same frames again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_core::frame::{Frame, encode_frames};

fuzz_target!(|data: &[u8]| {
    if let Ok((frame, used)) = Frame::decode(data) {
        assert!(used <= data.len(), "decode used {used} of {} bytes", data.len());
        assert_eq!(used, frame.encoded_len());
        let encoded = frame.encode().expect("a decoded frame encodes");
        assert_eq!(encoded, &data[..used], "re-encoding {frame:?} changed its bytes");
    }

    if let Ok(frames) = Frame::decode_all(data) {
        let encoded = encode_frames(&frames).expect("decoded frames encode");
        assert_eq!(encoded, data, "re-encoding changed the bytes");
        let again = Frame::decode_all(&encoded).expect("re-encoded frames decode");
        assert_eq!(again, frames, "decode(encode(frames)) != frames");
    }
});
