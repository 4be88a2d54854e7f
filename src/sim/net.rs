//! The simulated network and the faults.

use std::collections::BTreeMap;

use crate::clock::VersionVector;
use crate::replica::Replica;
use crate::storage::{MemoryStore, Store};

use super::world::{Event, Fault, Msg, Sim, Up};
use super::{CONVERGENCE_BOUND_MS, PROBE_MS, SYNC_TIMEOUT_MS, TRIM_INTERVAL_MS};

impl Sim {
    // ---- the network ----

    /// Sends over a connection, modelled on TCP: a cut link holds what is sent (the
    /// sender retransmits) until the heal, when what is younger than a call's timeout
    /// arrives after a retransmission delay and the rest is gone with its timed-out
    /// connection; a lossy link delays by a retransmission, and sometimes resets.
    pub(super) fn send(&mut self, from: usize, to: usize, id: u64, msg: Msg) {
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

    // ---- faults ----

    pub(super) fn start_fault(&mut self, fault: Fault) {
        let fault = self.retarget(fault);
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
        let n = self.nodes.len();
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
            Fault::Crash(a) | Fault::Outage(a) => self.crash(a),
            Fault::Wipe(a) => {
                // A blank node: it knows nothing of its cluster until a member's gossip
                // tells it the view (the server's VIEW and view catch-up); then it is a
                // fresh replica, rebuilt from its peers.
                self.crash(a);
                self.wipes.push((a, self.step));
                let node = &mut self.nodes[a];
                node.store = MemoryStore::new();
                node.view = None;
                node.transition = None;
                node.removed = None;
                node.replica = None;
            }
            Fault::Pause(a) => self.nodes[a].up = Up::Paused,
            Fault::Lossy => {
                self.loss_per_mille = self.rng.between(100, 400);
                self.max_latency = self.rng.between(200, 1_500);
            }
        }
    }

    /// The fault's nodes, drawn again among the nodes there are now (view changes add
    /// nodes after the faults were laid out).
    fn retarget(&mut self, fault: Fault) -> Fault {
        let n = self.nodes.len() as u64;
        let mut a = self.rng.below(n) as usize;
        // While a change runs, half the faults hit the nodes taking part in it, wipes the
        // nodes receiving data most (a nemesis aims at the moving parts).
        if let Some(p) = self.change.as_ref().map(|c| c.proposal.clone()) {
            if self.rng.chance(500) {
                let mut targets: Vec<usize> = p
                    .participants()
                    .iter()
                    .filter(|m| {
                        !matches!(fault, Fault::Wipe(_))
                            || !crate::viewchange::duties(&p, m).pulls.is_empty()
                    })
                    .filter_map(|m| super::world::index(m))
                    .collect();
                if targets.is_empty() {
                    targets = p
                        .participants()
                        .iter()
                        .filter_map(|m| super::world::index(m))
                        .collect();
                }
                a = targets[self.rng.below(targets.len() as u64) as usize];
            }
        }
        match fault {
            Fault::Isolate(_) => Fault::Isolate(a),
            Fault::Split(_) => Fault::Split(
                (0..n as usize)
                    .filter(|&i| i == a || self.rng.chance(400))
                    .collect(),
            ),
            Fault::OneWay(..) => {
                Fault::OneWay(a, (a + 1 + self.rng.below(n - 1) as usize) % n as usize)
            }
            Fault::Crash(_) => Fault::Crash(a),
            Fault::Outage(_) => Fault::Outage(a),
            Fault::Wipe(_) => Fault::Wipe(a),
            Fault::Pause(_) => Fault::Pause(a),
            Fault::Lossy => Fault::Lossy,
        }
    }

    /// Whether every write node `n`'s replica reflects is reflected by another replica
    /// of its partition too (keys a node holds for a view change in progress, or
    /// handed over and not deleted yet, have other copies: the source's, the new
    /// owners').
    pub(super) fn only_copies_elsewhere(&self, n: usize) -> bool {
        let Some(r) = &self.nodes[n].replica else {
            return true;
        };
        let mut others = VersionVector::new();
        for (i, node) in self.nodes.iter().enumerate() {
            match &node.replica {
                Some(o) if i != n && o.partition() == r.partition() => others.merge(&o.served()),
                _ => {}
            }
        }
        others.dominates(&r.served())
    }

    pub(super) fn crash(&mut self, a: usize) {
        let node = &mut self.nodes[a];
        node.up = Up::Down;
        // Everything not in the store is gone.
        node.reset_workers();
        node.backlog.clear();
        node.gc = Default::default();
        self.fail_requests_at(a);
        self.coordinator_lost(a);
    }

    pub(super) fn heal(&mut self) {
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
        for a in 0..self.nodes.len() {
            match self.nodes[a].up {
                Up::Running => {}
                Up::Down => {
                    let node = &mut self.nodes[a];
                    if node.replica.is_some() {
                        let loaded = node.store.read().and_then(|txn| Replica::load(&*txn));
                        match loaded {
                            Ok(Some(r)) => node.replica = Some(r),
                            Ok(None) => self.fail(format!("n{a} lost its persisted replica")),
                            Err(e) => self.fail(format!("n{a} cannot load its replica: {e}")),
                        }
                    }
                    self.nodes[a].up = Up::Running;
                    // The server's first pull round runs at once after a start, and it
                    // goes on deleting handed-over slots.
                    for p in self.peers_of(a) {
                        self.pull(a, p);
                    }
                    self.at(0, Event::Gc(a, 0));
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
        // Convergence: every write made before the heal reaches every replica of its
        // partition.
        let mut target: BTreeMap<_, VersionVector> = BTreeMap::new();
        for r in self.nodes.iter().filter_map(|n| n.replica.as_ref()) {
            target.entry(r.partition()).or_default().merge(r.applied());
        }
        self.pending = Some((self.now, target));
        self.at(0, Event::Probe);
    }

    pub(super) fn probe(&mut self) {
        let Some((since, target)) = &self.pending else {
            return;
        };
        let reached = |r: &Replica| {
            target
                .get(&r.partition())
                .is_none_or(|t| r.applied().dominates(t))
        };
        if self
            .nodes
            .iter()
            .filter_map(|n| n.replica.as_ref())
            .all(reached)
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

    /// Lays out the fault phases over the run: fault, heal window, fault, ...
    pub(super) fn schedule_faults(&mut self) {
        let mut t = self.rng.between(500, 2_000);
        while t < self.cfg.duration_ms {
            // The kind only: which nodes is drawn when it starts (`retarget`).
            let fault = match self.rng.below(8) {
                0 => Fault::Isolate(0),
                1 => Fault::Split(Vec::new()),
                2 => Fault::OneWay(0, 0),
                3 => Fault::Crash(0),
                4 => Fault::Wipe(0),
                5 => Fault::Pause(0),
                6 => Fault::Outage(0),
                _ => Fault::Lossy,
            };
            // An outage outlasts a trim round, so the others could collect tombstones
            // the node has not seen (they must not).
            let lasts = if matches!(fault, Fault::Outage(_)) {
                self.rng.between(TRIM_INTERVAL_MS, 12_000)
            } else {
                self.rng.between(300, 4_000)
            };
            self.queue.insert((t, 0), Event::Fault(fault));
            t += lasts;
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
}
