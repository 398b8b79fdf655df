//! One `RTCPeerConnection` to one remote peer: two negotiated data channels, perfect
//! negotiation, trickle ICE, backpressure, ICE restarts and path statistics.
//!
//! This module knows WebRTC and nothing about Weft's protocol: it reports what happens as
//! [`RtcEvent`]s to a sink the session gives it, and takes signaling payloads and bytes to
//! send. The session turns those into core inputs.
//!
//! - **Channels.** Both sides create the same two channels with `negotiated: true`, so no
//!   `datachannel` event is needed and neither side has to be the offerer:
//!   id 0 `control` (reliable, ordered: handshake and sealed frames) and id 1 `data`
//!   (`ordered: false, maxRetransmits: 0`: IP packets later).
//!   The impolite side creates them at once and so makes the first offer; the polite side
//!   creates them when that offer arrives (before answering), or after a few seconds
//!   without one. Two fresh connections therefore start with one offer, not a collision
//!   (in Chromium, a collision on the very first negotiation sometimes left ICE idle).
//! - **Perfect negotiation** (W3C, "Perfect negotiation example"): `negotiationneeded`
//!   makes an offer with an implicit `setLocalDescription()`; on an offer collision the
//!   impolite side ignores the remote offer and the polite side rolls back implicitly
//!   inside `setRemoteDescription`. Incoming payloads are applied one at a time, in order.
//! - **Trickle ICE.** Each local candidate goes out as [`SignalPayload::Candidate`], the end
//!   of gathering as an empty candidate. Remote candidates that arrive before a remote
//!   description are kept and added after it; errors are ignored while an offer is being
//!   ignored (its candidates belong to a description we never applied).
//! - **Backpressure.** The control channel queues in Rust while `bufferedAmount` is above
//!   [`CONTROL_HIGH_WATER`] and flushes on `bufferedamountlow`; the data channel drops
//!   and the outbox refuses where the core's [`ConnectionLimits`] say.
//! - **ICE restart.** When ICE fails, both sides call `restartIce()`; perfect negotiation
//!   sorts out the resulting offers.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::time::Duration;

use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    MessageEvent, RtcConfiguration, RtcDataChannel, RtcDataChannelInit, RtcDataChannelState,
    RtcDataChannelType, RtcIceCandidateInit, RtcIceConnectionState, RtcIceTransportPolicy,
    RtcPeerConnection, RtcPeerConnectionIceEvent, RtcSdpType, RtcSessionDescriptionInit,
    RtcSignalingState,
};
use weft_core::node::{Channel, ConnectionLimits, POLITE_OFFER_WAIT, RelayTransport};
use weft_core::sdp::dtls_fingerprint;
use weft_core::signal::{IceServer, SignalPayload};

/// Above this many bytes buffered in the browser, control messages wait in Rust.
pub(crate) const CONTROL_HIGH_WATER: u32 = 1024 * 1024;
/// `bufferedamountlow` fires when the control channel drains below this.
pub(crate) const CONTROL_LOW_WATER: u32 = 256 * 1024;
/// When to drop an IP packet, refuse a control message or drop a candidate: the core's.
const LIMITS: ConnectionLimits = ConnectionLimits::DEFAULT;

thread_local! {
    static DEBUG: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Turns step-by-step logging of negotiation and ICE (`console.debug`) on or off.
pub(crate) fn set_debug(on: bool) {
    DEBUG.with(|d| d.set(on));
}

/// Logs `what()` when debugging is on.
pub(crate) fn debug(what: impl FnOnce() -> String) {
    if DEBUG.with(std::cell::Cell::get) {
        web_sys::console::debug_1(&format!("weft: {}", what()).into());
    }
}

#[wasm_bindgen]
extern "C" {
    /// `RTCPeerConnection` methods web-sys lacks.
    type PeerConnectionExt;

    /// `setLocalDescription()` without arguments: the browser creates the right offer or
    /// answer (web-sys only has the form with a description).
    #[wasm_bindgen(method, js_name = setLocalDescription)]
    fn set_local_description_implicit(this: &PeerConnectionExt) -> js_sys::Promise;

    /// `restartIce()`.
    #[wasm_bindgen(method, js_name = restartIce)]
    fn restart_ice(this: &PeerConnectionExt);
}

fn ext(pc: &RtcPeerConnection) -> &PeerConnectionExt {
    pc.unchecked_ref()
}

/// What the connection reports to its owner.
#[derive(Debug)]
pub(crate) enum RtcEvent {
    /// Send this to the remote peer through the signaling server.
    Signal(SignalPayload),
    /// The control channel opened; the descriptions it was negotiated with (for the
    /// handshake's channel binding).
    ControlOpen {
        /// `localDescription.sdp`.
        local_sdp: String,
        /// `remoteDescription.sdp`.
        remote_sdp: String,
    },
    /// The control channel closed: this connection carries nothing any more.
    ControlClosed,
    /// A binary message arrived on either channel.
    Message(Vec<u8>),
    /// ICE connectivity changed.
    Ice(IceStatus),
    /// The remote peer offered a new DTLS transport (it made a new connection, e.g. after
    /// its old one died): this connection cannot take it; the owner should replace it with
    /// a fresh one and give that the offer.
    RemoteRestarted(SignalPayload),
}

/// ICE connectivity, simplified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IceStatus {
    /// Gathering or checking.
    Checking,
    /// A path works.
    Connected,
    /// The path stopped working; ICE may recover by itself.
    Disconnected,
    /// No path works; an ICE restart was started.
    Failed,
}

/// What `getStats()` says about the selected candidate pair.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PathStats {
    /// Either end of the selected pair is a TURN relay candidate.
    pub relayed: bool,
    /// When our end is a relay candidate: how we reach its TURN server (`relayProtocol`).
    pub relay_transport: Option<RelayTransport>,
    /// STUN round-trip time of the selected pair, if the browser measured one.
    pub rtt: Option<Duration>,
}

/// Why bytes could not be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The connection is closed.
    Closed,
    /// Too much is queued already.
    Congested,
}

type Sink = Rc<dyn Fn(RtcEvent)>;

/// The closures attached to the connection and its channels, kept alive beside them and
/// detached in [`RtcState::close`].
struct Handlers {
    _negotiation_needed: Closure<dyn FnMut()>,
    _ice_candidate: Closure<dyn FnMut(RtcPeerConnectionIceEvent)>,
    _ice_state: Closure<dyn FnMut()>,
}

/// The two channels and the closures attached to them.
struct Channels {
    control: RtcDataChannel,
    data: RtcDataChannel,
    _control_open: Closure<dyn FnMut()>,
    _control_close: Closure<dyn FnMut()>,
    _control_low: Closure<dyn FnMut()>,
    _message: Closure<dyn FnMut(MessageEvent)>,
}

struct RtcState {
    pc: RtcPeerConnection,
    /// Created at once on the impolite side; on the polite side when the first remote
    /// offer arrives (or after [`POLITE_OFFER_WAIT`]), so that the first negotiation
    /// has one offerer and no collision.
    channels: Option<Channels>,
    polite: bool,
    /// The control channel opened before `setRemoteDescription` finished (Chromium can
    /// open it while the answer is still being applied): report it once both are there.
    open_pending: bool,
    making_offer: bool,
    ignore_offer: bool,
    /// Remote payloads not yet applied; one task applies them in order.
    inbox: VecDeque<SignalPayload>,
    inbox_busy: bool,
    /// Remote candidates that came before any remote description.
    pending_candidates: Vec<RtcIceCandidateInit>,
    /// Control messages waiting for the channel to open or to drain.
    outbox: VecDeque<Vec<u8>>,
    outbox_bytes: usize,
    sink: Sink,
    closed: bool,
    handlers: Option<Handlers>,
    /// The polite side's timer (id and callback) that opens the channels itself if no
    /// offer came within [`POLITE_OFFER_WAIT`]; cleared on close, so a connection closed
    /// before it fires leaves no timer behind.
    polite_wait: Option<(i32, Closure<dyn FnMut()>)>,
}

/// A WebRTC connection to one remote peer. Dropping it closes the connection.
pub(crate) struct RtcPeer {
    state: Rc<RefCell<RtcState>>,
}

impl std::fmt::Debug for RtcPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.borrow();
        f.debug_struct("RtcPeer")
            .field("polite", &s.polite)
            .field("closed", &s.closed)
            .field("queued", &s.outbox.len())
            .finish_non_exhaustive()
    }
}

fn channel(pc: &RtcPeerConnection, which: Channel) -> RtcDataChannel {
    let init = RtcDataChannelInit::new();
    init.set_negotiated(true);
    init.set_id(which.id());
    if !which.reliable() {
        init.set_ordered(false);
        init.set_max_retransmits(0);
    }
    let dc = pc.create_data_channel_with_data_channel_dict(which.label(), &init);
    dc.set_binary_type(RtcDataChannelType::Arraybuffer);
    dc
}

/// Calls the sink without holding the state borrow (the sink may call back into us).
fn report(weak: &Weak<RefCell<RtcState>>, ev: RtcEvent) {
    let Some(state) = weak.upgrade() else { return };
    let sink = {
        let s = state.borrow();
        if s.closed {
            return;
        }
        s.sink.clone()
    };
    sink(ev);
}

impl RtcPeer {
    /// A new connection. `ice_servers` go to `RTCConfiguration.iceServers` (none: host
    /// candidates only); `relay_only` sets
    /// `iceTransportPolicy: "relay"`. `polite` is this side's role in
    /// perfect negotiation. Events go to `sink`, always from a browser callback, never
    /// from inside a method of this type.
    pub(crate) fn new(
        ice_servers: &[IceServer],
        relay_only: bool,
        polite: bool,
        sink: impl Fn(RtcEvent) + 'static,
    ) -> Result<Self, JsValue> {
        let config = RtcConfiguration::new();
        if !ice_servers.is_empty() {
            // `{ urls: [...], username?, credential? }`: an `RTCIceServer` as it is.
            let list = crate::events::to_js(ice_servers).map_err(JsValue::from)?;
            config.set_ice_servers(&list);
        }
        if relay_only {
            config.set_ice_transport_policy(RtcIceTransportPolicy::Relay);
        }
        let pc = RtcPeerConnection::new_with_configuration(&config)?;
        let state = Rc::new(RefCell::new(RtcState {
            pc,
            channels: None,
            polite,
            open_pending: false,
            making_offer: false,
            ignore_offer: false,
            inbox: VecDeque::new(),
            inbox_busy: false,
            pending_candidates: Vec::new(),
            outbox: VecDeque::new(),
            outbox_bytes: 0,
            sink: Rc::new(sink),
            closed: false,
            handlers: None,
            polite_wait: None,
        }));
        attach(&state);
        if polite {
            let weak = Rc::downgrade(&state);
            let callback = Closure::<dyn FnMut()>::new(move || {
                let Some(state) = weak.upgrade() else { return };
                if !state.borrow().closed && state.borrow().channels.is_none() {
                    debug(|| "no offer came: making our own".into());
                    open_channels(&state);
                }
            });
            let win = web_sys::window().ok_or("no window")?;
            let id = win.set_timeout_with_callback_and_timeout_and_arguments_0(
                callback.as_ref().unchecked_ref(),
                POLITE_OFFER_WAIT.as_millis() as i32,
            )?;
            state.borrow_mut().polite_wait = Some((id, callback));
        } else {
            open_channels(&state);
        }
        Ok(Self { state })
    }

    /// Takes a payload the remote peer sent through the signaling server.
    pub(crate) fn handle_signal(&self, payload: SignalPayload) {
        let start = {
            let mut s = self.state.borrow_mut();
            if s.closed {
                return;
            }
            s.inbox.push_back(payload);
            !std::mem::replace(&mut s.inbox_busy, true)
        };
        if start {
            let weak = Rc::downgrade(&self.state);
            wasm_bindgen_futures::spawn_local(process_inbox(weak));
        }
    }

    /// Sends on the reliable control channel, or queues while it is not open yet or its
    /// buffer is above the high-water mark.
    pub(crate) fn send_control(&self, bytes: Vec<u8>) -> Result<(), SendError> {
        let mut s = self.state.borrow_mut();
        if s.closed {
            return Err(SendError::Closed);
        }
        if !LIMITS.admits_control(s.outbox_bytes, bytes.len()) {
            return Err(SendError::Congested);
        }
        s.outbox_bytes += bytes.len();
        s.outbox.push_back(bytes);
        s.flush();
        Ok(())
    }

    /// Sends on the unreliable data channel; drops (returns `false`) when it is not open
    /// or congested.
    #[allow(dead_code, reason = "the IP tunnel that uses it comes with a later issue")]
    pub(crate) fn send_data(&self, bytes: &[u8]) -> bool {
        let s = self.state.borrow();
        let Some(ch) = s.channels.as_ref().filter(|_| !s.closed) else { return false };
        if ch.data.ready_state() != RtcDataChannelState::Open
            || !LIMITS.admits_data(ch.data.buffered_amount() as usize, bytes.len())
        {
            return false;
        }
        ch.data.send_with_u8_array(bytes).is_ok()
    }

    /// Bytes waiting in Rust and in the browser for the control channel.
    #[allow(dead_code, reason = "for file transfer pacing, a later issue")]
    pub(crate) fn control_backlog(&self) -> usize {
        let s = self.state.borrow();
        s.outbox_bytes + s.channels.as_ref().map_or(0, |c| c.control.buffered_amount() as usize)
    }

    /// Whether this side is the polite one in perfect negotiation.
    #[allow(dead_code, reason = "diagnostics")]
    pub(crate) fn polite(&self) -> bool {
        self.state.borrow().polite
    }

    /// The underlying connection, for [`path_stats`] (which must not borrow `self`
    /// across its await).
    pub(crate) fn handle(&self) -> RtcPeerConnection {
        self.state.borrow().pc.clone()
    }

    /// Looks for a better path without dropping this one: takes `ice_servers` (fresh
    /// credentials) and restarts ICE; perfect negotiation sends the new offer.
    pub(crate) fn restart_ice(&self, ice_servers: &[IceServer]) {
        let s = self.state.borrow();
        if s.closed {
            return;
        }
        let config = s.pc.get_configuration();
        match crate::events::to_js(ice_servers) {
            Ok(list) => config.set_ice_servers(&list),
            Err(e) => debug(|| format!("ICE servers not taken: {e}")),
        }
        if let Err(e) = s.pc.set_configuration_with_configuration(&config) {
            debug(|| format!("ICE servers not taken: {e:?}"));
        }
        debug(|| "ICE restart: looking for a better path".into());
        ext(&s.pc).restart_ice();
    }

    /// Closes the connection and detaches every handler. No events follow.
    pub(crate) fn close(&self) {
        self.state.borrow_mut().close();
    }
}

impl Drop for RtcPeer {
    fn drop(&mut self) {
        self.close();
    }
}

impl RtcState {
    fn flush(&mut self) {
        let Some(control) = self.channels.as_ref().map(|c| c.control.clone()) else { return };
        if control.ready_state() != RtcDataChannelState::Open {
            return;
        }
        while control.buffered_amount() <= CONTROL_HIGH_WATER {
            let Some(bytes) = self.outbox.pop_front() else { break };
            self.outbox_bytes -= bytes.len();
            if let Err(e) = control.send_with_u8_array(&bytes) {
                web_sys::console::warn_2(&"weft: control channel send failed".into(), &e);
            }
        }
    }

    fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if let (Some((id, _)), Some(win)) = (&self.polite_wait, web_sys::window()) {
            win.clear_timeout_with_handle(*id);
        }
        self.pc.set_onnegotiationneeded(None);
        self.pc.set_onicecandidate(None);
        self.pc.set_oniceconnectionstatechange(None);
        if let Some(ch) = self.channels.take() {
            for dc in [&ch.control, &ch.data] {
                dc.set_onopen(None);
                dc.set_onclose(None);
                dc.set_onmessage(None);
                dc.set_onbufferedamountlow(None);
                dc.close();
            }
        }
        self.pc.close();
        self.outbox.clear();
        self.outbox_bytes = 0;
        self.inbox.clear();
        self.pending_candidates.clear();
        self.handlers = None;
    }
}

fn attach(state: &Rc<RefCell<RtcState>>) {
    let weak = Rc::downgrade(state);
    let negotiation_needed = {
        let weak = weak.clone();
        Closure::<dyn FnMut()>::new(move || {
            debug(|| "negotiationneeded".into());
            wasm_bindgen_futures::spawn_local(make_offer(weak.clone()));
        })
    };
    let ice_candidate = {
        let weak = weak.clone();
        Closure::<dyn FnMut(RtcPeerConnectionIceEvent)>::new(
            move |ev: RtcPeerConnectionIceEvent| {
                let payload = match ev.candidate() {
                    Some(c) => SignalPayload::Candidate {
                        candidate: c.candidate(),
                        sdp_mid: c.sdp_mid(),
                        sdp_m_line_index: c.sdp_m_line_index(),
                        username_fragment: js_sys::Reflect::get(&c, &"usernameFragment".into())
                            .ok()
                            .and_then(|v| v.as_string()),
                    },
                    // Gathering finished: an empty candidate says so.
                    None => SignalPayload::Candidate {
                        candidate: String::new(),
                        sdp_mid: None,
                        sdp_m_line_index: None,
                        username_fragment: None,
                    },
                };
                debug(|| format!("local candidate {payload:?}"));
                report(&weak, RtcEvent::Signal(payload));
            },
        )
    };
    let ice_state = {
        let weak = weak.clone();
        Closure::<dyn FnMut()>::new(move || {
            let Some(state) = weak.upgrade() else { return };
            let status = {
                let s = state.borrow();
                debug(|| format!("ICE {:?}", s.pc.ice_connection_state()));
                match s.pc.ice_connection_state() {
                    RtcIceConnectionState::Connected | RtcIceConnectionState::Completed => {
                        IceStatus::Connected
                    }
                    RtcIceConnectionState::Disconnected => IceStatus::Disconnected,
                    RtcIceConnectionState::Failed => {
                        // Both sides restart; perfect negotiation handles crossing offers.
                        ext(&s.pc).restart_ice();
                        IceStatus::Failed
                    }
                    _ => IceStatus::Checking,
                }
            };
            report(&weak, RtcEvent::Ice(status));
        })
    };
    let mut s = state.borrow_mut();
    s.pc.set_onnegotiationneeded(Some(negotiation_needed.as_ref().unchecked_ref()));
    s.pc.set_onicecandidate(Some(ice_candidate.as_ref().unchecked_ref()));
    s.pc.set_oniceconnectionstatechange(Some(ice_state.as_ref().unchecked_ref()));
    s.handlers = Some(Handlers {
        _negotiation_needed: negotiation_needed,
        _ice_candidate: ice_candidate,
        _ice_state: ice_state,
    });
}

/// Creates the two negotiated channels (once).
fn open_channels(state: &Rc<RefCell<RtcState>>) {
    if state.borrow().channels.is_some() || state.borrow().closed {
        return;
    }
    let weak = Rc::downgrade(state);
    let control_open = {
        let weak = weak.clone();
        Closure::<dyn FnMut()>::new(move || {
            let Some(state) = weak.upgrade() else { return };
            debug(|| "control channel open".into());
            state.borrow_mut().flush();
            state.borrow_mut().open_pending = true;
            report_open_if_ready(&weak);
        })
    };
    let control_close = {
        let weak = weak.clone();
        Closure::<dyn FnMut()>::new(move || {
            debug(|| "control channel closed".into());
            if let Some(state) = weak.upgrade() {
                state.borrow_mut().open_pending = false;
            }
            report(&weak, RtcEvent::ControlClosed);
        })
    };
    let control_low = {
        let weak = weak.clone();
        Closure::<dyn FnMut()>::new(move || {
            if let Some(state) = weak.upgrade() {
                state.borrow_mut().flush();
            }
        })
    };
    let message = Closure::<dyn FnMut(MessageEvent)>::new(move |ev: MessageEvent| {
        let data = ev.data();
        if let Some(buf) = data.dyn_ref::<js_sys::ArrayBuffer>() {
            report(&weak, RtcEvent::Message(js_sys::Uint8Array::new(buf).to_vec()));
        }
    });

    let mut s = state.borrow_mut();
    let control = channel(&s.pc, Channel::Control);
    let data = channel(&s.pc, Channel::Data);
    control.set_buffered_amount_low_threshold(CONTROL_LOW_WATER);
    control.set_onopen(Some(control_open.as_ref().unchecked_ref()));
    control.set_onclose(Some(control_close.as_ref().unchecked_ref()));
    control.set_onbufferedamountlow(Some(control_low.as_ref().unchecked_ref()));
    control.set_onmessage(Some(message.as_ref().unchecked_ref()));
    data.set_onmessage(Some(message.as_ref().unchecked_ref()));
    s.channels = Some(Channels {
        control,
        data,
        _control_open: control_open,
        _control_close: control_close,
        _control_low: control_low,
        _message: message,
    });
}

/// Reports [`RtcEvent::ControlOpen`] if the channel opened and both descriptions are set.
fn report_open_if_ready(weak: &Weak<RefCell<RtcState>>) {
    let Some(state) = weak.upgrade() else { return };
    let sdps = {
        let mut s = state.borrow_mut();
        if !s.open_pending {
            return;
        }
        let local = s.pc.local_description().map(|d| d.sdp());
        let remote = s.pc.remote_description().map(|d| d.sdp());
        let both = local.zip(remote);
        if both.is_some() {
            s.open_pending = false;
        } else {
            debug(|| "control channel open before the remote description: waiting".into());
        }
        both
    };
    if let Some((local_sdp, remote_sdp)) = sdps {
        report(weak, RtcEvent::ControlOpen { local_sdp, remote_sdp });
    }
}

fn live_pc(weak: &Weak<RefCell<RtcState>>) -> Option<RtcPeerConnection> {
    let state = weak.upgrade()?;
    let s = state.borrow();
    (!s.closed).then(|| s.pc.clone())
}

fn with_state(weak: &Weak<RefCell<RtcState>>, f: impl FnOnce(&mut RtcState)) {
    if let Some(state) = weak.upgrade() {
        f(&mut state.borrow_mut());
    }
}

/// Sends the current local description (offer or answer) to the remote peer.
fn send_local_description(weak: &Weak<RefCell<RtcState>>, pc: &RtcPeerConnection) {
    let Some(desc) = pc.local_description() else { return };
    let sdp = desc.sdp();
    let payload = match desc.type_() {
        RtcSdpType::Offer => SignalPayload::Offer { sdp },
        RtcSdpType::Answer => SignalPayload::Answer { sdp },
        _ => return,
    };
    report(weak, RtcEvent::Signal(payload));
}

/// `negotiationneeded`: offer with an implicit `setLocalDescription()`.
async fn make_offer(weak: Weak<RefCell<RtcState>>) {
    let Some(pc) = live_pc(&weak) else { return };
    with_state(&weak, |s| s.making_offer = true);
    let result = JsFuture::from(ext(&pc).set_local_description_implicit()).await;
    with_state(&weak, |s| s.making_offer = false);
    debug(|| format!("made offer: {:?}, now {:?}", result.is_ok(), pc.signaling_state()));
    report_open_if_ready(&weak);
    match result {
        Ok(_) => send_local_description(&weak, &pc),
        Err(e) => web_sys::console::warn_2(&"weft: could not make an offer".into(), &e),
    }
}

fn candidate_init(payload: &SignalPayload) -> Option<RtcIceCandidateInit> {
    let SignalPayload::Candidate { candidate, sdp_mid, sdp_m_line_index, username_fragment } =
        payload
    else {
        return None;
    };
    let init = RtcIceCandidateInit::new(candidate);
    init.set_sdp_mid(sdp_mid.as_deref());
    init.set_sdp_m_line_index(*sdp_m_line_index);
    if let Some(ufrag) = username_fragment {
        let _ = js_sys::Reflect::set(&init, &"usernameFragment".into(), &ufrag.into());
    }
    Some(init)
}

/// Applies queued remote payloads one at a time, in arrival order.
async fn process_inbox(weak: Weak<RefCell<RtcState>>) {
    loop {
        let next = {
            let Some(state) = weak.upgrade() else { return };
            let mut s = state.borrow_mut();
            if s.closed {
                s.inbox_busy = false;
                return;
            }
            match s.inbox.pop_front() {
                Some(p) => Some((p, s.pc.clone())),
                None => {
                    s.inbox_busy = false;
                    None
                }
            }
        };
        let Some((payload, pc)) = next else { return };
        match payload {
            SignalPayload::Offer { .. } | SignalPayload::Answer { .. } => {
                apply_description(&weak, &pc, payload).await;
            }
            SignalPayload::Candidate { .. } => apply_candidate(&weak, &pc, &payload).await,
            SignalPayload::Opaque { .. } => {}
        }
    }
}

async fn apply_description(
    weak: &Weak<RefCell<RtcState>>,
    pc: &RtcPeerConnection,
    payload: SignalPayload,
) {
    let (sdp, is_offer) = match &payload {
        SignalPayload::Offer { sdp } => (sdp.as_str(), true),
        SignalPayload::Answer { sdp } => (sdp.as_str(), false),
        _ => return,
    };
    // A different DTLS fingerprint means the remote made a new connection.
    let current = pc.remote_description().map(|d| d.sdp());
    if let Some(current) = current {
        if is_offer && dtls_fingerprint(&current) != dtls_fingerprint(sdp) {
            report(weak, RtcEvent::RemoteRestarted(payload));
            return;
        }
    }
    let Some(state) = weak.upgrade() else { return };
    let ignore = {
        let mut s = state.borrow_mut();
        let collision =
            is_offer && (s.making_offer || pc.signaling_state() != RtcSignalingState::Stable);
        s.ignore_offer = !s.polite && collision;
        debug(|| {
            format!(
                "remote {}: polite {}, making offer {}, state {:?}, collision {collision}",
                if is_offer { "offer" } else { "answer" },
                s.polite,
                s.making_offer,
                pc.signaling_state()
            )
        });
        s.ignore_offer
    };
    drop(state);
    if ignore {
        return;
    }
    if !is_offer && pc.signaling_state() != RtcSignalingState::HaveLocalOffer {
        // An answer to an offer we rolled back: nothing to apply it to.
        return;
    }
    let desc = RtcSessionDescriptionInit::new(if is_offer {
        RtcSdpType::Offer
    } else {
        RtcSdpType::Answer
    });
    desc.set_sdp(sdp);
    if let Err(e) = JsFuture::from(pc.set_remote_description(&desc)).await {
        web_sys::console::warn_2(&"weft: could not apply the remote description".into(), &e);
        return;
    }
    debug(|| format!("applied remote description, now {:?}", pc.signaling_state()));
    report_open_if_ready(weak);
    let pending = match weak.upgrade() {
        Some(state) => std::mem::take(&mut state.borrow_mut().pending_candidates),
        None => return,
    };
    debug(|| format!("adding {} early candidates", pending.len()));
    for init in pending {
        // Candidates of an earlier description may no longer apply; that is fine.
        let _ =
            JsFuture::from(pc.add_ice_candidate_with_opt_rtc_ice_candidate_init(Some(&init))).await;
    }
    if is_offer {
        if let Some(state) = weak.upgrade() {
            open_channels(&state);
        }
        let answer = JsFuture::from(ext(pc).set_local_description_implicit()).await;
        debug(|| format!("answered: {:?}, now {:?}", answer.is_ok(), pc.signaling_state()));
        report_open_if_ready(weak);
        match answer {
            Ok(_) => send_local_description(weak, pc),
            Err(e) => web_sys::console::warn_2(&"weft: could not answer".into(), &e),
        }
    }
}

async fn apply_candidate(
    weak: &Weak<RefCell<RtcState>>,
    pc: &RtcPeerConnection,
    payload: &SignalPayload,
) {
    let Some(init) = candidate_init(payload) else { return };
    if pc.remote_description().is_none() {
        debug(|| format!("candidate before remote description: {}", init.get_candidate()));
        with_state(weak, |s| {
            if !s.ignore_offer && LIMITS.admits_candidate(s.pending_candidates.len()) {
                s.pending_candidates.push(init);
            }
        });
        return;
    }
    debug(|| format!("remote candidate {:?}", init.get_candidate()));
    if let Err(e) =
        JsFuture::from(pc.add_ice_candidate_with_opt_rtc_ice_candidate_init(Some(&init))).await
    {
        let ignoring = weak.upgrade().is_some_and(|s| s.borrow().ignore_offer);
        debug(|| format!("candidate refused (ignoring offer: {ignoring}): {e:?}"));
        let end_of_candidates = init.get_candidate().is_empty();
        if !ignoring && !end_of_candidates {
            web_sys::console::warn_2(&"weft: could not add an ICE candidate".into(), &e);
        }
    }
}

/// The selected candidate pair's kind and RTT, from `getStats()`.
pub(crate) async fn path_stats(pc: &RtcPeerConnection) -> Option<PathStats> {
    if pc.signaling_state() == RtcSignalingState::Closed {
        return None;
    }
    let report = JsFuture::from(pc.get_stats()).await.ok()?;
    selected_path(&report)
}

fn get(obj: &JsValue, key: &str) -> JsValue {
    js_sys::Reflect::get(obj, &key.into()).unwrap_or(JsValue::UNDEFINED)
}

fn get_str(obj: &JsValue, key: &str) -> Option<String> {
    get(obj, key).as_string()
}

/// Finds the selected candidate pair in an `RTCStatsReport` (via the transport's
/// `selectedCandidatePairId`, or a nominated succeeded pair) and reads its candidate types
/// and `currentRoundTripTime`.
fn selected_path(report: &JsValue) -> Option<PathStats> {
    let mut stats = Vec::new();
    for entry in js_sys::try_iter(report).ok()??.flatten() {
        // Iterating a maplike yields [key, value] pairs.
        stats.push(js_sys::Reflect::get_u32(&entry, 1).ok()?);
    }
    let by_id = |id: &str| stats.iter().find(|s| get_str(s, "id").as_deref() == Some(id));
    let selected_id = stats
        .iter()
        .filter(|s| get_str(s, "type").as_deref() == Some("transport"))
        .find_map(|s| get_str(s, "selectedCandidatePairId"));
    let pair = match selected_id {
        Some(id) => by_id(&id)?,
        None => stats.iter().find(|s| {
            get_str(s, "type").as_deref() == Some("candidate-pair")
                && get_str(s, "state").as_deref() == Some("succeeded")
                && get(s, "nominated").as_bool() == Some(true)
        })?,
    };
    let candidate = |key: &str| get_str(pair, key).and_then(|id| by_id(&id));
    let is_relay = |c: &JsValue| get_str(c, "candidateType").as_deref() == Some("relay");
    let local = candidate("localCandidateId");
    let local_relay = local.is_some_and(is_relay);
    let relayed = local_relay || candidate("remoteCandidateId").is_some_and(is_relay);
    let relay_transport = local
        .filter(|_| local_relay)
        .and_then(|c| get_str(c, "relayProtocol"))
        .and_then(|p| RelayTransport::from_name(&p));
    let rtt = get(pair, "currentRoundTripTime")
        .as_f64()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64);
    Some(PathStats { relayed, relay_transport, rtt })
}
