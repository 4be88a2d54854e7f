//! Slot digests kept between anti-entropy rounds, and the store wrapper that says which
//! slots a write changed.
//!
//! # Why
//!
//! A digest round (`node::digests`, `crate::merkle`) needs the digest of every slot the
//! replica owns. Computed from scratch, that reads and hashes every key of the replica,
//! once per peer every few seconds: with a million keys, most of two cores. A slot's
//! digest changes only when one of its keys does, so [`DigestCache`] keeps each slot's
//! digest until a write to the slot commits, and a round rescans only those slots.
//!
//! # How it stays right
//!
//! Every change of a key's state goes through a write transaction of the store, so
//! [`TrackedStore`] wraps the node's store: its transactions note the slots they touch
//! (`put`, `delete`, `delete_slot`) and, once the commit returns (whether it succeeded
//! or not: a failed commit may have applied), forget those slots' digests and bump their
//! generation. A reopen that replays the write-ahead log (`Store::recover`) forgets
//! every digest. A round computes the digests it lacks from a read snapshot and stores
//! each only if the slot's generation is still the one it saw before the snapshot
//! opened ([`DigestCache::fill`]): a write that committed meanwhile, which the snapshot
//! may not hold, has bumped it. So a kept digest is always that of the slot's current
//! contents, as far as writes go.
//!
//! A disk can also lose or change keys without a write (the damage anti-entropy exists
//! to repair). So each snapshot also forgets the digests of the next [`REFRESH_SLOTS`]
//! slots in turn: every slot is rescanned at least once per `SLOTS / REFRESH_SLOTS`
//! snapshots (16; a node takes about two per peer per digest interval), and such damage
//! is found within a minute instead of within one round. A round still scans at most a
//! sixteenth of the replica plus the slots written since the last one.

use std::sync::{Arc, Mutex};

use super::{KeyState, LogEntry, ReadTxn, Recovery, Result, Store, WriteTxn};
use crate::clock::ReplicaId;
use crate::placement::SLOTS;

/// Slots each [`DigestCache::snapshot`] rescans whatever the cache knows of them.
pub const REFRESH_SLOTS: u32 = SLOTS / 16;

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
    /// First slot the next snapshot rescans anyway.
    refresh_at: u32,
}

/// A copy of what the cache knew at one moment: see [`DigestCache::snapshot`].
pub struct Snapshot {
    pub digests: Vec<Option<u64>>,
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

    /// What is known now, less the next [`REFRESH_SLOTS`] slots' digests. Take it
    /// before opening the snapshot the missing digests are computed from.
    pub fn snapshot(&self) -> Snapshot {
        let mut known = self.lock();
        let start = known.refresh_at;
        known.refresh_at = (start + REFRESH_SLOTS) % SLOTS;
        let mut digests = known.digests.clone();
        for slot in start..start + REFRESH_SLOTS {
            if let Some(d) = digests.get_mut((slot % SLOTS) as usize) {
                *d = None;
            }
        }
        Snapshot {
            digests,
            generations: known.generations.clone(),
        }
    }

    /// Keeps the digests computed after `seen` was taken, for the slots no write touched
    /// since.
    pub fn fill(&self, seen: &Snapshot, computed: &[(u32, u64)]) {
        let mut known = self.lock();
        for &(slot, digest) in computed {
            let s = slot as usize;
            if known.generations.get(s) == seen.generations.get(s) {
                if let Some(d) = known.digests.get_mut(s) {
                    *d = Some(digest);
                }
            }
        }
    }

    fn touch(&self, slots: &[u32]) {
        let mut guard = self.lock();
        let known = &mut *guard;
        for &slot in slots {
            let s = slot as usize;
            if let (Some(d), Some(g)) = (known.digests.get_mut(s), known.generations.get_mut(s)) {
                *d = None;
                *g += 1;
            }
        }
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
            touched: Vec::new(),
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
    /// Slots changed so far (with repeats; a batch touches few keys).
    touched: Vec<u32>,
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
        self.touched.push(slot);
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
        self.touched.push(slot);
        self.inner.delete_slot(slot, limit)
    }
    fn delete(&mut self, slot: u32, key: &str) -> Result<()> {
        self.touched.push(slot);
        self.inner.delete(slot, key)
    }
    fn log_clear(&mut self) -> Result<()> {
        self.inner.log_clear()
    }
    fn commit(self: Box<Self>) -> Result<()> {
        let TrackedWrite {
            inner,
            cache,
            mut touched,
        } = *self;
        let committed = inner.commit();
        touched.sort_unstable();
        touched.dedup();
        cache.touch(&touched);
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

    /// Digests kept by the cache are always those a full scan computes, through puts,
    /// deletes, slot deletions, failed rounds interleaved with writes, and a recovery.
    #[test]
    fn kept_digests_match_a_full_scan() {
        let cache = Arc::new(DigestCache::new());
        let store = TrackedStore::new(Arc::new(MemoryStore::new()), cache.clone());
        let mut owned = SlotSet::new();
        for slot in (0..SLOTS).step_by(7) {
            owned.insert(slot);
        }
        let check = |what: &str| {
            let seen = cache.snapshot();
            let txn = store.read().expect("read");
            let (cached, computed) =
                merkle::slot_digests_with(&*txn, &owned, &seen.digests).expect("digests");
            cache.fill(&seen, &computed);
            let full = merkle::slot_digests(&*txn, &owned).expect("digests");
            assert_eq!(cached, full, "{what}");
            computed.len()
        };
        let mut counter = 0;
        for round in 0..20u32 {
            let mut w = store.write().expect("write");
            for i in 0..50u32 {
                counter += 1;
                let slot = (round * 31 + i * 7) % SLOTS;
                w.put(slot, &format!("k{round}-{i}"), &state(counter))
                    .expect("put");
            }
            if round % 3 == 0 {
                w.delete((round * 31) % SLOTS, &format!("k{round}-0"))
                    .expect("delete");
            }
            if round % 5 == 4 {
                w.delete_slot((round * 31 + 7) % SLOTS, 1_000)
                    .expect("delete slot");
            }
            // A round's snapshot taken before this commit must not keep its digests.
            let stale = cache.snapshot();
            let before = store.read().expect("read");
            let (_, computed) =
                merkle::slot_digests_with(&*before, &owned, &stale.digests).expect("digests");
            drop(before);
            w.commit().expect("commit");
            cache.fill(&stale, &computed);
            check(&format!("round {round}"));
            // Nothing written since: only the slots due for a refresh are scanned.
            let again = check(&format!("round {round}, again"));
            assert!(again <= REFRESH_SLOTS as usize, "{again} slots scanned");
        }
        store.recover().expect("recover");
        assert_eq!(check("after a recovery"), owned.len());

        // A key changed behind the store's back (as a disk could, with no write of
        // ours) is found within one turn of the refresh.
        let mut w = store.inner.write().expect("write");
        w.put(0, "behind", &state(999_999)).expect("put");
        w.commit().expect("commit");
        let found = (0..SLOTS / REFRESH_SLOTS).any(|_| {
            let seen = cache.snapshot();
            let txn = store.read().expect("read");
            let (cached, computed) =
                merkle::slot_digests_with(&*txn, &owned, &seen.digests).expect("digests");
            cache.fill(&seen, &computed);
            cached == merkle::slot_digests(&*txn, &owned).expect("digests")
        });
        assert!(found, "slot 0 was never rescanned");
    }
}
