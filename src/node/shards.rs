//! What dialects ask about members and shards beyond a key: which members are up, which
//! serve a shard, and how many live keys a shard holds.
//!
//! # Design
//!
//! **Live members.** The seed-002 dialect shows "the view" as the members that are up:
//! a replica that stops drops out of it within seconds, and comes back at its place
//! when it answers again. That is the failure detector's belief (`cluster`), applied to
//! the agreed view as a filter: the layout itself does not change when a node stops (no
//! data moves for a failure that may last a second), and a restarted node is a replica
//! of its shard again the moment it answers, holding its keys (its disk, or what sync
//! brings back to a wiped one). Removing a member for good is an explicit change.
//!
//! **Reshard** deals the members that are up: members that are down are removed first
//! (seed 002: "a node fails, so the client sends a reshard"). Removing a down member
//! moves no data while its shard has another replica; a shard whose only replica is
//! down cannot hand its keys over, and the change waits for it (503 after the stall
//! limit, and it resumes when the node is back).
//!
//! **Key counts.** A shard's count is asked of one of its replicas (this node when it is
//! one, else the others, trusted ones first). A replica counts the live keys of the
//! slots its shard owns now: its store may still hold slots handed over in a view change
//! that garbage collection has not dropped yet, which are subtracted. Replicas of one
//! shard agree once sync has caught up (within the staleness bound), so two counts asked
//! of different replicas during a burst of writes may differ by the writes in flight.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{monotonic_ms, unexpected, Node};
use crate::clock::PartitionUid;
use crate::cluster::Health;
use crate::error::{Error, ErrorKind, Result};
use crate::placement::{Change, ChangeError, SLOTS};
use crate::rpc::{Request, Response};

/// Timeout of one key-count call to a replica.
const COUNT_TIMEOUT: Duration = Duration::from_secs(3);
/// Keys read per page when counting the live keys of a slot that was handed over.
const COUNT_PAGE: usize = 1_024;

impl Node {
    /// Whether the failure detector believes `addr` is up (this node always is).
    fn is_live(&self, addr: &str, now_ms: u64) -> bool {
        addr == self.addr || self.liveness().health(addr, now_ms) != Health::Dead
    }

    /// What this node's failure detector believes of `addr` (this node itself is
    /// alive).
    pub fn health_of(&self, addr: &str) -> Health {
        if addr == self.addr {
            Health::Alive
        } else {
            self.liveness().health(addr, monotonic_ms())
        }
    }

    /// The members of this node's view that are up, in member order (see the module
    /// doc).
    pub fn live_members(&self) -> Result<Vec<String>> {
        let cur = self.current();
        let now = monotonic_ms();
        Ok(cur
            .view()?
            .members
            .iter()
            .filter(|m| self.is_live(m, now))
            .cloned()
            .collect())
    }

    /// Deals the members that are up into `count` shards (`Change::Reshard`), removing
    /// the members that are down from the view first, one change each: where the view
    /// shows the members that are up, a reshard deals what it shows. Refused, changing
    /// nothing, when the members up cannot fill `count` shards of two.
    pub async fn reshard_live(self: &Arc<Self>, count: u32) -> Result<()> {
        let live = self.live_members()?;
        let needed = usize::try_from(count)
            .unwrap_or(usize::MAX)
            .saturating_mul(2);
        if live.len() < needed {
            let refused = ChangeError::NotEnoughNodes {
                nodes: live.len(),
                shards: count as usize,
            };
            return Err(Error::new(ErrorKind::BadRequest, refused.to_string()).refusing(refused));
        }
        let members = self.current().view()?.members.clone();
        for down in members.iter().filter(|m| !live.contains(m)) {
            tracing::info!(node = %down, "removing a member that is down before resharding");
            self.change_view(Change::Remove(down.clone())).await?;
        }
        self.change_view(Change::Reshard(count)).await.map(|_| ())
    }

    /// The replicas that are up of the partition clients call `index`, in view order;
    /// `None` when there is no such partition.
    pub fn live_replicas_at(&self, index: u32) -> Result<Option<Vec<String>>> {
        let cur = self.current();
        let now = monotonic_ms();
        Ok(cur.view()?.replicas_at(index).map(|replicas| {
            replicas
                .iter()
                .filter(|m| self.is_live(m, now))
                .cloned()
                .collect()
        }))
    }

    /// The number of live keys of the partition clients call `index`, asked of one of
    /// its replicas. `NotFound` when there is no such partition.
    pub async fn partition_key_count(self: &Arc<Self>, index: u32) -> Result<u64> {
        let cur = self.current();
        let view = cur.view()?.clone();
        let (uid, replicas) = match view.partitions.get(index as usize) {
            Some(p) => (p.uid, p.replicas.clone()),
            None => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("there is no shard {index}"),
                ))
            }
        };
        if cur.local(uid).is_some() {
            return self.count_local(uid);
        }
        let start = self.next_peer.fetch_add(1, Ordering::Relaxed);
        let order = self.liveness().order(&replicas, start, monotonic_ms());
        let mut last = Error::unavailable(format!("no replica of shard {index} answered"));
        for replica in order {
            match self
                .call(
                    &replica,
                    Request::KeyCount { partition: uid },
                    COUNT_TIMEOUT,
                )
                .await
            {
                Ok(Response::Count(n)) => return Ok(n),
                Ok(other) => last = unexpected(&other),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Live keys this node holds for `partition` in the slots it owns now; an error when
    /// this node is not a replica of it.
    pub(super) fn count_local(&self, partition: PartitionUid) -> Result<u64> {
        let cur = self.current();
        let Some(r) = cur.local(partition) else {
            return Err(self.not_a_replica(partition));
        };
        let txn = self.store.read()?;
        let mut count = txn.key_count()?;
        // Slots handed over but not yet collected still hold keys: not ours to count.
        for slot in (0..SLOTS).filter(|s| !r.owned.contains(*s)) {
            if txn.slot_is_empty(slot)? {
                continue;
            }
            count = count.saturating_sub(live_in_slot(&*txn, slot)?);
        }
        Ok(count)
    }
}

/// Live keys stored in `slot`, read a page at a time.
fn live_in_slot(txn: &dyn crate::storage::ReadTxn, slot: u32) -> Result<u64> {
    let mut live = 0;
    let mut after: Option<String> = None;
    loop {
        let page = txn.scan_slot(slot, after.as_deref(), COUNT_PAGE)?;
        live += page.iter().filter(|(_, s)| s.is_live()).count() as u64;
        match page.last() {
            Some((key, _)) if page.len() == COUNT_PAGE => after = Some(key.clone()),
            _ => return Ok(live),
        }
    }
}
