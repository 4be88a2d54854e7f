//! A write's own causal context as a string, for dialects that show each write's
//! version (seed 002's `version` and `causal-metadata`), and the view a token needs.
//!
//! # Design
//!
//! A client token (`clock::CausalToken`) normally carries the newest view epoch its
//! holder has seen, stamped by whichever node answered, and drops partitions that no
//! longer exist; two nodes may therefore write the same observations as different
//! strings. A *version string* is instead a pure function of one write: the token whose
//! observations are exactly the write's context (`replica::Version::context`), with no
//! epoch, encoded and tagged like any token. Every replica that holds the write derives
//! the same string, before and after view changes, and it is still a token the cluster
//! accepts back as a causal context.
//!
//! What such a token lacks is the epoch. A node learns that it is behind from the token
//! anyway when the token names a partition its view does not know yet (partitions are
//! named by uids drawn in order, so a uid at or past the view's next uid is from a newer
//! view): [`Node::epoch_needed`] then asks for a newer view before the request is routed.

use std::collections::BTreeMap;

use super::Node;
use crate::clock::{CausalToken, PartitionUid, VersionVector};
use crate::error::{Error, Result};
use crate::keycontext;

impl Node {
    /// The version string of a write whose context is `context` (see the module doc).
    pub fn encode_context(
        &self,
        context: &BTreeMap<PartitionUid, VersionVector>,
    ) -> Result<String> {
        let keys = self.token_keys()?;
        let token = CausalToken {
            cluster: keys.id,
            epoch: 0,
            parts: context.clone(),
        };
        Ok(token.encode(&keys.token_key))
    }

    /// The own API's context string of `key`'s `history` (see `keycontext`).
    pub fn encode_key_context(&self, key: &str, history: &VersionVector) -> Result<String> {
        let keys = self.token_keys()?;
        Ok(keycontext::encode(keys.id, key, history, &keys.token_key))
    }

    /// The history a client's context string of `key` names; it must be one this
    /// cluster issued for that key, unaltered. Waits like [`Node::parse_token`] while
    /// this node obtains the cluster key.
    pub async fn parse_key_context(&self, key: &str, text: &str) -> Result<VersionVector> {
        self.current().view()?;
        let keys = self.wait_for_keys().await?;
        keycontext::decode(text, keys.id, key, &keys.token_key)
            .map_err(|e| Error::bad_request(e.to_string()))
    }

    /// The view epoch this node must reach before it routes a request carrying `token`:
    /// the token's own, or the next one when the token names a partition this node's
    /// view (and the change it is in) does not know yet.
    pub(super) fn epoch_needed(&self, token: &CausalToken) -> u64 {
        let cur = self.current();
        let Some(view) = &cur.view else {
            return token.epoch;
        };
        let newest = cur.transition.as_ref().map_or(&**view, |t| t.to());
        let unknown = token.parts.keys().any(|&uid| uid >= newest.next_uid);
        if unknown {
            token.epoch.max(newest.epoch.saturating_add(1))
        } else {
            token.epoch
        }
    }
}
