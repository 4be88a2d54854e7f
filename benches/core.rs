//! Micro-benchmarks of the hot pure paths: placement, clock compare/merge, the causal
//! token's encoding, and storage put/get (memory and redb engines).
//!
//! `cargo bench --bench core` (add `-- <filter>` for one group). These print figures; the
//! tests assert behaviour.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

use kvs::clock::{CausalToken, Dot, TokenKey, VersionVector};
use kvs::placement::{slot_of, Change, View};
use kvs::replica::{KeyState, Version};
use kvs::storage::{MemoryStore, RedbStore, Store};

fn members(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("10.0.0.{i}:8080")).collect()
}

fn placement(c: &mut Criterion) {
    let view = View::bootstrap(members(12), 3).expect("view");
    let mut g = c.benchmark_group("placement");
    g.bench_function("slot_of", |b| b.iter(|| slot_of(black_box("user_123456"))));
    g.bench_function("partition_of_key (12 nodes, K=3)", |b| {
        b.iter(|| view.partition_of_key(black_box("user_123456")))
    });
    g.bench_function("apply add (12 -> 13 nodes)", |b| {
        let add = Change::Add("10.0.0.13:8080".into());
        b.iter(|| view.apply(black_box(&add)).expect("valid"))
    });
    g.finish();
}

fn vv(entries: u64, base: u64) -> VersionVector {
    (1..=entries).map(|r| (r * 7919, base + r)).collect()
}

fn clock(c: &mut Criterion) {
    let (a, b3) = (vv(3, 100), vv(3, 90));
    let (a16, b16) = (vv(16, 100), vv(16, 90));
    let mut g = c.benchmark_group("clock");
    g.bench_function("dominates (3 replicas)", |b| {
        b.iter(|| black_box(&a).dominates(black_box(&b3)))
    });
    g.bench_function("merge (3 replicas)", |b| {
        b.iter_batched(|| a.clone(), |mut x| x.merge(&b3), BatchSize::SmallInput)
    });
    g.bench_function("merge (16 replicas)", |b| {
        b.iter_batched(|| a16.clone(), |mut x| x.merge(&b16), BatchSize::SmallInput)
    });
    g.finish();
}

fn token(c: &mut Criterion) {
    let key = TokenKey::derive("bench secret");
    let mut t = CausalToken::empty(42);
    for p in 0..4 {
        t.observe(p, &vv(3, 1_000 * u64::from(p)));
    }
    let text = t.encode(&key);
    let mut g = c.benchmark_group("token");
    g.bench_function("encode (4 partitions x 3 replicas)", |b| {
        b.iter(|| black_box(&t).encode(&key))
    });
    g.bench_function("decode + verify", |b| {
        b.iter(|| CausalToken::decode(black_box(&text), 42, &key).expect("valid"))
    });
    g.finish();
}

fn state(value_len: usize) -> KeyState {
    KeyState {
        versions: vec![Version {
            dot: Dot {
                replica: 7,
                counter: 9,
            },
            vv: vv(3, 10),
            deps: Default::default(),
            timestamp_us: 1,
            value: Some(vec![b'v'; value_len]),
        }],
    }
}

fn storage(c: &mut Criterion) {
    let s = state(256);
    let dir = tempfile::tempdir().expect("tempdir");
    let redb = RedbStore::open(dir.path()).expect("open");
    let memory = MemoryStore::new();
    let mut g = c.benchmark_group("storage");
    for (name, store) in [
        ("redb", &redb as &dyn Store),
        ("memory", &memory as &dyn Store),
    ] {
        // 10,000 keys, as in bench/compare.sh.
        let mut w = store.write().expect("write");
        for i in 0..10_000u32 {
            let key = format!("k{i}");
            w.put(slot_of(&key), &key, &s).expect("put");
        }
        w.commit().expect("commit");
        g.bench_function(format!("{name}: get (read txn + decode)"), |b| {
            let mut i = 0u32;
            b.iter(|| {
                i = (i + 7) % 10_000;
                let key = format!("k{i}");
                let txn = store.read().expect("read");
                txn.get(slot_of(&key), &key).expect("get")
            })
        });
    }
    // A put alone; its commit (an fsync on redb) is measured by bench/compare.sh.
    g.bench_function("redb: put 100 keys in one transaction, no commit", |b| {
        b.iter(|| {
            let mut w = redb.write().expect("write");
            for i in 0..100u32 {
                let key = format!("k{i}");
                w.put(slot_of(&key), &key, &s).expect("put");
            }
        })
    });
    g.finish();
}

criterion_group!(benches, placement, clock, token, storage);
criterion_main!(benches);
