//! `cargo xtask bench signal`: signaling relay throughput and join latency, beside a raw
//! WebSocket forwarder (no parsing, no rooms) run in the same process as the baseline;
//! then the load and churn parts of `signal_load.rs` against a `weft-signal` process, and
//! the cluster part of `signal_cluster.rs` (three processes on NATS beside one alone).
//! `WEFT_BENCH_PARTS` (comma-separated: `relay`, `load`, `churn`, `cluster`) runs only those.
//!
//! Prints `BENCH <metric> <value> <unit>` lines.

use crate::median;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use weft_core::signal::{
    self, ClientMessage, PROTOCOL_VERSION, PeerId, RoomId, ServerMessage, SignalPayload,
};
use weft_signal::Limits;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const MESSAGES: usize = 50_000;
const JOINS: usize = 200;
const ROUNDS: usize = 3;

/// A typical trickled ICE candidate.
fn candidate() -> SignalPayload {
    SignalPayload::Candidate {
        candidate: "candidate:842163049 1 udp 1677729535 198.51.100.7 46154 typ srflx raddr \
                    10.0.0.2 rport 46154 generation 0 ufrag EsAw network-cost 999"
            .into(),
        sdp_mid: Some("0".into()),
        sdp_m_line_index: Some(0),
        username_fragment: Some("EsAw".into()),
    }
}

async fn next_text(ws: &mut Ws) -> Result<String> {
    loop {
        match ws.next().await.context("closed")?? {
            Message::Text(t) => return Ok(t.to_string()),
            Message::Close(f) => bail!("closed: {f:?}"),
            _ => {}
        }
    }
}

async fn join(url: &str, room: &RoomId) -> Result<(Ws, PeerId)> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let join = ClientMessage::Join { version: PROTOCOL_VERSION, room: room.clone() };
    ws.send(Message::text(signal::encode(&join))).await?;
    loop {
        if let ServerMessage::Welcome { peer_id, .. } =
            signal::decode_server(&next_text(&mut ws).await?)?
        {
            return Ok((ws, peer_id));
        }
    }
}

/// Messages per second from one sender to one receiver, pipelined.
async fn pump(mut tx: Ws, mut rx: Ws, frames: Vec<String>) -> Result<f64> {
    let n = frames.len();
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        for f in frames {
            tx.send(Message::text(f)).await?;
        }
        anyhow::Ok(tx)
    });
    for _ in 0..n {
        next_text(&mut rx).await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    sender.await??;
    Ok(n as f64 / elapsed)
}

/// Baseline: accepts two WebSockets and forwards every text frame from the first to the
/// second, untouched.
async fn raw_forwarder() -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}", listener.local_addr()?);
    tokio::spawn(async move {
        loop {
            let Ok((a, _)) = listener.accept().await else { return };
            let Ok((b, _)) = listener.accept().await else { return };
            let (Ok(mut a), Ok(b)) = (
                tokio_tungstenite::accept_async(a).await,
                tokio_tungstenite::accept_async(b).await,
            ) else {
                continue;
            };
            let (mut b_tx, _b_rx) = b.split();
            tokio::spawn(async move {
                while let Some(Ok(m)) = a.next().await {
                    if m.is_text() && b_tx.send(m).await.is_err() {
                        break;
                    }
                }
                drop(_b_rx);
            });
        }
    });
    Ok(url)
}

/// Whether `part` of the bench runs: `WEFT_BENCH_PARTS` (comma-separated: `relay`, `load`,
/// `churn`, `cluster`), default all.
fn runs(part: &str) -> bool {
    std::env::var("WEFT_BENCH_PARTS").map_or(true, |parts| parts.split(',').any(|p| p == part))
}

#[tokio::main]
pub async fn main() -> Result<()> {
    let limit = crate::signal_load::raise_fd_limit()?;
    println!("signal: open-file limit {limit}");
    if runs("relay") {
        relay().await?;
    }
    if runs("load") {
        crate::signal_load::load().await?;
    }
    if runs("churn") {
        crate::signal_load::churn().await?;
    }
    if runs("cluster") {
        crate::signal_cluster::cluster().await?;
    }
    Ok(())
}

/// The relay's throughput against a raw forwarder, and joins on an idle server.
async fn relay() -> Result<()> {
    let limits = Limits { messages_per_second: 1e9, message_burst: 1e9, ..Limits::default() };
    let server = weft_tests::start_server(limits).await?;
    let url = server.ws_url();
    let raw_url = raw_forwarder().await?;

    let mut weft_rates = Vec::new();
    let mut raw_rates = Vec::new();
    for round in 0..ROUNDS {
        let room = RoomId::new(format!("bench-{round}"))?;
        let (a, _) = join(&url, &room).await?;
        let (b, b_id) = join(&url, &room).await?;
        let frame =
            signal::encode(&ClientMessage::Signal { to: b_id.clone(), payload: candidate() });
        weft_rates.push(pump(a, b, vec![frame.clone(); MESSAGES]).await?);

        // The forwarder pairs connections in arrival order: connect both at once.
        let ((ra, _), (rb, _)) = tokio::try_join!(
            tokio_tungstenite::connect_async(&raw_url),
            tokio_tungstenite::connect_async(&raw_url)
        )?;
        // Same bytes per message as the relayed form.
        let relayed = signal::encode(&ServerMessage::Signal { from: b_id, payload: candidate() });
        raw_rates.push(pump(ra, rb, vec![relayed; MESSAGES]).await?);
    }
    let weft = median(weft_rates);
    let raw = median(raw_rates);

    let room = RoomId::new("bench-join")?;
    let mut joins = Vec::new();
    let mut keep = Vec::new();
    for _ in 0..JOINS {
        let start = Instant::now();
        let (ws, _) = join(&url, &room).await?;
        joins.push(start.elapsed().as_secs_f64() * 1000.0);
        keep.push(ws);
        if keep.len() >= 30 {
            keep.clear(); // stay under the room limit
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    println!("BENCH signal_relay_msgs_per_s {weft:.0} msg/s");
    println!("BENCH raw_ws_forward_msgs_per_s {raw:.0} msg/s");
    println!("BENCH signal_vs_raw_ratio {:.2} x", weft / raw);
    // The same figure under the name issue #15 gives it (the relay of signals, not TURN's).
    println!("BENCH relay_vs_raw_ratio {:.2} x", weft / raw);
    println!("BENCH signal_join_p50_ms {:.2} ms", median(joins));
    server.shutdown(Duration::from_secs(2)).await;
    Ok(())
}
