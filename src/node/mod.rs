//! The I/O shell around the pure core: the service every dialect calls, routing, the
//! writer thread, sync tasks, view changes.
//!
//! # Design
//!
//! A [`Node`] owns its store and, at any moment, a [`Current`] layout: its view (none
//! while it is in no cluster), the transition of a view change in progress, and, when it
//! is a replica, a handle on its replica. The layout is swapped whole when a view change
//! is learned or installed; requests in flight keep the layout they started with and
//! are re-routed once if the epoch moved under them.
//!
//! This file holds the node itself: its state, starting and stopping it, the layout and
//! the accessors the other files share. One file per concept besides:
//!
//! * **The service** (`service.rs`): get, put and delete for the dialects, in
//!   dialect-neutral types; a replica's local read and write paths, which wait for it to
//!   catch up with the client's causal token; encoding and checking those tokens.
//! * **Quorums** (`quorum.rs`): a write at level `w` waits for its peers' reports that
//!   they applied it; a read at level `r` folds its peers' state of the key into the
//!   client's token before reading.
//! * **Routing** (`routing.rs`): forwarding requests for partitions this node does not
//!   hold to their replicas, hedged reads, probes of replicas believed dead, and the
//!   calls every other file makes to peers.
//! * **Dispatch** (`dispatch.rs`): the internal calls peers make, each handed to the
//!   code that serves it.
//! * **Status** (`status.rs`): what the node reports about itself.
//! * **The writer** (`writer/`, one OS thread) is the only code that opens write
//!   transactions: client writes, sync pages, view-change steps, all group-committed.
//! * **Sync** (`sync.rs`): per peer of the partition a puller (asks for what this replica
//!   lacks every [`SYNC_INTERVAL`], at once when poked, and when a read needs to catch
//!   up) and a poker (tells the peer to pull after local writes); a log trimmer.
//! * **Digest rounds** (`digests.rs`): per peer, every [`DIGEST_INTERVAL`], compare
//!   Merkle digests of the replicas' states and fetch the keys of the slots that
//!   differ (state-based anti-entropy, `crate::merkle`).
//! * **Stabilization** (`stabilize.rs`): with `--auto-replace-after`, a member dead that
//!   long is replaced by a spare node.
//! * **Heartbeats** (`heartbeat.rs`): pings to every other member feed the failure
//!   detector (`cluster.rs`) that orders the replicas a request is forwarded to.
//! * **The cluster key** (`keys.rs`): which calls a node admits, how a forming cluster
//!   draws its key and how members hand it to each other, the admin token.
//! * **View changes** (`reconfig/`): coordinating `update_view`, the Paxos acceptor,
//!   learning, draining, pulling and installing views, and the background tasks that
//!   re-drive a stalled change, collect handed-over slots and catch up with newer views.

mod context;
mod digests;
mod dispatch;
mod heartbeat;
mod join;
mod keys;
mod listing;
mod quorum;
mod reconfig;
mod routing;
mod service;
mod shards;
mod stabilize;
mod status;
mod sync;
mod writer;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;

pub use digests::DIGEST_INTERVAL;
pub use join::JoinPlan;
pub use keys::{Keys, Refusal, KEY_WAIT};
pub use listing::{Listing, MAX_PAGE, SCAN_BUDGET};
pub use quorum::QUORUM_WAIT;
pub use reconfig::{Progress, VIEW_CATCHUP_WAIT};
pub use routing::{
    DEAD_PEER_PROBE_INTERVAL_MS, DEAD_PEER_TIMEOUT, FORWARD_TIMEOUT, HEDGE_AFTER, MAX_FORWARDS,
};
pub use service::{CATCHUP_WAIT, MAX_KEY_BYTES, MAX_VALUE_BYTES};
pub use status::Gauges;
pub use sync::{SYNC_INTERVAL, SYNC_PAGE_BYTES, SYNC_PAGE_ENTRIES, SYNC_TIMEOUT};
pub use writer::{DiskFault, ReplicaStatus, WRITER_QUEUE};

use crate::auth::ClusterKey;
use crate::clock::{PartitionUid, ReplicaId, VersionVector};
use crate::cluster::Liveness;
use crate::error::{Error, Result};
use crate::placement::{Role, SlotSet, View};
use crate::quorum::Levels;
use crate::rpc::{Response, Transport};
use crate::storage::digest_cache::{DigestCache, TrackedStore};
use crate::storage::Store;
use crate::viewchange::{Acceptor, PullKey, PullProgress, Transition};
use writer::{Durable, Publish, WriterCmd};

/// Resolves on Ctrl-C or SIGTERM (what `docker stop` and service managers send).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

/// Milliseconds on a monotonic clock (since the process first asked): what the failure
/// detector measures silences with, immune to wall-clock steps.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// Microseconds since the Unix epoch; the shell's clock, passed into the core to stamp
/// writes. Microseconds, not milliseconds: writes to one key accepted at two replicas
/// a fraction of a millisecond apart (a client that writes on both sides of a
/// partition) must still be ordered as they happened when the partition heals.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The replica side of a node in its current view.
struct ReplicaHandle {
    partition: PartitionUid,
    id: ReplicaId,
    /// The other replicas of the partition, with the notify that wakes their puller.
    peers: Vec<(String, Arc<Notify>)>,
    /// Slots the partition owns in the current view.
    owned: SlotSet,
    /// What each peer last said it has (from its sync requests); decides log trimming
    /// and which peers acknowledged a quorum write.
    peer_have: Mutex<BTreeMap<String, VersionVector>>,
    /// Quorum writes waiting for their peers' reports (see `quorum.rs`).
    ack_waiters: AtomicUsize,
    /// Woken whenever a peer reports how far it is.
    acked: Notify,
    /// Page fetches in flight (pulls, state transfers, digest repairs), by the trim round
    /// they began in (see `sync::FetchGuard`).
    fetches: Mutex<BTreeMap<u64, usize>>,
    /// The trimmer's current round.
    trim_round: std::sync::atomic::AtomicU64,
}

/// What a node routes by: swapped whole on every view-change step it takes.
pub struct Current {
    view: Option<Arc<View>>,
    transition: Option<Arc<Transition>>,
    replica: Option<Arc<ReplicaHandle>>,
}

impl Current {
    fn view(&self) -> Result<&Arc<View>> {
        self.view.as_ref().ok_or_else(|| {
            Error::unavailable(
                "this node is not part of a cluster yet: add it to the cluster through one of its members",
            )
        })
    }

    fn epoch(&self) -> u64 {
        self.view.as_ref().map_or(0, |v| v.epoch)
    }

    fn local(&self, partition: PartitionUid) -> Option<&Arc<ReplicaHandle>> {
        self.replica.as_ref().filter(|r| r.partition == partition)
    }

    /// Whether `addr` takes part in this node's cluster now: a member of its view or of
    /// either side of its transition.
    fn knows(&self, addr: &str) -> bool {
        self.view.as_ref().is_some_and(|v| v.is_member(addr))
            || self
                .transition
                .as_ref()
                .is_some_and(|t| t.from().is_member(addr) || t.to().is_member(addr))
    }
}

/// What the writer hands back after a step that changes the layout.
#[derive(Clone)]
struct Layout {
    view: Option<Arc<View>>,
    transition: Option<Arc<Transition>>,
    replica: Option<(PartitionUid, ReplicaId)>,
    cluster_key: Option<ClusterKey>,
}

/// Everything `Node::start` needs.
pub struct NodeConfig {
    pub addr: String,
    /// The view from VIEW and K, used when the data directory holds none.
    pub env_view: Option<View>,
    /// The K the node was started with (checked when it is added to a cluster).
    pub k: Option<usize>,
    /// `CLUSTER_SECRET` (or the public default): the outer gate of the internal endpoint.
    pub secret: String,
    /// `ADMIN_TOKEN`: when set, membership changes need it.
    pub admin_token: Option<String>,
    /// For a node with no view of its own (none stored, no `env_view`): where to find
    /// its cluster and what to form when there is none (`join`).
    pub join: Option<JoinPlan>,
    /// `R` and `W`: the levels of client requests that name none.
    pub levels: Levels,
    /// How old a tombstone every replica has must be before it is collected.
    pub tombstone_horizon: Duration,
    /// Replace a member dead this long by a spare (`None`: never; see `stabilize.rs`).
    pub auto_replace_after: Option<Duration>,
}

/// One kvs server. See the module doc.
pub struct Node {
    addr: String,
    k: Option<usize>,
    store: Arc<dyn Store>,
    /// Slot digests kept between anti-entropy rounds (`storage::digest_cache`).
    digests: Arc<DigestCache>,
    transport: Arc<dyn Transport>,
    secret: String,
    admin_token: Option<String>,
    /// The levels of client requests that name none.
    levels: Levels,
    /// See [`NodeConfig::tombstone_horizon`].
    tombstone_horizon: Duration,
    /// See [`NodeConfig::auto_replace_after`].
    auto_replace_after: Option<Duration>,
    /// The cluster key and what derives from it (`None` until this node has it); swapped
    /// whole. Plain lock: held to clone or swap the `Arc`, never across an await.
    keys: RwLock<Option<Arc<Keys>>>,
    /// Woken when this node obtains a key.
    keys_changed: Notify,
    /// Nonces of key requests in flight, recent deliveries (see `keys`).
    exchange: Mutex<keys::Exchange>,
    /// Woken when a member asks this keyless node for the key: the asker may be about
    /// to draw it, so the next round of requests should not wait out a long pause.
    key_asked: tokio::sync::Notify,
    /// Whether the task obtaining the key runs.
    acquiring_key: AtomicBool,
    writer: mpsc::Sender<WriterCmd>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    replica_status: watch::Receiver<Option<Arc<ReplicaStatus>>>,
    local_writes: watch::Receiver<u64>,
    /// Set by the writer while this node's disk refuses writes.
    disk: watch::Receiver<Option<Arc<DiskFault>>>,
    /// Plain lock: held to clone or swap an `Arc`, never across an await.
    current: RwLock<Arc<Current>>,
    /// Plain mutex: held for a map lookup or update, never across an await.
    liveness: Mutex<Liveness>,
    forwards: Semaphore,
    /// Rotates the first replica tried, spreading forwarded load.
    next_peer: AtomicUsize,
    /// Serializes learning and installing views on this node (async: held across the
    /// writer's answer).
    reconfig: tokio::sync::Mutex<()>,
    /// One `update_view` coordinated by this node at a time.
    coordinating: tokio::sync::Mutex<()>,
    /// The Paxos acceptor state (`None` until first used), behind an async lock so each
    /// answer is persisted before the next is computed.
    acceptor: tokio::sync::Mutex<Option<Acceptor>>,
    /// Serializes the steps of each pull (its progress is read, advanced and persisted
    /// by one step at a time); different pulls run in parallel, so a node holds at most
    /// one page per pull in memory. Cleared when a view is installed.
    pulling: Mutex<BTreeMap<PullKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Progress of this node's pulls since the transition was learned or loaded.
    pull_progress: Mutex<BTreeMap<PullKey, PullProgress>>,
    /// The view change this node coordinates (or last coordinated), for status.
    progress: Mutex<Option<Progress>>,
    /// When a view was last fetched from or pushed to each peer (debounce).
    gossip: Mutex<BTreeMap<String, Instant>>,
    /// When each peer believed dead was last probed by a forwarded request.
    probes: Mutex<BTreeMap<String, u64>>,
    /// When the transition this node is in last showed activity here (learned, drained,
    /// pulled, read from): a transition idle for long is re-driven.
    learned_at: Mutex<Option<Instant>>,
    /// Pullers, pokers and trimmer of the current replica; replaced on a view change.
    replica_tasks: Mutex<JoinSet<()>>,
    /// Background tasks for the node's life.
    tasks: Mutex<JoinSet<()>>,
    /// What the digest rounds (state-based anti-entropy) did.
    digest_stats: digests::DigestStats,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every value behind these mutexes is consistent between statements (advisory maps,
    // task sets); a panic while one was held cannot leave it half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Node {
    /// Loads the node's state, starts its writer and workers.
    pub fn start(
        cfg: NodeConfig,
        store: Arc<dyn Store>,
        transport: Arc<dyn Transport>,
    ) -> Result<Arc<Node>> {
        let join = cfg.join;
        // Every write goes through the writer's store, so this wrapper sees each slot a
        // write changes and the digest cache forgets its digest.
        let digests = Arc::new(DigestCache::new());
        let store: Arc<dyn Store> = Arc::new(TrackedStore::new(store, digests.clone()));
        let durable = Durable::load(&*store, &cfg.addr, cfg.env_view)?;
        let layout = durable.layout();
        let acceptor = durable.acceptor.clone();
        let (replica_tx, replica_rx) = watch::channel(durable.replica_status().map(Arc::new));
        let (writes_tx, writes_rx) = watch::channel(0u64);
        let (disk_tx, disk_rx) = watch::channel(None);
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let writer_store = store.clone();
        let publish = Publish {
            replica: replica_tx,
            local_writes: writes_tx,
            disk: disk_tx,
        };
        let handle = std::thread::Builder::new()
            .name("kvs-writer".into())
            .spawn(move || writer::writer_loop(writer_store, durable, rx, publish))
            .map_err(|e| Error::internal(format!("spawning the writer thread: {e}")))?;
        let node = Arc::new(Node {
            addr: cfg.addr,
            k: cfg.k,
            store,
            digests,
            transport,
            secret: cfg.secret,
            admin_token: cfg.admin_token,
            levels: cfg.levels,
            tombstone_horizon: cfg.tombstone_horizon,
            auto_replace_after: cfg.auto_replace_after,
            keys: RwLock::new(None),
            keys_changed: Notify::new(),
            exchange: Mutex::new(keys::Exchange::default()),
            key_asked: tokio::sync::Notify::new(),
            acquiring_key: AtomicBool::new(false),
            writer: tx,
            writer_thread: Mutex::new(Some(handle)),
            replica_status: replica_rx,
            local_writes: writes_rx,
            disk: disk_rx,
            current: RwLock::new(Arc::new(Current {
                view: None,
                transition: None,
                replica: None,
            })),
            liveness: Mutex::new(Liveness::default()),
            forwards: Semaphore::new(MAX_FORWARDS),
            next_peer: AtomicUsize::new(0),
            reconfig: tokio::sync::Mutex::new(()),
            coordinating: tokio::sync::Mutex::new(()),
            acceptor: tokio::sync::Mutex::new(Some((*acceptor).clone())),
            pulling: Mutex::new(BTreeMap::new()),
            pull_progress: Mutex::new(BTreeMap::new()),
            progress: Mutex::new(None),
            gossip: Mutex::new(BTreeMap::new()),
            probes: Mutex::new(BTreeMap::new()),
            learned_at: Mutex::new(None),
            replica_tasks: Mutex::new(JoinSet::new()),
            tasks: Mutex::new(JoinSet::new()),
            digest_stats: Default::default(),
        });
        node.apply_layout(layout);
        node.start_background();
        if let Some(plan) = join {
            if node.view().is_none() {
                node.spawn_join(plan);
            }
        }
        Ok(node)
    }

    /// Stops background tasks and lets the writer finish its batch.
    pub async fn shutdown(&self) {
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        let mut replica_tasks = std::mem::take(&mut *lock(&self.replica_tasks));
        tasks.abort_all();
        replica_tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        while replica_tasks.join_next().await.is_some() {}
        let _ = self.writer.send(WriterCmd::Stop).await;
        let handle = lock(&self.writer_thread).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The layout requests are routed by now.
    pub fn current(&self) -> Arc<Current> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why this node's disk refuses writes, while it does.
    pub fn disk_fault(&self) -> Option<Arc<DiskFault>> {
        self.disk.borrow().clone()
    }

    /// The node's view, or `None` while it is in no cluster.
    pub fn view(&self) -> Option<Arc<View>> {
        self.current().view.clone()
    }

    pub fn epoch(&self) -> u64 {
        self.current().epoch()
    }

    /// This node's role in its view (`None` while it is in no cluster).
    pub fn role(&self) -> Option<Role> {
        let cur = self.current();
        let view = cur.view.as_ref()?;
        view.role_of(&self.addr)
    }

    /// Swaps in a new layout; restarts the replica's workers if the replica or its view
    /// changed.
    fn apply_layout(self: &Arc<Self>, layout: Layout) {
        let old = self.current();
        let same_replica = |h: &ReplicaHandle| {
            layout.replica == Some((h.partition, h.id))
                && old.epoch() == layout.view.as_ref().map_or(0, |v| v.epoch)
        };
        let replica = match (&layout.view, layout.replica) {
            (Some(view), Some((partition, id))) => match &old.replica {
                Some(h) if same_replica(h) => Some(h.clone()),
                _ => Some(Arc::new(ReplicaHandle {
                    partition,
                    id,
                    peers: view
                        .replicas_of(partition)
                        .unwrap_or_default()
                        .iter()
                        .filter(|a| **a != self.addr)
                        .map(|a| (a.clone(), Arc::new(Notify::new())))
                        .collect(),
                    owned: view.slots_of(partition),
                    peer_have: Mutex::new(BTreeMap::new()),
                    ack_waiters: AtomicUsize::new(0),
                    acked: Notify::new(),
                    fetches: Mutex::new(BTreeMap::new()),
                    trim_round: Default::default(),
                })),
            },
            _ => None,
        };
        let restart = match (&old.replica, &replica) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (None, None) => false,
            _ => true,
        };
        let cur = Arc::new(Current {
            view: layout.view,
            transition: layout.transition,
            replica: replica.clone(),
        });
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = cur;
        self.adopt_key(layout.cluster_key.as_ref());
        self.spawn_key_acquisition();
        if restart {
            let mut tasks = JoinSet::new();
            if let Some(r) = replica {
                sync::spawn_replica_tasks(self, &r, &mut tasks);
            }
            // Dropping the old set aborts the old replica's workers.
            *lock(&self.replica_tasks) = tasks;
        }
    }

    /// Starts the tasks that run for the node's life.
    fn start_background(self: &Arc<Self>) {
        if self.current().transition.is_some() {
            *lock(&self.learned_at) = Some(Instant::now());
        }
        let mut tasks = lock(&self.tasks);
        tasks.spawn(reconfig::redrive_loop(self.clone()));
        tasks.spawn(heartbeat::heartbeat_loop(self.clone()));
        if let Some(after) = self.auto_replace_after {
            tasks.spawn(stabilize::auto_replace_loop(self.clone(), after));
        }
        // A node that was down may have missed view changes: ask the members once (a
        // node still waiting for the cluster key asks once it has it).
        if self.keys().is_some() {
            let node = self.clone();
            tasks.spawn(async move { node.learn_from_members().await });
        }
        drop(tasks);
        self.spawn_gc();
    }

    fn liveness(&self) -> std::sync::MutexGuard<'_, Liveness> {
        lock(&self.liveness)
    }

    async fn send_writer(&self, cmd: WriterCmd) -> Result<()> {
        self.writer
            .send(cmd)
            .await
            .map_err(|_| Error::unavailable("the node is shutting down"))
    }

    /// The published state of replica incarnation `r`, if it is still the current one.
    fn status_of(&self, r: &ReplicaHandle) -> Option<Arc<ReplicaStatus>> {
        self.replica_status
            .borrow()
            .clone()
            .filter(|s| s.id == r.id && s.partition == r.partition)
    }
}

fn unexpected(resp: &Response) -> Error {
    Error::internal(format!("unexpected answer from a peer: {resp:?}"))
}
