//! State-based anti-entropy (`kvs::merkle`, `node/digests.rs`) on whole nodes in one
//! process (in-memory stores, the loopback transport of `common::loopback`).
//!
//! Log sync repairs only what the vectors say is missing. These tests make the replicas'
//! states differ where no vector says so, by writing into one node's store behind its
//! back: a version whose origin's log is gone (the caveat in `replica.rs`), and a slot
//! whose keys a storage fault lost. The digest rounds must bring every replica to the
//! same state, and when replicas agree a round must cost a few digests. The bytes
//! counted are printed (`KVS_AE_KEYS` sets the key count, default 3,000; e.g.
//! `KVS_AE_KEYS=100000 cargo test --release --test anti_entropy -- --nocapture`).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kvs::clock::{CausalToken, Dot, VersionVector};
use kvs::keystate::{KeyState, Version};
use kvs::node::{Node, DIGEST_INTERVAL};
use kvs::placement::{slot_of, View};
use kvs::quorum::Level;
use kvs::storage::{MemoryStore, Store};

use common::loopback::Loopback;

/// Bound on every wait: a few digest intervals.
const SETTLE: Duration = Duration::from_secs(60);

struct Cluster {
    nodes: Vec<Arc<Node>>,
    stores: Vec<Arc<MemoryStore>>,
}

fn keys_to_load() -> usize {
    std::env::var("KVS_AE_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000)
}

impl Cluster {
    /// `n` nodes, every one a replica of the one partition.
    fn start(n: usize) -> Cluster {
        let transport = Arc::new(Loopback::default());
        let members: Vec<String> = (1..=n).map(|i| format!("127.0.0.{i}:7000")).collect();
        let view = View::bootstrap(members.clone(), n).expect("valid view");
        let mut c = Cluster {
            nodes: Vec::new(),
            stores: Vec::new(),
        };
        for m in members {
            let store = Arc::new(MemoryStore::new());
            let node = transport.start_node(&m, Some(view.clone()), Some(n), store.clone());
            c.nodes.push(node);
            c.stores.push(store);
        }
        c
    }

    /// Writes `n` keys through node 0 (8 at a time), retrying while the cluster forms.
    async fn load(&self, n: usize) {
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..8 {
            let node = self.nodes[0].clone();
            tasks.spawn(async move {
                for i in (t..n).step_by(8) {
                    let deadline = tokio::time::Instant::now() + SETTLE;
                    loop {
                        let put = node
                            .put(
                                &format!("key_{i}"),
                                b"v".to_vec(),
                                CausalToken::default(),
                                None,
                                true,
                            )
                            .await;
                        match put {
                            Ok(_) => break,
                            Err(e) => assert!(tokio::time::Instant::now() < deadline, "put: {e}"),
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            });
        }
        while let Some(t) = tasks.join_next().await {
            t.expect("loader");
        }
    }

    /// Node `i`'s own answer for `key` (no forwarding, no peer asked).
    async fn local_value(&self, i: usize, key: &str) -> Option<Vec<u8>> {
        self.nodes[i]
            .get(key, CausalToken::default(), Some(Level::ONE), false)
            .await
            .unwrap_or_else(|e| panic!("local read of {key} on node {i}: {e}"))
            .value
            .map(|(v, _)| v)
    }

    /// Until every node holds `n` keys.
    async fn wait_keys(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let held: Vec<u64> = self
                .nodes
                .iter()
                .map(|node| node.status().expect("status").keys)
                .collect();
            if held.iter().all(|&h| h == n) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nodes hold {held:?} keys, not {n}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The digest rounds' counters summed over the nodes.
    fn stats(&self) -> BTreeMap<&'static str, u64> {
        let mut sum = BTreeMap::new();
        for node in &self.nodes {
            let report = node.status_report();
            for name in ["rounds", "repairs", "keys_fetched", "bytes"] {
                *sum.entry(name).or_insert(0) += report["anti_entropy"][name]
                    .as_u64()
                    .unwrap_or_else(|| panic!("anti_entropy.{name} in {report}"));
            }
        }
        sum
    }

    /// Changes node `i`'s store behind its back: no log entry, no vector. The in-memory
    /// store's transactions copy and replace its tables, so one the node's writer began
    /// before may commit over the change: it is checked, and made again if lost.
    async fn tamper(
        &self,
        i: usize,
        change: impl Fn(&mut dyn kvs::storage::WriteTxn),
        holds: impl Fn(&dyn kvs::storage::ReadTxn) -> bool,
    ) {
        for _ in 0..20 {
            let mut txn = self.stores[i].write().expect("txn");
            change(&mut *txn);
            txn.commit().expect("commit");
            tokio::time::sleep(Duration::from_millis(100)).await;
            if holds(&*self.stores[i].read().expect("read")) {
                return;
            }
        }
        panic!("node {i}'s writer kept overwriting the change");
    }

    async fn stop(self) {
        for node in &self.nodes {
            node.shutdown().await;
        }
    }
}

/// A version of `key` from a replica that no longer exists (its log is gone with it),
/// newer than anything written: it wins wherever it is merged.
fn orphan(value: &str, counter: u64) -> KeyState {
    let dot = Dot {
        replica: 0x0bad_cafe,
        counter,
    };
    let mut vv = VersionVector::default();
    vv.raise(dot.replica, dot.counter);
    KeyState {
        versions: vec![Version {
            dot,
            vv,
            deps: Default::default(),
            timestamp_us: u64::MAX / 2,
            value: Some(value.as_bytes().to_vec()),
        }],
    }
}

/// Until node `i` itself answers `want` for `key`.
async fn wait_value(c: &Cluster, i: usize, key: &str, want: Option<&[u8]>) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        if c.local_value(i, key).await.as_deref() == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {i} still answers {:?} for {key}, not {want:?}",
            c.local_value(i, key).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_rounds_repair_what_the_log_cannot_and_cost_little_when_equal() {
    let n = keys_to_load();
    let c = Cluster::start(3);
    c.load(n).await;
    c.wait_keys(n as u64).await;

    // Replicas that agree: every round costs its digests and an empty answer.
    let before = c.stats();
    tokio::time::sleep(DIGEST_INTERVAL * 2).await;
    let after = c.stats();
    let rounds = after["rounds"] - before["rounds"];
    let bytes = after["bytes"] - before["bytes"];
    assert!(rounds >= 3, "only {rounds} digest rounds in two intervals");
    assert_eq!(
        after["repairs"], before["repairs"],
        "equal replicas repaired something"
    );
    println!(
        "equal replicas, {n} keys: {rounds} rounds, {bytes} bytes, {} bytes per round",
        bytes / rounds
    );
    assert!(
        bytes / rounds < 2_000,
        "{} bytes per round between equal replicas",
        bytes / rounds
    );

    // One key differs: a version only node 2 has, which no log will ever ship.
    let before = c.stats();
    let planted = orphan("orphan", 1);
    c.tamper(
        2,
        |txn| txn.put(slot_of("key_1"), "key_1", &planted).expect("put"),
        |txn| txn.get(slot_of("key_1"), "key_1").ok().flatten().as_ref() == Some(&planted),
    )
    .await;
    for i in 0..3 {
        wait_value(&c, i, "key_1", Some(b"orphan")).await;
    }
    // Let the rounds under way finish before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = c.stats();
    println!(
        "1 key of {n} differing: {} keys fetched, {} bytes in {} rounds until every replica had it",
        after["keys_fetched"] - before["keys_fetched"],
        after["bytes"] - before["bytes"],
        after["rounds"] - before["rounds"],
    );
    assert!(after["keys_fetched"] > before["keys_fetched"]);

    // A slot whose keys node 1's storage lost: its vectors still claim them.
    let slot = slot_of("key_7");
    let lost: Vec<String> = (0..n)
        .map(|i| format!("key_{i}"))
        .filter(|k| slot_of(k) == slot)
        .collect();
    c.tamper(
        1,
        |txn| {
            txn.delete_slot(slot, usize::MAX).expect("delete slot");
        },
        |txn| txn.slot_is_empty(slot).unwrap_or(false),
    )
    .await;
    for key in &lost {
        wait_value(&c, 1, key, Some(b"v")).await;
    }
    c.wait_keys(n as u64).await;
    c.stop().await;
}
