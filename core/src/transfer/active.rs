//! The engine's downloads, with an index of those its scheduler may have work for.
//!
//! `Engine::schedule` runs on nearly every event (a chunk, a write, a timeout). It used
//! to look at every download each time, so a folder of n small files cost n x events,
//! quadratic in n: 10,000 one-chunk files took 274 s of engine time. [`Downloads`] keeps
//! the map of downloads together with:
//!
//! - two ordered sets of keys, a superset each of the downloads that may need a
//!   hash-list request and of those that may need chunk requests. Every mutable access
//!   to a download goes through [`Downloads::get_mut`], [`Downloads::iter_mut`],
//!   [`Downloads::insert`] or [`Downloads::get_or_insert_with`], which mark it touched,
//!   and a touched download joins both sets when the scheduler next runs. The scheduler
//!   visits the sets in key order (the order it always visited downloads in, so what it
//!   sends is unchanged) and takes a download out of a set once it has nothing more to
//!   ask for, until it is touched again ([`Downloads::settle`]);
//! - the set of downloads with a deadline or a wake-up (requests out, a hash list due,
//!   a query to repeat), so that `Engine::poll_timeout`, which drivers ask after every
//!   input, looks at those (and the touched ones) only;
//! - the count of chunks requested or being written over all downloads (what the
//!   `max_unwritten` budget is checked against), kept up to date from the same marks
//!   instead of summed over every download.
//!
//! So a schedule costs O(log n) per download it has work for, plus the touched ones.
//! Hand-written: it is a few sets beside a map, specific to what the scheduler asks.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::{Bound, Deref};

use super::hash::Root;

/// What the index needs to know of a download.
pub(crate) trait Scheduled {
    /// Chunks requested or received but not yet written.
    fn unwritten(&self) -> usize;
    /// Whether it has a deadline or a wake-up (`Engine::poll_timeout` looks at it).
    fn has_timers(&self) -> bool;
}

/// The downloads by key, with the scheduler's index (see the module docs). Read access
/// is the map's own (`Deref`); mutable access marks what it touches.
#[derive(Debug)]
pub(crate) struct Downloads<V> {
    map: BTreeMap<Root, V>,
    /// May need a hash-list request.
    want_hashes: BTreeSet<Root>,
    /// May need chunk requests.
    want_chunks: BTreeSet<Root>,
    /// Have a deadline or a wake-up, as of their last flush (with `touched`, a superset
    /// of those that have one now).
    timed: BTreeSet<Root>,
    /// Touched since the scheduler last ran.
    touched: HashSet<Root>,
    /// All of them were (an `iter_mut`).
    all_touched: bool,
    /// Each download's unwritten chunks when last counted, and their sum.
    counted: HashMap<Root, usize>,
    unwritten: usize,
}

impl<V> Default for Downloads<V> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
            want_hashes: BTreeSet::new(),
            want_chunks: BTreeSet::new(),
            timed: BTreeSet::new(),
            touched: HashSet::new(),
            all_touched: false,
            counted: HashMap::new(),
            unwritten: 0,
        }
    }
}

impl<V> Deref for Downloads<V> {
    type Target = BTreeMap<Root, V>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<V: Scheduled> Downloads<V> {
    pub fn get_mut(&mut self, key: &Root) -> Option<&mut V> {
        let d = self.map.get_mut(key)?;
        self.touched.insert(*key);
        Some(d)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&Root, &mut V)> {
        self.all_touched = true;
        self.map.iter_mut()
    }

    pub fn get_or_insert_with(&mut self, key: Root, new: impl FnOnce() -> V) -> &mut V {
        self.touched.insert(key);
        self.map.entry(key).or_insert_with(new)
    }

    pub fn insert(&mut self, key: Root, d: V) {
        self.touched.insert(key);
        self.map.insert(key, d);
    }

    pub fn remove(&mut self, key: &Root) -> Option<V> {
        let d = self.map.remove(key)?;
        self.unwritten = self.unwritten.saturating_sub(self.counted.remove(key).unwrap_or(0));
        self.want_hashes.remove(key);
        self.want_chunks.remove(key);
        self.timed.remove(key);
        self.touched.remove(key);
        Some(d)
    }

    /// Takes in what was touched since the last run: counts it again and puts it in
    /// both sets.
    pub fn flush(&mut self) {
        let keys: Vec<Root> = if std::mem::take(&mut self.all_touched) {
            self.touched.clear();
            self.map.keys().copied().collect()
        } else {
            self.touched.drain().collect()
        };
        for key in keys {
            if self.map.contains_key(&key) {
                self.recount(&key);
                self.want_hashes.insert(key);
                self.want_chunks.insert(key);
            }
        }
    }

    fn recount(&mut self, key: &Root) {
        let Some(d) = self.map.get(key) else { return };
        if d.has_timers() {
            self.timed.insert(*key);
        } else {
            self.timed.remove(key);
        }
        let now = d.unwritten();
        let before = self.counted.insert(*key, now).unwrap_or(0);
        // `before` is part of the sum; saturating all the same, so a slip cannot panic.
        self.unwritten = self.unwritten.saturating_sub(before) + now;
    }

    /// Chunks requested or being written over all downloads.
    pub fn unwritten(&self) -> usize {
        self.unwritten
    }

    /// The next download after `after` (in key order) that may need a hash-list request,
    /// or (with `chunks`) chunk requests.
    pub fn next_candidate(&self, after: Option<&Root>, chunks: bool) -> Option<Root> {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let hashes = self.want_hashes.range((from, Bound::Unbounded)).next();
        let chunks = chunks.then(|| self.want_chunks.range((from, Bound::Unbounded)).next());
        match (hashes, chunks.flatten()) {
            (Some(a), Some(b)) => Some(*a.min(b)),
            (a, b) => a.or(b).copied(),
        }
    }

    /// The downloads that may have a deadline or a wake-up: those that had one when
    /// last flushed and those touched since (all of them after an `iter_mut`).
    pub fn maybe_timed(&self) -> Vec<&V> {
        if self.all_touched {
            return self.map.values().collect();
        }
        let keys =
            self.timed.iter().chain(self.touched.iter().filter(|k| !self.timed.contains(*k)));
        keys.filter_map(|k| self.map.get(k)).collect()
    }

    /// A download for the scheduler, which calls [`Self::settle`] after it.
    pub fn sched_mut(&mut self, key: &Root) -> Option<&mut V> {
        self.map.get_mut(key)
    }

    /// The scheduler is done with `key` for now: its hash-list request is sent or not
    /// needed, and (with `idle`) it has no chunk to ask for until it is touched again.
    pub fn settle(&mut self, key: &Root, idle: bool) {
        self.recount(key);
        self.want_hashes.remove(key);
        if idle {
            self.want_chunks.remove(key);
        }
    }

    /// Whether the index may leave `key` out (for the debug check that it never leaves
    /// out a download with work).
    #[cfg(debug_assertions)]
    pub fn left_out(&self, key: &Root) -> (bool, bool, bool) {
        let timed = self.timed.contains(key) || self.touched.contains(key) || self.all_touched;
        (!self.want_hashes.contains(key), !self.want_chunks.contains(key), !timed)
    }

    /// The unwritten count summed afresh (for the debug check).
    #[cfg(debug_assertions)]
    pub fn unwritten_summed(&self) -> usize {
        self.map.values().map(Scheduled::unwritten).sum()
    }
}
