//! The simulated world: nodes, sessions, the event queue and its loop.

use std::collections::{BTreeMap, BTreeSet};

use crate::antientropy::{Puller, Transfer};
use crate::clock::{CausalToken, Dot, ReplicaId, VersionVector};
use crate::placement::{SlotSet, SLOTS};
use crate::replica::{Replica, SnapshotPage, SnapshotRequest, SyncRequest, SyncResponse};
use crate::storage::{MemoryStore, ReadTxn, Store};

use super::{
    Config, Report, Rng, DIGEST_INTERVAL_MS, HORIZONS_MS, PARTITION, SYNC_INTERVAL_MS,
    TRIM_INTERVAL_MS,
};

#[derive(Clone, Debug)]
pub(super) enum Msg {
    SyncReq(SyncRequest),
    SyncResp(SyncResponse),
    SnapReq(SnapshotRequest),
    SnapResp(SnapshotPage),
    Poke,
    /// A quorum read asks a peer for its state of a key, with an empty token.
    KeyReq(String),
    /// The peer's answer: its token after reading the key (the key's history there).
    KeyResp(VersionVector),
    /// A digest round: the asker's bucket digests.
    DigestReq(Vec<u64>),
    /// The buckets that differ at the peer, and its slot digests in them.
    DigestResp(Vec<u32>, Vec<(u32, u64)>),
    /// A digest round fetches the peer's keys of the slots that differ.
    RepairReq(SnapshotRequest),
    RepairResp(SnapshotPage),
}

impl Msg {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Msg::SyncReq(_) => "sync?",
            Msg::SyncResp(_) => "sync!",
            Msg::SnapReq(_) => "snapshot?",
            Msg::SnapResp(_) => "snapshot!",
            Msg::Poke => "poke",
            Msg::KeyReq(_) => "key?",
            Msg::KeyResp(_) => "key!",
            Msg::DigestReq(_) => "digests?",
            Msg::DigestResp(..) => "digests!",
            Msg::RepairReq(_) => "repair?",
            Msg::RepairResp(_) => "repair!",
        }
    }
}

#[derive(Clone, Debug)]
pub(super) enum Event {
    /// A node's pull round: ask every peer it is not already asking.
    Tick(usize),
    /// A node's trimmer: trim the log, collect tombstones.
    Trim(usize),
    /// A node's digest round with one peer: `(node, peer)`.
    Digest(usize, usize),
    /// A session sends its next request.
    Client(usize),
    /// The wait `op` of session `c` runs out (ignored if the session moved on).
    Timeout {
        c: usize,
        op: u64,
    },
    /// `id` pairs a response with the call that asked (0 for pokes).
    Deliver {
        from: usize,
        to: usize,
        id: u64,
        msg: Msg,
    },
    Fault(Fault),
    Heal,
    Probe,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Fault {
    Isolate(usize),
    Split(Vec<usize>),
    OneWay(usize, usize),
    Crash(usize),
    /// A crash that lasts longer than a trim round.
    Outage(usize),
    Wipe(usize),
    Pause(usize),
    Lossy,
}

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
    pub(super) replica: Replica,
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
}

/// A write the checker knows about.
pub(super) struct WriteRecord {
    pub(super) key: String,
    pub(super) dot: Dot,
    /// What the writer knew after writing: the write's causal past, and itself.
    pub(super) context: VersionVector,
    /// The level it was asked at (replicas that must hold it).
    pub(super) level: usize,
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
    /// Replicas it involves (its level, resolved against K).
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
    // The network.
    pub(super) cut: BTreeSet<(usize, usize)>,
    /// Messages sent over a cut link, with when they were sent.
    pub(super) held: Vec<(u64, Event)>,
    pub(super) loss_per_mille: u64,
    pub(super) max_latency: u64,
    /// A pending convergence measurement: when the heal happened, and what must arrive.
    pub(super) pending: Option<(u64, VersionVector)>,
    pub(super) clients_running: bool,
    /// Events handled so far: orders acknowledgements, collections and reads.
    pub(super) step: u64,
    /// How old a tombstone must be before it is collected (drawn per seed).
    pub(super) horizon_ms: u64,
    /// Tombstones dropped by collection, by key.
    pub(super) collected: BTreeMap<String, Vec<Collected>>,
    /// Disks wiped: `(node, step)`.
    pub(super) wipes: Vec<(usize, u64)>,
    /// Stored versions already reported as outliving a collected tombstone.
    pub(super) flagged: BTreeSet<(usize, Dot)>,
    pub(super) report: Report,
}

pub(super) fn all_slots() -> SlotSet {
    (0..SLOTS).collect()
}

impl Sim {
    pub(super) fn new(cfg: Config) -> Self {
        let mut rng = Rng::new(cfg.seed);
        let page_entries = rng.between(8, 128) as u32;
        let horizon_ms = HORIZONS_MS[rng.below(HORIZONS_MS.len() as u64) as usize];
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
            flagged: BTreeSet::new(),
            cfg,
        };
        for n in 0..sim.cfg.replicas {
            let replica = Replica::fresh(sim.new_replica_id(), PARTITION);
            let pulls = sim.peers_of(n).map(|p| (p, PullState::default())).collect();
            sim.nodes.push(SimNode {
                store: MemoryStore::new(),
                replica,
                up: Up::Running,
                pulls,
                peer_have: BTreeMap::new(),
                digests: BTreeMap::new(),
                collect_cursor: None,
                pending_floor: None,
                backlog: Vec::new(),
            });
            let offset = sim.rng.below(SYNC_INTERVAL_MS);
            sim.at(offset, Event::Tick(n));
            let offset = sim.rng.below(TRIM_INTERVAL_MS);
            sim.at(offset, Event::Trim(n));
            // As the server: each peer's first round at a random point of the interval.
            for p in sim.peers_of(n).collect::<Vec<_>>() {
                let offset = sim
                    .rng
                    .between(DIGEST_INTERVAL_MS / 4, DIGEST_INTERVAL_MS - 1);
                sim.at(offset, Event::Digest(n, p));
            }
        }
        for c in 0..sim.cfg.clients {
            let node = sim.rng.below(sim.cfg.replicas as u64) as usize;
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
        sim
    }

    pub(super) fn new_replica_id(&mut self) -> ReplicaId {
        // Ids are random in the server; here they only need to be distinct and
        // reproducible.
        let id = self.next_replica_id * 1_000 + self.rng.below(1_000);
        self.next_replica_id += 1;
        id
    }

    pub(super) fn peers_of(&self, n: usize) -> impl Iterator<Item = usize> {
        (0..self.cfg.replicas).filter(move |&p| p != n)
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
            if !self.clients_running && final_converged.is_none() && self.pending.is_none() {
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
                    let peers: Vec<usize> = self.peers_of(n).collect();
                    for p in peers {
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
                if self.nodes[n].up == Up::Running {
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

    /// Runs `f` in a write transaction of node `n`, persists the replica, commits.
    pub(super) fn commit<T>(
        &mut self,
        n: usize,
        f: impl FnOnce(&mut Replica, &mut dyn crate::storage::WriteTxn) -> crate::storage::Result<T>,
    ) -> Option<T> {
        let node = &mut self.nodes[n];
        let result = (|| {
            let mut txn = node.store.write()?;
            let out = f(&mut node.replica, &mut *txn)?;
            node.replica.persist(&mut *txn)?;
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
