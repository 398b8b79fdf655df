//! File-transfer messages: the bodies of frames 0x20..=0x2c inside the encrypted session.
//!
//! Integers are big endian; strings are UTF-8 with a u16 length; lists have a u32 count.
//! Decoding never panics, never allocates more than the input's size, and rejects
//! trailing bytes, unsafe paths and counts beyond the limits below.

use super::cap::{Capability, Proof};
use super::hash::{CHUNK_LEN, Cv, Root};

/// Most items in one offer frame ([`TransferMsg::Offer`] or [`TransferMsg::OfferPart`]);
/// a larger offer travels in several (see `super::limits`).
pub const MAX_OFFER_ITEMS: usize = 10_000;
/// Longest relative path in an offer, in bytes.
pub const MAX_PATH_LEN: usize = 1024;
/// Most chaining values in one [`TransferMsg::Hashes`] (64 KiB of them).
pub const MAX_HASHES_PER_MSG: usize = 2048;
/// Longest reason text.
pub const MAX_REASON_LEN: usize = 256;

/// Bytes of a chunk's body before its data: the root and the index.
const CHUNK_HEADER_LEN: usize = 32 + 4;

/// Frame types (within [`crate::frame::FILE_TRANSFER_TYPES`]).
mod ty {
    pub const OFFER: u8 = 0x20;
    pub const ANSWER: u8 = 0x21;
    pub const HASH_REQUEST: u8 = 0x22;
    pub const HASHES: u8 = 0x23;
    pub const CHUNK_REQUEST: u8 = 0x24;
    pub const CHUNK: u8 = 0x25;
    pub const MISSING: u8 = 0x26;
    pub const CANCEL: u8 = 0x27;
    pub const QUERY: u8 = 0x28;
    pub const HAVE: u8 = 0x29;
    pub const COMPLETE: u8 = 0x2a;
    pub const ROOT: u8 = 0x2b;
    pub const OFFER_PART: u8 = 0x2c;
}

/// One file in an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferItem {
    /// Relative path, `/`-separated, checked by [`check_path`].
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// The key the file is offered under: its BLAKE3 hash, or (if `streamed`) a stream
    /// key, the root following in [`TransferMsg::Root`] once the sender has hashed it.
    pub root: Root,
    /// Whether `root` is a stream key rather than the file's hash.
    pub streamed: bool,
    /// The sender's capability for this file: a fetch proves it ([`Capability::proof`]).
    pub cap: Capability,
}

/// A file-transfer message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferMsg {
    /// "I'd like to send you these files."
    Offer {
        /// Chosen by the sender, unique per receiver.
        offer_id: u64,
        /// The files.
        items: Vec<OfferItem>,
    },
    /// The receiver accepts or declines an offer.
    Answer {
        /// Which offer.
        offer_id: u64,
        /// Whether the receiver wants it.
        accept: bool,
    },
    /// Asks for `count` chaining values of `root` starting at chunk `first`. Answered in
    /// [`TransferMsg::Hashes`] of at most [`MAX_HASHES_PER_MSG`] each; for a file still
    /// being hashed the request stays open until the sender has hashed that far, and
    /// ends with [`TransferMsg::Root`].
    HashRequest {
        /// The file.
        root: Root,
        /// The asker's proof of a capability for the file.
        proof: Proof,
        /// First chunk.
        first: u32,
        /// How many.
        count: u32,
    },
    /// Chaining values of `root` from chunk `first` on.
    Hashes {
        /// The file.
        root: Root,
        /// First chunk.
        first: u32,
        /// The values.
        cvs: Vec<Cv>,
    },
    /// Asks for one chunk.
    ChunkRequest {
        /// The file.
        root: Root,
        /// The asker's proof of a capability for the file.
        proof: Proof,
        /// Which chunk.
        index: u32,
    },
    /// One chunk's bytes (at most [`CHUNK_LEN`]).
    Chunk {
        /// The file.
        root: Root,
        /// Which chunk.
        index: u32,
        /// Its bytes.
        data: Vec<u8>,
    },
    /// The sender cannot serve `root` (any more): the asker should use other sources.
    Missing {
        /// The file.
        root: Root,
        /// Why, for people.
        reason: String,
    },
    /// Either side abandons an offer; the receiver discards what it got.
    Cancel {
        /// Which offer (as its sender numbered it).
        offer_id: u64,
        /// Whether the offer is the canceller's own (it was sending); otherwise it is
        /// the recipient's (the canceller was receiving).
        own_offer: bool,
        /// Why, for people.
        reason: String,
    },
    /// "Do you hold `root`, and may I fetch it?" (multi-source discovery, resume).
    Query {
        /// The file.
        root: Root,
        /// The asker's proof of a capability for the file.
        proof: Proof,
    },
    /// "I hold all of `root`, and your proof opens it": add me as a source.
    Have {
        /// The file.
        root: Root,
        /// The proof of the query answered (which of the asker's capabilities it took).
        proof: Proof,
    },
    /// The receiver verified and stored `root` completely.
    Complete {
        /// The file.
        root: Root,
    },
    /// The BLAKE3 hash of the file offered under the stream key `key`, once the sender
    /// has hashed all of it.
    Root {
        /// The stream key.
        key: Root,
        /// The file's hash.
        root: Root,
    },
    /// The first items of an offer too large for one frame: the receiver keeps them
    /// until the [`TransferMsg::Offer`] of the same `offer_id` brings the last ones, and
    /// only then sees one offer. Encoded as an `Offer`.
    OfferPart {
        /// The offer they belong to.
        offer_id: u64,
        /// Some of its files, in order.
        items: Vec<OfferItem>,
    },
}

/// Why bytes are not a valid file-transfer message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Not a file-transfer frame type this version knows.
    #[error("unknown file-transfer message type {0:#04x}")]
    UnknownType(u8),
    /// The body ends early.
    #[error("truncated file-transfer message")]
    Truncated,
    /// Bytes after the message.
    #[error("trailing bytes after a file-transfer message")]
    Trailing,
    /// A string is not UTF-8 or too long.
    #[error("bad text in a file-transfer message")]
    BadText,
    /// A count or size over the limits.
    #[error("file-transfer message over the limits")]
    TooLarge,
    /// A path that could escape the download folder, plant a hidden file, or is not
    /// portable.
    #[error("unsafe path in an offer: {path:?} ({problem})")]
    UnsafePath {
        /// The path, cut to 80 characters, with hidden characters shown escaped.
        path: String,
        /// What is wrong with it.
        problem: PathProblem,
    },
    /// An offer with a path [`check_path`] refuses: the whole offer is refused, and the
    /// receiver tells the sender why (so it is not left waiting for an answer).
    #[error("offer {offer_id} refused: unsafe path {path:?} ({problem})")]
    UnsafeOffer {
        /// The offer, numbered by its sender.
        offer_id: u64,
        /// The first unsafe path, cut to 80 characters, hidden characters escaped.
        path: String,
        /// What is wrong with it.
        problem: PathProblem,
    },
}

/// What makes a path unsafe to save (see [`check_path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathProblem {
    /// Empty, or longer than [`MAX_PATH_LEN`] bytes, or a part longer than 255.
    #[error("empty or too long")]
    Length,
    /// An empty part: a leading or trailing `/`, or `//`.
    #[error("an empty part")]
    EmptyPart,
    /// A part starting with a dot: `.`, `..`, or a hidden file such as `.bashrc` or
    /// `.ssh`, which a download must never create.
    #[error("a part starts with a dot")]
    LeadingDot,
    /// A part ending with a dot or a space, which Windows drops (so `a.` would be `a`).
    #[error("a part ends with a dot or a space")]
    TrailingDotOrSpace,
    /// A part that is a Windows device name (`CON`, `nul.txt`, `COM1`...).
    #[error("a reserved device name")]
    DeviceName,
    /// A control, format or bidirectional character, or a line separator (see
    /// [`crate::text::is_hidden`]).
    #[error("a hidden or control character")]
    HiddenCharacter,
    /// A backslash or a colon (a separator or a drive or stream on other systems).
    #[error("a backslash or a colon")]
    Separator,
}

/// Checks that `path` is a relative, `/`-separated path that is safe to create inside the
/// folder it is saved into, on any system: it cannot leave the folder, create a hidden
/// file or folder (`.ssh/authorized_keys`, `.bashrc`), open a device, or show a reader
/// something other than what it is. At most [`MAX_PATH_LEN`] bytes; see [`PathProblem`]
/// for each rule.
pub fn check_path(path: &str) -> Result<(), WireError> {
    path_problem(path).map_or(Ok(()), |problem| {
        Err(WireError::UnsafePath {
            path: path.chars().take(80).collect::<String>().escape_debug().to_string(),
            problem,
        })
    })
}

/// What a sender does with a path [`check_path`] refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsendable {
    /// A file or folder inside a folder being sent (`photos/.DS_Store`, `src/.git`): the
    /// rest of the folder goes, this is left out, and the user is told.
    Skip(WireError),
    /// A path the user named: the send fails with this error, nothing is left out quietly.
    Refuse(WireError),
}

/// Checks a path a sender is about to offer: `Ok` to send it; paths inside a folder that
/// a receiver would refuse are to be left out ([`Unsendable::Skip`]), a named file or
/// folder with such a name fails the send ([`Unsendable::Refuse`]). The browser and the
/// native peer apply this one rule.
pub fn check_send_path(path: &str) -> Result<(), Unsendable> {
    check_path(path).map_err(|e| {
        let in_folder = path
            .split_once('/')
            .is_some_and(|(top, rest)| !rest.is_empty() && path_problem(top).is_none());
        if in_folder { Unsendable::Skip(e) } else { Unsendable::Refuse(e) }
    })
}

fn path_problem(path: &str) -> Option<PathProblem> {
    if path.is_empty() || path.len() > MAX_PATH_LEN {
        return Some(PathProblem::Length);
    }
    if path.chars().any(crate::text::is_hidden) {
        return Some(PathProblem::HiddenCharacter);
    }
    if path.contains(['\\', ':']) {
        return Some(PathProblem::Separator);
    }
    path.split('/').find_map(|part| {
        if part.is_empty() {
            Some(PathProblem::EmptyPart)
        } else if part.len() > 255 {
            Some(PathProblem::Length)
        } else if part.starts_with('.') {
            Some(PathProblem::LeadingDot)
        } else if part.ends_with(['.', ' ']) {
            Some(PathProblem::TrailingDotOrSpace)
        } else if crate::text::is_reserved_device_name(part) {
            Some(PathProblem::DeviceName)
        } else {
            None
        }
    })
}

/// The offer id an offer frame (`Offer` or `OfferPart`) names, read from its first
/// bytes even when the rest does not decode, so that a refusal can say which offer.
pub fn offer_frame_id(frame_type: u8, body: &[u8]) -> Option<u64> {
    if frame_type != ty::OFFER && frame_type != ty::OFFER_PART {
        return None;
    }
    Reader(body).u64().ok()
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn hash(&mut self) -> Result<[u8; 32], WireError> {
        let mut a = [0; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
    fn root(&mut self) -> Result<Root, WireError> {
        self.hash().map(Root::from)
    }
    fn cap(&mut self) -> Result<Capability, WireError> {
        self.hash().map(Capability::from_bytes)
    }
    fn proof(&mut self) -> Result<Proof, WireError> {
        let mut a = [0; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(Proof::from_bytes(a))
    }
    fn text(&mut self, max: usize) -> Result<String, WireError> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(WireError::TooLarge);
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::BadText)
    }
    fn finish(&self) -> Result<(), WireError> {
        if self.0.is_empty() { Ok(()) } else { Err(WireError::Trailing) }
    }
}

fn put_text(out: &mut Vec<u8>, s: &str, max: usize) {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

impl TransferMsg {
    /// The frame type and body this message travels as.
    pub fn encode(&self) -> (u8, Vec<u8>) {
        let mut out = Vec::new();
        let t = self.encode_into(&mut out);
        (t, out)
    }

    /// Appends the body this message travels as to `out`; returns its frame type. For
    /// encoding straight into a packet ([`crate::peer::PeerLink::send_transfer_with`]).
    pub fn encode_into(&self, out: &mut Vec<u8>) -> u8 {
        match self {
            Self::Offer { offer_id, items } => {
                out.extend_from_slice(&offer_id.to_be_bytes());
                out.extend_from_slice(&(items.len() as u32).to_be_bytes());
                for item in items {
                    put_text(out, &item.path, MAX_PATH_LEN);
                    out.extend_from_slice(&item.size.to_be_bytes());
                    out.push(u8::from(item.streamed));
                    out.extend_from_slice(item.root.as_bytes());
                    out.extend_from_slice(item.cap.as_bytes());
                }
                ty::OFFER
            }
            Self::Answer { offer_id, accept } => {
                out.extend_from_slice(&offer_id.to_be_bytes());
                out.push(u8::from(*accept));
                ty::ANSWER
            }
            Self::HashRequest { root, proof, first, count } => {
                out.extend_from_slice(root.as_bytes());
                out.extend_from_slice(proof.as_bytes());
                out.extend_from_slice(&first.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
                ty::HASH_REQUEST
            }
            Self::Hashes { root, first, cvs } => {
                out.reserve(40 + cvs.len() * 32);
                out.extend_from_slice(root.as_bytes());
                out.extend_from_slice(&first.to_be_bytes());
                out.extend_from_slice(&(cvs.len() as u32).to_be_bytes());
                cvs.iter().for_each(|cv| out.extend_from_slice(cv));
                ty::HASHES
            }
            Self::ChunkRequest { root, proof, index } => {
                out.extend_from_slice(root.as_bytes());
                out.extend_from_slice(proof.as_bytes());
                out.extend_from_slice(&index.to_be_bytes());
                ty::CHUNK_REQUEST
            }
            Self::Chunk { root, index, data } => {
                out.reserve(36 + data.len());
                out.extend_from_slice(root.as_bytes());
                out.extend_from_slice(&index.to_be_bytes());
                out.extend_from_slice(data);
                ty::CHUNK
            }
            Self::Missing { root, reason } => {
                out.extend_from_slice(root.as_bytes());
                put_text(out, reason, MAX_REASON_LEN);
                ty::MISSING
            }
            Self::Cancel { offer_id, own_offer, reason } => {
                out.extend_from_slice(&offer_id.to_be_bytes());
                out.push(u8::from(*own_offer));
                put_text(out, reason, MAX_REASON_LEN);
                ty::CANCEL
            }
            Self::Query { root, proof } => {
                out.extend_from_slice(root.as_bytes());
                out.extend_from_slice(proof.as_bytes());
                ty::QUERY
            }
            Self::Have { root, proof } => {
                out.extend_from_slice(root.as_bytes());
                out.extend_from_slice(proof.as_bytes());
                ty::HAVE
            }
            Self::Complete { root } => {
                out.extend_from_slice(root.as_bytes());
                ty::COMPLETE
            }
            Self::Root { key, root } => {
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(root.as_bytes());
                ty::ROOT
            }
            Self::OfferPart { offer_id, items } => {
                // Same body as an offer: one encoding, one decoder, one set of checks.
                let whole = Self::Offer { offer_id: *offer_id, items: items.clone() };
                whole.encode_into(out);
                ty::OFFER_PART
            }
        }
    }

    /// The length of [`Self::encode`]'s body, without encoding: exact for a chunk (the
    /// one bulk message), a lower bound for the others.
    pub fn body_len_hint(&self) -> usize {
        match self {
            Self::Chunk { data, .. } => CHUNK_HEADER_LEN + data.len(),
            _ => 0,
        }
    }

    /// [`Self::decode`] of a body the caller gives away: a chunk keeps the body's buffer
    /// for its bytes (one move, no new buffer, no copy). Accepts and rejects exactly what
    /// [`Self::decode`] does.
    pub fn decode_owned(frame_type: u8, mut body: Vec<u8>) -> Result<Self, WireError> {
        if frame_type != ty::CHUNK {
            return Self::decode(frame_type, &body);
        }
        let mut r = Reader(&body);
        let (root, index) = (r.root()?, r.u32()?);
        if r.0.len() > CHUNK_LEN {
            return Err(WireError::TooLarge);
        }
        body.drain(..CHUNK_HEADER_LEN);
        Ok(Self::Chunk { root, index, data: body })
    }

    /// Parses the body of a frame of type `frame_type`.
    pub fn decode(frame_type: u8, body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader(body);
        let msg = match frame_type {
            ty::OFFER => {
                let offer_id = r.u64()?;
                let count = r.u32()? as usize;
                // Each item takes at least 75 bytes, so the count cannot claim more items
                // than the body holds.
                if count > MAX_OFFER_ITEMS || count > r.0.len() / 75 {
                    return Err(WireError::TooLarge);
                }
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    let path = r.text(MAX_PATH_LEN)?;
                    if let Err(WireError::UnsafePath { path, problem }) = check_path(&path) {
                        return Err(WireError::UnsafeOffer { offer_id, path, problem });
                    }
                    let size = r.u64()?;
                    let streamed = match r.u8()? {
                        0 => false,
                        1 => true,
                        _ => return Err(WireError::TooLarge),
                    };
                    let root = r.root()?;
                    items.push(OfferItem { path, size, root, streamed, cap: r.cap()? });
                }
                Self::Offer { offer_id, items }
            }
            ty::ANSWER => {
                let offer_id = r.u64()?;
                let accept = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::TooLarge),
                };
                Self::Answer { offer_id, accept }
            }
            ty::HASH_REQUEST => Self::HashRequest {
                root: r.root()?,
                proof: r.proof()?,
                first: r.u32()?,
                count: r.u32()?,
            },
            ty::HASHES => {
                let root = r.root()?;
                let first = r.u32()?;
                let count = r.u32()? as usize;
                if count > MAX_HASHES_PER_MSG || count * 32 != r.0.len() {
                    return Err(if count * 32 > r.0.len() {
                        WireError::Truncated
                    } else {
                        WireError::TooLarge
                    });
                }
                let cvs = (0..count).map(|_| r.hash()).collect::<Result<_, _>>()?;
                Self::Hashes { root, first, cvs }
            }
            ty::CHUNK_REQUEST => {
                Self::ChunkRequest { root: r.root()?, proof: r.proof()?, index: r.u32()? }
            }
            ty::CHUNK => {
                let root = r.root()?;
                let index = r.u32()?;
                if r.0.len() > CHUNK_LEN {
                    return Err(WireError::TooLarge);
                }
                let data = r.take(r.0.len())?.to_vec();
                Self::Chunk { root, index, data }
            }
            ty::MISSING => Self::Missing { root: r.root()?, reason: r.text(MAX_REASON_LEN)? },
            ty::CANCEL => {
                let offer_id = r.u64()?;
                let own_offer = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::TooLarge),
                };
                Self::Cancel { offer_id, own_offer, reason: r.text(MAX_REASON_LEN)? }
            }
            ty::QUERY => Self::Query { root: r.root()?, proof: r.proof()? },
            ty::HAVE => Self::Have { root: r.root()?, proof: r.proof()? },
            ty::COMPLETE => Self::Complete { root: r.root()? },
            ty::ROOT => Self::Root { key: r.root()?, root: r.root()? },
            ty::OFFER_PART => match Self::decode(ty::OFFER, body)? {
                Self::Offer { offer_id, items } => return Ok(Self::OfferPart { offer_id, items }),
                _ => return Err(WireError::UnknownType(frame_type)),
            },
            other => return Err(WireError::UnknownType(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<TransferMsg> {
        let root = Root::from([9; 32]);
        let cap = Capability::from_bytes([6; 32]);
        let proof = Proof::from_bytes([8; 16]);
        vec![
            TransferMsg::Offer {
                offer_id: 7,
                items: vec![
                    OfferItem {
                        path: "photos/a b.jpg".into(),
                        size: 5,
                        root,
                        streamed: false,
                        cap,
                    },
                    OfferItem {
                        path: "ü/é.txt".into(),
                        size: 0,
                        root: Root::from([1; 32]),
                        streamed: true,
                        cap,
                    },
                ],
            },
            TransferMsg::Offer { offer_id: 1, items: vec![] },
            TransferMsg::Answer { offer_id: 7, accept: true },
            TransferMsg::HashRequest { root, proof, first: 3, count: 100 },
            TransferMsg::Hashes { root, first: 3, cvs: vec![[2; 32], [3; 32]] },
            TransferMsg::ChunkRequest { root, proof, index: 42 },
            TransferMsg::Chunk { root, index: 42, data: vec![5; CHUNK_LEN] },
            TransferMsg::Missing { root, reason: "file removed".into() },
            TransferMsg::Cancel { offer_id: 7, own_offer: true, reason: "cancelled by Bob".into() },
            TransferMsg::Query { root, proof },
            TransferMsg::Have { root, proof },
            TransferMsg::Complete { root },
            TransferMsg::Root { key: Root::from([4; 32]), root },
            TransferMsg::OfferPart {
                offer_id: 7,
                items: vec![OfferItem {
                    path: "a".into(),
                    size: 1,
                    root,
                    streamed: false,
                    cap: Capability::from_bytes([0; 32]),
                }],
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for msg in samples() {
            let (t, body) = msg.encode();
            assert!(crate::frame::FILE_TRANSFER_TYPES.contains(&t));
            assert!(msg.body_len_hint() <= body.len(), "{msg:?}");
            if matches!(msg, TransferMsg::Chunk { .. }) {
                assert_eq!(msg.body_len_hint(), body.len());
            }
            assert_eq!(TransferMsg::decode_owned(t, body.clone()), Ok(msg.clone()));
            assert_eq!(TransferMsg::decode(t, &body), Ok(msg));
        }
    }

    #[test]
    fn truncation_trailing_bytes_and_oversize_are_errors() {
        for msg in samples() {
            let (t, mut body) = msg.encode();
            // A chunk's data runs to the end of the body: any cut after its header is a
            // shorter (and then unverifiable) chunk, not a framing error.
            let limit = if matches!(msg, TransferMsg::Chunk { .. }) { 36 } else { body.len() };
            for cut in 0..limit {
                assert!(TransferMsg::decode(t, &body[..cut]).is_err(), "{msg:?} cut at {cut}");
            }
            if !matches!(msg, TransferMsg::Chunk { .. }) {
                body.push(0);
                assert!(TransferMsg::decode(t, &body).is_err(), "{msg:?}");
            }
        }
        let (t, _) = samples()[6].encode();
        let mut big = vec![0; 36];
        big.extend(vec![0; CHUNK_LEN + 1]);
        assert_eq!(TransferMsg::decode(t, &big), Err(WireError::TooLarge));
        assert_eq!(TransferMsg::decode_owned(t, big), Err(WireError::TooLarge));
        assert_eq!(TransferMsg::decode(0x3f, &[]), Err(WireError::UnknownType(0x3f)));
    }

    #[test]
    fn paths_that_could_escape_are_refused() {
        use PathProblem::*;
        let cases = [
            ("", Length),
            ("/etc/passwd", EmptyPart),
            ("a/../b", LeadingDot),
            ("..", LeadingDot),
            ("./a", LeadingDot),
            ("a//b", EmptyPart),
            ("a\\b", Separator),
            ("c:x", Separator),
            ("a/\n", HiddenCharacter),
            ("a/", EmptyPart),
            // A member planting files a shell or ssh would read.
            (".bashrc", LeadingDot),
            (".ssh/authorized_keys", LeadingDot),
            ("photos/.config/autostart/x.desktop", LeadingDot),
            ("notes.", TrailingDotOrSpace),
            ("dir /x", TrailingDotOrSpace),
            ("nul.txt", DeviceName),
            ("a/COM1", DeviceName),
            // Shows as "invoice_exe.pdf" in a right-to-left override.
            ("invoice_\u{202e}fdp.exe", HiddenCharacter),
            ("zero\u{200b}width", HiddenCharacter),
        ];
        for (bad, problem) in cases {
            match check_path(bad) {
                Err(WireError::UnsafePath { problem: p, .. }) => assert_eq!(p, problem, "{bad:?}"),
                other => panic!("{bad:?}: {other:?}"),
            }
            let msg = TransferMsg::Offer {
                offer_id: 1,
                items: vec![OfferItem {
                    path: bad.into(),
                    size: 1,
                    root: Root::from([0; 32]),
                    streamed: false,
                    cap: Capability::from_bytes([0; 32]),
                }],
            };
            let (t, body) = msg.encode();
            assert!(TransferMsg::decode(t, &body).is_err(), "{bad:?}");
        }
        for good in ["a", "dir/sub/file.tar.gz", "名前/ファイル", "a..b", "Résumé (1).pdf", "a b"]
        {
            assert_eq!(check_path(good), Ok(()));
        }
    }

    #[test]
    fn a_sender_leaves_out_what_is_inside_a_folder_and_refuses_what_was_named() {
        assert_eq!(check_send_path("photos/a.jpg"), Ok(()));
        assert!(matches!(check_send_path("photos/.DS_Store"), Err(Unsendable::Skip(_))));
        assert!(matches!(check_send_path("src/.git/config"), Err(Unsendable::Skip(_))));
        assert!(matches!(check_send_path(".env"), Err(Unsendable::Refuse(_))));
        assert!(matches!(check_send_path(".config/x"), Err(Unsendable::Refuse(_))));
        assert!(matches!(check_send_path("nul"), Err(Unsendable::Refuse(_))));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(t in 0x20u8..=0x2c, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = TransferMsg::decode(t, &body);
        }

        #[test]
        fn decoding_an_owned_body_is_decoding_its_bytes(t in 0x20u8..=0x2c, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(TransferMsg::decode_owned(t, body.clone()), TransferMsg::decode(t, &body));
        }
    }
}
