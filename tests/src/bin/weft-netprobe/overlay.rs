//! Probes of the overlay through a TUN device, so tests need no `nc` or `socat` (ICMP
//! echo is `weft-peer ping`'s): a TCP copy with a checksum, a UDP listener, and a raw
//! packet with a source address of our choosing, built with `etherparse`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etherparse::PacketBuilder;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// How long a TCP copy may take at most.
const COPY_FOR: Duration = Duration::from_secs(120);
/// How long `tcp-send` tries to connect: longer than ICE takes to leave a pair that stopped
/// answering for another (its consent timeout, about 30 s), so a copy started just then
/// connects once the session moved (`tun.rs`, the ICE pair changing under a flow).
const CONNECT_FOR: Duration = Duration::from_secs(60);

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
    // A name (`bea.weft:9000`) goes through the system's resolver; its addresses are
    // tried in turn, as a program would.
    let mut stream = None;
    for target in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&target, CONNECT_FOR) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => eprintln!("{target}: {e}"),
        }
    }
    let mut stream = stream.with_context(|| format!("cannot connect to {addr}"))?;
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
