//! The own API's key context as a string: what a read of a key hands the client so a
//! later write replaces exactly the siblings it saw (`writemode::Supersedes::Seen`).
//!
//! It is the key's history ([`crate::keystate::KeyState::history`]), bound to the key
//! and the cluster and signed with the cluster's token key, like causal tokens but in
//! a domain of its own, so neither can pass for the other. Signed because a forged
//! history could name writes that never happened (a huge counter) and would then
//! supersede writes still to come; bound to the key because another key's history
//! would replace writes this client never saw.

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::clock::{TokenKey, VersionVector};

/// Wire prefix; bump it when the encoding changes.
pub(crate) const PREFIX: &str = "k1.";
/// The signing domain (see `TokenKey::tag_in`).
pub(crate) const DOMAIN: &str = "kvs key context v1";
/// Longest context string decoded (the history of one key has an entry per replica
/// that ever wrote it; this is thousands).
pub const MAX_CONTEXT_LEN: usize = 16 * 1024;

#[derive(Serialize, Deserialize)]
struct Payload {
    cluster: u64,
    key_hash: u64,
    history: VersionVector,
}

/// Why a context string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("the context is malformed")]
    Malformed,
    #[error("the context is too large")]
    TooLarge,
    #[error("the context was altered, or issued for another key or cluster")]
    BadTag,
}

fn key_hash(key: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key.as_bytes())
}

/// The context string of `key`'s `history` in cluster `cluster`.
pub fn encode(cluster: u64, key: &str, history: &VersionVector, signer: &TokenKey) -> String {
    let payload = Payload {
        cluster,
        key_hash: key_hash(key),
        history: history.clone(),
    };
    // Serializing plain integers and maps into a Vec cannot fail.
    let bytes = postcard::to_stdvec(&payload).expect("context serialization is infallible");
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut out = String::from(PREFIX);
    b64.encode_string(&bytes, &mut out);
    out.push('.');
    b64.encode_string(signer.tag_in(DOMAIN, &bytes), &mut out);
    out
}

/// The history a context string of `key` in cluster `cluster` names.
pub fn decode(
    text: &str,
    cluster: u64,
    key: &str,
    signer: &TokenKey,
) -> Result<VersionVector, ContextError> {
    let text = text.trim();
    if text.len() > MAX_CONTEXT_LEN {
        return Err(ContextError::TooLarge);
    }
    let body = text.strip_prefix(PREFIX).ok_or(ContextError::Malformed)?;
    let (payload, tag) = body.split_once('.').ok_or(ContextError::Malformed)?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let bytes = b64.decode(payload).map_err(|_| ContextError::Malformed)?;
    let tag = b64.decode(tag).map_err(|_| ContextError::Malformed)?;
    if tag != signer.tag_in(DOMAIN, &bytes) {
        return Err(ContextError::BadTag);
    }
    let (payload, rest) =
        postcard::take_from_bytes::<Payload>(&bytes).map_err(|_| ContextError::Malformed)?;
    if !rest.is_empty() {
        return Err(ContextError::Malformed);
    }
    if payload.cluster != cluster || payload.key_hash != key_hash(key) {
        return Err(ContextError::BadTag);
    }
    Ok(payload.history)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::CausalToken;

    #[test]
    fn contexts_round_trip_only_for_their_key_cluster_and_signer() {
        let signer = TokenKey::derive("one");
        let history: VersionVector = [(3, 9), (4, 1)].into_iter().collect();
        let text = encode(7, "k", &history, &signer);
        assert_eq!(decode(&text, 7, "k", &signer), Ok(history.clone()));
        assert_eq!(
            decode(&text, 7, "other", &signer),
            Err(ContextError::BadTag)
        );
        assert_eq!(decode(&text, 8, "k", &signer), Err(ContextError::BadTag));
        let stranger = TokenKey::derive("two");
        assert_eq!(decode(&text, 7, "k", &stranger), Err(ContextError::BadTag));
        assert_eq!(
            decode("k1.zz", 7, "k", &signer),
            Err(ContextError::Malformed)
        );
        let long = "k".repeat(MAX_CONTEXT_LEN + 1);
        assert_eq!(decode(&long, 7, "k", &signer), Err(ContextError::TooLarge));
    }

    #[test]
    fn a_context_is_not_a_token_and_a_token_is_not_a_context() {
        let signer = TokenKey::derive("one");
        let token = CausalToken::empty(7).encode(&signer);
        let as_context = token.replacen("c2.", PREFIX, 1);
        assert!(decode(&as_context, 7, "k", &signer).is_err());
        let context = encode(7, "k", &VersionVector::new(), &signer);
        let as_token = context.replacen(PREFIX, "c2.", 1);
        assert!(CausalToken::decode(&as_token, 7, &signer).is_err());
    }
}
