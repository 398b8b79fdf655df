//! The native signaling driver: keeps a WebSocket to the server, joins the room, and
//! reports what [`RoomMembership`] learns. Reconnects with backoff; no protocol logic.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use weft_core::signal::{
    self, ClientMessage, ErrorCode, MembershipEvent, ReconnectBackoff, RoomId, RoomMembership,
};

/// How often we ping the server; two unanswered pings mean the connection is dead.
const HEARTBEAT: Duration = Duration::from_secs(15);

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

/// Runs until `stop` fires or the server refuses us for good.
pub async fn run(
    url: String,
    room: RoomId,
    reports: mpsc::UnboundedSender<Report>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), SignalingError> {
    check_url(&url)?;
    let mut membership = RoomMembership::new(room);
    let mut backoff = ReconnectBackoff::default();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let _ = reports.send(Report::Connecting { attempt });
        let reason = tokio::select! {
            r = session(&url, &mut membership, &mut backoff, &reports) => r?,
            _ = stop.changed() => return Ok(()),
        };
        membership.disconnected();
        let retry_in = Duration::from_millis(u64::from(backoff.next_delay_ms(rand::random())));
        let _ = reports.send(Report::Disconnected { reason, retry_in });
        tokio::select! {
            () = tokio::time::sleep(retry_in) => {}
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// One connection's life; returns why it ended.
async fn session(
    url: &str,
    membership: &mut RoomMembership,
    backoff: &mut ReconnectBackoff,
    reports: &mpsc::UnboundedSender<Report>,
) -> Result<String, SignalingError> {
    let (mut ws, _) = match tokio_tungstenite::connect_async(url).await {
        Ok(ok) => ok,
        Err(e) => return Ok(format!("cannot connect to {url}: {e}")),
    };
    let join = signal::encode(&membership.join_message());
    if let Err(e) = ws.send(Message::text(join)).await {
        return Ok(format!("connection lost: {e}"));
    }
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.tick().await;
    let mut unanswered = 0u32;
    loop {
        tokio::select! {
            frame = ws.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(frame))) => {
                        let why = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                        return Ok(format!("server closed the connection {why}").trim().to_string());
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Ok(format!("connection lost: {e}")),
                    None => return Ok("connection lost".into()),
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
                    return Ok("server stopped answering".into());
                }
                unanswered += 1;
                let ping = signal::encode(&ClientMessage::Ping);
                if let Err(e) = ws.send(Message::text(ping)).await {
                    return Ok(format!("connection lost: {e}"));
                }
            }
        }
    }
}
