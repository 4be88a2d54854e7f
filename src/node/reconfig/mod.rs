//! View changes in the shell: coordinating `update_view`, the Paxos acceptor, the steps
//! every node takes (learn, drain, pull, install), and the background tasks that keep a
//! cluster's views together (re-driving a stalled change, catching up with a newer view,
//! deleting handed-over slots). The protocol itself is explained in `viewchange`.
//!
//! The coordinator of a change is whichever node received `update_view`. It checks the
//! request against every member first (so a bad request changes nothing), gets the new
//! view chosen, then drives the steps and answers when every reachable node has
//! installed the new view. If a step cannot complete (a node it needs is down) for
//! [`STALL_LIMIT`](progress::STALL_LIMIT), the client gets a retryable 503; the change
//! stays chosen and is finished by re-issuing any `update_view`, or by the background
//! re-drive that every node in the transition runs after
//! [`REDRIVE_AFTER`](execute::REDRIVE_AFTER).
//!
//! This file holds the coordinator's first half: checking a change against the cluster
//! and getting it chosen (the Paxos proposer). The rest, one concern per file:
//!
//! * `execute.rs`: driving a chosen change through its steps on every participant, and
//!   the re-drive of a stalled one;
//! * `acceptor.rs`: this node's Paxos acceptor, persisted before it answers;
//! * `steps.rs`: the steps each node takes when told to (learn, drain, pull, install);
//! * `gossip.rs`: catching up with newer views and telling peers about this one;
//! * `gc.rs`: deleting the keys of slots handed over to other partitions;
//! * `progress.rs`: what the coordinator reports about a change, and when it stalls.

mod acceptor;
mod execute;
mod gc;
mod gossip;
mod progress;
mod steps;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

pub(super) use execute::redrive_loop;
pub use gossip::VIEW_CATCHUP_WAIT;
pub use progress::Progress;

use super::{unexpected, Node};
use crate::error::{Error, ErrorKind, Result};
use crate::placement::{Change, ChangeError, View};
use crate::rpc::{NodeStatus, PaxosReply, Request, Response};
use crate::viewchange::{Next, Proposal, Proposer};

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
/// Attempts of a whole `update_view` when other changes keep winning the epoch.
const MAX_CHANGE_ROUNDS: usize = 4;
/// Part of the error a node answers to a learn whose base view it has not reached; the
/// coordinator then sends it that view first.
const BEHIND_BASE: &str = "behind the change's base epoch";

/// A refused change as an error: a neutral kind, and the refusal itself for the
/// dialects that word it their own way.
fn change_error(e: ChangeError) -> Error {
    let kind = match e {
        ChangeError::AlreadyMember(_)
        | ChangeError::Exhausted(_)
        | ChangeError::AlreadyInShard { .. }
        | ChangeError::OnlyReplica { .. } => ErrorKind::Conflict,
        ChangeError::NotMember(_) | ChangeError::NoSuchShard(_) => ErrorKind::NotFound,
        ChangeError::TooFewNodes { .. }
        | ChangeError::LastShard(_)
        | ChangeError::NotEnoughNodes { .. }
        | ChangeError::ZeroShards
        | ChangeError::ShardModeOnly(_)
        | ChangeError::EmptyView
        | ChangeError::DuplicateMember(_)
        | ChangeError::ZeroReplicationFactor
        | ChangeError::FewerNodesThanReplicas { .. }
        | ChangeError::FewerNodesThanShards { .. } => ErrorKind::BadRequest,
    };
    Error::new(kind, e.to_string()).refusing(e)
}

impl Node {
    /// Carries out `change` (any dialect's membership or shard change) and returns the
    /// new view once every reachable node is in it and every moved key is on its new
    /// replicas.
    pub async fn change_view(self: &Arc<Self>, change: Change) -> Result<Arc<View>> {
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
                    return Ok(Arc::new(p.to.clone()));
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
                return Ok(Arc::new(chosen.to.clone()));
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
        let newcomers = change.newcomers(view);
        targets.extend(newcomers.iter().map(|a| a.to_string()));
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
                    if newcomers.contains(&target.as_str()) {
                        return Err(Error::unavailable(format!(
                            "cannot reach {target}: {e}. Start it first (with the cluster's \
                             settings and CLUSTER_SECRET, and no data), then add it"
                        )));
                    }
                    if change.removed() != Some(target.as_str()) {
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
            if newcomers.contains(&target.as_str()) {
                check_newcomer(view, change, target, &status)?;
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
    /// current view and returns it, which may be another node's (see `viewchange`). The
    /// decisions are [`Proposer`]'s; this sends what it asks for, bounds the rounds and
    /// pauses between them.
    async fn decide(self: &Arc<Self>, own: Proposal) -> Result<Proposal> {
        let mut proposer = Proposer::new(own, self.addr.clone());
        let acceptors = proposer.acceptors().to_vec();
        let epoch = proposer.epoch();
        for attempt in 0..PAXOS_ATTEMPTS {
            let ballot = proposer.ballot();
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
            match proposer.on_prepare_replies(replies.into_iter().map(paxos_reply)) {
                Next::Chosen(p) => return Ok(p),
                Next::Newer(acceptor) => {
                    self.learn_from(&acceptors[acceptor]).await;
                    return Err(Error::unavailable(
                        "the view changed while this change was being decided; retry",
                    ));
                }
                Next::Accept(value) => {
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
                    let next = proposer.on_accept_replies(replies.into_iter().map(paxos_reply));
                    if let Next::Chosen(value) = next {
                        tracing::info!(change = %value.change, epoch, "view change chosen");
                        return Ok(value);
                    }
                }
                Next::Retry => {}
            }
            // Back off by a random amount so competing proposers stop colliding.
            let pause = 20 + rand::random::<u64>() % (50 * (attempt + 1));
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        Err(Error::unavailable(format!(
            "could not get a majority of the {} members to agree on the next view; retry",
            acceptors.len()
        )))
    }
}

/// A peer's answer as a Paxos reply, `None` when it is not one (no answer, an error).
fn paxos_reply(answer: Result<Response>) -> Option<PaxosReply> {
    match answer {
        Ok(Response::Paxos(reply)) => Some(reply),
        _ => None,
    }
}

/// Refuses to add a node that is not a blank node of a compatible configuration.
fn check_newcomer(view: &View, change: &Change, addr: &str, status: &NodeStatus) -> Result<()> {
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
    // A whole-view replacement states its replication factor: the K a blank node was
    // started with is only its default (seed 003 starts newcomers with the new view's
    // REPL_FACTOR, or none).
    let replacing = matches!(change, Change::Replace { .. });
    if let Some(k) = status.k.filter(|_| !replacing) {
        match view.k() {
            Some(ours) if ours != k => {
                return Err(Error::conflict(format!(
                    "{addr} was started with K={k}, but this cluster has K={ours}"
                )))
            }
            None => {
                return Err(Error::conflict(format!(
                    "{addr} was started with K={k}, but this cluster is in shard-count mode"
                )))
            }
            Some(_) => {}
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
