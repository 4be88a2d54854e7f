//! Replication between the simulated nodes: pullers, state transfers, the trimmer and
//! its tombstone collection, and the answers to quorum reads' questions (digest rounds
//! are in `digests.rs`), as `node/sync.rs` does them.

use crate::antientropy::{Next, Transfer};
use crate::clock::{CausalToken, VersionVector};
use crate::placement::slot_of;
use crate::replica::{Replica, SyncRequest, SyncResponse};

use super::world::{Collected, Msg, PullState, Sim, Up};
use super::{Bug, COLLECT_PER_ROUND, PAGE_BYTES, SYNC_TIMEOUT_MS};

impl Sim {
    pub(super) fn deliver(&mut self, from: usize, to: usize, id: u64, msg: Msg) {
        self.trace(|| format!("n{from} -> n{to} {}", msg.name()));
        match msg {
            Msg::Poke => self.wake(to, from),
            // A request for a partition this node has no replica of is refused (the
            // asker's wait times out).
            Msg::SyncReq(req) if self.serves(to, req.partition) => {
                // The report decides trimming and collection, and acknowledges quorum
                // writes waiting here; only a peer's counts.
                if self.peers_of(to).contains(&from) {
                    self.nodes[to].peer_have.insert(from, req.have.clone());
                    self.check_acks(to);
                }
                let owned = self.nodes[to].owned();
                let resp = Replica::serve_sync(&*self.read(to), self.replica(to), &owned, &req);
                match resp {
                    Ok(mut resp) => {
                        resp.ack_wanted = self.awaits_acks(to);
                        self.send(to, from, id, Msg::SyncResp(resp))
                    }
                    Err(e) => self.fail(format!("n{to} failed to serve a sync: {e}")),
                }
            }
            Msg::SnapReq(req) if self.serves(to, req.partition) => {
                let owned = self.nodes[to].owned();
                let page = Replica::serve_snapshot(&*self.read(to), self.replica(to), &owned, &req);
                match page {
                    Ok(page) => self.send(to, from, id, Msg::SnapResp(page)),
                    Err(e) => self.fail(format!("n{to} failed to serve a snapshot: {e}")),
                }
            }
            Msg::SyncResp(resp) => {
                if !self.answered(to, from, id) {
                    return;
                }
                let Some(partition) = self.nodes[to].partition() else {
                    return;
                };
                let absorbed = self.replica(to).absorbed().clone();
                let peers = self.peers_of(to).len();
                let next = self
                    .pull_state(to, from)
                    .policy
                    .after_page(&resp, &absorbed, peers, false);
                // A quorum write at the peer waits for this node to report the page.
                let report = resp.ack_wanted && (!resp.log.is_empty() || !resp.states.is_empty());
                self.apply(to, (from, "sync page"), &resp);
                match next {
                    Next::More => self.pull(to, from),
                    Next::Done if report => {
                        self.pull_state(to, from).again = false;
                        self.pull(to, from);
                    }
                    Next::Done | Next::Wait => {
                        if std::mem::take(&mut self.pull_state(to, from).again) {
                            self.pull(to, from);
                        }
                    }
                    Next::CopyState => {
                        self.trace(|| format!("n{to} copies n{from}'s whole state"));
                        self.pull_state(to, from).transfer = Some(Transfer::new(partition));
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
                self.apply(to, (from, "transfer page"), &resp);
                if transfer.is_done() {
                    let claim = transfer.claim();
                    self.commit(to, |r, _| {
                        r.claim(&claim);
                        Ok(())
                    });
                    self.progress(to);
                    self.report.transfers += 1;
                    self.trace(|| format!("n{to} finished copying n{from}"));
                } else {
                    self.pull_state(to, from).transfer = Some(transfer);
                }
                self.pull(to, from);
            }
            Msg::KeyReq(partition, key)
                if self.serves(to, partition) && self.nodes[to].owned().contains(slot_of(&key)) =>
            {
                // `Node::get` with the empty token of a quorum read: answered at once.
                let read = Replica::read(
                    &*self.read(to),
                    partition,
                    slot_of(&key),
                    &key,
                    CausalToken::empty(0),
                );
                match read {
                    Ok(out) => self.send(to, from, id, Msg::KeyResp(out.token.part(partition))),
                    Err(e) => self.fail(format!("n{to} failed to read {key}: {e}")),
                }
            }
            Msg::KeyResp(history) => self.key_answer(to, id, history),
            Msg::DigestReq(partition, buckets) if self.serves(to, partition) => {
                self.serve_digests(to, from, id, &buckets)
            }
            Msg::DigestResp(buckets, slots) => self.on_digests(to, from, id, &buckets, &slots),
            Msg::RepairReq(req) if self.serves(to, req.partition) => {
                self.serve_repair(to, from, id, &req)
            }
            Msg::RepairResp(page) => self.on_repair(to, from, id, page),
            Msg::SyncReq(_)
            | Msg::SnapReq(_)
            | Msg::KeyReq(..)
            | Msg::DigestReq(..)
            | Msg::RepairReq(_) => {
                self.trace(|| format!("n{to} has no replica for n{from}'s request"))
            }
            other => self.deliver_change(from, to, id, other),
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
        // Only from a peer in its view (a poke from a former peer wakes nothing).
        if self.nodes[n].up != Up::Running
            || !self.peers_of(n).contains(&p)
            || self.pull_state(n, p).inflight.is_some()
        {
            return;
        }
        let Some(replica) = &self.nodes[n].replica else {
            return;
        };
        let (partition, have) = (replica.partition(), replica.applied().clone());
        let id = self.next_msg;
        self.next_msg += 1;
        let deadline = self.now + SYNC_TIMEOUT_MS;
        let page_entries = self.page_entries;
        let st = self.pull_state(n, p);
        st.inflight = Some((id, deadline));
        let msg = match &st.transfer {
            Some(t) => Msg::SnapReq(t.request(page_entries, PAGE_BYTES)),
            None => Msg::SyncReq(SyncRequest {
                partition,
                have,
                max_entries: page_entries,
                max_bytes: PAGE_BYTES,
            }),
        };
        self.send(n, p, id, msg);
    }

    /// A poke from `p` (or a read `n` could not serve): pull from `p` now, or right
    /// after the pull in flight.
    pub(super) fn wake(&mut self, n: usize, p: usize) {
        if !self.peers_of(n).contains(&p) {
            return;
        }
        if self.pull_state(n, p).inflight.is_some() {
            self.pull_state(n, p).again = true;
        } else {
            self.pull(n, p);
        }
    }

    /// Node `n` applies a page `from` sent (the peer, and what the page was).
    pub(super) fn apply(&mut self, n: usize, from: (usize, &str), resp: &SyncResponse) {
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
            for (_, key, _) in &resp.states {
                self.check_stored(n, key, Some(from));
            }
            self.progress(n);
        }
    }

    /// The server's trimmer: trims the log of what every peer reported having, then
    /// collects the tombstones inside that floor and older than the horizon.
    pub(super) fn trim(&mut self, n: usize) {
        // During a view change a member joining the partition resumes the log from the
        // vector its copy claimed: the server keeps the log whole until the switch.
        let node = &self.nodes[n];
        let Some(replica) = node.replica.as_ref().filter(|_| node.transition.is_none()) else {
            return;
        };
        // Only once every peer has told this node how far it is.
        let floor = (node.peer_have.len() >= self.peers_of(n).len())
            .then(|| Replica::trim_floor(replica.applied(), node.peer_have.values()))
            .filter(|floor| !floor.is_empty());
        let collect = if self.cfg.bug == Some(Bug::CollectIgnoringFloor) {
            Some(replica.applied().clone())
        } else {
            // The floor of an earlier round, once every page fetch begun before it was
            // observed is over: a page served before a peer applied a delete would
            // otherwise merge the deleted value back after the collection.
            let marker = self.next_msg;
            let node = &mut self.nodes[n];
            let ready = node.pending_floor.as_ref().is_some_and(|(seen, _)| {
                let begun_before =
                    |inflight: Option<(u64, u64)>| inflight.is_some_and(|(id, _)| id < *seen);
                !node.pulls.values().any(|p| begun_before(p.inflight))
                    && !node.digests.values().any(|d| begun_before(d.inflight))
            });
            let older = if ready {
                node.pending_floor.take().map(|(_, f)| f)
            } else {
                None
            };
            if node.pending_floor.is_none() {
                node.pending_floor = floor.clone().map(|f| (marker, f));
            }
            older
        };
        self.trace(|| format!("n{n} trims (floor {floor:?}, collects with {collect:?})"));
        if let Some(floor) = floor {
            self.commit(n, |_, txn| {
                for (origin, upto) in floor.iter() {
                    txn.log_trim(origin, upto)?;
                }
                Ok(())
            });
        }
        if let Some(floor) = collect {
            self.collect(n, floor);
        }
    }

    /// One round of tombstone collection (`Node::collect_tombstones` and the writer's
    /// `Collect`): dead keys after the cursor that are collectable are dropped, checked
    /// again in the transaction that drops them.
    fn collect(&mut self, n: usize, floor: VersionVector) {
        let cutoff_us = self.now.saturating_sub(self.horizon_ms) * 1000;
        let after = self.nodes[n].collect_cursor.take();
        let owned = self.nodes[n].owned();
        let (candidates, next) = {
            let txn = self.read(n);
            let dead = txn
                .dead_keys(after.as_ref(), COLLECT_PER_ROUND)
                .unwrap_or_default();
            let next = (dead.len() == COLLECT_PER_ROUND)
                .then(|| dead.last().cloned())
                .flatten();
            let candidates: Vec<(u32, String)> = dead
                .into_iter()
                .filter(|(slot, key)| {
                    owned.contains(*slot)
                        && txn
                            .get(*slot, key)
                            .ok()
                            .flatten()
                            .is_some_and(|s| Replica::collectable(&s, &floor, cutoff_us))
                })
                .collect();
            (candidates, next)
        };
        self.nodes[n].collect_cursor = next;
        if candidates.is_empty() {
            return;
        }
        let dropped = self.commit(n, |_, txn| {
            let mut dropped = Vec::new();
            for (slot, key) in candidates {
                let state = txn.get(slot, &key)?;
                if let Some(state) = state.filter(|s| Replica::collectable(s, &floor, cutoff_us)) {
                    txn.delete(slot, &key)?;
                    dropped.push((key, state));
                }
            }
            Ok(dropped)
        });
        for (key, state) in dropped.unwrap_or_default() {
            self.report.collected += 1;
            self.trace(|| format!("n{n} collects {key} = [{}]", super::checker::dots(&state)));
            let at_ms = self.now;
            let excused: Vec<bool> = state
                .versions
                .iter()
                .map(|v| {
                    self.by_dot
                        .get(&v.dot)
                        .is_some_and(|&i| self.lost_with_removal(&self.writes[i]))
                })
                .collect();
            let collected = self.collected.entry(key.clone()).or_default();
            for (v, excused) in state.versions.into_iter().zip(excused) {
                collected.push(Collected {
                    at_ms,
                    node: n,
                    dot: v.dot,
                    excused,
                    history: v.vv,
                });
            }
            for m in 0..self.nodes.len() {
                self.check_stored(m, &key, None);
            }
        }
    }
}
