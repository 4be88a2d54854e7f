//! The service the dialects call: get, put and delete in dialect-neutral types, the
//! local read and write paths of a replica, and the client's causal tokens.
//!
//! A request is routed by the view the node holds when it starts (re-routed once if the
//! epoch moved under it): served here when this node is a replica of the key's
//! partition, forwarded otherwise (`routing.rs`). During a view change requests are
//! routed by the old view; writes to slots that are moving get a retryable
//! "unavailable".
//!
//! A read whose causal token this replica cannot yet satisfy pokes its pullers and waits
//! up to [`CATCHUP_WAIT`] for its vectors to catch up; then it asks a peer; only then does
//! it fail with a retryable "unavailable". A write is held to the same rule (see
//! `Replica::accepts_write`): after the wait it goes to another replica, or fails
//! without being applied. A token from a newer view than this node's
//! makes the node learn that view first ([`super::VIEW_CATCHUP_WAIT`]). When the
//! replica that answers has never heard of a key, the partition's other replicas are
//! asked before the key is called missing (`Node::unknown_here`), so a write another
//! replica took a moment ago is seen.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::StreamExt;
use tokio::sync::oneshot;

use super::quorum::AckWaiter;
use super::{monotonic_ms, now_us, Node, ReplicaHandle, ReplicaStatus, WriterCmd};
use crate::clock::{CausalToken, PartitionUid};
use crate::cluster::Health;
use crate::error::{Error, ErrorKind, Result};
use crate::placement::{slot_of, View};
use crate::quorum::Level;
use crate::replica::{Replica, WriteMode, WriteRequest};
use crate::rpc::{ReadReply, Request, Response, WriteReply};

/// How long a read waits for its replica to catch up with the client's token.
pub const CATCHUP_WAIT: Duration = Duration::from_millis(1_000);
/// How long a replica that never heard of a key asks a peer before it answers that the
/// key does not exist (see `Node::unknown_here`). Writes reach the other replicas in
/// milliseconds; this covers a read that races one.
pub const MISS_WAIT: Duration = Duration::from_millis(300);
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

impl Node {
    /// Parses a client's causal token: it must be one this cluster issued, unaltered.
    /// Waits (up to [`KEY_WAIT`](super::KEY_WAIT)) while this node obtains the cluster
    /// key.
    pub async fn parse_token(&self, text: &str) -> Result<CausalToken> {
        self.current().view()?;
        let keys = self.wait_for_keys().await?;
        CausalToken::decode(text, keys.id, &keys.token_key)
            .map_err(|e| Error::bad_request(e.to_string()))
    }

    /// The keys tokens are encoded with, or the retryable error of a node that has not
    /// received its cluster's key yet.
    pub(super) fn token_keys(&self) -> Result<Arc<super::Keys>> {
        self.keys().ok_or_else(|| {
            Error::unavailable("this node has not yet received its cluster's key; retry shortly")
        })
    }

    /// Encodes a token for a client, stamped with this node's epoch and without entries
    /// of partitions that no longer exist. Fails only on a node without the cluster key
    /// (one that never parsed the client's token).
    pub fn encode_token(&self, token: &CausalToken) -> Result<String> {
        let keys = self.token_keys()?;
        let cur = self.current();
        let mut token = token.clone();
        token.observe_epoch(cur.epoch());
        // Only prune when this node is at least as new as everything the client saw: a
        // uid missing here could otherwise be a partition of a view we do not know yet.
        if token.epoch <= cur.epoch() {
            if let Some(view) = &cur.view {
                let next = cur.transition.as_ref().map(|t| t.to());
                token.retain_partitions(|uid| {
                    view.replicas_of(uid).is_some()
                        || next.is_some_and(|n| n.replicas_of(uid).is_some())
                });
            }
        }
        Ok(token.encode(&keys.token_key))
    }

    /// Reads `key` for a client. `may_forward` is false for requests that were already
    /// forwarded to us, so a request never travels more than one hop.
    ///
    /// `level` is how many replicas' state the answer merges (`None`: the cluster's
    /// default; see `crate::quorum`).
    pub async fn get(
        self: &Arc<Self>,
        key: &str,
        token: CausalToken,
        level: Option<Level>,
        may_forward: bool,
    ) -> Result<ReadReply> {
        check_bounds(key, None)?;
        let level = level.unwrap_or(self.levels.read);
        if may_forward {
            self.catch_up_view(self.epoch_needed(&token)).await?;
        }
        let mut rerouted = false;
        loop {
            let cur = self.current();
            let view = cur.view()?.clone();
            let p = view.partition_of_key(key);
            let need = self.needed(&view, p, level)?;
            let result = match cur.local(p) {
                Some(r) => match self.read_here(&view, r, key, &token, need).await {
                    Err(e)
                        if matches!(e.kind, ErrorKind::Unavailable | ErrorKind::Unsatisfiable)
                            && may_forward =>
                    {
                        // We could not catch up; a peer may already have what the client saw.
                        self.forward_get(&view, p, key, token.clone(), level, true)
                            .await
                            .map_err(|other| with_local_reason(&e, other))
                    }
                    other => other,
                },
                None if may_forward => {
                    self.forward_get(&view, p, key, token.clone(), level, false)
                        .await
                }
                // Forwarded to us, but we do not hold the partition: say so, the sender
                // tries another replica.
                None => Err(self.not_a_replica(p)),
            };
            match result {
                // The view changed while we asked (the key may have moved): once more.
                Err(e) if self.should_reroute(&e, &view, may_forward, &mut rerouted) => continue,
                Ok(reply) if may_forward && reply.value.is_none() && !reply.known => {
                    return Ok(self.unknown_here(&view, p, key, &token, reply).await)
                }
                other => return other,
            }
        }
    }

    /// A read answered "no such key" by a replica that has never heard of the key at
    /// all (no value, no tombstone): a write another replica accepted a moment ago may
    /// just not have reached it yet, so the partition's other replicas are asked, for
    /// at most [`MISS_WAIT`], and the first value one has is returned; else `miss`. A
    /// replica that holds a tombstone answers as it is: a peer that has not seen the
    /// delete yet would bring the value back.
    async fn unknown_here(
        self: &Arc<Self>,
        view: &View,
        p: PartitionUid,
        key: &str,
        token: &CausalToken,
        miss: ReadReply,
    ) -> ReadReply {
        let Some(replicas) = view.replicas_of(p).filter(|r| r.len() > 1) else {
            return miss;
        };
        let mut asked = self.ask_for_key(
            replicas.iter().filter(|r| **r != self.addr),
            key,
            token,
            MISS_WAIT,
        );
        let found = async {
            while let Some(answer) = asked.next().await {
                if let Ok(Response::Get(reply)) = answer {
                    if reply.value.is_some() {
                        return Some(reply);
                    }
                }
            }
            None
        };
        tokio::time::timeout(MISS_WAIT, found)
            .await
            .ok()
            .flatten()
            .unwrap_or(miss)
    }

    /// Writes `key` for a client; durable on this replica (or the one forwarded to),
    /// and on as many replicas as `level` asks (`None`: the cluster's default), before
    /// it returns.
    pub async fn put(
        self: &Arc<Self>,
        key: &str,
        value: Vec<u8>,
        token: CausalToken,
        level: Option<Level>,
        may_forward: bool,
    ) -> Result<WriteReply> {
        self.write(
            key,
            Some(value),
            token,
            level,
            WriteMode::default(),
            may_forward,
        )
        .await
    }

    /// Deletes `key` for a client: writes a tombstone, durable like a write. The reply's
    /// `created` is true when the key did not exist (and nothing was written).
    pub async fn delete(
        self: &Arc<Self>,
        key: &str,
        token: CausalToken,
        level: Option<Level>,
        may_forward: bool,
    ) -> Result<WriteReply> {
        self.write(key, None, token, level, WriteMode::default(), may_forward)
            .await
    }

    /// A put (`Some`) or a delete (`None`) that replaces what `mode` says, if its
    /// condition holds at the accepting replica (the seed dialects' put and delete
    /// replace everything, unconditionally).
    pub async fn write(
        self: &Arc<Self>,
        key: &str,
        value: Option<Vec<u8>>,
        token: CausalToken,
        level: Option<Level>,
        mode: WriteMode,
        may_forward: bool,
    ) -> Result<WriteReply> {
        check_bounds(key, value.as_deref())?;
        let level = level.unwrap_or(self.levels.write);
        let forwarded = || Request::Put {
            key: key.to_string(),
            value: value.clone(),
            token: token.clone(),
            w: level,
            mode: mode.clone(),
        };
        if may_forward {
            self.catch_up_view(self.epoch_needed(&token)).await?;
        }
        let mut rerouted = false;
        loop {
            let cur = self.current();
            let view = cur.view()?.clone();
            let slot = slot_of(key);
            let p = view.owner_of_slot(slot);
            let need = self.needed(&view, p, level)?;
            if let Some(t) = &cur.transition {
                let next = t.to().owner_of_slot(slot);
                if next != p {
                    return Err(Error::unavailable(format!(
                        "key {key:?} is moving to partition {} (view change to epoch {} in progress); retry shortly",
                        t.to().index_of(next).unwrap_or_default(),
                        t.to().epoch
                    )));
                }
            }
            let result = match cur.local(p) {
                Some(r) => {
                    match self
                        .write_local(
                            &view,
                            r,
                            WriteRequest {
                                slot,
                                key: key.to_string(),
                                value: value.clone(),
                                token: token.clone(),
                                now_us: now_us(),
                                mode: mode.clone(),
                            },
                            need,
                        )
                        .await
                    {
                        // This replica is leaving its partition, was replaced, or its
                        // disk refuses writes: its peers take the write (with none, its
                        // own refusal says best why the write failed).
                        Err(e)
                            if e.kind == ErrorKind::Unavailable
                                && may_forward
                                && !r.peers.is_empty() =>
                        {
                            self.forward_put(&view, p, forwarded(), true)
                                .await
                                .map_err(|other| with_local_reason(&e, other))
                        }
                        other => other,
                    }
                }
                None if may_forward => self.forward_put(&view, p, forwarded(), false).await,
                None => Err(self.not_a_replica(p)),
            };
            match result {
                Err(e) if self.should_reroute(&e, &view, may_forward, &mut rerouted) => continue,
                other => return other,
            }
        }
    }

    /// Applies a write at this replica and, when `need` replicas must hold it, waits
    /// for `need - 1` peers to confirm it (see `quorum.rs`).
    async fn write_local(
        self: &Arc<Self>,
        view: &View,
        r: &ReplicaHandle,
        mut req: WriteRequest,
        need: usize,
    ) -> Result<WriteReply> {
        // A disk that refuses writes makes waiting pointless: its peers take the write.
        if let Some(fault) = self.disk_fault() {
            return Err(fault.refusal());
        }
        if req.mode.condition.is_some() {
            let token = std::mem::take(&mut req.token);
            req.token = self.with_peers_view_of_key(r, &req.key, token).await;
        }
        let token = &req.token;
        // The replica must reflect what the client saw in this partition before it
        // accepts the write (see `Replica::accepts_write`): wait for the peers to supply
        // it, then give up; the caller tries another replica, which may have it.
        if !self.catch_up(r, token).await {
            return Err(Error::unavailable(format!(
                "this replica has not received writes the causal context depends on (partition {}), \
                 and its peers did not supply them within {CATCHUP_WAIT:?}; the write was not applied",
                view.index_of(r.partition).unwrap_or_default()
            )));
        }
        let _waiting = (need > 1).then(|| AckWaiter::new(r));
        let (tx, rx) = oneshot::channel();
        self.send_writer(WriterCmd::Write {
            req,
            partition: r.partition,
            tx,
        })
        .await?;
        let mut outcome = rx
            .await
            .map_err(|_| Error::unavailable("the node is shutting down"))??;
        if let Some(dot) = outcome.dot.filter(|_| need > 1) {
            self.await_acks(view, r, dot, need - 1).await?;
        }
        outcome.token.observe_epoch(view.epoch);
        Ok(WriteReply {
            partition: r.partition,
            index: view.index_of(r.partition).unwrap_or_default(),
            created: outcome.created,
            timestamp_us: outcome.timestamp_us,
            token: outcome.token,
            served_by: self.addr.clone(),
        })
    }

    /// Waits (up to [`CATCHUP_WAIT`]) until this replica reflects everything `token`
    /// names in its partition, waking the pullers to fetch it. Returns whether it does.
    async fn catch_up(&self, r: &ReplicaHandle, token: &CausalToken) -> bool {
        let ready = |s: &Option<Arc<ReplicaStatus>>| {
            s.as_ref()
                .is_some_and(|s| s.id == r.id && Replica::can_serve(&s.served, r.partition, token))
        };
        if ready(&self.replica_status.borrow()) {
            return true;
        }
        // Writes this replica lacks can only come from its peers: when the failure
        // detector believes all of them dead, waiting is pointless, and failing now lets
        // the forwarder try a replica on the other side of the fault.
        let now = monotonic_ms();
        if !r.peers.is_empty()
            && r.peers
                .iter()
                .all(|(peer, _)| self.liveness().health(peer, now) == Health::Dead)
        {
            return false;
        }
        for (_, notify) in &r.peers {
            notify.notify_one();
        }
        let mut status = self.replica_status.clone();
        let caught_up = tokio::time::timeout(CATCHUP_WAIT, status.wait_for(ready)).await;
        matches!(caught_up, Ok(Ok(_)))
    }

    /// Reads at this replica, merging the state of `need - 1` peers when `need` > 1.
    async fn read_here(
        self: &Arc<Self>,
        view: &View,
        r: &ReplicaHandle,
        key: &str,
        token: &CausalToken,
        need: usize,
    ) -> Result<ReadReply> {
        if need > 1 {
            self.read_quorum(view, r, key, token, need - 1).await
        } else {
            self.read_local(view, r, key, token).await
        }
    }

    pub(super) async fn read_local(
        &self,
        view: &View,
        r: &ReplicaHandle,
        key: &str,
        token: &CausalToken,
    ) -> Result<ReadReply> {
        let slot = slot_of(key);
        for attempt in 0..2 {
            // The vectors first, then the snapshot: they are published after each
            // commit, so the snapshot holds at least what the vectors claim.
            let status = self
                .status_of(r)
                .ok_or_else(|| self.not_a_replica(r.partition))?;
            let txn = self.store.read()?;
            let servable = Replica::can_serve(&status.served, r.partition, token) || {
                let state = txn.get(slot, key)?.unwrap_or_default();
                Replica::can_serve_key(&status.served, r.partition, token, &state)
            };
            if servable {
                let mut out = Replica::read(&*txn, r.partition, slot, key, token.clone())?;
                out.token.observe_epoch(view.epoch);
                return Ok(ReadReply {
                    partition: r.partition,
                    index: view.index_of(r.partition).unwrap_or_default(),
                    value: out.value,
                    token: out.token,
                    context: out.context,
                    known: out.known,
                    served_by: self.addr.clone(),
                    siblings: out.siblings,
                });
            }
            drop(txn);
            if attempt == 0 && !self.catch_up(r, token).await {
                break;
            }
        }
        Err(Error::new(
            ErrorKind::Unsatisfiable,
            "this replica has not yet received writes the causal context depends on, and its peers did not supply them in time",
        ))
    }

    /// Retryable: the caller should ask another replica of `partition`.
    pub(super) fn not_a_replica(&self, partition: PartitionUid) -> Error {
        Error::unavailable(format!(
            "{} is not a replica of partition uid {partition} in its view",
            self.addr
        ))
    }
}

/// The error of a request this replica could not serve and its peers could not either:
/// both reasons, the local one first (it is usually why the client's request failed).
fn with_local_reason(local: &Error, peers: Error) -> Error {
    if !matches!(
        peers.kind,
        ErrorKind::Unavailable | ErrorKind::Unsatisfiable
    ) {
        return peers;
    }
    // Unsatisfiable if either side found the context unsatisfiable: the client's
    // context is the reason, whatever else failed.
    let kind = if peers.kind == ErrorKind::Unsatisfiable {
        peers.kind
    } else {
        local.kind
    };
    Error::new(
        kind,
        format!(
            "{}; and the other replicas could not serve it: {}",
            local.message, peers.message
        ),
    )
}
