//! The steps of a view change as each simulated node takes them when the coordinator
//! asks (`node/reconfig/steps.rs` and the writer's `learn`, `pulled` and `install`):
//! learn the chosen proposal, drain a source replica, pull a page of moving keys,
//! install the new view; and the gossip by which a node that missed an install (or
//! lost its disk) catches up with its cluster's view.

use crate::clock::{PartitionUid, VersionVector};
use crate::placement::{slot_of, Role, View};
use crate::replica::{Claim, Replica, SnapshotPage, SnapshotRequest};
use crate::storage::WriteTxn;
use crate::viewchange::{duties, leftover_slots, Proposal, PullKey, Transition};

use super::world::{addr, Event, Msg, Sim, Up};
use super::{Bug, PAGE_BYTES};

/// A handoff page a destination waits for: the coordinator's call it answers, the
/// pull, its claim, and the change's epoch.
#[derive(Clone, Debug)]
pub(in crate::sim) struct Handoff {
    coordinator: usize,
    call: u64,
    key: PullKey,
    claim: Option<Claim>,
    epoch: u64,
}

/// How long a source replica waits to catch up for a drain, as the server's.
const DRAIN_WAIT_MS: u64 = 10_000;

impl Sim {
    /// Messages of view changes, and of the deletion of handed-over slots.
    pub(super) fn deliver_change(&mut self, from: usize, to: usize, id: u64, msg: Msg) {
        match msg {
            Msg::Learn(p) => self.learn(from, to, id, p),
            Msg::Drain {
                epoch,
                partition,
                target,
            } => self.drain(from, to, id, epoch, partition, target),
            Msg::Pull {
                epoch,
                key,
                source,
                claim,
            } => self.pull_step(from, to, id, epoch, key, source, claim),
            Msg::HandoffReq(req) => self.serve_handoff(from, to, id, &req),
            Msg::HandoffResp(page) => self.on_handoff(to, from, id, page),
            // The source could not serve the page: the pull step fails.
            Msg::Refused if self.nodes[to].handoffs.contains_key(&id) => {
                if let Some(h) = self.nodes[to].handoffs.remove(&id) {
                    self.send(to, h.coordinator, h.call, Msg::Refused);
                }
            }
            Msg::Install(view) => {
                self.install(to, &view);
                if id != 0 {
                    self.send(to, from, id, Msg::Installed);
                }
            }
            // The server's `learn_from`: a newer view, and the change that starts from it.
            Msg::Gossip(epoch) => {
                if let Some(view) = self.nodes[to].view.clone().filter(|v| v.epoch > epoch) {
                    let next = self.nodes[to]
                        .transition
                        .as_ref()
                        .filter(|t| *t.from() == view && self.cfg.bug != Some(Bug::GossipViewOnly))
                        .map(|t| t.proposal.clone());
                    self.send(to, from, 0, Msg::Install(view));
                    if let Some(p) = next {
                        self.send(to, from, 0, Msg::Learn(p));
                    }
                }
            }
            Msg::Holds(partition, keys) => self.serve_holds(from, to, id, partition, keys),
            Msg::Lacking(lacking) => self.on_lacking(to, from, id, lacking),
            answer @ (Msg::Learned(_)
            | Msg::AlreadyInstalled
            | Msg::Behind
            | Msg::Drained
            | Msg::Pulled(_)
            | Msg::Installed
            | Msg::Refused) => self.step_answer(from, to, id, answer),
            other => self.trace(|| format!("n{to} ignores {}", other.name())),
        }
    }

    /// Step 1: records the chosen proposal; a source stops taking writes to the slots
    /// it gives away (all of them if it leaves its partition). Answers what its replica
    /// has applied, for the drain's target.
    fn learn(&mut self, from: usize, to: usize, id: u64, p: Proposal) {
        let me = addr(to);
        let node = &self.nodes[to];
        match &node.view {
            Some(v) if v.epoch >= p.epoch() => {
                return self.send(to, from, id, Msg::AlreadyInstalled)
            }
            Some(v) if v.epoch < p.from.epoch => return self.send(to, from, id, Msg::Behind),
            Some(v) if *v != p.from => return self.send(to, from, id, Msg::Refused),
            // A node outside any cluster only learns a change that makes it a member, and
            // one removed only a change newer than its removal.
            None if !p.to.is_member(&me) || self.removed_since(to, &p.to) => {
                return self.send(to, from, id, Msg::Refused)
            }
            _ => {}
        }
        match &node.transition {
            Some(t) if t.proposal == p => {}
            Some(_) => return self.send(to, from, id, Msg::Refused),
            None => {
                let d = duties(&p, &me);
                let node = &mut self.nodes[to];
                node.duties = Some(d);
                node.transition = Some(Transition::new(p.clone()));
                self.trace(|| format!("n{to} learns the change to epoch {}", p.epoch()));
            }
        }
        let served = self.nodes[to].replica.as_ref().map(Replica::served);
        self.send(to, from, id, Msg::Learned(served));
    }

    /// Step 2 at a source replica: answers once it reflects `target`, catching up with
    /// its peers meanwhile (up to `DRAIN_WAIT_MS`).
    fn drain(
        &mut self,
        from: usize,
        to: usize,
        id: u64,
        epoch: u64,
        partition: PartitionUid,
        target: VersionVector,
    ) {
        let node = &self.nodes[to];
        if node.view.as_ref().map(|v| v.epoch) != Some(epoch) || node.partition() != Some(partition)
        {
            return self.send(to, from, id, Msg::Refused);
        }
        if self.replica(to).served().dominates(&target) {
            return self.send(to, from, id, Msg::Drained);
        }
        let deadline = self.now + DRAIN_WAIT_MS;
        self.nodes[to].drains.push((from, id, target, deadline));
        self.wake_pullers(to);
    }

    /// `to` applied something: drains waiting there may be done.
    pub(super) fn drains_progress(&mut self, to: usize) {
        if self.nodes[to].drains.is_empty() {
            return;
        }
        let Some(served) = self.nodes[to].replica.as_ref().map(Replica::served) else {
            return;
        };
        let now = self.now;
        let drains = std::mem::take(&mut self.nodes[to].drains);
        for (from, id, target, deadline) in drains {
            if served.dominates(&target) {
                self.send(to, from, id, Msg::Drained);
            } else if now < deadline {
                self.nodes[to].drains.push((from, id, target, deadline));
            }
        }
    }

    /// Step 3 at a destination: asks the drained source for the next page of pull
    /// `key` (answered when the page is merged, in [`Self::on_handoff`]).
    #[allow(clippy::too_many_arguments)]
    fn pull_step(
        &mut self,
        from: usize,
        to: usize,
        id: u64,
        epoch: u64,
        key: PullKey,
        source: usize,
        claim: Option<Claim>,
    ) {
        let node = &self.nodes[to];
        if node.view.as_ref().is_some_and(|v| v.epoch >= epoch) {
            let done = crate::viewchange::PullProgress {
                done: true,
                ..Default::default()
            };
            return self.send(to, from, id, Msg::Pulled(done));
        }
        let Some(t) = node
            .transition
            .as_ref()
            .filter(|t| t.proposal.epoch() == epoch)
        else {
            return self.send(to, from, id, Msg::Refused);
        };
        let Some(slots) = duties(&t.proposal, &addr(to))
            .pulls
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, s)| s)
        else {
            return self.send(to, from, id, Msg::Refused);
        };
        let progress = t.pulls.get(&key).cloned().unwrap_or_default();
        if progress.done {
            return self.send(to, from, id, Msg::Pulled(progress));
        }
        let partition = match key {
            PullKey::Move { from } => from,
            PullKey::Copy { uid } => uid,
        };
        // Data comes only from a replica of that partition in the change's old view.
        let base = t.from().epoch;
        if !t
            .from()
            .replicas_of(partition)
            .is_some_and(|r| r.contains(&addr(source)))
        {
            return self.send(to, from, id, Msg::Refused);
        }
        let req = SnapshotRequest {
            partition,
            epoch: Some(base),
            slots: Some(slots),
            after: progress.next,
            max_entries: self.page_entries,
            max_bytes: PAGE_BYTES,
        };
        let page_id = self.new_id();
        self.nodes[to].handoffs.insert(
            page_id,
            Handoff {
                coordinator: from,
                call: id,
                key,
                claim,
                epoch,
            },
        );
        self.send(to, source, page_id, Msg::HandoffReq(req));
    }

    /// A source serves a page of the slots a destination pulls, from the view the
    /// change starts from.
    fn serve_handoff(&mut self, from: usize, to: usize, id: u64, req: &SnapshotRequest) {
        let node = &self.nodes[to];
        if node.view.as_ref().map(|v| v.epoch) != req.epoch
            || node.partition() != Some(req.partition)
        {
            return self.send(to, from, id, Msg::Refused);
        }
        let mut slots = node.owned();
        if let Some(wanted) = &req.slots {
            slots.intersect(wanted);
        }
        let page = Replica::serve_snapshot(&*self.read(to), self.replica(to), &slots, req);
        match page {
            Ok(page) => {
                let msg = Msg::HandoffResp(page);
                self.at(
                    self.handoff_page_ms,
                    Event::SendLater {
                        from: to,
                        to: from,
                        id,
                        msg,
                    },
                )
            }
            Err(e) => self.fail(format!("n{to} failed to serve a handoff page: {e}")),
        }
    }

    /// A destination merges a handoff page and records the pull's progress (the
    /// writer's `pulled`), then answers the coordinator.
    fn on_handoff(&mut self, n: usize, source: usize, id: u64, page: SnapshotPage) {
        let Some(h) = self.nodes[n].handoffs.remove(&id) else {
            return;
        };
        let Some(t) = self.nodes[n]
            .transition
            .as_ref()
            .filter(|t| t.proposal.epoch() == h.epoch)
        else {
            return;
        };
        let first = !t.pulls.contains_key(&h.key);
        let leftovers = leftover_slots(&t.proposal, &addr(n), h.key, &self.nodes[n].owned());
        let mut progress = t.pulls.get(&h.key).cloned().unwrap_or_default();
        if first && self.cfg.bug != Some(Bug::KeepLeftovers) {
            // The writer's `pulled`: drop what this node kept of these slots from an
            // earlier time it owned them.
            self.commit_store(n, |_, txn: &mut dyn WriteTxn| {
                for slot in leftovers.iter() {
                    while txn.delete_slot(slot, 4_096)? == 4_096 {}
                }
                Ok(())
            });
        }
        if !progress.done {
            progress.claim = match h.key {
                // The first claim made stands: any made after the drain is valid.
                PullKey::Move { .. } => progress.claim.or(h.claim),
                PullKey::Copy { .. } => progress.claim.or(Some(Claim {
                    applied: page.applied.clone(),
                    absorbed: page.absorbed.clone(),
                })),
            };
            progress.keys += page.states.len() as u64;
            progress.done = page.next.is_none();
            progress.next = page.next.clone();
            let states = page.states;
            self.commit_store(n, |_, txn: &mut dyn WriteTxn| {
                Replica::merge_states(txn, &states)
            });
            self.report.handed_over += states.len() as u64;
            for (_, key, _) in &states {
                self.check_stored(n, key, Some((source, "handoff page")));
            }
            if let Some(t) = self.nodes[n].transition.as_mut() {
                t.pulls.insert(h.key, progress.clone());
            }
        }
        self.send(n, h.coordinator, h.call, Msg::Pulled(progress));
    }

    /// Step 4, and how a node behind catches up: switches to `view` if it is newer (the
    /// writer's `install`). The transition's claims count only if it leads to exactly
    /// this view; after a jump the replica claims nothing and copies from a peer.
    pub(super) fn install(&mut self, n: usize, view: &View) -> bool {
        let me = addr(n);
        match &self.nodes[n].view {
            Some(cur) if view.epoch <= cur.epoch => return false,
            None if !view.is_member(&me) || self.removed_since(n, view) => return false,
            _ => {}
        }
        // The writer's `install`: a node that learned a change before it had the
        // change's base view keeps the change when it installs that view.
        let keep = self.nodes[n]
            .transition
            .as_ref()
            .is_some_and(|t| t.from() == view && self.cfg.bug != Some(Bug::DropChangeAtBase));
        let transition = if keep {
            None
        } else {
            self.nodes[n].transition.take()
        };
        let matching = transition.as_ref().filter(|t| t.to() == view);
        let absorbed = matching.map(Transition::absorbed_claim).unwrap_or_default();
        let fresh_id = self.new_replica_id();
        let role = view.role_of(&me);
        let copy_claim = match role {
            Some(Role::Replica(uid)) => matching.and_then(|t| t.copy_claim(uid)).cloned(),
            _ => None,
        };
        self.commit_store(n, |replica, txn| {
            match role {
                Some(Role::Replica(uid)) => match replica {
                    Some(r) if r.partition() == uid => r.absorb_claim(&absorbed),
                    _ => {
                        if replica.is_some() {
                            txn.log_clear()?;
                        }
                        let mut r = match &copy_claim {
                            Some(claim) => Replica::from_claim(fresh_id, uid, claim),
                            None => Replica::fresh(fresh_id, uid),
                        };
                        r.absorb_claim(&absorbed);
                        *replica = Some(r);
                    }
                },
                _ => {
                    if replica.take().is_some() {
                        txn.log_clear()?;
                    }
                }
            }
            Ok(())
        });
        let node = &mut self.nodes[n];
        node.view = view.is_member(&me).then(|| view.clone());
        node.removed = (!view.is_member(&me)).then_some(view.epoch);
        if !keep {
            node.duties = None;
        }
        node.reset_workers();
        let attempt = node.gc.restart();
        let role = match role {
            Some(Role::Replica(uid)) => format!("replica of partition uid {uid}"),
            Some(Role::Proxy) => "proxy".into(),
            None => "removed".into(),
        };
        self.trace(|| format!("n{n} installs epoch {} as {role}", view.epoch));
        // A slot that comes back to this node must not bring back what a collected
        // tombstone superseded.
        let keys: Vec<String> = self.collected.keys().cloned().collect();
        for key in keys {
            if self.nodes[n].owned().contains(slot_of(&key)) {
                self.check_stored(n, &key, None);
            }
        }
        for p in self.peers_of(n) {
            self.pull(n, p);
        }
        self.at(0, Event::Gc(n, attempt));
        true
    }

    /// Whether node `n` was removed at `view`'s epoch or later (the writer's
    /// `removed_since`: a stale peer's older view must not make it a replica again).
    fn removed_since(&self, n: usize, view: &View) -> bool {
        self.nodes[n]
            .removed
            .is_some_and(|epoch| view.epoch <= epoch)
    }

    /// A node tells a random other node its epoch; a node with a newer view answers
    /// with it. It also notices a change whose coordinator crashed.
    pub(super) fn gossip(&mut self, n: usize) {
        let others = self.nodes.len() as u64 - 1;
        if others == 0 {
            return;
        }
        let m = (n + 1 + self.rng.below(others) as usize) % self.nodes.len();
        if self.nodes[m].up != Up::Down {
            let epoch = self.nodes[n].view.as_ref().map_or(0, |v| v.epoch);
            self.send(n, m, 0, Msg::Gossip(epoch));
        }
        self.redrive(n);
    }
}
