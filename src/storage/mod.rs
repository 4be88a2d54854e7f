//! Durable storage behind a small trait, with a redb engine and an in-memory one.
//!
//! # Design
//!
//! Four tables:
//!
//! * `kv`: `(slot, key) → KeyState` (postcard). Keying by slot first keeps a slot's keys
//!   together, so moving a slot to another partition is one range scan.
//! * `log`: `(origin, counter) → (slot, key)`. One entry per write this replica has
//!   incorporated, whichever replica accepted it. It is the replication stream: a peer
//!   that has seen origin `o` up to counter `c` is sent the current state of every key
//!   named by `log[(o, c+1..)]`. Entries are trimmed once every peer has them.
//! * `meta`: small named blobs (replica state, view, view-change state).
//! * `dead`: `(slot, key) → ()` for every key whose state is a tombstone (deleted), kept
//!   by `put` so [`ReadTxn::key_count`] counts live keys without a scan.
//!
//! The data format is versioned ([`FORMAT`] in `meta`): a store written by a build with
//! an incompatible record layout is refused at open with a clear error, never misread.
//!
//! Keys of one slot are contiguous, so a view change reads a moving slot with
//! [`ReadTxn::scan_slot`] and drops a handed-over one with [`WriteTxn::delete_slot`], a
//! bounded number of keys per transaction.
//!
//! A [`WriteTxn`] is atomic; its `commit` returns only once the data is on disk. Callers
//! batch many writes into one transaction (group commit, see `node::writer`) so one
//! fsync serves many clients.
//!
//! The engines, one file each:
//!
//! * `redb_store.rs`: [`RedbStore`], the durable engine: one redb file and its
//!   write-ahead log; commits, checkpoints, the replay at open, disk faults and their
//!   recovery, moving a damaged data directory aside;
//! * `redb_txn.rs`: its tables and transactions, and the changes a transaction records
//!   for the write-ahead log;
//! * `memory.rs`: [`MemoryStore`], which implements the same trait without a disk, for
//!   tests and `--memory`.
//!
//! # Caveats
//!
//! * Values are stored inside the key state; very large values make rewriting a key's
//!   state (on every update) cost proportionally.

pub mod digest_cache;
mod memory;
mod redb_store;
mod redb_txn;

pub use memory::MemoryStore;
pub use redb_store::{
    move_aside, RedbStore, CHECKPOINT_BYTES, CHECKPOINT_INTERVAL, DEFAULT_CACHE_BYTES, FORMAT,
    PROBE_BYTES,
};
pub(crate) use redb_txn::{decode_ops, WalOp};

use serde::{Deserialize, Serialize};

use crate::clock::{Dot, ReplicaId};
use crate::keystate::{legacy_ms, KeyState};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An engine error that is not the disk's: a bug, or a misuse.
    #[error("storage engine error: {0}")]
    Engine(String),
    #[error("corrupt record in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
    /// The data directory was damaged in a way that would lose acknowledged writes if the
    /// store opened anyway (see `wal`): it refuses to open.
    #[error("{0}")]
    Damaged(String),
    /// The disk refused the batch (its WAL record was cut back): it was not applied.
    #[error("this node's disk refuses writes: {0}; the write was not applied")]
    NotApplied(String),
    /// The disk failed after the batch's WAL record may have reached it: it may be
    /// applied (at the reopen that replays the WAL) or not.
    #[error(
        "this node's disk failed during the write ({0}); the write's outcome is unknown: \
         it may still be applied"
    )]
    OutcomeUnknown(String),
    /// The engine cannot serve now: a disk error, or it is being reopened after one.
    #[error("this node's storage is unavailable after a disk error ({0}); its peers serve")]
    Degraded(String),
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// A log entry: which write, and which key it touched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub dot: Dot,
    pub slot: u32,
    pub key: String,
}

/// Reads, from a consistent snapshot.
pub trait ReadTxn {
    fn get(&self, slot: u32, key: &str) -> Result<Option<KeyState>>;
    /// Log entries of `origin` with counter > `after`, ascending, at most `limit`.
    fn log_after(&self, origin: ReplicaId, after: u64, limit: usize) -> Result<Vec<LogEntry>>;
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Number of live keys stored (all slots; deleted keys' tombstones not counted).
    fn key_count(&self) -> Result<u64>;
    /// Keys in `(slot, key)` order strictly after `after` (from the start if `None`),
    /// at most `limit`.
    fn scan(
        &self,
        after: Option<&(u32, String)>,
        limit: usize,
    ) -> Result<Vec<(u32, String, KeyState)>>;
    /// Keys of `slot` strictly after `after` (from the slot's start if `None`), in key
    /// order, at most `limit`.
    fn scan_slot(
        &self,
        slot: u32,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, KeyState)>>;
    /// Whether any key lives in `slot`.
    fn slot_is_empty(&self, slot: u32) -> Result<bool> {
        Ok(self.scan_slot(slot, None, 1)?.is_empty())
    }
    /// Keys whose state shows no value (deleted: their tombstones), in `(slot, key)`
    /// order strictly after `after`, at most `limit`. This default scans every key; an
    /// engine with an index of them answers from it.
    fn dead_keys(&self, after: Option<&(u32, String)>, limit: usize) -> Result<Vec<(u32, String)>> {
        let mut out = Vec::new();
        let mut cursor = after.cloned();
        while out.len() < limit {
            let chunk = self.scan(cursor.as_ref(), 1_024)?;
            let Some((slot, key, _)) = chunk.last() else {
                break;
            };
            cursor = Some((*slot, key.clone()));
            let done = chunk.len() < 1_024;
            out.extend(
                chunk
                    .into_iter()
                    .filter(|(_, _, state)| !state.is_live())
                    .map(|(slot, key, _)| (slot, key))
                    .take(limit - out.len()),
            );
            if done {
                break;
            }
        }
        Ok(out)
    }
    /// Number of dead keys (see [`ReadTxn::dead_keys`]).
    fn dead_count(&self) -> Result<u64> {
        let mut n = 0;
        let mut after = None;
        loop {
            let chunk = self.dead_keys(after.as_ref(), 1_024)?;
            n += chunk.len() as u64;
            match chunk.last() {
                Some(last) if chunk.len() == 1_024 => after = Some(last.clone()),
                _ => return Ok(n),
            }
        }
    }
}

/// An atomic, durable batch of changes.
pub trait WriteTxn: ReadTxn {
    fn put(&mut self, slot: u32, key: &str, state: &KeyState) -> Result<()>;
    fn log_append(&mut self, entry: &LogEntry) -> Result<()>;
    /// Drops log entries of `origin` with counter <= `upto`.
    fn log_trim(&mut self, origin: ReplicaId, upto: u64) -> Result<()>;
    fn set_meta(&mut self, name: &str, value: &[u8]) -> Result<()>;
    fn delete_meta(&mut self, name: &str) -> Result<()>;
    /// Deletes up to `limit` keys of `slot`; returns how many it deleted.
    fn delete_slot(&mut self, slot: u32, limit: usize) -> Result<usize>;
    /// Removes one key's state altogether (a collected tombstone).
    fn delete(&mut self, slot: u32, key: &str) -> Result<()>;
    /// Drops every log entry (the log belongs to one replica incarnation).
    fn log_clear(&mut self) -> Result<()>;
    /// Makes the changes durable, or none of them.
    fn commit(self: Box<Self>) -> Result<()>;
}

pub trait Store: Send + Sync + 'static {
    fn read(&self) -> Result<Box<dyn ReadTxn + '_>>;
    fn write(&self) -> Result<Box<dyn WriteTxn + '_>>;
    /// Why the store takes no writes now, if it does not: a disk error it met. Called by
    /// the writer between batches (it may begin a write transaction to check the engine).
    fn disk_fault(&self) -> Option<String> {
        None
    }
    /// Tries to end a disk fault: checks that the disk takes writes and, if the engine
    /// needs it, reopens it and replays the WAL. Called by the writer between batches.
    fn recover(&self) -> Result<Recovery> {
        Ok(Recovery::Healthy)
    }
    /// Bytes the store's files take on disk now, `None` for an engine without files or
    /// when they cannot be listed (shown by `GET /metrics`).
    fn disk_bytes(&self) -> Option<u64> {
        None
    }
}

/// What [`Store::recover`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// There was no fault.
    Healthy,
    /// The disk takes writes again; nothing had to be reloaded.
    Resumed,
    /// The engine was reopened and the WAL replayed: the store may now hold a batch whose
    /// outcome was reported as unknown, so in-memory state derived from it must be
    /// loaded again.
    Reopened,
}

/// Decodes a stored key state (`pub(crate)` for the fuzz target `fuzz::key_state`).
/// Millisecond timestamps of stores of formats 2 and 3 come out in microseconds
/// (`keystate::legacy_ms`).
pub(crate) fn decode_state(bytes: &[u8]) -> Result<KeyState> {
    let mut state: KeyState = postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt {
        table: "kv",
        detail: e.to_string(),
    })?;
    for v in &mut state.versions {
        v.timestamp_us = legacy_ms::to_us(v.timestamp_us);
    }
    Ok(state)
}

fn encode_state(state: &KeyState) -> Vec<u8> {
    postcard::to_stdvec(state).expect("key state serialization is infallible")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystate::Version;

    /// A one-version state holding `value` (`None`: a tombstone).
    pub(super) fn state_of(value: Option<&str>) -> KeyState {
        KeyState {
            versions: vec![Version {
                dot: Dot {
                    replica: 1,
                    counter: 1,
                },
                vv: [(1, 1)].into_iter().collect(),
                deps: Default::default(),
                timestamp_us: 1_796_284_522_000_000,
                value: value.map(|v| v.as_bytes().to_vec()),
            }],
        }
    }

    fn exercise(store: &dyn Store) {
        let state = state_of(Some("v"));
        let mut w = store.write().expect("write");
        w.put(3, "a", &state).expect("put");
        for c in 1..=5 {
            w.log_append(&LogEntry {
                dot: Dot {
                    replica: 9,
                    counter: c,
                },
                slot: 3,
                key: "a".into(),
            })
            .expect("log");
        }
        w.set_meta("m", b"x").expect("meta");
        assert_eq!(w.get(3, "a").expect("get"), Some(state.clone()));
        w.commit().expect("commit");

        let r = store.read().expect("read");
        assert_eq!(r.get(3, "a").expect("get"), Some(state));
        assert_eq!(r.get(4, "a").expect("get"), None);
        assert_eq!(r.meta("m").expect("meta"), Some(b"x".to_vec()));
        assert_eq!(r.key_count().expect("count"), 1);
        assert_eq!(r.scan(None, 10).expect("scan").len(), 1);
        assert!(r.scan(Some(&(3, "a".into())), 10).expect("scan").is_empty());
        assert_eq!(r.scan(Some(&(2, "zz".into())), 10).expect("scan").len(), 1);
        let after2: Vec<u64> = r
            .log_after(9, 2, 2)
            .expect("log")
            .iter()
            .map(|e| e.dot.counter)
            .collect();
        assert_eq!(after2, vec![3, 4]);
        drop(r);

        let mut w = store.write().expect("write");
        w.log_trim(9, 3).expect("trim");
        w.commit().expect("commit");
        let r = store.read().expect("read");
        let left: Vec<u64> = r
            .log_after(9, 0, 10)
            .expect("log")
            .iter()
            .map(|e| e.dot.counter)
            .collect();
        assert_eq!(left, vec![4, 5]);
    }

    /// Slot scans and deletions stay inside their slot, including the last one.
    fn exercise_slots(store: &dyn Store) {
        let state = state_of(Some("v"));
        let mut w = store.write().expect("write");
        for (slot, key) in [
            (4, "a"),
            (5, "a"),
            (5, "b"),
            (5, "c"),
            (6, ""),
            (u32::MAX, "z"),
        ] {
            w.put(slot, key, &state).expect("put");
        }
        w.set_meta("gone", b"x").expect("meta");
        w.delete_meta("gone").expect("delete meta");
        w.commit().expect("commit");
        let r = store.read().expect("read");
        let keys = |v: Vec<(String, KeyState)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            keys(r.scan_slot(5, None, 10).expect("scan")),
            ["a", "b", "c"]
        );
        assert_eq!(keys(r.scan_slot(5, Some("a"), 1).expect("scan")), ["b"]);
        assert_eq!(keys(r.scan_slot(6, None, 10).expect("scan")), [""]);
        assert_eq!(keys(r.scan_slot(u32::MAX, None, 10).expect("scan")), ["z"]);
        assert!(r.slot_is_empty(7).expect("empty"));
        assert_eq!(r.meta("gone").expect("meta"), None);
        drop(r);
        let mut w = store.write().expect("write");
        assert_eq!(w.delete_slot(5, 2).expect("delete"), 2);
        assert_eq!(w.delete_slot(5, 2).expect("delete"), 1);
        assert_eq!(w.delete_slot(5, 2).expect("delete"), 0);
        w.log_append(&LogEntry {
            dot: Dot {
                replica: 1,
                counter: 1,
            },
            slot: 4,
            key: "a".into(),
        })
        .expect("log");
        w.log_clear().expect("clear");
        w.commit().expect("commit");
        let r = store.read().expect("read");
        assert!(r.slot_is_empty(5).expect("empty"));
        assert!(!r.slot_is_empty(4).expect("not empty"));
        assert!(r.log_after(1, 0, 10).expect("log").is_empty());
        assert_eq!(r.key_count().expect("count"), 3);
    }

    #[test]
    fn slot_operations_behave_on_both_engines() {
        exercise_slots(&MemoryStore::new());
        let dir = tempfile::tempdir().expect("tempdir");
        exercise_slots(&RedbStore::open(dir.path()).expect("open"));
    }

    /// Tombstoned keys are stored (so they can be synced) but not counted.
    fn exercise_tombstones(store: &dyn Store) {
        let mut w = store.write().expect("write");
        w.put(1, "a", &state_of(Some("x"))).expect("put");
        w.put(1, "b", &state_of(None)).expect("put");
        w.put(2, "c", &state_of(None)).expect("put");
        assert_eq!(w.key_count().expect("count"), 1);
        w.commit().expect("commit");
        let mut w = store.write().expect("write");
        w.put(1, "a", &state_of(None)).expect("put");
        w.put(1, "b", &state_of(Some("y"))).expect("put");
        w.commit().expect("commit");
        assert_eq!(store.read().expect("read").key_count().expect("count"), 1);
        let mut w = store.write().expect("write");
        assert_eq!(w.delete_slot(1, 10).expect("delete"), 2);
        w.put(2, "c", &state_of(Some("z"))).expect("put");
        w.commit().expect("commit");
        let r = store.read().expect("read");
        assert_eq!(r.key_count().expect("count"), 1);
        assert_eq!(r.get(1, "b").expect("get"), None);
    }

    #[test]
    fn tombstones_are_stored_but_not_counted_on_both_engines() {
        exercise_tombstones(&MemoryStore::new());
        let dir = tempfile::tempdir().expect("tempdir");
        exercise_tombstones(&RedbStore::open(dir.path()).expect("open"));
    }

    #[test]
    fn memory_store_behaves() {
        exercise(&MemoryStore::new());
    }

    #[test]
    fn redb_store_behaves_and_persists() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = RedbStore::open(dir.path()).expect("open");
            exercise(&store);
        }
        let store = RedbStore::open(dir.path()).expect("reopen");
        let r = store.read().expect("read");
        assert_eq!(r.meta("m").expect("meta"), Some(b"x".to_vec()));
        assert_eq!(r.key_count().expect("count"), 1);
    }

    #[test]
    fn uncommitted_changes_are_invisible() {
        let store = MemoryStore::new();
        let mut w = store.write().expect("write");
        w.set_meta("m", b"x").expect("meta");
        drop(w);
        assert_eq!(store.read().expect("read").meta("m").expect("meta"), None);
    }
}
