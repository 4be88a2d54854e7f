//! Fuzz targets for every parser and decoder that takes bytes from outside the node.
//!
//! # What comes from outside, and where it is parsed
//!
//! | target | input | reaches it | decoder under test |
//! |---|---|---|---|
//! | [`form`] | a `/kv-store` request body or query string, an `ip_port` or `VIEW` text, an `Authorization` header | any client; the operator | `http::form::parse_form`, `placement::parse_addr`, `placement::parse_view_list`, `api::admin_credential` |
//! | [`token`] | `causal_payload` | any client: its postcard payload is decoded *before* the tag is checked | `clock::CausalToken::decode` |
//! | [`envelope`] | the body of `POST /_internal/v1/rpc` | peers; with the public default secret, anyone: the body is decoded before the member proof is checked (`node::http::rpc_endpoint`) | `rpc::decode::<Envelope>`, then `View::check` and `Proposal::check` on what it carries |
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

mod alloc;
mod disk;
mod form;
mod rpc;
mod samples;
mod token;

pub use alloc::{peak_allocation, take_decoded, CountingAlloc, ALLOC_BASE, ALLOC_PER_INPUT_BYTE};
pub use disk::{key_state, wal, wal_open, wal_payload};
pub use form::form;
pub use rpc::{envelope, response};
pub use token::{sign_token_payload, token, TOKEN_CLUSTER};

// What the targets share (the children import it all with `use super::*`).
use alloc::{check_alloc, decoded};
use disk::{wal_files, wal_payloads};
use form::form_seeds;
use rpc::{check_state, envelopes, reencodes, reencodes_within, responses};
use samples::{addr, encode, key_states, sample_proposals, sample_state, sample_view};
use token::{sample_token, token_key, token_seeds};

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
