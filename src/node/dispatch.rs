//! Dispatch: each internal call a peer makes (or this node makes to itself), handed to
//! the code that serves it, after the rule on who may make it.

use std::sync::Arc;

use super::Node;
use crate::error::Error;
use crate::rpc::{Envelope, Request, Response};

impl Node {
    /// Handles one internal call from a peer, admitted by [`Node::admit`] (or made by
    /// this node itself).
    pub async fn handle_rpc(self: &Arc<Self>, env: Envelope) -> Response {
        let cur = self.current();
        // Past admission, a caller holds the key (or this node is in no cluster and
        // trusts its first contact). A member removed while it was away holds the key
        // too: it may ask for the status (which tells it it was removed), nothing else.
        let known = cur.knows(&env.from);
        // A node that asks to join is not a member yet (`join`).
        let open = matches!(
            env.body,
            Request::Status
                | Request::KeyRequest { .. }
                | Request::KeyDelivery { .. }
                | Request::Join { .. }
        );
        if !open && cur.view.is_some() && !known {
            // Retryable: a member removed while it was away still routes by its old
            // view; the request it forwards for a client may succeed elsewhere.
            return Response::Error(Error::unavailable(format!(
                "{} is not a member of this node's view (epoch {})",
                env.from,
                cur.epoch()
            )));
        }
        if known {
            self.note_peer_epoch(&env.from, env.epoch);
        }
        let result = match env.body {
            Request::Ping => Ok(self
                .disk_fault()
                .map_or(Response::Ok, |f| Response::DiskFault(f.error.clone()))),
            Request::Poke { partition } => {
                if let Some(r) = cur.local(partition) {
                    if let Some((_, n)) = r.peers.iter().find(|(a, _)| *a == env.from) {
                        n.notify_one();
                    }
                }
                Ok(Response::Ok)
            }
            Request::Sync(req) => self
                .serve_sync(&cur, &env.from, req)
                .await
                .map(Response::Sync),
            Request::Snapshot(req) => self.serve_snapshot(&cur, req).await.map(Response::Snapshot),
            Request::Get { key, token, r } => {
                // The sender routed by a newer view: learn it before deciding whether the
                // key is ours (else the sender's request fails at the switch).
                let _ = self.catch_up_view(env.epoch).await;
                self.get(&key, token, Some(r), false)
                    .await
                    .map(Response::Get)
            }
            Request::Put {
                key,
                value,
                token,
                w,
                mode,
            } => {
                let _ = self.catch_up_view(env.epoch).await;
                self.write(&key, value, token, Some(w), mode, false)
                    .await
                    .map(Response::Put)
            }
            Request::Status => self.status().map(|s| Response::Status(Box::new(s))),
            Request::KeyCount { partition } => self.count_local(partition).map(Response::Count),
            Request::Digest { partition, buckets } => self.serve_digest(partition, buckets).await,
            Request::Holds { partition, keys } => self.serve_holds(partition, keys).await,
            Request::ListKeys {
                partition,
                prefix,
                after,
                limit,
            } => self
                .list_local(partition, &prefix, after.as_ref(), limit)
                .map(Response::Keys),
            Request::Join { admin_token } => self.on_join(&env.from, admin_token.as_deref()).await,
            Request::Prepare { epoch, ballot } => self.on_prepare(epoch, ballot).await,
            Request::Accept {
                epoch,
                ballot,
                proposal,
            } => self.on_accept(epoch, ballot, proposal).await,
            Request::Learn(proposal) => self.learn(proposal).await.map(Response::Learned),
            Request::Drain {
                epoch,
                partition,
                target,
            } => self
                .drain(epoch, partition, target)
                .await
                .map(|()| Response::Ok),
            Request::Pull {
                epoch,
                key,
                source,
                claim,
            } => self
                .pull_step(epoch, key, source, claim)
                .await
                .map(Response::Pulled),
            Request::Install(view) => self.install_view(view).await.map(|_| Response::Ok),
            Request::KeyRequest { nonce } => self.on_key_request(&env.from, nonce).await,
            Request::KeyDelivery { nonce, key } => self.on_key_delivery(nonce, key).await,
        };
        result.unwrap_or_else(Response::Error)
    }
}
