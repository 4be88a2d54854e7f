//! Listing the cluster's keys a page at a time (the own API's `GET /api/v1/kv`).
//!
//! # Design
//!
//! Keys are listed in the order storage keeps them, `(slot, key)`: the hash order of a
//! Redis `SCAN`, not alphabetical. That order needs no sort across partitions: each
//! slot belongs to one partition, and each replica's store is already sorted by it.
//! A page asks one replica of every partition, in parallel, for up to `limit` live
//! keys after the cursor ([`Request::ListKeys`]); each replica reads at most
//! [`SCAN_BUDGET`] stored keys, so a page costs a bounded amount of work even when a
//! prefix matches almost nothing, and says how far it read. The page is the first
//! `limit` keys of the merged answers, up to the nearest point any replica stopped at;
//! the cursor is the position of its last key, or that point. A page may therefore hold
//! fewer than `limit` keys (even none) while the listing goes on: the listing is over
//! when the cursor is absent.
//!
//! Caveats: each partition answers from one replica without a causal check, so a key
//! written a moment ago may be missing from the page (the replica has not received it
//! yet) and a key deleted a moment ago may appear. During a view change, slots that
//! are moving are listed from their old partition. A key written or deleted while a
//! listing runs may or may not appear in it; every key that exists throughout, and
//! whose slot does not move, appears exactly once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use super::{monotonic_ms, unexpected, Node};
use crate::clock::PartitionUid;
use crate::error::{Error, Result};
use crate::rpc::{KeyPage, Request, Response};

/// Stored keys a replica reads at most for one page (live or not, matching or not).
pub const SCAN_BUDGET: usize = 10_000;
/// Most keys a page may ask for.
pub const MAX_PAGE: u32 = 1_000;
/// Timeout of one replica's answer.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// A position in the listing order: a key and its slot.
pub type Position = (u32, String);

/// A page of the whole cluster's listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub keys: Vec<String>,
    /// Where the next page starts; `None` when the listing is over.
    pub next: Option<Position>,
}

impl Node {
    /// The page of live keys starting with `prefix` after `after` (see the module doc).
    pub async fn list_keys(
        self: &Arc<Self>,
        prefix: &str,
        after: Option<Position>,
        limit: u32,
    ) -> Result<Listing> {
        let limit = limit.clamp(1, MAX_PAGE);
        let view = self.current().view()?.clone();
        let pages = join_all(view.partitions.iter().map(|p| {
            let replicas = p.replicas.clone();
            let (uid, after, prefix) = (p.uid, after.clone(), prefix.to_string());
            async move {
                self.list_partition(uid, &replicas, prefix, after, limit)
                    .await
            }
        }))
        .await;
        let pages = pages.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(merge(pages, limit as usize))
    }

    /// One partition's page, from this node when it is a replica, else from the first
    /// replica that answers.
    async fn list_partition(
        self: &Arc<Self>,
        uid: PartitionUid,
        replicas: &[String],
        prefix: String,
        after: Option<Position>,
        limit: u32,
    ) -> Result<KeyPage> {
        if self.current().local(uid).is_some() {
            return self.list_local(uid, &prefix, after.as_ref(), limit);
        }
        let start = self.next_peer.fetch_add(1, Ordering::Relaxed);
        let order = self.liveness().order(replicas, start, monotonic_ms());
        let mut last = Error::unavailable(format!("no replica of partition uid {uid} answered"));
        for replica in order {
            let request = Request::ListKeys {
                partition: uid,
                prefix: prefix.clone(),
                after: after.clone(),
                limit,
            };
            match self.call(&replica, request, LIST_TIMEOUT).await {
                Ok(Response::Keys(page)) => return Ok(page),
                Ok(other) => last = unexpected(&other),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// This replica's page of `partition` (see [`Request::ListKeys`]).
    pub(super) fn list_local(
        &self,
        partition: PartitionUid,
        prefix: &str,
        after: Option<&Position>,
        limit: u32,
    ) -> Result<KeyPage> {
        let cur = self.current();
        let Some(r) = cur.local(partition) else {
            return Err(self.not_a_replica(partition));
        };
        let limit = limit.clamp(1, MAX_PAGE) as usize;
        let txn = self.store.read()?;
        let scanned = txn.scan(after, SCAN_BUDGET)?;
        let read_all = scanned.len() < SCAN_BUDGET;
        let mut page = KeyPage::default();
        for (slot, key, state) in scanned {
            if page.keys.len() == limit {
                break;
            }
            let position = (slot, key);
            if r.owned.contains(slot) && position.1.starts_with(prefix) && state.has_value() {
                page.keys.push(position.clone());
            }
            page.read_to = Some(position);
        }
        if read_all && page.keys.len() < limit {
            page.read_to = None;
        }
        Ok(page)
    }
}

/// The cluster's page from each partition's: the first `limit` keys up to the nearest
/// point a partition stopped reading at.
fn merge(pages: Vec<KeyPage>, limit: usize) -> Listing {
    let bound = pages.iter().filter_map(|p| p.read_to.clone()).min();
    let mut keys: Vec<Position> = pages
        .into_iter()
        .flat_map(|p| p.keys)
        .filter(|k| bound.as_ref().is_none_or(|b| k <= b))
        .collect();
    keys.sort();
    keys.truncate(limit);
    let next = if keys.len() == limit {
        keys.last().cloned()
    } else {
        bound
    };
    Listing {
        keys: keys.into_iter().map(|(_, k)| k).collect(),
        next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(keys: &[(u32, &str)], read_to: Option<(u32, &str)>) -> KeyPage {
        KeyPage {
            keys: keys.iter().map(|&(s, k)| (s, k.to_string())).collect(),
            read_to: read_to.map(|(s, k)| (s, k.to_string())),
        }
    }

    #[test]
    fn pages_merge_in_order_up_to_the_limit() {
        let got = merge(
            vec![page(&[(1, "a"), (5, "e")], None), page(&[(3, "c")], None)],
            2,
        );
        assert_eq!(got.keys, ["a", "c"]);
        assert_eq!(got.next, Some((3, "c".to_string())));
        let rest = merge(vec![page(&[(5, "e")], None), page(&[], None)], 2);
        assert_eq!(rest.keys, ["e"]);
        assert_eq!(rest.next, None, "everyone read to the end");
    }

    #[test]
    fn a_partition_that_stopped_early_bounds_the_page() {
        // The second partition read only up to slot 2: keys past it could still come
        // from there, so the page stops at slot 2 and continues from it.
        let got = merge(
            vec![page(&[(1, "a"), (4, "d")], None), page(&[], Some((2, "b")))],
            10,
        );
        assert_eq!(got.keys, ["a"]);
        assert_eq!(got.next, Some((2, "b".to_string())));
    }
}
