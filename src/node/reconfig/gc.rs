//! Deleting the keys of slots this node handed over to other partitions, in the
//! background after each view change, a bounded batch per writer transaction.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::node::{lock, Node, WriterCmd};
use crate::placement::{Role, View, SLOTS};

/// Keys deleted per transaction when dropping handed-over slots.
const GC_BATCH: usize = 2_048;

impl Node {
    /// Deletes keys of slots this node no longer keeps, in the background.
    pub(in crate::node) fn spawn_gc(self: &Arc<Self>) {
        let node = self.clone();
        lock(&self.tasks).spawn(async move {
            match node.collect_garbage().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    keys = n,
                    "deleted keys of slots handed over to other partitions"
                ),
                Err(e) => tracing::warn!(
                    "deleting handed-over keys failed (retried at the next view change): {e}"
                ),
            }
        });
    }

    async fn collect_garbage(self: &Arc<Self>) -> Result<usize> {
        let cur = self.current();
        let keep = |v: &View, slot: u32| match v.role_of(&self.addr) {
            Some(Role::Replica(uid)) => v.owner_of_slot(slot) == uid,
            _ => false,
        };
        let mut total = 0;
        for slot in 0..SLOTS {
            let kept = cur.view.as_deref().is_some_and(|v| keep(v, slot))
                || cur
                    .transition
                    .as_deref()
                    .is_some_and(|t| keep(t.to(), slot));
            if kept || self.store.read()?.slot_is_empty(slot)? {
                continue;
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
        Ok(total)
    }
}
