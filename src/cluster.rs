//! What a node believes about its peers: a small, pure failure detector.
//!
//! # Design
//!
//! Two sources of evidence, both reported here with the current time (an input, never
//! read from a clock inside; the server passes a monotonic clock):
//!
//! * **Heartbeats.** The server pings every other member every
//!   [`HEARTBEAT_INTERVAL_MS`]. The intervals between answered pings feed a
//!   *phi-accrual* detector (Hayashibara et al., as in Akka and Cassandra): `phi` is
//!   `-log10` of the probability that a live peer stays silent as long as this one has,
//!   under a normal distribution fitted to the last [`WINDOW`] intervals (with a floor on
//!   the deviation, [`MIN_STD_MS`], and an allowance for pauses, [`ACCEPTABLE_PAUSE_MS`]).
//!   A peer whose `phi` reaches [`PHI_DEAD`] is **dead**. With steady 250 ms heartbeats
//!   that takes about 1 s of silence; jittery links raise the bar by themselves.
//! * **Outcomes of real traffic.** Any answered call is a sign of life; a peer with
//!   [`SUSPECT_AFTER_FAILURES`] consecutive transport failures is **suspected** for
//!   [`SUSPECT_FOR_MS`] (faster than waiting for phi when a request just failed), and a
//!   peer with no heartbeat history yet (never heard from, or heard only through other
//!   calls) is dead after [`DEAD_AFTER_FAILURES`] consecutive failures.
//!
//! [`Liveness::order`] turns a replica list into the order in which to try them: healthy
//! peers first, starting at a rotation chosen by the caller (spreading load), suspected
//! and dead ones last, so a request still goes out when everyone is in doubt.
//!
//! A third piece of evidence concerns writes only: a peer's answer to a heartbeat says
//! whether its disk refuses writes ([`Liveness::record_disk`]). Such a peer is alive and
//! serves reads, but [`Liveness::order_for_writes`] puts it after the replicas whose disks
//! take writes (and before suspected and dead ones: it answers at once, with a retryable
//! refusal, should everyone else fail).
//!
//! # Caveats
//!
//! * Beliefs are local: two nodes may disagree about a third for a heartbeat or two.
//! * A dead verdict only reorders routing; it never removes a node from the view (that
//!   is an operator's `update_view`).

use std::collections::{BTreeMap, VecDeque};

/// How often the server pings each other member.
pub const HEARTBEAT_INTERVAL_MS: u64 = 250;

/// `phi` at which a peer is considered dead: a false verdict about once in 10^8 pauses.
pub const PHI_DEAD: f64 = 8.0;

/// Floor on the standard deviation of heartbeat intervals, so a perfectly regular
/// history does not make the detector jump at the first late heartbeat.
pub const MIN_STD_MS: f64 = 100.0;

/// Silence tolerated on top of the mean interval (scheduling hiccups, GC-free as we are).
pub const ACCEPTABLE_PAUSE_MS: f64 = 250.0;

/// Heartbeat intervals remembered per peer.
pub const WINDOW: usize = 64;

/// Longest interval taken as a sample. A longer one is an outage (the peer's, the
/// network's, or this node's own pause), not jitter: learning from it would make the
/// detector take seconds to notice the next outage. The nemesis found this: after this
/// node was paused for 8 s, a partition right after went unnoticed for its 8 s.
pub const MAX_SAMPLE_MS: u64 = 4 * HEARTBEAT_INTERVAL_MS;

/// Consecutive failures after which a peer is routed around.
pub const SUSPECT_AFTER_FAILURES: u32 = 2;

/// Consecutive failures after which a peer with no heartbeat history is considered dead.
pub const DEAD_AFTER_FAILURES: u32 = 3;

/// How long a suspected peer is skipped before it is tried again. Short, because a
/// restarted replica should be used again quickly (the staleness bound is 5 s).
pub const SUSPECT_FOR_MS: u64 = 1_000;

/// What this node believes about one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Alive,
    /// Recent calls failed; routed around for a moment.
    Suspected,
    /// Silent for far longer than its heartbeats make likely.
    Dead,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Alive => "alive",
            Health::Suspected => "suspected",
            Health::Dead => "dead",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
struct PeerState {
    failures: u32,
    last_failure_ms: u64,
    /// Last answered call of any kind.
    last_heard_ms: Option<u64>,
    /// Last answered heartbeat, and the intervals between answered heartbeats.
    last_beat_ms: Option<u64>,
    intervals: VecDeque<u64>,
    /// Sums of `intervals` and of their squares, kept as samples come and go: the
    /// detector is asked on every forwarded request, and summing the window each time
    /// cost a forwarded GET about 3,000 instructions (callgrind).
    sum: u64,
    sum_sq: u64,
    /// The peer said, in its last heartbeat answer, that its disk refuses writes.
    disk_degraded: bool,
}

impl PeerState {
    /// Mean and standard deviation of the heartbeat intervals (a prior of one interval
    /// per [`HEARTBEAT_INTERVAL_MS`] until there are samples).
    fn stats(&self) -> (f64, f64) {
        if self.intervals.is_empty() {
            let mean = HEARTBEAT_INTERVAL_MS as f64;
            return (mean, mean / 4.0);
        }
        // Exact in integers (samples are at most MAX_SAMPLE_MS, WINDOW of them): the
        // variance is (n * sum of squares - sum^2) / n^2, never negative.
        let n = self.intervals.len() as u64;
        let mean = self.sum as f64 / n as f64;
        let spread = (n * self.sum_sq).saturating_sub(self.sum * self.sum);
        let var = spread as f64 / (n * n) as f64;
        (mean, var.sqrt())
    }

    fn push_interval(&mut self, interval: u64) {
        if self.intervals.len() == WINDOW {
            if let Some(old) = self.intervals.pop_front() {
                self.sum -= old;
                self.sum_sq -= old * old;
            }
        }
        self.intervals.push_back(interval);
        self.sum += interval;
        self.sum_sq += interval * interval;
    }
}

/// One peer as reported by [`Liveness::report`].
#[derive(Clone, Debug, PartialEq)]
pub struct PeerReport {
    pub peer: String,
    pub health: Health,
    /// `None` until the first heartbeat was answered.
    pub phi: Option<f64>,
    /// Time since the peer last answered anything, `None` if it never did.
    pub silent_ms: Option<u64>,
    pub failures: u32,
    /// Whether its last heartbeat answer said its disk refuses writes.
    pub disk_degraded: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Liveness {
    peers: BTreeMap<String, PeerState>,
}

impl Liveness {
    /// `peer` answered a call (any call: its answer may still be an error).
    pub fn record_ok(&mut self, peer: &str, now_ms: u64) {
        let s = self.state(peer);
        s.failures = 0;
        s.last_heard_ms = Some(s.last_heard_ms.map_or(now_ms, |t| t.max(now_ms)));
    }

    /// `peer` answered a heartbeat: a sample for the phi detector, and a sign of life.
    pub fn record_heartbeat(&mut self, peer: &str, now_ms: u64) {
        self.record_ok(peer, now_ms);
        let s = self.state(peer);
        if let Some(prev) = s.last_beat_ms {
            let interval = now_ms.saturating_sub(prev);
            if interval <= MAX_SAMPLE_MS {
                s.push_interval(interval);
            }
        }
        s.last_beat_ms = Some(now_ms);
    }

    /// `peer` told (answering a heartbeat) whether its disk refuses writes.
    pub fn record_disk(&mut self, peer: &str, degraded: bool) {
        self.state(peer).disk_degraded = degraded;
    }

    /// Whether `peer` last said its disk refuses writes.
    pub fn is_disk_degraded(&self, peer: &str) -> bool {
        self.peers.get(peer).is_some_and(|s| s.disk_degraded)
    }

    /// A call to `peer` failed in transport (refused, timed out, reset).
    pub fn record_failure(&mut self, peer: &str, now_ms: u64) {
        let state = self.state(peer);
        state.failures = state.failures.saturating_add(1);
        state.last_failure_ms = now_ms;
    }

    /// `peer`'s state, created on first mention. Looked up before it is created: the
    /// answers of forwarded requests land here, and a key `String` per call is an
    /// allocation each.
    fn state(&mut self, peer: &str) -> &mut PeerState {
        if !self.peers.contains_key(peer) {
            self.peers.insert(peer.to_string(), PeerState::default());
        }
        self.peers
            .get_mut(peer)
            .expect("inserted above if it was missing")
    }

    /// Forgets peers not in `members` (removed nodes), so the table stays bounded.
    pub fn retain(&mut self, members: &[String]) {
        self.peers.retain(|p, _| members.iter().any(|m| m == p));
    }

    /// The suspicion level of `peer`: `-log10 P(a live peer is silent this long)`, or
    /// `None` before its first answered heartbeat.
    pub fn phi(&self, peer: &str, now_ms: u64) -> Option<f64> {
        let s = self.peers.get(peer)?;
        s.last_beat_ms?;
        let since = s.last_heard_ms?;
        let elapsed = now_ms.saturating_sub(since) as f64;
        let (mean, std) = s.stats();
        Some(phi(
            elapsed,
            mean + ACCEPTABLE_PAUSE_MS,
            std.max(MIN_STD_MS),
        ))
    }

    pub fn health(&self, peer: &str, now_ms: u64) -> Health {
        let Some(s) = self.peers.get(peer) else {
            return Health::Alive;
        };
        let dead = match self.phi(peer, now_ms) {
            Some(phi) => phi >= PHI_DEAD,
            // No heartbeat history to judge a silence by (never answered a ping, or
            // heard only through other calls): consecutive failures decide.
            None => s.failures >= DEAD_AFTER_FAILURES,
        };
        if dead {
            Health::Dead
        } else if s.failures >= SUSPECT_AFTER_FAILURES
            && now_ms.saturating_sub(s.last_failure_ms) < SUSPECT_FOR_MS
        {
            Health::Suspected
        } else {
            Health::Alive
        }
    }

    pub fn is_suspected(&self, peer: &str, now_ms: u64) -> bool {
        self.health(peer, now_ms) != Health::Alive
    }

    /// `candidates` rotated by `start`, healthy ones first, the others after.
    pub fn order(&self, candidates: &[String], start: usize, now_ms: u64) -> Vec<String> {
        let n = candidates.len();
        let rotated = (0..n).map(|i| &candidates[(start + i) % n.max(1)]);
        let (trusted, suspected): (Vec<&String>, Vec<&String>) =
            rotated.partition(|c| !self.is_suspected(c, now_ms));
        trusted.into_iter().chain(suspected).cloned().collect()
    }

    /// Like [`Liveness::order`], for a write: among the healthy peers, those whose disks
    /// refuse writes go after the others (still before suspected and dead ones).
    pub fn order_for_writes(
        &self,
        candidates: &[String],
        start: usize,
        now_ms: u64,
    ) -> Vec<String> {
        let ordered = self.order(candidates, start, now_ms);
        let (healthy, rest): (Vec<String>, Vec<String>) = ordered
            .into_iter()
            .partition(|c| !self.is_suspected(c, now_ms));
        let (writable, degraded): (Vec<String>, Vec<String>) =
            healthy.into_iter().partition(|c| !self.is_disk_degraded(c));
        writable.into_iter().chain(degraded).chain(rest).collect()
    }

    /// What this node believes about each of `peers`, in that order.
    pub fn report(&self, peers: &[String], now_ms: u64) -> Vec<PeerReport> {
        peers
            .iter()
            .map(|p| {
                let s = self.peers.get(p);
                PeerReport {
                    peer: p.clone(),
                    health: self.health(p, now_ms),
                    phi: self.phi(p, now_ms),
                    silent_ms: s
                        .and_then(|s| s.last_heard_ms)
                        .map(|t| now_ms.saturating_sub(t)),
                    failures: s.map_or(0, |s| s.failures),
                    disk_degraded: s.is_some_and(|s| s.disk_degraded),
                }
            })
            .collect()
    }
}

/// `-log10(1 - F(elapsed))` for a normal distribution `F` with `mean` and `std`, using the
/// logistic approximation of the normal CDF that Akka's detector uses (accurate to about
/// 10^-4, and finite far into the tail where `1 - F` underflows).
fn phi(elapsed: f64, mean: f64, std: f64) -> f64 {
    let y = (elapsed - mean) / std;
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    if elapsed > mean {
        -(e / (1.0 + e)).log10()
    } else {
        -(1.0 - 1.0 / (1.0 + e)).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        ["a", "b", "c"].iter().map(|s| s.to_string()).collect()
    }

    /// Heartbeats from `peer` every `every` ms from `from` up to (excluding) `to`.
    fn beats(l: &mut Liveness, peer: &str, from: u64, to: u64, every: u64) {
        let mut t = from;
        while t < to {
            l.record_heartbeat(peer, t);
            t += every;
        }
    }

    #[test]
    fn suspects_after_repeated_failures_and_forgives_after_a_while() {
        let mut l = Liveness::default();
        l.record_failure("b", 100);
        assert!(!l.is_suspected("b", 100));
        l.record_failure("b", 200);
        assert_eq!(l.health("b", 200), Health::Suspected);
        assert_eq!(l.order(&names(), 0, 300), vec!["a", "c", "b"]);
        assert!(!l.is_suspected("b", 200 + SUSPECT_FOR_MS));
        l.record_failure("b", 5_000);
        l.record_ok("b", 5_000);
        assert!(!l.is_suspected("b", 5_000));
    }

    #[test]
    fn a_peer_never_heard_from_is_dead_after_repeated_failures() {
        let mut l = Liveness::default();
        for t in 0..DEAD_AFTER_FAILURES as u64 {
            l.record_failure("b", t * 250);
        }
        // Long after the failures, still dead: nothing ever came back.
        assert_eq!(l.health("b", 60_000), Health::Dead);
        l.record_heartbeat("b", 60_100);
        assert_eq!(l.health("b", 60_100), Health::Alive);
    }

    #[test]
    fn a_peer_heard_only_through_other_calls_is_dead_after_repeated_failures() {
        // It answered a call, then died before its first heartbeat was answered.
        let mut l = Liveness::default();
        l.record_ok("b", 0);
        for t in 1..=DEAD_AFTER_FAILURES as u64 {
            l.record_failure("b", t * 250);
        }
        assert_eq!(l.health("b", 60_000), Health::Dead);
    }

    #[test]
    fn steady_heartbeats_keep_a_peer_alive_and_silence_kills_it() {
        let mut l = Liveness::default();
        beats(&mut l, "b", 0, 10_000, HEARTBEAT_INTERVAL_MS);
        let last = 10_000 - HEARTBEAT_INTERVAL_MS;
        // A heartbeat or two late: alive.
        assert_eq!(
            l.health("b", last + 2 * HEARTBEAT_INTERVAL_MS),
            Health::Alive
        );
        let phi_early = l.phi("b", last + 300).expect("heard");
        let phi_later = l.phi("b", last + 900).expect("heard");
        assert!(
            phi_early < 1.0 && phi_later > phi_early,
            "{phi_early} {phi_later}"
        );
        // First instant it is dead; it stays dead while silent.
        let dead_at = (last..last + 10_000)
            .step_by(10)
            .find(|&t| l.health("b", t) == Health::Dead)
            .expect("declared dead within 10 s");
        let silence = dead_at - last;
        assert!(
            (800..=2_000).contains(&silence),
            "dead after {silence} ms of silence"
        );
        assert_eq!(l.health("b", last + 30_000), Health::Dead);
        // Back: alive at once.
        l.record_heartbeat("b", last + 30_000);
        assert_eq!(l.health("b", last + 30_000), Health::Alive);
        // The outage taught the detector nothing: the next silence is noticed as fast.
        let back = last + 30_000;
        beats(&mut l, "b", back, back + 2_000, HEARTBEAT_INTERVAL_MS);
        let last = back + 2_000 - HEARTBEAT_INTERVAL_MS;
        let again = (last..last + 10_000)
            .step_by(10)
            .find(|&t| l.health("b", t) == Health::Dead)
            .expect("declared dead again");
        assert!(
            again - last <= 2_000,
            "after an outage, dead only after {} ms of silence",
            again - last
        );
    }

    #[test]
    fn jittery_heartbeats_raise_the_bar() {
        let mut steady = Liveness::default();
        beats(&mut steady, "b", 0, 20_000, 250);
        let mut jittery = Liveness::default();
        let mut t = 0;
        for i in 0..80u64 {
            jittery.record_heartbeat("b", t);
            t += if i % 2 == 0 { 50 } else { 450 };
        }
        let (s_last, j_last) = (19_750, t - 450);
        let at = 1_200;
        let s = steady.phi("b", s_last + at).expect("heard");
        let j = jittery.phi("b", j_last + at).expect("heard");
        assert!(j < s, "jittery phi {j} should be below steady phi {s}");
    }

    #[test]
    fn other_traffic_counts_as_a_sign_of_life() {
        let mut l = Liveness::default();
        beats(&mut l, "b", 0, 5_000, 250);
        // No heartbeats after 4 750, but forwarded requests keep being answered.
        for t in (5_000..20_000).step_by(200) {
            l.record_ok("b", t);
            assert_eq!(l.health("b", t + 100), Health::Alive, "at {t}");
        }
    }

    #[test]
    fn order_rotates_and_keeps_everyone() {
        let l = Liveness::default();
        assert_eq!(l.order(&names(), 1, 0), vec!["b", "c", "a"]);
        assert_eq!(l.order(&names(), 5, 0), vec!["c", "a", "b"]);
        assert!(l.order(&[], 3, 0).is_empty());
    }

    #[test]
    fn writes_go_to_degraded_disks_after_healthy_ones_reads_do_not_care() {
        let mut l = Liveness::default();
        l.record_disk("a", true);
        // Reads: rotation only.
        assert_eq!(l.order(&names(), 0, 0), vec!["a", "b", "c"]);
        // Writes: the degraded disk after the healthy ones, whatever the rotation.
        assert_eq!(l.order_for_writes(&names(), 0, 0), vec!["b", "c", "a"]);
        assert_eq!(l.order_for_writes(&names(), 2, 0), vec!["c", "b", "a"]);
        // A suspected peer still comes after the degraded one.
        l.record_failure("b", 100);
        l.record_failure("b", 200);
        assert_eq!(l.order_for_writes(&names(), 0, 300), vec!["c", "a", "b"]);
        assert!(l.report(&names(), 300)[0].disk_degraded);
        // Healed: back in the rotation.
        l.record_disk("a", false);
        assert_eq!(
            l.order_for_writes(&names(), 0, 300 + SUSPECT_FOR_MS),
            vec!["a", "b", "c"]
        );
    }

    #[test]
    fn report_lists_every_peer_and_retain_forgets_removed_ones() {
        let mut l = Liveness::default();
        beats(&mut l, "a", 0, 1_000, 250);
        l.record_failure("c", 900);
        let r = l.report(&names(), 1_000);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].silent_ms, Some(250));
        assert!(r[0].phi.is_some());
        assert_eq!((r[1].phi, r[1].silent_ms, r[1].failures), (None, None, 0));
        assert_eq!(r[2].failures, 1);
        l.retain(&["a".to_string()]);
        assert_eq!(l.report(&names(), 1_000)[2].failures, 0);
    }
}
