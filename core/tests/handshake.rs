//! Handshake: success, wrong secrets, tampering, channel binding, message sizes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use chacha20::ChaCha20Rng;
use chacha20::rand_core::SeedableRng;
use weft_core::handshake::{
    ChannelBinding, Established, FINISH_LEN, HandshakeError, HandshakeInitiator,
    HandshakeResponder, INIT_LEN, RESPONSE_LEN, RejectReason,
};
use weft_core::identity::IdentityKeyPair;
use weft_core::network::{NetworkSecret, PassphraseParams};

const TINY: PassphraseParams = PassphraseParams { memory_kib: 8, iterations: 1, parallelism: 1 };

const FP_I: &str = "sha-256 AA:BB:CC";
const FP_R: &str = "sha-256 11:22:33";

struct Outcome {
    init: Result<Established, HandshakeError>,
    resp: Result<Established, HandshakeError>,
}

fn run(
    seed: u64,
    secret_i: &NetworkSecret,
    secret_r: &NetworkSecret,
    binding_i: &ChannelBinding,
    binding_r: &ChannelBinding,
) -> Outcome {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let id_i = IdentityKeyPair::generate(&mut rng);
    let id_r = IdentityKeyPair::generate(&mut rng);
    let (mut init, m1) = HandshakeInitiator::new(&mut rng, &id_i, secret_i, binding_i);
    let mut resp = HandshakeResponder::new(&id_r, secret_r, binding_r);
    let m2 = match resp.handle(&m1, &mut rng) {
        Ok(step) => step.message.unwrap(),
        Err(e) => {
            // The responder tells the initiator why, as a driver would.
            let reject = e.reject_message().unwrap();
            let init_err = init.handle(&reject, &mut rng).unwrap_err();
            return Outcome { init: Err(init_err), resp: Err(e) };
        }
    };
    let step = match init.handle(&m2, &mut rng) {
        Ok(step) => step,
        Err(e) => {
            let resp_err = resp.handle(&e.reject_message().unwrap(), &mut rng).unwrap_err();
            return Outcome { init: Err(e), resp: Err(resp_err) };
        }
    };
    let m3 = step.message.unwrap();
    let est_i = step.established.unwrap();
    let resp_result = resp.handle(&m3, &mut rng).map(|s| s.established.unwrap());
    Outcome { init: Ok(est_i), resp: resp_result }
}

fn bindings() -> (ChannelBinding, ChannelBinding) {
    (ChannelBinding::new(FP_I, FP_R).unwrap(), ChannelBinding::new(FP_R, FP_I).unwrap())
}

#[test]
fn same_secret_succeeds_and_keys_match() {
    let t = Instant::now();
    let secret = NetworkSecret::from_random_bytes([3; 32]);
    let (bi, br) = bindings();
    let out = run(1, &secret, &secret, &bi, &br);
    let mut a = out.init.unwrap();
    let mut b = out.resp.unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let id_i = IdentityKeyPair::generate(&mut rng);
    let id_r = IdentityKeyPair::generate(&mut rng);
    assert_eq!(a.peer, *id_r.public());
    assert_eq!(b.peer, *id_i.public());
    assert_eq!(a.session.session_id(), b.session.session_id());
    let now = std::time::Duration::ZERO;
    let p = a.session.seal(b"ping", now).unwrap();
    assert_eq!(b.session.open(&p, now).unwrap(), b"ping");
    let p = b.session.seal(b"pong", now).unwrap();
    assert_eq!(a.session.open(&p, now).unwrap(), b"pong");
    eprintln!("handshake took {:?}", t.elapsed());
}

#[test]
fn message_sizes() {
    let secret = NetworkSecret::from_random_bytes([3; 32]);
    let (bi, br) = bindings();
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let id_i = IdentityKeyPair::generate(&mut rng);
    let id_r = IdentityKeyPair::generate(&mut rng);
    let (mut init, m1) = HandshakeInitiator::new(&mut rng, &id_i, &secret, &bi);
    let mut resp = HandshakeResponder::new(&id_r, &secret, &br);
    let m2 = resp.handle(&m1, &mut rng).unwrap().message.unwrap();
    let m3 = init.handle(&m2, &mut rng).unwrap().message.unwrap();
    assert_eq!((m1.len(), m2.len(), m3.len()), (INIT_LEN, RESPONSE_LEN, FINISH_LEN));
    assert_eq!((INIT_LEN, RESPONSE_LEN, FINISH_LEN), (1282, 2466, 1218));
}

#[test]
fn different_passphrase_fails_on_both_sides_with_a_clear_error() {
    let a = NetworkSecret::from_passphrase("home", "correct horse battery", &TINY).unwrap();
    let b = NetworkSecret::from_passphrase("home", "correct horse batterY", &TINY).unwrap();
    let (bi, br) = bindings();
    let out = run(3, &a, &b, &bi, &br);
    let resp_err = out.resp.unwrap_err();
    assert_eq!(resp_err, HandshakeError::WrongNetworkSecret);
    assert_eq!(
        resp_err.to_string(),
        "peer is not in the same network (wrong passphrase?) or the connection was tampered with"
    );
    let init_err = out.init.unwrap_err();
    assert_eq!(init_err, HandshakeError::Rejected(RejectReason::AuthenticationFailed));
    assert!(init_err.to_string().contains("wrong passphrase?"));
}

#[test]
fn same_passphrase_different_network_name_fails() {
    let a = NetworkSecret::from_passphrase("home", "pw", &TINY).unwrap();
    let b = NetworkSecret::from_passphrase("work", "pw", &TINY).unwrap();
    let (bi, br) = bindings();
    let out = run(4, &a, &b, &bi, &br);
    assert_eq!(out.resp.unwrap_err(), HandshakeError::WrongNetworkSecret);
}

#[test]
fn substituted_dtls_fingerprint_fails() {
    let secret = NetworkSecret::from_random_bytes([5; 32]);
    // A man in the middle of DTLS gives each side its own certificate's fingerprint.
    let mitm = "sha-256 66:66:66";
    // The initiator sees the attacker's fingerprint as remote.
    let bi = ChannelBinding::new(FP_I, mitm).unwrap();
    let br = ChannelBinding::new(FP_R, FP_I).unwrap();
    let out = run(6, &secret, &secret, &bi, &br);
    assert_eq!(out.resp.unwrap_err(), HandshakeError::WrongNetworkSecret);
    assert!(out.init.is_err());
    // The responder sees the attacker's fingerprint as remote.
    let bi = ChannelBinding::new(FP_I, FP_R).unwrap();
    let br = ChannelBinding::new(FP_R, mitm).unwrap();
    let out = run(7, &secret, &secret, &bi, &br);
    assert_eq!(out.resp.unwrap_err(), HandshakeError::WrongNetworkSecret);
    // Swapped roles' fingerprints (both think they are local-first) also fail.
    let bi = ChannelBinding::new(FP_I, FP_R).unwrap();
    let br = ChannelBinding::new(FP_I, FP_R).unwrap();
    let out = run(8, &secret, &secret, &bi, &br);
    assert!(out.resp.is_err());
}

#[test]
fn fingerprint_formatting_differences_do_not_matter() {
    let secret = NetworkSecret::from_random_bytes([5; 32]);
    let bi = ChannelBinding::new("SHA-256 AA:BB:CC", "sha-256  11:22:33").unwrap();
    let br = ChannelBinding::new(" sha-256 11:22:33", "sha-256 aa:bb:cc").unwrap();
    let out = run(9, &secret, &secret, &bi, &br);
    assert!(out.init.is_ok() && out.resp.is_ok());
}

#[test]
fn unexpected_and_garbage_messages() {
    let secret = NetworkSecret::from_random_bytes([5; 32]);
    let (bi, br) = bindings();
    let mut rng = ChaCha20Rng::seed_from_u64(10);
    let id = IdentityKeyPair::generate(&mut rng);
    // Two initiators: each receives the other's Init.
    let (mut a, m_a) = HandshakeInitiator::new(&mut rng, &id, &secret, &bi);
    assert_eq!(
        a.handle(&m_a, &mut rng).unwrap_err(),
        HandshakeError::UnexpectedMessage { got: 1, expected: 2 }
    );
    assert_eq!(a.handle(&m_a, &mut rng).unwrap_err(), HandshakeError::NotWaiting);
    // Wrong version.
    let mut r = HandshakeResponder::new(&id, &secret, &br);
    let mut m = m_a.clone();
    m[1] = 9;
    assert_eq!(
        r.handle(&m, &mut rng).unwrap_err(),
        HandshakeError::VersionMismatch { ours: 1, theirs: 9 }
    );
    // Truncated and empty.
    for bad in [&m_a[..0], &m_a[..1], &m_a[..2], &m_a[..100], &[0x01, 0x01][..]] {
        let mut r = HandshakeResponder::new(&id, &secret, &br);
        assert!(matches!(r.handle(bad, &mut rng).unwrap_err(), HandshakeError::Malformed(_)));
    }
    // Too long.
    let mut long = m_a.clone();
    long.push(0);
    let mut r = HandshakeResponder::new(&id, &secret, &br);
    assert!(matches!(r.handle(&long, &mut rng), Err(HandshakeError::Malformed(_))));
}

#[test]
fn duplicates_get_the_same_answer_and_no_second_session() {
    let secret = NetworkSecret::from_random_bytes([6; 32]);
    let (bi, br) = bindings();
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let id_i = IdentityKeyPair::generate(&mut rng);
    let id_r = IdentityKeyPair::generate(&mut rng);
    let (mut init, m1) = HandshakeInitiator::new(&mut rng, &id_i, &secret, &bi);
    assert_eq!(init.retransmit(), Some(m1.clone()));
    let mut resp = HandshakeResponder::new(&id_r, &secret, &br);
    assert_eq!(resp.retransmit(), None, "nothing to resend before the Init");
    let m2 = resp.handle(&m1, &mut rng).unwrap().message.unwrap();
    // The same Init again: the same Response, and still waiting for the Finish.
    let again = resp.handle(&m1, &mut rng).unwrap();
    assert_eq!(again.message.as_ref(), Some(&m2));
    assert!(again.established.is_none());
    assert_eq!(resp.retransmit(), Some(m2.clone()));
    // Another Init (another initiator, same network and binding): ignored.
    let other = IdentityKeyPair::generate(&mut rng);
    let (_, m1_other) = HandshakeInitiator::new(&mut rng, &other, &secret, &bi);
    let ignored = resp.handle(&m1_other, &mut rng).unwrap();
    assert!(ignored.message.is_none() && ignored.established.is_none());

    let step = init.handle(&m2, &mut rng).unwrap();
    let m3 = step.message.unwrap();
    let session_i = step.established.unwrap().session;
    assert_eq!(init.retransmit(), None);
    // The same Response again: the same Finish, no new session.
    let again = init.handle(&m2, &mut rng).unwrap();
    assert_eq!(again.message.as_ref(), Some(&m3));
    assert!(again.established.is_none());
    // Anything else now changes nothing.
    assert_eq!(init.handle(&m1, &mut rng).unwrap_err(), HandshakeError::NotWaiting);
    let mut flipped = m2.clone();
    flipped[100] ^= 1;
    assert_eq!(init.handle(&flipped, &mut rng).unwrap_err(), HandshakeError::NotWaiting);
    assert_eq!(init.handle(&m2, &mut rng).unwrap().message, Some(m3.clone()));

    let session_r = resp.handle(&m3, &mut rng).unwrap().established.unwrap().session;
    assert_eq!(session_i.session_id(), session_r.session_id());
    assert_eq!(resp.retransmit(), None);
    assert_eq!(resp.handle(&m1, &mut rng).unwrap_err(), HandshakeError::NotWaiting);
    assert_eq!(resp.handle(&m3, &mut rng).unwrap_err(), HandshakeError::NotWaiting);
}

/// Each channel has its own keys: the same plaintext under the same counter encrypts to
/// different bytes on each (ChaCha20's keystream depends only on key and nonce), and a
/// packet of one channel opens on no other, not even with its type byte rewritten.
#[test]
fn each_channel_has_its_own_keys_and_packets_do_not_cross_channels() {
    use weft_core::transport::{Channel, PACKET_HEADER_LEN, TAG_LEN, TransportError};
    let secret = NetworkSecret::from_random_bytes([3; 32]);
    let (bi, br) = bindings();
    let out = run(2, &secret, &secret, &bi, &br);
    let a = out.init.unwrap();
    let b = out.resp.unwrap();
    let now = std::time::Duration::ZERO;
    let (mut a_control, mut a_data, mut a_fast) = (a.session, a.data, a.fast_path);
    let (mut b_control, mut b_data, mut b_fast) = (b.session, b.data, b.fast_path);
    assert_eq!(
        [a_control.channel(), a_data.channel(), a_fast.channel()],
        [Channel::Control, Channel::Data, Channel::FastPath]
    );
    let plaintext = [0x42u8; 64];
    let packets = [
        a_control.seal(&plaintext, now).unwrap(),
        a_data.seal(&plaintext, now).unwrap(),
        a_fast.seal(&plaintext, now).unwrap(),
    ];
    let body = |p: &Vec<u8>| p[PACKET_HEADER_LEN..p.len() - TAG_LEN].to_vec();
    assert_ne!(body(&packets[0]), body(&packets[1]));
    assert_ne!(body(&packets[0]), body(&packets[2]));
    assert_ne!(body(&packets[1]), body(&packets[2]));
    assert_eq!([packets[0][0], packets[1][0], packets[2][0]], [0x10, 0x11, 0x12]);
    // The direction matters too: B's data key is not A's.
    let b_sealed = b_data.seal(&plaintext, now).unwrap();
    assert_ne!(body(&b_sealed), body(&packets[1]));

    let receivers: [&mut weft_core::transport::Session; 3] =
        [&mut b_control, &mut b_data, &mut b_fast];
    for (to, receiver) in receivers.into_iter().enumerate() {
        for (from, packet) in packets.iter().enumerate() {
            if from == to {
                continue;
            }
            // As sent: refused by its type byte.
            assert_eq!(receiver.open(packet, now), Err(TransportError::WrongChannel));
            // Relabelled for this channel: the keys (and the header in the AAD) differ.
            let mut relabelled = packet.clone();
            relabelled[0] = receiver.channel().packet_type();
            assert_eq!(receiver.open(&relabelled, now), Err(TransportError::Authentication));
        }
        // Its own packet still opens: the refusals changed no state.
        assert_eq!(receiver.open(&packets[to], now).unwrap(), plaintext);
    }
}

/// The control channel's keys and packets are byte for byte those of the release before
/// each channel had its own (values recorded by running this handshake there): peers of
/// both releases still handshake and talk on it, with handshake version 1.
#[test]
fn control_channel_packets_are_unchanged_from_the_single_transport_release() {
    use weft_core::transport::DATA_PACKET_TYPE;
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut rng = ChaCha20Rng::seed_from_u64(12);
    let secret = NetworkSecret::from_random_bytes([9; 32]);
    let id_i = IdentityKeyPair::from_secret_bytes(&[0x11; 32]);
    let id_r = IdentityKeyPair::from_secret_bytes(&[0x22; 32]);
    let bi = ChannelBinding::new("sha-256 AA", "sha-256 BB").unwrap();
    let br = ChannelBinding::new("sha-256 BB", "sha-256 AA").unwrap();
    let (mut init, m1) = HandshakeInitiator::new(&mut rng, &id_i, &secret, &bi);
    let mut resp = HandshakeResponder::new(&id_r, &secret, &br);
    let m2 = resp.handle(&m1, &mut rng).unwrap().message.unwrap();
    let step = init.handle(&m2, &mut rng).unwrap();
    let m3 = step.message.unwrap();
    let a = step.established.unwrap();
    let b = resp.handle(&m3, &mut rng).unwrap().established.unwrap();
    let (mut a_control, mut b_control, mut a_data) = (a.session, b.session, a.data);
    let now = std::time::Duration::ZERO;
    assert_eq!(
        hex(a_control.session_id()),
        "c672ba35fb96503bf0bab78950339c95b0f0b0f3b2cbdd85ffb60f76e92259f1"
    );
    assert_eq!(
        hex(&a_control.seal(b"from the initiator", now).unwrap()),
        "1000000000000000000000000018cea57e0fedad2b04be975c3619d4bdc4dd4eb2dfec0263309f97ded8d59ba41c55"
    );
    assert_eq!(
        hex(&b_control.seal(b"from the responder", now).unwrap()),
        "1000000000000000000000000051440cfb87d1d7953c3b243f44980c319a6f929d15b2dfde99d69988deca8c8f2963"
    );
    // The data channel's are new.
    let data = a_data.seal(b"from the initiator", now).unwrap();
    assert_eq!(data[0], DATA_PACKET_TYPE);
    assert_ne!(
        hex(&data[1..]),
        "000000000000000000000018cea57e0fedad2b04be975c3619d4bdc4dd4eb2dfec0263309f97ded8d59ba41c55"
    );
}
