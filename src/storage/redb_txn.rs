//! The redb engine's tables and transactions. A write transaction applies each change to
//! redb as it is made and records it ([`WalOp`]) for the write-ahead log, which makes the
//! batch durable at commit (`redb_store.rs`); the replay at open applies the same
//! records the same way.

use std::sync::Arc;

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::redb_store::RedbStore;
use super::{decode_state, encode_state, LogEntry, ReadTxn, Result, StorageError, WriteTxn};
use crate::clock::{Dot, ReplicaId};
use crate::keystate::KeyState;

/// A redb error: the disk's (I/O, or the engine refusing after an earlier I/O error until
/// it is reopened) or the engine's own.
pub(super) fn engine<E: Into<redb::Error>>(e: E) -> StorageError {
    match e.into() {
        e @ (redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed) => {
            StorageError::Degraded(e.to_string())
        }
        e => StorageError::Engine(e.to_string()),
    }
}

/// An encoding error (a bug: every value here serializes).
pub(super) fn codec(e: postcard::Error) -> StorageError {
    StorageError::Engine(e.to_string())
}

const KV: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<(u64, u64), (u32, &str)> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const DEAD: TableDefinition<(u32, &str), ()> = TableDefinition::new("dead");

/// One change of a write transaction, as the WAL records it. `pub(crate)` for the fuzz
/// target `fuzz::wal_payload`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum WalOp {
    Put {
        slot: u32,
        key: String,
        /// The encoded key state, as the `kv` table holds it.
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
        /// Whether the state is live (not a tombstone), for the `dead` table.
        live: bool,
    },
    LogAppend(LogEntry),
    LogTrim {
        origin: ReplicaId,
        upto: u64,
    },
    SetMeta {
        name: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    DeleteMeta {
        name: String,
    },
    DeleteKey {
        slot: u32,
        key: String,
    },
    LogClear,
}

/// The changes one WAL record carries, decoded as the replay decodes them (`pub(crate)`
/// for the fuzz target `fuzz::wal_payload`).
pub(crate) fn decode_ops(payload: &[u8]) -> std::result::Result<Vec<WalOp>, postcard::Error> {
    postcard::from_bytes(payload)
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

/// The entries of a `(slot, key)`-keyed table strictly after `after` (all if `None`).
fn range_after<'t, V: redb::Value + 'static>(
    t: &'t impl ReadableTable<KvKey, V>,
    after: Option<&(u32, String)>,
) -> Result<redb::Range<'t, KvKey, V>> {
    match after {
        Some((slot, key)) => t.range::<(u32, &str)>((
            std::ops::Bound::Excluded((*slot, key.as_str())),
            std::ops::Bound::Unbounded,
        )),
        None => t.range::<(u32, &str)>(..),
    }
    .map_err(engine)
}

fn scan_in(
    t: &impl ReadableTable<KvKey, &'static [u8]>,
    after: Option<&(u32, String)>,
    limit: usize,
) -> Result<Vec<(u32, String, KeyState)>> {
    let range = range_after(t, after)?;
    let mut out = Vec::new();
    for item in range.take(limit) {
        let (k, v) = item.map_err(engine)?;
        let (slot, key) = k.value();
        out.push((slot, key.to_string(), decode_state(v.value())?));
    }
    Ok(out)
}

fn dead_keys_in(
    t: &impl ReadableTable<KvKey, ()>,
    after: Option<&(u32, String)>,
    limit: usize,
) -> Result<Vec<(u32, String)>> {
    let range = range_after(t, after)?;
    let mut out = Vec::new();
    for item in range.take(limit) {
        let (k, _) = item.map_err(engine)?;
        let (slot, key) = k.value();
        out.push((slot, key.to_string()));
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

/// A redb read transaction. Its `kv` table is opened on first use and kept: serving a
/// sync page reads many keys from one snapshot, and opening a table (a lookup of its
/// name in the table tree) cost about as much as the read itself. A clone reads the
/// same snapshot through the same open table (`RedbStore::read` hands one snapshot to
/// every reader until the next commit).
#[derive(Clone)]
pub(super) struct RedbRead {
    pub(super) txn: Arc<redb::ReadTransaction>,
    pub(super) kv: Arc<std::sync::OnceLock<redb::ReadOnlyTable<KvKey, &'static [u8]>>>,
}

impl RedbRead {
    fn kv(&self) -> Result<&redb::ReadOnlyTable<KvKey, &'static [u8]>> {
        if let Some(t) = self.kv.get() {
            return Ok(t);
        }
        let t = self.txn.open_table(KV).map_err(engine)?;
        Ok(self.kv.get_or_init(|| t))
    }
}

impl ReadTxn for RedbRead {
    fn get(&self, slot: u32, key: &str) -> Result<Option<KeyState>> {
        kv_get(self.kv()?, slot, key)
    }
    fn log_after(&self, origin: ReplicaId, after: u64, limit: usize) -> Result<Vec<LogEntry>> {
        log_after_in(
            &self.txn.open_table(LOG).map_err(engine)?,
            origin,
            after,
            limit,
        )
    }
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        meta_in(&self.txn.open_table(META).map_err(engine)?, name)
    }
    fn key_count(&self) -> Result<u64> {
        key_count_in(self.kv()?, &self.txn.open_table(DEAD).map_err(engine)?)
    }
    fn dead_keys(&self, after: Option<&(u32, String)>, limit: usize) -> Result<Vec<(u32, String)>> {
        dead_keys_in(&self.txn.open_table(DEAD).map_err(engine)?, after, limit)
    }
    fn dead_count(&self) -> Result<u64> {
        self.txn
            .open_table(DEAD)
            .map_err(engine)?
            .len()
            .map_err(engine)
    }
    fn scan(
        &self,
        after: Option<&(u32, String)>,
        limit: usize,
    ) -> Result<Vec<(u32, String, KeyState)>> {
        scan_in(self.kv()?, after, limit)
    }
    fn scan_slot(
        &self,
        slot: u32,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, KeyState)>> {
        scan_slot_in(self.kv()?, slot, after, limit)
    }
}

/// The tables a write transaction touches on every write, opened once per transaction:
/// opening a redb table looks its name up in the table tree, which cost a write batch
/// about a tenth of its time when every call opened its own (see BENCHMARKS.md).
pub(super) struct WriteTables<'txn> {
    pub(super) kv: redb::Table<'txn, KvKey, &'static [u8]>,
    log: redb::Table<'txn, LogKey, LogValue>,
    dead: redb::Table<'txn, KvKey, ()>,
}

self_cell::self_cell!(
    /// A redb write transaction with its hot tables open.
    pub(super) struct RedbTxn {
        owner: redb::WriteTransaction,
        #[not_covariant]
        dependent: WriteTables,
    }
);

impl RedbTxn {
    pub(super) fn begin(db: &redb::Database) -> Result<Self> {
        let txn = db.begin_write().map_err(engine)?;
        Self::try_new(txn, |txn| {
            Ok(WriteTables {
                kv: txn.open_table(KV).map_err(engine)?,
                log: txn.open_table(LOG).map_err(engine)?,
                dead: txn.open_table(DEAD).map_err(engine)?,
            })
        })
    }

    /// A meta entry as this transaction sees it.
    pub(super) fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        meta_in(&self.borrow_owner().open_table(META).map_err(engine)?, name)
    }

    /// Applies one change; what both a live transaction and the replay of the WAL do.
    pub(super) fn apply(&mut self, op: &WalOp) -> Result<()> {
        match op {
            WalOp::Put {
                slot,
                key,
                state,
                live,
            } => self.with_dependent_mut(|_, t| {
                t.kv.insert((*slot, key.as_str()), state.as_slice())
                    .map_err(engine)?;
                if *live {
                    t.dead.remove((*slot, key.as_str())).map_err(engine)?;
                } else {
                    t.dead.insert((*slot, key.as_str()), ()).map_err(engine)?;
                }
                Ok(())
            }),
            WalOp::LogAppend(e) => self.with_dependent_mut(|_, t| {
                t.log
                    .insert((e.dot.replica, e.dot.counter), (e.slot, e.key.as_str()))
                    .map_err(engine)?;
                Ok(())
            }),
            WalOp::LogTrim { origin, upto } => self.with_dependent_mut(|_, t| {
                t.log
                    .retain_in((*origin, 0)..=(*origin, *upto), |_, _| false)
                    .map_err(engine)
            }),
            WalOp::SetMeta { name, value } => {
                let mut table = self.borrow_owner().open_table(META).map_err(engine)?;
                table
                    .insert(name.as_str(), value.as_slice())
                    .map_err(engine)?;
                Ok(())
            }
            WalOp::DeleteMeta { name } => {
                let mut table = self.borrow_owner().open_table(META).map_err(engine)?;
                table.remove(name.as_str()).map_err(engine)?;
                Ok(())
            }
            WalOp::DeleteKey { slot, key } => self.with_dependent_mut(|_, t| {
                t.kv.remove((*slot, key.as_str())).map_err(engine)?;
                t.dead.remove((*slot, key.as_str())).map_err(engine)?;
                Ok(())
            }),
            WalOp::LogClear => {
                self.with_dependent_mut(|_, t| t.log.retain(|_, _| false).map_err(engine))
            }
        }
    }

    /// Commits; `durable: false` leaves the commit in memory until a later durable one
    /// (redb's `Durability::None`), for changes the WAL already holds.
    pub(super) fn commit(self, durable: bool) -> Result<()> {
        // The tables close first (they borrow the transaction), then it commits.
        let mut txn = self.into_owner();
        if !durable {
            txn.set_durability(redb::Durability::None).map_err(engine)?;
        }
        txn.commit().map_err(engine)
    }
}

/// A write transaction of the redb engine: the changes go to redb as they are made and
/// are recorded for the WAL, which makes them durable at commit.
pub(super) struct RedbWrite<'s> {
    pub(super) txn: RedbTxn,
    pub(super) ops: Vec<WalOp>,
    pub(super) store: &'s RedbStore,
}

impl RedbWrite<'_> {
    fn record(&mut self, op: WalOp) -> Result<()> {
        self.txn.apply(&op)?;
        self.ops.push(op);
        Ok(())
    }
}

impl ReadTxn for RedbWrite<'_> {
    fn get(&self, slot: u32, key: &str) -> Result<Option<KeyState>> {
        self.txn.with_dependent(|_, t| kv_get(&t.kv, slot, key))
    }
    fn log_after(&self, origin: ReplicaId, after: u64, limit: usize) -> Result<Vec<LogEntry>> {
        self.txn
            .with_dependent(|_, t| log_after_in(&t.log, origin, after, limit))
    }
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.txn.meta(name)
    }
    fn key_count(&self) -> Result<u64> {
        self.txn.with_dependent(|_, t| key_count_in(&t.kv, &t.dead))
    }
    fn dead_keys(&self, after: Option<&(u32, String)>, limit: usize) -> Result<Vec<(u32, String)>> {
        self.txn
            .with_dependent(|_, t| dead_keys_in(&t.dead, after, limit))
    }
    fn scan(
        &self,
        after: Option<&(u32, String)>,
        limit: usize,
    ) -> Result<Vec<(u32, String, KeyState)>> {
        self.txn.with_dependent(|_, t| scan_in(&t.kv, after, limit))
    }
    fn scan_slot(
        &self,
        slot: u32,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, KeyState)>> {
        self.txn
            .with_dependent(|_, t| scan_slot_in(&t.kv, slot, after, limit))
    }
}

impl WriteTxn for RedbWrite<'_> {
    fn put(&mut self, slot: u32, key: &str, state: &KeyState) -> Result<()> {
        self.record(WalOp::Put {
            slot,
            key: key.to_string(),
            state: encode_state(state),
            live: state.is_live(),
        })
    }

    fn log_append(&mut self, e: &LogEntry) -> Result<()> {
        self.record(WalOp::LogAppend(e.clone()))
    }

    fn log_trim(&mut self, origin: ReplicaId, upto: u64) -> Result<()> {
        self.record(WalOp::LogTrim { origin, upto })
    }

    fn set_meta(&mut self, name: &str, value: &[u8]) -> Result<()> {
        self.record(WalOp::SetMeta {
            name: name.to_string(),
            value: value.to_vec(),
        })
    }

    fn delete_meta(&mut self, name: &str) -> Result<()> {
        self.record(WalOp::DeleteMeta {
            name: name.to_string(),
        })
    }

    fn delete_slot(&mut self, slot: u32, limit: usize) -> Result<usize> {
        // Recorded key by key, so the replay deletes exactly these.
        let keys = self.scan_slot(slot, None, limit)?;
        for (key, _) in &keys {
            self.record(WalOp::DeleteKey {
                slot,
                key: key.clone(),
            })?;
        }
        Ok(keys.len())
    }

    fn delete(&mut self, slot: u32, key: &str) -> Result<()> {
        self.record(WalOp::DeleteKey {
            slot,
            key: key.to_string(),
        })
    }

    fn log_clear(&mut self) -> Result<()> {
        self.record(WalOp::LogClear)
    }

    fn commit(self: Box<Self>) -> Result<()> {
        let RedbWrite { txn, ops, store } = *self;
        store.commit(txn, ops)
    }
}
