//! Encrypted sessions between real headless Chromium processes: the WASM driver's WebRTC
//! mesh, the HPKE handshake over the control channel, messages both ways, and a peer with
//! the wrong passphrase refused with a plain reason.
//!
//! The tests drive the documented JavaScript API (`WeftSession`) directly by importing the
//! module in the served page, so they do not depend on the page's UI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{Value, json};
use thirtyfour::prelude::*;
use weft_signal::Limits;
use weft_tests::{ChromeDriver, browser_available, js, start_server, wait_for};

const WAIT: Duration = Duration::from_secs(60);

async fn start_join(browser: &WebDriver, options: Value) -> anyhow::Result<()> {
    weft_tests::start_join(browser, &options, "").await
}

/// The session's own view: identity, peers, messages, and any join error.
async fn state(browser: &WebDriver) -> anyhow::Result<Value> {
    js(
        browser,
        r#"
        const t = window.t || {};
        const s = t.session;
        return {
          error: t.error ?? null,
          status: s ? s.status : null,
          ownId: s ? (s.ownId ?? null) : null,
          identity: s ? s.identity : null,
          peers: s ? s.peers() : [],
          messages: t.messages || [],
          logs: t.logs || [],
        };
        "#,
    )
    .await
}

/// Waits until `browser` sees `count` peers all in `state`, and returns them.
async fn wait_peers_in(
    browser: &WebDriver,
    count: usize,
    wanted: &[&str],
) -> anyhow::Result<Vec<Value>> {
    wait_for(&format!("{count} peers in state {wanted:?}"), WAIT, || async {
        let s = state(browser).await?;
        if let Some(e) = s["error"].as_str() {
            anyhow::bail!("join failed: {e}");
        }
        let peers = s["peers"].as_array().cloned().unwrap_or_default();
        let ok = peers.len() == count
            && peers.iter().all(|p| {
                wanted.contains(&p["state"].as_str().unwrap_or(""))
                    && (p["state"] == "failed"
                        || (p["shortCode"].is_string() && p["name"].is_string()))
            });
        if ok { Ok(Ok(peers)) } else { Ok(Err(format!("{} logs: {}", s["peers"], s["logs"]))) }
    })
    .await
}

async fn own_code(browser: &WebDriver) -> String {
    state(browser).await.unwrap()["identity"]["shortCode"].as_str().unwrap().to_string()
}

async fn send(browser: &WebDriver, text: &str, to: Option<&str>) -> anyhow::Result<u64> {
    let to = to.map_or("undefined".to_string(), |id| json!(id).to_string());
    let v = js(browser, &format!("return window.t.session.sendMessage({}, {to});", json!(text)))
        .await?;
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

/// Milliseconds from the join call to the first event matching `pred` (in page time).
async fn ms_to_event(browser: &WebDriver, pred: &str) -> Option<f64> {
    js(
        browser,
        &format!(
            "const e = window.t.events.find((ev) => {pred}); return e ? e.t - window.t.joinAt : null;"
        ),
    )
    .await
    .ok()?
    .as_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_join_by_invite_and_talk_encrypted() {
    if !browser_available("two_browsers_join_by_invite_and_talk_encrypted") {
        return;
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
    assert_eq!(invite.len(), 43, "{invite}");

    start_join(&alice, json!({ "invite": invite, "name": "Alice" })).await.unwrap();
    start_join(&bob, json!({ "invite": invite, "name": "Bob" })).await.unwrap();

    let (seen_by_alice, seen_by_bob) = match tokio::try_join!(
        wait_peers_in(&alice, 1, &["direct"]),
        wait_peers_in(&bob, 1, &["direct"])
    ) {
        Ok(views) => views,
        Err(e) => {
            let (a, b) = (state(&alice).await.unwrap(), state(&bob).await.unwrap());
            panic!("{e}\nalice: {a}\nbob: {b}");
        }
    };
    let (alice_code, bob_code) = (own_code(&alice).await, own_code(&bob).await);
    assert_ne!(alice_code, bob_code);
    assert_eq!(seen_by_alice[0]["shortCode"], bob_code, "{seen_by_alice:?}");
    assert_eq!(seen_by_bob[0]["shortCode"], alice_code, "{seen_by_bob:?}");
    assert_eq!(seen_by_alice[0]["name"], "Bob");
    assert_eq!(seen_by_bob[0]["name"], "Alice");
    assert_eq!(seen_by_alice[0]["trust"], "new");

    let t_direct = ms_to_event(&bob, r#"ev.type === "peer" && ev.state === "direct""#).await;
    let t_handshake =
        ms_to_event(&bob, r#"ev.type === "peer" && ev.state === "handshaking""#).await;
    let t_joined = ms_to_event(&bob, r#"ev.type === "joined""#).await;

    let sent_at = std::time::Instant::now();
    assert_eq!(send(&alice, "hello Bob, this is Alice", None).await.unwrap(), 1);
    let got = wait_message(&bob, "hello Bob, this is Alice").await.unwrap();
    assert_eq!(got["name"], "Alice");
    assert_eq!(got["peerId"], seen_by_bob[0]["peerId"]);
    let bob_id = seen_by_alice[0]["peerId"].as_str().unwrap().to_string();
    assert_eq!(send(&bob, "hi Alice 👋", None).await.unwrap(), 1);
    let got = wait_message(&alice, "hi Alice 👋").await.unwrap();
    assert_eq!(got["name"], "Bob");
    assert!(got["at"].as_f64().unwrap() > 1.6e12, "{got}");
    // Addressed to one peer.
    assert_eq!(send(&alice, "just for you", Some(&bob_id)).await.unwrap(), 1);
    wait_message(&bob, "just for you").await.unwrap();
    println!(
        "TIMING bob: join->joined {t_joined:?} ms, join->channel open (handshaking) \
         {t_handshake:?} ms, join->direct {t_direct:?} ms; two messages and back seen by \
         the test in {:?}",
        sent_at.elapsed()
    );

    // Addressing a peer that is not there throws a plain message.
    let err = js(
        &alice,
        r#"try { window.t.session.sendMessage("x", "nobody"); return null; }
           catch (e) { return String(e.message || e); }"#,
    )
    .await
    .unwrap();
    assert!(err.as_str().unwrap().contains("no peer"), "{err}");

    // Alice reloads: a new peer id, the same key (IndexedDB), and Bob's key already pinned
    // in her trust store (IndexedDB too). Bob sees her old id go and the new one come.
    let old_alice_id = seen_by_bob[0]["peerId"].clone();
    alice.goto(server.url()).await.unwrap();
    start_join(&alice, json!({ "invite": invite, "name": "Alice" })).await.unwrap();
    let again = wait_peers_in(&alice, 1, &["direct"]).await.unwrap();
    assert_eq!(own_code(&alice).await, alice_code, "the identity survives a reload");
    assert_eq!(again[0]["shortCode"], bob_code);
    assert_eq!(again[0]["trust"], "known", "Bob's key was pinned before the reload: {again:?}");
    let bob_view = wait_peers_in(&bob, 1, &["direct"]).await.unwrap();
    assert_ne!(bob_view[0]["peerId"], old_alice_id);
    assert_eq!(bob_view[0]["shortCode"], alice_code);
    assert_eq!(send(&bob, "welcome back", None).await.unwrap(), 1);
    wait_message(&alice, "welcome back").await.unwrap();

    // Bob leaves: Alice's view drops him.
    js(&bob, "window.t.session.leave(); return true;").await.unwrap();
    wait_for("Alice to see Bob leave", WAIT, || async {
        let s = state(&alice).await?;
        if s["peers"].as_array().is_some_and(Vec::is_empty) {
            Ok(Ok(()))
        } else {
            Ok(Err(s["peers"].to_string()))
        }
    })
    .await
    .unwrap();

    alice.quit().await.unwrap();
    bob.quit().await.unwrap();
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_passphrase_is_refused_with_a_plain_reason() {
    if !browser_available("a_wrong_passphrase_is_refused_with_a_plain_reason") {
        return;
    }
    let server = start_server(Limits::default()).await.unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let (alice, bob, mallory) =
        tokio::try_join!(driver.browser(), driver.browser(), driver.browser()).unwrap();
    for b in [&alice, &bob, &mallory] {
        b.goto(server.url()).await.unwrap();
    }
    let network = format!("team-{}", std::process::id());
    let right = json!({ "network": network, "passphrase": "correct horse battery staple" });
    let mut a = right.clone();
    a["name"] = json!("Alice");
    let mut b = right.clone();
    b["name"] = json!("Bob");
    start_join(&alice, a).await.unwrap();
    start_join(&bob, b).await.unwrap();
    let alice_sees = wait_peers_in(&alice, 1, &["direct"]).await.unwrap();
    wait_peers_in(&bob, 1, &["direct"]).await.unwrap();
    assert_eq!(alice_sees[0]["name"], "Bob");
    // The status said it was deriving the key first.
    let deriving =
        ms_to_event(&alice, r#"ev.type === "status" && ev.status === "deriving_key""#).await;
    assert!(deriving.is_some(), "no deriving_key status event");

    start_join(
        &mallory,
        json!({ "network": network, "passphrase": "incorrect horse", "name": "Mallory" }),
    )
    .await
    .unwrap();
    let refused = wait_peers_in(&mallory, 2, &["failed"]).await.unwrap();
    let derive_ms = js(
        &mallory,
        r#"const ev = window.t.events;
           const a = ev.find((e) => e.status === "deriving_key"), b = ev.find((e) => e.status === "connecting");
           return a && b ? b.t - a.t : null;"#,
    )
    .await
    .unwrap();
    println!(
        "TIMING passphrase key derivation (2x Argon2id) {derive_ms} ms; refused: {}",
        refused[0]["reason"]
    );
    for p in &refused {
        let reason = p["reason"].as_str().unwrap_or("");
        assert!(reason.contains("passphrase"), "{p}");
    }
    // The good ones see Mallory fail too, and keep their own session.
    let views = wait_for("Alice to see Mallory refused", WAIT, || async {
        let s = state(&alice).await?;
        let peers = s["peers"].as_array().cloned().unwrap_or_default();
        let failed = peers.iter().filter(|p| p["state"] == "failed").count();
        let direct = peers.iter().filter(|p| p["state"] == "direct").count();
        if failed == 1 && direct == 1 { Ok(Ok(peers)) } else { Ok(Err(s["peers"].to_string())) }
    })
    .await
    .unwrap();
    let mallory_seen = views.iter().find(|p| p["state"] == "failed").unwrap();
    assert!(mallory_seen["reason"].as_str().unwrap_or("").contains("passphrase"), "{views:?}");
    assert!(mallory_seen.get("shortCode").is_none(), "no key is learned from a refused peer");

    assert_eq!(send(&alice, "still here?", None).await.unwrap(), 1);
    wait_message(&bob, "still here?").await.unwrap();
    assert_eq!(send(&bob, "yes", None).await.unwrap(), 1);
    wait_message(&alice, "yes").await.unwrap();
    let mallory_state = state(&mallory).await.unwrap();
    assert!(mallory_state["messages"].as_array().unwrap().is_empty(), "{mallory_state}");

    for b in [alice, bob, mallory] {
        b.quit().await.unwrap();
    }
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_signaling_restart() {
    if !browser_available("sessions_survive_a_signaling_restart") {
        return;
    }
    let server = start_server(Limits::default()).await.unwrap();
    let addr = server.local_addr();
    let driver = ChromeDriver::start().await.unwrap();
    let (alice, bob) = tokio::try_join!(driver.browser(), driver.browser()).unwrap();
    alice.goto(server.url()).await.unwrap();
    bob.goto(server.url()).await.unwrap();
    let invite = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    start_join(&alice, json!({ "invite": invite, "name": "Alice" })).await.unwrap();
    start_join(&bob, json!({ "invite": invite, "name": "Bob" })).await.unwrap();
    wait_peers_in(&alice, 1, &["direct"]).await.unwrap();
    wait_peers_in(&bob, 1, &["direct"]).await.unwrap();
    // The link pings right after the handshake: an RTT shows up.
    wait_for("an RTT", WAIT, || async {
        let s = state(&alice).await?;
        if s["peers"][0]["rttMs"].is_number() { Ok(Ok(())) } else { Ok(Err(s.to_string())) }
    })
    .await
    .unwrap();

    // The server goes away: the encrypted session does not need it.
    server.shutdown(Duration::from_secs(2)).await;
    wait_for("Alice to notice", WAIT, || async {
        let s = state(&alice).await?;
        if s["status"] == "reconnecting" { Ok(Ok(())) } else { Ok(Err(s.to_string())) }
    })
    .await
    .unwrap();
    assert_eq!(send(&alice, "server is down", None).await.unwrap(), 1);
    wait_message(&bob, "server is down").await.unwrap();

    // It comes back: both rejoin under new ids, reconnect, and drop the old connection.
    let server = weft_tests::start_server_at(addr, Limits::default()).await.unwrap();
    for (me, other) in [(&alice, &bob), (&bob, &alice)] {
        wait_for("one direct peer, under its new id, after the restart", WAIT, || async {
            let (s, o) = (state(me).await?, state(other).await?);
            let peers = s["peers"].as_array().cloned().unwrap_or_default();
            let ok = s["status"] == "joined"
                && o["ownId"].is_string()
                && peers.len() == 1
                && peers[0]["state"] == "direct"
                && peers[0]["peerId"] == o["ownId"];
            if ok {
                Ok(Ok(()))
            } else {
                Ok(Err(format!(
                    "{} other: {}\nlogs: {}\nother logs: {}",
                    s["peers"], o["ownId"], s["logs"], o["logs"]
                )))
            }
        })
        .await
        .unwrap();
    }
    assert_eq!(send(&bob, "server is back", None).await.unwrap(), 1);
    wait_message(&alice, "server is back").await.unwrap();

    alice.quit().await.unwrap();
    bob.quit().await.unwrap();
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_key_under_a_known_name_is_flagged_until_accepted() {
    if !browser_available("a_changed_key_under_a_known_name_is_flagged_until_accepted") {
        return;
    }
    let server = start_server(Limits::default()).await.unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let (alice, bob) = tokio::try_join!(driver.browser(), driver.browser()).unwrap();
    let invite = "g".repeat(43);
    for (browser, name) in [(&alice, "Alice"), (&bob, "Bob")] {
        browser.goto(server.url()).await.unwrap();
        start_join(browser, json!({ "invite": invite, "name": name })).await.unwrap();
    }
    let seen = wait_peers_in(&alice, 1, &["direct"]).await.unwrap();
    assert_eq!(seen[0]["trust"], "new", "{seen:?}");
    let first_code = seen[0]["shortCode"].clone();

    // Alice compared safety codes with Bob and marks him verified.
    js(&alice, "window.t.session.verifyPeer(window.t.session.peers()[0].peerId); return 1;")
        .await
        .unwrap();
    wait_trust(&alice, "verified").await;

    // "Bob" comes back with another key (a new device, or an impostor using his name).
    bob.goto("about:blank").await.unwrap();
    bob.goto(server.url()).await.unwrap();
    weft_tests::forget_stored_key(&bob).await.unwrap();
    start_join(&bob, json!({ "invite": invite, "name": "Bob" })).await.unwrap();
    let changed = wait_trust(&alice, "changed").await;
    assert_ne!(changed["shortCode"], first_code, "a new key has a new safety code");
    // The session itself works (the key is authentic for *some* member of the network);
    // only the person can tell whether it is really Bob.
    assert_eq!(changed["state"], "direct");

    // Alice checks the new code with Bob and accepts it: known again, no longer flagged.
    js(&alice, "window.t.session.acceptNewKey(window.t.session.peers()[0].peerId); return 1;")
        .await
        .unwrap();
    wait_trust(&alice, "known").await;

    alice.quit().await.unwrap();
    bob.quit().await.unwrap();
    server.shutdown(Duration::from_secs(2)).await;
}

/// Waits until `browser` has exactly one peer, named, with trust `wanted`; returns it.
async fn wait_trust(browser: &WebDriver, wanted: &str) -> Value {
    wait_for(&format!("one peer with trust {wanted:?}"), WAIT, || async {
        let s = state(browser).await?;
        let peers = s["peers"].as_array().cloned().unwrap_or_default();
        match peers.as_slice() {
            [p] if p["trust"] == wanted && p["name"].is_string() => Ok(Ok(p.clone())),
            _ => Ok(Err(s["peers"].to_string())),
        }
    })
    .await
    .unwrap()
}

/// A connection whose path dies while both peers stay in the room: the side that hears
/// nothing for 15 s says so, then builds a new connection on its own, and the peers talk
/// again without anyone reloading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_path_is_noticed_and_replaced_by_a_new_connection() {
    if !browser_available("a_dead_path_is_noticed_and_replaced_by_a_new_connection") {
        return;
    }
    let server = start_server(Limits::default()).await.unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let (alice, bob) = tokio::try_join!(driver.browser(), driver.browser()).unwrap();
    alice.goto(server.url()).await.unwrap();
    bob.goto(server.url()).await.unwrap();
    let invite = "Q".repeat(43);
    start_join(&alice, json!({ "invite": invite, "name": "Alice" })).await.unwrap();
    start_join(&bob, json!({ "invite": invite, "name": "Bob" })).await.unwrap();
    let peers = wait_peers_in(&alice, 1, &["direct"]).await.unwrap();
    wait_peers_in(&bob, 1, &["direct"]).await.unwrap();
    let bob_id = peers[0]["peerId"].as_str().unwrap().to_string();

    // Alice's connection to Bob goes deaf (the test hook drops what it delivers).
    js(&alice, &format!("window.t.session.debugMutePeer({}); return true;", json!(bob_id)))
        .await
        .unwrap();
    let failed = wait_for("Alice to report Bob silent", Duration::from_secs(40), || async {
        let s = state(&alice).await?;
        let events = js(
            &alice,
            r#"return window.t.events.filter((e) => e.type === "peer" && e.state === "failed");"#,
        )
        .await?;
        match events.as_array().and_then(|a| a.first()).cloned() {
            Some(e) => Ok(Ok(e)),
            None => Ok(Err(s["peers"].to_string())),
        }
    })
    .await
    .unwrap();
    assert!(failed["reason"].as_str().unwrap().contains("stopped answering"), "{failed}");

    // Without any reload, both come back to a working session, and messages flow.
    wait_peers_in(&alice, 1, &["direct"]).await.unwrap();
    wait_peers_in(&bob, 1, &["direct"]).await.unwrap();
    let after = js(
        &alice,
        r#"const i = window.t.events.findIndex((e) => e.type === "peer" && e.state === "failed");
           return window.t.events.slice(i).some((e) => e.type === "peer" && e.state === "direct");"#,
    )
    .await
    .unwrap();
    assert_eq!(after, json!(true), "Alice saw Bob direct again after the failure");
    assert_eq!(send(&alice, "still here?", None).await.unwrap(), 1);
    wait_message(&bob, "still here?").await.unwrap();
    assert_eq!(send(&bob, "yes", None).await.unwrap(), 1);
    wait_message(&alice, "yes").await.unwrap();
}

/// An ICE restart (what the page does when ICE fails) renegotiates the path with fresh ICE
/// credentials under a working session: the encrypted session carries on, with no new
/// handshake and no message lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ice_restart_keeps_the_session() {
    if !browser_available("an_ice_restart_keeps_the_session") {
        return;
    }
    let server = start_server(Limits::default()).await.unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let (alice, bob) = tokio::try_join!(driver.browser(), driver.browser()).unwrap();
    alice.goto(server.url()).await.unwrap();
    bob.goto(server.url()).await.unwrap();
    let invite = "Q".repeat(43);
    let setup = weft_tests::INSTRUMENT_PEER_CONNECTIONS;
    weft_tests::start_join(&alice, &json!({ "invite": invite, "name": "Alice" }), setup)
        .await
        .unwrap();
    weft_tests::start_join(&bob, &json!({ "invite": invite, "name": "Bob" }), setup).await.unwrap();
    wait_peers_in(&alice, 1, &["direct"]).await.unwrap();
    wait_peers_in(&bob, 1, &["direct"]).await.unwrap();
    let ufrag = r#"const pc = window.__pcs.at(-1).pc;
        const m = /a=ice-ufrag:(\S+)/.exec(pc.localDescription ? pc.localDescription.sdp : "");
        return { ufrag: m ? m[1] : null, ice: pc.iceConnectionState, signaling: pc.signalingState,
                 handshakes: window.t.events.filter((e) => e.type === "peer" && e.state === "handshaking").length };"#;
    let before = js(&alice, ufrag).await.unwrap();
    assert!(before["ufrag"].is_string(), "{before}");

    // Either side may restart; here the polite one must get its restart through the
    // impolite one's offer, the harder path. Restart on both to cover crossing offers.
    for page in [&alice, &bob] {
        js(page, "window.__pcs.at(-1).pc.restartIce(); return true;").await.unwrap();
    }
    let after = wait_for("a new ICE ufrag, connected and stable", WAIT, || async {
        let now = js(&alice, ufrag).await?;
        let done = now["ufrag"] != before["ufrag"]
            && now["signaling"] == "stable"
            && ["connected", "completed"].contains(&now["ice"].as_str().unwrap_or(""));
        Ok(if done { Ok(now) } else { Err(now.to_string()) })
    })
    .await
    .unwrap();
    assert_eq!(after["handshakes"], before["handshakes"], "no new handshake: {after}");
    let peers = state(&alice).await.unwrap()["peers"].clone();
    assert_eq!(peers[0]["state"], "direct", "{peers}");
    assert_eq!(send(&alice, "after the restart", None).await.unwrap(), 1);
    wait_message(&bob, "after the restart").await.unwrap();
    assert_eq!(send(&bob, "got it", None).await.unwrap(), 1);
    wait_message(&alice, "got it").await.unwrap();
}

/// One browser profile (one stored key in IndexedDB) shows a key of each network's own,
/// the same one whenever it comes back: members of two networks cannot tell by key that
/// they meet the same browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_has_a_key_of_its_own_in_each_network() {
    if !browser_available("a_browser_has_a_key_of_its_own_in_each_network") {
        return;
    }
    let server = start_server(Limits::default()).await.unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let alice = driver.browser().await.unwrap();
    alice.goto(server.url()).await.unwrap();
    let mut seen = Vec::new();
    for invite in ["Q", "g", "Q"].map(|c| c.repeat(43)) {
        start_join(&alice, json!({ "invite": invite, "name": "Alice" })).await.unwrap();
        let fingerprint = wait_for("joined", WAIT, || async {
            let s = state(&alice).await?;
            if let Some(e) = s["error"].as_str() {
                anyhow::bail!("join failed: {e}");
            }
            match s["identity"]["fingerprint"].as_str() {
                Some(fp) if s["status"] == "joined" => Ok(Ok(fp.to_string())),
                _ => Ok(Err(s.to_string())),
            }
        })
        .await
        .unwrap();
        js(&alice, "window.t.session.leave(); return true;").await.unwrap();
        seen.push(fingerprint);
    }
    assert_ne!(seen[0], seen[1], "{seen:?}");
    assert_eq!(seen[0], seen[2], "{seen:?}");
    alice.quit().await.unwrap();
    server.shutdown(Duration::from_secs(2)).await;
}
