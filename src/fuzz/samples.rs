//! Values the seeds of several targets are built from.

use super::*;

pub(super) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("seed values serialize")
}

pub(super) fn addr(i: usize) -> String {
    format!("10.0.0.{}:8080", 20 + i)
}

/// A view of `n` members with K = `k` (the first view `VIEW`/`K` give).
pub(super) fn sample_view(n: usize, k: usize) -> View {
    match View::bootstrap((1..=n).map(addr).collect(), k) {
        Ok(v) => v,
        Err(e) => panic!("seed view: {e}"),
    }
}

pub(super) fn sample_proposals() -> Vec<Proposal> {
    let mut out = Vec::new();
    for (n, k, change) in [
        (4, 2, Change::Add(addr(5))),
        (5, 2, Change::Add(addr(6))),
        (6, 2, Change::Remove(addr(2))),
        (5, 2, Change::Remove(addr(5))),
        (3, 1, Change::Remove(addr(1))),
    ] {
        match Proposal::new(change, &sample_view(n, k)) {
            Ok(p) => out.push(p),
            Err(e) => panic!("seed proposal: {e}"),
        }
    }
    // Shard-count mode, so mutations reach its rules (`Proposal::check` applies them).
    for (n, shards, change) in [
        (6, 2, Change::Reshard(3)),
        (
            7,
            3,
            Change::AddToShard {
                addr: addr(8),
                shard: 1,
            },
        ),
        (6, 3, Change::Remove(addr(1))),
    ] {
        let view = View::bootstrap_shards((1..=n).map(addr).collect(), shards);
        match view.map(|v| Proposal::new(change, &v)) {
            Ok(Ok(p)) => out.push(p),
            Ok(Err(e)) => panic!("seed proposal: {e}"),
            Err(e) => panic!("seed view: {e}"),
        }
    }
    out
}

pub(super) fn sample_state(versions: u64, deps: bool) -> KeyState {
    let versions = (0..versions)
        .map(|i| {
            let dot = Dot {
                replica: 0xabc0 + i,
                counter: 10 + i,
            };
            let mut vv: VersionVector = [(dot.replica, dot.counter)].into_iter().collect();
            vv.raise(0xabc0, 3);
            let mut dep = BTreeMap::new();
            if deps {
                dep.insert(2, [(77, 5), (78, 1)].into_iter().collect());
            }
            Version {
                dot,
                vv,
                deps: dep,
                timestamp_us: 1_796_284_522_000_000 + i,
                value: (i % 3 != 2).then(|| format!("value {i}").into_bytes()),
            }
        })
        .collect();
    KeyState { versions }
}

pub(super) fn key_states() -> Vec<KeyState> {
    vec![
        KeyState::default(),
        sample_state(1, false),
        sample_state(2, true),
        sample_state(3, true),
        KeyState {
            versions: vec![Version {
                dot: Dot {
                    replica: u64::MAX,
                    counter: u64::MAX,
                },
                vv: [(u64::MAX, u64::MAX)].into_iter().collect(),
                deps: BTreeMap::new(),
                timestamp_us: u64::MAX,
                value: Some(vec![0xff; 300]),
            }],
        },
    ]
}
