//! What travels in the simulation: messages between nodes, the events of the queue,
//! the faults, and the addresses that name nodes in views.

use crate::clock::{Dot, PartitionUid, VersionVector};
use crate::placement::View;
use crate::replica::{Claim, SnapshotPage, SnapshotRequest, SyncRequest, SyncResponse};
use crate::viewchange::{Proposal, PullKey, PullProgress};

#[derive(Clone, Debug)]
pub(super) enum Msg {
    SyncReq(SyncRequest),
    SyncResp(SyncResponse),
    SnapReq(SnapshotRequest),
    SnapResp(SnapshotPage),
    Poke,
    /// A quorum read asks a peer for its state of a key of a partition, with an empty
    /// token.
    KeyReq(PartitionUid, String),
    /// The peer's answer: its token after reading the key (the key's history there).
    KeyResp(VersionVector),
    /// A digest round: the asker's bucket digests of its partition.
    DigestReq(PartitionUid, Vec<u64>),
    /// The buckets that differ at the peer, and its slot digests in them.
    DigestResp(Vec<u32>, Vec<(u32, u64)>),
    /// A digest round fetches the peer's keys of the slots that differ.
    RepairReq(SnapshotRequest),
    RepairResp(SnapshotPage),
    // A view change (`node/reconfig`): the coordinator's steps and their answers.
    Learn(Proposal),
    /// The learner's served vector (`None`: it has no replica).
    Learned(Option<VersionVector>),
    /// The learner already installed the proposal's view.
    AlreadyInstalled,
    /// The learner is in an older view than the proposal's base.
    Behind,
    Drain {
        epoch: u64,
        partition: PartitionUid,
        target: VersionVector,
    },
    Drained,
    /// One page of a pull, from `source` (a node index).
    Pull {
        epoch: u64,
        key: PullKey,
        source: usize,
        claim: Option<Claim>,
    },
    Pulled(PullProgress),
    /// A destination fetches a page of the moving slots from the drained source.
    HandoffReq(SnapshotRequest),
    HandoffResp(SnapshotPage),
    Install(View),
    Installed,
    /// A node's epoch, to a peer, which answers with its view if it is newer (the
    /// server's heartbeats and view catch-up).
    Gossip(u64),
    /// Handed-over keys' dots, to a replica of their new partition.
    Holds(PartitionUid, Vec<(u32, String, Vec<Dot>)>),
    Lacking(Vec<(u32, String)>),
    /// A step the node cannot take (the server's error answer): the coordinator tries
    /// again after a pause.
    Refused,
}

impl Msg {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Msg::SyncReq(_) => "sync?",
            Msg::SyncResp(_) => "sync!",
            Msg::SnapReq(_) => "snapshot?",
            Msg::SnapResp(_) => "snapshot!",
            Msg::Poke => "poke",
            Msg::KeyReq(..) => "key?",
            Msg::KeyResp(_) => "key!",
            Msg::DigestReq(..) => "digests?",
            Msg::DigestResp(..) => "digests!",
            Msg::RepairReq(_) => "repair?",
            Msg::RepairResp(_) => "repair!",
            Msg::Learn(_) => "learn?",
            Msg::Learned(_) => "learned!",
            Msg::AlreadyInstalled => "installed already!",
            Msg::Behind => "behind!",
            Msg::Drain { .. } => "drain?",
            Msg::Drained => "drained!",
            Msg::Pull { .. } => "pull?",
            Msg::Pulled(_) => "pulled!",
            Msg::HandoffReq(_) => "handoff?",
            Msg::HandoffResp(_) => "handoff!",
            Msg::Install(_) => "install?",
            Msg::Installed => "installed!",
            Msg::Gossip(_) => "gossip",
            Msg::Holds(..) => "holds?",
            Msg::Lacking(_) => "lacking!",
            Msg::Refused => "refused!",
        }
    }
}

#[derive(Clone, Debug)]
pub(super) enum Event {
    /// A node's pull round: ask every peer it is not already asking.
    Tick(usize),
    /// A node's trimmer: trim the log, collect tombstones.
    Trim(usize),
    /// A node's digest round with one peer: `(node, peer)`.
    Digest(usize, usize),
    /// A session sends its next request.
    Client(usize),
    /// The wait `op` of session `c` runs out (ignored if the session moved on).
    Timeout {
        c: usize,
        op: u64,
    },
    /// `id` pairs a response with the call that asked (0 for pokes).
    Deliver {
        from: usize,
        to: usize,
        id: u64,
        msg: Msg,
    },
    Fault(Fault),
    Heal,
    Probe,
    /// A view change is decided (see `viewchange.rs`).
    Change,
    /// The coordinator's next look at the change it drives (`run` names the drive, so
    /// a superseded one's wake-ups are ignored).
    Drive(u64),
    /// A node's deletion of handed-over slots, attempt `n` (ignored if superseded).
    Gc(usize, u32),
    /// A node tells a random member its epoch.
    Gossip(usize),
    /// A node sends a message it took a while to prepare (a large handoff page).
    SendLater {
        from: usize,
        to: usize,
        id: u64,
        msg: Msg,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Fault {
    Isolate(usize),
    Split(Vec<usize>),
    OneWay(usize, usize),
    Crash(usize),
    /// A crash that lasts longer than a trim round.
    Outage(usize),
    Wipe(usize),
    Pause(usize),
    Lossy,
}

/// The address of node `n` (loopback, never dialled: it only names the node in views).
pub(super) fn addr(n: usize) -> String {
    format!("127.0.{}.{}:7000", n / 250, n % 250 + 1)
}

/// The node an address names.
pub(super) fn index(addr: &str) -> Option<usize> {
    let ip = addr.strip_suffix(":7000")?.strip_prefix("127.0.")?;
    let (hi, lo) = ip.split_once('.')?;
    let (hi, lo): (usize, usize) = (hi.parse().ok()?, lo.parse().ok()?);
    Some(hi * 250 + lo.checked_sub(1)?)
}
