//! What the CLI prints: text for people, or one JSON object per line for scripts.

use std::time::Duration;

use serde_json::{Value, json};
use weft_core::identity::IdentityKeyPair;
use weft_core::signal::RoomId;
use weft_core::trust::Trust;

use crate::mesh::{MeshEvent, PeerInfo, PeerState};

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
        "rtt_ms": p.rtt.map(ms),
    });
    if matches!(p.state, PeerState::Direct | PeerState::Relayed) {
        v["path"] = json!(p.state.as_str());
    }
    if let Some(reason) = &p.reason {
        v["reason"] = json!(reason);
    }
    v
}

fn describe(p: &PeerInfo) -> String {
    let name = p.name.as_deref().unwrap_or("?");
    let mut s = format!("{name} ({}): {}", p.peer_id, p.state.as_str());
    if let Some(fp) = &p.fingerprint {
        s.push_str(&format!(", safety code {}", fp.short_code()));
    }
    if let Some(trust) = p.trust {
        s.push_str(&format!(", key {}", trust.as_str()));
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
            println!("{}", text());
        }
    }

    /// One mesh event.
    pub fn event(&self, event: &MeshEvent) {
        match event {
            MeshEvent::Connecting { attempt } => self.line(
                json!({"event": "connecting", "attempt": attempt}),
                || match attempt {
                    1 => "connecting…".into(),
                    n => format!("reconnecting (attempt {n})…"),
                },
            ),
            MeshEvent::Disconnected { reason, retry_in } => self.line(
                json!({"event": "disconnected", "reason": reason, "retry_in_ms": retry_in.as_millis()}),
                || format!("disconnected: {reason}; retrying in {:.1} s", retry_in.as_secs_f64()),
            ),
            MeshEvent::Joined { peer_id, peers } => self.line(
                json!({"event": "joined", "peer_id": peer_id, "peers": peers}),
                || format!("joined as {peer_id}; {} other peer(s)", peers.len()),
            ),
            MeshEvent::PeerJoined(p) => {
                self.line(json!({"event": "peer_joined", "peer_id": p}), || {
                    format!("peer {p} joined")
                });
            }
            MeshEvent::PeerLeft(p) => {
                self.line(json!({"event": "peer_left", "peer_id": p}), || format!("peer {p} left"));
            }
            MeshEvent::PeerConnected(info) => {
                let mut v = peer_json(info);
                v["event"] = json!("peer_connected");
                self.line(v, || format!("connected: {}", describe(info)));
            }
            MeshEvent::KeyChanged(info) => {
                let name = info.name.as_deref().unwrap_or("?");
                let warning = format!(
                    "WARNING: the key of {name:?} CHANGED. This is not the key it had before: \
                     it may be an impostor, or {name} reinstalled. Compare the safety code {} \
                     with {name} in person or on a call before trusting it.",
                    info.fingerprint.as_ref().map(|f| f.short_code()).unwrap_or_default()
                );
                eprintln!("{warning}");
                let mut v = peer_json(info);
                v["event"] = json!("key_changed");
                v["warning"] = json!(warning);
                self.line(v, || warning.clone());
            }
            MeshEvent::PeerFailed(info) => {
                let mut v = peer_json(info);
                v["event"] = json!("peer_failed");
                self.line(v, || format!("failed: {}", describe(info)));
            }
            MeshEvent::Message { peer_id, name, text } => self.line(
                json!({"event": "message", "peer_id": peer_id, "from": name, "text": text}),
                || format!("<{name}> {text}"),
            ),
            MeshEvent::Transfer { .. } => {}
            MeshEvent::ServerError { code, message } => self.line(
                json!({"event": "error", "code": code, "message": message}),
                || format!("server refused: {code}: {message}"),
            ),
            MeshEvent::Warning(message) => {
                eprintln!("warning: {message}");
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
            println!("no other peers");
        } else {
            for p in peers {
                println!("{}", describe(p));
            }
        }
    }

    /// Who we are and where.
    pub fn status(
        &self,
        identity: &IdentityKeyPair,
        name: &str,
        room: &RoomId,
        own_id: Option<&str>,
        peers: &[PeerInfo],
    ) {
        let fp = identity.public().fingerprint();
        if self.json {
            let list: Vec<Value> = peers.iter().map(peer_json).collect();
            println!(
                "{}",
                json!({
                    "event": "status", "name": name, "peer_id": own_id, "room": room,
                    "fingerprint": fp.to_hex(), "safety_code": fp.short_code(),
                    "joined": own_id.is_some(), "peers": list,
                })
            );
            return;
        }
        println!("name:        {name}");
        println!("safety code: {}", fp.short_code());
        println!("fingerprint: {}", fp.to_hex());
        println!("room:        {room}");
        match own_id {
            Some(id) => println!("signaling:   joined as {id}"),
            None => println!("signaling:   not joined"),
        }
        self.peers(peers);
    }
}
