//! Process-level tests of the client session and the CLI against a 4-node K=2 cluster:
//! a session that routes by the layout makes no node forward (counted in `/metrics`),
//! one that uses an entry node does; the CLI's data and admin commands end to end,
//! their JSON output and their exit codes. Address range `127.77.127.0/24`.

mod common;

use std::io::Write as _;
use std::process::{Command, Output};
use std::time::Duration;

use common::Cluster;
use kvs::client::session::{Session, WriteOptions};
use kvs::client::{Client, Method};
use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;

const SCENARIO: Duration = Duration::from_secs(240);

/// Requests node `i` has forwarded so far.
async fn forwards(c: &Cluster, i: usize) -> f64 {
    let reply = Client::new()
        .request(Method::GET, c.addr(i), "/metrics")
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /metrics on node {i}: {e}"));
    let text = reply.text().into_owned();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("metrics parse");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "kvs_forwards_total")
        .map(|s| match s.value {
            Value::Counter(v) | Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

async fn all_forwards(c: &Cluster) -> f64 {
    let mut total = 0.0;
    for i in 0..c.len() {
        total += forwards(c, i).await;
    }
    total
}

/// Runs `kvs <args>` against the cluster; its output.
fn kvs(c: &Cluster, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvs"));
    cmd.args(args)
        .env("KVS_CLUSTER", format!("{},{}", c.addr(0), c.addr(1)))
        .env_remove("ADMIN_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("run kvs");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("kvs output")
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn stdout_json(out: &Output) -> Json {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_routing_session_makes_no_node_forward() {
    let c = Cluster::start(127, 4, 2).await;
    c.within(SCENARIO, async {
        let http = Client::builder().timeout(Duration::from_secs(30)).build();
        let seeds = vec![c.addr(0).to_owned()];
        let before = all_forwards(&c).await;
        let mut direct = Session::direct(http.clone(), seeds.clone());
        for i in 0..200 {
            let key = format!("direct-{i}");
            direct
                .put(&key, key.as_bytes(), WriteOptions::default())
                .await
                .expect("put");
            let read = direct.get(&key).await.expect("get");
            assert_eq!(read.siblings.len(), 1);
            assert_eq!(read.siblings[0].value, key.as_bytes());
        }
        assert_eq!(
            all_forwards(&c).await,
            before,
            "the routing session caused forwards"
        );

        // Through one entry node, about half the keys live elsewhere: forwarded.
        let mut entry = Session::entry(http, seeds);
        for i in 0..100 {
            let read = entry.get(&format!("direct-{i}")).await.expect("get");
            assert_eq!(read.siblings.len(), 1);
        }
        let forwarded = all_forwards(&c).await - before;
        assert!(forwarded >= 20.0, "only {forwarded} of 100 reads forwarded");

        // A replica killed: reads of its partition go to the other replica.
        c.kill_9(3);
        for i in 0..50 {
            let read = direct
                .get(&format!("direct-{i}"))
                .await
                .expect("get after a kill");
            assert_eq!(read.siblings.len(), 1, "direct-{i}");
        }
        // The layout changes (node 3 removed): the session learns the new one from the
        // epoch of its answers and goes on.
        assert_eq!(direct.layout().await.expect("layout").epoch, 1);
        c.update_view(0, "remove", c.addr(3)).await;
        for i in 0..50 {
            let read = direct
                .get(&format!("direct-{i}"))
                .await
                .expect("get after the change");
            assert_eq!(read.siblings.len(), 1, "direct-{i}");
        }
        let layout = direct.layout().await.expect("layout");
        assert_eq!(layout.epoch, 2, "{layout:?}");
        assert!(layout
            .partitions
            .iter()
            .all(|p| !p.replicas.contains(&c.addr(3).to_owned())));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_reads_writes_lists_and_says_what_went_wrong() {
    let c = Cluster::start(128, 4, 2).await;
    c.within(SCENARIO, async {
        // put from an argument, a file and stdin; get prints the bytes.
        assert_eq!(code(&kvs(&c, &["put", "greeting", "hello"], None)), 0);
        let out = kvs(&c, &["get", "greeting"], None);
        assert_eq!((code(&out), out.stdout.as_slice()), (0, &b"hello"[..]));
        let binary: Vec<u8> = (0..=255u8).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("value.bin");
        std::fs::write(&file, &binary).expect("write");
        let file_arg = file.to_string_lossy().into_owned();
        assert_eq!(
            code(&kvs(&c, &["put", "bin", "--file", &file_arg], None)),
            0
        );
        let out = kvs(&c, &["get", "bin"], None);
        assert_eq!(out.stdout, binary);
        assert_eq!(code(&kvs(&c, &["put", "piped"], Some(b"from stdin"))), 0);
        assert_eq!(kvs(&c, &["get", "piped"], None).stdout, b"from stdin");

        // A second value without a context: two siblings, resolved with the context.
        assert_eq!(code(&kvs(&c, &["put", "greeting", "bonjour"], None)), 0);
        let out = kvs(&c, &["get", "greeting", "--json"], None);
        let read = stdout_json(&out);
        assert_eq!(read["siblings"].as_array().map(Vec::len), Some(2), "{read}");
        let context = read["context"].as_str().expect("context").to_string();
        let human =
            String::from_utf8_lossy(&kvs(&c, &["get", "greeting"], None).stdout).into_owned();
        assert!(human.contains("2 concurrent values"), "{human}");
        let out = kvs(
            &c,
            &[
                "put",
                "greeting",
                "hi",
                "--context",
                &context,
                "--if-unchanged",
            ],
            None,
        );
        assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(kvs(&c, &["get", "greeting"], None).stdout, b"hi");

        // Exit codes: not found 3, a failed condition 5, bad input 2, nobody there 4.
        assert_eq!(code(&kvs(&c, &["get", "missing"], None)), 3);
        assert_eq!(code(&kvs(&c, &["delete", "missing"], None)), 3);
        assert_eq!(
            code(&kvs(&c, &["put", "greeting", "x", "--if-absent"], None)),
            5
        );
        let stale = kvs(
            &c,
            &[
                "put",
                "greeting",
                "x",
                "--context",
                &context,
                "--if-unchanged",
            ],
            None,
        );
        assert_eq!(
            code(&stale),
            5,
            "{}",
            String::from_utf8_lossy(&stale.stderr)
        );
        assert_eq!(
            code(&kvs(&c, &["put", "k", "v", "--context", "junk"], None)),
            2
        );
        assert_eq!(code(&kvs(&c, &["get"], None)), 2, "clap's usage error");
        let nobody = kvs(
            &c,
            &[
                "get",
                "k",
                "--cluster",
                "127.77.127.200:9",
                "--timeout",
                "2",
            ],
            None,
        );
        assert_eq!(
            code(&nobody),
            4,
            "{}",
            String::from_utf8_lossy(&nobody.stderr)
        );

        // load a file of 300 lines with a progress bar, then ls finds them all.
        let lines: String = (0..300)
            .map(|i| format!("loaded-{i:03}\tvalue {i}\n"))
            .collect();
        let load_file = dir.path().join("load.tsv");
        std::fs::write(&load_file, lines).expect("write");
        let out = kvs(&c, &["load", &load_file.to_string_lossy(), "--json"], None);
        assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout_json(&out)["keys"], 300);
        let bad = dir.path().join("bad.tsv");
        std::fs::write(&bad, "no tab here\n").expect("write");
        assert_eq!(code(&kvs(&c, &["load", &bad.to_string_lossy()], None)), 2);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let out = kvs(&c, &["ls", "--prefix", "loaded-", "--json"], None);
            assert_eq!(code(&out), 0);
            let n = stdout_json(&out)["keys"].as_array().map_or(0, Vec::len);
            if n == 300 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "ls shows {n} of 300");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let out = kvs(&c, &["ls", "--prefix", "loaded-", "--limit", "7"], None);
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 7);

        // delete, status and members.
        assert_eq!(code(&kvs(&c, &["delete", "piped"], None)), 0);
        assert_eq!(code(&kvs(&c, &["get", "piped"], None)), 3);
        let status = stdout_json(&kvs(&c, &["status", "--json"], None));
        let parts = status["partitions"].as_array().expect("partitions");
        assert_eq!(parts.len(), 2, "{status}");
        let members = stdout_json(&kvs(&c, &["members", "--json"], None));
        assert_eq!(members["members"].as_array().map(Vec::len), Some(4));
        let text = String::from_utf8_lossy(&kvs(&c, &["members"], None).stdout).into_owned();
        assert_eq!(text.matches("alive").count(), 4, "{text}");

        // remove then add back a node, through the admin commands.
        let gone = c.addr(3).to_owned();
        let out = kvs(&c, &["remove", &gone, "--json"], None);
        assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            stdout_json(&out)["members"].as_array().map(Vec::len),
            Some(3)
        );
        let out = kvs(&c, &["remove", &gone], None);
        assert_eq!(
            code(&out),
            3,
            "removing a non-member: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(kvs(&c, &["get", "greeting"], None).stdout, b"hi");
    })
    .await;
}
