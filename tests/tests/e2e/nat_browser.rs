//! Browsers across real NATs (network namespaces, nftables; see `weft_tests::netns`): the
//! page is served by `weft-signal` on the public host, whose embedded STUN/TURN server the
//! page uses by default (nothing configured by the test). Real headless Chromium runs
//! inside each site's host namespace.
//!
//! - A browser on a network that drops all outgoing UDP and one behind a symmetric NAT
//!   still talk: the first reaches the relay over TURN/TCP.
//! - A browser and a native peer, both behind symmetric NATs, talk through the relay.
//! - A browser and a native peer whose session started on the relay (UDP between their
//!   sites blocked) move it to the direct path once the block lifts.
//!
//! Either way messages arrive both ways, nothing leaves the test's own addresses, and a
//! capture on the public host (the relay) holds neither the messages' text nor the
//! network's name.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{Value, json};
use thirtyfour::prelude::*;
use weft_tests::native::{NativePeer, SignalProcess, command_on, config_dir, run};
use weft_tests::netns::{Nat, Outbound, SiteSpec, Topology, netns_available};
use weft_tests::{
    ChromeDriver, INSTRUMENT_PEER_CONNECTIONS, chromium_available, js, wait_message, wait_peer,
};

use crate::nat::{CONTROL, Capture};

/// One step on a busy machine (Argon2id in the page, ICE through a relay).
const WAIT: Duration = Duration::from_secs(90);
/// The network's name (a passphrase network): the server must never see it.
const NETWORK: &str = "nat-browser-secret-network";
const PASSPHRASE: &str = "correct horse battery staple";
/// Text in every message: it must never cross the public host in the clear.
const MARKER: &str = "WEFT-BROWSER-MARKER-93c2";

/// Opens the page from the public server in `browser` and joins [`NETWORK`] as `name`,
/// with the page's defaults (the server's STUN/TURN).
async fn join(browser: &WebDriver, topology: &Topology, name: &str) {
    browser.goto(&format!("http://{}:8080/", topology.public_ip())).await.unwrap();
    let options = json!({ "network": NETWORK, "passphrase": PASSPHRASE, "name": name });
    weft_tests::start_join(browser, &options, INSTRUMENT_PEER_CONNECTIONS).await.unwrap();
}

async fn say(browser: &WebDriver, text: &str) {
    let sent = js(browser, &format!("return window.t.session.sendMessage({});", json!(text)))
        .await
        .unwrap();
    assert_eq!(sent, 1, "{text}");
}

/// The selected pair of `browser`'s one connected peer connection.
async fn selected_pair(browser: &WebDriver) -> Value {
    let view = weft_tests::rtc_view(browser).await.unwrap();
    let connected: Vec<&Value> =
        view.as_array().unwrap().iter().filter(|pc| pc["connectionState"] == "connected").collect();
    assert_eq!(connected.len(), 1, "{view}");
    connected[0].clone()
}

/// Joins Alice (`alice`, Chromium in site 0) and starts Nat (`weft-peer up` with `dir`,
/// on site 1's host); returns Nat once both see their session relayed.
async fn meet_relayed(
    alice: &WebDriver,
    topology: &Topology,
    server: &SignalProcess,
    dir: &std::path::Path,
) -> anyhow::Result<NativePeer> {
    join(alice, topology, "Alice").await;
    let mut up = command_on(topology.host(1, 0), &server.ws_url, dir)?;
    up.args(["--network", NETWORK, "--name", "Nat", "up"]).env("WEFT_PASSPHRASE", PASSPHRASE);
    let mut nat = NativePeer::spawn(up)?;
    let seen = nat
        .expect("Nat sees Alice", WAIT, |v| v["event"] == "peer_connected" && v["name"] == "Alice")
        .await?;
    assert_eq!(seen["path"], "relayed", "{seen}");
    wait_peer(alice, "Nat", &["relayed"], WAIT).await?;
    Ok(nat)
}

/// Ends `capture` and checks what crossed the public host.
async fn check_capture(capture: Capture) {
    let (frames, hits) = capture.finish().await;
    let [marker, name, control] = hits[..] else { unreachable!() };
    assert!(control > 0, "the capture saw no welcome in {frames} frames: it does not work");
    assert_eq!(marker, 0, "a message's plaintext crossed the public host");
    assert_eq!(name, 0, "the network's name crossed the public host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_without_udp_and_one_behind_a_symmetric_nat_talk_through_turn_tcp() {
    let test = "a_browser_without_udp_and_one_behind_a_symmetric_nat_talk_through_turn_tcp";
    if !netns_available(test) || !chromium_available(test) {
        return;
    }
    let no_udp = SiteSpec { nat: Nat::EndpointIndependent, outbound: Outbound::NoUdp, hosts: 1 };
    let topology = Topology::new(&[no_udp, SiteSpec::behind(Nat::Symmetric)]).unwrap();
    let capture = Capture::start(topology.server(), &[MARKER, NETWORK, CONTROL]).await;
    let server = SignalProcess::start(topology.server(), &[]).await.unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let alice = driver.browser_in(topology.host(0, 0)).await.unwrap();
    let bob = driver.browser_in(topology.host(1, 0)).await.unwrap();
    let checked = async {
        join(&alice, &topology, "Alice").await;
        join(&bob, &topology, "Bob").await;
        let bob_seen = wait_peer(&alice, "Bob", &["relayed"], WAIT).await?;
        wait_peer(&bob, "Alice", &["relayed"], WAIT).await?;
        // Alice's only way out is TCP: her end of the pair is her relay, reached over TCP,
        // and the JS API says so.
        let pair = selected_pair(&alice).await;
        assert_eq!(pair["localType"], "relay", "{pair}");
        assert_eq!(pair["relayProtocol"], "tcp", "{pair}");
        assert_eq!(bob_seen["relayTransport"], "tcp", "{bob_seen}");
        let to_bob = format!("{MARKER} hello Bob, from a network without UDP");
        let to_alice = format!("{MARKER} hi Alice, from behind a symmetric NAT");
        say(&alice, &to_bob).await;
        assert_eq!(wait_message(&bob, &to_bob, WAIT).await?["name"], "Alice");
        say(&bob, &to_alice).await;
        assert_eq!(wait_message(&alice, &to_alice, WAIT).await?["name"], "Bob");
        anyhow::Ok(())
    }
    .await;
    alice.quit().await.unwrap();
    bob.quit().await.unwrap();
    checked.unwrap();
    assert_eq!(topology.stray_packets().unwrap(), 0);
    drop(server);
    check_capture(capture).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_and_a_native_peer_behind_symmetric_nats_talk_through_the_relay() {
    let test = "a_browser_and_a_native_peer_behind_symmetric_nats_talk_through_the_relay";
    if !netns_available(test) || !chromium_available(test) {
        return;
    }
    let symmetric = SiteSpec::behind(Nat::Symmetric);
    let topology = Topology::new(&[symmetric, symmetric]).unwrap();
    let capture = Capture::start(topology.server(), &[MARKER, NETWORK, CONTROL]).await;
    let server = SignalProcess::start(topology.server(), &[]).await.unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let alice = driver.browser_in(topology.host(0, 0)).await.unwrap();
    let dir = config_dir("nat-browser-native").unwrap();
    let native = topology.host(1, 0);
    let checked = async {
        let mut nat = meet_relayed(&alice, &topology, &server, &dir).await?;

        let to_nat = format!("{MARKER} hello weft-peer, from Chromium");
        say(&alice, &to_nat).await;
        let heard = nat.expect("the message", WAIT, |v| v["event"] == "message").await?;
        assert_eq!(heard["text"], to_nat.as_str());
        // Native -> browser, with `msg` (a second process with the same identity).
        let to_alice = format!("{MARKER} hello Chromium, from weft-peer");
        let mut msg = command_on(native, &server.ws_url, &dir)?;
        msg.args(["--network", NETWORK, "--name", "Nat", "msg", "Alice", &to_alice]);
        msg.env("WEFT_PASSPHRASE", PASSPHRASE);
        let (status, stdout, stderr) = run(msg, WAIT).await?;
        assert!(status.success(), "{stdout}\n{stderr}");
        assert_eq!(wait_message(&alice, &to_alice, WAIT).await?["name"], "Nat");
        nat.terminate(WAIT).await?;
        anyhow::Ok(())
    }
    .await;
    alice.quit().await.unwrap();
    checked.unwrap();
    assert_eq!(topology.stray_packets().unwrap(), 0);
    drop(server);
    check_capture(capture).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A browser↔native session that starts relayed moves to the direct path once one exists,
/// on the same session (the move native↔native is `nat.rs`'s). Both sites are behind
/// endpoint-independent NATs, but UDP between them is dropped, so Alice (Chromium) and Nat
/// (weft-peer) meet through the relay; then the block lifts. Whichever side is impolite
/// (the peer ids decide) looks for a direct path 5 s after the session went relayed (an
/// ICE restart) and finds it; both report `direct`, without a new session. This is also
/// what lets the same-host tests accept a session that a busy machine started on the relay
/// (`NativePeer::expect_direct`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_browser_and_native_session_moves_to_the_direct_path() {
    let test = "a_relayed_browser_and_native_session_moves_to_the_direct_path";
    if !netns_available(test) || !chromium_available(test) {
        return;
    }
    let eim = SiteSpec::behind(Nat::EndpointIndependent);
    let topology = Topology::new(&[eim, eim]).unwrap();
    topology.set_udp_between_sites(false).unwrap();
    let server = SignalProcess::start(topology.server(), &[]).await.unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let alice = driver.browser_in(topology.host(0, 0)).await.unwrap();
    let dir = config_dir("nat-browser-move").unwrap();
    let checked = async {
        let mut nat = meet_relayed(&alice, &topology, &server, &dir).await?;

        let dropped = topology.set_udp_between_sites(true)?;
        assert!(dropped > 0, "no direct attempt was made (and blocked)");
        nat.expect("a direct path", WAIT, |v| {
            v["event"] == "path_changed" && v["name"] == "Alice" && v["path"] == "direct"
        })
        .await?;
        wait_peer(&alice, "Nat", &["direct"], WAIT).await?;
        let pair = selected_pair(&alice).await;
        assert_ne!(pair["localType"], "relay", "{pair}");
        assert_ne!(pair["remoteType"], "relay", "{pair}");
        // Moved, not rebuilt: one session on each side.
        let sessions = nat.seen.iter().filter(|v| v["event"] == "peer_connected").count();
        assert_eq!(sessions, 1, "the session was rebuilt, not moved: {:?}", nat.seen);
        let view = weft_tests::rtc_view(&alice).await?;
        assert_eq!(view.as_array().map(Vec::len), Some(1), "{view}");

        // And it carries: a message on the direct path.
        say(&alice, "hello on the direct path").await;
        let heard = nat.expect("the message", WAIT, |v| v["event"] == "message").await?;
        assert_eq!(heard["text"], "hello on the direct path");
        nat.terminate(WAIT).await?;
        anyhow::Ok(())
    }
    .await;
    alice.quit().await.unwrap();
    checked.unwrap();
    assert_eq!(topology.stray_packets().unwrap(), 0);
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}
