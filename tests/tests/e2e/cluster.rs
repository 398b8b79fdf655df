//! Three `weft-signal --cluster` processes sharing rooms through one real `nats-server`
//! (JetStream), all on loopback, each on a free port, started and stopped here; native
//! peers (`weft-peer`, real processes) and a real headless Chromium (the WASM driver)
//! spread over them. Shows: members on different processes see each other, exchange
//! signals and connect; a member on each process messages the others; a room's size
//! limit holds across processes; a process killed with `kill -9` mid-session: its member
//! (a native peer, or the browser) reconnects to the next server on its list by itself,
//! the others see its old id leave once its lease ran out, messages flow both ways again
//! and no session fails.
//!
//! Needs `nats-server` (Debian's; `cargo xtask test` installs it): skipped, saying why,
//! without it, unless `WEFT_REQUIRE_NATS=1`. The browser test also needs Chromium and the
//! built web app (`cargo xtask bundle`), as every browser test does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use thirtyfour::WebDriver;
use tokio_tungstenite::tungstenite::Message;
use weft_core::signal::{
    self, ClientMessage, ErrorCode, PROTOCOL_VERSION, PeerId, RoomId, ServerMessage, SignalPayload,
};
use weft_tests::mitm::local_ice_ip;
use weft_tests::native::{
    NativePeer, NatsServer, SignalProcess, command, config_dir, nats_missing, run,
};
use weft_tests::{ChromeDriver, browser_available, js, wait_for, wait_message, wait_peer};

const WAIT: Duration = Duration::from_secs(90);
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// `n` processes on one NATS server, each with arguments `extra` as well.
async fn processes(n: usize, extra: &[&str]) -> (NatsServer, Vec<SignalProcess>) {
    let nats = NatsServer::start().await.unwrap();
    let mut servers = Vec::new();
    for _ in 0..n {
        let args: Vec<&str> =
            ["--cluster", nats.url.as_str()].into_iter().chain(extra.iter().copied()).collect();
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

/// Whether to skip: no `nats-server` (and `WEFT_REQUIRE_NATS` unset).
fn skip_without_nats() -> bool {
    let Some(why) = nats_missing() else { return false };
    if std::env::var_os("WEFT_REQUIRE_NATS").is_some() {
        panic!("WEFT_REQUIRE_NATS is set but {why}");
    }
    eprintln!("skipping: {why}");
    true
}

/// The welcome on `ws`: its id and the other members.
async fn welcome(ws: &mut Ws) -> (PeerId, Vec<PeerId>) {
    match next_where(ws, |m| matches!(m, ServerMessage::Welcome { .. })).await {
        ServerMessage::Welcome { peer_id, peers, .. } => (peer_id, peers),
        _ => unreachable!(),
    }
}

/// Signals `to` from `ws` and waits until `to_ws` gets it from `from`.
async fn signal_across(ws: &mut Ws, from: &PeerId, to_ws: &mut Ws, to: &PeerId, data: &str) {
    let payload = SignalPayload::Opaque { data: data.into() };
    let msg = ClientMessage::Signal { to: to.clone(), payload: payload.clone() };
    ws.send(Message::text(signal::encode(&msg))).await.unwrap();
    let got = next_where(to_ws, |m| matches!(m, ServerMessage::Signal { .. })).await;
    assert_eq!(got, ServerMessage::Signal { from: from.clone(), payload });
}

fn kill(signal: &str, pid: u32) {
    let status = std::process::Command::new("kill").args([signal, &pid.to_string()]).status();
    assert!(status.unwrap().success(), "kill {signal} {pid}");
}

/// The first answer to a join on `ws`: the welcome, or the refusal.
async fn join_answer(ws: &mut Ws) -> ServerMessage {
    next_where(ws, |m| matches!(m, ServerMessage::Error { .. } | ServerMessage::Welcome { .. }))
        .await
}

/// The rooms one address may be in hold across processes: two processes allowing two
/// rooms per address each; with one room taken on each, a third is refused on both (each
/// alone would admit it: it has one), a second member in a room already counted is not;
/// once one room is left, the third gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_per_address_hold_across_processes() {
    if skip_without_nats() {
        return;
    }
    let (_nats, servers) = processes(2, &["--max-rooms-per-ip", "2"]).await;
    let [one, two, three] = ["one", "two", "three"].map(|r| RoomId::new(r).unwrap());
    let mut in_one = join(&servers[0].ws_url, &one).await;
    welcome(&mut in_one).await;
    let mut in_two = join(&servers[1].ws_url, &two).await;
    welcome(&mut in_two).await;
    for server in &servers {
        let mut refused = join(&server.ws_url, &three).await;
        let answer = join_answer(&mut refused).await;
        assert!(
            matches!(answer, ServerMessage::Error { code: ErrorCode::AddressRooms, .. }),
            "{answer:?}"
        );
    }
    let mut also_in_one = join(&servers[1].ws_url, &one).await;
    welcome(&mut also_in_one).await;

    in_two.send(Message::text(signal::encode(&ClientMessage::Leave))).await.unwrap();
    // The leave is written asynchronously: ask until it has been (a refusal leaves the
    // connection open), each answer awaited, the whole bounded by WAIT.
    let mut in_three = join(&servers[0].ws_url, &three).await;
    tokio::time::timeout(WAIT, async {
        loop {
            match join_answer(&mut in_three).await {
                ServerMessage::Welcome { .. } => break,
                ServerMessage::Error { code: ErrorCode::AddressRooms, .. } => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let again =
                        ClientMessage::Join { version: PROTOCOL_VERSION, room: three.clone() };
                    in_three.send(Message::text(signal::encode(&again))).await.unwrap();
                }
                other => panic!("{other:?}"),
            }
        }
    })
    .await
    .expect("the third room stayed refused after the second was left");
}

/// A process stopped (a real SIGSTOP) for longer than its lease, then resumed: the others
/// dropped its member meanwhile (their members see it leave); once it runs again it finds
/// its lease lost and closes the connections from before with `shutting_down`, so their
/// clients reconnect and join again (here to the same process, which serves again), and
/// signals cross between the processes as before. Without the fence, the stalled
/// process's member would stay connected to a room in which nobody else sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_stopped_past_its_lease_sends_its_members_to_join_again() {
    if skip_without_nats() {
        return;
    }
    let (_nats, servers) = processes(2, &[]).await;
    let room = RoomId::new("stall").unwrap();
    let mut a = join(&servers[0].ws_url, &room).await;
    let (a_id, _) = welcome(&mut a).await;
    let mut b = join(&servers[1].ws_url, &room).await;
    let (b_id, peers) = welcome(&mut b).await;
    assert_eq!(peers, vec![a_id.clone()]);
    signal_across(&mut a, &a_id, &mut b, &b_id, "before").await;

    let pid = servers[0].pid().unwrap();
    kill("-STOP", pid);
    let stopped = std::time::Instant::now();
    let left = next_where(&mut b, |m| matches!(m, ServerMessage::PeerLeft { .. })).await;
    assert_eq!(left, ServerMessage::PeerLeft { peer_id: a_id.clone() });
    eprintln!(
        "cluster: the stopped process's member left after {:.1} s",
        stopped.elapsed().as_secs_f64()
    );
    kill("-CONT", pid);

    let told = next_where(&mut a, |m| matches!(m, ServerMessage::Error { .. })).await;
    assert!(matches!(told, ServerMessage::Error { code: ErrorCode::ShuttingDown, .. }), "{told:?}");
    let mut a = join(&servers[0].ws_url, &room).await;
    let (a_id, peers) = welcome(&mut a).await;
    assert_eq!(peers, vec![b_id.clone()]);
    let joined = next_where(&mut b, |m| matches!(m, ServerMessage::PeerJoined { .. })).await;
    assert_eq!(joined, ServerMessage::PeerJoined { peer_id: a_id.clone() });
    signal_across(&mut a, &a_id, &mut b, &b_id, "after, from the resumed process").await;
    signal_across(&mut b, &b_id, &mut a, &a_id, "after, to the resumed process").await;
    // The resumed process still follows the room: a join on the other one reaches it.
    let mut c = join(&servers[1].ws_url, &room).await;
    let (c_id, _) = welcome(&mut c).await;
    let joined = next_where(&mut a, |m| matches!(m, ServerMessage::PeerJoined { .. })).await;
    assert_eq!(joined, ServerMessage::PeerJoined { peer_id: c_id.clone() });
    signal_across(&mut c, &c_id, &mut a, &a_id, "from a newcomer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_spread_over_three_processes_limits_hold_and_survive_kill_9() {
    if skip_without_nats() {
        return;
    }
    let (_nats, mut servers) = processes(3, &["--max-peers-per-room", "4"]).await;

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

/// The browser's recorded events (see `weft_tests::start_join`) of type `kind`.
async fn browser_events(browser: &WebDriver, kind: &str) -> anyhow::Result<Vec<Value>> {
    let events = js(browser, "return (window.t && window.t.events) || [];").await?;
    Ok(events.as_array().into_iter().flatten().filter(|e| e["type"] == kind).cloned().collect())
}

/// Waits until the browser has joined under an id other than `not`; that id.
async fn browser_joined(browser: &WebDriver, not: Option<&str>) -> anyhow::Result<String> {
    wait_for("the browser to join", WAIT, || async {
        let error = js(browser, "return (window.t && window.t.error) || null;").await?;
        if let Some(e) = error.as_str() {
            anyhow::bail!("join failed: {e}");
        }
        let joined = browser_events(browser, "joined").await?;
        let id =
            joined.iter().rev().find_map(|e| e["peerId"].as_str().filter(|id| Some(*id) != not));
        match id {
            Some(id) => Ok(Ok(id.to_string())),
            None => {
                let logs = js(browser, "return (window.t.logs || []).slice(-20);").await?;
                Ok(Err(format!(
                    "joined: {joined:?}, statuses: {:?}, logs: {logs}",
                    browser_events(browser, "status").await?
                )))
            }
        }
    })
    .await
}

/// `weft-peer msg` from `name`'s own identity (its config directory, its name: the same
/// member in everyone's trust store), through the servers `servers` lists first.
async fn msg_as(
    name: &str,
    dir: &std::path::Path,
    servers: &str,
    invite: &str,
    to: &str,
    text: &str,
) {
    let mut cmd = command(servers, dir, local_ice_ip().unwrap()).unwrap();
    cmd.args(["--invite", invite, "--name", name, "msg", to, text]);
    let (status, stdout, stderr) = run(cmd, WAIT).await.unwrap();
    assert!(status.success(), "{name} -> {to}: {stdout}\n{stderr}");
}

/// A room of three over three processes: a browser (the page served by process 0, which
/// it joins through first, given all three) and two native peers on processes 1 and 2.
/// Each messages the others. Then process 0 is killed with `kill -9`: the browser, told
/// nothing, moves to the next process on its list (the node's own policy, as a native
/// peer does), joins again under a new id, and is reachable through the cluster: the
/// native members' messages, which need signaling to find its new id, reach it; its
/// messages reach them; no session failed. With the failover broken (the browser trying
/// only the dead process) it never joins again and this fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_in_a_room_over_three_processes_fails_over_after_kill_9() {
    if skip_without_nats()
        || !browser_available("a_browser_in_a_room_over_three_processes_fails_over_after_kill_9")
    {
        return;
    }
    let (_nats, mut servers) = processes(3, &[]).await;
    // Chromium has no loopback candidates: everyone uses the machine's own address.
    let ip = local_ice_ip().unwrap();
    let invite = "g".repeat(43);

    // Ann, in Chromium, on process 0 (it serves her page too).
    let driver = ChromeDriver::start().await.unwrap();
    let ann = driver.browser().await.unwrap();
    ann.goto(&servers[0].url).await.unwrap();
    let options = json!({ "invite": invite, "name": "Ann", "server": servers_from(&servers, 0) });
    weft_tests::start_join(&ann, &options, "").await.unwrap();
    let ann_id = browser_joined(&ann, None).await.unwrap();

    // Bea on process 1, Cy on process 2 (each with the whole list, its own first).
    let names = ["Bea", "Cy"];
    let mut dirs = Vec::new();
    let mut natives = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let dir = config_dir(name).unwrap();
        let mut cmd = command(&servers_from(&servers, i + 1), &dir, ip).unwrap();
        cmd.args(["--invite", &invite, "--name", name, "up"]);
        natives.push(NativePeer::spawn(cmd).unwrap());
        dirs.push(dir);
    }
    for (i, peer) in natives.iter_mut().enumerate() {
        for other in ["Ann", names[1 - i]] {
            let what = format!("{} connected to {other}", names[i]);
            peer.expect(&what, WAIT, |v| v["event"] == "peer_connected" && v["name"] == other)
                .await
                .unwrap();
        }
    }
    for name in names {
        wait_peer(&ann, name, &["direct"], WAIT).await.unwrap();
    }

    // Each member messages the others: Ann to everyone at once; Bea and Cy each through
    // their own process, as themselves.
    let sent = js(&ann, "return window.t.session.sendMessage('from Ann on process 0');").await;
    assert_eq!(sent.unwrap(), 2);
    for peer in &mut natives {
        peer.expect("Ann's message", WAIT, |v| {
            v["event"] == "message" && v["text"] == "from Ann on process 0" && v["from"] == "Ann"
        })
        .await
        .unwrap();
    }
    for (i, name) in names.iter().enumerate() {
        let via = servers_from(&servers, i + 1);
        for to in ["Ann", names[1 - i]] {
            let text = format!("from {name} on process {} to {to}", i + 1);
            msg_as(name, &dirs[i], &via, &invite, to, &text).await;
            if to == "Ann" {
                let got = wait_message(&ann, &text, WAIT).await.unwrap();
                assert_eq!(got["name"], *name, "{got}");
            } else {
                natives[1 - i]
                    .expect(&text, WAIT, |v| v["event"] == "message" && v["text"] == text.as_str())
                    .await
                    .unwrap();
            }
        }
    }

    // Ann's process dies mid-session.
    let pid = servers[0].pid().unwrap();
    kill("-9", pid);
    servers[0].child.wait().await.unwrap();
    let killed = std::time::Instant::now();
    // She notices, and joins again under a new id through a process still alive (the
    // only others on her list).
    let new_id = browser_joined(&ann, Some(&ann_id)).await.unwrap();
    eprintln!(
        "cluster: the browser joined again through another process {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    let statuses = browser_events(&ann, "status").await.unwrap();
    assert!(statuses.iter().any(|s| s["status"] == "reconnecting"), "{statuses:?}");
    // The others see her old id go once the dead process's lease ran out.
    for peer in &mut natives {
        peer.expect("Ann's old id leaves", WAIT, |v| {
            v["event"] == "peer_left" && v["peer_id"] == ann_id.as_str()
        })
        .await
        .unwrap();
    }
    // Messages both ways: from Ann to both; to Ann from a member on each surviving process,
    // whose signaling must find her new id (a new session to her).
    wait_for("Ann to have sessions with Bea and Cy", WAIT, || async {
        let sent =
            js(&ann, "return window.t.session.sendMessage('from Ann after the kill');").await?;
        if sent == 2 {
            return Ok(Ok(()));
        }
        let view =
            js(&ann, "return { peers: window.t.session.peers(), logs: window.t.logs.slice(-40) };")
                .await?;
        Ok(Err(format!("sent to {sent}; {view}")))
    })
    .await
    .unwrap();
    for peer in &mut natives {
        peer.expect("Ann's message after the kill", WAIT, |v| {
            v["event"] == "message" && v["text"] == "from Ann after the kill"
        })
        .await
        .unwrap();
    }
    for (i, name) in names.iter().enumerate() {
        let text = format!("from {name} to Ann after the kill");
        msg_as(name, &dirs[i], &servers_from(&servers[1..], i), &invite, "Ann", &text).await;
        wait_message(&ann, &text, WAIT).await.unwrap();
    }
    let ids = js(&ann, "return window.t.session.ownId;").await.unwrap();
    assert_eq!(ids, new_id.as_str());

    // No session failed through it all, on either side.
    for (peer, name) in natives.iter().zip(names) {
        let failed: Vec<_> = peer.seen.iter().filter(|v| v["event"] == "peer_failed").collect();
        assert!(failed.is_empty(), "{name}: {failed:?}");
    }
    let failed: Vec<Value> = browser_events(&ann, "peer")
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p["state"] == "failed")
        .collect();
    assert!(failed.is_empty(), "Ann: {failed:?}");
    ann.quit().await.unwrap();
    for mut peer in natives {
        let _ = peer.terminate(WAIT).await;
    }
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}
