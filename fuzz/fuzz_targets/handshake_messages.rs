//! Arbitrary bytes as each handshake message a peer can receive: to a fresh responder
//! (expecting Init), to an initiator that sent Init (expecting Response) and to a
//! responder that answered a real Init (expecting Finish). Identities, network secret and
//! randomness come from fixed seeds (see `src/lib.rs`).
//!
//! Properties: nothing panics; a side accepts only the exact message the real peer sent
//! (every byte is under a MAC), anything else ends its handshake for good; a Reject it
//! would send back parses as a Reject on the other side.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use weft_core::handshake::{
    HandshakeError, HandshakeStep, MSG_FINISH, MSG_REJECT, MSG_RESPONSE, MessageKind, REJECT_LEN,
    message_kind,
};
use weft_fuzz::{Handshake, fresh_responder, handshake, initiator_after_init, rng};

/// The fixture handshake's messages (the same every run).
fn real() -> &'static Handshake {
    static REAL: OnceLock<Handshake> = OnceLock::new();
    REAL.get_or_init(handshake)
}

/// Checks one `handle` result of a side that expected `expected`.
fn check(
    result: Result<HandshakeStep, HandshakeError>,
    waiting: bool,
    data: &[u8],
    expected: &[u8],
    side: &str,
) {
    match result {
        Ok(_) => assert_eq!(data, expected, "{side} accepted a message the peer never sent"),
        Err(err) => {
            assert!(!waiting, "{side} still waits after {err:?}");
            if let Some(reject) = err.reject_message() {
                assert_eq!(reject.len(), REJECT_LEN);
                assert_eq!(reject[0], MSG_REJECT);
                assert_eq!(message_kind(&reject), Some(MessageKind::Handshake));
                // The peer reads our Reject as one, whatever state it is in (a fresh
                // responder is the cheapest to build).
                let mut peer = fresh_responder();
                assert!(matches!(
                    peer.handle(&reject, &mut rng(20)),
                    Err(HandshakeError::Rejected(_))
                ));
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let real = real();
    let _ = message_kind(data);

    // A responder waiting for Init: cheap to build, so it sees every input.
    let mut responder = fresh_responder();
    let result = responder.handle(data, &mut rng(10));
    let accepted = result.is_ok();
    check(result, responder.is_waiting(), data, &real.init, "fresh responder");
    if !accepted {
        assert_eq!(
            responder.handle(&real.init, &mut rng(10)).err(),
            Some(HandshakeError::NotWaiting),
            "a failed responder took another message"
        );
    }

    // The other two states cost an X-Wing key generation or a whole Init (a millisecond or
    // more, instrumented): each sees only the inputs with its own message's type byte.
    // Wrong types and Rejects take the same parsing path in every state, and the fresh
    // responder already covers it.
    let kind = data.first().copied();

    // An initiator that sent Init, waiting for the Response.
    if matches!(kind, Some(MSG_RESPONSE)) {
        let (mut initiator, init) = initiator_after_init();
        assert_eq!(init, real.init);
        let result = initiator.handle(data, &mut rng(3));
        check(result, initiator.is_waiting(), data, &real.response, "initiator");
        assert!(!initiator.is_waiting(), "the initiator handles exactly one message");
    }

    // A responder that answered the real Init, waiting for Finish.
    if matches!(kind, Some(MSG_FINISH)) {
        let mut responder = fresh_responder();
        let step = responder.handle(&real.init, &mut rng(2));
        assert!(step.is_ok_and(|s| s.message.as_deref() == Some(&real.response[..])));
        let result = responder.handle(data, &mut rng(4));
        check(result, responder.is_waiting(), data, &real.finish, "responder after Init");
        assert!(!responder.is_waiting(), "the responder is done after Finish");
    }
});
