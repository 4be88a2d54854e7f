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
//! This file holds the thread, its commands and what it publishes; besides:
//!
//! * `batch.rs`: what each command does to the durable state, one batch per transaction;
//! * `durable.rs`: the durable state, loaded (and migrated) at start, persisted in the
//!   store's meta table;
//! * `fault.rs`: how the writer degrades on a disk fault and heals when the disk does.

mod batch;
mod durable;
mod fault;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};

pub(super) use durable::Durable;
pub use fault::DiskFault;

use super::Layout;
use crate::auth::ClusterKey;
use crate::clock::{PartitionUid, ReplicaId, VersionVector};
use crate::error::{Error, Result};
use crate::placement::View;
use crate::replica::{Claim, KeyState, Replica, SyncResponse, WriteOutcome, WriteRequest};
use crate::storage::Store;
use crate::viewchange::{Acceptor, PullKey, PullProgress, Transition};
use batch::run_batch;
use fault::{heal, DEGRADED_POLL, PROBE_INTERVAL};

/// Writer queue length: when full, request handlers wait (backpressure).
pub const WRITER_QUEUE: usize = 4_096;
/// Commands per transaction.
pub const MAX_BATCH: usize = 512;

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
    /// Drop the keys of `candidates` whose states are still collectable tombstones (see
    /// `Replica::collectable`); answers how many were dropped.
    Collect {
        candidates: Vec<(u32, String)>,
        floor: VersionVector,
        cutoff_us: u64,
        replica: ReplicaId,
        tx: Reply<usize>,
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
                let mut local_writes = 0usize;
                for (cmd, outcome) in batch.drain(..).zip(outcomes) {
                    local_writes += usize::from(matches!(outcome, Outcome::Write(_)));
                    answer(cmd, outcome);
                }
                if local_writes > 0 {
                    // How well group commit shares its fsync among clients; commits of
                    // sync pages or view-change steps alone say nothing of that.
                    metrics::histogram!(crate::metric_names::WAL_BATCH_WRITES)
                        .record(local_writes as f64);
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
        (WriterCmd::Gc { tx, .. } | WriterCmd::Collect { tx, .. }, Outcome::Deleted(n)) => {
            send(tx, Ok(n))
        }
        (WriterCmd::Gc { tx, .. } | WriterCmd::Collect { tx, .. }, Outcome::Failed(e)) => {
            send(tx, Err(e))
        }
        (WriterCmd::Trim { .. } | WriterCmd::Stop, _) => {}
        (_, _) => debug_assert!(false, "a writer command got an outcome of another kind"),
    }
}

#[cfg(test)]
mod testing {
    use super::batch::install;
    use super::{Durable, Installed};
    use crate::placement::View;
    use crate::storage::{MemoryStore, Store};

    pub(super) fn addr(i: usize) -> String {
        format!("10.1.0.{i}:8080")
    }

    pub(super) fn view(n: usize, k: usize) -> View {
        View::bootstrap((1..=n).map(addr).collect(), k).expect("valid")
    }

    pub(super) fn install_in(store: &MemoryStore, d: &mut Durable, v: &View) -> Installed {
        let mut txn = store.write().expect("txn");
        let out = install(d, &mut *txn, v)
            .expect("storage")
            .expect("installs");
        d.persist_all(&mut *txn).expect("persist");
        txn.commit().expect("commit");
        out
    }
}
