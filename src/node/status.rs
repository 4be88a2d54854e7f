//! The node's own account of itself: what `GET /api/v1/status` shows, what `kvs local`
//! and the test harness poll, and what the seed dialects' view queries read.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::{lock, monotonic_ms, Current, Node};
use crate::clock::VersionVector;
use crate::cluster::Health;
use crate::error::Result;
use crate::placement::Role;
use crate::rpc::NodeStatus;

/// What `GET /metrics` reads of a node when it is scraped: its state, as opposed to the
/// events counted where they happen (see `http::metrics`).
#[derive(Clone, Debug, Default)]
pub struct Gauges {
    pub epoch: u64,
    /// Whether the node takes part in a view change not yet installed here.
    pub changing_view: bool,
    /// Keys moved by the view change this node coordinates or last coordinated.
    pub keys_moved: u64,
    /// The index of the partition this node is a replica of (`None` on a proxy or a
    /// node in no cluster).
    pub partition: Option<u32>,
    /// Live keys the node stores (its partition's; during a handoff also the slots
    /// handed over and not yet deleted): the status endpoint's `keys`.
    pub keys: Option<u64>,
    /// Bytes of the store's files (`Store::disk_bytes`).
    pub disk_bytes: Option<u64>,
    /// Per peer of the partition: writes this replica applied that the peer had not,
    /// as of the vector of its last sync request (all of them before its first).
    pub replication_lag: Vec<(String, u64)>,
    /// The failure detector's verdict about every peer this node heartbeats.
    pub peers: Vec<(String, Health)>,
    pub anti_entropy_rounds: u64,
    pub anti_entropy_bytes: u64,
}

impl Node {
    /// What this node reports about itself.
    pub fn status(&self) -> Result<NodeStatus> {
        let cur = self.current();
        Ok(NodeStatus {
            addr: self.addr.clone(),
            view: cur.view.as_deref().cloned(),
            transition: cur.transition.as_ref().map(|t| t.proposal.clone()),
            k: self.k,
            keys: self.store.read()?.key_count()?,
        })
    }

    /// The node's gauges now (see [`Gauges`]).
    pub fn gauges(&self) -> Gauges {
        let cur = self.current();
        Gauges {
            epoch: cur.epoch(),
            changing_view: cur.transition.is_some(),
            keys_moved: self.progress().map_or(0, |p| p.keys_moved),
            partition: self.partition_index(&cur),
            keys: self.store.read().and_then(|t| t.key_count()).ok(),
            disk_bytes: self.store.disk_bytes(),
            replication_lag: self.replication_lag(&cur),
            peers: self.peer_verdicts(),
            anti_entropy_rounds: self.digest_stats.rounds.load(Ordering::Relaxed),
            anti_entropy_bytes: self.digest_stats.bytes.load(Ordering::Relaxed),
        }
    }

    /// The index in its view of the partition this node is a replica of.
    fn partition_index(&self, cur: &Current) -> Option<u32> {
        let view = cur.view.as_ref()?;
        match view.role_of(&self.addr)? {
            Role::Replica(uid) => view.index_of(uid),
            Role::Proxy => None,
        }
    }

    /// See [`Gauges::replication_lag`]. Peers report their applied vector in every
    /// sync request (each [`SYNC_INTERVAL`](super::SYNC_INTERVAL), and at once when
    /// poked after writes), so a peer that keeps up shows a lag near 0 between writes.
    fn replication_lag(&self, cur: &Current) -> Vec<(String, u64)> {
        let Some(r) = &cur.replica else {
            return Vec::new();
        };
        let Some(status) = self.status_of(r) else {
            return Vec::new();
        };
        let have = lock(&r.peer_have);
        let none = VersionVector::new();
        r.peers
            .iter()
            .map(|(peer, _)| {
                let theirs = have.get(peer).unwrap_or(&none);
                (peer.clone(), writes_missing(&status.applied, theirs))
            })
            .collect()
    }

    /// Whether the node is ready (a member holding the cluster key, or a node in no
    /// cluster), its view, role, transition, the progress of the view change it
    /// coordinates, and what its failure detector believes about each peer.
    pub fn status_report(&self) -> Value {
        let cur = self.current();
        let (keys, tombstones) = match self.store.read() {
            Ok(t) => (t.key_count().ok(), t.dead_count().ok()),
            Err(_) => (None, None),
        };
        // A replica is live when this node's failure detector does not believe it dead
        // (this node itself always is): what a partition can count on right now.
        let now = monotonic_ms();
        let liveness = self.liveness();
        let live = |replicas: &[String]| {
            replicas
                .iter()
                .filter(|r| **r == self.addr || liveness.health(r, now) != Health::Dead)
                .count()
        };
        let view = cur.view.as_ref().map(|v| {
            json!({
                "epoch": v.epoch,
                "k": v.k(),
                "members": v.members,
                "partitions": v.partitions.iter().enumerate().map(|(i, p)| json!({
                    "partition_id": i,
                    "uid": p.uid,
                    "members": p.replicas,
                    "live_replicas": live(&p.replicas),
                    "slots": v.slots.iter().filter(|&&u| u == p.uid).count(),
                })).collect::<Vec<_>>(),
            })
        });
        drop(liveness);
        let role = match cur.view.as_ref().and_then(|v| v.role_of(&self.addr)) {
            Some(Role::Replica(_)) => "replica",
            Some(Role::Proxy) => "proxy",
            None => "none",
        };
        let partition_id = self.partition_index(&cur).map(i64::from);
        // A member is ready to serve once it holds the cluster key; a node in no cluster
        // has nothing to wait for.
        let ready = (cur.view.is_none() && cur.transition.is_none()) || self.keys().is_some();
        json!({
            "node": self.addr,
            "ready": ready,
            "epoch": cur.epoch(),
            "role": role,
            "partition_id": partition_id,
            "keys": keys,
            "tombstones": tombstones,
            "view": view,
            "transition": cur.transition.as_ref().map(|t| json!({
                "change": t.proposal.change.to_string(),
                "from_epoch": t.from().epoch,
                "to_epoch": t.to().epoch,
            })),
            "view_change": self.progress(),
            "disk": self.disk_health(),
            "peers": self.peer_health(),
            "anti_entropy": self.digest_stats.report(),
        })
    }
}

/// Writes `mine` holds that `theirs` does not: per origin, the counters above theirs
/// (a vector holds every write of an origin up to its counter).
fn writes_missing(mine: &VersionVector, theirs: &VersionVector) -> u64 {
    mine.iter()
        .map(|(origin, n)| n.saturating_sub(theirs.get(origin)))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_writes_are_counted_per_origin() {
        let vv = |pairs: &[(u64, u64)]| {
            let mut v = VersionVector::new();
            for &(origin, n) in pairs {
                v.raise(origin, n);
            }
            v
        };
        let mine = vv(&[(1, 10), (2, 5)]);
        assert_eq!(writes_missing(&mine, &VersionVector::new()), 15);
        assert_eq!(writes_missing(&mine, &vv(&[(1, 7), (2, 5)])), 3);
        // Writes only the peer has are its lead, not this replica's: they count nothing.
        assert_eq!(writes_missing(&mine, &vv(&[(1, 12), (2, 1), (3, 9)])), 4);
        assert_eq!(writes_missing(&VersionVector::new(), &mine), 0);
    }
}
