//! `kvs bench`: a load generator for the `/kv-store` dialect.
//!
//! Each of `--concurrency` workers is one simulated client: its own
//! [`crate::client::Client`] (so its own keep-alive connection), and a causal session
//! that sends back the `causal_payload` of its last answer with every request, as a real
//! client does. Workers pick keys uniformly from `k0..k{keys-1}` and read or write by
//! `--reads` (the read fraction); writes carry `--value-size` bytes. The run stops after
//! `--duration` seconds or `--ops` operations, whichever comes first. Latencies (the
//! request until its whole answer is read) go into one HDR histogram per operation kind
//! (microsecond resolution, 3 significant digits).
//!
//! A GET answered 404 (a key not written yet) counts as a success; any other non-2xx
//! answer, transport error or request without an answer within `--timeout` counts as
//! an error and its latency is not recorded.
//!
//! # Caveats
//!
//! * The load generator shares the machine with what it measures when both run here;
//!   `bench/compare.sh` uses wrk for the side-by-side figures so every system gets the
//!   same neutral client.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};

use crate::client::session::Session;
use crate::client::{Client, ClientError, Response, StatusCode};
use crate::quorum::Level;

/// What to run.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Nodes to send requests to (comma-separated ip:port); workers are spread over them.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub targets: String,
    /// Concurrent clients (each its own connection and causal session).
    #[arg(short, long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub concurrency: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: u64,
    /// Bytes per written value.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=2 * 1024 * 1024))]
    pub value_size: u64,
    /// Fraction of operations that are reads (0 = PUT only, 1 = GET only).
    #[arg(long, default_value_t = 0.5)]
    pub reads: f64,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after this many operations (all workers together).
    #[arg(long)]
    pub ops: Option<u64>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Seconds one request may take before it counts as an error.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Read level sent with every GET (`r=`: a replica count, `quorum` or `all`);
    /// without it the nodes' default `R` applies.
    #[arg(long = "r")]
    pub r: Option<Level>,
    /// Write level sent with every PUT (`w=`); without it the nodes' default `W`.
    #[arg(long = "w")]
    pub w: Option<Level>,
    /// The API to load: `kv-store` (seed 001's dialect, through the targets), or the own
    /// API `v1` through the targets as entry nodes, or `v1-direct`: each request straight
    /// to a replica of its key's partition (`client::session`). The own API's writes
    /// carry no context, so each adds a sibling (up to the bound) to what it finds.
    #[arg(long, default_value = "kv-store", value_parser = ["kv-store", "v1", "v1-direct"])]
    pub api: String,
}

/// Results of one kind of operation.
#[derive(Debug, serde::Serialize)]
pub struct OpStats {
    pub ok: u64,
    pub errors: u64,
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct BenchReport {
    pub seconds: f64,
    pub concurrency: u64,
    pub keys: u64,
    pub value_size: u64,
    pub reads: f64,
    /// The levels sent (`None`: the nodes' defaults).
    pub r: Option<String>,
    pub w: Option<String>,
    pub get: OpStats,
    pub put: OpStats,
    /// The first error seen, to say what went wrong.
    pub first_error: Option<String>,
}

struct Worker {
    get: Histogram<u64>,
    put: Histogram<u64>,
    get_errors: u64,
    put_errors: u64,
    first_error: Option<String>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 h, 3 significant digits: fixed memory per worker.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn stats(h: &Histogram<u64>, errors: u64, seconds: f64) -> OpStats {
    let ms = |v: u64| v as f64 / 1_000.0;
    OpStats {
        ok: h.len(),
        errors,
        per_sec: h.len() as f64 / seconds,
        p50_ms: ms(h.value_at_quantile(0.5)),
        p90_ms: ms(h.value_at_quantile(0.9)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// Runs the load and returns what it measured.
pub async fn run(args: &BenchArgs) -> Result<BenchReport, String> {
    let targets: Vec<String> = args
        .targets
        .split(',')
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    if targets.is_empty() {
        return Err("--targets names no node".into());
    }
    if !(0.0..=1.0).contains(&args.reads) {
        return Err(format!("--reads {} is not between 0 and 1", args.reads));
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        return Err(format!(
            "--duration {} is not a positive number",
            args.duration
        ));
    }
    let duration = Duration::from_secs_f64(args.duration);
    if !(args.timeout > 0.0 && args.timeout.is_finite() && args.timeout < 1e9) {
        return Err(format!(
            "--timeout {} is not a positive number",
            args.timeout
        ));
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let budget = args.ops.unwrap_or(u64::MAX);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let value: Arc<str> = "v".repeat(args.value_size as usize).into();
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..args.concurrency {
        let target = targets[w as usize % targets.len()].clone();
        let (done, stop, value) = (done.clone(), stop.clone(), value.clone());
        let (keys, reads) = (args.keys, args.reads);
        let levels = (args.r.map(|l| l.to_string()), args.w.map(|l| l.to_string()));
        let api = args.api.clone();
        workers.spawn(async move {
            // Its own client, so its own pooled connection.
            let client = Client::builder().timeout(timeout).build();
            let node = client
                .kv_store(&target)
                .levels(levels.0.as_deref(), levels.1.as_deref());
            let seeds = vec![target.clone()];
            let mut session = match api.as_str() {
                "v1" => Some(Session::entry(client.clone(), seeds)),
                "v1-direct" => Some(Session::direct(client.clone(), seeds)),
                _ => None,
            };
            let mut rng = rand::rngs::SmallRng::seed_from_u64(w);
            let mut me = Worker {
                get: histogram(),
                put: histogram(),
                get_errors: 0,
                put_errors: 0,
                first_error: None,
            };
            // Reused from one request to the next.
            let (mut token, mut key) = (String::new(), String::new());
            while !stop.load(Ordering::Relaxed) && start.elapsed() < duration {
                if done.fetch_add(1, Ordering::Relaxed) >= budget {
                    break;
                }
                key.clear();
                let _ = write!(key, "k{}", rng.random_range(0..keys));
                let read = rng.random_bool(reads);
                let began = Instant::now();
                let outcome: Result<(), String> = match (&mut session, read) {
                    (Some(s), true) => s.get(&key).await.map(|_| ()).map_err(|e| e.to_string()),
                    (Some(s), false) => s
                        .put(&key, value.as_bytes(), Default::default())
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    (None, true) => node
                        .get(&key, &token)
                        .await
                        .and_then(|reply| absorb(&reply, read, &mut token))
                        .map_err(|e| e.to_string()),
                    (None, false) => node
                        .put(&key, &value, &token)
                        .await
                        .and_then(|reply| absorb(&reply, read, &mut token))
                        .map_err(|e| e.to_string()),
                };
                let micros = began.elapsed().as_micros().max(1) as u64;
                match outcome {
                    Ok(()) => {
                        let h = if read { &mut me.get } else { &mut me.put };
                        h.saturating_record(micros);
                    }
                    Err(e) => {
                        if read {
                            me.get_errors += 1;
                        } else {
                            me.put_errors += 1;
                        }
                        if me.first_error.is_none() {
                            me.first_error = Some(e);
                        }
                    }
                }
            }
            me
        });
    }
    let bar = (!args.quiet).then(|| {
        let bar = indicatif::ProgressBar::new((args.duration * 10.0) as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {elapsed:>4} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let ticker = {
        let (done, stop, bar) = (done.clone(), stop.clone(), bar.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Some(bar) = &bar {
                    let n = done.load(Ordering::Relaxed);
                    let secs = start.elapsed().as_secs_f64();
                    bar.set_position((secs * 10.0) as u64);
                    bar.set_message(format!("{n} ops, {:.0} ops/s", n as f64 / secs));
                }
            }
        })
    };
    let (mut get, mut put) = (histogram(), histogram());
    let (mut get_errors, mut put_errors, mut first_error) = (0, 0, None);
    while let Some(w) = workers.join_next().await {
        let w = w.map_err(|e| format!("a worker failed: {e}"))?;
        get.add(&w.get).map_err(|e| e.to_string())?;
        put.add(&w.put).map_err(|e| e.to_string())?;
        get_errors += w.get_errors;
        put_errors += w.put_errors;
        first_error = first_error.or(w.first_error);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(BenchReport {
        seconds,
        concurrency: args.concurrency,
        keys: args.keys,
        value_size: args.value_size,
        reads: args.reads,
        r: args.r.map(|l| l.to_string()),
        w: args.w.map(|l| l.to_string()),
        get: stats(&get, get_errors, seconds),
        put: stats(&put, put_errors, seconds),
        first_error,
    })
}

/// The causal payload of a `/kv-store` reply, borrowed from the body when it can be.
#[derive(serde::Deserialize)]
struct Payload<'a> {
    #[serde(borrow)]
    causal_payload: Option<Cow<'a, str>>,
}

/// Judges one answer: a success (a 404 GET included) takes the new causal payload into
/// `token`, if the answer has one; any other status is an error.
fn absorb(reply: &Response, read: bool, token: &mut String) -> Result<(), ClientError> {
    let status = reply.status;
    if !(status.is_success() || (read && status == StatusCode::NOT_FOUND)) {
        return Err(reply.bad_answer("not a success"));
    }
    if let Ok(Payload {
        causal_payload: Some(new),
    }) = reply.json()
    {
        token.clear();
        token.push_str(&new);
    }
    Ok(())
}

/// The report as the table `kvs bench` prints.
pub fn render(r: &BenchReport) -> String {
    let level = |l: &Option<String>| l.clone().unwrap_or_else(|| "default".into());
    let mut out = format!(
        "{:.1} s, {} clients, {} keys, {}-byte values, {:.0} % reads, r={} w={}\n\
         {:<4} {:>9} {:>7} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
        r.seconds,
        r.concurrency,
        r.keys,
        r.value_size,
        r.reads * 100.0,
        level(&r.r),
        level(&r.w),
        "op",
        "ok",
        "errors",
        "ops/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms"
    );
    for (name, s) in [("GET", &r.get), ("PUT", &r.put)] {
        out.push_str(&format!(
            "{name:<4} {:>9} {:>7} {:>10.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}\n",
            s.ok, s.errors, s.per_sec, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
        ));
    }
    if let Some(e) = &r.first_error {
        out.push_str(&format!("first error: {e}\n"));
    }
    out
}
