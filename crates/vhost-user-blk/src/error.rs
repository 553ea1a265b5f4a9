//! Errors of the target's administrative calls.

use std::path::PathBuf;

/// What went wrong serving, stopping or resizing an export.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The settings are unusable.
    #[error("invalid vhost-user settings: {0}")]
    Settings(String),
    /// An export of this name exists already.
    #[error("volume {0} is already exported over vhost-user")]
    AlreadyExported(String),
    /// No export of this name.
    #[error("volume {0} is not exported over vhost-user")]
    NotExported(String),
    /// The target is shutting down.
    #[error("the vhost-user target is shut down")]
    ShutDown,
    /// The socket could not be created.
    #[error("create the vhost-user socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("start a vhost-user thread")]
    Thread(#[source] std::io::Error),
}
