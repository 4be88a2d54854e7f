//! The cluster key and what is derived from it: the credential members present on every
//! internal call, the key that signs clients' causal tokens, and the cluster's identity
//! in those tokens. Pure: no I/O, no clock; randomness comes in as bytes.
//!
//! # Design
//!
//! Membership is the trust boundary. The seeds start nodes with no shared secret at all,
//! so a secret configured by the operator (`CLUSTER_SECRET`) cannot be what separates
//! members from everyone else, and the address a call claims to come from proves nothing
//! to a node that shares its host (any local process may bind any 127.0.0.x source
//! address), nor to a multi-homed one (its calls may leave from another interface).
//!
//! So every cluster makes its own secret when it first forms: a [`ClusterKey`] of 32
//! random bytes, drawn by one designated member ([`generator`]) once every other member
//! has answered that it holds none, persisted by every member, and handed only to
//! members. From it are derived, by BLAKE3 in key-derivation mode with distinct contexts:
//!
//! * the **member proof** ([`ClusterKey::member_proof`]), which every internal call
//!   carries and the receiver checks in constant time;
//! * the **token key** ([`ClusterKey::token_key`]), which tags clients' causal tokens, so
//!   nobody outside the cluster can make one;
//! * the **cluster id** ([`ClusterKey::id`]) that tokens carry: a cluster re-formed on
//!   wiped disks draws a new key, so tokens of its predecessor are refused as foreign.
//!
//! The key travels only to a member's own listening address (see `node::keys`): a node
//! asks a member for it with a nonce, and the member delivers it by calling the asker's
//! address from the view, quoting the nonce. Whoever forges a member's source address
//! gets nothing (the delivery goes to the real member), and a delivery not quoting a
//! nonce the node sent is refused, so nobody can plant a key either.
//!
//! # Caveats
//!
//! * The proof travels in clear text with each call: anyone who can read the traffic
//!   between members can pose as one. Run clusters on private networks (as the seeds do)
//!   or behind TLS.
//! * A node in no cluster yet (started without `VIEW`, or removed) has no key to check
//!   calls with: it trusts the first cluster that adds it.

use serde::{Deserialize, Serialize};

use crate::clock::TokenKey;

/// Bytes of a [`ClusterKey`].
pub const KEY_LEN: usize = 32;

/// Bytes of the nonce of a key request: unguessable, so a delivery quoting it answers it.
pub const NONCE_LEN: usize = 16;

/// A cluster's secret; see the module doc. Its `Debug` output hides the bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterKey([u8; KEY_LEN]);

/// Nonce of a key request.
pub type Nonce = [u8; NONCE_LEN];

impl ClusterKey {
    /// The key made of `random` (the caller draws the bytes).
    pub fn from_bytes(random: [u8; KEY_LEN]) -> Self {
        Self(random)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn derive(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.0)
    }

    /// The credential a member presents on internal calls (lowercase hex, a header
    /// value).
    pub fn member_proof(&self) -> String {
        hex(&self.derive("kvs 2026 internal call member proof v1"))
    }

    /// The key that tags clients' causal tokens.
    pub fn token_key(&self) -> TokenKey {
        TokenKey::from_bytes(self.derive("kvs 2026 causal token tag v2"))
    }

    /// The cluster's identity in causal tokens.
    pub fn id(&self) -> u64 {
        let d = self.derive("kvs 2026 cluster id v1");
        u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    }
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterKey(id {:016x})", self.id())
    }
}

/// The one member of a view that may draw a new cluster key: its first member. Only one
/// node ever draws, and only after every other member said it holds none, so a cluster
/// never ends up with two keys.
pub fn generator(members: &[String]) -> Option<&str> {
    members.first().map(String::as_str)
}

/// Compares two secrets without an early exit, so timing does not reveal a prefix.
pub fn secrets_match(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::CausalToken;

    #[test]
    fn derived_values_are_distinct_stable_and_hidden() {
        let a = ClusterKey::from_bytes([1; KEY_LEN]);
        let b = ClusterKey::from_bytes([2; KEY_LEN]);
        assert_eq!(a.member_proof(), a.clone().member_proof());
        assert_ne!(a.member_proof(), b.member_proof());
        assert_ne!(a.id(), b.id());
        assert_eq!(a.member_proof().len(), 64);
        assert!(a.member_proof().bytes().all(|c| c.is_ascii_hexdigit()));
        // The proof is not the key, and Debug shows neither.
        assert_ne!(a.member_proof(), hex(a.as_bytes()));
        assert!(!format!("{a:?}").contains(&hex(a.as_bytes())));
        assert!(!format!("{a:?}").contains(&a.member_proof()));
    }

    #[test]
    fn tokens_of_one_cluster_are_refused_by_another() {
        let old = ClusterKey::from_bytes([7; KEY_LEN]);
        let new = ClusterKey::from_bytes([8; KEY_LEN]);
        let mut t = CausalToken::empty(old.id());
        t.observe(0, &[(5, 3)].into_iter().collect());
        let text = t.encode(&old.token_key());
        assert_eq!(
            CausalToken::decode(&text, old.id(), &old.token_key()),
            Ok(t)
        );
        assert!(CausalToken::decode(&text, new.id(), &new.token_key()).is_err());
        // Even a token that claims the new cluster's id cannot be made without its key.
        let mut forged = CausalToken::empty(new.id());
        forged.observe(0, &[(5, 3)].into_iter().collect());
        let forged = forged.encode(&old.token_key());
        assert!(CausalToken::decode(&forged, new.id(), &new.token_key()).is_err());
    }

    #[test]
    fn the_first_member_generates() {
        let members = ["b:1", "a:1"].map(String::from);
        assert_eq!(generator(&members), Some("b:1"));
        assert_eq!(generator(&[]), None);
    }

    #[test]
    fn secret_comparison() {
        assert!(secrets_match(b"abc", b"abc"));
        assert!(!secrets_match(b"abd", b"abc"));
        assert!(!secrets_match(b"ab", b"abc"));
    }
}
