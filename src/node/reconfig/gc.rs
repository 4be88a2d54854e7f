//! Deleting the keys of slots this node handed over to other partitions, in the
//! background after each view change, a bounded batch per writer transaction.
//!
//! A slot's keys are deleted only once every replica of the partition that now owns it
//! confirms it holds each key's versions or newer ones (`Request::Holds`, checked key by
//! key against the dots): the view change copied them, and this is the end-to-end check
//! that it did. A slot that cannot be confirmed (a new replica down, a key missing) is
//! kept and checked again later; its keys are never served from here meanwhile.
//!
//! Caveat: a moved key whose new owner later deleted it and collected the tombstone
//! cannot be confirmed; its slot stays here until a restart or view change retries.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Dot;
use crate::error::{Error, Result};
use crate::node::{lock, unexpected, Node, WriterCmd};
use crate::placement::{Role, View, SLOTS};
use crate::replica::Replica;
use crate::rpc::{Request, Response};

/// Keys deleted per transaction when dropping handed-over slots.
const GC_BATCH: usize = 2_048;
/// Keys checked per `Holds` call.
const HOLDS_BATCH: usize = 512;
/// Timeout of one `Holds` call.
const HOLDS_TIMEOUT: Duration = Duration::from_secs(10);
/// Pauses before slots that could not be confirmed are checked again: doubling from the
/// first (the new owners may not have installed the view yet) up to the last, this many
/// times.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);
const RETRIES: usize = 30;

impl Node {
    /// Deletes keys of slots this node no longer keeps, in the background.
    pub(in crate::node) fn spawn_gc(self: &Arc<Self>) {
        let node = self.clone();
        lock(&self.tasks).spawn(async move {
            let mut pause = FIRST_RETRY;
            for attempt in 0..=RETRIES {
                if attempt > 0 {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_RETRY);
                }
                match node.collect_garbage().await {
                    Ok((n, 0)) => {
                        if n > 0 {
                            tracing::info!(keys = n, "deleted keys of slots handed over to other partitions");
                        }
                        return;
                    }
                    Ok((n, unconfirmed)) => tracing::warn!(
                        deleted = n,
                        unconfirmed,
                        "kept handed-over slots their new replicas did not confirm holding; checking again in {pause:?}"
                    ),
                    Err(e) => tracing::warn!(
                        "deleting handed-over keys failed, retrying in {pause:?}: {e}"
                    ),
                }
            }
        });
    }

    /// Deletes the handed-over slots the new owners confirm; returns how many keys it
    /// deleted and how many slots it kept unconfirmed.
    async fn collect_garbage(self: &Arc<Self>) -> Result<(usize, usize)> {
        let cur = self.current();
        let keep = |v: &View, slot: u32| match v.role_of(&self.addr) {
            Some(Role::Replica(uid)) => v.owner_of_slot(slot) == uid,
            _ => false,
        };
        let (mut total, mut unconfirmed) = (0, 0);
        for slot in 0..SLOTS {
            let kept = cur.view.as_deref().is_some_and(|v| keep(v, slot))
                || cur
                    .transition
                    .as_deref()
                    .is_some_and(|t| keep(t.to(), slot));
            if kept || self.store.read()?.slot_is_empty(slot)? {
                continue;
            }
            match self.confirmed_elsewhere(&cur, slot).await {
                Ok(true) => {}
                Ok(false) => {
                    unconfirmed += 1;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(slot, "cannot confirm a handed-over slot yet: {e}");
                    unconfirmed += 1;
                    continue;
                }
            }
            loop {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.send_writer(WriterCmd::Gc {
                    slot,
                    limit: GC_BATCH,
                    tx,
                })
                .await?;
                let n = rx
                    .await
                    .map_err(|_| Error::unavailable("the node is shutting down"))??;
                total += n;
                if n < GC_BATCH {
                    break;
                }
            }
        }
        Ok((total, unconfirmed))
    }

    /// Whether every replica of the partition that owns `slot` now holds the versions of
    /// every key this node still has in it.
    async fn confirmed_elsewhere(
        self: &Arc<Self>,
        cur: &crate::node::Current,
        slot: u32,
    ) -> Result<bool> {
        // A node removed from the cluster can no longer ask, and the change that removed
        // it completed only once its keys were on their new replicas.
        let Some(view) = cur.view.as_deref() else {
            return Ok(true);
        };
        let owner = view.owner_of_slot(slot);
        let replicas: Vec<String> = view
            .replicas_of(owner)
            .unwrap_or_default()
            .iter()
            .filter(|r| **r != self.addr)
            .cloned()
            .collect();
        if replicas.is_empty() {
            return Ok(false);
        }
        let mut after: Option<String> = None;
        loop {
            let chunk = self
                .store
                .read()?
                .scan_slot(slot, after.as_deref(), HOLDS_BATCH)?;
            let Some((last, _)) = chunk.last() else {
                return Ok(true);
            };
            after = Some(last.clone());
            let done = chunk.len() < HOLDS_BATCH;
            let keys: Vec<(u32, String, Vec<Dot>)> = chunk
                .into_iter()
                .map(|(key, state)| (slot, key, state.versions.iter().map(|v| v.dot).collect()))
                .collect();
            for replica in &replicas {
                let req = Request::Holds {
                    partition: owner,
                    keys: keys.clone(),
                };
                match self.call(replica, req, HOLDS_TIMEOUT).await? {
                    Response::Lacking(lacking) if lacking.is_empty() => {}
                    Response::Lacking(lacking) => {
                        tracing::warn!(
                            slot,
                            %replica,
                            missing = lacking.len(),
                            "a replica of the slot's new partition lacks handed-over keys; keeping them here"
                        );
                        return Ok(false);
                    }
                    other => return Err(unexpected(&other)),
                }
            }
            if done {
                return Ok(true);
            }
        }
    }

    /// Answers [`Request::Holds`] from this node's replica of `partition`.
    pub(in crate::node) async fn serve_holds(
        self: &Arc<Self>,
        partition: u32,
        keys: Vec<(u32, String, Vec<Dot>)>,
    ) -> Result<Response> {
        let r = self.serving_replica(&self.current(), partition)?;
        if let Some((slot, _, _)) = keys.iter().find(|(slot, _, _)| !r.owned.contains(*slot)) {
            return Err(Error::unavailable(format!(
                "{} does not own slot {slot} in its view",
                self.addr
            )));
        }
        self.read_blocking(move |txn| {
            let mut lacking = Vec::new();
            for (slot, key, dots) in keys {
                let state = txn.get(slot, &key)?.unwrap_or_default();
                if !Replica::covers(&state, &dots) {
                    lacking.push((slot, key));
                }
            }
            Ok(Response::Lacking(lacking))
        })
        .await
    }
}
