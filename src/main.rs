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
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// This node's ip:port; it binds exactly this address.
    #[arg(long, env = "IPPORT")]
    ipport: Option<String>,
    /// Comma-separated ip:port of every node, the same on all nodes.
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
    /// Shared secret that authenticates node-to-node traffic.
    #[arg(long, env = "CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
}

/// Used when CLUSTER_SECRET is not set, so the seeds' `docker run` lines work unchanged.
const DEFAULT_SECRET: &str = "kvs-default-cluster-secret";
const META_REPLICA_ID: &str = "replica_id";
const META_VIEW: &str = "view";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
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

/// Loads (or creates) this data directory's replica id and view.
fn identity(store: &dyn Store, env_view: Option<View>) -> Result<(u64, View), String> {
    let read = store.read().map_err(|e| e.to_string())?;
    let stored_id = read.meta(META_REPLICA_ID).map_err(|e| e.to_string())?;
    let stored_view = read.meta(META_VIEW).map_err(|e| e.to_string())?;
    drop(read);
    let id = match stored_id {
        Some(bytes) => {
            postcard::from_bytes(&bytes).map_err(|e| format!("corrupt replica id: {e}"))?
        }
        None => rand::random::<u64>(),
    };
    let view = match (stored_view, env_view) {
        (Some(bytes), env) => {
            let stored: View =
                postcard::from_bytes(&bytes).map_err(|e| format!("corrupt stored view: {e}"))?;
            if env
                .as_ref()
                .is_some_and(|v| v.members != stored.members || v.k != stored.k)
            {
                tracing::warn!(
                    "VIEW/K differ from the view stored in the data directory; using the stored view (epoch {})",
                    stored.epoch
                );
            }
            stored
        }
        (None, Some(view)) => view,
        (None, None) => {
            return Err("VIEW is not set and the data directory holds no view: \
                 set VIEW (and K) or point DATA_DIR at an existing node's data"
                .into())
        }
    };
    let mut txn = store.write().map_err(|e| e.to_string())?;
    txn.set_meta(
        META_REPLICA_ID,
        &postcard::to_stdvec(&id).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    txn.set_meta(
        META_VIEW,
        &postcard::to_stdvec(&view).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    txn.commit().map_err(|e| e.to_string())?;
    Ok((id, view))
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
    let store: Arc<dyn Store> = if args.memory {
        Arc::new(MemoryStore::new())
    } else {
        let dir = args
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("kvs-data").join(addr.replace([':', '[', ']'], "_")));
        Arc::new(
            RedbStore::open(&dir).map_err(|e| format!("data directory {}: {e}", dir.display()))?,
        )
    };
    let (replica_id, view) = identity(&*store, env_view)?;
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
        view,
        replica_id,
        secret,
    };
    let (node, workers) = Node::start(cfg, store, transport).map_err(|e| e.to_string())?;
    tracing::info!(
        %addr,
        role = ?node.role(),
        partitions = node.view().partition_count(),
        epoch = node.view().epoch,
        replica_id = format!("{replica_id:016x}"),
        "kvs node serving"
    );
    let served = kvs::server::serve(listener, node, kvs::server::shutdown_signal()).await;
    tracing::info!("shutting down");
    workers.stop().await;
    served.map_err(|e| format!("server error: {e}"))
}
