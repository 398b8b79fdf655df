//! Content addressing with BLAKE3's own tree.
//!
//! A file is cut into [`CHUNK_LEN`]-byte chunks. Because [`CHUNK_LEN`] is a power of two
//! multiple of BLAKE3's 1 KiB chunk, each of our chunks is a complete BLAKE3 subtree: its
//! *chaining value* (CV) can be computed on its own, and merging the CVs the way BLAKE3's
//! tree does gives exactly `blake3::hash(file)`, the file's **root** (what `b3sum`
//! prints). So:
//!
//! - the list of CVs is verified by merging it and comparing with the root from the offer;
//! - each chunk is verified on arrival against its CV from that verified list;
//! - a file whose chunks all verified has, by construction, the offered root; the engine
//!   still recomputes the root from the CVs before it reports a file complete.
//!
//! A file of at most one chunk has no CV list: its only chunk is checked against the root
//! directly.

use std::fmt;
use std::str::FromStr;

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};
use serde::{Deserialize, Serialize};

/// Bytes in a chunk: the unit of requests, verification and resume (64 KiB).
pub const CHUNK_LEN: usize = 64 * 1024;

const CHUNK_LEN_U64: u64 = CHUNK_LEN as u64;

/// A file's BLAKE3 hash (its *root*), which names it in the transfer protocol.
///
/// Shown and parsed as 64 lowercase hex digits, what `b3sum` prints
/// ([`Display`](fmt::Display), [`FromStr`]); serialized with serde as the plain array of
/// its 32 bytes, as resume records have always been saved.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Root([u8; 32]);

impl Root {
    /// The root named by these 32 bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Its 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The root of a whole file held in memory: `blake3::hash(data)`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }
}

impl From<[u8; 32]> for Root {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl From<Root> for [u8; 32] {
    fn from(root: Root) -> Self {
        root.0
    }
}

impl From<blake3::Hash> for Root {
    fn from(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }
}

impl AsRef<[u8]> for Root {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for Root {
    /// 64 lowercase hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Root {
    /// The first 16 hex digits, enough to tell files apart in logs and test output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Root(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("..)")
    }
}

/// Why text is not a [`Root`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseRootError {
    /// Not 64 characters long (the count is of characters).
    #[error("a file hash is 64 hex digits, not {0} characters")]
    Length(usize),
    /// A character that is not a hex digit.
    #[error("a file hash is 64 hex digits, and {0:?} is not a hex digit")]
    NotHex(char),
}

impl FromStr for Root {
    type Err = ParseRootError;

    /// 64 hex digits (either case), nothing around them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 {
            return Err(ParseRootError::Length(s.chars().count()));
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            // 64 bytes but not all ASCII: report the first character that is not a digit.
            _ => Err(ParseRootError::NotHex(
                s.chars().find(|c| !c.is_ascii_hexdigit()).unwrap_or(char::from(c)),
            )),
        };
        let mut bytes = [0; 32];
        for (byte, pair) in bytes.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
            *byte = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Ok(Self(bytes))
    }
}

/// A chunk's BLAKE3 chaining value.
pub type Cv = [u8; 32];

/// How many chunks a file of `size` bytes has (0 for an empty file).
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_LEN_U64)
}

/// Byte offset and length of chunk `index` in a file of `size` bytes, if it exists.
pub fn chunk_span(size: u64, index: u32) -> Option<(u64, usize)> {
    let offset = u64::from(index).checked_mul(CHUNK_LEN_U64)?;
    if offset >= size {
        return None;
    }
    let len = (size - offset).min(CHUNK_LEN_U64);
    Some((offset, usize::try_from(len).ok()?))
}

/// The chaining value of chunk `index` holding `data`.
pub fn chunk_cv(index: u32, data: &[u8]) -> Cv {
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(u64::from(index) * CHUNK_LEN_U64);
    hasher.update(data);
    hasher.finalize_non_root()
}

/// The root of a file of `size` bytes whose chunks have `cvs`, or `None` when the list
/// has the wrong length or the file has at most one chunk (whose root is simply
/// `blake3::hash` of its bytes).
pub fn root_from_cvs(size: u64, cvs: &[Cv]) -> Option<Root> {
    let n = usize::try_from(chunk_count(size)).ok()?;
    if n < 2 || cvs.len() != n {
        return None;
    }
    let (left, right) = split(size);
    let (l, r) = cvs.split_at(usize::try_from(left / CHUNK_LEN_U64).ok()?);
    let left_cv = merge(left, l);
    let right_cv = merge(right, r);
    Some(Root(*merge_subtrees_root(&left_cv, &right_cv, Mode::Hash).as_bytes()))
}

/// Sizes of the left and right subtrees of a subtree of `len` bytes (> one chunk).
fn split(len: u64) -> (u64, u64) {
    let left = blake3::hazmat::left_subtree_len(len);
    (left, len - left)
}

/// The chaining value of a non-root subtree of `len` bytes made of chunks with `cvs`.
fn merge(len: u64, cvs: &[Cv]) -> ChainingValue {
    if cvs.len() <= 1 {
        return cvs.first().copied().unwrap_or([0; 32]);
    }
    let (left, right) = split(len);
    let (l, r) = cvs.split_at(usize::try_from(left / CHUNK_LEN_U64).unwrap_or(0));
    merge_subtrees_non_root(&merge(left, l), &merge(right, r), Mode::Hash)
}

/// Hashes a file read front to back in pieces of any size, producing its root and CVs:
/// what a sender computes once before it offers the file.
#[derive(Debug, Clone)]
pub struct FileHasher {
    cvs: Vec<Cv>,
    chunk: blake3::Hasher,
    in_chunk: usize,
    size: u64,
}

impl Default for FileHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// What [`FileHasher::finish`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    /// The file's BLAKE3 hash.
    pub root: Root,
    /// Its size in bytes.
    pub size: u64,
    /// The chunks' chaining values (empty for a file of at most one chunk).
    pub cvs: Vec<Cv>,
}

impl FileHasher {
    /// A hasher at the start of a file.
    pub fn new() -> Self {
        Self { cvs: Vec::new(), chunk: blake3::Hasher::new(), in_chunk: 0, size: 0 }
    }

    /// Bytes hashed so far.
    pub fn hashed(&self) -> u64 {
        self.size
    }

    /// The chaining values of the chunks finished so far (a chunk is finished once a byte
    /// after it was fed): what a sender streams while it is still hashing.
    pub fn cvs(&self) -> &[Cv] {
        &self.cvs
    }

    /// Feeds the next bytes of the file.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.in_chunk == CHUNK_LEN {
                self.cvs.push(self.chunk.finalize_non_root());
                self.chunk = blake3::Hasher::new();
                self.chunk.set_input_offset(self.cvs.len() as u64 * CHUNK_LEN_U64);
                self.in_chunk = 0;
            }
            let take = data.len().min(CHUNK_LEN - self.in_chunk);
            self.chunk.update(&data[..take]);
            self.in_chunk += take;
            self.size += take as u64;
            data = &data[take..];
        }
    }

    /// The root and chaining values of everything fed.
    pub fn finish(mut self) -> FileDigest {
        if self.cvs.is_empty() {
            // At most one chunk: the root is an ordinary root finalization.
            return FileDigest { root: self.chunk.finalize().into(), size: self.size, cvs: vec![] };
        }
        self.cvs.push(self.chunk.finalize_non_root());
        let root = root_from_cvs(self.size, &self.cvs).unwrap_or(Root([0; 32]));
        FileDigest { root, size: self.size, cvs: self.cvs }
    }
}

/// The key a file is offered under before its root is known (`core/TRANSFER.md`, "Offer
/// at once"): derived from the sender's `secret`, the recipient (`recipient`: its public
/// key), the size and the path, so each recipient gets its own key and the same offer
/// made again gets the same one.
pub fn stream_key(secret: &[u8; 32], recipient: &[u8], size: u64, path: &str) -> Root {
    let mut h = blake3::Hasher::new_keyed(secret);
    h.update(&(recipient.len() as u64).to_be_bytes());
    h.update(recipient);
    h.update(&size.to_be_bytes());
    h.update(path.as_bytes());
    Root(*h.finalize().as_bytes())
}

/// Whether `data` is chunk `index` of the file with `root`, `size` and (verified) `cvs`.
pub fn verify_chunk(root: &Root, size: u64, cvs: &[Cv], index: u32, data: &[u8]) -> bool {
    let Some((_, len)) = chunk_span(size, index) else { return false };
    if data.len() != len {
        return false;
    }
    if chunk_count(size) == 1 {
        return Root::of(data) == *root;
    }
    cvs.get(index as usize).is_some_and(|cv| *cv == chunk_cv(index, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ (i / 7919) as u8).collect()
    }

    #[test]
    fn root_is_plain_blake3_for_every_shape_of_file() {
        let sizes = [
            0,
            1,
            1023,
            1024,
            CHUNK_LEN - 1,
            CHUNK_LEN,
            CHUNK_LEN + 1,
            2 * CHUNK_LEN,
            3 * CHUNK_LEN + 17,
            5 * CHUNK_LEN,
            7 * CHUNK_LEN - 1,
            8 * CHUNK_LEN,
            13 * CHUNK_LEN + 4096,
        ];
        for size in sizes {
            let bytes = data(size);
            for piece in [1000, 4096, CHUNK_LEN, 3 * CHUNK_LEN + 5] {
                let mut h = FileHasher::new();
                bytes.chunks(piece).for_each(|p| h.update(p));
                let digest = h.finish();
                assert_eq!(digest.root, Root::of(&bytes), "size {size}");
                assert_eq!(digest.size, size as u64);
                let n = chunk_count(size as u64) as usize;
                assert_eq!(digest.cvs.len(), if n >= 2 { n } else { 0 });
                for (i, chunk) in bytes.chunks(CHUNK_LEN).enumerate() {
                    assert!(verify_chunk(&digest.root, digest.size, &digest.cvs, i as u32, chunk));
                    let mut bad = chunk.to_vec();
                    bad[chunk.len() / 2] ^= 1;
                    assert!(!verify_chunk(&digest.root, digest.size, &digest.cvs, i as u32, &bad));
                }
            }
        }
    }

    #[test]
    fn a_root_reads_and_prints_as_b3sum_does() {
        let root = Root::of(b"hello");
        let text = blake3::hash(b"hello").to_hex().to_string();
        assert_eq!(root.to_string(), text);
        assert_eq!(text.parse::<Root>(), Ok(root));
        assert_eq!(text.to_uppercase().parse::<Root>(), Ok(root));
        assert_eq!(format!("{root:?}"), format!("Root({}..)", &text[..16]));
        assert_eq!(Root::from(*root.as_bytes()), root);
        assert_eq!(<[u8; 32]>::from(root), *root.as_bytes());
        assert_eq!(Root::from_bytes([0xab; 32]).to_string(), "ab".repeat(32));
    }

    #[test]
    fn text_that_is_not_a_root_is_refused_in_plain_words() {
        let good = Root::of(b"x").to_string();
        assert_eq!("".parse::<Root>(), Err(ParseRootError::Length(0)));
        assert_eq!(good[..63].parse::<Root>(), Err(ParseRootError::Length(63)));
        assert_eq!(format!("{good}0").parse::<Root>(), Err(ParseRootError::Length(65)));
        let bad = format!("{}g{}", &good[..10], &good[11..]);
        assert_eq!(bad.parse::<Root>(), Err(ParseRootError::NotHex('g')));
        // `u8::from_str_radix` would take "+a"; a hash has no signs.
        let signed = format!("+{}", &good[1..]);
        assert_eq!(signed.parse::<Root>(), Err(ParseRootError::NotHex('+')));
        // 64 bytes, fewer characters.
        let wide = format!("é{}", &good[2..]);
        assert_eq!(wide.parse::<Root>(), Err(ParseRootError::NotHex('é')));
        assert_eq!(
            ParseRootError::Length(3).to_string(),
            "a file hash is 64 hex digits, not 3 characters"
        );
        assert_eq!(
            ParseRootError::NotHex('g').to_string(),
            "a file hash is 64 hex digits, and 'g' is not a hex digit"
        );
    }

    #[test]
    fn a_root_serializes_as_its_32_bytes() {
        let root = Root::from_bytes(std::array::from_fn(|i| i as u8));
        let json = serde_json::to_string(&root).unwrap_or_default();
        let bytes: Vec<String> = (0..32).map(|i: u8| i.to_string()).collect();
        assert_eq!(json, format!("[{}]", bytes.join(",")));
        assert_eq!(serde_json::from_str::<Root>(&json).ok(), Some(root));
    }

    #[test]
    fn a_wrong_cv_list_does_not_give_the_root() {
        let bytes = data(5 * CHUNK_LEN + 3);
        let mut h = FileHasher::new();
        h.update(&bytes);
        let d = h.finish();
        let mut cvs = d.cvs.clone();
        cvs.swap(1, 2);
        assert_ne!(root_from_cvs(d.size, &cvs), Some(d.root));
        assert_eq!(root_from_cvs(d.size, &d.cvs[1..]), None);
        assert_eq!(chunk_span(d.size, 6), None);
        assert_eq!(chunk_span(d.size, 5), Some((5 * CHUNK_LEN as u64, 3)));
    }
}
