//! File transfer's I/O in the browser, for the node's transfer engine. Nothing here
//! decides anything: the node says what to read, write, discard, finish and save, and
//! hears back through a [`Sink`].
//!
//! - **Reading** (sending side, [`reads`]): `Blob.slice(..).arrayBuffer()` of the picked
//!   `File` in 1 MiB blocks read ahead; hashing reads 4 MiB slices front to back.
//! - **Writing** (receiving side, [`writer`]): verified chunks go to a dedicated worker
//!   (`download-writer.js`) that writes them in place into the origin-private file system
//!   with a sync access handle. Nothing is held beyond the engine's bound of unwritten
//!   chunks. Where the browser has no OPFS sync access handles (or `downloads: "stream"`),
//!   the worker instead feeds each file, in order, to a streamed browser download served by
//!   the service worker `sw.js` (see [`Store::Stream`]).
//! - **Resume**: the records the node asks to save go to IndexedDB (store `downloads`).

mod reads;
pub(crate) mod send;
mod writer;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use weft_core::node::{Input, SavedTo, WriteFailure};
use weft_core::signal::PeerId;
use weft_core::transfer::{DownloadRecord, Root};

use self::reads::ReadCache;
pub(crate) use self::reads::{
    Entry, entries, hash_blob, hash_entry, save_all_to, save_download, stored_file,
};
use self::writer::{Pending, Writer};
use crate::error::WebError;
use crate::local_store::LocalStore;

/// Where the session's inputs go: queued, then run (see `session.rs`).
pub(crate) type Sink = Rc<dyn Fn(Input)>;

/// Where downloads go: the writer worker says which when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Store {
    /// In place into the origin-private file system: resumable, kept for Open and Save,
    /// and served to other peers once complete.
    Opfs,
    /// Streamed, in file order, into the browser's downloads folder through the service
    /// worker: nothing is kept in the page, so no resume and no serving.
    Stream,
}

/// The browser's side of file transfer. See the module docs.
pub(crate) struct FilesIo {
    sink: Sink,
    /// Files we serve: picked by the user, or complete downloads opened from OPFS.
    blobs: Rc<RefCell<HashMap<Root, web_sys::Blob>>>,
    reads: ReadCache,
    writer: Option<Writer>,
    /// Why the writer could not start.
    writer_error: Option<WebError>,
    /// `downloads: "stream"` at join: stream downloads even where OPFS works.
    force_stream: bool,
    /// Where downloads go, once the writer said so.
    store: Rc<Cell<Option<Store>>>,
    /// What the node was told.
    store_told: Option<Store>,
    local: Option<LocalStore>,
}

impl FilesIo {
    pub(crate) fn new(sink: Sink, force_stream: bool, local: Option<LocalStore>) -> Self {
        Self {
            sink,
            blobs: Rc::default(),
            reads: ReadCache::default(),
            writer: None,
            writer_error: None,
            force_stream,
            store: Rc::default(),
            store_told: force_stream.then_some(Store::Stream),
            local,
        }
    }

    /// Where downloads go, if known yet.
    pub(crate) fn store(&self) -> Option<Store> {
        if self.force_stream { Some(Store::Stream) } else { self.store.get() }
    }

    /// The store, once, when the writer reported it (for the node).
    pub(crate) fn take_store_change(&mut self) -> Option<Store> {
        let store = self.store()?;
        (self.store_told != Some(store)).then(|| {
            self.store_told = Some(store);
            store
        })
    }

    /// Fails unless complete downloads are kept in the page (OPFS).
    pub(crate) fn check_kept(&self) -> Result<(), WebError> {
        match self.store() {
            Some(Store::Stream) => Err(WebError::NotKept),
            _ => Ok(()),
        }
    }

    /// Serves `blob` as `root` from now on.
    pub(crate) fn add_blob(&self, root: Root, blob: web_sys::Blob) {
        self.blobs.borrow_mut().insert(root, blob);
    }

    /// The root of this very `File`, if it is served already and `size_of(root)` says it
    /// has its size (sizes first: a folder of many files must not cost a JS call per pair).
    pub(crate) fn known_blob(
        &self,
        blob: &web_sys::Blob,
        size_of: impl Fn(&Root) -> Option<u64>,
    ) -> Option<Root> {
        let size = blob.size() as u64;
        self.blobs
            .borrow()
            .iter()
            .find(|(root, b)| size_of(root) == Some(size) && js_sys::Object::is(b, blob))
            .map(|(root, _)| *root)
    }

    /// A shared file could not be read: no longer served.
    pub(crate) fn forget_blob(&mut self, root: &Root) {
        self.blobs.borrow_mut().remove(root);
        self.reads.forget(root);
    }

    /// Reads a chunk for `peer`; reports [`Input::ReadDone`].
    pub(crate) fn read(&mut self, peer: PeerId, root: Root, index: u32, offset: u64, len: usize) {
        let blob = self.blobs.borrow().get(&root).cloned();
        let cached = blob.map(|blob| self.reads.read(&root, &blob, offset));
        let sink = self.sink.clone();
        let blobs = self.blobs.clone();
        wasm_bindgen_futures::spawn_local(async move {
            let result = reads::read_chunk(cached, &root, offset, len, &blobs)
                .await
                .map_err(|e| e.to_string());
            sink(Input::ReadDone { peer, root, index, result });
        });
    }

    /// Writes a verified chunk of the download `root` (offered first under `path`, of
    /// `size` bytes); reports [`Input::WriteDone`].
    pub(crate) fn write(
        &mut self,
        root: Root,
        index: u32,
        offset: u64,
        data: Vec<u8>,
        path: &str,
        size: u64,
    ) {
        let Some(writer) = self.writer() else {
            return (self.sink)(Input::WriteDone { root, index, result: Err(self.no_writer()) });
        };
        writer.write(root, offset as f64, &data, Pending::Write { root, index }, path, size);
    }

    /// A complete download: closes it (a streamed one ends its browser download); reports
    /// [`Input::FileSaved`] once the file is there.
    pub(crate) fn finish(&mut self, root: Root, size: u64) {
        let Some(writer) = self.writer() else {
            let result =
                Err(self.writer_error.as_ref().map(ToString::to_string).unwrap_or_default());
            return (self.sink)(Input::FileSaved { root, result });
        };
        if size == 0 {
            // Nothing was written: create the empty file.
            writer.write(root, 0.0, &[], Pending::Ignore, "", 0);
        }
        let to =
            if self.store() == Some(Store::Stream) { SavedTo::Downloads } else { SavedTo::Kept };
        if let Some(writer) = self.writer.as_ref() {
            writer.op(Some(root), "close", Pending::Close { root, to });
        }
    }

    /// Deletes what is stored of the download `root` (data and record).
    pub(crate) fn discard(&mut self, root: Root) {
        // A `File` of it read before is stale once it is gone (or written again).
        self.forget_blob(&root);
        if let Some(writer) = self.writer() {
            writer.op(Some(root), "delete", Pending::Ignore);
        }
        if let Some(local) = self.local.clone() {
            wasm_bindgen_futures::spawn_local(async move {
                if let Err(e) = local.delete_download(&root.to_string()).await {
                    web_sys::console::warn_1(&format!("weft: {e}").into());
                }
            });
        }
    }

    /// Saves resume records in IndexedDB; reports [`Input::RecordsSaved`].
    pub(crate) fn save_records(&mut self, records: Vec<DownloadRecord>) {
        let sink = self.sink.clone();
        let Some(local) = self.local.clone() else { return sink(Input::RecordsSaved) };
        wasm_bindgen_futures::spawn_local(async move {
            for record in records {
                if let Err(e) = local.save_download(&record).await {
                    web_sys::console::warn_1(
                        &format!("weft: cannot save download state: {e}").into(),
                    );
                }
            }
            sink(Input::RecordsSaved);
        });
    }

    /// Ends the writer worker (the session is over). A later write would start it again.
    pub(crate) fn stop(&mut self) {
        self.writer = None;
    }

    /// The writer worker, started on first use.
    fn writer(&mut self) -> Option<&Writer> {
        if self.writer.is_none() {
            match Writer::start(self.sink.clone(), self.store.clone(), self.force_stream) {
                Ok(w) => self.writer = Some(w),
                Err(e) => {
                    web_sys::console::error_1(&format!("weft: no download writer: {e}").into());
                    self.writer_error = Some(e);
                    return None;
                }
            }
        }
        self.writer.as_ref()
    }

    fn no_writer(&self) -> WriteFailure {
        WriteFailure::NoStorage(
            self.writer_error.as_ref().map(ToString::to_string).unwrap_or_default(),
        )
    }
}
