//! Process-level tests of quorum reads and writes (seed 004's consistency levels, see
//! `kvs::quorum`): `r=` / `w=` on any dialect's key requests, the cluster defaults `R`
//! and `W`, replicas paused with SIGSTOP and killed with SIGKILL. Address ranges
//! `127.77.110-112.0/24` (see `common`).

mod common;

use std::time::{Duration, Instant};

use common::{form, value_of, Cluster, POLL_INTERVAL};
use kvs::client::Method;
use serde_json::{json, Value};

/// Bound of one whole scenario.
const SCENARIO: Duration = Duration::from_secs(240);

/// `PUT /kv-store/<key>?<query>` on node `i` without a causal payload.
async fn put(c: &Cluster, i: usize, key: &str, val: &str, query: &str) -> (u16, Value) {
    let body = form(&[("val", val), ("causal_payload", "")]);
    c.request(i, Method::PUT, &format!("/kv-store/{key}?{query}"), body)
        .await
}

/// `GET /kv-store/<key>?<query>` on node `i` without a causal payload.
async fn get(c: &Cluster, i: usize, key: &str, query: &str) -> (u16, Value) {
    let body = form(&[("causal_payload", "")]);
    c.request(i, Method::GET, &format!("/kv-store/{key}?{query}"), body)
        .await
}

fn assert_written(what: &str, (status, body): &(u16, Value)) {
    assert!(
        *status == 200 || *status == 201,
        "{what} answered {status}: {body}"
    );
}

/// Waits (bounded) until node `i`'s status counts `n` live replicas in partition 0.
async fn live_replicas(c: &Cluster, i: usize, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = c.status(i).await;
        let live = &status["view"]["partitions"][0]["live_replicas"];
        if live.as_u64() == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {i} still counts {live} live replicas, not {n}: {status}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn error_of(body: &Value) -> String {
    body["error"].as_str().unwrap_or_default().to_owned()
}

/// One partition of three replicas. With one replica frozen, quorum writes and reads
/// through the two others succeed and every read sees the write acknowledged before it
/// (whichever node each entered through); with two frozen, both answer 503 saying how
/// many replicas answered (a write: that its outcome is unknown) while level 1 still
/// works; once they run again every replica reads the same values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_requests_with_one_and_two_replicas_frozen() {
    let c = Cluster::start(110, 3, 3).await;
    c.within(SCENARIO, async {
        // Every replica up: each read through another node sees the write before it.
        for i in 0..12 {
            let key = format!("all_up_{i}");
            assert_written("quorum PUT", &put(&c, i % 3, &key, "v1", "w=quorum").await);
            assert_written("quorum PUT", &put(&c, i % 3, &key, "v2", "w=quorum").await);
            let (st, body) = get(&c, (i + 1) % 3, &key, "r=quorum").await;
            assert_eq!(
                (st, value_of(&body)),
                (200, "v2".to_owned()),
                "{key}: {body}"
            );
        }

        c.pause(2);
        for i in 0..20 {
            let key = format!("one_frozen_{i}");
            let (via, other) = (i % 2, 1 - i % 2);
            assert_written("quorum PUT", &put(&c, via, &key, "v1", "w=quorum").await);
            assert_written("quorum PUT", &put(&c, via, &key, "v2", "w=2").await);
            let (st, body) = get(&c, other, &key, "r=quorum").await;
            assert_eq!(
                (st, value_of(&body)),
                (200, "v2".to_owned()),
                "{key}: {body}"
            );
        }

        c.pause(1);
        let (st, body) = put(&c, 0, "two_frozen", "v1", "w=quorum").await;
        assert_eq!(st, 503, "a quorum write with one replica of three: {body}");
        let error = error_of(&body);
        assert!(
            error.contains("outcome is unknown") && error.contains("0 others confirmed"),
            "the 503 says why: {error}"
        );
        let (st, body) = get(&c, 0, "one_frozen_0", "r=quorum").await;
        assert_eq!(st, 503, "a quorum read with one replica of three: {body}");
        assert!(
            error_of(&body).contains("1 answered"),
            "the 503 says how many answered: {body}"
        );
        // The status shows the partition down to one live replica.
        live_replicas(&c, 0, 1).await;
        // Level 1 stays available.
        assert_written("PUT w=1", &put(&c, 0, "level_one", "v1", "w=1").await);
        let (st, body) = get(&c, 0, "one_frozen_3", "r=1").await;
        assert_eq!((st, value_of(&body)), (200, "v2".to_owned()), "{body}");

        c.resume(1);
        c.resume(2);
        live_replicas(&c, 0, 3).await;
        // Every replica, asked for all three, agrees; the write whose outcome was
        // unknown was durable on node 0, so it is there too.
        for via in 0..3 {
            for (key, val) in [
                ("two_frozen", "v1"),
                ("level_one", "v1"),
                ("one_frozen_7", "v2"),
            ] {
                let (st, body) = get(&c, via, key, "r=all").await;
                assert_eq!(
                    (st, value_of(&body)),
                    (200, val.to_owned()),
                    "{key} via {via}: {body}"
                );
            }
        }
    })
    .await;
}

/// Writes acknowledged at `w=2` are on the second replica when the first dies the
/// moment it answered: the survivor serves every one at once, without waiting for
/// anti-entropy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_after_acknowledging_quorum_writes_loses_none() {
    let c = Cluster::start(111, 2, 2).await;
    c.within(SCENARIO, async {
        let n = 100;
        for i in 0..n {
            assert_written(
                "PUT w=2",
                &put(&c, 0, &format!("k{i}"), &format!("v{i}"), "w=2").await,
            );
        }
        c.kill_9(0);
        for i in 0..n {
            let (st, body) = get(&c, 1, &format!("k{i}"), "r=1").await;
            assert_eq!(
                (st, value_of(&body)),
                (200, format!("v{i}")),
                "k{i} on the survivor: {body}"
            );
        }
    })
    .await;
}

/// The cluster default `W` (here `all`) applies to requests that name no level; levels
/// are checked (400 for a malformed one or more replicas than the partition has); the
/// JSON dialects take `r=` / `w=` in their query strings too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_and_levels_in_every_dialect() {
    let c = Cluster::start_with_spares(112, 3, 0, 3, &[("W", "all"), ("R", "quorum")]).await;
    c.within(SCENARIO, async {
        assert_written("default W=all", &put(&c, 0, "k", "v1", "").await);
        for bad in ["r=0", "r=4", "r=two", "w=-1", "w=5"] {
            let (st, body) = if bad.starts_with('r') {
                get(&c, 0, "k", bad).await
            } else {
                put(&c, 0, "k", "v", bad).await
            };
            assert_eq!(st, 400, "{bad}: {body}");
            assert!(!error_of(&body).is_empty(), "{bad}: a reason: {body}");
        }

        c.pause(2);
        let (st, body) = put(&c, 1, "k", "v2", "").await;
        assert_eq!(st, 503, "default W=all with a replica frozen: {body}");
        assert_written("w=quorum", &put(&c, 1, "k", "v3", "w=quorum").await);
        // Default R=quorum: through node 0, which may not have v3 yet.
        let (st, body) = get(&c, 0, "k", "").await;
        assert_eq!((st, value_of(&body)), (200, "v3".to_owned()), "{body}");

        // `/kvs` (JSON) and `/key-value-store` take the same query parameters.
        let node = c.node(0);
        let (st, body) = node
            .json(Method::PUT, "/kvs/keys/j?w=quorum", &json!({"value": "x"}))
            .await;
        assert!(st == 200 || st == 201, "/kvs PUT w=quorum: {body}");
        let (st, body) = c
            .node(1)
            .json(Method::GET, "/kvs/keys/j?r=quorum", &Value::Null)
            .await;
        assert_eq!((st, &body["value"]), (200, &json!("x")), "{body}");
        let (st, body) = node
            .json(Method::GET, "/kvs/keys/j?r=3", &Value::Null)
            .await;
        assert_eq!(st, 503, "/kvs r=3 with a replica frozen: {body}");
        let (st, body) = node
            .json(Method::GET, "/kvs/keys/j?r=9", &Value::Null)
            .await;
        assert_eq!(st, 400, "/kvs r=9: {body}");
        let (st, body) = node
            .json(
                Method::PUT,
                "/key-value-store/j?w=all",
                &json!({"value": "y"}),
            )
            .await;
        assert_eq!(
            st, 503,
            "/key-value-store w=all with a replica frozen: {body}"
        );
        c.resume(2);
    })
    .await;
}
