//! `kvs load FILE`: every `key<TAB>value` line written through a few sessions in
//! parallel, fed from a bounded queue, with a progress bar of bytes, keys and MB/s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tokio::io::AsyncBufReadExt;

use super::{print_json, session, Conn, ToolError};
use crate::client::session::WriteOptions;

/// Lines of a `load` file in flight at once, per worker.
const LOAD_QUEUE: usize = 256;
/// Longest line of a `load` file (a key, a tab and the largest value, base64'd).
const MAX_LOAD_LINE: usize = 3 * crate::node::MAX_VALUE_BYTES + 2048;

/// `kvs load`: `concurrency` sessions take lines from a bounded queue.
pub(super) async fn load(
    conn: &Conn,
    file: &std::path::Path,
    concurrency: u64,
) -> Result<(), ToolError> {
    let input: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if file.as_os_str() == "-" {
        Box::new(tokio::io::stdin())
    } else {
        Box::new(
            tokio::fs::File::open(file)
                .await
                .map_err(|e| ToolError::Input(format!("{}: {e}", file.display())))?,
        )
    };
    let total_bytes = std::fs::metadata(file).map(|m| m.len()).ok();
    let bar = indicatif::ProgressBar::new(total_bytes.unwrap_or(0));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // A bounded queue the workers take turns receiving from (a line is tiny next to
    // the request it becomes, so the lock is no bottleneck).
    let (tx, rx) =
        tokio::sync::mpsc::channel::<(String, Vec<u8>, u64)>(LOAD_QUEUE * concurrency as usize);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let (keys, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (rx, keys, bytes) = (rx.clone(), keys.clone(), bytes.clone());
        let mut s = session(conn)?;
        workers.spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some((key, value, size)) = next else {
                    break;
                };
                s.put(&key, &value, WriteOptions::default())
                    .await
                    .map_err(|e| format!("{key}: {e}"))?;
                keys.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(size, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        });
    }
    drop(rx);
    let started = Instant::now();
    let mut lines = tokio::io::BufReader::new(input).lines();
    let mut number = 0u64;
    let mut failed: Option<ToolError> = None;
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                failed = Some(ToolError::Input(format!("{}: {e}", file.display())));
                break;
            }
        };
        number += 1;
        if line.len() > MAX_LOAD_LINE {
            failed = Some(ToolError::Input(format!("line {number} is too long")));
            break;
        }
        let Some((key, value)) = line.split_once('\t') else {
            failed = Some(ToolError::Input(format!(
                "line {number}: expected key<TAB>value"
            )));
            break;
        };
        let size = line.len() as u64 + 1;
        let item: (String, Vec<u8>, u64) = (key.to_string(), value.as_bytes().to_vec(), size);
        if tx.send(item).await.is_err() {
            break; // every worker stopped: their error says why
        }
        let (k, b) = (keys.load(Ordering::Relaxed), bytes.load(Ordering::Relaxed));
        if number % 64 == 0 {
            bar.set_position(b);
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            bar.set_message(format!("{k} keys, {:.1} MB/s", b as f64 / 1e6 / secs));
        }
    }
    drop(tx);
    while let Some(result) = workers.join_next().await {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = failed.or(Some(ToolError::Input(e))),
            Err(e) => failed = failed.or(Some(ToolError::Input(e.to_string()))),
        }
    }
    bar.finish_and_clear();
    let (k, b) = (keys.load(Ordering::Relaxed), bytes.load(Ordering::Relaxed));
    let secs = started.elapsed().as_secs_f64();
    if conn.json {
        print_json(&json!({"keys": k, "bytes": b, "seconds": secs}));
    } else {
        println!(
            "loaded {k} keys ({:.1} MB) in {secs:.1} s ({:.0} keys/s, {:.1} MB/s)",
            b as f64 / 1e6,
            k as f64 / secs.max(1e-3),
            b as f64 / 1e6 / secs.max(1e-3)
        );
    }
    failed.map_or(Ok(()), Err)
}
