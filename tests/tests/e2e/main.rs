//! Weft's end-to-end tests, in one test binary (one link of the heavy dependencies instead
//! of one per file): real headless Chromium, real `weft-peer` processes, the real
//! signaling server, a real TURN relay. Each module says what it shows.

mod browser_embed;
mod browser_mitm;
mod browser_session;
mod browser_smoke;
mod browser_transfer;
mod browser_turn;
mod cluster;
mod nat;
mod nat_browser;
mod nat_harness;
mod native_browser;
mod native_native;
mod native_transfer;
mod tun;
mod tun_ipv6;
mod tun_routes;
