//! How many chunk requests a download keeps outstanding at one source, and how long it
//! waits for each: delay-based, so a slow link is kept full without being flooded.
//!
//! The receiver's window used to grow by one per chunk up to [`super::EngineConfig`]'s
//! `max_window` (64 chunks of 64 KiB) whatever the link. On a link slower than about
//! 4 Mbit/s (a phone's uplink, a loaded relay) 4 MiB of requests queue for longer than the
//! 8 s request timeout, so requests timed out by design: the chunks were asked for again
//! (sent twice), the source was dropped as "stopped answering", and anything else on the
//! session (messages, other files) waited behind seconds of queued chunks.
//!
//! Now each source measures how long its requests take to be answered (request to chunk,
//! smoothed as TCP smooths round trips, RFC 6298) and the shortest it has seen. The
//! difference is the queue the window builds: the window grows while that queue is under
//! [`QUEUE_TARGET`] and shrinks while it is over twice that (the idea of TCP Vegas and
//! LEDBAT, RFC 6817, applied to requests instead of packets). A request times out after
//! the configured time or, if longer, four smoothed answer times plus four deviations, so
//! a link that is merely slow never looks dead. On a fast link the queue never reaches
//! the target and the window grows to its maximum as before.
//!
//! Written here rather than taken from a crate: congestion-control crates work on packets
//! and acknowledgements of a transport, not on a receiver's window of application
//! requests; the whole rule is a few lines.

use std::time::Duration;

/// The queueing delay a source's requests may build before its window stops growing.
pub const QUEUE_TARGET: Duration = Duration::from_millis(1000);

/// A source's measured answer times.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pace {
    /// Smoothed answer time (request to chunk); `None` before the first answer.
    srtt: Option<Duration>,
    /// Smoothed deviation of the answer time.
    rttvar: Duration,
    /// The shortest answer time seen: the link and the source with nothing queued.
    min: Duration,
    /// The latest answer time.
    last: Duration,
}

impl Pace {
    /// Records that a request was answered `took` after it was sent.
    pub fn answered(&mut self, took: Duration) {
        self.last = took;
        match self.srtt {
            None => {
                self.srtt = Some(took);
                self.rttvar = took / 2;
                self.min = took;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(took);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + took) / 8);
                self.min = self.min.min(took);
            }
        }
    }

    /// The queue the requests build: the latest answer time above the shortest. (The
    /// latest, not the smoothed one: a window set from an average that lags behind keeps
    /// growing for a while after the queue is long.)
    pub fn queueing(&self) -> Duration {
        self.last.saturating_sub(self.min)
    }

    /// The window after an answer: one more while the queue is short, one less (not below
    /// `floor`) while it is long, else unchanged; never above `max`.
    pub fn next_window(&self, window: u32, floor: u32, max: u32) -> u32 {
        let queue = self.queueing();
        let next = if queue <= QUEUE_TARGET {
            window.saturating_add(1)
        } else if queue > QUEUE_TARGET * 2 {
            window.saturating_sub(1).max(floor)
        } else {
            window
        };
        next.min(max).max(1)
    }

    /// How long a request to this source may go unanswered: `base`, or longer for a source
    /// whose answers take long.
    pub fn timeout(&self, base: Duration) -> Duration {
        self.srtt.map_or(base, |s| base.max(s.saturating_add(self.rttvar * 4)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn a_fast_source_grows_to_the_maximum() {
        let mut p = Pace::default();
        let mut w = 16;
        for i in 0..100 {
            p.answered(MS(2 + i % 5));
            w = p.next_window(w, 4, 64);
        }
        assert_eq!(w, 64);
    }

    #[test]
    fn a_queue_over_the_target_shrinks_the_window_and_lengthens_the_timeout() {
        let mut p = Pace::default();
        p.answered(MS(300));
        let mut w = 40;
        for _ in 0..200 {
            p.answered(MS(3000));
            w = p.next_window(w, 4, 64);
        }
        assert_eq!(w, 4, "a 2.7 s queue shrinks the window to its floor");
        assert!(p.timeout(Duration::from_secs(8)) >= Duration::from_secs(8));
        let mut slow = Pace::default();
        for _ in 0..50 {
            slow.answered(Duration::from_secs(6));
        }
        slow.answered(Duration::from_secs(9));
        assert!(slow.timeout(Duration::from_secs(8)) > Duration::from_secs(9));
    }

    #[test]
    fn between_target_and_twice_it_the_window_holds() {
        let mut p = Pace::default();
        p.answered(MS(100));
        for _ in 0..100 {
            p.answered(MS(1600));
        }
        assert_eq!(p.next_window(10, 4, 64), 10);
    }
}
