//! The WebSocket driver: moves frames between sockets and the [`Relay`], and owns the
//! per-connection timers (ping, idle timeout) and the shutdown notice.

use std::collections::HashMap;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::SendTimeoutError;

use weft_core::signal::{self, ClientMessage, ErrorCode, PeerId, ServerMessage};

use crate::AppState;
use crate::relay::{ConnId, Delivery, Relay};
use crate::turn::IceOffer;

/// Messages queued for one connection before it counts as too slow and is dropped.
const OUTBOX_CAPACITY: usize = 1024;

/// How long a closing server waits for the client's close frame.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a sender waits for a recipient's full queue before the recipient is dropped.
const SLOW_PEER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A message on its way to one connection's queue.
#[derive(Debug)]
struct Pending {
    to: ConnId,
    outbox: mpsc::Sender<Outbound>,
    item: Outbound,
}

/// What the hub asks a connection task to send.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A text frame.
    Text(String),
    /// A text frame with a fatal error, then a close frame with `code` and `reason`.
    Fatal { text: String, code: ErrorCode, reason: String },
}

/// The relay plus the way to reach each connection's task.
#[derive(Debug)]
pub(crate) struct Hub {
    pub(crate) relay: Relay,
    outboxes: HashMap<ConnId, mpsc::Sender<Outbound>>,
}

impl Hub {
    pub(crate) fn new(relay: Relay) -> Self {
        Self { relay, outboxes: HashMap::new() }
    }
}

impl AppState {
    fn lock_hub(&self) -> std::sync::MutexGuard<'_, Hub> {
        // A poisoned lock means a panic elsewhere; the relay's state is still consistent
        // because every mutation completes before anything can panic.
        self.inner.hub.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Turns deliveries into queued sends, counting relayed messages and rejections.
    /// Call with the hub locked; send the result with [`flush`] after unlocking.
    fn route(&self, hub: &Hub, out: Vec<Delivery>) -> Vec<Pending> {
        let metrics = &self.inner.metrics;
        // A member is handed its ICE servers just before its welcome, so that its first
        // connections already use them.
        let out = out.into_iter().flat_map(|d| {
            let ice = match (&d.msg, &self.inner.ice) {
                (ServerMessage::Welcome { peer_id, .. }, Some(offer)) => {
                    Some(Delivery { to: d.to, msg: ice_servers(offer, peer_id) })
                }
                _ => None,
            };
            ice.into_iter().chain(std::iter::once(d))
        });
        let pending = out
            .filter_map(|Delivery { to, msg }| {
                let fatal = match &msg {
                    ServerMessage::Signal { .. } => {
                        metrics.messages_relayed.inc();
                        None
                    }
                    ServerMessage::Error { code, message } => {
                        metrics.reject(*code);
                        tracing::debug!(conn = to.0, %code, %message, "rejected");
                        code.is_fatal().then(|| (*code, message.clone()))
                    }
                    _ => None,
                };
                let outbox = hub.outboxes.get(&to)?.clone();
                let text = signal::encode(&msg);
                let item = match fatal {
                    Some((code, reason)) => Outbound::Fatal { text, code, reason },
                    None => Outbound::Text(text),
                };
                Some(Pending { to, outbox, item })
            })
            .collect();
        metrics.rooms.set(i64::try_from(hub.relay.room_count()).unwrap_or(i64::MAX));
        pending
    }

    /// Sends queued messages. A recipient whose queue stays full for [`SLOW_PEER_GRACE`]
    /// is dropped (its task then leaves the room properly); until then the sender waits,
    /// which pushes back on it through TCP.
    async fn flush(&self, pending: Vec<Pending>) {
        for Pending { to, outbox, item } in pending {
            if let Err(SendTimeoutError::Timeout(_)) =
                outbox.send_timeout(item, SLOW_PEER_GRACE).await
            {
                tracing::warn!(conn = to.0, "connection cannot keep up; dropping it");
                self.lock_hub().outboxes.remove(&to);
            }
        }
    }

    async fn deliver(&self, out: Vec<Delivery>) {
        let pending = self.route(&self.lock_hub(), out);
        self.flush(pending).await;
    }

    async fn reject(&self, conn: ConnId, code: ErrorCode, message: String) {
        self.deliver(vec![Delivery { to: conn, msg: ServerMessage::error(code, message) }]).await;
    }

    async fn on_text(&self, conn: ConnId, text: &str) {
        if !self.lock_hub().relay.admit(conn, Instant::now()) {
            let rate = self.inner.limits.messages_per_second;
            let message = format!("more than {rate} messages per second; message dropped");
            self.reject(conn, ErrorCode::RateLimited, message).await;
            return;
        }
        let msg = if text.len() > self.inner.limits.max_message_bytes {
            let limit = self.inner.limits.max_message_bytes;
            Err((ErrorCode::TooLarge, format!("message of {} bytes exceeds {limit}", text.len())))
        } else {
            signal::decode_client(text).map_err(|e| (e.code, e.detail))
        };
        match msg {
            Ok(msg) => {
                let leaving = matches!(msg, ClientMessage::Leave);
                let (pending, member) = {
                    let mut hub = self.lock_hub();
                    let member = hub.relay.peer_id(conn).cloned();
                    let out = hub.relay.handle(conn, msg);
                    (self.route(&hub, out), member)
                };
                self.flush(pending).await;
                if let (true, Some(member)) = (leaving, member) {
                    self.member_left(&member).await;
                }
            }
            Err((code, detail)) => self.reject(conn, code, detail).await,
        }
    }

    /// A member said it leaves: its TURN credentials are refused from now on and its
    /// allocations end. (A member that only lost its connection keeps them: its sessions
    /// outlive the signaling server.)
    async fn member_left(&self, member: &PeerId) {
        if let Some(offer) = &self.inner.ice {
            offer.revoke(member.as_str());
        }
        let turn = self.inner.turn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(turn) = turn {
            turn.drop_member(member.as_str()).await;
        }
    }

    /// The ICE servers message for this connection's member, if it has joined.
    fn renewed_ice(&self, conn: ConnId) -> Option<String> {
        let offer = self.inner.ice.as_ref()?;
        let hub = self.lock_hub();
        let member = hub.relay.peer_id(conn)?;
        hub.relay.room_of(conn)?;
        Some(signal::encode(&ice_servers(offer, member)))
    }

    fn connect(&self, outbox: mpsc::Sender<Outbound>) -> Result<ConnId, ErrorCode> {
        let peer_id = PeerId::new(format!("{:016x}", rand::random::<u64>()))
            .map_err(|_| ErrorCode::ServerFull)?;
        let mut hub = self.lock_hub();
        let conn = hub.relay.connect(peer_id, Instant::now()).inspect_err(|&code| {
            self.inner.metrics.reject(code);
        })?;
        hub.outboxes.insert(conn, outbox);
        self.inner.metrics.connections.inc();
        self.inner.metrics.connections_total.inc();
        Ok(conn)
    }

    async fn disconnect(&self, conn: ConnId) {
        let pending = {
            let mut hub = self.lock_hub();
            hub.outboxes.remove(&conn);
            let out = hub.relay.disconnect(conn);
            self.route(&hub, out)
        };
        self.inner.metrics.connections.dec();
        self.flush(pending).await;
    }
}

/// The ICE servers `member` is handed now.
fn ice_servers(offer: &IceOffer, member: &PeerId) -> ServerMessage {
    ServerMessage::IceServers {
        servers: offer.servers_for(member.as_str()),
        ttl_s: offer.ttl().as_secs(),
    }
}

/// When to hand a member fresh credentials: well before the old ones expire.
fn renew_after(ttl: Duration) -> Duration {
    (ttl.mul_f64(0.8)).max(Duration::from_secs(1))
}

fn close_frame(code: ErrorCode, reason: &str) -> Message {
    // RFC 6455 limits a close reason to 123 bytes.
    let mut reason = reason.to_string();
    if reason.len() > 123 {
        let mut cut = 120;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push_str("...");
    }
    Message::Close(Some(CloseFrame { code: code.close_code(), reason: reason.into() }))
}

/// Runs one WebSocket connection to its end. Generic over the socket so tests can drive
/// it with channels.
pub(crate) async fn run_connection<S>(socket: S, state: AppState)
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message> + Unpin + Send,
{
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel(OUTBOX_CAPACITY);
    let conn = match state.connect(tx) {
        Ok(conn) => conn,
        Err(code) => {
            let text = "the server has its maximum number of connections; try again later";
            let _ =
                sink.send(Message::text(signal::encode(&ServerMessage::error(code, text)))).await;
            let _ = sink.send(close_frame(code, text)).await;
            return;
        }
    };
    tracing::debug!(conn = conn.0, "connected");
    let limits = state.inner.limits.clone();
    let mut shutdown = state.inner.shutdown.subscribe();
    let mut ping = tokio::time::interval(limits.ping_interval);
    ping.tick().await;
    let idle = tokio::time::sleep(limits.idle_timeout);
    tokio::pin!(idle);
    // Fresh TURN credentials before the old ones expire (the first come with the welcome).
    let renew_every = state.inner.ice.as_ref().map(|o| renew_after(o.ttl()));
    let renew = tokio::time::sleep(renew_every.unwrap_or(Duration::MAX / 4));
    tokio::pin!(renew);

    let fatal = |code: ErrorCode, text: &str| {
        (Message::text(signal::encode(&ServerMessage::error(code, text))), close_frame(code, text))
    };
    let end: Option<(Message, Message)> = loop {
        tokio::select! {
            frame = stream.next() => {
                let Some(Ok(frame)) = frame else { break None };
                idle.as_mut().reset(tokio::time::Instant::now() + limits.idle_timeout);
                match frame {
                    Message::Text(text) => state.on_text(conn, text.as_str()).await,
                    Message::Binary(_) => {
                        let message = "binary frames are not accepted; send JSON text".into();
                        state.reject(conn, ErrorCode::NotJson, message).await;
                    }
                    Message::Close(_) => break None,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            out = rx.recv() => match out {
                Some(Outbound::Text(text)) => {
                    if sink.send(Message::text(text)).await.is_err() { break None }
                }
                Some(Outbound::Fatal { text, code, reason }) => {
                    break Some((Message::text(text), close_frame(code, &reason)));
                }
                None => break Some(fatal(ErrorCode::RateLimited, "connection too slow to keep up")),
            },
            _ = ping.tick() => {
                if sink.send(Message::Ping(Default::default())).await.is_err() { break None }
            }
            () = &mut renew, if renew_every.is_some() => {
                let every = renew_every.unwrap_or(Duration::MAX / 4);
                renew.as_mut().reset(tokio::time::Instant::now() + every);
                if let Some(text) = state.renewed_ice(conn) {
                    if sink.send(Message::text(text)).await.is_err() { break None }
                }
            }
            () = &mut idle => {
                state.inner.metrics.reject(ErrorCode::IdleTimeout);
                break Some(fatal(ErrorCode::IdleTimeout, "nothing received for too long"));
            }
            () = async { let _ = shutdown.wait_for(|down| *down).await; } => {
                break Some(fatal(ErrorCode::ShuttingDown, "server is shutting down; reconnect shortly"));
            }
        }
    };
    state.disconnect(conn).await;
    if let Some((error, close)) = end {
        let _ = sink.send(error).await;
        let _ = sink.send(close).await;
        // Closing handshake (RFC 6455 §7.1.1): wait briefly for the client's close frame
        // so it reads our reason before the TCP connection goes away.
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while let Some(Ok(frame)) = stream.next().await {
                if matches!(frame, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    tracing::debug!(conn = conn.0, "disconnected");
}
