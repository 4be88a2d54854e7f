//! Process-level tests of view changes: `PUT /kv-store/update_view` adding and removing
//! nodes of a running cluster of real `kvs` processes on loopback (see `common`).
//!
//! Each test owns the address range `127.77.<id>.0/24` with ids 40..=49 (the core
//! tests use lower ids). What they check, beyond the seed's replies and partition
//! counts: every acknowledged key stays readable with its latest value through every
//! node, each key ends in exactly one partition, writes during a change are either
//! acknowledged (and then never lost) or refused with a retryable 503, tokens issued
//! before a change stay usable, and a change interrupted by `kill -9` completes once
//! the node is back.
//!
//! Slow transfers are simulated with the server's `KVS_PULL_PAGE_DELAY_MS` testing aid,
//! which delays every page a node pulls during a view change.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    assert_error, assert_success, form, keys, load, value_of, verify, Cluster, NodeClient,
    POLL_INTERVAL,
};
use kvs::client::Method;
use serde_json::Value;

/// Bound of one whole scenario.
const SCENARIO: Duration = Duration::from_secs(420);
/// Time the nodes get to agree on one view after a change or a restart (a stalled
/// change is re-driven after 5 s of inactivity).
const CONVERGE: Duration = Duration::from_secs(90);
/// Waits until every node of `nodes` reports the same epoch, the same members and no
/// transition; returns that epoch and the sorted members.
async fn converge(c: &Cluster, nodes: &[usize]) -> (u64, Vec<String>) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let mut views = Vec::new();
        let mut in_transition = false;
        for &i in nodes {
            let status = c.status(i).await;
            in_transition |= !status["transition"].is_null();
            views.push(c.view_of(i).await);
        }
        if !in_transition && views.iter().all(|v| v.is_some() && *v == views[0]) {
            return views[0].clone().expect("checked above");
        }
        assert!(
            Instant::now() < deadline,
            "nodes {nodes:?} did not agree on one view within {CONVERGE:?}: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Per partition of node `via`'s view: the key count of each replica, once the counts
/// have settled (handed-over keys are deleted in the background): every replica of a
/// partition holds the same number of keys, and the partitions hold `total` together,
/// which means each key lives in exactly one partition.
async fn settled_counts(c: &Cluster, via: usize, total: u64) -> Vec<u64> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let status = c.status(via).await;
        let partitions = status["view"]["partitions"]
            .as_array()
            .unwrap_or_else(|| panic!("status of node {via} without partitions: {status}"))
            .clone();
        let mut per_partition = Vec::new();
        let mut agreed = true;
        for p in &partitions {
            let members: Vec<String> = p["members"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m.as_str().map(str::to_owned))
                .collect();
            let mut counts = Vec::new();
            for i in c.indices_of(&members) {
                counts.push(c.status(i).await["keys"].as_u64().unwrap_or(u64::MAX));
            }
            agreed &= counts.windows(2).all(|w| w[0] == w[1]);
            per_partition.push(counts.first().copied().unwrap_or(0));
        }
        if agreed && per_partition.iter().sum::<u64>() == total {
            return per_partition;
        }
        assert!(
            Instant::now() < deadline,
            "key counts did not settle to {total} within {CONVERGE:?}: {per_partition:?} \
             (replicas agree: {agreed})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until node `i` reports `role` in its status.
async fn wait_role(c: &Cluster, i: usize, role: &str) -> Value {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let status = c.status(i).await;
        if status["role"] == role {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "node {i} did not become {role} within {CONVERGE:?}: {status}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Waits until node `i` is in a transition (a view change has been decided and is
/// being carried out).
async fn wait_transition(c: &Cluster, i: usize) {
    let deadline = Instant::now() + CONVERGE;
    while c.status(i).await["transition"].is_null() {
        assert!(
            Instant::now() < deadline,
            "node {i} never entered a transition"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Asserts an error reply with `status` that leaves every node of `nodes` in view `epoch`.
async fn assert_refused(
    c: &Cluster,
    reply: (u16, Value),
    status: u16,
    what: &str,
    nodes: &[usize],
    epoch: u64,
) {
    let (got, body) = reply;
    assert_eq!(got, status, "{what}: {body}");
    assert_error(&body);
    for &i in nodes {
        let (e, _) = c.view_of(i).await.expect("still in the cluster");
        assert_eq!(e, epoch, "{what} changed the view of node {i}");
    }
}

/// Every node's `get_partition_id` agrees with every node's partition lists, each
/// partition has `k` members and together they and the proxies are `members`.
async fn assert_layout(c: &Cluster, nodes: &[usize], partitions: usize, k: usize) {
    for &i in nodes {
        let ids = c.all_partition_ids(i).await;
        assert_eq!(
            ids,
            (0..partitions as i64).collect::<Vec<_>>(),
            "partition ids on node {i}"
        );
        let mut placed = Vec::new();
        for p in ids {
            let members = c.partition_members(i, p).await;
            assert_eq!(members.len(), k, "members of partition {p} on node {i}");
            for m in &members {
                let j = c.indices_of(std::slice::from_ref(m));
                assert_eq!(j.len(), 1, "unknown member {m}");
                assert_eq!(c.partition_id(j[0]).await, p, "partition of {m}");
            }
            placed.extend(members);
        }
        let proxies: Vec<usize> = nodes
            .iter()
            .copied()
            .filter(|j| !placed.iter().any(|m| m == c.addr(*j)))
            .collect();
        assert_eq!(
            placed.len() + proxies.len(),
            nodes.len(),
            "layout on node {i}"
        );
        for j in proxies {
            assert_eq!(c.partition_id(j).await, -1, "node {j} is a proxy");
        }
    }
}

/// `(partition_id, number_of_partitions)` of an add's reply.
fn add_reply(body: &Value) -> (i64, i64) {
    (int(body, "partition_id"), int(body, "number_of_partitions"))
}

fn int(body: &Value, field: &str) -> i64 {
    body[field]
        .as_i64()
        .unwrap_or_else(|| panic!("no integer {field} in {body}"))
}

/// The seed's first scenario: N=6, K=3 has 2 partitions; adding one node makes it a
/// proxy, adding two more makes a third partition. Invalid requests change nothing.
#[tokio::test(flavor = "multi_thread")]
async fn seed_k3_adds_grow_partitions_and_bad_requests_change_nothing() {
    let c = Cluster::start_with_spares(40, 6, 3, 3, &[]).await;
    c.within(SCENARIO, async {
        let initial: Vec<usize> = (0..6).collect();
        let data = keys("k3", 300);
        load(&c, &initial, &data).await;
        let (epoch, _) = converge(&c, &initial).await;

        // Invalid requests: clear errors, nothing changes.
        let member = c.addr(0).to_owned();
        let reply = c.try_update_view(1, "add", &member).await.expect("answer");
        assert_refused(&c, reply, 409, "adding a member", &initial, epoch).await;
        let not_started = c.addr(6).to_owned();
        let reply = c
            .try_update_view(1, "add", &not_started)
            .await
            .expect("answer");
        assert_refused(
            &c,
            reply,
            503,
            "adding an unreachable node",
            &initial,
            epoch,
        )
        .await;
        let reply = c
            .try_update_view(2, "remove", &not_started)
            .await
            .expect("answer");
        assert_refused(&c, reply, 404, "removing a non-member", &initial, epoch).await;
        let reply = c
            .try_request(
                0,
                Method::PUT,
                "/kv-store/update_view?type=add",
                String::new(),
            )
            .await
            .expect("answer");
        assert_refused(&c, reply, 400, "missing ip_port", &initial, epoch).await;
        let reply = c
            .try_request(
                0,
                Method::PUT,
                "/kv-store/update_view?type=swap",
                form(&[("ip_port", &not_started)]),
            )
            .await
            .expect("answer");
        assert_refused(&c, reply, 400, "an unknown type", &initial, epoch).await;
        let reply = c
            .try_request(
                0,
                Method::PUT,
                "/kv-store/update_view?type=add",
                form(&[("ip_port", "not-an-address")]),
            )
            .await
            .expect("answer");
        assert_refused(&c, reply, 400, "a malformed ip_port", &initial, epoch).await;

        // add one → 2 partitions + 1 proxy; the reply names the new node's role.
        c.start_spare(6).await;
        let body = c.update_view(1, "add", c.addr(6)).await;
        assert_eq!(add_reply(&body), (-1, 2));
        // add another through the proxy just added → still 2 partitions.
        c.start_spare(7).await;
        let body = c.update_view(6, "add", c.addr(7)).await;
        assert_eq!(add_reply(&body), (-1, 2));
        // and a third → 9 nodes, 3 partitions; the new node is in the new one.
        c.start_spare(8).await;
        let body = c.update_view(2, "add", c.addr(8)).await;
        assert_eq!(add_reply(&body), (2, 3));

        let all: Vec<usize> = (0..9).collect();
        let (epoch, members) = converge(&c, &all).await;
        assert_eq!(members.len(), 9, "members at epoch {epoch}: {members:?}");
        assert_layout(&c, &all, 3, 3).await;
        verify(&c, &all, &data, data.len()).await;
        settled_counts(&c, 0, data.len() as u64).await;
    })
    .await;
}

/// The seed's second scenario: N=6, K=2 has 3 partitions; removing one node leaves 2
/// and a proxy. The removed node leaves the cluster (and stays out across a restart),
/// can be added again, and every node restarts into the view it is in.
#[tokio::test(flavor = "multi_thread")]
async fn seed_k2_remove_then_readd_and_restart_into_the_view() {
    let c = Cluster::start(41, 6, 2).await;
    c.within(SCENARIO, async {
        let all: Vec<usize> = (0..6).collect();
        let data = keys("k2", 600);
        load(&c, &all, &data).await;
        let mut early = c.session("early");
        let early_key = "k2_0";
        early.read(3, early_key).await;

        let body = c.update_view(0, "remove", c.addr(5)).await;
        assert_eq!(int(&body, "number_of_partitions"), 2);
        assert!(body.get("partition_id").is_none(), "remove reply: {body}");
        let rest: Vec<usize> = (0..5).collect();
        converge(&c, &rest).await;
        assert_layout(&c, &rest, 2, 2).await;
        verify(&c, &rest, &data, 100).await;
        // A token from before the change still works, through any node.
        for i in rest.iter().copied() {
            assert_eq!(early.read(i, early_key).await, data[early_key]);
        }

        // The removed node is in no cluster: its data is dropped, key requests get a
        // retryable 503, and a restart (with its old VIEW) keeps it out.
        let status = wait_role(&c, 5, "none").await;
        assert!(status["view"].is_null(), "removed node's status: {status}");
        let (code, body) = c.get(5, early_key, "").await;
        assert_eq!(code, 503, "GET via a removed node: {body}");
        assert_error(&body);
        c.stop(5).await;
        c.restart(5).await;
        let status = wait_role(&c, 5, "none").await;
        let deadline = Instant::now() + CONVERGE;
        let mut status = status;
        while status["keys"] != 0 {
            assert!(
                Instant::now() < deadline,
                "removed node kept its keys: {status}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
            status = c.status(5).await;
        }

        // Added again → 3 partitions again.
        let body = c.update_view(1, "add", c.addr(5)).await;
        assert_eq!(int(&body, "number_of_partitions"), 3);
        let (epoch, members) = converge(&c, &all).await;
        assert_eq!(members.len(), 6);
        assert_layout(&c, &all, 3, 2).await;

        // Every node restarts into the view it is in (the stored view wins over VIEW).
        for i in all.iter().copied() {
            c.stop(i).await;
            c.restart(i).await;
        }
        assert_eq!(converge(&c, &all).await, (epoch, members));
        assert_layout(&c, &all, 3, 2).await;
        verify(&c, &all, &data, 100).await;
        settled_counts(&c, 0, data.len() as u64).await;
        assert_eq!(early.read(5, early_key).await, data[early_key]);
    })
    .await;
}

/// 10,000 keys through a sequence of adds and removes: afterwards every key is readable
/// with its value through every node, each key lives in exactly one partition, and the
/// add that made a new partition moved exactly the keys that partition now holds.
#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_keys_survive_adds_and_removes() {
    let c = Cluster::start_with_spares(42, 4, 2, 2, &[]).await;
    c.within(SCENARIO, async {
        let data = keys("many", 10_000);
        load(&c, &[0, 1, 2, 3], &data).await;

        c.start_spare(4).await;
        let body = c.update_view(0, "add", c.addr(4)).await;
        assert_eq!(add_reply(&body), (-1, 2));
        c.start_spare(5).await;
        let body = c.update_view(3, "add", c.addr(5)).await;
        assert_eq!(int(&body, "number_of_partitions"), 3);
        let new_partition = int(&body, "partition_id");
        assert!(new_partition >= 0, "the 6th node joins a partition: {body}");
        let progress = c.status(3).await["view_change"].clone();
        assert_eq!(
            progress["phase"], "done",
            "coordinator progress: {progress}"
        );
        let moved = progress["keys_moved"].as_u64().expect("keys_moved");
        let counts = settled_counts(&c, 3, data.len() as u64).await;
        assert_eq!(
            moved, counts[new_partition as usize],
            "keys moved vs keys the new partition holds ({counts:?})"
        );
        verify(&c, &[0, 1, 2, 3, 4, 5], &data, 200).await;

        c.update_view(1, "remove", c.addr(0)).await;
        let body = c.update_view(5, "remove", c.addr(4)).await;
        assert_eq!(int(&body, "number_of_partitions"), 2);
        let live = [1, 2, 3, 5];
        converge(&c, &live).await;
        assert_layout(&c, &live, 2, 2).await;
        verify(&c, &live, &data, 300).await;
        settled_counts(&c, 1, data.len() as u64).await;
    })
    .await;
}

/// Both replicas of a partition are removed, one alive and then, after a kill -9, one
/// dead; then a dead replica of another partition. No key is lost.
#[tokio::test(flavor = "multi_thread")]
async fn removing_a_whole_partition_and_dead_nodes_keeps_every_key() {
    let c = Cluster::start(43, 6, 2).await;
    c.within(SCENARIO, async {
        let all: Vec<usize> = (0..6).collect();
        let data = keys("whole", 1_000);
        load(&c, &all, &data).await;
        assert_eq!(c.expected_members(1), vec![2, 3]);
        settled_counts(&c, 0, data.len() as u64).await;

        // Partition 1 is {2, 3}: remove 2 while alive …
        c.update_view(0, "remove", c.addr(2)).await;
        converge(&c, &[0, 1, 3, 4, 5]).await;
        // … and 3 after it has crashed.
        c.kill_9(3);
        let body = c.update_view(4, "remove", c.addr(3)).await;
        assert_eq!(int(&body, "number_of_partitions"), 2);
        let live = [0, 1, 4, 5];
        converge(&c, &live).await;
        assert_layout(&c, &live, 2, 2).await;
        verify(&c, &live, &data, 100).await;
        settled_counts(&c, 0, data.len() as u64).await;

        // A dead replica whose partition partner is alive: its keys come from the partner.
        c.kill_9(0);
        let body = c.update_view(5, "remove", c.addr(0)).await;
        assert_eq!(int(&body, "number_of_partitions"), 1);
        let live = [1, 4, 5];
        converge(&c, &live).await;
        assert_layout(&c, &live, 1, 2).await;
        verify(&c, &live, &data, data.len()).await;
        settled_counts(&c, 1, data.len() as u64).await;
    })
    .await;
}

/// The coordinator is killed (-9) while keys are moving; once it is back, the change
/// completes by itself, every key is readable, and re-issuing the add is refused.
#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_mid_change_then_the_change_completes() {
    let c = Cluster::start_with_spares(44, 3, 1, 1, &[("KVS_PULL_PAGE_DELAY_MS", "2000")]).await;
    c.within(SCENARIO, async {
        let data = keys("coord", 3_000);
        load(&c, &[0, 1, 2], &data).await;
        c.start_spare(3).await;
        let (epoch, _) = converge(&c, &[0, 1, 2]).await;

        let target = c.addr(3).to_owned();
        let coordinator = c.node(0);
        let change = tokio::spawn(async move {
            coordinator
                .try_update_view("add", &target, Duration::from_secs(60))
                .await
        });
        wait_transition(&c, 3).await;
        c.kill_9(0);
        // The request dies with its coordinator.
        let outcome = change.await.expect("request task");
        assert!(
            outcome.is_err(),
            "the coordinator answered after kill -9: {outcome:?}"
        );

        c.unset_env("KVS_PULL_PAGE_DELAY_MS");
        c.restart(0).await;
        let all = [0, 1, 2, 3];
        let (new_epoch, members) = converge(&c, &all).await;
        assert_eq!(new_epoch, epoch + 1, "one change");
        assert_eq!(members.len(), 4, "the decided add completed: {members:?}");
        assert_layout(&c, &all, 4, 1).await;
        verify(&c, &all, &data, 100).await;
        settled_counts(&c, 1, data.len() as u64).await;

        let reply = c
            .try_update_view(1, "add", c.addr(3))
            .await
            .expect("answer");
        assert_refused(&c, reply, 409, "re-adding a member", &all, new_epoch).await;
    })
    .await;
}

/// The joining node is killed (-9) while it pulls its keys and restarted a moment
/// later: the change completes (the coordinator's request succeeds, or gives up with a
/// retryable 503 and the change completes in the background), and nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn member_killed_mid_change_then_the_change_completes() {
    let c = Cluster::start_with_spares(45, 3, 1, 1, &[("KVS_PULL_PAGE_DELAY_MS", "1000")]).await;
    c.within(SCENARIO, async {
        let data = keys("member", 3_000);
        load(&c, &[0, 1, 2], &data).await;
        c.start_spare(3).await;
        let target = c.addr(3).to_owned();
        let coordinator = c.node(1);
        let change = tokio::spawn(async move {
            coordinator
                .try_update_view("add", &target, Duration::from_secs(120))
                .await
        });
        wait_transition(&c, 3).await;
        c.kill_9(3);
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.restart(3).await;

        let (status, body) = change.await.expect("request task").expect("an answer");
        match status {
            200 => assert_success(&body),
            503 => assert_error(&body),
            _ => panic!("update_view answered {status}: {body}"),
        }
        let all = [0, 1, 2, 3];
        let (_, members) = converge(&c, &all).await;
        assert_eq!(members.len(), 4, "{members:?}");
        verify(&c, &all, &data, 100).await;
        settled_counts(&c, 0, data.len() as u64).await;
    })
    .await;
}

/// What one writer saw: per key, the sequence number of its last acknowledged write.
#[derive(Default)]
struct WriterLog {
    acked: BTreeMap<String, u64>,
    ok: u64,
    unavailable: u64,
    token: String,
}

/// Writers keep writing (new keys and overwrites of their own keys, each value
/// carrying a sequence number, each writer passing its causal token along) through
/// every node, including one being removed, while the cluster gains two nodes and
/// loses one. Every reply is a success or a retryable 503; every acknowledged write is
/// readable afterwards with that value or a later one of the same writer; tokens from
/// before the changes stay usable.
#[tokio::test(flavor = "multi_thread")]
async fn writes_during_view_changes_are_never_lost() {
    let c = Cluster::start_with_spares(46, 4, 2, 2, &[("KVS_PULL_PAGE_DELAY_MS", "150")]).await;
    c.within(SCENARIO, async {
        let data = keys("pre", 2_000);
        load(&c, &[0, 1, 2, 3], &data).await;
        let mut before = c.session("before");
        before.write(2, "pre_0", "pre_0=v1").await;
        c.start_spare(4).await;
        c.start_spare(5).await;

        const WRITERS: usize = 4;
        const MAX_OPS: u64 = 5_000;
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let nodes: Vec<NodeClient> = (0..6).map(|i| c.node(i)).collect();
            let stop = stop.clone();
            writers.push(tokio::spawn(async move {
                let mut log = WriterLog::default();
                for seq in 1..=MAX_OPS {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // Alternate new keys and overwrites of this writer's preloaded keys.
                    let key = if seq % 2 == 0 {
                        format!("w{w}_{seq}")
                    } else {
                        format!("pre_{}", w + WRITERS * ((seq as usize / 2) % 50))
                    };
                    let val = format!("{key}=w{w}s{seq}");
                    let node = &nodes[(seq as usize + w) % nodes.len()];
                    let (status, body) = node
                        .try_request(
                            Method::PUT,
                            &format!("/kv-store/{key}"),
                            form(&[("val", &val), ("causal_payload", &log.token)]),
                        )
                        .await
                        .unwrap_or_else(|e| panic!("writer {w}: {e}"));
                    match status {
                        200 | 201 => {
                            assert_success(&body);
                            log.token = body["causal_payload"]
                                .as_str()
                                .expect("causal_payload")
                                .to_owned();
                            log.acked.insert(key, seq);
                            log.ok += 1;
                        }
                        503 => {
                            assert_error(&body);
                            log.unavailable += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        _ => panic!(
                            "writer {w}: PUT {key} via {} answered {status}: {body}",
                            node.addr()
                        ),
                    }
                }
                log
            }));
        }

        tokio::time::sleep(Duration::from_millis(500)).await;
        c.update_view(0, "add", c.addr(4)).await;
        c.update_view(2, "add", c.addr(5)).await;
        c.update_view(3, "remove", c.addr(1)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);

        let mut logs = Vec::new();
        for w in writers {
            logs.push(w.await.expect("writer task"));
        }
        let live = [0, 2, 3, 4, 5];
        converge(&c, &live).await;
        let (ok, unavailable): (u64, u64) = logs
            .iter()
            .fold((0, 0), |(a, b), l| (a + l.ok, b + l.unavailable));
        eprintln!("writes during the changes: {ok} acknowledged, {unavailable} answered 503");
        assert!(
            ok > 100,
            "too few writes acknowledged to test anything: {ok}"
        );

        // Every acknowledged write is there, with its value or a later one of its writer.
        let mut n = 0;
        for (w, log) in logs.iter().enumerate() {
            for (key, &seq) in &log.acked {
                let i = live[n % live.len()];
                n += 1;
                let (status, body) = c.get(i, key, "").await;
                assert_eq!(
                    status, 200,
                    "acknowledged {key} (seq {seq}) via node {i}: {body}"
                );
                let got = seq_of(key, &value_of(&body), w);
                assert!(got >= seq, "{key}: read seq {got}, acknowledged seq {seq}");
            }
            // The writer's last token still reads its writes, through every node.
            for &i in &live {
                let (key, &seq) = log.acked.iter().max_by_key(|(_, s)| **s).expect("acked");
                let (status, body) = c.get(i, key, &log.token).await;
                assert_eq!(status, 200, "writer {w}'s token via node {i}: {body}");
                let got = seq_of(key, &value_of(&body), w);
                assert!(
                    got >= seq,
                    "{key} with writer {w}'s token: seq {got} < {seq}"
                );
            }
        }
        // A token from before every change: usable through every live node.
        for &i in &live {
            let (status, body) = before.get(i, "pre_0").await;
            assert_eq!(status, 200, "old token via node {i}: {body}");
        }
        // Untouched preloaded keys kept their values.
        let untouched: BTreeMap<String, String> = data
            .into_iter()
            .filter(|(k, _)| {
                let j: usize = k["pre_".len()..].parse().expect("number");
                j >= WRITERS * 50
            })
            .collect();
        verify(&c, &live, &untouched, 50).await;
    })
    .await;
}

/// The sequence number in a value written by writer `w`.
fn seq_of(key: &str, value: &str, w: usize) -> u64 {
    value
        .rsplit_once(&format!("=w{w}s"))
        .and_then(|(_, s)| s.parse().ok())
        .unwrap_or_else(|| panic!("{key}: value {value:?} is not writer {w}'s"))
}
