//! File transfer between real headless Chromium processes through the real signaling
//! server, driving the documented JavaScript API (`sendFiles`, `acceptOffer`, …): a folder
//! with a 200 MiB file arrives byte for byte (BLAKE3 computed natively), a folder's hidden
//! files are left out of what is sent (and one named alone is refused), a download resumes
//! after the receiver reloads, a corrupted chunk is rejected and fetched again, a download
//! uses two seeders at once (both holders of the sender's capability), a cancel on either side cleans up both, a file
//! sent again after the receiver forgot it arrives again (forgetting deletes what was stored), and without OPFS a
//! download streams through the service worker into Chromium's downloads folder (even when
//! the browser asks for it late; one the browser does not save is reported failed).
//!
//! Files are generated into a scratch directory on disk and put into the pages through an
//! `<input type=file>` that chromedriver fills from the local paths.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::Cell;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use thirtyfour::WebDriver;
use weft_tests::browser_available;
use weft_tests::files::{
    BYTES_RECEIVED_JS, Member, Net, OPFS_LIST_JS, Scratch, TestFile, WAIT, accept, add_hook,
    blake3_of, call, download, events, generate, hash_downloaded, is_file_event, mib, ms,
    offered_keys, opfs_files, send_files, start_join, transfers, upload, uploaded, wait_complete,
    wait_connected, wait_event, wait_offer,
};
use weft_tests::{js, wait_for};

/// Generous bounds for the large transfers on a slow two-core machine.
const BIG_WAIT: Duration = Duration::from_secs(600);

/// The transfer chunk size, in bytes.
const CHUNK: u64 = 64 * 1024;

/// Starts `names` in one network, runs `body`, then quits every browser (printing each
/// page's recent events and logs if `body` failed), and fails the test with `body`'s error.
macro_rules! run {
    ($test:literal, $names:expr, |$net:ident| $body:expr) => {{
        let members: Vec<Member> = $names.iter().map(|n: &&str| Member::new(n)).collect();
        run_members!($test, &members, |$net| $body)
    }};
}

/// [`run!`] with [`Member`]s instead of names (join options, download folders).
macro_rules! run_members {
    ($test:literal, $members:expr, |$net:ident| $body:expr) => {{
        if !browser_available($test) {
            return;
        }
        let $net = Net::start_members($members).await.unwrap();
        let result: Result<()> = async { $body }.await;
        let failed = result.is_err();
        $net.close(failed).await;
        if let Err(e) = result {
            panic!("{}: {e:#}", $test);
        }
    }};
}

/// `[(file, path)]` in the shape the helpers take.
fn with_paths<'a>(files: &'a [TestFile], paths: &[&'a str]) -> Vec<(&'a TestFile, &'a str)> {
    files.iter().zip(paths.iter().copied()).collect()
}

/// Alice offers `files` under `paths` to Bob, Bob accepts, and everything must arrive
/// exactly: the offer lists each path, size and natively computed BLAKE3; each download
/// completes; the receiver's BLAKE3 of the stored bytes equals the native one.
async fn send_and_verify(net: &Net, files: &[TestFile], paths: &[&str]) -> Result<()> {
    let (alice, bob) = (&net.browsers[0], &net.browsers[1]);
    let (alice_id, bob_id) = (net.ids[0].as_str(), net.ids[1].as_str());
    let entries = with_paths(files, paths);
    let refs: Vec<&TestFile> = files.iter().collect();
    upload(alice, "folder", &refs).await?;

    let started = Instant::now();
    let sent = send_files(alice, "folder", &entries, bob_id, BIG_WAIT).await?;
    let hash_ms = ms(started);
    ensure!(sent.len() == 1 && sent[0]["peerId"] == bob_id, "sendFiles answered {sent:?}");
    let offer_id = sent[0]["offerId"].clone();
    let offer = wait_offer(bob, alice_id, &offer_id).await?;
    ensure!(offer["name"] == "Alice", "offer from {}", offer["name"]);

    // The offer lists every file under its path, with its size and the key it goes by
    // from now on: its root, or (sent before it was hashed) a stream key, its root unknown.
    let mut offered: Vec<(String, u64)> = offer["items"]
        .as_array()
        .context("offer without items")?
        .iter()
        .map(|i| {
            let path = i["path"].as_str().unwrap_or_default().to_string();
            (path, i["size"].as_u64().unwrap_or(u64::MAX))
        })
        .collect();
    let mut wanted: Vec<(String, u64)> =
        entries.iter().map(|(f, p)| (p.to_string(), f.size)).collect();
    offered.sort();
    wanted.sort();
    ensure!(offered == wanted, "offered {offered:?}\nexpected {wanted:?}");
    let keys = offered_keys(&offer)?;
    for (f, path) in &entries {
        let item = &offer["items"].as_array().into_iter().flatten().find(|i| i["path"] == *path);
        let root = item.map(|i| i["root"].clone()).unwrap_or_default();
        ensure!(root.is_null() || root == f.root.as_str(), "{path}: offered with root {root}");
    }
    let total: u64 = files.iter().map(|f| f.size).sum();
    ensure!(offer["totalSize"] == total, "totalSize {} != {total}", offer["totalSize"]);

    let accepted = Instant::now();
    accept(bob, alice_id, &offer_id).await?;
    for (f, path) in &entries {
        // Followed by the key it was offered under; it completes under its root.
        let key = &keys[*path];
        let done = wait_complete(bob, key, BIG_WAIT).await?;
        ensure!(done["root"] == f.root.as_str(), "{path}: file_complete {done}, sent {}", f.root);
        ensure!(done["size"] == f.size, "file_complete {done}");
        ensure!(done["paths"] == json!([path]), "file_complete {done}");
    }
    let transfer_ms = ms(accepted);

    for (f, path) in &entries {
        let key = &keys[*path];
        let stored = hash_downloaded(bob, key, BIG_WAIT).await?;
        ensure!(stored == f.root, "{path}: stored bytes hash to {stored}, sent {}", f.root);
        let d = download(bob, key).await?.with_context(|| format!("no download {path}"))?;
        ensure!(
            d["key"] == key.as_str()
                && d["root"] == f.root.as_str()
                && d["size"] == f.size
                && d["doneBytes"] == f.size
                && d["state"] == "complete"
                && d["paths"] == json!([path]),
            "{path}: download {d}"
        );
        let file = call(
            bob,
            &format!(
                "const f = await s.downloadedFile({}); return {{ size: f.size, name: f.name }};",
                json!(key)
            ),
            WAIT,
        )
        .await?;
        ensure!(file["size"] == f.size, "{path}: downloadedFile {file}");
        // Every event about the file named it by that key; its root only once verified.
        let about = events(
            bob,
            &format!("ev.paths && ev.paths.includes({}) && ev.type !== 'offer'", json!(path)),
        )
        .await?;
        for ev in &about {
            ensure!(ev["key"] == key.as_str(), "{path}: event under another key: {ev}");
            ensure!(ev["root"].is_null() || ev["root"] == f.root.as_str(), "{path}: {ev}");
        }
    }
    let rejected = events(bob, "ev.type === 'chunk_rejected'").await?;
    ensure!(rejected.is_empty(), "chunks rejected without corruption: {rejected:?}");

    // Alice hashed while she read (hashing events), and hears that each file was delivered.
    let big = files.iter().max_by_key(|f| f.size).context("no files")?;
    let big_path = entries.iter().find(|(f, _)| f.root == big.root).map(|e| e.1).unwrap_or("");
    if big.size > 0 {
        let hashing = events(
            alice,
            &format!(
                "ev.type === 'hashing' && ev.path === {} && ev.size === {}",
                json!(big_path),
                big.size
            ),
        )
        .await?;
        ensure!(!hashing.is_empty(), "no hashing event for {big_path}");
    }
    // Alice hears of each file's delivery under the key she offered it to Bob by, with its
    // root.
    for (f, path) in &entries {
        let delivered = wait_event(
            alice,
            &format!("delivered {} to Bob", f.name),
            &format!(
                "ev.type === 'delivered' && ev.peerId === {} && ev.key === {}",
                json!(bob_id),
                json!(keys[*path])
            ),
            None,
            WAIT,
        )
        .await?;
        ensure!(delivered["root"] == f.root.as_str(), "{path}: {delivered}");
    }
    let out = wait_for("Alice's offer to show delivered", WAIT, || async {
        let t = transfers(alice).await?;
        let o = t["outgoing"]
            .as_array()
            .and_then(|o| o.iter().find(|o| o["offerId"] == offer_id).cloned());
        match o {
            Some(o) if o["state"] == "delivered" => Ok(Ok(o)),
            _ => Ok(Err(t["outgoing"].to_string())),
        }
    })
    .await?;
    ensure!(out["totalBytes"] == total, "outgoing {out}");

    println!(
        "TIMING {} files, {total} bytes: sendFiles (offer) {hash_ms} ms, accept -> last \
         file_complete {transfer_ms} ms ({:.1} MB/s as seen by the test)",
        files.len(),
        total as f64 / 1e6 / (transfer_ms.max(1) as f64 / 1e3)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_with_a_200_mib_file_arrives_byte_for_byte() {
    let scratch = Scratch::new("folder").unwrap();
    let dir = scratch.path();
    let files = vec![
        generate(dir, "big.bin", mib(200) + 12_345, 1).unwrap(),
        generate(dir, "notes.txt", 1000, 2).unwrap(),
        generate(dir, "one-chunk.bin", 65_536, 3).unwrap(),
        generate(dir, "three-mib.bin", mib(3) + 7, 4).unwrap(),
    ];
    // The generator's BLAKE3 is the real one (b3sum's), not just self-consistent.
    assert_eq!(blake3_of(&files[1].path).unwrap(), files[1].root);
    let paths = [
        "folder/big.bin",
        "folder/notes.txt",
        "folder/sub/one-chunk.bin",
        "folder/sub/deeper/three-mib.bin",
    ];
    run!("a_folder_with_a_200_mib_file_arrives_byte_for_byte", &["Alice", "Bob"], |net| {
        send_and_verify(&net, &files, &paths).await
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_of_edge_sizes_arrive_byte_for_byte() {
    let scratch = Scratch::new("edges").unwrap();
    let dir = scratch.path();
    let files = vec![
        generate(dir, "empty", 0, 10).unwrap(),
        generate(dir, "one-byte", 1, 11).unwrap(),
        generate(dir, "chunk-minus-one", 65_535, 12).unwrap(),
        generate(dir, "chunk-plus-one", 65_537, 13).unwrap(),
        generate(dir, "two-chunks", 131_072, 14).unwrap(),
    ];
    assert_eq!(files[0].root, blake3::hash(b"").to_hex().to_string());
    let paths = [
        "edges/empty",
        "edges/one-byte",
        "edges/chunk-minus-one",
        "edges/chunk-plus-one",
        "edges/two-chunks",
    ];
    let hidden = vec![
        generate(dir, "visible", 10, 15).unwrap(),
        generate(dir, "DS_Store", 6, 16).unwrap(),
        generate(dir, "gitconfig", 7, 17).unwrap(),
    ];
    run!("files_of_edge_sizes_arrive_byte_for_byte", &["Alice", "Bob"], |net| {
        send_and_verify(&net, &files, &paths).await?;
        hidden_files_are_left_out(&net, &hidden).await
    });
}

/// A folder's hidden files (`.DS_Store`, `.git/…`) are left out of what a browser sends,
/// each with a `skipped` event, and the rest goes; a hidden file named on its own is
/// refused with an error (a receiver would refuse to save it: it could plant
/// `~/.bashrc`).
async fn hidden_files_are_left_out(net: &Net, files: &[TestFile]) -> Result<()> {
    let (alice, bob) = (&net.browsers[0], &net.browsers[1]);
    let (alice_id, bob_id) = (net.ids[0].as_str(), net.ids[1].as_str());
    let refs: Vec<&TestFile> = files.iter().collect();
    upload(alice, "hidden", &refs).await?;
    let entries = with_paths(files, &["photos/a.jpg", "photos/.DS_Store", "photos/.git/config"]);
    let sent = send_files(alice, "hidden", &entries, bob_id, WAIT).await?;
    let offer = wait_offer(bob, alice_id, &sent[0]["offerId"]).await?;
    let offered: Vec<&str> = offer["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|i| i["path"].as_str())
        .collect();
    ensure!(offered == ["photos/a.jpg"], "offered {offered:?}");
    let skipped: Vec<Value> = events(alice, "ev.type === 'skipped'").await?;
    let skipped: Vec<&str> = skipped.iter().filter_map(|e| e["path"].as_str()).collect();
    ensure!(skipped == ["photos/.DS_Store", "photos/.git/config"], "skipped {skipped:?}");
    let refused = send_files(
        alice,
        "hidden",
        &entries[1..2].iter().map(|(f, _)| (*f, ".bashrc")).collect::<Vec<_>>(),
        bob_id,
        WAIT,
    )
    .await;
    let err = refused.err().context("a hidden file named on its own was sent")?;
    ensure!(format!("{err:#}").contains("starts with a dot"), "{err:#}");
    Ok(())
}

/// What the reloaded page saw when its download first showed up again.
async fn reload_body(net: &Net, file: &TestFile) -> Result<()> {
    let (alice, bob) = (&net.browsers[0], &net.browsers[1]);
    let (alice_id, bob_id) = (net.ids[0].as_str(), net.ids[1].as_str());
    upload(alice, "r", &[file]).await?;
    let sent = send_files(alice, "r", &[(file, "resume.bin")], bob_id, WAIT).await?;
    let offer_id = sent.first().context("no offer sent")?["offerId"].clone();
    let offer = wait_offer(bob, alice_id, &offer_id).await?;
    // The download goes by the key it was offered under, before and after its root.
    let key = json!(offered_keys(&offer)?["resume.bin"]);

    // Bob's page reloads itself the moment 40 % is stored (no test round trip in between).
    let threshold = file.size * 2 / 5;
    add_hook(
        bob,
        &format!(
            "if (ev.type === 'progress' && ev.key === {key} && ev.doneBytes >= {threshold} && !t.reloading) {{
               t.reloading = true;
               sessionStorage.setItem('weftReloadAt', String(ev.doneBytes));
               location.reload();
             }}"
        ),
    )
    .await?;
    accept(bob, alice_id, &offer_id).await?;
    wait_for("Bob's page to reload mid-transfer", BIG_WAIT, || async {
        let v = js(
            bob,
            "if (window.t) return window.t.events.some((e) => e.type === 'file_complete') ? 'complete' : 'old';
             return document.readyState === 'complete' ? 'new' : 'loading';",
        )
        .await;
        match v {
            Ok(v) if v == "new" => Ok(Ok(())),
            Ok(v) if v == "complete" => bail!("the file completed before the reload: make it larger"),
            Ok(v) => Ok(Err(v.to_string())),
            Err(e) => Ok(Err(e.to_string())),
        }
    })
    .await?;
    let reload_at = js(bob, "return Number(sessionStorage.getItem('weftReloadAt'))").await?;
    let reload_at = reload_at.as_f64().unwrap_or(0.0) as u64;
    ensure!(reload_at >= threshold && reload_at < file.size, "reloaded at {reload_at} bytes");

    // Join again with the same invite: same profile, so the same identity, IndexedDB and
    // OPFS. Watch, inside the page, for the download to show up again with bytes done, and
    // how many bytes the page had received over any data channel at that moment.
    start_join(bob, &net.invite, "Bob").await?;
    let first = call(
        bob,
        &format!(
            "const deadline = performance.now() + 60000;
             for (;;) {{
               const t = window.t;
               if (t.error) throw new Error('join failed: ' + t.error);
               const s = t.session;
               const d = s ? s.transfers().downloads.find((d) => d.key === {key}) : null;
               if (d && d.doneBytes > 0) {{
                 {BYTES_RECEIVED_JS}
                 return {{ doneBytes: d.doneBytes, state: d.state, received: bytes,
                           ms: performance.now() - t.joinAt }};
               }}
               if (performance.now() > deadline)
                 throw new Error('no restored download with bytes after 60 s: ' + JSON.stringify(s ? s.transfers() : null));
               await new Promise((r) => setTimeout(r, 20));
             }}"
        ),
        Duration::from_secs(90),
    )
    .await?;
    let new_bob = wait_connected(bob, 1).await?;
    ensure!(new_bob != bob_id, "a reloaded page joins under a new peer id");
    let restored = first["doneBytes"].as_u64().unwrap_or(0);
    let received_then = first["received"].as_u64().unwrap_or(u64::MAX);
    // The restored bytes came from disk: more bytes done than the page ever received.
    ensure!(
        restored > 0 && received_then < restored,
        "after the reload: doneBytes {restored} with {received_then} bytes received (reloaded at {reload_at})"
    );

    wait_complete(bob, &file.root, BIG_WAIT).await?;
    let received_total = call(bob, &format!("{BYTES_RECEIVED_JS} return bytes;"), WAIT).await?;
    let received_total = received_total.as_u64().unwrap_or(u64::MAX);
    let stored = hash_downloaded(bob, &file.root, BIG_WAIT).await?;
    ensure!(
        stored == file.root,
        "after resuming, the stored bytes hash to {stored}, not {}",
        file.root
    );
    // A restart from zero would receive at least the whole file again.
    ensure!(
        received_total < file.size,
        "the reloaded page received {received_total} bytes for a {} byte file: it did not resume",
        file.size
    );
    // The only file: by its root, or its stream key before the root was verified.
    let sources = events(bob, "ev.type === 'source_added'").await?;
    ensure!(
        sources.iter().any(|s| s["peerId"] == alice_id),
        "Alice never became a source after the reload: {sources:?}"
    );
    println!(
        "TIMING reload at {reload_at} of {} bytes; restored download visible {:.0} ms after \
         the join with {restored} bytes done and {received_then} received; {received_total} \
         bytes received after the reload in all",
        file.size,
        first["ms"].as_f64().unwrap_or(0.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_resumes_after_the_receiver_reloads() {
    let scratch = Scratch::new("resume").unwrap();
    let file = generate(scratch.path(), "resume.bin", mib(128) + 4321, 20).unwrap();
    run!("a_download_resumes_after_the_receiver_reloads", &["Alice", "Bob"], |net| {
        reload_body(&net, &file).await
    });
}

async fn corrupt_body(net: &Net, file: &TestFile) -> Result<()> {
    let (alice, bob) = (&net.browsers[0], &net.browsers[1]);
    let (alice_id, bob_id) = (net.ids[0].as_str(), net.ids[1].as_str());
    upload(alice, "c", &[file]).await?;
    let sent = send_files(alice, "c", &[(file, "corrupt.bin")], bob_id, WAIT).await?;
    let offer_id = sent.first().context("no offer sent")?["offerId"].clone();
    // The next time Alice serves chunk 5, one byte of it is flipped.
    call(alice, "s.debugCorruptChunk(5); return true;", WAIT).await?;
    wait_offer(bob, alice_id, &offer_id).await?;
    accept(bob, alice_id, &offer_id).await?;
    let rejected = wait_event(
        bob,
        "chunk 5 rejected",
        // Before its root is known, the download goes by the offer's stream key.
        "ev.type === 'chunk_rejected' && ev.index === 5",
        Some(&is_file_event("file_failed", &file.root)),
        WAIT,
    )
    .await?;
    ensure!(rejected["peerId"] == alice_id, "rejected {rejected}");
    wait_complete(bob, &file.root, WAIT).await?;
    let stored = hash_downloaded(bob, &file.root, WAIT).await?;
    ensure!(stored == file.root, "stored bytes hash to {stored}, not {}", file.root);
    let all = events(bob, "ev.type === 'chunk_rejected'").await?;
    ensure!(all.len() == 1, "one byte flipped once, but rejected: {all:?}");
    let dropped = events(bob, "ev.type === 'source_dropped'").await?;
    ensure!(dropped.is_empty(), "one bad chunk must not drop the source: {dropped:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_chunk_is_rejected_and_fetched_again() {
    let scratch = Scratch::new("corrupt").unwrap();
    let file = generate(scratch.path(), "corrupt.bin", mib(4) + 100, 30).unwrap();
    run!("a_corrupted_chunk_is_rejected_and_fetched_again", &["Alice", "Bob"], |net| {
        corrupt_body(&net, &file).await
    });
}

async fn two_seeders_body(net: &Net, file: &TestFile) -> Result<()> {
    let (alice, bob, carol) = (&net.browsers[0], &net.browsers[1], &net.browsers[2]);
    let (alice_id, bob_id, carol_id) =
        (net.ids[0].as_str(), net.ids[1].as_str(), net.ids[2].as_str());
    upload(alice, "s", &[file]).await?;
    // Carol got the file from Alice first: she holds Alice's capability for it, so she
    // serves it to Alice's other receivers (a member that merely has the same bytes would
    // not: `core/TRANSFER.md`, "Who may fetch what").
    let sent = send_files(alice, "s", &[(file, "swarm.bin")], carol_id, WAIT).await?;
    let offer_id = sent.first().context("no offer sent")?["offerId"].clone();
    wait_offer(carol, alice_id, &offer_id).await?;
    accept(carol, alice_id, &offer_id).await?;
    wait_complete(carol, &file.root, BIG_WAIT).await?;
    let took = send_whole_file(net, "s", file, "swarm.bin").await?;

    // The only file: by its root, or its stream key before the root was verified.
    let added = events(bob, "ev.type === 'source_added'").await?;
    for (who, id) in [("Alice", alice_id), ("Carol", carol_id)] {
        ensure!(added.iter().any(|s| s["peerId"] == id), "{who} was never a source: {added:?}");
    }
    let mut sent_by = Vec::new();
    for (who, browser) in [("Alice", alice), ("Carol", carol)] {
        let n = wait_for(&format!("{who}'s upload events to Bob"), WAIT, || async {
            Ok(match uploaded(browser, &file.root, bob_id).await? {
                Some(n) if n > 0 => Ok(n),
                other => Err(format!("{other:?}")),
            })
        })
        .await?;
        sent_by.push(n);
    }
    println!(
        "TIMING two seeders: {} bytes in {took} ms; upload events report Alice {} and Carol {} bytes",
        file.size, sent_by[0], sent_by[1]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_fetches_from_two_seeders_at_once() {
    let scratch = Scratch::new("swarm").unwrap();
    let file = generate(scratch.path(), "swarm.bin", mib(32), 40).unwrap();
    run!("a_download_fetches_from_two_seeders_at_once", &["Alice", "Bob", "Carol"], |net| {
        two_seeders_body(&net, &file).await
    });
}

/// Alice offers `file` (put in her page under `key`) to Bob as `path`, Bob accepts, and
/// the file completes and hashes right in Bob's page; milliseconds from accept to complete.
async fn send_whole_file(net: &Net, key: &str, file: &TestFile, path: &str) -> Result<u128> {
    let (alice, bob) = (&net.browsers[0], &net.browsers[1]);
    let (alice_id, bob_id) = (net.ids[0].as_str(), net.ids[1].as_str());
    let sent = send_files(alice, key, &[(file, path)], bob_id, WAIT).await?;
    let offer_id = sent.first().context("no offer sent")?["offerId"].clone();
    wait_offer(bob, alice_id, &offer_id).await?;
    let accepted = Instant::now();
    accept(bob, alice_id, &offer_id).await?;
    wait_complete(bob, &file.root, BIG_WAIT).await?;
    let took = ms(accepted);
    let stored = hash_downloaded(bob, &file.root, WAIT).await?;
    ensure!(stored == file.root, "stored bytes hash to {stored}, not {}", file.root);
    Ok(took)
}

/// Alice serves at most 2 MB/s: a 6 MiB file cannot arrive sooner than the limit allows
/// (a lower bound, so a slow machine cannot make it fail), and arrives intact.
async fn upload_limit_body(net: &Net, file: &TestFile) -> Result<()> {
    let alice = &net.browsers[0];
    const LIMIT: f64 = 2e6;
    call(alice, &format!("s.setUploadLimit({LIMIT}); return true;"), WAIT).await?;
    upload(alice, "u", &[file]).await?;
    let took = send_whole_file(net, "u", file, "limited.bin").await?;
    // One chunk may go at once; the rest leave evenly spaced.
    let floor = (file.size - CHUNK) as f64 / LIMIT * 1e3;
    ensure!(
        took as f64 >= floor,
        "{} bytes arrived in {took} ms: faster than the {LIMIT} B/s limit allows ({floor:.0} ms)",
        file.size
    );
    println!("TIMING upload limit {LIMIT} B/s: {} bytes in {took} ms", file.size);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_limit_paces_what_a_seeder_serves() {
    let scratch = Scratch::new("limit").unwrap();
    let file = generate(scratch.path(), "limited.bin", mib(6), 41).unwrap();
    run!("an_upload_limit_paces_what_a_seeder_serves", &["Alice", "Bob"], |net| {
        upload_limit_body(&net, &file).await
    });
}

/// Waits until the largest `upload` event of `root` to `peer` stays the same for 1.5 s;
/// returns it.
async fn wait_uploads_stop(browser: &WebDriver, root: &str, peer: &str) -> Result<u64> {
    let last = Cell::new((None::<u64>, Instant::now()));
    wait_for("the uploads to stop", WAIT, || async {
        let now = uploaded(browser, root, peer).await?;
        let (before, since) = last.get();
        if now != before {
            last.set((now, Instant::now()));
            return Ok(Err(format!("{now:?} bytes, still changing")));
        }
        Ok(if since.elapsed() > Duration::from_millis(1500) {
            Ok(now.unwrap_or(0))
        } else {
            Err(format!("{now:?} bytes"))
        })
    })
    .await
}

/// Waits until the page's OPFS has exactly the files `paths` (ignoring sizes).
async fn wait_opfs_paths(browser: &WebDriver, what: &str, paths: &[String]) -> Result<()> {
    let mut want = paths.to_vec();
    want.sort();
    wait_for(what, WAIT, || async {
        let mut now: Vec<String> = opfs_files(browser)
            .await?
            .iter()
            .map(|f| f["path"].as_str().unwrap_or_default().to_string())
            .collect();
        now.sort();
        Ok(if now == want { Ok(()) } else { Err(format!("OPFS {now:?}, expected {want:?}")) })
    })
    .await
}

fn paths_of(files: &[Value]) -> Vec<String> {
    files.iter().map(|f| f["path"].as_str().unwrap_or_default().to_string()).collect()
}

async fn cancel_body(net: &Net, x: &TestFile, y: &TestFile) -> Result<()> {
    let (alice, bob) = (&net.browsers[0], &net.browsers[1]);
    let (alice_id, bob_id) = (net.ids[0].as_str(), net.ids[1].as_str());
    upload(alice, "k", &[x, y]).await?;
    let before = paths_of(&opfs_files(bob).await?);

    // 1. The receiver cancels as soon as its first bytes are stored.
    let sent = send_files(alice, "k", &[(x, "x.bin")], bob_id, WAIT).await?;
    let offer_x = sent.first().context("no offer sent")?["offerId"].clone();
    // Each file is followed by the key it was offered under (its root may not be known).
    let kx = offered_keys(&wait_offer(bob, alice_id, &offer_x).await?)?["x.bin"].clone();
    add_hook(
        bob,
        &format!(
            "if (ev.type === 'progress' && ev.key === {} && ev.doneBytes > 0 && !t.cancelledX) {{
               t.cancelledX = ev.doneBytes;
               s.cancelTransfer({}, {offer_x}, 'changed my mind');
             }}",
            json!(kx),
            json!(alice_id)
        ),
    )
    .await?;
    accept(bob, alice_id, &offer_x).await?;
    let cancelled = wait_event(
        alice,
        "Alice to hear that Bob cancelled",
        &format!(
            "ev.type === 'transfer_cancelled' && ev.peerId === {} && ev.offerId === {offer_x}",
            json!(bob_id)
        ),
        Some(&is_file_event("delivered", &kx)),
        WAIT,
    )
    .await?;
    ensure!(cancelled["byPeer"] == true, "Alice's transfer_cancelled {cancelled}");
    let stopped_at = wait_uploads_stop(alice, &kx, bob_id).await?;
    ensure!(stopped_at < x.size, "Alice kept sending: {stopped_at} of {} bytes", x.size);
    let out = transfers(alice).await?;
    let o = out["outgoing"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["offerId"] == offer_x).cloned());
    ensure!(o.as_ref().is_some_and(|o| o["state"] == "cancelled"), "Alice's outgoing {out}");
    // Bob's side is cleaned up too: no download, nothing left stored.
    wait_for("Bob's cancelled download to go", WAIT, || async {
        Ok(match download(bob, &kx).await? {
            None => Ok(()),
            Some(d) => Err(d.to_string()),
        })
    })
    .await?;
    wait_opfs_paths(bob, "Bob's OPFS to be as before the cancelled download", &before).await?;
    let complete_x = events(bob, &is_file_event("file_complete", &kx)).await?;
    ensure!(complete_x.is_empty(), "a cancelled download completed: {complete_x:?}");

    // 2. The sender cancels while Bob is downloading; Bob's stored file must go.
    let sent = send_files(alice, "k", &[(y, "y.bin")], bob_id, WAIT).await?;
    let offer_y = sent.first().context("no offer sent")?["offerId"].clone();
    let ky = offered_keys(&wait_offer(bob, alice_id, &offer_y).await?)?["y.bin"].clone();
    add_hook(
        bob,
        &format!(
            "if (ev.type === 'progress' && ev.key === {} && ev.doneBytes > 0 && !t.listingY) {{
               t.listingY = true;
               t.opfsDuring = await (async () => {{ {OPFS_LIST_JS} }})();
             }}",
            json!(ky)
        ),
    )
    .await?;
    accept(bob, alice_id, &offer_y).await?;
    let during = wait_for("Bob to store part of y.bin", WAIT, || async {
        let v = js(
            bob,
            &format!(
                "return {{ during: window.t.opfsDuring ?? null,
                          complete: window.t.events.some((ev) => ev.type === 'file_complete' && ev.key === {}) }};",
                json!(ky)
            ),
        )
        .await?;
        if v["complete"] == true {
            bail!("y.bin completed before the sender could cancel: make it larger");
        }
        Ok(match v["during"].as_array() {
            Some(list) => Ok(list.clone()),
            None => Err("no listing yet".to_string()),
        })
    })
    .await?;
    let new_files: Vec<String> =
        paths_of(&during).into_iter().filter(|p| !before.contains(p)).collect();
    ensure!(!new_files.is_empty(), "y.bin is downloading but nothing new is in OPFS: {during:?}");
    call(
        alice,
        &format!("s.cancelTransfer({}, {offer_y}, 'oops'); return true;", json!(bob_id)),
        WAIT,
    )
    .await?;
    let delivered = events(alice, &is_file_event("delivered", &ky)).await?;
    ensure!(delivered.is_empty(), "y.bin was delivered before the cancel: make it larger");
    let cancelled = wait_event(
        bob,
        "Bob to hear that Alice cancelled",
        &format!(
            "ev.type === 'transfer_cancelled' && ev.peerId === {} && ev.offerId === {offer_y}",
            json!(alice_id)
        ),
        Some(&is_file_event("file_complete", &ky)),
        WAIT,
    )
    .await?;
    ensure!(cancelled["byPeer"] == true, "Bob's transfer_cancelled {cancelled}");
    wait_for("Bob's download of y.bin to disappear", WAIT, || async {
        Ok(match download(bob, &ky).await? {
            None => Ok(()),
            Some(d) => Err(d.to_string()),
        })
    })
    .await?;
    wait_opfs_paths(bob, "Bob's stored y.bin to be deleted", &before).await?;
    let hash = call(bob, &format!("return await s.hashDownloaded({});", json!(ky)), WAIT).await;
    ensure!(hash.is_err(), "hashDownloaded of a cancelled download answered {hash:?}");
    let stopped_y = wait_uploads_stop(alice, &ky, bob_id).await?;
    ensure!(stopped_y < y.size, "Alice sent all of y.bin: {stopped_y}");
    println!(
        "TIMING cancel: receiver cancel stopped the sender at {stopped_at} of {} bytes; sender \
         cancel at {stopped_y} of {} bytes; Bob had stored {new_files:?}",
        x.size, y.size
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_either_side_cleans_up_both() {
    let scratch = Scratch::new("cancel").unwrap();
    let x = generate(scratch.path(), "x.bin", mib(64), 50).unwrap();
    let y = generate(scratch.path(), "y.bin", mib(128), 51).unwrap();
    run!("a_cancel_on_either_side_cleans_up_both", &["Alice", "Bob"], |net| {
        cancel_body(&net, &x, &y).await
    });
}

/// The files in `dir` (name and size), sorted by name.
fn listing(dir: &std::path::Path) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        out.push((entry.file_name().to_string_lossy().to_string(), entry.metadata()?.len()));
    }
    out.sort();
    Ok(out)
}

/// Waits until Chromium has finished saving `name` in `dir` with `size` bytes (no
/// `.crdownload` left).
async fn wait_saved(dir: &std::path::Path, name: &str, size: u64) -> Result<()> {
    wait_for(&format!("{name} saved in the downloads folder"), WAIT, || async {
        let files = listing(dir)?;
        let done = files.iter().any(|(n, s)| n == name && *s == size);
        let partial = files.iter().any(|(n, _)| n.ends_with(".crdownload"));
        Ok(if done && !partial { Ok(()) } else { Err(format!("{files:?}")) })
    })
    .await
}

/// Makes Bob's page open its next streamed download (`weft-download/…` in a hidden frame)
/// as `mode` says: "late" adds the frame only 2 s later (as a busy browser may ask for it
/// late), recording when in `t.lateFrameAt`; "page" points it at a download the service
/// worker does not know, so the frame shows a page instead of saving the file.
const FRAME_HOOK_JS: &str = r#"
    const t = window.t;
    if (!t.frameHook) {
      t.frameHook = true;
      const body = document.body;
      const append = body.appendChild.bind(body);
      body.appendChild = (node) => {
        const mode = t.frameMode;
        if (!(node instanceof HTMLIFrameElement) || !node.src.includes("/weft-download/") || !mode) {
          return append(node);
        }
        t.frameMode = null;
        if (mode === "page") {
          node.src = node.src.replace("/weft-download/", "/weft-download/unknown-");
          return append(node);
        }
        setTimeout(() => { t.lateFrameAt = performance.now(); append(node); }, 2000);
        return node;
      };
    }
    t.frameMode = arguments[0];
    return true;
"#;

/// Sets how Bob's page opens its next streamed download (see [`FRAME_HOOK_JS`]).
async fn next_frame(bob: &WebDriver, mode: &str) -> Result<()> {
    bob.execute(FRAME_HOOK_JS, vec![json!(mode)]).await?;
    Ok(())
}

/// Offers `file` (alone in Alice's upload `key`) under `path` to Bob, who accepts it;
/// returns the key Bob was offered it under.
async fn offer_accepted(net: &Net, key: &str, file: &TestFile, path: &str) -> Result<String> {
    let (alice, bob) = (&net.browsers[0], &net.browsers[1]);
    let (alice_id, bob_id) = (net.ids[0].as_str(), net.ids[1].as_str());
    let sent = send_files(alice, key, &[(file, path)], bob_id, WAIT).await?;
    let offer_id = sent.first().context("no offer sent")?["offerId"].clone();
    let offer = wait_offer(bob, alice_id, &offer_id).await?;
    accept(bob, alice_id, &offer_id).await?;
    offered_keys(&offer)?.remove(path).context("offer without the path")
}

async fn stream_body(net: &Net, downloads: &std::path::Path, files: &[TestFile]) -> Result<()> {
    let (alice, bob) = (&net.browsers[0], &net.browsers[1]);
    let (alice_id, bob_id) = (net.ids[0].as_str(), net.ids[1].as_str());
    let [big, small, late, refused, cut] = files else { bail!("five files") };
    upload(alice, "w", &[big, small]).await?;
    upload(alice, "l", &[late]).await?;
    upload(alice, "r", &[refused]).await?;
    upload(alice, "x", &[cut]).await?;

    // 1. A file and a second one in a folder, in one offer. Chunk 5 of the big one is
    // corrupted once, so it is fetched again after later chunks arrived: the writer must
    // hold those back until the gap is filled.
    let entries = [(big, "stream.bin"), (small, "notes/été ünï.txt")];
    let sent = send_files(alice, "w", &entries, bob_id, WAIT).await?;
    let offer_id = sent.first().context("no offer sent")?["offerId"].clone();
    let keys = offered_keys(&wait_offer(bob, alice_id, &offer_id).await?)?;
    // Named by the key it was offered under: its root may not be known yet.
    let hook = format!("s.debugCorruptChunk(5, {}); return true;", json!(keys["stream.bin"]));
    call(alice, &hook, WAIT).await?;
    accept(bob, alice_id, &offer_id).await?;
    for (f, path) in &entries {
        let done = wait_complete(bob, &keys[*path], BIG_WAIT).await?;
        ensure!(done["stored"] == "downloads", "file_complete {done}");
        ensure!(done["root"] == f.root.as_str(), "file_complete {done}");
    }
    let rejected = events(bob, "ev.type === 'chunk_rejected'").await?;
    ensure!(rejected.len() == 1 && rejected[0]["index"] == 5, "rejected: {rejected:?}");
    wait_saved(downloads, "stream.bin", big.size).await?;
    wait_saved(downloads, "été ünï.txt", small.size).await?;
    for (f, name) in [(big, "stream.bin"), (small, "été ünï.txt")] {
        let got = blake3_of(&downloads.join(name))?;
        ensure!(got == f.root, "{name} in the downloads folder hashes to {got}, sent {}", f.root);
    }
    // Nothing went through OPFS, and the page says where the file is.
    let stored = opfs_files(bob).await?;
    ensure!(stored.is_empty(), "OPFS holds {stored:?}");
    let kept = call(
        bob,
        &format!(
            "try {{ await s.downloadedFile({}); return 'kept'; }} catch (e) {{ return String(e.message || e); }}",
            json!(keys["stream.bin"])
        ),
        WAIT,
    )
    .await?;
    ensure!(
        kept.as_str().is_some_and(|m| m.contains("downloads folder")),
        "downloadedFile: {kept}"
    );

    // 2. The browser asks for a download only after all of it was fed to the service
    // worker (a small file fits in its queue at once): the download waits for the browser,
    // and is complete only once the browser took it. Under load, the second file above was
    // once announced complete and then lost this way.
    next_frame(bob, "late").await?;
    let late_key = offer_accepted(net, "l", late, "late.txt").await?;
    let done = wait_complete(bob, &late_key, WAIT).await?;
    let frame_at = js(bob, "return window.t.lateFrameAt ?? null;").await?;
    ensure!(
        frame_at.as_f64().zip(done["t"].as_f64()).is_some_and(|(f, t)| t > f),
        "late.txt was announced complete (at {} ms) before the browser asked for it (at {frame_at})",
        done["t"]
    );
    wait_saved(downloads, "late.txt", late.size).await?;
    let got = blake3_of(&downloads.join("late.txt"))?;
    ensure!(got == late.root, "late.txt in the downloads folder hashes to {got}");

    // 3. A download the browser does not save (its frame shows a page instead) is reported
    // failed with a plain reason, never complete.
    next_frame(bob, "page").await?;
    let refused_key = offer_accepted(net, "r", refused, "refused.txt").await?;
    let failed = wait_event(
        bob,
        "refused.txt to fail",
        &is_file_event("file_failed", &refused_key),
        Some(&is_file_event("file_complete", &refused_key)),
        WAIT,
    )
    .await?;
    ensure!(
        failed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("the browser did not save the download")),
        "file_failed {failed}"
    );
    let files_now = listing(downloads)?;
    ensure!(!files_now.iter().any(|(n, _)| n.contains("refused")), "saved anyway: {files_now:?}");
    println!("refused.txt failed: {}", failed["reason"]);

    // 4. A cancel mid-download fails the browser's download: no truncated file is saved.
    call(alice, "s.setUploadLimit(4e6); return true;", WAIT).await?;
    let sent = send_files(alice, "x", &[(cut, "cut.bin")], bob_id, WAIT).await?;
    let offer_id = sent.first().context("no offer sent")?["offerId"].clone();
    wait_offer(bob, alice_id, &offer_id).await?;
    accept(bob, alice_id, &offer_id).await?;
    wait_for("1 MiB of cut.bin in the downloads folder", WAIT, || async {
        let files = listing(downloads)?;
        let partial = files.iter().any(|(n, s)| {
            (n.ends_with(".crdownload") || n.contains("cut")) && *s >= mib(1) && *s < cut.size
        });
        Ok(if partial { Ok(()) } else { Err(format!("{files:?}")) })
    })
    .await?;
    call(bob, &format!("s.cancelTransfer({}, {offer_id}); return true;", json!(alice_id)), WAIT)
        .await?;
    wait_for("the cancelled download to go", WAIT, || async {
        let files = listing(downloads)?;
        let left = files.iter().any(|(n, _)| n.contains("cut") || n.ends_with(".crdownload"));
        Ok(if left { Err(format!("{files:?}")) } else { Ok(()) })
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_opfs_a_download_streams_into_the_downloads_folder() {
    let scratch = Scratch::new("stream").unwrap();
    let downloads = scratch.path().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let files = [
        generate(scratch.path(), "stream.bin", mib(24) + 1000, 60).unwrap(),
        generate(scratch.path(), "small.txt", 70_000, 61).unwrap(),
        generate(scratch.path(), "late.txt", 5000, 63).unwrap(),
        generate(scratch.path(), "refused.txt", 3000, 64).unwrap(),
        generate(scratch.path(), "cut.bin", mib(32), 62).unwrap(),
    ];
    let bob = Member {
        join: json!({ "downloads": "stream" }),
        downloads: Some(downloads.clone()),
        ..Member::new("Bob")
    };
    let members = [Member::new("Alice"), bob];
    run_members!("without_opfs_a_download_streams_into_the_downloads_folder", &members, |net| {
        stream_body(&net, &downloads, &files).await
    });
}

/// `cargo xtask bench transfer`'s sequence: Alice sends the very same `File` to Bob again
/// and again (offered the first time before it was hashed, so under a stream key, which
/// every later offer reuses), and Bob forgets the download in between. Each time the
/// file arrives whole, and forgetting deletes what Bob stored: before, the page deleted a
/// file named by the root, which does not exist, so the real one stayed in OPFS for ever
/// (and went on being served).
async fn offered_again_body(net: &Net, file: &TestFile) -> Result<()> {
    let (alice, bob) = (&net.browsers[0], &net.browsers[1]);
    let (alice_id, bob_id) = (net.ids[0].as_str(), net.ids[1].as_str());
    upload(alice, "again", &[file]).await?;
    let root = json!(file.root);
    for run in 0..3 {
        let sent = send_files(alice, "again", &[(file, "again.bin")], bob_id, WAIT).await?;
        let offer_id = sent.first().context("no offer sent")?["offerId"].clone();
        let key = offered_keys(&wait_offer(bob, alice_id, &offer_id).await?)?["again.bin"].clone();
        ensure!(key != file.root, "run {run}: offered under its root, not a stream key");
        accept(bob, alice_id, &offer_id).await?;
        // The download in this run's list is complete (an event log holds every run's).
        wait_for(&format!("run {run} to complete"), BIG_WAIT, || async {
            let d = call(
                bob,
                &format!("return s.transfers().downloads.find((d) => d.root === {root}) || null;"),
                WAIT,
            )
            .await?;
            Ok(if d["state"] == "complete" { Ok(()) } else { Err(format!("{d}")) })
        })
        .await?;
        let stored = hash_downloaded(bob, &file.root, WAIT).await?;
        ensure!(stored == file.root, "run {run}: stored bytes hash to {stored}");
        wait_opfs_paths(bob, "the download in OPFS", &[format!("weft-downloads/{key}")]).await?;
        call(bob, &format!("await s.forgetDownload({root}); return true;"), WAIT).await?;
        wait_opfs_paths(bob, "forgetting to delete the download", &[]).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_sent_again_after_the_receiver_forgot_it_arrives_and_forgetting_deletes_it() {
    let scratch = Scratch::new("again").unwrap();
    let file = generate(scratch.path(), "again.bin", mib(3) + 11, 43).unwrap();
    run!(
        "a_file_sent_again_after_the_receiver_forgot_it_arrives_and_forgetting_deletes_it",
        &["Alice", "Bob"],
        |net| offered_again_body(&net, &file).await
    );
}
