//! Overlay addresses. Every member has an IPv4 address in 100.64.0.0/10 derived from its
//! long-term key (one of a short sequence of candidates, in case of collisions) and an
//! IPv6 address in its network's ULA /48 (derived from the network secret, so networks
//! differ) with an interface id derived from its key. See `core/ROUTING.md`.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use sha2::{Digest, Sha256};

use crate::identity::PublicIdentity;
use crate::network::Network;

/// The overlay's IPv4 range (RFC 6598 shared address space, as Tailscale uses it).
pub const OVERLAY_IPV4: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10);

/// The address of the `.weft` name resolver (`dns.rs`): in the range, so routed into every
/// TUN device, and never a member's (see [`ipv4_candidate`]). Reserved on every platform,
/// with or without the resolver, so that every member computes the same addresses.
pub const RESOLVER_V4: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);

/// How many IPv4 candidates a key has: a claim of any other address is refused.
pub const MAX_IPV4_CANDIDATES: u32 = 64;

const IPV4_LABEL: &[u8] = b"weft/v1/overlay ipv4 candidate";
const IPV6_IID_LABEL: &[u8] = b"weft/v1/overlay ipv6 interface id";
/// Host part of the range's first and last address: never handed out.
const HOSTS: u64 = (1 << 22) - 2;

/// The `index`th IPv4 candidate of `key`: `100.64.0.0 + 1 + (H mod (2^22 - 2))` with `H`
/// the first 8 bytes of `SHA-256(label || key || u32be(index))`, so never the range's
/// first or last address. A candidate that falls on [`RESOLVER_V4`] is derived again with
/// the index's top bit set (one key in four million has one).
pub fn ipv4_candidate(key: &PublicIdentity, index: u32) -> Ipv4Addr {
    let addr = derive_ipv4(key, index);
    if addr == RESOLVER_V4 { derive_ipv4(key, index | 0x8000_0000) } else { addr }
}

fn derive_ipv4(key: &PublicIdentity, index: u32) -> Ipv4Addr {
    let digest = Sha256::new()
        .chain_update(IPV4_LABEL)
        .chain_update(key.as_bytes())
        .chain_update(index.to_be_bytes())
        .finalize();
    let mut h = [0u8; 8];
    h.copy_from_slice(&digest[..8]);
    // Below 2^22, so the cast cannot truncate.
    let host = (1 + u64::from_be_bytes(h) % HOSTS) as u32;
    Ipv4Addr::from(u32::from(OVERLAY_IPV4.network()) | host)
}

/// Which candidate of `key` `addr` is, if one of the first [`MAX_IPV4_CANDIDATES`].
pub fn ipv4_candidate_index(key: &PublicIdentity, addr: Ipv4Addr) -> Option<u32> {
    (0..MAX_IPV4_CANDIDATES).find(|i| ipv4_candidate(key, *i) == addr)
}

/// The network's IPv6 ULA prefix, `fdXX:XXXX:XXXX::/48` (RFC 4193), its 40-bit global id
/// derived from the network secret.
pub fn ipv6_prefix(network: &Network) -> Ipv6Net {
    let id = network.secret().overlay_global_id();
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[1..6].copy_from_slice(&id);
    Ipv6Net::new_assert(Ipv6Addr::from(a), 48)
}

/// The IPv6 address of `key` in `network`: the network's /48, subnet 0, and a 64-bit
/// interface id from `SHA-256(label || key)`.
pub fn ipv6_address(network: &Network, key: &PublicIdentity) -> Ipv6Addr {
    let mut a = ipv6_prefix(network).network().octets();
    a[8..].copy_from_slice(&ipv6_interface_id(key));
    Ipv6Addr::from(a)
}

/// The 64-bit IPv6 interface id of `key`: the first 8 bytes of `SHA-256(label || key)`.
pub fn ipv6_interface_id(key: &PublicIdentity) -> [u8; 8] {
    let digest = Sha256::new().chain_update(IPV6_IID_LABEL).chain_update(key.as_bytes()).finalize();
    let mut iid = [0u8; 8];
    iid.copy_from_slice(&digest[..8]);
    iid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_stay_in_the_range_and_differ() {
        let key = PublicIdentity::from_bytes([7; 32]);
        let all: Vec<Ipv4Addr> =
            (0..MAX_IPV4_CANDIDATES).map(|i| ipv4_candidate(&key, i)).collect();
        for (i, a) in all.iter().enumerate() {
            assert!(OVERLAY_IPV4.contains(a), "{a}");
            assert_ne!(*a, OVERLAY_IPV4.network());
            assert_ne!(*a, OVERLAY_IPV4.broadcast());
            assert_eq!(ipv4_candidate_index(&key, *a), Some(i as u32));
        }
        let distinct: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len());
        assert_eq!(ipv4_candidate_index(&key, Ipv4Addr::new(100, 64, 0, 0)), None);
    }
}
