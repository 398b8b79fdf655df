//! `cargo xtask bench signal`, the load parts: one `weft-signal` process (the release
//! binary, a process of its own so that its CPU and memory are its own) holding many
//! WebSocket clients, and the same server under churn.
//!
//! - `signal_concurrent_peers`: clients connected, joined (rooms of 2 to 8) and
//!   heartbeating as `weft-peer` and the browser do (a `ping` every 15 s), that are still
//!   open after the hold and answer a last ping. Target ≥ 10,000.
//! - `signal_join_p99_ms`: while they are held, new clients connect and join one of their
//!   rooms (four at a time); from starting the TCP connection to the welcome. Target ≤ 50.
//! - `signal_rss_per_peer_kb`: the server's resident memory with every client joined,
//!   minus its memory at start, per client.
//! - `signal_churn_rss_growth_mb`: 1,000 clients that each connect, join a room of four,
//!   stay a moment, leave and close, over and over, for a minute; the server's memory once
//!   they all closed after the first sixth of the run (warm-up: allocator pools, tables at
//!   their working size), against its memory once they all closed at the end. Target ≈ 0.
//!
//! The clients are light (tokio-tungstenite, 4 KiB read buffers, one task each) and the
//! bench prints their CPU beside the server's, so that one can see which side limits.
//!
//! Clients come from many loopback addresses (127.1.0.0/16 and up; all of 127.0.0.0/8 is
//! the loopback here), 200 per address: the server runs with its default per-address
//! limit (256 connections) like a real deployment, instead of a bench-only flag that
//! would leave that code path unmeasured. The file-descriptor limit is raised inside
//! this process (soft to hard, `setrlimit`), which the server inherits.
//!
//! `WEFT_BENCH_PEERS` (default 10,000), `WEFT_BENCH_HOLD_S` (default 20),
//! `WEFT_BENCH_CHURN_S` (default 60) shorten a run while iterating.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt, stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use weft_core::signal::{self, ClientMessage, PROTOCOL_VERSION, PeerId, RoomId, ServerMessage};
use weft_tests::native::SignalProcess;

use crate::cpu_ms;

/// A light client's WebSocket.
pub(crate) type LightWs = WebSocketStream<TcpStream>;

const PEERS: usize = 10_000;
const HOLD_S: u64 = 20;
const CHURN_S: u64 = 60;
const CHURN_PEERS: usize = 1_000;
const JOIN_SAMPLES: usize = 400;
/// Clients per source address: under the server's default per-address limit of 256.
const PER_ADDRESS: usize = 200;
/// As `weft-peer` and the browser: `NodeConfig`'s default heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// Connections being opened at once while loading the server.
const OPENING: usize = 64;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The `n`th source address of block `block` (127.`block`.x.y), `per` clients to each.
pub(crate) fn source(block: u8, n: usize, per: usize) -> Ipv4Addr {
    let a = n / per.max(1);
    Ipv4Addr::new(127, block, u8::try_from(a / 250).unwrap_or(u8::MAX), (a % 250 + 1) as u8)
}

/// Raises this process's open-file limit to its hard limit (children inherit it).
pub(crate) fn raise_fd_limit() -> Result<u64> {
    let (_, hard) = rlimit::Resource::NOFILE.get()?;
    rlimit::Resource::NOFILE.set(hard, hard)?;
    Ok(hard)
}

/// Opens a WebSocket to `server` from `from`, with small buffers.
pub(crate) async fn connect(server: SocketAddr, from: Ipv4Addr) -> Result<LightWs> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.into(), 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let url = format!("ws://{server}/ws");
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
    Ok(ws)
}

/// The next server message (pings and pongs of the WebSocket layer skipped).
pub(crate) async fn next_message(ws: &mut LightWs) -> Result<ServerMessage> {
    loop {
        match ws.next().await.context("closed")?? {
            Message::Text(t) => return Ok(signal::decode_server(t.as_str())?),
            Message::Close(f) => bail!("closed: {f:?}"),
            _ => {}
        }
    }
}

/// Sends a join for `room` and waits for the welcome: our peer id and the members.
pub(crate) async fn join(ws: &mut LightWs, room: &RoomId) -> Result<(PeerId, Vec<PeerId>)> {
    let join = ClientMessage::Join { version: PROTOCOL_VERSION, room: room.clone() };
    ws.send(Message::text(signal::encode(&join))).await?;
    loop {
        match next_message(ws).await? {
            ServerMessage::Welcome { peer_id, peers, .. } => return Ok((peer_id, peers)),
            ServerMessage::Error { code, message } => bail!("refused: {code}: {message}"),
            _ => {}
        }
    }
}

/// Connects from `from`, joins `room`; milliseconds from the TCP connect to the welcome.
async fn connect_and_join(
    server: SocketAddr,
    from: Ipv4Addr,
    room: &RoomId,
) -> Result<(LightWs, f64)> {
    let start = Instant::now();
    let mut ws = connect(server, from).await?;
    join(&mut ws, room).await?;
    Ok((ws, start.elapsed().as_secs_f64() * 1000.0))
}

/// Holds a joined client: a `ping` every [`HEARTBEAT`] (first after `phase`), each to be
/// answered before the next; at `stop`, one more that must be answered within 30 s.
/// `true`: still open and answering at the end.
async fn hold(mut ws: LightWs, phase: Duration, mut stop: watch::Receiver<bool>) -> bool {
    let ping = Message::text(signal::encode(&ClientMessage::Ping));
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + phase, HEARTBEAT);
    let mut answered = true;
    loop {
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(t))) => {
                    if matches!(signal::decode_server(t.as_str()), Ok(ServerMessage::Pong)) {
                        answered = true;
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return false,
                Some(Ok(_)) => {}
            },
            _ = beat.tick() => {
                if !answered || ws.send(ping.clone()).await.is_err() {
                    return false;
                }
                answered = false;
            }
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
        }
    }
    if ws.send(ping).await.is_err() {
        return false;
    }
    let last = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match next_message(&mut ws).await {
                Ok(ServerMessage::Pong) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    });
    let alive = last.await.unwrap_or(false);
    let _ = ws.close(None).await;
    alive
}

/// The resident memory of process `pid`, in KiB.
pub(crate) fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// The server's open connections, from `/healthz`.
pub(crate) async fn connections(server: SocketAddr) -> Result<u64> {
    let mut tcp = TcpStream::connect(server).await?;
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tcp.read_to_string(&mut response).await?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).context("no body")?;
    let health: serde_json::Value = serde_json::from_str(body)?;
    health["connections"].as_u64().context("no connection count")
}

/// Waits until the server holds no connection (at most a minute).
async fn drained(server: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open = connections(server).await?;
        if open == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the server still holds {open} connections a minute after every client closed");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The server's address (`host:port`) and process id.
pub(crate) fn target(server: &SignalProcess) -> Result<(SocketAddr, u32)> {
    let addr = server.authority().parse().context("server address")?;
    Ok((addr, server.pid().context("server exited")?))
}

/// The `p`th percentile (0..=100) of `v`, nearest rank.
pub(crate) fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The size of load room `k`: 2 to 8.
fn room_size(k: usize) -> usize {
    2 + k % 7
}

/// The load part. Prints its `BENCH` lines.
pub(crate) async fn load() -> Result<()> {
    let peers: usize = env_or("WEFT_BENCH_PEERS", PEERS);
    let hold_for = Duration::from_secs(env_or("WEFT_BENCH_HOLD_S", HOLD_S));
    let server = SignalProcess::start_local(&[]).await?;
    let (addr, pid) = target(&server)?;
    let rss_start = rss_kb(pid)?;

    // Which room each client joins: rooms of 2 to 8, filled in turn.
    let mut rooms = Vec::new();
    let mut k = 0;
    while rooms.len() < peers {
        let size = room_size(k);
        rooms.extend(std::iter::repeat_n(k, size.min(peers - rooms.len())));
        k += 1;
    }
    let room_count = k;
    let room_names: Vec<RoomId> =
        (0..room_count).map(|k| RoomId::new(format!("load-{k}"))).collect::<Result<_, _>>()?;
    let room_name = |k: usize| room_names[k].clone();

    let (stop, stop_rx) = watch::channel(false);
    let (cpu_client0, cpu_server0) = (cpu_ms(std::process::id())?, cpu_ms(pid)?);
    let started = Instant::now();
    let failed = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let holders: Vec<_> = stream::iter(0..peers)
        .map(|i| {
            let room = room_name(rooms[i]);
            async move { (i, connect_and_join(addr, source(1, i, PER_ADDRESS), &room).await) }
        })
        .buffer_unordered(OPENING)
        .filter_map(|(i, joined)| {
            let failed = failed.clone();
            let first_error = first_error.clone();
            let stop_rx = stop_rx.clone();
            async move {
                match joined {
                    Ok((ws, _)) => {
                        // Heartbeats spread over the interval, as real clients' are.
                        let phase = HEARTBEAT.mul_f64((i % 1000) as f64 / 1000.0);
                        Some(tokio::spawn(hold(ws, phase, stop_rx)))
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(format!("{e:#}"));
                        None
                    }
                }
            }
        })
        .collect()
        .await;
    let connect_s = started.elapsed().as_secs_f64();
    let (cpu_client1, cpu_server1) = (cpu_ms(std::process::id())?, cpu_ms(pid)?);
    let rss_loaded = rss_kb(pid)?;
    if let Some(e) = first_error.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        println!(
            "signal load: {} of {peers} clients could not join; first: {e}",
            failed.load(Ordering::Relaxed)
        );
    }
    println!(
        "signal load: {} clients joined {room_count} rooms in {connect_s:.1} s (server CPU \
         {:.1} s, clients' {:.1} s)",
        holders.len(),
        (cpu_server1 - cpu_server0) / 1000.0,
        (cpu_client1 - cpu_client0) / 1000.0,
    );

    // Joins under load, while the held clients heartbeat.
    let hold_start = Instant::now();
    let joins: Vec<f64> = stream::iter(0..JOIN_SAMPLES)
        .map(|i| async move {
            let room = room_name(i * 7 % room_count);
            let (mut ws, ms) = connect_and_join(addr, source(2, i, PER_ADDRESS), &room).await?;
            let _ = ws.send(Message::text(signal::encode(&ClientMessage::Leave))).await;
            let _ = ws.close(None).await;
            anyhow::Ok(ms)
        })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let rest = hold_for.saturating_sub(hold_start.elapsed());
    let (cpu_client2, cpu_server2) = (cpu_ms(std::process::id())?, cpu_ms(pid)?);
    tokio::time::sleep(rest).await;
    let held_s = hold_start.elapsed().as_secs_f64();
    let (cpu_client3, cpu_server3) = (cpu_ms(std::process::id())?, cpu_ms(pid)?);
    stop.send_replace(true);
    let mut alive = 0;
    for h in holders {
        if h.await.unwrap_or(false) {
            alive += 1;
        }
    }
    let steady_wall = (held_s - hold_start.elapsed().as_secs_f64() + rest.as_secs_f64())
        .max(rest.as_secs_f64())
        .max(1e-3);
    println!("BENCH signal_concurrent_peers {alive} peers");
    println!("BENCH signal_join_p50_loaded_ms {:.2} ms", percentile(joins.clone(), 50.0));
    println!("BENCH signal_join_p99_ms {:.2} ms", percentile(joins, 99.0));
    println!(
        "BENCH signal_rss_per_peer_kb {:.2} KiB",
        rss_loaded.saturating_sub(rss_start) as f64 / alive.max(1) as f64
    );
    println!("BENCH signal_load_connect_per_s {:.0} conn/s", peers as f64 / connect_s);
    // While only heartbeats flow: what each side spends to keep them all open.
    println!(
        "BENCH signal_hold_server_cpu_pct {:.1} %",
        (cpu_server3 - cpu_server2) / 10.0 / steady_wall
    );
    println!(
        "BENCH signal_hold_client_cpu_pct {:.1} %",
        (cpu_client3 - cpu_client2) / 10.0 / steady_wall
    );
    println!(
        "BENCH signal_load_server_vs_client_cpu_ratio {:.2} x",
        (cpu_server1 - cpu_server0) / (cpu_client1 - cpu_client0).max(1.0)
    );
    if alive < peers {
        println!("signal load: {} clients were dropped or did not answer", peers - alive);
    }
    drop(server);
    Ok(())
}

/// One churning client: connect, join, stay a moment, leave and close, until `stop`.
/// Returns the joins it made.
async fn churn_client(server: SocketAddr, i: usize, stop: watch::Receiver<bool>) -> Result<usize> {
    let mut joins = 0;
    let room = RoomId::new(format!("churn-{}", i / 4))?;
    while !*stop.borrow() {
        let (mut ws, _) = connect_and_join(server, source(3, i, 1), &room).await?;
        joins += 1;
        // 0 to 490 ms in the room: members see each other come and go.
        let stay = Duration::from_millis(((i * 37 + joins * 11) % 50 * 10) as u64);
        tokio::time::sleep(stay).await;
        ws.send(Message::text(signal::encode(&ClientMessage::Leave))).await?;
        let _ = ws.close(None).await;
        // The server's close frame, then the end.
        while let Some(Ok(_)) = ws.next().await {}
    }
    Ok(joins)
}

/// Runs [`CHURN_PEERS`] churning clients for `run`; their joins.
async fn churn_for(server: SocketAddr, run: Duration) -> Result<usize> {
    let (stop, stop_rx) = watch::channel(false);
    let clients: Vec<_> =
        (0..CHURN_PEERS).map(|i| tokio::spawn(churn_client(server, i, stop_rx.clone()))).collect();
    tokio::time::sleep(run).await;
    stop.send_replace(true);
    let mut joins = 0;
    for c in clients {
        joins += c.await.map_err(|e| anyhow!("churn client: {e}"))??;
    }
    drained(server).await?;
    Ok(joins)
}

/// The churn part. Prints its `BENCH` lines.
pub(crate) async fn churn() -> Result<()> {
    let run = Duration::from_secs(env_or("WEFT_BENCH_CHURN_S", CHURN_S));
    let server = SignalProcess::start_local(&[]).await?;
    let (addr, pid) = target(&server)?;
    let warm_up = run / 6;
    let start = Instant::now();
    let warm_joins = churn_for(addr, warm_up).await?;
    let rss_warm = rss_kb(pid)?;
    let joins = churn_for(addr, run.saturating_sub(warm_up)).await?;
    let rss_end = rss_kb(pid)?;
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "signal churn: {} joins and leaves by {CHURN_PEERS} clients in {elapsed:.0} s; server \
         RSS {} KiB after warm-up, {} KiB at the end",
        warm_joins + joins,
        rss_warm,
        rss_end
    );
    println!("BENCH signal_churn_joins_per_s {:.0} joins/s", (warm_joins + joins) as f64 / elapsed);
    println!(
        "BENCH signal_churn_rss_growth_mb {:.2} MB",
        (rss_end as f64 - rss_warm as f64) / 1024.0
    );
    drop(server);
    Ok(())
}
