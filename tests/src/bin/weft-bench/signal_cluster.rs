//! `cargo xtask bench signal`, the cluster part: three `weft-signal --cluster` processes
//! sharing rooms through one `nats-server` (JetStream), beside one process alone, in the
//! same run, measured the same way:
//!
//! - `cluster_join_p99_ms` / `single_join_p99_ms`: rooms of three, their members joining
//!   one after the other, each on another process (round robin); from the TCP connect to
//!   the welcome. In the cluster, a join is a compare-and-set of the room in NATS.
//! - `cluster_forward_p99_ms` / `single_forward_p99_ms`: one signal at a time from a
//!   member to another of its room, which in the cluster is on another process; from the
//!   send to its arrival.
//!
//! `WEFT_BENCH_SAMPLES` (default 300 joins and 1,000 signals per side) shortens a run.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use weft_core::signal::{self, ClientMessage, RoomId, ServerMessage};
use weft_tests::native::{NatsServer, SignalProcess};

use crate::signal_load::{LightWs, connect, join, next_message, percentile, source};

const JOINS: usize = 300;
const SIGNALS: usize = 1_000;

/// Join latencies (ms) of `n` members in rooms of three, member `k` on `servers[k % len]`.
async fn joins(servers: &[SocketAddr], n: usize, tag: &str) -> Result<Vec<f64>> {
    let mut held = Vec::new();
    let mut ms = Vec::new();
    for k in 0..n {
        let room = RoomId::new(format!("{tag}-{}", k / 3))?;
        let start = Instant::now();
        let mut ws = connect(servers[k % servers.len()], source(4, k, 100)).await?;
        join(&mut ws, &room).await?;
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
        held.push(ws);
        if held.len() == 30 {
            held.clear();
        }
    }
    Ok(ms)
}

/// Forwarding latencies (ms) of `n` signals from a member on `a` to one on `b`.
async fn forwards(a: SocketAddr, b: SocketAddr, n: usize, tag: &str) -> Result<Vec<f64>> {
    let room = RoomId::new(format!("{tag}-forward"))?;
    let mut first = connect(a, source(5, 0, 1)).await?;
    join(&mut first, &room).await?;
    let mut second: LightWs = connect(b, source(5, 1, 1)).await?;
    let (_, peers) = join(&mut second, &room).await?;
    let to = peers.first().context("the first member is not in the welcome")?.clone();
    let payload = weft_core::signal::SignalPayload::Opaque { data: "x".repeat(200) };
    let frame = signal::encode(&ClientMessage::Signal { to, payload });
    let mut ms = Vec::new();
    for _ in 0..n {
        let start = Instant::now();
        second.send(Message::text(frame.clone())).await?;
        loop {
            match next_message(&mut first).await? {
                ServerMessage::Signal { .. } => break,
                ServerMessage::Error { code, message } => bail!("refused: {code}: {message}"),
                _ => {}
            }
        }
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(ms)
}

fn addr(server: &SignalProcess) -> Result<SocketAddr> {
    Ok(crate::signal_load::target(server)?.0)
}

/// The cluster part. Prints its `BENCH` lines.
pub(crate) async fn cluster() -> Result<()> {
    let samples: Option<usize> =
        std::env::var("WEFT_BENCH_SAMPLES").ok().and_then(|v| v.parse().ok());
    let (n_joins, n_signals) = samples.map_or((JOINS, SIGNALS), |n| (n, n));
    let nats = NatsServer::start().await?;
    let single = SignalProcess::start_local(&[]).await?;
    let mut cluster = Vec::new();
    for _ in 0..3 {
        cluster.push(SignalProcess::start_local(&["--cluster", &nats.url]).await?);
    }
    let single = [addr(&single)?];
    let shared = cluster.iter().map(addr).collect::<Result<Vec<_>>>()?;

    // Alternating halves, so that a busier moment of the machine falls on both sides.
    let (mut single_joins, mut cluster_joins) = (Vec::new(), Vec::new());
    let (mut single_fwd, mut cluster_fwd) = (Vec::new(), Vec::new());
    for half in 0..2 {
        single_joins.extend(joins(&single, n_joins / 2, &format!("s{half}")).await?);
        cluster_joins.extend(joins(&shared, n_joins / 2, &format!("c{half}")).await?);
        let tag = format!("s{half}");
        single_fwd.extend(forwards(single[0], single[0], n_signals / 2, &tag).await?);
        let tag = format!("c{half}");
        cluster_fwd.extend(forwards(shared[0], shared[1], n_signals / 2, &tag).await?);
    }
    for (name, v) in [
        ("single_join", &single_joins),
        ("cluster_join", &cluster_joins),
        ("single_forward", &single_fwd),
        ("cluster_forward", &cluster_fwd),
    ] {
        println!("BENCH {name}_p50_ms {:.2} ms", percentile(v.clone(), 50.0));
        println!("BENCH {name}_p99_ms {:.2} ms", percentile(v.clone(), 99.0));
    }
    drop(cluster);
    drop(nats);
    Ok(())
}
