//! Two `PeerLink`s wired together by hand, as two drivers would wire them over a data
//! channel: handshake, names, messages, RTT, and every way it must fail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use chacha20::ChaCha20Rng;
use chacha20::rand_core::SeedableRng;
use weft_core::handshake::{HandshakeError, RejectReason};
use weft_core::identity::IdentityKeyPair;
use weft_core::network::{Network, PassphraseParams};
use weft_core::peer::{LinkError, LinkEvent, LinkState, PeerLink, PeerLinkConfig, is_polite};
use weft_core::signal::PeerId;

const TINY: PassphraseParams = PassphraseParams { memory_kib: 8, iterations: 1, parallelism: 1 };

fn sdp(fp: &str) -> String {
    format!("v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=fingerprint:{fp}\r\n")
}

const FP_A: &str = "sha-256 AA:AA:AA";
const FP_B: &str = "sha-256 BB:BB:BB";

struct Pair {
    a: PeerLink,
    b: PeerLink,
    rng: ChaCha20Rng,
    now: Duration,
}

fn t(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

impl Pair {
    fn new(net_a: &Network, net_b: &Network) -> Self {
        Self::named(net_a, net_b, "Alice")
    }

    fn named(net_a: &Network, net_b: &Network, a_name: &str) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let id_a = IdentityKeyPair::generate(&mut rng);
        let id_b = IdentityKeyPair::generate(&mut rng);
        // "a" has the lower id: it initiates.
        let pa = PeerId::new("aaaa").unwrap();
        let pb = PeerId::new("bbbb").unwrap();
        let config = PeerLinkConfig::default();
        let a = PeerLink::new(pa.clone(), pb.clone(), id_a, net_a, a_name, config);
        let b = PeerLink::new(pb, pa, id_b, net_b, "Bob", config);
        Self { a, b, rng, now: Duration::ZERO }
    }

    /// Both control channels open with these fingerprints as each side sees them.
    fn open(&mut self, a_sees_remote: &str, b_sees_remote: &str) {
        self.a.channel_open(&sdp(FP_A), &sdp(a_sees_remote), self.now, &mut self.rng);
        self.b.channel_open(&sdp(FP_B), &sdp(b_sees_remote), self.now, &mut self.rng);
    }

    /// Delivers everything in flight both ways until quiet; returns the events.
    fn pump(&mut self) -> (Vec<LinkEvent>, Vec<LinkEvent>) {
        let (mut ea, mut eb) = (Vec::new(), Vec::new());
        loop {
            let mut moved = false;
            while let Some(bytes) = self.a.poll_transmit() {
                self.b.receive(&bytes, self.now, &mut self.rng);
                moved = true;
            }
            while let Some(bytes) = self.b.poll_transmit() {
                self.a.receive(&bytes, self.now, &mut self.rng);
                moved = true;
            }
            ea.extend(std::iter::from_fn(|| self.a.poll_event()));
            eb.extend(std::iter::from_fn(|| self.b.poll_event()));
            if !moved {
                return (ea, eb);
            }
        }
    }
}

fn invite_network() -> Network {
    Network::from_invite(&"Q".repeat(43)).unwrap()
}

fn failure(events: &[LinkEvent]) -> &LinkError {
    events
        .iter()
        .find_map(|e| match e {
            LinkEvent::Failed(err) => Some(err),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no failure in {events:?}"))
}

#[test]
fn roles_are_complementary() {
    let (x, y) = (PeerId::new("x1").unwrap(), PeerId::new("y2").unwrap());
    assert_ne!(is_polite(&x, &y), is_polite(&y, &x));
    let pair = Pair::new(&invite_network(), &invite_network());
    assert!(pair.a.is_initiator() && !pair.b.is_initiator());
}

#[test]
fn peers_establish_exchange_names_messages_and_measure_rtt() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.open(FP_B, FP_A);
    let (ea, eb) = p.pump();
    assert_eq!(p.a.state(), LinkState::Established);
    assert_eq!(p.b.state(), LinkState::Established);
    assert!(ea.contains(&LinkEvent::Hello { name: "Bob".into() }), "{ea:?}");
    assert!(eb.contains(&LinkEvent::Hello { name: "Alice".into() }), "{eb:?}");
    assert_eq!(p.a.peer_name(), Some("Bob"));
    // Each learned the other's real key.
    let a_saw = ea.iter().find_map(|e| match e {
        LinkEvent::Established { fingerprint, .. } => Some(*fingerprint),
        _ => None,
    });
    assert_eq!(p.a.peer_identity().unwrap().fingerprint(), a_saw.unwrap());

    p.a.send_message("hello Bob", p.now).unwrap();
    p.b.send_message("hi Alice ✓", p.now).unwrap();
    let (ea, eb) = p.pump();
    assert!(eb.contains(&LinkEvent::Message { text: "hello Bob".into() }));
    assert!(ea.contains(&LinkEvent::Message { text: "hi Alice ✓".into() }));

    // A ping after the interval gives an RTT equal to the virtual delay.
    p.now = t(5_000);
    p.a.handle_timeout(p.now);
    while let Some(bytes) = p.a.poll_transmit() {
        p.b.receive(&bytes, p.now, &mut p.rng);
    }
    p.now = t(5_040);
    while let Some(bytes) = p.b.poll_transmit() {
        p.a.receive(&bytes, p.now, &mut p.rng);
    }
    let rtts: Vec<_> = std::iter::from_fn(|| p.a.poll_event())
        .filter_map(|e| if let LinkEvent::Rtt(r) = e { Some(r) } else { None })
        .collect();
    assert_eq!(rtts, vec![t(40)]);
    assert!(p.a.poll_timeout().unwrap() > p.now);
}

#[test]
fn a_wrong_passphrase_fails_on_both_sides_with_a_clear_reason() {
    let good = Network::from_passphrase("home", "correct horse", &TINY).unwrap();
    let wrong = Network::from_passphrase("home", "wrong horse", &TINY).unwrap();
    assert_eq!(good.room_id(), wrong.room_id(), "they meet in one room");
    let mut p = Pair::new(&good, &wrong);
    p.open(FP_B, FP_A);
    let (ea, eb) = p.pump();
    assert_eq!(failure(&eb), &LinkError::Handshake(HandshakeError::WrongNetworkSecret));
    assert_eq!(
        failure(&ea),
        &LinkError::Handshake(HandshakeError::Rejected(RejectReason::AuthenticationFailed))
    );
    for events in [&ea, &eb] {
        assert!(failure(events).to_string().contains("wrong passphrase"));
    }
    assert_eq!(p.a.state(), LinkState::Failed);
    assert_eq!(p.a.send_message("x", p.now), Err(LinkError::NotEstablished));
}

#[test]
fn a_substituted_dtls_fingerprint_is_detected() {
    // The signaling server replaced B's fingerprint in what A received (it terminates
    // DTLS with each side itself).
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.open("sha-256 EE:EE:EE", FP_A);
    let (ea, eb) = p.pump();
    assert!(matches!(failure(&eb), LinkError::Handshake(HandshakeError::WrongNetworkSecret)));
    assert!(matches!(failure(&ea), LinkError::Handshake(HandshakeError::Rejected(_))));
    assert!(!ea.iter().chain(&eb).any(|e| matches!(e, LinkEvent::Established { .. })));
}

#[test]
fn a_description_without_fingerprint_fails_clearly() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.a.channel_open(&sdp(FP_A), "v=0\r\n", p.now, &mut p.rng);
    let err = failure(&std::iter::from_fn(|| p.a.poll_event()).collect::<Vec<_>>()).clone();
    assert_eq!(err, LinkError::NoDtlsFingerprint("remote"));
}

#[test]
fn tampered_and_replayed_packets_are_dropped_and_the_link_survives() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.open(FP_B, FP_A);
    p.pump();
    p.a.send_message("one", p.now).unwrap();
    let packet = p.a.poll_transmit().unwrap();
    let mut tampered = packet.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    p.b.receive(&tampered, p.now, &mut p.rng);
    p.b.receive(&packet, p.now, &mut p.rng);
    p.b.receive(&packet, p.now, &mut p.rng); // replay
    let events: Vec<_> = std::iter::from_fn(|| p.b.poll_event()).collect();
    assert_eq!(events, vec![LinkEvent::Message { text: "one".into() }]);
    assert_eq!(p.b.stats().packets_rejected, 2);
    assert_eq!(p.b.state(), LinkState::Established);
    // Garbage and late handshake messages do not hurt either.
    p.b.receive(&[], p.now, &mut p.rng);
    p.b.receive(&[0x01, 0x01, 0x02], p.now, &mut p.rng);
    assert_eq!(p.b.state(), LinkState::Established);
}

#[test]
fn a_silent_peer_times_out_the_handshake() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.a.channel_open(&sdp(FP_A), &sdp(FP_B), p.now, &mut p.rng);
    let deadline = p.a.poll_timeout().unwrap();
    assert_eq!(deadline, PeerLinkConfig::default().handshake_timeout);
    p.a.handle_timeout(deadline - t(1));
    assert_eq!(p.a.state(), LinkState::Handshaking);
    p.a.handle_timeout(deadline);
    let events: Vec<_> = std::iter::from_fn(|| p.a.poll_event()).collect();
    assert_eq!(failure(&events), &LinkError::Handshake(HandshakeError::TimedOut));
}

#[test]
fn a_new_channel_after_a_loss_runs_a_fresh_handshake() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.open(FP_B, FP_A);
    p.pump();
    p.a.channel_closed();
    p.b.channel_closed();
    assert_eq!(p.a.state(), LinkState::Waiting);
    assert_eq!(p.a.send_message("lost", p.now), Err(LinkError::NotEstablished));
    // ICE restarted on a new DTLS connection: new fingerprints.
    p.a.channel_open(
        "a=fingerprint:sha-256 A2\r\n",
        "a=fingerprint:sha-256 B2\r\n",
        p.now,
        &mut p.rng,
    );
    p.b.channel_open(
        "a=fingerprint:sha-256 B2\r\n",
        "a=fingerprint:sha-256 A2\r\n",
        p.now,
        &mut p.rng,
    );
    p.pump();
    p.b.send_message("back", p.now).unwrap();
    let (ea, _) = p.pump();
    assert!(ea.contains(&LinkEvent::Message { text: "back".into() }));
}

#[test]
fn a_packet_that_overtakes_the_finish_message_is_kept() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.open(FP_B, FP_A);
    let init = p.a.poll_transmit().unwrap();
    p.b.receive(&init, p.now, &mut p.rng);
    let response = p.b.poll_transmit().unwrap();
    p.a.receive(&response, p.now, &mut p.rng);
    // A is established: Finish, then Hello+Ping, then a data packet.
    let finish = p.a.poll_transmit().unwrap();
    let hello = p.a.poll_transmit().unwrap();
    let data = p.a.seal_data(b"ip packet", p.now).unwrap();
    p.b.receive(&data, p.now, &mut p.rng); // on the unreliable channel, first
    p.b.receive(&hello, p.now, &mut p.rng);
    p.b.receive(&finish, p.now, &mut p.rng);
    let events: Vec<_> = std::iter::from_fn(|| p.b.poll_event()).collect();
    assert!(events.contains(&LinkEvent::Data(b"ip packet".to_vec())), "{events:?}");
    assert!(events.contains(&LinkEvent::Hello { name: "Alice".into() }), "{events:?}");
}

#[test]
fn long_names_are_clipped_and_long_messages_refused() {
    let net = invite_network();
    let mut p = Pair::named(&net, &net, &"é".repeat(100));
    p.open(FP_B, FP_A);
    let (_, eb) = p.pump();
    let name = eb
        .iter()
        .find_map(|e| if let LinkEvent::Hello { name } = e { Some(name.clone()) } else { None })
        .unwrap();
    assert_eq!(name, "é".repeat(32));
    let long = "x".repeat(weft_core::peer::MAX_MESSAGE_LEN + 1);
    assert!(matches!(p.a.send_message(&long, p.now), Err(LinkError::MessageTooLong { .. })));
}

#[test]
fn a_peer_that_goes_silent_fails_the_link_after_the_idle_timeout() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.open(FP_B, FP_A);
    p.pump();
    let idle = PeerLinkConfig::default().idle_timeout;
    // While both answer pings, the link lives on well past the idle timeout.
    for step in 1..=8 {
        p.now = t(5_000 * step);
        p.a.handle_timeout(p.now);
        p.b.handle_timeout(p.now);
        p.pump();
    }
    assert_eq!(p.a.state(), LinkState::Established);
    // Then B vanishes (closed its page): A keeps pinging into the void and gives up.
    let last = p.now;
    while p.a.state() == LinkState::Established {
        p.now = p.a.poll_timeout().unwrap();
        p.a.handle_timeout(p.now);
        while p.a.poll_transmit().is_some() {}
    }
    assert_eq!(p.now, last + idle, "fails exactly at the idle timeout");
    let events: Vec<_> = std::iter::from_fn(|| p.a.poll_event()).collect();
    let err = failure(&events);
    assert!(matches!(err, LinkError::PeerSilent(_)));
    assert!(err.to_string().contains("stopped answering"), "{err}");
}

#[test]
fn transfer_frames_pass_through_and_other_types_are_refused() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    assert_eq!(p.a.send_transfer(0x20, vec![1], p.now), Err(LinkError::NotEstablished));
    p.open(FP_B, FP_A);
    p.pump();
    p.a.send_transfer(0x26, vec![7; 70_000], p.now).unwrap();
    assert_eq!(p.a.send_transfer(0x01, vec![], p.now), Err(LinkError::NotTransferFrame(0x01)));
    let (_, eb) = p.pump();
    assert!(eb.contains(&LinkEvent::Transfer { frame_type: 0x26, body: vec![7; 70_000] }));
}
