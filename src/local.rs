//! `kvs local`: a whole cluster on loopback addresses, for trying kvs out.
//!
//! Node addresses are `127.0.X.H:PORT` (X = `--subnet`, 0 by default; PORT 8080 by
//! default, like the seed's `10.0.0.x:8080`); all of 127.0.0.0/8 is loopback on Linux,
//! so no setup is needed. Each node is this same binary started as a child process with
//! the seed's environment (`K`, `VIEW`, `IPPORT`, `DATA_DIR`), logging to
//! `<data-dir>/<ip_port>.log`.
//!
//! While it runs it reads commands on standard input: `add` starts a new node (without
//! VIEW, as the seed adds nodes) and adds it with `update_view`; `remove <node>` removes
//! one and stops it; `status` prints every node's role. During a change it prints the
//! keys and bytes moved so far, polled from the coordinator's `/api/v1/status`.
//! The membership is kept in `<data-dir>/layout`, so a later run on the same directory
//! starts the same nodes (each comes back in the view it stored). Ctrl-C (or SIGTERM)
//! stops every node with SIGTERM, so each flushes and exits cleanly.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::client::{Client, ClientError};

/// How long a node may take to start answering.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long nodes get to exit after SIGTERM before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an `update_view` may take before `kvs local` stops waiting for it.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the progress of a change is polled.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(300);
/// How long a status query may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(clap::Args, Clone, Debug)]
pub struct LocalArgs {
    /// Number of nodes of a new cluster (default 4); an existing data directory keeps
    /// its own membership.
    #[arg(short, long)]
    pub nodes: Option<usize>,
    /// Replicas per partition.
    #[arg(short = 'k', long, default_value_t = 2)]
    pub k: usize,
    /// Port every node listens on.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Third octet of the nodes' addresses: 127.0.X.1, 127.0.X.2, ...
    #[arg(long, default_value_t = 0)]
    pub subnet: u8,
    /// Where node data and logs go.
    #[arg(long, default_value = "kvs-local")]
    pub data_dir: PathBuf,
    /// Keep data in memory only.
    #[arg(long)]
    pub memory: bool,
}

/// The cluster's membership, persisted in `<data-dir>/layout` (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Layout {
    k: usize,
    port: u16,
    subnet: u8,
    /// The VIEW the cluster was first started with (initial nodes get it as env).
    initial: Vec<String>,
    /// The current members, in the order they joined.
    nodes: Vec<String>,
}

impl Layout {
    fn new(args: &LocalArgs, n: usize) -> Self {
        let nodes: Vec<String> = (1..=n)
            .map(|h| addr_of(args.subnet, h, args.port))
            .collect();
        Self {
            k: args.k,
            port: args.port,
            subnet: args.subnet,
            initial: nodes.clone(),
            nodes,
        }
    }

    /// The lowest free address in the cluster's subnet.
    fn next_addr(&self) -> Option<String> {
        (1..=254)
            .map(|h| addr_of(self.subnet, h, self.port))
            .find(|a| !self.nodes.contains(a))
    }
}

fn addr_of(subnet: u8, host: usize, port: u16) -> String {
    format!("127.0.{subnet}.{host}:{port}")
}

/// A running node.
struct Proc {
    addr: String,
    child: Child,
}

/// Starts the cluster, serves commands on stdin and waits for Ctrl-C.
pub async fn run(args: LocalArgs) -> Result<(), String> {
    if args.k == 0 {
        return Err("-k must be at least 1".into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the kvs binary: {e}"))?;
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("creating {}: {e}", args.data_dir.display()))?;
    let mut layout = load_layout(&args)?;
    // The nodes inherit ADMIN_TOKEN from this process; membership changes need it.
    let client = Client::builder()
        .admin_token(std::env::var("ADMIN_TOKEN").ok())
        .build();
    let mut procs: Vec<Proc> = Vec::new();
    for addr in layout.nodes.clone() {
        match spawn(&exe, &args, &layout, &addr) {
            Ok(child) => procs.push(Proc { addr, child }),
            Err(e) => {
                stop(&mut procs).await;
                return Err(e);
            }
        }
    }
    println!(
        "starting {} nodes, K = {} ...",
        layout.nodes.len(),
        layout.k
    );
    for p in procs.iter_mut() {
        if let Err(e) = wait_ready(&client, &p.addr, &mut p.child).await {
            let log = log_path(&args.data_dir, &p.addr);
            stop(&mut procs).await;
            return Err(format!("node did not start: {e} (see {})", log.display()));
        }
    }
    print_roles(&client, &layout.nodes).await;
    println!(
        "\ntry:  curl -X PUT http://{0}/kv-store/hello -d val=world\n      curl -X GET http://{0}/kv-store/hello\n\
         commands: add | remove <node> | status | help   (Ctrl-C stops the cluster)\n\
         data and logs in {1}/",
        layout.nodes[0],
        args.data_dir.display()
    );
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let outcome = loop {
        tokio::select! {
            _ = crate::node::shutdown_signal() => break Ok(()),
            (addr, status) = exited(&mut procs) => {
                break Err(format!("node {addr} exited unexpectedly ({status})"));
            }
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(line)) => {
                    if let Err(e) = command(&client, &exe, &args, &mut layout, &mut procs, line.trim()).await {
                        println!("error: {e}");
                    }
                }
                // No (more) input, e.g. started in the background: keep serving.
                _ => stdin_open = false,
            },
        }
    };
    println!("stopping the cluster ...");
    stop(&mut procs).await;
    outcome
}

/// Resolves when one of the nodes exits; never when there are none.
async fn exited(procs: &mut [Proc]) -> (String, std::process::ExitStatus) {
    loop {
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                return (p.addr.clone(), status);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reads the layout of an existing data directory or makes one for a new cluster.
fn load_layout(args: &LocalArgs) -> Result<Layout, String> {
    let path = args.data_dir.join("layout");
    let existing = match std::fs::read_to_string(&path) {
        Ok(text) => Some(parse_layout(&text, args)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let layout = match existing {
        Some(l) => {
            // Nodes keep the view they stored; a different K or address plan would mix
            // clusters that do not agree.
            if l.k != args.k || l.port != args.port || l.subnet != args.subnet {
                return Err(format!(
                    "{} holds a cluster with K={} on 127.0.{}.x:{}; this run asks for K={} on 127.0.{}.x:{}. \
                     Use another --data-dir, or remove that one to start afresh.",
                    args.data_dir.display(),
                    l.k,
                    l.subnet,
                    l.port,
                    args.k,
                    args.subnet,
                    args.port
                ));
            }
            if let Some(n) = args.nodes.filter(|n| *n != l.nodes.len()) {
                return Err(format!(
                    "{} holds a cluster of {} nodes; --nodes {n} asks for another. Leave out --nodes \
                     (use `add`/`remove` to change it), or use another --data-dir.",
                    args.data_dir.display(),
                    l.nodes.len()
                ));
            }
            l
        }
        None => {
            let n = args.nodes.unwrap_or(4);
            if n == 0 || n > 254 {
                return Err("--nodes must be between 1 and 254".into());
            }
            if n < args.k {
                return Err(format!("--nodes ({n}) must be at least -k ({})", args.k));
            }
            Layout::new(args, n)
        }
    };
    if !args.memory {
        save_layout(&args.data_dir, &layout)?;
    }
    Ok(layout)
}

/// Parses a layout file; also the first version's one-line `K=.. VIEW=..` form.
fn parse_layout(text: &str, args: &LocalArgs) -> Result<Layout, String> {
    if let Some(rest) = text.trim().strip_prefix("K=") {
        let (k, view) = rest.split_once(" VIEW=").ok_or("unreadable layout file")?;
        let k: usize = k.parse().map_err(|_| "unreadable layout file")?;
        let nodes: Vec<String> = view.split(',').map(str::to_string).collect();
        return Ok(Layout {
            k,
            port: args.port,
            subnet: args.subnet,
            initial: nodes.clone(),
            nodes,
        });
    }
    serde_json::from_str(text).map_err(|e| format!("unreadable layout file: {e}"))
}

fn save_layout(dir: &Path, layout: &Layout) -> Result<(), String> {
    let path = dir.join("layout");
    let tmp = dir.join("layout.tmp");
    let text = serde_json::to_string_pretty(layout).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, text + "\n")
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

fn node_dir(data_dir: &Path, addr: &str) -> PathBuf {
    data_dir.join(addr.replace(':', "_"))
}

fn log_path(data_dir: &Path, addr: &str) -> PathBuf {
    data_dir.join(format!("{}.log", addr.replace(':', "_")))
}

/// Starts the node `addr`: with the first VIEW if it is one of the first nodes, else
/// without (a node to be added, or one that stored the view it was added into).
fn spawn(exe: &Path, args: &LocalArgs, layout: &Layout, addr: &str) -> Result<Child, String> {
    let log_path = log_path(&args.data_dir, addr);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
    let log_err = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.env("K", layout.k.to_string())
        .env("IPPORT", addr)
        .env("DATA_DIR", node_dir(&args.data_dir, addr))
        .env_remove("VIEW")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .kill_on_drop(true);
    if layout.initial.iter().any(|a| a == addr) {
        cmd.env("VIEW", layout.initial.join(","));
    }
    if args.memory {
        cmd.arg("serve").arg("--memory");
    }
    cmd.spawn()
        .map_err(|e| format!("starting node {addr}: {e}"))
}

/// One command typed on standard input.
async fn command(
    client: &Client,
    exe: &Path,
    args: &LocalArgs,
    layout: &mut Layout,
    procs: &mut Vec<Proc>,
    line: &str,
) -> Result<(), String> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (None, _) => Ok(()),
        (Some("help"), _) => {
            println!(
                "add              start a new node and add it to the cluster\n\
                 remove <node>    remove a node (its address, or its last number: `remove 3`)\n\
                 status           every node's role and key count"
            );
            Ok(())
        }
        (Some("status"), _) => {
            print_roles(client, &layout.nodes).await;
            Ok(())
        }
        (Some("add"), None) => add(client, exe, args, layout, procs).await,
        (Some("remove"), Some(which)) => remove(client, args, layout, procs, which).await,
        _ => Err(format!("unknown command {line:?}; try `help`")),
    }
}

async fn add(
    client: &Client,
    exe: &Path,
    args: &LocalArgs,
    layout: &mut Layout,
    procs: &mut Vec<Proc>,
) -> Result<(), String> {
    let addr = layout
        .next_addr()
        .ok_or("no free address left in the subnet")?;
    // A node that was removed earlier from this address starts afresh.
    let _ = std::fs::remove_dir_all(node_dir(&args.data_dir, &addr));
    let mut child = spawn(exe, args, layout, &addr)?;
    if let Err(e) = wait_ready(client, &addr, &mut child).await {
        let _ = child.kill().await;
        return Err(format!("{addr} did not start: {e}"));
    }
    procs.push(Proc {
        addr: addr.clone(),
        child,
    });
    let via = layout.nodes[0].clone();
    println!("adding {addr} (coordinated by {via}) ...");
    match change(client, &via, "add", &addr).await {
        Ok(reply) => {
            layout.nodes.push(addr.clone());
            if !args.memory {
                save_layout(&args.data_dir, layout)?;
            }
            let role = match reply["partition_id"].as_i64() {
                Some(p) if p >= 0 => format!("a replica of partition {p}"),
                _ => "a proxy".to_string(),
            };
            println!(
                "added {addr} as {role}; {} partitions",
                reply["number_of_partitions"]
            );
            print_roles(client, &layout.nodes).await;
            Ok(())
        }
        Err((status, e)) => {
            // Refused (4xx): nothing changed, the new node goes. Otherwise the change
            // may still complete in the background, so the node stays.
            if (400..500).contains(&status) {
                if let Some(mut p) = procs.pop() {
                    stop_one(&mut p).await;
                }
            }
            Err(e)
        }
    }
}

async fn remove(
    client: &Client,
    args: &LocalArgs,
    layout: &mut Layout,
    procs: &mut Vec<Proc>,
    which: &str,
) -> Result<(), String> {
    let addr = match which.parse::<usize>() {
        Ok(h) => addr_of(layout.subnet, h, layout.port),
        Err(_) => which.to_string(),
    };
    if !layout.nodes.contains(&addr) {
        return Err(format!("{addr} is not a node of this cluster"));
    }
    let via = layout
        .nodes
        .iter()
        .find(|n| **n != addr)
        .cloned()
        .ok_or("cannot remove the last node")?;
    println!("removing {addr} (coordinated by {via}) ...");
    let reply = change(client, &via, "remove", &addr)
        .await
        .map_err(|(_, e)| e)?;
    layout.nodes.retain(|n| *n != addr);
    if !args.memory {
        save_layout(&args.data_dir, layout)?;
    }
    if let Some(i) = procs.iter().position(|p| p.addr == addr) {
        let mut p = procs.remove(i);
        stop_one(&mut p).await;
    }
    let _ = std::fs::remove_dir_all(node_dir(&args.data_dir, &addr));
    println!(
        "removed {addr}; {} partitions",
        reply["number_of_partitions"]
    );
    print_roles(client, &layout.nodes).await;
    Ok(())
}

/// Sends `update_view` to `via` and prints the coordinator's progress until it answers.
async fn change(
    client: &Client,
    via: &str,
    kind: &str,
    addr: &str,
) -> Result<Value, (u16, String)> {
    let request = client
        .kv_store(via)
        .timeout(CHANGE_TIMEOUT)
        .update_view(kind, addr);
    tokio::pin!(request);
    let started = Instant::now();
    let mut shown = false;
    let result = loop {
        tokio::select! {
            r = &mut request => break r,
            _ = tokio::time::sleep(PROGRESS_INTERVAL) => {
                if let Ok(status) = status_of(client, via, STATUS_TIMEOUT).await {
                    let p = &status["view_change"];
                    if p["change"].as_str() == Some(&format!("{kind} {addr}")) {
                        print!("\r  {:<10} {:>9} keys  {:>9.1} MB moved  {:>6.1} s ",
                            p["phase"].as_str().unwrap_or("?"),
                            p["keys_moved"].as_u64().unwrap_or(0),
                            p["bytes_moved"].as_u64().unwrap_or(0) as f64 / 1e6,
                            started.elapsed().as_secs_f64());
                        use std::io::Write as _;
                        let _ = std::io::stdout().flush();
                        shown = true;
                    }
                }
            }
        }
    };
    // The final figures, from the coordinator.
    if let Ok(status) = status_of(client, via, STATUS_TIMEOUT).await {
        let p = &status["view_change"];
        if p["change"].as_str() == Some(&format!("{kind} {addr}")) {
            if shown {
                println!();
            }
            let secs = started.elapsed().as_secs_f64();
            let mb = p["bytes_moved"].as_u64().unwrap_or(0) as f64 / 1e6;
            println!(
                "  {} keys ({mb:.1} MB) changed partition, {} copies written, in {secs:.2} s ({:.1} MB/s)",
                p["keys_moved"].as_u64().unwrap_or(0),
                p["keys_copied"].as_u64().unwrap_or(0),
                if secs > 0.0 { mb / secs } else { 0.0 }
            );
        }
    }
    let reply = result.and_then(|r| Ok((r.status.as_u16(), r.json::<Value>()?)));
    match reply {
        Ok((200, reply)) => Ok(reply),
        Ok((status, reply)) => Err((
            status,
            format!(
                "update_view answered {status}: {}",
                reply["error"].as_str().unwrap_or("(no message)")
            ),
        )),
        Err(e) => Err((0, format!("update_view failed: {e}"))),
    }
}

/// `GET /api/v1/status` of `addr`, as JSON (whatever the status code).
async fn status_of(client: &Client, addr: &str, timeout: Duration) -> Result<Value, ClientError> {
    client.v1(addr).timeout(timeout).status().await?.json()
}

/// Prints every node's role, partition and key count. Right after a change, nodes that
/// handed slots over still count those keys until they are deleted in the background.
async fn print_roles(client: &Client, nodes: &[String]) {
    println!(
        "{:<22} {:<20} keys (incl. handed-over ones not yet deleted)",
        "node", "role"
    );
    for addr in nodes {
        match status_of(client, addr, STATUS_TIMEOUT).await {
            Ok(s) => {
                let role = match (s["role"].as_str(), s["partition_id"].as_i64()) {
                    (Some("replica"), Some(p)) => format!("partition {p}"),
                    (Some(r), _) => r.to_string(),
                    _ => "?".into(),
                };
                println!("{addr:<22} {role:<20} {}", s["keys"]);
            }
            Err(e) => println!("{addr:<22} unreachable ({e})"),
        }
    }
}

/// SIGTERM to every node, then SIGKILL to those still running after [`STOP_TIMEOUT`].
async fn stop(procs: &mut [Proc]) {
    for p in procs.iter() {
        term(&p.child);
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for p in procs.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, p.child.wait()).await.is_err() {
            let _ = p.child.kill().await;
        }
    }
}

async fn stop_one(p: &mut Proc) {
    stop(std::slice::from_mut(p)).await;
}

fn term(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we spawned and own; no memory is involved.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
}

/// Polls the node's status endpoint until it answers that the node is ready (a member
/// holding its cluster's key, or a node in no cluster).
async fn wait_ready(client: &Client, addr: &str, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}"));
        }
        if let Ok(status) = status_of(client, addr, PROBE_TIMEOUT).await {
            if status["ready"] != Value::Bool(false) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no answer within {READY_TIMEOUT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> LocalArgs {
        LocalArgs {
            nodes: None,
            k: 2,
            port: 8080,
            subnet: 3,
            data_dir: PathBuf::from("x"),
            memory: false,
        }
    }

    #[test]
    fn layouts_round_trip_and_the_first_format_is_read() {
        let mut l = Layout::new(&args(), 3);
        assert_eq!(l.next_addr().as_deref(), Some("127.0.3.4:8080"));
        l.nodes.retain(|n| n != "127.0.3.2:8080");
        assert_eq!(l.next_addr().as_deref(), Some("127.0.3.2:8080"));
        let text = serde_json::to_string(&l).expect("encode");
        assert_eq!(parse_layout(&text, &args()), Ok(l));
        let old = parse_layout("K=2 VIEW=127.0.3.1:8080,127.0.3.2:8080\n", &args())
            .expect("first format");
        assert_eq!(old.nodes.len(), 2);
        assert_eq!(old.initial, old.nodes);
        assert!(parse_layout("nonsense", &args()).is_err());
    }
}
