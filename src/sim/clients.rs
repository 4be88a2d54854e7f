//! Client sessions and their operations.

use crate::clock::{CausalToken, Dot};
use crate::placement::slot_of;
use crate::replica::{Replica, WriteRequest};

use super::world::{Msg, Sim, Up, WriteRecord};
use super::{Bug, PARTITION};

impl Sim {
    pub(super) fn client_op(&mut self, c: usize) {
        if self.rng.chance(300) {
            self.sessions[c].node = self.rng.below(self.cfg.replicas as u64) as usize;
        }
        let n = self.sessions[c].node;
        if self.nodes[n].up != Up::Running {
            self.report.unavailable += 1;
            return;
        }
        let key = format!("k{}", self.rng.below(self.cfg.keys as u64));
        match self.rng.below(20) {
            0..=7 => self.client_read(c, n, &key),
            8..=9 => self.client_write(c, n, &key, None),
            _ => {
                let value = format!("c{c}@{}", self.now);
                self.client_write(c, n, &key, Some(value.into_bytes()));
            }
        }
    }

    pub(super) fn client_write(&mut self, c: usize, n: usize, key: &str, value: Option<Vec<u8>>) {
        let delete = value.is_none();
        let req = WriteRequest {
            slot: slot_of(key),
            key: key.to_string(),
            value,
            token: if self.cfg.bug == Some(Bug::ForgetToken) {
                CausalToken::empty(0)
            } else {
                self.sessions[c].token.clone()
            },
            now_ms: self.now,
        };
        if !self.nodes[n].replica.accepts_write(&req.token) {
            // The server waits for its peers, then refuses; here the client moves on.
            self.report.refused += 1;
            self.trace(|| format!("c{c} at n{n}: write {key}: not yet (catching up)"));
            let peers: Vec<usize> = self.peers_of(n).collect();
            for p in peers {
                self.wake(n, p);
            }
            return;
        }
        let before = self.nodes[n]
            .replica
            .applied()
            .get(self.nodes[n].replica.id());
        let Some(out) = self.commit(n, |r, txn| r.write(txn, req)) else {
            return;
        };
        let id = self.nodes[n].replica.id();
        let counter = self.nodes[n].replica.applied().get(id);
        let session = &mut self.sessions[c];
        session.token = out.token;
        if counter == before {
            // A delete of a key that does not exist: nothing was written.
            self.trace(|| format!("c{c} at n{n}: delete {key}: not found"));
            return;
        }
        let dot = Dot {
            replica: id,
            counter,
        };
        session.known.raise(id, counter);
        let context = session.known.clone();
        self.by_dot.insert(dot, self.writes.len());
        self.writes.push(WriteRecord {
            key: key.to_string(),
            dot,
            context,
        });
        if delete {
            self.report.deletes += 1;
        } else {
            self.report.writes += 1;
        }
        self.trace(|| {
            let what = if delete { "delete" } else { "write" };
            format!(
                "c{c} at n{n}: {what} {key} as {}:{}",
                dot.replica, dot.counter
            )
        });
        // The poker: peers should pull soon.
        let peers: Vec<usize> = self.peers_of(n).collect();
        for p in peers {
            self.send(n, p, 0, Msg::Poke);
        }
    }

    pub(super) fn client_read(&mut self, c: usize, n: usize, key: &str) {
        let slot = slot_of(key);
        let token = self.sessions[c].token.clone();
        let (state, servable) = {
            let txn = self.read(n);
            let state = txn.get(slot, key).ok().flatten().unwrap_or_default();
            let served = self.nodes[n].replica.served();
            let servable = Replica::can_serve(&served, PARTITION, &token)
                || Replica::can_serve_key(&served, PARTITION, &token, &state);
            (state, servable)
        };
        if !servable && self.cfg.bug != Some(Bug::ServeStale) {
            self.report.refused += 1;
            self.trace(|| format!("c{c} at n{n}: read {key}: not yet (catching up)"));
            // The server pokes its pullers and waits; here the client simply moves on.
            let peers: Vec<usize> = self.peers_of(n).collect();
            for p in peers {
                self.wake(n, p);
            }
            return;
        }
        self.report.reads += 1;
        self.check_read(c, n, key, &state);
        let mut token = token;
        state.observe_into(PARTITION, &mut token);
        let session = &mut self.sessions[c];
        session.token = token;
        for v in &state.versions {
            if let Some(&i) = self.by_dot.get(&v.dot) {
                session.known.merge(&self.writes[i].context);
            }
        }
        self.trace(|| {
            let dots: Vec<String> = state
                .versions
                .iter()
                .map(|v| format!("{}:{}", v.dot.replica, v.dot.counter))
                .collect();
            format!("c{c} at n{n}: read {key} = [{}]", dots.join(" "))
        });
    }
}
