//! Client sessions and their requests, modelled on the node's read and write paths
//! (`node/service.rs`, `node/quorum.rs`): a request waits for its replica to catch up
//! with its token, a quorum write for its peers' acknowledgements, a quorum read for its
//! peers' state of the key. A session sends its next request once the last one is
//! answered.

use crate::clock::{CausalToken, Dot, VersionVector};
use crate::placement::slot_of;
use crate::quorum::{acks, Level};
use crate::replica::{Replica, WriteRequest};

use super::world::{index, Event, Msg, Op, Sim, Stage, Up, WriteRecord};
use super::{Bug, CATCHUP_WAIT_MS, QUORUM_WAIT_MS};

/// Requests to cold keys, per mille, and how many cold keys there are per hot one.
const COLD_PER_MILLE: u64 = 250;
const COLD_KEYS_PER_HOT: u64 = 4;

impl Sim {
    /// Session `c` sends its next request.
    pub(super) fn client_op(&mut self, c: usize) {
        if self.rng.chance(300) {
            // Clients know the members (a moment late: they may pick one just removed).
            let members = &self.decided.members;
            let pick = self.rng.below(members.len() as u64) as usize;
            self.sessions[c].node = index(&members[pick]).unwrap_or(0);
        }
        // Most requests go to a few hot keys, so writes collide; the others to more cold
        // keys, whose deletes stay long enough to be collected. Out of 20 requests: 8
        // reads; 2 deletes of a hot key or 6 of a cold one; writes.
        let keys = self.cfg.keys as u64;
        let cold = self.rng.chance(COLD_PER_MILLE);
        let (key, deletes) = if cold {
            let key = format!("k{}", keys + self.rng.below(keys * COLD_KEYS_PER_HOT));
            (key, 6)
        } else {
            (format!("k{}", self.rng.below(keys)), 2)
        };
        let what = self.rng.below(20);
        // Most requests take the default level 1; the others a majority or every
        // replica, so some pairs of them meet (R + W > K) and some do not.
        let level = match self.rng.below(20) {
            0..=10 => Level::ONE,
            11..=16 => Level::Quorum,
            _ => Level::All,
        };
        let Some((n, partition, k)) = self.route(c, &key) else {
            self.report.unavailable += 1;
            return self.next_request(c);
        };
        let level = level.resolve(k).unwrap_or(1);
        let id = self.new_id();
        let token = self.sessions[c].token.clone();
        let mut op = Op {
            id,
            node: n,
            key,
            began: self.step,
            partition,
            k,
            level,
            token,
            stage: Stage::ReadCatchUp,
        };
        match what {
            0..=7 => {
                if level > 1 {
                    // `Node::read_quorum`: every peer is asked, with an empty token.
                    op.stage = Stage::Asking { answered: 0 };
                    let key = op.key.clone();
                    self.sessions[c].op = Some(op);
                    for p in self.peers_of(n) {
                        self.send(n, p, id, Msg::KeyReq(partition, key.clone()));
                    }
                    self.at(QUORUM_WAIT_MS, Event::Timeout { c, op: id });
                } else {
                    self.sessions[c].op = Some(op);
                    self.read_local(c);
                }
            }
            _ => {
                let value =
                    (what >= 8 + deletes).then(|| format!("c{c}@{}", self.now).into_bytes());
                if self.cfg.bug == Some(Bug::ForgetToken) {
                    op.token = CausalToken::empty(0);
                }
                op.stage = Stage::WriteCatchUp { value };
                self.sessions[c].op = Some(op);
                self.write_local(c);
            }
        }
    }

    /// Where session `c`'s request for `key` is served: its node forwards it by its
    /// view to a replica of the key's partition (itself if it is one), which serves it
    /// if its own view agrees and is at least as new as the session's token (the server
    /// would first catch up with the newer view; here the request fails). Returns the
    /// replica, its partition and the partition's replica count.
    fn route(&mut self, c: usize, key: &str) -> Option<(usize, crate::clock::PartitionUid, usize)> {
        let entry = self.sessions[c].node;
        let view = self.nodes[entry]
            .view
            .as_ref()
            .filter(|_| self.nodes[entry].up == Up::Running)?;
        let p = view.partition_of_key(key);
        let replicas = view.replicas_of(p)?;
        let n = if replicas.iter().any(|a| index(a) == Some(entry)) {
            entry
        } else {
            let pick = self.rng.below(replicas.len() as u64) as usize;
            index(&replicas[pick])?
        };
        let node = &self.nodes[n];
        let view = node.view.as_ref().filter(|_| node.up == Up::Running)?;
        let partition = node.partition()?;
        if view.epoch < self.sessions[c].token.epoch || view.partition_of_key(key) != partition {
            return None;
        }
        Some((n, partition, view.replicas_of(partition)?.len()))
    }

    /// Whether the replica serving `op` still is one for its key (a view change may have
    /// installed a view that moved it since the request arrived).
    fn still_serves(&self, op: &Op) -> bool {
        let node = &self.nodes[op.node];
        node.partition() == Some(op.partition) && node.owned().contains(slot_of(&op.key))
    }

    /// Whether a view change in progress stops `op`'s replica from taking writes to its
    /// key: the slot is moving to another partition, or the replica is leaving.
    fn frozen(&self, op: &Op) -> bool {
        let node = &self.nodes[op.node];
        node.duties
            .as_ref()
            .is_some_and(|d| d.leaving || d.frozen.contains(slot_of(&op.key)))
    }

    pub(super) fn new_id(&mut self) -> u64 {
        let id = self.next_msg;
        self.next_msg += 1;
        id
    }

    /// The session's request is answered (or failed): it sends the next one a little
    /// later.
    fn next_request(&mut self, c: usize) {
        self.sessions[c].op = None;
        if self.clients_running {
            let pause = self.rng.between(2, 30);
            self.at(pause, Event::Client(c));
        }
    }

    /// The session's request waits for something else now: a new id, so answers and
    /// timeouts of the earlier wait are ignored.
    fn wait(&mut self, c: usize, stage: Stage, ms: u64) {
        let id = self.new_id();
        if let Some(op) = &mut self.sessions[c].op {
            op.id = id;
            op.stage = stage;
        }
        self.at(ms, Event::Timeout { c, op: id });
    }

    fn op(&self, c: usize) -> &Op {
        self.sessions[c]
            .op
            .as_ref()
            .expect("a session in a request has its op")
    }

    /// Wakes every puller of `n` (the server notifies them before it waits).
    pub(super) fn wake_pullers(&mut self, n: usize) {
        for p in self.peers_of(n) {
            self.wake(n, p);
        }
    }

    // ---- reads ----

    /// `Node::read_local`'s first attempt: serve if the replica reflects the token (or
    /// the key's own state covers it), else wake the pullers and wait.
    fn read_local(&mut self, c: usize) {
        if self.servable(c) || self.cfg.bug == Some(Bug::ServeStale) {
            return self.serve_read(c);
        }
        let (n, key) = (self.op(c).node, self.op(c).key.clone());
        self.trace(|| format!("c{c} at n{n}: read {key}: catching up"));
        self.wake_pullers(n);
        self.wait(c, Stage::ReadCatchUp, CATCHUP_WAIT_MS);
    }

    fn servable(&self, c: usize) -> bool {
        let op = self.op(c);
        if !self.still_serves(op) {
            return false;
        }
        let served = self.replica(op.node).served();
        Replica::can_serve(&served, op.partition, &op.token) || {
            let state = self
                .read(op.node)
                .get(slot_of(&op.key), &op.key)
                .ok()
                .flatten()
                .unwrap_or_default();
            Replica::can_serve_key(&served, op.partition, &op.token, &state)
        }
    }

    /// A peer's answer to a quorum read's question (`id` names the read's wait).
    pub(super) fn key_answer(&mut self, n: usize, id: u64, history: VersionVector) {
        let Some(c) = self
            .sessions
            .iter()
            .position(|s| s.op.as_ref().is_some_and(|o| o.id == id && o.node == n))
        else {
            return;
        };
        let fold = self.cfg.bug != Some(Bug::ReadWithoutPeers);
        let Some(op) = &mut self.sessions[c].op else {
            return;
        };
        let Stage::Asking { answered } = &mut op.stage else {
            return;
        };
        if fold {
            op.token.observe(op.partition, &history);
        }
        *answered += 1;
        if *answered + 1 >= op.level {
            self.read_local(c);
        }
    }

    /// Answers the read from the replica's state and updates the session.
    fn serve_read(&mut self, c: usize) {
        let Some(op) = self.sessions[c].op.clone() else {
            return;
        };
        if !self.still_serves(&op) {
            self.report.unavailable += 1;
            return self.next_request(c);
        }
        let (n, key) = (op.node, op.key.as_str());
        let state = self
            .read(n)
            .get(slot_of(key), key)
            .ok()
            .flatten()
            .unwrap_or_default();
        self.report.reads += 1;
        if op.level > 1 {
            self.report.quorum_reads += 1;
        }
        self.check_read(c, n, key, &state);
        self.check_quorum_read(c, &op, &state);
        let mut token = op.token;
        state.observe_into(op.partition, &mut token);
        token.observe_epoch(self.nodes[n].view.as_ref().map_or(0, |v| v.epoch));
        let session = &mut self.sessions[c];
        session.token = token;
        for v in &state.versions {
            if let Some(&i) = self.by_dot.get(&v.dot) {
                session.known.merge(&self.writes[i].context);
            }
        }
        self.trace(|| {
            let dots = super::checker::dots(&state);
            format!("c{c} at n{n}: read {key} (r={}) = [{dots}]", op.level)
        });
        self.next_request(c);
    }

    // ---- writes ----

    /// `Node::write_local`: apply once the replica reflects the token, else wake the
    /// pullers and wait.
    fn write_local(&mut self, c: usize) {
        let op = self.op(c);
        if !self.still_serves(op) || self.frozen(op) {
            // The server answers a retryable error: the key is moving, or this replica
            // no longer is one.
            self.report.unavailable += 1;
            return self.next_request(c);
        }
        if self.replica(op.node).accepts_write(&op.token) {
            return self.apply_write(c);
        }
        let (n, key, stage) = (op.node, op.key.clone(), op.stage.clone());
        self.trace(|| format!("c{c} at n{n}: write {key}: catching up"));
        self.wake_pullers(n);
        self.wait(c, stage, CATCHUP_WAIT_MS);
    }

    fn apply_write(&mut self, c: usize) {
        let Some(op) = self.sessions[c].op.clone() else {
            return;
        };
        if !self.still_serves(&op) || self.frozen(&op) {
            self.report.unavailable += 1;
            return self.next_request(c);
        }
        let Stage::WriteCatchUp { value } = op.stage else {
            return;
        };
        let n = op.node;
        let delete = value.is_none();
        let req = WriteRequest {
            slot: slot_of(&op.key),
            key: op.key.clone(),
            value,
            token: op.token,
            now_us: self.now * 1000,
            mode: Default::default(),
        };
        let Some(out) = self.commit(n, |r, txn| r.write(txn, req)) else {
            return self.next_request(c);
        };
        let key = op.key;
        let Some(dot) = out.dot else {
            // A delete of a key that does not exist: nothing was written.
            self.sessions[c].token = out.token;
            self.trace(|| format!("c{c} at n{n}: delete {key}: not found"));
            return self.next_request(c);
        };
        let mut context = self.sessions[c].known.clone();
        context.raise(dot.replica, dot.counter);
        let write = self.writes.len();
        self.by_dot.insert(dot, write);
        self.writes.push(WriteRecord {
            key: key.clone(),
            dot,
            context,
            level: op.level,
            k: op.k,
            epoch: self.nodes[n].view.as_ref().map_or(0, |v| v.epoch),
            written: self.step,
            acked: None,
            holders: Vec::new(),
        });
        if delete {
            self.report.deletes += 1;
        } else {
            self.report.writes += 1;
        }
        if op.level > 1 {
            self.report.quorum_writes += 1;
        }
        self.trace(|| {
            let what = if delete { "delete" } else { "write" };
            format!(
                "c{c} at n{n}: {what} {key} (w={}) as {}:{}",
                op.level, dot.replica, dot.counter
            )
        });
        // The poker: peers should pull soon.
        for p in self.peers_of(n) {
            self.send(n, p, 0, Msg::Poke);
        }
        let epoch = self.nodes[n].view.as_ref().map_or(0, |v| v.epoch);
        if let Some(o) = &mut self.sessions[c].op {
            o.token = out.token;
            o.token.observe_epoch(epoch);
        }
        if op.level > 1 && self.cfg.bug != Some(Bug::AckAfterOne) {
            // While it waits, the pages `n` serves say `ack_wanted`.
            self.wait(c, Stage::Acks { write }, QUORUM_WAIT_MS);
        } else {
            self.acknowledge(c, write);
        }
    }

    /// How many of `n`'s peers reported holding `dot`; during a view change, only the
    /// peers that stay in the partition (`Node::await_acks`).
    fn acks_at(&self, n: usize, dot: Dot) -> usize {
        let node = &self.nodes[n];
        let next = node
            .transition
            .as_ref()
            .filter(|_| self.cfg.bug != Some(Bug::AckFromLeaving));
        let staying = |p: usize| {
            next.is_none_or(|t| {
                node.partition()
                    .and_then(|uid| t.to().replicas_of(uid))
                    .is_some_and(|to| to.contains(&super::world::addr(p)))
            })
        };
        acks(
            dot,
            node.peer_have
                .iter()
                .filter(|(p, _)| staying(**p))
                .map(|(_, vv)| vv),
        )
    }

    /// Whether a quorum write waits at `n`: its sync pages then ask for a report.
    pub(super) fn awaits_acks(&self, n: usize) -> bool {
        self.sessions.iter().any(|s| {
            s.op.as_ref()
                .is_some_and(|o| o.node == n && matches!(o.stage, Stage::Acks { .. }))
        })
    }

    /// A peer of `n` reported its vector: quorum writes waiting there may be done.
    pub(super) fn check_acks(&mut self, n: usize) {
        for c in 0..self.sessions.len() {
            let Some(Op {
                node,
                level,
                stage: Stage::Acks { write },
                ..
            }) = self.sessions[c].op
            else {
                continue;
            };
            if node == n && self.acks_at(n, self.writes[write].dot) + 1 >= level {
                self.acknowledge(c, write);
            }
        }
    }

    /// The client is told its write succeeded.
    fn acknowledge(&mut self, c: usize, write: usize) {
        let Some(op) = self.sessions[c].op.clone() else {
            return;
        };
        let dot = self.writes[write].dot;
        let mut holders = vec![op.node];
        holders.extend(
            self.nodes[op.node]
                .peer_have
                .iter()
                .filter(|(_, have)| have.contains(dot))
                .map(|(&p, _)| p),
        );
        let w = &mut self.writes[write];
        w.acked = Some(self.step);
        w.holders = holders;
        let session = &mut self.sessions[c];
        session.token = op.token;
        session.known.raise(dot.replica, dot.counter);
        if op.level > 1 {
            let n = op.node;
            self.trace(|| format!("c{c} at n{n}: {}:{} acknowledged", dot.replica, dot.counter));
        }
        self.next_request(c);
    }

    // ---- waits ----

    /// `n` applied something: requests waiting there for their token may go on.
    pub(super) fn progress(&mut self, n: usize) {
        self.drains_progress(n);
        for c in 0..self.sessions.len() {
            let Some(op) = self.sessions[c].op.as_ref().filter(|o| o.node == n) else {
                continue;
            };
            let Some(replica) = &self.nodes[n].replica else {
                continue;
            };
            let ready = Replica::can_serve(&replica.served(), op.partition, &op.token);
            match op.stage {
                Stage::ReadCatchUp if ready => self.serve_read(c),
                Stage::WriteCatchUp { .. } if ready => self.apply_write(c),
                _ => {}
            }
        }
    }

    /// The current wait of session `c` ran out.
    pub(super) fn timeout(&mut self, c: usize) {
        let Some(op) = self.sessions[c].op.clone() else {
            return;
        };
        let (n, key) = (op.node, op.key.as_str());
        match op.stage {
            Stage::Asking { answered } => {
                self.report.unavailable += 1;
                self.trace(|| {
                    format!("c{c} at n{n}: read {key}: {answered} peers answered in time")
                });
                self.next_request(c);
            }
            // The second attempt: the key's own state may do.
            Stage::ReadCatchUp if self.servable(c) => self.serve_read(c),
            Stage::WriteCatchUp { .. }
                if self.still_serves(&op) && self.replica(n).accepts_write(&op.token) =>
            {
                self.apply_write(c)
            }
            Stage::ReadCatchUp | Stage::WriteCatchUp { .. } => {
                // The server would try another replica; this client gives up.
                self.report.refused += 1;
                self.trace(|| format!("c{c} at n{n}: {key}: could not catch up"));
                self.next_request(c);
            }
            Stage::Acks { write } => {
                let dot = self.writes[write].dot;
                if self.acks_at(n, dot) + 1 >= op.level {
                    return self.acknowledge(c, write);
                }
                self.report.unconfirmed += 1;
                self.trace(|| {
                    format!(
                        "c{c} at n{n}: {}:{} not confirmed in time: outcome unknown",
                        dot.replica, dot.counter
                    )
                });
                self.next_request(c);
            }
        }
    }

    /// Node `n` crashed: the requests it was serving fail (a write waiting for its
    /// peers has an unknown outcome).
    pub(super) fn fail_requests_at(&mut self, n: usize) {
        for c in 0..self.sessions.len() {
            let Some(op) = &self.sessions[c].op else {
                continue;
            };
            if op.node != n {
                continue;
            }
            if matches!(op.stage, Stage::Acks { .. }) {
                self.report.unconfirmed += 1;
            } else {
                self.report.unavailable += 1;
            }
            self.next_request(c);
        }
    }
}
