//! Shard-count mode's changes carried out by the real view-change protocol
//! (`node::reconfig`: preflight, Paxos, learn, drain, pull, install, garbage
//! collection), in one process: nodes on in-memory stores, calls delivered by a loopback
//! transport that encodes and decodes every message as the wire does. No socket is
//! opened; the addresses are names.
//!
//! Each scenario writes keys, makes one or more changes through `Node::update_view`, and
//! then checks what the placement promises: every key readable from every node, and each
//! node's store holding exactly the keys of its shard once handed-over slots are
//! collected.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kvs::clock::CausalToken;
use kvs::clock::Dot;
use kvs::keystate::{KeyState, Version};
use kvs::node::Node;
use kvs::placement::slot_of;
use kvs::placement::{Change, Layout, Movement, Role, View};
use kvs::storage::{MemoryStore, Store};

use common::loopback::Loopback;

/// How long a scenario waits for the cluster to form, or for collection to finish.
const SETTLE: Duration = Duration::from_secs(30);

fn addr(i: usize) -> String {
    format!("127.0.0.{i}:7000")
}

struct Cluster {
    transport: Arc<Loopback>,
    nodes: BTreeMap<String, Arc<Node>>,
    stores: BTreeMap<String, Arc<MemoryStore>>,
    /// Every key written, with its value.
    keys: Vec<(String, Vec<u8>)>,
}

impl Cluster {
    /// `n` nodes started with `VIEW` of all of them and `SHARD_COUNT = shards`.
    async fn start(n: usize, shards: usize) -> Cluster {
        let members: Vec<String> = (1..=n).map(addr).collect();
        let view = View::bootstrap_shards(members.clone(), shards).expect("valid view");
        let mut c = Cluster {
            transport: Arc::new(Loopback::default()),
            nodes: BTreeMap::new(),
            stores: BTreeMap::new(),
            keys: Vec::new(),
        };
        for m in members {
            c.add_process(&m, Some(view.clone()));
        }
        c.wait_ready().await;
        c
    }

    /// Starts a node process: a member of `view`, or a blank node when `None`.
    fn add_process(&mut self, name: &str, view: Option<View>) {
        let store = Arc::new(MemoryStore::new());
        let node = self.transport.start_node(name, view, None, store.clone());
        self.stores.insert(name.to_string(), store);
        self.nodes.insert(name.to_string(), node);
    }

    fn node(&self, name: &str) -> &Arc<Node> {
        self.nodes.get(name).expect("a node of the cluster")
    }

    fn view(&self) -> Arc<View> {
        self.nodes
            .values()
            .filter_map(|n| n.view())
            .max_by_key(|v| v.epoch)
            .expect("some node has a view")
    }

    /// Until every member accepts writes (the cluster key is formed); the probe keys
    /// count as written.
    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + SETTLE;
        for name in self.view().members.clone() {
            loop {
                let probe = format!("ready_{}", name.replace(['.', ':'], "_"));
                let put = self
                    .node(&name)
                    .put(&probe, b"r".to_vec(), CausalToken::default(), None, true)
                    .await;
                match put {
                    Ok(_) => {
                        self.keys.push((probe, b"r".to_vec()));
                        break;
                    }
                    Err(e) => assert!(
                        tokio::time::Instant::now() < deadline,
                        "{name} never became ready: {e}"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Writes `n` keys through the members in turn.
    async fn write(&mut self, n: usize) {
        let members = self.view().members.clone();
        for i in 0..n {
            let key = format!("key_{i}");
            let value = format!("value {i}").into_bytes();
            let via = &members[i % members.len()];
            self.node(via)
                .put(&key, value.clone(), CausalToken::default(), None, true)
                .await
                .unwrap_or_else(|e| panic!("put {key} via {via}: {e}"));
            self.keys.push((key, value));
        }
    }

    /// Every key, read through every member, has its value.
    async fn read_everything_everywhere(&self) {
        for name in &self.view().members {
            for (key, value) in &self.keys {
                let got = self
                    .node(name)
                    .get(key, CausalToken::default(), None, true)
                    .await
                    .unwrap_or_else(|e| panic!("get {key} via {name}: {e}"));
                assert_eq!(
                    got.value.map(|(v, _)| v).as_ref(),
                    Some(value),
                    "{key} via {name}"
                );
            }
        }
    }

    /// Until every node's store holds exactly the keys of its shard (written keys and
    /// the readiness probes): pulls copied them in, collection dropped the others.
    async fn wait_for_exact_placement(&self) {
        let view = self.view();
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let mut wrong = Vec::new();
            for (name, node) in &self.nodes {
                let expected = match view.role_of(name) {
                    Some(Role::Replica(uid)) => Some(self.stored_keys_of(&view, uid)),
                    Some(Role::Proxy) => Some(0),
                    None => None,
                };
                let Some(expected) = expected else { continue };
                let held = node.status().expect("status").keys;
                if held != expected as u64 {
                    wrong.push(format!("{name} holds {held}, expected {expected}"));
                }
            }
            if wrong.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "placement never settled: {wrong:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The keys partition `uid` owns.
    fn stored_keys_of(&self, view: &View, uid: u32) -> usize {
        self.keys
            .iter()
            .filter(|(k, _)| view.partition_of_key(k) == uid)
            .count()
    }

    /// Carries out `change` from `via` and checks every node installed the result.
    async fn change(&self, via: &str, change: Change) -> Arc<View> {
        let before = self.view();
        let out = self
            .node(via)
            .change_view(change.clone())
            .await
            .unwrap_or_else(|e| panic!("{change}: {e}"));
        assert_eq!(out.epoch, before.epoch + 1, "{change}");
        assert_eq!(*out, before.apply(&change).expect("valid change"));
        for m in &out.members {
            assert_eq!(self.node(m).epoch(), out.epoch, "{m} after {change}");
        }
        let moved = Movement::of(&before, &out, &change);
        println!("{change}: {moved:?}");
        out
    }

    async fn shutdown(self) {
        for node in self.nodes.values() {
            node.shutdown().await;
        }
    }
}

fn sizes(v: &View) -> Vec<usize> {
    v.partitions.iter().map(|p| p.replicas.len()).collect()
}

/// Seed 002's reshard: 6 nodes in 2 shards become 3 shards of 2; the third of the keys
/// that changes shard reaches the new shard's replicas, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reshard_two_to_three_moves_a_third_of_the_keys_and_loses_none() {
    let mut c = Cluster::start(6, 2).await;
    assert_eq!(c.view().layout, Layout::Shards);
    c.write(120).await;
    let v = c.change(&addr(1), Change::Reshard(3)).await;
    assert_eq!(sizes(&v), vec![2, 2, 2]);
    c.read_everything_everywhere().await;
    c.wait_for_exact_placement().await;
    // And back to two: the third shard is dissolved into the other two.
    let v = c.change(&addr(4), Change::Reshard(2)).await;
    assert_eq!(sizes(&v), vec![3, 3]);
    c.read_everything_everywhere().await;
    c.wait_for_exact_placement().await;
    c.shutdown().await;
}

/// Seed 002's add-member: a node started later without a view is added (a proxy), then
/// put in shard 1, and holds exactly shard 1's keys; a member moved to another shard
/// swaps its keys for those of its new shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_member_copies_the_shard_to_the_node_it_adds() {
    let mut c = Cluster::start(4, 2).await;
    c.write(80).await;
    c.add_process(&addr(5), None);
    let v = c.change(&addr(2), Change::Add(addr(5))).await;
    assert_eq!(v.role_of(&addr(5)), Some(Role::Proxy));
    let v = c
        .change(
            &addr(1),
            Change::AddToShard {
                addr: addr(5),
                shard: 1,
            },
        )
        .await;
    assert_eq!(sizes(&v), vec![2, 3]);
    c.wait_for_exact_placement().await;
    // Member 1 (shard 0 = {1, 3}) moves to shard 1.
    let v = c
        .change(
            &addr(3),
            Change::AddToShard {
                addr: addr(1),
                shard: 1,
            },
        )
        .await;
    assert_eq!(sizes(&v), vec![1, 4]);
    c.read_everything_everywhere().await;
    c.wait_for_exact_placement().await;
    // A node not yet a member joins a shard in one step.
    c.add_process(&addr(6), None);
    let v = c
        .change(
            &addr(2),
            Change::AddToShard {
                addr: addr(6),
                shard: 0,
            },
        )
        .await;
    assert_eq!(sizes(&v), vec![2, 4]);
    c.read_everything_everywhere().await;
    c.wait_for_exact_placement().await;
    c.shutdown().await;
}

/// Removing the last replica of a shard dissolves it: its keys go to the other shards
/// first, drained from that replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_a_shards_last_replica_hands_its_keys_to_the_others() {
    let mut c = Cluster::start(6, 3).await;
    c.write(90).await;
    // Shard 2 = {3, 6}.
    c.change(&addr(1), Change::Remove(addr(3))).await;
    let v = c.change(&addr(1), Change::Remove(addr(6))).await;
    assert_eq!(sizes(&v), vec![2, 2]);
    c.read_everything_everywhere().await;
    c.wait_for_exact_placement().await;
    c.shutdown().await;
}

/// The end-to-end check of a handoff: a node deletes keys of a slot it does not own only
/// once every replica of the slot's partition confirms holding them. A leftover key the
/// owners lack (planted behind the nodes' backs) stays; one they hold is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handed_over_keys_are_deleted_only_once_the_new_owners_hold_them() {
    let mut c = Cluster::start(4, 2).await;
    c.write(40).await;
    let view = c.view();
    let (mine, other) = (view.partitions[0].uid, view.partitions[1].uid);
    let holder = view.partitions[0].replicas[0].clone();
    let owners = view.partitions[1].replicas.clone();
    // Two keys of the other shard's slots, left over at `holder`.
    let foreign: Vec<String> = (0..)
        .map(|i| format!("leftover_{i}"))
        .filter(|k| view.partition_of_key(k) == other)
        .take(2)
        .collect();
    assert_ne!(view.partition_of_key(&foreign[0]), mine);
    let state = |counter| KeyState {
        versions: vec![Version {
            dot: Dot {
                replica: 0x5eed,
                counter,
            },
            vv: [(0x5eed, counter)].into_iter().collect(),
            deps: Default::default(),
            timestamp_us: 1,
            value: Some(b"left over".to_vec()),
        }],
    };
    // The in-memory store's transactions replace its tables whole: a commit of the
    // node's writer begun before this one could undo it, so it is checked and redone.
    let plant = |node: &str, key: &str, st: &KeyState| {
        for _ in 0..20 {
            let mut txn = c.stores[node].write().expect("txn");
            txn.put(slot_of(key), key, st).expect("put");
            txn.commit().expect("commit");
            std::thread::sleep(Duration::from_millis(20));
            let read = c.stores[node].read().expect("read");
            if read.get(slot_of(key), key).expect("get").as_ref() == Some(st) {
                return;
            }
        }
        panic!("{node}'s writer kept undoing the planted key");
    };
    // The first only at the holder; the second at the holder and every owner.
    plant(&holder, &foreign[0], &state(1));
    plant(&holder, &foreign[1], &state(2));
    for o in &owners {
        plant(o, &foreign[1], &state(2));
    }
    // Any installed change makes every node collect handed-over slots.
    c.add_process(&addr(5), None);
    c.change(&addr(2), Change::Add(addr(5))).await;
    let held = |key: &str| {
        c.stores[&holder]
            .read()
            .expect("read")
            .get(slot_of(key), key)
            .expect("get")
            .is_some()
    };
    let deadline = tokio::time::Instant::now() + SETTLE;
    while held(&foreign[1]) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the confirmed leftover was never deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Collection has run; the unconfirmed one is still there (and stays).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(held(&foreign[0]), "a key its new owners lack was deleted");
    c.shutdown().await;
}
