//! State-based anti-entropy between the replicas of a partition: digest rounds (see
//! `crate::merkle` for the tree and why it converges).
//!
//! Every replica runs one round per peer every [`DIGEST_INTERVAL`] (the first at a
//! random point of it, so peers' rounds spread out): it sends its bucket digests, gets
//! the peer's slot digests of the buckets that differ, and fetches the peer's keys of the
//! slots that differ as snapshot pages restricted to those slots, merging them like a
//! state transfer (no claim: the vectors stay what the log sync made them). Rounds are
//! skipped during a view change (the handoff is moving slots) and while this node's disk
//! refuses writes.
//!
//! What a round cost (bytes of requests and answers, as encoded) and what it fetched is
//! counted per node and shown in `GET /api/v1/status` (`anti_entropy`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{unexpected, Node, ReplicaHandle, SYNC_PAGE_BYTES, SYNC_PAGE_ENTRIES, SYNC_TIMEOUT};
use crate::error::Result;
use crate::merkle;
use crate::replica::{Replica, SnapshotRequest, SyncResponse};
use crate::rpc::{Request, Response};

/// Time between two digest rounds of a replica with one peer. A round reads the slot
/// digests the node keeps and rescans a bounded number of keys on each side
/// (`storage::digest_cache`).
pub const DIGEST_INTERVAL: Duration = Duration::from_secs(5);
/// Snapshot pages one round fetches at most; the next round goes on.
const MAX_PAGES_PER_ROUND: usize = 64;

/// What this node's digest rounds did since it started.
#[derive(Default)]
pub struct DigestStats {
    pub rounds: AtomicU64,
    /// Rounds that found a difference and fetched keys.
    pub repairs: AtomicU64,
    pub keys_fetched: AtomicU64,
    /// Bytes of digest requests and answers and of fetched pages, as encoded.
    pub bytes: AtomicU64,
}

impl DigestStats {
    pub fn report(&self) -> serde_json::Value {
        serde_json::json!({
            "rounds": self.rounds.load(Ordering::Relaxed),
            "repairs": self.repairs.load(Ordering::Relaxed),
            "keys_fetched": self.keys_fetched.load(Ordering::Relaxed),
            "bytes": self.bytes.load(Ordering::Relaxed),
        })
    }
}

/// The encoded size of a message, for the byte counts.
fn size_of<T: serde::Serialize>(message: &T) -> u64 {
    postcard::to_stdvec(message).map_or(0, |v| v.len() as u64)
}

/// Runs digest rounds with `peer` for as long as the replica lives.
pub(super) async fn digest_rounds(node: Arc<Node>, r: Arc<ReplicaHandle>, peer: String) {
    let interval = DIGEST_INTERVAL.as_millis() as u64;
    let mut wait = Duration::from_millis(rand::random_range(interval / 4..interval));
    loop {
        tokio::time::sleep(wait).await;
        wait = DIGEST_INTERVAL;
        if node.current().transition.is_some() || node.disk_fault().is_some() {
            continue;
        }
        if node.status_of(&r).is_none() {
            return;
        }
        match node.digest_round(&r, &peer).await {
            Ok(0) => {}
            Ok(keys) => {
                tracing::info!(%peer, keys, "anti-entropy: fetched keys whose state differed")
            }
            Err(e) => tracing::debug!(%peer, "digest round failed: {e}"),
        }
    }
}

impl Node {
    /// One round against `peer`; returns how many keys it fetched.
    pub(super) async fn digest_round(
        self: &Arc<Self>,
        r: &ReplicaHandle,
        peer: &str,
    ) -> Result<u64> {
        let _fetch = super::sync::FetchGuard::new(r);
        let stats = &self.digest_stats;
        let mine = self.slot_digests(r).await?;
        let req = Request::Digest {
            partition: r.partition,
            buckets: merkle::bucket_digests(&mine),
        };
        stats.rounds.fetch_add(1, Ordering::Relaxed);
        stats.bytes.fetch_add(size_of(&req), Ordering::Relaxed);
        let answer = self.send(peer, &self.envelope(req), SYNC_TIMEOUT).await?;
        stats.bytes.fetch_add(size_of(&answer), Ordering::Relaxed);
        let (buckets, theirs) = match answer {
            Response::Digests { buckets, slots } => (buckets, slots),
            Response::Error(e) => return Err(e),
            other => return Err(unexpected(&other)),
        };
        let slots = merkle::differing_slots(&mine, &buckets, &theirs, &r.owned);
        if slots.is_empty() {
            return Ok(0);
        }
        let mut fetched = 0;
        let mut after = None;
        for _ in 0..MAX_PAGES_PER_ROUND {
            let req = Request::Snapshot(SnapshotRequest {
                partition: r.partition,
                epoch: None,
                slots: Some(slots.clone()),
                after,
                max_entries: SYNC_PAGE_ENTRIES,
                max_bytes: SYNC_PAGE_BYTES,
            });
            let page = match self.send(peer, &self.envelope(req), SYNC_TIMEOUT).await? {
                Response::Snapshot(page) => page,
                Response::Error(e) => return Err(e),
                other => return Err(unexpected(&other)),
            };
            stats.bytes.fetch_add(size_of(&page), Ordering::Relaxed);
            fetched += page.states.len() as u64;
            after = page.next.clone();
            // Deletes this replica already reflects are left out: it may have collected
            // them, and the peer will too.
            let served = self
                .status_of(r)
                .map(|s| s.served.clone())
                .unwrap_or_default();
            let states: Vec<_> = page
                .states
                .into_iter()
                .filter(|(_, _, state)| !Replica::known_deletes(state, &served))
                .collect();
            // States only: merged like a transfer's, claiming nothing.
            let states = SyncResponse {
                states,
                complete: true,
                ..SyncResponse::default()
            };
            self.apply_page(r, states).await?;
            if after.is_none() {
                break;
            }
        }
        stats.repairs.fetch_add(1, Ordering::Relaxed);
        stats.keys_fetched.fetch_add(fetched, Ordering::Relaxed);
        Ok(fetched)
    }

    /// Answers a peer's bucket digests: the buckets that differ here and this replica's
    /// slot digests in them.
    pub(super) async fn serve_digest(
        self: &Arc<Self>,
        partition: u32,
        buckets: Vec<u64>,
    ) -> Result<Response> {
        let r = self.serving_replica(&self.current(), partition)?;
        let mine = self.slot_digests(&r).await?;
        let differ = merkle::differing_buckets(&merkle::bucket_digests(&mine), &buckets);
        let slots = merkle::slots_of_buckets(&mine, &differ);
        Ok(Response::Digests {
            buckets: differ,
            slots,
        })
    }

    /// This replica's slot digests: those the cache keeps (`storage::digest_cache`), the
    /// others, and the cache's refresh, hashed on a blocking thread over one snapshot.
    async fn slot_digests(self: &Arc<Self>, r: &ReplicaHandle) -> Result<Vec<u64>> {
        let owned = r.owned.clone();
        let cache = self.digests.clone();
        // Before the snapshot opens (`DigestCache::fill`).
        let seen = cache.snapshot();
        self.read_blocking(move |txn| {
            let found = merkle::slot_digests_with(txn, &owned, &seen.digests, Some(seen.refresh))?;
            cache.fill(&seen, &found);
            Ok(found.digests)
        })
        .await
    }
}
