//! Bringing a nexus back from its record after a restart or crash.

use std::sync::Arc;

use strata_bdev::BlockDevice;

use crate::dirty::DirtyMap;
use crate::error::NexusError;
use crate::nexus::{capabilities_of, geometry_of, Nexus};
use crate::ops::Absent;
use crate::record::{ChildRecord, Ledger, NexusRecord, RecordedState};
use crate::settings::NexusSettings;
use crate::status::{ChildState, RestoreChild};

impl Nexus {
    /// Bring back a nexus from its last durable `record` (`None` for a new nexus), recording
    /// every change in `ledger` from now on.
    ///
    /// - A new nexus takes its first child as holding current data and fully rebuilds the others.
    /// - With a record, children it lists as online are online; faulted and offline ones stay so,
    ///   remembering what they missed; a rebuild in progress resumes; children it does not know
    ///   get a full rebuild; children it lists and `children` lacks are dropped.
    /// - A child whose device could not be opened is faulted with the open error; onlining it
    ///   later needs a device ([`Nexus::replace_device`]).
    ///
    /// Fails when no child known to hold current data has a device: serving would risk returning
    /// stale data. Must be called within a tokio runtime when rebuilds are to start.
    pub fn restore(
        name: impl Into<String>,
        children: Vec<RestoreChild>,
        record: Option<&NexusRecord>,
        settings: NexusSettings,
        ledger: Option<Arc<dyn Ledger>>,
    ) -> Result<Nexus, NexusError> {
        let name = name.into();
        let fail = |reason: String| NexusError::Restore {
            nexus: name.clone(),
            reason,
        };
        let present: Vec<(String, Arc<dyn BlockDevice>)> = children
            .iter()
            .filter_map(|c| c.device.as_ref().ok().map(|d| (c.name.clone(), d.clone())))
            .collect();
        if children.is_empty() {
            return Err(NexusError::NoChildren { nexus: name });
        }
        if present.is_empty() {
            let errors: Vec<String> = children
                .iter()
                .filter_map(|c| {
                    c.device
                        .as_ref()
                        .err()
                        .map(|e| format!("{}: {}", c.name, e.chain()))
                })
                .collect();
            return Err(fail(format!(
                "no child could be opened ({})",
                errors.join("; ")
            )));
        }
        let geometry = restored_geometry(&present, record).map_err(fail)?;
        let caps = capabilities_of(&present);
        let (size, gran) = (geometry.size, settings.dirty_granularity.max(1));
        let mut slots = Vec::with_capacity(children.len());
        for (i, child) in children.into_iter().enumerate() {
            let known = record.map(|r| (r, r.child(&child.name)));
            let (dev, state, dirty) = match child.device {
                Ok(dev) => {
                    let (state, dirty) = recorded_state(i, known, size, gran);
                    (dev, state, dirty)
                }
                Err(e) => {
                    let reason = format!("open: {}", e.chain());
                    if known.is_none() && i == 0 {
                        return Err(fail(format!(
                            "child {} holds the data a new nexus starts from, and it cannot be \
                             opened: {reason}",
                            child.name
                        )));
                    }
                    let dirty = missed_while_absent(known, size, gran);
                    let absent: Arc<dyn BlockDevice> = Arc::new(Absent {
                        geometry,
                        caps,
                        why: format!("child {} is not open ({reason})", child.name),
                    });
                    (absent, ChildState::Faulted(reason), dirty)
                }
            };
            // Nothing known about what a child missed: it may have missed anything.
            let dirty = match state {
                ChildState::Online => None,
                _ => Some(dirty.unwrap_or_else(|| DirtyMap::full(size, gran))),
            };
            slots.push((child.name, dev, state, dirty));
        }
        if !slots.iter().any(|(_, _, s, _)| *s == ChildState::Online) {
            let states: Vec<String> = slots
                .iter()
                .map(|(n, _, s, _)| format!("{n}: {s}"))
                .collect();
            return Err(fail(format!(
                "no child known to hold current data can be used ({}); bring one of the \
                 children last recorded as online back",
                states.join(", ")
            )));
        }
        let version = record.map_or(0, |r| r.version) + 1;
        let rebuilding: Vec<String> = slots
            .iter()
            .filter(|(_, _, s, _)| *s == ChildState::Rebuilding)
            .map(|(n, _, _, _)| n.clone())
            .collect();
        let runtime = if rebuilding.is_empty() {
            None
        } else {
            Some(
                tokio::runtime::Handle::try_current().map_err(|_| NexusError::NoRuntime {
                    nexus: name.clone(),
                })?,
            )
        };
        let nexus = Nexus::assemble(name, geometry, caps, settings, ledger, version, slots)?;
        if let Some(runtime) = runtime {
            let mut state = nexus.shared.lock();
            for child in rebuilding {
                let i = state.index(&nexus.shared.name, &child)?;
                let id = state.children[i].id;
                nexus.start_rebuild(&mut state, id, &runtime);
            }
        }
        Ok(nexus)
    }
}

/// What the record says of a child given to [`Nexus::restore`] (`None`: the record does not
/// know it; the child's position decides for a new nexus): its state, and what it missed.
type Known<'a> = Option<(&'a NexusRecord, Option<&'a ChildRecord>)>;

/// The state and missed regions of a child whose device is open.
fn recorded_state(
    i: usize,
    known: Known<'_>,
    size: u64,
    gran: u64,
) -> (ChildState, Option<DirtyMap>) {
    let map = |r: &NexusRecord, c: &ChildRecord| r.dirty_map(c, size, gran);
    match known {
        None if i == 0 => (ChildState::Online, None),
        None | Some((_, None)) => (ChildState::Rebuilding, None),
        Some((r, Some(c))) => match &c.state {
            RecordedState::Online => (ChildState::Online, None),
            RecordedState::Rebuilding => (ChildState::Rebuilding, map(r, c)),
            RecordedState::Faulted(reason) => (ChildState::Faulted(reason.clone()), map(r, c)),
            RecordedState::Offline => (ChildState::Offline, map(r, c)),
        },
    }
}

/// What a child whose device cannot be opened is known to have missed.
fn missed_while_absent(known: Known<'_>, size: u64, gran: u64) -> Option<DirtyMap> {
    match known {
        None | Some((_, None)) => None,
        // Current until now: it has missed nothing yet.
        Some((_, Some(c))) if c.state == RecordedState::Online => Some(DirtyMap::new(size, gran)),
        Some((r, Some(c))) => r.dirty_map(c, size, gran),
    }
}

/// The geometry of a restored nexus: its children's, at the size clients have seen.
fn restored_geometry(
    present: &[(String, Arc<dyn BlockDevice>)],
    record: Option<&NexusRecord>,
) -> Result<strata_bdev::Geometry, String> {
    let mut geometry = geometry_of(present);
    if let Some(r) = record {
        if r.size > geometry.size {
            let small = present
                .iter()
                .min_by_key(|(_, d)| d.geometry().size)
                .map(|(n, d)| format!("{n} has {} bytes", d.geometry().size))
                .unwrap_or_default();
            return Err(format!(
                "the nexus has {} bytes but {small}; give it a child at least that large",
                r.size
            ));
        }
        // Keep the size clients have seen, even if every remaining child is larger.
        geometry.size = r.size;
    }
    Ok(geometry)
}
