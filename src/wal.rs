//! The write-ahead log file of the redb engine (see `storage` for how it is used).
//!
//! # Design
//!
//! An append-only file of records, each
//! `[length: u32 LE][crc32: u32 LE][sequence: u64 LE][payload: length bytes]`, where the
//! CRC covers the sequence number and the payload. [`Wal::append`] writes one record and
//! calls `fdatasync` before it returns: one sequential write and one sync per batch,
//! where a durable redb commit writes every page the batch touched, wherever it lies, and
//! syncs. [`Wal::reset`] empties the file once the engine has made everything in it
//! durable by other means (a checkpoint).
//!
//! [`Wal::open`] reads every whole record. A crash can leave the last record torn (cut
//! short, or with a CRC that does not match); reading stops there and the file is cut
//! back to the end of the last good record, so the next append starts from a clean end.
//! A record is torn only if its `fdatasync` never returned, so no write it carried was
//! acknowledged.
//!
//! # Caveats
//!
//! * The whole file is read into memory at open; the engine bounds it by checkpointing
//!   (`storage::CHECKPOINT_BYTES`).
//! * A damaged record in the middle of the file (a disk error, not a crash) also ends the
//!   replay there; the records after it are dropped with it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Bytes before a record's payload: length, CRC, sequence number.
const HEADER: usize = 16;

/// A record read back: its sequence number and payload.
pub type Record = (u64, Vec<u8>);

/// An open write-ahead log.
pub struct Wal {
    file: File,
    path: PathBuf,
    /// Bytes of whole records in the file: where the next one goes.
    len: u64,
}

impl Wal {
    /// Opens (or creates) the log at `path` and returns it with every whole record in it,
    /// in order, as `(sequence, payload)`.
    pub fn open(path: &Path) -> io::Result<(Self, Vec<Record>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut records = Vec::new();
        let mut at = 0usize;
        while let Some((seq, payload, next)) = parse(&bytes, at) {
            records.push((seq, payload.to_vec()));
            at = next;
        }
        if at < bytes.len() {
            tracing::warn!(
                "{}: dropping {} bytes of a torn last record (a crash during its write)",
                path.display(),
                bytes.len() - at
            );
            file.set_len(at as u64)?;
            file.sync_all()?;
        }
        let wal = Self {
            file,
            path: path.to_path_buf(),
            len: at as u64,
        };
        Ok((wal, records))
    }

    /// Bytes of records in the log.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the log holds no record.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a record and returns once it is on disk. On failure the file is cut back
    /// to where it was, so a partial record cannot precede later ones.
    pub fn append(&mut self, seq: u64, payload: &[u8]) -> io::Result<()> {
        let length = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "WAL record over 4 GiB"))?;
        let mut record = Vec::with_capacity(HEADER + payload.len());
        record.extend_from_slice(&length.to_le_bytes());
        record.extend_from_slice(&crc(seq, payload).to_le_bytes());
        record.extend_from_slice(&seq.to_le_bytes());
        record.extend_from_slice(payload);
        let written = self
            .write_at_end(&record)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += record.len() as u64;
                Ok(())
            }
            Err(e) => {
                if let Err(cut) = self.file.set_len(self.len) {
                    tracing::error!(
                        "{}: could not cut back a failed append: {cut}",
                        self.path.display()
                    );
                }
                Err(e)
            }
        }
    }

    fn write_at_end(&mut self, record: &[u8]) -> io::Result<()> {
        use std::io::Seek;
        self.file.seek(io::SeekFrom::Start(self.len))?;
        self.file.write_all(record)
    }

    /// Empties the log (its records are durable elsewhere).
    pub fn reset(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        // From here on appends start at 0, even if the sync fails: appending after the
        // old end would leave a hole of zeros that ends the log at the next open.
        self.len = 0;
        self.file.sync_data()
    }
}

fn crc(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The record at `at`, if a whole one with a matching CRC is there: its sequence number,
/// payload and the offset after it.
fn parse(bytes: &[u8], at: usize) -> Option<(u64, &[u8], usize)> {
    let header = bytes.get(at..at.checked_add(HEADER)?)?;
    let length = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let sum = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let start = at + HEADER;
    let end = start.checked_add(length)?;
    let payload = bytes.get(start..end)?;
    (crc(seq, payload) == sum).then_some((seq, payload, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log at a fresh path holding `records`, closed again.
    fn written(records: &[(u64, &[u8])]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w");
        let (mut wal, _) = Wal::open(&path).expect("open");
        for (seq, payload) in records {
            wal.append(*seq, payload).expect("append");
        }
        (dir, path)
    }

    #[test]
    fn records_survive_a_reopen_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w");
        {
            let (mut wal, records) = Wal::open(&path).expect("open");
            assert!(records.is_empty() && wal.is_empty());
            wal.append(1, b"one").expect("append");
            wal.append(2, b"").expect("append");
            wal.append(3, &[7u8; 5000]).expect("append");
        }
        let (wal, records) = Wal::open(&path).expect("reopen");
        assert_eq!(
            records,
            vec![(1, b"one".to_vec()), (2, vec![]), (3, vec![7u8; 5000])]
        );
        assert_eq!(wal.len(), std::fs::metadata(&path).expect("stat").len());
    }

    #[test]
    fn a_torn_tail_is_dropped_and_cut_off() {
        let (_dir, path) = written(&[(1, b"kept"), (2, b"torn record")]);
        let full = std::fs::metadata(&path).expect("stat").len();
        for cut in [full - 1, full - 11, HEADER as u64 + 4 + 3] {
            let f = OpenOptions::new().write(true).open(&path).expect("open");
            f.set_len(cut).expect("cut");
            drop(f);
            let (mut wal, records) = Wal::open(&path).expect("reopen");
            assert_eq!(records, vec![(1, b"kept".to_vec())], "cut at {cut}");
            assert_eq!(wal.len(), HEADER as u64 + 4);
            // Appends go after the last good record.
            wal.append(2, b"torn record").expect("append");
        }
    }

    #[test]
    fn a_corrupt_record_ends_the_log() {
        let (_dir, path) = written(&[(1, b"good"), (2, b"flipped")]);
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        let (_, records) = Wal::open(&path).expect("reopen");
        assert_eq!(records, vec![(1, b"good".to_vec())]);
    }

    #[test]
    fn reset_empties_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w");
        let (mut wal, _) = Wal::open(&path).expect("open");
        wal.append(1, b"x").expect("append");
        wal.reset().expect("reset");
        wal.append(2, b"y").expect("append");
        drop(wal);
        let (_, records) = Wal::open(&path).expect("reopen");
        assert_eq!(records, vec![(2, b"y".to_vec())]);
    }
}
