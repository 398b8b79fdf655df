//! File transfer on disk: the native driver around [`weft_core::transfer::Engine`], the
//! twin of the browser's `wasm/src/files.rs`. It lives inside the mesh task (which tells
//! it who is connected and hands it the peers' transfer messages); all protocol decisions
//! are the engine's.
//!
//! - **Sending**: a file is hashed once, streaming ([`hash_file`], off the async threads),
//!   then shared; chunks are served with positioned reads of the open file.
//! - **Receiving** into a folder `DIR`: verified chunks are written in place (positioned
//!   writes) into `DIR/.weft-partial/<root>`; each download's [`DownloadRecord`] is saved
//!   next to it as `<root>.json` (new file, then renamed over the old) at most every
//!   [`SAVE_EVERY`] and when it completes, after the data is synced, so a record never
//!   claims bytes that are not on disk. On start the records are restored and connected
//!   peers are asked who holds the files. A complete file moves to `DIR/<path>`, never
//!   over an existing file (`name (1).ext`, ...), never outside `DIR`.
//! - **Disk I/O** runs on tokio's blocking threads; results come back to the mesh as
//!   [`IoDone`]s.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use weft_core::signal::PeerId;
use weft_core::transfer::wire::check_path;
use weft_core::transfer::{
    DownloadRecord, DownloadState, Engine, EngineConfig, FileDigest, FileHasher, OfferItem, Output,
    Root, TransferEvent, TransferMsg,
};

/// The folder inside the download folder that holds partial downloads and their records.
pub const PARTIAL_DIR: &str = ".weft-partial";
/// Least time between two saves of the download records.
pub const SAVE_EVERY: Duration = Duration::from_millis(500);
/// Least time between two progress reports of one file (or one upload).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Bytes read at a time while hashing.
const HASH_READ: usize = 4 * 1024 * 1024;

/// Why files cannot be sent or stored.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Which one.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// Neither a regular file nor a folder (a device, a socket, ...).
    #[error("{0}: not a regular file or folder")]
    NotAFile(PathBuf),
    /// A name that cannot travel (not UTF-8, or refused by the protocol).
    #[error("{path}: cannot be sent under this name: {reason}")]
    BadName {
        /// Which file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A received path that would leave the download folder.
    #[error("refusing to save {0:?}: it would land outside the download folder")]
    Escapes(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> FilesError + '_ {
    move |source| FilesError::Io { path: path.to_path_buf(), source }
}

/// The file's hash as 64 hex digits (what `b3sum` prints).
pub fn hex(root: &Root) -> String {
    root.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(s: &str) -> Option<Root> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut root = [0; 32];
    for (i, byte) in root.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(root)
}

// ---------------------------------------------------------------------------------------
// Sending: what to send, and hashing

/// One file to send: where it is and the path it is offered under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendItem {
    /// On disk.
    pub source: PathBuf,
    /// Offered as (`/`-separated; a folder's name is the first part).
    pub path: String,
    /// Its size when listed.
    pub size: u64,
}

/// Every file under `paths` (folders recursively, in name order), each checked readable
/// and offered under its name, or for files inside a folder `folder/sub/name`.
pub fn collect(paths: &[PathBuf]) -> Result<Vec<SendItem>, FilesError> {
    let mut items = Vec::new();
    for path in paths {
        let meta = fs::metadata(path).map_err(io_error(path))?;
        let name = path
            .canonicalize()
            .map_err(io_error(path))?
            .file_name()
            .map(|n| n.to_os_string())
            .ok_or_else(|| FilesError::BadName {
                path: path.clone(),
                reason: "it has no name".into(),
            })?;
        let name = name.into_string().map_err(|_| FilesError::BadName {
            path: path.clone(),
            reason: "the name is not valid UTF-8".into(),
        })?;
        if meta.is_dir() {
            walk(path, &name, &mut items)?;
        } else {
            add_file(path, name, &mut items)?;
        }
    }
    Ok(items)
}

fn walk(dir: &Path, prefix: &str, items: &mut Vec<SendItem>) -> Result<(), FilesError> {
    let mut entries: Vec<fs::DirEntry> = fs::read_dir(dir)
        .map_err(io_error(dir))?
        .collect::<Result<_, _>>()
        .map_err(io_error(dir))?;
    entries.sort_by_key(fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().into_string().map_err(|_| FilesError::BadName {
            path: path.clone(),
            reason: "the name is not valid UTF-8".into(),
        })?;
        let rel = format!("{prefix}/{name}");
        // Follows symbolic links, as `cp -r` of a named file would not; a link to a
        // folder is walked like a folder.
        let meta = fs::metadata(&path).map_err(io_error(&path))?;
        if meta.is_dir() {
            walk(&path, &rel, items)?;
        } else {
            add_file(&path, rel, items)?;
        }
    }
    Ok(())
}

fn add_file(path: &Path, rel: String, items: &mut Vec<SendItem>) -> Result<(), FilesError> {
    let file = File::open(path).map_err(io_error(path))?;
    let meta = file.metadata().map_err(io_error(path))?;
    if !meta.is_file() {
        return Err(FilesError::NotAFile(path.to_path_buf()));
    }
    check_path(&rel)
        .map_err(|e| FilesError::BadName { path: path.to_path_buf(), reason: e.to_string() })?;
    items.push(SendItem { source: path.to_path_buf(), path: rel, size: meta.len() });
    Ok(())
}

/// Hashes the file at `path` front to back (blocking), calling `progress` with the bytes
/// hashed so far after each read.
pub fn hash_file(path: &Path, mut progress: impl FnMut(u64)) -> Result<FileDigest, FilesError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mut hasher = FileHasher::new();
    let mut buf = vec![0u8; HASH_READ];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(path)(e)),
        };
        hasher.update(&buf[..n]);
        progress(hasher.hashed());
    }
    Ok(hasher.finish())
}

// ---------------------------------------------------------------------------------------
// Positioned I/O

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(unix)]
fn write_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt as _;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(windows)]
fn write_at(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt as _;
    while !buf.is_empty() {
        let n = file.seek_write(buf, offset)?;
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// A write error in plain words: "the disk is full" when it is.
fn write_reason(e: &io::Error) -> String {
    // ENOSPC and EDQUOT on Linux.
    if e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(28 | 122))
    {
        "the disk is full".to_string()
    } else {
        format!("cannot write the download: {e}")
    }
}

// ---------------------------------------------------------------------------------------
// The driver

/// What file transfer reports, beside the engine's own events.
#[derive(Debug, Clone)]
pub enum FileEvent {
    /// An engine event (except `FileComplete`, reported as [`FileEvent::Saved`] once the
    /// file is in place).
    Engine(TransferEvent),
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
    /// How far a download is (at most 4 times a second per file).
    Progress {
        /// Which file.
        root: Root,
        /// The paths it was offered under.
        paths: Vec<String>,
        /// Its size.
        size: u64,
        /// Bytes verified and written.
        done_bytes: u64,
    },
    /// A download saved before was found and continues.
    Restored {
        /// Which file.
        root: Root,
        /// Its paths.
        paths: Vec<String>,
        /// Its size.
        size: u64,
        /// Bytes already stored.
        done_bytes: u64,
    },
    /// A download is complete, verified, and in place.
    Saved {
        /// Which file.
        root: Root,
        /// Where it is now (one per path it was offered under).
        files: Vec<PathBuf>,
        /// Its size.
        size: u64,
    },
    /// Something went wrong that stops no transfer (a record could not be saved, ...).
    Warning(String),
}

/// A finished blocking operation, back in the mesh task.
#[derive(Debug)]
pub enum IoDone {
    /// A chunk read for `peer`.
    Read {
        /// For whom.
        peer: PeerId,
        /// Which file.
        root: Root,
        /// Which chunk.
        index: u32,
        /// The bytes.
        result: io::Result<Vec<u8>>,
    },
    /// A chunk written.
    Write {
        /// Which file.
        root: Root,
        /// Which chunk.
        index: u32,
        /// Whether it worked.
        result: io::Result<()>,
    },
    /// Records saved (warnings for those that were not).
    Saved(Vec<String>),
    /// A complete download moved into place.
    Finalized {
        /// Which file.
        root: Root,
        /// Its size.
        size: u64,
        /// Where it went, or why it could not.
        result: Result<Vec<PathBuf>, String>,
    },
}

/// Where downloads go.
#[derive(Debug, Clone)]
struct Folder {
    dir: PathBuf,
    partial: PathBuf,
}

impl Folder {
    fn data(&self, root: &Root) -> PathBuf {
        self.partial.join(hex(root))
    }

    fn record(&self, root: &Root) -> PathBuf {
        self.partial.join(format!("{}.json", hex(root)))
    }
}

/// File transfer inside the mesh: the engine and the open files.
#[derive(Debug)]
pub struct Files {
    engine: Engine,
    folder: Option<Folder>,
    /// Files we serve: shared by the user, or downloaded here.
    shared: HashMap<Root, Arc<File>>,
    /// Sizes of the files the user shared.
    shared_sizes: HashMap<Root, u64>,
    /// Open partial downloads.
    partial: HashMap<Root, Arc<File>>,
    /// Peers the engine was told are connected.
    connected: HashSet<PeerId>,
    io: mpsc::UnboundedSender<IoDone>,
    uploads: HashMap<(PeerId, Root), (u64, Option<Duration>)>,
    progress_at: HashMap<Root, Duration>,
    dirty: HashSet<Root>,
    save_due: Option<Duration>,
    saving: bool,
    /// Downloads being moved into place.
    finalizing: HashSet<Root>,
    events: Vec<FileEvent>,
}

impl Files {
    /// A driver whose blocking work reports to `io`; downloads go to `dir`, if given
    /// (created if missing), where saved downloads are restored from.
    pub fn new(
        dir: Option<PathBuf>,
        first_offer_id: u64,
        io: mpsc::UnboundedSender<IoDone>,
    ) -> Result<Self, FilesError> {
        let folder = match dir {
            Some(dir) => {
                fs::create_dir_all(&dir).map_err(io_error(&dir))?;
                let dir = dir.canonicalize().map_err(io_error(&dir))?;
                let partial = dir.join(PARTIAL_DIR);
                fs::create_dir_all(&partial).map_err(io_error(&partial))?;
                Some(Folder { dir, partial })
            }
            None => None,
        };
        let mut files = Self {
            engine: Engine::new(EngineConfig::default(), first_offer_id),
            folder,
            shared: HashMap::new(),
            shared_sizes: HashMap::new(),
            partial: HashMap::new(),
            connected: HashSet::new(),
            io,
            uploads: HashMap::new(),
            progress_at: HashMap::new(),
            dirty: HashSet::new(),
            save_due: None,
            saving: false,
            finalizing: HashSet::new(),
            events: Vec::new(),
        };
        files.restore()?;
        Ok(files)
    }

    /// Restores the records in the partial folder (like the browser's
    /// `restore_downloads`); complete ones that were not moved yet are moved now.
    fn restore(&mut self) -> Result<(), FilesError> {
        let Some(folder) = self.folder.clone() else { return Ok(()) };
        let entries = fs::read_dir(&folder.partial).map_err(io_error(&folder.partial))?;
        for entry in entries {
            let path = entry.map_err(io_error(&folder.partial))?.path();
            let Some(stem) = path.file_name().and_then(|n| n.to_str()) else { continue };
            if stem.ends_with(".tmp") {
                // A record save that a crash interrupted.
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(root) = stem.strip_suffix(".json").and_then(parse_hex) else { continue };
            let record = fs::read_to_string(&path).map_err(|e| e.to_string()).and_then(|s| {
                serde_json::from_str::<DownloadRecord>(&s).map_err(|e| e.to_string())
            });
            let mut record = match record {
                Ok(r) if r.root == root => r,
                Ok(_) | Err(_) => {
                    self.events.push(FileEvent::Warning(format!(
                        "ignoring the damaged download record {}",
                        path.display()
                    )));
                    continue;
                }
            };
            if !folder.data(&root).is_file() {
                // The data is gone: start over, keeping what the user accepted.
                record.have.iter_mut().for_each(|b| *b = 0);
                record.state = DownloadState::Active;
            }
            if record.state == DownloadState::Complete {
                self.finalize(root, record.size, record.paths);
                continue;
            }
            self.engine.restore(record);
            if let Some(p) = self.engine.progress(&root) {
                self.events.push(FileEvent::Restored {
                    root,
                    paths: p.paths,
                    size: p.size,
                    done_bytes: p.done_bytes,
                });
            }
        }
        Ok(())
    }

    /// Whether this node stores downloads.
    pub fn receives(&self) -> bool {
        self.folder.is_some()
    }

    /// Serves the hashed file `file` as `digest.root`.
    pub fn share(&mut self, file: File, digest: FileDigest) -> Result<(), String> {
        let (root, size) = (digest.root, digest.size);
        self.engine.share(root, size, digest.cvs).map_err(|e| e.to_string())?;
        self.shared.insert(root, Arc::new(file));
        self.shared_sizes.insert(root, size);
        Ok(())
    }

    /// Offers shared files to `peer`; the offer id.
    pub fn offer(&mut self, peer: &PeerId, files: &[(Root, String)]) -> Result<u64, String> {
        self.engine.offer(peer, files).map_err(|e| e.to_string())
    }

    /// The items of our open offer.
    pub fn offer_items(&self, peer: &PeerId, offer_id: u64) -> Option<Vec<OfferItem>> {
        self.engine.offer_items(peer, offer_id)
    }

    /// Accepts (`true`) or declines an offer.
    pub fn answer(
        &mut self,
        peer: &PeerId,
        offer_id: u64,
        accept: bool,
        now: Duration,
    ) -> Result<(), String> {
        if accept {
            if !self.receives() {
                return Err("this peer stores no downloads (no download folder)".into());
            }
            self.engine.accept(peer, offer_id, now)
        } else {
            self.engine.decline(peer, offer_id)
        }
        .map_err(|e| e.to_string())
    }

    /// Tells the engine whether `peer` has an established session (idempotent).
    pub fn set_connected(&mut self, peer: &PeerId, connected: bool, now: Duration) {
        if connected && self.connected.insert(peer.clone()) {
            self.engine.peer_connected(peer, now);
        } else if !connected && self.connected.remove(peer) {
            self.engine.peer_disconnected(peer, now);
            self.uploads.retain(|(p, _), _| p != peer);
        }
    }

    /// Peers the engine believes connected.
    pub fn connected(&self) -> Vec<PeerId> {
        self.connected.iter().cloned().collect()
    }

    /// A transfer frame from `peer`.
    pub fn receive(&mut self, peer: &PeerId, frame_type: u8, body: &[u8], now: Duration) {
        match TransferMsg::decode(frame_type, body) {
            Ok(msg) => self.engine.handle(peer, msg, now),
            Err(e) => tracing::warn!("bad file-transfer message from {peer}: {e}"),
        }
    }

    /// When [`Self::handle_timeout`] should run.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match (self.engine.poll_timeout(), self.save_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The engine's timers and the record saves.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now);
        }
        if self.save_due.is_some_and(|t| t <= now) {
            self.save_due = None;
            self.save_dirty(now);
        }
    }

    /// A blocking operation finished.
    pub fn io_done(&mut self, done: IoDone, now: Duration) {
        match done {
            IoDone::Read { peer, root, index, result } => match result {
                Ok(data) => {
                    let len = data.len() as u64;
                    self.engine.read_done(&peer, &root, index, data);
                    self.count_upload(peer, root, len, now);
                }
                Err(e) => {
                    self.engine.read_failed(&peer, &root, &format!("cannot read the file: {e}"));
                }
            },
            IoDone::Write { root, index, result } => match result {
                Ok(()) => {
                    self.engine.write_done(&root, index, now);
                    self.mark_dirty(&root, now);
                    self.maybe_progress(&root, now, false);
                }
                Err(e) => {
                    self.engine.write_failed(&root, &write_reason(&e));
                    self.mark_dirty(&root, now);
                }
            },
            IoDone::Saved(warnings) => {
                self.saving = false;
                self.events.extend(warnings.into_iter().map(FileEvent::Warning));
                if !self.dirty.is_empty() && self.save_due.is_none() {
                    self.save_due = Some(now + SAVE_EVERY);
                }
            }
            IoDone::Finalized { root, size, result } => {
                self.finalizing.remove(&root);
                match result {
                    Ok(files) => {
                        // Keep serving it from its new place (the engine shares it now).
                        if let Some(file) = self.partial.remove(&root) {
                            self.shared.insert(root, file);
                        } else if let Some(f) = files.first().and_then(|p| File::open(p).ok()) {
                            self.shared.insert(root, Arc::new(f));
                        }
                        self.events.push(FileEvent::Saved { root, files, size });
                    }
                    Err(reason) => {
                        let reason = format!("the file is complete but cannot be saved: {reason}");
                        self.events
                            .push(FileEvent::Engine(TransferEvent::FileFailed { root, reason }));
                    }
                }
            }
        }
    }

    fn count_upload(&mut self, peer: PeerId, root: Root, len: u64, now: Duration) {
        let size = self
            .engine
            .progress(&root)
            .map(|p| p.size)
            .or_else(|| self.shared_sizes.get(&root).copied())
            .unwrap_or(0);
        let entry = self.uploads.entry((peer.clone(), root)).or_insert((0, None));
        entry.0 += len;
        let due =
            entry.1.is_none_or(|t| now.saturating_sub(t) >= PROGRESS_EVERY) || entry.0 >= size;
        if due {
            entry.1 = Some(now);
            let sent_bytes = entry.0;
            self.events.push(FileEvent::Upload { peer, root, sent_bytes, size });
        }
    }

    fn maybe_progress(&mut self, root: &Root, now: Duration, force: bool) {
        let due =
            self.progress_at.get(root).is_none_or(|t| now.saturating_sub(*t) >= PROGRESS_EVERY);
        if !(due || force) {
            return;
        }
        if let Some(p) = self.engine.progress(root) {
            self.progress_at.insert(*root, now);
            self.events.push(FileEvent::Progress {
                root: *root,
                paths: p.paths,
                size: p.size,
                done_bytes: p.done_bytes,
            });
        }
    }

    fn mark_dirty(&mut self, root: &Root, now: Duration) {
        if self.folder.is_none() {
            return;
        }
        self.dirty.insert(*root);
        if self.save_due.is_none() && !self.saving {
            self.save_due = Some(now + SAVE_EVERY);
        }
    }

    /// Snapshots the changed records and saves them on a blocking thread (data synced
    /// first, then each record written to a new file and renamed over the old one).
    fn save_dirty(&mut self, now: Duration) {
        let Some(folder) = self.folder.clone() else { return };
        if self.saving {
            self.save_due = Some(now + SAVE_EVERY);
            return;
        }
        let jobs: Vec<(DownloadRecord, Option<Arc<File>>)> = self
            .dirty
            .drain()
            .filter(|r| !self.finalizing.contains(r))
            .filter_map(|r| self.engine.record(&r))
            .map(|rec| {
                let file = self.partial.get(&rec.root).cloned();
                (rec, file)
            })
            .collect();
        if jobs.is_empty() {
            return;
        }
        self.saving = true;
        let io = self.io.clone();
        tokio::task::spawn_blocking(move || {
            let warnings = jobs
                .into_iter()
                .filter_map(|(rec, file)| save_record(&folder, &rec, file.as_deref()).err())
                .collect();
            let _ = io.send(IoDone::Saved(warnings));
        });
    }

    /// Saves every changed record now (on shutdown), waiting for it.
    pub async fn save_now(&mut self) {
        let Some(folder) = self.folder.clone() else { return };
        let jobs: Vec<(DownloadRecord, Option<Arc<File>>)> = self
            .dirty
            .drain()
            .filter_map(|r| self.engine.record(&r))
            .map(|rec| {
                let file = self.partial.get(&rec.root).cloned();
                (rec, file)
            })
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for (rec, file) in jobs {
                if let Err(e) = save_record(&folder, &rec, file.as_deref()) {
                    tracing::warn!("{e}");
                }
            }
        })
        .await;
    }

    /// Does what the engine asks; returns the messages to send. Events pile up for
    /// [`Self::take_events`].
    pub fn pump(&mut self, now: Duration) -> Vec<(PeerId, TransferMsg)> {
        let mut sends = Vec::new();
        while let Some(output) = self.engine.poll_output() {
            match output {
                Output::Send { peer, msg } => sends.push((peer, msg)),
                Output::Read { peer, root, index, offset, len } => {
                    self.start_read(peer, root, index, offset, len);
                }
                Output::Write { root, index, offset, data } => {
                    self.start_write(root, index, offset, data);
                }
                Output::Discard { root } => self.discard(&root),
                Output::Event(TransferEvent::FileComplete { root, paths, size }) => {
                    self.maybe_progress(&root, now, true);
                    self.finalize(root, size, paths);
                }
                Output::Event(ev) => {
                    if let TransferEvent::FileFailed { root, .. } = &ev {
                        self.mark_dirty(root, now);
                    }
                    if let TransferEvent::ShareFailed { root, .. } = &ev {
                        self.shared.remove(root);
                    }
                    self.events.push(FileEvent::Engine(ev));
                }
            }
        }
        sends
    }

    /// The events since the last call.
    pub fn take_events(&mut self) -> Vec<FileEvent> {
        std::mem::take(&mut self.events)
    }

    fn start_read(&mut self, peer: PeerId, root: Root, index: u32, offset: u64, len: usize) {
        let file = self.shared.get(&root).or_else(|| self.partial.get(&root)).cloned();
        let io = self.io.clone();
        tokio::task::spawn_blocking(move || {
            let result = match file {
                Some(file) => {
                    let mut buf = vec![0u8; len];
                    read_at(&file, &mut buf, offset).map(|()| buf)
                }
                None => Err(io::Error::new(io::ErrorKind::NotFound, "the file is not open")),
            };
            let _ = io.send(IoDone::Read { peer, root, index, result });
        });
    }

    fn partial_file(&mut self, root: &Root) -> io::Result<Arc<File>> {
        if let Some(f) = self.partial.get(root) {
            return Ok(f.clone());
        }
        let folder = self.folder.as_ref().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "this peer stores no downloads")
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(folder.data(root))?;
        let file = Arc::new(file);
        self.partial.insert(*root, file.clone());
        Ok(file)
    }

    fn start_write(&mut self, root: Root, index: u32, offset: u64, data: Vec<u8>) {
        let io = self.io.clone();
        match self.partial_file(&root) {
            Ok(file) => {
                tokio::task::spawn_blocking(move || {
                    let result = write_at(&file, &data, offset);
                    let _ = io.send(IoDone::Write { root, index, result });
                });
            }
            Err(e) => {
                let _ = io.send(IoDone::Write { root, index, result: Err(e) });
            }
        }
    }

    fn discard(&mut self, root: &Root) {
        self.dirty.remove(root);
        self.progress_at.remove(root);
        self.partial.remove(root);
        if let Some(folder) = &self.folder {
            for path in [folder.data(root), folder.record(root)] {
                if let Err(e) = fs::remove_file(&path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!("cannot delete {}: {e}", path.display());
                    }
                }
            }
        }
    }

    /// Saves the complete record, then moves the file into place (blocking thread).
    fn finalize(&mut self, root: Root, size: u64, paths: Vec<String>) {
        let Some(folder) = self.folder.clone() else { return };
        self.finalizing.insert(root);
        self.dirty.remove(&root);
        let file = self.partial.get(&root).cloned();
        let record = self.engine.record(&root);
        let io = self.io.clone();
        tokio::task::spawn_blocking(move || {
            let result = (|| {
                if let Some(rec) = &record {
                    save_record(&folder, rec, file.as_deref())?;
                }
                let placed = place(&folder, &root, &paths).map_err(|e| e.to_string())?;
                let _ = fs::remove_file(folder.record(&root));
                Ok(placed)
            })();
            let _ = io.send(IoDone::Finalized { root, size, result });
        });
    }
}

/// Writes `record` (after syncing `data`) to a new file renamed over the old one.
fn save_record(
    folder: &Folder,
    record: &DownloadRecord,
    data: Option<&File>,
) -> Result<(), String> {
    let path = folder.record(&record.root);
    let fail = |e: io::Error| format!("cannot save the download record {}: {e}", path.display());
    if let Some(file) = data {
        file.sync_data().map_err(fail)?;
    }
    let json = serde_json::to_vec(record).map_err(|e| fail(io::Error::other(e)))?;
    // A name of its own: a periodic save and the one at shutdown may overlap.
    static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = folder.partial.join(format!("{}.json.{n}.tmp", hex(&record.root)));
    let mut out = File::create(&tmp).map_err(fail)?;
    out.write_all(&json).and_then(|()| out.sync_all()).map_err(fail)?;
    fs::rename(&tmp, &path).map_err(fail)
}

/// Moves the complete download `root` to `DIR/<path>` for its first path (copies for the
/// others), never over an existing file and never outside `DIR`.
fn place(folder: &Folder, root: &Root, paths: &[String]) -> Result<Vec<PathBuf>, FilesError> {
    let data = folder.data(root);
    if !data.exists() {
        // An empty file: nothing was ever written.
        File::create(&data).map_err(io_error(&data))?;
    }
    let mut placed: Vec<PathBuf> = Vec::new();
    for path in paths {
        let target = safe_target(&folder.dir, path)?;
        let dest = match placed.first() {
            None => move_unique(&data, &target)?,
            Some(first) => copy_unique(first, &target)?,
        };
        placed.push(dest);
    }
    if placed.is_empty() {
        let target = folder.dir.join(hex(root));
        placed.push(move_unique(&data, &target)?);
    } else if data.exists() {
        let _ = fs::remove_file(&data);
    }
    Ok(placed)
}

/// `DIR/<path>`, refusing anything but plain names and any folder that resolves outside
/// `DIR` (a symbolic link planted inside it, say). Creates the folders.
fn safe_target(dir: &Path, path: &str) -> Result<PathBuf, FilesError> {
    let escapes = || FilesError::Escapes(path.to_string());
    check_path(path).map_err(|_| escapes())?;
    let rel = Path::new(path);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(escapes());
    }
    let target = dir.join(rel);
    let parent = target.parent().ok_or_else(escapes)?;
    fs::create_dir_all(parent).map_err(io_error(parent))?;
    let real = parent.canonicalize().map_err(io_error(parent))?;
    if !real.starts_with(dir) || real.starts_with(dir.join(PARTIAL_DIR)) {
        return Err(escapes());
    }
    let name = target.file_name().ok_or_else(escapes)?;
    Ok(real.join(name))
}

/// `name (n).ext` for n = 1, 2, ...
fn numbered(target: &Path, n: u32) -> PathBuf {
    let stem = target.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match target.extension() {
        Some(ext) if !stem.is_empty() => format!("{stem} ({n}).{}", ext.to_string_lossy()),
        _ => format!(
            "{} ({n})",
            target.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
        ),
    };
    target.with_file_name(name)
}

fn candidates(target: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    std::iter::once(target.to_path_buf()).chain((1..10_000).map(|n| numbered(target, n)))
}

/// Moves `from` to `target` or the first free numbered name (a hard link never replaces
/// an existing file; then the old name goes).
fn move_unique(from: &Path, target: &Path) -> Result<PathBuf, FilesError> {
    for candidate in candidates(target) {
        match fs::hard_link(from, &candidate) {
            Ok(()) => {
                fs::remove_file(from).map_err(io_error(from))?;
                return Ok(candidate);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            // No hard links here (some file systems): copy into a new file instead.
            Err(_) => {
                let dest = copy_unique(from, target)?;
                fs::remove_file(from).map_err(io_error(from))?;
                return Ok(dest);
            }
        }
    }
    Err(io_error(target)(io::Error::new(io::ErrorKind::AlreadyExists, "no free name")))
}

/// Copies `from` into a new file at `target` or the first free numbered name.
fn copy_unique(from: &Path, target: &Path) -> Result<PathBuf, FilesError> {
    for candidate in candidates(target) {
        match OpenOptions::new().write(true).create_new(true).open(&candidate) {
            Ok(mut out) => {
                let mut src = File::open(from).map_err(io_error(from))?;
                io::copy(&mut src, &mut out)
                    .and_then(|_| out.sync_all())
                    .map_err(io_error(&candidate))?;
                return Ok(candidate);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_error(&candidate)(e)),
        }
    }
    Err(io_error(target)(io::Error::new(io::ErrorKind::AlreadyExists, "no free name")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-files-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn folders_are_listed_recursively_under_their_name() {
        let dir = temp_dir("collect");
        fs::create_dir_all(dir.join("photos/2024")).unwrap();
        fs::write(dir.join("photos/a.txt"), b"a").unwrap();
        fs::write(dir.join("photos/2024/b.bin"), b"bb").unwrap();
        fs::write(dir.join("single"), b"").unwrap();
        let items = collect(&[dir.join("photos"), dir.join("single")]).unwrap();
        let paths: Vec<(&str, u64)> = items.iter().map(|i| (i.path.as_str(), i.size)).collect();
        assert_eq!(paths, vec![("photos/2024/b.bin", 2), ("photos/a.txt", 1), ("single", 0)]);
        let err = collect(&[dir.join("missing")]).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hashing_gives_the_plain_blake3() {
        let dir = temp_dir("hash");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(dir.join("f"), &data).unwrap();
        let mut last = 0;
        let digest = hash_file(&dir.join("f"), |n| last = n).unwrap();
        assert_eq!(digest.root, *blake3_root(&data));
        assert_eq!((digest.size, last), (300_000, 300_000));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn blake3_root(data: &[u8]) -> Box<Root> {
        let mut h = FileHasher::new();
        h.update(data);
        Box::new(h.finish().root)
    }

    #[test]
    fn saved_files_never_overwrite_and_never_escape() {
        let dir = temp_dir("place").canonicalize().unwrap();
        let folder = Folder { dir: dir.clone(), partial: dir.join(PARTIAL_DIR) };
        fs::create_dir_all(&folder.partial).unwrap();
        let root = [7u8; 32];
        for round in 0..3 {
            fs::write(folder.data(&root), format!("round {round}")).unwrap();
            let placed = place(&folder, &root, &["docs/a.txt".to_string()]).unwrap();
            let want = match round {
                0 => dir.join("docs/a.txt"),
                n => dir.join(format!("docs/a ({n}).txt")),
            };
            assert_eq!(placed, vec![want.clone()]);
            assert_eq!(fs::read_to_string(&want).unwrap(), format!("round {round}"));
            assert!(!folder.data(&root).exists());
        }
        for bad in ["../x", "/etc/x", ".weft-partial/x", "a/../../x"] {
            assert!(safe_target(&dir, bad).is_err(), "{bad}");
        }
        #[cfg(unix)]
        {
            let outside = temp_dir("outside");
            std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
            assert!(matches!(safe_target(&dir, "link/x"), Err(FilesError::Escapes(_))));
            fs::remove_dir_all(&outside).unwrap();
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn disk_full_is_said_plainly() {
        assert_eq!(write_reason(&io::Error::from_raw_os_error(28)), "the disk is full");
        assert!(write_reason(&io::Error::other("x")).starts_with("cannot write"));
    }
}
