//! The node's durable state: its view, replica, the transition of a view change in
//! progress, the Paxos acceptor, its removal and the cluster key. Loaded from the store's
//! meta table at start (migrating what the first version of kvs wrote, bootstrapping from
//! VIEW and K on a first start), persisted by the writer in the transaction that changes
//! it.

use std::sync::Arc;

use super::ReplicaStatus;
use crate::auth::ClusterKey;
use crate::clock::{ReplicaId, VersionVector};
use crate::error::{Error, Result};
use crate::node::Layout;
use crate::placement::{Role, SlotSet, View};
use crate::replica::Replica;
use crate::storage::{ReadTxn, Store, WriteTxn};
use crate::viewchange::{duties, Acceptor, Transition};

/// Meta-table names of the node's durable state. The view, and the transition and
/// acceptor state that embed views, are named after the view encoding (v3: views with a
/// layout); older names are read and migrated on start (see `placement::legacy`).
pub const META_VIEW: &str = "view.v3";
pub const META_TRANSITION: &str = "transition.v3";
pub const META_ACCEPTOR: &str = "paxos.v3";
/// `(cluster, epoch)` of the view that removed this node.
pub const META_REMOVED: &str = "removed";
/// The cluster key (`auth::ClusterKey`): secret, shared only among members.
pub const META_CLUSTER_KEY: &str = "cluster.key";
/// Names written by the first version of kvs, migrated on start.
const LEGACY_VIEW: &str = "view";
const LEGACY_REPLICA: &str = "replica";
const LEGACY_REPLICA_ID: &str = "replica_id";
/// Names written with v2 views (K only, before layouts), migrated on start.
const V2_VIEW: &str = "view.v2";
const V2_TRANSITION: &str = "transition";
const V2_ACCEPTOR: &str = "paxos";

/// The node's durable state; see the module doc.
#[derive(Clone, Debug)]
pub(in crate::node) struct Durable {
    pub addr: String,
    pub view: Option<Arc<View>>,
    pub replica: Option<Replica>,
    pub transition: Option<Arc<Transition>>,
    pub acceptor: Arc<Acceptor>,
    pub removed: Option<(u64, u64)>,
    /// The key of the cluster this node is in (or was last in); see `node::keys`.
    pub cluster_key: Option<ClusterKey>,
    /// Derived from `transition`: slots this replica no longer accepts writes to.
    pub(super) frozen: SlotSet,
    /// Derived from `transition`: this replica accepts no writes at all.
    pub(super) leaving: bool,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::internal(format!("corrupt {what} in the data directory: {e}"))
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("state serialization is infallible")
}

impl Durable {
    /// Loads the node's state from `store`, migrating the first version's layout, and
    /// bootstraps from `env_view` (VIEW and K) when the store holds no view. Persists
    /// what it decided before returning.
    pub fn load(store: &dyn Store, addr: &str, env_view: Option<View>) -> Result<Self> {
        let txn = store.read()?;
        let stored_view = match (txn.meta(META_VIEW)?, txn.meta(V2_VIEW)?) {
            (Some(b), _) => Some(postcard::from_bytes::<View>(&b).map_err(|e| corrupt("view", e))?),
            (None, Some(b)) => Some(View::from_v2_bytes(&b).map_err(|e| corrupt("view", e))?),
            (None, None) => match txn.meta(LEGACY_VIEW)? {
                Some(b) => Some(View::from_legacy_bytes(&b).map_err(|e| corrupt("view", e))?),
                None => None,
            },
        };
        if let Some(v) = &stored_view {
            v.check().map_err(|e| corrupt("view", e))?;
        }
        let mut replica = Replica::load(&*txn)?;
        if replica.is_none() {
            replica = legacy_replica(&*txn, stored_view.as_ref(), addr)?;
        }
        let transition: Option<Transition> = match txn.meta(META_TRANSITION)? {
            Some(b) => Some(postcard::from_bytes(&b).map_err(|e| corrupt("transition", e))?),
            None => txn
                .meta(V2_TRANSITION)?
                .map(|b| Transition::from_v2_bytes(&b).map_err(|e| corrupt("transition", e)))
                .transpose()?,
        };
        let acceptor: Option<Acceptor> = match txn.meta(META_ACCEPTOR)? {
            Some(b) => Some(postcard::from_bytes(&b).map_err(|e| corrupt("acceptor state", e))?),
            None => txn
                .meta(V2_ACCEPTOR)?
                .map(|b| Acceptor::from_v2_bytes(&b).map_err(|e| corrupt("acceptor state", e)))
                .transpose()?,
        };
        let removed: Option<(u64, u64)> = txn
            .meta(META_REMOVED)?
            .map(|b| postcard::from_bytes(&b).map_err(|e| corrupt("removal record", e)))
            .transpose()?;
        let cluster_key: Option<ClusterKey> = txn
            .meta(META_CLUSTER_KEY)?
            .map(|b| postcard::from_bytes(&b).map_err(|e| corrupt("cluster key", e)))
            .transpose()?;
        drop(txn);

        let view = match (stored_view, env_view) {
            (Some(stored), env) => {
                if env
                    .as_ref()
                    .is_some_and(|v| v.members != stored.members || v.layout != stored.layout)
                {
                    tracing::info!(
                        epoch = stored.epoch,
                        "VIEW/K differ from the view stored in the data directory; the stored view wins"
                    );
                }
                Some(stored)
            }
            (None, Some(env)) if removed.is_some() => {
                tracing::warn!(
                    "this node was removed from its cluster; ignoring VIEW and waiting to be added again"
                );
                drop(env);
                None
            }
            (None, Some(env)) => {
                if !env.is_member(addr) {
                    return Err(Error::bad_request(format!(
                        "IPPORT {addr} is not in VIEW ({})",
                        env.members.join(",")
                    )));
                }
                Some(env)
            }
            (None, None) => None,
        };
        let epoch = view.as_ref().map_or(0, |v| v.epoch);
        let has_view = view.is_some();
        let mut d = Durable {
            addr: addr.to_string(),
            view: view.map(Arc::new),
            replica,
            // A transition is kept if it leads from this node's view, or (for a node
            // in no cluster) if it makes this node a member.
            transition: transition
                .filter(|t| {
                    if has_view {
                        t.proposal.epoch() == epoch + 1
                    } else {
                        t.proposal.to.is_member(addr)
                    }
                })
                .map(Arc::new),
            acceptor: Arc::new(
                acceptor
                    .filter(|a| a.epoch == epoch + 1)
                    .unwrap_or_else(|| Acceptor::new(epoch + 1)),
            ),
            removed,
            cluster_key,
            frozen: SlotSet::new(),
            leaving: false,
        };
        // The replica incarnation must match the role: a first start (or a start after
        // the role changed while the node was down) makes a fresh one.
        let mut txn = store.write()?;
        let role = d.view.as_ref().and_then(|v| v.role_of(addr));
        match role {
            Some(Role::Replica(uid))
                if d.replica.as_ref().is_some_and(|r| r.partition() == uid) => {}
            Some(Role::Replica(uid)) => {
                if d.replica.is_some() {
                    txn.log_clear()?;
                }
                d.replica = Some(Replica::fresh(rand::random(), uid));
            }
            _ => {
                if d.replica.take().is_some() {
                    txn.log_clear()?;
                }
            }
        }
        d.derive();
        d.persist_all(&mut *txn)?;
        txn.commit()?;
        Ok(d)
    }

    pub(super) fn derive(&mut self) {
        match &self.transition {
            Some(t) => {
                let d = duties(&t.proposal, &self.addr);
                self.frozen = d.frozen;
                self.leaving = d.leaving;
            }
            None => {
                self.frozen = SlotSet::new();
                self.leaving = false;
            }
        }
    }

    pub(super) fn persist_all(&self, txn: &mut dyn WriteTxn) -> Result<()> {
        match &self.view {
            Some(v) => txn.set_meta(META_VIEW, &encode(&**v))?,
            None => txn.delete_meta(META_VIEW)?,
        }
        txn.delete_meta(LEGACY_VIEW)?;
        for v2 in [V2_VIEW, V2_TRANSITION, V2_ACCEPTOR] {
            txn.delete_meta(v2)?;
        }
        txn.delete_meta(LEGACY_REPLICA)?;
        txn.delete_meta(LEGACY_REPLICA_ID)?;
        match &self.replica {
            Some(r) => r.persist(txn)?,
            None => txn.delete_meta(crate::replica::META_REPLICA)?,
        }
        match &self.transition {
            Some(t) => txn.set_meta(META_TRANSITION, &encode(&**t))?,
            None => txn.delete_meta(META_TRANSITION)?,
        }
        txn.set_meta(META_ACCEPTOR, &encode(&*self.acceptor))?;
        match &self.removed {
            Some(r) => txn.set_meta(META_REMOVED, &encode(r))?,
            None => txn.delete_meta(META_REMOVED)?,
        }
        match &self.cluster_key {
            Some(k) => txn.set_meta(META_CLUSTER_KEY, &encode(k))?,
            None => txn.delete_meta(META_CLUSTER_KEY)?,
        }
        Ok(())
    }

    pub fn layout(&self) -> Layout {
        Layout {
            view: self.view.clone(),
            transition: self.transition.clone(),
            replica: self.replica.as_ref().map(|r| (r.partition(), r.id())),
            cluster_key: self.cluster_key.clone(),
        }
    }

    /// Whether the node is in no cluster and joins none: no view, no change in progress.
    pub(super) fn outside(&self) -> bool {
        self.view.is_none() && self.transition.is_none()
    }

    pub fn replica_status(&self) -> Option<ReplicaStatus> {
        self.replica.as_ref().map(ReplicaStatus::of)
    }

    /// Slots whose keys this node keeps: those of its partition in its view and, during
    /// a transition, in the next view.
    pub fn keeps(&self, slot: u32) -> bool {
        let mine = |v: &View| match v.role_of(&self.addr) {
            Some(Role::Replica(uid)) => v.owner_of_slot(slot) == uid,
            _ => false,
        };
        self.view.as_deref().is_some_and(mine)
            || self.transition.as_deref().is_some_and(|t| mine(t.to()))
    }
}

/// The replica of a data directory written by the first version of kvs.
fn legacy_replica(txn: &dyn ReadTxn, view: Option<&View>, addr: &str) -> Result<Option<Replica>> {
    #[derive(serde::Deserialize)]
    struct Meta {
        applied: VersionVector,
        known: VersionVector,
    }
    let (Some(meta), Some(id), Some(Role::Replica(uid))) = (
        txn.meta(LEGACY_REPLICA)?,
        txn.meta(LEGACY_REPLICA_ID)?,
        view.and_then(|v| v.role_of(addr)),
    ) else {
        return Ok(None);
    };
    let meta: Meta = postcard::from_bytes(&meta).map_err(|e| corrupt("replica vectors", e))?;
    let id: ReplicaId = postcard::from_bytes(&id).map_err(|e| corrupt("replica id", e))?;
    Ok(Some(Replica::from_parts(id, uid, meta.applied, meta.known)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::writer::batch::learn;
    use crate::node::writer::testing::{addr, install_in, view};
    use crate::node::writer::Installed;
    use crate::placement::Change;
    use crate::storage::MemoryStore;
    use crate::viewchange::Proposal;

    /// A data directory written with v2 views (before layouts) in the middle of a
    /// change: view, learned transition and accepted proposal all come back, under the
    /// current names.
    #[test]
    fn a_v2_data_directory_is_migrated() {
        use crate::viewchange::{AcceptReply, Ballot};
        let v = view(5, 2);
        let p = Proposal::new(Change::Add(addr(6)), &v).expect("valid");
        let mut acceptor = Acceptor::new(v.epoch + 1);
        let ballot = Ballot {
            round: 1,
            node: addr(1),
        };
        assert_eq!(acceptor.on_accept(&ballot, &p), AcceptReply::Accepted);
        let store = MemoryStore::new();
        let mut txn = store.write().expect("txn");
        txn.set_meta(V2_VIEW, &encode(&v.v2())).expect("meta");
        txn.set_meta(V2_TRANSITION, &Transition::new(p.clone()).v2_bytes())
            .expect("meta");
        txn.set_meta(V2_ACCEPTOR, &acceptor.v2_bytes())
            .expect("meta");
        txn.commit().expect("commit");

        let d = Durable::load(&store, &addr(3), None).expect("loads");
        assert_eq!(d.view.as_deref(), Some(&v));
        assert_eq!(d.transition.as_ref().map(|t| &t.proposal), Some(&p));
        assert_eq!(*d.acceptor, acceptor);
        let read = store.read().expect("read");
        for (old, new) in [
            (V2_VIEW, META_VIEW),
            (V2_TRANSITION, META_TRANSITION),
            (V2_ACCEPTOR, META_ACCEPTOR),
        ] {
            assert!(read.meta(old).expect("meta").is_none(), "{old} left behind");
            assert!(read.meta(new).expect("meta").is_some(), "{new} not written");
        }
        drop(read);
        let again = Durable::load(&store, &addr(3), None).expect("loads");
        assert_eq!(again.view, d.view);
        assert_eq!(again.transition, d.transition);
    }

    #[test]
    fn a_first_version_data_directory_is_migrated() {
        let v = view(4, 2);
        let applied: VersionVector = [(77, 5)].into_iter().collect();
        let store = MemoryStore::new();
        let mut txn = store.write().expect("txn");
        txn.set_meta(LEGACY_VIEW, &v.legacy_bytes()).expect("meta");
        txn.set_meta(LEGACY_REPLICA, &encode(&(applied.clone(), applied.clone())))
            .expect("meta");
        txn.set_meta(LEGACY_REPLICA_ID, &encode(&77u64))
            .expect("meta");
        txn.commit().expect("commit");

        let d = Durable::load(&store, &addr(3), None).expect("loads");
        assert_eq!(d.view.as_deref(), Some(&v));
        let r = d.replica.as_ref().expect("a replica");
        assert_eq!((r.id(), r.partition()), (77, 1));
        assert_eq!(r.applied(), &applied);
        let read = store.read().expect("read");
        assert!(read.meta(LEGACY_VIEW).expect("meta").is_none());
        assert!(read.meta(META_VIEW).expect("meta").is_some());
        drop(read);
        // And it loads again from the new layout.
        let again = Durable::load(&store, &addr(3), None).expect("loads");
        assert_eq!(again.replica, d.replica);
    }

    #[test]
    fn a_removed_node_ignores_view_and_stays_out() {
        let store = MemoryStore::new();
        let v = view(3, 1);
        let mut d = Durable::load(&store, &addr(3), Some(v.clone())).expect("loads");
        assert!(d.replica.is_some());
        let next = v.apply(&Change::Remove(addr(3))).expect("valid");
        assert_eq!(install_in(&store, &mut d, &next), Installed::Switched);
        assert!(d.view.is_none() && d.replica.is_none());
        // Restarted with its original VIEW (e.g. the same docker run line): still out.
        let d = Durable::load(&store, &addr(3), Some(v)).expect("loads");
        assert!(d.view.is_none() && d.replica.is_none());
        assert_eq!(d.removed, Some((next.cluster, next.epoch)));
    }

    #[test]
    fn a_new_node_keeps_its_transition_across_restarts() {
        let store = MemoryStore::new();
        let mut d = Durable::load(&store, &addr(6), None).expect("loads");
        assert!(d.view.is_none());
        let p = Proposal::new(Change::Add(addr(6)), &view(5, 2)).expect("valid");
        assert!(learn(&mut d, &Transition::new(p.clone())).expect("learns"));
        let mut txn = store.write().expect("txn");
        d.persist_all(&mut *txn).expect("persist");
        txn.commit().expect("commit");
        let d = Durable::load(&store, &addr(6), None).expect("loads");
        assert_eq!(d.transition.as_ref().map(|t| &t.proposal), Some(&p));
        // A proposal that does not make it a member is refused.
        let mut other = Durable::load(&MemoryStore::new(), &addr(9), None).expect("loads");
        assert!(learn(&mut other, &Transition::new(p)).is_err());
    }
}
