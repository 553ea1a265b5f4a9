//! The durable record of which children hold current data, and the [`Ledger`] that stores it.
//!
//! A nexus with a ledger never acknowledges a write that some child missed until a record saying
//! so is durable: the child's state and the regions it missed. After a crash or restart,
//! [`Nexus::restore`](crate::Nexus::restore) rebuilds the nexus from that record, so a stale child
//! is neither read from nor used as a rebuild source, and it heals by copying only what it missed.
//!
//! Saves are grouped: writes that need a newer record than the one on disk queue behind the save
//! in progress, and the next save covers all of them.

use async_trait::async_trait;

use crate::dirty::DirtyMap;

/// A child's state as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedState {
    /// Holds current data.
    Online,
    /// Was being rebuilt: stale in the recorded regions; the rebuild resumes on restore.
    Rebuilding,
    /// Failed, for this reason: stale in the recorded regions.
    Faulted(String),
    /// Taken out by the operator: stale in the recorded regions.
    Offline,
}

/// One child in a [`NexusRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildRecord {
    /// The child's name (its URI).
    pub name: String,
    pub state: RecordedState,
    /// Runs `[first, end)` of dirty granules (of [`NexusRecord::granularity`] bytes) the child
    /// missed; `None` for an online child, or when what it missed is unknown (the whole device).
    pub dirty: Option<Vec<(u64, u64)>>,
}

/// Everything needed to restore a nexus's children safely after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NexusRecord {
    /// Grows with every change; a save never replaces a newer record with an older one.
    pub version: u64,
    /// The nexus's size in bytes.
    pub size: u64,
    /// Bytes per dirty granule.
    pub granularity: u64,
    pub children: Vec<ChildRecord>,
}

impl NexusRecord {
    /// The child named `name`.
    pub fn child(&self, name: &str) -> Option<&ChildRecord> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The dirty map of `child` converted to `granularity` (a granule is dirty if any recorded
    /// dirty byte falls in it); `None` when the record says nothing about what it missed.
    pub(crate) fn dirty_map(
        &self,
        child: &ChildRecord,
        size: u64,
        granularity: u64,
    ) -> Option<DirtyMap> {
        let runs = child.dirty.as_ref()?;
        let mut map = DirtyMap::new(size, granularity);
        for &(first, end) in runs {
            let offset = first.saturating_mul(self.granularity);
            let end = end.saturating_mul(self.granularity).min(size);
            if end > offset {
                map.mark(offset, end - offset);
            }
        }
        Some(map)
    }
}

/// Where a nexus saves its [`NexusRecord`]. `save` returns only once the record is durable
/// (written and synced); the nexus never asks for two saves at once.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    async fn save(&self, record: &NexusRecord) -> std::io::Result<()>;
}
