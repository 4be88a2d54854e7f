//! Node-to-node messages, their codec and the transport that carries them.
//!
//! # Design
//!
//! Every internal call is one [`Envelope`] (sender, its epoch, a [`Request`]) answered by
//! one [`Response`]. Both are postcard-encoded, on the same port as the client API. The
//! frequent small calls (pings, pokes, forwarded reads and writes, sync pulls) travel
//! multiplexed on one upgraded connection per peer ([`stream`]); the rest, and every call
//! to a peer that refuses streams, as `POST /_internal/v1/rpc` over pooled HTTP/1.1
//! keep-alive connections. Three headers go with each HTTP call and with the upgrade
//! request that opens a stream:
//!
//! * `x-kvs-secret`: the operator's `CLUSTER_SECRET` (or a public default when none is
//!   set, as in the seeds' `docker run` lines), compared in constant time: with a secret,
//!   nobody without it reaches the node's internals at all;
//! * `x-kvs-member`: the member proof derived from the cluster key (`auth`), a secret the
//!   cluster draws when it forms and hands only to its members. This is what makes a call
//!   a member's: a node in a cluster refuses every call without it (bar the two messages
//!   that hand the key out, which carry their own checks), whatever address the call
//!   claims or comes from;
//! * `x-kvs-proto`: the protocol version, so mismatched binaries fail loudly instead of
//!   misreading each other.
//!
//! Past that gate, the node also refuses state-changing calls from senders that are not
//! members of its view or of the change in progress (`node::keys` has the rules).
//!
//! [`Transport`] is a trait so that tests and a simulator can carry messages without
//! sockets; [`StreamTransport`] (over [`HttpTransport`]) is the real one.
//!
//! # Caveats
//!
//! * The secret and the member proof travel in clear text: run the cluster on a private
//!   network (as the seeds do) or behind TLS termination.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use crate::auth::{ClusterKey, Nonce};
use crate::clock::{CausalToken, Dot, PartitionUid, VersionVector};
use crate::error::{Error, ErrorKind};
use crate::placement::View;
use crate::quorum::Level;
use crate::replica::{
    Claim, Siblings, SnapshotPage, SnapshotRequest, SyncRequest, SyncResponse, WriteMode,
};
/// Answers of Paxos acceptors (with the proposer that reads them, in `viewchange`).
pub use crate::viewchange::PaxosReply;
use crate::viewchange::{Ballot, Proposal, PullKey, PullProgress};

/// Path of the internal endpoint.
pub const RPC_PATH: &str = "/_internal/v1/rpc";
/// Header carrying the cluster secret.
pub const SECRET_HEADER: &str = "x-kvs-secret";
/// Header carrying the member proof derived from the cluster key.
pub const MEMBER_HEADER: &str = "x-kvs-member";
/// Header carrying [`PROTOCOL_VERSION`].
pub const PROTO_HEADER: &str = "x-kvs-proto";
/// Bump on any incompatible change to the messages below.
/// 3: the member proof header and the key exchange (`Request::KeyRequest`,
/// `Request::KeyDelivery`, `Response::Key`), `Response::DiskFault` (a ping's answer while
/// the node's disk refuses writes), `ErrorKind::Unauthorized` and
/// `ErrorKind::OutcomeUnknown`.
/// 4: views carry a `placement::Layout` where they carried `k` (every message with a
/// view or a proposal: `Install`, `Learn`, `Accept`, `Status`, ...), and `Change` has
/// `AddToShard` and `Reshard`; read replies carry the write's causal context; the
/// requests `KeyCount` and `Join`.
/// 5: `Change::Replace`; read and write replies name the replica that served them
/// (`served_by`); `ErrorKind::Unsatisfiable`.
/// 6: client reads and writes carry their quorum level (`r`, `w`); sync pages say
/// whether a quorum write waits for the asker's report (`ack_wanted`); anti-entropy
/// digests (`Request::Digest`, `Response::Digests`); the check of a handoff before its
/// source deletes (`Request::Holds`, `Response::Lacking`).
/// 7: the own API's siblings and key contexts (`Request::ListKeys`, write modes).
/// 8: timestamps in microseconds (`Version::timestamp_us`, `WriteReply::timestamp_us`,
/// the time in `ReadReply::value`).
pub const PROTOCOL_VERSION: &str = "8";

pub mod stream;
pub use stream::StreamTransport;
/// Largest internal message accepted. Sync pages are bounded well below this
/// (`node::SYNC_PAGE_BYTES`) but one page may carry a few maximum-size values.
pub const MAX_RPC_BYTES: usize = 64 * 1024 * 1024;
/// Largest internal message accepted from a caller without a valid member proof: the key
/// exchange, and what a node in no cluster receives before it has a key (statuses,
/// learns and installs carry one or two views of about 20 KiB each). Anyone can send
/// these, so they stay small.
pub const MAX_UNPROVEN_RPC_BYTES: usize = 256 * 1024;
/// Time an internal message's body may take to arrive: ample for [`MAX_RPC_BYTES`]
/// between nodes, and a bound on how long a caller that trickles one holds its
/// connection.
pub const RPC_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// One internal call.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// The sender's address as it appears in the view.
    pub from: String,
    /// The epoch of the sender's view.
    pub epoch: u64,
    pub body: Request,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// Liveness probe; answered with [`Response::Ok`], or [`Response::DiskFault`] while
    /// the node's disk refuses writes.
    Ping,
    /// "Send me what my `have` vector lacks": answered with [`Response::Sync`]. Also tells
    /// the receiver how far the sender is, which decides log trimming.
    Sync(SyncRequest),
    /// A page of the receiver's whole state, for a sender that fell behind the receiver's
    /// trimmed log: answered with [`Response::Snapshot`].
    Snapshot(SnapshotRequest),
    /// "I accepted new writes in this partition": the receiver should pull from the
    /// sender soon. Answered with [`Response::Ok`].
    Poke { partition: PartitionUid },
    /// A client read forwarded to a replica of the key's partition, which merges the
    /// state of `r` replicas (asking its peers with `r` = 1).
    Get {
        key: String,
        token: CausalToken,
        r: Level,
    },
    /// A client write forwarded to a replica of the key's partition; `None` deletes. The
    /// replica answers once `w` replicas hold it.
    Put {
        key: String,
        #[serde(with = "serde_bytes")]
        value: Option<Vec<u8>>,
        token: CausalToken,
        w: Level,
        /// What it replaces and its condition (`writemode`).
        mode: WriteMode,
    },
    /// The receiver's view, transition and configuration: answered with
    /// [`Response::Status`]. Used before a view change and to learn a newer view.
    Status,
    /// Paxos phase 1 for the view of `epoch`: answered with [`Response::Paxos`].
    Prepare { epoch: u64, ballot: Ballot },
    /// Paxos phase 2: answered with [`Response::Paxos`].
    Accept {
        epoch: u64,
        ballot: Ballot,
        proposal: Proposal,
    },
    /// "This proposal was chosen": record the transition, freeze what it moves away.
    /// Answered with [`Response::Learned`].
    Learn(Proposal),
    /// Catch up (pull from peers) until this replica of `partition` reflects `target`,
    /// while still in the view of `epoch`. Answered with [`Response::Ok`].
    Drain {
        epoch: u64,
        partition: PartitionUid,
        target: VersionVector,
    },
    /// Copy one page for the pull `key` of the transition to view `epoch`, from `source`;
    /// answered with [`Response::Pulled`] (the pull's progress so far).
    Pull {
        epoch: u64,
        key: PullKey,
        source: String,
        /// For a move: what the receiver may claim once the switch happens.
        claim: Option<Claim>,
    },
    /// "Install this view" (the last step of a change, and how a node behind catches
    /// up). Answered with [`Response::Ok`].
    Install(View),
    /// "Deliver the cluster key to my address in your view, quoting `nonce`." Needs no
    /// member proof (the asker has no key yet): the receiver hands the key over only by
    /// calling the sender's address, and only if it is a member. Answered with
    /// [`Response::Key`].
    KeyRequest { nonce: Nonce },
    /// The cluster key, answering the receiver's [`Request::KeyRequest`] that carried
    /// `nonce`; refused unless the receiver sent such a request. Answered with
    /// [`Response::Ok`].
    KeyDelivery { nonce: Nonce, key: ClusterKey },
    /// How many live keys the receiver holds for `partition` in the slots it owns:
    /// answered with [`Response::Count`].
    KeyCount { partition: PartitionUid },
    /// "Add me to the view": sent by a node that knows the cluster's addresses but is in
    /// no view (`node::join`). Needs no member proof; a receiver in a cluster that does
    /// not list the sender checks `admin_token` as it checks a client's membership
    /// change and adds the sender. Answered with [`Response::Status`] (no view: the
    /// receiver is in no cluster).
    Join { admin_token: Option<String> },
    /// Anti-entropy: the sender's bucket digests of its replica of `partition` (see
    /// `merkle`). Answered with [`Response::Digests`].
    Digest {
        partition: PartitionUid,
        buckets: Vec<u64>,
    },
    /// Before a node deletes keys it handed over: does the receiver's replica of
    /// `partition` hold each key's versions (named by their dots), or versions that
    /// supersede them? Answered with [`Response::Lacking`].
    Holds {
        partition: PartitionUid,
        keys: Vec<(u32, String, Vec<Dot>)>,
    },
    /// Up to `limit` live keys of the receiver's replica of `partition` starting with
    /// `prefix`, in `(slot, key)` order after `after` (`node::listing`). Answered with
    /// [`Response::Keys`].
    ListKeys {
        partition: PartitionUid,
        prefix: String,
        after: Option<(u32, String)>,
        limit: u32,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    Ok,
    Sync(SyncResponse),
    Snapshot(SnapshotPage),
    Get(ReadReply),
    Put(WriteReply),
    Status(Box<NodeStatus>),
    Paxos(PaxosReply),
    Learned(LearnReply),
    Pulled(PullProgress),
    Key(KeyAnswer),
    /// The answer to [`Request::KeyCount`].
    Count(u64),
    /// The call was understood but failed; `kind` says whether retrying elsewhere helps.
    Error(Error),
    /// The answer to a ping from a node whose disk refuses writes, and why (its peers
    /// then send it writes last).
    DiskFault(String),
    /// The answer to [`Request::Digest`]: the buckets whose digests differ from the
    /// sender's, and the receiver's non-zero slot digests in them.
    Digests {
        buckets: Vec<u32>,
        slots: Vec<(u32, u64)>,
    },
    /// The answer to [`Request::Holds`]: the keys the receiver does not hold.
    Lacking(Vec<(u32, String)>),
    /// The answer to [`Request::ListKeys`].
    Keys(KeyPage),
}

/// One partition's answer to [`Request::ListKeys`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPage {
    /// Live keys matching the prefix, in order, at most the limit asked.
    pub keys: Vec<(u32, String)>,
    /// How far the replica read: `None` when it read to the end of its store.
    pub read_to: Option<(u32, String)>,
}

/// What a node reports about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub addr: String,
    /// `None` while the node is in no cluster (started without VIEW, or removed).
    pub view: Option<View>,
    /// A chosen next view this node is moving to.
    pub transition: Option<Proposal>,
    /// The K the node was started with, if any.
    pub k: Option<usize>,
    /// Keys in the node's store.
    pub keys: u64,
}

/// Answer to [`Request::KeyRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyAnswer {
    /// The key was delivered to the asker's address (the delivery was accepted).
    Delivered,
    /// This node holds no key yet: the cluster is still forming.
    NoKey,
}

/// Answer to [`Request::Learn`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LearnReply {
    /// Recorded; carries the learner's replica vector (`served`) after freezing, if it
    /// is a replica of the old view.
    Learned(Option<VersionVector>),
    /// The learner already installed the proposal's view (or a later one).
    Installed,
}

/// Answer to a read, wherever it was served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadReply {
    /// The partition's uid and the index clients see, in the serving node's view.
    pub partition: PartitionUid,
    pub index: u32,
    /// The winning value and its timestamp (µs), `None` when the key does not exist.
    #[serde(with = "value_and_time")]
    pub value: Option<(Vec<u8>, u64)>,
    pub token: CausalToken,
    /// The causal context of the write that wrote the value (`ReadOutcome::context`).
    pub context: BTreeMap<PartitionUid, VersionVector>,
    /// Whether the serving replica holds anything for the key (`ReadOutcome::known`).
    pub known: bool,
    /// The replica that served the read (seed 003 names it when a node proxied).
    pub served_by: String,
    /// The other live siblings and the key's context (`ReadOutcome::siblings`).
    pub siblings: Siblings,
}

/// `Option<(Vec<u8>, u64)>` with the bytes serialized as bytes (one copy, not one visit
/// per byte); the encoding is the same as the derived one.
mod value_and_time {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(v: &Option<(Vec<u8>, u64)>, s: S) -> Result<S::Ok, S::Error> {
        v.as_ref()
            .map(|(bytes, ts)| (Bytes::new(bytes), *ts))
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<(Vec<u8>, u64)>, D::Error> {
        let v: Option<(ByteBuf, u64)> = Deserialize::deserialize(d)?;
        Ok(v.map(|(bytes, ts)| (bytes.into_vec(), ts)))
    }
}

/// Answer to a write, wherever it was accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteReply {
    pub partition: PartitionUid,
    pub index: u32,
    pub created: bool,
    pub timestamp_us: u64,
    pub token: CausalToken,
    /// The replica that accepted the write.
    pub served_by: String,
}

/// Why a call produced no [`Response`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No connection could be made: the peer certainly did not receive the request.
    #[error("peer {0} unreachable: {1}")]
    NotSent(String, String),
    /// The connection failed after the request may have been sent.
    #[error("peer {0} unreachable: {1}")]
    Unreachable(String, String),
    #[error("peer {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("peer {0} refused the call: {1}")]
    Refused(String, String),
}

impl CallError {
    /// Whether the peer may have received (and acted on) the request.
    pub fn maybe_delivered(&self) -> bool {
        !matches!(self, CallError::NotSent(..) | CallError::Refused(..))
    }
}

impl From<CallError> for Error {
    fn from(e: CallError) -> Self {
        Error::new(ErrorKind::Unavailable, e.to_string())
    }
}

pub type CallFuture<'a> = Pin<Box<dyn Future<Output = Result<Response, CallError>> + Send + 'a>>;

/// Carries an envelope to a peer and brings back its answer.
pub trait Transport: Send + Sync + 'static {
    fn call(&self, to: &str, envelope: &Envelope, timeout: Duration) -> CallFuture<'_>;

    /// The member proof to present on every call from now on (`None`: the node holds no
    /// cluster key). Transports that do not authenticate ignore it.
    fn set_member_proof(&self, _proof: Option<String>) {}
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Every message type is plain data; serializing into a Vec cannot fail.
    postcard::to_stdvec(value).expect("message serialization is infallible")
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// Idle pooled connections are closed after this; below the server's keep-alive so the
/// client never sends on a connection the server is about to close.
const POOL_IDLE: Duration = Duration::from_secs(20);

/// The real transport: HTTP/1.1 with keep-alive.
pub struct HttpTransport {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    secret: String,
    local_ip: Option<std::net::IpAddr>,
    /// Plain lock: held to clone or swap the value, never across an await.
    member_proof: std::sync::RwLock<Option<hyper::header::HeaderValue>>,
}

impl HttpTransport {
    /// `local_ip` is the node's own IP: outgoing calls leave from it, so a node's traffic
    /// is attributable when several nodes share a host. Receivers do not rely on it:
    /// the member proof, not the source address, makes a call a member's.
    pub fn new(secret: String, local_ip: Option<std::net::IpAddr>) -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_local_address(local_ip);
        connector.set_connect_timeout(Some(Duration::from_millis(500)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(64)
            .build(connector);
        Self {
            client,
            secret,
            local_ip,
            member_proof: std::sync::RwLock::new(None),
        }
    }

    fn secret(&self) -> &str {
        &self.secret
    }

    fn local_ip(&self) -> Option<std::net::IpAddr> {
        self.local_ip
    }

    /// The member proof calls carry now, if this node holds the cluster key.
    fn proof(&self) -> Option<hyper::header::HeaderValue> {
        self.member_proof
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn call_once(&self, to: &str, body: Vec<u8>) -> Result<Response, CallError> {
        let unreachable =
            |e: &dyn std::fmt::Display| CallError::Unreachable(to.into(), e.to_string());
        let proof = self.proof();
        let mut request = hyper::Request::post(format!("http://{to}{RPC_PATH}"));
        if let Some(proof) = proof {
            request = request.header(MEMBER_HEADER, proof);
        }
        let request = request
            .header(SECRET_HEADER, &self.secret)
            .header(PROTO_HEADER, PROTOCOL_VERSION)
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unreachable(&e))?;
        let response = self.client.request(request).await.map_err(|e| {
            if e.is_connect() {
                CallError::NotSent(to.into(), e.to_string())
            } else {
                unreachable(&e)
            }
        })?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_RPC_BYTES)
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        if !status.is_success() {
            return Err(CallError::Refused(
                to.into(),
                format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                ),
            ));
        }
        decode(&bytes)
            .map_err(|e| CallError::Refused(to.into(), format!("undecodable answer: {e}")))
    }
}

impl Transport for HttpTransport {
    fn set_member_proof(&self, proof: Option<String>) {
        // A proof is lowercase hex (`auth::ClusterKey::member_proof`), always a valid
        // header value; anything else would be a bug, and no proof is the safe outcome.
        let value = proof.and_then(|p| hyper::header::HeaderValue::from_str(&p).ok());
        *self.member_proof.write().unwrap_or_else(|p| p.into_inner()) = value;
    }

    fn call(&self, to: &str, envelope: &Envelope, timeout: Duration) -> CallFuture<'_> {
        let body = encode(envelope);
        let to = to.to_string();
        Box::pin(async move {
            match tokio::time::timeout(timeout, self.call_once(&to, body)).await {
                Ok(result) => result,
                Err(_) => Err(CallError::Timeout(to, timeout)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::VersionVector;

    /// Read replies carry their value as bytes; the encoding must stay the derived one.
    #[test]
    fn read_reply_values_encode_as_the_derived_sequence_did() {
        #[derive(Serialize)]
        struct Derived {
            partition: PartitionUid,
            index: u32,
            value: Option<(Vec<u8>, u64)>,
            token: CausalToken,
            context: BTreeMap<PartitionUid, VersionVector>,
            known: bool,
            served_by: String,
            siblings: Siblings,
        }
        let context: BTreeMap<PartitionUid, VersionVector> =
            [(3, [(5, 7)].into_iter().collect())].into_iter().collect();
        let siblings = Siblings {
            winner: None,
            others: vec![crate::replica::Sibling {
                dot: Dot {
                    replica: 5,
                    counter: 6,
                },
                timestamp_us: 9,
                value: b"other".to_vec(),
            }],
            context: [(5, 7)].into_iter().collect(),
        };
        for value in [None, Some((b"hello".to_vec(), 42))] {
            let reply = ReadReply {
                partition: 3,
                index: 1,
                value: value.clone(),
                token: CausalToken::default(),
                context: context.clone(),
                known: value.is_some(),
                served_by: "10.0.0.1:8080".into(),
                siblings: siblings.clone(),
            };
            let value_known = value.is_some();
            let old = Derived {
                partition: 3,
                index: 1,
                value,
                token: CausalToken::default(),
                context: context.clone(),
                known: value_known,
                served_by: "10.0.0.1:8080".into(),
                siblings: siblings.clone(),
            };
            let bytes = encode(&reply);
            assert_eq!(bytes, encode(&old));
            assert_eq!(decode::<ReadReply>(&bytes).expect("decode"), reply);
        }
    }

    #[test]
    fn envelopes_round_trip() {
        let env = Envelope {
            from: "10.0.0.1:8080".into(),
            epoch: 3,
            body: Request::Sync(SyncRequest {
                partition: 1,
                have: [(5, 7)].into_iter().collect::<VersionVector>(),
                max_entries: 10,
                max_bytes: 100,
            }),
        };
        let back: Envelope = decode(&encode(&env)).expect("decodes");
        assert_eq!(back.from, env.from);
        assert!(matches!(back.body, Request::Sync(s) if s.have.get(5) == 7));
    }

    #[test]
    fn garbage_does_not_decode() {
        assert!(decode::<Envelope>(&[0xff, 0xff, 0xff]).is_err());
    }
}
