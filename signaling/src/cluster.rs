//! Rooms shared by several `weft-signal` processes through NATS (`--cluster nats://…`):
//! the I/O. Design in `signaling/CLUSTER.md`; in short:
//!
//! - Each process has a random id and a lease: key `<id>` in the JetStream key-value bucket
//!   `weft_signal_procs`, whose entries expire [`LEASE`] after their last write, rewritten
//!   every [`HEARTBEAT`]. A process killed with `kill -9` stops renewing it.
//! - A room's members live in key `<room id>` of bucket `weft_signal_rooms`: each member's
//!   peer id and the process its connection is on. Every change is a compare-and-set on
//!   the key's revision, so a room's limit holds across processes, and members whose
//!   process has no lease are dropped on the way.
//! - Each process watches the room bucket and turns the changes of rooms it has members in
//!   into join and leave events for them ([`crate::relay::Relay::apply_shared`]).
//! - A signal to a member on another process is published to `weft.signal.<its id>`,
//!   already encoded, the room and recipient in headers; that process hands the text to
//!   its connection as it is.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use weft_core::signal::{PeerId, RoomId};

use async_nats::jetstream::kv;

use crate::relay::Limits;

/// How long a process's lease outlives its last renewal: its members count as gone
/// after that.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often a process renews its lease and drops members of processes that lost theirs.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A process counts its lease as lost once this much less than [`LEASE`] is left since it
/// last sent a renewal that succeeded (by its own clock: it may have been stopped), and
/// then neither writes rooms nor keeps its members until it has taken a fresh one.
const FENCE_MARGIN: Duration = Duration::from_secs(1);
/// Compare-and-set attempts on one room before giving up (each lost one means another
/// process changed the room meanwhile).
const ATTEMPTS: usize = 32;

const ROOMS_BUCKET: &str = "weft_signal_rooms";
const PROCS_BUCKET: &str = "weft_signal_procs";
const ADDRS_BUCKET: &str = "weft_signal_addrs";
const SIGNAL_SUBJECT: &str = "weft.signal";
/// Headers of a forwarded signal.
pub(crate) const ROOM_HEADER: &str = "Weft-Room";
pub(crate) const TO_HEADER: &str = "Weft-To";

/// A process of the cluster, by its id.
pub type Process = Arc<str>;

/// Why the cluster could not be reached or used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No connection to the NATS server.
    #[error("cannot connect to NATS at {url}: {detail}")]
    Connect {
        /// The URL given.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The key-value buckets could not be made or opened (is JetStream on? `nats-server -js`).
    #[error("cannot open the cluster's JetStream buckets (run nats-server with -js): {0}")]
    Buckets(String),
    /// A request to NATS failed.
    #[error("NATS request failed: {0}")]
    Request(String),
    /// This process's lease ran out (it stalled, or could not reach NATS, for too long):
    /// it writes no room until it has a fresh one.
    #[error("this process's cluster lease ran out")]
    LeaseLost,
    /// The room stayed contended through every attempt.
    #[error("the room kept changing; gave up after {ATTEMPTS} attempts")]
    Contended,
}

fn request(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Request(e.to_string())
}

/// Why a join was refused.
#[derive(Debug)]
pub enum JoinRefusal {
    /// The room has its maximum of members, cluster-wide.
    Full,
    /// The client's address is in its maximum of rooms, cluster-wide.
    AddressRooms,
    /// The cluster could not be used.
    Unavailable(ClusterError),
}

/// A room's members as stored: peer id to process id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// Member to the process its connection is on.
    #[serde(rename = "m")]
    pub members: BTreeMap<String, String>,
}

/// A value kept in a bucket of the cluster, changed by compare-and-set: what it says per
/// process, so that the members of processes without a lease can be dropped.
trait Stored: Default + Serialize + serde::de::DeserializeOwned {
    /// The processes it names.
    fn processes(&self) -> HashSet<String>;
    /// Drops what belongs to processes in `dead`.
    fn drop_processes(&mut self, dead: &HashSet<String>);
    /// Whether nothing is left (the key is then deleted).
    fn is_empty(&self) -> bool;
}

/// The value of `entry`, or an empty one: a value no process of ours wrote counts as empty
/// (it is replaced at the next change) rather than stopping the key for good.
fn decode<V: Stored>(entry: Option<&kv::Entry>) -> V {
    match entry {
        Some(e) if e.operation == kv::Operation::Put => {
            serde_json::from_slice(&e.value).unwrap_or_default()
        }
        _ => V::default(),
    }
}

impl Stored for Members {
    fn processes(&self) -> HashSet<String> {
        self.members.values().cloned().collect()
    }
    fn drop_processes(&mut self, dead: &HashSet<String>) {
        self.members.retain(|_, p| !dead.contains(p));
    }
    fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// The rooms the connections from one address are in, cluster-wide: room to member to
/// process (key `a<hex of the address>` of bucket `weft_signal_addrs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct AddressRooms {
    #[serde(rename = "r")]
    rooms: BTreeMap<String, BTreeMap<String, String>>,
}

impl Stored for AddressRooms {
    fn processes(&self) -> HashSet<String> {
        self.rooms.values().flat_map(|m| m.values().cloned()).collect()
    }
    fn drop_processes(&mut self, dead: &HashSet<String>) {
        for members in self.rooms.values_mut() {
            members.retain(|_, p| !dead.contains(p));
        }
        self.rooms.retain(|_, members| !members.is_empty());
    }
    fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

/// The key of `ip` in the address bucket (a KV key allows no `:`).
fn address_key(ip: IpAddr) -> String {
    let bytes = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    bytes.iter().fold(String::from("a"), |mut key, b| {
        key.push_str(&format!("{b:02x}"));
        key
    })
}

impl Members {
    /// The members on processes other than `own`.
    pub fn others(&self, own: &str) -> BTreeMap<PeerId, Process> {
        self.members
            .iter()
            .filter(|(_, p)| p.as_str() != own)
            .filter_map(|(m, p)| Some((PeerId::new(m.as_str()).ok()?, Process::from(p.as_str()))))
            .collect()
    }
}

/// A room's state as a process learns it: the key's revision and its members.
#[derive(Debug, Clone)]
pub struct RoomUpdate {
    /// The room.
    pub room: RoomId,
    /// The revision of this state (later states have higher ones).
    pub revision: u64,
    /// Its members.
    pub members: Members,
}

/// A forwarded signal for a member of this process.
#[derive(Debug)]
pub struct Incoming {
    /// The recipient's room.
    pub room: RoomId,
    /// The recipient.
    pub to: PeerId,
    /// The message, encoded, as the recipient's WebSocket gets it.
    pub text: String,
}

/// Opens key-value bucket `name` (memory storage, one value per key, entries expiring
/// after `max_age` unless zero), making it if missing. Made as the stream async-nats's
/// `create_key_value` would make, but directly: that call first reads the account's
/// JetStream info in a shape newer than Debian's nats-server 2.9 sends.
async fn open_bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    max_age: Duration,
) -> Result<kv::Store, ClusterError> {
    use async_nats::jetstream::stream;
    let buckets = |e: &dyn std::fmt::Display| ClusterError::Buckets(e.to_string());
    let config = stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: stream::StorageType::Memory,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    };
    js.get_or_create_stream(config).await.map_err(|e| buckets(&e))?;
    js.get_key_value(name).await.map_err(|e| buckets(&e))
}

/// This process's connection to the cluster.
#[derive(Debug)]
pub struct Cluster {
    id: String,
    client: async_nats::Client,
    rooms: kv::Store,
    procs: kv::Store,
    addrs: kv::Store,
    /// Processes seen holding a lease at the last look.
    live: Mutex<HashSet<String>>,
    /// This process's lease: its revision, and when the renewal that wrote it was sent.
    lease: Mutex<(u64, std::time::Instant)>,
}

/// What renewing the lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The lease was still held, and is renewed.
    Held,
    /// The lease had run out (other processes may have dropped this one's members): a
    /// fresh one is taken, and the members from before must go.
    Lost,
}

impl Cluster {
    /// Connects to the NATS server at `url`, opens (or makes) the buckets and takes a lease.
    pub async fn connect(url: &str) -> Result<Self, ClusterError> {
        let client = async_nats::ConnectOptions::new()
            .name("weft-signal")
            // Never give up reconnecting: the cluster is how this process serves rooms.
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(url);
        let client = tokio::time::timeout(Duration::from_secs(10), client)
            .await
            .map_err(|_| ClusterError::Connect {
                url: url.into(),
                detail: "no answer within 10 s".into(),
            })?
            .map_err(|e| ClusterError::Connect { url: url.into(), detail: e.to_string() })?;
        let js = async_nats::jetstream::new(client.clone());
        let rooms = open_bucket(&js, ROOMS_BUCKET, Duration::ZERO).await?;
        let procs = open_bucket(&js, PROCS_BUCKET, LEASE).await?;
        let addrs = open_bucket(&js, ADDRS_BUCKET, Duration::ZERO).await?;
        let id = format!("{:016x}", rand::random::<u64>());
        let now = std::time::Instant::now();
        let revision = procs.put(&id, Bytes::from_static(b"1")).await.map_err(request)?;
        let lease = Mutex::new((revision, now));
        let live = Mutex::default();
        let cluster = Self { id, client, rooms, procs, addrs, live, lease };
        tracing::info!(process = %cluster.id, "joined the cluster");
        Ok(cluster)
    }

    /// This process's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Renews this process's lease, unless it had run out: then takes a fresh one and says
    /// so (the caller drops the members from before). It counts as run out when the
    /// last renewal is older than the lease less [`FENCE_MARGIN`] by this process's clock
    /// (which a stopped process cannot trust NATS to tell), or when the key is no longer
    /// the one it wrote (a compare-and-set on its revision fails).
    pub async fn renew_lease(&self) -> Result<Renewal, ClusterError> {
        let sent = std::time::Instant::now();
        let (revision, renewed) = *self.lease.lock().unwrap_or_else(PoisonError::into_inner);
        let renewal = if sent.saturating_duration_since(renewed) >= LEASE - FENCE_MARGIN {
            Renewal::Lost
        } else {
            match self.procs.update(&self.id, Bytes::from_static(b"1"), revision).await {
                Ok(revision) => {
                    *self.lease.lock().unwrap_or_else(PoisonError::into_inner) = (revision, sent);
                    return Ok(Renewal::Held);
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Renewal::Lost,
                Err(e) => return Err(request(e)),
            }
        };
        let revision = self.procs.put(&self.id, Bytes::from_static(b"1")).await.map_err(request)?;
        *self.lease.lock().unwrap_or_else(PoisonError::into_inner) = (revision, sent);
        tracing::warn!(process = %self.id, "the cluster lease had run out; took a fresh one");
        Ok(renewal)
    }

    /// Whether this process holds its lease, by its own clock.
    fn holds_lease(&self) -> bool {
        let (_, renewed) = *self.lease.lock().unwrap_or_else(PoisonError::into_inner);
        renewed.elapsed() < LEASE - FENCE_MARGIN
    }

    /// Gives the lease up (a clean stop): other processes drop our members at once.
    pub async fn release_lease(&self) {
        if let Err(e) = self.procs.delete(&self.id).await {
            tracing::warn!("cannot release the cluster lease: {e}");
        }
    }

    /// Looks again at which processes hold a lease; the set of them.
    pub async fn refresh_live(&self) -> Result<HashSet<String>, ClusterError> {
        let mut keys = self.procs.keys().await.map_err(request)?;
        let mut live = HashSet::new();
        while let Some(key) = keys.next().await {
            live.insert(key.map_err(request)?);
        }
        live.insert(self.id.clone());
        *self.live.lock().unwrap_or_else(PoisonError::into_inner) = live.clone();
        Ok(live)
    }

    /// Whether `process` holds a lease: by the last look, or else by asking (a process
    /// that started since).
    async fn is_live(&self, process: &str) -> Result<bool, ClusterError> {
        if process == self.id
            || self.live.lock().unwrap_or_else(PoisonError::into_inner).contains(process)
        {
            return Ok(true);
        }
        let live = self.procs.get(process).await.map_err(request)?.is_some();
        if live {
            self.live.lock().unwrap_or_else(PoisonError::into_inner).insert(process.to_string());
        }
        Ok(live)
    }

    /// Drops what processes without a lease hold in `value`; whether they held any.
    async fn prune(&self, value: &mut impl Stored) -> Result<bool, ClusterError> {
        let mut dead = HashSet::new();
        for p in value.processes() {
            if !self.is_live(&p).await? {
                dead.insert(p);
            }
        }
        value.drop_processes(&dead);
        Ok(!dead.is_empty())
    }

    /// Changes `key` of `store` with `change` (compare-and-set, retried when another
    /// process changed it meanwhile), after dropping what dead processes held. `change`
    /// returns `Err` to refuse (nothing is written), `Ok(false)` when there is nothing to
    /// write. The revision written (or read, when nothing was) and the value.
    async fn change<V: Stored, E>(
        &self,
        store: &kv::Store,
        key: &str,
        mut change: impl FnMut(&mut V) -> Result<bool, E>,
    ) -> Result<Result<(u64, V), E>, ClusterError> {
        for _ in 0..ATTEMPTS {
            // Fencing: a process whose lease ran out may have had its members dropped; it
            // must not write them (or anything) back before it takes a fresh lease.
            if !self.holds_lease() {
                return Err(ClusterError::LeaseLost);
            }
            let entry = store.entry(key).await.map_err(request)?;
            let revision = entry.as_ref().map_or(0, |e| e.revision);
            let mut value: V = decode(entry.as_ref());
            let pruned = self.prune(&mut value).await?;
            let changed = match change(&mut value) {
                Ok(changed) => changed,
                Err(refusal) => return Ok(Err(refusal)),
            };
            if !changed && !pruned {
                return Ok(Ok((revision, value)));
            }
            let written = if value.is_empty() {
                store.delete_expect_revision(key, Some(revision)).await.map(|()| None).map_err(
                    |e| (e.kind() == kv::DeleteErrorKind::WrongLastRevision, e.to_string()),
                )
            } else {
                let bytes = serde_json::to_vec(&value).map_err(request)?;
                store.update(key, bytes.into(), revision).await.map(Some).map_err(|e| {
                    (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string())
                })
            };
            match written {
                // A delete's revision is not returned, only that it is later than the one
                // it replaced (the watch brings the exact one).
                Ok(written) => return Ok(Ok((written.unwrap_or(revision + 1), value))),
                Err((true, _)) => continue,
                Err((false, e)) => return Err(ClusterError::Request(e)),
            }
        }
        Err(ClusterError::Contended)
    }

    /// [`Cluster::change`] of room `room`.
    async fn change_room<E>(
        &self,
        room: &RoomId,
        change: impl FnMut(&mut Members) -> Result<bool, E>,
    ) -> Result<Result<RoomUpdate, E>, ClusterError> {
        let changed = self.change(&self.rooms, room.as_str(), change).await?;
        Ok(changed.map(|(revision, members)| RoomUpdate { room: room.clone(), revision, members }))
    }

    /// Counts `peer` of this process as in `room` for address `ip`, unless that address
    /// is in `max` other rooms cluster-wide already.
    async fn enter_address(
        &self,
        ip: IpAddr,
        room: &RoomId,
        peer: &PeerId,
        max: usize,
    ) -> Result<Result<(), ()>, ClusterError> {
        let own = self.id.clone();
        let changed = self
            .change(&self.addrs, &address_key(ip), |addr: &mut AddressRooms| {
                if !addr.rooms.contains_key(room.as_str()) && addr.rooms.len() >= max {
                    return Err(());
                }
                let members = addr.rooms.entry(room.to_string()).or_default();
                members.insert(peer.to_string(), own.clone());
                Ok(true)
            })
            .await?;
        Ok(changed.map(drop))
    }

    /// No longer counts `peer` in `room` for address `ip`.
    async fn leave_address(
        &self,
        ip: IpAddr,
        room: &RoomId,
        peer: &PeerId,
    ) -> Result<(), ClusterError> {
        let _ = self
            .change(&self.addrs, &address_key(ip), |addr: &mut AddressRooms| {
                let Some(members) = addr.rooms.get_mut(room.as_str()) else { return Ok(false) };
                let removed = members.remove(peer.as_str()).is_some();
                if members.is_empty() {
                    addr.rooms.remove(room.as_str());
                }
                Ok::<_, ()>(removed)
            })
            .await?;
        Ok(())
    }

    /// Adds `peer` (a connection of this process, from `ip`) to `room`, unless the room
    /// has `limits.max_peers_per_room` members or the address is in
    /// `limits.max_rooms_per_ip` other rooms, both cluster-wide.
    pub async fn join(
        &self,
        room: &RoomId,
        peer: &PeerId,
        ip: IpAddr,
        limits: &Limits,
    ) -> Result<RoomUpdate, JoinRefusal> {
        match self.enter_address(ip, room, peer, limits.max_rooms_per_ip).await {
            Ok(Ok(())) => {}
            Ok(Err(())) => return Err(JoinRefusal::AddressRooms),
            Err(e) => return Err(JoinRefusal::Unavailable(e)),
        }
        let own = self.id.clone();
        let max = limits.max_peers_per_room;
        let result = self
            .change_room(room, |members| {
                if members.members.len() >= max {
                    return Err(());
                }
                members.members.insert(peer.to_string(), own.clone());
                Ok(true)
            })
            .await;
        if !matches!(result, Ok(Ok(_))) {
            if let Err(e) = self.leave_address(ip, room, peer).await {
                tracing::warn!("cannot undo a refused join's address entry: {e}");
            }
        }
        match result {
            Ok(Ok(update)) => Ok(update),
            Ok(Err(())) => Err(JoinRefusal::Full),
            Err(e) => Err(JoinRefusal::Unavailable(e)),
        }
    }

    /// Removes `peer` (of this process, from `ip`) from `room`.
    pub async fn leave(
        &self,
        room: &RoomId,
        peer: &PeerId,
        ip: IpAddr,
    ) -> Result<(), ClusterError> {
        let _ = self
            .change_room(room, |members| {
                Ok::<_, ()>(members.members.remove(peer.as_str()).is_some())
            })
            .await?;
        self.leave_address(ip, room, peer).await
    }

    /// Drops the members of processes that lost their lease from `room` (the watch then
    /// tells everyone).
    pub async fn sweep(&self, room: &RoomId) -> Result<RoomUpdate, ClusterError> {
        match self.change_room(room, |_| Ok::<_, std::convert::Infallible>(false)).await? {
            Ok(update) => Ok(update),
            Err(never) => match never {},
        }
    }

    /// Sends `text` (an encoded server message) to member `to` of `room` on `process`.
    pub async fn forward(
        &self,
        process: &str,
        room: &RoomId,
        to: &PeerId,
        text: String,
    ) -> Result<(), ClusterError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(ROOM_HEADER, room.as_str());
        headers.insert(TO_HEADER, to.as_str());
        self.client
            .publish_with_headers(format!("{SIGNAL_SUBJECT}.{process}"), headers, text.into())
            .await
            .map_err(request)
    }

    /// Signals forwarded to members of this process, as they come.
    pub async fn incoming(
        &self,
    ) -> Result<impl futures_util::Stream<Item = Incoming> + use<>, ClusterError> {
        let subscriber = self
            .client
            .subscribe(format!("{SIGNAL_SUBJECT}.{}", self.id))
            .await
            .map_err(request)?;
        Ok(subscriber.filter_map(|msg| async move {
            let headers = msg.headers.as_ref()?;
            let room = RoomId::new(headers.get(ROOM_HEADER)?.as_str()).ok()?;
            let to = PeerId::new(headers.get(TO_HEADER)?.as_str()).ok()?;
            let text = String::from_utf8(msg.payload.to_vec()).ok()?;
            Some(Incoming { room, to, text })
        }))
    }

    /// Every change of every room from now on.
    pub async fn room_updates(
        &self,
    ) -> Result<impl futures_util::Stream<Item = RoomUpdate> + use<>, ClusterError> {
        let watch = self.rooms.watch_all().await.map_err(request)?;
        Ok(watch.filter_map(|entry| async move {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!("cluster room watch: {e}");
                    return None;
                }
            };
            let room = RoomId::new(entry.key.as_str()).ok()?;
            Some(RoomUpdate { room, revision: entry.revision, members: decode(Some(&entry)) })
        }))
    }
}
