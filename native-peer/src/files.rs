//! File transfer on disk: the native peer's disk work for the node's transfer engine, the
//! twin of the browser's `wasm/src/files.rs`. The node decides everything (what to read,
//! write, save and when); this only does the I/O it asks for.
//!
//! - **Sending**: a file is shared and offered at once, and hashed once, streaming
//!   ([`hash_file`], off the async threads), its CVs reported as they come; chunks are
//!   served with positioned reads of the open file.
//! - **Receiving** into a folder `DIR`: verified chunks are written in place (positioned
//!   writes) into `DIR/.weft-partial/<root>`; each download's [`DownloadRecord`] is saved
//!   next to it as `<root>.json` (new file, then renamed over the old) when the node says,
//!   after the data is synced, so a record never claims bytes that are not on disk. On
//!   start the records are handed back to the node. A complete file moves to `DIR/<path>`,
//!   never over an existing file (`name (1).ext`, ...), never outside `DIR`.
//! - **Disk I/O** runs on tokio's blocking threads, except chunk writes, which one thread
//!   of their own does in arrival order ([`ChunkWriter`]); results come back to the mesh
//!   as the node's [`Input`]s.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use weft_core::node::{DownloadStore, Input, SavedTo, WriteFailure};
use weft_core::signal::PeerId;
use weft_core::transfer::wire::{Unsendable, check_path, check_send_path};
use weft_core::transfer::{Cv, DownloadRecord, FileDigest, FileHasher, Root};

use crate::mesh::MeshEvent;

/// The folder inside the download folder that holds partial downloads and their records.
pub const PARTIAL_DIR: &str = ".weft-partial";
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
    /// A download's resume record could not be saved.
    #[error("cannot save the download record {}: {source}", path.display())]
    Record {
        /// The record's file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> FilesError + '_ {
    move |source| FilesError::Io { path: path.to_path_buf(), source }
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

/// A file or folder inside a folder being sent that is left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Its path as it would have been offered.
    pub path: String,
    /// Why it is left out.
    pub reason: String,
}

/// What [`collect`] found: the files to send and what it left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    /// The files, in the order they are offered.
    pub items: Vec<SendItem>,
    /// What was left out of the folders (hidden files, symbolic links, unsafe names).
    pub skipped: Vec<Skipped>,
}

/// Every file under `paths` (folders recursively, in name order), each checked readable
/// and offered under its name, or for files inside a folder `folder/sub/name`.
///
/// A path the user names is taken as it is (through a symbolic link too), and one whose
/// name the receiver would refuse is an error. Inside a folder, entries the receiver
/// would refuse (hidden files and folders such as `.git` or `.env`, device names) and
/// symbolic links (which could lead out of the folder: `cp -r` copies the link, and a
/// download cannot hold one) are left out and listed in [`Collected::skipped`].
pub fn collect(paths: &[PathBuf]) -> Result<Collected, FilesError> {
    let mut found = Collected::default();
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
        if let Err(Unsendable::Refuse(e) | Unsendable::Skip(e)) = check_send_path(&name) {
            return Err(FilesError::BadName { path: path.clone(), reason: e.to_string() });
        }
        if meta.is_dir() {
            walk(path, &name, &mut found)?;
        } else {
            add_file(path, name, &mut found.items)?;
        }
    }
    Ok(found)
}

fn walk(dir: &Path, prefix: &str, found: &mut Collected) -> Result<(), FilesError> {
    let mut entries: Vec<fs::DirEntry> = fs::read_dir(dir)
        .map_err(io_error(dir))?
        .collect::<Result<_, _>>()
        .map_err(io_error(dir))?;
    entries.sort_by_key(fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        let mut skip = |rel: String, reason: String| {
            found.skipped.push(Skipped { path: rel, reason });
        };
        let Ok(name) = entry.file_name().into_string() else {
            skip(
                format!("{prefix}/{}", entry.file_name().to_string_lossy()),
                "the name is not valid UTF-8".into(),
            );
            continue;
        };
        let rel = format!("{prefix}/{name}");
        match check_send_path(&rel) {
            Ok(()) => {}
            Err(Unsendable::Skip(e)) => {
                skip(rel, e.to_string());
                continue;
            }
            Err(Unsendable::Refuse(e)) => {
                return Err(FilesError::BadName { path, reason: e.to_string() });
            }
        }
        // Not `metadata`: a link is not followed, wherever it points.
        let meta = fs::symlink_metadata(&path).map_err(io_error(&path))?;
        if meta.file_type().is_symlink() {
            skip(rel, "a symbolic link".into());
        } else if meta.is_dir() {
            walk(&path, &rel, found)?;
        } else if meta.is_file() {
            add_file(&path, rel, &mut found.items)?;
        } else {
            skip(rel, "not a regular file or folder".into());
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

/// Hashes the file at `path` front to back (blocking), calling `progress(bytes hashed, CVs of the
/// chunks finished so far)` after each read: a file shared before it is hashed reports
/// the new CVs to the node as they come.
pub fn hash_file(
    path: &Path,
    mut progress: impl FnMut(u64, &[Cv]),
) -> Result<FileDigest, FilesError> {
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
        progress(hasher.hashed(), hasher.cvs());
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

// ---------------------------------------------------------------------------------------
// The node's disk

/// `WriteFailure::DiskFull` when the disk is full (ENOSPC, EDQUOT), else the error.
fn write_failure(e: &io::Error) -> WriteFailure {
    if e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(28 | 122))
    {
        WriteFailure::DiskFull
    } else {
        WriteFailure::Other(e.to_string())
    }
}

/// Where downloads go.
#[derive(Debug, Clone)]
struct Folder {
    dir: PathBuf,
    partial: PathBuf,
}

impl Folder {
    fn data(&self, root: &Root) -> PathBuf {
        self.partial.join(root.to_string())
    }

    fn record(&self, root: &Root) -> PathBuf {
        self.partial.join(format!("{root}.json"))
    }
}

/// One verified chunk to write.
struct WriteJob {
    file: Arc<File>,
    root: Root,
    index: u32,
    offset: u64,
    data: Vec<u8>,
}

/// The thread that writes chunks, one after another, and reports each as
/// [`Input::WriteDone`]. One thread for every download instead of a blocking task per
/// chunk: a received chunk then costs one wake-up of a thread that is already there, and
/// writes to one file no longer wait on each other for the file's lock in the kernel
/// (both showed in profiles of a fast transfer: `perf`, `native-peer/WEBRTC_RS.md`). It
/// ends when the [`Disk`] is dropped.
#[derive(Debug)]
struct ChunkWriter {
    jobs: std::sync::mpsc::Sender<WriteJob>,
}

/// Bytes written to one file after which the writer asks the kernel to start writing
/// them back ([`start_writeback`]).
const WRITEBACK_EVERY: u64 = 8 << 20;

impl ChunkWriter {
    fn start(inputs: mpsc::UnboundedSender<Input>) -> io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::channel::<WriteJob>();
        std::thread::Builder::new().name("weft-write".into()).spawn(move || {
            // Bytes written to each file since its writeback was last started.
            let mut unflushed: HashMap<Root, u64> = HashMap::new();
            for WriteJob { file, root, index, offset, data } in queue {
                let result = write_at(&file, &data, offset).map_err(|e| write_failure(&e));
                if result.is_ok() {
                    let written = unflushed.entry(root).or_default();
                    *written += data.len() as u64;
                    if *written >= WRITEBACK_EVERY {
                        *written = 0;
                        start_writeback(&file);
                    }
                }
                let _ = inputs.send(Input::WriteDone { root, index, result });
            }
        })?;
        Ok(Self { jobs })
    }
}

/// Asks the kernel to start writing `file`'s dirty pages to the disk now, without waiting
/// for them. Record saves `fdatasync` the data they vouch for, every half second and once
/// at the end; without this the kernel left a fast download's data in memory until then,
/// and each of those syncs (the last one included, which the user waits for) wrote
/// hundreds of megabytes at once: about 0.5 s per 256 MiB on these machines, half a
/// transfer's time. Written back as it arrives, the data leaves little for the syncs.
///
/// `POSIX_FADV_DONTNEED` is the safe call that does it on Linux (it starts writeback of
/// dirty pages, `WB_SYNC_NONE`, and drops clean ones: a receiver does not read its chunks
/// again); `sync_file_range` would need `unsafe` (no safe wrapper in nix or rustix).
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) {
    if let Err(e) = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed) {
        tracing::debug!("fadvise: {e}");
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) {}

/// The disk work the node asks for, on tokio's blocking threads (chunk writes on the
/// [`ChunkWriter`]'s); each result comes back to the mesh as an [`Input`] through
/// `inputs`.
#[derive(Debug)]
pub struct Disk {
    folder: Option<Folder>,
    /// Files we serve: shared by the user, or downloaded here.
    served: HashMap<Root, Arc<File>>,
    /// Open partial downloads.
    partial: HashMap<Root, Arc<File>>,
    /// Started at the first chunk to write.
    writer: Option<ChunkWriter>,
    inputs: mpsc::UnboundedSender<Input>,
    events: mpsc::UnboundedSender<MeshEvent>,
}

impl Disk {
    /// Downloads go to `dir`, if given (created if missing); results go to `inputs`,
    /// warnings (a record that cannot be saved) to `events`.
    pub fn new(
        dir: Option<PathBuf>,
        inputs: mpsc::UnboundedSender<Input>,
        events: mpsc::UnboundedSender<MeshEvent>,
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
        let (served, partial) = (HashMap::new(), HashMap::new());
        Ok(Self { folder, served, partial, writer: None, inputs, events })
    }

    /// Where downloads go, as the node sees it.
    pub fn store(&self) -> DownloadStore {
        if self.folder.is_some() { DownloadStore::Folder } else { DownloadStore::None }
    }

    fn warn(&self, message: String) {
        let _ = self.events.send(MeshEvent::Warning(message));
    }

    /// The download records saved in the partial folder, each with whether its data is
    /// still there, for [`weft_core::node::Node::restore_download`].
    pub fn saved_downloads(&self) -> Result<Vec<(DownloadRecord, bool)>, FilesError> {
        let Some(folder) = &self.folder else { return Ok(Vec::new()) };
        let mut found = Vec::new();
        let entries = fs::read_dir(&folder.partial).map_err(io_error(&folder.partial))?;
        for entry in entries {
            let path = entry.map_err(io_error(&folder.partial))?.path();
            let Some(stem) = path.file_name().and_then(|n| n.to_str()) else { continue };
            if stem.ends_with(".tmp") {
                // A record save that a crash interrupted.
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(root) = stem.strip_suffix(".json").and_then(|s| s.parse::<Root>().ok()) else {
                continue;
            };
            let record = fs::read_to_string(&path).map_err(|e| e.to_string()).and_then(|s| {
                serde_json::from_str::<DownloadRecord>(&s).map_err(|e| e.to_string())
            });
            match record {
                Ok(r) if r.root == root => found.push((r, folder.data(&root).is_file())),
                Ok(_) | Err(_) => {
                    self.warn(format!("ignoring the damaged download record {}", path.display()));
                }
            }
        }
        Ok(found)
    }

    /// Serves the open `file` as `root`.
    pub fn share(&mut self, root: Root, file: File) {
        self.served.insert(root, Arc::new(file));
    }

    /// Reads a chunk of a served or partial file; reports [`Input::ReadDone`].
    pub fn read(&self, peer: PeerId, root: Root, index: u32, offset: u64, len: usize) {
        let file = self.served.get(&root).or_else(|| self.partial.get(&root)).cloned();
        let inputs = self.inputs.clone();
        tokio::task::spawn_blocking(move || {
            let result = match file {
                Some(file) => {
                    let mut buf = vec![0u8; len];
                    read_at(&file, &mut buf, offset).map(|()| buf).map_err(|e| e.to_string())
                }
                None => Err("the file is not open".to_string()),
            };
            let _ = inputs.send(Input::ReadDone { peer, root, index, result });
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

    /// Writes a verified chunk in place (on the [`ChunkWriter`]); reports
    /// [`Input::WriteDone`].
    pub fn write(&mut self, root: Root, index: u32, offset: u64, data: Vec<u8>) {
        if let Err(e) = self.queue_write(root, index, offset, data) {
            let result = Err(write_failure(&e));
            let _ = self.inputs.send(Input::WriteDone { root, index, result });
        }
    }

    fn queue_write(
        &mut self,
        root: Root,
        index: u32,
        offset: u64,
        data: Vec<u8>,
    ) -> io::Result<()> {
        let file = self.partial_file(&root)?;
        let writer = match &mut self.writer {
            Some(writer) => writer,
            none => none.insert(ChunkWriter::start(self.inputs.clone())?),
        };
        let job = WriteJob { file, root, index, offset, data };
        if writer.jobs.send(job).is_err() {
            // Its thread is gone (it cannot panic; this is for the impossible): the next
            // write starts another.
            self.writer = None;
            return Err(io::Error::other("the chunk writer stopped"));
        }
        Ok(())
    }

    /// Saves `records` (their data synced first); reports [`Input::RecordsSaved`]. The
    /// task, to wait for when stopping.
    pub fn save_records(&self, records: Vec<DownloadRecord>) -> JoinHandle<()> {
        let folder = self.folder.clone();
        let jobs: Vec<(DownloadRecord, Option<Arc<File>>)> = records
            .into_iter()
            .map(|rec| {
                let file = self.partial.get(&rec.root).cloned();
                (rec, file)
            })
            .collect();
        let (inputs, events) = (self.inputs.clone(), self.events.clone());
        tokio::task::spawn_blocking(move || {
            if let Some(folder) = folder {
                for (rec, file) in jobs {
                    if let Err(e) = save_record(&folder, &rec, file.as_deref()) {
                        let _ = events.send(MeshEvent::Warning(e.to_string()));
                    }
                }
            }
            let _ = inputs.send(Input::RecordsSaved);
        })
    }

    /// Saves the complete download's record (if given), then moves it into place;
    /// reports [`Input::FileSaved`].
    pub fn finish(&mut self, root: Root, paths: Vec<String>, record: Option<DownloadRecord>) {
        let inputs = self.inputs.clone();
        let Some(folder) = self.folder.clone() else {
            let result = Err("this peer stores no downloads".to_string());
            let _ = inputs.send(Input::FileSaved { root, result });
            return;
        };
        let file = self.partial.get(&root).cloned();
        tokio::task::spawn_blocking(move || {
            let result = (|| {
                if let Some(rec) = &record {
                    save_record(&folder, rec, file.as_deref())?;
                }
                let placed = place(&folder, &root, &paths)?;
                let _ = fs::remove_file(folder.record(&root));
                Ok::<_, FilesError>(SavedTo::Files(placed))
            })()
            .map_err(|e| e.to_string());
            let _ = inputs.send(Input::FileSaved { root, result });
        });
    }

    /// A complete download is in place at `files`: keep serving it from there.
    pub fn placed(&mut self, root: Root, files: &[PathBuf]) {
        if let Some(file) = self.partial.remove(&root) {
            // The open file is the one that moved.
            self.served.insert(root, file);
        } else if let Some(f) = files.first().and_then(|p| File::open(p).ok()) {
            self.served.insert(root, Arc::new(f));
        }
    }

    /// Deletes a download's partial data and record.
    pub fn discard(&mut self, root: &Root) {
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
}

/// Writes `record` (after syncing `data`) to a new file renamed over the old one.
fn save_record(
    folder: &Folder,
    record: &DownloadRecord,
    data: Option<&File>,
) -> Result<(), FilesError> {
    let path = folder.record(&record.root);
    let fail = |source: io::Error| FilesError::Record { path: path.clone(), source };
    if let Some(file) = data {
        file.sync_data().map_err(fail)?;
    }
    let json = serde_json::to_vec(record).map_err(|e| fail(io::Error::other(e)))?;
    // A name of its own: a periodic save and the one at shutdown may overlap.
    static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = folder.partial.join(format!("{}.json.{n}.tmp", record.root));
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
        let target = folder.dir.join(root.to_string());
        placed.push(move_unique(&data, &target)?);
    } else if data.exists() {
        let _ = fs::remove_file(&data);
    }
    Ok(placed)
}

/// `DIR/<path>`, refusing anything but plain names and any folder that is, or resolves
/// through, a symbolic link (one planted inside `DIR`, say: folders are created one part
/// at a time and never through a link, so nothing is created outside `DIR` either).
/// Creates the folders.
fn safe_target(dir: &Path, path: &str) -> Result<PathBuf, FilesError> {
    let escapes = || FilesError::Escapes(path.to_string());
    check_path(path).map_err(|_| escapes())?;
    let rel = Path::new(path);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(escapes());
    }
    let target = dir.join(rel);
    let parent = target.parent().ok_or_else(escapes)?;
    let mut folder = dir.to_path_buf();
    for part in rel.parent().into_iter().flat_map(Path::components) {
        folder.push(part);
        match fs::symlink_metadata(&folder) {
            Ok(meta) if meta.file_type().is_symlink() => return Err(escapes()),
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(FilesError::NotAFile(folder)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::create_dir(&folder) {
                Ok(()) => {}
                // Made by another download meanwhile: checked again on the next part.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if fs::symlink_metadata(&folder)
                        .map_err(io_error(&folder))?
                        .file_type()
                        .is_symlink()
                    {
                        return Err(escapes());
                    }
                }
                Err(e) => return Err(io_error(&folder)(e)),
            },
            Err(e) => return Err(io_error(&folder)(e)),
        }
    }
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
        let found = collect(&[dir.join("photos"), dir.join("single")]).unwrap();
        let paths: Vec<(&str, u64)> =
            found.items.iter().map(|i| (i.path.as_str(), i.size)).collect();
        assert_eq!(paths, vec![("photos/2024/b.bin", 2), ("photos/a.txt", 1), ("single", 0)]);
        assert_eq!(found.skipped, vec![]);
        let err = collect(&[dir.join("missing")]).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_folder_is_sent_without_hidden_files_links_or_names_a_receiver_would_refuse() {
        let dir = temp_dir("skip");
        let secret = dir.join("secret");
        fs::create_dir_all(&secret).unwrap();
        fs::write(secret.join("id_ed25519"), b"key").unwrap();
        let share = dir.join("share");
        fs::create_dir_all(share.join(".git")).unwrap();
        fs::write(share.join(".git/config"), b"x").unwrap();
        fs::write(share.join(".env"), b"TOKEN=1").unwrap();
        fs::write(share.join("nul.txt"), b"x").unwrap();
        fs::write(share.join("photo.jpg"), b"jpg").unwrap();
        // Links out of the folder, to a folder and to a file: never followed.
        std::os::unix::fs::symlink(&secret, share.join("keys")).unwrap();
        std::os::unix::fs::symlink(secret.join("id_ed25519"), share.join("key")).unwrap();
        let found = collect(std::slice::from_ref(&share)).unwrap();
        let paths: Vec<&str> = found.items.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, vec!["share/photo.jpg"]);
        let skipped: Vec<&str> = found.skipped.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(
            skipped,
            vec!["share/.env", "share/.git", "share/key", "share/keys", "share/nul.txt"]
        );
        assert!(found.skipped[2].reason.contains("symbolic link"), "{:?}", found.skipped);
        // A hidden file named on the command line is an error, not silently dropped.
        let err = collect(&[share.join(".env")]).unwrap_err();
        assert!(err.to_string().contains("starts with a dot"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hashing_gives_the_plain_blake3() {
        let dir = temp_dir("hash");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(dir.join("f"), &data).unwrap();
        let mut last = 0;
        let digest = hash_file(&dir.join("f"), |n, _| last = n).unwrap();
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
        let root = Root::from([7u8; 32]);
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
            // Nothing is created through the link before the refusal either.
            assert!(matches!(safe_target(&dir, "link/autostart/x"), Err(FilesError::Escapes(_))));
            assert!(!outside.join("autostart").exists(), "a folder was made outside");
            fs::remove_dir_all(&outside).unwrap();
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_disk_is_told_apart() {
        assert_eq!(write_failure(&io::Error::from_raw_os_error(28)), WriteFailure::DiskFull);
        assert_eq!(write_failure(&io::Error::from_raw_os_error(122)), WriteFailure::DiskFull);
        assert!(matches!(write_failure(&io::Error::other("x")), WriteFailure::Other(_)));
    }
}
