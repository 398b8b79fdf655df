//! Issue 3's relayed path through a real TURN server: two headless Chromium processes join
//! one invite network with `iceServers: [{ urls: "turn:…", username, credential }]` and
//! `iceTransportPolicy: "relay"`, so the only path between them runs through
//! [`TurnServer`] (webrtc-rs `turn`, long-term credentials, on this machine's own
//! address). Both must show the peer as "relayed", exchange messages both ways over the
//! encrypted session, and the relay must have carried that traffic without ever seeing the
//! messages' text (it sees only ciphertext). A positive control shows the scan would find
//! plaintext: the TURN username, which clients send in the clear, is seen.
//!
//! And through `weft-signal`'s own relay over TLS alone (`turns:`), as from a network that
//! lets only TLS out to one port, on the port of the HTTPS server the page came from (as
//! 443 on a public host): its certificate self-signed, which Chromium accepts only with
//! `--ignore-certificate-errors` (it checks TURN servers' certificates as it does
//! websites').
//!
//! Behind real firewalls (network namespaces, see `weft_tests::netns`): a browser whose
//! network drops UDP reaches the relay over TCP or TLS, one whose network lets only TCP to
//! 443 out reaches it with `turns:` on 443 beside the app, each taking the ICE servers the
//! server hands out, and talks to a browser behind an ordinary home router.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{Value, json};
use thirtyfour::prelude::*;
use weft_signal::{Config, IceOffer, Limits, Server, TlsSource, TurnConfig};
use weft_tests::mitm::local_ice_ip;
use weft_tests::native::SignalProcess;
use weft_tests::netns::{Nat, Outbound, SiteSpec, Topology, netns_available};
use weft_tests::turn_server::TurnServer;
use weft_tests::{
    BrowserOptions, ChromeDriver, browser_available, js, rtc_view, start_server, wait_for, web_root,
};

const WAIT: Duration = Duration::from_secs(60);
const TURN_USER: &str = "weft-turn-user";
const TURN_PASSWORD: &str = "weft-turn-password";

/// Starts the join in the background (see [`weft_tests::start_join`]), recording the
/// page's peer connections.
async fn start_join(browser: &WebDriver, options: Value) -> anyhow::Result<()> {
    weft_tests::start_join(browser, &options, weft_tests::INSTRUMENT_PEER_CONNECTIONS).await
}

async fn state(browser: &WebDriver) -> anyhow::Result<Value> {
    js(
        browser,
        r#"
        const t = window.t || {};
        const s = t.session;
        return {
          error: t.error ?? null,
          status: s ? s.status : null,
          peers: s ? s.peers() : [],
          messages: t.messages || [],
          peerStates: (t.events || []).filter((e) => e.type === "peer").map((e) => e.state),
          logs: (t.logs || []).slice(-40),
        };
        "#,
    )
    .await
}

/// Waits until `browser` sees one peer, established and in state `wanted`.
async fn wait_peer_in(browser: &WebDriver, wanted: &str) -> anyhow::Result<Value> {
    wait_for(&format!("one peer in state {wanted:?}"), WAIT, || async {
        let s = state(browser).await?;
        if let Some(e) = s["error"].as_str() {
            anyhow::bail!("join failed: {e}");
        }
        let peers = s["peers"].as_array().cloned().unwrap_or_default();
        match peers.as_slice() {
            // The name arrives in the peer's Hello, just after the session is up.
            [p] if p["state"] == wanted && p["shortCode"].is_string() && p["name"].is_string() => {
                Ok(Ok(p.clone()))
            }
            _ => Ok(Err(format!("{} logs: {}", s["peers"], s["logs"]))),
        }
    })
    .await
}

async fn send(browser: &WebDriver, text: &str) -> anyhow::Result<u64> {
    let v = js(browser, &format!("return window.t.session.sendMessage({});", json!(text))).await?;
    Ok(v.as_u64().unwrap_or(0))
}

async fn wait_message(browser: &WebDriver, text: &str) -> anyhow::Result<Value> {
    wait_for(&format!("message {text:?}"), WAIT, || async {
        let s = state(browser).await?;
        let messages = s["messages"].as_array().cloned().unwrap_or_default();
        match messages.into_iter().find(|m| m["text"] == text) {
            Some(m) => Ok(Ok(m)),
            None => Ok(Err(s["messages"].to_string())),
        }
    })
    .await
}

/// The one connected peer connection in `who`'s [`rtc_view`], and the whole view.
async fn connected_pc(browser: &WebDriver, who: &str) -> (Value, Value) {
    let view = rtc_view(browser).await.unwrap();
    let pcs = view.as_array().unwrap();
    let connected: Vec<&Value> =
        pcs.iter().filter(|pc| pc["connectionState"] == "connected").collect();
    assert_eq!(connected.len(), 1, "{who}: {view}");
    (connected[0].clone(), view)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_talk_encrypted_through_a_real_turn_relay() {
    if !browser_available("two_browsers_talk_encrypted_through_a_real_turn_relay") {
        return;
    }
    let ip = local_ice_ip().unwrap();
    let turn = TurnServer::start(ip, TURN_USER, TURN_PASSWORD).await.unwrap();
    let to_bob = "relay-marker: hello Bob, from Alice through TURN";
    let to_alice = "relay-marker: hi Alice, Bob here, also through TURN";
    for needle in [TURN_USER, to_bob, to_alice, "relay-marker"] {
        turn.watch(needle.as_bytes());
    }

    let server = start_server(Limits::default()).await.unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let (alice, bob) = tokio::try_join!(driver.browser(), driver.browser()).unwrap();
    alice.goto(server.url()).await.unwrap();
    bob.goto(server.url()).await.unwrap();

    let invite = js(
        &alice,
        r#"return (async () => {
             const m = await import(document.getElementById("weft-module").href);
             await m.default();
             return m.createInvite();
           })();"#,
    )
    .await
    .unwrap();
    let invite = invite.as_str().unwrap().to_string();

    // A policy other than "all" or "relay" is refused with a plain message.
    let refused = js(
        &alice,
        &format!(
            r#"return (async () => {{
                 const m = await import(document.getElementById("weft-module").href);
                 try {{
                   const s = await m.WeftSession.join({{ invite: {}, iceTransportPolicy: "nope" }});
                   s.leave();
                   return "joined";
                 }} catch (e) {{ return String((e && e.message) || e); }}
               }})();"#,
            json!(invite)
        ),
    )
    .await
    .unwrap();
    assert!(refused.as_str().unwrap().contains("iceTransportPolicy"), "{refused}");

    let ice_servers = json!([turn.ice_server()]);
    for (browser, name) in [(&alice, "Alice"), (&bob, "Bob")] {
        let options = json!({
            "invite": invite,
            "name": name,
            "iceServers": ice_servers,
            "iceTransportPolicy": "relay",
        });
        start_join(browser, options).await.unwrap();
    }

    let (seen_by_alice, seen_by_bob) =
        match tokio::try_join!(wait_peer_in(&alice, "relayed"), wait_peer_in(&bob, "relayed")) {
            Ok(views) => views,
            Err(e) => {
                let (a, b) = (state(&alice).await.unwrap(), state(&bob).await.unwrap());
                let (ra, rb) = (rtc_view(&alice).await.unwrap(), rtc_view(&bob).await.unwrap());
                panic!("{e}\nturn: {turn:?}\nalice: {a}\nalice rtc: {ra}\nbob: {b}\nbob rtc: {rb}");
            }
        };
    assert_eq!(seen_by_alice["name"], "Bob", "{seen_by_alice}");
    assert_eq!(seen_by_bob["name"], "Alice", "{seen_by_bob}");
    let allocations = turn.stats().allocations.load(std::sync::atomic::Ordering::Relaxed);
    assert!(allocations >= 2, "each browser allocates a relay: {turn:?}");

    // The browsers' own view agrees: built with the TURN server and the relay policy, only
    // relay candidates gathered, and the selected pair is relay to relay on the server.
    for (who, browser) in [("alice", &alice), ("bob", &bob)] {
        let (pc, view) = connected_pc(browser, who).await;
        assert_eq!(pc["policy"], "relay", "{who}: {view}");
        assert_eq!(pc["iceServers"][0]["username"], TURN_USER, "{who}: {view}");
        assert_eq!(pc["localType"], "relay", "{who}: {view}");
        assert_eq!(pc["remoteType"], "relay", "{who}: {view}");
        assert_eq!(pc["relayProtocol"], "udp", "{who}: {view}");
        assert_eq!(pc["localAddress"], ip.to_string(), "{who}: {view}");
        let candidates = pc["candidates"].as_array().unwrap();
        assert!(!candidates.is_empty(), "{who}: {view}");
        assert!(
            candidates.iter().all(|c| c.as_str().unwrap().contains(" typ relay")),
            "{who} gathered a non-relay candidate: {view}"
        );
    }

    let before = turn.stats().relayed_bytes();
    assert_eq!(send(&alice, to_bob).await.unwrap(), 1);
    let got = wait_message(&bob, to_bob).await.unwrap();
    assert_eq!(got["name"], "Alice");
    assert_eq!(send(&bob, to_alice).await.unwrap(), 1);
    let got = wait_message(&alice, to_alice).await.unwrap();
    assert_eq!(got["name"], "Bob");
    let after = turn.stats().relayed_bytes();

    // Still relayed, and never "direct" at any point.
    for (who, browser) in [("alice", &alice), ("bob", &bob)] {
        let s = state(browser).await.unwrap();
        assert_eq!(s["peers"][0]["state"], "relayed", "{who}: {s}");
        let states = s["peerStates"].as_array().unwrap();
        assert!(!states.iter().any(|st| st == "direct"), "{who} was direct once: {s}");
    }

    let stats = turn.stats();
    println!(
        "TURN {}: {} allocations, {} bytes from/to clients, {} bytes in {} datagrams relayed \
         ({} during the two messages)",
        turn.addr(),
        allocations,
        stats.client_bytes(),
        stats.relayed_bytes(),
        stats.relayed_packets.load(std::sync::atomic::Ordering::Relaxed),
        after - before,
    );
    assert!(before > 0, "the handshake crossed the relay: {turn:?}");
    assert!(after > before, "the messages crossed the relay: {turn:?}");
    // Positive control: the scan sees what clients send in the clear.
    assert!(stats.hits(TURN_USER.as_bytes()).unwrap() > 0, "{turn:?}");
    // The relay saw only ciphertext.
    for needle in [to_bob, to_alice, "relay-marker"] {
        assert_eq!(stats.hits(needle.as_bytes()), Some(0), "{needle:?} in the clear: {turn:?}");
    }

    alice.quit().await.unwrap();
    bob.quit().await.unwrap();
    turn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_talk_through_weft_signal_over_turn_over_tls_on_the_https_port() {
    if !browser_available(
        "two_browsers_talk_through_weft_signal_over_turn_over_tls_on_the_https_port",
    ) {
        return;
    }
    // HTTPS and TURN over TLS on one port with one self-signed certificate, on an address
    // Chromium uses for WebRTC (not loopback).
    let ip = local_ice_ip().unwrap();
    let port = std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port();
    let secret = "browser turns secret";
    let config = Config {
        listen: std::net::SocketAddr::new(ip, port),
        web_root: web_root(),
        tls: Some(TlsSource::SelfSigned),
        limits: Limits::default(),
        turn: TurnConfig {
            port: 0,
            tls_port: port,
            secret: Some(secret.into()),
            ..TurnConfig::default()
        },
        cluster: None,
    };
    let server = Server::start(config).await.unwrap();
    let tls = server.turn().unwrap().tls_addr().unwrap();
    assert_eq!(tls, server.local_addr(), "TURN over TLS shares the HTTPS port");
    // Only the turns: URL, with credentials the server would mint for these members.
    let turns = format!("turns:{tls}?transport=tcp");
    let offer = IceOffer::new(secret.as_bytes(), Duration::from_secs(600), vec![turns.clone()]);

    let driver = ChromeDriver::start().await.unwrap();
    let any_certificate =
        BrowserOptions { danger_accept_any_certificate: true, ..BrowserOptions::default() };
    let (alice, bob) =
        tokio::try_join!(driver.launch(any_certificate), driver.launch(any_certificate)).unwrap();
    alice.goto(server.url()).await.unwrap();
    bob.goto(server.url()).await.unwrap();
    let invite = weft_tests::files::create_invite(&alice).await.unwrap();
    for (browser, name) in [(&alice, "Alice"), (&bob, "Bob")] {
        let options = json!({
            "invite": invite,
            "name": name,
            "iceServers": offer.servers_for(name),
            "iceTransportPolicy": "relay",
        });
        start_join(browser, options).await.unwrap();
    }
    let m = server.state().metrics();
    if let Err(e) = tokio::try_join!(wait_peer_in(&alice, "relayed"), wait_peer_in(&bob, "relayed"))
    {
        let (a, b) = (state(&alice).await.unwrap(), state(&bob).await.unwrap());
        let (ra, rb) = (rtc_view(&alice).await.unwrap(), rtc_view(&bob).await.unwrap());
        panic!(
            "{e}\nmetrics: {}\nalice: {a}\nalice rtc: {ra}\nbob: {b}\nbob rtc: {rb}",
            m.render()
        );
    }
    // Each browser reached the relay over TLS: its selected local candidate is a relay
    // one allocated over TLS.
    for (who, browser) in [("alice", &alice), ("bob", &bob)] {
        let (pc, view) = connected_pc(browser, who).await;
        assert_eq!(pc["localType"], "relay", "{who}: {view}");
        assert_eq!(pc["relayProtocol"], "tls", "{who}: {view}");
    }
    assert!(m.turn_allocations_total.get() >= 2, "{}", m.render());
    let before = m.turn_relayed_bytes.get();
    assert_eq!(send(&alice, "over turns to Bob").await.unwrap(), 1);
    assert_eq!(wait_message(&bob, "over turns to Bob").await.unwrap()["name"], "Alice");
    assert_eq!(send(&bob, "over turns to Alice").await.unwrap(), 1);
    assert_eq!(wait_message(&alice, "over turns to Alice").await.unwrap()["name"], "Bob");
    assert!(m.turn_relayed_bytes.get() > before, "{}", m.render());
    assert_eq!(m.turn_refusals(weft_signal::metrics::TurnRefusal::TlsHandshake), 0);

    alice.quit().await.unwrap();
    bob.quit().await.unwrap();
    server.shutdown(Duration::from_secs(5)).await;
}

/// Ada's browser behind a router that lets out only what `outbound` allows, Bea's behind an
/// ordinary home router, `weft-signal` on the public host with HTTPS and TURN over TLS on
/// 443 (self-signed), each page taking the ICE servers the server hands out: they talk,
/// and the view of the connection Ada's browser chose.
async fn browsers_across_a_firewall(outbound: Outbound) -> Value {
    let firewalled = SiteSpec { nat: Nat::EndpointIndependent, outbound, hosts: 1 };
    let topology =
        Topology::new(&[firewalled, SiteSpec::behind(Nat::EndpointIndependent)]).unwrap();
    let tls = ["--self-signed", "--turn-tls-port", "443"];
    let server = SignalProcess::start_on(topology.server(), 443, &tls).await.unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let behind = |site| BrowserOptions {
        netns: Some(topology.host(site, 0)),
        danger_accept_any_certificate: true,
        ..BrowserOptions::default()
    };
    let (ada, bea) = tokio::try_join!(driver.launch(behind(0)), driver.launch(behind(1))).unwrap();
    ada.goto(&server.url).await.unwrap();
    bea.goto(&server.url).await.unwrap();
    let invite = weft_tests::files::create_invite(&ada).await.unwrap();
    for (browser, name) in [(&ada, "Ada"), (&bea, "Bea")] {
        start_join(browser, json!({ "invite": invite, "name": name })).await.unwrap();
    }
    if let Err(e) = tokio::try_join!(wait_peer_in(&ada, "relayed"), wait_peer_in(&bea, "relayed")) {
        let (a, b) = (state(&ada).await.unwrap(), state(&bea).await.unwrap());
        let (ra, rb) = (rtc_view(&ada).await.unwrap(), rtc_view(&bea).await.unwrap());
        panic!("{e}\nada: {a}\nada rtc: {ra}\nbea: {b}\nbea rtc: {rb}");
    }
    assert_eq!(send(&ada, "from behind the firewall").await.unwrap(), 1);
    assert_eq!(wait_message(&bea, "from behind the firewall").await.unwrap()["name"], "Ada");
    assert_eq!(send(&bea, "into the firewalled site").await.unwrap(), 1);
    assert_eq!(wait_message(&ada, "into the firewalled site").await.unwrap()["name"], "Bea");
    let (pc, view) = connected_pc(&ada, "ada").await;
    assert_eq!(pc["localType"], "relay", "{view}");
    // The firewall held: Ada gathered nothing but relayed candidates.
    let candidates = pc["candidates"].as_array().unwrap();
    assert!(
        candidates.iter().all(|c| {
            let c = c.as_str().unwrap();
            c.contains(" typ relay") || c.contains(" typ host")
        }),
        "a server-reflexive candidate got through the firewall: {view}"
    );
    ada.quit().await.unwrap();
    bea.quit().await.unwrap();
    assert_eq!(topology.stray_packets().unwrap(), 0);
    drop(server);
    pc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_whose_network_blocks_udp_connects_through_turn_over_tcp_or_tls() {
    let test = "a_browser_whose_network_blocks_udp_connects_through_turn_over_tcp_or_tls";
    if !netns_available(test) || !browser_available(test) {
        return;
    }
    let pc = browsers_across_a_firewall(Outbound::NoUdp).await;
    let protocol = pc["relayProtocol"].as_str().unwrap_or_default();
    println!("UDP blocked: the browser relays over {protocol}");
    assert!(protocol == "tcp" || protocol == "tls", "{pc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_whose_network_lets_only_https_out_connects_through_turns_on_443() {
    let test = "a_browser_whose_network_lets_only_https_out_connects_through_turns_on_443";
    if !netns_available(test) || !browser_available(test) {
        return;
    }
    let pc = browsers_across_a_firewall(Outbound::OnlyTcp443).await;
    assert_eq!(pc["relayProtocol"], "tls", "{pc}");
}
