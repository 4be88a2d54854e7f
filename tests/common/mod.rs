//! Harness for process-level tests: starts real `kvs` processes on loopback.
//!
//! Each test owns a distinct `127.<net>.<test_id>.0/24` range (`net` is 77 unless
//! `KVS_TEST_NET` says otherwise), and node `i` binds `127.<net>.<test_id>.<i+1>:8080`
//! (`KVS_TEST_PORT` overrides the port). Linux routes all of 127.0.0.0/8 to `lo`, so
//! no setup is needed and the tests of one `cargo test` run can run in parallel.
//!
//! Every node gets its own data directory and log file (stdout and stderr of the
//! process, appended across restarts) under one temporary directory. When a test
//! panics (including a scenario timeout, see [`Cluster::within`]) the tail of every
//! node log is printed and the temporary directory is kept for inspection.
//!
//! `KVS_TEST_BIN` runs the scenarios against another server binary than the crate's;
//! `KVS_TEST_KEEP=1` keeps every cluster's files (they are always kept on failure).
//!
//! Every wait has a deadline and every HTTP request a timeout, so no test can hang.
//! Requests go through `kvs::client` (the project's one client), without connection
//! pooling; the one exception is [`NodeClient::request_reading_early`], a raw-socket
//! client for answers that arrive before the request body is complete.
//!
//! Caveat: children are killed by `Drop`; if the test binary itself is killed
//! (SIGKILL), the nodes outlive it. The next run then refuses to start on their
//! addresses (see [`Cluster::spawn`]) instead of talking to a stale cluster.

// Each test crate uses a different subset of the helpers.
#![allow(dead_code)]

pub mod loopback;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvs::client::{Client, ClientError, Method, Response};
use serde_json::Value;
use tempfile::TempDir;

/// Time a whole cluster gets to answer its readiness probe after the processes start.
/// Generous: debug builds, two tests starting clusters at once on a 2-core machine.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(30);
/// Per-request timeout. Above the server's bounded catch-up wait (~2 s) and any
/// unavailability detection, so a slow-but-correct answer is never mistaken for a hang.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Timeout of one `update_view` request: it returns once every key has moved (debug
/// builds, thousands of keys, a 2-core machine shared with other tests).
pub const VIEW_CHANGE_TIMEOUT: Duration = Duration::from_secs(180);
/// Time a node gets to exit after SIGTERM before it is killed with SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Interval between polls in every wait loop.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// Lines of each node log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;

const DEFAULT_NET: u8 = 77;
const DEFAULT_PORT: u16 = 8080;
pub const DEFAULT_SECRET: &str = "kvs-integration-test-secret";

/// One `kvs` process slot: its fixed address, env and files, and the running child, if any.
struct Node {
    addr: String,
    /// Whether the process gets `VIEW` (the initial members). Spare nodes start
    /// without one, to be added by a view change.
    initial: bool,
    /// Whether the process starts the seed-002 way of a node started later: with a
    /// `VIEW` of every slot, its own included, and no `SHARD_COUNT` (see
    /// [`Cluster::join`]).
    joins: Mutex<bool>,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Mutex<Option<Child>>,
    starts: Mutex<u32>,
}

/// How the nodes are configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Seeds 000/001: `K`, `VIEW`, `IPPORT`.
    K(usize),
    /// Seed 002: `SOCKET_ADDRESS`, `VIEW` and, when given, `SHARD_COUNT`.
    Shards(Option<usize>),
    /// Seed 003: `ADDRESS`, `VIEW` and, when given, `REPL_FACTOR`.
    Replication(Option<usize>),
}

/// A running cluster of `kvs` processes (K mode and the seed-001 dialect, or seed 002's
/// shard mode, see [`Cluster::start_shards`]).
pub struct Cluster {
    /// K, in K mode (0 in shard mode).
    pub k: usize,
    mode: Mode,
    pub view: Vec<String>,
    secret: String,
    /// Extra environment for every process started from now on (see [`Cluster::set_env`]).
    env: Mutex<Vec<(String, String)>>,
    nodes: Vec<Node>,
    tmp: Option<TempDir>,
    http: Client,
}

/// Reads the numeric environment override `name`, or `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid number")),
        Err(_) => default,
    }
}

/// Locks a harness mutex; a panic while it was held (a failed assertion) must not stop
/// `Drop` from killing the processes, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The server binary: the crate's `kvs`, unless `KVS_TEST_BIN` names another build
/// (e.g. a release build) to run the same scenarios against.
fn binary() -> PathBuf {
    std::env::var_os("KVS_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kvs")))
}

/// Builds the form body `k1=v1&k2=v2` (application/x-www-form-urlencoded).
pub fn form(fields: &[(&str, &str)]) -> String {
    kvs::client::encode_form(fields)
}

impl Cluster {
    /// Starts `n` nodes with replication factor `k` in the address range of `test_id`,
    /// and waits until every node is ready.
    pub async fn start(test_id: u8, n: usize, k: usize) -> Cluster {
        Cluster::start_with_secret(test_id, n, k, DEFAULT_SECRET).await
    }

    /// Like [`Cluster::start`], with a given `CLUSTER_SECRET`; `""` starts the nodes
    /// without one, as the seeds do.
    pub async fn start_with_secret(test_id: u8, n: usize, k: usize, secret: &str) -> Cluster {
        Cluster::start_full(test_id, n, 0, k, secret, &[]).await
    }

    /// Starts `n` nodes like [`Cluster::start`] and prepares `spares` more slots
    /// (indices `n..n + spares`, addresses following the initial ones) that are not
    /// running and are not in `VIEW`: [`Cluster::start_spare`] starts one as a node in no
    /// cluster, ready to be added with `update_view`. Every process gets `env` on top of
    /// the usual variables (see [`Cluster::set_env`]).
    pub async fn start_with_spares(
        test_id: u8,
        n: usize,
        spares: usize,
        k: usize,
        env: &[(&str, &str)],
    ) -> Cluster {
        Cluster::start_full(test_id, n, spares, k, DEFAULT_SECRET, env).await
    }

    /// Like [`Cluster::start`], with the data directory of some nodes given: `dirs` holds
    /// `(node index, directory)` pairs (e.g. a directory on a small file system).
    pub async fn start_with_data_dirs(
        test_id: u8,
        n: usize,
        k: usize,
        dirs: &[(usize, PathBuf)],
    ) -> Cluster {
        Cluster::start_full_with_dirs(test_id, n, 0, k, DEFAULT_SECRET, &[], dirs).await
    }

    /// Starts `n` nodes the seed-002 way (`SOCKET_ADDRESS`, `VIEW`, and `SHARD_COUNT` when
    /// `shards` is given), with `spares` more slots that [`Cluster::join`] starts later;
    /// waits until every node is ready.
    pub async fn start_shards(
        test_id: u8,
        n: usize,
        spares: usize,
        shards: Option<usize>,
    ) -> Cluster {
        let mut c = Cluster::start_full_with_dirs_in(
            test_id,
            n,
            spares,
            Mode::Shards(shards),
            DEFAULT_SECRET,
            &[],
            &[],
        )
        .await;
        c.k = 0;
        c
    }

    /// Starts `n` nodes the seed-003 way (`ADDRESS`, `VIEW`, and `REPL_FACTOR` when `r`
    /// is given), with `spares` more slots that [`Cluster::join`] starts later (with a
    /// `VIEW` of every slot: they wait for the view change that adds them); waits until
    /// every node is ready.
    pub async fn start_replicated(
        test_id: u8,
        n: usize,
        spares: usize,
        r: Option<usize>,
    ) -> Cluster {
        let mut c = Cluster::start_full_with_dirs_in(
            test_id,
            n,
            spares,
            Mode::Replication(r),
            DEFAULT_SECRET,
            &[],
            &[],
        )
        .await;
        c.k = r.unwrap_or(1);
        c
    }

    async fn start_full(
        test_id: u8,
        n: usize,
        spares: usize,
        k: usize,
        secret: &str,
        env: &[(&str, &str)],
    ) -> Cluster {
        Cluster::start_full_with_dirs(test_id, n, spares, k, secret, env, &[]).await
    }

    async fn start_full_with_dirs(
        test_id: u8,
        n: usize,
        spares: usize,
        k: usize,
        secret: &str,
        env: &[(&str, &str)],
        dirs: &[(usize, PathBuf)],
    ) -> Cluster {
        Cluster::start_full_with_dirs_in(test_id, n, spares, Mode::K(k), secret, env, dirs).await
    }

    async fn start_full_with_dirs_in(
        test_id: u8,
        n: usize,
        spares: usize,
        mode: Mode,
        secret: &str,
        env: &[(&str, &str)],
        dirs: &[(usize, PathBuf)],
    ) -> Cluster {
        let k = match mode {
            Mode::K(k) => k,
            Mode::Shards(_) => 0,
            Mode::Replication(r) => r.unwrap_or(1),
        };
        assert!(
            (1..=250).contains(&(n + spares)),
            "a test range holds at most 250 nodes"
        );
        let net: u8 = env_or("KVS_TEST_NET", DEFAULT_NET);
        let port: u16 = env_or("KVS_TEST_PORT", DEFAULT_PORT);
        let addrs: Vec<String> = (0..n + spares)
            .map(|i| format!("127.{net}.{test_id}.{}:{port}", i + 1))
            .collect();
        let view = addrs[..n].to_vec();
        let tmp = tempfile::Builder::new()
            .prefix(&format!("kvs-test-{test_id}-"))
            .tempdir()
            .expect("create temporary directory for the cluster");
        let nodes = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| Node {
                addr: addr.clone(),
                initial: i < n,
                data_dir: dirs
                    .iter()
                    .find(|(d, _)| *d == i)
                    .map(|(_, dir)| dir.clone())
                    .unwrap_or_else(|| tmp.path().join(format!("node{i}"))),
                log_path: tmp.path().join(format!("node{i}.log")),
                child: Mutex::new(None),
                starts: Mutex::new(0),
                joins: Mutex::new(false),
            })
            .collect();
        let http = Client::builder()
            // No pooling: nodes are killed and restarted under the tests' feet, and a
            // stale pooled connection would turn into a spurious transport error.
            .pool_max_idle_per_host(0)
            .connect_timeout(Duration::from_secs(2))
            .timeout(REQUEST_TIMEOUT)
            .build();
        let cluster = Cluster {
            k,
            mode,
            view,
            secret: secret.to_owned(),
            env: Mutex::new(
                env.iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
            ),
            nodes,
            tmp: Some(tmp),
            http,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        let deadline = Instant::now() + STARTUP_DEADLINE;
        for i in 0..n {
            cluster.wait_ready_until(i, deadline).await;
        }
        // Seed 003's nodes find each other before they form the cluster: a node is
        // started once it is in it (and, being ready, holds its key).
        if matches!(cluster.mode, Mode::Replication(_)) {
            for i in 0..n {
                while cluster.view_of(i).await.is_none() {
                    assert!(
                        Instant::now() < deadline,
                        "node {i} formed no cluster\n{}",
                        cluster.log_tail(i)
                    );
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
                cluster.wait_ready_until(i, deadline).await;
            }
        }
        cluster
    }

    /// Number of node slots, spares included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Sets `name=value` in the environment of every process started after this call
    /// (restarts included), e.g. a fault-injection knob.
    pub fn set_env(&self, name: &str, value: &str) {
        let mut env = lock(&self.env);
        env.retain(|(n, _)| n != name);
        env.push((name.to_owned(), value.to_owned()));
    }

    /// Removes `name` from the extra environment (see [`Cluster::set_env`]).
    pub fn unset_env(&self, name: &str) {
        lock(&self.env).retain(|(n, _)| n != name);
    }

    /// Starts spare node `i` the way seed 002 starts a node later: its `VIEW` lists every
    /// slot, itself included, and it has no `SHARD_COUNT`, so it joins the running
    /// cluster by itself. Returns once it answers (not once it has joined).
    pub async fn join(&self, i: usize) {
        assert!(!self.nodes[i].initial, "node {i} is not a spare");
        *lock(&self.nodes[i].joins) = true;
        self.restart(i).await;
    }

    /// Starts spare node `i` (see [`Cluster::start_with_spares`]) and waits until it answers.
    pub async fn start_spare(&self, i: usize) {
        assert!(!self.nodes[i].initial, "node {i} is not a spare");
        self.restart(i).await;
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn addr(&self, i: usize) -> &str {
        &self.nodes[i].addr
    }

    /// Number of partitions of the initial view: floor(N/K).
    pub fn partitions(&self) -> usize {
        self.view.len() / self.k
    }

    /// The partition node `i` belongs to per the layout rule, or -1 for a proxy.
    pub fn expected_partition_of(&self, i: usize) -> i64 {
        if i < self.partitions() * self.k {
            (i / self.k) as i64
        } else {
            -1
        }
    }

    /// Node indices of partition `p` per the layout rule.
    pub fn expected_members(&self, p: usize) -> Vec<usize> {
        (p * self.k..(p + 1) * self.k).collect()
    }

    /// Starts the process of node `i` (which must not be running) with its env and DATA_DIR.
    fn spawn(&self, i: usize) {
        let node = &self.nodes[i];
        let mut guard = lock(&node.child);
        assert!(
            guard.is_none(),
            "node {i} ({}) is already running",
            node.addr
        );
        // A process left over from an aborted run would answer our readiness probe for
        // the new node; refuse to start rather than test against a stale cluster.
        if let Err(e) = std::net::TcpListener::bind(&node.addr) {
            panic!(
                "cannot bind {} before starting node {i}: {e}. Is a kvs process from an \
                 aborted test run still alive? (set KVS_TEST_NET to use another range)",
                node.addr
            );
        }
        let mut starts = lock(&node.starts);
        *starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .unwrap_or_else(|e| panic!("open log {}: {e}", node.log_path.display()));
        writeln!(
            log,
            "===== harness: starting node {i} ({}), start #{} =====",
            node.addr, *starts
        )
        .expect("write log header");
        let stderr = log.try_clone().expect("clone log file handle");
        let mut cmd = Command::new(binary());
        // Only what the test sets: nothing leaks in from the caller's environment.
        cmd.env_remove("ADMIN_TOKEN").env_remove("CLUSTER_SECRET");
        if !self.secret.is_empty() {
            cmd.env("CLUSTER_SECRET", &self.secret);
        }
        let joins = *lock(&node.joins);
        if joins {
            let all: Vec<&str> = self.nodes.iter().map(|n| n.addr.as_str()).collect();
            cmd.env("VIEW", all.join(","));
        } else if node.initial {
            cmd.env("VIEW", self.view.join(","));
        } else {
            cmd.env_remove("VIEW");
        }
        // Variables of the other dialects select other configuration modes.
        for name in [
            "K",
            "IPPORT",
            "SOCKET_ADDRESS",
            "SHARD_COUNT",
            "ADDRESS",
            "REPL_FACTOR",
        ] {
            cmd.env_remove(name);
        }
        match self.mode {
            Mode::K(k) => {
                cmd.env("K", k.to_string()).env("IPPORT", &node.addr);
            }
            Mode::Shards(shards) => {
                cmd.env("SOCKET_ADDRESS", &node.addr);
                if let (Some(n), false) = (shards, joins) {
                    cmd.env("SHARD_COUNT", n.to_string());
                }
            }
            Mode::Replication(r) => {
                cmd.env("ADDRESS", &node.addr);
                if let Some(r) = r {
                    cmd.env("REPL_FACTOR", r.to_string());
                }
            }
        }
        cmd.envs(lock(&self.env).iter().map(|(n, v)| (n, v)));
        let child = cmd
            .env("DATA_DIR", &node.data_dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary().display()));
        *guard = Some(child);
    }

    /// Polls node `i` until `GET /api/v1/status` answers 200 with `ready` (the server
    /// answers once it has loaded its state, and is ready once it holds its cluster's
    /// key; a node in no cluster is ready at once).
    pub async fn wait_ready(&self, i: usize) {
        self.wait_ready_until(i, Instant::now() + STARTUP_DEADLINE)
            .await
    }

    async fn wait_ready_until(&self, i: usize, deadline: Instant) {
        let node = &self.nodes[i];
        loop {
            {
                let mut guard = lock(&node.child);
                let child = guard
                    .as_mut()
                    .unwrap_or_else(|| panic!("node {i} is not running; cannot become ready"));
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "node {i} ({}) exited with {status} before becoming ready\n{}",
                        node.addr,
                        self.log_tail(i)
                    );
                }
            }
            let probe = self
                .http
                .v1(&node.addr)
                .timeout(Duration::from_secs(1))
                .status()
                .await;
            if let Ok(resp) = probe {
                if resp.status.as_u16() == 200 {
                    // A member is ready once it holds the cluster key.
                    let body: Value = resp.json().unwrap_or(Value::Null);
                    if body["ready"] != Value::Bool(false) {
                        return;
                    }
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "node {i} ({}) not ready within the deadline\n{}",
                    node.addr,
                    self.log_tail(i)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The data directory of node `i`.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].data_dir.clone()
    }

    /// The whole log of node `i` (every start of it).
    pub fn log(&self, i: usize) -> String {
        std::fs::read(&self.nodes[i].log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Starts node `i` when it is expected to refuse to start: waits (up to `limit`) for
    /// the process to exit, and returns its exit status. Panics if it is still running
    /// then.
    pub async fn start_expecting_exit(
        &self,
        i: usize,
        limit: Duration,
    ) -> std::process::ExitStatus {
        self.spawn(i);
        let deadline = Instant::now() + limit;
        loop {
            {
                let mut guard = lock(&self.nodes[i].child);
                let child = guard.as_mut().expect("spawned above");
                if let Ok(Some(status)) = child.try_wait() {
                    guard.take();
                    return status;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "node {i} still runs {limit:?} after its start, expected it to exit\n{}",
                    self.log_tail(i)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// SIGKILLs node `i` (`Child::kill` sends SIGKILL) and reaps it.
    pub fn kill_9(&self, i: usize) {
        let mut guard = lock(&self.nodes[i].child);
        let mut child = guard
            .take()
            .unwrap_or_else(|| panic!("kill_9: node {i} is not running"));
        // An error here means it already exited, which is what we want anyway.
        let _ = child.kill();
        child
            .wait()
            .unwrap_or_else(|e| panic!("reap node {i} after SIGKILL: {e}"));
    }

    /// Stops node `i` gracefully (SIGTERM), falling back to SIGKILL after a grace period.
    pub async fn stop(&self, i: usize) {
        let mut child = lock(&self.nodes[i].child)
            .take()
            .unwrap_or_else(|| panic!("stop: node {i} is not running"));
        let term = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        if !matches!(term, Ok(s) if s.success()) {
            let _ = child.kill();
        }
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
                _ => {
                    eprintln!("node {i} did not exit {STOP_GRACE:?} after SIGTERM; killing it");
                    let _ = child.kill();
                    child
                        .wait()
                        .unwrap_or_else(|e| panic!("reap node {i} after SIGKILL: {e}"));
                    return;
                }
            }
        }
    }

    /// Sends `signal` (e.g. `-STOP`, `-CONT`) to node `i`'s process.
    fn signal(&self, i: usize, signal: &str) {
        let guard = lock(&self.nodes[i].child);
        let child = guard
            .as_ref()
            .unwrap_or_else(|| panic!("signal {signal}: node {i} is not running"));
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("kill {signal} node {i}: {e}"));
        assert!(status.success(), "kill {signal} node {i}: {status}");
    }

    /// Freezes node `i` (SIGSTOP): its sockets stay open but it answers nothing.
    pub fn pause(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    /// Lets a paused node `i` run again (SIGCONT).
    pub fn resume(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    /// Deletes the data directory of node `i`, which must not be running.
    pub fn wipe(&self, i: usize) {
        assert!(
            lock(&self.nodes[i].child).is_none(),
            "wipe: node {i} is still running"
        );
        let dir = &self.nodes[i].data_dir;
        if dir.exists() {
            std::fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("wipe {}: {e}", dir.display()));
        }
    }

    /// Starts node `i` again with the same env and DATA_DIR and waits until it is ready.
    pub async fn restart(&self, i: usize) {
        self.spawn(i);
        self.wait_ready(i).await;
    }

    /// Starts the nodes `nodes` (none running) all at once, then waits until each is
    /// ready: a cluster forming on empty disks needs every member up before any is.
    pub async fn restart_all(&self, nodes: &[usize]) {
        for &i in nodes {
            self.spawn(i);
        }
        let deadline = Instant::now() + STARTUP_DEADLINE;
        for &i in nodes {
            self.wait_ready_until(i, deadline).await;
        }
    }

    /// Runs a test scenario with an overall time limit; on timeout, panics (which makes
    /// `Drop` print the node logs).
    pub async fn within<F: Future>(&self, limit: Duration, scenario: F) -> F::Output {
        match tokio::time::timeout(limit, scenario).await {
            Ok(out) => out,
            Err(_) => panic!("scenario did not finish within {limit:?}"),
        }
    }

    /// The last lines of node `i`'s log, with a header.
    pub fn log_tail(&self, i: usize) -> String {
        let path = &self.nodes[i].log_path;
        let text = std::fs::read(path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        format!(
            "----- node {i} ({}) log tail: {} -----\n{}\n",
            self.nodes[i].addr,
            path.display(),
            tail.join("\n")
        )
    }

    // ---------------------------------------------------------------- HTTP helpers

    /// An owned HTTP client for node `i`, usable from spawned tasks.
    pub fn node(&self, i: usize) -> NodeClient {
        NodeClient {
            http: self.http.clone(),
            index: i,
            addr: self.addr(i).to_owned(),
        }
    }

    /// See [`NodeClient::try_request`].
    pub async fn try_request(
        &self,
        i: usize,
        method: Method,
        path: &str,
        body: String,
    ) -> Result<(u16, Value), String> {
        self.node(i).try_request(method, path, body).await
    }

    /// See [`NodeClient::request`].
    pub async fn request(
        &self,
        i: usize,
        method: Method,
        path: &str,
        body: String,
    ) -> (u16, Value) {
        self.node(i).request(method, path, body).await
    }

    /// See [`NodeClient::request_reading_early`].
    pub async fn request_reading_early(
        &self,
        i: usize,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> (u16, Value) {
        self.node(i)
            .request_reading_early(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("request failed: {e}"))
    }

    /// GET /kv-store/<key> on node `i` with the given causal payload.
    pub async fn get(&self, i: usize, key: &str, causal_payload: &str) -> (u16, Value) {
        self.node(i).get(key, causal_payload).await
    }

    /// PUT /kv-store/<key> on node `i` with `val` and the given causal payload.
    pub async fn put(&self, i: usize, key: &str, val: &str, causal_payload: &str) -> (u16, Value) {
        self.node(i).put(key, val, causal_payload).await
    }

    /// GET /kv-store/get_partition_id on node `i`.
    pub async fn partition_id(&self, i: usize) -> i64 {
        let node = self.node(i);
        let reply = node.http.kv_store(&node.addr).partition_id().await;
        let (status, body) = node.expect_reply("GET /kv-store/get_partition_id", reply);
        assert_eq!(status, 200, "get_partition_id on node {i}: {body}");
        assert_success(&body);
        body["partition_id"].as_i64().unwrap_or_else(|| {
            panic!("get_partition_id on node {i}: no integer partition_id: {body}")
        })
    }

    /// GET /kv-store/get_all_partition_ids on node `i`.
    pub async fn all_partition_ids(&self, i: usize) -> Vec<i64> {
        let node = self.node(i);
        let reply = node.http.kv_store(&node.addr).all_partition_ids().await;
        let (status, body) = node.expect_reply("GET /kv-store/get_all_partition_ids", reply);
        assert_eq!(status, 200, "get_all_partition_ids on node {i}: {body}");
        assert_success(&body);
        body["partition_id_list"]
            .as_array()
            .unwrap_or_else(|| panic!("get_all_partition_ids on node {i}: no list: {body}"))
            .iter()
            .map(|v| {
                v.as_i64()
                    .unwrap_or_else(|| panic!("non-integer partition id {v} in {body}"))
            })
            .collect()
    }

    /// GET /kv-store/get_partition_members (form `partition_id`) on node `i`.
    pub async fn partition_members(&self, i: usize, partition_id: i64) -> Vec<String> {
        let node = self.node(i);
        let reply = node
            .http
            .kv_store(&node.addr)
            .partition_members(partition_id)
            .await;
        let (status, body) = node.expect_reply("GET /kv-store/get_partition_members", reply);
        assert_eq!(
            status, 200,
            "get_partition_members({partition_id}) on node {i}: {body}"
        );
        assert_success(&body);
        body["partition_members"]
            .as_array()
            .unwrap_or_else(|| panic!("get_partition_members on node {i}: no list: {body}"))
            .iter()
            .map(|v| {
                v.as_str()
                    .unwrap_or_else(|| panic!("non-string member {v} in {body}"))
                    .to_owned()
            })
            .collect()
    }

    /// PUTs fresh keys `<prefix>_<n>` through node `via` until each of the cluster's
    /// partitions owns at least `per_partition` of them; returns partition → keys
    /// (the value of each key is the key itself).
    pub async fn keys_by_partition(
        &self,
        via: usize,
        prefix: &str,
        per_partition: usize,
    ) -> BTreeMap<i64, Vec<String>> {
        let mut found: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        for n in 0..1000 {
            let enough = found.len() == self.partitions()
                && found.values().all(|keys| keys.len() >= per_partition);
            if enough {
                return found;
            }
            let key = format!("{prefix}_{n}");
            let (status, body) = self.put(via, &key, &key, "").await;
            assert_eq!(status, 201, "PUT new key {key} via node {via}: {body}");
            let p = body["partition_id"]
                .as_i64()
                .unwrap_or_else(|| panic!("PUT {key}: no integer partition_id: {body}"));
            found.entry(p).or_default().push(key);
        }
        panic!(
            "1000 keys did not cover all {} partitions with {per_partition} keys each: {found:?}",
            self.partitions()
        );
    }

    /// `PUT /kv-store/update_view?type=<kind>` with form `ip_port=<target>` on node `i`.
    /// A view change waits for every key to reach its new replicas, so the request gets
    /// [`VIEW_CHANGE_TIMEOUT`]. Transport failures are `Err`.
    pub async fn try_update_view(
        &self,
        i: usize,
        kind: &str,
        target: &str,
    ) -> Result<(u16, Value), String> {
        self.node(i)
            .try_update_view(kind, target, VIEW_CHANGE_TIMEOUT)
            .await
    }

    /// Like [`Cluster::try_update_view`], asserting a success reply, which it returns.
    pub async fn update_view(&self, i: usize, kind: &str, target: &str) -> Value {
        let (status, body) = self
            .try_update_view(i, kind, target)
            .await
            .unwrap_or_else(|e| panic!("update_view {kind} {target}: {e}"));
        assert_eq!(
            status, 200,
            "update_view {kind} {target} via node {i}: {body}"
        );
        assert_success(&body);
        body
    }

    /// `GET /api/v1/status` on node `i`.
    pub async fn status(&self, i: usize) -> Value {
        let node = self.node(i);
        let reply = node.http.v1(&node.addr).status().await;
        let (status, body) = node.expect_reply("GET /api/v1/status", reply);
        assert_eq!(status, 200, "status of node {i}: {body}");
        body
    }

    /// Node `i`'s view epoch and members (sorted), per its status; `None` when it is in
    /// no cluster.
    pub async fn view_of(&self, i: usize) -> Option<(u64, Vec<String>)> {
        let body = self.status(i).await;
        let view = body.get("view").filter(|v| !v.is_null())?;
        let epoch = view["epoch"]
            .as_u64()
            .unwrap_or_else(|| panic!("status of node {i}: no epoch: {body}"));
        let mut members: Vec<String> = view["members"]
            .as_array()
            .unwrap_or_else(|| panic!("status of node {i}: no members: {body}"))
            .iter()
            .map(|m| m.as_str().unwrap_or_default().to_owned())
            .collect();
        members.sort();
        Some((epoch, members))
    }

    /// Node indices whose address is in `members`.
    pub fn indices_of(&self, members: &[String]) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| members.iter().any(|m| m == self.addr(i)))
            .collect()
    }

    /// A client session that carries its causal payload from reply to request.
    pub fn session(&self, name: &str) -> Session<'_> {
        Session {
            cluster: self,
            name: name.to_owned(),
            token: String::new(),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            if let Some(mut child) = lock(&node.child).take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let failed = std::thread::panicking();
        if failed {
            for i in 0..self.nodes.len() {
                eprintln!("{}", self.log_tail(i));
            }
        }
        if failed || std::env::var_os("KVS_TEST_KEEP").is_some() {
            if let Some(tmp) = self.tmp.take() {
                eprintln!("cluster files kept in {}", tmp.keep().display());
            }
        }
    }
}

/// HTTP access to one node. Requests carry form bodies (also on GET, as the
/// dialect requires) and replies are parsed as JSON.
#[derive(Clone)]
pub struct NodeClient {
    http: Client,
    index: usize,
    addr: String,
}

impl NodeClient {
    /// The node's `ip:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends `method path` with a form body. Transport failures are `Err`; a response
    /// that is not JSON is a contract violation and panics.
    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        body: String,
    ) -> Result<(u16, Value), String> {
        self.try_request_within(method, path, body, REQUEST_TIMEOUT)
            .await
    }

    /// Like [`NodeClient::try_request`] with a given timeout for the whole exchange.
    pub async fn try_request_within(
        &self,
        method: Method,
        path: &str,
        body: String,
        timeout: Duration,
    ) -> Result<(u16, Value), String> {
        let reply = self
            .http
            .request(method.clone(), &self.addr, path)
            .form_encoded(body)
            .timeout(timeout)
            .send()
            .await;
        self.reply(&format!("{method} {path}"), reply)
    }

    /// The status and JSON body of `reply` to the request `what`. Transport failures are
    /// `Err`; a response that is not JSON is a contract violation and panics.
    fn reply(
        &self,
        what: &str,
        reply: Result<Response, ClientError>,
    ) -> Result<(u16, Value), String> {
        let (i, addr) = (self.index, &self.addr);
        let reply = reply.map_err(|e| format!("{what} to node {i} ({addr}): {e}"))?;
        let status = reply.status.as_u16();
        match reply.json() {
            Ok(v) => Ok((status, v)),
            Err(e) => {
                let excerpt: String = reply.text().chars().take(300).collect();
                panic!(
                    "{what} to node {i} ({addr}) answered {status} with a non-JSON body \
                     ({e}): {excerpt:?}"
                )
            }
        }
    }

    /// Like [`NodeClient::reply`], but a transport failure panics.
    fn expect_reply(&self, what: &str, reply: Result<Response, ClientError>) -> (u16, Value) {
        self.reply(what, reply)
            .unwrap_or_else(|e| panic!("request failed: {e}"))
    }

    /// Sends a request over a plain TCP connection, writing the body from another
    /// thread while reading, so a response sent before the body is complete (a server
    /// rejecting an oversize body early, as RFC 9110 allows) is still received. HTTP
    /// client libraries, `kvs::client` (hyper) included, may report a broken pipe
    /// instead in that case: this is the harness's one client outside `kvs::client`.
    pub async fn request_reading_early(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Value), String> {
        let (addr, what) = (
            self.addr.clone(),
            format!("{method} {path} to node {} ({})", self.index, self.addr),
        );
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let result = tokio::task::spawn_blocking(move || raw_exchange(&addr, head, body))
            .await
            .map_err(|e| format!("{what}: raw client thread failed: {e}"))?;
        let (status, text) = result.map_err(|e| format!("{what}: {e}"))?;
        match serde_json::from_str(&text) {
            Ok(v) => Ok((status, v)),
            Err(e) => {
                let excerpt: String = text.chars().take(300).collect();
                panic!("{what} answered {status} with a non-JSON body ({e}): {excerpt:?}")
            }
        }
    }

    /// `PUT /kv-store/update_view?type=<kind>` with form `ip_port=<target>`, waiting at
    /// most `timeout` (a view change answers once every key has moved).
    pub async fn try_update_view(
        &self,
        kind: &str,
        target: &str,
        timeout: Duration,
    ) -> Result<(u16, Value), String> {
        let reply = self
            .http
            .kv_store(&self.addr)
            .timeout(timeout)
            .update_view(kind, target)
            .await;
        self.reply(&format!("PUT /kv-store/update_view?type={kind}"), reply)
    }

    /// Like [`NodeClient::try_request`], but a transport failure panics.
    pub async fn request(&self, method: Method, path: &str, body: String) -> (u16, Value) {
        self.try_request(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("request failed: {e}"))
    }

    /// A request with a JSON body (`Value::Null`: no body), as the seed-002 dialect takes
    /// them.
    pub async fn json(&self, method: Method, path: &str, body: &Value) -> (u16, Value) {
        let call = self.http.request(method, &self.addr, path);
        let call = if body.is_null() {
            call
        } else {
            call.json(body)
        };
        let reply = call.send().await;
        self.expect_reply(&format!("request to node {}", self.index), reply)
    }

    /// GET /kv-store/<key> with the given causal payload.
    pub async fn get(&self, key: &str, causal_payload: &str) -> (u16, Value) {
        let reply = self
            .http
            .kv_store(&self.addr)
            .get(key, causal_payload)
            .await;
        self.expect_reply(&format!("GET /kv-store/{key}"), reply)
    }

    /// PUT /kv-store/<key> with `val` and the given causal payload.
    pub async fn put(&self, key: &str, val: &str, causal_payload: &str) -> (u16, Value) {
        let reply = self
            .http
            .kv_store(&self.addr)
            .put(key, val, causal_payload)
            .await;
        self.expect_reply(&format!("PUT /kv-store/{key}"), reply)
    }

    /// DELETE /kv-store/<key> with the given causal payload.
    pub async fn delete(&self, key: &str, causal_payload: &str) -> (u16, Value) {
        let reply = self
            .http
            .kv_store(&self.addr)
            .delete(key, causal_payload)
            .await;
        self.expect_reply(&format!("DELETE /kv-store/{key}"), reply)
    }
}

/// Concurrent clients used to load and verify keys.
pub const CLIENTS: usize = 8;

/// PUTs `keys` (key → value) through `via` (round-robin) with [`CLIENTS`] concurrent
/// clients, each PUT without a causal payload, and asserts every one is acknowledged.
pub async fn load(c: &Cluster, via: &[usize], keys: &BTreeMap<String, String>) {
    let items: Vec<(String, String)> = keys.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut tasks = Vec::new();
    for t in 0..CLIENTS {
        let nodes: Vec<NodeClient> = via.iter().map(|&i| c.node(i)).collect();
        let mine: Vec<(String, String)> = items.iter().skip(t).step_by(CLIENTS).cloned().collect();
        tasks.push(tokio::spawn(async move {
            for (n, (key, val)) in mine.iter().enumerate() {
                let node = &nodes[n % nodes.len()];
                let (status, body) = node.put(key, val, "").await;
                assert!(
                    status == 200 || status == 201,
                    "PUT {key} during loading answered {status}: {body}"
                );
            }
        }));
    }
    for t in tasks {
        t.await.expect("loader task");
    }
}

/// `n` keys `<prefix>_<i>` with values that name the key and a version.
pub fn keys(prefix: &str, n: usize) -> BTreeMap<String, String> {
    (0..n)
        .map(|i| (format!("{prefix}_{i}"), format!("{prefix}_{i}=v1")))
        .collect()
}

/// Reads every key of `expected` through the nodes `via` (key `j` through
/// `via[j % len]`), and a sample of `sample` keys through every node of `via`, all with
/// an empty causal payload, asserting 200 and the expected value.
pub async fn verify(
    c: &Cluster,
    via: &[usize],
    expected: &BTreeMap<String, String>,
    sample: usize,
) {
    let items: Vec<(usize, String, String)> = expected
        .iter()
        .enumerate()
        .flat_map(|(j, (k, v))| {
            let mut reads = vec![(via[j % via.len()], k.clone(), v.clone())];
            if j < sample {
                reads.extend(via.iter().map(|&i| (i, k.clone(), v.clone())));
            }
            reads
        })
        .collect();
    let mut tasks = Vec::new();
    for t in 0..CLIENTS {
        let clients: BTreeMap<usize, NodeClient> = via.iter().map(|&i| (i, c.node(i))).collect();
        let mine: Vec<(usize, String, String)> =
            items.iter().skip(t).step_by(CLIENTS).cloned().collect();
        tasks.push(tokio::spawn(async move {
            for (i, key, val) in mine {
                let (status, body) = clients[&i].get(&key, "").await;
                assert_eq!(status, 200, "GET {key} via node {i}: {body}");
                assert_eq!(value_of(&body), val, "GET {key} via node {i}: {body}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("verifier task");
    }
}

/// One HTTP/1.1 exchange on a fresh connection: the body is written by a second thread
/// while this one reads the response. Returns the status and the (de-chunked) body.
fn raw_exchange(addr: &str, head: String, body: Vec<u8>) -> Result<(u16, String), String> {
    use std::io::Read as _;
    use std::net::{Shutdown, TcpStream, ToSocketAddrs as _};

    let sock = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolve: {e}"))?
        .next()
        .ok_or("no address")?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
        .map_err(|e| format!("socket options: {e}"))?;
    let mut writer = stream
        .try_clone()
        .map_err(|e| format!("clone socket: {e}"))?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(head.as_bytes())?;
        for chunk in body.chunks(64 * 1024) {
            writer.write_all(chunk)?;
        }
        writer.flush()
    });
    let mut response = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let read_error = loop {
        match stream.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) => break Some(e),
        }
        if response_complete(&response) {
            break None;
        }
    };
    // Unblocks the sender if the server stopped reading.
    let _ = stream.shutdown(Shutdown::Both);
    let sent = sender.join();
    let header_end = find(&response, b"\r\n\r\n").ok_or_else(|| {
        format!(
            "no complete response (read error: {read_error:?}, body write: {sent:?}, \
             got {} bytes)",
            response.len()
        )
    })?;
    let head = String::from_utf8_lossy(&response[..header_end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let mut payload = response[header_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        payload = dechunk(&payload).ok_or("malformed chunked body")?;
    } else if let Some(len) = content_length(&head) {
        payload.truncate(len);
    }
    Ok((status, String::from_utf8_lossy(&payload).into_owned()))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

/// True once `response` holds the head and the whole Content-Length body.
fn response_complete(response: &[u8]) -> bool {
    let Some(end) = find(response, b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&response[..end]);
    matches!(content_length(&head), Some(len) if response.len() >= end + 4 + len)
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// A client: remembers the latest causal payload it received and sends it back.
pub struct Session<'c> {
    cluster: &'c Cluster,
    pub name: String,
    pub token: String,
}

impl Session<'_> {
    /// Starts from another client's token (as if it had been handed over).
    pub fn adopt(&mut self, token: &str) {
        self.token = token.to_owned();
    }

    fn absorb(&mut self, status: u16, body: &Value) {
        if (200..300).contains(&status) {
            self.token = body["causal_payload"]
                .as_str()
                .unwrap_or_else(|| {
                    panic!(
                        "{}: success reply without string causal_payload: {body}",
                        self.name
                    )
                })
                .to_owned();
        }
    }

    pub async fn put(&mut self, i: usize, key: &str, val: &str) -> (u16, Value) {
        let (status, body) = self.cluster.put(i, key, val, &self.token).await;
        self.absorb(status, &body);
        (status, body)
    }

    pub async fn get(&mut self, i: usize, key: &str) -> (u16, Value) {
        let (status, body) = self.cluster.get(i, key, &self.token).await;
        self.absorb(status, &body);
        (status, body)
    }

    pub async fn delete(&mut self, i: usize, key: &str) -> (u16, Value) {
        let (status, body) = self.cluster.node(i).delete(key, &self.token).await;
        self.absorb(status, &body);
        (status, body)
    }

    /// GETs `key` via node `i`, asserting 200, and returns the value.
    pub async fn read(&mut self, i: usize, key: &str) -> String {
        let (status, body) = self.get(i, key).await;
        assert_eq!(status, 200, "{}: GET {key} via node {i}: {body}", self.name);
        value_of(&body)
    }

    /// PUTs `key=val` via node `i`, asserting 200 or 201.
    pub async fn write(&mut self, i: usize, key: &str, val: &str) -> Value {
        let (status, body) = self.put(i, key, val).await;
        assert!(
            status == 200 || status == 201,
            "{}: PUT {key} via node {i} answered {status}: {body}",
            self.name
        );
        body
    }
}

/// Asserts the success envelope `{"result":"success","msg":"success",...}`.
pub fn assert_success(body: &Value) {
    assert_eq!(body["result"], "success", "not a success envelope: {body}");
    assert_eq!(body["msg"], "success", "not a success envelope: {body}");
}

/// Asserts the error envelope `{"result":"error","msg":"error","error":"<text>"}`.
pub fn assert_error(body: &Value) {
    assert_eq!(body["result"], "error", "not an error envelope: {body}");
    assert_eq!(body["msg"], "error", "not an error envelope: {body}");
    let text = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("error envelope without a string \"error\": {body}"));
    assert!(
        !text.is_empty(),
        "error envelope with an empty \"error\": {body}"
    );
}

/// The string `value` of a successful GET reply.
pub fn value_of(body: &Value) -> String {
    body["value"]
        .as_str()
        .unwrap_or_else(|| panic!("GET reply without a string value: {body}"))
        .to_owned()
}
