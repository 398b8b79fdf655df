//! File transfer: content-addressed, verified, resumable, multi-source.
//!
//! - [`hash`]: files are named by their BLAKE3 hash (the *root*) and cut into 64 KiB
//!   chunks, each verified against its chaining value from BLAKE3's own tree.
//! - [`wire`]: the messages (frames 0x20..=0x2c inside the encrypted session).
//! - [`cap`]: capabilities: offers hand them out, every fetch proves one.
//! - [`engine`]: the sans-IO state machine: offers, answers, receiver-driven pipelined
//!   requests to one or several sources, serving, cancel, pause and resume records.
//! - [`pace`]: how many requests a source gets and how long each may take, from the
//!   answer times it shows (delay-based: a slow link is kept full, never flooded).
//! - [`limits`]: the caps on what a peer can ask (file size, offers, hash lists), and
//!   the refusals a peer gets past them.
//! - [`reason`]: why a download failed, a share stopped, a source was dropped or an offer
//!   was cancelled, as types whose `Display` is the plain words the user sees.
//!
//! The design and why each property holds is in `core/TRANSFER.md`.

mod active;
pub mod cap;
pub mod engine;
pub mod hash;
pub mod limits;
pub mod pace;
pub mod reason;
pub mod wire;

pub use cap::{Capability, Proof};
pub use engine::{
    DownloadProgress, DownloadRecord, DownloadState, Engine, EngineConfig, Output, TransferError,
    TransferEvent,
};
pub use hash::{
    CHUNK_LEN, Cv, FileDigest, FileHasher, ParseRootError, Root, chunk_count, chunk_span,
};
pub use limits::{LimitReason, PendingBudget, Refusals, TransferLimits};
pub use reason::{CancelReason, DropReason, FailReason, ShareFailReason};
pub use wire::{OfferItem, TransferMsg, WireError};
