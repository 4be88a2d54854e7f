//! `GET /metrics`: the node's metrics in the Prometheus text format.
//!
//! # Design
//!
//! The metrics go through the `metrics` facade: code anywhere records with its macros
//! (`counter!`, `histogram!`) under the names of [`crate::metric_names`], and this file
//! installs the one recorder that keeps them, `metrics-exporter-prometheus`'s, built
//! without its HTTP listener or push gateway: the node serves the text itself, on its
//! own port, through its own router. What is recorded where:
//!
//! * **Events**, where they happen: client requests by dialect, endpoint and status, and
//!   their latency (`client_request` in `http/mod.rs`, through [`record_request`]);
//!   forwards (`node/routing.rs`); WAL fsyncs (`wal/`); client writes per group commit
//!   (`node/writer/`).
//! * **State**, when `/metrics` is scraped ([`endpoint`]): the view epoch and the change
//!   in progress, the partition's keys and bytes, the replication lag and the failure
//!   detector's verdict per peer, the requests in flight (`Node::gauges`,
//!   `body::CLIENTS`). Anti-entropy rounds and bytes are counters the node already keeps
//!   (`node/digests.rs`, also in `/api/v1/status`); they are copied, not counted twice.
//!
//! The histograms are configured with buckets ([`REQUEST_BUCKETS`] and the others) so
//! they render as Prometheus histograms (`_bucket`, `_sum`, `_count`, aggregatable
//! across nodes), not as summaries.
//!
//! The recorder is process-global, so it is installed once, by the `kvs` binary's
//! startup ([`install`]), never by a library path that tests or the simulation run many
//! nodes through: there no recorder is installed, the macros are no-ops, and
//! `/metrics` answers 404.
//!
//! # Caveats
//!
//! * Gauges are set at scrape time, and a label set no longer set (a peer that left the
//!   view, the partition a node left) disappears [`GAUGE_IDLE_TIMEOUT`] later. Counters
//!   and histograms never expire: their labels are bounded (dialects, endpoints, status
//!   codes, operations).
//! * A request whose client goes away before the answer is not counted: its handler's
//!   future is dropped before the status exists. Requests to `/metrics`, the status
//!   endpoint and the internal endpoint are not client requests and are not counted.
//! * Like the status endpoint, `/metrics` needs no credential; it shows member
//!   addresses and counts, never keys or values.
//! * Histogram samples are held until drained: a thread drains them every
//!   [`UPKEEP_INTERVAL`], so a node nobody scrapes does not grow.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram, Unit,
};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

use super::body;
use crate::cluster::Health;
use crate::metric_names as name;
use crate::node::{Gauges, Node};

/// Upper bounds of the request latency buckets, in seconds: from a read served locally
/// (well under a millisecond) to a view change's `update_view` (seconds).
pub const REQUEST_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upper bounds of the fsync latency buckets, in seconds: from a fast SSD (~100 µs) to a
/// disk in trouble.
pub const FSYNC_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Upper bounds of the writes-per-commit buckets: powers of two up to the writer's
/// largest batch (`MAX_BATCH`, 512 commands).
pub const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// A gauge label set not set again for this long is dropped (see the caveats). Every
/// gauge is set at each scrape, so only label sets that no longer apply go.
pub const GAUGE_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often recorded histogram samples are folded into their buckets: the exporter's
/// own default.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// The text exposition format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The installed recorder's handle, which renders what it holds.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once per process: a second call fails) and
/// starts the thread that keeps its histograms drained.
pub fn install() -> Result<(), String> {
    let handle = builder()?
        .install_recorder()
        .map_err(|e| format!("metrics: installing the recorder: {e}"))?;
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("kvs-metrics".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        })
        .map_err(|e| format!("metrics: starting the upkeep thread: {e}"))?;
    HANDLE
        .set(handle)
        .map_err(|_| "metrics: the recorder is already installed".to_string())?;
    describe();
    Ok(())
}

/// The exporter as the node configures it: histograms with buckets, gauges that expire.
fn builder() -> Result<PrometheusBuilder, String> {
    let mut builder =
        PrometheusBuilder::new().idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE_TIMEOUT));
    for (metric, buckets) in [
        (name::HTTP_REQUEST_DURATION_SECONDS, &REQUEST_BUCKETS[..]),
        (name::WAL_FSYNC_DURATION_SECONDS, &FSYNC_BUCKETS[..]),
        (name::WAL_BATCH_WRITES, &BATCH_BUCKETS[..]),
    ] {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(metric.to_owned()), buckets)
            .map_err(|e| format!("metrics: buckets of {metric}: {e}"))?;
    }
    Ok(builder)
}

/// The `# HELP` lines.
fn describe() {
    describe_counter!(
        name::HTTP_REQUESTS_TOTAL,
        Unit::Count,
        "Client requests answered, by dialect, endpoint and status code"
    );
    describe_histogram!(
        name::HTTP_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time from a client request's arrival to its answer"
    );
    describe_gauge!(
        name::HTTP_REQUESTS_IN_FLIGHT,
        Unit::Count,
        "Client requests holding a permit of the node's in-flight limit"
    );
    describe_counter!(
        name::FORWARDS_TOTAL,
        Unit::Count,
        "Client requests this node forwarded to a replica on another node"
    );
    describe_counter!(
        name::RPC_STREAMS_TOTAL,
        "Streams to peers this node tried to open, by outcome (opened, refused, failed)"
    );
    describe_counter!(
        name::RPC_STREAM_CALLS_TOTAL,
        "Calls from peers this node served on streams"
    );
    describe_gauge!(
        name::REPLICATION_LAG_WRITES,
        Unit::Count,
        "Writes this replica applied that the peer had not applied at its last sync request"
    );
    describe_counter!(
        name::ANTI_ENTROPY_ROUNDS_TOTAL,
        Unit::Count,
        "Digest rounds (state-based anti-entropy) this node started"
    );
    describe_counter!(
        name::ANTI_ENTROPY_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes of digest rounds: requests, answers and fetched pages, as encoded"
    );
    describe_histogram!(
        name::WAL_FSYNC_DURATION_SECONDS,
        Unit::Seconds,
        "Time one fdatasync of the write-ahead log took"
    );
    describe_histogram!(
        name::WAL_BATCH_WRITES,
        Unit::Count,
        "Client writes made durable by one group commit"
    );
    describe_gauge!(name::VIEW_EPOCH, "Epoch of the view this node routes by");
    describe_gauge!(
        name::VIEW_CHANGE_IN_PROGRESS,
        "1 while this node takes part in a view change it has not installed"
    );
    describe_gauge!(
        name::VIEW_CHANGE_KEYS_MOVED,
        Unit::Count,
        "Keys moved by the view change this node coordinates or last coordinated"
    );
    describe_gauge!(
        name::PARTITION_KEYS,
        Unit::Count,
        "Live keys this node stores, by the partition it is a replica of"
    );
    describe_gauge!(
        name::PARTITION_BYTES,
        Unit::Bytes,
        "Bytes of the files in this node's data directory, by its partition"
    );
    describe_gauge!(
        name::PEER_UP,
        "1 unless the failure detector believes the peer dead"
    );
    describe_gauge!(
        name::PEER_HEALTH,
        "1 for the failure detector's verdict about the peer, 0 for the others"
    );
}

/// Counts one answered client request. `dialect` and `endpoint` come from the dialect
/// (`Dialect::name`, `Dialect::endpoint_of`), or are [`name::NO_DIALECT`].
pub(super) fn record_request(
    dialect: &'static str,
    endpoint: &'static str,
    status: StatusCode,
    took: Duration,
) {
    let record = |(requests, duration): &(Counter, Histogram)| {
        requests.increment(1);
        duration.record(took.as_secs_f64());
    };
    // Only the installed recorder's handles are kept: in tests, a local recorder is in
    // force for a while (and elsewhere in the library none is).
    if HANDLE.get().is_none() {
        return record(&request_metrics(dialect, endpoint, status));
    }
    REQUEST_METRICS.with(|cache| {
        let mut cache = cache.borrow_mut();
        let key = (dialect, endpoint, status.as_u16());
        if let Some(handles) = cache.get(&key) {
            return record(handles);
        }
        let handles = request_metrics(dialect, endpoint, status);
        record(&handles);
        if cache.len() < MAX_CACHED_REQUEST_METRICS {
            cache.insert(key, handles);
        }
    });
}

/// The handles of one kind of request's metrics, from the recorder in force.
fn request_metrics(
    dialect: &'static str,
    endpoint: &'static str,
    status: StatusCode,
) -> (Counter, Histogram) {
    let status = status.as_u16().to_string();
    (
        counter!(name::HTTP_REQUESTS_TOTAL, "dialect" => dialect, "endpoint" => endpoint, "status" => status),
        histogram!(name::HTTP_REQUEST_DURATION_SECONDS, "dialect" => dialect, "endpoint" => endpoint),
    )
}

/// Request metrics' handles per dialect, endpoint and status, kept by each thread.
/// `counter!` and `histogram!` build the labelled key, hash it and look it up in the
/// recorder's registry on every call: about 3,500 instructions per request, 7.5 % of a
/// GET on its node (callgrind). Kept per thread, so that the lookup takes no lock. Only
/// gauges expire in this exporter's configuration, so a kept handle stays registered.
type RequestMetrics = HashMap<(&'static str, &'static str, u16), (Counter, Histogram)>;

/// Bound on the handles a thread keeps (dialects × endpoints × statuses is far less).
const MAX_CACHED_REQUEST_METRICS: usize = 1024;

thread_local! {
    static REQUEST_METRICS: RefCell<RequestMetrics> = RefCell::new(HashMap::new());
}

/// `GET /metrics`: sets the gauges from the node's state, then renders everything.
pub(super) async fn endpoint(State(node): State<Arc<Node>>) -> Response {
    let Some(handle) = HANDLE.get() else {
        return (
            StatusCode::NOT_FOUND,
            "this process records no metrics (no recorder installed)\n",
        )
            .into_response();
    };
    record_gauges(&node.gauges(), body::CLIENTS.in_flight());
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        handle.render(),
    )
        .into_response()
}

fn record_gauges(g: &Gauges, in_flight: usize) {
    let flag = |on: bool| if on { 1.0 } else { 0.0 };
    gauge!(name::HTTP_REQUESTS_IN_FLIGHT).set(in_flight as f64);
    gauge!(name::VIEW_EPOCH).set(g.epoch as f64);
    gauge!(name::VIEW_CHANGE_IN_PROGRESS).set(flag(g.changing_view));
    gauge!(name::VIEW_CHANGE_KEYS_MOVED).set(g.keys_moved as f64);
    if let Some(p) = g.partition {
        let partition = p.to_string();
        if let Some(keys) = g.keys {
            gauge!(name::PARTITION_KEYS, "partition" => partition.clone()).set(keys as f64);
        }
        if let Some(bytes) = g.disk_bytes {
            gauge!(name::PARTITION_BYTES, "partition" => partition).set(bytes as f64);
        }
    }
    for (peer, lag) in &g.replication_lag {
        gauge!(name::REPLICATION_LAG_WRITES, "peer" => peer.clone()).set(*lag as f64);
    }
    for (peer, health) in &g.peers {
        gauge!(name::PEER_UP, "peer" => peer.clone()).set(flag(*health != Health::Dead));
        for state in [Health::Alive, Health::Suspected, Health::Dead] {
            gauge!(name::PEER_HEALTH, "peer" => peer.clone(), "state" => state.as_str())
                .set(flag(state == *health));
        }
    }
    counter!(name::ANTI_ENTROPY_ROUNDS_TOTAL).absolute(g.anti_entropy_rounds);
    counter!(name::ANTI_ENTROPY_BYTES_TOTAL).absolute(g.anti_entropy_bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one scrape renders, through a recorder of this configuration that is not
    /// installed (the test binary's other tests run without one).
    fn render(record: impl FnOnce()) -> String {
        let recorder = builder().expect("valid configuration").build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, record);
        handle.render()
    }

    #[test]
    fn histograms_render_with_buckets() {
        let text = render(|| {
            record_request("kv-store", "get", StatusCode::OK, Duration::from_millis(3));
            histogram!(name::WAL_FSYNC_DURATION_SECONDS).record(0.002);
            histogram!(name::WAL_BATCH_WRITES).record(3.0);
        });
        for metric in [
            name::HTTP_REQUEST_DURATION_SECONDS,
            name::WAL_FSYNC_DURATION_SECONDS,
            name::WAL_BATCH_WRITES,
        ] {
            assert!(
                text.contains(&format!("# TYPE {metric} histogram")),
                "{text}"
            );
            assert!(text.contains(&format!("{metric}_bucket")), "{text}");
        }
        assert!(
            text.contains(
                r#"kvs_http_requests_total{dialect="kv-store",endpoint="get",status="200"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"kvs_http_request_duration_seconds_bucket{dialect="kv-store",endpoint="get",le="0.005"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kvs_wal_batch_writes_bucket{le="2"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kvs_wal_batch_writes_bucket{le="4"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn gauges_show_the_node_state() {
        let gauges = Gauges {
            epoch: 3,
            changing_view: true,
            partition: Some(1),
            keys: Some(42),
            disk_bytes: Some(4096),
            replication_lag: vec![("10.0.0.2:8080".into(), 7)],
            peers: vec![
                ("10.0.0.2:8080".into(), Health::Alive),
                ("10.0.0.3:8080".into(), Health::Dead),
            ],
            anti_entropy_rounds: 5,
            ..Gauges::default()
        };
        let text = render(|| record_gauges(&gauges, 2));
        for line in [
            "kvs_view_epoch 3",
            "kvs_view_change_in_progress 1",
            "kvs_http_requests_in_flight 2",
            r#"kvs_partition_keys{partition="1"} 42"#,
            r#"kvs_partition_bytes{partition="1"} 4096"#,
            r#"kvs_replication_lag_writes{peer="10.0.0.2:8080"} 7"#,
            r#"kvs_peer_up{peer="10.0.0.2:8080"} 1"#,
            r#"kvs_peer_up{peer="10.0.0.3:8080"} 0"#,
            r#"kvs_peer_health{peer="10.0.0.3:8080",state="dead"} 1"#,
            r#"kvs_peer_health{peer="10.0.0.3:8080",state="alive"} 0"#,
            "kvs_anti_entropy_rounds_total 5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        // A proxy holds no partition: no partition gauges at all.
        let proxy = Gauges {
            keys: Some(0),
            ..Gauges::default()
        };
        let text = render(|| record_gauges(&proxy, 0));
        assert!(!text.contains(name::PARTITION_KEYS), "{text}");
    }
}
