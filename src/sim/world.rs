//! The simulated world: nodes, sessions, the event queue and its loop.

use std::collections::{BTreeMap, BTreeSet};

use crate::antientropy::{Puller, Transfer};
use crate::clock::{CausalToken, Dot, PartitionUid, ReplicaId, VersionVector};
use crate::placement::{SlotSet, View};
use crate::replica::Replica;
use crate::storage::{MemoryStore, ReadTxn, Store};
use crate::viewchange::{Duties, Transition};

use super::gc::GcRound;
pub(super) use super::messages::{addr, index, Event, Fault, Msg};
use super::steps::Handoff;
use super::viewchange::ChangeRun;
use super::{
    Config, Report, Rng, DIGEST_INTERVAL_MS, GOSSIP_INTERVAL_MS, HANDOFF_PAGE_MS, HORIZONS_MS,
    SYNC_INTERVAL_MS, TRIM_INTERVAL_MS,
};

/// What one node does with one peer.
#[derive(Clone, Debug, Default)]
pub(super) struct PullState {
    pub(super) policy: Puller,
    /// The pull in flight (its id) and when it is given up.
    pub(super) inflight: Option<(u64, u64)>,
    /// A poke or a refused read arrived while a pull was in flight: pull again after it.
    pub(super) again: bool,
    pub(super) transfer: Option<Transfer>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Up {
    Running,
    Down,
    Paused,
}

/// One node's digest round with one peer.
#[derive(Clone, Debug, Default)]
pub(super) struct DigestRound {
    /// The call in flight (its id) and when it is given up.
    pub(super) inflight: Option<(u64, u64)>,
    /// This node's slot digests when the round began.
    pub(super) mine: Vec<u64>,
    /// The slots whose keys are being fetched, and the pages fetched so far.
    pub(super) slots: SlotSet,
    pub(super) pages: usize,
}

pub(super) struct SimNode {
    pub(super) store: MemoryStore,
    /// The installed view (`None`: a spare, a removed node, or one whose disk was wiped
    /// and that has not heard of its cluster again yet). Durable, as the view change
    /// it is in and the replica: they are persisted with the store in the server.
    pub(super) view: Option<View>,
    pub(super) transition: Option<Transition>,
    /// The epoch of the view that removed it, if one did (durable).
    pub(super) removed: Option<u64>,
    /// Its replica, when the view makes it one.
    pub(super) replica: Option<Replica>,
    pub(super) up: Up,
    pub(super) pulls: BTreeMap<usize, PullState>,
    /// How far each peer said it is (its last sync request): decides trimming,
    /// tombstone collection and quorum acknowledgements.
    pub(super) peer_have: BTreeMap<usize, VersionVector>,
    pub(super) digests: BTreeMap<usize, DigestRound>,
    /// Where tombstone collection goes on from (the server's trimmer cursor).
    pub(super) collect_cursor: Option<(u32, String)>,
    /// The floor an earlier trim round observed, with the first message id after it: it
    /// is used for collection once no page fetch begun before it is in flight (the
    /// server's `FetchGuard`).
    pub(super) pending_floor: Option<(u64, VersionVector)>,
    /// Messages and timeouts that reached the node while it was paused.
    pub(super) backlog: Vec<Event>,
    /// Drains waiting for the replica to catch up: `(coordinator, call id, target,
    /// deadline)`.
    pub(super) drains: Vec<(usize, u64, VersionVector, u64)>,
    /// Its duties in the change it learned (cached: writes check them).
    pub(super) duties: Option<Duties>,
    /// Handoff pages in flight, by request id.
    pub(super) handoffs: BTreeMap<u64, Handoff>,
    /// The deletion of handed-over slots under way.
    pub(super) gc: GcRound,
}

impl SimNode {
    pub(super) fn new(view: Option<View>, replica: Option<Replica>) -> Self {
        Self {
            store: MemoryStore::new(),
            view,
            transition: None,
            removed: None,
            replica,
            up: Up::Running,
            pulls: BTreeMap::new(),
            peer_have: BTreeMap::new(),
            digests: BTreeMap::new(),
            collect_cursor: None,
            pending_floor: None,
            backlog: Vec::new(),
            drains: Vec::new(),
            duties: None,
            handoffs: BTreeMap::new(),
            gc: GcRound::default(),
        }
    }

    /// The partition its replica belongs to.
    pub(super) fn partition(&self) -> Option<PartitionUid> {
        self.replica.as_ref().map(Replica::partition)
    }

    /// The slots its replica owns in its view (empty without one).
    pub(super) fn owned(&self) -> SlotSet {
        match (&self.view, self.partition()) {
            (Some(v), Some(uid)) => v.slots_of(uid),
            _ => SlotSet::default(),
        }
    }

    /// Forgets what a process keeps in memory for its replica's workers (a crash, or a
    /// new view: the server restarts them with a fresh handle).
    pub(super) fn reset_workers(&mut self) {
        self.pulls.clear();
        self.peer_have.clear();
        self.digests.clear();
        self.collect_cursor = None;
        self.pending_floor = None;
        self.drains.clear();
        self.handoffs.clear();
    }
}

/// A write the checker knows about.
pub(super) struct WriteRecord {
    pub(super) key: String,
    pub(super) dot: Dot,
    /// What the writer knew after writing: the write's causal past, and itself.
    pub(super) context: VersionVector,
    /// The level it was asked at (replicas that must hold it), and the partition's
    /// replica count then.
    pub(super) level: usize,
    pub(super) k: usize,
    /// The view epoch of its coordinator.
    pub(super) epoch: u64,
    /// The step it was applied at its coordinator.
    pub(super) written: u64,
    /// The step its client was told it succeeded; `None` while it waits for its peers,
    /// and for good when they did not confirm it in time (its outcome is unknown).
    pub(super) acked: Option<u64>,
    /// The nodes that held it when it was acknowledged (the coordinator and the peers
    /// whose reports counted).
    pub(super) holders: Vec<usize>,
}

/// A tombstone a replica dropped, for the checker.
pub(super) struct Collected {
    pub(super) at_ms: u64,
    pub(super) node: usize,
    pub(super) dot: Dot,
    pub(super) history: VersionVector,
    /// A delete a removed node took in its old view (the documented caveat's: it may be
    /// lost). Its absence still reflects what it superseded, but what it superseded
    /// coming back is not counted as a resurrection.
    pub(super) excused: bool,
}

/// Where a session's request is.
#[derive(Clone, Debug)]
pub(super) enum Stage {
    /// A read at a level above 1 gathers its peers' state of the key.
    Asking { answered: usize },
    /// A read waits until its replica reflects the token.
    ReadCatchUp,
    /// A write waits until its replica reflects the token (`Replica::accepts_write`).
    WriteCatchUp { value: Option<Vec<u8>> },
    /// A write applied at its replica waits for its peers' acknowledgements.
    Acks { write: usize },
}

/// A request in progress: the session waits for its answer.
#[derive(Clone, Debug)]
pub(super) struct Op {
    /// Names the current wait: answers and timeouts of an earlier one are ignored.
    pub(super) id: u64,
    pub(super) node: usize,
    pub(super) key: String,
    /// The step the request was sent at.
    pub(super) began: u64,
    /// The partition that serves it (in the serving node's view), its replica count,
    /// and the replicas the request involves (its level, resolved against that count).
    pub(super) partition: PartitionUid,
    pub(super) k: usize,
    pub(super) level: usize,
    /// The token the replica works with: the client's; for a read, with its peers'
    /// histories folded in; for a write waiting for acknowledgements, the write's answer.
    pub(super) token: CausalToken,
    pub(super) stage: Stage,
}

pub(super) struct Session {
    pub(super) token: CausalToken,
    /// The checker's own account of what this session causally knows.
    pub(super) known: VersionVector,
    /// The node it sends requests to (which forwards each to a replica of the key's
    /// partition).
    pub(super) node: usize,
    /// The request it waits for, if any.
    pub(super) op: Option<Op>,
}

pub(super) struct Sim {
    pub(super) cfg: Config,
    pub(super) rng: Rng,
    pub(super) now: u64,
    pub(super) seq: u64,
    pub(super) queue: BTreeMap<(u64, u64), Event>,
    pub(super) nodes: Vec<SimNode>,
    pub(super) sessions: Vec<Session>,
    pub(super) writes: Vec<WriteRecord>,
    /// Index into `writes` by dot.
    pub(super) by_dot: BTreeMap<Dot, usize>,
    pub(super) next_replica_id: ReplicaId,
    pub(super) next_msg: u64,
    pub(super) page_entries: u32,
    /// How long a source takes to serve each handoff page (drawn per seed: large
    /// transfers take time, and faults meet them midway).
    pub(super) handoff_page_ms: u64,
    // The network.
    pub(super) cut: BTreeSet<(usize, usize)>,
    /// Messages sent over a cut link, with when they were sent.
    pub(super) held: Vec<(u64, Event)>,
    pub(super) loss_per_mille: u64,
    pub(super) max_latency: u64,
    /// A pending convergence measurement: when the heal happened, and what must arrive
    /// at each partition's replicas.
    pub(super) pending: Option<(u64, BTreeMap<PartitionUid, VersionVector>)>,
    pub(super) clients_running: bool,
    /// Events handled so far: orders acknowledgements, collections and reads.
    pub(super) step: u64,
    /// How old a tombstone must be before it is collected (drawn per seed).
    pub(super) horizon_ms: u64,
    /// Tombstones dropped by collection, by key.
    pub(super) collected: BTreeMap<String, Vec<Collected>>,
    /// Disks wiped: `(node, step)`.
    pub(super) wipes: Vec<(usize, u64)>,
    /// Replicas removed by a change that could not drain them (they did not answer):
    /// `(node, the change's epoch)`. Writes only they held are lost with them, as
    /// documented.
    pub(super) undrained: Vec<(usize, u64)>,
    /// Stored versions already reported as outliving a collected tombstone.
    pub(super) flagged: BTreeSet<(usize, Dot)>,
    /// The view change being carried out, and the newest view decided.
    pub(super) change: Option<ChangeRun>,
    pub(super) decided: View,
    pub(super) report: Report,
}

impl Sim {
    pub(super) fn new(cfg: Config) -> Self {
        let mut rng = Rng::new(cfg.seed);
        let page_entries = rng.between(8, 128) as u32;
        let horizon_ms = HORIZONS_MS[rng.below(HORIZONS_MS.len() as u64) as usize];
        let handoff_page_ms = HANDOFF_PAGE_MS[rng.below(HANDOFF_PAGE_MS.len() as u64) as usize];
        let k = cfg.replicas.max(1);
        // The first view: `nodes` members, or a number drawn per seed from one partition
        // to two partitions and a proxy.
        // In shard-count mode, shards of two replicas and up to three more nodes.
        let least = if cfg.shards > 0 { 2 * cfg.shards } else { k };
        let members = match cfg.nodes {
            0 if cfg.view_changes => rng.between(least as u64, (least + k + 1) as u64) as usize,
            0 => least,
            n => n.max(least),
        };
        let addrs = (0..members).map(addr).collect();
        let decided = if cfg.shards > 0 {
            View::bootstrap_shards(addrs, cfg.shards)
        } else {
            View::bootstrap(addrs, k)
        }
        .expect("a view of enough loopback addresses is valid");
        let mut sim = Self {
            report: Report {
                seed: cfg.seed,
                ..Report::default()
            },
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            nodes: Vec::new(),
            sessions: Vec::new(),
            writes: Vec::new(),
            by_dot: BTreeMap::new(),
            next_replica_id: 1,
            next_msg: 1,
            page_entries,
            handoff_page_ms,
            cut: BTreeSet::new(),
            held: Vec::new(),
            loss_per_mille: 0,
            max_latency: 20,
            pending: None,
            clients_running: true,
            step: 0,
            horizon_ms,
            collected: BTreeMap::new(),
            wipes: Vec::new(),
            undrained: Vec::new(),
            flagged: BTreeSet::new(),
            change: None,
            decided: decided.clone(),
            cfg,
        };
        for _ in 0..members {
            sim.spawn_node(Some(decided.clone()));
        }
        for c in 0..sim.cfg.clients {
            let node = sim.rng.below(members as u64) as usize;
            sim.sessions.push(Session {
                token: CausalToken::empty(0),
                known: VersionVector::new(),
                node,
                op: None,
            });
            let offset = sim.rng.below(20);
            sim.at(offset, Event::Client(c));
        }
        sim.schedule_faults();
        if sim.cfg.view_changes {
            sim.schedule_changes();
        }
        sim
    }

    /// Starts a node: a member of `view` (a replica, or a proxy), or a blank spare.
    pub(super) fn spawn_node(&mut self, view: Option<View>) -> usize {
        let n = self.nodes.len();
        let replica = match view.as_ref().and_then(|v| v.role_of(&addr(n))) {
            Some(crate::placement::Role::Replica(uid)) => {
                Some(Replica::fresh(self.new_replica_id(), uid))
            }
            _ => None,
        };
        self.nodes.push(SimNode::new(view, replica));
        let offset = self.rng.below(SYNC_INTERVAL_MS);
        self.at(offset, Event::Tick(n));
        let offset = self.rng.below(TRIM_INTERVAL_MS);
        self.at(offset, Event::Trim(n));
        let offset = self.rng.below(GOSSIP_INTERVAL_MS);
        self.at(offset, Event::Gossip(n));
        // As the server: each peer's first round at a random point of the interval.
        // Rounds run with whoever is a peer when they come due.
        for p in 0..n {
            for (a, b) in [(n, p), (p, n)] {
                let offset = self
                    .rng
                    .between(DIGEST_INTERVAL_MS / 4, DIGEST_INTERVAL_MS - 1);
                self.at(offset, Event::Digest(a, b));
            }
        }
        n
    }

    pub(super) fn new_replica_id(&mut self) -> ReplicaId {
        // Ids are random in the server; here they only need to be distinct and
        // reproducible.
        let id = self.next_replica_id * 1_000 + self.rng.below(1_000);
        self.next_replica_id += 1;
        id
    }

    /// Whether every member of the newest view has installed it (a node back from a
    /// wiped disk learns it by gossip, maybe after the final heal).
    fn members_caught_up(&self) -> bool {
        let view = &self.decided;
        view.members.iter().filter_map(|a| index(a)).all(|n| {
            self.nodes[n]
                .view
                .as_ref()
                .is_some_and(|v| v.epoch == view.epoch)
        })
    }

    /// The other replicas of `n`'s partition, in `n`'s view.
    pub(super) fn peers_of(&self, n: usize) -> Vec<usize> {
        let node = &self.nodes[n];
        match (&node.view, node.partition()) {
            (Some(v), Some(uid)) => v
                .replicas_of(uid)
                .unwrap_or_default()
                .iter()
                .filter_map(|a| index(a))
                .filter(|&p| p != n)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether `n` runs a replica of `partition` (to answer a peer's request).
    pub(super) fn serves(&self, n: usize, partition: PartitionUid) -> bool {
        self.nodes[n].partition() == Some(partition)
    }

    /// Node `n`'s replica (for nodes known to have one).
    pub(super) fn replica(&self, n: usize) -> &Replica {
        self.nodes[n]
            .replica
            .as_ref()
            .expect("only called for nodes with a replica")
    }

    pub(super) fn at(&mut self, delay: u64, event: Event) {
        self.seq += 1;
        self.queue.insert((self.now + delay, self.seq), event);
    }

    pub(super) fn trace(&mut self, what: impl FnOnce() -> String) {
        if self.cfg.trace {
            let line = format!("{:>7} ms  {}", self.now, what());
            self.report.trace.push(line);
        }
    }

    pub(super) fn fail(&mut self, what: String) {
        self.trace(|| format!("FAILURE {what}"));
        // A broken run can find the same problem thousands of times; the first few say it.
        if self.report.failures.len() < 20 {
            self.report.failures.push(what);
        }
    }

    pub(super) fn run(&mut self) {
        // The final heal at `duration_ms` stops the clients; then the replicas get up to
        // a minute to converge, and, once the last tombstones are past the horizon, three
        // trim and digest intervals more to drop their logs and tombstones and compare
        // their states.
        let hard_stop = self.cfg.duration_ms + 60_000;
        // Three rounds: a floor is used one round after it is observed (`pending_floor`).
        let settle = 3 * TRIM_INTERVAL_MS.max(DIGEST_INTERVAL_MS) + 500;
        let mut final_converged: Option<u64> = None;
        while let Some(((t, _), event)) = self.queue.pop_first() {
            self.now = t;
            if self.now > hard_stop {
                break;
            }
            self.step += 1;
            self.handle(event);
            if !self.clients_running
                && final_converged.is_none()
                && self.pending.is_none()
                && self.change.is_none()
                && self.members_caught_up()
            {
                final_converged = Some(self.now);
            }
            let quiet_from =
                final_converged.map(|at| at.max(self.cfg.duration_ms + self.horizon_ms));
            if quiet_from.is_some_and(|at| self.now > at + settle) {
                break;
            }
        }
        self.final_checks();
    }

    pub(super) fn handle(&mut self, event: Event) {
        match event {
            Event::Tick(n) => {
                if self.nodes[n].up == Up::Running {
                    for p in self.peers_of(n) {
                        self.expire(n, p);
                        self.pull(n, p);
                    }
                }
                self.at(SYNC_INTERVAL_MS, Event::Tick(n));
            }
            Event::Trim(n) => {
                if self.nodes[n].up == Up::Running {
                    self.trim(n);
                }
                self.at(TRIM_INTERVAL_MS, Event::Trim(n));
            }
            Event::Digest(n, p) => {
                if self.nodes[n].up == Up::Running && self.peers_of(n).contains(&p) {
                    self.digest_round(n, p);
                }
                self.at(DIGEST_INTERVAL_MS, Event::Digest(n, p));
            }
            Event::Client(c) => {
                if self.clients_running && self.sessions[c].op.is_none() {
                    self.client_op(c);
                }
            }
            Event::Deliver { to, .. } if self.nodes[to].up == Up::Paused => {
                self.nodes[to].backlog.push(event);
            }
            Event::Timeout { c, op } => match &self.sessions[c].op {
                Some(o) if o.id == op && self.nodes[o.node].up == Up::Paused => {
                    // A stopped process's timers fire when it resumes.
                    let n = o.node;
                    self.nodes[n].backlog.push(event);
                }
                Some(o) if o.id == op => self.timeout(c),
                _ => {}
            },
            Event::Deliver { from, to, id, msg } => {
                if self.nodes[to].up == Up::Running {
                    self.deliver(from, to, id, msg);
                }
            }
            Event::Fault(fault) => self.start_fault(fault),
            Event::Heal => self.heal(),
            Event::Probe => self.probe(),
            Event::Change => self.start_change(),
            Event::Drive(run) => self.drive(run),
            Event::Gc(n, attempt) => match self.nodes[n].up {
                Up::Running => self.gc(n, attempt),
                Up::Paused => self.nodes[n].backlog.push(event),
                Up::Down => {}
            },
            Event::SendLater { from, to, id, msg } => match self.nodes[from].up {
                Up::Running => self.send(from, to, id, msg),
                Up::Paused => self.nodes[from]
                    .backlog
                    .push(Event::SendLater { from, to, id, msg }),
                Up::Down => {}
            },
            Event::Gossip(n) => {
                if self.nodes[n].up == Up::Running {
                    self.gossip(n);
                }
                self.at(GOSSIP_INTERVAL_MS, Event::Gossip(n));
            }
        }
    }

    // ---- storage ----

    pub(super) fn read(&self, n: usize) -> Box<dyn ReadTxn + '_> {
        // The memory store cannot fail to open a read.
        self.nodes[n]
            .store
            .read()
            .expect("the memory store always opens a read")
    }

    /// Runs `f` in a write transaction of node `n` with its replica, persists the
    /// replica, commits. `None` (nothing done) for a node without a replica.
    pub(super) fn commit<T>(
        &mut self,
        n: usize,
        f: impl FnOnce(&mut Replica, &mut dyn crate::storage::WriteTxn) -> crate::storage::Result<T>,
    ) -> Option<T> {
        self.nodes[n].replica.as_ref()?;
        self.commit_store(n, |replica, txn| match replica {
            Some(r) => f(r, txn),
            None => unreachable!("checked above"),
        })
    }

    /// Runs `f` in a write transaction of node `n`, persists the replica if it has one,
    /// commits.
    pub(super) fn commit_store<T>(
        &mut self,
        n: usize,
        f: impl FnOnce(
            &mut Option<Replica>,
            &mut dyn crate::storage::WriteTxn,
        ) -> crate::storage::Result<T>,
    ) -> Option<T> {
        let node = &mut self.nodes[n];
        let result = (|| {
            let mut txn = node.store.write()?;
            let out = f(&mut node.replica, &mut *txn)?;
            if let Some(r) = &node.replica {
                r.persist(&mut *txn)?;
            }
            txn.commit()?;
            Ok::<T, crate::storage::StorageError>(out)
        })();
        match result {
            Ok(out) => Some(out),
            Err(e) => {
                self.fail(format!("n{n}: storage failed: {e}"));
                None
            }
        }
    }
}
