//! Bounded fuzzing in `cargo test`: every target of `kvs::fuzz` on its seeds, on the
//! regression inputs below, and on [`inputs`] deterministic mutations of the seeds.
//!
//! The mutator is written here, not taken from a crate: what the stable toolchain offers
//! is either a whole engine (libFuzzer through `cargo fuzz`, which is the long run in
//! `fuzz/`, or AFL) that runs as its own process and not as a loop inside `cargo test`,
//! or generators of typed values (`arbitrary`, `proptest`) that would not produce the
//! near-valid byte strings that find decoder bugs: a seed with one length field changed,
//! a record cut in half, two messages spliced. Seventy lines of byte edits do that, with
//! a fixed RNG seed so a failure replays exactly (it prints the input and how to rerun).
//!
//! Each target runs in its own test (they run in parallel) and prints how many inputs it
//! ran. `KVS_FUZZ_INPUTS=N` runs N mutations per target instead of the default,
//! `KVS_FUZZ_SEED=S` another RNG seed.

use kvs::fuzz;

// Counts each thread's allocations, so the targets check what decoding allocates.
#[global_allocator]
static ALLOC: fuzz::CountingAlloc = fuzz::CountingAlloc;

/// Mutated inputs per target by default: the slowest targets (`envelope`, whose seeds
/// carry views of 4,096 slots, and `wal`, which scans each file three times) run them in
/// 2-5 s in a debug build on the project's 2-core machine, alongside the others.
const DEFAULT_INPUTS: u64 = 10_000;
/// Largest input the mutator makes: above the largest seed (a view change envelope,
/// about 9 KB), small enough that quadratic checks stay fast.
const MAX_INPUT: usize = 64 * 1024;
/// Most edits stacked on one input.
const MAX_EDITS: u64 = 8;

/// Inputs that once broke a target (found by the fuzzers; see fuzz/README.md), run before
/// the mutations: `(target, input)`. Built from values rather than kept as bytes: the
/// smallest of them carries a view, whose slot table alone is 4 KB.
fn regressions() -> Vec<(&'static str, Vec<u8>)> {
    use kvs::clock::{Dot, VersionVector};
    use kvs::placement::{Change, View};
    use kvs::replica::{KeyState, Version};
    use kvs::rpc::{Envelope, Request};
    let addr = |i: usize| format!("10.0.0.{}:8080", 20 + i);
    let mut out = Vec::new();

    // `envelope`, cargo fuzz, 2026-12-03: `View::check` passed a view whose partition
    // named one replica twice (here 6 members, K = 2, partitions [1,2] [3,4] [6,6], 5 a
    // proxy); removing 2 then made `View::apply` build a view of 3 partitions for 5
    // members, and its `debug_assert!` panicked. Fixed in `View::check`.
    let mut view = View::bootstrap((1..=6).map(addr).collect(), 2).expect("view");
    view.partitions[2].replicas = vec![addr(6), addr(6)];
    let proposal = kvs::viewchange::Proposal {
        change: Change::Remove(addr(2)),
        from: view.clone(),
        to: view.clone(),
    };
    for body in [Request::Learn(proposal), Request::Install(view)] {
        let env = Envelope {
            from: addr(1),
            epoch: 1,
            body,
        };
        out.push(("envelope", kvs::rpc::encode(&env)));
    }

    // `envelope`, hand-made while reading `View::apply`, 2026-12-03: a base view whose
    // epoch (or partition-uid counter, for a change that forms a partition) is at its
    // maximum made `apply` overflow, which panics where overflow checks are on (debug
    // builds, `cargo fuzz`). Fixed in `View::apply`.
    let mut view = View::bootstrap((1..=5).map(addr).collect(), 2).expect("view");
    view.epoch = u64::MAX;
    let mut full = View::bootstrap((1..=5).map(addr).collect(), 2).expect("view");
    full.next_uid = u32::MAX;
    for (from, change) in [
        (view, Change::Remove(addr(5))),
        (full, Change::Add(addr(6))),
    ] {
        let proposal = kvs::viewchange::Proposal {
            change,
            from: from.clone(),
            to: from,
        };
        let env = Envelope {
            from: addr(1),
            epoch: 1,
            body: Request::Learn(proposal),
        };
        out.push(("envelope", kvs::rpc::encode(&env)));
    }

    // `response`, cargo fuzz, 2026-12-03: a sync page's key state with two versions of
    // one dot (w1 and w2): merged into an empty state it keeps w2 and y (y supersedes
    // w1, which superseded p); merged again, p is new and nothing supersedes it. Honest
    // states never share a dot, so the target now checks idempotence only without.
    let version = |replica: u64, vv: &[(u64, u64)]| Version {
        dot: Dot {
            replica,
            counter: 1,
        },
        vv: vv.iter().copied().collect::<VersionVector>(),
        deps: Default::default(),
        timestamp_us: 1,
        value: Some(b"v".to_vec()),
    };
    let state = KeyState {
        versions: vec![
            version(1, &[(1, 1), (2, 1)]), // w1
            version(1, &[(1, 1), (3, 1)]), // w2
            version(2, &[(2, 1)]),         // p
            version(3, &[(3, 1), (1, 1)]), // y
        ],
    };
    out.push(("key_state", postcard::to_stdvec(&state).expect("serialize")));
    out
}

/// xorshift64*: tiny, deterministic, good enough to pick edits.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
}

/// Values that hit boundaries of lengths, varints and counts.
const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x3fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 40,
    u64::MAX,
];

/// One seed, changed by 1..=[`MAX_EDITS`] random edits.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.index(seeds.len())].clone();
    let edits = 1 + rng.below(MAX_EDITS);
    for _ in 0..edits {
        let len = data.len();
        match rng.below(9) {
            // Flip a bit.
            0 if len > 0 => {
                let i = rng.index(len);
                data[i] ^= 1 << rng.below(8);
            }
            // Set a byte.
            1 if len > 0 => {
                let i = rng.index(len);
                data[i] = rng.next() as u8;
            }
            // Insert random bytes.
            2 => {
                let at = rng.index(len + 1);
                let n = 1 + rng.index(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                data.splice(at..at, bytes);
            }
            // Delete a range.
            3 if len > 0 => {
                let at = rng.index(len);
                let n = 1 + rng.index((len - at).min(64));
                data.drain(at..at + n);
            }
            // Duplicate a chunk somewhere else.
            4 if len > 0 => {
                let at = rng.index(len);
                let n = 1 + rng.index((len - at).min(256));
                let chunk = data[at..at + n].to_vec();
                let to = rng.index(len + 1);
                data.splice(to..to, chunk);
            }
            // Splice: this input's head, another seed's tail.
            5 => {
                let other = &seeds[rng.index(seeds.len())];
                let cut = rng.index(len + 1);
                let from = rng.index(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            // Truncate.
            6 if len > 0 => data.truncate(rng.index(len)),
            // Overwrite with a boundary value, as a little-endian integer or a varint.
            7 if len > 0 => {
                let v = INTERESTING[rng.index(INTERESTING.len())];
                let bytes = if rng.below(2) == 0 {
                    v.to_le_bytes()[..1 << rng.below(4)].to_vec()
                } else {
                    varint(v)
                };
                let at = rng.index(len);
                let end = (at + bytes.len()).min(len);
                data.splice(at..end, bytes);
            }
            // Repeat a byte (runs of separators, of `%`, of zeros).
            _ if len > 0 => {
                let b = data[rng.index(len)];
                let at = rng.index(len + 1);
                let n = 1 + rng.index(32);
                data.splice(at..at, std::iter::repeat_n(b, n));
            }
            _ => data.push(rng.next() as u8),
        }
        data.truncate(MAX_INPUT);
    }
    data
}

/// `v` as postcard writes a varint.
fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..10 {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `target` on its regressions, its seeds and the mutations; prints the counts.
fn fuzz_target(target: &str) {
    let started = std::time::Instant::now();
    let regressions: Vec<Vec<u8>> = regressions()
        .into_iter()
        .filter(|(t, _)| *t == target)
        .map(|(_, input)| input)
        .collect();
    for input in &regressions {
        assert!(fuzz::run(target, input));
    }
    let seeds = fuzz::seeds(target);
    assert!(!seeds.is_empty(), "{target} has no seeds");
    for seed in &seeds {
        fuzz::run(target, seed);
    }
    let inputs = env_u64("KVS_FUZZ_INPUTS", DEFAULT_INPUTS);
    let rng_seed = env_u64("KVS_FUZZ_SEED", 0x6b76_7366_757a_7a01);
    // Each target its own stream, so one target's edits do not shift another's.
    let name_hash = target.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = Rng((rng_seed ^ name_hash) | 1);
    let mut bytes = 0usize;
    fuzz::take_decoded();
    for i in 0..inputs {
        let input = mutate(&mut rng, &seeds);
        bytes += input.len();
        let outcome = std::panic::catch_unwind(|| fuzz::run(target, &input));
        if outcome.is_err() {
            panic!(
                "fuzz target {target}: input {i} (KVS_FUZZ_SEED={rng_seed}) broke a property; \
                 the input, {} bytes: {input:?}",
                input.len()
            );
        }
    }
    let decoded = fuzz::take_decoded();
    let regressions = regressions.len();
    println!(
        "fuzz {target}: {} inputs ({regressions} regressions, {} seeds, {inputs} mutations \
         of {bytes} bytes, {decoded} of them decoded) in {:.1?}",
        regressions + seeds.len() + inputs as usize,
        seeds.len(),
        started.elapsed()
    );
}

#[test]
fn fuzz_form() {
    fuzz_target("form");
}

#[test]
fn fuzz_token() {
    fuzz_target("token");
}

#[test]
fn fuzz_envelope() {
    fuzz_target("envelope");
}

#[test]
fn fuzz_response() {
    fuzz_target("response");
}

#[test]
fn fuzz_wal() {
    fuzz_target("wal");
}

#[test]
fn fuzz_wal_open() {
    fuzz_target("wal_open");
}

#[test]
fn fuzz_wal_payload() {
    fuzz_target("wal_payload");
}

#[test]
fn fuzz_key_state() {
    fuzz_target("key_state");
}

#[test]
fn every_target_has_a_test_and_seeds() {
    let tests = [
        "form",
        "token",
        "envelope",
        "response",
        "wal",
        "wal_open",
        "wal_payload",
        "key_state",
    ];
    assert_eq!(fuzz::TARGETS, tests);
    assert!(!fuzz::run("no such target", b""));
    // The counting allocator is installed, so the targets check allocation.
    let (v, peak) = fuzz::peak_allocation(|| vec![1u8; 10_000]);
    assert!(peak.is_some_and(|p| p >= v.len()), "{peak:?}");
}

/// The seeds are what they claim to be: valid messages decode, tokens verify, WAL files
/// open (or are refused, for the damaged ones), so the mutations start from valid shapes.
#[test]
fn seeds_are_valid_inputs() {
    let key = kvs::clock::TokenKey::from_bytes([0x5a; 32]);
    let tokens = fuzz::seeds("token");
    let valid = tokens
        .iter()
        .filter_map(|t| std::str::from_utf8(t).ok())
        .filter(|t| kvs::clock::CausalToken::decode(t, fuzz::TOKEN_CLUSTER, &key).is_ok())
        .count();
    assert!(valid >= 8, "only {valid} token seeds decode");
    // The target's signer tags as the node does.
    let t = kvs::clock::CausalToken::empty(fuzz::TOKEN_CLUSTER);
    let payload = postcard::to_stdvec(&t).expect("serialize");
    assert_eq!(fuzz::sign_token_payload(&payload), t.encode(&key));
    for seed in fuzz::seeds("envelope") {
        kvs::rpc::decode::<kvs::rpc::Envelope>(&seed).expect("envelope seeds decode");
    }
    let mut variants = std::collections::BTreeSet::new();
    for seed in fuzz::seeds("response") {
        kvs::rpc::decode::<kvs::rpc::Response>(&seed).expect("response seeds decode");
        variants.insert(seed[0]);
    }
    assert_eq!(variants.len(), 15, "a Response variant has no seed");
    let variants: std::collections::BTreeSet<u8> = fuzz::seeds("envelope")
        .iter()
        .map(|s| {
            let env: kvs::rpc::Envelope = kvs::rpc::decode(s).expect("decodes");
            kvs::rpc::encode(&env.body)[0]
        })
        .collect();
    assert_eq!(variants.len(), 19, "a Request variant has no seed");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w");
    let (mut opened, mut refused) = (0, 0);
    for seed in fuzz::seeds("wal") {
        std::fs::write(&path, &seed).expect("write");
        match kvs::wal::Wal::open(&path, 0) {
            Ok(_) => opened += 1,
            Err(kvs::wal::OpenError::Damaged(_)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        opened >= 6 && refused >= 2,
        "{opened} opened, {refused} refused"
    );
}

/// Writes every target's seeds into `$KVS_FUZZ_CORPUS/<target>/` (the corpus directories
/// of `fuzz/`); `fuzz/run.sh` runs it before each session.
#[test]
#[ignore = "writes files; run by fuzz/run.sh"]
fn write_seed_corpus() {
    let Some(root) = std::env::var_os("KVS_FUZZ_CORPUS") else {
        panic!("set KVS_FUZZ_CORPUS to the corpus directory");
    };
    let root = std::path::PathBuf::from(root);
    for target in fuzz::TARGETS {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        for (i, seed) in fuzz::seeds(target).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), seed).expect("seed file");
        }
    }
}

/// Replays one input through one target in a debug build:
/// `KVS_FUZZ_REPLAY=TARGET:FILE cargo test --test fuzz replay -- --ignored --nocapture`
/// (an artifact of `fuzz/`, say, with a full backtrace under `RUST_BACKTRACE=1`).
#[test]
#[ignore = "replays the input KVS_FUZZ_REPLAY names"]
fn replay() {
    let Some(spec) = std::env::var("KVS_FUZZ_REPLAY").ok() else {
        panic!("set KVS_FUZZ_REPLAY=TARGET:FILE");
    };
    let Some((target, file)) = spec.split_once(':') else {
        panic!("KVS_FUZZ_REPLAY is TARGET:FILE, not {spec:?}");
    };
    let input = std::fs::read(file).expect("read the input");
    assert!(fuzz::run(target, &input), "no target {target:?}");
    println!("{target}: {} bytes ran without a finding", input.len());
}
