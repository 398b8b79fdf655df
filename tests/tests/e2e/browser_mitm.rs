//! Issue 3's man-in-the-middle test: two real Chromium pages join one invite network
//! through [`MitmProxy`], a signaling relay that answers every offer itself and so sits
//! between them on two DTLS connections with its own fingerprints, relaying every
//! data-channel byte. Members seal their signaling payloads, so the proxy must be run by a
//! member (it holds the invite) to read and answer them at all; the handshake is bound to
//! both DTLS fingerprints, so the peers must still refuse the session and say why. A
//! control test makes the same pages connect through a proxy without the secret: it sees
//! only sealed payloads, intercepts nothing, and the pages reach "direct", so the attack
//! test cannot pass vacuously.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{Value, json};
use thirtyfour::prelude::*;
use weft_core::network::{NETWORK_SECRET_LEN, Network, NetworkSecret};
use weft_signal::Limits;
use weft_tests::mitm::{MitmProxy, MitmStats};
use weft_tests::{ChromeDriver, browser_available, js, start_server, wait_for};

const WAIT: Duration = Duration::from_secs(45);

/// A fresh invite: 32 random bytes, base64url without padding.
fn random_invite() -> String {
    let mut secret = [0u8; NETWORK_SECRET_LEN];
    let mut file = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut file, &mut secret).unwrap();
    NetworkSecret::from_random_bytes(secret).to_invite().to_string()
}

/// Opens the page and starts recording every peer state it renders: each render of the
/// peer list adds new `li` elements, and a `MutationObserver` keeps their state and
/// reason, so a state that lasts a single render is not missed.
async fn open_page(browser: &WebDriver, url: &str) {
    browser.goto(url).await.unwrap();
    wait_for("the page to load its core", WAIT, || async {
        let ready =
            js(browser, "return !!(window.weft && document.getElementById('peers'))").await?;
        if ready == json!(true) { Ok(Ok(())) } else { Ok(Err(ready.to_string())) }
    })
    .await
    .unwrap();
    js(
        browser,
        r#"
        window.__weftStates = [];
        new MutationObserver((records) => {
          for (const r of records) for (const n of r.addedNodes) {
            if (n.nodeType !== 1 || !n.dataset || !n.dataset.state) continue;
            window.__weftStates.push({
              peerId: n.dataset.peerId ?? null,
              state: n.dataset.state,
              reason: n.querySelector(".reason")?.textContent ?? null,
            });
          }
        }).observe(document.getElementById("peers"), { childList: true, subtree: true });
        // A log of every RTCPeerConnection's life, printed when a test fails.
        window.__weftRtc = [];
        const Native = window.RTCPeerConnection;
        window.RTCPeerConnection = function (...args) {
          const pc = new Native(...args);
          const n = window.__weftRtc.length;
          const log = [];
          window.__weftRtc.push(log);
          const t0 = performance.now();
          const rec = (what) => log.push(`${Math.round(performance.now() - t0)}ms ${what}`);
          for (const ev of ["signalingstatechange", "iceconnectionstatechange", "connectionstatechange"]) {
            pc.addEventListener(ev, () => rec(`${ev} sig=${pc.signalingState} ice=${pc.iceConnectionState} conn=${pc.connectionState}`));
          }
          pc.addEventListener("icecandidate", (e) => rec(`local candidate ${e.candidate?.candidate ?? "(end)"}`));
          for (const m of ["setLocalDescription", "setRemoteDescription", "addIceCandidate"]) {
            const orig = pc[m].bind(pc);
            pc[m] = (...a) => {
              const arg = a[0];
              const what = m === "addIceCandidate" ? (arg?.candidate ?? "(null)") : (arg?.type ?? "(implicit)");
              rec(`${m} ${what}`);
              return orig(...a).then(
                (v) => { rec(`${m} ${what} ok`); return v; },
                (e) => { rec(`${m} ${what} failed: ${e}`); throw e; });
            };
          }
          rec(`pc #${n} created`);
          return pc;
        };
        window.RTCPeerConnection.prototype = Native.prototype;
        return true;
        "#,
    )
    .await
    .unwrap();
}

/// Joins the invite network through the signaling server at `server` (a ws:// URL).
async fn join(browser: &WebDriver, invite: &str, server: &str) {
    join_with(browser, json!({ "invite": invite }), server).await;
}

/// Joins with these options (an invite, or a network name and passphrase) through `server`.
async fn join_with(browser: &WebDriver, mut options: Value, server: &str) {
    options["server"] = json!(server);
    js(browser, &format!("window.weft.join({options}); return true;")).await.unwrap();
}

/// The page's status, its current peers, and every peer state it rendered so far.
async fn page_state(browser: &WebDriver) -> anyhow::Result<Value> {
    js(
        browser,
        r#"
        return {
          status: document.body.dataset.status ?? null,
          peers: (window.weft?.peers ?? []).map((p) => ({
            peerId: p.peerId, state: p.state, reason: p.reason ?? null,
          })),
          history: window.__weftStates ?? [],
        };
        "#,
    )
    .await
}

fn established(state: &str) -> bool {
    matches!(state, "direct" | "relayed" | "established")
}

/// Every `(state, reason)` the page ever showed, current ones included.
fn seen(state: &Value) -> Vec<(String, String)> {
    let mut all = Vec::new();
    for key in ["history", "peers"] {
        for p in state[key].as_array().into_iter().flatten() {
            let s = p["state"].as_str().unwrap_or_default().to_owned();
            let r = p["reason"].as_str().unwrap_or_default().to_owned();
            all.push((s, r));
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signaling_mitm_that_substitutes_fingerprints_is_refused() {
    if !browser_available("a_signaling_mitm_that_substitutes_fingerprints_is_refused") {
        return;
    }
    let server = start_server(Limits::default()).await.unwrap();
    let invite = random_invite();
    let network = Network::from_invite(&invite).unwrap();
    let proxy = MitmProxy::start_member(&server.ws_url(), &network).await.unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let (alice, bob) = tokio::try_join!(driver.browser(), driver.browser()).unwrap();
    for browser in [&alice, &bob] {
        open_page(browser, &server.url()).await;
        join(browser, &invite, &proxy.ws_url()).await;
    }

    // Both refuse, saying the connection was tampered with.
    for (name, browser) in [("alice", &alice), ("bob", &bob)] {
        let state = wait_for("the peer to fail with a reason", WAIT, || async {
            let state = page_state(browser).await?;
            let refused =
                seen(&state).iter().any(|(s, r)| s == "failed" && r.contains("tampered with"));
            if refused { Ok(Ok(state)) } else { Ok(Err(state.to_string())) }
        })
        .await
        .unwrap_or_else(|e| panic!("{name}: {e:#}; proxy: {:?}", proxy.stats()));
        println!("{name}: {state}");
    }
    // Give a wrongly accepted session time to show up, then check nothing was accepted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut reasons = Vec::new();
    for (name, browser) in [("alice", &alice), ("bob", &bob)] {
        let state = page_state(browser).await.unwrap();
        let all = seen(&state);
        assert!(
            all.iter().all(|(s, _)| !established(s)),
            "{name} accepted a session through the proxy: {state}"
        );
        reasons.extend(all.into_iter().filter(|(s, _)| s == "failed").map(|(_, r)| r));
    }
    // One side detects the substitution, the other hears that its peer refused.
    assert!(
        reasons.iter().any(|r| r.starts_with("peer is not in the same network")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("rejected the handshake")), "{reasons:?}");

    // The proxy really was in the middle: it answered the offers, opened both sides'
    // channels, and relayed the handshake bytes between them.
    let stats = proxy.stats();
    println!("proxy: {stats:?}");
    assert!(stats.offers_intercepted >= 2, "{stats:?}");
    assert!(stats.answers_sent >= 2, "{stats:?}");
    assert!(stats.channels_opened >= 2, "{stats:?}");
    assert!(stats.messages_relayed > 0 && stats.bytes_relayed > 0, "{stats:?}");
    assert!(stats.fingerprints.len() >= 2, "{stats:?}");

    alice.quit().await.unwrap();
    bob.quit().await.unwrap();
    drop(proxy);
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mitm_without_the_secret_sees_only_sealed_payloads_and_the_pages_connect_directly() {
    let test = "a_mitm_without_the_secret_sees_only_sealed_payloads_and_the_pages_connect_directly";
    if !browser_available(test) {
        return;
    }
    let stats = a_mitm_forwards_what_it_cannot_read(json!({ "invite": random_invite() })).await;
    assert_eq!((stats.candidates_consumed, stats.descriptions_dropped), (0, 0), "{stats:?}");
}

/// The same in a passphrase network, whose room anyone who knows the name can find: the
/// proxy in the server's seat sees each pair's PAKE messages and sealed payloads only. It
/// answers no offer, so no connection to it opens and no handshake message reaches it:
/// nothing to try passphrase guesses against offline (before the PAKE it answered every
/// offer, which passphrase networks sent in clear, and received the members' Inits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mitm_in_a_passphrase_network_gets_no_handshake_message_to_guess_against() {
    let test = "a_mitm_in_a_passphrase_network_gets_no_handshake_message_to_guess_against";
    if !browser_available(test) {
        return;
    }
    let network = format!("mitm-{}", std::process::id());
    let options = json!({ "network": network, "passphrase": "correct horse battery staple" });
    let stats = a_mitm_forwards_what_it_cannot_read(options).await;
    assert_eq!((stats.channels_opened, stats.messages_relayed), (0, 0), "{stats:?}");
}

/// Two pages join with `options` through a proxy in the signaling path, connect directly,
/// and the proxy intercepted no offer and sent no answer. Returns what it saw.
async fn a_mitm_forwards_what_it_cannot_read(options: Value) -> MitmStats {
    let server = start_server(Limits::default()).await.unwrap();
    let proxy = MitmProxy::start(&server.ws_url()).await.unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let (alice, bob) = tokio::try_join!(driver.browser(), driver.browser()).unwrap();
    for browser in [&alice, &bob] {
        open_page(browser, &server.url()).await;
        join_with(browser, options.clone(), &proxy.ws_url()).await;
    }
    for (name, browser) in [("alice", &alice), ("bob", &bob)] {
        let state = wait_for("the peer to connect directly", WAIT, || async {
            let state = page_state(browser).await?;
            let direct = state["peers"]
                .as_array()
                .is_some_and(|p| p.len() == 1 && p[0]["state"] == "direct");
            if direct { Ok(Ok(state)) } else { Ok(Err(state.to_string())) }
        })
        .await;
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                for (name, browser) in [("alice", &alice), ("bob", &bob)] {
                    let log = js(browser, "return window.__weftRtc").await.unwrap();
                    println!("{name} RTCPeerConnection log: {log:#}");
                }
                panic!("{name}: {e:#}");
            }
        };
        println!("{name}: {state}");
        let failed = seen(&state).into_iter().filter(|(s, _)| s == "failed").collect::<Vec<_>>();
        assert!(failed.is_empty(), "{name} failed on the way: {failed:?}");
    }
    // It forwarded every offer, answer and candidate, and could read none of them.
    let stats = proxy.stats();
    assert_eq!((stats.offers_intercepted, stats.answers_sent), (0, 0), "{stats:?}");
    alice.quit().await.unwrap();
    bob.quit().await.unwrap();
    server.shutdown(Duration::from_secs(2)).await;
    stats
}
