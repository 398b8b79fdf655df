//! The WebSocket driver: moves frames between sockets and the [`Relay`], and owns the
//! per-connection timers (ping, idle timeout) and the shutdown notice.
//!
//! Nothing a client does can stall another connection for long, or its own reader:
//! messages for a connection go into a queue counted in bytes; a sender whose recipient
//! has [`Limits::max_outbox_bytes`] waiting waits for it to drain (backpressure on whoever
//! sends that much), at most [`Limits::send_timeout`], after which the recipient is
//! dropped and leaves its room. Each connection's writes run beside its reader, each also
//! bounded by the send timeout, so a client that stops reading cannot keep its task from
//! noticing pings, idleness or shutdown.
//!
//! [`Limits::max_outbox_bytes`]: crate::Limits::max_outbox_bytes
//! [`Limits::send_timeout`]: crate::Limits::send_timeout

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

use serde_json::value::RawValue;
use weft_core::signal::{self, ClientMessage, ErrorCode, PeerId, RoomId, Routed, ServerMessage};

use crate::AppState;
use crate::cluster::{Cluster, JoinRefusal, Renewal, RoomUpdate};
use crate::relay::{ConnId, Delivery, Forward, Relay, SignalRoute};
use crate::turn::IceOffer;

/// How long a closing server waits for the client's close frame.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// A message on its way to one connection's queue.
#[derive(Debug)]
struct Pending {
    to: ConnId,
    outbox: Outbox,
    msg: ServerMessage,
}

/// The way to one connection's task: a queue whose bytes (queued, or being written to
/// the socket) are counted.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    tx: mpsc::UnboundedSender<Outbound>,
    queue: Arc<QueuedBytes>,
}

/// Bytes waiting for one connection, and a signal each time some are written.
#[derive(Debug, Default)]
pub(crate) struct QueuedBytes {
    bytes: AtomicUsize,
    drained: Notify,
}

impl QueuedBytes {
    fn release(&self, len: usize) {
        self.bytes.fetch_sub(len, Ordering::Relaxed);
        self.drained.notify_waiters();
    }
}

impl Outbox {
    /// Queues `item` now, whatever is waiting: for a connection's first messages (its
    /// ICE servers and welcome), queued while the hub is locked so that nothing another
    /// task routes to it can go out before them.
    fn push_now(&self, item: Outbound) {
        self.queue.bytes.fetch_add(item.len(), Ordering::Relaxed);
        let _ = self.tx.send(item);
    }

    /// Queues `item` once at most `limit` bytes would be waiting, waiting up to `timeout`
    /// for the connection's writes to make room; `false` if they did not (the connection
    /// does not keep up and is to be dropped).
    async fn push(&self, item: Outbound, limit: usize, timeout: Duration) -> bool {
        let len = item.len();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let drained = self.queue.drained.notified();
            tokio::pin!(drained);
            // Registered before the check, so a release in between is not missed.
            drained.as_mut().enable();
            let before = self.queue.bytes.fetch_add(len, Ordering::Relaxed);
            if before.saturating_add(len) <= limit || before == 0 {
                // A task that is gone has nothing to be told.
                let _ = self.tx.send(item);
                return true;
            }
            self.queue.bytes.fetch_sub(len, Ordering::Relaxed);
            if tokio::time::timeout_at(deadline, drained).await.is_err() || self.tx.is_closed() {
                return false;
            }
        }
    }
}

/// What the hub asks a connection task to send.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A text frame.
    Text(String),
    /// A text frame with a fatal error, then a close frame with `code` and `reason`.
    Fatal { text: String, code: ErrorCode, reason: String },
}

impl Outbound {
    /// Bytes it counts for in an [`Outbox`].
    fn len(&self) -> usize {
        match self {
            Outbound::Text(text) | Outbound::Fatal { text, .. } => text.len(),
        }
    }
}

/// The relay plus the way to reach each connection's task.
#[derive(Debug)]
pub(crate) struct Hub {
    pub(crate) relay: Relay,
    outboxes: HashMap<ConnId, Outbox>,
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

    /// Finds each delivery's connection (with the hub locked: nothing else is done under
    /// the lock); [`flush`](Self::flush) encodes and queues them after unlocking.
    fn route(&self, hub: &Hub, out: Vec<Delivery>) -> Vec<Pending> {
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
        // Everything else is queued after the hub is unlocked (`flush`), where another
        // task may queue for the same connection first: a member's welcome (and its ICE
        // servers) is queued here, under the lock, because the member joined under this
        // very lock and nothing can have been routed to it before; anything routed to it
        // from now on (a member joining, a signal) comes after.
        let pending = out
            .filter_map(|Delivery { to, msg }| {
                let outbox = hub.outboxes.get(&to)?;
                if matches!(msg, ServerMessage::Welcome { .. } | ServerMessage::IceServers { .. }) {
                    outbox.push_now(self.outbound(to, &msg));
                    return None;
                }
                Some(Pending { to, outbox: outbox.clone(), msg })
            })
            .collect();
        self.inner.metrics.rooms.set(i64::try_from(hub.relay.room_count()).unwrap_or(i64::MAX));
        pending
    }

    /// The text a message goes out as, counting relayed messages and rejections.
    fn outbound(&self, to: ConnId, msg: &ServerMessage) -> Outbound {
        let metrics = &self.inner.metrics;
        let fatal = match msg {
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
        let text = signal::encode(msg);
        match fatal {
            Some((code, reason)) => Outbound::Fatal { text, code, reason },
            None => Outbound::Text(text),
        }
    }

    /// Queues messages. A recipient with [`Limits::max_outbox_bytes`] waiting makes the
    /// sender wait for room, up to [`Limits::send_timeout`]; one that still has no room
    /// then is dropped (its task then leaves the room properly).
    ///
    /// [`Limits::max_outbox_bytes`]: crate::Limits::max_outbox_bytes
    /// [`Limits::send_timeout`]: crate::Limits::send_timeout
    async fn flush(&self, pending: Vec<Pending>) {
        let limit = self.inner.limits.max_outbox_bytes;
        let timeout = self.inner.limits.send_timeout;
        for Pending { to, outbox, msg } in pending {
            let item = self.outbound(to, &msg);
            self.queue(to, &outbox, item, limit, timeout).await;
        }
    }

    /// Queues `item` for `to` (see [`flush`](Self::flush)).
    async fn queue(
        &self,
        to: ConnId,
        outbox: &Outbox,
        item: Outbound,
        limit: usize,
        timeout: Duration,
    ) {
        if !outbox.push(item, limit, timeout).await {
            tracing::warn!(conn = to.0, "connection cannot keep up; dropping it");
            self.inner.metrics.reject(ErrorCode::TooSlow);
            self.lock_hub().outboxes.remove(&to);
        }
    }

    async fn deliver(&self, out: Vec<Delivery>) {
        let pending = self.route(&self.lock_hub(), out);
        self.flush(pending).await;
    }

    async fn reject(&self, conn: ConnId, code: ErrorCode, message: String) {
        self.deliver(vec![Delivery { to: conn, msg: ServerMessage::error(code, message) }]).await;
    }

    async fn rate_limited(&self, conn: ConnId) {
        let rate = self.inner.limits.messages_per_second;
        let message = format!("more than {rate} messages per second; message dropped");
        self.reject(conn, ErrorCode::RateLimited, message).await;
    }

    async fn on_text(&self, conn: ConnId, text: &str) {
        let msg = if text.len() > self.inner.limits.max_message_bytes {
            let limit = self.inner.limits.max_message_bytes;
            Err((ErrorCode::TooLarge, format!("message of {} bytes exceeds {limit}", text.len())))
        } else {
            signal::decode_client_routed(text).map_err(|e| (e.code, e.detail))
        };
        let msg = match msg {
            Ok(Routed::Signal { to, payload }) => return self.on_signal(conn, &to, payload).await,
            Ok(Routed::Other(msg)) => Ok(msg),
            Err(refused) => Err(refused),
        };
        if !self.lock_hub().relay.admit(conn, Instant::now()) {
            return self.rate_limited(conn).await;
        }
        match msg {
            Ok(ClientMessage::Join { version, room }) if self.inner.cluster.is_some() => {
                self.join_shared(conn, version, room).await;
            }
            Ok(msg) => {
                let leaving = matches!(msg, ClientMessage::Leave);
                let (pending, forwards, member, joined) = {
                    let mut hub = self.lock_hub();
                    let (member, joined) = if leaving {
                        (hub.relay.peer_id(conn).cloned(), hub.relay.membership(conn))
                    } else {
                        (None, None)
                    };
                    let out = hub.relay.handle(conn, msg);
                    let forwards = hub.relay.take_forwards();
                    (self.route(&hub, out), forwards, member, joined)
                };
                self.flush(pending).await;
                if !forwards.is_empty() {
                    self.forward(forwards).await;
                }
                if let Some(joined) = joined {
                    self.leave_shared(joined).await;
                }
                if let Some(member) = member {
                    self.member_left(&member).await;
                }
            }
            Err((code, detail)) => self.reject(conn, code, detail).await,
        }
    }

    /// A signal: the relay's hot path. One lock (the sender's rate, the route, the
    /// recipient's queue), and the payload goes on as its sender wrote it, never parsed
    /// (`signal::decode_client_routed`).
    async fn on_signal(&self, conn: ConnId, to: &PeerId, payload: &RawValue) {
        let routed = {
            let mut hub = self.lock_hub();
            if hub.relay.admit(conn, Instant::now()) {
                Some(match hub.relay.route_signal(conn, to) {
                    Ok((from, route)) => {
                        let outbox = match &route {
                            SignalRoute::Local(target) => hub.outboxes.get(target).cloned(),
                            SignalRoute::Remote { .. } => None,
                        };
                        Ok((from, route, outbox))
                    }
                    Err(refused) => Err(self.route(&hub, refused)),
                })
            } else {
                None
            }
        };
        let (from, route, outbox) = match routed {
            None => return self.rate_limited(conn).await,
            Some(Err(refused)) => return self.flush(refused).await,
            Some(Ok(routed)) => routed,
        };
        self.inner.metrics.messages_relayed.inc();
        let text = signal::encode_relayed_signal(&from, payload);
        match (route, outbox) {
            (SignalRoute::Local(target), Some(outbox)) => {
                let limits = &self.inner.limits;
                let item = Outbound::Text(text);
                self.queue(target, &outbox, item, limits.max_outbox_bytes, limits.send_timeout)
                    .await;
            }
            (SignalRoute::Local(_), None) => {}
            (SignalRoute::Remote { process, room }, _) => {
                let Some(cluster) = &self.inner.cluster else { return };
                if let Err(e) = cluster.forward(&process, &room, to, text).await {
                    tracing::warn!("cannot forward a signal in the cluster: {e}");
                }
            }
        }
    }

    /// A join in a cluster: checked here, then added to the room cluster-wide (where the
    /// room's size is checked), then welcomed with the members of every process.
    async fn join_shared(&self, conn: ConnId, version: u32, room: RoomId) {
        let Some(cluster) = self.inner.cluster.clone() else { return };
        let (checked, peer) = {
            let mut hub = self.lock_hub();
            let checked = hub.relay.check_join(conn, version, &room);
            let peer = hub.relay.peer_id(conn).cloned().zip(hub.relay.ip_of(conn));
            if checked.is_ok() && peer.is_some() {
                hub.relay.begin_shared_join(&room);
            }
            (checked, peer)
        };
        if let Err(refused) = checked {
            return self.deliver(refused).await;
        }
        let Some((peer, ip)) = peer else { return };
        let limits = &self.inner.limits;
        let joined = cluster.join(&room, &peer, ip, limits).await;
        if joined.is_err() {
            self.lock_hub().relay.end_shared_join(&room);
        }
        match joined {
            Ok(update) => {
                let others = update.members.others(cluster.id());
                let pending = {
                    let mut hub = self.lock_hub();
                    if hub.relay.peer_id(conn).is_some() {
                        let out =
                            hub.relay.join_shared(conn, room.clone(), update.revision, others);
                        Some(self.route(&hub, out))
                    } else {
                        hub.relay.end_shared_join(&room);
                        None
                    }
                };
                match pending {
                    Some(pending) => self.flush(pending).await,
                    // It closed meanwhile.
                    None => self.leave_shared((room, peer, ip)).await,
                }
            }
            Err(JoinRefusal::Full) => {
                let max = limits.max_peers_per_room;
                let message = format!("the room has its maximum of {max} peers");
                self.reject(conn, ErrorCode::RoomFull, message).await;
            }
            Err(JoinRefusal::AddressRooms) => {
                let max = limits.max_rooms_per_ip;
                let message = format!("your address is in its maximum of {max} rooms");
                self.reject(conn, ErrorCode::AddressRooms, message).await;
            }
            Err(JoinRefusal::Unavailable(e)) => {
                tracing::warn!("cannot join a room in the cluster: {e}");
                let message = "this server lost its cluster; reconnect to another".to_string();
                self.reject(conn, ErrorCode::ShuttingDown, message).await;
            }
        }
    }

    /// Member `peer` (from `ip`) of this process left `room`: so it does cluster-wide.
    async fn leave_shared(&self, (room, peer, ip): (RoomId, PeerId, IpAddr)) {
        let Some(cluster) = &self.inner.cluster else { return };
        if let Err(e) = cluster.leave(&room, &peer, ip).await {
            tracing::warn!("cannot leave a room in the cluster: {e}");
        }
    }

    /// Sends messages to members on other processes.
    async fn forward(&self, forwards: Vec<Forward>) {
        let Some(cluster) = &self.inner.cluster else { return };
        for Forward { process, room, to, msg } in forwards {
            self.inner.metrics.messages_relayed.inc();
            let text = signal::encode(&msg);
            if let Err(e) = cluster.forward(&process, &room, &to, text).await {
                tracing::warn!("cannot forward a signal in the cluster: {e}");
            }
        }
    }

    /// A room's state in the cluster: its members here learn who came and went.
    async fn room_changed(&self, cluster: &Cluster, update: RoomUpdate) {
        let others = update.members.others(cluster.id());
        let pending = {
            let mut hub = self.lock_hub();
            let out = hub.relay.apply_shared(&update.room, update.revision, others);
            self.route(&hub, out)
        };
        self.flush(pending).await;
    }

    /// Runs this process's part of the cluster until the process ends: room changes to
    /// members here, signals forwarded to them, the lease renewed and members of processes
    /// that lost theirs dropped. The streams are opened before it returns, so that no
    /// change after the server starts is missed.
    pub(crate) async fn run_cluster(&self) -> Result<(), crate::cluster::ClusterError> {
        let Some(cluster) = self.inner.cluster.clone() else { return Ok(()) };
        let updates = cluster.room_updates().await?;
        let incoming = cluster.incoming().await?;
        let state = self.clone();
        let watcher = cluster.clone();
        tokio::spawn(async move {
            tokio::pin!(updates);
            while let Some(update) = updates.next().await {
                state.room_changed(&watcher, update).await;
            }
            tracing::error!("the cluster's room watch ended");
        });
        let state = self.clone();
        tokio::spawn(async move {
            let limits = &state.inner.limits;
            tokio::pin!(incoming);
            while let Some(msg) = incoming.next().await {
                let target = {
                    let hub = state.lock_hub();
                    let conn = hub.relay.member(&msg.room, &msg.to);
                    conn.and_then(|c| Some((c, hub.outboxes.get(&c)?.clone())))
                };
                if let Some((conn, outbox)) = target {
                    let item = Outbound::Text(msg.text);
                    state
                        .queue(conn, &outbox, item, limits.max_outbox_bytes, limits.send_timeout)
                        .await;
                }
            }
        });
        let state = self.clone();
        tokio::spawn(async move {
            let mut beat = tokio::time::interval(crate::cluster::HEARTBEAT);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                beat.tick().await;
                if let Err(e) = state.cluster_heartbeat(&cluster).await {
                    tracing::warn!("cluster heartbeat: {e}");
                }
            }
        });
        Ok(())
    }

    async fn cluster_heartbeat(
        &self,
        cluster: &Cluster,
    ) -> Result<(), crate::cluster::ClusterError> {
        if cluster.renew_lease().await? == Renewal::Lost {
            // It stalled (or lost NATS) past its lease: other processes dropped its members
            // from their rooms. They reconnect and join again (to this process or the
            // next), which the core handles like any reconnect: sessions stay up.
            tracing::warn!("the cluster lease ran out; closing the connections from before");
            self.inner.fence.send_modify(|n| *n += 1);
        }
        let live = cluster.refresh_live().await?;
        let rooms = self.lock_hub().relay.rooms_sharing_with(|p| !live.contains(p));
        for room in rooms {
            let update = cluster.sweep(&room).await?;
            self.room_changed(cluster, update).await;
        }
        Ok(())
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

    fn connect(&self, outbox: Outbox, ip: IpAddr) -> Result<ConnId, ErrorCode> {
        let peer_id = PeerId::new(format!("{:016x}", rand::random::<u64>()))
            .map_err(|_| ErrorCode::ServerFull)?;
        let mut hub = self.lock_hub();
        let conn = hub.relay.connect(peer_id, ip, Instant::now()).inspect_err(|&code| {
            self.inner.metrics.reject(code);
        })?;
        hub.outboxes.insert(conn, outbox);
        self.inner.metrics.connections.inc();
        self.inner.metrics.connections_total.inc();
        Ok(conn)
    }

    async fn disconnect(&self, conn: ConnId) {
        let (pending, left) = {
            let mut hub = self.lock_hub();
            hub.outboxes.remove(&conn);
            let left = hub.relay.membership(conn);
            let out = hub.relay.disconnect(conn);
            (self.route(&hub, out), left)
        };
        self.inner.metrics.connections.dec();
        self.flush(pending).await;
        if let Some(left) = left {
            self.leave_shared(left).await;
        }
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

/// Why a connection's writer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterEnd {
    /// Its queue closed: the connection is ending.
    Done,
    /// The socket failed.
    Failed,
    /// One write took longer than the send timeout: the client stopped reading.
    TimedOut,
}

/// Most frames written before one flush: what is queued goes out together (one write to
/// the socket for many signals when a sender pipelines them), a bounded batch at a time.
const WRITE_BATCH: usize = 64;

/// Writes `frames` to `sink`, whatever is queued at once (up to [`WRITE_BATCH`]) then a
/// flush, each batch within `timeout`, releasing its frames' counted bytes from `queued`
/// once written.
async fn write_frames<K>(
    mut sink: K,
    mut frames: mpsc::UnboundedReceiver<(Message, usize)>,
    queue: Arc<QueuedBytes>,
    timeout: Duration,
) -> WriterEnd
where
    K: Sink<Message> + Unpin,
{
    while let Some((frame, counted)) = frames.recv().await {
        let batch = async {
            let mut written = counted;
            sink.feed(frame).await?;
            for _ in 1..WRITE_BATCH {
                let Ok((frame, counted)) = frames.try_recv() else { break };
                written += counted;
                sink.feed(frame).await?;
            }
            sink.flush().await?;
            Ok::<_, K::Error>(written)
        };
        match tokio::time::timeout(timeout, batch).await {
            Ok(Ok(written)) => queue.release(written),
            Ok(Err(_)) => return WriterEnd::Failed,
            Err(_) => return WriterEnd::TimedOut,
        }
    }
    let _ = tokio::time::timeout(timeout, sink.close()).await;
    WriterEnd::Done
}

/// Runs one WebSocket connection from `ip` to its end. Generic over the socket so tests
/// can drive it with channels.
pub(crate) async fn run_connection<S>(socket: S, state: AppState, ip: IpAddr)
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message> + Unpin + Send,
{
    let limits = state.inner.limits.clone();
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let queue = Arc::new(QueuedBytes::default());
    let conn = match state.connect(Outbox { tx, queue: queue.clone() }, ip) {
        Ok(conn) => conn,
        Err(code) => {
            let text = match code {
                ErrorCode::AddressConnections => format!(
                    "your address has its maximum of {} connections to this server",
                    limits.max_connections_per_ip
                ),
                _ => "the server has its maximum of connections; try again later".to_string(),
            };
            let _ = tokio::time::timeout(limits.send_timeout, async {
                let error = Message::text(signal::encode(&ServerMessage::error(code, &text)));
                let _ = sink.send(error).await;
                let _ = sink.send(close_frame(code, &text)).await;
            })
            .await;
            return;
        }
    };
    tracing::debug!(conn = conn.0, %ip, "connected");
    let (frames, frames_rx) = mpsc::unbounded_channel::<(Message, usize)>();
    let writer = write_frames(sink, frames_rx, queue, limits.send_timeout);
    tokio::pin!(writer);
    let mut writer_end: Option<WriterEnd> = None;
    let mut shutdown = state.inner.shutdown.subscribe();
    let mut fence = state.inner.fence.subscribe();
    let fenced_at = *fence.borrow_and_update();
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
            end = &mut writer, if writer_end.is_none() => {
                writer_end = Some(end);
                if end == WriterEnd::TimedOut {
                    tracing::warn!(conn = conn.0, "a write took too long; dropping the connection");
                    state.inner.metrics.reject(ErrorCode::TooSlow);
                }
                break None;
            }
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
                    let len = text.len();
                    let _ = frames.send((Message::text(text), len));
                }
                Some(Outbound::Fatal { text, code, reason }) => {
                    break Some((Message::text(text), close_frame(code, &reason)));
                }
                None => break Some(fatal(ErrorCode::TooSlow, "connection too slow to keep up")),
            },
            _ = ping.tick() => {
                let _ = frames.send((Message::Ping(Default::default()), 0));
            }
            () = &mut renew, if renew_every.is_some() => {
                let every = renew_every.unwrap_or(Duration::MAX / 4);
                renew.as_mut().reset(tokio::time::Instant::now() + every);
                if let Some(text) = state.renewed_ice(conn) {
                    let _ = frames.send((Message::text(text), 0));
                }
            }
            () = &mut idle => {
                state.inner.metrics.reject(ErrorCode::IdleTimeout);
                break Some(fatal(ErrorCode::IdleTimeout, "nothing received for too long"));
            }
            () = async { let _ = fence.wait_for(|n| *n != fenced_at).await; } => {
                break Some(fatal(
                    ErrorCode::ShuttingDown,
                    "this server lost its place in the cluster; reconnect",
                ));
            }
            () = async { let _ = shutdown.wait_for(|down| *down).await; } => {
                break Some(fatal(ErrorCode::ShuttingDown, "server is shutting down; reconnect shortly"));
            }
        }
    };
    state.disconnect(conn).await;
    if let Some((error, close)) = end {
        let _ = frames.send((error, 0));
        let _ = frames.send((close, 0));
    }
    drop(frames);
    if writer_end.is_none() {
        // What is queued (the reason, the close frame) goes out, each write bounded.
        let _ = (&mut writer).await;
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
