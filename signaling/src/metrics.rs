//! Prometheus metrics for `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use weft_core::signal::ErrorCode;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// Why the embedded TURN server refused a request or dropped relayed bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TurnRefusal {
    /// A credential past its expiry, for a new allocation.
    Expired,
    /// A credential of a member who left.
    Revoked,
    /// A username that is not a Weft one.
    Malformed,
    /// The member holds its most allocations already.
    AllocationQuota,
    /// A datagram over the allocation's or the member's bandwidth (dropped).
    Bandwidth,
    /// A TURN over TLS client whose handshake failed (not TLS, say), took too long, or
    /// found too many others handshaking (dropped).
    TlsHandshake,
}

impl TurnRefusal {
    /// Every reason.
    pub const ALL: [Self; 6] = [
        Self::Expired,
        Self::Revoked,
        Self::Malformed,
        Self::AllocationQuota,
        Self::Bandwidth,
        Self::TlsHandshake,
    ];

    /// The label in `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Malformed => "malformed",
            Self::AllocationQuota => "allocation_quota",
            Self::Bandwidth => "bandwidth",
            Self::TlsHandshake => "tls_handshake",
        }
    }
}

/// The server's counters and gauges.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// WebSocket connections accepted since start.
    pub connections_total: Counter,
    /// Rooms with at least one member.
    pub rooms: Gauge,
    /// Signal payloads forwarded from one peer to another.
    pub messages_relayed: Counter,
    rejections: Family<Reason, Counter>,
    /// TURN allocations open.
    pub turn_allocations: Gauge,
    /// TURN allocations made since start.
    pub turn_allocations_total: Counter,
    /// Bytes relayed by TURN allocations (both directions).
    pub turn_relayed_bytes: Counter,
    turn_refusals: Family<Reason, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let connections = Gauge::default();
        let connections_total = Counter::default();
        let rooms = Gauge::default();
        let messages_relayed = Counter::default();
        let rejections = Family::<Reason, Counter>::default();
        registry.register("weft_connections", "Open WebSocket connections", connections.clone());
        registry.register(
            "weft_connections",
            "WebSocket connections accepted since start",
            connections_total.clone(),
        );
        registry.register("weft_rooms", "Rooms with at least one member", rooms.clone());
        registry.register(
            "weft_messages_relayed",
            "Signal payloads forwarded between peers",
            messages_relayed.clone(),
        );
        registry.register(
            "weft_rejections",
            "Messages or connections refused, by reason",
            rejections.clone(),
        );
        // Every reason appears from the start, at zero, so dashboards see the series.
        for code in ErrorCode::ALL {
            let _ = rejections.get_or_create(&Reason { reason: code.as_str() });
        }
        let turn_allocations = Gauge::default();
        let turn_allocations_total = Counter::default();
        let turn_relayed_bytes = Counter::default();
        let turn_refusals = Family::<Reason, Counter>::default();
        registry.register(
            "weft_turn_allocations",
            "TURN allocations open",
            turn_allocations.clone(),
        );
        registry.register(
            "weft_turn_allocations",
            "TURN allocations made since start",
            turn_allocations_total.clone(),
        );
        registry.register(
            "weft_turn_relayed_bytes",
            "Bytes relayed by TURN allocations",
            turn_relayed_bytes.clone(),
        );
        registry.register(
            "weft_turn_refusals",
            "TURN requests refused or relayed datagrams dropped, by reason",
            turn_refusals.clone(),
        );
        for r in TurnRefusal::ALL {
            let _ = turn_refusals.get_or_create(&Reason { reason: r.as_str() });
        }
        Self {
            registry,
            connections,
            connections_total,
            rooms,
            messages_relayed,
            rejections,
            turn_allocations,
            turn_allocations_total,
            turn_relayed_bytes,
            turn_refusals,
        }
    }
}

impl Metrics {
    /// Counts one rejection.
    pub fn reject(&self, code: ErrorCode) {
        self.rejections.get_or_create(&Reason { reason: code.as_str() }).inc();
    }

    /// How many rejections of `code` so far.
    pub fn rejections(&self, code: ErrorCode) -> u64 {
        self.rejections.get_or_create(&Reason { reason: code.as_str() }).get()
    }

    /// Counts one TURN refusal.
    pub fn turn_refused(&self, reason: TurnRefusal) {
        self.turn_refusals.get_or_create(&Reason { reason: reason.as_str() }).inc();
    }

    /// How many TURN refusals for `reason` so far.
    pub fn turn_refusals(&self, reason: TurnRefusal) -> u64 {
        self.turn_refusals.get_or_create(&Reason { reason: reason.as_str() }).get()
    }

    /// The Prometheus/OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
