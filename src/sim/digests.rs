//! Digest rounds between the simulated nodes (state-based anti-entropy), as
//! `node/digests.rs` runs them over `crate::merkle`: the asker sends its bucket
//! digests, the peer answers its slot digests in the buckets that differ, the asker
//! fetches the peer's keys of the slots that differ, page by page, and merges them
//! without claiming anything, leaving out the deletes it already reflects
//! (`Replica::known_deletes`).
//!
//! Each call is given up after [`SYNC_TIMEOUT_MS`], as the server's; a round whose call
//! timed out ends, and the next starts [`super::DIGEST_INTERVAL_MS`] after the last one
//! started (the server sleeps the interval after a round ends: rounds are short, so the
//! difference is a few milliseconds).

use crate::merkle;
use crate::replica::{Replica, SnapshotPage, SnapshotRequest, SyncResponse};

use super::world::{DigestRound, Msg, Sim};
use super::{DIGEST_PAGES_PER_ROUND, PAGE_BYTES, SYNC_TIMEOUT_MS};

impl Sim {
    /// This node's slot digests, over the slots its replica owns.
    fn slot_digests(&mut self, n: usize) -> Vec<u64> {
        let owned = self.nodes[n].owned();
        let digests = merkle::slot_digests(&*self.read(n), &owned);
        digests.unwrap_or_else(|e| {
            self.fail(format!("n{n} cannot hash its slots: {e}"));
            Vec::new()
        })
    }

    /// Starts a round of `n` against `p`, giving up any earlier one.
    pub(super) fn digest_round(&mut self, n: usize, p: usize) {
        let Some(partition) = self.nodes[n].partition() else {
            return;
        };
        let mine = self.slot_digests(n);
        let buckets = merkle::bucket_digests(&mine);
        let id = self.new_id();
        self.nodes[n].digests.insert(
            p,
            DigestRound {
                inflight: Some((id, self.now + SYNC_TIMEOUT_MS)),
                mine,
                ..DigestRound::default()
            },
        );
        self.report.digest_rounds += 1;
        self.send(n, p, id, Msg::DigestReq(partition, buckets));
    }

    /// The round of `n` against `p` that waits for the answer `id`, if it is still in
    /// time; clears the wait.
    fn digest_answered(&mut self, n: usize, p: usize, id: u64) -> Option<&mut DigestRound> {
        let now = self.now;
        let round = self.nodes[n].digests.get_mut(&p)?;
        let (want, deadline) = round.inflight?;
        if want != id || now > deadline {
            return None;
        }
        round.inflight = None;
        Some(round)
    }

    /// `n` answers `from`'s bucket digests.
    pub(super) fn serve_digests(&mut self, n: usize, from: usize, id: u64, buckets: &[u64]) {
        let mine = self.slot_digests(n);
        let differ = merkle::differing_buckets(&merkle::bucket_digests(&mine), buckets);
        let slots = merkle::slots_of_buckets(&mine, &differ);
        self.send(n, from, id, Msg::DigestResp(differ, slots));
    }

    /// `n` has `p`'s slot digests of the buckets that differ: fetch what differs.
    pub(super) fn on_digests(
        &mut self,
        n: usize,
        p: usize,
        id: u64,
        buckets: &[u32],
        theirs: &[(u32, u64)],
    ) {
        if self.digest_answered(n, p, id).is_none() {
            return;
        }
        let owned = self.nodes[n].owned();
        let Some(round) = self.nodes[n].digests.get_mut(&p) else {
            return;
        };
        let slots = merkle::differing_slots(&round.mine, buckets, theirs, &owned);
        if slots.is_empty() {
            return;
        }
        round.slots = slots;
        self.trace(|| format!("n{n} fetches differing slots from n{p}"));
        self.repair_page(n, p, None);
    }

    fn repair_page(&mut self, n: usize, p: usize, after: Option<(u32, String)>) {
        let id = self.new_id();
        let deadline = self.now + SYNC_TIMEOUT_MS;
        let page_entries = self.page_entries;
        let Some(partition) = self.nodes[n].partition() else {
            return;
        };
        let Some(round) = self.nodes[n].digests.get_mut(&p) else {
            return;
        };
        round.inflight = Some((id, deadline));
        let req = SnapshotRequest {
            partition,
            epoch: None,
            slots: Some(round.slots.clone()),
            after,
            max_entries: page_entries,
            max_bytes: PAGE_BYTES,
        };
        self.send(n, p, id, Msg::RepairReq(req));
    }

    /// `n` serves a page of its keys in the slots a peer's round asks for.
    pub(super) fn serve_repair(&mut self, n: usize, from: usize, id: u64, req: &SnapshotRequest) {
        let mut slots = self.nodes[n].owned();
        if let Some(wanted) = &req.slots {
            slots.intersect(wanted);
        }
        let page = Replica::serve_snapshot(&*self.read(n), self.replica(n), &slots, req);
        match page {
            Ok(page) => self.send(n, from, id, Msg::RepairResp(page)),
            Err(e) => self.fail(format!("n{n} failed to serve a repair page: {e}")),
        }
    }

    /// `n` merges a page of `p`'s keys, but not the deletes it already reflects: it may
    /// have collected them.
    pub(super) fn on_repair(&mut self, n: usize, p: usize, id: u64, page: SnapshotPage) {
        let Some(round) = self.digest_answered(n, p, id) else {
            return;
        };
        round.pages += 1;
        let more = page
            .next
            .clone()
            .filter(|_| round.pages < DIGEST_PAGES_PER_ROUND);
        self.report.repaired += page.states.len() as u64;
        let Some(served) = self.nodes[n].replica.as_ref().map(Replica::served) else {
            return;
        };
        let states = page
            .states
            .into_iter()
            .filter(|(_, _, state)| !Replica::known_deletes(state, &served))
            .collect();
        self.apply(
            n,
            (p, "digest round's page"),
            &SyncResponse {
                states,
                complete: true,
                ..SyncResponse::default()
            },
        );
        if more.is_some() {
            self.repair_page(n, p, more);
        }
    }
}
