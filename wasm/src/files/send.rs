//! Sending a file before it is hashed (`core/TRANSFER.md`, "Offer at once"): the node
//! shares it under a local key at once, so `sendFiles` offers it without waiting, and
//! this hashes it in the background, reporting its CVs to the node as they come (they go
//! to the receiver ahead of the chunks), then its digest.

use std::cell::RefCell;
use std::rc::Rc;

use weft_core::transfer::Root;

use super::reads::{Entry, hash_entry};
use crate::error::WebError;
use crate::events::{FileEvent, JsEvent};
use crate::session::{Inner, emit, now};

/// Shares `entry` before it is hashed and starts hashing it; returns its local key.
pub(crate) fn share_at_once(inner: &Rc<RefCell<Inner>>, entry: Entry) -> Root {
    let size = entry.file.size();
    let local = {
        let mut i = inner.borrow_mut();
        let local = i.node.share_streamed(size as u64);
        i.files.add_blob(local, entry.file.clone());
        local
    };
    let inner = inner.clone();
    wasm_bindgen_futures::spawn_local(async move {
        let mut reported = 0;
        let mut last_event = now();
        let result = hash_entry(&entry, |done, cvs| {
            // Every offer of it was declined or cancelled (or the session left): stop.
            let wanted = {
                let i = inner.borrow();
                !i.left() && i.node.hashing_wanted(&local)
            };
            if !wanted {
                return false;
            }
            let new = &cvs[reported.min(cvs.len())..];
            reported = cvs.len();
            let _ = crate::command(&inner, |i| {
                i.node.file_hashed(now(), &local, new);
                Ok::<(), WebError>(())
            });
            if now().saturating_sub(last_event) >= weft_core::node::PROGRESS_EVERY || done >= size {
                last_event = now();
                let ev = FileEvent::Hashing { path: entry.path.clone(), done_bytes: done, size };
                emit(&inner, vec![JsEvent::File(ev)]);
            }
            true
        })
        .await;
        let done = match result {
            Ok(Some(digest)) => {
                crate::command(&inner, |i| i.node.file_hash_done(now(), &local, digest).map(drop))
            }
            Ok(None) => {
                inner.borrow_mut().files.forget_blob(&local);
                Ok(())
            }
            Err(e) => crate::command(&inner, |i| {
                i.node.file_hash_failed(now(), &local, e.to_string());
                Ok::<(), WebError>(())
            }),
        };
        if let Err(e) = done {
            web_sys::console::warn_1(&e.into());
        }
    });
    local
}
