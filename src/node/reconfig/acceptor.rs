//! This node's Paxos acceptor for the next view (the state machine is
//! `viewchange::Acceptor`): each answer is persisted through the writer before it is
//! sent, and an acceptor that already knows the outcome says so instead.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::node::{Current, Node, WriterCmd};
use crate::rpc::{PaxosReply, Response};
use crate::viewchange::{Acceptor, Ballot, Proposal};

impl Node {
    /// Paxos phase 1 at this node.
    pub(in crate::node) async fn on_prepare(
        self: &Arc<Self>,
        epoch: u64,
        ballot: Ballot,
    ) -> Result<Response> {
        let mut acceptor = self.acceptor.lock().await;
        let cur = self.current();
        if let Some(early) = paxos_precheck(&cur, epoch) {
            return Ok(early);
        }
        let mut next = self.acceptor_for(&acceptor, epoch);
        let reply = next.on_prepare(&ballot);
        self.persist_acceptor(&next).await?;
        *acceptor = Some(next);
        Ok(Response::Paxos(PaxosReply::Prepare(reply)))
    }

    /// Paxos phase 2 at this node.
    pub(in crate::node) async fn on_accept(
        self: &Arc<Self>,
        epoch: u64,
        ballot: Ballot,
        proposal: Proposal,
    ) -> Result<Response> {
        let mut acceptor = self.acceptor.lock().await;
        let cur = self.current();
        if let Some(early) = paxos_precheck(&cur, epoch) {
            return Ok(early);
        }
        proposal.check().map_err(Error::bad_request)?;
        if proposal.epoch() != epoch || cur.view.as_deref() != Some(&proposal.from) {
            return Err(Error::bad_request(
                "the proposal is not based on this node's view",
            ));
        }
        let mut next = self.acceptor_for(&acceptor, epoch);
        let reply = next.on_accept(&ballot, &proposal);
        self.persist_acceptor(&next).await?;
        *acceptor = Some(next);
        Ok(Response::Paxos(PaxosReply::Accept(reply)))
    }

    /// The acceptor state for deciding `epoch` (a fresh one after a view change).
    fn acceptor_for(&self, held: &Option<Acceptor>, epoch: u64) -> Acceptor {
        held.clone()
            .filter(|a| a.epoch == epoch)
            .unwrap_or_else(|| Acceptor::new(epoch))
    }

    async fn persist_acceptor(&self, acceptor: &Acceptor) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_writer(WriterCmd::Acceptor {
            acceptor: acceptor.clone(),
            tx,
        })
        .await?;
        rx.await
            .map_err(|_| Error::unavailable("the node is shutting down"))?
    }
}

/// What an acceptor answers before looking at a ballot: its epoch when the message is not
/// for its next one, or the chosen proposal when it already knows it.
fn paxos_precheck(cur: &Current, epoch: u64) -> Option<Response> {
    if cur.view.is_none() || epoch != cur.epoch() + 1 {
        return Some(Response::Paxos(PaxosReply::Epoch(cur.epoch())));
    }
    cur.transition
        .as_ref()
        .map(|t| Response::Paxos(PaxosReply::Chosen(Box::new(t.proposal.clone()))))
}
