//! The writer thread: the only code that opens write transactions.
//!
//! It owns the node's durable state ([`Durable`]): the view, the replica state machine,
//! the transition of a view change in progress and the Paxos acceptor. Commands arrive
//! on a bounded queue; the writer applies as many as are waiting (up to [`MAX_BATCH`])
//! in one transaction and commits once (group commit: one fsync serves the whole batch),
//! and only then answers each command. A command that is refused (a write to a slot that
//! is moving, say) fails alone; a commit that fails fails the whole batch and the
//! in-memory state is rolled back with it.
//!
//! Because view-change steps go through the same queue as client writes, ordering comes
//! for free: when a `Learn` freezes slots, every write queued before it is already in the
//! vector the learn reports, and none queued after it can touch a frozen slot.
//!
//! # Disk faults
//!
//! A commit that fails on a disk error makes the writer *degraded* (see [`writer_loop`]):
//! it publishes the fault (`Node::disk_fault`: its heartbeat answers tell the peers, which
//! then send it writes last; `/api/v1/status` shows it), refuses every command at once
//! with a retryable error (nothing of it applied: the entry node forwards a client write
//! to the partition's other replicas, the pullers retry their pages), and every
//! [`PROBE_INTERVAL`] asks the store to recover. Once the disk takes writes again it
//! goes on by itself, without a restart; if the store had to be reopened (a commit whose
//! outcome was unknown), it first reloads its durable state from the store, since the
//! replay may have applied the batch the in-memory state was rolled back from (and must
//! not hand out that batch's dots again). One line is logged when it degrades and one
//! when it heals.
//!
//! # Caveats
//!
//! * A view-change step in a batch whose outcome was unknown and that the replay applied
//!   reaches the node's routing only when the change is driven again (`reconfig` re-drives
//!   a stalled change; installing a view the node already has returns its layout).
//! * While degraded, the pullers pause (their pages could not be applied) and catch up
//!   at their first round after the node heals, within `node::SYNC_INTERVAL`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};

use crate::auth::ClusterKey;
use crate::clock::{PartitionUid, ReplicaId, VersionVector};
use crate::error::{Error, Result};
use crate::placement::{Role, SlotSet, View};
use crate::replica::{Claim, KeyState, Replica, SyncResponse, WriteOutcome, WriteRequest};
use crate::storage::{ReadTxn, Recovery, StorageError, Store, WriteTxn};
use crate::viewchange::{duties, Acceptor, PullKey, PullProgress, Transition};

use super::Layout;

/// Writer queue length: when full, request handlers wait (backpressure).
pub const WRITER_QUEUE: usize = 4_096;
/// Commands per transaction.
pub const MAX_BATCH: usize = 512;
/// How often a degraded writer checks whether the disk takes writes again. Each check
/// writes and syncs `storage::PROBE_BYTES`; once a second puts the node back in service
/// within a second of the disk's recovery without wearing anything.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How often a degraded writer looks at its queue: it answers every command at once (a
/// refusal) instead of blocking on the queue, so it can probe between them.
const DEGRADED_POLL: Duration = Duration::from_millis(20);

/// Meta-table names of the node's durable state.
pub const META_VIEW: &str = "view.v2";
pub const META_TRANSITION: &str = "transition";
pub const META_ACCEPTOR: &str = "paxos";
/// `(cluster, epoch)` of the view that removed this node.
pub const META_REMOVED: &str = "removed";
/// The cluster key (`auth::ClusterKey`): secret, shared only among members.
pub const META_CLUSTER_KEY: &str = "cluster.key";
/// Names written by the first version of kvs, migrated on start.
const LEGACY_VIEW: &str = "view";
const LEGACY_REPLICA: &str = "replica";
const LEGACY_REPLICA_ID: &str = "replica_id";

pub(super) type Reply<T> = oneshot::Sender<Result<T>>;

pub(super) enum WriterCmd {
    /// A client write for partition `partition`, as routed by the caller.
    Write {
        req: WriteRequest,
        partition: PartitionUid,
        tx: Reply<WriteOutcome>,
    },
    /// A sync page for the replica incarnation `replica`.
    Sync {
        page: SyncResponse,
        replica: ReplicaId,
        tx: Reply<()>,
    },
    /// The end of a state transfer into incarnation `replica`.
    Claim {
        claim: Claim,
        replica: ReplicaId,
        tx: Reply<()>,
    },
    Trim {
        floor: VersionVector,
        replica: ReplicaId,
    },
    /// Record a chosen proposal; answers with the replica's `served` vector after it.
    Learn {
        transition: Transition,
        tx: Reply<(Option<VersionVector>, Layout)>,
    },
    /// A page of a pull of the transition to view `epoch`.
    Pulled {
        epoch: u64,
        key: PullKey,
        states: Vec<(u32, String, KeyState)>,
        progress: PullProgress,
        tx: Reply<PullProgress>,
    },
    /// Switch to `view`.
    Install {
        view: View,
        tx: Reply<(Installed, Layout)>,
    },
    Acceptor {
        acceptor: Acceptor,
        tx: Reply<()>,
    },
    /// Adopt the cluster key (delivered by a member, or drawn by this node). Refused if
    /// the node, in a cluster, already holds another one.
    SetKey {
        key: ClusterKey,
        tx: Reply<Layout>,
    },
    /// Delete up to `limit` keys of `slot` if this node no longer owns it.
    Gc {
        slot: u32,
        limit: usize,
        tx: Reply<usize>,
    },
    Stop,
}

/// What an install did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Installed {
    /// The view was not newer than the node's.
    Unchanged,
    Switched,
}

/// What readers need of the replica, published after every commit that changes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub id: ReplicaId,
    pub partition: PartitionUid,
    pub applied: VersionVector,
    pub absorbed: VersionVector,
    /// `applied ∨ absorbed`: what reads are checked against.
    pub served: VersionVector,
}

impl ReplicaStatus {
    fn of(r: &Replica) -> Self {
        Self {
            id: r.id(),
            partition: r.partition(),
            applied: r.applied().clone(),
            absorbed: r.absorbed().clone(),
            served: r.served(),
        }
    }
}

/// The node's durable state; see the module doc.
#[derive(Clone, Debug)]
pub(super) struct Durable {
    pub addr: String,
    pub view: Option<Arc<View>>,
    pub replica: Option<Replica>,
    pub transition: Option<Arc<Transition>>,
    pub acceptor: Arc<Acceptor>,
    pub removed: Option<(u64, u64)>,
    /// The key of the cluster this node is in (or was last in); see `node::keys`.
    pub cluster_key: Option<ClusterKey>,
    /// Derived from `transition`: slots this replica no longer accepts writes to.
    frozen: SlotSet,
    /// Derived from `transition`: this replica accepts no writes at all.
    leaving: bool,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::internal(format!("corrupt {what} in the data directory: {e}"))
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("state serialization is infallible")
}

impl Durable {
    /// Loads the node's state from `store`, migrating the first version's layout, and
    /// bootstraps from `env_view` (VIEW and K) when the store holds no view. Persists
    /// what it decided before returning.
    pub fn load(store: &dyn Store, addr: &str, env_view: Option<View>) -> Result<Self> {
        let txn = store.read()?;
        let stored_view = match txn.meta(META_VIEW)? {
            Some(b) => Some(postcard::from_bytes::<View>(&b).map_err(|e| corrupt("view", e))?),
            None => match txn.meta(LEGACY_VIEW)? {
                Some(b) => Some(View::from_legacy_bytes(&b).map_err(|e| corrupt("view", e))?),
                None => None,
            },
        };
        if let Some(v) = &stored_view {
            v.check().map_err(|e| corrupt("view", e))?;
        }
        let mut replica = Replica::load(&*txn)?;
        if replica.is_none() {
            replica = legacy_replica(&*txn, stored_view.as_ref(), addr)?;
        }
        let transition: Option<Transition> = txn
            .meta(META_TRANSITION)?
            .map(|b| postcard::from_bytes(&b).map_err(|e| corrupt("transition", e)))
            .transpose()?;
        let acceptor: Option<Acceptor> = txn
            .meta(META_ACCEPTOR)?
            .map(|b| postcard::from_bytes(&b).map_err(|e| corrupt("acceptor state", e)))
            .transpose()?;
        let removed: Option<(u64, u64)> = txn
            .meta(META_REMOVED)?
            .map(|b| postcard::from_bytes(&b).map_err(|e| corrupt("removal record", e)))
            .transpose()?;
        let cluster_key: Option<ClusterKey> = txn
            .meta(META_CLUSTER_KEY)?
            .map(|b| postcard::from_bytes(&b).map_err(|e| corrupt("cluster key", e)))
            .transpose()?;
        drop(txn);

        let view = match (stored_view, env_view) {
            (Some(stored), env) => {
                if env
                    .as_ref()
                    .is_some_and(|v| v.members != stored.members || v.k != stored.k)
                {
                    tracing::info!(
                        epoch = stored.epoch,
                        "VIEW/K differ from the view stored in the data directory; the stored view wins"
                    );
                }
                Some(stored)
            }
            (None, Some(env)) if removed.is_some() => {
                tracing::warn!(
                    "this node was removed from its cluster; ignoring VIEW and waiting to be added again"
                );
                drop(env);
                None
            }
            (None, Some(env)) => {
                if !env.is_member(addr) {
                    return Err(Error::bad_request(format!(
                        "IPPORT {addr} is not in VIEW ({})",
                        env.members.join(",")
                    )));
                }
                Some(env)
            }
            (None, None) => None,
        };
        let epoch = view.as_ref().map_or(0, |v| v.epoch);
        let has_view = view.is_some();
        let mut d = Durable {
            addr: addr.to_string(),
            view: view.map(Arc::new),
            replica,
            // A transition is kept if it leads from this node's view, or (for a node
            // in no cluster) if it makes this node a member.
            transition: transition
                .filter(|t| {
                    if has_view {
                        t.proposal.epoch() == epoch + 1
                    } else {
                        t.proposal.to.is_member(addr)
                    }
                })
                .map(Arc::new),
            acceptor: Arc::new(
                acceptor
                    .filter(|a| a.epoch == epoch + 1)
                    .unwrap_or_else(|| Acceptor::new(epoch + 1)),
            ),
            removed,
            cluster_key,
            frozen: SlotSet::new(),
            leaving: false,
        };
        // The replica incarnation must match the role: a first start (or a start after
        // the role changed while the node was down) makes a fresh one.
        let mut txn = store.write()?;
        let role = d.view.as_ref().and_then(|v| v.role_of(addr));
        match role {
            Some(Role::Replica(uid))
                if d.replica.as_ref().is_some_and(|r| r.partition() == uid) => {}
            Some(Role::Replica(uid)) => {
                if d.replica.is_some() {
                    txn.log_clear()?;
                }
                d.replica = Some(Replica::fresh(rand::random(), uid));
            }
            _ => {
                if d.replica.take().is_some() {
                    txn.log_clear()?;
                }
            }
        }
        d.derive();
        d.persist_all(&mut *txn)?;
        txn.commit()?;
        Ok(d)
    }

    fn derive(&mut self) {
        match &self.transition {
            Some(t) => {
                let d = duties(&t.proposal, &self.addr);
                self.frozen = d.frozen;
                self.leaving = d.leaving;
            }
            None => {
                self.frozen = SlotSet::new();
                self.leaving = false;
            }
        }
    }

    fn persist_all(&self, txn: &mut dyn WriteTxn) -> Result<()> {
        match &self.view {
            Some(v) => txn.set_meta(META_VIEW, &encode(&**v))?,
            None => txn.delete_meta(META_VIEW)?,
        }
        txn.delete_meta(LEGACY_VIEW)?;
        txn.delete_meta(LEGACY_REPLICA)?;
        txn.delete_meta(LEGACY_REPLICA_ID)?;
        match &self.replica {
            Some(r) => r.persist(txn)?,
            None => txn.delete_meta(crate::replica::META_REPLICA)?,
        }
        match &self.transition {
            Some(t) => txn.set_meta(META_TRANSITION, &encode(&**t))?,
            None => txn.delete_meta(META_TRANSITION)?,
        }
        txn.set_meta(META_ACCEPTOR, &encode(&*self.acceptor))?;
        match &self.removed {
            Some(r) => txn.set_meta(META_REMOVED, &encode(r))?,
            None => txn.delete_meta(META_REMOVED)?,
        }
        match &self.cluster_key {
            Some(k) => txn.set_meta(META_CLUSTER_KEY, &encode(k))?,
            None => txn.delete_meta(META_CLUSTER_KEY)?,
        }
        Ok(())
    }

    pub fn layout(&self) -> Layout {
        Layout {
            view: self.view.clone(),
            transition: self.transition.clone(),
            replica: self.replica.as_ref().map(|r| (r.partition(), r.id())),
            cluster_key: self.cluster_key.clone(),
        }
    }

    /// Whether the node is in no cluster and joins none: no view, no change in progress.
    fn outside(&self) -> bool {
        self.view.is_none() && self.transition.is_none()
    }

    pub fn replica_status(&self) -> Option<ReplicaStatus> {
        self.replica.as_ref().map(ReplicaStatus::of)
    }

    /// Slots whose keys this node keeps: those of its partition in its view and, during
    /// a transition, in the next view.
    pub fn keeps(&self, slot: u32) -> bool {
        let mine = |v: &View| match v.role_of(&self.addr) {
            Some(Role::Replica(uid)) => v.owner_of_slot(slot) == uid,
            _ => false,
        };
        self.view.as_deref().is_some_and(mine)
            || self.transition.as_deref().is_some_and(|t| mine(t.to()))
    }
}

/// The replica of a data directory written by the first version of kvs.
fn legacy_replica(txn: &dyn ReadTxn, view: Option<&View>, addr: &str) -> Result<Option<Replica>> {
    #[derive(serde::Deserialize)]
    struct Meta {
        applied: VersionVector,
        known: VersionVector,
    }
    let (Some(meta), Some(id), Some(Role::Replica(uid))) = (
        txn.meta(LEGACY_REPLICA)?,
        txn.meta(LEGACY_REPLICA_ID)?,
        view.and_then(|v| v.role_of(addr)),
    ) else {
        return Ok(None);
    };
    let meta: Meta = postcard::from_bytes(&meta).map_err(|e| corrupt("replica vectors", e))?;
    let id: ReplicaId = postcard::from_bytes(&id).map_err(|e| corrupt("replica id", e))?;
    Ok(Some(Replica::from_parts(id, uid, meta.applied, meta.known)))
}

/// Why this node's disk refuses writes, and since when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskFault {
    pub error: String,
    /// Unix milliseconds.
    pub since_ms: u64,
}

impl DiskFault {
    /// What a write refused meanwhile is told (a retryable refusal: nothing was applied).
    pub fn refusal(&self) -> Error {
        Error::unavailable(format!(
            "this node's disk refuses writes: {}; the write was not applied",
            self.error
        ))
    }
}

/// Channels the writer publishes on.
pub(super) struct Publish {
    pub replica: watch::Sender<Option<Arc<ReplicaStatus>>>,
    /// Bumped after every commit with local writes: what wakes the pokers.
    pub local_writes: watch::Sender<u64>,
    /// Set while the disk refuses writes (see [`writer_loop`]).
    pub disk: watch::Sender<Option<Arc<DiskFault>>>,
}

impl Publish {
    fn replica_status(&self, durable: &Durable) {
        let status = durable.replica_status();
        self.replica.send_if_modified(|cur| {
            let changed = cur.as_deref() != status.as_ref();
            if changed {
                *cur = status.map(Arc::new);
            }
            changed
        });
    }
}

/// The writer thread. See the module doc.
///
/// # Disk faults
///
/// A batch whose commit fails on a disk error (the store says so, `Store::disk_fault`)
/// makes the writer *degraded*: it logs one line, publishes the fault (the node then
/// tells its peers, which send it writes last, and shows it in its status), and answers
/// every later command at once with a retryable refusal, without touching the disk.
/// Every [`PROBE_INTERVAL`] it asks the store to recover (`Store::recover`: a probe
/// write, and a reopen and WAL replay if the engine needs one). Once that works it
/// reloads the durable state if the store was reopened (the replay may have applied the
/// batch whose outcome was unknown, which the in-memory state was rolled back from),
/// republishes, logs one line and takes commands again. The store itself refuses every
/// batch after one whose outcome is unknown until it was reopened, so a later batch is
/// never committed without an earlier one readers could not see.
pub(super) fn writer_loop(
    store: Arc<dyn Store>,
    mut durable: Durable,
    mut rx: mpsc::Receiver<WriterCmd>,
    publish: Publish,
) {
    let mut trimmed = VersionVector::new();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut degraded: Option<Arc<DiskFault>> = None;
    let mut probed = Instant::now();
    loop {
        let first = match &degraded {
            None => match rx.blocking_recv() {
                Some(cmd) => cmd,
                None => break,
            },
            Some(fault) => {
                if probed.elapsed() >= PROBE_INTERVAL {
                    probed = Instant::now();
                    match heal(&*store, &mut durable, &publish, fault) {
                        Ok(()) => {
                            degraded = None;
                            publish.disk.send_replace(None);
                            continue;
                        }
                        // A new reason (the reopen found the WAL damaged, say): logged
                        // once and shown, not once a second.
                        Err(error) if error != fault.error => {
                            tracing::warn!("the disk fault goes on, now: {error}");
                            let fault = Arc::new(DiskFault {
                                error,
                                since_ms: fault.since_ms,
                            });
                            publish.disk.send_replace(Some(fault.clone()));
                            degraded = Some(fault);
                            continue;
                        }
                        Err(_) => {}
                    }
                }
                match rx.try_recv() {
                    Ok(cmd) => cmd,
                    Err(TryRecvError::Empty) => {
                        std::thread::sleep(DEGRADED_POLL);
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => break,
                }
            }
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let stop = batch.iter().any(|c| matches!(c, WriterCmd::Stop));
        if let Some(fault) = &degraded {
            let refusal = fault.refusal();
            for cmd in batch.drain(..) {
                answer(cmd, Outcome::Failed(refusal.clone()));
            }
            if stop {
                break;
            }
            continue;
        }
        let before = durable.clone();
        let trimmed_before = trimmed.clone();
        match run_batch(&*store, &mut durable, &mut trimmed, &batch) {
            Ok(outcomes) => {
                // Committed: only now may anyone learn of the writes. The vector goes
                // out first, so a client that reads right after its ack finds this
                // replica caught up instead of waking the pullers for nothing.
                publish.replica_status(&durable);
                let mut local_writes = false;
                for (cmd, outcome) in batch.drain(..).zip(outcomes) {
                    local_writes |= matches!(outcome, Outcome::Write(_));
                    answer(cmd, outcome);
                }
                if local_writes {
                    publish.local_writes.send_modify(|n| *n += 1);
                }
            }
            Err(e) => {
                // Nothing was committed (or, if its outcome is unknown, nothing readers
                // can see before a reopen): forget the in-memory effects too.
                durable = before;
                trimmed = trimmed_before;
                let failed = batch.len();
                // The fault is published before anyone hears of the failure, so a request
                // that follows one refused finds the node degraded.
                match store.disk_fault() {
                    Some(error) => {
                        tracing::error!(
                            "disk fault, this node takes no writes until its disk does \
                             (its peers take them; probing every {PROBE_INTERVAL:?}): {error}; \
                             {failed} requests failed: {e}"
                        );
                        let fault = Arc::new(DiskFault {
                            error,
                            since_ms: super::now_ms(),
                        });
                        publish.disk.send_replace(Some(fault.clone()));
                        degraded = Some(fault);
                        probed = Instant::now();
                    }
                    None => {
                        tracing::error!("commit failed, {failed} requests fail with it: {e}")
                    }
                }
                for cmd in batch.drain(..) {
                    answer(cmd, Outcome::Failed(e.clone()));
                }
            }
        }
        if stop {
            break;
        }
    }
}

/// One attempt to end a disk fault; see [`writer_loop`]. Returns why it goes on if it
/// does.
fn heal(
    store: &dyn Store,
    durable: &mut Durable,
    publish: &Publish,
    fault: &DiskFault,
) -> std::result::Result<(), String> {
    let recovered = match store.recover() {
        Ok(r) => r,
        Err(StorageError::NotApplied(e)) => return Err(e),
        Err(e) => return Err(e.to_string()),
    };
    if recovered == Recovery::Reopened {
        let reloaded = match Durable::load(store, &durable.addr, None) {
            Ok(d) => d,
            Err(e) => return Err(format!("reloading the node's state after a reopen: {e}")),
        };
        let (was, now) = (durable.layout(), reloaded.layout());
        if was.view.as_ref().map(|v| v.epoch) != now.view.as_ref().map(|v| v.epoch)
            || was.replica != now.replica
            || was.transition.as_ref().map(|t| &t.proposal)
                != now.transition.as_ref().map(|t| &t.proposal)
        {
            tracing::warn!(
                "the write-ahead log replay applied a view-change step whose outcome was \
                 unknown; the node takes it up when the change is driven again"
            );
        }
        *durable = reloaded;
        publish.replica_status(durable);
    }
    tracing::info!(
        after_ms = super::now_ms().saturating_sub(fault.since_ms),
        reopened = recovered == Recovery::Reopened,
        "disk takes writes again: this node takes writes again"
    );
    Ok(())
}

/// The result of one command of a batch, sent to its requester after the commit.
enum Outcome {
    Write(WriteOutcome),
    Done,
    Learned(Option<VersionVector>, Layout),
    Pulled(PullProgress),
    Installed(Installed, Layout),
    Keyed(Layout),
    Deleted(usize),
    Failed(Error),
}

fn answer(cmd: WriterCmd, outcome: Outcome) {
    fn send<T>(tx: Reply<T>, r: Result<T>) {
        let _ = tx.send(r);
    }
    match (cmd, outcome) {
        (WriterCmd::Write { tx, .. }, Outcome::Write(out)) => send(tx, Ok(out)),
        (WriterCmd::Write { tx, .. }, Outcome::Failed(e)) => send(tx, Err(e)),
        (WriterCmd::Sync { tx, .. } | WriterCmd::Claim { tx, .. }, Outcome::Done) => {
            send(tx, Ok(()))
        }
        (WriterCmd::Sync { tx, .. } | WriterCmd::Claim { tx, .. }, Outcome::Failed(e)) => {
            send(tx, Err(e))
        }
        (WriterCmd::Learn { tx, .. }, Outcome::Learned(v, l)) => send(tx, Ok((v, l))),
        (WriterCmd::Learn { tx, .. }, Outcome::Failed(e)) => send(tx, Err(e)),
        (WriterCmd::Pulled { tx, .. }, Outcome::Pulled(p)) => send(tx, Ok(p)),
        (WriterCmd::Pulled { tx, .. }, Outcome::Failed(e)) => send(tx, Err(e)),
        (WriterCmd::Install { tx, .. }, Outcome::Installed(i, l)) => send(tx, Ok((i, l))),
        (WriterCmd::Install { tx, .. }, Outcome::Failed(e)) => send(tx, Err(e)),
        (WriterCmd::Acceptor { tx, .. }, Outcome::Done) => send(tx, Ok(())),
        (WriterCmd::Acceptor { tx, .. }, Outcome::Failed(e)) => send(tx, Err(e)),
        (WriterCmd::SetKey { tx, .. }, Outcome::Keyed(l)) => send(tx, Ok(l)),
        (WriterCmd::SetKey { tx, .. }, Outcome::Failed(e)) => send(tx, Err(e)),
        (WriterCmd::Gc { tx, .. }, Outcome::Deleted(n)) => send(tx, Ok(n)),
        (WriterCmd::Gc { tx, .. }, Outcome::Failed(e)) => send(tx, Err(e)),
        (WriterCmd::Trim { .. } | WriterCmd::Stop, _) => {}
        (_, _) => debug_assert!(false, "a writer command got an outcome of another kind"),
    }
}

/// What changed in a batch and must be persisted before the commit.
#[derive(Default)]
struct Dirty {
    any: bool,
    replica: bool,
    rest: bool,
}

/// Applies a batch in one transaction and commits it (if anything changed).
fn run_batch(
    store: &dyn Store,
    d: &mut Durable,
    trimmed: &mut VersionVector,
    batch: &[WriterCmd],
) -> Result<Vec<Outcome>> {
    let mut txn = store.write()?;
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut dirty = Dirty::default();
    let mut new_trims = Vec::new();
    for cmd in batch {
        let outcome = match cmd {
            WriterCmd::Write { req, partition, .. } => match writable(d, *partition, req) {
                Ok(()) => {
                    dirty.any = true;
                    dirty.replica = true;
                    let r = d.replica.as_mut().expect("writable checked the replica");
                    Outcome::Write(r.write(&mut *txn, req.clone())?)
                }
                Err(e) => Outcome::Failed(e),
            },
            WriterCmd::Sync { page, replica, .. } => match incarnation(d, *replica) {
                Ok(r) => {
                    dirty.any = true;
                    dirty.replica = true;
                    r.apply_sync(&mut *txn, page)?;
                    Outcome::Done
                }
                Err(e) => Outcome::Failed(e),
            },
            WriterCmd::Claim { claim, replica, .. } => match incarnation(d, *replica) {
                Ok(r) => {
                    dirty.any = true;
                    dirty.replica = true;
                    r.claim(claim);
                    Outcome::Done
                }
                Err(e) => Outcome::Failed(e),
            },
            WriterCmd::Trim { floor, replica } => {
                if incarnation(d, *replica).is_ok() {
                    for (origin, upto) in floor.iter() {
                        if upto > trimmed.get(origin) {
                            txn.log_trim(origin, upto)?;
                            new_trims.push((origin, upto));
                            dirty.any = true;
                        }
                    }
                }
                Outcome::Done
            }
            WriterCmd::Learn { transition, .. } => match learn(d, transition) {
                Ok(changed) => {
                    if changed {
                        dirty.any = true;
                        dirty.rest = true;
                    }
                    Outcome::Learned(d.replica.as_ref().map(|r| r.served()), d.layout())
                }
                Err(e) => Outcome::Failed(e),
            },
            WriterCmd::Pulled {
                epoch,
                key,
                states,
                progress,
                ..
            } => match pulled(d, &mut *txn, *epoch, *key, states, progress)? {
                Ok(p) => {
                    dirty.any = true;
                    dirty.rest = true;
                    Outcome::Pulled(p)
                }
                Err(e) => Outcome::Failed(e),
            },
            WriterCmd::Install { view, .. } => match install(d, &mut *txn, view)? {
                Ok(Installed::Unchanged) => Outcome::Installed(Installed::Unchanged, d.layout()),
                Ok(Installed::Switched) => {
                    dirty.any = true;
                    dirty.replica = true;
                    dirty.rest = true;
                    Outcome::Installed(Installed::Switched, d.layout())
                }
                Err(e) => Outcome::Failed(e),
            },
            WriterCmd::Acceptor { acceptor, .. } => {
                if Some(acceptor.epoch) == d.view.as_ref().map(|v| v.epoch + 1) {
                    d.acceptor = Arc::new(acceptor.clone());
                    dirty.any = true;
                    dirty.rest = true;
                    Outcome::Done
                } else {
                    Outcome::Failed(Error::unavailable(
                        "the view changed while a Paxos answer was being recorded",
                    ))
                }
            }
            WriterCmd::SetKey { key, .. } => match &d.cluster_key {
                Some(held) if held == key => Outcome::Keyed(d.layout()),
                Some(_) if !d.outside() => Outcome::Failed(Error::conflict(
                    "this node already holds another cluster key",
                )),
                _ => {
                    d.cluster_key = Some(key.clone());
                    dirty.any = true;
                    dirty.rest = true;
                    Outcome::Keyed(d.layout())
                }
            },
            WriterCmd::Gc { slot, limit, .. } => {
                if d.keeps(*slot) {
                    Outcome::Deleted(0)
                } else {
                    let n = txn.delete_slot(*slot, *limit)?;
                    dirty.any |= n > 0;
                    Outcome::Deleted(n)
                }
            }
            WriterCmd::Stop => Outcome::Done,
        };
        outcomes.push(outcome);
    }
    if dirty.any {
        if dirty.rest {
            d.persist_all(&mut *txn)?;
        } else if dirty.replica {
            if let Some(r) = &d.replica {
                r.persist(&mut *txn)?;
            }
        }
        txn.commit()?;
    }
    for (origin, upto) in new_trims {
        trimmed.raise(origin, upto);
    }
    Ok(outcomes)
}

/// Whether a client write `req`, routed to this node's replica of `partition`, may be
/// accepted now.
fn writable(d: &Durable, partition: PartitionUid, req: &WriteRequest) -> Result<()> {
    let slot = req.slot;
    match &d.replica {
        Some(r) if r.partition() == partition => {
            // Checked by the caller before it queued the write; checked again here, where
            // the replica's state is current (see `Replica::accepts_write`).
            if !r.accepts_write(&req.token) {
                return Err(Error::unavailable(
                    "this replica has not received writes the causal context depends on; \
                     the write was not applied",
                ));
            }
        }
        _ => {
            return Err(Error::unavailable(format!(
                "{} is no longer a replica of partition uid {partition}",
                d.addr
            )))
        }
    }
    if d.leaving {
        return Err(Error::unavailable(
            "this replica is leaving its partition (view change in progress); its peers take the write",
        ));
    }
    if d.frozen.contains(slot) {
        return Err(Error::unavailable(format!(
            "slot {slot} is moving to another partition (view change in progress); retry shortly"
        )));
    }
    Ok(())
}

fn incarnation(d: &mut Durable, id: ReplicaId) -> Result<&mut Replica> {
    match &mut d.replica {
        Some(r) if r.id() == id => Ok(r),
        _ => Err(Error::unavailable(
            "the replica was replaced by a view change",
        )),
    }
}

/// Records a chosen proposal. Returns whether anything changed.
fn learn(d: &mut Durable, t: &Transition) -> Result<bool> {
    let epoch = d.view.as_ref().map_or(0, |v| v.epoch);
    if let Some(cur) = &d.transition {
        if cur.proposal == t.proposal {
            return Ok(false);
        }
        return Err(Error::conflict(format!(
            "this node is already moving to another view of epoch {}",
            cur.proposal.epoch()
        )));
    }
    let fits = match d.view.as_deref() {
        Some(v) => *v == t.proposal.from,
        // A node outside any cluster only learns a change that makes it a member.
        None => t.proposal.to.is_member(&d.addr),
    };
    if !fits || (d.view.is_some() && t.proposal.epoch() != epoch + 1) {
        return Err(Error::unavailable(format!(
            "proposal for epoch {} does not follow this node's view (epoch {epoch})",
            t.proposal.epoch()
        )));
    }
    if d.outside() {
        // A key held from an earlier cluster is not this one's: the node fetches the
        // key of the cluster it is joining from its members (`node::keys`).
        d.cluster_key = None;
    }
    d.transition = Some(Arc::new(t.clone()));
    d.derive();
    Ok(true)
}

/// Merges one pulled page and records the pull's progress.
fn pulled(
    d: &mut Durable,
    txn: &mut dyn WriteTxn,
    epoch: u64,
    key: PullKey,
    states: &[(u32, String, KeyState)],
    progress: &PullProgress,
) -> Result<Result<PullProgress>> {
    let Some(t) = d
        .transition
        .as_mut()
        .filter(|t| t.proposal.epoch() == epoch)
    else {
        return Ok(Err(Error::unavailable(format!(
            "no transition to epoch {epoch} here"
        ))));
    };
    let t = Arc::make_mut(t);
    let current = t.pulls.entry(key).or_default();
    if current.done {
        return Ok(Ok(current.clone()));
    }
    Replica::merge_states(txn, states)?;
    *current = progress.clone();
    Ok(Ok(current.clone()))
}

/// Switches to `view`. See `viewchange` for the claims this makes.
fn install(d: &mut Durable, txn: &mut dyn WriteTxn, view: &View) -> Result<Result<Installed>> {
    if let Err(e) = view.check() {
        return Ok(Err(Error::bad_request(format!(
            "refusing an invalid view: {e}"
        ))));
    }
    if let Some(cur) = &d.view {
        if view.epoch <= cur.epoch {
            return Ok(Ok(Installed::Unchanged));
        }
        if view.cluster != cur.cluster {
            return Ok(Err(Error::conflict("refusing a view of another cluster")));
        }
    } else if !view.is_member(&d.addr) {
        return Ok(Ok(Installed::Unchanged));
    }
    if d.outside() {
        // Joining without having learned the change: as in `learn`, a key held from an
        // earlier cluster is not this one's.
        d.cluster_key = None;
    }
    // The transition's claims hold only if it leads to exactly this view; after a jump
    // over a missed change the replica claims nothing and copies from a peer instead.
    let transition = d.transition.take();
    let matching = transition.as_deref().filter(|t| t.to() == view);
    let absorbed = matching.map(Transition::absorbed_claim).unwrap_or_default();
    match view.role_of(&d.addr) {
        Some(Role::Replica(uid)) => match &mut d.replica {
            Some(r) if r.partition() == uid => r.absorb_claim(&absorbed),
            _ => {
                if d.replica.is_some() {
                    txn.log_clear()?;
                }
                let id = rand::random();
                let mut r = match matching.and_then(|t| t.copy_claim(uid)) {
                    Some(claim) => Replica::from_claim(id, uid, claim),
                    None => Replica::fresh(id, uid),
                };
                r.absorb_claim(&absorbed);
                d.replica = Some(r);
            }
        },
        _ => {
            if d.replica.take().is_some() {
                txn.log_clear()?;
            }
        }
    }
    if view.is_member(&d.addr) {
        d.view = Some(Arc::new(view.clone()));
        d.removed = None;
    } else {
        d.view = None;
        d.removed = Some((view.cluster, view.epoch));
    }
    d.acceptor = Arc::new(Acceptor::new(view.epoch + 1));
    d.derive();
    Ok(Ok(Installed::Switched))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::Change;
    use crate::storage::MemoryStore;
    use crate::viewchange::Proposal;

    fn addr(i: usize) -> String {
        format!("10.1.0.{i}:8080")
    }

    fn view(n: usize, k: usize) -> View {
        View::bootstrap((1..=n).map(addr).collect(), k).expect("valid")
    }

    fn install_in(store: &MemoryStore, d: &mut Durable, v: &View) -> Installed {
        let mut txn = store.write().expect("txn");
        let out = install(d, &mut *txn, v)
            .expect("storage")
            .expect("installs");
        d.persist_all(&mut *txn).expect("persist");
        txn.commit().expect("commit");
        out
    }

    #[test]
    fn a_first_version_data_directory_is_migrated() {
        let v = view(4, 2);
        let applied: VersionVector = [(77, 5)].into_iter().collect();
        let store = MemoryStore::new();
        let mut txn = store.write().expect("txn");
        txn.set_meta(LEGACY_VIEW, &v.legacy_bytes()).expect("meta");
        txn.set_meta(LEGACY_REPLICA, &encode(&(applied.clone(), applied.clone())))
            .expect("meta");
        txn.set_meta(LEGACY_REPLICA_ID, &encode(&77u64))
            .expect("meta");
        txn.commit().expect("commit");

        let d = Durable::load(&store, &addr(3), None).expect("loads");
        assert_eq!(d.view.as_deref(), Some(&v));
        let r = d.replica.as_ref().expect("a replica");
        assert_eq!((r.id(), r.partition()), (77, 1));
        assert_eq!(r.applied(), &applied);
        let read = store.read().expect("read");
        assert!(read.meta(LEGACY_VIEW).expect("meta").is_none());
        assert!(read.meta(META_VIEW).expect("meta").is_some());
        drop(read);
        // And it loads again from the new layout.
        let again = Durable::load(&store, &addr(3), None).expect("loads");
        assert_eq!(again.replica, d.replica);
    }

    #[test]
    fn a_removed_node_ignores_view_and_stays_out() {
        let store = MemoryStore::new();
        let v = view(3, 1);
        let mut d = Durable::load(&store, &addr(3), Some(v.clone())).expect("loads");
        assert!(d.replica.is_some());
        let next = v.apply(&Change::Remove(addr(3))).expect("valid");
        assert_eq!(install_in(&store, &mut d, &next), Installed::Switched);
        assert!(d.view.is_none() && d.replica.is_none());
        // Restarted with its original VIEW (e.g. the same docker run line): still out.
        let d = Durable::load(&store, &addr(3), Some(v)).expect("loads");
        assert!(d.view.is_none() && d.replica.is_none());
        assert_eq!(d.removed, Some((next.cluster, next.epoch)));
    }

    #[test]
    fn a_new_node_keeps_its_transition_across_restarts() {
        let store = MemoryStore::new();
        let mut d = Durable::load(&store, &addr(6), None).expect("loads");
        assert!(d.view.is_none());
        let p = Proposal::new(Change::Add(addr(6)), &view(5, 2)).expect("valid");
        assert!(learn(&mut d, &Transition::new(p.clone())).expect("learns"));
        let mut txn = store.write().expect("txn");
        d.persist_all(&mut *txn).expect("persist");
        txn.commit().expect("commit");
        let d = Durable::load(&store, &addr(6), None).expect("loads");
        assert_eq!(d.transition.as_ref().map(|t| &t.proposal), Some(&p));
        // A proposal that does not make it a member is refused.
        let mut other = Durable::load(&MemoryStore::new(), &addr(9), None).expect("loads");
        assert!(learn(&mut other, &Transition::new(p)).is_err());
    }

    #[test]
    fn install_claims_completed_handoffs_and_starts_fresh_incarnations() {
        // N=5, K=2; adding node 6 forms partition uid 2 from proxy 5 and node 6.
        let v = view(5, 2);
        let p = Proposal::new(Change::Add(addr(6)), &v).expect("valid");
        let claim: VersionVector = [(9, 4)].into_iter().collect();
        let store = MemoryStore::new();
        let mut d = Durable::load(&store, &addr(5), Some(v.clone())).expect("loads");
        assert!(d.replica.is_none(), "a proxy has no replica");
        let mut t = Transition::new(p.clone());
        for (key, _) in duties(&p, &addr(5)).pulls {
            t.pulls.insert(
                key,
                PullProgress {
                    done: true,
                    claim: Some(Claim {
                        applied: VersionVector::new(),
                        absorbed: claim.clone(),
                    }),
                    ..PullProgress::default()
                },
            );
        }
        d.transition = Some(Arc::new(t));
        install_in(&store, &mut d, &p.to);
        let r = d.replica.as_ref().expect("promoted");
        assert_eq!(r.partition(), 2);
        assert_eq!(r.absorbed(), &claim);
        assert!(r.applied().is_empty());
        assert!(d.transition.is_none());

        // A source keeps its incarnation and claims nothing.
        let mut s = Durable::load(&MemoryStore::new(), &addr(1), Some(v.clone())).expect("loads");
        let before = s.replica.clone();
        s.transition = Some(Arc::new(Transition::new(p.clone())));
        install_in(&store, &mut s, &p.to);
        assert_eq!(s.replica, before);

        // Installing a view the transition does not lead to claims nothing either.
        let mut j = Durable::load(&MemoryStore::new(), &addr(5), Some(v.clone())).expect("loads");
        j.transition = d.transition.clone();
        let later = p.to.apply(&Change::Add(addr(7))).expect("valid");
        install_in(&store, &mut j, &later);
        assert!(j.replica.as_ref().is_some_and(|r| r.absorbed().is_empty()));
    }

    fn write_to(slot: u32, token: crate::clock::CausalToken) -> WriteRequest {
        WriteRequest {
            slot,
            key: "k".into(),
            value: Some(b"v".to_vec()),
            token,
            now_ms: 0,
        }
    }

    /// Waits (bounded) until the writer publishes that the disk fault ended.
    fn wait_healed(disk: &watch::Receiver<Option<Arc<DiskFault>>>) {
        let deadline = Instant::now() + 10 * PROBE_INTERVAL;
        while disk.borrow().is_some() {
            assert!(Instant::now() < deadline, "never healed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_disk_fault_degrades_the_writer_until_a_probe_heals_it() {
        use crate::clock::CausalToken;
        use crate::error::ErrorKind;
        use crate::placement::slot_of;
        use crate::storage::RedbStore;

        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(RedbStore::open(dir.path()).expect("open"));
        let durable = Durable::load(&*store, &addr(1), Some(view(1, 1))).expect("loads");
        let (id, partition) = {
            let r = durable.replica.as_ref().expect("a replica");
            (r.id(), r.partition())
        };
        let (replica_tx, replica_rx) = watch::channel(None);
        let (writes_tx, _writes_rx) = watch::channel(0);
        let (disk_tx, disk_rx) = watch::channel(None);
        let (tx, rx) = mpsc::channel(16);
        let writer_store: Arc<dyn Store> = store.clone();
        let thread = std::thread::spawn(move || {
            let publish = Publish {
                replica: replica_tx,
                local_writes: writes_tx,
                disk: disk_tx,
            };
            writer_loop(writer_store, durable, rx, publish)
        });
        let write = |key: &str| -> Result<WriteOutcome> {
            let (reply, answer) = oneshot::channel();
            let req = WriteRequest {
                slot: slot_of(key),
                key: key.into(),
                value: Some(b"v".to_vec()),
                token: CausalToken::default(),
                now_ms: 1,
            };
            tx.blocking_send(WriterCmd::Write {
                req,
                partition,
                tx: reply,
            })
            .expect("the writer runs");
            answer.blocking_recv().expect("an answer")
        };
        let has = |key: &str| {
            store
                .read()
                .and_then(|r| r.get(slot_of(key), key))
                .expect("read")
                .is_some()
        };
        write("a").expect("healthy");

        // A refused append: not applied, retryable, and the writer degrades.
        store.inject_append_failure();
        let e = write("b").expect_err("the disk refuses it");
        assert_eq!(e.kind, ErrorKind::Unavailable, "{e:?}");
        assert!(e.message.contains("disk refuses writes"), "{e:?}");
        assert!(disk_rx.borrow().is_some(), "the fault is published");
        let e = write("c").expect_err("refused while degraded");
        assert_eq!(e.kind, ErrorKind::Unavailable, "{e:?}");
        wait_healed(&disk_rx);
        write("d").expect("healed");
        assert!(!has("b") && !has("c"));

        // A commit whose outcome is unknown: the reopen replays it, and the writer's
        // state follows (the next write gets the next dot, not the unknown one's).
        store.inject_commit_failure();
        let e = write("e").expect_err("the commit failed");
        assert_eq!(e.kind, ErrorKind::OutcomeUnknown, "{e:?}");
        wait_healed(&disk_rx);
        assert!(has("e"), "the replay applied it");
        write("f").expect("healed");
        let applied = replica_rx
            .borrow()
            .as_ref()
            .map(|s| s.applied.get(id))
            .expect("published");
        assert_eq!(applied, 4, "a, d, e and f, each its own dot");
        tx.blocking_send(WriterCmd::Stop).expect("stop");
        thread.join().expect("the writer ends");
    }

    #[test]
    fn frozen_and_leaving_replicas_refuse_writes() {
        let v = view(4, 2);
        let p = Proposal::new(Change::Remove(addr(1)), &v).expect("valid");
        let mut d = Durable::load(&MemoryStore::new(), &addr(2), Some(v.clone())).expect("loads");
        let plain = |slot| write_to(slot, Default::default());
        assert!(writable(&d, 0, &plain(0)).is_ok());
        learn(&mut d, &Transition::new(p)).expect("learns");
        // Partition uid 0 dissolves: node 2 leaves it and freezes all of its slots.
        assert!(writable(&d, 0, &plain(0)).is_err());
        assert!(writable(&d, 1, &plain(1)).is_err(), "not its partition");
    }

    #[test]
    fn writes_depending_on_writes_the_replica_lacks_are_refused() {
        let v = view(2, 2);
        let d = Durable::load(&MemoryStore::new(), &addr(1), Some(v)).expect("loads");
        let mut token = crate::clock::CausalToken::default();
        // A write of replica 99 this replica never received.
        token.observe(0, &[(99, 1)].into_iter().collect());
        let err = writable(&d, 0, &write_to(0, token.clone())).expect_err("refused");
        assert_eq!(err.kind, crate::error::ErrorKind::Unavailable);
        // Its dependencies in other partitions are not this replica's to check.
        let mut other = crate::clock::CausalToken::default();
        other.observe(1, &[(99, 1)].into_iter().collect());
        assert!(writable(&d, 0, &write_to(0, other)).is_ok());
    }
}
