//! The TUN device (`up --tun`): IP packets between the kernel and the node, and the
//! overlay addresses the node tells us (`Output::Overlay`) set on it.
//!
//! Only I/O: every packet read goes to the node (`Input::TunPacket`), every packet the
//! node writes (`Output::TunWrite`) goes to the kernel; which peer a packet is for, whether
//! a peer's packet may pass, and the ICMP errors are the node's (`core/ROUTING.md`).
//!
//! The device is not persistent: the kernel removes it when its file descriptor closes,
//! so it goes when the process exits, however it exits (even `kill -9`).
//!
//! Addresses are set with `tun-rs`'s own address management (netlink for IPv4, the
//! `SIOCSIFADDR` ioctl for IPv6), so nothing shells out to `ip`. Our IPv4 address is set
//! with the overlay's prefix length (100.64.0.0/10) and our IPv6 one with the network's
//! /48: the kernel then routes both ranges into the device by itself (the "connected"
//! routes), which is what `core/ROUTING.md` asks a driver to route into it.
//!
//! TCP through the device never sends a segment larger than the device's MTU allows: the
//! kernel derives each connection's MSS from the route's MTU, and every overlay route is
//! through this device. Forwarded traffic (exit nodes, subnet routes) is clamped on the
//! forwarding path by nftables (`crate::netconf`), which also puts the routes into the
//! device beyond its own two ranges.
//!
//! The device is opened with the kernel's offloads (`IFF_VNET_HDR`, TSO and checksum
//! offload; tun-rs's `offload`), as wireguard-go does since 2023: one read gives a TCP
//! segment of up to 64 KiB that tun-rs splits into packets of the MTU ([`TunReader`]), and
//! the packets the node writes are queued and written at the end of each round
//! ([`Tun::flush`]), tun-rs coalescing consecutive segments of one TCP flow into one write
//! (GRO), so the kernel's TCP stack handles one large segment instead of dozens. The node
//! still sees and sends one IP packet of at most the MTU at a time. Measured in
//! `core/ROUTING.md` ("Measured"). Where the kernel refuses the offloads, the device is
//! opened without them and each packet is one read or one write.
//!
//! On macOS and Windows the device is tun-rs's too (utun, wintun), without offloads: one
//! packet per read and per write. Only the device and its addresses are portable: the
//! routes beyond it, forwarding and the resolver are Linux's (`crate::netconf`, which says
//! so on other systems).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use tun_rs::{AsyncDevice, DeviceBuilder};
#[cfg(target_os = "linux")]
use tun_rs::{DeviceImpl, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};
use weft_core::node::OverlayStatus;

/// The device's name unless `--tun-name` says otherwise.
pub const DEFAULT_NAME: &str = "weft0";
/// The device's MTU unless `--mtu` says otherwise: IPv6's minimum, which every path
/// carries, and (sealed, framed) one SCTP packet of the data channel (see
/// [`crate::rtc::SCTP_MTU`]).
pub const DEFAULT_MTU: u16 = 1280;
/// The smallest MTU accepted: IPv6 needs 1280 on every link.
pub const MIN_MTU: u16 = 1280;
/// The largest MTU accepted: a sealed packet must fit one data-channel message easily,
/// and the underlay's paths are rarely wider than Ethernet.
pub const MAX_MTU: u16 = 9000;

/// What the device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunConfig {
    /// Its name (`weft0`).
    pub name: String,
    /// Its MTU.
    pub mtu: u16,
}

impl Default for TunConfig {
    fn default() -> Self {
        Self { name: DEFAULT_NAME.into(), mtu: DEFAULT_MTU }
    }
}

/// Why the device cannot be made or configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunError {
    /// `/dev/net/tun` is missing (no `tun` module, or a container without the device).
    #[error(
        "cannot create a TUN device: /dev/net/tun is missing (load the tun module with \
         `modprobe tun`, or give the container the device)"
    )]
    NoDevice,
    /// Not root and without `CAP_NET_ADMIN`.
    #[error(
        "cannot create the TUN device {name}: not permitted (run as root, or give weft-peer \
         CAP_NET_ADMIN)"
    )]
    NotPermitted {
        /// The device's name.
        name: String,
    },
    /// Another process holds a device of that name.
    #[error("cannot create the TUN device {name}: it exists and is busy (choose --tun-name)")]
    Busy {
        /// The device's name.
        name: String,
    },
    /// Anything else while making it.
    #[error("cannot create the TUN device {name}: {source}")]
    Create {
        /// The device's name.
        name: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// Setting an address or the MTU failed.
    #[error("cannot {what} on the TUN device {name}: {source}")]
    Configure {
        /// What was being done.
        what: String,
        /// The device's name.
        name: String,
        /// What the kernel said.
        source: io::Error,
    },
}

/// Where the device is and what is set on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunState {
    /// Its name.
    pub name: String,
    /// Its MTU.
    pub mtu: u16,
    /// Our overlay IPv4 address and its prefix length, once set.
    pub ipv4: Option<(Ipv4Addr, u8)>,
    /// Our overlay IPv6 address and its prefix length, once set.
    pub ipv6: Option<(Ipv6Addr, u8)>,
}

/// The most packets one read gives (a 64 KiB segment in pieces of the smallest MTU, with
/// the offloads), and the most packets queued before they are written.
#[cfg(target_os = "linux")]
const BATCH: usize = IDEAL_BATCH_SIZE;
/// Without offloads a read is one packet.
#[cfg(not(target_os = "linux"))]
const BATCH: usize = 1;
/// The room in front of each packet read or written: the virtio header of the offloads.
#[cfg(target_os = "linux")]
const HEADER: usize = VIRTIO_NET_HDR_LEN;

/// An open TUN device.
pub struct Tun {
    device: Arc<AsyncDevice>,
    state: TunState,
    /// Packets queued for the device ([`Tun::write`]): each in a buffer that starts with
    /// room for the virtio header the offloads need; buffers are reused.
    #[cfg(target_os = "linux")]
    queue: Vec<Vec<u8>>,
    /// How many of `queue` hold a packet.
    #[cfg(target_os = "linux")]
    queued: usize,
    /// tun-rs's coalescing state, reused.
    #[cfg(target_os = "linux")]
    gro: GROTable,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun").field("state", &self.state).finish_non_exhaustive()
    }
}

impl Tun {
    /// Creates the device and brings it up (no addresses yet: they come from the node).
    pub fn open(config: &TunConfig) -> Result<Self, TunError> {
        let name = config.name.clone();
        let device = open_device(&name, config.mtu)?;
        // The name the kernel gave (the same, unless it had a `%d`).
        let name = device.name().unwrap_or(name);
        Ok(Self {
            device: Arc::new(device),
            state: TunState { name, mtu: config.mtu, ipv4: None, ipv6: None },
            #[cfg(target_os = "linux")]
            queue: Vec::new(),
            #[cfg(target_os = "linux")]
            queued: 0,
            #[cfg(target_os = "linux")]
            gro: GROTable::new(),
        })
    }

    /// What reads the device's packets.
    pub fn reader(&self) -> TunReader {
        TunReader::new(Arc::clone(&self.device), self.state.mtu)
    }

    /// What is set on it.
    pub fn state(&self) -> &TunState {
        &self.state
    }

    /// Queues one packet from the node for the kernel; [`Tun::flush`] writes the queue (and
    /// so does a full queue). The copy gives the packet the room for the virtio header in
    /// front; it costs far less than the system call that batching saves.
    #[cfg(target_os = "linux")]
    pub fn write(&mut self, packet: &[u8]) {
        if self.queued == self.queue.len() {
            self.queue.push(Vec::with_capacity(HEADER + usize::from(self.state.mtu)));
        }
        let buf = &mut self.queue[self.queued];
        buf.clear();
        buf.resize(HEADER, 0);
        buf.extend_from_slice(packet);
        self.queued += 1;
        if self.queued >= BATCH {
            self.flush();
        }
    }

    /// Writes one packet from the node to the kernel (without offloads there is nothing to
    /// coalesce); a full queue drops it, as a router would.
    #[cfg(not(target_os = "linux"))]
    pub fn write(&mut self, packet: &[u8]) {
        if let Err(e) = self.device.try_send(packet) {
            tracing::debug!("TUN write dropped a packet: {e}");
        }
    }

    /// Nothing is queued without offloads.
    #[cfg(not(target_os = "linux"))]
    pub fn flush(&mut self) {}

    /// Writes the queued packets to the kernel, consecutive segments of one TCP flow
    /// coalesced into one write where the offloads are on. A TUN write does not block in
    /// practice; if the kernel's queue is full a packet is dropped, as a router would.
    #[cfg(target_os = "linux")]
    pub fn flush(&mut self) {
        if self.queued == 0 {
            return;
        }
        let queue = &mut self.queue[..self.queued];
        // The blocking device's call on our non-blocking descriptor: it writes what it can
        // now (the async one would wait, and the node's outputs are acted on in one go).
        let sent = DeviceImpl::send_multiple(&self.device, &mut self.gro, queue, HEADER);
        if let Err(e) = sent {
            tracing::debug!("TUN write dropped packets: {e}");
        }
        self.queued = 0;
    }

    /// Sets our addresses from the node's status (replacing the old ones if they changed);
    /// whether anything changed.
    pub fn configure(&mut self, status: &OverlayStatus) -> Result<bool, TunError> {
        let mut changed = false;
        let ipv4 = status.ipv4.map(|a| (a, status.ipv4_net.prefix_len()));
        if ipv4 != self.state.ipv4 {
            if let Some((old, _)) = self.state.ipv4.take() {
                self.device
                    .remove_address(IpAddr::V4(old))
                    .map_err(|e| self.error("remove the old IPv4 address", e))?;
            }
            if let Some((addr, prefix)) = ipv4 {
                self.device
                    .add_address_v4(addr, prefix)
                    .map_err(|e| self.error(&format!("set {addr}/{prefix}"), e))?;
            }
            self.state.ipv4 = ipv4;
            changed = true;
        }
        let ipv6 = Some((status.ipv6, status.ipv6_net.prefix_len()));
        if ipv6 != self.state.ipv6 {
            if let Some((old, _)) = self.state.ipv6.take() {
                self.device
                    .remove_address(IpAddr::V6(old))
                    .map_err(|e| self.error("remove the old IPv6 address", e))?;
            }
            self.enable_ipv6()?;
            let (addr, prefix) = (status.ipv6, status.ipv6_net.prefix_len());
            self.device
                .add_address_v6(addr, prefix)
                .map_err(|e| self.error(&format!("set {addr}/{prefix}"), e))?;
            self.state.ipv6 = ipv6;
            changed = true;
        }
        Ok(changed)
    }

    /// Turns IPv6 on for our device where the system turns it off for new devices
    /// (`net.ipv6.conf.default.disable_ipv6`): the overlay's IPv6 address needs it. Only
    /// our own device's setting is touched. (Linux's setting; other systems have none.)
    #[cfg(target_os = "linux")]
    fn enable_ipv6(&self) -> Result<(), TunError> {
        let path = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", self.state.name);
        match std::fs::read_to_string(&path) {
            Ok(v) if v.trim() == "1" => {
                std::fs::write(&path, "0").map_err(|e| self.error("turn IPv6 on (disable_ipv6)", e))
            }
            Ok(_) => Ok(()),
            Err(e) => Err(self.error("use IPv6 (is it disabled in the kernel?)", e)),
        }
    }

    #[cfg(not(target_os = "linux"))]
    #[allow(clippy::unnecessary_wraps, clippy::unused_self)]
    fn enable_ipv6(&self) -> Result<(), TunError> {
        Ok(())
    }

    fn error(&self, what: &str, source: io::Error) -> TunError {
        TunError::Configure { what: what.into(), name: self.state.name.clone(), source }
    }
}

/// Reads packets from the device: [`TunReader::recv`] waits for a read,
/// [`TunReader::try_recv`] takes one if there is one, and [`TunReader::packets`] are the
/// IP packets of the last read (one, or the MTU-sized pieces of a large TCP segment).
pub struct TunReader {
    device: Arc<AsyncDevice>,
    /// What one read gives, virtio header included: up to 64 KiB with offloads.
    #[cfg(target_os = "linux")]
    raw: Vec<u8>,
    /// The packets of the last read, and their sizes.
    packets: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    count: usize,
}

impl std::fmt::Debug for TunReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunReader").field("count", &self.count).finish_non_exhaustive()
    }
}

impl TunReader {
    fn new(device: Arc<AsyncDevice>, mtu: u16) -> Self {
        // A 64 KiB segment in pieces of the smallest MTU fits (tun-rs's ideal batch).
        let packets = vec![vec![0; usize::from(mtu)]; BATCH];
        Self {
            device,
            #[cfg(target_os = "linux")]
            raw: vec![0; HEADER + usize::from(u16::MAX)],
            sizes: vec![0; packets.len()],
            packets,
            count: 0,
        }
    }

    /// Waits for the device and reads once.
    pub async fn recv(&mut self) -> io::Result<()> {
        self.count = 0;
        #[cfg(target_os = "linux")]
        let read =
            self.device.recv_multiple(&mut self.raw, &mut self.packets, &mut self.sizes, 0).await;
        #[cfg(not(target_os = "linux"))]
        let read = self.device.recv(&mut self.packets[0]).await.map(|n| {
            self.sizes[0] = n;
            1
        });
        self.count = dropping_malformed(read)?;
        Ok(())
    }

    /// Reads once if a packet is waiting (`WouldBlock` if none is).
    pub fn try_recv(&mut self) -> io::Result<()> {
        self.count = 0;
        #[cfg(target_os = "linux")]
        let read =
            self.device.try_recv_multiple(&mut self.raw, &mut self.packets, &mut self.sizes, 0);
        #[cfg(not(target_os = "linux"))]
        let read = self.device.try_recv(&mut self.packets[0]).map(|n| {
            self.sizes[0] = n;
            1
        });
        self.count = dropping_malformed(read)?;
        Ok(())
    }

    /// The IP packets of the last read.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.packets.iter().zip(&self.sizes).take(self.count).map(|(p, &n)| &p[..n])
    }
}

/// A read's packet count; a read the kernel did but tun-rs could not split (a segment it
/// does not understand, or larger than our buffers after someone raised the MTU) is
/// dropped, counting 0, rather than ending the reading. Only the system call's own errors
/// (they carry an OS error code) and "nothing to read" are errors.
fn dropping_malformed(read: io::Result<usize>) -> io::Result<usize> {
    let waiting =
        |e: &io::Error| matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted);
    match read {
        Err(e) if e.raw_os_error().is_none() && !waiting(&e) => {
            tracing::debug!("TUN read dropped: {e}");
            Ok(0)
        }
        read => read,
    }
}

/// Creates the device `name` and brings it up, with the kernel's offloads where it takes
/// them.
#[cfg(target_os = "linux")]
fn open_device(name: &str, mtu: u16) -> Result<AsyncDevice, TunError> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err(TunError::NoDevice);
    }
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .offload(offload)
            .enable(true)
            .build_async()
            .map_err(|source| classify(name, source))
    };
    match build(true) {
        Ok(device) => Ok(device),
        // Permission and a busy name do not depend on the offloads.
        Err(e @ (TunError::NotPermitted { .. } | TunError::Busy { .. } | TunError::NoDevice)) => {
            Err(e)
        }
        Err(e) => {
            tracing::debug!("TUN offloads unavailable ({e}); without them");
            build(false)
        }
    }
}

/// Creates the device `name` (tun-rs's utun on macOS, wintun on Windows, which needs
/// `wintun.dll` beside the program) and brings it up; no offloads there.
#[cfg(not(target_os = "linux"))]
fn open_device(name: &str, mtu: u16) -> Result<AsyncDevice, TunError> {
    DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .enable(true)
        .build_async()
        .map_err(|source| classify(name, source))
}

/// The error a failure to create the device `name` is.
fn classify(name: &str, source: io::Error) -> TunError {
    /// `ENXIO` and `ENODEV`: the tun driver is not there behind `/dev/net/tun`.
    const NO_DRIVER: [i32; 2] = [6, 19];
    let name = name.to_string();
    match source.kind() {
        io::ErrorKind::PermissionDenied => TunError::NotPermitted { name },
        io::ErrorKind::ResourceBusy => TunError::Busy { name },
        io::ErrorKind::NotFound => TunError::NoDevice,
        _ if source.raw_os_error().is_some_and(|c| NO_DRIVER.contains(&c)) => TunError::NoDevice,
        _ => TunError::Create { name, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_errors_say_what_to_do() {
        let e = |code| classify("weft0", io::Error::from_raw_os_error(code)).to_string();
        assert!(e(1).contains("run as root, or give weft-peer CAP_NET_ADMIN"), "{}", e(1));
        assert!(e(13).contains("not permitted"));
        assert!(e(16).contains("busy (choose --tun-name)"));
        assert!(e(19).contains("/dev/net/tun is missing"));
        assert!(e(22).starts_with("cannot create the TUN device weft0: "));
    }
}
