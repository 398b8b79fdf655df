//! Weft in the browser: a thin driver that owns the WebSocket, the timers and the
//! JavaScript callbacks, and feeds [`weft_core`]'s state machines. No protocol logic
//! lives here.
//!
//! # JavaScript API
//!
//! ```js
//! import init, { WeftSession, protocolVersion } from "./pkg/weft_wasm.js";
//! await init();
//! const session = WeftSession.join({ room: "my-room" }); // server: same origin by default
//! session.onEvent((ev) => console.log(ev));
//! // ev.type: "status"      { status: "connecting" | "joined" | "reconnecting" | "closed", detail? }
//! //          "joined"      { peerId, peers }   (again after each reconnect: the full list)
//! //          "peer_joined" { peerId }
//! //          "peer_left"   { peerId }
//! //          "error"       { code, message }   (the server refused something)
//! session.status;   // current status
//! session.ownId;    // our peer id, once joined
//! session.peers();  // the other members
//! session.leave();  // leave and stop reconnecting
//! ```
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;
use web_sys::{BinaryType, CloseEvent, MessageEvent, WebSocket};
use weft_core::signal::{
    self, ClientMessage, ErrorCode, MembershipEvent, PeerId, ReconnectBackoff, RoomId,
    RoomMembership,
};

/// How often the browser pings the server; two unanswered pings mean the connection is dead.
const HEARTBEAT_MS: i32 = 15_000;

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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JoinOptions {
    room: String,
    #[serde(default)]
    server: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Status {
    Connecting,
    Joined,
    Reconnecting,
    Closed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Connecting => "connecting",
            Status::Joined => "joined",
            Status::Reconnecting => "reconnecting",
            Status::Closed => "closed",
        }
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case", rename_all_fields = "camelCase")]
enum JsEvent {
    Status { status: Status, detail: Option<String> },
    Joined { peer_id: PeerId, peers: Vec<PeerId> },
    PeerJoined { peer_id: PeerId },
    PeerLeft { peer_id: PeerId },
    Error { code: ErrorCode, message: String },
}

/// The closures attached to one WebSocket; dropping them detaches nothing by itself, so
/// [`Inner::detach`] clears the handlers first.
struct Handlers {
    _open: Closure<dyn FnMut()>,
    _message: Closure<dyn FnMut(MessageEvent)>,
    _close: Closure<dyn FnMut(CloseEvent)>,
}

struct Inner {
    url: String,
    membership: RoomMembership,
    backoff: ReconnectBackoff,
    status: Status,
    ws: Option<WebSocket>,
    handlers: Option<Handlers>,
    listener: Option<js_sys::Function>,
    left: bool,
    unanswered_pings: u32,
    heartbeat: Option<(i32, Closure<dyn FnMut()>)>,
    retry: Option<(i32, Closure<dyn FnMut()>)>,
}

impl Inner {
    fn send(&self, msg: &ClientMessage) {
        if let Some(ws) = &self.ws {
            if ws.ready_state() == WebSocket::OPEN {
                if let Err(e) = ws.send_with_str(&signal::encode(msg)) {
                    web_sys::console::warn_2(&"weft: send failed".into(), &e);
                }
            }
        }
    }

    /// Stops the heartbeat and any pending reconnect, and closes the socket for good.
    fn stop(&mut self) {
        self.left = true;
        if let Ok(win) = window() {
            if let Some((id, _)) = self.heartbeat.take() {
                win.clear_interval_with_handle(id);
            }
            if let Some((id, _)) = self.retry.take() {
                win.clear_timeout_with_handle(id);
            }
        }
        self.detach();
        self.membership.disconnected();
    }

    fn detach(&mut self) {
        if let Some(ws) = self.ws.take() {
            ws.set_onopen(None);
            ws.set_onmessage(None);
            ws.set_onclose(None);
            let _ = ws.close();
        }
        self.handlers = None;
    }
}

/// A membership in one room of the signaling server. See the crate docs for the API.
#[wasm_bindgen]
pub struct WeftSession {
    inner: Rc<RefCell<Inner>>,
}

fn window() -> Result<web_sys::Window, JsError> {
    web_sys::window().ok_or_else(|| JsError::new("Weft needs a browser window"))
}

fn default_server() -> Result<String, JsError> {
    let location = window()?.location();
    let protocol = location.protocol().map_err(|_| JsError::new("cannot read location"))?;
    let host = location.host().map_err(|_| JsError::new("cannot read location"))?;
    let scheme = if protocol == "https:" { "wss" } else { "ws" };
    Ok(format!("{scheme}://{host}/ws"))
}

fn emit(inner: &Rc<RefCell<Inner>>, events: Vec<JsEvent>) {
    // Never hold the borrow while calling out: the listener may call back into us.
    let listener = inner.borrow().listener.clone();
    let Some(listener) = listener else { return };
    for ev in events {
        match serde_wasm_bindgen::to_value(&ev) {
            Ok(value) => {
                if let Err(e) = listener.call1(&JsValue::NULL, &value) {
                    web_sys::console::error_2(&"weft: event listener threw".into(), &e);
                }
            }
            Err(e) => web_sys::console::error_1(&format!("weft: {e}").into()),
        }
    }
}

fn set_status(inner: &Rc<RefCell<Inner>>, status: Status, detail: Option<String>) {
    {
        let mut i = inner.borrow_mut();
        if i.status == status && detail.is_none() {
            return;
        }
        i.status = status;
    }
    emit(inner, vec![JsEvent::Status { status, detail }]);
}

fn connect(inner: &Rc<RefCell<Inner>>) -> Result<(), JsValue> {
    let url = inner.borrow().url.clone();
    let ws = WebSocket::new(&url)?;
    ws.set_binary_type(BinaryType::Arraybuffer);
    let weak = Rc::downgrade(inner);

    let on_open = {
        let weak = weak.clone();
        Closure::<dyn FnMut()>::new(move || {
            if let Some(inner) = weak.upgrade() {
                let i = inner.borrow();
                i.send(&i.membership.join_message());
            }
        })
    };
    let on_message = {
        let weak = weak.clone();
        Closure::<dyn FnMut(MessageEvent)>::new(move |ev: MessageEvent| {
            if let (Some(inner), Some(text)) = (weak.upgrade(), ev.data().as_string()) {
                on_text(&inner, &text);
            }
        })
    };
    let on_close = Closure::<dyn FnMut(CloseEvent)>::new(move |ev: CloseEvent| {
        if let Some(inner) = weak.upgrade() {
            on_closed(&inner, ev.code(), &ev.reason());
        }
    });
    ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    let mut i = inner.borrow_mut();
    i.ws = Some(ws);
    i.handlers = Some(Handlers { _open: on_open, _message: on_message, _close: on_close });
    i.unanswered_pings = 0;
    Ok(())
}

fn on_text(inner: &Rc<RefCell<Inner>>, text: &str) {
    let result = {
        let mut i = inner.borrow_mut();
        i.unanswered_pings = 0;
        i.membership.handle_text(text)
    };
    let event = match result {
        Ok(ev) => ev,
        Err(e) => {
            web_sys::console::warn_1(
                &format!("weft: ignoring bad message from server: {e}").into(),
            );
            return;
        }
    };
    match event {
        MembershipEvent::Joined { peer_id, peers } => {
            inner.borrow_mut().backoff.reset();
            set_status(inner, Status::Joined, None);
            emit(inner, vec![JsEvent::Joined { peer_id, peers }]);
        }
        MembershipEvent::PeerJoined(peer_id) => emit(inner, vec![JsEvent::PeerJoined { peer_id }]),
        MembershipEvent::PeerLeft(peer_id) => emit(inner, vec![JsEvent::PeerLeft { peer_id }]),
        MembershipEvent::Signal { .. } | MembershipEvent::Pong => {}
        MembershipEvent::Error { code, message } => {
            if code == ErrorCode::UnsupportedVersion {
                // Reconnecting cannot help: only a reload (a new bundle) can.
                inner.borrow_mut().left = true;
            }
            emit(inner, vec![JsEvent::Error { code, message }]);
        }
    }
}

fn on_closed(inner: &Rc<RefCell<Inner>>, code: u16, reason: &str) {
    let (left, delay) = {
        let mut i = inner.borrow_mut();
        i.detach();
        i.membership.disconnected();
        let jitter = js_sys::Math::random();
        (i.left, i.backoff.next_delay_ms(jitter))
    };
    if left {
        let detail = (!reason.is_empty()).then(|| reason.to_string());
        set_status(inner, Status::Closed, detail);
        return;
    }
    let detail = if reason.is_empty() {
        format!("connection lost (code {code}); retrying in {:.1} s", f64::from(delay) / 1000.0)
    } else {
        format!("{reason}; retrying in {:.1} s", f64::from(delay) / 1000.0)
    };
    set_status(inner, Status::Reconnecting, Some(detail));
    schedule_retry(inner, delay);
}

fn schedule_retry(inner: &Rc<RefCell<Inner>>, delay_ms: u32) {
    let weak: Weak<RefCell<Inner>> = Rc::downgrade(inner);
    let retry = Closure::<dyn FnMut()>::new(move || {
        let Some(inner) = weak.upgrade() else { return };
        if inner.borrow().left {
            return;
        }
        if let Err(e) = connect(&inner) {
            web_sys::console::warn_2(&"weft: reconnect failed".into(), &e);
            let delay = inner.borrow_mut().backoff.next_delay_ms(js_sys::Math::random());
            schedule_retry(&inner, delay);
        }
    });
    let Ok(win) = window() else { return };
    let timeout = i32::try_from(delay_ms).unwrap_or(i32::MAX);
    match win.set_timeout_with_callback_and_timeout_and_arguments_0(
        retry.as_ref().unchecked_ref(),
        timeout,
    ) {
        Ok(id) => inner.borrow_mut().retry = Some((id, retry)),
        Err(e) => web_sys::console::error_2(&"weft: cannot schedule reconnect".into(), &e),
    }
}

fn start_heartbeat(inner: &Rc<RefCell<Inner>>) -> Result<(), JsValue> {
    let weak = Rc::downgrade(inner);
    let beat = Closure::<dyn FnMut()>::new(move || {
        let Some(inner) = weak.upgrade() else { return };
        let mut i = inner.borrow_mut();
        let open = i.ws.as_ref().is_some_and(|ws| ws.ready_state() == WebSocket::OPEN);
        if !open {
            return;
        }
        if i.unanswered_pings >= 2 {
            // The server is gone without a close frame: drop the socket and reconnect.
            i.unanswered_pings = 0;
            drop(i);
            on_closed(&inner, 1006, "server stopped answering");
            return;
        }
        i.unanswered_pings += 1;
        i.send(&ClientMessage::Ping);
    });
    let id = window()?.set_interval_with_callback_and_timeout_and_arguments_0(
        beat.as_ref().unchecked_ref(),
        HEARTBEAT_MS,
    )?;
    inner.borrow_mut().heartbeat = Some((id, beat));
    Ok(())
}

impl std::fmt::Debug for WeftSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.inner.borrow();
        f.debug_struct("WeftSession")
            .field("room", i.membership.room())
            .field("status", &i.status)
            .finish_non_exhaustive()
    }
}

#[wasm_bindgen]
impl WeftSession {
    /// Connects to the signaling server and joins `options.room`. `options.server`
    /// defaults to `/ws` on the page's own origin. Progress arrives as events.
    pub fn join(options: JsValue) -> Result<WeftSession, JsError> {
        let options: JoinOptions = serde_wasm_bindgen::from_value(options)
            .map_err(|e| JsError::new(&format!("bad join options: {e}")))?;
        let room = RoomId::new(options.room).map_err(|e| JsError::new(&e.to_string()))?;
        let url = match options.server {
            Some(url) => url,
            None => default_server()?,
        };
        let inner = Rc::new(RefCell::new(Inner {
            url,
            membership: RoomMembership::new(room),
            backoff: ReconnectBackoff::default(),
            status: Status::Connecting,
            ws: None,
            handlers: None,
            listener: None,
            left: false,
            unanswered_pings: 0,
            heartbeat: None,
            retry: None,
        }));
        connect(&inner).map_err(|e| JsError::new(&format!("cannot open WebSocket: {e:?}")))?;
        start_heartbeat(&inner)
            .map_err(|e| JsError::new(&format!("cannot start heartbeat: {e:?}")))?;
        Ok(WeftSession { inner })
    }

    /// Sets the function that receives every event (replacing any earlier one).
    #[wasm_bindgen(js_name = onEvent)]
    pub fn on_event(&self, listener: js_sys::Function) {
        self.inner.borrow_mut().listener = Some(listener);
    }

    /// `"connecting"`, `"joined"`, `"reconnecting"` or `"closed"`.
    #[wasm_bindgen(getter)]
    pub fn status(&self) -> String {
        self.inner.borrow().status.as_str().to_string()
    }

    /// Our peer id, once joined.
    #[wasm_bindgen(getter, js_name = ownId)]
    pub fn own_id(&self) -> Option<String> {
        self.inner.borrow().membership.own_id().map(|p| p.to_string())
    }

    /// The room id.
    #[wasm_bindgen(getter)]
    pub fn room(&self) -> String {
        self.inner.borrow().membership.room().to_string()
    }

    /// The other members of the room, sorted.
    pub fn peers(&self) -> Vec<String> {
        self.inner.borrow().membership.peers().map(|p| p.to_string()).collect()
    }

    /// Leaves the room and stops reconnecting.
    pub fn leave(&self) {
        {
            let mut i = self.inner.borrow_mut();
            i.send(&ClientMessage::Leave);
            i.stop();
        }
        set_status(&self.inner, Status::Closed, Some("left".into()));
    }
}

impl Drop for WeftSession {
    fn drop(&mut self) {
        // JS called free(): stop timers and close the socket so nothing calls into freed
        // closures.
        self.inner.borrow_mut().stop();
    }
}
