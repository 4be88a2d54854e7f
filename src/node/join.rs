//! A node that knows the cluster's addresses but not its layout: it finds the cluster
//! and joins it (or waits to be added), or forms it with the others.
//!
//! # Design
//!
//! Two seeds start nodes this way:
//!
//! * **Seed 002** starts nodes with `VIEW` and, on some of them, no `SHARD_COUNT`: nodes
//!   started together that way form one shard of every node; a node started later that
//!   way *announces* itself and joins as a member of no shard, until `add-member` puts
//!   it in one.
//! * **Seed 003** starts every node with `ADDRESS`, `VIEW` and maybe `REPL_FACTOR`:
//!   nodes started together form the VIEW's first view; a node started later, with the
//!   view the cluster is about to take, must *wait* for the `view-change` that adds it
//!   (it names the replication factor and every other joiner), and must not form a
//!   cluster of its own meanwhile.
//!
//! A node with no stored view and such a configuration runs [`Node::join_or_form`]
//! with a [`JoinPlan`]:
//!
//! 1. It asks the addresses of its `VIEW`, one at a time, in order: with a
//!    [`Request::Join`] when it announces itself, with a [`Request::Status`] when it
//!    waits. A node in a cluster that gets a join adds the sender to its view if it is
//!    not a member yet (the newcomer becomes a member of no shard; nothing moves), as
//!    any view change adds a node, installing the new view on every member, this one
//!    included; then it answers its status. The join carries this node's
//!    `ADMIN_TOKEN`, which the member checks (when it has one) before it adds anyone. A
//!    node restarted without its disk is a member already and just gets the view back.
//! 2. With a view that has this node as a member in the answer, this node installs it
//!    and is a member; it obtains the cluster key from the members as any member does
//!    (`keys`). A view without it means a cluster exists that has not added it (yet):
//!    it keeps asking, and never forms another. A waiting node is added by a view
//!    change, which installs the view on it directly.
//! 3. A node that is in no cluster either answers a status without a view. When every
//!    other address answered so, or after [`FORM_AFTER_ROUNDS`] rounds without any
//!    view, this node forms the view its configuration describes. Every node of the
//!    same `VIEW` forms the same view (same members, same cluster id), so nodes started
//!    together agree without a coordinator.
//!
//! # Caveats
//!
//! * A view is taken from whoever answers at a `VIEW` address, before this node holds a
//!   key that could check it (it has none yet): the configured addresses are trusted
//!   once, as the seeds' own nodes trust them. `CLUSTER_SECRET`, when set, gates these
//!   calls as it gates all internal ones.
//! * Nodes of one `VIEW` started far apart, with the first ones unable to reach any
//!   other, each form the same view and find each other by heartbeats; nodes started
//!   with *different* `VIEW`s that cannot reach each other form different clusters. A
//!   seed-003 node started for a view change while every running member is unreachable
//!   for [`FORM_AFTER_ROUNDS`] rounds forms the new view on its own: a second cluster,
//!   which the view change then refuses to add it from ("belongs to another cluster").

use std::sync::Arc;
use std::time::Duration;

use super::Node;
use crate::error::{Error, Result};
use crate::placement::{Change, View};
use crate::rpc::{Request, Response};

/// Rounds of asking before a node with no answering cluster forms its own view.
pub const FORM_AFTER_ROUNDS: u32 = 3;
/// What a node not yet in the cluster it found is told (and how it recognises it).
const NOT_ADDED: &str = "did not add this node yet";
/// Pause between rounds.
const ROUND_PAUSE: Duration = Duration::from_millis(500);
/// Timeout of a join: the member runs a whole view change before it answers.
const JOIN_TIMEOUT: Duration = Duration::from_secs(40);
/// Timeout of a waiting node's status probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How a node with no view finds its cluster; see the module doc.
#[derive(Clone, Debug)]
pub struct JoinPlan {
    /// The `VIEW` addresses to ask.
    pub addresses: Vec<String>,
    /// The view to form when no node of `addresses` is in a cluster.
    pub formed: View,
    /// Whether to ask running members to add this node (seed 002) or to wait for a view
    /// change that adds it (seed 003).
    pub announce: bool,
}

impl Node {
    /// Runs the join described in the module doc until this node is in a view. `formed`
    /// is the view this node forms when nobody answers with one.
    pub(super) fn spawn_join(self: &Arc<Self>, plan: JoinPlan) {
        let node = self.clone();
        super::lock(&self.tasks).spawn(async move {
            let mut round = 0;
            // Once any address answered from a cluster, this node joins it or nothing:
            // forming another would split the store.
            let mut cluster_seen = false;
            while node.view().is_none() {
                round += 1;
                let seen_before = cluster_seen;
                match node.join_or_form(&plan, round, &mut cluster_seen).await {
                    Err(e) if plan.announce || !e.message.contains(NOT_ADDED) => {
                        tracing::warn!("joining the cluster: {e}; retrying")
                    }
                    // Waiting for a view change is the normal course: said once.
                    Err(e) if !seen_before => {
                        tracing::info!("{e}; waiting for a view change that adds this node")
                    }
                    _ => {}
                }
                if node.view().is_none() {
                    tokio::time::sleep(ROUND_PAUSE).await;
                }
            }
        });
    }

    /// One round of the join (see the module doc).
    async fn join_or_form(
        self: &Arc<Self>,
        plan: &JoinPlan,
        round: u32,
        cluster_seen: &mut bool,
    ) -> Result<()> {
        let mut silent = 0;
        for addr in plan.addresses.iter().filter(|a| **a != self.addr) {
            let (ask, timeout) = if plan.announce {
                let join = Request::Join {
                    admin_token: self.admin_token.clone(),
                };
                (join, JOIN_TIMEOUT)
            } else {
                (Request::Status, PROBE_TIMEOUT)
            };
            match self.call(addr, ask, timeout).await {
                Ok(Response::Status(status)) => match status.view {
                    Some(view) if view.is_member(&self.addr) => {
                        tracing::info!(%addr, epoch = view.epoch, "joined the cluster");
                        self.install_view(view).await?;
                        return Ok(());
                    }
                    Some(_) => {
                        *cluster_seen = true;
                        return Err(Error::unavailable(format!(
                            "{addr} is in a cluster that {NOT_ADDED} (its log says why)"
                        )));
                    }
                    None => {}
                },
                Ok(other) => return Err(super::unexpected(&other)),
                Err(e) => {
                    tracing::debug!(%addr, "no answer to a join: {e}");
                    silent += 1;
                }
            }
        }
        if !*cluster_seen && (silent == 0 || round >= FORM_AFTER_ROUNDS) {
            tracing::info!(silent, "no node of VIEW is in a cluster: forming it");
            self.install_view(plan.formed.clone()).await?;
        }
        Ok(())
    }

    /// A node's [`Request::Join`]: adds it to the view (a member of no shard) unless it
    /// is a member, then answers this node's status (no view: not in a cluster).
    pub(super) async fn on_join(
        self: &Arc<Self>,
        from: &str,
        admin_token: Option<&str>,
    ) -> Result<Response> {
        if self.view().is_some_and(|v| !v.is_member(from)) {
            tracing::info!(node = %from, "a node asks to join the cluster");
            let added = match self.authorize_admin(admin_token) {
                Ok(()) => self
                    .change_view(Change::Add(from.to_string()))
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            // The status answers either way: a view without the sender tells it that
            // the cluster exists and it must not form another.
            if let Err(e) = added {
                tracing::warn!(node = %from, "could not add a node that asked to join: {e}");
            }
        }
        self.status().map(|s| Response::Status(Box::new(s)))
    }
}
