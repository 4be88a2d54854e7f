//! Durable storage behind a small trait, with a redb engine and an in-memory one.
//!
//! # Design
//!
//! Three tables:
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
//! A [`WriteTxn`] is atomic; its `commit` returns only once the data is on disk (redb's
//! `Durability::Immediate`, an fsync). Callers batch many writes into one transaction
//! (group commit, see `server::writer`) so one fsync serves many clients.
//!
//! [`MemoryStore`] implements the same trait without a disk for tests and `--memory`.
//!
//! # Caveats
//!
//! * redb allows one write transaction at a time; that suits the single writer task.
//! * Values are stored inside the key state; very large values make rewriting a key's
//!   state (on every update) cost proportionally.

use std::path::Path;
use std::sync::{Arc, Mutex};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::clock::{Dot, ReplicaId};
use crate::replica::KeyState;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage engine error: {0}")]
    Engine(String),
    #[error("corrupt record in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
}

pub type Result<T> = std::result::Result<T, StorageError>;

fn engine<E: std::fmt::Display>(e: E) -> StorageError {
    StorageError::Engine(e.to_string())
}

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
    /// Drops every log entry (the log belongs to one replica incarnation).
    fn log_clear(&mut self) -> Result<()>;
    /// Makes the changes durable, or none of them.
    fn commit(self: Box<Self>) -> Result<()>;
}

pub trait Store: Send + Sync + 'static {
    fn read(&self) -> Result<Box<dyn ReadTxn + '_>>;
    fn write(&self) -> Result<Box<dyn WriteTxn + '_>>;
}

fn decode_state(bytes: &[u8]) -> Result<KeyState> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt {
        table: "kv",
        detail: e.to_string(),
    })
}

fn encode_state(state: &KeyState) -> Vec<u8> {
    postcard::to_stdvec(state).expect("key state serialization is infallible")
}

// ---------------------------------------------------------------------------------------
// redb

const KV: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<(u64, u64), (u32, &str)> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const DEAD: TableDefinition<(u32, &str), ()> = TableDefinition::new("dead");

/// Meta entry naming the record layout of this store, and the layout this build writes.
/// 2: versions carry an optional value (tombstones).
const FORMAT_META: &str = "storage.format";
pub const FORMAT: &[u8] = b"2";

/// The durable engine: one redb file, `kvs.redb`, in the data directory.
pub struct RedbStore {
    db: redb::Database,
}

/// Default size of redb's page cache. redb's own default is 1 GiB, which lets a node's
/// memory grow with its data set up to that much; the B-tree's interior pages of a
/// multi-gigabyte store fit in far less.
pub const DEFAULT_CACHE_BYTES: usize = 256 * 1024 * 1024;

impl RedbStore {
    /// Opens (or creates) the store in `dir` with the default page cache.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store in `dir` with a page cache of at most `cache_bytes`.
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StorageError::Engine(format!("creating {}: {e}", dir.display())))?;
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(dir.join("kvs.redb"))
            .map_err(engine)?;
        // Create the tables up front so read transactions can always open them.
        let txn = db.begin_write().map_err(engine)?;
        let empty = txn
            .open_table(KV)
            .map_err(engine)?
            .is_empty()
            .map_err(engine)?;
        txn.open_table(LOG).map_err(engine)?;
        txn.open_table(DEAD).map_err(engine)?;
        {
            let mut meta = txn.open_table(META).map_err(engine)?;
            let format = meta
                .get(FORMAT_META)
                .map_err(engine)?
                .map(|v| v.value().to_vec());
            match format {
                Some(f) if f == FORMAT => {}
                None if empty => {
                    meta.insert(FORMAT_META, FORMAT).map_err(engine)?;
                }
                other => {
                    let found: String =
                        other.map_or("1".into(), |f| String::from_utf8_lossy(&f).into());
                    return Err(StorageError::Engine(format!(
                        "{} holds data in storage format {found}; this build reads format {}. \
                         Move the directory away (the node rebuilds its data from its peers) \
                         or run the build that wrote it",
                        dir.display(),
                        String::from_utf8_lossy(FORMAT)
                    )));
                }
            }
        }
        txn.commit().map_err(engine)?;
        Ok(Self { db })
    }
}

/// Table types, spelled once for the helpers below.
type KvKey = (u32, &'static str);
type LogKey = (u64, u64);
type LogValue = (u32, &'static str);

// The reads are written once over redb's `ReadableTable`, so a read transaction (which
// opens a table per call) and a write transaction (which keeps its tables open) share
// them.

fn kv_get(
    t: &impl ReadableTable<KvKey, &'static [u8]>,
    slot: u32,
    key: &str,
) -> Result<Option<KeyState>> {
    let value = t.get((slot, key)).map_err(engine)?;
    value.map(|v| decode_state(v.value())).transpose()
}

fn log_after_in(
    t: &impl ReadableTable<LogKey, LogValue>,
    origin: ReplicaId,
    after: u64,
    limit: usize,
) -> Result<Vec<LogEntry>> {
    let start = after.saturating_add(1);
    let mut out = Vec::new();
    for item in t
        .range((origin, start)..=(origin, u64::MAX))
        .map_err(engine)?
    {
        if out.len() >= limit {
            break;
        }
        let (k, v) = item.map_err(engine)?;
        let (_, counter) = k.value();
        let (slot, key) = v.value();
        out.push(LogEntry {
            dot: Dot {
                replica: origin,
                counter,
            },
            slot,
            key: key.to_string(),
        });
    }
    Ok(out)
}

fn meta_in(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<Option<Vec<u8>>> {
    let value = t.get(name).map_err(engine)?;
    Ok(value.map(|v| v.value().to_vec()))
}

fn key_count_in(kv: &impl ReadableTableMetadata, dead: &impl ReadableTableMetadata) -> Result<u64> {
    let all = kv.len().map_err(engine)?;
    let dead = dead.len().map_err(engine)?;
    Ok(all.saturating_sub(dead))
}

fn scan_in(
    t: &impl ReadableTable<KvKey, &'static [u8]>,
    after: Option<&(u32, String)>,
    limit: usize,
) -> Result<Vec<(u32, String, KeyState)>> {
    let range = match after {
        Some((slot, key)) => t.range::<(u32, &str)>((
            std::ops::Bound::Excluded((*slot, key.as_str())),
            std::ops::Bound::Unbounded,
        )),
        None => t.range::<(u32, &str)>(..),
    }
    .map_err(engine)?;
    let mut out = Vec::new();
    for item in range.take(limit) {
        let (k, v) = item.map_err(engine)?;
        let (slot, key) = k.value();
        out.push((slot, key.to_string(), decode_state(v.value())?));
    }
    Ok(out)
}

fn scan_slot_in(
    t: &impl ReadableTable<KvKey, &'static [u8]>,
    slot: u32,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<(String, KeyState)>> {
    let lower = match after {
        Some(key) => std::ops::Bound::Excluded((slot, key)),
        None => std::ops::Bound::Included((slot, "")),
    };
    let upper = match slot.checked_add(1) {
        Some(next) => std::ops::Bound::Excluded((next, "")),
        None => std::ops::Bound::Unbounded,
    };
    let mut out = Vec::new();
    for item in t
        .range::<(u32, &str)>((lower, upper))
        .map_err(engine)?
        .take(limit)
    {
        let (k, v) = item.map_err(engine)?;
        let (_, key) = k.value();
        out.push((key.to_string(), decode_state(v.value())?));
    }
    Ok(out)
}

struct RedbRead(redb::ReadTransaction);

impl ReadTxn for RedbRead {
    fn get(&self, slot: u32, key: &str) -> Result<Option<KeyState>> {
        kv_get(&self.0.open_table(KV).map_err(engine)?, slot, key)
    }
    fn log_after(&self, origin: ReplicaId, after: u64, limit: usize) -> Result<Vec<LogEntry>> {
        log_after_in(
            &self.0.open_table(LOG).map_err(engine)?,
            origin,
            after,
            limit,
        )
    }
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        meta_in(&self.0.open_table(META).map_err(engine)?, name)
    }
    fn key_count(&self) -> Result<u64> {
        key_count_in(
            &self.0.open_table(KV).map_err(engine)?,
            &self.0.open_table(DEAD).map_err(engine)?,
        )
    }
    fn scan(
        &self,
        after: Option<&(u32, String)>,
        limit: usize,
    ) -> Result<Vec<(u32, String, KeyState)>> {
        scan_in(&self.0.open_table(KV).map_err(engine)?, after, limit)
    }
    fn scan_slot(
        &self,
        slot: u32,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, KeyState)>> {
        scan_slot_in(&self.0.open_table(KV).map_err(engine)?, slot, after, limit)
    }
}

/// The tables a write transaction touches on every write, opened once per transaction:
/// opening a redb table looks its name up in the table tree, which cost a write batch
/// about a tenth of its time when every call opened its own (see BENCHMARKS.md).
struct WriteTables<'txn> {
    kv: redb::Table<'txn, KvKey, &'static [u8]>,
    log: redb::Table<'txn, LogKey, LogValue>,
    dead: redb::Table<'txn, KvKey, ()>,
}

self_cell::self_cell!(
    /// A redb write transaction with its hot tables open.
    struct RedbWrite {
        owner: redb::WriteTransaction,
        #[not_covariant]
        dependent: WriteTables,
    }
);

impl RedbWrite {
    fn begin(db: &redb::Database) -> Result<Self> {
        let txn = db.begin_write().map_err(engine)?;
        Self::try_new(txn, |txn| {
            Ok(WriteTables {
                kv: txn.open_table(KV).map_err(engine)?,
                log: txn.open_table(LOG).map_err(engine)?,
                dead: txn.open_table(DEAD).map_err(engine)?,
            })
        })
    }
}

impl ReadTxn for RedbWrite {
    fn get(&self, slot: u32, key: &str) -> Result<Option<KeyState>> {
        self.with_dependent(|_, t| kv_get(&t.kv, slot, key))
    }
    fn log_after(&self, origin: ReplicaId, after: u64, limit: usize) -> Result<Vec<LogEntry>> {
        self.with_dependent(|_, t| log_after_in(&t.log, origin, after, limit))
    }
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        meta_in(&self.borrow_owner().open_table(META).map_err(engine)?, name)
    }
    fn key_count(&self) -> Result<u64> {
        self.with_dependent(|_, t| key_count_in(&t.kv, &t.dead))
    }
    fn scan(
        &self,
        after: Option<&(u32, String)>,
        limit: usize,
    ) -> Result<Vec<(u32, String, KeyState)>> {
        self.with_dependent(|_, t| scan_in(&t.kv, after, limit))
    }
    fn scan_slot(
        &self,
        slot: u32,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, KeyState)>> {
        self.with_dependent(|_, t| scan_slot_in(&t.kv, slot, after, limit))
    }
}

impl WriteTxn for RedbWrite {
    fn put(&mut self, slot: u32, key: &str, state: &KeyState) -> Result<()> {
        self.with_dependent_mut(|_, t| {
            t.kv.insert((slot, key), encode_state(state).as_slice())
                .map_err(engine)?;
            if state.is_live() {
                t.dead.remove((slot, key)).map_err(engine)?;
            } else {
                t.dead.insert((slot, key), ()).map_err(engine)?;
            }
            Ok(())
        })
    }

    fn log_append(&mut self, e: &LogEntry) -> Result<()> {
        self.with_dependent_mut(|_, t| {
            t.log
                .insert((e.dot.replica, e.dot.counter), (e.slot, e.key.as_str()))
                .map_err(engine)?;
            Ok(())
        })
    }

    fn log_trim(&mut self, origin: ReplicaId, upto: u64) -> Result<()> {
        self.with_dependent_mut(|_, t| {
            t.log
                .retain_in((origin, 0)..=(origin, upto), |_, _| false)
                .map_err(engine)
        })
    }

    fn set_meta(&mut self, name: &str, value: &[u8]) -> Result<()> {
        let mut table = self.borrow_owner().open_table(META).map_err(engine)?;
        table.insert(name, value).map_err(engine)?;
        Ok(())
    }

    fn delete_meta(&mut self, name: &str) -> Result<()> {
        let mut table = self.borrow_owner().open_table(META).map_err(engine)?;
        table.remove(name).map_err(engine)?;
        Ok(())
    }

    fn delete_slot(&mut self, slot: u32, limit: usize) -> Result<usize> {
        let keys: Vec<String> = self
            .scan_slot(slot, None, limit)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        self.with_dependent_mut(|_, t| {
            for key in &keys {
                t.kv.remove((slot, key.as_str())).map_err(engine)?;
                t.dead.remove((slot, key.as_str())).map_err(engine)?;
            }
            Ok(keys.len())
        })
    }

    fn log_clear(&mut self) -> Result<()> {
        self.with_dependent_mut(|_, t| t.log.retain(|_, _| false).map_err(engine))
    }

    fn commit(self: Box<Self>) -> Result<()> {
        // The tables close first (they borrow the transaction), then it commits.
        self.into_owner().commit().map_err(engine)
    }
}

impl Store for RedbStore {
    fn read(&self) -> Result<Box<dyn ReadTxn + '_>> {
        Ok(Box::new(RedbRead(self.db.begin_read().map_err(engine)?)))
    }

    fn write(&self) -> Result<Box<dyn WriteTxn + '_>> {
        Ok(Box::new(RedbWrite::begin(&self.db)?))
    }
}

// ---------------------------------------------------------------------------------------
// memory

#[derive(Clone, Default)]
struct Tables {
    kv: imbl::OrdMap<(u32, String), KeyState>,
    log: imbl::OrdMap<(u64, u64), (u32, String)>,
    meta: imbl::OrdMap<String, Vec<u8>>,
}

impl Tables {
    fn live_keys(&self) -> u64 {
        self.kv.values().filter(|s| s.is_live()).count() as u64
    }

    fn scan(&self, after: Option<&(u32, String)>, limit: usize) -> Vec<(u32, String, KeyState)> {
        use std::ops::Bound;
        let lower = match after {
            Some(k) => Bound::Excluded(k.clone()),
            None => Bound::Unbounded,
        };
        self.kv
            .range((lower, Bound::Unbounded))
            .take(limit)
            .map(|((slot, key), state)| (*slot, key.clone(), state.clone()))
            .collect()
    }

    fn scan_slot(&self, slot: u32, after: Option<&str>, limit: usize) -> Vec<(String, KeyState)> {
        use std::ops::Bound;
        let lower = match after {
            Some(k) => Bound::Excluded((slot, k.to_string())),
            None => Bound::Included((slot, String::new())),
        };
        self.kv
            .range((lower, Bound::Unbounded))
            .take_while(|((s, _), _)| *s == slot)
            .take(limit)
            .map(|((_, key), state)| (key.clone(), state.clone()))
            .collect()
    }

    fn log_after(&self, origin: ReplicaId, after: u64, limit: usize) -> Vec<LogEntry> {
        self.log
            .range((origin, after.saturating_add(1))..=(origin, u64::MAX))
            .take(limit)
            .map(|(&(replica, counter), (slot, key))| LogEntry {
                dot: Dot { replica, counter },
                slot: *slot,
                key: key.clone(),
            })
            .collect()
    }
}

/// Volatile engine for tests and `--memory` runs. Reads see a snapshot and a write
/// transaction stages its changes in a copy; the tables are persistent maps (`imbl`),
/// so a copy shares all but the paths it changes and costs O(log n) per change, not a
/// clone of the whole store per transaction.
#[derive(Clone, Default)]
pub struct MemoryStore {
    tables: Arc<Mutex<Arc<Tables>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn snapshot(&self) -> Arc<Tables> {
        // A poisoned lock means a panic mid-commit, which swaps an Arc and cannot leave
        // the tables half-written; the data behind it is still consistent.
        self.tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

struct MemRead(Arc<Tables>);

struct MemWrite<'a> {
    store: &'a MemoryStore,
    staged: Tables,
}

impl ReadTxn for MemRead {
    fn get(&self, slot: u32, key: &str) -> Result<Option<KeyState>> {
        Ok(self.0.kv.get(&(slot, key.to_string())).cloned())
    }
    fn log_after(&self, origin: ReplicaId, after: u64, limit: usize) -> Result<Vec<LogEntry>> {
        Ok(self.0.log_after(origin, after, limit))
    }
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.0.meta.get(name).cloned())
    }
    fn key_count(&self) -> Result<u64> {
        Ok(self.0.live_keys())
    }
    fn scan(
        &self,
        after: Option<&(u32, String)>,
        limit: usize,
    ) -> Result<Vec<(u32, String, KeyState)>> {
        Ok(self.0.scan(after, limit))
    }
    fn scan_slot(
        &self,
        slot: u32,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, KeyState)>> {
        Ok(self.0.scan_slot(slot, after, limit))
    }
}

impl ReadTxn for MemWrite<'_> {
    fn get(&self, slot: u32, key: &str) -> Result<Option<KeyState>> {
        Ok(self.staged.kv.get(&(slot, key.to_string())).cloned())
    }
    fn log_after(&self, origin: ReplicaId, after: u64, limit: usize) -> Result<Vec<LogEntry>> {
        Ok(self.staged.log_after(origin, after, limit))
    }
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.staged.meta.get(name).cloned())
    }
    fn key_count(&self) -> Result<u64> {
        Ok(self.staged.live_keys())
    }
    fn scan(
        &self,
        after: Option<&(u32, String)>,
        limit: usize,
    ) -> Result<Vec<(u32, String, KeyState)>> {
        Ok(self.staged.scan(after, limit))
    }
    fn scan_slot(
        &self,
        slot: u32,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, KeyState)>> {
        Ok(self.staged.scan_slot(slot, after, limit))
    }
}

impl WriteTxn for MemWrite<'_> {
    fn put(&mut self, slot: u32, key: &str, state: &KeyState) -> Result<()> {
        self.staged
            .kv
            .insert((slot, key.to_string()), state.clone());
        Ok(())
    }
    fn log_append(&mut self, e: &LogEntry) -> Result<()> {
        self.staged
            .log
            .insert((e.dot.replica, e.dot.counter), (e.slot, e.key.clone()));
        Ok(())
    }
    fn log_trim(&mut self, origin: ReplicaId, upto: u64) -> Result<()> {
        let trimmed: Vec<(u64, u64)> = self
            .staged
            .log
            .range((origin, 0)..=(origin, upto))
            .map(|(k, _)| *k)
            .collect();
        for k in &trimmed {
            self.staged.log.remove(k);
        }
        Ok(())
    }
    fn set_meta(&mut self, name: &str, value: &[u8]) -> Result<()> {
        self.staged.meta.insert(name.to_string(), value.to_vec());
        Ok(())
    }
    fn delete_meta(&mut self, name: &str) -> Result<()> {
        self.staged.meta.remove(name);
        Ok(())
    }
    fn delete_slot(&mut self, slot: u32, limit: usize) -> Result<usize> {
        let keys: Vec<String> = self
            .staged
            .scan_slot(slot, None, limit)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for key in &keys {
            self.staged.kv.remove(&(slot, key.clone()));
        }
        Ok(keys.len())
    }
    fn log_clear(&mut self) -> Result<()> {
        self.staged.log.clear();
        Ok(())
    }
    fn commit(self: Box<Self>) -> Result<()> {
        *self.store.tables.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(self.staged);
        Ok(())
    }
}

impl Store for MemoryStore {
    fn read(&self) -> Result<Box<dyn ReadTxn + '_>> {
        Ok(Box::new(MemRead(self.snapshot())))
    }
    fn write(&self) -> Result<Box<dyn WriteTxn + '_>> {
        // One writer at a time is the caller's contract (the writer task), as with redb.
        Ok(Box::new(MemWrite {
            store: self,
            staged: (*self.snapshot()).clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::Version;

    /// A one-version state holding `value` (`None`: a tombstone).
    fn state_of(value: Option<&str>) -> KeyState {
        KeyState {
            versions: vec![Version {
                dot: Dot {
                    replica: 1,
                    counter: 1,
                },
                vv: [(1, 1)].into_iter().collect(),
                deps: Default::default(),
                timestamp_ms: 1,
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
    fn a_store_of_another_format_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = RedbStore::open(dir.path()).expect("open");
            let mut w = store.write().expect("write");
            w.put(1, "a", &state_of(Some("x"))).expect("put");
            w.set_meta(FORMAT_META, b"1").expect("meta");
            w.commit().expect("commit");
        }
        let err = RedbStore::open(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("storage format 1"), "{err}");
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
