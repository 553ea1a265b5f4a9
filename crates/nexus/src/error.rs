//! How control operations on a nexus fail.

use crate::status::ChildState;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NexusError {
    #[error("create nexus {nexus}: no children")]
    NoChildren { nexus: String },
    #[error("nexus {nexus}: invalid settings: {reason}")]
    InvalidSettings { nexus: String, reason: String },
    #[error("nexus {nexus}: no child named {child:?}")]
    NoSuchChild { nexus: String, child: String },
    #[error("nexus {nexus}: a child named {child:?} already exists")]
    DuplicateChild { nexus: String, child: String },
    #[error("nexus {nexus}: child {child:?} does not fit: {reason}")]
    Incompatible {
        nexus: String,
        child: String,
        reason: String,
    },
    #[error("nexus {nexus}: {action} child {child:?}: it is the last healthy child")]
    LastHealthy {
        nexus: String,
        child: String,
        action: &'static str,
    },
    #[error("nexus {nexus}: {action} child {child:?}: it is {state}")]
    InvalidState {
        nexus: String,
        child: String,
        action: &'static str,
        state: ChildState,
    },
    #[error("nexus {nexus}: rebuild child {child:?}: no healthy child to copy from")]
    NoSource { nexus: String, child: String },
    #[error("nexus {nexus}: child {child:?} has no rebuild running")]
    NoRebuild { nexus: String, child: String },
    #[error("nexus {nexus}: starting a rebuild needs a tokio runtime")]
    NoRuntime { nexus: String },
    #[error("restore nexus {nexus}: {reason}")]
    Restore { nexus: String, reason: String },
}
