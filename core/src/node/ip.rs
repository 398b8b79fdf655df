//! IP packets between the TUN device and the overlay: reading their addresses and building
//! ICMP / ICMPv6 "destination unreachable" errors, with `etherparse` (no hand-written
//! parsing). Nothing here panics on hostile bytes.

use std::net::IpAddr;
#[cfg(feature = "dns")]
use std::net::SocketAddr;

use etherparse::{IpFragOffset, IpNumber, IpSlice, PacketBuilder, icmpv4, icmpv6};

/// Largest ICMPv4 error: what RFC 1812 §4.3.2.3 says a router's error should fit in.
const ICMPV4_MAX: usize = 576;
/// Largest ICMPv6 error: the IPv6 minimum MTU (RFC 4443 §2.4 (c)).
const ICMPV6_MAX: usize = 1280;
const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const ICMP_HEADER: usize = 8;

/// A packet's source and destination, if it is a well-formed IPv4 or IPv6 packet.
pub(crate) fn addresses(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    let ip = IpSlice::from_slice(packet).ok()?;
    Some((ip.source_addr(), ip.destination_addr()))
}

/// Why a packet could not be delivered, as the ICMP error says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unreachable {
    /// No route: an address outside every known prefix.
    Net,
    /// A member address nobody holds, or a peer without a session now (or without a TUN
    /// device: a browser).
    Host,
}

/// The ICMP (IPv4) or ICMPv6 destination-unreachable error for `packet`, sent from `from`
/// (our overlay address of the packet's family), or `None` where none may be sent: the
/// packet is not well formed, is itself an ICMP error, is a fragment other than the
/// first, or its source is not a unicast address (RFC 1122 §3.2.2, RFC 4443 §2.4 (e)).
pub(crate) fn unreachable(packet: &[u8], from: IpAddr, why: Unreachable) -> Option<Vec<u8>> {
    let ip = IpSlice::from_slice(packet).ok()?;
    let payload = ip.payload();
    match (&ip, from) {
        (IpSlice::Ipv4(v4), IpAddr::V4(from)) => {
            let h = v4.header();
            let (src, dst) = (h.source_addr(), h.destination_addr());
            if h.fragments_offset() != IpFragOffset::ZERO
                || src.is_unspecified()
                || src.is_multicast()
                || src.is_broadcast()
                || dst.is_multicast()
                || dst.is_broadcast()
            {
                return None;
            }
            let is_error = payload.ip_number == IpNumber::ICMP
                && matches!(payload.payload.first(), Some(3 | 4 | 5 | 11 | 12));
            if is_error {
                return None;
            }
            let code = match why {
                Unreachable::Net => icmpv4::DestUnreachableHeader::Network,
                Unreachable::Host => icmpv4::DestUnreachableHeader::Host,
            };
            let quoted = &packet[..packet.len().min(ICMPV4_MAX - IPV4_HEADER - ICMP_HEADER)];
            let builder = PacketBuilder::ipv4(from.octets(), src.octets(), 64)
                .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(code));
            let mut out = Vec::with_capacity(builder.size(quoted.len()));
            builder.write(&mut out, quoted).ok()?;
            Some(out)
        }
        (IpSlice::Ipv6(v6), IpAddr::V6(from)) => {
            let h = v6.header();
            let (src, dst) = (h.source_addr(), h.destination_addr());
            if src.is_unspecified() || src.is_multicast() || dst.is_multicast() {
                return None;
            }
            // Only the first fragment carries the upper-layer header.
            if payload.fragmented && payload.payload.is_empty() {
                return None;
            }
            // ICMPv6 errors are types 0..=127.
            let is_error = payload.ip_number == IpNumber::IPV6_ICMP
                && payload.payload.first().is_some_and(|t| *t < 128);
            if is_error {
                return None;
            }
            let code = match why {
                Unreachable::Net => icmpv6::DestUnreachableCode::NoRoute,
                Unreachable::Host => icmpv6::DestUnreachableCode::Address,
            };
            let quoted = &packet[..packet.len().min(ICMPV6_MAX - IPV6_HEADER - ICMP_HEADER)];
            let builder = PacketBuilder::ipv6(from.octets(), src.octets(), 64)
                .icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(code));
            let mut out = Vec::with_capacity(builder.size(quoted.len()));
            builder.write(&mut out, quoted).ok()?;
            Some(out)
        }
        _ => None,
    }
}

/// A UDP datagram's source, destination and payload, if `packet` is a well-formed,
/// unfragmented IPv4 or IPv6 packet carrying one.
#[cfg(feature = "dns")]
pub(crate) fn udp(packet: &[u8]) -> Option<(SocketAddr, SocketAddr, &[u8])> {
    let sliced = etherparse::SlicedPacket::from_ip(packet).ok()?;
    let ip = sliced.net.as_ref()?;
    let (src, dst) = match ip {
        etherparse::NetSlice::Ipv4(v4) => {
            if v4.header().is_fragmenting_payload() {
                return None;
            }
            (IpAddr::V4(v4.header().source_addr()), IpAddr::V4(v4.header().destination_addr()))
        }
        etherparse::NetSlice::Ipv6(v6) => {
            if v6.payload().fragmented {
                return None;
            }
            (IpAddr::V6(v6.header().source_addr()), IpAddr::V6(v6.header().destination_addr()))
        }
        _ => return None,
    };
    match sliced.transport {
        Some(etherparse::TransportSlice::Udp(udp)) => Some((
            SocketAddr::new(src, udp.source_port()),
            SocketAddr::new(dst, udp.destination_port()),
            udp.payload(),
        )),
        _ => None,
    }
}

/// The IP packet of a UDP datagram from `from` to `to` (one family), or `None` for mixed
/// families or a payload too large for one packet.
#[cfg(feature = "dns")]
pub(crate) fn udp_packet(from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    let builder = match (from.ip(), to.ip()) {
        (IpAddr::V4(f), IpAddr::V4(t)) => PacketBuilder::ipv4(f.octets(), t.octets(), 64),
        (IpAddr::V6(f), IpAddr::V6(t)) => PacketBuilder::ipv6(f.octets(), t.octets(), 64),
        _ => return None,
    }
    .udp(from.port(), to.port());
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).ok()?;
    Some(out)
}
