//! `kvs local`: a whole cluster on loopback addresses, for trying kvs out.
//!
//! Node `i` (from 0) listens on `127.0.0.{i+1}:PORT` (8080 by default, like the seed's
//! `10.0.0.x:8080`); all of 127.0.0.0/8 is loopback on Linux, so no setup is needed. Each
//! node is this same binary started as a child process with the seed's environment
//! (`K`, `VIEW`, `IPPORT`, `DATA_DIR`), logging to `<data-dir>/<ip_port>.log`. Ctrl-C
//! (or SIGTERM) stops every node with SIGTERM, so each flushes and exits cleanly.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// How long a node may take to start answering.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long nodes get to exit after SIGTERM before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(clap::Args, Clone, Debug)]
pub struct LocalArgs {
    /// Number of nodes.
    #[arg(short, long, default_value_t = 4)]
    pub nodes: usize,
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

fn addr_of(args: &LocalArgs, i: usize) -> String {
    format!("127.0.{}.{}:{}", args.subnet, i + 1, args.port)
}

/// Starts the cluster and waits for Ctrl-C.
pub async fn run(args: LocalArgs) -> Result<(), String> {
    if args.nodes == 0 || args.nodes > 254 {
        return Err("--nodes must be between 1 and 254".into());
    }
    if args.nodes < args.k || args.k == 0 {
        return Err(format!(
            "--nodes ({}) must be at least -k ({}) and -k at least 1",
            args.nodes, args.k
        ));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the kvs binary: {e}"))?;
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("creating {}: {e}", args.data_dir.display()))?;
    let addrs: Vec<String> = (0..args.nodes).map(|i| addr_of(&args, i)).collect();
    let view = addrs.join(",");
    check_layout(&args, &view)?;
    let mut children: Vec<Child> = Vec::new();
    for addr in &addrs {
        let name = addr.replace(':', "_");
        let log_path = args.data_dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&exe);
        cmd.env("K", args.k.to_string())
            .env("VIEW", &view)
            .env("IPPORT", addr)
            .env("DATA_DIR", args.data_dir.join(&name))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true);
        if args.memory {
            cmd.arg("serve").arg("--memory");
        }
        match cmd.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                stop(&mut children).await;
                return Err(format!("starting node {addr}: {e}"));
            }
        }
    }
    println!("starting {} nodes, K = {} ...", args.nodes, args.k);
    let mut roles = Vec::new();
    for (addr, child) in addrs.iter().zip(children.iter_mut()) {
        match wait_ready(addr, child).await {
            Ok(partition) => roles.push(partition),
            Err(e) => {
                stop(&mut children).await;
                return Err(format!(
                    "node {addr} did not start: {e} (see {}/{}.log)",
                    args.data_dir.display(),
                    addr.replace(':', "_")
                ));
            }
        }
    }
    println!("{:<22} role", "node");
    for (addr, partition) in addrs.iter().zip(&roles) {
        let role = if *partition < 0 {
            "proxy".to_string()
        } else {
            format!("partition {partition}")
        };
        println!("{addr:<22} {role}");
    }
    println!(
        "\ntry:  curl -X PUT http://{0}/kv-store/hello -d val=world\n      curl -X GET http://{0}/kv-store/hello\n\
         data and logs in {1}/; Ctrl-C stops the cluster.",
        addrs[0],
        args.data_dir.display()
    );
    let exited = async {
        loop {
            for (i, child) in children.iter_mut().enumerate() {
                if let Ok(Some(status)) = child.try_wait() {
                    return (i, status);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let outcome = tokio::select! {
        _ = crate::server::shutdown_signal() => Ok(()),
        (i, status) = exited => Err(format!("node {} exited unexpectedly ({status})", addrs[i])),
    };
    println!("stopping the cluster ...");
    stop(&mut children).await;
    outcome
}

/// Nodes keep the view they were first started with; refuse to start a different layout
/// over data written by another, which would mix clusters that do not agree.
fn check_layout(args: &LocalArgs, view: &str) -> Result<(), String> {
    if args.memory {
        return Ok(());
    }
    let path = args.data_dir.join("layout");
    let layout = format!("K={} VIEW={view}\n", args.k);
    match std::fs::read_to_string(&path) {
        Ok(existing) if existing == layout => Ok(()),
        Ok(existing) => Err(format!(
            "{} holds a cluster started as `{}`; this run asks for `{}`. \
             Use another --data-dir, or remove that one to start afresh.",
            args.data_dir.display(),
            existing.trim(),
            layout.trim()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&path, layout).map_err(|e| format!("writing {}: {e}", path.display()))
        }
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

/// SIGTERM to every node, then SIGKILL to those still running after [`STOP_TIMEOUT`].
async fn stop(children: &mut [Child]) {
    for child in children.iter() {
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) with a pid we spawned and own; no memory is involved.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for child in children.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }
}

/// Polls the node until it answers `get_partition_id`; returns that id.
async fn wait_ready(addr: &str, child: &mut Child) -> Result<i64, String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}"));
        }
        if let Ok(id) = partition_id(addr).await {
            return Ok(id);
        }
        if Instant::now() > deadline {
            return Err(format!("no answer within {READY_TIMEOUT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A minimal HTTP/1.0 GET of `/kv-store/get_partition_id`.
async fn partition_id(addr: &str) -> Result<i64, String> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timeout".to_string())?
            .map_err(|e| e.to_string())?;
    stream
        .write_all(
            format!("GET /kv-store/get_partition_id HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut buf))
        .await
        .map_err(|_| "read timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split("\r\n\r\n").nth(1).ok_or("no body")?;
    let json: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    json["partition_id"]
        .as_i64()
        .ok_or_else(|| "no partition_id".into())
}
