//! Views as earlier versions of kvs encoded them, read so that their data directories
//! (and the proposals persisted in them) keep working after an upgrade.
//!
//! Views are postcard-encoded, which is not self-describing: a field added or replaced
//! changes how every later byte is read. So each encoding gets its own type and its own
//! meta key (see `node::writer`), and old encodings are converted on load, never
//! guessed at: the v2 `k` field read as a v3 [`Layout`] would turn `k = 1` into
//! `Layout::Shards` silently.
//!
//! * v1 (no meta version): no view changes; partition index = uid. [`LegacyView`].
//! * v2 (`view.v2`): partition uids, but `k: usize` instead of a layout. [`ViewV2`].
//! * v3 (`view.v3`, current): [`View`] with its [`Layout`].

use serde::{Deserialize, Serialize};

use super::{Layout, Partition, PartitionUid, View, ViewError};

/// The view layout written by kvs before view changes existed (partition index = uid).
/// Data directories of that version are migrated on start.
#[derive(Serialize, Deserialize)]
struct LegacyView {
    cluster: u64,
    epoch: u64,
    k: usize,
    members: Vec<String>,
    partitions: Vec<Vec<String>>,
    slots: Vec<u32>,
}

/// The view as kvs encoded it before layouts existed (K mode only): [`View`] with `k`
/// where `layout` now is. Public so that types which embed a view (proposals,
/// transitions) can decode their own v2 encodings with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewV2 {
    pub cluster: u64,
    pub epoch: u64,
    pub k: usize,
    pub members: Vec<String>,
    pub partitions: Vec<Partition>,
    pub slots: Vec<PartitionUid>,
    pub next_uid: PartitionUid,
}

impl From<ViewV2> for View {
    fn from(old: ViewV2) -> View {
        View {
            cluster: old.cluster,
            epoch: old.epoch,
            layout: Layout::Replicas(old.k),
            members: old.members,
            partitions: old.partitions,
            slots: old.slots,
            next_uid: old.next_uid,
        }
    }
}

impl View {
    /// Decodes a view persisted by the first version of kvs.
    pub fn from_legacy_bytes(bytes: &[u8]) -> Result<View, ViewError> {
        let old: LegacyView = postcard::from_bytes(bytes)
            .map_err(|e| ViewError::Inconsistent(format!("undecodable legacy view: {e}")))?;
        let view = View {
            cluster: old.cluster,
            epoch: old.epoch,
            layout: Layout::Replicas(old.k),
            members: old.members,
            next_uid: old.partitions.len() as PartitionUid,
            partitions: old
                .partitions
                .into_iter()
                .enumerate()
                .map(|(i, replicas)| Partition {
                    uid: i as PartitionUid,
                    replicas,
                })
                .collect(),
            slots: old.slots,
        };
        view.check()?;
        Ok(view)
    }

    /// Decodes a view persisted under `view.v2` (K mode, before layouts existed).
    pub fn from_v2_bytes(bytes: &[u8]) -> Result<View, ViewError> {
        let old: ViewV2 = postcard::from_bytes(bytes)
            .map_err(|e| ViewError::Inconsistent(format!("undecodable v2 view: {e}")))?;
        let view = View::from(old);
        view.check()?;
        Ok(view)
    }

    /// This view in the first version's layout (for migration tests). Only views whose
    /// uids are their indices can be written that way.
    #[cfg(test)]
    pub(crate) fn legacy_bytes(&self) -> Vec<u8> {
        let old = LegacyView {
            cluster: self.cluster,
            epoch: self.epoch,
            k: self.k().expect("the first version had K mode only"),
            members: self.members.clone(),
            partitions: self.partitions.iter().map(|p| p.replicas.clone()).collect(),
            slots: self.slots.clone(),
        };
        postcard::to_stdvec(&old).expect("view serialization is infallible")
    }

    /// This view in the v2 layout (for migration tests); K mode only.
    #[cfg(test)]
    pub(crate) fn v2(&self) -> ViewV2 {
        ViewV2 {
            cluster: self.cluster,
            epoch: self.epoch,
            k: self.k().expect("v2 had K mode only"),
            members: self.members.clone(),
            partitions: self.partitions.clone(),
            slots: self.slots.clone(),
            next_uid: self.next_uid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::Change;
    use super::*;

    #[test]
    fn legacy_views_are_migrated() {
        let v = View::bootstrap(addrs(5), 2).expect("valid");
        assert_eq!(View::from_legacy_bytes(&v.legacy_bytes()), Ok(v));
    }

    /// A view stored under `view.v2` (after some changes, so uids are not indices)
    /// becomes the same view in K mode, `k` as its layout.
    #[test]
    fn v2_views_round_trip_into_the_layout() {
        let mut v = View::bootstrap(addrs(6), 2).expect("valid");
        for change in [Change::Remove(addr(1)), Change::Add(addr(9))] {
            v = v.apply(&change).expect("valid");
        }
        assert!(v
            .partitions
            .iter()
            .enumerate()
            .any(|(i, p)| p.uid != i as u32));
        let bytes = postcard::to_stdvec(&v.v2()).expect("encodes");
        let back = View::from_v2_bytes(&bytes).expect("decodes");
        assert_eq!(back, v);
        assert_eq!(back.layout, Layout::Replicas(2));
        // K = 1 is where a guess would go wrong: as a v3 view, `k = 1` reads as the
        // second layout.
        let one = View::bootstrap(addrs(3), 1).expect("valid");
        let bytes = postcard::to_stdvec(&one.v2()).expect("encodes");
        assert_eq!(View::from_v2_bytes(&bytes), Ok(one.clone()));
        let guessed: Result<View, _> = postcard::from_bytes(&bytes);
        assert!(guessed.map_or(true, |g| g.layout != Layout::Replicas(1)));
        // Garbage is refused, not guessed at.
        assert!(View::from_v2_bytes(&bytes[..bytes.len() / 2]).is_err());
    }
}
