//! View changes: deciding the next view, and what each node does to get there. Pure.
//!
//! # Design
//!
//! A view change has two halves, deliberately kept apart.
//!
//! **Deciding.** The view of epoch `e+1` is chosen by single-decree Paxos among the
//! members of the view of epoch `e` (majority quorums). Any node may propose, with a
//! [`Ballot`] (a round number and its address); [`Acceptor`] is the persisted acceptor
//! state of one node, [`Proposer`] the decisions of a proposer (the node sends the
//! messages it asks for). A proposer that learns of an accepted proposal must carry it on
//! ([`choose_value`]), so once a proposal is chosen it is the only one that can ever be:
//! two concurrent `update_view` requests, or a coordinator that crashed halfway and a
//! client that re-issues the request to another node, can never lead to two different
//! views of the same epoch. Consensus is only on the *decision*; nothing is frozen or
//! moved until a proposal is chosen.
//!
//! **Executing.** A chosen [`Proposal`] is carried out only forward, never undone, and
//! every step is idempotent, so any node may drive it and several may at once:
//!
//! 1. *learn*: each node records the [`Transition`]; replicas of partitions that give
//!    slots away stop accepting writes to those slots ([`Duties::frozen`]) and report what
//!    they have applied; a replica that leaves its partition stops accepting writes
//!    altogether;
//! 2. *drain*: per partition that gives slots away, loses a replica or gains one
//!    ([`Plan::drained`]), one replica catches up to the join of those reports, so it
//!    holds every write ever acknowledged for the moving slots;
//! 3. *pull*: every replica of a receiving partition copies the moving slots from that
//!    replica ([`PullKey::Move`]), and a member joining an existing partition copies the
//!    partition's whole state ([`PullKey::Copy`]); each records its progress, so a crash
//!    resumes where it stopped;
//! 4. *switch*: every node installs the new view; handed-over slots are deleted in the
//!    background.
//!
//! Until the switch, requests are routed by the old view: reads of moving slots are
//! served by the old owner (frozen, so complete), writes to them get a retryable error.
//!
//! # Caveats
//!
//! * Deciding needs a majority of the old view; executing needs every replica of a
//!   source partition that is still a member (an unreachable one might hold acknowledged
//!   writes not yet replicated) and every receiving replica. A node that dies for good
//!   mid-change blocks the change (its moving slots stay read-only) until it is
//!   restarted on its data directory.
//! * A replica being removed that is unreachable cannot be drained: writes it
//!   acknowledged and had not replicated are lost with it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::{PartitionUid, VersionVector};
use crate::placement::{plan, Change, Plan, SlotSet, View};
use crate::replica::Claim;

/// A Paxos ballot: higher round wins, ties broken by the proposer's address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ballot {
    pub round: u64,
    pub node: String,
}

/// A candidate for the next view: the change asked for and the view it yields from
/// `from` (whose epoch is one less).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub change: Change,
    pub from: View,
    pub to: View,
}

impl Proposal {
    pub fn new(change: Change, from: &View) -> Result<Self, crate::placement::ChangeError> {
        let to = from.apply(&change)?;
        Ok(Self {
            change,
            from: from.clone(),
            to,
        })
    }

    /// The epoch this proposal decides.
    pub fn epoch(&self) -> u64 {
        self.to.epoch
    }

    pub fn plan(&self) -> Plan {
        plan(&self.from, &self.to)
    }

    /// Every node that takes part: members of either view.
    pub fn participants(&self) -> Vec<String> {
        let mut all = self.from.members.clone();
        for m in &self.to.members {
            if !all.contains(m) {
                all.push(m.clone());
            }
        }
        all
    }

    /// Whether this proposal is well formed: consecutive epochs, same cluster, and `to`
    /// is exactly what `change` makes of `from`. Checked before a node accepts or learns
    /// a proposal from a peer.
    pub fn check(&self) -> Result<(), String> {
        self.from.check().map_err(|e| format!("from-view: {e}"))?;
        match self.from.apply(&self.change) {
            Ok(to) if to == self.to => Ok(()),
            Ok(_) => Err("the proposed view is not what the change makes of its base".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// What an acceptor answers to phase 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrepareReply {
    /// Promised not to accept lower ballots; carries what it accepted so far.
    Promise(Option<Box<(Ballot, Proposal)>>),
    /// Already promised a higher ballot.
    Reject(Ballot),
}

/// What an acceptor answers to phase 2.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AcceptReply {
    Accepted,
    Reject(Ballot),
}

/// Answers of Paxos acceptors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaxosReply {
    Prepare(PrepareReply),
    Accept(AcceptReply),
    /// The acceptor already knows the chosen proposal for this epoch.
    Chosen(Box<Proposal>),
    /// The acceptor is in another epoch (or in no cluster: 0).
    Epoch(u64),
}

/// One node's acceptor state for the decision of epoch `epoch` (its current epoch + 1).
/// Persisted before any reply leaves the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acceptor {
    pub epoch: u64,
    pub promised: Option<Ballot>,
    pub accepted: Option<(Ballot, Proposal)>,
}

impl Acceptor {
    pub fn new(epoch: u64) -> Self {
        Self {
            epoch,
            promised: None,
            accepted: None,
        }
    }

    pub fn on_prepare(&mut self, ballot: &Ballot) -> PrepareReply {
        match &self.promised {
            Some(p) if p > ballot => PrepareReply::Reject(p.clone()),
            _ => {
                self.promised = Some(ballot.clone());
                PrepareReply::Promise(self.accepted.clone().map(Box::new))
            }
        }
    }

    pub fn on_accept(&mut self, ballot: &Ballot, proposal: &Proposal) -> AcceptReply {
        match &self.promised {
            Some(p) if p > ballot => AcceptReply::Reject(p.clone()),
            _ => {
                self.promised = Some(ballot.clone());
                self.accepted = Some((ballot.clone(), proposal.clone()));
                AcceptReply::Accepted
            }
        }
    }
}

/// The value a proposer must propose after phase 1: the accepted proposal with the
/// highest ballot among the promises, or its own if none was accepted.
pub fn choose_value<'a>(
    promises: impl IntoIterator<Item = &'a Option<Box<(Ballot, Proposal)>>>,
    own: Proposal,
) -> Proposal {
    promises
        .into_iter()
        .flatten()
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|b| b.1.clone())
        .unwrap_or(own)
}

/// Votes needed among `n` acceptors.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// What a [`Proposer`] asks for next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Phase 1 won a majority: send phase 2 of the current ballot, with this value, to
    /// every acceptor.
    Accept(Proposal),
    /// The round failed (no majority, or an acceptor had promised a higher ballot):
    /// pause, then start phase 1 again with [`Proposer::ballot`], now higher.
    Retry,
    /// This proposal is chosen for the epoch: the value a majority accepted, or the one
    /// an acceptor already knew chosen.
    Chosen(Proposal),
    /// The acceptor at this index of [`Proposer::acceptors`] is already at the epoch
    /// being decided or beyond: the view moved on. Learn it from that acceptor and stop.
    Newer(usize),
}

/// The Paxos proposer of the view of one epoch, as a state machine. The caller sends
/// what [`Next`] asks for and hands back the replies, one per acceptor in the order of
/// [`Proposer::acceptors`] (`None` for an acceptor that did not answer or answered
/// something else). Time is the caller's: it bounds the rounds and pauses between them.
/// `Node::decide` drives it over the network; the tests below over a lossy simulated one.
#[derive(Clone, Debug)]
pub struct Proposer {
    /// The proposer's address: ties between ballots of one round go by it.
    node: String,
    own: Proposal,
    round: u64,
    /// The value of the current round's phase 2, once its phase 1 won.
    value: Option<Proposal>,
}

impl Proposer {
    /// A proposer of `own` at `node`, starting at round 1.
    pub fn new(own: Proposal, node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            own,
            round: 1,
            value: None,
        }
    }

    /// The epoch being decided.
    pub fn epoch(&self) -> u64 {
        self.own.epoch()
    }

    /// The acceptors: the members of the view the proposal is based on.
    pub fn acceptors(&self) -> &[String] {
        &self.own.from.members
    }

    /// The ballot of the current round.
    pub fn ballot(&self) -> Ballot {
        Ballot {
            round: self.round,
            node: self.node.clone(),
        }
    }

    /// Takes phase 1's replies. An acceptor that knows the chosen proposal, or that is
    /// in a newer epoch, ends the decision at once (the first such one in acceptor
    /// order); otherwise a majority of promises moves on to phase 2 with the value
    /// [`choose_value`] picks, and anything less is a failed round.
    pub fn on_prepare_replies(
        &mut self,
        replies: impl IntoIterator<Item = Option<PaxosReply>>,
    ) -> Next {
        let epoch = self.epoch();
        let mut promises = Vec::new();
        for (acceptor, reply) in replies.into_iter().enumerate() {
            match reply {
                Some(PaxosReply::Prepare(PrepareReply::Promise(acc))) => promises.push(acc),
                Some(PaxosReply::Prepare(PrepareReply::Reject(b))) => {
                    self.round = self.round.max(b.round)
                }
                Some(PaxosReply::Chosen(p)) if p.epoch() == epoch => return Next::Chosen(*p),
                Some(PaxosReply::Epoch(e)) if e >= epoch => return Next::Newer(acceptor),
                _ => {}
            }
        }
        if promises.len() >= majority(self.acceptors().len()) {
            let value = choose_value(&promises, self.own.clone());
            self.value = Some(value.clone());
            return Next::Accept(value);
        }
        self.next_round()
    }

    /// Takes phase 2's replies: the value is chosen once a majority accepted it;
    /// otherwise the round failed.
    pub fn on_accept_replies(
        &mut self,
        replies: impl IntoIterator<Item = Option<PaxosReply>>,
    ) -> Next {
        let mut votes = 0;
        for reply in replies {
            match reply {
                Some(PaxosReply::Accept(AcceptReply::Accepted)) => votes += 1,
                Some(PaxosReply::Accept(AcceptReply::Reject(b))) => {
                    self.round = self.round.max(b.round)
                }
                _ => {}
            }
        }
        match self.value.take() {
            Some(value) if votes >= majority(self.acceptors().len()) => Next::Chosen(value),
            _ => self.next_round(),
        }
    }

    /// Fails the current round: the next ballot is above every one seen.
    fn next_round(&mut self) -> Next {
        self.round += 1;
        self.value = None;
        Next::Retry
    }
}

/// A copy a destination node performs: identified by what it copies from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PullKey {
    /// The slots partition `from` hands to this node's new partition.
    Move { from: PartitionUid },
    /// The whole state of partition `uid`, which this node joins.
    Copy { uid: PartitionUid },
}

/// How far one pull got, persisted with the transition so a restart resumes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullProgress {
    /// Where the next page starts (`None` before the first page).
    pub next: Option<(u32, String)>,
    pub done: bool,
    /// What this node may claim once the switch happens: for a move, the drained
    /// sources' vector; for a copy, the vectors of the first page.
    pub claim: Option<Claim>,
    pub keys: u64,
    pub bytes: u64,
}

/// A chosen proposal as one node carries it out. Persisted at learn time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub proposal: Proposal,
    pub pulls: BTreeMap<PullKey, PullProgress>,
}

impl Transition {
    pub fn new(proposal: Proposal) -> Self {
        Self {
            proposal,
            pulls: BTreeMap::new(),
        }
    }

    pub fn from(&self) -> &View {
        &self.proposal.from
    }

    pub fn to(&self) -> &View {
        &self.proposal.to
    }

    /// Whether every pull this node owes is done.
    pub fn pulls_done(&self, addr: &str) -> bool {
        duties(&self.proposal, addr)
            .pulls
            .iter()
            .all(|(key, _)| self.pulls.get(key).is_some_and(|p| p.done))
    }

    /// The claim for `absorbed` this node makes at the switch: the join of its moves'.
    pub fn absorbed_claim(&self) -> VersionVector {
        let mut vv = VersionVector::new();
        for (key, p) in &self.pulls {
            if let (PullKey::Move { .. }, Some(c), true) = (key, &p.claim, p.done) {
                vv.merge(&c.absorbed);
            }
        }
        vv
    }

    /// The claim of a completed copy of partition `uid`, if this node made one.
    pub fn copy_claim(&self, uid: PartitionUid) -> Option<&Claim> {
        self.pulls
            .get(&PullKey::Copy { uid })
            .filter(|p| p.done)
            .and_then(|p| p.claim.as_ref())
    }
}

/// Proposals, transitions and acceptor states as kvs persisted them before views had a
/// layout (their views were [`ViewV2`]), read from data directories of that version.
/// Views are postcard-encoded, so a type that embeds one changes encoding with it; see
/// `placement::legacy`.
mod v2 {
    use super::*;
    use crate::placement::ViewV2;

    #[derive(Deserialize)]
    #[cfg_attr(test, derive(Serialize))]
    pub(super) struct ProposalV2 {
        pub change: Change,
        pub from: ViewV2,
        pub to: ViewV2,
    }

    #[cfg(test)]
    impl ProposalV2 {
        pub fn of(p: &Proposal) -> Self {
            ProposalV2 {
                change: p.change.clone(),
                from: p.from.v2(),
                to: p.to.v2(),
            }
        }
    }

    impl From<ProposalV2> for Proposal {
        fn from(p: ProposalV2) -> Self {
            Proposal {
                change: p.change,
                from: p.from.into(),
                to: p.to.into(),
            }
        }
    }

    #[derive(Deserialize)]
    #[cfg_attr(test, derive(Serialize))]
    pub(super) struct TransitionV2 {
        pub proposal: ProposalV2,
        pub pulls: BTreeMap<PullKey, PullProgress>,
    }

    #[derive(Deserialize)]
    #[cfg_attr(test, derive(Serialize))]
    pub(super) struct AcceptorV2 {
        pub epoch: u64,
        pub promised: Option<Ballot>,
        pub accepted: Option<(Ballot, ProposalV2)>,
    }
}

impl Transition {
    /// This transition as persisted with v2 views (for migration tests; K mode only).
    #[cfg(test)]
    pub(crate) fn v2_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(&v2::TransitionV2 {
            proposal: v2::ProposalV2::of(&self.proposal),
            pulls: self.pulls.clone(),
        })
        .expect("serialization is infallible")
    }

    /// Decodes a transition persisted with v2 views (before layouts existed).
    pub fn from_v2_bytes(bytes: &[u8]) -> Result<Self, postcard::Error> {
        let old: v2::TransitionV2 = postcard::from_bytes(bytes)?;
        Ok(Transition {
            proposal: old.proposal.into(),
            pulls: old.pulls,
        })
    }
}

impl Acceptor {
    /// This state as persisted with v2 views (for migration tests; K mode only).
    #[cfg(test)]
    pub(crate) fn v2_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(&v2::AcceptorV2 {
            epoch: self.epoch,
            promised: self.promised.clone(),
            accepted: self
                .accepted
                .as_ref()
                .map(|(b, p)| (b.clone(), v2::ProposalV2::of(p))),
        })
        .expect("serialization is infallible")
    }

    /// Decodes an acceptor state persisted with v2 views (before layouts existed).
    pub fn from_v2_bytes(bytes: &[u8]) -> Result<Self, postcard::Error> {
        let old: v2::AcceptorV2 = postcard::from_bytes(bytes)?;
        Ok(Acceptor {
            epoch: old.epoch,
            promised: old.promised,
            accepted: old.accepted.map(|(b, p)| (b, p.into())),
        })
    }
}

/// What one node must do for a proposal. See the module doc.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Duties {
    /// Slots this node, as a replica of the old view, no longer accepts writes to.
    pub frozen: SlotSet,
    /// This node leaves its partition: it accepts no write at all.
    pub leaving: bool,
    /// Copies this node performs, with the slots each covers.
    pub pulls: Vec<(PullKey, SlotSet)>,
}

/// The duties of `addr` for `proposal`.
pub fn duties(proposal: &Proposal, addr: &str) -> Duties {
    let (from, to) = (&proposal.from, &proposal.to);
    let plan = proposal.plan();
    let mut d = Duties::default();
    if let Some(crate::placement::Role::Replica(uid)) = from.role_of(addr) {
        for m in plan.moves.iter().filter(|m| m.from == uid) {
            d.frozen.union(&m.slots);
        }
        if plan.leaves.iter().any(|l| l.node == addr) {
            d.leaving = true;
            d.frozen = from.slots_of(uid);
        }
    }
    if let Some(crate::placement::Role::Replica(uid)) = to.role_of(addr) {
        for m in plan.moves.iter().filter(|m| m.to == uid) {
            d.pulls
                .push((PullKey::Move { from: m.from }, m.slots.clone()));
        }
        if plan.joins.iter().any(|j| j.node == addr) {
            d.pulls.push((PullKey::Copy { uid }, from.slots_of(uid)));
        }
    }
    d
}

/// The slots of pull `key` of `addr` whose keys the node must drop before it merges the
/// pull's first page: slots it does not own now (`owned`: its replica's slots in the
/// change's base view). Keys it holds there are left from an earlier time it owned
/// them, handed over and kept because a new owner could not confirm holding them (it
/// had collected a tombstone that superseded them, say): merged with the pulled state
/// they would bring a deleted value back (found by `kvs sim`). Slots it owns now hold
/// its own data (it may be the pull's source) and are kept.
pub fn leftover_slots(p: &Proposal, addr: &str, key: PullKey, owned: &SlotSet) -> SlotSet {
    duties(p, addr)
        .pulls
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, slots)| slots.iter().filter(|s| !owned.contains(*s)).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::Role;
    use crate::testing::Rng;

    fn addr(i: usize) -> String {
        format!("10.0.0.{i}:8080")
    }

    fn view(n: usize, k: usize) -> View {
        View::bootstrap((1..=n).map(addr).collect(), k).expect("valid")
    }

    #[test]
    fn duties_of_an_add_that_creates_a_partition() {
        // N=5, K=2 (node 5 a proxy); adding node 6 makes partition uid 2 of {5, 6}.
        let v = view(5, 2);
        let p = Proposal::new(Change::Add(addr(6)), &v).expect("valid");
        assert!(p.check().is_ok());
        assert_eq!(p.to.role_of(&addr(6)), Some(Role::Replica(2)));
        for source in [1, 2, 3, 4] {
            let d = duties(&p, &addr(source));
            assert!(!d.frozen.is_empty() && !d.leaving && d.pulls.is_empty());
        }
        let d5 = duties(&p, &addr(5));
        let d6 = duties(&p, &addr(6));
        assert_eq!(d5, d6);
        assert!(d5.frozen.is_empty());
        let keys: Vec<PullKey> = d5.pulls.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            vec![PullKey::Move { from: 0 }, PullKey::Move { from: 1 }]
        );
        let pulled: usize = d5.pulls.iter().map(|(_, s)| s.len()).sum();
        assert_eq!(pulled, 4096 / 3 + usize::from(4096 % 3 > 2));
    }

    #[test]
    fn duties_of_a_remove_that_promotes_a_proxy() {
        let v = view(5, 2);
        let p = Proposal::new(Change::Remove(addr(3)), &v).expect("valid");
        let d3 = duties(&p, &addr(3));
        assert!(d3.leaving);
        assert_eq!(d3.frozen, v.slots_of(1));
        let d5 = duties(&p, &addr(5));
        assert_eq!(d5.pulls, vec![(PullKey::Copy { uid: 1 }, v.slots_of(1))]);
        assert_eq!(duties(&p, &addr(4)), Duties::default());
    }

    #[test]
    fn leftover_slots_are_the_pulled_slots_the_node_does_not_own() {
        let v = view(5, 2);
        let p = Proposal::new(Change::Remove(addr(3)), &v).expect("valid");
        let key = PullKey::Copy { uid: 1 };
        let none = SlotSet::default();
        assert_eq!(leftover_slots(&p, &addr(5), key, &none), v.slots_of(1));
        // Slots the node owns now are its own data, even if it pulls them.
        assert!(leftover_slots(&p, &addr(5), key, &v.slots_of(1)).is_empty());
        // Not a pull of this node: nothing.
        assert!(leftover_slots(&p, &addr(4), key, &none).is_empty());
    }

    #[test]
    fn a_tampered_proposal_is_refused() {
        let v = view(4, 2);
        let mut p = Proposal::new(Change::Add(addr(5)), &v).expect("valid");
        assert!(p.check().is_ok());
        p.to.members.push(addr(9));
        assert!(p.check().is_err());
    }

    #[test]
    fn transition_claims_only_completed_moves() {
        let v = view(5, 2);
        let p = Proposal::new(Change::Add(addr(6)), &v).expect("valid");
        let mut t = Transition::new(p);
        assert!(!t.pulls_done(&addr(6)));
        for from in [0, 1] {
            t.pulls.insert(
                PullKey::Move { from },
                PullProgress {
                    done: from == 0,
                    claim: Some(Claim {
                        applied: VersionVector::new(),
                        absorbed: [(u64::from(from) + 10, 5)].into_iter().collect(),
                    }),
                    ..PullProgress::default()
                },
            );
        }
        assert_eq!(t.absorbed_claim().get(10), 5);
        assert_eq!(t.absorbed_claim().get(11), 0);
        assert!(!t.pulls_done(&addr(6)));
        if let Some(p) = t.pulls.get_mut(&PullKey::Move { from: 1 }) {
            p.done = true;
        }
        assert!(t.pulls_done(&addr(6)));
        assert!(t.pulls_done(&addr(1)), "a source owes no pull");
    }

    /// A node upgraded in the middle of a change still reads what it had persisted:
    /// the learned transition and its acceptor state, whose views were v2 views.
    #[test]
    fn transitions_and_acceptors_with_v2_views_are_read() {
        // K = 1: read as current bytes, its v2 views would say `Layout::Shards`.
        let v = view(5, 1);
        let p = Proposal::new(Change::Add(addr(6)), &v).expect("valid");
        let mut t = Transition::new(p.clone());
        t.pulls
            .insert(PullKey::Move { from: 0 }, PullProgress::default());
        assert_eq!(Transition::from_v2_bytes(&t.v2_bytes()), Ok(t.clone()));
        let guessed: Result<Transition, _> = postcard::from_bytes(&t.v2_bytes());
        assert!(guessed.map_or(true, |g| g != t));
        let ballot = Ballot {
            round: 3,
            node: addr(2),
        };
        let mut a = Acceptor::new(2);
        assert_eq!(a.on_accept(&ballot, &p), AcceptReply::Accepted);
        assert_eq!(Acceptor::from_v2_bytes(&a.v2_bytes()), Ok(a));
    }

    /// A random change the view accepts, of any kind its layout knows.
    fn random_change(v: &View, rng: &mut Rng, fresh: &mut usize) -> Option<(Change, View)> {
        for _ in 0..20 {
            let member = v.members[rng.next(v.members.len() as u64) as usize].clone();
            let shards = v.partition_count() as u64;
            let change = match rng.next(6) {
                0 | 1 => {
                    *fresh += 1;
                    Change::Add(addr(*fresh))
                }
                2 => Change::Remove(member),
                3 => Change::AddToShard {
                    addr: member,
                    shard: rng.next(shards) as u32,
                },
                4 => {
                    *fresh += 1;
                    Change::AddToShard {
                        addr: addr(*fresh),
                        shard: rng.next(shards) as u32,
                    }
                }
                _ => Change::Reshard(1 + rng.next(5) as u32),
            };
            if let Ok(to) = v.apply(&change) {
                return Some((change, to));
            }
        }
        None
    }

    /// For changes of every kind in both layouts, the duties `plan` yields deliver every
    /// slot of the new view to every one of its replicas (kept, moved in or copied), copy
    /// only from partitions the coordinator drains, freeze every slot that changes hands
    /// on every old replica, and stop every replica that leaves its partition.
    #[test]
    fn duties_deliver_every_slot_to_every_new_replica() {
        for seed in 1..=100u64 {
            let mut rng = Rng(seed);
            let mut fresh = 100;
            let n = 2 + rng.next(9) as usize;
            let members: Vec<String> = (1..=n).map(addr).collect();
            let mut v = if seed % 2 == 0 {
                View::bootstrap(members, 1 + rng.next(n.min(3) as u64) as usize)
            } else {
                View::bootstrap_shards(members, 1 + rng.next((n / 2) as u64) as usize)
            }
            .expect("valid");
            for _ in 0..8 {
                let Some((change, to)) = random_change(&v, &mut rng, &mut fresh) else {
                    break;
                };
                let p = Proposal::new(change.clone(), &v).expect("valid");
                assert_eq!(p.to, to);
                let plan = p.plan();
                let drained = plan.drained();
                for m in p.participants() {
                    let d = duties(&p, &m);
                    for (key, _) in &d.pulls {
                        let source = match key {
                            PullKey::Move { from } => *from,
                            PullKey::Copy { uid } => *uid,
                        };
                        assert!(
                            drained.contains(&source),
                            "seed {seed} {change}: {key:?} undrained"
                        );
                        assert!(v.replicas_of(source).is_some_and(|r| !r.is_empty()));
                    }
                    if plan.leaves.iter().any(|l| l.node == m) {
                        assert!(d.leaving, "seed {seed} {change}: {m} leaves but writes on");
                    }
                    if let Some(Role::Replica(old)) = v.role_of(&m) {
                        if to.role_of(&m) != Some(Role::Replica(old)) {
                            assert!(
                                d.leaving,
                                "seed {seed} {change}: {m} switches but writes on"
                            );
                        }
                        for s in 0..crate::placement::SLOTS {
                            if v.owner_of_slot(s) == old && to.owner_of_slot(s) != old {
                                assert!(
                                    d.frozen.contains(s),
                                    "seed {seed} {change}: slot {s} not frozen"
                                );
                            }
                        }
                    }
                    let Some(Role::Replica(uid)) = to.role_of(&m) else {
                        continue;
                    };
                    let kept = v.role_of(&m) == Some(Role::Replica(uid));
                    for s in to.slots_of(uid).iter() {
                        let had = kept && v.owner_of_slot(s) == uid;
                        let pulled = d.pulls.iter().any(|(key, set)| {
                            set.contains(s)
                                && match key {
                                    PullKey::Move { from } => *from == v.owner_of_slot(s),
                                    PullKey::Copy { uid: u } => *u == uid,
                                }
                        });
                        assert!(
                            had || pulled,
                            "seed {seed} {change}: {m} gets no copy of slot {s}"
                        );
                    }
                }
                v = to;
            }
        }
    }

    fn promise(accepted: Option<(u64, &Proposal)>) -> Option<PaxosReply> {
        let accepted = accepted.map(|(round, p)| {
            let ballot = Ballot {
                round,
                node: addr(9),
            };
            Box::new((ballot, p.clone()))
        });
        Some(PaxosReply::Prepare(PrepareReply::Promise(accepted)))
    }

    fn rejected(round: u64) -> Ballot {
        Ballot {
            round,
            node: addr(9),
        }
    }

    const ACCEPTED: Option<PaxosReply> = Some(PaxosReply::Accept(AcceptReply::Accepted));

    #[test]
    fn a_proposer_carries_on_the_value_a_majority_of_promises_reports() {
        let base = view(5, 1);
        let own = Proposal::new(Change::Add(addr(6)), &base).expect("valid");
        let theirs = Proposal::new(Change::Remove(addr(2)), &base).expect("valid");
        let older = Proposal::new(Change::Add(addr(7)), &base).expect("valid");
        let mut p = Proposer::new(own.clone(), addr(10));
        assert_eq!(p.acceptors(), base.members.as_slice());
        assert_eq!((p.epoch(), p.ballot().round), (2, 1));
        // Three promises of five, two of them with an accepted value: the higher wins.
        let replies = vec![
            promise(None),
            None,
            promise(Some((3, &theirs))),
            promise(Some((2, &older))),
            None,
        ];
        assert_eq!(p.on_prepare_replies(replies), Next::Accept(theirs.clone()));
        let votes = vec![ACCEPTED, None, ACCEPTED, None, ACCEPTED];
        assert_eq!(p.on_accept_replies(votes), Next::Chosen(theirs));
        // Without an accepted value among the promises, the proposer's own goes on.
        let mut p = Proposer::new(own.clone(), addr(10));
        let replies = vec![promise(None), promise(None), promise(None), None, None];
        assert_eq!(p.on_prepare_replies(replies), Next::Accept(own));
    }

    #[test]
    fn rejections_and_minorities_fail_the_round_and_raise_the_ballot() {
        let base = view(5, 1);
        let own = Proposal::new(Change::Add(addr(6)), &base).expect("valid");
        let mut p = Proposer::new(own.clone(), addr(10));
        // Phase 1: a rejection by a higher ballot; the next round is above it.
        let reject = Some(PaxosReply::Prepare(PrepareReply::Reject(rejected(7))));
        let replies = vec![promise(None), reject, promise(None), None, None];
        assert_eq!(p.on_prepare_replies(replies), Next::Retry);
        assert_eq!(p.ballot().round, 8);
        // A minority of promises alone: the next round.
        let replies = vec![promise(None), promise(None), None, None, None];
        assert_eq!(p.on_prepare_replies(replies), Next::Retry);
        assert_eq!(p.ballot().round, 9);
        // Phase 2: two votes of five and a rejection.
        let replies = vec![promise(None), promise(None), promise(None), None, None];
        assert_eq!(p.on_prepare_replies(replies), Next::Accept(own));
        let reject = Some(PaxosReply::Accept(AcceptReply::Reject(rejected(12))));
        let votes = vec![ACCEPTED, ACCEPTED, reject, None, None];
        assert_eq!(p.on_accept_replies(votes), Next::Retry);
        assert_eq!(p.ballot().round, 13);
        // Votes without a phase 1 won in this round choose nothing.
        let votes = vec![ACCEPTED, ACCEPTED, ACCEPTED, ACCEPTED, ACCEPTED];
        assert_eq!(p.on_accept_replies(votes), Next::Retry);
    }

    #[test]
    fn a_known_outcome_or_a_newer_epoch_ends_the_decision() {
        let base = view(5, 1);
        let own = Proposal::new(Change::Add(addr(6)), &base).expect("valid");
        let chosen = Proposal::new(Change::Remove(addr(2)), &base).expect("valid");
        let later = Proposal::new(Change::Add(addr(7)), &chosen.to).expect("valid");
        let mut p = Proposer::new(own, addr(10));
        // A chosen proposal of another epoch, or an acceptor behind, says nothing.
        let replies = vec![
            Some(PaxosReply::Chosen(Box::new(later))),
            Some(PaxosReply::Epoch(1)),
            None,
            None,
            None,
        ];
        assert_eq!(p.on_prepare_replies(replies), Next::Retry);
        // A chosen proposal of this epoch short-circuits, however many promised.
        let replies = vec![
            promise(None),
            promise(None),
            promise(None),
            Some(PaxosReply::Chosen(Box::new(chosen.clone()))),
            Some(PaxosReply::Epoch(2)),
        ];
        assert_eq!(p.on_prepare_replies(replies), Next::Chosen(chosen));
        // An acceptor already at the epoch being decided: learn from it.
        let replies = vec![promise(None), None, Some(PaxosReply::Epoch(2)), None, None];
        assert_eq!(p.on_prepare_replies(replies), Next::Newer(2));
    }

    /// Three proposers with different changes race over five acceptors through a
    /// network that drops messages at random, with acceptors "crashing" (losing
    /// nothing: their state is persisted) at random; a proposer whose value is chosen is
    /// replaced by a fresh one (a new request). Whatever happens, every proposal a
    /// majority accepted under one ballot is the same proposal, and the proposer reports
    /// it chosen exactly then.
    #[test]
    fn paxos_chooses_at_most_one_view_per_epoch() {
        let base = view(5, 1);
        let changes = [
            Change::Add(addr(6)),
            Change::Add(addr(7)),
            Change::Remove(addr(2)),
        ];
        let fresh = |who: usize| {
            let own = Proposal::new(changes[who].clone(), &base).expect("valid");
            Proposer::new(own, addr(10 + who))
        };
        for seed in 1..=300u64 {
            let mut rng = Rng(seed);
            let mut acceptors = vec![Acceptor::new(2); 5];
            let mut proposers: Vec<Proposer> = (0..3).map(fresh).collect();
            let mut chosen: Option<Proposal> = None;
            for _ in 0..40 {
                let who = rng.next(3) as usize;
                let proposer = &mut proposers[who];
                let ballot = proposer.ballot();
                // Phase 1 reaches a random subset.
                let replies: Vec<Option<PaxosReply>> = acceptors
                    .iter_mut()
                    .map(|a| (rng.next(3) != 0).then(|| PaxosReply::Prepare(a.on_prepare(&ballot))))
                    .collect();
                let value = match proposer.on_prepare_replies(replies) {
                    Next::Accept(value) => value,
                    Next::Retry => continue,
                    other => panic!("seed {seed}: acceptors never answer {other:?}"),
                };
                // Phase 2 reaches a random subset too.
                let replies: Vec<Option<PaxosReply>> = acceptors
                    .iter_mut()
                    .map(|a| {
                        (rng.next(4) != 0).then(|| PaxosReply::Accept(a.on_accept(&ballot, &value)))
                    })
                    .collect();
                let votes = replies
                    .iter()
                    .filter(|r| matches!(r, Some(PaxosReply::Accept(AcceptReply::Accepted))))
                    .count();
                let next = proposer.on_accept_replies(replies);
                if votes >= majority(5) {
                    assert_eq!(next, Next::Chosen(value.clone()), "seed {seed}");
                    match &chosen {
                        Some(c) => assert_eq!(c, &value, "seed {seed}: two views chosen"),
                        None => chosen = Some(value),
                    }
                    proposers[who] = fresh(who);
                } else {
                    assert_eq!(next, Next::Retry, "seed {seed}");
                }
            }
        }
    }
}
