//! Two peers in virtual time over a link model that delays, reorders, loses and
//! duplicates packets: handshake, then message streams both ways across many rekeys
//! (by count and by time), with ping/pong round trips. Deterministic: a seeded RNG drives
//! the link and the peers, and the run is repeated to check it gives the same trace.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::time::Duration;

use chacha20::ChaCha20Rng;
use chacha20::rand_core::{Rng, SeedableRng};
use weft_core::frame::Frame;
use weft_core::handshake::{
    ChannelBinding, HandshakeDeadline, HandshakeInitiator, HandshakeResponder, MessageKind,
    message_kind,
};
use weft_core::identity::{IdentityKeyPair, PublicIdentity};
use weft_core::network::NetworkSecret;
use weft_core::transport::{Session, TransportConfig, TransportError};

const MS: Duration = Duration::from_millis(1);

/// Link settings, in percent and milliseconds.
#[derive(Clone, Copy)]
struct LinkModel {
    loss: u32,
    duplicate: u32,
    base_delay_ms: u64,
    jitter_ms: u64,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Event {
    at: Duration,
    seq: u64,
    to: usize,
    bytes: Vec<u8>,
}

struct Net {
    rng: ChaCha20Rng,
    lossy: LinkModel,
    queue: BinaryHeap<Reverse<Event>>,
    seq: u64,
    dropped: u64,
}

impl Net {
    fn delay(&mut self, m: LinkModel) -> Duration {
        MS * (m.base_delay_ms + self.rng.next_u64() % (m.jitter_ms + 1)) as u32
    }

    fn push(&mut self, at: Duration, to: usize, bytes: Vec<u8>) {
        self.seq += 1;
        self.queue.push(Reverse(Event { at, seq: self.seq, to, bytes }));
    }

    /// Handshake messages go on a reliable, ordered channel (the driver's job): delayed
    /// by the base delay only.
    fn send_reliable(&mut self, now: Duration, to: usize, bytes: Vec<u8>) {
        let at = now + MS * (self.lossy.base_delay_ms + self.lossy.jitter_ms / 2) as u32;
        self.push(at, to, bytes);
    }

    /// Transport packets go on an unreliable, unordered channel.
    fn send_lossy(&mut self, now: Duration, to: usize, bytes: Vec<u8>) {
        let m = self.lossy;
        if self.rng.next_u32() % 100 < m.loss {
            self.dropped += 1;
            return;
        }
        if self.rng.next_u32() % 100 < m.duplicate {
            let at = now + self.delay(m);
            self.push(at, to, bytes.clone());
        }
        let at = now + self.delay(m);
        self.push(at, to, bytes);
    }
}

enum State {
    Initiator(HandshakeInitiator),
    Responder(HandshakeResponder),
    Up(Box<Session>),
}

struct Peer {
    state: State,
    deadline: HandshakeDeadline,
    peer_identity: Option<PublicIdentity>,
    /// Transport packets that arrived before the handshake completed here.
    early: Vec<Vec<u8>>,
    received: Vec<u32>,
    rtts: Vec<Duration>,
    rejected: Vec<TransportError>,
}

impl Peer {
    fn session(&mut self) -> Option<&mut Session> {
        match &mut self.state {
            State::Up(s) => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Trace {
    received: [Vec<u32>; 2],
    rtt_count: usize,
    send_epochs: [u32; 2],
    dropped: u64,
}

fn run(seed: u64, link: LinkModel, messages: u32) -> Trace {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let secret = NetworkSecret::generate(&mut rng);
    let ids = [IdentityKeyPair::generate(&mut rng), IdentityKeyPair::generate(&mut rng)];
    let fps = ["sha-256 0A:0A", "sha-256 0B:0B"];
    let cfg = TransportConfig {
        rekey_after_messages: 97,
        rekey_after_time: Duration::from_secs(2),
        previous_key_lifetime: Duration::from_secs(1),
        max_epoch_skip: 8,
    };
    let mut net = Net {
        rng: ChaCha20Rng::seed_from_u64(seed ^ 0xdead_beef),
        lossy: link,
        queue: BinaryHeap::new(),
        seq: 0,
        dropped: 0,
    };

    let mut now = Duration::ZERO;
    let (init, m1) = HandshakeInitiator::new(
        &mut rng,
        &ids[0],
        &secret,
        &ChannelBinding::new(fps[0], fps[1]).unwrap(),
    );
    let resp =
        HandshakeResponder::new(&ids[1], &secret, &ChannelBinding::new(fps[1], fps[0]).unwrap());
    let mut peers = [State::Initiator(init), State::Responder(resp)].map(|state| Peer {
        state,
        deadline: HandshakeDeadline::with_default_timeout(now),
        peer_identity: None,
        early: Vec::new(),
        received: Vec::new(),
        rtts: Vec::new(),
        rejected: Vec::new(),
    });
    net.send_reliable(now, 1, m1);

    // Each side sends `messages` numbered messages, one every 10 ms once it is up, and a
    // ping every 250 ms.
    let mut next_send = [Duration::MAX; 2];
    let mut sent = [0u32; 2];
    let tick = MS * 10;

    loop {
        let next_event = net.queue.peek().map(|Reverse(e)| e.at);
        let next_tick = next_send.iter().copied().min().unwrap_or(Duration::MAX);
        let Some(t) = [next_event, Some(next_tick)].into_iter().flatten().min() else {
            break;
        };
        if t == Duration::MAX {
            break;
        }
        now = t;

        if next_event == Some(t) {
            let Reverse(ev) = net.queue.pop().unwrap();
            let me = ev.to;
            let other = 1 - me;
            let peer = &mut peers[me];
            match message_kind(&ev.bytes) {
                Some(MessageKind::Handshake) => {
                    peer.deadline.check(now).unwrap();
                    let step = match &mut peer.state {
                        State::Initiator(h) => h.handle(&ev.bytes, &mut rng).unwrap(),
                        State::Responder(h) => h.handle(&ev.bytes, &mut rng).unwrap(),
                        State::Up(_) => panic!("handshake message after the handshake"),
                    };
                    if let Some(m) = step.message {
                        net.send_reliable(now, other, m);
                    }
                    if let Some(est) = step.established {
                        let mut session = est.session;
                        session.set_config(cfg);
                        peer.peer_identity = Some(est.peer);
                        peer.state = State::Up(Box::new(session));
                        next_send[me] = now;
                        // Packets that overtook the Finish message.
                        for p in std::mem::take(&mut peer.early) {
                            deliver(peer, other, &p, now, &mut net);
                        }
                    }
                }
                Some(MessageKind::Transport) => {
                    if peer.session().is_none() {
                        peer.early.push(ev.bytes);
                    } else {
                        deliver(peer, other, &ev.bytes, now, &mut net);
                    }
                }
                _ => panic!("unknown message"),
            }
        } else {
            for me in 0..2 {
                if next_send[me] != now {
                    continue;
                }
                let other = 1 - me;
                let n = sent[me];
                let mut frames = vec![Frame::Message(format!("message {n}"))];
                if n % 25 == 0 {
                    frames.push(Frame::Ping { timestamp: now.as_micros() as u64 });
                }
                let packet = peers[me].session().unwrap().seal_frames(&frames, now).unwrap();
                net.send_lossy(now, other, packet);
                sent[me] += 1;
                next_send[me] = if sent[me] < messages { now + tick } else { Duration::MAX };
            }
        }
    }

    assert_eq!(peers[0].peer_identity.as_ref(), Some(ids[1].public()));
    assert_eq!(peers[1].peer_identity.as_ref(), Some(ids[0].public()));
    for (me, peer) in peers.iter().enumerate() {
        let unique: BTreeSet<_> = peer.received.iter().collect();
        assert_eq!(unique.len(), peer.received.len(), "peer {me} got a message twice");
        assert!(peer.received.iter().all(|&n| n < messages));
        // Only replays (the link's duplicates) were rejected: nothing late, nothing stale.
        assert!(
            peer.rejected.iter().all(|e| *e == TransportError::Replay),
            "peer {me}: {:?}",
            peer.rejected
        );
    }
    let mut sessions = peers.each_mut().map(|p| p.session().unwrap().send_epoch());
    sessions.sort();
    Trace {
        received: [peers[0].received.clone(), peers[1].received.clone()],
        rtt_count: peers[0].rtts.len() + peers[1].rtts.len(),
        send_epochs: sessions,
        dropped: net.dropped,
    }
}

fn deliver(peer: &mut Peer, other: usize, packet: &[u8], now: Duration, net: &mut Net) {
    let State::Up(session) = &mut peer.state else { panic!("not up") };
    match session.open_frames(packet, now) {
        Ok(frames) => {
            for f in frames {
                match f {
                    Frame::Message(text) => {
                        let n = text.strip_prefix("message ").unwrap().parse().unwrap();
                        peer.received.push(n);
                    }
                    Frame::Ping { timestamp } => {
                        let pong = session.seal_frames(&[Frame::Pong { timestamp }], now).unwrap();
                        net.send_lossy(now, other, pong);
                    }
                    Frame::Pong { timestamp } => {
                        let sent = Duration::from_micros(timestamp);
                        peer.rtts.push(now - sent);
                    }
                    other => panic!("unexpected frame {other:?}"),
                }
            }
        }
        Err(e) => peer.rejected.push(e),
    }
}

#[test]
fn lossy_reordering_link_across_rekeys() {
    let link = LinkModel { loss: 10, duplicate: 5, base_delay_ms: 20, jitter_ms: 60 };
    let messages = 1500;
    let trace = run(2024, link, messages);
    for (me, got) in trace.received.iter().enumerate() {
        // About 10% lost; everything else arrived.
        assert!(got.len() > (messages as usize) * 85 / 100, "peer {me} got {}", got.len());
        // Reordering happened (the link's jitter is six times the send interval).
        assert!(got.windows(2).any(|w| w[0] > w[1]), "no reordering seen");
    }
    // 1500 messages and pongs at one rekey per 97 packets or per 2 s: at least 15 epochs.
    assert!(trace.send_epochs[0] >= 15, "epochs {:?}", trace.send_epochs);
    assert!(trace.rtt_count > 80);
    assert!(trace.dropped > 0);
    // Same seed, same run.
    assert_eq!(run(2024, link, messages), trace);
}

#[test]
fn slow_link_rekeys_by_time() {
    // One message per 10 ms for 30 s would be 3000 packets; here only 300 are sent over
    // 3 s, but the 2 s timer still rekeys.
    let link = LinkModel { loss: 0, duplicate: 0, base_delay_ms: 5, jitter_ms: 0 };
    let trace = run(7, link, 300);
    assert_eq!(trace.received[0].len(), 300);
    assert_eq!(trace.received[1], (0..300).collect::<Vec<_>>());
    assert!(trace.send_epochs[0] >= 1);
}
