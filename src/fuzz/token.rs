//! The `token` target: clients' causal tokens.

use super::*;

/// The key the token target's node holds. Any fixed key will do: the tag is checked
/// after the payload is decoded, so the decoder sees whatever a client sends.
pub(super) const TOKEN_KEY: [u8; 32] = [0x5a; 32];
/// The cluster id the token target's node has.
pub const TOKEN_CLUSTER: u64 = 0x6b76_735f_6675_7a7a;

pub(super) fn token_key() -> TokenKey {
    TokenKey::from_bytes(TOKEN_KEY)
}

/// `payload` as a node holding [`TOKEN_KEY`] would issue it: `c2.<base64>.<tag>`, the
/// tag as `clock::TokenKey` computes it (`tests/fuzz.rs` checks the two agree).
pub fn sign_token_payload(payload: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let tag = blake3::keyed_hash(&TOKEN_KEY, payload);
    format!(
        "c2.{}.{}",
        b64.encode(payload),
        b64.encode(&tag.as_bytes()[..16])
    )
}

/// `causal_payload` as a client sends it (the bytes as text), and the bytes as a payload
/// signed with the node's key.
pub fn token(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let key = token_key();
    key_context(data, &text, &key);
    let (decoded, peak) = peak_allocation(|| CausalToken::decode(&text, TOKEN_CLUSTER, &key));
    check_alloc("token", data.len(), peak);
    if let Ok(t) = decoded {
        self::decoded();
        token_round_trips(&text, &t);
    }
    if data.len() <= MAX_TOKEN_LEN {
        let signed = sign_token_payload(data);
        let (decoded, peak) = peak_allocation(|| CausalToken::decode(&signed, TOKEN_CLUSTER, &key));
        check_alloc("token", signed.len(), peak);
        if let Ok(t) = decoded {
            token_round_trips(&signed, &t);
        }
    }
}

/// The own API's key contexts share the tokens' shape (`keycontext`): the same bytes
/// as a context string, and as a payload signed as one.
fn key_context(data: &[u8], text: &str, key: &TokenKey) {
    let (decoded, peak) =
        peak_allocation(|| crate::keycontext::decode(text, TOKEN_CLUSTER, "k", key));
    check_alloc("token", data.len(), peak);
    assert!(decoded.is_err() || text.trim().len() <= crate::keycontext::MAX_CONTEXT_LEN);
    if data.len() <= crate::keycontext::MAX_CONTEXT_LEN / 2 {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let tag = key.tag_in(crate::keycontext::DOMAIN, data);
        let signed = format!(
            "{}{}.{}",
            crate::keycontext::PREFIX,
            b64.encode(data),
            b64.encode(tag)
        );
        let (decoded, peak) =
            peak_allocation(|| crate::keycontext::decode(&signed, TOKEN_CLUSTER, "k", key));
        check_alloc("token", signed.len(), peak);
        if let Ok(history) = decoded {
            // What decodes for this cluster and key is what encoding it gives back.
            let again = crate::keycontext::encode(TOKEN_CLUSTER, "k", &history, key);
            let back = crate::keycontext::decode(&again, TOKEN_CLUSTER, "k", key);
            assert_eq!(back.as_ref(), Ok(&history));
        }
    }
}

pub(super) fn token_round_trips(text: &str, t: &CausalToken) {
    let key = token_key();
    let text = text.trim();
    if text.is_empty() {
        assert_eq!(t, &CausalToken::empty(TOKEN_CLUSTER));
        return;
    }
    assert!(
        text.len() <= MAX_TOKEN_LEN,
        "a {} byte token decoded",
        text.len()
    );
    assert_eq!(t.cluster, TOKEN_CLUSTER);
    let again = t.encode(&key);
    assert!(
        again.len() <= text.len(),
        "re-encoding grew a token from {} to {} bytes",
        text.len(),
        again.len()
    );
    assert_eq!(
        CausalToken::decode(&again, TOKEN_CLUSTER, &key).as_ref(),
        Ok(t)
    );
}

/// A token over `parts` partitions of `replicas` replicas each.
pub(super) fn sample_token(parts: u32, replicas: u64) -> CausalToken {
    let mut t = CausalToken::empty(TOKEN_CLUSTER);
    t.observe_epoch(u64::from(parts) + 1);
    for p in 0..parts {
        let vv: VersionVector = (0..replicas)
            .map(|r| (0x1000_0000_0000 + r * 7919, 1 + r * 1000 + u64::from(p)))
            .collect();
        t.observe(p, &vv);
    }
    t
}

pub(super) fn token_seeds() -> Vec<Vec<u8>> {
    let key = token_key();
    let mut seeds = vec![Vec::new(), b"  ".to_vec()];
    for (parts, replicas) in [(0, 0), (1, 1), (3, 2), (8, 3), (64, 4), (400, 6)] {
        let t = sample_token(parts, replicas);
        seeds.push(t.encode(&key).into_bytes());
        // The postcard payload alone: the target also signs its input.
        seeds.push(encode(&t));
    }
    let t = sample_token(2, 2).encode(&key);
    seeds.push(format!(" {t}\n").into_bytes());
    let foreign = CausalToken::empty(TOKEN_CLUSTER + 1).encode(&key);
    seeds.push(foreign.into_bytes());
    let other_key = CausalToken::empty(TOKEN_CLUSTER).encode(&TokenKey::from_bytes([1; 32]));
    seeds.push(other_key.into_bytes());
    for garbage in ["c2.AAAA", "c2..", "c1.AA.AA", "c2.AA.AA"] {
        seeds.push(garbage.as_bytes().to_vec());
    }
    seeds
}
