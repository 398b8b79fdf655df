//! The fast UDP path between two native peers (issue #12 item 4): when IP packets leave
//! the data channel for plain UDP datagrams on the selected ICE pair, how the path is
//! proven, watched and given up, and when it is tried again.
//!
//! The path itself is a transport packet of [`crate::transport::Channel::FastPath`]
//! (first byte 0x12, its own keys and replay window) sent as one UDP datagram on the
//! selected candidate pair's socket and 5-tuple, beside ICE, DTLS and SCTP (RFC 7983
//! demultiplexes by first byte). This module is only the policy, one [`FastPath`] per
//! peer, sans-IO with time as an input:
//!
//! - **Eligible** only while the node says so ([`FastPath::set_pair`]): the driver can
//!   send raw datagrams on the selected pair (a native peer; never a browser), the pair is
//!   not relayed (a TURN relay only carries what ICE and DTLS send through it, so relayed
//!   sessions keep the data channel), both sides take IP packets and the fast path is
//!   enabled. A new pair (ICE moved) starts over: nothing goes on it until it is proven.
//! - **Proven** by a [`FastPathMessage::Probe`] sent on the fast path itself and answered
//!   by a [`FastPathMessage::Ack`] on the fast path: both are sealed with the fast path's
//!   session keys, so an ack proves the far side received and authenticated what we sent
//!   on that path, and we received its answer on it. Until then, and whenever it is not
//!   [`FastPathState::Up`], IP packets go on the data channel.
//! - **Watched** while we send on it: a probe every [`KEEPALIVE`] while packets we sent
//!   have not been followed by an ack; if [`DEAD_AFTER`] passes after the first such packet
//!   without an ack, the path is given up ([`FastPathState::Fallback`]) and the data
//!   channel carries again. Only acks count: packets the peer sends us prove the other
//!   direction, not ours.
//! - **Tried again** by probes at growing intervals ([`PROBE_FIRST_INTERVAL`] doubling to
//!   [`PROBE_MAX_INTERVAL`]) for as long as the pair stays eligible; the first ack brings
//!   it back.
//!
//! Receiving needs no state: an authenticated fast-path packet is taken whatever this side
//! thinks of the path, and a probe is answered whenever the fast path is enabled.

use std::time::Duration;

/// First interval between probes of a new or failed path; it doubles after each probe.
pub const PROBE_FIRST_INTERVAL: Duration = Duration::from_millis(250);
/// Longest interval between probes of a path that does not answer.
pub const PROBE_MAX_INTERVAL: Duration = Duration::from_secs(4);
/// While packets we sent on the path wait for an ack, a probe this often.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// A path that sent no ack for this long after we sent on it is given up.
pub const DEAD_AFTER: Duration = Duration::from_secs(3);

/// Length of a [`FastPathMessage`]'s encoding: kind (1) and nonce (8, big endian).
pub const MESSAGE_LEN: usize = 9;

const KIND_PROBE: u8 = 0;
const KIND_ACK: u8 = 1;

/// Where the fast path of one peer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FastPathState {
    /// Not eligible (a browser, a relayed pair, no pair yet, or turned off): the data
    /// channel carries.
    #[default]
    Unavailable,
    /// Eligible, not yet proven on this pair: the data channel carries meanwhile.
    Probing,
    /// Proven: IP packets go as plain UDP on the selected pair.
    Up,
    /// It was up and stopped answering: the data channel carries, probes go on.
    Fallback,
}

impl FastPathState {
    /// Lowercase name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unavailable => "unavailable",
            Self::Probing => "probing",
            Self::Up => "up",
            Self::Fallback => "fallback",
        }
    }
}

/// The body of a [`FRAME_FAST_PATH`] frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastPathMessage {
    /// Answer with an ack of this nonce, on the fast path.
    Probe(u64),
    /// The answer to the probe of this nonce.
    Ack(u64),
}

/// Why a fast-path frame's body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FastPathMessageError {
    /// Not [`MESSAGE_LEN`] bytes.
    #[error("a fast-path message of {0} bytes")]
    Length(usize),
    /// An unknown kind byte.
    #[error("a fast-path message of unknown kind {0}")]
    Kind(u8),
}

impl FastPathMessage {
    /// Its encoding.
    pub fn encode(self) -> [u8; MESSAGE_LEN] {
        let (kind, nonce) = match self {
            Self::Probe(n) => (KIND_PROBE, n),
            Self::Ack(n) => (KIND_ACK, n),
        };
        let mut out = [0u8; MESSAGE_LEN];
        out[0] = kind;
        out[1..].copy_from_slice(&nonce.to_be_bytes());
        out
    }

    /// Decodes a body (from the network: never panics).
    pub fn decode(body: &[u8]) -> Result<Self, FastPathMessageError> {
        let bytes: &[u8; MESSAGE_LEN] =
            body.try_into().map_err(|_| FastPathMessageError::Length(body.len()))?;
        let mut nonce = [0u8; 8];
        nonce.copy_from_slice(&bytes[1..]);
        let nonce = u64::from_be_bytes(nonce);
        match bytes[0] {
            KIND_PROBE => Ok(Self::Probe(nonce)),
            KIND_ACK => Ok(Self::Ack(nonce)),
            other => Err(FastPathMessageError::Kind(other)),
        }
    }
}

/// The fast path of one peer: see the module docs.
#[derive(Debug, Clone, Default)]
pub struct FastPath {
    /// The eligible pair, as the driver names it.
    pair: Option<u64>,
    state: FastPathState,
    /// Nonce of the next probe; nonces never repeat within a session.
    next_nonce: u64,
    /// Nonce of the first probe on the current pair: acks of older ones do not count.
    first_nonce: u64,
    next_probe: Option<Duration>,
    interval: Duration,
    /// When we first sent on the path after its last ack.
    unacked_since: Option<Duration>,
}

impl FastPath {
    /// A path not yet eligible.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where it stands.
    pub fn state(&self) -> FastPathState {
        self.state
    }

    /// Whether IP packets go on the fast path now.
    pub fn is_up(&self) -> bool {
        self.state == FastPathState::Up
    }

    /// The eligible pair now (`None`: not eligible). A different pair than before starts
    /// over: probing at once, nothing sent on it until an ack comes.
    pub fn set_pair(&mut self, now: Duration, pair: Option<u64>) {
        if pair == self.pair {
            return;
        }
        self.pair = pair;
        self.first_nonce = self.next_nonce;
        self.unacked_since = None;
        self.interval = PROBE_FIRST_INTERVAL;
        match pair {
            None => {
                self.state = FastPathState::Unavailable;
                self.next_probe = None;
            }
            Some(_) => {
                self.state = FastPathState::Probing;
                self.next_probe = Some(now);
            }
        }
    }

    /// We sent an IP packet on the fast path.
    pub fn sent(&mut self, now: Duration) {
        if self.state == FastPathState::Up && self.unacked_since.is_none() {
            self.unacked_since = Some(now);
            self.next_probe = Some(now + KEEPALIVE);
        }
    }

    /// An authenticated ack came on the fast path. Returns whether the state changed.
    pub fn acked(&mut self, nonce: u64) -> bool {
        if self.pair.is_none() || nonce < self.first_nonce || nonce >= self.next_nonce {
            return false;
        }
        let was = self.state;
        self.state = FastPathState::Up;
        self.unacked_since = None;
        self.next_probe = None;
        self.interval = PROBE_FIRST_INTERVAL;
        was != FastPathState::Up
    }

    /// When [`Self::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let dead = match self.state {
            FastPathState::Up => self.unacked_since.map(|t| t + DEAD_AFTER),
            _ => None,
        };
        match (self.next_probe, dead) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Gives the path up if it stopped answering; the probe to send now, if one is due.
    pub fn handle_timeout(&mut self, now: Duration) -> Option<FastPathMessage> {
        if self.state == FastPathState::Up
            && self.unacked_since.is_some_and(|since| now >= since + DEAD_AFTER)
        {
            tracing::debug!("the fast path stopped answering: back to the data channel");
            self.state = FastPathState::Fallback;
            self.unacked_since = None;
            self.interval = PROBE_FIRST_INTERVAL;
            self.next_probe = Some(now);
        }
        if self.next_probe.is_none_or(|at| at > now) {
            return None;
        }
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        self.next_probe = match self.state {
            FastPathState::Up => self.unacked_since.map(|_| now + KEEPALIVE),
            FastPathState::Probing | FastPathState::Fallback => {
                let at = now + self.interval;
                self.interval = (self.interval * 2).min(PROBE_MAX_INTERVAL);
                Some(at)
            }
            FastPathState::Unavailable => None,
        };
        Some(FastPathMessage::Probe(nonce))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_ones_are_refused() {
        for m in [FastPathMessage::Probe(0), FastPathMessage::Ack(u64::MAX)] {
            assert_eq!(FastPathMessage::decode(&m.encode()), Ok(m));
        }
        assert_eq!(FastPathMessage::decode(&[0; 8]), Err(FastPathMessageError::Length(8)));
        assert_eq!(FastPathMessage::decode(&[]), Err(FastPathMessageError::Length(0)));
        let mut bad = FastPathMessage::Ack(1).encode();
        bad[0] = 7;
        assert_eq!(FastPathMessage::decode(&bad), Err(FastPathMessageError::Kind(7)));
    }

    /// Two sides and the path between them, in virtual time: `a` sends IP packets to `b`
    /// every 10 ms; `b` answers probes as the node does (an ack on the fast path).
    struct Sim {
        now: Duration,
        a: FastPath,
        /// Whether datagrams on the fast path get through (each direction).
        a_to_b: bool,
        b_to_a: bool,
        /// One-way delay.
        delay: Duration,
        /// Messages in flight: (arrival, to b?, message).
        flight: Vec<(Duration, bool, FastPathMessage)>,
        /// When `a` used the fast path / the data channel, per packet.
        fast: u32,
        channel: u32,
    }

    impl Sim {
        fn new() -> Self {
            Self {
                now: Duration::ZERO,
                a: FastPath::new(),
                a_to_b: true,
                b_to_a: true,
                delay: Duration::from_millis(1),
                flight: Vec::new(),
                fast: 0,
                channel: 0,
            }
        }

        fn send(&mut self, to_b: bool, m: FastPathMessage) {
            if (to_b && self.a_to_b) || (!to_b && self.b_to_a) {
                self.flight.push((self.now + self.delay, to_b, m));
            }
        }

        /// Runs for `d` in 1 ms steps, `a` sending a packet every 10 ms.
        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.now += Duration::from_millis(1);
                let now = self.now;
                let (due, later) = self.flight.drain(..).partition(|(at, _, _)| *at <= now);
                self.flight = later;
                for (_, to_b, m) in due {
                    match (to_b, m) {
                        (true, FastPathMessage::Probe(n)) => {
                            self.send(false, FastPathMessage::Ack(n))
                        }
                        (false, FastPathMessage::Ack(n)) => {
                            self.a.acked(n);
                        }
                        _ => {}
                    }
                }
                if self.a.poll_timeout().is_some_and(|t| t <= now) {
                    if let Some(probe) = self.a.handle_timeout(now) {
                        self.send(true, probe);
                    }
                }
                if now.as_millis() % 10 == 0 {
                    if self.a.is_up() {
                        self.a.sent(now);
                        self.fast += 1;
                    } else {
                        self.channel += 1;
                    }
                }
            }
        }

        fn reset_counts(&mut self) {
            (self.fast, self.channel) = (0, 0);
        }
    }

    #[test]
    fn a_proven_path_carries_falls_back_when_it_stops_answering_and_comes_back() {
        let mut sim = Sim::new();
        // Not eligible: nothing probed, the data channel carries.
        sim.run(Duration::from_secs(1));
        assert_eq!(sim.a.state(), FastPathState::Unavailable);
        assert!(sim.flight.is_empty() && sim.fast == 0);

        // A direct pair: probed at once, up after one round trip.
        sim.a.set_pair(sim.now, Some(1));
        assert_eq!(sim.a.state(), FastPathState::Probing);
        sim.run(Duration::from_millis(5));
        assert_eq!(sim.a.state(), FastPathState::Up);

        // Carrying for a while: keepalive probes answered, it stays up.
        sim.reset_counts();
        sim.run(Duration::from_secs(10));
        assert_eq!(sim.a.state(), FastPathState::Up);
        assert_eq!((sim.fast, sim.channel), (1000, 0));

        // The fast path is blocked one way (acks lost): given up within DEAD_AFTER and a
        // packet interval, and the data channel carries.
        sim.b_to_a = false;
        sim.reset_counts();
        sim.run(DEAD_AFTER + Duration::from_millis(20));
        assert_eq!(sim.a.state(), FastPathState::Fallback);
        sim.reset_counts();
        sim.run(Duration::from_secs(5));
        assert_eq!((sim.fast, sim.channel), (0, 500));
        assert_eq!(sim.a.state(), FastPathState::Fallback);

        // Unblocked: the next probe (at most PROBE_MAX_INTERVAL apart) brings it back.
        sim.b_to_a = true;
        sim.run(PROBE_MAX_INTERVAL + Duration::from_millis(5));
        assert_eq!(sim.a.state(), FastPathState::Up);
    }

    #[test]
    fn a_new_pair_or_a_relayed_one_stops_the_fast_path_until_proven_again() {
        let mut sim = Sim::new();
        sim.a.set_pair(sim.now, Some(1));
        sim.run(Duration::from_millis(5));
        assert!(sim.a.is_up());

        // ICE moved to another pair: not used until an ack of a probe sent on it; an ack
        // of a probe sent before the move does not count.
        let old = sim.a.next_nonce - 1;
        sim.a.set_pair(sim.now, Some(2));
        assert_eq!(sim.a.state(), FastPathState::Probing);
        assert!(!sim.a.acked(old));
        assert_eq!(sim.a.state(), FastPathState::Probing);
        sim.run(Duration::from_millis(5));
        assert!(sim.a.is_up());

        // Relayed (or the driver lost its pair): unavailable, and no probes.
        sim.a.set_pair(sim.now, None);
        assert_eq!(sim.a.state(), FastPathState::Unavailable);
        assert_eq!(sim.a.poll_timeout(), None);
        sim.flight.clear();
        sim.run(Duration::from_secs(5));
        assert!(sim.flight.is_empty());
        assert!(!sim.a.acked(sim.a.next_nonce.saturating_sub(1)));
    }

    #[test]
    fn a_path_that_never_answers_is_probed_ever_more_slowly_and_never_used() {
        let mut sim = Sim::new();
        sim.a_to_b = false;
        sim.a.set_pair(sim.now, Some(1));
        sim.run(Duration::from_secs(60));
        assert_eq!(sim.a.state(), FastPathState::Probing);
        assert_eq!(sim.fast, 0);
        // 250 ms, 500 ms, 1 s, 2 s, then every 4 s: about 18 probes in a minute.
        assert!(sim.a.next_nonce < 20, "{} probes", sim.a.next_nonce);
    }

    #[test]
    fn an_idle_path_sends_nothing() {
        let mut sim = Sim::new();
        sim.a.set_pair(sim.now, Some(1));
        sim.run(Duration::from_millis(5));
        let probes = sim.a.next_nonce;
        // Up, nothing sent on it: no probes, no deadline.
        assert_eq!(sim.a.poll_timeout(), None);
        sim.a.handle_timeout(sim.now + Duration::from_secs(60));
        assert_eq!(sim.a.next_nonce, probes);
        assert!(sim.a.is_up());
    }
}
