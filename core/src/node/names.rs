//! What a file is called in what the drivers show: the stable `key` it was offered under
//! (its root, or a stream key if it was offered before it was hashed), the same from the
//! offer to its completion, and its `root` (BLAKE3 hash) once known. The engine's events
//! name a file by whatever it knows it as at that moment (a download by its key until
//! verified, then by its root; a shared file by our local key); these lookups turn that
//! into the names a page or a script can follow. The browser's events and the native
//! peer's JSON lines both use them, so they cannot drift apart.

use super::{FileEvent, Node};
use crate::signal::PeerId;
use crate::transfer::{OfferItem, Root, TransferEvent};

/// The names of one file (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileNames {
    /// The name it was offered under: the same in every event about it.
    pub key: Root,
    /// Its BLAKE3 hash, once known.
    pub root: Option<Root>,
}

impl Node {
    /// A file we download, known as `name` (its key, or its root once verified).
    pub fn download_names(&self, name: &Root) -> FileNames {
        match self.engine.progress(name) {
            Some(p) => FileNames { key: p.key, root: p.hash },
            None => FileNames { key: *name, root: None },
        }
    }

    /// A file we serve to `peer`, known here as `name` (a local key or its root): the key
    /// that peer was offered it under (else, fetched by its root without an offer, the
    /// root) and its root once hashed.
    pub fn served_names(&self, peer: &PeerId, name: &Root) -> FileNames {
        let root = self.engine.shared_root(name);
        let key = self.offered_key(peer, name).or(root).unwrap_or(*name);
        FileNames { key, root }
    }

    /// An item of an offer: of one we made (`outgoing`) or one made to us.
    pub fn item_names(&self, item: &OfferItem, outgoing: bool) -> FileNames {
        let root = if !item.streamed {
            Some(item.root)
        } else if outgoing {
            self.engine.shared_root(&item.root)
        } else {
            self.engine.progress(&item.root).and_then(|p| p.hash)
        };
        FileNames { key: item.root, root }
    }

    /// The names of the one file `event` is about; `None` for an event about an offer
    /// (its items carry their own names: [`Self::item_names`]).
    pub fn file_event_names(&self, event: &FileEvent) -> Option<FileNames> {
        Some(match event {
            FileEvent::Engine(e) => match e {
                TransferEvent::Offered { .. }
                | TransferEvent::Resumed { .. }
                | TransferEvent::Answered { .. }
                | TransferEvent::Cancelled { .. } => return None,
                TransferEvent::Delivered { peer, root } => self.served_names(peer, root),
                TransferEvent::FileComplete { root, key, .. }
                | TransferEvent::Verified { key, root } => {
                    FileNames { key: *key, root: Some(*root) }
                }
                TransferEvent::FileFailed { root, key, .. } => FileNames {
                    key: *key,
                    root: (root != key).then_some(*root).or(self.download_names(key).root),
                },
                TransferEvent::ChunkRejected { root, .. }
                | TransferEvent::SourceAdded { root, .. }
                | TransferEvent::SourceDropped { root, .. } => self.download_names(root),
                // Our own share: no one peer's key names it.
                TransferEvent::ShareFailed { root, .. } => {
                    FileNames { key: *root, root: self.engine.shared_root(root) }
                }
            },
            FileEvent::Progress(view) | FileEvent::Restored(view) => {
                FileNames { key: view.progress.key, root: view.progress.hash }
            }
            FileEvent::Upload { peer, root, .. } => self.served_names(peer, root),
            FileEvent::Saved { root, key, .. } => FileNames { key: *key, root: Some(*root) },
        })
    }
}
