//! Many [`Node`]s in virtual time: a fake signaling server (rooms, ids, forwarding,
//! restarts), fake WebRTC connections (offer/answer by perfect negotiation, a control
//! channel that is reliable and ordered but may lose the first message right after it
//! opens, a data channel that loses and reorders), and in-memory disks. Everything the
//! nodes ask for goes through the same [`Output`]s a browser or native driver acts on,
//! so these tests cover the node's policy without a browser: a server restart that
//! sessions survive, a silent peer's connection replaced, a changed key detected and
//! accepted, join/leave churn, and a download from three sources with one vanishing.
//!
//! Seeded and deterministic: a scenario run twice gives the same trace.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::Duration;

use chacha20::ChaCha20Rng;
use chacha20::rand_core::{Rng, SeedableRng};
use weft_core::identity::IdentityKeyPair;
use weft_core::network::Network;
use weft_core::node::{
    ConnId, ConnectionEvent, DownloadStore, Event, FileEvent, IceState, Input, Node, NodeConfig,
    NodeError, NodeTiming, Output, OverlayStatus, PeerState, RelayTransport, RoutingConfig,
    SavedTo, SignalingEvent,
};
use weft_core::signal::{
    self, ClientMessage, PROTOCOL_VERSION, PeerId, RoomId, ServerMessage, SignalPayload,
};
use weft_core::transfer::{DownloadRecord, FileHasher, Root, TransferEvent};
use weft_core::trust::{Trust, TrustStore};

const MS: Duration = Duration::from_millis(1);
const SIGNAL_DELAY: Duration = Duration::from_millis(15);
const CONTROL_DELAY: Duration = Duration::from_millis(10);
const IO_DELAY: Duration = Duration::from_millis(1);

/// What is scheduled.
#[derive(Debug)]
enum Action {
    /// An input for node `node` (of generation `gen`: a restarted node ignores inputs
    /// meant for the one before).
    Input { node: usize, generation: u32, input: Input },
    /// A text from a client socket to the server.
    ToServer { socket: u64, text: String },
    /// The server comes back.
    ServerUp,
}

struct Queued {
    at: Duration,
    seq: u64,
    action: Action,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// One end of a fake WebRTC connection.
struct FakeConn {
    polite: bool,
    /// Our SDP: a fingerprint line plus a token naming this end.
    sdp: String,
    /// The other end, once negotiated.
    remote: Option<(usize, ConnId, u32)>,
    remote_sdp: Option<String>,
    open_at: Option<Duration>,
    closed: bool,
    /// Test hook: drop what arrives (a dead path).
    muted: bool,
    sent_control: u32,
    /// The path ICE selected runs through a relay.
    relayed: bool,
}

struct SimNode {
    node: Node,
    generation: u32,
    alive: bool,
    rng: ChaCha20Rng,
    socket: Option<u64>,
    conns: BTreeMap<ConnId, FakeConn>,
    /// Complete files (shared or downloaded).
    files: BTreeMap<Root, Vec<u8>>,
    partial: BTreeMap<Root, Vec<u8>>,
    records: BTreeMap<Root, DownloadRecord>,
    trust_json: Option<String>,
    events: Vec<Event>,
    /// Test hook: complete files cannot be put in their place.
    fail_finish: bool,
    /// Every message that arrived on its connections' channels.
    received: Vec<Vec<u8>>,
    /// The (local, remote) descriptions of every connection whose channels opened.
    opened: Vec<(String, String)>,
    /// A record save is running.
    saving: bool,
    /// What the node wrote to its TUN device.
    tun_out: Vec<Vec<u8>>,
    /// DNS queries the node asked the host's resolvers (`Output::DnsForward`).
    dns_forwards: Vec<(u64, Vec<u8>)>,
    /// The overlay status last reported.
    overlay: Option<OverlayStatus>,
}

#[derive(Default)]
struct Server {
    up: bool,
    /// socket → (node, its peer id once joined)
    sockets: BTreeMap<u64, (usize, Option<PeerId>)>,
    next_socket: u64,
    /// Every signaling payload it forwarded, as it saw it.
    seen: Vec<SignalPayload>,
    /// A hostile server: what it forwards instead of each payload (from, to, payload).
    tamper: Option<fn(&PeerId, &PeerId, &SignalPayload) -> SignalPayload>,
    /// A hostile server: the id it gives the next member that joins.
    next_id: Option<PeerId>,
    /// What members sent to ids no socket has (members the server made up).
    to_nobody: Vec<(PeerId, SignalPayload)>,
}

struct Sim {
    now: Duration,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    rng: ChaCha20Rng,
    network: Network,
    server: Server,
    nodes: Vec<SimNode>,
    /// Percent of data-channel packets lost.
    data_loss: u32,
    /// Percent chance that the first control message after a channel opens is lost.
    early_loss: u32,
    /// Whether a direct path between peers exists (else ICE selects a relayed one);
    /// ICE looks again only when a connection is made or restarted.
    direct_works: bool,
    /// Every ICE restart asked for: (when, by which node).
    restarts: Vec<(Duration, usize)>,
    /// The drivers can send fast-path datagrams on a direct pair (native peers).
    fast_path_driver: bool,
    /// Fast-path datagrams are dropped on the way (a firewall rule).
    fast_path_blocked: bool,
    /// Fast-path datagrams sent, and IP packets sealed for the data channel, per node.
    fast_sent: Vec<u32>,
    data_sent: Vec<u32>,
    trace: Vec<String>,
}

fn root_of(data: &[u8]) -> (Root, weft_core::transfer::FileDigest) {
    let mut h = FileHasher::new();
    h.update(data);
    let digest = h.finish();
    (digest.root, digest)
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let network = Network::generate(&mut rng);
        Self {
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            rng,
            network,
            server: Server { up: true, ..Server::default() },
            nodes: Vec::new(),
            data_loss: 5,
            early_loss: 50,
            direct_works: true,
            restarts: Vec::new(),
            fast_path_driver: false,
            fast_path_blocked: false,
            fast_sent: Vec::new(),
            data_sent: Vec::new(),
            trace: Vec::new(),
        }
    }

    fn schedule(&mut self, after: Duration, action: Action) {
        self.seq += 1;
        self.queue.push(Reverse(Queued { at: self.now + after, seq: self.seq, action }));
    }

    fn deliver(&mut self, node: usize, after: Duration, input: Input) {
        let generation = self.nodes[node].generation;
        self.schedule(after, Action::Input { node, generation, input });
    }

    /// Adds a node named `name` (with a fresh key, or `identity`) and starts it.
    fn add_node(&mut self, name: &str, identity: Option<IdentityKeyPair>) -> usize {
        self.add_node_with(name, identity, RoutingConfig::default())
    }

    /// Adds a node with this overlay configuration.
    fn add_node_with(
        &mut self,
        name: &str,
        identity: Option<IdentityKeyPair>,
        routing: RoutingConfig,
    ) -> usize {
        let network = self.network.clone();
        self.add_node_in(name, identity, routing, network)
    }

    /// Adds a node that joins `network` (another passphrase, say) instead of the sim's.
    fn add_node_in(
        &mut self,
        name: &str,
        identity: Option<IdentityKeyPair>,
        routing: RoutingConfig,
        network: Network,
    ) -> usize {
        let mut rng = ChaCha20Rng::seed_from_u64(self.rng.next_u64());
        let identity = identity.unwrap_or_else(|| IdentityKeyPair::generate(&mut rng));
        let mut config = NodeConfig::new(
            identity,
            network,
            name,
            TrustStore::new(),
            DownloadStore::Kept,
            rng.next_u64() >> 12,
        );
        config.routing = routing;
        let node = Node::new(config);
        let idx = self.nodes.len();
        self.nodes.push(SimNode {
            node,
            generation: 0,
            alive: true,
            rng,
            socket: None,
            conns: BTreeMap::new(),
            files: BTreeMap::new(),
            partial: BTreeMap::new(),
            records: BTreeMap::new(),
            trust_json: None,
            events: Vec::new(),
            fail_finish: false,
            received: Vec::new(),
            opened: Vec::new(),
            saving: false,
            tun_out: Vec::new(),
            dns_forwards: Vec::new(),
            overlay: None,
        });
        let now = self.now;
        self.nodes[idx].node.start(now);
        self.drain(idx);
        idx
    }

    /// Node `idx` vanishes without a word (its process died, its network went away): its
    /// connections go silent; the server notices its socket closing.
    fn crash(&mut self, idx: usize) {
        let n = &mut self.nodes[idx];
        n.alive = false;
        n.generation += 1;
        for c in n.conns.values_mut() {
            c.closed = true;
        }
        if let Some(socket) = n.socket.take() {
            self.server_drop_socket(socket);
        }
        self.trace.push(format!("{:?} crash {idx}", self.now));
    }

    /// Node `idx` leaves cleanly.
    fn leave(&mut self, idx: usize) {
        let now = self.now;
        self.nodes[idx].node.leave(now);
        self.drain(idx);
        self.nodes[idx].alive = false;
        self.nodes[idx].generation += 1;
    }

    fn restart_server(&mut self, down_for: Duration) {
        self.server.up = false;
        let sockets: Vec<(u64, usize)> =
            self.server.sockets.iter().map(|(s, (n, _))| (*s, *n)).collect();
        self.server.sockets.clear();
        for (_, node) in sockets {
            self.nodes[node].socket = None;
            let reason = "connection lost (code 1006)".to_string();
            self.deliver(node, MS, Input::SignalingClosed { reason });
        }
        self.schedule(down_for, Action::ServerUp);
        self.trace.push(format!("{:?} server restart", self.now));
    }

    // --- the fake signaling server

    fn server_send(&mut self, socket: u64, msg: &ServerMessage) {
        let Some((node, _)) = self.server.sockets.get(&socket) else { return };
        let node = *node;
        self.deliver(node, SIGNAL_DELAY, Input::SignalingText(signal::encode(msg)));
    }

    fn server_drop_socket(&mut self, socket: u64) {
        let Some((_, peer)) = self.server.sockets.remove(&socket) else { return };
        if let Some(peer) = peer {
            let others: Vec<u64> = self.server.sockets.keys().copied().collect();
            for s in others {
                self.server_send(s, &ServerMessage::PeerLeft { peer_id: peer.clone() });
            }
        }
    }

    fn server_receive(&mut self, socket: u64, text: &str) {
        if !self.server.sockets.contains_key(&socket) {
            return;
        }
        let msg = signal::decode_client(text).expect("nodes send valid messages");
        match msg {
            ClientMessage::Join { room, version } => {
                assert_eq!(version, PROTOCOL_VERSION);
                let id = match self.server.next_id.take() {
                    Some(id) => id,
                    None => PeerId::new(format!("p{:08x}", self.rng.next_u32())).unwrap(),
                };
                let peers: Vec<PeerId> =
                    self.server.sockets.values().filter_map(|(_, p)| p.clone()).collect();
                let others: Vec<u64> = self
                    .server
                    .sockets
                    .iter()
                    .filter(|(_, (_, p))| p.is_some())
                    .map(|(s, _)| *s)
                    .collect();
                if let Some(entry) = self.server.sockets.get_mut(&socket) {
                    entry.1 = Some(id.clone());
                }
                let welcome = ServerMessage::Welcome {
                    version,
                    room: room.clone(),
                    peer_id: id.clone(),
                    peers,
                };
                self.server_send(socket, &welcome);
                for s in others {
                    self.server_send(s, &ServerMessage::PeerJoined { peer_id: id.clone() });
                }
            }
            ClientMessage::Signal { to, payload } => {
                let from = self.server.sockets.get(&socket).and_then(|(_, p)| p.clone());
                let target = self
                    .server
                    .sockets
                    .iter()
                    .find(|(_, (_, p))| p.as_ref() == Some(&to))
                    .map(|(s, _)| *s);
                if target.is_none() {
                    self.server.to_nobody.push((to.clone(), payload.clone()));
                }
                if let (Some(from), Some(target)) = (from, target) {
                    self.server.seen.push(payload.clone());
                    let payload = match self.server.tamper {
                        Some(tamper) => tamper(&from, &to, &payload),
                        None => payload,
                    };
                    self.server_send(target, &ServerMessage::Signal { from, payload });
                }
            }
            ClientMessage::Ping => self.server_send(socket, &ServerMessage::Pong),
            ClientMessage::Leave => self.server_drop_socket(socket),
        }
    }

    // --- what nodes ask for

    fn drain(&mut self, idx: usize) {
        while let Some(output) = self.nodes[idx].node.poll_output() {
            self.act(idx, output);
        }
    }

    fn act(&mut self, idx: usize, output: Output) {
        match output {
            Output::SignalingConnect { .. } => {
                if let Some(old) = self.nodes[idx].socket.take() {
                    self.server_drop_socket(old);
                }
                if self.server.up {
                    self.server.next_socket += 1;
                    let socket = self.server.next_socket;
                    self.server.sockets.insert(socket, (idx, None));
                    self.nodes[idx].socket = Some(socket);
                    self.deliver(idx, 5 * MS, Input::SignalingOpened);
                } else {
                    let reason = "cannot connect: connection refused".to_string();
                    self.deliver(idx, 5 * MS, Input::SignalingClosed { reason });
                }
            }
            Output::SignalingSend(text) => {
                if let Some(socket) = self.nodes[idx].socket {
                    self.schedule(SIGNAL_DELAY, Action::ToServer { socket, text });
                }
            }
            Output::SignalingClose => {
                if let Some(socket) = self.nodes[idx].socket.take() {
                    self.server_drop_socket(socket);
                }
            }
            Output::Connect { conn, polite, .. } => {
                let fp: String =
                    (0..32).map(|_| format!("{:02X}", self.rng.next_u32() as u8)).collect();
                let generation = self.nodes[idx].generation;
                let sdp = format!(
                    "v=0\r\na=fingerprint:sha-256 {fp}\r\na=sim:{idx}:{}:{generation}\r\n",
                    conn.0
                );
                let fake = FakeConn {
                    polite,
                    sdp: sdp.clone(),
                    remote: None,
                    remote_sdp: None,
                    open_at: None,
                    closed: false,
                    muted: false,
                    sent_control: 0,
                    relayed: !self.direct_works,
                };
                self.nodes[idx].conns.insert(conn, fake);
                if !polite {
                    let event = ConnectionEvent::LocalSignal(SignalPayload::Offer { sdp });
                    self.deliver(idx, MS, Input::Connection { conn, event });
                }
            }
            Output::Signal { conn, payload } => self.apply_signal(idx, conn, payload),
            Output::Transmit { conn, channel, bytes } => {
                let Some(c) = self.nodes[idx].conns.get_mut(&conn) else { return };
                if c.closed {
                    return;
                }
                let (Some((peer, remote_conn, generation)), Some(open_at)) = (c.remote, c.open_at)
                else {
                    return;
                };
                let control = channel == weft_core::node::Channel::Control;
                c.sent_control += u32::from(control);
                let first = c.sent_control == 1 && self.now <= open_at + 50 * MS;
                if !control {
                    self.data_sent.resize(self.nodes.len(), 0);
                    self.data_sent[idx] += 1;
                }
                let roll = self.rng.next_u32() % 100;
                if control && first && roll < self.early_loss {
                    return;
                }
                if !control && roll < self.data_loss {
                    return;
                }
                let delay = if control {
                    CONTROL_DELAY
                } else {
                    CONTROL_DELAY + MS * (self.rng.next_u32() % 20)
                };
                if self.nodes[peer].generation != generation {
                    return;
                }
                self.nodes[peer].received.push(bytes.clone());
                let event = ConnectionEvent::Received(bytes);
                self.deliver(peer, delay, Input::Connection { conn: remote_conn, event });
            }
            Output::FastPathSend { conn, bytes } => {
                self.fast_sent.resize(self.nodes.len(), 0);
                self.fast_sent[idx] += 1;
                let Some(c) = self.nodes[idx].conns.get(&conn) else { return };
                let Some((peer, remote_conn, generation)) = c.remote else { return };
                // A driver sends only where it reported a pair (direct, native).
                assert!(self.fast_path_driver && !c.relayed && !c.closed);
                if self.fast_path_blocked || self.nodes[peer].generation != generation {
                    return;
                }
                let event = ConnectionEvent::Received(bytes);
                self.deliver(peer, MS, Input::Connection { conn: remote_conn, event });
            }
            Output::Disconnect { conn, graceful } => {
                let Some(c) = self.nodes[idx].conns.get_mut(&conn) else { return };
                c.closed = true;
                if let Some((peer, remote_conn, generation)) = c.remote {
                    if self.nodes[peer].generation == generation {
                        let delay = CONTROL_DELAY + if graceful { MS } else { 30 * MS };
                        let event = ConnectionEvent::Closed { reason: "remote closed".into() };
                        self.deliver(peer, delay, Input::Connection { conn: remote_conn, event });
                    }
                }
                self.nodes[idx].conns.remove(&conn);
            }
            Output::ReadPath { conn } => {
                let Some(c) = self.nodes[idx].conns.get(&conn) else { return };
                let event = ConnectionEvent::Path {
                    relayed: c.relayed,
                    relay_transport: c.relayed.then_some(RelayTransport::Udp),
                    rtt: Some(20 * MS),
                };
                self.deliver(idx, MS, Input::Connection { conn, event });
            }
            Output::RestartIce { conn, .. } => {
                self.restarts.push((self.now, idx));
                // The checks take a while; both ends move to what they find.
                let relayed = !self.direct_works;
                let Some(c) = self.nodes[idx].conns.get_mut(&conn) else { return };
                c.relayed = relayed;
                if let Some((peer, remote_conn, generation)) = c.remote {
                    if self.nodes[peer].generation == generation {
                        if let Some(r) = self.nodes[peer].conns.get_mut(&remote_conn) {
                            r.relayed = relayed;
                        }
                    }
                }
            }
            Output::Read { peer, root, index, offset, len } => {
                let n = &self.nodes[idx];
                let data = n.files.get(&root).or_else(|| n.partial.get(&root));
                let start = usize::try_from(offset).unwrap();
                let result = match data {
                    Some(d) if start + len <= d.len() => Ok(d[start..start + len].to_vec()),
                    _ => Err("no such file".to_string()),
                };
                self.deliver(idx, IO_DELAY, Input::ReadDone { peer, root, index, result });
            }
            Output::Write { root, index, offset, data } => {
                let buf = self.nodes[idx].partial.entry(root).or_default();
                let start = usize::try_from(offset).unwrap();
                if buf.len() < start + data.len() {
                    buf.resize(start + data.len(), 0);
                }
                buf[start..start + data.len()].copy_from_slice(&data);
                self.deliver(idx, IO_DELAY, Input::WriteDone { root, index, result: Ok(()) });
            }
            Output::Discard { root } => {
                self.nodes[idx].partial.remove(&root);
                self.nodes[idx].records.remove(&root);
            }
            Output::FinishFile { .. } if self.nodes[idx].saving => {
                panic!("node {idx} puts a file in place while a record save runs");
            }
            Output::FinishFile { root, .. } if self.nodes[idx].fail_finish => {
                let result = Err("the browser did not save the download".to_string());
                self.deliver(idx, IO_DELAY, Input::FileSaved { root, result });
            }
            Output::FinishFile { root, size, .. } => {
                let mut data = self.nodes[idx].partial.remove(&root).unwrap_or_default();
                data.resize(usize::try_from(size).unwrap(), 0);
                self.nodes[idx].files.insert(root, data);
                let result = Ok(SavedTo::Kept);
                self.deliver(idx, IO_DELAY, Input::FileSaved { root, result });
            }
            Output::SaveRecords(records) => {
                assert!(!self.nodes[idx].saving, "node {idx} saves twice at once");
                for r in records {
                    self.nodes[idx].records.insert(r.root, r);
                }
                // Slow enough that files complete while a save runs.
                self.nodes[idx].saving = true;
                self.deliver(idx, 2000 * MS, Input::RecordsSaved);
            }
            Output::SaveTrust(store) => self.nodes[idx].trust_json = Some(store.to_json()),
            Output::TunWrite(packet) => self.nodes[idx].tun_out.push(packet),
            Output::DnsForward { id, query } => self.nodes[idx].dns_forwards.push((id, query)),
            Output::Overlay(status) => self.nodes[idx].overlay = Some(status),
            Output::Event(event) => {
                self.trace.push(format!("{:?} {idx} {}", self.now, short(&event)));
                self.nodes[idx].events.push(event);
            }
        }
    }

    /// A fake connection takes the remote peer's description: the polite end answers an
    /// offer; an offer from a different remote connection than the one it has is a
    /// restart; an answer completes the negotiation and both control channels open.
    fn apply_signal(&mut self, idx: usize, conn: ConnId, payload: SignalPayload) {
        let (sdp, is_offer) = match payload.clone() {
            SignalPayload::Offer { sdp } => (sdp, true),
            SignalPayload::Answer { sdp } => (sdp, false),
            _ => return,
        };
        let token = sdp.lines().find_map(|l| l.strip_prefix("a=sim:")).unwrap().to_string();
        let mut parts = token.split(':').map(|p| p.parse::<u64>().unwrap());
        let remote = (
            usize::try_from(parts.next().unwrap()).unwrap(),
            ConnId(parts.next().unwrap()),
            u32::try_from(parts.next().unwrap()).unwrap(),
        );
        let Some(c) = self.nodes[idx].conns.get_mut(&conn) else { return };
        if c.closed {
            return;
        }
        if is_offer {
            if c.remote.is_some_and(|r| r != remote) || !c.polite && c.remote.is_none() {
                // A new connection from the other side (or offers crossed on the
                // impolite side): this one cannot take it.
                let event = ConnectionEvent::RemoteRestarted(payload);
                self.deliver(idx, MS, Input::Connection { conn, event });
                return;
            }
            c.remote = Some(remote);
            c.remote_sdp = Some(sdp);
            let answer = SignalPayload::Answer { sdp: c.sdp.clone() };
            let event = ConnectionEvent::LocalSignal(answer);
            self.deliver(idx, MS, Input::Connection { conn, event });
        } else {
            if c.remote.is_some() {
                return;
            }
            c.remote = Some(remote);
            c.remote_sdp = Some(sdp);
            // Both ends open their control channel.
            self.open(idx, conn);
            let (peer, remote_conn, generation) = remote;
            if self.nodes[peer].generation == generation {
                self.open(peer, remote_conn);
            }
        }
    }

    fn open(&mut self, idx: usize, conn: ConnId) {
        let at = self.now + CONTROL_DELAY;
        let Some(c) = self.nodes[idx].conns.get_mut(&conn) else { return };
        let Some(remote_sdp) = c.remote_sdp.clone() else { return };
        c.open_at = Some(at);
        let local_sdp = c.sdp.clone();
        self.nodes[idx].opened.push((local_sdp.clone(), remote_sdp.clone()));
        self.deliver(
            idx,
            CONTROL_DELAY,
            Input::Connection { conn, event: ConnectionEvent::Ice(IceState::Connected) },
        );
        let event = ConnectionEvent::ControlOpen { local_sdp, remote_sdp };
        self.deliver(idx, CONTROL_DELAY, Input::Connection { conn, event });
        if self.fast_path_driver {
            // Reported even for a relayed pair: the node must know not to use it.
            let event = ConnectionEvent::FastPath { pair: Some(1) };
            self.deliver(idx, CONTROL_DELAY, Input::Connection { conn, event });
        }
    }

    // --- running

    fn step(&mut self, until: Duration) -> bool {
        let next_action = self.queue.peek().map(|Reverse(q)| q.at);
        let next_timeout = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.alive)
            .filter_map(|(i, n)| n.node.poll_timeout().map(|t| (t, i)))
            .min();
        let at = match (next_action, next_timeout) {
            (Some(a), Some((t, _))) => a.min(t),
            (Some(a), None) => a,
            (None, Some((t, _))) => t,
            (None, None) => return false,
        };
        if at > until {
            return false;
        }
        self.now = self.now.max(at);
        if next_action.is_some_and(|a| a <= at) {
            let Some(Reverse(q)) = self.queue.pop() else { return false };
            match q.action {
                Action::Input { node, generation, input } => {
                    let n = &mut self.nodes[node];
                    if !n.alive || n.generation != generation {
                        return true;
                    }
                    if let Input::Connection { conn, event } = &input {
                        let Some(c) = n.conns.get(conn) else { return true };
                        let muted = c.muted && matches!(event, ConnectionEvent::Received(_));
                        if muted || c.closed {
                            return true;
                        }
                    }
                    let now = self.now;
                    let n = &mut self.nodes[node];
                    if input == Input::RecordsSaved {
                        n.saving = false;
                    }
                    n.node.handle_input(now, input, &mut n.rng);
                    self.drain(node);
                }
                Action::ToServer { socket, text } => self.server_receive(socket, &text),
                Action::ServerUp => self.server.up = true,
            }
        } else if let Some((_, i)) = next_timeout {
            let now = self.now;
            let n = &mut self.nodes[i];
            n.node.handle_input(now, Input::Timeout, &mut n.rng);
            self.drain(i);
            let again = self.nodes[i].node.poll_timeout();
            assert!(again.is_none_or(|t| t > now), "node {i} wants a timeout at {now:?} again");
        }
        true
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        while self.step(until) {}
        self.now = until;
    }

    /// Runs until `done` holds (checked after every step), for at most `limit`.
    fn run_until(&mut self, limit: Duration, what: &str, done: impl Fn(&Sim) -> bool) {
        let until = self.now + limit;
        while !done(self) {
            assert!(self.step(until), "{what}: not within {limit:?} (now {:?})", self.now);
        }
    }

    // --- looking

    fn node(&self, idx: usize) -> &Node {
        &self.nodes[idx].node
    }

    fn id(&self, idx: usize) -> PeerId {
        self.node(idx).own_id().cloned().expect("joined")
    }

    /// Whether every live node has a session with every other live node, and no peer
    /// entry besides them.
    /// Nodes `among` have sessions with each other.
    fn fully_meshed_among(&self, among: &[usize]) -> bool {
        among.iter().all(|&i| {
            among.iter().filter(|&&j| j != i).all(|&j| {
                let id = self.id(j);
                self.node(i)
                    .peer(&id)
                    .is_some_and(|p| matches!(p.state, PeerState::Direct | PeerState::Relayed))
            })
        })
    }

    fn fully_meshed(&self) -> bool {
        let alive: Vec<usize> = (0..self.nodes.len()).filter(|i| self.nodes[*i].alive).collect();
        alive.iter().all(|&i| {
            if self.node(i).own_id().is_none() {
                return false;
            }
            let peers = self.node(i).peers();
            let want: BTreeSet<PeerId> = alive
                .iter()
                .filter(|&&j| j != i)
                .filter_map(|&j| self.node(j).own_id().cloned())
                .collect();
            let have: BTreeSet<PeerId> = peers
                .iter()
                .filter(|p| matches!(p.state, PeerState::Direct | PeerState::Relayed))
                .filter(|p| p.trust.is_some())
                .map(|p| p.peer_id.clone())
                .collect();
            want.len() == alive.len() - 1 && have == want && peers.len() == want.len()
        })
    }

    fn messages(&self, idx: usize) -> Vec<(String, String)> {
        self.nodes[idx]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Message { name, text, .. } => Some((name.clone(), text.clone())),
                _ => None,
            })
            .collect()
    }
}

fn short(event: &Event) -> String {
    match event {
        Event::Peer(p) => format!("peer {} {}", p.peer_id, p.state.as_str()),
        Event::File(FileEvent::Progress(v)) => format!("progress {}", v.progress.done_bytes),
        Event::File(FileEvent::Engine(e)) => format!("file {e:?}").chars().take(80).collect(),
        other => format!("{other:?}").chars().take(80).collect(),
    }
}

fn mesh(seed: u64, names: &[&str]) -> Sim {
    let mut sim = Sim::new(seed);
    for name in names {
        sim.add_node(name, None);
    }
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    sim
}

#[test]
fn nodes_mesh_and_talk_despite_lost_handshake_messages() {
    let mut sim = mesh(1, &["ada", "bea", "cy", "dan"]);
    let (b, c) = (sim.id(1), sim.id(2));
    let now = sim.now;
    assert_eq!(sim.nodes[0].node.send_message(now, Some(&b), "hi bea").unwrap(), 1);
    assert_eq!(sim.nodes[0].node.send_message(now, None, "hi all").unwrap(), 3);
    sim.drain(0);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(
        sim.messages(1),
        vec![("ada".into(), "hi bea".into()), ("ada".into(), "hi all".into())]
    );
    assert_eq!(sim.messages(2), vec![("ada".into(), "hi all".into())]);
    // Every key was pinned on first sight and saved.
    for n in &sim.nodes {
        let info = n.node.peers();
        assert!(info.iter().all(|p| p.trust == Some(Trust::New)), "{info:?}");
        assert!(n.trust_json.is_some());
    }
    // Plain errors for bad requests.
    let nobody = PeerId::new("nobody").unwrap();
    let err = sim.nodes[0].node.send_message(now, Some(&nobody), "x").unwrap_err();
    assert_eq!(err.to_string(), "no peer nobody in this network");
    let _ = c;
}

#[test]
fn sessions_survive_a_server_restart_and_move_to_the_new_ids() {
    let mut sim = mesh(2, &["ada", "bea", "cy"]);
    let old_b = sim.id(1);
    sim.restart_server(Duration::from_secs(3));
    sim.run_for(Duration::from_millis(200));
    // The server is gone, the sessions are not: a message still goes through.
    assert!(sim.node(0).own_id().is_none());
    let now = sim.now;
    sim.nodes[0].node.send_message(now, Some(&old_b), "while the server is down").unwrap();
    sim.drain(0);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.messages(1), vec![("ada".into(), "while the server is down".into())]);
    // Back: everyone rejoins under new ids and the sessions move to new connections,
    // and at no moment is anyone without a session to each of the others.
    let until = sim.now + Duration::from_secs(30);
    while !(sim.nodes.iter().all(|n| n.node.own_id().is_some()) && sim.fully_meshed()) {
        assert!(sim.step(until), "rejoin: not within 30 s");
        for (i, n) in sim.nodes.iter().enumerate() {
            let keys: BTreeSet<_> = n
                .node
                .peers()
                .into_iter()
                .filter(|p| p.state == PeerState::Direct)
                .filter_map(|p| p.fingerprint.map(|f| f.to_hex()))
                .collect();
            assert_eq!(keys.len(), 2, "node {i} lost a session at {:?}", sim.now);
        }
    }
    assert_ne!(sim.id(1), old_b);
    for (i, n) in sim.nodes.iter().enumerate() {
        let lost =
            n.events.iter().any(|e| matches!(e, Event::Signaling(SignalingEvent::Lost { .. })));
        assert!(lost, "node {i} noticed the server going");
        let failed: Vec<_> =
            n.events.iter().filter(|e| matches!(e, Event::PeerFailed(_))).collect();
        assert!(failed.is_empty(), "node {i}: {failed:?}");
    }
    let now = sim.now;
    let b = sim.id(1);
    sim.nodes[0].node.send_message(now, Some(&b), "after").unwrap();
    sim.drain(0);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.messages(1).last().unwrap().1, "after");
}

#[test]
fn a_silent_peer_still_in_the_room_gets_a_new_connection() {
    let mut sim = mesh(3, &["ada", "bea"]);
    let b = sim.id(1);
    let old = sim.node(0).connection(&b).unwrap();
    // The path from bea to ada dies: ada hears nothing more on this connection.
    sim.nodes[0].conns.get_mut(&old).unwrap().muted = true;
    sim.run_until(Duration::from_secs(60), "replaced", |s| {
        let conn = s.node(0).connection(&b);
        conn.is_some_and(|c| c != old) && s.fully_meshed()
    });
    let failed = sim.nodes[0].events.iter().any(|e| {
        matches!(e, Event::Peer(p) if p.state == PeerState::Failed
            && p.reason.as_ref().is_some_and(|r| r.to_string().contains("stopped answering")))
    });
    assert!(failed, "the failure was shown before the new connection");
    let now = sim.now;
    sim.nodes[1].node.send_message(now, None, "back").unwrap();
    sim.drain(1);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.messages(0), vec![("bea".into(), "back".into())]);
}

#[test]
fn a_changed_key_is_detected_loudly_and_can_be_accepted_then_verified() {
    let mut sim = mesh(4, &["ada", "cy"]);
    let c = sim.id(1);
    sim.nodes[0].node.verify_peer(&c).unwrap();
    assert_eq!(sim.node(0).peer(&c).unwrap().trust, Some(Trust::Verified));
    // Cy reinstalls: same name, new key.
    sim.leave(1);
    sim.run_for(Duration::from_secs(1));
    let cy2 = sim.add_node("cy", None);
    sim.run_until(Duration::from_secs(30), "rejoin", Sim::fully_meshed);
    let c2 = sim.id(cy2);
    let info = sim.node(0).peer(&c2).unwrap();
    assert_eq!(info.trust, Some(Trust::Changed { verified_before: true }));
    assert!(
        sim.nodes[0].events.iter().any(|e| matches!(e, Event::KeyChanged(p) if p.peer_id == c2))
    );
    // Verifying the new key before accepting it is refused.
    let err = sim.nodes[0].node.verify_peer(&c2).unwrap_err();
    assert!(matches!(err, NodeError::PinnedToAnotherKey(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "cy is pinned to another key; accept the new key before verifying it"
    );
    sim.nodes[0].node.accept_new_key(&c2).unwrap();
    assert_eq!(sim.node(0).peer(&c2).unwrap().trust, Some(Trust::Known));
    sim.nodes[0].node.verify_peer(&c2).unwrap();
    assert_eq!(sim.node(0).peer(&c2).unwrap().trust, Some(Trust::Verified));
    sim.drain(0);
    let saved = TrustStore::from_json(sim.nodes[0].trust_json.as_ref().unwrap()).unwrap();
    let fp = sim.node(0).peer(&c2).unwrap().fingerprint.unwrap();
    assert_eq!(saved.check("cy", &fp), Some(Trust::Verified));
}

/// A member verified under one name renames itself, mid-session, to the name another key
/// is pinned under: it shows under the new name with a changed key (loudly), never as
/// that name verified; renaming to a fresh name shows it new, not verified.
#[test]
fn a_verified_member_that_renames_itself_is_not_verified_under_the_new_name() {
    let mut sim = mesh(6, &["ada", "bea", "mal"]);
    let (b, m) = (sim.id(1), sim.id(2));
    sim.nodes[0].node.verify_peer(&b).unwrap();
    sim.nodes[0].node.verify_peer(&m).unwrap();
    assert_eq!(sim.node(0).peer(&m).unwrap().trust, Some(Trust::Verified));

    // Mal renames itself; what Ada sees of it then.
    let rename = |sim: &mut Sim, name: &str| {
        let now = sim.now;
        sim.nodes[2].node.set_name(now, name);
        sim.drain(2);
        sim.run_for(Duration::from_secs(1));
        sim.node(0).peer(&m).unwrap()
    };
    let seen = rename(&mut sim, "bea");
    assert_eq!(seen.name.as_deref(), Some("bea"));
    assert_eq!(seen.trust, Some(Trust::Changed { verified_before: true }), "{seen:?}");
    assert!(
        sim.nodes[0].events.iter().any(|e| matches!(e, Event::KeyChanged(p) if p.peer_id == m)),
        "no loud warning"
    );
    // The real Bea is untouched.
    assert_eq!(sim.node(0).peer(&b).unwrap().trust, Some(Trust::Verified));

    let seen = rename(&mut sim, "eve");
    assert_eq!((seen.name.as_deref(), seen.trust), (Some("eve"), Some(Trust::New)), "{seen:?}");
    // Messages are shown under the name the key has now.
    let (now, a) = (sim.now, sim.id(0));
    sim.nodes[2].node.send_message(now, Some(&a), "hi").unwrap();
    sim.drain(2);
    sim.run_for(Duration::from_secs(1));
    assert!(sim.messages(0).contains(&("eve".into(), "hi".into())), "{:?}", sim.messages(0));
}

/// A member that takes a name looking like a pinned one ("bеa" with a Cyrillic "е") shows
/// as a new key, and is flagged as looking like the pinned name; the real one is not.
#[test]
fn a_member_whose_name_looks_like_a_pinned_one_is_flagged() {
    let mut sim = mesh(6, &["ada", "bea", "mal"]);
    let (b, m) = (sim.id(1), sim.id(2));
    let now = sim.now;
    sim.nodes[2].node.set_name(now, "b\u{435}a");
    sim.drain(2);
    sim.run_for(Duration::from_secs(1));
    let seen = sim.node(0).peer(&m).unwrap();
    assert_eq!((seen.trust, seen.looks_like.as_deref()), (Some(Trust::New), Some("bea")));
    assert_eq!(sim.node(0).peer(&b).unwrap().looks_like, None);
    // A name unlike any pinned one is not flagged.
    let now = sim.now;
    sim.nodes[2].node.set_name(now, "eve");
    sim.drain(2);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.node(0).peer(&m).unwrap().looks_like, None);
}

/// The server forwards members' offers, answers and candidates without reading them, and
/// whatever it forges, rewrites or misdirects instead is dropped: without the network's
/// secret it cannot answer an offer itself, nor learn a member's addresses.
#[test]
fn the_server_sees_only_sealed_signals_and_cannot_forge_them() {
    let sim = mesh(12, &["ada", "bea"]);
    assert!(!sim.server.seen.is_empty());
    for payload in &sim.server.seen {
        let SignalPayload::Opaque { data } = payload else { panic!("in clear: {payload:?}") };
        assert!(!data.contains("sim") && !data.contains("a="), "{data}");
    }
    assert_eq!(sim.node(0).refused_signals(), 0);

    let forgeries: [fn(&PeerId, &PeerId, &SignalPayload) -> SignalPayload; 3] = [
        // Its own offer in clear, as a MITM answering for the other member would send.
        |_, _, _| SignalPayload::Offer { sdp: "v=0\r\na=sim:0:0:0\r\n".into() },
        // The member's sealed payload with one character changed.
        |_, _, p| match p {
            SignalPayload::Opaque { data } => {
                let mut d = data.clone().into_bytes();
                d[30] = if d[30] == b'A' { b'B' } else { b'A' };
                SignalPayload::Opaque { data: String::from_utf8(d).unwrap() }
            }
            other => other.clone(),
        },
        // Garbage of the right kind.
        |_, _, _| SignalPayload::Opaque { data: "AQ".repeat(40) },
    ];
    for (i, tamper) in forgeries.into_iter().enumerate() {
        let mut sim = Sim::new(13 + i as u64);
        sim.server.tamper = Some(tamper);
        sim.add_node("ada", None);
        sim.add_node("bea", None);
        sim.run_for(Duration::from_secs(20));
        assert!(!sim.fully_meshed(), "forgery {i} got through");
        let refused: u64 = (0..2).map(|n| sim.node(n).refused_signals()).sum();
        assert!(refused > 0, "forgery {i}");
        for n in 0..2 {
            assert!(sim.node(n).peers().iter().all(|p| p.fingerprint.is_none()), "forgery {i}");
        }
    }
}

/// What a member who joined with `wrong`'s passphrase (or a server that added its own
/// member) can check offline: every first handshake message it received, tried against
/// each guess of the passphrase at one Argon2id each. Returns the guesses it confirmed.
fn offline_dictionary_attack<'a>(
    sim: &Sim,
    attacker: usize,
    name: &str,
    guesses: &[&'a str],
) -> Vec<&'a str> {
    use weft_core::handshake::{ChannelBinding, HandshakeError, HandshakeResponder};
    let n = &sim.nodes[attacker];
    let inits: Vec<&Vec<u8>> =
        // `01 01 …`: an Init (HANDSHAKE.md).
        n.received.iter().filter(|m| m.starts_with(&[1, 1])).collect();
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let me = IdentityKeyPair::generate(&mut rng);
    let fp = |sdp: &str| weft_core::sdp::dtls_fingerprint(sdp).unwrap().to_string();
    guesses
        .iter()
        .copied()
        .filter(|guess| {
            let secret =
                weft_core::network::NetworkSecret::from_passphrase(name, guess, &TINY).unwrap();
            inits.iter().any(|init| {
                n.opened.iter().any(|(local, remote)| {
                    let binding = ChannelBinding::new(&fp(local), &fp(remote)).unwrap();
                    let mut hs = HandshakeResponder::new(&me, &secret, &binding);
                    // The network MAC checks out: the guess is the passphrase.
                    !matches!(hs.handle(init, &mut rng), Err(HandshakeError::WrongNetworkSecret))
                })
            })
        })
        .collect()
}

const TINY: weft_core::network::PassphraseParams =
    weft_core::network::PassphraseParams { memory_kib: 8, iterations: 1, parallelism: 1 };

/// A passphrase network resists offline guessing (#13 item 3). A member with a wrong
/// passphrase — or the server's own member, given the id that makes it answer every
/// handshake — gets one online guess per attempt: it collects nothing against which a
/// dictionary of passphrases can be tried offline, and the members count its attempts,
/// space them out and say so. (Before the PAKE, it received every member's Init, whose
/// network MAC confirmed the right guess at one Argon2id.)
#[test]
fn a_wrong_passphrase_member_collects_nothing_to_guess_the_passphrase_offline() {
    let right = Network::from_passphrase("team", "correct horse", &TINY).unwrap();
    let wrong = Network::from_passphrase("team", "incorrect horse", &TINY).unwrap();
    let mut sim = Sim::new(40);
    sim.network = right;
    sim.add_node("ada", None);
    sim.add_node("bea", None);
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    // The highest id: the polite side, so the responder of every handshake, to whom every
    // member sends its Init first.
    sim.server.next_id = Some(PeerId::new("pzzzzzzzz").unwrap());
    let mallory = sim.add_node_in("mallory", None, RoutingConfig::default(), wrong);
    sim.run_for(Duration::from_secs(120));

    let guesses = ["123456", "hunter2", "correct horse", "incorrect horse", "letmein"];
    let confirmed = offline_dictionary_attack(&sim, mallory, "team", &guesses);
    assert!(confirmed.is_empty(), "confirmed offline: {confirmed:?}");
    assert!(sim.nodes[mallory].received.is_empty(), "no channel opens to a wrong passphrase");
    // Nothing in clear went through the server: the members' descriptions are sealed
    // under keys only the right passphrase gives, so Mallory learned no address either.
    for payload in &sim.server.seen {
        let SignalPayload::Opaque { data } = payload else { panic!("in clear: {payload:?}") };
        assert!(!data.contains("sim") && !data.contains("a="), "{data}");
    }
    // The members are still meshed with each other, and saw Mallory fail.
    for m in 0..2 {
        let peers = sim.node(m).peers();
        assert_eq!(peers.iter().filter(|p| p.state == PeerState::Direct).count(), 1);
        let failed = peers.iter().find(|p| p.peer_id.as_str() == "pzzzzzzzz").unwrap();
        assert_eq!(failed.state, PeerState::Failed, "{failed:?}");
        assert!(failed.reason.as_ref().unwrap().to_string().contains("wrong passphrase"));
    }
    // Mallory too hears why: the passphrase differs.
    let seen = sim.node(mallory).peers();
    assert!(seen.iter().all(|p| p.state == PeerState::Failed), "{seen:?}");
    assert!(seen.iter().all(|p| p.reason.as_ref().unwrap().to_string().contains("passphrase")));
    // Each member counted Mallory's attempts and spaced them out: over two minutes of
    // retrying, a handful of guesses, not one per retry timer.
    for m in 0..2 {
        let failures = sim.node(m).passphrase_failures();
        let (id, count) = failures.first().cloned().expect("attempts counted");
        assert_eq!(id.as_str(), "pzzzzzzzz");
        println!("node {m}: {count} failed attempts from Mallory in two minutes");
        assert!((1..=8).contains(&count), "{count} attempts in two minutes");
        let shown = sim.nodes[m].events.iter().any(
            |e| matches!(e, Event::PassphraseFailures { peer, .. } if peer.as_str() == "pzzzzzzzz"),
        );
        assert!(shown, "an event says so");
    }
}

/// The PAKE keys each pair's handshake: even a member, who knows the passphrase, finds
/// no Init against which the passphrase checks (before the PAKE, every Init did: this
/// is the check that confirmed it).
#[test]
fn even_a_member_cannot_check_the_passphrase_against_an_init_offline() {
    let right = Network::from_passphrase("team", "correct horse", &TINY).unwrap();
    let mut sim = Sim::new(41);
    sim.network = right;
    sim.add_node("ada", None);
    sim.server.next_id = Some(PeerId::new("pzzzzzzzz").unwrap());
    let member = sim.add_node("bea", None);
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    // A member knows the passphrase; with it, the pair's own secret is what keys the Init.
    let guesses = ["123456", "correct horse"];
    let found = offline_dictionary_attack(&sim, member, "team", &guesses);
    // The PAKE keys the Init by the pair's key, not the passphrase: even a member cannot
    // check a passphrase against another pair's Init offline.
    assert!(found.is_empty(), "{found:?}");
}

/// A hostile server that makes up a member and fires passphrase guesses at the members as
/// fast as it likes (a fresh PAKE Start every 200 ms, under one id and then under fresh
/// ids) gets few answers: each answer is one guess, and the members space them out.
#[test]
fn passphrase_guesses_fired_by_the_server_are_answered_few_and_far_between() {
    use weft_core::pake::{Incoming, PakeMessage, PakeRun, classify};
    let right = Network::from_passphrase("team", "correct horse", &TINY).unwrap();
    let guess = Network::from_passphrase("team", "guess", &TINY).unwrap();
    let mut sim = Sim::new(42);
    sim.network = right;
    sim.add_node("ada", None);
    sim.add_node("bea", None);
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    let room = sim.node(0).room().clone();
    let ada = sim.id(0);
    let sockets: Vec<u64> = sim.server.sockets.keys().copied().collect();
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let confirms_to = |sim: &Sim, fake: &PeerId| {
        sim.server
            .to_nobody
            .iter()
            .filter(|(to, p)| {
                to == fake && matches!(classify(p), Ok(Incoming::Pake(PakeMessage::Confirm { .. })))
            })
            .count()
    };
    // One made-up member, 300 guesses in a minute; then 300 more from 300 fresh ids.
    let mut fakes = Vec::new();
    for round in 0..600 {
        let fake = if round < 300 {
            PeerId::new("pfake").unwrap()
        } else {
            PeerId::new(format!("pfake{round}")).unwrap()
        };
        if round == 0 || round >= 300 {
            for s in &sockets {
                sim.server_send(*s, &ServerMessage::PeerJoined { peer_id: fake.clone() });
            }
            fakes.push(fake.clone());
        }
        let (_, start) = PakeRun::start(guess.secret(), &room, &fake, &ada, &mut rng);
        for s in &sockets {
            let msg = ServerMessage::Signal { from: fake.clone(), payload: start.to_payload() };
            sim.server_send(*s, &msg);
        }
        sim.run_for(200 * MS);
    }
    sim.run_for(Duration::from_secs(30));
    let one_id = confirms_to(&sim, &fakes[0]);
    let fresh: usize = fakes[1..].iter().map(|f| confirms_to(&sim, f)).sum();
    println!("answered {one_id} guesses from one id, {fresh} from 300 fresh ids (2 members)");
    // Two members; without the guard every Start is answered: 600 and 600.
    assert!(one_id <= 2 * 8, "{one_id} guesses answered from one id in a minute");
    assert!(fresh <= 2 * 6, "{fresh} guesses answered from fresh ids in a minute");
    let counted = sim.node(0).passphrase_failures();
    assert!(counted.iter().map(|(_, n)| n).sum::<u32>() >= 2, "{counted:?}");
    // The members still talk to each other.
    assert!(sim.fully_meshed_among(&[0, 1]));
}

#[test]
fn join_and_leave_churn_settles_into_a_full_mesh() {
    let mut sim = Sim::new(5);
    for i in 0..6 {
        sim.add_node(&format!("n{i}"), None);
    }
    let mut joined = 6;
    for round in 0..24 {
        let pause = u64::from(200 + sim.rng.next_u32() % 1500);
        sim.run_for(Duration::from_millis(pause));
        let alive: Vec<usize> = (0..sim.nodes.len()).filter(|i| sim.nodes[*i].alive).collect();
        let pick = alive[sim.rng.next_u32() as usize % alive.len()];
        match sim.rng.next_u32() % 4 {
            0 if alive.len() > 3 => sim.leave(pick),
            1 if alive.len() > 3 => sim.crash(pick),
            _ => {
                sim.add_node(&format!("n{joined}"), None);
                joined += 1;
            }
        }
        let _ = round;
    }
    // Crashed peers are noticed (idle timeout) and forgotten; everyone else meshes.
    sim.run_until(Duration::from_secs(60), "settle", Sim::fully_meshed);
    let alive = sim.nodes.iter().filter(|n| n.alive).count();
    assert!(alive >= 4, "{alive}");
}

#[test]
fn a_download_from_three_sources_survives_one_vanishing() {
    let mut sim = mesh(6, &["rx", "s1", "s2", "s3"]);
    sim.data_loss = 0;
    let data: Vec<u8> = (0..6 * 1024 * 1024 + 12345u32).map(|i| (i * 7 + i / 4096) as u8).collect();
    let (root, digest) = root_of(&data);
    let rx = sim.id(0);
    let mut offers = Vec::new();
    for s in 1..=3 {
        sim.nodes[s].files.insert(root, data.clone());
        let d = digest.clone();
        sim.nodes[s].node.share(d.root, d.size, d.cvs).unwrap();
        // Home uplinks: the download takes a few seconds, over many record saves.
        sim.nodes[s].node.set_upload_limit(Some(1_500_000.0));
        let now = sim.now;
        let id = sim.nodes[s].node.offer(now, &rx, &[(root, "big.bin".to_string())]).unwrap();
        sim.drain(s);
        offers.push((sim.id(s), id));
    }
    sim.run_until(Duration::from_secs(5), "offers", |s| {
        s.node(0).engine().pending_offers().len() == 3
    });
    for (peer, id) in &offers {
        let now = sim.now;
        sim.nodes[0].node.accept(now, peer, *id).unwrap();
        sim.drain(0);
    }
    // Once a third is done, s2 vanishes.
    let third = data.len() as u64 / 3;
    sim.run_until(Duration::from_secs(60), "a third", |s| {
        s.node(0).engine().progress(&root).is_some_and(|p| p.done_bytes >= third)
    });
    let sources = sim.node(0).engine().progress(&root).unwrap().sources.len();
    assert_eq!(sources, 3, "all three serve at first");
    sim.crash(2);
    sim.run_until(Duration::from_secs(120), "complete", |s| {
        s.nodes[0].events.iter().any(|e| matches!(e, Event::File(FileEvent::Saved { .. })))
    });
    assert_eq!(sim.nodes[0].files.get(&root).map(Vec::len), Some(data.len()));
    assert!(sim.nodes[0].files.get(&root) == Some(&data), "the bytes are the file's");
    sim.run_for(Duration::from_secs(1));
    // The others were told it arrived.
    for s in [1, 3] {
        let delivered = sim.nodes[s]
            .events
            .iter()
            .any(|e| matches!(e, Event::File(FileEvent::Engine(TransferEvent::Delivered { .. }))));
        assert!(delivered, "s{s} heard of the delivery");
    }
    // Progress was reported, throttled, and ended at 100 %.
    let progress: Vec<u64> = sim.nodes[0]
        .events
        .iter()
        .filter_map(|e| match e {
            Event::File(FileEvent::Progress(v)) => Some(v.progress.done_bytes),
            _ => None,
        })
        .collect();
    assert_eq!(progress.last(), Some(&(data.len() as u64)));
    assert!(progress.len() < 200, "{} progress events", progress.len());
    // The resume record was saved along the way.
    assert!(sim.nodes[0].records.contains_key(&root));
}

#[test]
fn a_complete_file_that_cannot_be_put_in_place_is_reported_failed_not_lost() {
    let mut sim = mesh(8, &["rx", "tx"]);
    sim.nodes[0].fail_finish = true;
    let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let (root, digest) = root_of(&data);
    sim.nodes[1].files.insert(root, data);
    sim.nodes[1].node.share(digest.root, digest.size, digest.cvs).unwrap();
    let (now, rx) = (sim.now, sim.id(0));
    let id = sim.nodes[1].node.offer(now, &rx, &[(root, "f.bin".to_string())]).unwrap();
    sim.drain(1);
    sim.run_until(Duration::from_secs(5), "offer", |s| {
        !s.node(0).engine().pending_offers().is_empty()
    });
    let (now, tx) = (sim.now, sim.id(1));
    sim.nodes[0].node.accept(now, &tx, id).unwrap();
    sim.drain(0);
    sim.run_until(Duration::from_secs(30), "failed", |s| {
        s.nodes[0]
            .events
            .iter()
            .any(|e| matches!(e, Event::File(FileEvent::Engine(TransferEvent::FileFailed { .. }))))
    });
    let reason = sim.nodes[0].events.iter().find_map(|e| match e {
        Event::File(FileEvent::Engine(TransferEvent::FileFailed { reason, .. })) => {
            Some(reason.to_string())
        }
        _ => None,
    });
    assert_eq!(
        reason.as_deref(),
        Some("the file is complete but cannot be saved: the browser did not save the download")
    );
    assert!(!sim.nodes[0].events.iter().any(|e| matches!(e, Event::File(FileEvent::Saved { .. }))));
    let state = sim.node(0).engine().progress(&root).map(|p| p.state);
    assert_eq!(state, Some(weft_core::transfer::DownloadState::Failed));
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = |seed| {
        let mut sim = mesh(seed, &["a", "b", "c"]);
        sim.restart_server(Duration::from_secs(2));
        sim.run_for(Duration::from_secs(20));
        sim.trace
    };
    let (one, two) = (run(7), run(7));
    assert!(one.len() > 20);
    assert_eq!(one, two);
}

#[allow(dead_code)]
fn room(sim: &Sim) -> RoomId {
    sim.network.room_id().clone()
}

/// The bench's sequence: the same file downloaded, forgotten and offered again, first from
/// one seeder, then with a second seeder that only shares it (never offers).
#[test]
fn the_same_file_downloaded_again_after_forgetting_it_with_a_seeder_that_only_shares() {
    let mut sim = mesh(9, &["rx", "alice", "carol"]);
    sim.data_loss = 0;
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 777u32).map(|i| (i * 13 + i / 999) as u8).collect();
    let (root, digest) = root_of(&data);
    sim.nodes[1].files.insert(root, data.clone());
    sim.nodes[1].node.share(digest.root, digest.size, digest.cvs.clone()).unwrap();
    let (rx, alice) = (sim.id(0), sim.id(1));
    for run in 0..6 {
        if run == 2 {
            sim.nodes[2].files.insert(root, data.clone());
            sim.nodes[2].node.share(digest.root, digest.size, digest.cvs.clone()).unwrap();
            sim.drain(2);
        }
        let now = sim.now;
        if sim.node(0).engine().progress(&root).is_some() {
            sim.nodes[0].node.forget_download(now, &root);
            sim.drain(0);
            sim.nodes[0].files.remove(&root);
        }
        let saved_before = sim.nodes[0]
            .events
            .iter()
            .filter(|e| matches!(e, Event::File(FileEvent::Saved { .. })))
            .count();
        let offers_before = sim.node(0).engine().pending_offers().len();
        let id = sim.nodes[1].node.offer(now, &rx, &[(root, "bench.bin".to_string())]).unwrap();
        sim.drain(1);
        sim.run_until(Duration::from_secs(5), "the offer", |s| {
            s.node(0).engine().pending_offers().len() > offers_before
        });
        let now = sim.now;
        sim.nodes[0].node.accept(now, &alice, id).unwrap();
        sim.drain(0);
        sim.run_until(Duration::from_secs(60), &format!("run {run} to complete"), |s| {
            s.nodes[0]
                .events
                .iter()
                .filter(|e| matches!(e, Event::File(FileEvent::Saved { .. })))
                .count()
                > saved_before
        });
        assert!(
            sim.nodes[0].files.get(&root) == Some(&data),
            "run {run}: the bytes are the file's"
        );
    }
}

#[test]
fn a_relayed_session_looks_for_a_direct_path_with_backoff_and_moves_to_it() {
    let mut sim = Sim::new(11);
    sim.direct_works = false;
    for name in ["ada", "bea"] {
        sim.add_node(name, None);
    }
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    let state = |sim: &Sim, idx: usize| sim.node(idx).peers()[0].state;
    sim.run_until(Duration::from_secs(5), "relayed on both sides", |sim| {
        (0..2).all(|i| state(sim, i) == PeerState::Relayed)
    });
    let relayed_at = sim.now;
    let first = NodeTiming::default().upgrade_first;
    // Nothing is tried at once: the relay works, and the direct attempt just failed.
    sim.run_for(first / 2);
    assert!(sim.restarts.is_empty(), "{:?}", sim.restarts);
    // Then only the impolite side restarts ICE (so both never restart at once), with
    // waits that double: first, 2 × first, 4 × first.
    sim.run_for(first * 7 + first / 2);
    let impolite = usize::from(sim.nodes[0].conns.values().all(|c| c.polite));
    let who: Vec<usize> = sim.restarts.iter().map(|r| r.1).collect();
    assert_eq!(who, vec![impolite; 3], "{:?}", sim.restarts);
    let gaps: Vec<Duration> = sim.restarts.windows(2).map(|w| w[1].0 - w[0].0).collect();
    let near = |gap: Duration, want: Duration| gap >= want && gap <= want + Duration::from_secs(3);
    assert!(gaps.len() == 2 && near(gaps[0], first * 2) && near(gaps[1], first * 4), "{gaps:?}");
    // `first` after the path was first read as relayed, which is before the session is up.
    let since = sim.restarts[0].0 - relayed_at;
    assert!(since + Duration::from_secs(3) >= first && since <= first + Duration::from_secs(3));
    assert!((0..2).all(|i| state(&sim, i) == PeerState::Relayed));
    // Each side shows how it reaches its relay.
    let transport = |sim: &Sim, idx: usize| sim.node(idx).peers()[0].relay_transport;
    assert!((0..2).all(|i| transport(&sim, i) == Some(RelayTransport::Udp)));
    // The network changes: a direct path now exists. The next look finds it and both
    // sides show it, on the same session (no reconnect, no new handshake).
    sim.direct_works = true;
    let conns: Vec<Vec<ConnId>> =
        sim.nodes.iter().map(|n| n.conns.keys().copied().collect()).collect();
    sim.run_until(first * 10, "direct on both sides", |sim| {
        (0..2).all(|i| state(sim, i) == PeerState::Direct)
    });
    assert_eq!(sim.restarts.len(), 4);
    assert!((0..2).all(|i| transport(&sim, i).is_none()));
    let now: Vec<Vec<ConnId>> =
        sim.nodes.iter().map(|n| n.conns.keys().copied().collect()).collect();
    assert_eq!(conns, now, "the session was rebuilt instead of moved");
    // Direct: nothing more is tried.
    sim.run_for(Duration::from_secs(1200));
    assert_eq!(sim.restarts.len(), 4, "{:?}", sim.restarts);
    assert!((0..2).all(|i| state(&sim, i) == PeerState::Direct));
}

// ---------------------------------------------------------------------------------------
// Overlay IP (issue #12): addresses, announcements, policy, cryptokey routing, ICMP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{Icmpv4Type, Icmpv6Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use weft_core::node::{
    IpNet, PeerFilter, PeerRef, RouteKind, RoutePolicy, ipv4_candidate, ipv6_prefix,
};

fn tun() -> RoutingConfig {
    RoutingConfig { tun: true, ..RoutingConfig::default() }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A UDP packet from `src` to `dst`.
fn udp(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    let builder = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            PacketBuilder::ipv4(s.octets(), d.octets(), 64).udp(40000, 53)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            PacketBuilder::ipv6(s.octets(), d.octets(), 64).udp(40000, 53)
        }
        _ => panic!("mixed families"),
    };
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).unwrap();
    out
}

impl Sim {
    /// Node `idx`'s TUN device hands it a packet.
    fn tun_send(&mut self, idx: usize, packet: Vec<u8>) {
        let now = self.now;
        let n = &mut self.nodes[idx];
        n.node.handle_input(now, Input::TunPacket(packet), &mut n.rng);
        self.drain(idx);
    }

    fn ipv4(&self, idx: usize) -> Ipv4Addr {
        self.node(idx).overlay().ipv4.expect("an IPv4 address")
    }

    fn ipv6(&self, idx: usize) -> Ipv6Addr {
        self.node(idx).overlay().ipv6
    }

    fn key(&self, idx: usize) -> weft_core::identity::Fingerprint {
        let own = self.id(idx);
        let other = (0..self.nodes.len()).find(|j| *j != idx && self.nodes[*j].alive).unwrap();
        self.node(other).peer(&own).unwrap().fingerprint.unwrap()
    }

    /// Every live member sees every other's addresses as that member sees its own, and
    /// the drivers were told the same.
    fn addresses_agree(&self) -> bool {
        let alive: Vec<usize> = (0..self.nodes.len()).filter(|i| self.nodes[*i].alive).collect();
        alive.iter().all(|&i| {
            let own = self.node(i).overlay();
            let told = self.nodes[i].overlay.as_ref();
            let told_same = told.is_some_and(|t| t.ipv4 == own.ipv4 && t.ipv6 == own.ipv6);
            told_same
                && own.firm
                && alive.iter().filter(|&&j| j != i).all(|&j| {
                    let Some(id) = self.node(i).own_id() else { return false };
                    self.node(j).peer(id).is_some_and(|p| {
                        p.ipv4 == own.ipv4 && p.ipv6 == Some(own.ipv6) && p.ipv4.is_some()
                    })
                })
        })
    }

    fn lookup(&self, idx: usize, dst: &str) -> Option<weft_core::identity::Fingerprint> {
        self.node(idx).route_table().lookup(ip(dst)).map(|r| r.peer.fingerprint())
    }

    fn verify(&mut self, idx: usize, other: usize) {
        let id = self.id(other);
        self.nodes[idx].node.verify_peer(&id).unwrap();
        self.drain(idx);
    }
}

#[test]
fn every_member_sees_the_same_overlay_addresses() {
    let mut sim = Sim::new(20);
    sim.data_loss = 0;
    for name in ["ada", "bea", "cy"] {
        sim.add_node_with(name, None, tun());
    }
    let browser = sim.add_node("browser", None);
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    sim.run_until(Duration::from_secs(20), "addresses", Sim::addresses_agree);
    let prefix6 = ipv6_prefix(&sim.network);
    let mut v4 = BTreeSet::new();
    for i in 0..4 {
        let o = sim.node(i).overlay();
        assert!(o.ipv4_net.contains(&o.ipv4.unwrap()), "{o:?}");
        assert!(prefix6.contains(&o.ipv6) && o.ipv6_net == prefix6, "{o:?}");
        assert_eq!(o.ipv6.segments()[0] >> 8, 0xfd, "a ULA");
        v4.insert(o.ipv4.unwrap());
    }
    assert_eq!(v4.len(), 4);
    // Another network: another /48 (same keys would keep their IPv4 candidates).
    let other = Sim::new(21).network;
    assert_ne!(ipv6_prefix(&other), prefix6);
    // The browser has addresses too, but no TUN: a packet to it is unreachable.
    let (src, dst) = (IpAddr::V4(sim.ipv4(0)), IpAddr::V4(sim.ipv4(browser)));
    sim.tun_send(0, udp(src, dst, b"hello browser"));
    let icmp = sim.nodes[0].tun_out.pop().expect("an ICMP error");
    let parsed = SlicedPacket::from_ip(&icmp).unwrap();
    assert!(matches!(
        parsed.transport,
        Some(TransportSlice::Icmpv4(ref i)) if matches!(i.icmp_type(), Icmpv4Type::DestinationUnreachable(_))
    ));
    // Both ways between TUN nodes, over IPv4 and IPv6.
    for (from, to) in [(0, 1), (1, 0), (2, 0)] {
        let p4 = udp(IpAddr::V4(sim.ipv4(from)), IpAddr::V4(sim.ipv4(to)), b"v4");
        let p6 = udp(IpAddr::V6(sim.ipv6(from)), IpAddr::V6(sim.ipv6(to)), b"v6");
        sim.tun_send(from, p4.clone());
        sim.tun_send(from, p6.clone());
        sim.run_for(Duration::from_millis(100));
        let got = &sim.nodes[to].tun_out;
        assert!(got.contains(&p4) && got.contains(&p6), "{from} -> {to}");
    }
    let counters = sim.node(0).overlay().counters;
    assert_eq!((counters.dropped_spoofed, counters.dropped_malformed), (0, 0));
    // A peer's name and addresses come in one packet: "connected" already shows them.
    for n in &sim.nodes {
        for e in &n.events {
            if let Event::PeerConnected(p) = e {
                assert!(p.ipv4.is_some() && p.ipv6.is_some(), "{p:?}");
            }
        }
    }
}

/// Two keys whose first IPv4 candidate is the same (a birthday search: about 2^11 keys).
fn colliding_keys() -> (IdentityKeyPair, IdentityKeyPair) {
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let mut seen: BTreeMap<Ipv4Addr, IdentityKeyPair> = BTreeMap::new();
    loop {
        let k = IdentityKeyPair::generate(&mut rng);
        if let Some(other) = seen.insert(ipv4_candidate(k.public(), 0), k.clone()) {
            let (lo, hi) = if other.public() < k.public() { (other, k) } else { (k, other) };
            return (lo, hi);
        }
    }
}

#[test]
fn a_colliding_ipv4_address_is_resolved_the_same_way_everywhere_and_the_incumbent_keeps_it() {
    let (lo, hi) = colliding_keys();
    let x = ipv4_candidate(lo.public(), 0);
    assert_eq!(x, ipv4_candidate(hi.public(), 0));
    // Whichever key sorts lower, the member that had the address first keeps it.
    for (seed, first, second) in [(30, &lo, &hi), (31, &hi, &lo)] {
        let mut sim = Sim::new(seed);
        let a = sim.add_node_with("first", Some(first.clone()), tun());
        sim.run_for(Duration::from_secs(2));
        assert_eq!(sim.ipv4(a), x);
        let o = sim.add_node_with("observer", None, tun());
        let b = sim.add_node_with("second", Some(second.clone()), tun());
        sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
        sim.run_until(Duration::from_secs(30), "addresses", Sim::addresses_agree);
        assert_eq!(sim.ipv4(a), x, "seed {seed}: the incumbent moved");
        assert_eq!(sim.ipv4(b), ipv4_candidate(second.public(), 1), "seed {seed}");
        // The incumbent's driver was never told of another address.
        assert_eq!(sim.nodes[a].overlay.as_ref().unwrap().ipv4, Some(x));
        // The observer routes each address to its holder.
        assert_eq!(sim.lookup(o, &x.to_string()), Some(first.public().fingerprint()));
        let moved = sim.ipv4(b).to_string();
        assert_eq!(sim.lookup(o, &moved), Some(second.public().fingerprint()));
    }
    // Two newcomers joining together, while a member is already there: they agree too.
    let mut sim = Sim::new(32);
    sim.add_node_with("observer", None, tun());
    sim.run_for(Duration::from_secs(2));
    let a = sim.add_node_with("lo", Some(lo.clone()), tun());
    let b = sim.add_node_with("hi", Some(hi.clone()), tun());
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    sim.run_until(Duration::from_secs(30), "addresses", Sim::addresses_agree);
    assert_ne!(sim.ipv4(a), sim.ipv4(b));
    assert!(sim.ipv4(a) == x || sim.ipv4(b) == x);
}

#[test]
fn subnet_and_exit_routes_are_accepted_only_as_the_policy_says() {
    let mut sim = Sim::new(40);
    sim.data_loss = 0;
    let gw_key = IdentityKeyPair::generate(&mut ChaCha20Rng::seed_from_u64(41));
    let gw_fp = gw_key.public().fingerprint();
    let advertise = RoutingConfig {
        tun: true,
        advertise_subnets: vec![net("10.1.0.0/16"), net("fd00:1::/64")],
        advertise_exit: true,
        ..RoutingConfig::default()
    };
    let gw = sim.add_node_with("gw", Some(gw_key), advertise);
    let a = sim.add_node_with("a", None, tun());
    let only_gw = PeerFilter { keys: vec![gw_fp], ..PeerFilter::nobody() };
    let policy = RoutePolicy {
        subnets_from: only_gw,
        exit_from: PeerFilter::nobody(),
        ..RoutePolicy::default()
    };
    let b = sim.add_node_with("b", None, RoutingConfig { tun: true, policy, ..tun() });
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    sim.run_until(Duration::from_secs(20), "addresses", Sim::addresses_agree);

    // a: verified peers only by default, and gw is not verified yet. Its own addresses
    // are accepted all the same.
    assert_eq!(sim.lookup(a, "10.1.2.3"), None);
    assert_eq!(sim.lookup(a, "8.8.8.8"), None);
    assert_eq!(sim.lookup(a, &sim.ipv4(gw).to_string()), Some(gw_fp));
    assert_eq!(sim.node(a).overlay().counters.routes_refused, 4, "two subnets, two exits");
    assert!(sim.node(a).peer(&sim.id(gw)).unwrap().routes.is_empty());
    // b: subnets from gw's key (unverified), exits from nobody.
    assert_eq!(sim.lookup(b, "10.1.2.3"), Some(gw_fp));
    assert_eq!(sim.lookup(b, "fd00:1::9"), Some(gw_fp));
    assert_eq!(sim.lookup(b, "8.8.8.8"), None);
    assert_eq!(sim.node(b).overlay().counters.routes_refused, 2);

    // a verifies gw: now both are installed.
    sim.verify(a, gw);
    assert_eq!(sim.lookup(a, "10.1.2.3"), Some(gw_fp));
    assert_eq!(sim.lookup(a, "8.8.8.8"), Some(gw_fp));
    assert_eq!(sim.lookup(a, "2001:db8::1"), Some(gw_fp));
    let routes = &sim.nodes[a].overlay.as_ref().unwrap().routes;
    assert!(routes.iter().any(|r| r.kind == RouteKind::Exit && r.prefix == net("0.0.0.0/0")));
    // An unknown member address is never sent to the exit node.
    let (me, nobody) = (IpAddr::V4(sim.ipv4(a)), ip("100.100.100.99"));
    sim.tun_send(a, udp(me, nobody, b"x"));
    assert_eq!(sim.nodes[a].tun_out.len(), 1, "an ICMP error, not a packet to the exit");

    // gw serves its subnet and exit only to peers it verified.
    let to_lan = udp(me, ip("10.1.0.5"), b"to the lan");
    sim.tun_send(a, to_lan.clone());
    sim.run_for(Duration::from_millis(100));
    assert!(sim.nodes[gw].tun_out.is_empty());
    let counters = sim.node(gw).overlay().counters;
    assert_eq!((counters.dropped_refused, counters.refused_subnet), (1, 1));
    sim.verify(gw, a);
    sim.tun_send(a, to_lan.clone());
    let to_internet = udp(me, ip("9.9.9.9"), b"through the exit");
    sim.tun_send(a, to_internet.clone());
    sim.run_for(Duration::from_millis(100));
    // The data channel is unordered.
    let mut got = sim.nodes[gw].tun_out.clone();
    got.sort();
    let mut want = vec![to_lan, to_internet];
    want.sort();
    assert_eq!(got, want);
    // The answer from the internet comes back through gw: its source is routed to gw.
    let back = udp(ip("9.9.9.9"), me, b"answer");
    sim.tun_send(gw, back.clone());
    sim.run_for(Duration::from_millis(100));
    assert_eq!(sim.nodes[a].tun_out.last(), Some(&back));
}

/// `--allow`: a node lets only the peers it names (by pinned name, safety code or
/// fingerprint) and those it verified use its subnet, its exit and its own address; every
/// refusal is counted by its reason, and a member's address is never forwarded to.
#[test]
fn only_allowed_peers_reach_a_node_that_names_them() {
    let mut sim = Sim::new(45);
    sim.data_loss = 0;
    let allowed = |words: &[&str]| PeerFilter {
        named: words.iter().map(|w| PeerRef::new(w).unwrap()).collect(),
        ..PeerFilter::verified()
    };
    let mut keys = ChaCha20Rng::seed_from_u64(46);
    let (k_cy, k_di) = (IdentityKeyPair::generate(&mut keys), IdentityKeyPair::generate(&mut keys));
    let cy_code = k_cy.public().fingerprint().short_code();
    let di_hex = k_di.public().fingerprint().to_hex();
    let policy = RoutePolicy {
        serve_to: allowed(&["ada", &cy_code, &di_hex[..12]]),
        own_to: allowed(&["ada", &cy_code, &di_hex[..12]]),
        ..RoutePolicy::default()
    };
    let gw_config = RoutingConfig {
        tun: true,
        advertise_subnets: vec![net("10.1.0.0/16")],
        advertise_exit: true,
        policy,
        fast_path: false,
    };
    let gw = sim.add_node_with("gw", None, gw_config);
    let ada = sim.add_node_with("ada", None, tun());
    let bo = sim.add_node_with("bo", None, tun());
    let cy = sim.add_node_with("cy", Some(k_cy), tun());
    let di = sim.add_node_with("di", Some(k_di), tun());
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    sim.run_until(Duration::from_secs(20), "addresses", Sim::addresses_agree);
    let gw_ip = IpAddr::V4(sim.ipv4(gw));
    for who in [ada, bo, cy, di] {
        sim.verify(who, gw); // they accept gw's routes
    }
    let packets = |sim: &Sim, who: usize| {
        let me = IpAddr::V4(sim.ipv4(who));
        [
            udp(me, gw_ip, b"to gw itself"),
            udp(me, ip("10.1.0.5"), b"to its lan"),
            udp(me, ip("9.9.9.9"), b"through its exit"),
        ]
    };
    for who in [ada, bo, cy, di] {
        for p in packets(&sim, who) {
            sim.tun_send(who, p);
        }
    }
    sim.run_for(Duration::from_millis(100));
    let mut got = sim.nodes[gw].tun_out.clone();
    got.sort();
    let mut want: Vec<Vec<u8>> = [ada, cy, di].iter().flat_map(|w| packets(&sim, *w)).collect();
    want.sort();
    assert_eq!(got, want, "ada by name, cy by safety code, di by fingerprint; not bo");
    let c = sim.node(gw).overlay().counters;
    assert_eq!((c.refused_address, c.refused_subnet, c.refused_exit), (1, 1, 1));
    assert_eq!(c.dropped_refused, 3);
    // Verifying bo lets it in too.
    sim.verify(gw, bo);
    sim.nodes[gw].tun_out.clear();
    for p in packets(&sim, bo) {
        sim.tun_send(bo, p);
    }
    sim.run_for(Duration::from_millis(100));
    assert_eq!(sim.nodes[gw].tun_out.len(), 3);
}

#[test]
fn a_spoofed_source_address_is_dropped_and_counted() {
    let mut sim = Sim::new(50);
    sim.data_loss = 0;
    for name in ["a", "b", "c"] {
        sim.add_node_with(name, None, tun());
    }
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    sim.run_until(Duration::from_secs(20), "addresses", Sim::addresses_agree);
    let (a, b, c) = (0, 1, 2);
    let to_a = IpAddr::V4(sim.ipv4(a));
    // b pretends to be c, then someone outside the overlay, then itself.
    for src in [IpAddr::V4(sim.ipv4(c)), ip("10.9.9.9"), IpAddr::V4(sim.ipv4(b))] {
        sim.tun_send(b, udp(src, to_a, b"who am i"));
    }
    let v6 = udp(IpAddr::V6(sim.ipv6(c)), IpAddr::V6(sim.ipv6(a)), b"v6 spoof");
    sim.tun_send(b, v6);
    sim.run_for(Duration::from_millis(100));
    let genuine = udp(IpAddr::V4(sim.ipv4(b)), to_a, b"who am i");
    assert_eq!(sim.nodes[a].tun_out, vec![genuine]);
    let counters = sim.node(a).overlay().counters;
    assert_eq!((counters.dropped_spoofed, counters.received), (3, 1));
    assert_eq!(sim.node(a).peer(&sim.id(b)).unwrap().dropped_spoofed, 3);
    assert_eq!(sim.node(a).peer(&sim.id(c)).unwrap().dropped_spoofed, 0);
}

/// The ICMP error's bytes parse: from our address to the packet's source, of the right
/// kind, with a valid checksum, quoting the packet.
fn check_unreachable(icmp: &[u8], original: &[u8], from: IpAddr, v4_code: u8, v6_code: u8) {
    let parsed = SlicedPacket::from_ip(icmp).unwrap();
    let orig = SlicedPacket::from_ip(original).unwrap();
    match (parsed.net.unwrap(), orig.net.unwrap(), parsed.transport.unwrap()) {
        (NetSlice::Ipv4(n), NetSlice::Ipv4(o), TransportSlice::Icmpv4(i)) => {
            assert_eq!(IpAddr::V4(n.header().source_addr()), from);
            assert_eq!(n.header().destination_addr(), o.header().source_addr());
            let Icmpv4Type::DestinationUnreachable(h) = i.icmp_type() else { panic!() };
            assert_eq!(h.code_u8(), v4_code);
            assert_eq!(i.checksum(), i.icmp_type().calc_checksum(i.payload()));
            assert!(original.starts_with(i.payload()) && !i.payload().is_empty());
        }
        (NetSlice::Ipv6(n), NetSlice::Ipv6(o), TransportSlice::Icmpv6(i)) => {
            assert_eq!(IpAddr::V6(n.header().source_addr()), from);
            assert_eq!(n.header().destination_addr(), o.header().source_addr());
            let Icmpv6Type::DestinationUnreachable(code) = i.icmp_type() else { panic!() };
            assert_eq!(code.code_u8(), v6_code);
            let sum = i
                .icmp_type()
                .calc_checksum(
                    n.header().source_addr().octets(),
                    n.header().destination_addr().octets(),
                    i.payload(),
                )
                .unwrap();
            assert_eq!(i.checksum(), sum);
            assert!(original.starts_with(i.payload()));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_unknown_destination_gets_an_icmp_unreachable_whose_bytes_parse() {
    let mut sim = Sim::new(60);
    sim.add_node_with("a", None, tun());
    sim.run_for(Duration::from_secs(1));
    let (me4, me6) = (IpAddr::V4(sim.ipv4(0)), IpAddr::V6(sim.ipv6(0)));
    let unknown_member6 = {
        let mut o = sim.ipv6(0).octets();
        o[15] ^= 1;
        IpAddr::V6(Ipv6Addr::from(o))
    };
    let big = vec![7u8; 1400];
    let cases = [
        (me4, ip("100.100.1.1"), 1, 3, &b"member"[..]),
        (me4, ip("8.8.8.8"), 0, 0, &b"internet"[..]),
        (me6, unknown_member6, 1, 3, &b"member"[..]),
        (me6, ip("2001:db8::1"), 0, 0, &big[..]),
        (me4, ip("1.1.1.1"), 0, 0, &big[..]),
    ];
    for (src, dst, v4_code, v6_code, payload) in cases {
        let packet = udp(src, dst, payload);
        sim.tun_send(0, packet.clone());
        let icmp = sim.nodes[0].tun_out.pop().unwrap_or_else(|| panic!("no ICMP for {dst}"));
        assert!(icmp.len() <= if src.is_ipv4() { 576 } else { 1280 });
        check_unreachable(&icmp, &packet, src, v4_code, v6_code);
        // An ICMP error is never answered with another.
        sim.tun_send(0, icmp);
        assert!(sim.nodes[0].tun_out.is_empty(), "an error about an error");
    }
    // A program probing unreachable addresses in a loop gets at most 100 errors a second.
    sim.run_for(Duration::from_secs(2));
    let probe = udp(me4, ip("100.100.1.1"), b"again");
    for _ in 0..150 {
        sim.tun_send(0, probe.clone());
    }
    assert_eq!(sim.nodes[0].tun_out.len(), 100);
    sim.nodes[0].tun_out.clear();
    sim.run_for(Duration::from_millis(100));
    for _ in 0..20 {
        sim.tun_send(0, probe.clone());
    }
    assert_eq!(sim.nodes[0].tun_out.len(), 10, "refilled at 100 a second");
    sim.nodes[0].tun_out.clear();
    // Garbage from the TUN is dropped and counted.
    sim.tun_send(0, vec![0x45, 0, 0]);
    sim.tun_send(0, Vec::new());
    let counters = sim.node(0).overlay().counters;
    assert_eq!((counters.dropped_malformed, counters.unreachable), (2, 10 + 150 + 20));
    assert!(sim.nodes[0].tun_out.is_empty());
}

#[test]
fn the_longest_prefix_wins_and_ties_go_to_the_lower_key_with_a_session() {
    let mut sim = Sim::new(70);
    sim.data_loss = 0;
    let subnets = |nets: &[&str]| RoutingConfig {
        tun: true,
        advertise_subnets: nets.iter().map(|n| net(n)).collect(),
        ..RoutingConfig::default()
    };
    let mut keys = ChaCha20Rng::seed_from_u64(71);
    let (k_wide, k_n1, k_n2) = (
        IdentityKeyPair::generate(&mut keys),
        IdentityKeyPair::generate(&mut keys),
        IdentityKeyPair::generate(&mut keys),
    );
    let a = sim.add_node_with("a", None, tun());
    let wide = sim.add_node_with("wide", Some(k_wide.clone()), subnets(&["10.0.0.0/8"]));
    let n1 = sim.add_node_with("n1", Some(k_n1.clone()), subnets(&["10.1.0.0/16", "10.1.2.0/24"]));
    let n2 = sim.add_node_with("n2", Some(k_n2.clone()), subnets(&["10.1.0.0/16"]));
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    sim.run_until(Duration::from_secs(20), "addresses", Sim::addresses_agree);
    for other in [wide, n1, n2] {
        sim.verify(a, other);
    }
    let fp = |k: &IdentityKeyPair| k.public().fingerprint();
    assert_eq!(sim.lookup(a, "10.9.9.9"), Some(fp(&k_wide)), "only the /8 holds it");
    assert_eq!(sim.lookup(a, "10.1.2.3"), Some(fp(&k_n1)), "a /24 beats a /16 and a /8");
    // 10.1.3.3: the /16 of both n1 and n2. Both have sessions: the lower key wins, the
    // other stays in the table as a standby.
    let (lower, higher, lo_idx) = if k_n1.public() < k_n2.public() {
        (fp(&k_n1), fp(&k_n2), n1)
    } else {
        (fp(&k_n2), fp(&k_n1), n2)
    };
    assert_eq!(sim.lookup(a, "10.1.3.3"), Some(lower));
    let routes = sim.node(a).overlay().routes;
    let tie: Vec<_> = routes.iter().filter(|r| r.prefix == net("10.1.0.0/16")).collect();
    assert_eq!(tie.len(), 2);
    assert!(tie.iter().any(|r| r.in_use && r.fingerprint == lower));
    assert!(tie.iter().any(|r| !r.in_use && r.fingerprint == higher));
    // The winner vanishes: once its session is gone, the standby takes over.
    sim.crash(lo_idx);
    sim.run_until(Duration::from_secs(40), "failover", |s| s.lookup(a, "10.1.3.3") == Some(higher));
    assert_eq!(sim.lookup(a, "10.9.9.9"), Some(fp(&k_wide)));
}

#[test]
fn a_peer_that_reconnects_under_a_new_server_id_keeps_its_routes() {
    let mut sim = Sim::new(80);
    sim.data_loss = 0;
    let advertise = RoutingConfig {
        tun: true,
        advertise_subnets: vec![net("192.168.7.0/24")],
        ..RoutingConfig::default()
    };
    let a = sim.add_node_with("a", None, tun());
    let gw = sim.add_node_with("gw", None, advertise);
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    sim.run_until(Duration::from_secs(20), "addresses", Sim::addresses_agree);
    sim.verify(a, gw);
    sim.verify(gw, a);
    let (old_id, key, gw_ip) = (sim.id(gw), sim.key(gw), sim.ipv4(gw));
    let me = IpAddr::V4(sim.ipv4(a));
    let p1 = udp(me, ip("192.168.7.7"), b"before");
    sim.tun_send(a, p1.clone());
    sim.run_for(Duration::from_millis(100));
    assert_eq!(sim.nodes[gw].tun_out, vec![p1.clone()]);
    sim.restart_server(Duration::from_secs(3));
    let (gone, until) = (sim.now + Duration::from_secs(1), sim.now + Duration::from_secs(30));
    while sim.now < gone
        || !(sim.nodes.iter().all(|n| n.node.own_id().is_some()) && sim.fully_meshed())
    {
        assert!(sim.step(until), "rejoin");
        assert_eq!(sim.lookup(a, "192.168.7.1"), Some(key), "the route went at {:?}", sim.now);
    }
    assert_ne!(sim.id(gw), old_id);
    sim.run_for(Duration::from_secs(1));
    let info = sim.node(a).peer(&sim.id(gw)).unwrap();
    assert_eq!((info.ipv4, info.routes.clone()), (Some(gw_ip), vec![net("192.168.7.0/24")]));
    let p2 = udp(me, ip("192.168.7.7"), b"after");
    sim.tun_send(a, p2.clone());
    sim.run_for(Duration::from_millis(100));
    assert_eq!(sim.nodes[gw].tun_out, vec![p1, p2]);
}

/// The `.weft` resolver (`core/src/node/dns.rs`): a query from the host to 100.100.100.100
/// is answered from the members, by name only for the key pinned under it; an impostor
/// whose name gives the same label never gets it; other names go to the host's resolvers
/// and only their reply to that query comes back.
#[cfg(feature = "dns")]
#[test]
fn the_resolver_finds_members_by_name_never_an_impostor_and_forwards_the_rest() {
    use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};
    use weft_core::node::dns::RESOLVER_V4;

    fn ask(id: u16, name: &str, kind: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(id).set_message_type(MessageType::Query).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        m.to_vec().unwrap()
    }
    /// Node 0's host asks `name`; the reply written to its TUN, from the resolver.
    fn resolve(sim: &mut Sim, name: &str, kind: RecordType) -> Message {
        let client = IpAddr::V4(sim.ipv4(0));
        sim.tun_send(0, udp(client, IpAddr::V4(RESOLVER_V4), &ask(7, name, kind)));
        let packet = sim.nodes[0].tun_out.pop().expect("a DNS reply");
        let parsed = SlicedPacket::from_ip(&packet).unwrap();
        let Some(TransportSlice::Udp(u)) = parsed.transport else { panic!("not UDP") };
        let Some(NetSlice::Ipv4(v4)) = parsed.net else { panic!("not IPv4") };
        assert_eq!(
            (v4.header().source_addr(), u.source_port(), v4.header().destination_addr()),
            (RESOLVER_V4, 53, sim.ipv4(0))
        );
        assert_eq!(u.destination_port(), 40000);
        Message::from_vec(u.payload()).unwrap()
    }
    fn a(m: &Message) -> Vec<String> {
        m.answers().iter().map(|r| r.data().to_string()).collect()
    }

    let mut sim = Sim::new(33);
    sim.data_loss = 0;
    for name in ["ada", "bea", "Cy Laptop"] {
        sim.add_node_with(name, None, tun());
    }
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    sim.run_until(Duration::from_secs(20), "addresses", Sim::addresses_agree);
    let (bea, cy) = (sim.ipv4(1).to_string(), sim.ipv6(2).to_string());

    assert_eq!(a(&resolve(&mut sim, "bea.weft.", RecordType::A)), std::slice::from_ref(&bea));
    assert_eq!(a(&resolve(&mut sim, "CY-laptop.weft.", RecordType::AAAA)), [cy]);
    assert_eq!(a(&resolve(&mut sim, "ada.weft.", RecordType::A)), [sim.ipv4(0).to_string()]);
    let code = sim.key(1).short_code().replace(' ', "-");
    assert_eq!(
        a(&resolve(&mut sim, &format!("{code}.weft."), RecordType::A)),
        std::slice::from_ref(&bea)
    );
    let reverse = sim.ipv4(1).octets().iter().rev().map(u8::to_string).collect::<Vec<_>>();
    let ptr = format!("{}.in-addr.arpa.", reverse.join("."));
    assert_eq!(a(&resolve(&mut sim, &ptr, RecordType::PTR)), ["bea.weft."]);
    let none = resolve(&mut sim, "dee.weft.", RecordType::A);
    assert_eq!(none.response_code(), ResponseCode::NXDomain);

    // An impostor whose name gives the same label joins: "bea.weft" never finds it.
    let impostor = sim.add_node_with("Bea!", None, tun());
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    sim.run_until(Duration::from_secs(20), "addresses", Sim::addresses_agree);
    let impostor_ip = sim.ipv4(impostor).to_string();
    let got = a(&resolve(&mut sim, "bea.weft.", RecordType::A));
    assert!(!got.contains(&impostor_ip), "the impostor got the name: {got:?}");
    // Verified, bea has its name whoever else shares the label.
    sim.verify(0, 1);
    assert_eq!(a(&resolve(&mut sim, "bea.weft.", RecordType::A)), [bea]);

    // Other names: forwarded, and only the reply to that query comes back.
    let client = IpAddr::V4(sim.ipv4(0));
    let query = ask(9, "example.com.", RecordType::A);
    sim.tun_send(0, udp(client, IpAddr::V4(RESOLVER_V4), &query));
    let (id, forwarded) = sim.nodes[0].dns_forwards.pop().expect("a forward");
    assert_eq!(forwarded, query);
    let mut answer = Message::from_vec(&query).unwrap();
    answer.set_message_type(MessageType::Response);
    let answer = answer.to_vec().unwrap();
    let now = sim.now;
    let n = &mut sim.nodes[0];
    n.node.handle_input(now, Input::DnsForwarded { id, reply: Some(answer.clone()) }, &mut n.rng);
    sim.drain(0);
    let packet = sim.nodes[0].tun_out.pop().expect("the forwarded reply");
    let Some(TransportSlice::Udp(u)) = SlicedPacket::from_ip(&packet).unwrap().transport else {
        panic!("not UDP")
    };
    assert_eq!(u.payload(), &answer[..]);
    // A reply to another query (a spoofed id), or none at all: SERVFAIL, never passed on.
    for reply in [Some(ask(10, "example.com.", RecordType::A)), None] {
        sim.tun_send(0, udp(client, IpAddr::V4(RESOLVER_V4), &query));
        let (id, _) = sim.nodes[0].dns_forwards.pop().expect("a forward");
        let n = &mut sim.nodes[0];
        n.node.handle_input(now, Input::DnsForwarded { id, reply }, &mut n.rng);
        sim.drain(0);
        let packet = sim.nodes[0].tun_out.pop().expect("a SERVFAIL");
        let Some(TransportSlice::Udp(u)) = SlicedPacket::from_ip(&packet).unwrap().transport else {
            panic!("not UDP")
        };
        let m = Message::from_vec(u.payload()).unwrap();
        assert_eq!((m.id(), m.response_code()), (9, ResponseCode::ServFail));
    }
}

/// Forgetting a complete download that came under a stream key (offered before it was
/// hashed) deletes what was stored under that key, not under its root (which names no
/// stored data), and stops serving it: its bytes are gone. (Before, the page deleted a
/// file that did not exist, kept the real one for ever, and went on offering it.)
#[test]
fn forgetting_a_download_named_by_a_stream_key_deletes_its_stored_bytes_and_stops_serving_it() {
    let mut sim = mesh(9, &["tx", "rx"]);
    sim.data_loss = 0;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 11 + i / 77) as u8).collect();
    let (_, digest) = root_of(&data);
    let local = sim.nodes[0].node.share_streamed(data.len() as u64);
    sim.nodes[0].files.insert(local, data.clone());
    let now = sim.now;
    sim.nodes[0].node.file_hashed(now, &local, &digest.cvs);
    sim.nodes[0].node.file_hash_done(now, &local, digest.clone()).unwrap();
    sim.drain(0);
    let (tx, rx) = (sim.id(0), sim.id(1));
    let id = sim.nodes[0].node.offer(now, &rx, &[(local, "f.bin".to_string())]).unwrap();
    sim.drain(0);
    sim.run_until(Duration::from_secs(5), "the offer", |s| {
        !s.node(1).engine().pending_offers().is_empty()
    });
    let now = sim.now;
    sim.nodes[1].node.accept(now, &tx, id).unwrap();
    sim.drain(1);
    sim.run_until(Duration::from_secs(30), "the download", |s| {
        s.nodes[1].events.iter().any(|e| matches!(e, Event::File(FileEvent::Saved { .. })))
    });
    let key = sim.node(1).engine().progress(&digest.root).unwrap().key;
    assert_ne!(key, digest.root, "offered under a stream key");
    assert_eq!(sim.nodes[1].files.get(&key), Some(&data), "stored under its key");
    assert!(sim.node(1).engine().is_shared(&digest.root));

    let now = sim.now;
    sim.nodes[1].node.forget_download(now, &digest.root);
    let mut discarded = Vec::new();
    while let Some(out) = sim.nodes[1].node.poll_output() {
        if let Output::Discard { root } = out {
            discarded.push(root);
        }
    }
    assert_eq!(discarded, vec![key], "what is stored is deleted, under the name it has");
    assert!(!sim.node(1).engine().is_shared(&digest.root), "its bytes are gone");
    assert!(!sim.node(1).engine().is_shared(&key));
}

/// A file offered before it was hashed is shared only for its offers: once every offer
/// of it was declined or cancelled, the node stops sharing it and tells the driver to
/// stop hashing it (`hashing_wanted`), so a page does not read gigabytes for nobody.
#[test]
fn a_file_offered_before_it_is_hashed_stops_being_shared_when_no_offer_wants_it() {
    let mut sim = mesh(9, &["tx", "a", "b"]);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    let local = sim.nodes[0].node.share_streamed(data.len() as u64);
    sim.nodes[0].files.insert(local, data);
    let (now, a, b) = (sim.now, sim.id(1), sim.id(2));
    let to_a = sim.nodes[0].node.offer(now, &a, &[(local, "f.bin".to_string())]).unwrap();
    let to_b = sim.nodes[0].node.offer(now, &b, &[(local, "f.bin".to_string())]).unwrap();
    sim.drain(0);
    sim.run_until(Duration::from_secs(5), "offers", |s| {
        [1, 2].iter().all(|&n| !s.node(n).engine().pending_offers().is_empty())
    });

    // One receiver declines: the other offer still wants it.
    let (now, tx) = (sim.now, sim.id(0));
    sim.nodes[1].node.decline(now, &tx, to_a).unwrap();
    sim.drain(1);
    sim.run_until(Duration::from_secs(5), "declined", |s| {
        s.nodes[0].events.iter().any(|e| {
            matches!(
                e,
                Event::File(FileEvent::Engine(TransferEvent::Answered { accepted: false, .. }))
            )
        })
    });
    assert!(sim.node(0).hashing_wanted(&local));
    assert!(sim.node(0).engine().is_shared(&local));

    // The other accepts, then cancels: nothing wants it any more.
    let now = sim.now;
    sim.nodes[2].node.accept(now, &tx, to_b).unwrap();
    sim.drain(2);
    sim.run_for(Duration::from_millis(200));
    let now = sim.now;
    let reason = weft_core::transfer::CancelReason::Text("no".into());
    sim.nodes[2].node.cancel(now, &tx, to_b, false, reason).unwrap();
    sim.drain(2);
    sim.run_until(Duration::from_secs(5), "cancelled", |s| {
        s.nodes[0]
            .events
            .iter()
            .any(|e| matches!(e, Event::File(FileEvent::Engine(TransferEvent::Cancelled { .. }))))
    });
    assert!(!sim.node(0).hashing_wanted(&local));
    assert!(!sim.node(0).engine().is_shared(&local));
}

/// Two native peers with TUN devices: IP packets go on the fast UDP path once a probe on
/// it was answered, fall back to the data channel when it stops answering (a firewall
/// drops its datagrams) and return when probes get through again. A browser-like node (no
/// driver support) and a node with the fast path turned off keep the data channel.
#[test]
fn ip_packets_take_the_fast_path_fall_back_to_the_data_channel_and_come_back() {
    use weft_core::node::{DEAD_AFTER, FastPathState, PROBE_MAX_INTERVAL};
    let mut sim = Sim::new(70);
    sim.data_loss = 0;
    sim.fast_path_driver = true;
    let fast = RoutingConfig { fast_path: true, ..tun() };
    let a = sim.add_node_with("ada", None, fast.clone());
    let b = sim.add_node_with("bea", None, fast.clone());
    let c = sim.add_node_with("cy", None, tun());
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    sim.run_until(Duration::from_secs(20), "addresses", Sim::addresses_agree);
    let state =
        |sim: &Sim, from: usize, to: usize| sim.node(from).peer(&sim.id(to)).map(|p| p.fast_path);
    sim.run_until(Duration::from_secs(2), "fast path up", |sim| {
        state(sim, a, b) == Some(FastPathState::Up) && state(sim, b, a) == Some(FastPathState::Up)
    });
    // cy has it off: it answers no probe, so nobody sends it anything but on the data
    // channel; and it never probes.
    assert_ne!(state(&sim, a, c), Some(FastPathState::Up));
    assert_eq!(state(&sim, c, a), Some(FastPathState::Unavailable));

    // Sends `n` packets a -> b, one every 10 ms; how many arrived, and on which path.
    let send = |sim: &mut Sim, n: u32| {
        sim.fast_sent = vec![0; 3];
        sim.data_sent = vec![0; 3];
        sim.nodes[b].tun_out.clear();
        for i in 0..n {
            let p = udp(IpAddr::V4(sim.ipv4(a)), IpAddr::V4(sim.ipv4(b)), &i.to_be_bytes());
            sim.tun_send(a, p);
            sim.run_for(Duration::from_millis(10));
        }
        sim.run_for(Duration::from_millis(100));
        (sim.nodes[b].tun_out.len() as u32, sim.fast_sent[a], sim.data_sent[a])
    };
    let (got, fast_sent, data_sent) = send(&mut sim, 200);
    assert_eq!(got, 200);
    assert_eq!(data_sent, 0);
    // The packets, and a keepalive probe or two.
    assert!((200..=205).contains(&fast_sent), "{fast_sent}");

    // Blocked: packets sent before the path is given up are lost (as on any path that
    // dies); after DEAD_AFTER they go on the data channel.
    sim.fast_path_blocked = true;
    let n = u32::try_from((DEAD_AFTER.as_millis() + 200) / 10).unwrap();
    let (got, _, data_sent) = send(&mut sim, n);
    assert_eq!(state(&sim, a, b), Some(FastPathState::Fallback));
    assert!(data_sent >= 10 && got >= data_sent, "{got} {data_sent}");
    let (got, _, data_sent) = send(&mut sim, 100);
    assert_eq!((got, data_sent), (100, 100));
    assert_eq!(state(&sim, a, b), Some(FastPathState::Fallback));

    // Unblocked: the next probe brings it back.
    sim.fast_path_blocked = false;
    sim.run_until(PROBE_MAX_INTERVAL + Duration::from_millis(100), "back up", |sim| {
        state(sim, a, b) == Some(FastPathState::Up)
    });
    let (got, fast_sent, data_sent) = send(&mut sim, 100);
    assert_eq!((got, data_sent), (100, 0));
    assert!(fast_sent >= 100);

    // cy got its packets on the data channel all along.
    let p = udp(IpAddr::V4(sim.ipv4(a)), IpAddr::V4(sim.ipv4(c)), b"to cy");
    sim.data_sent = vec![0; 3];
    sim.tun_send(a, p.clone());
    sim.run_for(Duration::from_millis(100));
    assert_eq!(sim.data_sent[a], 1);
    assert!(sim.nodes[c].tun_out.contains(&p));
}

/// A session that started on the relay and that ICE moved to a direct pair (renomination:
/// the driver reports the new pair as a fast-path pair) shows `direct` at once, not at the
/// next periodic reading of the path (`NodeTiming::path_every`).
#[test]
fn a_session_moved_to_a_direct_pair_shows_it_at_once() {
    let mut sim = Sim::new(73);
    sim.direct_works = false;
    let a = sim.add_node("ada", None);
    let b = sim.add_node("bea", None);
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    let state = |sim: &Sim, from: usize, to: usize| sim.node(from).peer(&sim.id(to)).unwrap().state;
    sim.run_until(Duration::from_secs(5), "relayed on both sides", |sim| {
        state(sim, a, b) == PeerState::Relayed && state(sim, b, a) == PeerState::Relayed
    });
    // Just after a periodic reading, so the next one is far off.
    let every = NodeTiming::default().path_every;
    sim.run_for(every + every / 2);
    sim.direct_works = true;
    for idx in [a, b] {
        let conns: Vec<ConnId> = sim.nodes[idx].conns.keys().copied().collect();
        for conn in conns {
            sim.nodes[idx].conns.get_mut(&conn).unwrap().relayed = false;
            let event = ConnectionEvent::FastPath { pair: Some(1) };
            sim.deliver(idx, MS, Input::Connection { conn, event });
        }
    }
    sim.run_for(20 * MS);
    assert_eq!(state(&sim, a, b), PeerState::Direct);
    assert_eq!(state(&sim, b, a), PeerState::Direct);
}

/// A relayed pair never takes the fast path, even where the driver could send. Guards the
/// `!slot.relayed` of `Node::update_fast_path`: without it the node probes on the relayed
/// pair and the simulated driver's check (fast-path datagrams only on a direct pair) fails.
#[test]
fn a_relayed_session_keeps_the_data_channel() {
    use weft_core::node::FastPathState;
    let mut sim = Sim::new(71);
    sim.data_loss = 0;
    sim.direct_works = false;
    sim.fast_path_driver = true;
    let fast = RoutingConfig { fast_path: true, ..tun() };
    let a = sim.add_node_with("ada", None, fast.clone());
    let b = sim.add_node_with("bea", None, fast);
    sim.run_until(Duration::from_secs(30), "mesh", Sim::fully_meshed);
    sim.run_for(Duration::from_secs(5));
    let info = sim.node(a).peer(&sim.id(b)).unwrap();
    assert_eq!(info.state, PeerState::Relayed);
    assert_eq!(info.fast_path, FastPathState::Unavailable);
    assert!(sim.fast_sent.iter().all(|n| *n == 0));
}
