//! The `.weft` resolver's one piece of I/O: asking the host's own resolvers what the node
//! does not answer itself (`Output::DnsForward`), and handing their reply back
//! (`Input::DnsForwarded`). Which names are members', what is answered and what is
//! forwarded are the node's (`core/src/node/dns.rs`); the host's configuration is
//! `netconf`'s.
//!
//! Each query gets a socket of its own (a fresh random source port, so an off-path
//! attacker must guess it as well as the id) and tries the resolvers in turn, each for
//! `FORWARD_TIMEOUT`, taking only a datagram from the resolver it asked. Its socket is
//! not marked: with an exit node in use, forwarded queries go through the exit node like
//! the rest of the host's traffic.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use weft_core::node::Input;
use weft_core::node::dns::FORWARD_TIMEOUT;

/// Largest DNS message over UDP accepted back (EDNS0 allows up to 64 KiB; 4096 is what
/// resolvers offer in practice).
const MAX_REPLY: usize = 4096;

/// Asks the host's resolvers.
#[derive(Debug, Clone)]
pub struct Forwarder {
    upstreams: Arc<[SocketAddr]>,
}

impl Forwarder {
    /// Forwards to `upstreams`, in order (none: every forward fails, and the node answers
    /// SERVFAIL).
    pub fn new(upstreams: Vec<SocketAddr>) -> Self {
        Self { upstreams: upstreams.into() }
    }

    /// Asks for `query` in the background; the reply (or `None`) reaches the node as
    /// `Input::DnsForwarded { id, .. }` through `inputs`.
    pub fn forward(&self, id: u64, query: Vec<u8>, inputs: mpsc::UnboundedSender<Input>) {
        let upstreams = self.upstreams.clone();
        tokio::spawn(async move {
            let mut reply = None;
            for server in upstreams.iter() {
                match tokio::time::timeout(FORWARD_TIMEOUT, ask(*server, &query)).await {
                    Ok(Ok(r)) => {
                        reply = Some(r);
                        break;
                    }
                    Ok(Err(e)) => tracing::debug!("DNS forward to {server}: {e}"),
                    Err(_) => tracing::debug!("DNS forward to {server}: no answer"),
                }
            }
            let _ = inputs.send(Input::DnsForwarded { id, reply });
        });
    }
}

async fn ask(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0; MAX_REPLY];
    // A connected socket receives only from `server`.
    let n = socket.recv(&mut buf).await?;
    buf.truncate(n);
    Ok(buf)
}
