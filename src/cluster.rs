//! What a node believes about its peers: a small, pure failure detector.
//!
//! # Design
//!
//! Every internal call's outcome is reported here with the current time (an input, never
//! read from a clock inside). A peer with [`SUSPECT_AFTER_FAILURES`] consecutive failures
//! is *suspected* and routed around for [`SUSPECT_FOR_MS`]; after that one request is let
//! through again as a probe. Any success clears the suspicion. The periodic sync traffic
//! between the replicas of a partition doubles as a heartbeat.
//!
//! [`Liveness::order`] turns a replica list into the order in which to try them: trusted
//! peers first, starting at a rotation chosen by the caller (spreading load), suspected
//! ones last, so a request still goes out when everyone is suspected.
//!
//! # Caveats
//!
//! * Suspicion is local and outcome-driven; phi-accrual detection over heartbeats and a
//!   status endpoint come with the fault-tolerance issue.

use std::collections::BTreeMap;

/// Consecutive failures after which a peer is routed around.
pub const SUSPECT_AFTER_FAILURES: u32 = 2;

/// How long a suspected peer is skipped before it is probed again. Short, because a
/// restarted replica should be used again quickly (the staleness bound is 5 s).
pub const SUSPECT_FOR_MS: u64 = 1_000;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PeerState {
    failures: u32,
    last_failure_ms: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Liveness {
    peers: BTreeMap<String, PeerState>,
}

impl Liveness {
    pub fn record_ok(&mut self, peer: &str) {
        self.peers.remove(peer);
    }

    pub fn record_failure(&mut self, peer: &str, now_ms: u64) {
        let state = self.peers.entry(peer.to_string()).or_default();
        state.failures = state.failures.saturating_add(1);
        state.last_failure_ms = now_ms;
    }

    pub fn is_suspected(&self, peer: &str, now_ms: u64) -> bool {
        self.peers.get(peer).is_some_and(|s| {
            s.failures >= SUSPECT_AFTER_FAILURES
                && now_ms.saturating_sub(s.last_failure_ms) < SUSPECT_FOR_MS
        })
    }

    /// `candidates` rotated by `start`, trusted ones first, suspected ones after.
    pub fn order(&self, candidates: &[String], start: usize, now_ms: u64) -> Vec<String> {
        let n = candidates.len();
        let rotated = (0..n).map(|i| &candidates[(start + i) % n.max(1)]);
        let (trusted, suspected): (Vec<&String>, Vec<&String>) =
            rotated.partition(|c| !self.is_suspected(c, now_ms));
        trusted.into_iter().chain(suspected).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        ["a", "b", "c"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn suspects_after_repeated_failures_and_forgives_after_a_while() {
        let mut l = Liveness::default();
        l.record_failure("b", 100);
        assert!(!l.is_suspected("b", 100));
        l.record_failure("b", 200);
        assert!(l.is_suspected("b", 200));
        assert_eq!(l.order(&names(), 0, 300), vec!["a", "c", "b"]);
        assert!(!l.is_suspected("b", 200 + SUSPECT_FOR_MS));
        l.record_failure("b", 5_000);
        l.record_ok("b");
        assert!(!l.is_suspected("b", 5_000));
    }

    #[test]
    fn order_rotates_and_keeps_everyone() {
        let l = Liveness::default();
        assert_eq!(l.order(&names(), 1, 0), vec!["b", "c", "a"]);
        assert_eq!(l.order(&names(), 5, 0), vec!["c", "a", "b"]);
        assert!(l.order(&[], 3, 0).is_empty());
    }
}
