//! The `kvs` binary: one node (configured like the seeds, by environment variables) or,
//! with `kvs local`, a whole cluster on loopback addresses.
//!
//! A node takes the environment of any of the seed families: `IPPORT`/`VIEW`/`K` (seeds
//! 000/001), `SOCKET_ADDRESS`/`VIEW`/`SHARD_COUNT` (seed 002) and `ADDRESS`/`VIEW`/
//! `REPL_FACTOR` (seed 003); see [`seed_aliases`]. It logs to standard output (what
//! `docker logs` shows), one line per event.
//!
//! Where a node listens ([`listen_address`]): a node whose address is a loopback one
//! shares its host with other nodes (`kvs local` puts one on each 127.0.0.x at the same
//! port), so it binds exactly its address; any other address means the node has its
//! host (a container, a network namespace, a machine) to itself, and it listens on
//! every interface at its port, because clients and peers may reach it through another
//! interface than its address (a container connected to a second network: Docker
//! forwards its published port to its address on one of the two, not necessarily its
//! `ADDRESS`; NAT; two NICs). `LISTEN` (`--listen`) overrides either. Its calls to peers leave from its
//! address only in the loopback case (so a local cluster's traffic is attributable);
//! otherwise from whatever interface routes to the peer. Peers recognise each other by
//! the cluster key, never by source address (`kvs::auth`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::EnvFilter;

use kvs::node::{JoinPlan, Node, NodeConfig};
use kvs::placement::{parse_addr, parse_view_list, View};
use kvs::quorum::{Level, Levels};
use kvs::rpc::{HttpTransport, StreamTransport, Transport};
use kvs::storage::{MemoryStore, RedbStore, StorageError, Store};

/// When `1`, calls to peers use one HTTP request each instead of streams (for A/B
/// benchmarks of `rpc::stream`).
const RPC_HTTP_ONLY_ENV: &str = "KVS_RPC_HTTP_ONLY";

#[derive(Parser)]
#[command(
    version,
    about = "kvs: a sharded, replicated, causally consistent key-value store"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Start a local cluster of N nodes on 127.0.0.x loopback addresses.
    Local(kvs::local::LocalArgs),
    /// Run the deterministic simulation of a cluster under faults and view changes.
    Sim(kvs::cli::sim::SimArgs),
    /// Load a running cluster and print throughput and latency percentiles.
    Bench(kvs::bench::BenchArgs),
    #[command(flatten)]
    Tool(kvs::cli::Tool),
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// This node's ip:port, as its peers and clients call it.
    #[arg(long, env = "IPPORT")]
    ipport: Option<String>,
    /// Where to listen (ip:port). Default: IPPORT itself when it is a loopback address
    /// (nodes sharing a host), else every interface at IPPORT's port.
    #[arg(long, env = "LISTEN")]
    listen: Option<String>,
    /// Comma-separated ip:port of every node, the same on all nodes. Leave it out for a
    /// node that will be added to a running cluster with update_view.
    #[arg(long, env = "VIEW")]
    view: Option<String>,
    /// Replicas per partition (seeds 000/001: floor(N/K) partitions of K replicas, the
    /// rest forward).
    #[arg(short = 'k', long, env = "K")]
    k: Option<usize>,
    /// Shards (seed 002): the VIEW's nodes dealt round-robin into this many shards of at
    /// least two. Without it and without K, nodes started together form one shard of
    /// every node, and a node started later joins the running cluster in no shard.
    #[arg(long, env = "SHARD_COUNT", conflicts_with = "k")]
    shard_count: Option<usize>,
    /// Replicas a read merges when the request names no `r=`: a number, `quorum` (a
    /// majority of the key's partition) or `all`. With R + W above the replica count,
    /// every read sees every write acknowledged before it began.
    #[arg(long = "r", env = "R", default_value = "1")]
    r: Level,
    /// Replicas that must hold a write before it is acknowledged when the request names
    /// no `w=`: a number, `quorum` or `all`.
    #[arg(long = "w", env = "W", default_value = "1")]
    w: Level,
    /// Seconds a delete's tombstone is kept, at least, once every replica of its
    /// partition has it; then it is dropped (a key written and deleted over and over,
    /// or many keys deleted, take no space for long).
    #[arg(long, env = "KVS_TOMBSTONE_HORIZON", default_value_t = 60)]
    tombstone_horizon: u64,
    /// Replace a member that has been dead (no heartbeat answered) for this many seconds
    /// by a spare node (a proxy, a node in no shard), bringing its partition back to its
    /// replica count. Off by default.
    #[arg(long, env = "KVS_AUTO_REPLACE_AFTER", value_parser = clap::value_parser!(u64).range(1..))]
    auto_replace_after: Option<u64>,
    /// Directory for this node's data (default ./kvs-data/<ipport>).
    #[arg(long, env = "DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Keep data in memory only: nothing survives a restart.
    #[arg(long)]
    memory: bool,
    /// Size of the storage engine's page cache, in MiB.
    #[arg(long, env = "KVS_CACHE_MB", default_value_t = 256)]
    cache_mb: usize,
    /// Shared secret that node-to-node calls must carry (on top of the cluster key every
    /// cluster makes for itself when it forms).
    #[arg(long, env = "CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// Token that membership changes (update_view) must carry, as
    /// `Authorization: Bearer <token>`; set the same on every node.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// If the data directory holds damaged data (a damaged write-ahead log, a corrupt
    /// record), move it aside (to <dir>.damaged-<unix seconds>; nothing is deleted) and
    /// start empty, so this replica refills from its peers. A directory that opens, or
    /// fails for another reason (a full disk), is left alone. With K=1 there is no peer
    /// to refill from.
    #[arg(
        long,
        env = "KVS_REBUILD",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    rebuild: bool,
    /// Seed 003's way (set when the address came from `ADDRESS`): a node with no view
    /// forms the VIEW's first view only if no VIEW node is in a cluster; otherwise it
    /// waits for the view change that adds it (`node::join`).
    #[arg(skip)]
    waits_for_view_change: bool,
}

/// Used when CLUSTER_SECRET is not set, so the seeds' `docker run` lines work unchanged.
/// It is public: what keeps non-members out then is the cluster key (`kvs::auth`).
const DEFAULT_SECRET: &str = "kvs-default-cluster-secret";
/// jemalloc, not the system allocator. redb's page cache allocates and frees 4 KiB pages
/// from every thread that reads or writes (the blocking pool, the writer), and glibc's
/// per-thread arenas kept the freed pages of a busy node: a 3-node K=3 cluster loaded
/// with a million keys held 1.1 GiB per node for a 256 MiB cache and a heap that
/// heaptrack measured at 282 MB at its peak. jemalloc returns such pages on a timer
/// (BENCHMARKS.md, "Memory at a million keys").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read by jemalloc before `main` (`_RJEM_MALLOC_CONF` in the
/// environment still overrides them):
///
/// * `oversize_threshold:0`: no dedicated arena for allocations of 8 MiB and more, whose
///   memory jemalloc returns to the kernel as soon as it is freed. A state-transfer page
///   (4 MiB of values) is encoded, sent, read and logged through buffers that grow past
///   8 MiB, and every page then faulted in and zeroed its buffers afresh: two fifths of a
///   rebalance's CPU time (perf) went to clearing new pages.
/// * `dirty_decay_ms:30000`: freed pages are returned over 30 s instead of 10, so a burst
///   (a load, then a rebalance) reuses what the previous one freed.
///
/// `bench/rebalance.py --scenarios k1` (1 GiB of 64 KiB values): 51-150 MB/s with the
/// defaults, 158-214 MB/s with these (BENCHMARKS.md, "Rebalance").
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 42] = b"oversize_threshold:0,dirty_decay_ms:30000\0";

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A node logs to stdout (containers, `kvs local`'s log files); the tools keep stdout
    // for their output.
    let node = matches!(cli.command, None | Some(Command::Serve(_)));
    let (writer, ansi) = if node {
        (
            BoxMakeWriter::new(std::io::stdout),
            std::io::stdout().is_terminal(),
        )
    } else {
        (
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
        )
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(writer)
        .with_ansi(ansi)
        .init();
    if let Some(Command::Sim(args)) = &cli.command {
        return kvs::cli::sim::run(args);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvs: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Tool(tool)) = cli.command {
        return runtime.block_on(kvs::cli::run(tool));
    }
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Local(args)) => kvs::local::run(args).await,
            Some(Command::Serve(args)) => serve(args).await,
            Some(Command::Sim(_)) => unreachable!("handled before the runtime starts"),
            Some(Command::Bench(args)) => bench(args).await,
            Some(Command::Tool(_)) => unreachable!("handled before"),
            None => serve(cli.serve).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvs: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `kvs bench`: runs the load, prints the table, writes the JSON if asked.
async fn bench(args: kvs::bench::BenchArgs) -> Result<(), String> {
    let report = kvs::bench::run(&args).await?;
    print!("{}", kvs::bench::render(&report));
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if report.get.ok + report.put.ok == 0 {
        return Err("no operation succeeded".into());
    }
    Ok(())
}

/// Fills what the 000/001 variables leave unset from the other seed families':
/// `SOCKET_ADDRESS` (seed 002) or `ADDRESS` (seed 003) for `IPPORT`, `REPL_FACTOR` for
/// `K`. A seed-003 node (`ADDRESS`) has K = 1 when `REPL_FACTOR` is absent (seed 003's
/// own store is unreplicated) and waits for a view change when its VIEW's cluster runs.
fn seed_aliases(
    mut args: ServeArgs,
    env: impl Fn(&str) -> Option<String>,
) -> Result<ServeArgs, String> {
    if args.ipport.is_none() {
        args.ipport = env("SOCKET_ADDRESS");
    }
    if args.ipport.is_none() {
        args.ipport = env("ADDRESS");
        args.waits_for_view_change = args.ipport.is_some();
    }
    if args.k.is_none() {
        if let Some(r) = env("REPL_FACTOR") {
            let k = r
                .trim()
                .parse()
                .map_err(|_| format!("REPL_FACTOR {r:?} is not a number"))?;
            args.k = Some(k);
        }
    }
    if args.waits_for_view_change && args.k.is_none() && args.shard_count.is_none() {
        args.k = Some(1);
    }
    Ok(args)
}

/// Where a node listens: see the module doc.
fn listen_address(listen: Option<&str>, addr: &str) -> Result<std::net::SocketAddr, String> {
    if let Some(text) = listen {
        return text
            .trim()
            .parse()
            .map_err(|_| format!("LISTEN {text:?} is not an ip:port"));
    }
    let own: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an ip:port"))?;
    Ok(if own.ip().is_loopback() {
        own
    } else if own.is_ipv4() {
        std::net::SocketAddr::from(([0, 0, 0, 0], own.port()))
    } else {
        std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, own.port()))
    })
}

/// Opens the node's store in `dir`; with `rebuild`, a directory that refuses to open is
/// moved aside and the node starts empty (see `--rebuild`).
fn open_store(
    dir: &std::path::Path,
    cache: usize,
    rebuild: bool,
    k: Option<usize>,
) -> Result<RedbStore, String> {
    match RedbStore::open_with_cache(dir, cache) {
        Ok(store) => {
            if rebuild {
                tracing::warn!(
                    "--rebuild: the data directory {} opens; it is kept (the flag only acts on \
                     damaged data)",
                    dir.display()
                );
            }
            Ok(store)
        }
        Err(e @ (StorageError::Damaged(_) | StorageError::Corrupt { .. })) if rebuild => {
            tracing::warn!("--rebuild: data directory {}: {e}", dir.display());
            move_aside(dir, k)?;
            RedbStore::open_with_cache(dir, cache)
                .map_err(|e| format!("data directory {}: {e}", dir.display()))
        }
        Err(e @ (StorageError::Damaged(_) | StorageError::Corrupt { .. })) => Err(format!(
            "data directory {}: {e}. If this node's partition has other replicas (K > 1), \
             start it with --rebuild (KVS_REBUILD=1): its data directory is moved aside, \
             kept, and the node refills from its peers",
            dir.display()
        )),
        Err(e) => Err(format!("data directory {}: {e}", dir.display())),
    }
}

/// `--rebuild`: moves the data directory aside so the node starts empty.
fn move_aside(dir: &std::path::Path, k: Option<usize>) -> Result<(), String> {
    let secs = kvs::node::now_ms() / 1000;
    match kvs::storage::move_aside(dir, secs) {
        Ok(Some(to)) => tracing::warn!(
            "--rebuild: moved the data directory {} aside to {}; starting empty, the replica \
             refills from its peers",
            dir.display(),
            to.display()
        ),
        Ok(None) => tracing::warn!(
            "--rebuild: there is no data directory {}; starting empty",
            dir.display()
        ),
        Err(e) => {
            return Err(format!(
                "--rebuild: cannot move the data directory {} aside: {e}",
                dir.display()
            ))
        }
    }
    if k == Some(1) {
        tracing::warn!(
            "--rebuild with K=1: this node's partition has no other replica, so nothing \
             refills it; its keys are only in the directory moved aside"
        );
    }
    Ok(())
}

/// The view this node starts from when its data directory holds none, by the seed family
/// its variables name: K mode (`K`/`REPL_FACTOR`), shards (`SHARD_COUNT`), or, with a
/// `VIEW` and neither, the addresses to join or form a one-shard cluster at
/// (`node::join`); seed 003's nodes form their VIEW's K-mode view the same way, but wait
/// to be added by a view change where seed 002's announce themselves. No `VIEW`: a node
/// that waits to be added.
type FirstView = (Option<View>, Option<JoinPlan>);

fn first_view(args: &ServeArgs, addr: &str) -> Result<FirstView, String> {
    let Some(text) = args.view.as_deref() else {
        return Ok((None, None));
    };
    let members = parse_view_list(text).map_err(|e| format!("VIEW: {e}"))?;
    if !members.iter().any(|m| m == addr) {
        tracing::warn!(%addr, "this node's address is not in VIEW: it will forward requests and own no data");
    }
    Ok(match (args.k, args.shard_count) {
        (Some(k), _) if args.waits_for_view_change => {
            let formed = View::bootstrap(members.clone(), k).map_err(|e| e.to_string())?;
            (
                None,
                Some(JoinPlan {
                    addresses: members,
                    formed,
                    announce: false,
                }),
            )
        }
        (Some(k), _) => (
            Some(View::bootstrap(members, k).map_err(|e| e.to_string())?),
            None,
        ),
        (None, Some(n)) => (
            Some(View::bootstrap_shards(members, n).map_err(|e| format!("SHARD_COUNT: {e}"))?),
            None,
        ),
        (None, None) => {
            let formed = View::bootstrap_shards(members.clone(), 1).map_err(|e| e.to_string())?;
            (
                None,
                Some(JoinPlan {
                    addresses: members,
                    formed,
                    announce: true,
                }),
            )
        }
    })
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    // First, so nothing is recorded into the void; here, as the recorder is one per process.
    kvs::http::metrics::install()?;
    let args = seed_aliases(args, |name| std::env::var(name).ok())?;
    let addr = parse_addr(
        args.ipport
            .as_deref()
            .ok_or("IPPORT is not set (this node's ip:port, e.g. 10.0.0.21:8080; SOCKET_ADDRESS or ADDRESS also work)")?,
    )
    .map_err(|e| format!("IPPORT: {e}"))?;
    if args.k == Some(0) {
        return Err("K must be at least 1".into());
    }
    let (env_view, join) = first_view(&args, &addr)?;
    let joining = join.is_some();
    let store: Arc<dyn Store> = if args.memory {
        Arc::new(MemoryStore::new())
    } else {
        let dir = args
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("kvs-data").join(addr.replace([':', '[', ']'], "_")));
        Arc::new(open_store(
            &dir,
            args.cache_mb.saturating_mul(1024 * 1024),
            args.rebuild,
            args.k,
        )?)
    };
    let secret = args.cluster_secret.unwrap_or_else(|| {
        tracing::info!(
            "CLUSTER_SECRET is not set: node-to-node calls are authenticated by the cluster key alone"
        );
        DEFAULT_SECRET.to_string()
    });
    let admin_token = args.admin_token.filter(|t| !t.is_empty());
    if admin_token.is_none() {
        tracing::warn!(
            "ADMIN_TOKEN is not set: anyone who can reach this node can change the cluster's membership (update_view)"
        );
    }
    let listen = listen_address(args.listen.as_deref(), &addr)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    // Calls leave from the node's own address only where nodes share a host.
    let local_ip = addr
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.ip())
        .filter(|ip| ip.is_loopback());
    let http = HttpTransport::new(secret.clone(), local_ip);
    // Streams to peers (`rpc::stream`) unless turned off, for A/B measurements.
    let transport: Arc<dyn Transport> = if std::env::var(RPC_HTTP_ONLY_ENV).is_ok_and(|v| v == "1")
    {
        tracing::warn!("{RPC_HTTP_ONLY_ENV}=1: calls to peers use HTTP only (no streams)");
        Arc::new(http)
    } else {
        Arc::new(StreamTransport::new(http))
    };
    let cfg = NodeConfig {
        addr: addr.clone(),
        env_view,
        k: args.k,
        secret,
        admin_token,
        join,
        levels: Levels {
            read: args.r,
            write: args.w,
        },
        tombstone_horizon: std::time::Duration::from_secs(args.tombstone_horizon),
        auto_replace_after: args.auto_replace_after.map(std::time::Duration::from_secs),
    };
    let node = Node::start(cfg, store, transport).map_err(|e| e.to_string())?;
    match node.view() {
        Some(view) => tracing::info!(
            %addr,
            %listen,
            role = ?node.role(),
            partitions = view.partition_count(),
            epoch = view.epoch,
            "kvs node serving"
        ),
        None if joining => tracing::info!(
            %addr,
            %listen,
            "kvs node serving, in no cluster yet: finding its cluster among the VIEW's nodes (or forming it with them)"
        ),
        None => tracing::info!(
            %addr,
            %listen,
            "kvs node serving, in no cluster yet: add it with PUT /kv-store/update_view?type=add&ip_port={addr} (or PUT /key-value-store-view) on a member"
        ),
    }
    let served = kvs::http::serve(listener, node.clone(), kvs::node::shutdown_signal()).await;
    tracing::info!("shutting down");
    node.shutdown().await;
    served.map_err(|e| format!("server error: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs {
            ipport: None,
            view: None,
            k: None,
            shard_count: None,
            r: Level::ONE,
            w: Level::ONE,
            tombstone_horizon: 60,
            auto_replace_after: None,
            data_dir: None,
            memory: false,
            cache_mb: 256,
            cluster_secret: None,
            admin_token: None,
            rebuild: false,
            listen: None,
            waits_for_view_change: false,
        }
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn every_seed_family_configures_a_node() {
        let a = seed_aliases(
            args(),
            env(&[("ADDRESS", "10.0.0.2:13800"), ("REPL_FACTOR", "2")]),
        )
        .expect("seed 003");
        assert_eq!(
            (a.ipport.as_deref(), a.k, a.waits_for_view_change),
            (Some("10.0.0.2:13800"), Some(2), true)
        );
        // Seed 003 without REPL_FACTOR: unreplicated, N shards of one; it forms its
        // VIEW's view unless it finds a cluster that will add it.
        let mut three = args();
        three.view = Some("10.0.0.2:13800,10.0.0.3:13800".into());
        let a = seed_aliases(three, env(&[("ADDRESS", "10.0.0.2:13800")])).expect("seed 003");
        assert_eq!(a.k, Some(1));
        let (view, join) = first_view(&a, "10.0.0.2:13800").expect("valid");
        assert!(view.is_none());
        let plan = join.expect("a join plan");
        assert!(!plan.announce);
        assert_eq!(plan.formed.partition_count(), 2);
        let mut six = args();
        six.view = Some(
            "10.0.0.1:8085,10.0.0.2:8085,10.0.0.3:8085,10.0.0.4:8085,10.0.0.5:8085,10.0.0.6:8085"
                .into(),
        );
        let a = seed_aliases(six.clone(), env(&[("SOCKET_ADDRESS", "10.0.0.1:8085")]))
            .expect("seed 002");
        assert_eq!((a.ipport.as_deref(), a.k), (Some("10.0.0.1:8085"), None));
        let addr = "10.0.0.1:8085";
        let mut two = a.clone();
        two.shard_count = Some(2);
        let (view, join) = first_view(&two, addr).expect("two shards");
        let view = view.expect("a first view");
        assert!(join.is_none());
        assert_eq!(view.partition_count(), 2);
        assert_eq!(view.replicas_at(0).map(<[String]>::len), Some(3));
        let (view, join) = first_view(&a, addr).expect("no SHARD_COUNT");
        assert!(
            view.is_none(),
            "a node without SHARD_COUNT finds its cluster first"
        );
        let plan = join.expect("join");
        assert!(plan.announce);
        assert_eq!(plan.addresses.len(), 6);
        assert_eq!(plan.formed.partition_count(), 1);
        for bad in [7, 0] {
            let mut wrong = a.clone();
            wrong.shard_count = Some(bad);
            assert!(first_view(&wrong, addr).is_err(), "SHARD_COUNT {bad}");
        }
        // IPPORT and K win over the aliases.
        let mut given = args();
        given.ipport = Some("10.0.0.9:8080".into());
        given.k = Some(1);
        let a = seed_aliases(given, env(&[("ADDRESS", "x"), ("REPL_FACTOR", "3")])).expect("001");
        assert_eq!((a.ipport.as_deref(), a.k), (Some("10.0.0.9:8080"), Some(1)));
        assert!(seed_aliases(args(), env(&[("REPL_FACTOR", "two")])).is_err());
    }

    #[test]
    fn nodes_alone_on_their_host_listen_on_every_interface() {
        let at =
            |listen: Option<&str>, addr: &str| listen_address(listen, addr).map(|a| a.to_string());
        assert_eq!(at(None, "127.0.0.3:8080"), Ok("127.0.0.3:8080".into()));
        assert_eq!(at(None, "10.10.0.4:13800"), Ok("0.0.0.0:13800".into()));
        assert_eq!(at(None, "[fd00::4]:13800"), Ok("[::]:13800".into()));
        assert_eq!(
            at(Some("10.10.0.4:13800"), "10.10.0.4:13800"),
            Ok("10.10.0.4:13800".into())
        );
        assert!(at(Some("nonsense"), "10.10.0.4:13800").is_err());
    }
}
