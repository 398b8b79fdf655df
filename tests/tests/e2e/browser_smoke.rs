//! The served page in real headless Chromium: the WASM core loads, joins a network's room
//! through the real signaling server, and the member list follows two browsers joining
//! and one leaving; the page rejoins by itself when the server restarts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{Value, json};
use thirtyfour::prelude::*;
use weft_signal::Limits;
use weft_tests::{ChromeDriver, browser_available, js, start_server, wait_for};

const WAIT: Duration = Duration::from_secs(30);

/// The page's view: status, own id, and the members it lists.
async fn page_state(browser: &WebDriver) -> anyhow::Result<Value> {
    js(
        browser,
        r##"
        const s = window.weft && window.weft.session;
        return {
          status: document.body.dataset.status,
          detail: document.getElementById("status-detail")?.textContent ?? "",
          ownId: s ? (s.ownId ?? null) : null,
          listed: [...document.querySelectorAll("#peers li")].map((li) => li.dataset.peerId).sort(),
          apiPeers: s ? s.peerIds() : [],
        };
        "##,
    )
    .await
}

async fn wait_joined(browser: &WebDriver) -> anyhow::Result<String> {
    wait_for("the page to join its room", WAIT, || async {
        let state = page_state(browser).await?;
        match (state["status"].as_str(), state["ownId"].as_str()) {
            (Some("joined"), Some(id)) => Ok(Ok(id.to_string())),
            _ => Ok(Err(state.to_string())),
        }
    })
    .await
}

async fn wait_peers(browser: &WebDriver, expected: &[&str]) -> anyhow::Result<()> {
    let expected: Vec<Value> = expected.iter().map(|s| json!(s)).collect();
    wait_for("the member list", WAIT, || async {
        let state = page_state(browser).await?;
        let listed = state["listed"].as_array().cloned().unwrap_or_default();
        let api = state["apiPeers"].as_array().cloned().unwrap_or_default();
        if listed == expected && api == expected { Ok(Ok(())) } else { Ok(Err(state.to_string())) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_join_a_network_and_see_each_other() {
    if !browser_available("two_browsers_join_a_network_and_see_each_other") {
        return;
    }
    let server = start_server(Limits::default()).await.unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let (alice, bob) = tokio::try_join!(driver.browser(), driver.browser()).unwrap();

    // Alice starts a network with the button, as a person would.
    alice.goto(server.url()).await.unwrap();
    alice.query(By::Id("display-name")).first().await.unwrap().send_keys("Alice").await.unwrap();
    alice.find(By::Id("create")).await.unwrap().click().await.unwrap();
    let alice_id = wait_joined(&alice).await.unwrap();
    wait_peers(&alice, &[]).await.unwrap();
    let link = alice.find(By::Id("invite-link")).await.unwrap().prop("value").await.unwrap();
    let link = link.expect("an invite link");
    assert!(link.contains("#invite="), "{link}");
    let qr = alice.find(By::Css("#qr svg")).await;
    assert!(qr.is_ok(), "the invite is shown as a QR code");

    // Bob opens the link.
    bob.goto(&link).await.unwrap();
    let bob_id = wait_joined(&bob).await.unwrap();
    assert_ne!(alice_id, bob_id);
    wait_peers(&bob, &[&alice_id]).await.unwrap();

    // Once joined, the invite (the network's only secret) is out of both address bars and
    // so out of the history; a reload of the tab still rejoins the same network.
    for (who, page) in [("Alice", &alice), ("Bob", &bob)] {
        let href = js(page, "return location.href;").await.unwrap();
        assert!(!href.to_string().contains("invite"), "{who}'s address keeps the invite: {href}");
    }
    bob.refresh().await.unwrap();
    let bob_again = wait_joined(&bob).await.unwrap();
    assert_ne!(bob_again, bob_id, "a rejoin gets a new peer id");
    wait_peers(&bob, &[&alice_id]).await.unwrap();
    wait_peers(&alice, &[&bob_again]).await.unwrap();
    assert_eq!(server.state().metrics().connections.get(), 2);
    if let Some(dir) = std::env::var_os("WEFT_SCREENSHOT_DIR") {
        // For a person to look at: `WEFT_SCREENSHOT_DIR=/tmp/shots cargo xtask test smoke`.
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await; // let sessions settle (RTT shown)
        alice.screenshot(&dir.join("alice.png")).await.unwrap();
        bob.screenshot(&dir.join("bob.png")).await.unwrap();
    }

    // Bob leaves; Alice sees it.
    bob.find(By::Id("leave")).await.unwrap().click().await.unwrap();
    wait_peers(&alice, &[]).await.unwrap();
    let bob_state = page_state(&bob).await.unwrap();
    assert_eq!(bob_state["status"], "ready", "{bob_state}");

    alice.quit().await.unwrap();
    bob.quit().await.unwrap();
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_reconnects_after_the_server_restarts() {
    if !browser_available("the_page_reconnects_after_the_server_restarts") {
        return;
    }
    let server = start_server(Limits::default()).await.unwrap();
    let addr = server.local_addr();
    let driver = ChromeDriver::start().await.unwrap();
    let browser = driver.browser().await.unwrap();
    let invite = "Q".repeat(43); // canonical base64url: the last character carries no stray bits
    browser.goto(format!("{}#invite={invite}", server.url())).await.unwrap();
    let first_id = wait_joined(&browser).await.unwrap();

    server.shutdown(Duration::from_secs(2)).await;
    wait_for("the page to notice", WAIT, || async {
        let state = page_state(&browser).await?;
        if state["status"] == "reconnecting" { Ok(Ok(())) } else { Ok(Err(state.to_string())) }
    })
    .await
    .unwrap();

    // Same address, new process state: the page rejoins by itself.
    let server = weft_tests::start_server_at(addr, Limits::default()).await.unwrap();
    let second_id = wait_joined(&browser).await.unwrap();
    assert_ne!(first_id, second_id, "a new server hands out a new peer id");
    browser.quit().await.unwrap();
    server.shutdown(Duration::from_secs(2)).await;
}
