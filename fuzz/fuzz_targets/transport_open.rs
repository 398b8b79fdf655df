//! Transport packets: arbitrary bytes opened by both sides of a real session, real packets
//! (across four key epochs) altered as the input says, and input plaintexts sealed and
//! opened in an input-chosen order.
//!
//! Properties: nothing panics; a packet that does not authenticate changes no state; an
//! altered packet never opens; a real packet opens to its plaintext exactly once.
//!
//! A handshake costs milliseconds, so the sessions are built once per process. The
//! receivers of arbitrary and altered packets never accept one, so they stay in the same
//! state for every input (a crash replays from its input alone). Only the round-trip pair
//! moves on (its counters grow from input to input), and what it checks does not depend
//! on where they stand.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use weft_core::frame::{Frame, encode_frames};
use weft_core::transport::{PACKET_HEADER_LEN, Session, TransportConfig, TransportError};
use weft_fuzz::{NOW, handshake};

struct Fixture {
    /// Receives only arbitrary or altered packets: always in its initial state.
    pristine_responder: Session,
    /// Receives only arbitrary packets: always in its initial state.
    pristine_initiator: Session,
    /// Real packets the initiator sealed (two per epoch, epochs 0 to 3), none ever opened
    /// by `pristine_responder`.
    packets: Vec<Vec<u8>>,
    /// A second copy of the same session (the fixture handshake is deterministic): the
    /// initiator side, for round trips.
    sender: Session,
    /// Its responder side.
    receiver: Session,
}

fn fixture() -> &'static Mutex<Fixture> {
    static FIXTURE: OnceLock<Mutex<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut a = handshake();
        let b = handshake();
        assert_eq!(a.init, b.init, "the fixture handshake is deterministic");
        a.initiator
            .set_config(TransportConfig { rekey_after_messages: 2, ..TransportConfig::default() });
        let plaintexts: [Vec<u8>; 8] = [
            Vec::new(),
            vec![0],
            encode_frames(&[Frame::Ping { timestamp: 7 }]).unwrap_or_default(),
            encode_frames(&[Frame::Message("hi".into()), Frame::Close { code: 0 }])
                .unwrap_or_default(),
            vec![0xa5; 15],
            vec![0x5a; 16],
            vec![0x42; 17],
            vec![0x17; 1200],
        ];
        let packets = plaintexts
            .iter()
            .map(|p| a.initiator.seal(p, NOW).expect("sealing a small plaintext"))
            .collect();
        Mutex::new(Fixture {
            pristine_responder: a.responder,
            pristine_initiator: a.initiator,
            packets,
            sender: b.initiator,
            receiver: b.responder,
        })
    })
}

/// Opens `packet`, which must fail, and checks the session did not change.
fn refuse(session: &mut Session, packet: &[u8], what: &str) {
    let epoch = session.recv_epoch();
    let timeout = session.poll_timeout();
    assert!(session.open(packet, NOW).is_err(), "{what} opened");
    assert_eq!(session.recv_epoch(), epoch, "{what} moved the receive epoch");
    assert_eq!(session.poll_timeout(), timeout, "{what} moved the key timer");
}

/// Applies one input-chosen change to `p`.
fn alter(p: &mut Vec<u8>, op: u8, at: u8, mask: u8) {
    let i = usize::from(at) * 7 % (p.len() + 1);
    let byte = i.min(p.len().saturating_sub(1));
    match op % 6 {
        0 if !p.is_empty() => p[byte] ^= mask.max(1),
        1 => p.truncate(i),
        2 => p.push(mask),
        3 => p.insert(i, mask),
        // The header fields (epoch and counter).
        4 if p.len() >= PACKET_HEADER_LEN => p[1 + usize::from(at) % 12] ^= mask.max(1),
        _ if !p.is_empty() => {
            p.remove(byte);
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let mut guard = fixture().lock().unwrap_or_else(|e| e.into_inner());
    let f = &mut *guard;

    // 1. The whole input as a packet, to either side (unless it is one of the real
    //    packets, say from a seed: those open, and must not open here).
    if !f.packets.iter().any(|p| p == data) {
        refuse(&mut f.pristine_responder, data, "an arbitrary packet");
        assert!(f.pristine_responder.open_frames(data, NOW).is_err());
    }
    refuse(&mut f.pristine_initiator, data, "an arbitrary packet");

    // 2. A real packet, altered step by step. Input: which packet, then (op, at, mask)
    //    triples, up to 16 of them; the rest is the plaintext for part 3.
    let Some((&which, rest)) = data.split_first() else { return };
    let (edits, plaintext) = rest.split_at(rest.len().min(48));
    let original = &f.packets[usize::from(which) % f.packets.len()];
    let mut packet = original.clone();
    for edit in edits.chunks_exact(3) {
        alter(&mut packet, edit[0], edit[1], edit[2]);
        if packet != *original {
            refuse(&mut f.pristine_responder, &packet, "an altered packet");
        }
    }

    // 3. Round trip: two packets of the input's plaintext, opened in the order the first
    //    byte says, each exactly once.
    let first = f.sender.seal(plaintext, NOW).expect("sealing a small plaintext");
    let second = f.sender.seal(plaintext, NOW).expect("sealing a small plaintext");
    let order = if which & 0x80 == 0 { [&first, &second] } else { [&second, &first] };
    for p in order {
        assert_eq!(f.receiver.open(p, NOW).as_deref(), Ok(plaintext), "a real packet");
    }
    for p in order {
        assert_eq!(f.receiver.open(p, NOW), Err(TransportError::Replay), "a replay");
    }

    // 4. The other direction, through the frame layer.
    let sealed = f.receiver.seal(plaintext, NOW).expect("sealing a small plaintext");
    let frames = f.sender.open_frames(&sealed, NOW);
    match Frame::decode_all(plaintext) {
        Ok(expected) => assert_eq!(frames, Ok(expected)),
        Err(e) => assert_eq!(frames, Err(TransportError::Frame(e))),
    }
});
