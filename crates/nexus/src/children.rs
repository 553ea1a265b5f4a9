//! A nexus's child lifecycle: add, remove, offline, fault, online (with its rebuild), device
//! replacement, timeouts, and rebuild control.

use std::sync::Arc;
use std::time::Duration;

use strata_bdev::BlockDevice;

use crate::dirty::DirtyMap;
use crate::error::NexusError;
use crate::nexus::{misfit, Nexus, Slot, State};
use crate::ops::Absent;
use crate::rebuild::{self, Control, RebuildCtl, RebuildKind, RebuildOutcome, RebuildState};
use crate::status::ChildState;

impl Nexus {
    fn err_state(&self, child: &Slot, action: &'static str) -> NexusError {
        NexusError::InvalidState {
            nexus: self.shared.name.clone(),
            child: child.name.to_string(),
            action,
            state: child.state.clone(),
        }
    }

    fn err_last(&self, child: &str, action: &'static str) -> NexusError {
        NexusError::LastHealthy {
            nexus: self.shared.name.clone(),
            child: child.to_string(),
            action,
        }
    }

    /// Add a child. Its history is unknown, so it gets a full rebuild from an online child.
    pub fn add_child(
        &self,
        name: impl Into<String>,
        dev: Arc<dyn BlockDevice>,
    ) -> Result<(), NexusError> {
        let name: String = name.into();
        let shared = &self.shared;
        if let Some(reason) = misfit(shared.geometry, shared.caps, &*dev) {
            return Err(NexusError::Incompatible {
                nexus: shared.name.clone(),
                child: name,
                reason,
            });
        }
        let runtime = self.runtime()?;
        let mut state = shared.lock();
        if state.children.iter().any(|s| *s.name == *name) {
            return Err(NexusError::DuplicateChild {
                nexus: shared.name.clone(),
                child: name,
            });
        }
        if state.online_count() == 0 {
            return Err(NexusError::NoSource {
                nexus: shared.name.clone(),
                child: name,
            });
        }
        let id = state.next_id;
        state.next_id += 1;
        state.children.push(Slot {
            id,
            name: name.into(),
            dev,
            outstanding: Arc::default(),
            timeout: shared.settings.io_timeout,
            state: ChildState::Offline,
            dirty: Some(DirtyMap::full(
                shared.geometry.size,
                shared.settings.dirty_granularity,
            )),
            durable: None,
            rebuild: None,
        });
        self.start_rebuild(&mut state, id, &runtime);
        Ok(())
    }

    /// Remove a child (stopping a rebuild onto it). The last online child cannot be removed.
    pub fn remove_child(&self, name: &str) -> Result<(), NexusError> {
        let mut state = self.shared.lock();
        let i = state.index(&self.shared.name, name)?;
        if state.children[i].state == ChildState::Online && state.online_count() == 1 {
            return Err(self.err_last(name, "remove"));
        }
        let slot = state.children.remove(i);
        if let Some(ctl) = &slot.rebuild {
            ctl.control.send_replace(Control::Cancel);
        }
        tracing::info!(nexus = %self.shared.name, child = name, "child removed");
        state.version += 1;
        self.shared.refresh(&mut state);
        Ok(())
    }

    /// Take a child out of service (stopping a rebuild onto it); its missed writes are
    /// recorded for a partial rebuild when it comes back. The last online child cannot be
    /// taken offline.
    pub fn offline_child(&self, name: &str) -> Result<(), NexusError> {
        let (size, gran) = (
            self.shared.geometry.size,
            self.shared.settings.dirty_granularity,
        );
        let mut state = self.shared.lock();
        let i = state.index(&self.shared.name, name)?;
        if state.children[i].state == ChildState::Online && state.online_count() == 1 {
            return Err(self.err_last(name, "offline"));
        }
        let slot = &mut state.children[i];
        if slot.state == ChildState::Offline {
            return Ok(());
        }
        if let Some(ctl) = &slot.rebuild {
            ctl.control.send_replace(Control::Cancel);
        }
        slot.keep_maps(size, gran);
        slot.state = ChildState::Offline;
        tracing::info!(nexus = %self.shared.name, child = name, "child offline");
        state.version += 1;
        self.shared.refresh(&mut state);
        Ok(())
    }

    /// Fault a child with `reason`, as a failed I/O would. The last online child cannot be
    /// faulted this way.
    pub fn fault_child(&self, name: &str, reason: impl Into<String>) -> Result<(), NexusError> {
        let mut state = self.shared.lock();
        let i = state.index(&self.shared.name, name)?;
        if state.children[i].state == ChildState::Online && state.online_count() == 1 {
            return Err(self.err_last(name, "fault"));
        }
        let id = state.children[i].id;
        self.shared.fault_locked(&mut state, id, reason.into());
        Ok(())
    }

    /// Bring a faulted or offline child back: a partial rebuild of the regions it missed, or a
    /// full rebuild when nothing is known about what it missed.
    pub fn online_child(&self, name: &str) -> Result<(), NexusError> {
        let runtime = self.runtime()?;
        let mut state = self.shared.lock();
        let i = state.index(&self.shared.name, name)?;
        let slot = &state.children[i];
        match slot.state {
            ChildState::Faulted(_) | ChildState::Offline => {}
            _ => return Err(self.err_state(slot, "online")),
        }
        if state.online_count() == 0 {
            return Err(NexusError::NoSource {
                nexus: self.shared.name.clone(),
                child: name.to_string(),
            });
        }
        let id = slot.id;
        let (size, gran) = (
            self.shared.geometry.size,
            self.shared.settings.dirty_granularity,
        );
        let slot = &mut state.children[i];
        slot.dirty.get_or_insert_with(|| DirtyMap::full(size, gran));
        self.start_rebuild(&mut state, id, &runtime);
        Ok(())
    }

    /// Give a faulted or offline child a new device (reopened after its peer came back, say);
    /// [`Nexus::online_child`] then rebuilds it. The device must fit the nexus as the old one did.
    pub fn replace_device(&self, name: &str, dev: Arc<dyn BlockDevice>) -> Result<(), NexusError> {
        let shared = &self.shared;
        if let Some(reason) = misfit(shared.geometry, shared.caps, &*dev) {
            return Err(NexusError::Incompatible {
                nexus: shared.name.clone(),
                child: name.to_string(),
                reason,
            });
        }
        let mut state = shared.lock();
        let i = state.index(&shared.name, name)?;
        let slot = &mut state.children[i];
        match slot.state {
            ChildState::Faulted(_) | ChildState::Offline => {}
            _ => return Err(self.err_state(slot, "replace the device of")),
        }
        slot.dev = dev;
        Ok(())
    }

    /// Take the device of a faulted or offline child out (to close it before opening it again),
    /// leaving a stand-in that fails every I/O until [`Nexus::replace_device`].
    pub fn close_device(&self, name: &str) -> Result<Arc<dyn BlockDevice>, NexusError> {
        let shared = &self.shared;
        let mut state = shared.lock();
        let i = state.index(&shared.name, name)?;
        let slot = &mut state.children[i];
        match slot.state {
            ChildState::Faulted(_) | ChildState::Offline => {}
            _ => return Err(self.err_state(slot, "close the device of")),
        }
        let absent: Arc<dyn BlockDevice> = Arc::new(Absent {
            geometry: shared.geometry,
            caps: shared.caps,
            why: format!("child {name} is closed"),
        });
        Ok(std::mem::replace(&mut slot.dev, absent))
    }

    /// Set a child's I/O timeout (`None`: wait forever); a child whose I/O takes longer is
    /// faulted.
    pub fn set_io_timeout(&self, name: &str, timeout: Option<Duration>) -> Result<(), NexusError> {
        let mut state = self.shared.lock();
        let i = state.index(&self.shared.name, name)?;
        state.children[i].timeout = timeout;
        self.shared.refresh(&mut state);
        Ok(())
    }

    fn runtime(&self) -> Result<tokio::runtime::Handle, NexusError> {
        tokio::runtime::Handle::try_current().map_err(|_| NexusError::NoRuntime {
            nexus: self.shared.name.clone(),
        })
    }

    /// Start copying the dirty regions of child `id` onto it: a full rebuild when every region
    /// is dirty, a partial one otherwise.
    pub(crate) fn start_rebuild(
        &self,
        state: &mut State,
        id: u64,
        runtime: &tokio::runtime::Handle,
    ) {
        let shared = &self.shared;
        let (size, gran) = (shared.geometry.size, shared.settings.dirty_granularity);
        let slot = state
            .slot(id)
            .expect("the slot was just found under this lock");
        slot.keep_maps(size, gran);
        let map = slot
            .dirty
            .as_ref()
            .expect("a child being rebuilt has a dirty map");
        let kind = if map.dirty_granules() == map.granules() {
            RebuildKind::Full
        } else {
            RebuildKind::Partial
        };
        let total = (map.dirty_granules() * map.granularity()).min(size);
        let ctl = Arc::new(RebuildCtl::new(kind, total));
        slot.state = ChildState::Rebuilding;
        slot.rebuild = Some(ctl.clone());
        tracing::info!(nexus = %shared.name, child = %slot.name, ?kind, total_bytes = total, "rebuild started");
        state.version += 1;
        shared.refresh(state);
        runtime.spawn(rebuild::run(shared.clone(), id, ctl));
    }

    fn rebuild_ctl(&self, name: &str) -> Result<Arc<RebuildCtl>, NexusError> {
        let state = self.shared.lock();
        let i = state.index(&self.shared.name, name)?;
        state.children[i]
            .rebuild
            .clone()
            .ok_or_else(|| NexusError::NoRebuild {
                nexus: self.shared.name.clone(),
                child: name.to_string(),
            })
    }

    /// The running (or paused) rebuild onto a child.
    fn running_rebuild(&self, name: &str) -> Result<Arc<RebuildCtl>, NexusError> {
        let ctl = self.rebuild_ctl(name)?;
        match ctl.progress().state {
            RebuildState::Done(_) => Err(NexusError::NoRebuild {
                nexus: self.shared.name.clone(),
                child: name.to_string(),
            }),
            _ => Ok(ctl),
        }
    }

    /// Pause the rebuild onto a child (segments in flight finish).
    pub fn pause_rebuild(&self, name: &str) -> Result<(), NexusError> {
        let ctl = self.running_rebuild(name)?;
        ctl.control.send_if_modified(|c| {
            let run = *c == Control::Run;
            if run {
                *c = Control::Pause;
            }
            run
        });
        Ok(())
    }

    /// Resume a paused rebuild.
    pub fn resume_rebuild(&self, name: &str) -> Result<(), NexusError> {
        let ctl = self.running_rebuild(name)?;
        ctl.control.send_if_modified(|c| {
            let paused = *c == Control::Pause;
            if paused {
                *c = Control::Run;
            }
            paused
        });
        Ok(())
    }

    /// Stop the rebuild onto a child; the child goes offline, keeping what is left to copy.
    pub fn cancel_rebuild(&self, name: &str) -> Result<(), NexusError> {
        let ctl = self.running_rebuild(name)?;
        ctl.control.send_replace(Control::Cancel);
        Ok(())
    }

    /// Wait until the current (or last) rebuild onto a child ends, and say how.
    pub async fn wait_rebuild(&self, name: &str) -> Result<RebuildOutcome, NexusError> {
        let ctl = self.rebuild_ctl(name)?;
        Ok(ctl.wait().await)
    }
}
