//! What the CLI prints: text for people, or one JSON object per line for scripts.

use std::time::Duration;

use serde_json::{Value, json};
use weft_core::identity::IdentityKeyPair;
use weft_core::node::{DownloadView, FileEvent, SavedTo};
use weft_core::signal::{PeerId, RoomId};
use weft_core::transfer::{OfferItem, Refusals, TransferEvent};
use weft_core::trust::Trust;

use crate::mesh::{MeshEvent, NamedFileEvent, OverlayStatus, PeerInfo, PeerState, RelayTransport};
use crate::tun::TunState;
use weft_core::node::{Event, SignalingEvent};

/// Prints events and tables, as text or JSON lines.
#[derive(Debug, Clone, Copy)]
pub struct Printer {
    /// One JSON object per line.
    pub json: bool,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// A peer as JSON.
pub fn peer_json(p: &PeerInfo) -> Value {
    let mut v = json!({
        "peer_id": p.peer_id,
        "state": p.state.as_str(),
        "name": p.name,
        "fingerprint": p.fingerprint.as_ref().map(|f| f.to_hex()),
        "safety_code": p.fingerprint.as_ref().map(|f| f.short_code()),
        "trust": p.trust.map(Trust::as_str),
        "looks_like": p.looks_like,
        "rtt_ms": p.rtt.map(ms),
        "ipv4": p.ipv4,
        "ipv6": p.ipv6,
        "routes": p.routes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "dropped_spoofed": p.dropped_spoofed,
        "transfer_refusals": p.transfer_refusals,
    });
    if matches!(p.state, PeerState::Direct | PeerState::Relayed) {
        v["path"] = json!(p.state.as_str());
        // Where IP packets go: `up` on the fast UDP path, else the data channel.
        v["fast_path"] = json!(p.fast_path.as_str());
        v["bytes_sent"] = json!(p.bytes_sent);
        v["bytes_received"] = json!(p.bytes_received);
        v["last_handshake_s"] = json!(p.last_handshake.map(|d| d.as_secs()));
    }
    if p.state == PeerState::Relayed {
        // Unknown (null) when only the peer's end is relayed.
        v["relay_transport"] = json!(p.relay_transport.map(RelayTransport::as_str));
    }
    if let Some(reason) = &p.reason {
        v["reason"] = json!(reason.to_string());
    }
    v
}

/// `direct`, or `relayed` and how: over TURN/UDP, TCP or TLS from our end, or through the
/// peer's relay (whose transport we cannot see); for a direct one that takes IP packets,
/// whether they go on the fast UDP path or the data channel (and why).
fn path_words(state: &str, relay_transport: Option<&str>, fast_path: Option<&str>) -> String {
    match (state, relay_transport.and_then(RelayTransport::from_name), fast_path) {
        ("relayed", Some(t), _) => format!("relayed ({t})"),
        ("relayed", None, _) => "relayed (the peer's relay)".to_string(),
        ("direct", _, Some("up")) => "direct (fast UDP)".to_string(),
        ("direct", _, Some("probing")) => "direct (data channel, probing the fast UDP path)".into(),
        ("direct", _, Some("fallback")) => {
            "direct (data channel: the fast UDP path stopped answering)".into()
        }
        (state, _, _) => state.to_string(),
    }
}

fn describe(p: &PeerInfo) -> String {
    let name = p.name.as_deref().unwrap_or("?");
    let state = path_words(
        p.state.as_str(),
        p.relay_transport.map(RelayTransport::as_str),
        Some(p.fast_path.as_str()),
    );
    let mut s = format!("{name} ({}): {state}", p.peer_id);
    if let Some(ip) = p.ipv4 {
        s.push_str(&format!(", {ip}"));
    }
    if let Some(fp) = &p.fingerprint {
        s.push_str(&format!(", safety code {}", fp.short_code()));
    }
    if let Some(trust) = p.trust {
        s.push_str(&format!(", key {}", trust.as_str()));
    }
    if let Some(alike) = &p.looks_like {
        s.push_str(&format!(", LOOKS LIKE {alike:?} (another key)"));
    }
    if let Some(rtt) = p.rtt {
        s.push_str(&format!(", RTT {:.1} ms", ms(rtt)));
    }
    if let Some(reason) = &p.reason {
        s.push_str(&format!(": {reason}"));
    }
    s
}

impl Printer {
    fn line(&self, value: Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{value}");
        } else {
            say!("{}", text());
        }
    }

    /// What `send` leaves out of the folders it was given, one line each.
    pub fn skipped(&self, skipped: &[crate::files::Skipped]) {
        for s in skipped {
            self.line(json!({"event": "skipped", "path": s.path, "reason": s.reason}), || {
                format!("skipped {}: {}", s.path.escape_debug(), s.reason)
            });
        }
    }

    /// One mesh event.
    pub fn event(&self, event: &MeshEvent) {
        match event {
            MeshEvent::Node(Event::Signaling(SignalingEvent::Connecting { attempt })) => self.line(
                json!({"event": "connecting", "attempt": attempt}),
                || match attempt {
                    1 => "connecting…".into(),
                    n => format!("reconnecting (attempt {n})…"),
                },
            ),
            MeshEvent::Node(Event::Signaling(SignalingEvent::Lost { reason, retry_in })) => self.line(
                json!({"event": "disconnected", "reason": reason, "retry_in_ms": retry_in.as_millis()}),
                || format!("disconnected: {reason}; retrying in {:.1} s", retry_in.as_secs_f64()),
            ),
            MeshEvent::Node(Event::Joined { peer_id, peers }) => self.line(
                json!({"event": "joined", "peer_id": peer_id, "peers": peers}),
                || format!("joined as {peer_id}; {} other peer(s)", peers.len()),
            ),
            MeshEvent::Node(Event::PeerJoined(p)) => {
                self.line(json!({"event": "peer_joined", "peer_id": p}), || {
                    format!("peer {p} joined")
                });
            }
            MeshEvent::Node(Event::PeerLeft(p)) => {
                self.line(json!({"event": "peer_left", "peer_id": p}), || format!("peer {p} left"));
            }
            MeshEvent::Node(Event::PeerConnected(info)) => {
                let mut v = peer_json(info);
                v["event"] = json!("peer_connected");
                self.line(v, || format!("connected: {}", describe(info)));
            }
            MeshEvent::Node(Event::KeyChanged(info)) => {
                let name = info.name.as_deref().unwrap_or("?");
                let warning = format!(
                    "WARNING: the key of {name:?} CHANGED. This is not the key it had before: \
                     it may be an impostor, or {name} reinstalled. Compare the safety code {} \
                     with {name} in person or on a call before trusting it.",
                    info.fingerprint.as_ref().map(|f| f.short_code()).unwrap_or_default()
                );
                eprintln!("{}", weft_core::text::escape_hidden(&warning));
                let mut v = peer_json(info);
                v["event"] = json!("key_changed");
                v["warning"] = json!(warning);
                self.line(v, || warning.clone());
            }
            MeshEvent::Node(Event::PeerFailed(info)) => {
                let mut v = peer_json(info);
                v["event"] = json!("peer_failed");
                self.line(v, || format!("failed: {}", describe(info)));
            }
            MeshEvent::Node(Event::PassphraseFailures { peer, failures, total, retry_in }) => self
                .line(
                    json!({"event": "passphrase_failures", "peer_id": peer, "failures": failures,
                           "total": total, "retry_in_ms": retry_in.as_millis()}),
                    || {
                        format!(
                            "{} from peer {peer} (a wrong passphrase, or someone guessing it); \
                             its next attempt is answered in {:.0} s",
                            failed_attempts(*failures),
                            retry_in.as_secs_f64()
                        )
                    },
                ),
            MeshEvent::Node(Event::Message { peer_id, name, text, trust, looks_like }) => {
                let trust_word = trust.map_or("unknown", |t| t.as_str());
                self.line(
                    json!({"event": "message", "peer_id": peer_id, "from": name, "text": text,
                           "trust": trust.map(Trust::as_str), "looks_like": looks_like}),
                    || {
                        let alike = looks_like
                            .as_ref()
                            .map(|a| format!(", LOOKS LIKE {a:?}"))
                            .unwrap_or_default();
                        format!("<{name} [{trust_word}{alike}]> {text}")
                    },
                )
            }
            MeshEvent::File(named) => {
                if self.json {
                    println!("{}", file_json(named));
                } else if let Some(text) = file_text(&named.event) {
                    say!("{text}");
                }
            }
            MeshEvent::Node(Event::ServerError { code, message }) => self.line(
                json!({"event": "error", "code": code, "message": message}),
                || format!("server refused: {code}: {message}"),
            ),
            // The path of a session changed.
            MeshEvent::Node(Event::Peer(info)) => {
                let mut v = peer_json(info);
                v["event"] = json!("path_changed");
                self.line(v, || format!("now {}: {}", info.state.as_str(), describe(info)));
            }
            // The mesh passes none of these on (see `MeshEvent::Node`; file events come
            // as `MeshEvent::File`).
            MeshEvent::Node(
                Event::Signaling(SignalingEvent::Stopped { .. } | SignalingEvent::Left)
                | Event::File(_),
            ) => {}
            MeshEvent::Tun(state) => self.line(tun_json(state), || {
                let mut addrs = Vec::new();
                if let Some((a, p)) = state.ipv4 {
                    addrs.push(format!("{a}/{p}"));
                }
                if let Some((a, p)) = state.ipv6 {
                    addrs.push(format!("{a}/{p}"));
                }
                format!("TUN {} up, MTU {}: {}", state.name, state.mtu, addrs.join(", "))
            }),
            MeshEvent::Warning(message) => {
                eprintln!("warning: {}", weft_core::text::escape_hidden(message));
                self.line(json!({"event": "warning", "message": message}), || {
                    format!("warning: {message}")
                });
            }
        }
    }

    /// A list of peers.
    pub fn peers(&self, peers: &[PeerInfo]) {
        if self.json {
            let list: Vec<Value> = peers.iter().map(peer_json).collect();
            println!("{}", json!({"event": "peers", "peers": list}));
        } else if peers.is_empty() {
            say!("no other peers");
        } else {
            for p in peers {
                say!("{}", describe(p));
            }
        }
    }

    /// Every peer's key and trust, and the names pinned in the trust store.
    pub fn trust(&self, peers: &[PeerInfo], store: &weft_core::trust::TrustStore) {
        let present = |name: &str| peers.iter().any(|p| p.name.as_deref() == Some(name));
        let absent: Vec<(&str, &str, bool)> =
            store.pinned().filter(|(name, _, _)| !present(name)).collect();
        if self.json {
            let list: Vec<Value> = peers.iter().map(peer_json).collect();
            let pinned: Vec<Value> = absent
                .iter()
                .map(|(name, fp, verified)| {
                    json!({"name": name, "fingerprint": fp, "verified": verified})
                })
                .collect();
            println!("{}", json!({"event": "trust", "peers": list, "pinned": pinned}));
            return;
        }
        for p in peers {
            let name = p.name.as_deref().unwrap_or("?");
            let code = p.fingerprint.map(|f| f.short_code()).unwrap_or_else(|| "-".into());
            let trust = p.trust.map_or("-", Trust::as_str);
            say!("{name:20} {code:30} {trust:9} {}", p.peer_id);
        }
        for (name, _, verified) in absent {
            let trust = if verified { "verified" } else { "known" };
            say!("{name:20} {:30} {trust:9} (not connected)", "");
        }
        if peers.is_empty() && store.pinned().next().is_none() {
            say!("no peers, and no keys pinned yet");
        }
    }

    /// Our status (from [`status_json`]).
    pub fn status(&self, status: &Value) {
        if self.json {
            println!("{status}");
            return;
        }
        let text = |key: &str| status[key].as_str().unwrap_or("-").to_string();
        say!("name:        {}", text("name"));
        say!("safety code: {}", text("safety_code"));
        say!("fingerprint: {}", text("fingerprint"));
        say!("room:        {}", text("room"));
        let addrs: Vec<&str> = ["ipv4", "ipv6"].iter().filter_map(|k| status[k].as_str()).collect();
        say!("overlay:     {}", addrs.join(", "));
        let tun = &status["tun"];
        match tun["device"].as_str() {
            Some(device) => say!("tun:         {device} up, MTU {}", tun["mtu"]),
            None => say!("tun:         none"),
        }
        let c = &status["counters"];
        if c.is_object() {
            say!(
                "packets:     {} sent, {} received; dropped: {} spoofed, {} refused, {} \
                 unreachable, {} malformed",
                c["sent"],
                c["received"],
                c["dropped_spoofed"],
                c["dropped_refused"],
                c["unreachable"],
                c["dropped_malformed"]
            );
            let r = &c["refused"];
            println!(
                "refused:     {} to our address, {} to our subnets, {} through our exit, {} \
                 unrouted (not allowed: see --allow)",
                r["address"], r["subnet"], r["exit"], r["unrouted"]
            );
        }
        let routes: Vec<String> = status["routes"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|r| r["in_use"] == true)
            .map(|r| {
                format!(
                    "{} ({})",
                    r["prefix"].as_str().unwrap_or("?"),
                    r["kind"].as_str().unwrap_or("?")
                )
            })
            .collect();
        if !routes.is_empty() {
            println!("routes:      {}", routes.join(", "));
        }
        match status["peer_id"].as_str() {
            Some(id) => say!("signaling:   joined as {id}"),
            None => say!("signaling:   not joined"),
        }
        let failures = status["passphrase_failures"].as_array().map(Vec::as_slice);
        for f in failures.unwrap_or_default() {
            say!(
                "WARNING:     {} from peer {}",
                failed_attempts(u32::try_from(f["failures"].as_u64().unwrap_or(0)).unwrap_or(0)),
                f["peer_id"].as_str().unwrap_or("?")
            );
        }
        say!("{}", refusals_line(&status["transfer_refusals"]));
        let peers = status["peers"].as_array().map(Vec::as_slice).unwrap_or_default();
        if peers.is_empty() {
            say!("no other peers");
        }
        for p in peers {
            say!("{}", peer_line(p));
        }
    }
}

/// One peer of `status`, for people.
fn peer_line(p: &Value) -> String {
    let field = |k: &str| p[k].as_str().map(|v| format!(", {v}")).unwrap_or_default();
    let traffic = match (p["bytes_sent"].as_u64(), p["bytes_received"].as_u64()) {
        (Some(out), Some(inn)) => format!(
            ", {} sent, {} received, handshake {}",
            bytes(out),
            bytes(inn),
            p["last_handshake_s"].as_u64().map_or("?".into(), |s| format!("{s} s ago"))
        ),
        _ => String::new(),
    };
    let refused = match p["transfer_refusals"].as_u64() {
        Some(n) if n > 0 => format!(", {n} transfer requests refused"),
        _ => String::new(),
    };
    format!(
        "{} ({}): {}{}{}{}{}{traffic}{refused}",
        p["name"].as_str().unwrap_or("?"),
        p["peer_id"].as_str().unwrap_or("?"),
        path_words(
            p["state"].as_str().unwrap_or("?"),
            p["relay_transport"].as_str(),
            p["fast_path"].as_str()
        ),
        field("ipv4"),
        p["safety_code"].as_str().map(|c| format!(", safety code {c}")).unwrap_or_default(),
        p["trust"].as_str().map(|t| format!(", key {t}")).unwrap_or_default(),
        p["looks_like"]
            .as_str()
            .map(|a| format!(", LOOKS LIKE {a:?} (another key)"))
            .unwrap_or_default(),
    )
}

/// `status`'s line of what file transfer refused peers past its caps (each was told
/// why): the total, by kind.
fn refusals_line(r: &Value) -> String {
    let total = r["total"].as_u64().unwrap_or(0);
    let kinds: Vec<String> = r["by_kind"]
        .as_object()
        .map(|m| m.iter().map(|(k, n)| format!("{k} {n}")).collect())
        .unwrap_or_default();
    if kinds.is_empty() {
        format!("transfers:   {total} requests refused past the caps")
    } else {
        format!("transfers:   {total} requests refused past the caps ({})", kinds.join(", "))
    }
}

/// "3 failed passphrase attempts".
fn failed_attempts(n: u32) -> String {
    match n {
        1 => "1 failed passphrase attempt".into(),
        n => format!("{n} failed passphrase attempts"),
    }
}

/// Who we are and where, as one JSON object: what `status` prints (as it is with
/// `--json`), and what a running `up` answers on its control socket (`running`: true).
/// `passphrase_failures`: failed passphrase checks by peer id (passphrase networks);
/// `refusals`: what file transfer refused peers past its caps (each peer's own count
/// is in its entry).
pub fn status_json(
    (identity, name, room, own_id): (&IdentityKeyPair, &str, &RoomId, Option<&str>),
    overlay: Option<&OverlayStatus>,
    tun: Option<&TunState>,
    running: bool,
    peers: &[PeerInfo],
    passphrase_failures: &[(PeerId, u32)],
    refusals: &Refusals,
) -> Value {
    let fp = identity.public().fingerprint();
    let list: Vec<Value> = peers.iter().map(peer_json).collect();
    let tun = tun.map(|t| {
        let mut v = tun_json(t);
        if let Some(o) = v.as_object_mut() {
            o.remove("event");
        }
        v
    });
    let counters = overlay.map(|o| {
        let c = &o.counters;
        json!({
            "sent": c.sent, "received": c.received, "dropped_spoofed": c.dropped_spoofed,
            "dropped_refused": c.dropped_refused, "dropped_no_tun": c.dropped_no_tun,
            "dropped_malformed": c.dropped_malformed, "unreachable": c.unreachable,
            "routes_refused": c.routes_refused,
            "refused": {
                "address": c.refused_address, "subnet": c.refused_subnet,
                "exit": c.refused_exit, "unrouted": c.refused_unrouted,
            },
        })
    });
    json!({
        "event": "status", "name": name, "peer_id": own_id, "room": room,
        "fingerprint": fp.to_hex(), "safety_code": fp.short_code(),
        "joined": own_id.is_some(), "running": running,
        "ipv4": overlay.and_then(|o| o.ipv4), "ipv6": overlay.map(|o| o.ipv6),
        "tun": tun, "counters": counters, "peers": list,
        "transfer_refusals": {
            "total": refusals.total(),
            "by_kind": refusals
                .by_kind()
                .map(|(k, n)| (k.to_string(), json!(n)))
                .collect::<serde_json::Map<String, Value>>(),
        },
        "passphrase_failures": passphrase_failures.iter()
            .map(|(id, n)| json!({"peer_id": id, "failures": n})).collect::<Vec<_>>(),
        "routes": overlay.map(|o| o.routes.iter().map(|r| json!({
            "prefix": r.prefix.to_string(), "kind": r.kind.as_str(),
            "fingerprint": r.fingerprint.to_hex(), "in_use": r.in_use,
        })).collect::<Vec<_>>()),
    })
}

/// The TUN device's state as JSON.
pub fn tun_json(state: &TunState) -> Value {
    json!({
        "event": "tun", "device": state.name, "mtu": state.mtu,
        "ipv4": state.ipv4.map(|(a, p)| format!("{a}/{p}")),
        "ipv6": state.ipv6.map(|(a, p)| format!("{a}/{p}")),
    })
}

/// Bytes for people: `1.5 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

fn items_json(items: &[OfferItem]) -> Value {
    items
        .iter()
        .map(|i| {
            json!({"path": i.path, "size": i.size, "key": i.root.to_string(),
                   "root": i.root.to_string(), "streamed": i.streamed})
        })
        .collect::<Vec<_>>()
        .into()
}

/// A download's progress as JSON.
fn download_json(event: &str, view: &DownloadView) -> Value {
    let p = &view.progress;
    json!({
        "event": event, "root": p.root.to_string(), "paths": p.paths, "size": p.size,
        "done_bytes": p.done_bytes,
    })
}

/// Where a complete file went.
fn saved_files(to: &SavedTo) -> Vec<String> {
    match to {
        SavedTo::Files(files) => files.iter().map(|f| f.display().to_string()).collect(),
        SavedTo::Kept | SavedTo::Downloads => Vec::new(),
    }
}

/// A file-transfer event as a JSON line. Every event about one file has `key`, the name
/// it was offered under (its root, or a stream key if it was offered before it was
/// hashed): the same from the offer (each item's `key`) to `saved` or `delivered`, as in
/// the browser's events; and `root`, its BLAKE3 hash once known, else its key (an offer's
/// items keep `root` equal to `key`, with `streamed` saying whether it is a hash).
pub fn file_json(named: &NamedFileEvent) -> Value {
    let mut v = event_json(&named.event);
    if let Some(names) = &named.names {
        v["key"] = json!(names.key.to_string());
        v["root"] = json!(names.root.unwrap_or(names.key).to_string());
    }
    v
}

fn event_json(ev: &FileEvent) -> Value {
    match ev {
        FileEvent::Engine(ev) => match ev {
            TransferEvent::Offered { peer, offer_id, items } => json!({
                "event": "offer", "peer_id": peer, "offer_id": offer_id,
                "items": items_json(items),
                "total_size": items.iter().map(|i| i.size).sum::<u64>(),
            }),
            TransferEvent::Resumed { peer, offer_id, items } => json!({
                "event": "resumed", "peer_id": peer, "offer_id": offer_id,
                "items": items_json(items),
            }),
            TransferEvent::Answered { peer, offer_id, accepted } => json!({
                "event": "offer_answered", "peer_id": peer, "offer_id": offer_id,
                "accepted": accepted,
            }),
            TransferEvent::Delivered { peer, root } => {
                json!({"event": "delivered", "peer_id": peer, "root": root.to_string()})
            }
            TransferEvent::FileComplete { root, paths, size, .. } => {
                json!({"event": "file_complete", "root": root.to_string(), "paths": paths, "size": size})
            }
            TransferEvent::Verified { key, root } => {
                json!({"event": "verified", "key": key.to_string(), "root": root.to_string()})
            }
            TransferEvent::FileFailed { root, reason, .. } => {
                json!({"event": "file_failed", "root": root.to_string(), "reason": reason.to_string()})
            }
            TransferEvent::Cancelled { peer, offer_id, reason, by_peer, outgoing } => json!({
                "event": "transfer_cancelled", "peer_id": peer, "offer_id": offer_id,
                "reason": reason.to_string(), "by_peer": by_peer, "outgoing": outgoing,
            }),
            TransferEvent::ChunkRejected { root, index, peer } => json!({
                "event": "chunk_rejected", "root": root.to_string(), "index": index, "peer_id": peer,
            }),
            TransferEvent::SourceAdded { root, peer } => {
                json!({"event": "source_added", "root": root.to_string(), "peer_id": peer})
            }
            TransferEvent::SourceDropped { root, peer, reason } => json!({
                "event": "source_dropped", "root": root.to_string(), "peer_id": peer, "reason": reason.to_string(),
            }),
            TransferEvent::ShareFailed { root, reason } => {
                json!({"event": "share_failed", "root": root.to_string(), "reason": reason.to_string()})
            }
        },
        FileEvent::Upload { peer, root, sent_bytes, size } => json!({
            "event": "upload", "peer_id": peer, "root": root.to_string(), "sent_bytes": sent_bytes,
            "size": size,
        }),
        FileEvent::Progress(view) => {
            let mut v = download_json("progress", view);
            v["speed_bps"] = json!(view.speed_bps.round());
            v["eta_s"] = json!(view.eta.map(|t| (t.as_secs_f64() * 10.0).round() / 10.0));
            v
        }
        FileEvent::Restored(view) => download_json("restored", view),
        FileEvent::Saved { root, size, to, .. } => json!({
            "event": "saved", "root": root.to_string(), "size": size, "files": saved_files(to),
        }),
    }
}

/// A file-transfer event as a line of text, if it deserves one.
pub fn file_text(ev: &FileEvent) -> Option<String> {
    Some(match ev {
        FileEvent::Engine(ev) => match ev {
            TransferEvent::Offered { peer, offer_id, items } => format!(
                "{peer} offers {} file(s), {} (offer {offer_id}): {}",
                items.len(),
                bytes(items.iter().map(|i| i.size).sum()),
                items.iter().map(|i| i.path.as_str()).collect::<Vec<_>>().join(", ")
            ),
            TransferEvent::Resumed { peer, items, .. } => {
                format!("{peer} offered {} file(s) we were fetching: resuming", items.len())
            }
            TransferEvent::Answered { peer, accepted: true, .. } => format!("{peer} accepted"),
            TransferEvent::Answered { peer, accepted: false, .. } => format!("{peer} declined"),
            TransferEvent::Delivered { peer, root } => {
                format!("{peer} has {} (verified)", &root.to_string()[..16])
            }
            TransferEvent::FileComplete { paths, .. } => format!("complete: {}", paths.join(", ")),
            TransferEvent::FileFailed { root, reason, .. } => {
                format!("failed: {}: {reason}", &root.to_string()[..16])
            }
            TransferEvent::Cancelled { peer, reason, by_peer, .. } => {
                let who = if *by_peer { format!("{peer} cancelled") } else { "cancelled".into() };
                format!("{who}: {reason}")
            }
            TransferEvent::ChunkRejected { index, peer, .. } => {
                format!("a chunk ({index}) from {peer} failed verification; fetching it again")
            }
            TransferEvent::SourceDropped { peer, reason, .. } => {
                format!("stopped fetching from {peer}: {reason}")
            }
            TransferEvent::ShareFailed { root, reason } => {
                format!("stopped sharing {}: {reason}", &root.to_string()[..16])
            }
            TransferEvent::SourceAdded { .. } | TransferEvent::Verified { .. } => return None,
        },
        FileEvent::Restored(view) => format!(
            "resuming {} ({} of {} stored)",
            view.progress.paths.join(", "),
            bytes(view.progress.done_bytes),
            bytes(view.progress.size)
        ),
        FileEvent::Saved { size, to, .. } => {
            format!("saved {} ({})", saved_files(to).join(", "), bytes(*size))
        }
        FileEvent::Upload { .. } | FileEvent::Progress(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use weft_core::transfer::{Engine, EngineConfig, Root, TransferMsg};

    use super::*;

    /// What an engine refused Mallory: an offer of a file over the 1 TiB cap, twice.
    fn refusals(mallory: &PeerId) -> Refusals {
        let mut engine = Engine::new(EngineConfig::default(), 1);
        engine.peer_connected(mallory, Duration::ZERO);
        for offer_id in [1, 2] {
            let item = OfferItem {
                path: "disk.img".into(),
                size: 1 << 48,
                root: Root::of(b"x"),
                streamed: false,
                cap: weft_core::transfer::Capability::from_bytes([0; 32]),
            };
            let (t, body) = TransferMsg::Offer { offer_id, items: vec![item] }.encode();
            engine.handle_frame(mallory, t, body, Duration::ZERO);
        }
        engine.refusals().clone()
    }

    fn peer(id: &PeerId, name: &str, refused: u64) -> PeerInfo {
        PeerInfo {
            name: Some(name.into()),
            transfer_refusals: refused,
            ..PeerInfo::new(id.clone(), PeerState::Direct)
        }
    }

    /// `status` shows what file transfer refused, per peer and in all, as text and JSON.
    #[test]
    fn status_shows_transfer_refusals_per_peer_and_in_all() {
        let (mallory, carol) = (PeerId::new("m1").unwrap(), PeerId::new("c1").unwrap());
        let refused = refusals(&mallory);
        let peers =
            [peer(&mallory, "Mallory", refused.of_peer(&mallory)), peer(&carol, "Carol", 0)];
        let identity = IdentityKeyPair::from_secret_bytes(&[7; 32]);
        let room = RoomId::new("r".repeat(43)).unwrap();
        let who = (&identity, "Ada", &room, Some("a1"));
        let status = status_json(who, None, None, true, &peers, &[], &refused);

        assert_eq!(status["transfer_refusals"]["total"], 2, "{status}");
        assert_eq!(status["transfer_refusals"]["by_kind"]["file_too_large"], 2, "{status}");
        assert_eq!(status["peers"][0]["transfer_refusals"], 2, "{status}");
        assert_eq!(status["peers"][1]["transfer_refusals"], 0, "{status}");

        let total = refusals_line(&status["transfer_refusals"]);
        assert!(
            total.contains("2 requests refused") && total.contains("file_too_large 2"),
            "{total}"
        );
        let (m, c) = (peer_line(&status["peers"][0]), peer_line(&status["peers"][1]));
        assert!(m.starts_with("Mallory") && m.ends_with(", 2 transfer requests refused"), "{m}");
        assert!(!c.contains("refused"), "{c}");
    }
}
