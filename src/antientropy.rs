//! The decisions of anti-entropy between the replicas of a partition, without the I/O:
//! what a puller does after each sync page, and how a full state transfer folds its
//! pages into one claim.
//!
//! # Design
//!
//! Replicas converge by pulling (see `replica` for the protocol): each replica asks each
//! peer for the log entries its `applied` vector lacks, every sync interval, at once when
//! poked after a peer's local write, and when a read needs to catch up. Only what differs
//! travels: the pages name the missing writes and carry the current state of the keys
//! they touched. The log is kept until every peer has it, so writes a replica missed
//! while cut off reach it as soon as a pull gets through, without a full comparison;
//! that is this design's hinted delivery, with the hints kept by every replica that has
//! the writes rather than by one coordinator.
//!
//! When a peer's log cannot supply what the asker lacks (it was trimmed, or the asker's
//! data directory was wiped and it missed a handoff), the asker waits a few rounds for
//! another peer to supply it, then copies the peer's whole state ([`Transfer`]) and claims
//! the vectors of the transfer's first page.
//!
//! Both the server (`node::sync`) and the deterministic simulator (`sim`) drive these
//! types, so the simulator tests the decisions the server makes.

use crate::clock::{PartitionUid, VersionVector};
use crate::replica::{Claim, SnapshotPage, SnapshotRequest, SyncResponse};

/// Sync rounds a puller waits for another peer to fill a gap in its log before it copies
/// this peer's whole state.
pub const GAP_PATIENCE_ROUNDS: u32 = 3;

/// What a puller does after applying a sync page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The page was cut short by a bound: ask again at once.
    More,
    /// Up to date with this peer: wait for the next interval or poke.
    Done,
    /// The peer lacks writes this replica needs; another peer may have them, so wait.
    Wait,
    /// Nobody's log will supply them: copy this peer's whole state ([`Transfer`]).
    CopyState,
}

/// One puller's memory across rounds (one per peer).
#[derive(Clone, Debug, Default)]
pub struct Puller {
    gap_rounds: u32,
}

impl Puller {
    /// Decides after a page `resp` from a peer. `absorbed` is this replica's vector of
    /// handoff claims, `peers` how many peers the partition has, `changing` whether a
    /// view change is in progress (the switch may be what closes a difference, so no
    /// state is copied meanwhile).
    pub fn after_page(
        &mut self,
        resp: &SyncResponse,
        absorbed: &VersionVector,
        peers: usize,
        changing: bool,
    ) -> Next {
        if resp.gap || Self::missed_handoff(resp, absorbed) {
            // With a single peer there is nobody else to wait for.
            self.gap_rounds += 1;
            let patient = peers > 1 && self.gap_rounds < GAP_PATIENCE_ROUNDS;
            if patient || changing {
                return Next::Wait;
            }
            self.gap_rounds = 0;
            return Next::CopyState;
        }
        self.gap_rounds = 0;
        if resp.complete {
            Next::Done
        } else {
            Next::More
        }
    }

    /// The peer reflects a handoff this replica never received (its data directory was
    /// wiped, or it was down when the handoff happened): no log holds those keys, only a
    /// copy of the peer's state does.
    pub fn missed_handoff(resp: &SyncResponse, absorbed: &VersionVector) -> bool {
        resp.absorbed
            .iter()
            .any(|(origin, _)| absorbed.get(origin) == 0)
    }
}

/// A full state transfer from one peer, page by page. The claim is the first page's
/// vectors (see `Replica::serve_snapshot` for why that is sound), made only once the
/// last page is merged.
#[derive(Clone, Debug)]
pub struct Transfer {
    partition: PartitionUid,
    after: Option<(u32, String)>,
    claim: Option<Claim>,
    done: bool,
    /// Keys received so far.
    pub keys: usize,
}

impl Transfer {
    pub fn new(partition: PartitionUid) -> Self {
        Self {
            partition,
            after: None,
            claim: None,
            done: false,
            keys: 0,
        }
    }

    /// The request for the next page.
    pub fn request(&self, max_entries: u32, max_bytes: u32) -> SnapshotRequest {
        SnapshotRequest {
            partition: self.partition,
            epoch: None,
            slots: None,
            after: self.after.clone(),
            max_entries,
            max_bytes,
        }
    }

    /// Takes a page; returns the states to merge (as a page that claims nothing).
    pub fn on_page(&mut self, page: SnapshotPage) -> SyncResponse {
        self.claim.get_or_insert_with(|| Claim {
            applied: page.applied.clone(),
            absorbed: page.absorbed.clone(),
        });
        self.keys += page.states.len();
        self.done = page.next.is_none();
        self.after = page.next;
        SyncResponse {
            states: page.states,
            complete: true,
            ..SyncResponse::default()
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// What the receiver may claim; call once the last page is merged.
    pub fn claim(self) -> Claim {
        debug_assert!(self.done, "a transfer claims only once complete");
        self.claim.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(gap: bool, complete: bool) -> SyncResponse {
        SyncResponse {
            gap,
            complete,
            ..SyncResponse::default()
        }
    }

    #[test]
    fn a_gap_waits_for_other_peers_then_copies() {
        let none = VersionVector::new();
        let mut p = Puller::default();
        assert_eq!(p.after_page(&page(true, true), &none, 2, false), Next::Wait);
        assert_eq!(p.after_page(&page(true, true), &none, 2, false), Next::Wait);
        assert_eq!(
            p.after_page(&page(true, true), &none, 2, false),
            Next::CopyState
        );
        // The count starts over after a copy, and after a clean page.
        assert_eq!(p.after_page(&page(true, true), &none, 2, false), Next::Wait);
        assert_eq!(
            p.after_page(&page(false, false), &none, 2, false),
            Next::More
        );
        assert_eq!(p.after_page(&page(true, true), &none, 2, false), Next::Wait);
        // A single peer: nobody to wait for. A view change: never copy.
        assert_eq!(
            Puller::default().after_page(&page(true, true), &none, 1, false),
            Next::CopyState
        );
        let mut p = Puller::default();
        for _ in 0..5 {
            assert_eq!(p.after_page(&page(true, true), &none, 1, true), Next::Wait);
        }
    }

    #[test]
    fn a_missed_handoff_is_a_gap() {
        let mut resp = page(false, true);
        resp.absorbed = [(7, 3)].into_iter().collect();
        let mine: VersionVector = [(7, 1)].into_iter().collect();
        assert!(!Puller::missed_handoff(&resp, &mine));
        assert!(Puller::missed_handoff(&resp, &VersionVector::new()));
        assert_eq!(
            Puller::default().after_page(&resp, &VersionVector::new(), 1, false),
            Next::CopyState
        );
    }

    #[test]
    fn a_transfer_claims_its_first_page() {
        let mut t = Transfer::new(4);
        assert_eq!(t.request(10, 100).after, None);
        let first = SnapshotPage {
            states: vec![(1, "a".into(), Default::default())],
            next: Some((1, "a".into())),
            applied: [(1, 5)].into_iter().collect(),
            absorbed: VersionVector::new(),
        };
        let merged = t.on_page(first);
        assert_eq!(merged.states.len(), 1);
        assert!(
            merged.covered.is_empty(),
            "pages claim nothing on their own"
        );
        assert!(!t.is_done());
        assert_eq!(t.request(10, 100).after, Some((1, "a".into())));
        t.on_page(SnapshotPage {
            applied: [(1, 9)].into_iter().collect(),
            ..SnapshotPage::default()
        });
        assert!(t.is_done());
        assert_eq!(t.keys, 1);
        assert_eq!(t.claim().applied.get(1), 5);
    }
}
