//! Placement: key → slot → partition → replicas. Pure and deterministic.
//!
//! # Design
//!
//! A key's slot is `xxh3_64(key) mod SLOTS`. The hash is part of the data layout (a
//! different hash would put keys in different partitions), so its values are pinned in a
//! test. The [`View`] maps every slot to a partition through an explicit slot table rather
//! than `slot mod P`: a later view can then move just the slots that must move (Redis
//! Cluster and Garage do the same), and the table is persisted with the view.
//!
//! In K mode (seeds 000/001) a view of N members has `floor(N/K)` partitions; partition
//! `i` is members `i*K .. (i+1)*K` in VIEW order and the remaining `N mod K` members are
//! proxies that own no data and forward. The first slot table deals slots round-robin
//! (`slot mod P`), so partitions differ by at most one slot (4096 slots: 1366 vs 1365
//! for P = 3).
//!
//! Every node started with the same `VIEW` and `K` computes the same view, including the
//! cluster id (a hash of K and the sorted member list), without talking to anyone.
//!
//! # Caveats
//!
//! * Balance over *keys* is only as good as the hash over the key set; with SLOTS = 4096
//!   slot granularity adds at most 1/4096 of skew per partition.
//! * Partition ids are positions in the view; view changes (their own issue) keep ids
//!   stable where membership allows.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::clock::PartitionId;

/// Number of hash slots. Fixed for the life of a cluster: it is part of the data layout.
pub const SLOTS: u32 = 4096;

/// The slot a key lives in.
pub fn slot_of(key: &str) -> u32 {
    (xxh3_64(key.as_bytes()) % u64::from(SLOTS)) as u32
}

/// A node's role in a view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Replica(PartitionId),
    Proxy,
}

/// The cluster configuration every node agrees on. See the module doc.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// Identity of the cluster; stamped into causal tokens.
    pub cluster: u64,
    /// Bumped by every view change; every internal message carries it.
    pub epoch: u64,
    /// Replicas per partition.
    pub k: usize,
    /// All members, in VIEW order.
    pub members: Vec<String>,
    /// `partitions[p]` lists the replicas of partition `p`.
    pub partitions: Vec<Vec<String>>,
    /// `slots[s]` is the partition that owns slot `s`; `len() == SLOTS`.
    pub slots: Vec<PartitionId>,
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
        let partitions: Vec<Vec<String>> = members
            .chunks_exact(k)
            .take(count)
            .map(|c| c.to_vec())
            .collect();
        let slots = (0..SLOTS).map(|s| s % count as u32).collect();
        let mut sorted = members.clone();
        sorted.sort();
        let cluster = xxh3_64(format!("kvs|k={k}|{}", sorted.join(",")).as_bytes());
        Ok(View {
            cluster,
            epoch: 1,
            k,
            members,
            partitions,
            slots,
        })
    }

    pub fn partition_count(&self) -> usize {
        self.partitions.len()
    }

    pub fn partition_ids(&self) -> impl Iterator<Item = PartitionId> {
        0..self.partitions.len() as PartitionId
    }

    pub fn partition_of_key(&self, key: &str) -> PartitionId {
        self.slots[slot_of(key) as usize]
    }

    /// The replicas of partition `p`, or `None` for an unknown id.
    pub fn replicas(&self, p: PartitionId) -> Option<&[String]> {
        self.partitions.get(p as usize).map(Vec::as_slice)
    }

    pub fn is_member(&self, addr: &str) -> bool {
        self.members.iter().any(|m| m == addr)
    }

    /// The role of `addr`, or `None` when it is not a member.
    pub fn role_of(&self, addr: &str) -> Option<Role> {
        if let Some(p) = self
            .partitions
            .iter()
            .position(|reps| reps.iter().any(|r| r == addr))
        {
            return Some(Role::Replica(p as PartitionId));
        }
        self.is_member(addr).then_some(Role::Proxy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addrs(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("10.0.0.{}:8080", 20 + i)).collect()
    }

    #[test]
    fn slot_hash_is_pinned() {
        // The hash decides where data lives: changing it is a data migration.
        assert_eq!(xxh3_64(b"foo"), 0xab6e_5f64_077e_7d8a);
        assert_eq!(slot_of("foo"), (0xab6e_5f64_077e_7d8au64 % 4096) as u32);
        assert_eq!(slot_of(""), (xxh3_64(b"") % 4096) as u32);
    }

    #[test]
    fn partition_counts_follow_the_seed() {
        for (n, k, parts, proxies) in [(4, 2, 2, 0), (7, 2, 3, 1), (6, 3, 2, 0), (5, 2, 2, 1)] {
            let v = View::bootstrap(addrs(n), k).expect("valid view");
            assert_eq!(v.partition_count(), parts, "N={n} K={k}");
            let proxy_count = v
                .members
                .iter()
                .filter(|m| v.role_of(m) == Some(Role::Proxy))
                .count();
            assert_eq!(proxy_count, proxies, "N={n} K={k}");
            assert!(v.partitions.iter().all(|p| p.len() == k));
        }
    }

    #[test]
    fn layout_follows_view_order() {
        let v = View::bootstrap(addrs(5), 2).expect("valid view");
        assert_eq!(v.partitions[0], addrs(5)[0..2]);
        assert_eq!(v.partitions[1], addrs(5)[2..4]);
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
    }

    /// Keys of the shape clients use, from a fixed generator so the figure is stable.
    fn sample_keys(n: usize) -> Vec<String> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                format!("key_{x:016x}")
            })
            .collect()
    }

    #[test]
    fn ten_thousand_keys_are_balanced_within_ten_percent() {
        for (n, k) in [(4, 2), (6, 3), (7, 2), (6, 2), (8, 2)] {
            let v = View::bootstrap(addrs(n), k).expect("valid view");
            let mut counts = vec![0usize; v.partition_count()];
            for key in sample_keys(10_000) {
                counts[v.partition_of_key(&key) as usize] += 1;
            }
            let max = *counts.iter().max().expect("partitions") as f64;
            let min = *counts.iter().min().expect("partitions") as f64;
            println!(
                "N={n} K={k}: keys per partition {counts:?}, max/min = {:.3}",
                max / min
            );
            assert!(max / min <= 1.1, "N={n} K={k}: {counts:?}");
        }
    }

    proptest! {
        #[test]
        fn bootstrap_is_deterministic_and_total(n in 1usize..12, k in 1usize..5) {
            let members = addrs(n);
            match View::bootstrap(members.clone(), k) {
                Ok(v) => {
                    prop_assert_eq!(&v, &View::bootstrap(members, k).expect("same input"));
                    prop_assert_eq!(v.partition_count(), n / k);
                    prop_assert_eq!(v.slots.len(), SLOTS as usize);
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
            prop_assert!((p as usize) < v.partition_count());
            prop_assert_eq!(p, v.partition_of_key(&key));
        }
    }
}
