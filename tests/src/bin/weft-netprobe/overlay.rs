//! Probes of the overlay through a TUN device, so tests need no `ping`, `nc` or `socat`:
//! ICMP echo (raw sockets), a TCP copy with a checksum, a UDP listener, and a raw packet
//! with a source address of our choosing. Packets are built and read with `etherparse`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etherparse::{
    IcmpEchoHeader, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Slice, Icmpv6Type, PacketBuilder,
    SlicedPacket, TransportSlice,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Time between two echo requests.
const PING_EVERY: Duration = Duration::from_millis(200);
/// How long the last echo request may wait for its reply.
const PING_WAIT: Duration = Duration::from_secs(2);
/// How long a TCP copy may take at most.
const COPY_FOR: Duration = Duration::from_secs(120);

/// `icmp-echo ADDR COUNT SIZE`: COUNT echo requests of SIZE bytes of ICMP data to ADDR
/// (IPv4 or IPv6); prints "reply SEQ RTT_MS" for each reply, then "received N of COUNT".
pub fn icmp_echo(args: &[String]) -> Result<()> {
    let [addr, count, size] = args else { bail!("icmp-echo ADDR COUNT SIZE") };
    let addr: IpAddr = addr.parse()?;
    let count: u16 = count.parse()?;
    let size: usize = size.parse()?;
    let (domain, protocol) = match addr {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let socket = Socket::new(domain, Type::RAW, Some(protocol)).context("raw ICMP socket")?;
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    let id = u16::try_from(std::process::id() & 0xffff).unwrap_or(0);
    let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let target = SockAddr::from(SocketAddr::new(addr, 0));
    let mut sent_at = vec![None; usize::from(count)];
    let mut received = 0;
    let mut next = Instant::now();
    let mut seq = 0u16;
    let mut buf = vec![0u8; 65536];
    let mut last = Instant::now();
    while seq < count || last.elapsed() < PING_WAIT {
        if seq < count && Instant::now() >= next {
            let echo = IcmpEchoHeader { id, seq };
            let mut packet = match addr {
                IpAddr::V4(_) => {
                    Icmpv4Header::with_checksum(Icmpv4Type::EchoRequest(echo), &payload)
                        .to_bytes()
                        .to_vec()
                }
                // The kernel computes ICMPv6 checksums of raw sockets.
                IpAddr::V6(_) => {
                    Icmpv6Header::new(Icmpv6Type::EchoRequest(echo)).to_bytes().to_vec()
                }
            };
            packet.extend_from_slice(&payload);
            socket.send_to(&packet, &target)?;
            sent_at[usize::from(seq)] = Some(Instant::now());
            seq += 1;
            next += PING_EVERY;
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
            Err(e) => return Err(e.into()),
        };
        if let Some(reply) = echo_reply(addr, &buf[..n], id, &payload) {
            if let Some(at) = sent_at.get_mut(usize::from(reply)).and_then(Option::take) {
                received += 1;
                println!("reply {reply} {:.3}", at.elapsed().as_secs_f64() * 1000.0);
                if received == count {
                    break;
                }
            }
        }
    }
    println!("received {received} of {count}");
    Ok(())
}

/// The sequence number of `packet` if it is an echo reply to us (`id`) with `payload`.
fn echo_reply(addr: IpAddr, packet: &[u8], id: u16, payload: &[u8]) -> Option<u16> {
    match addr {
        // Raw IPv4 sockets read whole packets.
        IpAddr::V4(_) => {
            let sliced = SlicedPacket::from_ip(packet).ok()?;
            let Some(TransportSlice::Icmpv4(icmp)) = sliced.transport else { return None };
            match icmp.icmp_type() {
                Icmpv4Type::EchoReply(e) if e.id == id && icmp.payload() == payload => Some(e.seq),
                _ => None,
            }
        }
        // Raw IPv6 sockets read the ICMPv6 message alone.
        IpAddr::V6(_) => {
            let icmp = Icmpv6Slice::from_slice(packet).ok()?;
            match icmp.icmp_type() {
                Icmpv6Type::EchoReply(e) if e.id == id && icmp.payload() == payload => Some(e.seq),
                _ => None,
            }
        }
    }
}

/// `tcp-sink ADDR:PORT`: listens, prints "ready", takes one connection, reads it to its
/// end and answers (and prints) "LEN BLAKE3".
pub fn tcp_sink(args: &[String]) -> Result<()> {
    let [addr] = args else { bail!("tcp-sink ADDR:PORT") };
    let listener = TcpListener::bind(addr.parse::<SocketAddr>()?)?;
    println!("ready");
    std::io::stdout().flush()?;
    let (mut stream, _) = listener.accept()?;
    stream.set_read_timeout(Some(COPY_FOR))?;
    let mut hasher = blake3::Hasher::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    let answer = format!("{len} {}", hasher.finalize().to_hex());
    stream.write_all(format!("{answer}\n").as_bytes())?;
    println!("{answer}");
    Ok(())
}

/// `tcp-send ADDR:PORT BYTES`: sends BYTES pseudo-random bytes to a `tcp-sink`, then
/// checks its answer; prints "ok LEN BLAKE3 MBIT_S" (or fails).
pub fn tcp_send(args: &[String]) -> Result<()> {
    let [addr, bytes] = args else { bail!("tcp-send ADDR:PORT BYTES") };
    let len: u64 = bytes.parse()?;
    let mut stream = TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(COPY_FOR))?;
    stream.set_write_timeout(Some(COPY_FOR))?;
    let mut stream_of = blake3::Hasher::new();
    stream_of.update(addr.as_bytes());
    let mut source = stream_of.finalize_xof();
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    let started = Instant::now();
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64))?;
        source.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        stream.write_all(&buf[..n])?;
        left -= n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    let secs = started.elapsed().as_secs_f64();
    let expected = format!("{len} {}", hasher.finalize().to_hex());
    if answer.trim() != expected {
        bail!("the sink got {:?}, sent {expected:?}", answer.trim());
    }
    println!("ok {expected} {:.1}", len as f64 * 8.0 / secs / 1e6);
    Ok(())
}

/// `udp-listen PORT`: prints "ready", then "got FROM TEXT" for every datagram, until its
/// stdin closes.
pub fn udp_listen(args: &[String]) -> Result<()> {
    let [port] = args else { bail!("udp-listen PORT") };
    let socket = UdpSocket::bind(("0.0.0.0", port.parse::<u16>()?))?;
    println!("ready");
    std::io::stdout().flush()?;
    std::thread::spawn(super::exit_when_stdin_closes);
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        println!("got {from} {}", String::from_utf8_lossy(&buf[..n]));
        std::io::stdout().flush()?;
    }
}

/// `udp-from SRC DST:PORT TEXT`: sends one UDP datagram with source address SRC (any
/// address, ours or not: a raw socket with the IP header included) to DST:PORT.
pub fn udp_from(args: &[String]) -> Result<()> {
    let [src, dst, text] = args else { bail!("udp-from SRC DST:PORT TEXT") };
    let src: std::net::Ipv4Addr = src.parse()?;
    let dst: std::net::SocketAddrV4 = dst.parse()?;
    let builder = PacketBuilder::ipv4(src.octets(), dst.ip().octets(), 64).udp(40000, dst.port());
    let mut packet = Vec::with_capacity(builder.size(text.len()));
    builder.write(&mut packet, text.as_bytes())?;
    // IPPROTO_RAW: the packet we give is sent as it is, IP header included.
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
    socket.send_to(&packet, &SockAddr::from(SocketAddr::V4(dst)))?;
    Ok(())
}
