//! The administration tools' output: `status`, and `add` / `remove` / `reshard`, which
//! show the change's progress (keys and bytes moved, polled from the coordinator) while
//! they wait for it.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{print_json, session, Conn, ToolError};
use crate::client::Method;

/// How long `add`, `remove` and `reshard` wait for the change (moving data can take a
/// while).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(3_600);
/// How often a change's progress is polled.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

pub(super) fn print_status(status: &Value, partitions: &Value) {
    println!(
        "node {}  epoch {}  {}",
        status["node"].as_str().unwrap_or("?"),
        status["epoch"],
        if status["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "not ready"
        }
    );
    for p in partitions["partitions"].as_array().into_iter().flatten() {
        let keys = p["keys"]
            .as_u64()
            .map_or_else(|| "?".to_string(), |k| k.to_string());
        let replicas: Vec<&str> = p["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "  partition {:<3} {:>10} keys  {}/{} live  {}",
            p["partition_id"],
            keys,
            p["live_replicas"],
            replicas.len(),
            replicas.join(", ")
        );
    }
    if let Some(t) = status["transition"].as_object() {
        println!(
            "  changing: {} (epoch {} to {})",
            t["change"].as_str().unwrap_or("?"),
            t["from_epoch"],
            t["to_epoch"]
        );
    }
}

/// An admin change, with a progress bar of the keys and bytes moved while it runs
/// (polled from the node that coordinates it, the one asked).
pub(super) async fn change(
    conn: &Conn,
    method: Method,
    path: String,
    body: Option<Value>,
) -> Result<(), ToolError> {
    let mut s = session(&Conn {
        timeout: CHANGE_TIMEOUT.as_secs_f64(),
        ..conn.clone()
    })?;
    let mut poll = session(conn)?;
    let bar = (!conn.json).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar
    });
    let started = Instant::now();
    let request = s.call(method, &path, body);
    tokio::pin!(request);
    let result = loop {
        tokio::select! {
            r = &mut request => break r,
            () = tokio::time::sleep(PROGRESS_INTERVAL) => {
                if let (Some(bar), Ok(status)) = (&bar, poll.call(Method::GET, "/api/v1/status", None).await) {
                    let p = &status["view_change"];
                    let secs = started.elapsed().as_secs_f64().max(1e-3);
                    let mb = p["bytes_moved"].as_u64().unwrap_or(0) as f64 / 1e6;
                    bar.set_message(format!(
                        "{}: {} keys, {mb:.1} MB moved, {:.1} MB/s",
                        p["phase"].as_str().unwrap_or("changing"),
                        p["keys_moved"].as_u64().unwrap_or(0),
                        mb / secs
                    ));
                    bar.tick();
                }
            }
        }
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let view = result?;
    if conn.json {
        print_json(&view);
    } else {
        println!(
            "epoch {}: {} members, {} partitions ({:.1} s)",
            view["epoch"],
            view["members"].as_array().map_or(0, Vec::len),
            view["partitions"].as_array().map_or(0, Vec::len),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
