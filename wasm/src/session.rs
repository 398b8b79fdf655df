//! The session: one membership of a network's room on the signaling server, and one
//! [`RtcPeer`] + [`PeerLink`] per other member.
//!
//! Everything runs on the page's single thread, driven by browser callbacks (WebSocket,
//! data channels, timers). Each callback borrows the [`Inner`] state, feeds the core, and
//! collects [`JsEvent`]s; the events go to the page's listener only after the borrow ends,
//! because the listener may call straight back into the session.
//!
//! Peer ids come from the signaling server and change when either side reconnects to it
//! (or reloads). A peer that comes back under a new id is a new connection; when its link
//! is established with the same identity as a connection kept from before the server went
//! away, the old connection is dropped.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};
use std::time::Duration;

use serde::Serialize;
use wasm_bindgen::prelude::*;
use web_sys::{BinaryType, CloseEvent, MessageEvent, WebSocket};
use weft_core::identity::{Fingerprint, IdentityKeyPair};
use weft_core::network::Network;
use weft_core::peer::{LinkError, LinkEvent, LinkState, PeerLink, PeerLinkConfig, is_polite};
use weft_core::signal::{
    self, ClientMessage, ErrorCode, MembershipEvent, PeerId, ReconnectBackoff, RoomMembership,
    SignalPayload,
};
use weft_core::trust::{Trust, TrustStore};

use crate::files::Files;
use crate::local_store::LocalStore;
use crate::rtc::{self, IceStatus, RtcEvent, RtcPeer, SendError};

/// How often the browser pings the server; two unanswered pings mean the connection is dead.
const HEARTBEAT_MS: i32 = 15_000;
/// How often the selected ICE path (direct or relayed, RTT) is read from `getStats()`.
const STATS_MS: i32 = 2_000;
/// Fresh connections made for one peer after its control channel closed, before giving up
/// until it rejoins.
const MAX_RECONNECTS: u32 = 5;

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

/// The signaling connection's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    DerivingKey,
    Connecting,
    Joined,
    Reconnecting,
    Closed,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::DerivingKey => "deriving_key",
            Status::Connecting => "connecting",
            Status::Joined => "joined",
            Status::Reconnecting => "reconnecting",
            Status::Closed => "closed",
        }
    }
}

/// A peer's connection as the page sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum PeerState {
    Connecting,
    Handshaking,
    Direct,
    Relayed,
    Failed,
}

/// The `peer` event's body and an element of `session.peers()`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PeerInfo {
    pub peer_id: PeerId,
    pub state: PeerState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub short_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

/// What the page's listener receives.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case", rename_all_fields = "camelCase")]
pub(crate) enum JsEvent {
    Status {
        status: Status,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    Joined {
        peer_id: PeerId,
        peers: Vec<PeerId>,
    },
    PeerJoined {
        peer_id: PeerId,
    },
    PeerLeft {
        peer_id: PeerId,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Peer(PeerInfo),
    Message {
        peer_id: PeerId,
        name: String,
        text: String,
        at: f64,
    },
    /// File-transfer events carry their own `type`.
    #[serde(untagged)]
    File(crate::files::FileEvent),
}

/// The closures attached to one WebSocket; [`Inner::detach`] clears the handlers first.
struct WsHandlers {
    _open: Closure<dyn FnMut()>,
    _message: Closure<dyn FnMut(MessageEvent)>,
    _close: Closure<dyn FnMut(CloseEvent)>,
}

/// A `setTimeout` or `setInterval` and the closure it calls.
struct Timer {
    id: i32,
    at: Duration,
    _callback: Closure<dyn FnMut()>,
}

/// One other member of the room.
struct PeerEntry {
    /// Serial number of `rtc`: events of replaced connections are ignored.
    conn: u64,
    rtc: RtcPeer,
    link: PeerLink,
    ice: IceStatus,
    relayed: bool,
    link_rtt: Option<Duration>,
    ice_rtt: Option<Duration>,
    fingerprint: Option<Fingerprint>,
    trust: Option<Trust>,
    failure: Option<String>,
    reconnects: u32,
    /// Its id is no longer in the room (it left, or either side's signaling connection
    /// was replaced), but its session works: kept until its connection closes or fails,
    /// or a new connection to the same identity is established.
    orphan: bool,
    /// The page was told `peer_left` already.
    announced_left: bool,
    /// Test hook: drop everything this connection receives (a path that went dead).
    muted: bool,
    timer: Option<Timer>,
    /// What the page was last told.
    shown: Option<PeerInfo>,
}

impl PeerEntry {
    fn info(&self, peer_id: &PeerId) -> PeerInfo {
        let (state, reason) = match self.link.state() {
            LinkState::Established if self.relayed => (PeerState::Relayed, None),
            LinkState::Established => (PeerState::Direct, None),
            LinkState::Handshaking => (PeerState::Handshaking, None),
            LinkState::Failed => (PeerState::Failed, self.failure.clone()),
            LinkState::Waiting if self.failure.is_some() => {
                (PeerState::Failed, self.failure.clone())
            }
            LinkState::Waiting if self.ice == IceStatus::Failed => (
                PeerState::Failed,
                Some(
                    "no network path to this peer; retrying (a TURN server in iceServers may help)"
                        .to_string(),
                ),
            ),
            LinkState::Waiting => (PeerState::Connecting, None),
        };
        let rtt = self.link_rtt.or(self.ice_rtt);
        PeerInfo {
            peer_id: peer_id.clone(),
            state,
            reason,
            name: self.link.peer_name().map(str::to_string),
            fingerprint: self.fingerprint.as_ref().map(Fingerprint::to_hex),
            short_code: self.fingerprint.as_ref().map(Fingerprint::short_code),
            trust: self.trust.map(Trust::as_str),
            rtt_ms: rtt.map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0),
        }
    }
}

/// Everything a session holds. See the module docs.
pub(crate) struct Inner {
    weak: Weak<RefCell<Inner>>,
    // Signaling.
    url: String,
    membership: RoomMembership,
    backoff: ReconnectBackoff,
    pub(crate) status: Status,
    ws: Option<WebSocket>,
    ws_handlers: Option<WsHandlers>,
    pub(crate) listener: Option<js_sys::Function>,
    left: bool,
    unanswered_pings: u32,
    heartbeat: Option<Timer>,
    retry: Option<Timer>,
    stats_timer: Option<Timer>,
    // Who we are, and in which network.
    pub(crate) network: Network,
    pub(crate) identity: IdentityKeyPair,
    pub(crate) own_name: String,
    ice_servers: JsValue,
    relay_only: bool,
    trust: TrustStore,
    pub(crate) store: Option<LocalStore>,
    rng: Rng,
    // The other members.
    peers: BTreeMap<PeerId, PeerEntry>,
    next_conn: u64,
    // File transfer.
    pub(crate) files: Files,
}

/// What [`start`] needs.
pub(crate) struct SessionConfig {
    pub url: String,
    pub network: Network,
    pub identity: IdentityKeyPair,
    pub own_name: String,
    pub ice_servers: JsValue,
    /// `iceTransportPolicy: "relay"`: only TURN relay candidates.
    pub relay_only: bool,
    pub trust: TrustStore,
    pub store: Option<LocalStore>,
    pub listener: Option<js_sys::Function>,
}

/// Connects to the signaling server and starts the timers.
pub(crate) fn start(config: SessionConfig) -> Result<Rc<RefCell<Inner>>, JsError> {
    let room = config.network.room_id().clone();
    let inner = Rc::new_cyclic(|weak| {
        RefCell::new(Inner {
            weak: weak.clone(),
            url: config.url,
            membership: RoomMembership::new(room),
            backoff: ReconnectBackoff::default(),
            status: Status::Connecting,
            ws: None,
            ws_handlers: None,
            listener: config.listener,
            left: false,
            unanswered_pings: 0,
            heartbeat: None,
            retry: None,
            stats_timer: None,
            network: config.network,
            identity: config.identity,
            own_name: config.own_name,
            ice_servers: config.ice_servers,
            relay_only: config.relay_only,
            trust: config.trust,
            store: config.store,
            rng: rng(),
            peers: BTreeMap::new(),
            next_conn: 0,
            files: Files::new(u64::from(rand_u32()) << 16),
        })
    });
    emit(&inner, vec![JsEvent::Status { status: Status::Connecting, detail: None }]);
    connect(&inner).map_err(|e| JsError::new(&format!("cannot open WebSocket: {e:?}")))?;
    start_intervals(&inner).map_err(|e| JsError::new(&format!("cannot start timers: {e:?}")))?;
    Ok(inner)
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
    let serializer = serde_wasm_bindgen::Serializer::json_compatible();
    for ev in events {
        match ev.serialize(&serializer) {
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

fn clear(timer: Option<Timer>, interval: bool) {
    if let (Some(timer), Some(win)) = (timer, web_sys::window()) {
        if interval {
            win.clear_interval_with_handle(timer.id);
        } else {
            win.clear_timeout_with_handle(timer.id);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Signaling

impl Inner {
    fn send_signal(&self, msg: &ClientMessage) {
        if let Some(ws) = &self.ws {
            if ws.ready_state() == WebSocket::OPEN {
                if let Err(e) = ws.send_with_str(&signal::encode(msg)) {
                    web_sys::console::warn_2(&"weft: send failed".into(), &e);
                }
            }
        }
    }

    /// Stops every timer, closes the socket and every peer connection.
    pub(crate) fn stop(&mut self) {
        if self.left && self.ws.is_none() && self.peers.is_empty() {
            return;
        }
        self.left = true;
        clear(self.heartbeat.take(), true);
        clear(self.stats_timer.take(), true);
        clear(self.retry.take(), false);
        self.detach();
        self.membership.disconnected();
        for (_, entry) in std::mem::take(&mut self.peers) {
            clear_peer(entry);
        }
    }

    fn detach(&mut self) {
        if let Some(ws) = self.ws.take() {
            ws.set_onopen(None);
            ws.set_onmessage(None);
            ws.set_onclose(None);
            let _ = ws.close();
        }
        self.ws_handlers = None;
    }

    /// Sends `leave` and stops.
    pub(crate) fn leave(&mut self) {
        self.send_signal(&ClientMessage::Leave);
        self.stop();
    }
}

fn clear_peer(mut entry: PeerEntry) {
    clear(entry.timer.take(), false);
    entry.rtc.close();
}

pub(crate) fn set_status(inner: &Rc<RefCell<Inner>>, status: Status, detail: Option<String>) {
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
                i.send_signal(&i.membership.join_message());
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
    i.ws_handlers = Some(WsHandlers { _open: on_open, _message: on_message, _close: on_close });
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
    let mut out = Vec::new();
    match event {
        MembershipEvent::Joined { peer_id, peers } => {
            inner.borrow_mut().backoff.reset();
            set_status(inner, Status::Joined, None);
            out.push(JsEvent::Joined { peer_id, peers: peers.clone() });
            inner.borrow_mut().resync_peers(&peers, &mut out);
        }
        MembershipEvent::PeerJoined(peer_id) => {
            out.push(JsEvent::PeerJoined { peer_id: peer_id.clone() });
            inner.borrow_mut().add_peer(&peer_id, &mut out);
        }
        MembershipEvent::PeerLeft(peer_id) => {
            out.push(JsEvent::PeerLeft { peer_id: peer_id.clone() });
            inner.borrow_mut().retire_peer(&peer_id);
        }
        MembershipEvent::Signal { from, payload } => {
            inner.borrow_mut().on_signal(&from, payload, &mut out);
        }
        MembershipEvent::Pong => {}
        MembershipEvent::Error { code, message } => {
            if code == ErrorCode::UnsupportedVersion {
                // Reconnecting cannot help: only a reload (a new bundle) can.
                inner.borrow_mut().left = true;
            }
            out.push(JsEvent::Error { code, message });
        }
    }
    emit(inner, out);
}

fn on_closed(inner: &Rc<RefCell<Inner>>, code: u16, reason: &str) {
    let (left, delay) = {
        let mut i = inner.borrow_mut();
        i.detach();
        // Peer connections stay: established sessions keep working without the server.
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
    let weak = Rc::downgrade(inner);
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
    let timeout = i32::try_from(delay_ms).unwrap_or(i32::MAX);
    match set_timeout(&retry, timeout) {
        Ok(id) => {
            let old = inner.borrow_mut().retry.replace(Timer {
                id,
                at: Duration::ZERO,
                _callback: retry,
            });
            clear(old, false);
        }
        Err(e) => web_sys::console::error_2(&"weft: cannot schedule reconnect".into(), &e),
    }
}

fn start_intervals(inner: &Rc<RefCell<Inner>>) -> Result<(), JsValue> {
    let win = web_sys::window().ok_or("no window")?;
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
        i.send_signal(&ClientMessage::Ping);
    });
    let id = win.set_interval_with_callback_and_timeout_and_arguments_0(
        beat.as_ref().unchecked_ref(),
        HEARTBEAT_MS,
    )?;
    inner.borrow_mut().heartbeat = Some(Timer { id, at: Duration::ZERO, _callback: beat });

    let weak = Rc::downgrade(inner);
    let stats = Closure::<dyn FnMut()>::new(move || {
        if let Some(inner) = weak.upgrade() {
            inner.borrow().poll_all_stats();
        }
    });
    let id = win.set_interval_with_callback_and_timeout_and_arguments_0(
        stats.as_ref().unchecked_ref(),
        STATS_MS,
    )?;
    inner.borrow_mut().stats_timer = Some(Timer { id, at: Duration::ZERO, _callback: stats });
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Peers

impl Inner {
    /// After a (re)join: the server's list is the whole truth. Connections to ids no longer
    /// listed are dropped, unless their session works (the peer is probably still there,
    /// under a new id; see the module docs).
    fn resync_peers(&mut self, peers: &[PeerId], out: &mut Vec<JsEvent>) {
        let stale: Vec<PeerId> =
            self.peers.keys().filter(|id| !peers.contains(id)).cloned().collect();
        for id in stale {
            let keep =
                self.peers.get(&id).is_some_and(|e| e.link.state() == LinkState::Established);
            if keep {
                if let Some(entry) = self.peers.get_mut(&id) {
                    entry.orphan = true;
                }
            } else {
                self.drop_peer(&id, out);
            }
        }
        for id in peers {
            if !self.peers.contains_key(id) {
                self.add_peer(id, out);
            }
        }
    }

    fn new_rtc(&mut self, remote: &PeerId) -> Option<(u64, RtcPeer)> {
        let own = self.membership.own_id()?.clone();
        self.next_conn += 1;
        let conn = self.next_conn;
        let weak = self.weak.clone();
        let id = remote.clone();
        let sink = move |ev: RtcEvent| {
            if let Some(inner) = weak.upgrade() {
                on_rtc_event(&inner, &id, conn, ev);
            }
        };
        match RtcPeer::new(&self.ice_servers, self.relay_only, is_polite(&own, remote), sink) {
            Ok(rtc) => Some((conn, rtc)),
            Err(e) => {
                web_sys::console::error_2(&"weft: cannot create RTCPeerConnection".into(), &e);
                None
            }
        }
    }

    /// A fresh connection to `remote` (replacing any earlier one under that id).
    fn add_peer(&mut self, remote: &PeerId, out: &mut Vec<JsEvent>) {
        let Some(own) = self.membership.own_id().cloned() else { return };
        if *remote == own {
            return;
        }
        let Some((conn, rtc)) = self.new_rtc(remote) else { return };
        let link = PeerLink::new(
            own,
            remote.clone(),
            self.identity.clone(),
            &self.network,
            &self.own_name,
            PeerLinkConfig::default(),
        );
        let entry = PeerEntry {
            conn,
            rtc,
            link,
            ice: IceStatus::Checking,
            relayed: false,
            link_rtt: None,
            ice_rtt: None,
            fingerprint: None,
            trust: None,
            failure: None,
            reconnects: 0,
            orphan: false,
            announced_left: false,
            muted: false,
            timer: None,
            shown: None,
        };
        if let Some(old) = self.peers.insert(remote.clone(), entry) {
            clear_peer(old);
        }
        self.show(remote, out);
    }

    /// Closes and forgets `remote`, telling the page unless it knows already.
    fn drop_peer(&mut self, remote: &PeerId, out: &mut Vec<JsEvent>) {
        self.files.engine.peer_disconnected(remote, now());
        self.pump_files(out);
        if let Some(entry) = self.peers.remove(remote) {
            if !entry.announced_left {
                out.push(JsEvent::PeerLeft { peer_id: remote.clone() });
            }
            clear_peer(entry);
        }
    }

    /// The server says `remote` left. A working session is kept as an orphan: when the
    /// server goes down, it reports everyone leaving, yet the peers are still there. A peer
    /// that really left closes its connection, which ends the orphan.
    fn retire_peer(&mut self, remote: &PeerId) {
        let Some(entry) = self.peers.get_mut(remote) else { return };
        if entry.link.state() == LinkState::Established {
            entry.orphan = true;
            entry.announced_left = true;
        } else if let Some(entry) = self.peers.remove(remote) {
            clear_peer(entry);
        }
    }

    /// Replaces the WebRTC connection of `remote`, keeping its link (which runs a new
    /// handshake when the new control channel opens).
    fn reconnect_peer(&mut self, remote: &PeerId) -> bool {
        let Some((conn, rtc)) = self.new_rtc(remote) else { return false };
        self.files.engine.peer_disconnected(remote, now());
        let Some(entry) = self.peers.get_mut(remote) else { return false };
        entry.link.channel_closed();
        entry.rtc.close();
        entry.rtc = rtc;
        entry.conn = conn;
        entry.ice = IceStatus::Checking;
        entry.relayed = false;
        entry.ice_rtt = None;
        entry.reconnects += 1;
        entry.muted = false;
        true
    }

    fn on_signal(&mut self, from: &PeerId, payload: SignalPayload, out: &mut Vec<JsEvent>) {
        if !self.peers.contains_key(from) {
            // An offer from an id we do not know (we missed its join, or it raced our
            // welcome): a new peer. Anything else for an unknown id is stale.
            let known = self.membership.peers().any(|p| p == from);
            if !matches!(payload, SignalPayload::Offer { .. }) && !known {
                return;
            }
            self.add_peer(from, out);
        }
        if let Some(entry) = self.peers.get(from) {
            entry.rtc.handle_signal(payload);
        }
    }

    /// Feeds `ev` of connection `conn` of `remote` to the core.
    fn on_rtc(&mut self, remote: &PeerId, conn: u64, ev: RtcEvent, out: &mut Vec<JsEvent>) {
        let now = now();
        let Some(entry) = self.peers.get_mut(remote) else { return };
        if entry.conn != conn {
            return;
        }
        match ev {
            RtcEvent::Signal(payload) => {
                if !entry.orphan {
                    self.send_signal(&ClientMessage::Signal { to: remote.clone(), payload });
                }
            }
            RtcEvent::ControlOpen { local_sdp, remote_sdp } => {
                entry.failure = None;
                entry.link.channel_open(&local_sdp, &remote_sdp, now, &mut self.rng);
            }
            RtcEvent::Message(_) if entry.muted => {}
            RtcEvent::Message(bytes) => entry.link.receive(&bytes, now, &mut self.rng),
            RtcEvent::Ice(status) => {
                entry.ice = status;
                if status == IceStatus::Failed && entry.orphan {
                    // Nobody to renegotiate with: the server no longer knows this id.
                    self.drop_peer(remote, out);
                    return;
                }
                if status == IceStatus::Connected {
                    self.poll_stats(remote);
                }
            }
            RtcEvent::ControlClosed => {
                entry.link.channel_closed();
                self.files.engine.peer_disconnected(remote, now);
                let Some(entry) = self.peers.get_mut(remote) else { return };
                entry.link_rtt = None;
                let in_room = !entry.orphan && self.membership.peers().any(|p| p == remote);
                if in_room && entry.reconnects < MAX_RECONNECTS {
                    self.reconnect_peer(remote);
                } else if in_room {
                    entry.failure = Some("the connection keeps dropping; gave up".into());
                } else {
                    self.drop_peer(remote, out);
                    return;
                }
            }
            RtcEvent::RemoteRestarted(offer) => {
                if self.reconnect_peer(remote) {
                    if let Some(entry) = self.peers.get(remote) {
                        entry.rtc.handle_signal(offer);
                    }
                }
            }
        }
        self.drive(remote, out);
    }

    /// Drains the link of `remote` after any input: transmits go to the control channel,
    /// events to the page; then re-arms its timer and reports any change of its state.
    fn drive(&mut self, remote: &PeerId, out: &mut Vec<JsEvent>) {
        let mut trust_changed = false;
        let mut established = None;
        let mut transfer = Vec::new();
        let mut failed = false;
        let mut silent = false;
        let weak = self.weak.clone();
        let Some(entry) = self.peers.get_mut(remote) else { return };
        while let Some(bytes) = entry.link.poll_transmit() {
            match entry.rtc.send_control(bytes) {
                Ok(()) => {}
                Err(SendError::Closed) => break,
                Err(SendError::Congested) => {
                    web_sys::console::warn_1(&"weft: control channel congested; dropped".into());
                }
            }
        }
        while let Some(ev) = entry.link.poll_event() {
            match ev {
                LinkEvent::Established { fingerprint, .. } => {
                    entry.reconnects = 0;
                    entry.failure = None;
                    established = Some(fingerprint);
                    entry.fingerprint = Some(fingerprint);
                    entry.trust = None;
                }
                LinkEvent::Hello { .. } => {}
                LinkEvent::Message { text } => out.push(JsEvent::Message {
                    peer_id: remote.clone(),
                    name: entry.link.peer_name().unwrap_or_default().to_string(),
                    text,
                    at: js_sys::Date::now(),
                }),
                LinkEvent::Transfer { frame_type, body } => transfer.push((frame_type, body)),
                // IP packets come with a later issue.
                LinkEvent::Data(_) => {}
                LinkEvent::Rtt(rtt) => entry.link_rtt = Some(rtt),
                LinkEvent::Failed(error) => {
                    silent = matches!(error, LinkError::PeerSilent(_));
                    entry.failure = Some(error.to_string());
                    failed = true;
                }
            }
        }
        // Pin the key once both the key and the name are known.
        if entry.trust.is_none() {
            if let (Some(fp), Some(name)) = (&entry.fingerprint, entry.link.peer_name()) {
                entry.trust = Some(self.trust.observe(name, fp));
                trust_changed = true;
            }
        }
        // A peer that already left the room and whose link failed (it went silent) is gone.
        let gone = entry.orphan && entry.link.state() == LinkState::Failed;
        arm_timer(entry, &weak, remote);
        if gone {
            self.drop_peer(remote, out);
            return;
        }
        if let Some(fp) = established {
            self.drop_orphans_of(remote, &fp, out);
            self.poll_stats(remote);
            self.files.engine.peer_connected(remote, now());
            self.pump_files(out);
        }
        if !transfer.is_empty() {
            self.on_transfer(remote, transfer, out);
        }
        if failed {
            self.files.engine.peer_disconnected(remote, now());
            self.pump_files(out);
        }
        // A peer that went silent but is still in the room: its path probably died (a
        // relay went away, a network changed). A fresh connection finds a new one.
        let retry =
            self.peers.get(remote).is_some_and(|e| !e.orphan && e.reconnects < MAX_RECONNECTS);
        if silent && retry && self.membership.peers().any(|p| p == remote) {
            // Say why first, then start over.
            self.show(remote, out);
            if self.reconnect_peer(remote) {
                if let Some(entry) = self.peers.get_mut(remote) {
                    entry.failure = None;
                }
            }
        }
        if trust_changed {
            self.save_trust();
        }
        self.show(remote, out);
    }

    /// A connection kept from before a signaling reconnect is replaced by a new one to
    /// the same identity.
    fn drop_orphans_of(&mut self, current: &PeerId, fp: &Fingerprint, out: &mut Vec<JsEvent>) {
        let orphans: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(id, e)| *id != current && e.orphan && e.fingerprint.as_ref() == Some(fp))
            .map(|(id, _)| id.clone())
            .collect();
        for id in orphans {
            self.drop_peer(&id, out);
        }
    }

    /// Adds a `peer` event if what the page knows of `remote` changed.
    fn show(&mut self, remote: &PeerId, out: &mut Vec<JsEvent>) {
        let Some(entry) = self.peers.get_mut(remote) else { return };
        let info = entry.info(remote);
        if entry.shown.as_ref() != Some(&info) {
            entry.shown = Some(info.clone());
            out.push(JsEvent::Peer(info));
        }
    }

    fn save_trust(&self) {
        let Some(store) = self.store.clone() else { return };
        let room = self.membership.room().clone();
        let trust = self.trust.clone();
        wasm_bindgen_futures::spawn_local(async move {
            if let Err(e) = store.save_trust(&room, &trust).await {
                web_sys::console::warn_1(&format!("weft: cannot save trust store: {e}").into());
            }
        });
    }

    /// Reads the selected ICE path of `remote` in the background.
    fn poll_stats(&self, remote: &PeerId) {
        let Some(entry) = self.peers.get(remote) else { return };
        let conn = entry.conn;
        let pc = entry.rtc.handle();
        let weak = self.weak.clone();
        let remote = remote.clone();
        wasm_bindgen_futures::spawn_local(async move {
            let Some(path) = rtc::path_stats(&pc).await else { return };
            let Some(inner) = weak.upgrade() else { return };
            let mut out = Vec::new();
            {
                let mut i = inner.borrow_mut();
                let Some(entry) = i.peers.get_mut(&remote) else { return };
                if entry.conn != conn {
                    return;
                }
                entry.relayed = path.relayed;
                entry.ice_rtt = path.rtt;
                i.show(&remote, &mut out);
            }
            emit(&inner, out);
        });
    }

    fn poll_all_stats(&self) {
        for (id, entry) in &self.peers {
            if entry.ice == IceStatus::Connected {
                self.poll_stats(id);
            }
        }
    }

    // --- file transfer plumbing (see `files.rs`)

    pub(crate) fn weak(&self) -> Weak<RefCell<Inner>> {
        self.weak.clone()
    }

    /// Peers with an established encrypted session.
    pub(crate) fn connected_peers(&self) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, e)| e.link.state() == LinkState::Established)
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub(crate) fn peer_name(&self, peer: &PeerId) -> String {
        self.peers.get(peer).and_then(|e| e.link.peer_name()).unwrap_or_default().to_string()
    }

    /// Seals a file-transfer frame for `peer` (sent by [`Self::flush_link`]).
    pub(crate) fn send_transfer(&mut self, peer: &PeerId, frame_type: u8, body: Vec<u8>) -> bool {
        let Some(entry) = self.peers.get_mut(peer) else { return false };
        entry.link.send_transfer(frame_type, body, now()).is_ok()
    }

    /// Seals several small file-transfer frames for `peer` in one packet.
    pub(crate) fn send_transfers(&mut self, peer: &PeerId, frames: Vec<(u8, Vec<u8>)>) -> bool {
        let Some(entry) = self.peers.get_mut(peer) else { return false };
        // Keep packets well under the data channel's message size.
        let mut ok = true;
        let mut batch = Vec::new();
        let mut bytes = 0;
        for (t, body) in frames {
            bytes += body.len() + 5;
            batch.push((t, body));
            if bytes >= 16 * 1024 {
                ok &= entry.link.send_transfers(std::mem::take(&mut batch), now()).is_ok();
                bytes = 0;
            }
        }
        ok & entry.link.send_transfers(batch, now()).is_ok()
    }

    /// Hands `peer`'s sealed packets to its control channel.
    pub(crate) fn flush_link(&mut self, peer: &PeerId) {
        let Some(entry) = self.peers.get_mut(peer) else { return };
        while let Some(bytes) = entry.link.poll_transmit() {
            match entry.rtc.send_control(bytes) {
                Ok(()) => {}
                Err(SendError::Closed) => break,
                Err(SendError::Congested) => {
                    web_sys::console::warn_1(&"weft: control channel congested; dropped".into());
                }
            }
        }
    }

    // --- what the JavaScript API asks for

    /// Test hook: drop everything `peer_id`'s current connection delivers, as if its path
    /// died, until the connection is replaced.
    pub(crate) fn debug_mute(&mut self, peer_id: &str) -> Result<(), String> {
        let entry = self
            .peers
            .iter_mut()
            .find(|(p, _)| p.as_str() == peer_id)
            .ok_or_else(|| format!("no peer {peer_id} in this network"))?
            .1;
        entry.muted = true;
        Ok(())
    }

    pub(crate) fn peer_infos(&self) -> Vec<PeerInfo> {
        self.peers.iter().map(|(id, e)| e.info(id)).collect()
    }

    pub(crate) fn peer_ids(&self) -> Vec<String> {
        self.peers.keys().map(PeerId::to_string).collect()
    }

    pub(crate) fn own_id(&self) -> Option<String> {
        self.membership.own_id().map(PeerId::to_string)
    }

    pub(crate) fn room(&self) -> String {
        self.membership.room().to_string()
    }

    /// Sends `text` to `to`, or to every established peer.
    pub(crate) fn send_message(
        &mut self,
        text: &str,
        to: Option<&str>,
        out: &mut Vec<JsEvent>,
    ) -> Result<u32, String> {
        let now = now();
        let targets: Vec<PeerId> = match to {
            Some(id) => {
                let entry = self
                    .peers
                    .iter()
                    .find(|(p, _)| p.as_str() == id)
                    .ok_or_else(|| format!("no peer {id} in this network"))?;
                if entry.1.link.state() != LinkState::Established {
                    return Err(format!("peer {id} is not connected yet"));
                }
                vec![entry.0.clone()]
            }
            None => self
                .peers
                .iter()
                .filter(|(_, e)| e.link.state() == LinkState::Established)
                .map(|(id, _)| id.clone())
                .collect(),
        };
        let mut sent = 0;
        for id in targets {
            let Some(entry) = self.peers.get_mut(&id) else { continue };
            match entry.link.send_message(text, now) {
                Ok(()) => sent += 1,
                Err(e) if to.is_some() => return Err(e.to_string()),
                Err(_) => {}
            }
            self.drive(&id, out);
        }
        Ok(sent)
    }

    fn peer_key(&self, peer_id: &str) -> Result<(PeerId, String, Fingerprint), String> {
        let (id, entry) = self
            .peers
            .iter()
            .find(|(p, _)| p.as_str() == peer_id)
            .ok_or_else(|| format!("no peer {peer_id} in this network"))?;
        match (entry.link.peer_name(), &entry.fingerprint) {
            (Some(name), Some(fp)) => Ok((id.clone(), name.to_string(), *fp)),
            _ => Err(format!("peer {peer_id} has not completed a handshake yet")),
        }
    }

    /// The user compared `peer_id`'s short code: mark its key verified.
    pub(crate) fn verify_peer(
        &mut self,
        peer_id: &str,
        out: &mut Vec<JsEvent>,
    ) -> Result<(), String> {
        let (_, name, fp) = self.peer_key(peer_id)?;
        let trust = self.trust.verify(&name, &fp);
        if let Trust::Changed { .. } = trust {
            return Err(format!(
                "{name} is pinned to another key; accept the new key before verifying it"
            ));
        }
        self.update_trust(&name, out);
        Ok(())
    }

    /// The user accepts `peer_id`'s changed key.
    pub(crate) fn accept_new_key(
        &mut self,
        peer_id: &str,
        out: &mut Vec<JsEvent>,
    ) -> Result<(), String> {
        let (_, name, fp) = self.peer_key(peer_id)?;
        self.trust.accept_new_key(&name, &fp);
        self.update_trust(&name, out);
        Ok(())
    }

    /// Re-reads the trust of every peer named `name`, saves and reports.
    fn update_trust(&mut self, name: &str, out: &mut Vec<JsEvent>) {
        let ids: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, e)| e.link.peer_name() == Some(name))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            if let Some(entry) = self.peers.get_mut(id) {
                if let Some(fp) = &entry.fingerprint {
                    entry.trust = self.trust.check(name, fp);
                }
            }
            self.show(id, out);
        }
        self.save_trust();
    }
}

/// (Re)arms the one timer of a peer's link at its `poll_timeout`.
fn arm_timer(entry: &mut PeerEntry, weak: &Weak<RefCell<Inner>>, remote: &PeerId) {
    let wanted = entry.link.poll_timeout();
    // A timer armed no later than wanted stays: it wakes the link early, harmlessly, and
    // is armed again then. (The link's deadline moves later with every packet it hears;
    // re-arming each time cost a clearTimeout, a setTimeout and a closure per packet.)
    match (entry.timer.as_ref().map(|t| t.at), wanted) {
        (Some(armed), Some(w)) if armed <= w => return,
        (Some(_), None) | (None, None) => return,
        _ => {}
    }
    clear(entry.timer.take(), false);
    let Some(at) = wanted else { return };
    let delay = at.saturating_sub(now());
    let ms = i32::try_from(delay.as_millis()).unwrap_or(i32::MAX).saturating_add(1);
    let weak = weak.clone();
    let remote = remote.clone();
    let callback = Closure::<dyn FnMut()>::new(move || {
        let Some(inner) = weak.upgrade() else { return };
        let mut out = Vec::new();
        {
            let mut i = inner.borrow_mut();
            let Some(entry) = i.peers.get_mut(&remote) else { return };
            // Fired: forget it, so the next arm sets a new one even for the same instant.
            if let Some(t) = entry.timer.as_mut() {
                t.at = Duration::MAX;
            }
            entry.link.handle_timeout(now());
            i.drive(&remote, &mut out);
        }
        emit(&inner, out);
    });
    match set_timeout(&callback, ms) {
        Ok(id) => entry.timer = Some(Timer { id, at, _callback: callback }),
        Err(e) => web_sys::console::error_2(&"weft: cannot set a timer".into(), &e),
    }
}

fn on_rtc_event(inner: &Rc<RefCell<Inner>>, remote: &PeerId, conn: u64, ev: RtcEvent) {
    let mut out = Vec::new();
    inner.borrow_mut().on_rtc(remote, conn, ev, &mut out);
    emit(inner, out);
}
