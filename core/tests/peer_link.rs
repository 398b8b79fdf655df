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
        let mut a = PeerLink::new(pa.clone(), pb.clone(), id_a, net_a, a_name, config);
        let mut b = PeerLink::new(pb, pa, id_b, net_b, "Bob", config);
        // A passphrase network's link takes its pair's secret from the node's PAKE run;
        // here each side's own network secret stands for it (a mismatch then is what
        // two different passphrases would give, were the PAKE not to notice first).
        for (link, net) in [(&mut a, net_a), (&mut b, net_b)] {
            if net.needs_pake() {
                link.set_pair_secret(net.secret().clone());
            }
        }
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

    /// [`Self::pump`], then both sides must be established, neither having failed.
    fn pump_to_one_session(&mut self) {
        let (ea, eb) = self.pump();
        for (side, link, events) in [("a", &self.a, &ea), ("b", &self.b, &eb)] {
            assert_eq!(link.state(), LinkState::Established, "{side}: {events:?}");
            let failed = events.iter().any(|e| matches!(e, LinkEvent::Failed(_)));
            assert!(!failed, "{side}: {events:?}");
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

/// Both sides start as initiator (their ids disagree on who is polite, as after a
/// signaling process died and one side still knows the other under its old id): the
/// larger Init's side answers the other's, and the session is established on both
/// sides, with no failure.
#[test]
fn a_handshake_glare_settles_into_one_session() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let id_b = IdentityKeyPair::generate(&mut rng);
    // b sees itself as "0000" and a as "bbbb": it is not polite either.
    let (own, remote) = (PeerId::new("0000").unwrap(), PeerId::new("bbbb").unwrap());
    assert!(!is_polite(&own, &remote) && p.a.is_initiator());
    p.b = PeerLink::new(own, remote, id_b, &net, "Bob", PeerLinkConfig::default());
    assert!(p.b.is_initiator(), "both initiate");
    p.open(FP_B, FP_A);
    p.pump_to_one_session();
}

/// The opposite of a glare: b's signaling process died and b joined again under a new id
/// ("0000"); a, which knows only that id now, makes a fresh link to it and is the polite
/// side (a responder), while b's link kept from before, still at b's old id ("bbbb"),
/// would be a responder too: nobody sends an Init and the handshake times out on both
/// sides. Told its new id, b initiates and the new connection's session is established.
#[test]
fn a_kept_link_takes_its_role_from_our_new_id() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.open(FP_B, FP_A);
    p.pump();
    assert_eq!(p.b.state(), LinkState::Established);
    // a's identity again (Pair's first key), on a fresh link to b's new id.
    let id_a = IdentityKeyPair::generate(&mut ChaCha20Rng::seed_from_u64(7));
    let (own, new_b) = (PeerId::new("aaaa").unwrap(), PeerId::new("0000").unwrap());
    p.a = PeerLink::new(own, new_b.clone(), id_a, &net, "Alice", PeerLinkConfig::default());
    p.b.channel_closed();
    assert!(!p.a.is_initiator() && !p.b.is_initiator(), "both would wait for an Init");
    p.b.set_own_id(new_b);
    assert!(p.b.is_initiator());
    p.open(FP_B, FP_A);
    p.pump_to_one_session();
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

/// A description with a second certificate's fingerprint added (DTLS would accept either,
/// the handshake would bind only the first) is refused before any handshake.
#[test]
fn a_description_with_two_fingerprints_is_refused() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    let doubled = format!("{}a=fingerprint:sha-256 EE:EE:EE\r\n", sdp(FP_B));
    p.a.channel_open(&sdp(FP_A), &doubled, p.now, &mut p.rng);
    let events = std::iter::from_fn(|| p.a.poll_event()).collect::<Vec<_>>();
    assert_eq!(failure(&events).clone(), LinkError::SeveralDtlsFingerprints("remote"));
    assert!(p.a.poll_transmit().is_none(), "a handshake message went out");
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
    let init = p.a.poll_transmit().unwrap();
    let deadline = PeerLinkConfig::default().handshake_timeout;
    // Init is resent at 1, 3, 7 and 11 s (backoff capped at 4 s), then the deadline.
    let mut resent = Vec::new();
    loop {
        let next = p.a.poll_timeout().unwrap();
        if next >= deadline {
            break;
        }
        p.a.handle_timeout(next);
        while let Some(bytes) = p.a.poll_transmit() {
            assert_eq!(bytes, init);
            resent.push(next);
        }
    }
    assert_eq!(resent, vec![t(250), t(750), t(1_750), t(3_750), t(7_750), t(11_750)]);
    assert_eq!(p.a.poll_timeout(), Some(deadline));
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

/// The name in the first `Hello` among `events`.
fn hello_name(events: &[LinkEvent]) -> String {
    events
        .iter()
        .find_map(|e| if let LinkEvent::Hello { name } = e { Some(name.clone()) } else { None })
        .unwrap()
}

#[test]
fn long_names_are_clipped_and_long_messages_refused() {
    let net = invite_network();
    let mut p = Pair::named(&net, &net, &"é".repeat(100));
    p.open(FP_B, FP_A);
    let (_, eb) = p.pump();
    let name = hello_name(&eb);
    assert_eq!(name, "é".repeat(32));
    // A name with a right-to-left override and zero-width characters arrives cleaned.
    let mut p = Pair::named(&net, &net, "\u{202e}mallory\u{200b}  x\n");
    p.open(FP_B, FP_A);
    let (_, eb) = p.pump();
    let name = hello_name(&eb);
    assert_eq!(name, "mallory x");
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

    // A body written straight into the packet arrives the same.
    let body = |out: &mut Vec<u8>| {
        out.extend_from_slice(&[8; 65_000]);
        0x25
    };
    p.a.send_transfer_with(65_000, body, p.now).unwrap();
    let refused = |out: &mut Vec<u8>| {
        out.push(1);
        0x01
    };
    assert_eq!(p.a.send_transfer_with(1, refused, p.now), Err(LinkError::NotTransferFrame(0x01)));
    let (_, eb) = p.pump();
    let got: Vec<_> = eb.into_iter().filter(|e| matches!(e, LinkEvent::Transfer { .. })).collect();
    assert_eq!(got, vec![LinkEvent::Transfer { frame_type: 0x25, body: vec![8; 65_000] }]);

    // Several small frames in one packet arrive in order.
    let sent = p.a.stats().packets_sent;
    p.a.send_transfers(vec![(0x24, vec![1]), (0x24, vec![2]), (0x28, vec![3])], p.now).unwrap();
    assert_eq!(p.a.stats().packets_sent, sent + 1);
    let (_, eb) = p.pump();
    let got: Vec<_> = eb.into_iter().filter(|e| matches!(e, LinkEvent::Transfer { .. })).collect();
    assert_eq!(
        got,
        vec![
            LinkEvent::Transfer { frame_type: 0x24, body: vec![1] },
            LinkEvent::Transfer { frame_type: 0x24, body: vec![2] },
            LinkEvent::Transfer { frame_type: 0x28, body: vec![3] },
        ]
    );
    assert_eq!(
        p.a.send_transfers(vec![(0x02, vec![])], p.now),
        Err(LinkError::NotTransferFrame(0x02))
    );
}

/// Runs `p` in virtual time: delivers what is in flight (through `deliver`, which may
/// drop or alter), fires due timers, until both are established or `limit` passes.
fn run_lossy(
    p: &mut Pair,
    limit: Duration,
    mut deliver: impl FnMut(bool, &[u8]) -> Option<Vec<u8>>,
) -> (Vec<LinkEvent>, Vec<LinkEvent>) {
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    while p.now <= limit {
        loop {
            let mut moved = false;
            while let Some(bytes) = p.a.poll_transmit() {
                moved = true;
                if let Some(bytes) = deliver(true, &bytes) {
                    p.b.receive(&bytes, p.now, &mut p.rng);
                }
            }
            while let Some(bytes) = p.b.poll_transmit() {
                moved = true;
                if let Some(bytes) = deliver(false, &bytes) {
                    p.a.receive(&bytes, p.now, &mut p.rng);
                }
            }
            if !moved {
                break;
            }
        }
        ea.extend(std::iter::from_fn(|| p.a.poll_event()));
        eb.extend(std::iter::from_fn(|| p.b.poll_event()));
        let both = p.a.state() == LinkState::Established && p.b.state() == LinkState::Established;
        if both
            && ea.iter().chain(&eb).filter(|e| matches!(e, LinkEvent::Hello { .. })).count() == 2
        {
            return (ea, eb);
        }
        let next = [p.a.poll_timeout(), p.b.poll_timeout()].into_iter().flatten().min();
        let Some(next) = next else { break };
        p.now = next.max(p.now);
        p.a.handle_timeout(p.now);
        p.b.handle_timeout(p.now);
    }
    (ea, eb)
}

/// The handshake message type of `bytes`, if it is one.
fn hs_type(bytes: &[u8]) -> Option<u8> {
    bytes.first().copied().filter(|b| (0x01..=0x04).contains(b))
}

fn established_both_ways(p: &mut Pair, ea: &[LinkEvent], eb: &[LinkEvent]) {
    assert_eq!(p.a.state(), LinkState::Established, "{ea:?}");
    assert_eq!(p.b.state(), LinkState::Established, "{eb:?}");
    assert_eq!(ea.iter().filter(|e| matches!(e, LinkEvent::Established { .. })).count(), 1);
    assert_eq!(eb.iter().filter(|e| matches!(e, LinkEvent::Established { .. })).count(), 1);
    assert!(!ea.iter().chain(eb).any(|e| matches!(e, LinkEvent::Failed(_))), "{ea:?} {eb:?}");
    p.a.send_message("after loss", p.now).unwrap();
    p.b.send_message("and back", p.now).unwrap();
    let (ea, eb) = p.pump();
    assert!(eb.contains(&LinkEvent::Message { text: "after loss".into() }), "{eb:?}");
    assert!(ea.contains(&LinkEvent::Message { text: "and back".into() }), "{ea:?}");
}

#[test]
fn a_lost_init_is_retransmitted_identically_and_the_link_establishes() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.open(FP_B, FP_A);
    let mut inits: Vec<Vec<u8>> = Vec::new();
    let mut dropped = 0;
    let (ea, eb) = run_lossy(&mut p, t(15_000), |_, bytes| {
        if hs_type(bytes) == Some(0x01) {
            inits.push(bytes.to_vec());
            // The first two copies are lost (as at a webrtc-rs channel's opening).
            if inits.len() <= 2 {
                dropped += 1;
                return None;
            }
        }
        Some(bytes.to_vec())
    });
    assert_eq!(dropped, 2);
    assert!(inits.len() >= 3);
    assert!(inits.iter().all(|i| *i == inits[0]), "every retransmission is the same Init");
    // Resent after 250 ms, then 500 ms later: established at 750 ms.
    assert_eq!(p.now, t(750));
    established_both_ways(&mut p, &ea, &eb);
}

#[test]
fn a_lost_response_is_recovered_by_the_init_retransmission() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.open(FP_B, FP_A);
    let mut responses: Vec<Vec<u8>> = Vec::new();
    let (ea, eb) = run_lossy(&mut p, t(15_000), |_, bytes| {
        if hs_type(bytes) == Some(0x02) {
            responses.push(bytes.to_vec());
            if responses.len() == 1 {
                return None;
            }
        }
        Some(bytes.to_vec())
    });
    assert!(responses.len() >= 2);
    assert!(responses.iter().all(|r| *r == responses[0]), "the stored Response is resent");
    established_both_ways(&mut p, &ea, &eb);
}

#[test]
fn a_lost_finish_is_recovered_by_the_response_retransmission() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.open(FP_B, FP_A);
    let mut finishes: Vec<Vec<u8>> = Vec::new();
    // A is established at once; its Hello and Ping wait at B (they overtook the Finish).
    let (ea, eb) = run_lossy(&mut p, t(15_000), |_, bytes| {
        if hs_type(bytes) == Some(0x03) {
            finishes.push(bytes.to_vec());
            if finishes.len() == 1 {
                return None;
            }
        }
        Some(bytes.to_vec())
    });
    assert_eq!(finishes.len(), 2, "one Finish resent for one resent Response");
    assert_eq!(finishes[0], finishes[1], "the stored Finish is resent");
    let first = PeerLinkConfig::default().handshake_retransmit;
    assert_eq!(p.now, first, "recovered at the responder's first retransmission");
    assert!(eb.contains(&LinkEvent::Hello { name: "Alice".into() }), "{eb:?}");
    established_both_ways(&mut p, &ea, &eb);
}

#[test]
fn every_handshake_message_lost_once_still_establishes() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.open(FP_B, FP_A);
    let mut seen = [0usize; 5];
    let (ea, eb) = run_lossy(&mut p, t(15_000), |_, bytes| {
        if let Some(kind) = hs_type(bytes) {
            seen[usize::from(kind)] += 1;
            if seen[usize::from(kind)] == 1 {
                return None;
            }
        }
        Some(bytes.to_vec())
    });
    established_both_ways(&mut p, &ea, &eb);
}

#[test]
fn duplicates_on_a_lossless_channel_are_harmless() {
    // A slow peer: the Response comes after the Init was resent twice.
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.open(FP_B, FP_A);
    let first = p.a.poll_transmit().unwrap();
    p.now = t(250);
    p.a.handle_timeout(p.now);
    let second = p.a.poll_transmit().unwrap();
    assert_eq!(first, second);
    p.now = t(750);
    p.a.handle_timeout(p.now);
    let third = p.a.poll_transmit().unwrap();
    assert_eq!(first, third);
    assert_eq!(p.a.poll_timeout(), Some(t(1_750)), "backoff doubles");
    for init in [&first, &second, &third] {
        p.b.receive(init, p.now, &mut p.rng);
    }
    let responses: Vec<_> = std::iter::from_fn(|| p.b.poll_transmit()).collect();
    assert_eq!(responses.len(), 3);
    assert!(responses.iter().all(|r| *r == responses[0]));
    for r in &responses {
        p.a.receive(r, p.now, &mut p.rng);
    }
    let (ea, eb) = p.pump();
    established_both_ways(&mut p, &ea, &eb);
    // Once A heard from B, a replayed Response gets nothing more.
    p.a.receive(&responses[0], p.now, &mut p.rng);
    assert_eq!(p.a.poll_transmit(), None);
    assert_eq!(p.a.state(), LinkState::Established);
}

#[test]
fn a_replayed_init_neither_creates_a_second_session_nor_fails_one() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.open(FP_B, FP_A);
    let init = p.a.poll_transmit().unwrap();

    // An attacker who knows the network secret sends its own Init over the same channel
    // binding while B waits for A's Finish: ignored, and the real handshake goes on.
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let mallory = IdentityKeyPair::generate(&mut rng);
    let mut m = PeerLink::new(
        PeerId::new("aaaa").unwrap(),
        PeerId::new("bbbb").unwrap(),
        mallory,
        &net,
        "Mallory",
        PeerLinkConfig::default(),
    );
    m.channel_open(&sdp(FP_A), &sdp(FP_B), p.now, &mut rng);
    let forged = m.poll_transmit().unwrap();
    assert_ne!(forged, init);
    p.b.receive(&init, p.now, &mut p.rng);
    let response = p.b.poll_transmit().unwrap();
    p.b.receive(&forged, p.now, &mut p.rng);
    assert_eq!(p.b.poll_transmit(), None, "no answer to another Init");
    assert_eq!(p.b.state(), LinkState::Handshaking);
    p.a.receive(&response, p.now, &mut p.rng);
    let (ea, eb) = p.pump();
    established_both_ways(&mut p, &ea, &eb);
    let packets_before = p.b.stats().packets_received;

    // Replays once established: A's own Init, the forged one, the Response at A.
    for bytes in [&init, &forged] {
        p.b.receive(bytes, p.now, &mut p.rng);
        p.a.receive(bytes, p.now, &mut p.rng);
    }
    p.a.receive(&response, p.now, &mut p.rng);
    assert_eq!(p.a.poll_transmit(), None);
    assert_eq!(p.b.poll_transmit(), None);
    let (ea, eb) = p.pump();
    assert!(ea.is_empty() && eb.is_empty(), "{ea:?} {eb:?}");
    assert_eq!(p.a.state(), LinkState::Established);
    assert_eq!(p.b.state(), LinkState::Established);
    // The one session still carries messages.
    p.a.send_message("still one session", p.now).unwrap();
    let (_, eb) = p.pump();
    assert!(eb.contains(&LinkEvent::Message { text: "still one session".into() }));
    assert!(p.b.stats().packets_received > packets_before);

    // A fresh responder given a replay of A's Init (a recorded one, on this binding)
    // answers, but nobody without A's keys can finish: it times out, alone.
    let mut fresh = PeerLink::new(
        PeerId::new("bbbb").unwrap(),
        PeerId::new("aaaa").unwrap(),
        IdentityKeyPair::generate(&mut rng),
        &net,
        "Bob",
        PeerLinkConfig::default(),
    );
    fresh.channel_open(&sdp(FP_B), &sdp(FP_A), p.now, &mut rng);
    fresh.receive(&init, p.now, &mut rng);
    assert!(fresh.poll_transmit().is_some());
    fresh.handle_timeout(p.now + PeerLinkConfig::default().handshake_timeout);
    let events: Vec<_> = std::iter::from_fn(|| fresh.poll_event()).collect();
    assert_eq!(failure(&events), &LinkError::Handshake(HandshakeError::TimedOut));
}

#[test]
fn a_passphrase_link_without_its_pair_check_refuses_to_handshake() {
    let net = Network::from_passphrase("home", "correct horse", &TINY).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let id = IdentityKeyPair::generate(&mut rng);
    let (pa, pb) = (PeerId::new("aaaa").unwrap(), PeerId::new("bbbb").unwrap());
    let mut link = PeerLink::new(pa, pb, id, &net, "Alice", PeerLinkConfig::default());
    link.channel_open(&sdp(FP_A), &sdp(FP_B), Duration::ZERO, &mut rng);
    let events: Vec<_> = std::iter::from_fn(|| link.poll_event()).collect();
    assert_eq!(failure(&events), &LinkError::NoPassphraseCheck);
    assert!(link.poll_transmit().is_none(), "no Init keyed by the passphrase goes out");
}

#[test]
fn a_lost_reject_still_ends_in_the_timeout_not_a_hang() {
    // Wrong passphrase, and the responder's Reject is lost: the initiator keeps resending
    // Init (the failed responder stays failed and silent) until its deadline.
    let good = Network::from_passphrase("home", "correct horse", &TINY).unwrap();
    let wrong = Network::from_passphrase("home", "wrong horse", &TINY).unwrap();
    let mut p = Pair::new(&good, &wrong);
    p.open(FP_B, FP_A);
    let (ea, eb) = run_lossy(&mut p, t(20_000), |to_b, bytes| {
        (to_b || hs_type(bytes) != Some(0x04)).then(|| bytes.to_vec())
    });
    assert_eq!(failure(&eb), &LinkError::Handshake(HandshakeError::WrongNetworkSecret));
    assert_eq!(failure(&ea), &LinkError::Handshake(HandshakeError::TimedOut));
    assert_eq!(p.b.state(), LinkState::Failed);
}

#[test]
fn closing_tells_the_peer() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.open(FP_B, FP_A);
    p.pump();
    p.a.close(p.now);
    assert_eq!(p.a.state(), LinkState::Waiting);
    let close = p.a.poll_transmit().expect("a Close frame");
    p.b.receive(&close, p.now, &mut p.rng);
    assert_eq!(p.b.state(), LinkState::Waiting);
    assert_eq!(p.b.send_message("gone?", p.now), Err(LinkError::NotEstablished));
}

/// Issue #12 item 3: a burst of unreliable data-channel packets must not push a control
/// packet that arrives late (a retransmission on the reliable channel) out of the replay
/// window. With one transport for both channels it was rejected as too old and the chat
/// message was lost for good.
#[test]
fn a_burst_on_the_data_channel_does_not_push_a_late_control_packet_out() {
    let net = invite_network();
    let mut p = Pair::new(&net, &net);
    p.open(FP_B, FP_A);
    p.pump();
    // A sends a message on the control channel; it is held up (SCTP retransmission).
    p.a.send_message("late but reliable", p.now).unwrap();
    let late = p.a.poll_transmit().unwrap();
    // Meanwhile a burst far larger than the replay window on the data channel.
    let burst = weft_core::transport::REPLAY_WINDOW_SIZE + 100;
    for i in 0..burst {
        let packet = p.a.seal_data(&i.to_be_bytes(), p.now).unwrap();
        p.b.receive(&packet, p.now, &mut p.rng);
    }
    let rejected_before = p.b.stats().packets_rejected;
    p.b.receive(&late, p.now, &mut p.rng);
    let events: Vec<_> = std::iter::from_fn(|| p.b.poll_event()).collect();
    assert_eq!(p.b.stats().packets_rejected, rejected_before, "the late packet was refused");
    assert!(
        events.contains(&LinkEvent::Message { text: "late but reliable".into() }),
        "the message was lost"
    );
    // And the other way: a burst of control packets, then a late data packet.
    let late_data = p.b.seal_data(b"late datagram", p.now).unwrap();
    for i in 0..burst {
        p.b.send_message(&format!("m{i}"), p.now).unwrap();
        let packet = p.b.poll_transmit().unwrap();
        p.a.receive(&packet, p.now, &mut p.rng);
    }
    p.a.receive(&late_data, p.now, &mut p.rng);
    let events: Vec<_> = std::iter::from_fn(|| p.a.poll_event()).collect();
    assert!(events.contains(&LinkEvent::Data(b"late datagram".to_vec())), "datagram lost");
}
