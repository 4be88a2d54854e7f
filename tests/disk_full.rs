//! Process-level tests of a full disk: a node's data directory on a small tmpfs that the
//! test mounts itself (skipped, with the reason printed, where mounting is not allowed),
//! filled up with a filler file while the node runs, then freed. The node must refuse
//! writes with a clear 503 (or have its peers take them), say it is degraded, keep its
//! reads, and take writes again by itself once the space is back, losing nothing it
//! acknowledged. Address ranges `127.77.72-73.0/24` (see `common`).

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{keys, load, value_of, Cluster};

/// Size of the tmpfs: room for a node's files (a fresh redb file and a WAL) with space
/// to spare, small enough to fill in a moment.
const TMPFS_SIZE: &str = "32m";
/// Writes tried before the full disk must have refused one. The WAL writes space ahead
/// of its records (at most `kvs::wal::GROW_MAX` bytes) and takes writes into it while
/// the disk is full: they are durable. The writes that fill it carry [`FILL_VALUE_BYTES`]
/// each, so that 200 of them use up several times that much.
const MAX_WRITES_TO_FILL: usize = 200;
/// Bytes of the value of each write made while the disk is full.
const FILL_VALUE_BYTES: usize = 64 * 1024;
/// Time the node gets to notice the freed space (it probes every second), and a peer to
/// learn of its state from the heartbeats.
const HEAL_WITHIN: Duration = Duration::from_secs(20);

/// A tmpfs mounted on a fresh directory; unmounted when dropped, whatever happened.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts one, or says why it cannot.
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::Builder::new()
            .prefix("kvs-tmpfs-")
            .tempdir()
            .map_err(|e| format!("creating the mount point: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let plain = Command::new("umount").arg(self.dir.path()).status();
        if !matches!(plain, Ok(s) if s.success()) {
            // Busy (a process still holds a file): detach it now, freed once closed.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Fills the file system of `dir` with `dir/filler` until it refuses more.
/// A value of [`FILL_VALUE_BYTES`] bytes, its own for each `n`.
fn big_value(n: usize) -> String {
    let head = format!("{n}=");
    head.clone() + &"v".repeat(FILL_VALUE_BYTES - head.len())
}

fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create the filler");
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    path
}

fn mount_or_skip(test: &str) -> Option<Tmpfs> {
    match Tmpfs::mount(TMPFS_SIZE) {
        Ok(t) => Some(t),
        Err(reason) => {
            eprintln!("skipping {test}: cannot mount a tmpfs here ({reason})");
            None
        }
    }
}

/// `disk` of node `i`'s status: whether it takes writes.
async fn writable(c: &Cluster, i: usize) -> bool {
    let status = c.status(i).await;
    status["disk"]["writable"]
        .as_bool()
        .unwrap_or_else(|| panic!("status of node {i} without disk.writable: {status}"))
}

/// Waits until node `i`'s status says its disk takes writes (`true`) or not; returns how
/// long that took.
async fn wait_writable(c: &Cluster, i: usize, want: bool) -> Duration {
    let t0 = Instant::now();
    let deadline = t0 + HEAL_WITHIN;
    while writable(c, i).await != want {
        assert!(
            Instant::now() < deadline,
            "node {i}'s disk is not {} after {HEAL_WITHIN:?}: {}",
            if want { "writable" } else { "degraded" },
            c.status(i).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

/// Waits until node `i` serves every key of `expected` with its value (empty causal
/// payload: what the node has by itself).
async fn wait_values(c: &Cluster, i: usize, expected: &BTreeMap<String, String>) {
    let deadline = Instant::now() + HEAL_WITHIN;
    let mut pending: Vec<(&String, &String)> = expected.iter().collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for (key, val) in pending {
            let (status, body) = c.get(i, key, "").await;
            if status != 200 || value_of(&body) != *val {
                still.push((key, val));
            }
        }
        assert!(
            Instant::now() < deadline || still.is_empty(),
            "node {i} lacks {} keys, e.g. {}",
            still.len(),
            still.first().map_or("", |k| k.0.as_str())
        );
        pending = still;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// K=1: the full disk refuses a write with a clear 503, the node says it is degraded and
/// still serves reads; freed, it takes writes again without a restart; nothing it
/// acknowledged is lost, across a crash too.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_writes_then_heals_by_itself() {
    let Some(tmpfs) = mount_or_skip("a_full_disk_refuses_writes_then_heals_by_itself") else {
        return;
    };
    let c = Cluster::start_with_data_dirs(72, 1, 1, &[(0, tmpfs.path().join("node0"))]).await;
    c.within(Duration::from_secs(180), async {
        let mut acked = keys("before", 20);
        load(&c, &[0], &acked).await;

        let filler = fill(tmpfs.path());
        let mut refused = None;
        for n in 0..MAX_WRITES_TO_FILL {
            let (key, val) = (format!("full_{n}"), big_value(n));
            let (status, body) = c.put(0, &key, &val, "").await;
            match status {
                200 | 201 => {
                    acked.insert(key, val);
                }
                503 => {
                    refused = Some(body);
                    break;
                }
                other => panic!("PUT {key} on a full disk answered {other}: {body}"),
            }
        }
        let body = refused.expect("the full disk never refused a write");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("disk refuses writes") && error.contains("No space left on device"),
            "{body}"
        );
        let status = c.status(0).await;
        assert_eq!(status["disk"]["writable"], false, "{status}");
        assert!(
            status["disk"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("No space left")),
            "{status}"
        );
        // Reads keep working; writes keep being refused while the disk is full.
        let (key, val) = acked.iter().next().expect("a key");
        let (s, body) = c.get(0, key, "").await;
        assert_eq!((s, value_of(&body)), (200, val.clone()), "{body}");
        let (s, body) = c.put(0, "while_full", "x", "").await;
        assert_eq!(s, 503, "{body}");

        std::fs::remove_file(&filler).expect("free the space");
        let took = wait_writable(&c, 0, true).await;
        eprintln!("node 0 took writes again {took:?} after the space was freed");
        let (s, body) = c.put(0, "after", "after=v1", "").await;
        assert_eq!(s, 201, "{body}");
        acked.insert("after".into(), "after=v1".into());
        wait_values(&c, 0, &acked).await;
        let log = c.log(0);
        assert!(log.contains("disk fault") && log.contains("disk takes writes again"));

        // Everything acknowledged is on disk: a crash and restart keeps it all.
        c.kill_9(0);
        c.restart(0).await;
        wait_values(&c, 0, &acked).await;
        eprintln!("{} acknowledged keys, none lost", acked.len());
    })
    .await;
    drop(c);
    drop(tmpfs);
}

/// K=3, node 2 on the tmpfs: while its disk is full, writes sent to it are taken by the
/// other replicas, it says it is degraded and its peers believe so; freed, it takes
/// writes again without a restart and catches up with what was written elsewhere.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_with_a_full_disk_is_routed_around_then_catches_up() {
    let Some(tmpfs) = mount_or_skip("a_replica_with_a_full_disk_is_routed_around_then_catches_up")
    else {
        return;
    };
    let c = Cluster::start_with_data_dirs(73, 3, 3, &[(2, tmpfs.path().join("node2"))]).await;
    c.within(Duration::from_secs(180), async {
        let mut acked = keys("before", 30);
        load(&c, &[0, 1, 2], &acked).await;
        wait_values(&c, 2, &acked).await;

        let filler = fill(tmpfs.path());
        // Every write sent to node 2 is accepted: by itself while its disk has room,
        // by its peers once it refuses.
        let deadline = Instant::now() + HEAL_WITHIN;
        let mut n = 0;
        while writable(&c, 2).await {
            assert!(
                n < MAX_WRITES_TO_FILL && Instant::now() < deadline,
                "node 2 never noticed its full disk"
            );
            let (key, val) = (format!("via2_{n}"), big_value(n));
            let (status, body) = c.put(2, &key, &val, "").await;
            assert!(
                status == 200 || status == 201,
                "PUT {key} via node 2: {body}"
            );
            acked.insert(key, val);
            n += 1;
        }
        for n in 0..10 {
            let (key, val) = (format!("degraded_{n}"), format!("degraded_{n}=v1"));
            let (status, body) = c.put(2, &key, &val, "").await;
            assert!(
                status == 200 || status == 201,
                "PUT {key} via degraded node 2: {body}"
            );
            acked.insert(key, val);
        }
        // Its peers learn it from the heartbeats.
        let deadline = Instant::now() + HEAL_WITHIN;
        loop {
            let status = c.status(0).await;
            let peer = status["peers"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p["node"] == c.addr(2)).cloned())
                .unwrap_or_default();
            if peer["disk"] == "refuses writes" {
                break;
            }
            assert!(Instant::now() < deadline, "node 0 never learned: {status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Written elsewhere while node 2 cannot apply it.
        let (s, body) = c.put(0, "elsewhere", "elsewhere=v1", "").await;
        assert_eq!(s, 201, "{body}");
        acked.insert("elsewhere".into(), "elsewhere=v1".into());

        std::fs::remove_file(&filler).expect("free the space");
        let took = wait_writable(&c, 2, true).await;
        eprintln!("node 2 took writes again {took:?} after the space was freed");
        let (s, body) = c.put(2, "after", "after=v1", "").await;
        assert_eq!(s, 201, "{body}");
        acked.insert("after".into(), "after=v1".into());
        // It catches up with everything, what was written elsewhere meanwhile included.
        wait_values(&c, 2, &acked).await;
        wait_values(&c, 0, &acked).await;
        eprintln!(
            "{} acknowledged keys, all on the healed replica",
            acked.len()
        );
    })
    .await;
    drop(c);
    drop(tmpfs);
}
