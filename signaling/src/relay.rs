//! The signaling server's rules, without I/O: who is in which room, who may send what to
//! whom, and at what rate. The WebSocket driver (`ws.rs`) feeds decoded messages in and
//! delivers what comes out; time and fresh peer ids are passed in.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use weft_core::signal::{
    ClientMessage, ErrorCode, PROTOCOL_VERSION, PeerId, RoomId, ServerMessage,
};

/// Limits the server enforces. [`Limits::default`] is what `weft-signal` runs with.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest message, in bytes.
    pub max_message_bytes: usize,
    /// Most members in one room.
    pub max_peers_per_room: usize,
    /// Most rooms at once.
    pub max_rooms: usize,
    /// Most WebSocket connections at once.
    pub max_connections: usize,
    /// Sustained messages per second one connection may send.
    pub messages_per_second: f64,
    /// Messages one connection may send in a burst above the sustained rate.
    pub message_burst: f64,
    /// A connection that sends nothing (not even a pong) for this long is closed.
    pub idle_timeout: Duration,
    /// How often the server pings each connection.
    pub ping_interval: Duration,
    /// Most WebSocket connections from one IP address at once.
    pub max_connections_per_ip: usize,
    /// Most rooms the connections from one IP address are in at once.
    pub max_rooms_per_ip: usize,
    /// Bytes waiting to be written to one connection before it counts as too slow and is
    /// dropped (it then leaves its room).
    pub max_outbox_bytes: usize,
    /// How long one write to a connection may take before it counts as too slow (a client
    /// that stopped reading) and is dropped.
    pub send_timeout: Duration,
    /// Take a client's address for the per-address limits from the last `X-Forwarded-For`
    /// entry: only behind a reverse proxy that sets it (else anyone could claim any
    /// address).
    pub trust_forwarded_for: bool,
    /// Origins (`scheme://host[:port]`) whose pages may open the WebSocket, besides the
    /// server's own; empty: any origin may (browsers do not apply CORS to WebSockets, so
    /// this is the server's only say in which sites embed it). Checked by the HTTP layer.
    pub allowed_origins: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // An SDP offer or answer (without candidates: they trickle) is 1-4 KiB.
            max_message_bytes: 16 * 1024,
            max_peers_per_room: 32,
            max_rooms: 10_000,
            max_connections: 20_000,
            messages_per_second: 50.0,
            // A browser joining a full room sends an offer and a dozen candidates to each
            // of up to 31 peers at once.
            message_burst: 500.0,
            idle_timeout: Duration::from_secs(45),
            ping_interval: Duration::from_secs(15),
            // Generous: a school or an office behind one NAT address.
            max_connections_per_ip: 256,
            max_rooms_per_ip: 256,
            // A member joining a full room gets 31 joins and offers at once, a few KiB each.
            max_outbox_bytes: 1024 * 1024,
            send_timeout: Duration::from_secs(10),
            trust_forwarded_for: false,
            allowed_origins: Vec::new(),
        }
    }
}

/// A process of a cluster (`--cluster`), by its id.
pub use crate::cluster::Process;

/// A message for a member on another process of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The process the member's connection is on.
    pub process: Process,
    /// The member's room.
    pub room: RoomId,
    /// The member.
    pub to: PeerId,
    /// The message.
    pub msg: ServerMessage,
}

/// Where a signal goes: [`Relay::route_signal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalRoute {
    /// To a connection of this process.
    Local(ConnId),
    /// To a member of `room` on `process` of the cluster.
    Remote {
        /// The member's process.
        process: Process,
        /// The member's room.
        room: RoomId,
    },
}

/// A room's members on other processes, as this one last learned them.
#[derive(Debug, Default)]
struct Shared {
    revision: u64,
    members: BTreeMap<PeerId, Process>,
}

fn room_full(max: usize) -> String {
    format!("the room has its maximum of {max} peers")
}

/// A connection, as the relay knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// One message for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The recipient.
    pub to: ConnId,
    /// The message.
    pub msg: ServerMessage,
}

#[derive(Debug)]
struct Conn {
    peer_id: PeerId,
    ip: IpAddr,
    room: Option<RoomId>,
    tokens: f64,
    last_refill: Instant,
}

/// Everything the server knows about rooms and members.
#[derive(Debug)]
pub struct Relay {
    limits: Limits,
    conns: HashMap<ConnId, Conn>,
    rooms: HashMap<RoomId, BTreeMap<PeerId, ConnId>>,
    /// Per address: its connections, and how many of them are in each room.
    ips: HashMap<IpAddr, IpUsage>,
    /// In a cluster: per room with members here, its members on other processes.
    shared: HashMap<RoomId, Shared>,
    /// Messages for members on other processes, until [`Relay::take_forwards`].
    forwards: Vec<Forward>,
    /// In a cluster: joins under way per room (between [`Relay::begin_shared_join`] and
    /// [`Relay::join_shared`] or [`Relay::end_shared_join`]), whose room's changes are
    /// kept though it has no member here yet.
    joining: HashMap<RoomId, usize>,
    next_conn: u64,
}

#[derive(Debug, Default)]
struct IpUsage {
    connections: usize,
    rooms: HashMap<RoomId, usize>,
}

impl Relay {
    /// An empty relay.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            conns: HashMap::new(),
            rooms: HashMap::new(),
            ips: HashMap::new(),
            shared: HashMap::new(),
            forwards: Vec::new(),
            joining: HashMap::new(),
            next_conn: 0,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Number of non-empty rooms.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// A new connection from `ip` that the server will call `peer_id`, or
    /// [`ErrorCode::ServerFull`], or [`ErrorCode::AddressConnections`].
    pub fn connect(
        &mut self,
        peer_id: PeerId,
        ip: IpAddr,
        now: Instant,
    ) -> Result<ConnId, ErrorCode> {
        if self.conns.len() >= self.limits.max_connections {
            return Err(ErrorCode::ServerFull);
        }
        let usage = self.ips.entry(ip).or_default();
        if usage.connections >= self.limits.max_connections_per_ip {
            if usage.connections == 0 {
                self.ips.remove(&ip);
            }
            return Err(ErrorCode::AddressConnections);
        }
        usage.connections += 1;
        self.next_conn += 1;
        let id = ConnId(self.next_conn);
        let tokens = self.limits.message_burst;
        self.conns.insert(id, Conn { peer_id, ip, room: None, tokens, last_refill: now });
        Ok(id)
    }

    /// The peer id of `conn`.
    pub fn peer_id(&self, conn: ConnId) -> Option<&PeerId> {
        self.conns.get(&conn).map(|c| &c.peer_id)
    }

    /// The address `conn` comes from.
    pub fn ip_of(&self, conn: ConnId) -> Option<IpAddr> {
        self.conns.get(&conn).map(|c| c.ip)
    }

    /// The room `conn` joined, its peer id and its address, if it has joined.
    pub fn membership(&self, conn: ConnId) -> Option<(RoomId, PeerId, IpAddr)> {
        let c = self.conns.get(&conn)?;
        Some((c.room.clone()?, c.peer_id.clone(), c.ip))
    }

    /// The room `conn` joined, if it has.
    pub fn room_of(&self, conn: ConnId) -> Option<&RoomId> {
        self.conns.get(&conn).and_then(|c| c.room.as_ref())
    }

    /// Charges one incoming frame to `conn`'s rate budget; `false` means drop it and
    /// report [`ErrorCode::RateLimited`]. Every frame counts, valid or not.
    pub fn admit(&mut self, conn: ConnId, now: Instant) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else { return false };
        let elapsed = now.saturating_duration_since(c.last_refill).as_secs_f64();
        c.tokens =
            (c.tokens + elapsed * self.limits.messages_per_second).min(self.limits.message_burst);
        c.last_refill = now;
        if c.tokens >= 1.0 {
            c.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Handles one decoded message from `conn`. Errors for the sender come back as
    /// deliveries to `conn`; a fatal one means the driver closes it after sending.
    pub fn handle(&mut self, conn: ConnId, msg: ClientMessage) -> Vec<Delivery> {
        if !self.conns.contains_key(&conn) {
            return Vec::new();
        }
        let reply = |code: ErrorCode, message: String| {
            vec![Delivery { to: conn, msg: ServerMessage::error(code, message) }]
        };
        match msg {
            ClientMessage::Ping => vec![Delivery { to: conn, msg: ServerMessage::Pong }],
            ClientMessage::Join { version, room } => match self.check_join(conn, version, &room) {
                Err(refused) => refused,
                Ok(()) => {
                    let limits = &self.limits;
                    let members = self.rooms.get(&room).map_or(0, BTreeMap::len);
                    if members >= limits.max_peers_per_room {
                        return reply(ErrorCode::RoomFull, room_full(limits.max_peers_per_room));
                    }
                    self.insert(conn, room)
                }
            },
            ClientMessage::Signal { to, payload } => match self.route_signal(conn, &to) {
                Err(refused) => refused,
                Ok((from, SignalRoute::Local(target))) => {
                    vec![Delivery { to: target, msg: ServerMessage::Signal { from, payload } }]
                }
                Ok((from, SignalRoute::Remote { process, room })) => {
                    let msg = ServerMessage::Signal { from, payload };
                    self.forwards.push(Forward { process, room, to, msg });
                    Vec::new()
                }
            },
            ClientMessage::Leave => self.leave(conn),
        }
    }

    /// Where a signal from `conn` to `to` goes, and the sender's id; `Err` holds the
    /// refusal for the sender. (The relay's hot path: the server routes a signal with this
    /// alone, its payload never parsed; [`Relay::handle`] does the same with a typed one.)
    pub fn route_signal(
        &self,
        conn: ConnId,
        to: &PeerId,
    ) -> Result<(PeerId, SignalRoute), Vec<Delivery>> {
        let reply = |code: ErrorCode, message: String| {
            Err(vec![Delivery { to: conn, msg: ServerMessage::error(code, message) }])
        };
        let Some(c) = self.conns.get(&conn) else { return Err(Vec::new()) };
        let Some(room) = &c.room else {
            return reply(ErrorCode::NotJoined, "join a room before signaling".into());
        };
        let from = c.peer_id.clone();
        match self.rooms.get(room).and_then(|members| members.get(to)) {
            Some(&target) if target != conn => Ok((from, SignalRoute::Local(target))),
            Some(_) => reply(ErrorCode::UnknownPeer, "cannot signal yourself".into()),
            None => match self.shared.get(room).and_then(|s| s.members.get(to)) {
                Some(process) => {
                    let (process, room) = (process.clone(), room.clone());
                    Ok((from, SignalRoute::Remote { process, room }))
                }
                None => reply(ErrorCode::UnknownPeer, format!("no peer {to} in your room")),
            },
        }
    }

    /// Checks a join of `conn` against every limit but the room's size (which a cluster
    /// checks cluster-wide): the version, one room per connection, this server's rooms,
    /// the address's rooms. `Err` holds the refusal for the sender.
    pub fn check_join(
        &self,
        conn: ConnId,
        version: u32,
        room: &RoomId,
    ) -> Result<(), Vec<Delivery>> {
        let error = |code, message: String| {
            Err(vec![Delivery { to: conn, msg: ServerMessage::error(code, message) }])
        };
        let Some(c) = self.conns.get(&conn) else { return Err(Vec::new()) };
        if version != PROTOCOL_VERSION {
            return error(
                ErrorCode::UnsupportedVersion,
                format!(
                    "client speaks protocol version {version}, this server speaks \
                     {PROTOCOL_VERSION}; reload the page or update weft-peer"
                ),
            );
        }
        if let Some(joined) = &c.room {
            return error(
                ErrorCode::AlreadyJoined,
                format!("this connection already joined room {joined}"),
            );
        }
        let limits = &self.limits;
        if !self.rooms.contains_key(room) && self.rooms.len() >= limits.max_rooms {
            return error(
                ErrorCode::TooManyRooms,
                format!("the server holds its maximum of {} rooms", limits.max_rooms),
            );
        }
        let in_rooms = self.ips.get(&c.ip).map(|usage| &usage.rooms);
        if in_rooms.is_some_and(|r| !r.contains_key(room) && r.len() >= limits.max_rooms_per_ip) {
            return error(
                ErrorCode::AddressRooms,
                format!(
                    "your address is in its maximum of {} rooms on this server",
                    limits.max_rooms_per_ip
                ),
            );
        }
        Ok(())
    }

    /// Joins `conn` (checked with [`Relay::check_join`]) to `room` of a cluster, whose
    /// state (compare-and-set by this join) is `revision` with members `others` on other
    /// processes: the welcome lists them too.
    pub fn join_shared(
        &mut self,
        conn: ConnId,
        room: RoomId,
        revision: u64,
        others: BTreeMap<PeerId, Process>,
    ) -> Vec<Delivery> {
        if !self.conns.contains_key(&conn) {
            self.end_shared_join(&room);
            return Vec::new();
        }
        let mut out = self.learn_shared(&room, revision, others);
        out.extend(self.insert(conn, room.clone()));
        self.end_shared_join(&room);
        out
    }

    /// A join to `room` of a cluster starts (the cluster is asked): changes of the room
    /// that arrive meanwhile are kept, so the welcome misses none.
    pub fn begin_shared_join(&mut self, room: &RoomId) {
        *self.joining.entry(room.clone()).or_default() += 1;
    }

    /// A join begun with [`Relay::begin_shared_join`] ended without
    /// [`Relay::join_shared`] (refused, or its connection closed).
    pub fn end_shared_join(&mut self, room: &RoomId) {
        if let Some(n) = self.joining.get_mut(room) {
            *n -= 1;
            if *n == 0 {
                self.joining.remove(room);
                if !self.rooms.contains_key(room) {
                    self.shared.remove(room);
                }
            }
        }
    }

    /// A later state of `room` of a cluster (members `others` on other processes at
    /// `revision`): its members here learn who joined and who left. Ignored for a room
    /// without members here, or older than what is known.
    pub fn apply_shared(
        &mut self,
        room: &RoomId,
        revision: u64,
        others: BTreeMap<PeerId, Process>,
    ) -> Vec<Delivery> {
        if !self.rooms.contains_key(room) && !self.joining.contains_key(room) {
            self.shared.remove(room);
            return Vec::new();
        }
        self.learn_shared(room, revision, others)
    }

    fn learn_shared(
        &mut self,
        room: &RoomId,
        revision: u64,
        others: BTreeMap<PeerId, Process>,
    ) -> Vec<Delivery> {
        let shared = self.shared.entry(room.clone()).or_default();
        if revision <= shared.revision {
            return Vec::new();
        }
        shared.revision = revision;
        let old = std::mem::replace(&mut shared.members, others);
        let Some(local) = self.rooms.get(room) else { return Vec::new() };
        let new = &self.shared[room].members;
        let joined = new
            .keys()
            .filter(|p| !old.contains_key(*p))
            .map(|peer_id| ServerMessage::PeerJoined { peer_id: peer_id.clone() });
        let left = old
            .keys()
            .filter(|p| !new.contains_key(*p))
            .map(|peer_id| ServerMessage::PeerLeft { peer_id: peer_id.clone() });
        left.chain(joined)
            .flat_map(|msg| local.values().map(move |&to| Delivery { to, msg: msg.clone() }))
            .collect()
    }

    /// Rooms with members here that list members of a process `dead` says has no lease.
    pub fn rooms_sharing_with(&self, dead: impl Fn(&str) -> bool) -> Vec<RoomId> {
        self.shared
            .iter()
            .filter(|(_, s)| s.members.values().any(|p| dead(p)))
            .map(|(room, _)| room.clone())
            .collect()
    }

    /// The connection of member `peer` of `room`, if it is here.
    pub fn member(&self, room: &RoomId, peer: &PeerId) -> Option<ConnId> {
        self.rooms.get(room)?.get(peer).copied()
    }

    /// Messages for members on other processes since the last call.
    pub fn take_forwards(&mut self) -> Vec<Forward> {
        std::mem::take(&mut self.forwards)
    }

    /// Puts `conn` into `room` (checked): the members here and in other processes are
    /// in its welcome, and the members here learn it joined.
    fn insert(&mut self, conn: ConnId, room: RoomId) -> Vec<Delivery> {
        let Some(c) = self.conns.get_mut(&conn) else { return Vec::new() };
        let usage = self.ips.entry(c.ip).or_default();
        *usage.rooms.entry(room.clone()).or_default() += 1;
        c.room = Some(room.clone());
        let peer_id = c.peer_id.clone();
        let members = self.rooms.entry(room.clone()).or_default();
        let mut out: Vec<Delivery> = members
            .values()
            .map(|&to| Delivery { to, msg: ServerMessage::PeerJoined { peer_id: peer_id.clone() } })
            .collect();
        let mut peers: Vec<PeerId> = members.keys().cloned().collect();
        if let Some(shared) = self.shared.get(&room) {
            peers.extend(shared.members.keys().cloned());
        }
        members.insert(peer_id.clone(), conn);
        out.push(Delivery {
            to: conn,
            msg: ServerMessage::Welcome { version: PROTOCOL_VERSION, room, peer_id, peers },
        });
        out
    }

    fn leave(&mut self, conn: ConnId) -> Vec<Delivery> {
        let Some(c) = self.conns.get_mut(&conn) else { return Vec::new() };
        let Some(room) = c.room.take() else { return Vec::new() };
        let peer_id = c.peer_id.clone();
        if let Some(usage) = self.ips.get_mut(&c.ip) {
            if let Some(n) = usage.rooms.get_mut(&room) {
                *n -= 1;
                if *n == 0 {
                    usage.rooms.remove(&room);
                }
            }
        }
        let Some(members) = self.rooms.get_mut(&room) else { return Vec::new() };
        members.remove(&peer_id);
        let out = members
            .values()
            .map(|&to| Delivery { to, msg: ServerMessage::PeerLeft { peer_id: peer_id.clone() } })
            .collect();
        if members.is_empty() {
            self.rooms.remove(&room);
            if !self.joining.contains_key(&room) {
                self.shared.remove(&room);
            }
        }
        out
    }

    /// `conn` closed: its room learns that it left.
    pub fn disconnect(&mut self, conn: ConnId) -> Vec<Delivery> {
        let out = self.leave(conn);
        if let Some(c) = self.conns.remove(&conn) {
            if let Some(usage) = self.ips.get_mut(&c.ip) {
                usage.connections -= 1;
                if usage.connections == 0 {
                    self.ips.remove(&c.ip);
                }
            }
        }
        out
    }

    /// Every open connection, for a shutdown notice.
    pub fn connections(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.conns.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::signal::SignalPayload;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn pid(s: &str) -> PeerId {
        PeerId::new(s).unwrap()
    }

    fn join(room: &str) -> ClientMessage {
        ClientMessage::Join { version: PROTOCOL_VERSION, room: RoomId::new(room).unwrap() }
    }

    fn error_code(out: &[Delivery]) -> Option<ErrorCode> {
        match out {
            [Delivery { msg: ServerMessage::Error { code, .. }, .. }] => Some(*code),
            _ => None,
        }
    }

    #[test]
    fn members_learn_of_each_other_and_signal_within_the_room_only() {
        let now = Instant::now();
        let mut r = Relay::new(Limits::default());
        let a = r.connect(pid("a"), IP, now).unwrap();
        let b = r.connect(pid("b"), IP, now).unwrap();
        let c = r.connect(pid("c"), IP, now).unwrap();
        r.handle(a, join("room1"));
        let out = r.handle(b, join("room1"));
        assert!(
            out.contains(&Delivery { to: a, msg: ServerMessage::PeerJoined { peer_id: pid("b") } })
        );
        r.handle(c, join("room2"));
        let payload = SignalPayload::Opaque { data: "hi".into() };
        let out = r.handle(a, ClientMessage::Signal { to: pid("b"), payload: payload.clone() });
        assert_eq!(
            out,
            vec![Delivery { to: b, msg: ServerMessage::Signal { from: pid("a"), payload } }]
        );
        let out = r.handle(
            a,
            ClientMessage::Signal {
                to: pid("c"),
                payload: SignalPayload::Opaque { data: String::new() },
            },
        );
        assert_eq!(error_code(&out), Some(ErrorCode::UnknownPeer));
        let out = r.disconnect(b);
        assert_eq!(
            out,
            vec![Delivery { to: a, msg: ServerMessage::PeerLeft { peer_id: pid("b") } }]
        );
        r.disconnect(a);
        assert_eq!(r.room_count(), 1);
    }

    #[test]
    fn limits_give_their_codes() {
        let now = Instant::now();
        let limits =
            Limits { max_peers_per_room: 1, max_rooms: 1, max_connections: 3, ..Limits::default() };
        let mut r = Relay::new(limits);
        let a = r.connect(pid("a"), IP, now).unwrap();
        let b = r.connect(pid("b"), IP, now).unwrap();
        let _c = r.connect(pid("c"), IP, now).unwrap();
        assert_eq!(r.connect(pid("d"), IP, now), Err(ErrorCode::ServerFull));
        assert_eq!(error_code(&r.handle(a, join("x"))), None);
        assert_eq!(error_code(&r.handle(a, join("x"))), Some(ErrorCode::AlreadyJoined));
        assert_eq!(error_code(&r.handle(b, join("x"))), Some(ErrorCode::RoomFull));
        assert_eq!(error_code(&r.handle(b, join("y"))), Some(ErrorCode::TooManyRooms));
        for version in [1, 2, PROTOCOL_VERSION + 1] {
            let other = ClientMessage::Join { version, room: RoomId::new("x").unwrap() };
            assert_eq!(error_code(&r.handle(b, other)), Some(ErrorCode::UnsupportedVersion));
        }
        let sig = ClientMessage::Signal {
            to: pid("a"),
            payload: SignalPayload::Opaque { data: String::new() },
        };
        assert_eq!(error_code(&r.handle(b, sig)), Some(ErrorCode::NotJoined));
    }

    #[test]
    fn one_address_gets_only_so_many_connections_and_rooms() {
        let now = Instant::now();
        let limits = Limits { max_connections_per_ip: 2, max_rooms_per_ip: 1, ..Limits::default() };
        let mut r = Relay::new(limits);
        let other: IpAddr = "192.0.2.7".parse().unwrap();
        let a = r.connect(pid("a"), IP, now).unwrap();
        let b = r.connect(pid("b"), IP, now).unwrap();
        assert_eq!(r.connect(pid("c"), IP, now), Err(ErrorCode::AddressConnections));
        let d = r.connect(pid("d"), other, now).expect("another address is not limited");
        assert_eq!(error_code(&r.handle(a, join("x"))), None);
        // A second member from the same address in the same room is fine...
        assert_eq!(error_code(&r.handle(b, join("x"))), None);
        r.disconnect(b);
        let b = r.connect(pid("b2"), IP, now).expect("a closed connection frees its place");
        // ...a second room is not.
        assert_eq!(error_code(&r.handle(b, join("y"))), Some(ErrorCode::AddressRooms));
        assert_eq!(error_code(&r.handle(d, join("y"))), None);
        r.handle(a, ClientMessage::Leave);
        assert_eq!(error_code(&r.handle(b, join("y"))), None, "leaving frees the room");
        r.disconnect(a);
        r.disconnect(b);
        r.disconnect(d);
        assert!(r.ips.is_empty(), "nothing left behind: {:?}", r.ips);
    }

    #[test]
    fn rate_limit_refills_over_time() {
        let t0 = Instant::now();
        let limits = Limits { messages_per_second: 10.0, message_burst: 3.0, ..Limits::default() };
        let mut r = Relay::new(limits);
        let a = r.connect(pid("a"), IP, t0).unwrap();
        assert!((0..3).all(|_| r.admit(a, t0)));
        assert!(!r.admit(a, t0));
        assert!(r.admit(a, t0 + Duration::from_millis(100)));
        assert!(!r.admit(a, t0 + Duration::from_millis(100)));
    }

    fn others(members: &[(&str, &str)]) -> BTreeMap<PeerId, Process> {
        members.iter().map(|(p, proc)| (pid(p), Process::from(*proc))).collect()
    }

    /// A room shared with other processes: the welcome lists their members, later states
    /// become join and leave events (older ones are ignored), a signal to a member
    /// elsewhere becomes a forward, and a state that arrives while a join is under way
    /// is not lost.
    #[test]
    fn a_shared_room() {
        let now = Instant::now();
        let mut r = Relay::new(Limits::default());
        let room = RoomId::new("shared").unwrap();
        let a = r.connect(pid("a"), IP, now).unwrap();
        let b = r.connect(pid("b"), IP, now).unwrap();
        assert_eq!(r.check_join(a, PROTOCOL_VERSION, &room), Ok(()));
        r.begin_shared_join(&room);
        // x joined elsewhere (revision 6) before our join's own write (5) comes back.
        assert!(r.apply_shared(&room, 6, others(&[("x", "p2"), ("y", "p3")])).is_empty());
        let out = r.join_shared(a, room.clone(), 5, others(&[("y", "p3")]));
        let welcome = out.iter().find(|d| d.to == a).unwrap();
        let ServerMessage::Welcome { peers, .. } = &welcome.msg else { panic!("{out:?}") };
        assert_eq!(peers, &[pid("x"), pid("y")]);
        r.begin_shared_join(&room);
        r.join_shared(b, room.clone(), 7, others(&[("x", "p2"), ("y", "p3")]));
        // y left and z came: both local members hear it; a stale state changes nothing.
        let out = r.apply_shared(&room, 8, others(&[("x", "p2"), ("z", "p3")]));
        assert_eq!(out.len(), 4, "{out:?}");
        assert!(
            out.contains(&Delivery { to: a, msg: ServerMessage::PeerLeft { peer_id: pid("y") } })
        );
        assert!(
            out.contains(&Delivery { to: b, msg: ServerMessage::PeerJoined { peer_id: pid("z") } })
        );
        assert!(r.apply_shared(&room, 7, others(&[])).is_empty());
        let payload = SignalPayload::Opaque { data: "hi".into() };
        let out = r.handle(a, ClientMessage::Signal { to: pid("z"), payload: payload.clone() });
        assert!(out.is_empty());
        let forwards = r.take_forwards();
        assert_eq!(forwards.len(), 1);
        assert_eq!(forwards[0].process.as_ref(), "p3");
        assert_eq!(forwards[0].msg, ServerMessage::Signal { from: pid("a"), payload });
        assert_eq!(r.member(&room, &pid("b")), Some(b));
        assert_eq!(r.rooms_sharing_with(|p| p == "p2"), vec![room.clone()]);
        assert!(r.rooms_sharing_with(|p| p == "p9").is_empty());
        // Once no member is here, the room's state elsewhere is forgotten.
        r.disconnect(a);
        r.disconnect(b);
        assert!(r.apply_shared(&room, 9, others(&[("x", "p2")])).is_empty());
        assert!(r.rooms_sharing_with(|_| true).is_empty());
    }
}
