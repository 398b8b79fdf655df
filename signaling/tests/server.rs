//! The signaling server in-process, on port 0, with real WebSocket clients.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use weft_core::signal::{
    self, ClientMessage, ErrorCode, PROTOCOL_VERSION, PeerId, RoomId, ServerMessage, SignalPayload,
};
use weft_signal::{Config, Limits, Server, TlsSource, TurnConfig};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const STEP: Duration = Duration::from_secs(5);

fn web_root() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-signal-test-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("pkg")).unwrap();
    std::fs::write(dir.join("index.html"), "<!doctype html><title>Weft</title>").unwrap();
    std::fs::write(dir.join("pkg/weft.wasm"), b"\0asm\x01\0\0\0").unwrap();
    std::fs::write(dir.join("pkg/weft.js"), "export {};").unwrap();
    // A versioned file with its precompressed forms, as `cargo xtask bundle` makes them.
    std::fs::create_dir_all(dir.join("a/0123abcd")).unwrap();
    std::fs::write(dir.join("a/0123abcd/app.js"), "export const plain = 1;").unwrap();
    std::fs::write(dir.join("a/0123abcd/app.js.br"), "BROTLI").unwrap();
    std::fs::write(dir.join("a/0123abcd/app.js.gz"), "GZIP").unwrap();
    dir
}

async fn start(limits: Limits) -> Server {
    // These tests read the signaling messages alone: no ICE servers among them.
    let turn = TurnConfig { enabled: false, ..TurnConfig::default() };
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        web_root: web_root(),
        tls: None,
        limits,
        turn,
        cluster: None,
    };
    Server::start(config).await.unwrap()
}

async fn connect(server: &Server) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(server.ws_url()).await.unwrap();
    ws
}

async fn send(ws: &mut Ws, msg: &ClientMessage) {
    ws.send(Message::text(signal::encode(msg))).await.unwrap();
}

/// The next text message, skipping pings.
async fn recv(ws: &mut Ws) -> ServerMessage {
    loop {
        let frame =
            tokio::time::timeout(STEP, ws.next()).await.expect("timed out").unwrap().unwrap();
        match frame {
            Message::Text(t) => return signal::decode_server(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

async fn expect_error(ws: &mut Ws, expected: ErrorCode) -> String {
    match recv(ws).await {
        ServerMessage::Error { code, message } => {
            assert_eq!(code, expected, "{message}");
            message
        }
        other => panic!("expected {expected} error, got {other:?}"),
    }
}

async fn expect_close(ws: &mut Ws, code: u16) -> CloseFrame {
    loop {
        let frame = tokio::time::timeout(STEP, ws.next()).await.expect("timed out");
        match frame {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), code, "{frame:?}");
                return frame;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected close {code}, got {other:?}"),
        }
    }
}

fn join_msg(room: &str) -> ClientMessage {
    ClientMessage::Join { version: PROTOCOL_VERSION, room: RoomId::new(room).unwrap() }
}

async fn joined(server: &Server, room: &str) -> (Ws, PeerId, Vec<PeerId>) {
    let mut ws = connect(server).await;
    send(&mut ws, &join_msg(room)).await;
    match recv(&mut ws).await {
        ServerMessage::Welcome { peer_id, peers, version, .. } => {
            assert_eq!(version, PROTOCOL_VERSION);
            (ws, peer_id, peers)
        }
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// Still served: a ping gets a pong.
async fn assert_alive(ws: &mut Ws) {
    send(ws, &ClientMessage::Ping).await;
    assert_eq!(recv(ws).await, ServerMessage::Pong);
}

async fn http_get(server: &Server, path: &str) -> (u16, String, Vec<u8>) {
    http_get_with(server, path, "").await
}

/// A GET with extra header lines (each ending in `\r\n`).
async fn http_get_with(server: &Server, path: &str, headers: &str) -> (u16, String, Vec<u8>) {
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), raw[split + 4..].to_vec())
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .unwrap_or_else(|| panic!("no metric {line_start} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn peers_meet_exchange_payloads_and_see_each_other_leave() {
    let server = start(Limits::default()).await;
    let (mut a, a_id, peers) = joined(&server, "room-1").await;
    assert!(peers.is_empty());
    let (mut b, b_id, peers) = joined(&server, "room-1").await;
    assert_eq!(peers, vec![a_id.clone()]);
    assert_eq!(recv(&mut a).await, ServerMessage::PeerJoined { peer_id: b_id.clone() });

    let offer = SignalPayload::Offer { sdp: "v=0\r\n...".into() };
    send(&mut a, &ClientMessage::Signal { to: b_id.clone(), payload: offer.clone() }).await;
    assert_eq!(recv(&mut b).await, ServerMessage::Signal { from: a_id.clone(), payload: offer });
    let answer = SignalPayload::Answer { sdp: "v=0\r\nanswer".into() };
    send(&mut b, &ClientMessage::Signal { to: a_id.clone(), payload: answer.clone() }).await;
    assert_eq!(recv(&mut a).await, ServerMessage::Signal { from: b_id.clone(), payload: answer });

    // Someone in another room hears nothing of this room.
    let (mut c, _, peers) = joined(&server, "room-2").await;
    assert!(peers.is_empty());

    b.close(None).await.unwrap();
    assert_eq!(recv(&mut a).await, ServerMessage::PeerLeft { peer_id: b_id });
    send(&mut a, &ClientMessage::Leave).await;
    assert_alive(&mut c).await;

    let (_, _, body) = http_get(&server, "/metrics").await;
    let text = String::from_utf8(body).unwrap();
    assert_eq!(metric(&text, "weft_messages_relayed_total "), 2);
    assert_eq!(metric(&text, "weft_connections_total "), 3);
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn bad_input_gets_its_error_and_everyone_else_keeps_being_served() {
    let limits = Limits {
        max_peers_per_room: 2,
        max_rooms: 2,
        messages_per_second: 1.0,
        message_burst: 20.0,
        ..Limits::default()
    };
    let server = start(limits).await;
    let (mut good, good_id, _) = joined(&server, "busy").await;
    let (mut bad, bad_id, _) = joined(&server, "other").await;

    // Non-JSON, binary, unknown type, malformed: an error each, connection stays open.
    bad.send(Message::text("this is not json")).await.unwrap();
    expect_error(&mut bad, ErrorCode::NotJson).await;
    bad.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    expect_error(&mut bad, ErrorCode::NotJson).await;
    bad.send(Message::text(r#"{"type":"teleport","to":"x"}"#)).await.unwrap();
    let msg = expect_error(&mut bad, ErrorCode::UnknownType).await;
    assert!(msg.contains("teleport"), "{msg}");
    bad.send(Message::text(r#"{"type":"signal","to":"x"}"#)).await.unwrap();
    expect_error(&mut bad, ErrorCode::Malformed).await;

    // Addressing a peer in another room, or one that does not exist.
    let payload = SignalPayload::Opaque { data: "secret".into() };
    send(&mut bad, &ClientMessage::Signal { to: good_id.clone(), payload: payload.clone() }).await;
    expect_error(&mut bad, ErrorCode::UnknownPeer).await;
    let nobody = PeerId::new("nobody").unwrap();
    send(&mut bad, &ClientMessage::Signal { to: nobody, payload }).await;
    expect_error(&mut bad, ErrorCode::UnknownPeer).await;

    // Joining twice.
    send(&mut bad, &join_msg("busy")).await;
    expect_error(&mut bad, ErrorCode::AlreadyJoined).await;

    // A full room, and too many rooms.
    let (_second, _, _) = joined(&server, "busy").await;
    recv(&mut good).await; // peer_joined
    let mut third = connect(&server).await;
    send(&mut third, &join_msg("busy")).await;
    expect_error(&mut third, ErrorCode::RoomFull).await;
    send(&mut third, &join_msg("a-third-room")).await;
    expect_error(&mut third, ErrorCode::TooManyRooms).await;
    assert_alive(&mut third).await;

    // Flooding: past the burst, messages are dropped with rate_limited.
    let mut flooder = connect(&server).await;
    for _ in 0..30 {
        send(&mut flooder, &ClientMessage::Ping).await;
    }
    let mut limited = 0;
    for _ in 0..30 {
        match recv(&mut flooder).await {
            ServerMessage::Pong => {}
            ServerMessage::Error { code: ErrorCode::RateLimited, .. } => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(limited >= 9, "only {limited} of 30 were rate limited");

    // Through all of that, the well-behaved peer was never disturbed.
    assert_alive(&mut good).await;
    assert_alive(&mut bad).await;
    let _ = bad_id;

    let (status, head, body) = http_get(&server, "/metrics").await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: application/openmetrics-text"), "{head}");
    let text = String::from_utf8(body).unwrap();
    for (reason, at_least) in [
        ("not_json", 2),
        ("unknown_type", 1),
        ("malformed", 1),
        ("unknown_peer", 2),
        ("already_joined", 1),
        ("room_full", 1),
        ("too_many_rooms", 1),
        ("rate_limited", 9),
    ] {
        let n = metric(&text, &format!("weft_rejections_total{{reason=\"{reason}\"}} "));
        assert!(n >= at_least, "{reason}: {n} < {at_least}");
    }
    assert_eq!(metric(&text, "weft_rooms "), 2);
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn wrong_version_is_refused_and_closed() {
    let server = start(Limits::default()).await;
    let mut ws = connect(&server).await;
    let join = ClientMessage::Join { version: 99, room: RoomId::new("r").unwrap() };
    send(&mut ws, &join).await;
    let msg = expect_error(&mut ws, ErrorCode::UnsupportedVersion).await;
    assert!(msg.contains("99") && msg.contains(&PROTOCOL_VERSION.to_string()), "{msg}");
    let frame = expect_close(&mut ws, 1002).await;
    assert!(frame.reason.as_str().contains("protocol version 99"), "{frame:?}");
    assert!(frame.reason.len() <= 123);
    assert_eq!(server.state().metrics().rejections(ErrorCode::UnsupportedVersion), 1);
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn oversized_messages_are_refused_and_closed_but_others_stay() {
    let server = start(Limits::default()).await;
    let (mut other, _, _) = joined(&server, "r").await;
    let mut ws = connect(&server).await;
    let huge = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(100 * 1024));
    ws.send(Message::text(huge)).await.unwrap();
    let msg = expect_error(&mut ws, ErrorCode::TooLarge).await;
    assert!(msg.contains("16384"), "{msg}");
    expect_close(&mut ws, 1009).await;
    assert_alive(&mut other).await;
    assert_eq!(server.state().metrics().rejections(ErrorCode::TooLarge), 1);
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn too_many_connections_are_refused_with_a_reason() {
    let server = start(Limits { max_connections: 1, ..Limits::default() }).await;
    let (mut first, _, _) = joined(&server, "r").await;
    let mut second = connect(&server).await;
    expect_error(&mut second, ErrorCode::ServerFull).await;
    expect_close(&mut second, 1013).await;
    assert_alive(&mut first).await;
    server.shutdown(STEP).await;
}

/// A member that stops reading (its socket's receive buffer is tiny and it never reads)
/// while another floods it with signals: it is dropped and leaves its room within seconds,
/// and the sender is served throughout (nothing it sends waits on the stuck reader).
#[tokio::test]
async fn a_member_that_stops_reading_is_dropped_and_leaves_its_room_without_stalling_others() {
    let limits = Limits {
        messages_per_second: 10_000.0,
        message_burst: 10_000.0,
        max_outbox_bytes: 256 * 1024,
        send_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let server = start(limits).await;
    let (mut sender, _, _) = joined(&server, "r").await;
    // The stuck member: a real socket with a small receive buffer, never read after its
    // welcome.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.local_addr()).await.unwrap();
    let (mut stuck, _) =
        tokio_tungstenite::client_async(server.ws_url(), MaybeTlsStream::Plain(tcp)).await.unwrap();
    send(&mut stuck, &join_msg("r")).await;
    let stuck_id = match recv(&mut stuck).await {
        ServerMessage::Welcome { peer_id, .. } => peer_id,
        other => panic!("expected welcome, got {other:?}"),
    };
    assert!(matches!(recv(&mut sender).await, ServerMessage::PeerJoined { .. }));

    let data = "x".repeat(15 * 1024);
    let started = std::time::Instant::now();
    let mut left = false;
    for i in 0..2000 {
        let payload = SignalPayload::Opaque { data: data.clone() };
        send(&mut sender, &ClientMessage::Signal { to: stuck_id.clone(), payload }).await;
        if i % 50 == 49 {
            // The sender is answered at once, however full the stuck member's queue.
            let ping = std::time::Instant::now();
            send(&mut sender, &ClientMessage::Ping).await;
            loop {
                match recv(&mut sender).await {
                    ServerMessage::Pong => break,
                    ServerMessage::PeerLeft { peer_id } if peer_id == stuck_id => left = true,
                    ServerMessage::Error { code: ErrorCode::UnknownPeer, .. } => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert!(ping.elapsed() < STEP, "the sender waited {:?}", ping.elapsed());
        }
        if left {
            break;
        }
    }
    assert!(left, "the stuck member is still in the room after {:?}", started.elapsed());
    assert!(server.state().metrics().rejections(ErrorCode::TooSlow) >= 1);
    assert_alive(&mut sender).await;
    drop(stuck);
    server.shutdown(STEP).await;
}

/// One address gets so many connections and rooms, and no more; a client cannot claim
/// another address with `X-Forwarded-For` unless the server is told to trust a proxy.
#[tokio::test]
async fn one_address_gets_only_so_many_connections_and_rooms() {
    let limits = Limits { max_connections_per_ip: 2, max_rooms_per_ip: 1, ..Limits::default() };
    let server = start(limits.clone()).await;
    let (mut a, _, _) = joined(&server, "r1").await;
    let mut b = connect(&server).await;
    send(&mut b, &join_msg("r2")).await;
    let msg = expect_error(&mut b, ErrorCode::AddressRooms).await;
    assert!(msg.contains("maximum of 1 rooms"), "{msg}");
    // A forged header changes nothing here.
    fn forged(url: String, ip: &str) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert("x-forwarded-for", ip.parse().unwrap());
        req
    }
    let (mut c, _) =
        tokio_tungstenite::connect_async(forged(server.ws_url(), "198.51.100.9")).await.unwrap();
    let msg = expect_error(&mut c, ErrorCode::AddressConnections).await;
    assert!(msg.contains("maximum of 2 connections"), "{msg}");
    expect_close(&mut c, 1013).await;
    assert_alive(&mut a).await;
    assert_alive(&mut b).await;
    let m = server.state().metrics();
    assert_eq!(m.rejections(ErrorCode::AddressConnections), 1);
    assert_eq!(m.rejections(ErrorCode::AddressRooms), 1);
    drop(b);
    // A closed connection frees its place (once the server has seen it go).
    let mut again = None;
    for _ in 0..50 {
        let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url()).await.unwrap();
        send(&mut ws, &ClientMessage::Ping).await;
        match recv(&mut ws).await {
            ServerMessage::Pong => {
                again = Some(ws);
                break;
            }
            ServerMessage::Error { code: ErrorCode::AddressConnections, .. } => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(again.is_some(), "the closed connection's place was never freed");
    server.shutdown(STEP).await;

    // Behind a proxy that sets it, the header's last entry is the client's address.
    let server = start(Limits { trust_forwarded_for: true, ..limits }).await;
    let mut held = Vec::new();
    for ip in ["198.51.100.1", "198.51.100.1", "198.51.100.2"] {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(forged(server.ws_url(), &format!("10.9.9.9, {ip}")))
                .await
                .unwrap();
        assert_alive(&mut ws).await;
        held.push(ws);
    }
    let (mut over, _) =
        tokio_tungstenite::connect_async(forged(server.ws_url(), "198.51.100.1")).await.unwrap();
    expect_error(&mut over, ErrorCode::AddressConnections).await;
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn silent_connections_time_out_and_leave_their_room() {
    let limits = Limits {
        idle_timeout: Duration::from_millis(600),
        ping_interval: Duration::from_millis(200),
        ..Limits::default()
    };
    let server = start(limits).await;
    // A client that answers pings (tungstenite does, when read) stays; keep `alive` reading.
    let (mut alive, _, _) = joined(&server, "r").await;
    let mut silent = connect(&server).await;
    send(&mut silent, &join_msg("r")).await;
    let silent_id = match recv(&mut silent).await {
        ServerMessage::Welcome { peer_id, .. } => peer_id,
        other => panic!("{other:?}"),
    };
    assert_eq!(recv(&mut alive).await, ServerMessage::PeerJoined { peer_id: silent_id.clone() });
    // `silent` stops reading (so it answers no pings); `alive` keeps reading and gets
    // the departure, since its own pongs keep it alive.
    assert_eq!(recv(&mut alive).await, ServerMessage::PeerLeft { peer_id: silent_id });
    expect_error(&mut silent, ErrorCode::IdleTimeout).await;
    expect_close(&mut silent, 1001).await;
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn shutdown_tells_clients_why() {
    let server = start(Limits::default()).await;
    let (mut ws, _, _) = joined(&server, "r").await;
    let addr = server.local_addr();
    server.shutdown(STEP).await;
    expect_error(&mut ws, ErrorCode::ShuttingDown).await;
    expect_close(&mut ws, 1001).await;
    assert!(TcpStream::connect(addr).await.is_err(), "still listening after shutdown");
}

#[tokio::test]
async fn serves_the_app_health_and_correct_mime_types() {
    let server = start(Limits::default()).await;
    let (status, head, body) = http_get(&server, "/").await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(head.contains("content-security-policy:"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("Weft"));
    let (status, head, _) = http_get(&server, "/pkg/weft.wasm").await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: application/wasm"), "{head}");
    let (_, head, _) = http_get(&server, "/pkg/weft.js").await;
    assert!(head.contains("content-type: text/javascript"), "{head}");
    let (status, _, body) = http_get(&server, "/healthz").await;
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(health["status"], "ok");
    let (status, _, _) = http_get(&server, "/no-such-file").await;
    assert_eq!(status, 404);
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn versioned_files_are_immutable_precompressed_and_the_page_is_not_cached() {
    let server = start(Limits::default()).await;
    let (_, head, _) = http_get(&server, "/").await;
    assert!(head.contains("cache-control: no-cache"), "{head}");
    let path = "/a/0123abcd/app.js";
    let (status, head, body) = http_get_with(&server, path, "Accept-Encoding: gzip, br\r\n").await;
    assert_eq!(status, 200);
    assert!(head.contains("content-encoding: br"), "{head}");
    assert!(head.contains("content-type: text/javascript"), "{head}");
    assert!(head.contains("cache-control: public, max-age=31536000, immutable"), "{head}");
    assert_eq!(body, b"BROTLI");
    let (_, head, body) = http_get_with(&server, path, "Accept-Encoding: gzip\r\n").await;
    assert!(head.contains("content-encoding: gzip"), "{head}");
    assert_eq!(body, b"GZIP");
    let (_, head, body) = http_get(&server, path).await;
    assert!(!head.contains("content-encoding"), "{head}");
    assert_eq!(body, b"export const plain = 1;");
    // A missing versioned file must not be cached for a year.
    let (status, head, _) = http_get(&server, "/a/0123abcd/gone.js").await;
    assert_eq!(status, 404);
    assert!(head.contains("cache-control: no-cache"), "{head}");
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn only_allowed_origins_and_the_servers_own_may_open_the_websocket() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let limits = Limits { allowed_origins: vec!["http://app.example".into()], ..Limits::default() };
    let server = start(limits).await;
    let from = |origin: Option<&str>| {
        let mut req = server.ws_url().into_client_request().unwrap();
        if let Some(origin) = origin {
            req.headers_mut().insert("origin", origin.parse().unwrap());
        }
        req
    };
    let own = format!("http://{}", server.local_addr());
    for allowed in [Some("http://app.example"), Some(own.as_str()), None] {
        let (mut ws, _) = tokio_tungstenite::connect_async(from(allowed)).await.unwrap();
        assert_alive(&mut ws).await;
    }
    let refused = tokio_tungstenite::connect_async(from(Some("http://evil.example"))).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
        }
        other => panic!("an origin not allowed got {other:?}"),
    }
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn missing_bundle_explains_how_to_build_it() {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        web_root: std::env::temp_dir().join("weft-no-such-web-root"),
        tls: None,
        limits: Limits::default(),
        turn: TurnConfig { enabled: false, ..TurnConfig::default() },
        cluster: None,
    };
    let server = Server::start(config).await.unwrap();
    let (status, _, body) = http_get(&server, "/").await;
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("cargo xtask run"));
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn a_taken_port_is_a_clear_error() {
    let server = start(Limits::default()).await;
    let config = Config { listen: server.local_addr(), ..Config::default() };
    let err = Server::start(config).await.unwrap_err().to_string();
    assert!(err.contains("cannot listen on") && err.contains("--listen"), "{err}");
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn https_with_a_self_signed_certificate() {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        web_root: web_root(),
        tls: Some(TlsSource::SelfSigned),
        limits: Limits::default(),
        turn: TurnConfig { enabled: false, ..TurnConfig::default() },
        cluster: None,
    };
    let server = Server::start(config).await.unwrap();
    assert!(server.url().starts_with("https://127.0.0.1:"));
    let setup = server.tls().unwrap();
    assert_eq!(setup.fingerprint.len(), 32 * 3 - 1);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(setup.certificate.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_tungstenite::Connector::Rustls(Arc::new(client));
    let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        server.ws_url(),
        None,
        false,
        Some(connector),
    )
    .await
    .unwrap();
    assert!(server.ws_url().starts_with("wss://"));
    send(&mut ws, &join_msg("tls-room")).await;
    assert!(matches!(recv(&mut ws).await, ServerMessage::Welcome { .. }));
    server.shutdown(STEP).await;
}
