//! Stabilization (seed 004): bringing a partition that lost a replica back to its
//! replica count without an operator, when `--auto-replace-after` is set.
//!
//! A member this node's failure detector has believed dead for that long is removed
//! from the view, but only when the view that results keeps every partition at its
//! replica count: a spare (a proxy of K mode, a node in no shard) takes the dead node's
//! place, and the usual view change fills the new replica from the surviving ones before
//! it serves (minimal movement: only the dead node's partition changes). Without a spare
//! nothing is done (removing the node would shrink the cluster instead) and the reason is
//! logged once.
//!
//! Only the first member of the view that is not believed dead acts, so members do not
//! race each other (were two to act, Paxos would still choose one change, and the other
//! would find the node already gone). A removed node's acknowledged writes are safe when
//! they were acknowledged with `w` ≥ 2 (on another replica too); with `w` = 1 the writes
//! it took in its last milliseconds may be lost with it, as with a manual removal.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use super::{monotonic_ms, Node};
use crate::cluster::Health;
use crate::placement::{Change, View};

/// How often the members' health is looked at.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Whether `next` keeps every partition of `view` with at least its replica count.
fn keeps_replica_counts(view: &View, next: &View) -> bool {
    view.partitions.iter().all(|p| {
        next.replicas_of(p.uid)
            .is_some_and(|r| r.len() >= p.replicas.len())
    })
}

/// Replaces members dead for longer than `after` (see the module doc); runs for the
/// node's life.
pub(super) async fn auto_replace_loop(node: Arc<Node>, after: Duration) {
    let after_ms = after.as_millis() as u64;
    // When each member was first seen dead, in this node's monotonic clock.
    let mut dead_since: BTreeMap<String, u64> = BTreeMap::new();
    // Members already reported as irreplaceable (no spare), so the log says it once.
    let mut reported: BTreeSet<String> = BTreeSet::new();
    loop {
        tokio::time::sleep(CHECK_INTERVAL).await;
        let cur = node.current();
        let Some(view) = cur.view.clone() else {
            continue;
        };
        if cur.transition.is_some() || !view.is_member(&node.addr) {
            continue;
        }
        let now = monotonic_ms();
        let dead: BTreeSet<String> = {
            let liveness = node.liveness();
            view.members
                .iter()
                .filter(|m| **m != node.addr && liveness.health(m, now) == Health::Dead)
                .cloned()
                .collect()
        };
        dead_since.retain(|m, _| dead.contains(m));
        reported.retain(|m| dead.contains(m));
        for m in &dead {
            dead_since.entry(m.clone()).or_insert(now);
        }
        if view.members.iter().find(|m| !dead.contains(*m)) != Some(&node.addr) {
            continue;
        }
        let Some(victim) = dead_since
            .iter()
            .find(|(_, since)| now.saturating_sub(**since) >= after_ms)
            .map(|(m, _)| m.clone())
        else {
            continue;
        };
        let change = Change::Remove(victim.clone());
        match view.apply(&change) {
            Ok(next) if keeps_replica_counts(&view, &next) => {}
            other => {
                if reported.insert(victim.clone()) {
                    let why = match other {
                        Ok(_) => "no spare node could take its place".to_string(),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(%victim, "a member has been dead for {after:?} but is not replaced: {why}");
                }
                continue;
            }
        }
        tracing::warn!(%victim, "replacing a member dead for {after:?} by a spare");
        match node.change_view(change).await {
            Ok(v) => {
                tracing::info!(%victim, epoch = v.epoch, "dead member replaced");
                dead_since.remove(&victim);
            }
            Err(e) => tracing::warn!(%victim, "replacing a dead member failed, will retry: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("10.0.0.{i}:8080")).collect()
    }

    #[test]
    fn only_a_spare_taking_the_dead_nodes_place_keeps_the_counts() {
        // K = 2 with a proxy: removing a replica puts the proxy in its place.
        let view = View::bootstrap(members(3), 2).expect("view");
        let next = view
            .apply(&Change::Remove(members(3)[0].clone()))
            .expect("removal");
        assert!(keeps_replica_counts(&view, &next));
        // K = 2 without a spare: removing a replica leaves its partition short or gone.
        let view = View::bootstrap(members(4), 2).expect("view");
        let next = view
            .apply(&Change::Remove(members(4)[0].clone()))
            .expect("removal");
        assert!(!keeps_replica_counts(&view, &next));
    }
}
