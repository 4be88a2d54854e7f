//! Keeping views together: a node that sees a peer in another epoch fetches the newer
//! view or tells the peer about its own, a node that was down asks its members, and a
//! request whose token names a newer view waits for this node to learn it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::{STATUS_TIMEOUT, STEP_TIMEOUT};
use crate::error::{Error, Result};
use crate::node::{lock, Node};
use crate::rpc::{NodeStatus, Request, Response};

/// How long a request waits for this node to learn the newer view its token names.
pub const VIEW_CATCHUP_WAIT: Duration = Duration::from_secs(2);
/// At most one view fetch or push per peer per this interval.
const GOSSIP_DEBOUNCE: Duration = Duration::from_millis(300);

impl Node {
    /// Reacts to a peer's epoch seen on an internal call: fetch its newer view, or tell it
    /// about ours. At most once per peer per [`GOSSIP_DEBOUNCE`].
    pub(in crate::node) fn note_peer_epoch(self: &Arc<Self>, peer: &str, epoch: u64) {
        let mine = self.epoch();
        if epoch == mine || peer == self.addr {
            return;
        }
        {
            let mut seen = lock(&self.gossip);
            let now = Instant::now();
            if seen
                .get(peer)
                .is_some_and(|t| now.duration_since(*t) < GOSSIP_DEBOUNCE)
            {
                return;
            }
            seen.insert(peer.to_string(), now);
        }
        let node = self.clone();
        let peer = peer.to_string();
        if epoch > mine {
            tokio::spawn(async move {
                node.learn_from(&peer).await;
            });
        } else if let Some(view) = self.view() {
            tokio::spawn(async move {
                if let Err(e) = node
                    .call(&peer, Request::Install((*view).clone()), STEP_TIMEOUT)
                    .await
                {
                    tracing::debug!(%peer, "telling a peer about view epoch {}: {e}", view.epoch);
                }
            });
        }
    }

    /// Asks `peer` for its view and transition and adopts them if newer. Returns
    /// whether anything was adopted. Only members of this node's view or of the change
    /// in progress are asked: views come from the cluster, not from whoever calls.
    pub(super) async fn learn_from(self: &Arc<Self>, peer: &str) -> bool {
        if !self.current().knows(peer) {
            return false;
        }
        let status: NodeStatus = match self.call(peer, Request::Status, STATUS_TIMEOUT).await {
            Ok(Response::Status(s)) => *s,
            _ => return false,
        };
        let mine = self.epoch();
        match status.view {
            Some(v) if v.epoch > mine => {
                // The change the peer is in starts from that view: learn it too, or this
                // node (back from a wiped disk, say) would serve that view without the
                // change's duties and take writes to slots it is giving away (found by
                // `kvs sim --seed 1110`).
                let next = status.transition.filter(|p| p.from == v);
                match self.install_view(v).await {
                    Ok(switched) => {
                        if let Some(p) = next {
                            if let Err(e) = self.learn(p).await {
                                tracing::debug!(%peer, "could not learn the peer's view change: {e}");
                            }
                        }
                        switched
                    }
                    Err(e) => {
                        tracing::warn!(%peer, "could not install the view learned from a peer: {e}");
                        false
                    }
                }
            }
            Some(v) if v.epoch == mine && self.current().transition.is_none() => {
                match status.transition {
                    Some(p) => self.learn(p).await.is_ok(),
                    None => false,
                }
            }
            _ => false,
        }
    }

    /// Makes sure this node knows view `epoch` (a client's token came from it), asking
    /// its peers for up to [`VIEW_CATCHUP_WAIT`].
    pub(in crate::node) async fn catch_up_view(self: &Arc<Self>, epoch: u64) -> Result<()> {
        if self.epoch() >= epoch {
            return Ok(());
        }
        let ask = async {
            while self.epoch() < epoch {
                let cur = self.current();
                let mut peers: Vec<String> = cur.view()?.members.clone();
                if let Some(t) = &cur.transition {
                    peers.extend(t.to().members.iter().cloned());
                }
                peers.retain(|p| *p != self.addr);
                peers.sort();
                peers.dedup();
                // All at once: one dead member must not hold up the others.
                join_all(peers.iter().map(|p| self.learn_from(p))).await;
                if self.epoch() < epoch {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Ok::<(), Error>(())
        };
        match tokio::time::timeout(VIEW_CATCHUP_WAIT, ask).await {
            Ok(result) => result,
            Err(_) => Err(Error::unavailable(format!(
                "this node has not yet learned view epoch {epoch}, which the request comes from; retry"
            ))),
        }
    }

    /// Asks each other member of this node's view for a newer view, one after another.
    pub(in crate::node) async fn learn_from_members(self: &Arc<Self>) {
        let peers: Vec<String> = self
            .view()
            .map(|v| {
                v.members
                    .iter()
                    .filter(|m| **m != self.addr)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for peer in peers {
            self.learn_from(&peer).await;
        }
    }
}
