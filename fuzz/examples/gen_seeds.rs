//! Writes the seed corpora in `fuzz/seeds/<target>/`: real handshake messages, frames,
//! signaling messages and transport inputs, all from the fixed fixture (deterministic).
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds`

use std::path::Path;

use weft_core::frame::{Frame, encode_frames};
use weft_core::handshake::{HANDSHAKE_VERSION, MSG_REJECT};
use weft_core::signal::{
    ClientMessage, ErrorCode, PeerId, RoomId, ServerMessage, SignalPayload, encode,
};

fn write(target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(name), bytes)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Handshake: the three real messages and the Rejects.
    let hs = weft_fuzz::handshake();
    write("handshake_messages", "init", &hs.init)?;
    write("handshake_messages", "response", &hs.response)?;
    write("handshake_messages", "finish", &hs.finish)?;
    for reason in 1..=3u8 {
        write(
            "handshake_messages",
            &format!("reject-{reason}"),
            &[MSG_REJECT, HANDSHAKE_VERSION, reason],
        )?;
    }

    // Frames: each type, and a packet of several.
    let frames = [
        ("message", Frame::Message("héllo".into())),
        ("data", Frame::Data(vec![0x45, 0, 0, 20, 1, 2, 3, 4])),
        ("ping", Frame::Ping { timestamp: 1_234_567 }),
        ("pong", Frame::Pong { timestamp: 1_234_567 }),
        ("close", Frame::Close { code: 1000 }),
        ("unknown", Frame::Unknown { frame_type: 0x21, body: b"chunk".to_vec() }),
    ];
    for (name, frame) in &frames {
        write("frame_decode", name, &frame.encode()?)?;
    }
    let all: Vec<Frame> = frames.iter().map(|(_, f)| f.clone()).collect();
    let packet = encode_frames(&all)?;
    write("frame_decode", "all", &packet)?;

    // File transfer: an offer (with its capability) and every fetch (with its proof).
    {
        use weft_core::transfer::{Capability, OfferItem, Root, TransferMsg};
        let (root, cap) = (Root::of(b"seed file"), Capability::from_bytes([0xcd; 32]));
        let proof = cap.proof(&root, &Root::of(b"asker"));
        let item =
            OfferItem { path: "photos/a.jpg".into(), size: 123_456, root, streamed: true, cap };
        let messages = [
            ("offer", TransferMsg::Offer { offer_id: 7, items: vec![item] }),
            ("hash_request", TransferMsg::HashRequest { root, proof, first: 0, count: 100 }),
            ("chunk_request", TransferMsg::ChunkRequest { root, proof, index: 42 }),
            ("query", TransferMsg::Query { root, proof }),
            ("have", TransferMsg::Have { root, proof }),
        ];
        for (name, msg) in &messages {
            let (t, body) = msg.encode();
            write("transfer_decode", name, &[&[t][..], &body].concat())?;
        }
    }

    // Route announcements: own addresses, a subnet, an exit offer.
    let announcement = weft_core::node::Announcement {
        accepts_packets: true,
        firm: true,
        routes: vec![
            (weft_core::node::RouteKind::Own, "100.64.1.2/32".parse()?),
            (weft_core::node::RouteKind::Own, "fd12:3456:789a::1/128".parse()?),
            (weft_core::node::RouteKind::Subnet, "10.1.0.0/16".parse()?),
            (weft_core::node::RouteKind::Exit, "0.0.0.0/0".parse()?),
            (weft_core::node::RouteKind::Exit, "::/0".parse()?),
        ],
    };
    write("route_announcement", "all-kinds", &announcement.encode()?)?;
    // An IPv4 UDP packet (the TUN path): 20-byte header, 8-byte UDP header, 4 bytes.
    let udp4 = [
        0x45, 0, 0, 32, 0, 0, 0x40, 0, 64, 17, 0, 0, 100, 64, 1, 2, 8, 8, 8, 8, 0x9c, 0x40, 0, 53,
        0, 12, 0, 0, b'p', b'i', b'n', b'g',
    ];
    write("route_announcement", "udp4", &udp4)?;
    // Its IP header intact, its UDP length wrong: still answered (from the IP header).
    let mut bad_udp = udp4;
    bad_udp[24..26].copy_from_slice(&[0, 64]);
    write("route_announcement", "udp4-bad-udp-length", &bad_udp)?;

    // Transport: packet choice, 16 edits (op, at, mask), then a plaintext of frames.
    for which in [0u8, 3, 7, 0x85] {
        let mut input = vec![which];
        for i in 0..16u8 {
            input.extend_from_slice(&[i % 6, i.wrapping_mul(37), 1 << (i % 8)]);
        }
        input.extend_from_slice(&packet);
        write("transport_open", &format!("edits-{which:02x}"), &input)?;
    }
    write("transport_open", "short", &[0x10, 0, 0, 0, 0])?;

    // Signaling: every message type, both directions.
    let room = RoomId::new("Zm9vYmFyYmF6cXV4")?;
    let a = PeerId::new("p-1")?;
    let b = PeerId::new("p_2")?;
    let client = [
        ClientMessage::Join { version: 1, room: room.clone() },
        ClientMessage::Signal {
            to: b.clone(),
            payload: SignalPayload::Offer { sdp: "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\n".into() },
        },
        ClientMessage::Signal {
            to: b.clone(),
            payload: SignalPayload::Candidate {
                candidate: "candidate:1 1 udp 2122260223 192.0.2.2 40000 typ host".into(),
                sdp_mid: Some("0".into()),
                sdp_m_line_index: Some(0),
                username_fragment: None,
            },
        },
        ClientMessage::Ping,
        ClientMessage::Leave,
    ];
    for (i, msg) in client.iter().enumerate() {
        write("signal_decode", &format!("client-{i}"), encode(msg).as_bytes())?;
    }
    let server = [
        ServerMessage::Welcome { version: 1, room, peer_id: a.clone(), peers: vec![b.clone()] },
        ServerMessage::PeerJoined { peer_id: b.clone() },
        ServerMessage::PeerLeft { peer_id: b },
        ServerMessage::Signal {
            from: a.clone(),
            payload: SignalPayload::Answer { sdp: "v=0\r\n".into() },
        },
        ServerMessage::Signal {
            from: a,
            payload: SignalPayload::Opaque { data: "AQIDBA==".into() },
        },
        ServerMessage::Pong,
        ServerMessage::error(ErrorCode::ALL[0], "nope"),
    ];
    for (i, msg) in server.iter().enumerate() {
        write("signal_decode", &format!("server-{i}"), encode(msg).as_bytes())?;
    }
    // TURN over TCP/TLS streams: the first byte is the size of each read, less one.
    let stun = |kind: u16, attrs: &[u8]| {
        let mut m = kind.to_be_bytes().to_vec();
        m.extend_from_slice(&u16::try_from(attrs.len()).unwrap_or(u16::MAX).to_be_bytes());
        m.extend_from_slice(&weft_turn_framing::STUN_MAGIC_COOKIE);
        m.extend_from_slice(&[0x5a; 12]);
        m.extend_from_slice(attrs);
        m
    };
    let channel_data = |channel: u16, data: &[u8]| {
        let mut m = channel.to_be_bytes().to_vec();
        m.extend_from_slice(&u16::try_from(data.len()).unwrap_or(u16::MAX).to_be_bytes());
        m.extend_from_slice(data);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    };
    // An Allocate error response (401, REALM) and success (XOR-RELAYED-ADDRESS).
    let unauthorized = stun(0x0113, &[0x00, 0x09, 0x00, 0x04, 0x00, 0x00, 0x04, 0x01]);
    let allocated = stun(0x0103, &[0x00, 0x16, 0x00, 0x08, 0x00, 0x01, 0xe1, 0x12, 1, 2, 3, 4]);
    let streams = [
        ("allocate", [vec![0], unauthorized.clone(), allocated.clone()].concat()),
        (
            "channel-data",
            [vec![6], channel_data(0x4000, b"dtls"), channel_data(0x4001, b"sctp!")].concat(),
        ),
        (
            "mixed",
            [vec![255], allocated, channel_data(0x7ffe, &[0xab; 1201]), unauthorized].concat(),
        ),
        ("tls-record", vec![3, 0x16, 0x03, 0x03, 0x00, 0x7a, 0x02, 0x00, 0x00, 0x76]),
    ];
    for (name, bytes) in streams {
        write("turn_stream_framing", name, &bytes)?;
    }
    println!("seeds written");
    Ok(())
}
