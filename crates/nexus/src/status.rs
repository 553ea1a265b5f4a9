//! What a nexus reports about itself: each child's state, rebuild and backlog.

use std::fmt;
use std::sync::Arc;

use strata_bdev::{BlockDevice, Error, Geometry};

use crate::rebuild::RebuildProgress;

/// The state of one child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildState {
    /// Holds current data: written to and read from.
    Online,
    /// Being copied to: written to, never read from.
    Rebuilding,
    /// Failed (the reason says how); neither written nor read. Its missed writes are recorded.
    Faulted(String),
    /// Taken out by the operator; neither written nor read. Its missed writes are recorded.
    Offline,
}

impl fmt::Display for ChildState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChildState::Online => f.write_str("online"),
            ChildState::Rebuilding => f.write_str("rebuilding"),
            ChildState::Faulted(reason) => write!(f, "faulted: {reason}"),
            ChildState::Offline => f.write_str("offline"),
        }
    }
}

/// One child in a [`NexusStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildStatus {
    /// The child's name (its URI).
    pub name: String,
    pub state: ChildState,
    /// The current or last rebuild onto this child.
    pub rebuild: Option<RebuildProgress>,
    /// Bytes recorded as missed (dirty) while the child was away, if a map is kept for it.
    pub dirty_bytes: Option<u64>,
    /// I/O sent to the child and not yet answered.
    pub outstanding: usize,
}

/// A snapshot of a nexus and its children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NexusStatus {
    pub name: String,
    pub geometry: Geometry,
    pub children: Vec<ChildStatus>,
}

impl NexusStatus {
    /// The child named `name`.
    pub fn child(&self, name: &str) -> Option<&ChildStatus> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Some child is not online.
    pub fn is_degraded(&self) -> bool {
        self.children.iter().any(|c| c.state != ChildState::Online)
    }
}

/// A child given to [`Nexus::restore`](crate::Nexus::restore): its name and its device, or why it could not be opened.
#[derive(Debug)]
pub struct RestoreChild {
    pub name: String,
    pub device: Result<Arc<dyn BlockDevice>, Error>,
}
