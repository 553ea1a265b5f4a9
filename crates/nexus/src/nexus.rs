//! The [`Nexus`] device: fan-out of writes, read selection and retry, and the child lifecycle.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::join_all;
use strata_bdev::{
    check_io, read_only_error, BlockDevice, Capabilities, Error, ErrorKind, Extent, Geometry,
    Result, WriteOpts, ZeroOpts,
};

use crate::dirty::DirtyMap;
use crate::error::NexusError;
pub(crate) use crate::ops::{call, child_io};
use crate::ops::{ChildOp, FlushOp, NewSlot, ReadOp, StatusOp, TrimOp, WriteOp, ZeroOp};
use crate::rangelock::RangeLock;
use crate::rebuild::{Control, RebuildCtl};

use crate::record::{ChildRecord, Ledger, NexusRecord, RecordedState};
use crate::settings::NexusSettings;
use crate::status::{ChildState, ChildStatus, NexusStatus};

/// A child as the I/O path sees it: enough to send I/O and account for it.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) id: u64,
    pub(crate) name: Arc<str>,
    pub(crate) dev: Arc<dyn BlockDevice>,
    pub(crate) outstanding: Arc<AtomicUsize>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) online: bool,
}

/// The children the I/O path uses, rebuilt whenever a child changes state.
pub(crate) struct View {
    pub(crate) generation: u64,
    /// Online and rebuilding children.
    pub(crate) writable: Vec<Target>,
    /// Online children.
    pub(crate) readable: Vec<Target>,
    /// Every child is writable (no dirty map needs updating after a write that all answered).
    pub(crate) all_writable: bool,
}

pub(crate) struct Slot {
    pub(crate) id: u64,
    pub(crate) name: Arc<str>,
    pub(crate) dev: Arc<dyn BlockDevice>,
    pub(crate) outstanding: Arc<AtomicUsize>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) state: ChildState,
    /// Regions this child has missed and that no rebuild has taken yet; `None` while online.
    pub(crate) dirty: Option<DirtyMap>,
    /// Regions this child may not hold current data for, as recorded: `dirty` plus what a
    /// rebuild has taken and not yet finished with. Cleared only when the child is online.
    pub(crate) durable: Option<DirtyMap>,
    pub(crate) rebuild: Option<Arc<RebuildCtl>>,
}

impl Slot {
    /// Give a child that is leaving service its maps (a clean one if it has none).
    pub(crate) fn keep_maps(&mut self, size: u64, granularity: u64) {
        let dirty = self
            .dirty
            .get_or_insert_with(|| DirtyMap::new(size, granularity));
        match &mut self.durable {
            Some(d) => d.union(dirty),
            None => self.durable = Some(dirty.clone()),
        }
    }

    /// Record that the child missed `[offset, offset + len)`; returns whether the recorded map
    /// grew.
    pub(crate) fn mark_missed(&mut self, offset: u64, len: u64) -> bool {
        if let Some(map) = self.dirty.as_mut() {
            map.mark(offset, len);
        }
        self.durable
            .as_mut()
            .is_some_and(|map| map.mark(offset, len))
    }

    /// Record that the child may have missed anything.
    pub(crate) fn mark_all(&mut self) {
        for map in [self.dirty.as_mut(), self.durable.as_mut()]
            .into_iter()
            .flatten()
        {
            map.set_granules(0, map.granules());
        }
    }

    pub(crate) fn record(&self) -> ChildRecord {
        let state = match &self.state {
            ChildState::Online => RecordedState::Online,
            ChildState::Rebuilding => RecordedState::Rebuilding,
            ChildState::Faulted(reason) => RecordedState::Faulted(reason.clone()),
            ChildState::Offline => RecordedState::Offline,
        };
        ChildRecord {
            name: self.name.to_string(),
            dirty: match state {
                RecordedState::Online => None,
                _ => self
                    .durable
                    .as_ref()
                    .or(self.dirty.as_ref())
                    .map(DirtyMap::runs),
            },
            state,
        }
    }

    pub(crate) fn target(&self) -> Target {
        Target {
            id: self.id,
            name: self.name.clone(),
            dev: self.dev.clone(),
            outstanding: self.outstanding.clone(),
            timeout: self.timeout,
            online: self.state == ChildState::Online,
        }
    }
}

pub(crate) struct State {
    pub(crate) children: Vec<Slot>,
    pub(crate) next_id: u64,
    pub(crate) generation: u64,
    /// Version of the record this state describes; bumped by every change a record shows.
    pub(crate) version: u64,
}

impl State {
    pub(crate) fn slot(&mut self, id: u64) -> Option<&mut Slot> {
        self.children.iter_mut().find(|s| s.id == id)
    }

    pub(crate) fn index(&self, nexus: &str, name: &str) -> Result<usize, NexusError> {
        self.children
            .iter()
            .position(|s| &*s.name == name)
            .ok_or_else(|| NexusError::NoSuchChild {
                nexus: nexus.to_string(),
                child: name.to_string(),
            })
    }

    pub(crate) fn online_count(&self) -> usize {
        self.children
            .iter()
            .filter(|s| s.state == ChildState::Online)
            .count()
    }
}

/// What the nexus and its rebuild tasks share.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) geometry: Geometry,
    pub(crate) caps: Capabilities,
    pub(crate) settings: NexusSettings,
    pub(crate) locks: RangeLock,
    pub(crate) state: Mutex<State>,
    /// The I/O path's view of the children, replaced by `refresh` under the state lock. Apart
    /// from `state` so that I/O never waits for control work holding that lock, and readers
    /// never wait for each other.
    pub(crate) view: RwLock<Arc<View>>,
    pub(crate) generation: AtomicU64,
    pub(crate) next_read: AtomicUsize,
    pub(crate) ledger: Option<Arc<dyn Ledger>>,
    /// The version of the newest durable record.
    pub(crate) persisted: AtomicU64,
    /// Held while a record is saved; writers needing a newer record wait here (group commit).
    pub(crate) saving: tokio::sync::Mutex<()>,
}

/// An N-way mirror over child block devices. See the crate docs.
pub struct Nexus {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for Nexus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "nexus {} ({} bytes, {} children)",
            self.shared.name,
            self.shared.geometry.size,
            self.shared.lock().children.len()
        )
    }
}

impl Drop for Nexus {
    fn drop(&mut self) {
        // Rebuild tasks hold the shared state; tell them to stop so that it is freed.
        for slot in &self.shared.lock().children {
            if let Some(ctl) = &slot.rebuild {
                ctl.control.send_replace(Control::Cancel);
            }
        }
    }
}

pub(crate) fn geometry_of(children: &[(String, Arc<dyn BlockDevice>)]) -> Geometry {
    let block_size = children
        .iter()
        .map(|(_, d)| d.geometry().block_size.max(1))
        .max()
        .unwrap_or(1);
    let bs = u64::from(block_size);
    let size = children
        .iter()
        .map(|(_, d)| d.geometry().size)
        .min()
        .unwrap_or(0)
        / bs
        * bs;
    let optimal = children
        .iter()
        .map(|(_, d)| d.geometry().optimal_io_size)
        .max()
        .unwrap_or(block_size)
        .max(block_size)
        .div_ceil(block_size)
        * block_size;
    Geometry {
        size,
        block_size,
        optimal_io_size: optimal,
    }
}

pub(crate) fn capabilities_of(children: &[(String, Arc<dyn BlockDevice>)]) -> Capabilities {
    // What a child lacks, the nexus emulates on it (see `child_io`), so that a child that
    // returns, or joins, with fewer features still fits and clients never see the set shrink.
    Capabilities {
        read_only: children.iter().any(|(_, d)| d.capabilities().read_only),
        // Children may have volatile caches (one joining later may): flushes always pass.
        flush: true,
        fua: true,
        trim: true,
        write_zeroes: true,
        // Cannot be promised for children that are not here yet.
        fast_zero: false,
        block_status: true,
        // One nexus object serves every connection, and a flush reaches every child.
        multi_conn: true,
        // The nexus has no resize of its own.
        resize: false,
    }
}

/// Why a child cannot join a nexus of this shape, if it cannot.
pub(crate) fn misfit(
    geometry: Geometry,
    caps: Capabilities,
    dev: &dyn BlockDevice,
) -> Option<String> {
    let g = dev.geometry();
    let c = dev.capabilities();
    if g.size < geometry.size {
        return Some(format!(
            "it has {} bytes, the nexus {}",
            g.size, geometry.size
        ));
    }
    if !geometry.block_size.is_multiple_of(g.block_size.max(1)) {
        return Some(format!(
            "its block size {} does not divide the nexus block size {}",
            g.block_size, geometry.block_size
        ));
    }
    if c.read_only && !caps.read_only {
        return Some("it is read-only".into());
    }
    None
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("nexus state lock poisoned")
    }

    pub(crate) fn view(&self) -> Arc<View> {
        self.view.read().expect("nexus view lock poisoned").clone()
    }

    /// Recompute the I/O path's view after a change to the children.
    pub(crate) fn refresh(&self, state: &mut State) {
        state.generation += 1;
        let writable: Vec<Target> = state
            .children
            .iter()
            .filter(|s| matches!(s.state, ChildState::Online | ChildState::Rebuilding))
            .map(Slot::target)
            .collect();
        let readable = writable.iter().filter(|t| t.online).cloned().collect();
        let view = Arc::new(View {
            generation: state.generation,
            all_writable: writable.len() == state.children.len(),
            writable,
            readable,
        });
        let old = std::mem::replace(
            &mut *self.view.write().expect("nexus view lock poisoned"),
            view,
        );
        self.generation.store(state.generation, Ordering::Release);
        drop(old);
    }

    /// Fault the child `id` (unless it is already out); returns whether it changed.
    pub(crate) fn fault_locked(&self, state: &mut State, id: u64, reason: String) -> bool {
        let (size, gran) = (self.geometry.size, self.settings.dirty_granularity);
        let Some(slot) = state.slot(id) else {
            return false;
        };
        if matches!(slot.state, ChildState::Faulted(_) | ChildState::Offline) {
            return false;
        }
        tracing::warn!(nexus = %self.name, child = %slot.name, %reason, "child faulted");
        slot.keep_maps(size, gran);
        if slot.state == ChildState::Rebuilding {
            if let Some(ctl) = &slot.rebuild {
                ctl.control.send_replace(Control::Cancel);
            }
        }
        slot.state = ChildState::Faulted(reason);
        state.version += 1;
        self.refresh(state);
        true
    }

    /// The record of `state`.
    pub(crate) fn record(&self, state: &State) -> NexusRecord {
        NexusRecord {
            version: state.version,
            size: self.geometry.size,
            granularity: self.settings.dirty_granularity,
            children: state.children.iter().map(Slot::record).collect(),
        }
    }

    /// Return once a record at least as new as `want` is durable (at once without a ledger).
    pub(crate) async fn persist(&self, want: u64) -> std::io::Result<()> {
        let Some(ledger) = &self.ledger else {
            return Ok(());
        };
        while self.persisted.load(Ordering::Acquire) < want {
            let _turn = self.saving.lock().await;
            if self.persisted.load(Ordering::Acquire) >= want {
                break;
            }
            let record = self.record(&self.lock());
            ledger.save(&record).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "save the record of nexus {} (version {}): {e}",
                        self.name, record.version
                    ),
                )
            })?;
            self.persisted.fetch_max(record.version, Ordering::AcqRel);
        }
        Ok(())
    }

    /// "c1: online, c2: faulted: …" for error messages.
    pub(crate) fn describe_children(&self) -> String {
        let state = self.lock();
        state
            .children
            .iter()
            .map(|s| format!("{}: {}", s.name, s.state))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub(crate) fn no_healthy_child(&self, what: &dyn fmt::Display, last: Option<&Error>) -> Error {
        Error::new(
            last.map_or(ErrorKind::Io, Error::kind),
            format!(
                "{what} nexus {}: no healthy child left ({})",
                self.name,
                self.describe_children()
            ),
        )
    }

    /// Send a modifying operation to every writable child. Completes when every child has
    /// answered; faults those that failed; succeeds if an online child succeeded.
    pub(crate) async fn fan_out<O: ChildOp<Output = ()>>(&self, op: &O) -> Result<()> {
        let range = op.range();
        // Lock before taking the view: a rebuild that starts after the view was taken then
        // copies this range only after this write has reached its source (see rebuild.rs).
        // It is taken even when no child is rebuilding: a write that skipped it could still be
        // about to mark a child's dirty map when a rebuild of that child, started meanwhile,
        // completes — and a mark made after the child is online is lost. Uncontended, the lock
        // is an atomic add on one stripe and a release; see docs/BENCHMARKS.md for its cost.
        let _guard = match range {
            Some((offset, len)) => Some(self.locks.shared(offset, len).await),
            None => None,
        };
        let view = self.view();
        let results = join_all(view.writable.iter().map(|t| call(t, op.run(&*t.dev)))).await;
        let answered = || view.writable.iter().zip(&results);
        let online_ok = answered().any(|(t, r)| t.online && r.is_ok());
        let all_ok = results.iter().all(Result::is_ok);
        let unchanged = self.generation.load(Ordering::Acquire) == view.generation;
        // The record version to make durable before answering: some child missed this.
        let mut must_record = None;
        if !(all_ok && view.all_writable && unchanged) {
            let succeeded = |id: u64| answered().any(|(t, r)| t.id == id && r.is_ok());
            let mut state = self.lock();
            for (t, r) in answered() {
                let Err(e) = r else { continue };
                self.fault_locked(&mut state, t.id, format!("{op}: {}", e.chain()));
                if range.is_none() {
                    // A failed flush may have lost any earlier write: all of it is suspect.
                    if let Some(slot) = state.slot(t.id) {
                        slot.mark_all();
                        state.version += 1;
                    }
                }
            }
            let mut grew = false;
            let mut missed = false;
            for slot in &mut state.children {
                if !succeeded(slot.id) {
                    missed = true;
                    if let Some((offset, len)) = range {
                        grew |= slot.mark_missed(offset, len);
                    }
                }
            }
            if grew {
                state.version += 1;
            }
            if missed && self.ledger.is_some() {
                must_record = Some(state.version);
            }
        }
        if !online_ok {
            let last = results.iter().rev().find_map(|r| r.as_ref().err());
            return Err(self.no_healthy_child(op, last));
        }
        if let Some(version) = must_record {
            self.persist(version).await.map_err(|e| {
                Error::new(
                    ErrorKind::Io,
                    format!(
                        "{op} nexus {}: the healthy children have it, but recording which \
                         children missed it failed, so it is reported as failed: {e}",
                        self.name
                    ),
                )
            })?;
        }
        Ok(())
    }

    /// Run a read-like operation on one online child, retrying on others after failures.
    pub(crate) async fn read_one<O: ChildOp>(&self, op: &O) -> Result<O::Output> {
        let mut tried: Vec<u64> = Vec::new();
        let mut last: Option<Error> = None;
        loop {
            let view = self.view();
            let n = view.readable.len();
            let start = self.next_read.fetch_add(1, Ordering::Relaxed);
            let mut best: Option<&Target> = None;
            for k in 0..n {
                let t = &view.readable[(start + k) % n];
                if tried.contains(&t.id) {
                    continue;
                }
                let load = t.outstanding.load(Ordering::Relaxed);
                if best.is_none_or(|b| load < b.outstanding.load(Ordering::Relaxed)) {
                    best = Some(t);
                }
            }
            let Some(t) = best else {
                return Err(self.no_healthy_child(op, last.as_ref()));
            };
            match call(t, op.run(&*t.dev)).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tracing::warn!(nexus = %self.name, child = %t.name, error = %e.chain(), "{op}: retrying on another child");
                    tried.push(t.id);
                    let mut state = self.lock();
                    self.fault_locked(&mut state, t.id, format!("{op}: {}", e.chain()));
                    drop(state);
                    last = Some(e);
                }
            }
        }
    }
}

impl Nexus {
    /// A nexus named `name` over `children` (name — usually the URI — and device), all online:
    /// the caller vouches that they hold the same data (e.g. all new and zeroed). Nothing is
    /// recorded; see [`Nexus::restore`] for a nexus that survives restarts.
    pub fn new(
        name: impl Into<String>,
        children: Vec<(String, Arc<dyn BlockDevice>)>,
        settings: NexusSettings,
    ) -> Result<Nexus, NexusError> {
        let name = name.into();
        let geometry = geometry_of(&children);
        let caps = capabilities_of(&children);
        let slots = children
            .into_iter()
            .map(|(child, dev)| (child, dev, ChildState::Online, None))
            .collect();
        Nexus::assemble(name, geometry, caps, settings, None, 0, slots)
    }

    /// Build a nexus from its parts; children not online get their maps (`dirty`, or clean).
    pub(crate) fn assemble(
        name: String,
        geometry: Geometry,
        caps: Capabilities,
        mut settings: NexusSettings,
        ledger: Option<Arc<dyn Ledger>>,
        version: u64,
        children: Vec<NewSlot>,
    ) -> Result<Nexus, NexusError> {
        if children.is_empty() {
            return Err(NexusError::NoChildren { nexus: name });
        }
        for (i, (child, ..)) in children.iter().enumerate() {
            if children[..i].iter().any(|(c, ..)| c == child) {
                return Err(NexusError::DuplicateChild {
                    nexus: name,
                    child: child.clone(),
                });
            }
        }
        let bs = u64::from(geometry.block_size);
        if settings.dirty_granularity == 0 || !settings.dirty_granularity.is_multiple_of(bs) {
            return Err(NexusError::InvalidSettings {
                nexus: name,
                reason: format!(
                    "dirty_granularity {} is not a positive multiple of the block size {bs}",
                    settings.dirty_granularity
                ),
            });
        }
        if settings.rebuild_parallel == 0 {
            return Err(NexusError::InvalidSettings {
                nexus: name,
                reason: "rebuild_parallel must be at least 1".into(),
            });
        }
        settings.rebuild_segment = settings
            .rebuild_segment
            .max(1)
            .div_ceil(settings.dirty_granularity)
            * settings.dirty_granularity;
        let mut state = State {
            children: Vec::new(),
            next_id: 0,
            generation: 0,
            version,
        };
        for (child, dev, child_state, dirty) in children {
            let mut slot = Slot {
                id: state.next_id,
                name: child.into(),
                dev,
                outstanding: Arc::default(),
                timeout: settings.io_timeout,
                state: child_state,
                dirty,
                durable: None,
                rebuild: None,
            };
            if slot.state != ChildState::Online {
                slot.keep_maps(geometry.size, settings.dirty_granularity);
            }
            state.children.push(slot);
            state.next_id += 1;
        }
        let shared = Arc::new(Shared {
            name,
            geometry,
            caps,
            locks: RangeLock::new(settings.rebuild_segment),
            settings,
            state: Mutex::new(state),
            view: RwLock::new(Arc::new(View {
                generation: 0,
                writable: Vec::new(),
                readable: Vec::new(),
                all_writable: true,
            })),
            generation: AtomicU64::new(0),
            next_read: AtomicUsize::new(0),
            ledger,
            persisted: AtomicU64::new(0),
            saving: tokio::sync::Mutex::new(()),
        });
        shared.refresh(&mut shared.lock());
        Ok(Nexus { shared })
    }

    /// Make the current record durable (at once without a ledger). Control operations change
    /// the record; call this after them to have the change on disk before going on.
    pub async fn save_record(&self) -> std::io::Result<()> {
        let want = self.shared.lock().version;
        self.shared.persist(want).await
    }

    /// The record as it stands.
    pub fn record(&self) -> NexusRecord {
        self.shared.record(&self.shared.lock())
    }

    /// The nexus's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The settings in force (the rebuild segment rounded to the dirty granularity).
    pub fn settings(&self) -> &NexusSettings {
        &self.shared.settings
    }

    /// A snapshot of every child's state and rebuild progress.
    pub fn status(&self) -> NexusStatus {
        let state = self.shared.lock();
        NexusStatus {
            name: self.shared.name.clone(),
            geometry: self.shared.geometry,
            children: state
                .children
                .iter()
                .map(|s| ChildStatus {
                    name: s.name.to_string(),
                    state: s.state.clone(),
                    rebuild: s.rebuild.as_ref().map(|r| r.progress()),
                    dirty_bytes: s.dirty.as_ref().map(|m| {
                        (m.dirty_granules() * m.granularity()).min(self.shared.geometry.size)
                    }),
                    outstanding: s.outstanding.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}

#[async_trait]
impl BlockDevice for Nexus {
    fn geometry(&self) -> Geometry {
        self.shared.geometry
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.caps
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_io(self.shared.geometry, "read", offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.shared.read_one(&ReadOp { offset, len }).await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        if self.shared.caps.read_only {
            return Err(read_only_error("write"));
        }
        let len = data.len() as u64;
        check_io(self.shared.geometry, "write", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.shared.fan_out(&WriteOp { offset, data, opts }).await
    }

    async fn flush(&self) -> Result<()> {
        self.shared.fan_out(&FlushOp).await
    }

    async fn trim(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        if self.shared.caps.read_only {
            return Err(read_only_error("trim"));
        }
        check_io(self.shared.geometry, "trim", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.shared.fan_out(&TrimOp { offset, len, opts }).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        if self.shared.caps.read_only {
            return Err(read_only_error("write zeroes"));
        }
        check_io(self.shared.geometry, "write zeroes", offset, len)?;
        if opts.fast_only && !self.shared.caps.fast_zero {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "write zeroes fast on nexus {}: not every child zeroes fast",
                    self.shared.name
                ),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        self.shared.fan_out(&ZeroOp { offset, len, opts }).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_io(self.shared.geometry, "query block status", offset, len)?;
        let bs = u64::from(self.shared.geometry.block_size);
        let mut extents = self.shared.read_one(&StatusOp { offset, len }).await?;
        // A child with a smaller block size may describe runs the nexus cannot address: keep the
        // aligned prefix (at least one block, reported as data).
        let mut total = 0;
        let mut keep = 0;
        for e in &extents {
            if !(total + e.len).is_multiple_of(bs) {
                break;
            }
            total += e.len;
            keep += 1;
        }
        if keep == 0 {
            return Ok(vec![Extent::data(bs.min(len))]);
        }
        extents.truncate(keep);
        Ok(extents)
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_io(self.shared.geometry, "prefetch", offset, len)?;
        // A hint: sent to one online child; a failure is not worth faulting it over.
        let view = self.shared.view();
        match view.readable.first() {
            Some(t) => call(t, t.dev.cache(offset, len)).await,
            None => Ok(()),
        }
    }
}
