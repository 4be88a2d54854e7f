//! The I/O shell around the pure core: storage thread, sync tasks, routing, HTTP.
//!
//! # Design
//!
//! A [`Node`] owns its view, its store and, when it is a replica, three kinds of workers:
//!
//! * **The writer** (one OS thread): the only code that opens write transactions. It takes
//!   client writes and sync pages from a bounded queue, applies as many as are waiting
//!   (up to [`MAX_BATCH`]) in one transaction and commits once — group commit: one fsync
//!   serves the whole batch, and a client is answered only after that commit. It owns the
//!   [`Replica`] state machine and publishes its applied vector on a watch channel.
//! * **A puller per peer** of the partition: asks the peer for what this replica lacks
//!   ([`Request::Sync`]) every [`SYNC_INTERVAL`], at once when the peer pokes, and when a
//!   read needs to catch up. Idle rounds carry no data and cost no disk write.
//! * **A poker per peer**: after a commit with local writes, tells the peer to pull now
//!   ([`Request::Poke`]). Pokes coalesce (a `Notify` holds at most one permit), so a busy
//!   writer sends at most one poke per peer at a time.
//!
//! Requests for a key whose partition this node does not hold (or any key, on a proxy)
//! are forwarded to that partition's replicas, trusted ones first (see `cluster`), under a
//! global cap on forwards in flight ([`MAX_FORWARDS`]).
//!
//! A read whose causal token this replica cannot yet satisfy pokes its pullers and waits
//! up to [`CATCHUP_WAIT`] for the applied vector to catch up; then it asks a peer; only
//! then does it fail with a retryable "unavailable".
//!
//! # Caveats
//!
//! * A forwarded write that times out is retried at the next replica; if the first did
//!   apply it, the value is stored twice under two dots (same value, harmless siblings).
//! * The view is fixed for the life of the process here; view changes are their own issue.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::post;
use axum::Router;
use http_body_util::{BodyExt, Limited};
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::clock::{CausalToken, PartitionId, ReplicaId, TokenKey, VersionVector};
use crate::cluster::Liveness;
use crate::error::{Error, ErrorKind, Result};
use crate::placement::{slot_of, Role, View};
use crate::replica::{
    Replica, SnapshotPage, SnapshotRequest, SyncRequest, SyncResponse, WriteOutcome, WriteRequest,
};
use crate::rpc::{self, Envelope, ReadReply, Request, Response, Transport, WriteReply};
use crate::storage::{ReadTxn, Store};

/// How often a replica asks each peer for news when nothing pokes it. Bounds convergence
/// time after a peer comes back even if every poke was lost.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(200);
/// Timeout of one sync call; pages are small, so a slow answer means a sick peer.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(2);
/// Entries and bytes per sync page: small enough to keep memory flat and one commit
/// short, large enough that catching up 100k writes takes a few hundred round trips.
pub const SYNC_PAGE_ENTRIES: u32 = 1_000;
pub const SYNC_PAGE_BYTES: u32 = 4 * 1024 * 1024;
/// Pages pulled back to back before yielding to the next interval.
const MAX_PAGES_PER_ROUND: usize = 64;
/// Sync rounds a puller waits for another peer to fill a gap in its log before it copies
/// this peer's whole state (about 3 x [`SYNC_INTERVAL`]).
const GAP_PATIENCE_ROUNDS: u32 = 3;
/// How long a read waits for its replica to catch up with the client's token.
pub const CATCHUP_WAIT: Duration = Duration::from_millis(1_000);
/// Timeout of one forwarded client request: above [`CATCHUP_WAIT`], so a replica that is
/// catching up answers before we give up on it.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);
/// Forwarded requests in flight at once; beyond it clients get a retryable 503.
pub const MAX_FORWARDS: usize = 1_024;
/// Writer queue length: when full, request handlers wait (backpressure).
pub const WRITER_QUEUE: usize = 4_096;
/// Commands per transaction.
pub const MAX_BATCH: usize = 512;
/// How often the log is trimmed of entries every peer has.
const TRIM_INTERVAL: Duration = Duration::from_secs(5);
/// Timeout of a poke; it is only a hint.
const POKE_TIMEOUT: Duration = Duration::from_millis(500);

/// Resolves on Ctrl-C or SIGTERM (what `docker stop` and service managers send).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

/// Longest key the node accepts from any dialect or peer. Dialects have stricter rules
/// (200 characters for `/kv-store`); this bounds what reaches storage whatever the path.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value the node accepts from any dialect or peer (seeds store 1.5 MB values).
pub const MAX_VALUE_BYTES: usize = 2 * 1024 * 1024;

fn check_bounds(key: &str, value: Option<&[u8]>) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(Error::bad_request(format!(
            "key must be 1 to {MAX_KEY_BYTES} bytes"
        )));
    }
    if value.is_some_and(|v| v.len() > MAX_VALUE_BYTES) {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!("value is larger than {MAX_VALUE_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Milliseconds since the Unix epoch; the shell's clock, passed into the core.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

enum WriterCmd {
    Write(WriteRequest, oneshot::Sender<Result<WriteOutcome>>),
    Sync(SyncResponse, oneshot::Sender<Result<()>>),
    Trim(VersionVector),
    Stop,
}

/// The replica side of a node: present when the node belongs to a partition.
struct ReplicaHandle {
    partition: PartitionId,
    id: ReplicaId,
    /// The other replicas of the partition, with the notify that wakes their puller.
    peers: Vec<(String, Arc<Notify>)>,
    pokes: Vec<(String, Arc<Notify>)>,
    writer: mpsc::Sender<WriterCmd>,
    applied: watch::Receiver<VersionVector>,
    /// What each peer last said it has (from its sync requests); decides log trimming.
    peer_have: Mutex<BTreeMap<String, VersionVector>>,
}

/// One kvs server. See the module doc.
pub struct Node {
    addr: String,
    view: Arc<View>,
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    secret: String,
    /// Signs and checks client tokens; derived from `secret`, the same on every node.
    token_key: TokenKey,
    replica: Option<ReplicaHandle>,
    /// Plain mutex: held for a map lookup or update, never across an await.
    liveness: Mutex<Liveness>,
    forwards: Semaphore,
    /// Rotates the first replica tried, spreading forwarded load.
    next_peer: AtomicUsize,
}

/// Everything `Node::start` needs.
pub struct NodeConfig {
    pub addr: String,
    pub view: View,
    pub replica_id: ReplicaId,
    pub secret: String,
}

/// Handles to stop a running node's workers.
pub struct Workers {
    tasks: JoinSet<()>,
    writer: Option<(mpsc::Sender<WriterCmd>, std::thread::JoinHandle<()>)>,
}

impl Workers {
    /// Stops background tasks and lets the writer finish its batch.
    pub async fn stop(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        if let Some((tx, handle)) = self.writer.take() {
            let _ = tx.send(WriterCmd::Stop).await;
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

impl Node {
    /// Builds the node and starts its workers.
    pub fn start(
        cfg: NodeConfig,
        store: Arc<dyn Store>,
        transport: Arc<dyn Transport>,
    ) -> Result<(Arc<Node>, Workers)> {
        let view = Arc::new(cfg.view);
        let mut workers = Workers {
            tasks: JoinSet::new(),
            writer: None,
        };
        let replica = match view.role_of(&cfg.addr) {
            Some(Role::Replica(p)) => {
                let state = Replica::load(&*store.read()?, cfg.replica_id, p)?;
                let (applied_tx, applied_rx) = watch::channel(state.applied().clone());
                let (tx, rx) = mpsc::channel(WRITER_QUEUE);
                let peer_addrs: Vec<String> = view
                    .replicas(p)
                    .unwrap_or_default()
                    .iter()
                    .filter(|a| **a != cfg.addr)
                    .cloned()
                    .collect();
                let peers: Vec<_> = peer_addrs
                    .iter()
                    .map(|a| (a.clone(), Arc::new(Notify::new())))
                    .collect();
                let pokes: Vec<_> = peer_addrs
                    .iter()
                    .map(|a| (a.clone(), Arc::new(Notify::new())))
                    .collect();
                let poke_all: Vec<Arc<Notify>> = pokes.iter().map(|(_, n)| n.clone()).collect();
                let writer_store = store.clone();
                let handle = std::thread::Builder::new()
                    .name("kvs-writer".into())
                    .spawn(move || writer_loop(writer_store, state, rx, applied_tx, poke_all))
                    .map_err(|e| Error::internal(format!("spawning the writer thread: {e}")))?;
                workers.writer = Some((tx.clone(), handle));
                Some(ReplicaHandle {
                    partition: p,
                    id: cfg.replica_id,
                    peers,
                    pokes,
                    writer: tx,
                    applied: applied_rx,
                    peer_have: Mutex::new(BTreeMap::new()),
                })
            }
            Some(Role::Proxy) => None,
            None => {
                return Err(Error::bad_request(format!(
                    "this node's address {} is not in the view",
                    cfg.addr
                )))
            }
        };
        let node = Arc::new(Node {
            addr: cfg.addr,
            view,
            store,
            transport,
            token_key: TokenKey::derive(&cfg.secret),
            secret: cfg.secret,
            replica,
            liveness: Mutex::new(Liveness::default()),
            forwards: Semaphore::new(MAX_FORWARDS),
            next_peer: AtomicUsize::new(0),
        });
        if let Some(r) = &node.replica {
            for (peer, notify) in &r.peers {
                workers
                    .tasks
                    .spawn(puller(node.clone(), peer.clone(), notify.clone()));
            }
            for (peer, notify) in &r.pokes {
                workers
                    .tasks
                    .spawn(poker(node.clone(), peer.clone(), notify.clone()));
            }
            workers.tasks.spawn(trimmer(node.clone()));
        }
        Ok((node, workers))
    }

    pub fn view(&self) -> &View {
        &self.view
    }

    /// This node's role in its view.
    pub fn role(&self) -> Role {
        match &self.replica {
            Some(r) => Role::Replica(r.partition),
            None => Role::Proxy,
        }
    }

    /// Parses a client's causal token: it must be one this cluster issued, unaltered.
    pub fn parse_token(&self, text: &str) -> Result<CausalToken> {
        CausalToken::decode(text, self.view.cluster, &self.token_key)
            .map_err(|e| Error::bad_request(e.to_string()))
    }

    pub fn encode_token(&self, token: &CausalToken) -> String {
        token.encode(&self.token_key)
    }

    fn liveness(&self) -> std::sync::MutexGuard<'_, Liveness> {
        // Liveness is advisory; a panic while it was held cannot leave it inconsistent.
        self.liveness.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn local_partition(&self, p: PartitionId) -> Option<&ReplicaHandle> {
        self.replica.as_ref().filter(|r| r.partition == p)
    }

    /// Reads `key` for a client. `may_forward` is false for requests that were already
    /// forwarded to us, so a request never travels more than one hop.
    pub async fn get(&self, key: &str, token: CausalToken, may_forward: bool) -> Result<ReadReply> {
        check_bounds(key, None)?;
        let p = self.view.partition_of_key(key);
        match self.local_partition(p) {
            Some(r) => match self.read_local(r, key, &token).await {
                Err(e) if e.kind == ErrorKind::Unavailable && may_forward => {
                    // We could not catch up; a peer may already have what the client saw.
                    self.forward_get(p, key, token, true).await
                }
                other => other,
            },
            None if may_forward => self.forward_get(p, key, token, false).await,
            // Forwarded to us, but we do not hold the partition: say so, the sender
            // tries another replica.
            None => Err(self.not_a_replica(p)),
        }
    }

    /// Writes `key` for a client; durable on this replica (or the one forwarded to)
    /// before it returns.
    pub async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        token: CausalToken,
        may_forward: bool,
    ) -> Result<WriteReply> {
        check_bounds(key, Some(&value))?;
        let p = self.view.partition_of_key(key);
        match self.local_partition(p) {
            Some(r) => self.write_local(r, key, value, token).await,
            None if may_forward => {
                let req = Request::Put {
                    key: key.to_string(),
                    value,
                    token,
                };
                match self.forward(p, req, false).await? {
                    Response::Put(reply) => Ok(reply),
                    other => Err(unexpected(&other)),
                }
            }
            None => Err(self.not_a_replica(p)),
        }
    }

    async fn write_local(
        &self,
        r: &ReplicaHandle,
        key: &str,
        value: Vec<u8>,
        token: CausalToken,
    ) -> Result<WriteReply> {
        // Not needed for correctness (the token is folded into the new version's history,
        // so the write supersedes what the client saw either way), but it makes `created`
        // right: a client overwriting its own fresh key must not be told the key is new.
        // If the peers cannot help in time the write is accepted anyway: availability.
        self.catch_up(r, &token).await;
        let (tx, rx) = oneshot::channel();
        let req = WriteRequest {
            slot: slot_of(key),
            key: key.to_string(),
            value,
            token,
            now_ms: now_ms(),
        };
        r.writer
            .send(WriterCmd::Write(req, tx))
            .await
            .map_err(|_| Error::unavailable("the node is shutting down"))?;
        let outcome = rx
            .await
            .map_err(|_| Error::unavailable("the node is shutting down"))??;
        Ok(WriteReply {
            partition: r.partition,
            created: outcome.created,
            timestamp_ms: outcome.timestamp_ms,
            token: outcome.token,
        })
    }

    /// Waits (up to [`CATCHUP_WAIT`]) until this replica has applied everything `token`
    /// names in its partition, waking the pullers to fetch it. Returns whether it has.
    async fn catch_up(&self, r: &ReplicaHandle, token: &CausalToken) -> bool {
        if Replica::can_serve(&r.applied.borrow(), r.partition, token) {
            return true;
        }
        for (_, notify) in &r.peers {
            notify.notify_one();
        }
        let mut applied = r.applied.clone();
        let caught_up = tokio::time::timeout(
            CATCHUP_WAIT,
            applied.wait_for(|vv| Replica::can_serve(vv, r.partition, token)),
        )
        .await;
        matches!(caught_up, Ok(Ok(_)))
    }

    async fn read_local(
        &self,
        r: &ReplicaHandle,
        key: &str,
        token: &CausalToken,
    ) -> Result<ReadReply> {
        let slot = slot_of(key);
        for attempt in 0..2 {
            // The applied vector first, then the snapshot: it is published after each
            // commit, so the snapshot holds at least what the vector claims.
            let applied = r.applied.borrow().clone();
            let txn = self.store.read()?;
            let servable = Replica::can_serve(&applied, r.partition, token) || {
                let state = txn.get(slot, key)?.unwrap_or_default();
                Replica::can_serve_key(&applied, r.partition, token, &state)
            };
            if servable {
                let out = Replica::read(&*txn, r.partition, slot, key, token.clone())?;
                return Ok(ReadReply {
                    partition: r.partition,
                    value: out.value,
                    token: out.token,
                });
            }
            drop(txn);
            if attempt == 0 && !self.catch_up(r, token).await {
                break;
            }
        }
        Err(Error::unavailable(
            "this replica has not yet received writes the causal_payload depends on, and its peers did not supply them in time",
        ))
    }

    async fn forward_get(
        &self,
        p: PartitionId,
        key: &str,
        token: CausalToken,
        skip_self: bool,
    ) -> Result<ReadReply> {
        let req = Request::Get {
            key: key.to_string(),
            token,
        };
        match self.forward(p, req, skip_self).await? {
            Response::Get(reply) => Ok(reply),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends a client request to the replicas of `p`, one after another, until one answers.
    async fn forward(&self, p: PartitionId, req: Request, skip_self: bool) -> Result<Response> {
        let _permit = self
            .forwards
            .try_acquire()
            .map_err(|_| Error::unavailable("too many forwarded requests in flight; retry"))?;
        let replicas: Vec<String> = self
            .view
            .replicas(p)
            .ok_or_else(|| Error::internal(format!("partition {p} is not in the view")))?
            .iter()
            .filter(|a| !(skip_self && **a == self.addr))
            .cloned()
            .collect();
        let start = self.next_peer.fetch_add(1, Ordering::Relaxed);
        let order = self.liveness().order(&replicas, start, now_ms());
        let env = self.envelope(req);
        let mut last = format!("partition {p} has no other replica");
        for peer in order {
            match self.transport.call(&peer, &env, FORWARD_TIMEOUT).await {
                // A replica that cannot serve now, or whose disk fails: try the next one.
                Ok(Response::Error(e))
                    if matches!(e.kind, ErrorKind::Unavailable | ErrorKind::Internal) =>
                {
                    self.liveness().record_ok(&peer);
                    last = format!("{peer}: {e}");
                }
                Ok(Response::Error(e)) => return Err(e),
                Ok(resp) => {
                    self.liveness().record_ok(&peer);
                    return Ok(resp);
                }
                Err(e) => {
                    self.liveness().record_failure(&peer, now_ms());
                    last = e.to_string();
                }
            }
        }
        Err(Error::unavailable(format!(
            "no replica of partition {p} could serve the request (last: {last})"
        )))
    }

    fn envelope(&self, body: Request) -> Envelope {
        Envelope {
            from: self.addr.clone(),
            epoch: self.view.epoch,
            body,
        }
    }

    /// Handles one internal call from a peer (already authenticated).
    async fn handle_rpc(self: &Arc<Self>, env: Envelope) -> Response {
        if !self.view.is_member(&env.from) {
            return Response::Error(Error::bad_request(format!(
                "{} is not a member of this node's view",
                env.from
            )));
        }
        let result = match env.body {
            Request::Ping => Ok(Response::Ok),
            Request::Poke { partition } => {
                if let Some(r) = self.local_partition(partition) {
                    if let Some((_, n)) = r.peers.iter().find(|(a, _)| *a == env.from) {
                        n.notify_one();
                    }
                }
                Ok(Response::Ok)
            }
            Request::Sync(req) => self.serve_sync(&env.from, req).await.map(Response::Sync),
            Request::Snapshot(req) => self.serve_snapshot(req).await.map(Response::Snapshot),
            Request::Get { key, token } => self.get(&key, token, false).await.map(Response::Get),
            Request::Put { key, value, token } => {
                self.put(&key, value, token, false).await.map(Response::Put)
            }
        };
        result.unwrap_or_else(Response::Error)
    }

    async fn serve_sync(self: &Arc<Self>, from: &str, req: SyncRequest) -> Result<SyncResponse> {
        let r = self.serving_replica(req.partition)?;
        // Remember how far this peer is: it decides how much of the log may be trimmed.
        if r.peers.iter().any(|(a, _)| a == from) {
            r.peer_have
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(from.to_string(), req.have.clone());
        }
        let req = SyncRequest {
            max_entries: req.max_entries.min(SYNC_PAGE_ENTRIES),
            max_bytes: req.max_bytes.min(SYNC_PAGE_BYTES),
            ..req
        };
        self.serve_from_snapshot(r, move |txn, applied| {
            Replica::serve_sync(txn, applied, &req)
        })
        .await
    }

    async fn serve_snapshot(self: &Arc<Self>, req: SnapshotRequest) -> Result<SnapshotPage> {
        let r = self.serving_replica(req.partition)?;
        let req = SnapshotRequest {
            max_entries: req.max_entries.min(SYNC_PAGE_ENTRIES),
            max_bytes: req.max_bytes.min(SYNC_PAGE_BYTES),
            ..req
        };
        self.serve_from_snapshot(r, move |txn, applied| {
            Replica::serve_snapshot(txn, applied, &req)
        })
        .await
    }

    /// This node's replica of `partition`, for answering a peer.
    fn serving_replica(&self, partition: PartitionId) -> Result<&ReplicaHandle> {
        self.local_partition(partition)
            .ok_or_else(|| self.not_a_replica(partition))
    }

    /// Retryable: the caller should ask another replica of `partition`.
    fn not_a_replica(&self, partition: PartitionId) -> Error {
        Error::unavailable(format!(
            "{} is not a replica of partition {partition}",
            self.addr
        ))
    }

    /// Runs `serve` on a blocking thread over one store snapshot and the applied vector
    /// of that same snapshot, so what it claims matches what it reads.
    async fn serve_from_snapshot<T: Send + 'static>(
        self: &Arc<Self>,
        r: &ReplicaHandle,
        serve: impl FnOnce(&dyn ReadTxn, &VersionVector) -> crate::storage::Result<T> + Send + 'static,
    ) -> Result<T> {
        let (id, partition) = (r.id, r.partition);
        let node = self.clone();
        tokio::task::spawn_blocking(move || {
            let txn = node.store.read()?;
            let state = Replica::load(&*txn, id, partition)?;
            Ok(serve(&*txn, state.applied())?)
        })
        .await
        .map_err(|e| Error::internal(format!("serving task failed: {e}")))?
    }

    /// Hands a page to the writer and waits until it is committed.
    async fn apply_page(&self, r: &ReplicaHandle, resp: SyncResponse) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        r.writer
            .send(WriterCmd::Sync(resp, tx))
            .await
            .map_err(|_| Error::unavailable("the node is shutting down"))?;
        rx.await
            .map_err(|_| Error::unavailable("the node is shutting down"))?
    }

    /// Rebuilds this replica from `peer`'s whole state, page by page; see
    /// `Replica::serve_snapshot` for why the first page's vector may be claimed at the end.
    async fn transfer_snapshot(&self, r: &ReplicaHandle, peer: &str) -> Result<usize> {
        let mut after = None;
        let mut claim: Option<VersionVector> = None;
        let mut keys = 0;
        loop {
            let req = Request::Snapshot(SnapshotRequest {
                partition: r.partition,
                after,
                max_entries: SYNC_PAGE_ENTRIES,
                max_bytes: SYNC_PAGE_BYTES,
            });
            let page = match self
                .transport
                .call(peer, &self.envelope(req), SYNC_TIMEOUT)
                .await?
            {
                Response::Snapshot(page) => page,
                Response::Error(e) => return Err(e),
                other => return Err(unexpected(&other)),
            };
            let first = claim.get_or_insert_with(|| page.applied.clone()).clone();
            let done = page.next.is_none();
            keys += page.states.len();
            let resp = SyncResponse {
                states: page.states,
                covered: if done { first } else { VersionVector::new() },
                complete: true,
                ..SyncResponse::default()
            };
            self.apply_page(r, resp).await?;
            if done {
                return Ok(keys);
            }
            after = page.next;
        }
    }
}

fn unexpected(resp: &Response) -> Error {
    Error::internal(format!("unexpected answer from a peer: {resp:?}"))
}

/// The writer thread. See the module doc.
fn writer_loop(
    store: Arc<dyn Store>,
    mut replica: Replica,
    mut rx: mpsc::Receiver<WriterCmd>,
    applied_tx: watch::Sender<VersionVector>,
    pokes: Vec<Arc<Notify>>,
) {
    let mut trimmed = VersionVector::new();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let stop = batch.iter().any(|c| matches!(c, WriterCmd::Stop));
        let local_writes = batch.iter().any(|c| matches!(c, WriterCmd::Write(..)));
        let before = replica.clone();
        match run_batch(&*store, &mut replica, &mut trimmed, &batch) {
            Ok(outcomes) => {
                // Committed: only now may anyone learn of the writes. The vector goes
                // out first, so a client that reads right after its ack finds this
                // replica caught up instead of waking the pullers for nothing.
                applied_tx.send_if_modified(|vv| {
                    let changed = vv != replica.applied();
                    if changed {
                        *vv = replica.applied().clone();
                    }
                    changed
                });
                for (cmd, outcome) in batch.drain(..).zip(outcomes) {
                    match (cmd, outcome) {
                        (WriterCmd::Write(_, tx), Outcome::Write(out)) => {
                            let _ = tx.send(Ok(out));
                        }
                        (WriterCmd::Sync(_, tx), Outcome::Synced) => {
                            let _ = tx.send(Ok(()));
                        }
                        _ => {}
                    }
                }
                if local_writes {
                    for p in &pokes {
                        p.notify_one();
                    }
                }
            }
            Err(e) => {
                tracing::error!("commit failed, {} requests fail with it: {e}", batch.len());
                // Nothing was committed: forget the in-memory effects too.
                replica = before;
                for cmd in batch.drain(..) {
                    match cmd {
                        WriterCmd::Write(_, tx) => {
                            let _ = tx.send(Err(e.clone()));
                        }
                        WriterCmd::Sync(_, tx) => {
                            let _ = tx.send(Err(e.clone()));
                        }
                        WriterCmd::Trim(_) | WriterCmd::Stop => {}
                    }
                }
            }
        }
        if stop {
            break;
        }
    }
}

/// The result of one command of a batch, sent to its requester after the commit.
enum Outcome {
    Write(WriteOutcome),
    Synced,
    Nothing,
}

/// Applies a batch in one transaction and commits it (if anything changed).
fn run_batch(
    store: &dyn Store,
    replica: &mut Replica,
    trimmed: &mut VersionVector,
    batch: &[WriterCmd],
) -> Result<Vec<Outcome>> {
    let mut txn = store.write()?;
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut dirty = false;
    let mut new_trims = Vec::new();
    for cmd in batch {
        let outcome = match cmd {
            WriterCmd::Write(req, _) => {
                dirty = true;
                Outcome::Write(replica.write(&mut *txn, req.clone())?)
            }
            WriterCmd::Sync(resp, _) => {
                dirty = true;
                replica.apply_sync(&mut *txn, resp)?;
                Outcome::Synced
            }
            WriterCmd::Trim(floor) => {
                for (origin, upto) in floor.iter() {
                    if upto > trimmed.get(origin) {
                        txn.log_trim(origin, upto)?;
                        new_trims.push((origin, upto));
                        dirty = true;
                    }
                }
                Outcome::Nothing
            }
            WriterCmd::Stop => Outcome::Nothing,
        };
        outcomes.push(outcome);
    }
    if dirty {
        replica.persist(&mut *txn)?;
        txn.commit()?;
    }
    for (origin, upto) in new_trims {
        trimmed.raise(origin, upto);
    }
    Ok(outcomes)
}

/// Keeps this replica up to date with `peer`. See the module doc.
async fn puller(node: Arc<Node>, peer: String, wake: Arc<Notify>) {
    let Some(r) = node.replica.as_ref() else {
        return;
    };
    // The first round runs at once: a restarted replica catches up before anything else.
    let mut first = true;
    // Only transitions are logged, so a long outage is two lines, not one per round.
    let mut reachable = true;
    let mut gap_rounds = 0u32;
    loop {
        if !first {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(SYNC_INTERVAL) => {}
            }
        }
        first = false;
        for _ in 0..MAX_PAGES_PER_ROUND {
            let have = r.applied.borrow().clone();
            let req = Request::Sync(SyncRequest {
                partition: r.partition,
                have,
                max_entries: SYNC_PAGE_ENTRIES,
                max_bytes: SYNC_PAGE_BYTES,
            });
            let resp = match node
                .transport
                .call(&peer, &node.envelope(req), SYNC_TIMEOUT)
                .await
            {
                Ok(Response::Sync(resp)) => {
                    node.liveness().record_ok(&peer);
                    if !reachable {
                        tracing::info!(%peer, "peer replica reachable again");
                        reachable = true;
                    }
                    resp
                }
                Ok(other) => {
                    tracing::warn!(%peer, "sync refused: {other:?}");
                    break;
                }
                Err(e) => {
                    node.liveness().record_failure(&peer, now_ms());
                    if reachable {
                        tracing::warn!(%peer, "peer replica unreachable, will keep trying: {e}");
                        reachable = false;
                    }
                    break;
                }
            };
            let (complete, gap) = (resp.complete, resp.gap);
            if !resp.log.is_empty() || !resp.states.is_empty() {
                if let Err(e) = node.apply_page(r, resp).await {
                    tracing::warn!(%peer, "applying a sync page failed: {e}");
                    break;
                }
            }
            if gap {
                // This peer lacks log entries we need. Another peer may still have them,
                // so wait a few rounds before copying this peer's whole state; with a
                // single peer there is nobody else to wait for.
                gap_rounds += 1;
                if r.peers.len() == 1 || gap_rounds >= GAP_PATIENCE_ROUNDS {
                    gap_rounds = 0;
                    tracing::warn!(
                        %peer,
                        "log entries this replica needs are gone from the peers' logs; copying the peer's whole state"
                    );
                    match node.transfer_snapshot(r, &peer).await {
                        Ok(keys) => tracing::info!(%peer, keys, "full-state transfer done"),
                        Err(e) => {
                            tracing::warn!(%peer, "full-state transfer failed, will retry: {e}")
                        }
                    }
                }
                break;
            }
            gap_rounds = 0;
            if complete {
                break;
            }
        }
    }
}

/// Tells `peer` to pull after local writes. See the module doc.
async fn poker(node: Arc<Node>, peer: String, wake: Arc<Notify>) {
    let Some(r) = node.replica.as_ref() else {
        return;
    };
    loop {
        wake.notified().await;
        let env = node.envelope(Request::Poke {
            partition: r.partition,
        });
        if let Err(e) = node.transport.call(&peer, &env, POKE_TIMEOUT).await {
            tracing::trace!(%peer, "poke failed: {e}");
        }
    }
}

/// Periodically trims log entries every peer of the partition has.
async fn trimmer(node: Arc<Node>) {
    let Some(r) = node.replica.as_ref() else {
        return;
    };
    loop {
        tokio::time::sleep(TRIM_INTERVAL).await;
        let floor = {
            let have = r.peer_have.lock().unwrap_or_else(|p| p.into_inner());
            // Only trim when every peer has told us how far it is.
            if have.len() < r.peers.len() {
                continue;
            }
            let applied = r.applied.borrow().clone();
            Replica::trim_floor(&applied, have.values())
        };
        if floor.is_empty() {
            continue;
        }
        if r.writer.send(WriterCmd::Trim(floor)).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP

/// The whole HTTP surface of a node: client dialects and the internal endpoint.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route(rpc::RPC_PATH, post(rpc_endpoint))
        .merge(crate::api::kv_store::router())
        .fallback(crate::api::kv_store::unknown_path)
        .with_state(node)
}

/// Serves `node` on `listener` until `shutdown` resolves. The internal endpoint needs
/// each connection's peer address, which this supplies.
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Arc<Node>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(node).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn rpc_endpoint(
    State(node): State<Arc<Node>>,
    ConnectInfo(remote): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> HttpResponse {
    let given = headers
        .get(rpc::SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !rpc::secrets_match(given, node.secret.as_bytes()) {
        return (StatusCode::UNAUTHORIZED, "bad or missing cluster secret").into_response();
    }
    if headers.get(rpc::PROTO_HEADER).map(|v| v.as_bytes())
        != Some(rpc::PROTOCOL_VERSION.as_bytes())
    {
        return (
            StatusCode::BAD_REQUEST,
            "unsupported internal protocol version",
        )
            .into_response();
    }
    let bytes = match Limited::new(body, rpc::MAX_RPC_BYTES).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return (StatusCode::PAYLOAD_TOO_LARGE, "internal message too large").into_response()
        }
    };
    let env: Envelope = match rpc::decode(&bytes) {
        Ok(env) => env,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("undecodable message: {e}")).into_response()
        }
    };
    let claimed = env.from.parse::<std::net::SocketAddr>().map(|a| a.ip());
    if claimed.ok() != Some(remote.ip()) {
        return (
            StatusCode::FORBIDDEN,
            format!(
                "call claims to come from {} but arrived from {}",
                env.from,
                remote.ip()
            ),
        )
            .into_response();
    }
    let resp = node.handle_rpc(env).await;
    (
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        rpc::encode(&resp),
    )
        .into_response()
}
