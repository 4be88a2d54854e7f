//! Changes to a view, why one can be refused, and [`View::apply`], which hands each
//! change to the rules of the view's layout (`replicas.rs`, `shards.rs`).

use serde::{Deserialize, Serialize};

use super::{replicas, shards, Layout, View};

/// One change of the cluster configuration, as a client asks for it.
///
/// Encoded in proposals (on disk and on the wire) by variant position: new variants are
/// appended, never inserted, so encodings made before they existed still decode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Make a node a member (`update_view?type=add`, `PUT /key-value-store-view`).
    Add(String),
    /// Drop a member (`update_view?type=remove`, `DELETE /key-value-store-view`).
    Remove(String),
    /// Put a node in the shard clients call `shard` (seed 002 `add-member`), making it a
    /// member first if it is not one. Shard-count mode only.
    AddToShard { addr: String, shard: u32 },
    /// Deal every member into this many shards (seed 002 `reshard`). Shard-count mode
    /// only.
    Reshard(u32),
    /// Make `members` (in this order) the whole member list, dealt into shards of
    /// `replication` replicas (seed 003 `view-change`): nodes join and leave at once.
    /// Without a factor, K mode keeps its K and shard-count mode its shard count. See
    /// `replace.rs`.
    Replace {
        members: Vec<String>,
        replication: Option<u32>,
    },
}

impl Change {
    /// The node the change is about; `None` for a reshard, which names none.
    pub fn addr(&self) -> Option<&str> {
        match self {
            Change::Add(a) | Change::Remove(a) | Change::AddToShard { addr: a, .. } => Some(a),
            Change::Reshard(_) | Change::Replace { .. } => None,
        }
    }

    /// The nodes this change makes members of `view` that are not members yet: each
    /// must be running, blank and of a compatible configuration before the change is
    /// decided.
    pub fn newcomers(&self, view: &View) -> Vec<&str> {
        match self {
            Change::Add(a) => vec![a],
            Change::AddToShard { addr, .. } if !view.is_member(addr) => vec![addr],
            Change::Replace { members, .. } => members
                .iter()
                .filter(|m| !view.is_member(m))
                .map(String::as_str)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The member this change removes from the view when it may be down (a `Remove`:
    /// the change goes ahead without it). Members a `Replace` leaves out are not
    /// included: they hold data to hand over, so they must take part.
    pub fn removed(&self) -> Option<&str> {
        match self {
            Change::Remove(a) => Some(a),
            _ => None,
        }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Add(a) => write!(f, "add {a}"),
            Change::Remove(a) => write!(f, "remove {a}"),
            Change::AddToShard { addr, shard } => write!(f, "add {addr} to shard {shard}"),
            Change::Reshard(n) => write!(f, "reshard into {n} shards"),
            Change::Replace {
                members,
                replication,
            } => {
                write!(f, "replace the view with {}", members.join(","))?;
                match replication {
                    Some(r) => write!(f, " (replication factor {r})"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Why a change cannot be applied to a view. Messages name the layout's terms, never a
/// client dialect's (each dialect maps these to its status codes and wording).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("{0} is already in the view")]
    AlreadyMember(String),
    #[error("{0} is not in the view")]
    NotMember(String),
    #[error(
        "removing {addr} would leave {n} nodes, fewer than K = {k}: no partition could hold the data"
    )]
    TooFewNodes { addr: String, n: usize, k: usize },
    /// The view's epoch or partition-uid counter is at its maximum (no real cluster gets
    /// there; a view from a broken peer or disk may say so).
    #[error("the view's {0} counter is at its maximum: no view can follow it")]
    Exhausted(&'static str),
    /// `AddToShard` named a shard index the view does not have.
    #[error("there is no shard {0}")]
    NoSuchShard(u32),
    #[error("{addr} is already in shard {shard}")]
    AlreadyInShard { addr: String, shard: u32 },
    /// `AddToShard` would move the last replica out of its shard.
    #[error(
        "{addr} is the only replica of shard {shard}: moving it would leave that shard without its data (add another node to it first)"
    )]
    OnlyReplica { addr: String, shard: u32 },
    /// `Remove` of the node that alone holds all the data.
    #[error(
        "{0} is the only replica of the only shard: removing it would leave nothing to hold the data"
    )]
    LastShard(String),
    /// A reshard to more shards than the members can fill with two replicas each.
    #[error("{nodes} nodes cannot form {shards} shards of at least 2 replicas each")]
    NotEnoughNodes { nodes: usize, shards: usize },
    #[error("the shard count must be at least 1")]
    ZeroShards,
    /// A shard-count change asked of a K-mode view; carries the change, as displayed.
    #[error(
        "cannot {0}: this cluster is in K mode, where partitions follow K and shards are neither named nor counted"
    )]
    ShardModeOnly(String),
    #[error("the new view is empty")]
    EmptyView,
    #[error("{0} is listed twice in the new view")]
    DuplicateMember(String),
    #[error("the replication factor must be at least 1")]
    ZeroReplicationFactor,
    #[error("{nodes} nodes cannot hold even one shard of {r} replicas")]
    FewerNodesThanReplicas { nodes: usize, r: usize },
    #[error("{nodes} nodes cannot fill {shards} shards")]
    FewerNodesThanShards { nodes: usize, shards: usize },
}

impl View {
    /// The view that follows this one after `change` (epoch + 1), by the rules of its
    /// layout. See the module doc. Deterministic: every node computes the same view.
    pub fn apply(&self, change: &Change) -> Result<View, ChangeError> {
        let mut next = self.clone();
        // Checked: a view from a peer or the disk may carry any counter (`check` does
        // not bound them), and an overflow would panic where overflow checks are on.
        next.epoch = self
            .epoch
            .checked_add(1)
            .ok_or(ChangeError::Exhausted("epoch"))?;
        match self.layout {
            Layout::Replicas(k) => replicas::apply(self, &mut next, k, change)?,
            Layout::Shards => shards::apply(self, &mut next, change)?,
        }
        debug_assert!(next.check().is_ok(), "apply broke a view invariant");
        Ok(next)
    }

    /// Takes the next partition uid. Checked like the epoch: a view from a peer or the
    /// disk may carry any counter.
    pub(super) fn take_uid(&mut self) -> Result<super::PartitionUid, ChangeError> {
        let uid = self.next_uid;
        self.next_uid = uid
            .checked_add(1)
            .ok_or(ChangeError::Exhausted("partition uid"))?;
        Ok(uid)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn every_change_displays_and_names_its_node() {
        let cases = [
            (Change::Add(addr(1)), "add 10.0.0.21:8080", Some(addr(1))),
            (
                Change::Remove(addr(2)),
                "remove 10.0.0.22:8080",
                Some(addr(2)),
            ),
            (
                Change::AddToShard {
                    addr: addr(3),
                    shard: 1,
                },
                "add 10.0.0.23:8080 to shard 1",
                Some(addr(3)),
            ),
            (Change::Reshard(3), "reshard into 3 shards", None),
        ];
        for (change, text, node) in cases {
            assert_eq!(change.to_string(), text);
            assert_eq!(change.addr().map(str::to_string), node);
        }
        let v = View::bootstrap_shards(addrs(4), 2).expect("valid");
        let to_shard = |a| Change::AddToShard { addr: a, shard: 0 };
        assert_eq!(to_shard(addr(9)).newcomers(&v), vec![addr(9).as_str()]);
        assert!(to_shard(addr(1)).newcomers(&v).is_empty());
        assert_eq!(Change::Add(addr(9)).newcomers(&v), vec![addr(9).as_str()]);
        let replace = Change::Replace {
            members: vec![addr(1), addr(8), addr(9)],
            replication: Some(3),
        };
        assert_eq!(
            replace.newcomers(&v),
            vec![addr(8).as_str(), addr(9).as_str()]
        );
        assert_eq!(
            replace.to_string(),
            "replace the view with 10.0.0.21:8080,10.0.0.28:8080,10.0.0.29:8080 (replication factor 3)"
        );
        assert_eq!(replace.removed(), None);
        assert_eq!(Change::Remove(addr(1)).removed(), Some(addr(1).as_str()));
        assert_eq!(Change::Reshard(1).removed(), None);
    }

    /// Proposals persisted or sent before the shard-count changes existed still decode.
    #[test]
    fn the_first_changes_keep_their_encoding() {
        for (change, tag) in [(Change::Add(addr(1)), 0u8), (Change::Remove(addr(1)), 1)] {
            let bytes = postcard::to_stdvec(&change).expect("encodes");
            assert_eq!(bytes[0], tag);
            assert_eq!(postcard::from_bytes::<Change>(&bytes), Ok(change));
        }
    }
}
