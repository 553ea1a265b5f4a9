//! How the daemon's operations fail: a kind each front end maps (gRPC codes), and a message a
//! person can act on.

use crate::daemon::state::StateError;

/// How an operation failed, so that each front end reports it its own way (gRPC codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Invalid,
    NotFound,
    Exists,
    Precondition,
    Unavailable,
    Unimplemented,
    Internal,
}

/// A failed operation: its kind and a message a person can act on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    pub kind: OpKind,
    pub message: String,
}

impl OpError {
    pub fn new(kind: OpKind, message: impl Into<String>) -> OpError {
        OpError {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> OpError {
        OpError::new(OpKind::Invalid, message)
    }

    pub fn not_found(message: impl Into<String>) -> OpError {
        OpError::new(OpKind::NotFound, message)
    }

    pub fn precondition(message: impl Into<String>) -> OpError {
        OpError::new(OpKind::Precondition, message)
    }

    /// The same error, its message prefixed with what was being done.
    pub fn context(self, what: &str) -> OpError {
        OpError::new(self.kind, format!("{what}: {}", self.message))
    }
}

impl From<StateError> for OpError {
    fn from(e: StateError) -> OpError {
        let kind = match e {
            StateError::Unavailable { .. } => OpKind::Unavailable,
            StateError::Failed { .. } => OpKind::Internal,
        };
        OpError::new(kind, e.to_string())
    }
}

impl From<strata_bdev::Error> for OpError {
    fn from(e: strata_bdev::Error) -> OpError {
        OpError::new(OpKind::of(e.kind()), e.chain())
    }
}

impl OpKind {
    /// The kind a device or page-store error is.
    pub fn of(kind: strata_bdev::ErrorKind) -> OpKind {
        use strata_bdev::ErrorKind as K;
        match kind {
            K::InvalidInput | K::OutOfRange | K::TooLarge => OpKind::Invalid,
            K::PermissionDenied | K::Conflict => OpKind::Precondition,
            K::Io | K::TimedOut | K::Shutdown | K::NoSpace => OpKind::Unavailable,
            K::Unsupported => OpKind::Unimplemented,
            K::NotFound => OpKind::NotFound,
            K::AlreadyExists => OpKind::Exists,
            _ => OpKind::Internal,
        }
    }
}

impl From<strata_nexus::NexusError> for OpError {
    fn from(e: strata_nexus::NexusError) -> OpError {
        use strata_nexus::NexusError as E;
        let kind = match &e {
            E::NoSuchChild { .. } => OpKind::NotFound,
            E::DuplicateChild { .. } => OpKind::Exists,
            E::InvalidSettings { .. } | E::NoChildren { .. } | E::Incompatible { .. } => {
                OpKind::Invalid
            }
            E::LastHealthy { .. }
            | E::InvalidState { .. }
            | E::NoSource { .. }
            | E::NoRebuild { .. } => OpKind::Precondition,
            _ => OpKind::Internal,
        };
        OpError::new(kind, e.to_string())
    }
}

pub type OpResult<T> = Result<T, OpError>;
