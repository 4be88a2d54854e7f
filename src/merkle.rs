//! Digests of a replica's state over slots: the comparison half of state-based
//! anti-entropy (the exchange half is `node::sync`'s digest rounds).
//!
//! # Design
//!
//! Log-based sync (`replica`) ships what a peer's `applied` vector lacks. It cannot see a
//! difference no vector names: versions a page shipped beyond its claim whose origin then
//! lost its disk, a key damaged or lost by a storage fault, a bug. So the replicas of a
//! partition also compare their *states*, cheaply, in a two-level tree:
//!
//! * A key's digest hashes its name and the dots of its versions. A dot names one write
//!   (with its value and history), and merged states drop superseded versions, so two
//!   replicas hold the same state for a key exactly when they hold the same dots.
//! * A slot's digest is the wrapping sum of its keys' digests (order-free, so a slot is
//!   hashed in one pass in any order); a bucket's digest ([`BUCKET_SLOTS`] slots) hashes
//!   its slots' digests with their numbers. The partition's tree is 64 bucket digests.
//!
//! A round: the asker sends its bucket digests (512 bytes), the peer answers its slot
//! digests for the buckets that differ, the asker fetches the peer's keys of the slots
//! that differ and merges them. Merging only adds (a state's merge keeps a version or its
//! superseder), so after both replicas ran a round against each other they hold the same
//! state whatever caused the difference. Replicas that agree exchange the bucket
//! digests and an empty answer.
//!
//! # Caveats
//!
//! * Hashed from scratch, a round would read every key of the partition on both sides;
//!   the node keeps slot digests up to date as writes commit and rescans a bounded
//!   number of keys per round instead (`storage::digest_cache`).
//! * A collision of 64-bit digests hides a difference from this round only until the
//!   next write to that slot changes its digest.

use xxhash_rust::xxh3::Xxh3;

use crate::keystate::KeyState;
use crate::placement::{SlotSet, SLOTS};
use crate::storage::{ReadTxn, Result};

/// Slots per bucket: 64 buckets of 64 slots.
pub const BUCKET_SLOTS: u32 = 64;
/// Buckets in a partition's tree.
pub const BUCKETS: usize = (SLOTS / BUCKET_SLOTS) as usize;
/// Keys read from storage per chunk while hashing a slot: memory stays flat.
const SCAN_CHUNK: usize = 256;

/// The digest of one key's state (see the module doc).
pub fn key_digest(key: &str, state: &KeyState) -> u64 {
    let mut dots: Vec<_> = state.versions.iter().map(|v| v.dot).collect();
    dots.sort_unstable();
    let mut h = Xxh3::new();
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key.as_bytes());
    for d in dots {
        h.update(&d.replica.to_le_bytes());
        h.update(&d.counter.to_le_bytes());
    }
    h.digest()
}

/// The digests of every slot (index = slot); slots outside `owned` and empty slots are 0.
pub fn slot_digests(txn: &dyn ReadTxn, owned: &SlotSet) -> Result<Vec<u64>> {
    Ok(slot_digests_with(txn, owned, &[], None)?.digests)
}

/// Digests [`slot_digests_with`] computed, as `(slot, digest)`.
pub type Computed = Vec<(u32, u64)>;

/// A rescan of slots whose digests are known, to find damage no write caused: owned
/// slots from `from` on (wrapping), until `keys` keys were read (at least one slot).
#[derive(Debug, Clone, Copy)]
pub struct Refresh {
    pub from: u32,
    pub keys: usize,
}

/// What [`slot_digests_with`] found: every slot's digest, those it computed, and the
/// slot after the last one its refresh rescanned (where the next should start).
pub struct Digests {
    pub digests: Vec<u64>,
    pub computed: Computed,
    pub refreshed_to: Option<u32>,
}

/// Like [`slot_digests`], taking the digest of slot `s` from `known[s]` where it is
/// `Some` (a digest kept since it was computed: `storage::digest_cache`) and scanning the
/// others, plus the slots `refresh` names.
pub fn slot_digests_with(
    txn: &dyn ReadTxn,
    owned: &SlotSet,
    known: &[Option<u64>],
    refresh: Option<Refresh>,
) -> Result<Digests> {
    let mut digests = vec![0u64; SLOTS as usize];
    let mut computed = Vec::new();
    for slot in owned.iter() {
        match known.get(slot as usize) {
            Some(Some(d)) => digests[slot as usize] = *d,
            _ => {
                let (digest, _) = scan_slot_digest(txn, slot)?;
                digests[slot as usize] = digest;
                computed.push((slot, digest));
            }
        }
    }
    let mut refreshed_to = None;
    if let Some(Refresh { from, keys }) = refresh {
        let mut read = 0;
        let order = owned
            .iter()
            .filter(|&s| s >= from)
            .chain(owned.iter().filter(|&s| s < from));
        for slot in order {
            if read >= keys {
                break;
            }
            refreshed_to = Some((slot + 1) % SLOTS);
            if matches!(known.get(slot as usize), Some(None) | None) {
                continue; // scanned above
            }
            let (digest, n) = scan_slot_digest(txn, slot)?;
            read += n.max(1);
            digests[slot as usize] = digest;
            computed.push((slot, digest));
        }
    }
    Ok(Digests {
        digests,
        computed,
        refreshed_to,
    })
}

/// One slot's digest from its keys in `txn`, and how many keys it read.
fn scan_slot_digest(txn: &dyn ReadTxn, slot: u32) -> Result<(u64, usize)> {
    let mut digest = 0u64;
    let mut read = 0;
    let mut after: Option<String> = None;
    loop {
        let chunk = txn.scan_slot(slot, after.as_deref(), SCAN_CHUNK)?;
        let Some((last, _)) = chunk.last() else {
            break;
        };
        after = Some(last.clone());
        read += chunk.len();
        for (key, state) in &chunk {
            digest = digest.wrapping_add(key_digest(key, state));
        }
        if chunk.len() < SCAN_CHUNK {
            break;
        }
    }
    Ok((digest, read))
}

/// The bucket digests of a partition's slot digests.
pub fn bucket_digests(slots: &[u64]) -> Vec<u64> {
    slots
        .chunks(BUCKET_SLOTS as usize)
        .enumerate()
        .map(|(b, chunk)| {
            let mut h = Xxh3::new();
            for (i, d) in chunk.iter().enumerate() {
                if *d != 0 {
                    h.update(&(b as u32 * BUCKET_SLOTS + i as u32).to_le_bytes());
                    h.update(&d.to_le_bytes());
                }
            }
            h.digest()
        })
        .collect()
}

/// The buckets whose digests differ (a missing digest differs).
pub fn differing_buckets(mine: &[u64], theirs: &[u64]) -> Vec<u32> {
    (0..BUCKETS)
        .filter(|&b| mine.get(b) != theirs.get(b))
        .map(|b| b as u32)
        .collect()
}

/// The slot digests of `buckets`, as `(slot, digest)` for the non-zero ones.
pub fn slots_of_buckets(slots: &[u64], buckets: &[u32]) -> Vec<(u32, u64)> {
    buckets
        .iter()
        .filter(|&&b| (b as usize) < BUCKETS)
        .flat_map(|&b| (b * BUCKET_SLOTS..(b + 1) * BUCKET_SLOTS).map(|s| (s, slots[s as usize])))
        .filter(|&(_, d)| d != 0)
        .collect()
}

/// The slots of `buckets` where `theirs` (a peer's non-zero slot digests of those
/// buckets) differs from `mine`, limited to `owned`: what to fetch from the peer.
pub fn differing_slots(
    mine: &[u64],
    buckets: &[u32],
    theirs: &[(u32, u64)],
    owned: &SlotSet,
) -> SlotSet {
    let mut out = SlotSet::new();
    let theirs: std::collections::BTreeMap<u32, u64> = theirs.iter().copied().collect();
    for &b in buckets.iter().filter(|&&b| (b as usize) < BUCKETS) {
        for slot in b * BUCKET_SLOTS..(b + 1) * BUCKET_SLOTS {
            let their = theirs.get(&slot).copied().unwrap_or(0);
            // A slot only we have keys in has nothing to fetch: the peer's own round
            // against us brings them over.
            if their != 0 && their != mine[slot as usize] && owned.contains(slot) {
                out.insert(slot);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Dot, VersionVector};
    use crate::keystate::Version;
    use crate::placement::slot_of;
    use crate::storage::{MemoryStore, Store};

    fn state(dots: &[(u64, u64)]) -> KeyState {
        KeyState {
            versions: dots
                .iter()
                .map(|&(replica, counter)| Version {
                    dot: Dot { replica, counter },
                    vv: VersionVector::default(),
                    deps: Default::default(),
                    timestamp_us: 0,
                    value: Some(b"v".to_vec()),
                })
                .collect(),
        }
    }

    fn all() -> SlotSet {
        let mut s = SlotSet::new();
        (0..SLOTS).for_each(|x| s.insert(x));
        s
    }

    fn store_with(keys: &[(&str, KeyState)]) -> MemoryStore {
        let store = MemoryStore::new();
        let mut txn = store.write().expect("txn");
        for (k, st) in keys {
            txn.put(slot_of(k), k, st).expect("put");
        }
        txn.commit().expect("commit");
        store
    }

    #[test]
    fn a_key_digest_depends_on_its_dots_not_their_order() {
        assert_eq!(
            key_digest("k", &state(&[(1, 2), (3, 4)])),
            key_digest("k", &state(&[(3, 4), (1, 2)]))
        );
        assert_ne!(
            key_digest("k", &state(&[(1, 2)])),
            key_digest("k", &state(&[(1, 3)]))
        );
        assert_ne!(
            key_digest("k", &state(&[(1, 2)])),
            key_digest("j", &state(&[(1, 2)]))
        );
    }

    #[test]
    fn one_differing_key_names_its_slot_only() {
        let keys: Vec<(String, KeyState)> = (0..2_000)
            .map(|i| (format!("key{i}"), state(&[(1, i + 1)])))
            .collect();
        let borrowed: Vec<(&str, KeyState)> =
            keys.iter().map(|(k, s)| (k.as_str(), s.clone())).collect();
        let a = store_with(&borrowed);
        let mut changed = borrowed.clone();
        changed[700].1 = state(&[(1, 701), (2, 1)]);
        let b = store_with(&changed);

        let owned = all();
        let da = slot_digests(&*a.read().expect("read"), &owned).expect("digests");
        let db = slot_digests(&*b.read().expect("read"), &owned).expect("digests");
        let (ba, bb) = (bucket_digests(&da), bucket_digests(&db));
        assert_eq!(ba.len(), BUCKETS);
        assert!(differing_buckets(&ba, &ba).is_empty());
        let buckets = differing_buckets(&ba, &bb);
        assert_eq!(buckets, vec![slot_of("key700") / BUCKET_SLOTS]);
        let theirs = slots_of_buckets(&db, &buckets);
        let slots = differing_slots(&da, &buckets, &theirs, &owned);
        assert_eq!(slots.iter().collect::<Vec<_>>(), vec![slot_of("key700")]);
        // Not owned: nothing to fetch.
        assert!(differing_slots(&da, &buckets, &theirs, &SlotSet::new()).is_empty());
    }

    #[test]
    fn a_key_only_the_asker_has_is_left_to_the_peers_round() {
        let a = store_with(&[("x", state(&[(1, 1)]))]);
        let b = store_with(&[]);
        let owned = all();
        let da = slot_digests(&*a.read().expect("read"), &owned).expect("digests");
        let db = slot_digests(&*b.read().expect("read"), &owned).expect("digests");
        let buckets = differing_buckets(&bucket_digests(&da), &bucket_digests(&db));
        assert_eq!(buckets.len(), 1);
        // The asker (a) fetches nothing from b ...
        let theirs = slots_of_buckets(&db, &buckets);
        assert!(differing_slots(&da, &buckets, &theirs, &owned).is_empty());
        // ... while b's round against a fetches the slot.
        let theirs = slots_of_buckets(&da, &buckets);
        assert_eq!(differing_slots(&db, &buckets, &theirs, &owned).len(), 1);
    }
}
