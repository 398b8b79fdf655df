//! TURN over TCP and over TLS (`turn:…?transport=tcp`, `turns:`): the connections to the
//! TURN server and the framing on them.
//!
//! RFC 8656 §3.1 (RFC 5766 §2.1) and RFC 7065: over a stream the client and the server
//! exchange the same STUN messages and ChannelData messages as over UDP, back to back, each
//! ChannelData padded to a multiple of four bytes. The relayed transport stays UDP: only the
//! hop to the server is a stream, so a host whose network lets no UDP (or only TCP to 443)
//! out still gets a relayed UDP candidate.
//!
//! [`TurnStreamDecoder`] (the `weft-turn-framing` crate, which Weft fuzzes) is the framing,
//! with no I/O. [`RTCTurnStreams`] owns the connections: each runs in a task of its own
//! that connects, runs TLS (rustls's own state machine, fed from and to the runtime's TCP
//! stream, so no runtime-specific TLS crate is needed), cuts what arrives into messages and
//! writes what the relayer sends. The driver talks to the tasks through channels, so a
//! stalled server never blocks the driver's loop: what does not fit in a connection's queue
//! is dropped, as a full UDP socket buffer would.

use crate::runtime::{AsyncTcpStream, Runtime};
use bytes::BytesMut;
use futures::FutureExt;
use log::{debug, trace};
use rtc::shared::{FourTuple, TaggedBytesMut, TransportContext, TransportProtocol};
use rustls::pki_types::ServerName;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;
use weft_turn_framing::TurnStreamDecoder;

/// How long a connection (TCP, then the start of TLS) may take before the server counts as
/// unreachable: a firewall that drops the SYN would otherwise hold gathering for minutes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages waiting to be written to one connection, at most (about 1.3 MB of relayed
/// packets). More are dropped, as a full socket buffer would.
const WRITE_QUEUE: usize = 1024;
/// Events from every connection waiting for the driver, at most; a full queue makes the
/// connections stop reading (TCP then pushes back on the server).
const EVENT_QUEUE: usize = 1024;
const READ_BUF_LEN: usize = 16 * 1024;

/// What a connection to a TURN server tells the driver.
pub(crate) enum TurnStreamEvent {
    /// Connected (TLS, if any, has started): the relayer may allocate over it.
    Connected { id: u64, four_tuple: FourTuple },
    /// A whole message from the server, tagged with the connection's addresses.
    Message(TaggedBytesMut),
    /// The connection failed or ended.
    Closed { id: u64, reason: String },
}

/// A connection the relayer wants: to `server`, with TLS checked against `tls_name` if
/// that is given.
#[derive(Debug, Clone)]
pub(crate) struct TurnStreamRequest {
    pub(crate) id: u64,
    pub(crate) server: SocketAddr,
    pub(crate) tls_name: Option<String>,
}

/// The driver's connections to TURN servers over TCP and TLS, by id.
pub(crate) struct RTCTurnStreams {
    runtime: Arc<dyn Runtime>,
    tls_config: Option<Arc<rustls::ClientConfig>>,
    writers: HashMap<u64, async_channel::Sender<BytesMut>>,
    ids: HashMap<FourTuple, u64>,
    events_tx: async_channel::Sender<TurnStreamEvent>,
    events_rx: async_channel::Receiver<TurnStreamEvent>,
}

impl RTCTurnStreams {
    /// `tls_config` checks TURN servers' certificates; `None` = the Mozilla roots
    /// (`webpki-roots`).
    pub(crate) fn new(
        runtime: Arc<dyn Runtime>,
        tls_config: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        let (events_tx, events_rx) = async_channel::bounded(EVENT_QUEUE);
        Self {
            runtime,
            tls_config,
            writers: HashMap::new(),
            ids: HashMap::new(),
            events_tx,
            events_rx,
        }
    }

    /// Where the connections' events arrive (a clone: the driver waits on it in its loop).
    pub(crate) fn events(&self) -> async_channel::Receiver<TurnStreamEvent> {
        self.events_rx.clone()
    }

    /// Starts a connection in a task of its own; its events say how it went.
    pub(crate) fn connect(&mut self, request: TurnStreamRequest) {
        let tls = match request.tls_name {
            None => None,
            Some(name) => match self.tls_config() {
                Ok(config) => match ServerName::try_from(name) {
                    Ok(name) => Some((config, name)),
                    Err(err) => {
                        self.fail(request.id, format!("not a TLS server name: {err}"));
                        return;
                    }
                },
                Err(err) => {
                    self.fail(request.id, format!("no TLS configuration: {err}"));
                    return;
                }
            },
        };
        let (writer, outgoing) = async_channel::bounded(WRITE_QUEUE);
        self.writers.insert(request.id, writer);
        let task = run_stream(
            Arc::clone(&self.runtime),
            request.id,
            request.server,
            tls,
            outgoing,
            self.events_tx.clone(),
        );
        // Detached: the task ends when its writer is dropped (`close`) or the driver's
        // event receiver is gone.
        drop(self.runtime.spawn(Box::pin(task)));
    }

    /// Notes the addresses of a connection that is up.
    pub(crate) fn connected(&mut self, id: u64, four_tuple: FourTuple) {
        if self.writers.contains_key(&id) {
            self.ids.insert(four_tuple, id);
        }
    }

    /// Closes a connection once what was queued for it is written.
    pub(crate) fn close(&mut self, id: u64) {
        self.writers.remove(&id);
        self.ids.retain(|_, v| *v != id);
    }

    /// Closes every connection (their queued messages are still written).
    pub(crate) fn close_all(&mut self) {
        self.writers.clear();
        self.ids.clear();
    }

    /// Queues `msg` (a whole STUN or padded ChannelData message) on the connection with its
    /// addresses. A full queue drops it, as a full UDP socket buffer would; only a missing
    /// connection is an error.
    pub(crate) fn write(&mut self, msg: TaggedBytesMut) -> io::Result<usize> {
        let four_tuple = FourTuple::from(&msg.transport);
        let Some(writer) = self
            .ids
            .get(&four_tuple)
            .and_then(|id| self.writers.get(id))
        else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!(
                    "no TURN connection from {} to {}",
                    four_tuple.local_addr, four_tuple.peer_addr
                ),
            ));
        };
        let n = msg.message.len();
        match writer.try_send(msg.message) {
            Ok(()) => Ok(n),
            Err(async_channel::TrySendError::Full(_)) => {
                trace!(
                    "TURN connection to {} is full: message dropped",
                    four_tuple.peer_addr
                );
                Ok(0)
            }
            Err(async_channel::TrySendError::Closed(_)) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("TURN connection to {} closed", four_tuple.peer_addr),
            )),
        }
    }

    fn fail(&self, id: u64, reason: String) {
        // The driver reads this queue in the same loop that called us; if it is full the
        // request is simply forgotten and gathering goes on without it.
        let _ = self
            .events_tx
            .try_send(TurnStreamEvent::Closed { id, reason });
    }

    fn tls_config(&mut self) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        if let Some(config) = &self.tls_config {
            return Ok(Arc::clone(config));
        }
        let config = Arc::new(default_tls_config()?);
        self.tls_config = Some(Arc::clone(&config));
        Ok(config)
    }
}

/// TLS for TURN servers by default: the Mozilla root certificates, and the crypto provider
/// of the crate's `crypto-*` feature (named outright rather than rustls's process default,
/// which panics when the build enables more than one).
fn default_tls_config() -> Result<rustls::ClientConfig, rustls::Error> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    let roots = ROOTS.get_or_init(|| {
        Arc::new(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
    });
    #[cfg(feature = "crypto-ring")]
    let provider = rustls::crypto::ring::default_provider();
    #[cfg(all(not(feature = "crypto-ring"), feature = "crypto-aws-lc-rs"))]
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(not(any(feature = "crypto-ring", feature = "crypto-aws-lc-rs")))]
    return Err(rustls::Error::General(
        "TURN over TLS needs the crypto-ring or crypto-aws-lc-rs feature".to_owned(),
    ));
    #[cfg(any(feature = "crypto-ring", feature = "crypto-aws-lc-rs"))]
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(Arc::clone(roots))
            .with_no_client_auth(),
    )
}

/// One connection: connect, then read and write until either side ends, then say why.
async fn run_stream(
    runtime: Arc<dyn Runtime>,
    id: u64,
    server: SocketAddr,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    outgoing: async_channel::Receiver<BytesMut>,
    events: async_channel::Sender<TurnStreamEvent>,
) {
    let reason = match connect(&runtime, server, tls).await {
        Ok((stream, tls)) => match stream.local_addr() {
            Ok(local_addr) => {
                let four_tuple = FourTuple {
                    local_addr,
                    peer_addr: server,
                };
                debug!("TURN connection {id} from {local_addr} to {server} is up");
                if events
                    .send(TurnStreamEvent::Connected { id, four_tuple })
                    .await
                    .is_err()
                {
                    return;
                }
                let tls = tls.map(Mutex::new);
                let (nudge_tx, nudge_rx) = async_channel::bounded(1);
                let reader = read_loop(
                    &runtime,
                    &*stream,
                    four_tuple,
                    tls.as_ref(),
                    &nudge_tx,
                    &events,
                );
                let writer = write_loop(&*stream, tls.as_ref(), &outgoing, &nudge_rx);
                futures::pin_mut!(reader, writer);
                match futures::future::select(reader, writer).await {
                    futures::future::Either::Left((result, _))
                    | futures::future::Either::Right((result, _)) => match result {
                        Ok(()) => "closed".to_owned(),
                        Err(err) => err.to_string(),
                    },
                }
            }
            Err(err) => err.to_string(),
        },
        Err(err) => err.to_string(),
    };
    debug!("TURN connection {id} to {server} ended: {reason}");
    let _ = events.send(TurnStreamEvent::Closed { id, reason }).await;
}

async fn connect(
    runtime: &Arc<dyn Runtime>,
    server: SocketAddr,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
) -> io::Result<(Arc<dyn AsyncTcpStream>, Option<rustls::ClientConnection>)> {
    let connect = runtime.connect_tcp(server).fuse();
    let timeout = runtime.sleep(CONNECT_TIMEOUT).fuse();
    futures::pin_mut!(connect, timeout);
    let stream = futures::select! {
        stream = connect => stream?,
        _ = timeout => return Err(io::Error::new(io::ErrorKind::TimedOut, "connection timed out")),
    };
    let tls = match tls {
        Some((config, name)) => {
            let mut conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
            // No limit of rustls's own: the write queue bounds what waits (a handshake's
            // round trip of messages at most), and a message cut short would break framing.
            conn.set_buffer_limit(None);
            Some(conn)
        }
        None => None,
    };
    Ok((stream, tls))
}

/// Reads until the stream ends, handing each whole message to the driver. Over TLS, bytes go
/// through rustls first, and the writer is nudged when rustls has something to send (the
/// handshake's next flight, a key update).
async fn read_loop(
    runtime: &Arc<dyn Runtime>,
    stream: &dyn AsyncTcpStream,
    four_tuple: FourTuple,
    tls: Option<&Mutex<rustls::ClientConnection>>,
    nudge: &async_channel::Sender<()>,
    events: &async_channel::Sender<TurnStreamEvent>,
) -> io::Result<()> {
    let mut buf = vec![0u8; READ_BUF_LEN];
    let mut plain = vec![0u8; READ_BUF_LEN];
    let mut decoder = TurnStreamDecoder::default();
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        match tls {
            None => decoder.extend(&buf[..n]),
            Some(tls) => {
                let mut conn = lock(tls);
                let mut incoming = &buf[..n];
                while !incoming.is_empty() {
                    if conn.read_tls(&mut incoming)? == 0 {
                        break;
                    }
                    let state = conn.process_new_packets().map_err(io::Error::other)?;
                    let mut pending = state.plaintext_bytes_to_read();
                    while pending > 0 {
                        let k = conn
                            .reader()
                            .read(&mut plain[..pending.min(READ_BUF_LEN)])?;
                        if k == 0 {
                            break;
                        }
                        decoder.extend(&plain[..k]);
                        pending -= k;
                    }
                    if state.peer_has_closed() {
                        return Ok(());
                    }
                }
                if conn.wants_write() {
                    let _ = nudge.try_send(());
                }
            }
        }
        while let Some(message) = decoder
            .next_message()
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err.to_string()))?
        {
            let msg = TaggedBytesMut {
                now: runtime.now(),
                transport: TransportContext {
                    local_addr: four_tuple.local_addr,
                    peer_addr: four_tuple.peer_addr,
                    ecn: None,
                    transport_protocol: TransportProtocol::TCP,
                },
                message,
            };
            if events.send(TurnStreamEvent::Message(msg)).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Writes what the relayer queued (through rustls, over TLS) until the queue is closed. The
/// only writer to the socket, so TLS records go out in the order rustls made them.
async fn write_loop(
    stream: &dyn AsyncTcpStream,
    tls: Option<&Mutex<rustls::ClientConnection>>,
    outgoing: &async_channel::Receiver<BytesMut>,
    nudge: &async_channel::Receiver<()>,
) -> io::Result<()> {
    let Some(tls) = tls else {
        while let Ok(message) = outgoing.recv().await {
            stream.write_all(&message).await?;
        }
        // The relayer is done with this connection.
        return Ok(());
    };
    let mut out = Vec::new();
    let mut closing = false;
    loop {
        // What rustls has to send: at first the ClientHello, then records of messages.
        tls_output(tls, &mut out)?;
        if !out.is_empty() {
            stream.write_all(&out).await?;
        }
        if closing {
            return Ok(());
        }
        futures::select! {
            message = outgoing.recv().fuse() => match message {
                Ok(message) => tls_input(tls, message)?,
                Err(_) => {
                    // The relayer is done with this connection.
                    lock(tls).send_close_notify();
                    closing = true;
                }
            },
            _ = nudge.recv().fuse() => {}
        }
    }
}

fn lock(
    tls: &Mutex<rustls::ClientConnection>,
) -> std::sync::MutexGuard<'_, rustls::ClientConnection> {
    tls.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Puts what rustls has to send into `out` (cleared first).
fn tls_output(tls: &Mutex<rustls::ClientConnection>, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    let mut conn = lock(tls);
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    Ok(())
}

/// Hands `message` to rustls to seal (before the handshake ends, rustls keeps it until then).
fn tls_input(tls: &Mutex<rustls::ClientConnection>, message: BytesMut) -> io::Result<()> {
    lock(tls).writer().write_all(&message)
}
