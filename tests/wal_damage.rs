//! Process-level tests of a damaged write-ahead log: a bit flipped in the middle of
//! `kvs.wal` while the node is down. The node must refuse to start and say where the
//! damage is (never silently drop the acknowledged writes after it); a replica with peers
//! comes back with `KVS_REBUILD=1` and refills from them. Address ranges
//! `127.77.70-71.0/24` (see `common`).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{value_of, Cluster};

/// Records the WAL must hold (written since its last checkpoint) before the node is
/// killed, so that the flipped bit has records after it.
const RECORDS: usize = 12;
/// Most keys written while waiting for that (a checkpoint every 10 s empties the WAL).
const MAX_KEYS: usize = 2_000;
/// Time a refusing node gets to exit, and a rebuilt one to catch up.
const EXIT_WITHIN: Duration = Duration::from_secs(30);
const CATCH_UP: Duration = Duration::from_secs(60);

/// The records of the WAL in `dir` (since it was last emptied), read from a copy with
/// the node's own reader; none while it cannot be read (a record being written).
fn wal_records(dir: &Path) -> Vec<kvs::wal::Record> {
    let copy = tempfile::tempdir().expect("tempdir");
    let path = copy.path().join("kvs.wal");
    if std::fs::copy(dir.join("kvs.wal"), &path).is_err() {
        return Vec::new();
    }
    kvs::wal::Wal::open(&path, 0).map_or(Vec::new(), |(_, records)| records)
}

/// PUTs fresh keys one at a time through node `via` (each its own batch, so its own WAL
/// record on `via`) until node `watch`'s WAL holds [`RECORDS`] records since it was last
/// emptied; returns the acknowledged keys and values.
async fn write_until_the_wal_holds_records(
    c: &Cluster,
    via: usize,
    watch: usize,
    prefix: &str,
) -> BTreeMap<String, String> {
    let mut acked = BTreeMap::new();
    for n in 0..MAX_KEYS {
        let (key, val) = (format!("{prefix}_{n}"), format!("{prefix}_{n}=v1"));
        let (status, body) = c.put(via, &key, &val, "").await;
        assert_eq!(status, 201, "PUT {key} via node {via}: {body}");
        acked.insert(key, val);
        if wal_records(&c.data_dir(watch)).len() >= RECORDS {
            return acked;
        }
    }
    panic!("node {watch}'s WAL never held {RECORDS} records in {MAX_KEYS} writes");
}

/// Flips one bit in the middle of the records of the WAL in `dir` (not in the zeros
/// the log writes ahead of them); returns the damaged bytes and the bit's offset.
fn flip_middle_bit(dir: &Path) -> (Vec<u8>, usize) {
    let path = dir.join("kvs.wal");
    let records = wal_records(dir);
    assert!(records.len() >= RECORDS, "{} records", records.len());
    // The file header, then each record's 16-byte header and payload.
    let end = 20 + records.iter().map(|(_, p)| 16 + p.len()).sum::<usize>();
    let mut bytes = std::fs::read(&path).expect("read the WAL");
    let middle = end / 2;
    bytes[middle] ^= 0x04;
    std::fs::write(&path, &bytes).expect("write the WAL");
    (bytes, middle)
}

/// The directories `dir` was moved aside to (`<dir>.damaged-*`).
fn moved_aside(dir: &Path) -> Vec<std::path::PathBuf> {
    let name = dir
        .file_name()
        .expect("a name")
        .to_string_lossy()
        .into_owned();
    std::fs::read_dir(dir.parent().expect("a parent"))
        .expect("list")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{name}.damaged-"))
        })
        .map(|e| e.path())
        .collect()
}

/// Starts node `i` on its damaged WAL and checks it refuses, naming the damage, and
/// leaves the file as it was.
async fn assert_refuses(c: &Cluster, i: usize, damaged: &[u8]) {
    let status = c.start_expecting_exit(i, EXIT_WITHIN).await;
    assert!(!status.success(), "node {i} started on a damaged WAL");
    let log = c.log(i);
    for part in [
        "kvs.wal",
        "hold no valid record",
        "were acknowledged",
        "--rebuild",
    ] {
        assert!(log.contains(part), "node {i}'s log lacks {part:?}:\n{log}");
    }
    let now = std::fs::read(c.data_dir(i).join("kvs.wal")).expect("read the WAL");
    assert_eq!(now, damaged, "the refused start changed the WAL");
}

/// K=1, one node: the flipped bit makes it refuse to start, loudly; nothing is cut, so
/// undoing the flip brings back every acknowledged key.
#[tokio::test(flavor = "multi_thread")]
async fn a_single_node_refuses_a_damaged_wal_and_drops_nothing() {
    let c = Cluster::start(70, 1, 1).await;
    c.within(Duration::from_secs(180), async {
        let acked = write_until_the_wal_holds_records(&c, 0, 0, "single").await;
        c.kill_9(0);
        let (mut damaged, middle) = flip_middle_bit(&c.data_dir(0));
        assert_refuses(&c, 0, &damaged).await;

        // The damage undone, every acknowledged key is there.
        damaged[middle] ^= 0x04;
        std::fs::write(c.data_dir(0).join("kvs.wal"), &damaged).expect("write the WAL");
        c.restart(0).await;
        for (key, val) in &acked {
            let (status, body) = c.get(0, key, "").await;
            assert_eq!(status, 200, "GET {key}: {body}");
            assert_eq!(value_of(&body), *val, "GET {key}: {body}");
        }
        eprintln!("{} acknowledged keys, none lost", acked.len());
    })
    .await;
}

/// K=3: the damaged replica refuses; started with KVS_REBUILD=1 it moves its data
/// directory aside (kept), starts empty and refills from its peers until it serves every
/// acknowledged key.
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_replica_refuses_then_rebuilds_from_its_peers() {
    let c = Cluster::start(71, 3, 3).await;
    c.within(Duration::from_secs(240), async {
        let acked = write_until_the_wal_holds_records(&c, 2, 2, "rebuilt").await;
        // Every acknowledged key is on the peers before node 2 goes (writes it had not
        // yet replicated would only be in the directory moved aside).
        let deadline = Instant::now() + CATCH_UP;
        for peer in [0, 1] {
            while c.status(peer).await["keys"].as_u64() != Some(acked.len() as u64) {
                assert!(Instant::now() < deadline, "node {peer} never caught up");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        c.kill_9(2);
        let (damaged, _) = flip_middle_bit(&c.data_dir(2));
        assert_refuses(&c, 2, &damaged).await;

        c.set_env("KVS_REBUILD", "1");
        c.restart(2).await;
        c.unset_env("KVS_REBUILD");
        let aside = moved_aside(&c.data_dir(2));
        assert_eq!(aside.len(), 1, "one directory moved aside");
        let kept = std::fs::read(aside[0].join("kvs.wal")).expect("the old WAL");
        assert_eq!(kept, damaged, "the damaged WAL is kept as it was");

        let t0 = Instant::now();
        let mut pending: Vec<(&String, &String)> = acked.iter().collect();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for (key, val) in pending {
                let (status, body) = c.get(2, key, "").await;
                if status != 200 || value_of(&body) != *val {
                    still.push((key, val));
                }
            }
            assert!(
                t0.elapsed() < CATCH_UP,
                "node 2 still lacks {} keys after its rebuild, e.g. {}",
                still.len(),
                still.first().map_or("", |k| k.0.as_str())
            );
            pending = still;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "rebuilt replica serves all {} acknowledged keys {:?} after its start",
            acked.len(),
            t0.elapsed()
        );
        // And it takes writes again.
        let (status, body) = c.put(2, "after_rebuild", "x", "").await;
        assert_eq!(status, 201, "{body}");

        // The flag left set does nothing to a directory that opens.
        c.stop(2).await;
        c.set_env("KVS_REBUILD", "1");
        c.restart(2).await;
        c.unset_env("KVS_REBUILD");
        assert_eq!(moved_aside(&c.data_dir(2)).len(), 1);
        let (status, body) = c.get(2, "after_rebuild", "").await;
        assert_eq!(status, 200, "{body}");
    })
    .await;
}
