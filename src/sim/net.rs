//! The simulated network and the faults.

use crate::clock::VersionVector;
use crate::replica::Replica;
use crate::storage::{MemoryStore, Store};

use super::world::{Event, Fault, Msg, PullState, Sim, Up};
use super::{CONVERGENCE_BOUND_MS, PARTITION, PROBE_MS, SYNC_TIMEOUT_MS, TRIM_INTERVAL_MS};

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
            Fault::Crash(a) | Fault::Outage(a) => self.crash(a),
            Fault::Wipe(a) => {
                self.crash(a);
                self.wipes.push((a, self.step));
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
    pub(super) fn only_copies_elsewhere(&self, n: usize) -> bool {
        let mut others = VersionVector::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if i != n {
                others.merge(node.replica.applied());
            }
        }
        others.dominates(self.nodes[n].replica.applied())
    }

    pub(super) fn crash(&mut self, a: usize) {
        let node = &mut self.nodes[a];
        node.up = Up::Down;
        // Everything not in the store is gone.
        node.pulls
            .values_mut()
            .for_each(|st| *st = PullState::default());
        node.peer_have.clear();
        node.digests.clear();
        node.collect_cursor = None;
        node.backlog.clear();
        self.fail_requests_at(a);
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

    pub(super) fn probe(&mut self) {
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

    /// Lays out the fault phases over the run: fault, heal window, fault, ...
    pub(super) fn schedule_faults(&mut self) {
        let mut t = self.rng.between(500, 2_000);
        let n = self.cfg.replicas as u64;
        while t < self.cfg.duration_ms {
            let a = self.rng.below(n) as usize;
            let fault = match self.rng.below(8) {
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
                6 => Fault::Outage(a),
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
