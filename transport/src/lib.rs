//! weft-core's transport, re-exported by it as `weft_core::frame`, `weft_core::transport`
//! and `weft_core::aead`: [`frame`] (what travels inside packets), [`session`] (one
//! channel's keys, counters and replay window: sealing and opening packets) and [`aead`]
//! (their ChaCha20-Poly1305).
//!
//! Why a crate of its own: the WebAssembly module is built for size (weft-core at
//! `opt-level = "z"`, see the workspace `Cargo.toml`) to keep the page light, but sealing
//! and opening are the page's CPU in a transfer. Code is compiled at the level of the crate
//! it is instantiated in, and generic code in the crate that calls it: so the session is
//! not generic over its cipher (it holds a `Box<dyn PacketAead>`), and everything a packet
//! goes through, from the header to the cipher's inner loops, is instantiated here, at
//! opt-level 3, whatever the core's level is.

pub mod aead;
pub mod frame;
pub mod session;
