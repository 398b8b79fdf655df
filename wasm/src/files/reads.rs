//! Reading files in the browser: served chunks (1 MiB blocks, read ahead), hashing (while
//! the file is already offered, or before `shareFiles` shares it), stored downloads (OPFS), and saving them out (a folder the user picks, or a
//! plain browser download).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use weft_core::transfer::{Cv, FileDigest, FileHasher, Root};

use crate::error::WebError;

/// Bytes hashed per read while preparing a file.
const HASH_READ: f64 = 4.0 * 1024.0 * 1024.0;
/// Bytes read from a shared file at once (a multiple of the chunk size).
const READ_BLOCK: u64 = 1024 * 1024;
/// Blocks kept per node for serving (16 MiB).
const READ_CACHE_BLOCKS: usize = 16;
/// The OPFS folder of downloads (also in `download-writer.js`).
const DOWNLOAD_DIR: &str = "weft-downloads";

/// Recently read blocks of shared files, as promises of their `ArrayBuffer`s (so
/// concurrent reads of one block share one `Blob.slice`).
#[derive(Default)]
pub(crate) struct ReadCache {
    blocks: VecDeque<((Root, u64), js_sys::Promise)>,
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

    /// The block holding `offset` of `blob` (and the next one, read ahead: requests are
    /// mostly in order): one `Blob.slice` per 16 chunks instead of one per chunk. Returns
    /// the block's promise and where it starts.
    pub(crate) fn read(
        &mut self,
        root: &Root,
        blob: &web_sys::Blob,
        offset: u64,
    ) -> (js_sys::Promise, u64) {
        let block = offset / READ_BLOCK;
        let promise = self.block(root, blob, block);
        if ((block + 1) * READ_BLOCK) as f64 <= blob.size() {
            let _ = self.block(root, blob, block + 1);
        }
        (promise, block * READ_BLOCK)
    }

    pub(crate) fn forget(&mut self, root: &Root) {
        self.blocks.retain(|((r, _), _)| r != root);
    }
}

/// Reads `len` bytes at `offset` of the file `root`: from its cached block if it is a
/// picked file, else from OPFS (a complete download, opened once and then kept).
pub(crate) async fn read_chunk(
    cached: Option<(js_sys::Promise, u64)>,
    root: &Root,
    offset: u64,
    len: usize,
    blobs: &Rc<RefCell<HashMap<Root, web_sys::Blob>>>,
) -> Result<Vec<u8>, WebError> {
    match cached {
        Some((promise, start)) => {
            let buffer = JsFuture::from(promise).await?;
            let buffer: js_sys::ArrayBuffer = buffer.unchecked_into();
            let at = u32::try_from(offset - start).unwrap_or(u32::MAX);
            let len32 = u32::try_from(len).unwrap_or(0);
            if u64::from(at) + u64::from(len32) > u64::from(buffer.byte_length()) {
                return Err(WebError::FileShrank);
            }
            Ok(js_sys::Uint8Array::new_with_byte_offset_and_length(&buffer, at, len32).to_vec())
        }
        None => {
            let blob: web_sys::Blob = stored_file(root).await?.into();
            blobs.borrow_mut().insert(*root, blob.clone());
            read_blob(&blob, offset as f64, len as f64).await
        }
    }
}

/// Reads `len` bytes at `offset` of `blob`.
pub(crate) async fn read_blob(
    blob: &web_sys::Blob,
    offset: f64,
    len: f64,
) -> Result<Vec<u8>, WebError> {
    let slice = blob.slice_with_f64_and_f64(offset, offset + len)?;
    let buffer = JsFuture::from(slice.array_buffer()).await?;
    Ok(js_sys::Uint8Array::new(&buffer).to_vec())
}

async fn downloads_dir() -> Result<web_sys::FileSystemDirectoryHandle, WebError> {
    let navigator = web_sys::window().ok_or(WebError::NoWindow)?.navigator();
    let root = JsFuture::from(navigator.storage().get_directory()).await?;
    let root: web_sys::FileSystemDirectoryHandle = root.unchecked_into();
    let options = web_sys::FileSystemGetDirectoryOptions::new();
    options.set_create(true);
    let dir =
        JsFuture::from(root.get_directory_handle_with_options(DOWNLOAD_DIR, &options)).await?;
    Ok(dir.unchecked_into())
}

/// The stored bytes of the download `root`, as a (disk-backed) `File`.
pub(crate) async fn stored_file(root: &Root) -> Result<web_sys::File, WebError> {
    let dir = downloads_dir().await?;
    let handle = JsFuture::from(dir.get_file_handle(&root.to_string()))
        .await
        .map_err(|_| WebError::NotStored)?;
    let handle: web_sys::FileSystemFileHandle = handle.unchecked_into();
    let file = JsFuture::from(handle.get_file()).await?;
    Ok(file.unchecked_into())
}

/// Plain BLAKE3 of a blob, read in slices.
pub(crate) async fn hash_blob(blob: &web_sys::Blob) -> Result<String, WebError> {
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

/// Hashes a file for sharing, front to back, calling `progress(done, CVs of the chunks
/// finished so far)` after each read; stops (`None`) as soon as `progress` says so.
pub(crate) async fn hash_entry(
    entry: &Entry,
    mut progress: impl FnMut(f64, &[Cv]) -> bool,
) -> Result<Option<FileDigest>, WebError> {
    let size = entry.file.size();
    let mut hasher = FileHasher::new();
    let mut offset = 0.0;
    while offset < size {
        let len = HASH_READ.min(size - offset);
        let data = read_blob(&entry.file, offset, len).await.map_err(|e| WebError::CannotRead {
            path: entry.path.clone(),
            reason: e.to_string(),
        })?;
        hasher.update(&data);
        offset += len;
        if !progress(offset, hasher.cvs()) {
            return Ok(None);
        }
    }
    Ok(Some(hasher.finish()))
}

/// One file the page wants to send: the blob and its path.
pub(crate) struct Entry {
    pub file: web_sys::Blob,
    pub path: String,
}

/// Turns `File | FileList | [File | {file, path}]` into entries.
pub(crate) fn entries(value: &JsValue) -> Result<Vec<Entry>, WebError> {
    fn one(v: &JsValue) -> Result<Entry, WebError> {
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
        let file = js_sys::Reflect::get(v, &"file".into())?;
        let Some(blob) = file.dyn_ref::<web_sys::Blob>() else {
            return Err(WebError::NotAFile);
        };
        let path = js_sys::Reflect::get(v, &"path".into())
            .ok()
            .and_then(|p| p.as_string())
            .or_else(|| file.dyn_ref::<web_sys::File>().map(web_sys::File::name))
            .ok_or(WebError::NoPath)?;
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
    Err(WebError::NotFiles)
}

/// Copies every complete download into a folder the user picks (File System Access API).
/// `complete` lists the complete downloads with their paths.
pub(crate) async fn save_all_to(complete: Vec<(Root, Vec<String>)>) -> Result<u32, WebError> {
    let window = web_sys::window().ok_or(WebError::NoWindow)?;
    let picker = js_sys::Reflect::get(&window, &"showDirectoryPicker".into())?;
    let picker: js_sys::Function = picker.dyn_into().map_err(|_| WebError::NoFolderPicker)?;
    let options = js_sys::Object::new();
    let _ = js_sys::Reflect::set(&options, &"mode".into(), &"readwrite".into());
    let dir = JsFuture::from(js_sys::Promise::from(picker.call1(&window, &options)?)).await?;
    let dir: web_sys::FileSystemDirectoryHandle = dir.unchecked_into();
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
                    .await?;
                folder = next.unchecked_into();
            }
            let options = web_sys::FileSystemGetFileOptions::new();
            options.set_create(true);
            let handle =
                JsFuture::from(folder.get_file_handle_with_options(name, &options)).await?;
            let handle: web_sys::FileSystemFileHandle = handle.unchecked_into();
            let writable = JsFuture::from(handle.create_writable()).await?;
            let writable: web_sys::FileSystemWritableFileStream = writable.unchecked_into();
            // Streams from disk to disk: the file never sits in memory.
            JsFuture::from(file.stream().pipe_to(&writable)).await?;
            saved += 1;
        }
    }
    Ok(saved)
}

/// Starts the browser's download of a stored file under the last part of `path`.
pub(crate) async fn save_download(root: &Root, path: &str) -> Result<(), WebError> {
    let file = stored_file(root).await?;
    let url = web_sys::Url::create_object_url_with_blob(&file)?;
    let document = web_sys::window().and_then(|w| w.document()).ok_or(WebError::NoWindow)?;
    let a: web_sys::HtmlAnchorElement = document.create_element("a")?.unchecked_into();
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
