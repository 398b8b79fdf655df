//! The embedded STUN/TURN server, and the short-lived credentials the signaling server
//! hands each member.
//!
//! The relay itself is webrtc-rs `turn` 0.17 (RFC 5766 allocations, permissions,
//! channels; it also answers STUN binding requests). What is ours, and why:
//!
//! - **Credentials** are the TURN REST convention (as coturn's `static-auth-secret`):
//!   username `"<unix expiry>:<member id>"`, password `base64(HMAC-SHA1(secret, username))`.
//!   The same secret can mint credentials for an external coturn ([`IceOffer::external`]).
//!   [`Auth`] refuses an expired credential for a new allocation, and every credential of
//!   a member who left the room (`leave`); a forged one fails the message integrity check
//!   in the `turn` crate. An allocation made in time may be refreshed after its
//!   credential's expiry, so a relayed session outlives one credential.
//! - **Quotas**: allocations per member, and relayed bandwidth per allocation and per
//!   member (token buckets; what exceeds them is dropped, as a congested link would).
//!   The `turn` crate has no hooks for these, so its sockets are wrapped: [`Listener`]
//!   notes the method and username of each request it hands the server (which handles
//!   one listener's requests one at a time) and which client it is from, and [`Relays`] binds each allocation's relay
//!   socket as a [`RelayConn`] that counts and limits what crosses it.
//! - **TURN over TCP** ([`TcpListenerConn`]): the `turn` crate serves packet sockets
//!   only, so TCP connections are framed (RFC 5766 §11: STUN messages and ChannelData,
//!   padded to 4 bytes) into datagrams from the client's address. Networks that block UDP
//!   reach the relay this way; the relayed side stays UDP.
//! - **TURN over TLS** (`turns:`, RFC 7065): the same framing inside a TLS stream, on its
//!   own port, when the server has a certificate (the HTTPS one, or one for TURN only).
//!   Networks that let only TLS out (a proxy that allows port 443) reach the relay this
//!   way. A handshake has [`TurnConfig::tls_handshake_timeout`] to finish, at most
//!   [`MAX_TLS_HANDSHAKES`] run at once, and each one that fails, times out or finds no
//!   room is refused and counted (`tls_handshake`); none of that holds up other clients.
//!
//! Nothing here sees plaintext: peers seal every packet end to end (see `core/`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use stun::attributes::ATTR_USERNAME;
use stun::message::{CLASS_REQUEST, METHOD_ALLOCATE, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use turn::auth::{AuthHandler, generate_auth_key};
use turn::relay::RelayAddressGenerator;
use turn::server::Server as TurnServer;
use turn::server::config::{ConnConfig, ServerConfig};
use webrtc_util::Conn;
use weft_core::signal::IceServer;

use crate::metrics::{Metrics, TurnRefusal};
use crate::tls::{TlsSetup, TlsSource};

use crate::shared_port::TurnTlsStream;

/// Settings of the embedded STUN/TURN server.
#[derive(Debug, Clone)]
pub struct TurnConfig {
    /// Run it (on by default). Off: only [`TurnConfig::external_urls`], if any, are handed
    /// out.
    pub enabled: bool,
    /// UDP and TCP port (the same number for both); 0 picks a free one for each.
    pub port: u16,
    /// Also serve TURN over TCP, for networks that block UDP.
    pub tcp: bool,
    /// Also serve TURN over TLS (`turns:`) when there is a certificate: the HTTPS one, or
    /// [`TurnConfig::tls_certificate`].
    pub tls: bool,
    /// TURN over TLS port (IANA's `turns` port by default; 443 gets through the strictest
    /// firewalls); 0 picks a free one.
    pub tls_port: u16,
    /// A certificate for TURN over TLS alone (say, when a reverse proxy terminates HTTPS).
    /// Default: the server's HTTPS certificate.
    pub tls_certificate: Option<TlsSource>,
    /// The host in the `turns:` URL, which TLS clients check the certificate against (the
    /// name a certificate from a CA is issued for). Default: the public address.
    pub tls_host: Option<String>,
    /// How long a TLS client has to finish its handshake before it is dropped.
    pub tls_handshake_timeout: Duration,
    /// The address peers reach the server at (in the URLs handed out and in relayed
    /// candidates). Default: the signaling server's listen address if it is a specific
    /// one, else this machine's first non-loopback address.
    pub public_ip: Option<IpAddr>,
    /// The TURN realm.
    pub realm: String,
    /// The HMAC secret credentials are minted with (shared with coturn's
    /// `static-auth-secret` when its URLs are handed out). Default: random per start.
    pub secret: Option<String>,
    /// How long a credential is good for new allocations.
    pub credential_ttl: Duration,
    /// Most allocations one member holds at once. A browser allocates once per TURN URL
    /// for each peer it connects to (UDP, TCP and TLS: three), so the default lets a member
    /// of a full room (32, [`crate::Limits`]) have relayed candidates toward every peer.
    pub max_allocations_per_member: usize,
    /// Most bytes per second relayed for one allocation (both directions).
    pub allocation_bytes_per_s: u64,
    /// Most bytes per second relayed for one member, over all its allocations.
    pub member_bytes_per_s: u64,
    /// TURN/STUN URLs of an external server (coturn) to hand out, with credentials minted
    /// from [`TurnConfig::secret`]. Handed out in addition to the embedded server's, or
    /// instead of them when it is off.
    pub external_urls: Vec<String>,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            port: 3478,
            tcp: true,
            tls: true,
            tls_port: 5349,
            tls_certificate: None,
            tls_host: None,
            tls_handshake_timeout: Duration::from_secs(10),
            public_ip: None,
            realm: "weft".into(),
            secret: None,
            credential_ttl: Duration::from_secs(12 * 3600),
            max_allocations_per_member: 96,
            allocation_bytes_per_s: 64 << 20,
            member_bytes_per_s: 128 << 20,
            external_urls: Vec::new(),
        }
    }
}

/// Why the embedded server could not start.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    /// A port is taken or not ours.
    #[error(
        "cannot listen for TURN on {addr} ({transport}): {source} (choose another with --turn-port or --turn-tls-port, or --no-turn)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// `udp`, `tcp` or `tls`.
        transport: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The `turn` crate refused to start.
    #[error("cannot start the TURN server: {0}")]
    Start(String),
}

/// Mints each member's credentials and the ICE server list it is handed.
#[derive(Debug)]
pub struct IceOffer {
    secret: Vec<u8>,
    ttl: Duration,
    urls: Vec<String>,
    /// Members who left: their credentials are refused until they expire.
    revoked: Mutex<HashMap<String, u64>>,
}

impl IceOffer {
    /// Credentials for `urls` minted with `secret`.
    pub fn new(secret: &[u8], ttl: Duration, urls: Vec<String>) -> Self {
        Self { secret: secret.to_vec(), ttl, urls, revoked: Mutex::new(HashMap::new()) }
    }

    /// An offer of an external server's URLs (coturn with `static-auth-secret`).
    pub fn external(secret: &str, ttl: Duration, urls: Vec<String>) -> Self {
        Self::new(secret.as_bytes(), ttl, urls)
    }

    /// How long credentials hold.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The servers for `member`, with a credential of its own valid for the TTL.
    pub fn servers_for(&self, member: &str) -> Vec<IceServer> {
        let expiry = unix_now().saturating_add(self.ttl.as_secs());
        let username = format!("{expiry}:{member}");
        let credential = password(&self.secret, &username);
        let (stun, turn): (Vec<String>, Vec<String>) =
            self.urls.iter().cloned().partition(|u| u.starts_with("stun:"));
        let mut servers = Vec::new();
        if !stun.is_empty() {
            servers.push(IceServer { urls: stun, username: None, credential: None });
        }
        if !turn.is_empty() {
            servers.push(IceServer {
                urls: turn,
                username: Some(username),
                credential: Some(credential),
            });
        }
        servers
    }

    /// `member` left: its credentials are refused from now on.
    pub fn revoke(&self, member: &str) {
        let until = unix_now().saturating_add(self.ttl.as_secs());
        let mut revoked = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
        let now = unix_now();
        revoked.retain(|_, until| *until >= now);
        revoked.insert(member.to_string(), until);
    }

    fn is_revoked(&self, member: &str) -> bool {
        let revoked = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
        revoked.get(member).is_some_and(|until| *until >= unix_now())
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The TURN REST password of `username`.
fn password(secret: &[u8], username: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    BASE64.encode(ring::hmac::sign(&key, username.as_bytes()).as_ref())
}

/// The member a TURN REST username names, and its expiry.
fn parse_username(username: &str) -> Option<(u64, &str)> {
    let (expiry, member) = username.split_once(':')?;
    (!member.is_empty()).then_some(())?;
    Some((expiry.parse().ok()?, member))
}

/// What a listener last handed the server from one client address.
#[derive(Debug, Clone, Default)]
struct Seen {
    allocate: bool,
    member: Option<String>,
}

/// State shared by the listeners, the relays and the auth handler.
#[derive(Debug)]
struct Shared {
    offer: Arc<IceOffer>,
    realm: String,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// The latest request from each client address.
    seen: Mutex<HashMap<SocketAddr, Seen>>,
    members: Mutex<HashMap<String, MemberState>>,
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    allocations: usize,
    allocation_rate: u64,
    member_rate: u64,
}

#[derive(Debug)]
struct MemberState {
    allocations: usize,
    bucket: Arc<Mutex<Bucket>>,
}

impl Shared {
    fn refuse(&self, reason: TurnRefusal) {
        self.metrics.turn_refused(reason);
    }

    fn note(&self, from: SocketAddr, packet: &[u8]) {
        let mut m = Message::new();
        if m.unmarshal_binary(packet).is_err() {
            return; // ChannelData, or not STUN at all: the server sorts it out.
        }
        if m.typ.class != CLASS_REQUEST {
            return;
        }
        let member = m
            .get(ATTR_USERNAME)
            .ok()
            .and_then(|u| String::from_utf8(u).ok())
            .and_then(|u| parse_username(&u).map(|(_, member)| member.to_string()));
        let seen = Seen { allocate: m.typ.method == METHOD_ALLOCATE, member };
        let mut all = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if all.len() > 100_000 {
            all.clear(); // a flood of addresses: start over rather than grow
        }
        all.insert(from, seen);
    }

    fn seen(&self, from: SocketAddr) -> Seen {
        let all = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        all.get(&from).cloned().unwrap_or_default()
    }
}

/// The `turn` crate's auth hook: checks the username, returns the long-term key.
struct Auth(Arc<Shared>);

impl AuthHandler for Auth {
    fn auth_handle(
        &self,
        username: &str,
        realm: &str,
        src: SocketAddr,
    ) -> Result<Vec<u8>, turn::Error> {
        let shared = &self.0;
        let Some((expiry, member)) = parse_username(username) else {
            shared.refuse(TurnRefusal::Malformed);
            return Err(turn::Error::Other("not a Weft TURN username".into()));
        };
        if shared.offer.is_revoked(member) {
            shared.refuse(TurnRefusal::Revoked);
            return Err(turn::Error::Other("this member left".into()));
        }
        if expiry < unix_now() && shared.seen(src).allocate {
            shared.refuse(TurnRefusal::Expired);
            return Err(turn::Error::Other("expired credential".into()));
        }
        let password = password(&shared.offer.secret, username);
        Ok(generate_auth_key(username, realm, &password))
    }
}

/// A token bucket: `rate` bytes per second, bursts of a quarter second.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        let rate = rate as f64;
        Self { rate, tokens: Self::burst(rate), at: Instant::now() }
    }

    fn burst(rate: f64) -> f64 {
        (rate / 4.0).max(64.0 * 1024.0)
    }

    /// Takes `n` bytes' worth if there are; whether there were.
    fn take(&mut self, n: usize) -> bool {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(Self::burst(self.rate));
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// A UDP listening socket that notes each request before the server handles it, and
/// tells its [`Relays`] which client the request being handled is from.
struct Listener {
    socket: UdpSocket,
    shared: Arc<Shared>,
    current: Arc<Mutex<Option<SocketAddr>>>,
}

#[async_trait]
impl Conn for Listener {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(self.socket.connect(addr).await?)
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.socket.recv(buf).await?)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let (n, from) = self.socket.recv_from(buf).await?;
        self.shared.note(from, &buf[..n]);
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(from);
        Ok((n, from))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.socket.send(buf).await?)
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        Ok(self.socket.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// TURN over TCP or TLS: each accepted connection's frames become datagrams from its
/// address.
struct TcpListenerConn {
    local: SocketAddr,
    /// As [`Listener::current`].
    current: Arc<Mutex<Option<SocketAddr>>>,
    inbound: tokio::sync::Mutex<mpsc::Receiver<(Vec<u8>, SocketAddr)>>,
    writers: Writers,
    accept: tokio::task::JoinHandle<()>,
    /// Set when the server stops ([`EmbeddedTurn::close`]): only then does `close` stop
    /// accepting clients.
    stopping: Arc<AtomicBool>,
}

impl Drop for TcpListenerConn {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Where frames for each connected client go.
type Writers = Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>>;

/// Frames queued for one TCP client before more are dropped (it is not reading).
const TCP_QUEUE: usize = 256;
/// Largest frame accepted over TCP (a STUN message or ChannelData is at most 64 KiB).
const MAX_TCP_FRAME: usize = 4 + 65_535 + 3;
/// Most TLS handshakes in progress at once; a client beyond them is refused at once, so
/// clients that never finish theirs cannot pile up.
pub const MAX_TLS_HANDSHAKES: usize = 256;

/// The TLS side of TURN over TLS: a handshake, bounded in time and in number.
#[derive(Clone)]
struct TlsFront {
    acceptor: TlsAcceptor,
    timeout: Duration,
    handshakes: Arc<Semaphore>,
}

impl TlsFront {
    fn new(config: Arc<rustls::ServerConfig>, timeout: Duration, most: usize) -> Self {
        let handshakes = Arc::new(Semaphore::new(most));
        Self { acceptor: TlsAcceptor::from(config), timeout, handshakes }
    }

    /// The client's stream once its handshake is done; `None` (counted) if it failed,
    /// took too long, or there was no room for it.
    async fn handshake<S>(
        &self,
        stream: S,
        shared: &Shared,
    ) -> Option<tokio_rustls::server::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Ok(_slot) = self.handshakes.try_acquire() else {
            shared.refuse(TurnRefusal::TlsHandshake);
            return None;
        };
        match tokio::time::timeout(self.timeout, self.acceptor.accept(stream)).await {
            Ok(Ok(tls)) => Some(tls),
            Ok(Err(_)) | Err(_) => {
                shared.refuse(TurnRefusal::TlsHandshake);
                None
            }
        }
    }
}

/// Where a [`TcpListenerConn`]'s clients come from.
enum Streams {
    /// Accepted on a listener of its own, through a TLS handshake first if given.
    Accept(TcpListener, Option<TlsFront>),
    /// TLS streams the HTTPS server found to be TURN ([`crate::shared_port`]), on the
    /// HTTPS port.
    HandedOver(SocketAddr, mpsc::Receiver<(TurnTlsStream, SocketAddr)>),
}

impl TcpListenerConn {
    fn start(
        streams: Streams,
        shared: Arc<Shared>,
        current: Arc<Mutex<Option<SocketAddr>>>,
        stopping: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(1024);
        let clients = Clients { tx, writers: Arc::default(), shared };
        let writers = clients.writers.clone();
        let (local, accept) = match streams {
            Streams::Accept(listener, tls) => {
                (listener.local_addr()?, tokio::spawn(clients.accept(listener, tls)))
            }
            Streams::HandedOver(local, mut handed) => {
                let accept = tokio::spawn(async move {
                    while let Some((stream, from)) = handed.recv().await {
                        let clients = clients.clone();
                        tokio::spawn(async move { clients.serve(stream, from).await });
                    }
                });
                (local, accept)
            }
        };
        Ok(Self { local, current, inbound: tokio::sync::Mutex::new(rx), writers, accept, stopping })
    }
}

/// What serving a stream client takes: where its frames go, where the server's frames
/// for it are found, and the state for noting requests.
#[derive(Clone)]
struct Clients {
    tx: mpsc::Sender<(Vec<u8>, SocketAddr)>,
    writers: Writers,
    shared: Arc<Shared>,
}

impl Clients {
    /// Accepts clients on `listener` for good, each through a TLS handshake first if
    /// `tls` is given.
    async fn accept(self, listener: TcpListener, tls: Option<TlsFront>) {
        loop {
            let (stream, from) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(_) => {
                    // Out of descriptors, say: let connections close first.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (clients, tls) = (self.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    None => clients.serve(stream, from).await,
                    Some(tls) => {
                        if let Some(stream) = tls.handshake(stream, &clients.shared).await {
                            clients.serve(stream, from).await;
                        }
                    }
                }
            });
        }
    }

    /// Serves one client's stream (TCP, or TLS over it): reads its frames into `tx`, and
    /// writes it what the server sends its address.
    async fn serve<S>(&self, stream: S, from: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (wtx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
        self.writers.lock().unwrap_or_else(PoisonError::into_inner).insert(from, wtx);
        let (mut read, mut write) = tokio::io::split(stream);
        let writer = tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                // A TLS stream holds what it encrypted until flushed.
                if write.write_all(&frame).await.is_err() || write.flush().await.is_err() {
                    break;
                }
            }
        });
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = vec![0u8; 16 * 1024];
        'read: loop {
            // Whole frames first.
            while let Some(len) = frame_len(&buf) {
                if len > MAX_TCP_FRAME {
                    break 'read;
                }
                if buf.len() < len {
                    break;
                }
                let frame: Vec<u8> = buf.drain(..len).collect();
                self.shared.note(from, &frame);
                if self.tx.send((frame, from)).await.is_err() {
                    break 'read;
                }
            }
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        writer.abort();
        self.writers.lock().unwrap_or_else(PoisonError::into_inner).remove(&from);
    }
}

/// The length of the frame at the start of `buf` (RFC 5766 §11: a STUN message is 20
/// bytes plus its length; ChannelData 4 plus its length, padded to 4 over TCP), once its
/// header is there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..4)?;
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    Some(match header[0] >> 6 {
        0 => 20 + len,
        1 => 4 + len.div_ceil(4) * 4,
        // Neither: a frame too large to ever complete, so the connection is dropped.
        _ => usize::MAX,
    })
}

#[async_trait]
impl Conn for TcpListenerConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other("a TCP listener does not connect".into()))
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.recv_from(buf).await?.0)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let mut inbound = self.inbound.lock().await;
        loop {
            let Some((frame, from)) = inbound.recv().await else {
                return Err(webrtc_util::Error::Other("TCP listener closed".into()));
            };
            if frame.len() <= buf.len() {
                buf[..frame.len()].copy_from_slice(&frame);
                *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(from);
                return Ok((frame.len(), from));
            }
        }
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(webrtc_util::Error::Other("send on a TCP listener needs an address".into()))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        let writer =
            self.writers.lock().unwrap_or_else(PoisonError::into_inner).get(&target).cloned();
        if let Some(writer) = writer {
            // Never wait for a client that does not read: drop, as UDP would.
            let _ = writer.try_send(buf.to_vec());
        }
        Ok(buf.len())
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.local)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        // The turn crate also closes an allocation's server socket when the allocation
        // ends (released, expired, its member gone), and for TCP and TLS that socket is
        // this listener, which every client shares: stopping here then refused every
        // client after the first allocation ended. Only the server's own stop stops it.
        if self.stopping.load(Ordering::Acquire) {
            self.accept.abort();
            self.writers.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// Binds allocations' relay sockets (on `bind`, announced as `public`), one member's at
/// most [`TurnConfig::max_allocations_per_member`].
struct Relays {
    bind: IpAddr,
    public: IpAddr,
    shared: Arc<Shared>,
    /// Which client address this listener's current request came from: the server asks
    /// for a relay while it handles that request.
    current: Arc<Mutex<Option<SocketAddr>>>,
}

#[async_trait]
impl RelayAddressGenerator for Relays {
    fn validate(&self) -> Result<(), turn::Error> {
        Ok(())
    }

    async fn allocate_conn(
        &self,
        use_ipv4: bool,
        requested_port: u16,
    ) -> Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), turn::Error> {
        if use_ipv4 != self.public.is_ipv4() {
            return Err(turn::Error::Other("address family not served".into()));
        }
        let from = *self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let member = from.and_then(|f| self.shared.seen(f).member).unwrap_or_default();
        let limits = self.shared.limits;
        let member_bucket = {
            let mut members = self.shared.members.lock().unwrap_or_else(PoisonError::into_inner);
            let m = members.entry(member.clone()).or_insert_with(|| MemberState {
                allocations: 0,
                bucket: Arc::new(Mutex::new(Bucket::new(limits.member_rate))),
            });
            if m.allocations >= limits.allocations {
                drop(members);
                self.shared.refuse(TurnRefusal::AllocationQuota);
                return Err(turn::Error::Other("allocation quota reached".into()));
            }
            m.allocations += 1;
            m.bucket.clone()
        };
        let socket = match UdpSocket::bind(SocketAddr::new(self.bind, requested_port)).await {
            Ok(s) => {
                roomy(&s);
                s
            }
            Err(e) => {
                release(&self.shared, &member);
                return Err(turn::Error::Other(e.to_string()));
            }
        };
        let port = socket.local_addr().map_err(|e| turn::Error::Other(e.to_string()))?.port();
        self.shared.metrics.turn_allocations.inc();
        self.shared.metrics.turn_allocations_total.inc();
        let conn = RelayConn {
            socket,
            shared: self.shared.clone(),
            member,
            bucket: Mutex::new(Bucket::new(limits.allocation_rate)),
            member_bucket,
            closed: AtomicBool::new(false),
        };
        Ok((Arc::new(conn), SocketAddr::new(self.public, port)))
    }
}

fn release(shared: &Shared, member: &str) {
    let mut members = shared.members.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(m) = members.get_mut(member) {
        m.allocations = m.allocations.saturating_sub(1);
        if m.allocations == 0 {
            members.remove(member);
        }
    }
}

/// An allocation's relay socket: counts what it relays and drops what exceeds the quotas.
struct RelayConn {
    socket: UdpSocket,
    shared: Arc<Shared>,
    member: String,
    bucket: Mutex<Bucket>,
    member_bucket: Arc<Mutex<Bucket>>,
    closed: AtomicBool,
}

impl RelayConn {
    /// Whether `n` more bytes fit this allocation's and its member's quotas.
    fn admit(&self, n: usize) -> bool {
        let ok = self.bucket.lock().unwrap_or_else(PoisonError::into_inner).take(n)
            && self.member_bucket.lock().unwrap_or_else(PoisonError::into_inner).take(n);
        if ok {
            self.shared.metrics.turn_relayed_bytes.inc_by(n as u64);
        } else {
            self.shared.refuse(TurnRefusal::Bandwidth);
        }
        ok
    }
}

#[async_trait]
impl Conn for RelayConn {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(self.socket.connect(addr).await?)
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.recv_from(buf).await?.0)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        loop {
            let (n, from) = self.socket.recv_from(buf).await?;
            if self.admit(n) {
                return Ok((n, from));
            }
        }
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        if !self.admit(buf.len()) {
            return Ok(buf.len());
        }
        Ok(self.socket.send(buf).await?)
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        if !self.admit(buf.len()) {
            return Ok(buf.len());
        }
        Ok(self.socket.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        if !self.closed.swap(true, Ordering::Relaxed) {
            self.shared.metrics.turn_allocations.dec();
            release(&self.shared, &self.member);
        }
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// The running embedded server.
pub struct EmbeddedTurn {
    server: TurnServer,
    udp: SocketAddr,
    tcp: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    /// Where the HTTPS server hands TURN over TLS clients, when they share its port.
    tls_handoff: Option<mpsc::Sender<(TurnTlsStream, SocketAddr)>>,
    public: IpAddr,
    /// Tells the TCP/TLS listeners that the server is stopping (see [`TcpListenerConn`]).
    stopping: Arc<AtomicBool>,
}

/// Where TURN over TLS is served.
#[derive(Debug, Clone, Copy)]
pub enum TurnTls<'a> {
    /// Nowhere (no certificate, or turned off).
    Off,
    /// On a port of its own, [`TurnConfig::tls_port`], with this certificate.
    OwnPort(&'a TlsSetup),
    /// On the HTTPS port, `https`, with its certificate: the HTTPS server tells TURN
    /// clients from web ones and hands them over (`shared_port.rs`).
    HttpsPort {
        /// The HTTPS server's address.
        https: SocketAddr,
        /// Its certificate.
        setup: &'a TlsSetup,
    },
}

/// TURN over TLS clients the HTTPS server found, queued until served (they are served at
/// once; a full queue drops the newcomer).
const HANDOFF_QUEUE: usize = 64;

impl std::fmt::Debug for EmbeddedTurn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedTurn")
            .field("udp", &self.udp)
            .field("tcp", &self.tcp)
            .field("tls", &self.tls)
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl EmbeddedTurn {
    /// Binds `bind` (UDP; TCP if configured; TLS as `tls` says) and starts relaying.
    /// `secret` mints and checks credentials.
    pub async fn start(
        config: &TurnConfig,
        bind: IpAddr,
        tls: TurnTls<'_>,
        secret: &[u8],
        metrics: Arc<Metrics>,
    ) -> Result<(Self, Arc<IceOffer>), TurnError> {
        let public = config.public_ip.unwrap_or_else(|| default_public_ip(bind));
        let udp_addr = SocketAddr::new(bind, config.port);
        let bind_err = |addr, transport| move |source| TurnError::Bind { addr, transport, source };
        let udp = UdpSocket::bind(udp_addr).await.map_err(bind_err(udp_addr, "udp"))?;
        roomy(&udp);
        let udp_local = udp.local_addr().map_err(bind_err(udp_addr, "udp"))?;
        let tcp = if config.tcp {
            // The same port number as UDP where we can (clients then need one number).
            let want = SocketAddr::new(bind, udp_local.port());
            let l = match TcpListener::bind(want).await {
                Ok(l) => l,
                Err(_) if config.port == 0 => TcpListener::bind(SocketAddr::new(bind, 0))
                    .await
                    .map_err(bind_err(want, "tcp"))?,
                Err(e) => return Err(bind_err(want, "tcp")(e)),
            };
            Some(l)
        } else {
            None
        };
        let tcp_local = tcp.as_ref().and_then(|l| l.local_addr().ok());
        let mut tls_handoff = None;
        let tls = match tls {
            TurnTls::Off => None,
            TurnTls::OwnPort(setup) => {
                let want = SocketAddr::new(bind, config.tls_port);
                let listener = TcpListener::bind(want).await.map_err(bind_err(want, "tls"))?;
                let local = listener.local_addr().map_err(bind_err(want, "tls"))?;
                let timeout = config.tls_handshake_timeout;
                let front = TlsFront::new(setup.turn.clone(), timeout, MAX_TLS_HANDSHAKES);
                Some((Streams::Accept(listener, Some(front)), local, setup))
            }
            TurnTls::HttpsPort { https, setup } => {
                let (tx, rx) = mpsc::channel(HANDOFF_QUEUE);
                tls_handoff = Some(tx);
                Some((Streams::HandedOver(https, rx), https, setup))
            }
        };
        let tls = tls.map(|(streams, local, setup)| {
            let host = config.tls_host.clone().unwrap_or_else(|| public.to_string());
            if !setup.names(&host) {
                tracing::warn!(
                    host,
                    "the TLS certificate does not name the TURN over TLS host, so TLS clients \
                     will refuse it: give its name with --turn-tls-host"
                );
            }
            (streams, local, host)
        });
        let tls_local = tls.as_ref().map(|(_, local, _)| *local);
        let mut urls = vec![
            format!("stun:{}", SocketAddr::new(public, udp_local.port())),
            format!("turn:{}?transport=udp", SocketAddr::new(public, udp_local.port())),
        ];
        if let Some(t) = tcp_local {
            urls.push(format!("turn:{}?transport=tcp", SocketAddr::new(public, t.port())));
        }
        if let Some((_, local, host)) = &tls {
            urls.push(format!("turns:{}?transport=tcp", host_port(host, local.port())));
        }
        urls.extend(config.external_urls.iter().cloned());
        let offer = Arc::new(IceOffer::new(secret, config.credential_ttl, urls));
        let shared = Arc::new(Shared {
            offer: offer.clone(),
            realm: config.realm.clone(),
            limits: Limits {
                allocations: config.max_allocations_per_member,
                allocation_rate: config.allocation_bytes_per_s,
                member_rate: config.member_bytes_per_s,
            },
            metrics,
            seen: Mutex::new(HashMap::new()),
            members: Mutex::new(HashMap::new()),
        });
        let mut conn_configs = Vec::new();
        let udp_current = Arc::default();
        conn_configs.push(ConnConfig {
            conn: Arc::new(Listener {
                socket: udp,
                shared: shared.clone(),
                current: Arc::clone(&udp_current),
            }),
            relay_addr_generator: Box::new(Relays {
                bind,
                public,
                shared: shared.clone(),
                current: udp_current,
            }),
        });
        let tcp = tcp.map(|listener| Streams::Accept(listener, None));
        let stopping = Arc::new(AtomicBool::new(false));
        for streams in tcp.into_iter().chain(tls.map(|(streams, _, _)| streams)) {
            let current = Arc::default();
            let stopping = Arc::clone(&stopping);
            let conn =
                TcpListenerConn::start(streams, shared.clone(), Arc::clone(&current), stopping)
                    .map_err(|e| TurnError::Start(e.to_string()))?;
            conn_configs.push(ConnConfig {
                conn: Arc::new(conn),
                relay_addr_generator: Box::new(Relays {
                    bind,
                    public,
                    shared: shared.clone(),
                    current,
                }),
            });
        }
        let server = TurnServer::new(ServerConfig {
            conn_configs,
            realm: shared.realm.clone(),
            auth_handler: Arc::new(Auth(shared)),
            channel_bind_timeout: Duration::from_secs(0),
            alloc_close_notify: None,
        })
        .await
        .map_err(|e| TurnError::Start(e.to_string()))?;
        tracing::info!(
            udp = %udp_local, tcp = ?tcp_local, tls = ?tls_local, %public, "STUN/TURN listening"
        );
        let turn = Self {
            server,
            udp: udp_local,
            tcp: tcp_local,
            tls: tls_local,
            tls_handoff,
            public,
            stopping,
        };
        Ok((turn, offer))
    }

    /// The UDP listening address.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp
    }

    /// The TCP listening address, if TURN over TCP is on.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// The TURN over TLS listening address, if it is on (it needs a certificate): the
    /// HTTPS one when they share it.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls
    }

    /// Where the HTTPS server hands TURN clients, when TURN over TLS shares its port.
    pub(crate) fn tls_handoff(&self) -> Option<mpsc::Sender<(TurnTlsStream, SocketAddr)>> {
        self.tls_handoff.clone()
    }

    /// The address in URLs and relayed candidates.
    pub fn public_ip(&self) -> IpAddr {
        self.public
    }

    /// Ends every allocation of `member` (it left the room).
    pub async fn drop_member(&self, member: &str) {
        // Usernames carry an expiry; allocations are found by their member part.
        let Ok(infos) = self.server.get_allocations_info(None).await else { return };
        let names: Vec<String> = infos
            .into_values()
            .map(|i| i.username)
            .filter(|u| parse_username(u).is_some_and(|(_, m)| m == member))
            .collect();
        for name in names {
            let _ = self.server.delete_allocations_by_username(name).await;
        }
    }

    /// Stops relaying and closes every allocation.
    pub async fn close(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Err(e) = self.server.close().await {
            tracing::warn!("closing the TURN server: {e}");
        }
    }
}

/// Socket buffers for the relay: a burst of a peer's SCTP packets must not overflow the
/// kernel's default receive buffer (about 200 KiB), or each loss costs the peers a
/// retransmission timeout. The kernel caps it at `net.core.rmem_max`.
const SOCKET_BUFFER: usize = 4 << 20;

fn roomy(socket: &UdpSocket) {
    let s = socket2::SockRef::from(socket);
    if let Err(e) = s.set_recv_buffer_size(SOCKET_BUFFER).and(s.set_send_buffer_size(SOCKET_BUFFER))
    {
        tracing::debug!("cannot enlarge a relay socket's buffers: {e}");
    }
}

/// `host:port`, with an IPv6 address in brackets.
fn host_port(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{host}:{port}"),
    }
}

/// Where peers reach a server bound to `bind`: that address if it is a specific one,
/// else this machine's first non-loopback IPv4 address (loopback if it has none).
fn default_public_ip(bind: IpAddr) -> IpAddr {
    if !bind.is_unspecified() {
        return bind;
    }
    if_addrs::get_if_addrs()
        .ok()
        .and_then(|addrs| {
            addrs.into_iter().map(|i| i.ip()).find(|ip| ip.is_ipv4() && !ip.is_loopback())
        })
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_follow_the_turn_rest_convention() {
        let offer = IceOffer::new(
            b"secret",
            Duration::from_secs(600),
            vec!["stun:198.18.0.1:3478".into(), "turn:198.18.0.1:3478?transport=udp".into()],
        );
        let servers = offer.servers_for("abc");
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].urls, vec!["stun:198.18.0.1:3478"]);
        assert_eq!(servers[0].username, None);
        let user = servers[1].username.clone().unwrap_or_default();
        let (expiry, member) = parse_username(&user).unwrap_or((0, ""));
        assert_eq!(member, "abc");
        assert!(expiry >= unix_now() + 590 && expiry <= unix_now() + 610);
        assert_eq!(servers[1].credential.as_deref(), Some(password(b"secret", &user).as_str()));
        // coturn's check of a REST credential, by hand: base64(HMAC-SHA1(secret, user)).
        assert_eq!(password(b"secret", "1700000000:abc"), "JHgegmW+/B84iarkT5SFAOC1Iqw=");
    }

    #[test]
    fn usernames_that_are_not_weft_ones_are_refused() {
        for bad in ["", "abc", "123:", ":abc", "x1:abc", "-1:abc"] {
            assert_eq!(parse_username(bad), None, "{bad:?}");
        }
        assert_eq!(parse_username("5:a:b"), Some((5, "a:b")));
    }

    #[test]
    fn tcp_frames_are_cut_at_stun_and_padded_channel_data_lengths() {
        assert_eq!(frame_len(&[0x00, 0x01, 0x00]), None);
        assert_eq!(frame_len(&[0x00, 0x03, 0x00, 0x08]), Some(28));
        assert_eq!(frame_len(&[0x40, 0x00, 0x00, 0x05]), Some(12));
        assert_eq!(frame_len(&[0x40, 0x00, 0x00, 0x08]), Some(12));
        assert_eq!(frame_len(&[0xC0, 0x00, 0x00, 0x08]), Some(usize::MAX));
    }

    #[tokio::test]
    async fn tls_handshakes_beyond_the_most_at_once_are_refused_at_once() {
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let setup = TlsSource::SelfSigned.load(listen).unwrap_or_else(|e| panic!("{e}"));
        let front = TlsFront::new(setup.turn, Duration::from_secs(30), 1);
        let metrics = Arc::new(Metrics::default());
        let shared = Shared {
            offer: Arc::new(IceOffer::new(b"s", Duration::from_secs(60), Vec::new())),
            realm: "weft".into(),
            limits: Limits { allocations: 1, allocation_rate: 1, member_rate: 1 },
            metrics: metrics.clone(),
            seen: Mutex::default(),
            members: Mutex::default(),
        };
        // One client that never sends its ClientHello holds the only slot...
        let (_silent, server_side) = tokio::io::duplex(1024);
        let pending = front.handshake(server_side, &shared);
        tokio::pin!(pending);
        assert!(futures_util::poll!(pending.as_mut()).is_pending());
        // ...so the next one is refused without waiting.
        let (_next, server_side) = tokio::io::duplex(1024);
        let refused =
            tokio::time::timeout(Duration::from_secs(1), front.handshake(server_side, &shared));
        assert!(matches!(refused.await, Ok(None)));
        assert_eq!(metrics.turn_refusals(TurnRefusal::TlsHandshake), 1);
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut b = Bucket::new(1_000_000);
        assert!(b.take(250_000));
        assert!(!b.take(10_000));
    }
}
