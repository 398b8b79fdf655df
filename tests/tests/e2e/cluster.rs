//! Three `weft-signal --cluster` processes sharing rooms through one real `nats-server`
//! (JetStream), all on loopback, each on a free port, started and stopped here; native
//! peers (`weft-peer`, real processes) spread over them. Shows: members on different
//! processes see each other, exchange signals and connect; a member on each process
//! messages another on the next; a room's size limit holds across processes; a process
//! killed with `kill -9` mid-session: its member reconnects to the next server, the
//! others see its old id leave once its lease ran out, and no session fails.
//!
//! Needs `nats-server` (Debian's; `cargo xtask test` installs it): skipped, saying why,
//! without it, unless `WEFT_REQUIRE_NATS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use weft_core::signal::{self, ClientMessage, ErrorCode, PROTOCOL_VERSION, RoomId, ServerMessage};
use weft_tests::native::{
    NativePeer, NatsServer, SignalProcess, command, config_dir, nats_missing, run,
};

const WAIT: Duration = Duration::from_secs(90);
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Three processes on one NATS server, each allowing rooms of four.
async fn cluster() -> (NatsServer, Vec<SignalProcess>) {
    let nats = NatsServer::start().await.unwrap();
    let mut servers = Vec::new();
    for _ in 0..3 {
        let args = ["--cluster", nats.url.as_str(), "--max-peers-per-room", "4"];
        servers.push(SignalProcess::start_local(&args).await.unwrap());
    }
    (nats, servers)
}

/// The servers' URLs starting at the `first`th, as a `--server` list.
fn servers_from(servers: &[SignalProcess], first: usize) -> String {
    let n = servers.len();
    (0..n).map(|i| servers[(first + i) % n].ws_url.clone()).collect::<Vec<_>>().join(",")
}

/// A server message, skipping others than `pred` wants (ICE servers, joins).
async fn next_where(ws: &mut Ws, pred: impl Fn(&ServerMessage) -> bool) -> ServerMessage {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await.expect("closed").expect("socket failed") {
                Message::Text(t) => {
                    let msg = signal::decode_server(t.as_str()).unwrap();
                    if pred(&msg) {
                        return msg;
                    }
                }
                Message::Close(f) => panic!("closed: {f:?}"),
                _ => {}
            }
        }
    })
    .await
    .expect("timed out waiting for a server message")
}

async fn join(url: &str, room: &RoomId) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let join = ClientMessage::Join { version: PROTOCOL_VERSION, room: room.clone() };
    ws.send(Message::text(signal::encode(&join))).await.unwrap();
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_spread_over_three_processes_limits_hold_and_survive_kill_9() {
    if let Some(why) = nats_missing() {
        if std::env::var_os("WEFT_REQUIRE_NATS").is_some() {
            panic!("WEFT_REQUIRE_NATS is set but {why}");
        }
        eprintln!("skipping: {why}");
        return;
    }
    let (_nats, mut servers) = cluster().await;

    // The size limit, across processes: four members, one or two on each, then a fifth
    // is refused wherever it comes in; once one leaves, a fifth gets in.
    let room = RoomId::new("limits").unwrap();
    let mut members = Vec::new();
    for i in 0..4 {
        let mut ws = join(&servers[i % 3].ws_url, &room).await;
        let welcome = next_where(&mut ws, |m| matches!(m, ServerMessage::Welcome { .. })).await;
        let ServerMessage::Welcome { peers, .. } = welcome else { unreachable!() };
        assert_eq!(peers.len(), i, "the welcome lists the members of every process");
        members.push(ws);
    }
    for server in &servers {
        let mut fifth = join(&server.ws_url, &room).await;
        let refused = next_where(&mut fifth, |m| {
            matches!(m, ServerMessage::Error { .. } | ServerMessage::Welcome { .. })
        })
        .await;
        assert!(
            matches!(refused, ServerMessage::Error { code: ErrorCode::RoomFull, .. }),
            "{refused:?}"
        );
    }
    // The first member (on process 0) leaves; the one on process 1 hears it.
    let mut first = members.remove(0);
    first.send(Message::text(signal::encode(&ClientMessage::Leave))).await.unwrap();
    next_where(&mut members[0], |m| matches!(m, ServerMessage::PeerLeft { .. })).await;
    let mut fifth = join(&servers[2].ws_url, &room).await;
    next_where(&mut fifth, |m| matches!(m, ServerMessage::Welcome { .. })).await;
    drop((first, fifth, members));

    // Three native peers, one on each process (each with the whole list, its own first).
    let invite = "Q".repeat(43);
    let names = ["Ada", "Bea", "Cy"];
    let mut peers = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let dir = config_dir(name).unwrap();
        let mut cmd = command(&servers_from(&servers, i), &dir, LOOPBACK).unwrap();
        cmd.args(["--invite", &invite, "--name", name, "up"]);
        peers.push(NativePeer::spawn(cmd).unwrap());
    }
    for (i, peer) in peers.iter_mut().enumerate() {
        for (j, other) in names.iter().enumerate() {
            if i != j {
                let what = format!("{} connected to {other}", names[i]);
                peer.expect(&what, WAIT, |v| v["event"] == "peer_connected" && v["name"] == *other)
                    .await
                    .unwrap();
            }
        }
    }

    // A member on each process messages a member on the next one (one sender, one key).
    let sender = config_dir("sender").unwrap();
    for i in 0..3 {
        let to = names[(i + 1) % 3];
        let mut cmd = command(&servers[i].ws_url, &sender, LOOPBACK).unwrap();
        let text = format!("from process {i}");
        cmd.args(["--invite", &invite, "--name", "Dee", "msg", to, &text]);
        let (status, stdout, stderr) = run(cmd, WAIT).await.unwrap();
        assert!(status.success(), "{stdout}\n{stderr}");
        peers[(i + 1) % 3]
            .expect(&format!("{to} gets {text:?}"), WAIT, |v| {
                v["event"] == "message" && v["text"] == text.as_str()
            })
            .await
            .unwrap();
    }

    // Ada's process dies mid-session.
    let ada_id = peers[0].expect_event("joined", WAIT).await.unwrap()["peer_id"].clone();
    let pid = servers[0].pid().unwrap();
    let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
    assert!(status.unwrap().success());
    servers[0].child.wait().await.unwrap();
    let killed = std::time::Instant::now();
    // Ada reconnects, to the next server on her list, and joins again under a new id.
    peers[0].expect_event("disconnected", WAIT).await.unwrap();
    let rejoined = peers[0]
        .expect("Ada joins again", WAIT, |v| v["event"] == "joined" && v["peer_id"] != ada_id)
        .await
        .unwrap();
    let peers_listed = rejoined["peers"].as_array().unwrap().len();
    // The others see her old id go once the dead process's lease ran out.
    for peer in &mut peers[1..] {
        peer.expect("Ada's old id leaves", WAIT, |v| {
            v["event"] == "peer_left" && v["peer_id"] == ada_id
        })
        .await
        .unwrap();
    }
    eprintln!("cluster: Ada's old id left {:.1} s after the kill", killed.elapsed().as_secs_f64());
    assert!(peers_listed >= 2, "{rejoined}");
    // She is reachable through the cluster again: a message via process 2.
    let mut cmd = command(&servers[2].ws_url, &sender, LOOPBACK).unwrap();
    cmd.args(["--invite", &invite, "--name", "Dee", "msg", "Ada", "after the kill"]);
    let (status, stdout, stderr) = run(cmd, WAIT).await.unwrap();
    assert!(status.success(), "{stdout}\n{stderr}");
    peers[0]
        .expect("Ada's message", WAIT, |v| v["event"] == "message" && v["text"] == "after the kill")
        .await
        .unwrap();
    // No session failed through it all.
    for (peer, name) in peers.iter().zip(names) {
        let failed: Vec<_> = peer.seen.iter().filter(|v| v["event"] == "peer_failed").collect();
        assert!(failed.is_empty(), "{name}: {failed:?}");
    }
    for mut peer in peers {
        let _ = peer.terminate(WAIT).await;
    }
}
