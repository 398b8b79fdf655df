//! Weft's protocol core.
//!
//! Everything here is sans-IO: no sockets, no clock, no threads, no randomness of its
//! own. Drivers (the browser crate `weft-wasm`, the native peer, the signaling server)
//! feed inputs in and act on what comes out, so every platform runs the same protocol.
#![forbid(unsafe_code)]

pub mod handshake;
pub mod identity;
pub mod network;
pub mod node;
pub mod pake;
pub mod peer;
pub mod perf;
pub mod sdp;
pub mod sealed;
pub mod signal;
pub mod sorted;
pub mod text;
pub mod transfer;
pub mod trust;

/// The `rand_core` version the core's APIs take randomness through (that of `hpke`).
pub use hpke::rand_core;
// The transport (frames, sessions and their cipher) is a crate of its own, compiled for
// speed in the browser build while this one is compiled for size: see weft-transport.
pub use weft_transport::session as transport;
pub use weft_transport::{aead, frame};
