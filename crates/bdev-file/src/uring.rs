//! The io_uring engine: one ring, and one thread driving it, per open device.
//!
//! Why one ring thread per device rather than one shared by every device: a device's thread is
//! started and stopped with it, so dropping a device drains exactly its own I/O and nothing else
//! waits for it; the file is registered once (a fixed file, saving the per-I/O file-table
//! lookup); and an idle thread costs nothing but its stack, since it sleeps in the kernel. Strata
//! opens few files (one per volume or mirror leg), and with io_uring each thread only submits
//! and reaps, so several rings scale better than one funnel would.
//!
//! ```text
//!  callers (any task)                         ring thread
//!  ──────────────────                         ───────────────────────────────────────────
//!  lock; push Request; take `sleeping`; unlock
//!  if it was sleeping: eventfd += 1  ───────► (eventfd read SQE completes: wakes the thread)
//!  await oneshot                              take every queued Request (one lock)
//!                                             push SQEs (buffer pointers into the slot table)
//!                                             submit_and_wait(1 only when idle, else 0)
//!                                             reap CQEs: short → resubmit the rest,
//!                                                        EINTR/EAGAIN → resubmit,
//!             ◄─────────────────────────────           done → send the buffer back (oneshot)
//! ```
//!
//! Each request's buffer moves into the thread's slot table with the request and stays there,
//! unmoved, until its last CQE: a caller that stops waiting (drops its future) does not free
//! memory the kernel is still writing. The queue between callers and the thread is the one
//! handoff per I/O; the thread is woken through the eventfd only when it said it was going to
//! sleep, so under load submissions cost a lock and a push, not a system call.
//!
//! Allocations per I/O, on this path: the tokio oneshot (one), and whatever the caller allocated
//! for the buffer. The queue, the pending list and the slot table reuse their capacity.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use tokio::sync::oneshot;

use crate::buf::{ReadBuf, WriteBuf};
use crate::sys;

/// Submission queue entries. The completion queue is twice this, and at most `MAX_IN_FLIGHT`
/// I/Os plus the wake read and its cancel are ever outstanding, so it cannot overflow.
const ENTRIES: u32 = 256;
/// I/Os in the kernel at once; more wait in the thread's pending list (callers bound how many
/// requests they issue: an NBD connection has a request limit, for one).
const MAX_IN_FLIGHT: usize = ENTRIES as usize;
/// The largest length one SQE carries (its field is 32 bits); longer requests continue as if
/// the kernel had returned short.
const MAX_CHUNK: usize = 1 << 30;
/// `user_data` of the eventfd read that wakes the thread.
const WAKE: u64 = u64::MAX;
/// `user_data` of the cancel of that read at shutdown.
const CANCEL: u64 = u64::MAX - 1;

/// One operation, carrying its buffer and the channel its result goes back on.
enum Op {
    Read {
        buf: ReadBuf,
        reply: oneshot::Sender<io::Result<ReadBuf>>,
    },
    Write {
        buf: WriteBuf,
        /// FUA, as `RWF_DSYNC`: the kernel writes, then syncs the written range as
        /// `fdatasync` would (`generic_write_sync`), before completing. That is "write, then
        /// fdatasync" in one SQE, without a second trip through the ring.
        dsync: bool,
        reply: oneshot::Sender<io::Result<()>>,
    },
    /// `fdatasync`.
    Fsync {
        reply: oneshot::Sender<io::Result<()>>,
    },
}

impl Op {
    fn complete(self, result: io::Result<()>) {
        // A caller that stopped waiting has dropped its receiver; nothing is left to tell.
        match self {
            Op::Read { buf, reply } => drop(reply.send(result.map(|()| buf))),
            Op::Write { reply, .. } | Op::Fsync { reply } => drop(reply.send(result)),
        }
    }

    /// Answer the caller without freeing the buffer: for when the kernel may still hold it.
    fn abandon(self) {
        match self {
            Op::Read { buf, reply } => {
                std::mem::forget(buf);
                drop(reply.send(Err(stopped())));
            }
            Op::Write { buf, reply, .. } => {
                std::mem::forget(buf);
                drop(reply.send(Err(stopped())));
            }
            Op::Fsync { reply } => drop(reply.send(Err(stopped()))),
        }
    }
}

struct Request {
    op: Op,
    offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// The device was dropped: finish what is queued and in flight, then exit.
    Closing,
    /// The thread has exited.
    Stopped,
}

struct Queue {
    requests: Vec<Request>,
    /// The thread is about to block (or is blocked) and must be woken through the eventfd.
    sleeping: bool,
    state: State,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: OwnedFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The lock only guards pushes and swaps of a Vec, which leave it consistent even if a
        // panic interrupted them, so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn stopped() -> io::Error {
    io::Error::from_raw_os_error(libc::ESHUTDOWN)
}

/// The handle to a device's ring thread.
pub(crate) struct Ring {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Ring {
    /// Start a ring thread for `file`. Fails, with the kernel's answer, when io_uring is
    /// unavailable (disabled by sysctl or seccomp, too old a kernel, locked memory limits).
    pub(crate) fn start(file: &File, label: String) -> io::Result<Ring> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                requests: Vec::with_capacity(MAX_IN_FLIGHT),
                sleeping: false,
                state: State::Running,
            }),
            wake: sys::eventfd()?,
        });
        let fd = file.as_raw_fd();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("strata-uring".into())
            .spawn(move || {
                let _span = tracing::debug_span!("uring", file = %label).entered();
                // The ring is created on its own thread: with IORING_SETUP_SINGLE_ISSUER only the
                // creating thread may submit.
                let ring = match setup(fd) {
                    Ok(ring) => ring,
                    Err(e) => {
                        drop(ready_tx.send(Err(e)));
                        thread_shared.lock().state = State::Stopped;
                        return;
                    }
                };
                // `fd` is registered now; the opener may go on (and may close its descriptor).
                drop(ready_tx.send(Ok(())));
                RingThread::new(ring, thread_shared).run();
            })?;
        let started = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the io_uring thread died while starting")));
        match started {
            Ok(()) => Ok(Ring {
                shared,
                thread: Some(thread),
            }),
            Err(e) => {
                drop(thread.join());
                Err(e)
            }
        }
    }

    fn submit(&self, op: Op, offset: u64) -> io::Result<()> {
        let wake = {
            let mut q = self.shared.lock();
            if q.state != State::Running {
                return Err(stopped());
            }
            q.requests.push(Request { op, offset });
            std::mem::take(&mut q.sleeping)
        };
        if wake {
            // The request is queued and will run whatever happens here, so this must not turn
            // into an error for it. A blocking eventfd's write cannot fail in practice (it would
            // block at a count of 2^64 - 2).
            if let Err(e) = sys::eventfd_signal(self.shared.wake.as_raw_fd()) {
                tracing::error!("wake the io_uring thread: {e}");
            }
        }
        Ok(())
    }

    /// Fill `buf` from `offset`; bytes past the end of the file stay zero.
    pub(crate) async fn read(&self, offset: u64, buf: ReadBuf) -> io::Result<ReadBuf> {
        let (reply, done) = oneshot::channel();
        self.submit(Op::Read { buf, reply }, offset)?;
        done.await.map_err(|_| stopped())?
    }

    /// Write all of `buf` at `offset`, durably when `dsync`.
    pub(crate) async fn write(&self, offset: u64, buf: WriteBuf, dsync: bool) -> io::Result<()> {
        let (reply, done) = oneshot::channel();
        self.submit(Op::Write { buf, dsync, reply }, offset)?;
        done.await.map_err(|_| stopped())?
    }

    /// `fdatasync`.
    pub(crate) async fn fdatasync(&self) -> io::Result<()> {
        let (reply, done) = oneshot::channel();
        self.submit(Op::Fsync { reply }, 0)?;
        done.await.map_err(|_| stopped())?
    }
}

impl Drop for Ring {
    /// Stop the thread once everything queued and in flight has completed, and wait for it.
    fn drop(&mut self) {
        {
            let mut q = self.shared.lock();
            if q.state == State::Running {
                q.state = State::Closing;
            }
        }
        if let Err(e) = sys::eventfd_signal(self.shared.wake.as_raw_fd()) {
            tracing::error!("wake the io_uring thread to stop it: {e}");
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the io_uring thread panicked");
            }
        }
    }
}

/// Create the ring, check that the kernel has the operations used, and register `fd`.
fn setup(fd: RawFd) -> io::Result<IoUring> {
    // DEFER_TASKRUN (6.1+) runs completion work only when this thread asks for events, instead
    // of interrupting it; TASKRUN_FLAG tells it when there is such work. Older kernels refuse
    // these flags with EINVAL, so fall back step by step.
    let attempts: [fn() -> io::Result<IoUring>; 3] = [
        || {
            IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag()
                .build(ENTRIES)
        },
        || {
            IoUring::builder()
                .setup_coop_taskrun()
                .setup_taskrun_flag()
                .build(ENTRIES)
        },
        || IoUring::new(ENTRIES),
    ];
    let mut last = None;
    let mut ring = None;
    for attempt in attempts {
        match attempt() {
            Ok(r) => {
                ring = Some(r);
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    let ring = ring.ok_or_else(|| last.unwrap_or_else(|| io::Error::other("no ring setup")))?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the kernel's io_uring lacks IORING_OP_{name}"),
            ));
        }
    }
    ring.submitter().register_files(&[fd])?;
    Ok(ring)
}

/// An operation in the kernel: its request and how many bytes are done.
struct InFlight {
    req: Request,
    done: usize,
}

/// What a completion means for its operation.
enum Step {
    Resubmit,
    Done(io::Result<()>),
}

impl InFlight {
    /// The file offset and length of the next transfer: what is not done yet, up to
    /// [`MAX_CHUNK`].
    fn next_transfer(&self) -> (u64, u32) {
        let total = match &self.req.op {
            Op::Read { buf, .. } => buf.len(),
            Op::Write { buf, .. } => buf.len(),
            Op::Fsync { .. } => 0,
        };
        let len = (total - self.done).min(MAX_CHUNK) as u32;
        (self.req.offset + self.done as u64, len)
    }

    /// The SQE for the rest of this operation.
    fn sqe(&mut self, user_data: u64) -> squeue::Entry {
        let fd = types::Fixed(0);
        let (offset, len) = self.next_transfer();
        let done = self.done;
        let entry = match &mut self.req.op {
            Op::Read { buf, .. } => {
                let rest = buf.as_mut_slice()[done..].as_mut_ptr();
                opcode::Read::new(fd, rest, len).offset(offset).build()
            }
            Op::Write { buf, dsync, .. } => {
                let rest = buf.as_slice()[done..].as_ptr();
                opcode::Write::new(fd, rest, len)
                    .offset(offset)
                    .rw_flags(if *dsync { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            Op::Fsync { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        entry.user_data(user_data)
    }

    /// Account for a completion with result `res`.
    fn progress(&mut self, res: i32) -> Step {
        if res < 0 {
            return match -res {
                libc::EINTR | libc::EAGAIN => Step::Resubmit,
                errno => Step::Done(Err(io::Error::from_raw_os_error(errno))),
            };
        }
        let n = res as usize;
        let total = match &self.req.op {
            Op::Read { buf, .. } => {
                if n == 0 {
                    // The end of the file (it was shortened under us): the rest reads as the
                    // zeroes the buffer was allocated with, as a hole would.
                    return Step::Done(Ok(()));
                }
                buf.len()
            }
            Op::Write { buf, .. } => {
                if n == 0 {
                    return Step::Done(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the kernel wrote 0 bytes",
                    )));
                }
                buf.len()
            }
            Op::Fsync { .. } => return Step::Done(Ok(())),
        };
        self.done += n;
        if self.done < total {
            Step::Resubmit
        } else {
            Step::Done(Ok(()))
        }
    }
}

/// The ring thread's state.
struct RingThread {
    ring: IoUring,
    shared: Arc<Shared>,
    /// Operations in the kernel, indexed by `user_data`.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    live: usize,
    /// Requests taken from the queue that are not in the kernel yet.
    pending: VecDeque<Request>,
    /// Slots whose operation must be submitted again (short transfer, EINTR, EAGAIN).
    retry: Vec<usize>,
    /// Swapped with the shared queue's vector, so that neither reallocates.
    incoming: Vec<Request>,
    /// Where the eventfd read lands; boxed so that its address is stable.
    wake_buf: Box<u64>,
    /// An eventfd read is in the kernel (or in the submission queue).
    wake_armed: bool,
    closing: bool,
}

impl RingThread {
    fn new(ring: IoUring, shared: Arc<Shared>) -> RingThread {
        RingThread {
            ring,
            shared,
            slots: Vec::with_capacity(MAX_IN_FLIGHT),
            free: Vec::with_capacity(MAX_IN_FLIGHT),
            live: 0,
            pending: VecDeque::with_capacity(MAX_IN_FLIGHT),
            retry: Vec::with_capacity(MAX_IN_FLIGHT),
            incoming: Vec::with_capacity(MAX_IN_FLIGHT),
            wake_buf: Box::new(0),
            wake_armed: false,
            closing: false,
        }
    }

    fn run(mut self) {
        loop {
            self.intake();
            self.fill();
            if self.closing && self.live == 0 && self.pending.is_empty() {
                break;
            }
            let want = self.wait_for();
            if let Err(e) = self.ring.submit_and_wait(want) {
                match e.raw_os_error() {
                    // Interrupted, or the kernel is short of resources or has completions to
                    // hand over first: reap, and the next round submits again.
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ENOMEM) => {}
                    _ => {
                        tracing::error!("io_uring submit failed, failing the device's I/O: {e}");
                        return; // Drop answers every caller and leaks what the kernel holds.
                    }
                }
            }
            self.reap();
        }
        self.stop();
    }

    /// Take every queued request.
    fn intake(&mut self) {
        {
            let mut q = self.shared.lock();
            q.sleeping = false;
            if q.state == State::Closing {
                self.closing = true;
            }
            std::mem::swap(&mut q.requests, &mut self.incoming);
        }
        self.pending.extend(self.incoming.drain(..));
    }

    /// Push SQEs: the wake read, resubmissions, then new requests, while there is room.
    fn fill(&mut self) {
        let mut sq = self.ring.submission();
        if !self.wake_armed && !self.closing {
            let read = opcode::Read::new(
                types::Fd(self.shared.wake.as_raw_fd()),
                (&mut *self.wake_buf as *mut u64).cast(),
                8,
            )
            .build()
            .user_data(WAKE);
            // SAFETY: the read targets `wake_buf`, a heap cell that lives as long as this
            // struct; it is never freed while the read is armed (see `stop` and `Drop`).
            if unsafe { sq.push(&read) }.is_ok() {
                self.wake_armed = true;
            }
        }
        while let Some(&i) = self.retry.last() {
            let Some(op) = self.slots[i].as_mut() else {
                self.retry.pop();
                continue;
            };
            let sqe = op.sqe(i as u64);
            // SAFETY: the SQE points into a buffer owned by `slots[i]`, which stays there,
            // unmoved, until this operation's final CQE is reaped.
            if unsafe { sq.push(&sqe) }.is_err() {
                break;
            }
            self.retry.pop();
        }
        while self.live < MAX_IN_FLIGHT && !sq.is_full() {
            let Some(req) = self.pending.pop_front() else {
                break;
            };
            let i = self.free.pop().unwrap_or_else(|| {
                self.slots.push(None);
                self.slots.len() - 1
            });
            let op = self.slots[i].insert(InFlight { req, done: 0 });
            let sqe = op.sqe(i as u64);
            // SAFETY: as above: the buffer lives in `slots[i]` until its final CQE. The queue
            // is not full, so the push succeeds.
            if unsafe { sq.push(&sqe) }.is_err() {
                self.retry.push(i);
            }
            self.live += 1;
        }
    }

    /// How many completions to wait for: none when there is more to submit right away,
    /// otherwise one — after telling submitters to wake us if nothing else will.
    fn wait_for(&mut self) -> usize {
        let more_now =
            !self.retry.is_empty() || (!self.pending.is_empty() && self.live < MAX_IN_FLIGHT);
        if more_now {
            return 0;
        }
        if !self.pending.is_empty() || self.closing {
            // At the in-flight limit, or draining: only completions matter, and they will come.
            return 1;
        }
        let mut q = self.shared.lock();
        if q.requests.is_empty() && q.state == State::Running {
            q.sleeping = true;
            1
        } else {
            0
        }
    }

    /// Handle every completion in the queue.
    fn reap(&mut self) {
        for cqe in self.ring.completion() {
            let res = cqe.result();
            match cqe.user_data() {
                WAKE => self.wake_armed = false,
                CANCEL => {}
                ud => {
                    let i = ud as usize;
                    let Some(op) = self.slots.get_mut(i).and_then(Option::as_mut) else {
                        tracing::error!("io_uring completion for unknown slot {i}");
                        continue;
                    };
                    match op.progress(res) {
                        Step::Resubmit => self.retry.push(i),
                        Step::Done(result) => {
                            if let Some(op) = self.slots[i].take() {
                                self.free.push(i);
                                self.live -= 1;
                                op.req.op.complete(result);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Cancel the wake read, wait for it, and unregister the file, so that closing the ring
    /// leaves nothing behind: the kernel tears rings down asynchronously, and a still-registered
    /// file would hold the device's lock for a moment after the device is gone.
    fn stop(&mut self) {
        if self.wake_armed {
            let cancel = opcode::AsyncCancel::new(WAKE).build().user_data(CANCEL);
            // SAFETY: a cancel carries no buffer.
            let mut pushed = unsafe { self.ring.submission().push(&cancel) }.is_ok();
            while self.wake_armed {
                if !pushed {
                    if let Err(e) = self.ring.submit() {
                        tracing::error!("io_uring submit at shutdown: {e}");
                        return;
                    }
                    // SAFETY: as above.
                    pushed = unsafe { self.ring.submission().push(&cancel) }.is_ok();
                }
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => {
                        tracing::error!("io_uring wait at shutdown: {e}");
                        return;
                    }
                }
                self.reap();
            }
        }
        if let Err(e) = self.ring.submitter().unregister_files() {
            tracing::warn!("unregister the file from io_uring: {e}");
        }
    }
}

impl Drop for RingThread {
    /// After a clean stop nothing is in flight. After a fatal ring error (or a panic) the kernel
    /// may still write into in-flight buffers, so those are leaked rather than freed; every
    /// waiting caller is answered either way.
    fn drop(&mut self) {
        for slot in &mut self.slots {
            if let Some(op) = slot.take() {
                op.req.op.abandon();
            }
        }
        if self.wake_armed {
            Box::leak(std::mem::replace(&mut self.wake_buf, Box::new(0)));
        }
        let queued = {
            let mut q = self.shared.lock();
            q.state = State::Stopped;
            std::mem::take(&mut q.requests)
        };
        for req in queued.into_iter().chain(self.pending.drain(..)) {
            req.op.complete(Err(stopped()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_op(len: usize) -> (InFlight, oneshot::Receiver<io::Result<ReadBuf>>) {
        let (reply, rx) = oneshot::channel();
        let buf = ReadBuf::zeroed(len, None).unwrap();
        let req = Request {
            op: Op::Read { buf, reply },
            offset: 4096,
        };
        (InFlight { req, done: 0 }, rx)
    }

    #[test]
    fn short_transfers_continue_where_they_stopped() {
        let (mut op, _rx) = read_op(8192);
        assert_eq!(op.next_transfer(), (4096, 8192));
        assert!(matches!(op.progress(6000), Step::Resubmit));
        assert_eq!(op.next_transfer(), (4096 + 6000, 2192));
        assert!(matches!(op.progress(-libc::EINTR), Step::Resubmit));
        assert!(matches!(op.progress(-libc::EAGAIN), Step::Resubmit));
        assert_eq!(op.done, 6000, "a retry does not count as progress");
        assert!(matches!(op.progress(2192), Step::Done(Ok(()))));

        let (mut op, _rx) = read_op(8192);
        assert!(
            matches!(op.progress(0), Step::Done(Ok(()))),
            "EOF ends a read"
        );
        let (mut op, _rx) = read_op(8192);
        match op.progress(-libc::ENOSPC) {
            Step::Done(Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOSPC)),
            _ => panic!("an error completes the operation"),
        }
    }

    #[test]
    fn a_write_of_nothing_is_an_error_not_a_loop() {
        let (reply, _rx) = oneshot::channel();
        let buf = WriteBuf::Bytes(bytes::Bytes::from_static(&[1; 100]));
        let mut op = InFlight {
            req: Request {
                op: Op::Write {
                    buf,
                    dsync: false,
                    reply,
                },
                offset: 0,
            },
            done: 0,
        };
        assert!(matches!(op.progress(60), Step::Resubmit));
        assert!(matches!(op.progress(0), Step::Done(Err(_))));
    }

    #[tokio::test]
    async fn a_completed_read_hands_its_buffer_back() {
        let (op, rx) = read_op(16);
        op.req.op.complete(Ok(()));
        assert_eq!(rx.await.unwrap().unwrap().len(), 16);
        let (op, rx) = read_op(16);
        op.req.op.abandon();
        let result = rx.await.unwrap();
        assert_eq!(
            result.err().and_then(|e| e.raw_os_error()),
            Some(libc::ESHUTDOWN)
        );
    }
}
