//! Frames: what travels inside transport packets.
//!
//! A packet's plaintext is a sequence of frames, each `type (1 byte) | length (u32 big
//! endian) | body`. Parsers never panic and never allocate more than the input's size.
//! Unknown frame types decode as [`Frame::Unknown`], so a receiver can skip what a newer
//! peer sends; types [`FILE_TRANSFER_TYPES`] are reserved for file transfer.

use std::ops::RangeInclusive;

/// Bytes before a frame's body: type and length.
pub const FRAME_HEADER_LEN: usize = 5;

/// Largest frame body, in bytes.
pub const MAX_FRAME_BODY: usize = 16 * 1024 * 1024;

/// Frame type of [`Frame::Message`].
pub const FRAME_MESSAGE: u8 = 0x01;
/// Frame type of [`Frame::Data`].
pub const FRAME_DATA: u8 = 0x02;
/// Frame type of [`Frame::Ping`].
pub const FRAME_PING: u8 = 0x03;
/// Frame type of [`Frame::Pong`].
pub const FRAME_PONG: u8 = 0x04;
/// Frame type of [`Frame::Close`].
pub const FRAME_CLOSE: u8 = 0x05;
/// Frame type of [`Frame::Hello`].
pub const FRAME_HELLO: u8 = 0x06;
/// Frame type of a route announcement (weft-core's `node::Announcement`): decoded as
/// [`Frame::Unknown`] here, by the node's routing code.
pub const FRAME_ROUTES: u8 = 0x07;
/// Frame type of a fast-path probe or ack (weft-core's `node::FastPathMessage`), only ever in a
/// packet of the fast path: decoded as [`Frame::Unknown`] here, by the node.
pub const FRAME_FAST_PATH: u8 = 0x08;
/// Longest display name in a [`Frame::Hello`], in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Frame types reserved for file transfer (offer, accept, chunk, ack, cancel...).
pub const FILE_TRANSFER_TYPES: RangeInclusive<u8> = 0x20..=0x3f;

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// A chat message (UTF-8 text).
    Message(String),
    /// An IP packet of the overlay (sent on the data channel).
    Data(Vec<u8>),
    /// Asks the peer to answer with a [`Frame::Pong`] carrying the same timestamp.
    Ping {
        /// The sender's clock when it sent the ping, in a unit it chooses (say µs).
        timestamp: u64,
    },
    /// Answer to a [`Frame::Ping`]; the round trip time is now minus `timestamp`.
    Pong {
        /// The timestamp of the ping answered.
        timestamp: u64,
    },
    /// The sender closes the session.
    Close {
        /// Why (application-defined; 0 means normal closure).
        code: u16,
    },
    /// The sender's display name, sent once when a session is established (UTF-8, at
    /// most [`MAX_NAME_LEN`] bytes).
    Hello {
        /// The name the sender's user chose.
        name: String,
    },
    /// A frame of a type this version does not know (including the reserved file-transfer
    /// range). Build it only with such a type: one of the known types would encode as, and
    /// decode to, that known frame instead.
    Unknown {
        /// The frame type byte.
        frame_type: u8,
        /// The body, uninterpreted.
        body: Vec<u8>,
    },
}

/// Why bytes are not a valid frame sequence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The input ends inside a frame header or body.
    #[error("truncated frame")]
    Truncated,
    /// A body is longer than [`MAX_FRAME_BODY`].
    #[error("frame body longer than {MAX_FRAME_BODY} bytes")]
    TooLarge,
    /// A message frame is not UTF-8.
    #[error("message frame is not valid UTF-8")]
    InvalidUtf8,
    /// A fixed-size frame has the wrong body length.
    #[error("frame type {frame_type:#04x} must have a {expected}-byte body, got {got}")]
    BadLength {
        /// The frame type.
        frame_type: u8,
        /// The body length it requires.
        expected: usize,
        /// The body length received.
        got: usize,
    },
}

impl Frame {
    /// The frame's type byte.
    pub fn frame_type(&self) -> u8 {
        match self {
            Self::Message(_) => FRAME_MESSAGE,
            Self::Data(_) => FRAME_DATA,
            Self::Ping { .. } => FRAME_PING,
            Self::Pong { .. } => FRAME_PONG,
            Self::Close { .. } => FRAME_CLOSE,
            Self::Hello { .. } => FRAME_HELLO,
            Self::Unknown { frame_type, .. } => *frame_type,
        }
    }

    fn body_len(&self) -> usize {
        match self {
            Self::Message(s) | Self::Hello { name: s } => s.len(),
            Self::Data(d) | Self::Unknown { body: d, .. } => d.len(),
            Self::Ping { .. } | Self::Pong { .. } => 8,
            Self::Close { .. } => 2,
        }
    }

    /// Encoded size in bytes, header included.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_LEN + self.body_len()
    }

    /// Appends the encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let len = self.body_len();
        out.reserve(FRAME_HEADER_LEN + len);
        push_header(out, self.frame_type(), len)?;
        match self {
            Self::Message(s) | Self::Hello { name: s } => out.extend_from_slice(s.as_bytes()),
            Self::Data(d) | Self::Unknown { body: d, .. } => out.extend_from_slice(d),
            Self::Ping { timestamp } | Self::Pong { timestamp } => {
                out.extend_from_slice(&timestamp.to_be_bytes())
            }
            Self::Close { code } => out.extend_from_slice(&code.to_be_bytes()),
        }
        Ok(())
    }

    /// The encoding of this one frame.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::with_capacity(self.encoded_len().min(MAX_FRAME_BODY));
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Decodes the first frame of `buf`; returns it and the number of bytes it used.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), FrameError> {
        let (&frame_type, rest) = buf.split_first().ok_or(FrameError::Truncated)?;
        let len_bytes: [u8; 4] =
            rest.get(..4).and_then(|s| s.try_into().ok()).ok_or(FrameError::Truncated)?;
        let len =
            usize::try_from(u32::from_be_bytes(len_bytes)).map_err(|_| FrameError::TooLarge)?;
        if len > MAX_FRAME_BODY {
            return Err(FrameError::TooLarge);
        }
        let body = rest.get(4..).and_then(|r| r.get(..len)).ok_or(FrameError::Truncated)?;
        let frame = match frame_type {
            FRAME_MESSAGE => Self::Message(
                std::str::from_utf8(body).map_err(|_| FrameError::InvalidUtf8)?.to_owned(),
            ),
            FRAME_DATA => Self::Data(body.to_vec()),
            FRAME_PING => Self::Ping { timestamp: u64::from_be_bytes(fixed(frame_type, body)?) },
            FRAME_PONG => Self::Pong { timestamp: u64::from_be_bytes(fixed(frame_type, body)?) },
            FRAME_CLOSE => Self::Close { code: u16::from_be_bytes(fixed(frame_type, body)?) },
            FRAME_HELLO => {
                if body.len() > MAX_NAME_LEN {
                    return Err(FrameError::TooLarge);
                }
                let name = std::str::from_utf8(body).map_err(|_| FrameError::InvalidUtf8)?;
                Self::Hello { name: name.to_owned() }
            }
            other => Self::Unknown { frame_type: other, body: body.to_vec() },
        };
        Ok((frame, FRAME_HEADER_LEN + len))
    }

    /// Decodes a plaintext that `buf` holds from `start` on, reusing `buf` as the body of
    /// a frame that is the only one and carries bytes ([`Frame::Data`], [`Frame::Unknown`]):
    /// a 64 KiB file chunk then costs one move within its buffer instead of a new buffer
    /// and a copy. Accepts and rejects exactly what [`Self::decode_all`] does on
    /// `&buf[start..]`. Any other plaintext is decoded from the slice and `buf` is
    /// erased (it held plaintext).
    pub fn decode_all_owned(mut buf: Vec<u8>, start: usize) -> Result<Vec<Self>, FrameError> {
        let plaintext = buf.get(start..).unwrap_or_default();
        if let (Some(&frame_type), Some(len)) = (plaintext.first(), plaintext.get(1..5)) {
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let bytes_frame = !matches!(
                frame_type,
                FRAME_MESSAGE | FRAME_PING | FRAME_PONG | FRAME_CLOSE | FRAME_HELLO
            );
            if bytes_frame && len <= MAX_FRAME_BODY && plaintext.len() == FRAME_HEADER_LEN + len {
                buf.drain(..start + FRAME_HEADER_LEN);
                return Ok(vec![match frame_type {
                    FRAME_DATA => Self::Data(buf),
                    _ => Self::Unknown { frame_type, body: buf },
                }]);
            }
        }
        let frames = Self::decode_all(plaintext);
        zeroize::Zeroize::zeroize(&mut buf);
        frames
    }

    /// Decodes a whole packet plaintext: zero or more frames, back to back.
    pub fn decode_all(mut buf: &[u8]) -> Result<Vec<Self>, FrameError> {
        let mut frames = Vec::new();
        while !buf.is_empty() {
            let (frame, used) = Self::decode(buf)?;
            frames.push(frame);
            buf = buf.get(used..).unwrap_or_default();
        }
        Ok(frames)
    }
}

fn push_header(out: &mut Vec<u8>, frame_type: u8, len: usize) -> Result<(), FrameError> {
    if len > MAX_FRAME_BODY {
        return Err(FrameError::TooLarge);
    }
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge)?;
    out.push(frame_type);
    out.extend_from_slice(&len32.to_be_bytes());
    Ok(())
}

/// Appends one frame whose body `body` appends to `out` and whose type it returns: the
/// body is written once, where the frame goes (a file chunk straight into the packet),
/// instead of into a buffer of its own first.
pub fn encode_frame_with(
    out: &mut Vec<u8>,
    body: impl FnOnce(&mut Vec<u8>) -> u8,
) -> Result<u8, FrameError> {
    let at = out.len();
    push_header(out, 0, 0)?;
    let frame_type = body(out);
    let len = out.len() - at - FRAME_HEADER_LEN;
    if len > MAX_FRAME_BODY {
        return Err(FrameError::TooLarge);
    }
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge)?;
    out[at] = frame_type;
    out[at + 1..at + FRAME_HEADER_LEN].copy_from_slice(&len32.to_be_bytes());
    Ok(frame_type)
}

/// Encodes frames back to back, for one packet.
pub fn encode_frames(frames: &[Frame]) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    for f in frames {
        f.encode_into(&mut out)?;
    }
    Ok(out)
}

fn fixed<const N: usize>(frame_type: u8, body: &[u8]) -> Result<[u8; N], FrameError> {
    body.try_into().map_err(|_| FrameError::BadLength { frame_type, expected: N, got: body.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_frames_round_trip() {
        let frames = vec![
            Frame::Message("héllo".into()),
            Frame::Data(vec![1, 2, 3]),
            Frame::Ping { timestamp: 42 },
            Frame::Pong { timestamp: u64::MAX },
            Frame::Close { code: 7 },
            Frame::Unknown { frame_type: 0x21, body: vec![9; 4] },
            Frame::Message(String::new()),
        ];
        let bytes = encode_frames(&frames).unwrap();
        assert_eq!(Frame::decode_all(&bytes).unwrap(), frames);
    }

    #[test]
    fn a_frame_encoded_with_a_body_writer_is_the_same_frame() {
        let mut out = vec![9];
        let t = encode_frame_with(&mut out, |body| {
            body.extend_from_slice(&[4; 300]);
            0x25
        })
        .unwrap();
        assert_eq!(t, 0x25);
        let frame = Frame::Unknown { frame_type: 0x25, body: vec![4; 300] };
        assert_eq!(out[1..], frame.encode().unwrap());
    }

    proptest::proptest! {
        #[test]
        fn decoding_an_owned_buffer_is_decoding_its_bytes(
            buf in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            start in 0usize..8,
            lone in proptest::prelude::any::<bool>(),
            frame_type in proptest::prelude::any::<u8>(),
        ) {
            // Arbitrary bytes rarely make one whole frame: `lone` makes one of them.
            let mut buf = buf;
            if lone && buf.len() >= start + FRAME_HEADER_LEN {
                let len = (buf.len() - start - FRAME_HEADER_LEN) as u32;
                buf[start] = frame_type;
                buf[start + 1..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
            }
            let want = Frame::decode_all(buf.get(start..).unwrap_or_default());
            proptest::prop_assert_eq!(Frame::decode_all_owned(buf, start), want);
        }
    }

    #[test]
    fn bad_inputs() {
        assert_eq!(Frame::decode(&[]), Err(FrameError::Truncated));
        assert_eq!(Frame::decode(&[1, 0, 0]), Err(FrameError::Truncated));
        assert_eq!(Frame::decode(&[1, 0, 0, 0, 2, b'a']), Err(FrameError::Truncated));
        assert_eq!(Frame::decode(&[1, 0, 0, 0, 1, 0xff]), Err(FrameError::InvalidUtf8));
        assert_eq!(
            Frame::decode(&[3, 0, 0, 0, 1, 0]),
            Err(FrameError::BadLength { frame_type: 3, expected: 8, got: 1 })
        );
        assert_eq!(Frame::decode(&[2, 0xff, 0xff, 0xff, 0xff]), Err(FrameError::TooLarge));
    }
}
