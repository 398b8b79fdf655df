//! Weft embedded in other pages, in real headless Chromium through the real signaling
//! server: the app served at a nested path (its workers are found beside the module, not
//! relative to the page) downloads a file, which keeps its name; a download writer worker
//! that cannot load fails the download with a plain reason (it once hung at 0 bytes);
//! `join()` against a server that cannot be reached rejects with a plain reason instead of
//! retrying forever.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use weft_signal::Limits;
use weft_tests::files::{
    Member, Net, Scratch, TestFile, WAIT, accept, call, create_invite, generate, hash_downloaded,
    send_files, start_join_with, upload, wait_complete, wait_event, wait_offer,
};
use weft_tests::{
    ChromeDriver, browser_available, js, start_server, start_server_serving, wait_for, web_root,
};

/// Alice and Bob joined through `server`, both on its page at `page`; runs `body`, then
/// quits both (printing their recent events if `body` failed) and fails with its error.
macro_rules! two_on {
    ($test:expr, $server:expr, $page:expr, |$net:ident| $body:expr) => {{
        let members = [Member::new("Alice"), Member::new("Bob")];
        let $net = Net::start_on($server, &members, $page).await.unwrap();
        let result: Result<()> = async { $body }.await;
        let failed = result.is_err();
        $net.close(failed).await;
        if let Err(e) = result {
            panic!("{}: {e:#}", $test);
        }
    }};
}

/// Alice offers `file` to Bob under `path`, and Bob accepts.
async fn offer_accepted(net: &Net, file: &TestFile, path: &str) -> Result<()> {
    let (alice, bob) = (&net.browsers[0], &net.browsers[1]);
    upload(alice, "f", &[file]).await?;
    let sent = send_files(alice, "f", &[(file, path)], &net.ids[1], WAIT).await?;
    let offer_id = sent.first().context("no offer")?["offerId"].clone();
    wait_offer(bob, &net.ids[0], &offer_id).await?;
    accept(bob, &net.ids[0], &offer_id).await
}

/// A web root holding the built app at `app/sub/page/` (as behind a reverse proxy's path
/// prefix): its versioned files linked from the real bundle, the page's references made
/// absolute.
fn nested_web_root(dir: &Path) -> Result<()> {
    let built = web_root();
    std::os::unix::fs::symlink(built.join("a"), dir.join("a"))?;
    let page = dir.join("app/sub/page");
    std::fs::create_dir_all(&page)?;
    let html = std::fs::read_to_string(built.join("index.html"))?;
    ensure!(html.contains("\"a/"), "index.html does not name its versioned files as expected");
    std::fs::write(page.join("index.html"), html.replace("\"a/", "\"/a/"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_at_a_nested_path_downloads_and_the_file_keeps_its_name() {
    let test = "the_app_at_a_nested_path_downloads_and_the_file_keeps_its_name";
    if !browser_available(test) {
        return;
    }
    let scratch = Scratch::new("nested").unwrap();
    let root = scratch.path().join("www");
    std::fs::create_dir_all(&root).unwrap();
    nested_web_root(&root).unwrap();
    let file = generate(scratch.path(), "report.bin", 300_000, 41).unwrap();
    let server = start_server_serving("127.0.0.1:0".parse().unwrap(), Limits::default(), root)
        .await
        .unwrap();
    two_on!(test, server, "app/sub/page/", |net| {
        let bob = &net.browsers[1];
        let url = bob.current_url().await?;
        ensure!(url.path() == "/app/sub/page/", "the page is at {url}");
        offer_accepted(&net, &file, "docs/report.bin").await?;
        wait_complete(bob, &file.root, WAIT).await?;
        ensure!(hash_downloaded(bob, &file.root, WAIT).await? == file.root, "bytes differ");
        let named = call(
            bob,
            &format!(
                "const f = await s.downloadedFile({}); return [f.name, f.size];",
                json!(file.root)
            ),
            WAIT,
        )
        .await?;
        ensure!(named == json!(["report.bin", file.size]), "downloadedFile gave {named}");
        Ok(())
    });
}

/// Copies `from` into `to`, leaving out files named in `skip`.
fn copy_without(from: &Path, to: &Path, skip: &[&str]) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if skip.contains(&name.as_str()) {
            continue;
        }
        if entry.file_type()?.is_dir() {
            copy_without(&entry.path(), &to.join(&name), skip)?;
        } else {
            std::fs::copy(entry.path(), to.join(&name))?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_writer_that_cannot_load_fails_the_download_plainly() {
    let test = "a_download_writer_that_cannot_load_fails_the_download_plainly";
    if !browser_available(test) {
        return;
    }
    let scratch = Scratch::new("no-writer").unwrap();
    let root = scratch.path().join("www");
    let writer = ["download-writer.js", "download-writer.js.br", "download-writer.js.gz"];
    copy_without(&web_root(), &root, &writer).unwrap();
    let file = generate(scratch.path(), "lost.bin", 100_000, 42).unwrap();
    let server = start_server_serving("127.0.0.1:0".parse().unwrap(), Limits::default(), root)
        .await
        .unwrap();
    two_on!(test, server, "", |net| {
        offer_accepted(&net, &file, "lost.bin").await?;
        let pred = format!("ev.type === 'file_failed' && ev.root === {}", json!(file.root));
        let complete = format!("ev.type === 'file_complete' && ev.root === {}", json!(file.root));
        let failed =
            wait_event(&net.browsers[1], "file_failed", &pred, Some(&complete), WAIT).await?;
        let reason = failed["reason"].as_str().unwrap_or_default();
        ensure!(
            reason.contains("download-writer.js") && reason.contains("could not be loaded"),
            "file_failed says {reason:?}"
        );
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_rejects_with_a_plain_reason_when_the_server_cannot_be_reached() {
    if !browser_available("join_rejects_with_a_plain_reason_when_the_server_cannot_be_reached") {
        return;
    }
    let server = start_server(Limits::default()).await.unwrap();
    let driver = ChromeDriver::start().await.unwrap();
    let browser = driver.browser().await.unwrap();
    browser.goto(server.url()).await.unwrap();
    // A port nothing listens on: every connection is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let invite = create_invite(&browser).await.unwrap();
    let options =
        json!({ "invite": invite, "name": "Alice", "server": format!("ws://{closed}/ws") });
    start_join_with(&browser, options).await.unwrap();
    let outcome = wait_for("join() to settle", WAIT, || async {
        let v = js(
            &browser,
            "const t = window.t; return { error: t.error, joined: !!t.session,
               statuses: t.events.filter((e) => e.type === 'status').map((e) => e.status) };",
        )
        .await?;
        Ok(if v["error"].is_string() || v["joined"] == true { Ok(v) } else { Err(v.to_string()) })
    })
    .await
    .unwrap();
    let error = outcome["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("cannot join: cannot reach the signaling server (3 attempts"),
        "join() settled with {outcome}"
    );
    let statuses = outcome["statuses"].as_array().cloned().unwrap_or_default();
    assert_eq!(statuses.last(), Some(&Value::from("closed")), "{outcome}");
    browser.quit().await.unwrap();
    server.shutdown(std::time::Duration::from_secs(2)).await;
}
