//! Slot digests kept between anti-entropy rounds, and the store wrapper that says which
//! slots a write changed.
//!
//! # Why
//!
//! A digest round (`node::digests`, `crate::merkle`) needs the digest of every slot the
//! replica owns. Computed from scratch, that reads and hashes every key of the replica,
//! once per peer every few seconds: with a million keys, most of two cores. So
//! [`DigestCache`] keeps each slot's digest, and keeps it up to date as writes commit.
//!
//! # How it stays right
//!
//! A slot's digest is the wrapping sum of its keys' digests (`merkle`), so a write that
//! replaces a key's state changes it by the new state's digest less the old one's.
//! Every change of a key's state goes through a write transaction of the store, so
//! [`TrackedStore`] wraps the node's store: its transactions note, for each key they put
//! or delete in a slot whose digest is known, that difference (reading the key's state
//! before the change, from the transaction itself), and a slot whose keys they delete
//! wholesale (`delete_slot`) as unknown. Before the commit, the slots it touches get a
//! new generation; once it returned, their digests move by the differences (or become
//! unknown, if the commit failed: it may have applied) and their generation moves again.
//! A reopen that replays the write-ahead log (`Store::recover`) forgets every digest.
//!
//! A round computes the digests it lacks from a read snapshot and stores each only if
//! the slot's generation is still the one it saw before the snapshot opened
//! ([`DigestCache::fill`]): a write that committed meanwhile, which the snapshot may or
//! may not hold, has moved it. So a kept digest is always that of the slot's current
//! contents, as far as writes go, and a write costs its round nothing.
//!
//! A disk can also lose or change keys without a write (the damage anti-entropy exists
//! to repair). So each round also rescans slots whose digests are known, in turn, up to
//! [`REFRESH_KEYS`] keys ([`merkle::Refresh`]): the work is bounded whatever the data's
//! size, and such damage is found within `keys / REFRESH_KEYS` rounds. A replica takes
//! part in about two rounds per peer every `DIGEST_INTERVAL` (5 s; its own and the
//! peer's), so with two peers (K=3) it rescans about 13,000 keys a second: a minute
//! covers about 800,000 keys, 10 million take about 13 minutes (longer when two rounds
//! overlap and rescan the same slots).
//!
//! Before, a write made its slot's digest unknown and the next round rescanned the slot,
//! and each round rescanned a sixteenth of the slots besides: the cost of a round grew
//! with the data, and under writes spread over all slots every round rescanned all of
//! them. Loading 10 million keys into a 3xK3 cluster slowed from 5,700 to 2,100 keys/s
//! within 2 million (`bench/scale.sh`, BENCHMARKS.md), most of the nodes' time going to
//! rescans.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{KeyState, LogEntry, ReadTxn, Recovery, Result, Store, WriteTxn};
use crate::clock::ReplicaId;
use crate::merkle::{self, Refresh};
use crate::placement::SLOTS;

/// Keys each round rescans in slots whose digests are known (see the module doc).
pub const REFRESH_KEYS: usize = 16_384;

/// What is known of each slot's digest.
pub struct DigestCache {
    state: Mutex<Known>,
}

#[derive(Clone)]
struct Known {
    /// Per slot: its digest, if no write touched the slot since it was computed.
    digests: Vec<Option<u64>>,
    /// Per slot: bumped by every write that touches it.
    generations: Vec<u64>,
    /// First slot the next round rescans anyway.
    refresh_at: u32,
}

/// A copy of what the cache knew at one moment: see [`DigestCache::snapshot`].
pub struct Snapshot {
    pub digests: Vec<Option<u64>>,
    /// What the round should rescan besides the slots whose digests are unknown.
    pub refresh: Refresh,
    generations: Vec<u64>,
}

impl Default for DigestCache {
    fn default() -> Self {
        Self::new()
    }
}

impl DigestCache {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(Known {
                digests: vec![None; SLOTS as usize],
                generations: vec![0; SLOTS as usize],
                refresh_at: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        // Two vectors written element by element: consistent whatever panicked.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What is known now, and where the round's refresh starts. Take it before opening
    /// the snapshot the missing digests are computed from.
    pub fn snapshot(&self) -> Snapshot {
        let known = self.lock();
        Snapshot {
            digests: known.digests.clone(),
            refresh: Refresh {
                from: known.refresh_at,
                keys: REFRESH_KEYS,
            },
            generations: known.generations.clone(),
        }
    }

    /// Keeps the digests of a round that took `seen` before its snapshot opened, for the
    /// slots no write touched since, and moves the refresh on.
    pub fn fill(&self, seen: &Snapshot, found: &merkle::Digests) {
        let mut known = self.lock();
        for &(slot, digest) in &found.computed {
            let s = slot as usize;
            if known.generations.get(s) == seen.generations.get(s) {
                if let Some(d) = known.digests.get_mut(s) {
                    *d = Some(digest);
                }
            }
        }
        if let Some(next) = found.refreshed_to {
            known.refresh_at = next;
        }
    }

    /// Whether the digest of `slot` is known: only then does a write to it need the
    /// difference it makes.
    fn knows(&self, slot: u32) -> bool {
        self.lock()
            .digests
            .get(slot as usize)
            .is_some_and(Option::is_some)
    }

    /// Before a commit: the rounds that saw the slots as they were keep nothing of them.
    fn bump(&self, slots: &[u32]) {
        let mut known = self.lock();
        for &slot in slots {
            if let Some(g) = known.generations.get_mut(slot as usize) {
                *g += 1;
            }
        }
    }

    /// After a commit that succeeded: the digests move by the transaction's differences
    /// (`None`: the slot's digest is unknown now).
    fn apply(&self, changes: &[(u32, Option<u64>)]) {
        let mut guard = self.lock();
        let known = &mut *guard;
        for &(slot, delta) in changes {
            let s = slot as usize;
            if let (Some(d), Some(g)) = (known.digests.get_mut(s), known.generations.get_mut(s)) {
                *d = d.zip(delta).map(|(d, delta)| d.wrapping_add(delta));
                *g += 1;
            }
        }
    }

    fn touch(&self, slots: &[u32]) {
        let changes: Vec<(u32, Option<u64>)> = slots.iter().map(|&s| (s, None)).collect();
        self.apply(&changes);
    }

    fn touch_all(&self) {
        let all: Vec<u32> = (0..SLOTS).collect();
        self.touch(&all);
    }
}

/// The node's store, with every write's slots reported to a [`DigestCache`].
pub struct TrackedStore {
    inner: Arc<dyn Store>,
    cache: Arc<DigestCache>,
}

impl TrackedStore {
    pub fn new(inner: Arc<dyn Store>, cache: Arc<DigestCache>) -> Self {
        Self { inner, cache }
    }
}

impl Store for TrackedStore {
    fn read(&self) -> Result<Box<dyn ReadTxn + '_>> {
        self.inner.read()
    }

    fn write(&self) -> Result<Box<dyn WriteTxn + '_>> {
        Ok(Box::new(TrackedWrite {
            inner: self.inner.write()?,
            cache: &self.cache,
            changes: Vec::new(),
        }))
    }

    fn disk_fault(&self) -> Option<String> {
        self.inner.disk_fault()
    }

    fn recover(&self) -> Result<Recovery> {
        let recovered = self.inner.recover();
        // A reopen replays the write-ahead log without a transaction of ours.
        self.cache.touch_all();
        recovered
    }

    fn disk_bytes(&self) -> Option<u64> {
        self.inner.disk_bytes()
    }
}

struct TrackedWrite<'a> {
    inner: Box<dyn WriteTxn + 'a>,
    cache: &'a DigestCache,
    /// Each change so far: its slot and the difference it makes to the slot's digest
    /// (`None`: unknown). With repeats; summed at the commit.
    changes: Vec<(u32, Option<u64>)>,
}

impl TrackedWrite<'_> {
    /// Notes that `key` of `slot` is about to become `new` (`None`: deleted).
    fn note(&mut self, slot: u32, key: &str, new: Option<&KeyState>) -> Result<()> {
        let delta = if self.cache.knows(slot) {
            let old = self.inner.get(slot, key)?;
            let digest = |state: Option<&KeyState>| state.map_or(0, |s| merkle::key_digest(key, s));
            Some(digest(new).wrapping_sub(digest(old.as_ref())))
        } else {
            None
        };
        self.changes.push((slot, delta));
        Ok(())
    }
}

impl ReadTxn for TrackedWrite<'_> {
    fn get(&self, slot: u32, key: &str) -> Result<Option<KeyState>> {
        self.inner.get(slot, key)
    }
    fn log_after(&self, origin: ReplicaId, after: u64, limit: usize) -> Result<Vec<LogEntry>> {
        self.inner.log_after(origin, after, limit)
    }
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.inner.meta(name)
    }
    fn key_count(&self) -> Result<u64> {
        self.inner.key_count()
    }
    fn scan(
        &self,
        after: Option<&(u32, String)>,
        limit: usize,
    ) -> Result<Vec<(u32, String, KeyState)>> {
        self.inner.scan(after, limit)
    }
    fn scan_slot(
        &self,
        slot: u32,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, KeyState)>> {
        self.inner.scan_slot(slot, after, limit)
    }
    fn slot_is_empty(&self, slot: u32) -> Result<bool> {
        self.inner.slot_is_empty(slot)
    }
    fn dead_keys(&self, after: Option<&(u32, String)>, limit: usize) -> Result<Vec<(u32, String)>> {
        self.inner.dead_keys(after, limit)
    }
    fn dead_count(&self) -> Result<u64> {
        self.inner.dead_count()
    }
}

impl WriteTxn for TrackedWrite<'_> {
    fn put(&mut self, slot: u32, key: &str, state: &KeyState) -> Result<()> {
        self.note(slot, key, Some(state))?;
        self.inner.put(slot, key, state)
    }
    fn log_append(&mut self, entry: &LogEntry) -> Result<()> {
        self.inner.log_append(entry)
    }
    fn log_trim(&mut self, origin: ReplicaId, upto: u64) -> Result<()> {
        self.inner.log_trim(origin, upto)
    }
    fn set_meta(&mut self, name: &str, value: &[u8]) -> Result<()> {
        self.inner.set_meta(name, value)
    }
    fn delete_meta(&mut self, name: &str) -> Result<()> {
        self.inner.delete_meta(name)
    }
    fn delete_slot(&mut self, slot: u32, limit: usize) -> Result<usize> {
        self.changes.push((slot, None));
        self.inner.delete_slot(slot, limit)
    }
    fn delete(&mut self, slot: u32, key: &str) -> Result<()> {
        self.note(slot, key, None)?;
        self.inner.delete(slot, key)
    }
    fn log_clear(&mut self) -> Result<()> {
        self.inner.log_clear()
    }
    fn commit(self: Box<Self>) -> Result<()> {
        let TrackedWrite {
            inner,
            cache,
            changes,
        } = *self;
        // One difference per slot (unknown if any change to it was).
        let mut sums: BTreeMap<u32, Option<u64>> = BTreeMap::new();
        for (slot, delta) in changes {
            let sum = sums.entry(slot).or_insert(Some(0));
            *sum = sum.zip(delta).map(|(a, b)| a.wrapping_add(b));
        }
        let summed: Vec<(u32, Option<u64>)> = sums.into_iter().collect();
        let slots: Vec<u32> = summed.iter().map(|&(slot, _)| slot).collect();
        cache.bump(&slots);
        let committed = inner.commit();
        if committed.is_ok() {
            cache.apply(&summed);
        } else {
            cache.touch(&slots);
        }
        committed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Dot;
    use crate::keystate::Version;
    use crate::merkle;
    use crate::placement::SlotSet;
    use crate::storage::MemoryStore;

    fn state(counter: u64) -> KeyState {
        KeyState {
            versions: vec![Version {
                dot: Dot {
                    replica: 1,
                    counter,
                },
                vv: [(1, counter)].into_iter().collect(),
                deps: Default::default(),
                timestamp_us: 1,
                value: Some(b"v".to_vec()),
            }],
        }
    }

    /// One round as the node runs it, with a refresh of `budget` keys; returns the
    /// digests and how many slots it scanned.
    fn round(
        cache: &DigestCache,
        store: &TrackedStore,
        owned: &SlotSet,
        budget: usize,
    ) -> (Vec<u64>, usize) {
        let mut seen = cache.snapshot();
        seen.refresh.keys = budget;
        let txn = store.read().expect("read");
        let found = merkle::slot_digests_with(&*txn, owned, &seen.digests, Some(seen.refresh))
            .expect("digests");
        cache.fill(&seen, &found);
        (found.digests, found.computed.len())
    }

    /// Digests kept by the cache are always those a full scan computes, through puts,
    /// overwrites, deletes, slot deletions, rounds whose snapshots a commit overtook, and
    /// a recovery; and once known, writes cost a round no rescans.
    #[test]
    fn kept_digests_match_a_full_scan() {
        let cache = Arc::new(DigestCache::new());
        let store = TrackedStore::new(Arc::new(MemoryStore::new()), cache.clone());
        let mut owned = SlotSet::new();
        for slot in (0..SLOTS).step_by(7) {
            owned.insert(slot);
        }
        let full = || {
            let txn = store.read().expect("read");
            merkle::slot_digests(&*txn, &owned).expect("digests")
        };
        let check = |what: &str| {
            let (cached, scanned) = round(&cache, &store, &owned, 1);
            assert_eq!(cached, full(), "{what}");
            scanned
        };
        let mut counter = 0;
        for round_no in 0..20u32 {
            let mut w = store.write().expect("write");
            for i in 0..50u32 {
                counter += 1;
                // Owned slots and others; new keys, and keys written in earlier rounds.
                let slot = (round_no * 31 + i * 7) % SLOTS;
                let key = format!("k{}-{i}", round_no % 4);
                w.put(slot, &key, &state(counter)).expect("put");
                if i % 10 == 0 {
                    counter += 1;
                    w.put(slot, &key, &state(counter)).expect("overwrite");
                }
            }
            if round_no % 3 == 0 {
                w.delete((round_no * 31) % SLOTS, &format!("k{}-0", round_no % 4))
                    .expect("delete");
            }
            let wiped = (round_no % 5 == 4).then(|| (round_no * 31 + 7) % SLOTS);
            if let Some(slot) = wiped {
                w.delete_slot(slot, 1_000).expect("delete slot");
            }
            // A round's snapshot taken before this commit must not keep its digests.
            let stale = cache.snapshot();
            let before = store.read().expect("read");
            let found =
                merkle::slot_digests_with(&*before, &owned, &stale.digests, None).expect("digests");
            drop(before);
            w.commit().expect("commit");
            cache.fill(&stale, &found);
            let scanned = check(&format!("round {round_no}"));
            if round_no > 0 {
                // Only a wiped slot is unknown, and the refresh scans one slot.
                let wiped = usize::from(wiped.is_some_and(|s| owned.contains(s)));
                assert!(
                    scanned <= 1 + wiped,
                    "round {round_no}: {scanned} slots scanned"
                );
            }
        }
        store.recover().expect("recover");
        assert!(check("after a recovery") >= owned.len());

        // A key changed behind the store's back (as a disk could, with no write of
        // ours) is found once the refresh comes round to its slot.
        let mut w = store.inner.write().expect("write");
        w.put(0, "behind", &state(999_999)).expect("put");
        w.commit().expect("commit");
        assert_ne!(round(&cache, &store, &owned, 0).0, full());
        let found = (0..owned.len()).any(|_| round(&cache, &store, &owned, 1).0 == full());
        assert!(found, "slot 0 was never rescanned");
    }

    /// A round rescans about its budget of keys, whatever the data's size.
    #[test]
    fn the_refresh_reads_about_its_budget() {
        let cache = Arc::new(DigestCache::new());
        let store = TrackedStore::new(Arc::new(MemoryStore::new()), cache.clone());
        let owned: SlotSet = (0..SLOTS).collect();
        let mut w = store.write().expect("write");
        for i in 0..(4 * SLOTS) {
            w.put(i % SLOTS, &format!("k{i}"), &state(u64::from(i) + 1))
                .expect("put");
        }
        w.commit().expect("commit");
        let (_, first) = round(&cache, &store, &owned, 100);
        assert!(first >= SLOTS as usize, "every slot scanned once: {first}");
        for _ in 0..3 {
            // 4 keys per slot: 25 slots make the 100 keys.
            let (_, scanned) = round(&cache, &store, &owned, 100);
            assert_eq!(scanned, 25);
        }
    }
}
