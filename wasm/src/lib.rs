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
//!   server: "wss://host/ws",     // default: /ws on the page's own origin
//!   iceServers: [],              // RTCConfiguration.iceServers; default none (LAN only)
//!   iceTransportPolicy: "all",   // or "relay": only through a TURN server in iceServers
//!   onEvent: (ev) => {},         // optional: also receives the events during join
//!   debug: false,                // log negotiation and ICE steps with console.debug
//! });                            // rejects with a plain message (bad invite, empty passphrase…)
//! session.onEvent((ev) => console.log(ev));   // replaces the listener
//! // ev.type: "status"      { status: "deriving_key" | "connecting" | "joined" | "reconnecting" | "closed", detail? }
//! //          "joined"      { peerId, peers }   (again after each reconnect: the full list)
//! //          "peer_joined" { peerId }
//! //          "peer_left"   { peerId }   (a peer whose encrypted session still works, e.g.
//! //                        while the server restarts, stays in peers() until its
//! //                        connection closes or it is back under a new id)
//! //          "error"       { code, message }   (the server refused something)
//! //          "peer"        { peerId, state, reason?, name?, fingerprint?, shortCode?, trust?, rttMs? }
//! //                        whenever any of it changes. state: "connecting" | "handshaking" |
//! //                        "direct" | "relayed" | "failed" (reason says why, in plain words);
//! //                        trust: "new" | "known" | "verified" | "changed" (changed: the name
//! //                        was pinned to another key before: warn loudly)
//! //          "message"     { peerId, name, text, at }   (at: ms since the epoch)
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
//! session.leave();             // close everything and stop reconnecting
//!
//! qrSvg(text);                 // an SVG QR code of `text` (an invite link), for innerHTML
//! ```
//!
//! The long-term identity lives in IndexedDB (database `weft`, store `identity`, key
//! `default`) and the trust store per network in store `trust` (key: room id). Without
//! IndexedDB (some private modes) the session still works with a key that lasts one visit.
#![forbid(unsafe_code)]

mod bench;
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
use weft_core::signal::{self, RoomId};
use weft_core::trust::TrustStore;

use crate::local_store::LocalStore;
use crate::session::{Inner, JsEvent, SessionConfig, Status, emit, emit_to, rng, window};

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

#[derive(Deserialize)]
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
    #[serde(default, with = "serde_wasm_bindgen::preserve")]
    ice_servers: JsValue,
    #[serde(default)]
    ice_transport_policy: Option<String>,
    #[serde(default, with = "serde_wasm_bindgen::preserve")]
    on_event: JsValue,
    #[serde(default)]
    debug: bool,
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
    pub async fn join(options: JsValue) -> Result<WeftSession, JsError> {
        let opts: JoinOptions = serde_wasm_bindgen::from_value(options)
            .map_err(|e| JsError::new(&format!("bad join options: {e}")))?;
        let listener = opts.on_event.dyn_into::<js_sys::Function>().ok();
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
                    let ev = JsEvent::Status { status: Status::DerivingKey, detail: None };
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
        let identity = match &store {
            Some(store) => store.load_or_create_identity(&mut rng).await.unwrap_or_else(|e| {
                web_sys::console::warn_1(&format!("weft: cannot keep the identity: {e}").into());
                IdentityKeyPair::generate(&mut rng)
            }),
            None => IdentityKeyPair::generate(&mut rng),
        };
        let trust = match &store {
            Some(store) => store.load_trust(network.room_id()).await.unwrap_or_else(|e| {
                web_sys::console::warn_1(&format!("weft: {e}; starting a new one").into());
                TrustStore::new()
            }),
            None => TrustStore::new(),
        };
        let own_name = match opts.name.map(|n| n.trim().to_string()) {
            Some(name) if !name.is_empty() => name,
            _ => {
                let hex = identity.public().fingerprint().to_hex();
                format!("Browser {}", &hex[..4])
            }
        };
        let inner = session::start(SessionConfig {
            url,
            network,
            identity,
            own_name,
            ice_servers: opts.ice_servers,
            relay_only,
            trust,
            store,
            listener,
        })?;
        Ok(WeftSession { inner })
    }

    /// Sets the function that receives every event (replacing any earlier one).
    #[wasm_bindgen(js_name = onEvent)]
    pub fn on_event(&self, listener: js_sys::Function) {
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
        self.inner.borrow().own_id()
    }

    /// The room id the signaling server knows this network by.
    #[wasm_bindgen(getter)]
    pub fn room(&self) -> String {
        self.inner.borrow().room()
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
    /// trust?, rttMs? }`, sorted by peer id.
    pub fn peers(&self) -> Result<JsValue, JsError> {
        let infos = self.inner.borrow().peer_infos();
        let serializer = serde_wasm_bindgen::Serializer::json_compatible();
        serde::Serialize::serialize(&infos, &serializer).map_err(|e| JsError::new(&e.to_string()))
    }

    /// The other members' peer ids, sorted.
    #[wasm_bindgen(js_name = peerIds)]
    pub fn peer_ids(&self) -> Vec<String> {
        self.inner.borrow().peer_ids()
    }

    /// Sends a chat message to `peer_id`, or to every peer with an established session;
    /// returns how many it went to.
    #[wasm_bindgen(js_name = sendMessage)]
    pub fn send_message(&self, text: &str, peer_id: Option<String>) -> Result<u32, JsError> {
        let mut out = Vec::new();
        let result = self.inner.borrow_mut().send_message(text, peer_id.as_deref(), &mut out);
        emit(&self.inner, out);
        result.map_err(|e| JsError::new(&e))
    }

    /// The user compared `peer_id`'s short code with the one its owner sees: its key is
    /// pinned as verified.
    #[wasm_bindgen(js_name = verifyPeer)]
    pub fn verify_peer(&self, peer_id: &str) -> Result<(), JsError> {
        let mut out = Vec::new();
        let result = self.inner.borrow_mut().verify_peer(peer_id, &mut out);
        emit(&self.inner, out);
        result.map_err(|e| JsError::new(&e))
    }

    /// The user accepts `peer_id`'s new key (its name was pinned to another one).
    #[wasm_bindgen(js_name = acceptNewKey)]
    pub fn accept_new_key(&self, peer_id: &str) -> Result<(), JsError> {
        let mut out = Vec::new();
        let result = self.inner.borrow_mut().accept_new_key(peer_id, &mut out);
        emit(&self.inner, out);
        result.map_err(|e| JsError::new(&e))
    }

    /// Leaves the network: closes every connection and stops reconnecting.
    pub fn leave(&self) {
        self.inner.borrow_mut().leave();
        session::set_status(&self.inner, Status::Closed, Some("left".into()));
    }
}

impl Drop for WeftSession {
    fn drop(&mut self) {
        // JS called free(): stop timers and close everything so nothing calls into freed
        // closures.
        self.inner.borrow_mut().stop();
    }
}
