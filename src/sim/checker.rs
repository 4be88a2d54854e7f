//! The checker: what reads may return, and what must hold at the end.

use crate::clock::{Dot, ReplicaId, VersionVector};
use crate::placement::slot_of;
use crate::replica::{KeyState, Replica};

use super::world::{addr, index, Op, Sim, WriteRecord};

impl Sim {
    pub(super) fn check_read(&mut self, c: usize, n: usize, key: &str, state: &KeyState) {
        let known = &self.sessions[c].known;
        let mut problems = Vec::new();
        for w in self.writes.iter().filter(|w| w.key == key) {
            if !known.contains(w.dot) || self.lost_with_removal(w) {
                continue;
            }
            if !self.reflects(key, state, w.dot) {
                problems.push(format!(
                    "stale read: session c{c} at n{n} read {key} without write {}:{} it knows",
                    w.dot.replica, w.dot.counter
                ));
            }
            for v in &state.versions {
                // A write such a removed node took may be lost, or handed to only some
                // of the new replicas by a change driven again after it answered: a
                // later write at one that lacked it does not supersede it.
                let excused = self
                    .by_dot
                    .get(&v.dot)
                    .is_some_and(|&i| self.lost_with_removal(&self.writes[i]));
                if v.dot != w.dot && w.context.contains(v.dot) && !excused {
                    problems.push(format!(
                        "resurrection: session c{c} at n{n} read version {}:{} of {key}, \
                         superseded by {}:{} which it knows",
                        v.dot.replica, v.dot.counter, w.dot.replica, w.dot.counter
                    ));
                }
            }
        }
        // A node removed from the cluster that has not heard of it yet serves its old
        // view (available under partition), but hands nothing back to the cluster.
        let member = self.decided.is_member(&addr(n));
        for v in state.versions.iter().filter(|_| member) {
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

    /// Whether the node that coordinated write `w` was removed from the cluster by a
    /// change that could not drain it, and took the write in its old view (while cut
    /// off it goes on serving that view): the write may go with it (`viewchange`'s
    /// documented caveat; see the open finding in the module doc for W > 1).
    pub(super) fn lost_with_removal(&self, w: &WriteRecord) -> bool {
        w.holders
            .first()
            .is_some_and(|&h| self.removed_undrained(h, w))
    }

    fn removed_undrained(&self, node: usize, w: &WriteRecord) -> bool {
        self.undrained
            .iter()
            .any(|&(n, epoch)| n == node && w.epoch < epoch)
    }

    /// Whether a read of `key` returning `state` reflects write `dot`: the state holds it
    /// or a version that supersedes it, or a tombstone that superseded it was collected
    /// (a replica collects only what every replica reflects, so the key's absence then
    /// means that tombstone or something newer).
    pub(super) fn reflects(&self, key: &str, state: &KeyState, dot: Dot) -> bool {
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
            .find(|t| t.dot != dot && !t.excused && t.history.contains(dot))
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
        // A key of a slot the node handed over is not served, and not handed back to
        // anyone, until the slot comes back to it (checked then, at the install); a node
        // removed from the cluster is nobody's peer any more (what it merges is checked).
        if merged.is_none()
            && (!self.nodes[n].owned().contains(slot_of(key)) || !self.decided.is_member(&addr(n)))
        {
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
        let mut problems = Vec::new();
        for w in self.writes.iter().filter(|w| w.key == op.key) {
            let Some(acked) = w.acked else {
                continue;
            };
            // Levels count replicas of a partition of one size (K mode keeps K; a
            // write handed over to another partition reached all its replicas).
            if acked >= op.began || w.k != op.k || w.level + op.level <= op.k {
                continue;
            }
            // A disk that held the write and was wiped since takes a copy out of every
            // quorum: R + W > K no longer promises anything for it.
            let lost_copy = self
                .wipes
                .iter()
                .any(|&(node, step)| step > w.written && w.holders.contains(&node))
                || self.lost_with_removal(w);
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
        if let Some(change) = &self.change {
            let what = change.describe();
            self.fail(format!(
                "seed {seed}: the view change to {what} never completed"
            ));
        }
        let view = self.decided.clone();
        for n in 0..self.nodes.len() {
            let epoch = self.nodes[n].view.as_ref().map(|v| v.epoch);
            if view.is_member(&addr(n)) && epoch != Some(view.epoch) {
                self.fail(format!(
                    "seed {seed}: n{n} is in view epoch {epoch:?} at the end, not {}",
                    view.epoch
                ));
            }
        }
        // Each replica's keys of the slots its partition owns (handed-over keys a node
        // could not yet confirm are left out: they are not served).
        let mut states: Vec<Vec<(u32, String, KeyState)>> = vec![Vec::new(); self.nodes.len()];
        for (n, state) in states.iter_mut().enumerate() {
            let owned = self.nodes[n].owned();
            let scanned = self.read(n).scan(None, usize::MAX);
            match scanned {
                Ok(s) => {
                    *state = s
                        .into_iter()
                        .filter(|(slot, _, _)| owned.contains(*slot))
                        .collect()
                }
                Err(e) => return self.fail(format!("n{n}: scan failed: {e}")),
            }
        }
        let mut partitions: Vec<Vec<usize>> = Vec::new();
        for p in &view.partitions {
            let replicas: Vec<usize> = p.replicas.iter().filter_map(|a| index(a)).collect();
            for &n in &replicas {
                if self.nodes[n].partition() != Some(p.uid) {
                    self.fail(format!(
                        "seed {seed}: n{n} has no replica of partition uid {} at the end",
                        p.uid
                    ));
                }
            }
            let first = replicas[0];
            for &n in &replicas[1..] {
                if states[n] != states[first] {
                    let what = first_difference(&states[n], &states[first]);
                    self.fail(format!(
                        "seed {seed}: n{n}'s keys differ from n{first}'s ({what})"
                    ));
                }
                let applied =
                    |m: usize| self.nodes[m].replica.as_ref().map(|r| r.applied().clone());
                if applied(n) != applied(first) {
                    self.fail(format!(
                        "seed {seed}: n{n}'s applied vector differs from n{first}'s"
                    ));
                }
            }
            partitions.push(replicas);
        }
        let mut lost = Vec::new();
        for w in self
            .writes
            .iter()
            .filter(|w| w.acked.is_some() && !self.lost_with_removal(w))
        {
            let owner = view.partition_of_key(&w.key);
            let Some(first) = view
                .replicas_of(owner)
                .and_then(|r| r.first())
                .and_then(|a| index(a))
            else {
                continue;
            };
            let state = states[first]
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
        for n in 0..self.nodes.len() {
            let Some(replica) = &self.nodes[n].replica else {
                continue;
            };
            let origins: Vec<ReplicaId> = replica.applied().iter().map(|(o, _)| o).collect();
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
        for replicas in &partitions {
            self.final_tombstone_checks(replicas, &states);
        }
        let all: Vec<&(u32, String, KeyState)> =
            partitions.iter().flat_map(|r| &states[r[0]]).collect();
        let bytes = postcard::to_stdvec(&all).unwrap_or_default();
        self.report.digest = xxhash_rust::xxh3::xxh3_64(&bytes);
    }

    /// At the end, no replica holds a version a collected tombstone superseded, and none
    /// keeps a tombstone it could collect: every replica has it (the floor is the
    /// applied vectors, all equal now) and the horizon has passed.
    fn final_tombstone_checks(
        &mut self,
        replicas: &[usize],
        states: &[Vec<(u32, String, KeyState)>],
    ) {
        let seed = self.cfg.seed;
        let mut floor: Option<VersionVector> = None;
        for r in replicas
            .iter()
            .filter_map(|&n| self.nodes[n].replica.as_ref())
        {
            let applied = r.applied();
            floor = Some(match floor {
                None => applied.clone(),
                Some(f) => Replica::trim_floor(&f, [applied]),
            });
        }
        let floor = floor.unwrap_or_default();
        let cutoff_us = self.now.saturating_sub(self.horizon_ms) * 1000;
        let mut problems = Vec::new();
        for &n in replicas {
            for (_, key, state) in &states[n] {
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
                if Replica::collectable(state, &floor, cutoff_us) {
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

/// A state's versions as their dots, `r:n r:n`, for traces and reports.
pub(super) fn dots(state: &KeyState) -> String {
    let d: Vec<String> = state
        .versions
        .iter()
        .map(|v| format!("{}:{}", v.dot.replica, v.dot.counter))
        .collect();
    d.join(" ")
}

/// The first key two replicas' states differ on, with the dots each holds.
fn first_difference(a: &[(u32, String, KeyState)], b: &[(u32, String, KeyState)]) -> String {
    let dots = |s: Option<&KeyState>| -> String {
        s.map_or("absent".into(), |s| format!("[{}]", dots(s)))
    };
    fn find<'a>(x: &'a [(u32, String, KeyState)], key: &str) -> Option<&'a KeyState> {
        x.iter().find(|(_, k, _)| k == key).map(|(_, _, s)| s)
    }
    let keys: std::collections::BTreeSet<&String> = a.iter().chain(b).map(|(_, k, _)| k).collect();
    keys.into_iter()
        .find(|k| find(a, k) != find(b, k))
        .map_or("same keys".into(), |k| {
            format!("{k}: {} vs {}", dots(find(a, k)), dots(find(b, k)))
        })
}
