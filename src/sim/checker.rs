//! The checker: what reads may return, and what must hold at the end.

use crate::clock::{Dot, ReplicaId, VersionVector};
use crate::placement::slot_of;
use crate::replica::{KeyState, Replica};

use super::world::{Op, Sim};

impl Sim {
    pub(super) fn check_read(&mut self, c: usize, n: usize, key: &str, state: &KeyState) {
        let known = &self.sessions[c].known;
        let mut problems = Vec::new();
        for w in self.writes.iter().filter(|w| w.key == key) {
            if !known.contains(w.dot) {
                continue;
            }
            if !self.reflects(key, state, w.dot) {
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
        for v in &state.versions {
            if let Some(t) = self.collected_superseding(key, v.dot) {
                problems.push(format!(
                    "resurrection after collection: session c{c} at n{n} read version {}:{} of \
                     {key}, superseded by {t}",
                    v.dot.replica, v.dot.counter
                ));
            }
        }
        for p in problems {
            self.fail(format!("seed {}: {p}", self.cfg.seed));
        }
    }

    /// Whether a read of `key` returning `state` reflects write `dot`: the state holds it
    /// or a version that supersedes it, or a tombstone that superseded it was collected
    /// (a replica collects only what every replica reflects, so the key's absence then
    /// means that tombstone or something newer).
    fn reflects(&self, key: &str, state: &KeyState, dot: Dot) -> bool {
        state.covers(dot)
            || self
                .collected
                .get(key)
                .is_some_and(|c| c.iter().any(|t| t.history.contains(dot)))
    }

    /// A collected tombstone of `key` that superseded version `dot`, named for a message.
    fn collected_superseding(&self, key: &str, dot: Dot) -> Option<String> {
        self.collected
            .get(key)?
            .iter()
            .find(|t| t.dot != dot && t.history.contains(dot))
            .map(|t| {
                format!(
                    "tombstone {}:{} which n{} collected at {} ms",
                    t.dot.replica, t.dot.counter, t.node, t.at_ms
                )
            })
    }

    /// No replica stores a version of `key` that a collected tombstone superseded: it
    /// could hand the value back. Checked on every node when a tombstone of the key is
    /// collected, and on node `n` whenever it merges a page (`merged`: from which peer,
    /// and what page) holding the key. Each stored version is reported once.
    pub(super) fn check_stored(&mut self, n: usize, key: &str, merged: Option<(usize, &str)>) {
        if !self.collected.contains_key(key) {
            return;
        }
        let state = self.read(n).get(slot_of(key), key).ok().flatten();
        let mut problems = Vec::new();
        for v in state.iter().flat_map(|s| &s.versions) {
            let Some(t) = self.collected_superseding(key, v.dot) else {
                continue;
            };
            if !self.flagged.insert((n, v.dot)) {
                continue;
            }
            let (dot, seed) = (v.dot, self.cfg.seed);
            problems.push(if let Some((from, page)) = merged {
                format!(
                    "seed {seed}: resurrection after collection: n{n} merged version {}:{} of \
                     {key} back from n{from}'s {page}, superseded by {t}",
                    dot.replica, dot.counter
                )
            } else {
                format!(
                    "seed {seed}: collected while a replica lacks the delete: n{n} holds \
                     version {}:{} of {key}, superseded by {t}",
                    dot.replica, dot.counter
                )
            });
        }
        for p in problems {
            self.fail(p);
        }
    }

    /// Quorum visibility (see the module doc): a read at level R that began after a
    /// write of the same key at level W was acknowledged, with R + W > K, reflects it.
    pub(super) fn check_quorum_read(&mut self, c: usize, op: &Op, state: &KeyState) {
        let k = self.cfg.replicas;
        let mut problems = Vec::new();
        for w in self.writes.iter().filter(|w| w.key == op.key) {
            let Some(acked) = w.acked else {
                continue;
            };
            if acked >= op.began || w.level + op.level <= k {
                continue;
            }
            // A disk that held the write and was wiped since takes a copy out of every
            // quorum: R + W > K no longer promises anything for it.
            let lost_copy = self
                .wipes
                .iter()
                .any(|&(node, step)| step > w.written && w.holders.contains(&node));
            if lost_copy || self.reflects(&op.key, state, w.dot) {
                continue;
            }
            problems.push(format!(
                "quorum read missed a write: session c{c} at n{} read {} at r={} without \
                 {}:{}, acknowledged at w={} before the read began",
                op.node, op.key, op.level, w.dot.replica, w.dot.counter, w.level
            ));
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
        for w in self.writes.iter().filter(|w| w.acked.is_some()) {
            let state = states[0]
                .iter()
                .find(|(_, k, _)| *k == w.key)
                .map(|(_, _, s)| s.clone())
                .unwrap_or_default();
            if !self.reflects(&w.key, &state, w.dot) {
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
        self.final_tombstone_checks(&states);
        let bytes = postcard::to_stdvec(&states[0]).unwrap_or_default();
        self.report.digest = xxhash_rust::xxh3::xxh3_64(&bytes);
    }

    /// At the end, no replica holds a version a collected tombstone superseded, and none
    /// keeps a tombstone it could collect: every replica has it (the floor is the
    /// applied vectors, all equal now) and the horizon has passed.
    fn final_tombstone_checks(&mut self, states: &[Vec<(u32, String, KeyState)>]) {
        let seed = self.cfg.seed;
        let mut floor: Option<VersionVector> = None;
        for node in &self.nodes {
            let applied = node.replica.applied();
            floor = Some(match floor {
                None => applied.clone(),
                Some(f) => Replica::trim_floor(&f, [applied]),
            });
        }
        let floor = floor.unwrap_or_default();
        let cutoff_ms = self.now.saturating_sub(self.horizon_ms);
        let mut problems = Vec::new();
        for (n, keys) in states.iter().enumerate() {
            for (_, key, state) in keys {
                for v in &state.versions {
                    if self.flagged.contains(&(n, v.dot)) {
                        continue;
                    }
                    if let Some(t) = self.collected_superseding(key, v.dot) {
                        problems.push(format!(
                            "resurrection after collection: n{n} holds version {}:{} of {key} \
                             at the end, superseded by {t}",
                            v.dot.replica, v.dot.counter
                        ));
                    }
                }
                if Replica::collectable(state, &floor, cutoff_ms) {
                    problems.push(format!(
                        "n{n} still keeps the tombstone of {key}, which every replica has"
                    ));
                }
            }
        }
        for p in problems {
            self.fail(format!("seed {seed}: {p}"));
        }
    }
}
