//! The session: the browser's driver around the core's [`Node`].
//!
//! The node decides everything (whom to connect, when to rebuild, trust, what goes on the
//! wire, file transfer); this only does the browser's I/O: one signaling `WebSocket`, one
//! [`RtcPeer`] per connection the node asks for, IndexedDB, the file I/O of [`FilesIo`],
//! one timer, and the page's events.
//!
//! Every callback (socket, connections, timer, disk) pushes an [`Input`] onto one queue
//! and calls [`run`], which feeds the queue to the node and acts on its outputs until
//! both are empty, then re-arms the timer. The page's listener is called only after the
//! session is no longer borrowed, because it may call straight back into it; an input
//! that arrives while the session is busy waits in the queue for the running loop.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::time::Duration;

use wasm_bindgen::prelude::*;
use web_sys::{BinaryType, CloseEvent, MessageEvent, WebSocket};
use weft_core::identity::IdentityKeyPair;
use weft_core::network::Network;
use weft_core::node::{
    Channel, ConnId, ConnectionEvent, DownloadStore, Event, IceState, Input, Node, NodeConfig,
    Output, SignalingEvent,
};
use weft_core::signal::IceServer;
use weft_core::sorted::SortedMap;
use weft_core::trust::TrustStore;

use crate::events::{self, JsEvent, PeerInfo, SessionEvent, Status};
use crate::files::{FilesIo, Sink, Store};
use crate::local_store::LocalStore;
use crate::rtc::{self, IceStatus, RtcEvent, RtcPeer, SendError};

/// The random number generator for the core: the browser's `crypto.getRandomValues`.
pub(crate) type Rng = getrandom::rand_core::UnwrapErr<getrandom::SysRng>;

pub(crate) fn rng() -> Rng {
    getrandom::rand_core::UnwrapErr(getrandom::SysRng)
}

/// A random `u32` from the browser.
pub(crate) fn rand_u32() -> u32 {
    let mut bytes = [0; 4];
    getrandom::fill(&mut bytes).map_or(0, |()| u32::from_le_bytes(bytes))
}

/// Time since the page loaded, the core's clock.
pub(crate) fn now() -> Duration {
    let ms = web_sys::window().and_then(|w| w.performance()).map_or(0.0, |p| p.now());
    Duration::from_secs_f64(ms.max(0.0) / 1000.0)
}

pub(crate) fn window() -> Result<web_sys::Window, JsError> {
    web_sys::window().ok_or_else(|| JsError::new("Weft needs a browser window"))
}

/// The closures attached to one WebSocket; [`Inner::close_socket`] clears the handlers.
struct WsHandlers {
    _open: Closure<dyn FnMut()>,
    _message: Closure<dyn FnMut(MessageEvent)>,
    _close: Closure<dyn FnMut(CloseEvent)>,
}

/// The node's one timer: `setTimeout` id, when it fires, and its callback.
struct Timer {
    id: i32,
    at: Duration,
    _callback: Closure<dyn FnMut()>,
}

/// One WebRTC connection the node asked for.
struct Conn {
    rtc: RtcPeer,
    /// Test hook: drop everything it delivers (a path that went dead).
    muted: Rc<Cell<bool>>,
}

/// Everything a session holds. See the module docs.
pub(crate) struct Inner {
    weak: Weak<RefCell<Inner>>,
    pub(crate) node: Node,
    queue: Rc<RefCell<VecDeque<Input>>>,
    rng: Rng,
    /// The signaling servers' URLs; the node says which one to use.
    servers: Vec<String>,
    pub(crate) status: Status,
    ws: Option<WebSocket>,
    ws_handlers: Option<WsHandlers>,
    pub(crate) listener: Option<js_sys::Function>,
    left: bool,
    timer: Option<Timer>,
    relay_only: bool,
    conns: SortedMap<ConnId, Conn>,
    pub(crate) network: Network,
    pub(crate) identity: IdentityKeyPair,
    pub(crate) own_name: String,
    pub(crate) store: Option<LocalStore>,
    pub(crate) files: FilesIo,
    /// `join()`'s promise: resolved once joined, rejected with the reason if the node
    /// stops (or the page leaves) first.
    pub(crate) join_waiter: Option<JoinWaiter>,
}

/// The resolve and reject functions of `join()`'s promise.
pub(crate) struct JoinWaiter {
    pub resolve: js_sys::Function,
    pub reject: js_sys::Function,
}

impl JoinWaiter {
    fn settle(self, result: Result<(), String>) {
        let _ = match result {
            Ok(()) => self.resolve.call0(&JsValue::UNDEFINED),
            Err(reason) => self.reject.call1(&JsValue::UNDEFINED, &JsValue::from_str(&reason)),
        };
    }
}

/// Attempts `join()` makes before it rejects (see `NodeTiming::first_join_attempts`).
const FIRST_JOIN_ATTEMPTS: u32 = 3;

/// What [`start`] needs.
pub(crate) struct SessionConfig {
    /// The signaling server's URL, or several separated by commas (the processes of one
    /// cluster): the first is used, and after a lost connection the next.
    pub url: String,
    pub network: Network,
    pub identity: IdentityKeyPair,
    pub own_name: String,
    /// The page's own `iceServers`, which win over the server's.
    pub ice_servers: Option<Vec<IceServer>>,
    /// `iceTransportPolicy: "relay"`: only TURN relay candidates.
    pub relay_only: bool,
    pub trust: TrustStore,
    pub store: Option<LocalStore>,
    pub listener: Option<js_sys::Function>,
    /// `downloads: "stream"`: stream downloads even where OPFS works.
    pub stream_downloads: bool,
}

/// Creates the session and connects to the signaling server.
pub(crate) fn start(config: SessionConfig) -> Rc<RefCell<Inner>> {
    let queue: Rc<RefCell<VecDeque<Input>>> = Rc::default();
    let downloads =
        if config.stream_downloads { DownloadStore::Streamed } else { DownloadStore::Kept };
    let mut node_config = NodeConfig::new(
        config.identity.clone(),
        config.network.clone(),
        config.own_name.clone(),
        config.trust,
        downloads,
        u64::from(rand_u32()) << 16,
    );
    node_config.ice_servers = config.ice_servers;
    // `join()` settles within bounded time: three attempts (each at most the connect
    // timeout, with the backoff between them) if the server never lets us in.
    node_config.timing.first_join_attempts = Some(FIRST_JOIN_ATTEMPTS);
    let servers: Vec<String> =
        config.url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect();
    node_config.signaling_servers = servers.len();
    let inner = Rc::new_cyclic(|weak: &Weak<RefCell<Inner>>| {
        let sink = sink(weak.clone(), queue.clone());
        RefCell::new(Inner {
            weak: weak.clone(),
            node: Node::new(node_config),
            queue: queue.clone(),
            rng: rng(),
            servers,
            status: Status::Connecting,
            ws: None,
            ws_handlers: None,
            listener: config.listener,
            left: false,
            timer: None,
            relay_only: config.relay_only,
            conns: SortedMap::new(),
            network: config.network,
            identity: config.identity,
            own_name: config.own_name,
            store: config.store.clone(),
            files: FilesIo::new(sink, config.stream_downloads, config.store),
            join_waiter: None,
        })
    });
    emit(
        &inner,
        vec![JsEvent::Session(SessionEvent::Status { status: Status::Connecting, detail: None })],
    );
    inner.borrow_mut().node.start(now());
    run(&inner);
    inner
}

/// The function that hands an input to the session: queued, then run. A finished read
/// runs a moment later (a microtask, once for all that finish together: one 1 MiB block
/// serves 16 chunks), so that the node gets them all before it is drained and sends
/// their chunks packed (`Node::poll_output`).
fn sink(weak: Weak<RefCell<Inner>>, queue: Rc<RefCell<VecDeque<Input>>>) -> Sink {
    let scheduled = Rc::new(Cell::new(false));
    Rc::new(move |input| {
        let read = matches!(input, Input::ReadDone { .. });
        queue.borrow_mut().push_back(input);
        if read {
            if !scheduled.replace(true) {
                let (weak, scheduled) = (weak.clone(), scheduled.clone());
                wasm_bindgen_futures::spawn_local(async move {
                    scheduled.set(false);
                    if let Some(inner) = weak.upgrade() {
                        run(&inner);
                    }
                });
            }
        } else if let Some(inner) = weak.upgrade() {
            run(&inner);
        }
    })
}

/// Feeds the queued inputs to the node and acts on its outputs until both are empty;
/// re-arms the timer; then tells the page. Does nothing if the session is busy (the
/// running loop picks the inputs up).
pub(crate) fn run(inner: &Rc<RefCell<Inner>>) {
    let mut out = Vec::new();
    {
        let Ok(mut i) = inner.try_borrow_mut() else { return };
        i.drain(&mut out);
    }
    emit(inner, out);
}

/// Calls the listener with each event. Never call with `inner` borrowed.
pub(crate) fn emit(inner: &Rc<RefCell<Inner>>, events: Vec<JsEvent>) {
    if events.is_empty() {
        return;
    }
    let listener = inner.borrow().listener.clone();
    let Some(listener) = listener else { return };
    emit_to(&listener, events);
}

pub(crate) fn emit_to(listener: &js_sys::Function, events: Vec<JsEvent>) {
    for ev in events {
        match crate::events::to_js(&ev) {
            Ok(value) => {
                if let Err(e) = listener.call1(&JsValue::NULL, &value) {
                    web_sys::console::error_2(&"weft: event listener threw".into(), &e);
                }
            }
            Err(e) => web_sys::console::error_1(&format!("weft: {e}").into()),
        }
    }
}

fn set_timeout(callback: &Closure<dyn FnMut()>, ms: i32) -> Result<i32, JsValue> {
    web_sys::window().ok_or("no window")?.set_timeout_with_callback_and_timeout_and_arguments_0(
        callback.as_ref().unchecked_ref(),
        ms,
    )
}

fn ice_state(s: IceStatus) -> IceState {
    match s {
        IceStatus::Checking => IceState::Checking,
        IceStatus::Connected => IceState::Connected,
        IceStatus::Disconnected => IceState::Disconnected,
        IceStatus::Failed => IceState::Failed,
    }
}

impl Inner {
    fn drain(&mut self, out: &mut Vec<JsEvent>) {
        loop {
            if let Some(store) = self.files.take_store_change() {
                let store = match store {
                    Store::Opfs => DownloadStore::Kept,
                    Store::Stream => DownloadStore::Streamed,
                };
                self.node.set_download_store(store);
            }
            while let Some(output) = self.node.poll_output() {
                self.act(output, out);
            }
            let input = self.queue.borrow_mut().pop_front();
            let Some(input) = input else { break };
            // Reads that finished together all go in before the node is drained.
            let mut next = Some(input);
            while let Some(input) = next.take() {
                let read = matches!(input, Input::ReadDone { .. });
                self.node.handle_input(now(), input, &mut self.rng);
                if read {
                    let mut queue = self.queue.borrow_mut();
                    if matches!(queue.front(), Some(Input::ReadDone { .. })) {
                        next = queue.pop_front();
                    }
                }
            }
        }
        self.arm_timer();
    }

    /// Acts on what the node asks for after a command; the caller emits `out`.
    pub(crate) fn after_command(&mut self, out: &mut Vec<JsEvent>) {
        self.drain(out);
    }

    fn act(&mut self, output: Output, out: &mut Vec<JsEvent>) {
        match output {
            Output::SignalingConnect { server } => self.open_socket(server),
            Output::SignalingSend(text) => {
                if let Some(ws) = self.ws.as_ref().filter(|ws| ws.ready_state() == WebSocket::OPEN)
                {
                    if let Err(e) = ws.send_with_str(&text) {
                        web_sys::console::warn_2(&"weft: send failed".into(), &e);
                    }
                }
            }
            Output::SignalingClose => self.close_socket(),
            Output::Connect { conn, polite, ice_servers, .. } => {
                self.connect(conn, polite, &ice_servers);
            }
            Output::Signal { conn, payload } => {
                if let Some(c) = self.conns.get(&conn) {
                    c.rtc.handle_signal(payload);
                }
            }
            Output::Transmit { conn, channel, bytes } => {
                let Some(c) = self.conns.get(&conn) else { return };
                match channel {
                    Channel::Control => match c.rtc.send_control(bytes) {
                        Ok(()) | Err(SendError::Closed) => {}
                        Err(SendError::Congested) => web_sys::console::warn_1(
                            &"weft: control channel congested; dropped".into(),
                        ),
                    },
                    Channel::Data => {
                        c.rtc.send_data(&bytes);
                    }
                }
            }
            Output::Disconnect { conn, .. } => {
                if let Some(c) = self.conns.remove(&conn) {
                    c.rtc.close();
                }
            }
            Output::ReadPath { conn } => self.read_path(conn),
            Output::RestartIce { conn, ice_servers } => {
                if let Some(c) = self.conns.get(&conn) {
                    c.rtc.restart_ice(&ice_servers);
                }
            }
            Output::Read { peer, root, index, offset, len } => {
                self.files.read(peer, root, index, offset, len);
            }
            Output::Write { root, index, offset, data } => {
                let (path, size) = self
                    .node
                    .engine()
                    .progress(&root)
                    .map(|p| (p.paths.first().cloned().unwrap_or_default(), p.size))
                    .unwrap_or_default();
                self.files.write(root, index, offset, data, &path, size);
            }
            Output::Discard { root } => self.files.discard(root),
            Output::FinishFile { root, size, .. } => self.files.finish(root, size),
            Output::SaveRecords(records) => self.files.save_records(records),
            Output::SaveTrust(trust) => self.save_trust(trust),
            Output::Event(event) => self.on_event(event, out),
            // A browser has no TUN device (the node knows: `RoutingConfig::tun` is off).
            // Never asked of a node without a TUN device.
            Output::TunWrite(_)
            | Output::Overlay(_)
            | Output::DnsForward { .. }
            | Output::FastPathSend { .. } => {}
        }
    }

    fn on_event(&mut self, event: Event, out: &mut Vec<JsEvent>) {
        match event {
            Event::Signaling(SignalingEvent::Connecting { .. }) => {}
            Event::Signaling(SignalingEvent::Lost { reason, retry_in }) => {
                let secs = retry_in.as_secs_f64();
                let detail = format!("{reason}; retrying in {secs:.1} s");
                self.set_status(Status::Reconnecting, Some(detail), out);
            }
            Event::Signaling(SignalingEvent::Stopped { reason }) => {
                self.left = true;
                if let Some(waiter) = self.join_waiter.take() {
                    waiter.settle(Err(reason.to_string()));
                }
                self.set_status(Status::Closed, Some(reason.to_string()), out);
            }
            Event::Signaling(SignalingEvent::Left) => {}
            Event::Joined { peer_id, peers } => {
                if let Some(waiter) = self.join_waiter.take() {
                    waiter.settle(Ok(()));
                }
                self.set_status(Status::Joined, None, out);
                out.push(JsEvent::Session(SessionEvent::Joined { peer_id, peers }));
            }
            Event::PeerJoined(peer_id) => {
                out.push(JsEvent::Session(SessionEvent::PeerJoined { peer_id }))
            }
            Event::PeerLeft(peer_id) => {
                out.push(JsEvent::Session(SessionEvent::PeerLeft { peer_id }))
            }
            Event::Peer(info) => {
                out.push(JsEvent::Session(SessionEvent::Peer(PeerInfo::from(&info))))
            }
            Event::PassphraseFailures { peer, failures, total, retry_in } => {
                out.push(JsEvent::Session(SessionEvent::PassphraseFailures {
                    peer_id: peer,
                    failures,
                    total: total as f64,
                    retry_in_ms: retry_in.as_secs_f64() * 1000.0,
                }));
            }
            // The page follows peers through `peer` events.
            Event::PeerConnected(_) | Event::KeyChanged(_) | Event::PeerFailed(_) => {}
            Event::Message { peer_id, name, text, trust, looks_like } => {
                let trust = trust.map(weft_core::trust::Trust::as_str);
                let at = js_sys::Date::now();
                out.push(JsEvent::Session(SessionEvent::Message {
                    peer_id,
                    name,
                    text,
                    trust,
                    looks_like,
                    at,
                }));
            }
            Event::ServerError { code, message } => {
                out.push(JsEvent::Session(SessionEvent::Error { code, message }))
            }
            Event::File(file) => {
                if let weft_core::node::FileEvent::Engine(
                    weft_core::transfer::TransferEvent::ShareFailed { root, reason },
                ) = &file
                {
                    web_sys::console::warn_1(
                        &format!("weft: stopped sharing {root}: {reason}").into(),
                    );
                    self.files.forget_blob(root);
                }
                if let Some(ev) = events::file_event(&file, &events::Names(&self.node)) {
                    out.push(JsEvent::File(ev));
                }
            }
        }
    }

    pub(crate) fn set_status(
        &mut self,
        status: Status,
        detail: Option<String>,
        out: &mut Vec<JsEvent>,
    ) {
        if self.status == status && detail.is_none() {
            return;
        }
        self.status = status;
        out.push(JsEvent::Session(SessionEvent::Status { status, detail }));
    }

    // --- the signaling socket

    fn open_socket(&mut self, server: usize) {
        self.close_socket();
        let url = self.servers.get(server).or(self.servers.first()).cloned().unwrap_or_default();
        let queue = self.queue.clone();
        let weak = self.weak.clone();
        let push = move |input: Input| {
            queue.borrow_mut().push_back(input);
            if let Some(inner) = weak.upgrade() {
                run(&inner);
            }
        };
        let ws = match WebSocket::new(&url) {
            Ok(ws) => ws,
            Err(e) => {
                let reason = format!("cannot open WebSocket: {}", crate::error::js_err(&e));
                self.queue.borrow_mut().push_back(Input::SignalingClosed { reason });
                return;
            }
        };
        ws.set_binary_type(BinaryType::Arraybuffer);
        let push = Rc::new(push);
        let on_open = {
            let push = push.clone();
            Closure::<dyn FnMut()>::new(move || push(Input::SignalingOpened))
        };
        let on_message = {
            let push = push.clone();
            Closure::<dyn FnMut(MessageEvent)>::new(move |ev: MessageEvent| {
                if let Some(text) = ev.data().as_string() {
                    push(Input::SignalingText(text));
                }
            })
        };
        let on_close = Closure::<dyn FnMut(CloseEvent)>::new(move |ev: CloseEvent| {
            let reason = if ev.reason().is_empty() {
                format!("connection lost (code {})", ev.code())
            } else {
                ev.reason()
            };
            push(Input::SignalingClosed { reason });
        });
        ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        self.ws = Some(ws);
        self.ws_handlers =
            Some(WsHandlers { _open: on_open, _message: on_message, _close: on_close });
    }

    fn close_socket(&mut self) {
        if let Some(ws) = self.ws.take() {
            ws.set_onopen(None);
            ws.set_onmessage(None);
            ws.set_onclose(None);
            let _ = ws.close();
        }
        self.ws_handlers = None;
    }

    // --- connections

    fn connect(&mut self, conn: ConnId, polite: bool, ice_servers: &[IceServer]) {
        let muted = Rc::new(Cell::new(false));
        let queue = self.queue.clone();
        let weak = self.weak.clone();
        let dead = muted.clone();
        let sink = move |ev: RtcEvent| {
            let event = match ev {
                RtcEvent::Signal(payload) => ConnectionEvent::LocalSignal(payload),
                RtcEvent::ControlOpen { local_sdp, remote_sdp } => {
                    ConnectionEvent::ControlOpen { local_sdp, remote_sdp }
                }
                RtcEvent::ControlClosed => {
                    ConnectionEvent::Closed { reason: "the control channel closed".into() }
                }
                RtcEvent::Message(_) if dead.get() => return,
                RtcEvent::Message(bytes) => ConnectionEvent::Received(bytes),
                RtcEvent::Ice(status) => ConnectionEvent::Ice(ice_state(status)),
                RtcEvent::RemoteRestarted(offer) => ConnectionEvent::RemoteRestarted(offer),
            };
            queue.borrow_mut().push_back(Input::Connection { conn, event });
            if let Some(inner) = weak.upgrade() {
                run(&inner);
            }
        };
        match RtcPeer::new(ice_servers, self.relay_only, polite, sink) {
            Ok(rtc) => {
                self.conns.insert(conn, Conn { rtc, muted });
            }
            Err(e) => {
                web_sys::console::error_2(&"weft: cannot create RTCPeerConnection".into(), &e);
                let event = ConnectionEvent::Closed { reason: "cannot create a connection".into() };
                self.queue.borrow_mut().push_back(Input::Connection { conn, event });
            }
        }
    }

    /// Reads the selected ICE path of `conn` in the background.
    fn read_path(&self, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else { return };
        let pc = c.rtc.handle();
        let queue = self.queue.clone();
        let weak = self.weak.clone();
        wasm_bindgen_futures::spawn_local(async move {
            let Some(path) = rtc::path_stats(&pc).await else { return };
            let event = ConnectionEvent::Path {
                relayed: path.relayed,
                relay_transport: path.relay_transport,
                rtt: path.rtt,
            };
            queue.borrow_mut().push_back(Input::Connection { conn, event });
            if let Some(inner) = weak.upgrade() {
                run(&inner);
            }
        });
    }

    fn save_trust(&self, trust: TrustStore) {
        let Some(store) = self.store.clone() else { return };
        let room = self.node.room().clone();
        wasm_bindgen_futures::spawn_local(async move {
            if let Err(e) = store.save_trust(&room, &trust).await {
                web_sys::console::warn_1(&format!("weft: cannot save trust store: {e}").into());
            }
        });
    }

    // --- the timer

    /// (Re)arms the one timer at the node's `poll_timeout`. A timer armed no later than
    /// wanted stays: it wakes the node early, harmlessly, and is armed again then. (The
    /// deadline moves later with nearly every packet; re-arming each time cost a
    /// clearTimeout, a setTimeout and a closure per packet.)
    fn arm_timer(&mut self) {
        if self.left && self.conns.is_empty() {
            return;
        }
        let wanted = self.node.poll_timeout();
        match (self.timer.as_ref().map(|t| t.at), wanted) {
            // One whose instant has passed has fired (or is about to): never trust it to
            // wake the node again, whatever its callback managed to record.
            (Some(armed), Some(w)) if armed <= w && armed > now() => return,
            (Some(_), None) | (None, None) => return,
            _ => {}
        }
        self.clear_timer();
        let Some(at) = wanted else { return };
        let ms = i32::try_from(at.saturating_sub(now()).as_millis())
            .unwrap_or(i32::MAX)
            .saturating_add(1);
        let queue = self.queue.clone();
        let weak = self.weak.clone();
        let callback = Closure::<dyn FnMut()>::new(move || {
            let Some(inner) = weak.upgrade() else { return };
            if let Ok(mut i) = inner.try_borrow_mut() {
                // Fired: forget it, so the next arm sets a new one even for the same instant.
                if let Some(t) = i.timer.as_mut() {
                    t.at = Duration::MAX;
                }
            }
            queue.borrow_mut().push_back(Input::Timeout);
            run(&inner);
        });
        match set_timeout(&callback, ms) {
            Ok(id) => self.timer = Some(Timer { id, at, _callback: callback }),
            Err(e) => web_sys::console::error_2(&"weft: cannot set a timer".into(), &e),
        }
    }

    fn clear_timer(&mut self) {
        if let (Some(timer), Some(win)) = (self.timer.take(), web_sys::window()) {
            win.clear_timeout_with_handle(timer.id);
        }
    }

    // --- what the JavaScript API asks for

    /// Whether the page left ([`crate::WeftSession::leave`]).
    pub(crate) fn left(&self) -> bool {
        self.left
    }

    /// Leaves: Close frames to every peer, `leave` to the server, everything closed.
    pub(crate) fn leave(&mut self, out: &mut Vec<JsEvent>) {
        self.node.leave(now());
        self.drain(out);
        self.stop();
    }

    /// Stops the timer, closes the socket and every connection.
    pub(crate) fn stop(&mut self) {
        self.left = true;
        if let Some(waiter) = self.join_waiter.take() {
            waiter.settle(Err("left before joining".into()));
        }
        self.clear_timer();
        self.close_socket();
        for (_, c) in std::mem::take(&mut self.conns) {
            c.rtc.close();
        }
        self.files.stop();
    }

    /// Test hook: drop everything `peer`'s current connection delivers, as if its path
    /// died, until the connection is replaced.
    pub(crate) fn debug_mute(&mut self, peer: &weft_core::signal::PeerId) -> bool {
        let Some(conn) = self.node.connection(peer) else { return false };
        match self.conns.get(&conn) {
            Some(c) => {
                c.muted.set(true);
                true
            }
            None => false,
        }
    }

    pub(crate) fn peer_infos(&self) -> Vec<PeerInfo> {
        self.node.peers().iter().map(PeerInfo::from).collect()
    }
}
