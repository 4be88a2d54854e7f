//! Disk faults: how the writer degrades when a commit fails on a disk error, and how it
//! heals.
//!
//! A commit that fails on a disk error makes the writer *degraded* (see
//! [`writer_loop`](super::writer_loop)): it publishes the fault (`Node::disk_fault`: its
//! heartbeat answers tell the peers, which then send it writes last; `/api/v1/status`
//! shows it), refuses every command at once with a retryable error (nothing of it
//! applied: the entry node forwards a client write to the partition's other replicas,
//! the pullers retry their pages), and every [`PROBE_INTERVAL`] asks the store to
//! recover ([`heal`]). Once the disk takes writes again it goes on by itself, without a
//! restart; if the store had to be reopened (a commit whose outcome was unknown), it
//! first reloads its durable state from the store, since the replay may have applied
//! the batch the in-memory state was rolled back from (and must not hand out that
//! batch's dots again). One line is logged when it degrades and one when it heals.
//!
//! # Caveats
//!
//! * A view-change step in a batch whose outcome was unknown and that the replay applied
//!   reaches the node's routing only when the change is driven again (`reconfig` re-drives
//!   a stalled change; installing a view the node already has returns its layout).
//! * While degraded, the pullers pause (their pages could not be applied) and catch up
//!   at their first round after the node heals, within `node::SYNC_INTERVAL`.

use std::time::Duration;

use super::{Durable, Publish};
use crate::error::Error;
use crate::storage::{Recovery, StorageError, Store};

/// How often a degraded writer checks whether the disk takes writes again. Each check
/// writes and syncs `storage::PROBE_BYTES`; once a second puts the node back in service
/// within a second of the disk's recovery without wearing anything.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How often a degraded writer looks at its queue: it answers every command at once (a
/// refusal) instead of blocking on the queue, so it can probe between them.
pub(super) const DEGRADED_POLL: Duration = Duration::from_millis(20);

/// Why this node's disk refuses writes, and since when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskFault {
    pub error: String,
    /// Unix milliseconds.
    pub since_ms: u64,
}

impl DiskFault {
    /// What a write refused meanwhile is told (a retryable refusal: nothing was applied).
    pub fn refusal(&self) -> Error {
        Error::unavailable(format!(
            "this node's disk refuses writes: {}; the write was not applied",
            self.error
        ))
    }
}

/// One attempt to end a disk fault; see [`writer_loop`](super::writer_loop). Returns why
/// it goes on if it does.
pub(super) fn heal(
    store: &dyn Store,
    durable: &mut Durable,
    publish: &Publish,
    fault: &DiskFault,
) -> std::result::Result<(), String> {
    let recovered = match store.recover() {
        Ok(r) => r,
        Err(StorageError::NotApplied(e)) => return Err(e),
        Err(e) => return Err(e.to_string()),
    };
    if recovered == Recovery::Reopened {
        let reloaded = match Durable::load(store, &durable.addr, None) {
            Ok(d) => d,
            Err(e) => return Err(format!("reloading the node's state after a reopen: {e}")),
        };
        let (was, now) = (durable.layout(), reloaded.layout());
        if was.view.as_ref().map(|v| v.epoch) != now.view.as_ref().map(|v| v.epoch)
            || was.replica != now.replica
            || was.transition.as_ref().map(|t| &t.proposal)
                != now.transition.as_ref().map(|t| &t.proposal)
        {
            tracing::warn!(
                "the write-ahead log replay applied a view-change step whose outcome was \
                 unknown; the node takes it up when the change is driven again"
            );
        }
        *durable = reloaded;
        publish.replica_status(durable);
    }
    tracing::info!(
        after_ms = crate::node::now_ms().saturating_sub(fault.since_ms),
        reopened = recovered == Recovery::Reopened,
        "disk takes writes again: this node takes writes again"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use tokio::sync::{mpsc, oneshot, watch};

    use super::*;
    use crate::error::Result;
    use crate::node::writer::testing::{addr, view};
    use crate::node::writer::{writer_loop, Publish, WriterCmd};
    use crate::replica::{WriteOutcome, WriteRequest};

    /// Waits (bounded) until the writer publishes that the disk fault ended.
    fn wait_healed(disk: &watch::Receiver<Option<Arc<DiskFault>>>) {
        let deadline = Instant::now() + 10 * PROBE_INTERVAL;
        while disk.borrow().is_some() {
            assert!(Instant::now() < deadline, "never healed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_disk_fault_degrades_the_writer_until_a_probe_heals_it() {
        use crate::clock::CausalToken;
        use crate::error::ErrorKind;
        use crate::placement::slot_of;
        use crate::storage::RedbStore;

        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(RedbStore::open(dir.path()).expect("open"));
        let durable = Durable::load(&*store, &addr(1), Some(view(1, 1))).expect("loads");
        let (id, partition) = {
            let r = durable.replica.as_ref().expect("a replica");
            (r.id(), r.partition())
        };
        let (replica_tx, replica_rx) = watch::channel(None);
        let (writes_tx, _writes_rx) = watch::channel(0);
        let (disk_tx, disk_rx) = watch::channel(None);
        let (tx, rx) = mpsc::channel(16);
        let writer_store: Arc<dyn Store> = store.clone();
        let thread = std::thread::spawn(move || {
            let publish = Publish {
                replica: replica_tx,
                local_writes: writes_tx,
                disk: disk_tx,
            };
            writer_loop(writer_store, durable, rx, publish)
        });
        let write = |key: &str| -> Result<WriteOutcome> {
            let (reply, answer) = oneshot::channel();
            let req = WriteRequest {
                slot: slot_of(key),
                key: key.into(),
                value: Some(b"v".to_vec()),
                token: CausalToken::default(),
                now_us: 1,
                mode: Default::default(),
            };
            tx.blocking_send(WriterCmd::Write {
                req,
                partition,
                tx: reply,
            })
            .expect("the writer runs");
            answer.blocking_recv().expect("an answer")
        };
        let has = |key: &str| {
            store
                .read()
                .and_then(|r| r.get(slot_of(key), key))
                .expect("read")
                .is_some()
        };
        write("a").expect("healthy");

        // A refused append: not applied, retryable, and the writer degrades.
        store.inject_append_failure();
        let e = write("b").expect_err("the disk refuses it");
        assert_eq!(e.kind, ErrorKind::Unavailable, "{e:?}");
        assert!(e.message.contains("disk refuses writes"), "{e:?}");
        assert!(disk_rx.borrow().is_some(), "the fault is published");
        let e = write("c").expect_err("refused while degraded");
        assert_eq!(e.kind, ErrorKind::Unavailable, "{e:?}");
        wait_healed(&disk_rx);
        write("d").expect("healed");
        assert!(!has("b") && !has("c"));

        // A commit whose outcome is unknown: the reopen replays it, and the writer's
        // state follows (the next write gets the next dot, not the unknown one's).
        store.inject_commit_failure();
        let e = write("e").expect_err("the commit failed");
        assert_eq!(e.kind, ErrorKind::OutcomeUnknown, "{e:?}");
        wait_healed(&disk_rx);
        assert!(has("e"), "the replay applied it");
        write("f").expect("healed");
        let applied = replica_rx
            .borrow()
            .as_ref()
            .map(|s| s.applied.get(id))
            .expect("published");
        assert_eq!(applied, 4, "a, d, e and f, each its own dot");
        tx.blocking_send(WriterCmd::Stop).expect("stop");
        thread.join().expect("the writer ends");
    }
}
