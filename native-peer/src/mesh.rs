//! The mesh: one membership of a network's room on the signaling server, and one
//! [`RtcPeer`] + [`PeerLink`] per other member, as the browser's `wasm/src/session.rs`.
//!
//! One task owns everything (no locks): it takes signaling reports, connection events,
//! commands and the links' timers, feeds the core, and reports [`MeshEvent`]s. Protocol
//! decisions are the core's; this only moves bytes, time and randomness.
//!
//! Peer ids change when either side reconnects to the server. A peer whose id left the
//! room while its encrypted session still works (the server restarted, say) is kept as an
//! *orphan* until its connection closes or fails, or a new connection to the same key is
//! established; so sessions outlive the server.
//!
//! **File transfer lives here too**: the task owns the transfer engine ([`Files`]), tells
//! it which peers have a session, feeds it their transfer frames, sends what it asks, and
//! reports [`MeshEvent::File`]; its disk work runs on blocking threads and comes back as
//! [`IoDone`]. The `send` and `receive` commands only ask ([`MeshHandle::share`],
//! [`MeshHandle::offer`], [`MeshHandle::answer`]) and watch the events.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use weft_core::identity::{Fingerprint, IdentityKeyPair};
use weft_core::network::Network;
use weft_core::peer::{LinkEvent, LinkState, PeerLink, PeerLinkConfig, is_polite};
use weft_core::signal::{ClientMessage, ErrorCode, MembershipEvent, PeerId, SignalPayload};
use weft_core::transfer::{FileDigest, OfferItem, Root};
use weft_core::trust::{Trust, TrustStore};

use crate::files::{FileEvent, Files, FilesError, IoDone};
use crate::rtc::{PathStats, RtcConfig, RtcEvent, RtcPeer};
use crate::signaling::{self, Report, SignalingError};
use crate::store::Store;

/// Fresh connections made for one peer after its connection closed, before giving up
/// until it rejoins.
const MAX_RECONNECTS: u32 = 5;
/// How long a clean shutdown waits for Close frames to be acknowledged.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);

type Rng = getrandom::rand_core::UnwrapErr<getrandom::SysRng>;

/// What the mesh needs.
#[derive(Debug)]
pub struct MeshConfig {
    /// The signaling server's WebSocket URL.
    pub url: String,
    /// The network.
    pub network: Network,
    /// Our long-term key.
    pub identity: IdentityKeyPair,
    /// Our display name.
    pub own_name: String,
    /// How WebRTC connections are made.
    pub rtc: RtcConfig,
    /// Where the trust store is saved.
    pub store: Store,
    /// The network's trust store.
    pub trust: TrustStore,
    /// Where downloads are stored (and restored from); none: offers cannot be accepted.
    pub downloads: Option<PathBuf>,
}

/// A peer's connection, simplified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// WebRTC is connecting.
    Connecting,
    /// The handshake is running.
    Handshaking,
    /// Encrypted session over a direct path.
    Direct,
    /// Encrypted session through a TURN relay.
    Relayed,
    /// Failed; `reason` says why.
    Failed,
}

impl PeerState {
    /// Lowercase name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Handshaking => "handshaking",
            Self::Direct => "direct",
            Self::Relayed => "relayed",
            Self::Failed => "failed",
        }
    }
}

/// What we know of one peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerInfo {
    /// Its id on the signaling server.
    pub peer_id: PeerId,
    /// Where its connection is.
    pub state: PeerState,
    /// Why it failed.
    pub reason: Option<String>,
    /// Its display name, once said inside the session.
    pub name: Option<String>,
    /// Its key's fingerprint, once authenticated.
    pub fingerprint: Option<Fingerprint>,
    /// `new`, `known`, `verified` or `changed`.
    pub trust: Option<Trust>,
    /// Round-trip time (session pings, or ICE).
    pub rtt: Option<Duration>,
}

/// What the mesh reports.
#[derive(Debug, Clone)]
pub enum MeshEvent {
    /// Connecting to the signaling server.
    Connecting {
        /// Attempt number, from 1.
        attempt: u32,
    },
    /// The signaling connection failed or dropped; sessions go on.
    Disconnected {
        /// Why.
        reason: String,
        /// When we try again.
        retry_in: Duration,
    },
    /// Joined (again) under `peer_id`, with these other members.
    Joined {
        /// Our id.
        peer_id: PeerId,
        /// The others.
        peers: Vec<PeerId>,
    },
    /// A member joined.
    PeerJoined(PeerId),
    /// A member left (or its id went away with a server restart).
    PeerLeft(PeerId),
    /// An encrypted session is up and the peer said its name.
    PeerConnected(PeerInfo),
    /// A peer's key differs from the one pinned for its name: warn loudly.
    KeyChanged(PeerInfo),
    /// A peer's link failed.
    PeerFailed(PeerInfo),
    /// A chat message.
    Message {
        /// From whom.
        peer_id: PeerId,
        /// Its display name.
        name: String,
        /// The text.
        text: String,
    },
    /// File transfer: offers, progress, completions.
    File(FileEvent),
    /// The signaling server refused something.
    ServerError {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// A warning for the user (cannot save the trust store, ...).
    Warning(String),
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    /// No such peer.
    #[error("no peer {0} in this network")]
    NoSuchPeer(String),
    /// The link refused (not established, too long, ...).
    #[error("peer {peer}: {reason}")]
    Link {
        /// Which peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// File transfer refused (no such offer, no such file, ...).
    #[error("{0}")]
    Transfer(String),
    /// The mesh stopped.
    #[error("the session stopped")]
    Stopped,
}

enum Command {
    SendMessage {
        to: PeerId,
        text: String,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    Share {
        file: std::fs::File,
        digest: FileDigest,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    Offer {
        to: PeerId,
        files: Vec<(Root, String)>,
        reply: oneshot::Sender<Result<(u64, Vec<OfferItem>), MeshError>>,
    },
    Answer {
        peer: PeerId,
        offer_id: u64,
        accept: bool,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    Flush {
        to: PeerId,
        reply: oneshot::Sender<bool>,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Controls a running mesh.
#[derive(Debug)]
pub struct MeshHandle {
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<Result<(), SignalingError>>,
}

impl MeshHandle {
    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(command(tx)).ok()?;
        rx.await.ok()
    }

    /// Sends a chat message to `to`.
    pub async fn send_message(&self, to: &PeerId, text: &str) -> Result<(), MeshError> {
        let to = to.clone();
        let text = text.to_string();
        self.ask(|reply| Command::SendMessage { to, text, reply })
            .await
            .unwrap_or(Err(MeshError::Stopped))
    }

    /// Serves the open `file`, hashed as `digest` (see [`crate::files::hash_file`]).
    pub async fn share(&self, file: std::fs::File, digest: FileDigest) -> Result<(), MeshError> {
        self.ask(|reply| Command::Share { file, digest, reply })
            .await
            .unwrap_or(Err(MeshError::Stopped))
    }

    /// Offers shared files to `to` under the given paths: the offer id and its items.
    pub async fn offer(
        &self,
        to: &PeerId,
        files: Vec<(Root, String)>,
    ) -> Result<(u64, Vec<OfferItem>), MeshError> {
        let to = to.clone();
        self.ask(|reply| Command::Offer { to, files, reply })
            .await
            .unwrap_or(Err(MeshError::Stopped))
    }

    /// Accepts or declines `peer`'s offer `offer_id`.
    pub async fn answer(
        &self,
        peer: &PeerId,
        offer_id: u64,
        accept: bool,
    ) -> Result<(), MeshError> {
        let peer = peer.clone();
        self.ask(|reply| Command::Answer { peer, offer_id, accept, reply })
            .await
            .unwrap_or(Err(MeshError::Stopped))
    }

    /// `true` once `to` acknowledged everything sent to it so far on the control channel.
    pub async fn flush(&self, to: &PeerId) -> bool {
        let to = to.clone();
        self.ask(|reply| Command::Flush { to, reply }).await.unwrap_or(false)
    }

    /// Every other member, sorted by peer id.
    pub async fn peers(&self) -> Vec<PeerInfo> {
        self.ask(|reply| Command::Peers { reply }).await.unwrap_or_default()
    }

    /// Whether the mesh stopped by itself (the server refused us for good, or a bad URL).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Leaves cleanly: a Close frame to every peer (waiting briefly for them to be
    /// acknowledged), connections closed, `leave` to the server.
    pub async fn shutdown(self) -> Result<(), SignalingError> {
        let _ = self.ask(|reply| Command::Shutdown { reply }).await;
        self.wait().await
    }

    /// Waits for the mesh to stop by itself; its error, if it had one.
    pub async fn wait(self) -> Result<(), SignalingError> {
        self.task.await.unwrap_or(Ok(()))
    }
}

/// Starts the mesh: connects to the server and to every member. Fails only if the
/// download folder cannot be used.
pub fn start(
    config: MeshConfig,
) -> Result<(MeshHandle, mpsc::UnboundedReceiver<MeshEvent>), FilesError> {
    let (events, events_rx) = mpsc::unbounded_channel();
    let (commands, commands_rx) = mpsc::unbounded_channel();
    let (io, io_rx) = mpsc::unbounded_channel();
    let first_offer_id = rand::random::<u64>() >> 12;
    let files = Files::new(config.downloads.clone(), first_offer_id, io)?;
    let task = tokio::spawn(run(config, files, io_rx, events, commands_rx));
    Ok((MeshHandle { commands, task }, events_rx))
}

/// One other member of the room.
struct PeerEntry {
    /// Serial number of `rtc`: events of replaced connections are ignored.
    conn: u64,
    rtc: RtcPeer,
    link: PeerLink,
    path: Option<PathStats>,
    link_rtt: Option<Duration>,
    fingerprint: Option<Fingerprint>,
    trust: Option<Trust>,
    failure: Option<String>,
    reconnects: u32,
    /// Its id is no longer in the room but its session works (see the module docs).
    orphan: bool,
    /// `PeerConnected` was reported for the current session.
    announced: bool,
    /// `PeerLeft` was reported (the server said so) while its session lives on.
    left_announced: bool,
}

impl PeerEntry {
    fn info(&self, peer_id: &PeerId) -> PeerInfo {
        let relayed = self.path.is_some_and(|p| p.relayed);
        let (state, reason) = match self.link.state() {
            LinkState::Established if relayed => (PeerState::Relayed, None),
            LinkState::Established => (PeerState::Direct, None),
            LinkState::Handshaking => (PeerState::Handshaking, None),
            LinkState::Failed => (PeerState::Failed, self.failure.clone()),
            LinkState::Waiting if self.failure.is_some() => {
                (PeerState::Failed, self.failure.clone())
            }
            LinkState::Waiting => (PeerState::Connecting, None),
        };
        PeerInfo {
            peer_id: peer_id.clone(),
            state,
            reason,
            name: self.link.peer_name().map(str::to_string),
            fingerprint: self.fingerprint,
            trust: self.trust,
            rtt: self.link_rtt.or(self.path.and_then(|p| p.rtt)),
        }
    }
}

struct Mesh {
    network: Network,
    identity: IdentityKeyPair,
    own_name: String,
    rtc: Arc<RtcConfig>,
    store: Store,
    trust: TrustStore,
    rng: Rng,
    epoch: Instant,
    membership_own: Option<PeerId>,
    members: Vec<PeerId>,
    peers: BTreeMap<PeerId, PeerEntry>,
    next_conn: u64,
    events: mpsc::UnboundedSender<MeshEvent>,
    signals: mpsc::UnboundedSender<ClientMessage>,
    rtc_events: mpsc::UnboundedSender<(PeerId, u64, RtcEvent)>,
    files: Files,
}

async fn run(
    config: MeshConfig,
    files: Files,
    mut io: mpsc::UnboundedReceiver<IoDone>,
    events: mpsc::UnboundedSender<MeshEvent>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) -> Result<(), SignalingError> {
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let (signals, signals_rx) = mpsc::unbounded_channel();
    let (stop, stop_rx) = watch::channel(false);
    let room = config.network.room_id().clone();
    let mut signaling =
        tokio::spawn(signaling::run(config.url, room, reports_tx, signals_rx, stop_rx));
    let (rtc_events, mut rtc_rx) = mpsc::unbounded_channel();
    let mut mesh = Mesh {
        network: config.network,
        identity: config.identity,
        own_name: config.own_name,
        rtc: Arc::new(config.rtc),
        store: config.store,
        trust: config.trust,
        rng: getrandom::rand_core::UnwrapErr(getrandom::SysRng),
        epoch: Instant::now(),
        membership_own: None,
        members: Vec::new(),
        peers: BTreeMap::new(),
        next_conn: 0,
        events,
        signals,
        rtc_events,
        files,
    };
    mesh.after_input();
    loop {
        let wake = mesh.next_timeout();
        tokio::select! {
            Some(report) = reports.recv() => mesh.on_report(report),
            Some((peer, conn, event)) = rtc_rx.recv() => mesh.on_rtc(&peer, conn, event),
            Some(done) = io.recv() => {
                let now = mesh.now();
                mesh.files.io_done(done, now);
            }
            command = commands.recv() => match command {
                Some(Command::Shutdown { reply }) => {
                    mesh.shutdown().await;
                    let _ = stop.send(true);
                    let result = signaling.await.unwrap_or(Ok(()));
                    let _ = reply.send(());
                    return result;
                }
                Some(command) => mesh.on_command(command),
                None => {
                    mesh.shutdown().await;
                    let _ = stop.send(true);
                    return signaling.await.unwrap_or(Ok(()));
                }
            },
            () = sleep_until(wake) => mesh.on_timeout(),
            result = &mut signaling => {
                mesh.shutdown().await;
                return result.unwrap_or(Ok(()));
            }
        }
        mesh.after_input();
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Mesh {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn emit(&self, event: MeshEvent) {
        let _ = self.events.send(event);
    }

    fn in_room(&self, peer: &PeerId) -> bool {
        self.members.contains(peer)
    }

    // --- signaling

    fn on_report(&mut self, report: Report) {
        match report {
            Report::Connecting { attempt } => self.emit(MeshEvent::Connecting { attempt }),
            Report::Disconnected { reason, retry_in } => {
                // Sessions stay: they do not need the server.
                self.members.clear();
                self.emit(MeshEvent::Disconnected { reason, retry_in });
            }
            Report::Membership(event) => self.on_membership(event),
        }
    }

    fn on_membership(&mut self, event: MembershipEvent) {
        match event {
            MembershipEvent::Joined { peer_id, peers } => {
                self.membership_own = Some(peer_id.clone());
                self.members = peers.clone();
                self.emit(MeshEvent::Joined { peer_id, peers: peers.clone() });
                self.resync_peers(&peers);
            }
            MembershipEvent::PeerJoined(peer_id) => {
                if !self.members.contains(&peer_id) {
                    self.members.push(peer_id.clone());
                }
                self.emit(MeshEvent::PeerJoined(peer_id.clone()));
                self.add_peer(&peer_id);
            }
            MembershipEvent::PeerLeft(peer_id) => {
                self.members.retain(|p| *p != peer_id);
                self.emit(MeshEvent::PeerLeft(peer_id.clone()));
                self.retire_peer(&peer_id);
            }
            MembershipEvent::Signal { from, payload } => self.on_signal(&from, payload),
            MembershipEvent::Error { code, message } => {
                self.emit(MeshEvent::ServerError { code, message });
            }
            MembershipEvent::Pong => {}
        }
    }

    /// After a (re)join the server's list is the whole truth; established sessions to ids
    /// no longer listed stay as orphans.
    fn resync_peers(&mut self, peers: &[PeerId]) {
        let stale: Vec<PeerId> =
            self.peers.keys().filter(|id| !peers.contains(id)).cloned().collect();
        for id in stale {
            match self.peers.get_mut(&id) {
                Some(entry) if entry.link.state() == LinkState::Established => entry.orphan = true,
                _ => {
                    self.peers.remove(&id);
                }
            }
        }
        for id in peers {
            if !self.peers.contains_key(id) {
                self.add_peer(id);
            }
        }
    }

    fn new_rtc(&mut self, remote: &PeerId) -> Option<(u64, RtcPeer)> {
        let own = self.membership_own.clone()?;
        self.next_conn += 1;
        let conn = self.next_conn;
        let sink = self.rtc_events.clone();
        let id = remote.clone();
        let rtc = RtcPeer::spawn(self.rtc.clone(), is_polite(&own, remote), move |event| {
            let _ = sink.send((id.clone(), conn, event));
        });
        Some((conn, rtc))
    }

    fn add_peer(&mut self, remote: &PeerId) {
        let Some(own) = self.membership_own.clone() else { return };
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
            path: None,
            link_rtt: None,
            fingerprint: None,
            trust: None,
            failure: None,
            reconnects: 0,
            orphan: false,
            announced: false,
            left_announced: false,
        };
        self.peers.insert(remote.clone(), entry);
    }

    /// The server says `remote` left: a working session is kept as an orphan (the server
    /// may just have gone down); a peer that really left closes its connection.
    fn retire_peer(&mut self, remote: &PeerId) {
        match self.peers.get_mut(remote) {
            Some(entry) if entry.link.state() == LinkState::Established => {
                entry.orphan = true;
                entry.left_announced = true;
            }
            Some(_) => {
                self.peers.remove(remote);
            }
            None => {}
        }
    }

    /// Replaces the connection of `remote`, keeping its link (a new handshake runs when
    /// the new control channel opens).
    fn reconnect_peer(&mut self, remote: &PeerId) -> bool {
        let Some((conn, rtc)) = self.new_rtc(remote) else { return false };
        let Some(entry) = self.peers.get_mut(remote) else { return false };
        entry.link.channel_closed();
        entry.rtc = rtc;
        entry.conn = conn;
        entry.path = None;
        entry.reconnects += 1;
        true
    }

    fn on_signal(&mut self, from: &PeerId, payload: SignalPayload) {
        if !self.peers.contains_key(from) {
            // An offer from an id we do not know yet (it raced our welcome): a new peer.
            if !matches!(payload, SignalPayload::Offer { .. }) && !self.in_room(from) {
                return;
            }
            self.add_peer(from);
        }
        if let Some(entry) = self.peers.get(from) {
            entry.rtc.handle_signal(payload);
        }
    }

    // --- connections

    fn on_rtc(&mut self, remote: &PeerId, conn: u64, event: RtcEvent) {
        let now = self.now();
        let Some(entry) = self.peers.get_mut(remote) else { return };
        if entry.conn != conn {
            return;
        }
        match event {
            RtcEvent::Signal(payload) => {
                if !entry.orphan {
                    let _ =
                        self.signals.send(ClientMessage::Signal { to: remote.clone(), payload });
                }
            }
            RtcEvent::ControlOpen { local_sdp, remote_sdp, path } => {
                entry.failure = None;
                entry.path = path.or(entry.path);
                entry.link.channel_open(&local_sdp, &remote_sdp, now, &mut self.rng);
            }
            RtcEvent::Message(bytes) => entry.link.receive(&bytes, now, &mut self.rng),
            RtcEvent::Path(path) => entry.path = Some(path),
            RtcEvent::Closed(why) => {
                tracing::debug!("connection to {remote} closed: {why}");
                entry.link.channel_closed();
                entry.link_rtt = None;
                let tell = std::mem::replace(&mut entry.announced, false) && !entry.left_announced;
                let in_room = !entry.orphan && self.members.contains(remote);
                if in_room && entry.reconnects < MAX_RECONNECTS {
                    self.reconnect_peer(remote);
                } else if in_room {
                    entry.failure = Some("the connection keeps dropping; gave up".into());
                    let info = entry.info(remote);
                    self.emit(MeshEvent::PeerFailed(info));
                } else {
                    self.peers.remove(remote);
                    if tell {
                        self.emit(MeshEvent::PeerLeft(remote.clone()));
                    }
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
        self.drive(remote);
    }

    /// Drains the link of `remote` after any input: transmits to the control channel,
    /// events out; pins the key once the name is known.
    fn drive(&mut self, remote: &PeerId) {
        let Some(entry) = self.peers.get_mut(remote) else { return };
        let mut out = Vec::new();
        let mut established = None;
        let mut transfer = Vec::new();
        while let Some(bytes) = entry.link.poll_transmit() {
            entry.rtc.send_control(bytes);
        }
        while let Some(event) = entry.link.poll_event() {
            match event {
                LinkEvent::Established { fingerprint, .. } => {
                    entry.reconnects = 0;
                    entry.failure = None;
                    entry.fingerprint = Some(fingerprint);
                    entry.trust = None;
                    entry.announced = false;
                    established = Some(fingerprint);
                }
                LinkEvent::Hello { .. } => {}
                LinkEvent::Message { text } => out.push(MeshEvent::Message {
                    peer_id: remote.clone(),
                    name: entry.link.peer_name().unwrap_or_default().to_string(),
                    text,
                }),
                LinkEvent::Transfer { frame_type, body } => transfer.push((frame_type, body)),
                // IP packets come with the TUN bridge.
                LinkEvent::Data(_) => {}
                LinkEvent::Rtt(rtt) => entry.link_rtt = Some(rtt),
                LinkEvent::Failed(error) => {
                    entry.failure = Some(error.to_string());
                    entry.announced = false;
                    out.push(MeshEvent::PeerFailed(entry.info(remote)));
                }
            }
        }
        let mut save = false;
        if entry.trust.is_none() && entry.link.state() == LinkState::Established {
            if let (Some(fp), Some(name)) = (&entry.fingerprint, entry.link.peer_name()) {
                let trust = self.trust.observe(name, fp);
                entry.trust = Some(trust);
                save = true;
                if let Trust::Changed { .. } = trust {
                    out.push(MeshEvent::KeyChanged(entry.info(remote)));
                }
            }
        }
        if entry.trust.is_some() && !entry.announced && entry.link.state() == LinkState::Established
        {
            entry.announced = true;
            out.push(MeshEvent::PeerConnected(entry.info(remote)));
        }
        let gone = entry.orphan && entry.link.state() == LinkState::Failed;
        if gone {
            if !entry.left_announced {
                out.push(MeshEvent::PeerLeft(remote.clone()));
            }
            self.peers.remove(remote);
        }
        if let Some(fp) = established {
            self.drop_orphans_of(remote, &fp);
        }
        if save {
            let room = self.network.room_id();
            if let Err(e) = self.store.save_trust(room, &self.trust) {
                out.push(MeshEvent::Warning(format!("cannot save the trust store: {e}")));
            }
        }
        for event in out {
            self.emit(event);
        }
        let up = self.peers.get(remote).is_some_and(|e| e.link.state() == LinkState::Established);
        if up && !transfer.is_empty() {
            let now = self.now();
            // A peer whose session just came up is told to the engine first.
            self.files.set_connected(remote, true, now);
            for (frame_type, body) in transfer {
                self.files.receive(remote, frame_type, &body, now);
            }
        }
    }

    /// After any input: tells the engine who is connected now, does what it asks (sends
    /// on the links), and reports its events.
    fn after_input(&mut self) {
        let now = self.now();
        for peer in self.files.connected() {
            let up =
                self.peers.get(&peer).is_some_and(|e| e.link.state() == LinkState::Established);
            if !up {
                self.files.set_connected(&peer, false, now);
            }
        }
        let up: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, e)| e.link.state() == LinkState::Established)
            .map(|(id, _)| id.clone())
            .collect();
        for peer in up {
            self.files.set_connected(&peer, true, now);
        }
        let sends = self.files.pump(now);
        let mut touched = Vec::new();
        for (peer, msg) in sends {
            let Some(entry) = self.peers.get_mut(&peer) else { continue };
            let (frame_type, body) = msg.encode();
            match entry.link.send_transfer(frame_type, body, now) {
                Ok(()) => {
                    if !touched.contains(&peer) {
                        touched.push(peer);
                    }
                }
                Err(e) => tracing::debug!("cannot send a transfer message to {peer}: {e}"),
            }
        }
        for peer in touched {
            if let Some(entry) = self.peers.get_mut(&peer) {
                while let Some(bytes) = entry.link.poll_transmit() {
                    entry.rtc.send_control(bytes);
                }
            }
        }
        for event in self.files.take_events() {
            self.emit(MeshEvent::File(event));
        }
    }

    /// A connection kept from before a signaling reconnect is replaced by a new one to
    /// the same key.
    fn drop_orphans_of(&mut self, current: &PeerId, fp: &Fingerprint) {
        self.peers.retain(|id, e| id == current || !e.orphan || e.fingerprint.as_ref() != Some(fp));
    }

    fn next_timeout(&self) -> Option<Instant> {
        let links = self.peers.values().filter_map(|e| e.link.poll_timeout());
        let at = links.chain(self.files.poll_timeout()).min()?;
        Some(self.epoch + at)
    }

    fn on_timeout(&mut self) {
        let now = self.now();
        self.files.handle_timeout(now);
        let due: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, e)| e.link.poll_timeout().is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(entry) = self.peers.get_mut(&id) {
                entry.link.handle_timeout(now);
            }
            self.drive(&id);
        }
    }

    // --- commands

    fn on_command(&mut self, command: Command) {
        let now = self.now();
        match command {
            Command::SendMessage { to, text, reply } => {
                let result = match self.peers.get_mut(&to) {
                    None => Err(MeshError::NoSuchPeer(to.to_string())),
                    Some(entry) => entry.link.send_message(&text, now).map_err(|e| {
                        MeshError::Link { peer: to.to_string(), reason: e.to_string() }
                    }),
                };
                self.drive(&to);
                let _ = reply.send(result);
            }
            Command::Share { file, digest, reply } => {
                let result = self.files.share(file, digest).map_err(MeshError::Transfer);
                let _ = reply.send(result);
            }
            Command::Offer { to, files, reply } => {
                let result = if self.peers.contains_key(&to) {
                    // The engine must know the session first (it may have just come up).
                    let up = self
                        .peers
                        .get(&to)
                        .is_some_and(|e| e.link.state() == LinkState::Established);
                    self.files.set_connected(&to, up, now);
                    self.files
                        .offer(&to, &files)
                        .map(|id| (id, self.files.offer_items(&to, id).unwrap_or_default()))
                        .map_err(|reason| MeshError::Link { peer: to.to_string(), reason })
                } else {
                    Err(MeshError::NoSuchPeer(to.to_string()))
                };
                let _ = reply.send(result);
            }
            Command::Answer { peer, offer_id, accept, reply } => {
                let result =
                    self.files.answer(&peer, offer_id, accept, now).map_err(MeshError::Transfer);
                let _ = reply.send(result);
            }
            Command::Flush { to, reply } => match self.peers.get(&to) {
                Some(entry) => {
                    let done = entry.rtc.flush();
                    tokio::spawn(async move {
                        let _ = reply.send(done.await.unwrap_or(false));
                    });
                }
                None => {
                    let _ = reply.send(false);
                }
            },
            Command::Peers { reply } => {
                let _ = reply.send(self.peers.iter().map(|(id, e)| e.info(id)).collect());
            }
            Command::Shutdown { .. } => {}
        }
    }

    /// Close frames to every established peer, a short wait for them to be acknowledged,
    /// then every connection closed.
    async fn shutdown(&mut self) {
        self.files.save_now().await;
        let now = self.now();
        let mut acks = Vec::new();
        for entry in self.peers.values_mut() {
            if entry.link.state() == LinkState::Established {
                entry.link.close(now);
                while let Some(bytes) = entry.link.poll_transmit() {
                    entry.rtc.send_control(bytes);
                }
                acks.push(entry.rtc.flush());
            }
        }
        let _ = tokio::time::timeout(SHUTDOWN_FLUSH, futures_util::future::join_all(acks)).await;
        let closing: Vec<_> = self.peers.values().map(|e| e.rtc.close()).collect();
        let _ = tokio::time::timeout(SHUTDOWN_FLUSH, futures_util::future::join_all(closing)).await;
        self.peers.clear();
    }
}
