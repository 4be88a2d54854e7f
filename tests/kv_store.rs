//! Process-level scenarios for the `/kv-store` dialect (seed 001, DESIGN.md §5.1).
//!
//! Each test starts its own cluster of real `kvs` processes on its own loopback range
//! (the first argument of `Cluster::start` is that range's id and must be unique per
//! test) and proves one behaviour. Assertions are about behaviour, never about speed:
//! time bounds are only generous upper limits that keep a broken server from hanging
//! the run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{assert_error, assert_success, form, value_of, Cluster, POLL_INTERVAL};
use kvs::client::Method;
use serde_json::Value;

/// Overall limit per scenario (the cluster start has its own deadline on top).
const SCENARIO_LIMIT: Duration = Duration::from_secs(120);
/// Staleness bound of the contract: replicas agree within 5 s of a fault healing.
const CONVERGENCE_BOUND: Duration = Duration::from_secs(5);

/// Asserts the fields every successful key reply has, and returns its partition id.
fn assert_key_reply(body: &Value) -> i64 {
    assert_success(body);
    assert!(
        body["causal_payload"].is_string(),
        "causal_payload must be a string: {body}"
    );
    let ts = body["timestamp"]
        .as_str()
        .unwrap_or_else(|| panic!("timestamp must be a string: {body}"));
    let secs: u64 = ts
        .parse()
        .unwrap_or_else(|_| panic!("timestamp {ts:?} is not unix seconds: {body}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    assert!(
        secs.abs_diff(now) < 3600,
        "timestamp {secs} is not a recent wall-clock time (now {now}): {body}"
    );
    body["partition_id"]
        .as_i64()
        .unwrap_or_else(|| panic!("partition_id must be an integer: {body}"))
}

/// Records a violation unless the reply is `expected` with the error envelope.
fn expect_error(
    problems: &mut Vec<String>,
    what: String,
    expected: u16,
    status: u16,
    body: &Value,
) {
    let envelope = body["result"] == "error"
        && body["msg"] == "error"
        && body["error"].as_str().is_some_and(|e| !e.is_empty());
    if status != expected || !envelope {
        problems.push(format!(
            "{what}: expected {expected} with an error envelope, got {status} {body}"
        ));
    }
}

/// Polls node `i` with an EMPTY causal payload (its local state, no catch-up help)
/// until `key` reads `expected`, or the deadline passes. Returns whether it did.
async fn local_read_reaches(
    c: &Cluster,
    i: usize,
    key: &str,
    expected: &str,
    deadline: Instant,
) -> bool {
    loop {
        let (status, body) = c.get(i, key, "").await;
        if status == 200 && body["value"] == expected {
            return true;
        }
        if Instant::now() > deadline {
            eprintln!("node {i}: {key} still reads {status} {body}, expected {expected:?}");
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn put_get_through_replicas_and_proxies() {
    // N=5, K=2: partitions {0,1} and {2,3}; node 4 is a proxy.
    let c = Cluster::start(1, 5, 2).await;
    c.within(SCENARIO_LIMIT, async {
        assert_eq!(c.partition_id(4).await, -1, "node 4 must be a proxy");
        let mut members = BTreeMap::new();
        for p in c.all_partition_ids(0).await {
            members.insert(p, c.partition_members(0, p).await);
        }
        // Each member listed for a partition reports that partition as its own.
        for (p, listed) in &members {
            for member in listed {
                let i = c
                    .view
                    .iter()
                    .position(|a| a == member)
                    .unwrap_or_else(|| panic!("member {member} of partition {p} not in VIEW"));
                assert_eq!(c.partition_id(i).await, *p, "member {member} of {p}");
            }
        }
        let mut client = c.session("client");
        let mut key_partition = BTreeMap::new();
        for n in 0..20 {
            let key = format!("key_{n}");
            let via = n % c.len(); // includes the proxy
            let (status, body) = client.put(via, &key, &format!("first {n}")).await;
            assert_eq!(status, 201, "new key {key} via node {via}: {body}");
            let p = assert_key_reply(&body);
            assert!(members.contains_key(&p), "{key}: unknown partition {p}");
            key_partition.insert(key.clone(), p);
            // Overwrite through another node: 200, same partition.
            let via2 = (n + 2) % c.len();
            let (status, body) = client.put(via2, &key, &format!("value {n}")).await;
            assert_eq!(status, 200, "existing key {key} via node {via2}: {body}");
            assert_eq!(assert_key_reply(&body), p, "{key}: partition changed");
        }
        let used: BTreeSet<i64> = key_partition.values().copied().collect();
        assert_eq!(
            used.len(),
            members.len(),
            "20 keys should land in every partition: {key_partition:?}"
        );
        for (n, (key, p)) in key_partition.iter().enumerate() {
            let expected = format!("value {}", &key["key_".len()..]);
            for i in 0..c.len() {
                let (status, body) = client.get(i, key).await;
                assert_eq!(status, 200, "GET {key} via node {i}: {body}");
                assert_eq!(
                    assert_key_reply(&body),
                    *p,
                    "GET {key} via node {i}: {body}"
                );
                assert_eq!(value_of(&body), expected, "GET {key} via node {i} (#{n})");
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn partition_endpoints_agree_on_every_node() {
    // N=7, K=2: three partitions of two nodes in VIEW order, node 6 a proxy.
    let c = Cluster::start(2, 7, 2).await;
    c.within(SCENARIO_LIMIT, async {
        let expected_ids: Vec<i64> = (0..c.partitions() as i64).collect();
        assert_eq!(expected_ids, vec![0, 1, 2]);
        for i in 0..c.len() {
            assert_eq!(
                c.partition_id(i).await,
                c.expected_partition_of(i),
                "get_partition_id on node {i} ({})",
                c.addr(i)
            );
            assert_eq!(
                c.all_partition_ids(i).await,
                expected_ids,
                "get_all_partition_ids on node {i}"
            );
            for p in 0..c.partitions() {
                let expected: Vec<String> = c
                    .expected_members(p)
                    .into_iter()
                    .map(|m| c.addr(m).to_owned())
                    .collect();
                assert_eq!(
                    c.partition_members(i, p as i64).await,
                    expected,
                    "get_partition_members({p}) on node {i}"
                );
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_clear_errors() {
    // N=3, K=2: one partition {0,1} and a proxy (node 2); every check runs against a
    // replica and the proxy, so validation cannot be skipped by forwarding.
    let c = Cluster::start(3, 3, 2).await;
    c.within(SCENARIO_LIMIT, async {
        let mut client = c.session("client");
        client.write(0, "good_key", "v").await;
        let token = client.token.clone();
        assert!(!token.is_empty(), "a write must return a causal payload");
        let truncated: String = token.chars().take(token.chars().count() / 2).collect();

        // A token minted by another cluster (other nodes, other secret).
        let foreign_token = {
            let other = Cluster::start_with_secret(33, 1, 1, "another-secret").await;
            let (status, body) = other.put(0, "good_key", "v", "").await;
            assert_eq!(status, 201, "foreign cluster PUT: {body}");
            body["causal_payload"]
                .as_str()
                .expect("foreign causal_payload")
                .to_owned()
        };

        // Every violation is collected, so one report lists them all.
        let mut problems = Vec::new();
        let long_ok = "k".repeat(200);
        let too_long = "k".repeat(201);
        for via in [0, 2] {
            // Bad keys: characters outside [A-Za-z0-9_], empty, over 200 characters.
            for key in [
                "bad-key",
                "bad.key",
                "bad%20key",
                "%C3%A9t%C3%A9",
                "",
                too_long.as_str(),
            ] {
                let (status, body) = c.put(via, key, "v", "").await;
                expect_error(
                    &mut problems,
                    format!("PUT key {key:?} via node {via}"),
                    400,
                    status,
                    &body,
                );
                let (status, body) = c.get(via, key, "").await;
                expect_error(
                    &mut problems,
                    format!("GET key {key:?} via node {via}"),
                    400,
                    status,
                    &body,
                );
            }
            let (status, body) = c.put(via, &long_ok, "v", "").await;
            if status != 201 && status != 200 {
                problems.push(format!(
                    "a 200-character key is valid, but PUT via node {via} got {status} {body}"
                ));
            }

            // PUT without val.
            let (status, body) = c
                .request(
                    via,
                    Method::PUT,
                    "/kv-store/no_val",
                    form(&[("causal_payload", "")]),
                )
                .await;
            expect_error(
                &mut problems,
                format!("PUT without val via node {via}"),
                400,
                status,
                &body,
            );

            // Malformed, truncated and foreign causal payloads, on GET and PUT.
            for (what, cp) in [
                ("garbage", "not a causal payload!!"),
                ("truncated", truncated.as_str()),
                ("foreign", foreign_token.as_str()),
            ] {
                let (status, body) = c.get(via, "good_key", cp).await;
                expect_error(
                    &mut problems,
                    format!("GET with {what} causal_payload via node {via}"),
                    400,
                    status,
                    &body,
                );
                let (status, body) = c.put(via, "good_key", "w", cp).await;
                expect_error(
                    &mut problems,
                    format!("PUT with {what} causal_payload via node {via}"),
                    400,
                    status,
                    &body,
                );
            }

            // 404: unknown key and unknown paths.
            let (status, body) = c.get(via, "never_written", "").await;
            expect_error(
                &mut problems,
                format!("GET unknown key via node {via}"),
                404,
                status,
                &body,
            );
            for path in ["/nope", "/kv-store/a/b"] {
                let (status, body) = c.request(via, Method::GET, path, String::new()).await;
                expect_error(
                    &mut problems,
                    format!("GET {path} via node {via}"),
                    404,
                    status,
                    &body,
                );
            }

            // 400: endpoint names are not keys, and a path that is not UTF-8 still gets
            // the error envelope.
            for name in [
                "get_partition_id",
                "get_all_partition_ids",
                "get_partition_members",
            ] {
                let body = form(&[("val", "x"), ("causal_payload", "")]);
                let (status, reply) = c
                    .request(via, Method::PUT, &format!("/kv-store/{name}"), body)
                    .await;
                expect_error(
                    &mut problems,
                    format!("PUT {name} via node {via}"),
                    400,
                    status,
                    &reply,
                );
            }
            let (status, reply) = c
                .request(via, Method::GET, "/kv-store/%FF", String::new())
                .await;
            expect_error(
                &mut problems,
                format!("GET /kv-store/%FF via node {via}"),
                400,
                status,
                &reply,
            );

            // 405: methods the dialect does not have, still with the error envelope.
            for method in [Method::POST, Method::PATCH] {
                let (status, body) = c
                    .request(via, method.clone(), "/kv-store/some_key", String::new())
                    .await;
                expect_error(
                    &mut problems,
                    format!("{method} /kv-store/some_key via node {via}"),
                    405,
                    status,
                    &body,
                );
            }

            // 413: a value over 2 MiB, and a body over 8 MiB (with a small value). Sent
            // with a client that reads a response arriving before the body is complete.
            let big_value = "a".repeat(2 * 1024 * 1024 + 1);
            let big_body = form(&[("val", &big_value), ("causal_payload", "")]);
            let (status, body) = c
                .request_reading_early(via, Method::PUT, "/kv-store/big", big_body.into_bytes())
                .await;
            expect_error(
                &mut problems,
                format!("value over 2 MiB via node {via}"),
                413,
                status,
                &body,
            );
            let padding = "p".repeat(8 * 1024 * 1024 + 1);
            let huge_body = form(&[
                ("val", "small"),
                ("causal_payload", ""),
                ("padding", &padding),
            ]);
            let (status, body) = c
                .request_reading_early(via, Method::PUT, "/kv-store/big", huge_body.into_bytes())
                .await;
            expect_error(
                &mut problems,
                format!("body over 8 MiB via node {via}"),
                413,
                status,
                &body,
            );
        }

        // None of the rejected writes took effect.
        let (status, body) = c.get(1, "good_key", &client.token).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(value_of(&body), "v", "a rejected PUT changed good_key");
        for key in ["no_val", "big"] {
            let (status, body) = c.get(1, key, &client.token).await;
            assert_eq!(status, 404, "rejected PUT of {key} created it: {body}");
        }

        // A 1.5 MB value (with characters that need form encoding) is accepted and
        // read back intact through the other replica and the proxy.
        let pattern = "abc&=+% xyz/?#é0123456789_";
        let large: String = pattern
            .chars()
            .cycle()
            .scan(0, |bytes, ch| {
                *bytes += ch.len_utf8();
                (*bytes <= 1_500_000).then_some(ch)
            })
            .collect();
        assert!(large.len() > 1_499_000, "test value is about 1.5 MB");
        let (status, body) = client.put(2, "large_value", &large).await;
        assert_eq!(status, 201, "1.5 MB value via the proxy: {}", body);
        for via in [1, 2] {
            let (status, body) = client.get(via, "large_value").await;
            assert_eq!(
                status, 200,
                "GET 1.5 MB value via node {via}: {}",
                body["error"]
            );
            let got = value_of(&body);
            assert!(
                got == large,
                "1.5 MB value via node {via} came back altered (len {} vs {})",
                got.len(),
                large.len()
            );
        }
        assert!(
            problems.is_empty(),
            "{} bad-input replies broke the contract:\n{}",
            problems.len(),
            problems.join("\n")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn causal_transitivity_across_three_replicas() {
    // N=3, K=3: one partition, three replicas.
    let c = Cluster::start(4, 3, 3).await;
    c.within(SCENARIO_LIMIT, async {
        // An old x everyone has seen, so a stale replica would show "x old", not 404.
        let mut setup = c.session("setup");
        setup.write(0, "x", "x old").await;
        let deadline = Instant::now() + CONVERGENCE_BOUND;
        for i in 0..3 {
            assert!(local_read_reaches(&c, i, "x", "x old", deadline).await);
        }

        for round in 0..10 {
            let (n1, n2, n3) = (round % 3, (round + 1) % 3, (round + 2) % 3);
            let x = format!("x from A, round {round}");
            let y = format!("y from B, round {round}");

            let mut a = c.session("A");
            a.write(n1, "x", &x).await;

            let mut b = c.session("B");
            b.adopt(&a.token);
            assert_eq!(
                b.read(n2, "x").await,
                x,
                "B reads x at node {n2} with A's token"
            );
            b.write(n2, "y", &y).await;

            let mut cc = c.session("C");
            cc.adopt(&b.token);
            assert_eq!(
                cc.read(n3, "y").await,
                y,
                "C reads y at node {n3} with B's token"
            );
            assert_eq!(
                cc.read(n3, "x").await,
                x,
                "C saw y, which was written after B read x: x at node {n3} must be A's"
            );
        }

        // Read-your-writes right after a write on a different replica, and monotonic
        // reads across replicas.
        let mut d = c.session("D");
        for n in 0..20 {
            let val = format!("ryw {n}");
            d.write(n % 3, "ryw", &val).await;
            for i in [(n + 1) % 3, (n + 2) % 3, n % 3] {
                assert_eq!(d.read(i, "ryw").await, val, "read-your-writes at node {i}");
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lagging_replica_catches_up_to_client_token() {
    // N=3, K=3. Node 2 misses writes while down; right after its restart a client
    // whose token covers those writes reads through it and must not see the past.
    let c = Cluster::start(5, 3, 3).await;
    c.within(SCENARIO_LIMIT, async {
        let mut setup = c.session("setup");
        setup.write(0, "x", "x old").await;
        setup.write(0, "y", "y old").await;
        let deadline = Instant::now() + CONVERGENCE_BOUND;
        for key in ["x", "y"] {
            assert!(local_read_reaches(&c, 2, key, &format!("{key} old"), deadline).await);
        }

        c.kill_9(2);
        let mut a = c.session("A");
        a.write(0, "x", "x new").await;
        let mut b = c.session("B");
        b.adopt(&a.token);
        assert_eq!(b.read(1, "x").await, "x new");
        b.write(1, "y", "y new").await;

        c.restart(2).await;
        let mut cc = c.session("C");
        cc.adopt(&b.token);
        assert_eq!(
            cc.read(2, "y").await,
            "y new",
            "restarted replica served stale y"
        );
        assert_eq!(
            cc.read(2, "x").await,
            "x new",
            "restarted replica served stale x"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_replica_keeps_acknowledged_writes() {
    // N=2, K=2. Writes accepted by node 0 are acknowledged; both replicas are then
    // SIGKILLed. Node 0 alone is restarted: with its peer down it can only serve
    // what is on its own disk.
    let c = Cluster::start(6, 2, 2).await;
    c.within(SCENARIO_LIMIT, async {
        const WRITERS: usize = 8;
        const PER_WRITER: usize = 15;
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..WRITERS {
            let node0 = c.node(0);
            tasks.spawn(async move {
                let mut acked = Vec::new();
                for n in 0..PER_WRITER {
                    let (key, val) = (format!("durable_{w}_{n}"), format!("value {w}/{n}"));
                    let (status, body) = node0.put(&key, &val, "").await;
                    assert_eq!(status, 201, "PUT {key} via node 0: {body}");
                    acked.push((key, val));
                }
                acked
            });
        }
        let mut acked = Vec::new();
        while let Some(done) = tasks.join_next().await {
            acked.extend(done.expect("writer task panicked"));
        }
        c.kill_9(0);
        c.kill_9(1);
        assert_eq!(acked.len(), WRITERS * PER_WRITER);

        c.restart(0).await;
        for (key, val) in &acked {
            let (status, body) = c.get(0, key, "").await;
            assert_eq!(status, 200, "acknowledged {key} lost on node 0: {body}");
            assert_eq!(
                &value_of(&body),
                val,
                "acknowledged {key} altered on node 0"
            );
        }

        // The other replica comes back too and holds (or regains) every key.
        c.restart(1).await;
        let deadline = Instant::now() + CONVERGENCE_BOUND;
        for (key, val) in &acked {
            assert!(
                local_read_reaches(&c, 1, key, val, deadline).await,
                "node 1 never served acknowledged {key}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn whole_partition_down_yields_503() {
    // N=5, K=2: partitions {0,1} and {2,3}, node 4 a proxy. Partition 0 dies.
    let c = Cluster::start(7, 5, 2).await;
    c.within(SCENARIO_LIMIT, async {
        let keys = c.keys_by_partition(4, "k", 3).await;
        let dead = &keys[&0];
        let alive = &keys[&1];
        c.kill_9(0);
        c.kill_9(1);

        for via in [2, 3, 4] {
            for key in dead {
                let (status, body) = c.get(via, key, "").await;
                assert_eq!(
                    status, 503,
                    "GET {key} (partition 0 down) via node {via}: {body}"
                );
                assert_error(&body);
                let (status, body) = c.put(via, key, "new", "").await;
                assert_eq!(
                    status, 503,
                    "PUT {key} (partition 0 down) via node {via}: {body}"
                );
                assert_error(&body);
            }
            for key in alive {
                let (status, body) = c.get(via, key, "").await;
                assert_eq!(
                    status, 200,
                    "GET {key} (partition 1 up) via node {via}: {body}"
                );
                assert_eq!(&value_of(&body), key);
                let (status, body) = c.put(via, key, key, "").await;
                assert_eq!(
                    status, 200,
                    "PUT {key} (partition 1 up) via node {via}: {body}"
                );
            }
        }

        // Partition 0 comes back with its data.
        c.restart(0).await;
        c.restart(1).await;
        for key in dead {
            let (status, body) = c.get(4, key, "").await;
            assert_eq!(status, 200, "GET {key} after partition 0 restarted: {body}");
            assert_eq!(&value_of(&body), key, "a PUT answered 503 changed {key}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_converge_after_restart() {
    // N=2, K=2. Node 1 misses new keys and an update while stopped; after its restart
    // its local state (read with an empty causal payload) must catch up.
    let c = Cluster::start(8, 2, 2).await;
    c.within(SCENARIO_LIMIT, async {
        let mut writer = c.session("writer");
        writer.write(0, "updated", "before").await;
        assert!(
            local_read_reaches(
                &c,
                1,
                "updated",
                "before",
                Instant::now() + CONVERGENCE_BOUND
            )
            .await,
            "node 1 never received the initial write"
        );

        c.stop(1).await;
        let mut expected = vec![("updated".to_owned(), "after".to_owned())];
        writer.write(0, "updated", "after").await;
        for n in 0..30 {
            let (key, val) = (format!("missed_{n}"), format!("missed value {n}"));
            writer.write(0, &key, &val).await;
            expected.push((key, val));
        }

        let spawned = Instant::now();
        c.restart(1).await;
        let ready = Instant::now();
        let deadline = ready + CONVERGENCE_BOUND;
        for (key, val) in &expected {
            assert!(
                local_read_reaches(&c, 1, key, val, deadline).await,
                "node 1 did not converge on {key} within {CONVERGENCE_BOUND:?} of restarting"
            );
        }
        println!(
            "replicas_converge_after_restart: node 1 served all {} keys {:?} after ready \
             ({:?} after spawn)",
            expected.len(),
            ready.elapsed(),
            spawned.elapsed()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_keys_stay_deleted_on_every_replica() {
    // N=3, K=3. Node 2 holds the old value while paused; the delete made meanwhile must
    // reach it, and its old copy must not bring the value back to the others.
    let c = Cluster::start(11, 3, 3).await;
    c.within(SCENARIO_LIMIT, async {
        let mut a = c.session("A");
        a.write(0, "doomed", "old").await;
        a.write(0, "kept", "kept").await;
        let deadline = Instant::now() + CONVERGENCE_BOUND;
        for key in ["doomed", "kept"] {
            let want = if key == "doomed" { "old" } else { "kept" };
            assert!(local_read_reaches(&c, 2, key, want, deadline).await);
        }

        c.pause(2);
        let (status, body) = a.delete(0, "doomed").await;
        assert_eq!(status, 200, "DELETE of an existing key: {body}");
        assert_success(&body);
        assert_key_reply(&body);
        let (status, body) = a.get(1, "doomed").await;
        assert_eq!(status, 404, "read after delete, other replica: {body}");
        assert_error(&body);
        let (status, body) = a.delete(1, "doomed").await;
        assert_eq!(status, 404, "second DELETE: {body}");
        assert_error(&body);
        let (status, body) = a.delete(1, "never_written").await;
        assert_eq!(status, 404, "DELETE of a key never written: {body}");

        c.resume(2);
        // The paused replica learns the delete; nobody learns the old value back.
        let deadline = Instant::now() + CONVERGENCE_BOUND;
        'converge: loop {
            let mut gone = true;
            for i in 0..3 {
                let (status, _) = c.get(i, "doomed", "").await;
                gone &= status == 404;
            }
            if gone {
                break 'converge;
            }
            assert!(
                Instant::now() < deadline,
                "the delete did not reach every replica within {CONVERGENCE_BOUND:?}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        // Well past several sync rounds, still gone everywhere, and not counted.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for i in 0..3 {
            let (status, body) = c.get(i, "doomed", "").await;
            assert_eq!(status, 404, "node {i} resurrected the deleted key: {body}");
            assert_eq!(c.status(i).await["keys"], 1, "node {i} counts deleted keys");
        }
        let mut b = c.session("B");
        let (status, body) = b.put(2, "doomed", "reborn").await;
        assert_eq!(status, 201, "a deleted key written again is new: {body}");
        a.adopt(&b.token);
        assert_eq!(a.read(0, "doomed").await, "reborn");
        assert_eq!(a.read(0, "kept").await, "kept");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_converge_to_one_value() {
    // N=3, K=3. Three clients hammer one key, each through its own replica.
    let c = Cluster::start(9, 3, 3).await;
    c.within(SCENARIO_LIMIT, async {
        const WRITES: usize = 15;
        let run_writer = |w: usize| {
            let c = &c;
            async move {
                let mut s = c.session(&format!("writer {w}"));
                for n in 0..WRITES {
                    s.write(w, "hot", &format!("w{w}-{n}")).await;
                }
            }
        };
        tokio::join!(run_writer(0), run_writer(1), run_writer(2));

        // Each writer's writes are causally ordered, so only a writer's last write can
        // survive as the shown value.
        let finals: Vec<String> = (0..3).map(|w| format!("w{w}-{}", WRITES - 1)).collect();
        let deadline = Instant::now() + CONVERGENCE_BOUND;
        let settled = loop {
            let mut seen = Vec::new();
            for i in 0..3 {
                let (status, body) = c.get(i, "hot", "").await;
                assert_eq!(status, 200, "GET hot via node {i}: {body}");
                seen.push(value_of(&body));
            }
            if seen.iter().all(|v| *v == seen[0]) {
                break seen[0].clone();
            }
            assert!(
                Instant::now() < deadline,
                "replicas still disagree on hot after {CONVERGENCE_BOUND:?}: {seen:?}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        assert!(
            finals.contains(&settled),
            "settled value {settled:?} was overwritten by its own writer; expected one of {finals:?}"
        );

        // A write that follows a read of the settled state supersedes every sibling.
        let mut resolver = c.session("resolver");
        assert_eq!(resolver.read(0, "hot").await, settled);
        resolver.write(1, "hot", "resolved").await;
        let deadline = Instant::now() + CONVERGENCE_BOUND;
        for i in 0..3 {
            assert!(
                local_read_reaches(&c, i, "hot", "resolved", deadline).await,
                "node {i} kept a sibling over a write that followed a read of it"
            );
        }
    })
    .await;
}
