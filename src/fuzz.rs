//! Fuzz targets for every parser and decoder that takes bytes from outside the node.
//!
//! # What comes from outside, and where it is parsed
//!
//! | target | input | reaches it | decoder under test |
//! |---|---|---|---|
//! | [`form`] | a `/kv-store` request body or query string, an `ip_port` or `VIEW` text, an `Authorization` header | any client; the operator | `api::kv_store::parse_form`, `placement::parse_addr`, `placement::parse_view_list`, `api::admin_credential` |
//! | [`token`] | `causal_payload` | any client: its postcard payload is decoded *before* the tag is checked | `clock::CausalToken::decode` |
//! | [`envelope`] | the body of `POST /_internal/v1/rpc` | peers; with the public default secret, anyone: the body is decoded before the member proof is checked (`server::http::rpc_endpoint`) | `rpc::decode::<Envelope>`, then `View::check` and `Proposal::check` on what it carries |
//! | [`response`] | a peer's answer to a call | peers (and whoever answers on their address) | `rpc::decode::<Response>`, the views, proposals and key states inside |
//! | [`wal`] | the bytes of `kvs.wal` | the disk: a torn write, a flipped bit, a lost sector | the pure reader `Wal::open` runs (`wal::start_of`, `wal::scan`, `wal::parse`) |
//! | [`wal_open`] | the same, as a file | the disk | `wal::Wal::open` itself, its cut-back, a reopen and an append |
//! | [`wal_payload`] | one WAL record's payload | the disk (a record whose CRC matches but whose bytes are wrong: a bug of an older build, or a CRC collision) | `storage::decode_ops` (the replay's decoder) and the key states it carries |
//! | [`key_state`] | a value of the `kv` table | the disk, and peers (sync and snapshot pages carry key states that replicas merge) | `storage::decode_state`, then what a replica does with a state: `merge`, `winner`, ... |
//!
//! # What each target checks
//!
//! A violated property panics: that is a finding. Every target checks that nothing
//! panics (an unchecked index, an overflow in a debug build, a `debug_assert!`), and,
//! when the global allocator is [`CountingAlloc`] (it is in `tests/fuzz.rs` and in every
//! `fuzz/` target), that decoding allocates at most [`ALLOC_PER_INPUT_BYTE`] bytes per
//! input byte plus [`ALLOC_BASE`]: memory driven by the bytes present, never by a length
//! field claiming more. Beyond that:
//!
//! * **form**: the fields are exactly what `application/x-www-form-urlencoded` decoding
//!   gives (an independent byte-level decoder here is the oracle, and
//!   `form_urlencoded::parse` agrees with it on accepted forms), a form is refused (400)
//!   exactly when a name or value is not UTF-8 once decoded, and the decoded fields are
//!   no larger than the input (`admit` charges the body's budget for them). An accepted
//!   address is a fixed point of its normalisation; an accepted VIEW list is non-empty,
//!   without duplicates, and parses back to itself. A bearer credential is the trimmed
//!   text after a `bearer ` scheme.
//! * **token**: whatever decodes re-encodes to a text no longer than the input that
//!   decodes to the same token; the input was within [`MAX_TOKEN_LEN`]. The input is also
//!   signed as a payload with the target's key (what a node holding the cluster key would
//!   issue), so the decoder past the tag is reached too.
//! * **envelope**, **response**, **wal_payload**, **key_state**: whatever decodes
//!   re-encodes to at most as many bytes, which decode to a value that re-encodes to the
//!   same bytes (`Envelope` and `Response` have no `PartialEq`, so equality is of the
//!   encodings). Views and proposals inside are checked; those that pass have their slots
//!   routed and their plan computed, as a node would. Key states inside are merged with
//!   themselves and into an empty state (idempotent, sorted), as replicas merge them.
//! * **wal**: the records and gaps the scan reports tile the bytes exactly from the
//!   header to where it stops, each record is one `parse` finds at its offset, every gap's
//!   next sequence number is in the window the module doc of `wal` promises, and what is
//!   dropped as a torn tail holds no record at its start. Run with three checkpoints: none,
//!   the last record found (every gap harmless), and `u64::MAX`.
//! * **wal_open**: `Wal::open` on the bytes agrees with the pure scan (same records; the
//!   file cut back to the scan's end, or a fresh header for a creation cut short); a
//!   refusal leaves the file untouched; a second open changes nothing; an append after it
//!   is read back after the earlier records.
//!
//! # Running them
//!
//! `tests/fuzz.rs` runs every target on a bounded number of mutated [`seeds`] in
//! `cargo test`. `fuzz/` is a `cargo fuzz` crate whose targets call these functions under
//! libFuzzer, on the stable toolchain (`fuzz/run.sh TARGET SECONDS`; README).
//!
//! # Caveats
//!
//! * [`wal_open`] writes one scratch file per thread, in `KVS_FUZZ_DIR` if set, else
//!   `/dev/shm` (so its fsyncs cost nothing), else the temp directory.
//! * The targets decode with fixed keys ([`token`]'s signing key); the cluster key's
//!   derivations and the member-proof check are not parsers and are not fuzzed here.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;

use base64::Engine as _;

use crate::auth::{ClusterKey, KEY_LEN, NONCE_LEN};
use crate::clock::{CausalToken, Dot, TokenKey, VersionVector, MAX_TOKEN_LEN};
use crate::error::{Error, ErrorKind};
use crate::placement::{parse_addr, parse_view_list, Change, View, SLOTS};
use crate::replica::{
    Claim, KeyState, SnapshotPage, SnapshotRequest, SyncRequest, SyncResponse, Version,
};
use crate::rpc::{
    Envelope, KeyAnswer, LearnReply, NodeStatus, PaxosReply, ReadReply, Request, Response,
    WriteReply,
};
use crate::storage::{decode_ops, decode_state, LogEntry, WalOp};
use crate::viewchange::{AcceptReply, Ballot, PrepareReply, Proposal, PullKey, PullProgress};
use crate::wal::{self, Start, Wal};

/// Every target, by the name [`run`], [`seeds`] and the `fuzz/` crate use.
pub const TARGETS: [&str; 8] = [
    "form",
    "token",
    "envelope",
    "response",
    "wal",
    "wal_open",
    "wal_payload",
    "key_state",
];

/// Runs target `name` on `data`; false for an unknown name.
pub fn run(name: &str, data: &[u8]) -> bool {
    let target: fn(&[u8]) = match name {
        "form" => form,
        "token" => token,
        "envelope" => envelope,
        "response" => response,
        "wal" => wal,
        "wal_open" => wal_open,
        "wal_payload" => wal_payload,
        "key_state" => key_state,
        _ => return false,
    };
    target(data);
    true
}

// ---------------------------------------------------------------------------------------
// Allocation accounting

/// Bytes a decoder may allocate per input byte. Decoded values are larger than their
/// encodings (a one-byte empty string is a 24-byte `String`, a version vector of one
/// entry a B-tree leaf of a few hundred bytes, growing `Vec`s double), so this is
/// generous; what it must catch is allocation that a length field drives, which is
/// unbounded per input byte.
pub const ALLOC_PER_INPUT_BYTE: usize = 512;
/// Bytes any input may allocate on top: serde preallocates up to 1 MiB for a sequence
/// whose declared length it cannot yet check (`serde::de::size_hint::cautious`), and
/// nested sequences (a page of states, a state's versions, ...) each do, one chain at a
/// time.
pub const ALLOC_BASE: usize = 8 << 20;

thread_local! {
    /// Inputs this thread's targets decoded (or parsed) successfully: see [`take_decoded`].
    static DECODED: Cell<u64> = const { Cell::new(0) };
}

/// Counts one input that got past its decoder, so a run can say how many did.
fn decoded() {
    DECODED.with(|d| d.set(d.get() + 1));
}

/// How many inputs this thread's targets decoded since the last call (an input some
/// part of the target accepted: a form, a token, a message, a WAL file that opened).
pub fn take_decoded() -> u64 {
    DECODED.with(|d| d.replace(0))
}

thread_local! {
    /// Bytes this thread has allocated and not freed (through [`CountingAlloc`]).
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// The most [`LIVE`] reached since [`peak_allocation`] reset it.
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    // `try_with`: a thread being torn down may still free memory; its counts no longer
    // matter. Neither cell allocates.
    let _ = LIVE.try_with(|live| {
        let now = live.get().wrapping_add(delta);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn size(bytes: usize) -> isize {
    isize::try_from(bytes).unwrap_or(isize::MAX)
}

/// The system allocator, counting each thread's live bytes and their peak, so a fuzz
/// target can check what a decoder allocated ([`peak_allocation`]). Install it with
/// `#[global_allocator]` in the binary that runs the targets.
pub struct CountingAlloc;

// SAFETY: every call is forwarded to `System` unchanged; the counting touches only
// thread-local cells, which neither allocate nor unwind.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            account(size(layout.size()));
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            account(size(layout.size()));
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        account(-size(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            // Counted as if both blocks were live for a moment, as they may be.
            account(size(new_size));
            account(-size(layout.size()));
        }
        p
    }
}

/// Runs `f` and returns its result with the most bytes this thread had allocated at once
/// while it ran, beyond what it held before; `None` when [`CountingAlloc`] is not the
/// global allocator.
pub fn peak_allocation<R>(f: impl FnOnce() -> R) -> (R, Option<usize>) {
    let live = || LIVE.try_with(Cell::get).unwrap_or(0);
    let probe = std::hint::black_box(Box::new([0u8; 64]));
    let counting = live() != 0 && {
        let before = live();
        drop(probe);
        live() != before
    };
    let start = live();
    let _ = PEAK.try_with(|p| p.set(start));
    let result = f();
    let peak = PEAK.try_with(Cell::get).unwrap_or(start);
    let grown = usize::try_from(peak.saturating_sub(start)).unwrap_or(0);
    (result, counting.then_some(grown))
}

/// Panics if decoding `len` bytes for `target` allocated more than the bound.
fn check_alloc(target: &str, len: usize, peak: Option<usize>) {
    if let Some(peak) = peak {
        let bound = ALLOC_BASE.saturating_add(len.saturating_mul(ALLOC_PER_INPUT_BYTE));
        assert!(
            peak <= bound,
            "{target}: decoding {len} bytes allocated {peak} bytes at once (bound {bound})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// form

/// `/kv-store` form bodies and query strings, and the other small texts that come from
/// outside: the `ip_port` field and `VIEW` (addresses) and the `Authorization` header.
/// Every parser gets the whole input.
pub fn form(data: &[u8]) {
    let (parsed, peak) = peak_allocation(|| {
        let mut fields = HashMap::new();
        crate::api::kv_store::parse_form(data, &mut fields).map(|()| fields)
    });
    check_alloc("form", data.len(), peak);
    match (parsed, form_oracle(data)) {
        (Ok(fields), Some(expected)) => {
            decoded();
            assert_eq!(fields, expected, "form fields differ from the oracle's");
            let lossy: HashMap<String, String> = form_urlencoded::parse(data)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            assert_eq!(fields, lossy, "form fields differ from form_urlencoded's");
            let decoded: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert!(decoded <= data.len(), "decoding grew the fields");
        }
        (Err(e), None) => {
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert!(e.message.contains("UTF-8"), "{}", e.message);
        }
        (Ok(fields), None) => panic!("accepted a form with a non-UTF-8 field: {fields:?}"),
        (Err(e), Some(expected)) => panic!("refused a valid form ({e}): {expected:?}"),
    }
    if let Ok(text) = std::str::from_utf8(data) {
        addresses(text);
    }
    bearer(data);
}

/// What the form decodes to, or `None` if a name or value is not UTF-8 once decoded: an
/// oracle written byte by byte from the `application/x-www-form-urlencoded` rules
/// (pairs split at `&`, name and value at the first `=`, `+` a space, `%XX` a byte,
/// any other `%` itself), independent of the parser under test.
fn form_oracle(data: &[u8]) -> Option<HashMap<String, String>> {
    fn hex(b: u8) -> Option<u8> {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    fn decode(raw: &[u8]) -> Option<String> {
        let mut out = Vec::with_capacity(raw.len());
        let mut i = 0;
        while let Some(&b) = raw.get(i) {
            let escaped = match (b, raw.get(i + 1), raw.get(i + 2)) {
                (b'%', Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| h << 4 | l),
                _ => None,
            };
            match escaped {
                Some(byte) => {
                    out.push(byte);
                    i += 3;
                }
                None => {
                    out.push(if b == b'+' { b' ' } else { b });
                    i += 1;
                }
            }
        }
        String::from_utf8(out).ok()
    }
    let mut fields = HashMap::new();
    for pair in data.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &[][..]),
        };
        let name = decode(name)?;
        let value = decode(value)?;
        fields.insert(name, value);
    }
    Some(fields)
}

/// `ip_port` and `VIEW`: an accepted address is normal (parsing it again gives it back),
/// an accepted list has no duplicates and parses back to itself.
fn addresses(text: &str) {
    if let Ok(addr) = parse_addr(text) {
        assert!(addr.parse::<SocketAddr>().is_ok(), "{addr:?}");
        assert_eq!(parse_addr(&addr), Ok(addr.clone()), "not normal: {addr:?}");
    }
    if let Ok(list) = parse_view_list(text) {
        assert!(!list.is_empty());
        for (i, m) in list.iter().enumerate() {
            assert!(!list[..i].contains(m), "duplicate {m:?}");
            assert_eq!(parse_addr(m).as_ref(), Ok(m), "not normal: {m:?}");
        }
        assert_eq!(parse_view_list(&list.join(",")), Ok(list));
    }
}

/// The `Authorization` header: a credential is the trimmed rest after `bearer `.
fn bearer(data: &[u8]) {
    use axum::http::{header::AUTHORIZATION, HeaderMap, HeaderValue};
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, value);
    let Some(token) = crate::api::admin_credential(&headers) else {
        return;
    };
    let text = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim();
    let scheme = text.get(..7).unwrap_or_default();
    assert!(scheme.eq_ignore_ascii_case("bearer "), "{text:?}");
    assert_eq!(token, token.trim());
    assert!(
        text.ends_with(token),
        "{token:?} is not the end of {text:?}"
    );
}

// ---------------------------------------------------------------------------------------
// token

/// The key the token target's node holds. Any fixed key will do: the tag is checked
/// after the payload is decoded, so the decoder sees whatever a client sends.
const TOKEN_KEY: [u8; 32] = [0x5a; 32];
/// The cluster id the token target's node has.
pub const TOKEN_CLUSTER: u64 = 0x6b76_735f_6675_7a7a;

fn token_key() -> TokenKey {
    TokenKey::from_bytes(TOKEN_KEY)
}

/// `payload` as a node holding [`TOKEN_KEY`] would issue it: `c2.<base64>.<tag>`, the
/// tag as `clock::TokenKey` computes it (`tests/fuzz.rs` checks the two agree).
pub fn sign_token_payload(payload: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let tag = blake3::keyed_hash(&TOKEN_KEY, payload);
    format!(
        "c2.{}.{}",
        b64.encode(payload),
        b64.encode(&tag.as_bytes()[..16])
    )
}

/// `causal_payload` as a client sends it (the bytes as text), and the bytes as a payload
/// signed with the node's key.
pub fn token(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let key = token_key();
    let (decoded, peak) = peak_allocation(|| CausalToken::decode(&text, TOKEN_CLUSTER, &key));
    check_alloc("token", data.len(), peak);
    if let Ok(t) = decoded {
        self::decoded();
        token_round_trips(&text, &t);
    }
    if data.len() <= MAX_TOKEN_LEN {
        let signed = sign_token_payload(data);
        let (decoded, peak) = peak_allocation(|| CausalToken::decode(&signed, TOKEN_CLUSTER, &key));
        check_alloc("token", signed.len(), peak);
        if let Ok(t) = decoded {
            token_round_trips(&signed, &t);
        }
    }
}

fn token_round_trips(text: &str, t: &CausalToken) {
    let key = token_key();
    let text = text.trim();
    if text.is_empty() {
        assert_eq!(t, &CausalToken::empty(TOKEN_CLUSTER));
        return;
    }
    assert!(
        text.len() <= MAX_TOKEN_LEN,
        "a {} byte token decoded",
        text.len()
    );
    assert_eq!(t.cluster, TOKEN_CLUSTER);
    let again = t.encode(&key);
    assert!(
        again.len() <= text.len(),
        "re-encoding grew a token from {} to {} bytes",
        text.len(),
        again.len()
    );
    assert_eq!(
        CausalToken::decode(&again, TOKEN_CLUSTER, &key).as_ref(),
        Ok(t)
    );
}

// ---------------------------------------------------------------------------------------
// the internal message codec

/// Checks that `value`, decoded from `data`, re-encodes to at most `data.len()` bytes
/// that decode to a value with the same encoding.
fn reencodes<T>(what: &str, data: &[u8], value: &T) -> Vec<u8>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let bytes = postcard::to_stdvec(value).expect("every message type serializes");
    assert!(
        bytes.len() <= data.len(),
        "{what}: {} bytes re-encode to {}",
        data.len(),
        bytes.len()
    );
    let again: T = match postcard::from_bytes(&bytes) {
        Ok(v) => v,
        Err(e) => panic!("{what}: a re-encoding does not decode: {e}"),
    };
    let twice = postcard::to_stdvec(&again).expect("every message type serializes");
    assert_eq!(twice, bytes, "{what}: the re-encoding does not round-trip");
    bytes
}

/// The body of `POST /_internal/v1/rpc`.
pub fn envelope(data: &[u8]) {
    let (decoded, peak) = peak_allocation(|| crate::rpc::decode::<Envelope>(data));
    check_alloc("envelope", data.len(), peak);
    let Ok(env) = decoded else {
        return;
    };
    self::decoded();
    reencodes("envelope", data, &env);
    match &env.body {
        Request::Accept { proposal, .. } | Request::Learn(proposal) => check_proposal(proposal),
        Request::Install(view) => check_view(view),
        Request::Snapshot(req) => {
            if let Some(slots) = &req.slots {
                // What a replica does with the slots asked for.
                let mut owned = crate::placement::SlotSet::new();
                owned.insert(0);
                owned.intersect(slots);
                assert!(owned.len() <= 1 && slots.iter().count() <= SLOTS as usize);
            }
        }
        _ => {}
    }
}

/// A peer's answer.
pub fn response(data: &[u8]) {
    let (decoded, peak) = peak_allocation(|| crate::rpc::decode::<Response>(data));
    check_alloc("response", data.len(), peak);
    let Ok(resp) = decoded else {
        return;
    };
    self::decoded();
    reencodes("response", data, &resp);
    match &resp {
        Response::Sync(page) => page.states.iter().for_each(|(_, _, s)| check_state(s)),
        Response::Snapshot(page) => page.states.iter().for_each(|(_, _, s)| check_state(s)),
        Response::Status(status) => {
            if let Some(view) = &status.view {
                check_view(view);
            }
            if let Some(p) = &status.transition {
                check_proposal(p);
            }
        }
        Response::Paxos(PaxosReply::Chosen(p)) => check_proposal(p),
        Response::Paxos(PaxosReply::Prepare(PrepareReply::Promise(Some(accepted)))) => {
            check_proposal(&accepted.1)
        }
        _ => {}
    }
}

/// A view from a peer: `check` must not panic; a view it passes is used as a node uses
/// it (route keys and slots, list roles).
fn check_view(view: &View) {
    if view.check().is_err() {
        return;
    }
    for key in ["", "a", "key_1", "hello"] {
        let uid = view.partition_of_key(key);
        assert!(view.replicas_of(uid).is_some(), "slot of {key:?} unowned");
    }
    for slot in [0, SLOTS / 2, SLOTS - 1] {
        let uid = view.owner_of_slot(slot);
        assert!(view.index_of(uid).is_some());
    }
    for m in &view.members {
        assert!(view.role_of(m).is_some());
    }
    let _ = view.proxies();
}

/// A proposal from a peer: `check` must not panic; one it passes is planned, as a node
/// that learns it does.
fn check_proposal(p: &Proposal) {
    check_view(&p.from);
    check_view(&p.to);
    if p.check().is_err() {
        return;
    }
    let plan = p.plan();
    assert!(plan.moved_slots() <= SLOTS as usize);
    let _ = plan.sources();
    let _ = p.participants();
}

/// A key state from disk or a peer: what replicas do with one must not panic, merging
/// it into itself changes nothing, and merging it into an empty state sorts it and, when
/// no two of its versions share a dot, is idempotent.
fn check_state(state: &KeyState) {
    let _ = state.winner();
    let _ = state.visible();
    let _ = state.is_live();
    let _ = state.history();
    let _ = state.approx_size();
    let mut token = CausalToken::empty(1);
    state.observe_into(0, &mut token);
    let mut same = state.clone();
    assert!(!same.merge(state), "merging a state into itself changed it");
    assert_eq!(&same, state);
    let mut merged = KeyState::default();
    merged.merge(state);
    assert!(
        merged.versions.windows(2).all(|w| w[0].dot <= w[1].dot),
        "a merge left versions unsorted"
    );
    // A dot names one write (`KeyState::merge` relies on it), so honest states never
    // hold two versions with one dot; with two, one of them may stand in for the other
    // in a later merge, so idempotence is checked only without them. (Found by the
    // `response` fuzz target: not a bug, a property that needs the invariant.)
    let mut dots: Vec<Dot> = state.versions.iter().map(|v| v.dot).collect();
    dots.sort_unstable();
    dots.dedup();
    if dots.len() == state.versions.len() {
        let mut again = merged.clone();
        assert!(
            !again.merge(state),
            "merging the same state twice changed it"
        );
        assert_eq!(again, merged);
    }
}

// ---------------------------------------------------------------------------------------
// the WAL

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
fn scan_tiles(data: &[u8], start: usize, salt: Option<u64>, durable: u64, scan: &wal::Scan) {
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
struct Scratch(PathBuf);

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

fn scratch() -> PathBuf {
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
fn ops(data: &[u8]) -> bool {
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
    let bytes = reencodes("key_state", data, &state);
    assert_eq!(decode_state(&bytes).ok().as_ref(), Some(&state));
    check_state(&state);
}

// ---------------------------------------------------------------------------------------
// seeds

/// Valid inputs of every shape `name` parses (empty for an unknown target), for the
/// mutation fuzzer of `tests/fuzz.rs` and the initial corpus of `fuzz/`.
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    match name {
        "form" => form_seeds(),
        "token" => token_seeds(),
        "envelope" => envelopes().iter().map(crate::rpc::encode).collect(),
        "response" => responses().iter().map(crate::rpc::encode).collect(),
        "wal" | "wal_open" => wal_files(),
        "wal_payload" => wal_payloads(),
        "key_state" => key_states().iter().map(encode).collect(),
        _ => Vec::new(),
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("seed values serialize")
}

fn form_seeds() -> Vec<Vec<u8>> {
    let token = sample_token(3, 2).encode(&token_key());
    let mut seeds: Vec<Vec<u8>> = [
        "",
        "val=hello&causal_payload=",
        "causal_payload=&val=a+b%20c%2Bd",
        "val=caf%C3%A9+%E2%82%AC+%F0%9F%98%80&x=%zz%2",
        "val=%%41%4&&=&a&b=&=c",
        "ip_port=10.0.0.25:8080&type=add",
        "partition_id=1",
        "10.0.0.21:8080,10.0.0.22:8080, 10.0.0.23:8080,",
        " [::1]:8080 ",
        "[fe80::1%25eth0]:80",
        "Bearer s3cret",
        "bearer  tok ",
        "Basic dXNlcjpwYXNz",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    seeds.push(format!("val=v&causal_payload={token}").into_bytes());
    seeds.push(b"val=\xff&causal_payload=".to_vec());
    seeds.push(b"v%FFl=1".to_vec());
    seeds.push(b"val=caf\xc3\xa9&k=%C3".to_vec());
    seeds.push(format!("val={}", "x%41+".repeat(200)).into_bytes());
    seeds
}

/// A token over `parts` partitions of `replicas` replicas each.
fn sample_token(parts: u32, replicas: u64) -> CausalToken {
    let mut t = CausalToken::empty(TOKEN_CLUSTER);
    t.observe_epoch(u64::from(parts) + 1);
    for p in 0..parts {
        let vv: VersionVector = (0..replicas)
            .map(|r| (0x1000_0000_0000 + r * 7919, 1 + r * 1000 + u64::from(p)))
            .collect();
        t.observe(p, &vv);
    }
    t
}

fn token_seeds() -> Vec<Vec<u8>> {
    let key = token_key();
    let mut seeds = vec![Vec::new(), b"  ".to_vec()];
    for (parts, replicas) in [(0, 0), (1, 1), (3, 2), (8, 3), (64, 4), (400, 6)] {
        let t = sample_token(parts, replicas);
        seeds.push(t.encode(&key).into_bytes());
        // The postcard payload alone: the target also signs its input.
        seeds.push(encode(&t));
    }
    let t = sample_token(2, 2).encode(&key);
    seeds.push(format!(" {t}\n").into_bytes());
    let foreign = CausalToken::empty(TOKEN_CLUSTER + 1).encode(&key);
    seeds.push(foreign.into_bytes());
    let other_key = CausalToken::empty(TOKEN_CLUSTER).encode(&TokenKey::from_bytes([1; 32]));
    seeds.push(other_key.into_bytes());
    for garbage in ["c2.AAAA", "c2..", "c1.AA.AA", "c2.AA.AA"] {
        seeds.push(garbage.as_bytes().to_vec());
    }
    seeds
}

fn addr(i: usize) -> String {
    format!("10.0.0.{}:8080", 20 + i)
}

/// A view of `n` members with K = `k` (the first view `VIEW`/`K` give).
fn sample_view(n: usize, k: usize) -> View {
    match View::bootstrap((1..=n).map(addr).collect(), k) {
        Ok(v) => v,
        Err(e) => panic!("seed view: {e}"),
    }
}

fn sample_proposals() -> Vec<Proposal> {
    let mut out = Vec::new();
    for (n, k, change) in [
        (4, 2, Change::Add(addr(5))),
        (5, 2, Change::Add(addr(6))),
        (6, 2, Change::Remove(addr(2))),
        (5, 2, Change::Remove(addr(5))),
        (3, 1, Change::Remove(addr(1))),
    ] {
        match Proposal::new(change, &sample_view(n, k)) {
            Ok(p) => out.push(p),
            Err(e) => panic!("seed proposal: {e}"),
        }
    }
    out
}

fn sample_state(versions: u64, deps: bool) -> KeyState {
    let versions = (0..versions)
        .map(|i| {
            let dot = Dot {
                replica: 0xabc0 + i,
                counter: 10 + i,
            };
            let mut vv: VersionVector = [(dot.replica, dot.counter)].into_iter().collect();
            vv.raise(0xabc0, 3);
            let mut dep = BTreeMap::new();
            if deps {
                dep.insert(2, [(77, 5), (78, 1)].into_iter().collect());
            }
            Version {
                dot,
                vv,
                deps: dep,
                timestamp_ms: 1_796_284_522_000 + i,
                value: (i % 3 != 2).then(|| format!("value {i}").into_bytes()),
            }
        })
        .collect();
    KeyState { versions }
}

fn key_states() -> Vec<KeyState> {
    vec![
        KeyState::default(),
        sample_state(1, false),
        sample_state(2, true),
        sample_state(3, true),
        KeyState {
            versions: vec![Version {
                dot: Dot {
                    replica: u64::MAX,
                    counter: u64::MAX,
                },
                vv: [(u64::MAX, u64::MAX)].into_iter().collect(),
                deps: BTreeMap::new(),
                timestamp_ms: u64::MAX,
                value: Some(vec![0xff; 300]),
            }],
        },
    ]
}

/// One envelope of every [`Request`] variant.
fn envelopes() -> Vec<Envelope> {
    let token = sample_token(2, 2);
    let vv: VersionVector = [(5, 7), (9, 1)].into_iter().collect();
    let ballot = Ballot {
        round: 3,
        node: addr(1),
    };
    let proposals = sample_proposals();
    let mut bodies = vec![
        Request::Ping,
        Request::Sync(SyncRequest {
            partition: 1,
            have: vv.clone(),
            max_entries: 1000,
            max_bytes: 4 << 20,
        }),
        Request::Snapshot(SnapshotRequest {
            partition: 0,
            epoch: Some(2),
            slots: Some((0..SLOTS).step_by(3).collect()),
            after: Some((17, "key_1".into())),
            max_entries: 1000,
            max_bytes: 4 << 20,
        }),
        Request::Snapshot(SnapshotRequest {
            partition: 0,
            epoch: None,
            slots: None,
            after: None,
            max_entries: 1,
            max_bytes: 1,
        }),
        Request::Poke { partition: 2 },
        Request::Get {
            key: "hello".into(),
            token: token.clone(),
        },
        Request::Put {
            key: "hello".into(),
            value: Some(b"world".to_vec()),
            token: token.clone(),
        },
        Request::Put {
            key: "gone".into(),
            value: None,
            token: CausalToken::default(),
        },
        Request::Status,
        Request::Prepare {
            epoch: 2,
            ballot: ballot.clone(),
        },
        Request::Drain {
            epoch: 2,
            partition: 1,
            target: vv.clone(),
        },
        Request::Pull {
            epoch: 2,
            key: PullKey::Move { from: 0 },
            source: addr(1),
            claim: Some(Claim {
                applied: vv.clone(),
                absorbed: vv.clone(),
            }),
        },
        Request::Pull {
            epoch: 2,
            key: PullKey::Copy { uid: 1 },
            source: addr(2),
            claim: None,
        },
        Request::Install(sample_view(5, 2)),
        Request::KeyRequest {
            nonce: [7; NONCE_LEN],
        },
        Request::KeyDelivery {
            nonce: [7; NONCE_LEN],
            key: ClusterKey::from_bytes([9; KEY_LEN]),
        },
    ];
    for p in proposals.iter().take(2) {
        bodies.push(Request::Accept {
            epoch: p.epoch(),
            ballot: ballot.clone(),
            proposal: p.clone(),
        });
    }
    bodies.extend(proposals.into_iter().skip(2).map(Request::Learn));
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| Envelope {
            from: addr(1 + i % 3),
            epoch: 1 + (i as u64 % 2),
            body,
        })
        .collect()
}

/// One answer of every [`Response`] variant.
fn responses() -> Vec<Response> {
    let token = sample_token(2, 2);
    let vv: VersionVector = [(5, 7), (9, 1)].into_iter().collect();
    let states: Vec<(u32, String, KeyState)> = key_states()
        .into_iter()
        .enumerate()
        .map(|(i, s)| (i as u32 * 100, format!("key_{i}"), s))
        .collect();
    let ballot = Ballot {
        round: 4,
        node: addr(2),
    };
    let proposal = sample_proposals().remove(0);
    vec![
        Response::Ok,
        Response::Sync(SyncResponse {
            log: vec![LogEntry {
                dot: Dot {
                    replica: 5,
                    counter: 7,
                },
                slot: 12,
                key: "key_0".into(),
            }],
            states: states.clone(),
            covered: vv.clone(),
            complete: false,
            gap: true,
            absorbed: vv.clone(),
        }),
        Response::Snapshot(SnapshotPage {
            states,
            next: Some((400, "key_4".into())),
            applied: vv.clone(),
            absorbed: VersionVector::new(),
        }),
        Response::Get(ReadReply {
            partition: 1,
            index: 0,
            value: Some((b"world".to_vec(), 1_796_284_522_000)),
            token: token.clone(),
        }),
        Response::Get(ReadReply {
            partition: 1,
            index: 0,
            value: None,
            token: token.clone(),
        }),
        Response::Put(WriteReply {
            partition: 0,
            index: 0,
            created: true,
            timestamp_ms: 1_796_284_522_000,
            token,
        }),
        Response::Status(Box::new(NodeStatus {
            addr: addr(1),
            view: Some(proposal.from.clone()),
            transition: Some(proposal.clone()),
            k: Some(2),
            keys: 300,
        })),
        Response::Status(Box::new(NodeStatus {
            addr: addr(9),
            view: None,
            transition: None,
            k: None,
            keys: 0,
        })),
        Response::Paxos(PaxosReply::Prepare(PrepareReply::Promise(Some(Box::new(
            (ballot.clone(), proposal.clone()),
        ))))),
        Response::Paxos(PaxosReply::Prepare(PrepareReply::Promise(None))),
        Response::Paxos(PaxosReply::Prepare(PrepareReply::Reject(ballot.clone()))),
        Response::Paxos(PaxosReply::Accept(AcceptReply::Accepted)),
        Response::Paxos(PaxosReply::Accept(AcceptReply::Reject(ballot))),
        Response::Paxos(PaxosReply::Chosen(Box::new(proposal))),
        Response::Paxos(PaxosReply::Epoch(7)),
        Response::Learned(LearnReply::Learned(Some(vv.clone()))),
        Response::Learned(LearnReply::Installed),
        Response::Pulled(PullProgress {
            next: Some((3, "k".into())),
            done: false,
            claim: Some(Claim {
                applied: vv.clone(),
                absorbed: vv,
            }),
            keys: 1000,
            bytes: 1 << 20,
        }),
        Response::Key(KeyAnswer::Delivered),
        Response::Key(KeyAnswer::NoKey),
        Response::Error(Error::new(ErrorKind::OutcomeUnknown, "disk failed")),
        Response::DiskFault("No space left on device (os error 28)".into()),
    ]
}

/// A WAL payload of every [`WalOp`] variant, and a few real-sized ones.
fn sample_ops() -> Vec<Vec<WalOp>> {
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

fn wal_payloads() -> Vec<Vec<u8>> {
    sample_ops().iter().map(encode).collect()
}

/// WAL files as `Wal` writes them, intact, torn and damaged, and of the previous layout.
fn wal_files() -> Vec<Vec<u8>> {
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
