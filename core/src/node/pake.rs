//! The node's side of the pairwise PAKE (`crate::pake`): one run per other member of a
//! passphrase network, what waits for it, and how often a peer may try.
//!
//! Policy (`SECURITY.md`): every run we finish gives the other side one guess of the
//! passphrase, so finishing is what is limited ([`PakeGuard`]):
//! - a run whose confirmation does not check, or does not come within [`CONFIRM_WAIT`],
//!   is a failed attempt, counted against the peer's id;
//! - after `n` failures from one id, its next run is finished no sooner than
//!   [`FIRST_BACKOFF`]·2^(n-1) later (at most [`MAX_BACKOFF`]);
//! - ids are the server's to give, so failures also count network-wide: past
//!   [`FREE_FAILURES`] within [`FAILURE_WINDOW`], any run not yet confirmed waits a
//!   back-off of its own (doubling, at most [`MAX_BACKOFF`]);
//! - at most [`MAX_UNCONFIRMED`] runs wait for a confirmation at once, so fresh ids
//!   cannot try many guesses in parallel before the first failure counts; once failures
//!   pile up as above, one at a time.
//!
//! A peer's Start that comes while it must wait is kept (the latest one per peer) and
//! answered when the wait ends.

use std::collections::VecDeque;
use std::time::Duration;

use hpke::rand_core::CryptoRng;

use super::{Event, Node, Output, PeerFailure};
use crate::pake::{Incoming, PakeKeys, PakeMessage, PakeRun, SPAKE_MSG_LEN, classify};
use crate::sealed::SignalSealer;
use crate::signal::{PeerId, SignalPayload};
use crate::sorted::SortedMap;

/// How long a finished run waits for the other side's confirmation.
pub const CONFIRM_WAIT: Duration = Duration::from_secs(10);
/// How long our Start waits for the other side's before we start again.
pub const START_WAIT: Duration = Duration::from_secs(10);
/// The wait after one id's first failure; it doubles with each more.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// The longest wait.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Failures network-wide within [`FAILURE_WINDOW`] before every new run waits.
pub const FREE_FAILURES: usize = 3;
/// How long a failure counts network-wide.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(600);
/// Runs waiting for a confirmation at once.
pub const MAX_UNCONFIRMED: usize = 8;
/// Descriptions and candidates held for a peer until its run confirms.
const MAX_HELD: usize = 256;

fn backoff(n: u32) -> Duration {
    let exp = n.saturating_sub(1).min(16);
    FIRST_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF)
}

/// Where the run with one peer is.
#[derive(Debug)]
pub(crate) enum PairState {
    /// Our Start is out; the other side's not in yet (or kept until `due`).
    Sent {
        run: Box<PakeRun>,
        since: Duration,
        /// The other side's Start, kept until the guard lets us finish, and when to try.
        kept: Option<([u8; SPAKE_MSG_LEN], Duration)>,
    },
    /// Finished; our Confirm is out, theirs not in yet.
    Finished { keys: Box<PakeKeys>, deadline: Duration },
    /// Both confirmed: the pair's keys are in use.
    Confirmed { sealer: Box<SignalSealer> },
    /// No run: the next starts at `at` (a new peer: now; after a failure: later).
    Due { at: Duration },
}

/// The PAKE with one peer.
#[derive(Debug)]
pub(crate) struct Pair {
    pub state: PairState,
    /// What our connection wants sent before the run confirmed.
    pub held: Vec<SignalPayload>,
    /// A run that confirmed once (keys in use): a later failure does not fail the link.
    pub ever_confirmed: bool,
}

impl Pair {
    pub(crate) fn new(state: PairState) -> Self {
        Self { state, held: Vec::new(), ever_confirmed: false }
    }

    pub(crate) fn hold(&mut self, payload: SignalPayload) {
        if self.held.len() < MAX_HELD {
            self.held.push(payload);
        }
    }

    pub(crate) fn sealer(&self) -> Option<&SignalSealer> {
        match &self.state {
            PairState::Confirmed { sealer, .. } => Some(sealer.as_ref()),
            _ => None,
        }
    }

    /// When this pair needs the node next.
    pub(crate) fn due(&self) -> Option<Duration> {
        match &self.state {
            PairState::Sent { kept: Some((_, at)), .. } => Some(*at),
            PairState::Sent { since, kept: None, .. } => Some(*since + START_WAIT),
            PairState::Finished { deadline, .. } => Some(*deadline),
            PairState::Confirmed { .. } => None,
            PairState::Due { at } => Some(*at),
        }
    }
}

/// One id's failures.
#[derive(Debug, Clone, Copy, Default)]
struct IdRecord {
    failures: u32,
    next: Duration,
}

/// Counts failed runs and says when the next may finish. See the module docs.
#[derive(Debug, Default)]
pub(crate) struct PakeGuard {
    per_id: SortedMap<PeerId, IdRecord>,
    recent: VecDeque<Duration>,
    global_next: Duration,
    total: u64,
}

impl PakeGuard {
    /// The earliest a run with `id` may finish (give `id` a guess).
    pub(crate) fn finish_at(&self, id: &PeerId) -> Duration {
        let own = self.per_id.get(id).map_or(Duration::ZERO, |r| r.next);
        own.max(self.global_next)
    }

    /// Whether a run with `id` may finish at `now`, with `unconfirmed` runs waiting.
    /// Once failures pile up network-wide, one run at a time.
    pub(crate) fn may_finish(&self, id: &PeerId, now: Duration, unconfirmed: usize) -> bool {
        let attacked =
            self.recent.iter().filter(|t| **t + FAILURE_WINDOW > now).count() > FREE_FAILURES;
        let most = if attacked { 1 } else { MAX_UNCONFIRMED };
        unconfirmed < most && self.finish_at(id) <= now
    }

    /// A run with `id` failed at `now`: its failures so far.
    pub(crate) fn failed(&mut self, id: &PeerId, now: Duration) -> u32 {
        self.total += 1;
        let r = self.per_id.entry(id.clone()).or_default();
        r.failures = r.failures.saturating_add(1);
        r.next = now + backoff(r.failures);
        let failures = r.failures;
        while self.recent.front().is_some_and(|t| *t + FAILURE_WINDOW <= now) {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        if self.recent.len() > FREE_FAILURES {
            let over = u32::try_from(self.recent.len() - FREE_FAILURES).unwrap_or(u32::MAX);
            self.global_next = now + backoff(over);
        }
        failures
    }

    /// Failed runs by id, most first.
    pub(crate) fn failures(&self) -> Vec<(PeerId, u32)> {
        let mut v: Vec<(PeerId, u32)> =
            self.per_id.iter().map(|(id, r)| (id.clone(), r.failures)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    /// Failed runs in all.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }
}

impl Node {
    /// Pairs whose time came: start a run, answer a kept Start, give up on a confirmation.
    pub(super) fn pake_timeouts(&mut self, now: Duration, rng: &mut impl CryptoRng) {
        let due: Vec<PeerId> = self
            .pairs
            .iter()
            .filter(|(_, p)| p.due().is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(pair) = self.pairs.get_mut(&id) else { continue };
            match &pair.state {
                PairState::Due { .. } => self.pake_begin(now, &id, None, rng),
                PairState::Sent { kept: Some(_), .. } => self.pake_finish(now, &id),
                PairState::Sent { kept: None, .. } => self.pake_begin(now, &id, None, rng),
                PairState::Finished { .. } => self.pake_failed(now, &id),
                PairState::Confirmed { .. } => {}
            }
        }
    }

    /// A new run with `id`: our Start goes out; `theirs`, if given, is answered as soon
    /// as the guard lets us.
    fn pake_begin(
        &mut self,
        now: Duration,
        id: &PeerId,
        theirs: Option<[u8; SPAKE_MSG_LEN]>,
        rng: &mut impl CryptoRng,
    ) {
        let Some(own) = self.signaling.own_id().cloned() else { return };
        let (run, start) =
            PakeRun::start(self.network.secret(), self.network.room_id(), &own, id, rng);
        let Some(pair) = self.pairs.get_mut(id) else { return };
        let run = Box::new(run);
        pair.state = PairState::Sent { run, since: now, kept: theirs.map(|m| (m, now)) };
        self.send_payload(id, start.to_payload());
        if theirs.is_some() {
            self.pake_finish(now, id);
        }
    }

    /// Finishes the run with `id` with its kept Start, if the guard lets us now.
    fn pake_finish(&mut self, now: Duration, id: &PeerId) {
        let unconfirmed =
            self.pairs.values().filter(|p| matches!(p.state, PairState::Finished { .. })).count();
        let Some(pair) = self.pairs.get_mut(id) else { return };
        if !self.guard.may_finish(id, now, unconfirmed) {
            if let PairState::Sent { kept: Some((_, at)), .. } = &mut pair.state {
                // Busy with other runs: look again in a second.
                *at = self.guard.finish_at(id).max(now + Duration::from_secs(1));
            }
            return;
        }
        let state = std::mem::replace(&mut pair.state, PairState::Due { at: now });
        let PairState::Sent { run, kept: Some((theirs, _)), since } = state else {
            pair.state = state;
            return;
        };
        match (*run).finish(&theirs) {
            Ok((keys, confirm)) => {
                let keys = Box::new(keys);
                pair.state = PairState::Finished { keys, deadline: now + CONFIRM_WAIT };
                self.send_payload(id, confirm.to_payload());
            }
            Err(e) => {
                tracing::debug!("passphrase check with {id}: {e}");
                self.refused_signals += 1;
                // `finish` took the run: a new one starts after the usual wait.
                pair.state = PairState::Due { at: since + START_WAIT };
            }
        }
    }

    /// The run with `id` failed (a wrong confirmation, none in time, or abandoned).
    fn pake_failed(&mut self, now: Duration, id: &PeerId) {
        let failures = self.guard.failed(id, now);
        let retry_at = self.guard.finish_at(id);
        let Some(pair) = self.pairs.get_mut(id) else { return };
        pair.state = PairState::Due { at: retry_at };
        let keep_session = pair.ever_confirmed;
        tracing::info!("passphrase check with {id} failed ({failures} so far)");
        self.emit(Event::PassphraseFailures {
            peer: id.clone(),
            failures,
            total: self.guard.total(),
            retry_in: retry_at.saturating_sub(now),
        });
        if keep_session {
            return;
        }
        if let Some(slot) = self.peers.get_mut(id) {
            if slot.failure.is_none() {
                slot.failure = Some(PeerFailure::WrongPassphrase);
                let info =
                    slot.info(id, &self.overlay, self.clock, self.engine.refusals().of_peer(id));
                self.emit(Event::PeerFailed(info));
            }
        }
        self.show(id);
    }

    /// The run with `id` confirmed: its keys seal the pair's signaling and key its
    /// handshake; what our connection wanted sent goes now.
    fn pake_confirmed(&mut self, id: &PeerId, keys: PakeKeys, rng: &mut impl CryptoRng) {
        let secret = keys.pair_secret().clone();
        let sealer = SignalSealer::new(&secret.signal_seal_key(), self.network.room_id().clone());
        let Some(pair) = self.pairs.get_mut(id) else { return };
        pair.state = PairState::Confirmed { sealer: Box::new(sealer) };
        pair.ever_confirmed = true;
        let held = std::mem::take(&mut pair.held);
        if let Some(slot) = self.peers.get_mut(id) {
            slot.link.set_pair_secret(secret);
            if slot.failure == Some(PeerFailure::WrongPassphrase) {
                slot.failure = None;
            }
        }
        for payload in held {
            self.send_signal(id, payload, rng);
        }
        self.show(id);
    }

    /// A signaling payload from `from` in a passphrase network.
    pub(super) fn on_pake_signal(
        &mut self,
        now: Duration,
        from: &PeerId,
        payload: SignalPayload,
        rng: &mut impl CryptoRng,
    ) {
        let incoming = match classify(&payload) {
            Ok(incoming) => incoming,
            Err(e) => {
                self.refused_signals += 1;
                return tracing::debug!("dropped a signaling payload from {from}: {e}");
            }
        };
        match incoming {
            Incoming::Pake(PakeMessage::Start { msg }) => {
                if !self.pairs.contains_key(from) {
                    // A member we did not know of yet (it raced our welcome).
                    if !self.signaling.in_room(from) {
                        return;
                    }
                    self.add_peer(now, from);
                }
                let Some(pair) = self.pairs.get_mut(from) else { return };
                match &mut pair.state {
                    PairState::Sent { kept, .. } => {
                        *kept = Some((msg, now));
                        self.pake_finish(now, from);
                    }
                    // A run given up on without a confirmation was a guess all the same.
                    PairState::Finished { .. } => {
                        self.pake_failed(now, from);
                        self.pake_begin(now, from, Some(msg), rng);
                    }
                    PairState::Due { .. } | PairState::Confirmed { .. } => {
                        self.pake_begin(now, from, Some(msg), rng);
                    }
                }
            }
            Incoming::Pake(PakeMessage::Confirm { transcript, mac }) => {
                let Some(pair) = self.pairs.get_mut(from) else { return };
                let PairState::Finished { keys, .. } = &pair.state else { return };
                // A confirmation of an older run: stale, not wrong.
                if keys.transcript() != &transcript {
                    return;
                }
                match keys.check(&mac) {
                    Ok(()) => {
                        let keys = PakeKeys::clone(keys);
                        self.pake_confirmed(from, keys, rng);
                    }
                    Err(_) => self.pake_failed(now, from),
                }
            }
            Incoming::Sealed => {
                let (Some(own), Some(pair)) = (self.signaling.own_id(), self.pairs.get(from))
                else {
                    return;
                };
                let Some(sealer) = pair.sealer() else {
                    self.refused_signals += 1;
                    return;
                };
                match sealer.open(from, own, &payload) {
                    Ok(inner) => {
                        if let Some(slot) = self.peers.get(from) {
                            self.out.push_back(Output::Signal { conn: slot.conn, payload: inner });
                        }
                    }
                    Err(e) => {
                        self.refused_signals += 1;
                        tracing::warn!("dropped a signaling payload from {from}: {e}");
                    }
                }
            }
            Incoming::Clear => {
                self.refused_signals += 1;
                tracing::warn!(
                    "dropped a description in clear from {from}: in a passphrase network only \
                     a peer that checked the passphrase may send one (an older Weft?)"
                );
            }
        }
    }

    /// Failed passphrase checks by the id they came from, most first.
    pub fn passphrase_failures(&self) -> Vec<(PeerId, u32)> {
        self.guard.failures()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn one_id_backs_off_doubling_up_to_a_minute() {
        let mut g = PakeGuard::default();
        let id = PeerId::new("m").unwrap();
        assert!(g.may_finish(&id, Duration::ZERO, 0));
        let mut now = Duration::ZERO;
        let mut waits = Vec::new();
        for _ in 0..8 {
            g.failed(&id, now);
            let at = g.finish_at(&id);
            waits.push((at - now).as_secs());
            assert!(!g.may_finish(&id, now, 0));
            now = at;
        }
        // The network-wide back-off joins in after three failures.
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(waits[0], 2);
        assert_eq!(*waits.last().unwrap(), 60);
        assert_eq!(g.failures(), vec![(id, 8)]);
    }

    #[test]
    fn fresh_ids_wait_once_failures_pile_up_network_wide() {
        let mut g = PakeGuard::default();
        for i in 0..FREE_FAILURES {
            g.failed(&PeerId::new(format!("m{i}")).unwrap(), S);
        }
        let fresh = PeerId::new("fresh").unwrap();
        assert!(g.may_finish(&fresh, S, 0), "a few failures cost others nothing");
        g.failed(&PeerId::new("another").unwrap(), S);
        assert!(!g.may_finish(&fresh, S, 0), "then every new run waits");
        assert!(g.may_finish(&fresh, S + backoff(1), 0));
        assert!(!g.may_finish(&fresh, S * 100, MAX_UNCONFIRMED), "few guesses in parallel");
        assert!(!g.may_finish(&fresh, S * 100, 1), "one at a time under attack");
        assert!(g.may_finish(&fresh, S + FAILURE_WINDOW, 1), "until the failures age");
        assert_eq!(g.total(), 4);
    }
}
