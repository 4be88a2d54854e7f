//! The `wal`, `wal_open`, `wal_payload` and `key_state` targets: what the node reads
//! back from its disk.

use super::*;

/// The bytes of a WAL file, through the pure reader `Wal::open` runs.
pub fn wal(data: &[u8]) {
    let (salt, start) = match wal::start_of(data) {
        Start::Salted(salt) => (Some(salt), wal::FILE_HEADER),
        Start::Legacy => (None, 0),
        // `open` refuses (or starts afresh when the file is no longer than a header).
        Start::Invalid => return,
    };
    decoded();
    let (first, peak) = peak_allocation(|| wal::scan(data, start, salt, 0));
    check_alloc("wal", data.len(), peak);
    scan_tiles(data, start, salt, 0, &first);
    let last = first.records.iter().map(|r| r.0).max().unwrap_or(0);
    for durable in [last, u64::MAX] {
        let scan = wal::scan(data, start, salt, durable);
        scan_tiles(data, start, salt, durable, &scan);
    }
    for (_, payload) in &first.records {
        ops(payload);
    }
}

/// Checks the records and gaps of `scan` partition `data[start..scan.end]` (see the
/// module doc), and that the gaps read as `Damage` does.
pub(super) fn scan_tiles(
    data: &[u8],
    start: usize,
    salt: Option<u64>,
    durable: u64,
    scan: &wal::Scan,
) {
    assert!(scan.end <= data.len() && scan.end >= start.min(data.len()));
    let mut at = start;
    let mut last: Option<u64> = None;
    let mut gaps = scan.gaps.iter().peekable();
    for (seq, payload) in &scan.records {
        if let Some(gap) = gaps.next_if(|g| g.offset == at) {
            assert!(gap.len > 0, "an empty gap at {at}");
            assert_eq!(gap.after, last, "gap at {at}");
            assert_eq!(gap.before, *seq, "gap at {at}");
            let lower = last.unwrap_or(0).max(durable);
            let most = lower.saturating_add(1 + (gap.len / wal::HEADER) as u64);
            assert!(gap.before > lower && gap.before <= most, "gap at {at}");
            let damage = wal::Damage {
                path: PathBuf::from("kvs.wal"),
                offset: gap.offset as u64,
                len: gap.len as u64,
                after: gap.after,
                before: gap.before,
                durable,
            };
            assert!(!damage.to_string().is_empty());
            at += gap.len;
        }
        match wal::parse(data, at, salt) {
            Some((s, p, next)) => {
                assert_eq!((s, p), (*seq, payload.as_slice()), "record at {at}");
                at = next;
            }
            None => panic!("the scan reported a record at {at} that does not parse"),
        }
        last = Some(*seq);
    }
    assert!(gaps.next().is_none(), "a gap not followed by a record");
    assert_eq!(at, scan.end, "records and gaps do not reach the scan's end");
    if scan.end < data.len() && !scan.undecided {
        assert!(wal::parse(data, scan.end, salt).is_none());
    }
}

thread_local! {
    /// This thread's scratch file for [`wal_open`], removed when the thread ends.
    static SCRATCH: Scratch = Scratch::new();
}

/// A file path that is removed on drop.
pub(super) struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = match std::env::var_os("KVS_FUZZ_DIR") {
            Some(dir) => PathBuf::from(dir),
            None if std::path::Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
            None => std::env::temp_dir(),
        };
        let thread = format!("{:?}", std::thread::current().id());
        let thread: String = thread.chars().filter(char::is_ascii_digit).collect();
        Self(dir.join(format!("kvs-fuzz-{}-{thread}.wal", std::process::id())))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(super) fn scratch() -> PathBuf {
    SCRATCH.with(|s| s.0.clone())
}

/// The bytes of a WAL file, through `Wal::open` on a real file.
pub fn wal_open(data: &[u8]) {
    let path = scratch();
    if let Err(e) = std::fs::write(&path, data) {
        panic!("cannot write the scratch file {}: {e}", path.display());
    }
    let read = |what: &str| match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) => panic!("cannot read the scratch file {what}: {e}"),
    };
    let (wal, records) = match Wal::open(&path, 0) {
        Ok(opened) => opened,
        Err(wal::OpenError::Damaged(msg)) => {
            assert!(!msg.is_empty());
            assert_eq!(read("after a refusal"), data, "a refusal changed the file");
            return;
        }
        Err(wal::OpenError::Io(e)) => panic!("I/O error on the scratch file: {e}"),
    };
    decoded();
    let kept = read("after open");
    let layout = match wal::start_of(data) {
        Start::Salted(salt) => Some((Some(salt), wal::FILE_HEADER)),
        Start::Legacy => Some((None, 0)),
        Start::Invalid => None,
    };
    match layout {
        Some((salt, start)) => {
            let scan = wal::scan(data, start, salt, 0);
            assert_eq!(records, scan.records, "open and the scan disagree");
            assert_eq!(
                kept,
                data[..scan.end],
                "open kept other bytes than the scan"
            );
        }
        None => {
            // No valid header, and nothing after it (else `open` refused): a creation cut
            // short, which `open` starts afresh.
            assert!(
                data.len() <= wal::FILE_HEADER,
                "opened a file with a bad header"
            );
            assert!(records.is_empty());
            assert!(matches!(wal::start_of(&kept), Start::Salted(_)));
            assert_eq!(kept.len(), wal::FILE_HEADER);
        }
    }
    drop(wal);
    // A second open finds what the first left.
    let (mut wal, again) = match Wal::open(&path, 0) {
        Ok(opened) => opened,
        Err(e) => panic!("a second open failed: {e}"),
    };
    assert_eq!(again, records, "a second open read other records");
    assert_eq!(
        read("after a second open"),
        kept,
        "a second open changed the file"
    );
    // An append continues the log.
    let Some(next) = records
        .iter()
        .map(|r| r.0)
        .max()
        .unwrap_or(0)
        .checked_add(1)
    else {
        return;
    };
    if let Err(e) = wal.append(next, b"fuzz") {
        panic!("append to the scratch file failed: {e}");
    }
    drop(wal);
    let (_, after) = match Wal::open(&path, 0) {
        Ok(opened) => opened,
        Err(e) => panic!("an open after an append failed: {e}"),
    };
    let mut expected = records;
    expected.push((next, b"fuzz".to_vec()));
    assert_eq!(after, expected, "the appended record is not read back last");
}

/// One WAL record's payload: the batch's changes.
pub fn wal_payload(data: &[u8]) {
    if ops(data) {
        decoded();
    }
}

/// The checks of [`wal_payload`]; whether `data` decoded.
pub(super) fn ops(data: &[u8]) -> bool {
    let (decoded, peak) = peak_allocation(|| decode_ops(data));
    check_alloc("wal_payload", data.len(), peak);
    let Ok(ops) = decoded else {
        return false;
    };
    let bytes = reencodes("wal_payload", data, &ops);
    assert_eq!(decode_ops(&bytes).ok().as_ref(), Some(&ops));
    for op in &ops {
        if let WalOp::Put { state, .. } = op {
            if let Ok(state) = decode_state(state) {
                check_state(&state);
            }
        }
    }
    true
}

/// A stored key state (the `kv` table's values, and what sync pages carry).
pub fn key_state(data: &[u8]) {
    let (decoded, peak) = peak_allocation(|| decode_state(data));
    check_alloc("key_state", data.len(), peak);
    let Ok(state) = decoded else {
        return;
    };
    self::decoded();
    // A millisecond timestamp of an older store comes out in microseconds
    // (`keystate::legacy_ms`), its varint up to two bytes longer.
    let bytes = reencodes_within("key_state", data, 2 * state.versions.len(), &state);
    assert_eq!(decode_state(&bytes).ok().as_ref(), Some(&state));
    check_state(&state);
}

/// A WAL payload of every [`WalOp`] variant, and a few real-sized ones.
pub(super) fn sample_ops() -> Vec<Vec<WalOp>> {
    let state = encode(&sample_state(2, true));
    let every = vec![
        WalOp::Put {
            slot: 12,
            key: "key_0".into(),
            state: state.clone(),
            live: true,
        },
        WalOp::Put {
            slot: 4095,
            key: "gone".into(),
            state: encode(&sample_state(3, false)),
            live: false,
        },
        WalOp::LogAppend(LogEntry {
            dot: Dot {
                replica: 5,
                counter: 7,
            },
            slot: 12,
            key: "key_0".into(),
        }),
        WalOp::LogTrim { origin: 5, upto: 6 },
        WalOp::SetMeta {
            name: "wal.seq".into(),
            value: 41u64.to_le_bytes().to_vec(),
        },
        WalOp::DeleteMeta {
            name: "transition".into(),
        },
        WalOp::DeleteKey {
            slot: 3,
            key: "moved".into(),
        },
        WalOp::LogClear,
    ];
    let batch: Vec<WalOp> = (0..20u32)
        .map(|i| WalOp::Put {
            slot: i * 200,
            key: format!("k{i}"),
            state: state.clone(),
            live: i % 5 != 0,
        })
        .collect();
    vec![Vec::new(), every, batch]
}

pub(super) fn wal_payloads() -> Vec<Vec<u8>> {
    sample_ops().iter().map(encode).collect()
}

/// WAL files as `Wal` writes them, intact, torn and damaged, and of the previous layout.
pub(super) fn wal_files() -> Vec<Vec<u8>> {
    let path = scratch().with_extension("seed");
    let write = |records: &[(u64, Vec<u8>)]| -> Vec<u8> {
        let _ = std::fs::remove_file(&path);
        let mut wal = match Wal::open(&path, 0) {
            Ok((wal, _)) => wal,
            Err(e) => panic!("creating a seed WAL at {}: {e}", path.display()),
        };
        for (seq, payload) in records {
            if let Err(e) = wal.append(*seq, payload) {
                panic!("writing a seed WAL at {}: {e}", path.display());
            }
        }
        drop(wal);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => panic!("reading the seed WAL {}: {e}", path.display()),
        };
        let _ = std::fs::remove_file(&path);
        bytes
    };
    let payloads = wal_payloads();
    let records: Vec<(u64, Vec<u8>)> = (0..6u64)
        .map(|i| (i + 1, payloads[(i % 3) as usize].clone()))
        .collect();
    let empty = write(&[]);
    let full = write(&records);
    let small = write(&[(7, b"one".to_vec()), (8, Vec::new()), (9, vec![0x55; 40])]);
    let mut seeds = vec![Vec::new(), empty.clone(), empty[..7].to_vec()];
    seeds.push(full.clone());
    seeds.push(small.clone());
    // Torn: cut in the last record.
    seeds.push(full[..full.len() - 5].to_vec());
    seeds.push(small[..small.len() - 30].to_vec());
    // Damaged: a flipped bit in the third record's payload, and in a length field.
    let third = wal::FILE_HEADER + 2 * wal::HEADER + records[0].1.len() + records[1].1.len();
    let mut damaged = full.clone();
    damaged[third + wal::HEADER + 1] ^= 0x10;
    seeds.push(damaged);
    let mut damaged = full.clone();
    damaged[third + 2] ^= 0x01;
    seeds.push(damaged);
    // A damaged file header with records after it.
    let mut damaged = small;
    damaged[9] ^= 0x04;
    seeds.push(damaged);
    // The previous layout: records from offset 0, CRCs without a salt.
    let mut legacy = Vec::new();
    for (seq, payload) in [(5u64, &b"five"[..]), (6, b"six")] {
        legacy.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        legacy.extend_from_slice(&wal::crc(None, seq, payload).to_le_bytes());
        legacy.extend_from_slice(&seq.to_le_bytes());
        legacy.extend_from_slice(payload);
    }
    seeds.push(legacy);
    seeds
}
