//! The [`Nexus`] device: fan-out of writes, read selection and retry, and the child lifecycle.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::join_all;
use strata_bdev::{
    check_io, read_only_error, write_zeroes_by_writing, BlockDevice, Capabilities, Error,
    ErrorKind, Extent, Geometry, Result, WriteOpts, ZeroOpts,
};

use crate::dirty::DirtyMap;
use crate::rangelock::RangeLock;
use crate::rebuild::{
    self, Control, RebuildCtl, RebuildKind, RebuildOutcome, RebuildProgress, RebuildState,
};
use crate::record::{ChildRecord, Ledger, NexusRecord, RecordedState};

/// Tunables of one nexus.
#[derive(Debug, Clone, PartialEq, Eq)]
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NexusSettings {
    /// Bytes covered by one bit of a dirty-region map (default 1 MiB). A multiple of the nexus
    /// block size.
    #[serde(with = "strata_bdev::units::size")]
    pub dirty_granularity: u64,
    /// Bytes a rebuild copies under one range lock (default 1 MiB); rounded up to a multiple of
    /// `dirty_granularity`.
    #[serde(with = "strata_bdev::units::size")]
    pub rebuild_segment: u64,
    /// Segments a rebuild copies at once (default 4).
    pub rebuild_parallel: usize,
    /// A child whose I/O takes longer than this is faulted (default: no limit). Written
    /// `child_timeout_secs` in settings files. Per-child overrides: [`Nexus::set_io_timeout`].
    #[serde(
        rename = "child_timeout_secs",
        with = "strata_bdev::units::secs_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub io_timeout: Option<Duration>,
}

impl Default for NexusSettings {
    fn default() -> NexusSettings {
        NexusSettings {
            dirty_granularity: 1 << 20,
            rebuild_segment: 1 << 20,
            rebuild_parallel: 4,
            io_timeout: None,
        }
    }
}

impl NexusSettings {
    /// Check what can be checked before a nexus exists (its block size is checked when it is
    /// made): the reason, in the words of a settings file.
    pub fn validate(&self) -> Result<(), String> {
        if self.dirty_granularity == 0 || !self.dirty_granularity.is_multiple_of(4096) {
            return Err(format!(
                "dirty_granularity {} is not a positive multiple of 4 KiB",
                self.dirty_granularity
            ));
        }
        if !(1..=1024).contains(&self.rebuild_parallel) {
            return Err(format!(
                "rebuild_parallel {} is not between 1 and 1024",
                self.rebuild_parallel
            ));
        }
        if self.rebuild_segment > 1 << 30 {
            return Err(format!(
                "rebuild_segment {} is more than 1 GiB",
                self.rebuild_segment
            ));
        }
        if self.io_timeout.is_some_and(|t| t.is_zero()) {
            return Err("child_timeout_secs must be more than 0 (leave it out for no limit)".into());
        }
        Ok(())
    }
}

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

/// A failed control operation on a nexus.
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

/// A child given to [`Nexus::restore`]: its name and its device, or why it could not be opened.
#[derive(Debug)]
pub struct RestoreChild {
    pub name: String,
    pub device: Result<Arc<dyn BlockDevice>, Error>,
}

/// A child as the I/O path sees it: enough to send I/O and account for it.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) id: u64,
    pub(crate) name: Arc<str>,
    pub(crate) dev: Arc<dyn BlockDevice>,
    outstanding: Arc<AtomicUsize>,
    timeout: Option<Duration>,
    online: bool,
}

/// The children the I/O path uses, rebuilt whenever a child changes state.
struct View {
    generation: u64,
    /// Online and rebuilding children.
    writable: Vec<Target>,
    /// Online children.
    readable: Vec<Target>,
    /// Every child is writable (no dirty map needs updating after a write that all answered).
    all_writable: bool,
}

pub(crate) struct Slot {
    pub(crate) id: u64,
    pub(crate) name: Arc<str>,
    pub(crate) dev: Arc<dyn BlockDevice>,
    outstanding: Arc<AtomicUsize>,
    timeout: Option<Duration>,
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
    fn keep_maps(&mut self, size: u64, granularity: u64) {
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
    fn mark_all(&mut self) {
        for map in [self.dirty.as_mut(), self.durable.as_mut()]
            .into_iter()
            .flatten()
        {
            map.set_granules(0, map.granules());
        }
    }

    fn record(&self) -> ChildRecord {
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
    next_id: u64,
    generation: u64,
    /// Version of the record this state describes; bumped by every change a record shows.
    pub(crate) version: u64,
}

impl State {
    pub(crate) fn slot(&mut self, id: u64) -> Option<&mut Slot> {
        self.children.iter_mut().find(|s| s.id == id)
    }

    fn index(&self, nexus: &str, name: &str) -> Result<usize, NexusError> {
        self.children
            .iter()
            .position(|s| &*s.name == name)
            .ok_or_else(|| NexusError::NoSuchChild {
                nexus: nexus.to_string(),
                child: name.to_string(),
            })
    }

    fn online_count(&self) -> usize {
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
    caps: Capabilities,
    pub(crate) settings: NexusSettings,
    pub(crate) locks: RangeLock,
    state: Mutex<State>,
    /// The I/O path's view of the children, replaced by `refresh` under the state lock. Apart
    /// from `state` so that I/O never waits for control work holding that lock, and readers
    /// never wait for each other.
    view: RwLock<Arc<View>>,
    generation: AtomicU64,
    next_read: AtomicUsize,
    ledger: Option<Arc<dyn Ledger>>,
    /// The version of the newest durable record.
    persisted: AtomicU64,
    /// Held while a record is saved; writers needing a newer record wait here (group commit).
    saving: tokio::sync::Mutex<()>,
}

/// An N-way mirror over child block devices. See the crate docs.
pub struct Nexus {
    shared: Arc<Shared>,
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

fn geometry_of(children: &[(String, Arc<dyn BlockDevice>)]) -> Geometry {
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

fn capabilities_of(children: &[(String, Arc<dyn BlockDevice>)]) -> Capabilities {
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
fn misfit(geometry: Geometry, caps: Capabilities, dev: &dyn BlockDevice) -> Option<String> {
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

/// Operations on one child, emulating what it lacks so that every child ends with the same
/// bytes: FUA as write-then-flush, trim and write-zeroes as zeroing (by writes if need be),
/// block status as "all data", flush as nothing when it has no volatile cache.
pub(crate) mod child_io {
    use super::*;

    async fn settle(dev: &dyn BlockDevice, fua: bool) -> Result<()> {
        if fua && dev.capabilities().flush {
            dev.flush().await
        } else {
            Ok(())
        }
    }

    pub(crate) async fn write(
        dev: &dyn BlockDevice,
        offset: u64,
        data: Bytes,
        opts: WriteOpts,
    ) -> Result<()> {
        if !opts.fua || dev.capabilities().fua {
            return dev.write_at(offset, data, opts).await;
        }
        dev.write_at(offset, data, WriteOpts { fua: false }).await?;
        settle(dev, true).await
    }

    pub(crate) async fn zeroes(
        dev: &dyn BlockDevice,
        offset: u64,
        len: u64,
        opts: ZeroOpts,
    ) -> Result<()> {
        let caps = dev.capabilities();
        if caps.write_zeroes {
            let fua_ok = !opts.fua || caps.fua;
            let o = ZeroOpts {
                fua: opts.fua && caps.fua,
                // The nexus never promises fast zeroing; children zero however they can.
                fast_only: false,
                ..opts
            };
            dev.write_zeroes(offset, len, o).await?;
            return settle(dev, !fua_ok).await;
        }
        let o = ZeroOpts {
            fast_only: false,
            ..opts
        };
        write_zeroes_by_writing(dev, offset, len, o).await
    }

    pub(crate) async fn trim(
        dev: &dyn BlockDevice,
        offset: u64,
        len: u64,
        opts: WriteOpts,
    ) -> Result<()> {
        let caps = dev.capabilities();
        if caps.trim {
            dev.trim(
                offset,
                len,
                WriteOpts {
                    fua: opts.fua && caps.fua,
                },
            )
            .await?;
            return settle(dev, opts.fua && !caps.fua).await;
        }
        let zero = ZeroOpts {
            fua: opts.fua,
            may_trim: true,
            fast_only: false,
        };
        zeroes(dev, offset, len, zero).await
    }

    pub(crate) async fn flush(dev: &dyn BlockDevice) -> Result<()> {
        if dev.capabilities().flush {
            dev.flush().await
        } else {
            Ok(())
        }
    }

    pub(crate) async fn block_status(
        dev: &dyn BlockDevice,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>> {
        if dev.capabilities().block_status {
            dev.block_status(offset, len).await
        } else {
            Ok(vec![Extent::data(len)])
        }
    }
}

/// A front-end operation as the nexus sends it to one child. `Display` names it for error
/// messages and fault reasons ("write 4096 bytes at offset 0 to"); it is formatted only when
/// something failed, never on the way of an I/O that succeeds.
pub(crate) trait ChildOp: fmt::Display + Sync {
    type Output: Send;

    /// The bytes it changes (for the range lock and dirty maps); `None` for reads and flush.
    fn range(&self) -> Option<(u64, u64)> {
        None
    }

    /// Run it on one child, borrowing the child from the caller's view.
    fn run<'a>(
        &'a self,
        dev: &'a dyn BlockDevice,
    ) -> impl Future<Output = Result<Self::Output>> + Send + 'a;
}

struct ReadOp {
    offset: u64,
    len: usize,
}

impl fmt::Display for ReadOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "read {} bytes at offset {} from", self.len, self.offset)
    }
}

impl ChildOp for ReadOp {
    type Output = Bytes;

    fn run<'a>(
        &'a self,
        dev: &'a dyn BlockDevice,
    ) -> impl Future<Output = Result<Bytes>> + Send + 'a {
        dev.read_at(self.offset, self.len)
    }
}

struct StatusOp {
    offset: u64,
    len: u64,
}

impl fmt::Display for StatusOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "query block status of {} bytes at offset {} on",
            self.len, self.offset
        )
    }
}

impl ChildOp for StatusOp {
    type Output = Vec<Extent>;

    fn run<'a>(
        &'a self,
        dev: &'a dyn BlockDevice,
    ) -> impl Future<Output = Result<Vec<Extent>>> + Send + 'a {
        child_io::block_status(dev, self.offset, self.len)
    }
}

struct WriteOp {
    offset: u64,
    data: Bytes,
    opts: WriteOpts,
}

impl fmt::Display for WriteOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "write {} bytes at offset {} to",
            self.data.len(),
            self.offset
        )
    }
}

impl ChildOp for WriteOp {
    type Output = ();

    fn range(&self) -> Option<(u64, u64)> {
        Some((self.offset, self.data.len() as u64))
    }

    fn run<'a>(&'a self, dev: &'a dyn BlockDevice) -> impl Future<Output = Result<()>> + Send + 'a {
        child_io::write(dev, self.offset, self.data.clone(), self.opts)
    }
}

struct FlushOp;

impl fmt::Display for FlushOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("flush")
    }
}

impl ChildOp for FlushOp {
    type Output = ();

    fn run<'a>(&'a self, dev: &'a dyn BlockDevice) -> impl Future<Output = Result<()>> + Send + 'a {
        child_io::flush(dev)
    }
}

struct TrimOp {
    offset: u64,
    len: u64,
    opts: WriteOpts,
}

impl fmt::Display for TrimOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "trim {} bytes at offset {} on", self.len, self.offset)
    }
}

impl ChildOp for TrimOp {
    type Output = ();

    fn range(&self) -> Option<(u64, u64)> {
        Some((self.offset, self.len))
    }

    fn run<'a>(&'a self, dev: &'a dyn BlockDevice) -> impl Future<Output = Result<()>> + Send + 'a {
        child_io::trim(dev, self.offset, self.len, self.opts)
    }
}

struct ZeroOp {
    offset: u64,
    len: u64,
    opts: ZeroOpts,
}

impl fmt::Display for ZeroOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "write zeroes over {} bytes at offset {} on",
            self.len, self.offset
        )
    }
}

impl ChildOp for ZeroOp {
    type Output = ();

    fn range(&self) -> Option<(u64, u64)> {
        Some((self.offset, self.len))
    }

    fn run<'a>(&'a self, dev: &'a dyn BlockDevice) -> impl Future<Output = Result<()>> + Send + 'a {
        child_io::zeroes(dev, self.offset, self.len, self.opts)
    }
}

/// A child as [`Nexus::assemble`] takes it: name, device, state and dirty map.
type NewSlot = (String, Arc<dyn BlockDevice>, ChildState, Option<DirtyMap>);

/// Stands in for a child whose device could not be opened: every I/O fails, saying why.
#[derive(Debug)]
struct Absent {
    geometry: Geometry,
    caps: Capabilities,
    why: String,
}

impl Absent {
    fn fail<T>(&self) -> Result<T> {
        Err(Error::new(ErrorKind::Io, self.why.clone()))
    }
}

#[async_trait]
impl BlockDevice for Absent {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn read_at(&self, _offset: u64, _len: usize) -> Result<Bytes> {
        self.fail()
    }

    async fn write_at(&self, _offset: u64, _data: Bytes, _opts: WriteOpts) -> Result<()> {
        self.fail()
    }

    async fn flush(&self) -> Result<()> {
        self.fail()
    }

    async fn trim(&self, _offset: u64, _len: u64, _opts: WriteOpts) -> Result<()> {
        self.fail()
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _opts: ZeroOpts) -> Result<()> {
        self.fail()
    }

    async fn block_status(&self, _offset: u64, _len: u64) -> Result<Vec<Extent>> {
        self.fail()
    }

    async fn cache(&self, _offset: u64, _len: u64) -> Result<()> {
        self.fail()
    }
}

/// Counts an I/O as outstanding on a child until dropped.
struct Outstanding<'a>(&'a AtomicUsize);

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Run one child I/O, counting it as outstanding and applying the child's timeout.
pub(crate) async fn call<T>(t: &Target, fut: impl Future<Output = Result<T>>) -> Result<T> {
    t.outstanding.fetch_add(1, Ordering::Relaxed);
    let _count = Outstanding(&t.outstanding);
    match t.timeout {
        None => fut.await,
        Some(limit) => match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::TimedOut,
                format!("child {} did not answer within {limit:?}", t.name),
            )),
        },
    }
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("nexus state lock poisoned")
    }

    fn view(&self) -> Arc<View> {
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
    fn record(&self, state: &State) -> NexusRecord {
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
    fn describe_children(&self) -> String {
        let state = self.lock();
        state
            .children
            .iter()
            .map(|s| format!("{}: {}", s.name, s.state))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn no_healthy_child(&self, what: &dyn fmt::Display, last: Option<&Error>) -> Error {
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
    async fn fan_out<O: ChildOp<Output = ()>>(&self, op: &O) -> Result<()> {
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
    async fn read_one<O: ChildOp>(&self, op: &O) -> Result<O::Output> {
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
        let mut geometry = geometry_of(&present);
        let caps = capabilities_of(&present);
        if let Some(r) = record {
            if r.size > geometry.size {
                let small = present
                    .iter()
                    .min_by_key(|(_, d)| d.geometry().size)
                    .map(|(n, d)| format!("{n} has {} bytes", d.geometry().size))
                    .unwrap_or_default();
                return Err(fail(format!(
                    "the nexus has {} bytes but {small}; give it a child at least that large",
                    r.size
                )));
            }
            // Keep the size clients have seen, even if every remaining child is larger.
            geometry.size = r.size;
        }
        let (size, gran) = (geometry.size, settings.dirty_granularity.max(1));
        let mut slots = Vec::with_capacity(children.len());
        for (i, child) in children.into_iter().enumerate() {
            let known = record.map(|r| (r, r.child(&child.name)));
            let recorded_map = |r: &NexusRecord, c: &ChildRecord| r.dirty_map(c, size, gran);
            let (dev, state, dirty) = match child.device {
                Ok(dev) => {
                    let (state, dirty) = match known {
                        None if i == 0 => (ChildState::Online, None),
                        None | Some((_, None)) => (ChildState::Rebuilding, None),
                        Some((r, Some(c))) => match &c.state {
                            RecordedState::Online => (ChildState::Online, None),
                            RecordedState::Rebuilding => {
                                (ChildState::Rebuilding, recorded_map(r, c))
                            }
                            RecordedState::Faulted(reason) => {
                                (ChildState::Faulted(reason.clone()), recorded_map(r, c))
                            }
                            RecordedState::Offline => (ChildState::Offline, recorded_map(r, c)),
                        },
                    };
                    (dev, state, dirty)
                }
                Err(e) => {
                    let reason = format!("open: {}", e.chain());
                    let dirty = match known {
                        None if i == 0 => {
                            return Err(fail(format!(
                                "child {} holds the data a new nexus starts from, and it \
                                 cannot be opened: {reason}",
                                child.name
                            )))
                        }
                        None | Some((_, None)) => None,
                        // Current until now: it has missed nothing yet.
                        Some((_, Some(c))) if c.state == RecordedState::Online => {
                            Some(DirtyMap::new(size, gran))
                        }
                        Some((r, Some(c))) => recorded_map(r, c),
                    };
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

    /// Build a nexus from its parts; children not online get their maps (`dirty`, or clean).
    fn assemble(
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
    fn start_rebuild(&self, state: &mut State, id: u64, runtime: &tokio::runtime::Handle) {
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
