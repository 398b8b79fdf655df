//! `cargo xtask bench session`: encrypted sessions between two real headless Chromium
//! processes through the real signaling server.
//!
//! - `join_to_first_message_p50_ms`: browser B opens an invite link (navigation start) until
//!   the first message from browser A arrives in B's page; A sends as soon as the encrypted
//!   session with the new B is up. Median of [`JOINS`] joins.
//! - `passphrase_join_to_first_message_p50_ms`: the same in a passphrase network, from
//!   the page's `join` call (Argon2id twice, then each pair's PAKE before any description
//!   goes out) until the first message; `passphrase_join_after_kdf_p50_ms` is that less
//!   `passphrase_kdf_ms`, what the PAKE round adds to a join beside the invite figure.
//!   Invite and passphrase joins alternate, [`JOINS`] of each.
//! - `passphrase_kdf_ms`: the Argon2id cost of joining a passphrase network, in WASM.
//! - transport seal+open MB/s in WASM (Chromium) and native, the same core routine, same run;
//!   and the native seal-only figures of [`crate::transport`] (ring vs. RustCrypto).
//! - `page_weight_kb`: bytes on the wire (headers and encoded bodies, as the browser's
//!   resource timing counts them) for a first visit of the app, in a Chromium with an empty
//!   cache, until its WASM core is ready; `repeat_visit_kb`: the same for the next visit.
//!
//! `WEFT_BENCH_PARTS` (a comma list of `weight`, `transport`, `joins`; all by default) runs
//! only those parts: `weight` needs only the bundle and a browser, seconds instead of
//! minutes.
//!
//! `WEFT_BENCH_BASELINE_WEB_ROOT`, another build of the bundle (say main's, copied aside),
//! makes `weight` and `transport` compare this bundle with it in the same run: a second
//! server serves the baseline, its first visit is weighed the same way
//! (`page_weight_baseline_kb`), and the WASM seal+open runs [`WASM_ROUNDS`] times in each
//! page (`WEFT_BENCH_RUNS` sets how many), alternating, for medians of both and their
//! ratio (`transport_seal_open_wasm_vs_baseline_ratio`), and the median of each round's
//! ratio (`…_paired_ratio`): how a change to the module's build moves its speed, without
//! trusting a number from another day.
//!
//! Prints `BENCH <metric> <value> <unit>` lines.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use weft_signal::Limits;
use weft_tests::{ChromeDriver, browser_missing, js, start_server, start_server_serving, wait_for};

use crate::median;
use crate::transport::{PACKET, SEAL_OPEN_BYTES as TRANSPORT_BYTES};

const JOINS: usize = 12;
/// WASM seal+open runs per page (alternating with the baseline's when there is one), unless
/// `WEFT_BENCH_RUNS` says otherwise.
const WASM_ROUNDS: usize = 5;
const WAIT: Duration = Duration::from_secs(30);

/// The parts of the benchmark to run.
#[derive(Debug, Clone, Copy)]
struct Parts {
    weight: bool,
    transport: bool,
    joins: bool,
}

impl Parts {
    /// From `WEFT_BENCH_PARTS`; all when unset.
    fn from_env() -> Result<Self> {
        let Ok(list) = std::env::var("WEFT_BENCH_PARTS") else {
            return Ok(Self { weight: true, transport: true, joins: true });
        };
        let mut parts = Self { weight: false, transport: false, joins: false };
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "weight" => parts.weight = true,
                "transport" => parts.transport = true,
                "joins" => parts.joins = true,
                other => bail!("WEFT_BENCH_PARTS: no part {other:?} (weight, transport, joins)"),
            }
        }
        Ok(parts)
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

async fn module_ready(browser: &thirtyfour::WebDriver) -> Result<()> {
    wait_for("the page to load its WASM core", WAIT, || async {
        let ready = js(browser, "return !!window.weft").await?;
        Ok(if ready == Value::Bool(true) { Ok(()) } else { Err(ready.to_string()) })
    })
    .await
}

/// Runs `body` (an async function body using `weft`, the WASM module) in the page.
async fn run_async(browser: &thirtyfour::WebDriver, body: &str) -> Result<Value> {
    let script = format!(
        "const done = arguments[arguments.length - 1];
         (async () => {{ const weft = await import(document.getElementById('weft-module').href); {body} }})()
           .then((v) => done({{ ok: v }}), (e) => done({{ err: String(e) }}));"
    );
    let out = browser.execute_async(&script, Vec::new()).await?.json().clone();
    if let Some(err) = out.get("err") {
        bail!("in the page: {err}");
    }
    Ok(out.get("ok").cloned().unwrap_or(Value::Null))
}

/// Bytes the page's navigation and every resource it fetched took on the wire (resource
/// timing's `transferSize`: headers plus the encoded body; 0 for what came from the cache,
/// a few hundred bytes for a 304); each resource's share goes to stderr.
async fn bytes_on_the_wire(browser: &thirtyfour::WebDriver) -> Result<u64> {
    let v = js(
        browser,
        "return [...performance.getEntriesByType('navigation'),
                 ...performance.getEntriesByType('resource')]
                .map((e) => [e.name, e.transferSize]);",
    )
    .await?;
    let mut total = 0;
    for entry in v.as_array().context("no resource entries")? {
        let name = entry[0].as_str().unwrap_or("?");
        let bytes = entry[1].as_u64().unwrap_or(0);
        eprintln!("bench session: {bytes:>8} B {name}");
        total += bytes;
    }
    Ok(total)
}

#[tokio::main]
pub async fn main() -> Result<()> {
    if let Some(reason) = browser_missing() {
        bail!("the session benchmark needs Chromium and the built bundle: {reason}");
    }
    let parts = Parts::from_env()?;
    let server = start_server(Limits::default()).await?;
    let baseline_server = match std::env::var_os("WEFT_BENCH_BASELINE_WEB_ROOT") {
        Some(root) => Some(
            start_server_serving("127.0.0.1:0".parse()?, Limits::default(), root.into()).await?,
        ),
        None => None,
    };
    let driver = ChromeDriver::start().await?;
    let alice = driver.browser().await?;
    alice.set_script_timeout(Duration::from_secs(120)).await?;
    // The baseline's page, in a browser of its own (a fresh cache for its first visit).
    let baseline = match &baseline_server {
        Some(server) if parts.weight || parts.transport => {
            let browser = driver.browser().await?;
            browser.set_script_timeout(Duration::from_secs(120)).await?;
            Some((browser, server.url()))
        }
        _ => None,
    };

    // Page weight: Alice's profile is fresh, so her first visit starts with an empty cache.
    alice.goto(server.url()).await?;
    module_ready(&alice).await?;
    if parts.weight {
        let first_visit = bytes_on_the_wire(&alice).await?;
        alice.goto("about:blank").await?;
        alice.goto(server.url()).await?;
        module_ready(&alice).await?;
        let repeat_visit = bytes_on_the_wire(&alice).await?;
        println!("BENCH page_weight_kb {:.1} KB", first_visit as f64 / 1000.0);
        println!("BENCH repeat_visit_kb {:.1} KB", repeat_visit as f64 / 1000.0);
    }
    if let Some((browser, url)) = &baseline {
        browser.goto(url.as_str()).await?;
        module_ready(browser).await?;
        if parts.weight {
            let first_visit = bytes_on_the_wire(browser).await?;
            println!("BENCH page_weight_baseline_kb {:.1} KB", first_visit as f64 / 1000.0);
        }
    }
    if parts.transport {
        transport(&alice, baseline.as_ref().map(|(b, _)| b)).await?;
    }
    if let Some((browser, _)) = baseline {
        browser.quit().await?;
    }
    if parts.joins {
        joins(&server, &driver, &alice).await?;
        alice.quit().await?;
    } else {
        alice.quit().await?;
    }
    server.shutdown(Duration::from_secs(2)).await;
    if let Some(server) = baseline_server {
        server.shutdown(Duration::from_secs(2)).await;
    }
    Ok(())
}

/// One WASM seal+open run in `browser`'s page, MB/s.
async fn wasm_seal_open(browser: &thirtyfour::WebDriver) -> Result<f64> {
    run_async(browser, &format!("return weft.benchTransport({PACKET}, {TRANSPORT_BYTES});"))
        .await?
        .as_f64()
        .context("benchTransport returned no number")
}

/// The transport part: native seal/open, and the same routine in WASM (against the
/// baseline's page when there is one, alternating).
async fn transport(
    alice: &thirtyfour::WebDriver,
    baseline: Option<&thirtyfour::WebDriver>,
) -> Result<()> {
    let native = crate::transport::measure()?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..crate::bench_runs(WASM_ROUNDS) {
        // Alternate which page goes first, so neither always runs on a warmer machine.
        if let Some(base) = baseline.filter(|_| round % 2 == 1) {
            theirs.push(wasm_seal_open(base).await?);
        }
        ours.push(wasm_seal_open(alice).await?);
        if let Some(base) = baseline.filter(|_| round % 2 == 0) {
            theirs.push(wasm_seal_open(base).await?);
        }
    }
    eprintln!("bench session: WASM seal+open MB/s, this bundle {ours:.1?}, baseline {theirs:.1?}");
    // Each round's pair ran back to back: the median of their ratios cancels more of a busy
    // machine's swings than the ratio of the medians.
    let paired = median(ours.iter().zip(&theirs).map(|(a, b)| a / b).collect());
    let wasm_mb_s = median(ours);
    println!("BENCH transport_seal_open_wasm_mb_s {wasm_mb_s:.1} MB/s");
    if baseline.is_some() {
        let base_mb_s = median(theirs);
        println!("BENCH transport_seal_open_wasm_baseline_mb_s {base_mb_s:.1} MB/s");
        println!("BENCH transport_seal_open_wasm_vs_baseline_ratio {:.3} x", wasm_mb_s / base_mb_s);
        println!("BENCH transport_seal_open_wasm_vs_baseline_paired_ratio {paired:.3} x");
    }
    native.print();
    println!(
        "BENCH transport_wasm_vs_native_ratio {:.2} x",
        wasm_mb_s / native.seal_open_native_mb_s
    );
    Ok(())
}

async fn passphrase_kdf_ms(browser: &thirtyfour::WebDriver) -> Result<f64> {
    run_async(browser, "return weft.benchPassphraseKdf();")
        .await?
        .as_f64()
        .context("benchPassphraseKdf returned no number")
}

/// The joins part: invite and passphrase joins, alternating, each to its first message;
/// and the passphrase KDF in WASM, for what the PAKE round adds.
async fn joins(
    server: &weft_signal::Server,
    driver: &ChromeDriver,
    alice: &thirtyfour::WebDriver,
) -> Result<()> {
    let kdf_ms = passphrase_kdf_ms(alice).await?;
    let (bob, carol) = tokio::try_join!(driver.browser(), driver.browser())?;
    for b in [&bob, &carol] {
        b.set_script_timeout(Duration::from_secs(120)).await?;
    }

    // Alice opens a new network, Carol a passphrase network, and each greets every peer as
    // soon as its session is up.
    const GREET: &str = "window.weft.on((ev) => {
           if (ev.type === 'peer' && (ev.state === 'direct' || ev.state === 'relayed')) {
             window.greeted = window.greeted || new Set();
             if (!window.greeted.has(ev.peerId)) {
               window.greeted.add(ev.peerId);
               window.weft.session.sendMessage('hello', ev.peerId);
             }
           }
         });";
    run_async(
        alice,
        &format!("{GREET} await window.weft.join({{ invite: weft.createInvite() }}); return null;"),
    )
    .await?;
    carol.goto(server.url()).await?;
    module_ready(&carol).await?;
    let passphrase_net = format!(
        "{{ network: 'bench-{}', passphrase: 'correct horse battery staple' }}",
        std::process::id()
    );
    run_async(&carol, &format!("{GREET} await window.weft.join({passphrase_net}); return null;"))
        .await?;
    let invite = js(alice, "return window.weft.session.invite").await?;
    let invite = invite.as_str().context("no invite")?.to_string();
    let link = format!("{}#invite={invite}", server.url());

    let first_message = |i: usize, since: &'static str| {
        let bob = &bob;
        async move {
            wait_for("Bob's first message", WAIT, || async {
                let v = js(
                    bob,
                    &format!(
                        "const t = document.querySelector('#messages li time');
                         return t ? Date.parse(t.dateTime) - performance.timeOrigin - {since} : null;"
                    ),
                )
                .await?;
                Ok(v.as_f64().ok_or_else(|| format!("join {i}: no message yet")))
            })
            .await
        }
    };
    let mut joins = Vec::with_capacity(JOINS);
    let mut passphrase_joins = Vec::with_capacity(JOINS);
    for i in 0..JOINS {
        bob.goto("about:blank").await?;
        bob.goto(&link).await?;
        joins.push(first_message(i, "0").await?);
        // The same join by name and passphrase, timed from the page's `join` call.
        bob.goto("about:blank").await?;
        bob.goto(server.url()).await?;
        module_ready(&bob).await?;
        run_async(
            &bob,
            &format!(
                "window.joinAt = performance.now(); await window.weft.join({passphrase_net}); return null;"
            ),
        )
        .await?;
        passphrase_joins.push(first_message(i, "window.joinAt").await?);
    }

    println!("BENCH join_to_first_message_p50_ms {:.0} ms", percentile(joins.clone(), 0.5));
    println!("BENCH join_to_first_message_p90_ms {:.0} ms", percentile(joins, 0.9));
    let passphrase_p50 = percentile(passphrase_joins, 0.5);
    println!("BENCH passphrase_join_to_first_message_p50_ms {passphrase_p50:.0} ms");
    println!("BENCH passphrase_join_after_kdf_p50_ms {:.0} ms", passphrase_p50 - kdf_ms);
    println!("BENCH passphrase_kdf_ms {kdf_ms:.0} ms");
    bob.quit().await?;
    carol.quit().await?;
    Ok(())
}
