//! Weft's protocol core.
//!
//! Everything here is sans-IO: no sockets, no clock, no threads, no randomness of its
//! own. Drivers (the browser crate `weft-wasm`, the native peer, the signaling server)
//! feed inputs in and act on what comes out, so every platform runs the same protocol.
#![forbid(unsafe_code)]

pub mod signal;
