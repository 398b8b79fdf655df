//! The node's file-transfer glue around the [`Engine`](crate::transfer::Engine): what it
//! reports (progress at most 4 times a second, upload counts, a file's final place),
//! how often resume records are saved, how uploads are paced, and the state of the offers
//! we made. The engine decides the protocol; this decides what users see and when the
//! driver does I/O.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use crate::signal::PeerId;
use crate::sorted::SortedMap;
use crate::transfer::{DownloadProgress, OfferItem, Root, TransferEvent};

/// Where a node keeps what it downloads; decides what happens when a file completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadStore {
    /// Nowhere: offers cannot be accepted.
    None,
    /// Chunks are written in place and the complete file stays there (the browser's
    /// private storage): its record is kept, it is served to others, it resumes.
    Kept,
    /// Chunks are written to a partial file that moves to its final place when complete
    /// (a folder on disk): the record goes once the file is in place; it resumes.
    Folder,
    /// Each file is streamed, in order, somewhere the node cannot read back (a browser's
    /// downloads folder): no record, no resume, not served once complete.
    Streamed,
}

impl DownloadStore {
    /// Whether resume records are saved.
    pub fn keeps_records(self) -> bool {
        matches!(self, Self::Kept | Self::Folder)
    }
}

/// Where a complete file ended up, as the driver reports it ([`super::Input::FileSaved`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SavedTo {
    /// In the node's own storage (the browser's private file system).
    Kept,
    /// In the browser's downloads folder.
    Downloads,
    /// These files on disk, one per path it was offered under.
    Files(Vec<PathBuf>),
}

/// A download's progress, with its speed.
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadView {
    /// What the engine says.
    pub progress: DownloadProgress,
    /// Smoothed speed, bytes per second (0 unless active).
    pub speed_bps: f64,
    /// Time left at that speed.
    pub eta: Option<Duration>,
}

/// Where an offer we made is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferState {
    /// Not answered yet.
    Pending,
    /// Accepted: files are being fetched.
    Accepted,
    /// Declined.
    Declined,
    /// Every file was verified and stored by the receiver.
    Delivered,
    /// Cancelled by either side.
    Cancelled,
}

impl OfferState {
    /// Lowercase name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Accepted => "accepted",
            Self::Declined => "declined",
            Self::Delivered => "delivered",
            Self::Cancelled => "cancelled",
        }
    }
}

/// An offer we made, with how much of it was served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingView {
    /// To whom.
    pub peer: PeerId,
    /// Its number.
    pub offer_id: u64,
    /// The files.
    pub items: Vec<OfferItem>,
    /// Where it is.
    pub state: OfferState,
    /// Bytes read and sent for its files.
    pub sent_bytes: u64,
    /// Bytes of its files.
    pub total_bytes: u64,
}

/// An offer we received and have not answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingView {
    /// From whom.
    pub peer: PeerId,
    /// Its number.
    pub offer_id: u64,
    /// The files.
    pub items: Vec<OfferItem>,
}

/// Everything in flight ([`super::Node::transfers`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TransfersView {
    /// Downloads, by root.
    pub downloads: Vec<DownloadView>,
    /// Offers we made.
    pub outgoing: Vec<OutgoingView>,
    /// Offers waiting for an answer.
    pub incoming: Vec<IncomingView>,
}

/// What file transfer reports.
#[derive(Debug, Clone, PartialEq)]
pub enum FileEvent {
    /// An engine event. `FileComplete` is never passed on: [`FileEvent::Saved`] follows
    /// once the driver put the file in its place.
    Engine(TransferEvent),
    /// How far a download is (at most 4 times a second per file, and when it ends).
    Progress(DownloadView),
    /// Bytes of `root` served to `peer` so far (at most 4 times a second).
    Upload {
        /// To whom.
        peer: PeerId,
        /// Which file.
        root: Root,
        /// Bytes read and sent.
        sent_bytes: u64,
        /// Its size.
        size: u64,
    },
    /// A download saved before was found and continues.
    Restored(DownloadView),
    /// A download is complete, verified, and in its place.
    Saved {
        /// Which file (its hash).
        root: Root,
        /// The key it was offered and stored under (its stream key if it was offered
        /// before it was hashed, else its root).
        key: Root,
        /// The paths it was offered under.
        paths: Vec<String>,
        /// Its size.
        size: u64,
        /// Where it is.
        to: SavedTo,
    },
}

/// Speed of one download, smoothed.
#[derive(Debug, Default)]
pub(crate) struct Meter {
    last_at: Option<Duration>,
    last_bytes: u64,
    speed: f64,
    pub(crate) emitted_at: Option<Duration>,
}

impl Meter {
    pub(crate) fn sample(&mut self, now: Duration, bytes: u64, every: Duration) -> f64 {
        match self.last_at {
            Some(at) if now.saturating_sub(at) >= every => {
                let dt = now.saturating_sub(at).as_secs_f64();
                let rate = bytes.saturating_sub(self.last_bytes) as f64 / dt;
                self.speed = if self.speed == 0.0 { rate } else { 0.6 * rate + 0.4 * self.speed };
                self.last_at = Some(now);
                self.last_bytes = bytes;
            }
            Some(_) => {}
            None => {
                self.last_at = Some(now);
                self.last_bytes = bytes;
            }
        }
        self.speed
    }
}

#[derive(Debug)]
pub(crate) struct Outgoing {
    pub items: Vec<OfferItem>,
    pub state: OfferState,
    pub delivered: HashSet<Root>,
}

/// A chunk read the engine asked for, held back by the upload limit.
#[derive(Debug)]
pub(crate) struct PacedRead {
    pub at: Duration,
    pub peer: PeerId,
    pub root: Root,
    pub index: u32,
    pub offset: u64,
    pub len: usize,
}

/// The file-transfer state the node keeps beside the engine.
#[derive(Debug)]
pub(crate) struct FileGlue {
    pub store: DownloadStore,
    pub meters: HashMap<Root, Meter>,
    pub uploads: HashMap<(PeerId, Root), (u64, Option<Duration>)>,
    pub outgoing: SortedMap<(PeerId, u64), Outgoing>,
    pub shared_sizes: HashMap<Root, u64>,
    /// Downloads whose record changed since the last save.
    pub dirty: BTreeSet<Root>,
    pub save_due: Option<Duration>,
    /// A save is running in the driver.
    pub saving: bool,
    /// Complete downloads being put in place: storage key → (root, paths, size).
    pub finishing: HashMap<Root, (Root, Vec<String>, u64)>,
    /// Complete downloads waiting for the running save to end before they are put in
    /// place: (storage key, root, paths, size).
    pub finish_after_save: Vec<(Root, Root, Vec<String>, u64)>,
    /// Files shared before they were hashed so far (numbers their local keys).
    pub streamed_shares: u64,
    /// Local keys of the files shared before they were hashed ([`super::Node::share_streamed`]):
    /// they exist for the offers made of them, and stop being shared (and hashed) once
    /// every such offer was declined or cancelled.
    pub streamed: HashSet<Root>,
    /// Upload limit, bytes per second over all peers.
    pub upload_limit: Option<f64>,
    /// When the pacer lets the next chunk go.
    pub upload_next: Duration,
    pub paced: VecDeque<PacedRead>,
    /// Test hook: chunks to damage when read (root or any, index).
    pub corrupt: Vec<(Option<Root>, u32)>,
}

impl FileGlue {
    pub(crate) fn new(store: DownloadStore) -> Self {
        Self {
            store,
            meters: HashMap::new(),
            uploads: HashMap::new(),
            outgoing: SortedMap::new(),
            shared_sizes: HashMap::new(),
            dirty: BTreeSet::new(),
            save_due: None,
            saving: false,
            finishing: HashMap::new(),
            finish_after_save: Vec::new(),
            streamed_shares: 0,
            streamed: HashSet::new(),
            upload_limit: None,
            upload_next: Duration::ZERO,
            paced: VecDeque::new(),
            corrupt: Vec::new(),
        }
    }

    /// How long a chunk of `len` bytes waits under the upload limit: chunks leave evenly
    /// spaced at the limit's rate (a burst of at most one chunk).
    pub(crate) fn upload_wait(&mut self, len: usize, now: Duration) -> Duration {
        let Some(rate) = self.upload_limit else { return Duration::ZERO };
        let start = self.upload_next.max(now);
        self.upload_next = start + Duration::from_secs_f64(len as f64 / rate);
        start - now
    }
}
