//! Replication between the simulated nodes: pullers, state transfers, the trimmer.

use crate::antientropy::{Next, Transfer};
use crate::replica::{Replica, SyncRequest, SyncResponse};

use super::world::{all_slots, Msg, PullState, Sim, Up};
use super::{Bug, PAGE_BYTES, PARTITION, SYNC_TIMEOUT_MS};

impl Sim {
    pub(super) fn deliver(&mut self, from: usize, to: usize, id: u64, msg: Msg) {
        self.trace(|| format!("n{from} -> n{to} {}", msg.name()));
        match msg {
            Msg::Poke => self.wake(to, from),
            Msg::SyncReq(req) => {
                self.nodes[to].peer_have.insert(from, req.have.clone());
                let node = &self.nodes[to];
                let resp = Replica::serve_sync(&*self.read(to), &node.replica, &all_slots(), &req);
                match resp {
                    Ok(resp) => self.send(to, from, id, Msg::SyncResp(resp)),
                    Err(e) => self.fail(format!("n{to} failed to serve a sync: {e}")),
                }
            }
            Msg::SnapReq(req) => {
                let node = &self.nodes[to];
                let page =
                    Replica::serve_snapshot(&*self.read(to), &node.replica, &all_slots(), &req);
                match page {
                    Ok(page) => self.send(to, from, id, Msg::SnapResp(page)),
                    Err(e) => self.fail(format!("n{to} failed to serve a snapshot: {e}")),
                }
            }
            Msg::SyncResp(resp) => {
                if !self.answered(to, from, id) {
                    return;
                }
                let absorbed = self.nodes[to].replica.absorbed().clone();
                let peers = self.cfg.replicas - 1;
                let next = self
                    .pull_state(to, from)
                    .policy
                    .after_page(&resp, &absorbed, peers, false);
                self.apply(to, &resp);
                match next {
                    Next::More => self.pull(to, from),
                    Next::Done | Next::Wait => {
                        if std::mem::take(&mut self.pull_state(to, from).again) {
                            self.pull(to, from);
                        }
                    }
                    Next::CopyState => {
                        self.trace(|| format!("n{to} copies n{from}'s whole state"));
                        self.pull_state(to, from).transfer = Some(Transfer::new(PARTITION));
                        self.pull(to, from);
                    }
                }
            }
            Msg::SnapResp(page) => {
                if !self.answered(to, from, id) {
                    return;
                }
                let Some(mut transfer) = self.pull_state(to, from).transfer.take() else {
                    return;
                };
                let resp = transfer.on_page(page);
                self.apply(to, &resp);
                if transfer.is_done() {
                    let claim = transfer.claim();
                    let node = &mut self.nodes[to];
                    node.replica.claim(&claim);
                    self.commit(to, |_, _| Ok(()));
                    self.report.transfers += 1;
                    self.trace(|| format!("n{to} finished copying n{from}"));
                } else {
                    self.pull_state(to, from).transfer = Some(transfer);
                }
                self.pull(to, from);
            }
        }
    }

    /// Whether a response is the one `to`'s puller for `from` waits for; clears it.
    pub(super) fn answered(&mut self, to: usize, from: usize, id: u64) -> bool {
        let st = self.pull_state(to, from);
        if st.inflight.map(|(want, _)| want) != Some(id) {
            // Late: the pull was given up, or the node restarted since.
            return false;
        }
        st.inflight = None;
        true
    }

    pub(super) fn pull_state(&mut self, n: usize, peer: usize) -> &mut PullState {
        self.nodes[n].pulls.entry(peer).or_default()
    }

    /// Gives up a pull that has waited longer than the timeout.
    pub(super) fn expire(&mut self, n: usize, p: usize) {
        let now = self.now;
        let st = self.pull_state(n, p);
        if st.inflight.is_some_and(|(_, deadline)| now >= deadline) {
            st.inflight = None;
            // The server's transfer fails on a timeout and starts over next round.
            st.transfer = None;
        }
    }

    /// `n` pulls from `p` unless it is already asking.
    pub(super) fn pull(&mut self, n: usize, p: usize) {
        if self.nodes[n].up != Up::Running || self.pull_state(n, p).inflight.is_some() {
            return;
        }
        let id = self.next_msg;
        self.next_msg += 1;
        let deadline = self.now + SYNC_TIMEOUT_MS;
        let page_entries = self.page_entries;
        let st = self.pull_state(n, p);
        st.inflight = Some((id, deadline));
        let msg = match &st.transfer {
            Some(t) => Msg::SnapReq(t.request(page_entries, PAGE_BYTES)),
            None => Msg::SyncReq(SyncRequest {
                partition: PARTITION,
                have: self.nodes[n].replica.applied().clone(),
                max_entries: page_entries,
                max_bytes: PAGE_BYTES,
            }),
        };
        self.send(n, p, id, msg);
    }

    /// A poke from `p` (or a read `n` could not serve): pull from `p` now, or right
    /// after the pull in flight.
    pub(super) fn wake(&mut self, n: usize, p: usize) {
        if self.pull_state(n, p).inflight.is_some() {
            self.pull_state(n, p).again = true;
        } else {
            self.pull(n, p);
        }
    }

    pub(super) fn apply(&mut self, n: usize, resp: &SyncResponse) {
        let mut planted;
        let resp = if self.cfg.bug == Some(Bug::DropTombstones) {
            planted = resp.clone();
            for (_, _, state) in &mut planted.states {
                state.versions.retain(|v| v.value.is_some());
            }
            &planted
        } else {
            resp
        };
        if !resp.log.is_empty() || !resp.states.is_empty() || !resp.covered.is_empty() {
            self.commit(n, |r, txn| r.apply_sync(txn, resp));
        }
    }

    pub(super) fn trim(&mut self, n: usize) {
        let node = &self.nodes[n];
        if node.peer_have.len() < self.cfg.replicas - 1 {
            return;
        }
        let floor = Replica::trim_floor(node.replica.applied(), node.peer_have.values());
        self.commit(n, |_, txn| {
            for (origin, upto) in floor.iter() {
                txn.log_trim(origin, upto)?;
            }
            Ok(())
        });
    }
}
