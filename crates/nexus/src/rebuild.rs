//! The rebuild worker: copies the regions a child missed (or all of it) from an online child.
//!
//! ```text
//!   segments 0 1 2 3 … (only those with dirty granules)
//!      │  `rebuild_parallel` workers, each: lock segment ─► take its dirty bits ─► pick source
//!      ▼                                     ─► block status ─► copy data / zero holes ─► unlock
//!   source (online) ──read──► target (rebuilding, also receiving front-end writes)
//! ```
//!
//! Why a front-end write is never overwritten by older data: a write takes the range lock
//! *shared* before it looks at which children to send to, and keeps it until it has updated the
//! dirty maps; a copy takes the segment *exclusive*, then reads the target's bits and checks that
//! the source is still online. So every write to the segment either completed before the copy
//! (and is on the source, or faulted it — the copy then picks another source), or starts after
//! the copy and goes to the target itself. A write that began before the target started
//! rebuilding, and so skipped it, marks its range dirty before it lets the copy in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::join_all;
use strata_bdev::{Error, ZeroOpts};
use tokio::sync::watch;

use crate::nexus::{call, child_io, Shared, Target};
use crate::status::ChildState;

/// What a rebuild copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildKind {
    /// Only the regions the child missed.
    Partial,
    /// The whole device (a new child, or one whose history is unknown). Holes on the source
    /// are zeroed on the target rather than copied.
    Full,
}

/// How a rebuild ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebuildOutcome {
    /// Every region was copied; the child is online.
    Completed,
    /// Stopped by the operator (or because the child was taken offline or removed).
    Cancelled,
    /// Stopped by an error; the child is faulted with this reason.
    Failed(String),
}

/// Where a rebuild stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebuildState {
    Running,
    Paused,
    Done(RebuildOutcome),
}

/// Progress of one rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildProgress {
    pub kind: RebuildKind,
    pub state: RebuildState,
    /// Bytes to rebuild (grows if a region turns out to be missing late).
    pub total_bytes: u64,
    /// Bytes rebuilt so far: `copied_bytes + zeroed_bytes`.
    pub done_bytes: u64,
    /// Bytes read from a source and written to the target.
    pub copied_bytes: u64,
    /// Bytes zeroed on the target because the source reported them as zero.
    pub zeroed_bytes: u64,
    /// The child copied from most recently.
    pub source: Option<String>,
    pub started_at: SystemTime,
    pub elapsed: Duration,
}

impl RebuildProgress {
    /// Bytes per second so far.
    pub fn rate(&self) -> f64 {
        self.done_bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Time left at the current rate, once there is a rate.
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate();
        (self.done_bytes > 0 && rate > 0.0).then(|| {
            Duration::from_secs_f64(self.total_bytes.saturating_sub(self.done_bytes) as f64 / rate)
        })
    }
}

/// What the operator asks of a running rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    Run,
    Pause,
    Cancel,
}

#[derive(Debug)]
struct Counters {
    total: u64,
    copied: u64,
    zeroed: u64,
    source: Option<String>,
}

/// The handle to one rebuild, kept in the target's slot.
#[derive(Debug)]
pub(crate) struct RebuildCtl {
    kind: RebuildKind,
    pub(crate) control: watch::Sender<Control>,
    done: watch::Sender<Option<RebuildOutcome>>,
    counters: Mutex<Counters>,
    started_at: SystemTime,
    started: Instant,
    finished: Mutex<Option<Instant>>,
}

impl RebuildCtl {
    pub(crate) fn new(kind: RebuildKind, total: u64) -> RebuildCtl {
        RebuildCtl {
            kind,
            control: watch::Sender::new(Control::Run),
            done: watch::Sender::new(None),
            counters: Mutex::new(Counters {
                total,
                copied: 0,
                zeroed: 0,
                source: None,
            }),
            started_at: SystemTime::now(),
            started: Instant::now(),
            finished: Mutex::new(None),
        }
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters
            .lock()
            .expect("rebuild counters lock poisoned")
    }

    pub(crate) fn progress(&self) -> RebuildProgress {
        let c = self.counters();
        let state = match (&*self.done.borrow(), *self.control.borrow()) {
            (Some(outcome), _) => RebuildState::Done(outcome.clone()),
            (None, Control::Pause) => RebuildState::Paused,
            (None, _) => RebuildState::Running,
        };
        let end = self
            .finished
            .lock()
            .expect("rebuild end lock poisoned")
            .unwrap_or_else(Instant::now);
        RebuildProgress {
            kind: self.kind,
            state,
            total_bytes: c.total.max(c.copied + c.zeroed),
            done_bytes: c.copied + c.zeroed,
            copied_bytes: c.copied,
            zeroed_bytes: c.zeroed,
            source: c.source.clone(),
            started_at: self.started_at,
            elapsed: end - self.started,
        }
    }

    pub(crate) async fn wait(&self) -> RebuildOutcome {
        let mut rx = self.done.subscribe();
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .expect("the sender lives in this struct");
        outcome.clone().expect("waited for Some")
    }
}

/// Why a pass stopped early.
enum Stop {
    Cancelled,
    /// The target left the rebuilding state (faulted, offlined or removed by someone else).
    Superseded,
    /// The target failed; it has been faulted with this reason.
    TargetFailed(String),
    /// No online child is left to copy from.
    NoSource(String),
}

/// Which side of a copy failed.
enum CopyError {
    Source(Error),
    Target(Error),
}

/// The rebuild task for child `id`.
pub(crate) async fn run(shared: Arc<Shared>, id: u64, ctl: Arc<RebuildCtl>) {
    let outcome = loop {
        let stop = pass(&shared, id, &ctl).await;
        let mut state = shared.lock();
        let Some(slot) = state
            .slot(id)
            .filter(|s| s.rebuild.as_ref().is_some_and(|r| Arc::ptr_eq(r, &ctl)))
        else {
            break RebuildOutcome::Cancelled; // removed
        };
        match stop {
            None if slot.state == ChildState::Rebuilding => {
                // A write that skipped the target may have marked a region after the pass
                // went by it (it cannot, given the range lock; this is the safety net).
                if slot.dirty.as_ref().is_some_and(|m| !m.is_clean()) {
                    drop(state);
                    continue;
                }
                slot.dirty = None;
                slot.durable = None;
                slot.state = ChildState::Online;
                state.version += 1;
                shared.refresh(&mut state);
                break RebuildOutcome::Completed;
            }
            Some(Stop::Cancelled) if slot.state == ChildState::Rebuilding => {
                slot.state = ChildState::Offline;
                state.version += 1;
                shared.refresh(&mut state);
                break RebuildOutcome::Cancelled;
            }
            Some(Stop::NoSource(reason)) if slot.state == ChildState::Rebuilding => {
                slot.state = ChildState::Faulted(reason.clone());
                state.version += 1;
                shared.refresh(&mut state);
                break RebuildOutcome::Failed(reason);
            }
            Some(Stop::TargetFailed(reason)) => break RebuildOutcome::Failed(reason),
            _ => match &slot.state {
                ChildState::Faulted(reason) => break RebuildOutcome::Failed(reason.clone()),
                _ => break RebuildOutcome::Cancelled,
            },
        }
    };
    // Record the outcome (a child back online is read from only after a restart if this is
    // durable; until then the record keeps it stale, which is safe).
    let version = shared.lock().version;
    if let Err(e) = shared.persist(version).await {
        tracing::warn!(nexus = %shared.name, child = id, error = %e, "record the rebuild's end");
    }
    *ctl.finished.lock().expect("rebuild end lock poisoned") = Some(Instant::now());
    let p = ctl.progress();
    tracing::info!(nexus = %shared.name, child = id, ?outcome, copied = p.copied_bytes, zeroed = p.zeroed_bytes, "rebuild ended");
    ctl.done.send_replace(Some(outcome));
}

/// One sweep over every segment; `None` when it reached the end.
async fn pass(shared: &Arc<Shared>, id: u64, ctl: &Arc<RebuildCtl>) -> Option<Stop> {
    let segment = shared.settings.rebuild_segment;
    let segments = shared.geometry.size.div_ceil(segment);
    let next = AtomicU64::new(0);
    let stop: Mutex<Option<Stop>> = Mutex::new(None);
    let worker = || async {
        let mut control = ctl.control.subscribe();
        loop {
            let c = *control
                .wait_for(|c| *c != Control::Pause)
                .await
                .expect("the sender lives in the ctl");
            let stopped = stop.lock().expect("stop lock poisoned").is_some();
            if stopped {
                return;
            }
            if c == Control::Cancel {
                stop.lock()
                    .expect("stop lock poisoned")
                    .get_or_insert(Stop::Cancelled);
                return;
            }
            let s = next.fetch_add(1, Ordering::Relaxed);
            if s >= segments {
                return;
            }
            if let Err(e) = copy_segment(shared, id, ctl, s).await {
                stop.lock().expect("stop lock poisoned").get_or_insert(e);
                return;
            }
        }
    };
    join_all((0..shared.settings.rebuild_parallel).map(|_| worker())).await;
    stop.into_inner().expect("stop lock poisoned")
}

/// Copy the dirty granules of segment `s` onto the target, under the segment's range lock.
async fn copy_segment(
    shared: &Arc<Shared>,
    id: u64,
    ctl: &Arc<RebuildCtl>,
    s: u64,
) -> Result<(), Stop> {
    let segment = shared.settings.rebuild_segment;
    let gran = shared.settings.dirty_granularity;
    let size = shared.geometry.size;
    let _lock = shared.locks.segment(s).await;
    let (runs, target) = {
        let mut state = shared.lock();
        let slot = state
            .slot(id)
            .filter(|slot| slot.state == ChildState::Rebuilding)
            .filter(|slot| slot.rebuild.as_ref().is_some_and(|r| Arc::ptr_eq(r, ctl)))
            .ok_or(Stop::Superseded)?;
        let map = slot
            .dirty
            .as_mut()
            .expect("a rebuilding child has a dirty map");
        let per = segment / gran;
        (map.take_granules(s * per, (s + 1) * per), slot.target())
    };
    if runs.is_empty() {
        return Ok(());
    }
    let put_back = |shared: &Shared| {
        if let Some(map) = shared.lock().slot(id).and_then(|s| s.dirty.as_mut()) {
            for &(a, b) in &runs {
                map.set_granules(a, b);
            }
        }
    };
    let mut tried = Vec::new();
    'source: loop {
        // The source is checked under the segment lock: every write to this segment has either
        // reached it or faulted it.
        let source = {
            let state = shared.lock();
            let source = state
                .children
                .iter()
                .filter(|c| c.state == ChildState::Online && !tried.contains(&c.id))
                .map(|c| c.target())
                .next();
            match source {
                Some(t) => t,
                None => {
                    drop(state);
                    put_back(shared);
                    return Err(Stop::NoSource(format!(
                        "rebuild from nexus {}: no healthy child left to copy from",
                        shared.name
                    )));
                }
            }
        };
        ctl.counters().source = Some(source.name.to_string());
        for &(a, b) in &runs {
            let offset = a * gran;
            let end = (b * gran).min(size);
            match copy_range(shared, &source, &target, ctl, offset, end).await {
                Ok(()) => {}
                Err(CopyError::Source(e)) => {
                    let reason = format!("read for rebuild of {}: {}", target.name, e.chain());
                    shared.fault_locked(&mut shared.lock(), source.id, reason);
                    tried.push(source.id);
                    continue 'source;
                }
                Err(CopyError::Target(e)) => {
                    let reason = format!("rebuild write from {}: {}", source.name, e.chain());
                    put_back(shared);
                    shared.fault_locked(&mut shared.lock(), target.id, reason.clone());
                    return Err(Stop::TargetFailed(reason));
                }
            }
        }
        return Ok(());
    }
}

/// Copy `[offset, end)` from `source` to `target`, zeroing what the source reports as zeroes.
async fn copy_range(
    shared: &Shared,
    source: &Target,
    target: &Target,
    ctl: &RebuildCtl,
    offset: u64,
    end: u64,
) -> Result<(), CopyError> {
    let bs = u64::from(shared.geometry.block_size);
    let mut pos = offset;
    while pos < end {
        let extents = call(source, child_io::block_status(&*source.dev, pos, end - pos))
            .await
            .map_err(CopyError::Source)?;
        let first = extents.first().copied().filter(|e| e.len > 0);
        let (len, zero) = match first {
            Some(e) if e.zero && e.len.is_multiple_of(bs) => (e.len.min(end - pos), true),
            Some(e) => (e.len.div_ceil(bs).saturating_mul(bs).min(end - pos), false),
            None => (end - pos, false),
        };
        if zero {
            let opts = ZeroOpts {
                may_trim: true,
                ..ZeroOpts::default()
            };
            call(target, child_io::zeroes(&*target.dev, pos, len, opts))
                .await
                .map_err(CopyError::Target)?;
            ctl.counters().zeroed += len;
        } else {
            let data = call(source, source.dev.read_at(pos, len as usize))
                .await
                .map_err(CopyError::Source)?;
            call(target, target.dev.write_at(pos, data, Default::default()))
                .await
                .map_err(CopyError::Target)?;
            ctl.counters().copied += len;
        }
        pos += len;
    }
    Ok(())
}
