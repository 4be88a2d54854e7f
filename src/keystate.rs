//! A key's stored state: its versions (siblings) and the merge that joins two states.
//! What storage keeps per key and what replicas write, read and exchange; pure.
//!
//! It sits below both `storage`, which stores it (and counts live keys by it), and
//! `replica`, which gives it meaning (writes, causal reads, sync), so the dependency
//! between those two points one way: `replica` uses `storage`.
//!
//! **Key state.** A key holds a set of [`Version`]s (siblings). Each version has the
//! [`Dot`] of the write that made it and `vv`, the writes of this key it supersedes. A
//! version is *dominated* when another version's `vv` contains its dot;
//! [`KeyState::merge`] takes the union and drops dominated versions.
//!
//! Two kinds of writes make versions (`replica::Supersedes`). The seed dialects' writes
//! supersede everything: their `vv` is their whole causal history inside the partition
//! and contains their own dot. The own API's writes supersede exactly what their
//! client saw: their `vv` is the key's context the client read (the join of the
//! siblings' `vv`s and dots, [`KeyState::history`]), without their own dot, as in a
//! dotted version vector; their causal history inside the partition travels in `deps`
//! under the partition's own uid. So `vv` says what a version replaces and
//! [`Version::causal_history`] what its reader must have seen, and the two coincide for
//! the seed writes. Both kinds keep every version's `vv` *closed* for its key (naming a
//! write of the key names what that write superseded), which makes domination
//! transitive and the merge below a join. That merge is commutative, associative and idempotent (property
//! tests below), so replicas that have seen the same writes hold the same state no matter
//! the order they saw them in. Concurrent writes survive as siblings; the seed dialects
//! show one deterministic winner (latest timestamp, then replica id, then counter).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::{CausalToken, Dot, PartitionUid, VersionVector};

/// One write of a key's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub dot: Dot,
    /// The writes of this key this version supersedes (see the module doc): the seed
    /// dialects' whole causal history inside the partition, `dot` included; the own
    /// API's key context, `dot` excluded.
    pub vv: VersionVector,
    /// The writer's observations of other partitions and, for the own API's writes, of
    /// its own (see [`Version::causal_history`]).
    pub deps: BTreeMap<PartitionUid, VersionVector>,
    /// Wall-clock time (µs since the Unix epoch) at the accepting replica. Stores of
    /// storage formats 2 and 3 hold milliseconds, which the store converts as it reads
    /// them ([`legacy_ms`]).
    pub timestamp_us: u64,
    /// The value written; `None` for a delete (a tombstone). Serialized as bytes, so
    /// postcard copies it in one piece instead of visiting it byte by byte (the wire and
    /// disk format is the same either way).
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

/// Timestamps written by builds before storage format 4 (and RPC protocol 8) were in
/// milliseconds. A stored value in [`FROM`](legacy_ms::FROM)..[`BELOW`](legacy_ms::BELOW)
/// is such a one: as milliseconds that is 1973 to 2286, as microseconds the first
/// 115 days of 1970, which no clock of ours ever stamped. `storage` multiplies them by
/// 1000 as it reads them, so a store of format 2 or 3 opens without rewriting every key
/// and its versions keep their place in the order of new ones. The result is at least
/// `BELOW`, so converting twice changes nothing; smaller values (tests' `1`) stay.
pub mod legacy_ms {
    /// 10^11: 1973-03-03 in milliseconds.
    pub const FROM: u64 = 100_000_000_000;
    /// 10^13: 2286-11-20 in milliseconds, 1970-04-26 in microseconds.
    pub const BELOW: u64 = 10_000_000_000_000;

    /// A stored timestamp in microseconds.
    pub fn to_us(stored: u64) -> u64 {
        if (FROM..BELOW).contains(&stored) {
            stored * 1000
        } else {
            stored
        }
    }
}

impl Version {
    /// What this write's writer had observed, itself included: its history in
    /// `partition` (the partition that holds it) and its dependencies elsewhere.
    pub fn context(&self, partition: PartitionUid) -> BTreeMap<PartitionUid, VersionVector> {
        let mut context = self.deps.clone();
        context.insert(partition, self.causal_history(partition));
        context
    }

    /// What the write had observed in `partition` (the one that holds it), itself
    /// included: `vv`, its dot and what `deps` names there.
    pub fn causal_history(&self, partition: PartitionUid) -> VersionVector {
        let mut history = self.vv.clone();
        history.raise(self.dot.replica, self.dot.counter);
        if let Some(own) = self.deps.get(&partition) {
            history.merge(own);
        }
        history
    }

    /// Whether this version is write `dot` or supersedes it.
    pub fn covers(&self, dot: Dot) -> bool {
        self.dot == dot || self.vv.contains(dot)
    }
}

/// What the own API shows of a key beyond the seed dialects' one value: the other live
/// siblings and the key's context (what a read hands back, so a later write can replace
/// exactly what it saw).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Siblings {
    /// The dot of the value the seed dialects show ([`KeyState::visible`]).
    pub winner: Option<Dot>,
    /// Every other version that holds a value, in dot order.
    pub others: Vec<Sibling>,
    /// [`KeyState::history`].
    pub context: VersionVector,
}

/// One live version, as a read shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sibling {
    pub dot: Dot,
    pub timestamp_us: u64,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// A key's sibling set: sorted by dot, no version dominated by another.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    pub versions: Vec<Version>,
}

impl KeyState {
    /// Joins `other` into `self`; returns whether `self` changed.
    pub fn merge(&mut self, other: &KeyState) -> bool {
        let before: Vec<Dot> = self.versions.iter().map(|v| v.dot).collect();
        for v in &other.versions {
            // A dot names one write, so an equal dot is an equal version.
            if !before.contains(&v.dot) {
                self.versions.push(v.clone());
            }
        }
        if self.versions.len() == before.len() {
            // Nothing new; `self` already held no dominated version.
            return false;
        }
        // `w` supersedes `v` when it saw `v` and `v` did not see it. Real histories are
        // acyclic, so mutual containment cannot happen between honest versions; if it
        // ever did (a bug, a cloned data directory reusing dots), keeping both as
        // siblings loses nothing, whereas dropping both would.
        let dominated: Vec<bool> = self
            .versions
            .iter()
            .map(|v| {
                self.versions
                    .iter()
                    .any(|w| w.dot != v.dot && w.vv.contains(v.dot) && !v.vv.contains(w.dot))
            })
            .collect();
        let mut flags = dominated.into_iter();
        self.versions.retain(|_| !flags.next().unwrap_or(false));
        self.versions.sort_by_key(|v| v.dot);
        self.versions.len() != before.len()
            || self.versions.iter().zip(&before).any(|(v, d)| v.dot != *d)
    }

    /// The version the seed dialects show: latest timestamp, ties broken by replica id
    /// and then counter, so every replica picks the same one.
    pub fn winner(&self) -> Option<&Version> {
        self.versions
            .iter()
            .max_by_key(|v| (v.timestamp_us, v.dot.replica, v.dot.counter))
    }

    /// The value clients see: the winner's, unless the winner is a tombstone.
    pub fn visible(&self) -> Option<&Version> {
        self.winner().filter(|v| v.value.is_some())
    }

    /// Whether the key exists for clients (see [`Self::visible`]).
    pub fn is_live(&self) -> bool {
        self.visible().is_some()
    }

    /// The key's context: the writes of this key that its siblings are or supersede
    /// (the join of their `vv`s and dots). A write whose `vv` is this supersedes every
    /// sibling.
    pub fn history(&self) -> VersionVector {
        let mut vv = VersionVector::new();
        for v in &self.versions {
            vv.merge(&v.vv);
            vv.raise(v.dot.replica, v.dot.counter);
        }
        vv
    }

    /// True when the write `dot` is reflected: some sibling is it or dominates it.
    pub fn covers(&self, dot: Dot) -> bool {
        self.versions.iter().any(|v| v.covers(dot))
    }

    /// The live siblings besides the winner, and the key's context.
    pub fn siblings(&self) -> Siblings {
        let winner = self.visible().map(|v| v.dot);
        Siblings {
            winner,
            others: self
                .live()
                .filter(|v| Some(v.dot) != winner)
                .filter_map(|v| {
                    Some(Sibling {
                        dot: v.dot,
                        timestamp_us: v.timestamp_us,
                        value: v.value.clone()?,
                    })
                })
                .collect(),
            context: self.history(),
        }
    }

    /// Whether any sibling holds a value (what the own API calls existing; the seed
    /// dialects look at the winner, [`Self::is_live`]).
    pub fn has_value(&self) -> bool {
        self.live().next().is_some()
    }

    /// The siblings that hold a value (not tombstones).
    pub fn live(&self) -> impl Iterator<Item = &Version> {
        self.versions.iter().filter(|v| v.value.is_some())
    }

    /// Roughly how many bytes this state takes on the wire, histories included; what sync
    /// pages count against their byte bound.
    pub fn approx_size(&self) -> usize {
        const ENTRY: usize = 20; // a varint replica id and counter, generously
        self.versions
            .iter()
            .map(|v| {
                let deps: usize = v.deps.values().map(|vv| 8 + vv.len() * ENTRY).sum();
                32 + v.value.as_ref().map_or(0, Vec::len) + v.vv.len() * ENTRY + deps
            })
            .sum()
    }

    /// Adds what a reader of this state has observed to `token`.
    pub fn observe_into(&self, partition: PartitionUid, token: &mut CausalToken) {
        for v in &self.versions {
            token.observe(partition, &v.vv);
            token.observe_dot(partition, v.dot);
            for (&p, vv) in &v.deps {
                token.observe(p, vv);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::Rng;
    use proptest::prelude::*;

    /// Stores of formats 2 and 3 hold millisecond timestamps: read back, they are
    /// microseconds, and order before a write made a millisecond later.
    #[test]
    fn millisecond_timestamps_of_older_stores_read_as_microseconds() {
        let old = legacy_ms::to_us(1_796_284_522_123);
        assert_eq!(old, 1_796_284_522_123_000);
        assert_eq!(
            legacy_ms::to_us(old),
            old,
            "converting twice changes nothing"
        );
        for small in [0, 1, legacy_ms::FROM - 1] {
            assert_eq!(legacy_ms::to_us(small), small);
        }
        // A write 400 µs after the old one, at another replica, wins over it.
        let state = KeyState {
            versions: vec![
                version(2, 1, &[], 1_796_284_522_123_400),
                version(3, 1, &[], old),
            ],
        };
        assert_eq!(state.winner().map(|v| v.dot.replica), Some(2));
    }

    /// Values are serialized as bytes; the records must stay byte-for-byte what the
    /// derived sequence encoding wrote, or stores and peers of older builds are misread.
    #[test]
    fn values_encode_as_the_derived_sequence_did() {
        #[derive(Serialize)]
        struct Derived {
            dot: Dot,
            vv: VersionVector,
            deps: BTreeMap<PartitionUid, VersionVector>,
            timestamp_us: u64,
            value: Option<Vec<u8>>,
        }
        for value in [None, Some(vec![]), Some((0..=255u8).collect::<Vec<u8>>())] {
            let v = Version {
                dot: Dot {
                    replica: 7,
                    counter: 300,
                },
                vv: [(7, 300)].into_iter().collect(),
                deps: [(2, [(1, 5)].into_iter().collect())].into_iter().collect(),
                timestamp_us: 1_700_000_000_000_000,
                value: value.clone(),
            };
            let old = Derived {
                dot: v.dot,
                vv: v.vv.clone(),
                deps: v.deps.clone(),
                timestamp_us: v.timestamp_us,
                value,
            };
            let bytes = postcard::to_stdvec(&v).expect("encode");
            assert_eq!(bytes, postcard::to_stdvec(&old).expect("encode"));
            assert_eq!(postcard::from_bytes::<Version>(&bytes).expect("decode"), v);
        }
    }

    pub(crate) fn version(replica: u64, counter: u64, history: &[(u64, u64)], ts: u64) -> Version {
        let mut vv: VersionVector = history.iter().copied().collect();
        vv.raise(replica, counter);
        Version {
            dot: Dot { replica, counter },
            vv,
            deps: BTreeMap::new(),
            timestamp_us: ts,
            value: Some(format!("{replica}.{counter}").into_bytes()),
        }
    }

    /// A universe of versions made the way real ones are: three replicas that write
    /// (history = what they know, plus the new dot) and learn from each other (merge), so
    /// histories are downward closed and acyclic. Same seed, same universe.
    fn universe(seed: u64) -> Vec<Version> {
        let mut rng = Rng(seed | 1);
        let mut know = vec![VersionVector::new(); 3];
        let mut out = Vec::new();
        for _ in 0..12 {
            let r = rng.next(3) as usize;
            if rng.next(3) == 0 {
                let from = rng.next(3) as usize;
                let theirs = know[from].clone();
                know[r].merge(&theirs);
            }
            let counter = know[r].get(r as u64) + 1;
            know[r].raise(r as u64, counter);
            let hist: Vec<(u64, u64)> = know[r].iter().collect();
            out.push(version(r as u64, counter, &hist, rng.next(4)));
        }
        out
    }

    /// Like [`universe`], with the own API's writes mixed in: a write either supersedes
    /// everything its replica holds (the seeds) or exactly the context of a state some
    /// replica held (possibly stale, possibly empty), its own dot kept apart.
    fn mixed_universe(seed: u64) -> Vec<Version> {
        let mut rng = Rng(seed | 1);
        let mut know = vec![VersionVector::new(); 3];
        let mut held = vec![KeyState::default(); 3];
        let mut out = Vec::new();
        for _ in 0..12 {
            let r = rng.next(3) as usize;
            if rng.next(3) == 0 {
                let from = rng.next(3) as usize;
                let (theirs, state) = (know[from].clone(), held[from].clone());
                know[r].merge(&theirs);
                held[r].merge(&state);
            }
            let counter = know[r].get(r as u64) + 1;
            know[r].raise(r as u64, counter);
            let mut v = version(r as u64, counter, &[], rng.next(4));
            v.vv = match rng.next(3) {
                0 => {
                    let mut all = held[r].history();
                    all.merge(&know[r]);
                    all
                }
                1 => held[rng.next(3) as usize].history(),
                _ => VersionVector::new(),
            };
            held[r].merge(&KeyState {
                versions: vec![v.clone()],
            });
            out.push(v);
        }
        out
    }

    fn pick(universe: &[Version], which: &[usize]) -> KeyState {
        let mut s = KeyState::default();
        for &i in which {
            s.merge(&KeyState {
                versions: vec![universe[i % universe.len()].clone()],
            });
        }
        s
    }

    fn states() -> impl Strategy<Value = (KeyState, KeyState, KeyState)> {
        let subset = || prop::collection::vec(0usize..12, 0..5);
        (any::<u64>(), any::<bool>(), subset(), subset(), subset()).prop_map(
            |(seed, mixed, a, b, c)| {
                let u = if mixed {
                    mixed_universe(seed)
                } else {
                    universe(seed)
                };
                (pick(&u, &a), pick(&u, &b), pick(&u, &c))
            },
        )
    }

    proptest! {
        #[test]
        fn merge_is_commutative((a, b, _c) in states()) {
            let mut ab = a.clone(); ab.merge(&b);
            let mut ba = b.clone(); ba.merge(&a);
            prop_assert_eq!(ab, ba);
        }

        #[test]
        fn merge_is_associative((a, b, c) in states()) {
            let mut left = a.clone(); left.merge(&b); left.merge(&c);
            let mut bc = b.clone(); bc.merge(&c);
            let mut right = a.clone(); right.merge(&bc);
            prop_assert_eq!(left, right);
        }

        #[test]
        fn merge_is_idempotent((a, b, _c) in states()) {
            let mut aa = a.clone();
            prop_assert!(!aa.merge(&a));
            prop_assert_eq!(&aa, &a);
            let mut ab = a.clone(); ab.merge(&b);
            let again = ab.clone();
            prop_assert!(!ab.merge(&b));
            prop_assert_eq!(ab, again);
        }

        #[test]
        fn merge_keeps_no_dominated_version((a, b, _c) in states()) {
            let mut ab = a.clone(); ab.merge(&b);
            for v in &ab.versions {
                for w in &ab.versions {
                    prop_assert!(v.dot == w.dot || !w.covers(v.dot));
                }
            }
            // Nothing is lost: every input write is covered by the result.
            for v in a.versions.iter().chain(&b.versions) {
                prop_assert!(ab.covers(v.dot));
            }
        }
    }

    #[test]
    fn concurrent_writes_are_siblings_and_the_winner_is_deterministic() {
        let a = KeyState {
            versions: vec![version(1, 1, &[], 10)],
        };
        let b = KeyState {
            versions: vec![version(2, 1, &[], 10)],
        };
        let mut ab = a.clone();
        assert!(ab.merge(&b));
        assert_eq!(ab.versions.len(), 2);
        // Same timestamp: the higher replica id wins.
        assert_eq!(ab.winner().map(|v| v.dot.replica), Some(2));
        // A later write that saw both supersedes both.
        let c = KeyState {
            versions: vec![version(1, 2, &[(1, 1), (2, 1)], 5)],
        };
        assert!(ab.merge(&c));
        assert_eq!(ab.versions, c.versions);
    }

    #[test]
    fn mutually_containing_versions_are_kept_as_siblings() {
        let a = KeyState {
            versions: vec![version(1, 1, &[(1, 2)], 1)],
        };
        let b = KeyState {
            versions: vec![version(1, 2, &[(1, 1)], 2)],
        };
        let mut ab = a.clone();
        ab.merge(&b);
        assert_eq!(ab.versions.len(), 2);
    }
}
