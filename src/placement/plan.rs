//! What a view change moves ([`plan`]), and how slots are dealt to partitions
//! ([`rebalance`]).

use serde::{Deserialize, Serialize};

use super::{Partition, PartitionUid, SlotSet, View, SLOTS};

/// Slots of partition `from` that partition `to` takes over in a view change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub from: PartitionUid,
    pub to: PartitionUid,
    pub slots: SlotSet,
}

/// A member that becomes a replica of a partition that already holds data: it needs a
/// copy of that partition's keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Join {
    pub uid: PartitionUid,
    pub node: String,
}

/// What a change from one view to the next moves. See [`plan`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Slot moves, sorted by (from, to).
    pub moves: Vec<Move>,
    /// Members joining partitions that exist in both views; each copies the whole
    /// partition. A member that switches partition is also in `leaves`. Members of a
    /// partition the change creates are not joins: they receive its slots as `moves`.
    pub joins: Vec<Join>,
    /// Replicas of the old view that are not replicas of the same partition in the new
    /// one (removed, demoted to proxy, moved to another partition, or in a dissolved
    /// one): their writes must be drained first.
    pub leaves: Vec<Join>,
}

impl Plan {
    /// Number of slots that change partition.
    pub fn moved_slots(&self) -> usize {
        self.moves.iter().map(|m| m.slots.len()).sum()
    }

    /// Partitions that give slots away.
    pub fn sources(&self) -> Vec<PartitionUid> {
        let mut v: Vec<_> = self.moves.iter().map(|m| m.from).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Partitions that must be drained (one replica brought up to every write its peers
    /// acknowledged) before data is copied out of them: those that give slots away (the
    /// receivers read the moving slots from it), those that lose a replica (its writes
    /// must not leave with it) and those that gain one (the joiner copies the whole
    /// partition from it). Sorted by uid.
    pub fn drained(&self) -> Vec<PartitionUid> {
        let mut v = self.sources();
        v.extend(self.leaves.iter().map(|l| l.uid));
        v.extend(self.joins.iter().map(|j| j.uid));
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// What moves between `from` and the view `to` that follows it.
pub fn plan(from: &View, to: &View) -> Plan {
    let mut moves: Vec<Move> = Vec::new();
    for slot in 0..SLOTS {
        let (a, b) = (from.slots[slot as usize], to.slots[slot as usize]);
        if a == b {
            continue;
        }
        match moves.iter_mut().find(|m| m.from == a && m.to == b) {
            Some(m) => m.slots.insert(slot),
            None => moves.push(Move {
                from: a,
                to: b,
                slots: [slot].into_iter().collect(),
            }),
        }
    }
    moves.sort_by_key(|m| (m.from, m.to));
    let mut joins = Vec::new();
    let mut leaves = Vec::new();
    for p in &to.partitions {
        if let Some(old) = from.replicas_of(p.uid) {
            for node in &p.replicas {
                if !old.contains(node) {
                    joins.push(Join {
                        uid: p.uid,
                        node: node.clone(),
                    });
                }
            }
        }
    }
    for p in &from.partitions {
        let new = to.replicas_of(p.uid).unwrap_or_default();
        for node in &p.replicas {
            if !new.contains(node) {
                leaves.push(Join {
                    uid: p.uid,
                    node: node.clone(),
                });
            }
        }
    }
    Plan {
        moves,
        joins,
        leaves,
    }
}

/// Reassigns slots so that every partition of `partitions` holds `SLOTS / P` or one
/// more, moving the fewest slots. Slots owned by a uid not in `partitions` (a dissolved
/// partition) always move. Deterministic.
pub fn rebalance(slots: &mut [PartitionUid], partitions: &[Partition]) {
    let p = partitions.len();
    if p == 0 {
        return;
    }
    let index_of = |uid: PartitionUid| partitions.iter().position(|x| x.uid == uid);
    let mut count = vec![0usize; p];
    for &uid in slots.iter() {
        if let Some(i) = index_of(uid) {
            count[i] += 1;
        }
    }
    let base = slots.len() / p;
    let extra = slots.len() % p;
    // The `extra` partitions that already hold the most keep one slot more than `base`:
    // that choice maximises what stays in place.
    let mut by_size: Vec<usize> = (0..p).collect();
    by_size.sort_by_key(|&i| (std::cmp::Reverse(count[i]), i));
    let mut target = vec![base; p];
    for &i in by_size.iter().take(extra) {
        target[i] += 1;
    }
    // Surplus: orphaned slots, then each over-full partition's highest slots.
    let mut surplus: Vec<usize> = Vec::new();
    let mut keep = count.clone();
    for s in (0..slots.len()).rev() {
        match index_of(slots[s]) {
            None => surplus.push(s),
            Some(i) if keep[i] > target[i] => {
                keep[i] -= 1;
                surplus.push(s);
            }
            Some(_) => {}
        }
    }
    surplus.sort_unstable();
    let mut pool = surplus.into_iter();
    for i in 0..p {
        while keep[i] < target[i] {
            match pool.next() {
                Some(s) => {
                    slots[s] = partitions[i].uid;
                    keep[i] += 1;
                }
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;

    #[test]
    fn a_switching_member_leaves_one_partition_and_joins_another() {
        let v = View::bootstrap_shards(addrs(6), 2).expect("valid");
        // addr(1) is in shard 0 (of three); it moves to shard 1.
        let w = v
            .apply(&Change::AddToShard {
                addr: addr(1),
                shard: 1,
            })
            .expect("valid");
        let p = plan(&v, &w);
        assert!(p.moves.is_empty());
        assert_eq!(
            p.joins,
            vec![Join {
                uid: 1,
                node: addr(1)
            }]
        );
        assert_eq!(
            p.leaves,
            vec![Join {
                uid: 0,
                node: addr(1)
            }]
        );
        assert!(p.sources().is_empty());
        assert_eq!(p.drained(), vec![0, 1]);
    }

    #[test]
    fn a_newcomer_joining_a_shard_drains_it() {
        let v = View::bootstrap_shards(addrs(4), 2).expect("valid");
        let w = v
            .apply(&Change::AddToShard {
                addr: addr(9),
                shard: 0,
            })
            .expect("valid");
        let p = plan(&v, &w);
        assert!(p.moves.is_empty() && p.leaves.is_empty());
        assert_eq!(p.joins.len(), 1);
        // The joiner copies shard 0 from a drained replica: draining only the sources
        // and leavers, as K mode could, would leave it no source.
        assert_eq!(p.drained(), vec![0]);
    }

    #[test]
    fn rebalance_deals_orphans_and_surplus_minimally() {
        let v = View::bootstrap(addrs(6), 2).expect("valid");
        let mut slots = v.slots.clone();
        let kept = &v.partitions[..2];
        rebalance(&mut slots, kept);
        assert!(slots.iter().all(|&u| u == 0 || u == 1));
        let w = View {
            partitions: kept.to_vec(),
            slots: slots.clone(),
            ..v.clone()
        };
        assert_eq!(slot_spread(&w), 0);
        let moved = (0..SLOTS as usize)
            .filter(|&s| slots[s] != v.slots[s])
            .count();
        assert_eq!(moved, v.slots.iter().filter(|&&u| u == 2).count());
    }
}
