//! `TransferMsg::decode` on arbitrary bytes (file-transfer frames come from peers): never
//! panics, and what decodes re-encodes to exactly the same bytes (canonical encoding).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_core::transfer::TransferMsg;

fuzz_target!(|data: &[u8]| {
    let Some((&frame_type, body)) = data.split_first() else { return };
    if let Ok(msg) = TransferMsg::decode(frame_type, body) {
        let (t, encoded) = msg.encode();
        assert_eq!(t, frame_type);
        assert_eq!(encoded, body, "re-encoding {msg:?} changed its bytes");
    }
});
