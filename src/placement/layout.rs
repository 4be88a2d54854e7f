//! The layout: how a view's members form partitions (the configuration modes).

use serde::{Deserialize, Serialize};

/// How a view's members form partitions. Chosen when the cluster is created (by the
/// environment variables present) and kept by every later view; see the module doc for
/// each mode's rules.
///
/// Encoded in views (on disk and on the wire) by variant position: new modes are
/// appended, never inserted, so the encodings of the existing ones stay valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Layout {
    /// K mode (seeds 000/001): `floor(N/K)` partitions of exactly K replicas; the
    /// `N mod K` members left over are proxies.
    Replicas(usize),
    /// Shard-count mode (seed 002): partitions ("shards") of one replica or more (two or
    /// more at bootstrap and after a reshard), sizes may differ, the count changes only
    /// by a reshard; members in no shard are proxies. The count is not stored: it is the
    /// number of partitions.
    Shards,
    // Seed 003's replication-factor clusters are `Replicas(r)`: same first view, and
    // its whole-view change (`Change::Replace`) keeps the K-mode rule with K = r.
}

impl Layout {
    /// K, in K mode.
    pub fn k(&self) -> Option<usize> {
        match self {
            Layout::Replicas(k) => Some(*k),
            Layout::Shards => None,
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layout::Replicas(k) => write!(f, "K = {k}"),
            Layout::Shards => write!(f, "shard-count mode"),
        }
    }
}
