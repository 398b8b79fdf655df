//! Caps on everything a peer can ask of the transfer engine (#13 item 6), in one place.
//!
//! A member of the network can turn hostile; whatever it sends, the engine's memory for
//! it stays bounded and its other peers keep being served. Each cap is a number below,
//! chosen so that it never bites an honest user (a 100,000-file folder, a 1 TiB disk
//! image), and each refusal is a [`LimitReason`]: sent to the peer as its words (in a
//! [`TransferMsg::Cancel`] or [`TransferMsg::Missing`]), logged with `tracing`, and
//! counted ([`Refusals`], `Engine::refusals`). Design and numbers: `core/TRANSFER.md`,
//! "Caps on what a peer can ask".
//!
//! [`TransferMsg::Cancel`]: super::TransferMsg::Cancel
//! [`TransferMsg::Missing`]: super::TransferMsg::Missing

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use super::hash::{CHUNK_LEN, Root};
use super::wire::{MAX_OFFER_ITEMS, OfferItem};
use crate::signal::PeerId;
use crate::sorted::SortedMap;

/// Bytes one offer item takes on the wire besides its path (length, size, kind, key).
pub const OFFER_ITEM_OVERHEAD: usize = 2 + 8 + 1 + 32;

/// The caps on what one peer may ask of us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferLimits {
    /// Largest file an offer may name, in bytes: 1 TiB. Its chunk count (2^24) fits the
    /// protocol's `u32` indexes with room to spare, its chunk bitmap is 2 MiB and its
    /// hash list 512 MiB; a bigger file is refused whole, never truncated.
    pub max_file_size: u64,
    /// Most files in one offer, over all its parts: 250,000, two and a half times the
    /// 100,000-file folder that must go through.
    pub max_offer_items: usize,
    /// Most bytes the files of one offer may add up to: 16 TiB, so the chunk bitmaps of
    /// an accepted offer take at most 32 MiB.
    pub max_offer_bytes: u64,
    /// Most offers from one peer waiting for an answer (or still arriving in parts): 64.
    /// Each send is one offer; a person answers them one by one.
    pub max_pending_offers: usize,
    /// Most bytes (as encoded) of the offers from one peer waiting for an answer: 32 MiB,
    /// a 100,000-file folder with paths of up to 290 bytes on average. The memory a peer
    /// can make us hold with offers nobody answered.
    pub max_pending_offer_bytes: usize,
    /// An offer is sent in frames of at most this many bytes (its first parts as
    /// `OfferPart`): 128 KiB, well inside a packet (256 KiB).
    pub offer_frame_bytes: usize,
    /// Hash-list requests of one peer waiting for their turn: 16,384 (about 1 MiB of
    /// queue), more than the big files of a 100,000-file folder asked at once need
    /// beyond the burst. A request for a file already queued replaces the queued one;
    /// past this many, a request is refused.
    pub max_queued_hash_requests: usize,
    /// Hash-list bytes sent to one peer at once before its requests wait their turn:
    /// 8 MiB (the lists of 16 TiB of files). A 40-byte request asks for up to 512 MiB;
    /// this bounds what one peer's requests make us queue.
    pub hash_burst_bytes: usize,
    /// Hash-list bytes per second sent to one peer after the burst: 8 MiB/s, the list
    /// of 16 GiB of file per second, far beyond any link's chunk rate.
    pub hash_bytes_per_sec: usize,
    /// Hash values per second a source must deliver on average from the request on:
    /// 128 (8 MiB of file hashed per second, well below any sender's hashing speed).
    /// A hash list is due `request_timeout` plus this share of its length after it was
    /// asked, whatever arrives in between: a source that trickles one value at a time
    /// cannot keep pushing the deadline back.
    pub min_hashes_per_sec: u32,
    /// What downloads taken without asking may still have to write
    /// ([`PendingBudget`]).
    pub pending: PendingBudget,
}

/// A budget for accepted-but-unfinished downloads, checked when an offer is accepted by
/// a rule rather than by a person (`weft-peer receive --accept-from`): a peer the rule
/// trusts, compromised, could otherwise send offer after offer and fill the disk. What
/// counts is what the downloads still have to write (size less what is stored), of
/// downloads active or paused; a download finished, cancelled or failed frees its share
/// at once. An offer of files already downloading (a resume) adds nothing. An offer
/// past the budget is refused whole, the sender is told why ([`LimitReason`]); nothing
/// already accepted is touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingBudget {
    /// Per peer: 4 GiB. Files from one trusted peer that fit a small disk's spare room;
    /// a bigger send (a disk image) needs the receiver to raise it (`--max-pending`)
    /// or to accept it by hand, where a person is the budget.
    pub per_peer: u64,
    /// Over all peers: 16 GiB, four peers' worth at once.
    pub total: u64,
    /// Left free on the disk: 1 GiB. Where the driver reports its free space, the
    /// total is also held to that space less this reserve, so accepted downloads cannot
    /// fill the disk that the system and the user need too.
    pub disk_reserve: u64,
}

impl PendingBudget {
    /// Weft's budget.
    pub const DEFAULT: Self = Self { per_peer: 4 << 30, total: 16 << 30, disk_reserve: 1 << 30 };

    /// Whether `new` more bytes may be taken from a peer whose downloads still have
    /// `peer_pending` bytes to write, when all downloads have `total_pending`, with
    /// `free_space` free on the disk (if the driver knows).
    pub fn check(
        &self,
        peer_pending: u64,
        total_pending: u64,
        new: u64,
        free_space: Option<u64>,
    ) -> Result<(), LimitReason> {
        if peer_pending.saturating_add(new) > self.per_peer {
            return Err(LimitReason::PendingPerPeer { max: self.per_peer });
        }
        let disk = free_space.map_or(u64::MAX, |f| f.saturating_sub(self.disk_reserve));
        // What is still to be written will take from the free space (what is written
        // already is not free any more).
        let max = self.total.min(disk);
        if total_pending.saturating_add(new) > max {
            return Err(LimitReason::PendingTotal { max });
        }
        Ok(())
    }
}

impl Default for PendingBudget {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TransferLimits {
    /// Weft's caps.
    pub const DEFAULT: Self = Self {
        max_file_size: 1 << 40,
        max_offer_items: 250_000,
        max_offer_bytes: 16 << 40,
        max_pending_offers: 64,
        max_pending_offer_bytes: 32 << 20,
        offer_frame_bytes: 128 << 10,
        max_queued_hash_requests: 16_384,
        hash_burst_bytes: 8 << 20,
        hash_bytes_per_sec: 8 << 20,
        min_hashes_per_sec: 128,
        pending: PendingBudget::DEFAULT,
    };

    /// Why `items` (one whole offer) are refused, if they are.
    pub fn check_offer(&self, items: &[OfferItem]) -> Result<(), LimitReason> {
        if items.len() > self.max_offer_items {
            return Err(LimitReason::TooManyFiles { max: self.max_offer_items });
        }
        if let Some(big) = items.iter().find(|i| i.size > self.max_file_size) {
            return Err(LimitReason::FileTooLarge { size: big.size, max: self.max_file_size });
        }
        let total = items.iter().fold(0u64, |sum, i| sum.saturating_add(i.size));
        if total > self.max_offer_bytes {
            return Err(LimitReason::OfferTooLarge { max: self.max_offer_bytes });
        }
        Ok(())
    }

    /// How long a source may take to deliver `count` hash values from its request on.
    pub fn hash_list_allowance(&self, request_timeout: Duration, count: u32) -> Duration {
        let rate = f64::from(self.min_hashes_per_sec.max(1));
        request_timeout.saturating_add(Duration::from_secs_f64(f64::from(count) / rate))
    }

    /// The offer's items cut into frames of at most [`Self::offer_frame_bytes`] bytes
    /// and [`MAX_OFFER_ITEMS`] items (at least one item each); one frame for an empty
    /// offer.
    pub fn offer_frames(&self, items: Vec<OfferItem>) -> Vec<Vec<OfferItem>> {
        let mut frames = Vec::new();
        let (mut frame, mut bytes) = (Vec::new(), 0);
        for item in items {
            let len = encoded_len(&item);
            if !frame.is_empty()
                && (bytes + len > self.offer_frame_bytes || frame.len() >= MAX_OFFER_ITEMS)
            {
                frames.push(std::mem::take(&mut frame));
                bytes = 0;
            }
            bytes += len;
            frame.push(item);
        }
        frames.push(frame);
        frames
    }
}

impl Default for TransferLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The bytes of an offer item on the wire (and about what it holds in memory).
pub fn encoded_len(item: &OfferItem) -> usize {
    OFFER_ITEM_OVERHEAD + item.path.len()
}

/// Why something a peer asked was refused: its `Display` is the plain words the peer is
/// sent (and shows) and the local log says.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LimitReason {
    /// "refused: a file of {size} bytes is over the limit of {max} bytes".
    FileTooLarge {
        /// The file's size.
        size: u64,
        /// The cap.
        max: u64,
    },
    /// "refused: an offer of more than {max} files".
    TooManyFiles {
        /// The cap.
        max: usize,
    },
    /// "refused: an offer of more than {max} bytes in all".
    OfferTooLarge {
        /// The cap.
        max: u64,
    },
    /// "refused: {max} offers are already waiting for an answer".
    TooManyPendingOffers {
        /// The cap.
        max: usize,
    },
    /// "refused: the offers waiting for an answer already list {max} bytes of names".
    PendingOffersTooLarge {
        /// The cap.
        max: usize,
    },
    /// An offer frame that does not decode (over the per-frame limits, truncated):
    /// "refused: unreadable offer ({0})".
    UnreadableOffer(String),
    /// "refused: {max} hash-list requests are already waiting".
    TooManyHashRequests {
        /// The cap.
        max: usize,
    },
    /// "refused: the receiver's downloads from you would pass {max} bytes still to
    /// write (it takes your offers without asking, up to that)".
    PendingPerPeer {
        /// The budget per peer.
        max: u64,
    },
    /// "refused: the receiver's downloads would pass {max} bytes still to write (its
    /// budget, or its free disk space)".
    PendingTotal {
        /// The budget over all peers, held to the free disk space.
        max: u64,
    },
}

impl LimitReason {
    /// A short stable name, for counters and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::FileTooLarge { .. } => "file_too_large",
            Self::TooManyFiles { .. } => "too_many_files",
            Self::OfferTooLarge { .. } => "offer_too_large",
            Self::TooManyPendingOffers { .. } => "too_many_pending_offers",
            Self::PendingOffersTooLarge { .. } => "pending_offers_too_large",
            Self::UnreadableOffer(_) => "unreadable_offer",
            Self::TooManyHashRequests { .. } => "too_many_hash_requests",
            Self::PendingPerPeer { .. } => "pending_downloads_per_peer",
            Self::PendingTotal { .. } => "pending_downloads_total",
        }
    }
}

impl fmt::Display for LimitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FileTooLarge { size, max } => {
                write!(f, "refused: a file of {size} bytes is over the limit of {max} bytes")
            }
            Self::TooManyFiles { max } => write!(f, "refused: an offer of more than {max} files"),
            Self::OfferTooLarge { max } => {
                write!(f, "refused: an offer of more than {max} bytes in all")
            }
            Self::TooManyPendingOffers { max } => {
                write!(f, "refused: {max} offers are already waiting for an answer")
            }
            Self::PendingOffersTooLarge { max } => write!(
                f,
                "refused: the offers waiting for an answer already list {max} bytes of names"
            ),
            Self::UnreadableOffer(e) => write!(f, "refused: unreadable offer ({e})"),
            Self::TooManyHashRequests { max } => {
                write!(f, "refused: {max} hash-list requests are already waiting")
            }
            Self::PendingPerPeer { max } => write!(
                f,
                "refused: the receiver's downloads from you would pass {max} bytes still to \
                 write (it takes your offers without asking, up to that)"
            ),
            Self::PendingTotal { max } => write!(
                f,
                "refused: the receiver's downloads would pass {max} bytes still to write (its \
                 budget, or its free disk space)"
            ),
        }
    }
}

/// What the engine refused peers, counted by [`LimitReason::kind`] and by peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refusals {
    by_kind: SortedMap<&'static str, u64>,
    /// By peer id, for the first [`MAX_PEERS_COUNTED`] peers refused (the server hands
    /// out ids, so a peer back under new ids must not grow it); the total counts all.
    by_peer: SortedMap<PeerId, u64>,
}

/// Most peers whose refusals are counted one by one.
pub const MAX_PEERS_COUNTED: usize = 1024;

impl Refusals {
    /// Refusals of one peer (by its current id).
    pub fn of_peer(&self, peer: &PeerId) -> u64 {
        self.by_peer.get(peer).copied().unwrap_or(0)
    }

    /// All refusals.
    pub fn total(&self) -> u64 {
        self.by_kind.values().sum()
    }

    /// Refusals of one kind ([`LimitReason::kind`]).
    pub fn of(&self, kind: &str) -> u64 {
        self.by_kind.get(kind).copied().unwrap_or(0)
    }

    /// Each kind refused at least once, with its count.
    pub fn by_kind(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.by_kind.iter().map(|(k, n)| (*k, *n))
    }

    /// Counts one and logs it: the first of a kind (and every power of two after it) as
    /// a warning, the rest at debug level, so a flood does not flood the log.
    pub(crate) fn count(&mut self, peer: &PeerId, reason: &LimitReason) {
        if let Some(n) = self.by_peer.get_mut(peer) {
            *n += 1;
        } else if self.by_peer.len() < MAX_PEERS_COUNTED {
            self.by_peer.insert(peer.clone(), 1);
        }
        let n = self.by_kind.entry(reason.kind()).or_default();
        *n += 1;
        if n.is_power_of_two() {
            tracing::warn!("{peer} hit a transfer limit ({n} so far of this kind): {reason}");
        } else {
            tracing::debug!("{peer} hit a transfer limit: {reason}");
        }
    }
}

/// An offer arriving in parts.
#[derive(Debug, Default)]
pub(crate) struct PartialOffer {
    pub items: Vec<OfferItem>,
    pub bytes: usize,
}

/// One peer's hash-list requests waiting for their turn, and its byte budget.
#[derive(Debug)]
pub(crate) struct HashQueue {
    /// Bytes it may be sent now (may run below zero by one message).
    tokens: f64,
    at: Duration,
    /// (key asked with, first value, end), oldest first.
    pub waiting: VecDeque<(Root, u32, u32)>,
}

impl HashQueue {
    pub(crate) fn new(limits: &TransferLimits, now: Duration) -> Self {
        Self { tokens: limits.hash_burst_bytes as f64, at: now, waiting: VecDeque::new() }
    }

    fn refill(&mut self, limits: &TransferLimits, now: Duration) {
        let dt = now.saturating_sub(self.at).as_secs_f64();
        self.at = self.at.max(now);
        let burst = limits.hash_burst_bytes as f64;
        self.tokens = (self.tokens + dt * limits.hash_bytes_per_sec as f64).min(burst);
    }

    /// Whether bytes may be sent now.
    pub(crate) fn ready(&mut self, limits: &TransferLimits, now: Duration) -> bool {
        self.refill(limits, now);
        self.tokens > 0.0
    }

    /// `bytes` were sent.
    pub(crate) fn charge(&mut self, bytes: usize) {
        self.tokens -= bytes as f64;
    }

    /// When its budget is positive again (now if it is).
    pub(crate) fn ready_at(&self, limits: &TransferLimits) -> Duration {
        if self.tokens > 0.0 {
            return self.at;
        }
        let rate = limits.hash_bytes_per_sec.max(1) as f64;
        // Just past zero, so the budget is positive when the timer fires.
        self.at.saturating_add(Duration::from_secs_f64((1.0 - self.tokens) / rate))
    }
}

/// The engine's per-peer state for its caps.
#[derive(Debug, Default)]
pub(crate) struct LimitState {
    /// Offers arriving in parts: (peer, offer id) → the items so far. This map and the
    /// next hold at most `max_pending_offers` per peer: sorted `Vec`s (`sorted.rs`).
    pub partial: SortedMap<(PeerId, u64), PartialOffer>,
    /// Bytes of each offer waiting for an answer (pruned against the engine's offers).
    pub pending_bytes: SortedMap<(PeerId, u64), usize>,
    /// One per peer (a room's members): a sorted `Vec` (`sorted.rs`).
    pub hash_queues: SortedMap<PeerId, HashQueue>,
    pub refusals: Refusals,
    /// Offers refused lately (their later parts are dropped, not taken for new offers),
    /// the most recent [`REMEMBER_REFUSED`].
    refused: VecDeque<(PeerId, u64)>,
}

/// How many refused offers are remembered: enough for every part of one still to come.
const REMEMBER_REFUSED: usize = 4096;

impl LimitState {
    /// Offers and bytes of `peer` waiting: those in `incoming` and those in parts.
    pub(crate) fn pending_of(
        &mut self,
        peer: &PeerId,
        incoming: &SortedMap<(PeerId, u64), Vec<OfferItem>>,
    ) -> (usize, usize) {
        self.pending_bytes.retain(|k, _| incoming.contains_key(k));
        let (mut offers, mut bytes) = (0, 0);
        for ((p, _), b) in &self.pending_bytes {
            if p == peer {
                offers += 1;
                bytes += b;
            }
        }
        for ((p, _), part) in &self.partial {
            if p == peer {
                offers += 1;
                bytes += part.bytes;
            }
        }
        (offers, bytes)
    }

    pub(crate) fn refused(&mut self, key: (PeerId, u64)) {
        if self.refused.len() >= REMEMBER_REFUSED {
            self.refused.pop_front();
        }
        self.refused.push_back(key);
    }

    pub(crate) fn was_refused(&self, key: &(PeerId, u64)) -> bool {
        self.refused.contains(key)
    }

    /// Forgets what `peer` had in flight (its session ended).
    pub(crate) fn peer_gone(&mut self, peer: &PeerId) {
        self.partial.retain(|(p, _), _| p != peer);
        self.hash_queues.remove(peer);
    }
}

/// The byte size of a CV list answer of `count` values (the message around them too).
pub(crate) fn hashes_cost(count: usize) -> usize {
    64 + count * 32
}

/// Chunk count that [`TransferLimits::max_file_size`] allows, for the record.
pub const MAX_CHUNKS: u64 = TransferLimits::DEFAULT.max_file_size / CHUNK_LEN as u64;

#[cfg(test)]
mod tests {
    use super::*;

    fn item(path: &str, size: u64) -> OfferItem {
        OfferItem {
            path: path.into(),
            size,
            root: Root::from([1; 32]),
            streamed: false,
            cap: crate::transfer::cap::Capability::from_bytes([0; 32]),
        }
    }

    #[test]
    fn the_numbers_fit_the_protocol_and_an_honest_folder() {
        let l = TransferLimits::DEFAULT;
        assert!(MAX_CHUNKS < u64::from(u32::MAX), "chunk indexes are u32");
        // A 100,000-file folder with 80-byte paths is one offer and fits the pending cap.
        let folder: Vec<OfferItem> =
            (0..100_000).map(|i| item(&format!("{i:0>80}"), 5 << 20)).collect();
        assert_eq!(l.check_offer(&folder), Ok(()));
        let bytes: usize = folder.iter().map(encoded_len).sum();
        assert!(bytes < l.max_pending_offer_bytes);
        let frames = l.offer_frames(folder);
        assert!(
            frames.iter().all(|f| f.iter().map(encoded_len).sum::<usize>() <= l.offer_frame_bytes
                && f.len() <= MAX_OFFER_ITEMS)
        );
        assert_eq!(frames.iter().map(Vec::len).sum::<usize>(), 100_000);
        assert_eq!(l.offer_frames(vec![]).len(), 1);
    }

    #[test]
    fn an_offer_over_a_cap_is_refused_whole() {
        let l = TransferLimits::DEFAULT;
        let big = item("a", l.max_file_size + 1);
        assert_eq!(
            l.check_offer(&[item("b", 1), big]),
            Err(LimitReason::FileTooLarge { size: l.max_file_size + 1, max: l.max_file_size })
        );
        let many: Vec<OfferItem> = (0..=l.max_offer_items).map(|_| item("a", 0)).collect();
        assert_eq!(l.check_offer(&many), Err(LimitReason::TooManyFiles { max: l.max_offer_items }));
        let total: Vec<OfferItem> = (0..17).map(|_| item("a", l.max_file_size)).collect();
        assert_eq!(
            l.check_offer(&total),
            Err(LimitReason::OfferTooLarge { max: l.max_offer_bytes })
        );
    }

    #[test]
    fn the_pending_budget_holds_per_peer_in_all_and_to_the_free_disk() {
        let b = PendingBudget::DEFAULT;
        let gib = 1u64 << 30;
        assert_eq!(b.check(3 * gib, 3 * gib, gib, None), Ok(()));
        assert_eq!(
            b.check(3 * gib, 3 * gib, gib + 1, None),
            Err(LimitReason::PendingPerPeer { max: 4 * gib })
        );
        assert_eq!(b.check(0, 16 * gib, 1, None), Err(LimitReason::PendingTotal { max: 16 * gib }));
        // 3 GiB free, 1 GiB kept: 2 GiB may be still to write, whoever sends it.
        assert_eq!(b.check(0, gib, gib, Some(3 * gib)), Ok(()));
        assert_eq!(
            b.check(0, gib, gib + 1, Some(3 * gib)),
            Err(LimitReason::PendingTotal { max: 2 * gib })
        );
        assert!(b.check(0, 0, 1, Some(gib / 2)).is_err(), "under the reserve, nothing");
    }

    #[test]
    fn a_hash_budget_refills_at_its_rate() {
        let l = TransferLimits::DEFAULT;
        let mut q = HashQueue::new(&l, Duration::ZERO);
        assert!(q.ready(&l, Duration::ZERO));
        q.charge(l.hash_burst_bytes + l.hash_bytes_per_sec);
        assert!(!q.ready(&l, Duration::from_millis(500)));
        let at = q.ready_at(&l);
        assert!(at > Duration::from_millis(900) && at < Duration::from_millis(1100), "{at:?}");
        assert!(q.ready(&l, at));
    }
}
