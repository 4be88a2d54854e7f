//! View changes in the shell: coordinating `update_view`, the Paxos acceptor, the steps
//! every node takes (learn, drain, pull, install), and the background tasks that keep a
//! cluster's views together (re-driving a stalled change, catching up with a newer view,
//! deleting handed-over slots). The protocol itself is explained in `viewchange`.
//!
//! The coordinator of a change is whichever node received `update_view`. It checks the
//! request against every member first (so a bad request changes nothing), gets the new
//! view chosen, then drives the steps and answers when every reachable node has
//! installed the new view. If a step cannot complete (a node it needs is down) for
//! [`STALL_LIMIT`], the client gets a retryable 503; the change stays chosen and is
//! finished by re-issuing any `update_view`, or by the background re-drive that every
//! node in the transition runs after [`REDRIVE_AFTER`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::Serialize;

use super::{lock, now_ms, unexpected, Node, WriterCmd, SYNC_PAGE_BYTES, SYNC_PAGE_ENTRIES};
use crate::clock::{PartitionUid, VersionVector};
use crate::error::{Error, ErrorKind, Result};
use crate::placement::{Change, ChangeError, Role, SlotSet, View, SLOTS};
use crate::replica::{Claim, SnapshotRequest};
use crate::rpc::{LearnReply, NodeStatus, PaxosReply, Request, Response};
use crate::viewchange::{
    choose_value, duties, majority, AcceptReply, Acceptor, Ballot, PrepareReply, Proposal, PullKey,
    PullProgress,
};

/// How long a request waits for this node to learn the newer view its token names.
pub const VIEW_CATCHUP_WAIT: Duration = Duration::from_secs(2);
/// Timeout of a status probe.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of one Paxos message.
const PAXOS_TIMEOUT: Duration = Duration::from_secs(2);
/// Paxos rounds before the coordinator gives up (contention or no majority).
const PAXOS_ATTEMPTS: u64 = 8;
/// Timeout of a learn or install call.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one drain call waits for its replica to catch up.
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// Timeout of one pull step (one page fetched from the source and committed).
const PULL_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between retries of a failed step.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// The coordinator answers 503 when a change made no progress for this long; the change
/// itself goes on (see the module doc).
pub const STALL_LIMIT: Duration = Duration::from_secs(30);
/// A node in a transition that has not completed this long after it learned it drives
/// the change itself (staggered by its rank among the participants).
pub const REDRIVE_AFTER: Duration = Duration::from_secs(5);
/// Keys deleted per transaction when dropping handed-over slots.
const GC_BATCH: usize = 2_048;
/// Fault injection for tests: when set, every pull step sleeps this many milliseconds
/// first, which stretches a view change so a test can crash a node in the middle of it
/// (in the spirit of FoundationDB's BUGGIFY). Read once per process.
pub const PULL_DELAY_ENV: &str = "KVS_PULL_PAGE_DELAY_MS";
/// At most one view fetch or push per peer per this interval.
const GOSSIP_DEBOUNCE: Duration = Duration::from_millis(300);
/// Attempts of a whole `update_view` when other changes keep winning the epoch.
const MAX_CHANGE_ROUNDS: usize = 4;
/// Part of the error a node answers to a learn whose base view it has not reached; the
/// coordinator then sends it that view first.
const BEHIND_BASE: &str = "behind the change's base epoch";

/// What a completed `update_view` reports.
#[derive(Clone, Debug)]
pub struct ChangeOutcome {
    pub view: Arc<View>,
    /// The index of the changed node's partition in the new view (`None`: a proxy, or
    /// removed).
    pub partition_index: Option<u32>,
}

/// Progress of the view change this node coordinates, for the status endpoint and
/// `kvs local`.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    pub change: String,
    pub epoch: u64,
    /// deciding, learning, draining, moving, installing, done or stalled.
    pub phase: String,
    /// Keys (and their bytes) that changed partition or were copied to a joining
    /// member, each counted once however many replicas received it.
    pub keys_moved: u64,
    pub bytes_moved: u64,
    /// Copies written: `keys_moved` times the replicas that received each.
    pub keys_copied: u64,
    pub bytes_copied: u64,
    pub pulls_total: usize,
    pub pulls_done: usize,
    pub started_ms: u64,
    pub elapsed_ms: u64,
    pub error: Option<String>,
    /// Per (receiving partition, pull, node): keys and bytes so far.
    #[serde(skip)]
    per_pull: BTreeMap<(PartitionUid, PullKey, String), (u64, u64)>,
}

impl Progress {
    /// Records a pull's totals so far and recomputes the sums.
    fn record(&mut self, uid: PartitionUid, key: PullKey, node: &str, keys: u64, bytes: u64) {
        self.per_pull
            .insert((uid, key, node.to_string()), (keys, bytes));
        let mut unique: BTreeMap<(PartitionUid, PullKey), (u64, u64)> = BTreeMap::new();
        (self.keys_copied, self.bytes_copied) = (0, 0);
        for ((uid, key, _), (k, b)) in &self.per_pull {
            self.keys_copied += k;
            self.bytes_copied += b;
            let u = unique.entry((*uid, *key)).or_default();
            *u = (u.0.max(*k), u.1.max(*b));
        }
        self.keys_moved = unique.values().map(|u| u.0).sum();
        self.bytes_moved = unique.values().map(|u| u.1).sum();
    }
}

/// A refused change as an error: a neutral kind, and the refusal itself for the
/// dialects that word it their own way.
fn change_error(e: ChangeError) -> Error {
    let kind = match e {
        ChangeError::AlreadyMember(_) | ChangeError::Exhausted(_) => ErrorKind::Conflict,
        ChangeError::NotMember(_) => ErrorKind::NotFound,
        ChangeError::TooFewNodes { .. } => ErrorKind::BadRequest,
    };
    Error::new(kind, e.to_string()).refusing(e)
}

/// Tracks whether a change still makes progress; see [`STALL_LIMIT`].
struct Stall {
    last: Instant,
}

impl Stall {
    fn new() -> Self {
        Self {
            last: Instant::now(),
        }
    }

    fn progressed(&mut self) {
        self.last = Instant::now();
    }

    /// Err once nothing progressed for [`STALL_LIMIT`].
    fn check(&self, epoch: u64, waiting_for: impl FnOnce() -> String) -> Result<()> {
        if self.last.elapsed() < STALL_LIMIT {
            return Ok(());
        }
        Err(Error::unavailable(format!(
            "the view change to epoch {epoch} is waiting for {}; it resumes by itself when they are back \
             (or re-issue a view change to drive it)",
            waiting_for()
        )))
    }
}

impl Node {
    // -----------------------------------------------------------------------------------
    // Coordinating

    /// Carries out `change` (an `update_view` request) and returns once every reachable
    /// node is in the new view and every moved key is on its new replicas.
    pub async fn change_view(self: &Arc<Self>, change: Change) -> Result<ChangeOutcome> {
        let _one = self.coordinating.lock().await;
        for _ in 0..MAX_CHANGE_ROUNDS {
            let cur = self.current();
            let view = cur.view()?.clone();
            if let Some(t) = cur.transition.clone() {
                // Finish the change in progress first; it may be this very request,
                // re-issued after its coordinator failed.
                let p = t.proposal.clone();
                tracing::info!(change = %p.change, epoch = p.epoch(), "completing the view change in progress");
                self.execute(&p).await?;
                if p.change == change {
                    return Ok(outcome(&p.to, &change));
                }
                continue;
            }
            let own = Proposal::new(change.clone(), &view).map_err(change_error)?;
            if !self.preflight(&view, &change).await? {
                continue;
            }
            self.set_progress(&own, "deciding");
            let chosen = self
                .decide(own)
                .await
                .inspect_err(|e| self.fail_progress(e))?;
            self.execute(&chosen).await?;
            if chosen.change == change {
                return Ok(outcome(&chosen.to, &change));
            }
            // Another change won this epoch; ours goes on top of it.
        }
        Err(Error::unavailable(
            "other view changes kept taking precedence; retry",
        ))
    }

    /// Checks a change against the cluster before anything is decided. Returns false
    /// when the node learned something newer and the caller should start over.
    async fn preflight(self: &Arc<Self>, view: &View, change: &Change) -> Result<bool> {
        let mut targets: Vec<String> = view
            .members
            .iter()
            .filter(|m| **m != self.addr)
            .cloned()
            .collect();
        if let Change::Add(a) = change {
            targets.push(a.clone());
        }
        let answers = join_all(
            targets
                .iter()
                .map(|t| self.call(t, Request::Status, STATUS_TIMEOUT)),
        )
        .await;
        let mut unreachable = Vec::new();
        for (target, answer) in targets.iter().zip(answers) {
            let status = match answer {
                Ok(Response::Status(s)) => *s,
                Ok(other) => return Err(unexpected(&other)),
                Err(e) => {
                    if matches!(change, Change::Add(a) if a == target) {
                        return Err(Error::unavailable(format!(
                            "cannot reach {target}: {e}. Start it first (with K and IPPORT, and the \
                             cluster's CLUSTER_SECRET), then add it"
                        )));
                    }
                    if !matches!(change, Change::Remove(a) if a == target) {
                        unreachable.push(target.clone());
                    }
                    continue;
                }
            };
            // Views are adopted from members only: the node being added is not one yet.
            let member = view.is_member(target);
            if let Some(v) = status.view.as_ref().filter(|_| member) {
                if v.cluster == view.cluster && v.epoch > view.epoch {
                    self.install_view(v.clone()).await?;
                    return Ok(false);
                }
                if v.cluster == view.cluster && v.epoch == view.epoch {
                    if let Some(p) = &status.transition {
                        self.learn(p.clone()).await?;
                        return Ok(false);
                    }
                }
            }
            if matches!(change, Change::Add(a) if a == target) {
                check_newcomer(view, target, &status)?;
            }
        }
        if !unreachable.is_empty() {
            return Err(Error::unavailable(format!(
                "cannot change the view while {} {} unreachable: bring {} back, or remove {} first",
                unreachable.join(", "),
                if unreachable.len() == 1 { "is" } else { "are" },
                if unreachable.len() == 1 { "it" } else { "them" },
                if unreachable.len() == 1 { "it" } else { "them" },
            )));
        }
        Ok(true)
    }

    /// Paxos proposer: gets a proposal for the next epoch chosen by a majority of the
    /// current view and returns it, which may be another node's (see `viewchange`).
    async fn decide(self: &Arc<Self>, own: Proposal) -> Result<Proposal> {
        let acceptors = own.from.members.clone();
        let need = majority(acceptors.len());
        let epoch = own.epoch();
        let mut round = 1;
        for attempt in 0..PAXOS_ATTEMPTS {
            let ballot = Ballot {
                round,
                node: self.addr.clone(),
            };
            let replies = join_all(acceptors.iter().map(|a| {
                self.call(
                    a,
                    Request::Prepare {
                        epoch,
                        ballot: ballot.clone(),
                    },
                    PAXOS_TIMEOUT,
                )
            }))
            .await;
            let mut promises = Vec::new();
            for (acceptor, reply) in acceptors.iter().zip(replies) {
                match reply {
                    Ok(Response::Paxos(PaxosReply::Prepare(PrepareReply::Promise(acc)))) => {
                        promises.push(acc)
                    }
                    Ok(Response::Paxos(PaxosReply::Prepare(PrepareReply::Reject(b)))) => {
                        round = round.max(b.round)
                    }
                    Ok(Response::Paxos(PaxosReply::Chosen(p))) if p.epoch() == epoch => {
                        return Ok(*p)
                    }
                    Ok(Response::Paxos(PaxosReply::Epoch(e))) if e >= epoch => {
                        self.learn_from(acceptor).await;
                        return Err(Error::unavailable(
                            "the view changed while this change was being decided; retry",
                        ));
                    }
                    _ => {}
                }
            }
            if promises.len() >= need {
                let value = choose_value(&promises, own.clone());
                let replies = join_all(acceptors.iter().map(|a| {
                    self.call(
                        a,
                        Request::Accept {
                            epoch,
                            ballot: ballot.clone(),
                            proposal: value.clone(),
                        },
                        PAXOS_TIMEOUT,
                    )
                }))
                .await;
                let mut votes = 0;
                for reply in replies {
                    match reply {
                        Ok(Response::Paxos(PaxosReply::Accept(AcceptReply::Accepted))) => {
                            votes += 1
                        }
                        Ok(Response::Paxos(PaxosReply::Accept(AcceptReply::Reject(b)))) => {
                            round = round.max(b.round)
                        }
                        _ => {}
                    }
                }
                if votes >= need {
                    tracing::info!(change = %value.change, epoch, "view change chosen");
                    return Ok(value);
                }
            }
            round += 1;
            // Back off by a random amount so competing proposers stop colliding.
            let pause = 20 + rand::random::<u64>() % (50 * (attempt + 1));
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        Err(Error::unavailable(format!(
            "could not get a majority of the {} members to agree on the next view; retry",
            acceptors.len()
        )))
    }

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
        let removed = match &p.change {
            Change::Remove(a) => Some(a.as_str()),
            Change::Add(_) => None,
        };
        // Partitions whose writes must be drained: those that give slots away and those
        // that lose a replica.
        let mut drain: Vec<PartitionUid> = plan.sources();
        for l in &plan.leaves {
            if !drain.contains(&l.uid) {
                drain.push(l.uid);
            }
        }
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

    // -----------------------------------------------------------------------------------
    // Steps every node takes

    /// Paxos phase 1 at this node.
    pub(super) async fn on_prepare(
        self: &Arc<Self>,
        epoch: u64,
        ballot: Ballot,
    ) -> Result<Response> {
        let mut acceptor = self.acceptor.lock().await;
        let cur = self.current();
        if let Some(early) = paxos_precheck(&cur, epoch) {
            return Ok(early);
        }
        let mut next = self.acceptor_for(&acceptor, epoch);
        let reply = next.on_prepare(&ballot);
        self.persist_acceptor(&next).await?;
        *acceptor = Some(next);
        Ok(Response::Paxos(PaxosReply::Prepare(reply)))
    }

    /// Paxos phase 2 at this node.
    pub(super) async fn on_accept(
        self: &Arc<Self>,
        epoch: u64,
        ballot: Ballot,
        proposal: Proposal,
    ) -> Result<Response> {
        let mut acceptor = self.acceptor.lock().await;
        let cur = self.current();
        if let Some(early) = paxos_precheck(&cur, epoch) {
            return Ok(early);
        }
        proposal.check().map_err(Error::bad_request)?;
        if proposal.epoch() != epoch || cur.view.as_deref() != Some(&proposal.from) {
            return Err(Error::bad_request(
                "the proposal is not based on this node's view",
            ));
        }
        let mut next = self.acceptor_for(&acceptor, epoch);
        let reply = next.on_accept(&ballot, &proposal);
        self.persist_acceptor(&next).await?;
        *acceptor = Some(next);
        Ok(Response::Paxos(PaxosReply::Accept(reply)))
    }

    /// The acceptor state for deciding `epoch` (a fresh one after a view change).
    fn acceptor_for(&self, held: &Option<Acceptor>, epoch: u64) -> Acceptor {
        held.clone()
            .filter(|a| a.epoch == epoch)
            .unwrap_or_else(|| Acceptor::new(epoch))
    }

    async fn persist_acceptor(&self, acceptor: &Acceptor) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_writer(WriterCmd::Acceptor {
            acceptor: acceptor.clone(),
            tx,
        })
        .await?;
        rx.await
            .map_err(|_| Error::unavailable("the node is shutting down"))?
    }

    /// Records a chosen proposal (step 1). Only called with proposals known chosen.
    pub(super) async fn learn(self: &Arc<Self>, p: Proposal) -> Result<LearnReply> {
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
    pub(super) async fn drain(
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
        let reached = |s: &Option<Arc<super::ReplicaStatus>>| {
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
    pub(super) async fn pull_step(
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
    pub(super) async fn install_view(self: &Arc<Self>, view: View) -> Result<bool> {
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
        if installed == super::writer::Installed::Unchanged {
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

    // -----------------------------------------------------------------------------------
    // Keeping views together

    /// Reacts to a peer's epoch seen on an internal call: fetch its newer view, or tell it
    /// about ours. At most once per peer per [`GOSSIP_DEBOUNCE`].
    pub(super) fn note_peer_epoch(self: &Arc<Self>, peer: &str, epoch: u64) {
        let mine = self.epoch();
        if epoch == mine || peer == self.addr {
            return;
        }
        {
            let mut seen = lock(&self.gossip);
            let now = Instant::now();
            if seen
                .get(peer)
                .is_some_and(|t| now.duration_since(*t) < GOSSIP_DEBOUNCE)
            {
                return;
            }
            seen.insert(peer.to_string(), now);
        }
        let node = self.clone();
        let peer = peer.to_string();
        if epoch > mine {
            tokio::spawn(async move {
                node.learn_from(&peer).await;
            });
        } else if let Some(view) = self.view() {
            tokio::spawn(async move {
                if let Err(e) = node
                    .call(&peer, Request::Install((*view).clone()), STEP_TIMEOUT)
                    .await
                {
                    tracing::debug!(%peer, "telling a peer about view epoch {}: {e}", view.epoch);
                }
            });
        }
    }

    /// Asks `peer` for its view and transition and adopts them if newer. Returns
    /// whether anything was adopted. Only members of this node's view or of the change
    /// in progress are asked: views come from the cluster, not from whoever calls.
    pub(super) async fn learn_from(self: &Arc<Self>, peer: &str) -> bool {
        if !self.current().knows(peer) {
            return false;
        }
        let status: NodeStatus = match self.call(peer, Request::Status, STATUS_TIMEOUT).await {
            Ok(Response::Status(s)) => *s,
            _ => return false,
        };
        let mine = self.epoch();
        match status.view {
            Some(v) if v.epoch > mine => match self.install_view(v).await {
                Ok(switched) => switched,
                Err(e) => {
                    tracing::warn!(%peer, "could not install the view learned from a peer: {e}");
                    false
                }
            },
            Some(v) if v.epoch == mine && self.current().transition.is_none() => {
                match status.transition {
                    Some(p) => self.learn(p).await.is_ok(),
                    None => false,
                }
            }
            _ => false,
        }
    }

    /// Makes sure this node knows view `epoch` (a client's token came from it), asking
    /// its peers for up to [`VIEW_CATCHUP_WAIT`].
    pub(super) async fn catch_up_view(self: &Arc<Self>, epoch: u64) -> Result<()> {
        if self.epoch() >= epoch {
            return Ok(());
        }
        let ask = async {
            while self.epoch() < epoch {
                let cur = self.current();
                let mut peers: Vec<String> = cur.view()?.members.clone();
                if let Some(t) = &cur.transition {
                    peers.extend(t.to().members.iter().cloned());
                }
                peers.retain(|p| *p != self.addr);
                peers.sort();
                peers.dedup();
                // All at once: one dead member must not hold up the others.
                join_all(peers.iter().map(|p| self.learn_from(p))).await;
                if self.epoch() < epoch {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Ok::<(), Error>(())
        };
        match tokio::time::timeout(VIEW_CATCHUP_WAIT, ask).await {
            Ok(result) => result,
            Err(_) => Err(Error::unavailable(format!(
                "this node has not yet learned view epoch {epoch}, which the request comes from; retry"
            ))),
        }
    }

    /// Notes activity of the transition this node is in (see `redrive_loop`).
    pub(super) fn transition_active(&self) {
        let mut at = lock(&self.learned_at);
        if at.is_some() {
            *at = Some(Instant::now());
        }
    }

    /// Starts the tasks that run for the node's life.
    pub(super) fn start_background(self: &Arc<Self>) {
        if self.current().transition.is_some() {
            *lock(&self.learned_at) = Some(Instant::now());
        }
        let mut tasks = lock(&self.tasks);
        tasks.spawn(redrive_loop(self.clone()));
        tasks.spawn(super::heartbeat::heartbeat_loop(self.clone()));
        // A node that was down may have missed view changes: ask the members once (a
        // node still waiting for the cluster key asks once it has it).
        if self.keys().is_some() {
            let node = self.clone();
            tasks.spawn(async move { node.learn_from_members().await });
        }
        drop(tasks);
        self.spawn_gc();
    }

    /// Asks each other member of this node's view for a newer view, one after another.
    pub(super) async fn learn_from_members(self: &Arc<Self>) {
        let peers: Vec<String> = self
            .view()
            .map(|v| {
                v.members
                    .iter()
                    .filter(|m| **m != self.addr)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for peer in peers {
            self.learn_from(&peer).await;
        }
    }

    /// Deletes keys of slots this node no longer keeps, in the background.
    fn spawn_gc(self: &Arc<Self>) {
        let node = self.clone();
        lock(&self.tasks).spawn(async move {
            match node.collect_garbage().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    keys = n,
                    "deleted keys of slots handed over to other partitions"
                ),
                Err(e) => tracing::warn!(
                    "deleting handed-over keys failed (retried at the next view change): {e}"
                ),
            }
        });
    }

    async fn collect_garbage(self: &Arc<Self>) -> Result<usize> {
        let cur = self.current();
        let keep = |v: &View, slot: u32| match v.role_of(&self.addr) {
            Some(Role::Replica(uid)) => v.owner_of_slot(slot) == uid,
            _ => false,
        };
        let mut total = 0;
        for slot in 0..SLOTS {
            let kept = cur.view.as_deref().is_some_and(|v| keep(v, slot))
                || cur
                    .transition
                    .as_deref()
                    .is_some_and(|t| keep(t.to(), slot));
            if kept || self.store.read()?.slot_is_empty(slot)? {
                continue;
            }
            loop {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.send_writer(WriterCmd::Gc {
                    slot,
                    limit: GC_BATCH,
                    tx,
                })
                .await?;
                let n = rx
                    .await
                    .map_err(|_| Error::unavailable("the node is shutting down"))??;
                total += n;
                if n < GC_BATCH {
                    break;
                }
            }
        }
        Ok(total)
    }

    // -----------------------------------------------------------------------------------
    // Progress

    /// The view change this node coordinates (or last coordinated).
    pub fn progress(&self) -> Option<Progress> {
        lock(&self.progress).clone().map(|mut p| {
            if p.phase != "done" && p.phase != "stalled" {
                p.elapsed_ms = now_ms().saturating_sub(p.started_ms);
            }
            p
        })
    }

    fn set_progress(&self, p: &Proposal, phase: &str) {
        *lock(&self.progress) = Some(Progress {
            change: p.change.to_string(),
            epoch: p.epoch(),
            phase: phase.into(),
            keys_moved: 0,
            bytes_moved: 0,
            keys_copied: 0,
            bytes_copied: 0,
            pulls_total: 0,
            pulls_done: 0,
            started_ms: now_ms(),
            elapsed_ms: 0,
            error: None,
            per_pull: BTreeMap::new(),
        });
    }

    /// Starts tracking `p` unless it is already tracked.
    fn ensure_progress(&self, p: &Proposal) {
        let tracked = lock(&self.progress)
            .as_ref()
            .is_some_and(|pr| pr.epoch == p.epoch() && pr.phase != "done" && pr.phase != "stalled");
        if !tracked {
            self.set_progress(p, "learning");
        }
    }

    fn update_progress(&self, f: impl FnOnce(&mut Progress)) {
        if let Some(p) = lock(&self.progress).as_mut() {
            f(p);
            p.elapsed_ms = now_ms().saturating_sub(p.started_ms);
        }
    }

    fn fail_progress(&self, e: &Error) {
        if e.kind == ErrorKind::Unavailable {
            self.update_progress(|p| {
                p.phase = "stalled".into();
                p.error = Some(e.message.clone());
            });
        }
    }
}

/// What an acceptor answers before looking at a ballot: its epoch when the message is not
/// for its next one, or the chosen proposal when it already knows it.
fn paxos_precheck(cur: &super::Current, epoch: u64) -> Option<Response> {
    if cur.view.is_none() || epoch != cur.epoch() + 1 {
        return Some(Response::Paxos(PaxosReply::Epoch(cur.epoch())));
    }
    cur.transition
        .as_ref()
        .map(|t| Response::Paxos(PaxosReply::Chosen(Box::new(t.proposal.clone()))))
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

/// Refuses to add a node that is not a blank node of a compatible configuration.
fn check_newcomer(view: &View, addr: &str, status: &NodeStatus) -> Result<()> {
    if let Some(v) = &status.view {
        return Err(if v.cluster == view.cluster {
            Error::conflict(format!(
                "{addr} already considers itself a member of this cluster (epoch {})",
                v.epoch
            ))
        } else {
            Error::conflict(format!("{addr} already belongs to another cluster"))
        });
    }
    if let Some(k) = status.k {
        if k != view.k {
            return Err(Error::conflict(format!(
                "{addr} was started with K={k}, but this cluster has K={}",
                view.k
            )));
        }
    }
    if status.keys > 0 && status.transition.is_none() {
        return Err(Error::conflict(format!(
            "{addr} still holds {} keys from an earlier cluster; start it on an empty data directory",
            status.keys
        )));
    }
    Ok(())
}

fn outcome(view: &View, change: &Change) -> ChangeOutcome {
    let partition_index = match view.role_of(change.addr()) {
        Some(Role::Replica(uid)) => view.index_of(uid),
        _ => None,
    };
    ChangeOutcome {
        view: Arc::new(view.clone()),
        partition_index,
    }
}

/// Drives a transition that stalled (its coordinator crashed, or a node it needed was
/// down). Only nodes with a part in the change do it (an idle bystander learns nothing
/// from its own inactivity), once it has seen no activity for [`REDRIVE_AFTER`],
/// staggered by rank so that usually one node does it.
async fn redrive_loop(node: Arc<Node>) {
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
