//! TURN over TCP and TLS framing: RFC 8656 §3.1 (RFC 5766 §2.1) and RFC 7065. Over a
//! stream a TURN client and server exchange the same STUN and ChannelData messages as over
//! UDP, back to back, each ChannelData padded to a multiple of four bytes.
//!
//! [`TurnStreamDecoder`] cuts what a TURN server sends into those messages. It is the one
//! parser of untrusted bytes in Weft's TURN-over-TCP client (the vendored webrtc's
//! `transport/turn_stream.rs`, which runs the connections), kept in a crate of its own so
//! the fuzz targets (`fuzz/`, which cannot build all of webrtc quickly) can drive it.
//!
//! Hand-written: a dozen lines over two fixed headers, and the crates that frame TURN over
//! TCP (coturn, pion) are not Rust; `rtc`'s `TcpFrameDecoder` is RFC 4571's framing
//! (ICE-TCP), not this one.
#![forbid(unsafe_code)]

use bytes::BytesMut;

/// STUN header: type, length, magic cookie, transaction id.
pub const STUN_HEADER_LEN: usize = 20;
/// RFC 5389 §6.
pub const STUN_MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
/// ChannelData header: channel number and length.
pub const CHANNEL_DATA_HEADER_LEN: usize = 4;
/// The most a decoder holds: one incomplete message (both length fields are 16 bits, so a
/// STUN message is at most this) plus the piece that last arrived.
pub const MAX_MESSAGE_LEN: usize = STUN_HEADER_LEN + u16::MAX as usize;

/// Why a stream from a TURN server could not be cut into messages. The stream must be
/// closed: nothing after a bad frame can be trusted to start at a message boundary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TurnFramingError {
    /// The first two bits say neither STUN (`00`) nor ChannelData (`01`).
    #[error("neither STUN nor ChannelData (first byte {0:#04x})")]
    UnknownFrame(u8),
    /// A STUN header without the magic cookie.
    #[error("a STUN header without the magic cookie")]
    NoMagicCookie,
}

/// Cuts a byte stream from a TURN server into STUN and ChannelData messages (RFC 8656
/// §3.1, §12.5). Bytes go in as they arrive, in pieces of any size; whole messages come
/// out, ChannelData without its padding. Holds at most one incomplete message (under
/// [`MAX_MESSAGE_LEN`]) plus what the last read brought.
#[derive(Debug, Default)]
pub struct TurnStreamDecoder {
    buf: BytesMut,
}

impl TurnStreamDecoder {
    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet handed out as a message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole message, if one has arrived. After an error the stream is broken
    /// and the decoder should be dropped (it keeps returning the same error).
    pub fn next_message(&mut self) -> Result<Option<BytesMut>, TurnFramingError> {
        if self.buf.len() < CHANNEL_DATA_HEADER_LEN {
            return Ok(None);
        }
        let declared = usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]]));
        let (message_len, frame_len) = match self.buf[0] >> 6 {
            0b00 => {
                if self.buf.len() >= 8 && self.buf[4..8] != STUN_MAGIC_COOKIE {
                    return Err(TurnFramingError::NoMagicCookie);
                }
                (STUN_HEADER_LEN + declared, STUN_HEADER_LEN + declared)
            }
            0b01 => {
                let message_len = CHANNEL_DATA_HEADER_LEN + declared;
                (message_len, message_len.next_multiple_of(4))
            }
            _ => return Err(TurnFramingError::UnknownFrame(self.buf[0])),
        };
        if self.buf.len() < frame_len {
            return Ok(None);
        }
        let mut frame = self.buf.split_to(frame_len);
        frame.truncate(message_len);
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A STUN Binding request with `attr_len` bytes of attributes.
    fn stun(attr_len: u16, fill: u8) -> Vec<u8> {
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&attr_len.to_be_bytes());
        m.extend_from_slice(&STUN_MAGIC_COOKIE);
        m.extend_from_slice(&[7; 12]);
        m.extend(std::iter::repeat_n(fill, usize::from(attr_len)));
        m
    }

    /// A ChannelData message on 0x4001 carrying `len` bytes, padded as over TCP.
    fn channel_data(len: u16, fill: u8) -> (Vec<u8>, Vec<u8>) {
        let mut m = vec![0x40, 0x01];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(fill, usize::from(len)));
        let unpadded = m.clone();
        m.resize(m.len().next_multiple_of(4), 0);
        (m, unpadded)
    }

    fn drain(decoder: &mut TurnStreamDecoder) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(m) = decoder.next_message().expect("valid stream") {
            out.push(m.to_vec());
        }
        out
    }

    /// Several messages back to back (STUN, padded and unpadded-length ChannelData, an
    /// empty ChannelData), fed in pieces of every size from 1 byte to all at once: the same
    /// messages come out, in order, without padding, and nothing is left over.
    #[test]
    fn messages_survive_every_split() {
        let (cd3, cd3_msg) = channel_data(3, 0xaa);
        let (cd8, cd8_msg) = channel_data(8, 0xbb);
        let (cd0, cd0_msg) = channel_data(0, 0);
        let (cd1201, cd1201_msg) = channel_data(1201, 0xcc);
        let stream: Vec<u8> = [stun(8, 1), cd3, cd8, stun(0, 2), cd0, cd1201].concat();
        let expected = vec![stun(8, 1), cd3_msg, cd8_msg, stun(0, 2), cd0_msg, cd1201_msg];
        for piece in 1..=stream.len() {
            let mut decoder = TurnStreamDecoder::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(piece) {
                decoder.extend(chunk);
                got.extend(drain(&mut decoder));
            }
            assert_eq!(got, expected, "pieces of {piece} bytes");
            assert_eq!(decoder.buffered(), 0, "pieces of {piece} bytes left bytes behind");
        }
    }

    /// A message is not handed out before its padding has arrived, so the next one starts
    /// where the stream says.
    #[test]
    fn channel_data_waits_for_its_padding() {
        let (padded, message) = channel_data(5, 0x11);
        let mut decoder = TurnStreamDecoder::default();
        decoder.extend(&padded[..message.len()]);
        assert_eq!(decoder.next_message(), Ok(None));
        decoder.extend(&padded[message.len()..]);
        assert_eq!(decoder.next_message().unwrap().unwrap().to_vec(), message);
        decoder.extend(&stun(4, 9));
        assert_eq!(decoder.next_message().unwrap().unwrap().to_vec(), stun(4, 9));
    }

    #[test]
    fn garbage_closes_the_stream() {
        let mut decoder = TurnStreamDecoder::default();
        decoder.extend(&[0x80, 0x00, 0x00, 0x04]);
        assert_eq!(decoder.next_message(), Err(TurnFramingError::UnknownFrame(0x80)));

        // A TLS server behind a `turn:…?transport=tcp` URL: its first record is no STUN.
        let mut decoder = TurnStreamDecoder::default();
        decoder.extend(&[0x16, 0x03, 0x03, 0x00, 0x7a, 0x02, 0x00, 0x00, 0x76]);
        assert_eq!(decoder.next_message(), Err(TurnFramingError::NoMagicCookie));

        let mut decoder = TurnStreamDecoder::default();
        let mut bad = stun(0, 0);
        bad[4] = 0;
        decoder.extend(&bad);
        assert_eq!(decoder.next_message(), Err(TurnFramingError::NoMagicCookie));
    }

    /// Arbitrary bytes never panic and never make the decoder hold more than one message
    /// and the last piece. (The fuzz target `turn_stream_framing` does this with coverage
    /// guidance and checks what comes out against the input.)
    #[test]
    fn arbitrary_bytes_are_refused_or_framed_without_panicking() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2000 {
            let mut decoder = TurnStreamDecoder::default();
            for _ in 0..8 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let len = (seed % 300) as usize;
                let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 56)) as u8).collect();
                decoder.extend(&bytes);
                while let Ok(Some(_)) = decoder.next_message() {}
                assert!(decoder.buffered() <= MAX_MESSAGE_LEN + 300);
            }
        }
    }
}
