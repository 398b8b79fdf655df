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

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use tun_rs::{AsyncDevice, DeviceBuilder};
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

/// An open TUN device.
pub struct Tun {
    device: Arc<AsyncDevice>,
    state: TunState,
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
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err(TunError::NoDevice);
        }
        let device = DeviceBuilder::new()
            .name(&name)
            .mtu(config.mtu)
            .enable(true)
            .build_async()
            .map_err(|source| classify(&name, source))?;
        // The name the kernel gave (the same, unless it had a `%d`).
        let name = device.name().unwrap_or(name);
        Ok(Self {
            device: Arc::new(device),
            state: TunState { name, mtu: config.mtu, ipv4: None, ipv6: None },
        })
    }

    /// The device, for reading packets.
    pub fn device(&self) -> Arc<AsyncDevice> {
        Arc::clone(&self.device)
    }

    /// What is set on it.
    pub fn state(&self) -> &TunState {
        &self.state
    }

    /// Writes one packet from the node to the kernel. A TUN write does not block in
    /// practice; if the kernel's queue is full the packet is dropped, as a router would.
    pub fn write(&self, packet: &[u8]) {
        if let Err(e) = self.device.try_send(packet) {
            tracing::debug!("TUN write dropped a packet: {e}");
        }
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
    /// our own device's setting is touched.
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

    fn error(&self, what: &str, source: io::Error) -> TunError {
        TunError::Configure { what: what.into(), name: self.state.name.clone(), source }
    }
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
