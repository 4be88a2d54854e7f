//! The steps of a view change as each node takes them when the coordinator asks:
//! learn the chosen proposal, drain a source replica, pull one page of moving keys,
//! install the new view. See `viewchange` for what each step promises.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{BEHIND_BASE, DRAIN_WAIT, PULL_TIMEOUT};
use crate::clock::{PartitionUid, VersionVector};
use crate::error::{Error, Result};
use crate::node::{
    lock, unexpected, Node, ReplicaStatus, WriterCmd, SYNC_PAGE_BYTES, SYNC_PAGE_ENTRIES,
};
use crate::placement::{Role, SlotSet, View};
use crate::replica::{Claim, SnapshotRequest};
use crate::rpc::{LearnReply, Request, Response};
use crate::viewchange::{duties, Proposal, PullKey, PullProgress};

/// Fault injection for tests: when set, every pull step sleeps this many milliseconds
/// first, which stretches a view change so a test can crash a node in the middle of it
/// (in the spirit of FoundationDB's BUGGIFY). Read once per process.
pub const PULL_DELAY_ENV: &str = "KVS_PULL_PAGE_DELAY_MS";

impl Node {
    /// Records a chosen proposal (step 1). Only called with proposals known chosen.
    pub(in crate::node) async fn learn(self: &Arc<Self>, p: Proposal) -> Result<LearnReply> {
        p.check().map_err(Error::bad_request)?;
        let _g = self.reconfig.lock().await;
        let cur = self.current();
        if cur.view.is_some() && cur.epoch() >= p.epoch() {
            return Ok(LearnReply::Installed);
        }
        if cur.view.is_some() && cur.epoch() < p.from.epoch {
            return Err(Error::unavailable(format!(
                "{} is at epoch {}, {BEHIND_BASE} {}",
                self.addr,
                cur.epoch(),
                p.from.epoch
            )));
        }
        let fresh = cur.transition.is_none();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_writer(WriterCmd::Learn {
            transition: crate::viewchange::Transition::new(p.clone()),
            tx,
        })
        .await?;
        let (served, layout) = rx
            .await
            .map_err(|_| Error::unavailable("the node is shutting down"))??;
        if fresh {
            tracing::info!(change = %p.change, epoch = p.epoch(), "learned a view change");
        }
        *lock(&self.learned_at) = Some(Instant::now());
        self.apply_layout(layout);
        Ok(LearnReply::Learned(served))
    }

    /// Step 2 at a source replica: wait until it reflects `target`.
    pub(in crate::node) async fn drain(
        self: &Arc<Self>,
        epoch: u64,
        partition: PartitionUid,
        target: VersionVector,
    ) -> Result<()> {
        let cur = self.current();
        if cur.epoch() != epoch {
            return Err(Error::unavailable(format!(
                "{} is in view epoch {}, not {epoch}",
                self.addr,
                cur.epoch()
            )));
        }
        let r = cur
            .local(partition)
            .cloned()
            .ok_or_else(|| self.not_a_replica(partition))?;
        self.transition_active();
        let reached = |s: &Option<Arc<ReplicaStatus>>| {
            s.as_ref()
                .is_some_and(|s| s.id == r.id && s.served.dominates(&target))
        };
        if reached(&self.replica_status.borrow()) {
            return Ok(());
        }
        for (_, notify) in &r.peers {
            notify.notify_one();
        }
        let mut status = self.replica_status.clone();
        let caught_up = matches!(
            tokio::time::timeout(DRAIN_WAIT, status.wait_for(reached)).await,
            Ok(Ok(_))
        );
        if caught_up {
            Ok(())
        } else {
            Err(Error::unavailable(format!(
                "{} could not catch up with its peers within {DRAIN_WAIT:?}",
                self.addr
            )))
        }
    }

    /// Step 3 at a destination: copy one page of pull `key` from `source`.
    pub(in crate::node) async fn pull_step(
        self: &Arc<Self>,
        epoch: u64,
        key: PullKey,
        source: String,
        claim: Option<Claim>,
    ) -> Result<PullProgress> {
        let step = lock(&self.pulling).entry(key).or_default().clone();
        let _one = step.lock().await;
        if let Some(delay) = pull_delay() {
            tokio::time::sleep(delay).await;
        }
        let cur = self.current();
        if cur.view.is_some() && cur.epoch() >= epoch {
            return Ok(PullProgress {
                done: true,
                ..PullProgress::default()
            });
        }
        let t = cur
            .transition
            .clone()
            .filter(|t| t.proposal.epoch() == epoch)
            .ok_or_else(|| Error::unavailable(format!("no transition to epoch {epoch} here")))?;
        let slots: SlotSet = duties(&t.proposal, &self.addr)
            .pulls
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, s)| s)
            .ok_or_else(|| Error::bad_request(format!("{key:?} is not a pull of this node")))?;
        let mut progress = lock(&self.pull_progress)
            .get(&key)
            .cloned()
            .or_else(|| t.pulls.get(&key).cloned())
            .unwrap_or_default();
        if progress.done {
            return Ok(progress);
        }
        let partition = match key {
            PullKey::Move { from } => from,
            PullKey::Copy { uid } => uid,
        };
        // Data comes only from a replica of that partition in the change's old view,
        // whoever names the source.
        if !t
            .from()
            .replicas_of(partition)
            .is_some_and(|r| r.contains(&source))
        {
            return Err(Error::bad_request(format!(
                "{source} is not a replica of the partition {key:?} copies from"
            )));
        }
        let req = Request::Snapshot(SnapshotRequest {
            partition,
            epoch: Some(t.from().epoch),
            slots: Some(slots),
            after: progress.next.clone(),
            max_entries: SYNC_PAGE_ENTRIES,
            max_bytes: SYNC_PAGE_BYTES,
        });
        let page = match self.call(&source, req, PULL_TIMEOUT).await? {
            Response::Snapshot(page) => page,
            other => return Err(unexpected(&other)),
        };
        progress.claim = match key {
            // Keep the first claim made: any made after the drain is valid.
            PullKey::Move { .. } => progress.claim.or(claim),
            PullKey::Copy { .. } => progress.claim.or(Some(Claim {
                applied: page.applied.clone(),
                absorbed: page.absorbed.clone(),
            })),
        };
        if progress.claim.is_none() {
            return Err(Error::bad_request(
                "a move needs the drained sources' claim",
            ));
        }
        progress.keys += page.states.len() as u64;
        progress.bytes += page
            .states
            .iter()
            .map(|(_, k, s)| (k.len() + s.approx_size()) as u64)
            .sum::<u64>();
        progress.done = page.next.is_none();
        progress.next = page.next;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_writer(WriterCmd::Pulled {
            epoch,
            key,
            states: page.states,
            progress,
            tx,
        })
        .await?;
        let progress = rx
            .await
            .map_err(|_| Error::unavailable("the node is shutting down"))??;
        lock(&self.pull_progress).insert(key, progress.clone());
        self.transition_active();
        Ok(progress)
    }

    /// Step 4 (and how a node behind catches up): switch to `view` if it is newer.
    /// Returns whether it switched.
    pub(in crate::node) async fn install_view(self: &Arc<Self>, view: View) -> Result<bool> {
        view.check()
            .map_err(|e| Error::bad_request(format!("refusing an invalid view: {e}")))?;
        let _g = self.reconfig.lock().await;
        if self.view().is_some_and(|v| v.epoch >= view.epoch) {
            return Ok(false);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_writer(WriterCmd::Install {
            view: view.clone(),
            tx,
        })
        .await?;
        let (installed, layout) = rx
            .await
            .map_err(|_| Error::unavailable("the node is shutting down"))??;
        if installed == crate::node::writer::Installed::Unchanged {
            return Ok(false);
        }
        self.apply_layout(layout);
        lock(&self.pull_progress).clear();
        lock(&self.pulling).clear();
        *lock(&self.learned_at) = None;
        let role = match view.role_of(&self.addr) {
            Some(Role::Replica(uid)) => {
                format!("partition {}", view.index_of(uid).unwrap_or_default())
            }
            Some(Role::Proxy) => "proxy".into(),
            None => "removed from the cluster".into(),
        };
        tracing::info!(
            epoch = view.epoch,
            partitions = view.partition_count(),
            members = view.members.len(),
            %role,
            "installed a new view"
        );
        self.spawn_gc();
        Ok(true)
    }

    /// Notes activity of the transition this node is in (see `redrive_loop`).
    pub(in crate::node) fn transition_active(&self) {
        let mut at = lock(&self.learned_at);
        if at.is_some() {
            *at = Some(Instant::now());
        }
    }
}

/// The test delay of [`PULL_DELAY_ENV`], if set.
fn pull_delay() -> Option<Duration> {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        let ms: u64 = std::env::var(PULL_DELAY_ENV).ok()?.parse().ok()?;
        tracing::warn!("{PULL_DELAY_ENV}={ms}: every transfer page is delayed (a testing aid)");
        Some(Duration::from_millis(ms))
    })
}
