//! Reading the log: where the records start ([`start_of`]), the records themselves
//! ([`parse`]), and the scan at open that tells a torn tail from damage by searching for
//! a later record that can follow ([`scan`], within [`SEARCH_BUDGET`]). See the parent
//! module's doc for why a later valid record means damage.

use super::{header_bytes, Record, Start, FILE_HEADER, HEADER, MAGIC};

pub(crate) fn start_of(bytes: &[u8]) -> Start {
    if let Some(h) = bytes.get(..FILE_HEADER) {
        let salt = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
        if h[..8] == MAGIC && header_bytes(salt) == h {
            return Start::Salted(salt);
        }
    }
    if parse(bytes, 0, None).is_some() {
        return Start::Legacy;
    }
    Start::Invalid
}

pub(crate) fn crc(salt: Option<u64>, seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    if let Some(salt) = salt {
        h.update(&salt.to_le_bytes());
    }
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// A region between good records that holds none (byte offsets).
pub(crate) struct Gap {
    pub(crate) offset: usize,
    pub(crate) len: usize,
    pub(crate) after: Option<u64>,
    pub(crate) before: u64,
}

/// What [`scan`] found.
pub(crate) struct Scan {
    pub(crate) records: Vec<Record>,
    pub(crate) gaps: Vec<Gap>,
    /// End of the last good record: where a torn tail starts, if anything follows.
    pub(crate) end: usize,
    /// Set when the search for a record after `end` stopped at [`SEARCH_BUDGET`]
    /// without deciding: what follows `end` may be a torn tail or damage.
    pub(crate) undecided: bool,
}

/// Bytes a search for the next record may checksum, per byte left in the file, before
/// it stops undecided (with at least [`SEARCH_BUDGET_MIN`]).
///
/// Most candidates are rejected before any checksum (the sequence number window, a
/// length that fits the file); what remains costs a CRC over the candidate's claimed
/// length. Bytes crafted to pass the cheap checks (values are copied into the log
/// verbatim) could make that quadratic in the torn region's size: the fuzzer's report
/// measured 28 s for a 4 MiB torn record of such bytes. A budget linear in the bytes
/// left keeps an open linear; running out means "cannot tell", and the file is refused
/// (never cut: the bytes could hide acknowledged records).
pub const SEARCH_BUDGET: usize = 16;
/// Least checksum budget of a search, so small files are always decided.
pub const SEARCH_BUDGET_MIN: usize = 64 * 1024 * 1024;

/// Reads records from `start`; at a record that does not check, looks for the next one
/// that can follow (see the module doc) and records the gap.
pub(crate) fn scan(bytes: &[u8], start: usize, salt: Option<u64>, durable: u64) -> Scan {
    let mut records = Vec::new();
    let mut gaps = Vec::new();
    let mut at = start;
    let mut last: Option<u64> = None;
    while at < bytes.len() {
        if let Some((seq, payload, next)) = parse(bytes, at, salt) {
            records.push((seq, payload.to_vec()));
            last = Some(seq);
            at = next;
            continue;
        }
        match search(bytes, at, salt, last.unwrap_or(0).max(durable)) {
            Search::Found(o, seq) => {
                gaps.push(Gap {
                    offset: at,
                    len: o - at,
                    after: last,
                    before: seq,
                });
                at = o;
            }
            Search::None => break,
            Search::Undecided => {
                return Scan {
                    records,
                    gaps,
                    end: at,
                    undecided: true,
                }
            }
        }
    }
    Scan {
        records,
        gaps,
        end: at.min(bytes.len()),
        undecided: false,
    }
}

/// The outcome of a search for the next valid record.
enum Search {
    /// At this offset, with this sequence number.
    Found(usize, u64),
    None,
    /// The checksum budget ran out first (see [`SEARCH_BUDGET`]).
    Undecided,
}

/// Looks for the first valid record after the bad one at `at` that can follow a log
/// whose last good or durable record is `lower` (see the module doc).
fn search(bytes: &[u8], at: usize, salt: Option<u64>, lower: u64) -> Search {
    let mut budget = SEARCH_BUDGET
        .saturating_mul(bytes.len() - at)
        .max(SEARCH_BUDGET_MIN);
    for o in at + 1..bytes.len() {
        let Some(seq) = seq_at(bytes, o) else {
            // No whole header fits any more.
            return Search::None;
        };
        let most = lower.saturating_add(1 + ((o - at) / HEADER) as u64);
        if seq <= lower || seq > most {
            continue;
        }
        let Some(end) = claimed_end(bytes, o) else {
            continue;
        };
        if end - o > budget {
            return Search::Undecided;
        }
        budget -= end - o;
        if parse(bytes, o, salt).is_some() {
            return Search::Found(o, seq);
        }
    }
    Search::None
}

/// Where a record whose header is at `at` ends, if its claimed length fits the file.
fn claimed_end(bytes: &[u8], at: usize) -> Option<usize> {
    let field = bytes.get(at..at.checked_add(4)?)?;
    let length = u32::from_le_bytes(field.try_into().ok()?) as usize;
    let end = at.checked_add(HEADER)?.checked_add(length)?;
    (end <= bytes.len()).then_some(end)
}

/// The sequence number field of a record header at `at`, if the header fits.
fn seq_at(bytes: &[u8], at: usize) -> Option<u64> {
    let field = bytes.get(at.checked_add(8)?..at.checked_add(HEADER)?)?;
    Some(u64::from_le_bytes(field.try_into().ok()?))
}

/// The record at `at`, if a whole one with a matching CRC is there: its sequence number,
/// payload and the offset after it.
pub(crate) fn parse(bytes: &[u8], at: usize, salt: Option<u64>) -> Option<(u64, &[u8], usize)> {
    let header = bytes.get(at..at.checked_add(HEADER)?)?;
    let length = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let sum = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let start = at + HEADER;
    let end = start.checked_add(length)?;
    let payload = bytes.get(start..end)?;
    (crc(salt, seq, payload) == sum).then_some((seq, payload, end))
}
