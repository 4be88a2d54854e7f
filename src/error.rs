//! The error type at the boundary between the node and its client dialects.
//!
//! Callers decide on the [`ErrorKind`]; each dialect maps kinds to status codes in one
//! place (for `/kv-store`, `api::kv_store::status_of`).

use crate::storage::StorageError;

/// What the caller can do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ErrorKind {
    /// The request is wrong; retrying it unchanged will fail again.
    BadRequest,
    /// The request is too large.
    TooLarge,
    /// The client took too long to send its request.
    Timeout,
    /// The thing asked for does not exist.
    NotFound,
    /// The request needs a credential it did not carry (or carried a wrong one), e.g.
    /// the admin token for a membership change.
    Unauthorized,
    /// The request conflicts with the cluster's state (e.g. adding a node that is
    /// already a member); retrying it unchanged will fail again.
    Conflict,
    /// Nobody who can answer is reachable now; retrying later may work. For a write:
    /// it was certainly not applied, so another replica may be asked to take it.
    Unavailable,
    /// A bug or a broken disk.
    Internal,
    /// A write whose outcome is unknown: it may have been applied (its record may be on
    /// a replica's disk, or a replica may have received it and not answered) or not.
    /// Never retried on another replica: applied twice, the late copy could win over the
    /// client's later writes. The client may retry (a retry is a new write).
    OutcomeUnknown,
    /// The path exists but not for this method.
    MethodNotAllowed,
    /// A read whose causal context names writes that no replica reachable within the
    /// deadline has received (seed 003 answers 400 "Unable to satisfy request"; the
    /// other dialects, like any replica that cannot serve now, 503).
    Unsatisfiable,
    /// A conditional write whose condition the key's state did not meet
    /// (`writemode::Condition`); retrying it unchanged will fail again.
    PreconditionFailed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    /// The view change the node refused, when that is the error: dialects that word
    /// refusals their own way (seed 002's "Socket address already exists in the view")
    /// read it. Local only: never sent to peers.
    #[serde(skip)]
    pub refused: Option<crate::placement::ChangeError>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            refused: None,
        }
    }
    /// This error, marked as the refusal of `change`.
    pub fn refusing(mut self, change: crate::placement::ChangeError) -> Self {
        self.refused = Some(change);
        self
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }
}

impl From<StorageError> for Error {
    /// A disk that refuses writes or cannot serve now is retryable elsewhere; a commit
    /// that failed half way has an unknown outcome; the rest are bugs or corruption.
    fn from(e: StorageError) -> Self {
        let kind = match e {
            StorageError::NotApplied(_) | StorageError::Degraded(_) => ErrorKind::Unavailable,
            StorageError::OutcomeUnknown(_) => ErrorKind::OutcomeUnknown,
            StorageError::Engine(_) | StorageError::Corrupt { .. } | StorageError::Damaged(_) => {
                ErrorKind::Internal
            }
        };
        Self::new(kind, e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
