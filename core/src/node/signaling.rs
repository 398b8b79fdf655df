//! The node's signaling connection: when to connect, join, ping and reconnect. The
//! driver owns the WebSocket and only moves text; this decides everything else.

use std::time::Duration;

use crate::signal::{self, ClientMessage, DecodeError, MembershipEvent, ReconnectBackoff, RoomId};
use crate::signal::{PeerId, RoomMembership};

/// Where the signaling connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not started yet.
    Idle,
    /// The driver is opening the WebSocket (attempt `since`).
    Opening { since: Duration },
    /// Open: joined or waiting for the welcome.
    Open { next_ping: Duration, unanswered: u32 },
    /// Lost; the next attempt is at `until`.
    Waiting { until: Duration },
    /// Left, or refused for good: no more attempts.
    Stopped,
}

/// What the driver must do with the WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SocketAction {
    /// Open a socket to the `server`th signaling server.
    Connect {
        server: usize,
    },
    Send(String),
    Close,
}

/// What happened that the node acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SignalingChange {
    /// An attempt to connect starts.
    Connecting { attempt: u32 },
    /// The connection was lost (or never made); the next attempt is in `retry_in`.
    Lost { reason: String, retry_in: Duration },
    /// The server refused us for good.
    Stopped { reason: super::StopReason },
    /// The room membership learned something.
    Membership(MembershipEvent),
}

/// The signaling client's policy. See the module docs.
#[derive(Debug)]
pub(crate) struct SignalingClient {
    membership: RoomMembership,
    backoff: ReconnectBackoff,
    phase: Phase,
    attempt: u32,
    heartbeat: Duration,
    connect_timeout: Duration,
    /// See [`super::NodeTiming::first_join_attempts`].
    first_join_attempts: Option<u32>,
    /// We were in the room at least once.
    ever_joined: bool,
    /// How many servers there are, and which one we use or try.
    servers: usize,
    server: usize,
}

/// Refusals of a join that a retry soon will not change.
const JOIN_REFUSALS: &[signal::ErrorCode] = &[
    signal::ErrorCode::RoomFull,
    signal::ErrorCode::TooManyRooms,
    signal::ErrorCode::ServerFull,
    signal::ErrorCode::AddressConnections,
    signal::ErrorCode::AddressRooms,
];

impl SignalingClient {
    pub(crate) fn new(
        room: RoomId,
        heartbeat: Duration,
        connect_timeout: Duration,
        first_join_attempts: Option<u32>,
        servers: usize,
    ) -> Self {
        Self {
            membership: RoomMembership::new(room),
            backoff: ReconnectBackoff::default(),
            phase: Phase::Idle,
            attempt: 0,
            heartbeat,
            connect_timeout,
            first_join_attempts,
            ever_joined: false,
            servers: servers.max(1),
            server: 0,
        }
    }

    /// The first join has a limit on its attempts and is still going.
    fn first_join_limited(&self) -> Option<u32> {
        self.first_join_attempts.filter(|_| !self.ever_joined)
    }

    pub(crate) fn room(&self) -> &RoomId {
        self.membership.room()
    }

    pub(crate) fn own_id(&self) -> Option<&PeerId> {
        self.membership.own_id()
    }

    pub(crate) fn in_room(&self, peer: &PeerId) -> bool {
        self.membership.peers().any(|p| p == peer)
    }

    pub(crate) fn is_joined(&self) -> bool {
        matches!(self.phase, Phase::Open { .. }) && self.membership.own_id().is_some()
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    /// Starts the first attempt (once).
    pub(crate) fn start(
        &mut self,
        now: Duration,
        act: &mut Vec<SocketAction>,
        changes: &mut Vec<SignalingChange>,
    ) {
        if self.phase == Phase::Idle {
            self.connect(now, act, changes);
        }
    }

    fn connect(
        &mut self,
        now: Duration,
        act: &mut Vec<SocketAction>,
        changes: &mut Vec<SignalingChange>,
    ) {
        self.attempt += 1;
        self.phase = Phase::Opening { since: now };
        changes.push(SignalingChange::Connecting { attempt: self.attempt });
        act.push(SocketAction::Connect { server: self.server });
    }

    /// The WebSocket opened: join.
    pub(crate) fn opened(&mut self, now: Duration, act: &mut Vec<SocketAction>) {
        if !matches!(self.phase, Phase::Opening { .. }) {
            return;
        }
        self.phase = Phase::Open { next_ping: now + self.heartbeat, unanswered: 0 };
        act.push(SocketAction::Send(signal::encode(&self.membership.join_message())));
    }

    /// A text frame from the server.
    pub(crate) fn text(
        &mut self,
        text: &str,
        act: &mut Vec<SocketAction>,
        changes: &mut Vec<SignalingChange>,
    ) -> Result<(), DecodeError> {
        let Phase::Open { unanswered, .. } = &mut self.phase else { return Ok(()) };
        *unanswered = 0;
        let event = self.membership.handle_text(text)?;
        match &event {
            MembershipEvent::Joined { .. } => {
                self.backoff.reset();
                self.ever_joined = true;
            }
            MembershipEvent::Error { code, message }
                if JOIN_REFUSALS.contains(code)
                    && self.first_join_limited().is_some()
                    && self.membership.own_id().is_none() =>
            {
                let reason = super::StopReason::Refused { code: *code, message: message.clone() };
                self.stop(act);
                changes.push(SignalingChange::Stopped { reason });
            }
            MembershipEvent::Error { code: signal::ErrorCode::UnsupportedVersion, message } => {
                // Reconnecting cannot help: only an update can.
                let reason = super::StopReason::UnsupportedVersion { message: message.clone() };
                self.stop(act);
                changes.push(SignalingChange::Stopped { reason });
            }
            _ => {}
        }
        changes.push(SignalingChange::Membership(event));
        Ok(())
    }

    /// The WebSocket closed or failed (by itself, or after [`SocketAction::Close`]).
    pub(crate) fn closed(
        &mut self,
        now: Duration,
        reason: String,
        jitter: f64,
        changes: &mut Vec<SignalingChange>,
    ) {
        if matches!(self.phase, Phase::Stopped | Phase::Idle | Phase::Waiting { .. }) {
            return;
        }
        self.lost(now, reason, jitter, changes);
    }

    fn lost(
        &mut self,
        now: Duration,
        reason: String,
        jitter: f64,
        changes: &mut Vec<SignalingChange>,
    ) {
        self.membership.disconnected();
        if self.first_join_limited().is_some_and(|limit| self.attempt >= limit) {
            let reason = super::StopReason::Unreachable { attempts: self.attempt, last: reason };
            self.phase = Phase::Stopped;
            changes.push(SignalingChange::Stopped { reason });
            return;
        }
        // The next attempt goes to the next server: the one we lost may be gone for good
        // (a cluster's process killed), and the others share its rooms.
        self.server = (self.server + 1) % self.servers;
        let retry_in = Duration::from_millis(u64::from(self.backoff.next_delay_ms(jitter)));
        self.phase = Phase::Waiting { until: now + retry_in };
        changes.push(SignalingChange::Lost { reason, retry_in });
    }

    /// Sends `msg` if the connection is open; dropped otherwise (a stale offer is worse
    /// than none: peers renegotiate after a rejoin anyway).
    pub(crate) fn send(&self, msg: &ClientMessage, act: &mut Vec<SocketAction>) {
        if self.is_joined() {
            act.push(SocketAction::Send(signal::encode(msg)));
        }
    }

    /// Leaves: `leave` to the server, then the socket closes; no more attempts.
    pub(crate) fn leave(&mut self, act: &mut Vec<SocketAction>) {
        if matches!(self.phase, Phase::Open { .. }) {
            act.push(SocketAction::Send(signal::encode(&ClientMessage::Leave)));
        }
        self.stop(act);
    }

    fn stop(&mut self, act: &mut Vec<SocketAction>) {
        if !matches!(self.phase, Phase::Stopped | Phase::Idle | Phase::Waiting { .. }) {
            act.push(SocketAction::Close);
        }
        self.phase = Phase::Stopped;
        self.membership.disconnected();
    }

    pub(crate) fn poll_timeout(&self) -> Option<Duration> {
        match self.phase {
            Phase::Opening { since } => Some(since + self.connect_timeout),
            Phase::Open { next_ping, .. } => Some(next_ping),
            Phase::Waiting { until } => Some(until),
            Phase::Idle | Phase::Stopped => None,
        }
    }

    pub(crate) fn handle_timeout(
        &mut self,
        now: Duration,
        jitter: f64,
        act: &mut Vec<SocketAction>,
        changes: &mut Vec<SignalingChange>,
    ) {
        match self.phase {
            Phase::Opening { since } if now >= since + self.connect_timeout => {
                act.push(SocketAction::Close);
                let secs = self.connect_timeout.as_secs();
                let reason = format!("cannot connect: no answer within {secs} s");
                self.lost(now, reason, jitter, changes);
            }
            Phase::Open { next_ping, unanswered } if now >= next_ping => {
                if unanswered >= 2 {
                    // The server is gone without a close frame: drop the socket, retry.
                    act.push(SocketAction::Close);
                    self.lost(now, "server stopped answering".into(), jitter, changes);
                } else {
                    self.phase =
                        Phase::Open { next_ping: now + self.heartbeat, unanswered: unanswered + 1 };
                    act.push(SocketAction::Send(signal::encode(&ClientMessage::Ping)));
                }
            }
            Phase::Waiting { until } if now >= until => self.connect(now, act, changes),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::StopReason;
    use crate::signal::{ErrorCode, PeerId, ServerMessage};

    const SECOND: Duration = Duration::from_secs(1);

    fn client(first_join_attempts: Option<u32>) -> SignalingClient {
        let room = RoomId::new("0123456789abcdef0123456789abcdef").unwrap();
        SignalingClient::new(room, 15 * SECOND, 10 * SECOND, first_join_attempts, 1)
    }

    /// Runs the client through `n` failed connections; returns every change.
    fn fail_connections(c: &mut SignalingClient, n: u32) -> Vec<SignalingChange> {
        let (mut act, mut changes) = (Vec::new(), Vec::new());
        let mut now = Duration::ZERO;
        c.start(now, &mut act, &mut changes);
        for _ in 0..n {
            c.closed(now, "the connection failed".into(), 0.5, &mut changes);
            if let Some(at) = c.poll_timeout() {
                now = at;
                c.handle_timeout(now, 0.5, &mut act, &mut changes);
            }
        }
        changes
    }

    fn stops(changes: &[SignalingChange]) -> Vec<&StopReason> {
        changes
            .iter()
            .filter_map(|c| match c {
                SignalingChange::Stopped { reason } => Some(reason),
                _ => None,
            })
            .collect()
    }

    fn connects(act: &[SocketAction]) -> Vec<usize> {
        act.iter()
            .filter_map(|a| match a {
                SocketAction::Connect { server } => Some(*server),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_first_join_that_never_reaches_the_server_stops_after_its_attempts() {
        let mut c = client(Some(3));
        let changes = fail_connections(&mut c, 5);
        let stopped = stops(&changes);
        assert_eq!(
            stopped,
            [&StopReason::Unreachable { attempts: 3, last: "the connection failed".into() }]
        );
        assert!(c.is_stopped());
        assert_eq!(c.poll_timeout(), None, "no timer left");
    }

    #[test]
    fn without_a_limit_or_once_joined_the_client_keeps_retrying() {
        let mut c = client(None);
        assert!(stops(&fail_connections(&mut c, 6)).is_empty());
        assert!(!c.is_stopped());

        // Joined once, then the server goes away: retried as long as it takes.
        let mut c = client(Some(1));
        let (mut act, mut changes) = (Vec::new(), Vec::new());
        c.start(Duration::ZERO, &mut act, &mut changes);
        c.opened(Duration::ZERO, &mut act);
        let welcome = signal::encode(&ServerMessage::Welcome {
            version: signal::PROTOCOL_VERSION,
            room: c.room().clone(),
            peer_id: PeerId::new("p1").unwrap(),
            peers: Vec::new(),
        });
        c.text(&welcome, &mut act, &mut changes).unwrap();
        assert!(c.is_joined());
        let mut now = Duration::ZERO;
        for _ in 0..4 {
            c.closed(now, "server restarting".into(), 0.5, &mut changes);
            now = c.poll_timeout().unwrap();
            c.handle_timeout(now, 0.5, &mut act, &mut changes);
        }
        assert!(stops(&changes).is_empty());
    }

    #[test]
    fn a_refused_first_join_stops_at_once_with_the_servers_words() {
        let mut c = client(Some(3));
        let (mut act, mut changes) = (Vec::new(), Vec::new());
        c.start(Duration::ZERO, &mut act, &mut changes);
        c.opened(Duration::ZERO, &mut act);
        let refusal = signal::encode(&ServerMessage::Error {
            code: ErrorCode::RoomFull,
            message: "room is full".into(),
        });
        c.text(&refusal, &mut act, &mut changes).unwrap();
        assert_eq!(
            stops(&changes),
            [&StopReason::Refused { code: ErrorCode::RoomFull, message: "room is full".into() }]
        );
        assert!(c.is_stopped());
        assert_eq!(act.last(), Some(&SocketAction::Close));
    }

    /// Each lost connection, and each attempt that fails or times out, moves to the next
    /// server, round the list.
    #[test]
    fn a_lost_connection_tries_the_next_server() {
        let room = RoomId::new("room").unwrap();
        let second = Duration::from_secs(1);
        let mut client = SignalingClient::new(room, 15 * second, 10 * second, None, 3);
        let (mut act, mut changes) = (Vec::new(), Vec::new());
        let mut now = Duration::ZERO;
        client.start(now, &mut act, &mut changes);
        let mut tried = connects(&act);
        for round in 0..4 {
            act.clear();
            if round % 2 == 0 {
                client.opened(now, &mut act);
                client.closed(now, "gone".into(), 0.5, &mut changes);
            } else {
                // No answer: the connect timeout.
                now += 10 * second;
                client.handle_timeout(now, 0.5, &mut act, &mut changes);
            }
            now = client.poll_timeout().unwrap();
            client.handle_timeout(now, 0.5, &mut act, &mut changes);
            tried.extend(connects(&act));
        }
        assert_eq!(tried, [0, 1, 2, 0, 1]);
    }
}
