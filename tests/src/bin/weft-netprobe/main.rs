//! A tiny UDP/TCP probe for the network namespace harness (`weft_tests::netns`): it shows
//! which address a server sees, so tests can tell what a NAT did. Run it inside a
//! namespace with `Host::command`.
//!
//! ```text
//! weft-netprobe serve PORT...      on each port: answer every UDP datagram with the source
//!                                  address it came from ("ip:port"), and answer every TCP
//!                                  connection with an HTTP page showing the same
//!                                  (<p id=seen>ip:port</p>); prints "ready" once bound;
//!                                  runs until its stdin closes. A PORT binds 0.0.0.0;
//!                                  an ADDR:PORT (`[2001:db8::1]:80`) binds that address
//! weft-netprobe udp SERVER:PORT... from one UDP socket, ask every server (resending every
//!                                  200 ms, 3 s at most); prints "SERVER SEEN" or
//!                                  "SERVER none" per server
//! weft-netprobe tcp SERVER:PORT    fetch the page over TCP (3 s at most); prints SEEN
//! weft-netprobe punch SERVER:PORT  UDP hole punching: prints "mapped SEEN" as the server
//!                                  saw it, reads the peer's mapped address from stdin,
//!                                  then sends to it every 100 ms; prints "heard FROM"
//!                                  for the first datagram from anywhere but the server;
//!                                  runs until its stdin closes (60 s at most)
//! weft-netprobe capture TEXT...    a packet capture of every interface of the namespace
//!                                  (AF_PACKET): prints "ready", and once its stdin closes,
//!                                  "frames N bytes B" and "hits K TEXT" per TEXT (how many
//!                                  frames contained it)
//! ```
//!
//! and, for the overlay through TUN devices (module `overlay`):
//!
//! ```text
//! weft-netprobe tcp-sink ADDR:PORT one TCP connection read to its end: prints "ready",
//!                                  then answers and prints "LEN BLAKE3"
//! weft-netprobe tcp-send ADDR:PORT BYTES  pseudo-random bytes to a tcp-sink, checked
//!                                  against its answer: "ok LEN BLAKE3 MBIT_S"
//! weft-netprobe udp-listen PORT    prints "ready", then "got FROM TEXT" per datagram,
//!                                  until its stdin closes
//! weft-netprobe udp-from SRC DST:PORT TEXT  one datagram with any source address (raw)
//! ```
//!
//! and for names (module `names`):
//!
//! ```text
//! weft-netprobe resolve NAME       the system's resolver (getaddrinfo, so
//!                                  /etc/resolv.conf): prints each address, one a line;
//!                                  fails if the name does not resolve
//! weft-netprobe dns-serve ADDR NAME=IP...  a DNS server on ADDR (UDP) answering A and
//!                                  AAAA for these names, NXDOMAIN otherwise; prints
//!                                  "ready", then "asked NAME from IP" per query, until
//!                                  its stdin closes
//! ```
#![forbid(unsafe_code)]

mod names;
mod overlay;

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const RESEND: Duration = Duration::from_millis(200);
const ASK_FOR: Duration = Duration::from_secs(3);
const PUNCH_EVERY: Duration = Duration::from_millis(100);
const PUNCH_FOR: Duration = Duration::from_secs(60);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else { bail!("usage: see the source") };
    match command.as_str() {
        "serve" => serve(rest),
        "udp" => {
            let servers = rest
                .iter()
                .map(|s| s.parse().with_context(|| format!("bad address {s}")))
                .collect::<Result<Vec<SocketAddr>>>()?;
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            for (server, seen) in servers.iter().zip(ask(&socket, &servers)?) {
                println!("{server} {}", seen.as_deref().unwrap_or("none"));
            }
            Ok(())
        }
        "tcp" => {
            let [server] = rest else { bail!("tcp SERVER:PORT") };
            println!("{}", fetch(server.parse()?)?);
            Ok(())
        }
        "punch" => {
            let [server] = rest else { bail!("punch SERVER:PORT") };
            punch(server.parse()?)
        }
        "capture" => capture(rest),
        "tcp-sink" => overlay::tcp_sink(rest),
        "tcp-send" => overlay::tcp_send(rest),
        "udp-listen" => overlay::udp_listen(rest),
        "udp-from" => overlay::udp_from(rest),
        "resolve" => names::resolve(rest),
        "dns-serve" => names::dns_serve(rest, exit_when_stdin_closes),
        other => bail!("unknown command {other}"),
    }
}

fn serve(ports: &[String]) -> Result<()> {
    for port in ports {
        let addr = match port.parse::<u16>() {
            Ok(port) => SocketAddr::from(([0, 0, 0, 0], port)),
            Err(_) => port.parse().with_context(|| format!("bad port or address {port}"))?,
        };
        let udp = UdpSocket::bind(addr)?;
        let tcp = TcpListener::bind(addr)?;
        std::thread::spawn(move || echo_udp(&udp));
        std::thread::spawn(move || serve_tcp(&tcp));
    }
    println!("ready");
    std::io::stdout().flush()?;
    exit_when_stdin_closes();
    Ok(())
}

/// Ends the process once stdin is at its end: when the test that started it (holding the
/// other end of a pipe) exits, even killed, this does not live on in its namespace.
fn exit_when_stdin_closes() {
    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    std::process::exit(0);
}

fn echo_udp(socket: &UdpSocket) -> Result<()> {
    let mut buf = [0u8; 1500];
    loop {
        let (_, from) = socket.recv_from(&mut buf)?;
        socket.send_to(from.to_string().as_bytes(), from)?;
    }
}

fn serve_tcp(listener: &TcpListener) -> Result<()> {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || answer_http(stream));
    }
    Ok(())
}

/// Reads the request's head (or what comes within 2 s), then sends the page and closes.
fn answer_http(mut stream: TcpStream) -> Result<()> {
    let seen = stream.peer_addr()?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!("<!doctype html><title>weft-netprobe</title><p id=seen>{seen}</p>\n");
    write!(
        stream,
        "HTTP/1.0 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    Ok(())
}

/// Asks each server which address it sees `socket` at, all at once, resending to those
/// that have not answered; `None` for a server that did not answer in time.
fn ask(socket: &UdpSocket, servers: &[SocketAddr]) -> Result<Vec<Option<String>>> {
    let mut seen = vec![None; servers.len()];
    let deadline = Instant::now() + ASK_FOR;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline && seen.iter().any(Option::is_none) {
        for (server, _) in servers.iter().zip(&seen).filter(|(_, seen)| seen.is_none()) {
            socket.send_to(b"?", server)?;
        }
        let resend_at = Instant::now() + RESEND;
        while let Some(wait) = resend_at.checked_duration_since(Instant::now()) {
            socket.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some(i) = servers.iter().position(|s| *s == from) {
                        seen[i] = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                    }
                }
                Err(e) if is_timeout(&e) => break,
                // An ICMP error (port unreachable) from an earlier send: ask again.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(seen)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

fn fetch(server: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&server, ASK_FOR)?;
    stream.set_read_timeout(Some(ASK_FOR))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut page = String::new();
    stream.read_to_string(&mut page)?;
    let seen = page
        .split_once("<p id=seen>")
        .and_then(|(_, rest)| rest.split_once("</p>"))
        .map(|(seen, _)| seen.to_string());
    seen.with_context(|| format!("no address in the answer: {page:?}"))
}

fn punch(server: SocketAddr) -> Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    let mapped = ask(&socket, &[server])?.pop().flatten().context("the server did not answer")?;
    println!("mapped {mapped}");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let peer: SocketAddr =
        line.trim().parse().with_context(|| format!("bad peer address {line:?}"))?;
    std::thread::spawn(exit_when_stdin_closes);
    let deadline = Instant::now() + PUNCH_FOR;
    let mut heard = false;
    let mut buf = [0u8; 1500];
    socket.set_read_timeout(Some(PUNCH_EVERY))?;
    while Instant::now() < deadline {
        socket.send_to(b"punch", peer)?;
        match socket.recv_from(&mut buf) {
            Ok((_, from)) if from != server && !heard => {
                heard = true;
                println!("heard {from}");
                std::io::stdout().flush()?;
            }
            Ok(_) => {}
            Err(e) if is_timeout(&e) || e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Counts the frames crossing every interface of this namespace that contain each of
/// `needles`, until stdin closes.
fn capture(needles: &[String]) -> Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    /// Every protocol (`ETH_P_ALL`), in network byte order as `socket(2)` wants it.
    const ETH_P_ALL: u16 = 0x0003;
    let socket =
        Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(i32::from(ETH_P_ALL.to_be()))))
            .context("cannot open a packet socket (needs CAP_NET_RAW)")?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let done = done.clone();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    println!("ready");
    std::io::stdout().flush()?;
    let (mut frames, mut bytes) = (0u64, 0u64);
    let mut hits = vec![0u64; needles.len()];
    let mut buf = vec![0u8; 65_536];
    let mut reader = &socket;
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return Err(e.into()),
        };
        frames += 1;
        bytes += n as u64;
        let frame = &buf[..n];
        for (needle, hit) in needles.iter().zip(&mut hits) {
            let needle = needle.as_bytes();
            if !needle.is_empty() && frame.windows(needle.len()).any(|w| w == needle) {
                *hit += 1;
            }
        }
    }
    println!("frames {frames} bytes {bytes}");
    for (needle, hit) in needles.iter().zip(hits) {
        println!("hits {hit} {needle}");
    }
    Ok(())
}
