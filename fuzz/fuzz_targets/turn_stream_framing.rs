//! `TurnStreamDecoder` (TURN over TCP and TLS, RFC 8656 §3.1) on an arbitrary stream from a
//! TURN server: the first byte picks how the stream is cut into reads (1 to 256 bytes), the
//! rest is the stream. Never panics; cut into reads or fed whole, the same messages (and
//! the same error) come out; each message is the stream's next bytes, as long as its header
//! says, and only ChannelData skips padding (at most 3 bytes) after it; the decoder holds no
//! more than one message and the last read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_turn_framing::{
    CHANNEL_DATA_HEADER_LEN, MAX_MESSAGE_LEN, STUN_HEADER_LEN, STUN_MAGIC_COOKIE, TurnFramingError,
    TurnStreamDecoder,
};

/// What a decoder fed `stream` in reads of `read` bytes handed out: the messages, the error
/// that ended the stream if one did, and the bytes it still held.
fn decode(stream: &[u8], read: usize) -> (Vec<Vec<u8>>, Option<TurnFramingError>, usize) {
    let mut decoder = TurnStreamDecoder::default();
    let mut messages = Vec::new();
    for piece in stream.chunks(read) {
        decoder.extend(piece);
        loop {
            match decoder.next_message() {
                Ok(Some(message)) => messages.push(message.to_vec()),
                Ok(None) => break,
                Err(e) => return (messages, Some(e), decoder.buffered()),
            }
        }
        assert!(decoder.buffered() <= MAX_MESSAGE_LEN + read, "held {}", decoder.buffered());
    }
    (messages, None, decoder.buffered())
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else { return };
    let (messages, error, held) = decode(stream, stream.len().max(1));
    let (in_reads, error_in_reads, _) = decode(stream, usize::from(cut) + 1);
    assert_eq!(messages, in_reads, "reads of {} bytes changed the messages", cut + 1);
    assert_eq!(error, error_in_reads);

    let mut at = 0;
    for message in &messages {
        assert!(message.len() >= CHANNEL_DATA_HEADER_LEN);
        assert_eq!(&stream[at..at + message.len()], &message[..], "not the stream's bytes");
        let declared = usize::from(u16::from_be_bytes([message[2], message[3]]));
        at += match message[0] >> 6 {
            0b00 => {
                assert_eq!(message.len(), STUN_HEADER_LEN + declared);
                assert_eq!(message[4..8], STUN_MAGIC_COOKIE);
                message.len()
            }
            0b01 => {
                assert_eq!(message.len(), CHANNEL_DATA_HEADER_LEN + declared);
                message.len().next_multiple_of(4)
            }
            kind => panic!("a message of kind {kind:#b} came out"),
        };
    }
    // What is left is where the error was found, or less than one whole frame.
    assert_eq!(held, stream.len() - at);
    if error.is_none() && held >= CHANNEL_DATA_HEADER_LEN {
        let declared = usize::from(u16::from_be_bytes([stream[at + 2], stream[at + 3]]));
        let frame = match stream[at] >> 6 {
            0b00 => STUN_HEADER_LEN + declared,
            _ => (CHANNEL_DATA_HEADER_LEN + declared).next_multiple_of(4),
        };
        assert!(held < frame, "{held} bytes held, a whole frame of {frame} among them");
    }
});
