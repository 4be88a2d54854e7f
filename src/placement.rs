//! Placement: key → slot → partition → replicas, and how a view change moves them.
//! Pure and deterministic.
//!
//! # Design
//!
//! A key's slot is `xxh3_64(key) mod SLOTS`. The hash is part of the data layout (a
//! different hash would put keys in different partitions), so its values are pinned in a
//! test. The [`View`] maps every slot to a partition through an explicit slot table rather
//! than `slot mod P`, so a view change moves just the slots that must move (Redis Cluster
//! and Garage do the same); the table is persisted with the view.
//!
//! **Two names for a partition.** Clients see a partition's *index*: its position in
//! [`View::partitions`], always `0..P` (the seeds list ids that way). Everything inside the
//! store, the slot table, causal tokens, replica state, names it by its *uid*
//! ([`PartitionUid`]), drawn from a counter when the partition is created and never
//! reused. Indices can shift when a partition is dissolved; uids never do, so a token or
//! a version that names uid 3 means the same replica group in every later view.
//!
//! In K mode (seeds 000/001) a view of N members has `floor(N/K)` partitions. The first
//! view puts partition `i` on members `i*K .. (i+1)*K` in VIEW order; the remaining
//! `N mod K` members are proxies that own no data and forward. Its slot table deals slots
//! round-robin, so partitions differ by at most one slot (1366 vs 1365 for P = 3).
//!
//! **View changes** ([`View::apply`]) add or remove one member and keep K mode's rule,
//! changing as little as possible:
//!
//! * *add*: if the proxies and the newcomer now number K, they form a new partition (in
//!   member order); otherwise the newcomer is a proxy. No existing partition changes.
//! * *remove a proxy*: nothing else changes.
//! * *remove a replica*: the first proxy (member order) takes its place, so no slot
//!   moves; with no proxy the partition is dissolved, its other replicas become proxies
//!   and the last partition takes its index (one index changes, not all that follow).
//!
//! Whenever the partition set changes, [`rebalance`] gives every partition
//! `SLOTS / P` slots or one more, choosing the targets so that the fewest slots move:
//! the partitions that hold the most keep the extra slot, only surplus slots move, and
//! slots of a dissolved partition go to those below their target. [`plan`] lists what a
//! change moves: slot ranges between partitions and members that join an existing
//! partition and need a copy of its data.
//!
//! Every node started with the same `VIEW` and `K` computes the same first view,
//! including the cluster id (a hash of K and the sorted member list), without talking to
//! anyone; later views come from the view-change protocol (`viewchange`).
//!
//! # Caveats
//!
//! * Balance over *keys* is only as good as the hash over the key set; with SLOTS = 4096
//!   slot granularity adds at most 1/4096 of skew per partition.
//! * Minimal movement is per change. A sequence of changes moves each slot only when its
//!   own change requires it, but does not undo earlier moves (no global optimisation).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

pub use crate::clock::PartitionUid;

/// Number of hash slots. Fixed for the life of a cluster: it is part of the data layout.
pub const SLOTS: u32 = 4096;

/// The slot a key lives in.
pub fn slot_of(key: &str) -> u32 {
    (xxh3_64(key.as_bytes()) % u64::from(SLOTS)) as u32
}

/// A node's role in a view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Replica of the partition with this uid.
    Replica(PartitionUid),
    Proxy,
}

/// One partition: a stable uid and its K replicas.
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
    /// Replicas per partition.
    pub k: usize,
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
}

/// One membership change, as `update_view` asks for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Add(String),
    Remove(String),
}

impl Change {
    /// The address the change is about.
    pub fn addr(&self) -> &str {
        match self {
            Change::Add(a) | Change::Remove(a) => a,
        }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Add(a) => write!(f, "add {a}"),
            Change::Remove(a) => write!(f, "remove {a}"),
        }
    }
}

/// Why a change cannot be applied to a view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("{0} is already in the view")]
    AlreadyMember(String),
    #[error("{0} is not in the view")]
    NotMember(String),
    #[error(
        "removing {addr} would leave {n} nodes, fewer than K = {k}: no partition could hold the data"
    )]
    TooFewNodes { addr: String, n: usize, k: usize },
    /// The view's epoch or partition-uid counter is at its maximum (no real cluster gets
    /// there; a view from a broken peer or disk may say so).
    #[error("the view's {0} counter is at its maximum: no view can follow it")]
    Exhausted(&'static str),
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

/// A set of slots, as a bitmap (512 bytes for 4096 slots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotSet {
    words: Vec<u64>,
}

impl Default for SlotSet {
    fn default() -> Self {
        Self::new()
    }
}

impl SlotSet {
    pub fn new() -> Self {
        Self {
            words: vec![0; (SLOTS / 64) as usize],
        }
    }

    pub fn insert(&mut self, slot: u32) {
        if let Some(w) = self.words.get_mut((slot / 64) as usize) {
            *w |= 1 << (slot % 64);
        }
    }

    pub fn contains(&self, slot: u32) -> bool {
        self.words
            .get((slot / 64) as usize)
            .is_some_and(|w| w & (1 << (slot % 64)) != 0)
    }

    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Slots in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..SLOTS).filter(|&s| self.contains(s))
    }

    /// The first slot of the set at or after `from`.
    pub fn next_from(&self, from: u32) -> Option<u32> {
        (from..SLOTS).find(|&s| self.contains(s))
    }

    pub fn union(&mut self, other: &SlotSet) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
    }

    pub fn intersect(&mut self, other: &SlotSet) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w &= o;
        }
    }
}

impl FromIterator<u32> for SlotSet {
    fn from_iter<T: IntoIterator<Item = u32>>(iter: T) -> Self {
        let mut set = SlotSet::new();
        for s in iter {
            set.insert(s);
        }
        set
    }
}

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
    /// Members joining partitions that exist in both views.
    pub joins: Vec<Join>,
    /// Replicas of the old view that are not replicas of the same partition in the new
    /// one (removed, or demoted to proxy): their writes must be drained first.
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
            next_uid: count as PartitionUid,
        })
    }

    /// Checks the invariants every view must hold; views that come from peers or disk are
    /// checked before they are used.
    pub fn check(&self) -> Result<(), ViewError> {
        let bad = |m: String| Err(ViewError::Inconsistent(m));
        if self.k == 0 {
            return Err(ViewError::ZeroK);
        }
        if self.slots.len() != SLOTS as usize {
            return bad(format!("{} slots instead of {SLOTS}", self.slots.len()));
        }
        if self.partitions.len() != self.members.len() / self.k {
            return bad(format!(
                "{} partitions for {} members with K = {}",
                self.partitions.len(),
                self.members.len(),
                self.k
            ));
        }
        for (i, m) in self.members.iter().enumerate() {
            if self.members[..i].contains(m) {
                return Err(ViewError::Duplicate(m.clone()));
            }
        }
        let mut seen = Vec::new();
        for p in &self.partitions {
            if p.replicas.len() != self.k {
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

    /// The view that follows this one after `change` (epoch + 1). See the module doc.
    pub fn apply(&self, change: &Change) -> Result<View, ChangeError> {
        let mut next = self.clone();
        // Checked: a view from a peer or the disk may carry any counter (`check` does
        // not bound them), and an overflow would panic where overflow checks are on.
        next.epoch = self
            .epoch
            .checked_add(1)
            .ok_or(ChangeError::Exhausted("epoch"))?;
        match change {
            Change::Add(addr) => {
                if self.is_member(addr) {
                    return Err(ChangeError::AlreadyMember(addr.clone()));
                }
                next.members.push(addr.clone());
                let proxies = next.proxies();
                if proxies.len() >= next.k {
                    next.partitions.push(Partition {
                        uid: next.next_uid,
                        replicas: proxies[..next.k].to_vec(),
                    });
                    next.next_uid = next
                        .next_uid
                        .checked_add(1)
                        .ok_or(ChangeError::Exhausted("partition uid"))?;
                    rebalance(&mut next.slots, &next.partitions);
                }
            }
            Change::Remove(addr) => {
                if !self.is_member(addr) {
                    return Err(ChangeError::NotMember(addr.clone()));
                }
                let n = self.members.len() - 1;
                if n < self.k {
                    return Err(ChangeError::TooFewNodes {
                        addr: addr.clone(),
                        n,
                        k: self.k,
                    });
                }
                let proxies = self.proxies();
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
        }
        debug_assert!(next.check().is_ok(), "apply broke a view invariant");
        Ok(next)
    }
}

/// The view layout written by kvs before view changes existed (partition index = uid).
/// Data directories of that version are migrated on start.
#[derive(Serialize, Deserialize)]
struct LegacyView {
    cluster: u64,
    epoch: u64,
    k: usize,
    members: Vec<String>,
    partitions: Vec<Vec<String>>,
    slots: Vec<u32>,
}

impl View {
    /// Decodes a view persisted by the first version of kvs.
    pub fn from_legacy_bytes(bytes: &[u8]) -> Result<View, ViewError> {
        let old: LegacyView = postcard::from_bytes(bytes)
            .map_err(|e| ViewError::Inconsistent(format!("undecodable legacy view: {e}")))?;
        let view = View {
            cluster: old.cluster,
            epoch: old.epoch,
            k: old.k,
            members: old.members,
            next_uid: old.partitions.len() as PartitionUid,
            partitions: old
                .partitions
                .into_iter()
                .enumerate()
                .map(|(i, replicas)| Partition {
                    uid: i as PartitionUid,
                    replicas,
                })
                .collect(),
            slots: old.slots,
        };
        view.check()?;
        Ok(view)
    }

    /// This view in the first version's layout (for migration tests). Only views whose
    /// uids are their indices can be written that way.
    #[cfg(test)]
    pub(crate) fn legacy_bytes(&self) -> Vec<u8> {
        let old = LegacyView {
            cluster: self.cluster,
            epoch: self.epoch,
            k: self.k,
            members: self.members.clone(),
            partitions: self.partitions.iter().map(|p| p.replicas.clone()).collect(),
            slots: self.slots.clone(),
        };
        postcard::to_stdvec(&old).expect("view serialization is infallible")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addrs(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("10.0.0.{}:8080", 20 + i)).collect()
    }

    fn addr(i: usize) -> String {
        format!("10.0.0.{}:8080", 20 + i)
    }

    #[test]
    fn slot_hash_is_pinned() {
        // The hash decides where data lives: changing it is a data migration.
        assert_eq!(xxh3_64(b"foo"), 0xab6e_5f64_077e_7d8a);
        assert_eq!(slot_of("foo"), (0xab6e_5f64_077e_7d8au64 % 4096) as u32);
        assert_eq!(slot_of(""), (xxh3_64(b"") % 4096) as u32);
    }

    fn proxy_count(v: &View) -> usize {
        v.proxies().len()
    }

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
    fn legacy_views_are_migrated() {
        let v = View::bootstrap(addrs(5), 2).expect("valid");
        assert_eq!(View::from_legacy_bytes(&v.legacy_bytes()), Ok(v));
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

    fn key_counts(v: &View, keys: &[String]) -> Vec<usize> {
        let mut counts = vec![0usize; v.partition_count()];
        for key in keys {
            let uid = v.partition_of_key(key);
            counts[v.index_of(uid).expect("owner exists") as usize] += 1;
        }
        counts
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

    /// The least number of slots any balanced table reachable from `from` must move.
    fn slot_lower_bound(from: &View, to: &View) -> usize {
        let p = to.partition_count();
        let mut counts: Vec<usize> = to
            .partitions
            .iter()
            .map(|q| from.slots.iter().filter(|&&u| u == q.uid).count())
            .collect();
        let orphans = SLOTS as usize - counts.iter().sum::<usize>();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let (base, extra) = (SLOTS as usize / p, SLOTS as usize % p);
        orphans
            + counts
                .iter()
                .enumerate()
                .map(|(i, &c)| c.saturating_sub(base + usize::from(i < extra)))
                .sum::<usize>()
    }

    fn changes() -> impl Strategy<Value = Vec<(bool, usize)>> {
        prop::collection::vec((any::<bool>(), 0usize..64), 1..12)
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
