//! The write-ahead log file of the redb engine (see `storage` for how it is used).
//!
//! # Design
//!
//! A file header, `[magic: 8 bytes][salt: u64 LE][crc32 of magic and salt: u32 LE]`,
//! then a sequence of records, each
//! `[length: u32 LE][crc32: u32 LE][sequence: u64 LE][payload: length bytes]`, where the
//! CRC covers the file's salt, the sequence number and the payload. [`Wal::append`]
//! writes one record and calls `fdatasync` before it returns: one sequential write and
//! one sync per batch, where a durable redb commit writes every page the batch touched,
//! wherever it lies, and syncs. [`Wal::reset`] empties the log once the engine has made
//! everything in it durable by other means (a checkpoint).
//!
//! # Space written once, then reused
//!
//! An `fdatasync` after an append that grows the file must also commit the file's new
//! size (a journal commit on ext4, shared by every file of the filesystem); one after an
//! overwrite of blocks already written needs only the data. So an append that would pass
//! the end of the file first writes zeros ahead of it ([`Wal::append`]: as much again
//! as the file holds, at least [`GROW_MIN`] and at most [`GROW_MAX`] bytes), and
//! [`Wal::reset`] does not truncate: it writes a header with a **new salt** over the old
//! one, and the next records overwrite the old ones from the start. Whatever lies past
//! the last record (zeros, or records and parts of records of an earlier salt) does not
//! check under the current salt and ends the log the way a torn tail does: the older
//! records could not pass the sequence-number window either (they are all covered by
//! the checkpoint that preceded the reset). [`Wal::open`] cuts such bytes off, and the
//! file grows again with the next appends.
//!
//! # Damage is detected, not guessed
//!
//! [`Wal::open`] reads every whole record. A record that is cut short or fails its CRC is
//! one of two things:
//!
//! * **A torn tail**: the last append, interrupted by a crash. Its `fdatasync` never
//!   returned, so nothing it carried was acknowledged, and appends are sequential (each
//!   synced before the next starts), so only the last record can be torn. The file is cut
//!   back to the end of the last good record.
//! * **Damage**: a disk error (a flipped bit, a lost sector) in a record that was synced.
//!   Records after it were acknowledged too; dropping them would silently lose writes.
//!
//! They are told apart by what follows: `open` scans on, byte by byte, for a later valid
//! record. None: a torn tail. One: damage, reported as a [`Damage`] (file, byte range,
//! the sequence numbers around the gap). The caller passes the sequence number its
//! durable state already includes (`floor`, the checkpoint): damage whose records are
//! all at or below it loses nothing, so `open` only warns and goes on.
//!
//! A false match (bytes inside the torn or damaged region that happen to look like a
//! valid record) would turn a torn tail into a refusal to open, never into lost data.
//! Three things make one unlikely:
//!
//! * the CRC must match: about 2^-32 for arbitrary bytes;
//! * the sequence number must be one that can follow: above the last good record and
//!   the checkpoint, and at most one more than the number of records that fit in the
//!   bytes skipped ([`HEADER`] bytes each at least): a window of a few values out of
//!   2^64, checked before the CRC;
//! * the CRC covers a random salt chosen when the file is created and never sent
//!   anywhere: a client that stores a value embedding a well-formed record (values are
//!   copied into the log verbatim) cannot make its CRC match without guessing the salt.
//!
//! The file header has its own CRC: a damaged header with records after it is reported
//! as damage too (the records cannot be checked without the salt), a header cut short
//! with nothing after it is a file whose creation was interrupted.
//!
//! A file written by the previous build (records from offset 0, CRCs without a salt) is
//! recognised by a valid first record and read as such; [`Wal::reset`] gives it a header.
//!
//! # Appends that fail
//!
//! [`Wal::append`] says whether a failed record is certainly absent ([`AppendError::NotWritten`]:
//! the file was cut back to where it was and that was synced) or may be on disk, whole or
//! in part ([`AppendError::Unknown`]: the cut-back failed). After `Unknown` the handle
//! must not be used again: only reopening (which reads what the disk really holds) can
//! say where the log ends.
//!
//! # Caveats
//!
//! * The whole file is read into memory at open; the engine bounds it by checkpointing
//!   (`storage::CHECKPOINT_BYTES`).
//! * Damage to the file header when records follow it, or to the first record of a file
//!   of the previous build, is reported as damage even if every record is covered by the
//!   checkpoint: without the salt (or a first record) the records cannot be checked.
//! * A false match is possible in principle (see above); its effect is a refusal to open
//!   that names the offset, never a silent drop.
//! * The CRCs one search computes are bounded ([`SEARCH_BUDGET`]). Bytes crafted to look
//!   like many records inside a torn record can exhaust that budget: the file is then
//!   refused as undecidable (the `--rebuild` procedure applies), not scanned for
//!   minutes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

mod read;

pub(crate) use read::{crc, parse, scan, start_of, Scan};
pub use read::{SEARCH_BUDGET, SEARCH_BUDGET_MIN};

/// Bytes before a record's payload: length, CRC, sequence number. Also the smallest
/// record, which bounds how many records a damaged region can hide.
pub(crate) const HEADER: usize = 16;
/// First bytes of a file of this layout.
const MAGIC: [u8; 8] = *b"kvs-wal\x02";
/// Bytes of the file header: magic, salt, CRC of both.
pub(crate) const FILE_HEADER: usize = 20;
/// Least and most bytes of zeros written ahead of the log when an append passes the end
/// of the file (see the module doc).
pub const GROW_MIN: u64 = 64 * 1024;
pub const GROW_MAX: u64 = 4 * 1024 * 1024;

/// A record read back: its sequence number and payload.
pub type Record = (u64, Vec<u8>);

/// A region of the log that holds no valid record, with valid records after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub path: PathBuf,
    /// Byte offset of the region and its length.
    pub offset: u64,
    pub len: u64,
    /// Sequence number of the last good record before the region, if any.
    pub after: Option<u64>,
    /// Sequence number of the first good record after it (at `offset + len`).
    pub before: u64,
    /// Sequence number the durable state already includes (the last checkpoint).
    pub durable: u64,
}

impl Damage {
    /// Sequence numbers of acknowledged records that may be in the region and are newer
    /// than the checkpoint; empty when the region loses nothing.
    pub fn lost(&self) -> std::ops::RangeInclusive<u64> {
        self.after.unwrap_or(0).max(self.durable) + 1..=self.before.saturating_sub(1)
    }
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let after = self.after.map_or("the start of the log".to_string(), |s| {
            format!("record {s}")
        });
        let lost = self.lost();
        write!(
            f,
            "{}: bytes {}..{} ({} bytes) hold no valid record, between {after} and record {} \
             (at byte {}); records {}..={} were acknowledged and are not in the last \
             checkpoint (record {}). The disk damaged the write-ahead log: replaying past \
             the gap would lose those writes, so the store does not open",
            self.path.display(),
            self.offset,
            self.offset + self.len,
            self.len,
            self.before,
            self.offset + self.len,
            lost.start(),
            lost.end(),
            self.durable,
        )
    }
}

/// Why [`Wal::open`] failed.
#[derive(Debug)]
pub enum OpenError {
    Io(io::Error),
    /// Valid records follow a damaged region (or a damaged header) and the checkpoint
    /// does not cover what the region held.
    Damaged(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Io(e) => e.fmt(f),
            OpenError::Damaged(d) => f.write_str(d),
        }
    }
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        OpenError::Io(e)
    }
}

/// Why [`Wal::append`] failed.
#[derive(Debug)]
pub enum AppendError {
    /// Nothing of the record is in the file: it was cut back, durably.
    NotWritten(io::Error),
    /// The record may be in the file, whole or in part (the cut-back failed too).
    Unknown(io::Error),
}

impl std::fmt::Display for AppendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppendError::NotWritten(e) | AppendError::Unknown(e) => e.fmt(f),
        }
    }
}

/// An open write-ahead log.
pub struct Wal {
    file: File,
    path: PathBuf,
    /// Bytes of the header and whole records in the file: where the next record goes.
    len: u64,
    /// Bytes the file holds (records, then zeros or older records): appends up to here
    /// overwrite, beyond it they grow the file.
    allocated: u64,
    /// The salt of this file's CRCs; `None` for a file of the previous layout.
    salt: Option<u64>,
    /// Tests only: make the next append fail, cutting back (`true`) or not (`false`).
    #[cfg(test)]
    pub(crate) fail_next_append: Option<bool>,
}

/// What the start of the file is. (This and the pure readers below are `pub(crate)` for
/// the fuzz target `fuzz::wal`, which runs what [`Wal::open`] runs over any bytes.)
pub(crate) enum Start {
    /// A header of this layout with this salt.
    Salted(u64),
    /// Records of the previous layout from offset 0.
    Legacy,
    /// Nothing valid: a header cut short by a crash at creation (`torn`), or damage.
    Invalid,
}

impl Wal {
    /// Opens (or creates) the log at `path` and returns it with every valid record in it,
    /// in file order, as `(sequence, payload)`. `durable` is the sequence number the
    /// caller's durable state already includes: damage whose records are all at or below
    /// it is survivable (see the module doc).
    pub fn open(path: &Path, durable: u64) -> Result<(Self, Vec<Record>), OpenError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (salt, start) = match start_of(&bytes) {
            Start::Salted(salt) => (Some(salt), FILE_HEADER),
            Start::Legacy => (None, 0),
            Start::Invalid if bytes.len() <= FILE_HEADER => {
                // A creation cut short (the header is synced before any record).
                let mut wal = Self::with(file, path, 0, None);
                wal.write_header(rand::random())?;
                return Ok((wal, Vec::new()));
            }
            Start::Invalid => {
                return Err(OpenError::Damaged(format!(
                    "{}: the file header is damaged and {} bytes of records follow it, which \
                     cannot be checked without it; they may hold acknowledged writes newer \
                     than the last checkpoint (record {durable})",
                    path.display(),
                    bytes.len() - FILE_HEADER
                )))
            }
        };
        let scan = scan(&bytes, start, salt, durable);
        if scan.undecided {
            return Err(OpenError::Damaged(format!(
                "{}: the record at byte {} does not check, and whether a valid record follows                  it could not be decided within the scan's budget (the {} bytes after it hold                  many record-like patterns); they may hold acknowledged writes newer than the                  last checkpoint (record {durable}), so they are neither replayed nor cut",
                path.display(),
                scan.end,
                bytes.len() - scan.end
            )));
        }
        for gap in &scan.gaps {
            let damage = Damage {
                path: path.to_path_buf(),
                offset: gap.offset as u64,
                len: gap.len as u64,
                after: gap.after,
                before: gap.before,
                durable,
            };
            if !damage.lost().is_empty() {
                return Err(OpenError::Damaged(damage.to_string()));
            }
            tracing::warn!(
                "{}: bytes {}..{} hold no valid record (disk damage), but no record newer than \
                 the last checkpoint (record {durable}) can be in them: nothing is lost",
                path.display(),
                damage.offset,
                damage.offset + damage.len
            );
        }
        if scan.end < bytes.len() {
            // Usually the space the log had reserved or reused (see the module doc).
            tracing::info!(
                "{}: dropping {} bytes from byte {}: no valid record newer than the checkpoint \
                 follows them (space written ahead of the log or left by records already \
                 checkpointed, or a last record a crash cut short, never acknowledged)",
                path.display(),
                bytes.len() - scan.end,
                scan.end
            );
            file.set_len(scan.end as u64)?;
            file.sync_all()?;
        }
        let wal = Self::with(file, path, scan.end as u64, salt);
        Ok((wal, scan.records))
    }

    fn with(file: File, path: &Path, len: u64, salt: Option<u64>) -> Self {
        Self {
            file,
            path: path.to_path_buf(),
            len,
            allocated: len,
            salt,
            #[cfg(test)]
            fail_next_append: None,
        }
    }

    /// Writes a fresh header with `salt` over an empty file and syncs it.
    fn write_header(&mut self, salt: u64) -> io::Result<()> {
        self.file.set_len(0)?;
        self.len = 0;
        self.file.seek(io::SeekFrom::Start(0))?;
        self.allocated = 0;
        self.file.write_all(&header_bytes(salt))?;
        self.file.sync_data()?;
        self.salt = Some(salt);
        self.len = FILE_HEADER as u64;
        self.allocated = self.len;
        Ok(())
    }

    /// Bytes of records in the log.
    pub fn len(&self) -> u64 {
        self.len - self.records_start()
    }

    /// Whether the log holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn records_start(&self) -> u64 {
        if self.salt.is_some() {
            FILE_HEADER as u64
        } else {
            0
        }
    }

    /// Appends a record and returns once it is on disk. On failure the file is cut back
    /// to where it was, so a partial record cannot precede later ones; the error says
    /// whether that worked (see [`AppendError`]).
    pub fn append(&mut self, seq: u64, payload: &[u8]) -> Result<(), AppendError> {
        let length = u32::try_from(payload.len()).map_err(|_| {
            AppendError::NotWritten(io::Error::new(
                io::ErrorKind::InvalidInput,
                "WAL record over 4 GiB",
            ))
        })?;
        let mut record = Vec::with_capacity(HEADER + payload.len());
        record.extend_from_slice(&length.to_le_bytes());
        record.extend_from_slice(&crc(self.salt, seq, payload).to_le_bytes());
        record.extend_from_slice(&seq.to_le_bytes());
        record.extend_from_slice(payload);
        let written = self.write_record(&record);
        match written {
            Ok(()) => {
                self.len += record.len() as u64;
                Ok(())
            }
            Err(e) => {
                #[cfg(test)]
                if self.fail_next_append.take() == Some(false) {
                    return Err(AppendError::Unknown(e));
                }
                let cut = self.file.set_len(self.len);
                if cut.is_ok() {
                    self.allocated = self.len;
                }
                match cut.and_then(|()| self.file.sync_data()) {
                    Ok(()) => Err(AppendError::NotWritten(e)),
                    Err(cut) => {
                        tracing::error!(
                            "{}: could not cut back a failed append ({e}): {cut}",
                            self.path.display()
                        );
                        Err(AppendError::Unknown(e))
                    }
                }
            }
        }
    }

    fn write_record(&mut self, record: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_next_append.is_some() {
            // Half a record reaches the file, as when a disk fills up mid-write.
            self.file
                .write_all_at(&record[..record.len() / 2], self.len)?;
            return Err(io::Error::other("injected append failure"));
        }
        let end = self.len + record.len() as u64;
        if end > self.allocated {
            self.grow(end)?;
        }
        self.file.write_all_at(record, self.len)?;
        // The sync alone: it is what a batch's commit waits for, and what a slow or
        // failing disk shows first.
        let started = std::time::Instant::now();
        let synced = self.file.sync_data();
        metrics::histogram!(crate::metric_names::WAL_FSYNC_DURATION_SECONDS)
            .record(started.elapsed().as_secs_f64());
        synced
    }

    /// Writes zeros from the end of the file past `end` (see the module doc). They are
    /// synced with the record that follows them.
    fn grow(&mut self, end: u64) -> io::Result<()> {
        let target = end + self.allocated.clamp(GROW_MIN, GROW_MAX);
        let zeros = vec![0u8; 64 * 1024];
        let mut at = self.allocated;
        while at < target {
            let n = (target - at).min(zeros.len() as u64);
            // `n` is at most the buffer's length.
            self.file.write_all_at(&zeros[..n as usize], at)?;
            at += n;
            self.allocated = at;
        }
        Ok(())
    }

    /// Empties the log (its records are durable elsewhere): a header with a new salt, so
    /// the records left in the file no longer check, and the next records overwrite them
    /// (see the module doc). A file of the previous layout is cut back and gets a header.
    ///
    /// After an error the caller must reopen the log before appending: whether the disk
    /// holds the old header or the new one is not known, and records appended under the
    /// wrong salt would not be read back.
    pub fn reset(&mut self) -> io::Result<()> {
        let Some(old) = self.salt else {
            self.file.set_len(0)?;
            self.len = 0;
            self.allocated = 0;
            // If writing the header fails the file stays empty and of the old layout,
            // which the appends that follow then use: consistent either way.
            return self.write_header(rand::random());
        };
        let salt = loop {
            let salt = rand::random();
            if salt != old {
                break salt;
            }
        };
        self.file.write_all_at(&header_bytes(salt), 0)?;
        self.salt = Some(salt);
        self.len = FILE_HEADER as u64;
        self.file.sync_data()
    }
}

pub(crate) fn header_bytes(salt: u64) -> [u8; FILE_HEADER] {
    let mut h = [0u8; FILE_HEADER];
    h[..8].copy_from_slice(&MAGIC);
    h[8..16].copy_from_slice(&salt.to_le_bytes());
    let sum = crc32fast::hash(&h[..16]);
    h[16..].copy_from_slice(&sum.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log at a fresh path holding `records`, closed again.
    fn written(records: &[(u64, &[u8])]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w");
        let (mut wal, _) = Wal::open(&path, 0).expect("open");
        for (seq, payload) in records {
            wal.append(*seq, payload).expect("append");
        }
        // Without the zeros written ahead of the log, so that the file ends with the
        // last record, which the tests cut or damage.
        let end = wal.len() + FILE_HEADER as u64;
        drop(wal);
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(end).expect("cut the zeros off");
        (dir, path)
    }

    /// Records `1..=n`, each `size` bytes of its own number.
    fn numbered(n: u64, size: usize) -> Vec<(u64, Vec<u8>)> {
        (1..=n).map(|s| (s, vec![s as u8; size])).collect()
    }

    fn write_numbered(n: u64, size: usize) -> (tempfile::TempDir, PathBuf) {
        let records = numbered(n, size);
        let refs: Vec<(u64, &[u8])> = records.iter().map(|(s, p)| (*s, p.as_slice())).collect();
        written(&refs)
    }

    /// Byte offset of record `seq` in a file written by `write_numbered` with `size`.
    fn offset_of(seq: u64, size: usize) -> usize {
        FILE_HEADER + (seq as usize - 1) * (HEADER + size)
    }

    fn flip(path: &Path, at: usize) {
        let mut bytes = std::fs::read(path).expect("read");
        bytes[at] ^= 0x10;
        std::fs::write(path, &bytes).expect("write");
    }

    /// Cuts the last `bytes` bytes off the file: an append a crash interrupted.
    fn tear(path: &Path, bytes: u64) {
        let full = std::fs::metadata(path).expect("stat").len();
        let f = OpenOptions::new().write(true).open(path).expect("open");
        f.set_len(full - bytes).expect("cut");
    }

    fn damage_of(path: &Path, durable: u64) -> String {
        match Wal::open(path, durable) {
            Err(OpenError::Damaged(d)) => d,
            Err(e) => panic!("not damage: {e}"),
            Ok((_, r)) => panic!("opened with {} records", r.len()),
        }
    }

    #[test]
    fn records_survive_a_reopen_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w");
        {
            let (mut wal, records) = Wal::open(&path, 0).expect("open");
            assert!(records.is_empty() && wal.is_empty());
            wal.append(1, b"one").expect("append");
            wal.append(2, b"").expect("append");
            wal.append(3, &[7u8; 5000]).expect("append");
        }
        let (wal, records) = Wal::open(&path, 0).expect("reopen");
        assert_eq!(
            records,
            vec![(1, b"one".to_vec()), (2, vec![]), (3, vec![7u8; 5000])]
        );
        assert_eq!(
            wal.len() + FILE_HEADER as u64,
            std::fs::metadata(&path).expect("stat").len()
        );
    }

    #[test]
    fn a_torn_tail_is_dropped_and_cut_off() {
        let (_dir, path) = written(&[(1, b"kept"), (2, b"torn record")]);
        let full = std::fs::metadata(&path).expect("stat").len();
        let first_end = (FILE_HEADER + HEADER + 4) as u64;
        for cut in [full - 1, full - 11, first_end + 3] {
            let f = OpenOptions::new().write(true).open(&path).expect("open");
            f.set_len(cut).expect("cut");
            drop(f);
            let (mut wal, records) = Wal::open(&path, 0).expect("reopen");
            assert_eq!(records, vec![(1, b"kept".to_vec())], "cut at {cut}");
            assert_eq!(wal.len(), HEADER as u64 + 4);
            assert_eq!(std::fs::metadata(&path).expect("stat").len(), first_end);
            // Appends go after the last good record.
            wal.append(2, b"torn record").expect("append");
        }
        // A last record of the right length whose bytes never made it (zeros, or a
        // flipped bit) is torn too: nothing valid follows it.
        let (_dir, path) = write_numbered(5, 100);
        flip(&path, offset_of(5, 100) + HEADER + 50);
        let (_, records) = Wal::open(&path, 0).expect("reopen");
        assert_eq!(records.len(), 4);
    }

    #[test]
    fn damage_in_the_middle_is_reported_not_dropped() {
        let size = 100;
        // In the payload, in the CRC, in the length (making it huge or small), in the
        // sequence number: every one is found and named.
        for (what, at) in [
            ("payload", offset_of(4, size) + HEADER + 7),
            ("crc", offset_of(4, size) + 5),
            ("length, high byte", offset_of(4, size) + 3),
            ("length, low byte", offset_of(4, size)),
            ("sequence", offset_of(4, size) + 9),
        ] {
            let (_dir, path) = write_numbered(9, size);
            let before = std::fs::read(&path).expect("read");
            flip(&path, at);
            let damaged = std::fs::read(&path).expect("read");
            let msg = damage_of(&path, 0);
            for part in [
                format!("bytes {}..{}", offset_of(4, size), offset_of(5, size)),
                "between record 3 and record 5".to_string(),
                "records 4..=4".to_string(),
                path.display().to_string(),
            ] {
                assert!(msg.contains(&part), "{what}: {part:?} not in {msg}");
            }
            // Nothing was cut: the file is as the damage left it.
            assert_eq!(std::fs::read(&path).expect("read"), damaged, "{what}");
            assert_ne!(before, damaged);
        }
    }

    #[test]
    fn damage_the_checkpoint_covers_loses_nothing() {
        let (_dir, path) = write_numbered(9, 100);
        flip(&path, offset_of(4, 100) + HEADER + 1);
        // Records up to 6 are in the checkpoint: the gap (record 4) is harmless.
        let (wal, records) = Wal::open(&path, 6).expect("covered");
        let seqs: Vec<u64> = records.iter().map(|(s, _)| *s).collect();
        assert!(seqs.ends_with(&[7, 8, 9]), "{seqs:?}");
        assert!(!seqs.contains(&4));
        assert_eq!(wal.len() as usize + FILE_HEADER, offset_of(10, 100));
        // Covered only up to 3: record 4 would be lost.
        assert!(damage_of(&path, 3).contains("records 4..=4"));
    }

    #[test]
    fn a_value_that_embeds_a_record_does_not_fake_one() {
        // A payload holding a well-formed record (as the previous layout or a guessed
        // salt would write it) with the next sequence number.
        let mut fake = Vec::new();
        let inner = b"fake";
        fake.extend_from_slice(&(inner.len() as u32).to_le_bytes());
        fake.extend_from_slice(&crc(None, 3, inner).to_le_bytes());
        fake.extend_from_slice(&3u64.to_le_bytes());
        fake.extend_from_slice(inner);
        let mut payload = vec![0u8; 40];
        payload.extend_from_slice(&fake);
        payload.extend_from_slice(&[9u8; 40]);
        let (_dir, path) = written(&[(1, b"one"), (2, &payload)]);
        // The record carrying it is torn (cut in its second half): a torn tail, not
        // damage followed by "record 3".
        tear(&path, 20);
        let (_, records) = Wal::open(&path, 0).expect("a torn tail");
        assert_eq!(records, vec![(1, b"one".to_vec())]);
    }

    #[test]
    fn record_lookalikes_stop_the_search_undecided_not_slow() {
        // A torn last record whose payload is 16-byte cells that each pass the cheap
        // checks (a sequence number that can follow, a length reaching the end): every
        // one costs a CRC over the rest of the file. Unbounded, 4 MiB of them took 28 s.
        let size = 4 << 20;
        let mut cells = Vec::with_capacity(size);
        while cells.len() < size {
            // Ending a little before the record does, so the claim fits the torn file.
            let left = (size - cells.len()).saturating_sub(HEADER + 64) as u32;
            cells.extend_from_slice(&left.to_le_bytes());
            cells.extend_from_slice(&0u32.to_le_bytes());
            cells.extend_from_slice(&4u64.to_le_bytes());
        }
        let mut payload = vec![0u8; 3];
        payload.extend_from_slice(&cells);
        let (_dir, path) = written(&[(1, b"one"), (2, b"two"), (3, b"three"), (4, &payload)]);
        tear(&path, 1);
        let before = std::fs::read(&path).expect("read");
        let started = std::time::Instant::now();
        let err = Wal::open(&path, 0).err().expect("refused");
        let took = started.elapsed();
        assert!(
            matches!(&err, OpenError::Damaged(m) if m.contains("could not be decided")),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).expect("read"), before, "nothing cut");
        println!("undecided after {took:?}");

        // The same size of ordinary bytes is a torn tail, cut as always.
        let (_dir, path) = written(&[(1, b"one"), (2, &vec![7u8; size])]);
        tear(&path, 1);
        let (_, records) = Wal::open(&path, 0).expect("a torn tail");
        assert_eq!(records, vec![(1, b"one".to_vec())]);
    }

    #[test]
    fn a_damaged_header_with_records_after_it_is_damage() {
        let (_dir, path) = write_numbered(3, 10);
        flip(&path, 9);
        assert!(damage_of(&path, 0).contains("file header is damaged"));
        // A header cut short with nothing after it: a creation cut short.
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(7).expect("cut");
        drop(f);
        let (mut wal, records) = Wal::open(&path, 0).expect("fresh");
        assert!(records.is_empty());
        wal.append(1, b"x").expect("append");
    }

    #[test]
    fn a_file_of_the_previous_layout_is_read_and_converted_by_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w");
        let mut bytes = Vec::new();
        for (seq, p) in [(5u64, &b"five"[..]), (6, b"six")] {
            bytes.extend_from_slice(&(p.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&crc(None, seq, p).to_le_bytes());
            bytes.extend_from_slice(&seq.to_le_bytes());
            bytes.extend_from_slice(p);
        }
        std::fs::write(&path, &bytes).expect("write");
        let (mut wal, records) = Wal::open(&path, 4).expect("open");
        assert_eq!(records, vec![(5, b"five".to_vec()), (6, b"six".to_vec())]);
        wal.reset().expect("reset");
        wal.append(7, b"seven").expect("append");
        drop(wal);
        assert_eq!(&std::fs::read(&path).expect("read")[..8], &MAGIC);
        let (_, records) = Wal::open(&path, 6).expect("reopen");
        assert_eq!(records, vec![(7, b"seven".to_vec())]);
    }

    #[test]
    fn a_failed_append_says_whether_it_was_cut_back() {
        let (_dir, path) = written(&[(1, b"one")]);
        let (mut wal, _) = Wal::open(&path, 0).expect("open");
        wal.fail_next_append = Some(true);
        assert!(matches!(
            wal.append(2, &[1u8; 100]),
            Err(AppendError::NotWritten(_))
        ));
        wal.append(2, b"two").expect("append after the cut-back");
        drop(wal);
        let (mut wal, records) = Wal::open(&path, 0).expect("reopen");
        assert_eq!(records.len(), 2);
        wal.fail_next_append = Some(false);
        assert!(matches!(
            wal.append(3, &[1u8; 100]),
            Err(AppendError::Unknown(_))
        ));
        drop(wal);
        // Half a record stayed: a torn tail at the next open.
        let (_, records) = Wal::open(&path, 0).expect("reopen");
        assert_eq!(records.len(), 2);
    }

    #[test]
    fn reset_empties_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w");
        let (mut wal, _) = Wal::open(&path, 0).expect("open");
        wal.append(1, b"x").expect("append");
        wal.reset().expect("reset");
        assert!(wal.is_empty());
        wal.append(2, b"y").expect("append");
        drop(wal);
        let (_, records) = Wal::open(&path, 0).expect("reopen");
        assert_eq!(records, vec![(2, b"y".to_vec())]);
    }

    /// A reset keeps the file's space: the next records overwrite the old ones, which
    /// never come back, whatever the checkpoint the open is given.
    #[test]
    fn a_reset_reuses_the_space_and_older_records_stay_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w");
        let (mut wal, _) = Wal::open(&path, 0).expect("open");
        for seq in 1..=20 {
            wal.append(seq, &[seq as u8; 300]).expect("append");
        }
        let grown = std::fs::metadata(&path).expect("stat").len();
        assert!(grown >= GROW_MIN, "the file grew ahead of the log: {grown}");
        wal.reset().expect("reset");
        assert!(wal.is_empty());
        wal.append(21, b"short").expect("append");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), grown);
        drop(wal);
        for durable in [0, 20] {
            let (_, records) = Wal::open(&path, durable).expect("reopen");
            assert_eq!(records, vec![(21, b"short".to_vec())], "durable {durable}");
        }
        // The open cut the old records off; appends grow the file again.
        let (mut wal, _) = Wal::open(&path, 20).expect("reopen");
        wal.append(22, b"next").expect("append");
        drop(wal);
        let (_, records) = Wal::open(&path, 20).expect("reopen");
        assert_eq!(
            records,
            vec![(21, b"short".to_vec()), (22, b"next".to_vec())]
        );
    }

    /// Appends that pass the end of the file write zeros ahead of the log; a reopen reads
    /// the records and drops the zeros.
    #[test]
    fn appends_write_ahead_and_the_zeros_end_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w");
        let (mut wal, _) = Wal::open(&path, 0).expect("open");
        wal.append(1, b"one").expect("append");
        let size = std::fs::metadata(&path).expect("stat").len();
        assert!(size >= GROW_MIN, "{size}");
        wal.append(2, b"two").expect("append");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), size);
        // A large record grows the file past it.
        wal.append(3, &vec![3u8; 2 * GROW_MIN as usize])
            .expect("append");
        assert!(std::fs::metadata(&path).expect("stat").len() > 2 * GROW_MIN);
        drop(wal);
        let (wal, records) = Wal::open(&path, 0).expect("reopen");
        assert_eq!(records.len(), 3);
        assert_eq!(
            wal.len() + FILE_HEADER as u64,
            std::fs::metadata(&path).expect("stat").len()
        );
    }
}
