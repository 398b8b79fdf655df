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
        Self { registry, connections, connections_total, rooms, messages_relayed, rejections }
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

    /// The Prometheus/OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
