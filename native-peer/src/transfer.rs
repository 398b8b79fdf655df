//! `send` and `receive`: thin commands over the mesh's file transfer ([`crate::files`]).
//! They ask the mesh to share, offer, accept or decline, and watch its events, drawing
//! progress bars on stderr (per file and in total, with speed and ETA), or printing JSON
//! lines with `--json`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::IsTerminal as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use weft_core::node::NodeError;
use weft_core::node::{AcceptPolicy, DeclineReason, FileEvent, OfferVerdict, PeerRef};
use weft_core::signal::PeerId;
use weft_core::transfer::{OfferItem, PendingBudget, Root, TransferError, TransferEvent};
use weft_core::trust::Trust;

use crate::files::{SendItem, hash_file};
use crate::mesh::{MeshError, MeshEvent, MeshHandle, NamedFileEvent, PeerInfo, PeerState};
use crate::output::{Printer, file_json, file_text};
use crate::{Joined, Stop, StopSignals};
use weft_core::node::Event;

/// Progress bars, or nothing with `--json`.
struct Bars {
    multi: MultiProgress,
    files: HashMap<Root, ProgressBar>,
    total: Option<ProgressBar>,
    json: bool,
}

fn style(prefix_width: usize) -> ProgressStyle {
    let template = format!(
        "{{prefix:{prefix_width}}} [{{bar:30}}] {{bytes:>10}}/{{total_bytes:10}} \
         {{bytes_per_sec:>12}} ETA {{eta}}"
    );
    ProgressStyle::with_template(&template)
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl Bars {
    fn new(json: bool) -> Self {
        let target = if json { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() };
        Self {
            multi: MultiProgress::with_draw_target(target),
            files: HashMap::new(),
            total: None,
            json,
        }
    }

    fn add(&mut self, root: Root, label: &str, len: u64) -> ProgressBar {
        let bar = self.files.entry(root).or_insert_with(|| {
            let label = weft_core::text::escape_hidden(label);
            let bar = ProgressBar::new(len).with_prefix(shorten(&label, 40)).with_style(style(40));
            match &self.total {
                Some(total) => self.multi.insert_before(total, bar),
                None => self.multi.add(bar),
            }
        });
        bar.clone()
    }

    fn set_total(&mut self, len: u64) {
        match &self.total {
            Some(total) => total.set_length(len),
            None => {
                let bar = ProgressBar::new(len).with_prefix("total").with_style(style(40));
                self.total = Some(self.multi.add(bar));
            }
        }
    }

    fn set(&self, root: &Root, pos: u64) {
        if let Some(bar) = self.files.get(root) {
            bar.set_position(pos);
        }
        if let Some(total) = &self.total {
            let sum: u64 = self.files.values().map(ProgressBar::position).sum();
            total.set_position(sum);
        }
    }

    fn finish(&self, root: &Root) {
        if let Some(bar) = self.files.get(root) {
            bar.set_position(bar.length().unwrap_or(0));
            bar.finish();
        }
        self.set(root, self.files.get(root).map_or(0, ProgressBar::position));
    }

    /// A line for people (stdout, above the bars) or a JSON line.
    fn say(&self, value: Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{value}");
        } else {
            let text = text();
            self.multi.suspend(|| say!("{text}"));
        }
    }

    /// A file event as JSON (with `--json`), or its text line if it has one.
    fn file_event(&self, named: &NamedFileEvent) {
        if self.json {
            println!("{}", file_json(named));
        } else if let Some(text) = file_text(&named.event) {
            self.multi.suspend(|| say!("{text}"));
        }
    }

    fn clear(&self) {
        let _ = self.multi.clear();
    }
}

fn shorten(s: &str, max: usize) -> String {
    let count = s.chars().count();
    if count <= max {
        return s.to_string();
    }
    let tail: String = s.chars().skip(count - (max - 1)).collect();
    format!("…{tail}")
}

fn name_of(info: &PeerInfo) -> String {
    info.name.clone().unwrap_or_else(|| info.peer_id.to_string())
}

fn is_up(info: &PeerInfo) -> bool {
    matches!(info.state, PeerState::Direct | PeerState::Relayed)
}

/// The peers `specs` name (see [`PeerRef`]: a pinned name, a safety code, a fingerprint
/// or a peer id), or which word is not a name at all.
pub fn peer_refs(specs: &[String]) -> anyhow::Result<Vec<PeerRef>> {
    specs.iter().map(|s| PeerRef::new(s).with_context(|| format!("{s:?}"))).collect()
}

// ---------------------------------------------------------------------------------------
// send

struct Recipient {
    peer_id: PeerId,
    name: String,
    offer_id: u64,
    remaining: HashSet<Root>,
    /// When its session went away (it may come back under a new peer id).
    gone_since: Option<Instant>,
}

/// `send`: hash, share, offer to the recipients, serve until each has verified every
/// file.
pub async fn send(
    joined: Joined,
    printer: Printer,
    items: Vec<SendItem>,
    to: &[String],
    timeout: Duration,
) -> anyhow::Result<()> {
    let Joined { mesh, mut events, .. } = joined;
    let result = send_inner(&mesh, &mut events, printer, items, to, timeout).await;
    mesh.shutdown().await?;
    result
}

async fn send_inner(
    mesh: &MeshHandle,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<MeshEvent>,
    printer: Printer,
    items: Vec<SendItem>,
    to: &[String],
    timeout: Duration,
) -> anyhow::Result<()> {
    let to_refs = peer_refs(to)?;
    let mut bars = Bars::new(printer.json);
    // Share every file at once, to offer it as soon as the recipients are up; one
    // blocking thread hashes them in turn meanwhile, its CVs going to the mesh as they
    // come, its digests back here (core/TRANSFER.md, "Offer at once").
    let mut files: Vec<(Root, String)> = Vec::new();
    let mut sizes: HashMap<Root, u64> = HashMap::new();
    let mut to_hash = Vec::new();
    for item in &items {
        let file = std::fs::File::open(&item.source)
            .with_context(|| format!("cannot open {}", item.source.display()))?;
        let local = mesh.share_streamed(file, item.size).await?;
        sizes.insert(local, item.size);
        files.push((local, item.path.clone()));
        to_hash.push((local, item.clone(), mesh.hash_reporter(local)));
    }
    let (hashed_tx, mut hashed) = tokio::sync::mpsc::unbounded_channel();
    let json = printer.json;
    tokio::task::spawn_blocking(move || {
        for (local, item, reporter) in to_hash {
            let (mut last, mut reported) = (Instant::now(), 0);
            let result = hash_file(&item.source, |done, cvs| {
                reporter.cvs(&cvs[reported..]);
                reported = cvs.len();
                if json && (last.elapsed() >= weft_core::node::PROGRESS_EVERY || done >= item.size)
                {
                    last = Instant::now();
                    let v = json!({"event": "hashing", "path": item.path, "done_bytes": done,
                                   "size": item.size});
                    println!("{v}");
                }
            });
            if let Err(e) = &result {
                reporter.failed(e.to_string());
            }
            if hashed_tx.send((local, item.path, result)).is_err() {
                return;
            }
        }
    });
    // Roots as hashing finds them → the local key each file is shared under.
    let mut roots: HashMap<Root, Root> = HashMap::new();

    // The recipients.
    let deadline = tokio::time::Instant::now() + timeout;
    let mut joined_room = false;
    let mut failures: Vec<String> = Vec::new();
    let targets: Vec<PeerInfo> = loop {
        let peers = mesh.peers().await;
        if to.is_empty() {
            let settled = peers.iter().all(|p| {
                !matches!(p.state, PeerState::Connecting | PeerState::Handshaking)
                    && (p.state == PeerState::Failed || p.name.is_some())
            });
            let up: Vec<PeerInfo> = peers.iter().filter(|p| is_up(p)).cloned().collect();
            if joined_room && settled && !up.is_empty() {
                break up;
            }
        } else {
            let found: Vec<Option<&PeerInfo>> = to_refs
                .iter()
                .map(|r| peers.iter().find(|p| is_up(p) && p.trust.is_some() && r.names(p)))
                .collect();
            if found.iter().all(Option::is_some) {
                let mut list: Vec<PeerInfo> = found.into_iter().flatten().cloned().collect();
                list.dedup_by(|a, b| a.peer_id == b.peer_id);
                break list;
            }
        }
        let event = tokio::select! {
            e = events.recv() => e,
            () = tokio::time::sleep_until(deadline) => None,
        };
        let Some(event) = event else {
            if !joined_room {
                bail!("could not reach the signaling server (see --server)");
            }
            let who = if to.is_empty() {
                "no peer".to_string()
            } else {
                let missing: Vec<&PeerRef> = to_refs
                    .iter()
                    .filter(|r| !peers.iter().any(|p| is_up(p) && r.names(p)))
                    .collect();
                if let Some(r) =
                    missing.iter().find(|r| peers.iter().any(|p| r.names_changed_key(p)))
                {
                    bail!(
                        "{r}'s key changed, so the name {r:?} no longer names it: compare safety \
                         codes with its owner, then `weft-peer trust accept {r}`, or send to its \
                         new safety code or fingerprint"
                    );
                }
                format!(
                    "peer {}",
                    missing
                        .iter()
                        .map(|s| format!("{:?}", s.as_str()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let mut message = format!("{who} connected within {} s", timeout.as_secs());
            if !failures.is_empty() {
                message.push_str(&format!("; failed: {}", failures.join("; ")));
            }
            bail!(message);
        };
        match &event {
            MeshEvent::Node(Event::Joined { .. }) => joined_room = true,
            MeshEvent::Node(Event::PeerFailed(info)) => failures.push(format!(
                "{}: {}",
                name_of(info),
                info.reason.as_ref().map_or_else(|| "unknown".into(), ToString::to_string)
            )),
            MeshEvent::Node(Event::KeyChanged(_)) => bars.multi.suspend(|| printer.event(&event)),
            _ => {}
        }
        if printer.json && !matches!(event, MeshEvent::File(_)) {
            printer.event(&event);
        }
    };

    // Offer.
    let total: u64 = files.iter().map(|(r, _)| sizes[r]).sum::<u64>() * targets.len() as u64;
    bars.set_total(total);
    for (root, path) in &files {
        bars.add(*root, path, sizes[root] * targets.len() as u64);
    }
    let mut recipients = Vec::new();
    for peer in &targets {
        let (offer_id, _) = mesh.offer(&peer.peer_id, files.clone()).await?;
        bars.say(
            json!({"event": "offered", "peer_id": peer.peer_id, "name": name_of(peer),
                   "offer_id": offer_id, "files": files.len()}),
            || {
                format!(
                    "offered {} file(s) to {}; waiting for it to accept",
                    files.len(),
                    name_of(peer)
                )
            },
        );
        recipients.push(Recipient {
            peer_id: peer.peer_id.clone(),
            name: name_of(peer),
            offer_id,
            remaining: files.iter().map(|(r, _)| *r).collect(),
            gone_since: None,
        });
    }

    // Serve until every recipient has everything.
    let mut sent: HashMap<(PeerId, Root), u64> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut stop = StopSignals::new()?;
    loop {
        if recipients.iter().all(|r| r.remaining.is_empty()) {
            break;
        }
        let event = tokio::select! {
            e = events.recv() => e,
            Some((local, path, result)) = hashed.recv() => {
                let root = match result {
                    Ok(digest) => mesh.hash_done(local, digest).await,
                    Err(e) => {
                        bars.clear();
                        bail!("cannot send {path}: {e}");
                    }
                };
                let root = root.with_context(|| format!("{path} changed while it was hashed"))?;
                roots.insert(root, local);
                bars.say(
                    json!({"event": "hashed", "path": path, "root": root.to_string(),
                           "size": sizes[&local]}),
                    || format!("{path}: {root}"),
                );
                continue;
            }
            _ = tick.tick() => {
                // A recipient's session may end (it left, or its path died) and come back
                // under a new peer id; one the server merely forgot (it went away) keeps
                // its session, so only the sessions count.
                let peers = mesh.peers().await;
                for r in recipients.iter_mut().filter(|r| !r.remaining.is_empty()) {
                    if peers.iter().any(|p| p.peer_id == r.peer_id && is_up(p)) {
                        r.gone_since = None;
                    } else {
                        r.gone_since.get_or_insert_with(Instant::now);
                    }
                }
                let lost = recipients
                    .iter()
                    .find(|r| r.gone_since.is_some_and(|t| t.elapsed() > timeout));
                if let Some(r) = lost {
                    bars.clear();
                    bail!(
                        "{} left before it had every file (waited {} s for it to come back)",
                        r.name,
                        timeout.as_secs()
                    );
                }
                continue;
            }
            stopped = stop.recv() => {
                bars.clear();
                match stopped {
                    Stop::Interrupted => bail!("interrupted before every file was delivered"),
                    Stop::Terminated => bail!("terminated before every file was delivered"),
                }
            }
        };
        let Some(event) = event else {
            bars.clear();
            bail!("the session stopped");
        };
        let recipient = |peer: &PeerId, recipients: &mut Vec<Recipient>| -> Option<usize> {
            recipients.iter().position(|r| r.peer_id == *peer)
        };
        match &event {
            MeshEvent::File(named) => {
                let ev = &named.event;
                match ev {
                    FileEvent::Engine(TransferEvent::Answered { peer, offer_id, accepted }) => {
                        if let Some(i) = recipient(peer, &mut recipients) {
                            let r = &recipients[i];
                            if r.offer_id == *offer_id && !accepted {
                                bars.clear();
                                bail!("{} declined the files", r.name);
                            }
                        }
                    }
                    FileEvent::Engine(TransferEvent::Cancelled {
                        peer,
                        offer_id,
                        reason,
                        outgoing: true,
                        ..
                    }) => {
                        if let Some(i) = recipient(peer, &mut recipients) {
                            if recipients[i].offer_id == *offer_id {
                                bars.clear();
                                bail!("{} cancelled the transfer: {reason}", recipients[i].name);
                            }
                        }
                    }
                    FileEvent::Engine(TransferEvent::Delivered { peer, root }) => {
                        // Named by its root, which hashing found before it could be verified.
                        let root = roots.get(root).unwrap_or(root);
                        if let Some(i) = recipient(peer, &mut recipients) {
                            recipients[i].remaining.remove(root);
                            let delivered =
                                recipients.iter().filter(|r| !r.remaining.contains(root)).count()
                                    as u64;
                            let size = sizes.get(root).copied().unwrap_or(0);
                            let pos = size * delivered
                                + recipients
                                    .iter()
                                    .filter(|r| r.remaining.contains(root))
                                    .map(|r| {
                                        sent.get(&(r.peer_id.clone(), *root))
                                            .copied()
                                            .unwrap_or(0)
                                            .min(size)
                                    })
                                    .sum::<u64>();
                            bars.set(root, pos);
                            if delivered == recipients.len() as u64 {
                                bars.finish(root);
                            }
                        }
                    }
                    FileEvent::Engine(TransferEvent::ShareFailed { root, reason }) => {
                        let root = roots.get(root).unwrap_or(root);
                        bars.clear();
                        let path = files
                            .iter()
                            .find(|(r, _)| r == root)
                            .map_or("a file", |(_, p)| p.as_str());
                        bail!("cannot serve {path}: {reason}");
                    }
                    FileEvent::Upload { peer, root, sent_bytes, .. } => {
                        let root = roots.get(root).unwrap_or(root);
                        sent.insert((peer.clone(), *root), *sent_bytes);
                        let size = sizes.get(root).copied().unwrap_or(0);
                        let pos: u64 = recipients
                            .iter()
                            .map(|r| {
                                if r.remaining.contains(root) {
                                    sent.get(&(r.peer_id.clone(), *root))
                                        .copied()
                                        .unwrap_or(0)
                                        .min(size)
                                } else {
                                    size
                                }
                            })
                            .sum();
                        bars.set(root, pos);
                    }
                    _ => {}
                }
                if printer.json
                    || !matches!(
                        ev,
                        FileEvent::Engine(TransferEvent::Delivered { .. })
                            | FileEvent::Upload { .. }
                    )
                {
                    bars.file_event(named);
                }
            }
            MeshEvent::Node(Event::PeerConnected(info)) => {
                // A recipient back under a new peer id (it restarted, or the server did):
                // offer it what it still lacks; it resumes from what it stored.
                let back = recipients.iter().position(|r| {
                    !r.remaining.is_empty()
                        && info.peer_id != r.peer_id
                        && Some(&r.name) == info.name.as_ref()
                });
                if let Some(i) = back {
                    let remaining: Vec<(Root, String)> = files
                        .iter()
                        .filter(|(r, _)| recipients[i].remaining.contains(r))
                        .cloned()
                        .collect();
                    let (offer_id, _) = mesh.offer(&info.peer_id, remaining).await?;
                    let r = &mut recipients[i];
                    r.peer_id = info.peer_id.clone();
                    r.offer_id = offer_id;
                    r.gone_since = None;
                    bars.say(
                        json!({"event": "offered", "peer_id": r.peer_id, "name": r.name,
                               "offer_id": offer_id, "files": r.remaining.len()}),
                        || {
                            format!(
                                "{} is back; offered the {} file(s) it still lacks",
                                r.name,
                                r.remaining.len()
                            )
                        },
                    );
                }
            }
            MeshEvent::Node(Event::KeyChanged(_)) => bars.multi.suspend(|| printer.event(&event)),
            _ => {}
        }
        if printer.json && !matches!(event, MeshEvent::File(_)) {
            printer.event(&event);
        }
    }
    if let Some(total) = &bars.total {
        total.finish();
    }
    bars.clear();
    let names: Vec<&str> = recipients.iter().map(|r| r.name.as_str()).collect();
    let ids: Vec<&PeerId> = recipients.iter().map(|r| &r.peer_id).collect();
    bars.say(json!({"event": "done", "files": files.len(), "recipients": ids}), || {
        format!("delivered {} file(s) to {}", files.len(), names.join(", "))
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------
// receive

/// An offer waiting for an answer.
struct Offer {
    peer: PeerId,
    offer_id: u64,
    items: Vec<OfferItem>,
}

/// The files of an accepted offer: who offered them, the offer, its items.
type Accepted = (PeerId, u64, Vec<OfferItem>);

/// Answers `offer` as `verdict` (the core's [`AcceptPolicy`] decided it) and says so;
/// the accepted files, if it was taken.
async fn answer(
    mesh: &MeshHandle,
    bars: &Bars,
    offer: Offer,
    info: Option<&PeerInfo>,
    verdict: OfferVerdict,
) -> anyhow::Result<Option<Accepted>> {
    let Offer { peer, offer_id, items } = offer;
    let name = info.map_or_else(|| peer.to_string(), name_of);
    let yes = verdict == OfferVerdict::Accept;
    mesh.answer(&peer, offer_id, yes).await?;
    if yes {
        bars.say(
            json!({"event": "accepted", "peer_id": peer, "name": name, "offer_id": offer_id}),
            || format!("accepted {} file(s) from {name}", items.len()),
        );
        return Ok(Some((peer, offer_id, items)));
    }
    let (code, why) = match verdict {
        OfferVerdict::Decline(reason) => (reason.as_str(), reason.to_string()),
        _ => ("", String::new()),
    };
    bars.say(
        json!({"event": "declined", "peer_id": peer, "name": name, "offer_id": offer_id,
               "reason": why, "code": code}),
        || format!("declined {} file(s) from {name}: {why}", items.len()),
    );
    Ok(None)
}

/// Accepts `offer` by the rule, nobody asked: the core holds it to the budget for
/// downloads still to write (and the disk's free space), and refuses it past that,
/// telling the peer why; the accepted files, if it was taken.
async fn accept_unasked(
    mesh: &MeshHandle,
    bars: &Bars,
    offer: Offer,
    info: Option<&PeerInfo>,
    rule: &ReceiveRule<'_>,
) -> anyhow::Result<Option<Accepted>> {
    let Offer { peer, offer_id, items } = offer;
    let name = info.map_or_else(|| peer.to_string(), name_of);
    let free = free_space(rule.dir);
    match mesh.accept_unasked(&peer, offer_id, rule.budget, free).await {
        Ok(()) => {
            bars.say(
                json!({"event": "accepted", "peer_id": peer, "name": name, "offer_id": offer_id}),
                || format!("accepted {} file(s) from {name}", items.len()),
            );
            Ok(Some((peer, offer_id, items)))
        }
        Err(MeshError::Node(NodeError::Transfer(TransferError::Limit(reason)))) => {
            bars.say(
                json!({"event": "refused", "peer_id": peer, "name": name, "offer_id": offer_id,
                       "reason": reason.to_string(), "code": reason.kind()}),
                || {
                    format!(
                        "refused {} file(s) from {name}: {reason} (see --max-pending)",
                        items.len()
                    )
                },
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Free bytes on the disk holding `dir` (for an unprivileged user), if it can be read.
#[cfg(unix)]
fn free_space(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Not read here yet: the budget holds to its fixed caps alone.
#[cfg(not(unix))]
fn free_space(_dir: &Path) -> Option<u64> {
    None
}

/// Adds an accepted offer's files to the bars and, if none is yet, makes it the offer
/// `--once` waits for; whether it did and the offer has no files left to fetch.
fn note_accepted(
    bars: &mut Bars,
    total_len: &mut u64,
    target: &mut Option<(PeerId, u64, HashSet<Root>)>,
    (peer, offer_id, items): Accepted,
) -> bool {
    for item in &items {
        if !bars.files.contains_key(&item.root) {
            *total_len += item.size;
            bars.set_total(*total_len);
            bars.add(item.root, &item.path, item.size);
        }
    }
    if target.is_some() {
        return false;
    }
    *target = Some((peer, offer_id, items.iter().map(|i| i.root).collect()));
    items.is_empty()
}

/// Offers put to the person at the terminal (no `--accept-from`), one at a time: a line
/// starting with `y` accepts the first waiting offer, any other line declines it.
struct Asker {
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    waiting: VecDeque<(Offer, String)>,
    /// Standard input ended: nobody is left to answer.
    closed: bool,
}

impl Asker {
    fn spawn() -> Self {
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        // Blocking reads of standard input, on a thread of their own (tokio's stdin is
        // the same, minus the thread's clarity).
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { lines, waiting: VecDeque::new(), closed: false }
    }

    /// Queues `offer`'s question, asking it now if it is the only one.
    fn ask(&mut self, bars: &Bars, offer: Offer, info: Option<&PeerInfo>) {
        let name = info.map_or_else(|| offer.peer.to_string(), name_of);
        let mut trust = info.and_then(|p| p.trust).map_or("unknown", Trust::as_str).to_string();
        if let Some(alike) = info.and_then(|p| p.looks_like.as_deref()) {
            trust.push_str(&format!(", LOOKS LIKE {alike:?} (another key)"));
        }
        let key = info.and_then(|p| p.fingerprint).map(|f| f.to_hex()[..16].to_string());
        let size: u64 = offer.items.iter().map(|i| i.size).sum();
        let first = offer.items.first().map_or(String::new(), |i| format!(" ({}, …)", i.path));
        let question = format!(
            "{name} [{trust}, key {}] offers {} file(s), {}{first}. Accept? [y/N]",
            key.as_deref().unwrap_or("?"),
            offer.items.len(),
            indicatif::HumanBytes(size),
        );
        self.waiting.push_back((offer, question));
        if self.waiting.len() == 1 {
            self.prompt_next(bars);
        }
    }

    /// Asks the first waiting question, if any.
    fn prompt_next(&self, bars: &Bars) {
        if let Some((offer, question)) = self.waiting.front() {
            bars.say(
                json!({"event": "asking", "peer_id": offer.peer, "offer_id": offer.offer_id,
                       "question": question}),
                || question.clone(),
            );
        }
    }

    /// The next answer: the offer and whether the person said yes (`None`: standard
    /// input ended, nobody can answer). Pending while no question waits.
    async fn answer(me: &mut Option<Self>) -> Option<(Offer, Option<bool>)> {
        let Some(asker) = me else { return std::future::pending().await };
        loop {
            if asker.waiting.is_empty() {
                return std::future::pending().await;
            }
            let line = if asker.closed { None } else { asker.lines.recv().await };
            asker.closed |= line.is_none();
            let yes = line.map(|l| l.trim_start().to_ascii_lowercase().starts_with('y'));
            if let Some((offer, _)) = asker.waiting.pop_front() {
                return Some((offer, yes));
            }
        }
    }
}

/// What `receive` takes without asking: offers from the peers `accept_from` names (or
/// `any`), within `budget` for downloads still to write to `dir`.
pub struct ReceiveRule<'a> {
    pub accept_from: &'a [String],
    pub budget: PendingBudget,
    pub dir: &'a Path,
}

/// `receive`: accept offers as `rule` says, store them, until Ctrl-C (or, with `once`,
/// the first accepted offer is complete).
pub async fn receive(
    joined: Joined,
    printer: Printer,
    rule: ReceiveRule<'_>,
    once: bool,
) -> anyhow::Result<()> {
    let Joined { mesh, mut events, .. } = joined;
    let result = receive_inner(&mesh, &mut events, printer, &rule, once).await;
    mesh.shutdown().await?;
    result
}

async fn receive_inner(
    mesh: &MeshHandle,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<MeshEvent>,
    printer: Printer,
    rule: &ReceiveRule<'_>,
    once: bool,
) -> anyhow::Result<()> {
    // Listening before the first line goes out: whoever read it may stop us at once.
    let mut stop = StopSignals::new()?;
    let mut bars = Bars::new(printer.json);
    let policy = AcceptPolicy::from_words(rule.accept_from).context("--accept-from")?;
    // Without a rule every offer is a question; where nobody can answer, all are declined.
    let mut asker = (!policy.has_rule() && std::io::stdin().is_terminal()).then(Asker::spawn);
    if !policy.has_rule() && asker.is_none() {
        bars.say(
            json!({"event": "warning", "message": DeclineReason::NobodyToAsk.to_string()}),
            || format!("every offer will be declined: {}", DeclineReason::NobodyToAsk),
        );
    }
    // With --once: the first accepted offer's files still to be saved.
    let mut target: Option<(PeerId, u64, HashSet<Root>)> = None;
    let mut total_len = 0;
    bars.say(json!({"event": "receiving"}), || "waiting for files (Ctrl-C to stop)".into());
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = stop.recv() => break,
            Some((offer, yes)) = Asker::answer(&mut asker) => {
                // Judged again: the peer may have left or changed its key meanwhile.
                let info = mesh.peers().await.into_iter().find(|p| p.peer_id == offer.peer);
                let verdict = policy.judge_answered(info.as_ref(), yes);
                let accepted = answer(mesh, &bars, offer, info.as_ref(), verdict).await?;
                if let Some(asker) = &asker {
                    asker.prompt_next(&bars);
                }
                if let Some(accepted) = accepted {
                    note_accepted(&mut bars, &mut total_len, &mut target, accepted);
                }
                continue;
            }
        };
        let Some(event) = event else {
            bars.clear();
            bail!("the session stopped");
        };
        let MeshEvent::File(named) = &event else {
            if printer.json {
                printer.event(&event);
            } else if matches!(
                event,
                MeshEvent::Node(Event::KeyChanged(_))
                    | MeshEvent::Warning(_)
                    | MeshEvent::Node(Event::ServerError { .. })
            ) {
                bars.multi.suspend(|| printer.event(&event));
            }
            continue;
        };
        let ev = &named.event;
        let mut accepted_items: Option<(PeerId, u64, Vec<OfferItem>)> = None;
        match ev {
            FileEvent::Engine(TransferEvent::Offered { peer, offer_id, items }) => {
                bars.file_event(named);
                let info = mesh.peers().await.into_iter().find(|p| p.peer_id == *peer);
                let offer = Offer { peer: peer.clone(), offer_id: *offer_id, items: items.clone() };
                match (policy.judge(info.as_ref()), &mut asker) {
                    (OfferVerdict::Ask, Some(asker)) => {
                        asker.ask(&bars, offer, info.as_ref());
                    }
                    // Decided by the rule, or an Ask with nobody to ask (declined).
                    _ => {
                        let verdict = policy.judge_answered(info.as_ref(), None);
                        accepted_items = if verdict == OfferVerdict::Accept {
                            accept_unasked(mesh, &bars, offer, info.as_ref(), rule).await?
                        } else {
                            answer(mesh, &bars, offer, info.as_ref(), verdict).await?
                        };
                    }
                }
            }
            FileEvent::Engine(TransferEvent::Resumed { peer, offer_id, items }) => {
                bars.file_event(named);
                accepted_items = Some((peer.clone(), *offer_id, items.clone()));
            }
            FileEvent::Restored(view) => {
                bars.file_event(named);
                let p = &view.progress;
                total_len += p.size;
                bars.set_total(total_len);
                let bar = bars.add(p.root, &p.paths.join(", "), p.size);
                bar.set_position(p.done_bytes);
                bars.set(&p.root, p.done_bytes);
            }
            FileEvent::Progress(view) => {
                bars.set(&view.progress.root, view.progress.done_bytes);
                if printer.json {
                    println!("{}", file_json(named));
                }
            }
            FileEvent::Saved { root, key, .. } => {
                bars.finish(root);
                bars.finish(key);
                bars.file_event(named);
                if let Some((_, _, left)) = &mut target {
                    // The offer named it by its key (a stream key if it was offered
                    // before it was hashed).
                    left.remove(root);
                    left.remove(key);
                    if left.is_empty() && once {
                        break;
                    }
                }
            }
            FileEvent::Engine(TransferEvent::FileFailed { root, reason, .. }) => {
                bars.file_event(named);
                if once && target.as_ref().is_some_and(|(_, _, left)| left.contains(root)) {
                    bars.clear();
                    bail!("{reason} (what was stored is kept; run receive again to resume)");
                }
            }
            FileEvent::Engine(TransferEvent::Cancelled {
                peer,
                offer_id,
                reason,
                outgoing: false,
                ..
            }) => {
                bars.file_event(named);
                let ours = target.as_ref().is_some_and(|(p, id, _)| p == peer && id == offer_id);
                if once && ours {
                    bars.clear();
                    bail!("the sender cancelled: {reason}");
                }
            }
            _ => bars.file_event(named),
        }
        if let Some(accepted) = accepted_items
            && note_accepted(&mut bars, &mut total_len, &mut target, accepted)
            && once
        {
            // The offer's files are all here already (an empty offer).
            break;
        }
    }
    if let Some(total) = &bars.total {
        total.finish();
    }
    bars.clear();
    Ok(())
}
