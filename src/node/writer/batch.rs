//! One batch of writer commands: each applied to the durable state in one write
//! transaction (refused alone when it may not be applied now), then one commit for all.

use std::sync::Arc;

use super::{Durable, Installed, Outcome, WriterCmd};
use crate::clock::{PartitionUid, ReplicaId, VersionVector};
use crate::error::{Error, Result};
use crate::placement::{Role, SlotSet, View};
use crate::replica::{KeyState, Replica, WriteRequest};
use crate::storage::{Store, WriteTxn};
use crate::viewchange::{leftover_slots, Acceptor, PullKey, PullProgress, Transition};

/// Keys deleted per call when dropping a pull's leftover slots (the loop ends when a
/// slot is empty).
const LEFTOVER_BATCH: usize = 4_096;

/// What changed in a batch and must be persisted before the commit.
#[derive(Default)]
struct Dirty {
    any: bool,
    replica: bool,
    rest: bool,
}

/// Applies a batch in one transaction and commits it (if anything changed).
pub(super) fn run_batch(
    store: &dyn Store,
    d: &mut Durable,
    trimmed: &mut VersionVector,
    batch: &[WriterCmd],
) -> Result<Vec<Outcome>> {
    let mut txn = store.write()?;
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut dirty = Dirty::default();
    let mut new_trims = Vec::new();
    for cmd in batch {
        let outcome = match cmd {
            WriterCmd::Write { req, partition, .. } => {
                let allowed = match writable(d, *partition, req) {
                    Ok(()) => Replica::precondition(&*txn, req)?,
                    Err(e) => Err(e),
                };
                match allowed {
                    Ok(()) => {
                        dirty.any = true;
                        dirty.replica = true;
                        let r = d.replica.as_mut().expect("writable checked the replica");
                        Outcome::Write(r.write(&mut *txn, req.clone())?)
                    }
                    Err(e) => Outcome::Failed(e),
                }
            }
            WriterCmd::Sync { page, replica, .. } => match incarnation(d, *replica) {
                Ok(r) => {
                    dirty.any = true;
                    dirty.replica = true;
                    r.apply_sync(&mut *txn, page)?;
                    Outcome::Done
                }
                Err(e) => Outcome::Failed(e),
            },
            WriterCmd::Claim { claim, replica, .. } => match incarnation(d, *replica) {
                Ok(r) => {
                    dirty.any = true;
                    dirty.replica = true;
                    r.claim(claim);
                    Outcome::Done
                }
                Err(e) => Outcome::Failed(e),
            },
            WriterCmd::Trim { floor, replica } => {
                if incarnation(d, *replica).is_ok() {
                    for (origin, upto) in floor.iter() {
                        if upto > trimmed.get(origin) {
                            txn.log_trim(origin, upto)?;
                            new_trims.push((origin, upto));
                            dirty.any = true;
                        }
                    }
                }
                Outcome::Done
            }
            WriterCmd::Collect {
                candidates,
                floor,
                cutoff_us,
                replica,
                ..
            } => match incarnation(d, *replica) {
                Ok(_) => {
                    let mut dropped = 0;
                    // Re-checked here: a write may have revived the key since the
                    // candidates were picked from a snapshot.
                    for (slot, key) in candidates {
                        let state = txn.get(*slot, key)?;
                        if state.is_some_and(|s| Replica::collectable(&s, floor, *cutoff_us)) {
                            txn.delete(*slot, key)?;
                            dropped += 1;
                        }
                    }
                    dirty.any |= dropped > 0;
                    Outcome::Deleted(dropped)
                }
                Err(e) => Outcome::Failed(e),
            },
            WriterCmd::Learn { transition, .. } => match learn(d, transition) {
                Ok(changed) => {
                    if changed {
                        dirty.any = true;
                        dirty.rest = true;
                    }
                    Outcome::Learned(d.replica.as_ref().map(|r| r.served()), d.layout())
                }
                Err(e) => Outcome::Failed(e),
            },
            WriterCmd::Pulled {
                epoch,
                key,
                states,
                progress,
                ..
            } => match pulled(d, &mut *txn, *epoch, *key, states, progress)? {
                Ok(p) => {
                    dirty.any = true;
                    dirty.rest = true;
                    Outcome::Pulled(p)
                }
                Err(e) => Outcome::Failed(e),
            },
            WriterCmd::Install { view, .. } => match install(d, &mut *txn, view)? {
                Ok(Installed::Unchanged) => Outcome::Installed(Installed::Unchanged, d.layout()),
                Ok(Installed::Switched) => {
                    dirty.any = true;
                    dirty.replica = true;
                    dirty.rest = true;
                    Outcome::Installed(Installed::Switched, d.layout())
                }
                Err(e) => Outcome::Failed(e),
            },
            WriterCmd::Acceptor { acceptor, .. } => {
                if Some(acceptor.epoch) == d.view.as_ref().map(|v| v.epoch + 1) {
                    d.acceptor = Arc::new(acceptor.clone());
                    dirty.any = true;
                    dirty.rest = true;
                    Outcome::Done
                } else {
                    Outcome::Failed(Error::unavailable(
                        "the view changed while a Paxos answer was being recorded",
                    ))
                }
            }
            WriterCmd::SetKey { key, .. } => match &d.cluster_key {
                Some(held) if held == key => Outcome::Keyed(d.layout()),
                Some(_) if !d.outside() => Outcome::Failed(Error::conflict(
                    "this node already holds another cluster key",
                )),
                _ => {
                    d.cluster_key = Some(key.clone());
                    dirty.any = true;
                    dirty.rest = true;
                    Outcome::Keyed(d.layout())
                }
            },
            WriterCmd::Gc { slot, limit, .. } => {
                if d.keeps(*slot) {
                    Outcome::Deleted(0)
                } else {
                    let n = txn.delete_slot(*slot, *limit)?;
                    dirty.any |= n > 0;
                    Outcome::Deleted(n)
                }
            }
            WriterCmd::Stop => Outcome::Done,
        };
        outcomes.push(outcome);
    }
    if dirty.any {
        if dirty.rest {
            d.persist_all(&mut *txn)?;
        } else if dirty.replica {
            if let Some(r) = &d.replica {
                r.persist(&mut *txn)?;
            }
        }
        txn.commit()?;
    }
    for (origin, upto) in new_trims {
        trimmed.raise(origin, upto);
    }
    Ok(outcomes)
}

/// Whether a client write `req`, routed to this node's replica of `partition`, may be
/// accepted now.
fn writable(d: &Durable, partition: PartitionUid, req: &WriteRequest) -> Result<()> {
    let slot = req.slot;
    match &d.replica {
        Some(r) if r.partition() == partition => {
            // Checked by the caller before it queued the write; checked again here, where
            // the replica's state is current (see `Replica::accepts_write`).
            if !r.accepts_write(&req.token) {
                return Err(Error::unavailable(
                    "this replica has not received writes the causal context depends on; \
                     the write was not applied",
                ));
            }
        }
        _ => {
            return Err(Error::unavailable(format!(
                "{} is no longer a replica of partition uid {partition}",
                d.addr
            )))
        }
    }
    if d.leaving {
        return Err(Error::unavailable(
            "this replica is leaving its partition (view change in progress); its peers take the write",
        ));
    }
    if d.frozen.contains(slot) {
        return Err(Error::unavailable(format!(
            "slot {slot} is moving to another partition (view change in progress); retry shortly"
        )));
    }
    Ok(())
}

fn incarnation(d: &mut Durable, id: ReplicaId) -> Result<&mut Replica> {
    match &mut d.replica {
        Some(r) if r.id() == id => Ok(r),
        _ => Err(Error::unavailable(
            "the replica was replaced by a view change",
        )),
    }
}

/// Records a chosen proposal. Returns whether anything changed.
pub(super) fn learn(d: &mut Durable, t: &Transition) -> Result<bool> {
    let epoch = d.view.as_ref().map_or(0, |v| v.epoch);
    if let Some(cur) = &d.transition {
        if cur.proposal == t.proposal {
            return Ok(false);
        }
        return Err(Error::conflict(format!(
            "this node is already moving to another view of epoch {}",
            cur.proposal.epoch()
        )));
    }
    let fits = match d.view.as_deref() {
        Some(v) => *v == t.proposal.from,
        // A node outside any cluster only learns a change that makes it a member, and
        // one removed only a change newer than its removal.
        None => t.proposal.to.is_member(&d.addr) && !removed_since(d, &t.proposal.to),
    };
    if !fits || (d.view.is_some() && t.proposal.epoch() != epoch + 1) {
        return Err(Error::unavailable(format!(
            "proposal for epoch {} does not follow this node's view (epoch {epoch})",
            t.proposal.epoch()
        )));
    }
    if d.outside() {
        // A key held from an earlier cluster is not this one's: the node fetches the
        // key of the cluster it is joining from its members (`node::keys`).
        d.cluster_key = None;
    }
    d.transition = Some(Arc::new(t.clone()));
    d.derive();
    Ok(true)
}

/// Merges one pulled page and records the pull's progress.
fn pulled(
    d: &mut Durable,
    txn: &mut dyn WriteTxn,
    epoch: u64,
    key: PullKey,
    states: &[(u32, String, KeyState)],
    progress: &PullProgress,
) -> Result<Result<PullProgress>> {
    let Some(t) = d
        .transition
        .as_mut()
        .filter(|t| t.proposal.epoch() == epoch)
    else {
        return Ok(Err(Error::unavailable(format!(
            "no transition to epoch {epoch} here"
        ))));
    };
    let t = Arc::make_mut(t);
    if !t.pulls.contains_key(&key) {
        // The first page: drop what this node kept of these slots from an earlier
        // time it owned them (see `leftover_slots`).
        let owned = match (&d.replica, d.view.as_deref()) {
            (Some(r), Some(v)) => v.slots_of(r.partition()),
            _ => SlotSet::default(),
        };
        for slot in leftover_slots(&t.proposal, &d.addr, key, &owned).iter() {
            while txn.delete_slot(slot, LEFTOVER_BATCH)? == LEFTOVER_BATCH {}
        }
    }
    let current = t.pulls.entry(key).or_default();
    if current.done {
        return Ok(Ok(current.clone()));
    }
    Replica::merge_states(txn, states)?;
    *current = progress.clone();
    Ok(Ok(current.clone()))
}

/// Whether this node was removed from `view`'s cluster at `view`'s epoch or later: a
/// peer that missed the removal may still offer the older view, which would make this
/// node a replica again with what it kept from then (found by `kvs sim --seed 577`).
fn removed_since(d: &Durable, view: &View) -> bool {
    d.removed
        .is_some_and(|(cluster, epoch)| cluster == view.cluster && view.epoch <= epoch)
}

/// Switches to `view`. See `viewchange` for the claims this makes.
pub(super) fn install(
    d: &mut Durable,
    txn: &mut dyn WriteTxn,
    view: &View,
) -> Result<Result<Installed>> {
    if let Err(e) = view.check() {
        return Ok(Err(Error::bad_request(format!(
            "refusing an invalid view: {e}"
        ))));
    }
    if let Some(cur) = &d.view {
        if view.epoch <= cur.epoch {
            return Ok(Ok(Installed::Unchanged));
        }
        if view.cluster != cur.cluster {
            return Ok(Err(Error::conflict("refusing a view of another cluster")));
        }
    } else if !view.is_member(&d.addr) || removed_since(d, view) {
        return Ok(Ok(Installed::Unchanged));
    }
    if d.outside() {
        // Joining without having learned the change: as in `learn`, a key held from an
        // earlier cluster is not this one's.
        d.cluster_key = None;
    }
    // The transition's claims hold only if it leads to exactly this view; after a jump
    // over a missed change the replica claims nothing and copies from a peer instead.
    // A node that learned a change before it had the change's base view (it was blank,
    // or behind) keeps the change when it installs that view: it is part of it, and its
    // duties (frozen slots) hold from now on (found by `kvs sim --seed 191`: a wiped
    // node that dropped the change took writes to frozen slots, lost at the switch).
    let keep = d.transition.as_deref().is_some_and(|t| t.from() == view);
    let transition = if keep { None } else { d.transition.take() };
    let matching = transition.as_deref().filter(|t| t.to() == view);
    let absorbed = matching.map(Transition::absorbed_claim).unwrap_or_default();
    match view.role_of(&d.addr) {
        Some(Role::Replica(uid)) => match &mut d.replica {
            Some(r) if r.partition() == uid => r.absorb_claim(&absorbed),
            _ => {
                if d.replica.is_some() {
                    txn.log_clear()?;
                }
                let id = rand::random();
                let mut r = match matching.and_then(|t| t.copy_claim(uid)) {
                    Some(claim) => Replica::from_claim(id, uid, claim),
                    None => Replica::fresh(id, uid),
                };
                r.absorb_claim(&absorbed);
                d.replica = Some(r);
            }
        },
        _ => {
            if d.replica.take().is_some() {
                txn.log_clear()?;
            }
        }
    }
    if view.is_member(&d.addr) {
        d.view = Some(Arc::new(view.clone()));
        d.removed = None;
    } else {
        d.view = None;
        d.removed = Some((view.cluster, view.epoch));
    }
    d.acceptor = Arc::new(Acceptor::new(view.epoch + 1));
    d.derive();
    Ok(Ok(Installed::Switched))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::writer::testing::{addr, install_in, view};
    use crate::placement::Change;
    use crate::replica::Claim;
    use crate::storage::MemoryStore;
    use crate::viewchange::{duties, Proposal};

    #[test]
    fn install_claims_completed_handoffs_and_starts_fresh_incarnations() {
        // N=5, K=2; adding node 6 forms partition uid 2 from proxy 5 and node 6.
        let v = view(5, 2);
        let p = Proposal::new(Change::Add(addr(6)), &v).expect("valid");
        let claim: VersionVector = [(9, 4)].into_iter().collect();
        let store = MemoryStore::new();
        let mut d = Durable::load(&store, &addr(5), Some(v.clone())).expect("loads");
        assert!(d.replica.is_none(), "a proxy has no replica");
        let mut t = Transition::new(p.clone());
        for (key, _) in duties(&p, &addr(5)).pulls {
            t.pulls.insert(
                key,
                PullProgress {
                    done: true,
                    claim: Some(Claim {
                        applied: VersionVector::new(),
                        absorbed: claim.clone(),
                    }),
                    ..PullProgress::default()
                },
            );
        }
        d.transition = Some(Arc::new(t));
        install_in(&store, &mut d, &p.to);
        let r = d.replica.as_ref().expect("promoted");
        assert_eq!(r.partition(), 2);
        assert_eq!(r.absorbed(), &claim);
        assert!(r.applied().is_empty());
        assert!(d.transition.is_none());

        // A source keeps its incarnation and claims nothing.
        let mut s = Durable::load(&MemoryStore::new(), &addr(1), Some(v.clone())).expect("loads");
        let before = s.replica.clone();
        s.transition = Some(Arc::new(Transition::new(p.clone())));
        install_in(&store, &mut s, &p.to);
        assert_eq!(s.replica, before);

        // Installing a view the transition does not lead to claims nothing either.
        let mut j = Durable::load(&MemoryStore::new(), &addr(5), Some(v.clone())).expect("loads");
        j.transition = d.transition.clone();
        let later = p.to.apply(&Change::Add(addr(7))).expect("valid");
        install_in(&store, &mut j, &later);
        assert!(j.replica.as_ref().is_some_and(|r| r.absorbed().is_empty()));
    }

    fn state(replica: u64, counter: u64) -> KeyState {
        let dot = crate::clock::Dot { replica, counter };
        KeyState {
            versions: vec![crate::keystate::Version {
                dot,
                vv: [(replica, counter)].into_iter().collect(),
                deps: Default::default(),
                timestamp_us: 1,
                value: Some(b"v".to_vec()),
            }],
        }
    }

    /// Found by `kvs sim --seed 186`: a node kept a handed-over key its new owners could
    /// not confirm (they had collected the tombstone that superseded it); when the slot
    /// came back to the node, the pull merged into the stale key and the deleted value
    /// was served again. The first page of a pull now drops such leftovers.
    #[test]
    fn a_pull_drops_what_the_node_kept_of_the_slots_from_before() {
        // N=5, K=2: removing node 3 promotes proxy 5 into partition uid 1, which it
        // copies whole.
        let v = view(5, 2);
        let p = Proposal::new(Change::Remove(addr(3)), &v).expect("valid");
        let store = MemoryStore::new();
        let mut d = Durable::load(&store, &addr(5), Some(v.clone())).expect("loads");
        let slot = v.slots_of(1).iter().next().expect("uid 1 owns slots");
        let mut txn = store.write().expect("txn");
        txn.put(slot, "left", &state(7, 1)).expect("put");
        learn(&mut d, &Transition::new(p.clone())).expect("learns");
        let key = PullKey::Copy { uid: 1 };
        let page = vec![(slot, "pulled".to_string(), state(8, 1))];
        let progress = PullProgress {
            keys: 1,
            ..PullProgress::default()
        };
        pulled(&mut d, &mut *txn, p.epoch(), key, &page, &progress)
            .expect("storage")
            .expect("pulled");
        assert_eq!(
            txn.get(slot, "left").expect("get"),
            None,
            "the leftover is dropped"
        );
        assert!(txn.get(slot, "pulled").expect("get").is_some());
        // Later pages drop nothing.
        txn.put(slot, "later", &state(8, 2)).expect("put");
        pulled(&mut d, &mut *txn, p.epoch(), key, &page, &progress)
            .expect("storage")
            .expect("pulled");
        assert!(txn.get(slot, "later").expect("get").is_some());
    }

    #[test]
    fn a_removed_node_refuses_the_views_it_was_removed_from() {
        let v = view(4, 2);
        let p = Proposal::new(Change::Remove(addr(4)), &v).expect("valid");
        let store = MemoryStore::new();
        let mut d = Durable::load(&store, &addr(4), Some(v.clone())).expect("loads");
        assert_eq!(install_in(&store, &mut d, &p.to), Installed::Switched);
        assert!(d.view.is_none() && d.replica.is_none());
        // A peer that missed the removal offers the older view, or a change from it.
        assert_eq!(install_in(&store, &mut d, &v), Installed::Unchanged);
        assert!(d.view.is_none() && d.replica.is_none());
        let stale = Proposal::new(Change::Add(addr(5)), &v).expect("valid");
        assert!(!learn(&mut d, &Transition::new(stale)).unwrap_or(false));
        // A later change that adds it back is taken.
        let back = Proposal::new(Change::Add(addr(4)), &p.to).expect("valid");
        assert_eq!(install_in(&store, &mut d, &back.to), Installed::Switched);
        assert!(d.view.is_some());
    }

    /// Found by `kvs sim --seed 191`: a wiped source learned the change while blank,
    /// then installed the change's base view from a peer and dropped the change, so it
    /// took writes to the slots it was giving away; they were lost at the switch.
    #[test]
    fn installing_the_base_of_a_learned_change_keeps_the_change() {
        // N=5, K=2: adding node 6 forms a partition that takes slots from node 4's.
        let v = view(5, 2);
        let p = Proposal::new(Change::Add(addr(6)), &v).expect("valid");
        let store = MemoryStore::new();
        // Node 4, blank (its disk was wiped), learns the change: it is a member after.
        let mut d = Durable::load(&store, &addr(4), None).expect("loads");
        assert!(learn(&mut d, &Transition::new(p.clone())).expect("learns"));
        assert_eq!(install_in(&store, &mut d, &v), Installed::Switched);
        assert!(d.transition.is_some(), "the change is kept");
        let frozen = duties(&p, &addr(4)).frozen;
        let slot = frozen.iter().next().expect("node 4 gives slots away");
        let uid = match v.role_of(&addr(4)) {
            Some(Role::Replica(uid)) => uid,
            other => panic!("node 4 is a replica in the base view, not {other:?}"),
        };
        assert!(writable(&d, uid, &write_to(slot, Default::default())).is_err());
        // Installing the change's own view completes it.
        assert_eq!(install_in(&store, &mut d, &p.to), Installed::Switched);
        assert!(d.transition.is_none());
    }

    fn write_to(slot: u32, token: crate::clock::CausalToken) -> WriteRequest {
        WriteRequest {
            slot,
            key: "k".into(),
            value: Some(b"v".to_vec()),
            token,
            now_us: 0,
            mode: Default::default(),
        }
    }

    #[test]
    fn frozen_and_leaving_replicas_refuse_writes() {
        let v = view(4, 2);
        let p = Proposal::new(Change::Remove(addr(1)), &v).expect("valid");
        let mut d = Durable::load(&MemoryStore::new(), &addr(2), Some(v.clone())).expect("loads");
        let plain = |slot| write_to(slot, Default::default());
        assert!(writable(&d, 0, &plain(0)).is_ok());
        learn(&mut d, &Transition::new(p)).expect("learns");
        // Partition uid 0 dissolves: node 2 leaves it and freezes all of its slots.
        assert!(writable(&d, 0, &plain(0)).is_err());
        assert!(writable(&d, 1, &plain(1)).is_err(), "not its partition");
    }

    #[test]
    fn writes_depending_on_writes_the_replica_lacks_are_refused() {
        let v = view(2, 2);
        let d = Durable::load(&MemoryStore::new(), &addr(1), Some(v)).expect("loads");
        let mut token = crate::clock::CausalToken::default();
        // A write of replica 99 this replica never received.
        token.observe(0, &[(99, 1)].into_iter().collect());
        let err = writable(&d, 0, &write_to(0, token.clone())).expect_err("refused");
        assert_eq!(err.kind, crate::error::ErrorKind::Unavailable);
        // Its dependencies in other partitions are not this replica's to check.
        let mut other = crate::clock::CausalToken::default();
        other.observe(1, &[(99, 1)].into_iter().collect());
        assert!(writable(&d, 0, &write_to(0, other)).is_ok());
    }
}
