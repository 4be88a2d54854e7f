//! kvs: a distributed, sharded, replicated, causally consistent key-value store.
//!
//! The layers, from the bottom (see ARCHITECTURE.md for the tour):
//!
//! | module | what | pure? |
//! |---|---|---|
//! | [`keystate`] | a key's versions (siblings) and their merge: what storage keeps per key | pure |
//! | [`storage`] | durable engine (redb) and an in-memory one behind one trait | I/O |
//! | [`placement`] | key → slot → partition → replicas; the view | pure |
//! | [`clock`] | version vectors, dots, the client's causal token | pure |
//! | [`auth`] | the cluster key: member proofs, token key, cluster id | pure |
//! | [`replica`] | key versions and siblings, writes, causal reads, sync protocol | pure over a store |
//! | [`cluster`] | liveness of peers | pure |
//! | [`merkle`] | digests of a replica's state over slots, for state-based anti-entropy | pure over a store |
//! | [`quorum`] | read and write levels (`r=`/`w=`): how many replicas a request involves | pure |
//! | [`viewchange`] | deciding the next view (Paxos), each node's duties in a change | pure |
//! | [`rpc`] | node-to-node messages, codec, HTTP transport | I/O |
//! | [`node`] | the service every dialect calls, and its I/O: routing, writer, sync, heartbeats, view changes | I/O |
//! | [`api`] | client dialects (`/kv-store`, `/key-value-store*`), one file each | thin |
//! | [`http`] | one router, the body gate, the internal, status and metrics endpoints, the connection loop | I/O |
//! | [`metric_names`] | the name of every exported metric, for every layer that records one | names |
//! | [`client`] | the one HTTP client: transport, one handle per dialect | I/O |
//! | [`local`] | `kvs local`: a loopback cluster of child processes | I/O |

pub mod antientropy;
pub mod api;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod http;
pub mod keycontext;
pub mod keystate;
pub mod local;
pub mod merkle;
pub mod metric_names;
pub mod node;
pub mod placement;
pub mod quorum;
pub mod replica;
pub mod rpc;
pub mod sim;
pub mod storage;
pub mod viewchange;
pub mod wal;
pub mod writemode;

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod testing {
    /// A tiny deterministic PRNG (xorshift) so a failing seed replays exactly.
    pub struct Rng(pub u64);

    impl Rng {
        /// A number in `0..n`.
        pub fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }
}
