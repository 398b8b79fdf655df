//! Names: the system resolver as a program sees it, and a small DNS server to forward to.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

use anyhow::{Context, Result, bail};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};

/// `resolve NAME`: what getaddrinfo says, one address a line.
pub fn resolve(args: &[String]) -> Result<()> {
    let [name] = args else { bail!("resolve NAME") };
    let addrs: Vec<IpAddr> = (name.as_str(), 0)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {name}"))?
        .map(|a| a.ip())
        .collect();
    let mut seen = Vec::new();
    for a in addrs {
        if !seen.contains(&a) {
            println!("{a}");
            seen.push(a);
        }
    }
    Ok(())
}

/// `dns-serve ADDR NAME=IP...`.
pub fn dns_serve(args: &[String], wait: fn()) -> Result<()> {
    let Some((addr, names)) = args.split_first() else { bail!("dns-serve ADDR NAME=IP...") };
    let addr: SocketAddr = addr.parse()?;
    let mut table: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for entry in names {
        let (name, ip) = entry.split_once('=').context("NAME=IP")?;
        let name = format!("{}.", name.trim_end_matches('.').to_lowercase());
        table.entry(name).or_default().push(ip.parse()?);
    }
    let socket = UdpSocket::bind(addr)?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
            let Some(q) = query.queries().first() else { continue };
            let name = q.name().to_lowercase().to_ascii();
            println!("asked {name} from {}", from.ip());
            let _ = std::io::stdout().flush();
            let mut reply = Message::new();
            reply
                .set_id(query.id())
                .set_message_type(MessageType::Response)
                .set_recursion_desired(query.recursion_desired())
                .set_recursion_available(true);
            reply.add_query(q.clone());
            match table.get(&name) {
                None => {
                    reply.set_response_code(ResponseCode::NXDomain);
                }
                Some(ips) => {
                    for ip in ips {
                        let data = match (ip, q.query_type()) {
                            (IpAddr::V4(a), RecordType::A) => RData::A(A(*a)),
                            (IpAddr::V6(a), RecordType::AAAA) => RData::AAAA(AAAA(*a)),
                            _ => continue,
                        };
                        reply.add_answer(Record::from_rdata(q.name().clone(), 60, data));
                    }
                }
            }
            if let Ok(bytes) = reply.to_vec() {
                let _ = socket.send_to(&bytes, from);
            }
        }
    });
    println!("ready");
    std::io::stdout().flush()?;
    wait();
    Ok(())
}
