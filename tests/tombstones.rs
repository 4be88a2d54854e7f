//! Process-level tests of tombstone collection: a delete's tombstone is dropped once
//! every replica of its partition has it and the horizon (`KVS_TOMBSTONE_HORIZON`, 1 s
//! here) has passed, never while a replica that missed the delete is away, and a
//! replica away across the collection does not bring the value back. Address range
//! `127.77.113.0/24` (see `common`).

mod common;

use std::time::{Duration, Instant};

use common::{form, keys, load, Cluster, POLL_INTERVAL};
use kvs::client::Method;
use serde_json::Value;

/// Bound of one whole scenario.
const SCENARIO: Duration = Duration::from_secs(240);
/// Bound on collection once it may happen: a few trim rounds (every 5 s; a floor is
/// used one round after it is observed).
const COLLECTION: Duration = Duration::from_secs(60);

async fn status_field(c: &Cluster, i: usize, field: &str) -> u64 {
    let status = c.status(i).await;
    status[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in node {i}'s status: {status}"))
}

/// Until node `i`'s status shows `n` in `field`.
async fn wait_field(c: &Cluster, i: usize, field: &str, n: u64) {
    let deadline = Instant::now() + COLLECTION;
    loop {
        let got = status_field(c, i, field).await;
        if got == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {i} shows {field} = {got}, not {n}, after {COLLECTION:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Node `i`'s own answer for `key` (level 1: every node is a replica here).
async fn get(c: &Cluster, i: usize, key: &str) -> (u16, Value) {
    let body = form(&[("causal_payload", "")]);
    c.request(i, Method::GET, &format!("/kv-store/{key}?r=1"), body)
        .await
}

async fn delete_all(c: &Cluster, via: usize, keys: &[String]) {
    for key in keys {
        let (st, body) = c.node(via).delete(key, "").await;
        assert_eq!(st, 200, "DELETE {key}: {body}");
    }
}

async fn all_gone(c: &Cluster, keys: &[String]) {
    for i in 0..c.len() {
        for key in keys {
            let (st, body) = get(c, i, key).await;
            assert_eq!(st, 404, "{key} on node {i} after collection: {body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_collected_only_once_every_replica_has_them() {
    let c = Cluster::start_with_spares(113, 3, 0, 3, &[("KVS_TOMBSTONE_HORIZON", "1")]).await;
    c.within(SCENARIO, async {
        let loaded = keys("t", 120);
        load(&c, &[0, 1, 2], &loaded).await;
        for i in 0..3 {
            wait_field(&c, i, "keys", 120).await;
        }
        let names: Vec<String> = loaded.keys().cloned().collect();
        let (missed, seen) = (&names[..40], &names[40..80]);

        // A replica away during the deletes holds collection back.
        c.pause(2);
        delete_all(&c, 0, missed).await;
        wait_field(&c, 1, "tombstones", 40).await;
        // Well past the horizon and two trim rounds: still there.
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!(
            status_field(&c, 0, "tombstones").await,
            40,
            "collected while a replica lacked the deletes"
        );
        c.resume(2);
        for i in 0..3 {
            wait_field(&c, i, "tombstones", 0).await;
            wait_field(&c, i, "keys", 80).await;
        }
        all_gone(&c, missed).await;

        // A replica that has the deletes but is away while the others collect: it keeps
        // its tombstones, hands none back, and drops them itself once back.
        delete_all(&c, 1, seen).await;
        wait_field(&c, 2, "tombstones", 40).await;
        // Let its report of them reach the others.
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.pause(2);
        wait_field(&c, 0, "tombstones", 0).await;
        wait_field(&c, 1, "tombstones", 0).await;
        c.resume(2);
        wait_field(&c, 2, "tombstones", 0).await;
        for i in 0..3 {
            assert_eq!(
                status_field(&c, i, "tombstones").await,
                0,
                "node {i} took a tombstone back"
            );
            wait_field(&c, i, "keys", 40).await;
        }
        all_gone(&c, seen).await;
        all_gone(&c, missed).await;
    })
    .await;
}
