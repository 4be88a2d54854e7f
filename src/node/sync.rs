//! Replication inside a partition: pullers, pokers, the log trimmer, and the serving
//! side of sync and snapshot requests. See `replica` for the protocol and `antientropy`
//! for the decisions these tasks carry out.
//!
//! Each task holds the [`ReplicaHandle`] of the incarnation it was started for and is
//! aborted when a view change replaces it; the writer also refuses pages addressed to an
//! incarnation that is gone, so a page in flight across a switch cannot land in the
//! wrong replica.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::{lock, unexpected, Current, Node, ReplicaHandle, WriterCmd};
use crate::antientropy::{Next, Puller, Transfer};
use crate::clock::VersionVector;
use crate::error::{Error, Result};
use crate::replica::{Replica, SnapshotPage, SnapshotRequest, SyncRequest, SyncResponse};
use crate::rpc::{Request, Response};
use crate::storage::ReadTxn;

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
/// Pages pulled back to back before yielding to the next interval.
const MAX_PAGES_PER_ROUND: usize = 64;
/// How often the log is trimmed of entries every peer has.
const TRIM_INTERVAL: Duration = Duration::from_secs(5);
/// Timeout of a poke; it is only a hint.
const POKE_TIMEOUT: Duration = Duration::from_millis(500);

pub(super) fn spawn_replica_tasks(
    node: &Arc<Node>,
    r: &Arc<ReplicaHandle>,
    tasks: &mut JoinSet<()>,
) {
    for (peer, notify) in &r.peers {
        tasks.spawn(puller(
            node.clone(),
            r.clone(),
            peer.clone(),
            notify.clone(),
        ));
        tasks.spawn(poker(node.clone(), r.clone(), peer.clone()));
        tasks.spawn(super::digests::digest_rounds(
            node.clone(),
            r.clone(),
            peer.clone(),
        ));
    }
    tasks.spawn(trimmer(node.clone(), r.clone()));
}

/// Marks a page fetch (a pull, a state transfer, a digest repair) in flight from before
/// it is requested until its page is applied or abandoned, tagged with the trim round it
/// began in.
///
/// Why: a page a peer served *before* it applied a delete carries the versions the delete
/// removed. Merged after this replica collected the delete's tombstone, it would bring
/// the value back. Such a page was requested before the peer reported the delete, so
/// before the floor that let the tombstone be collected was observed: the trimmer uses a
/// floor only once every fetch begun in its round or earlier is over (the page then
/// merges into the tombstone, which supersedes its versions).
pub(super) struct FetchGuard<'a> {
    r: &'a ReplicaHandle,
    round: u64,
}

impl<'a> FetchGuard<'a> {
    pub(super) fn new(r: &'a ReplicaHandle) -> Self {
        let round = r.trim_round.load(Ordering::SeqCst);
        *lock(&r.fetches).entry(round).or_insert(0) += 1;
        Self { r, round }
    }
}

impl Drop for FetchGuard<'_> {
    fn drop(&mut self) {
        let mut fetches = lock(&self.r.fetches);
        if let Some(n) = fetches.get_mut(&self.round) {
            *n -= 1;
            if *n == 0 {
                fetches.remove(&self.round);
            }
        }
    }
}

/// Whether no fetch begun in `round` or earlier is still in flight.
fn fetches_over(r: &ReplicaHandle, round: u64) -> bool {
    lock(&r.fetches).range(..=round).next().is_none()
}

/// Keeps this replica up to date with `peer`. See the module doc of `node`.
async fn puller(node: Arc<Node>, r: Arc<ReplicaHandle>, peer: String, wake: Arc<Notify>) {
    // The first round runs at once: a restarted replica catches up before anything else.
    let mut first = true;
    // Only transitions are logged, so a long outage is two lines, not one per round.
    let mut reachable = true;
    let mut policy = Puller::default();
    loop {
        if !first {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(SYNC_INTERVAL) => {}
            }
        }
        first = false;
        // While this node's disk refuses writes, pages could not be applied: the writer
        // probes the disk, and the next round after it heals catches up.
        if node.disk_fault().is_some() {
            continue;
        }
        for _ in 0..MAX_PAGES_PER_ROUND {
            let _fetch = FetchGuard::new(&r);
            let Some(status) = node.status_of(&r) else {
                return;
            };
            let req = Request::Sync(SyncRequest {
                partition: r.partition,
                have: status.applied.clone(),
                max_entries: SYNC_PAGE_ENTRIES,
                max_bytes: SYNC_PAGE_BYTES,
            });
            let resp = match node.send(&peer, &node.envelope(req), SYNC_TIMEOUT).await {
                Ok(Response::Sync(resp)) => {
                    if !reachable {
                        tracing::info!(%peer, "peer replica reachable again");
                        reachable = true;
                    }
                    resp
                }
                Ok(other) => {
                    tracing::debug!(%peer, "sync refused: {other:?}");
                    break;
                }
                Err(e) => {
                    if reachable {
                        tracing::warn!(%peer, "peer replica unreachable, will keep trying: {e}");
                        reachable = false;
                    }
                    break;
                }
            };
            let next = policy.after_page(
                &resp,
                &status.absorbed,
                r.peers.len(),
                node.current().transition.is_some(),
            );
            let brought = !resp.log.is_empty() || !resp.states.is_empty();
            // A quorum write at the peer waits for this replica to report the page.
            let report = brought && resp.ack_wanted;
            if brought {
                if let Err(e) = node.apply_page(&r, resp).await {
                    tracing::warn!(%peer, "applying a sync page failed: {e}");
                    break;
                }
            }
            match next {
                Next::Done if report => continue,
                Next::More => continue,
                Next::Done | Next::Wait => break,
                Next::CopyState => {
                    tracing::warn!(
                        %peer,
                        "this replica lacks writes no peer's log holds any more; copying the peer's whole state"
                    );
                    match node.transfer_snapshot(&r, &peer).await {
                        Ok(keys) => tracing::info!(%peer, keys, "full-state transfer done"),
                        Err(e) => {
                            tracing::warn!(%peer, "full-state transfer failed, will retry: {e}")
                        }
                    }
                    break;
                }
            }
        }
    }
}

/// Tells `peer` to pull after local writes. Pokes coalesce: while one is in flight,
/// further writes mark the watch changed once.
async fn poker(node: Arc<Node>, r: Arc<ReplicaHandle>, peer: String) {
    let mut writes = node.local_writes.clone();
    writes.borrow_and_update();
    loop {
        if writes.changed().await.is_err() {
            return;
        }
        let env = node.envelope(Request::Poke {
            partition: r.partition,
        });
        if let Err(e) = node.send(&peer, &env, POKE_TIMEOUT).await {
            tracing::trace!(%peer, "poke failed: {e}");
        }
    }
}

/// Dead keys examined per trim round for collection (up to 2,000 a second, well above
/// a busy node's delete rate): bounds the round's work; the next
/// round goes on from where this one stopped.
const COLLECT_PER_ROUND: usize = 10_000;

/// Periodically trims log entries every peer of the partition has, and collects the
/// tombstones every peer has (see `Replica::collectable`).
async fn trimmer(node: Arc<Node>, r: Arc<ReplicaHandle>) {
    // Where the collection of tombstones goes on from (`None`: the start).
    let mut cursor = None;
    // The floor observed in an earlier round, waiting for the fetches begun before it
    // (see `FetchGuard`), with its round.
    let mut pending: Option<(u64, VersionVector)> = None;
    loop {
        tokio::time::sleep(TRIM_INTERVAL).await;
        // During a view change a member joining the partition will resume the log from
        // the vector its copy claimed: keep the log whole until the switch.
        if node.current().transition.is_some() {
            continue;
        }
        let Some(status) = node.status_of(&r) else {
            return;
        };
        let floor = {
            let have = lock(&r.peer_have);
            // Only trim when every peer has told us how far it is.
            if have.len() < r.peers.len() {
                continue;
            }
            Replica::trim_floor(&status.applied, have.values())
        };
        if floor.is_empty() {
            continue;
        }
        let round = r.trim_round.fetch_add(1, Ordering::SeqCst);
        let cmd = WriterCmd::Trim {
            floor: floor.clone(),
            replica: r.id,
        };
        if node.writer.send(cmd).await.is_err() {
            return;
        }
        if let Some((seen, older)) = pending.take() {
            if !fetches_over(&r, seen) {
                pending = Some((seen, older));
                continue;
            }
            match node.collect_tombstones(&r, older, &mut cursor).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(tombstones = n, "collected tombstones every replica has"),
                Err(e) => tracing::debug!("collecting tombstones failed: {e}"),
            }
        }
        pending = Some((round, floor));
    }
}

impl Node {
    pub(super) async fn serve_sync(
        self: &Arc<Self>,
        cur: &Current,
        from: &str,
        req: SyncRequest,
    ) -> Result<SyncResponse> {
        let r = self.serving_replica(cur, req.partition)?;
        // Remember how far this peer is: it decides how much of the log may be trimmed.
        // It also acknowledges quorum writes waiting here.
        if r.peers.iter().any(|(a, _)| a == from) {
            lock(&r.peer_have).insert(from.to_string(), req.have.clone());
            r.acked.notify_waiters();
        }
        let req = SyncRequest {
            max_entries: req.max_entries.min(SYNC_PAGE_ENTRIES),
            max_bytes: req.max_bytes.min(SYNC_PAGE_BYTES),
            ..req
        };
        let owned = r.owned.clone();
        let mut resp = self
            .serve_from_snapshot(&r, move |txn, state| {
                Replica::serve_sync(txn, state, &owned, &req)
            })
            .await?;
        resp.ack_wanted = r.ack_waiters.load(Ordering::SeqCst) > 0;
        Ok(resp)
    }

    pub(super) async fn serve_snapshot(
        self: &Arc<Self>,
        cur: &Current,
        req: SnapshotRequest,
    ) -> Result<SnapshotPage> {
        if let Some(epoch) = req.epoch {
            if cur.epoch() != epoch {
                return Err(Error::unavailable(format!(
                    "{} is in view epoch {}, not {epoch}",
                    self.addr,
                    cur.epoch()
                )));
            }
            // A handoff is reading from us: the change is alive.
            self.transition_active();
        }
        let r = self.serving_replica(cur, req.partition)?;
        let mut slots = r.owned.clone();
        if let Some(wanted) = &req.slots {
            slots.intersect(wanted);
        }
        let req = SnapshotRequest {
            max_entries: req.max_entries.min(SYNC_PAGE_ENTRIES),
            max_bytes: req.max_bytes.min(SYNC_PAGE_BYTES),
            ..req
        };
        self.serve_from_snapshot(&r, move |txn, state| {
            Replica::serve_snapshot(txn, state, &slots, &req)
        })
        .await
    }

    /// This node's replica of `partition`, for answering a peer.
    pub(super) fn serving_replica(
        &self,
        cur: &Current,
        partition: u32,
    ) -> Result<Arc<ReplicaHandle>> {
        cur.local(partition)
            .cloned()
            .ok_or_else(|| self.not_a_replica(partition))
    }

    /// Runs `read` on a blocking thread over one store snapshot.
    pub(super) async fn read_blocking<T: Send + 'static>(
        self: &Arc<Self>,
        read: impl FnOnce(&dyn ReadTxn) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let node = self.clone();
        tokio::task::spawn_blocking(move || read(&*node.store.read()?))
            .await
            .map_err(|e| Error::internal(format!("storage read task failed: {e}")))?
    }

    /// Runs `serve` on a blocking thread over one store snapshot and the replica state of
    /// that same snapshot, so what it claims matches what it reads.
    async fn serve_from_snapshot<T: Send + 'static>(
        self: &Arc<Self>,
        r: &ReplicaHandle,
        serve: impl FnOnce(&dyn ReadTxn, &Replica) -> crate::storage::Result<T> + Send + 'static,
    ) -> Result<T> {
        let (id, partition) = (r.id, r.partition);
        let node = self.clone();
        tokio::task::spawn_blocking(move || {
            let txn = node.store.read()?;
            let state = Replica::load(&*txn)?
                .filter(|s| s.id() == id)
                .ok_or_else(|| node.not_a_replica(partition))?;
            Ok(serve(&*txn, &state)?)
        })
        .await
        .map_err(|e| Error::internal(format!("serving task failed: {e}")))?
    }

    /// One round of tombstone collection: picks, from a snapshot, up to
    /// [`COLLECT_PER_ROUND`] dead keys after `cursor` that every replica has applied and
    /// that are older than the horizon, and has the writer drop those still so. Returns
    /// how many it dropped.
    async fn collect_tombstones(
        self: &Arc<Self>,
        r: &ReplicaHandle,
        floor: VersionVector,
        cursor: &mut Option<(u32, String)>,
    ) -> Result<usize> {
        let horizon = u64::try_from(self.tombstone_horizon.as_micros()).unwrap_or(u64::MAX);
        let cutoff_us = super::now_us().saturating_sub(horizon);
        let owned = r.owned.clone();
        let (after, pick_floor) = (cursor.clone(), floor.clone());
        let (candidates, next) = self
            .read_blocking(move |txn| {
                let dead = txn.dead_keys(after.as_ref(), COLLECT_PER_ROUND)?;
                let next = (dead.len() == COLLECT_PER_ROUND)
                    .then(|| dead.last().cloned())
                    .flatten();
                let mut candidates = Vec::new();
                for (slot, key) in dead.into_iter().filter(|(slot, _)| owned.contains(*slot)) {
                    if txn
                        .get(slot, &key)?
                        .is_some_and(|s| Replica::collectable(&s, &pick_floor, cutoff_us))
                    {
                        candidates.push((slot, key));
                    }
                }
                Ok((candidates, next))
            })
            .await?;
        *cursor = next;
        if candidates.is_empty() {
            return Ok(0);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_writer(WriterCmd::Collect {
            candidates,
            floor,
            cutoff_us,
            replica: r.id,
            tx,
        })
        .await?;
        rx.await
            .map_err(|_| Error::unavailable("the node is shutting down"))?
    }

    /// Hands a page to the writer and waits until it is committed.
    pub(super) async fn apply_page(&self, r: &ReplicaHandle, page: SyncResponse) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_writer(WriterCmd::Sync {
            page,
            replica: r.id,
            tx,
        })
        .await?;
        rx.await
            .map_err(|_| Error::unavailable("the node is shutting down"))?
    }

    /// Rebuilds this replica from `peer`'s whole state, page by page (see
    /// [`Transfer`]).
    async fn transfer_snapshot(&self, r: &ReplicaHandle, peer: &str) -> Result<usize> {
        let mut transfer = Transfer::new(r.partition);
        while !transfer.is_done() {
            let req = Request::Snapshot(transfer.request(SYNC_PAGE_ENTRIES, SYNC_PAGE_BYTES));
            let page = match self.send(peer, &self.envelope(req), SYNC_TIMEOUT).await? {
                Response::Snapshot(page) => page,
                Response::Error(e) => return Err(e),
                other => return Err(unexpected(&other)),
            };
            self.apply_page(r, transfer.on_page(page)).await?;
        }
        let keys = transfer.keys;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_writer(WriterCmd::Claim {
            claim: transfer.claim(),
            replica: r.id,
            tx,
        })
        .await?;
        rx.await
            .map_err(|_| Error::unavailable("the node is shutting down"))??;
        Ok(keys)
    }
}
