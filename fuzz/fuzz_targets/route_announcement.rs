//! `Announcement::decode` on arbitrary bytes (a peer's route announcement comes from the
//! network): never panics, and what decodes re-encodes to exactly the same bytes (the
//! encoding is canonical) and decodes to the same announcement again. The same bytes then
//! go to a node as a packet from its TUN device: whatever it writes back (an ICMP error)
//! parses as an IP packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_core::node::Announcement;

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = Announcement::decode(data) {
        let encoded = a.encode().expect("a decoded announcement encodes");
        assert_eq!(encoded, data, "re-encoding {a:?} changed its bytes");
        assert_eq!(Announcement::decode(&encoded).as_ref(), Ok(&a));
    }
    weft_fuzz::tun_packet(data);
});
