//! Process-level test of stabilization (seed 004): with `KVS_AUTO_REPLACE_AFTER` set, a
//! replica killed for good is replaced by the spare node (the K-mode proxy), which is
//! filled before it serves, so the partition is back to two live replicas holding every
//! key written at `w=2`. Address range `127.77.114.0/24` (see `common`).

mod common;

use std::time::{Duration, Instant};

use common::{form, value_of, Cluster, POLL_INTERVAL};
use kvs::client::Method;
use serde_json::Value;

/// Bound of the whole scenario.
const SCENARIO: Duration = Duration::from_secs(180);
/// Bound on the replacement: detection (~1 s), the 2 s wait, the view change.
const REPLACEMENT: Duration = Duration::from_secs(60);

async fn put(c: &Cluster, i: usize, key: &str, val: &str) -> (u16, Value) {
    let body = form(&[("val", val), ("causal_payload", "")]);
    c.request(i, Method::PUT, &format!("/kv-store/{key}?w=2"), body)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replica_is_replaced_by_the_spare() {
    // K = 2 over three nodes: partition {0, 1} and node 2 a proxy (the spare).
    let c = Cluster::start_with_spares(114, 3, 0, 2, &[("KVS_AUTO_REPLACE_AFTER", "2")]).await;
    c.within(SCENARIO, async {
        for i in 0..60 {
            let (st, body) = put(&c, i % 3, &format!("k{i}"), &format!("v{i}")).await;
            assert!(st == 200 || st == 201, "PUT k{i}: {body}");
        }
        c.kill_9(1);
        let (dead, spare) = (c.addr(1).to_owned(), c.addr(2).to_owned());
        let deadline = Instant::now() + REPLACEMENT;
        loop {
            let status = c.status(0).await;
            let partition = &status["view"]["partitions"][0];
            let members: Vec<&str> = partition["members"]
                .as_array()
                .map(|m| m.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if members.contains(&spare.as_str())
                && !members.contains(&dead.as_str())
                && partition["live_replicas"] == 2
                && status["transition"].is_null()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the dead replica was not replaced within {REPLACEMENT:?}: {status}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        // The new replica serves every key itself, and quorum writes work again.
        for i in 0..60 {
            let body = form(&[("causal_payload", "")]);
            let (st, reply) = c
                .request(2, Method::GET, &format!("/kv-store/k{i}?r=1"), body)
                .await;
            assert_eq!(
                (st, value_of(&reply)),
                (200, format!("v{i}")),
                "k{i} on the new replica: {reply}"
            );
        }
        let (st, body) = put(&c, 2, "after", "x").await;
        assert!(
            st == 200 || st == 201,
            "PUT w=2 after the replacement: {body}"
        );
    })
    .await;
}
