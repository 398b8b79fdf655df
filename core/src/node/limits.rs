//! How much a connection's driver may hold for a peer, the same on every platform.
//!
//! The drivers own the buffers (a browser's `RTCDataChannel.bufferedAmount`, webrtc-rs's
//! outstanding bytes, their own queues), but when to drop or refuse is policy, so it is
//! decided here once: the browser and the native peer used to write these rules each in
//! their own words, with their own constants.
//!
//! What a peer may ask of file transfer (file sizes, offers, hash lists) is capped beside
//! the engine that enforces it: [`crate::transfer::TransferLimits`], re-exported here.

pub use crate::transfer::TransferLimits;

/// The per-connection buffer limits a driver applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Bytes the unreliable channel (IP packets) may hold unsent or unacknowledged before
    /// a new packet is dropped: about 2 ms at 1 Gbit/s, or 200 full IP packets. A full
    /// queue drops, as a router's would: TCP inside sees the loss and slows down, instead
    /// of the queue (and the round trip) growing.
    pub data_queue: usize,
    /// Bytes queued for the control channel (in the driver, before the channel opens or
    /// while it is congested) before a send is refused.
    pub control_outbox: usize,
    /// Remote candidates kept while no remote description is set; more are dropped.
    pub pending_candidates: usize,
}

impl ConnectionLimits {
    /// Weft's limits.
    pub const DEFAULT: Self =
        Self { data_queue: 256 * 1024, control_outbox: 16 * 1024 * 1024, pending_candidates: 256 };

    /// Whether a packet of `len` bytes may go on the unreliable channel while `queued`
    /// bytes wait there; `false` means drop it.
    pub fn admits_data(&self, queued: usize, len: usize) -> bool {
        queued.saturating_add(len) <= self.data_queue
    }

    /// Whether a control message of `len` bytes may be queued while `queued` bytes wait;
    /// `false` means refuse it (the caller reports congestion).
    pub fn admits_control(&self, queued: usize, len: usize) -> bool {
        queued.saturating_add(len) <= self.control_outbox
    }

    /// Whether one more remote candidate may be kept while `pending` wait for a remote
    /// description.
    pub fn admits_candidate(&self, pending: usize) -> bool {
        pending < self.pending_candidates
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_data_queue_drops_and_a_packet_that_fits_goes() {
        let l = ConnectionLimits::DEFAULT;
        assert!(l.admits_data(0, 1314));
        assert!(l.admits_data(l.data_queue - 1314, 1314));
        assert!(!l.admits_data(l.data_queue - 1313, 1314));
        assert!(!l.admits_data(usize::MAX, 1), "no overflow on a huge queue reading");
    }

    #[test]
    fn the_control_outbox_refuses_past_its_limit() {
        let l = ConnectionLimits::DEFAULT;
        assert!(l.admits_control(l.control_outbox - 10, 10));
        assert!(!l.admits_control(l.control_outbox - 10, 11));
    }

    #[test]
    fn candidates_are_kept_up_to_the_limit() {
        let l = ConnectionLimits::DEFAULT;
        assert!(l.admits_candidate(l.pending_candidates - 1));
        assert!(!l.admits_candidate(l.pending_candidates));
    }
}
