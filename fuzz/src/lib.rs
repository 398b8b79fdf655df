//! Shared fixtures for the fuzz targets: identities, network secret, channel bindings and
//! randomness all come from fixed seeds, so a handshake (and so every crashing input)
//! replays exactly, run after run.

use std::sync::OnceLock;
use std::time::Duration;

use chacha20::ChaCha20Rng;
use chacha20::rand_core::SeedableRng;
use weft_core::handshake::{ChannelBinding, HandshakeInitiator, HandshakeResponder};
use weft_core::identity::IdentityKeyPair;
use weft_core::network::NetworkSecret;
use weft_core::transport::Session;

/// The fixed peers, built once per process (deriving their public keys costs scalar
/// multiplications that would otherwise dominate a cheap target's run time).
#[derive(Debug)]
pub struct Peers {
    /// The network secret both peers hold (raw bytes: no Argon2).
    pub network: NetworkSecret,
    /// The initiator's long-term identity.
    pub initiator: IdentityKeyPair,
    /// The responder's long-term identity.
    pub responder: IdentityKeyPair,
    /// DTLS fingerprints as the initiator sees them (local, remote).
    pub initiator_binding: ChannelBinding,
    /// DTLS fingerprints as the responder sees them (local, remote).
    pub responder_binding: ChannelBinding,
}

/// The fixed peers.
pub fn peers() -> &'static Peers {
    static PEERS: OnceLock<Peers> = OnceLock::new();
    PEERS.get_or_init(|| Peers {
        network: NetworkSecret::from_random_bytes([0x5e; 32]),
        initiator: IdentityKeyPair::from_secret_bytes(&[0x11; 32]),
        responder: IdentityKeyPair::from_secret_bytes(&[0x22; 32]),
        initiator_binding: binding("sha-256 aa:aa", "sha-256 bb:bb"),
        responder_binding: binding("sha-256 bb:bb", "sha-256 aa:aa"),
    })
}

fn binding(local: &str, remote: &str) -> ChannelBinding {
    match ChannelBinding::new(local, remote) {
        Ok(b) => b,
        Err(e) => unreachable!("fixed fingerprints are valid: {e}"),
    }
}

/// A deterministic RNG.
pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// The three messages of one real handshake, and both sides' sessions.
#[derive(Debug)]
pub struct Handshake {
    /// Init (initiator -> responder).
    pub init: Vec<u8>,
    /// Response (responder -> initiator).
    pub response: Vec<u8>,
    /// Finish (initiator -> responder).
    pub finish: Vec<u8>,
    /// The initiator's session.
    pub initiator: Session,
    /// The responder's session.
    pub responder: Session,
}

/// An initiator that has sent Init and waits for the Response, and that Init.
pub fn initiator_after_init() -> (HandshakeInitiator, Vec<u8>) {
    let p = peers();
    HandshakeInitiator::new(&mut rng(1), &p.initiator, &p.network, &p.initiator_binding)
}

/// A responder waiting for Init.
pub fn fresh_responder() -> HandshakeResponder {
    let p = peers();
    HandshakeResponder::new(&p.responder, &p.network, &p.responder_binding)
}

/// Runs one complete handshake between the fixed peers. Deterministic: the same messages
/// and session keys every time.
pub fn handshake() -> Handshake {
    let (mut initiator, init) = initiator_after_init();
    let mut responder = fresh_responder();
    let response = must(responder.handle(&init, &mut rng(2))).message;
    let response = response.unwrap_or_else(|| unreachable!("the responder answers Init"));
    let step = must(initiator.handle(&response, &mut rng(3)));
    let (Some(finish), Some(initiator)) = (step.message, step.established) else {
        unreachable!("the initiator finishes on a valid Response")
    };
    let Some(responder) = must(responder.handle(&finish, &mut rng(4))).established else {
        unreachable!("the responder is established by a valid Finish")
    };
    Handshake { init, response, finish, initiator: initiator.session, responder: responder.session }
}

fn must<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| unreachable!("the fixture handshake failed: {e}"))
}

/// The fixed clock the transport targets run at.
pub const NOW: Duration = Duration::from_secs(1_000);

/// Feeds `data` to a node (with a TUN device, no peers) as a packet from its TUN device
/// and checks what it writes back: at most an ICMP error for a packet whose IP header is
/// well formed, which must parse (IP and ICMP headers), and nothing at all for garbage.
pub fn tun_packet(data: &[u8]) {
    use weft_core::node::{Input, Output};

    let (mut node, mut rng) = tun_node();
    node.handle_input(Duration::ZERO, Input::TunPacket(data.to_vec()), &mut rng);
    // A router answers from the IP header alone: whatever follows it may be garbage.
    let parses = etherparse::IpSlice::from_slice(data).is_ok();
    while let Some(output) = node.poll_output() {
        if let Output::TunWrite(packet) = output {
            assert!(parses, "an answer to bytes that are no IP packet");
            assert!(packet.len() <= 1280, "an ICMP error of {} bytes", packet.len());
            etherparse::SlicedPacket::from_ip(&packet).expect("the ICMP error parses");
        }
    }
}

/// A node with a TUN device and no peers, and its random numbers.
fn tun_node() -> (weft_core::node::Node, ChaCha20Rng) {
    use weft_core::network::Network;
    use weft_core::node::{DownloadStore, Node, NodeConfig, RoutingConfig};
    use weft_core::trust::TrustStore;

    let network = Network::from_invite(&"Q".repeat(43)).expect("a valid invite");
    let identity = peers().initiator.clone();
    let mut config =
        NodeConfig::new(identity, network, "fuzz", TrustStore::new(), DownloadStore::None, 1);
    config.routing = RoutingConfig { tun: true, ..RoutingConfig::default() };
    (Node::new(config), ChaCha20Rng::seed_from_u64(3))
}

/// See `fuzz_targets/dns_query.rs`.
pub fn dns_query(data: &[u8]) {
    use std::net::Ipv4Addr;
    use weft_core::node::dns::{self, RESOLVER_V4};
    use weft_core::node::{Input, Output};

    let _ = dns::answer(data, &dns::Directory::default());
    let (mut node, mut rng) = tun_node();
    let client = Ipv4Addr::new(100, 64, 0, 9);
    let builder =
        etherparse::PacketBuilder::ipv4(client.octets(), RESOLVER_V4.octets(), 64).udp(5353, 53);
    let mut packet = Vec::with_capacity(builder.size(data.len()));
    if builder.write(&mut packet, data).is_err() {
        return;
    }
    node.handle_input(Duration::ZERO, Input::TunPacket(packet), &mut rng);
    let mut written = 0;
    let mut forwards = Vec::new();
    while let Some(output) = node.poll_output() {
        match output {
            Output::TunWrite(reply) => {
                written += 1;
                check_reply(&reply, client);
            }
            Output::DnsForward { id, query } => {
                assert_eq!(query, data, "the forwarded query is the one asked");
                forwards.push(id);
            }
            _ => {}
        }
    }
    assert!(written + forwards.len() <= 1, "more than one answer to one query");
    for id in forwards {
        node.handle_input(
            Duration::ZERO,
            Input::DnsForwarded { id, reply: Some(data.to_vec()) },
            &mut rng,
        );
        while let Some(output) = node.poll_output() {
            if let Output::TunWrite(reply) = output {
                check_reply(&reply, client);
            }
        }
    }
}

/// A reply from the resolver to `client`'s port, as one UDP packet that parses.
fn check_reply(reply: &[u8], client: std::net::Ipv4Addr) {
    let sliced = etherparse::SlicedPacket::from_ip(reply).expect("the reply parses");
    let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net else { panic!("not IPv4") };
    assert_eq!(ip.header().source_addr(), weft_core::node::dns::RESOLVER_V4);
    assert_eq!(ip.header().destination_addr(), client);
    let Some(etherparse::TransportSlice::Udp(udp)) = sliced.transport else { panic!("not UDP") };
    assert_eq!((udp.source_port(), udp.destination_port()), (53, 5353));
}
