//! What the page sees: the JavaScript shapes of the node's events and views (see the
//! crate docs), made from the core's types. Nothing here decides anything.

use serde::Serialize;
use tsify::Tsify;
use wasm_bindgen::JsValue;
use weft_core::identity::Fingerprint;
use weft_core::node::{
    DownloadView, FileEvent as NodeFileEvent, FileNames, Node, PeerInfo as NodeInfo,
    RelayTransport, SavedTo, TransfersView,
};
use weft_core::signal::{ErrorCode, PeerId};
use weft_core::transfer::{DownloadState, OfferItem, Root, TransferEvent};
use weft_core::trust::Trust;

/// `value` as the page receives it: serde_json's text, parsed by the browser's
/// `JSON.parse`. The shapes are plain JSON (maps as objects, `None` as `null`, numbers as
/// numbers), as serde-wasm-bindgen's `json_compatible` made them, but serde_json is in the
/// module anyway (the signaling messages, the resume records), so this needs no
/// serializer of its own (serde-wasm-bindgen's cost 3.8 KB of the module as brotli).
pub(crate) fn to_js<T: Serialize + ?Sized>(value: &T) -> Result<JsValue, String> {
    let json = serde_json::to_string(value).map_err(|e| e.to_string())?;
    // serde_json writes only valid JSON: a failure here is the browser's (out of memory).
    js_sys::JSON::parse(&json).map_err(|_| "JSON.parse failed".to_string())
}

/// The signaling connection's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Tsify)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    DerivingKey,
    Connecting,
    Joined,
    Reconnecting,
    Closed,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::DerivingKey => "deriving_key",
            Status::Connecting => "connecting",
            Status::Joined => "joined",
            Status::Reconnecting => "reconnecting",
            Status::Closed => "closed",
        }
    }
}

/// The `peer` event's body and an element of `session.peers()`.
#[derive(Clone, Debug, PartialEq, Serialize, Tsify)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PeerInfo {
    #[tsify(type = "string")]
    pub peer_id: PeerId,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub short_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust: Option<&'static str>,
    /// How we reach the relay of a relayed session (`udp`, `tcp`, `tls`), when our end
    /// is relayed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_transport: Option<&'static str>,
    /// Another pinned name its name looks like, under another key: show it loudly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub looks_like: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Its overlay addresses (`100.x.y.z`, `fd..`), once it announced them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
}

impl From<&NodeInfo> for PeerInfo {
    fn from(p: &NodeInfo) -> Self {
        Self {
            peer_id: p.peer_id.clone(),
            state: p.state.as_str(),
            reason: p.reason.as_ref().map(ToString::to_string),
            name: p.name.clone(),
            fingerprint: p.fingerprint.as_ref().map(Fingerprint::to_hex),
            short_code: p.fingerprint.as_ref().map(Fingerprint::short_code),
            trust: p.trust.map(Trust::as_str),
            relay_transport: p.relay_transport.map(RelayTransport::as_str),
            looks_like: p.looks_like.clone(),
            rtt_ms: p.rtt.map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0),
            ipv4: p.ipv4.map(|a| a.to_string()),
            ipv6: p.ipv6.map(|a| a.to_string()),
        }
    }
}

/// The session's own events (signaling, members, peers, messages).
#[derive(Serialize, Tsify)]
#[serde(tag = "type", rename_all = "snake_case", rename_all_fields = "camelCase")]
pub(crate) enum SessionEvent {
    Status {
        status: Status,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    Joined {
        #[tsify(type = "string")]
        peer_id: PeerId,
        #[tsify(type = "string[]")]
        peers: Vec<PeerId>,
    },
    PeerJoined {
        #[tsify(type = "string")]
        peer_id: PeerId,
    },
    PeerLeft {
        #[tsify(type = "string")]
        peer_id: PeerId,
    },
    Error {
        #[tsify(type = "string")]
        code: ErrorCode,
        message: String,
    },
    Peer(PeerInfo),
    /// A member's passphrase check failed again: a wrong passphrase, or someone guessing
    /// it online. Show it: "N failed passphrase attempts from …".
    PassphraseFailures {
        #[tsify(type = "string")]
        peer_id: PeerId,
        /// Failed attempts from this id so far.
        failures: u32,
        /// Failed attempts from anyone so far.
        total: f64,
        /// When its next attempt may be answered.
        retry_in_ms: f64,
    },
    Message {
        #[tsify(type = "string")]
        peer_id: PeerId,
        name: String,
        text: String,
        /// The sender's key's trust under its name when the message came.
        #[serde(skip_serializing_if = "Option::is_none")]
        trust: Option<&'static str>,
        /// Another pinned name its name looks like, under another key.
        #[serde(skip_serializing_if = "Option::is_none")]
        looks_like: Option<String>,
        at: f64,
    },
}

/// What the page's listener receives: one `type` field names the kind of every event.
/// (Untagged here: each kind of event carries its own `type`, so the TypeScript union is
/// flat, `SessionEvent | FileEvent`.)
#[derive(Serialize, Tsify)]
#[serde(untagged)]
pub(crate) enum JsEvent {
    Session(SessionEvent),
    File(FileEvent),
}

/// A file item as the page sees it.
#[derive(Clone, Debug, Serialize, Tsify)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ItemJs {
    path: String,
    size: f64,
    /// The name the file was offered under (its root, or a stream key if it was offered
    /// before it was hashed): the same in every event about it, from the offer to
    /// `file_complete` or `delivered`, and what the download methods take.
    key: String,
    /// Its BLAKE3 hash, once known (`null` for a file offered before it was hashed, until
    /// then).
    #[tsify(type = "string | null")]
    root: Option<String>,
}

/// Turns a node's names of files into the page's: the stable `key` and the `root` (the
/// BLAKE3 hash) once known. Nothing here decides anything; the node names them
/// (`weft_core::node::FileNames`).
pub(crate) struct Names<'a>(pub(crate) &'a Node);

fn strings(names: FileNames) -> (String, Option<String>) {
    (names.key.to_string(), names.root.map(|r| r.to_string()))
}

impl Names<'_> {
    /// A received file (download) known as `name` (its key, or its root once verified).
    fn download(&self, name: &Root) -> (String, Option<String>) {
        strings(self.0.download_names(name))
    }

    /// A file we serve to `peer`, known here as `name` (a local key or its root).
    fn served(&self, peer: &PeerId, name: &Root) -> (String, Option<String>) {
        strings(self.0.served_names(peer, name))
    }

    fn items(&self, items: &[OfferItem], outgoing: bool) -> Vec<ItemJs> {
        items
            .iter()
            .map(|i| {
                let (key, root) = strings(self.0.item_names(i, outgoing));
                ItemJs { path: i.path.clone(), size: i.size as f64, key, root }
            })
            .collect()
    }
}

/// File-transfer events for the page (see the crate docs). Every event about one file
/// names it by `key` (stable from the offer on) and `root` (its hash, once known).
#[derive(Serialize, Tsify)]
#[serde(tag = "type", rename_all = "snake_case", rename_all_fields = "camelCase")]
pub(crate) enum FileEvent {
    Hashing {
        path: String,
        done_bytes: f64,
        size: f64,
    },
    /// Left out of a folder being sent (a hidden file, a device name...).
    Skipped {
        path: String,
        reason: String,
    },
    Offer {
        peer_id: String,
        name: String,
        offer_id: f64,
        items: Vec<ItemJs>,
        total_size: f64,
        /// The sender's key's trust under its name when the offer came (as a message's).
        #[serde(skip_serializing_if = "Option::is_none")]
        trust: Option<&'static str>,
        /// Another pinned name its name looks like, under another key.
        #[serde(skip_serializing_if = "Option::is_none")]
        looks_like: Option<String>,
    },
    OfferAnswered {
        peer_id: String,
        offer_id: f64,
        accepted: bool,
    },
    Resumed {
        peer_id: String,
        offer_id: f64,
        keys: Vec<String>,
    },
    Progress(ProgressJs),
    Upload {
        peer_id: String,
        key: String,
        #[tsify(type = "string | null")]
        root: Option<String>,
        sent_bytes: f64,
        size: f64,
    },
    FileComplete {
        key: String,
        root: String,
        paths: Vec<String>,
        size: f64,
        /// "browser" (kept in the page's storage: `downloadedFile`, `saveDownload`) or
        /// "downloads" (streamed into the browser's downloads folder; nothing kept here).
        stored: &'static str,
    },
    FileFailed {
        key: String,
        #[tsify(type = "string | null")]
        root: Option<String>,
        reason: String,
    },
    Delivered {
        peer_id: String,
        key: String,
        root: String,
    },
    TransferCancelled {
        peer_id: String,
        offer_id: f64,
        reason: String,
        by_peer: bool,
        outgoing: bool,
    },
    ChunkRejected {
        key: String,
        #[tsify(type = "string | null")]
        root: Option<String>,
        index: u32,
        peer_id: String,
    },
    SourceAdded {
        key: String,
        #[tsify(type = "string | null")]
        root: Option<String>,
        peer_id: String,
    },
    SourceDropped {
        key: String,
        #[tsify(type = "string | null")]
        root: Option<String>,
        peer_id: String,
        reason: String,
    },
}

/// A download's progress (the `progress` event and `transfers().downloads`).
#[derive(Clone, Debug, Serialize, Tsify)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ProgressJs {
    /// The name it was offered under, as in the offer's items (stable).
    key: String,
    /// Its BLAKE3 hash, once known (`null` until a file offered before it was hashed is
    /// verified).
    #[tsify(type = "string | null")]
    root: Option<String>,
    paths: Vec<String>,
    size: f64,
    done_bytes: f64,
    speed_bps: f64,
    eta_s: Option<f64>,
    sources: Vec<String>,
    offers: Vec<OfferRef>,
    state: &'static str,
}

/// An offer a download belongs to.
#[derive(Clone, Debug, Serialize, Tsify)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OfferRef {
    peer_id: String,
    offer_id: f64,
}

fn download_state(s: DownloadState) -> &'static str {
    match s {
        DownloadState::Active => "active",
        DownloadState::Paused => "paused",
        DownloadState::Complete => "complete",
        DownloadState::Failed => "failed",
    }
}

impl From<&DownloadView> for ProgressJs {
    fn from(v: &DownloadView) -> Self {
        let p = &v.progress;
        Self {
            key: p.key.to_string(),
            root: p.hash.map(|h| h.to_string()),
            paths: p.paths.clone(),
            size: p.size as f64,
            done_bytes: p.done_bytes as f64,
            speed_bps: v.speed_bps.round(),
            eta_s: v.eta.map(|d| (d.as_secs_f64() * 10.0).round() / 10.0),
            sources: p.sources.iter().map(PeerId::to_string).collect(),
            offers: p
                .offers
                .iter()
                .map(|(peer, id)| OfferRef { peer_id: peer.to_string(), offer_id: *id as f64 })
                .collect(),
            state: download_state(p.state),
        }
    }
}

#[derive(Serialize, Tsify)]
#[serde(rename_all = "camelCase")]
struct OutgoingJs {
    peer_id: String,
    offer_id: f64,
    items: Vec<ItemJs>,
    state: &'static str,
    sent_bytes: f64,
    total_bytes: f64,
}

#[derive(Serialize, Tsify)]
#[serde(rename_all = "camelCase")]
struct IncomingJs {
    peer_id: String,
    offer_id: f64,
    items: Vec<ItemJs>,
    /// The sender's key's trust, as in the `offer` event.
    #[serde(skip_serializing_if = "Option::is_none")]
    trust: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    looks_like: Option<String>,
}

/// A sender's trust as its peer view says now (`trust`, `looksLike`), shown beside each
/// offer as beside each message.
fn sender_trust(node: &Node, peer: &PeerId) -> (Option<&'static str>, Option<String>) {
    node.peer(peer).map_or((None, None), |p| (p.trust.map(Trust::as_str), p.looks_like))
}

/// `session.transfers()`.
#[derive(Serialize, Tsify)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TransfersJs {
    downloads: Vec<ProgressJs>,
    outgoing: Vec<OutgoingJs>,
    incoming: Vec<IncomingJs>,
}

impl TransfersJs {
    pub(crate) fn new(t: &TransfersView, names: &Names<'_>) -> Self {
        Self {
            downloads: t.downloads.iter().map(ProgressJs::from).collect(),
            outgoing: t
                .outgoing
                .iter()
                .map(|o| OutgoingJs {
                    peer_id: o.peer.to_string(),
                    offer_id: o.offer_id as f64,
                    items: names.items(&o.items, true),
                    state: o.state.as_str(),
                    sent_bytes: o.sent_bytes as f64,
                    total_bytes: o.total_bytes as f64,
                })
                .collect(),
            incoming: t
                .incoming
                .iter()
                .map(|o| {
                    let (trust, looks_like) = sender_trust(names.0, &o.peer);
                    IncomingJs {
                        peer_id: o.peer.to_string(),
                        offer_id: o.offer_id as f64,
                        items: names.items(&o.items, false),
                        trust,
                        looks_like,
                    }
                })
                .collect(),
        }
    }
}

/// The page's form of a node's file event; `None` for what the page is not told.
pub(crate) fn file_event(event: &NodeFileEvent, names: &Names<'_>) -> Option<FileEvent> {
    let node = names.0;
    Some(match event {
        NodeFileEvent::Engine(e) => match e {
            TransferEvent::Offered { peer, offer_id, items } => {
                let (trust, looks_like) = sender_trust(node, peer);
                FileEvent::Offer {
                    name: node.peer_name(peer).unwrap_or_default().to_string(),
                    peer_id: peer.to_string(),
                    offer_id: *offer_id as f64,
                    total_size: items.iter().map(|i| i.size as f64).sum(),
                    items: names.items(items, false),
                    trust,
                    looks_like,
                }
            }
            TransferEvent::Resumed { peer, offer_id, items } => FileEvent::Resumed {
                peer_id: peer.to_string(),
                offer_id: *offer_id as f64,
                keys: items.iter().map(|i| names.download(&i.root).0).collect(),
            },
            TransferEvent::Answered { peer, offer_id, accepted } => FileEvent::OfferAnswered {
                peer_id: peer.to_string(),
                offer_id: *offer_id as f64,
                accepted: *accepted,
            },
            TransferEvent::Delivered { peer, root } => {
                let (key, hash) = names.served(peer, root);
                let root = hash.unwrap_or_else(|| root.to_string());
                FileEvent::Delivered { peer_id: peer.to_string(), key, root }
            }
            // Told by its key: a failed download may be gone already (one streamed into
            // the downloads folder cannot continue, so it is forgotten at once).
            TransferEvent::FileFailed { root, key, reason } => FileEvent::FileFailed {
                key: key.to_string(),
                root: (root != key).then(|| root.to_string()).or_else(|| names.download(key).1),
                reason: reason.to_string(),
            },
            TransferEvent::Cancelled { peer, offer_id, reason, by_peer, outgoing } => {
                FileEvent::TransferCancelled {
                    peer_id: peer.to_string(),
                    offer_id: *offer_id as f64,
                    reason: reason.to_string(),
                    by_peer: *by_peer,
                    outgoing: *outgoing,
                }
            }
            TransferEvent::ChunkRejected { root, index, peer } => {
                let (key, root) = names.download(root);
                FileEvent::ChunkRejected { key, root, index: *index, peer_id: peer.to_string() }
            }
            TransferEvent::SourceAdded { root, peer } => {
                let (key, root) = names.download(root);
                FileEvent::SourceAdded { key, root, peer_id: peer.to_string() }
            }
            TransferEvent::SourceDropped { root, peer, reason } => {
                let (key, root) = names.download(root);
                FileEvent::SourceDropped {
                    key,
                    root,
                    peer_id: peer.to_string(),
                    reason: reason.to_string(),
                }
            }
            // The node reports a complete file once it is in place (`Saved`); a share that
            // failed only matters to the driver; a verified root shows in the next progress.
            TransferEvent::FileComplete { .. }
            | TransferEvent::ShareFailed { .. }
            | TransferEvent::Verified { .. } => return None,
        },
        NodeFileEvent::Progress(view) => FileEvent::Progress(ProgressJs::from(view)),
        NodeFileEvent::Upload { peer, root, sent_bytes, size } => {
            let (key, root) = names.served(peer, root);
            FileEvent::Upload {
                peer_id: peer.to_string(),
                key,
                root,
                sent_bytes: *sent_bytes as f64,
                size: *size as f64,
            }
        }
        NodeFileEvent::Restored(_) => return None,
        NodeFileEvent::Saved { root, key, paths, size, to } => FileEvent::FileComplete {
            key: key.to_string(),
            root: root.to_string(),
            paths: paths.clone(),
            size: *size as f64,
            stored: if *to == SavedTo::Downloads { "downloads" } else { "browser" },
        },
    })
}
