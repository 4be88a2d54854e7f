//! The view: the cluster configuration every node agrees on, its first value in each
//! layout, the invariants every view holds, and the questions the node asks of it.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use super::{slot_of, Layout, PartitionUid, Role, SlotSet, SLOTS};

/// One partition: a stable uid and its replicas (K of them in K mode).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub uid: PartitionUid,
    pub replicas: Vec<String>,
}

/// The cluster configuration every node agrees on. See the module doc.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// Identity of the cluster; stamped into causal tokens. Never changes.
    pub cluster: u64,
    /// Bumped by every view change; every internal message carries it.
    pub epoch: u64,
    /// How members form partitions. Never changes.
    pub layout: Layout,
    /// All members: VIEW order, then added nodes in the order they joined.
    pub members: Vec<String>,
    /// The partitions; a partition's position here is the id clients see.
    pub partitions: Vec<Partition>,
    /// `slots[s]` is the uid of the partition that owns slot `s`; `len() == SLOTS`.
    pub slots: Vec<PartitionUid>,
    /// The uid the next new partition gets.
    pub next_uid: PartitionUid,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("K must be at least 1")]
    ZeroK,
    #[error("VIEW is empty")]
    Empty,
    #[error("VIEW entry {0:?} is not an ip:port address")]
    BadAddress(String),
    #[error("VIEW lists {0} more than once")]
    Duplicate(String),
    #[error("VIEW has {n} members, fewer than K = {k}: no partition can be formed")]
    TooFewNodes { n: usize, k: usize },
    #[error("view is inconsistent: {0}")]
    Inconsistent(String),
    #[error("the shard count must be at least 1")]
    ZeroShards,
    #[error(
        "VIEW has {nodes} members, fewer than the {} that {shards} shards of at least 2 replicas need",
        shards.saturating_mul(2)
    )]
    NotEnoughNodes { nodes: usize, shards: usize },
}

/// Parses and normalizes an `ip:port` address (`10.0.0.1:8080`, `[::1]:8080`).
pub fn parse_addr(text: &str) -> Result<String, ViewError> {
    let text = text.trim();
    text.parse::<SocketAddr>()
        .map(|a| a.to_string())
        .map_err(|_| ViewError::BadAddress(text.to_string()))
}

/// Parses a comma-separated VIEW value.
pub fn parse_view_list(text: &str) -> Result<Vec<String>, ViewError> {
    let members: Vec<String> = text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(parse_addr)
        .collect::<Result<_, _>>()?;
    if members.is_empty() {
        return Err(ViewError::Empty);
    }
    for (i, m) in members.iter().enumerate() {
        if members[..i].contains(m) {
            return Err(ViewError::Duplicate(m.clone()));
        }
    }
    Ok(members)
}

/// The cluster id of a first view: the layout and the sorted members, so nodes started
/// with the same settings agree without talking, and a K-mode cluster and a shard-count
/// cluster of the same nodes are different clusters.
fn cluster_id(layout: &str, members: &[String]) -> u64 {
    let mut sorted = members.to_vec();
    sorted.sort();
    xxh3_64(format!("kvs|{layout}|{}", sorted.join(",")).as_bytes())
}

impl View {
    /// The first view of a cluster started with `VIEW = members` and `K = k` (epoch 1).
    pub fn bootstrap(members: Vec<String>, k: usize) -> Result<View, ViewError> {
        if k == 0 {
            return Err(ViewError::ZeroK);
        }
        if members.is_empty() {
            return Err(ViewError::Empty);
        }
        if members.len() < k {
            return Err(ViewError::TooFewNodes {
                n: members.len(),
                k,
            });
        }
        let count = members.len() / k;
        let partitions: Vec<Partition> = members
            .chunks_exact(k)
            .take(count)
            .enumerate()
            .map(|(i, c)| Partition {
                uid: i as PartitionUid,
                replicas: c.to_vec(),
            })
            .collect();
        let slots = (0..SLOTS).map(|s| s % count as u32).collect();
        // Pinned: the cluster id of existing K-mode clusters is in their causal tokens.
        let cluster = cluster_id(&format!("k={k}"), &members);
        Ok(View {
            cluster,
            epoch: 1,
            layout: Layout::Replicas(k),
            members,
            partitions,
            slots,
            next_uid: count as PartitionUid,
        })
    }

    /// The first view of a cluster started with `VIEW = members` and `SHARD_COUNT =
    /// shards` (epoch 1; `shards = 1` when no node has `SHARD_COUNT`): member `j` in VIEW
    /// order goes to shard `j mod shards`, so every shard has at least two replicas and
    /// sizes differ by at most one.
    pub fn bootstrap_shards(members: Vec<String>, shards: usize) -> Result<View, ViewError> {
        if shards == 0 {
            return Err(ViewError::ZeroShards);
        }
        if members.is_empty() {
            return Err(ViewError::Empty);
        }
        // `len / 2 < shards` is `len < 2 * shards` without the multiplication.
        if members.len() / 2 < shards {
            return Err(ViewError::NotEnoughNodes {
                nodes: members.len(),
                shards,
            });
        }
        let partitions: Vec<Partition> = (0..shards)
            .map(|i| Partition {
                uid: i as PartitionUid,
                replicas: members.iter().skip(i).step_by(shards).cloned().collect(),
            })
            .collect();
        let slots = (0..SLOTS).map(|s| s % shards as u32).collect();
        let cluster = cluster_id(&format!("shards={shards}"), &members);
        Ok(View {
            cluster,
            epoch: 1,
            layout: Layout::Shards,
            members,
            partitions,
            slots,
            next_uid: shards as PartitionUid,
        })
    }

    /// K, in K mode; `None` in shard-count mode (shards have no fixed size).
    pub fn k(&self) -> Option<usize> {
        self.layout.k()
    }

    /// Checks the invariants every view must hold; views that come from peers or disk are
    /// checked before they are used.
    pub fn check(&self) -> Result<(), ViewError> {
        let bad = |m: String| Err(ViewError::Inconsistent(m));
        if self.layout == Layout::Replicas(0) {
            return Err(ViewError::ZeroK);
        }
        if self.slots.len() != SLOTS as usize {
            return bad(format!("{} slots instead of {SLOTS}", self.slots.len()));
        }
        match self.layout {
            Layout::Replicas(k) if self.partitions.len() != self.members.len() / k => {
                return bad(format!(
                    "{} partitions for {} members with K = {k}",
                    self.partitions.len(),
                    self.members.len(),
                ));
            }
            // Every slot needs an owner.
            Layout::Shards if self.partitions.is_empty() => {
                return bad("a shard-count view without a shard".into());
            }
            _ => {}
        }
        for (i, m) in self.members.iter().enumerate() {
            if self.members[..i].contains(m) {
                return Err(ViewError::Duplicate(m.clone()));
            }
        }
        let mut seen = Vec::new();
        for p in &self.partitions {
            let size_ok = match self.layout {
                Layout::Replicas(k) => p.replicas.len() == k,
                Layout::Shards => !p.replicas.is_empty(),
            };
            if !size_ok {
                return bad(format!(
                    "partition uid {} has {} replicas",
                    p.uid,
                    p.replicas.len()
                ));
            }
            if p.uid >= self.next_uid || seen.contains(&p.uid) {
                return bad(format!("partition uid {} is reused", p.uid));
            }
            seen.push(p.uid);
            for r in &p.replicas {
                if !self.is_member(r) {
                    return bad(format!("replica {r} is not a member"));
                }
                // Counted per listing, not per partition: a partition that names a
                // replica twice has fewer than K replicas, and `apply` would turn it into
                // a view with the wrong number of partitions.
                let listed: usize = self
                    .partitions
                    .iter()
                    .map(|q| q.replicas.iter().filter(|x| *x == r).count())
                    .sum();
                if listed != 1 {
                    return bad(format!("{r} is listed as a replica {listed} times"));
                }
            }
        }
        if let Some(s) = self.slots.iter().find(|uid| !seen.contains(uid)) {
            return bad(format!("a slot belongs to unknown partition uid {s}"));
        }
        Ok(())
    }

    pub fn partition_count(&self) -> usize {
        self.partitions.len()
    }

    /// The ids clients see: `0..P`.
    pub fn partition_ids(&self) -> impl Iterator<Item = u32> {
        0..self.partitions.len() as u32
    }

    /// The uid of the partition that owns `key`.
    pub fn partition_of_key(&self, key: &str) -> PartitionUid {
        self.slots[slot_of(key) as usize]
    }

    /// The uid of the partition that owns `slot`.
    pub fn owner_of_slot(&self, slot: u32) -> PartitionUid {
        self.slots[slot as usize]
    }

    /// The client-visible id (index) of partition `uid`.
    pub fn index_of(&self, uid: PartitionUid) -> Option<u32> {
        self.partitions
            .iter()
            .position(|p| p.uid == uid)
            .map(|i| i as u32)
    }

    /// The replicas of partition `uid`, or `None` when it is not in this view.
    pub fn replicas_of(&self, uid: PartitionUid) -> Option<&[String]> {
        self.partitions
            .iter()
            .find(|p| p.uid == uid)
            .map(|p| p.replicas.as_slice())
    }

    /// The replicas of the partition clients call `index`.
    pub fn replicas_at(&self, index: u32) -> Option<&[String]> {
        self.partitions
            .get(index as usize)
            .map(|p| p.replicas.as_slice())
    }

    /// The slots partition `uid` owns.
    pub fn slots_of(&self, uid: PartitionUid) -> SlotSet {
        (0..SLOTS)
            .filter(|&s| self.slots[s as usize] == uid)
            .collect()
    }

    pub fn is_member(&self, addr: &str) -> bool {
        self.members.iter().any(|m| m == addr)
    }

    /// The role of `addr`, or `None` when it is not a member.
    pub fn role_of(&self, addr: &str) -> Option<Role> {
        if let Some(p) = self
            .partitions
            .iter()
            .find(|p| p.replicas.iter().any(|r| r == addr))
        {
            return Some(Role::Replica(p.uid));
        }
        self.is_member(addr).then_some(Role::Proxy)
    }

    /// Members that are in no partition, in member order.
    pub fn proxies(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| self.role_of(m) == Some(Role::Proxy))
            .cloned()
            .collect()
    }

    /// The position of partition `uid` in [`View::partitions`] (its index, as `usize`).
    pub(super) fn position_of(&self, uid: PartitionUid) -> Option<usize> {
        self.partitions.iter().position(|p| p.uid == uid)
    }

    /// How many slots each partition owns, by position in [`View::partitions`].
    pub(super) fn slot_counts(&self) -> Vec<usize> {
        let mut count = vec![0usize; self.partitions.len()];
        let mut last: Option<(PartitionUid, usize)> = None;
        for &uid in &self.slots {
            // Slots come in runs of one owner; remember the last lookup.
            let i = match last {
                Some((u, i)) if u == uid => Some(i),
                _ => self.position_of(uid),
            };
            if let Some(i) = i {
                count[i] += 1;
                last = Some((uid, i));
            }
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn partition_counts_follow_the_seed() {
        for (n, k, parts, proxies) in [(4, 2, 2, 0), (7, 2, 3, 1), (6, 3, 2, 0), (5, 2, 2, 1)] {
            let v = View::bootstrap(addrs(n), k).expect("valid view");
            assert_eq!(v.partition_count(), parts, "N={n} K={k}");
            assert_eq!(proxy_count(&v), proxies, "N={n} K={k}");
            assert!(v.partitions.iter().all(|p| p.replicas.len() == k));
            assert!(v.check().is_ok());
        }
    }

    #[test]
    fn layout_follows_view_order() {
        let v = View::bootstrap(addrs(5), 2).expect("valid view");
        assert_eq!(v.partitions[0].replicas, addrs(5)[0..2]);
        assert_eq!(v.partitions[1].replicas, addrs(5)[2..4]);
        assert_eq!(v.role_of(&addrs(5)[4]), Some(Role::Proxy));
        assert_eq!(v.role_of("10.9.9.9:1"), None);
    }

    #[test]
    fn bad_views_are_refused() {
        assert_eq!(
            View::bootstrap(addrs(1), 2),
            Err(ViewError::TooFewNodes { n: 1, k: 2 })
        );
        assert_eq!(View::bootstrap(addrs(3), 0), Err(ViewError::ZeroK));
        assert!(matches!(
            parse_view_list("a:b"),
            Err(ViewError::BadAddress(_))
        ));
        assert!(matches!(
            parse_view_list("10.0.0.1:80,10.0.0.1:80"),
            Err(ViewError::Duplicate(_))
        ));
        assert_eq!(parse_view_list(" , "), Err(ViewError::Empty));
        assert_eq!(
            parse_view_list("10.0.0.1:80, 10.0.0.2:80"),
            Ok(vec!["10.0.0.1:80".to_string(), "10.0.0.2:80".to_string()])
        );
        let mut v = View::bootstrap(addrs(4), 2).expect("valid");
        v.slots[7] = 9;
        assert!(v.check().is_err());
    }

    /// Found by the `envelope` fuzz target: a view whose partition named one replica
    /// twice passed `check`, and removing a replica of another partition from it (the
    /// proxy taking its place) made a view with the wrong number of partitions.
    #[test]
    fn a_partition_naming_a_replica_twice_is_inconsistent() {
        let mut v = View::bootstrap(addrs(6), 2).expect("valid");
        v.partitions[2].replicas = vec![addr(6), addr(6)];
        assert!(
            matches!(v.check(), Err(ViewError::Inconsistent(m)) if m.contains("2 times")),
            "{:?}",
            v.check()
        );
    }

    #[test]
    fn ten_thousand_keys_are_balanced_within_ten_percent() {
        let keys = sample_keys(10_000);
        for (n, k) in [(4, 2), (6, 3), (7, 2), (6, 2), (8, 2)] {
            let v = View::bootstrap(addrs(n), k).expect("valid view");
            let counts = key_counts(&v, &keys);
            let max = *counts.iter().max().expect("partitions") as f64;
            let min = *counts.iter().min().expect("partitions") as f64;
            println!(
                "N={n} K={k}: keys per partition {counts:?}, max/min = {:.3}",
                max / min
            );
            assert!(max / min <= 1.1, "N={n} K={k}: {counts:?}");
        }
    }

    /// Seed 002: "say we have 7 nodes and 3 shards": shard 0 holds members 0, 3 and 6.
    #[test]
    fn shard_count_bootstrap_deals_members_round_robin() {
        let m = addrs(7);
        let v = View::bootstrap_shards(m.clone(), 3).expect("valid");
        assert_eq!(v.layout, Layout::Shards);
        assert_eq!(v.k(), None);
        assert_eq!(v.partition_count(), 3);
        assert_eq!(
            v.partitions[0].replicas,
            [&m[0], &m[3], &m[6]].map(String::clone)
        );
        assert_eq!(v.partitions[1].replicas, [&m[1], &m[4]].map(String::clone));
        assert_eq!(v.partitions[2].replicas, [&m[2], &m[5]].map(String::clone));
        assert!(v.proxies().is_empty());
        assert!(v.check().is_ok());
        assert_eq!(slot_spread(&v), 1);
        // No SHARD_COUNT anywhere: one shard of every node.
        let one = View::bootstrap_shards(addrs(3), 1).expect("valid");
        assert_eq!(one.partitions.len(), 1);
        assert_eq!(one.partitions[0].replicas, addrs(3));
        assert!(one.slots.iter().all(|&u| u == 0));
    }

    #[test]
    fn shard_count_bootstrap_refuses_too_few_nodes() {
        assert_eq!(
            View::bootstrap_shards(addrs(5), 3),
            Err(ViewError::NotEnoughNodes {
                nodes: 5,
                shards: 3
            })
        );
        assert_eq!(
            View::bootstrap_shards(addrs(1), 1),
            Err(ViewError::NotEnoughNodes {
                nodes: 1,
                shards: 1
            })
        );
        assert_eq!(
            View::bootstrap_shards(addrs(4), 0),
            Err(ViewError::ZeroShards)
        );
        assert_eq!(View::bootstrap_shards(vec![], 1), Err(ViewError::Empty));
        assert_eq!(
            View::bootstrap_shards(addrs(5), 3)
                .map_err(|e| e.to_string())
                .unwrap_err(),
            "VIEW has 5 members, fewer than the 6 that 3 shards of at least 2 replicas need"
        );
    }

    #[test]
    fn the_cluster_id_depends_on_the_layout() {
        let k = View::bootstrap(addrs(6), 3).expect("valid");
        let s = View::bootstrap_shards(addrs(6), 2).expect("valid");
        // Same members, two partitions of three each: still two different clusters.
        assert_ne!(k.cluster, s.cluster);
        assert_ne!(
            s.cluster,
            View::bootstrap_shards(addrs(6), 3).expect("valid").cluster
        );
        // The K-mode id is pinned by the tokens of running clusters.
        assert_eq!(k.cluster, {
            let mut m = addrs(6);
            m.sort();
            xxh3_64(format!("kvs|k=3|{}", m.join(",")).as_bytes())
        });
        let mut reordered = addrs(6);
        reordered.reverse();
        assert_eq!(
            View::bootstrap_shards(reordered, 2).expect("valid").cluster,
            s.cluster
        );
    }

    #[test]
    fn shard_views_are_checked() {
        let v = View::bootstrap_shards(addrs(6), 3).expect("valid");
        assert_eq!(v.k(), None);
        let mut empty = v.clone();
        empty.partitions[1].replicas.clear();
        assert!(
            matches!(empty.check(), Err(ViewError::Inconsistent(m)) if m.contains("0 replicas"))
        );
        let mut none = v.clone();
        none.partitions.clear();
        assert!(none.check().is_err());
        let mut twice = v.clone();
        twice.partitions[0]
            .replicas
            .push(v.partitions[1].replicas[0].clone());
        assert!(twice.check().is_err());
        // Uneven sizes and proxies are fine in shard-count mode.
        let mut uneven = v.clone();
        let moved = uneven.partitions[2].replicas.pop().expect("two replicas");
        uneven.partitions[0].replicas.push(moved);
        uneven.members.push(addr(50));
        assert!(uneven.check().is_ok());
        assert_eq!(uneven.role_of(&addr(50)), Some(Role::Proxy));
    }

    proptest! {
        #[test]
        fn bootstrap_is_deterministic_and_total(n in 1usize..12, k in 1usize..5) {
            let members = addrs(n);
            match View::bootstrap(members.clone(), k) {
                Ok(v) => {
                    prop_assert_eq!(&v, &View::bootstrap(members, k).expect("same input"));
                    prop_assert_eq!(v.partition_count(), n / k);
                    prop_assert!(v.check().is_ok());
                    let mut per = vec![0u32; v.partition_count()];
                    for &p in &v.slots { per[p as usize] += 1; }
                    let (lo, hi) = (per.iter().min().copied(), per.iter().max().copied());
                    prop_assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1));
                }
                Err(e) => prop_assert_eq!(e, ViewError::TooFewNodes { n, k }),
            }
        }

        #[test]
        fn every_key_has_exactly_one_partition(key in "[A-Za-z0-9_]{1,200}") {
            let v = View::bootstrap(addrs(7), 2).expect("valid view");
            let p = v.partition_of_key(&key);
            prop_assert!(v.index_of(p).is_some());
            prop_assert_eq!(p, v.partition_of_key(&key));
        }

        #[test]
        fn shard_bootstrap_is_deterministic_and_balanced(n in 1usize..20, shards in 0usize..8) {
            match View::bootstrap_shards(addrs(n), shards) {
                Ok(v) => {
                    prop_assert_eq!(&v, &View::bootstrap_shards(addrs(n), shards).expect("same"));
                    prop_assert!(v.check().is_ok());
                    prop_assert_eq!(v.partition_count(), shards);
                    prop_assert!(v.proxies().is_empty());
                    let sizes: Vec<usize> = v.partitions.iter().map(|p| p.replicas.len()).collect();
                    prop_assert!(sizes.iter().all(|&s| s >= 2));
                    prop_assert!(sizes.iter().max().zip(sizes.iter().min()).is_some_and(|(h, l)| h - l <= 1));
                    prop_assert!(slot_spread(&v) <= 1);
                }
                Err(ViewError::ZeroShards) => prop_assert_eq!(shards, 0),
                Err(e) => prop_assert_eq!(e, ViewError::NotEnoughNodes { nodes: n, shards }),
            }
        }
    }
}
