//! File transfer in the browser: the thin driver around [`weft_core::transfer::Engine`].
//!
//! - **Reading** (sending side): `Blob.slice(..).arrayBuffer()` of the picked `File`, one
//!   chunk at a time as the engine asks; hashing reads 4 MiB slices front to back.
//! - **Writing** (receiving side): verified chunks go to a dedicated worker
//!   (`download-writer.js`) that writes them in place into the origin-private file system
//!   with a sync access handle. Nothing is held beyond the engine's bound of unwritten
//!   chunks. Where the browser has no OPFS sync access handles (or `downloads: "stream"`),
//!   the worker instead feeds each file, in order, to a streamed browser download served by
//!   the service worker `sw.js` (see [`Store::Stream`]).
//! - **Resume**: each download's [`DownloadRecord`] is saved in IndexedDB (store
//!   `downloads`) at most every 500 ms and when it completes; on join the records are
//!   restored and connected peers are asked who holds the files.
//!
//! All protocol decisions (what to request from whom, verification, timeouts) are the
//! engine's.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::{Rc, Weak};
use std::time::Duration;

use serde::Serialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use weft_core::signal::PeerId;
use weft_core::transfer::{
    DownloadRecord, DownloadState, Engine, EngineConfig, FileHasher, OfferItem, Output, Root,
    TransferEvent, TransferMsg,
};

use crate::session::{Inner, JsEvent, emit, now};

/// Bytes hashed per read while preparing a file.
const HASH_READ: f64 = 4.0 * 1024.0 * 1024.0;
/// Least time between two progress events of one file.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Least time between two saves of the download records.
const SAVE_EVERY: i32 = 500;
/// Bytes read from a shared file at once (a multiple of the chunk size).
const READ_BLOCK: u64 = 1024 * 1024;
/// Blocks kept per node for serving (16 MiB).
const READ_CACHE_BLOCKS: usize = 16;
/// File-transfer messages up to this size are batched into one packet per peer.
const BATCH_FRAME: usize = 1024;
/// Chunks sent to the writer in one message (one `postMessage` per 1 MiB, not per chunk).
const WRITE_BATCH: usize = 16;
/// Bytes of one batch buffer.
const WRITE_BATCH_BYTES: u32 = (WRITE_BATCH * weft_core::transfer::CHUNK_LEN) as u32;
/// Batch buffers kept for reuse by the writer.
const WRITE_POOL: usize = 16;
/// The OPFS folder of downloads (also in `download-writer.js`).
const DOWNLOAD_DIR: &str = "weft-downloads";

pub(crate) fn hex(root: &Root) -> String {
    root.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn parse_root(s: &str) -> Result<Root, String> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return Err(format!("{s:?} is not a file hash (64 hex digits)"));
    }
    let mut root = [0; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).map_err(|_| format!("{s:?} is not hex"))?;
        root[i] = u8::from_str_radix(text, 16).map_err(|_| format!("{s:?} is not hex"))?;
    }
    Ok(root)
}

/// A file item as the page sees it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ItemJs {
    path: String,
    size: f64,
    root: String,
}

fn items_js(items: &[OfferItem]) -> Vec<ItemJs> {
    items
        .iter()
        .map(|i| ItemJs { path: i.path.clone(), size: i.size as f64, root: hex(&i.root) })
        .collect()
}

/// File-transfer events for the page (see the crate docs).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case", rename_all_fields = "camelCase")]
pub(crate) enum FileEvent {
    Hashing {
        path: String,
        done_bytes: f64,
        size: f64,
    },
    Offer {
        peer_id: String,
        name: String,
        offer_id: f64,
        items: Vec<ItemJs>,
        total_size: f64,
    },
    OfferAnswered {
        peer_id: String,
        offer_id: f64,
        accepted: bool,
    },
    Resumed {
        peer_id: String,
        offer_id: f64,
        roots: Vec<String>,
    },
    Progress(ProgressJs),
    Upload {
        peer_id: String,
        root: String,
        sent_bytes: f64,
        size: f64,
    },
    FileComplete {
        root: String,
        paths: Vec<String>,
        size: f64,
        /// "browser" (kept in the page's storage: `downloadedFile`, `saveDownload`) or
        /// "downloads" (streamed into the browser's downloads folder; nothing kept here).
        stored: &'static str,
    },
    FileFailed {
        root: String,
        reason: String,
    },
    Delivered {
        peer_id: String,
        root: String,
    },
    TransferCancelled {
        peer_id: String,
        offer_id: f64,
        reason: String,
        by_peer: bool,
        outgoing: bool,
    },
    ChunkRejected {
        root: String,
        index: u32,
        peer_id: String,
    },
    SourceAdded {
        root: String,
        peer_id: String,
    },
    SourceDropped {
        root: String,
        peer_id: String,
        reason: String,
    },
}

/// A download's progress (the `progress` event and `transfers().downloads`).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ProgressJs {
    root: String,
    paths: Vec<String>,
    size: f64,
    done_bytes: f64,
    speed_bps: f64,
    eta_s: Option<f64>,
    sources: Vec<String>,
    offers: Vec<OfferRef>,
    state: &'static str,
}

/// An offer a download belongs to.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OfferRef {
    peer_id: String,
    offer_id: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutgoingJs {
    peer_id: String,
    offer_id: f64,
    items: Vec<ItemJs>,
    state: &'static str,
    sent_bytes: f64,
    total_bytes: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IncomingJs {
    peer_id: String,
    offer_id: f64,
    items: Vec<ItemJs>,
}

/// `session.transfers()`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TransfersJs {
    downloads: Vec<ProgressJs>,
    outgoing: Vec<OutgoingJs>,
    incoming: Vec<IncomingJs>,
}

fn state_str(s: DownloadState) -> &'static str {
    match s {
        DownloadState::Active => "active",
        DownloadState::Paused => "paused",
        DownloadState::Complete => "complete",
        DownloadState::Failed => "failed",
    }
}

struct Outgoing {
    items: Vec<OfferItem>,
    state: &'static str,
    delivered: HashSet<Root>,
}

/// Speed of one download, smoothed.
#[derive(Default)]
struct Meter {
    last_at: Option<Duration>,
    last_bytes: u64,
    speed: f64,
    emitted_at: Option<Duration>,
}

impl Meter {
    fn sample(&mut self, now: Duration, bytes: u64) -> f64 {
        match self.last_at {
            Some(at) if now.saturating_sub(at) >= PROGRESS_EVERY => {
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

/// Where downloads go: the writer worker says which when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Store {
    /// In place into the origin-private file system: resumable, kept for Open and Save,
    /// and served to other peers once complete.
    Opfs,
    /// Each file is one streamed browser download (into the browser's downloads folder),
    /// written in order through the service worker. Nothing is kept in the page: such a
    /// download cannot resume after a reload and is not served to others.
    Stream,
}

#[wasm_bindgen(module = "/js/stream-download.js")]
extern "C" {
    /// Starts a streamed browser download; resolves to the `MessagePort` that feeds it.
    #[wasm_bindgen(js_name = startStreamDownload, catch)]
    async fn start_stream_download(path: &str, size: f64) -> Result<JsValue, JsValue>;
}

enum Pending {
    Begin,
    Write { root: Root, index: u32 },
    Close { then: Vec<FileEvent> },
    Delete,
}

/// Chunk writes gathered for one message to the writer.
#[derive(Default)]
struct WriteBatch {
    /// A [`WRITE_BATCH_BYTES`] buffer holding the chunks back to back.
    buffer: Option<js_sys::Uint8Array>,
    used: u32,
    ids: Vec<u32>,
    roots: Vec<Root>,
    names: Vec<JsValue>,
    offsets: Vec<f64>,
    lens: Vec<u32>,
}

/// The disk-writer worker.
struct Writer {
    worker: web_sys::Worker,
    /// Batch buffers the worker gave back, for the next writes.
    pool: Vec<js_sys::ArrayBuffer>,
    batch: WriteBatch,
    /// A `setTimeout(0)` that sends a part-filled batch is pending.
    flush_armed: bool,
    flush_callback: Closure<dyn FnMut()>,
    pending: HashMap<u32, Pending>,
    next_id: u32,
    /// JS strings made once, not for every chunk: the request's keys, and each download's
    /// file name.
    keys: [JsValue; 3],
    names: HashMap<Root, JsValue>,
    _onmessage: Closure<dyn FnMut(web_sys::MessageEvent)>,
}

/// The keys of a request to the writer, in the order of `Writer::keys`.
const WRITER_KEYS: [&str; 3] = ["id", "op", "name"];

/// The engine's timer: `setTimeout` id, when it fires, and its callback.
type EngineTimer = (i32, Duration, Closure<dyn FnMut()>);

/// Recently read blocks of shared files, as promises of their `ArrayBuffer`s (so
/// concurrent reads of one block share one `Blob.slice`).
#[derive(Default)]
struct ReadCache {
    blocks: std::collections::VecDeque<((Root, u64), js_sys::Promise)>,
}

impl ReadCache {
    fn block(&mut self, root: &Root, blob: &web_sys::Blob, block: u64) -> js_sys::Promise {
        if let Some((_, p)) = self.blocks.iter().find(|(k, _)| *k == (*root, block)) {
            return p.clone();
        }
        let start = (block * READ_BLOCK) as f64;
        let end = (start + READ_BLOCK as f64).min(blob.size());
        let promise = match blob.slice_with_f64_and_f64(start, end) {
            Ok(slice) => slice.array_buffer(),
            Err(e) => js_sys::Promise::reject(&e),
        };
        self.blocks.push_back(((*root, block), promise.clone()));
        if self.blocks.len() > READ_CACHE_BLOCKS {
            self.blocks.pop_front();
        }
        promise
    }

    fn forget(&mut self, root: &Root) {
        self.blocks.retain(|((r, _), _)| r != root);
    }
}

/// Everything file transfer holds in a session.
pub(crate) struct Files {
    pub(crate) engine: Engine,
    blobs: HashMap<Root, web_sys::Blob>,
    reads: ReadCache,
    writer: Option<Writer>,
    writer_error: Option<String>,
    /// `downloads: "stream"` at join: stream downloads even where OPFS works.
    force_stream: bool,
    /// Where downloads go, once the writer said so.
    store: Option<Store>,
    outgoing: BTreeMap<(PeerId, u64), Outgoing>,
    meters: HashMap<Root, Meter>,
    uploads: HashMap<(PeerId, Root), (u64, Option<Duration>)>,
    corrupt: Vec<(Option<Root>, u32)>,
    timer: Option<EngineTimer>,
    dirty: HashSet<Root>,
    save_pending: bool,
    save_closure: Option<Closure<dyn FnMut()>>,
    /// Upload limit in bytes per second, over all peers (`setUploadLimit`).
    upload_limit: Option<f64>,
    /// When (`now()`) the upload pacer lets the next chunk go.
    upload_next: Duration,
}

impl Files {
    pub(crate) fn new(first_offer_id: u64) -> Self {
        Self {
            engine: Engine::new(EngineConfig::default(), first_offer_id),
            blobs: HashMap::new(),
            reads: ReadCache::default(),
            writer: None,
            writer_error: None,
            force_stream: false,
            store: None,
            outgoing: BTreeMap::new(),
            meters: HashMap::new(),
            uploads: HashMap::new(),
            corrupt: Vec::new(),
            timer: None,
            dirty: HashSet::new(),
            save_pending: false,
            save_closure: None,
            upload_limit: None,
            upload_next: Duration::ZERO,
        }
    }

    /// Streams downloads into the browser's downloads folder even where OPFS works.
    pub(crate) fn force_stream(&mut self) {
        self.force_stream = true;
    }

    pub(crate) fn store(&self) -> Option<Store> {
        if self.force_stream { Some(Store::Stream) } else { self.store }
    }

    /// Fails unless complete downloads are kept in the page (OPFS).
    pub(crate) fn check_kept(&self) -> Result<(), String> {
        match self.store() {
            Some(Store::Stream) => Err("this browser saved downloads straight into its downloads \
                 folder (it cannot store them in the page); open them from there"
                .to_string()),
            _ => Ok(()),
        }
    }

    /// Limits what this node serves to `bytes_per_s` over all peers (`None`: no limit).
    pub(crate) fn set_upload_limit(&mut self, bytes_per_s: Option<f64>) {
        self.upload_limit = bytes_per_s.filter(|r| r.is_finite() && *r > 0.0);
        self.upload_next = Duration::ZERO;
    }

    /// How long a chunk of `len` bytes waits before it is served, under the upload limit:
    /// chunks leave evenly spaced at the limit's rate (a burst of at most one chunk).
    fn upload_wait(&mut self, len: usize, now: Duration) -> Duration {
        let Some(rate) = self.upload_limit else { return Duration::ZERO };
        let start = self.upload_next.max(now);
        self.upload_next = start + Duration::from_secs_f64(len as f64 / rate);
        start - now
    }

    fn progress_js(&mut self, root: &Root, now: Duration) -> Option<ProgressJs> {
        let p = self.engine.progress(root)?;
        let meter = self.meters.entry(*root).or_default();
        let speed =
            if p.state == DownloadState::Active { meter.sample(now, p.done_bytes) } else { 0.0 };
        let left = p.size.saturating_sub(p.done_bytes) as f64;
        Some(ProgressJs {
            root: hex(root),
            paths: p.paths,
            size: p.size as f64,
            done_bytes: p.done_bytes as f64,
            speed_bps: speed.round(),
            eta_s: (speed > 0.0).then(|| (left / speed * 10.0).round() / 10.0),
            sources: p.sources.iter().map(PeerId::to_string).collect(),
            offers: p
                .offers
                .iter()
                .map(|(peer, id)| OfferRef { peer_id: peer.to_string(), offer_id: *id as f64 })
                .collect(),
            state: state_str(p.state),
        })
    }

    pub(crate) fn transfers(&mut self) -> TransfersJs {
        let now = now();
        let roots: Vec<Root> = self.engine.downloads().iter().map(|d| d.root).collect();
        let downloads = roots.iter().filter_map(|r| self.progress_js(r, now)).collect();
        let outgoing = self
            .outgoing
            .iter()
            .map(|((peer, id), o)| {
                let sent: u64 = o
                    .items
                    .iter()
                    .map(|i| self.uploads.get(&(peer.clone(), i.root)).map_or(0, |u| u.0))
                    .sum();
                OutgoingJs {
                    peer_id: peer.to_string(),
                    offer_id: *id as f64,
                    items: items_js(&o.items),
                    state: o.state,
                    sent_bytes: sent as f64,
                    total_bytes: o.items.iter().map(|i| i.size as f64).sum(),
                }
            })
            .collect();
        let incoming = self
            .engine
            .pending_offers()
            .into_iter()
            .map(|(peer, id, items)| IncomingJs {
                peer_id: peer.to_string(),
                offer_id: id as f64,
                items: items_js(&items),
            })
            .collect();
        TransfersJs { downloads, outgoing, incoming }
    }
}

/// Resolves after `d` (a `setTimeout`).
async fn sleep(d: Duration) {
    let ms = i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        if let Some(win) = web_sys::window() {
            let _ = win.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, ms);
        }
    });
    let _ = JsFuture::from(promise).await;
}

fn js_err(e: &JsValue) -> String {
    e.dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| e.as_string())
        .unwrap_or_else(|| format!("{e:?}"))
}

/// Reads `len` bytes at `offset` of `blob`.
pub(crate) async fn read_blob(
    blob: &web_sys::Blob,
    offset: f64,
    len: f64,
) -> Result<Vec<u8>, String> {
    let slice = blob.slice_with_f64_and_f64(offset, offset + len).map_err(|e| js_err(&e))?;
    let buffer = JsFuture::from(slice.array_buffer()).await.map_err(|e| js_err(&e))?;
    Ok(js_sys::Uint8Array::new(&buffer).to_vec())
}

async fn downloads_dir() -> Result<web_sys::FileSystemDirectoryHandle, String> {
    let navigator = web_sys::window().ok_or("no window")?.navigator();
    let root = JsFuture::from(navigator.storage().get_directory()).await.map_err(|e| js_err(&e))?;
    let root: web_sys::FileSystemDirectoryHandle = root.unchecked_into();
    let options = web_sys::FileSystemGetDirectoryOptions::new();
    options.set_create(true);
    let dir = JsFuture::from(root.get_directory_handle_with_options(DOWNLOAD_DIR, &options))
        .await
        .map_err(|e| js_err(&e))?;
    Ok(dir.unchecked_into())
}

/// The stored bytes of the download `root`, as a (disk-backed) `File`.
pub(crate) async fn stored_file(root: &Root) -> Result<web_sys::File, String> {
    let dir = downloads_dir().await?;
    let handle = JsFuture::from(dir.get_file_handle(&hex(root)))
        .await
        .map_err(|_| "that file is not stored here".to_string())?;
    let handle: web_sys::FileSystemFileHandle = handle.unchecked_into();
    let file = JsFuture::from(handle.get_file()).await.map_err(|e| js_err(&e))?;
    Ok(file.unchecked_into())
}

/// Plain BLAKE3 of a blob, read in slices.
pub(crate) async fn hash_blob(blob: &web_sys::Blob) -> Result<String, String> {
    let size = blob.size();
    let mut hasher = blake3::Hasher::new();
    let mut offset = 0.0;
    while offset < size {
        let len = HASH_READ.min(size - offset);
        hasher.update(&read_blob(blob, offset, len).await?);
        offset += len;
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// One file the page wants to send: the blob and its path.
pub(crate) struct Entry {
    pub file: web_sys::Blob,
    pub path: String,
}

/// Turns `File | FileList | [File | {file, path}]` into entries.
pub(crate) fn entries(value: &JsValue) -> Result<Vec<Entry>, String> {
    fn one(v: &JsValue) -> Result<Entry, String> {
        if let Some(file) = v.dyn_ref::<web_sys::File>() {
            let rel = js_sys::Reflect::get(file, &"webkitRelativePath".into())
                .ok()
                .and_then(|p| p.as_string())
                .filter(|p| !p.is_empty());
            return Ok(Entry {
                file: file.clone().into(),
                path: rel.unwrap_or_else(|| file.name()),
            });
        }
        let file = js_sys::Reflect::get(v, &"file".into()).map_err(|e| js_err(&e))?;
        let Some(blob) = file.dyn_ref::<web_sys::Blob>() else {
            return Err("each entry must be a File or { file, path }".into());
        };
        let path = js_sys::Reflect::get(v, &"path".into())
            .ok()
            .and_then(|p| p.as_string())
            .or_else(|| file.dyn_ref::<web_sys::File>().map(web_sys::File::name))
            .ok_or("an entry has no path")?;
        Ok(Entry { file: blob.clone(), path })
    }
    if value.is_instance_of::<web_sys::File>() {
        return Ok(vec![one(value)?]);
    }
    if let Some(list) = value.dyn_ref::<web_sys::FileList>() {
        return (0..list.length()).filter_map(|i| list.get(i)).map(|f| one(&f.into())).collect();
    }
    if let Some(array) = value.dyn_ref::<js_sys::Array>() {
        return array.iter().map(|v| one(&v)).collect();
    }
    Err("give a File, a FileList or an array of files".into())
}

/// Hashes every entry (emitting `hashing` events) and shares it; returns (root, path,
/// size) of each.
pub(crate) async fn hash_and_share(
    inner: &Rc<RefCell<Inner>>,
    entries: Vec<Entry>,
) -> Result<Vec<(Root, String, u64)>, String> {
    let mut shared = Vec::new();
    for entry in entries {
        weft_core::transfer::wire::check_path(&entry.path).map_err(|e| e.to_string())?;
        let size = entry.file.size();
        // The very same `File` shared before (say by `shareFiles`, then `sendFiles`): a
        // `File` is a snapshot, so its root has not changed.
        let known = {
            let i = inner.borrow();
            i.files
                .blobs
                .iter()
                // Sizes first, in Rust: a folder of many files must not cost a JS call
                // per pair of files.
                .find(|(root, blob)| {
                    i.files.engine.shared_size(root) == Some(size as u64)
                        && js_sys::Object::is(blob, &entry.file)
                })
                .map(|(root, _)| *root)
        };
        if let Some(root) = known {
            let ev = FileEvent::Hashing { path: entry.path.clone(), done_bytes: size, size };
            emit(inner, vec![JsEvent::File(ev)]);
            shared.push((root, entry.path, size as u64));
            continue;
        }
        let mut hasher = FileHasher::new();
        let mut offset = 0.0;
        let mut last_event = now();
        while offset < size {
            let len = HASH_READ.min(size - offset);
            let data = read_blob(&entry.file, offset, len)
                .await
                .map_err(|e| format!("cannot read {}: {e}", entry.path))?;
            hasher.update(&data);
            offset += len;
            if now().saturating_sub(last_event) >= PROGRESS_EVERY || offset >= size {
                last_event = now();
                let ev = FileEvent::Hashing { path: entry.path.clone(), done_bytes: offset, size };
                emit(inner, vec![JsEvent::File(ev)]);
            }
        }
        let digest = hasher.finish();
        {
            let mut i = inner.borrow_mut();
            i.files
                .engine
                .share(digest.root, digest.size, digest.cvs)
                .map_err(|e| e.to_string())?;
            i.files.blobs.insert(digest.root, entry.file.clone());
        }
        shared.push((digest.root, entry.path, digest.size));
    }
    Ok(shared)
}

impl Inner {
    /// Offers shared files to peers; returns (peer, offer id) of each offer.
    pub(crate) fn offer_files(
        &mut self,
        files: &[(Root, String)],
        to: &[PeerId],
        out: &mut Vec<JsEvent>,
    ) -> Result<Vec<(PeerId, u64)>, String> {
        let mut offers = Vec::new();
        for peer in to {
            let id = self.files.engine.offer(peer, files).map_err(|e| format!("{peer}: {e}"))?;
            let items = self.files.engine.offer_items(peer, id).unwrap_or_default();
            self.files.outgoing.insert(
                (peer.clone(), id),
                Outgoing { items, state: "pending", delivered: HashSet::new() },
            );
            offers.push((peer.clone(), id));
        }
        self.pump_files(out);
        Ok(offers)
    }

    /// Peers with an established session, by id or all of them.
    pub(crate) fn established(&self, to: Option<Vec<String>>) -> Result<Vec<PeerId>, String> {
        let connected = self.connected_peers();
        match to {
            None => {
                if connected.is_empty() {
                    return Err("no peer is connected".into());
                }
                Ok(connected)
            }
            Some(ids) => ids
                .iter()
                .map(|id| {
                    connected
                        .iter()
                        .find(|p| p.as_str() == id)
                        .cloned()
                        .ok_or_else(|| format!("peer {id} is not connected"))
                })
                .collect(),
        }
    }

    /// Feeds transfer messages from `peer` to the engine.
    pub(crate) fn on_transfer(
        &mut self,
        peer: &PeerId,
        frames: Vec<(u8, Vec<u8>)>,
        out: &mut Vec<JsEvent>,
    ) {
        let now = now();
        for (frame_type, body) in frames {
            match TransferMsg::decode(frame_type, &body) {
                Ok(msg) => self.files.engine.handle(peer, msg, now),
                Err(e) => web_sys::console::warn_1(
                    &format!("weft: bad file-transfer message from {peer}: {e}").into(),
                ),
            }
        }
        self.pump_files(out);
    }

    /// Does what the engine asks, until it asks nothing more.
    pub(crate) fn pump_files(&mut self, out: &mut Vec<JsEvent>) {
        let now = now();
        let mut touched = HashSet::new();
        // Small messages (chunk requests above all) to one peer share a packet.
        let mut batches: BTreeMap<PeerId, Vec<(u8, Vec<u8>)>> = BTreeMap::new();
        while let Some(output) = self.files.engine.poll_output() {
            match output {
                Output::Send { peer, msg } => {
                    let (t, body) = msg.encode();
                    if body.len() <= BATCH_FRAME {
                        let batch = batches.entry(peer).or_default();
                        batch.push((t, body));
                        continue;
                    }
                    // A big message: what was batched for this peer goes first.
                    if let Some(batch) = batches.remove(&peer) {
                        self.send_transfers(&peer, batch);
                    }
                    if self.send_transfer(&peer, t, body) {
                        touched.insert(peer);
                    }
                }
                Output::Read { peer, root, index, offset, len } => {
                    self.start_read(peer, root, index, offset, len)
                }
                Output::Write { root, index, offset, data } => {
                    self.start_write(root, index, offset, data)
                }
                Output::Discard { root } => {
                    self.files.dirty.remove(&root);
                    self.files.meters.remove(&root);
                    self.writer_op(Some(root), "delete", None, Pending::Delete);
                    if let Some(store) = self.store.clone() {
                        wasm_bindgen_futures::spawn_local(async move {
                            if let Err(e) = store.delete_download(&hex(&root)).await {
                                web_sys::console::warn_1(&format!("weft: {e}").into());
                            }
                        });
                    }
                }
                Output::Event(ev) => self.on_file_event(ev, now, out),
            }
        }
        for (peer, batch) in batches {
            if self.send_transfers(&peer, batch) {
                touched.insert(peer);
            }
        }
        for peer in touched {
            self.flush_link(&peer);
        }
        self.arm_files_timer();
    }

    fn on_file_event(&mut self, ev: TransferEvent, now: Duration, out: &mut Vec<JsEvent>) {
        let ev = match ev {
            TransferEvent::Offered { peer, offer_id, items } => FileEvent::Offer {
                name: self.peer_name(&peer),
                peer_id: peer.to_string(),
                offer_id: offer_id as f64,
                total_size: items.iter().map(|i| i.size as f64).sum(),
                items: items_js(&items),
            },
            TransferEvent::Resumed { peer, offer_id, items } => FileEvent::Resumed {
                peer_id: peer.to_string(),
                offer_id: offer_id as f64,
                roots: items.iter().map(|i| hex(&i.root)).collect(),
            },
            TransferEvent::Answered { peer, offer_id, accepted } => {
                if let Some(o) = self.files.outgoing.get_mut(&(peer.clone(), offer_id)) {
                    o.state = if accepted { "accepted" } else { "declined" };
                }
                FileEvent::OfferAnswered {
                    peer_id: peer.to_string(),
                    offer_id: offer_id as f64,
                    accepted,
                }
            }
            TransferEvent::Delivered { peer, root } => {
                for ((p, _), o) in self.files.outgoing.iter_mut() {
                    if *p == peer && o.items.iter().any(|i| i.root == root) {
                        o.delivered.insert(root);
                        if o.items.iter().all(|i| o.delivered.contains(&i.root)) {
                            o.state = "delivered";
                        }
                    }
                }
                FileEvent::Delivered { peer_id: peer.to_string(), root: hex(&root) }
            }
            TransferEvent::FileComplete { root, paths, size } => {
                let streamed = self.files.store() == Some(Store::Stream);
                if streamed {
                    // The file left the page: there is nothing to serve it from.
                    self.files.engine.unshare(&root);
                } else {
                    self.files.dirty.insert(root);
                    self.schedule_save();
                }
                let stored = if streamed { "downloads" } else { "browser" };
                let done =
                    FileEvent::FileComplete { root: hex(&root), paths, size: size as f64, stored };
                let mut then = vec![done];
                if let Some(p) = self.files.progress_js(&root, now) {
                    then.insert(0, FileEvent::Progress(p));
                }
                if size == 0 {
                    // Nothing was written: create the empty file.
                    self.writer_op(
                        Some(root),
                        "write",
                        Some((0.0, Vec::new())),
                        Pending::Close { then: vec![] },
                    );
                }
                // Announce only once the writer closed the file: then it can be read.
                self.writer_op(Some(root), "close", None, Pending::Close { then });
                return;
            }
            TransferEvent::FileFailed { root, reason } => {
                if self.files.store() == Some(Store::Stream) {
                    // A streamed download cannot continue where it stopped: fail the
                    // browser's download (no truncated file is saved) and forget it.
                    self.files.engine.forget(&root);
                } else {
                    self.files.dirty.insert(root);
                    self.schedule_save();
                }
                FileEvent::FileFailed { root: hex(&root), reason }
            }
            TransferEvent::Cancelled { peer, offer_id, reason, by_peer, outgoing } => {
                if let Some(o) = self.files.outgoing.get_mut(&(peer.clone(), offer_id)) {
                    o.state = "cancelled";
                }
                FileEvent::TransferCancelled {
                    peer_id: peer.to_string(),
                    offer_id: offer_id as f64,
                    reason,
                    by_peer,
                    outgoing,
                }
            }
            TransferEvent::ChunkRejected { root, index, peer } => {
                FileEvent::ChunkRejected { root: hex(&root), index, peer_id: peer.to_string() }
            }
            TransferEvent::SourceAdded { root, peer } => {
                FileEvent::SourceAdded { root: hex(&root), peer_id: peer.to_string() }
            }
            TransferEvent::SourceDropped { root, peer, reason } => {
                FileEvent::SourceDropped { root: hex(&root), peer_id: peer.to_string(), reason }
            }
            TransferEvent::ShareFailed { root, reason } => {
                self.files.blobs.remove(&root);
                self.files.reads.forget(&root);
                web_sys::console::warn_1(
                    &format!("weft: stopped sharing {}: {reason}", hex(&root)).into(),
                );
                return;
            }
        };
        out.push(JsEvent::File(ev));
    }

    fn start_read(&mut self, peer: PeerId, root: Root, index: u32, offset: u64, len: usize) {
        // Reads go through 1 MiB blocks, with the next block fetched ahead: one
        // `Blob.slice` per 16 chunks instead of one per chunk.
        let cached = self.files.blobs.get(&root).cloned().map(|blob| {
            let block = offset / READ_BLOCK;
            let promise = self.files.reads.block(&root, &blob, block);
            if ((block + 1) * READ_BLOCK) as f64 <= blob.size() {
                // Read ahead: requests are mostly in order.
                let _ = self.files.reads.block(&root, &blob, block + 1);
            }
            (promise, block * READ_BLOCK)
        });
        let wait = self.files.upload_wait(len, now());
        let weak = self.weak();
        wasm_bindgen_futures::spawn_local(async move {
            if !wait.is_zero() {
                sleep(wait).await;
            }
            let result = match cached {
                Some((promise, start)) => match JsFuture::from(promise).await {
                    Ok(buffer) => {
                        let buffer: js_sys::ArrayBuffer = buffer.unchecked_into();
                        let at = u32::try_from(offset - start).unwrap_or(u32::MAX);
                        let len32 = u32::try_from(len).unwrap_or(0);
                        if u64::from(at) + u64::from(len32) > u64::from(buffer.byte_length()) {
                            Err("the file is shorter than when it was hashed".to_string())
                        } else {
                            Ok(js_sys::Uint8Array::new_with_byte_offset_and_length(
                                &buffer, at, len32,
                            )
                            .to_vec())
                        }
                    }
                    Err(e) => Err(js_err(&e)),
                },
                // A completed download served from OPFS: open it once, then cache it.
                None => match stored_file(&root).await {
                    Ok(file) => {
                        let blob: web_sys::Blob = file.into();
                        if let Some(inner) = weak.upgrade() {
                            inner.borrow_mut().files.blobs.insert(root, blob.clone());
                        }
                        read_blob(&blob, offset as f64, len as f64).await
                    }
                    Err(e) => Err(e),
                },
            };
            let Some(inner) = weak.upgrade() else { return };
            let mut out = Vec::new();
            {
                let mut i = inner.borrow_mut();
                match result {
                    Ok(mut data) => {
                        let hook = i
                            .files
                            .corrupt
                            .iter()
                            .position(|(r, n)| *n == index && r.is_none_or(|r| r == root));
                        if let Some(pos) = hook {
                            i.files.corrupt.remove(pos);
                            if let Some(b) = data.get_mut(len / 2) {
                                *b ^= 0x40;
                            }
                        }
                        i.count_upload(&peer, &root, len as u64, &mut out);
                        i.files.engine.read_done(&peer, &root, index, data);
                    }
                    Err(e) => i.files.engine.read_failed(
                        &peer,
                        &root,
                        &format!("cannot read the file: {e}"),
                    ),
                }
                i.pump_files(&mut out);
            }
            emit(&inner, out);
        });
    }

    fn count_upload(&mut self, peer: &PeerId, root: &Root, len: u64, out: &mut Vec<JsEvent>) {
        let now = now();
        let size = self
            .files
            .outgoing
            .iter()
            .filter(|((p, _), _)| p == peer)
            .flat_map(|(_, o)| o.items.iter())
            .find(|i| i.root == *root)
            .map_or(0, |i| i.size);
        let entry = self.files.uploads.entry((peer.clone(), *root)).or_insert((0, None));
        entry.0 += len;
        let due =
            entry.1.is_none_or(|t| now.saturating_sub(t) >= PROGRESS_EVERY) || entry.0 >= size;
        if due {
            entry.1 = Some(now);
            out.push(JsEvent::File(FileEvent::Upload {
                peer_id: peer.to_string(),
                root: hex(root),
                sent_bytes: entry.0 as f64,
                size: size as f64,
            }));
        }
    }

    fn start_write(&mut self, root: Root, index: u32, offset: u64, data: Vec<u8>) {
        self.writer_op(
            Some(root),
            "write",
            Some((offset as f64, data)),
            Pending::Write { root, index },
        );
    }

    /// Posts one request to the writer worker (starting it if needed).
    fn writer_op(
        &mut self,
        root: Option<Root>,
        op: &str,
        write: Option<(f64, Vec<u8>)>,
        pending: Pending,
    ) {
        if self.files.writer.is_none() {
            match start_writer(self.weak(), self.files.force_stream) {
                Ok(w) => self.files.writer = Some(w),
                Err(e) => {
                    let reason = format!("cannot store downloads in this browser: {e}");
                    self.files.writer_error = Some(reason.clone());
                    if let Pending::Write { root, .. } = pending {
                        self.files.engine.write_failed(&root, &reason);
                    }
                    return;
                }
            }
        }
        if let (Some(root), "write") = (root, op) {
            let first = self.files.writer.as_ref().is_some_and(|w| !w.names.contains_key(&root));
            if first {
                self.writer_begin(&root);
            }
        }
        if let (Some(root), "write", Some((offset, data))) = (root, op, &write) {
            self.batch_write(root, *offset, data, pending);
            return;
        }
        // Anything else keeps its place after the writes before it.
        self.flush_writes();
        let Some(writer) = self.files.writer.as_mut() else { return };
        let id = writer.next_id;
        writer.next_id = writer.next_id.wrapping_add(1);
        let msg = js_sys::Object::new();
        let [k_id, k_op, k_name] = &writer.keys;
        let set = |k: &JsValue, v: &JsValue| {
            let _ = js_sys::Reflect::set(&msg, k, v);
        };
        set(k_id, &id.into());
        set(k_op, &wasm_bindgen::intern(op).into());
        if let Some(root) = root {
            writer.names.remove(&root);
            set(k_name, &hex(&root).into());
        }
        match writer.worker.post_message(&msg) {
            Ok(()) => {
                writer.pending.insert(id, pending);
            }
            Err(e) => {
                if let Pending::Write { root, .. } = pending {
                    self.files
                        .engine
                        .write_failed(&root, &format!("cannot write the download: {}", js_err(&e)));
                }
            }
        }
    }

    /// Adds a chunk write to the batch; sends the batch once full (or on the next turn of
    /// the event loop).
    fn batch_write(&mut self, root: Root, offset: f64, data: &[u8], pending: Pending) {
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let full = self.files.writer.as_ref().is_some_and(|w| {
            w.batch.buffer.is_some() && w.batch.used.saturating_add(len) > WRITE_BATCH_BYTES
        });
        if full {
            self.flush_writes();
        }
        let Some(writer) = self.files.writer.as_mut() else { return };
        if len > WRITE_BATCH_BYTES {
            // Never happens with chunk-sized writes.
            self.files.engine.write_failed(&root, "a write larger than the writer's batch");
            return;
        }
        let id = writer.next_id;
        writer.next_id = writer.next_id.wrapping_add(1);
        let buffer = writer.batch.buffer.get_or_insert_with(|| match writer.pool.pop() {
            Some(b) => js_sys::Uint8Array::new(&b),
            None => js_sys::Uint8Array::new_with_length(WRITE_BATCH_BYTES),
        });
        let at = writer.batch.used;
        buffer.subarray(at, at + len).copy_from(data);
        writer.batch.used = at + len;
        let name = writer.names.entry(root).or_insert_with(|| hex(&root).into()).clone();
        let b = &mut writer.batch;
        b.ids.push(id);
        b.roots.push(root);
        b.names.push(name);
        b.offsets.push(offset);
        b.lens.push(len);
        writer.pending.insert(id, pending);
        if writer.batch.ids.len() >= WRITE_BATCH {
            self.flush_writes();
        } else if !writer.flush_armed {
            if let Some(win) = web_sys::window() {
                writer.flush_armed = win
                    .set_timeout_with_callback_and_timeout_and_arguments_0(
                        writer.flush_callback.as_ref().unchecked_ref(),
                        0,
                    )
                    .is_ok();
            }
            if !writer.flush_armed {
                self.flush_writes();
            }
        }
    }

    /// Sends the gathered chunk writes to the writer in one message.
    fn flush_writes(&mut self) {
        let Some(writer) = self.files.writer.as_mut() else { return };
        let batch = std::mem::take(&mut writer.batch);
        let Some(buffer) = batch.buffer else { return };
        let array = |items: Vec<JsValue>| items.into_iter().collect::<js_sys::Array>();
        let msg = js_sys::Object::new();
        let data = buffer.buffer();
        for (k, v) in [
            ("op", JsValue::from("writes")),
            ("ids", array(batch.ids.iter().map(|&i| JsValue::from(i)).collect()).into()),
            ("names", array(batch.names).into()),
            ("offsets", array(batch.offsets.iter().map(|&o| JsValue::from(o)).collect()).into()),
            ("lens", array(batch.lens.iter().map(|&l| JsValue::from(l)).collect()).into()),
            ("data", data.clone().into()),
        ] {
            let _ = js_sys::Reflect::set(&msg, &wasm_bindgen::intern(k).into(), &v);
        }
        if let Err(e) = writer.worker.post_message_with_transfer(&msg, &js_sys::Array::of1(&data)) {
            let reason = format!("cannot write the download: {}", js_err(&e));
            for id in &batch.ids {
                writer.pending.remove(id);
            }
            for root in &batch.roots {
                self.files.engine.write_failed(root, &reason);
            }
        }
    }

    /// Tells the writer a file's first write follows, with what a streamed download needs.
    fn writer_begin(&mut self, root: &Root) {
        let (path, size) = self
            .files
            .engine
            .progress(root)
            .map(|p| (p.paths.first().cloned().unwrap_or_default(), p.size))
            .unwrap_or_default();
        let Some(writer) = self.files.writer.as_mut() else { return };
        let id = writer.next_id;
        writer.next_id = writer.next_id.wrapping_add(1);
        let msg = js_sys::Object::new();
        for (k, v) in [
            ("id", JsValue::from(id)),
            ("op", "begin".into()),
            ("name", hex(root).into()),
            ("path", path.into()),
            ("size", (size as f64).into()),
        ] {
            let _ = js_sys::Reflect::set(&msg, &k.into(), &v);
        }
        if writer.worker.post_message(&msg).is_ok() {
            writer.pending.insert(id, Pending::Begin);
        }
    }

    /// The writer asked for a streamed download of `name` (a root in hex).
    fn on_stream_wanted(&mut self, name: String, path: String, size: f64) {
        let weak = self.weak();
        wasm_bindgen_futures::spawn_local(async move {
            let result = start_stream_download(&path, size).await;
            let Some(inner) = weak.upgrade() else { return };
            let mut out = Vec::new();
            {
                let mut i = inner.borrow_mut();
                match result {
                    Ok(port) => {
                        let Some(w) = i.files.writer.as_ref() else { return };
                        let msg = js_sys::Object::new();
                        let _ = js_sys::Reflect::set(&msg, &"op".into(), &"port".into());
                        let _ = js_sys::Reflect::set(&msg, &"name".into(), &name.into());
                        let _ = js_sys::Reflect::set(&msg, &"port".into(), &port);
                        let _ =
                            w.worker.post_message_with_transfer(&msg, &js_sys::Array::of1(&port));
                    }
                    Err(e) => {
                        if let Ok(root) = parse_root(&name) {
                            let reason = format!("cannot start the download: {}", js_err(&e));
                            i.files.engine.write_failed(&root, &reason);
                        }
                    }
                }
                i.pump_files(&mut out);
            }
            emit(&inner, out);
        });
    }

    /// The writer answered request `id`.
    fn on_writer_reply(
        &mut self,
        id: u32,
        ok: bool,
        error: &str,
        disk_full: bool,
        out: &mut Vec<JsEvent>,
    ) {
        let Some(pending) = self.files.writer.as_mut().and_then(|w| w.pending.remove(&id)) else {
            return;
        };
        let now = now();
        match pending {
            Pending::Write { root, index } => {
                if ok {
                    self.files.engine.write_done(&root, index, now);
                    self.files.dirty.insert(root);
                    self.schedule_save();
                    self.maybe_progress(&root, now, out);
                } else {
                    let reason = if disk_full {
                        "the disk is full (or the browser's storage quota is used up)".to_string()
                    } else {
                        format!("cannot write the download: {error}")
                    };
                    self.files.engine.write_failed(&root, &reason);
                }
            }
            Pending::Close { then } => out.extend(then.into_iter().map(JsEvent::File)),
            Pending::Begin | Pending::Delete => {}
        }
    }

    fn maybe_progress(&mut self, root: &Root, now: Duration, out: &mut Vec<JsEvent>) {
        let due = self
            .files
            .meters
            .get(root)
            .and_then(|m| m.emitted_at)
            .is_none_or(|t| now.saturating_sub(t) >= PROGRESS_EVERY);
        if !due {
            return;
        }
        if let Some(p) = self.files.progress_js(root, now) {
            if let Some(m) = self.files.meters.get_mut(root) {
                m.emitted_at = Some(now);
            }
            out.push(JsEvent::File(FileEvent::Progress(p)));
        }
    }

    /// Saves the records of changed downloads soon (at most every [`SAVE_EVERY`] ms).
    fn schedule_save(&mut self) {
        // Streamed downloads cannot resume: no record.
        if self.files.save_pending
            || self.store.is_none()
            || self.files.store() == Some(Store::Stream)
        {
            return;
        }
        self.files.save_pending = true;
        let weak = self.weak();
        let closure = Closure::<dyn FnMut()>::new(move || {
            let Some(inner) = weak.upgrade() else { return };
            let (store, records) = {
                let mut i = inner.borrow_mut();
                i.files.save_pending = false;
                let dirty: Vec<Root> = i.files.dirty.drain().collect();
                let records: Vec<DownloadRecord> =
                    dirty.iter().filter_map(|r| i.files.engine.record(r)).collect();
                (i.store.clone(), records)
            };
            let Some(store) = store else { return };
            wasm_bindgen_futures::spawn_local(async move {
                for record in records {
                    if let Err(e) = store.save_download(&record).await {
                        web_sys::console::warn_1(
                            &format!("weft: cannot save download state: {e}").into(),
                        );
                    }
                }
            });
        });
        if let Some(win) = web_sys::window() {
            let _ = win.set_timeout_with_callback_and_timeout_and_arguments_0(
                closure.as_ref().unchecked_ref(),
                SAVE_EVERY,
            );
        }
        self.files.save_closure = Some(closure);
    }

    /// Arms the engine's one timer at its `poll_timeout`.
    fn arm_files_timer(&mut self) {
        let wanted = self.files.engine.poll_timeout();
        // A timer armed no later than wanted stays: it wakes the engine early, harmlessly,
        // and is armed again then. (The deadline moves later with nearly every chunk
        // received; re-arming each time cost a clearTimeout and a setTimeout per chunk.)
        match (self.files.timer.as_ref().map(|t| t.1), wanted) {
            (Some(armed), Some(w)) if armed <= w => return,
            (Some(_), None) | (None, None) => return,
            _ => {}
        }
        if let (Some((id, _, _)), Some(win)) = (self.files.timer.take(), web_sys::window()) {
            win.clear_timeout_with_handle(id);
        }
        let Some(at) = wanted else { return };
        let ms = i32::try_from(at.saturating_sub(now()).as_millis())
            .unwrap_or(i32::MAX)
            .saturating_add(1);
        let weak = self.weak();
        let callback = Closure::<dyn FnMut()>::new(move || {
            let Some(inner) = weak.upgrade() else { return };
            let mut out = Vec::new();
            {
                let mut i = inner.borrow_mut();
                if let Some(t) = i.files.timer.as_mut() {
                    t.1 = Duration::MAX;
                }
                i.files.engine.handle_timeout(now());
                i.pump_files(&mut out);
            }
            emit(&inner, out);
        });
        if let Some(win) = web_sys::window() {
            if let Ok(id) = win.set_timeout_with_callback_and_timeout_and_arguments_0(
                callback.as_ref().unchecked_ref(),
                ms,
            ) {
                self.files.timer = Some((id, at, callback));
            }
        }
    }

    /// Restores saved downloads and asks connected peers who holds them.
    pub(crate) fn restore_downloads(
        &mut self,
        records: Vec<DownloadRecord>,
        out: &mut Vec<JsEvent>,
    ) {
        let now = now();
        for record in records {
            if self.files.engine.progress(&record.root).is_none() {
                self.files.engine.restore(record);
            }
        }
        for peer in self.connected_peers() {
            self.files.engine.peer_connected(&peer, now);
        }
        self.pump_files(out);
    }

    pub(crate) fn debug_corrupt(&mut self, index: u32, root: Option<Root>) {
        self.files.corrupt.push((root, index));
    }

    pub(crate) fn forget_download(&mut self, root: &Root, out: &mut Vec<JsEvent>) {
        self.files.engine.forget(root);
        self.writer_op(Some(*root), "delete", None, Pending::Delete);
        self.pump_files(out);
        if let Some(store) = self.store.clone() {
            let key = hex(root);
            wasm_bindgen_futures::spawn_local(async move {
                let _ = store.delete_download(&key).await;
            });
        }
    }
}

fn start_writer(weak: Weak<RefCell<Inner>>, force_stream: bool) -> Result<Writer, String> {
    let flush_weak = weak.clone();
    let options = web_sys::WorkerOptions::new();
    options.set_name("weft-download-writer");
    let url =
        if force_stream { "download-writer.js?downloads=stream" } else { "download-writer.js" };
    let worker = web_sys::Worker::new_with_options(url, &options).map_err(|e| js_err(&e))?;
    let onmessage =
        Closure::<dyn FnMut(web_sys::MessageEvent)>::new(move |ev: web_sys::MessageEvent| {
            let data = ev.data();
            let get = |k: &str| {
                js_sys::Reflect::get(&data, &wasm_bindgen::intern(k).into())
                    .unwrap_or(JsValue::UNDEFINED)
            };
            // A batch of writes is answered with `ids`, anything else with `id`.
            let ids: Vec<u32> = match get("ids").dyn_into::<js_sys::Array>() {
                Ok(ids) => ids.iter().filter_map(|v| v.as_f64()).map(|v| v as u32).collect(),
                Err(_) => get("id").as_f64().map(|v| v as u32).into_iter().collect(),
            };
            let ok = get("ok").as_bool().unwrap_or(false);
            let error = get("error").as_string().unwrap_or_default();
            let disk_full = get("disk_full").as_bool().unwrap_or(false);
            let buffer = get("data").dyn_into::<js_sys::ArrayBuffer>().ok();
            let Some(inner) = weak.upgrade() else { return };
            let mut out = Vec::new();
            {
                let mut i = inner.borrow_mut();
                if get("hello").is_truthy() {
                    let store = get("store").as_string();
                    i.files.store = Some(if store.as_deref() == Some("opfs") {
                        Store::Opfs
                    } else {
                        Store::Stream
                    });
                    return;
                }
                if let Some(name) = get("stream").as_string() {
                    let path = get("path").as_string().unwrap_or_default();
                    let size = get("size").as_f64().unwrap_or(0.0);
                    i.on_stream_wanted(name, path, size);
                    return;
                }
                if let (Some(buffer), Some(w)) = (buffer, i.files.writer.as_mut()) {
                    if buffer.byte_length() == WRITE_BATCH_BYTES && w.pool.len() < WRITE_POOL {
                        w.pool.push(buffer);
                    }
                }
                for id in ids {
                    i.on_writer_reply(id, ok, &error, disk_full, &mut out);
                }
                i.pump_files(&mut out);
            }
            emit(&inner, out);
        });
    worker.set_onmessage(Some(onmessage.as_ref().unchecked_ref()));
    let flush_callback = Closure::<dyn FnMut()>::new(move || {
        let Some(inner) = flush_weak.upgrade() else { return };
        let mut i = inner.borrow_mut();
        if let Some(w) = i.files.writer.as_mut() {
            w.flush_armed = false;
        }
        i.flush_writes();
    });
    Ok(Writer {
        worker,
        pool: Vec::new(),
        batch: WriteBatch::default(),
        flush_armed: false,
        flush_callback,
        pending: HashMap::new(),
        next_id: 1,
        keys: WRITER_KEYS.map(JsValue::from_str),
        names: HashMap::new(),
        _onmessage: onmessage,
    })
}

/// Copies every complete download into a folder the user picks (File System Access API).
pub(crate) async fn save_all_to(inner: &Rc<RefCell<Inner>>) -> Result<u32, String> {
    let window = web_sys::window().ok_or("no window")?;
    let picker =
        js_sys::Reflect::get(&window, &"showDirectoryPicker".into()).map_err(|e| js_err(&e))?;
    let picker: js_sys::Function = picker
        .dyn_into()
        .map_err(|_| "this browser cannot save into a folder; use Save on each file")?;
    let options = js_sys::Object::new();
    let _ = js_sys::Reflect::set(&options, &"mode".into(), &"readwrite".into());
    let dir = JsFuture::from(js_sys::Promise::from(
        picker.call1(&window, &options).map_err(|e| js_err(&e))?,
    ))
    .await
    .map_err(|e| js_err(&e))?;
    let dir: web_sys::FileSystemDirectoryHandle = dir.unchecked_into();
    let complete: Vec<(Root, Vec<String>)> = inner
        .borrow()
        .files
        .engine
        .downloads()
        .into_iter()
        .filter(|d| d.state == DownloadState::Complete)
        .map(|d| (d.root, d.paths))
        .collect();
    let mut saved = 0;
    for (root, paths) in complete {
        let file = stored_file(&root).await?;
        for path in paths {
            let mut parts: Vec<&str> = path.split('/').collect();
            let Some(name) = parts.pop() else { continue };
            let mut folder = dir.clone();
            for part in parts {
                let options = web_sys::FileSystemGetDirectoryOptions::new();
                options.set_create(true);
                let next = JsFuture::from(folder.get_directory_handle_with_options(part, &options))
                    .await
                    .map_err(|e| js_err(&e))?;
                folder = next.unchecked_into();
            }
            let options = web_sys::FileSystemGetFileOptions::new();
            options.set_create(true);
            let handle = JsFuture::from(folder.get_file_handle_with_options(name, &options))
                .await
                .map_err(|e| js_err(&e))?;
            let handle: web_sys::FileSystemFileHandle = handle.unchecked_into();
            let writable =
                JsFuture::from(handle.create_writable()).await.map_err(|e| js_err(&e))?;
            let writable: web_sys::FileSystemWritableFileStream = writable.unchecked_into();
            // Streams from disk to disk: the file never sits in memory.
            JsFuture::from(file.stream().pipe_to(&writable)).await.map_err(|e| js_err(&e))?;
            saved += 1;
        }
    }
    Ok(saved)
}

/// Starts the browser's download of a stored file under the last part of `path`.
pub(crate) async fn save_download(root: &Root, path: &str) -> Result<(), String> {
    let file = stored_file(root).await?;
    let url = web_sys::Url::create_object_url_with_blob(&file).map_err(|e| js_err(&e))?;
    let document = web_sys::window().and_then(|w| w.document()).ok_or("no document")?;
    let a: web_sys::HtmlAnchorElement =
        document.create_element("a").map_err(|e| js_err(&e))?.unchecked_into();
    a.set_href(&url);
    a.set_download(path.rsplit('/').next().unwrap_or(path));
    a.click();
    // Revoke later: the download has started reading by then.
    let closure = Closure::once_into_js(move || {
        let _ = web_sys::Url::revoke_object_url(&url);
    });
    if let Some(win) = web_sys::window() {
        let _ = win
            .set_timeout_with_callback_and_timeout_and_arguments_0(closure.unchecked_ref(), 60_000);
    }
    Ok(())
}
