//! The replica: per-key versions with siblings, local writes, causal reads, and the
//! log-based synchronisation between the replicas of one partition.
//!
//! # Design
//!
//! **Key state** (`keystate`). A key holds a set of [`Version`]s (siblings), each with
//! the [`Dot`] of the write that made it and its causal history inside the partition;
//! [`KeyState::merge`] joins two states and drops the versions another one supersedes,
//! so replicas that have seen the same writes hold the same state whatever the order.
//! Concurrent writes survive as siblings; the seed dialects show one deterministic
//! winner (latest timestamp, then replica id, then counter).
//!
//! **Local write.** The accepting replica (the coordinator) takes its own next counter.
//! The new version's history is the join of everything this replica holds for the key,
//! the client's token for the partition, and everything the replica has applied or stamped
//! on earlier writes (`known`), so a write supersedes both what the client has seen and
//! what the coordinator had locally: siblings only arise from writes accepted concurrently
//! at different replicas. Folding in `known` keeps histories downward closed (a history
//! naming write `r:n` names all of `r:n`'s history too); without it, the simulation (`sim`)
//! finds stale reads. The client's tokens for other partitions are kept
//! with the version (`deps`) and handed to whoever reads it, which makes causality
//! transitive across partitions.
//!
//! **Deletes** are writes of a tombstone (a version with no value): it gets a dot and a
//! history like any write, so it supersedes exactly the versions its writer had seen and
//! sync carries it like any other state. A replica that missed the delete and still holds
//! the old value cannot bring it back: merging drops the old version because the
//! tombstone's history contains its dot. A key whose winning version is a tombstone
//! does not exist for clients ([`KeyState::visible`]). Deleting a key that does not
//! exist, at a replica that reflects the client's token, writes nothing.
//!
//! **Applied vector.** Each replica keeps `applied`, a version vector meaning "every write
//! it names is reflected in my state". A read carrying token `t` may be answered when
//! `applied` dominates `t`'s entry for this partition; otherwise the replica first pulls
//! from its peers. Writes are held to the same rule ([`Replica::accepts_write`]): the
//! client's token is folded into the new version's history, which every reader of the
//! version inherits, so a replica accepts a write only once it reflects everything the
//! token names in its partition.
//!
//! **Sync.** Every write a replica incorporates is also recorded in its log under its dot.
//! A peer asks with its own `applied` vector ([`SyncRequest`]); the answer lists, per
//! origin, the log entries the peer lacks, contiguously, together with the *current*
//! state of each key they name ([`SyncResponse`]). The current state contains each listed
//! write or a version that dominates it, so after merging the states the peer may raise
//! `applied` to `covered`. Pages are bounded in entries and bytes and need no snapshot
//! across pages: each page's claim stands on its own. Log entries are trimmed once every
//! peer's `applied` has passed them.
//!
//! **Handoffs.** When a view change moves slots from partition A to partition B, each
//! replica of B merges the moved keys' states into its store (no log entries: B's peers
//! receive the same keys themselves) and, once the change is done, raises `absorbed`, a
//! second vector, by a claim: the join of everything A's replicas had applied when they
//! stopped accepting writes to those slots. A replica *reflects* `applied ∨ absorbed`
//! ([`Replica::served`]) and reads are checked against that. The two are kept apart
//! because only `applied` is served from the log: a peer asking for an origin of
//! `absorbed` would find no log entries and take it for a gap. `absorbed` is not folded
//! into new writes' histories (only the moved versions' own histories are), so tokens
//! never name a foreign dot beyond the claim every replica of B made. A replica whose
//! `absorbed` lacks an origin a peer has missed a handoff (its disk was wiped) and copies
//! the peer's state ([`SnapshotPage`] carries both vectors).
//!
//! **Incarnations.** A replica's id is drawn when a node becomes a replica of a
//! partition, and dropped when it stops being one: a node that leaves a partition and
//! later joins another is a new replica there, so its dots never collide with the ones
//! it made before. [`Replica::load`] returns the persisted incarnation.
//!
//! The messages and methods of sync, state transfers and claims are in `sync.rs`.
//!
//! # Caveats
//!
//! * A write supersedes the coordinator's local siblings even if the client never saw
//!   them (last-writer-wins at the coordinator). That is the seed dialects' semantics; an
//!   API exposing siblings would pass the sibling context explicitly.
//! * A sync page ships the *current* state of each key it names, which may hold versions
//!   beyond what the page claims. They are real writes and normally get claimed by a later
//!   page; but if their accepting replica loses its disk before any peer claimed them,
//!   the log that would carry them is gone and the log sync alone would leave replicas
//!   with different states for that key. The digest rounds (`crate::merkle`,
//!   `node/digests.rs`) compare states and close the difference within a few seconds.
//! * Tombstones are collected ([`Replica::collectable`]): only once every replica of the
//!   partition has applied the delete (their reported vectors, the log trimmer's floor),
//!   a horizon has passed, and no view change is under way (the sources of a handoff
//!   may still hold the value). A replica that is down or cut off holds the floor back,
//!   so it learns the delete before anyone drops it. Tombstones that arrived through a
//!   handoff (their dots are in `absorbed`, which peers do not report) are kept.
//! * Dots are unique because replica ids are random per data directory; a *copied* data
//!   directory running as a second node would reuse them. Merge keeps mutually
//!   containing versions as siblings rather than losing both, but do not clone data
//!   directories between live nodes.
//! * If a peer falls behind the trimmed log (its disk was wiped: it comes back with a new
//!   replica id and an empty vector while peers have trimmed), the answer is a `gap` and
//!   the peer copies the whole state instead ([`Replica::serve_snapshot`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::clock::{CausalToken, Dot, PartitionUid, ReplicaId, VersionVector};
use crate::placement::SlotSet;
use crate::storage::{LogEntry, ReadTxn, Result, WriteTxn};

mod sync;

pub use crate::writemode::{Condition, Supersedes, WriteMode};
pub use sync::{Claim, SnapshotPage, SnapshotRequest, SyncRequest, SyncResponse};

/// A key's versions, stored by `storage` (see `keystate`).
pub use crate::keystate::{KeyState, Sibling, Siblings, Version};

/// A client write, as the coordinator sees it.
#[derive(Clone, Debug)]
pub struct WriteRequest {
    pub slot: u32,
    pub key: String,
    /// `None` deletes the key.
    pub value: Option<Vec<u8>>,
    pub token: CausalToken,
    pub now_us: u64,
    /// Which versions it replaces (the seeds: everything; the own API: what it saw)
    /// and the condition it puts on the key's state.
    pub mode: WriteMode,
}

/// What the coordinator tells the client after a write is durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// No value was visible before this write. For a delete: the key did not exist,
    /// and nothing was written.
    pub created: bool,
    pub token: CausalToken,
    pub timestamp_us: u64,
    /// The new version's identity; `None` when nothing was written (a delete of a key
    /// that did not exist). A quorum write waits until enough peers hold it.
    pub dot: Option<Dot>,
}

/// What a read returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadOutcome {
    /// The winning value and its timestamp, `None` if the key does not exist.
    pub value: Option<(Vec<u8>, u64)>,
    pub token: CausalToken,
    /// The causal context of the write that wrote the value (its history in this
    /// partition, its dependencies in others): the same on every replica that holds the
    /// write, so dialects that show a write's own version read it from here. Empty when
    /// the key does not exist.
    pub context: BTreeMap<PartitionUid, VersionVector>,
    /// Whether the replica holds anything for the key: a value or a tombstone.
    pub known: bool,
    /// The other live siblings and the key's context (the own API shows them).
    pub siblings: Siblings,
}

/// Meta-table name of the replica's identity and vectors.
pub const META_REPLICA: &str = "replica.v2";

/// The state machine of one replica of one partition. It holds only its vectors in
/// memory; keys live in the store. Methods take the transaction to work in, so the
/// caller (the writer task) decides batching and durability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    id: ReplicaId,
    partition: PartitionUid,
    applied: VersionVector,
    /// Claims from handoffs: writes of other partitions' replicas to slots this
    /// partition took over, all reflected here. See the module doc.
    absorbed: VersionVector,
    /// Join of the histories of every write this replica accepted. Folded into each new
    /// write so histories stay downward closed: a vector naming our write `n` must also
    /// name everything write `n` depended on, including dots that came from a client's
    /// token and that we have not applied (the simulation found this).
    known: VersionVector,
}

impl Replica {
    /// A new incarnation: nothing applied yet.
    pub fn fresh(id: ReplicaId, partition: PartitionUid) -> Self {
        Self {
            id,
            partition,
            applied: VersionVector::new(),
            absorbed: VersionVector::new(),
            known: VersionVector::new(),
        }
    }

    /// An incarnation rebuilt from the first on-disk layout (no `absorbed` yet).
    pub fn from_parts(
        id: ReplicaId,
        partition: PartitionUid,
        applied: VersionVector,
        known: VersionVector,
    ) -> Self {
        Self {
            applied,
            known,
            ..Self::fresh(id, partition)
        }
    }

    /// A new incarnation that starts from a completed state transfer.
    pub fn from_claim(id: ReplicaId, partition: PartitionUid, claim: &Claim) -> Self {
        let mut r = Self::fresh(id, partition);
        r.claim(claim);
        r
    }

    /// The incarnation persisted in this store, if any.
    pub fn load(txn: &dyn ReadTxn) -> Result<Option<Self>> {
        txn.meta(META_REPLICA)?
            .map(|bytes| {
                postcard::from_bytes(&bytes).map_err(|e| crate::storage::StorageError::Corrupt {
                    table: "meta",
                    detail: format!("replica state: {e}"),
                })
            })
            .transpose()
    }

    pub fn id(&self) -> ReplicaId {
        self.id
    }

    pub fn partition(&self) -> PartitionUid {
        self.partition
    }

    pub fn applied(&self) -> &VersionVector {
        &self.applied
    }

    pub fn absorbed(&self) -> &VersionVector {
        &self.absorbed
    }

    /// Everything this replica reflects: `applied ∨ absorbed`.
    pub fn served(&self) -> VersionVector {
        let mut vv = self.applied.clone();
        vv.merge(&self.absorbed);
        vv
    }

    /// Whether a client write carrying `token` may be accepted here: only when this
    /// replica reflects every write of its partition the token names.
    ///
    /// The new version's history includes the token, and every later reader of the key
    /// inherits that history. Were the replica to accept a write depending on writes it
    /// lacks, readers would carry a dependency this partition may never satisfy (writes
    /// lost with a disk, or on the other side of a partition for as long as it lasts) and
    /// their reads of every other key here would wait for it. Recording only the part of
    /// the token the replica knows would instead let a reader see this write but miss the
    /// writes it followed, a causal anomaly. So the write goes to a replica that has
    /// them, or fails as retryable; the client that carried the token is the only one who
    /// waits.
    pub fn accepts_write(&self, token: &CausalToken) -> bool {
        Self::can_serve(&self.served(), self.partition, token)
    }

    /// Whether a read carrying `token` may be answered from a replica that reflects
    /// `served` (see [`Self::served`]).
    pub fn can_serve(served: &VersionVector, partition: PartitionUid, token: &CausalToken) -> bool {
        token
            .parts
            .get(&partition)
            .is_none_or(|need| served.dominates(need))
    }

    /// Whether a read of one key carrying `token` may be answered although the replica as a
    /// whole is behind the token: yes when every write the token names beyond `served`
    /// is covered by the key's state. Then every write to this key the client depends on
    /// is reflected (typically: the client's own newer write of this key, accepted here
    /// while the replica could not reach the peer holding the older writes).
    pub fn can_serve_key(
        served: &VersionVector,
        partition: PartitionUid,
        token: &CausalToken,
        state: &KeyState,
    ) -> bool {
        let Some(need) = token.parts.get(&partition) else {
            return true;
        };
        need.iter().all(|(origin, counter)| {
            served.get(origin) >= counter
                || state
                    .versions
                    .iter()
                    .any(|v| v.causal_history(partition).get(origin) >= counter)
        })
    }

    /// Persists the replica's identity and vectors into `txn`; call once per batch
    /// before committing.
    pub fn persist(&self, txn: &mut dyn WriteTxn) -> Result<()> {
        let bytes = postcard::to_stdvec(self).expect("vector serialization is infallible");
        txn.set_meta(META_REPLICA, &bytes)
    }

    /// Whether the key's state in `txn` admits `req` (its condition, the sibling bound:
    /// `WriteMode::admits`): the writer
    /// checks it in the batch that then applies the write, so nothing comes between.
    pub fn precondition(
        txn: &dyn WriteTxn,
        req: &WriteRequest,
    ) -> Result<std::result::Result<(), crate::error::Error>> {
        if req.mode == WriteMode::default() {
            return Ok(Ok(()));
        }
        let existing = txn.get(req.slot, &req.key)?.unwrap_or_default();
        Ok(req.mode.admits(&existing))
    }

    /// Applies a client write accepted here (its condition, if any, already checked by
    /// [`Self::precondition`]). Not durable until the caller commits.
    pub fn write(&mut self, txn: &mut dyn WriteTxn, req: WriteRequest) -> Result<WriteOutcome> {
        let existing = txn.get(req.slot, &req.key)?.unwrap_or_default();
        let created = match req.mode.supersedes {
            Supersedes::Everything => !existing.is_live(),
            // The own API shows every sibling: the key existed if any held a value.
            Supersedes::Seen(_) => !existing.has_value(),
        };
        if req.value.is_none()
            && created
            && Self::can_serve(&self.served(), self.partition, &req.token)
        {
            // Deleting a key that does not exist, at a replica that reflects everything
            // the client has seen: nothing to do, and no tombstone to keep forever.
            let mut token = req.token;
            existing.observe_into(self.partition, &mut token);
            return Ok(WriteOutcome {
                created,
                token,
                timestamp_us: req.now_us,
                dot: None,
            });
        }
        let counter = self.applied.get(self.id) + 1;
        let dot = Dot {
            replica: self.id,
            counter,
        };
        // The writer's history inside the partition: what the replica holds for the key,
        // what the client saw, and what the replica has applied or stamped before
        // (`known`, see the module doc).
        let mut history = existing.history();
        history.merge(&req.token.part(self.partition));
        history.merge(&self.applied);
        history.merge(&self.known);
        history.raise(self.id, counter);
        self.known = history.clone();
        let mut deps: BTreeMap<PartitionUid, VersionVector> = req
            .token
            .parts
            .iter()
            .filter(|(&p, _)| p != self.partition)
            .map(|(&p, v)| (p, v.clone()))
            .collect();
        let vv = match &req.mode.supersedes {
            Supersedes::Everything => history.clone(),
            Supersedes::Seen(context) => {
                // Replaces what the client saw of the key, no more; the history goes
                // with the version as its dependency in this partition (keystate).
                deps.insert(self.partition, history.clone());
                context.clone()
            }
        };
        // Never older than what it replaces here, so "timestamp" reads sensibly.
        let floor = existing
            .versions
            .iter()
            .map(|v| v.timestamp_us)
            .max()
            .unwrap_or(0);
        let timestamp_us = req.now_us.max(floor);
        let version = Version {
            dot,
            vv,
            deps,
            timestamp_us,
            value: req.value,
        };
        let state = match req.mode.supersedes {
            // The new version's history holds every version here: it replaces them all
            // (no merge, which would copy the value once more).
            Supersedes::Everything => KeyState {
                versions: vec![version],
            },
            Supersedes::Seen(_) => {
                let mut state = existing;
                state.merge(&KeyState {
                    versions: vec![version],
                });
                state
            }
        };
        txn.put(req.slot, &req.key, &state)?;
        txn.log_append(&LogEntry {
            dot,
            slot: req.slot,
            key: req.key,
        })?;
        self.applied.raise(self.id, counter);
        let mut token = req.token;
        token.observe(self.partition, &history);
        Ok(WriteOutcome {
            created,
            token,
            timestamp_us,
            dot: Some(dot),
        })
    }

    /// Reads a key for a client whose token this replica can serve (see [`Self::can_serve`]).
    pub fn read(
        txn: &dyn ReadTxn,
        partition: PartitionUid,
        slot: u32,
        key: &str,
        token: CausalToken,
    ) -> Result<ReadOutcome> {
        let mut token = token;
        let state = txn.get(slot, key)?.unwrap_or_default();
        state.observe_into(partition, &mut token);
        let visible = state.visible();
        Ok(ReadOutcome {
            value: visible.and_then(|v| Some((v.value.clone()?, v.timestamp_us))),
            token,
            context: visible.map(|v| v.context(partition)).unwrap_or_default(),
            known: !state.versions.is_empty(),
            siblings: state.siblings(),
        })
    }

    /// Whether a key's state may be dropped altogether (tombstone collection): every
    /// version is a tombstone written at or before `cutoff_us`, and `floor` (what every
    /// replica of the partition has applied, see [`Self::trim_floor`]) holds each. Then
    /// every replica reflects the delete or something newer, so no replica's copy can
    /// bring the value back, and the key's absence means what the tombstone meant.
    pub fn collectable(state: &KeyState, floor: &VersionVector, cutoff_us: u64) -> bool {
        !state.versions.is_empty()
            && state
                .versions
                .iter()
                .all(|v| v.value.is_none() && v.timestamp_us <= cutoff_us && floor.contains(v.dot))
    }

    /// Whether `state` holds only deletes this replica already reflects (`served` holds
    /// each dot). Merging it changes nothing a client can see; a peer that still holds
    /// such a tombstone must not hand it back to a replica that collected it.
    pub fn known_deletes(state: &KeyState, served: &VersionVector) -> bool {
        state
            .versions
            .iter()
            .all(|v| v.value.is_none() && served.contains(v.dot))
    }

    /// Whether `state` holds each of `dots` or a version that supersedes it: a handed-
    /// over key's versions are safe at its new partition.
    pub fn covers(state: &KeyState, dots: &[Dot]) -> bool {
        dots.iter().all(|d| state.covers(*d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystate::tests::version;
    use crate::keystate::Version;
    use crate::storage::{MemoryStore, Store};
    use crate::testing::Rng;

    /// The own API's writes: without a context a write adds a sibling (even at the
    /// same replica), with one it replaces exactly what that context names, its
    /// condition is checked against the key, and a seed write still replaces all.
    #[test]
    fn own_api_writes_replace_exactly_what_they_saw() {
        let seen = |c: &VersionVector| WriteMode {
            supersedes: Supersedes::Seen(c.clone()),
            condition: None,
        };
        let none = seen(&VersionVector::new());
        let empty = || CausalToken::empty(0);
        let (mut a, mut b) = (Node::new(1), Node::new(2));
        let first = a.write_as("k", Some("a1"), empty(), 1, none.clone());
        assert!(first.expect("write").created);
        let second = a.write_as("k", Some("a2"), empty(), 2, none.clone());
        assert!(!second.expect("write").created);
        assert_eq!(a.values("k"), ["a1", "a2"], "no context: a sibling");

        // A read's context replaces both; the writer's token reflects its write.
        let (_, read) = a.read("k", &empty()).expect("servable");
        assert_eq!(read.siblings.others.len(), 1);
        let context = read.siblings.context.clone();
        let out = a
            .write_as("k", Some("a3"), read.token, 3, seen(&context))
            .expect("write");
        assert_eq!(a.values("k"), ["a3"]);
        assert!(b.read("k", &out.token).is_none(), "b lacks the write");

        // Concurrent at two replicas: b's write without context survives a's write
        // with the context of "a3", and the stale context fails the condition.
        b.pull(&a, 2);
        assert!(b.read("k", &out.token).is_some());
        let (_, at_a3) = b.read("k", &empty()).expect("servable");
        b.write_as("k", Some("b1"), empty(), 4, none.clone())
            .expect("write");
        a.write_as(
            "k",
            Some("a4"),
            out.token.clone(),
            5,
            seen(&at_a3.siblings.context),
        )
        .expect("write");
        a.pull(&b, 2);
        b.pull(&a, 2);
        assert_eq!(a.values("k"), ["a4", "b1"]);
        assert_eq!(a.state("k"), b.state("k"));
        let stale = WriteMode {
            condition: Some(Condition::Unchanged),
            ..seen(&at_a3.siblings.context)
        };
        let refused = a.write_as("k", Some("x"), empty(), 6, stale);
        assert_eq!(
            refused.expect_err("stale").kind,
            crate::error::ErrorKind::PreconditionFailed
        );
        let absent = WriteMode {
            condition: Some(Condition::Absent),
            ..none.clone()
        };
        assert!(a
            .write_as("k", Some("x"), empty(), 6, absent.clone())
            .is_err());
        assert!(a.write_as("fresh", Some("x"), empty(), 6, absent).is_ok());

        // Up to date: the condition holds; a delete with the context removes both.
        let (_, now) = a.read("k", &empty()).expect("servable");
        let current = WriteMode {
            condition: Some(Condition::Unchanged),
            ..seen(&now.siblings.context)
        };
        a.write_as("k", None, now.token, 7, current)
            .expect("delete");
        assert!(a.values("k").is_empty());
        assert!(a.read("k", &empty()).expect("servable").1.value.is_none());

        // A seed write replaces every sibling.
        a.write_as("s", Some("1"), empty(), 8, none.clone())
            .expect("write");
        a.write_as("s", Some("2"), empty(), 9, none).expect("write");
        a.write("s", "seed", empty(), 10);
        assert_eq!(a.values("s"), ["seed"]);
    }

    #[test]
    fn a_key_whose_state_covers_the_token_is_served_by_a_lagging_replica() {
        let applied: VersionVector = [(1, 3)].into_iter().collect();
        let mut token = CausalToken::empty(0);
        token.observe(0, &[(1, 5), (2, 1)].into_iter().collect());
        let newer = KeyState {
            versions: vec![version(2, 1, &[(1, 5)], 9)],
        };
        let older = KeyState {
            versions: vec![version(1, 2, &[], 9)],
        };
        assert!(!Replica::can_serve(&applied, 0, &token));
        assert!(Replica::can_serve_key(&applied, 0, &token, &newer));
        assert!(!Replica::can_serve_key(&applied, 0, &token, &older));
        assert!(
            Replica::can_serve_key(&applied, 1, &token, &older),
            "other partition"
        );
    }

    // ---- replicas over the memory store, synced by direct calls (the networked
    // ---- simulation with faults is `sim`) ----

    struct Node {
        store: MemoryStore,
        replica: Replica,
    }

    /// Keys starting with `m` live in slot 1 (the slot the handoff test moves), the
    /// others in slot 0.
    fn test_slot(key: &str) -> u32 {
        u32::from(key.starts_with('m'))
    }

    fn all_slots() -> SlotSet {
        (0..crate::placement::SLOTS).collect()
    }

    impl Node {
        fn new(id: u64) -> Self {
            Self::in_partition(id, 0)
        }

        fn in_partition(id: u64, partition: PartitionUid) -> Self {
            Self {
                store: MemoryStore::new(),
                replica: Replica::fresh(id, partition),
            }
        }

        fn write(&mut self, key: &str, value: &str, token: CausalToken, now: u64) -> WriteOutcome {
            let mut txn = self.store.write().expect("txn");
            let out = self
                .replica
                .write(
                    &mut *txn,
                    WriteRequest {
                        slot: test_slot(key),
                        key: key.into(),
                        value: Some(value.as_bytes().to_vec()),
                        token,
                        now_us: now,
                        mode: Default::default(),
                    },
                )
                .expect("write");
            self.replica.persist(&mut *txn).expect("persist");
            txn.commit().expect("commit");
            out
        }

        /// A write of the own API's kind: its condition checked, then applied.
        fn write_as(
            &mut self,
            key: &str,
            value: Option<&str>,
            token: CausalToken,
            now: u64,
            mode: WriteMode,
        ) -> std::result::Result<WriteOutcome, crate::error::Error> {
            let mut txn = self.store.write().expect("txn");
            let req = WriteRequest {
                slot: test_slot(key),
                key: key.into(),
                value: value.map(|v| v.as_bytes().to_vec()),
                token,
                now_us: now,
                mode,
            };
            Replica::precondition(&*txn, &req).expect("get")?;
            let out = self.replica.write(&mut *txn, req).expect("write");
            self.replica.persist(&mut *txn).expect("persist");
            txn.commit().expect("commit");
            Ok(out)
        }

        /// The values of `key`'s live siblings, sorted.
        fn values(&self, key: &str) -> Vec<String> {
            let mut values: Vec<String> = self
                .state(key)
                .live()
                .filter_map(|v| String::from_utf8(v.value.clone()?).ok())
                .collect();
            values.sort();
            values
        }

        fn read(&self, key: &str, token: &CausalToken) -> Option<(KeyState, ReadOutcome)> {
            let txn = self.store.read().expect("read");
            let (p, slot) = (self.replica.partition(), test_slot(key));
            let state = txn.get(slot, key).expect("get").unwrap_or_default();
            let served = self.replica.served();
            if !Replica::can_serve(&served, p, token)
                && !Replica::can_serve_key(&served, p, token, &state)
            {
                return None;
            }
            let out = Replica::read(&*txn, p, slot, key, token.clone()).expect("read");
            Some((state, out))
        }

        fn state(&self, key: &str) -> KeyState {
            let txn = self.store.read().expect("read");
            txn.get(test_slot(key), key)
                .expect("get")
                .unwrap_or_default()
        }

        /// Pulls from `from` until complete; small pages exercise paging.
        fn pull(&mut self, from: &Node, page: u32) {
            for _ in 0..10_000 {
                let resp = from.serve(self.replica.applied().clone(), page);
                assert!(!resp.gap, "no trimming happens in this simulation");
                let mut txn = self.store.write().expect("txn");
                self.replica.apply_sync(&mut *txn, &resp).expect("apply");
                self.replica.persist(&mut *txn).expect("persist");
                txn.commit().expect("commit");
                if resp.complete {
                    return;
                }
            }
            panic!("sync did not finish");
        }

        /// What this node answers to a peer that has `have`.
        fn serve(&self, have: VersionVector, max_entries: u32) -> SyncResponse {
            let req = SyncRequest {
                partition: self.replica.partition(),
                have,
                max_entries,
                max_bytes: 1 << 20,
            };
            Replica::serve_sync(
                &*self.store.read().expect("read"),
                &self.replica,
                &all_slots(),
                &req,
            )
            .expect("serve")
        }
    }

    #[test]
    fn only_old_deletes_every_replica_has_are_collectable() {
        let tombstone = |counter, ts| Version {
            value: None,
            ..version(1, counter, &[], ts)
        };
        let floor: VersionVector = [(1, 5)].into_iter().collect();
        let state = |versions| KeyState { versions };
        assert!(Replica::collectable(
            &state(vec![tombstone(5, 10)]),
            &floor,
            10
        ));
        // Too young, not everywhere yet, a value beside it, nothing at all: kept.
        assert!(!Replica::collectable(
            &state(vec![tombstone(5, 11)]),
            &floor,
            10
        ));
        assert!(!Replica::collectable(
            &state(vec![tombstone(6, 10)]),
            &floor,
            10
        ));
        assert!(!Replica::collectable(
            &state(vec![tombstone(4, 10), version(1, 5, &[], 1)]),
            &floor,
            10
        ));
        assert!(!Replica::collectable(&state(vec![]), &floor, 10));
        // A peer's copy of a delete this replica reflects is not merged back.
        assert!(Replica::known_deletes(
            &state(vec![tombstone(5, 10)]),
            &floor
        ));
        assert!(!Replica::known_deletes(
            &state(vec![tombstone(6, 10)]),
            &floor
        ));
        assert!(!Replica::known_deletes(
            &state(vec![version(1, 2, &[], 1)]),
            &floor
        ));
    }

    #[test]
    fn trim_floor_is_the_pointwise_minimum() {
        let mut r = Node::new(1);
        r.write("a", "x", CausalToken::empty(0), 1);
        r.write("a", "y", CausalToken::empty(0), 2);
        let peer: VersionVector = [(1, 1)].into_iter().collect();
        let floor = Replica::trim_floor(r.replica.applied(), [&peer]);
        assert_eq!(floor.get(1), 1);
        let none = VersionVector::new();
        assert_eq!(
            Replica::trim_floor(r.replica.applied(), [&peer, &none]).get(1),
            0
        );
    }

    #[test]
    fn a_gap_in_one_origin_does_not_block_the_others() {
        let mut a = Node::new(1);
        let mut b = Node::new(2);
        b.write("x", "from b", CausalToken::empty(0), 1);
        a.pull(&b, 10);
        a.write("y", "from a", CausalToken::empty(0), 2);
        let mut txn = a.store.write().expect("txn");
        txn.log_trim(2, u64::MAX).expect("trim");
        txn.commit().expect("commit");
        let resp = a.serve(VersionVector::new(), 10);
        assert!(resp.gap);
        assert_eq!(resp.covered.get(1), 1, "origin 1 is still served");
        assert_eq!(resp.covered.get(2), 0, "origin 2 is not claimed");
        // A hostile or confused `have` cannot overflow anything.
        let resp = a.serve([(1, u64::MAX), (2, u64::MAX)].into_iter().collect(), 10);
        assert!(resp.log.is_empty() && !resp.gap);
    }

    #[test]
    fn trimmed_log_reports_a_gap() {
        let mut a = Node::new(1);
        a.write("a", "x", CausalToken::empty(0), 1);
        a.write("b", "y", CausalToken::empty(0), 2);
        let mut txn = a.store.write().expect("txn");
        txn.log_trim(1, 1).expect("trim");
        txn.commit().expect("commit");
        let resp = a.serve(VersionVector::new(), 10);
        assert!(resp.gap);
        assert!(resp.covered.is_empty());
    }

    /// Runs a full transfer from `from` into `to`, calling `between` after every page so
    /// a test can write at the source mid-transfer. Returns the claimed vector.
    fn transfer(
        to: &mut Node,
        from: &mut Node,
        page: u32,
        mut between: impl FnMut(&mut Node),
    ) -> VersionVector {
        let mut after = None;
        let mut claim = None;
        loop {
            let req = SnapshotRequest {
                partition: 0,
                epoch: None,
                slots: None,
                after,
                max_entries: page,
                max_bytes: 1 << 20,
            };
            let p = Replica::serve_snapshot(
                &*from.store.read().expect("read"),
                &from.replica,
                &all_slots(),
                &req,
            )
            .expect("serve");
            let first = claim.get_or_insert_with(|| p.applied.clone()).clone();
            let done = p.next.is_none();
            let resp = SyncResponse {
                states: p.states,
                covered: if done {
                    first.clone()
                } else {
                    VersionVector::new()
                },
                complete: true,
                ..SyncResponse::default()
            };
            let mut txn = to.store.write().expect("txn");
            to.replica.apply_sync(&mut *txn, &resp).expect("apply");
            to.replica.persist(&mut *txn).expect("persist");
            txn.commit().expect("commit");
            if done {
                return first;
            }
            after = p.next;
            between(from);
        }
    }

    #[test]
    fn wiped_replica_is_rebuilt_by_a_snapshot_even_with_writes_between_pages() {
        for seed in 1..=50u64 {
            let mut rng = Rng(seed);
            let mut a = Node::new(1);
            let mut writes = Vec::new();
            let keys: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
            for i in 0..40 {
                let key = &keys[rng.next(12) as usize];
                a.write(key, &format!("v{i}"), CausalToken::empty(0), i);
                writes.push((
                    key.clone(),
                    Dot {
                        replica: 1,
                        counter: a.replica.applied().get(1),
                    },
                ));
            }
            // Everything is trimmed: only a snapshot can rebuild a newcomer.
            let mut txn = a.store.write().expect("txn");
            txn.log_trim(1, u64::MAX).expect("trim");
            txn.commit().expect("commit");
            let mut c = Node::new(3);
            let resp = a.serve(VersionVector::new(), 10);
            assert!(resp.gap);
            let mut step = 100;
            let claim = transfer(&mut c, &mut a, 1 + rng.next(4) as u32, |a| {
                // Overwrite keys on both sides of the cursor mid-transfer.
                step += 1;
                let key = format!("k{}", step % 12);
                a.write(&key, "late", CausalToken::empty(0), step);
            });
            assert!(c.replica.applied().dominates(&claim));
            for (key, dot) in &writes {
                if claim.contains(*dot) {
                    let state = c
                        .store
                        .read()
                        .expect("read")
                        .get(0, key)
                        .expect("get")
                        .unwrap_or_default();
                    assert!(
                        state.covers(*dot),
                        "seed {seed}: {dot:?} of {key} missing after transfer"
                    );
                }
            }
            // And the log-based sync takes over from the claim without a gap.
            let resp = a.serve(c.replica.applied().clone(), 100);
            assert!(
                !resp.gap,
                "seed {seed}: the writes made during the transfer are still in the log"
            );
        }
    }

    /// Moves slot 1 from partition 0 (replicas 1 and 2) to partition 1 (replicas 3 and
    /// 4) the way a view change does: freeze, catch one source up to the join of both
    /// sources' vectors, copy the slot into each destination, claim that join. Tokens
    /// issued before the move keep working: no stale read, no spurious refusal.
    #[test]
    fn handed_over_keys_keep_their_history_and_old_tokens_stay_usable() {
        for seed in 1..=100u64 {
            let mut rng = Rng(seed);
            let mut a = [Node::in_partition(1, 0), Node::in_partition(2, 0)];
            let mut sessions = vec![CausalToken::empty(0); 3];
            let keys = ["a", "b", "m1", "m2", "m3"];
            for step in 0..60 {
                let (n, s) = (rng.next(2) as usize, rng.next(3) as usize);
                let key = keys[rng.next(5) as usize];
                match rng.next(5) {
                    0..=2 => {
                        let out =
                            a[n].write(key, &format!("{seed}-{step}"), sessions[s].clone(), step);
                        sessions[s] = out.token;
                    }
                    3 => {
                        if let Some((_, out)) = a[n].read(key, &sessions[s]) {
                            sessions[s] = out.token;
                        }
                    }
                    _ => {
                        let (x, y) = a.split_at_mut(1);
                        if n == 0 {
                            x[0].pull(&y[0], 3);
                        } else {
                            y[0].pull(&x[0], 3);
                        }
                    }
                }
            }
            // Freeze slot 1 (no more writes to it); the join of the sources' vectors.
            let mut va = a[0].replica.served();
            va.merge(&a[1].replica.served());
            // Source 0 catches up with source 1.
            let (x, y) = a.split_at_mut(1);
            x[0].pull(&y[0], 100);
            assert!(a[0].replica.served().dominates(&va));
            let moved: SlotSet = [1].into_iter().collect();
            let mut b = [Node::in_partition(3, 1), Node::in_partition(4, 1)];
            for d in &mut b {
                let mut after = None;
                loop {
                    let req = SnapshotRequest {
                        partition: 0,
                        epoch: None,
                        slots: Some(moved.clone()),
                        after,
                        max_entries: 1 + rng.next(3) as u32,
                        max_bytes: 1 << 20,
                    };
                    let page = Replica::serve_snapshot(
                        &*a[0].store.read().expect("read"),
                        &a[0].replica,
                        &moved,
                        &req,
                    )
                    .expect("serve");
                    assert!(page.states.iter().all(|(slot, _, _)| *slot == 1));
                    let mut txn = d.store.write().expect("txn");
                    Replica::merge_states(&mut *txn, &page.states).expect("merge");
                    txn.commit().expect("commit");
                    match page.next {
                        Some(next) => after = Some(next),
                        None => break,
                    }
                }
                d.replica.absorb_claim(&va);
            }
            for (s, token) in sessions.iter_mut().enumerate() {
                for key in ["m1", "m2", "m3"] {
                    let source = a[0].state(key);
                    for (i, d) in b.iter().enumerate() {
                        let (state, out) = d.read(key, token).unwrap_or_else(|| {
                            panic!("seed {seed}: session {s} refused at b{i} for {key}")
                        });
                        assert_eq!(state, source, "seed {seed}: {key} differs after the move");
                        *token = out.token;
                    }
                }
            }
            // Writes after the move at one destination, read at the other after a pull.
            for (s, token) in sessions.iter_mut().enumerate() {
                let value = format!("after {s}");
                let out = b[0].write("m1", &value, token.clone(), 1_000 + s as u64);
                *token = out.token;
                let (x, y) = b.split_at_mut(1);
                y[0].pull(&x[0], 10);
                let (state, _) = b[1]
                    .read("m1", token)
                    .unwrap_or_else(|| panic!("seed {seed}: own write refused at b1"));
                assert_eq!(
                    state.winner().and_then(|v| v.value.clone()),
                    Some(value.into_bytes()),
                    "seed {seed}: stale read of m1 after the move"
                );
            }
        }
    }
}
