//! The `.weft` resolver (`core/src/node/dns.rs`) on arbitrary bytes: any program on the
//! host can send it anything. `dns::answer` never panics; a node given the bytes as a UDP
//! query to 100.100.100.100:53 writes back at most one UDP packet, from the resolver to
//! the asker, that parses, or asks its driver to forward the query; and the same bytes
//! as the forwarded "reply" never reach the asker unless their id is the query's.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    weft_fuzz::dns_query(data);
});
