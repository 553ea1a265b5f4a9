//! A vhost-user-blk front-end outside any VM: the driver side of virtio-blk over the `vhost`
//! crate's [`Frontend`], with "guest" memory in a memfd it maps itself. Tests use it to send
//! what no real driver sends (descriptors outside memory, bad headers, loops); the benchmark
//! uses it to drive Strata and qemu-storage-daemon alike without a VM.
//!
//! ```text
//!  BlkFrontend ── unix socket ──► back end (Strata, qemu-storage-daemon)
//!    memfd (shared): rings of every queue | buffers from `alloc`
//!    per queue: kick eventfd ─► back end, call eventfd ◄─ back end
//! ```
//!
//! Blocking and single-threaded: one owner drives every queue.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::codec::{self, Status};

/// The memory the front-end shares.
pub type FrontendMemory = GuestMemoryMmap<()>;

/// How to set a front-end up.
#[derive(Debug, Clone)]
pub struct FrontendOptions {
    /// Bytes of shared memory (rings and buffers).
    pub memory_bytes: usize,
    /// Queues to set up (at most what the back end offers).
    pub num_queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
    /// Negotiate EVENT_IDX (notification suppression), if the back end offers it.
    pub event_idx: bool,
}

impl Default for FrontendOptions {
    fn default() -> FrontendOptions {
        FrontendOptions {
            memory_bytes: 64 << 20,
            num_queues: 1,
            queue_size: 256,
            event_idx: true,
        }
    }
}

/// One descriptor as a test writes it: any address, length, flags and next index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDescriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// A buffer of a chain built by [`BlkFrontend::submit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Buf {
    /// A buffer the device reads.
    pub fn out(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            writable: false,
        }
    }

    /// A buffer the device writes.
    pub fn input(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            writable: true,
        }
    }
}

/// The driver side of one split virtqueue.
#[derive(Debug)]
struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    free: Vec<u16>,
    /// Descriptors of each chain in flight, by head, to free on completion.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

/// A vhost-user-blk front-end.
pub struct BlkFrontend {
    frontend: Frontend,
    memory: FrontendMemory,
    host_base: u64,
    features: u64,
    protocol_features: VhostUserProtocolFeatures,
    event_idx: bool,
    queues: Vec<DriverQueue>,
    next_free: u64,
}

impl std::fmt::Debug for BlkFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkFrontend")
            .field("features", &format_args!("{:#x}", self.features))
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

fn vhost_error(what: &str, e: vhost::Error) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

fn memory_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("shared memory: {e}"))
}

const fn bit(n: u32) -> u64 {
    1 << n
}

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

/// `vring_need_event`: whether moving an index from `old` to `new` passes `event`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl BlkFrontend {
    /// Connects to the back end at `socket`, negotiates (VERSION_1, the virtio-blk features it
    /// offers, protocol features MQ, CONFIG and REPLY_ACK), shares a memfd and sets up
    /// `options.num_queues` queues.
    pub fn connect(socket: &Path, options: &FrontendOptions) -> io::Result<BlkFrontend> {
        let stream = std::os::unix::net::UnixStream::connect(socket)?;
        let frontend = Frontend::from_stream(stream, u64::from(options.num_queues));
        Self::set_up(frontend, options)
    }

    /// Sets up a front-end over an already connected `frontend`.
    fn set_up(mut frontend: Frontend, options: &FrontendOptions) -> io::Result<BlkFrontend> {
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new
        // descriptor or -1.
        let fd =
            unsafe { libc::memfd_create(c"strata-vhost-frontend".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(options.memory_bytes as u64)?;
        let memory = FrontendMemory::from_ranges_with_files([(
            GuestAddress(0),
            options.memory_bytes,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )])
        .map_err(memory_error)?;
        let host_base = memory
            .get_host_address(GuestAddress(0))
            .map_err(memory_error)? as u64;

        frontend
            .set_owner()
            .map_err(|e| vhost_error("SET_OWNER", e))?;
        let offered = frontend
            .get_features()
            .map_err(|e| vhost_error("GET_FEATURES", e))?;
        let mut wanted = bit(VIRTIO_F_VERSION_1)
            | bit(codec::VHOST_USER_F_PROTOCOL_FEATURES)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | (0..24).map(bit).sum::<u64>();
        if options.event_idx {
            wanted |= bit(VIRTIO_RING_F_EVENT_IDX);
        }
        let features = offered & wanted;
        frontend
            .set_features(features)
            .map_err(|e| vhost_error("SET_FEATURES", e))?;
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if features & bit(codec::VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(|e| vhost_error("GET_PROTOCOL_FEATURES", e))?;
            protocol_features = offered
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK);
            frontend
                .set_protocol_features(protocol_features)
                .map_err(|e| vhost_error("SET_PROTOCOL_FEATURES", e))?;
            if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every message is acknowledged, so a refusal is seen where it happens.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let max = frontend
                .get_queue_num()
                .map_err(|e| vhost_error("GET_QUEUE_NUM", e))?;
            if u64::from(options.num_queues) > max {
                return Err(io::Error::other(format!(
                    "the back end offers {max} queues, not {}",
                    options.num_queues
                )));
            }
        }
        frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: options.memory_bytes as u64,
                userspace_addr: host_base,
                mmap_offset: 0,
                mmap_handle: file.as_raw_fd(),
            }])
            .map_err(|e| vhost_error("SET_MEM_TABLE", e))?;

        let mut this = BlkFrontend {
            frontend,
            memory,
            host_base,
            features,
            protocol_features,
            event_idx: features & bit(VIRTIO_RING_F_EVENT_IDX) != 0,
            queues: Vec::new(),
            next_free: 0,
        };
        for q in 0..options.num_queues {
            this.add_queue(usize::from(q), options.queue_size)?;
        }
        // The memfd stays mapped by `memory`; the descriptor itself is no longer needed.
        drop(file);
        Ok(this)
    }

    fn add_queue(&mut self, index: usize, size: u16) -> io::Result<()> {
        let n = u64::from(size);
        let desc = self.alloc(16 * n, 4096)?;
        let avail = self.alloc(6 + 2 * n, 2)?;
        let used = self.alloc(6 + 8 * n, 4096)?;
        let kick = EventFd::new(libc::EFD_NONBLOCK)?;
        let call = EventFd::new(0)?;
        let f = &mut self.frontend;
        f.set_vring_num(index, size)
            .map_err(|e| vhost_error("SET_VRING_NUM", e))?;
        f.set_vring_addr(
            index,
            &VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: 0,
                desc_table_addr: self.host_base + desc,
                used_ring_addr: self.host_base + used,
                avail_ring_addr: self.host_base + avail,
                log_addr: None,
            },
        )
        .map_err(|e| vhost_error("SET_VRING_ADDR", e))?;
        f.set_vring_base(index, 0)
            .map_err(|e| vhost_error("SET_VRING_BASE", e))?;
        f.set_vring_call(index, &call)
            .map_err(|e| vhost_error("SET_VRING_CALL", e))?;
        f.set_vring_kick(index, &kick)
            .map_err(|e| vhost_error("SET_VRING_KICK", e))?;
        if self.features & bit(codec::VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            f.set_vring_enable(index, true)
                .map_err(|e| vhost_error("SET_VRING_ENABLE", e))?;
        }
        self.queues.push(DriverQueue {
            size,
            desc,
            avail,
            used,
            kick,
            call,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            avail_idx: 0,
            last_used: 0,
        });
        Ok(())
    }

    /// The shared memory ("guest physical" addresses start at 0).
    pub fn memory(&self) -> &FrontendMemory {
        &self.memory
    }

    /// The shared memory's size.
    pub fn memory_size(&self) -> u64 {
        self.memory.last_addr().0 + 1
    }

    /// The negotiated virtio features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The negotiated protocol features.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// The underlying vhost-user front-end, to send messages of a test's choosing.
    pub fn vhost(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Carves `len` bytes aligned to `align` out of the shared memory.
    pub fn alloc(&mut self, len: u64, align: u64) -> io::Result<u64> {
        let start = align_up(self.next_free, align.max(1));
        let end = start
            .checked_add(len)
            .filter(|&end| end <= self.memory_size())
            .ok_or_else(|| io::Error::other("the front-end's shared memory is full"))?;
        self.next_free = end;
        Ok(start)
    }

    /// Reads `len` bytes of the configuration space at `offset`.
    pub fn config(&mut self, offset: u32, len: u32) -> io::Result<Vec<u8>> {
        let buf = vec![0u8; len as usize];
        let (_, payload) = self
            .frontend
            .get_config(offset, len, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(|e| vhost_error("GET_CONFIG", e))?;
        Ok(payload)
    }

    /// The capacity in 512-byte sectors.
    pub fn capacity(&mut self) -> io::Result<u64> {
        let bytes = self.config(0, 8)?;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&bytes);
        Ok(u64::from_le_bytes(raw))
    }

    /// Writes raw descriptors into queue `q`'s table at their indices (`(index, descriptor)`)
    /// and publishes `head` on the available ring, unchecked: for malformed chains. The
    /// descriptors are not tracked: their entries are never reused by [`submit`](Self::submit)
    /// if they were taken from [`reserve`](Self::reserve).
    pub fn submit_raw(
        &mut self,
        q: usize,
        table: &[(u16, RawDescriptor)],
        head: u16,
    ) -> io::Result<()> {
        let queue = &self.queues[q];
        for &(index, d) in table {
            let addr = GuestAddress(queue.desc + 16 * u64::from(index % queue.size));
            self.memory
                .write_obj(Descriptor::new(d.addr, d.len, d.flags, d.next), addr)
                .map_err(memory_error)?;
        }
        self.publish(q, head)
    }

    /// Takes `n` descriptor entries of queue `q` for [`submit_raw`](Self::submit_raw).
    pub fn reserve(&mut self, q: usize, n: usize) -> io::Result<Vec<u16>> {
        let queue = &mut self.queues[q];
        if queue.free.len() < n {
            return Err(io::Error::other("no free descriptors"));
        }
        let at = queue.free.len() - n;
        Ok(queue.free.split_off(at))
    }

    fn publish(&mut self, q: usize, head: u16) -> io::Result<()> {
        let queue = &mut self.queues[q];
        let slot = u64::from(queue.avail_idx % queue.size);
        self.memory
            .write_obj(head.to_le(), GuestAddress(queue.avail + 4 + 2 * slot))
            .map_err(memory_error)?;
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        self.memory
            .store(
                queue.avail_idx.to_le(),
                GuestAddress(queue.avail + 2),
                Ordering::Release,
            )
            .map_err(memory_error)
    }

    /// Adds a chain of `bufs` to queue `q` (without kicking); returns its head.
    pub fn submit(&mut self, q: usize, bufs: &[Buf]) -> io::Result<u16> {
        let queue = &mut self.queues[q];
        if bufs.is_empty() || queue.free.len() < bufs.len() {
            return Err(io::Error::other("no free descriptors for the chain"));
        }
        let at = queue.free.len() - bufs.len();
        let indices = queue.free.split_off(at);
        for (i, buf) in bufs.iter().enumerate() {
            let mut flags = 0u16;
            if buf.writable {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            let next = indices.get(i + 1).copied().unwrap_or(0);
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let addr = GuestAddress(queue.desc + 16 * u64::from(indices[i]));
            self.memory
                .write_obj(Descriptor::new(buf.addr, buf.len, flags, next), addr)
                .map_err(memory_error)?;
        }
        let head = indices[0];
        queue.chains[usize::from(head)] = indices;
        self.publish(q, head)?;
        Ok(head)
    }

    /// Notifies the back end of new chains on queue `q` (if EVENT_IDX allows skipping it and
    /// the back end is still busy, no notification is sent).
    pub fn kick(&mut self, q: usize, published_before: u16) -> io::Result<()> {
        let queue = &self.queues[q];
        if self.event_idx {
            let at = GuestAddress(queue.used + 4 + 8 * u64::from(queue.size));
            let avail_event: u16 = self
                .memory
                .load(at, Ordering::Acquire)
                .map(u16::from_le)
                .map_err(memory_error)?;
            if !need_event(avail_event, queue.avail_idx, published_before) {
                return Ok(());
            }
        }
        queue.kick.write(1)
    }

    /// The available index of queue `q` (to pass to [`kick`](Self::kick) after submitting).
    pub fn avail_idx(&self, q: usize) -> u16 {
        self.queues[q].avail_idx
    }

    /// Completed chains of queue `q` (head, bytes written) without waiting.
    pub fn poll_used(&mut self, q: usize) -> io::Result<Vec<(u16, u32)>> {
        let queue = &mut self.queues[q];
        let used_idx: u16 = self
            .memory
            .load(GuestAddress(queue.used + 2), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(memory_error)?;
        let mut out = Vec::new();
        while queue.last_used != used_idx {
            let slot = u64::from(queue.last_used % queue.size);
            let at = GuestAddress(queue.used + 4 + 8 * slot);
            let id: u32 = self.memory.read_obj(at).map_err(memory_error)?;
            let len: u32 = self
                .memory
                .read_obj(at.unchecked_add(4))
                .map_err(memory_error)?;
            let head = u32::from_le(id) as u16;
            if let Some(chain) = queue.chains.get_mut(usize::from(head)) {
                queue.free.append(chain);
            }
            out.push((head, u32::from_le(len)));
            queue.last_used = queue.last_used.wrapping_add(1);
        }
        Ok(out)
    }

    /// Waits (up to `timeout`) until queue `q` has completed chains, and returns them.
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> io::Result<Vec<(u16, u32)>> {
        let deadline = Instant::now() + timeout;
        loop {
            // Ask for a notification as soon as anything past what was seen completes.
            let queue = &self.queues[q];
            let at = GuestAddress(queue.avail + 4 + 2 * u64::from(queue.size));
            self.memory
                .store(queue.last_used.to_le(), at, Ordering::SeqCst)
                .map_err(memory_error)?;
            let done = self.poll_used(q)?;
            if !done.is_empty() {
                return Ok(done);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no completion from the back end",
                ));
            }
            let call = self.queues[q].call.as_raw_fd();
            let mut pollfd = libc::pollfd {
                fd: call,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = (deadline - now).as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pollfd, 1, ms.max(1)) };
            if n > 0 {
                self.queues[q].call.read()?;
            }
        }
    }

    /// Sends one request on queue `q` and waits for it: `out` is written after the header,
    /// `in_len` bytes are read back; returns the status byte (None if the back end wrote no
    /// status) and the data.
    pub fn request(
        &mut self,
        q: usize,
        request_type: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> io::Result<(Option<u8>, Vec<u8>)> {
        let mark = self.next_free;
        let result = self.request_inner(q, request_type, sector, out, in_len);
        self.next_free = mark;
        result
    }

    fn request_inner(
        &mut self,
        q: usize,
        request_type: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> io::Result<(Option<u8>, Vec<u8>)> {
        let header = self.alloc(codec::HEADER_LEN as u64, 16)?;
        self.memory
            .write_slice(
                &codec::encode_header(request_type, sector),
                GuestAddress(header),
            )
            .map_err(memory_error)?;
        let mut bufs = vec![Buf::out(header, codec::HEADER_LEN as u32)];
        if !out.is_empty() {
            let at = self.alloc(out.len() as u64, 4096)?;
            self.memory
                .write_slice(out, GuestAddress(at))
                .map_err(memory_error)?;
            bufs.push(Buf::out(at, out.len() as u32));
        }
        let data_in = if in_len > 0 {
            let at = self.alloc(u64::from(in_len), 4096)?;
            bufs.push(Buf::input(at, in_len));
            Some(at)
        } else {
            None
        };
        let status = self.alloc(1, 1)?;
        self.memory
            .write_slice(&[0xff], GuestAddress(status))
            .map_err(memory_error)?;
        bufs.push(Buf::input(status, 1));
        let before = self.avail_idx(q);
        let head = self.submit(q, &bufs)?;
        self.kick(q, before)?;
        let (_, written) = self.wait_for(q, head, Duration::from_secs(30))?;
        let mut data = vec![0u8; in_len as usize];
        if let Some(at) = data_in {
            self.memory
                .read_slice(&mut data, GuestAddress(at))
                .map_err(memory_error)?;
        }
        let mut byte = [0u8];
        self.memory
            .read_slice(&mut byte, GuestAddress(status))
            .map_err(memory_error)?;
        Ok(((written > 0 && byte[0] != 0xff).then_some(byte[0]), data))
    }

    /// Waits for chain `head` of queue `q` (other completions are dropped).
    pub fn wait_for(&mut self, q: usize, head: u16, timeout: Duration) -> io::Result<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            for done in self.wait_used(q, left)? {
                if done.0 == head {
                    return Ok(done);
                }
            }
        }
    }

    /// Reads `len` bytes at byte `offset`; the status (OK expected) and the data.
    pub fn read(&mut self, q: usize, offset: u64, len: u32) -> io::Result<(Option<u8>, Vec<u8>)> {
        self.request(
            q,
            virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN,
            offset / codec::SECTOR_SIZE,
            &[],
            len,
        )
    }

    /// Writes `data` at byte `offset`; the status.
    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> io::Result<Option<u8>> {
        self.request(
            q,
            virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT,
            offset / codec::SECTOR_SIZE,
            data,
            0,
        )
        .map(|(status, _)| status)
    }

    /// Whether `status` is OK.
    pub fn ok(status: Option<u8>) -> bool {
        status == Some(Status::Ok as u8)
    }
}
