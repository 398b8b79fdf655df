//! HTTPS and TURN over TLS on one port: 443 on a public host, the one port a network that
//! lets only TLS out (a corporate proxy, a strict firewall) still reaches, and which the
//! web app and the signaling WebSocket need too.
//!
//! After the TLS handshake the client's first byte tells them apart: a STUN message
//! starts with two zero bits (RFC 5389 §6), so a TURN client's first request does; an HTTP
//! request starts with a letter (its method, or HTTP/2's `PRI` preface). A client that
//! negotiated ALPN `stun.turn` (RFC 7443) is TURN at once. TURN clients are handed to the
//! embedded relay ([`crate::turn::TurnTls::HttpsPort`]); the rest is axum-server's as
//! before. A handshake that fails or takes too long is dropped as axum-server's own TLS
//! acceptor drops it, and is not counted as a TURN refusal: nothing said it was TURN.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::metrics::{Metrics, TurnRefusal};

/// A TURN over TLS client's stream, handed over by the HTTPS server.
pub(crate) type TurnTlsStream = Prefixed<TlsStream<TcpStream>>;

/// The ALPN protocol of TURN (RFC 7443).
const ALPN_TURN: &[u8] = b"stun.turn";
/// How long a client has to send its first byte after the handshake (hyper's own limit on
/// reading a request's head).
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);

/// axum-server's acceptor for a port shared by HTTPS and TURN over TLS.
#[derive(Clone)]
pub(crate) struct HttpsOrTurn {
    tls: TlsAcceptor,
    handshake_timeout: Duration,
    turn: mpsc::Sender<(TurnTlsStream, SocketAddr)>,
    metrics: Arc<Metrics>,
}

impl HttpsOrTurn {
    /// `https` is the HTTPS configuration (its ALPN list gains `stun.turn`); TURN clients
    /// go to `turn`.
    pub(crate) fn new(
        https: &rustls::ServerConfig,
        handshake_timeout: Duration,
        turn: mpsc::Sender<(TurnTlsStream, SocketAddr)>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut config = https.clone();
        config.alpn_protocols.push(ALPN_TURN.to_vec());
        Self { tls: TlsAcceptor::from(Arc::new(config)), handshake_timeout, turn, metrics }
    }

    /// The client's stream if it speaks HTTP; `Err` if it failed, or was TURN and was
    /// handed over.
    async fn sort(self, stream: TcpStream) -> io::Result<TurnTlsStream> {
        let from = stream.peer_addr()?;
        let handshake = tokio::time::timeout(self.handshake_timeout, self.tls.accept(stream));
        let mut tls = handshake.await.map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        let turn_alpn = tls.get_ref().1.alpn_protocol() == Some(ALPN_TURN);
        let first = if turn_alpn {
            None
        } else {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(FIRST_BYTE_TIMEOUT, tls.read(&mut byte));
            if read.await.map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            Some(byte[0])
        };
        let stream = Prefixed { first, inner: tls };
        if turn_alpn || first.is_some_and(|b| b >> 6 == 0) {
            if self.turn.try_send((stream, from)).is_err() {
                self.metrics.turn_refused(TurnRefusal::TlsHandshake);
            }
            return Err(io::Error::other("a TURN client, handed to the relay"));
        }
        Ok(stream)
    }
}

impl<S: Send + 'static> axum_server::accept::Accept<TcpStream, S> for HttpsOrTurn {
    type Stream = TurnTlsStream;
    type Service = S;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, S)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok((this.sort(stream).await?, service)) })
    }
}

/// A stream whose first byte was read already, and is read again first.
#[derive(Debug)]
pub(crate) struct Prefixed<S> {
    first: Option<u8>,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() > 0 {
            if let Some(byte) = self.first.take() {
                buf.put_slice(&[byte]);
                return Poll::Ready(Ok(()));
            }
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_prefixed_stream_reads_its_first_byte_again_then_the_rest() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"ET /").await.unwrap_or_else(|e| panic!("{e}"));
        drop(a);
        let mut stream = Prefixed { first: Some(b'G'), inner: b };
        let mut all = String::new();
        stream.read_to_string(&mut all).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(all, "GET /");
    }
}
