//! The native signaling driver: keeps a WebSocket to the server, joins the room, reports
//! what [`RoomMembership`] learns and sends what the mesh gives it. Reconnects with
//! backoff; says `leave` when stopped. No protocol logic.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use weft_core::signal::{
    self, ClientMessage, ErrorCode, MembershipEvent, ReconnectBackoff, RoomId, RoomMembership,
};

/// How often we ping the server; two unanswered pings mean the connection is dead.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the driver reports.
#[derive(Debug)]
pub enum Report {
    /// Connecting (or reconnecting) to the server.
    Connecting {
        /// Attempt number, from 1.
        attempt: u32,
    },
    /// The connection failed or dropped; the next attempt is in `retry_in`.
    Disconnected {
        /// Why.
        reason: String,
        /// When we try again.
        retry_in: Duration,
    },
    /// Something the room membership learned.
    Membership(MembershipEvent),
}

/// Why the driver stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum SignalingError {
    /// The URL is not a ws:// or wss:// URL.
    #[error("bad server URL {url:?}: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server speaks another protocol version: only an update helps.
    #[error("the server refused our protocol version: {0}")]
    UnsupportedVersion(String),
}

/// Checks that `url` is a WebSocket URL, so typos fail at once rather than retry forever.
pub fn check_url(url: &str) -> Result<(), SignalingError> {
    let bad = |reason: &str| SignalingError::BadUrl { url: url.into(), reason: reason.into() };
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .ok_or_else(|| bad("it must start with ws:// or wss:// (e.g. ws://127.0.0.1:8080/ws)"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad("it names no host"));
    }
    Ok(())
}

/// Runs until `stop` fires (then says `leave` if connected) or the server refuses us
/// for good. Messages from `outgoing` go to the server while connected and are dropped
/// while not (the mesh renegotiates after a rejoin anyway).
pub async fn run(
    url: String,
    room: RoomId,
    reports: mpsc::UnboundedSender<Report>,
    mut outgoing: mpsc::UnboundedReceiver<ClientMessage>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), SignalingError> {
    check_url(&url)?;
    let mut membership = RoomMembership::new(room);
    let mut backoff = ReconnectBackoff::default();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let _ = reports.send(Report::Connecting { attempt });
        let link = Link { url: &url, reports: &reports, outgoing: &mut outgoing, stop: &mut stop };
        let reason = match link.session(&mut membership, &mut backoff).await? {
            Some(reason) => reason,
            None => return Ok(()),
        };
        membership.disconnected();
        let retry_in = Duration::from_millis(u64::from(backoff.next_delay_ms(rand::random())));
        let _ = reports.send(Report::Disconnected { reason, retry_in });
        let deadline = tokio::time::Instant::now() + retry_in;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                _ = stop.changed() => return Ok(()),
                // Nobody to send to: drop (a stale offer is worse than none).
                Some(_) = outgoing.recv() => {}
            }
        }
    }
}

/// What one connection works with.
struct Link<'a> {
    url: &'a str,
    reports: &'a mpsc::UnboundedSender<Report>,
    outgoing: &'a mut mpsc::UnboundedReceiver<ClientMessage>,
    stop: &'a mut tokio::sync::watch::Receiver<bool>,
}

impl Link<'_> {
    /// One connection's life; returns why it ended, or `None` if we were stopped.
    async fn session(
        self,
        membership: &mut RoomMembership,
        backoff: &mut ReconnectBackoff,
    ) -> Result<Option<String>, SignalingError> {
        let Self { url, reports, outgoing, stop } = self;
        let connect = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url)) => r,
            _ = stop.changed() => return Ok(None),
        };
        let (mut ws, _) = match connect {
            Ok(Ok(ok)) => ok,
            Ok(Err(e)) => return Ok(Some(format!("cannot connect to {url}: {e}"))),
            Err(_) => return Ok(Some(format!("cannot connect to {url}: no answer within 10 s"))),
        };
        let join = signal::encode(&membership.join_message());
        if let Err(e) = ws.send(Message::text(join)).await {
            return Ok(Some(format!("connection lost: {e}")));
        }
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        let mut unanswered = 0u32;
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    let leave = signal::encode(&ClientMessage::Leave);
                    let _ = ws.send(Message::text(leave)).await;
                    let _ = ws.close(None).await;
                    return Ok(None);
                }
                Some(msg) = outgoing.recv() => {
                    if let Err(e) = ws.send(Message::text(signal::encode(&msg))).await {
                        return Ok(Some(format!("connection lost: {e}")));
                    }
                }
                frame = ws.next() => {
                    let text = match frame {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(frame))) => {
                            let why = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                            let reason = format!("server closed the connection {why}");
                            return Ok(Some(reason.trim().to_string()));
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Ok(Some(format!("connection lost: {e}"))),
                        None => return Ok(Some("connection lost".into())),
                    };
                    unanswered = 0;
                    match membership.handle_text(text.as_str()) {
                        Ok(MembershipEvent::Error { code: ErrorCode::UnsupportedVersion, message }) => {
                            return Err(SignalingError::UnsupportedVersion(message));
                        }
                        Ok(event) => {
                            if matches!(event, MembershipEvent::Joined { .. }) {
                                backoff.reset();
                            }
                            let _ = reports.send(Report::Membership(event));
                        }
                        Err(e) => tracing::warn!("ignoring bad message from the server: {e}"),
                    }
                }
                _ = heartbeat.tick() => {
                    if unanswered >= 2 {
                        return Ok(Some("server stopped answering".into()));
                    }
                    unanswered += 1;
                    let ping = signal::encode(&ClientMessage::Ping);
                    if let Err(e) = ws.send(Message::text(ping)).await {
                        return Ok(Some(format!("connection lost: {e}")));
                    }
                }
            }
        }
    }
}
