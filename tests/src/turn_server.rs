//! A real TURN server (webrtc-rs `turn` 0.17, RFC 5766 over UDP, long-term credentials)
//! for the tests of the relayed path, with every datagram it handles counted and scanned.
//!
//! Both the listening socket (client ⇄ server: TURN messages, `Send`/`Data` indications,
//! `ChannelData`) and each allocation's relay socket (server ⇄ peer: the relayed payload
//! as is) are wrapped in [`CountingConn`], which counts bytes and searches every datagram
//! for the byte strings given to [`TurnServer::watch`]. A test can thus show that the
//! relay carried traffic and that a plaintext it sent never crossed the relay in the
//! clear.
//!
//! Everything binds one address of this machine (pass a non-loopback one for Chromium,
//! which does not use loopback candidates), so no test traffic leaves the machine.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use tokio::net::UdpSocket;
use turn::auth::{AuthHandler, generate_auth_key};
use turn::relay::RelayAddressGenerator;
use turn::server::Server;
use turn::server::config::{ConnConfig, ServerConfig};
use webrtc_util::Conn;

/// The realm the server announces.
pub const REALM: &str = "weft.test";

/// What the server's sockets saw.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Bytes received and sent on the listening socket (from and to TURN clients).
    pub client_bytes: AtomicU64,
    /// Bytes received and sent on the allocations' relay sockets (the relayed payload).
    pub relayed_bytes: AtomicU64,
    /// Datagrams received and sent on the relay sockets.
    pub relayed_packets: AtomicU64,
    /// Allocations made (relay sockets bound).
    pub allocations: AtomicU64,
    watched: Mutex<Vec<(Vec<u8>, u64)>>,
}

impl RelayStats {
    /// Bytes through the allocations' relay sockets so far.
    pub fn relayed_bytes(&self) -> u64 {
        self.relayed_bytes.load(Ordering::Relaxed)
    }

    /// Bytes through the listening socket so far.
    pub fn client_bytes(&self) -> u64 {
        self.client_bytes.load(Ordering::Relaxed)
    }

    /// How many datagrams (on any of the server's sockets) contained `needle`; `None` if
    /// it was never given to [`TurnServer::watch`].
    pub fn hits(&self, needle: &[u8]) -> Option<u64> {
        let watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        watched.iter().find(|(n, _)| n == needle).map(|(_, hits)| *hits)
    }

    fn record(&self, data: &[u8], relayed: bool) {
        let len = data.len() as u64;
        if relayed {
            self.relayed_bytes.fetch_add(len, Ordering::Relaxed);
            self.relayed_packets.fetch_add(1, Ordering::Relaxed);
        } else {
            self.client_bytes.fetch_add(len, Ordering::Relaxed);
        }
        let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        for (needle, hits) in watched.iter_mut() {
            if !needle.is_empty() && data.windows(needle.len()).any(|w| w == needle.as_slice()) {
                *hits += 1;
            }
        }
    }
}

/// A UDP socket as the TURN server's [`Conn`], recording every datagram in [`RelayStats`].
#[derive(Debug)]
pub struct CountingConn {
    socket: UdpSocket,
    stats: Arc<RelayStats>,
    relayed: bool,
}

#[async_trait]
impl Conn for CountingConn {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(self.socket.connect(addr).await?)
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        let n = self.socket.recv(buf).await?;
        self.stats.record(&buf[..n], self.relayed);
        Ok(n)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let (n, from) = self.socket.recv_from(buf).await?;
        self.stats.record(&buf[..n], self.relayed);
        Ok((n, from))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        self.stats.record(buf, self.relayed);
        Ok(self.socket.send(buf).await?)
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        self.stats.record(buf, self.relayed);
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

/// Binds each allocation's relay socket on the server's own address, counted.
struct CountingRelays {
    ip: IpAddr,
    stats: Arc<RelayStats>,
}

#[async_trait]
impl RelayAddressGenerator for CountingRelays {
    fn validate(&self) -> std::result::Result<(), turn::Error> {
        Ok(())
    }

    async fn allocate_conn(
        &self,
        use_ipv4: bool,
        requested_port: u16,
    ) -> std::result::Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), turn::Error> {
        if use_ipv4 != self.ip.is_ipv4() {
            return Err(turn::Error::Other("address family not served".into()));
        }
        let socket = UdpSocket::bind(SocketAddr::new(self.ip, requested_port))
            .await
            .map_err(|e| turn::Error::Other(e.to_string()))?;
        let addr = socket.local_addr().map_err(|e| turn::Error::Other(e.to_string()))?;
        self.stats.allocations.fetch_add(1, Ordering::Relaxed);
        let conn = CountingConn { socket, stats: Arc::clone(&self.stats), relayed: true };
        Ok((Arc::new(conn), addr))
    }
}

/// Accepts exactly one user, with a long-term credential.
struct OneUser {
    username: String,
    key: Vec<u8>,
}

impl AuthHandler for OneUser {
    fn auth_handle(
        &self,
        username: &str,
        _realm: &str,
        _src: SocketAddr,
    ) -> std::result::Result<Vec<u8>, turn::Error> {
        if username == self.username {
            Ok(self.key.clone())
        } else {
            Err(turn::Error::Other("unknown TURN user".into()))
        }
    }
}

/// A running TURN server. Call [`TurnServer::close`] to stop it.
pub struct TurnServer {
    server: Server,
    addr: SocketAddr,
    username: String,
    password: String,
    stats: Arc<RelayStats>,
}

impl std::fmt::Debug for TurnServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnServer")
            .field("addr", &self.addr)
            .field("username", &self.username)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl TurnServer {
    /// Starts a TURN server on a free UDP port of `ip` that relays from `ip` too, and
    /// accepts `username` with `password` (long-term credentials, realm [`REALM`]).
    pub async fn start(ip: IpAddr, username: &str, password: &str) -> Result<Self> {
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0))
            .await
            .with_context(|| format!("cannot bind the TURN server's UDP socket on {ip}"))?;
        let addr = socket.local_addr()?;
        let stats = Arc::new(RelayStats::default());
        let conn = CountingConn { socket, stats: Arc::clone(&stats), relayed: false };
        let server = Server::new(ServerConfig {
            conn_configs: vec![ConnConfig {
                conn: Arc::new(conn),
                relay_addr_generator: Box::new(CountingRelays { ip, stats: Arc::clone(&stats) }),
            }],
            realm: REALM.to_string(),
            auth_handler: Arc::new(OneUser {
                username: username.to_string(),
                key: generate_auth_key(username, REALM, password),
            }),
            channel_bind_timeout: Duration::from_secs(0),
            alloc_close_notify: None,
        })
        .await
        .context("cannot start the TURN server")?;
        Ok(Self {
            server,
            addr,
            username: username.to_string(),
            password: password.to_string(),
            stats,
        })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `turn:<ip>:<port>?transport=udp`.
    pub fn url(&self) -> String {
        format!("turn:{}?transport=udp", self.addr)
    }

    /// One `RTCIceServer` entry for this server: `{ urls, username, credential }`.
    pub fn ice_server(&self) -> serde_json::Value {
        serde_json::json!({
            "urls": self.url(),
            "username": self.username,
            "credential": self.password,
        })
    }

    /// What the server's sockets saw so far.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Counts from now on the datagrams that contain `needle` (see [`RelayStats::hits`]).
    pub fn watch(&self, needle: &[u8]) {
        let mut watched = self.stats.watched.lock().unwrap_or_else(PoisonError::into_inner);
        if !watched.iter().any(|(n, _)| n == needle) {
            watched.push((needle.to_vec(), 0));
        }
    }

    /// Stops the server and closes its allocations.
    pub async fn close(&self) -> Result<()> {
        self.server.close().await.context("cannot close the TURN server")
    }
}
