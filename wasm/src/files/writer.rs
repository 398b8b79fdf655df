//! The download writer: requests to the worker `download-writer.js` and its answers.
//! Chunk writes go 16 to a message (one reused 1 MiB buffer, not one `postMessage` per
//! chunk); a part-filled batch leaves on the next turn of the event loop, and any other
//! request sends the batch first, so order is kept.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};

use wasm_bindgen::prelude::*;
use weft_core::node::{Input, SavedTo, WriteFailure};
use weft_core::transfer::{CHUNK_LEN, Root};

use super::{Sink, Store};
use crate::error::{WebError, js_err};

/// Chunks sent to the writer in one message (one `postMessage` per 1 MiB, not per chunk).
const WRITE_BATCH: usize = 16;
/// Bytes of one batch buffer.
const WRITE_BATCH_BYTES: u32 = (WRITE_BATCH * CHUNK_LEN) as u32;
/// Batch buffers kept for reuse by the writer.
const WRITE_POOL: usize = 16;
/// The keys of a request to the writer, in the order of `State::keys`.
const WRITER_KEYS: [&str; 3] = ["id", "op", "name"];

#[wasm_bindgen(module = "/js/module-assets.js")]
extern "C" {
    /// The download writer's URL, beside the module (never relative to the page).
    #[wasm_bindgen(js_name = downloadWriterUrl)]
    fn download_writer_url() -> String;

    /// Starts a streamed browser download; resolves to the `MessagePort` that feeds it.
    /// (Its code, `stream-download.js`, is fetched only then.)
    #[wasm_bindgen(js_name = startStreamDownload, catch)]
    async fn start_stream_download(path: &str, size: f64) -> Result<JsValue, JsValue>;
}

/// What an answer of the writer completes.
pub(crate) enum Pending {
    /// Nothing to report (a begin, a delete, the empty write of an empty file).
    Ignore,
    /// A chunk write: [`Input::WriteDone`].
    Write { root: Root, index: u32 },
    /// The file is complete: [`Input::FileSaved`] once closed (a failed close fails it).
    Close { root: Root, to: SavedTo },
}

/// Chunk writes gathered for one message to the writer.
#[derive(Default)]
struct WriteBatch {
    /// A [`WRITE_BATCH_BYTES`] buffer holding the chunks back to back.
    buffer: Option<js_sys::Uint8Array>,
    used: u32,
    ids: Vec<u32>,
    names: Vec<JsValue>,
    offsets: Vec<f64>,
    lens: Vec<u32>,
}

struct State {
    worker: web_sys::Worker,
    sink: Sink,
    /// Batch buffers the worker gave back, for the next writes.
    pool: Vec<js_sys::ArrayBuffer>,
    batch: WriteBatch,
    /// A `setTimeout(0)` that sends a part-filled batch is pending.
    flush_armed: bool,
    pending: HashMap<u32, Pending>,
    next_id: u32,
    /// JS strings made once, not for every chunk: the request's keys, and each download's
    /// file name.
    keys: [JsValue; 3],
    names: HashMap<Root, JsValue>,
    /// The worker failed to load or died: every request fails at once, with this reason.
    broken: Option<String>,
}

/// The disk-writer worker.
pub(crate) struct Writer {
    state: Rc<RefCell<State>>,
    flush_callback: Closure<dyn FnMut()>,
    _onmessage: Closure<dyn FnMut(web_sys::MessageEvent)>,
    _onerror: Closure<dyn FnMut(web_sys::Event)>,
}

impl Drop for Writer {
    /// The session is gone: so is its worker.
    fn drop(&mut self) {
        self.state.borrow().worker.terminate();
    }
}

/// Reports the failure of every request in `ids` (after the state is released).
fn fail_all(sink: &Sink, pending: Vec<Pending>, error: &str) {
    for p in pending {
        report(sink, p, Err(WebError::Browser(error.to_string())), false);
    }
}

fn report(sink: &Sink, pending: Pending, result: Result<(), WebError>, disk_full: bool) {
    match pending {
        Pending::Ignore => {}
        Pending::Write { root, index } => {
            let result = result.map_err(|e| {
                if disk_full {
                    WriteFailure::QuotaExceeded
                } else {
                    WriteFailure::Other(e.to_string())
                }
            });
            sink(Input::WriteDone { root, index, result });
        }
        Pending::Close { root, to } => {
            let result = result.map(|()| to).map_err(|e| e.to_string());
            sink(Input::FileSaved { root, result });
        }
    }
}

impl State {
    fn next_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Sends the gathered chunk writes in one message; what could not be sent.
    fn flush(&mut self) -> Option<(Vec<Pending>, String)> {
        let batch = std::mem::take(&mut self.batch);
        let buffer = batch.buffer?;
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
        match self.worker.post_message_with_transfer(&msg, &js_sys::Array::of1(&data)) {
            Ok(()) => None,
            Err(e) => {
                let failed = batch.ids.iter().filter_map(|id| self.pending.remove(id)).collect();
                Some((failed, js_err(&e)))
            }
        }
    }
}

impl Writer {
    /// Starts the worker. Its answers go to `sink`; the store it picked, to `store`.
    pub(crate) fn start(
        sink: Sink,
        store: Rc<Cell<Option<Store>>>,
        force_stream: bool,
    ) -> Result<Self, WebError> {
        let options = web_sys::WorkerOptions::new();
        options.set_name("weft-download-writer");
        let mut url = download_writer_url();
        if force_stream {
            url.push_str("?downloads=stream");
        }
        let worker = web_sys::Worker::new_with_options(&url, &options)?;
        let state = Rc::new(RefCell::new(State {
            worker: worker.clone(),
            sink,
            pool: Vec::new(),
            batch: WriteBatch::default(),
            flush_armed: false,
            pending: HashMap::new(),
            next_id: 1,
            keys: WRITER_KEYS.map(JsValue::from_str),
            names: HashMap::new(),
            broken: None,
        }));
        let weak = Rc::downgrade(&state);
        let onmessage =
            Closure::<dyn FnMut(web_sys::MessageEvent)>::new(move |ev: web_sys::MessageEvent| {
                on_message(&weak, &store, &ev.data());
            });
        worker.set_onmessage(Some(onmessage.as_ref().unchecked_ref()));
        // A worker that cannot load (a 404, a CSP refusal) fires `error` and never answers:
        // without this, every download waited for it forever.
        let error_weak = Rc::downgrade(&state);
        let onerror = Closure::<dyn FnMut(web_sys::Event)>::new(move |ev: web_sys::Event| {
            ev.prevent_default();
            let Some(state) = error_weak.upgrade() else { return };
            let detail = ev
                .dyn_ref::<web_sys::ErrorEvent>()
                .map(web_sys::ErrorEvent::message)
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "it could not be loaded".into());
            let reason = format!("the download writer ({url}) failed: {detail}");
            web_sys::console::error_1(&format!("weft: {reason}").into());
            let (pending, sink) = {
                let mut s = state.borrow_mut();
                s.broken = Some(reason.clone());
                let pending: Vec<Pending> = s.pending.drain().map(|(_, p)| p).collect();
                (pending, s.sink.clone())
            };
            fail_all(&sink, pending, &reason);
        });
        worker.set_onerror(Some(onerror.as_ref().unchecked_ref()));
        let flush_weak = Rc::downgrade(&state);
        let flush_callback = Closure::<dyn FnMut()>::new(move || {
            let Some(state) = flush_weak.upgrade() else { return };
            let (failed, sink) = {
                let mut s = state.borrow_mut();
                s.flush_armed = false;
                (s.flush(), s.sink.clone())
            };
            if let Some((pending, error)) = failed {
                fail_all(&sink, pending, &error);
            }
        });
        Ok(Self { state, flush_callback, _onmessage: onmessage, _onerror: onerror })
    }

    /// Adds a chunk write to the batch (telling the writer first when it is the file's
    /// first); sends the batch once full, or on the next turn of the event loop.
    pub(crate) fn write(
        &self,
        root: Root,
        offset: f64,
        data: &[u8],
        pending: Pending,
        path: &str,
        size: u64,
    ) {
        if let Some((reason, sink)) = self.broken() {
            return fail_all(&sink, vec![pending], &reason);
        }
        let first = !self.state.borrow().names.contains_key(&root);
        if first {
            self.begin(&root, path, size);
        }
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let mut failed = None;
        {
            let mut s = self.state.borrow_mut();
            if s.batch.buffer.is_some() && s.batch.used.saturating_add(len) > WRITE_BATCH_BYTES {
                failed = s.flush();
            }
        }
        if len > WRITE_BATCH_BYTES {
            // Never happens with chunk-sized writes.
            if let Pending::Write { root, index } = pending {
                let result = Err(WriteFailure::TooLarge);
                (self.state.borrow().sink.clone())(Input::WriteDone { root, index, result });
            }
            return;
        }
        {
            let mut s = self.state.borrow_mut();
            let id = s.next_id();
            let buffer = match s.batch.buffer.take() {
                Some(b) => b,
                None => match s.pool.pop() {
                    Some(b) => js_sys::Uint8Array::new(&b),
                    None => js_sys::Uint8Array::new_with_length(WRITE_BATCH_BYTES),
                },
            };
            let at = s.batch.used;
            buffer.subarray(at, at + len).copy_from(data);
            s.batch.buffer = Some(buffer);
            s.batch.used = at + len;
            let name = s.names.entry(root).or_insert_with(|| root.to_string().into()).clone();
            let b = &mut s.batch;
            b.ids.push(id);
            b.names.push(name);
            b.offsets.push(offset);
            b.lens.push(len);
            s.pending.insert(id, pending);
            if s.batch.ids.len() >= WRITE_BATCH {
                failed = failed.or(s.flush());
            } else if !s.flush_armed {
                if let Some(win) = web_sys::window() {
                    s.flush_armed = win
                        .set_timeout_with_callback_and_timeout_and_arguments_0(
                            self.flush_callback.as_ref().unchecked_ref(),
                            0,
                        )
                        .is_ok();
                }
                if !s.flush_armed {
                    failed = failed.or(s.flush());
                }
            }
        }
        if let Some((pending, error)) = failed {
            let sink = self.state.borrow().sink.clone();
            fail_all(&sink, pending, &error);
        }
    }

    /// Posts one request other than a write (`close`, `delete`), after the writes before
    /// it.
    pub(crate) fn op(&self, root: Option<Root>, op: &str, pending: Pending) {
        if let Some((reason, sink)) = self.broken() {
            return fail_all(&sink, vec![pending], &reason);
        }
        let (failed, sink) = {
            let mut s = self.state.borrow_mut();
            let mut failed = s.flush();
            let id = s.next_id();
            let msg = js_sys::Object::new();
            let [k_id, k_op, k_name] = &s.keys;
            let set = |k: &JsValue, v: &JsValue| {
                let _ = js_sys::Reflect::set(&msg, k, v);
            };
            set(k_id, &id.into());
            set(k_op, &wasm_bindgen::intern(op).into());
            if let Some(root) = root {
                set(k_name, &root.to_string().into());
            }
            if let Some(root) = root {
                s.names.remove(&root);
            }
            match s.worker.post_message(&msg) {
                Ok(()) => {
                    s.pending.insert(id, pending);
                }
                Err(e) => {
                    let (mut list, _) = failed.take().unwrap_or_default();
                    list.push(pending);
                    failed = Some((list, js_err(&e)));
                }
            }
            (failed, s.sink.clone())
        };
        if let Some((pending, error)) = failed {
            fail_all(&sink, pending, &error);
        }
    }

    /// Why the worker is broken (every request fails at once), and where to report it.
    fn broken(&self) -> Option<(String, Sink)> {
        let s = self.state.borrow();
        s.broken.clone().map(|reason| (reason, s.sink.clone()))
    }

    /// Tells the writer a file's first write follows, with what a streamed download needs.
    fn begin(&self, root: &Root, path: &str, size: u64) {
        let mut s = self.state.borrow_mut();
        let id = s.next_id();
        let msg = js_sys::Object::new();
        for (k, v) in [
            ("id", JsValue::from(id)),
            ("op", "begin".into()),
            ("name", root.to_string().into()),
            ("path", path.into()),
            ("size", (size as f64).into()),
        ] {
            let _ = js_sys::Reflect::set(&msg, &k.into(), &v);
        }
        if s.worker.post_message(&msg).is_ok() {
            s.pending.insert(id, Pending::Ignore);
        }
    }
}

/// An answer of the worker: `{ hello, store }` when it starts, `{ stream, path, size }`
/// when a streamed download must be opened, else the answer to requests (`id` or `ids`,
/// `ok`, `error`, `disk_full`, and a batch buffer to reuse in `data`).
fn on_message(state: &Weak<RefCell<State>>, store: &Rc<Cell<Option<Store>>>, data: &JsValue) {
    let get = |k: &str| {
        js_sys::Reflect::get(data, &wasm_bindgen::intern(k).into()).unwrap_or(JsValue::UNDEFINED)
    };
    let Some(state) = state.upgrade() else { return };
    if get("hello").is_truthy() {
        let opfs = get("store").as_string().as_deref() == Some("opfs");
        store.set(Some(if opfs { Store::Opfs } else { Store::Stream }));
        return;
    }
    if let Some(name) = get("stream").as_string() {
        let path = get("path").as_string().unwrap_or_default();
        let size = get("size").as_f64().unwrap_or(0.0);
        open_stream(Rc::downgrade(&state), name, path, size);
        return;
    }
    // A batch of writes is answered with `ids`, anything else with `id`.
    let ids: Vec<u32> = match get("ids").dyn_into::<js_sys::Array>() {
        Ok(ids) => ids.iter().filter_map(|v| v.as_f64()).map(|v| v as u32).collect(),
        Err(_) => get("id").as_f64().map(|v| v as u32).into_iter().collect(),
    };
    let ok = get("ok").as_bool().unwrap_or(false);
    let error = get("error").as_string().unwrap_or_default();
    let disk_full = get("disk_full").as_bool().unwrap_or(false);
    let buffer = get("data").dyn_into::<js_sys::ArrayBuffer>().ok();
    let (answered, sink) = {
        let mut s = state.borrow_mut();
        if let Some(buffer) = buffer {
            if buffer.byte_length() == WRITE_BATCH_BYTES && s.pool.len() < WRITE_POOL {
                s.pool.push(buffer);
            }
        }
        let answered: Vec<Pending> = ids.iter().filter_map(|id| s.pending.remove(id)).collect();
        (answered, s.sink.clone())
    };
    for pending in answered {
        let result = if ok { Ok(()) } else { Err(WebError::Browser(error.clone())) };
        report(&sink, pending, result, disk_full);
    }
}

/// The writer asked for a streamed download of `name` (a root in hex): opens it and hands
/// the writer the port that feeds it.
fn open_stream(state: Weak<RefCell<State>>, name: String, path: String, size: f64) {
    wasm_bindgen_futures::spawn_local(async move {
        let result = start_stream_download(&path, size).await;
        let Some(state) = state.upgrade() else { return };
        match result {
            Ok(port) => {
                let s = state.borrow();
                let msg = js_sys::Object::new();
                let _ = js_sys::Reflect::set(&msg, &"op".into(), &"port".into());
                let _ = js_sys::Reflect::set(&msg, &"name".into(), &name.into());
                let _ = js_sys::Reflect::set(&msg, &"port".into(), &port);
                let _ = s.worker.post_message_with_transfer(&msg, &js_sys::Array::of1(&port));
            }
            Err(e) => {
                let Ok(root) = name.parse::<Root>() else { return };
                let sink = state.borrow().sink.clone();
                let failure = WriteFailure::StreamNotStarted(js_err(&e));
                sink(Input::StoreFailed { root, failure });
            }
        }
    });
}
