//! `kvs bench` against a real cluster: it runs a bounded load, counts what it did, and
//! writes its JSON; against nothing, it fails.

mod common;

use std::process::Command;

use common::Cluster;

fn kvs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvs"))
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_loads_a_cluster_and_reports_every_operation() {
    let c = Cluster::start(12, 3, 3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("bench.json");
    let targets = (0..3).map(|i| c.addr(i)).collect::<Vec<_>>().join(",");
    let out = tokio::task::spawn_blocking(move || {
        kvs()
            .args([
                "bench", "--quiet", "--ops", "400", "-c", "4", "--keys", "50",
            ])
            .args(["--reads", "0.5", "--targets", &targets, "--json"])
            .arg(&json)
            .output()
            .map(|o| (o, json))
    })
    .await
    .expect("join")
    .expect("kvs bench runs");
    let (out, json) = out;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("p99.9 ms"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).expect("json");
    let (get, put) = (&report["get"], &report["put"]);
    assert_eq!(get["errors"], 0, "{report}");
    assert_eq!(put["errors"], 0, "{report}");
    let total = get["ok"].as_u64().unwrap_or(0) + put["ok"].as_u64().unwrap_or(0);
    assert_eq!(
        total, 400,
        "every operation of --ops is counted once: {report}"
    );
    assert!(
        get["ok"].as_u64() > Some(0) && put["ok"].as_u64() > Some(0),
        "{report}"
    );
    // What it wrote is there: about 200 writes over 50 keys leave few keys unwritten.
    let mut present = 0;
    for k in 0..50 {
        let (status, body) = c.get(0, &format!("k{k}"), "").await;
        if status == 200 {
            assert_eq!(body["value"].as_str().map(str::len), Some(256), "{body}");
            present += 1;
        }
    }
    assert!(present >= 40, "only {present} of 50 keys were written");
}

#[test]
fn bench_against_nothing_fails() {
    let out = kvs()
        .args([
            "bench",
            "--quiet",
            "--ops",
            "5",
            "-c",
            "1",
            "--targets",
            "127.0.0.1:9",
        ])
        .output()
        .expect("kvs bench runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("first error"));
    let bad = kvs()
        .args(["bench", "--reads", "1.5"])
        .output()
        .expect("kvs bench runs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("between 0 and 1"));
}
