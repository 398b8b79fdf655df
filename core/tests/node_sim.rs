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
    NodeError, Output, PeerState, SavedTo, SignalingEvent,
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
    /// A record save is running.
    saving: bool,
}

#[derive(Default)]
struct Server {
    up: bool,
    /// socket → (node, its peer id once joined)
    sockets: BTreeMap<u64, (usize, Option<PeerId>)>,
    next_socket: u64,
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
        let mut rng = ChaCha20Rng::seed_from_u64(self.rng.next_u64());
        let identity = identity.unwrap_or_else(|| IdentityKeyPair::generate(&mut rng));
        let config = NodeConfig::new(
            identity,
            self.network.clone(),
            name,
            TrustStore::new(),
            DownloadStore::Kept,
            rng.next_u64() >> 12,
        );
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
            saving: false,
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
                let id = PeerId::new(format!("p{:08x}", self.rng.next_u32())).unwrap();
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
                if let (Some(from), Some(target)) = (from, target) {
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
            Output::SignalingConnect => {
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
                let event = ConnectionEvent::Received(bytes);
                self.deliver(peer, delay, Input::Connection { conn: remote_conn, event });
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
                let event = ConnectionEvent::Path { relayed: c.relayed, rtt: Some(20 * MS) };
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
        self.deliver(
            idx,
            CONTROL_DELAY,
            Input::Connection { conn, event: ConnectionEvent::Ice(IceState::Connected) },
        );
        let event = ConnectionEvent::ControlOpen { local_sdp, remote_sdp };
        self.deliver(idx, CONTROL_DELAY, Input::Connection { conn, event });
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
    // Nothing is tried at once: the relay works, and the direct attempt just failed.
    sim.run_for(Duration::from_secs(10));
    assert!(sim.restarts.is_empty(), "{:?}", sim.restarts);
    // Then only the impolite side restarts ICE (so both never restart at once), with
    // waits that double: 15 s, 30 s, 60 s.
    sim.run_for(Duration::from_secs(100));
    let impolite = usize::from(sim.nodes[0].conns.values().all(|c| c.polite));
    let who: Vec<usize> = sim.restarts.iter().map(|r| r.1).collect();
    assert_eq!(who, vec![impolite; 3], "{:?}", sim.restarts);
    let gaps: Vec<u64> = sim.restarts.windows(2).map(|w| (w[1].0 - w[0].0).as_secs()).collect();
    assert!(gaps.len() == 2 && (30..=33).contains(&gaps[0]) && (60..=63).contains(&gaps[1]));
    // 15 s after the path was first read as relayed, which is before the session is up.
    let first = sim.restarts[0].0 - relayed_at;
    assert!(first >= Duration::from_secs(12) && first <= Duration::from_secs(18), "{first:?}");
    assert!((0..2).all(|i| state(&sim, i) == PeerState::Relayed));
    // The network changes: a direct path now exists. The next look finds it and both
    // sides show it, on the same session (no reconnect, no new handshake).
    sim.direct_works = true;
    let conns: Vec<Vec<ConnId>> =
        sim.nodes.iter().map(|n| n.conns.keys().copied().collect()).collect();
    sim.run_until(Duration::from_secs(130), "direct on both sides", |sim| {
        (0..2).all(|i| state(sim, i) == PeerState::Direct)
    });
    assert_eq!(sim.restarts.len(), 4);
    let now: Vec<Vec<ConnId>> =
        sim.nodes.iter().map(|n| n.conns.keys().copied().collect()).collect();
    assert_eq!(conns, now, "the session was rebuilt instead of moved");
    // Direct: nothing more is tried.
    sim.run_for(Duration::from_secs(1200));
    assert_eq!(sim.restarts.len(), 4, "{:?}", sim.restarts);
    assert!((0..2).all(|i| state(&sim, i) == PeerState::Direct));
}
