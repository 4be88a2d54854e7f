//! Deleting handed-over slots in the simulation, as `node/reconfig/gc.rs` does: after
//! each install a node asks every replica of each slot's new partition whether it
//! holds the versions of every key it still has there (`Holds`), deletes the slots
//! they all confirm, and checks the others again later (doubling pauses, a bounded
//! number of times). A node removed from the cluster deletes without asking.
//!
//! The checker's property: a handed-over key is deleted only while every replica of
//! its new partition reflects its versions (a replica whose disk was wiped after the
//! node began asking is excused: the server could not know).

use std::collections::{BTreeMap, BTreeSet};

use crate::clock::Dot;
use crate::placement::{slot_of, Role};
use crate::replica::{KeyState, Replica};

use super::world::{addr, index, Event, Msg, Sim};
use super::Bug;

/// A `Holds` call's timeout, the first pause before unconfirmed slots are checked
/// again (doubling up to the last), and how many times, as the server's.
const HOLDS_TIMEOUT_MS: u64 = 10_000;
const FIRST_RETRY_MS: u64 = 500;
const MAX_RETRY_MS: u64 = 30_000;
const RETRIES: u32 = 30;

/// A node's deletion of handed-over slots: the attempt (each install starts a new
/// one), and the `Holds` calls in flight with what they asked.
#[derive(Clone, Debug, Default)]
pub(super) struct GcRound {
    pub(super) attempt: u32,
    retries: u32,
    /// Calls in flight: id → (replica asked, slots asked about).
    calls: BTreeMap<u64, (usize, BTreeSet<u32>)>,
    /// Slots a replica lacks keys of, or did not answer for.
    unconfirmed: BTreeSet<u32>,
    /// The step the round began.
    began: u64,
    deadline: u64,
}

impl GcRound {
    /// Gives up the attempt under way and starts a new one; returns its number.
    pub(super) fn restart(&mut self) -> u32 {
        let attempt = self.attempt + 1;
        *self = GcRound {
            attempt,
            ..GcRound::default()
        };
        attempt
    }
}

impl Sim {
    /// Keys node `n` keeps in slots it no longer owns, nor will own once the change it
    /// learned is installed.
    fn leftovers(&self, n: usize) -> Vec<(u32, String, KeyState)> {
        let node = &self.nodes[n];
        let me = addr(n);
        let kept = |slot: u32| {
            let owns = |v: &crate::placement::View| match v.role_of(&me) {
                Some(Role::Replica(uid)) => v.owner_of_slot(slot) == uid,
                _ => false,
            };
            node.view.as_ref().is_some_and(owns)
                || node.transition.as_ref().is_some_and(|t| owns(t.to()))
        };
        let all = self.read(n).scan(None, usize::MAX).unwrap_or_default();
        all.into_iter()
            .filter(|(slot, _, _)| !kept(*slot))
            .collect()
    }

    /// Attempt `attempt` of node `n`: starts a round of `Holds` calls, or ends one that
    /// timed out.
    pub(super) fn gc(&mut self, n: usize, attempt: u32) {
        let gc = &mut self.nodes[n].gc;
        if attempt != gc.attempt {
            return;
        }
        if !gc.calls.is_empty() {
            if self.now < gc.deadline {
                return;
            }
            // Replicas that did not answer confirm nothing.
            for (_, (_, slots)) in std::mem::take(&mut gc.calls) {
                gc.unconfirmed.extend(slots);
            }
            return self.gc_finish(n);
        }
        let leftovers = self.leftovers(n);
        if leftovers.is_empty() {
            return;
        }
        let began = self.step;
        self.nodes[n].gc.began = began;
        self.nodes[n].gc.unconfirmed.clear();
        let view = self.nodes[n].view.clone();
        let Some(view) = view.filter(|_| self.cfg.bug != Some(Bug::SkipHandoffCheck)) else {
            // Removed from the cluster: it can no longer ask, and the change that removed
            // it completed only once its keys were on their new replicas.
            return self.gc_finish(n);
        };
        let mut asks: BTreeMap<u32, Vec<(u32, String, Vec<Dot>)>> = BTreeMap::new();
        for (slot, key, state) in leftovers {
            let dots = state.versions.iter().map(|v| v.dot).collect();
            asks.entry(view.owner_of_slot(slot))
                .or_default()
                .push((slot, key, dots));
        }
        for (owner, keys) in asks {
            let slots: BTreeSet<u32> = keys.iter().map(|(s, _, _)| *s).collect();
            let replicas: Vec<usize> = view
                .replicas_of(owner)
                .unwrap_or_default()
                .iter()
                .filter_map(|a| index(a))
                .filter(|&r| r != n)
                .collect();
            if replicas.is_empty() {
                self.nodes[n].gc.unconfirmed.extend(slots.iter().copied());
            }
            for r in replicas {
                let id = self.new_id();
                self.nodes[n].gc.calls.insert(id, (r, slots.clone()));
                self.send(n, r, id, Msg::Holds(owner, keys.clone()));
            }
        }
        if self.nodes[n].gc.calls.is_empty() {
            return self.gc_finish(n);
        }
        self.nodes[n].gc.deadline = self.now + HOLDS_TIMEOUT_MS;
        self.at(HOLDS_TIMEOUT_MS, Event::Gc(n, attempt));
    }

    /// A replica of the new partition answers which of the asked keys it lacks.
    pub(super) fn serve_holds(
        &mut self,
        from: usize,
        to: usize,
        id: u64,
        partition: u32,
        keys: Vec<(u32, String, Vec<Dot>)>,
    ) {
        let owned = self.nodes[to].owned();
        if !self.serves(to, partition) || keys.iter().any(|(slot, _, _)| !owned.contains(*slot)) {
            return;
        }
        let lacking: Vec<(u32, String)> = {
            let txn = self.read(to);
            keys.into_iter()
                .filter(|(slot, key, dots)| {
                    let state = txn.get(*slot, key).ok().flatten().unwrap_or_default();
                    !Replica::covers(&state, dots)
                })
                .map(|(slot, key, _)| (slot, key))
                .collect()
        };
        self.send(to, from, id, Msg::Lacking(lacking));
    }

    pub(super) fn on_lacking(
        &mut self,
        n: usize,
        from: usize,
        id: u64,
        lacking: Vec<(u32, String)>,
    ) {
        let gc = &mut self.nodes[n].gc;
        if gc.calls.get(&id).map(|(r, _)| *r) != Some(from) {
            return;
        }
        gc.calls.remove(&id);
        gc.unconfirmed.extend(lacking.iter().map(|(slot, _)| *slot));
        if gc.calls.is_empty() {
            self.gc_finish(n);
        }
    }

    /// Deletes the handed-over slots that were confirmed; checks the others again later.
    fn gc_finish(&mut self, n: usize) {
        let unconfirmed = std::mem::take(&mut self.nodes[n].gc.unconfirmed);
        let began = self.nodes[n].gc.began;
        let doomed: Vec<(u32, String, KeyState)> = self
            .leftovers(n)
            .into_iter()
            .filter(|(slot, _, _)| !unconfirmed.contains(slot))
            .collect();
        for (slot, key, state) in &doomed {
            self.check_handoff_delete(n, *slot, key, state, began);
        }
        let deleted = self.commit_store(n, |_, txn| {
            for (slot, key, _) in &doomed {
                txn.delete(*slot, key)?;
            }
            Ok(doomed.len())
        });
        self.report.handoff_deleted += deleted.unwrap_or(0) as u64;
        if !doomed.is_empty() {
            self.trace(|| format!("n{n} deletes {} handed-over keys", doomed.len()));
        }
        if unconfirmed.is_empty() {
            return;
        }
        let gc = &mut self.nodes[n].gc;
        if gc.retries >= RETRIES {
            return;
        }
        let pause = (FIRST_RETRY_MS << gc.retries.min(16)).min(MAX_RETRY_MS);
        gc.retries += 1;
        let attempt = gc.attempt;
        self.trace(|| {
            format!(
                "n{n} keeps {} handed-over slots their new replicas did not confirm",
                unconfirmed.len()
            )
        });
        self.at(pause, Event::Gc(n, attempt));
    }

    /// The property: node `n` deletes a handed-over key only while every replica of its
    /// new partition reflects its versions (one wiped since the node began asking is
    /// excused).
    fn check_handoff_delete(
        &mut self,
        n: usize,
        slot: u32,
        key: &str,
        state: &KeyState,
        began: u64,
    ) {
        let Some(view) = self.nodes[n].view.clone() else {
            return;
        };
        let owner = view.owner_of_slot(slot);
        let mut problems = Vec::new();
        for r in view
            .replicas_of(owner)
            .unwrap_or_default()
            .iter()
            .filter_map(|a| index(a))
        {
            if r == n || self.wipes.iter().any(|&(w, step)| w == r && step > began) {
                continue;
            }
            let held = self
                .read(r)
                .get(slot_of(key), key)
                .ok()
                .flatten()
                .unwrap_or_default();
            for v in &state.versions {
                if !self.reflects(key, &held, v.dot) {
                    problems.push(format!(
                        "seed {}: handed-over key deleted while a new replica lacks it: n{n} \
                         deleted version {}:{} of {key}, which n{r} (partition uid {owner}) \
                         does not hold",
                        self.cfg.seed, v.dot.replica, v.dot.counter
                    ));
                }
            }
        }
        for p in problems {
            self.fail(p);
        }
    }
}
