//! Helpers shared by the placement tests. The bounds here are computed independently of
//! the code they check (`rebalance`, `Movement`), so they can serve as its oracle.

use super::*;

pub(super) fn addrs(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("10.0.0.{}:8080", 20 + i)).collect()
}

pub(super) fn addr(i: usize) -> String {
    format!("10.0.0.{}:8080", 20 + i)
}

pub(super) fn proxy_count(v: &View) -> usize {
    v.proxies().len()
}

/// Keys of the shape clients use, from a fixed generator so the figure is stable.
pub(super) fn sample_keys(n: usize) -> Vec<String> {
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

pub(super) fn key_counts(v: &View, keys: &[String]) -> Vec<usize> {
    let mut counts = vec![0usize; v.partition_count()];
    for key in keys {
        let uid = v.partition_of_key(key);
        counts[v.index_of(uid).expect("owner exists") as usize] += 1;
    }
    counts
}

/// The least number of slots any balanced table reachable from `from` must move.
pub(super) fn slot_lower_bound(from: &View, to: &View) -> usize {
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

/// The largest difference in slots owned between two partitions of `v`.
pub(super) fn slot_spread(v: &View) -> usize {
    let per: Vec<usize> = v
        .partitions
        .iter()
        .map(|p| v.slots.iter().filter(|&&u| u == p.uid).count())
        .collect();
    per.iter().max().copied().unwrap_or(0) - per.iter().min().copied().unwrap_or(0)
}

/// Keys of `keys` whose partition differs between `from` and `to`.
pub(super) fn keys_moved(from: &View, to: &View, keys: &[String]) -> usize {
    keys.iter()
        .filter(|k| from.partition_of_key(k) != to.partition_of_key(k))
        .count()
}
