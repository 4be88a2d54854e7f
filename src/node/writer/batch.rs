//! One batch of writer commands: each applied to the durable state in one write
//! transaction (refused alone when it may not be applied now), then one commit for all.

use std::sync::Arc;

use super::{Durable, Installed, Outcome, WriterCmd};
use crate::clock::{PartitionUid, ReplicaId, VersionVector};
use crate::error::{Error, Result};
use crate::placement::{Role, View};
use crate::replica::{KeyState, Replica, WriteRequest};
use crate::storage::{Store, WriteTxn};
use crate::viewchange::{Acceptor, PullKey, PullProgress, Transition};

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
            WriterCmd::Write { req, partition, .. } => match writable(d, *partition, req) {
                Ok(()) => {
                    dirty.any = true;
                    dirty.replica = true;
                    let r = d.replica.as_mut().expect("writable checked the replica");
                    Outcome::Write(r.write(&mut *txn, req.clone())?)
                }
                Err(e) => Outcome::Failed(e),
            },
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
                cutoff_ms,
                replica,
                ..
            } => match incarnation(d, *replica) {
                Ok(_) => {
                    let mut dropped = 0;
                    // Re-checked here: a write may have revived the key since the
                    // candidates were picked from a snapshot.
                    for (slot, key) in candidates {
                        let state = txn.get(*slot, key)?;
                        if state.is_some_and(|s| Replica::collectable(&s, floor, *cutoff_ms)) {
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
        // A node outside any cluster only learns a change that makes it a member.
        None => t.proposal.to.is_member(&d.addr),
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
    let current = t.pulls.entry(key).or_default();
    if current.done {
        return Ok(Ok(current.clone()));
    }
    Replica::merge_states(txn, states)?;
    *current = progress.clone();
    Ok(Ok(current.clone()))
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
    } else if !view.is_member(&d.addr) {
        return Ok(Ok(Installed::Unchanged));
    }
    if d.outside() {
        // Joining without having learned the change: as in `learn`, a key held from an
        // earlier cluster is not this one's.
        d.cluster_key = None;
    }
    // The transition's claims hold only if it leads to exactly this view; after a jump
    // over a missed change the replica claims nothing and copies from a peer instead.
    let transition = d.transition.take();
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

    fn write_to(slot: u32, token: crate::clock::CausalToken) -> WriteRequest {
        WriteRequest {
            slot,
            key: "k".into(),
            value: Some(b"v".to_vec()),
            token,
            now_ms: 0,
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
