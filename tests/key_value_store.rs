//! Process-level tests of the seed-002 dialect (`/key-value-store*`): nodes started the
//! seed's way (`SOCKET_ADDRESS`, `VIEW`, `SHARD_COUNT`) on loopback (see `common`).
//!
//! Each test owns the address range `127.77.<id>.0/24` with ids 90..=99. What they
//! check is DESIGN §5.2 and seed 002: the exact replies, shards dealt round-robin in
//! VIEW order, causally chained writes readable on every node, versions and metadata
//! that are the same strings on every replica, key counts that sum to the keys written,
//! a node that joins by itself and `add-member`, `reshard`, and views that drop a
//! stopped replica and take it back at its place.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Cluster, POLL_INTERVAL};
use kvs::client::Method;
use serde_json::{json, Value};

/// Bound of one whole scenario.
const SCENARIO: Duration = Duration::from_secs(300);
/// The seed: a stopped replica leaves every view within about 10 s.
const VIEW_BOUND: Duration = Duration::from_secs(10);

async fn call(c: &Cluster, i: usize, method: Method, path: &str, body: Value) -> (u16, Value) {
    c.node(i).json(method, path, &body).await
}

fn s(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {v}"))
        .to_owned()
}

/// Node `i`'s view, or `None` while it answers anything but 200 (a node not in the
/// cluster yet).
async fn try_view(c: &Cluster, i: usize) -> Option<Vec<String>> {
    let (st, body) = call(c, i, Method::GET, "/key-value-store-view", Value::Null).await;
    (st == 200).then(|| {
        s(&body, "view")
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

async fn view(c: &Cluster, i: usize) -> Vec<String> {
    let (st, body) = call(c, i, Method::GET, "/key-value-store-view", Value::Null).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["message"], "View retrieved successfully");
    let text = s(&body, "view");
    text.split(',')
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn shard_ids(c: &Cluster, i: usize) -> Vec<String> {
    let (st, body) = call(
        c,
        i,
        Method::GET,
        "/key-value-store-shard/shard-ids",
        Value::Null,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["message"], "Shard IDs retrieved successfully");
    s(&body, "shard-ids")
        .split(',')
        .map(str::to_owned)
        .collect()
}

async fn members(c: &Cluster, i: usize, shard: &str) -> Vec<String> {
    let path = format!("/key-value-store-shard/shard-id-members/{shard}");
    let (st, body) = call(c, i, Method::GET, &path, Value::Null).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        body["message"],
        "Members of shard ID retrieved successfully"
    );
    s(&body, "shard-id-members")
        .split(',')
        .map(str::to_owned)
        .collect()
}

async fn key_count(c: &Cluster, i: usize, shard: &str) -> u64 {
    let path = format!("/key-value-store-shard/shard-id-key-count/{shard}");
    let (st, body) = call(c, i, Method::GET, &path, Value::Null).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        body["message"],
        "Key count of shard ID retrieved successfully"
    );
    body["shard-id-key-count"]
        .as_u64()
        .unwrap_or_else(|| panic!("the key count is not a number: {body}"))
}

async fn counts(c: &Cluster, i: usize) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for id in shard_ids(c, i).await {
        let n = key_count(c, i, &id).await;
        out.insert(id, n);
    }
    out
}

async fn node_shard(c: &Cluster, i: usize) -> (u16, Value) {
    call(
        c,
        i,
        Method::GET,
        "/key-value-store-shard/node-shard-id",
        Value::Null,
    )
    .await
}

/// PUTs `n` keys `prefix<j>`, each carrying the metadata the one before returned,
/// through the nodes in turn; returns the values and the last metadata.
async fn chain(
    c: &Cluster,
    via: &[usize],
    prefix: &str,
    n: usize,
    mut metadata: String,
) -> (BTreeMap<String, String>, String) {
    let mut values = BTreeMap::new();
    for j in 0..n {
        let (key, value) = (format!("{prefix}{j}"), format!("value of {prefix}{j}"));
        let path = format!("/key-value-store/{key}");
        let body = json!({"value": value, "causal-metadata": metadata});
        let (st, reply) = call(c, via[j % via.len()], Method::PUT, &path, body).await;
        assert_eq!(st, 201, "PUT {key}: {reply}");
        assert_eq!(reply["message"], "Added successfully");
        metadata = s(&reply, "causal-metadata");
        values.insert(key, value);
    }
    (values, metadata)
}

/// Every key reads back with its value through the nodes in turn, with `metadata`.
async fn read_all(c: &Cluster, via: &[usize], values: &BTreeMap<String, String>, metadata: &str) {
    for (j, (key, value)) in values.iter().enumerate() {
        let path = format!("/key-value-store/{key}");
        let body = json!({"causal-metadata": metadata});
        let (st, reply) = call(c, via[j % via.len()], Method::GET, &path, body).await;
        assert_eq!(st, 200, "GET {key} on node {}: {reply}", via[j % via.len()]);
        assert_eq!(reply["value"], *value, "{key}");
    }
}

/// Waits (up to `limit`) until `check` holds; returns how long it took.
async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return start.elapsed();
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    panic!("{what}: not within {limit:?}");
}

fn balanced(counts: &BTreeMap<String, u64>) -> bool {
    let max = counts.values().max().copied().unwrap_or(0) as f64;
    let min = counts.values().min().copied().unwrap_or(0) as f64;
    max <= 1.25 * min
}

#[tokio::test(flavor = "multi_thread")]
async fn six_nodes_in_two_shards_serve_the_seed_002_api() {
    let c = Cluster::start_shards(90, 6, 0, Some(2)).await;
    c.within(SCENARIO, async {
        // Shards dealt round-robin in VIEW order, as the seed's example shows.
        assert_eq!(shard_ids(&c, 0).await, ["0", "1"]);
        for shard in 0..2 {
            let want: Vec<String> = (0..6)
                .filter(|i| i % 2 == shard)
                .map(|i| c.addr(i).to_owned())
                .collect();
            assert_eq!(members(&c, 3, &shard.to_string()).await, want);
        }
        for i in 0..6 {
            let (st, body) = node_shard(&c, i).await;
            assert_eq!(st, 200, "{body}");
            assert_eq!(body["shard-id"], (i % 2).to_string(), "node {i}");
        }
        let all: Vec<String> = (0..6).map(|i| c.addr(i).to_owned()).collect();
        assert_eq!(view(&c, 4).await, all);

        // The first PUT with empty metadata: version equals causal-metadata.
        let (st, first) = call(
            &c,
            0,
            Method::PUT,
            "/key-value-store/first",
            json!({"value": "one", "causal-metadata": ""}),
        )
        .await;
        assert_eq!(st, 201, "{first}");
        assert_eq!(first["version"], first["causal-metadata"]);
        let shard = s(&first, "shard-id");
        assert!(["0", "1"].contains(&shard.as_str()), "{first}");
        // Any replica returns exactly that version and metadata, with or without it.
        for i in 0..6 {
            for body in [json!({}), json!({"causal-metadata": first["causal-metadata"]})] {
                let (st, got) = call(&c, i, Method::GET, "/key-value-store/first", body).await;
                assert_eq!(st, 200, "{got}");
                assert_eq!(got["message"], "Retrieved successfully");
                assert_eq!(got["value"], "one");
                assert_eq!(got["version"], first["version"], "node {i}");
                assert_eq!(got["causal-metadata"], first["causal-metadata"], "node {i}");
            }
        }
        let (st, updated) = call(
            &c,
            3,
            Method::PUT,
            "/key-value-store/first",
            json!({"value": "two", "causal-metadata": first["causal-metadata"]}),
        )
        .await;
        assert_eq!(st, 200, "{updated}");
        assert_eq!(updated["message"], "Updated successfully");
        assert_ne!(updated["version"], first["version"]);

        // 600 causally chained PUTs spread over the nodes, read on other nodes.
        let (mut values, metadata) = chain(&c, &[0, 1, 2, 3, 4, 5], "k", 600, s(&updated, "causal-metadata")).await;
        read_all(&c, &[3, 4, 5, 0, 1, 2], &values, &metadata).await;
        values.insert("first".into(), "two".into());
        let counted = counts(&c, 2).await;
        assert_eq!(counted.values().sum::<u64>(), 601, "{counted:?}");
        assert!(balanced(&counted), "{counted:?}");
        println!("figure: 601 keys in two shards: {counted:?}");

        // DELETE, then GET: gone everywhere.
        let (st, deleted) = call(
            &c,
            1,
            Method::DELETE,
            "/key-value-store/k7",
            json!({"causal-metadata": metadata}),
        )
        .await;
        assert_eq!(st, 200, "{deleted}");
        assert_eq!(deleted["message"], "Deleted successfully");
        let after = s(&deleted, "causal-metadata");
        for i in 0..6 {
            let (st, got) = call(&c, i, Method::GET, "/key-value-store/k7", json!({"causal-metadata": after})).await;
            assert_eq!(st, 404, "{got}");
            assert_eq!(got, json!({"doesExist": false, "error": "Key does not exist", "message": "Error in GET"}));
        }
        let (st, got) = call(&c, 2, Method::DELETE, "/key-value-store/k7", json!({"causal-metadata": after})).await;
        assert_eq!((st, got), (404, json!({"doesExist": false, "error": "Key does not exist", "message": "Error in DELETE"})));

        // The contract's errors, word for word.
        let long = "k".repeat(51);
        let (st, got) = call(&c, 0, Method::PUT, &format!("/key-value-store/{long}"), json!({"value": "v", "causal-metadata": ""})).await;
        assert_eq!((st, got), (400, json!({"error": "Key is too long", "message": "Error in PUT"})));
        let (st, got) = call(&c, 0, Method::PUT, "/key-value-store/novalue", json!({"causal-metadata": ""})).await;
        assert_eq!((st, got), (400, json!({"error": "Value is missing", "message": "Error in PUT"})));
        let (st, got) = call(&c, 1, Method::PUT, "/key-value-store-view", json!({"socket-address": c.addr(2)})).await;
        assert_eq!((st, got), (404, json!({"error": "Socket address already exists in the view", "message": "Error in PUT"})));
        let (st, got) = call(&c, 1, Method::DELETE, "/key-value-store-view", json!({"socket-address": "127.77.90.200:8080"})).await;
        assert_eq!((st, got), (404, json!({"error": "Socket address does not exist in the view", "message": "Error in DELETE"})));
        for path in [
            "/key-value-store-shard/shard-id-members/7",
            "/key-value-store-shard/shard-id-key-count/7",
        ] {
            let (st, got) = call(&c, 0, Method::GET, path, Value::Null).await;
            assert_eq!(st, 404, "{path}: {got}");
        }
        let (st, got) = call(&c, 0, Method::PUT, "/key-value-store-shard/add-member/7", json!({"socket-address": c.addr(1)})).await;
        assert_eq!(st, 404, "{got}");
        let (st, got) = call(&c, 0, Method::PUT, "/key-value-store/bad", Value::String("not an object".into())).await;
        assert_eq!(st, 400, "{got}");
        let (st, got) = call(&c, 0, Method::PUT, "/key-value-store/bad", json!({"value": "v", "causal-metadata": "forged"})).await;
        assert_eq!(st, 400, "{got}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_joins_by_itself_then_add_member_and_reshard_move_only_what_they_must() {
    let c = Cluster::start_shards(91, 6, 1, Some(2)).await;
    c.within(SCENARIO, async {
        let (values, metadata) = chain(&c, &[0, 1, 2, 3, 4, 5], "key", 600, String::new()).await;
        let before = counts(&c, 0).await;
        assert_eq!(before.values().sum::<u64>(), 600);

        // The seventh node, started the seed's way (its VIEW includes it, no
        // SHARD_COUNT), appears in every view and belongs to no shard.
        let newcomer = c.addr(6).to_owned();
        c.join(6).await;
        let took = wait_for("the newcomer in every view", VIEW_BOUND, || async {
            let mut all = true;
            for i in 0..7 {
                all &= try_view(&c, i)
                    .await
                    .is_some_and(|v| v.last() == Some(&newcomer));
            }
            all
        })
        .await;
        println!("figure: a node started with the full VIEW joined every view in {took:?}");
        assert_eq!(node_shard(&c, 6).await.0, 404);

        // add-member: it joins shard 1 and holds its keys before the reply.
        let (st, got) = call(&c, 2, Method::PUT, "/key-value-store-shard/add-member/1", json!({"socket-address": newcomer})).await;
        assert_eq!(st, 200, "{got}");
        let (st, got) = node_shard(&c, 6).await;
        assert_eq!((st, s(&got, "shard-id")), (200, "1".to_owned()));
        assert!(members(&c, 0, "1").await.contains(&newcomer));
        let progress = c.status(2).await["view_change"].clone();
        println!(
            "figure: add-member copied {} keys to the newcomer; shard 1 holds {} (the minimum is every key of the shard, once)",
            progress["keys_moved"], before["1"]
        );
        assert_eq!(progress["keys_moved"].as_u64(), Some(before["1"]), "{progress}");
        assert_eq!(key_count(&c, 6, "1").await, before["1"]);
        read_all(&c, &[6], &values, &metadata).await;

        // reshard: refused past the nodes' capacity, then 2 -> 3.
        let (st, got) = call(&c, 3, Method::PUT, "/key-value-store-shard/reshard", json!({"shard-count": 10})).await;
        assert_eq!(
            (st, got),
            (400, json!({"message": "Not enough nodes to provide fault-tolerance with the given shard count!"}))
        );
        let (st, got) = call(&c, 3, Method::PUT, "/key-value-store-shard/reshard", json!({"shard-count": 3})).await;
        assert_eq!((st, got), (200, json!({"message": "Resharding done successfully"})));
        let progress = c.status(3).await["view_change"].clone();
        assert_eq!(shard_ids(&c, 4).await, ["0", "1", "2"]);
        let mut sizes = Vec::new();
        for shard in ["0", "1", "2"] {
            sizes.push(members(&c, 5, shard).await.len());
        }
        sizes.sort_unstable();
        assert_eq!(sizes, [2, 2, 3]);
        let after = counts(&c, 1).await;
        assert_eq!(after.values().sum::<u64>(), 600, "{after:?}");
        assert!(balanced(&after), "{after:?}");
        println!(
            "figure: reshard 2 -> 3 moved {} keys ({} copies); counts {after:?}",
            progress["keys_moved"], progress["keys_copied"]
        );
        read_all(&c, &[0, 1, 2, 3, 4, 5, 6], &values, &metadata).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_replica_leaves_the_views_and_comes_back_at_its_place_with_its_keys() {
    let c = Cluster::start_shards(92, 4, 0, Some(2)).await;
    c.within(SCENARIO, async {
        let (mut values, metadata) = chain(&c, &[0, 1, 2, 3], "a", 100, String::new()).await;
        let gone = c.addr(1).to_owned();
        c.stop(1).await;
        let took = wait_for(
            "the stopped replica out of every view",
            VIEW_BOUND,
            || async {
                let mut out = true;
                for i in [0, 2, 3] {
                    out &= !view(&c, i).await.contains(&gone);
                }
                out
            },
        )
        .await;
        println!("figure: a stopped replica left every view in {took:?}");
        // Its shard still takes writes on the other replica.
        let (more, metadata) = chain(&c, &[0, 2, 3], "b", 100, metadata).await;
        values.extend(more);
        c.restart(1).await;
        let took = wait_for(
            "the replica back in every view, at its place",
            Duration::from_secs(30),
            || async {
                let mut back = true;
                for i in 0..4 {
                    back &= view(&c, i).await.get(1) == Some(&gone);
                }
                back
            },
        )
        .await;
        println!("figure: the restarted replica was back in every view in {took:?}");
        let (st, got) = node_shard(&c, 1).await;
        assert_eq!(st, 200, "{got}");
        let shard = s(&got, "shard-id");
        let want = key_count(&c, 0, &shard).await;
        wait_for(
            "the replica holds its shard's keys",
            Duration::from_secs(5),
            || async {
                c.node(1)
                    .json(
                        Method::GET,
                        &format!("/key-value-store-shard/shard-id-key-count/{shard}"),
                        &Value::Null,
                    )
                    .await
                    .1["shard-id-key-count"]
                    .as_u64()
                    == Some(want)
            },
        )
        .await;
        read_all(&c, &[1], &values, &metadata).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_shard_count_the_nodes_form_one_shard_of_every_node() {
    let c = Cluster::start_shards(93, 3, 0, None).await;
    c.within(SCENARIO, async {
        wait_for(
            "every node in the one-shard cluster",
            Duration::from_secs(10),
            || async {
                let mut all = true;
                for i in 0..3 {
                    all &= try_view(&c, i).await.is_some_and(|v| v.len() == 3);
                }
                all
            },
        )
        .await;
        assert_eq!(shard_ids(&c, 0).await, ["0"]);
        let all: Vec<String> = (0..3).map(|i| c.addr(i).to_owned()).collect();
        for i in 0..3 {
            assert_eq!(members(&c, i, "0").await, all);
            assert_eq!(view(&c, i).await, all);
        }
        let (values, metadata) = chain(&c, &[0, 1, 2], "x", 30, String::new()).await;
        read_all(&c, &[2, 0, 1], &values, &metadata).await;
        assert_eq!(key_count(&c, 1, "0").await, 30);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn versions_are_the_same_strings_on_every_replica_with_one_cut_off() {
    let c = Cluster::start_shards(94, 6, 0, Some(2)).await;
    c.within(SCENARIO, async {
        // Replicas of shard 0 are nodes 0, 2, 4; cut node 4 off (SIGSTOP).
        c.pause(4);
        let mut puts = Vec::new();
        for j in 0..20 {
            let key = format!("v{j}");
            let (st, put) = call(
                &c,
                [0, 2][j % 2],
                Method::PUT,
                &format!("/key-value-store/{key}"),
                json!({"value": "x", "causal-metadata": ""}),
            )
            .await;
            assert_eq!(
                st, 201,
                "a PUT with one replica cut off still succeeds: {put}"
            );
            puts.push((key, put));
        }
        for (key, put) in &puts {
            for i in [0, 1, 2, 3, 5] {
                let (st, got) = call(
                    &c,
                    i,
                    Method::GET,
                    &format!("/key-value-store/{key}"),
                    json!({"causal-metadata": ""}),
                )
                .await;
                assert_eq!(st, 200, "{got}");
                assert_eq!(got["version"], put["version"], "{key} on node {i}");
                assert_eq!(
                    got["causal-metadata"], put["causal-metadata"],
                    "{key} on node {i}"
                );
            }
        }
        c.resume(4);
        // Back, the cut-off replica has them, with the same strings.
        for (key, put) in &puts {
            let shard = s(put, "shard-id");
            if shard != "0" {
                continue;
            }
            let path = format!("/key-value-store/{key}");
            wait_for(
                "the resumed replica has the write",
                Duration::from_secs(5),
                || async {
                    let (st, got) = call(
                        &c,
                        4,
                        Method::GET,
                        &path,
                        json!({"causal-metadata": put["causal-metadata"]}),
                    )
                    .await;
                    st == 200
                        && got["version"] == put["version"]
                        && got["causal-metadata"] == put["causal-metadata"]
                },
            )
            .await;
        }
    })
    .await;
}

/// The seed's own example: a node fails, then the client reshards; the reshard deals the
/// nodes that are up (the one down leaves the view for good) and loses no key.
#[tokio::test(flavor = "multi_thread")]
async fn a_reshard_after_a_node_failed_deals_the_nodes_that_are_up() {
    let c = Cluster::start_shards(95, 6, 0, Some(2)).await;
    c.within(SCENARIO, async {
        let (values, metadata) = chain(&c, &[0, 1, 2, 3, 4, 5], "f", 120, String::new()).await;
        let gone = c.addr(5).to_owned();
        c.stop(5).await;
        wait_for("the stopped node out of every view", VIEW_BOUND, || async {
            let mut out = true;
            for i in 0..5 {
                out &= !view(&c, i).await.contains(&gone);
            }
            out
        })
        .await;
        // Five nodes are up: three shards would need six.
        let (st, got) = call(&c, 0, Method::PUT, "/key-value-store-shard/reshard", json!({"shard-count": 3})).await;
        assert_eq!(
            (st, got),
            (400, json!({"message": "Not enough nodes to provide fault-tolerance with the given shard count!"}))
        );
        let (st, got) = call(&c, 2, Method::PUT, "/key-value-store-shard/reshard", json!({"shard-count": 2})).await;
        assert_eq!((st, got), (200, json!({"message": "Resharding done successfully"})));
        let mut sizes = Vec::new();
        for shard in ["0", "1"] {
            let m = members(&c, 1, shard).await;
            assert!(!m.contains(&gone), "{m:?}");
            sizes.push(m.len());
        }
        sizes.sort_unstable();
        assert_eq!(sizes, [2, 3]);
        let counted = counts(&c, 3).await;
        assert_eq!(counted.values().sum::<u64>(), 120, "{counted:?}");
        read_all(&c, &[0, 1, 2, 3, 4], &values, &metadata).await;
    })
    .await;
}
