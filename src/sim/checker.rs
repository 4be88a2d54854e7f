//! The checker: what reads may return, and what must hold at the end.

use crate::clock::ReplicaId;
use crate::replica::KeyState;

use super::world::Sim;

impl Sim {
    pub(super) fn check_read(&mut self, c: usize, n: usize, key: &str, state: &KeyState) {
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

    pub(super) fn final_checks(&mut self) {
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
