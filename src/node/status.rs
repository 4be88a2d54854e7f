//! The node's own account of itself: what `GET /api/v1/status` shows, what `kvs local`
//! and the test harness poll, and what the seed dialects' view queries read.

use serde_json::{json, Value};

use super::{monotonic_ms, Node};
use crate::cluster::Health;
use crate::error::Result;
use crate::placement::Role;
use crate::rpc::NodeStatus;

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
        let (role, partition_id) = match cur.view.as_ref().and_then(|v| v.role_of(&self.addr)) {
            Some(Role::Replica(uid)) => (
                "replica",
                cur.view
                    .as_ref()
                    .and_then(|v| v.index_of(uid))
                    .map(i64::from),
            ),
            Some(Role::Proxy) => ("proxy", None),
            None => ("none", None),
        };
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
