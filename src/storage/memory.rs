//! The volatile engine, for tests and `--memory` runs: persistent maps behind a lock,
//! a snapshot per read and a staged copy per write transaction.

use std::sync::{Arc, Mutex};

use super::{LogEntry, ReadTxn, Result, Store, WriteTxn};
use crate::clock::{Dot, ReplicaId};
use crate::keystate::KeyState;

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
    fn delete(&mut self, slot: u32, key: &str) -> Result<()> {
        self.staged.kv.remove(&(slot, key.to_string()));
        Ok(())
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
