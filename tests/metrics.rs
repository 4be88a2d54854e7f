//! Process-level tests of `GET /metrics`: real `kvs` processes on loopback, their
//! answers read with a Prometheus text-format parser (`prometheus-parse`), as a scraper
//! would. Address ranges `127.77.120.0/24`, `127.77.121.0/24` and `127.77.130.0/24` (see `common`).

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, POLL_INTERVAL};
use kvs::client::{Client, Method};
use kvs::metric_names as name;
use prometheus_parse::{Scrape, Value};

/// What one bounded wait gets (heartbeat verdicts, sync reports, a digest round every
/// 5 s; debug builds on a busy 2-core machine).
const WAIT: Duration = Duration::from_secs(30);

/// One scrape of node `i`, parsed.
async fn scrape(c: &Cluster, i: usize) -> Metrics {
    let reply = Client::new()
        .request(Method::GET, c.addr(i), "/metrics")
        .timeout(common::REQUEST_TIMEOUT)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /metrics on node {i}: {e}"));
    let text = reply.text().into_owned();
    assert_eq!(
        reply.status.as_u16(),
        200,
        "GET /metrics on node {i}: {text}"
    );
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = Scrape::parse(lines)
        .unwrap_or_else(|e| panic!("node {i}'s /metrics does not parse: {e}\n{text}"));
    Metrics { scrape, text }
}

struct Metrics {
    scrape: Scrape,
    text: String,
}

impl Metrics {
    /// The value of the counter, gauge or untyped sample `metric` whose labels include
    /// `labels`, summed over the rest; `None` when no sample matches.
    fn value(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let values: Vec<f64> = self
            .scrape
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .filter_map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
                _ => None,
            })
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// Like [`Metrics::value`], 0 when no sample matches (a counter not yet counted).
    fn count(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(metric, labels).unwrap_or(0.0)
    }

    /// Like [`Metrics::value`], panicking when no sample matches.
    fn expect(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(metric, labels)
            .unwrap_or_else(|| panic!("no {metric}{labels:?} in\n{}", self.text))
    }

    /// The buckets (upper bound, cumulative count) of histogram `metric` with exactly
    /// `labels`.
    fn buckets(&self, metric: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
        let sample = self
            .scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == metric
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            })
            .unwrap_or_else(|| panic!("no histogram {metric}{labels:?} in\n{}", self.text));
        match &sample.value {
            Value::Histogram(buckets) => buckets.iter().map(|b| (b.less_than, b.count)).collect(),
            other => panic!("{metric} is not a histogram: {other:?}"),
        }
    }

    /// The `TYPE` the text declares for `metric`.
    fn declares(&self, metric: &str, kind: &str) -> bool {
        self.text
            .lines()
            .any(|l| l == format!("# TYPE {metric} {kind}"))
    }
}

/// Scrapes node `i` until `done` holds, for at most [`WAIT`].
async fn scrape_until(
    c: &Cluster,
    i: usize,
    what: &str,
    done: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = scrape(c, i).await;
        if done(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "node {i}: {what} not seen within {WAIT:?}:\n{}",
            m.text
        );
        tokio::time::sleep(POLL_INTERVAL * 4).await;
    }
}

const KV: [(&str, &str); 1] = [("dialect", "kv-store")];

fn kv(endpoint: &'static str, status: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("dialect", "kv-store"),
        ("endpoint", endpoint),
        ("status", status),
    ]
}

/// Requests are counted by dialect, endpoint and status and timed in a real histogram;
/// an entry node that is not a key's replica counts a forward for it, a replica asked
/// directly counts none; the view, partition and replication gauges say what the status
/// endpoint says.
#[tokio::test(flavor = "multi_thread")]
async fn requests_forwards_and_node_state_are_exported() {
    let c = Cluster::start(120, 4, 2).await;
    c.within(Duration::from_secs(240), async {
        // Node 0 holds partition 0 with node 1; nodes 2 and 3 hold partition 1.
        let status = c.status(0).await;
        let mine = status["partition_id"]
            .as_i64()
            .expect("node 0 is a replica");
        let before = scrape(&c, 0).await;
        let before_far = scrape(&c, 2).await;

        let keys = c.keys_by_partition(0, "metrics", 3).await;
        let puts = keys.values().map(Vec::len).sum::<usize>();
        let local: Vec<&String> = keys.get(&mine).into_iter().flatten().collect();
        let remote: Vec<(i64, &String)> = keys
            .iter()
            .filter(|(p, _)| **p != mine)
            .flat_map(|(p, ks)| ks.iter().map(move |k| (*p, k)))
            .collect();
        for key in keys.values().flatten() {
            let (status, body) = c.get(0, key, "").await;
            assert_eq!(status, 200, "GET {key}: {body}");
        }
        // A 404 from node 0's own partition (a deleted key), so it forwards nothing.
        let gone = local.first().expect("a key of node 0's partition");
        let (status, body) = c.node(0).delete(gone, "").await;
        assert_eq!(status, 200, "DELETE {gone}: {body}");
        let (status, body) = c.get(0, gone, "").await;
        assert_eq!(status, 404, "GET {gone} after its delete: {body}");
        let (status, _) = c.request(0, Method::GET, "/nope", String::new()).await;
        assert_eq!(status, 404);
        // A client routing to a key's replicas itself: node 2 holds partition 1.
        for (p, key) in &remote {
            if c.expected_members(*p as usize).contains(&2) {
                let (status, body) = c.get(2, key, "").await;
                assert_eq!(status, 200, "GET {key} at its replica: {body}");
            }
        }

        let after = scrape(&c, 0).await;
        let delta = |labels: &[(&str, &str)]| {
            after.count(name::HTTP_REQUESTS_TOTAL, labels)
                - before.count(name::HTTP_REQUESTS_TOTAL, labels)
        };
        assert_eq!(delta(&kv("put", "201")), puts as f64, "{}", after.text);
        assert_eq!(delta(&kv("get", "200")), puts as f64, "{}", after.text);
        assert_eq!(delta(&kv("get", "404")), 1.0, "{}", after.text);
        assert_eq!(delta(&kv("delete", "200")), 1.0, "{}", after.text);
        assert_eq!(
            delta(&[("dialect", "none"), ("endpoint", "none"), ("status", "404")]),
            1.0
        );
        // Scrapes and the status endpoint are not client requests.
        assert_eq!(delta(&KV), (2 * puts + 2) as f64, "{}", after.text);

        // A histogram, not a summary: buckets up to +Inf, a sum and a count.
        let duration = name::HTTP_REQUEST_DURATION_SECONDS;
        assert!(after.declares(duration, "histogram"), "{}", after.text);
        let put = [("dialect", "kv-store"), ("endpoint", "put")];
        let buckets = after.buckets(duration, &put);
        assert!(buckets.len() > 5, "{buckets:?}");
        assert!(buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        let (le, total) = *buckets.last().expect("buckets");
        assert!(le.is_infinite(), "{buckets:?}");
        let count = after.expect(&format!("{duration}_count"), &put);
        assert_eq!(total, count);
        let counted = count - before.count(&format!("{duration}_count"), &put);
        assert_eq!(counted, puts as f64);
        assert!(after.expect(&format!("{duration}_sum"), &put) > 0.0);

        // Node 0 forwarded every request for the other partition, once each.
        let forwards = |m: &Metrics, op: &str| m.count(name::FORWARDS_TOTAL, &[("op", op)]);
        assert_eq!(
            forwards(&after, "put") - forwards(&before, "put"),
            remote.len() as f64,
            "{}",
            after.text
        );
        assert_eq!(
            forwards(&after, "get") - forwards(&before, "get"),
            remote.len() as f64
        );
        assert_eq!(forwards(&after, "delete"), forwards(&before, "delete"));
        // Its replica, asked directly, forwarded nothing.
        let far = scrape(&c, 2).await;
        assert_eq!(
            far.count(name::FORWARDS_TOTAL, &[]),
            before_far.count(name::FORWARDS_TOTAL, &[]),
            "{}",
            far.text
        );

        // Every local write went through a group commit, and through the WAL's fsync.
        let writes = |m: &Metrics| m.count(&format!("{}_sum", name::WAL_BATCH_WRITES), &[]);
        assert_eq!(writes(&after) - writes(&before), (local.len() + 1) as f64);
        assert!(after.declares(name::WAL_FSYNC_DURATION_SECONDS, "histogram"));
        assert!(after.expect(&format!("{}_count", name::WAL_FSYNC_DURATION_SECONDS), &[]) > 0.0);

        // State: what the status endpoint says.
        let status = c.status(0).await;
        assert_eq!(
            after.expect(name::VIEW_EPOCH, &[]),
            status["epoch"].as_f64().expect("epoch")
        );
        assert_eq!(after.expect(name::VIEW_CHANGE_IN_PROGRESS, &[]), 0.0);
        assert!(after.value(name::HTTP_REQUESTS_IN_FLIGHT, &[]).is_some());
        let partition = mine.to_string();
        let labels = [("partition", partition.as_str())];
        assert_eq!(
            after.expect(name::PARTITION_KEYS, &labels),
            status["keys"].as_f64().expect("keys"),
            "{}",
            after.text
        );
        assert!(after.expect(name::PARTITION_BYTES, &labels) > 0.0);
        scrape_until(&c, 0, "every peer up", |m| {
            (1..4).all(|p| m.value(name::PEER_UP, &[("peer", c.addr(p))]) == Some(1.0))
        })
        .await;
        // Node 1 pulls node 0's writes and says so in its next sync request.
        let partner = [("peer", c.addr(1))];
        scrape_until(&c, 0, "replication lag 0", |m| {
            m.value(name::REPLICATION_LAG_WRITES, &partner) == Some(0.0)
        })
        .await;
        scrape_until(&c, 0, "an anti-entropy round", |m| {
            m.count(name::ANTI_ENTROPY_ROUNDS_TOTAL, &[]) > 0.0
                && m.count(name::ANTI_ENTROPY_BYTES_TOTAL, &[]) > 0.0
        })
        .await;
    })
    .await;
}

/// The failure detector's verdicts: every peer up, then a killed one down.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_peer_is_reported_down() {
    let c = Cluster::start(121, 4, 2).await;
    c.within(Duration::from_secs(120), async {
        let up = |m: &Metrics, peer: usize| m.value(name::PEER_UP, &[("peer", c.addr(peer))]);
        scrape_until(&c, 0, "every peer up", |m| {
            (1..4).all(|p| up(m, p) == Some(1.0))
        })
        .await;
        c.kill_9(3);
        let m = scrape_until(&c, 0, "node 3 down", |m| up(m, 3) == Some(0.0)).await;
        let dead = [("peer", c.addr(3)), ("state", "dead")];
        assert_eq!(m.expect(name::PEER_HEALTH, &dead), 1.0);
        assert_eq!(up(&m, 1), Some(1.0), "{}", m.text);
        assert_eq!(up(&m, 2), Some(1.0), "{}", m.text);
    })
    .await;
}

/// The dashboard is valid JSON, takes its Prometheus datasource as a variable, and
/// queries only metrics the nodes export (histograms through their series).
#[test]
fn the_dashboard_queries_exported_metrics() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana-dashboard.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"));
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(variables
        .iter()
        .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"));
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let names = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("kvs_"));
            for used in names {
                let known = name::ALL.iter().any(|m| {
                    used == *m
                        || ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| used == format!("{m}{s}"))
                });
                assert!(
                    known,
                    "panel {:?} queries {used}, which no node exports",
                    panel["title"]
                );
                queried += 1;
            }
        }
    }
    assert!(queried > 10, "{queried} metric references");
}

/// Calls between nodes travel on one stream per peer (`rpc::stream`): forwarded reads
/// and writes are served on streams, and a peer killed and restarted gets a new stream
/// without a failed client request.
#[tokio::test(flavor = "multi_thread")]
async fn peers_call_each_other_on_streams_that_survive_a_restart() {
    let c = Cluster::start(130, 4, 2).await;
    c.within(Duration::from_secs(240), async {
        // Node 0 holds partition 0 with node 1; nodes 2 and 3 hold partition 1.
        let keys = c.keys_by_partition(0, "stream", 20).await;
        let far: Vec<String> = keys
            .iter()
            .filter(|(p, _)| **p == 1)
            .flat_map(|(_, ks)| ks.iter().cloned())
            .collect();
        assert!(!far.is_empty(), "no key of partition 1 among {keys:?}");
        let served = |m: &Metrics| m.count(name::RPC_STREAM_CALLS_TOTAL, &[]);
        let opened = |m: &Metrics| m.count(name::RPC_STREAMS_TOTAL, &[("outcome", "opened")]);
        let before = served(&scrape(&c, 2).await) + served(&scrape(&c, 3).await);
        for key in &far {
            let (status, body) = c.put(0, key, "v1", "").await;
            assert!(status == 200 || status == 201, "PUT {key}: {body}");
            let (status, body) = c.get(0, key, "").await;
            assert_eq!(status, 200, "GET {key}: {body}");
        }
        let after = served(&scrape(&c, 2).await) + served(&scrape(&c, 3).await);
        assert!(
            after - before >= 2.0 * far.len() as f64,
            "{} forwarded calls, {} served on streams",
            2 * far.len(),
            after - before
        );
        let first = scrape(&c, 0).await;
        assert!(opened(&first) >= 1.0, "{}", first.text);

        // Node 0's streams to node 2 break; the next calls open new ones.
        c.kill_9(2);
        c.restart(2).await;
        for key in &far {
            let (status, body) = c.put(0, key, "v2", "").await;
            assert_eq!(status, 200, "PUT {key} after node 2's restart: {body}");
            let (status, body) = c.get(0, key, "").await;
            assert_eq!(status, 200, "GET {key} after node 2's restart: {body}");
        }
        scrape_until(&c, 0, "a stream to the restarted node", |m| {
            opened(m) > opened(&first)
        })
        .await;
    })
    .await;
}
