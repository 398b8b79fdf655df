//! The embedded STUN/TURN server, driven by a real TURN client (webrtc-rs `turn`) over
//! loopback: members are handed credentials of their own before their welcome; those
//! allocate and relay; expired, forged and revoked credentials are refused; quotas hold;
//! TURN over TCP and over TLS work, and a client that does not finish a TLS handshake is
//! dropped without holding up anyone; `/metrics` counts it all.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message;
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;
use weft_core::signal::{self, ClientMessage, IceServer, PROTOCOL_VERSION, RoomId, ServerMessage};
use weft_signal::metrics::TurnRefusal;
use weft_signal::{Config, Limits, Server, TlsSource, TurnConfig};

const SECRET: &str = "test secret";
const STEP: Duration = Duration::from_secs(10);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn start(turn: TurnConfig) -> Server {
    start_with(turn, None).await
}

/// A server on free ports, with HTTPS if `tls` is given.
async fn start_with(turn: TurnConfig, tls: Option<TlsSource>) -> Server {
    let turn = TurnConfig { tls_port: 0, ..turn };
    Server::start(config_at("127.0.0.1:0".parse().unwrap(), turn, tls)).await.unwrap()
}

/// The configuration of a server on `listen` with TURN over TLS as `turn` says.
fn config_at(listen: SocketAddr, turn: TurnConfig, tls: Option<TlsSource>) -> Config {
    Config {
        listen,
        web_root: std::env::temp_dir(),
        tls,
        limits: Limits::default(),
        turn: TurnConfig { port: 0, secret: Some(SECRET.into()), ..turn },
        cluster: None,
    }
}

async fn next(ws: &mut Ws) -> ServerMessage {
    loop {
        let frame = tokio::time::timeout(STEP, ws.next()).await.unwrap().unwrap().unwrap();
        if let Message::Text(text) = frame {
            return signal::decode_server(text.as_str()).unwrap();
        }
    }
}

/// Joins a room; the ICE servers handed out, and the member's id.
async fn join(server: &Server) -> (Ws, Vec<IceServer>, String) {
    join_through(server, None).await
}

/// [`join`], over wss through `tls` if given.
async fn join_through(
    server: &Server,
    tls: Option<tokio_tungstenite::Connector>,
) -> (Ws, Vec<IceServer>, String) {
    let (mut ws, _) =
        tokio_tungstenite::connect_async_tls_with_config(server.ws_url(), None, false, tls)
            .await
            .unwrap();
    let join = ClientMessage::Join { version: PROTOCOL_VERSION, room: RoomId::new("r").unwrap() };
    ws.send(Message::text(signal::encode(&join))).await.unwrap();
    let ServerMessage::IceServers { servers, ttl_s } = next(&mut ws).await else {
        panic!("the ICE servers come first");
    };
    assert_eq!(ttl_s, 12 * 3600);
    let ServerMessage::Welcome { peer_id, .. } = next(&mut ws).await else {
        panic!("then the welcome");
    };
    (ws, servers, peer_id.to_string())
}

fn turn_entry(servers: &[IceServer]) -> (String, String) {
    let turn = servers.iter().find(|s| s.is_turn()).expect("a TURN entry");
    (turn.username.clone().unwrap(), turn.credential.clone().unwrap())
}

fn password(username: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, SECRET.as_bytes());
    base64::engine::general_purpose::STANDARD
        .encode(ring::hmac::sign(&key, username.as_bytes()).as_ref())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A TURN client over UDP from a fresh socket.
async fn client(server: &Server, username: &str, password: &str) -> Client {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client_on(server, Arc::new(socket), username, password).await
}

async fn client_on(
    server: &Server,
    conn: Arc<dyn Conn + Send + Sync>,
    username: &str,
    password: &str,
) -> Client {
    let addr = server.turn().unwrap().udp_addr().to_string();
    let c = Client::new(ClientConfig {
        stun_serv_addr: addr.clone(),
        turn_serv_addr: addr,
        username: username.into(),
        password: password.into(),
        realm: "weft".into(),
        software: String::new(),
        rto_in_ms: 0,
        conn,
        vnet: None,
    })
    .await
    .unwrap();
    c.listen().await.unwrap();
    c
}

/// Sends `payload` from the allocation to a plain UDP peer; what the peer got.
async fn relay_once(relay: &impl Conn, payload: &[u8]) -> Option<Vec<u8>> {
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    relay.send_to(payload, peer.local_addr().unwrap()).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let got = tokio::time::timeout(Duration::from_secs(2), peer.recv_from(&mut buf)).await;
    got.ok().map(|r| buf[..r.unwrap().0].to_vec())
}

#[tokio::test]
async fn a_member_gets_credentials_of_its_own_that_allocate_and_relay() {
    let server = start(TurnConfig::default()).await;
    let (_ws, servers, member) = join(&server).await;
    let turn = server.turn().unwrap();
    let udp = turn.udp_addr().port();
    let tcp = turn.tcp_addr().unwrap().port();
    let urls: Vec<&String> = servers.iter().flat_map(|s| &s.urls).collect();
    assert!(urls.contains(&&format!("stun:127.0.0.1:{udp}")), "{urls:?}");
    assert!(urls.contains(&&format!("turn:127.0.0.1:{udp}?transport=udp")), "{urls:?}");
    assert!(urls.contains(&&format!("turn:127.0.0.1:{tcp}?transport=tcp")), "{urls:?}");
    let (username, credential) = turn_entry(&servers);
    let (expiry, who) = username.split_once(':').unwrap();
    assert_eq!(who, member);
    let expiry: u64 = expiry.parse().unwrap();
    assert!(expiry > unix_now() + 11 * 3600);

    let c = client(&server, &username, &credential).await;
    // STUN: the server tells the client its address.
    let mapped = c.send_binding_request().await.unwrap();
    assert_eq!(mapped.ip().to_string(), "127.0.0.1");
    let relay = c.allocate().await.unwrap();
    assert_eq!(relay.local_addr().unwrap().ip().to_string(), "127.0.0.1");
    assert_eq!(relay_once(&relay, b"sealed bytes").await.as_deref(), Some(&b"sealed bytes"[..]));
    let m = server.state().metrics();
    assert_eq!(m.turn_allocations.get(), 1);
    assert!(m.turn_relayed_bytes.get() >= 12);
    let text = m.render();
    assert!(text.contains("weft_turn_allocations_total 1"), "{text}");
    c.close().await.unwrap();
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn expired_forged_and_foreign_credentials_are_refused() {
    let server = start(TurnConfig::default()).await;
    let (_ws, servers, member) = join(&server).await;
    let (username, credential) = turn_entry(&servers);

    // Expired: a genuine HMAC, but the expiry has passed.
    let old = format!("{}:{member}", unix_now() - 60);
    let c = client(&server, &old, &password(&old)).await;
    assert!(c.allocate().await.is_err(), "an expired credential allocates");
    c.close().await.unwrap();
    let m = server.state().metrics();
    assert!(m.turn_refusals(TurnRefusal::Expired) >= 1);

    // Forged: a later expiry than the server gave, with the old password.
    let (expiry, _) = username.split_once(':').unwrap();
    let forged = format!("{}:{member}", expiry.parse::<u64>().unwrap() + 86_400);
    let c = client(&server, &forged, &credential).await;
    assert!(c.allocate().await.is_err(), "a forged credential allocates");
    c.close().await.unwrap();

    // Not a Weft username at all.
    let c = client(&server, "admin", "admin").await;
    assert!(c.allocate().await.is_err());
    c.close().await.unwrap();
    assert!(m.turn_refusals(TurnRefusal::Malformed) >= 1);
    assert_eq!(m.turn_allocations_total.get(), 0);

    // The genuine one still works.
    let c = client(&server, &username, &credential).await;
    assert!(c.allocate().await.is_ok());
    c.close().await.unwrap();
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn a_member_that_leaves_loses_its_relay_and_its_credentials() {
    let server = start(TurnConfig::default()).await;
    let (mut ws, servers, _) = join(&server).await;
    let (username, credential) = turn_entry(&servers);
    let c = client(&server, &username, &credential).await;
    let relay = c.allocate().await.unwrap();
    assert!(relay_once(&relay, b"before").await.is_some());

    ws.send(Message::text(signal::encode(&ClientMessage::Leave))).await.unwrap();
    let m = server.state().metrics();
    let deadline = tokio::time::Instant::now() + STEP;
    while m.turn_allocations.get() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the allocation outlived the leave");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(relay_once(&relay, b"after").await.is_none(), "relayed after leaving");
    // Replayed later, from another socket: refused.
    let again = client(&server, &username, &credential).await;
    assert!(again.allocate().await.is_err(), "a left member's credential allocates");
    assert!(m.turn_refusals(TurnRefusal::Revoked) >= 1);
    again.close().await.unwrap();
    c.close().await.unwrap();
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn allocation_and_bandwidth_quotas_hold() {
    let quotas = TurnConfig {
        max_allocations_per_member: 1,
        allocation_bytes_per_s: 100_000,
        member_bytes_per_s: 1_000_000,
        ..TurnConfig::default()
    };
    let server = start(quotas).await;
    let (_ws, servers, _) = join(&server).await;
    let (username, credential) = turn_entry(&servers);
    let c = client(&server, &username, &credential).await;
    let relay = c.allocate().await.unwrap();
    let second = client(&server, &username, &credential).await;
    assert!(second.allocate().await.is_err(), "a second allocation over the quota");
    let m = server.state().metrics();
    assert_eq!(m.turn_refusals(TurnRefusal::AllocationQuota), 1);

    // 1 MB offered at once to a 100 kB/s allocation (64 KiB bursts): most is dropped.
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = peer.local_addr().unwrap();
    let chunk = vec![7u8; 1000];
    for _ in 0..1000 {
        relay.send_to(&chunk, to).await.unwrap();
    }
    let mut got = 0usize;
    let mut buf = vec![0u8; 2048];
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(500), peer.recv_from(&mut buf)).await
    {
        got += n;
    }
    assert!(got > 0, "nothing relayed");
    assert!(got < 400_000, "{got} bytes relayed past a 100 kB/s quota");
    assert!(m.turn_refusals(TurnRefusal::Bandwidth) > 0);
    second.close().await.unwrap();
    c.close().await.unwrap();
    server.shutdown(STEP).await;
}

/// A TURN client's socket over a stream, TCP or TLS (RFC 5766 §11 framing), as a packet
/// `Conn`.
struct StreamConn<S> {
    read: tokio::sync::Mutex<ReadHalf<S>>,
    write: tokio::sync::Mutex<WriteHalf<S>>,
    server: SocketAddr,
    local: SocketAddr,
}

impl<S: AsyncRead + AsyncWrite> StreamConn<S> {
    fn new(stream: S, server: SocketAddr, local: SocketAddr) -> Self {
        let (read, write) = tokio::io::split(stream);
        let (read, write) = (tokio::sync::Mutex::new(read), tokio::sync::Mutex::new(write));
        Self { read, write, server, local }
    }
}

#[async_trait::async_trait]
impl<S: AsyncRead + AsyncWrite + Send + 'static> Conn for StreamConn<S> {
    async fn connect(&self, _: SocketAddr) -> webrtc_util::Result<()> {
        Ok(())
    }
    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.recv_from(buf).await?.0)
    }
    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let mut read = self.read.lock().await;
        let mut header = [0u8; 4];
        read.read_exact(&mut header).await?;
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let rest = if header[0] >> 6 == 0 { 16 + len } else { len.div_ceil(4) * 4 };
        buf[..4].copy_from_slice(&header);
        read.read_exact(&mut buf[4..4 + rest]).await?;
        Ok((4 + rest, self.server))
    }
    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        let mut write = self.write.lock().await;
        write.write_all(buf).await?;
        write.flush().await?;
        Ok(buf.len())
    }
    async fn send_to(&self, buf: &[u8], _: SocketAddr) -> webrtc_util::Result<usize> {
        self.send(buf).await
    }
    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.local)
    }
    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.server)
    }
    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// A TURN client of `server` over TCP.
async fn tcp_client(server: &Server, username: &str, credential: &str) -> Client {
    let tcp = server.turn().unwrap().tcp_addr().unwrap();
    let stream = TcpStream::connect(tcp).await.unwrap();
    let local = stream.local_addr().unwrap();
    // The client sends to the UDP address it was given; the stream ignores it.
    let conn = StreamConn::new(stream, tcp, local);
    client_on(server, Arc::new(conn), username, credential).await
}

#[tokio::test]
async fn turn_over_tcp_allocates_and_relays() {
    let server = start(TurnConfig::default()).await;
    let (_ws, servers, member) = join(&server).await;
    let (username, credential) = turn_entry(&servers);
    let c = tcp_client(&server, &username, &credential).await;
    let relay = c.allocate().await.unwrap();
    assert_eq!(relay_once(&relay, b"over tcp").await.as_deref(), Some(&b"over tcp"[..]));
    // An allocation that ends (its member left; as when released or expired) ends alone:
    // the turn crate closes an allocation's server socket, which for TCP is the listener
    // every TCP client shares. Another member still allocates over TCP afterwards.
    server.turn().unwrap().drop_member(&member).await;
    c.close().await.unwrap();
    let (_ws, servers, _) = join(&server).await;
    let (username, credential) = turn_entry(&servers);
    let c = tcp_client(&server, &username, &credential).await;
    let relay = c.allocate().await.unwrap();
    assert_eq!(relay_once(&relay, b"again").await.as_deref(), Some(&b"again"[..]));
    c.close().await.unwrap();
    server.shutdown(STEP).await;
}

/// A TLS connection to the server's TURN over TLS port that trusts `certificate` for
/// `name`.
async fn tls_stream(
    server: &Server,
    certificate: &rustls::pki_types::CertificateDer<'static>,
    name: &str,
) -> std::io::Result<StreamConn<tokio_rustls::client::TlsStream<TcpStream>>> {
    tls_stream_offering(server, certificate, name, Vec::new()).await
}

/// [`tls_stream`], offering the ALPN protocols `alpn`.
async fn tls_stream_offering(
    server: &Server,
    certificate: &rustls::pki_types::CertificateDer<'static>,
    name: &str,
    alpn: Vec<Vec<u8>>,
) -> std::io::Result<StreamConn<tokio_rustls::client::TlsStream<TcpStream>>> {
    let addr = server.turn().unwrap().tls_addr().expect("TURN over TLS is on");
    let tcp = TcpStream::connect(addr).await?;
    let local = tcp.local_addr()?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    let mut config = Arc::unwrap_or_clone(trusting(certificate));
    config.alpn_protocols = alpn;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    Ok(StreamConn::new(tls, addr, local))
}

/// A TLS client configuration that trusts only `certificate`.
fn trusting(certificate: &rustls::pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certificate.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A credential for `member` minted as the server does, valid `ttl_s` more seconds
/// (negative: expired).
fn credential_for(member: &str, ttl_s: i64) -> (String, String) {
    let expiry = unix_now().checked_add_signed(ttl_s).unwrap();
    let username = format!("{expiry}:{member}");
    let password = password(&username);
    (username, password)
}

#[tokio::test]
async fn turn_over_tls_is_handed_out_and_allocates_and_relays_with_the_https_certificate() {
    let server = start_with(TurnConfig::default(), Some(TlsSource::SelfSigned)).await;
    let turn = server.turn().unwrap();
    let tls = turn.tls_addr().expect("a certificate turns TURN over TLS on");
    let certificate = server.tls().unwrap().certificate.clone();
    // A member joins over wss and is handed a turns: URL with its credential.
    let wss = tokio_tungstenite::Connector::Rustls(trusting(&certificate));
    let (_ws, servers, _) = join_through(&server, Some(wss)).await;
    let urls: Vec<&String> = servers.iter().flat_map(|s| &s.urls).collect();
    let turns = format!("turns:127.0.0.1:{}?transport=tcp", tls.port());
    assert!(urls.contains(&&turns), "{urls:?}");
    let (username, credential) = turn_entry(&servers);
    assert!(servers.iter().any(|s| s.urls.contains(&turns) && s.username.is_some()));

    let conn = tls_stream(&server, &certificate, "127.0.0.1").await.unwrap();
    let c = client_on(&server, Arc::new(conn), &username, &credential).await;
    let relay = c.allocate().await.unwrap();
    assert_eq!(relay_once(&relay, b"over tls").await.as_deref(), Some(&b"over tls"[..]));
    let m = server.state().metrics();
    assert_eq!(m.turn_allocations.get(), 1);
    assert_eq!(m.turn_refusals(TurnRefusal::TlsHandshake), 0);
    c.close().await.unwrap();
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn a_client_that_does_not_speak_tls_is_dropped_and_holds_up_no_one() {
    let turn =
        TurnConfig { tls_handshake_timeout: Duration::from_secs(5), ..TurnConfig::default() };
    let server = start_with(turn, Some(TlsSource::SelfSigned)).await;
    let tls = server.turn().unwrap().tls_addr().unwrap();
    let m = server.state().metrics();
    let refused = || m.turn_refusals(TurnRefusal::TlsHandshake);

    // A client that connects and says nothing.
    let mut silent = TcpStream::connect(tls).await.unwrap();
    // Meanwhile a TLS client allocates and relays, long before the silent one's time is up.
    let certificate = server.tls().unwrap().certificate.clone();
    let (username, credential) = credential_for("good", 600);
    let conn = tls_stream(&server, &certificate, "127.0.0.1").await.unwrap();
    let good = client_on(&server, Arc::new(conn), &username, &credential).await;
    let relay = good.allocate().await.unwrap();
    assert_eq!(relay_once(&relay, b"first").await.as_deref(), Some(&b"first"[..]));
    assert_eq!(refused(), 0, "the silent client was dropped before the good one got through");

    // A TURN client speaking plain TCP to the TLS port: its Binding request (RFC 5389,
    // framed as over TCP) is not a TLS ClientHello, so it is closed on at once, unanswered.
    let mut plain = TcpStream::connect(tls).await.unwrap();
    let mut binding = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    binding.extend_from_slice(&[7u8; 12]);
    plain.write_all(&binding).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(STEP, plain.read_to_end(&mut answer)).await.unwrap();
    // At most a TLS alert (content type 21), never a STUN answer.
    assert!(read.is_err() || answer.is_empty() || answer[0] == 21, "{answer:?}");
    assert_eq!(refused(), 1);

    // The silent one is dropped when its handshake time is up.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(STEP, silent.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the silent client was never dropped");
    assert_eq!(refused(), 2);
    assert!(m.render().contains(r#"weft_turn_refusals_total{reason="tls_handshake"} 2"#));

    // The good client was never disturbed.
    assert_eq!(relay_once(&relay, b"second").await.as_deref(), Some(&b"second"[..]));
    good.close().await.unwrap();
    server.shutdown(STEP).await;
}

/// PEM files of a certificate, in a directory of their own removed on drop.
struct CertificateFiles {
    dir: std::path::PathBuf,
    source: TlsSource,
    /// The certificate, DER, for clients to trust.
    der: rustls::pki_types::CertificateDer<'static>,
}

impl Drop for CertificateFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A self-signed certificate for the host name `name` (as a certificate authority would
/// issue one, Let's Encrypt's say), in PEM files.
fn issue_certificate(name: &str) -> CertificateFiles {
    let unique = rand::random::<u64>();
    let dir = std::env::temp_dir().join(format!("weft-turn-tls-{name}-{unique:x}"));
    std::fs::create_dir_all(&dir).unwrap();
    let generated = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    let der = generated.cert.der().clone();
    CertificateFiles { dir, source: TlsSource::Files { cert, key }, der }
}

#[tokio::test]
async fn over_tls_with_a_certificate_of_its_own_forged_and_expired_credentials_are_refused() {
    // HTTP for the app; TURN over TLS with a certificate issued for a host name, as from
    // Let's Encrypt for a public host.
    let files = issue_certificate("turn.weft.test");
    let certificate = files.der.clone();
    let turn = TurnConfig {
        tls_certificate: Some(files.source.clone()),
        tls_host: Some("turn.weft.test".into()),
        ..TurnConfig::default()
    };
    let server = start(turn).await;
    let (_ws, servers, member) = join(&server).await;
    let tls = server.turn().unwrap().tls_addr().unwrap();
    let urls: Vec<&String> = servers.iter().flat_map(|s| &s.urls).collect();
    let turns = format!("turns:turn.weft.test:{}?transport=tcp", tls.port());
    assert!(urls.contains(&&turns), "{urls:?}");
    let (username, credential) = turn_entry(&servers);
    let m = server.state().metrics();
    let over_tls = |username: String, password: String| {
        let server = &server;
        let certificate = &certificate;
        async move {
            let conn = tls_stream(server, certificate, "turn.weft.test").await.unwrap();
            client_on(server, Arc::new(conn), &username, &password).await
        }
    };

    // Forged: a later expiry than the server gave, with the genuine password.
    let (expiry, _) = username.split_once(':').unwrap();
    let forged = format!("{}:{member}", expiry.parse::<u64>().unwrap() + 86_400);
    let c = over_tls(forged, credential.clone()).await;
    assert!(c.allocate().await.is_err(), "a forged credential allocates over TLS");
    c.close().await.unwrap();
    // Expired: a genuine HMAC past its expiry.
    let (old, old_password) = credential_for(&member, -60);
    let c = over_tls(old, old_password).await;
    assert!(c.allocate().await.is_err(), "an expired credential allocates over TLS");
    c.close().await.unwrap();
    assert!(m.turn_refusals(TurnRefusal::Expired) >= 1);
    assert_eq!(m.turn_allocations_total.get(), 0);

    // The genuine one allocates and relays.
    let c = over_tls(username, credential).await;
    let relay = c.allocate().await.unwrap();
    assert_eq!(relay_once(&relay, b"genuine").await.as_deref(), Some(&b"genuine"[..]));
    assert_eq!(m.turn_refusals(TurnRefusal::TlsHandshake), 0);
    c.close().await.unwrap();
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn without_a_certificate_there_is_no_turn_over_tls() {
    let server = start(TurnConfig::default()).await;
    let (_ws, servers, _) = join(&server).await;
    assert_eq!(server.turn().unwrap().tls_addr(), None);
    assert!(servers.iter().flat_map(|s| &s.urls).all(|u| !u.starts_with("turns:")));
    server.shutdown(STEP).await;
    let off = TurnConfig { tls: false, ..TurnConfig::default() };
    let server = start_with(off, Some(TlsSource::SelfSigned)).await;
    assert_eq!(server.turn().unwrap().tls_addr(), None);
    server.shutdown(STEP).await;
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn turn_over_tls_shares_the_https_port_with_the_web_app() {
    let port = free_port();
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let turn = TurnConfig { tls_port: port, ..TurnConfig::default() };
    let server = Server::start(config_at(listen, turn, Some(TlsSource::SelfSigned))).await.unwrap();
    assert_eq!(server.turn().unwrap().tls_addr(), Some(server.local_addr()));
    let certificate = server.tls().unwrap().certificate.clone();

    // The web side: a member joins over wss on that port and is handed turns: on it too.
    let wss = tokio_tungstenite::Connector::Rustls(trusting(&certificate));
    let (_ws, servers, _) = join_through(&server, Some(wss)).await;
    let urls: Vec<&String> = servers.iter().flat_map(|s| &s.urls).collect();
    assert!(urls.contains(&&format!("turns:127.0.0.1:{port}?transport=tcp")), "{urls:?}");
    let (username, credential) = turn_entry(&servers);

    // A TURN client on the same port, told apart by its first byte...
    let conn = tls_stream(&server, &certificate, "127.0.0.1").await.unwrap();
    let c = client_on(&server, Arc::new(conn), &username, &credential).await;
    let relay = c.allocate().await.unwrap();
    assert_eq!(relay_once(&relay, b"shared port").await.as_deref(), Some(&b"shared port"[..]));
    // ...and one that says so with ALPN (RFC 7443).
    let alpn = vec![b"stun.turn".to_vec()];
    let conn = tls_stream_offering(&server, &certificate, "127.0.0.1", alpn).await.unwrap();
    let (username, credential) = credential_for("alpn", 600);
    let c2 = client_on(&server, Arc::new(conn), &username, &credential).await;
    let relay2 = c2.allocate().await.unwrap();
    assert_eq!(relay_once(&relay2, b"by alpn").await.as_deref(), Some(&b"by alpn"[..]));

    // The web side still works beside them.
    let wss = tokio_tungstenite::Connector::Rustls(trusting(&certificate));
    let (_ws2, _, _) = join_through(&server, Some(wss)).await;
    let m = server.state().metrics();
    assert_eq!(m.turn_allocations.get(), 2);
    assert_eq!(m.turn_refusals(TurnRefusal::TlsHandshake), 0);
    c2.close().await.unwrap();
    c.close().await.unwrap();
    server.shutdown(STEP).await;
}

#[tokio::test]
async fn a_certificate_for_turn_alone_cannot_share_the_https_port() {
    let port = free_port();
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let files = issue_certificate("turn.weft.test");
    let turn = TurnConfig {
        tls_port: port,
        tls_certificate: Some(files.source.clone()),
        ..TurnConfig::default()
    };
    let err =
        Server::start(config_at(listen, turn, Some(TlsSource::SelfSigned))).await.unwrap_err();
    assert!(err.to_string().contains("--turn-tls-port"), "{err}");
}
