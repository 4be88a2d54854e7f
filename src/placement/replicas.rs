//! K mode's rules (seeds 000/001): `floor(N/K)` partitions of exactly K replicas, the
//! rest proxies; one member added or removed at a time. See the module doc.

use super::{rebalance, Change, ChangeError, Partition, View};

/// Applies `change` to `view` in K mode, writing the result into `next` (a copy of
/// `view` with the epoch already bumped).
pub(super) fn apply(
    view: &View,
    next: &mut View,
    k: usize,
    change: &Change,
) -> Result<(), ChangeError> {
    match change {
        Change::Add(addr) => {
            if view.is_member(addr) {
                return Err(ChangeError::AlreadyMember(addr.clone()));
            }
            next.members.push(addr.clone());
            let proxies = next.proxies();
            if proxies.len() >= k {
                next.partitions.push(Partition {
                    uid: next.next_uid,
                    replicas: proxies[..k].to_vec(),
                });
                next.next_uid = next
                    .next_uid
                    .checked_add(1)
                    .ok_or(ChangeError::Exhausted("partition uid"))?;
                rebalance(&mut next.slots, &next.partitions);
            }
        }
        Change::Remove(addr) => {
            if !view.is_member(addr) {
                return Err(ChangeError::NotMember(addr.clone()));
            }
            let n = view.members.len() - 1;
            if n < k {
                return Err(ChangeError::TooFewNodes {
                    addr: addr.clone(),
                    n,
                    k,
                });
            }
            let proxies = view.proxies();
            next.members.retain(|m| m != addr);
            if let Some(i) = next
                .partitions
                .iter()
                .position(|p| p.replicas.contains(addr))
            {
                match proxies.first() {
                    Some(proxy) => {
                        for r in &mut next.partitions[i].replicas {
                            if r == addr {
                                *r = proxy.clone();
                            }
                        }
                    }
                    None => {
                        next.partitions.swap_remove(i);
                        rebalance(&mut next.slots, &next.partitions);
                    }
                }
            }
        }
        Change::AddToShard { .. } | Change::Reshard(_) => {
            return Err(ChangeError::ShardModeOnly(change.to_string()))
        }
        Change::Replace {
            members,
            replication,
        } => super::replace::apply(view, next, members, *replication)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use proptest::prelude::*;

    #[test]
    fn view_changes_follow_the_seed() {
        // N=6, K=3 → 2; add one → 2 + 1 proxy; add two more → 3.
        let v = View::bootstrap(addrs(6), 3).expect("valid");
        let v = v.apply(&Change::Add(addr(7))).expect("add");
        assert_eq!((v.partition_count(), proxy_count(&v)), (2, 1));
        assert_eq!(v.role_of(&addr(7)), Some(Role::Proxy));
        let v = v.apply(&Change::Add(addr(8))).expect("add");
        assert_eq!((v.partition_count(), proxy_count(&v)), (2, 2));
        let v = v.apply(&Change::Add(addr(9))).expect("add");
        assert_eq!((v.partition_count(), proxy_count(&v)), (3, 0));
        assert_eq!(v.partitions[2].replicas, vec![addr(7), addr(8), addr(9)]);
        assert_eq!(v.epoch, 4);
        // N=6, K=2 → 3; remove one → 2 + 1 proxy.
        let v = View::bootstrap(addrs(6), 2).expect("valid");
        let w = v.apply(&Change::Remove(addr(3))).expect("remove");
        assert_eq!((w.partition_count(), proxy_count(&w)), (2, 1));
        assert_eq!(w.role_of(&addr(4)), Some(Role::Proxy));
        // The last partition took the dissolved one's index; its uid is unchanged.
        assert_eq!(w.partitions[1].uid, 2);
        assert_eq!(w.partitions[1].replicas, vec![addr(5), addr(6)]);
    }

    #[test]
    fn a_proxy_replaces_a_removed_replica_and_no_slot_moves() {
        let v = View::bootstrap(addrs(5), 2).expect("valid");
        let w = v.apply(&Change::Remove(addr(1))).expect("remove");
        assert_eq!(w.partitions[0].replicas, vec![addr(5), addr(2)]);
        assert_eq!(w.slots, v.slots);
        let p = plan(&v, &w);
        assert!(p.moves.is_empty());
        assert_eq!(
            p.joins,
            vec![Join {
                uid: 0,
                node: addr(5)
            }]
        );
        assert_eq!(
            p.leaves,
            vec![Join {
                uid: 0,
                node: addr(1)
            }]
        );
    }

    #[test]
    fn bad_changes_are_refused() {
        let v = View::bootstrap(addrs(2), 2).expect("valid");
        assert_eq!(
            v.apply(&Change::Add(addr(1))),
            Err(ChangeError::AlreadyMember(addr(1)))
        );
        assert_eq!(
            v.apply(&Change::Remove(addr(9))),
            Err(ChangeError::NotMember(addr(9)))
        );
        assert!(matches!(
            v.apply(&Change::Remove(addr(1))),
            Err(ChangeError::TooFewNodes { n: 1, k: 2, .. })
        ));
    }

    /// Found by the `envelope` fuzz target on a hand-made input: counters at their
    /// maximum made `apply` overflow (a panic where overflow checks are on).
    #[test]
    fn apply_refuses_to_overflow_the_counters() {
        let mut v = View::bootstrap(addrs(5), 2).expect("valid");
        v.epoch = u64::MAX;
        assert_eq!(
            v.apply(&Change::Remove(addr(5))),
            Err(ChangeError::Exhausted("epoch"))
        );
        let mut v = View::bootstrap(addrs(5), 2).expect("valid");
        v.next_uid = u32::MAX;
        assert_eq!(
            v.apply(&Change::Add(addr(6))),
            Err(ChangeError::Exhausted("partition uid"))
        );
        // A change that forms no partition needs no uid.
        let mut v = View::bootstrap(addrs(4), 2).expect("valid");
        v.next_uid = u32::MAX;
        assert!(v.apply(&Change::Add(addr(5))).is_ok());
    }

    /// Keys moved by a change against the least any balanced layout must move: the
    /// keys a new partition must receive, or those of a dissolved partition.
    #[test]
    fn keys_moved_by_changes_are_close_to_the_minimum() {
        let keys = sample_keys(10_000);
        let mut v = View::bootstrap(addrs(4), 2).expect("valid");
        let steps = [
            Change::Add(addr(5)),
            Change::Add(addr(6)),
            Change::Add(addr(7)),
            Change::Add(addr(8)),
            Change::Remove(addr(3)),
            Change::Remove(addr(6)),
            Change::Remove(addr(1)),
        ];
        for change in steps {
            let w = v.apply(&change).expect("valid change");
            let moved = keys
                .iter()
                .filter(|k| v.partition_of_key(k) != w.partition_of_key(k))
                .count();
            let created = w.partitions.iter().any(|p| v.replicas_of(p.uid).is_none());
            let dissolved = v
                .partitions
                .iter()
                .map(|p| p.uid)
                .find(|u| w.replicas_of(*u).is_none());
            let minimum = match (created, dissolved) {
                // A balanced layout gives the new partition 1/P' of the keys.
                (true, _) => keys.len() / w.partition_count(),
                (false, Some(uid)) => keys.iter().filter(|k| v.partition_of_key(k) == uid).count(),
                (false, None) => 0,
            };
            println!(
                "{change}: P {} -> {}, keys moved {moved}, minimum {minimum}, ratio {:.3}",
                v.partition_count(),
                w.partition_count(),
                if minimum == 0 {
                    1.0
                } else {
                    moved as f64 / minimum as f64
                }
            );
            if minimum == 0 {
                assert_eq!(moved, 0, "{change}: keys moved although none had to");
            } else {
                assert!(
                    moved as f64 <= 1.1 * minimum as f64,
                    "{change}: moved {moved} vs minimum {minimum}"
                );
            }
            let counts = key_counts(&w, &keys);
            let (max, min) = (
                *counts.iter().max().expect("some") as f64,
                *counts.iter().min().expect("some") as f64,
            );
            assert!(max / min <= 1.1, "{change}: unbalanced {counts:?}");
            v = w;
        }
    }

    #[test]
    fn shard_changes_are_refused_in_k_mode() {
        let v = View::bootstrap(addrs(6), 2).expect("valid");
        let to_shard = Change::AddToShard {
            addr: addr(7),
            shard: 0,
        };
        assert_eq!(
            v.apply(&to_shard),
            Err(ChangeError::ShardModeOnly(
                "add 10.0.0.27:8080 to shard 0".into()
            ))
        );
        let e = v.apply(&Change::Reshard(2)).expect_err("K mode");
        assert!(matches!(&e, ChangeError::ShardModeOnly(c) if c == "reshard into 2 shards"));
        assert!(e.to_string().contains("K mode"), "{e}");
    }

    fn changes() -> impl Strategy<Value = Vec<(bool, usize)>> {
        prop::collection::vec((any::<bool>(), 0usize..64), 1..12)
    }

    proptest! {
        /// Any sequence of adds and removes keeps the view valid and balanced, moves only
        /// the slots a balanced layout must move, changes at most one partition's
        /// membership, and is deterministic.
        #[test]
        fn view_changes_are_minimal_balanced_and_deterministic(
            n in 1usize..9, k in 1usize..4, steps in changes()
        ) {
            let Ok(mut v) = View::bootstrap(addrs(n), k) else { return Ok(()) };
            let mut fresh = 100;
            for (add, pick) in steps {
                let change = if add || v.members.len() <= k {
                    fresh += 1;
                    Change::Add(addr(fresh))
                } else {
                    Change::Remove(v.members[pick % v.members.len()].clone())
                };
                let w = v.apply(&change).expect("valid change");
                prop_assert_eq!(&w, &v.apply(&change).expect("same input"));
                prop_assert!(w.check().is_ok(), "{:?}", w.check());
                prop_assert_eq!(w.epoch, v.epoch + 1);
                prop_assert_eq!(w.cluster, v.cluster);
                prop_assert_eq!(w.partition_count(), w.members.len() / k);
                let per: Vec<usize> = w.partitions.iter()
                    .map(|p| w.slots.iter().filter(|&&u| u == p.uid).count()).collect();
                let (lo, hi) = (per.iter().min().copied().unwrap_or(0),
                                per.iter().max().copied().unwrap_or(0));
                prop_assert!(hi - lo <= 1, "unbalanced: {:?}", per);
                let p = plan(&v, &w);
                prop_assert_eq!(p.moved_slots(), slot_lower_bound(&v, &w));
                // Membership: at most one surviving partition changes, by one node.
                let changed: Vec<&Partition> = w.partitions.iter()
                    .filter(|q| v.replicas_of(q.uid).is_some_and(|r| r != q.replicas.as_slice()))
                    .collect();
                prop_assert!(changed.len() <= 1);
                prop_assert!(p.joins.len() <= 1);
                let created = w.partitions.iter().filter(|q| v.replicas_of(q.uid).is_none()).count();
                let dissolved = v.partitions.iter().filter(|q| w.replicas_of(q.uid).is_none()).count();
                prop_assert!(created + dissolved + changed.len() <= 1);
                // Slots move only to or from a created or dissolved partition.
                if created + dissolved == 0 {
                    prop_assert!(p.moves.is_empty());
                }
                v = w;
            }
        }
    }
}
