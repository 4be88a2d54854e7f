//! Driving a chosen change to completion: learn, drain, pull and install on every
//! participant, from whichever node coordinates it (the one that received
//! `update_view`, or any participant re-driving a change that stalled). Every step is
//! idempotent, so several nodes may drive the same change at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::progress::Stall;
use super::{BEHIND_BASE, DRAIN_WAIT, PULL_TIMEOUT, STEP_TIMEOUT};
use crate::clock::{PartitionUid, VersionVector};
use crate::error::{Error, Result};
use crate::node::{lock, unexpected, Node};
use crate::placement::Role;
use crate::replica::Claim;
use crate::rpc::{LearnReply, Request, Response};
use crate::viewchange::{duties, Proposal, PullKey};

/// Pause between retries of a failed step.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// A node in a transition that has not completed this long after it learned it drives
/// the change itself (staggered by its rank among the participants).
pub const REDRIVE_AFTER: Duration = Duration::from_secs(5);

impl Node {
    /// Drives a chosen proposal to completion. Idempotent; see `viewchange`.
    pub(super) async fn execute(self: &Arc<Self>, p: &Proposal) -> Result<()> {
        let result = self.execute_steps(p).await;
        match &result {
            Ok(()) => self.update_progress(|pr| pr.phase = "done".into()),
            Err(e) => self.fail_progress(e),
        }
        result
    }

    async fn execute_steps(self: &Arc<Self>, p: &Proposal) -> Result<()> {
        let epoch = p.epoch();
        self.ensure_progress(p);
        let plan = p.plan();
        let removed = p.change.removed();
        // Partitions whose writes must be drained: those that give slots away, lose a
        // replica or gain one (see `Plan::drained`).
        let drain: Vec<PartitionUid> = plan.drained();
        // Nodes that must learn: replicas of drained partitions, and every destination.
        let mut required: Vec<String> = Vec::new();
        for uid in &drain {
            required.extend(p.from.replicas_of(*uid).unwrap_or_default().iter().cloned());
        }
        for m in &p.to.members {
            if !duties(p, m).pulls.is_empty() {
                required.push(m.clone());
            }
        }
        required.retain(|n| Some(n.as_str()) != removed);
        required.sort();
        required.dedup();

        // 1. Learn.
        self.update_progress(|pr| pr.phase = "learning".into());
        let mut served: BTreeMap<String, VersionVector> = BTreeMap::new();
        let mut stall = Stall::new();
        let mut pending: Vec<String> = p.participants();
        loop {
            let answers = join_all(
                pending
                    .iter()
                    .map(|n| self.call(n, Request::Learn(p.clone()), STEP_TIMEOUT)),
            )
            .await;
            let mut left = Vec::new();
            for (n, answer) in pending.iter().zip(answers) {
                match answer {
                    Ok(Response::Learned(LearnReply::Learned(vv))) => {
                        if let Some(vv) = vv {
                            served.insert(n.clone(), vv);
                        }
                    }
                    // Someone already installed the new view: every pull was done.
                    Ok(Response::Learned(LearnReply::Installed)) => {
                        return self.install_everywhere(p).await;
                    }
                    Ok(other) => return Err(unexpected(&other)),
                    Err(e) => {
                        if e.message.contains(BEHIND_BASE) {
                            let _ = self
                                .call(n, Request::Install(p.from.clone()), STEP_TIMEOUT)
                                .await;
                        }
                        if required.contains(n) {
                            tracing::debug!(node = %n, "learn failed, will retry: {e}");
                            left.push(n.clone());
                        }
                    }
                }
            }
            if left.len() < pending.len() {
                stall.progressed();
            }
            if left.is_empty() {
                break;
            }
            stall.check(epoch, || left.join(", "))?;
            pending = left;
            tokio::time::sleep(RETRY_PAUSE).await;
        }

        // 2. Drain: per partition, one replica reflects every write any of its replicas
        //    had acknowledged when it froze.
        self.update_progress(|pr| pr.phase = "draining".into());
        let mut sources: BTreeMap<PartitionUid, (String, VersionVector)> = BTreeMap::new();
        for uid in &drain {
            let replicas = p.from.replicas_of(*uid).unwrap_or_default();
            let mut target = VersionVector::new();
            for r in replicas {
                if let Some(vv) = served.get(r) {
                    target.merge(vv);
                }
            }
            // Prefer replicas that stay in the partition; a dissolved one has none.
            let staying = p.to.replicas_of(*uid).unwrap_or_default();
            let mut candidates: Vec<&String> = replicas
                .iter()
                .filter(|r| served.contains_key(*r))
                .collect();
            candidates.sort_by_key(|r| !staying.contains(r));
            let source = 'retry: loop {
                for c in &candidates {
                    let req = Request::Drain {
                        epoch: p.from.epoch,
                        partition: *uid,
                        target: target.clone(),
                    };
                    match self.call(c, req, DRAIN_WAIT + STEP_TIMEOUT).await {
                        Ok(_) => break 'retry (*c).clone(),
                        Err(e) => tracing::debug!(node = %c, "drain failed, will retry: {e}"),
                    }
                }
                stall.check(epoch, || {
                    format!(
                        "a replica of partition {} to catch up with its peers",
                        p.from.index_of(*uid).unwrap_or_default()
                    )
                })?;
                tokio::time::sleep(RETRY_PAUSE).await;
            };
            stall.progressed();
            sources.insert(*uid, (source, target));
        }

        // 3. Pull: every destination copies what it receives.
        self.update_progress(|pr| pr.phase = "moving".into());
        let mut work = Vec::new();
        for node in &p.to.members {
            for (key, _) in duties(p, node).pulls {
                let (uid, claim) = match key {
                    PullKey::Move { from } => {
                        let claim = sources.get(&from).map(|(_, vv)| Claim {
                            applied: VersionVector::new(),
                            absorbed: vv.clone(),
                        });
                        (from, claim)
                    }
                    PullKey::Copy { uid } => (uid, None),
                };
                let source = match sources.get(&uid) {
                    Some((s, _)) => s.clone(),
                    None => {
                        return Err(Error::internal(format!(
                            "no drained source for partition uid {uid}"
                        )))
                    }
                };
                work.push((node.clone(), key, source, claim));
            }
        }
        self.update_progress(|pr| pr.pulls_total = work.len());
        let results = join_all(
            work.iter()
                .map(|(node, key, source, claim)| self.run_pull(p, node, *key, source, claim)),
        )
        .await;
        for r in results {
            r?;
        }

        // 4. Install.
        self.install_everywhere(p).await
    }

    /// Pulls one work item to completion, page by page.
    async fn run_pull(
        self: &Arc<Self>,
        p: &Proposal,
        node: &str,
        key: PullKey,
        source: &str,
        claim: &Option<Claim>,
    ) -> Result<()> {
        let mut stall = Stall::new();
        let uid = match p.to.role_of(node) {
            Some(Role::Replica(uid)) => uid,
            _ => return Err(Error::internal(format!("{node} pulls but is no replica"))),
        };
        loop {
            let req = Request::Pull {
                epoch: p.epoch(),
                key,
                source: source.to_string(),
                claim: claim.clone(),
            };
            match self.call(node, req, PULL_TIMEOUT).await {
                Ok(Response::Pulled(progress)) => {
                    stall.progressed();
                    self.update_progress(|pr| {
                        pr.record(uid, key, node, progress.keys, progress.bytes);
                        if progress.done {
                            pr.pulls_done += 1;
                        }
                    });
                    if progress.done {
                        return Ok(());
                    }
                }
                Ok(other) => return Err(unexpected(&other)),
                Err(e) => {
                    tracing::debug!(%node, ?key, "pull step failed, will retry: {e}");
                    stall.check(p.epoch(), || format!("{node} to copy from {source} ({e})"))?;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    /// Installs the proposal's view on every participant, this node last.
    async fn install_everywhere(self: &Arc<Self>, p: &Proposal) -> Result<()> {
        self.update_progress(|pr| pr.phase = "installing".into());
        let others: Vec<String> = p
            .participants()
            .into_iter()
            .filter(|n| *n != self.addr)
            .collect();
        let mut pending = others;
        for _ in 0..3 {
            let answers = join_all(
                pending
                    .iter()
                    .map(|n| self.call(n, Request::Install(p.to.clone()), STEP_TIMEOUT)),
            )
            .await;
            pending = pending
                .into_iter()
                .zip(answers)
                .filter(|(_, a)| a.is_err())
                .map(|(n, _)| n)
                .collect();
            if pending.is_empty() {
                break;
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        if !pending.is_empty() {
            // They missed nothing they need: they catch up with the new view from the
            // first peer that talks to them (or that they talk to).
            tracing::warn!(
                nodes = %pending.join(", "),
                epoch = p.epoch(),
                "could not tell these nodes about the new view; they will learn it when they are back"
            );
        }
        self.install_view(p.to.clone()).await?;
        Ok(())
    }
}

/// Drives a transition that stalled (its coordinator crashed, or a node it needed was
/// down). Only nodes with a part in the change do it (an idle bystander learns nothing
/// from its own inactivity), once it has seen no activity for [`REDRIVE_AFTER`],
/// staggered by rank so that usually one node does it.
pub(in crate::node) async fn redrive_loop(node: Arc<Node>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(t) = node.current().transition.clone() else {
            continue;
        };
        let Some(since) = *lock(&node.learned_at) else {
            continue;
        };
        let mine = duties(&t.proposal, &node.addr);
        if mine.frozen.is_empty() && mine.pulls.is_empty() && !mine.leaving {
            continue;
        }
        let rank = t
            .proposal
            .participants()
            .iter()
            .position(|p| *p == node.addr)
            .unwrap_or(0) as u32;
        if since.elapsed() < REDRIVE_AFTER + Duration::from_secs(2) * rank {
            continue;
        }
        let Ok(_one) = node.coordinating.try_lock() else {
            continue;
        };
        tracing::warn!(
            change = %t.proposal.change,
            epoch = t.proposal.epoch(),
            "a view change has not completed; driving it from this node"
        );
        match node.execute(&t.proposal).await {
            Ok(()) => tracing::info!(epoch = t.proposal.epoch(), "view change completed"),
            Err(e) => tracing::warn!("view change still incomplete: {e}"),
        }
        *lock(&node.learned_at) = Some(Instant::now());
    }
}
