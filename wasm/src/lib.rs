//! Weft in the browser: a thin driver that owns the WebSocket, the WebRTC connections,
//! IndexedDB and the timers, and feeds [`weft_core`]'s state machines. No protocol logic
//! lives here.
//!
//! # JavaScript API
//!
//! ```js
//! import init, { WeftSession, createInvite, protocolVersion } from "./pkg/weft_wasm.js";
//! await init();
//!
//! // A new network: a 43-character invite; put it in the link you share, e.g. `#invite=…`.
//! const invite = createInvite();
//!
//! // Join by invite, or by network name + passphrase (Argon2id: a second or two).
//! const session = await WeftSession.join({
//!   invite,                      // or: network: "team", passphrase: "correct horse …"
//!   name: "Alice",               // display name; default "Browser <4 hex of own key>"
//!   server: "wss://host/ws",     // default: /ws on the page's own origin (a page on
//!                                // another origin must be let in: weft-signal
//!                                // --allowed-origin, when the server restricts origins);
//!                                // or several, comma-separated (a cluster's processes):
//!                                // after a lost connection the next is tried
//!   iceServers: [...],           // RTCConfiguration.iceServers; default: the STUN/TURN
//!                                // servers the signaling server hands out (its own, with
//!                                // short-lived credentials); [] for host candidates only
//!   iceTransportPolicy: "all",   // or "relay": only through a TURN server
//!   onEvent: (ev) => {},         // optional: also receives the events during join
//!   debug: false,                // log negotiation and ICE steps with console.debug
//!   downloads: "auto",           // or "stream": save downloads straight into the browser's
//!                                // downloads folder (see "Files"), even where OPFS works
//! });                            // resolves once joined: session.ownId and session.peerIds()
//!                                // are set. Rejects with a plain message: bad options (bad
//!                                // invite, empty passphrase…), or "cannot join: …" when the
//!                                // server cannot be reached (3 attempts: at most about 35 s
//!                                // for a server that never answers, a few seconds for one
//!                                // that refuses connections), refuses us (room or server
//!                                // full) or speaks another protocol version; the session is
//!                                // then closed.
//! session.onEvent((ev) => console.log(ev));   // replaces the listener
//! // Every event's shape is declared in weft_wasm.d.ts (`JsEvent` = `SessionEvent |
//! // FileEvent`, discriminated by `type`), generated from the Rust types in events.rs.
//! // ev.type: "status"      { status: "deriving_key" | "connecting" | "joined" | "reconnecting" | "closed", detail? }
//! //          "joined"      { peerId, peers }   (again after each reconnect: the full list)
//! //          "peer_joined" { peerId }
//! //          "peer_left"   { peerId }   (a peer whose encrypted session still works, e.g.
//! //                        while the server restarts, stays in peers() until its
//! //                        connection closes or it is back under a new id)
//! //          "error"       { code, message }   (the server refused something)
//! //          "passphrase_failures" { peerId, failures, total, retryInMs }   (a passphrase
//! //                        network: a member's passphrase check failed again, a wrong
//! //                        passphrase or someone guessing it; show "N failed passphrase
//! //                        attempts from …")
//! //          "peer"        { peerId, state, reason?, name?, fingerprint?, shortCode?, trust?, looksLike?, rttMs?,
//! //                          relayTransport?, ipv4?, ipv6? }
//! //                        whenever any of it changes. state: "connecting" | "handshaking" |
//! //                        "direct" | "relayed" | "failed" (reason says why, in plain words);
//! //                        relayTransport: "udp" | "tcp" | "tls", how we reach the relay of
//! //                        a relayed session (absent when only the peer's end is relayed);
//! //                        trust: "new" | "known" | "verified" | "changed" (changed: the name
//! //                        was pinned to another key before: warn loudly); looksLike: another
//! //                        pinned name this one looks like, under another key (warn loudly)
//! //          "message"     { peerId, name, text, trust?, looksLike?, at }   (at: ms since the
//! //                        epoch; trust and looksLike as in "peer", when it came)
//! session.status;              // current status (as in "status" events)
//! session.ownId;               // our peer id on the signaling server, once joined
//! session.room;                // the room id given to the server (derived; reveals no secret)
//! session.identity;            // { fingerprint, shortCode } of our long-term key
//! session.name;                // our display name
//! session.invite;              // the invite of an invite network, else undefined
//! session.network;             // the name of a passphrase network, else undefined
//! session.peers();             // [{ peerId, state, … }] as in "peer" events
//! session.peerIds();           // the other members' ids, sorted
//! session.sendMessage(text, peerId?);  // → number of peers sent to (all established ones
//!                                      //   without peerId); throws if peerId is not connected
//! session.verifyPeer(peerId);  // the user compared short codes: pin the key as verified
//! session.acceptNewKey(peerId);// the user accepts a changed key
//! session.leave();             // close everything (connections, socket, timer, the
//!                              // download writer worker) and stop reconnecting
//!
//! qrSvg(text);                 // an SVG QR code of `text` (an invite link), for innerHTML
//! ```
//!
//! ## Files
//!
//! Every file event and item names a file by its `key` (64 hex digits), the name it was
//! offered under: the same from the `offer` (or the items of `transfers().outgoing`) to
//! `file_complete` or `delivered`, and what the methods below take (they take its `root`
//! too). Beside it, `root` is the file's BLAKE3 hash (what `b3sum` prints) once known.
//! `sendFiles` offers at once and hashes while chunks flow (`core/TRANSFER.md`, "Offer at
//! once"): such a file's `key` is a stream key, one per receiver, and its `root` is `null`
//! until the sender has hashed it (sender) or the receiver has verified it (receiver);
//! `file_complete` and `delivered` always carry it. A file shared with `shareFiles` first
//! is offered by its root: `key` and `root` are equal. The receiver writes verified 64 KiB
//! chunks straight into the origin-private file system (OPFS, through a worker with a sync
//! access handle), so a file never sits in memory, and a download resumes after a reload
//! from the last verified chunk.
//!
//! Browsers without OPFS sync access handles (or `downloads: "stream"` at join) get a
//! streamed download instead: each file is saved by the browser into its downloads folder
//! as it arrives, through the service worker `sw.js`. It and the download writer worker
//! (`download-writer.js`) live beside `weft_wasm.js` and are found from the module's own
//! URL, wherever the page is.
//! Chunks are still verified before they are written, and nothing unverified reaches the
//! file. Such a download cannot resume after a reload, is not kept in the page
//! (`downloadedFile`, `saveDownload`, `saveAllTo` and `hashDownloaded` say so) and is not
//! served to other peers. A folder arrives as separate files named after their last path
//! part; the browser may ask once whether the page may download several files.
//!
//! ```js
//! // entries: a File, a FileList, or an array of File | { file: File, path: "dir/a.txt" }
//! // (path defaults to file.webkitRelativePath || file.name). to: a peer id, an array of
//! // them, or undefined for every connected peer. Resolves once offers are sent.
//! await session.sendFiles(entries, to);     // → [{ peerId, offerId }]
//! await session.shareFiles(entries);        // hash without offering → [{ root, path, size }]
//!                                           // (nobody may fetch them before an offer)
//! session.acceptOffer(peerId, offerId);     // throws if there is no such offer
//! session.declineOffer(peerId, offerId);
//! session.cancelTransfer(peerId, offerId, reason?, outgoing?);  // either side; the other is told
//! session.pauseDownload(key, paused);
//! session.transfers();  // { downloads: [{ key, root, paths, size, doneBytes, sources, offers,
//!                       //   state, speedBps, etaS }], outgoing: [{ peerId, offerId, items, state,
//!                       //   sentBytes, totalBytes }], incoming: [{ peerId, offerId, items,
//!                       //   trust?, looksLike? }] }
//!                       // state: "active" | "paused" | "complete" | "failed";
//!                       // outgoing state: "pending" | "accepted" | "declined" | "cancelled" | "delivered"
//! await session.downloadedFile(key);       // → File (disk-backed) of a complete download,
//!                                          //   named after its path's last part
//! await session.saveDownload(key, path?);  // the browser's download of it (an <a download>)
//! await session.saveAllTo();               // pick a folder (File System Access API) and copy
//!                                          // every complete download there under its path
//! await session.hashDownloaded(key);       // plain BLAKE3 of the stored bytes (hex)
//! await session.forgetDownload(key);       // delete the stored file and its record
//! session.setUploadLimit(bytesPerSecond);  // serve files at most this fast, over all
//!                                          // peers (null: no limit, the default)
//! session.debugMutePeer(peerId);           // test hook: drop what that peer's connection
//!                                          // delivers (a dead path); the session notices
//!                                          // the silence (15 s) and reconnects
//! session.debugCorruptChunk(index, key?);  // test hook: flip a byte the next time this
//!                                          // node serves chunk `index` (of that file, or any)
//! // Downloads saved before a reload continue by themselves after the next join, as soon
//! // as a connected peer holds the file (it is asked); no offer or event is needed.
//! // Events (ev.type):
//! //  "hashing"            { path, doneBytes, size }
//! //  "offer"              { peerId, name, offerId, items: [{ path, size, key, root }], totalSize,
//! //                       trust?, looksLike? }   (the sender's trust and look-alike as in
//! //                       "peer" when the offer came: show them beside it, as beside a message)
//! //  "offer_answered"     { peerId, offerId, accepted }
//! //  "resumed"            { peerId, offerId, keys }   (an offer of files we were fetching:
//! //                       resumed without asking)
//! //  "progress"           { key, root, paths, size, doneBytes, speedBps, etaS, sources, offers:
//! //                       [{ peerId, offerId }], state } (≤ 4/s per file)
//! //  "upload"             { peerId, key, root, sentBytes, size }  (≤ 4/s per peer and file)
//! //  "file_complete"      { key, root, paths, size, stored } (stored: "browser" (OPFS) or
//! //                       "downloads" (streamed into the browser's downloads folder))
//! //  "file_failed"        { key, root, reason }     (reason in plain words: disk full, the
//! //                       download writer worker or service worker could not load, …)
//! //  "delivered"          { peerId, key, root }  (the receiver verified and stored our file;
//! //                       key: the one that peer was offered)
//! //  "transfer_cancelled" { peerId, offerId, reason, byPeer, outgoing } (outgoing: it was our offer)
//! //  "chunk_rejected"     { key, root, index, peerId } (failed verification; fetched again)
//! //  "source_added"       { key, root, peerId }
//! //  "source_dropped"     { key, root, peerId, reason }
//! ```
//!
//! The long-term identity lives in IndexedDB (database `weft`, store `identity`, key
//! `default`) and the trust store per network in store `trust` (key: room id). Without
//! IndexedDB (some private modes) the session still works with a key that lasts one visit.
//! In each network it starts afresh the page shows a key of that network's own, derived
//! from the stored one (`TrustStore::own_identity`): members of two networks cannot link it.
#![forbid(unsafe_code)]

mod bench;
mod error;
mod events;
mod files;
mod local_store;
mod qr;
mod rtc;
mod session;

use std::cell::RefCell;
use std::rc::Rc;

use serde::Deserialize;
use wasm_bindgen::prelude::*;
use weft_core::identity::IdentityKeyPair;
use weft_core::network::{Network, PassphraseParams};
use weft_core::node::NodeError;
use weft_core::signal::{self, PeerId, RoomId};
use weft_core::transfer::{CancelReason, DownloadState, Root};
use weft_core::trust::TrustStore;

use crate::error::WebError;
use crate::events::{FileEvent, JsEvent, Names, SessionEvent, Status, TransfersJs};
use crate::local_store::LocalStore;
use crate::session::{Inner, SessionConfig, emit, emit_to, now, rng, run, window};

/// The signaling protocol version this build speaks.
#[wasm_bindgen(js_name = protocolVersion)]
pub fn protocol_version() -> u32 {
    signal::PROTOCOL_VERSION
}

/// Whether `room` is acceptable as a room id.
#[wasm_bindgen(js_name = isValidRoomId)]
pub fn is_valid_room_id(room: &str) -> bool {
    RoomId::new(room).is_ok()
}

/// A new network's invite: 43 characters of base64url holding a random 256-bit secret.
/// Anyone with it can join, so share it only with the people you mean.
#[wasm_bindgen(js_name = createInvite)]
pub fn create_invite() -> String {
    Network::generate(&mut rng()).invite().map(|s| s.to_string()).unwrap_or_default()
}

/// `WeftSession.join`'s options (see the crate docs).
#[derive(Deserialize, tsify::Tsify)]
#[serde(rename_all = "camelCase")]
struct JoinOptions {
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    passphrase: Option<String>,
    #[serde(default)]
    invite: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    ice_servers: Option<Vec<JsIceServer>>,
    #[serde(default)]
    ice_transport_policy: Option<String>,
    /// Read from the object itself (`JSON.stringify` leaves functions out): here only to
    /// declare it, and to accept any value as before (one that is not a function is
    /// ignored).
    #[serde(default)]
    #[tsify(type = "(ev: JsEvent) => void", optional)]
    #[allow(dead_code)]
    on_event: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    debug: bool,
    #[serde(default)]
    downloads: Option<String>,
}

/// A member of a Weft network in this page. See the crate docs for the API.
#[wasm_bindgen]
pub struct WeftSession {
    inner: Rc<RefCell<Inner>>,
}

impl std::fmt::Debug for WeftSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.inner.borrow();
        f.debug_struct("WeftSession").field("status", &i.status).finish_non_exhaustive()
    }
}

/// One entry of the `iceServers` option, as `RTCIceServer` has it (other fields, such as
/// `credentialType`, are ignored).
#[derive(Deserialize, tsify::Tsify)]
struct JsIceServer {
    /// One URL or a list. (Read by hand, not as an untagged enum: serde's derive of one
    /// buffers the value in its `Content` first, code the module need not carry.)
    #[serde(deserialize_with = "one_or_many")]
    #[tsify(type = "string | string[]")]
    urls: Vec<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    credential: Option<String>,
}

/// A string as a list of one, or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct OneOrMany;
    impl<'de> serde::de::Visitor<'de> for OneOrMany {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a URL or a list of URLs")
        }
        fn visit_str<E: serde::de::Error>(self, url: &str) -> Result<Self::Value, E> {
            Ok(vec![url.to_string()])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
        }
    }
    d.deserialize_any(OneOrMany)
}

impl From<JsIceServer> for signal::IceServer {
    fn from(s: JsIceServer) -> Self {
        Self { urls: s.urls, username: s.username, credential: s.credential }
    }
}

fn default_server() -> Result<String, JsError> {
    let location = window()?.location();
    let protocol = location.protocol().map_err(|_| JsError::new("cannot read location"))?;
    let host = location.host().map_err(|_| JsError::new("cannot read location"))?;
    let scheme = if protocol == "https:" { "wss" } else { "ws" };
    Ok(format!("{scheme}://{host}/ws"))
}

/// Lets the browser run its event loop (and paint) before a long computation.
async fn yield_to_browser(ms: i32) {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        if let Some(win) = web_sys::window() {
            let _ = win.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, ms);
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}

#[wasm_bindgen]
impl WeftSession {
    /// Joins a network (see the crate docs for `options`): derives its secret, loads or
    /// creates our identity, connects to the signaling server and to every member.
    pub async fn join(
        #[wasm_bindgen(unchecked_param_type = "JoinOptions")] options: JsValue,
    ) -> Result<WeftSession, JsError> {
        // Through JSON, as the events go out (`events::to_js`): serde_json is in the
        // module anyway.
        let json = js_sys::JSON::stringify(&options).ok().and_then(|s| s.as_string());
        let opts: JoinOptions = serde_json::from_str(json.as_deref().unwrap_or("null"))
            .map_err(|e| JsError::new(&format!("bad join options: {e}")))?;
        let listener = js_sys::Reflect::get(&options, &"onEvent".into())
            .ok()
            .and_then(|f| f.dyn_into::<js_sys::Function>().ok());
        rtc::set_debug(opts.debug);
        let relay_only = match opts.ice_transport_policy.as_deref() {
            None | Some("all") => false,
            Some("relay") => true,
            Some(other) => {
                return Err(JsError::new(&format!(
                    "iceTransportPolicy must be \"all\" or \"relay\", not {other:?}"
                )));
            }
        };
        let stream_downloads = match opts.downloads.as_deref() {
            None | Some("auto") => false,
            Some("stream") => true,
            Some(other) => {
                return Err(JsError::new(&format!(
                    "downloads must be \"auto\" or \"stream\", not {other:?}"
                )));
            }
        };
        let url = match opts.server {
            Some(url) => url,
            None => default_server()?,
        };
        let network = match (opts.invite, opts.passphrase) {
            (Some(invite), _) => {
                Network::from_invite(&invite).map_err(|e| JsError::new(&e.to_string()))?
            }
            (None, Some(passphrase)) => {
                let name = opts.network.unwrap_or_default();
                if let Some(listener) = &listener {
                    let ev = JsEvent::Session(SessionEvent::Status {
                        status: Status::DerivingKey,
                        detail: None,
                    });
                    emit_to(listener, vec![ev]);
                }
                yield_to_browser(30).await;
                Network::from_passphrase(&name, &passphrase, &PassphraseParams::INTERACTIVE)
                    .map_err(|e| JsError::new(&e.to_string()))?
            }
            (None, None) => {
                return Err(JsError::new(
                    "to join, give an invite, or a network name and its passphrase",
                ));
            }
        };

        let mut rng = rng();
        let store = match LocalStore::open().await {
            Ok(store) => Some(store),
            Err(e) => {
                web_sys::console::warn_1(
                    &format!("weft: no IndexedDB ({e}); this visit's key will not be kept").into(),
                );
                None
            }
        };
        let device = match &store {
            Some(store) => store.load_or_create_identity(&mut rng).await.unwrap_or_else(|e| {
                web_sys::console::warn_1(&format!("weft: cannot keep the identity: {e}").into());
                IdentityKeyPair::generate(&mut rng)
            }),
            None => IdentityKeyPair::generate(&mut rng),
        };
        let mut trust = match &store {
            Some(store) => store.load_trust(network.room_id()).await.unwrap_or_else(|e| {
                web_sys::console::warn_1(&format!("weft: {e}; starting a new one").into());
                TrustStore::new()
            }),
            None => TrustStore::new(),
        };
        // A key of this network's own (the core's rule; see `TrustStore::own_identity`).
        let identity = trust.own_identity(&device, &network);
        let own_name = match opts.name.map(|n| n.trim().to_string()) {
            Some(name) if !name.is_empty() => name,
            _ => {
                let hex = identity.public().fingerprint().to_hex();
                format!("Browser {}", &hex[..4])
            }
        };
        // Saved downloads are partial files in OPFS: they continue on a visit that stores
        // downloads there.
        let saved_downloads = match &store {
            Some(store) if !stream_downloads => store.load_downloads().await.unwrap_or_else(|e| {
                web_sys::console::warn_1(&format!("weft: cannot read saved downloads: {e}").into());
                Vec::new()
            }),
            _ => Vec::new(),
        };
        let inner = session::start(SessionConfig {
            url,
            network,
            identity,
            own_name,
            ice_servers: opts.ice_servers.map(|list| list.into_iter().map(Into::into).collect()),
            relay_only,
            trust,
            store,
            listener,
            stream_downloads,
        });
        let joined = js_sys::Promise::new(&mut |resolve, reject| {
            inner.borrow_mut().join_waiter = Some(session::JoinWaiter { resolve, reject });
        });
        let session = WeftSession { inner };
        session.command(|i| {
            for record in saved_downloads {
                i.node.restore_download(now(), record, true);
            }
            Ok::<(), NodeError>(())
        })?;
        // Settled by the session: joined, or the node gave up (unreachable, refused, wrong
        // version) after its bounded attempts, or the page left first.
        if let Err(reason) = wasm_bindgen_futures::JsFuture::from(joined).await {
            session.inner.borrow_mut().stop();
            let reason = reason.as_string().unwrap_or_else(|| "cannot join".into());
            return Err(JsError::new(&format!("cannot join: {reason}")));
        }
        Ok(session)
    }

    /// Sets the function that receives every event (replacing any earlier one).
    #[wasm_bindgen(js_name = onEvent)]
    pub fn on_event(
        &self,
        #[wasm_bindgen(unchecked_param_type = "(ev: JsEvent) => void")] listener: js_sys::Function,
    ) {
        self.inner.borrow_mut().listener = Some(listener);
    }

    /// `"deriving_key"`, `"connecting"`, `"joined"`, `"reconnecting"` or `"closed"`.
    #[wasm_bindgen(getter)]
    pub fn status(&self) -> String {
        self.inner.borrow().status.as_str().to_string()
    }

    /// Our peer id, once joined.
    #[wasm_bindgen(getter, js_name = ownId)]
    pub fn own_id(&self) -> Option<String> {
        self.inner.borrow().node.own_id().map(PeerId::to_string)
    }

    /// The room id the signaling server knows this network by.
    #[wasm_bindgen(getter)]
    pub fn room(&self) -> String {
        self.inner.borrow().node.room().to_string()
    }

    /// `{ fingerprint, shortCode }` of our long-term identity.
    #[wasm_bindgen(getter)]
    pub fn identity(&self) -> JsValue {
        let fp = self.inner.borrow().identity.public().fingerprint();
        let obj = js_sys::Object::new();
        let _ = js_sys::Reflect::set(&obj, &"fingerprint".into(), &fp.to_hex().into());
        let _ = js_sys::Reflect::set(&obj, &"shortCode".into(), &fp.short_code().into());
        obj.into()
    }

    /// Our display name.
    #[wasm_bindgen(getter)]
    pub fn name(&self) -> String {
        self.inner.borrow().own_name.clone()
    }

    /// The invite of an invite network.
    #[wasm_bindgen(getter)]
    pub fn invite(&self) -> Option<String> {
        self.inner.borrow().network.invite().map(|s| s.to_string())
    }

    /// The name of a passphrase network.
    #[wasm_bindgen(getter)]
    pub fn network(&self) -> Option<String> {
        self.inner.borrow().network.name().map(str::to_string)
    }

    /// Every other member: `{ peerId, state, reason?, name?, fingerprint?, shortCode?,
    /// trust?, rttMs?, ipv4?, ipv6? }`, sorted by peer id.
    #[wasm_bindgen(unchecked_return_type = "PeerInfo[]")]
    pub fn peers(&self) -> Result<JsValue, JsError> {
        let infos = self.inner.borrow().peer_infos();
        events::to_js(&infos).map_err(js_error)
    }

    /// The other members' peer ids, sorted.
    #[wasm_bindgen(js_name = peerIds)]
    pub fn peer_ids(&self) -> Vec<String> {
        self.inner.borrow().node.peers().iter().map(|p| p.peer_id.to_string()).collect()
    }

    /// Sends a chat message to `peer_id`, or to every peer with an established session;
    /// returns how many it went to.
    #[wasm_bindgen(js_name = sendMessage)]
    pub fn send_message(&self, text: &str, peer_id: Option<String>) -> Result<u32, JsError> {
        let to = peer_id.as_deref().map(peer_arg).transpose().map_err(js_error)?;
        let mut sent = 0;
        self.command(|i| {
            sent = i.node.send_message(now(), to.as_ref(), text)?;
            Ok::<(), NodeError>(())
        })?;
        Ok(sent)
    }

    /// The user compared `peer_id`'s short code with the one its owner sees: its key is
    /// pinned as verified.
    #[wasm_bindgen(js_name = verifyPeer)]
    pub fn verify_peer(&self, peer_id: &str) -> Result<(), JsError> {
        let peer = peer_arg(peer_id).map_err(js_error)?;
        self.command(|i| i.node.verify_peer(&peer))
    }

    /// The user accepts `peer_id`'s new key (its name was pinned to another one).
    #[wasm_bindgen(js_name = acceptNewKey)]
    pub fn accept_new_key(&self, peer_id: &str) -> Result<(), JsError> {
        let peer = peer_arg(peer_id).map_err(js_error)?;
        self.command(|i| i.node.accept_new_key(&peer))
    }

    // ---- files (see the crate docs, "Files")

    /// Hashes `entries` and offers them to `to` (a peer id, an array of them, or every
    /// connected peer). Resolves to `[{ peerId, offerId }]`.
    #[wasm_bindgen(js_name = sendFiles)]
    pub fn send_files(&self, entries: JsValue, to: JsValue) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let to = peer_list(&to)?;
            let entries = files::entries(&entries)?;
            if entries.is_empty() {
                return Err(JsError::new("no files to send").into());
            }
            // Fail early, before reading gigabytes, if nobody can receive.
            established(&inner.borrow(), to.as_deref()).map_err(js_error)?;
            // Offered at once; hashed while chunks flow.
            let shared = hash_and_share(&inner, entries, true).await?;
            let list: Vec<_> = shared.into_iter().map(|(root, path, _)| (root, path)).collect();
            let mut offers = Vec::new();
            command(&inner, |i| {
                for peer in established(i, to.as_deref())? {
                    let id = i
                        .node
                        .offer(now(), &peer, &list)
                        .map_err(|error| WebError::OfferTo { peer: peer.to_string(), error })?;
                    offers.push((peer, id));
                }
                Ok::<(), WebError>(())
            })?;
            let array = js_sys::Array::new();
            for (peer, id) in offers {
                let obj = js_sys::Object::new();
                let _ = js_sys::Reflect::set(&obj, &"peerId".into(), &peer.to_string().into());
                let _ = js_sys::Reflect::set(&obj, &"offerId".into(), &(id as f64).into());
                array.push(&obj);
            }
            Ok(array.into())
        })
    }

    /// Hashes `entries` and keeps them ready without offering them: a later `sendFiles` of
    /// the same `File`s offers them by their root at once. Nobody may fetch them before
    /// an offer (knowing a hash is not enough: `core/TRANSFER.md`, "Who may fetch what").
    /// Resolves to `[{ root, path, size }]`.
    #[wasm_bindgen(js_name = shareFiles)]
    pub fn share_files(&self, entries: JsValue) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let entries = files::entries(&entries)?;
            let shared = hash_and_share(&inner, entries, false).await?;
            let array = js_sys::Array::new();
            for (root, path, size) in shared {
                let obj = js_sys::Object::new();
                let _ = js_sys::Reflect::set(&obj, &"root".into(), &root.to_string().into());
                let _ = js_sys::Reflect::set(&obj, &"path".into(), &path.into());
                let _ = js_sys::Reflect::set(&obj, &"size".into(), &(size as f64).into());
                array.push(&obj);
            }
            Ok(array.into())
        })
    }

    /// Accepts an offer: the files start downloading (from every peer that holds them).
    #[wasm_bindgen(js_name = acceptOffer)]
    pub fn accept_offer(&self, peer_id: &str, offer_id: f64) -> Result<(), JsError> {
        let peer = PeerId::new(peer_id).map_err(|e| JsError::new(&e.to_string()))?;
        self.command(|i| i.node.accept(now(), &peer, offer_id as u64))
    }

    /// Declines an offer.
    #[wasm_bindgen(js_name = declineOffer)]
    pub fn decline_offer(&self, peer_id: &str, offer_id: f64) -> Result<(), JsError> {
        let peer = PeerId::new(peer_id).map_err(|e| JsError::new(&e.to_string()))?;
        self.command(|i| i.node.decline(now(), &peer, offer_id as u64))
    }

    /// Cancels an offer we made (`outgoing`) or received; the other side is told and
    /// both clean up. Without `outgoing`, it is our offer unless we received one from
    /// that peer under the same number.
    #[wasm_bindgen(js_name = cancelTransfer)]
    pub fn cancel_transfer(
        &self,
        peer_id: &str,
        offer_id: f64,
        reason: Option<String>,
        outgoing: Option<bool>,
    ) -> Result<(), JsError> {
        let own = self.inner.borrow().own_name.clone();
        let reason = match reason {
            Some(text) => CancelReason::Text(text),
            None => CancelReason::CancelledBy(own),
        };
        let peer = PeerId::new(peer_id).map_err(|e| JsError::new(&e.to_string()))?;
        let id = offer_id as u64;
        self.command(|i| {
            let outgoing = outgoing.unwrap_or_else(|| !i.node.engine().is_incoming(&peer, id));
            i.node.cancel(now(), &peer, id, outgoing, reason)
        })
    }

    /// Pauses or resumes a download.
    #[wasm_bindgen(js_name = pauseDownload)]
    pub fn pause_download(&self, root: &str, paused: bool) -> Result<(), JsError> {
        let root = root_arg(root)?;
        self.command(|i| i.node.set_paused(now(), &root, paused))
    }

    /// `{ downloads, outgoing, incoming }` (see the crate docs).
    #[wasm_bindgen(unchecked_return_type = "TransfersJs")]
    pub fn transfers(&self) -> Result<JsValue, JsError> {
        let mut inner = self.inner.borrow_mut();
        let view = inner.node.transfers(now());
        let t = TransfersJs::new(&view, &Names(&inner.node));
        events::to_js(&t).map_err(js_error)
    }

    /// The stored bytes of a complete download, as a disk-backed `File` named after its
    /// path's last part.
    #[wasm_bindgen(js_name = downloadedFile)]
    pub fn downloaded_file(&self, root: String) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let root = stored_key(&inner, root_arg(&root)?);
            inner.borrow().files.check_kept()?;
            let stored = files::stored_file(&root).await?;
            // Stored under its root; handed out under the last part of its path (the same
            // bytes: a `File` over the stored one, not a copy).
            let name = {
                let i = inner.borrow();
                i.node.engine().progress(&root).and_then(|p| p.paths.first().cloned())
            };
            let Some(name) = name.as_deref().and_then(|p| p.rsplit('/').next()) else {
                return Ok(stored.into());
            };
            let options = web_sys::FilePropertyBag::new();
            options.set_type(&stored.type_());
            options.set_last_modified(stored.last_modified());
            let named = web_sys::File::new_with_blob_sequence_and_options(
                &js_sys::Array::of1(&stored),
                name,
                &options,
            )
            .map_err(|e| JsError::new(&format!("cannot name the file: {e:?}")))?;
            Ok(named.into())
        })
    }

    /// Starts the browser's download of a stored file.
    #[wasm_bindgen(js_name = saveDownload)]
    pub fn save_download(&self, root: String, path: Option<String>) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let root = root_arg(&root)?;
            let path = path
                .or_else(|| {
                    let i = inner.borrow();
                    i.node.engine().progress(&root).and_then(|p| p.paths.first().cloned())
                })
                .unwrap_or_else(|| root.to_string());
            inner.borrow().files.check_kept()?;
            files::save_download(&stored_key(&inner, root), &path).await?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Copies every complete download into a folder the user picks; resolves to the
    /// number of files written.
    #[wasm_bindgen(js_name = saveAllTo)]
    pub fn save_all_to(&self) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let complete: Vec<(Root, Vec<String>)> = {
                let i = inner.borrow();
                i.files.check_kept()?;
                i.node
                    .engine()
                    .downloads()
                    .into_iter()
                    .filter(|d| d.state == DownloadState::Complete)
                    .map(|d| (d.key, d.paths))
                    .collect()
            };
            let n = files::save_all_to(complete).await?;
            Ok(n.into())
        })
    }

    /// Plain BLAKE3 (hex) of a stored download's bytes.
    #[wasm_bindgen(js_name = hashDownloaded)]
    pub fn hash_downloaded(&self, root: String) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let root = stored_key(&inner, root_arg(&root)?);
            inner.borrow().files.check_kept()?;
            let file = files::stored_file(&root).await?;
            let hash = files::hash_blob(&file).await?;
            Ok(hash.into())
        })
    }

    /// Deletes a download's stored file and record.
    #[wasm_bindgen(js_name = forgetDownload)]
    pub fn forget_download(&self, root: &str) -> Result<(), JsError> {
        let root = root_arg(root)?;
        self.command(|i| {
            i.node.forget_download(now(), &root);
            Ok::<(), NodeError>(())
        })
    }

    /// Test hook: drop everything `peer_id`'s current connection delivers, as if the
    /// path died; the session notices the silence and reconnects.
    #[wasm_bindgen(js_name = debugMutePeer)]
    pub fn debug_mute_peer(&self, peer_id: &str) -> Result<(), JsError> {
        let peer = peer_arg(peer_id).map_err(js_error)?;
        if self.inner.borrow_mut().debug_mute(&peer) {
            Ok(())
        } else {
            Err(js_error(NodeError::NoSuchPeer(peer_id.to_string())))
        }
    }

    /// Limits how fast this node serves files, in bytes per second over all peers
    /// (`null`, `0` or nothing: no limit), so seeding does not fill a slow uplink.
    #[wasm_bindgen(js_name = setUploadLimit)]
    pub fn set_upload_limit(&self, bytes_per_second: Option<f64>) {
        self.inner.borrow_mut().node.set_upload_limit(bytes_per_second);
    }

    /// Test hook: the next time this node serves chunk `index` (of `root`, or of any
    /// file), one byte of it is flipped.
    #[wasm_bindgen(js_name = debugCorruptChunk)]
    pub fn debug_corrupt_chunk(&self, index: u32, root: Option<String>) -> Result<(), JsError> {
        let root = root.map(|r| root_arg(&r)).transpose()?;
        self.inner.borrow_mut().node.debug_corrupt_chunk(root, index);
        Ok(())
    }

    /// Leaves the network: closes every connection and stops reconnecting.
    pub fn leave(&self) {
        let mut out = Vec::new();
        {
            let mut i = self.inner.borrow_mut();
            i.leave(&mut out);
            i.set_status(Status::Closed, Some("left".into()), &mut out);
        }
        emit(&self.inner, out);
    }
}

impl WeftSession {
    /// Runs `f` on the session, then does what the node asks and tells the page.
    fn command<E: std::fmt::Display>(
        &self,
        f: impl FnOnce(&mut Inner) -> Result<(), E>,
    ) -> Result<(), JsError> {
        command(&self.inner, f)
    }
}

/// Runs `f` on the session, then does what the node asks and tells the page.
fn command<E: std::fmt::Display>(
    inner: &Rc<RefCell<Inner>>,
    f: impl FnOnce(&mut Inner) -> Result<(), E>,
) -> Result<(), JsError> {
    let mut out = Vec::new();
    let result = {
        let mut i = inner.borrow_mut();
        let r = f(&mut i);
        i.after_command(&mut out);
        r
    };
    emit(inner, out);
    // Inputs that came while the page's listener ran.
    run(inner);
    result.map_err(js_error)
}

fn js_error(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// Where the download `root` (its hash, or the stream key it was offered under) is
/// stored: under its stream key if it was offered before it was hashed.
fn stored_key(inner: &Rc<RefCell<Inner>>, root: Root) -> Root {
    inner.borrow().node.engine().progress(&root).map_or(root, |p| p.key)
}

/// A file's hash from JavaScript (64 hex digits); the error names what was passed.
fn root_arg(s: &str) -> Result<Root, WebError> {
    s.parse().map_err(|error| WebError::BadRoot { given: s.to_string(), error })
}

/// A peer id from JavaScript; one that cannot be is no peer of ours.
fn peer_arg(s: &str) -> Result<PeerId, NodeError> {
    PeerId::new(s).map_err(|_| NodeError::NoSuchPeer(s.to_string()))
}

/// Peers with an established session: those named, or all of them.
fn established(i: &Inner, to: Option<&[String]>) -> Result<Vec<PeerId>, NodeError> {
    let connected = i.node.established_peers();
    let Some(ids) = to else {
        return if connected.is_empty() { Err(NodeError::NobodyConnected) } else { Ok(connected) };
    };
    ids.iter()
        .map(|id| {
            let peer = peer_arg(id)?;
            if connected.contains(&peer) {
                Ok(peer)
            } else if i.node.peer(&peer).is_some() {
                Err(NodeError::NotConnected(peer))
            } else {
                Err(NodeError::NoSuchPeer(id.clone()))
            }
        })
        .collect()
}

/// Hashes every entry (emitting `hashing` events) and shares it; returns (root, path,
/// size) of each. `at_once`: shares each before it is hashed, hashing it in the
/// background (`files::send`); the key returned is then its local key.
async fn hash_and_share(
    inner: &Rc<RefCell<Inner>>,
    entries: Vec<files::Entry>,
    at_once: bool,
) -> Result<Vec<(Root, String, u64)>, WebError> {
    use weft_core::transfer::wire::{Unsendable, check_send_path};
    let mut shared = Vec::new();
    let mut skipped = 0;
    for entry in entries {
        match check_send_path(&entry.path) {
            Ok(()) => {}
            Err(Unsendable::Skip(e)) => {
                skipped += 1;
                let ev = FileEvent::Skipped { path: entry.path.clone(), reason: e.to_string() };
                emit(inner, vec![JsEvent::File(ev)]);
                continue;
            }
            Err(Unsendable::Refuse(e)) => return Err(WebError::BadPath(e)),
        }
        let size = entry.file.size();
        // The very same `File` shared before (say by `shareFiles`, then `sendFiles`): a
        // `File` is a snapshot, so its root has not changed.
        let known = {
            let i = inner.borrow();
            i.files.known_blob(&entry.file, |root| i.node.engine().shared_size(root))
        };
        if let Some(root) = known {
            let ev = FileEvent::Hashing { path: entry.path.clone(), done_bytes: size, size };
            emit(inner, vec![JsEvent::File(ev)]);
            shared.push((root, entry.path, size as u64));
            continue;
        }
        if at_once {
            let path = entry.path.clone();
            shared.push((files::send::share_at_once(inner, entry), path, size as u64));
            continue;
        }
        let mut last_event = now();
        let digest = files::hash_entry(&entry, |done, _| {
            if now().saturating_sub(last_event) >= weft_core::node::PROGRESS_EVERY || done >= size {
                last_event = now();
                let ev = FileEvent::Hashing { path: entry.path.clone(), done_bytes: done, size };
                emit(inner, vec![JsEvent::File(ev)]);
            }
            true
        })
        .await?;
        // Never stopped: the closure always goes on.
        let Some(digest) = digest else { continue };
        {
            let mut i = inner.borrow_mut();
            i.node.share(digest.root, digest.size, digest.cvs)?;
            i.files.add_blob(digest.root, entry.file.clone());
        }
        shared.push((digest.root, entry.path, digest.size));
    }
    if shared.is_empty() && skipped > 0 {
        return Err(WebError::NothingSendable);
    }
    Ok(shared)
}

/// `undefined` → every peer; a string → that peer; an array of strings → those.
fn peer_list(to: &JsValue) -> Result<Option<Vec<String>>, JsError> {
    if to.is_undefined() || to.is_null() {
        return Ok(None);
    }
    if let Some(id) = to.as_string() {
        return Ok(Some(vec![id]));
    }
    if let Some(array) = to.dyn_ref::<js_sys::Array>() {
        return array
            .iter()
            .map(|v| v.as_string().ok_or_else(|| JsError::new("peer ids must be strings")))
            .collect::<Result<Vec<_>, _>>()
            .map(Some);
    }
    Err(JsError::new("`to` must be a peer id, an array of them, or undefined"))
}

impl Drop for WeftSession {
    fn drop(&mut self) {
        // JS called free(): stop timers and close everything so nothing calls into freed
        // closures.
        self.inner.borrow_mut().stop();
    }
}
