//! The command-line tools on the `kvs` binary: data (`get`, `put`, `delete`, `ls`,
//! `load`) and administration (`status`, `members`, `add`, `remove`, `reshard`), all
//! through the own API with a [`Session`] (each key request straight to a replica of
//! its partition).
//!
//! Output is for people by default and JSON with `--json` (one document on stdout). A
//! value `get` prints is written as its bytes. Exit codes say what went wrong, so
//! scripts can tell: see [`exit_code`].

mod admin;
mod load;
pub mod sim;

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use crate::client::session::{ApiError, Read, Session, WriteOptions};
use crate::client::{Client, Method};
use admin::{change, print_status};
use load::load;

/// Where the cluster is and how to answer.
#[derive(Clone, Debug, clap::Args)]
pub struct Conn {
    /// Nodes of the cluster to ask first (comma-separated ip:port).
    #[arg(long, env = "KVS_CLUSTER", default_value = "127.0.0.1:8080")]
    pub cluster: String,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// The cluster's admin token (for add, remove, reshard).
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
}

/// The tools.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Tool {
    /// Print a key's value (every concurrent value, if it has several).
    Get {
        key: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a key's value: the argument, else --file, else standard input.
    Put {
        key: String,
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
        /// Replace the values of the read that gave this context (`get --json`); without
        /// it the value is added beside any concurrent one.
        #[arg(long)]
        context: Option<String>,
        /// Fail (exit 5) if the key changed since the context was read.
        #[arg(long, requires = "context")]
        if_unchanged: bool,
        /// Fail (exit 5) if the key has a value.
        #[arg(long, conflicts_with = "if_unchanged")]
        if_absent: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a key (with --context: only the values of that read).
    Delete {
        key: String,
        #[arg(long)]
        context: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// List keys, all pages (in the cluster's storage order).
    Ls {
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Stop after this many keys.
        #[arg(long)]
        limit: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write every `key<TAB>value` line of FILE (- for standard input), with a progress bar.
    Load {
        file: PathBuf,
        /// Requests in flight.
        #[arg(short, long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=512))]
        concurrency: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// The cluster's view, partitions with their key counts and health, and any change.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Every member, its role and what the failure detector believes of it.
    Members {
        #[command(flatten)]
        conn: Conn,
    },
    /// Add a running, blank node to the cluster (to a partition in shard-count mode).
    Add {
        addr: String,
        #[arg(long)]
        partition: Option<u32>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove a node from the cluster (its keys move to the others first).
    Remove {
        addr: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Deal the members into this many partitions (shard-count mode).
    Reshard {
        partitions: u32,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Runs a tool; what it printed is on stdout/stderr, the exit code says how it went.
pub async fn run(tool: Tool) -> ExitCode {
    match dispatch(tool).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvs: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Why a tool failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{0}")]
    Api(#[from] ApiError),
    /// The command line or an input file is wrong.
    #[error("{0}")]
    Input(String),
    /// The key does not exist.
    #[error("{0}")]
    NotFound(String),
}

/// 0 success; 1 other failures; 2 bad input (also clap's usage errors); 3 not found;
/// 4 the cluster is unavailable (no node answered, or it answered 503); 5 a conflict
/// (a condition that failed, too many siblings, a membership change refused).
pub fn exit_code(e: &ToolError) -> u8 {
    match e {
        ToolError::Input(_) => 2,
        ToolError::NotFound(_) => 3,
        ToolError::Api(ApiError::Transport(_)) => 4,
        ToolError::Api(ApiError::Answer { status, .. }) => match status {
            400 | 413 => 2,
            401 => 2,
            404 => 3,
            503 => 4,
            409 | 412 => 5,
            _ => 1,
        },
    }
}

pub(crate) fn session(conn: &Conn) -> Result<Session, ToolError> {
    let seeds: Vec<String> = conn
        .cluster
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if seeds.is_empty() {
        return Err(ToolError::Input("--cluster names no node".into()));
    }
    if !(conn.timeout > 0.0 && conn.timeout < 1e6) {
        return Err(ToolError::Input(
            "--timeout must be a positive number".into(),
        ));
    }
    let http = Client::builder()
        .timeout(Duration::from_secs_f64(conn.timeout))
        .admin_token(conn.admin_token.clone())
        .build();
    Ok(Session::direct(http, seeds))
}

pub(crate) fn print_json(value: &Value) {
    println!("{value}");
}

async fn dispatch(tool: Tool) -> Result<(), ToolError> {
    match tool {
        Tool::Get { key, conn } => {
            let read = session(&conn)?.get(&key).await?;
            if conn.json {
                print_json(&read_json(&key, &read));
            } else {
                print_read(&read)?;
            }
            if read.siblings.is_empty() {
                return Err(ToolError::NotFound(format!("key {key:?} does not exist")));
            }
            Ok(())
        }
        Tool::Put {
            key,
            value,
            file,
            context,
            if_unchanged,
            if_absent,
            conn,
        } => {
            let value = match (value, file) {
                (Some(v), _) => v.into_bytes(),
                (None, Some(path)) => std::fs::read(&path)
                    .map_err(|e| ToolError::Input(format!("{}: {e}", path.display())))?,
                (None, None) => {
                    let mut bytes = Vec::new();
                    std::io::stdin()
                        .take(crate::node::MAX_VALUE_BYTES as u64 + 1)
                        .read_to_end(&mut bytes)
                        .map_err(|e| ToolError::Input(format!("standard input: {e}")))?;
                    bytes
                }
            };
            let condition = match (if_unchanged, if_absent) {
                (true, _) => Some("unchanged"),
                (_, true) => Some("absent"),
                _ => None,
            };
            let options = WriteOptions {
                context: context.as_deref(),
                condition,
            };
            let created = session(&conn)?.put(&key, &value, options).await?;
            if conn.json {
                print_json(&json!({"key": key, "created": created}));
            } else {
                println!("{} {key}", if created { "created" } else { "updated" });
            }
            Ok(())
        }
        Tool::Delete { key, context, conn } => {
            let options = WriteOptions {
                context: context.as_deref(),
                condition: None,
            };
            let deleted = session(&conn)?.delete(&key, options).await?;
            if conn.json {
                print_json(&json!({"key": key, "deleted": deleted}));
            } else if deleted {
                println!("deleted {key}");
            }
            if !deleted {
                return Err(ToolError::NotFound(format!("key {key:?} does not exist")));
            }
            Ok(())
        }
        Tool::Ls {
            prefix,
            limit,
            conn,
        } => list(&conn, &prefix, limit.unwrap_or(u64::MAX)).await,
        Tool::Load {
            file,
            concurrency,
            conn,
        } => load(&conn, &file, concurrency).await,
        Tool::Status { conn } => {
            let mut s = session(&conn)?;
            let status = s.call(Method::GET, "/api/v1/status", None).await?;
            let partitions = s.call(Method::GET, "/api/v1/partitions", None).await?;
            if conn.json {
                print_json(&json!({"node": status, "partitions": partitions["partitions"]}));
            } else {
                print_status(&status, &partitions);
            }
            Ok(())
        }
        Tool::Members { conn } => {
            let members = session(&conn)?
                .call(Method::GET, "/api/v1/members", None)
                .await?;
            if conn.json {
                print_json(&members);
            } else {
                println!("epoch {}", members["epoch"]);
                for m in members["members"].as_array().into_iter().flatten() {
                    let place = match m["partition_id"].as_u64() {
                        Some(p) => format!("replica of partition {p}"),
                        None => m["role"].as_str().unwrap_or("?").to_string(),
                    };
                    println!(
                        "  {:<22} {:<26} {}",
                        m["addr"].as_str().unwrap_or("?"),
                        place,
                        m["health"].as_str().unwrap_or("?")
                    );
                }
            }
            Ok(())
        }
        Tool::Add {
            addr,
            partition,
            conn,
        } => {
            let mut body = json!({ "addr": addr });
            if let Some(p) = partition {
                body["partition"] = json!(p);
            }
            change(&conn, Method::POST, "/api/v1/members".into(), Some(body)).await
        }
        Tool::Remove { addr, conn } => {
            let path = format!("/api/v1/members/{addr}");
            change(&conn, Method::DELETE, path, None).await
        }
        Tool::Reshard { partitions, conn } => {
            let body = json!({ "partitions": partitions });
            change(&conn, Method::POST, "/api/v1/reshard".into(), Some(body)).await
        }
    }
}

fn read_json(key: &str, read: &Read) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let siblings: Vec<Value> = read
        .siblings
        .iter()
        .map(|s| {
            let mut v = json!({"version": s.version, "timestamp_ms": s.timestamp_ms});
            match std::str::from_utf8(&s.value) {
                Ok(text) => v["value"] = json!(text),
                Err(_) => v["value_base64"] = json!(b64.encode(&s.value)),
            }
            v
        })
        .collect();
    json!({"key": key, "siblings": siblings, "context": read.context})
}

/// One value: its bytes as they are. Several: each under a header line, then the
/// context that resolves them.
fn print_read(read: &Read) -> Result<(), ToolError> {
    let mut out = std::io::stdout().lock();
    let write = |out: &mut std::io::StdoutLock, bytes: &[u8]| {
        out.write_all(bytes)
            .map_err(|e| ToolError::Input(format!("standard output: {e}")))
    };
    match read.siblings.as_slice() {
        [] => {}
        [one] => write(&mut out, &one.value)?,
        many => {
            for s in many {
                write(
                    &mut out,
                    format!(
                        "--- version {} (written at {} ms)\n",
                        s.version, s.timestamp_ms
                    )
                    .as_bytes(),
                )?;
                write(&mut out, &s.value)?;
                write(&mut out, b"\n")?;
            }
            write(
                &mut out,
                format!(
                    "--- {} concurrent values; to resolve them: kvs put KEY VALUE --context {}\n",
                    many.len(),
                    read.context
                )
                .as_bytes(),
            )?;
        }
    }
    let _ = out.flush();
    Ok(())
}

async fn list(conn: &Conn, prefix: &str, limit: u64) -> Result<(), ToolError> {
    let mut s = session(conn)?;
    let mut cursor: Option<String> = None;
    let mut shown = 0u64;
    let mut all = Vec::new();
    loop {
        let page = u32::try_from(limit.saturating_sub(shown).min(1_000)).unwrap_or(1_000);
        let (keys, next) = s.list(prefix, cursor.as_deref(), page.max(1)).await?;
        for key in keys
            .into_iter()
            .take(usize::try_from(limit - shown).unwrap_or(usize::MAX))
        {
            shown += 1;
            if conn.json {
                all.push(key);
            } else {
                println!("{key}");
            }
        }
        match next {
            Some(next) if shown < limit => cursor = Some(next),
            _ => break,
        }
    }
    if conn.json {
        print_json(&json!({ "keys": all }));
    }
    Ok(())
}
