//! `.weft` names (issue #12 item 8): the resolver a native peer's host asks, answered by
//! the node from what it knows of the members, everything else forwarded to the host's
//! own resolvers. Design in `core/ROUTING.md` ("Names").
//!
//! The resolver has a fixed address inside the overlay range, [`RESOLVER_V4`] (the one
//! Tailscale uses for the same job), never handed to a member: a query to it is routed
//! into the TUN device like any overlay packet, and the node answers it there, before
//! routing ([`super::Node`] calls [`query_in`]). Nothing binds port 53 and the host's
//! configuration names one address that never changes, however the node's own moves.
//!
//! Which name is which member is policy, decided here once (a name never outranks a key,
//! issue #13 item 1): a member is found by the DNS label of its name ([`dns_label`]) only
//! while its key is the one pinned under that name (trust `new`, `known` or `verified`,
//! not `changed`) and its name does not look like another pinned name; two members whose
//! names give one label resolve to neither. A member is also found by its key's short
//! code (`04213-99120-00871-55309-62014-11880.weft`), whatever its name.
//!
//! DNS messages are read and written by `hickory-proto`; nothing here parses by hand, and
//! nothing panics on hostile bytes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

pub use super::address::RESOLVER_V4;
/// The resolver's port.
pub const DNS_PORT: u16 = 53;
/// The domain of members' names.
pub const DOMAIN: &str = "weft";
/// How long an answer may be cached: members' addresses move rarely, and a minute is
/// what a user waits at worst after a move.
pub const TTL: u32 = 60;
/// Queries forwarded to the host's resolvers and not answered yet, at most; more are
/// answered SERVFAIL at once (a program looking names up in a loop costs little).
pub const MAX_FORWARDS: usize = 256;
/// How long a driver waits for each of the host's resolvers before trying the next, and
/// reports a forwarded query unanswered after the last.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest label of a name (RFC 1035).
const MAX_LABEL: usize = 63;

/// The DNS label a member's name is found under: lowercase ASCII letters, digits and
/// hyphens, every other run of characters one hyphen, no hyphen at either end, at most 63
/// bytes. `None` for a name with no ASCII letter or digit at all (find such a member by
/// its short code).
pub fn dns_label(name: &str) -> Option<String> {
    let mut label = String::with_capacity(name.len().min(MAX_LABEL));
    let mut gap = false;
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            if gap && !label.is_empty() {
                label.push('-');
            }
            gap = false;
            label.push(c.to_ascii_lowercase());
        } else {
            gap = true;
        }
        if label.len() >= MAX_LABEL {
            break;
        }
    }
    let label = label.trim_end_matches('-');
    (!label.is_empty()).then(|| label.to_string())
}

/// The label of a key's short code: its groups joined by hyphens.
pub fn short_code_label(short_code: &str) -> String {
    short_code.split_whitespace().collect::<Vec<_>>().join("-")
}

/// One member the resolver can answer for (or ourselves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The label of its name, if its name may find it (see the module docs).
    pub name: Option<String>,
    /// How much its name is trusted: where members' names give one label, the one
    /// ranked highest alone has it (ourselves 3, verified 2, known 1, new 0; a tie:
    /// neither).
    pub rank: u8,
    /// The label of its key's short code.
    pub short_code: String,
    /// Its overlay IPv4 address.
    pub ipv4: Option<Ipv4Addr>,
    /// Its overlay IPv6 address.
    pub ipv6: Option<Ipv6Addr>,
}

/// Who answers to which name: built by the node from its members for each query.
#[derive(Debug, Default)]
pub struct Directory {
    by_label: BTreeMap<String, Option<usize>>,
    members: Vec<Member>,
}

impl Directory {
    /// The directory of `members`. A name label several members share belongs to the one
    /// ranked highest, or to none on a tie; a short code is one key's.
    pub fn new(members: Vec<Member>) -> Self {
        let mut by_label: BTreeMap<String, Option<usize>> = BTreeMap::new();
        let mut best: BTreeMap<String, u8> = BTreeMap::new();
        for (i, m) in members.iter().enumerate() {
            by_label.insert(m.short_code.clone(), Some(i));
            let Some(label) = &m.name else { continue };
            match best.get(label).copied() {
                Some(r) if r > m.rank => {}
                Some(r) if r == m.rank => {
                    by_label.insert(label.clone(), None);
                }
                _ => {
                    best.insert(label.clone(), m.rank);
                    by_label.insert(label.clone(), Some(i));
                }
            }
        }
        Self { by_label, members }
    }

    fn find(&self, label: &str) -> Option<&Member> {
        self.by_label.get(label).copied().flatten().map(|i| &self.members[i])
    }

    /// The name (`<label>.weft.`) of the member holding `addr`.
    fn name_of(&self, addr: IpAddr) -> Option<String> {
        let (i, m) = self.members.iter().enumerate().find(|(_, m)| match addr {
            IpAddr::V4(a) => m.ipv4 == Some(a),
            IpAddr::V6(a) => m.ipv6 == Some(a),
        })?;
        let label = m.name.as_ref().filter(|l| self.by_label.get(*l) == Some(&Some(i)));
        Some(format!("{}.{DOMAIN}.", label.unwrap_or(&m.short_code)))
    }
}

/// A query to the resolver, read off an IP packet from the TUN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Who asked (the reply goes back there).
    pub client: SocketAddr,
    /// The resolver address it was sent to (the reply comes from there).
    pub resolver: SocketAddr,
    /// The DNS message.
    pub message: Vec<u8>,
}

/// What the node does with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Reply with this DNS message.
    Reply(Vec<u8>),
    /// Not a `.weft` or overlay name: ask the host's resolvers.
    Forward,
    /// Not a DNS query at all (or a reply): nothing to answer.
    Ignore,
}

/// The UDP query to the resolver in `packet`, if `packet` is one: UDP to [`RESOLVER_V4`]
/// or `resolver_v6`, port 53.
pub(crate) fn query_in(packet: &[u8], resolver_v6: Ipv6Addr) -> Option<Query> {
    // Every packet from the TUN device passes here: look at the destination address
    // before parsing anything.
    let for_us = match packet.first().map(|b| b >> 4) {
        Some(4) => packet.get(16..20) == Some(&RESOLVER_V4.octets()[..]),
        Some(6) => packet.get(24..40) == Some(&resolver_v6.octets()[..]),
        _ => false,
    };
    if !for_us {
        return None;
    }
    let (src, dst, payload) = super::ip::udp(packet)?;
    let to_us = match dst.ip() {
        IpAddr::V4(a) => a == RESOLVER_V4,
        IpAddr::V6(a) => a == resolver_v6,
    };
    (to_us && dst.port() == DNS_PORT).then(|| Query {
        client: src,
        resolver: dst,
        message: payload.to_vec(),
    })
}

/// The resolver's IPv6 address in the network's ULA prefix: `<prefix>::53`.
pub fn resolver_v6(prefix: Ipv6Addr) -> Ipv6Addr {
    let mut a = prefix.octets();
    a[8..].fill(0);
    a[15] = 0x53;
    Ipv6Addr::from(a)
}

/// Answers `message` from `directory`, or says to forward it.
pub fn answer(message: &[u8], directory: &Directory) -> Answer {
    let Ok(request) = Message::from_vec(message) else {
        // Not even a header: nothing to send a FORMERR to.
        return match header_id(message) {
            Some(id) => Answer::Reply(error(id, ResponseCode::FormErr)),
            None => Answer::Ignore,
        };
    };
    if request.message_type() != MessageType::Query {
        return Answer::Ignore;
    }
    if request.op_code() != OpCode::Query || request.queries().len() != 1 {
        return Answer::Reply(reply_to(&request, ResponseCode::NotImp, Vec::new()));
    }
    let Some(query) = request.queries().first() else { return Answer::Ignore };
    let name = query.name().to_lowercase();
    let labels: Vec<String> =
        name.iter().map(|l| String::from_utf8_lossy(l).into_owned()).collect();
    let (code, records) = match labels.split_last() {
        Some((last, rest)) if last == DOMAIN => {
            let found = match rest {
                [label] => directory.find(label),
                _ => None,
            };
            match found {
                None => (ResponseCode::NXDomain, Vec::new()),
                Some(m) => (ResponseCode::NoError, address_records(query, m)),
            }
        }
        _ => match reverse(&labels) {
            Some(addr) if super::address::OVERLAY_IPV4.contains(&addr) => {
                match directory.name_of(IpAddr::V4(addr)) {
                    Some(target) => (ResponseCode::NoError, ptr(query, &target)),
                    None => (ResponseCode::NXDomain, Vec::new()),
                }
            }
            _ => return Answer::Forward,
        },
    };
    Answer::Reply(reply_to(&request, code, records))
}

/// The records answering `query` for `member`: its A or AAAA record (none for any other
/// type: the name exists, with no data of that type).
fn address_records(query: &hickory_proto::op::Query, member: &Member) -> Vec<Record> {
    if query.query_class() != DNSClass::IN {
        return Vec::new();
    }
    let data = match query.query_type() {
        RecordType::A => member.ipv4.map(|a| RData::A(A(a))),
        RecordType::AAAA => member.ipv6.map(|a| RData::AAAA(AAAA(a))),
        _ => None,
    };
    data.map(|d| Record::from_rdata(query.name().clone(), TTL, d)).into_iter().collect()
}

fn ptr(query: &hickory_proto::op::Query, target: &str) -> Vec<Record> {
    if query.query_type() != RecordType::PTR {
        return Vec::new();
    }
    Name::from_ascii(target)
        .ok()
        .map(|t| Record::from_rdata(query.name().clone(), TTL, RData::PTR(PTR(t))))
        .into_iter()
        .collect()
}

/// The IPv4 address of a `d.c.b.a.in-addr.arpa` name's labels.
fn reverse(labels: &[String]) -> Option<Ipv4Addr> {
    match labels {
        [d, c, b, a, in_addr, arpa] if in_addr == "in-addr" && arpa == "arpa" => {
            let octet = |s: &String| s.parse::<u8>().ok();
            Some(Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?))
        }
        _ => None,
    }
}

fn reply_to(request: &Message, code: ResponseCode, answers: Vec<Record>) -> Vec<u8> {
    let mut header = Header::response_from_request(request.header());
    header.set_authoritative(true);
    header.set_recursion_available(true);
    header.set_response_code(code);
    let mut reply = Message::new();
    reply.set_header(header);
    reply.add_queries(request.queries().iter().cloned());
    reply.add_answers(answers);
    reply.to_vec().unwrap_or_else(|_| error(request.id(), ResponseCode::ServFail))
}

/// A reply with no question, just the `id` and the error `code`.
pub fn error(id: u16, code: ResponseCode) -> Vec<u8> {
    let mut reply = Message::error_msg(id, OpCode::Query, code);
    reply.set_recursion_available(true);
    // A bare header always encodes; an empty message is the fallback the client drops.
    reply.to_vec().unwrap_or_default()
}

/// The id of a DNS message too broken to parse, if it has at least a header's worth.
pub fn header_id(message: &[u8]) -> Option<u16> {
    (message.len() >= 12).then(|| u16::from_be_bytes([message[0], message[1]]))
}

/// SERVFAIL for the query `message` (a forward nobody answered, or too many waiting).
pub fn servfail(message: &[u8]) -> Option<Vec<u8>> {
    match Message::from_vec(message) {
        Ok(request) => Some(reply_to(&request, ResponseCode::ServFail, Vec::new())),
        Err(_) => header_id(message).map(|id| error(id, ResponseCode::ServFail)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query as Q;

    fn ask(name: &str, kind: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(0x1234).set_message_type(MessageType::Query).set_recursion_desired(true);
        m.add_query(Q::query(Name::from_ascii(name).unwrap(), kind));
        m.to_vec().unwrap()
    }

    fn reply(a: Answer) -> Message {
        match a {
            Answer::Reply(bytes) => Message::from_vec(&bytes).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn alice() -> Member {
        Member {
            name: Some("alice".into()),
            rank: 0,
            short_code: "00001-00002-00003-00004-00005-00006".into(),
            ipv4: Some(Ipv4Addr::new(100, 64, 1, 2)),
            ipv6: Some("fd00:1:2::aa".parse().unwrap()),
        }
    }

    #[test]
    fn labels_are_lowercase_ascii_with_single_hyphens() {
        assert_eq!(dns_label("Alice").as_deref(), Some("alice"));
        assert_eq!(dns_label("  Bob's  Laptop!! ").as_deref(), Some("bob-s-laptop"));
        assert_eq!(dns_label("çà").as_deref(), None);
        assert_eq!(dns_label("x".repeat(100).as_str()).map(|l| l.len()), Some(63));
        assert_eq!(dns_label("a\u{202e}b").as_deref(), Some("a-b"));
    }

    #[test]
    fn a_member_is_found_by_name_and_short_code_and_type() {
        let d = Directory::new(vec![alice()]);
        let r = reply(answer(&ask("Alice.weft.", RecordType::A), &d));
        assert_eq!(r.id(), 0x1234);
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert_eq!(r.answers()[0].data(), &RData::A(A(Ipv4Addr::new(100, 64, 1, 2))));
        let r = reply(answer(&ask("alice.weft.", RecordType::AAAA), &d));
        assert!(matches!(r.answers()[0].data(), RData::AAAA(_)));
        let r = reply(answer(&ask("00001-00002-00003-00004-00005-00006.weft.", RecordType::A), &d));
        assert_eq!(r.answers().len(), 1);
        let r = reply(answer(&ask("alice.weft.", RecordType::MX), &d));
        assert_eq!((r.response_code(), r.answers().len()), (ResponseCode::NoError, 0));
        let r = reply(answer(&ask("carol.weft.", RecordType::A), &d));
        assert_eq!(r.response_code(), ResponseCode::NXDomain);
        let r = reply(answer(&ask("x.alice.weft.", RecordType::A), &d));
        assert_eq!(r.response_code(), ResponseCode::NXDomain);
    }

    #[test]
    fn a_shared_label_finds_the_more_trusted_member_or_nobody() {
        let mut other = alice();
        other.short_code = "9".into();
        other.ipv4 = Some(Ipv4Addr::new(100, 64, 9, 9));
        let d = Directory::new(vec![alice(), other.clone()]);
        let r = reply(answer(&ask("alice.weft.", RecordType::A), &d));
        assert_eq!(r.response_code(), ResponseCode::NXDomain);
        let r = reply(answer(&ask("9.weft.", RecordType::A), &d));
        assert_eq!(r.answers().len(), 1, "the short code still finds it");
        let verified = Member { rank: 2, ..alice() };
        for members in [vec![verified.clone(), other.clone()], vec![other, verified]] {
            let d = Directory::new(members);
            let r = reply(answer(&ask("alice.weft.", RecordType::A), &d));
            assert_eq!(r.answers()[0].data(), &RData::A(A(Ipv4Addr::new(100, 64, 1, 2))));
        }
    }

    #[test]
    fn other_names_are_forwarded_and_overlay_addresses_have_names() {
        let d = Directory::new(vec![alice()]);
        assert_eq!(answer(&ask("example.com.", RecordType::A), &d), Answer::Forward);
        assert_eq!(answer(&ask("4.3.2.1.in-addr.arpa.", RecordType::PTR), &d), Answer::Forward);
        let r = reply(answer(&ask("2.1.64.100.in-addr.arpa.", RecordType::PTR), &d));
        assert_eq!(r.answers()[0].data().to_string(), "alice.weft.");
        let r = reply(answer(&ask("3.1.64.100.in-addr.arpa.", RecordType::PTR), &d));
        assert_eq!(r.response_code(), ResponseCode::NXDomain);
    }

    #[test]
    fn garbage_gets_formerr_or_nothing() {
        let d = Directory::default();
        assert_eq!(answer(&[1, 2, 3], &d), Answer::Ignore);
        let mut junk = vec![0xab, 0xcd];
        junk.extend([0xff; 20]);
        let r = reply(answer(&junk, &d));
        assert_eq!((r.id(), r.response_code()), (0xabcd, ResponseCode::FormErr));
        // A reply sent to the resolver is not answered (no reflection loops).
        let mut m = Message::from_vec(&ask("alice.weft.", RecordType::A)).unwrap();
        m.set_message_type(MessageType::Response);
        assert_eq!(answer(&m.to_vec().unwrap(), &d), Answer::Ignore);
    }

    #[test]
    fn servfail_keeps_the_question() {
        let r = Message::from_vec(&servfail(&ask("example.com.", RecordType::A)).unwrap()).unwrap();
        assert_eq!((r.id(), r.response_code()), (0x1234, ResponseCode::ServFail));
        assert_eq!(r.queries().len(), 1);
    }

    #[test]
    fn the_resolver_addresses() {
        assert!(super::super::address::OVERLAY_IPV4.contains(&RESOLVER_V4));
        let p: Ipv6Addr = "fd12:3456:789a::".parse().unwrap();
        assert_eq!(resolver_v6(p), "fd12:3456:789a::53".parse::<Ipv6Addr>().unwrap());
    }
}
