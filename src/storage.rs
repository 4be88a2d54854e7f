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
//! # The write-ahead log
//!
//! A durable redb commit writes every B-tree page the batch touched (copy on write,
//! so a batch of random keys dirties one leaf per key plus the paths above them) and
//! syncs. The redb engine makes most commits durable in a cheaper way: the transaction
//! records its changes as it makes them (`WalOp`s: the encoded state of each key put,
//! each log entry, each meta change, each deleted key), and `commit`
//!
//! 1. appends them as one record to `kvs.wal` ([`crate::wal`]: one sequential write and
//!    one `fdatasync`), then
//! 2. commits the redb transaction with `Durability::None`: readers see it at once, but
//!    redb writes nothing to disk yet.
//!
//! So every batch readers can see is already in the WAL. Once [`CHECKPOINT_INTERVAL`]
//! has passed, or the WAL holds [`CHECKPOINT_BYTES`], a batch is committed durably
//! instead (a checkpoint): its record is appended first like any other, then redb writes
//! the pages of every commit since the last checkpoint once, records the sequence number
//! of the batch (`wal.seq` in `meta`) and the WAL is emptied. At open, the records the
//! durable redb state lacks (sequence numbers above `wal.seq`) are applied again, in
//! order, and checkpointed. Replaying is exact because records carry results (the states
//! written, the keys deleted), not the commands that produced them. A clean close
//! checkpoints, leaving the WAL empty.
//!
//! Measured on the benchmark machine, this raised the PUT throughput of a 3-node K=3
//! cluster by about 30 % (BENCHMARKS.md).
//!
//! The WAL is checked at open (see `wal`): a torn last record (a crash) is dropped, but
//! damage with valid records after it makes `open` fail with [`StorageError::Damaged`]
//! unless every record it could hide is already in the checkpoint. Opening anyway would
//! lose acknowledged writes; the node's `--rebuild` moves such a directory aside.
//!
//! # Disk faults
//!
//! A failed commit says what became of its batch:
//!
//! * [`StorageError::NotApplied`]: the WAL append failed (a full disk, an I/O error) and
//!   was cut back. Nothing of the batch is anywhere; redb is untouched and keeps serving
//!   reads. The store reports the fault ([`Store::disk_fault`]) until a probe write
//!   succeeds ([`Store::recover`]) or a later append does.
//! * [`StorageError::OutcomeUnknown`]: the record may be in the WAL (the cut-back failed,
//!   or redb's commit failed after the append, or a checkpoint's durable commit failed).
//!   redb latches an I/O error: every later transaction of that `redb::Database` fails
//!   until it is reopened, and the batch is not visible in it. The store then refuses
//!   every batch ([`StorageError::Degraded`]): a later batch must never be visible without
//!   an earlier one readers could not see. [`Store::recover`] probes the disk, closes the
//!   database (readers hold it only to begin a transaction, so closing does not wait for
//!   them; their open transactions end with an error), opens it again and replays the WAL,
//!   exactly as at a start: the batch is then applied if its record was whole on disk,
//!   and not otherwise.
//!
//! Reads go on while redb is healthy or serves them from its cache; others fail with
//! [`StorageError::Degraded`] (retryable: the node asks a peer).
//!
//! [`MemoryStore`] implements the same trait without a disk for tests and `--memory`.
//!
//! # Caveats
//!
//! * redb allows one write transaction at a time; that suits the single writer task.
//! * After a commit with an unknown outcome the store takes no batch until
//!   [`Store::recover`] reopened it (the writer probes once a second); from the first
//!   reopen attempt until one succeeds (the disk needs room for the replay's checkpoint),
//!   reads fail too.
//! * An I/O error redb meets on a read latches it like a failed commit; the store notices
//!   when the writer next asks ([`Store::disk_fault`], after a failed batch).
//! * A probe write ([`PROBE_BYTES`]) that succeeds does not promise the next batch
//!   fits: a disk that fills up again degrades the node again.
//! * Between checkpoints, redb cannot reuse the pages of the last durable state that
//!   later commits replaced, so the file can grow by up to one copy of the tree before a
//!   checkpoint frees them. Pages written and replaced between checkpoints are reused at
//!   once, and the dirty pages redb holds in memory stay within its cache budget.
//! * A checkpoint writes every page dirtied since the last one, and the batch that
//!   carries it waits for that. With a checkpoint every second, the p99 latency of PUTs
//!   at concurrency 1 was 11-34 ms in four runs; with one every ten seconds, 1.8-4.3 ms
//!   (BENCHMARKS.md). A longer interval means a longer replay after a crash, bounded by
//!   [`CHECKPOINT_BYTES`] of records.
//! * Values are stored inside the key state; very large values make rewriting a key's
//!   state (on every update) cost proportionally.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::clock::{Dot, ReplicaId};
use crate::keystate::KeyState;
use crate::wal::{AppendError, OpenError, Wal};

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

/// A redb error: the disk's (I/O, or the engine refusing after an earlier I/O error until
/// it is reopened) or the engine's own.
fn engine<E: Into<redb::Error>>(e: E) -> StorageError {
    match e.into() {
        e @ (redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed) => {
            StorageError::Degraded(e.to_string())
        }
        e => StorageError::Engine(e.to_string()),
    }
}

/// An encoding error (a bug: every value here serializes).
fn codec(e: postcard::Error) -> StorageError {
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
}

/// Decodes a stored key state (`pub(crate)` for the fuzz target `fuzz::key_state`).
pub(crate) fn decode_state(bytes: &[u8]) -> Result<KeyState> {
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
/// 3: as 2, plus the write-ahead log `kvs.wal` beside the redb file, which a build of
///    format 2 would ignore (losing the writes only it holds), hence the new number.
const FORMAT_META: &str = "storage.format";
pub const FORMAT: &[u8] = b"3";
/// Formats this build opens; older ones are upgraded in place.
const READABLE_FORMATS: [&[u8]; 2] = [b"2", b"3"];

/// Meta entry: the sequence number of the last WAL record that the durable redb state
/// includes. Records up to it are skipped at replay.
const WAL_SEQ_META: &str = "wal.seq";
/// Checkpoint once the WAL holds this many bytes...
pub const CHECKPOINT_BYTES: u64 = 32 << 20;
/// ...or the last checkpoint is this old (see the caveats for the trade-off).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

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

/// The durable engine: one redb file, `kvs.redb`, and its write-ahead log, `kvs.wal`, in
/// the data directory.
pub struct RedbStore {
    dir: PathBuf,
    cache_bytes: usize,
    /// The open database; `None` while it is being reopened after a disk fault. Readers
    /// clone the `Arc` only to begin a transaction, so dropping this one closes it.
    db: RwLock<Option<Arc<redb::Database>>>,
    wal: Mutex<WalState>,
    /// When to checkpoint: [`CHECKPOINT_BYTES`] and [`CHECKPOINT_INTERVAL`] but in tests.
    checkpoint_bytes: u64,
    checkpoint_interval: Duration,
    /// Tests only: make the next redb commit fail after its WAL record was written.
    #[cfg(test)]
    fail_next_commit: std::sync::atomic::AtomicBool,
}

struct WalState {
    wal: Wal,
    /// Sequence number of the next record.
    next_seq: u64,
    /// When the redb state was last made durable.
    checkpointed: Instant,
    /// Set by a disk error, cleared by [`Store::recover`] (or a later successful append,
    /// for [`Fault::Refusing`]).
    fault: Option<Fault>,
}

/// What a disk error left the store in.
#[derive(Clone, Debug)]
enum Fault {
    /// A WAL append failed and was cut back: nothing is half-applied, but the disk
    /// refuses writes.
    Refusing(String),
    /// redb lacks, or may lack, a batch the WAL holds (its commit failed after the
    /// append, or the append's cut-back failed), or redb itself latched an I/O error. No
    /// later batch may be committed until the store is reopened and the WAL replayed:
    /// the later batch would be visible without the earlier one.
    Broken(String),
}

impl Fault {
    fn message(&self) -> &str {
        match self {
            Fault::Refusing(e) | Fault::Broken(e) => e,
        }
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

/// Bytes [`Store::recover`] writes (and syncs, and deletes) to check that the disk takes
/// writes again: more than a typical batch's WAL record, so a disk that takes it will
/// likely take the next batch; small enough to try once a second.
pub const PROBE_BYTES: usize = 256 * 1024;

/// Default size of redb's page cache. redb's own default is 1 GiB, which lets a node's
/// memory grow with its data set up to that much; the B-tree's interior pages of a
/// multi-gigabyte store fit in far less.
pub const DEFAULT_CACHE_BYTES: usize = 256 * 1024 * 1024;

fn io_error(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Engine(format!("{what} {}: {e}", path.display()))
}

fn seq_meta(seq: u64) -> WalOp {
    WalOp::SetMeta {
        name: WAL_SEQ_META.to_string(),
        value: seq.to_le_bytes().to_vec(),
    }
}

/// Writes [`PROBE_BYTES`] to a scratch file in `dir`, syncs and deletes it.
fn probe_disk(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let path = dir.join("kvs.probe");
    let written = std::fs::File::create(&path).and_then(|mut f| {
        f.write_all(&vec![0u8; PROBE_BYTES])?;
        f.sync_data()
    });
    let removed = std::fs::remove_file(&path);
    written.and(removed)
}

/// Moves the data directory `dir` aside, for a node to rebuild its data from its peers:
/// renamed to `<dir>.damaged-<unix_secs>` (`-2`, `-3`, ... appended if that exists), or,
/// when `dir` cannot be renamed (a mount point, as a container volume is), its contents
/// moved into `<dir>/damaged-<unix_secs>`. Nothing is deleted. Returns where the data
/// went, `None` if there was no directory.
pub fn move_aside(dir: &Path, unix_secs: u64) -> std::io::Result<Option<PathBuf>> {
    /// Names tried before giving up (several rebuilds within one second).
    const ATTEMPTS: u32 = 100;
    if !dir.exists() {
        return Ok(None);
    }
    let free = |base: &dyn Fn(u32) -> PathBuf| {
        (1..=ATTEMPTS)
            .map(base)
            .find(|p| !p.exists())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "no free name to move it to",
                )
            })
    };
    let suffix = |n: u32| {
        if n == 1 {
            format!("damaged-{unix_secs}")
        } else {
            format!("damaged-{unix_secs}-{n}")
        }
    };
    if let Some(name) = dir.file_name() {
        let name = name.to_string_lossy().into_owned();
        let to = free(&|n| dir.with_file_name(format!("{name}.{}", suffix(n))))?;
        if std::fs::rename(dir, &to).is_ok() {
            return Ok(Some(to));
        }
    }
    let to = free(&|n| dir.join(suffix(n)))?;
    std::fs::create_dir(&to)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("damaged-") {
            continue;
        }
        std::fs::rename(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(Some(to))
}

/// The changes one WAL record carries, decoded as the replay decodes them (`pub(crate)`
/// for the fuzz target `fuzz::wal_payload`).
pub(crate) fn decode_ops(payload: &[u8]) -> std::result::Result<Vec<WalOp>, postcard::Error> {
    postcard::from_bytes(payload)
}

/// Opens the engine in `dir` and replays the WAL records the durable redb state lacks;
/// returns the database, the emptied WAL and the next sequence number.
fn open_engine(dir: &Path, cache_bytes: usize) -> Result<(redb::Database, Wal, u64)> {
    std::fs::create_dir_all(dir).map_err(|e| io_error("creating", dir, e))?;
    let db = redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(dir.join("kvs.redb"))
        .map_err(engine)?;
    // Opening the tables creates them, so read transactions can always open them.
    let mut txn = RedbTxn::begin(&db)?;
    let durable_seq =
        match txn.meta(WAL_SEQ_META)? {
            Some(bytes) => u64::from_le_bytes(bytes.as_slice().try_into().map_err(|_| {
                StorageError::Corrupt {
                    table: "meta",
                    detail: format!("{WAL_SEQ_META} is {} bytes, not 8", bytes.len()),
                }
            })?),
            None => 0,
        };
    let wal_path = dir.join("kvs.wal");
    let (mut wal, records) = Wal::open(&wal_path, durable_seq).map_err(|e| match e {
        OpenError::Io(e) => io_error("opening", &wal_path, e),
        OpenError::Damaged(d) => StorageError::Damaged(d),
    })?;
    let mut last = durable_seq;
    let mut replayed = 0usize;
    for (seq, payload) in records {
        if seq <= durable_seq {
            continue;
        }
        if seq != last + 1 {
            return Err(StorageError::Damaged(format!(
                "{}: record {seq} follows record {last}; the records between are missing",
                wal_path.display()
            )));
        }
        let ops = decode_ops(&payload).map_err(|e| StorageError::Corrupt {
            table: "wal",
            detail: format!("record {seq}: {e}"),
        })?;
        for op in &ops {
            txn.apply(op)?;
        }
        last = seq;
        replayed += 1;
    }
    txn.apply(&seq_meta(last))?;
    let format = txn.meta(FORMAT_META)?;
    let empty = txn.with_dependent(|_, t| t.kv.is_empty().map_err(engine))?;
    match format {
        Some(f) if READABLE_FORMATS.contains(&f.as_slice()) => {}
        None if empty => {}
        other => {
            let found: String = other.map_or("1".into(), |f| String::from_utf8_lossy(&f).into());
            return Err(StorageError::Engine(format!(
                "{} holds data in storage format {found}; this build reads formats 2 and 3. \
                 Move the directory away (the node rebuilds its data from its peers) \
                 or run the build that wrote it",
                dir.display(),
            )));
        }
    }
    txn.apply(&WalOp::SetMeta {
        name: FORMAT_META.to_string(),
        value: FORMAT.to_vec(),
    })?;
    txn.commit(true)?;
    wal.reset()
        .map_err(|e| io_error("emptying", &wal_path, e))?;
    if replayed > 0 {
        tracing::info!(
            "{}: replayed {replayed} committed batches from the write-ahead log",
            dir.display()
        );
    }
    Ok((db, wal, last + 1))
}

impl RedbStore {
    /// Opens (or creates) the store in `dir` with the default page cache.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store in `dir` with a page cache of at most `cache_bytes`,
    /// replaying the WAL records that the durable redb state lacks. Refuses to open
    /// ([`StorageError::Damaged`]) if the WAL is damaged where records the durable state
    /// lacks may be.
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<Self> {
        let (db, wal, next_seq) = open_engine(dir, cache_bytes)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            cache_bytes,
            db: RwLock::new(Some(Arc::new(db))),
            wal: Mutex::new(WalState {
                wal,
                next_seq,
                checkpointed: Instant::now(),
                fault: None,
            }),
            checkpoint_bytes: CHECKPOINT_BYTES,
            checkpoint_interval: CHECKPOINT_INTERVAL,
            #[cfg(test)]
            fail_next_commit: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn wal(&self) -> std::sync::MutexGuard<'_, WalState> {
        // A panic mid-commit poisons the lock; the state it guards is still whole (the
        // `fault` flag covers a commit that went half way).
        self.wal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open database, or why there is none.
    fn db(&self) -> Result<Arc<redb::Database>> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                StorageError::Degraded(
                    "the storage engine is closed until the disk takes writes again".into(),
                )
            })
    }

    /// Makes a transaction's changes durable: the batch is appended to the WAL as one
    /// record (a sequential append and an fdatasync), then committed to redb, in memory
    /// only, or, once the WAL is big or old enough, durably (a checkpoint, which covers
    /// every earlier commit and lets the WAL be emptied).
    ///
    /// Failures say what happened to the batch: [`StorageError::NotApplied`] (the append
    /// failed and was cut back: it is not in the WAL, nor in redb), or
    /// [`StorageError::OutcomeUnknown`] (the record may be in the WAL: the cut-back
    /// failed, or redb's commit failed after the append), after which the store refuses
    /// every batch until [`Store::recover`] reopened it.
    fn commit(&self, mut txn: RedbTxn, ops: Vec<WalOp>) -> Result<()> {
        let mut w = self.wal();
        if let Some(Fault::Broken(e)) = &w.fault {
            return Err(StorageError::Degraded(format!(
                "{e}; no write is taken until the store is reopened"
            )));
        }
        let seq = w.next_seq;
        let checkpoint = w.wal.len() >= self.checkpoint_bytes
            || w.checkpointed.elapsed() >= self.checkpoint_interval;
        if checkpoint {
            txn.apply(&seq_meta(seq))?;
        }
        let payload = postcard::to_stdvec(&ops).map_err(codec)?;
        // The record first, checkpoints included: readers see the batch as soon as redb
        // commits it, so it must be durable by then, and a checkpoint whose durable commit
        // fails is then in the WAL like any other batch (replayed at the reopen).
        match w.wal.append(seq, &payload) {
            Ok(()) => {}
            Err(AppendError::NotWritten(e)) => {
                let e = e.to_string();
                w.fault = Some(Fault::Refusing(e.clone()));
                return Err(StorageError::NotApplied(e));
            }
            Err(AppendError::Unknown(e)) => {
                let e = format!("appending to the write-ahead log: {e}");
                tracing::error!("{e}; the record may be on disk, the store reopens to find out");
                w.fault = Some(Fault::Broken(e.clone()));
                return Err(StorageError::OutcomeUnknown(e));
            }
        }
        w.next_seq = seq + 1;
        if matches!(w.fault, Some(Fault::Refusing(_))) {
            w.fault = None;
        }
        #[cfg(test)]
        if self
            .fail_next_commit
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            drop(txn);
            w.fault = Some(Fault::Broken("injected commit failure".into()));
            return Err(StorageError::OutcomeUnknown(
                "injected commit failure".into(),
            ));
        }
        if let Err(e) = txn.commit(checkpoint) {
            let e = format!("committing after the WAL append: {e}");
            tracing::error!("{e}; the store reopens to replay the record");
            w.fault = Some(Fault::Broken(e.clone()));
            return Err(StorageError::OutcomeUnknown(e));
        }
        if checkpoint {
            w.checkpointed = Instant::now();
            if let Err(e) = w.wal.reset() {
                // Harmless: the records left are all covered by the checkpoint, and the
                // replay skips them.
                tracing::warn!("could not empty the write-ahead log after a checkpoint: {e}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
impl RedbStore {
    /// Tests: the next WAL append fails (and is cut back): as a full disk does.
    pub(crate) fn inject_append_failure(&self) {
        self.wal().wal.fail_next_append = Some(true);
    }

    /// Tests: the next redb commit fails after its WAL record was written.
    pub(crate) fn inject_commit_failure(&self) {
        self.fail_next_commit
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for RedbStore {
    /// A clean close leaves everything in redb and the WAL empty.
    fn drop(&mut self) {
        let mut w = self.wal();
        if matches!(w.fault, Some(Fault::Broken(_))) || w.wal.is_empty() {
            return;
        }
        let last = w.next_seq - 1;
        let checkpoint = self.db().and_then(|db| {
            let mut txn = RedbTxn::begin(&db)?;
            txn.apply(&seq_meta(last))?;
            txn.commit(true)
        });
        match checkpoint {
            Ok(()) => {
                if let Err(e) = w.wal.reset() {
                    tracing::warn!("could not empty the write-ahead log at close: {e}");
                }
            }
            Err(e) => tracing::warn!(
                "could not checkpoint the store at close ({e}); the next start replays the \
                 write-ahead log"
            ),
        }
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

/// A redb read transaction. Its `kv` table is opened on first use and kept: serving a
/// sync page reads many keys from one snapshot, and opening a table (a lookup of its
/// name in the table tree) cost about as much as the read itself.
struct RedbRead {
    txn: redb::ReadTransaction,
    kv: std::cell::OnceCell<redb::ReadOnlyTable<KvKey, &'static [u8]>>,
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
struct WriteTables<'txn> {
    kv: redb::Table<'txn, KvKey, &'static [u8]>,
    log: redb::Table<'txn, LogKey, LogValue>,
    dead: redb::Table<'txn, KvKey, ()>,
}

self_cell::self_cell!(
    /// A redb write transaction with its hot tables open.
    struct RedbTxn {
        owner: redb::WriteTransaction,
        #[not_covariant]
        dependent: WriteTables,
    }
);

impl RedbTxn {
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

    /// A meta entry as this transaction sees it.
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        meta_in(&self.borrow_owner().open_table(META).map_err(engine)?, name)
    }

    /// Applies one change; what both a live transaction and the replay of the WAL do.
    fn apply(&mut self, op: &WalOp) -> Result<()> {
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
    fn commit(self, durable: bool) -> Result<()> {
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
struct RedbWrite<'s> {
    txn: RedbTxn,
    ops: Vec<WalOp>,
    store: &'s RedbStore,
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

    fn log_clear(&mut self) -> Result<()> {
        self.record(WalOp::LogClear)
    }

    fn commit(self: Box<Self>) -> Result<()> {
        let RedbWrite { txn, ops, store } = *self;
        store.commit(txn, ops)
    }
}

impl Store for RedbStore {
    fn read(&self) -> Result<Box<dyn ReadTxn + '_>> {
        // The transaction outlives this handle on the database: closing the database
        // (to reopen it) must not wait for readers.
        let txn = self.db()?.begin_read().map_err(engine)?;
        Ok(Box::new(RedbRead {
            txn,
            kv: std::cell::OnceCell::new(),
        }))
    }

    fn write(&self) -> Result<Box<dyn WriteTxn + '_>> {
        let txn = RedbTxn::begin(&*self.db()?)?;
        Ok(Box::new(RedbWrite {
            txn,
            ops: Vec::new(),
            store: self,
        }))
    }

    fn disk_fault(&self) -> Option<String> {
        let mut w = self.wal();
        if let Some(f) = &w.fault {
            return Some(f.message().to_string());
        }
        // redb latches an I/O error met anywhere (a read too): every later transaction
        // fails until the database is reopened.
        let latched = self
            .db()
            .and_then(|db| db.begin_write().map_err(engine).map(drop));
        match latched {
            Ok(()) => None,
            Err(e) => {
                let e = e.to_string();
                w.fault = Some(Fault::Broken(e.clone()));
                Some(e)
            }
        }
    }

    fn recover(&self) -> Result<Recovery> {
        let mut w = self.wal();
        let Some(fault) = w.fault.clone() else {
            return Ok(Recovery::Healthy);
        };
        probe_disk(&self.dir).map_err(|e| StorageError::NotApplied(e.to_string()))?;
        if let Fault::Refusing(_) = fault {
            w.fault = None;
            return Ok(Recovery::Resumed);
        }
        // Closing the database releases its file lock (redb ends the read transactions
        // still open on it); a reader holding the handle for a moment delays it to the
        // next attempt.
        let old = self.db.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(old);
        let (db, wal, next_seq) = open_engine(&self.dir, self.cache_bytes)?;
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
        w.wal = wal;
        w.next_seq = next_seq;
        w.checkpointed = Instant::now();
        w.fault = None;
        Ok(Recovery::Reopened)
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
    use crate::keystate::Version;

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

    /// A crash image: the store's files as they are while it is open, so nothing a
    /// clean close does is in them.
    fn crash_image(from: &Path) -> tempfile::TempDir {
        let to = tempfile::tempdir().expect("tempdir");
        for f in ["kvs.redb", "kvs.wal"] {
            std::fs::copy(from.join(f), to.path().join(f)).expect("copy");
        }
        to
    }

    /// Commits 40 batches of changes of every kind (`check_batches` knows the result).
    fn write_batches(store: &RedbStore) {
        for i in 0..40u64 {
            let mut w = store.write().expect("write");
            w.put(1, &format!("k{i}"), &state_of(Some(&format!("v{i}"))))
                .expect("put");
            w.log_append(&LogEntry {
                dot: Dot {
                    replica: 9,
                    counter: i + 1,
                },
                slot: 1,
                key: format!("k{i}"),
            })
            .expect("log");
            w.set_meta("m", &i.to_le_bytes()).expect("meta");
            if i == 30 {
                w.put(1, "k3", &state_of(None)).expect("tombstone");
                w.log_trim(9, 10).expect("trim");
                w.delete_meta("gone").expect("delete meta");
            }
            w.commit().expect("commit");
        }
    }

    /// Checks what `write_batches` left, beside `extra` other live keys.
    fn check_batches(store: &RedbStore, extra: u64) {
        let r = store.read().expect("read");
        for i in 0..40u64 {
            let want = if i == 3 { None } else { Some(format!("v{i}")) };
            let got = r.get(1, &format!("k{i}")).expect("get").expect("present");
            assert_eq!(got, state_of(want.as_deref()), "k{i}");
        }
        assert_eq!(r.key_count().expect("count"), 39 + extra);
        assert_eq!(
            r.meta("m").expect("meta"),
            Some(39u64.to_le_bytes().to_vec())
        );
        let log = r.log_after(9, 0, 100).expect("log");
        assert_eq!(log.first().map(|e| e.dot.counter), Some(11));
        assert_eq!(log.len(), 30);
    }

    #[test]
    fn committed_batches_survive_a_crash_through_the_wal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbStore::open(dir.path()).expect("open");
        write_batches(&store);
        assert!(!store.wal().wal.is_empty(), "the batches went to the WAL");
        let image = crash_image(dir.path());
        drop(store);
        let recovered = RedbStore::open(image.path()).expect("recover");
        check_batches(&recovered, 0);
        assert!(
            recovered.wal().wal.is_empty(),
            "the replay was checkpointed"
        );
        // And the recovered store goes on from there.
        let mut w = recovered.write().expect("write");
        w.put(2, "after", &state_of(Some("x"))).expect("put");
        w.commit().expect("commit");
        drop(recovered);
        let reopened = RedbStore::open(image.path()).expect("reopen");
        check_batches(&reopened, 1);
        assert!(reopened
            .read()
            .expect("read")
            .get(2, "after")
            .expect("get")
            .is_some());
    }

    #[test]
    fn checkpoints_make_redb_durable_and_empty_the_wal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = RedbStore::open(dir.path()).expect("open");
        store.checkpoint_bytes = 0;
        write_batches(&store);
        assert!(store.wal().wal.is_empty(), "every commit was a checkpoint");
        let image = crash_image(dir.path());
        drop(store);
        check_batches(&RedbStore::open(image.path()).expect("recover"), 0);
    }

    #[test]
    fn a_clean_close_leaves_an_empty_wal() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_batches(&RedbStore::open(dir.path()).expect("open"));
        assert_eq!(
            std::fs::metadata(dir.path().join("kvs.wal"))
                .expect("stat")
                .len(),
            crate::wal::FILE_HEADER as u64,
            "only the WAL's file header is left"
        );
        check_batches(&RedbStore::open(dir.path()).expect("reopen"), 0);
    }

    /// One batch putting `key` (slot 1) = `value`.
    fn put_one(store: &RedbStore, key: &str, value: &str) -> Result<()> {
        let mut w = store.write()?;
        w.put(1, key, &state_of(Some(value)))?;
        w.commit()
    }

    fn has(store: &RedbStore, key: &str) -> bool {
        store
            .read()
            .expect("read")
            .get(1, key)
            .expect("get")
            .is_some()
    }

    #[test]
    fn mid_log_damage_refuses_to_open_and_names_the_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbStore::open(dir.path()).expect("open");
        write_batches(&store);
        let image = crash_image(dir.path());
        drop(store);
        let wal = image.path().join("kvs.wal");
        let mut bytes = std::fs::read(&wal).expect("read");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        std::fs::write(&wal, &bytes).expect("write");
        let err = RedbStore::open(image.path()).err().expect("refused");
        assert!(matches!(err, StorageError::Damaged(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("kvs.wal") && msg.contains("bytes "), "{msg}");
        assert!(msg.contains("were acknowledged"), "{msg}");
        // Nothing was cut or replayed: undoing the flip recovers every batch.
        bytes[middle] ^= 1;
        std::fs::write(&wal, &bytes).expect("write");
        check_batches(&RedbStore::open(image.path()).expect("recover"), 0);
    }

    #[test]
    fn a_refused_append_applies_nothing_and_the_store_resumes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbStore::open(dir.path()).expect("open");
        put_one(&store, "before", "x").expect("commit");
        store.wal().wal.fail_next_append = Some(true);
        let err = put_one(&store, "refused", "x").expect_err("the disk refuses it");
        assert!(matches!(err, StorageError::NotApplied(_)), "{err}");
        assert_eq!(
            crate::error::Error::from(err).kind,
            crate::error::ErrorKind::Unavailable
        );
        assert!(!has(&store, "refused") && has(&store, "before"));
        assert!(store.disk_fault().is_some());
        assert_eq!(store.recover().expect("probe"), Recovery::Resumed);
        assert!(store.disk_fault().is_none());
        put_one(&store, "after", "x").expect("commit");
        let image = crash_image(dir.path());
        drop(store);
        let recovered = RedbStore::open(image.path()).expect("recover");
        assert!(has(&recovered, "before") && has(&recovered, "after"));
        assert!(!has(&recovered, "refused"));
    }

    #[test]
    fn a_commit_with_an_unknown_outcome_blocks_later_ones_until_the_reopen_replays_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbStore::open(dir.path()).expect("open");
        put_one(&store, "before", "x").expect("commit");
        store
            .fail_next_commit
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let err = put_one(&store, "unknown", "x").expect_err("redb failed");
        assert!(matches!(err, StorageError::OutcomeUnknown(_)), "{err}");
        assert_eq!(
            crate::error::Error::from(err).kind,
            crate::error::ErrorKind::OutcomeUnknown
        );
        // Readers never see it before the reopen, and no later batch commits.
        assert!(!has(&store, "unknown"));
        let later = put_one(&store, "later", "x").expect_err("refused");
        assert!(matches!(later, StorageError::Degraded(_)), "{later}");
        assert!(store.disk_fault().is_some());
        // The reopen replays the record: the write was applied after all.
        assert_eq!(store.recover().expect("reopen"), Recovery::Reopened);
        assert!(has(&store, "unknown") && has(&store, "before"));
        assert!(!has(&store, "later"));
        assert!(store.disk_fault().is_none());
        put_one(&store, "after", "x").expect("commit");
        assert_eq!(store.recover().expect("healthy"), Recovery::Healthy);
        let image = crash_image(dir.path());
        drop(store);
        let recovered = RedbStore::open(image.path()).expect("recover");
        for key in ["before", "unknown", "after"] {
            assert!(has(&recovered, key), "{key}");
        }
    }

    #[test]
    fn an_append_not_cut_back_is_settled_by_the_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbStore::open(dir.path()).expect("open");
        put_one(&store, "before", "x").expect("commit");
        store.wal().wal.fail_next_append = Some(false);
        let err = put_one(&store, "torn", "x").expect_err("append failed");
        assert!(matches!(err, StorageError::OutcomeUnknown(_)), "{err}");
        assert!(put_one(&store, "later", "x").is_err());
        // Half the record is on disk: a torn tail, dropped at the reopen.
        assert_eq!(store.recover().expect("reopen"), Recovery::Reopened);
        assert!(has(&store, "before") && !has(&store, "torn"));
        put_one(&store, "after", "x").expect("commit");
        assert!(has(&store, "after"));
    }

    #[test]
    fn checkpoints_go_through_the_wal_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = RedbStore::open(dir.path()).expect("open");
        store.checkpoint_bytes = 0;
        put_one(&store, "a", "x").expect("commit");
        store
            .fail_next_commit
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let err = put_one(&store, "checkpointed", "x").expect_err("the checkpoint failed");
        assert!(matches!(err, StorageError::OutcomeUnknown(_)), "{err}");
        assert_eq!(store.recover().expect("reopen"), Recovery::Reopened);
        assert!(has(&store, "checkpointed"), "its WAL record was replayed");
    }

    #[test]
    fn move_aside_renames_and_never_deletes() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("node");
        assert_eq!(move_aside(&dir, 7).expect("nothing there"), None);
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("kvs.wal"), b"w").expect("write");
        let first = move_aside(&dir, 7).expect("moved").expect("a directory");
        assert_eq!(first, root.path().join("node.damaged-7"));
        assert_eq!(std::fs::read(first.join("kvs.wal")).expect("read"), b"w");
        std::fs::create_dir(&dir).expect("mkdir");
        let second = move_aside(&dir, 7).expect("moved").expect("a directory");
        assert_eq!(second, root.path().join("node.damaged-7-2"));
        assert!(!dir.exists() && first.exists());
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
