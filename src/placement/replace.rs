//! Replacing the whole member list in one change (seed 003's `view-change`), in any
//! layout: [`Change::Replace`].
//!
//! The new list is dealt into shards by `deal.rs`, keeping the most members in place:
//!
//! * *K mode* (and seed 003's replication-factor clusters, which are K-mode clusters
//!   started with `REPL_FACTOR`): `floor(N'/r)` shards of exactly `r` replicas, where
//!   `r` is the change's replication factor (the cluster's K when it names none); the
//!   cluster's K becomes `r`. The `N' mod r` members left over are proxies, as in K
//!   mode (seed 003 always gives a multiple of r).
//! * *Shard-count mode*: with a replication factor, the same `floor(N'/r)` shards of
//!   `r`; without one, the current shard count over the new list, sizes differing by at
//!   most one.
//!
//! Members that stay keep their shard where the new sizes allow; a shard whose every
//! replica left is kept (its uid and slots) and refilled by newcomers, who copy its data,
//! so slots move only when the number of shards changes, and then only as many as
//! balance needs.

use super::deal::deal;
use super::{ChangeError, Layout, View};

/// Applies [`super::Change::Replace`] to `view`, writing the result into `next` (a copy
/// of `view` with the epoch already bumped).
pub(super) fn apply(
    view: &View,
    next: &mut View,
    members: &[String],
    replication: Option<u32>,
) -> Result<(), ChangeError> {
    if members.is_empty() {
        return Err(ChangeError::EmptyView);
    }
    for (i, m) in members.iter().enumerate() {
        if members[..i].contains(m) {
            return Err(ChangeError::DuplicateMember(m.clone()));
        }
    }
    let nodes = members.len();
    let r = match (replication, view.layout) {
        (Some(0), _) => return Err(ChangeError::ZeroReplicationFactor),
        (Some(r), _) => Some(r as usize),
        (None, Layout::Replicas(k)) => Some(k),
        (None, Layout::Shards) => None,
    };
    let sizes: Vec<usize> = match r {
        Some(r) if nodes < r => return Err(ChangeError::FewerNodesThanReplicas { nodes, r }),
        Some(r) => vec![r; nodes / r],
        None => {
            let shards = view.partitions.len().max(1);
            if nodes < shards {
                return Err(ChangeError::FewerNodesThanShards { nodes, shards });
            }
            let (base, extra) = (nodes / shards, nodes % shards);
            (0..shards).map(|i| base + usize::from(i < extra)).collect()
        }
    };
    if let (Layout::Replicas(_), Some(r)) = (view.layout, r) {
        next.layout = Layout::Replicas(r);
    }
    deal(view, next, members, &sizes)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use proptest::prelude::*;

    fn replace(v: &View, members: Vec<String>, r: Option<u32>) -> View {
        v.apply(&Change::Replace {
            members,
            replication: r,
        })
        .expect("valid replacement")
    }

    fn sizes(v: &View) -> Vec<usize> {
        v.partitions.iter().map(|p| p.replicas.len()).collect()
    }

    /// Seed 003: one node grows to four with the replication factor going from 1 to 2.
    /// The old shard is kept with its node and the next new one; a new shard takes the
    /// other two; half the slots move (the least for two balanced shards).
    #[test]
    fn one_node_grows_to_four_with_r_from_one_to_two() {
        let v = View::bootstrap(addrs(1), 1).expect("valid");
        let w = replace(&v, addrs(4), Some(2));
        assert_eq!(w.layout, Layout::Replicas(2));
        assert_eq!(w.partitions[0].replicas, vec![addr(1), addr(2)]);
        assert_eq!(w.partitions[1].replicas, vec![addr(3), addr(4)]);
        assert_eq!(w.partitions[0].uid, 0);
        let p = plan(&v, &w);
        assert_eq!(p.moved_slots(), 2048);
        assert_eq!(p.moved_slots(), slot_lower_bound(&v, &w));
        assert_eq!(p.joins.len(), 1);
        assert!(p.leaves.is_empty());
        assert!(w.check().is_ok());
    }

    /// Two unreplicated nodes to four: both shards are kept, two new ones take a quarter
    /// of the slots each.
    #[test]
    fn two_nodes_to_four() {
        let v = View::bootstrap(addrs(2), 1).expect("valid");
        let w = replace(&v, addrs(4), None);
        assert_eq!(sizes(&w), vec![1, 1, 1, 1]);
        assert_eq!(w.partitions[0].replicas, vec![addr(1)]);
        assert_eq!(w.partitions[1].replicas, vec![addr(2)]);
        let p = plan(&v, &w);
        assert_eq!(p.moved_slots(), 2048);
        assert!(p.joins.is_empty() && p.leaves.is_empty());
    }

    /// Two nodes of four replaced by two new ones: the replaced nodes' shards are kept
    /// and refilled, so no slot moves; each newcomer copies one shard.
    #[test]
    fn two_nodes_replaced_by_two_new_ones_moves_no_slot() {
        let v = View::bootstrap(addrs(4), 1).expect("valid");
        let new = vec![addr(1), addr(2), addr(5), addr(6)];
        let w = replace(&v, new.clone(), None);
        assert_eq!(w.members, new);
        assert_eq!(w.slots, v.slots);
        assert_eq!(w.partitions[2].replicas, vec![addr(5)]);
        assert_eq!(w.partitions[3].replicas, vec![addr(6)]);
        let p = plan(&v, &w);
        assert!(p.moves.is_empty());
        assert_eq!(p.joins.len(), 2);
        assert_eq!(p.leaves.len(), 2);
        let m = Movement::of(
            &v,
            &w,
            &Change::Replace {
                members: new,
                replication: None,
            },
        );
        assert_eq!((m.members_moved, m.members_min), (2, 2));
        assert_eq!(m.copies, m.copies_needed);
    }

    /// 2×2 to 3×2 in shard-count mode, with a replication factor: a third shard.
    #[test]
    fn shard_mode_takes_a_replication_factor_or_keeps_its_count() {
        let v = View::bootstrap_shards(addrs(4), 2).expect("valid");
        let w = replace(&v, addrs(6), Some(2));
        assert_eq!(w.layout, Layout::Shards);
        assert_eq!(sizes(&w), vec![2, 2, 2]);
        let w = replace(&v, addrs(6), None);
        assert_eq!(sizes(&w), vec![3, 3]);
        assert_eq!(w.slots, v.slots);
    }

    #[test]
    fn bad_replacements_are_refused() {
        let v = View::bootstrap(addrs(4), 2).expect("valid");
        let r = |members: Vec<String>, r| {
            v.apply(&Change::Replace {
                members,
                replication: r,
            })
        };
        assert_eq!(r(vec![], None), Err(ChangeError::EmptyView));
        assert_eq!(
            r(vec![addr(1), addr(1)], Some(1)),
            Err(ChangeError::DuplicateMember(addr(1)))
        );
        assert_eq!(
            r(addrs(2), Some(0)),
            Err(ChangeError::ZeroReplicationFactor)
        );
        assert_eq!(
            r(addrs(2), Some(3)),
            Err(ChangeError::FewerNodesThanReplicas { nodes: 2, r: 3 })
        );
        // The same view and factor: only the epoch changes.
        let w = r(addrs(4), None).expect("allowed");
        assert_eq!(w.epoch, v.epoch + 1);
        assert_eq!(plan(&v, &w), Plan::default());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any replacement of any K-mode view is valid, deterministic, balanced, moves
        /// the fewest slots for the shards it keeps and the fewest members any
        /// replacement could (see `Movement`).
        #[test]
        fn replacements_are_valid_minimal_and_deterministic(
            n in 1usize..10, k in 1usize..4,
            keep in prop::collection::vec(any::<bool>(), 10),
            fresh in 0usize..6, r in prop::option::of(1u32..4),
        ) {
            let Ok(v) = View::bootstrap(addrs(n), k) else { return Ok(()) };
            let mut members: Vec<String> = v.members.iter().zip(&keep)
                .filter(|(_, k)| **k).map(|(m, _)| m.clone()).collect();
            members.extend((0..fresh).map(|i| addr(100 + i)));
            let change = Change::Replace { members: members.clone(), replication: r };
            let Ok(w) = v.apply(&change) else {
                let need = r.map_or(k, |r| r as usize);
                prop_assert!(members.len() < need);
                return Ok(());
            };
            prop_assert_eq!(&w, &v.apply(&change).expect("same input"));
            prop_assert!(w.check().is_ok(), "{:?}", w.check());
            prop_assert_eq!(&w.members, &members);
            let r = r.map_or(k, |r| r as usize);
            prop_assert_eq!(w.partition_count(), members.len() / r);
            prop_assert!(slot_spread(&w) <= 1);
            let m = Movement::of(&v, &w, &change);
            prop_assert_eq!(m.slots_moved, m.slots_min);
            prop_assert_eq!(m.members_moved, m.members_min);
        }
    }
}
