//! The signaling WebSocket as a dumb pipe (tokio-tungstenite). The node decides when to
//! connect, what to send (join, ping, signals, leave), when a connection is dead and
//! when to retry; this only opens the socket it is told to, moves text frames both ways
//! and says when the socket closed. It neither encodes nor decodes a message.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use weft_core::node::Input;

/// Why the mesh stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum SignalingError {
    /// The URL is not a ws:// or wss:// URL.
    #[error("bad server URL {url:?}: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server speaks another protocol version: only an update helps.
    #[error("the server refused our protocol version: {0}")]
    UnsupportedVersion(String),
}

/// Checks that `url` is a WebSocket URL, so typos fail at once rather than retry forever.
pub fn check_url(url: &str) -> Result<(), SignalingError> {
    let bad = |reason: &str| SignalingError::BadUrl { url: url.into(), reason: reason.into() };
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .ok_or_else(|| bad("it must start with ws:// or wss:// (e.g. ws://127.0.0.1:8080/ws)"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad("it names no host"));
    }
    Ok(())
}

/// One WebSocket to the server, run by its own task. Reports
/// [`Input::SignalingOpened`], [`Input::SignalingText`] and [`Input::SignalingClosed`],
/// tagged with its number, so that a replaced socket's late reports are recognised and
/// dropped.
#[derive(Debug)]
pub struct SignalingSocket {
    id: u64,
    outgoing: mpsc::UnboundedSender<String>,
    task: JoinHandle<()>,
}

impl SignalingSocket {
    /// Starts connecting to `url` (a `wss://` one trusting `tls`, if given, else the usual
    /// root certificates); reports go to `reports` as `(id, input)`. With `mark`, the TCP
    /// socket carries that firewall mark (`SO_MARK`), so that policy routing keeps it on the
    /// underlay while an exit node carries everything else (`crate::netconf`).
    pub fn open(
        id: u64,
        url: String,
        mark: Option<u32>,
        tls: Option<Arc<rustls::ClientConfig>>,
        reports: mpsc::UnboundedSender<(u64, Input)>,
    ) -> Self {
        let (outgoing, outgoing_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(url, mark, tls, outgoing_rx, move |input| {
            let _ = reports.send((id, input));
        }));
        Self { id, outgoing, task }
    }

    /// Its number.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Sends a text frame (dropped if the socket is not open).
    pub fn send(&self, text: String) {
        let _ = self.outgoing.send(text);
    }

    /// Closes the socket once what was sent before went out (with a close frame if it
    /// is open); the task to wait for.
    pub fn close(self) -> JoinHandle<()> {
        // The task sees the channel end after the frames queued before.
        drop(self.outgoing);
        self.task
    }
}

/// Opens the WebSocket, on a TCP socket marked `mark` if given, trusting `tls` for
/// `wss://` if given.
async fn connect(
    url: &str,
    mark: Option<u32>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<WebSocketStream<MaybeTlsStream<TcpStream>>, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::Error;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let connector = tls.map(Connector::Rustls);
    let Some(mark) = mark else {
        let ws = tokio_tungstenite::connect_async_tls_with_config(url, None, false, connector);
        return ws.await.map(|(ws, _)| ws);
    };
    let request = url.into_client_request()?;
    let uri = request.uri();
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let host = host.to_string();
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("wss") { 443 } else { 80 });
    let mut last = std::io::Error::other("the server's name has no address");
    for addr in tokio::net::lookup_host((host.as_str(), port)).await? {
        match marked_connect(addr, mark).await {
            Ok(stream) => {
                let ws = tokio_tungstenite::client_async_tls_with_config(
                    request, stream, None, connector,
                )
                .await;
                return ws.map(|(ws, _)| ws);
            }
            Err(e) => last = e,
        }
    }
    Err(Error::Io(last))
}

/// A TCP connection to `addr` from a socket marked `mark`.
async fn marked_connect(addr: std::net::SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    #[cfg(target_os = "linux")]
    socket.set_mark(mark)?;
    // Only Linux routes by mark; elsewhere no mark is asked for (`signaling_mark`).
    #[cfg(not(target_os = "linux"))]
    let _ = mark;
    socket.set_nonblocking(true)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    socket.connect(addr).await
}

async fn run(
    url: String,
    mark: Option<u32>,
    tls: Option<Arc<rustls::ClientConfig>>,
    mut outgoing: mpsc::UnboundedReceiver<String>,
    report: impl Fn(Input),
) {
    let closed = |reason: String| report(Input::SignalingClosed { reason });
    let connect = tokio::select! {
        r = connect(url.as_str(), mark, tls) => r,
        // Nothing is sent before the socket opens; the channel ending means: close.
        () = async { while outgoing.recv().await.is_some() {} } => return,
    };
    let mut ws = match connect {
        Ok(ws) => ws,
        Err(e) => return closed(format!("cannot connect to {url}: {e}")),
    };
    report(Input::SignalingOpened);
    loop {
        tokio::select! {
            text = outgoing.recv() => match text {
                Some(text) => {
                    if let Err(e) = ws.send(Message::text(text)).await {
                        return closed(format!("connection lost: {e}"));
                    }
                }
                None => {
                    let _ = ws.close(None).await;
                    return;
                }
            },
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    report(Input::SignalingText(text.as_str().to_string()));
                }
                Some(Ok(Message::Close(frame))) => {
                    let why = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                    let reason = format!("server closed the connection {why}");
                    return closed(reason.trim().to_string());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return closed(format!("connection lost: {e}")),
                None => return closed("connection lost".into()),
            },
        }
    }
}
