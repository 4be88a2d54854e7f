//! The durable engine: one redb file, `kvs.redb`, and its write-ahead log, `kvs.wal`, in
//! the data directory (the tables and transactions are in `redb_txn.rs`).
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
//! # Reads
//!
//! Readers between two commits share one redb read transaction and its open `kv` table
//! ([`Store::read`]): beginning one per read cost a GET more than its lookup. A commit
//! drops the shared one after redb committed and before the batch's writes are
//! acknowledged, so a read that begins after an acknowledgement sees the write; a
//! reopen after a disk fault drops it too.
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

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{ReadableDatabase, ReadableTableMetadata};

use super::redb_txn::{codec, decode_ops, engine, RedbRead, RedbTxn, RedbWrite, WalOp};
use super::{ReadTxn, Recovery, Result, StorageError, Store, WriteTxn};
use crate::wal::{AppendError, OpenError, Wal};

/// Meta entry naming the record layout of this store, and the layout this build writes.
/// 2: versions carry an optional value (tombstones).
/// 3: as 2, plus the write-ahead log `kvs.wal` beside the redb file, which a build of
///    format 2 would ignore (losing the writes only it holds), hence the new number.
/// 4: as 3, with versions' timestamps in microseconds, which a build of format 3 would
///    read as milliseconds thousands of years ahead, winning over every later write.
///    Formats 2 and 3 are read as they are: their millisecond timestamps are told apart
///    by their size (`keystate::legacy_ms`), so nothing is rewritten.
const FORMAT_META: &str = "storage.format";
pub const FORMAT: &[u8] = b"4";
/// Formats this build opens; older ones are upgraded in place.
const READABLE_FORMATS: [&[u8]; 3] = [b"2", b"3", b"4"];

/// Meta entry: the sequence number of the last WAL record that the durable redb state
/// includes. Records up to it are skipped at replay.
const WAL_SEQ_META: &str = "wal.seq";
/// Checkpoint once the WAL holds this many bytes...
pub const CHECKPOINT_BYTES: u64 = 32 << 20;
/// ...or the last checkpoint is this old (see the caveats for the trade-off).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// The durable engine: one redb file, `kvs.redb`, and its write-ahead log, `kvs.wal`, in
/// the data directory.
pub struct RedbStore {
    dir: PathBuf,
    cache_bytes: usize,
    /// The open database; `None` while it is being reopened after a disk fault. Readers
    /// clone the `Arc` only to begin a transaction, so dropping this one closes it.
    db: RwLock<Option<Arc<redb::Database>>>,
    wal: Mutex<WalState>,
    /// The read snapshot of the latest commit, shared by every reader until the next
    /// commit drops it ([`Store::read`]).
    snapshot: Mutex<Option<RedbRead>>,
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
                "{} holds data in storage format {found}; this build reads formats 2, 3 and 4. \
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
            snapshot: Mutex::new(None),
            #[cfg(test)]
            fail_next_commit: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn wal(&self) -> std::sync::MutexGuard<'_, WalState> {
        // A panic mid-commit poisons the lock; the state it guards is still whole (the
        // `fault` flag covers a commit that went half way).
        self.wal.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot(&self) -> std::sync::MutexGuard<'_, Option<RedbRead>> {
        self.snapshot.lock().unwrap_or_else(|p| p.into_inner())
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
    pub(super) fn commit(&self, mut txn: RedbTxn, ops: Vec<WalOp>) -> Result<()> {
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
        // Readers from now on must see this batch: the acknowledgements of its writes
        // are sent after this returns.
        *self.snapshot() = None;
        if checkpoint {
            w.checkpointed = Instant::now();
            if let Err(e) = w.wal.reset() {
                // The records left are all covered by the checkpoint, but whether the disk
                // holds the log's old header or its new one is unknown (`Wal::reset`), and
                // records appended under the wrong one would not be read back: no append
                // until a reopen has read what the disk holds.
                let e = format!("emptying the write-ahead log after a checkpoint: {e}");
                tracing::error!("{e}; the store reopens before its next write");
                w.fault = Some(Fault::Broken(e));
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
        *self.snapshot() = None;
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

impl Store for RedbStore {
    /// Every reader between two commits shares one read transaction: beginning one
    /// and opening its `kv` table cost a GET at 64 clients about a tenth of its
    /// instructions, more than the lookup itself. It is begun under the lock a commit
    /// takes to drop it, after redb committed: a reader either comes after the drop and
    /// begins a transaction that sees the commit, or the drop comes after it. Between
    /// commits, the shared snapshot is as new as any. It pins only pages of the latest
    /// state, and is let go at the next commit.
    fn read(&self) -> Result<Box<dyn ReadTxn + '_>> {
        let mut shared = self.snapshot();
        if let Some(read) = &*shared {
            return Ok(Box::new(read.clone()));
        }
        // The transaction outlives this handle on the database: closing the database
        // (to reopen it) must not wait for readers.
        let txn = self.db()?.begin_read().map_err(engine)?;
        let read = RedbRead {
            txn: Arc::new(txn),
            kv: Arc::default(),
        };
        *shared = Some(read.clone());
        Ok(Box::new(read))
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
        *self.snapshot() = None;
        let old = self.db.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(old);
        let (db, wal, next_seq) = open_engine(&self.dir, self.cache_bytes)?;
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
        // A reader may have begun a snapshot of the old database between the first drop
        // and its close; none may outlive the reopen (which can add a replayed batch).
        *self.snapshot() = None;
        w.wal = wal;
        w.next_seq = next_seq;
        w.checkpointed = Instant::now();
        w.fault = None;
        Ok(Recovery::Reopened)
    }

    /// The files directly in the data directory (the redb file, the WAL): redb keeps
    /// no count of the bytes its keys take, and a listing is cheap. Pages freed but not
    /// yet reused and WAL records not yet checkpointed count too.
    fn disk_bytes(&self) -> Option<u64> {
        let entries = std::fs::read_dir(&self.dir).ok()?;
        let sizes = entries.filter_map(|e| e.ok()?.metadata().ok().filter(|m| m.is_file()));
        Some(sizes.map(|m| m.len()).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Dot;
    use crate::storage::tests::state_of;
    use crate::storage::LogEntry;

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

    /// Readers share one snapshot between commits; a read begun after a commit returned
    /// (after its writes were acknowledged) must see it, from any thread.
    #[test]
    fn a_read_after_a_commit_sees_it_though_readers_share_a_snapshot() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbStore::open(dir.path()).expect("open");
        let value_of = |s: crate::storage::KeyState| -> u64 {
            let v = s.versions[0].value.clone().expect("a value");
            String::from_utf8(v)
                .expect("utf-8")
                .parse()
                .expect("a number")
        };
        let commit = |i: u64| {
            let mut w = store.write().expect("write");
            w.put(1, "k", &state_of(Some(&i.to_string()))).expect("put");
            w.commit().expect("commit");
        };
        commit(0);
        let before = store.read().expect("read");
        commit(1);
        let after = store.read().expect("read");
        assert_eq!(value_of(after.get(1, "k").expect("get").expect("state")), 1);
        // A snapshot taken before keeps reading what it read.
        assert_eq!(
            value_of(before.get(1, "k").expect("get").expect("state")),
            0
        );
        drop((before, after));

        const COMMITS: u64 = 500;
        let acked = AtomicU64::new(1);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| loop {
                    let seen = acked.load(Ordering::Acquire);
                    let read = store.read().expect("read");
                    let got = value_of(read.get(1, "k").expect("get").expect("state"));
                    assert!(got >= seen, "read {got} after commit {seen} returned");
                    if seen == COMMITS {
                        break;
                    }
                });
            }
            for i in 2..=COMMITS {
                commit(i);
                acked.store(i, Ordering::Release);
            }
        });
    }

    #[test]
    fn disk_bytes_are_the_files_of_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbStore::open(dir.path()).expect("open");
        let files: u64 = ["kvs.redb", "kvs.wal"]
            .iter()
            .map(|f| std::fs::metadata(dir.path().join(f)).expect("file").len())
            .sum();
        assert_eq!(store.disk_bytes(), Some(files));
        assert!(files > 0);
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
        // The file keeps its space (`wal`'s module doc); its records no longer check.
        let (_, records) =
            crate::wal::Wal::open(&dir.path().join("kvs.wal"), 0).expect("the WAL opens");
        assert!(records.is_empty(), "{} records left", records.len());
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
        // The middle of the records, not of the zeros the log wrote ahead of them.
        let end = bytes.iter().rposition(|b| *b != 0).expect("records") + 1;
        let middle = end / 2;
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
}
