//! `weft-peer ping PEER`: ICMP echo to a peer's overlay address, through the kernel and
//! the TUN device of the `up --tun` running with this config directory (which says where
//! the peer is, over its control socket). It shows the round trip a program sees: the
//! kernel, our node, the data channel, the peer's node and kernel, and back.
//!
//! An unprivileged ICMP socket where the system allows one (`net.ipv4.ping_group_range`),
//! else a raw one (root). Packets are built and read with `etherparse`.

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use etherparse::{
    IcmpEchoHeader, Icmpv4Header, Icmpv4Slice, Icmpv4Type, Icmpv6Header, Icmpv6Slice, Icmpv6Type,
    SlicedPacket, TransportSlice,
};
use serde_json::{Value, json};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::control;
use crate::output::Printer;

/// Time between two echo requests.
const INTERVAL: Duration = Duration::from_millis(500);
/// How long the last request waits for its reply.
const LAST_WAIT: Duration = Duration::from_secs(2);

/// What to ping, how.
#[derive(Debug, Clone)]
pub struct PingOptions {
    /// A peer's display name, peer id or key fingerprint (its first hex digits), or an
    /// overlay address.
    pub peer: String,
    /// How many requests.
    pub count: u16,
    /// ICMP data bytes in each.
    pub size: usize,
    /// Its IPv6 address rather than its IPv4 one.
    pub ipv6: bool,
}

/// Asks the running `up` in `dir` where the peer is, pings it, prints the replies; fails
/// if none came.
pub async fn run(printer: Printer, dir: &Path, options: PingOptions) -> anyhow::Result<()> {
    let asked = control::ask_status(dir)
        .await
        .with_context(|| format!("cannot ask the weft-peer up running with {}", dir.display()))?;
    let Some(status) = asked else {
        bail!(
            "no weft-peer up runs with the config dir {}: ping goes through its TUN device \
             (start `weft-peer up --tun` first)",
            dir.display()
        );
    };
    if status["tun"].is_null() {
        bail!("the running weft-peer up has no TUN device: restart it with --tun");
    }
    let (name, addr) = target(&status, &options)?;
    let print = move |value: Value, text: String| {
        if printer.json {
            println!("{value}");
        } else {
            say!("{text}");
        }
    };
    print(
        json!({"event": "ping", "name": name, "address": addr, "size": options.size}),
        format!("ping {name} ({addr}): {} data bytes", options.size),
    );
    let (count, size) = (options.count, options.size);
    let on_reply = move |seq: u16, rtt: Duration| {
        let ms = rtt.as_secs_f64() * 1000.0;
        print(
            json!({"event": "pong", "seq": seq, "rtt_ms": (ms * 1000.0).round() / 1000.0}),
            format!("reply from {addr}: seq={seq} time={ms:.2} ms"),
        );
    };
    let rtts = tokio::task::spawn_blocking(move || echo(addr, count, size, on_reply))
        .await
        .context("the ping stopped")??;
    // Milliseconds, to the microsecond.
    let ms = |d: &Duration| (d.as_secs_f64() * 1_000_000.0).round() / 1000.0;
    let received = rtts.len();
    let (min, max) = (rtts.iter().min().map(ms), rtts.iter().max().map(ms));
    let avg = (received > 0)
        .then(|| (rtts.iter().map(ms).sum::<f64>() / received as f64 * 1000.0).round() / 1000.0);
    let summary = json!({"event": "ping_done", "sent": count, "received": received,
                         "min_ms": min, "avg_ms": avg, "max_ms": max});
    let text = match (min, avg, max) {
        (Some(min), Some(avg), Some(max)) => format!(
            "{count} sent, {received} answered; RTT min/avg/max {min:.2}/{avg:.2}/{max:.2} ms"
        ),
        _ => format!("{count} sent, none answered"),
    };
    if printer.json {
        println!("{summary}");
    } else {
        say!("{text}");
    }
    if received == 0 {
        bail!("{} did not answer", options.peer);
    }
    Ok(())
}

/// The peer's name and address from a running `up`'s status.
fn target(status: &Value, options: &PingOptions) -> anyhow::Result<(String, IpAddr)> {
    if let Ok(addr) = options.peer.parse::<IpAddr>() {
        return Ok((addr.to_string(), addr));
    }
    let wanted = options.peer.as_str();
    let peers = status["peers"].as_array().map(Vec::as_slice).unwrap_or_default();
    let hex = wanted.len() >= 8 && wanted.chars().all(|c| c.is_ascii_hexdigit());
    let peer = peers.iter().find(|p| {
        p["name"] == wanted
            || p["peer_id"] == wanted
            || (hex && p["fingerprint"].as_str().is_some_and(|f| f.starts_with(wanted)))
    });
    let Some(peer) = peer else {
        bail!("no peer {wanted:?} (a display name, peer id or key fingerprint) is connected");
    };
    let family = if options.ipv6 { "ipv6" } else { "ipv4" };
    let addr = peer[family]
        .as_str()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("{wanted} has announced no overlay {family} address"))?;
    Ok((peer["name"].as_str().unwrap_or(wanted).to_string(), addr))
}

/// An ICMP socket for `addr`'s family, and whether it is raw (root): a raw socket reads
/// every ICMP packet the host gets, IPv4 ones with their IP header; an unprivileged one
/// only the replies to itself.
fn icmp_socket(addr: IpAddr) -> anyhow::Result<(Socket, bool)> {
    let (domain, protocol) = match addr {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    if let Ok(socket) = Socket::new(domain, Type::DGRAM, Some(protocol)) {
        return Ok((socket, false));
    }
    let socket = Socket::new(domain, Type::RAW, Some(protocol)).context(
        "cannot open an ICMP socket: run as root, or allow your group ICMP sockets \
         (sysctl net.ipv4.ping_group_range)",
    )?;
    Ok((socket, true))
}

/// Sends `count` echo requests with `size` bytes of data to `addr`; the round-trip times
/// of the replies, each also given to `on_reply`.
fn echo(
    addr: IpAddr,
    count: u16,
    size: usize,
    on_reply: impl Fn(u16, Duration),
) -> anyhow::Result<Vec<Duration>> {
    let (socket, raw) = icmp_socket(addr)?;
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    // Unprivileged sockets replace the id with their port; replies are theirs anyway.
    let id = (std::process::id() & 0xffff) as u16;
    let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let expected = Expected { addr, raw, id, payload: &payload };
    let to = SockAddr::from(SocketAddr::new(addr, 0));
    let mut sent_at: Vec<Option<Instant>> = vec![None; usize::from(count)];
    let mut rtts = Vec::new();
    let mut buf = vec![0u8; 65536];
    let (mut seq, mut next, mut last) = (0u16, Instant::now(), Instant::now());
    while usize::from(count) > rtts.len() && (seq < count || last.elapsed() < LAST_WAIT) {
        if seq < count && Instant::now() >= next {
            let echo = IcmpEchoHeader { id, seq };
            let mut packet = match addr {
                IpAddr::V4(_) => {
                    let header =
                        Icmpv4Header::with_checksum(Icmpv4Type::EchoRequest(echo), &payload);
                    header.to_bytes().to_vec()
                }
                // The kernel computes the checksum of ICMPv6 (it knows the source).
                IpAddr::V6(_) => {
                    Icmpv6Header::new(Icmpv6Type::EchoRequest(echo)).to_bytes().to_vec()
                }
            };
            packet.extend_from_slice(&payload);
            socket.send_to(&packet, &to).with_context(|| format!("cannot send to {addr}"))?;
            sent_at[usize::from(seq)] = Some(Instant::now());
            seq += 1;
            next += INTERVAL;
            last = Instant::now();
        }
        let n = match (&socket).read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            // An ICMP error for an earlier request (the peer is unreachable): keep going.
            Err(_) => continue,
        };
        let Some(reply) = echo_reply(&buf[..n], &expected) else { continue };
        if let Some(at) = sent_at.get_mut(usize::from(reply)).and_then(Option::take) {
            let rtt = at.elapsed();
            on_reply(reply, rtt);
            rtts.push(rtt);
        }
    }
    Ok(rtts)
}

/// What an echo reply must match.
struct Expected<'a> {
    addr: IpAddr,
    /// Check the id (a raw socket sees others' replies too).
    raw: bool,
    id: u16,
    payload: &'a [u8],
}

/// The sequence number of `packet`, if it is a reply to one of our echo requests.
fn echo_reply(packet: &[u8], expected: &Expected<'_>) -> Option<u16> {
    let ours = |e: &IcmpEchoHeader, payload: &[u8]| {
        (!expected.raw || e.id == expected.id) && payload == expected.payload
    };
    match expected.addr {
        IpAddr::V4(_) => {
            let icmp = if expected.raw {
                let sliced = SlicedPacket::from_ip(packet).ok()?;
                let Some(TransportSlice::Icmpv4(icmp)) = sliced.transport else { return None };
                icmp
            } else {
                Icmpv4Slice::from_slice(packet).ok()?
            };
            match icmp.icmp_type() {
                Icmpv4Type::EchoReply(e) if ours(&e, icmp.payload()) => Some(e.seq),
                _ => None,
            }
        }
        IpAddr::V6(_) => {
            let icmp = Icmpv6Slice::from_slice(packet).ok()?;
            match icmp.icmp_type() {
                Icmpv6Type::EchoReply(e) if ours(&e, icmp.payload()) => Some(e.seq),
                _ => None,
            }
        }
    }
}
