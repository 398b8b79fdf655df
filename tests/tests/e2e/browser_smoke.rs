//! The served page in real headless Chromium: the WASM core loads, joins a network's room
//! through the real signaling server, and the member list follows two browsers joining
//! and one leaving; the page rejoins by itself when the server restarts; an offer shows
//! its sender's trust beside it (a first contact, a changed key).
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

/// Joins the page to the invite network `invite` as `name`, through the page's own join
/// (as its join form does), and waits until it is in the room.
async fn page_join(browser: &WebDriver, invite: &str, name: &str) -> anyhow::Result<String> {
    wait_for("the page to load", WAIT, || async {
        let ready = js(browser, "return !!window.weft;").await?;
        if ready == json!(true) { Ok(Ok(())) } else { Ok(Err("no window.weft yet".to_string())) }
    })
    .await?;
    let script = format!(
        "document.getElementById('display-name').value = {};
         window.offers = [];
         window.weft.on((ev) => {{ if (ev.type === 'offer') window.offers.push(ev); }});
         window.weft.join({{ invite: {} }});
         return 1;",
        json!(name),
        json!(invite)
    );
    js(browser, &script).await?;
    wait_joined(browser).await
}

/// The offers `browser`'s page lists from `from`: each badge's text and class, and the
/// `offer` events the page got from it.
async fn offers_from(browser: &WebDriver, from: &str) -> anyhow::Result<Value> {
    let script = format!(
        "const from = {};
         const shown = [...document.querySelectorAll('#offers li')]
           .filter((li) => li.dataset.peerId === from)
           .map((li) => {{ const b = li.querySelector('.trust');
                           return b ? {{ text: b.textContent, className: b.className }} : null; }});
         const events = window.offers.filter((ev) => ev.peerId === from)
           .map((ev) => ({{ trust: ev.trust ?? null, looksLike: ev.looksLike ?? null }}));
         return {{ shown, events }};",
        json!(from)
    );
    js(browser, &script).await
}

/// Once `from`'s page has an encrypted session with its one other member, it offers that
/// member one small file.
async fn offer_a_file_once_connected(from: &WebDriver) -> anyhow::Result<()> {
    let script = "const to = window.weft.session.peers()
          .filter((p) => p.state === 'direct' || p.state === 'relayed').map((p) => p.peerId);
        if (to.length !== 1) return to;
        window.weft.sendFiles([{ file: new File(['hello'], 'hello.txt'), path: 'hello.txt' }], to[0]);
        return true;";
    wait_for("an encrypted session to offer a file over", WAIT, || async {
        let sent = js(from, script).await?;
        if sent == json!(true) { Ok(Ok(())) } else { Ok(Err(sent.to_string())) }
    })
    .await
}

/// Waits until `browser` lists an offer from `from` with a badge; returns what
/// [`offers_from`] says.
async fn wait_offer_badge(browser: &WebDriver, from: &str) -> anyhow::Result<Value> {
    wait_for("an offer with its sender's trust", WAIT, || async {
        let seen = offers_from(browser, from).await?;
        let shown = seen["shown"].as_array().cloned().unwrap_or_default();
        let events = seen["events"].as_array().cloned().unwrap_or_default();
        if shown.len() == 1 && shown[0].is_object() && events.len() == 1 {
            Ok(Ok(seen))
        } else {
            Ok(Err(seen.to_string()))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_shows_its_senders_trust_and_a_changed_key_loudly() {
    if !browser_available("an_offer_shows_its_senders_trust_and_a_changed_key_loudly") {
        return;
    }
    let server = start_server(Limits::default()).await.unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let (alice, bob) = tokio::try_join!(driver.browser(), driver.browser()).unwrap();
    let invite = "w".repeat(43); // canonical base64url: the last character has no stray bits
    alice.goto(server.url()).await.unwrap();
    bob.goto(server.url()).await.unwrap();
    page_join(&alice, &invite, "Alice").await.unwrap();
    let bob_id = page_join(&bob, &invite, "Bob").await.unwrap();
    wait_peers(&alice, &[&bob_id]).await.unwrap();

    // A first contact: the offer says so, in the event and beside it on the page.
    offer_a_file_once_connected(&bob).await.unwrap();
    let first = wait_offer_badge(&alice, &bob_id).await.unwrap();
    assert_eq!(first["events"][0]["trust"], "new", "{first}");
    assert_eq!(first["shown"][0]["text"], "first contact", "{first}");
    assert!(first["shown"][0]["className"].as_str().unwrap().contains("trust-new"), "{first}");

    // "Bob" comes back with another key (another device, or someone taking his name): his
    // page leaves, forgets its stored key, and joins again as "Bob".
    js(&bob, "window.weft.leave(); return 1;").await.unwrap();
    bob.goto("about:blank").await.unwrap();
    bob.goto(server.url()).await.unwrap();
    weft_tests::forget_stored_key(&bob).await.unwrap();
    let new_id = page_join(&bob, &invite, "Bob").await.unwrap();
    wait_peers(&alice, &[&new_id]).await.unwrap();
    offer_a_file_once_connected(&bob).await.unwrap();
    let changed = wait_offer_badge(&alice, &new_id).await.unwrap();
    assert_eq!(changed["events"][0]["trust"], "changed", "{changed}");
    assert_eq!(changed["shown"][0]["text"], "⚠ key changed", "{changed}");
    let class = changed["shown"][0]["className"].as_str().unwrap();
    assert!(class.contains("trust-changed"), "{changed}");

    alice.quit().await.unwrap();
    bob.quit().await.unwrap();
    server.shutdown(Duration::from_secs(2)).await;
}
