//! Routing: requests for a key whose partition this node does not hold (or any key, on a
//! proxy) are forwarded to that partition's replicas, trusted ones first (see `cluster`),
//! under a global cap on forwards in flight ([`MAX_FORWARDS`]). A replica believed dead
//! is probed by one request per [`DEAD_PEER_PROBE_INTERVAL_MS`]; the others skip it, so a
//! cut-off partition fails its clients fast instead of holding each for a timeout. Also
//! here: the calls every other file makes to peers ([`Node::call`]), which tell the
//! failure detector how each went. Every forwarded client request is counted
//! (`metric_names::FORWARDS_TOTAL`): a client that routes to the key's replicas itself
//! causes none.
//!
//! # Caveats
//!
//! * A forwarded write whose replica may have received it but did not answer (timeout,
//!   connection lost), or that answered `ErrorKind::OutcomeUnknown` (its disk failed
//!   during the commit), is not retried elsewhere: the client gets a 503 and the write may
//!   still be applied later, as a sibling concurrent with the client's later writes (see
//!   `Node::forward` for why a retry would be worse). The nemesis found this: a retried
//!   write applied a second time after a partition healed brought an old value back.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};

use super::{lock, monotonic_ms, unexpected, Node};
use crate::clock::{CausalToken, PartitionUid};
use crate::cluster::Health;
use crate::error::{Error, ErrorKind, Result};
use crate::metric_names;
use crate::placement::View;
use crate::quorum::Level;
use crate::rpc::{CallError, Envelope, ReadReply, Request, Response, WriteReply};

/// Timeout of one forwarded client request: above
/// [`CATCHUP_WAIT`](super::CATCHUP_WAIT), so a replica that is catching up answers
/// before we give up on it.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);
/// A forwarded request not answered within this is also sent to the next replica.
/// Above [`CATCHUP_WAIT`](super::CATCHUP_WAIT), so a replica that is catching up
/// answers before we hedge.
pub const HEDGE_AFTER: Duration = Duration::from_millis(1_200);
/// Timeout of a forwarded request to a replica the failure detector believes dead.
pub const DEAD_PEER_TIMEOUT: Duration = Duration::from_millis(300);
/// A replica believed dead is probed by at most one forwarded request this often; the
/// others skip it and fail fast, rather than each spending [`DEAD_PEER_TIMEOUT`] on it.
pub const DEAD_PEER_PROBE_INTERVAL_MS: u64 = 250;
/// Forwarded requests in flight at once; beyond it clients get a retryable 503.
pub const MAX_FORWARDS: usize = 1_024;

impl Node {
    /// Sends `env` to `peer` over the transport and tells the failure detector how it
    /// went: any answer (a refusal too) is a sign of life, no answer a failure.
    pub(super) async fn send(
        &self,
        peer: &str,
        env: &Envelope,
        timeout: Duration,
    ) -> std::result::Result<Response, CallError> {
        let out = self.transport.call(peer, env, timeout).await;
        let now = monotonic_ms();
        match &out {
            Ok(_) | Err(CallError::Refused(..)) => self.liveness().record_ok(peer, now),
            Err(CallError::NotSent(..) | CallError::Unreachable(..) | CallError::Timeout(..)) => {
                self.liveness().record_failure(peer, now)
            }
        }
        out
    }

    /// Whether a failed request should be routed again: once, when the view changed
    /// while it was out.
    pub(super) fn should_reroute(
        &self,
        e: &Error,
        asked: &View,
        may_forward: bool,
        rerouted: &mut bool,
    ) -> bool {
        if !may_forward || *rerouted || e.kind != ErrorKind::Unavailable {
            return false;
        }
        *rerouted = true;
        self.epoch() != asked.epoch
    }

    pub(super) async fn forward_get(
        &self,
        view: &View,
        p: PartitionUid,
        key: &str,
        token: CausalToken,
        r: Level,
        skip_self: bool,
    ) -> Result<ReadReply> {
        let req = Request::Get {
            key: key.to_string(),
            token,
            r,
        };
        match self.forward(view, p, req, skip_self).await? {
            Response::Get(reply) => Ok(reply),
            other => Err(unexpected(&other)),
        }
    }

    /// Forwards a [`Request::Put`].
    pub(super) async fn forward_put(
        &self,
        view: &View,
        p: PartitionUid,
        req: Request,
        skip_self: bool,
    ) -> Result<WriteReply> {
        debug_assert!(
            matches!(req, Request::Put { .. }),
            "forward_put takes a put"
        );
        match self.forward(view, p, req, skip_self).await? {
            Response::Put(reply) => Ok(reply),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends a client request to the replicas of `p`, healthiest first, until one answers.
    ///
    /// A read not answered within [`HEDGE_AFTER`] keeps its chance, but the next replica
    /// is asked too and the first good answer wins: a replica that went silent mid-request
    /// (crash, partition) costs a second, not the whole [`FORWARD_TIMEOUT`].
    ///
    /// A write is never sent to a second replica once the first may have received it:
    /// each replica applying it would give it its own dot, and the copy applied late (a
    /// partitioned replica receiving it after the heal) would be concurrent with the
    /// client's later writes and could win over them, bringing an overwritten value back.
    /// So a write moves on only when the first replica certainly did not act on it (no
    /// connection, or it refused); otherwise its outcome is unknown and the client gets a
    /// 503 saying so (`ErrorKind::OutcomeUnknown`, also what a replica answers whose disk
    /// failed during the write). Writes try the replicas whose disks take writes first.
    async fn forward(
        &self,
        view: &View,
        p: PartitionUid,
        req: Request,
        skip_self: bool,
    ) -> Result<Response> {
        let _permit = self
            .forwards
            .try_acquire()
            .map_err(|_| Error::unavailable("too many forwarded requests in flight; retry"))?;
        // Once per client request, however many replicas it is then sent to.
        let [get, put, delete, other] = metric_names::FORWARD_OPS;
        let op = match &req {
            Request::Get { .. } => get,
            Request::Put { value: Some(_), .. } => put,
            Request::Put { value: None, .. } => delete,
            _ => other,
        };
        metrics::counter!(metric_names::FORWARDS_TOTAL, "op" => op).increment(1);
        let index = view.index_of(p).unwrap_or_default();
        let replicas: Vec<String> = view
            .replicas_of(p)
            .ok_or_else(|| Error::internal(format!("partition uid {p} is not in the view")))?
            .iter()
            .filter(|a| !(skip_self && **a == self.addr))
            .cloned()
            .collect();
        let start = self.next_peer.fetch_add(1, Ordering::Relaxed);
        let is_write = matches!(req, Request::Put { .. });
        let mut order = if is_write {
            self.liveness()
                .order_for_writes(&replicas, start, monotonic_ms())
        } else {
            self.liveness().order(&replicas, start, monotonic_ms())
        }
        .into_iter();
        let env = self.envelope(req);
        let env = &env;
        let ask = |peer: String| async move {
            // A peer believed dead has missed heartbeats for over a second: it gets one
            // short chance (in case it just came back), not the full timeout.
            let timeout = if self.liveness().health(&peer, monotonic_ms()) == Health::Dead {
                DEAD_PEER_TIMEOUT
            } else {
                FORWARD_TIMEOUT
            };
            let out = self.send(&peer, env, timeout).await;
            (peer, out)
        };
        let mut last = format!("partition {index} has no other replica");
        // The next replica worth asking: one believed dead only as its probe (see
        // `DEAD_PEER_PROBE_INTERVAL_MS`), so a partition cut off costs its clients an
        // immediate 503, not a timeout each.
        let mut next = |last: &mut String| {
            for peer in order.by_ref() {
                if self.may_ask(&peer) {
                    return Some(peer);
                }
                *last = format!("{peer} is believed down (no heartbeat for over a second)");
            }
            None
        };
        let mut asked = FuturesUnordered::new();
        let mut unsatisfiable = false;
        loop {
            if asked.is_empty() {
                match next(&mut last) {
                    Some(peer) => asked.push(ask(peer)),
                    None => break,
                }
            }
            let hedge = tokio::time::sleep(HEDGE_AFTER);
            tokio::select! {
                Some((peer, out)) = asked.next() => match out {
                    // A replica that cannot serve now, or whose disk fails: try the next.
                    // (Not after `OutcomeUnknown`: that write may be applied there.)
                    Ok(Response::Error(e))
                        if matches!(e.kind, ErrorKind::Unavailable | ErrorKind::Internal) =>
                    {
                        last = format!("{peer}: {e}");
                    }
                    // It lacks writes the client's context names: another replica may
                    // have them; if none does, the read is unsatisfiable, not unreachable.
                    Ok(Response::Error(e)) if e.kind == ErrorKind::Unsatisfiable => {
                        last = format!("{peer}: {e}");
                        unsatisfiable = true;
                    }
                    Ok(Response::Error(e)) => return Err(e),
                    Ok(resp) => return Ok(resp),
                    Err(e) if is_write && e.maybe_delivered() => {
                        return Err(Error::new(
                            ErrorKind::OutcomeUnknown,
                            format!("the write's outcome is unknown: {e}; it may still be applied"),
                        ))
                    }
                    Err(e) => last = e.to_string(),
                },
                () = hedge, if !is_write => {
                    if let Some(peer) = next(&mut last) {
                        asked.push(ask(peer));
                    }
                }
            }
        }
        let kind = if unsatisfiable {
            ErrorKind::Unsatisfiable
        } else {
            ErrorKind::Unavailable
        };
        Err(Error::new(
            kind,
            format!("no replica of partition {index} could serve the request (last: {last})"),
        ))
    }

    /// Whether a forwarded request may go to `peer`: yes unless it is believed dead and
    /// another request probed it less than [`DEAD_PEER_PROBE_INTERVAL_MS`] ago.
    fn may_ask(&self, peer: &str) -> bool {
        let now = monotonic_ms();
        if self.liveness().health(peer, now) != Health::Dead {
            return true;
        }
        let mut probes = lock(&self.probes);
        match probes.get(peer) {
            Some(&at) if now.saturating_sub(at) < DEAD_PEER_PROBE_INTERVAL_MS => false,
            _ => {
                probes.insert(peer.to_string(), now);
                true
            }
        }
    }

    pub(super) fn envelope(&self, body: Request) -> Envelope {
        Envelope {
            from: self.addr.clone(),
            epoch: self.epoch(),
            body,
        }
    }

    /// Calls `to` (this node itself included, without a network hop).
    pub(super) async fn call(
        self: &Arc<Self>,
        to: &str,
        req: Request,
        timeout: Duration,
    ) -> Result<Response> {
        let resp = if to == self.addr {
            let env = self.envelope(req);
            tokio::time::timeout(timeout, Box::pin(self.handle_rpc(env)))
                .await
                .map_err(|_| {
                    Error::unavailable(format!("{to} did not answer within {timeout:?}"))
                })?
        } else {
            self.send(to, &self.envelope(req), timeout).await?
        };
        match resp {
            Response::Error(e) => Err(e),
            other => Ok(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;
    use crate::node::NodeConfig;
    use crate::rpc::{CallFuture, Transport};
    use crate::storage::MemoryStore;

    /// A transport whose answers to client requests are scripted per peer; everything
    /// else (heartbeats, status, sync) finds no one.
    #[derive(Default)]
    struct Scripted {
        /// Per peer, what it does with a forwarded Get/Put: `None` = goes silent.
        answers: Mutex<BTreeMap<String, Option<Response>>>,
        /// (peer, "get" | "put") of every forwarded client request, in order.
        calls: Mutex<Vec<(String, &'static str)>>,
        /// Whether heartbeats are answered (so every peer stays alive however slowly a
        /// test runs); otherwise they find no one.
        pings: std::sync::atomic::AtomicBool,
    }

    impl Transport for Scripted {
        fn call(&self, to: &str, envelope: &Envelope, timeout: Duration) -> CallFuture<'_> {
            let kind = match envelope.body {
                Request::Get { .. } => Some("get"),
                Request::Put { .. } => Some("put"),
                _ => None,
            };
            let to = to.to_string();
            let pong = matches!(envelope.body, Request::Ping) && self.pings.load(Ordering::Relaxed);
            Box::pin(async move {
                if pong {
                    return Ok(Response::Ok);
                }
                let Some(kind) = kind else {
                    return Err(CallError::NotSent(to, "scripted: nobody there".into()));
                };
                lock(&self.calls).push((to.clone(), kind));
                let answer = lock(&self.answers).get(&to).cloned().flatten();
                match answer {
                    Some(resp) => Ok(resp),
                    None => {
                        // Silent: the request went out, no answer comes back.
                        tokio::time::sleep(timeout).await;
                        Err(CallError::Timeout(to, timeout))
                    }
                }
            })
        }
    }

    /// A proxy (C) in front of one partition with replicas A and B; A goes silent.
    fn proxy_with_silent_replica() -> (Arc<Node>, Arc<Scripted>, View) {
        let members = ["10.9.0.1:8080", "10.9.0.2:8080", "10.9.0.3:8080"].map(String::from);
        let view = View::bootstrap(members.to_vec(), 2).expect("valid view");
        let uid = view.partitions[0].uid;
        let transport = Arc::new(Scripted::default());
        {
            let mut answers = lock(&transport.answers);
            answers.insert(members[0].clone(), None);
            answers.insert(
                members[1].clone(),
                Some(Response::Get(ReadReply {
                    partition: uid,
                    index: 0,
                    value: Some((b"v".to_vec(), 1)),
                    token: CausalToken::default(),
                    context: Default::default(),
                    known: false,
                    served_by: members[1].clone(),
                    siblings: Default::default(),
                })),
            );
        }
        let cfg = NodeConfig {
            addr: members[2].clone(),
            env_view: Some(view.clone()),
            k: Some(2),
            secret: "s".into(),
            admin_token: None,
            join: None,
            levels: Default::default(),
            tombstone_horizon: std::time::Duration::from_secs(60),
            auto_replace_after: None,
        };
        let node =
            Node::start(cfg, Arc::new(MemoryStore::new()), transport.clone()).expect("starts");
        (node, transport, view)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_write_is_not_retried_once_a_replica_may_have_received_it() {
        let (node, transport, view) = proxy_with_silent_replica();
        // Make the silent replica the first one asked.
        let first = view.partitions[0].replicas[0].clone();
        let mut result = None;
        for _ in 0..view.partitions[0].replicas.len() {
            lock(&transport.calls).clear();
            let r = node
                .put("key", b"v".to_vec(), CausalToken::default(), None, true)
                .await;
            if lock(&transport.calls).first().map(|c| &c.0) == Some(&first) {
                result = Some(r);
                break;
            }
        }
        let result = result.expect("the silent replica was asked first once");
        let err = result.expect_err("the write's outcome is unknown");
        assert_eq!(err.kind, ErrorKind::OutcomeUnknown);
        assert!(err.message.contains("outcome is unknown"), "{err:?}");
        assert_eq!(
            *lock(&transport.calls),
            vec![(first, "put")],
            "no second replica may be asked"
        );
        node.shutdown().await;
    }

    /// A write answered "outcome unknown" by the first replica stops there; one answered
    /// "unavailable" (certainly not applied: a disk that refuses writes) moves on.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_write_stops_at_an_unknown_outcome_and_moves_on_after_a_refusal() {
        let (node, transport, view) = proxy_with_silent_replica();
        // The replicas must stay alive to be asked in turn, however slow this run is.
        transport.pings.store(true, Ordering::Relaxed);
        let (first, second) = (
            view.partitions[0].replicas[0].clone(),
            view.partitions[0].replicas[1].clone(),
        );
        let accepted = Response::Put(WriteReply {
            partition: view.partitions[0].uid,
            index: 0,
            created: true,
            timestamp_us: 1,
            token: CausalToken::default(),
            served_by: second.clone(),
        });
        lock(&transport.answers).insert(second.clone(), Some(accepted));
        for (answer, moves_on) in [
            (
                Error::new(ErrorKind::OutcomeUnknown, "disk failed mid-commit"),
                false,
            ),
            (Error::unavailable("this node's disk refuses writes"), true),
        ] {
            let kind = answer.kind;
            lock(&transport.answers).insert(first.clone(), Some(Response::Error(answer)));
            let mut seen = false;
            for _ in 0..view.partitions[0].replicas.len() {
                lock(&transport.calls).clear();
                let r = node
                    .put("key", b"v".to_vec(), CausalToken::default(), None, true)
                    .await;
                let calls = lock(&transport.calls).clone();
                if calls.first().map(|c| &c.0) != Some(&first) {
                    continue;
                }
                seen = true;
                if moves_on {
                    assert!(r.is_ok(), "{kind:?}: {r:?}");
                    assert_eq!(calls.len(), 2, "{kind:?}: {calls:?}");
                } else {
                    assert_eq!(r.expect_err("unknown").kind, ErrorKind::OutcomeUnknown);
                    assert_eq!(calls.len(), 1, "{kind:?}: no second replica: {calls:?}");
                }
                break;
            }
            assert!(seen, "{kind:?}: the first replica was never asked first");
        }
        node.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_read_hedges_to_the_next_replica_when_the_first_is_silent() {
        let (node, transport, view) = proxy_with_silent_replica();
        let first = view.partitions[0].replicas[0].clone();
        for _ in 0..view.partitions[0].replicas.len() {
            lock(&transport.calls).clear();
            let started = tokio::time::Instant::now();
            let reply = node
                .get("key", CausalToken::default(), None, true)
                .await
                .expect("the other replica answers");
            assert_eq!(reply.value.map(|(v, _)| v), Some(b"v".to_vec()));
            let calls = lock(&transport.calls).clone();
            if calls.first().map(|c| &c.0) == Some(&first) {
                assert_eq!(calls.len(), 2, "{calls:?}");
                // Hedged after HEDGE_AFTER, not after the whole timeout.
                assert!(
                    started.elapsed() < FORWARD_TIMEOUT,
                    "{:?}",
                    started.elapsed()
                );
                node.shutdown().await;
                return;
            }
        }
        panic!("the silent replica was never asked first");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn replicas_believed_dead_get_one_probe_and_the_rest_fail_fast() {
        let (node, transport, view) = proxy_with_silent_replica();
        let replicas = view.partitions[0].replicas.clone();
        for r in &replicas {
            lock(&transport.answers).insert(r.clone(), None);
        }
        // Heartbeats find nobody: both replicas are soon believed dead.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !replicas
            .iter()
            .all(|r| node.liveness().health(r, monotonic_ms()) == Health::Dead)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never believed dead"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let reads = (0..20).map(|_| async {
            let started = tokio::time::Instant::now();
            let r = node.get("key", CausalToken::default(), None, true).await;
            (r, started.elapsed())
        });
        let results = futures_util::future::join_all(reads).await;
        for (r, _) in &results {
            let err = r.as_ref().expect_err("no replica can answer");
            assert_eq!(err.kind, ErrorKind::Unavailable, "{err:?}");
        }
        // Probes take DEAD_PEER_TIMEOUT, longer than the probe interval, so a probing
        // read may probe the second replica too: at most two probes per replica.
        let calls = lock(&transport.calls).len();
        assert!(
            (1..=4).contains(&calls),
            "a probe per dead replica, not one per request: {calls} calls"
        );
        let fast = results
            .iter()
            .filter(|(_, took)| *took < Duration::from_millis(100))
            .count();
        assert!(
            fast >= 20 - calls,
            "only {fast} of 20 reads failed at once: {:?}",
            results.iter().map(|(_, t)| t).collect::<Vec<_>>()
        );
        node.shutdown().await;
    }
}
