//! `kvs bench`: a load generator for the `/kv-store` dialect.
//!
//! Each of `--concurrency` workers is one simulated client: a keep-alive connection
//! (pooled per worker), and a causal session that sends back the `causal_payload` of its
//! last answer with every request, as a real client does. Workers pick keys uniformly
//! from `k0..k{keys-1}` and read or write by `--reads` (the read fraction); writes carry
//! `--value-size` bytes. The run stops after `--duration` seconds or `--ops` operations,
//! whichever comes first. Latencies go into one HDR histogram per operation kind
//! (microsecond resolution, 3 significant digits).
//!
//! A GET answered 404 (a key not written yet) counts as a success; any other non-2xx
//! answer or transport error counts as an error and its latency is not recorded.
//!
//! # Caveats
//!
//! * The load generator shares the machine with what it measures when both run here;
//!   `bench/compare.sh` uses wrk for the side-by-side figures so every system gets the
//!   same neutral client.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::{Rng, SeedableRng};

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
        workers.spawn(async move {
            let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
            connector.set_nodelay(true);
            let client: Client<_, Full<Bytes>> =
                Client::builder(TokioExecutor::new()).build(connector);
            let mut rng = rand::rngs::SmallRng::seed_from_u64(w);
            let mut me = Worker {
                get: histogram(),
                put: histogram(),
                get_errors: 0,
                put_errors: 0,
                first_error: None,
            };
            let mut token = String::new();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < duration {
                if done.fetch_add(1, Ordering::Relaxed) >= budget {
                    break;
                }
                let key = rng.random_range(0..keys);
                let read = rng.random_bool(reads);
                let mut form = form_urlencoded(&[("causal_payload", &token)]);
                if !read {
                    form.push_str("&val=");
                    form.push_str(&value);
                }
                let began = Instant::now();
                let outcome = call(&client, &target, read, key, form).await;
                let micros = began.elapsed().as_micros().max(1) as u64;
                match outcome {
                    Ok(new_token) => {
                        if let Some(t) = new_token {
                            token = t;
                        }
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
                            me.first_error = e;
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
        get: stats(&get, get_errors, seconds),
        put: stats(&put, put_errors, seconds),
        first_error,
    })
}

/// One request. `Ok(token)`: answered with success (a 404 GET included), with the new
/// causal payload if the answer had one; `Err(what)`: an error (described the first time).
async fn call(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    target: &str,
    read: bool,
    key: u64,
    form: String,
) -> Result<Option<String>, Option<String>> {
    let method = if read {
        hyper::Method::GET
    } else {
        hyper::Method::PUT
    };
    let request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{target}/kv-store/k{key}"))
        .header(
            hyper::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(Full::new(Bytes::from(form)))
        .map_err(|e| Some(e.to_string()))?;
    let response = client
        .request(request)
        .await
        .map_err(|e| Some(format!("{target}: {e}")))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| Some(format!("{target}: {e}")))?
        .to_bytes();
    if !(status.is_success() || (read && status == hyper::StatusCode::NOT_FOUND)) {
        return Err(Some(format!(
            "{target}: {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )));
    }
    let token = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["causal_payload"].as_str().map(str::to_string));
    Ok(token)
}

fn form_urlencoded(fields: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(fields).unwrap_or_default()
}

/// The report as the table `kvs bench` prints.
pub fn render(r: &BenchReport) -> String {
    let mut out = format!(
        "{:.1} s, {} clients, {} keys, {}-byte values, {:.0} % reads\n\
         {:<4} {:>9} {:>7} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
        r.seconds,
        r.concurrency,
        r.keys,
        r.value_size,
        r.reads * 100.0,
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
