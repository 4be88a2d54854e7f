//! Process-level tests of the failure detector: heartbeats between real `kvs` processes
//! on loopback, as `GET /api/v1/status` reports them (`peers`). Address range
//! `127.77.50.0/24` (see `common`).

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, POLL_INTERVAL};

/// Time the detector gets to reach a verdict (it needs about 1.3 s of silence; debug
/// builds on a busy 2-core machine get a wide margin).
const VERDICT: Duration = Duration::from_secs(15);

/// What node `i` believes about `peer` (`alive`, `suspected`, `dead`).
async fn health(c: &Cluster, i: usize, peer: usize) -> String {
    let status = c.status(i).await;
    let peers = status["peers"]
        .as_array()
        .unwrap_or_else(|| panic!("status of node {i} without peers: {status}"));
    let entry = peers
        .iter()
        .find(|p| p["node"] == c.addr(peer))
        .unwrap_or_else(|| panic!("node {i} does not report on node {peer}: {status}"));
    entry["health"]
        .as_str()
        .unwrap_or_else(|| panic!("no health in {entry}"))
        .to_owned()
}

async fn wait_health(c: &Cluster, i: usize, peer: usize, want: &str) {
    let deadline = Instant::now() + VERDICT;
    loop {
        let got = health(c, i, peer).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {i} still believes node {peer} is {got}, not {want}, after {VERDICT:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A killed node is declared dead by every other node while the others stay alive;
/// requests its partition cannot serve fail fast with 503 while the rest keep working;
/// once restarted it is alive again everywhere.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_node_is_declared_dead_and_alive_again_after_restart() {
    let c = Cluster::start(50, 4, 2).await;
    c.within(Duration::from_secs(120), async {
        for i in 0..4 {
            for peer in (0..4).filter(|&p| p != i) {
                wait_health(&c, i, peer, "alive").await;
            }
        }
        let keys = c.keys_by_partition(0, "fd", 2).await;

        c.kill_9(1);
        for i in [0, 2, 3] {
            wait_health(&c, i, 1, "dead").await;
        }
        for (i, peer) in [(0, 2), (2, 3), (3, 0)] {
            assert_eq!(
                health(&c, i, peer).await,
                "alive",
                "node {i} about node {peer}"
            );
        }
        // Partition 0 still has node 0: its keys are served through every live node.
        for via in [0, 2, 3] {
            for key in keys.values().flatten() {
                let (status, body) = c.get(via, key, "").await;
                assert_eq!(status, 200, "GET {key} via node {via}: {body}");
            }
        }

        c.restart(1).await;
        for i in [0, 2, 3] {
            wait_health(&c, i, 1, "alive").await;
        }
    })
    .await;
}
