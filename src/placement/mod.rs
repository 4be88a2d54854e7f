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
//! **Layouts.** How members form partitions is the view's [`Layout`], chosen when the
//! cluster is created (by the environment variables present) and kept by every later
//! view. Each layout has its own first view and its own rules for each [`Change`];
//! everything after that (slot table, [`plan`], [`Movement`], the view-change protocol)
//! is shared, because it only looks at which partitions exist and who replicates them.
//!
//! *K mode* ([`Layout::Replicas`], seeds 000/001): a view of N members has
//! `floor(N/K)` partitions of exactly K replicas. The first view puts partition `i` on
//! members `i*K .. (i+1)*K` in VIEW order; the remaining `N mod K` members are proxies
//! that own no data and forward. Changes add or remove one member and keep that rule,
//! changing as little as possible (`replicas.rs`):
//!
//! * *add*: if the proxies and the newcomer now number K, they form a new partition (in
//!   member order); otherwise the newcomer is a proxy. No existing partition changes.
//! * *remove a proxy*: nothing else changes.
//! * *remove a replica*: the first proxy (member order) takes its place, so no slot
//!   moves; with no proxy the partition is dissolved, its other replicas become proxies
//!   and the last partition takes its index (one index changes, not all that follow).
//!
//! *Shard-count mode* ([`Layout::Shards`], seed 002): the partitions ("shards") are
//! counted, not sized. The first view ([`View::bootstrap_shards`]) deals member `j` (VIEW
//! order) into shard `j mod n`, so shards differ by at most one replica and each has at
//! least two (fewer members than `2n` is refused); `n = 1` is the cluster started without
//! `SHARD_COUNT`, one shard of every node. Later, shard sizes may differ and a shard may
//! shrink to one replica; members in no shard are proxies (`shards.rs`):
//!
//! * *add*: the newcomer is a proxy until it is put in a shard; nothing moves.
//! * *add to shard* (`add-member`): the node joins the named shard (and the view, if it
//!   was not a member), leaving the shard it was in if that one keeps a replica. No slot
//!   moves; the node copies the shard's data.
//! * *remove*: the node leaves its shard; a shard left empty is dissolved (the last one
//!   takes its index, as in K mode) and its slots are dealt to the others. Removing the
//!   only replica of the only shard is refused: nothing could hold the data.
//! * *reshard to n*: every member is dealt into n shards of `floor(N/n)` or `ceil(N/n)`,
//!   moving the fewest members: the n shards with the most members are kept, the larger
//!   sizes go to the largest of them, each keeps its first members up to its size, and
//!   the others (members of dissolved shards, surplus members, proxies) fill the shards
//!   below their size in member order, existing shards first, then new ones.
//!
//! *Replication-factor clusters* (seed 003) are K-mode clusters: `REPL_FACTOR` r gives
//! the same first view as `K = r` (N/r shards of r, in VIEW order). What seed 003 adds is
//! a change, not a layout: [`Change::Replace`] takes a whole new member list (and maybe a
//! new factor) at once, in either layout (`replace.rs`):
//!
//! * *replace with M' and factor r*: M' is dealt into `floor(|M'|/r)` shards of r
//!   (shard-count mode without a factor: into its current count) moving the fewest
//!   members (`deal.rs`, shared with the reshard): shards with the most members that stay
//!   are kept and keep them; a shard whose every replica left is kept too and refilled
//!   by newcomers, so its slots stay; slots move only when the shard count changes.
//!
//! **Slots.** Whenever the partition set changes, [`rebalance`] gives every partition
//! `SLOTS / P` slots or one more, choosing the targets so that the fewest slots move:
//! the partitions that hold the most keep the extra slot, only surplus slots move, and
//! slots of a dissolved partition go to those below their target. [`plan`] lists what a
//! change moves: slot ranges between partitions, members that join an existing
//! partition and need a copy of its data, and members that leave one. [`Movement`] counts
//! what a change costs against the least that change could cost.
//!
//! Every node started with the same `VIEW` and `K` (or `SHARD_COUNT`) computes the same
//! first view, including the cluster id (a hash of the layout and the sorted member
//! list), without talking to anyone; later views come from the view-change protocol
//! (`viewchange`).
//!
//! **Files.** `view.rs`: the view, its first value, invariants and queries; `layout.rs`:
//! the modes; `change.rs`: changes and their errors; `replicas.rs` and `shards.rs`: each
//! mode's rules; `replace.rs`: whole-view replacement; `deal.rs`: dealing members into
//! shards; `slots.rs`: slot sets; `plan.rs`: plans and slot dealing;
//! `movement.rs`: the cost of a change; `legacy.rs`: views written by earlier versions.
//!
//! # Caveats
//!
//! * Balance over *keys* is only as good as the hash over the key set; with SLOTS = 4096
//!   slot granularity adds at most 1/4096 of skew per partition.
//! * Minimal movement is per change. A sequence of changes moves each slot only when its
//!   own change requires it, but does not undo earlier moves (no global optimisation).
//! * A reshard minimises members moved first and slots second: among the partitions to
//!   keep, equal member counts are broken by slots held, but a partition with more
//!   members is kept even if dissolving it would move fewer slots.
//! * A member that moves to a new shard together with slots it already held pulls them
//!   again from the drained source (the protocol re-copies rather than trusting a
//!   replica that may lag its peers); [`Movement::copies`] counts those copies and
//!   [`Movement::copies_needed`] what an ideal protocol would send.
//! * Shard-count mode lets a shard shrink to one replica (after removals or moving a
//!   member away): it is then no longer fault tolerant until a member is added to it or
//!   the cluster is resharded. That is seed 002's model; the layout does not refuse it.

mod change;
mod deal;
mod layout;
mod legacy;
mod movement;
mod plan;
mod replace;
mod replicas;
mod shards;
mod slots;
mod view;

#[cfg(test)]
mod test_support;

use xxhash_rust::xxh3::xxh3_64;

pub use crate::clock::PartitionUid;
pub use change::{Change, ChangeError};
pub use layout::Layout;
pub use legacy::ViewV2;
pub use movement::Movement;
pub use plan::{plan, rebalance, Join, Move, Plan};
pub use slots::SlotSet;
pub use view::{parse_addr, parse_view_list, Partition, View, ViewError};

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
    /// A member in no partition: it owns no data and forwards (K mode's leftovers, a
    /// node added in shard-count mode before it is put in a shard).
    Proxy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_hash_is_pinned() {
        // The hash decides where data lives: changing it is a data migration.
        assert_eq!(xxh3_64(b"foo"), 0xab6e_5f64_077e_7d8a);
        assert_eq!(slot_of("foo"), (0xab6e_5f64_077e_7d8au64 % 4096) as u32);
        assert_eq!(slot_of(""), (xxh3_64(b"") % 4096) as u32);
    }
}
