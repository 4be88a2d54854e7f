//! What a client write replaces, and the condition it may put on the key's state; pure.
//!
//! The seed dialects show one value per key, and their writes replace whatever the
//! accepting replica holds ([`Supersedes::Everything`]): concurrent writes at different
//! replicas still become siblings, of which those dialects show one winner. The own API
//! (`/api/v1`) shows every sibling with one *key context* (the key's
//! [`KeyState::history`]), and its writes replace exactly what that context names
//! ([`Supersedes::Seen`]): a write that carries the context of a read supersedes the
//! siblings the read returned and keeps any written since; a write without one adds a
//! sibling. See `keystate` for how the two kinds of versions coexist.
//!
//! A [`Condition`] is checked against the accepting replica's state in the same batch
//! that applies the write, so it is atomic at that replica. Before that the replica asks
//! its peers what they hold of the key and catches up with it (`Node::write_local`), so
//! a write another client made through another replica a moment earlier is seen once it
//! reached any replica that answers. It is still not a cluster-wide compare-and-set: two
//! conditional writes accepted at the same time by different replicas can both succeed
//! and become siblings (each replaced only what it saw, so nothing is silently lost),
//! and a replica cut off from its peers checks against what it holds. A quorum write
//! (`w`) does not change that.

use serde::{Deserialize, Serialize};

use crate::clock::VersionVector;
use crate::error::{Error, ErrorKind};
use crate::keystate::KeyState;

/// Most versions a key may hold after a write that adds a sibling: beyond it such a
/// write is refused (409) until a write with a read's context resolves them. Without a
/// bound, a client that never sends contexts would grow a key without end (every
/// read returns every sibling).
pub const MAX_SIBLINGS: usize = 64;

/// How a client write treats the key's existing versions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteMode {
    pub supersedes: Supersedes,
    /// Checked against the key's state at the accepting replica before it applies the
    /// write.
    pub condition: Option<Condition>,
}

/// Which existing versions of the key a write replaces.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Supersedes {
    /// Everything the accepting replica holds and the client has seen (the seeds).
    #[default]
    Everything,
    /// Exactly the writes this key context names (the own API); empty: none, the
    /// write adds a sibling.
    Seen(VersionVector),
}

/// A precondition on the key's state at the accepting replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    /// The key has no version the write's context does not name: nothing was written
    /// (or deleted) since the client read it.
    Unchanged,
    /// The key has no value (it never existed, or every sibling is a delete).
    Absent,
}

impl WriteMode {
    /// Whether the write may be applied to `state`: its condition holds and it leaves
    /// at most [`MAX_SIBLINGS`] versions.
    pub fn admits(&self, state: &KeyState) -> Result<(), Error> {
        if let Some(condition) = self.condition {
            condition.check(state, &self.supersedes)?;
        }
        if let Supersedes::Seen(context) = &self.supersedes {
            let kept = state
                .versions
                .iter()
                .filter(|v| !context.contains(v.dot))
                .count();
            if kept >= MAX_SIBLINGS {
                return Err(Error::conflict(format!(
                    "the key has {kept} concurrent versions, the most it may hold is \
                     {MAX_SIBLINGS}: read it and write with the read's context to resolve them"
                )));
            }
        }
        Ok(())
    }
}

impl Condition {
    /// Whether `state` meets the condition for a write that supersedes `seen`; the
    /// error a client gets when it does not.
    pub fn check(self, state: &KeyState, seen: &Supersedes) -> Result<(), Error> {
        let met = match (self, seen) {
            (Condition::Absent, _) => !state.has_value(),
            (Condition::Unchanged, Supersedes::Seen(context)) => {
                state.versions.iter().all(|v| context.contains(v.dot))
            }
            // A write that replaces everything has no context to compare with.
            (Condition::Unchanged, Supersedes::Everything) => {
                return Err(Error::bad_request(
                    "the condition \"unchanged\" needs the key's context",
                ))
            }
        };
        if met {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::PreconditionFailed,
                match self {
                    Condition::Unchanged => "the key changed since the context was read",
                    Condition::Absent => "the key exists",
                },
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystate::tests::version;

    fn state(versions: Vec<crate::keystate::Version>) -> KeyState {
        let mut s = KeyState::default();
        for v in versions {
            s.merge(&KeyState { versions: vec![v] });
        }
        s
    }

    #[test]
    fn unchanged_means_every_version_is_in_the_context() {
        let s = state(vec![version(1, 1, &[], 5), version(2, 1, &[], 6)]);
        let seen = Supersedes::Seen(s.history());
        assert!(Condition::Unchanged.check(&s, &seen).is_ok());
        let partial = Supersedes::Seen([(1, 1)].into_iter().collect());
        let err = Condition::Unchanged.check(&s, &partial).unwrap_err();
        assert_eq!(err.kind, ErrorKind::PreconditionFailed);
        assert_eq!(
            Condition::Unchanged
                .check(&s, &Supersedes::Everything)
                .unwrap_err()
                .kind,
            ErrorKind::BadRequest
        );
    }

    #[test]
    fn siblings_are_bounded_until_a_context_resolves_them() {
        let mut s = KeyState::default();
        for i in 1..=MAX_SIBLINGS as u64 {
            let mut v = version(i, 1, &[], 5);
            v.vv = VersionVector::new();
            s.merge(&KeyState { versions: vec![v] });
        }
        assert_eq!(s.versions.len(), MAX_SIBLINGS);
        let blind = WriteMode {
            supersedes: Supersedes::Seen(VersionVector::new()),
            condition: None,
        };
        assert_eq!(blind.admits(&s).unwrap_err().kind, ErrorKind::Conflict);
        let resolving = WriteMode {
            supersedes: Supersedes::Seen(s.history()),
            condition: None,
        };
        assert!(resolving.admits(&s).is_ok());
        assert!(
            WriteMode::default().admits(&s).is_ok(),
            "the seeds' writes replace all"
        );
    }

    #[test]
    fn absent_means_no_live_sibling() {
        let mut tomb = version(1, 1, &[], 5);
        tomb.value = None;
        let any = Supersedes::Seen(VersionVector::new());
        assert!(Condition::Absent.check(&KeyState::default(), &any).is_ok());
        assert!(Condition::Absent.check(&state(vec![tomb]), &any).is_ok());
        let live = state(vec![version(1, 1, &[], 5)]);
        assert_eq!(
            Condition::Absent.check(&live, &any).unwrap_err().kind,
            ErrorKind::PreconditionFailed
        );
    }
}
