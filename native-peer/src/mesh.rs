//! The mesh: the native driver of the node ([`weft_core::node::Node`]), the twin of the
//! browser's `wasm/src/session.rs`.
//!
//! One task owns the node (no locks). It turns what happens into the node's inputs (the
//! signaling socket's frames, each connection's events, finished disk work, commands,
//! the node's one timer) and does what the node's outputs say: open or close the
//! signaling socket ([`SignalingSocket`]), make, feed and close WebRTC connections
//! ([`RtcPeer`]), disk work ([`Disk`]), saving the trust store, IP packets to and from the
//! TUN device and its addresses ([`Tun`], with `up --tun`), and [`MeshEvent`]s for the
//! CLI. Every decision (joining, heartbeats, reconnecting, which peers to connect and
//! rebuild, orphans that outlive a server restart, trust on first use, file transfer and
//! its pacing, batching and throttling) is the node's.
//!
//! The `send` and `receive` commands only ask ([`MeshHandle::share`],
//! [`MeshHandle::offer`], [`MeshHandle::answer`]) and watch the events.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use weft_core::identity::IdentityKeyPair;
use weft_core::network::Network;
use weft_core::node::{
    Channel, ConnId, Event, FastPathState, FileEvent, FileNames, Input, IpNet, Node, NodeConfig,
    NodeError, Output, RouteKind, RoutingConfig, SavedTo, SignalingEvent, StopReason,
};
pub use weft_core::node::{OverlayStatus, PeerInfo, PeerState, RelayTransport};
use weft_core::signal::{ErrorCode, PeerId};
use weft_core::transfer::{Cv, FileDigest, OfferItem, PendingBudget, Refusals, Root};
use weft_core::trust::TrustStore;

use crate::dns::Forwarder;
use crate::files::{Disk, FilesError};
use crate::netconf::NetConf;
use crate::rtc::{RtcConfig, RtcPeer};
use crate::signaling::{self, SignalingError, SignalingSocket};
use crate::store::Store;
use crate::tun::{Tun, TunReader, TunState};

/// Packets read from the TUN device at most before the node's outputs are acted on
/// (they are read as long as the device has some, up to this many).
const TUN_BATCH: usize = 64;
/// Inputs (connection events, above all data-channel packets and finished writes) handed
/// to the node at most before its outputs are acted on, when they come faster than one at
/// a time.
const INPUT_BATCH: usize = 64;

/// How long leaving waits for each connection (and the signaling socket) to close.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);
/// How long leaving waits for what was sent (a receiver's last word that it has every
/// file, Close frames) to be acknowledged; it returns as soon as it is. One second was too
/// short: a session whose last packets were lost (a path that changed in the middle of a
/// burst) needs SCTP's retransmission timer, at least a second, and `receive --once`
/// left before its last word arrived, so the sender reported it had left without the
/// file (`cargo xtask bench relay`, 2026-11-28).
const LEAVE_FLUSH: Duration = Duration::from_secs(5);

type Rng = getrandom::rand_core::UnwrapErr<getrandom::SysRng>;

/// What the mesh needs.
#[derive(Debug)]
pub struct MeshConfig {
    /// The signaling servers' WebSocket URLs (at least one): the node says which to use.
    pub servers: Vec<String>,
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
    /// The TUN device (`up --tun`): the node takes and routes IP packets.
    pub tun: Option<Tun>,
    /// What the node advertises and accepts (`tun` is set from the device).
    pub routing: RoutingConfig,
    /// The host's routes and rules beyond the device (`up --tun`): the accepted subnets
    /// and exit routes go there; restored when the mesh stops.
    pub netconf: Option<NetConf>,
    /// The firewall mark of the signaling socket (`up --tun`, see `netconf`).
    pub signaling_mark: Option<u32>,
    /// Where names the node does not know are asked (`up --tun`, unless `--no-dns`).
    pub dns: Option<Forwarder>,
}

/// What the mesh reports: the node's own events (as the core defines them), and the
/// driver's warnings.
#[derive(Debug, Clone)]
pub enum MeshEvent {
    /// An event of the node. The signaling stop for an unsupported version is not
    /// passed on (the mesh ends with that refusal instead), nor is `Left`; of the plain
    /// peer updates, only those where a session's path changes (direct or relayed, and
    /// for a direct one whether IP packets take the fast UDP path); file events come as
    /// [`MeshEvent::File`].
    Node(Event),
    /// A warning for the user (cannot save the trust store, a download record, ...).
    Warning(String),
    /// The TUN device's addresses were set (at start, and when the node's change).
    Tun(TunState),
    /// A file event of the node (`Event::File`), with the names of its file.
    File(NamedFileEvent),
}

/// A file event and the names the node gives its file when it happens (the stable key it
/// was offered under, its root once known), so scripts can follow one file from its
/// offer to its completion; `names` is `None` for an event about a whole offer (its
/// items carry their keys).
#[derive(Debug, Clone)]
pub struct NamedFileEvent {
    /// The event, as the core defines it.
    pub event: FileEvent,
    /// Its file's names.
    pub names: Option<FileNames>,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    /// The node refused (no such peer, not connected, no such offer, ...).
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The mesh stopped.
    #[error("the session stopped")]
    Stopped,
}

/// What the user decided about a peer's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustAction {
    /// They compared its short code: mark its key verified.
    Verify,
    /// Its key changed and they accept the new one.
    AcceptNewKey,
}

enum Command {
    SendMessage {
        to: PeerId,
        text: String,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    ShareStreamed {
        file: std::fs::File,
        size: u64,
        reply: oneshot::Sender<Root>,
    },
    Hashed {
        local: Root,
        cvs: Vec<Cv>,
    },
    HashDone {
        local: Root,
        digest: FileDigest,
        reply: oneshot::Sender<Result<Root, MeshError>>,
    },
    HashFailed {
        local: Root,
        reason: String,
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
    Overlay {
        reply: oneshot::Sender<(OverlayStatus, Option<TunState>)>,
    },
    TransferRefusals {
        reply: oneshot::Sender<Refusals>,
    },
    AcceptUnasked {
        peer: PeerId,
        offer_id: u64,
        budget: PendingBudget,
        free_space: Option<u64>,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    Trust {
        peer: PeerId,
        action: TrustAction,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Reports the CVs of one streamed share from its hashing thread, in order.
#[derive(Debug, Clone)]
pub struct HashReporter {
    commands: mpsc::UnboundedSender<Command>,
    local: Root,
}

impl HashReporter {
    /// The next CVs.
    pub fn cvs(&self, cvs: &[Cv]) {
        if !cvs.is_empty() {
            let _ = self.commands.send(Command::Hashed { local: self.local, cvs: cvs.to_vec() });
        }
    }

    /// The file could not be read: it is no longer served.
    pub fn failed(&self, reason: String) {
        let _ = self.commands.send(Command::HashFailed { local: self.local, reason });
    }
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

    /// Serves the open `file` of `size` bytes before it is hashed, so that it can be
    /// offered at once: its local key. Hash it with [`crate::files::hash_file`],
    /// reporting through [`Self::hash_reporter`], then [`Self::hash_done`].
    pub async fn share_streamed(&self, file: std::fs::File, size: u64) -> Result<Root, MeshError> {
        self.ask(|reply| Command::ShareStreamed { file, size, reply })
            .await
            .ok_or(MeshError::Stopped)
    }

    /// Reports a hashing thread's CVs of a streamed share as they come (usable from a
    /// blocking thread: it never waits).
    pub fn hash_reporter(&self, local: Root) -> HashReporter {
        HashReporter { commands: self.commands.clone(), local }
    }

    /// A streamed share is hashed (after its CVs were reported): its root.
    pub async fn hash_done(&self, local: Root, digest: FileDigest) -> Result<Root, MeshError> {
        self.ask(|reply| Command::HashDone { local, digest, reply })
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

    /// Accepts `peer`'s offer by a rule (nobody asked), within `budget` for downloads
    /// still to write, `free_space` being free on the download disk: the core refuses it
    /// past that (and tells the peer why).
    pub async fn accept_unasked(
        &self,
        peer: &PeerId,
        offer_id: u64,
        budget: PendingBudget,
        free_space: Option<u64>,
    ) -> Result<(), MeshError> {
        let peer = peer.clone();
        self.ask(|reply| Command::AcceptUnasked { peer, offer_id, budget, free_space, reply })
            .await
            .unwrap_or(Err(MeshError::Stopped))
    }

    /// What file transfer refused peers past its caps, by kind and by peer.
    pub async fn transfer_refusals(&self) -> Refusals {
        self.ask(|reply| Command::TransferRefusals { reply }).await.unwrap_or_default()
    }

    /// Our overlay addresses and routing table, and the TUN device's state (if we have
    /// one).
    pub async fn overlay(&self) -> Option<(OverlayStatus, Option<TunState>)> {
        self.ask(|reply| Command::Overlay { reply }).await
    }

    /// Records the user's decision about `peer`'s key (saved in the trust store).
    pub async fn trust(&self, peer: &PeerId, action: TrustAction) -> Result<(), MeshError> {
        let peer = peer.clone();
        self.ask(|reply| Command::Trust { peer, action, reply })
            .await
            .unwrap_or(Err(MeshError::Stopped))
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

/// Starts the mesh: connects to the server and to every member, and resumes the
/// downloads saved in the download folder. Fails only if that folder cannot be used.
pub fn start(
    config: MeshConfig,
) -> Result<(MeshHandle, mpsc::UnboundedReceiver<MeshEvent>), FilesError> {
    let (events, events_rx) = mpsc::unbounded_channel();
    let (commands, commands_rx) = mpsc::unbounded_channel();
    let (inputs, inputs_rx) = mpsc::unbounded_channel();
    let (socket_reports, socket_rx) = mpsc::unbounded_channel();
    let disk = Disk::new(config.downloads, inputs.clone(), events.clone())?;
    let saved = disk.saved_downloads()?;
    let mut node_config = NodeConfig::new(
        config.identity,
        config.network,
        config.own_name,
        config.trust,
        disk.store(),
        rand::random::<u64>() >> 12,
    );
    // `--ice-server` wins over what the signaling server hands out.
    node_config.ice_servers =
        (!config.rtc.ice_servers.is_empty()).then(|| config.rtc.ice_servers.clone());
    node_config.routing = RoutingConfig { tun: config.tun.is_some(), ..config.routing };
    node_config.signaling_servers = config.servers.len();
    let node = Node::new(node_config);
    let mut mesh = Mesh {
        node,
        rng: getrandom::rand_core::UnwrapErr(getrandom::SysRng),
        epoch: Instant::now(),
        servers: config.servers,
        rtc: Arc::new(config.rtc),
        store: config.store,
        disk,
        inputs,
        events,
        socket_reports,
        socket: None,
        next_socket: 0,
        conns: HashMap::new(),
        saves: Vec::new(),
        closing: Vec::new(),
        refused: None,
        paths: HashMap::new(),
        fast_out: Vec::new(),
        tun: config.tun,
        netconf: config.netconf,
        signaling_mark: config.signaling_mark,
        dns: config.dns,
    };
    let now = mesh.now();
    for (record, data_present) in saved {
        mesh.node.restore_download(now, record, data_present);
    }
    let task = tokio::spawn(run(mesh, inputs_rx, socket_rx, commands_rx));
    Ok((MeshHandle { commands, task }, events_rx))
}

struct Mesh {
    node: Node,
    rng: Rng,
    epoch: Instant,
    servers: Vec<String>,
    rtc: Arc<RtcConfig>,
    store: Store,
    disk: Disk,
    /// Where connections and disk work report.
    inputs: mpsc::UnboundedSender<Input>,
    events: mpsc::UnboundedSender<MeshEvent>,
    /// Where signaling sockets report, with their number.
    socket_reports: mpsc::UnboundedSender<(u64, Input)>,
    socket: Option<SignalingSocket>,
    next_socket: u64,
    conns: HashMap<ConnId, RtcPeer>,
    /// Record saves under way: leaving waits for them.
    saves: Vec<JoinHandle<()>>,
    /// Connections and sockets closing gracefully: leaving waits for them.
    closing: Vec<JoinHandle<()>>,
    /// The server refused our protocol version: its words.
    refused: Option<String>,
    /// The path last reported per connected peer (direct or relayed, how our end
    /// reaches its relay, and whether IP packets take the fast UDP path).
    paths: HashMap<PeerId, (PeerState, Option<RelayTransport>, FastPathState)>,
    /// Fast-path datagrams of this round, in order, sent at its end.
    fast_out: Vec<(ConnId, Vec<u8>)>,
    /// The TUN device, with `up --tun`.
    tun: Option<Tun>,
    /// The host's routes and rules beyond the device.
    netconf: Option<NetConf>,
    /// The firewall mark of the signaling socket.
    signaling_mark: Option<u32>,
    dns: Option<Forwarder>,
}

async fn run(
    mut mesh: Mesh,
    mut inputs: mpsc::UnboundedReceiver<Input>,
    mut sockets: mpsc::UnboundedReceiver<(u64, Input)>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) -> Result<(), SignalingError> {
    if mesh.servers.is_empty() {
        return Err(SignalingError::BadUrl { url: String::new(), reason: "no server".into() });
    }
    for url in &mesh.servers {
        signaling::check_url(url)?;
    }
    let now = mesh.now();
    mesh.node.start(now);
    let mut tun_reader = mesh.tun.as_ref().map(Tun::reader);
    loop {
        mesh.act();
        if let Some(message) = mesh.refused.take() {
            mesh.leave().await;
            return Err(SignalingError::UnsupportedVersion(message));
        }
        let wake = mesh.node.poll_timeout().map(|t| mesh.epoch + t);
        tokio::select! {
            Some(input) = inputs.recv() => {
                mesh.input(input);
                // Those already waiting too, before acting: during a transfer each message
                // and each finished write is an input, and one pass of acting (and of
                // setting up this select and its timer) then serves several; a burst of
                // packets from a peer reaches the TUN device in one batch ([`Tun::flush`]).
                for _ in 1..INPUT_BATCH {
                    let Ok(input) = inputs.try_recv() else { break };
                    mesh.input(input);
                }
            }
            Some((id, input)) = sockets.recv() => {
                // A replaced socket's late reports are dropped.
                if mesh.socket.as_ref().is_some_and(|s| s.id() == id) {
                    if matches!(input, Input::SignalingClosed { .. }) {
                        mesh.socket = None;
                    }
                    mesh.input(input);
                }
            }
            command = commands.recv() => match command {
                Some(Command::Shutdown { reply }) => {
                    mesh.leave().await;
                    let _ = reply.send(());
                    return Ok(());
                }
                Some(command) => mesh.command(command),
                None => {
                    mesh.leave().await;
                    return Ok(());
                }
            },
            () = sleep_until(wake) => mesh.input(Input::Timeout),
            read = recv_tun(tun_reader.as_mut()) => {
                let reader = tun_reader.as_mut();
                if let Err(e) = read.and_then(|()| mesh.tun_packets(reader)) {
                    mesh.emit(MeshEvent::Warning(format!(
                        "cannot read from the TUN device any more: {e}"
                    )));
                    tun_reader = None;
                }
            }
        }
    }
}

/// The next read from the TUN device (never, without one).
async fn recv_tun(reader: Option<&mut TunReader>) -> std::io::Result<()> {
    match reader {
        Some(reader) => reader.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Lets what was sent on `rtc` be acknowledged (at most [`LEAVE_FLUSH`]), then closes.
async fn close_gracefully(rtc: RtcPeer) {
    let _ = tokio::time::timeout(LEAVE_FLUSH, rtc.flush()).await;
    let _ = tokio::time::timeout(SHUTDOWN_FLUSH, rtc.close()).await;
}

impl Mesh {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn emit(&self, event: MeshEvent) {
        let _ = self.events.send(event);
    }

    fn input(&mut self, input: Input) {
        if let Input::FileSaved { root, result: Ok(SavedTo::Files(files)) } = &input {
            self.disk.placed(*root, files);
        }
        let now = self.now();
        self.node.handle_input(now, input, &mut self.rng);
    }

    /// Hands the node the packets `reader` read, and those the device has ready after them
    /// (until [`TUN_BATCH`] packets); an error if the device cannot be read.
    fn tun_packets(&mut self, reader: Option<&mut TunReader>) -> std::io::Result<()> {
        let Some(reader) = reader else { return Ok(()) };
        let mut handed = 0;
        loop {
            for packet in reader.packets() {
                self.input(Input::TunPacket(packet.to_vec()));
                handed += 1;
            }
            if handed >= TUN_BATCH {
                return Ok(());
            }
            match reader.try_recv() {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Does everything the node asks.
    fn act(&mut self) {
        while let Some(output) = self.node.poll_output() {
            self.act_on(output);
        }
        self.flush_fast_path();
        if let Some(tun) = &mut self.tun {
            tun.flush();
        }
    }

    /// Sends the round's fast-path datagrams, each connection's in one batch (runs of
    /// full-size packets go as one UDP GSO `sendmsg`, see `RtcPeer::send_fast_batch`).
    fn flush_fast_path(&mut self) {
        let mut out = std::mem::take(&mut self.fast_out);
        let mut rest = out.as_slice();
        while let Some((conn, _)) = rest.first() {
            let n = rest.iter().take_while(|(c, _)| c == conn).count();
            if let Some(rtc) = self.conns.get(conn) {
                rtc.send_fast_batch(rest[..n].iter().map(|(_, bytes)| bytes.as_slice()));
            }
            rest = &rest[n..];
        }
        out.clear();
        self.fast_out = out;
    }

    fn act_on(&mut self, output: Output) {
        match output {
            Output::SignalingConnect { server } => {
                if let Some(old) = self.socket.take() {
                    drop(old.close());
                }
                self.next_socket += 1;
                let reports = self.socket_reports.clone();
                let url = self.servers.get(server).or(self.servers.first()).cloned();
                let (id, url, mark) =
                    (self.next_socket, url.unwrap_or_default(), self.signaling_mark);
                let tls = self.rtc.tls.clone();
                self.socket = Some(SignalingSocket::open(id, url, mark, tls, reports));
            }
            Output::SignalingSend(text) => {
                if let Some(socket) = &self.socket {
                    socket.send(text);
                }
            }
            Output::SignalingClose => {
                if let Some(socket) = self.socket.take() {
                    let task = socket.close();
                    self.closing.retain(|c| !c.is_finished());
                    self.closing.push(tokio::spawn(async move {
                        let _ = tokio::time::timeout(SHUTDOWN_FLUSH, task).await;
                    }));
                }
            }
            Output::Connect { conn, polite, ice_servers, .. } => {
                let inputs = self.inputs.clone();
                let config = Arc::new(RtcConfig { ice_servers, ..(*self.rtc).clone() });
                let rtc = RtcPeer::spawn(config, polite, move |event| {
                    let _ = inputs.send(Input::Connection { conn, event });
                });
                self.conns.insert(conn, rtc);
            }
            Output::Signal { conn, payload } => {
                if let Some(rtc) = self.conns.get(&conn) {
                    rtc.handle_signal(payload);
                }
            }
            Output::Transmit { conn, channel, bytes } => match (self.conns.get(&conn), channel) {
                (Some(rtc), Channel::Control) => rtc.send_control(bytes),
                (Some(rtc), Channel::Data) => rtc.send_data(bytes),
                (None, _) => {}
            },
            // Sent together at the end of the round (`flush_fast_path`).
            Output::FastPathSend { conn, bytes } => self.fast_out.push((conn, bytes)),
            Output::Disconnect { conn, graceful } => {
                // Dropping a connection closes it.
                if let Some(rtc) = self.conns.remove(&conn) {
                    if graceful {
                        self.closing.retain(|c| !c.is_finished());
                        self.closing.push(tokio::spawn(close_gracefully(rtc)));
                    }
                }
            }
            // Each connection also reports its path by itself, every 2 s.
            Output::ReadPath { conn } => {
                if let Some(rtc) = self.conns.get(&conn) {
                    rtc.read_path();
                }
            }
            Output::RestartIce { conn, ice_servers } => {
                if let Some(rtc) = self.conns.get(&conn) {
                    rtc.restart_ice(ice_servers);
                }
            }
            Output::Read { peer, root, index, offset, len } => {
                self.disk.read(peer, root, index, offset, len);
            }
            Output::Write { root, index, offset, data } => {
                self.disk.write(root, index, offset, data);
            }
            Output::Discard { root } => self.disk.discard(&root),
            Output::FinishFile { root, paths, record, .. } => self.disk.finish(root, paths, record),
            Output::SaveRecords(records) => {
                self.saves.retain(|s| !s.is_finished());
                self.saves.push(self.disk.save_records(records));
            }
            Output::SaveTrust(trust) => {
                if let Err(e) = self.store.save_trust(self.node.room(), &trust) {
                    self.emit(MeshEvent::Warning(format!("cannot save the trust store: {e}")));
                }
            }
            Output::Event(event) => self.on_event(event),
            Output::TunWrite(packet) => {
                if let Some(tun) = &mut self.tun {
                    tun.write(&packet);
                }
            }
            Output::DnsForward { id, query } => match &self.dns {
                Some(dns) => dns.forward(id, query, self.inputs.clone()),
                None => {
                    let _ = self.inputs.send(Input::DnsForwarded { id, reply: None });
                }
            },
            Output::Overlay(status) => {
                let Some(tun) = &mut self.tun else { return };
                match tun.configure(&status) {
                    Ok(true) => {
                        let state = tun.state().clone();
                        self.emit(MeshEvent::Tun(state));
                    }
                    Ok(false) => {}
                    Err(e) => self.emit(MeshEvent::Warning(e.to_string())),
                }
                self.install_routes(&status);
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Signaling(SignalingEvent::Stopped {
                reason: StopReason::UnsupportedVersion { message },
            }) => self.refused = Some(message),
            // Reported as the stop above.
            Event::Signaling(SignalingEvent::Stopped { .. } | SignalingEvent::Left)
            | Event::ServerError { code: ErrorCode::UnsupportedVersion, .. } => {}
            Event::PeerConnected(info) => {
                let path = (info.state, info.relay_transport, info.fast_path);
                self.paths.insert(info.peer_id.clone(), path);
                self.emit(MeshEvent::Node(Event::PeerConnected(info)));
            }
            Event::Peer(info) => {
                let path = matches!(info.state, PeerState::Direct | PeerState::Relayed);
                let now = (info.state, info.relay_transport, info.fast_path);
                match self.paths.get(&info.peer_id) {
                    Some(&was) if path && was != now => {
                        self.paths.insert(info.peer_id.clone(), now);
                        self.emit(MeshEvent::Node(Event::Peer(info)));
                    }
                    Some(_) if !path => {
                        self.paths.remove(&info.peer_id);
                    }
                    _ => {}
                }
            }
            Event::File(event) => {
                let names = self.node.file_event_names(&event);
                self.emit(MeshEvent::File(NamedFileEvent { event, names }));
            }
            event => self.emit(MeshEvent::Node(event)),
        }
    }

    fn command(&mut self, command: Command) {
        let now = self.now();
        match command {
            Command::SendMessage { to, text, reply } => {
                let result = self.node.send_message(now, Some(&to), &text);
                let _ = reply.send(result.map(drop).map_err(Into::into));
            }
            Command::ShareStreamed { file, size, reply } => {
                let local = self.node.share_streamed(size);
                self.disk.share(local, file);
                let _ = reply.send(local);
            }
            Command::Hashed { local, cvs } => self.node.file_hashed(now, &local, &cvs),
            Command::HashDone { local, digest, reply } => {
                let result = self.node.file_hash_done(now, &local, digest);
                let _ = reply.send(result.map_err(Into::into));
            }
            Command::HashFailed { local, reason } => {
                self.node.file_hash_failed(now, &local, reason);
            }
            Command::Offer { to, files, reply } => {
                let result = self
                    .node
                    .offer(now, &to, &files)
                    .map(|id| (id, self.node.offer_items(&to, id).unwrap_or_default()));
                let _ = reply.send(result.map_err(Into::into));
            }
            Command::Answer { peer, offer_id, accept, reply } => {
                let result = if accept {
                    self.node.accept(now, &peer, offer_id)
                } else {
                    self.node.decline(now, &peer, offer_id)
                };
                let _ = reply.send(result.map_err(Into::into));
            }
            Command::Flush { to, reply } => {
                match self.node.connection(&to).and_then(|c| self.conns.get(&c)) {
                    Some(rtc) => {
                        let done = rtc.flush();
                        tokio::spawn(async move {
                            let _ = reply.send(done.await.unwrap_or(false));
                        });
                    }
                    None => {
                        let _ = reply.send(false);
                    }
                }
            }
            Command::Peers { reply } => {
                let _ = reply.send(self.node.peers());
            }
            Command::AcceptUnasked { peer, offer_id, budget, free_space, reply } => {
                self.node.set_pending_budget(budget);
                let result = self.node.accept_unasked(now, &peer, offer_id, free_space);
                let _ = reply.send(result.map_err(Into::into));
            }
            Command::TransferRefusals { reply } => {
                let _ = reply.send(self.node.transfer_refusals().clone());
            }
            Command::Overlay { reply } => {
                let tun = self.tun.as_ref().map(|t| t.state().clone());
                let _ = reply.send((self.node.overlay(), tun));
            }
            Command::Trust { peer, action, reply } => {
                let result = match action {
                    TrustAction::Verify => self.node.verify_peer(&peer),
                    TrustAction::AcceptNewKey => self.node.accept_new_key(&peer),
                };
                let _ = reply.send(result.map_err(Into::into));
            }
            Command::Shutdown { .. } => {}
        }
    }

    /// Routes into the device what the node's table uses: the subnets it accepted, and
    /// the default routes while an exit node's are in use (the node accepts those only
    /// from the exit node the user chose).
    fn install_routes(&mut self, status: &OverlayStatus) {
        let Some(netconf) = &mut self.netconf else { return };
        let in_use = |kind| status.routes.iter().filter(move |r| r.in_use && r.kind == kind);
        let subnets: Vec<IpNet> = in_use(RouteKind::Subnet).map(|r| r.prefix).collect();
        let exit = in_use(RouteKind::Exit).next().is_some();
        if let Err(e) = netconf.set_routes(&subnets, exit) {
            self.emit(MeshEvent::Warning(e.to_string()));
        }
    }

    /// Leaves: the node saves its records, says Close to every peer and `leave` to the
    /// server; this waits for the records to be saved and the connections to close.
    async fn leave(&mut self) {
        let now = self.now();
        self.node.leave(now);
        self.act();
        futures_util::future::join_all(self.saves.drain(..)).await;
        futures_util::future::join_all(self.closing.drain(..)).await;
        if let Some(netconf) = self.netconf.take() {
            if let Err(e) = netconf.restore() {
                self.emit(MeshEvent::Warning(format!("cannot undo every network change: {e}")));
            }
        }
    }
}
