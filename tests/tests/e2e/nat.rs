//! Across real NATs (network namespaces, nftables; see `weft_tests::netns`): `weft-signal`
//! with its embedded STUN/TURN server on a public host, peers on hosts behind routers.
//! Behind endpoint-independent NATs peers connect directly (STUN tells them their public
//! address); behind symmetric NATs they connect through the relay; either way a file
//! arrives whole, and nothing leaves the test's own addresses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::Value;
use weft_tests::files::{Scratch, blake3_of, generate, mib};
use weft_tests::native::{NativePeer, SignalProcess, command_on, config_dir};
use weft_tests::netns::{Nat, SiteSpec, Topology, netns_available};

/// One step on a busy machine.
const WAIT: Duration = Duration::from_secs(60);
/// A whole transfer, relayed.
const LONG: Duration = Duration::from_secs(180);

/// The path Bea's session with Ada ended on, as `receive` last reported it.
fn last_path(events: &[Value]) -> Option<String> {
    events
        .iter()
        .rev()
        .filter(|v| {
            (v["event"] == "peer_connected" || v["event"] == "path_changed") && v["name"] == "Ada"
        })
        .find_map(|v| v["path"].as_str().map(str::to_string))
}

/// Ada (site 0) sends Bea (site 1) a file through `weft-signal` on the public host; the
/// path Bea's session took, and what Bea printed.
async fn send_across(sites: [SiteSpec; 2], size: u64) -> (String, Vec<Value>) {
    let topology = Topology::new(&sites).unwrap();
    let server = SignalProcess::start(topology.server(), &[]).await.unwrap();
    let scratch = Scratch::new("nat").unwrap();
    let file = generate(scratch.path(), "across.bin", size, 21).unwrap();
    let downloads = scratch.path().join("in");
    let invite = "Q".repeat(43);
    let (dir_a, dir_b) = (config_dir("nat-ada").unwrap(), config_dir("nat-bea").unwrap());

    let mut receive = command_on(topology.host(1, 0), &server.ws_url, &dir_b).unwrap();
    receive.args(["--invite", &invite, "--name", "Bea", "receive", "--once"]);
    receive.args(["--accept-from", "Ada", "--dir"]).arg(&downloads);
    let mut bea = NativePeer::spawn(receive).unwrap();
    bea.expect_event("receiving", WAIT).await.unwrap();
    let mut send = command_on(topology.host(0, 0), &server.ws_url, &dir_a).unwrap();
    send.args(["--invite", &invite, "--name", "Ada", "send", "--to", "Bea"]).arg(&file.path);
    let mut ada = NativePeer::spawn(send).unwrap();
    let (sent, received) = tokio::join!(ada.wait_exit(LONG), bea.wait_exit(LONG));
    assert!(sent.unwrap().success(), "Ada: {:?}", ada.seen);
    assert!(received.unwrap().success(), "Bea: {:?}", bea.seen);
    assert_eq!(blake3_of(&downloads.join("across.bin")).unwrap(), file.root);
    // Only the test's own addresses were ever used.
    assert_eq!(topology.stray_packets().unwrap(), 0);
    drop(server);
    let path =
        last_path(&bea.seen).unwrap_or_else(|| panic!("no session with Ada: {:?}", bea.seen));
    (path, bea.seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_endpoint_independent_nats_native_peers_connect_directly() {
    if !netns_available("behind_endpoint_independent_nats_native_peers_connect_directly") {
        return;
    }
    let eim = SiteSpec::behind(Nat::EndpointIndependent);
    let (path, seen) = send_across([eim, eim], mib(6) + 7).await;
    assert_eq!(path, "direct", "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_symmetric_nats_native_peers_connect_through_the_relay() {
    if !netns_available("behind_symmetric_nats_native_peers_connect_through_the_relay") {
        return;
    }
    let symmetric = SiteSpec::behind(Nat::Symmetric);
    // Small: this shows the path, not the speed (`native_transfer.rs` compares relayed
    // and direct speed on loopback).
    let (path, seen) = send_across([symmetric, symmetric], mib(1) + 7).await;
    assert_eq!(path, "relayed", "{seen:?}");
}
