//! The signaling protocol: the one definition of what travels between a client (browser
//! or native peer) and the signaling server.
//!
//! The server only introduces peers. A client joins a room by an opaque [`RoomId`]
//! (derived by clients from the network secret; the server never sees a network name or
//! passphrase), learns its [`PeerId`] and the other members, and sends addressed
//! [`SignalPayload`]s to members of its room. The server forwards payloads without
//! looking inside them.
//!
//! Every message is one JSON object in one WebSocket text frame, tagged by `"type"`.
//! [`decode_client`] and [`decode_server`] turn untrusted text into typed messages or a
//! [`DecodeError`] carrying the [`ErrorCode`] the server reports; they never panic.

use crate::sorted::SortedSet;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version of the signaling protocol. A client states it in [`ClientMessage::Join`]; the
/// server refuses any other with [`ErrorCode::UnsupportedVersion`].
///
/// It also versions what peers say to each other inside their sessions, since two peers
/// only meet through one server. Version 2 changed two things at once, so a peer of
/// version 1 is refused at join with a plain reason instead of failing silently with each
/// member: the file offer (streamed items, the `Root` message; `core/TRANSFER.md`), and
/// passphrase networks, whose members run the pairwise PAKE (`pake.rs`) before they send
/// each other descriptions, which they seal (a version 1 peer would send them in clear
/// and never answer the PAKE). Version 3: file access by capability (`core/TRANSFER.md`,
/// "Who may fetch what"): each offered file carries its sender's capability and every
/// fetch (`Query`, `HashRequest`, `ChunkRequest`) a proof of one, so a version 2 peer's
/// messages would not even decode; it is refused at join instead ("reload the page or
/// update weft-peer"). Also in version 3: an offer too large for one frame travels in
/// parts (`OfferPart`, frame 0x2c; `core/TRANSFER.md`, "Caps on what a peer can ask"),
/// which a version 2 peer would drop, taking the last part for the whole offer.
pub const PROTOCOL_VERSION: u32 = 3;

/// Largest signaling message, in bytes of JSON text, that either side accepts.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Longest room id, in characters.
pub const MAX_ROOM_ID_LEN: usize = 128;

/// Longest peer id, in characters.
pub const MAX_PEER_ID_LEN: usize = 64;

/// Opaque name of a room: 1 to [`MAX_ROOM_ID_LEN`] characters of `A-Z a-z 0-9 - _`
/// (base64url or hex of a key-derived hash, in practice).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RoomId(String);

/// A member of a room, as named by the server for the life of one connection.
///
/// This is not an identity: peers authenticate each other end to end by their long-term
/// keys, never by what the server calls them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PeerId(String);

/// A string that is not a valid [`RoomId`] or [`PeerId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what}: must be 1 to {max} characters of A-Z a-z 0-9 - _")]
pub struct InvalidId {
    what: &'static str,
    max: usize,
}

fn check_id(s: &str, what: &'static str, max: usize) -> Result<(), InvalidId> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(InvalidId { what, max }) }
}

macro_rules! id_type {
    ($ty:ident, $what:literal, $max:expr) => {
        impl $ty {
            /// Checks `s` and wraps it.
            pub fn new(s: impl Into<String>) -> Result<Self, InvalidId> {
                let s = s.into();
                check_id(&s, $what, $max)?;
                Ok(Self(s))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = InvalidId;
            fn try_from(s: String) -> Result<Self, InvalidId> {
                Self::new(s)
            }
        }

        impl From<$ty> for String {
            fn from(id: $ty) -> String {
                id.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(RoomId, "room id", MAX_ROOM_ID_LEN);
id_type!(PeerId, "peer id", MAX_PEER_ID_LEN);

/// What a client sends to the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Join a room. Must be the first message, and is allowed once per connection.
    Join {
        /// The client's [`PROTOCOL_VERSION`].
        version: u32,
        /// The room to join.
        room: RoomId,
    },
    /// Forward `payload` to another member of the client's room.
    Signal {
        /// The recipient.
        to: PeerId,
        /// What to forward, untouched.
        payload: SignalPayload,
    },
    /// Application-level heartbeat; the server answers [`ServerMessage::Pong`].
    Ping,
    /// Leave the room; the server then closes the connection.
    Leave,
}

impl ClientMessage {
    /// The `"type"` tags this enum accepts.
    pub const TYPES: &'static [&'static str] = &["join", "signal", "ping", "leave"];
}

/// What the server sends to a client. (Its `Deserialize` is written out below, not
/// derived: see [`ServerFields`].)
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The join succeeded.
    Welcome {
        /// The server's [`PROTOCOL_VERSION`].
        version: u32,
        /// The room joined.
        room: RoomId,
        /// The name the server gives this connection.
        peer_id: PeerId,
        /// The other members already in the room.
        peers: Vec<PeerId>,
    },
    /// Another peer joined the room.
    PeerJoined {
        /// Who joined.
        peer_id: PeerId,
    },
    /// A peer left the room (closed, timed out, or sent [`ClientMessage::Leave`]).
    PeerLeft {
        /// Who left.
        peer_id: PeerId,
    },
    /// A payload another member addressed to this client.
    Signal {
        /// The sender.
        from: PeerId,
        /// The payload, as the sender sent it.
        payload: SignalPayload,
    },
    /// Answer to [`ClientMessage::Ping`].
    Pong,
    /// A request was refused. When [`ErrorCode::is_fatal`], the server closes next.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// The STUN and TURN servers this member may use, with credentials of its own. Sent
    /// after [`ServerMessage::Welcome`] and again before the credentials expire. Clients
    /// that predate it ignore it (an unknown type is dropped, never fatal).
    IceServers {
        /// The servers, as `RTCIceServer` entries.
        servers: Vec<IceServer>,
        /// Seconds the credentials stay valid for new allocations.
        ttl_s: u64,
    },
}

/// One STUN or TURN server, as WebRTC's `RTCIceServer` takes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IceServer {
    /// `stun:host:port`, `turn:host:port?transport=udp`, `turns:host:443?transport=tcp`...
    pub urls: Vec<String>,
    /// The TURN username, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The TURN password, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

impl IceServer {
    /// Whether any of its URLs is a TURN one (it can relay).
    pub fn is_turn(&self) -> bool {
        self.urls.iter().any(|u| u.starts_with("turn:") || u.starts_with("turns:"))
    }
}

impl ServerMessage {
    /// The `"type"` tags this enum accepts.
    pub const TYPES: &'static [&'static str] =
        &["welcome", "peer_joined", "peer_left", "signal", "pong", "error", "ice_servers"];

    /// An [`ServerMessage::Error`] for `err`.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error { code, message: message.into() }
    }
}

/// What one peer sends another through the server. The server does not look inside.
/// (Its `Deserialize` is written out below, not derived: see [`ServerFields`].)
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SignalPayload {
    /// An SDP offer.
    Offer {
        /// The session description.
        sdp: String,
    },
    /// An SDP answer.
    Answer {
        /// The session description.
        sdp: String,
    },
    /// A trickled ICE candidate; `candidate` empty means end of candidates.
    Candidate {
        /// The candidate line, as `RTCIceCandidate.candidate`.
        candidate: String,
        /// `RTCIceCandidate.sdpMid`.
        #[serde(default)]
        sdp_mid: Option<String>,
        /// `RTCIceCandidate.sdpMLineIndex`.
        #[serde(default)]
        sdp_m_line_index: Option<u16>,
        /// `RTCIceCandidate.usernameFragment`.
        #[serde(default)]
        username_fragment: Option<String>,
    },
    /// Anything else peers agree on (for example an encrypted handshake message), as text
    /// (base64 for bytes).
    Opaque {
        /// The payload.
        data: String,
    },
}

impl SignalPayload {
    /// The `"kind"` tags this enum accepts.
    pub const KINDS: &'static [&'static str] = &["offer", "answer", "candidate", "opaque"];
}

/// A struct of every field of every variant of an internally tagged enum, flat and
/// optional but the tag, with `only`, which refuses the fields a variant does not have.
macro_rules! flat_fields {
    ($(#[$meta:meta])* struct $name:ident {
        $(#[$tag_meta:meta])* $tag:ident,
        $($field:ident: $ty:ty,)*
    }) => {
        $(#[$meta])*
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $name {
            $(#[$tag_meta])*
            $tag: String,
            $($field: Option<$ty>,)*
        }

        impl $name {
            /// Refuses a field given that `allowed` does not name, as
            /// `deny_unknown_fields` does.
            fn only<E: serde::de::Error>(&self, allowed: &'static [&'static str]) -> Result<(), E> {
                $(if self.$field.is_some() && !allowed.contains(&stringify!($field)) {
                    return Err(E::unknown_field(stringify!($field), allowed));
                })*
                Ok(())
            }
        }
    };
}

flat_fields! {
    /// Every field of every [`ServerMessage`], as one flat object: `ServerMessage`'s
    /// `Deserialize` reads this straight from the JSON and then checks the fields against
    /// the `type`, as serde's derive for an internally tagged enum with
    /// `deny_unknown_fields` would, with one leniency: a `null` field of another type
    /// counts as absent. The wire form is the same; the derive first buffers each message
    /// in serde's `Content` and reads that again, code that made most of serde's share of
    /// the browser's module (page weight: 11.2 KB as brotli with `PayloadFields` and
    /// `JsIceServer`'s URLs; `decoding_agrees_with_the_derived_decoders` checks the two
    /// against each other).
    struct ServerFields {
        #[serde(rename = "type")]
        kind,
        version: u32,
        room: RoomId,
        peer_id: PeerId,
        peers: Vec<PeerId>,
        from: PeerId,
        payload: SignalPayload,
        code: ErrorCode,
        message: String,
        servers: Vec<IceServer>,
        ttl_s: u64,
    }
}

flat_fields! {
    /// Every field of every [`SignalPayload`], flat, as [`ServerFields`].
    struct PayloadFields {
        kind,
        sdp: String,
        candidate: String,
        sdp_mid: String,
        sdp_m_line_index: u16,
        username_fragment: String,
        data: String,
    }
}

/// A field of a flat message, which its tag says it must have.
fn need<T, E: serde::de::Error>(field: Option<T>, name: &'static str) -> Result<T, E> {
    field.ok_or_else(|| E::missing_field(name))
}

impl<'de> Deserialize<'de> for ServerMessage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = ServerFields::deserialize(d)?;
        let allowed: &'static [&'static str] = match f.kind.as_str() {
            "welcome" => &["version", "room", "peer_id", "peers"],
            "peer_joined" | "peer_left" => &["peer_id"],
            "signal" => &["from", "payload"],
            "pong" => &[],
            "error" => &["code", "message"],
            "ice_servers" => &["servers", "ttl_s"],
            other => return Err(serde::de::Error::unknown_variant(other, Self::TYPES)),
        };
        f.only(allowed)?;
        Ok(match f.kind.as_str() {
            "welcome" => Self::Welcome {
                version: need(f.version, "version")?,
                room: need(f.room, "room")?,
                peer_id: need(f.peer_id, "peer_id")?,
                peers: need(f.peers, "peers")?,
            },
            "peer_joined" => Self::PeerJoined { peer_id: need(f.peer_id, "peer_id")? },
            "peer_left" => Self::PeerLeft { peer_id: need(f.peer_id, "peer_id")? },
            "signal" => {
                Self::Signal { from: need(f.from, "from")?, payload: need(f.payload, "payload")? }
            }
            "pong" => Self::Pong,
            "error" => {
                Self::Error { code: need(f.code, "code")?, message: need(f.message, "message")? }
            }
            _ => Self::IceServers {
                servers: need(f.servers, "servers")?,
                ttl_s: need(f.ttl_s, "ttl_s")?,
            },
        })
    }
}

impl<'de> Deserialize<'de> for SignalPayload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = PayloadFields::deserialize(d)?;
        let allowed: &'static [&'static str] = match f.kind.as_str() {
            "offer" | "answer" => &["sdp"],
            "candidate" => &["candidate", "sdp_mid", "sdp_m_line_index", "username_fragment"],
            "opaque" => &["data"],
            other => return Err(serde::de::Error::unknown_variant(other, Self::KINDS)),
        };
        f.only(allowed)?;
        Ok(match f.kind.as_str() {
            "offer" => Self::Offer { sdp: need(f.sdp, "sdp")? },
            "answer" => Self::Answer { sdp: need(f.sdp, "sdp")? },
            "candidate" => Self::Candidate {
                candidate: need(f.candidate, "candidate")?,
                sdp_mid: f.sdp_mid,
                sdp_m_line_index: f.sdp_m_line_index,
                username_fragment: f.username_fragment,
            },
            _ => Self::Opaque { data: need(f.data, "data")? },
        })
    }
}

/// Why the server refused a message or closed a connection. (Its `Deserialize` is
/// written out below.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame was not JSON (or was binary).
    NotJson,
    /// JSON, but not a well-formed message of a known type.
    Malformed,
    /// A `"type"` the server does not know.
    UnknownType,
    /// [`ClientMessage::Join`] named another protocol version. Fatal.
    UnsupportedVersion,
    /// The message exceeded [`MAX_MESSAGE_BYTES`]. Fatal.
    TooLarge,
    /// The recipient is not a member of the sender's room.
    UnknownPeer,
    /// A second [`ClientMessage::Join`] on one connection.
    AlreadyJoined,
    /// A message other than join or ping before joining.
    NotJoined,
    /// The client sent more messages per second than allowed; the message was dropped.
    RateLimited,
    /// The room has as many members as the server allows.
    RoomFull,
    /// The server holds as many rooms as it allows.
    TooManyRooms,
    /// The server holds as many connections as it allows. Fatal.
    ServerFull,
    /// Nothing arrived for too long. Fatal.
    IdleTimeout,
    /// The server is shutting down. Fatal.
    ShuttingDown,
    /// The connection did not read what the server sent it fast enough (its queue grew
    /// past the server's limit, or one write took too long). Fatal.
    TooSlow,
    /// The client's address holds as many connections as the server allows one address.
    /// Fatal.
    AddressConnections,
    /// The client's address is in as many rooms as the server allows one address.
    AddressRooms,
}

/// A code by its name ([`ErrorCode::as_str`], what `Serialize` writes): the derive's
/// visitor matched every name twice, as text and as bytes, 3 KB of the browser's module
/// for what this loop does.
impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Self::ALL.iter().copied().find(|c| c.as_str() == name).ok_or_else(|| {
            serde::de::Error::invalid_value(serde::de::Unexpected::Str(&name), &"an error code")
        })
    }
}

impl ErrorCode {
    /// Every code, for metrics that list each reason.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::NotJson,
        ErrorCode::Malformed,
        ErrorCode::UnknownType,
        ErrorCode::UnsupportedVersion,
        ErrorCode::TooLarge,
        ErrorCode::UnknownPeer,
        ErrorCode::AlreadyJoined,
        ErrorCode::NotJoined,
        ErrorCode::RateLimited,
        ErrorCode::RoomFull,
        ErrorCode::TooManyRooms,
        ErrorCode::ServerFull,
        ErrorCode::IdleTimeout,
        ErrorCode::ShuttingDown,
        ErrorCode::TooSlow,
        ErrorCode::AddressConnections,
        ErrorCode::AddressRooms,
    ];

    /// The code's wire name, e.g. `"too_large"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotJson => "not_json",
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnknownPeer => "unknown_peer",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::ServerFull => "server_full",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::TooSlow => "too_slow",
            ErrorCode::AddressConnections => "address_connections",
            ErrorCode::AddressRooms => "address_rooms",
        }
    }

    /// Whether the server closes the connection after reporting this code.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            ErrorCode::UnsupportedVersion
                | ErrorCode::TooLarge
                | ErrorCode::ServerFull
                | ErrorCode::IdleTimeout
                | ErrorCode::ShuttingDown
                | ErrorCode::TooSlow
                | ErrorCode::AddressConnections
        )
    }

    /// The WebSocket close code (RFC 6455 §7.4) that goes with a fatal code.
    pub fn close_code(self) -> u16 {
        match self {
            ErrorCode::TooLarge => 1009,
            ErrorCode::UnsupportedVersion => 1002,
            ErrorCode::ServerFull | ErrorCode::AddressConnections => 1013,
            ErrorCode::IdleTimeout | ErrorCode::ShuttingDown => 1001,
            _ => 1008,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Text that is not an acceptable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct DecodeError {
    /// The reason, as the server reports it.
    pub code: ErrorCode,
    /// What exactly was wrong.
    pub detail: String,
}

impl DecodeError {
    fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self { code, detail: detail.into() }
    }
}

fn decode<T: DeserializeOwned>(text: &str, types: &[&str]) -> Result<T, DecodeError> {
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::new(
            ErrorCode::TooLarge,
            format!("message of {} bytes exceeds the limit of {MAX_MESSAGE_BYTES}", text.len()),
        ));
    }
    // A well-formed message parses once, straight into its type (the relay's hot path);
    // only one that does not is looked at again, to say what is wrong. (Not through
    // serde_json's `Value`, which would bring its own decoder of each message into the
    // browser's module.)
    let error = match serde_json::from_str(text) {
        Ok(msg) => return Ok(msg),
        Err(e) => e,
    };
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
        return Err(DecodeError::new(ErrorCode::NotJson, format!("not JSON: {e}")));
    }
    #[derive(Deserialize)]
    struct Tag<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<&'a serde_json::value::RawValue>,
    }
    // (An array would decode into `Tag` too, by position.)
    let tag = Some(text)
        .filter(|t| t.trim_start().starts_with('{'))
        .and_then(|t| serde_json::from_str::<Tag<'_>>(t).ok())
        .and_then(|t| t.kind);
    let Some(tag) = tag else {
        return Err(DecodeError::new(
            ErrorCode::Malformed,
            "expected an object with a \"type\" field",
        ));
    };
    let Ok(tag) = serde_json::from_str::<String>(tag.get()) else {
        return Err(DecodeError::new(ErrorCode::Malformed, "\"type\" must be a string"));
    };
    if !types.contains(&tag.as_str()) {
        let shown: String = tag.chars().take(40).collect();
        return Err(DecodeError::new(
            ErrorCode::UnknownType,
            format!("unknown message type {shown:?}; expected one of {types:?}"),
        ));
    }
    Err(DecodeError::new(ErrorCode::Malformed, format!("bad {tag:?} message: {error}")))
}

/// Parses a message from a client. Never panics, whatever the input.
pub fn decode_client(text: &str) -> Result<ClientMessage, DecodeError> {
    decode(text, ClientMessage::TYPES)
}

/// Parses a message from the server. Never panics, whatever the input.
pub fn decode_server(text: &str) -> Result<ServerMessage, DecodeError> {
    decode(text, ServerMessage::TYPES)
}

/// A client message as the server routes it: a signal's payload stays the text its sender
/// sent, neither parsed into a [`SignalPayload`] nor serialized again (the recipient's
/// [`decode_server`] checks it), everything else as [`decode_client`] decodes it.
#[derive(Debug)]
pub enum Routed<'a> {
    /// [`ClientMessage::Signal`], its payload a JSON object not looked into.
    Signal {
        /// The recipient.
        to: PeerId,
        /// The payload's JSON text.
        payload: &'a serde_json::value::RawValue,
    },
    /// Any other message.
    Other(ClientMessage),
}

/// Parses a message from a client as the server routes it ([`Routed`]). Never panics,
/// whatever the input; refuses what [`decode_client`] refuses, except a signal's payload
/// that is a JSON object but no [`SignalPayload`] (the server forwards it; its recipient
/// drops it).
pub fn decode_client_routed(text: &str) -> Result<Routed<'_>, DecodeError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Envelope<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        to: PeerId,
        #[serde(borrow)]
        payload: &'a serde_json::value::RawValue,
    }
    if text.len() <= MAX_MESSAGE_BYTES {
        if let Ok(Envelope { kind, to, payload }) = serde_json::from_str(text) {
            if kind == "signal" && payload.get().trim_start().starts_with('{') {
                return Ok(Routed::Signal { to, payload });
            }
        }
    }
    decode_client(text).map(Routed::Other)
}

/// The wire text of [`ServerMessage::Signal`] from `from` with `payload` (as
/// [`decode_client_routed`] left it), without parsing the payload.
pub fn encode_relayed_signal(from: &PeerId, payload: &serde_json::value::RawValue) -> String {
    #[derive(Serialize)]
    struct Relayed<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        from: &'a PeerId,
        payload: &'a serde_json::value::RawValue,
    }
    encode(&Relayed { kind: "signal", from, payload })
}

/// Serializes a message to its wire text.
pub fn encode<T: Serialize>(msg: &T) -> String {
    // Serializing these types cannot fail: they hold only strings, numbers and enums.
    serde_json::to_string(msg).unwrap_or_default()
}

/// What a [`RoomMembership`] learned from one server message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    /// The server accepted our join (again, after a reconnect: the peer list is then the
    /// whole truth and replaces the old one).
    Joined {
        /// Our id for this connection.
        peer_id: PeerId,
        /// Everyone else in the room.
        peers: Vec<PeerId>,
    },
    /// A peer joined.
    PeerJoined(PeerId),
    /// A peer left.
    PeerLeft(PeerId),
    /// A peer sent us a payload.
    Signal {
        /// The sender.
        from: PeerId,
        /// The payload.
        payload: SignalPayload,
    },
    /// The server answered a ping.
    Pong,
    /// The server refused something.
    Error {
        /// Why.
        code: ErrorCode,
        /// Detail from the server.
        message: String,
    },
    /// The server's STUN/TURN servers for us, valid for `ttl` for new allocations.
    IceServers {
        /// The servers.
        servers: Vec<IceServer>,
        /// How long their credentials hold.
        ttl: std::time::Duration,
    },
}

/// A client's view of its room: the sans-IO half of a signaling client that browser and
/// native peer share. The driver owns the WebSocket; this tracks who is there.
#[derive(Debug, Clone)]
pub struct RoomMembership {
    room: RoomId,
    own_id: Option<PeerId>,
    peers: SortedSet<PeerId>,
}

impl RoomMembership {
    /// A membership in `room`, not yet joined.
    pub fn new(room: RoomId) -> Self {
        Self { room, own_id: None, peers: SortedSet::new() }
    }

    /// The message to send first on every (re)connection.
    pub fn join_message(&self) -> ClientMessage {
        ClientMessage::Join { version: PROTOCOL_VERSION, room: self.room.clone() }
    }

    /// The room.
    pub fn room(&self) -> &RoomId {
        &self.room
    }

    /// Our id, once joined.
    pub fn own_id(&self) -> Option<&PeerId> {
        self.own_id.as_ref()
    }

    /// The other members, sorted.
    pub fn peers(&self) -> impl Iterator<Item = &PeerId> {
        self.peers.iter()
    }

    /// The driver lost the connection: until the next welcome we know of no one.
    pub fn disconnected(&mut self) {
        self.own_id = None;
        self.peers.clear();
    }

    /// Takes one text frame from the server.
    pub fn handle_text(&mut self, text: &str) -> Result<MembershipEvent, DecodeError> {
        Ok(self.handle(decode_server(text)?))
    }

    /// Takes one decoded message from the server.
    pub fn handle(&mut self, msg: ServerMessage) -> MembershipEvent {
        match msg {
            ServerMessage::Welcome { peer_id, peers, .. } => {
                self.own_id = Some(peer_id.clone());
                self.peers = peers.iter().filter(|p| **p != peer_id).cloned().collect();
                MembershipEvent::Joined { peer_id, peers: self.peers.iter().cloned().collect() }
            }
            ServerMessage::PeerJoined { peer_id } => {
                self.peers.insert(peer_id.clone());
                MembershipEvent::PeerJoined(peer_id)
            }
            ServerMessage::PeerLeft { peer_id } => {
                self.peers.remove(&peer_id);
                MembershipEvent::PeerLeft(peer_id)
            }
            ServerMessage::Signal { from, payload } => MembershipEvent::Signal { from, payload },
            ServerMessage::Pong => MembershipEvent::Pong,
            ServerMessage::Error { code, message } => MembershipEvent::Error { code, message },
            ServerMessage::IceServers { servers, ttl_s } => {
                MembershipEvent::IceServers { servers, ttl: std::time::Duration::from_secs(ttl_s) }
            }
        }
    }
}

/// When to try the signaling server again after losing it: exponential backoff with
/// jitter, from half a second up to ten. The driver supplies the randomness.
#[derive(Debug, Clone, Default)]
pub struct ReconnectBackoff {
    failures: u32,
}

impl ReconnectBackoff {
    /// Shortest delay, milliseconds.
    pub const MIN_MS: u32 = 500;
    /// Longest delay, milliseconds.
    pub const MAX_MS: u32 = 10_000;

    /// The delay before the next attempt, given a uniformly random `jitter` in `0..=1`;
    /// each call counts one more failure.
    pub fn next_delay_ms(&mut self, jitter: f64) -> u32 {
        let base = Self::MIN_MS.saturating_mul(1 << self.failures.min(5)).min(Self::MAX_MS);
        self.failures = self.failures.saturating_add(1);
        // Full jitter on the upper half keeps a restarted server from being stampeded.
        let jitter = if jitter.is_finite() { jitter.clamp(0.0, 1.0) } else { 0.5 };
        let half = f64::from(base) / 2.0;
        (half + half * jitter) as u32
    }

    /// The connection works again: start over from the shortest delay.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn room(s: &str) -> RoomId {
        RoomId::new(s).unwrap()
    }

    #[test]
    fn join_round_trips_with_stable_wire_form() {
        let msg = ClientMessage::Join { version: 1, room: room("abc_DEF-123") };
        let text = encode(&msg);
        assert_eq!(text, r#"{"type":"join","version":1,"room":"abc_DEF-123"}"#);
        assert_eq!(decode_client(&text).unwrap(), msg);
    }

    #[test]
    fn a_routed_signal_is_relayed_as_sent_and_decodes_as_the_typed_one() {
        let payload = SignalPayload::Candidate {
            candidate: "candidate:1 1 udp 1 198.51.100.7 4 typ host \"q\" \u{e9}".into(),
            sdp_mid: Some("0".into()),
            sdp_m_line_index: Some(0),
            username_fragment: None,
        };
        let to = PeerId::new("b").unwrap();
        let text = encode(&ClientMessage::Signal { to: to.clone(), payload: payload.clone() });
        let Ok(Routed::Signal { to: routed_to, payload: raw }) = decode_client_routed(&text) else {
            panic!("not routed as a signal: {text}");
        };
        assert_eq!(routed_to, to);
        let from = PeerId::new("a").unwrap();
        let relayed = encode_relayed_signal(&from, raw);
        assert_eq!(relayed, encode(&ServerMessage::Signal { from, payload }));
        // Everything else, and whatever is wrong, as decode_client says.
        for text in [
            r#"{"type":"ping"}"#,
            r#"{"type":"signal","to":"x"}"#,
            r#"{"type":"signal","to":"x","payload":3}"#,
            r#"{"type":"signal","to":"x y","payload":{}}"#,
            r#"{"type":"join","to":"x","payload":{}}"#,
            "not json",
        ] {
            let routed = decode_client_routed(text).map(|r| match r {
                Routed::Other(msg) => msg,
                Routed::Signal { .. } => panic!("{text} routed as a signal"),
            });
            assert_eq!(routed, decode_client(text), "{text}");
        }
    }

    #[test]
    fn signal_payload_round_trips() {
        let msg = ClientMessage::Signal {
            to: PeerId::new("p1").unwrap(),
            payload: SignalPayload::Candidate {
                candidate: "candidate:1 1 udp 1 192.0.2.1 9 typ host".into(),
                sdp_mid: Some("0".into()),
                sdp_m_line_index: Some(0),
                username_fragment: None,
            },
        };
        assert_eq!(decode_client(&encode(&msg)).unwrap(), msg);
    }

    #[test]
    fn each_kind_of_bad_input_has_its_code() {
        let cases = [
            ("hello", ErrorCode::NotJson),
            ("{", ErrorCode::NotJson),
            ("[1,2]", ErrorCode::Malformed),
            (r#"{"type":7}"#, ErrorCode::Malformed),
            (r#"{"type":"teleport"}"#, ErrorCode::UnknownType),
            (r#"{"type":"join","version":1}"#, ErrorCode::Malformed),
            (r#"{"type":"join","version":1,"room":"a b"}"#, ErrorCode::Malformed),
            (r#"{"type":"join","version":1,"room":""}"#, ErrorCode::Malformed),
            (r#"{"type":"signal","to":"p","payload":{"kind":"x"}}"#, ErrorCode::Malformed),
        ];
        for (text, code) in cases {
            assert_eq!(decode_client(text).unwrap_err().code, code, "{text}");
        }
        let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(MAX_MESSAGE_BYTES));
        assert_eq!(decode_client(&big).unwrap_err().code, ErrorCode::TooLarge);
    }

    #[test]
    fn membership_tracks_welcome_join_leave_and_resync() {
        let mut m = RoomMembership::new(room("r"));
        let me = PeerId::new("me").unwrap();
        let a = PeerId::new("a").unwrap();
        let b = PeerId::new("b").unwrap();
        let ev = m.handle(ServerMessage::Welcome {
            version: PROTOCOL_VERSION,
            room: room("r"),
            peer_id: me.clone(),
            peers: vec![a.clone()],
        });
        assert_eq!(ev, MembershipEvent::Joined { peer_id: me.clone(), peers: vec![a.clone()] });
        m.handle(ServerMessage::PeerJoined { peer_id: b.clone() });
        assert_eq!(m.peers().cloned().collect::<Vec<_>>(), vec![a.clone(), b.clone()]);
        m.handle(ServerMessage::PeerLeft { peer_id: a.clone() });
        assert_eq!(m.peers().cloned().collect::<Vec<_>>(), vec![b.clone()]);
        m.disconnected();
        assert!(m.own_id().is_none() && m.peers().next().is_none());
        m.handle(ServerMessage::Welcome {
            version: 1,
            room: room("r"),
            peer_id: me,
            peers: vec![],
        });
        assert!(m.peers().next().is_none());
    }

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = ReconnectBackoff::default();
        let delays: Vec<u32> = (0..8).map(|_| b.next_delay_ms(1.0)).collect();
        assert_eq!(delays, vec![500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]);
        assert_eq!(b.next_delay_ms(0.0), 5000);
        assert_eq!(b.next_delay_ms(f64::NAN), 7500);
        b.reset();
        assert_eq!(b.next_delay_ms(1.0), 500);
    }

    #[test]
    fn error_codes_read_back_what_they_write() {
        for &code in ErrorCode::ALL {
            let text = serde_json::to_string(&code).unwrap();
            assert_eq!(text, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&text).unwrap(), code);
        }
        assert!(serde_json::from_str::<ErrorCode>(r#""no_such_code""#).is_err());
        assert!(serde_json::from_str::<ErrorCode>("3").is_err());
    }

    /// The derived decoders that `ServerFields` and `PayloadFields` replace (their fields
    /// are read only through `Debug`).
    #[allow(dead_code)]
    mod derived {
        use super::super::{ErrorCode, IceServer, PeerId, RoomId};
        use serde::Deserialize;

        #[derive(Debug, Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
        pub(super) enum ServerMessage {
            Welcome { version: u32, room: RoomId, peer_id: PeerId, peers: Vec<PeerId> },
            PeerJoined { peer_id: PeerId },
            PeerLeft { peer_id: PeerId },
            Signal { from: PeerId, payload: SignalPayload },
            Pong,
            Error { code: ErrorCode, message: String },
            IceServers { servers: Vec<IceServer>, ttl_s: u64 },
        }

        #[derive(Debug, Deserialize)]
        #[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
        pub(super) enum SignalPayload {
            Offer {
                sdp: String,
            },
            Answer {
                sdp: String,
            },
            Candidate {
                candidate: String,
                #[serde(default)]
                sdp_mid: Option<String>,
                #[serde(default)]
                sdp_m_line_index: Option<u16>,
                #[serde(default)]
                username_fragment: Option<String>,
            },
            Opaque {
                data: String,
            },
        }
    }

    /// Decodes `text` both ways: the same message (the same `Debug`), or an error both
    /// ways, except that ours takes a `null` field of another type as absent, and refuses
    /// fields beside a `pong`, which the derive lets through (serde reads nothing more of
    /// an internally tagged unit variant, `deny_unknown_fields` or not).
    fn check_against_derived(text: &str) {
        let ours = serde_json::from_str::<ServerMessage>(text);
        let theirs = serde_json::from_str::<derived::ServerMessage>(text);
        match (&ours, &theirs) {
            (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}"), "{text}"),
            (Err(_), Err(_)) => {}
            (Ok(_), Err(_)) if text.contains("null") => {}
            (Err(_), Ok(derived::ServerMessage::Pong)) => {}
            _ => panic!("{text}: ours {ours:?}, derived {theirs:?}"),
        }
    }

    #[test]
    fn decoding_agrees_with_the_derived_decoders() {
        let payloads = [
            r#"{"kind":"offer","sdp":"v=0"}"#,
            r#"{"kind":"answer","sdp":"v=0"}"#,
            r#"{"kind":"candidate","candidate":"c","sdp_mid":"0","sdp_m_line_index":1,"username_fragment":"u"}"#,
            r#"{"kind":"candidate","candidate":"c","sdp_mid":null}"#,
            r#"{"kind":"candidate","candidate":""}"#,
            r#"{"kind":"opaque","data":"xyz"}"#,
            r#"{"data":"xyz","kind":"opaque"}"#,
            r#"{"kind":"opaque"}"#,
            r#"{"kind":"opaque","data":"x","sdp":"y"}"#,
            r#"{"kind":"offer","sdp":"x","extra":1}"#,
            r#"{"kind":"teleport"}"#,
            r#"{"sdp":"x"}"#,
            r#"{"kind":"candidate","candidate":"c","sdp_m_line_index":70000}"#,
            r#"{"kind":"offer","sdp":"a","sdp":"b"}"#,
            r#""offer""#,
            "[]",
        ];
        for p in payloads {
            check_against_derived(&format!(r#"{{"type":"signal","from":"a","payload":{p}}}"#));
        }
        for text in [
            r#"{"type":"welcome","version":3,"room":"r","peer_id":"p","peers":["a","b"]}"#,
            r#"{"peers":[],"type":"welcome","version":3,"room":"r","peer_id":"p"}"#,
            r#"{"type":"welcome","version":3,"room":"r","peer_id":"p"}"#,
            r#"{"type":"welcome","version":-1,"room":"r","peer_id":"p","peers":[]}"#,
            r#"{"type":"welcome","version":3,"room":"a b","peer_id":"p","peers":[]}"#,
            r#"{"type":"peer_joined","peer_id":"p"}"#,
            r#"{"type":"peer_left","peer_id":"p"}"#,
            r#"{"type":"peer_left","peer_id":"p","from":"q"}"#,
            r#"{"type":"peer_left"}"#,
            r#"{"type":"pong"}"#,
            r#"{"type":"pong","x":1}"#,
            r#"{"type":"pong","message":"m"}"#,
            r#"{"type":"error","code":"room_full","message":"full"}"#,
            r#"{"type":"error","code":"no_such_code","message":"m"}"#,
            r#"{"type":"error","code":"room_full"}"#,
            r#"{"type":"ice_servers","servers":[{"urls":["stun:h:3478"]}],"ttl_s":600}"#,
            r#"{"type":"ice_servers","servers":[{"urls":["turn:h"],"username":"u","credential":"c"}],"ttl_s":1}"#,
            r#"{"type":"ice_servers","servers":[{"urls":"turn:h"}],"ttl_s":1}"#,
            r#"{"type":"ice_servers","servers":[],"ttl_s":-1}"#,
            r#"{"type":"signal","from":"a"}"#,
            r#"{"type":"teleport"}"#,
            r#"{"type":7}"#,
            r#"{"type":"pong","type":"pong"}"#,
            r#"{}"#,
            r#"["pong"]"#,
            "null",
        ] {
            check_against_derived(text);
        }
    }

    proptest! {
        #[test]
        fn decoding_agrees_with_the_derived_decoders_on_generated_messages(
            ty in prop::sample::select(ServerMessage::TYPES.iter().chain(&["x"]).copied().collect::<Vec<_>>()),
            fields in prop::sample::subsequence(
                vec!["version", "room", "peer_id", "peers", "from", "payload", "code", "message", "servers", "ttl_s", "other"],
                0..6,
            ),
            values in prop::collection::vec(
                prop::sample::select(vec![
                    "1", "null", r#""p""#, r#"["a"]"#, "[]", r#""room_full""#, "-1",
                    r#"{"kind":"offer","sdp":"s"}"#, r#"{"kind":"opaque","data":"d","sdp":null}"#,
                    r#"[{"urls":["stun:x"]}]"#, "{}",
                ]),
                6,
            ),
        ) {
            let body: Vec<String> = fields.iter().zip(&values).map(|(f, v)| format!(r#""{f}":{v}"#)).collect();
            check_against_derived(&format!(r#"{{"type":"{ty}"{}{}}}"#, if body.is_empty() { "" } else { "," }, body.join(",")));
        }

        #[test]
        fn decoders_never_panic(text in ".{0,300}") {
            let _ = decode_client(&text);
            let _ = decode_server(&text);
        }

        #[test]
        fn decoders_never_panic_on_json_shaped_input(
            ty in prop::sample::select(vec!["join", "signal", "ping", "leave", "welcome", "error", "x"]),
            field in "[a-z_]{1,12}",
            value in prop_oneof![Just("1".to_string()), Just("null".to_string()), "\"[ -~]{0,20}\"", Just("{}".to_string())],
        ) {
            let text = format!(r#"{{"type":"{ty}","{field}":{value}}}"#);
            let _ = decode_client(&text);
            let _ = decode_server(&text);
        }

        #[test]
        fn valid_ids_round_trip(s in "[A-Za-z0-9_-]{1,128}") {
            let msg = ClientMessage::Join { version: PROTOCOL_VERSION, room: RoomId::new(s).unwrap() };
            prop_assert_eq!(decode_client(&encode(&msg)).unwrap(), msg);
        }
    }
}
