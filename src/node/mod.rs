//! The I/O shell around the pure core: the writer thread, sync tasks, view changes,
//! routing, HTTP.
//!
//! # Design
//!
//! A [`Node`] owns its store and, at any moment, a [`Current`] layout: its view (none
//! while it is in no cluster), the transition of a view change in progress, and, when it
//! is a replica, a handle on its replica. The layout is swapped whole when a view change
//! is learned or installed; requests in flight keep the layout they started with and
//! are re-routed once if the epoch moved under them.
//!
//! * **The writer** (`writer.rs`, one OS thread) is the only code that opens write
//!   transactions: client writes, sync pages, view-change steps, all group-committed.
//! * **Sync** (`sync.rs`): per peer of the partition a puller (asks for what this replica
//!   lacks every [`SYNC_INTERVAL`], at once when poked, and when a read needs to catch
//!   up) and a poker (tells the peer to pull after local writes); a log trimmer.
//! * **Heartbeats** (`heartbeat.rs`): pings to every other member feed the failure
//!   detector (`cluster.rs`) that orders the replicas a request is forwarded to.
//! * **The cluster key** (`keys.rs`): which calls a node admits, how a forming cluster
//!   draws its key and how members hand it to each other, the admin token.
//! * **View changes** (`reconfig.rs`): coordinating `update_view`, the Paxos acceptor,
//!   learning, draining, pulling and installing views, and the background tasks that
//!   re-drive a stalled change, collect handed-over slots and catch up with newer views.
//!
//! Requests for a key whose partition this node does not hold (or any key, on a proxy)
//! are forwarded to that partition's replicas, trusted ones first (see `cluster`), under a
//! global cap on forwards in flight ([`MAX_FORWARDS`]). A replica believed dead is
//! probed by one request per [`DEAD_PEER_PROBE_INTERVAL_MS`]; the others skip it, so a
//! cut-off partition fails its clients fast instead of holding each for a timeout. During a view change requests are
//! routed by the old view; writes to slots that are moving get a retryable
//! "unavailable".
//!
//! A read whose causal token this replica cannot yet satisfy pokes its pullers and waits
//! up to [`CATCHUP_WAIT`] for its vectors to catch up; then it asks a peer; only then does
//! it fail with a retryable "unavailable". A write is held to the same rule (see
//! `Replica::accepts_write`): after the wait it goes to another replica, or fails
//! without being applied. A token from a newer view than this node's
//! makes the node learn that view first ([`VIEW_CATCHUP_WAIT`]).
//!
//! # Caveats
//!
//! * A forwarded write whose replica may have received it but did not answer (timeout,
//!   connection lost), or that answered `ErrorKind::OutcomeUnknown` (its disk failed
//!   during the commit), is not retried elsewhere: the client gets a 503 and the write may
//!   still be applied later, as a sibling concurrent with the client's later writes (see
//!   `Node::forward` for why a retry would be worse). The nemesis found this: a retried
//!   write applied a second time after a partition healed brought an old value back.

mod context;
mod heartbeat;
mod join;
mod keys;
mod reconfig;
mod shards;
mod status;
mod sync;
mod writer;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::task::JoinSet;

pub use keys::{Keys, Refusal, KEY_WAIT};
pub use reconfig::{ChangeOutcome, Progress};
pub use writer::{DiskFault, ReplicaStatus};

use crate::auth::ClusterKey;
use crate::clock::{CausalToken, PartitionUid, ReplicaId, VersionVector};
use crate::cluster::{Health, Liveness};
use crate::error::{Error, ErrorKind, Result};
use crate::placement::{slot_of, Role, SlotSet, View};
use crate::replica::{Replica, WriteRequest};
use crate::rpc::{
    CallError, Envelope, NodeStatus, ReadReply, Request, Response, Transport, WriteReply,
};
use crate::storage::Store;
use crate::viewchange::{Acceptor, PullKey, PullProgress, Transition};
use writer::{Durable, Publish, WriterCmd};

/// How often a replica asks each peer for news when nothing pokes it. Bounds convergence
/// time after a peer comes back even if every poke was lost.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(200);
/// Timeout of one sync call; pages are small, so a slow answer means a sick peer.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(2);
/// Entries and bytes per sync or transfer page: small enough to keep memory flat and one
/// commit short, large enough that catching up 100k writes takes a few hundred round
/// trips.
pub const SYNC_PAGE_ENTRIES: u32 = 1_000;
pub const SYNC_PAGE_BYTES: u32 = 4 * 1024 * 1024;
/// How long a read waits for its replica to catch up with the client's token.
pub const CATCHUP_WAIT: Duration = Duration::from_millis(1_000);
/// How long a request waits for this node to learn the newer view its token names.
pub const VIEW_CATCHUP_WAIT: Duration = Duration::from_secs(2);
/// Timeout of one forwarded client request: above [`CATCHUP_WAIT`], so a replica that is
/// catching up answers before we give up on it.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);
/// A forwarded request not answered within this is also sent to the next replica.
/// Above [`CATCHUP_WAIT`], so a replica that is catching up answers before we hedge.
pub const HEDGE_AFTER: Duration = Duration::from_millis(1_200);
/// Timeout of a forwarded request to a replica the failure detector believes dead.
pub const DEAD_PEER_TIMEOUT: Duration = Duration::from_millis(300);
/// A replica believed dead is probed by at most one forwarded request this often; the
/// others skip it and fail fast, rather than each spending [`DEAD_PEER_TIMEOUT`] on it.
pub const DEAD_PEER_PROBE_INTERVAL_MS: u64 = 250;
/// Forwarded requests in flight at once; beyond it clients get a retryable 503.
pub const MAX_FORWARDS: usize = 1_024;
/// Writer queue length: when full, request handlers wait (backpressure).
pub const WRITER_QUEUE: usize = 4_096;

/// Longest key the node accepts from any dialect or peer. Dialects have stricter rules
/// (200 characters for `/kv-store`); this bounds what reaches storage whatever the path.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value the node accepts from any dialect or peer (seeds store 1.5 MB values).
pub const MAX_VALUE_BYTES: usize = 2 * 1024 * 1024;

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

fn check_bounds(key: &str, value: Option<&[u8]>) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(Error::bad_request(format!(
            "key must be 1 to {MAX_KEY_BYTES} bytes"
        )));
    }
    if value.is_some_and(|v| v.len() > MAX_VALUE_BYTES) {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!("value is larger than {MAX_VALUE_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Milliseconds on a monotonic clock (since the process first asked): what the failure
/// detector measures silences with, immune to wall-clock steps.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Milliseconds since the Unix epoch; the shell's clock, passed into the core.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
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
    /// What each peer last said it has (from its sync requests); decides log trimming.
    peer_have: Mutex<BTreeMap<String, VersionVector>>,
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
    /// For a node with no view of its own (none stored, no `env_view`): the addresses to
    /// find its cluster at and the view to form when none answers (`join`).
    pub join: Option<(Vec<String>, View)>,
}

/// One kvs server. See the module doc.
pub struct Node {
    addr: String,
    k: Option<usize>,
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    secret: String,
    admin_token: Option<String>,
    /// The cluster key and what derives from it (`None` until this node has it); swapped
    /// whole. Plain lock: held to clone or swap the `Arc`, never across an await.
    keys: RwLock<Option<Arc<Keys>>>,
    /// Woken when this node obtains a key.
    keys_changed: Notify,
    /// Nonces of key requests in flight, recent deliveries (see `keys`).
    exchange: Mutex<keys::Exchange>,
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
            transport,
            secret: cfg.secret,
            admin_token: cfg.admin_token,
            keys: RwLock::new(None),
            keys_changed: Notify::new(),
            exchange: Mutex::new(keys::Exchange::default()),
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
        });
        node.apply_layout(layout);
        node.start_background();
        if let Some((addresses, formed)) = join {
            if node.view().is_none() {
                node.spawn_join(addresses, formed);
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

    /// Parses a client's causal token: it must be one this cluster issued, unaltered.
    /// Waits (up to [`KEY_WAIT`]) while this node obtains the cluster key.
    pub async fn parse_token(&self, text: &str) -> Result<CausalToken> {
        self.current().view()?;
        let keys = self.wait_for_keys().await?;
        CausalToken::decode(text, keys.id, &keys.token_key)
            .map_err(|e| Error::bad_request(e.to_string()))
    }

    /// Encodes a token for a client, stamped with this node's epoch and without entries
    /// of partitions that no longer exist. Fails only on a node without the cluster key
    /// (one that never parsed the client's token).
    pub fn encode_token(&self, token: &CausalToken) -> Result<String> {
        let keys = self.keys().ok_or_else(|| {
            Error::unavailable("this node has not yet received its cluster's key; retry shortly")
        })?;
        let cur = self.current();
        let mut token = token.clone();
        token.observe_epoch(cur.epoch());
        // Only prune when this node is at least as new as everything the client saw: a
        // uid missing here could otherwise be a partition of a view we do not know yet.
        if token.epoch <= cur.epoch() {
            if let Some(view) = &cur.view {
                let next = cur.transition.as_ref().map(|t| t.to());
                token.retain_partitions(|uid| {
                    view.replicas_of(uid).is_some()
                        || next.is_some_and(|n| n.replicas_of(uid).is_some())
                });
            }
        }
        Ok(token.encode(&keys.token_key))
    }

    fn liveness(&self) -> std::sync::MutexGuard<'_, Liveness> {
        lock(&self.liveness)
    }

    /// Sends `env` to `peer` over the transport and tells the failure detector how it
    /// went: any answer (a refusal too) is a sign of life, no answer a failure.
    async fn send(
        &self,
        peer: &str,
        env: &Envelope,
        timeout: Duration,
    ) -> std::result::Result<Response, CallError> {
        let out = self.transport.call(peer, env, timeout).await;
        let now = monotonic_ms();
        match &out {
            Ok(_) | Err(CallError::Refused(..)) => self.liveness().record_ok(peer, now),
            Err(CallError::NotSent(..) | CallError::Unreachable(..) | CallError::Timeout(..)) => {
                self.liveness().record_failure(peer, now)
            }
        }
        out
    }

    /// Reads `key` for a client. `may_forward` is false for requests that were already
    /// forwarded to us, so a request never travels more than one hop.
    pub async fn get(
        self: &Arc<Self>,
        key: &str,
        token: CausalToken,
        may_forward: bool,
    ) -> Result<ReadReply> {
        check_bounds(key, None)?;
        if may_forward {
            self.catch_up_view(self.epoch_needed(&token)).await?;
        }
        let mut rerouted = false;
        loop {
            let cur = self.current();
            let view = cur.view()?.clone();
            let p = view.partition_of_key(key);
            let result = match cur.local(p) {
                Some(r) => match self.read_local(&view, r, key, &token).await {
                    Err(e) if e.kind == ErrorKind::Unavailable && may_forward => {
                        // We could not catch up; a peer may already have what the client saw.
                        self.forward_get(&view, p, key, token.clone(), true)
                            .await
                            .map_err(|other| with_local_reason(&e, other))
                    }
                    other => other,
                },
                None if may_forward => self.forward_get(&view, p, key, token.clone(), false).await,
                // Forwarded to us, but we do not hold the partition: say so, the sender
                // tries another replica.
                None => Err(self.not_a_replica(p)),
            };
            match result {
                // The view changed while we asked (the key may have moved): once more.
                Err(e) if self.should_reroute(&e, &view, may_forward, &mut rerouted) => continue,
                other => return other,
            }
        }
    }

    /// Writes `key` for a client; durable on this replica (or the one forwarded to)
    /// before it returns.
    pub async fn put(
        self: &Arc<Self>,
        key: &str,
        value: Vec<u8>,
        token: CausalToken,
        may_forward: bool,
    ) -> Result<WriteReply> {
        self.write(key, Some(value), token, may_forward).await
    }

    /// Deletes `key` for a client: writes a tombstone, durable like a write. The reply's
    /// `created` is true when the key did not exist (and nothing was written).
    pub async fn delete(
        self: &Arc<Self>,
        key: &str,
        token: CausalToken,
        may_forward: bool,
    ) -> Result<WriteReply> {
        self.write(key, None, token, may_forward).await
    }

    /// A put (`Some`) or a delete (`None`).
    async fn write(
        self: &Arc<Self>,
        key: &str,
        value: Option<Vec<u8>>,
        token: CausalToken,
        may_forward: bool,
    ) -> Result<WriteReply> {
        check_bounds(key, value.as_deref())?;
        if may_forward {
            self.catch_up_view(self.epoch_needed(&token)).await?;
        }
        let mut rerouted = false;
        loop {
            let cur = self.current();
            let view = cur.view()?.clone();
            let slot = slot_of(key);
            let p = view.owner_of_slot(slot);
            if let Some(t) = &cur.transition {
                let next = t.to().owner_of_slot(slot);
                if next != p {
                    return Err(Error::unavailable(format!(
                        "key {key:?} is moving to partition {} (view change to epoch {} in progress); retry shortly",
                        t.to().index_of(next).unwrap_or_default(),
                        t.to().epoch
                    )));
                }
            }
            let result = match cur.local(p) {
                Some(r) => {
                    match self
                        .write_local(&view, r, key, value.clone(), token.clone())
                        .await
                    {
                        // This replica is leaving its partition, was replaced, or its
                        // disk refuses writes: its peers take the write (with none, its
                        // own refusal says best why the write failed).
                        Err(e)
                            if e.kind == ErrorKind::Unavailable
                                && may_forward
                                && !r.peers.is_empty() =>
                        {
                            self.forward_put(&view, p, key, value.clone(), token.clone(), true)
                                .await
                                .map_err(|other| with_local_reason(&e, other))
                        }
                        other => other,
                    }
                }
                None if may_forward => {
                    self.forward_put(&view, p, key, value.clone(), token.clone(), false)
                        .await
                }
                None => Err(self.not_a_replica(p)),
            };
            match result {
                Err(e) if self.should_reroute(&e, &view, may_forward, &mut rerouted) => continue,
                other => return other,
            }
        }
    }

    /// Whether a failed request should be routed again: once, when the view changed
    /// while it was out.
    fn should_reroute(
        &self,
        e: &Error,
        asked: &View,
        may_forward: bool,
        rerouted: &mut bool,
    ) -> bool {
        if !may_forward || *rerouted || e.kind != ErrorKind::Unavailable {
            return false;
        }
        *rerouted = true;
        self.epoch() != asked.epoch
    }

    async fn write_local(
        &self,
        view: &View,
        r: &ReplicaHandle,
        key: &str,
        value: Option<Vec<u8>>,
        token: CausalToken,
    ) -> Result<WriteReply> {
        // A disk that refuses writes makes waiting pointless: its peers take the write.
        if let Some(fault) = self.disk_fault() {
            return Err(fault.refusal());
        }
        // The replica must reflect what the client saw in this partition before it
        // accepts the write (see `Replica::accepts_write`): wait for the peers to supply
        // it, then give up; the caller tries another replica, which may have it.
        if !self.catch_up(r, &token).await {
            return Err(Error::unavailable(format!(
                "this replica has not received writes the causal context depends on (partition {}), \
                 and its peers did not supply them within {CATCHUP_WAIT:?}; the write was not applied",
                view.index_of(r.partition).unwrap_or_default()
            )));
        }
        let (tx, rx) = oneshot::channel();
        let req = WriteRequest {
            slot: slot_of(key),
            key: key.to_string(),
            value,
            token,
            now_ms: now_ms(),
        };
        self.send_writer(WriterCmd::Write {
            req,
            partition: r.partition,
            tx,
        })
        .await?;
        let mut outcome = rx
            .await
            .map_err(|_| Error::unavailable("the node is shutting down"))??;
        outcome.token.observe_epoch(view.epoch);
        Ok(WriteReply {
            partition: r.partition,
            index: view.index_of(r.partition).unwrap_or_default(),
            created: outcome.created,
            timestamp_ms: outcome.timestamp_ms,
            token: outcome.token,
        })
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

    /// Waits (up to [`CATCHUP_WAIT`]) until this replica reflects everything `token`
    /// names in its partition, waking the pullers to fetch it. Returns whether it does.
    async fn catch_up(&self, r: &ReplicaHandle, token: &CausalToken) -> bool {
        let ready = |s: &Option<Arc<ReplicaStatus>>| {
            s.as_ref()
                .is_some_and(|s| s.id == r.id && Replica::can_serve(&s.served, r.partition, token))
        };
        if ready(&self.replica_status.borrow()) {
            return true;
        }
        // Writes this replica lacks can only come from its peers: when the failure
        // detector believes all of them dead, waiting is pointless, and failing now lets
        // the forwarder try a replica on the other side of the fault.
        let now = monotonic_ms();
        if !r.peers.is_empty()
            && r.peers
                .iter()
                .all(|(peer, _)| self.liveness().health(peer, now) == Health::Dead)
        {
            return false;
        }
        for (_, notify) in &r.peers {
            notify.notify_one();
        }
        let mut status = self.replica_status.clone();
        let caught_up = tokio::time::timeout(CATCHUP_WAIT, status.wait_for(ready)).await;
        matches!(caught_up, Ok(Ok(_)))
    }

    async fn read_local(
        &self,
        view: &View,
        r: &ReplicaHandle,
        key: &str,
        token: &CausalToken,
    ) -> Result<ReadReply> {
        let slot = slot_of(key);
        for attempt in 0..2 {
            // The vectors first, then the snapshot: they are published after each
            // commit, so the snapshot holds at least what the vectors claim.
            let status = self
                .status_of(r)
                .ok_or_else(|| self.not_a_replica(r.partition))?;
            let txn = self.store.read()?;
            let servable = Replica::can_serve(&status.served, r.partition, token) || {
                let state = txn.get(slot, key)?.unwrap_or_default();
                Replica::can_serve_key(&status.served, r.partition, token, &state)
            };
            if servable {
                let mut out = Replica::read(&*txn, r.partition, slot, key, token.clone())?;
                out.token.observe_epoch(view.epoch);
                return Ok(ReadReply {
                    partition: r.partition,
                    index: view.index_of(r.partition).unwrap_or_default(),
                    value: out.value,
                    token: out.token,
                    context: out.context,
                });
            }
            drop(txn);
            if attempt == 0 && !self.catch_up(r, token).await {
                break;
            }
        }
        Err(Error::unavailable(
            "this replica has not yet received writes the causal context depends on, and its peers did not supply them in time",
        ))
    }

    async fn forward_get(
        &self,
        view: &View,
        p: PartitionUid,
        key: &str,
        token: CausalToken,
        skip_self: bool,
    ) -> Result<ReadReply> {
        let req = Request::Get {
            key: key.to_string(),
            token,
        };
        match self.forward(view, p, req, skip_self).await? {
            Response::Get(reply) => Ok(reply),
            other => Err(unexpected(&other)),
        }
    }

    async fn forward_put(
        &self,
        view: &View,
        p: PartitionUid,
        key: &str,
        value: Option<Vec<u8>>,
        token: CausalToken,
        skip_self: bool,
    ) -> Result<WriteReply> {
        let req = Request::Put {
            key: key.to_string(),
            value,
            token,
        };
        match self.forward(view, p, req, skip_self).await? {
            Response::Put(reply) => Ok(reply),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends a client request to the replicas of `p`, healthiest first, until one answers.
    ///
    /// A read not answered within [`HEDGE_AFTER`] keeps its chance, but the next replica
    /// is asked too and the first good answer wins: a replica that went silent mid-request
    /// (crash, partition) costs a second, not the whole [`FORWARD_TIMEOUT`].
    ///
    /// A write is never sent to a second replica once the first may have received it:
    /// each replica applying it would give it its own dot, and the copy applied late (a
    /// partitioned replica receiving it after the heal) would be concurrent with the
    /// client's later writes and could win over them, bringing an overwritten value back.
    /// So a write moves on only when the first replica certainly did not act on it (no
    /// connection, or it refused); otherwise its outcome is unknown and the client gets a
    /// 503 saying so (`ErrorKind::OutcomeUnknown`, also what a replica answers whose disk
    /// failed during the write). Writes try the replicas whose disks take writes first.
    async fn forward(
        &self,
        view: &View,
        p: PartitionUid,
        req: Request,
        skip_self: bool,
    ) -> Result<Response> {
        let _permit = self
            .forwards
            .try_acquire()
            .map_err(|_| Error::unavailable("too many forwarded requests in flight; retry"))?;
        let index = view.index_of(p).unwrap_or_default();
        let replicas: Vec<String> = view
            .replicas_of(p)
            .ok_or_else(|| Error::internal(format!("partition uid {p} is not in the view")))?
            .iter()
            .filter(|a| !(skip_self && **a == self.addr))
            .cloned()
            .collect();
        let start = self.next_peer.fetch_add(1, Ordering::Relaxed);
        let is_write = matches!(req, Request::Put { .. });
        let mut order = if is_write {
            self.liveness()
                .order_for_writes(&replicas, start, monotonic_ms())
        } else {
            self.liveness().order(&replicas, start, monotonic_ms())
        }
        .into_iter();
        let env = self.envelope(req);
        let env = &env;
        let ask = |peer: String| async move {
            // A peer believed dead has missed heartbeats for over a second: it gets one
            // short chance (in case it just came back), not the full timeout.
            let timeout = if self.liveness().health(&peer, monotonic_ms()) == Health::Dead {
                DEAD_PEER_TIMEOUT
            } else {
                FORWARD_TIMEOUT
            };
            let out = self.send(&peer, env, timeout).await;
            (peer, out)
        };
        let mut last = format!("partition {index} has no other replica");
        // The next replica worth asking: one believed dead only as its probe (see
        // `DEAD_PEER_PROBE_INTERVAL_MS`), so a partition cut off costs its clients an
        // immediate 503, not a timeout each.
        let mut next = |last: &mut String| {
            for peer in order.by_ref() {
                if self.may_ask(&peer) {
                    return Some(peer);
                }
                *last = format!("{peer} is believed down (no heartbeat for over a second)");
            }
            None
        };
        let mut asked = FuturesUnordered::new();
        loop {
            if asked.is_empty() {
                match next(&mut last) {
                    Some(peer) => asked.push(ask(peer)),
                    None => break,
                }
            }
            let hedge = tokio::time::sleep(HEDGE_AFTER);
            tokio::select! {
                Some((peer, out)) = asked.next() => match out {
                    // A replica that cannot serve now, or whose disk fails: try the next.
                    // (Not after `OutcomeUnknown`: that write may be applied there.)
                    Ok(Response::Error(e))
                        if matches!(e.kind, ErrorKind::Unavailable | ErrorKind::Internal) =>
                    {
                        last = format!("{peer}: {e}");
                    }
                    Ok(Response::Error(e)) => return Err(e),
                    Ok(resp) => return Ok(resp),
                    Err(e) if is_write && e.maybe_delivered() => {
                        return Err(Error::new(
                            ErrorKind::OutcomeUnknown,
                            format!("the write's outcome is unknown: {e}; it may still be applied"),
                        ))
                    }
                    Err(e) => last = e.to_string(),
                },
                () = hedge, if !is_write => {
                    if let Some(peer) = next(&mut last) {
                        asked.push(ask(peer));
                    }
                }
            }
        }
        Err(Error::unavailable(format!(
            "no replica of partition {index} could serve the request (last: {last})"
        )))
    }

    /// Whether a forwarded request may go to `peer`: yes unless it is believed dead and
    /// another request probed it less than [`DEAD_PEER_PROBE_INTERVAL_MS`] ago.
    fn may_ask(&self, peer: &str) -> bool {
        let now = monotonic_ms();
        if self.liveness().health(peer, now) != Health::Dead {
            return true;
        }
        let mut probes = lock(&self.probes);
        match probes.get(peer) {
            Some(&at) if now.saturating_sub(at) < DEAD_PEER_PROBE_INTERVAL_MS => false,
            _ => {
                probes.insert(peer.to_string(), now);
                true
            }
        }
    }

    fn envelope(&self, body: Request) -> Envelope {
        Envelope {
            from: self.addr.clone(),
            epoch: self.epoch(),
            body,
        }
    }

    /// Calls `to` (this node itself included, without a network hop).
    async fn call(self: &Arc<Self>, to: &str, req: Request, timeout: Duration) -> Result<Response> {
        let resp = if to == self.addr {
            let env = self.envelope(req);
            tokio::time::timeout(timeout, Box::pin(self.handle_rpc(env)))
                .await
                .map_err(|_| {
                    Error::unavailable(format!("{to} did not answer within {timeout:?}"))
                })?
        } else {
            self.send(to, &self.envelope(req), timeout).await?
        };
        match resp {
            Response::Error(e) => Err(e),
            other => Ok(other),
        }
    }

    /// Handles one internal call from a peer, admitted by [`Node::admit`] (or made by
    /// this node itself).
    pub async fn handle_rpc(self: &Arc<Self>, env: Envelope) -> Response {
        let cur = self.current();
        // Past admission, a caller holds the key (or this node is in no cluster and
        // trusts its first contact). A member removed while it was away holds the key
        // too: it may ask for the status (which tells it it was removed), nothing else.
        // A node that asks to join is not a member yet (`join`).
        let known = cur.knows(&env.from);
        let open = matches!(
            env.body,
            Request::Status
                | Request::KeyRequest { .. }
                | Request::KeyDelivery { .. }
                | Request::Join { .. }
        );
        if !open && cur.view.is_some() && !known {
            // Retryable: a member removed while it was away still routes by its old
            // view; the request it forwards for a client may succeed elsewhere.
            return Response::Error(Error::unavailable(format!(
                "{} is not a member of this node's view (epoch {})",
                env.from,
                cur.epoch()
            )));
        }
        if known {
            self.note_peer_epoch(&env.from, env.epoch);
        }
        let result = match env.body {
            Request::Ping => Ok(self
                .disk_fault()
                .map_or(Response::Ok, |f| Response::DiskFault(f.error.clone()))),
            Request::Poke { partition } => {
                if let Some(r) = cur.local(partition) {
                    if let Some((_, n)) = r.peers.iter().find(|(a, _)| *a == env.from) {
                        n.notify_one();
                    }
                }
                Ok(Response::Ok)
            }
            Request::Sync(req) => self
                .serve_sync(&cur, &env.from, req)
                .await
                .map(Response::Sync),
            Request::Snapshot(req) => self.serve_snapshot(&cur, req).await.map(Response::Snapshot),
            Request::Get { key, token } => {
                // The sender routed by a newer view: learn it before deciding whether the
                // key is ours (else the sender's request fails at the switch).
                let _ = self.catch_up_view(env.epoch).await;
                self.get(&key, token, false).await.map(Response::Get)
            }
            Request::Put { key, value, token } => {
                let _ = self.catch_up_view(env.epoch).await;
                self.write(&key, value, token, false)
                    .await
                    .map(Response::Put)
            }
            Request::Status => self.status().map(|s| Response::Status(Box::new(s))),
            Request::KeyCount { partition } => self.count_local(partition).map(Response::Count),
            Request::Join { admin_token } => self.on_join(&env.from, admin_token.as_deref()).await,
            Request::Prepare { epoch, ballot } => self.on_prepare(epoch, ballot).await,
            Request::Accept {
                epoch,
                ballot,
                proposal,
            } => self.on_accept(epoch, ballot, proposal).await,
            Request::Learn(proposal) => self.learn(proposal).await.map(Response::Learned),
            Request::Drain {
                epoch,
                partition,
                target,
            } => self
                .drain(epoch, partition, target)
                .await
                .map(|()| Response::Ok),
            Request::Pull {
                epoch,
                key,
                source,
                claim,
            } => self
                .pull_step(epoch, key, source, claim)
                .await
                .map(Response::Pulled),
            Request::Install(view) => self.install_view(view).await.map(|_| Response::Ok),
            Request::KeyRequest { nonce } => self.on_key_request(&env.from, nonce).await,
            Request::KeyDelivery { nonce, key } => self.on_key_delivery(nonce, key).await,
        };
        result.unwrap_or_else(Response::Error)
    }

    /// What this node reports about itself.
    pub fn status(&self) -> Result<NodeStatus> {
        let cur = self.current();
        Ok(NodeStatus {
            addr: self.addr.clone(),
            view: cur.view.as_deref().cloned(),
            transition: cur.transition.as_ref().map(|t| t.proposal.clone()),
            k: self.k,
            keys: self.store.read()?.key_count()?,
        })
    }

    /// Retryable: the caller should ask another replica of `partition`.
    fn not_a_replica(&self, partition: PartitionUid) -> Error {
        Error::unavailable(format!(
            "{} is not a replica of partition uid {partition} in its view",
            self.addr
        ))
    }
}

/// The error of a request this replica could not serve and its peers could not either:
/// both reasons, the local one first (it is usually why the client's request failed).
fn with_local_reason(local: &Error, peers: Error) -> Error {
    if peers.kind != ErrorKind::Unavailable {
        return peers;
    }
    Error::unavailable(format!(
        "{}; and the other replicas could not serve it: {}",
        local.message, peers.message
    ))
}

fn unexpected(resp: &Response) -> Error {
    Error::internal(format!("unexpected answer from a peer: {resp:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::CallFuture;
    use crate::storage::MemoryStore;

    /// A transport whose answers to client requests are scripted per peer; everything
    /// else (heartbeats, status, sync) finds no one.
    #[derive(Default)]
    struct Scripted {
        /// Per peer, what it does with a forwarded Get/Put: `None` = goes silent.
        answers: Mutex<BTreeMap<String, Option<Response>>>,
        /// (peer, "get" | "put") of every forwarded client request, in order.
        calls: Mutex<Vec<(String, &'static str)>>,
        /// Whether heartbeats are answered (so every peer stays alive however slowly a
        /// test runs); otherwise they find no one.
        pings: std::sync::atomic::AtomicBool,
    }

    impl Transport for Scripted {
        fn call(&self, to: &str, envelope: &Envelope, timeout: Duration) -> CallFuture<'_> {
            let kind = match envelope.body {
                Request::Get { .. } => Some("get"),
                Request::Put { .. } => Some("put"),
                _ => None,
            };
            let to = to.to_string();
            let pong = matches!(envelope.body, Request::Ping) && self.pings.load(Ordering::Relaxed);
            Box::pin(async move {
                if pong {
                    return Ok(Response::Ok);
                }
                let Some(kind) = kind else {
                    return Err(CallError::NotSent(to, "scripted: nobody there".into()));
                };
                lock(&self.calls).push((to.clone(), kind));
                let answer = lock(&self.answers).get(&to).cloned().flatten();
                match answer {
                    Some(resp) => Ok(resp),
                    None => {
                        // Silent: the request went out, no answer comes back.
                        tokio::time::sleep(timeout).await;
                        Err(CallError::Timeout(to, timeout))
                    }
                }
            })
        }
    }

    /// A proxy (C) in front of one partition with replicas A and B; A goes silent.
    fn proxy_with_silent_replica() -> (Arc<Node>, Arc<Scripted>, View) {
        let members = ["10.9.0.1:8080", "10.9.0.2:8080", "10.9.0.3:8080"].map(String::from);
        let view = View::bootstrap(members.to_vec(), 2).expect("valid view");
        let uid = view.partitions[0].uid;
        let transport = Arc::new(Scripted::default());
        {
            let mut answers = lock(&transport.answers);
            answers.insert(members[0].clone(), None);
            answers.insert(
                members[1].clone(),
                Some(Response::Get(ReadReply {
                    partition: uid,
                    index: 0,
                    value: Some((b"v".to_vec(), 1)),
                    token: CausalToken::default(),
                    context: Default::default(),
                })),
            );
        }
        let cfg = NodeConfig {
            addr: members[2].clone(),
            env_view: Some(view.clone()),
            k: Some(2),
            secret: "s".into(),
            admin_token: None,
            join: None,
        };
        let node =
            Node::start(cfg, Arc::new(MemoryStore::new()), transport.clone()).expect("starts");
        (node, transport, view)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_write_is_not_retried_once_a_replica_may_have_received_it() {
        let (node, transport, view) = proxy_with_silent_replica();
        // Make the silent replica the first one asked.
        let first = view.partitions[0].replicas[0].clone();
        let mut result = None;
        for _ in 0..view.partitions[0].replicas.len() {
            lock(&transport.calls).clear();
            let r = node
                .put("key", b"v".to_vec(), CausalToken::default(), true)
                .await;
            if lock(&transport.calls).first().map(|c| &c.0) == Some(&first) {
                result = Some(r);
                break;
            }
        }
        let result = result.expect("the silent replica was asked first once");
        let err = result.expect_err("the write's outcome is unknown");
        assert_eq!(err.kind, ErrorKind::OutcomeUnknown);
        assert!(err.message.contains("outcome is unknown"), "{err:?}");
        assert_eq!(
            *lock(&transport.calls),
            vec![(first, "put")],
            "no second replica may be asked"
        );
        node.shutdown().await;
    }

    /// A write answered "outcome unknown" by the first replica stops there; one answered
    /// "unavailable" (certainly not applied: a disk that refuses writes) moves on.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_write_stops_at_an_unknown_outcome_and_moves_on_after_a_refusal() {
        let (node, transport, view) = proxy_with_silent_replica();
        // The replicas must stay alive to be asked in turn, however slow this run is.
        transport.pings.store(true, Ordering::Relaxed);
        let (first, second) = (
            view.partitions[0].replicas[0].clone(),
            view.partitions[0].replicas[1].clone(),
        );
        let accepted = Response::Put(WriteReply {
            partition: view.partitions[0].uid,
            index: 0,
            created: true,
            timestamp_ms: 1,
            token: CausalToken::default(),
        });
        lock(&transport.answers).insert(second.clone(), Some(accepted));
        for (answer, moves_on) in [
            (
                Error::new(ErrorKind::OutcomeUnknown, "disk failed mid-commit"),
                false,
            ),
            (Error::unavailable("this node's disk refuses writes"), true),
        ] {
            let kind = answer.kind;
            lock(&transport.answers).insert(first.clone(), Some(Response::Error(answer)));
            let mut seen = false;
            for _ in 0..view.partitions[0].replicas.len() {
                lock(&transport.calls).clear();
                let r = node
                    .put("key", b"v".to_vec(), CausalToken::default(), true)
                    .await;
                let calls = lock(&transport.calls).clone();
                if calls.first().map(|c| &c.0) != Some(&first) {
                    continue;
                }
                seen = true;
                if moves_on {
                    assert!(r.is_ok(), "{kind:?}: {r:?}");
                    assert_eq!(calls.len(), 2, "{kind:?}: {calls:?}");
                } else {
                    assert_eq!(r.expect_err("unknown").kind, ErrorKind::OutcomeUnknown);
                    assert_eq!(calls.len(), 1, "{kind:?}: no second replica: {calls:?}");
                }
                break;
            }
            assert!(seen, "{kind:?}: the first replica was never asked first");
        }
        node.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_read_hedges_to_the_next_replica_when_the_first_is_silent() {
        let (node, transport, view) = proxy_with_silent_replica();
        let first = view.partitions[0].replicas[0].clone();
        for _ in 0..view.partitions[0].replicas.len() {
            lock(&transport.calls).clear();
            let started = tokio::time::Instant::now();
            let reply = node
                .get("key", CausalToken::default(), true)
                .await
                .expect("the other replica answers");
            assert_eq!(reply.value.map(|(v, _)| v), Some(b"v".to_vec()));
            let calls = lock(&transport.calls).clone();
            if calls.first().map(|c| &c.0) == Some(&first) {
                assert_eq!(calls.len(), 2, "{calls:?}");
                // Hedged after HEDGE_AFTER, not after the whole timeout.
                assert!(
                    started.elapsed() < FORWARD_TIMEOUT,
                    "{:?}",
                    started.elapsed()
                );
                node.shutdown().await;
                return;
            }
        }
        panic!("the silent replica was never asked first");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn replicas_believed_dead_get_one_probe_and_the_rest_fail_fast() {
        let (node, transport, view) = proxy_with_silent_replica();
        let replicas = view.partitions[0].replicas.clone();
        for r in &replicas {
            lock(&transport.answers).insert(r.clone(), None);
        }
        // Heartbeats find nobody: both replicas are soon believed dead.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !replicas
            .iter()
            .all(|r| node.liveness().health(r, monotonic_ms()) == Health::Dead)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never believed dead"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let reads = (0..20).map(|_| async {
            let started = tokio::time::Instant::now();
            let r = node.get("key", CausalToken::default(), true).await;
            (r, started.elapsed())
        });
        let results = futures_util::future::join_all(reads).await;
        for (r, _) in &results {
            let err = r.as_ref().expect_err("no replica can answer");
            assert_eq!(err.kind, ErrorKind::Unavailable, "{err:?}");
        }
        // Probes take DEAD_PEER_TIMEOUT, longer than the probe interval, so a probing
        // read may probe the second replica too: at most two probes per replica.
        let calls = lock(&transport.calls).len();
        assert!(
            (1..=4).contains(&calls),
            "a probe per dead replica, not one per request: {calls} calls"
        );
        let fast = results
            .iter()
            .filter(|(_, took)| *took < Duration::from_millis(100))
            .count();
        assert!(
            fast >= 20 - calls,
            "only {fast} of 20 reads failed at once: {:?}",
            results.iter().map(|(_, t)| t).collect::<Vec<_>>()
        );
        node.shutdown().await;
    }
}
