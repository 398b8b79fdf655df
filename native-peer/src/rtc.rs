//! One webrtc-rs peer connection to one remote peer, as the browser's `wasm/src/rtc.rs`
//! makes it: two negotiated channels (id 0 `control`, reliable and ordered; id 1 `data`,
//! unordered with no retransmits), the impolite side offering first, trickle ICE.
//!
//! This module knows WebRTC and nothing of Weft's protocol. Each connection runs in its
//! own task, which applies signaling payloads and sends in order, and reports the node's
//! [`ConnectionEvent`]s to the sink the mesh gives it. See `WEBRTC_RS.md` for the
//! webrtc-rs facts this relies on.
//!
//! - **Negotiation.** The impolite side creates the channels and offers at once. The
//!   polite side creates them when the offer comes (before answering), or offers itself
//!   after [`POLITE_OFFER_WAIT`] without one. On crossing offers the impolite side ignores
//!   the remote one; the polite side asks the node for a fresh connection to answer it
//!   ([`ConnectionEvent::RemoteRestarted`]): nothing is established yet, so nothing is
//!   lost.
//! - **A new DTLS fingerprint** in a remote offer means the peer made a new connection:
//!   reported as [`ConnectionEvent::RemoteRestarted`] too.
//! - **Trickle ICE.** Local candidates go out as they are gathered (with the `a=mid` of the
//!   local description), then an empty candidate at the end; remote ones that come before
//!   a remote description wait for it.
//! - **Failure.** When the connection fails or closes, [`ConnectionEvent::Closed`] says so;
//!   the node replaces it (the impolite side's new offer carries a new fingerprint, which the
//!   browser answers with a new connection too).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::peer_connection::configuration::setting_engine::SctpMaxMessageSize;
use tokio::sync::{mpsc, oneshot};
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidateInit, RTCIceCandidateType, RTCIceGatheringState, RTCIceServer,
    RTCIceTransportPolicy, RTCPeerConnectionIceEvent, RTCPeerConnectionState,
    RTCSessionDescription, RTCStatsReportEntry, RawDatagramHandler, RawPath, SettingEngineBuilder,
    StatsSelector,
};
use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, JoinHandle, Runtime,
    TokioRuntime,
};
use weft_core::node::{
    Channel, ConnectionEvent, ConnectionLimits, IceState, POLITE_OFFER_WAIT, RelayTransport,
};
use weft_core::sdp::dtls_fingerprint;
use weft_core::signal::{IceServer, SignalPayload};
use weft_core::transport::FAST_PATH_PACKET_TYPE;

/// Largest data-channel message, as Chromium allows.
const MAX_MESSAGE_SIZE: u32 = 262_144;
/// SCTP's common header and one DATA chunk's header.
const SCTP_HEADERS: usize = 12 + 16;
/// Largest SCTP packet we send: one IP packet from a TUN of the default MTU (1280), in a
/// `Data` frame, sealed, travels as one SCTP packet, not two. webrtc-rs's default (1191)
/// would split each such message in two: twice the packets, and losing either loses the
/// message on the unreliable channel. On the wire that is this + 37 bytes of DTLS + 8 of
/// UDP + 40 of IPv6 (+ 4 of TURN ChannelData): 1433 bytes, within every Ethernet path.
pub(crate) const SCTP_MTU: u32 = {
    let packet = crate::tun::DEFAULT_MTU as usize
        + weft_core::frame::FRAME_HEADER_LEN
        + weft_core::transport::PACKET_OVERHEAD
        + SCTP_HEADERS;
    // webrtc-rs rounds the chunk budget down to a multiple of 4.
    packet.next_multiple_of(4) as u32
};
/// When to drop an IP packet, refuse a control message or drop a candidate: the core's.
const LIMITS: ConnectionLimits = ConnectionLimits::DEFAULT;
/// Time between two rounds of ICE connectivity checks: webrtc-rs's 200 ms made every
/// step of connection setup wait for the next round (Chromium paces checks at about 50).
const ICE_CHECK_INTERVAL: Duration = Duration::from_millis(50);
/// Unanswered checks before a candidate pair counts as failed: 2 s at that pace, as
/// webrtc-rs's 7 at 200 ms gave 1.4 s.
const ICE_MAX_CHECKS: u16 = 40;
/// How long after ICE starts a working pair through a NAT (server or peer reflexive) may be
/// chosen: host pairs on the same network answer first if there are any. webrtc-rs waits
/// 500 ms and 1 s.
const ICE_DIRECT_MIN_WAIT: Duration = Duration::from_millis(100);
/// How long after ICE starts a working pair through a TURN relay may be chosen. webrtc-rs
/// waits 2 s. Weft's first choice need not be final: the vendored ICE agent
/// (`vendor/rtc-ice`, "Renomination") keeps checking the pairs that rank above the selected
/// one and moves the session to a direct pair that answers later, as Chromium does. So a
/// relay waits no longer than a pair through a NAT: a peer whose only path is the relay
/// connects about 100 ms after ICE starts instead of 400. (Session 9 went back to 400 ms
/// after one relayed-then-moved transfer went silent in `cargo xtask bench relay`; its cause
/// was found later: a relay met through checks ranked as peer reflexive, above the direct
/// pair, and the session was moved onto it. `vendor/rtc-ice/WEFT-PATCH.md`.)
const ICE_RELAY_MIN_WAIT: Duration = Duration::from_millis(100);
/// webrtc-rs's default largest message (64 KiB), for [`Tuning::UNTUNED`].
const DEFAULT_MAX_MESSAGE_SIZE: u32 = 65_536;
/// How often the selected path (direct or relayed, RTT) is read.
const STATS_INTERVAL: Duration = Duration::from_secs(2);
/// How long [`RtcPeer::flush`] waits for the peer to acknowledge everything.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// How connections are made.
#[derive(Debug, Clone)]
pub struct RtcConfig {
    /// STUN and TURN servers.
    pub ice_servers: Vec<IceServer>,
    /// Only relayed (TURN) candidates.
    pub relay_only: bool,
    /// Whom to trust over TLS (the signaling server, TURN over TLS); `None`: the usual
    /// root certificates.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The address to bind the UDP socket to; unspecified binds every non-loopback
    /// interface (Chromium has no loopback candidates, so loopback only reaches other
    /// native peers).
    pub bind: IpAddr,
    /// How webrtc-rs is set up.
    pub tuning: Tuning,
    /// The firewall mark (`SO_MARK`) of every UDP socket webrtc-rs opens: `up --tun`'s
    /// policy rules keep packets with it on the underlay (`netconf.rs`). Linux only.
    pub mark: Option<u32>,
}

impl Default for RtcConfig {
    fn default() -> Self {
        Self {
            ice_servers: Vec::new(),
            relay_only: false,
            tls: None,
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            tuning: Tuning::WEFT,
            mark: None,
        }
    }
}

/// webrtc-rs's throughput settings: Weft's ([`Tuning::WEFT`]) or webrtc-rs's defaults
/// ([`Tuning::UNTUNED`], the baseline of `bench native`). What each did is measured in
/// `WEBRTC_RS.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Threads in webrtc-rs's dedicated reactor pool, which runs connection drivers on
    /// threads of their own instead of tokio's workers; 0 = no pool. The pool is
    /// process-wide and sized by the first connection that asks for it.
    pub reactor_threads: usize,
    /// UDP send and receive buffers asked of the kernel (see [`enlarge_buffers`]); `None` =
    /// the kernel's default.
    pub udp_buffers: Option<usize>,
    /// The largest data-channel message we advertise.
    pub max_message_size: u32,
    /// The largest SCTP packet we send ([`SCTP_MTU`]); `None` = webrtc-rs's 1191.
    pub sctp_mtu: Option<u32>,
}

impl Tuning {
    /// Weft's settings.
    pub const WEFT: Self = Self {
        reactor_threads: 1,
        udp_buffers: Some(4 << 20),
        max_message_size: MAX_MESSAGE_SIZE,
        sctp_mtu: Some(SCTP_MTU),
    };
    /// Weft's settings for `up --tun`: no dedicated reactor. The connection drivers run on
    /// tokio's workers, beside the mesh task, so a fast-path datagram reaches the node on
    /// the thread that read it; with the reactor, each one had to wake a tokio worker from
    /// the reactor's thread (an `eventfd` write, a wake-up and a context switch per packet
    /// in), the largest share of the ping gap to userspace WireGuard (`core/ROUTING.md`,
    /// "Ping"). A transfer's SCTP pipeline keeps the reactor ([`Tuning::WEFT`]).
    pub const TUN: Self = Self { reactor_threads: 0, ..Self::WEFT };
    /// webrtc-rs's defaults.
    pub const UNTUNED: Self = Self {
        reactor_threads: 0,
        udp_buffers: None,
        max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        sctp_mtu: None,
    };
}

enum Command {
    Signal(SignalPayload),
    SendControl(Vec<u8>),
    SendData(Vec<u8>),
    Flush(oneshot::Sender<bool>),
    ReadPath,
    RestartIce(Vec<IceServer>),
    Close(oneshot::Sender<()>),
}

/// Events from webrtc-rs callbacks and channel pollers, handled in the connection's task.
enum Internal {
    Candidate(RTCIceCandidateInit),
    GatheringComplete,
    State(RTCPeerConnectionState),
    Open(usize),
    Message(Vec<u8>),
    ChannelClosed(usize),
}

type Sink = Arc<dyn Fn(ConnectionEvent) + Send + Sync>;

/// The fast path's datagrams (first byte [`FAST_PATH_PACKET_TYPE`]) read on the
/// connection's socket, and the selected pair it can send them on, reported to the node
/// straight from webrtc-rs's driver (`vendor/webrtc`, `raw_path.rs`): one hop to the mesh
/// task instead of the data channel's three.
struct FastPathReports {
    sink: Sink,
    /// Pairs seen so far: each new one gets the next number.
    pairs: AtomicU64,
}

impl RawDatagramHandler for FastPathReports {
    fn on_datagram(&self, datagram: &[u8], _local: SocketAddr, _remote: SocketAddr) {
        // Opened (and authenticated) by the node, whatever its source address.
        (self.sink)(ConnectionEvent::Received(datagram.to_vec()));
    }

    fn on_path(&self, path: Option<(SocketAddr, SocketAddr)>) {
        tracing::debug!(?path, "fast path pair");
        let pair = path.map(|_| self.pairs.fetch_add(1, Ordering::Relaxed) + 1);
        (self.sink)(ConnectionEvent::FastPath { pair });
    }
}

/// A connection to one remote peer, run by its own task. Dropping it closes the
/// connection.
pub struct RtcPeer {
    commands: mpsc::UnboundedSender<Command>,
    /// Where fast-path datagrams go out (sent from the caller's task, no hop).
    fast_path: RawPath,
}

impl std::fmt::Debug for RtcPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtcPeer").finish_non_exhaustive()
    }
}

impl RtcPeer {
    /// Starts a connection; `polite` is our role in perfect negotiation. Events go to
    /// `sink`, from the connection's task.
    pub fn spawn(
        config: Arc<RtcConfig>,
        polite: bool,
        sink: impl Fn(ConnectionEvent) + Send + Sync + 'static,
    ) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let sink: Sink = Arc::new(sink);
        let reports = FastPathReports { sink: sink.clone(), pairs: AtomicU64::new(0) };
        let fast_path =
            RawPath::new(FAST_PATH_PACKET_TYPE..=FAST_PATH_PACKET_TYPE, Arc::new(reports));
        tokio::spawn(run(config, polite, sink, rx, fast_path.clone()));
        Self { commands, fast_path }
    }

    /// Sends sealed fast-path packets, each as one UDP datagram on the selected ICE pair,
    /// from the caller's task (runs of one size as one UDP GSO `sendmsg`); dropped (as UDP
    /// may) if there is no such pair or the socket's buffer is full.
    pub fn send_fast_batch<'a>(&self, packets: impl Iterator<Item = &'a [u8]>) {
        let packets: Vec<&[u8]> = packets.collect();
        let sent = self.fast_path.try_send_batch(&packets);
        if sent < packets.len() {
            tracing::trace!("{} fast-path datagrams dropped", packets.len() - sent);
        }
    }

    /// Takes a payload the remote peer sent.
    pub fn handle_signal(&self, payload: SignalPayload) {
        let _ = self.commands.send(Command::Signal(payload));
    }

    /// Sends on the control channel (queued until it opens).
    pub fn send_control(&self, bytes: Vec<u8>) {
        let _ = self.commands.send(Command::SendControl(bytes));
    }

    /// Sends on the data channel if it is open (dropped otherwise: it is unreliable).
    pub fn send_data(&self, bytes: Vec<u8>) {
        let _ = self.commands.send(Command::SendData(bytes));
    }

    /// Reads the selected path now (it is also read every [`STATS_INTERVAL`]) and reports
    /// it as [`ConnectionEvent::Path`].
    pub fn read_path(&self) {
        let _ = self.commands.send(Command::ReadPath);
    }

    /// Looks for a better path without dropping this one: takes `ice_servers` (fresh
    /// credentials) and restarts ICE with a new offer (the impolite side's job).
    pub fn restart_ice(&self, ice_servers: Vec<IceServer>) {
        let _ = self.commands.send(Command::RestartIce(ice_servers));
    }

    /// Resolves to `true` once the peer acknowledged everything sent on the control
    /// channel before this call; `false` if the channel is not open or it took too long.
    pub fn flush(&self) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Flush(tx));
        rx
    }

    /// Closes the connection; resolves once it is closed.
    pub fn close(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Close(tx));
        rx
    }
}

struct Handler {
    tx: mpsc::UnboundedSender<Internal>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            let _ = self.tx.send(Internal::Candidate(init));
        }
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.tx.send(Internal::GatheringComplete);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.tx.send(Internal::State(state));
    }
}

async fn build(
    config: &RtcConfig,
    handler: Arc<Handler>,
    fast_path: RawPath,
) -> Result<Arc<dyn PeerConnection>, webrtc::error::Error> {
    build_with(config, handler, None, Some(fast_path)).await
}

/// A connection made as Weft's are (bind address, ICE servers, no mDNS, Chromium's
/// largest message), with `handler`; `send_buffer_limit` makes `send` wait while that
/// many bytes are unacknowledged; `fast_path` takes the fast path's datagrams.
pub(crate) async fn build_with(
    config: &RtcConfig,
    handler: Arc<dyn PeerConnectionEventHandler>,
    send_buffer_limit: Option<usize>,
    fast_path: Option<RawPath>,
) -> Result<Arc<dyn PeerConnection>, webrtc::error::Error> {
    let tuning = config.tuning;
    let mut settings = SettingEngineBuilder::new()
        .with_sctp_max_message_size(SctpMaxMessageSize::Bounded(tuning.max_message_size))
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .with_ice_connection_attempts(Some(ICE_CHECK_INTERVAL), Some(ICE_MAX_CHECKS))
        .with_srflx_acceptance_min_wait(Some(ICE_DIRECT_MIN_WAIT))
        .with_prflx_acceptance_min_wait(Some(ICE_DIRECT_MIN_WAIT))
        .with_relay_acceptance_min_wait(Some(ICE_RELAY_MIN_WAIT));
    if let Some(mtu) = tuning.sctp_mtu {
        settings = settings.with_sctp_mtu(mtu);
    }
    let settings = settings.build();
    let mut rtc_config =
        RTCConfigurationBuilder::new().with_ice_servers(rtc_ice_servers(&config.ice_servers));
    if config.relay_only {
        rtc_config = rtc_config.with_ice_transport_policy(RTCIceTransportPolicy::Relay);
    }
    let mut builder = PeerConnectionBuilder::new()
        .with_configuration(rtc_config.build())
        .with_setting_engine(settings)
        .with_handler(handler)
        .with_udp_addrs(vec![SocketAddr::new(config.bind, 0)])
        .with_dedicated_reactor_pool_size(tuning.reactor_threads);
    if tuning.udp_buffers.is_some() || config.mark.is_some() {
        let runtime = RoomyUdp { bytes: tuning.udp_buffers, mark: config.mark };
        builder = builder.with_runtime(Arc::new(runtime));
    }
    if let Some(limit) = send_buffer_limit {
        builder = builder.with_data_channel_send_buffer_limit(limit);
    }
    if let Some(tls) = &config.tls {
        builder = builder.with_turn_tls_config(tls.clone());
    }
    if let Some(path) = fast_path {
        builder = builder.with_raw_path(path);
    }
    let pc = builder.build().await?;
    Ok(Arc::new(pc))
}

/// The core's STUN/TURN servers as webrtc-rs takes them.
fn rtc_ice_servers(servers: &[IceServer]) -> Vec<RTCIceServer> {
    servers
        .iter()
        .map(|s| RTCIceServer {
            urls: s.urls.clone(),
            username: s.username.clone().unwrap_or_default(),
            credential: s.credential.clone().unwrap_or_default(),
        })
        .collect()
}

/// tokio, as webrtc-rs runs on it by default, except that UDP sockets ask the kernel for
/// `bytes` of send and receive buffer (a burst of SCTP packets then waits in the socket
/// instead of being dropped: each loss costs a retransmission), and carry `mark`.
#[derive(Debug)]
struct RoomyUdp {
    bytes: Option<usize>,
    mark: Option<u32>,
}

impl Runtime for RoomyUdp {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        TokioRuntime.spawn(future)
    }

    fn spawn_reactor(
        &self,
        pool_size: usize,
        future: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Box<dyn JoinHandle> {
        TokioRuntime.spawn_reactor(pool_size, future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        if let Some(bytes) = self.bytes {
            enlarge_buffers(&socket, bytes);
        }
        if let Some(mark) = self.mark {
            set_mark(&socket, mark)?;
        }
        TokioRuntime.wrap_udp_socket(socket)
    }

    fn wrap_tcp_listener(
        &self,
        listener: std::net::TcpListener,
    ) -> io::Result<Arc<dyn AsyncTcpListener>> {
        TokioRuntime.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        remote: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        TokioRuntime.connect_tcp(remote)
    }

    fn resolve_host<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        TokioRuntime.resolve_host(host)
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        TokioRuntime.sleep(duration)
    }

    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        TokioRuntime.interval(period)
    }

    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        TokioRuntime.block_on(future);
    }

    fn yield_now(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        TokioRuntime.yield_now()
    }

    fn name(&self) -> &'static str {
        TokioRuntime.name()
    }
}

/// Asks for `bytes` of send and receive buffer on `socket`: past `net.core.rmem_max` /
/// `wmem_max` where we may (Linux, as root: `SO_RCVBUFFORCE`, as wireguard-go does), else
/// up to them. Warns once per process if the kernel gave less (the transfer then loses
/// datagrams in bursts and crawls; see `WEBRTC_RS.md`).
fn enlarge_buffers(socket: &std::net::UdpSocket, bytes: usize) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let s = socket2::SockRef::from(socket);
    #[cfg(target_os = "linux")]
    let forced = {
        use nix::sys::socket::{setsockopt, sockopt};
        setsockopt(socket, sockopt::RcvBufForce, &bytes)
            .and_then(|()| setsockopt(socket, sockopt::SndBufForce, &bytes))
            .is_ok()
    };
    #[cfg(not(target_os = "linux"))]
    let forced = false;
    if !forced {
        if let Err(e) = s.set_recv_buffer_size(bytes).and_then(|()| s.set_send_buffer_size(bytes)) {
            tracing::debug!("cannot enlarge a UDP socket's buffers: {e}");
        }
    }
    let granted = s.recv_buffer_size().unwrap_or(0);
    // Linux reports twice what it granted (room for its bookkeeping).
    #[cfg(target_os = "linux")]
    let granted = granted / 2;
    if granted < bytes {
        WARNED.call_once(|| {
            tracing::warn!(
                "the UDP receive buffer is {granted} bytes, not the {bytes} asked for: \
                 transfers will be slower (raise net.core.rmem_max and net.core.wmem_max, \
                 or run as root)"
            );
        });
    }
}

/// Marks `socket`'s packets with `mark` (`SO_MARK`, which needs `CAP_NET_ADMIN`): before
/// any is sent, as webrtc-rs hands each socket here right after binding it.
#[cfg(target_os = "linux")]
fn set_mark(socket: &std::net::UdpSocket, mark: u32) -> io::Result<()> {
    socket2::SockRef::from(socket).set_mark(mark)
}

/// Policy routing by mark is Linux's; elsewhere nothing asks for a mark.
#[cfg(not(target_os = "linux"))]
fn set_mark(_socket: &std::net::UdpSocket, _mark: u32) -> io::Result<()> {
    Ok(())
}

/// The `a=mid` of the first media section (candidates are sent with it, for Chromium).
fn first_mid(sdp: &str) -> Option<String> {
    sdp.lines().find_map(|l| l.trim().strip_prefix("a=mid:").map(str::to_owned))
}

/// The connection's state, owned by its task.
struct Conn {
    pc: Arc<dyn PeerConnection>,
    polite: bool,
    sink: Sink,
    internal: mpsc::UnboundedSender<Internal>,
    channels: Option<[Arc<dyn DataChannel>; 2]>,
    open: [bool; 2],
    outbox: VecDeque<Vec<u8>>,
    outbox_bytes: usize,
    /// Our offer awaits its answer.
    offer_pending: bool,
    /// The remote offer we ignored (crossing ours, impolite): drop its candidates.
    ignoring_offer: bool,
    remote_fingerprint: Option<String>,
    pending_candidates: Vec<RTCIceCandidateInit>,
    mid: Option<String>,
    closed: bool,
}

async fn run(
    config: Arc<RtcConfig>,
    polite: bool,
    sink: Sink,
    mut commands: mpsc::UnboundedReceiver<Command>,
    fast_path: RawPath,
) {
    let (internal, mut internal_rx) = mpsc::unbounded_channel();
    let handler = Arc::new(Handler { tx: internal.clone() });
    let pc = match build(&config, handler, fast_path).await {
        Ok(pc) => pc,
        Err(e) => {
            let reason = format!("cannot create a WebRTC connection: {e}");
            sink(ConnectionEvent::Closed { reason });
            return;
        }
    };
    let mut conn = Conn {
        pc,
        polite,
        sink,
        internal,
        channels: None,
        open: [false; 2],
        outbox: VecDeque::new(),
        outbox_bytes: 0,
        offer_pending: false,
        ignoring_offer: false,
        remote_fingerprint: None,
        pending_candidates: Vec::new(),
        mid: None,
        closed: false,
    };
    if !polite {
        conn.offer().await;
    }
    let polite_wait = tokio::time::sleep(POLITE_OFFER_WAIT);
    tokio::pin!(polite_wait);
    let mut stats = tokio::time::interval(STATS_INTERVAL);
    let mut close_reply = None;
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => break,
                Some(Command::Close(reply)) => {
                    close_reply = Some(reply);
                    break;
                }
                Some(command) => conn.command(command).await,
            },
            Some(event) = internal_rx.recv() => conn.internal(event).await,
            () = &mut polite_wait, if conn.channels.is_none() => {
                tracing::debug!("no offer came: making our own");
                conn.offer().await;
            }
            _ = stats.tick(), if conn.open[0] => {
                if let Some(path) = path_stats(conn.pc.as_ref()).await {
                    conn.emit(path);
                }
            }
        }
    }
    if let Some(channels) = &conn.channels {
        for dc in channels {
            let _ = dc.close().await;
        }
    }
    let _ = conn.pc.close().await;
    if let Some(reply) = close_reply {
        let _ = reply.send(());
    }
}

impl Conn {
    fn emit(&self, event: ConnectionEvent) {
        if !self.closed {
            (self.sink)(event);
        }
    }

    fn fail(&mut self, why: String) {
        if !self.closed {
            self.emit(ConnectionEvent::Closed { reason: why });
            self.closed = true;
        }
    }

    /// Creates the two negotiated channels (once) and polls them.
    async fn open_channels(&mut self) {
        if self.channels.is_some() {
            return;
        }
        let init = |which: Channel| RTCDataChannelInit {
            negotiated: Some(which.id()),
            ordered: which.reliable(),
            max_retransmits: (!which.reliable()).then_some(0),
            ..Default::default()
        };
        let made = async {
            let [c, d] = Channel::ALL;
            let control = self.pc.create_data_channel(c.label(), Some(init(c))).await?;
            let data = self.pc.create_data_channel(d.label(), Some(init(d))).await?;
            Ok::<_, webrtc::error::Error>([control, data])
        }
        .await;
        match made {
            Ok(channels) => {
                for (index, dc) in channels.iter().enumerate() {
                    tokio::spawn(poll_channel(index, dc.clone(), self.internal.clone()));
                }
                self.channels = Some(channels);
            }
            Err(e) => self.fail(format!("cannot create the data channels: {e}")),
        }
    }

    /// Makes and sends an offer.
    async fn offer(&mut self) {
        self.open_channels().await;
        let result = async {
            let offer = self.pc.create_offer(None).await?;
            self.pc.set_local_description(offer).await?;
            Ok::<_, webrtc::error::Error>(())
        }
        .await;
        match result {
            Ok(()) => {
                self.offer_pending = true;
                self.send_local_description(true).await;
            }
            Err(e) => self.fail(format!("cannot make an offer: {e}")),
        }
    }

    async fn send_local_description(&mut self, offer: bool) {
        let Some(desc) = self.pc.local_description().await else { return };
        self.mid = first_mid(&desc.sdp);
        let sdp = desc.sdp;
        let payload =
            if offer { SignalPayload::Offer { sdp } } else { SignalPayload::Answer { sdp } };
        self.emit(ConnectionEvent::LocalSignal(payload));
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Signal(payload) => self.signal(payload).await,
            Command::SendControl(bytes) => {
                if !LIMITS.admits_control(self.outbox_bytes, bytes.len()) {
                    tracing::warn!("control channel backlog full; dropped a message");
                    return;
                }
                self.outbox_bytes += bytes.len();
                self.outbox.push_back(bytes);
                self.flush_outbox().await;
            }
            Command::SendData(bytes) => {
                if let (true, Some(channels)) = (self.open[1], &self.channels) {
                    let queued = channels[1].outstanding_bytes().await.unwrap_or(0);
                    if LIMITS.admits_data(queued, bytes.len()) {
                        let _ = channels[1].send(BytesMut::from(Bytes::from(bytes))).await;
                    }
                }
            }
            Command::Flush(reply) => match (&self.channels, self.open[0] && self.outbox.is_empty())
            {
                (Some(channels), true) => {
                    tokio::spawn(wait_acknowledged(channels[0].clone(), reply));
                }
                _ => {
                    let _ = reply.send(false);
                }
            },
            Command::ReadPath => {
                if let Some(path) = path_stats(self.pc.as_ref()).await {
                    self.emit(path);
                }
            }
            Command::RestartIce(servers) => self.restart_ice(servers).await,
            Command::Close(_) => {}
        }
    }

    /// An ICE restart: new credentials and candidates, checked while the selected pair
    /// keeps carrying data; ICE moves to a better pair if it finds one.
    async fn restart_ice(&mut self, servers: Vec<IceServer>) {
        if self.offer_pending || self.remote_fingerprint.is_none() {
            // Still negotiating: the node asks again later if it is still relayed.
            return;
        }
        let policy = self.pc.get_configuration().await.ice_transport_policy();
        let configuration = RTCConfigurationBuilder::new()
            .with_ice_servers(rtc_ice_servers(&servers))
            .with_ice_transport_policy(policy)
            .build();
        if let Err(e) = self.pc.set_configuration(configuration).await {
            tracing::warn!("cannot take the new ICE servers: {e}");
        }
        if let Err(e) = self.pc.restart_ice().await {
            tracing::warn!("cannot restart ICE: {e}");
            return;
        }
        tracing::debug!("ICE restart: looking for a better path");
        self.offer().await;
    }

    async fn flush_outbox(&mut self) {
        let Some(control) = self.channels.as_ref().map(|c| c[0].clone()) else { return };
        if !self.open[0] {
            return;
        }
        while let Some(bytes) = self.outbox.pop_front() {
            self.outbox_bytes -= bytes.len();
            // `Bytes`, then `BytesMut`, take the `Vec`'s buffer: no copy.
            if let Err(e) = control.send(BytesMut::from(Bytes::from(bytes))).await {
                tracing::warn!("control channel send failed: {e}");
            }
        }
    }

    async fn signal(&mut self, payload: SignalPayload) {
        match payload {
            SignalPayload::Offer { sdp } => self.remote_offer(sdp).await,
            SignalPayload::Answer { sdp } => {
                if !self.offer_pending {
                    return;
                }
                match RTCSessionDescription::answer(sdp.clone()) {
                    Ok(answer) => match self.pc.set_remote_description(answer).await {
                        Ok(()) => {
                            self.offer_pending = false;
                            self.remote_fingerprint = dtls_fingerprint(&sdp).map(str::to_owned);
                            self.add_pending_candidates().await;
                        }
                        Err(e) => tracing::warn!("cannot apply the remote answer: {e}"),
                    },
                    Err(e) => tracing::warn!("bad remote answer: {e}"),
                }
            }
            SignalPayload::Candidate {
                candidate,
                sdp_mid,
                sdp_m_line_index,
                username_fragment,
            } => {
                if candidate.is_empty() {
                    return;
                }
                let init = RTCIceCandidateInit {
                    candidate,
                    sdp_mid,
                    sdp_mline_index: sdp_m_line_index,
                    username_fragment,
                    url: None,
                };
                if self.remote_fingerprint.is_none() {
                    if !self.ignoring_offer
                        && LIMITS.admits_candidate(self.pending_candidates.len())
                    {
                        self.pending_candidates.push(init);
                    }
                } else if let Err(e) = self.pc.add_ice_candidate(init).await {
                    tracing::debug!("remote candidate refused: {e}");
                }
            }
            SignalPayload::Opaque { .. } => {}
        }
    }

    async fn remote_offer(&mut self, sdp: String) {
        let fingerprint = dtls_fingerprint(&sdp).map(str::to_owned);
        if self.remote_fingerprint.is_some() && self.remote_fingerprint != fingerprint {
            self.emit(ConnectionEvent::RemoteRestarted(SignalPayload::Offer { sdp }));
            return;
        }
        if self.offer_pending {
            // Crossing offers.
            if self.polite {
                self.emit(ConnectionEvent::RemoteRestarted(SignalPayload::Offer { sdp }));
            } else {
                self.ignoring_offer = true;
            }
            return;
        }
        self.ignoring_offer = false;
        self.open_channels().await;
        let result = async {
            self.pc.set_remote_description(RTCSessionDescription::offer(sdp)?).await?;
            Ok::<_, webrtc::error::Error>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!("cannot apply the remote offer: {e}");
            return;
        }
        self.remote_fingerprint = fingerprint;
        self.add_pending_candidates().await;
        let answered = async {
            let answer = self.pc.create_answer(None).await?;
            self.pc.set_local_description(answer).await?;
            Ok::<_, webrtc::error::Error>(())
        }
        .await;
        match answered {
            Ok(()) => self.send_local_description(false).await,
            Err(e) => self.fail(format!("cannot answer: {e}")),
        }
    }

    async fn add_pending_candidates(&mut self) {
        for init in std::mem::take(&mut self.pending_candidates) {
            if let Err(e) = self.pc.add_ice_candidate(init).await {
                tracing::debug!("early remote candidate refused: {e}");
            }
        }
    }

    async fn internal(&mut self, event: Internal) {
        match event {
            Internal::Candidate(init) => {
                self.emit(ConnectionEvent::LocalSignal(SignalPayload::Candidate {
                    candidate: init.candidate,
                    sdp_mid: self.mid.clone().or(init.sdp_mid),
                    sdp_m_line_index: Some(0),
                    username_fragment: None,
                }));
            }
            Internal::GatheringComplete => {
                self.emit(ConnectionEvent::LocalSignal(SignalPayload::Candidate {
                    candidate: String::new(),
                    sdp_mid: None,
                    sdp_m_line_index: None,
                    username_fragment: None,
                }));
            }
            Internal::State(state) => {
                tracing::debug!("connection {state}");
                let ice = match state {
                    RTCPeerConnectionState::Connected => Some(IceState::Connected),
                    RTCPeerConnectionState::Disconnected => Some(IceState::Disconnected),
                    RTCPeerConnectionState::Failed => Some(IceState::Failed),
                    _ => None,
                };
                if let Some(ice) = ice {
                    self.emit(ConnectionEvent::Ice(ice));
                }
                if matches!(state, RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed)
                {
                    self.fail(format!("the WebRTC connection {state}"));
                }
            }
            Internal::Open(index) => {
                self.open[index] = true;
                if index == 0 {
                    let local = self.pc.local_description().await;
                    let remote = self.pc.remote_description().await;
                    let (Some(local), Some(remote)) = (local, remote) else {
                        self.fail("the control channel opened without descriptions".into());
                        return;
                    };
                    // The path first: the session it carries is reported with it.
                    if let Some(path) = path_stats(self.pc.as_ref()).await {
                        self.emit(path);
                    }
                    let (local_sdp, remote_sdp) = (local.sdp, remote.sdp);
                    self.emit(ConnectionEvent::ControlOpen { local_sdp, remote_sdp });
                    self.flush_outbox().await;
                }
            }
            Internal::Message(bytes) => self.emit(ConnectionEvent::Received(bytes)),
            Internal::ChannelClosed(index) => {
                self.open[index] = false;
                if index == 0 {
                    self.fail("the control channel closed".into());
                }
            }
        }
    }
}

/// Reads one channel until it closes, into the connection's task.
async fn poll_channel(
    index: usize,
    dc: Arc<dyn DataChannel>,
    internal: mpsc::UnboundedSender<Internal>,
) {
    while let Some(event) = dc.poll().await {
        let forward = match event {
            DataChannelEvent::OnOpen => Internal::Open(index),
            // The `Vec` takes the `BytesMut`'s buffer when it holds the only reference (at
            // most a move within it): no new buffer, no copy.
            DataChannelEvent::OnMessage(msg) => Internal::Message(Vec::from(msg.data)),
            DataChannelEvent::OnClose => break,
            _ => continue,
        };
        if internal.send(forward).is_err() {
            return;
        }
    }
    let _ = internal.send(Internal::ChannelClosed(index));
}

/// Answers `true` once SCTP has no unacknowledged bytes of `dc`.
async fn wait_acknowledged(dc: Arc<dyn DataChannel>, reply: oneshot::Sender<bool>) {
    let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
    let done = loop {
        match dc.outstanding_bytes().await {
            Ok(0) => break true,
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => break false,
        }
    };
    let _ = reply.send(done);
}

/// The selected candidate pair's kind and RTT, as [`ConnectionEvent::Path`].
async fn path_stats(pc: &dyn PeerConnection) -> Option<ConnectionEvent> {
    let ice = pc.sctp().await?.transport().ice_transport();
    let pair = ice.get_selected_candidate_pair().await.ok()??;
    // A remote relay candidate is often first met as peer-reflexive (its checks arrive
    // before its signaled description); the ICE agent retypes it once the description
    // comes (`vendor/rtc-ice/WEFT-PATCH.md`), and until then it is relayed all the same if
    // the remote peer signaled a relay candidate at that address.
    let remote = pair.remote();
    let signaled_relay = ice.get_remote_candidates().await.ok()?.iter().any(|c| {
        c.typ == RTCIceCandidateType::Relay && c.address == remote.address && c.port == remote.port
    });
    let relayed = pair.local().typ == RTCIceCandidateType::Relay
        || remote.typ == RTCIceCandidateType::Relay
        || signaled_relay;
    let report = pc.get_stats(Instant::now(), StatsSelector::None).await;
    let selected = report
        .transport()
        .and_then(|t| match report.get(&t.selected_candidate_pair_id) {
            Some(RTCStatsReportEntry::IceCandidatePair(p)) => Some(p),
            _ => None,
        })
        .or_else(|| report.candidate_pairs().find(|p| p.nominated));
    let rtt = selected
        .map(|p| p.current_round_trip_time)
        .filter(|rtt| rtt.is_finite() && *rtt > 0.0)
        .map(Duration::from_secs_f64);
    // Our relay candidate's stats carry the URL of the TURN server it came from, which says
    // how we reach that server (webrtc-rs leaves `relay_protocol` unset).
    let local = pair.local();
    let relay_transport = report
        .iter()
        .find_map(|entry| match entry {
            RTCStatsReportEntry::LocalCandidate(c)
                if local.typ == RTCIceCandidateType::Relay
                    && c.candidate_type == RTCIceCandidateType::Relay
                    && c.address.as_deref() == Some(local.address.as_str())
                    && c.port == local.port =>
            {
                Some(c.url.as_str())
            }
            _ => None,
        })
        .and_then(RelayTransport::of_turn_url);
    tracing::debug!(%pair, relayed, ?relay_transport, "selected path");
    Some(ConnectionEvent::Path { relayed, relay_transport, rtt })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_packet_from_the_tun_fits_one_sctp_packet() {
        let sealed = usize::from(crate::tun::DEFAULT_MTU)
            + weft_core::frame::FRAME_HEADER_LEN
            + weft_core::transport::PACKET_OVERHEAD;
        // webrtc-rs's budget for one DATA chunk's payload.
        let budget = (SCTP_MTU as usize - SCTP_HEADERS) / 4 * 4;
        assert!(sealed <= budget, "{sealed} > {budget}");
        // With TURN over IPv6 it still fits an Ethernet path.
        assert!(SCTP_MTU as usize + 37 + 8 + 40 + 4 <= 1500);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn udp_buffers_are_as_large_as_the_kernel_allows() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let bytes = 4 << 20;
        super::enlarge_buffers(&socket, bytes);
        let s = socket2::SockRef::from(&socket);
        // As root past net.core.rmem_max / wmem_max; else up to them.
        for (granted, max) in
            [(s.recv_buffer_size(), "rmem_max"), (s.send_buffer_size(), "wmem_max")]
        {
            let max: usize = std::fs::read_to_string(format!("/proc/sys/net/core/{max}"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert!(granted.unwrap() / 2 >= bytes.min(max));
        }
    }

    /// Every UDP socket webrtc-rs hands the runtime leaves it with the mark that keeps it
    /// on the underlay (`netconf.rs`); setting a mark needs `CAP_NET_ADMIN` (root).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn webrtc_sockets_carry_the_routing_mark() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let probe = socket.try_clone().unwrap();
        let runtime = RoomyUdp { bytes: None, mark: Some(crate::netconf::FWMARK) };
        match runtime.wrap_udp_socket(socket) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                eprintln!("SKIP: setting SO_MARK needs CAP_NET_ADMIN ({e})");
                return;
            }
            Err(e) => panic!("{e}"),
        }
        assert_eq!(socket2::SockRef::from(&probe).mark().unwrap(), crate::netconf::FWMARK);
    }
}
