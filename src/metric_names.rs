//! The name of every metric a node exports at `GET /metrics`, in one place.
//!
//! The exporter (`http::metrics`) configures and describes them, the code that records
//! them uses them, and `deploy/grafana-dashboard.json` and the status page query them by
//! these names, so a rename is a change of contract. This module depends on nothing: the
//! layers that record events (`http`, `node`, `wal`) name their metrics here without
//! depending on the layer that exports them. The protocol core records nothing.
//!
//! Labels are named beside the metrics that carry them. Label values are bounded sets
//! (dialect and endpoint names, status codes, operations, member addresses, partition
//! indices), never keys or values.

/// Counter `{dialect, endpoint, status}`: client requests answered, by the dialect that
/// owns the path (`Dialect::name`, [`NO_DIALECT`] for a path none owns), the dialect's
/// name for the endpoint, and the numeric status code.
pub const HTTP_REQUESTS_TOTAL: &str = "kvs_http_requests_total";
/// Histogram `{dialect, endpoint}`: seconds from a request's arrival to its answer.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "kvs_http_request_duration_seconds";
/// Gauge: client requests holding a permit of the node's in-flight limit.
pub const HTTP_REQUESTS_IN_FLIGHT: &str = "kvs_http_requests_in_flight";
/// The `dialect` (and `endpoint`) label of a request whose path no dialect owns.
pub const NO_DIALECT: &str = "none";

/// Counter `{op}`: client requests this node forwarded to a replica of another
/// partition (or, its own replica refusing, to a peer); `op` is one of [`FORWARD_OPS`].
pub const FORWARDS_TOTAL: &str = "kvs_forwards_total";
/// The values of the `op` label of [`FORWARDS_TOTAL`].
pub const FORWARD_OPS: [&str; 4] = ["get", "put", "delete", "other"];

/// Counter `{outcome}`: streams to peers (`rpc::stream`) this node tried to open;
/// `outcome` is one of [`STREAM_OUTCOMES`].
pub const RPC_STREAMS_TOTAL: &str = "kvs_rpc_streams_total";
/// The values of the `outcome` label of [`RPC_STREAMS_TOTAL`]: upgraded, answered with
/// an HTTP status (the caller uses HTTP for a while), or no connection.
pub const STREAM_OUTCOMES: [&str; 3] = ["opened", "refused", "failed"];
/// Counter: calls from peers this node served on streams.
pub const RPC_STREAM_CALLS_TOTAL: &str = "kvs_rpc_stream_calls_total";

/// Gauge `{peer}`: per peer of this node's partition, the writes this replica has
/// applied that the peer had not applied as of its last sync request.
pub const REPLICATION_LAG_WRITES: &str = "kvs_replication_lag_writes";

/// Counter: digest rounds (state-based anti-entropy) this node started.
pub const ANTI_ENTROPY_ROUNDS_TOTAL: &str = "kvs_anti_entropy_rounds_total";
/// Counter: bytes of digest requests, answers and fetched pages, as encoded.
pub const ANTI_ENTROPY_BYTES_TOTAL: &str = "kvs_anti_entropy_bytes_total";

/// Histogram: seconds one `fdatasync` of the write-ahead log took.
pub const WAL_FSYNC_DURATION_SECONDS: &str = "kvs_wal_fsync_duration_seconds";
/// Histogram: client writes made durable by one group commit (committed together, in
/// memory only, with `--memory`).
pub const WAL_BATCH_WRITES: &str = "kvs_wal_batch_writes";

/// Gauge: the epoch of the view this node routes by (0 in no cluster).
pub const VIEW_EPOCH: &str = "kvs_view_epoch";
/// Gauge: 1 while this node takes part in a view change (its transition is not yet
/// installed), else 0.
pub const VIEW_CHANGE_IN_PROGRESS: &str = "kvs_view_change_in_progress";
/// Gauge: keys moved so far by the view change this node coordinates, or last
/// coordinated (0 on a node that never coordinated one since it started).
pub const VIEW_CHANGE_KEYS_MOVED: &str = "kvs_view_change_keys_moved";

/// Gauge `{partition}`: live keys this node stores, labelled with the partition it is
/// a replica of.
pub const PARTITION_KEYS: &str = "kvs_partition_keys";
/// Gauge `{partition}`: bytes of the files in this node's data directory.
pub const PARTITION_BYTES: &str = "kvs_partition_bytes";

/// Gauge `{peer}`: 1 while the failure detector believes the peer alive or only
/// suspected, 0 once it believes it dead.
pub const PEER_UP: &str = "kvs_peer_up";
/// Gauge `{peer, state}`: 1 for the failure detector's verdict about the peer
/// (`alive`, `suspected`, `dead`), 0 for the other two.
pub const PEER_HEALTH: &str = "kvs_peer_health";

/// Every metric above, for the checks that a dashboard or page names only these.
pub const ALL: [&str; 18] = [
    HTTP_REQUESTS_TOTAL,
    HTTP_REQUEST_DURATION_SECONDS,
    HTTP_REQUESTS_IN_FLIGHT,
    FORWARDS_TOTAL,
    RPC_STREAMS_TOTAL,
    RPC_STREAM_CALLS_TOTAL,
    REPLICATION_LAG_WRITES,
    ANTI_ENTROPY_ROUNDS_TOTAL,
    ANTI_ENTROPY_BYTES_TOTAL,
    WAL_FSYNC_DURATION_SECONDS,
    WAL_BATCH_WRITES,
    VIEW_EPOCH,
    VIEW_CHANGE_IN_PROGRESS,
    VIEW_CHANGE_KEYS_MOVED,
    PARTITION_KEYS,
    PARTITION_BYTES,
    PEER_UP,
    PEER_HEALTH,
];
