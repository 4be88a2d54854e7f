//! Progress of the view change this node coordinates: what the status endpoint and
//! `kvs local` show, and when the coordinator stops waiting ([`Stall`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::clock::PartitionUid;
use crate::error::{Error, ErrorKind, Result};
use crate::node::{lock, now_ms, Node};
use crate::viewchange::{Proposal, PullKey};

/// The coordinator answers 503 when a change made no progress for this long; the change
/// itself goes on (see the module doc of `reconfig`).
pub const STALL_LIMIT: Duration = Duration::from_secs(30);

/// Progress of the view change this node coordinates, for the status endpoint and
/// `kvs local`.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    pub change: String,
    pub epoch: u64,
    /// deciding, learning, draining, moving, installing, done or stalled.
    pub phase: String,
    /// Keys (and their bytes) that changed partition or were copied to a joining
    /// member, each counted once however many replicas received it.
    pub keys_moved: u64,
    pub bytes_moved: u64,
    /// Copies written: `keys_moved` times the replicas that received each.
    pub keys_copied: u64,
    pub bytes_copied: u64,
    pub pulls_total: usize,
    pub pulls_done: usize,
    pub started_ms: u64,
    pub elapsed_ms: u64,
    pub error: Option<String>,
    /// Per (receiving partition, pull, node): keys and bytes so far.
    #[serde(skip)]
    per_pull: BTreeMap<(PartitionUid, PullKey, String), (u64, u64)>,
}

impl Progress {
    /// Records a pull's totals so far and recomputes the sums.
    pub(super) fn record(
        &mut self,
        uid: PartitionUid,
        key: PullKey,
        node: &str,
        keys: u64,
        bytes: u64,
    ) {
        self.per_pull
            .insert((uid, key, node.to_string()), (keys, bytes));
        let mut unique: BTreeMap<(PartitionUid, PullKey), (u64, u64)> = BTreeMap::new();
        (self.keys_copied, self.bytes_copied) = (0, 0);
        for ((uid, key, _), (k, b)) in &self.per_pull {
            self.keys_copied += k;
            self.bytes_copied += b;
            let u = unique.entry((*uid, *key)).or_default();
            *u = (u.0.max(*k), u.1.max(*b));
        }
        self.keys_moved = unique.values().map(|u| u.0).sum();
        self.bytes_moved = unique.values().map(|u| u.1).sum();
    }
}

/// Tracks whether a change still makes progress; see [`STALL_LIMIT`].
pub(super) struct Stall {
    last: Instant,
}

impl Stall {
    pub(super) fn new() -> Self {
        Self {
            last: Instant::now(),
        }
    }

    pub(super) fn progressed(&mut self) {
        self.last = Instant::now();
    }

    /// Err once nothing progressed for [`STALL_LIMIT`].
    pub(super) fn check(&self, epoch: u64, waiting_for: impl FnOnce() -> String) -> Result<()> {
        if self.last.elapsed() < STALL_LIMIT {
            return Ok(());
        }
        Err(Error::unavailable(format!(
            "the view change to epoch {epoch} is waiting for {}; it resumes by itself when they are back \
             (or re-issue a view change to drive it)",
            waiting_for()
        )))
    }
}

impl Node {
    /// The view change this node coordinates (or last coordinated).
    pub fn progress(&self) -> Option<Progress> {
        lock(&self.progress).clone().map(|mut p| {
            if p.phase != "done" && p.phase != "stalled" {
                p.elapsed_ms = now_ms().saturating_sub(p.started_ms);
            }
            p
        })
    }

    pub(super) fn set_progress(&self, p: &Proposal, phase: &str) {
        *lock(&self.progress) = Some(Progress {
            change: p.change.to_string(),
            epoch: p.epoch(),
            phase: phase.into(),
            keys_moved: 0,
            bytes_moved: 0,
            keys_copied: 0,
            bytes_copied: 0,
            pulls_total: 0,
            pulls_done: 0,
            started_ms: now_ms(),
            elapsed_ms: 0,
            error: None,
            per_pull: BTreeMap::new(),
        });
    }

    /// Starts tracking `p` unless it is already tracked.
    pub(super) fn ensure_progress(&self, p: &Proposal) {
        let tracked = lock(&self.progress)
            .as_ref()
            .is_some_and(|pr| pr.epoch == p.epoch() && pr.phase != "done" && pr.phase != "stalled");
        if !tracked {
            self.set_progress(p, "learning");
        }
    }

    pub(super) fn update_progress(&self, f: impl FnOnce(&mut Progress)) {
        if let Some(p) = lock(&self.progress).as_mut() {
            f(p);
            p.elapsed_ms = now_ms().saturating_sub(p.started_ms);
        }
    }

    pub(super) fn fail_progress(&self, e: &Error) {
        if e.kind == ErrorKind::Unavailable {
            self.update_progress(|p| {
                p.phase = "stalled".into();
                p.error = Some(e.message.clone());
            });
        }
    }
}
