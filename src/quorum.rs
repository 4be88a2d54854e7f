//! Quorum levels: how many replicas of a key's partition a read merges and a write waits
//! for (seed 004's consistency levels).
//!
//! # Design
//!
//! A level is a number of replicas, `quorum` (a majority of the partition's replicas) or
//! `all`; it is resolved against the partition a request lands in, so one request line
//! means the same thing in a 2-replica shard and a 3-replica one. A cluster has defaults
//! (`R` and `W`, both 1: one replica answers, which is the seeds' behaviour); any request
//! may override them (`r=` / `w=`).
//!
//! * A write at level W is acknowledged once W replicas hold it durably: the replica
//!   that took it (its WAL), and W − 1 peers whose sync requests show they applied it
//!   (their `have` vector covers the write's dot). Replication stays pull-based; a
//!   waiting write only asks its peers to report right after they apply it.
//! * A read at level R asks R − 1 peers what they hold for the key, makes the replica
//!   that serves it reflect all of it (it pulls what it lacks, like any causal catch-up),
//!   and answers from that merged state, siblings kept.
//!
//! With R + W greater than the replica count, every read quorum meets every write quorum
//! in at least one replica, so a read sees every write acknowledged before it began.
//! Causal guarantees are those of every other request: levels only add waiting.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::clock::{Dot, VersionVector};

/// How many replicas a request involves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    /// This many replicas (at least 1).
    Count(u32),
    /// A majority: ⌊K/2⌋ + 1 of the partition's K replicas.
    Quorum,
    /// Every replica of the partition.
    All,
}

impl Level {
    /// One replica: the default, and what a replica asks its peers with.
    pub const ONE: Level = Level::Count(1);

    /// The replica count this level needs in a partition of `replicas`, or why it cannot
    /// be met there.
    pub fn resolve(self, replicas: usize) -> Result<usize, String> {
        match self {
            Level::Count(n) if n as usize > replicas => Err(format!(
                "{n} replicas were asked for, but the key's partition has {replicas}"
            )),
            Level::Count(n) => Ok(n.max(1) as usize),
            Level::Quorum => Ok(replicas / 2 + 1),
            Level::All => Ok(replicas.max(1)),
        }
    }
}

impl Default for Level {
    fn default() -> Self {
        Level::ONE
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Level::Count(n) => write!(f, "{n}"),
            Level::Quorum => f.write_str("quorum"),
            Level::All => f.write_str("all"),
        }
    }
}

/// A cluster's default levels (`R` and `W`), used by requests that name none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Levels {
    pub read: Level,
    pub write: Level,
}

/// Replica counts above this are refused outright (no partition is that large).
const MAX_COUNT: u32 = 64;

impl FromStr for Level {
    type Err = String;

    /// `1`.., `quorum` or `all` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("quorum") {
            return Ok(Level::Quorum);
        }
        if s.eq_ignore_ascii_case("all") {
            return Ok(Level::All);
        }
        match s.parse::<u32>() {
            Ok(n) if (1..=MAX_COUNT).contains(&n) => Ok(Level::Count(n)),
            _ => Err(format!(
                "{s:?} is not a replica count: use a number from 1, \"quorum\" or \"all\""
            )),
        }
    }
}

/// How many of `peers` (each one's last reported `have` vector) hold `dot`.
pub fn acks<'a>(dot: Dot, peers: impl IntoIterator<Item = &'a VersionVector>) -> usize {
    peers.into_iter().filter(|have| have.contains(dot)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_print() {
        for (text, level) in [
            ("1", Level::Count(1)),
            ("3", Level::Count(3)),
            ("quorum", Level::Quorum),
            ("QUORUM", Level::Quorum),
            ("all", Level::All),
        ] {
            assert_eq!(text.parse::<Level>(), Ok(level));
            assert_eq!(level.to_string().parse::<Level>(), Ok(level));
        }
        for bad in ["0", "-1", "", "two", "1.5", "65"] {
            assert!(bad.parse::<Level>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn levels_resolve_against_the_partition() {
        assert_eq!(Level::Quorum.resolve(1), Ok(1));
        assert_eq!(Level::Quorum.resolve(2), Ok(2));
        assert_eq!(Level::Quorum.resolve(3), Ok(2));
        assert_eq!(Level::Quorum.resolve(4), Ok(3));
        assert_eq!(Level::All.resolve(3), Ok(3));
        assert_eq!(Level::Count(2).resolve(3), Ok(2));
        assert!(Level::Count(4).resolve(3).is_err());
        // Majorities of the same partition always intersect.
        for k in 1..10 {
            let q = Level::Quorum.resolve(k).unwrap_or_default();
            assert!(q + q > k, "k={k}");
        }
    }

    #[test]
    fn acks_count_the_peers_that_hold_the_dot() {
        let (a, b) = (1, 2);
        let dot = Dot {
            replica: a,
            counter: 5,
        };
        let mut behind = VersionVector::default();
        behind.raise(a, 4);
        let mut there = VersionVector::default();
        there.raise(a, 7);
        there.raise(b, 1);
        assert_eq!(acks(dot, [&behind, &there, &there]), 2);
        assert_eq!(acks(dot, [&behind]), 0);
    }
}
