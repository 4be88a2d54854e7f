//! A deterministic simulation of one partition's replicas under network faults, crashes
//! and disk loss, with a checker; `kvs sim` runs it from the command line.
//!
//! # Design
//!
//! The simulated replicas are the real [`Replica`] state machines over [`MemoryStore`],
//! driven by the same anti-entropy decisions the server makes ([`antientropy`]): per peer
//! a puller that asks every [`SYNC_INTERVAL_MS`] and when poked, pages cut short by their
//! bounds, gaps answered by waiting then by a full state transfer, a log trimmed once
//! every peer has it. Everything else is simulated: time is a counter, the network an
//! event queue, and every choice (which client does what, where, when a message arrives
//! or whether it is lost, which fault comes next) is drawn from one seeded generator. No
//! thread, socket or clock is involved, so a seed replays exactly, event for event
//! (`kvs sim --seed N --trace`).
//!
//! **Faults** come in phases (a fault, then a heal window): a node isolated; the nodes
//! split in two; one direction of one link cut; a node crashed (volatile state lost,
//! restarted from its store at the heal); a node's disk wiped (it comes back as a new,
//! empty incarnation that must be rebuilt from its peers; only done when nothing would be
//! lost, that is when its peers together have applied all it has); a node paused
//! (messages wait for it, as in a socket buffer); a lossy, slow network whose delays
//! reorder messages. Client sessions keep running through all of it, and move between
//! nodes, so a session often crosses a partition carrying a token from the other side.
//!
//! **The checker** keeps, independently of the store, what each session causally knows:
//! its own writes, and for every version it read the knowledge its writer had. A dot
//! `r:n` stands for all of `r`'s writes up to `n` (a replica's writes are ordered by
//! its counter), so knowledge is a version vector. It reports:
//! * a *stale read*: a read that does not reflect a write of that key the session knows;
//! * a *resurrection*: a read returning a version that a write the session knows had
//!   superseded (a delete coming back, say);
//! * a *lost write*: an acknowledged write not reflected on every replica at the end;
//! * *divergence*: replicas whose keys or vectors differ once everything is healed;
//! * *slow convergence*: a heal after which the writes made before it took longer than
//!   [`CONVERGENCE_BOUND_MS`] to reach every replica;
//! * a *log left behind*: log entries still kept once every replica has everything.
//!
//! # Caveats
//!
//! * One partition, no view changes: handoffs are tested in `replica` and by the process
//!   tests and the nemesis, not here.
//! * Clients reach every live node (faults cut links between replicas); a refused read
//!   is counted, not retried, where the server would wait for its pullers and then ask a
//!   peer.
//! * Connections are modelled coarsely (see `Sim::send`): no congestion, no
//!   corruption, and a message held by a cut arrives at the heal or never.

use std::collections::{BTreeMap, BTreeSet};

use crate::antientropy::{Next, Puller, Transfer};
use crate::clock::{CausalToken, Dot, PartitionUid, ReplicaId, VersionVector};
use crate::placement::{slot_of, SlotSet, SLOTS};
use crate::replica::{
    KeyState, Replica, SnapshotPage, SnapshotRequest, SyncRequest, SyncResponse, WriteRequest,
};
use crate::storage::{MemoryStore, ReadTxn, Store};

/// Pull interval, as the server's `SYNC_INTERVAL`.
pub const SYNC_INTERVAL_MS: u64 = 200;
/// A pull unanswered this long is given up, as the server's `SYNC_TIMEOUT`.
pub const SYNC_TIMEOUT_MS: u64 = 2_000;
/// Log trimming interval, as the server's trimmer.
pub const TRIM_INTERVAL_MS: u64 = 5_000;
/// The contract: replicas agree within this long after a fault heals.
pub const CONVERGENCE_BOUND_MS: u64 = 5_000;
/// Bytes per page (entries per page are drawn per seed, 8 to 128: far below the
/// server's 1,000, so paging is exercised, yet enough to outpace the clients).
const PAGE_BYTES: u32 = 64 * 1024;
/// How often convergence is probed while a measurement is pending.
const PROBE_MS: u64 = 5;
/// Partition uid of the simulated partition.
const PARTITION: PartitionUid = 1;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    /// Replicas of the partition (K).
    pub replicas: usize,
    /// Concurrent client sessions.
    pub clients: usize,
    /// Distinct keys the clients use (few, so writes collide).
    pub keys: usize,
    /// Simulated milliseconds of faults and client load, before the final heal.
    pub duration_ms: u64,
    /// Record every event in the report.
    pub trace: bool,
    /// A bug to plant, to show the checker finds it (see [`self_test`]).
    pub bug: Option<Bug>,
}

/// Bugs the checker must find when planted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// Reads are answered without checking the client's token.
    ServeStale,
    /// Writes are made without the client's token.
    ForgetToken,
    /// Sync pages lose the tombstones they carry, but still claim their writes.
    DropTombstones,
}

impl Bug {
    pub const ALL: [Bug; 3] = [Bug::ServeStale, Bug::ForgetToken, Bug::DropTombstones];
}

impl Default for Config {
    fn default() -> Self {
        Self {
            seed: 1,
            replicas: 3,
            clients: 4,
            keys: 8,
            duration_ms: 30_000,
            trace: false,
            bug: None,
        }
    }
}

/// What a run did and found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub seed: u64,
    pub writes: u64,
    pub deletes: u64,
    pub reads: u64,
    /// Reads a replica could not serve yet (its peers had writes the token names).
    pub refused: u64,
    /// Operations sent to a node that was down or paused.
    pub unavailable: u64,
    pub messages: u64,
    pub dropped: u64,
    /// State transfers completed (wiped replicas rebuilt, trimmed logs bridged).
    pub transfers: u64,
    /// The fault phases, in order.
    pub faults: Vec<String>,
    /// Milliseconds from each heal until every replica had the writes made before it;
    /// the last one is the final heal.
    pub convergence_ms: Vec<u64>,
    /// Heals followed by the next fault before convergence could be measured.
    pub interrupted: u64,
    /// Every violation found; empty on success.
    pub failures: Vec<String>,
    /// Hash of the final replica states: equal seeds give equal digests.
    pub digest: u64,
    pub trace: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }
}

/// A tiny deterministic PRNG (xorshift64), so a seed means the same run on every
/// machine and with every dependency version.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Spread small seeds; xorshift must not start at zero.
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

#[derive(Clone, Debug)]
enum Msg {
    SyncReq(SyncRequest),
    SyncResp(SyncResponse),
    SnapReq(SnapshotRequest),
    SnapResp(SnapshotPage),
    Poke,
}

impl Msg {
    fn name(&self) -> &'static str {
        match self {
            Msg::SyncReq(_) => "sync?",
            Msg::SyncResp(_) => "sync!",
            Msg::SnapReq(_) => "snapshot?",
            Msg::SnapResp(_) => "snapshot!",
            Msg::Poke => "poke",
        }
    }
}

#[derive(Clone, Debug)]
enum Event {
    /// A node's pull round: ask every peer it is not already asking.
    Tick(usize),
    Trim(usize),
    Client(usize),
    /// `id` pairs a response with the pull that asked (0 for requests and pokes).
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
enum Fault {
    Isolate(usize),
    Split(Vec<usize>),
    OneWay(usize, usize),
    Crash(usize),
    Wipe(usize),
    Pause(usize),
    Lossy,
}

/// What one node does with one peer.
#[derive(Clone, Debug, Default)]
struct PullState {
    policy: Puller,
    /// The pull in flight (its id) and when it is given up.
    inflight: Option<(u64, u64)>,
    /// A poke or a refused read arrived while a pull was in flight: pull again after it.
    again: bool,
    transfer: Option<Transfer>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Up {
    Running,
    Down,
    Paused,
}

struct SimNode {
    store: MemoryStore,
    replica: Replica,
    up: Up,
    pulls: BTreeMap<usize, PullState>,
    /// How far each peer said it is (its last sync request): decides trimming.
    peer_have: BTreeMap<usize, VersionVector>,
    /// Messages that reached the node while it was paused.
    backlog: Vec<Event>,
}

/// A write the checker knows about.
struct WriteRecord {
    key: String,
    dot: Dot,
    /// What the writer knew after writing: the write's causal past, and itself.
    context: VersionVector,
}

struct Session {
    token: CausalToken,
    /// The checker's own account of what this session causally knows.
    known: VersionVector,
    node: usize,
}

struct Sim {
    cfg: Config,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Event>,
    nodes: Vec<SimNode>,
    sessions: Vec<Session>,
    writes: Vec<WriteRecord>,
    /// Index into `writes` by dot.
    by_dot: BTreeMap<Dot, usize>,
    next_replica_id: ReplicaId,
    next_msg: u64,
    page_entries: u32,
    // The network.
    cut: BTreeSet<(usize, usize)>,
    /// Messages sent over a cut link, with when they were sent.
    held: Vec<(u64, Event)>,
    loss_per_mille: u64,
    max_latency: u64,
    /// A pending convergence measurement: when the heal happened, and what must arrive.
    pending: Option<(u64, VersionVector)>,
    clients_running: bool,
    report: Report,
}

/// Runs one seeded simulation.
pub fn run(cfg: &Config) -> Report {
    let mut sim = Sim::new(cfg.clone());
    sim.run();
    sim.report
}

fn all_slots() -> SlotSet {
    (0..SLOTS).collect()
}

impl Sim {
    fn new(cfg: Config) -> Self {
        let mut rng = Rng::new(cfg.seed);
        let page_entries = rng.between(8, 128) as u32;
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
                backlog: Vec::new(),
            });
            let offset = sim.rng.below(SYNC_INTERVAL_MS);
            sim.at(offset, Event::Tick(n));
            let offset = sim.rng.below(TRIM_INTERVAL_MS);
            sim.at(offset, Event::Trim(n));
        }
        for c in 0..sim.cfg.clients {
            let node = sim.rng.below(sim.cfg.replicas as u64) as usize;
            sim.sessions.push(Session {
                token: CausalToken::empty(0),
                known: VersionVector::new(),
                node,
            });
            let offset = sim.rng.below(20);
            sim.at(offset, Event::Client(c));
        }
        sim.schedule_faults();
        sim
    }

    fn new_replica_id(&mut self) -> ReplicaId {
        // Ids are random in the server; here they only need to be distinct and
        // reproducible.
        let id = self.next_replica_id * 1_000 + self.rng.below(1_000);
        self.next_replica_id += 1;
        id
    }

    fn peers_of(&self, n: usize) -> impl Iterator<Item = usize> {
        (0..self.cfg.replicas).filter(move |&p| p != n)
    }

    fn at(&mut self, delay: u64, event: Event) {
        self.seq += 1;
        self.queue.insert((self.now + delay, self.seq), event);
    }

    fn trace(&mut self, what: impl FnOnce() -> String) {
        if self.cfg.trace {
            let line = format!("{:>7} ms  {}", self.now, what());
            self.report.trace.push(line);
        }
    }

    fn fail(&mut self, what: String) {
        self.trace(|| format!("FAILURE {what}"));
        // A broken run can find the same problem thousands of times; the first few say it.
        if self.report.failures.len() < 20 {
            self.report.failures.push(what);
        }
    }

    /// Lays out the fault phases over the run: fault, heal window, fault, ...
    fn schedule_faults(&mut self) {
        let mut t = self.rng.between(500, 2_000);
        let n = self.cfg.replicas as u64;
        while t < self.cfg.duration_ms {
            let a = self.rng.below(n) as usize;
            let fault = match self.rng.below(7) {
                0 => Fault::Isolate(a),
                1 => {
                    let side: Vec<usize> = (0..self.cfg.replicas)
                        .filter(|&i| i == a || self.rng.chance(400))
                        .collect();
                    Fault::Split(side)
                }
                2 => Fault::OneWay(a, (a + 1 + self.rng.below(n - 1) as usize) % n as usize),
                3 => Fault::Crash(a),
                4 => Fault::Wipe(a),
                5 => Fault::Pause(a),
                _ => Fault::Lossy,
            };
            self.queue.insert((t, 0), Event::Fault(fault));
            t += self.rng.between(300, 4_000);
            self.queue.insert((t, 1), Event::Heal);
            // Sometimes the next fault comes before the replicas could converge.
            t += if self.rng.chance(200) {
                self.rng.between(0, 500)
            } else {
                self.rng.between(1_000, 6_000)
            };
        }
        self.queue.insert((self.cfg.duration_ms, 1), Event::Heal);
    }

    fn run(&mut self) {
        // The final heal at `duration_ms` stops the clients; then the replicas get up to
        // a minute to converge, and two trim intervals more to drop their logs.
        let hard_stop = self.cfg.duration_ms + 60_000;
        let mut final_converged: Option<u64> = None;
        while let Some(((t, _), event)) = self.queue.pop_first() {
            self.now = t;
            if self.now > hard_stop {
                break;
            }
            self.handle(event);
            if !self.clients_running && final_converged.is_none() && self.pending.is_none() {
                final_converged = Some(self.now);
            }
            if final_converged.is_some_and(|at| self.now > at + 2 * TRIM_INTERVAL_MS + 500) {
                break;
            }
        }
        self.final_checks();
    }

    fn handle(&mut self, event: Event) {
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
            Event::Client(c) => {
                if self.clients_running {
                    self.client_op(c);
                    let pause = self.rng.between(2, 30);
                    self.at(pause, Event::Client(c));
                }
            }
            Event::Deliver { to, .. } if self.nodes[to].up == Up::Paused => {
                self.nodes[to].backlog.push(event);
            }
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

    // ---- the network ----

    /// Sends over a connection, modelled on TCP: a cut link holds what is sent (the
    /// sender retransmits) until the heal, when what is younger than a call's timeout
    /// arrives after a retransmission delay and the rest is gone with its timed-out
    /// connection; a lossy link delays by a retransmission, and sometimes resets.
    fn send(&mut self, from: usize, to: usize, id: u64, msg: Msg) {
        self.report.messages += 1;
        let event = Event::Deliver { from, to, id, msg };
        if self.cut.contains(&(from, to)) {
            self.held.push((self.now, event));
            return;
        }
        let mut latency = self.rng.between(1, self.max_latency);
        if self.rng.chance(self.loss_per_mille) {
            if self.rng.chance(100) {
                self.report.dropped += 1;
                self.trace(|| format!("n{from} -> n{to}: connection reset"));
                return;
            }
            latency += self.rng.between(200, 1_000);
        }
        self.at(latency, event);
    }

    fn deliver(&mut self, from: usize, to: usize, id: u64, msg: Msg) {
        self.trace(|| format!("n{from} -> n{to} {}", msg.name()));
        match msg {
            Msg::Poke => self.wake(to, from),
            Msg::SyncReq(req) => {
                self.nodes[to].peer_have.insert(from, req.have.clone());
                let node = &self.nodes[to];
                let resp = Replica::serve_sync(&*self.read(to), &node.replica, &all_slots(), &req);
                match resp {
                    Ok(resp) => self.send(to, from, id, Msg::SyncResp(resp)),
                    Err(e) => self.fail(format!("n{to} failed to serve a sync: {e}")),
                }
            }
            Msg::SnapReq(req) => {
                let node = &self.nodes[to];
                let page =
                    Replica::serve_snapshot(&*self.read(to), &node.replica, &all_slots(), &req);
                match page {
                    Ok(page) => self.send(to, from, id, Msg::SnapResp(page)),
                    Err(e) => self.fail(format!("n{to} failed to serve a snapshot: {e}")),
                }
            }
            Msg::SyncResp(resp) => {
                if !self.answered(to, from, id) {
                    return;
                }
                let absorbed = self.nodes[to].replica.absorbed().clone();
                let peers = self.cfg.replicas - 1;
                let next = self
                    .pull_state(to, from)
                    .policy
                    .after_page(&resp, &absorbed, peers, false);
                self.apply(to, &resp);
                match next {
                    Next::More => self.pull(to, from),
                    Next::Done | Next::Wait => {
                        if std::mem::take(&mut self.pull_state(to, from).again) {
                            self.pull(to, from);
                        }
                    }
                    Next::CopyState => {
                        self.trace(|| format!("n{to} copies n{from}'s whole state"));
                        self.pull_state(to, from).transfer = Some(Transfer::new(PARTITION));
                        self.pull(to, from);
                    }
                }
            }
            Msg::SnapResp(page) => {
                if !self.answered(to, from, id) {
                    return;
                }
                let Some(mut transfer) = self.pull_state(to, from).transfer.take() else {
                    return;
                };
                let resp = transfer.on_page(page);
                self.apply(to, &resp);
                if transfer.is_done() {
                    let claim = transfer.claim();
                    let node = &mut self.nodes[to];
                    node.replica.claim(&claim);
                    self.commit(to, |_, _| Ok(()));
                    self.report.transfers += 1;
                    self.trace(|| format!("n{to} finished copying n{from}"));
                } else {
                    self.pull_state(to, from).transfer = Some(transfer);
                }
                self.pull(to, from);
            }
        }
    }

    /// Whether a response is the one `to`'s puller for `from` waits for; clears it.
    fn answered(&mut self, to: usize, from: usize, id: u64) -> bool {
        let st = self.pull_state(to, from);
        if st.inflight.map(|(want, _)| want) != Some(id) {
            // Late: the pull was given up, or the node restarted since.
            return false;
        }
        st.inflight = None;
        true
    }

    fn pull_state(&mut self, n: usize, peer: usize) -> &mut PullState {
        self.nodes[n].pulls.entry(peer).or_default()
    }

    /// Gives up a pull that has waited longer than the timeout.
    fn expire(&mut self, n: usize, p: usize) {
        let now = self.now;
        let st = self.pull_state(n, p);
        if st.inflight.is_some_and(|(_, deadline)| now >= deadline) {
            st.inflight = None;
            // The server's transfer fails on a timeout and starts over next round.
            st.transfer = None;
        }
    }

    /// `n` pulls from `p` unless it is already asking.
    fn pull(&mut self, n: usize, p: usize) {
        if self.nodes[n].up != Up::Running || self.pull_state(n, p).inflight.is_some() {
            return;
        }
        let id = self.next_msg;
        self.next_msg += 1;
        let deadline = self.now + SYNC_TIMEOUT_MS;
        let page_entries = self.page_entries;
        let st = self.pull_state(n, p);
        st.inflight = Some((id, deadline));
        let msg = match &st.transfer {
            Some(t) => Msg::SnapReq(t.request(page_entries, PAGE_BYTES)),
            None => Msg::SyncReq(SyncRequest {
                partition: PARTITION,
                have: self.nodes[n].replica.applied().clone(),
                max_entries: page_entries,
                max_bytes: PAGE_BYTES,
            }),
        };
        self.send(n, p, id, msg);
    }

    /// A poke from `p` (or a read `n` could not serve): pull from `p` now, or right
    /// after the pull in flight.
    fn wake(&mut self, n: usize, p: usize) {
        if self.pull_state(n, p).inflight.is_some() {
            self.pull_state(n, p).again = true;
        } else {
            self.pull(n, p);
        }
    }

    // ---- storage ----

    fn read(&self, n: usize) -> Box<dyn ReadTxn + '_> {
        // The memory store cannot fail to open a read.
        self.nodes[n]
            .store
            .read()
            .expect("the memory store always opens a read")
    }

    /// Runs `f` in a write transaction of node `n`, persists the replica, commits.
    fn commit<T>(
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

    fn apply(&mut self, n: usize, resp: &SyncResponse) {
        let mut planted;
        let resp = if self.cfg.bug == Some(Bug::DropTombstones) {
            planted = resp.clone();
            for (_, _, state) in &mut planted.states {
                state.versions.retain(|v| v.value.is_some());
            }
            &planted
        } else {
            resp
        };
        if !resp.log.is_empty() || !resp.states.is_empty() || !resp.covered.is_empty() {
            self.commit(n, |r, txn| r.apply_sync(txn, resp));
        }
    }

    fn trim(&mut self, n: usize) {
        let node = &self.nodes[n];
        if node.peer_have.len() < self.cfg.replicas - 1 {
            return;
        }
        let floor = Replica::trim_floor(node.replica.applied(), node.peer_have.values());
        self.commit(n, |_, txn| {
            for (origin, upto) in floor.iter() {
                txn.log_trim(origin, upto)?;
            }
            Ok(())
        });
    }

    // ---- clients and the checker ----

    fn client_op(&mut self, c: usize) {
        if self.rng.chance(300) {
            self.sessions[c].node = self.rng.below(self.cfg.replicas as u64) as usize;
        }
        let n = self.sessions[c].node;
        if self.nodes[n].up != Up::Running {
            self.report.unavailable += 1;
            return;
        }
        let key = format!("k{}", self.rng.below(self.cfg.keys as u64));
        match self.rng.below(20) {
            0..=7 => self.client_read(c, n, &key),
            8..=9 => self.client_write(c, n, &key, None),
            _ => {
                let value = format!("c{c}@{}", self.now);
                self.client_write(c, n, &key, Some(value.into_bytes()));
            }
        }
    }

    fn client_write(&mut self, c: usize, n: usize, key: &str, value: Option<Vec<u8>>) {
        let delete = value.is_none();
        let req = WriteRequest {
            slot: slot_of(key),
            key: key.to_string(),
            value,
            token: if self.cfg.bug == Some(Bug::ForgetToken) {
                CausalToken::empty(0)
            } else {
                self.sessions[c].token.clone()
            },
            now_ms: self.now,
        };
        if !self.nodes[n].replica.accepts_write(&req.token) {
            // The server waits for its peers, then refuses; here the client moves on.
            self.report.refused += 1;
            self.trace(|| format!("c{c} at n{n}: write {key}: not yet (catching up)"));
            let peers: Vec<usize> = self.peers_of(n).collect();
            for p in peers {
                self.wake(n, p);
            }
            return;
        }
        let before = self.nodes[n]
            .replica
            .applied()
            .get(self.nodes[n].replica.id());
        let Some(out) = self.commit(n, |r, txn| r.write(txn, req)) else {
            return;
        };
        let id = self.nodes[n].replica.id();
        let counter = self.nodes[n].replica.applied().get(id);
        let session = &mut self.sessions[c];
        session.token = out.token;
        if counter == before {
            // A delete of a key that does not exist: nothing was written.
            self.trace(|| format!("c{c} at n{n}: delete {key}: not found"));
            return;
        }
        let dot = Dot {
            replica: id,
            counter,
        };
        session.known.raise(id, counter);
        let context = session.known.clone();
        self.by_dot.insert(dot, self.writes.len());
        self.writes.push(WriteRecord {
            key: key.to_string(),
            dot,
            context,
        });
        if delete {
            self.report.deletes += 1;
        } else {
            self.report.writes += 1;
        }
        self.trace(|| {
            let what = if delete { "delete" } else { "write" };
            format!(
                "c{c} at n{n}: {what} {key} as {}:{}",
                dot.replica, dot.counter
            )
        });
        // The poker: peers should pull soon.
        let peers: Vec<usize> = self.peers_of(n).collect();
        for p in peers {
            self.send(n, p, 0, Msg::Poke);
        }
    }

    fn client_read(&mut self, c: usize, n: usize, key: &str) {
        let slot = slot_of(key);
        let token = self.sessions[c].token.clone();
        let (state, servable) = {
            let txn = self.read(n);
            let state = txn.get(slot, key).ok().flatten().unwrap_or_default();
            let served = self.nodes[n].replica.served();
            let servable = Replica::can_serve(&served, PARTITION, &token)
                || Replica::can_serve_key(&served, PARTITION, &token, &state);
            (state, servable)
        };
        if !servable && self.cfg.bug != Some(Bug::ServeStale) {
            self.report.refused += 1;
            self.trace(|| format!("c{c} at n{n}: read {key}: not yet (catching up)"));
            // The server pokes its pullers and waits; here the client simply moves on.
            let peers: Vec<usize> = self.peers_of(n).collect();
            for p in peers {
                self.wake(n, p);
            }
            return;
        }
        self.report.reads += 1;
        self.check_read(c, n, key, &state);
        let mut token = token;
        state.observe_into(PARTITION, &mut token);
        let session = &mut self.sessions[c];
        session.token = token;
        for v in &state.versions {
            if let Some(&i) = self.by_dot.get(&v.dot) {
                session.known.merge(&self.writes[i].context);
            }
        }
        self.trace(|| {
            let dots: Vec<String> = state
                .versions
                .iter()
                .map(|v| format!("{}:{}", v.dot.replica, v.dot.counter))
                .collect();
            format!("c{c} at n{n}: read {key} = [{}]", dots.join(" "))
        });
    }

    fn check_read(&mut self, c: usize, n: usize, key: &str, state: &KeyState) {
        let known = &self.sessions[c].known;
        let mut problems = Vec::new();
        for w in self.writes.iter().filter(|w| w.key == key) {
            if !known.contains(w.dot) {
                continue;
            }
            if !state.covers(w.dot) {
                problems.push(format!(
                    "stale read: session c{c} at n{n} read {key} without write {}:{} it knows",
                    w.dot.replica, w.dot.counter
                ));
            }
            for v in &state.versions {
                if v.dot != w.dot && w.context.contains(v.dot) {
                    problems.push(format!(
                        "resurrection: session c{c} at n{n} read version {}:{} of {key}, \
                         superseded by {}:{} which it knows",
                        v.dot.replica, v.dot.counter, w.dot.replica, w.dot.counter
                    ));
                }
            }
        }
        for p in problems {
            self.fail(format!("seed {}: {p}", self.cfg.seed));
        }
    }

    // ---- faults ----

    fn start_fault(&mut self, fault: Fault) {
        let fault = match fault {
            // Wiping a disk that holds the only copy of acknowledged writes loses them:
            // that is what W=1 means, not a bug to find. Crash such a node instead.
            Fault::Wipe(n) if !self.only_copies_elsewhere(n) => Fault::Crash(n),
            other => other,
        };
        self.report.faults.push(format!("{fault:?}"));
        self.trace(|| format!("FAULT {fault:?}"));
        if self.pending.take().is_some() {
            self.report.interrupted += 1;
        }
        let n = self.cfg.replicas;
        match fault {
            Fault::Isolate(a) => {
                for b in (0..n).filter(|&b| b != a) {
                    self.cut.insert((a, b));
                    self.cut.insert((b, a));
                }
            }
            Fault::Split(side) => {
                for &a in &side {
                    for b in (0..n).filter(|b| !side.contains(b)) {
                        self.cut.insert((a, b));
                        self.cut.insert((b, a));
                    }
                }
            }
            Fault::OneWay(a, b) => {
                self.cut.insert((a, b));
            }
            Fault::Crash(a) => self.crash(a),
            Fault::Wipe(a) => {
                self.crash(a);
                let id = self.new_replica_id();
                let node = &mut self.nodes[a];
                node.store = MemoryStore::new();
                node.replica = Replica::fresh(id, PARTITION);
            }
            Fault::Pause(a) => self.nodes[a].up = Up::Paused,
            Fault::Lossy => {
                self.loss_per_mille = self.rng.between(100, 400);
                self.max_latency = self.rng.between(200, 1_500);
            }
        }
    }

    /// Whether every write node `n` has applied is applied by some other node too.
    fn only_copies_elsewhere(&self, n: usize) -> bool {
        let mut others = VersionVector::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if i != n {
                others.merge(node.replica.applied());
            }
        }
        others.dominates(self.nodes[n].replica.applied())
    }

    fn crash(&mut self, a: usize) {
        let node = &mut self.nodes[a];
        node.up = Up::Down;
        // Everything not in the store is gone.
        node.pulls
            .values_mut()
            .for_each(|st| *st = PullState::default());
        node.peer_have.clear();
        node.backlog.clear();
    }

    fn heal(&mut self) {
        self.trace(|| "HEAL".to_string());
        self.cut.clear();
        for (sent, event) in std::mem::take(&mut self.held) {
            if self.now - sent < SYNC_TIMEOUT_MS {
                let rto = self.rng.between(1, 600);
                self.at(rto, event);
            } else {
                self.report.dropped += 1;
            }
        }
        self.loss_per_mille = 0;
        self.max_latency = 20;
        for a in 0..self.cfg.replicas {
            match self.nodes[a].up {
                Up::Running => {}
                Up::Down => {
                    let node = &mut self.nodes[a];
                    let loaded = node.store.read().and_then(|txn| Replica::load(&*txn));
                    match loaded {
                        Ok(Some(r)) => node.replica = r,
                        // A wiped node starts as the fresh incarnation it was given.
                        Ok(None) => {}
                        Err(e) => self.fail(format!("n{a} cannot load its replica: {e}")),
                    }
                    self.nodes[a].up = Up::Running;
                    // The server's first pull round runs at once after a start.
                    let peers: Vec<usize> = self.peers_of(a).collect();
                    for p in peers {
                        self.pull(a, p);
                    }
                }
                Up::Paused => {
                    self.nodes[a].up = Up::Running;
                    let backlog = std::mem::take(&mut self.nodes[a].backlog);
                    for event in backlog {
                        self.handle(event);
                    }
                }
            }
        }
        if self.now >= self.cfg.duration_ms {
            self.clients_running = false;
        }
        // Convergence: every write made before the heal reaches every replica.
        let mut target = VersionVector::new();
        for node in &self.nodes {
            target.merge(node.replica.applied());
        }
        self.pending = Some((self.now, target));
        self.at(0, Event::Probe);
    }

    fn probe(&mut self) {
        let Some((since, target)) = &self.pending else {
            return;
        };
        if self
            .nodes
            .iter()
            .all(|node| node.replica.applied().dominates(target))
        {
            let took = self.now - since;
            self.trace(|| format!("converged {took} ms after the heal"));
            self.report.convergence_ms.push(took);
            if took > CONVERGENCE_BOUND_MS {
                self.fail(format!(
                    "seed {}: replicas took {took} ms to converge after a heal (bound {CONVERGENCE_BOUND_MS} ms)",
                    self.cfg.seed
                ));
            }
            self.pending = None;
        } else {
            self.at(PROBE_MS, Event::Probe);
        }
    }

    // ---- the end ----

    fn final_checks(&mut self) {
        let seed = self.cfg.seed;
        if let Some((since, _)) = self.pending.take() {
            self.fail(format!(
                "seed {seed}: replicas had not converged {} ms after the final heal",
                self.now - since
            ));
        }
        let mut states: Vec<Vec<(u32, String, KeyState)>> = Vec::new();
        for n in 0..self.cfg.replicas {
            let scanned = self.read(n).scan(None, usize::MAX);
            match scanned {
                Ok(s) => states.push(s),
                Err(e) => return self.fail(format!("n{n}: scan failed: {e}")),
            }
        }
        for n in 1..self.cfg.replicas {
            if states[n] != states[0] {
                self.fail(format!("seed {seed}: n{n}'s keys differ from n0's"));
            }
            if self.nodes[n].replica.applied() != self.nodes[0].replica.applied() {
                self.fail(format!(
                    "seed {seed}: n{n}'s applied vector differs from n0's"
                ));
            }
        }
        let mut lost = Vec::new();
        for w in &self.writes {
            let covered = states[0]
                .iter()
                .any(|(_, k, s)| *k == w.key && s.covers(w.dot));
            if !covered {
                lost.push(format!(
                    "seed {seed}: acknowledged write {}:{} of {} lost",
                    w.dot.replica, w.dot.counter, w.key
                ));
            }
        }
        for l in lost {
            self.fail(l);
        }
        for n in 0..self.cfg.replicas {
            let origins: Vec<ReplicaId> = self.nodes[n]
                .replica
                .applied()
                .iter()
                .map(|(o, _)| o)
                .collect();
            let left: usize = origins
                .iter()
                .map(|&o| {
                    self.read(n)
                        .log_after(o, 0, usize::MAX)
                        .map_or(0, |l| l.len())
                })
                .sum();
            if left > 0 {
                self.fail(format!(
                    "seed {seed}: n{n} still keeps {left} log entries every replica has"
                ));
            }
        }
        let bytes = postcard::to_stdvec(&states[0]).unwrap_or_default();
        self.report.digest = xxhash_rust::xxh3::xxh3_64(&bytes);
    }
}

/// Plants each [`Bug`] and runs seeds until the checker reports it; returns, per bug,
/// the first seed that caught it (`None`: the checker missed it in `seeds` seeds).
pub fn self_test(seeds: u64) -> Vec<(Bug, Option<u64>)> {
    Bug::ALL
        .iter()
        .map(|&bug| {
            let caught = (1..=seeds).find(|&seed| {
                let cfg = Config {
                    seed,
                    duration_ms: 10_000,
                    bug: Some(bug),
                    ..Config::default()
                };
                !run(&cfg).ok()
            });
            (bug, caught)
        })
        .collect()
}

/// Summary line of a report.
pub fn summary(r: &Report) -> String {
    let max = r.convergence_ms.iter().max().copied().unwrap_or(0);
    format!(
        "seed {:>6}: {} writes, {} deletes, {} reads ({} refused, {} unavailable), {} faults, {} transfers, {}/{} messages lost, convergence max {} ms{}",
        r.seed,
        r.writes,
        r.deletes,
        r.reads,
        r.refused,
        r.unavailable,
        r.faults.len(),
        r.transfers,
        r.dropped,
        r.messages,
        max,
        if r.ok() { "" } else { "  FAILED" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeded suite: `KVS_SIM_SEEDS` seeds (default 20) from `KVS_SIM_FIRST_SEED`
    /// (default 1). `kvs sim --seeds N` runs more, faster, in a release build.
    #[test]
    fn simulated_faults_lose_nothing_and_converge() {
        let env = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let first = env("KVS_SIM_FIRST_SEED", 1);
        let seeds = env("KVS_SIM_SEEDS", 20);
        let mut failures = Vec::new();
        for seed in first..first + seeds {
            let report = run(&Config {
                seed,
                ..Config::default()
            });
            assert!(report.writes > 0 && report.reads > 0 && !report.faults.is_empty());
            if !report.ok() {
                failures.push(format!(
                    "{}\n  {}",
                    summary(&report),
                    report.failures.join("\n  ")
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{}\nreplay with: kvs sim --seed <seed> --trace",
            failures.join("\n")
        );
    }

    #[test]
    fn the_checker_finds_planted_bugs() {
        for (bug, caught) in self_test(10) {
            assert!(caught.is_some(), "the checker missed {bug:?} in 10 seeds");
        }
    }

    #[test]
    fn a_seed_replays_exactly() {
        let cfg = Config {
            seed: 7,
            duration_ms: 10_000,
            trace: true,
            ..Config::default()
        };
        let a = run(&cfg);
        let b = run(&cfg);
        assert!(!a.trace.is_empty());
        assert_eq!(a, b);
        let other = run(&Config { seed: 8, ..cfg });
        assert_ne!(a.trace, other.trace, "different seeds, different runs");
    }
}
