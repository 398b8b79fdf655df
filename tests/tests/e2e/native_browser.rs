//! The native peer (`weft-peer`, a real process on webrtc-rs) and real headless Chromium
//! (the WASM driver) in one network through the real signaling server: joining by invite
//! and by passphrase, messages both ways, `msg` to a browser, and a wrong passphrase on
//! the native side refused with a plain reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{Value, json};
use thirtyfour::prelude::*;
use weft_signal::Limits;
use weft_tests::mitm::local_ice_ip;
use weft_tests::native::{NativePeer, command, config_dir, run};
use weft_tests::{
    ChromeDriver, browser_available, js, start_server, wait_for, wait_message, wait_peer,
};

const WAIT: Duration = Duration::from_secs(60);

async fn state(browser: &WebDriver) -> anyhow::Result<Value> {
    js(
        browser,
        r#"const t = window.t || {}; const s = t.session;
           return { error: t.error ?? null, ownId: s ? (s.ownId ?? null) : null,
                    identity: s ? s.identity : null, peers: s ? s.peers() : [],
                    messages: t.messages || [], logs: t.logs || [] };"#,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_and_browser_talk_by_invite() {
    if !browser_available("native_and_browser_talk_by_invite") {
        return;
    }
    let server = start_server(Limits::default()).await.unwrap();
    let ip = local_ice_ip().unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let alice = driver.browser().await.unwrap();
    alice.goto(server.url()).await.unwrap();
    let invite = "g".repeat(43);
    weft_tests::start_join(&alice, &json!({ "invite": invite, "name": "Alice" }), "")
        .await
        .unwrap();

    let dir = config_dir("browser-invite").unwrap();
    let mut up = command(&server.ws_url(), &dir, ip).unwrap();
    let link = format!("{}#invite={invite}", server.url());
    up.args(["--invite", &link, "--name", "Nat", "up"]);
    let mut nat = NativePeer::spawn(up).unwrap();
    let me = nat.expect_event("identity", WAIT).await.unwrap();
    let seen = nat.expect_direct("Nat sees Alice", WAIT, |v| v["name"] == "Alice").await.unwrap();
    let alice_state = state(&alice).await.unwrap();
    assert_eq!(seen["safety_code"], alice_state["identity"]["shortCode"], "{seen}");
    let nat_in_browser = wait_peer(&alice, "Nat", &["direct"], WAIT).await.unwrap();
    assert_eq!(nat_in_browser["shortCode"], me["safety_code"]);

    // Browser -> native.
    let sent =
        js(&alice, "return window.t.session.sendMessage('hello from Chromium');").await.unwrap();
    assert_eq!(sent, 1);
    let got = nat.expect("the message", WAIT, |v| v["event"] == "message").await.unwrap();
    assert_eq!(got["text"], "hello from Chromium");
    assert_eq!(got["from"], "Alice");
    assert_eq!(got["trust"], "new", "{got}");

    // Native -> browser, with `msg` (a second native process, same identity and name).
    let mut msg = command(&server.ws_url(), &dir, ip).unwrap();
    msg.args(["--invite", &invite, "--name", "Nat", "msg", "Alice", "hello from weft-peer ✓"]);
    let (status, stdout, stderr) = run(msg, WAIT).await.unwrap();
    assert!(status.success(), "{stdout}\n{stderr}");
    let got = wait_message(&alice, "hello from weft-peer ✓", WAIT).await.unwrap();
    assert_eq!(got["name"], "Nat");
    // With its sender's trust: the key Alice pinned for Nat moments ago.
    assert_eq!(got["trust"], "known", "{got}");

    // Nat leaves cleanly; the browser drops it.
    assert!(nat.terminate(WAIT).await.unwrap().success());
    wait_for("the browser to see Nat leave", WAIT, || async {
        let s = state(&alice).await?;
        let left = s["peers"].as_array().is_some_and(|p| p.iter().all(|p| p["name"] != "Nat"));
        if left { Ok(Ok(())) } else { Ok(Err(s["peers"].to_string())) }
    })
    .await
    .unwrap();
    alice.quit().await.unwrap();
    server.shutdown(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_joins_by_passphrase_and_a_wrong_one_is_refused_clearly() {
    if !browser_available("native_joins_by_passphrase_and_a_wrong_one_is_refused_clearly") {
        return;
    }
    let server = start_server(Limits::default()).await.unwrap();
    let ip = local_ice_ip().unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let alice = driver.browser().await.unwrap();
    alice.goto(server.url()).await.unwrap();
    let network = format!("native-{}", std::process::id());
    let passphrase = "correct horse battery staple";
    let options = json!({ "network": network, "passphrase": passphrase, "name": "Alice" });
    weft_tests::start_join(&alice, &options, "").await.unwrap();

    // The right passphrase, from the environment: `msg` reaches the browser.
    let dir = config_dir("browser-pass").unwrap();
    let mut msg = command(&server.ws_url(), &dir, ip).unwrap();
    msg.env("WEFT_PASSPHRASE", passphrase);
    msg.args(["--network", &network, "--name", "Nat", "msg", "Alice", "by passphrase"]);
    let (status, stdout, stderr) = run(msg, WAIT).await.unwrap();
    assert!(status.success(), "{stdout}\n{stderr}");
    wait_message(&alice, "by passphrase", WAIT).await.unwrap();

    // A wrong passphrase, from a file: a plain reason and a failure exit.
    let wrong = dir.join("wrong-passphrase");
    std::fs::write(&wrong, "incorrect horse\n").unwrap();
    let mut msg = command(&server.ws_url(), &config_dir("browser-wrong").unwrap(), ip).unwrap();
    msg.arg("--passphrase-file").arg(&wrong);
    msg.args(["--network", &network, "--name", "Mallory", "msg", "Alice", "let me in"]);
    let (status, stdout, stderr) = run(msg, WAIT).await.unwrap();
    assert!(!status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("wrong passphrase"), "{stderr}");
    // The browser saw it refused too (in its event log: Mallory is gone by now), and got
    // nothing from it.
    let refused = wait_for("the browser to refuse Mallory", WAIT, || async {
        let events = js(&alice, "return window.t.events;").await?;
        let failed = events
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["type"] == "peer" && e["state"] == "failed");
        match failed {
            Some(p) => Ok(Ok(p.clone())),
            None => Ok(Err(events.to_string())),
        }
    })
    .await
    .unwrap();
    assert!(refused["reason"].as_str().unwrap_or("").contains("passphrase"), "{refused}");
    let s = state(&alice).await.unwrap();
    assert!(!s["messages"].as_array().unwrap().iter().any(|m| m["text"] == "let me in"));
    alice.quit().await.unwrap();
    server.shutdown(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(dir);
}
