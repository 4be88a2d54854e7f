//! Process-level recovery tests: replicas that missed writes (paused with SIGSTOP) or
//! lost their whole data directory catch up from their peers. Address ranges
//! `127.77.51-52.0/24` (see `common`).
//!
//! The convergence times they print are indications from a debug build on a shared
//! machine; the assertions only bound them generously.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{keys, load, value_of, verify, Cluster};

/// Generous bound on catching up (the goal is well under the 5 s staleness bound).
const CATCH_UP: Duration = Duration::from_secs(30);

/// Waits until node `i` holds `n` keys; returns how long that took.
async fn wait_keys(c: &Cluster, i: usize, n: u64) -> Duration {
    let t0 = Instant::now();
    loop {
        let status = c.status(i).await;
        if status["keys"].as_u64() == Some(n) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < CATCH_UP,
            "node {i} holds {} keys, not {n}, after {CATCH_UP:?}",
            status["keys"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until node `i`, read with an empty causal payload (what it serves by itself:
/// it is a replica of every key here), has every key of `expected` with its value;
/// returns how long that took.
async fn wait_values(c: &Cluster, i: usize, expected: &BTreeMap<String, String>) -> Duration {
    let t0 = Instant::now();
    let mut pending: Vec<(&String, &String)> = expected.iter().collect();
    loop {
        let mut still = Vec::new();
        for (key, val) in pending {
            let (status, body) = c.get(i, key, "").await;
            if status != 200 || value_of(&body) != *val {
                still.push((key, val));
            }
        }
        if still.is_empty() {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < CATCH_UP,
            "node {i} still lacks {} of the expected values after {CATCH_UP:?}, e.g. {}",
            still.len(),
            still[0].0
        );
        pending = still;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A replica frozen (SIGSTOP) while its peers take writes and overwrites converges
/// once it runs again, without any client read asking for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_replica_converges_after_it_resumes() {
    let c = Cluster::start(51, 3, 3).await;
    c.within(Duration::from_secs(180), async {
        let first = keys("paused", 1_000);
        load(&c, &[0, 1, 2], &first).await;
        wait_keys(&c, 2, 1_000).await;

        c.pause(2);
        let more = keys("while_paused", 1_000);
        load(&c, &[0, 1], &more).await;
        let overwritten: BTreeMap<String, String> = first
            .keys()
            .take(200)
            .map(|k| (k.clone(), format!("{k}=v2")))
            .collect();
        load(&c, &[0, 1], &overwritten).await;
        c.resume(2);

        let took = wait_keys(&c, 2, 2_000).await;
        eprintln!("paused replica holds all 2000 keys {took:?} after it resumed");
        wait_values(&c, 2, &more).await;
        wait_values(&c, 2, &overwritten).await;
    })
    .await;
}

/// A replica whose data directory is wiped is rebuilt from its peers on restart, and
/// serves every key with its latest value again.
#[tokio::test(flavor = "multi_thread")]
async fn a_wiped_replica_is_rebuilt_from_its_peers() {
    let c = Cluster::start(52, 3, 3).await;
    c.within(Duration::from_secs(180), async {
        let data = keys("wiped", 3_000);
        load(&c, &[0, 1, 2], &data).await;
        wait_keys(&c, 2, 3_000).await;

        c.stop(2).await;
        c.wipe(2);
        c.restart(2).await;
        let took = wait_keys(&c, 2, 3_000).await;
        eprintln!("wiped replica rebuilt with 3000 keys {took:?} after its restart");
        wait_values(&c, 2, &data).await;
        verify(&c, &[0, 1, 2], &data, 100).await;

        // It takes writes again and its peers see them.
        let after = keys("after_wipe", 100);
        load(&c, &[2], &after).await;
        wait_values(&c, 0, &after).await;
    })
    .await;
}
