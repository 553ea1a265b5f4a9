//! One front-end's session: the [`VhostUserBackend`] that vhost-user-backend's threads drive,
//! and the requests it runs against the block device.
//!
//! ```text
//!  kick ─► queue thread q (vhost-user-backend's worker): pop every available chain
//!            ├─ layout + header (codec) ─► bad: status written at once
//!            └─ request future ─► polled once here (inside the runtime's context)
//!                  ├─ ready (memory, page-cache hit): completed with the rest of the batch
//!                  └─ pending: spawned on the tokio runtime, completed when it finishes
//!  completion: data and status into guest memory (vm-memory) ─► used ring ─► call eventfd
//! ```
//!
//! Requests of one queue are in flight together and complete in any order. Every guest
//! address goes through `vm-memory`, which refuses what lies outside the guest's memory; the
//! device refuses what lies outside the volume.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use strata_bdev::{BlockDevice, ErrorKind, WriteOpts, ZeroOpts};
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, SemaphorePermit};
use tracing::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringMutex, VringState, VringT};
use virtio_bindings::virtio_blk as blk;
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes as _, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard,
    GuestMemoryMmap, VolatileMemoryError, VolatileSlice, WriteVolatile,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::codec::{self, Config, Layout, Offer, Piece, RequestType, Status};
use crate::settings::VhostUserSettings;

/// Guest memory as this crate maps it (no dirty-page log: live migration is not offered).
pub(crate) type Memory = GuestMemoryMmap<()>;
pub(crate) type AtomicMemory = GuestMemoryAtomic<Memory>;
type Vring = VringMutex<AtomicMemory>;
type Chain = DescriptorChain<GuestMemoryLoadGuard<Memory>>;

/// Requests with at most this much data are first polled on the queue thread.
const INLINE_BYTES: u64 = 64 << 10;

/// A volume as every session of its export sees it.
#[derive(Debug)]
pub(crate) struct Disk {
    pub name: String,
    pub device: Arc<dyn BlockDevice>,
    pub read_only: bool,
    /// The capacity announced to front-ends, in sectors; changed by `resized`.
    pub capacity: AtomicU64,
    pub settings: Arc<VhostUserSettings>,
}

impl Disk {
    pub(crate) fn new(
        name: String,
        device: Arc<dyn BlockDevice>,
        read_only: bool,
        settings: Arc<VhostUserSettings>,
    ) -> Disk {
        let capacity = device.geometry().size / codec::SECTOR_SIZE;
        Disk {
            name,
            read_only: read_only || device.capabilities().read_only,
            device,
            capacity: AtomicU64::new(capacity),
            settings,
        }
    }

    fn offer(&self) -> Offer {
        Offer {
            read_only: self.read_only,
            discard: self.device.capabilities().trim,
        }
    }
}

/// Requests popped from each queue and not yet completed.
#[derive(Debug)]
struct InFlight {
    counts: Vec<AtomicUsize>,
    lock: Mutex<()>,
    idle: Condvar,
}

impl InFlight {
    fn new(queues: usize) -> InFlight {
        InFlight {
            counts: (0..queues).map(|_| AtomicUsize::new(0)).collect(),
            lock: Mutex::new(()),
            idle: Condvar::new(),
        }
    }

    fn done(&self, queue: usize, n: usize) {
        if n == 0 {
            return;
        }
        if self.counts[queue].fetch_sub(n, Ordering::AcqRel) == n {
            // Take the lock so that a waiter between its check and its wait is not missed.
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.idle.notify_all();
        }
    }

    /// Waits until the queues in `queues` have nothing in flight, or `deadline`; true if idle.
    fn wait_idle(&self, queues: impl Iterator<Item = usize> + Clone, deadline: Instant) -> bool {
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if queues
                .clone()
                .all(|q| self.counts[q].load(Ordering::Acquire) == 0)
            {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = self
                .idle
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// One front-end's connection: what vhost-user-backend calls into.
#[derive(Debug)]
pub(crate) struct Session {
    disk: Arc<Disk>,
    runtime: Handle,
    mem: AtomicMemory,
    offer: Offer,
    event_idx: AtomicBool,
    /// The driver's cache mode: false means every write must be durable when it completes.
    writeback: AtomicBool,
    /// No more chains are taken from the queues.
    stopping: AtomicBool,
    /// False once the session gave up on requests still in flight: they no longer touch guest
    /// memory or the rings. Completions hold it shared while they write.
    open: RwLock<bool>,
    /// Serializes `stopping` checks with the increments of `in_flight`, per queue.
    pop: Vec<Mutex<()>>,
    in_flight: InFlight,
    budget: Semaphore,
}

impl Session {
    pub(crate) fn new(disk: Arc<Disk>, runtime: Handle, mem: AtomicMemory) -> Session {
        let queues = usize::from(disk.settings.max_queues);
        let budget = disk
            .settings
            .max_in_flight_bytes
            .min(Semaphore::MAX_PERMITS as u64) as usize;
        Session {
            offer: disk.offer(),
            writeback: AtomicBool::new(disk.device.capabilities().flush),
            disk,
            runtime,
            mem,
            event_idx: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            open: RwLock::new(true),
            pop: (0..queues).map(|_| Mutex::new(())).collect(),
            in_flight: InFlight::new(queues),
            budget: Semaphore::new(budget),
        }
    }

    /// The configuration space as of now.
    pub(crate) fn config(&self) -> Config {
        let geometry = self.disk.device.geometry();
        let topology = codec::topology(geometry.block_size, geometry.optimal_io_size);
        let settings = &self.disk.settings;
        Config {
            capacity: self.disk.capacity.load(Ordering::Acquire),
            seg_max: settings.seg_max,
            topology,
            writeback: self.writeback.load(Ordering::Relaxed),
            num_queues: settings.max_queues,
            max_discard_sectors: settings.max_discard_sectors,
            max_discard_seg: settings.max_discard_segments,
            discard_sector_alignment: topology.blk_size / codec::SECTOR_SIZE as u32,
            max_write_zeroes_sectors: settings.max_discard_sectors,
            max_write_zeroes_seg: settings.max_discard_segments,
            write_zeroes_may_unmap: self.disk.device.capabilities().trim,
        }
    }

    /// Stops taking requests and waits (until `deadline`) for those in flight; past it, gives
    /// up on them: they still reach the device, but no longer touch guest memory or the rings.
    /// True if everything in flight completed.
    pub(crate) fn quiesce(&self, deadline: Instant) -> bool {
        self.stopping.store(true, Ordering::Release);
        for pop in &self.pop {
            // Wait out a queue thread that is between its check and its increment.
            drop(pop.lock().unwrap_or_else(|p| p.into_inner()));
        }
        let idle = self
            .in_flight
            .wait_idle(0..self.in_flight.counts.len(), deadline);
        if !idle {
            *self.open.write().unwrap_or_else(|p| p.into_inner()) = false;
        }
        idle
    }

    /// Takes every available chain of `queue` and runs them.
    fn process_queue(self: &Arc<Self>, queue: usize, vring: &Vring) {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            let chains = {
                let _pop = self.pop[queue].lock().unwrap_or_else(|p| p.into_inner());
                if self.stopping.load(Ordering::Acquire) {
                    return;
                }
                let mut state = vring.get_mut();
                if event_idx {
                    if let Err(e) = state.disable_notification() {
                        debug!(queue, error = %e, "disable notifications");
                    }
                }
                let chains = pop_all(&mut state, self.mem.memory(), queue);
                self.in_flight.counts[queue].fetch_add(chains.len(), Ordering::AcqRel);
                chains
            };
            self.run(queue, vring, chains);
            if !event_idx {
                return;
            }
            // Re-enable notifications; if more chains came meanwhile, take them now.
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    debug!(queue, error = %e, "enable notifications");
                    return;
                }
            }
        }
    }

    /// Runs popped chains: each is answered at once, finished by a first poll here, or
    /// spawned; the ones done here are completed together.
    fn run(self: &Arc<Self>, queue: usize, vring: &Vring, chains: Vec<Chain>) {
        if chains.is_empty() {
            return;
        }
        let memory = self.mem.memory().into_inner();
        let _runtime = self.runtime.enter();
        let mut done = Vec::with_capacity(chains.len());
        for chain in chains {
            let head = chain.head_index();
            match self.prepare(chain, &memory) {
                Prepared::Answered(len) => done.push((head, len)),
                Prepared::Run(request) => {
                    let inline =
                        request.layout.in_len().max(request.layout.out_len()) <= INLINE_BYTES;
                    let mut future: Pin<Box<dyn Future<Output = u32> + Send>> =
                        Box::pin(self.clone().execute(request));
                    let mut cx = Context::from_waker(Waker::noop());
                    // Small requests get a first poll here: a memory device or a page-cache
                    // hit completes without a handoff. Large ones go to the runtime at once,
                    // so that their copies run on its threads in parallel while this thread
                    // takes the next chains.
                    let polled = if inline {
                        future.as_mut().poll(&mut cx)
                    } else {
                        Poll::Pending
                    };
                    match polled {
                        Poll::Ready(len) => done.push((head, len)),
                        Poll::Pending => {
                            let session = self.clone();
                            let vring = vring.clone();
                            self.runtime.spawn(async move {
                                let len = future.await;
                                session.complete(queue, &vring, &[(head, len)]);
                            });
                        }
                    }
                }
            }
        }
        self.complete(queue, vring, &done);
    }

    /// Puts completed chains on the used ring and notifies the driver if it asked to be.
    fn complete(&self, queue: usize, vring: &Vring, done: &[(u16, u32)]) {
        if done.is_empty() {
            return;
        }
        let open = self.open.read().unwrap_or_else(|p| p.into_inner());
        if *open {
            let mut state = vring.get_mut();
            for &(head, len) in done {
                if let Err(e) = state.add_used(head, len) {
                    debug!(queue, head, error = %e, "put a chain on the used ring");
                }
            }
            match state.needs_notification() {
                Ok(false) => {}
                Ok(true) | Err(_) => {
                    if let Err(e) = state.signal_used_queue() {
                        debug!(queue, error = %e, "notify the driver");
                    }
                }
            }
        }
        drop(open);
        self.in_flight.done(queue, done.len());
    }

    /// Turns a chain into a request, or answers it at once.
    fn prepare(&self, chain: Chain, memory: &Arc<Memory>) -> Prepared {
        let buffers: Vec<codec::Buffer> = chain
            .map(|d| codec::Buffer {
                addr: d.addr().0,
                len: d.len(),
                writable: d.is_write_only(),
            })
            .collect();
        let layout = match codec::layout(&buffers) {
            Ok(layout) => layout,
            Err((why, status)) => {
                debug!(volume = %self.disk.name, error = %why, "malformed request");
                return match status {
                    Some(addr) => self.answer(memory, addr, Status::IoErr),
                    None => Prepared::Answered(0),
                };
            }
        };
        let mut header = [0u8; codec::HEADER_LEN];
        if gather(memory, &layout.header, &mut header).is_err() {
            debug!(volume = %self.disk.name, "request header outside guest memory");
            return self.answer(memory, layout.status, Status::IoErr);
        }
        let header = codec::decode_header(&header);
        if let Err(status) = codec::admit(header.request_type, self.offer) {
            debug!(volume = %self.disk.name, request = ?header.request_type, ?status, "request refused");
            return self.answer(memory, layout.status, status);
        }
        Prepared::Run(Request {
            header,
            layout,
            memory: memory.clone(),
        })
    }

    /// Writes `status` and completes the chain with one byte written (none if the status
    /// byte is outside guest memory).
    fn answer(&self, memory: &Memory, status_addr: u64, status: Status) -> Prepared {
        Prepared::Answered(self.write_status(memory, status_addr, status))
    }

    fn write_status(&self, memory: &Memory, addr: u64, status: Status) -> u32 {
        let open = self.open.read().unwrap_or_else(|p| p.into_inner());
        if !*open {
            return 0;
        }
        match memory.write_slice(&[status as u8], GuestAddress(addr)) {
            Ok(()) => 1,
            Err(_) => 0,
        }
    }

    /// Runs one request; returns the bytes written into the chain (data and status).
    async fn execute(self: Arc<Self>, request: Request) -> u32 {
        let Request {
            header,
            layout,
            memory,
        } = request;
        let result = match header.request_type {
            RequestType::In => self.read(&memory, header.sector, &layout).await,
            RequestType::Out => self.write(&memory, header.sector, &layout).await,
            RequestType::Flush => self.flush().await,
            RequestType::GetId => self.get_id(&memory, &layout),
            RequestType::Discard => self.discard_or_zero(&memory, &layout, true).await,
            RequestType::WriteZeroes => self.discard_or_zero(&memory, &layout, false).await,
            RequestType::Other(_) => Err(Status::Unsupp),
        };
        let (status, data) = match result {
            Ok(data) => (Status::Ok, data),
            Err(status) => (status, 0),
        };
        let written = self.write_status(&memory, layout.status, status);
        if written == 0 {
            0
        } else {
            data.saturating_add(written)
        }
    }

    fn io_error(&self, what: &str, e: &strata_bdev::Error) -> Status {
        match e.kind() {
            ErrorKind::Unsupported => Status::Unsupp,
            _ => {
                warn!(volume = %self.disk.name, error = %e.chain(), "{what}");
                Status::IoErr
            }
        }
    }

    fn capacity(&self) -> u64 {
        self.disk.capacity.load(Ordering::Acquire)
    }

    fn block_size(&self) -> u32 {
        self.disk.device.geometry().block_size
    }

    async fn permit(&self, bytes: u64) -> Result<SemaphorePermit<'_>, Status> {
        let n = u32::try_from(bytes).map_err(|_| Status::IoErr)?;
        match self.budget.try_acquire_many(n) {
            Ok(permit) => Ok(permit),
            Err(_) => self.budget.acquire_many(n).await.map_err(|_| Status::IoErr),
        }
    }

    async fn read(&self, memory: &Memory, sector: u64, layout: &Layout) -> Result<u32, Status> {
        let len = layout.in_len();
        let offset = codec::check_rw(sector, len, self.capacity(), self.block_size())?;
        let chunk = self.disk.settings.io_chunk_bytes;
        let mut cursor = Cursor::new(&layout.data_in);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk);
            let _permit = self.permit(n).await?;
            let data = self
                .disk
                .device
                .read_at(offset + done, n as usize)
                .await
                .map_err(|e| self.io_error("read", &e))?;
            if data.len() as u64 != n {
                warn!(volume = %self.disk.name, "the device returned {} bytes for a read of {n}", data.len());
                return Err(Status::IoErr);
            }
            let open = self.open.read().unwrap_or_else(|p| p.into_inner());
            if !*open {
                return Err(Status::IoErr);
            }
            scatter(memory, &mut cursor, &data).map_err(|()| Status::IoErr)?;
            drop(open);
            done += n;
        }
        u32::try_from(len).map_err(|_| Status::IoErr)
    }

    async fn write(&self, memory: &Memory, sector: u64, layout: &Layout) -> Result<u32, Status> {
        let len = layout.out_len();
        let offset = codec::check_rw(sector, len, self.capacity(), self.block_size())?;
        let chunk = self.disk.settings.io_chunk_bytes;
        let opts = WriteOpts {
            fua: !self.writeback.load(Ordering::Relaxed),
        };
        let mut cursor = Cursor::new(&layout.data_out);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk);
            let _permit = self.permit(n).await?;
            let data = gather_bytes(memory, &mut cursor, n).map_err(|()| Status::IoErr)?;
            self.disk
                .device
                .write_at(offset + done, data, opts)
                .await
                .map_err(|e| self.io_error("write", &e))?;
            done += n;
        }
        Ok(0)
    }

    async fn flush(&self) -> Result<u32, Status> {
        self.disk
            .device
            .flush()
            .await
            .map_err(|e| self.io_error("flush", &e))?;
        Ok(0)
    }

    fn get_id(&self, memory: &Memory, layout: &Layout) -> Result<u32, Status> {
        let id = codec::device_id(&self.disk.name);
        let n = (layout.in_len().min(id.len() as u64)) as usize;
        let open = self.open.read().unwrap_or_else(|p| p.into_inner());
        if !*open {
            return Err(Status::IoErr);
        }
        scatter(memory, &mut Cursor::new(&layout.data_in), &id[..n]).map_err(|()| Status::IoErr)?;
        Ok(n as u32)
    }

    async fn discard_or_zero(
        &self,
        memory: &Memory,
        layout: &Layout,
        discard: bool,
    ) -> Result<u32, Status> {
        let settings = &self.disk.settings;
        let max_bytes = u64::from(settings.max_discard_segments) * codec::SEGMENT_LEN as u64;
        let len = layout.out_len();
        if len > max_bytes {
            return Err(Status::IoErr);
        }
        let bytes = gather_bytes(memory, &mut Cursor::new(&layout.data_out), len)
            .map_err(|()| Status::IoErr)?;
        let segments = codec::decode_segments(&bytes, settings.max_discard_segments)?;
        let (capacity, block_size) = (self.capacity(), self.block_size());
        let ranges = segments
            .into_iter()
            .map(|s| {
                codec::check_segment(
                    s,
                    discard,
                    capacity,
                    block_size,
                    settings.max_discard_sectors,
                )
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let fua = !self.writeback.load(Ordering::Relaxed);
        for range in ranges {
            let result = if discard {
                self.disk
                    .device
                    .trim(range.offset, range.len, WriteOpts { fua })
                    .await
            } else {
                let opts = ZeroOpts {
                    fua,
                    may_trim: range.unmap,
                    fast_only: false,
                };
                self.disk
                    .device
                    .write_zeroes(range.offset, range.len, opts)
                    .await
            };
            result
                .map_err(|e| self.io_error(if discard { "discard" } else { "write zeroes" }, &e))?;
        }
        Ok(0)
    }
}

/// Pops every available chain of a queue.
fn pop_all(
    state: &mut VringState<AtomicMemory>,
    memory: GuestMemoryLoadGuard<Memory>,
    queue: usize,
) -> Vec<Chain> {
    match state.get_queue_mut().iter(memory) {
        Ok(chains) => chains.collect(),
        Err(e) => {
            debug!(queue, error = %e, "read the available ring");
            Vec::new()
        }
    }
}

/// What a chain became.
enum Prepared {
    /// Answered at once; the bytes written into the chain.
    Answered(u32),
    /// A request to run.
    Run(Request),
}

/// A request that passed the checks that need no device.
struct Request {
    header: codec::Header,
    layout: Layout,
    /// The guest memory the chain points into, kept mapped until the request completes.
    memory: Arc<Memory>,
}

/// A position in a list of guest buffer pieces.
struct Cursor<'a> {
    pieces: &'a [Piece],
    index: usize,
    offset: u32,
}

impl<'a> Cursor<'a> {
    fn new(pieces: &'a [Piece]) -> Cursor<'a> {
        Cursor {
            pieces,
            index: 0,
            offset: 0,
        }
    }

    /// The next run of at most `max` bytes: its guest address and length.
    fn next(&mut self, max: u64) -> Option<(GuestAddress, usize)> {
        while let Some(piece) = self.pieces.get(self.index) {
            let left = piece.len - self.offset;
            if left == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let n = u64::from(left).min(max) as u32;
            let addr = GuestAddress(piece.addr + u64::from(self.offset));
            self.offset += n;
            return Some((addr, n as usize));
        }
        None
    }
}

/// Copies `data` into guest memory at the cursor.
fn scatter(memory: &Memory, cursor: &mut Cursor<'_>, mut data: &[u8]) -> Result<(), ()> {
    while !data.is_empty() {
        let (addr, n) = cursor.next(data.len() as u64).ok_or(())?;
        memory.write_slice(&data[..n], addr).map_err(|_| ())?;
        data = &data[n..];
    }
    Ok(())
}

/// Copies guest memory at the pieces into `out` (exactly `out.len()` bytes).
fn gather(memory: &Memory, pieces: &[Piece], out: &mut [u8]) -> Result<(), ()> {
    let mut cursor = Cursor::new(pieces);
    let mut at = 0;
    while at < out.len() {
        let (addr, n) = cursor.next((out.len() - at) as u64).ok_or(())?;
        memory
            .read_slice(&mut out[at..at + n], addr)
            .map_err(|_| ())?;
        at += n;
    }
    Ok(())
}

/// Copies `len` bytes of guest memory at the cursor into a new buffer.
fn gather_bytes(memory: &Memory, cursor: &mut Cursor<'_>, len: u64) -> Result<Bytes, ()> {
    let len = usize::try_from(len).map_err(|_| ())?;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let (addr, n) = cursor.next((len - out.len()) as u64).ok_or(())?;
        memory
            .write_all_volatile_to(addr, &mut Append(&mut out), n)
            .map_err(|_| ())?;
    }
    Ok(Bytes::from(out))
}

/// Appends guest bytes to a vector without zeroing its spare capacity first.
struct Append<'a>(&'a mut Vec<u8>);

impl WriteVolatile for Append<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let n = buf.len();
        self.0.reserve(n);
        let guard = buf.ptr_guard();
        let len = self.0.len();
        // SAFETY: `guard` points at `n` readable bytes of guest memory, mapped for as long as
        // the guard lives; the destination is the vector's spare capacity, reserved above for
        // at least `n` bytes. Guest memory and the heap cannot overlap. The bytes are
        // initialized by the copy before `set_len` exposes them.
        unsafe {
            std::ptr::copy_nonoverlapping(guard.as_ptr(), self.0.as_mut_ptr().add(len), n);
            self.0.set_len(len + n);
        }
        Ok(n)
    }
}

/// The session as vhost-user-backend holds it: cloned into every queue thread.
#[derive(Debug, Clone)]
pub(crate) struct SessionHandle(pub Arc<Session>);

impl VhostUserBackend for SessionHandle {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.0.disk.settings.max_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.disk.settings.queue_size)
    }

    fn features(&self) -> u64 {
        codec::device_features(self.0.offer)
    }

    fn acked_features(&self, features: u64) {
        // A driver that did not take FLUSH cannot flush: every write must be durable. One that
        // took FLUSH but not CONFIG_WCE treats the cache as write back.
        let flush = features & (1 << blk::VIRTIO_BLK_F_FLUSH) != 0;
        let wce = features & (1 << blk::VIRTIO_BLK_F_CONFIG_WCE) != 0;
        if !flush {
            self.0.writeback.store(false, Ordering::Relaxed);
        } else if !wce {
            self.0.writeback.store(true, Ordering::Relaxed);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.0.config().read(offset, size).unwrap_or_default()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        match codec::decode_config_write(offset, buf) {
            Some(writeback) => {
                self.0.writeback.store(writeback, Ordering::Relaxed);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a write of {} bytes at offset {offset} of the configuration space",
                    buf.len()
                ),
            )),
        }
    }

    fn update_memory(&self, _mem: AtomicMemory) -> io::Result<()> {
        // The handler replaced the memory inside the GuestMemoryAtomic this session shares.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.0.disk.settings.max_queues)
            .map(|q| 1u64 << q)
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!(error = %e, "create a queue thread's exit event");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let queue = queue_index as usize;
        if queue >= self.0.in_flight.counts.len() {
            return Ok(());
        }
        let deadline = Instant::now() + self.0.disk.settings.shutdown_timeout;
        if !self.0.in_flight.wait_idle(std::iter::once(queue), deadline) {
            warn!(volume = %self.0.disk.name, queue, "requests still in flight when the queue stopped");
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // One queue per thread: the thread's index is the queue's. Anything else (nothing else
        // is registered) is ignored rather than allowed to stop the thread with an error.
        if device_event != 0 {
            return Ok(());
        }
        if let (Some(vring), true) = (vrings.first(), thread_id < self.0.in_flight.counts.len()) {
            self.0.process_queue(thread_id, vring);
        }
        Ok(())
    }
}
