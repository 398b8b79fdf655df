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
    /// How many servers there are, and which one we use or try.
    servers: usize,
    server: usize,
}

impl SignalingClient {
    pub(crate) fn new(
        room: RoomId,
        heartbeat: Duration,
        connect_timeout: Duration,
        servers: usize,
    ) -> Self {
        Self {
            membership: RoomMembership::new(room),
            backoff: ReconnectBackoff::default(),
            phase: Phase::Idle,
            attempt: 0,
            heartbeat,
            connect_timeout,
            servers: servers.max(1),
            server: 0,
        }
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
            MembershipEvent::Joined { .. } => self.backoff.reset(),
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

    fn connects(act: &[SocketAction]) -> Vec<usize> {
        act.iter()
            .filter_map(|a| match a {
                SocketAction::Connect { server } => Some(*server),
                _ => None,
            })
            .collect()
    }

    /// Each lost connection, and each attempt that fails or times out, moves to the next
    /// server, round the list.
    #[test]
    fn a_lost_connection_tries_the_next_server() {
        let room = RoomId::new("room").unwrap();
        let second = Duration::from_secs(1);
        let mut client = SignalingClient::new(room, 15 * second, 10 * second, 3);
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
