//! Transport: tampering, replay, reordering, the window edge, rekeying under loss, and
//! property tests of the replay window, frames and parsers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chacha20::ChaCha20Rng;
use chacha20::rand_core::{Rng, SeedableRng};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use weft_core::frame::{FILE_TRANSFER_TYPES, Frame, encode_frames};
use weft_core::handshake::{ChannelBinding, HandshakeInitiator, HandshakeResponder};
use weft_core::identity::IdentityKeyPair;
use weft_core::network::NetworkSecret;
use weft_core::transport::{
    PACKET_OVERHEAD, REPLAY_WINDOW_SIZE, ReplayRejection, ReplayWindow, Session, TransportConfig,
    TransportError,
};

const T0: Duration = Duration::ZERO;

/// Two sessions from a real handshake: (initiator's, responder's).
fn sessions(seed: u64) -> (Session, Session) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let secret = NetworkSecret::generate(&mut rng);
    let id_a = IdentityKeyPair::generate(&mut rng);
    let id_b = IdentityKeyPair::generate(&mut rng);
    let ba = ChannelBinding::new("sha-256 aa", "sha-256 bb").unwrap();
    let bb = ChannelBinding::new("sha-256 bb", "sha-256 aa").unwrap();
    let (mut i, m1) = HandshakeInitiator::new(&mut rng, &id_a, &secret, &ba);
    let mut r = HandshakeResponder::new(&id_b, &secret, &bb);
    let m2 = r.handle(&m1, &mut rng).unwrap().message.unwrap();
    let step = i.handle(&m2, &mut rng).unwrap();
    let m3 = step.message.unwrap();
    let a = step.established.unwrap().session;
    let b = r.handle(&m3, &mut rng).unwrap().established.unwrap().session;
    (a, b)
}

#[test]
fn every_flipped_byte_of_a_packet_is_rejected_without_changing_state() {
    let (mut a, mut b) = sessions(1);
    let p = a.seal(&[0x5a; 100], T0).unwrap();
    assert_eq!(p.len(), 100 + PACKET_OVERHEAD);
    for i in 0..p.len() {
        for bit in [0x01u8, 0x80] {
            let mut q = p.clone();
            q[i] ^= bit;
            assert!(b.open(&q, T0).is_err(), "byte {i} bit {bit:#x} accepted");
        }
    }
    // Truncations and extensions.
    for n in 0..p.len() {
        assert!(b.open(&p[..n], T0).is_err());
    }
    let mut longer = p.clone();
    longer.push(0);
    assert!(b.open(&longer, T0).is_err());
    // None of the failures moved the window or the epoch.
    assert_eq!(b.open(&p, T0).unwrap(), vec![0x5a; 100]);
    assert_eq!(b.recv_epoch(), 0);
}

#[test]
fn replayed_and_duplicated_packets_are_rejected() {
    let (mut a, mut b) = sessions(2);
    let p1 = a.seal(b"one", T0).unwrap();
    let p2 = a.seal(b"two", T0).unwrap();
    assert_eq!(b.open(&p2, T0).unwrap(), b"two");
    assert_eq!(b.open(&p2, T0), Err(TransportError::Replay));
    assert_eq!(b.open(&p1, T0).unwrap(), b"one");
    assert_eq!(b.open(&p1, T0), Err(TransportError::Replay));
    assert_eq!(b.open(&p2, T0), Err(TransportError::Replay));
}

#[test]
fn reordering_inside_the_window_is_accepted_and_older_is_rejected() {
    let (mut a, mut b) = sessions(3);
    let n = REPLAY_WINDOW_SIZE as usize + 10;
    let packets: Vec<_> = (0..n).map(|i| a.seal(&(i as u32).to_be_bytes(), T0).unwrap()).collect();
    // Deliver the newest first, then the rest newest to oldest.
    assert!(b.open(&packets[n - 1], T0).is_ok());
    for i in (0..n - 1).rev() {
        let r = b.open(&packets[i], T0);
        let age = (n - 1 - i) as u64;
        if age <= REPLAY_WINDOW_SIZE {
            assert_eq!(r.unwrap(), (i as u32).to_be_bytes(), "packet {i}");
        } else {
            assert_eq!(r, Err(TransportError::TooOld), "packet {i}");
        }
    }
}

#[test]
fn rekey_by_count_under_loss_reordering_and_duplication() {
    let (mut a, mut b) = sessions(4);
    let cfg = TransportConfig {
        rekey_after_messages: 50,
        previous_key_lifetime: Duration::from_secs(5),
        ..TransportConfig::default()
    };
    a.set_config(cfg);
    b.set_config(cfg);
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let total = 3000u32;
    // Each packet gets a delivery slot: its index plus a random delay of up to 40 slots
    // (less than an epoch), 15% are lost, 5% are duplicated. Epochs 30..=32 are lost whole,
    // so the receiver must also skip epochs.
    let mut schedule: BTreeMap<(u64, u32, u8), Vec<u8>> = BTreeMap::new();
    let mut sent_epochs = BTreeMap::new();
    for i in 0..total {
        let p = a.seal(&i.to_be_bytes(), T0).unwrap();
        sent_epochs.insert(i, a.send_epoch());
        if (30..=32).contains(&a.send_epoch()) || rng.next_u32() % 100 < 15 {
            continue;
        }
        let slot = u64::from(i) + rng.next_u64() % 40;
        if rng.next_u32() % 100 < 5 {
            let dup_slot = u64::from(i) + rng.next_u64() % 40;
            schedule.insert((dup_slot, i, 1), p.clone());
        }
        schedule.insert((slot, i, 0), p);
    }
    assert!(a.send_epoch() >= 59, "rekeyed {} times", a.send_epoch());
    let mut delivered = HashSet::new();
    let mut expected = HashSet::new();
    for ((_, i, copy), p) in schedule {
        if copy == 0 {
            expected.insert(i);
        }
        match b.open(&p, T0) {
            Ok(pt) => {
                let n = u32::from_be_bytes(pt.try_into().unwrap());
                assert_eq!(n, i);
                assert!(delivered.insert(n), "packet {n} delivered twice");
            }
            Err(TransportError::Replay) => assert!(delivered.contains(&i)),
            Err(e) => panic!("packet {i} (epoch {}) rejected: {e}", sent_epochs[&i]),
        }
    }
    assert_eq!(delivered, expected, "every packet that arrived was delivered once");
    assert_eq!(b.recv_epoch(), a.send_epoch());
}

#[test]
fn old_epoch_key_is_erased_after_its_lifetime() {
    let (mut a, mut b) = sessions(5);
    let cfg = TransportConfig {
        rekey_after_messages: 2,
        previous_key_lifetime: Duration::from_secs(1),
        ..TransportConfig::default()
    };
    a.set_config(cfg);
    b.set_config(cfg);
    let p0 = a.seal(b"0", T0).unwrap();
    let p1 = a.seal(b"1", T0).unwrap();
    let p2 = a.seal(b"2", T0).unwrap(); // epoch 1
    assert!(b.open(&p2, T0).is_ok());
    // Within the lifetime the late packet of epoch 0 still opens.
    assert!(b.open(&p0, Duration::from_millis(500)).is_ok());
    let p3 = a.seal(b"3", T0).unwrap();
    let p4 = a.seal(b"4", T0).unwrap(); // epoch 2
    assert_eq!(a.send_epoch(), 2);
    assert!(b.open(&p4, Duration::from_millis(600)).is_ok());
    assert_eq!(b.open(&p1, Duration::from_millis(600)), Err(TransportError::UnknownEpoch(0)));
    assert_eq!(b.poll_timeout(), Some(Duration::from_millis(1600)));
    b.handle_timeout(Duration::from_millis(1600));
    assert_eq!(b.poll_timeout(), None);
    assert_eq!(b.open(&p3, Duration::from_millis(1700)), Err(TransportError::UnknownEpoch(1)));
}

#[test]
fn epochs_too_far_ahead_are_refused() {
    let (mut a, mut b) = sessions(6);
    let cfg = TransportConfig {
        rekey_after_messages: 1,
        max_epoch_skip: 3,
        ..TransportConfig::default()
    };
    a.set_config(cfg);
    b.set_config(cfg);
    let packets: Vec<_> = (0..6).map(|_| a.seal(b"x", T0).unwrap()).collect();
    assert_eq!(b.open(&packets[4], T0), Err(TransportError::UnknownEpoch(4)));
    assert!(b.open(&packets[3], T0).is_ok());
    assert!(b.open(&packets[5], T0).is_ok());
}

#[test]
fn frames_travel_in_packets() {
    let (mut a, mut b) = sessions(7);
    let frames = vec![
        Frame::Message("hello".into()),
        Frame::Ping { timestamp: 1234 },
        Frame::Data(vec![0x45; 60]),
    ];
    let p = a.seal_frames(&frames, T0).unwrap();
    assert_eq!(b.open_frames(&p, T0).unwrap(), frames);
    // A packet whose plaintext is not frames authenticates but fails to parse.
    let p = a.seal(&[0x01, 0, 0, 0, 9], T0).unwrap();
    assert!(matches!(b.open_frames(&p, T0), Err(TransportError::Frame(_))));
}

// ------------------------------------------------------------------------------------
// Property tests

/// A model of the replay window: the set of accepted counters and their maximum.
#[derive(Default)]
struct Model {
    seen: HashSet<u64>,
    max: Option<u64>,
}

impl Model {
    fn accept(&mut self, c: u64) -> bool {
        let ok = !self.seen.contains(&c)
            && self.max.is_none_or(|m| c > m || m - c <= REPLAY_WINDOW_SIZE);
        if ok {
            self.seen.insert(c);
            self.max = Some(self.max.map_or(c, |m| m.max(c)));
        }
        ok
    }
}

fn counters() -> impl Strategy<Value = Vec<u64>> {
    // Mostly a moving region around a base, so duplicates, window edges and big jumps
    // all happen.
    prop::collection::vec(
        prop_oneof![
            8 => 0u64..3 * REPLAY_WINDOW_SIZE,
            2 => (0u64..64).prop_map(|d| REPLAY_WINDOW_SIZE - 32 + d),
            1 => any::<u64>(),
            1 => (u64::MAX - 5000)..=u64::MAX,
        ],
        1..400,
    )
}

proptest! {
    #![proptest_config(Config::with_cases(256))]

    #[test]
    fn replay_window_matches_model(cs in counters(), offset in 0u64..10_000) {
        let mut w = ReplayWindow::new();
        let mut m = Model::default();
        for c in cs {
            let c = c.saturating_add(offset);
            let before = w.check(c).is_ok();
            let got = w.update(c).is_ok();
            prop_assert_eq!(before, got);
            prop_assert_eq!(got, m.accept(c), "counter {}", c);
        }
    }

    #[test]
    fn replay_window_reports_the_reason(c in 0u64..100_000) {
        let mut w = ReplayWindow::new();
        w.update(c + REPLAY_WINDOW_SIZE + 1).unwrap();
        prop_assert_eq!(w.check(c), Err(ReplayRejection::TooOld));
        w.update(c + 1).unwrap();
        prop_assert_eq!(w.check(c + 1), Err(ReplayRejection::Duplicate));
    }

    #[test]
    fn frames_round_trip(frames in prop::collection::vec(frame(), 0..8)) {
        let bytes = encode_frames(&frames).unwrap();
        prop_assert_eq!(Frame::decode_all(&bytes).unwrap(), frames);
    }

    #[test]
    fn frame_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = Frame::decode_all(&bytes);
        if let Ok((f, used)) = Frame::decode(&bytes) {
            prop_assert!(used <= bytes.len());
            prop_assert_eq!(f.encode().unwrap(), bytes[..used].to_vec());
        }
    }
}

fn frame() -> impl Strategy<Value = Frame> {
    let unknown =
        any::<u8>().prop_filter("unassigned type", |t| !(1..=6).contains(t)).prop_flat_map(|t| {
            prop::collection::vec(any::<u8>(), 0..50)
                .prop_map(move |body| Frame::Unknown { frame_type: t, body })
        });
    prop_oneof![
        ".{0,40}".prop_map(Frame::Message),
        prop::collection::vec(any::<u8>(), 0..100).prop_map(Frame::Data),
        any::<u64>().prop_map(|timestamp| Frame::Ping { timestamp }),
        any::<u64>().prop_map(|timestamp| Frame::Pong { timestamp }),
        any::<u16>().prop_map(|code| Frame::Close { code }),
        "[a-zA-Z0-9 ]{0,64}".prop_map(|name| Frame::Hello { name }),
        unknown,
        FILE_TRANSFER_TYPES.prop_map(|t| Frame::Unknown { frame_type: t, body: vec![t] }),
    ]
}

#[test]
fn session_open_never_panics_on_arbitrary_bytes() {
    let (mut a, b) = sessions(8);
    let valid = a.seal_frames(&[Frame::Message("x".into())], T0).unwrap();
    let b = RefCell::new(b);
    let mut runner = TestRunner::new(Config::with_cases(512));
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        // Valid-looking headers with random tails.
        (any::<u32>(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(
            |(e, c, tail)| {
                let mut p = vec![0x10];
                p.extend_from_slice(&(e % 12).to_be_bytes());
                p.extend_from_slice(&c.to_be_bytes());
                p.extend(tail);
                p
            }
        ),
        // The valid packet with random mutations.
        prop::collection::vec((0..valid.len(), any::<u8>()), 1..4).prop_map(move |edits| {
            let mut p = valid.clone();
            for (i, v) in edits {
                p[i] = v;
            }
            p
        }),
    ];
    runner
        .run(&strategy, |bytes| {
            let _ = b.borrow_mut().open_frames(&bytes, T0);
            Ok(())
        })
        .unwrap();
}

#[test]
fn handshake_parsers_never_panic_on_arbitrary_bytes() {
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let secret = NetworkSecret::generate(&mut rng);
    let id = IdentityKeyPair::generate(&mut rng);
    let binding = ChannelBinding::new("a", "b").unwrap();
    let (init, m1) = HandshakeInitiator::new(&mut rng, &id, &secret, &binding);
    drop(init);
    let rng = RefCell::new(rng);
    let mut runner = TestRunner::new(Config::with_cases(512));
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(any::<u8>(), 1280..1300),
        prop::collection::vec((0..m1.len(), any::<u8>()), 1..4).prop_map(move |edits| {
            let mut p = m1.clone();
            for (i, v) in edits {
                p[i] = v;
            }
            p
        }),
    ];
    runner
        .run(&strategy, |bytes| {
            let mut r = HandshakeResponder::new(&id, &secret, &binding);
            let _ = r.handle(&bytes, &mut *rng.borrow_mut());
            let _ = weft_core::handshake::message_kind(&bytes);
            Ok(())
        })
        .unwrap();
    // The initiator's parser, on a few arbitrary Responses (each needs a fresh state).
    let mut rng = rng.into_inner();
    for len in [0usize, 1, 2, 3, 100, 2465, 2466, 2467] {
        let (mut i, _) = HandshakeInitiator::new(&mut rng, &id, &secret, &binding);
        let mut bytes = vec![0u8; len];
        rng.fill_bytes(&mut bytes);
        if len >= 2 {
            bytes[0] = 0x02;
            bytes[1] = 0x01;
        }
        assert!(i.handle(&bytes, &mut rng).is_err());
    }
}
