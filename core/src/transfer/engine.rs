//! The transfer engine: offers, downloads from one or many sources, serving chunks.
//!
//! One engine per node, shared by all its links. The driver tells it which peers have an
//! encrypted session ([`Engine::peer_connected`]), hands it the file-transfer messages
//! they send ([`Engine::handle`]) and does the I/O it asks for through [`Output`]:
//! sending a message, reading a chunk of a shared file, writing a verified chunk,
//! discarding a cancelled download.
//!
//! Flow control is receiver-driven: a download keeps at most a window of chunk requests
//! outstanding per source, and stops asking while too many received chunks wait to be
//! written, so neither side buffers more than about `max_window` chunks per peer.
//! Nothing is marked done until the driver confirms the write ([`Engine::write_done`]),
//! so a persisted [`DownloadRecord`] never claims bytes that are not on disk.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::active::{Downloads, Scheduled};
use super::cap::{Capability, Proof};
use super::hash::{Cv, FileDigest, Root, chunk_count, chunk_span, root_from_cvs, verify_chunk};
use super::limits::{HashQueue, LimitReason, LimitState, Refusals, TransferLimits};
use super::pace::Pace;
use super::reason::{CancelReason, DropReason, FailReason, ShareFailReason};
use super::wire::{MAX_HASHES_PER_MSG, OfferItem, TransferMsg, WireError, check_path};
use crate::signal::PeerId;
use crate::sorted::{SortedMap, SortedSet};

/// Most capabilities a download keeps (offers of one file by several senders, or offered
/// again after a sender restarted): each is one more `Query` per peer, and a sender that
/// offers the same file again and again must not grow it.
const MAX_CAPS: usize = 8;

/// Tuning of an [`Engine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Chunk requests outstanding per source at the start.
    pub initial_window: u32,
    /// Most chunk requests outstanding per source.
    pub max_window: u32,
    /// A request unanswered this long goes to another source.
    pub request_timeout: Duration,
    /// Once every chunk is requested, a request this old is also asked of an idle
    /// source (the endgame), so a slow source cannot hold the last chunks hostage.
    pub endgame_after: Duration,
    /// Consecutive timeouts or bad chunks after which a source is dropped.
    pub max_source_failures: u32,
    /// A download left with no source asks every connected peer again this often whether
    /// it holds the file (a source that stopped answering may answer again; a peer may
    /// have started seeding it), so it never waits forever while a holder is connected.
    pub requery_every: Duration,
    /// Most chunks requested or received but not yet written, over all downloads: the
    /// receiver's memory bound (in chunks of [`super::hash::CHUNK_LEN`]).
    pub max_unwritten: usize,
    /// Most chunk requests queued per peer on the serving side; more are ignored.
    pub max_serve_queue: usize,
    /// Most reads outstanding per peer on the serving side (at least `refill_min`, so a
    /// batch of requests is read at once and its chunks can share messages).
    pub max_reads_in_flight: usize,
    /// A source's window is topped up only once this many requests fit (or fewer are
    /// left to ask for), so requests travel several to a packet instead of one per chunk
    /// received: every packet costs both ends a message event, an AEAD and a send. 12 is
    /// also what lets the sender pack the chunks three to a message (`core/TRANSFER.md`,
    /// "Chunks share messages").
    pub refill_min: u32,
    /// The caps on what a peer may ask of us ([`TransferLimits`]).
    pub limits: TransferLimits,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            initial_window: 8,
            max_window: 64,
            request_timeout: Duration::from_secs(8),
            endgame_after: Duration::from_secs(2),
            max_source_failures: 3,
            requery_every: Duration::from_secs(10),
            max_unwritten: 192,
            max_serve_queue: 256,
            max_reads_in_flight: 12,
            refill_min: 12,
            limits: TransferLimits::DEFAULT,
        }
    }
}

/// The smallest window a slow source is brought down to: two requests, so one is on its
/// way while the other is answered.
const MIN_WINDOW: u32 = 2;

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send `msg` to `peer` (encode it with [`TransferMsg::encode`]).
    Send {
        /// To whom.
        peer: PeerId,
        /// What.
        msg: TransferMsg,
    },
    /// Read `len` bytes at `offset` of the file `root` (shared or downloaded), then call
    /// [`Engine::read_done`] or [`Engine::read_failed`].
    Read {
        /// For whom.
        peer: PeerId,
        /// Which file.
        root: Root,
        /// Which chunk.
        index: u32,
        /// Where it starts.
        offset: u64,
        /// Its length.
        len: usize,
    },
    /// Write verified `data` at `offset` of the download `root`, then call
    /// [`Engine::write_done`] (once it is durable) or [`Engine::write_failed`].
    Write {
        /// Which file.
        root: Root,
        /// Which chunk.
        index: u32,
        /// Where.
        offset: u64,
        /// The verified bytes.
        data: Vec<u8>,
    },
    /// The download `root` was cancelled: delete its partial data and saved record.
    Discard {
        /// Which file.
        root: Root,
    },
    /// Something to show.
    Event(TransferEvent),
}

/// Something that happened, for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferEvent {
    /// `peer` offers files; answer with [`Engine::accept`] or [`Engine::decline`].
    Offered {
        /// From whom.
        peer: PeerId,
        /// Its number.
        offer_id: u64,
        /// The files.
        items: Vec<OfferItem>,
    },
    /// An offer of files this node was already downloading was accepted on its own: the
    /// transfer resumes from the chunks already stored.
    Resumed {
        /// From whom.
        peer: PeerId,
        /// Its number.
        offer_id: u64,
        /// The files.
        items: Vec<OfferItem>,
    },
    /// The receiver answered our offer.
    Answered {
        /// Who.
        peer: PeerId,
        /// Which offer.
        offer_id: u64,
        /// Whether it accepted.
        accepted: bool,
    },
    /// The receiver verified and stored one of the files we sent.
    Delivered {
        /// Who.
        peer: PeerId,
        /// Which file.
        root: Root,
    },
    /// A download finished: every chunk verified and written, and the root recomputed.
    FileComplete {
        /// Which file (its BLAKE3 hash).
        root: Root,
        /// Where it is stored (its stream key if it was offered before it was hashed,
        /// else its root): the name of [`Output::Write`]s.
        key: Root,
        /// The paths it was offered under.
        paths: Vec<String>,
        /// Its size.
        size: u64,
    },
    /// A download failed for good (for example the disk is full).
    FileFailed {
        /// Which file: its root once verified, else its stream key.
        root: Root,
        /// The key it was offered and stored under (as [`TransferEvent::FileComplete`]'s).
        key: Root,
        /// Why (its `Display` is in plain words).
        reason: FailReason,
    },
    /// An offer was cancelled, by us or by the peer.
    Cancelled {
        /// The other side.
        peer: PeerId,
        /// Which offer (numbered by its sender).
        offer_id: u64,
        /// Why.
        reason: CancelReason,
        /// Whether the peer cancelled it.
        by_peer: bool,
        /// Whether it was our offer (we were sending).
        outgoing: bool,
    },
    /// A chunk failed verification and will be fetched again.
    ChunkRejected {
        /// Which file.
        root: Root,
        /// Which chunk.
        index: u32,
        /// Who sent it.
        peer: PeerId,
    },
    /// A peer became a source of a download.
    SourceAdded {
        /// Which file.
        root: Root,
        /// The source.
        peer: PeerId,
    },
    /// A source was dropped; its requests go to the others.
    SourceDropped {
        /// Which file.
        root: Root,
        /// The source.
        peer: PeerId,
        /// Why.
        reason: DropReason,
    },
    /// A file offered under a stream key was verified against its root: from now on it
    /// is known (in events and progress) by its root.
    Verified {
        /// The stream key it was known by.
        key: Root,
        /// Its BLAKE3 hash.
        root: Root,
    },
    /// A shared file could not be read; it is no longer offered.
    ShareFailed {
        /// Which file.
        root: Root,
        /// Why.
        reason: ShareFailReason,
    },
}

/// Why an engine call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// No such offer.
    #[error("no such offer")]
    UnknownOffer,
    /// No such file.
    #[error("no such file")]
    UnknownFile,
    /// The chaining values do not give the root.
    #[error("the hash list does not match the file's hash")]
    BadHashes,
    /// A file's hash arrived for a file of another size, or with hashes that differ from
    /// those already streamed (the file changed while it was hashed).
    #[error("the file changed while it was being hashed")]
    HashChanged,
    /// A path that could escape the folder it is saved into.
    #[error(transparent)]
    Wire(#[from] super::wire::WireError),
    /// The peer has no encrypted session.
    #[error("that peer is not connected")]
    NotConnected,
    /// The offer is over a cap every receiver applies (say, a file over 1 TiB).
    #[error("{0}")]
    Limit(LimitReason),
}

/// How far a download is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadProgress {
    /// The file: its BLAKE3 hash, or its stream key until that is verified.
    pub root: Root,
    /// Where it is stored: its stream key if it was offered before it was hashed, else
    /// its root.
    pub key: Root,
    /// Its BLAKE3 hash once known: at once for a file offered by its root, after
    /// verification for one offered under a stream key (`None` until then).
    pub hash: Option<Root>,
    /// Paths it was offered under.
    pub paths: Vec<String>,
    /// Its size.
    pub size: u64,
    /// Bytes verified and written.
    pub done_bytes: u64,
    /// Sources in use now.
    pub sources: Vec<PeerId>,
    /// The offers (peer, offer id) it belongs to.
    pub offers: Vec<(PeerId, u64)>,
    /// Where it is.
    pub state: DownloadState,
}

/// Where a download is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownloadState {
    /// Fetching (or waiting for a source).
    Active,
    /// Paused by the user.
    Paused,
    /// Verified and stored.
    Complete,
    /// Failed for good.
    Failed,
}

/// What a driver persists to resume a download after a reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadRecord {
    /// Where it is stored: the file's BLAKE3 hash, or the stream key it was offered
    /// under before it was hashed (then `hash` is its hash once verified).
    pub root: Root,
    /// Its size.
    pub size: u64,
    /// Paths it was offered under.
    pub paths: Vec<String>,
    /// One bit per chunk (LSB first): verified and durably written.
    pub have: Vec<u8>,
    /// Where it was.
    pub state: DownloadState,
    /// Offered under a stream key (`root` is not the file's hash).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub streamed: bool,
    /// A streamed file's hash, once verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<Root>,
    /// Before `hash`: how many chaining values the chunks in `have` were checked
    /// against, and the BLAKE3 hash of that list (`core/TRANSFER.md`, "Resume before the
    /// root").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cv_digest: Option<(u32, Root)>,
    /// Before `hash`: who offered it (see [`Engine::peer_identity`]), the one member
    /// that may serve it until its root is verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<Root>,
    /// The capabilities the offers of it carried: what a fetch of it proves, to its
    /// sender after a reload or to other holders (`core/TRANSFER.md`, "Who may fetch
    /// what"). A record without any (saved before capabilities) resumes only when its
    /// sender offers it again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caps: Vec<Capability>,
}

#[derive(Debug, Clone, Default)]
struct Source {
    /// The key this source knows the file by (the stream key for its sender, the root
    /// for others).
    key: Option<Root>,
    window: u32,
    inflight: u32,
    failures: u32,
    /// Its answer times: they set its window and how long a request to it may take.
    pace: Pace,
    /// Chunks it sent that failed verification.
    bad: HashSet<u32>,
    /// The proof its requests carry (of a capability it took).
    proof: Proof,
}

impl Source {
    /// Whether the scheduler asks it for more now: a window with `refill_min` (or half
    /// a smaller window) free, or any room when fewer chunks than that are `left`.
    fn has_room(&self, config: &EngineConfig, left: usize) -> bool {
        let free = self.window.saturating_sub(self.inflight);
        let min = config.refill_min.min(self.window / 2).max(1);
        free >= min || (free > 0 && left < min as usize)
    }
}

#[derive(Debug)]
struct Download {
    size: u64,
    chunks: u32,
    paths: Vec<String>,
    /// Offers (peer, offer id) this download serves.
    offers: Vec<(PeerId, u64)>,
    /// The file's hash: from a rooted offer or a verified record (`root_trusted`), or as
    /// its one source said in [`TransferMsg::Root`].
    root: Option<Root>,
    /// `root` came from the offer the user accepted, or was verified before a reload: any
    /// holder may be a source, and chunks wait for the CV list to be checked against it.
    /// Otherwise (a streamed offer) one source feeds CVs and chunks until the root.
    root_trusted: bool,
    /// The CVs merge to `root` (or the file has at most one chunk and `root` is known).
    verified: bool,
    /// CVs received so far, in order (all of them once verified).
    cvs: Vec<Cv>,
    /// BLAKE3 of `cvs` so far, for the resume record.
    cv_hasher: blake3::Hasher,
    /// A restored streamed record's (count, digest) still to compare with the CVs.
    cv_check: Option<(u32, Root)>,
    /// Who offered a streamed file (its identity tag): its one source before the root.
    sender: Option<Root>,
    /// Capabilities the offers of it carried, first first.
    caps: Vec<Capability>,
    /// Who is asked for the CV list, and when it is due: from the request on, however
    /// it trickles in ([`TransferLimits::min_hashes_per_sec`]).
    hash_source: Option<(PeerId, Duration)>,
    have: Vec<u8>,
    /// Chunks marked in `have`.
    have_count: u32,
    done_bytes: u64,
    writing: HashSet<u32>,
    /// Requests out: chunk → (source, when).
    inflight: HashMap<u32, Vec<(PeerId, Duration)>>,
    /// Chunks to request, beyond `cursor`.
    /// (What was in flight when its source went or failed: at most the sources' windows,
    /// so a sorted `Vec`, `sorted.rs`.)
    retry: SortedSet<u32>,
    cursor: u32,
    sources: SortedMap<PeerId, Source>,
    /// With no source left: when to ask connected peers again.
    requery_at: Option<Duration>,
    state: DownloadState,
}

impl Download {
    fn new(size: u64, paths: Vec<String>) -> Self {
        let chunks = u32::try_from(chunk_count(size)).unwrap_or(u32::MAX);
        Self {
            size,
            chunks,
            paths,
            offers: Vec::new(),
            root: None,
            root_trusted: false,
            verified: false,
            cvs: Vec::new(),
            cv_hasher: blake3::Hasher::new(),
            cv_check: None,
            sender: None,
            caps: Vec::new(),
            hash_source: None,
            have: vec![0; (chunks as usize).div_ceil(8)],
            have_count: 0,
            done_bytes: 0,
            writing: HashSet::new(),
            inflight: HashMap::new(),
            retry: SortedSet::new(),
            cursor: 0,
            sources: SortedMap::new(),
            requery_at: None,
            state: DownloadState::Active,
        }
    }

    fn has(&self, index: u32) -> bool {
        self.have.get(index as usize / 8).is_some_and(|b| b & (1 << (index % 8)) != 0)
    }

    fn set_have(&mut self, index: u32) {
        if index >= self.chunks {
            return;
        }
        if let Some(b) = self.have.get_mut(index as usize / 8) {
            if *b & (1 << (index % 8)) == 0 {
                *b |= 1 << (index % 8);
                self.have_count += 1;
            }
        }
    }

    /// Before its root is verified, a streamed download takes CVs and chunks from its
    /// one source.
    fn pre_root(&self) -> bool {
        !self.root_trusted && !self.verified
    }

    /// How many CVs the file has (none for a file of at most one chunk).
    fn cv_total(&self) -> u32 {
        if self.chunks >= 2 { self.chunks } else { 0 }
    }

    /// Chunks below this may be requested: all once verified; before the root, those
    /// whose CV came (and only once a restored CV list was checked again).
    fn request_limit(&self) -> u32 {
        if self.verified {
            self.chunks
        } else if self.pre_root() && self.cv_check.is_none() {
            u32::try_from(self.cvs.len()).unwrap_or(0).min(self.cv_total())
        } else {
            0
        }
    }

    /// The name users see: its root once trusted or verified, else the stream key.
    fn name(&self, key: &Root) -> Root {
        match self.root {
            Some(root) if !self.pre_root() => root,
            _ => *key,
        }
    }

    fn clear_have(&mut self) {
        self.have.iter_mut().for_each(|b| *b = 0);
        self.have_count = 0;
        self.done_bytes = 0;
    }

    /// Checked after every write: a counter, not a scan of the bitmap.
    fn is_finished(&self) -> bool {
        self.have_count == self.chunks
    }

    /// The next chunk nobody is fetching, if any.
    fn next_wanted(&mut self) -> Option<u32> {
        let limit = self.request_limit();
        while let Some(i) = self.retry.first().copied().filter(|i| *i < limit) {
            self.retry.remove(&i);
            if !self.has(i) && !self.writing.contains(&i) && !self.inflight.contains_key(&i) {
                return Some(i);
            }
        }
        while self.cursor < limit {
            let i = self.cursor;
            self.cursor += 1;
            if !self.has(i) && !self.writing.contains(&i) && !self.inflight.contains_key(&i) {
                return Some(i);
            }
        }
        None
    }

    /// Whether a chunk could be requested now, budget aside: a source with room in its
    /// window (as the scheduler counts it) and a chunk for it. Looks without taking.
    #[cfg(debug_assertions)]
    fn may_request(&self, config: &EngineConfig, cutoff: Option<Duration>) -> bool {
        let limit = self.request_limit();
        let wanted = |i: &u32| {
            *i < limit
                && !self.has(*i)
                && !self.writing.contains(i)
                && !self.inflight.contains_key(i)
        };
        let next = self.retry.iter().any(wanted) || (self.cursor..limit).any(|i| wanted(&i));
        let left = self.left();
        limit > 0
            && self.sources.iter().any(|(p, s)| {
                s.has_room(config, left)
                    && (next || cutoff.is_some_and(|c| self.duplicate_for(p, c).is_some()))
            })
    }

    /// Chunks not yet asked for: beyond the cursor, and to ask again.
    fn left(&self) -> usize {
        (self.chunks - self.cursor.min(self.chunks)) as usize + self.retry.len()
    }

    /// Whether every missing chunk has been requested.
    fn all_requested(&self) -> bool {
        self.retry.is_empty() && self.cursor >= self.chunks
    }

    /// Endgame: a chunk asked of other sources only, before `cutoff`, to ask `source`
    /// for too.
    fn duplicate_for(&self, source: &PeerId, cutoff: Duration) -> Option<u32> {
        if !self.all_requested() {
            return None;
        }
        self.inflight
            .iter()
            .filter(|(_, reqs)| {
                reqs.len() < 2 && reqs.iter().all(|(p, t)| p != source && *t <= cutoff)
            })
            .min_by_key(|(_, reqs)| reqs.iter().map(|(_, t)| *t).min())
            .map(|(i, _)| *i)
    }

    fn record(&self, key: Root) -> DownloadRecord {
        let streamed = self.root != Some(key);
        let pre_root = self.pre_root();
        let cv_digest = (pre_root && !self.cvs.is_empty()).then(|| {
            let count = u32::try_from(self.cvs.len()).unwrap_or(u32::MAX);
            (count, Root::from(self.cv_hasher.finalize()))
        });
        DownloadRecord {
            root: key,
            size: self.size,
            paths: self.paths.clone(),
            have: self.have.clone(),
            state: self.state,
            streamed,
            hash: if streamed && !pre_root { self.root } else { None },
            // A restored list not yet checked again: keep what was saved.
            cv_digest: self.cv_check.or(cv_digest),
            sender: if pre_root { self.sender } else { None },
            caps: self.caps.clone(),
        }
    }
}

impl Scheduled for Download {
    fn unwritten(&self) -> usize {
        self.writing.len() + self.inflight.values().map(Vec::len).sum::<usize>()
    }

    fn has_timers(&self) -> bool {
        self.state == DownloadState::Active
            && (!self.inflight.is_empty()
                || self.hash_source.is_some()
                || self.requery_at.is_some())
    }
}

#[derive(Debug, Clone)]
struct Shared {
    size: u64,
    /// Its CVs (those hashed so far, while `root` is `None`).
    cvs: Vec<Cv>,
    /// Its hash, once hashed.
    root: Option<Root>,
    /// Shared before it was hashed: always offered under stream keys, so that an offer
    /// made again (say to a receiver that reloaded before it had the root) names the file
    /// as the first one did.
    streamed: bool,
    /// Capabilities of other members' offers of it (a file we downloaded): a member that
    /// proves one may fetch it from us too (multi-source among the holders of one
    /// sender's capability). Our own capability needs no entry: see [`Engine::authorized`].
    held: Vec<Capability>,
}

impl Shared {
    fn cv_total(&self) -> usize {
        let n = usize::try_from(chunk_count(self.size)).unwrap_or(usize::MAX);
        if n >= 2 { n } else { 0 }
    }
}

/// A peer's open request for CVs of a file still being hashed.
#[derive(Debug, Clone)]
struct CvWaiter {
    peer: PeerId,
    /// The key it asked with.
    key: Root,
    /// The next CV to send it.
    next: usize,
    /// Where its request ends.
    end: usize,
}

#[derive(Debug)]
struct Outgoing {
    /// The items as offered (stream keys or roots).
    items: Vec<OfferItem>,
    /// Our local key of each item's file.
    locals: Vec<Root>,
    accepted: Option<bool>,
}

/// The file-transfer state machine of one node. See the module docs.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    /// Peers and the per-peer maps below hold one entry per member of the room (32 by
    /// default on the server): sorted `Vec`s, not hash maps (`sorted.rs`; page weight).
    peers: SortedSet<PeerId>,
    shared: HashMap<Root, Shared>,
    /// Other names of shared files: the stream keys we offered them under, and the roots
    /// of files shared under another key (local key while hashing, or a completed
    /// streamed download's storage key) → that key.
    aliases: HashMap<Root, Root>,
    /// Open CV requests for files still being hashed, by local key.
    waiters: HashMap<Root, Vec<CvWaiter>>,
    /// Reads in flight: (peer, local key, chunk) → the keys the peer asked with.
    reading: HashMap<(PeerId, Root, u32), VecDeque<Root>>,
    /// Peers' identity tags ([`Engine::peer_identity`]).
    identities: SortedMap<PeerId, Root>,
    /// Our own identity tag ([`Engine::set_identity`]): what our fetch proofs name.
    own: Root,
    /// Our capabilities are derived from it ([`Engine::set_capability_key`]).
    cap_key: [u8; 32],
    /// Verified roots of downloads stored under a stream key → that key.
    names: HashMap<Root, Root>,
    /// (identity tag, local key): we offered that shared file to that key, so a proof of
    /// our own capability for it from that key opens it. Keyed by key, not by peer id,
    /// which the server assigns and which changes on reconnect.
    grants: HashSet<(Root, Root)>,
    /// (identity tag, local key) pairs we stopped serving (we cancelled, or the offer was
    /// declined or cancelled): no proof opens them.
    revoked: HashSet<(Root, Root)>,
    /// Peers whose proof opened a shared file, by the name they asked with: told when it
    /// can no longer be served; later requests with the same proof are not checked again.
    fetchers: HashMap<(PeerId, Root), Proof>,
    outgoing: HashMap<(PeerId, u64), Outgoing>,
    /// (peer, name or local key of an item) of the open offers in `outgoing`, with how
    /// many items so name it: which files a peer was offered, without a scan.
    offered_names: HashMap<(PeerId, Root), u32>,
    /// At most `max_pending_offers` (64) per peer: a sorted `Vec` (`sorted.rs`), in the
    /// order `pending_offers` gives them.
    incoming: SortedMap<(PeerId, u64), Vec<OfferItem>>,
    /// With the scheduler's index of those that may have work (`transfer/active.rs`).
    downloads: Downloads<Download>,
    serve_queue: SortedMap<PeerId, VecDeque<(Root, u32)>>,
    reads_in_flight: SortedMap<PeerId, usize>,
    out: VecDeque<Output>,
    next_offer_id: u64,
    /// When [`Engine::handle_timeout`] last ran: an endgame wake-up at or before it has
    /// had its chance (see [`Engine::poll_timeout`]).
    timeouts_run_at: Option<Duration>,
    /// What the caps keep per peer, and the refusals counted.
    limits: LimitState,
    /// Downloads looked at by [`Self::schedule`] so far: its work, counted for tests and
    /// benches ([`Engine::schedule_examined`]).
    examined: u64,
}

impl Engine {
    /// An engine with no files. `first_offer_id` should be random so that offer numbers
    /// of a reloaded page do not collide with its earlier ones.
    pub fn new(config: EngineConfig, first_offer_id: u64) -> Self {
        Self {
            config,
            peers: SortedSet::new(),
            shared: HashMap::new(),
            aliases: HashMap::new(),
            waiters: HashMap::new(),
            reading: HashMap::new(),
            identities: SortedMap::new(),
            own: Root::from([0; 32]),
            // Not secret until the node sets one from its randomness: an engine on its own
            // (tests, benches) still gives each file its own capability.
            cap_key: *blake3::hash(&first_offer_id.to_be_bytes()).as_bytes(),
            names: HashMap::new(),
            grants: HashSet::new(),
            revoked: HashSet::new(),
            fetchers: HashMap::new(),
            outgoing: HashMap::new(),
            offered_names: HashMap::new(),
            incoming: SortedMap::new(),
            downloads: Downloads::default(),
            serve_queue: SortedMap::new(),
            reads_in_flight: SortedMap::new(),
            out: VecDeque::new(),
            next_offer_id: first_offer_id,
            timeouts_run_at: None,
            limits: LimitState::default(),
            examined: 0,
        }
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    fn send(&mut self, peer: &PeerId, msg: TransferMsg) {
        self.out.push_back(Output::Send { peer: peer.clone(), msg });
    }

    fn event(&mut self, event: TransferEvent) {
        self.out.push_back(Output::Event(event));
    }

    // ---- peers ----

    /// Who `peer` is: a tag of its long-term identity (the node passes its public key),
    /// before [`Self::peer_connected`]. A streamed download takes its sender (by this
    /// tag) as its one source until its root is verified, so after a reload it asks only
    /// that member for the file, never anyone who merely learnt the key. Our grants of
    /// the files we offered are kept by this tag, and the proofs `peer` sends are checked
    /// against it, so a member back under a new id keeps its grants.
    pub fn peer_identity(&mut self, peer: &PeerId, tag: Root) {
        self.identities.insert(peer.clone(), tag);
    }

    /// Our own identity tag (the node passes its public key, as peers pass it to
    /// [`Self::peer_identity`]): the proofs our fetches carry are bound to it.
    pub fn set_identity(&mut self, tag: Root) {
        self.own = tag;
    }

    /// The key our files' capabilities are derived from: 32 random bytes from the
    /// driver, set once, before anything is offered (a capability handed out stays valid
    /// for the engine's life).
    pub fn set_capability_key(&mut self, key: [u8; 32]) {
        self.cap_key = key;
    }

    /// Our capability for the shared file held under `local`: the same in every offer
    /// of it, so that all its receivers may fetch it from each other.
    fn own_cap(&self, local: &Root) -> Capability {
        Capability::derive(&self.cap_key, local)
    }

    /// Whether `proof`, sent by `peer` for the shared file it names `name`, opens it:
    /// a proof of our own capability from a key we offered the file to, or of a
    /// capability we received with the file (we downloaded it) from any key. Knowing the
    /// file's hash is not enough, and a proof is bound to its asker's key.
    fn authorized(&self, peer: &PeerId, name: &Root, proof: &Proof) -> bool {
        let Some(local) = self.share_key(name) else { return false };
        let Some(s) = self.shared.get(&local) else { return false };
        let tag = self.identity_of(peer);
        if self.revoked.contains(&(tag, local)) {
            return false;
        }
        if self.fetchers.get(&(peer.clone(), *name)) == Some(proof) {
            return true;
        }
        (self.grants.contains(&(tag, local)) && self.own_cap(&local).opens(proof, name, &tag))
            || s.held.iter().any(|c| c.opens(proof, name, &tag))
    }

    /// The queries asking a peer for download `d` by `name`: one per capability it holds.
    fn queries(d: &Download, name: Root, own: &Root) -> Vec<TransferMsg> {
        d.caps
            .iter()
            .map(|c| TransferMsg::Query { root: name, proof: c.proof(&name, own) })
            .collect()
    }

    /// Whether `peer` may be asked for (and become a source of) download `d`.
    fn may_source(&self, d: &Download, peer: &PeerId) -> bool {
        if !d.pre_root() {
            return true;
        }
        d.sources.is_empty() && d.sender == Some(self.identity_of(peer))
    }

    /// `peer`'s identity tag, or (for a driver that gives none) one made of its id.
    fn identity_of(&self, peer: &PeerId) -> Root {
        self.identities.get(peer).copied().unwrap_or_else(|| Root::of(peer.as_str().as_bytes()))
    }

    /// The key to ask peers for download `key` with: its root once trusted or verified.
    fn query_key(d: &Download, key: &Root) -> Root {
        if d.pre_root() { *key } else { d.root.unwrap_or(*key) }
    }

    /// `peer` has an established session: it may serve and fetch files. Incomplete
    /// downloads ask it whether it holds them.
    pub fn peer_connected(&mut self, peer: &PeerId, now: Duration) {
        self.peers.insert(peer.clone());
        let wanted: Vec<TransferMsg> = self
            .downloads
            .iter()
            .filter(|(_, d)| {
                d.state == DownloadState::Active
                    && !d.sources.contains_key(peer)
                    && self.may_source(d, peer)
            })
            .flat_map(|(r, d)| Self::queries(d, Self::query_key(d, r), &self.own))
            .collect();
        for msg in wanted {
            self.send(peer, msg);
        }
        self.schedule(now);
    }

    /// `peer`'s session ended: its requests go to other sources; what it asked of us is
    /// forgotten (it will ask again).
    pub fn peer_disconnected(&mut self, peer: &PeerId, now: Duration) {
        self.peers.remove(peer);
        self.serve_queue.remove(peer);
        self.reads_in_flight.remove(peer);
        self.reading.retain(|(p, _, _), _| p != peer);
        self.fetchers.retain(|(p, _), _| p != peer);
        self.limits.peer_gone(peer);
        for list in self.waiters.values_mut() {
            list.retain(|w| w.peer != *peer);
        }
        let roots: Vec<Root> = self
            .downloads
            .iter()
            .filter(|(_, d)| d.sources.contains_key(peer))
            .map(|(r, _)| *r)
            .collect();
        for root in roots {
            self.drop_source(&root, peer, DropReason::PeerLeft, now);
        }
        self.schedule(now);
    }

    fn drop_source(&mut self, root: &Root, peer: &PeerId, reason: DropReason, now: Duration) {
        let requery_every = self.config.requery_every;
        let Some(d) = self.downloads.get_mut(root) else { return };
        if d.sources.remove(peer).is_none() {
            return;
        }
        if d.sources.is_empty() && d.state == DownloadState::Active {
            d.requery_at = Some(now.saturating_add(requery_every));
        }
        for (index, reqs) in d.inflight.iter_mut() {
            reqs.retain(|(p, _)| p != peer);
            if reqs.is_empty() {
                d.retry.insert(*index);
            }
        }
        d.inflight.retain(|_, reqs| !reqs.is_empty());
        if d.hash_source.as_ref().is_some_and(|(p, _)| p == peer) {
            // The CVs it sent stay: before the root they came from the one sender (who
            // may come back under a new id); otherwise the root checks them.
            d.hash_source = None;
        }
        self.event(TransferEvent::SourceDropped { root: *root, peer: peer.clone(), reason });
    }

    /// Adds `peer` as a source of the download stored under `root`, which it knows by
    /// `key` and opens to `proof`.
    fn add_source(&mut self, root: &Root, peer: &PeerId, key: Root, proof: Proof) {
        let window = self.config.initial_window;
        let Some(d) = self.downloads.get(root) else { return };
        if d.state == DownloadState::Complete
            || d.sources.contains_key(peer)
            || !self.may_source(d, peer)
        {
            return;
        }
        let Some(d) = self.downloads.get_mut(root) else { return };
        let source = Source { window, key: Some(key), proof, ..Source::default() };
        d.sources.insert(peer.clone(), source);
        d.requery_at = None;
        self.event(TransferEvent::SourceAdded { root: *root, peer: peer.clone() });
    }

    // ---- sending side ----

    /// Makes a hashed file available (see [`super::hash::FileHasher`]). `cvs` must give
    /// `root` (checked).
    pub fn share(&mut self, root: Root, size: u64, cvs: Vec<Cv>) -> Result<(), TransferError> {
        let ok = if chunk_count(size) >= 2 {
            root_from_cvs(size, &cvs) == Some(root)
        } else {
            cvs.is_empty()
        };
        if !ok {
            return Err(TransferError::BadHashes);
        }
        // A file we downloaded and now share ourselves keeps serving its other holders.
        let held = self.shared.get(&root).map(|s| s.held.clone()).unwrap_or_default();
        self.shared.insert(root, Shared { size, cvs, root: Some(root), streamed: false, held });
        Ok(())
    }

    /// Makes a file available before it is hashed, under `local`, a key of the driver's
    /// that never travels: it may be offered at once (under a stream key per recipient),
    /// and its CVs follow as the driver hashes it ([`Self::hashed`], then
    /// [`Self::hash_done`]).
    pub fn share_streamed(&mut self, local: Root, size: u64) {
        let shared = Shared { size, cvs: Vec::new(), root: None, streamed: true, held: Vec::new() };
        self.shared.insert(local, shared);
    }

    /// The next CVs of `local`, in order, as the driver's hasher finishes chunks: they go
    /// at once to peers waiting for them.
    pub fn hashed(&mut self, local: &Root, cvs: &[Cv]) {
        let Some(s) = self.shared.get_mut(local) else { return };
        if s.root.is_some() {
            return;
        }
        let room = s.cv_total().saturating_sub(s.cvs.len());
        s.cvs.extend_from_slice(&cvs[..cvs.len().min(room)]);
        self.feed_waiters(local);
    }

    /// The driver finished hashing `local`: its digest must agree with the size shared
    /// and the CVs streamed so far. The root then goes to every peer waiting for it, and
    /// the file answers to its root too ([`TransferMsg::Query`]).
    pub fn hash_done(&mut self, local: &Root, digest: FileDigest) -> Result<(), TransferError> {
        let s = self.shared.get_mut(local).ok_or(TransferError::UnknownFile)?;
        if s.root.is_some() {
            return Ok(());
        }
        let consistent = digest.size == s.size
            && digest.cvs.len() == s.cv_total()
            && digest.cvs.starts_with(&s.cvs)
            && (digest.cvs.is_empty()
                || root_from_cvs(digest.size, &digest.cvs) == Some(digest.root));
        if !consistent {
            return Err(TransferError::HashChanged);
        }
        s.cvs = digest.cvs;
        s.root = Some(digest.root);
        self.aliases.entry(digest.root).or_insert(*local);
        self.feed_waiters(local);
        Ok(())
    }

    /// Sends waiting peers the CVs of `local` they lack, and its root once they have all.
    fn feed_waiters(&mut self, local: &Root) {
        let Some(s) = self.shared.get(local) else { return };
        let Some(mut list) = self.waiters.remove(local) else { return };
        let (have, total, root) = (s.cvs.len(), s.cv_total(), s.root);
        let mut sends = Vec::new();
        list.retain_mut(|w| {
            let upto = w.end.min(have);
            Self::cv_messages(&s.cvs, w.key, w.next, upto, &mut sends, &w.peer);
            w.next = w.next.max(upto);
            if w.next < w.end {
                return true;
            }
            match root {
                Some(root) if w.end == total => {
                    if root != w.key {
                        sends.push((w.peer.clone(), TransferMsg::Root { key: w.key, root }));
                    }
                    false
                }
                Some(_) => false,
                None => w.end == total,
            }
        });
        if !list.is_empty() {
            self.waiters.insert(*local, list);
        }
        for (peer, msg) in sends {
            self.send(&peer, msg);
        }
    }

    /// `Hashes` messages for CVs `from..to` of a file, at most [`MAX_HASHES_PER_MSG`] each.
    fn cv_messages(
        cvs: &[Cv],
        key: Root,
        from: usize,
        to: usize,
        sends: &mut Vec<(PeerId, TransferMsg)>,
        peer: &PeerId,
    ) {
        let mut first = from;
        while first < to {
            let end = (first + MAX_HASHES_PER_MSG).min(to);
            let msg = TransferMsg::Hashes {
                root: key,
                first: u32::try_from(first).unwrap_or(u32::MAX),
                cvs: cvs[first..end].to_vec(),
            };
            sends.push((peer.clone(), msg));
            first = end;
        }
    }

    /// The key a shared file is held under (its local key if it was shared before it was
    /// hashed, else its root), found by any of its names.
    pub fn share_key(&self, name: &Root) -> Option<Root> {
        if self.shared.contains_key(name) {
            return Some(*name);
        }
        self.aliases.get(name).copied().filter(|k| self.shared.contains_key(k))
    }

    /// The name users see of a shared file: its root once known.
    fn share_name(&self, key: &Root) -> Root {
        self.shared.get(key).and_then(|s| s.root).unwrap_or(*key)
    }

    /// Every name of the shared file held under `key`, and `also`.
    fn names_of(&self, key: &Root, also: &Root) -> HashSet<Root> {
        self.aliases
            .iter()
            .filter(|(_, k)| *k == key)
            .map(|(n, _)| *n)
            .chain([*key, *also])
            .collect()
    }

    /// Stops serving `root` (any of its names).
    pub fn unshare(&mut self, root: &Root) {
        let key = self.share_key(root).unwrap_or(*root);
        let names = self.names_of(&key, root);
        self.shared.remove(&key);
        self.waiters.remove(&key);
        self.aliases.retain(|_, k| *k != key);
        self.grants.retain(|(_, l)| *l != key);
        self.fetchers.retain(|(_, r), _| !names.contains(r));
    }

    /// Whether `root` is shared (or was downloaded completely), by any of its names.
    pub fn is_shared(&self, root: &Root) -> bool {
        self.share_key(root).is_some()
    }

    /// The size of shared file `root`, if it is shared.
    pub fn shared_size(&self, root: &Root) -> Option<u64> {
        self.share_key(root).and_then(|k| self.shared.get(&k)).map(|s| s.size)
    }

    /// The root of shared file `key` (any of its names), once hashed.
    pub fn shared_root(&self, key: &Root) -> Option<Root> {
        self.share_key(key).and_then(|k| self.shared.get(&k)).and_then(|s| s.root)
    }

    /// Offers shared files to `peer` under the given relative paths; returns the offer id.
    /// A file not hashed yet is offered under a stream key made from its local key, the
    /// peer's id and the path; [`Self::offer_with`] takes the stream keys from the caller.
    pub fn offer(&mut self, peer: &PeerId, files: &[(Root, String)]) -> Result<u64, TransferError> {
        self.offer_with(peer, files, |local, size, path| {
            super::hash::stream_key(local.as_bytes(), peer.as_str().as_bytes(), size, path)
        })
    }

    /// [`Self::offer`], with `stream_key(local key, size, path)` naming the files that
    /// are not hashed yet (the node derives it from its identity and the recipient's, so
    /// the same offer made again after a restart has the same keys).
    pub fn offer_with(
        &mut self,
        peer: &PeerId,
        files: &[(Root, String)],
        stream_key: impl Fn(&Root, u64, &str) -> Root,
    ) -> Result<u64, TransferError> {
        if !self.peers.contains(peer) {
            return Err(TransferError::NotConnected);
        }
        let mut items = Vec::with_capacity(files.len());
        let mut locals = Vec::with_capacity(files.len());
        if files.len() > self.config.limits.max_offer_items {
            let max = self.config.limits.max_offer_items;
            return Err(TransferError::Limit(LimitReason::TooManyFiles { max }));
        }
        for (name, path) in files {
            check_path(path)?;
            let local = self.share_key(name).ok_or(TransferError::UnknownFile)?;
            let shared = self.shared.get(&local).ok_or(TransferError::UnknownFile)?;
            let cap = self.own_cap(&local);
            let item = match shared.root.filter(|_| !shared.streamed) {
                Some(root) => {
                    OfferItem { path: path.clone(), size: shared.size, root, streamed: false, cap }
                }
                None => OfferItem {
                    path: path.clone(),
                    size: shared.size,
                    root: stream_key(&local, shared.size, path),
                    streamed: true,
                    cap,
                },
            };
            items.push(item);
            locals.push(local);
        }
        // Refused here as every receiver would refuse it, rather than sent to fail.
        self.config.limits.check_offer(&items).map_err(TransferError::Limit)?;
        let offer_id = self.next_offer_id;
        self.next_offer_id = self.next_offer_id.wrapping_add(1);
        let tag = self.identity_of(peer);
        for (item, local) in items.iter().zip(&locals) {
            if item.root != *local {
                self.aliases.insert(item.root, *local);
            }
            self.grants.insert((tag, *local));
            self.revoked.remove(&(tag, *local));
            self.fetchers.insert((peer.clone(), item.root), item.cap.proof(&item.root, &tag));
        }
        self.add_outgoing(
            peer,
            offer_id,
            Outgoing { items: items.clone(), locals, accepted: None },
        );
        self.send_offer(peer, offer_id, items);
        Ok(offer_id)
    }

    /// Keeps an offer we made, and the names it offered.
    fn add_outgoing(&mut self, peer: &PeerId, offer_id: u64, out: Outgoing) {
        for (item, local) in out.items.iter().zip(&out.locals) {
            for name in [item.root, *local] {
                *self.offered_names.entry((peer.clone(), name)).or_default() += 1;
            }
        }
        self.outgoing.insert((peer.clone(), offer_id), out);
    }

    /// Takes an offer we made out of those open.
    fn take_outgoing(&mut self, key: &(PeerId, u64)) -> Option<Outgoing> {
        let out = self.outgoing.remove(key)?;
        for (item, local) in out.items.iter().zip(&out.locals) {
            for name in [item.root, *local] {
                let entry = (key.0.clone(), name);
                if let Some(n) = self.offered_names.get_mut(&entry) {
                    *n -= 1;
                    if *n == 0 {
                        self.offered_names.remove(&entry);
                    }
                }
            }
        }
        Some(out)
    }

    /// The items of an offer we made that is still open, each named as users know it
    /// (its root once hashed, else the key it was shared under).
    pub fn offer_items(&self, peer: &PeerId, offer_id: u64) -> Option<Vec<OfferItem>> {
        self.outgoing.get(&(peer.clone(), offer_id)).map(|o| {
            o.items
                .iter()
                .zip(&o.locals)
                .map(|(i, l)| OfferItem { root: self.share_name(l), ..i.clone() })
                .collect()
        })
    }

    /// The items of an offer we made that is still open, as sent: each named by the key
    /// that peer knows it by (its root, or the stream key made for that peer).
    pub fn offer_items_sent(&self, peer: &PeerId, offer_id: u64) -> Option<Vec<OfferItem>> {
        self.outgoing.get(&(peer.clone(), offer_id)).map(|o| o.items.clone())
    }

    /// Whether two names (a local key, stream key or root) are of one shared file.
    pub fn same_shared_file(&self, a: &Root, b: &Root) -> bool {
        a == b || self.share_key(a).is_some_and(|k| self.share_key(b) == Some(k))
    }

    /// Offers received and not answered yet: (peer, offer id, items).
    pub fn pending_offers(&self) -> Vec<(PeerId, u64, Vec<OfferItem>)> {
        // By peer, then offer id: the map's order.
        self.incoming.iter().map(|((p, id), items)| (p.clone(), *id, items.clone())).collect()
    }

    /// The bytes of a requested chunk, read after [`Output::Read`].
    pub fn read_done(&mut self, peer: &PeerId, root: &Root, index: u32, data: Vec<u8>) {
        if let Some(n) = self.reads_in_flight.get_mut(peer) {
            *n = n.saturating_sub(1);
        }
        let slot = (peer.clone(), *root, index);
        let key = match self.reading.get_mut(&slot) {
            Some(keys) => {
                let key = keys.pop_front().unwrap_or(*root);
                if keys.is_empty() {
                    self.reading.remove(&slot);
                }
                key
            }
            None => *root,
        };
        if self.peers.contains(peer) && self.fetchers.contains_key(&(peer.clone(), key)) {
            self.send(peer, TransferMsg::Chunk { root: key, index, data });
        }
        self.pump_reads(peer);
    }

    /// A shared file could not be read: it is no longer served, and peers fetching it
    /// are told so (in the words of `reason`).
    pub fn read_failed(&mut self, peer: &PeerId, root: &Root, reason: ShareFailReason) {
        if let Some(n) = self.reads_in_flight.get_mut(peer) {
            *n = n.saturating_sub(1);
        }
        self.reading.retain(|(p, r, _), _| !(p == peer && r == root));
        self.share_failed(root, reason);
        self.pump_reads(peer);
    }

    /// A shared file (any of its names) cannot be read or hashed: it is no longer
    /// served, and peers fetching it are told so (in the words of `reason`).
    pub fn share_failed(&mut self, root: &Root, reason: ShareFailReason) {
        let text = reason.to_string();
        let key = self.share_key(root).unwrap_or(*root);
        let name = self.share_name(&key);
        let names = self.names_of(&key, root);
        if self.shared.remove(&key).is_some() {
            self.event(TransferEvent::ShareFailed { root: name, reason });
        }
        self.waiters.remove(&key);
        self.aliases.retain(|_, k| *k != key);
        let askers: Vec<(PeerId, Root)> =
            self.fetchers.keys().filter(|(_, r)| names.contains(r)).cloned().collect();
        for (p, r) in askers {
            if self.peers.contains(&p) {
                self.send(&p, TransferMsg::Missing { root: r, reason: text.clone() });
            }
        }
        self.grants.retain(|(_, l)| *l != key);
        self.fetchers.retain(|(_, r), _| !names.contains(r));
        for q in self.serve_queue.values_mut() {
            q.retain(|(r, _)| !names.contains(r));
        }
    }

    fn pump_reads(&mut self, peer: &PeerId) {
        loop {
            let n = self.reads_in_flight.get(peer).copied().unwrap_or(0);
            if n >= self.config.max_reads_in_flight {
                return;
            }
            let Some((key, index)) = self.serve_queue.get_mut(peer).and_then(VecDeque::pop_front)
            else {
                return;
            };
            let Some(local) = self.share_key(&key) else { continue };
            let Some((offset, len)) =
                self.shared.get(&local).and_then(|s| chunk_span(s.size, index))
            else {
                continue;
            };
            if key != local {
                self.reading.entry((peer.clone(), local, index)).or_default().push_back(key);
            }
            *self.reads_in_flight.entry(peer.clone()).or_default() += 1;
            self.out.push_back(Output::Read {
                peer: peer.clone(),
                root: local,
                index,
                offset,
                len,
            });
        }
    }

    // ---- receiving side ----

    /// Accepts `peer`'s offer: downloads start (or resume) with `peer` as a source, and
    /// other connected peers are asked whether they hold the same files.
    pub fn accept(
        &mut self,
        peer: &PeerId,
        offer_id: u64,
        now: Duration,
    ) -> Result<(), TransferError> {
        let items =
            self.incoming.remove(&(peer.clone(), offer_id)).ok_or(TransferError::UnknownOffer)?;
        self.send(peer, TransferMsg::Answer { offer_id, accept: true });
        self.start_downloads(peer, offer_id, &items, now);
        Ok(())
    }

    /// Sets the budget for downloads taken without asking (the user's `--max-pending`).
    pub fn set_pending_budget(&mut self, budget: super::limits::PendingBudget) {
        self.config.limits.pending = budget;
    }

    /// Accepts `peer`'s offer by a rule, without a person asking (`weft-peer receive
    /// --accept-from`): within the budget for downloads still to write
    /// ([`TransferLimits::pending`], [`super::limits::PendingBudget`]), given
    /// `free_space` on the download disk if the driver knows it. Past it, the offer is
    /// refused: the sender is told why, the refusal is counted, and
    /// [`TransferError::Limit`] says it here; what was accepted before goes on.
    pub fn accept_unasked(
        &mut self,
        peer: &PeerId,
        offer_id: u64,
        free_space: Option<u64>,
        now: Duration,
    ) -> Result<(), TransferError> {
        let key = (peer.clone(), offer_id);
        let items = self.incoming.get(&key).ok_or(TransferError::UnknownOffer)?;
        // Files already downloading (a resume, or offered twice) add nothing.
        let mut roots = HashSet::new();
        let new: u64 = items
            .iter()
            .filter(|i| self.download_key(&i.root).is_none() && roots.insert(i.root))
            .fold(0u64, |sum, i| sum.saturating_add(i.size));
        let (mut mine, mut total) = (0u64, 0u64);
        for d in self.downloads.values() {
            if matches!(d.state, DownloadState::Active | DownloadState::Paused) {
                let left = d.size.saturating_sub(d.done_bytes);
                total = total.saturating_add(left);
                if d.offers.iter().any(|(p, _)| p == peer) {
                    mine = mine.saturating_add(left);
                }
            }
        }
        if let Err(reason) = self.config.limits.pending.check(mine, total, new, free_space) {
            self.incoming.remove(&key);
            self.refuse_offer(peer, offer_id, reason.clone());
            return Err(TransferError::Limit(reason));
        }
        self.accept(peer, offer_id, now)
    }

    /// The key a download is stored under, found by that key or its verified root.
    fn download_key(&self, name: &Root) -> Option<Root> {
        if self.downloads.contains_key(name) {
            return Some(*name);
        }
        self.names.get(name).copied().filter(|k| self.downloads.contains_key(k))
    }

    fn start_downloads(
        &mut self,
        peer: &PeerId,
        offer_id: u64,
        items: &[OfferItem],
        now: Duration,
    ) {
        let others: Vec<PeerId> = self.peers.iter().filter(|p| *p != peer).cloned().collect();
        let sender = self.identity_of(peer);
        for item in items {
            let existing = self.download_key(&item.root);
            if existing
                .and_then(|k| self.downloads.get(&k))
                .is_some_and(|d| d.state == DownloadState::Complete)
            {
                // We have it already: tell the sender at once, so it does not wait.
                self.send(peer, TransferMsg::Complete { root: item.root });
                continue;
            }
            let key = existing.unwrap_or(item.root);
            let own = self.own;
            let d = self.downloads.get_or_insert_with(key, || {
                let mut d = Download::new(item.size, vec![]);
                if item.streamed {
                    d.sender = Some(sender);
                    if d.chunks == 0 {
                        // An empty file has one possible hash.
                        d.root = Some(Root::of(b""));
                    }
                } else {
                    d.root = Some(item.root);
                    d.root_trusted = true;
                }
                d
            });
            if d.size != item.size {
                // Same hash, different size: a lie (or a collision); keep what we have.
                continue;
            }
            if d.pre_root() && d.sender.is_none() {
                d.sender = Some(sender);
            }
            if !d.paths.contains(&item.path) {
                d.paths.push(item.path.clone());
            }
            if !d.offers.contains(&(peer.clone(), offer_id)) {
                d.offers.push((peer.clone(), offer_id));
            }
            if !d.caps.contains(&item.cap) && d.caps.len() < MAX_CAPS {
                d.caps.push(item.cap);
            }
            if d.state == DownloadState::Failed {
                d.state = DownloadState::Active;
            }
            let ask_others = !d.pre_root();
            let query = Self::query_key(d, &key);
            let queries = Self::queries(d, query, &own);
            self.check_root(&key, now);
            self.add_source(&key, peer, item.root, item.cap.proof(&item.root, &own));
            if ask_others {
                for other in &others {
                    for msg in &queries {
                        self.send(other, msg.clone());
                    }
                }
            }
            self.try_complete(&key);
        }
        self.schedule(now);
    }

    /// Checks a download's CVs against its root once both are there. A streamed
    /// download's root is then verified: it is known by it from now on and other holders
    /// are asked for it. A streamed download whose one source gave CVs that do not merge
    /// to the root it gave fails and is discarded (nothing of it can be trusted); a
    /// rooted one drops the source that gave the wrong list.
    fn check_root(&mut self, key: &Root, now: Duration) {
        let Some(d) = self.downloads.get_mut(key) else { return };
        let Some(root) = d.root else { return };
        if d.verified || (d.chunks >= 2 && d.cvs.len() < d.chunks as usize) {
            return;
        }
        let good = match d.chunks {
            0 => root == Root::of(b""),
            // Its only chunk is checked against the root itself.
            1 => true,
            _ => root_from_cvs(d.size, &d.cvs) == Some(root),
        };
        if good {
            let streamed = d.pre_root();
            d.verified = true;
            d.hash_source = None;
            if streamed {
                d.sender = None;
                let sources: Vec<PeerId> = d.sources.keys().cloned().collect();
                let queries = Self::queries(d, root, &self.own);
                self.names.insert(root, *key);
                self.event(TransferEvent::Verified { key: *key, root });
                let others: Vec<PeerId> =
                    self.peers.iter().filter(|p| !sources.contains(p)).cloned().collect();
                for p in others {
                    for msg in &queries {
                        self.send(&p, msg.clone());
                    }
                }
            }
            return;
        }
        if d.chunks == 0 {
            d.state = DownloadState::Failed;
            self.event(TransferEvent::FileFailed {
                root: *key,
                key: *key,
                reason: FailReason::NotVerified,
            });
        } else if d.pre_root() {
            self.fail_streamed(key);
        } else {
            d.cvs.clear();
            d.cv_hasher = blake3::Hasher::new();
            let source = d.hash_source.take().map(|(p, _)| p);
            if let Some(p) = source {
                self.drop_source(key, &p, DropReason::WrongHashes, now);
            }
        }
    }

    /// A streamed download's one source gave CVs and a root that disagree: every byte
    /// of it came from that source, so the file fails and what was stored is discarded.
    fn fail_streamed(&mut self, key: &Root) {
        tracing::warn!("the sender's hashes of {key:?} do not give the root it sent");
        self.downloads.remove(key);
        self.event(TransferEvent::FileFailed {
            root: *key,
            key: *key,
            reason: FailReason::WrongRoot,
        });
        self.out.push_back(Output::Discard { root: *key });
    }

    /// Completes a download whose chunks are all written, once its root is verified.
    fn try_complete(&mut self, key: &Root) {
        let ready = self.downloads.get(key).is_some_and(|d| {
            matches!(d.state, DownloadState::Active | DownloadState::Paused)
                && d.is_finished()
                && d.writing.is_empty()
                && d.verified
        });
        if ready {
            self.complete(key);
        }
    }

    /// Declines `peer`'s offer.
    pub fn decline(&mut self, peer: &PeerId, offer_id: u64) -> Result<(), TransferError> {
        self.incoming.remove(&(peer.clone(), offer_id)).ok_or(TransferError::UnknownOffer)?;
        self.send(peer, TransferMsg::Answer { offer_id, accept: false });
        Ok(())
    }

    /// Whether `(peer, offer_id)` names an offer we received (pending or accepted).
    pub fn is_incoming(&self, peer: &PeerId, offer_id: u64) -> bool {
        let key = (peer.clone(), offer_id);
        self.incoming.contains_key(&key) || self.downloads.values().any(|d| d.offers.contains(&key))
    }

    /// Cancels an offer we made (`outgoing`) or received. The peer is told (the text of
    /// `reason`); a received offer's unfinished downloads are discarded (unless another
    /// offer still wants them).
    pub fn cancel(
        &mut self,
        peer: &PeerId,
        offer_id: u64,
        outgoing: bool,
        reason: CancelReason,
    ) -> Result<(), TransferError> {
        let key = (peer.clone(), offer_id);
        if outgoing {
            let out = self.take_outgoing(&key).ok_or(TransferError::UnknownOffer)?;
            self.stop_serving(peer, &out.items);
        } else if !(self.incoming.remove(&key).is_some()
            | self.drop_offer_downloads(peer, offer_id))
        {
            return Err(TransferError::UnknownOffer);
        }
        if self.peers.contains(peer) {
            let own_offer = outgoing;
            self.send(
                peer,
                TransferMsg::Cancel { offer_id, own_offer, reason: reason.to_string() },
            );
        }
        self.event(TransferEvent::Cancelled {
            peer: peer.clone(),
            offer_id,
            reason,
            by_peer: false,
            outgoing,
        });
        Ok(())
    }

    fn stop_serving(&mut self, peer: &PeerId, items: &[OfferItem]) {
        let tag = self.identity_of(peer);
        for item in items {
            let Some(local) = self.share_key(&item.root) else { continue };
            self.grants.remove(&(tag, local));
            self.revoked.insert((tag, local));
            let names = self.names_of(&local, &item.root);
            self.fetchers.retain(|(p, r), _| !(p == peer && names.contains(r)));
        }
        if let Some(q) = self.serve_queue.get_mut(peer) {
            q.retain(|(r, _)| !items.iter().any(|i| i.root == *r));
        }
    }

    /// Drops the downloads that only `(peer, offer_id)` wanted. Whether the offer existed.
    fn drop_offer_downloads(&mut self, peer: &PeerId, offer_id: u64) -> bool {
        let key = (peer.clone(), offer_id);
        let mut found = false;
        let mut discard = Vec::new();
        for (root, d) in self.downloads.iter_mut() {
            if let Some(pos) = d.offers.iter().position(|o| *o == key) {
                found = true;
                d.offers.remove(pos);
                if d.offers.is_empty() && d.state != DownloadState::Complete {
                    discard.push(*root);
                }
            }
        }
        for root in discard {
            self.downloads.remove(&root);
            self.out.push_back(Output::Discard { root });
        }
        found
    }

    /// Pauses or resumes fetching `root`.
    pub fn set_paused(
        &mut self,
        root: &Root,
        paused: bool,
        now: Duration,
    ) -> Result<(), TransferError> {
        let key = self.download_key(root).ok_or(TransferError::UnknownFile)?;
        let d = self.downloads.get_mut(&key).ok_or(TransferError::UnknownFile)?;
        match (d.state, paused) {
            (DownloadState::Active, true) => d.state = DownloadState::Paused,
            (DownloadState::Paused, false) => d.state = DownloadState::Active,
            _ => return Ok(()),
        }
        self.schedule(now);
        Ok(())
    }

    /// A chunk from [`Output::Write`] is durably stored.
    pub fn write_done(&mut self, root: &Root, index: u32, now: Duration) {
        let Some(key) = self.download_key(root) else { return };
        let Some(d) = self.downloads.get_mut(&key) else { return };
        if !d.writing.remove(&index) {
            return;
        }
        d.set_have(index);
        d.done_bytes += chunk_span(d.size, index).map_or(0, |(_, len)| len as u64);
        self.try_complete(&key);
        self.schedule(now);
    }

    /// A chunk could not be written: the download fails with `reason` (say, the disk
    /// is full). What was stored stays, so it can resume later.
    pub fn write_failed(&mut self, root: &Root, reason: FailReason) {
        let Some(key) = self.download_key(root) else { return };
        let name = self.downloads.get(&key).map_or(key, |d| d.name(&key));
        let Some(d) = self.downloads.get_mut(&key) else { return };
        if d.state == DownloadState::Failed {
            return;
        }
        d.state = DownloadState::Failed;
        d.writing.clear();
        d.inflight.clear();
        d.retry.clear();
        d.cursor = 0;
        for s in d.sources.values_mut() {
            s.inflight = 0;
        }
        self.event(TransferEvent::FileFailed { root: name, key, reason });
    }

    fn complete(&mut self, key: &Root) {
        let Some(d) = self.downloads.get_mut(key) else { return };
        // Every chunk matched its CV and the CVs merged to the root; recompute anyway.
        let verified = d.verified
            && match (d.chunks, d.root) {
                (_, None) => false,
                (0, Some(root)) => root == Root::of(b""),
                (1, Some(_)) => true, // its only chunk was checked against the root itself
                (_, Some(root)) => root_from_cvs(d.size, &d.cvs) == Some(root),
            };
        if !verified {
            d.state = DownloadState::Failed;
            let reason = FailReason::NotVerified;
            self.event(TransferEvent::FileFailed { root: *key, key: *key, reason });
            return;
        }
        let root = d.root.unwrap_or(*key);
        d.state = DownloadState::Complete;
        d.sources.clear();
        d.inflight.clear();
        let (size, paths, cvs, held) = (d.size, d.paths.clone(), d.cvs.clone(), d.caps.clone());
        let offerers: Vec<PeerId> = d.offers.iter().map(|(p, _)| p.clone()).collect();
        // Served to those who prove a capability it came with, not to anyone who can
        // name it (`core/TRANSFER.md`, "Who may fetch what").
        let shared = Shared { size, cvs, root: Some(root), streamed: false, held };
        self.shared.insert(*key, shared);
        if root != *key {
            self.aliases.insert(root, *key);
        }
        // Named as the offers named it: a sender still hashing (an empty file completes
        // at once) knows its stream key before its root.
        for p in offerers {
            if self.peers.contains(&p) {
                self.send(&p, TransferMsg::Complete { root: *key });
            }
        }
        self.event(TransferEvent::FileComplete { root, key: *key, paths, size });
    }

    /// What to persist for `root` (its key or verified root), to [`Self::restore`] after
    /// a reload.
    pub fn record(&self, root: &Root) -> Option<DownloadRecord> {
        let key = self.download_key(root)?;
        self.downloads.get(&key).map(|d| d.record(key))
    }

    /// Resumes a download from a record: chunks it marks are trusted to be on disk (the
    /// driver wrote them, and only confirmed them once durable). Sources are found by
    /// asking peers as they connect, or when someone offers the file again. A streamed
    /// download saved before its root was verified waits for its sender, and trusts its
    /// stored chunks only once the CVs it gets again hash to the saved digest.
    pub fn restore(&mut self, record: DownloadRecord) {
        let key = record.root;
        let mut d = Download::new(record.size, record.paths);
        d.caps = record.caps;
        d.caps.truncate(MAX_CAPS);
        if record.have.len() == d.have.len() {
            d.have = record.have;
        }
        match (record.streamed, record.hash) {
            (false, _) => {
                d.root = Some(key);
                d.root_trusted = true;
            }
            (true, Some(hash)) => {
                d.root = Some(hash);
                d.root_trusted = true;
                self.names.insert(hash, key);
            }
            (true, None) => {
                d.sender = record.sender;
                d.cv_check = record.cv_digest;
                if d.chunks == 0 {
                    d.root = Some(Root::of(b""));
                }
                // Chunks past the CVs they were checked against cannot be trusted.
                let checked = d.cv_check.map_or(0, |(n, _)| n);
                for i in checked..d.chunks {
                    if let Some(b) = d.have.get_mut(i as usize / 8) {
                        *b &= !(1 << (i % 8));
                    }
                }
            }
        }
        d.have_count = u32::try_from((0..d.chunks).filter(|i| d.has(*i)).count()).unwrap_or(0);
        d.done_bytes = (0..d.chunks)
            .filter(|i| d.has(*i))
            .map(|i| chunk_span(d.size, i).map_or(0, |(_, l)| l as u64))
            .sum();
        d.state = match record.state {
            DownloadState::Failed => DownloadState::Active,
            s => s,
        };
        self.downloads.insert(key, d);
        // A file of at most one chunk needs no CV list.
        self.check_root(&key, Duration::ZERO);
        if self.downloads.get(&key).is_some_and(|d| d.state == DownloadState::Active) {
            self.try_complete(&key);
        }
    }

    /// Every download and how far it is.
    pub fn downloads(&self) -> Vec<DownloadProgress> {
        self.downloads.iter().map(|(root, d)| self.progress_of(root, d)).collect()
    }

    /// How far the download of `root` (its key or verified root) is.
    pub fn progress(&self, root: &Root) -> Option<DownloadProgress> {
        let key = self.download_key(root)?;
        self.downloads.get(&key).map(|d| self.progress_of(&key, d))
    }

    fn progress_of(&self, key: &Root, d: &Download) -> DownloadProgress {
        DownloadProgress {
            root: d.name(key),
            key: *key,
            hash: d.root.filter(|_| !d.pre_root()),
            paths: d.paths.clone(),
            size: d.size,
            done_bytes: d.done_bytes,
            sources: d.sources.keys().cloned().collect(),
            offers: d.offers.clone(),
            state: d.state,
        }
    }

    /// Forgets a finished or failed download (its file stays wherever the driver put it).
    pub fn forget(&mut self, root: &Root) {
        let Some(key) = self.download_key(root) else { return };
        if let Some(d) = self.downloads.remove(&key) {
            self.names.retain(|_, k| *k != key);
            if d.state != DownloadState::Complete {
                self.out.push_back(Output::Discard { root: key });
            }
        }
    }

    // ---- messages ----

    /// Handles one file-transfer frame from `peer` as it came off the wire (a chunk's body
    /// becomes its data without a copy). An offer it
    /// must refuse (a path that is unsafe to save: see [`check_path`]) is answered with a
    /// `Cancel` that says why, and reported as cancelled here, so neither side waits for
    /// an answer that never comes; any other frame that does not decode is dropped.
    pub fn handle_frame(&mut self, peer: &PeerId, frame_type: u8, body: Vec<u8>, now: Duration) {
        let offer_id = super::wire::offer_frame_id(frame_type, &body);
        match TransferMsg::decode_owned(frame_type, body) {
            Ok(msg) => self.handle(peer, msg, now),
            Err(e @ WireError::UnsafeOffer { offer_id, .. }) => {
                tracing::warn!("refused an offer from {peer}: {e}");
                // Its later parts are not taken for a new offer.
                self.limits.partial.remove(&(peer.clone(), offer_id));
                self.limits.refused((peer.clone(), offer_id));
                let reason = e.to_string();
                self.send(
                    peer,
                    TransferMsg::Cancel { offer_id, own_offer: false, reason: reason.clone() },
                );
                self.event(TransferEvent::Cancelled {
                    peer: peer.clone(),
                    offer_id,
                    reason: CancelReason::Text(reason),
                    by_peer: false,
                    outgoing: false,
                });
            }
            Err(e) => match offer_id {
                Some(offer_id) => {
                    let reason = LimitReason::UnreadableOffer(e.to_string());
                    self.refuse_offer(peer, offer_id, reason);
                }
                None => tracing::warn!("bad file-transfer message from {peer}: {e}"),
            },
        }
    }

    /// A file-transfer message from `peer`.
    pub fn handle(&mut self, peer: &PeerId, msg: TransferMsg, now: Duration) {
        match msg {
            TransferMsg::Offer { offer_id, items } => {
                if let Some(items) = self.whole_offer(peer, offer_id, items) {
                    self.on_offer(peer, offer_id, items, now);
                }
            }
            TransferMsg::OfferPart { offer_id, items } => self.on_offer_part(peer, offer_id, items),
            TransferMsg::Answer { offer_id, accept } => {
                let Some(out) = self.outgoing.get_mut(&(peer.clone(), offer_id)) else { return };
                if out.accepted.is_some() {
                    return;
                }
                out.accepted = Some(accept);
                if !accept {
                    let items = self.take_outgoing(&(peer.clone(), offer_id)).map(|o| o.items);
                    self.stop_serving(peer, &items.unwrap_or_default());
                }
                self.event(TransferEvent::Answered {
                    peer: peer.clone(),
                    offer_id,
                    accepted: accept,
                });
            }
            TransferMsg::HashRequest { root, proof, first, count } => {
                if !self.authorized(peer, &root, &proof) {
                    let reason = "not shared with you".to_string();
                    return self.send(peer, TransferMsg::Missing { root, reason });
                }
                self.fetchers.insert((peer.clone(), root), proof);
                self.queue_hash_request(peer, root, first, count, now);
            }
            TransferMsg::Root { key, root } => self.on_root(peer, key, root, now),
            TransferMsg::Hashes { root, first, cvs } => self.on_hashes(peer, root, first, cvs, now),
            TransferMsg::ChunkRequest { root, proof, index } => {
                if !self.authorized(peer, &root, &proof) {
                    let reason = "not shared with you".to_string();
                    return self.send(peer, TransferMsg::Missing { root, reason });
                }
                self.fetchers.insert((peer.clone(), root), proof);
                let q = self.serve_queue.entry(peer.clone()).or_default();
                if q.len() < self.config.max_serve_queue {
                    q.push_back((root, index));
                }
                self.pump_reads(peer);
            }
            TransferMsg::Chunk { root, index, data } => self.on_chunk(peer, root, index, data, now),
            TransferMsg::Missing { root, reason } => {
                let key = self.download_key(&root).unwrap_or(root);
                self.drop_source(&key, peer, DropReason::Missing(reason), now);
                self.schedule(now);
            }
            TransferMsg::Cancel { offer_id, own_offer, reason } => {
                let key = (peer.clone(), offer_id);
                self.limits.partial.remove(&key);
                // Their own offer is one we receive; otherwise it is ours.
                let outgoing = !own_offer;
                let known = if outgoing {
                    let out = self.take_outgoing(&key);
                    let items = out.map(|o| o.items);
                    let known = items.is_some();
                    self.stop_serving(peer, &items.unwrap_or_default());
                    known
                } else {
                    self.incoming.remove(&key).is_some() | self.drop_offer_downloads(peer, offer_id)
                };
                if known {
                    let ev = TransferEvent::Cancelled {
                        peer: peer.clone(),
                        offer_id,
                        reason: CancelReason::from_wire(reason),
                        by_peer: true,
                        outgoing,
                    };
                    self.event(ev);
                }
                self.schedule(now);
            }
            TransferMsg::Query { root, proof } => {
                // Knowing a file's hash is not enough: the asker proves a capability an
                // offer gave it. Otherwise no answer, as when we do not hold the file.
                if self.authorized(peer, &root, &proof) {
                    self.fetchers.insert((peer.clone(), root), proof);
                    self.send(peer, TransferMsg::Have { root, proof });
                }
            }
            TransferMsg::Have { root, proof } => {
                let Some(key) = self.download_key(&root) else { return };
                let own = self.own;
                // Which of our capabilities it took (one of our queries' proofs).
                let ours = self.downloads.get(&key).is_some_and(|d| {
                    d.state != DownloadState::Complete
                        && d.caps.iter().any(|c| c.opens(&proof, &root, &own))
                });
                if ours {
                    self.add_source(&key, peer, root, proof);
                    self.schedule(now);
                }
            }
            TransferMsg::Complete { root } => {
                // Any open offer to it of this file, by the name offered or its local key
                // (an index: a `Complete` for each of 10,000 files looked through all
                // 10,000 items each time).
                let named = |name: Root| self.offered_names.contains_key(&(peer.clone(), name));
                let offered = named(root) || self.share_key(&root).is_some_and(named);
                if offered {
                    let name = self.share_key(&root).map_or(root, |k| self.share_name(&k));
                    self.event(TransferEvent::Delivered { peer: peer.clone(), root: name });
                }
            }
        }
    }

    fn on_offer(&mut self, peer: &PeerId, offer_id: u64, items: Vec<OfferItem>, now: Duration) {
        let key = (peer.clone(), offer_id);
        if self.incoming.contains_key(&key)
            || self.downloads.values().any(|d| d.offers.contains(&key))
        {
            return;
        }
        // Files we are already fetching: the user accepted them before (a reload or a
        // dropped connection), so the transfer simply resumes.
        let resuming = !items.is_empty()
            && items.iter().all(|i| {
                self.download_key(&i.root)
                    .and_then(|k| self.downloads.get(&k))
                    .is_some_and(|d| d.size == i.size && d.state != DownloadState::Complete)
            });
        if resuming {
            self.send(peer, TransferMsg::Answer { offer_id, accept: true });
            self.start_downloads(peer, offer_id, &items, now);
            self.event(TransferEvent::Resumed { peer: peer.clone(), offer_id, items });
            return;
        }
        self.incoming.insert(key, items.clone());
        self.event(TransferEvent::Offered { peer: peer.clone(), offer_id, items });
    }

    /// A peer asks for CVs: those we have go at once; for a file still being hashed the
    /// request stays open ([`Self::feed_waiters`]) and ends with the root.
    /// Returns the bytes it queued.
    fn on_hash_request(&mut self, peer: &PeerId, key: Root, first: u32, count: u32) -> usize {
        let Some(local) = self.share_key(&key) else { return 0 };
        let Some(s) = self.shared.get(&local) else { return 0 };
        let total = s.cv_total();
        let first = first as usize;
        let end = first.saturating_add(count as usize).min(total);
        let upto = end.min(s.cvs.len());
        let mut sends = Vec::new();
        Self::cv_messages(&s.cvs, key, first, upto, &mut sends, peer);
        let open = upto < end || (s.root.is_none() && end == total);
        if let (false, Some(root)) = (open, s.root) {
            if end == total && root != key {
                sends.push((peer.clone(), TransferMsg::Root { key, root }));
            }
        }
        let bytes = super::limits::hashes_cost(upto.saturating_sub(first));
        for (p, msg) in sends {
            self.send(&p, msg);
        }
        if open {
            // One open request per peer and file: a new one replaces the old.
            let list = self.waiters.entry(local).or_default();
            list.retain(|w| !(w.peer == *peer && w.key == key));
            list.push(CvWaiter { peer: peer.clone(), key, next: upto.max(first), end });
        }
        bytes
    }

    fn on_hashes(&mut self, peer: &PeerId, name: Root, first: u32, cvs: Vec<Cv>, now: Duration) {
        let Some(key) = self.download_key(&name) else { return };
        let Some(d) = self.downloads.get_mut(&key) else { return };
        if d.verified || d.hash_source.as_ref().is_none_or(|(p, _)| p != peer) {
            return;
        }
        if cvs.is_empty()
            || first as usize != d.cvs.len()
            || d.cvs.len() + cvs.len() > d.cv_total() as usize
        {
            self.drop_source(&key, peer, DropReason::MalformedHashes, now);
            self.schedule(now);
            return;
        }
        cvs.iter().for_each(|cv| {
            d.cv_hasher.update(cv);
        });
        d.cvs.extend(cvs);
        if let Some((n, digest)) = d.cv_check {
            if d.cvs.len() >= n as usize {
                let mut h = blake3::Hasher::new();
                d.cvs[..n as usize].iter().for_each(|cv| {
                    h.update(cv);
                });
                if Root::from(h.finalize()) != digest {
                    // Not the list the stored chunks were checked against: fetch them
                    // all again.
                    tracing::warn!("the hashes of {key:?} changed since it was stored");
                    d.clear_have();
                }
                d.cv_check = None;
            }
        }
        self.check_root(&key, now);
        self.try_complete(&key);
        self.schedule(now);
    }

    /// The sender of a streamed download says what its root is.
    fn on_root(&mut self, peer: &PeerId, name: Root, root: Root, now: Duration) {
        let Some(key) = self.download_key(&name) else { return };
        let Some(d) = self.downloads.get_mut(&key) else { return };
        if !d.pre_root() || !d.sources.contains_key(peer) {
            return;
        }
        match d.root {
            Some(known) if known == root => return,
            // It changed its mind: nothing it sent can be trusted.
            Some(_) => return self.fail_streamed(&key),
            None => d.root = Some(root),
        }
        if d.cvs.len() >= d.cv_total() as usize {
            d.hash_source = None;
        }
        self.check_root(&key, now);
        self.try_complete(&key);
        self.schedule(now);
    }

    fn on_chunk(&mut self, peer: &PeerId, name: Root, index: u32, data: Vec<u8>, now: Duration) {
        let config = self.config;
        let Some(root) = self.download_key(&name) else { return };
        let Some(d) = self.downloads.get_mut(&root) else { return };
        if !d.sources.contains_key(peer)
            || d.has(index)
            || d.writing.contains(&index)
            || !matches!(d.state, DownloadState::Active | DownloadState::Paused)
        {
            return;
        }
        let requested = d.inflight.get(&index).is_some_and(|r| r.iter().any(|(p, _)| p == peer));
        if !requested {
            return;
        }
        // Before the root, only chunks whose CV came are asked for (and a file of one
        // chunk waits for its root): nothing is checked against an unknown value.
        let ok = index < d.request_limit()
            && verify_chunk(&d.root.unwrap_or(root), d.size, &d.cvs, index, &data);
        // This request is answered either way.
        let asked = d.inflight.get(&index).and_then(|r| r.iter().find(|(p, _)| p == peer));
        let took = asked.map(|(_, t)| now.saturating_sub(*t));
        if let Some(reqs) = d.inflight.get_mut(&index) {
            reqs.retain(|(p, _)| p != peer);
        }
        if let Some(s) = d.sources.get_mut(peer) {
            s.inflight = s.inflight.saturating_sub(1);
        }
        if !ok {
            let (failures, again) = d.sources.get_mut(peer).map_or((0, false), |s| {
                s.failures += 1;
                (s.failures, !s.bad.insert(index))
            });
            let others = d.sources.len() > 1;
            if d.inflight.get(&index).is_some_and(Vec::is_empty) {
                d.inflight.remove(&index);
                d.retry.insert(index);
            }
            self.event(TransferEvent::ChunkRejected { root, index, peer: peer.clone() });
            // The same chunk bad twice: its copy is damaged (or it lies). Bad chunks in a
            // row: drop it if another source can take over; a lone source gets retries,
            // since nothing unverified is ever kept.
            if again {
                self.drop_source(&root, peer, DropReason::DamagedCopy, now);
            } else if failures >= config.max_source_failures && others {
                self.drop_source(&root, peer, DropReason::BadChunks, now);
            }
            self.schedule(now);
            return;
        }
        if let Some(s) = d.sources.get_mut(peer) {
            s.failures = 0;
            if let Some(took) = took {
                s.pace.answered(took);
            }
            s.window = s.pace.next_window(s.window, MIN_WINDOW, config.max_window);
        }
        // Duplicates of this chunk asked of others (endgame) are moot now.
        if let Some(reqs) = d.inflight.remove(&index) {
            for (p, _) in reqs {
                if let Some(s) = d.sources.get_mut(&p) {
                    s.inflight = s.inflight.saturating_sub(1);
                }
            }
        }
        d.writing.insert(index);
        let offset = u64::from(index) * super::hash::CHUNK_LEN as u64;
        self.out.push_back(Output::Write { root, index, offset, data });
        self.schedule(now);
    }

    // ---- timing ----

    /// When [`Self::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let (timeout, endgame) = (self.config.request_timeout, self.config.endgame_after);
        // Only downloads that may have a timer (`transfer/active.rs`), not every one.
        self.downloads
            .maybe_timed()
            .into_iter()
            .filter(|d| d.state == DownloadState::Active)
            .flat_map(|d| {
                // The endgame wakes earlier than timeouts, once there are 2+ sources; but
                // only once per request: if no source was idle to ask again when it woke,
                // a chunk arriving (which schedules) frees one, not the timer. Waking
                // again at the same past instant would spin the driver's timer until the
                // request timed out.
                let endgame_on = d.all_requested() && d.sources.len() > 1;
                let ran = self.timeouts_run_at;
                let sources = &d.sources;
                let chunks = d.inflight.values().flatten().map(move |(p, t)| {
                    let early = t.saturating_add(endgame);
                    if endgame_on && ran.is_none_or(|r| early > r) {
                        early
                    } else {
                        t.saturating_add(
                            sources.get(p).map_or(timeout, |s| s.pace.timeout(timeout)),
                        )
                    }
                });
                chunks
                    .chain(d.hash_source.as_ref().map(|(_, due)| *due))
                    .chain(d.requery_at.filter(|_| !self.peers.is_empty()))
            })
            .chain(self.hash_queue_timeout())
            .min()
    }

    /// Re-requests what timed out and drops sources that keep timing out.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.timeouts_run_at = Some(now);
        let config = self.config;
        let mut dropped = Vec::new();
        for (root, d) in self.downloads.iter_mut() {
            if let Some((p, due)) = d.hash_source.clone() {
                if now >= due {
                    dropped.push((*root, p, DropReason::HashesTimedOut));
                }
            }
            // Each source's requests expire after its own timeout (longer for a source
            // whose answers are slow). All those that expire in one run are one failure
            // of that source: one stall, not one per request it had outstanding.
            let timeouts: SortedMap<PeerId, Duration> = d
                .sources
                .iter()
                .map(|(p, s)| (p.clone(), s.pace.timeout(config.request_timeout)))
                .collect();
            let mut expired: SortedMap<PeerId, u32> = SortedMap::new();
            for (index, reqs) in d.inflight.iter_mut() {
                reqs.retain(|(p, t)| {
                    let limit = timeouts.get(p).copied().unwrap_or(config.request_timeout);
                    let late = now >= t.saturating_add(limit);
                    if late {
                        *expired.entry(p.clone()).or_default() += 1;
                    }
                    !late
                });
                if reqs.is_empty() {
                    d.retry.insert(*index);
                }
            }
            d.inflight.retain(|_, reqs| !reqs.is_empty());
            for (p, count) in expired {
                if let Some(s) = d.sources.get_mut(&p) {
                    s.inflight = s.inflight.saturating_sub(count);
                    s.failures += 1;
                    s.window = (s.window / 2).max(1);
                    if s.failures >= config.max_source_failures {
                        dropped.push((*root, p, DropReason::StoppedAnswering));
                    }
                }
            }
        }
        for (root, peer, reason) in dropped {
            self.drop_source(&root, &peer, reason, now);
        }
        self.requery(now);
        self.serve_hash_queues(now);
        self.schedule(now);
    }

    /// Downloads with no source whose time has come ask every connected peer again.
    fn requery(&mut self, now: Duration) {
        let every = self.config.requery_every;
        let mut queries = Vec::new();
        for (root, d) in self.downloads.iter_mut() {
            let due = d.requery_at.is_some_and(|t| t <= now);
            if due && d.sources.is_empty() && d.state == DownloadState::Active {
                d.requery_at = Some(now.saturating_add(every));
                queries.push(*root);
            } else if due {
                d.requery_at = None;
            }
        }
        let peers: Vec<PeerId> = self.peers.iter().cloned().collect();
        for key in queries {
            let Some(d) = self.downloads.get(&key) else { continue };
            let queries = Self::queries(d, Self::query_key(d, &key), &self.own);
            // Before its root, a streamed download asks its sender only.
            let asked: Vec<&PeerId> = peers.iter().filter(|p| self.may_source(d, p)).collect();
            let sends: Vec<(PeerId, TransferMsg)> = asked
                .into_iter()
                .flat_map(|p| queries.iter().map(|m| (p.clone(), m.clone())))
                .collect();
            for (peer, msg) in sends {
                self.send(&peer, msg);
            }
        }
    }

    /// Sends requests while windows have room. Visits only the downloads the index says
    /// may have work (`transfer/active.rs`), in key order, as it once visited them all.
    fn schedule(&mut self, now: Duration) {
        self.downloads.flush();
        let mut budget = self.config.max_unwritten.saturating_sub(self.downloads.unwritten());
        let cutoff = now.checked_sub(self.config.endgame_after);
        let mut sends = Vec::new();
        let mut at = None;
        // Past the budget, only hash-list requests (which it does not limit) are sent.
        while let Some(root) = self.downloads.next_candidate(at.as_ref(), budget > 0) {
            at = Some(root);
            self.examined += 1;
            let Some(d) = self.downloads.sched_mut(&root) else { break };
            let with_budget = budget > 0;
            let idle =
                Self::schedule_one(&self.config, &root, d, now, cutoff, &mut budget, &mut sends);
            // A download cut short by the budget keeps its place.
            self.downloads.settle(&root, idle && with_budget && budget > 0);
        }
        #[cfg(debug_assertions)]
        self.check_index(cutoff);
        for (peer, msg) in sends {
            self.send(&peer, msg);
        }
    }

    /// One download's requests (see [`Self::schedule`]). Whether it has nothing left to
    /// ask for until something about it changes: a chunk, a source, its state or its
    /// CVs (which touch it), or time, for a download in its endgame (which stays).
    fn schedule_one(
        config: &EngineConfig,
        root: &Root,
        d: &mut Download,
        now: Duration,
        cutoff: Option<Duration>,
        budget: &mut usize,
        sends: &mut Vec<(PeerId, TransferMsg)>,
    ) -> bool {
        if d.state != DownloadState::Active || d.sources.is_empty() {
            return true;
        }
        // CVs (and a streamed file's root) come from one source, asked once for the
        // whole list, which it sends as it has them.
        let have = u32::try_from(d.cvs.len()).unwrap_or(u32::MAX);
        let needs_cvs = !d.verified && (have < d.cv_total() || d.root.is_none());
        if needs_cvs && d.hash_source.is_none() {
            if let Some((p, s)) = d.sources.iter().next() {
                let count = d.cv_total().saturating_sub(have);
                let msg = TransferMsg::HashRequest {
                    root: s.key.unwrap_or(*root),
                    proof: s.proof,
                    first: have,
                    count,
                };
                sends.push((p.clone(), msg));
                // Due from the request, however the list trickles in.
                let allowed = config.limits.hash_list_allowance(config.request_timeout, count);
                d.hash_source = Some((p.clone(), now.saturating_add(allowed)));
            }
        }
        if d.request_limit() == 0 {
            return true;
        }
        // Round-robin over sources, one request at a time, until windows are full;
        // a source whose window has only a slot or two free waits for more.
        let left = d.left();
        let peers: Vec<PeerId> = d
            .sources
            .iter()
            .filter(|(_, s)| s.has_room(config, left))
            .map(|(p, _)| p.clone())
            .collect();
        loop {
            let mut progressed = false;
            for p in &peers {
                if *budget == 0 {
                    break;
                }
                let Some(s) = d.sources.get(p) else { continue };
                if s.inflight >= s.window {
                    continue;
                }
                let (key, proof) = (s.key.unwrap_or(*root), s.proof);
                let Some(index) =
                    d.next_wanted().or_else(|| cutoff.and_then(|c| d.duplicate_for(p, c)))
                else {
                    continue;
                };
                d.inflight.entry(index).or_default().push((p.clone(), now));
                if let Some(s) = d.sources.get_mut(p) {
                    s.inflight += 1;
                }
                *budget -= 1;
                progressed = true;
                sends.push((p.clone(), TransferMsg::ChunkRequest { root: key, proof, index }));
            }
            if !progressed {
                break;
            }
        }
        // In the endgame, a request growing old makes it ask another source: time, not
        // an event, gives it work.
        let endgame = d.all_requested() && d.sources.len() > 1 && !d.inflight.is_empty();
        // A source left out above for lack of room may pass now that fewer chunks are
        // left (`left` shrank): the next schedule asks it, as it always did.
        let limit = d.request_limit();
        let more = d.cursor < limit || d.retry.first().is_some_and(|i| *i < limit);
        let left = d.left();
        let room = d.sources.values().any(|s| s.has_room(config, left));
        !(endgame || (more && room))
    }

    /// Debug builds: the index left out no download that has work now, and its count of
    /// unwritten chunks is the sum. Each check looks at every download, so with many it
    /// runs at every power of two of schedules only (the work stays O(n log n)).
    #[cfg(debug_assertions)]
    fn check_index(&self, cutoff: Option<Duration>) {
        if self.downloads.len() > 64 && !self.examined.is_power_of_two() {
            return;
        }
        debug_assert_eq!(self.downloads.unwritten(), self.downloads.unwritten_summed());
        let budget = self.config.max_unwritten > self.downloads.unwritten();
        for (root, d) in self.downloads.iter() {
            let (no_hashes, no_chunks, no_timers) = self.downloads.left_out(root);
            debug_assert!(!(no_timers && d.has_timers()), "{root} has a timer, unindexed");
            let live = d.state == DownloadState::Active && !d.sources.is_empty();
            let have = u32::try_from(d.cvs.len()).unwrap_or(u32::MAX);
            let needs_cvs = !d.verified && (have < d.cv_total() || d.root.is_none());
            debug_assert!(
                !(no_hashes && live && needs_cvs && d.hash_source.is_none()),
                "{root} needs a hash list and is not indexed"
            );
            if no_chunks && budget && live {
                debug_assert!(!d.may_request(&self.config, cutoff), "{root} has work, unindexed");
            }
        }
    }
}

/// The caps on what a peer may ask (`super::limits`): offers in parts, refusals, the
/// hash-list queue.
impl Engine {
    /// What was refused to peers, counted by kind.
    pub fn refusals(&self) -> &Refusals {
        &self.limits.refusals
    }

    /// How many downloads the request scheduler has looked at so far, over all events:
    /// the measure of its work that tests and benches compare with the number of files
    /// (`core/TRANSFER.md`, "Many files").
    pub fn schedule_examined(&self) -> u64 {
        self.examined
    }

    /// Hash-list requests of `peer` waiting for their turn.
    pub fn queued_hash_requests(&self, peer: &PeerId) -> usize {
        self.limits.hash_queues.get(peer).map_or(0, |q| q.waiting.len())
    }

    /// Sends an offer, in parts if it is too large for one frame: `OfferPart`s, then
    /// the `Offer` with the last items.
    fn send_offer(&mut self, peer: &PeerId, offer_id: u64, items: Vec<OfferItem>) {
        let mut frames = self.config.limits.offer_frames(items);
        let last = frames.pop().unwrap_or_default();
        for items in frames {
            self.send(peer, TransferMsg::OfferPart { offer_id, items });
        }
        self.send(peer, TransferMsg::Offer { offer_id, items: last });
    }

    /// Refuses `peer`'s offer `offer_id`: the peer is sent the reason in a `Cancel`, the
    /// user sees it cancelled, the refusal is logged and counted, and what came of it is
    /// dropped (later parts of it too).
    fn refuse_offer(&mut self, peer: &PeerId, offer_id: u64, reason: LimitReason) {
        self.limits.refusals.count(peer, &reason);
        let key = (peer.clone(), offer_id);
        self.limits.partial.remove(&key);
        self.limits.refused(key);
        let text = reason.to_string();
        self.send(peer, TransferMsg::Cancel { offer_id, own_offer: false, reason: text.clone() });
        self.event(TransferEvent::Cancelled {
            peer: peer.clone(),
            offer_id,
            reason: CancelReason::Text(text),
            by_peer: false,
            outgoing: false,
        });
    }

    /// Whether `(peer, offer_id)` is an offer we know already (or refused).
    fn known_offer(&self, peer: &PeerId, offer_id: u64) -> bool {
        let key = (peer.clone(), offer_id);
        self.incoming.contains_key(&key)
            || self.limits.was_refused(&key)
            || self.downloads.values().any(|d| d.offers.contains(&key))
    }

    /// The first items of an offer too large for one frame: kept, within the caps, until
    /// the offer's last frame comes.
    fn on_offer_part(&mut self, peer: &PeerId, offer_id: u64, items: Vec<OfferItem>) {
        if self.known_offer(peer, offer_id) {
            return;
        }
        let limits = self.config.limits;
        let bytes: usize = items.iter().map(super::limits::encoded_len).sum();
        let (offers, pending) = self.limits.pending_of(peer, &self.incoming);
        let key = (peer.clone(), offer_id);
        let (new, held) =
            self.limits.partial.get(&key).map_or((true, 0), |p| (false, p.items.len()));
        let refusal = if new && offers >= limits.max_pending_offers {
            Some(LimitReason::TooManyPendingOffers { max: limits.max_pending_offers })
        } else if pending.saturating_add(bytes) > limits.max_pending_offer_bytes {
            Some(LimitReason::PendingOffersTooLarge { max: limits.max_pending_offer_bytes })
        } else if held + items.len() > limits.max_offer_items {
            Some(LimitReason::TooManyFiles { max: limits.max_offer_items })
        } else {
            limits.check_offer(&items).err()
        };
        if let Some(reason) = refusal {
            return self.refuse_offer(peer, offer_id, reason);
        }
        let part = self.limits.partial.entry(key).or_default();
        part.items.extend(items);
        part.bytes += bytes;
    }

    /// An offer's last frame: the whole offer (its parts before it, then these items),
    /// unless it is over a cap, when it is refused and `None` is returned.
    fn whole_offer(
        &mut self,
        peer: &PeerId,
        offer_id: u64,
        items: Vec<OfferItem>,
    ) -> Option<Vec<OfferItem>> {
        let key = (peer.clone(), offer_id);
        if self.limits.was_refused(&key) {
            return None;
        }
        if self.known_offer(peer, offer_id) {
            // A repeat: `on_offer` ignores it.
            return Some(items);
        }
        let limits = self.config.limits;
        let (mut all, held) =
            self.limits.partial.remove(&key).map_or((Vec::new(), 0), |p| (p.items, p.bytes));
        let bytes = held + items.iter().map(super::limits::encoded_len).sum::<usize>();
        all.extend(items);
        let (offers, pending) = self.limits.pending_of(peer, &self.incoming);
        let refusal = if offers >= limits.max_pending_offers {
            Some(LimitReason::TooManyPendingOffers { max: limits.max_pending_offers })
        } else if pending.saturating_add(bytes) > limits.max_pending_offer_bytes {
            Some(LimitReason::PendingOffersTooLarge { max: limits.max_pending_offer_bytes })
        } else {
            limits.check_offer(&all).err()
        };
        if let Some(reason) = refusal {
            self.refuse_offer(peer, offer_id, reason);
            return None;
        }
        self.limits.pending_bytes.insert(key, bytes);
        Some(all)
    }

    /// A hash-list request waits its turn in `peer`'s queue (one per file: a new one
    /// replaces the old), which is served within the peer's byte budget; past
    /// [`TransferLimits::max_queued_hash_requests`] it is refused with a `Missing`.
    fn queue_hash_request(
        &mut self,
        peer: &PeerId,
        key: Root,
        first: u32,
        count: u32,
        now: Duration,
    ) {
        let limits = self.config.limits;
        let q = self
            .limits
            .hash_queues
            .entry(peer.clone())
            .or_insert_with(|| HashQueue::new(&limits, now));
        let end = first.saturating_add(count);
        if let Some(queued) = q.waiting.iter_mut().find(|(k, _, _)| *k == key) {
            *queued = (key, first, end);
        } else if q.waiting.len() >= limits.max_queued_hash_requests {
            let reason = LimitReason::TooManyHashRequests { max: limits.max_queued_hash_requests };
            self.limits.refusals.count(peer, &reason);
            return self.send(peer, TransferMsg::Missing { root: key, reason: reason.to_string() });
        } else {
            q.waiting.push_back((key, first, end));
        }
        self.serve_hash_queue(peer, now);
    }

    /// Answers `peer`'s waiting hash-list requests while its budget lasts, a message of
    /// at most [`MAX_HASHES_PER_MSG`] values at a time; a file still being hashed gets
    /// the rest when it is hashed (its open request).
    fn serve_hash_queue(&mut self, peer: &PeerId, now: Duration) {
        let limits = self.config.limits;
        loop {
            let Some(q) = self.limits.hash_queues.get_mut(peer) else { return };
            let Some(&(key, first, end)) = q.waiting.front() else { return };
            if !q.ready(&limits, now) {
                return;
            }
            let hashed = self
                .share_key(&key)
                .and_then(|l| self.shared.get(&l))
                .map(|s| s.cvs.len().min(s.cv_total()));
            let slice_end = (first as usize).saturating_add(MAX_HASHES_PER_MSG);
            let bytes = match hashed {
                // Unshared since: nothing to send.
                None => 0,
                Some(hashed) if slice_end < (end as usize).min(hashed) => {
                    let bytes = self.on_hash_request(peer, key, first, MAX_HASHES_PER_MSG as u32);
                    let next = u32::try_from(slice_end).unwrap_or(u32::MAX);
                    if let Some(q) = self.limits.hash_queues.get_mut(peer) {
                        if let Some(front) = q.waiting.front_mut() {
                            *front = (key, next, end);
                        }
                        q.charge(bytes);
                    }
                    continue;
                }
                Some(_) => self.on_hash_request(peer, key, first, end - first),
            };
            if let Some(q) = self.limits.hash_queues.get_mut(peer) {
                q.waiting.pop_front();
                q.charge(bytes);
            }
        }
    }

    fn serve_hash_queues(&mut self, now: Duration) {
        let waiting: Vec<PeerId> = self
            .limits
            .hash_queues
            .iter()
            .filter(|(_, q)| !q.waiting.is_empty())
            .map(|(p, _)| p.clone())
            .collect();
        for peer in waiting {
            self.serve_hash_queue(&peer, now);
        }
    }

    /// When a peer's waiting hash-list requests may go on.
    fn hash_queue_timeout(&self) -> Option<Duration> {
        let limits = &self.config.limits;
        self.limits
            .hash_queues
            .values()
            .filter(|q| !q.waiting.is_empty())
            .map(|q| q.ready_at(limits))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resume record as saved before [`Root`] was a type of its own (the native peer's
    /// `.weft-partial/<root>.json`, the browser's IndexedDB): it must still load.
    #[test]
    fn a_record_saved_by_an_earlier_version_still_loads() {
        let saved = r#"{"root":[175,19,73,185,245,249,161,166,160,64,77,234,54,220,201,73,155,203,37,201,173,193,18,183,204,154,147,202,228,31,50,98],"size":200000,"paths":["photos/a.jpg"],"have":[5],"state":"Paused"}"#;
        let record: DownloadRecord = serde_json::from_str(saved).unwrap();
        assert_eq!(record.root, Root::of(b""));
        assert_eq!(
            record.root.to_string(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(record.size, 200_000);
        assert_eq!(record.state, DownloadState::Paused);
        // And it is saved the same way.
        assert_eq!(serde_json::to_string(&record).unwrap(), saved);
    }
}
