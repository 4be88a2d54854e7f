//! The `kvs` binary: one node (configured like the seeds, by environment variables) or,
//! with `kvs local`, a whole cluster on loopback addresses.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use kvs::placement::{parse_addr, parse_view_list, View};
use kvs::rpc::HttpTransport;
use kvs::server::{Node, NodeConfig};
use kvs::storage::{MemoryStore, RedbStore, Store};

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
    /// Run the deterministic simulation of a partition's replicas under faults.
    Sim(SimArgs),
}

#[derive(Args, Clone)]
struct SimArgs {
    /// First seed to run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How many consecutive seeds to run, from --seed.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Replicas of the simulated partition (K, at least 2).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(2..=9))]
    replicas: u64,
    /// Concurrent client sessions.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
    /// Simulated milliseconds of faults and load per seed.
    #[arg(long, default_value_t = 30_000)]
    duration_ms: u64,
    /// Print every event of each run (use with one seed).
    #[arg(long)]
    trace: bool,
    /// Only check the checker: plant known bugs and show which seed catches each.
    #[arg(long)]
    self_test: bool,
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// This node's ip:port; it binds exactly this address.
    #[arg(long, env = "IPPORT")]
    ipport: Option<String>,
    /// Comma-separated ip:port of every node, the same on all nodes. Leave it out for a
    /// node that will be added to a running cluster with update_view.
    #[arg(long, env = "VIEW")]
    view: Option<String>,
    /// Replicas per partition.
    #[arg(short = 'k', long, env = "K")]
    k: Option<usize>,
    /// Directory for this node's data (default ./kvs-data/<ipport>).
    #[arg(long, env = "DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Keep data in memory only: nothing survives a restart.
    #[arg(long)]
    memory: bool,
    /// Size of the storage engine's page cache, in MiB.
    #[arg(long, env = "KVS_CACHE_MB", default_value_t = 256)]
    cache_mb: usize,
    /// Shared secret that authenticates node-to-node traffic.
    #[arg(long, env = "CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
}

/// Used when CLUSTER_SECRET is not set, so the seeds' `docker run` lines work unchanged.
const DEFAULT_SECRET: &str = "kvs-default-cluster-secret";
fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Some(Command::Sim(args)) = &cli.command {
        return simulate(args);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvs: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Local(args)) => kvs::local::run(args).await,
            Some(Command::Serve(args)) => serve(args).await,
            Some(Command::Sim(_)) => unreachable!("handled before the runtime starts"),
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

/// `kvs sim`: runs the seeds, prints one line per failing seed (every seed with
/// --trace) and the totals; fails if any seed found a problem.
fn simulate(args: &SimArgs) -> ExitCode {
    if args.self_test {
        let mut missed = false;
        for (bug, caught) in kvs::sim::self_test(args.seeds.max(10)) {
            match caught {
                Some(seed) => println!("planted {bug:?}: caught by seed {seed}"),
                None => {
                    println!("planted {bug:?}: MISSED");
                    missed = true;
                }
            }
        }
        return if missed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    let mut failed = Vec::new();
    let mut convergence: Vec<u64> = Vec::new();
    let (mut ops, mut faults, mut transfers, mut interrupted) = (0, 0, 0, 0);
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        let cfg = kvs::sim::Config {
            seed,
            replicas: args.replicas as usize,
            clients: args.clients,
            keys: args.keys as usize,
            duration_ms: args.duration_ms,
            trace: args.trace,
            bug: None,
        };
        let report = kvs::sim::run(&cfg);
        for line in &report.trace {
            println!("{line}");
        }
        if args.trace || !report.ok() {
            println!("{}", kvs::sim::summary(&report));
        }
        for f in &report.failures {
            println!("  {f}");
        }
        ops += report.writes + report.deletes + report.reads;
        faults += report.faults.len();
        transfers += report.transfers;
        interrupted += report.interrupted;
        convergence.extend(&report.convergence_ms);
        if !report.ok() {
            failed.push(seed);
        }
    }
    convergence.sort_unstable();
    let pct = |p: usize| {
        convergence
            .get((convergence.len() * p / 100).min(convergence.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{} seeds from {}: {ops} client operations, {faults} faults, {transfers} state transfers; \
         convergence after {} heals (simulated ms): p50 {} p99 {} max {} ({interrupted} heals cut short by the next fault)",
        args.seeds,
        args.seed,
        convergence.len(),
        pct(50),
        pct(99),
        convergence.last().copied().unwrap_or(0),
    );
    if failed.is_empty() {
        println!("no lost writes, no causal anomalies, no divergence");
        ExitCode::SUCCESS
    } else {
        println!(
            "FAILED seeds: {failed:?}; replay one with: kvs sim --seed {} --trace",
            failed[0]
        );
        ExitCode::FAILURE
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let addr = parse_addr(
        args.ipport
            .as_deref()
            .ok_or("IPPORT is not set (this node's ip:port, e.g. 10.0.0.21:8080)")?,
    )
    .map_err(|e| format!("IPPORT: {e}"))?;
    let env_view = match args.view.as_deref() {
        Some(text) => {
            let k = args.k.ok_or("K is not set (replicas per partition)")?;
            let members = parse_view_list(text).map_err(|e| format!("VIEW: {e}"))?;
            Some(View::bootstrap(members, k).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    if args.k == Some(0) {
        return Err("K must be at least 1".into());
    }
    let store: Arc<dyn Store> = if args.memory {
        Arc::new(MemoryStore::new())
    } else {
        let dir = args
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("kvs-data").join(addr.replace([':', '[', ']'], "_")));
        Arc::new(
            RedbStore::open_with_cache(&dir, args.cache_mb.saturating_mul(1024 * 1024))
                .map_err(|e| format!("data directory {}: {e}", dir.display()))?,
        )
    };
    let secret = args.cluster_secret.unwrap_or_else(|| {
        tracing::warn!("CLUSTER_SECRET is not set: using the built-in default secret");
        DEFAULT_SECRET.to_string()
    });
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local_ip = addr.parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
    let transport = Arc::new(HttpTransport::new(secret.clone(), local_ip));
    let cfg = NodeConfig {
        addr: addr.clone(),
        env_view,
        k: args.k,
        secret,
    };
    let node = Node::start(cfg, store, transport).map_err(|e| e.to_string())?;
    match node.view() {
        Some(view) => tracing::info!(
            %addr,
            role = ?node.role(),
            partitions = view.partition_count(),
            epoch = view.epoch,
            "kvs node serving"
        ),
        None => tracing::info!(
            %addr,
            "kvs node serving, in no cluster yet: add it with PUT /kv-store/update_view?type=add&ip_port={addr} on a member"
        ),
    }
    let served = kvs::server::serve(listener, node.clone(), kvs::server::shutdown_signal()).await;
    tracing::info!("shutting down");
    node.shutdown().await;
    served.map_err(|e| format!("server error: {e}"))
}
