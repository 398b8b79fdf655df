//! What the browser keeps between visits, in IndexedDB: database `weft`, store `identity`
//! (key `default`: the 32 secret bytes of the long-term identity, as a `Uint8Array`) and
//! store `trust` (key: room id; value: the network's [`TrustStore`] as JSON text).
//!
//! IndexedDB's request/event API is wrapped in promises directly: a request's `onsuccess`
//! and `onerror` are set to the promise's own `resolve` and `reject`, so no Rust closure
//! outlives a call.

use std::rc::Rc;

use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{IdbDatabase, IdbOpenDbRequest, IdbRequest, IdbTransactionMode};
use weft_core::identity::{IDENTITY_SECRET_LEN, IdentityKeyPair};
use weft_core::rand_core::CryptoRng;
use weft_core::signal::RoomId;
use weft_core::trust::TrustStore;

use crate::error::WebError;

const DB_NAME: &str = "weft";
const DB_VERSION: u32 = 2;
const IDENTITY_STORE: &str = "identity";
const IDENTITY_KEY: &str = "default";
const TRUST_STORE: &str = "trust";
/// Resume records of downloads, by root (hex).
const DOWNLOADS_STORE: &str = "downloads";

/// An open `weft` database.
#[derive(Debug, Clone)]
pub(crate) struct LocalStore {
    db: Rc<IdbDatabase>,
}

/// Resolves when `request` succeeds, with its `result`.
async fn request_done(request: &IdbRequest) -> Result<JsValue, JsValue> {
    let promise = js_sys::Promise::new(&mut |resolve, reject| {
        request.set_onsuccess(Some(&resolve));
        request.set_onerror(Some(&reject));
    });
    JsFuture::from(promise).await?;
    request.set_onsuccess(None);
    request.set_onerror(None);
    request.result()
}

/// A failed IndexedDB call: requests reject with the error event, whose target's `error`
/// says why.
fn idb(e: JsValue) -> WebError {
    let from_target = js_sys::Reflect::get(&e, &"target".into())
        .ok()
        .and_then(|t| js_sys::Reflect::get(&t, &"error".into()).ok())
        .and_then(|err| js_sys::Reflect::get(&err, &"message".into()).ok())
        .and_then(|m| m.as_string());
    WebError::Browser(from_target.or_else(|| e.as_string()).unwrap_or_else(|| format!("{e:?}")))
}

impl LocalStore {
    /// Opens (creating or upgrading) the database.
    pub(crate) async fn open() -> Result<Self, WebError> {
        let factory = web_sys::window()
            .ok_or(WebError::NoWindow)?
            .indexed_db()
            .map_err(idb)?
            .ok_or(WebError::NoIndexedDb)?;
        let request: IdbOpenDbRequest = factory.open_with_u32(DB_NAME, DB_VERSION).map_err(idb)?;
        let upgrade = {
            let request = request.clone();
            Closure::<dyn FnMut()>::new(move || {
                let Ok(result) = request.result() else { return };
                let db: IdbDatabase = result.unchecked_into();
                let names = db.object_store_names();
                for store in [IDENTITY_STORE, TRUST_STORE, DOWNLOADS_STORE] {
                    if !names.contains(store) {
                        if let Err(e) = db.create_object_store(store) {
                            web_sys::console::error_2(&"weft: cannot create store".into(), &e);
                        }
                    }
                }
            })
        };
        request.set_onupgradeneeded(Some(upgrade.as_ref().unchecked_ref()));
        let result = request_done(&request).await;
        request.set_onupgradeneeded(None);
        drop(upgrade);
        let db: IdbDatabase = result.map_err(idb)?.unchecked_into();
        Ok(Self { db: Rc::new(db) })
    }

    async fn get(&self, store: &str, key: &str) -> Result<JsValue, WebError> {
        let tx = self.db.transaction_with_str(store).map_err(idb)?;
        let request = tx.object_store(store).and_then(|s| s.get(&key.into())).map_err(idb)?;
        request_done(&request).await.map_err(idb)
    }

    async fn put(&self, store: &str, key: &str, value: &JsValue) -> Result<(), WebError> {
        let tx = self
            .db
            .transaction_with_str_and_mode(store, IdbTransactionMode::Readwrite)
            .map_err(idb)?;
        let done = js_sys::Promise::new(&mut |resolve, reject| {
            tx.set_oncomplete(Some(&resolve));
            tx.set_onerror(Some(&reject));
            tx.set_onabort(Some(&reject));
        });
        tx.object_store(store).and_then(|s| s.put_with_key(value, &key.into())).map_err(idb)?;
        let result = JsFuture::from(done).await;
        tx.set_oncomplete(None);
        tx.set_onerror(None);
        tx.set_onabort(None);
        result.map(|_| ()).map_err(idb)
    }

    /// The stored identity, or a new one (stored before it is returned, so that two tabs
    /// opening at once end up with the same key only if IndexedDB serialises them; a lost
    /// race just means the later tab's key wins on the next visit).
    pub(crate) async fn load_or_create_identity(
        &self,
        rng: &mut impl CryptoRng,
    ) -> Result<IdentityKeyPair, WebError> {
        let value = self.get(IDENTITY_STORE, IDENTITY_KEY).await?;
        if let Some(bytes) = value.dyn_ref::<js_sys::Uint8Array>() {
            if let Ok(secret) = <[u8; IDENTITY_SECRET_LEN]>::try_from(bytes.to_vec().as_slice()) {
                return Ok(IdentityKeyPair::from_secret_bytes(&secret));
            }
            web_sys::console::warn_1(&"weft: stored identity is malformed; replacing it".into());
        }
        let identity = IdentityKeyPair::generate(rng);
        let bytes = js_sys::Uint8Array::from(identity.secret_bytes().as_slice());
        self.put(IDENTITY_STORE, IDENTITY_KEY, &bytes).await?;
        Ok(identity)
    }

    /// The trust store of the network meeting in `room` (empty if none was saved).
    pub(crate) async fn load_trust(&self, room: &RoomId) -> Result<TrustStore, WebError> {
        let value = self.get(TRUST_STORE, room.as_str()).await?;
        match value.as_string() {
            Some(json) => TrustStore::from_json(&json).map_err(WebError::BadTrustStore),
            None => Ok(TrustStore::new()),
        }
    }

    /// Saves the trust store of the network meeting in `room`.
    pub(crate) async fn save_trust(
        &self,
        room: &RoomId,
        trust: &TrustStore,
    ) -> Result<(), WebError> {
        self.put(TRUST_STORE, room.as_str(), &trust.to_json().into()).await
    }

    /// Saves a download's resume record.
    pub(crate) async fn save_download(
        &self,
        record: &weft_core::transfer::DownloadRecord,
    ) -> Result<(), WebError> {
        let json = serde_json::to_string(record).map_err(|e| WebError::BadRecord(e.to_string()))?;
        self.put(DOWNLOADS_STORE, &record.root.to_string(), &json.into()).await
    }

    /// Every saved download record (unreadable ones are skipped with a warning).
    pub(crate) async fn load_downloads(
        &self,
    ) -> Result<Vec<weft_core::transfer::DownloadRecord>, WebError> {
        let tx = self.db.transaction_with_str(DOWNLOADS_STORE).map_err(idb)?;
        let request = tx.object_store(DOWNLOADS_STORE).and_then(|s| s.get_all()).map_err(idb)?;
        let all = request_done(&request).await.map_err(idb)?;
        let mut records = Vec::new();
        for value in js_sys::Array::from(&all).iter() {
            match value.as_string().map(|s| serde_json::from_str(&s)) {
                Some(Ok(record)) => records.push(record),
                _ => {
                    web_sys::console::warn_1(&"weft: skipped an unreadable download record".into())
                }
            }
        }
        Ok(records)
    }

    /// Deletes a download's record.
    pub(crate) async fn delete_download(&self, key: &str) -> Result<(), WebError> {
        let tx = self
            .db
            .transaction_with_str_and_mode(DOWNLOADS_STORE, IdbTransactionMode::Readwrite)
            .map_err(idb)?;
        let request =
            tx.object_store(DOWNLOADS_STORE).and_then(|s| s.delete(&key.into())).map_err(idb)?;
        request_done(&request).await.map(|_| ()).map_err(idb)
    }
}
