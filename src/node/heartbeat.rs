//! Heartbeats: every [`HEARTBEAT_INTERVAL_MS`] this node pings each other member of its
//! view (and of the view it is moving to), and feeds the answers to the failure
//! detector (`cluster::Liveness`), which routing consults. At most one ping per peer is
//! in flight, so a silent peer costs one pending call, not a pile of them.
//!
//! A ping's answer also says whether the peer's disk refuses writes (`Response::DiskFault`);
//! forwarded writes then try that peer last (`Liveness::order_for_writes`). This node's
//! own disk health and what it believes of each peer's are in `/api/v1/status`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::{Health, HEARTBEAT_INTERVAL_MS};
use crate::rpc::{CallError, Request, Response};

use super::{lock, monotonic_ms, Node};

/// A ping not answered within this counts as a failure. Above the transport's connect
/// timeout, and well below the time phi needs to declare a steady peer dead.
const PING_TIMEOUT: Duration = Duration::from_millis(800);

impl Node {
    /// The peers this node heartbeats: the other members of its view and of the view of
    /// the change in progress.
    fn heartbeat_peers(&self) -> Vec<String> {
        let cur = self.current();
        let mut peers: BTreeSet<String> = BTreeSet::new();
        if let Some(v) = &cur.view {
            peers.extend(v.members.iter().cloned());
        }
        if let Some(t) = &cur.transition {
            peers.extend(t.to().members.iter().cloned());
        }
        peers.remove(&self.addr);
        peers.into_iter().collect()
    }

    /// The failure detector's belief about each peer, for the status endpoint.
    pub(super) fn peer_health(&self) -> serde_json::Value {
        let peers = self.heartbeat_peers();
        let report = self.liveness().report(&peers, monotonic_ms());
        report
            .into_iter()
            .map(|r| {
                serde_json::json!({
                    "node": r.peer,
                    "health": r.health.as_str(),
                    // Two decimals; infinite (far into the tail) shows as null.
                    "phi": r.phi.filter(|p| p.is_finite()).map(|p| (p * 100.0).round() / 100.0),
                    "silent_ms": r.silent_ms,
                    "failures": r.failures,
                    // What its last heartbeat answer said of its disk.
                    "disk": if r.disk_degraded { "refuses writes" } else { "ok" },
                })
            })
            .collect()
    }

    /// The failure detector's verdict about each peer, for the metrics.
    pub(super) fn peer_verdicts(&self) -> Vec<(String, Health)> {
        let peers = self.heartbeat_peers();
        let report = self.liveness().report(&peers, monotonic_ms());
        report.into_iter().map(|r| (r.peer, r.health)).collect()
    }

    /// This node's own disk health, for the status endpoint.
    pub(super) fn disk_health(&self) -> serde_json::Value {
        match self.disk_fault() {
            None => serde_json::json!({ "writable": true }),
            Some(f) => serde_json::json!({
                "writable": false,
                "error": f.error,
                "since_ms": f.since_ms,
            }),
        }
    }
}

/// Runs for the node's life (aborted with its other background tasks).
pub(super) async fn heartbeat_loop(node: Arc<Node>) {
    let mut tick = tokio::time::interval(Duration::from_millis(HEARTBEAT_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let in_flight: Arc<std::sync::Mutex<BTreeSet<String>>> = Arc::default();
    let mut pings = tokio::task::JoinSet::new();
    let mut believed: BTreeMap<String, Health> = BTreeMap::new();
    loop {
        tick.tick().await;
        while pings.try_join_next().is_some() {}
        let peers = node.heartbeat_peers();
        node.liveness().retain(&peers);
        log_verdicts(&node, &peers, &mut believed);
        for peer in peers {
            if !lock(&in_flight).insert(peer.clone()) {
                continue;
            }
            let (node, in_flight) = (node.clone(), in_flight.clone());
            pings.spawn(async move {
                let env = node.envelope(Request::Ping);
                // Any answer is a heartbeat, a refusal too: a peer still waiting for the
                // cluster key (or holding another one) is alive, and must be declared
                // dead by the usual rule if it stops answering.
                match node.send(&peer, &env, PING_TIMEOUT).await {
                    Ok(resp) => {
                        let mut liveness = node.liveness();
                        liveness.record_heartbeat(&peer, monotonic_ms());
                        liveness.record_disk(&peer, matches!(resp, Response::DiskFault(_)));
                    }
                    Err(CallError::Refused(..)) => {
                        node.liveness().record_heartbeat(&peer, monotonic_ms())
                    }
                    Err(_) => {}
                }
                lock(&in_flight).remove(&peer);
            });
        }
    }
}

/// Logs each change of verdict about a peer between dead and not dead (suspicion comes
/// and goes with single failed calls and is not worth a line).
fn log_verdicts(node: &Node, peers: &[String], believed: &mut BTreeMap<String, Health>) {
    let report = node.liveness().report(peers, monotonic_ms());
    believed.retain(|p, _| peers.contains(p));
    for r in report {
        let dead = r.health == Health::Dead;
        let was_dead = believed.get(&r.peer) == Some(&Health::Dead);
        if dead && !was_dead {
            tracing::warn!(peer = %r.peer, silent_ms = ?r.silent_ms, "peer is unresponsive: believed dead");
        } else if !dead && was_dead {
            tracing::info!(peer = %r.peer, "peer answers again: believed alive");
        }
        believed.insert(r.peer, r.health);
    }
}
