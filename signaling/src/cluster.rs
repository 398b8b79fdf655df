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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use weft_core::signal::{PeerId, RoomId};

use async_nats::jetstream::kv;

/// How long a process's lease outlives its last renewal: its members count as gone
/// after that.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often a process renews its lease and drops members of processes that lost theirs.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Compare-and-set attempts on one room before giving up (each lost one means another
/// process changed the room meanwhile).
const ATTEMPTS: usize = 32;

const ROOMS_BUCKET: &str = "weft_signal_rooms";
const PROCS_BUCKET: &str = "weft_signal_procs";
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

impl Members {
    fn decode(entry: Option<&kv::Entry>) -> Self {
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                // A value no process of ours wrote counts as an empty room (it is replaced
                // at the next change) rather than stopping the room for good.
                serde_json::from_slice(&e.value).unwrap_or_default()
            }
            _ => Self::default(),
        }
    }

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
    /// Processes seen holding a lease at the last look.
    live: Mutex<HashSet<String>>,
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
        let id = format!("{:016x}", rand::random::<u64>());
        let cluster = Self { id, client, rooms, procs, live: Mutex::default() };
        cluster.renew_lease().await?;
        tracing::info!(process = %cluster.id, "joined the cluster");
        Ok(cluster)
    }

    /// This process's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Renews this process's lease.
    pub async fn renew_lease(&self) -> Result<(), ClusterError> {
        self.procs.put(&self.id, Bytes::from_static(b"1")).await.map_err(request)?;
        Ok(())
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
        *self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = live.clone();
        Ok(live)
    }

    /// Whether `process` holds a lease: by the last look, or else by asking (a process
    /// that started since).
    async fn is_live(&self, process: &str) -> Result<bool, ClusterError> {
        if process == self.id
            || self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(process)
        {
            return Ok(true);
        }
        let live = self.procs.get(process).await.map_err(request)?.is_some();
        if live {
            self.live
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(process.to_string());
        }
        Ok(live)
    }

    /// Drops the members of processes without a lease; whether any were.
    async fn prune(&self, members: &mut Members) -> Result<bool, ClusterError> {
        let processes: HashSet<String> = members.members.values().cloned().collect();
        let mut dead = HashSet::new();
        for p in processes {
            if !self.is_live(&p).await? {
                dead.insert(p);
            }
        }
        let before = members.members.len();
        members.members.retain(|_, p| !dead.contains(p));
        Ok(members.members.len() != before)
    }

    /// Changes room `room` with `change` (compare-and-set, retried when another process
    /// changed it meanwhile), after dropping members of dead processes. `change` returns
    /// `Err` to refuse (nothing is written), `Ok(false)` when there is nothing to write.
    async fn change<E>(
        &self,
        room: &RoomId,
        mut change: impl FnMut(&mut Members) -> Result<bool, E>,
    ) -> Result<Result<RoomUpdate, E>, ClusterError> {
        for _ in 0..ATTEMPTS {
            let entry = self.rooms.entry(room.as_str()).await.map_err(request)?;
            let revision = entry.as_ref().map_or(0, |e| e.revision);
            let mut members = Members::decode(entry.as_ref());
            let pruned = self.prune(&mut members).await?;
            let changed = match change(&mut members) {
                Ok(changed) => changed,
                Err(refusal) => return Ok(Err(refusal)),
            };
            if !changed && !pruned {
                return Ok(Ok(RoomUpdate { room: room.clone(), revision, members }));
            }
            let written = if members.members.is_empty() {
                self.rooms
                    .delete_expect_revision(room.as_str(), Some(revision))
                    .await
                    .map(|()| None)
                    .map_err(|e| {
                        (e.kind() == kv::DeleteErrorKind::WrongLastRevision, e.to_string())
                    })
            } else {
                let value = serde_json::to_vec(&members).map_err(request)?;
                self.rooms.update(room.as_str(), value.into(), revision).await.map(Some).map_err(
                    |e| (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string()),
                )
            };
            match written {
                Ok(written) => {
                    // A delete's revision is not returned, only that it is later than
                    // the one it replaced (the watch brings the exact one).
                    let revision = written.unwrap_or(revision + 1);
                    return Ok(Ok(RoomUpdate { room: room.clone(), revision, members }));
                }
                Err((true, _)) => continue,
                Err((false, e)) => return Err(ClusterError::Request(e)),
            }
        }
        Err(ClusterError::Contended)
    }

    /// Adds `peer` (a connection of this process) to `room` unless it has `max` members.
    pub async fn join(
        &self,
        room: &RoomId,
        peer: &PeerId,
        max: usize,
    ) -> Result<RoomUpdate, JoinRefusal> {
        let own = self.id.clone();
        let result = self
            .change(room, |members| {
                if members.members.len() >= max {
                    return Err(());
                }
                members.members.insert(peer.to_string(), own.clone());
                Ok(true)
            })
            .await;
        match result {
            Ok(Ok(update)) => Ok(update),
            Ok(Err(())) => Err(JoinRefusal::Full),
            Err(e) => Err(JoinRefusal::Unavailable(e)),
        }
    }

    /// Removes `peer` (of this process) from `room`.
    pub async fn leave(&self, room: &RoomId, peer: &PeerId) -> Result<(), ClusterError> {
        let _ = self
            .change(room, |members| Ok::<_, ()>(members.members.remove(peer.as_str()).is_some()))
            .await?;
        Ok(())
    }

    /// Drops the members of processes that lost their lease from `room` (the watch then
    /// tells everyone).
    pub async fn sweep(&self, room: &RoomId) -> Result<RoomUpdate, ClusterError> {
        match self.change(room, |_| Ok::<_, std::convert::Infallible>(false)).await? {
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
            Some(RoomUpdate {
                room,
                revision: entry.revision,
                members: Members::decode(Some(&entry)),
            })
        }))
    }
}
