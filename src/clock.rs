//! Logical time: version vectors, dots and the client's causal token.
//!
//! # Design
//!
//! Every replica has a [`ReplicaId`], a random 64-bit number drawn once when its data
//! directory is created. A write accepted by a replica gets a [`Dot`]: that replica's id
//! and the next value of its own counter. Because the id is tied to the data directory
//! and not to the address, a node whose disk was wiped comes back as a *new* replica and
//! can never reissue a dot that some other replica already holds.
//!
//! A [`VersionVector`] maps replica ids to counters. It describes a set of writes closed
//! under "earlier writes of the same origin": `{a: 3}` means writes a:1, a:2 and a:3.
//! It is a join-semilattice: [`VersionVector::merge`] is the pointwise maximum, which is
//! commutative, associative and idempotent (property-tested below).
//!
//! The [`CausalToken`] is what clients carry around (`causal_payload` in the `/kv-store`
//! dialect). It records, per partition, the version vector of everything the client has
//! observed there, so a replica can decide whether it may answer: it may when what it
//! reflects dominates the token's entry for its partition. Partitions are named by their
//! stable uid ([`PartitionUid`]), never by the index clients see, so a token stays
//! meaningful across view changes. The token also records the newest view epoch the
//! client has seen: a node whose view is older than that must catch up before it routes
//! the request, or it could answer from a partition that has handed the key over. It
//! names the cluster it was issued by, so a token from another cluster is rejected
//! instead of being silently misread.
//!
//! On the wire it is `c2.<payload>.<tag>`: the base64url (no padding) of its postcard
//! encoding, and a 128-bit keyed BLAKE3 tag over the payload with a [`TokenKey`] derived
//! from the cluster key, a random secret the cluster draws when it forms and shares only
//! among its members (`auth`). The tag matters: the token feeds into version histories,
//! so a client that could raise a counter in it could make replicas drop acknowledged
//! writes or wait forever; with the tag a client can only hand back tokens the cluster
//! issued. The cluster id a token carries is derived from that key too, so a cluster
//! re-formed on wiped disks (a new key) refuses its predecessor's tokens as foreign.
//! The prefix is a format version.
//!
//! # Caveats
//!
//! * Tokens grow with the number of (partition, replica) pairs ever seen; replicas that
//!   were wiped leave entries behind. Entries of partitions that no longer exist are
//!   dropped ([`CausalToken::retain_partitions`]).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Identity of a replica's data directory; see the module doc.
pub type ReplicaId = u64;

/// Stable identity of a partition: drawn when the partition is created, never reused
/// (see `placement`). Not the index clients see.
pub type PartitionUid = u32;

/// One write's identity: the replica that accepted it and that replica's counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub replica: ReplicaId,
    pub counter: u64,
}

/// A map from replica to the highest counter seen from it (absent = 0).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionVector(BTreeMap<ReplicaId, u64>);

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, replica: ReplicaId) -> u64 {
        self.0.get(&replica).copied().unwrap_or(0)
    }

    /// Raises the entry of `replica` to at least `counter`.
    pub fn raise(&mut self, replica: ReplicaId, counter: u64) {
        if counter == 0 {
            return;
        }
        let entry = self.0.entry(replica).or_insert(0);
        *entry = (*entry).max(counter);
    }

    /// Pointwise maximum.
    pub fn merge(&mut self, other: &VersionVector) {
        for (&replica, &counter) in &other.0 {
            self.raise(replica, counter);
        }
    }

    /// True when every write in `other` is also in `self`.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(&r, &c)| self.get(r) >= c)
    }

    /// True when the write `dot` is in the set this vector describes.
    pub fn contains(&self, dot: Dot) -> bool {
        self.get(dot.replica) >= dot.counter
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of replicas with a non-zero entry.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (ReplicaId, u64)> + '_ {
        self.0.iter().map(|(&r, &c)| (r, c))
    }
}

impl FromIterator<(ReplicaId, u64)> for VersionVector {
    fn from_iter<T: IntoIterator<Item = (ReplicaId, u64)>>(iter: T) -> Self {
        let mut vv = VersionVector::new();
        for (r, c) in iter {
            vv.raise(r, c);
        }
        vv
    }
}

/// What a client has observed, per partition. See the module doc.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CausalToken {
    /// Identity of the cluster that issued the token.
    pub cluster: u64,
    /// The newest view epoch the client has seen (0: none recorded).
    pub epoch: u64,
    pub parts: BTreeMap<PartitionUid, VersionVector>,
}

/// Why a client's token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("causal_payload is malformed")]
    Malformed,
    #[error("causal_payload was issued by another cluster")]
    Foreign,
    #[error("causal_payload was altered or not issued by this cluster")]
    BadTag,
    #[error("causal_payload is too large")]
    TooLarge,
}

/// Wire prefix; bump it when the encoding changes.
const TOKEN_PREFIX: &str = "c2.";
/// Bytes of the authentication tag kept on the wire.
const TAG_LEN: usize = 16;

/// Key that signs and checks tokens; every member derives the same one from the cluster
/// key (`auth::ClusterKey::token_key`).
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl TokenKey {
    pub fn from_bytes(key: [u8; 32]) -> Self {
        Self(key)
    }

    /// A key derived from a passphrase, for tests and benchmarks.
    pub fn derive(passphrase: &str) -> Self {
        Self(blake3::derive_key(
            "kvs 2026 causal token tag v1",
            passphrase.as_bytes(),
        ))
    }

    fn tag(&self, payload: &[u8]) -> [u8; TAG_LEN] {
        let full = blake3::keyed_hash(&self.0, payload);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full.as_bytes()[..TAG_LEN]);
        tag
    }

    /// The tag of `payload` for another kind of signed string than tokens, named by
    /// `domain`: no such string's tag is ever a token's, or another kind's.
    pub(crate) fn tag_in(&self, domain: &str, payload: &[u8]) -> [u8; TAG_LEN] {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(domain.as_bytes());
        hasher.update(&[0]);
        hasher.update(payload);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&hasher.finalize().as_bytes()[..TAG_LEN]);
        tag
    }
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

/// Encoded tokens longer than this are refused: a token holds one small entry per
/// (partition, replica), so 64 KiB is thousands of entries, far beyond any real cluster,
/// while still bounding what a client can make us decode.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

impl CausalToken {
    pub fn empty(cluster: u64) -> Self {
        Self {
            cluster,
            epoch: 0,
            parts: BTreeMap::new(),
        }
    }

    /// Records that the client has seen view `epoch`.
    pub fn observe_epoch(&mut self, epoch: u64) {
        self.epoch = self.epoch.max(epoch);
    }

    /// Drops the entries of partitions `keep` rejects (partitions that no longer exist:
    /// their keys moved to other partitions, whose replicas reflect them).
    pub fn retain_partitions(&mut self, mut keep: impl FnMut(PartitionUid) -> bool) {
        self.parts.retain(|&p, _| keep(p));
    }

    /// The entry for `partition` (empty when the client saw nothing there).
    pub fn part(&self, partition: PartitionUid) -> VersionVector {
        self.parts.get(&partition).cloned().unwrap_or_default()
    }

    /// Adds what `vv` describes to the entry of `partition`.
    pub fn observe(&mut self, partition: PartitionUid, vv: &VersionVector) {
        if vv.is_empty() {
            return;
        }
        self.parts.entry(partition).or_default().merge(vv);
    }

    /// Adds write `dot` (and so, vectors being prefixes, its origin's earlier writes) to
    /// the entry of `partition`.
    pub fn observe_dot(&mut self, partition: PartitionUid, dot: Dot) {
        self.parts
            .entry(partition)
            .or_default()
            .raise(dot.replica, dot.counter);
    }

    /// Pointwise merge of every partition's entry.
    pub fn merge(&mut self, other: &CausalToken) {
        for (&p, vv) in &other.parts {
            self.observe(p, vv);
        }
        self.observe_epoch(other.epoch);
    }

    pub fn encode(&self, key: &TokenKey) -> String {
        // Serializing plain maps of integers into a Vec cannot fail.
        // Sized for a token of a few partitions: growing from empty cost a GET about
        // 700 instructions of reallocations.
        let bytes = postcard::to_extend(self, Vec::with_capacity(128))
            .expect("token serialization is infallible");
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut out = String::with_capacity(TOKEN_PREFIX.len() + bytes.len() * 4 / 3 + 28);
        out.push_str(TOKEN_PREFIX);
        b64.encode_string(&bytes, &mut out);
        out.push('.');
        b64.encode_string(key.tag(&bytes), &mut out);
        out
    }

    /// Parses a client's token. An empty string is the empty token of `cluster`.
    pub fn decode(text: &str, cluster: u64, key: &TokenKey) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Self::empty(cluster));
        }
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge);
        }
        let body = text
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Malformed)?;
        let (payload, tag) = body.split_once('.').ok_or(TokenError::Malformed)?;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let bytes = b64.decode(payload).map_err(|_| TokenError::Malformed)?;
        let tag = b64.decode(tag).map_err(|_| TokenError::Malformed)?;
        let (token, rest) =
            postcard::take_from_bytes::<CausalToken>(&bytes).map_err(|_| TokenError::Malformed)?;
        if !rest.is_empty() {
            return Err(TokenError::Malformed);
        }
        if token.cluster != cluster {
            return Err(TokenError::Foreign);
        }
        // Not constant-time: the tag protects integrity, it is not a password, and an
        // attacker learns nothing usable from how many leading bytes matched.
        if tag != key.tag(&bytes) {
            return Err(TokenError::BadTag);
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vv() -> impl Strategy<Value = VersionVector> {
        prop::collection::vec((0u64..5, 0u64..20), 0..6).prop_map(|v| v.into_iter().collect())
    }

    fn token() -> impl Strategy<Value = CausalToken> {
        (prop::collection::btree_map(0u32..4, vv(), 0..4), 0u64..100).prop_map(|(parts, epoch)| {
            CausalToken {
                cluster: 7,
                epoch,
                parts,
            }
        })
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in vv(), b in vv()) {
            let mut ab = a.clone(); ab.merge(&b);
            let mut ba = b.clone(); ba.merge(&a);
            prop_assert_eq!(ab, ba);
        }

        #[test]
        fn merge_is_associative(a in vv(), b in vv(), c in vv()) {
            let mut left = a.clone(); left.merge(&b); left.merge(&c);
            let mut bc = b.clone(); bc.merge(&c);
            let mut right = a.clone(); right.merge(&bc);
            prop_assert_eq!(left, right);
        }

        #[test]
        fn merge_is_idempotent_and_an_upper_bound(a in vv(), b in vv()) {
            let mut aa = a.clone(); aa.merge(&a);
            prop_assert_eq!(&aa, &a);
            let mut ab = a.clone(); ab.merge(&b);
            prop_assert!(ab.dominates(&a) && ab.dominates(&b));
        }

        #[test]
        fn dominance_is_a_partial_order(a in vv(), b in vv()) {
            prop_assert!(a.dominates(&a));
            if a.dominates(&b) && b.dominates(&a) {
                prop_assert_eq!(a, b);
            }
        }

        #[test]
        fn token_round_trips(t in token()) {
            let text = t.encode(&key());
            prop_assert_eq!(CausalToken::decode(&text, 7, &key()), Ok(t));
        }

        #[test]
        fn decode_never_panics(s in ".{0,200}") {
            let _ = CausalToken::decode(&s, 7, &key());
        }

        #[test]
        fn truncated_tokens_are_rejected(t in token(), cut in 1usize..8) {
            let text = t.encode(&key());
            let short = &text[..text.len() - cut];
            prop_assert!(CausalToken::decode(short, 7, &key()).is_err());
        }

        #[test]
        fn altered_tokens_are_rejected(t in token(), r in 0u64..5, c in 1u64..1000) {
            // What a client would do to claim more than it saw: re-encode with a higher
            // counter, keeping the old tag.
            let text = t.encode(&key());
            let tag = text.rsplit('.').next().expect("has a tag").to_string();
            let mut forged = t.clone();
            forged.observe(0, &[(r, c + 100)].into_iter().collect());
            let payload = forged.encode(&key());
            let payload = payload.rsplit_once('.').expect("has a tag").0;
            let text = format!("{payload}.{tag}");
            prop_assert_eq!(CausalToken::decode(&text, 7, &key()), Err(TokenError::BadTag));
        }
    }

    fn key() -> TokenKey {
        TokenKey::derive("test secret")
    }

    #[test]
    fn empty_string_is_the_empty_token() {
        assert_eq!(
            CausalToken::decode("", 3, &key()),
            Ok(CausalToken::empty(3))
        );
        assert_eq!(
            CausalToken::decode("  ", 3, &key()),
            Ok(CausalToken::empty(3))
        );
    }

    #[test]
    fn retain_partitions_drops_dissolved_ones() {
        let mut t = CausalToken::empty(1);
        t.observe(0, &[(1, 1)].into_iter().collect());
        t.observe(3, &[(2, 1)].into_iter().collect());
        t.retain_partitions(|p| p != 3);
        assert_eq!(t.parts.keys().copied().collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn foreign_and_garbage_tokens_are_refused() {
        let t = CausalToken::empty(1).encode(&key());
        assert_eq!(CausalToken::decode(&t, 2, &key()), Err(TokenError::Foreign));
        let other = TokenKey::derive("another secret");
        assert_eq!(CausalToken::decode(&t, 1, &other), Err(TokenError::BadTag));
        for garbage in [
            "1.0.0.4", "c1.!!!", "c1.AAAA", "c1.AA.!!", "c2.AAAA", "c3.AA.AA",
        ] {
            assert_eq!(
                CausalToken::decode(garbage, 2, &key()),
                Err(TokenError::Malformed)
            );
        }
        let huge = "c2.".to_string() + &"A".repeat(MAX_TOKEN_LEN);
        assert_eq!(
            CausalToken::decode(&huge, 2, &key()),
            Err(TokenError::TooLarge)
        );
    }
}
