//! Shard-count mode's rules (seed 002): shards of one replica or more, proxies until
//! placed, `add-member` and `reshard`. See the module doc for the rules in brief.
//!
//! A reshard keeps the most members in place; `deal.rs` says how and why that is the
//! least any reshard can move.

use super::deal::deal;
use super::{rebalance, Change, ChangeError, View};

/// Applies `change` to `view` in shard-count mode, writing the result into `next` (a
/// copy of `view` with the epoch already bumped).
pub(super) fn apply(view: &View, next: &mut View, change: &Change) -> Result<(), ChangeError> {
    match change {
        Change::Add(addr) => {
            if view.is_member(addr) {
                return Err(ChangeError::AlreadyMember(addr.clone()));
            }
            // A proxy until `AddToShard` or a reshard places it: nothing moves.
            next.members.push(addr.clone());
        }
        Change::Remove(addr) => remove(view, next, addr)?,
        Change::AddToShard { addr, shard } => add_to_shard(view, next, addr, *shard)?,
        Change::Reshard(n) => reshard(view, next, *n)?,
        Change::Replace {
            members,
            replication,
        } => super::replace::apply(view, next, members, *replication)?,
    }
    Ok(())
}

fn remove(view: &View, next: &mut View, addr: &str) -> Result<(), ChangeError> {
    if !view.is_member(addr) {
        return Err(ChangeError::NotMember(addr.to_string()));
    }
    let home = view
        .partitions
        .iter()
        .position(|p| p.replicas.iter().any(|r| r == addr));
    if let Some(i) = home {
        // Its only shard would be dissolved with no other to take the slots. (This is
        // also the last member: a valid view has a shard, and it has a replica.)
        if view.partitions.len() == 1 && view.partitions[i].replicas.len() == 1 {
            return Err(ChangeError::LastShard(addr.to_string()));
        }
    }
    next.members.retain(|m| m != addr);
    if let Some(i) = home {
        let shard = &mut next.partitions[i];
        shard.replicas.retain(|r| r != addr);
        if shard.replicas.is_empty() {
            // As in K mode, the last shard takes the dissolved one's index, so one
            // client-visible id changes rather than all that follow.
            next.partitions.swap_remove(i);
            rebalance(&mut next.slots, &next.partitions);
        }
    }
    Ok(())
}

fn add_to_shard(view: &View, next: &mut View, addr: &str, shard: u32) -> Result<(), ChangeError> {
    let target = shard as usize;
    if target >= view.partitions.len() {
        return Err(ChangeError::NoSuchShard(shard));
    }
    let home = view
        .partitions
        .iter()
        .position(|p| p.replicas.iter().any(|r| r == addr));
    match home {
        Some(i) if i == target => {
            return Err(ChangeError::AlreadyInShard {
                addr: addr.to_string(),
                shard,
            })
        }
        Some(i) if view.partitions[i].replicas.len() == 1 => {
            return Err(ChangeError::OnlyReplica {
                addr: addr.to_string(),
                shard: i as u32,
            })
        }
        Some(i) => next.partitions[i].replicas.retain(|r| r != addr),
        None => {}
    }
    if !view.is_member(addr) {
        next.members.push(addr.to_string());
    }
    // No slot moves: the node copies the shard's data as a joiner (see `plan`).
    next.partitions[target].replicas.push(addr.to_string());
    Ok(())
}

/// Deals every member into `n` shards moving the fewest members, then the fewest slots.
/// See the module doc of this file for why it is minimal.
///
/// Resharding to the current count when shards are balanced and there are no proxies
/// changes nothing but the epoch; it is allowed (the client asked for a layout the
/// cluster has: the answer is success, and the plan moves nothing).
fn reshard(view: &View, next: &mut View, n: u32) -> Result<(), ChangeError> {
    let nodes = view.members.len();
    let shards = n as usize;
    if shards == 0 {
        return Err(ChangeError::ZeroShards);
    }
    // `nodes / 2 < shards` is `nodes < 2 * shards` without the multiplication.
    if nodes / 2 < shards {
        return Err(ChangeError::NotEnoughNodes { nodes, shards });
    }
    let (base, extra) = (nodes / shards, nodes % shards);
    // The `extra` largest shards get one more: sizes largest first.
    let sizes: Vec<usize> = (0..shards).map(|r| base + usize::from(r < extra)).collect();
    deal(view, next, &view.members, &sizes)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use proptest::prelude::*;

    fn shard_of(v: &View, a: &str) -> Option<u32> {
        match v.role_of(a) {
            Some(Role::Replica(uid)) => v.index_of(uid),
            _ => None,
        }
    }

    fn sizes(v: &View) -> Vec<usize> {
        v.partitions.iter().map(|p| p.replicas.len()).collect()
    }

    /// Seed 002: "6 nodes and 2 shards", resharded to 3: three shards of two, and only
    /// the two members the new shard needs move.
    #[test]
    fn reshard_two_to_three_balances_six_nodes() {
        let v = View::bootstrap_shards(addrs(6), 2).expect("valid");
        let w = v.apply(&Change::Reshard(3)).expect("valid");
        assert_eq!(sizes(&w), vec![2, 2, 2]);
        assert_eq!(w.partitions[0].replicas, vec![addr(1), addr(3)]);
        assert_eq!(w.partitions[1].replicas, vec![addr(2), addr(4)]);
        assert_eq!(w.partitions[2].replicas, vec![addr(5), addr(6)]);
        assert_eq!(w.partitions[2].uid, 2);
        assert_eq!(w.next_uid, 3);
        assert!(w.proxies().is_empty());
        assert_eq!(slot_spread(&w), 1);
        let p = plan(&v, &w);
        assert_eq!(p.moved_slots(), 4096 / 3);
        assert!(p.joins.is_empty());
        assert_eq!(p.leaves.len(), 2);
    }

    /// Seed 002: "6 nodes and 2 shards with 4 nodes on 1 shard and 2 on the other",
    /// resharded to 2: back to 3 and 3, one member moving, no slot moving.
    #[test]
    fn reshard_to_the_same_count_evens_the_sizes() {
        let v = View::bootstrap_shards(addrs(6), 2).expect("valid");
        let v = v
            .apply(&Change::AddToShard {
                addr: addr(2),
                shard: 0,
            })
            .expect("valid");
        assert_eq!(sizes(&v), vec![4, 2]);
        let w = v.apply(&Change::Reshard(2)).expect("valid");
        assert_eq!(sizes(&w), vec![3, 3]);
        assert_eq!(w.slots, v.slots);
        let p = plan(&v, &w);
        assert_eq!(p.joins.len(), 1);
        assert_eq!(p.leaves.len(), 1);
        assert!(p.moves.is_empty());
    }

    #[test]
    fn a_reshard_that_changes_nothing_only_bumps_the_epoch() {
        let v = View::bootstrap_shards(addrs(7), 3).expect("valid");
        let w = v.apply(&Change::Reshard(3)).expect("allowed");
        assert_eq!(w.epoch, v.epoch + 1);
        assert_eq!(
            View {
                epoch: v.epoch,
                ..w.clone()
            },
            v
        );
        assert_eq!(plan(&v, &w), Plan::default());
    }

    /// Seed 002: "5 nodes with 3 shard counts" is an error; so is 10 shards of 7 nodes.
    #[test]
    fn reshard_needs_two_nodes_per_shard() {
        let v = View::bootstrap_shards(addrs(7), 3).expect("valid");
        assert_eq!(
            v.apply(&Change::Reshard(10)),
            Err(ChangeError::NotEnoughNodes {
                nodes: 7,
                shards: 10
            })
        );
        assert_eq!(
            v.apply(&Change::Reshard(4)),
            Err(ChangeError::NotEnoughNodes {
                nodes: 7,
                shards: 4
            })
        );
        assert_eq!(v.apply(&Change::Reshard(0)), Err(ChangeError::ZeroShards));
        assert_eq!(
            v.apply(&Change::Reshard(u32::MAX)),
            Err(ChangeError::NotEnoughNodes {
                nodes: 7,
                shards: u32::MAX as usize
            })
        );
        let five = View::bootstrap_shards(addrs(6), 3)
            .expect("valid")
            .apply(&Change::Remove(addr(6)))
            .expect("valid");
        assert_eq!(
            five.apply(&Change::Reshard(3)).map_err(|e| e.to_string()),
            Err("5 nodes cannot form 3 shards of at least 2 replicas each".into())
        );
    }

    /// Seed 002 `add-member`: a node started later announces itself (a proxy), then is
    /// put in shard 1, which gains one member; no slot moves.
    #[test]
    fn add_member_puts_a_proxy_in_the_named_shard() {
        let v = View::bootstrap_shards(addrs(6), 2).expect("valid");
        let v = v.apply(&Change::Add(addr(7))).expect("valid");
        assert_eq!(v.role_of(&addr(7)), Some(Role::Proxy));
        assert_eq!(sizes(&v), vec![3, 3]);
        let w = v
            .apply(&Change::AddToShard {
                addr: addr(7),
                shard: 1,
            })
            .expect("valid");
        assert_eq!(sizes(&w), vec![3, 4]);
        assert_eq!(shard_of(&w, &addr(7)), Some(1));
        assert_eq!(w.members, v.members);
        assert_eq!(w.slots, v.slots);
        let p = plan(&v, &w);
        assert!(p.moves.is_empty() && p.leaves.is_empty());
        assert_eq!(
            p.joins,
            vec![Join {
                uid: 1,
                node: addr(7)
            }]
        );
        // A node not in the view yet is appended to the members.
        let x = v
            .apply(&Change::AddToShard {
                addr: addr(8),
                shard: 0,
            })
            .expect("valid");
        assert_eq!(x.members.last(), Some(&addr(8)));
        assert_eq!(shard_of(&x, &addr(8)), Some(0));
    }

    #[test]
    fn bad_shard_changes_are_refused() {
        let v = View::bootstrap_shards(addrs(4), 2).expect("valid");
        let to = |a: usize, shard| Change::AddToShard {
            addr: addr(a),
            shard,
        };
        assert_eq!(v.apply(&to(9, 2)), Err(ChangeError::NoSuchShard(2)));
        assert_eq!(
            v.apply(&to(1, 0)),
            Err(ChangeError::AlreadyInShard {
                addr: addr(1),
                shard: 0
            })
        );
        // Shard 1 = {2, 4}; move 2 to shard 0, then 4 cannot follow.
        let w = v.apply(&to(2, 0)).expect("shard 1 keeps 4");
        assert_eq!(
            w.apply(&to(4, 0)),
            Err(ChangeError::OnlyReplica {
                addr: addr(4),
                shard: 1
            })
        );
        assert_eq!(
            v.apply(&Change::Add(addr(1))),
            Err(ChangeError::AlreadyMember(addr(1)))
        );
        assert_eq!(
            v.apply(&Change::Remove(addr(9))),
            Err(ChangeError::NotMember(addr(9)))
        );
    }

    #[test]
    fn remove_dissolves_an_emptied_shard_but_never_the_last() {
        let v = View::bootstrap_shards(addrs(6), 3).expect("valid");
        // Shard 0 = {1, 4}, 1 = {2, 5}, 2 = {3, 6}.
        let v = v.apply(&Change::Remove(addr(1))).expect("valid");
        assert_eq!(sizes(&v), vec![1, 2, 2]);
        let w = v.apply(&Change::Remove(addr(4))).expect("valid");
        // Shard 0 is gone; the last shard (uid 2) took its index.
        assert_eq!(
            w.partitions.iter().map(|p| p.uid).collect::<Vec<_>>(),
            vec![2, 1]
        );
        assert_eq!(slot_spread(&w), 0);
        assert_eq!(plan(&v, &w).moved_slots(), slot_lower_bound(&v, &w));
        // Down to one shard of one replica and a proxy: that replica stays.
        let mut x = View::bootstrap_shards(addrs(2), 1).expect("valid");
        x = x.apply(&Change::Add(addr(3))).expect("valid");
        x = x.apply(&Change::Remove(addr(1))).expect("valid");
        assert_eq!(
            x.apply(&Change::Remove(addr(2))),
            Err(ChangeError::LastShard(addr(2)))
        );
        // The proxy can go.
        let y = x.apply(&Change::Remove(addr(3))).expect("valid");
        assert_eq!(y.members, vec![addr(2)]);
        assert_eq!(
            y.apply(&Change::Remove(addr(2))),
            Err(ChangeError::LastShard(addr(2)))
        );
    }

    #[test]
    fn reshard_keeps_the_largest_shards_and_deals_the_rest() {
        // 9 members: shards {1,4,7}, {2,5,8}, {3,6,9}. Remove 3 and 6 (shard 2 has
        // {9} left), add a proxy 10: 8 members. Reshard to 2: shards 0 and 1 are
        // kept whole (3 each), 9 and 10 fill them to 4 each; shard 2 is dissolved.
        let mut v = View::bootstrap_shards(addrs(9), 3).expect("valid");
        for c in [
            Change::Remove(addr(3)),
            Change::Remove(addr(6)),
            Change::Add(addr(10)),
        ] {
            v = v.apply(&c).expect("valid");
        }
        let w = v.apply(&Change::Reshard(2)).expect("valid");
        assert_eq!(
            w.partitions[0].replicas,
            vec![addr(1), addr(4), addr(7), addr(9)]
        );
        assert_eq!(
            w.partitions[1].replicas,
            vec![addr(2), addr(5), addr(8), addr(10)]
        );
        let m = Movement::of(&v, &w, &Change::Reshard(2));
        assert_eq!((m.members_moved, m.members_min), (2, 2));
        assert_eq!(m.slots_moved, m.slots_min);
    }

    #[test]
    fn keys_moved_by_shard_changes_against_the_minimum() {
        let keys = sample_keys(10_000);
        let v = View::bootstrap_shards(addrs(6), 2).expect("valid");
        let v7 = v.apply(&Change::Add(addr(7))).expect("valid");
        let steps = [
            (v.clone(), Change::Reshard(3)),
            (
                v7.clone(),
                Change::AddToShard {
                    addr: addr(7),
                    shard: 1,
                },
            ),
            (
                v.clone(),
                Change::AddToShard {
                    addr: addr(1),
                    shard: 1,
                },
            ),
            (
                View::bootstrap_shards(addrs(9), 3).expect("valid"),
                Change::Reshard(2),
            ),
            (
                View::bootstrap_shards(addrs(9), 3).expect("valid"),
                Change::Reshard(4),
            ),
        ];
        for (from, change) in steps {
            let to = from.apply(&change).expect("valid");
            let m = Movement::of(&from, &to, &change);
            let moved = keys_moved(&from, &to, &keys);
            // Keys per slot, from the sample: the keys of the slots a minimal table moves.
            let per_slot = keys.len() as f64 / SLOTS as f64;
            println!(
                "{} shards, {change}: slots moved {} (min {}), keys moved {moved} of {} (~min {:.0}), \
                 members moved {} (min {}), slot copies {} (needed {})",
                from.partition_count(),
                m.slots_moved,
                m.slots_min,
                keys.len(),
                m.slots_min as f64 * per_slot,
                m.members_moved,
                m.members_min,
                m.copies,
                m.copies_needed,
            );
            assert_eq!(m.slots_moved, m.slots_min, "{change}");
            assert_eq!(m.members_moved, m.members_min, "{change}");
            assert!(m.copies >= m.copies_needed);
        }
    }

    /// One random step: what to ask of the view, picked by `kind`.
    fn step(v: &View, kind: u8, pick: usize, n: u32, fresh: &mut usize) -> Change {
        let member = |i: usize| v.members[i % v.members.len()].clone();
        match kind % 5 {
            0 => {
                *fresh += 1;
                Change::Add(addr(*fresh))
            }
            1 => Change::Remove(member(pick)),
            2 => Change::AddToShard {
                addr: member(pick),
                shard: (pick / 7) as u32 % (v.partition_count() as u32 + 1),
            },
            3 => {
                *fresh += 1;
                Change::AddToShard {
                    addr: addr(*fresh),
                    shard: pick as u32 % v.partition_count() as u32,
                }
            }
            _ => Change::Reshard(n),
        }
    }

    /// The fewest members any reshard of `from` into `n` shards can move: every member,
    /// less the most that can stay (largest surviving shards with the largest sizes).
    fn reshard_member_bound(from: &View, n: usize) -> usize {
        let total = from.members.len();
        let mut have: Vec<usize> = from.partitions.iter().map(|p| p.replicas.len()).collect();
        have.sort_unstable_by(|a, b| b.cmp(a));
        let want: Vec<usize> = (0..n)
            .map(|r| total / n + usize::from(r < total % n))
            .collect();
        total - have.iter().zip(&want).map(|(h, w)| h.min(w)).sum::<usize>()
    }

    proptest! {
        // Each case runs up to 16 changes with their plans and movements (about 40 ms
        // per case unoptimized): 128 cases keep it under ~5 s on a test build.
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any sequence of shard-count changes keeps every view valid (each member at most
        /// once, each shard at least one replica), balanced in slots, deterministic, and
        /// each change moves no more than it must; refusals happen only for their reason.
        #[test]
        fn shard_changes_are_valid_minimal_and_deterministic(
            n in 2usize..16,
            shards in 1usize..6,
            steps in prop::collection::vec((any::<u8>(), 0usize..1000, 0u32..9), 1..16),
        ) {
            let Ok(mut v) = View::bootstrap_shards(addrs(n), shards) else { return Ok(()) };
            let mut fresh = 100;
            for (kind, pick, count) in steps {
                let change = step(&v, kind, pick, count, &mut fresh);
                let w = match v.apply(&change) {
                    Ok(w) => w,
                    Err(e) => {
                        let ok = match (&e, &change) {
                            (ChangeError::LastShard(_), Change::Remove(a)) =>
                                v.partition_count() == 1 && v.partitions[0].replicas == [a.clone()],
                            (ChangeError::NoSuchShard(s), _) => *s as usize >= v.partition_count(),
                            (ChangeError::AlreadyInShard { addr, shard }, _) =>
                                v.replicas_at(*shard).is_some_and(|r| r.contains(addr)),
                            (ChangeError::OnlyReplica { shard, .. }, _) =>
                                v.replicas_at(*shard).is_some_and(|r| r.len() == 1),
                            (ChangeError::NotEnoughNodes { nodes, shards }, _) =>
                                *nodes == v.members.len() && *nodes < 2 * *shards,
                            (ChangeError::ZeroShards, Change::Reshard(0)) => true,
                            _ => false,
                        };
                        prop_assert!(ok, "{change} refused: {e}");
                        continue;
                    }
                };
                prop_assert_eq!(&w, &v.apply(&change).expect("same input"));
                prop_assert!(w.check().is_ok(), "{:?}", w.check());
                prop_assert_eq!(w.layout, Layout::Shards);
                prop_assert_eq!(w.epoch, v.epoch + 1);
                prop_assert_eq!(w.cluster, v.cluster);
                prop_assert!(w.partitions.iter().all(|p| !p.replicas.is_empty()));
                prop_assert!(slot_spread(&w) <= 1, "unbalanced after {}", change);
                let p = plan(&v, &w);
                let m = Movement::of(&v, &w, &change);
                prop_assert_eq!(m.slots_moved, p.moved_slots());
                prop_assert_eq!(p.moved_slots(), slot_lower_bound(&v, &w), "{}", change);
                prop_assert!(m.members_moved >= m.members_min);
                prop_assert!(m.copies >= m.copies_needed);
                match &change {
                    Change::Add(a) => {
                        prop_assert_eq!(w.role_of(a), Some(Role::Proxy));
                        prop_assert_eq!(&p, &Plan::default());
                    }
                    Change::Remove(a) => {
                        prop_assert!(!w.is_member(a));
                        prop_assert!(p.joins.is_empty());
                        prop_assert!(w.partition_count() + 1 >= v.partition_count());
                    }
                    Change::AddToShard { addr, shard } => {
                        prop_assert_eq!(shard_of(&w, addr), Some(*shard));
                        prop_assert!(p.moves.is_empty());
                        prop_assert_eq!(p.joins.len(), 1);
                        prop_assert!(p.leaves.len() <= 1);
                        prop_assert_eq!(w.partition_count(), v.partition_count());
                        prop_assert_eq!(m.members_moved, 1);
                    }
                    Change::Reshard(count) => {
                        let count = *count as usize;
                        prop_assert_eq!(w.partition_count(), count);
                        prop_assert!(w.proxies().is_empty());
                        let s = sizes(&w);
                        let (lo, hi) = (s.iter().min().copied().unwrap_or(0), s.iter().max().copied().unwrap_or(0));
                        prop_assert!(hi - lo <= 1 && lo >= 2, "sizes {:?}", s);
                        prop_assert_eq!(m.members_moved, reshard_member_bound(&v, count));
                        prop_assert_eq!(m.members_min, m.members_moved);
                    }
                    // Not generated here: `replace.rs` has its own property test.
                    Change::Replace { .. } => {}
                }
                v = w;
            }
        }
    }
}
