//! Dealing a member list into shards of given sizes while moving the fewest members:
//! the rule behind a reshard (`shards.rs`) and a whole-view replacement (`replace.rs`).
//!
//! # Why it is minimal
//!
//! The new view has shards of sizes `t_1 >= t_2 >= ...`. A member stays put only if it
//! is in the new member list, its old shard is kept and it is within that shard's new
//! size, so a kept shard with `s` surviving members (its replicas that are in the new
//! list) and new size `t` keeps `min(s, t)` of them, and every other member moves
//! (survivors of dissolved shards, surplus survivors, newcomers, former proxies). The
//! members kept are at most the sum of `min(s_i, t_i)` over a matching of old shards to
//! new sizes, which is largest when the shards with the most survivors are matched with
//! the largest sizes (swapping any crossed pair never lowers a sum of minima). [`deal`]
//! does exactly that, so it moves the fewest members possible. Among shards with equal
//! survivors it keeps those holding more slots, then lower indices, so fewer slots are
//! orphaned; the slots are then dealt by [`rebalance`], minimal for the shards kept.
//!
//! A kept shard may have no survivor at all (every replica replaced): it keeps its uid
//! and its slots, and its new replicas copy its data as joiners, which moves no slot.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};

use super::{rebalance, ChangeError, Partition, View};

/// Makes `next` (a copy of `view` with the epoch bumped) a view of `members` (in that
/// order) whose shards have `sizes` (largest first); members beyond the sizes' sum are
/// proxies. See the module doc of this file.
pub(super) fn deal(
    view: &View,
    next: &mut View,
    members: &[String],
    sizes: &[usize],
) -> Result<(), ChangeError> {
    debug_assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "sizes not sorted");
    debug_assert!(sizes.iter().sum::<usize>() <= members.len());
    let wanted: HashSet<&str> = members.iter().map(String::as_str).collect();
    let survivors: Vec<Vec<&String>> = view
        .partitions
        .iter()
        .map(|p| {
            p.replicas
                .iter()
                .filter(|r| wanted.contains(r.as_str()))
                .collect()
        })
        .collect();

    // Rank the shards: most survivors, then most slots, then lowest index. The first
    // `sizes.len()` are kept, and rank r gets sizes[r].
    let owned = view.slot_counts();
    let mut rank: Vec<usize> = (0..view.partitions.len()).collect();
    rank.sort_by_key(|&i| (Reverse(survivors[i].len()), Reverse(owned[i]), i));
    let kept = rank.len().min(sizes.len());
    let mut target: Vec<Option<usize>> = vec![None; view.partitions.len()];
    for (r, &i) in rank.iter().take(kept).enumerate() {
        target[i] = Some(sizes[r]);
    }

    // Members that move, in the new list's order: survivors beyond a kept shard's size
    // (its last listed), all of a dissolved shard's, and the members in no shard.
    let position: HashMap<&str, usize> = members
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let mut pool: Vec<&String> = Vec::new();
    for (s, t) in survivors.iter().zip(&target) {
        pool.extend(s.iter().skip(t.unwrap_or(0)));
    }
    let placed: HashSet<&str> = survivors.iter().flatten().map(|m| m.as_str()).collect();
    pool.extend(members.iter().filter(|m| !placed.contains(m.as_str())));
    pool.sort_by_key(|m| position.get(m.as_str()).copied().unwrap_or(usize::MAX));
    let mut pool = pool.into_iter().cloned();

    // Kept shards first, in index order, then the new ones.
    let mut partitions = view.partitions.clone();
    for ((p, s), t) in partitions.iter_mut().zip(&survivors).zip(&target) {
        if let Some(t) = *t {
            p.replicas = s.iter().take(t).map(|m| (*m).clone()).collect();
            let lack = t - p.replicas.len();
            p.replicas.extend(pool.by_ref().take(lack));
        }
    }
    // Dissolve from the highest index down, each hole taking the last shard: indices
    // below the first hole, and kept shards that are not moved into a hole, keep theirs.
    for i in (0..partitions.len()).rev() {
        if target[i].is_none() {
            partitions.swap_remove(i);
        }
    }
    for &size in &sizes[kept..] {
        let uid = next.take_uid()?;
        partitions.push(Partition {
            uid,
            replicas: pool.by_ref().take(size).collect(),
        });
    }
    // What is left of the pool is the proxies: members in no shard.
    next.members = members.to_vec();
    next.partitions = partitions;
    rebalance(&mut next.slots, &next.partitions);
    Ok(())
}
