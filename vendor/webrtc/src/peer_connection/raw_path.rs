//! Weft's patch: raw datagrams on the selected candidate pair (see `WEFT-PATCH.md`).
//!
//! An application that multiplexes its own protocol on the ICE socket (RFC 7983 leaves
//! first bytes 16..=19 to none of STUN, DTLS, TURN channels or RTP) gives the connection a
//! [`RawPath`] with the first bytes it claims and a [`RawDatagramHandler`]:
//!
//! - **In**: a UDP datagram read on one of the connection's own sockets whose first byte
//!   is claimed goes to [`RawDatagramHandler::on_datagram`] (on the driver's task: the
//!   handler must not block) instead of into the connection, which would drop it.
//!   Datagrams that come through a TURN relay are not looked at.
//! - **Out**: [`RawPath::try_send`] sends one datagram from the selected pair's local
//!   socket to its remote address, from any thread, without waiting: `WouldBlock` when the
//!   socket's buffer is full (the datagram is dropped, as UDP may), `NotConnected` when
//!   there is no such pair.
//! - **Which pair**: the pair the connection's own DTLS records last went out on (the ICE
//!   handler stamps every non-STUN write with the selected pair; there is no public event
//!   for a selection change). A pair whose local end is a TURN relay or TCP has no raw
//!   path: `None`. Every change is reported to [`RawDatagramHandler::on_path`].

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, PoisonError};

use crate::peer_connection::transport::{MAX_GSO_BATCH_BYTES, MAX_GSO_SEGMENTS, MIN_GSO_RUN};
use crate::runtime::{AsyncUdpSocket, Transmit};

/// One `sendmsg` of `contents` to `remote` (GSO segments of `segment_size`, if given),
/// without waiting: `WouldBlock` if the socket cannot take it now.
fn send_once(
    socket: &dyn AsyncUdpSocket,
    remote: SocketAddr,
    contents: &[u8],
    segment_size: Option<usize>,
) -> io::Result<()> {
    let transmit = Transmit {
        destination: remote,
        ecn: None,
        contents,
        segment_size,
        src_ip: None,
    };
    match crate::runtime::poll_once(|cx| socket.poll_send(cx, &transmit)) {
        Some(result) => result.map(drop),
        None => Err(io::ErrorKind::WouldBlock.into()),
    }
}

/// Receives what a [`RawPath`] hands up. Called on the connection driver's task: return
/// quickly, never block.
pub trait RawDatagramHandler: Send + Sync {
    /// A datagram whose first byte the path claims, read on `local` from `remote`.
    fn on_datagram(&self, datagram: &[u8], local: SocketAddr, remote: SocketAddr);
    /// The selected pair changed: its (local, remote) addresses, or `None` when raw
    /// datagrams cannot be sent (no pair, or a relayed or TCP one).
    fn on_path(&self, path: Option<(SocketAddr, SocketAddr)>);
}

struct Target {
    socket: Arc<dyn AsyncUdpSocket>,
    local: SocketAddr,
    remote: SocketAddr,
}

struct Shared {
    first_bytes: RangeInclusive<u8>,
    handler: Arc<dyn RawDatagramHandler>,
    target: Mutex<Option<Target>>,
}

/// A connection's raw datagram path: see the module docs. Cheap to clone; every clone is
/// the same path.
#[derive(Clone)]
pub struct RawPath {
    shared: Arc<Shared>,
}

impl fmt::Debug for RawPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawPath")
            .field("first_bytes", &self.shared.first_bytes)
            .field("path", &self.path())
            .finish()
    }
}

impl RawPath {
    /// A path claiming datagrams whose first byte is in `first_bytes` (keep to 16..=19:
    /// anything else would take packets from ICE, DTLS, TURN or RTP).
    pub fn new(first_bytes: RangeInclusive<u8>, handler: Arc<dyn RawDatagramHandler>) -> Self {
        Self {
            shared: Arc::new(Shared {
                first_bytes,
                handler,
                target: Mutex::new(None),
            }),
        }
    }

    /// The selected pair's (local, remote) addresses, if raw datagrams can go on it.
    pub fn path(&self) -> Option<(SocketAddr, SocketAddr)> {
        let target = self.shared.target.lock().unwrap_or_else(PoisonError::into_inner);
        target.as_ref().map(|t| (t.local, t.remote))
    }

    /// Sends `datagram` on the selected pair without waiting. `NotConnected` if there is no
    /// pair to send on, `WouldBlock` if the socket cannot take it now (it is dropped).
    pub fn try_send(&self, datagram: &[u8]) -> io::Result<()> {
        let (socket, remote) = {
            let target = self.shared.target.lock().unwrap_or_else(PoisonError::into_inner);
            match target.as_ref() {
                Some(t) => (t.socket.clone(), t.remote),
                None => return Err(io::ErrorKind::NotConnected.into()),
            }
        };
        send_once(&*socket, remote, datagram, None)
    }

    /// Sends `datagrams` in order on the selected pair without waiting, as
    /// [`Self::try_send`] does one: runs of at least [`MIN_GSO_RUN`] datagrams of one size
    /// (the last of a run may be shorter) go as one UDP GSO `sendmsg` where the socket
    /// offers it, as the driver sends its own. Returns how many were handed to the kernel;
    /// the others were dropped (no pair, or a full socket buffer).
    pub fn try_send_batch<D: AsRef<[u8]>>(&self, datagrams: &[D]) -> usize {
        let (socket, remote) = {
            let target = self.shared.target.lock().unwrap_or_else(PoisonError::into_inner);
            match target.as_ref() {
                Some(t) => (t.socket.clone(), t.remote),
                None => return 0,
            }
        };
        let max = socket.max_gso_segments().min(MAX_GSO_SEGMENTS);
        let mut scratch = Vec::new();
        let (mut sent, mut i) = (0, 0);
        while i < datagrams.len() {
            let seg = datagrams[i].as_ref().len();
            // The run [i, end): same size, the last one possibly shorter, within the limits.
            let (mut end, mut total) = (i + 1, seg);
            while max > 1 && seg > 0 && end < datagrams.len() && end - i < max {
                let len = datagrams[end].as_ref().len();
                if len == 0 || len > seg || total + len > MAX_GSO_BATCH_BYTES {
                    break;
                }
                total += len;
                end += 1;
                if len < seg {
                    break;
                }
            }
            let sent_now = if end - i >= MIN_GSO_RUN.min(max) && end - i > 1 {
                scratch.clear();
                for d in &datagrams[i..end] {
                    scratch.extend_from_slice(d.as_ref());
                }
                let ok = send_once(&*socket, remote, &scratch, Some(seg)).is_ok();
                if ok { end - i } else { 0 }
            } else {
                datagrams[i..end]
                    .iter()
                    .filter(|d| send_once(&*socket, remote, d.as_ref(), None).is_ok())
                    .count()
            };
            sent += sent_now;
            i = end;
        }
        sent
    }

    /// Whether a datagram starting with `first` is ours.
    pub(crate) fn claims(&self, datagram: &[u8]) -> bool {
        datagram
            .first()
            .is_some_and(|b| self.shared.first_bytes.contains(b))
    }

    pub(crate) fn deliver(&self, datagram: &[u8], local: SocketAddr, remote: SocketAddr) {
        self.shared.handler.on_datagram(datagram, local, remote);
    }

    /// The connection now sends on (`socket`, `local`, `remote`), or has no raw path.
    /// Reports a change to the handler.
    pub(crate) fn set(&self, target: Option<(Arc<dyn AsyncUdpSocket>, SocketAddr, SocketAddr)>) {
        let addrs = target.as_ref().map(|(_, l, r)| (*l, *r));
        {
            let mut current = self.shared.target.lock().unwrap_or_else(PoisonError::into_inner);
            let same = match (current.as_ref(), target.as_ref()) {
                (None, None) => true,
                (Some(c), Some((socket, local, remote))) => {
                    Arc::ptr_eq(&c.socket, socket) && c.local == *local && c.remote == *remote
                }
                _ => false,
            };
            if same {
                return;
            }
            *current = target.map(|(socket, local, remote)| Target {
                socket,
                local,
                remote,
            });
        }
        self.shared.handler.on_path(addrs);
    }
}
