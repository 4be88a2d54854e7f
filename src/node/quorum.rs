//! Quorum reads and writes at a replica (see `crate::quorum` for the levels and why
//! they give "a read sees every acknowledged write" when R + W > K).
//!
//! A quorum write is applied here like any write, then waits until W − 1 peers report,
//! through their sync requests, a `have` vector holding its dot. While one waits, the
//! sync pages this replica serves say `ack_wanted`, so a peer reports right after it
//! applies the page instead of at its next interval: the wait costs a poke, a pull and
//! a second, empty pull. A peer's `have` only ever names writes it committed, so a
//! counted peer holds the write durably.
//!
//! A quorum read asks R − 1 peers for their state of the key, with an empty token so
//! they answer at once, folds what they hold into the client's token, and reads here
//! with that token: this replica catches up (pulling from its peers) before it answers,
//! exactly as for a client whose token is ahead of it. The answer thus reflects every
//! version any of the R replicas held, siblings kept and resolved as usual. Peers that
//! were behind catch up by their own pulls (every [`super::SYNC_INTERVAL`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};

use super::{lock, Node, ReplicaHandle};
use crate::clock::{CausalToken, Dot};
use crate::error::{Error, ErrorKind, Result};
use crate::placement::View;
use crate::quorum::{acks, Level};
use crate::replica::Replica;
use crate::rpc::{ReadReply, Request, Response};

/// How long a quorum read waits for its peers' answers, and a quorum write for its
/// peers' acknowledgements. With the catch-up that may follow it stays under the
/// forwarding timeout, so a forwarded quorum request answers with its own reason.
pub const QUORUM_WAIT: Duration = Duration::from_millis(1_500);

/// Counts a write waiting for acknowledgements on a replica for as long as it lives.
pub(super) struct AckWaiter<'a>(&'a ReplicaHandle);

impl<'a> AckWaiter<'a> {
    /// Registers before the write is applied, so every sync page that can carry it
    /// already asks for the report.
    pub(super) fn new(r: &'a ReplicaHandle) -> Self {
        r.ack_waiters.fetch_add(1, Ordering::SeqCst);
        Self(r)
    }
}

impl Drop for AckWaiter<'_> {
    fn drop(&mut self) {
        self.0.ack_waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Node {
    /// Reads `key` at each of `replicas` (level 1, no forwarding), all at once; the
    /// answers in the order they come.
    pub(super) fn ask_for_key<'a>(
        self: &'a Arc<Self>,
        replicas: impl Iterator<Item = &'a String>,
        key: &str,
        token: &CausalToken,
        timeout: Duration,
    ) -> FuturesUnordered<impl std::future::Future<Output = Result<Response>> + 'a> {
        replicas
            .map(|replica| {
                let req = Request::Get {
                    key: key.to_string(),
                    token: token.clone(),
                    r: Level::ONE,
                };
                self.call(replica, req, timeout)
            })
            .collect()
    }

    /// `token` with what every peer of `r` that answers within [`QUORUM_WAIT`] holds of
    /// `key` folded in. A conditional write goes on with it, so the replica catches up
    /// with those versions before it checks the condition: writes other clients made
    /// through other replicas are seen as soon as they reached any replica that
    /// answers (not those still in flight to all of them; see `writemode`).
    pub(super) async fn with_peers_view_of_key(
        self: &Arc<Self>,
        r: &ReplicaHandle,
        key: &str,
        token: CausalToken,
    ) -> CausalToken {
        let probe = CausalToken {
            parts: Default::default(),
            ..token.clone()
        };
        let mut asked = self.ask_for_key(r.peers.iter().map(|(p, _)| p), key, &probe, QUORUM_WAIT);
        let mut merged = token;
        let deadline = tokio::time::Instant::now() + QUORUM_WAIT;
        while let Ok(Some(answer)) = tokio::time::timeout_at(deadline, asked.next()).await {
            if let Ok(Response::Get(reply)) = answer {
                merged.observe(r.partition, &reply.token.part(r.partition));
            }
        }
        merged
    }

    /// The replica count `level` needs in partition `p` of `view`; a request that asks
    /// for more replicas than the partition has is refused.
    pub(super) fn needed(&self, view: &View, p: u32, level: Level) -> Result<usize> {
        let replicas = view.replicas_of(p).map_or(0, |r| r.len());
        level.resolve(replicas).map_err(Error::bad_request)
    }

    /// Waits until `need` peers of `r` hold `dot` (see the module doc). The write is
    /// durable here already; when the peers do not confirm it in time its outcome is
    /// unknown to the client (it may still reach them, or be lost with this replica).
    pub(super) async fn await_acks(
        &self,
        view: &View,
        r: &ReplicaHandle,
        dot: Dot,
        need: usize,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + QUORUM_WAIT;
        let count = || {
            // A peer that leaves the partition in the view change under way does not
            // count: after the switch its copy is gone, and the new replica set must
            // still hold the write's copies for a quorum read there to meet it (found
            // by `kvs sim --seed 599`).
            let next = self.current().transition.clone();
            let staying = |peer: &str| {
                next.as_ref().is_none_or(|t| {
                    t.to()
                        .replicas_of(r.partition)
                        .is_some_and(|to| to.iter().any(|a| a == peer))
                })
            };
            let have = lock(&r.peer_have);
            acks(
                dot,
                have.iter()
                    .filter(|(peer, _)| staying(peer))
                    .map(|(_, vv)| vv),
            )
        };
        loop {
            // Created before the count is taken, so a report in between still wakes it.
            let reported = r.acked.notified();
            let got = count();
            if got >= need {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, reported).await.is_err() {
                let got = count();
                if got >= need {
                    return Ok(());
                }
                return Err(Error::new(
                    ErrorKind::OutcomeUnknown,
                    format!(
                        "the write needs {} replicas of partition {}; it is durable on {} and {got} other{} confirmed it within {QUORUM_WAIT:?}; the outcome is unknown (it may still become visible)",
                        need + 1,
                        view.index_of(r.partition).unwrap_or_default(),
                        self.addr,
                        if got == 1 { "" } else { "s" },
                    ),
                ));
            }
        }
    }

    /// Whether this replica reflects everything `token` names in its partition.
    fn serves(&self, r: &ReplicaHandle, token: &CausalToken) -> bool {
        self.status_of(r)
            .is_some_and(|s| Replica::can_serve(&s.served, r.partition, token))
    }

    /// Reads `key` at this replica after folding in what `need` of its peers hold (see
    /// the module doc).
    pub(super) async fn read_quorum(
        self: &Arc<Self>,
        view: &View,
        r: &ReplicaHandle,
        key: &str,
        token: &CausalToken,
        need: usize,
    ) -> Result<ReadReply> {
        // An empty token: the peers answer with what they hold, without waiting.
        let probe = CausalToken {
            parts: Default::default(),
            ..token.clone()
        };
        let mut asked = self.ask_for_key(r.peers.iter().map(|(p, _)| p), key, &probe, QUORUM_WAIT);
        let mut merged = token.clone();
        let mut answered = 0;
        let mut last_error = None;
        let deadline = tokio::time::Instant::now() + QUORUM_WAIT;
        while answered < need {
            match tokio::time::timeout_at(deadline, asked.next()).await {
                Ok(Some(Ok(Response::Get(reply)))) => {
                    merged.observe(r.partition, &reply.token.part(r.partition));
                    answered += 1;
                }
                Ok(Some(Ok(other))) => last_error = Some(format!("unexpected answer {other:?}")),
                Ok(Some(Err(e))) => last_error = Some(e.message),
                Ok(None) | Err(_) => break,
            }
        }
        if answered < need {
            return Err(Error::unavailable(format!(
                "the read needs {} replicas of partition {}; {} answered within {QUORUM_WAIT:?}{}",
                need + 1,
                view.index_of(r.partition).unwrap_or_default(),
                answered + 1,
                last_error
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default(),
            )));
        }
        match self.read_local(view, r, key, &merged).await {
            // The peers' state, not the client's context, is what this replica could not
            // catch up with: retryable, and not the client's fault.
            Err(e) if e.kind == ErrorKind::Unsatisfiable && self.serves(r, token) => {
                Err(Error::unavailable(format!(
                    "this replica could not obtain its peers' newer state of the key within the catch-up wait: {}",
                    e.message
                )))
            }
            other => other,
        }
    }
}
