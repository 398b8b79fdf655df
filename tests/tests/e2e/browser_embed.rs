//! Weft embedded in other pages, in real headless Chromium through the real signaling
//! server: the app served at a nested path (its workers are found beside the module, not
//! relative to the page) downloads a file, which keeps its name, and `leave()` then closes
//! every connection and ends the writer worker; a download writer worker
//! that cannot load fails the download with a plain reason (it once hung at 0 bytes);
//! `join()` against a server that cannot be reached rejects with a plain reason instead of
//! retrying forever; the npm package, installed from its tarball into `examples/plain`
//! served by a second server (another origin, let in by `allowed_origins`), exchanges
//! messages and a file with a page of the Weft app; `examples/vite` built by Vite talks
//! with it from another origin too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use weft_signal::Limits;
use weft_tests::files::{
    Member, Net, Scratch, TestFile, WAIT, accept, call, create_invite, generate, hash_downloaded,
    is_file_event, offered_keys, send_files, start_join_with, upload, wait_complete, wait_event,
    wait_offer,
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
async fn offer_accepted(net: &Net, file: &TestFile, path: &str) -> Result<String> {
    let (alice, bob) = (&net.browsers[0], &net.browsers[1]);
    upload(alice, "f", &[file]).await?;
    let sent = send_files(alice, "f", &[(file, path)], &net.ids[1], WAIT).await?;
    let offer_id = sent.first().context("no offer")?["offerId"].clone();
    let offer = wait_offer(bob, &net.ids[0], &offer_id).await?;
    accept(bob, &net.ids[0], &offer_id).await?;
    offered_keys(&offer)?.remove(path).context("offer without the path")
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

/// `leave()` closes the signaling socket and every peer connection, ends the download
/// writer worker and clears every timer: counted by wrapping the browser's own
/// `close`/`terminate` (the session made them before the wrappers; it still calls these
/// methods on them); the timers the module set and that neither fired nor were cleared are
/// `window.t.timers` (the test page's wrappers of `setTimeout`/`setInterval`, in place
/// before the module loaded). Timers are looked at right after `leave()` and again once
/// the closing connections' callbacks have run: a timer armed by one of them shows then.
async fn left_releases_everything(browser: &thirtyfour::WebDriver) -> Result<()> {
    let before = js(browser, "return [...window.t.timers.values()];").await?;
    ensure!(before.as_array().is_some_and(|t| !t.is_empty()), "no timers seen before: {before}");
    let v = js(
        browser,
        "const calls = { ws: 0, worker: 0 };
         const wrap = (proto, name, key) => {
           const original = proto[name];
           proto[name] = function (...args) { calls[key] += 1; return original.apply(this, args); };
         };
         wrap(WebSocket.prototype, 'close', 'ws');
         wrap(Worker.prototype, 'terminate', 'worker');
         window.t.session.leave();
         const pcs = window.t.pcs.map((pc) => pc.signalingState);
         return { calls, pcs, status: window.t.session.status,
                  timers: [...window.t.timers.values()] };",
    )
    .await?;
    let pcs = v["pcs"].as_array().context("no connections recorded")?;
    ensure!(!pcs.is_empty() && pcs.iter().all(|s| s == "closed"), "after leave(): {v}");
    ensure!(v["calls"]["ws"] == 1 && v["calls"]["worker"] == 1, "after leave(): {v}");
    ensure!(v["status"] == "closed", "after leave(): {v}");
    ensure!(v["timers"] == json!([]), "timers left after leave(): {}", v["timers"]);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let later = js(browser, "return [...window.t.timers.values()];").await?;
    ensure!(later == json!([]), "timers armed after leave(): {later}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_at_a_nested_path_downloads_the_file_keeps_its_name_and_leave_releases_all() {
    let test = "the_app_at_a_nested_path_downloads_the_file_keeps_its_name_and_leave_releases_all";
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
        left_releases_everything(bob).await
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
        // Followed by the key it was offered under: it fails before its root is known.
        let key = offer_accepted(&net, &file, "lost.bin").await?;
        let pred = is_file_event("file_failed", &key);
        let complete = is_file_event("file_complete", &key);
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

/// The npm package's tarball: `WEFT_NPM_PACKAGE`, or where `cargo xtask package` puts it.
fn npm_package() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("WEFT_NPM_PACKAGE") {
        return Some(path.into());
    }
    let dir = web_root().parent()?.join("npm");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
}

/// `examples/plain` with the package installed from `tarball` by npm, in `site`.
fn example_site(site: &Path, tarball: &Path) -> Result<()> {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/plain");
    for file in ["index.html", "main.js"] {
        std::fs::copy(example.join(file), site.join(file))?;
    }
    std::fs::write(site.join("package.json"), r#"{ "name": "site", "private": true }"#)?;
    let out = std::process::Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--offline"])
        .arg(tarball)
        .current_dir(site)
        .output()
        .context("cannot run npm (cargo xtask setup installs it)")?;
    ensure!(out.status.success(), "npm install failed: {}", String::from_utf8_lossy(&out.stderr));
    ensure!(
        site.join("node_modules/weft/download-writer.js").is_file(),
        "no workers in the package"
    );
    Ok(())
}

/// An example site on one server (its origin let in) and the Weft app on another: Bob
/// joined a new network in the app, Alice opened the site's page with the invite.
struct TwoOrigins {
    host: weft_signal::Server,
    weft: weft_signal::Server,
    _driver: ChromeDriver,
    alice: thirtyfour::WebDriver,
    bob: thirtyfour::WebDriver,
}

impl TwoOrigins {
    async fn start(site: std::path::PathBuf, alice_name: &str) -> Result<Self> {
        let any = "127.0.0.1:0".parse()?;
        let host = start_server_serving(any, Limits::default(), site).await?;
        let origin = host.url().trim_end_matches('/').to_string();
        let limits = Limits { allowed_origins: vec![origin], ..Limits::default() };
        let weft = start_server_serving(any, limits, web_root()).await?;
        let driver = ChromeDriver::start().await?;
        let (alice, bob) = (driver.browser().await?, driver.browser().await?);
        bob.goto(weft.url()).await?;
        let invite = create_invite(&bob).await?;
        start_join_with(&bob, json!({ "invite": invite, "name": "Bob" })).await?;
        let (site_url, ws) = (host.url(), weft.ws_url());
        alice.goto(&format!("{site_url}?server={ws}&name={alice_name}#invite={invite}")).await?;
        Ok(Self { host, weft, _driver: driver, alice, bob })
    }

    /// Quits both browsers and stops both servers; panics with `result`'s error.
    async fn finish(self, test: &str, result: Result<()>) {
        if result.is_err() {
            let example =
                js(&self.alice, "return window.example && window.example.events.slice(-20);").await;
            println!(
                "--- example page: {example:?}\n--- app page: {}",
                weft_tests::files::diagnostics(&self.bob).await
            );
        }
        let _ = (self.alice.quit().await, self.bob.quit().await);
        if let Err(e) = result {
            panic!("{test}: {e:#}");
        }
        self.weft.shutdown(std::time::Duration::from_secs(2)).await;
        self.host.shutdown(std::time::Duration::from_secs(2)).await;
    }
}

/// Whether `what` is there; if not, skips the test, or fails it where browser tests are
/// required.
fn built(test: &str, there: bool, what: &str) -> bool {
    if !there {
        if std::env::var_os("WEFT_REQUIRE_BROWSER").is_some() {
            panic!("{test}: {what} is not built (cargo xtask package)");
        }
        println!("SKIPPED {test}: {what} is not built (cargo xtask package)");
    }
    there
}

/// `examples/vite` built by Vite (`cargo xtask package` builds it).
fn vite_build() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/vite/dist")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_package_built_by_vite_talks_with_the_app_from_another_origin() {
    let test = "the_package_built_by_vite_talks_with_the_app_from_another_origin";
    if !browser_available(test) {
        return;
    }
    let site = vite_build();
    if !built(test, site.join("index.html").is_file(), "examples/vite") {
        return;
    }
    let two = TwoOrigins::start(site, "Vita").await.unwrap();
    let result: Result<()> = async {
        let (alice, bob) = (&two.alice, &two.bob);
        weft_tests::files::wait_connected(bob, 1).await?;
        call(bob, "return s.sendMessage('hello, bundled page');", WAIT).await?;
        wait_for("the bundled page to get the message", WAIT, || async {
            let v = js(
                alice,
                "const e = window.example || {};
                 return { error: e.error ?? null,
                          got: (e.events || []).some((ev) => ev.type === 'message'
                                                        && ev.text === 'hello, bundled page') };",
            )
            .await?;
            if let Some(e) = v["error"].as_str() {
                anyhow::bail!("the Vite example could not join: {e}");
            }
            Ok(if v["got"] == true { Ok(()) } else { Err(v.to_string()) })
        })
        .await
    }
    .await;
    two.finish(test, result).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_package_on_another_origin_talks_and_receives_a_file_from_the_app() {
    let test = "the_package_on_another_origin_talks_and_receives_a_file_from_the_app";
    if !browser_available(test) {
        return;
    }
    let tarball = npm_package().filter(|p| p.is_file());
    let Some(tarball) = tarball else {
        built(test, false, "the npm package");
        return;
    };
    let scratch = Scratch::new("site").unwrap();
    let site = scratch.path().join("www");
    std::fs::create_dir_all(&site).unwrap();
    example_site(&site, &tarball).unwrap();
    let file = generate(scratch.path(), "notes.bin", 200_000, 43).unwrap();
    let two = TwoOrigins::start(site, "Alice").await.unwrap();
    let result: Result<()> = async {
        let (alice, bob) = (&two.alice, &two.bob);
        let alice_id = wait_for("the example page to join", WAIT, || async {
            let v = js(
                alice,
                "const e = window.example || {};
                 return { error: e.error ?? null, id: e.session ? e.session.ownId : null };",
            )
            .await?;
            if let Some(e) = v["error"].as_str() {
                anyhow::bail!("the example could not join: {e}");
            }
            Ok(v["id"].as_str().map(str::to_string).ok_or_else(|| v.to_string()))
        })
        .await?;
        weft_tests::files::wait_connected(bob, 1).await?;
        wait_for("the example's session with Bob", WAIT, || async {
            let n = js(alice, "return window.example.session.sendMessage('hello from afar');")
                .await
                .unwrap_or(Value::Null);
            Ok(if n == 1 { Ok(()) } else { Err(n.to_string()) })
        })
        .await?;
        let pred = "ev.type === 'message' && ev.text === 'hello from afar'";
        wait_event(bob, "the example's message", pred, None, WAIT).await?;
        upload(bob, "f", &[&file]).await?;
        send_files(bob, "f", &[(&file, "shared/notes.bin")], &alice_id, WAIT).await?;
        let files = wait_for("the example to keep the file", WAIT, || async {
            let v = js(alice, "return window.example.files;").await?;
            Ok(if v.as_array().is_some_and(|a| !a.is_empty()) { Ok(v) } else { Err(v.to_string()) })
        })
        .await?;
        ensure!(files == json!([{ "name": "notes.bin", "size": file.size }]), "kept {files}");
        let delivered = is_file_event("delivered", &file.root);
        wait_event(bob, "delivered", &delivered, None, WAIT).await?;
        Ok(())
    }
    .await;
    two.finish(test, result).await;
}

/// The text of a TypeDoc comment (`{ summary: [{ text }, …] }`), or "".
fn comment_text(comment: &Value) -> String {
    comment["summary"]
        .as_array()
        .map(|parts| parts.iter().filter_map(|p| p["text"].as_str()).collect())
        .unwrap_or_default()
}

/// The API reference `cargo xtask package` generates (TypeDoc over the package's
/// `weft_wasm.d.ts`, beside the tarball): it exists, starts with the guide, documents every
/// method of `WeftSession`, and names every kind of event the declarations have.
#[test]
fn the_api_reference_documents_every_method_and_event() {
    let test = "the_api_reference_documents_every_method_and_event";
    let Some(tarball) = npm_package().filter(|p| p.is_file()) else {
        built(test, false, "the npm package");
        return;
    };
    let out = tarball.parent().unwrap();
    let index = out.join("api/index.html");
    let html = std::fs::read_to_string(&index)
        .unwrap_or_else(|e| panic!("{test}: no API reference at {}: {e}", index.display()));
    assert!(html.contains("Files with progress"), "{test}: the guide is not its first page");
    let json = std::fs::read(out.join("api.json")).expect("the reference as JSON");
    let reference: Value = serde_json::from_slice(&json).unwrap();
    let items = reference["children"].as_array().expect("declarations");
    let item = |name: &str| {
        items
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{test}: the reference has no {name}"))
    };
    let session = item("WeftSession");
    let members = session["children"].as_array().expect("WeftSession's members");
    let mut undocumented = Vec::new();
    for member in members {
        let name = member["name"].as_str().unwrap_or("?");
        // wasm-bindgen's own, for releasing the Rust object by hand.
        if name == "free" || name.starts_with('[') || name == "constructor" {
            continue;
        }
        let text = format!(
            "{}{}{}",
            comment_text(&member["signatures"][0]["comment"]),
            comment_text(&member["comment"]),
            comment_text(&member["getSignature"]["comment"])
        );
        if text.trim().is_empty() {
            undocumented.push(name.to_string());
        }
    }
    assert!(undocumented.is_empty(), "{test}: WeftSession members without docs: {undocumented:?}");
    for name in ["join", "leave", "sendMessage", "sendFiles", "acceptOffer", "downloadedFile"] {
        assert!(members.iter().any(|m| m["name"] == name), "{test}: no WeftSession.{name}");
    }
    // Every kind of event the declarations name (`type: "…"`) is in the reference's
    // SessionEvent or FileEvent.
    let declared = std::fs::read_to_string(out.join("weft/weft_wasm.d.ts")).unwrap();
    let events = format!("{}{}", item("SessionEvent"), item("FileEvent"));
    let kinds: Vec<&str> =
        declared.split("type: \"").skip(1).filter_map(|rest| rest.split('"').next()).collect();
    assert!(kinds.len() >= 20, "{test}: only {} kinds of event declared", kinds.len());
    for kind in kinds {
        assert!(
            events.contains(&format!("\"value\":\"{kind}\"")),
            "{test}: the reference's events lack `{kind}`"
        );
    }
    for name in ["JsEvent", "JoinOptions", "PeerInfo", "ProgressJs", "TransfersJs"] {
        assert!(!comment_text(&item(name)["comment"]).is_empty(), "{test}: {name} has no docs");
    }
}
