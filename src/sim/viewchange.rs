//! View changes in the simulation: a change is decided, then carried out as
//! `node/reconfig` does (learn, drain, pull, install; `execute.rs`, `steps.rs`), the
//! nodes that miss the install catch up by gossip, a participant re-drives a change
//! whose coordinator crashed (`redrive_loop`), and every node deletes the slots it
//! handed over once their new replicas confirm holding the keys (`gc.rs`).
//!
//! Deciding is not simulated: the change is chosen at once (the Paxos of `viewchange`
//! is tested over a lossy simulated network in that module's tests). Changes come one
//! at a time, each from the newest view decided, as a cluster whose operator waits for
//! each `update_view` to answer.

use std::collections::{BTreeMap, BTreeSet};

use crate::clock::{PartitionUid, VersionVector};
use crate::placement::Change;
use crate::replica::Claim;
use crate::viewchange::{duties, Proposal, PullKey};

use super::world::{addr, index, Event, Msg, Sim, Up};

/// The server's step timeouts (`node/reconfig`): a learn or install call, a drain, a
/// pull page; the pause between retries; and how long a change whose coordinator
/// crashed waits before a participant drives it.
const STEP_TIMEOUT_MS: u64 = 5_000;
const DRAIN_WAIT_MS: u64 = 10_000;
const PULL_TIMEOUT_MS: u64 = 30_000;
const RETRY_PAUSE_MS: u64 = 250;
const REDRIVE_AFTER_MS: u64 = 5_000;
/// A change that made no progress this long is given up by its coordinator and
/// driven again from the start (`Stall` and `redrive_loop` in the server).
const STALL_LIMIT_MS: u64 = 30_000;
/// Install rounds before the coordinator leaves the rest to gossip.
const INSTALL_ROUNDS: u32 = 3;

/// The change being carried out.
pub(super) struct ChangeRun {
    pub(super) proposal: Proposal,
    /// The node driving it, and the drive's number (wake-ups of earlier drives are
    /// ignored).
    pub(super) coordinator: usize,
    pub(super) run: u64,
    /// The coordinator crashed: a participant drives it after `REDRIVE_AFTER_MS`.
    pub(super) orphaned: bool,
    /// When it last made progress.
    pub(super) active_ms: u64,
    /// A call of the current round failed: the next round waits a pause.
    failed: bool,
    pub(super) phase: Phase,
    /// Calls in flight: id → (node called, the pull it is about in `Phase::Pulling`).
    calls: BTreeMap<u64, (usize, usize)>,
    /// When the current round of calls is given up.
    deadline: u64,
}

impl ChangeRun {
    /// A drive of `proposal` by `coordinator`, from its first step.
    fn start(proposal: Proposal, coordinator: usize, run: u64, now: u64) -> Self {
        Self {
            phase: Phase::learning(&proposal),
            proposal,
            coordinator,
            run,
            orphaned: false,
            active_ms: now,
            failed: false,
            calls: BTreeMap::new(),
            deadline: 0,
        }
    }

    pub(super) fn describe(&self) -> String {
        format!("epoch {} ({})", self.proposal.epoch(), self.proposal.change)
    }
}

pub(super) enum Phase {
    /// Participants that have not learned it yet, and the served vectors of those that
    /// did.
    Learning {
        pending: BTreeSet<usize>,
        served: BTreeMap<usize, VersionVector>,
    },
    /// The partitions to drain, in order, the candidate being asked for the first, and
    /// the drained ones with their source and target.
    Draining {
        served: BTreeMap<usize, VersionVector>,
        todo: Vec<PartitionUid>,
        candidate: usize,
        sources: BTreeMap<PartitionUid, (usize, VersionVector)>,
    },
    Pulling {
        work: Vec<Work>,
    },
    Installing {
        pending: BTreeSet<usize>,
        round: u32,
    },
}

impl Phase {
    /// Every participant is to learn the change.
    fn learning(p: &Proposal) -> Self {
        Phase::Learning {
            pending: participants(p).collect(),
            served: BTreeMap::new(),
        }
    }

    /// Every participant but `coordinator` (it installs last) is to install the view.
    fn installing(p: &Proposal, coordinator: usize) -> Self {
        Phase::Installing {
            pending: participants(p).filter(|&n| n != coordinator).collect(),
            round: 0,
        }
    }
}

/// The nodes taking part in `p`.
fn participants(p: &Proposal) -> impl Iterator<Item = usize> {
    p.participants().into_iter().filter_map(|a| index(&a))
}

/// One pull the coordinator has a destination perform.
pub(super) struct Work {
    node: usize,
    key: PullKey,
    source: usize,
    claim: Option<Claim>,
    done: bool,
}

impl Work {
    fn call(&self, epoch: u64) -> Msg {
        Msg::Pull {
            epoch,
            key: self.key,
            source: self.source,
            claim: self.claim.clone(),
        }
    }
}

impl Sim {
    // ---- deciding ----

    /// Lays out when changes are decided: a few per run, a few seconds apart.
    pub(super) fn schedule_changes(&mut self) {
        let mut t = self.rng.between(1_000, 5_000);
        while t + 3_000 < self.cfg.duration_ms {
            self.queue.insert((t, 2), Event::Change);
            let (lo, hi) = self.cfg.change_gap_ms;
            t += self.rng.between(lo, hi);
        }
    }

    /// Decides a change of the newest view and starts carrying it out: a node added, a
    /// member removed, or the view replaced by one without one or two members and with
    /// one or two new nodes. Waits while the previous change runs.
    pub(super) fn start_change(&mut self) {
        if !self.clients_running {
            return;
        }
        let view = self.decided.clone();
        let coordinator = view.members.iter().filter_map(|a| index(a)).find(|&n| {
            self.nodes[n].up == Up::Running
                && self.nodes[n]
                    .view
                    .as_ref()
                    .is_some_and(|v| v.epoch == view.epoch)
        });
        let (Some(coordinator), None) = (coordinator, &self.change) else {
            self.at(1_000, Event::Change);
            return;
        };
        let k = self.cfg.replicas;
        let members = view.members.clone();
        let pick = |sim: &mut Sim| members[sim.rng.below(members.len() as u64) as usize].clone();
        let change = match self.rng.below(3) {
            // Shard-count mode (seed 002): a node put in a shard (a new one, or a member
            // moved), a reshard, or a removal or replacement as below.
            0 | 1 if self.cfg.shards > 0 => {
                let shards = view.partition_count() as u64;
                match self.rng.below(3) {
                    0 => Change::AddToShard {
                        addr: addr(self.spawn_node(None)),
                        shard: self.rng.below(shards) as u32,
                    },
                    1 => Change::AddToShard {
                        addr: pick(self),
                        shard: self.rng.below(shards) as u32,
                    },
                    _ => Change::Reshard(
                        self.rng.between(1, (members.len() as u64 / 2).max(1)) as u32
                    ),
                }
            }
            1 if members.len() > k => Change::Remove(pick(self)),
            2 => {
                let mut next = members.clone();
                for _ in 0..self.rng.between(1, 2) {
                    if next.len() > k {
                        let i = self.rng.below(next.len() as u64) as usize;
                        next.remove(i);
                    }
                }
                for _ in 0..self.rng.between(1, 2) {
                    let n = self.spawn_node(None);
                    next.push(addr(n));
                }
                Change::Replace {
                    members: next,
                    replication: None,
                }
            }
            _ => Change::Add(addr(self.spawn_node(None))),
        };
        let proposal = match Proposal::new(change.clone(), &view) {
            Ok(p) => p,
            Err(e) => {
                self.trace(|| format!("change {change} refused: {e}"));
                return;
            }
        };
        let name = format!(
            "epoch {}: {} ({} -> {} partitions, {} slots move)",
            proposal.epoch(),
            short(&change),
            view.partition_count(),
            proposal.to.partition_count(),
            proposal.plan().moved_slots()
        );
        self.trace(|| format!("CHANGE {name}, driven by n{coordinator}"));
        self.report.changes.push(name);
        self.decided = proposal.to.clone();
        let run = self.new_id();
        self.change = Some(ChangeRun::start(proposal, coordinator, run, self.now));
        self.drive(run);
    }

    // ---- the coordinator ----

    /// The coordinator's look at the change: starts the next round of calls once the
    /// last one is answered or given up.
    pub(super) fn drive(&mut self, run: u64) {
        let Some(ch) = self.change.as_ref().filter(|c| c.run == run && !c.orphaned) else {
            return;
        };
        let c = ch.coordinator;
        match self.nodes[c].up {
            Up::Down => return,
            Up::Paused => return self.nodes[c].backlog.push(Event::Drive(run)),
            Up::Running => {}
        }
        if !ch.calls.is_empty() && self.now < ch.deadline {
            return;
        }
        self.next_round();
    }

    /// The current round is over (answered, or timed out): moves the change on.
    fn next_round(&mut self) {
        let Some(mut ch) = self.change.take() else {
            return;
        };
        ch.calls.clear();
        let p = ch.proposal.clone();
        let c = ch.coordinator;
        if self.now >= ch.active_ms + STALL_LIMIT_MS {
            // Stalled (a node lost the transition with its disk, say): start over, every
            // participant learning again.
            self.trace(|| {
                format!(
                    "n{c}: the change to epoch {} stalled; driving it again",
                    p.epoch()
                )
            });
            ch.active_ms = self.now;
            ch.phase = Phase::learning(&p);
            ch.deadline = 0;
        }
        let mut sends: Vec<(usize, usize, Msg)> = Vec::new();
        let mut timeout = STEP_TIMEOUT_MS;
        loop {
            match &mut ch.phase {
                Phase::Learning { pending, served } => {
                    let removed = p.change.removed().and_then(index);
                    let required = self.required(&p, removed);
                    if ch.deadline > 0 {
                        // After the first round only the nodes the change needs are asked
                        // again; the others learn at the install or by gossip.
                        pending.retain(|n| required.contains(n));
                    }
                    if pending.is_empty() {
                        if let Some(r) = removed.filter(|r| !served.contains_key(r)) {
                            self.undrained.push((r, p.epoch()));
                        }
                        let todo = p.plan().drained();
                        ch.phase = Phase::Draining {
                            served: std::mem::take(served),
                            todo,
                            candidate: 0,
                            sources: BTreeMap::new(),
                        };
                        continue;
                    }
                    for &n in pending.iter() {
                        sends.push((n, 0, Msg::Learn(p.clone())));
                    }
                }
                Phase::Draining {
                    served,
                    todo,
                    candidate,
                    sources,
                } => {
                    let Some(&uid) = todo.first() else {
                        let work = self.pull_work(&p, sources);
                        ch.phase = Phase::Pulling { work };
                        continue;
                    };
                    let replicas = p.from.replicas_of(uid).unwrap_or_default();
                    let mut target = VersionVector::new();
                    for r in replicas.iter().filter_map(|a| index(a)) {
                        if let Some(vv) = served.get(&r) {
                            target.merge(vv);
                        }
                    }
                    // Replicas that stay in the partition first.
                    let staying = p.to.replicas_of(uid).unwrap_or_default();
                    let mut candidates: Vec<&String> = replicas
                        .iter()
                        .filter(|r| index(r).is_some_and(|n| served.contains_key(&n)))
                        .collect();
                    candidates.sort_by_key(|r| !staying.contains(r));
                    if candidates.is_empty() {
                        self.fail(format!(
                            "seed {}: no replica of partition uid {uid} learned the change",
                            self.cfg.seed
                        ));
                        return;
                    }
                    let Some(n) = index(candidates[*candidate % candidates.len()]) else {
                        return;
                    };
                    *candidate += 1;
                    sends.push((
                        n,
                        0,
                        Msg::Drain {
                            epoch: p.from.epoch,
                            partition: uid,
                            target,
                        },
                    ));
                    timeout = DRAIN_WAIT_MS + STEP_TIMEOUT_MS;
                }
                Phase::Pulling { work } => {
                    if work.iter().all(|w| w.done) {
                        ch.phase = Phase::installing(&p, c);
                        continue;
                    }
                    for (i, w) in work.iter().enumerate().filter(|(_, w)| !w.done) {
                        sends.push((w.node, i, w.call(p.epoch())));
                    }
                    timeout = PULL_TIMEOUT_MS;
                }
                Phase::Installing { pending, round } => {
                    if pending.is_empty() || *round == INSTALL_ROUNDS {
                        // The rest learn the view when they are back (gossip).
                        let epoch = p.epoch();
                        self.install(c, &p.to);
                        self.report.completed += 1;
                        self.trace(|| format!("CHANGE to epoch {epoch} completed by n{c}"));
                        return;
                    }
                    *round += 1;
                    for &n in pending.iter() {
                        sends.push((n, 0, Msg::Install(p.to.clone())));
                    }
                }
            }
            break;
        }
        for (n, tag, msg) in sends {
            // A node that is down refuses the connection at once.
            if self.nodes[n].up == Up::Down {
                continue;
            }
            let id = self.new_id();
            ch.calls.insert(id, (n, tag));
            self.send(c, n, id, msg);
        }
        if ch.calls.is_empty() {
            // Every call failed: pause, then try again.
            timeout = RETRY_PAUSE_MS;
        }
        ch.deadline = self.now + timeout;
        let run = ch.run;
        self.change = Some(ch);
        self.at(timeout, Event::Drive(run));
    }

    /// Nodes the change cannot go on without: the replicas of drained partitions and
    /// every destination, except a node being removed (it may be down for good).
    fn required(&self, p: &Proposal, removed: Option<usize>) -> BTreeSet<usize> {
        let mut required: BTreeSet<usize> = BTreeSet::new();
        for uid in p.plan().drained() {
            let replicas = p.from.replicas_of(uid).unwrap_or_default();
            required.extend(replicas.iter().filter_map(|a| index(a)));
        }
        for m in &p.to.members {
            if !duties(p, m).pulls.is_empty() {
                required.extend(index(m));
            }
        }
        if let Some(r) = removed {
            required.remove(&r);
        }
        required
    }

    /// The pulls of the change, each from its partition's drained replica.
    fn pull_work(
        &self,
        p: &Proposal,
        sources: &BTreeMap<PartitionUid, (usize, VersionVector)>,
    ) -> Vec<Work> {
        let mut work = Vec::new();
        for m in &p.to.members {
            let Some(node) = index(m) else { continue };
            for (key, _) in duties(p, m).pulls {
                let (uid, claim) = match key {
                    PullKey::Move { from } => (
                        from,
                        sources.get(&from).map(|(_, vv)| Claim {
                            applied: VersionVector::new(),
                            absorbed: vv.clone(),
                        }),
                    ),
                    PullKey::Copy { uid } => (uid, None),
                };
                if let Some((source, _)) = sources.get(&uid) {
                    work.push(Work {
                        node,
                        key,
                        source: *source,
                        claim,
                        done: false,
                    });
                }
            }
        }
        work
    }

    /// An answer to one of the coordinator's calls.
    pub(super) fn step_answer(&mut self, from: usize, to: usize, id: u64, msg: Msg) {
        let Some(mut ch) = self.change.take() else {
            return;
        };
        let call = ch.calls.get(&id).copied();
        if ch.coordinator != to || ch.orphaned || call.map(|(n, _)| n) != Some(from) {
            self.change = Some(ch);
            return;
        }
        ch.calls.remove(&id);
        let tag = call.map_or(0, |(_, tag)| tag);
        if matches!(msg, Msg::Refused) {
            ch.failed = true;
        } else {
            ch.active_ms = self.now;
        }
        let p = ch.proposal.clone();
        match (&mut ch.phase, msg) {
            (Phase::Learning { pending, served }, Msg::Learned(vv)) => {
                pending.remove(&from);
                if let Some(vv) = vv {
                    served.insert(from, vv);
                }
            }
            (Phase::Learning { .. }, Msg::AlreadyInstalled) => {
                // Someone installed the view: every pull was done.
                ch.calls.clear();
                ch.phase = Phase::installing(&p, to);
            }
            (Phase::Learning { .. }, Msg::Behind) => {
                // The node missed the change before: it installs the base view first,
                // and learns in the next round.
                self.send(to, from, 0, Msg::Install(p.from.clone()));
            }
            (
                Phase::Draining {
                    todo,
                    candidate,
                    sources,
                    served,
                },
                Msg::Drained,
            ) => {
                let uid = todo.remove(0);
                let replicas = p.from.replicas_of(uid).unwrap_or_default();
                let mut target = VersionVector::new();
                for r in replicas.iter().filter_map(|a| index(a)) {
                    if let Some(vv) = served.get(&r) {
                        target.merge(vv);
                    }
                }
                sources.insert(uid, (from, target));
                *candidate = 0;
            }
            (Phase::Pulling { work }, Msg::Pulled(progress)) => {
                if let Some(w) = work.get_mut(tag) {
                    if progress.done {
                        w.done = true;
                    } else {
                        // One page per call, as the server: ask for the next at once.
                        let call = w.call(p.epoch());
                        let id = self.new_id();
                        ch.calls.insert(id, (from, tag));
                        ch.deadline = self.now + PULL_TIMEOUT_MS;
                        let run = ch.run;
                        self.send(to, from, id, call);
                        self.at(PULL_TIMEOUT_MS, Event::Drive(run));
                    }
                }
            }
            (Phase::Installing { pending, .. }, Msg::Installed) => {
                pending.remove(&from);
            }
            _ => {}
        }
        let over = ch.calls.is_empty();
        if over && std::mem::take(&mut ch.failed) {
            // Try again after a pause.
            ch.deadline = self.now + RETRY_PAUSE_MS;
            let run = ch.run;
            self.change = Some(ch);
            return self.at(RETRY_PAUSE_MS, Event::Drive(run));
        }
        self.change = Some(ch);
        if over {
            self.next_round();
        }
    }

    /// The coordinator `n` crashed: its drive is gone. A participant takes the change
    /// over when it notices (`gossip`).
    pub(super) fn coordinator_lost(&mut self, n: usize) {
        if let Some(ch) = self.change.as_mut().filter(|c| c.coordinator == n) {
            ch.orphaned = true;
            ch.calls.clear();
        }
    }

    /// `redrive_loop`: a running participant drives a change whose coordinator crashed
    /// once it has seen no activity for `REDRIVE_AFTER_MS`, from the start (every step
    /// is idempotent).
    pub(super) fn redrive(&mut self, n: usize) {
        let Some(ch) = self.change.as_ref() else {
            return;
        };
        let participant = ch.proposal.participants().contains(&addr(n));
        if !ch.orphaned || !participant || self.now < ch.active_ms + REDRIVE_AFTER_MS {
            return;
        }
        let p = ch.proposal.clone();
        let run = self.new_id();
        self.trace(|| format!("n{n} drives the change to epoch {} on", p.epoch()));
        self.change = Some(ChangeRun::start(p, n, run, self.now));
        self.drive(run);
    }
}

/// A change named briefly for the report.
fn short(change: &Change) -> String {
    match change {
        Change::Replace { members, .. } => {
            format!("replace the view with {} members", members.len())
        }
        other => other.to_string(),
    }
}
