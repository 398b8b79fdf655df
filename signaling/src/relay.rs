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
        let Some(c) = self.conns.get(&conn) else { return Vec::new() };
        let reply = |code: ErrorCode, message: String| {
            vec![Delivery { to: conn, msg: ServerMessage::error(code, message) }]
        };
        match msg {
            ClientMessage::Ping => vec![Delivery { to: conn, msg: ServerMessage::Pong }],
            ClientMessage::Join { version, room } => {
                if version != PROTOCOL_VERSION {
                    return reply(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "client speaks protocol version {version}, this server speaks \
                             {PROTOCOL_VERSION}; reload the page or update weft-peer"
                        ),
                    );
                }
                if let Some(joined) = &c.room {
                    return reply(
                        ErrorCode::AlreadyJoined,
                        format!("this connection already joined room {joined}"),
                    );
                }
                self.join(conn, room)
            }
            ClientMessage::Signal { to, payload } => {
                let Some(room) = &c.room else {
                    return reply(ErrorCode::NotJoined, "join a room before signaling".into());
                };
                let target = self.rooms.get(room).and_then(|members| members.get(&to));
                match target {
                    Some(&target) if target != conn => vec![Delivery {
                        to: target,
                        msg: ServerMessage::Signal { from: c.peer_id.clone(), payload },
                    }],
                    Some(_) => reply(ErrorCode::UnknownPeer, "cannot signal yourself".into()),
                    None => reply(ErrorCode::UnknownPeer, format!("no peer {to} in your room")),
                }
            }
            ClientMessage::Leave => self.leave(conn),
        }
    }

    fn join(&mut self, conn: ConnId, room: RoomId) -> Vec<Delivery> {
        let error = |code, message: String| {
            vec![Delivery { to: conn, msg: ServerMessage::error(code, message) }]
        };
        let limits = &self.limits;
        match self.rooms.get(&room) {
            None if self.rooms.len() >= limits.max_rooms => {
                return error(
                    ErrorCode::TooManyRooms,
                    format!("the server holds its maximum of {} rooms", limits.max_rooms),
                );
            }
            Some(members) if members.len() >= limits.max_peers_per_room => {
                return error(
                    ErrorCode::RoomFull,
                    format!("the room has its maximum of {} peers", limits.max_peers_per_room),
                );
            }
            _ => {}
        }
        let Some(c) = self.conns.get_mut(&conn) else { return Vec::new() };
        let usage = self.ips.entry(c.ip).or_default();
        if !usage.rooms.contains_key(&room) && usage.rooms.len() >= limits.max_rooms_per_ip {
            return error(
                ErrorCode::AddressRooms,
                format!(
                    "your address is in its maximum of {} rooms on this server",
                    limits.max_rooms_per_ip
                ),
            );
        }
        *usage.rooms.entry(room.clone()).or_default() += 1;
        c.room = Some(room.clone());
        let peer_id = c.peer_id.clone();
        let members = self.rooms.entry(room.clone()).or_default();
        let mut out: Vec<Delivery> = members
            .values()
            .map(|&to| Delivery { to, msg: ServerMessage::PeerJoined { peer_id: peer_id.clone() } })
            .collect();
        out.push(Delivery {
            to: conn,
            msg: ServerMessage::Welcome {
                version: PROTOCOL_VERSION,
                room,
                peer_id: peer_id.clone(),
                peers: members.keys().cloned().collect(),
            },
        });
        members.insert(peer_id, conn);
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
        let v2 = ClientMessage::Join { version: 2, room: RoomId::new("x").unwrap() };
        assert_eq!(error_code(&r.handle(b, v2)), Some(ErrorCode::UnsupportedVersion));
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
}
