//! The NVMe/TCP host: [`NvmfDevice`], a [`BlockDevice`] backed by a namespace of a remote
//! subsystem (`nvmf://HOST[:PORT]/NQN`), and [`NvmfOpener`] for the `nvmf` scheme.
//!
//! ```text
//!   read_at / write_at / … ──► the current association (admin queue + I/O queues, in turn)
//!        │ lost? wait for the next one, then retry          ▲
//!        ▼                                                  │ reconnect with backoff
//!   supervisor: Up(session) ──link fails──► Down{since} ────┘
//!        a call waiting longer than reconnect_timeout fails: "the target has been unreachable"
//! ```
//!
//! Each association is a controller: the admin queue (keep-alives every half of the
//! keep-alive timeout, and namespace notices that update the size) and several I/O queues,
//! each a TCP connection with commands pipelined up to the queue size. When any queue fails —
//! the socket, a protocol violation, a keep-alive or a command that gets no answer in time —
//! the whole association is dropped and a new one is set up with backoff; commands in flight
//! are retried on it (block writes are idempotent), so a short outage is invisible. A target
//! gone for longer than `reconnect_timeout` makes I/O fail with [`ErrorKind::Io`], which is
//! what faults a nexus child; when the target returns, the device reconnects by itself, and
//! refuses a namespace with another identity than the one it opened.

mod queue;
mod session;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::future::try_join_all;
use strata_bdev::{
    check_io, read_only_error, write_zeroes_by_writing, BlockDevice, Capabilities, DeviceUri,
    Error, ErrorKind, Geometry, Opener, Result, WriteOpts, ZeroOpts,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::queue::{Failed, Payload};
use self::session::{NsInfo, Session, SetupError};
use crate::codec::{io_opcode, Command, Digests, DsmRange, Status, DEFAULT_PORT};
use crate::target::format_uuid;

/// Host settings; [`HostOptions::default`] holds the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostOptions {
    /// This host's NQN. Default: `nqn.2014-08.org.nvmexpress:uuid:` and the host ID.
    pub hostnqn: String,
    /// This host's ID. Default: a random UUID, the same for the whole process.
    pub hostid: [u8; 16],
    /// The namespace to open. Default 1.
    pub nsid: u32,
    /// I/O queues (each a TCP connection, and a task on the target) to ask for. Default: one
    /// per two CPUs, 1 to 4 — on a small machine a second queue mostly buys cross-thread
    /// wakeups (see docs/BENCHMARKS.md).
    pub queues: u16,
    /// Entries per I/O queue to ask for (commands in flight per queue). Default 128.
    pub queue_size: u16,
    /// Ask for header digests. Default off.
    pub header_digest: bool,
    /// Ask for data digests. Default off.
    pub data_digest: bool,
    /// Keep-alive timeout asked for (keep-alives go every half of it; zero: none). Default 5 s.
    pub keep_alive: Duration,
    /// Time limit of each call. A call over it fails with [`ErrorKind::TimedOut`] and the
    /// association is reset (a controller that does not answer is broken). Default: none.
    pub timeout: Option<Duration>,
    /// Time limit to set up an association. Default 10 s.
    pub connect_timeout: Duration,
    /// How long calls wait for a lost target to come back before they fail. Default 10 s.
    pub reconnect_timeout: Duration,
}

/// The host ID of this process.
fn process_hostid() -> [u8; 16] {
    static ID: OnceLock<[u8; 16]> = OnceLock::new();
    *ID.get_or_init(|| {
        let mut u: [u8; 16] = rand::random();
        u[6] = (u[6] & 0x0F) | 0x40;
        u[8] = (u[8] & 0x3F) | 0x80;
        u
    })
}

impl Default for HostOptions {
    fn default() -> HostOptions {
        let hostid = process_hostid();
        HostOptions {
            hostnqn: format!("nqn.2014-08.org.nvmexpress:uuid:{}", format_uuid(&hostid)),
            hostid,
            nsid: 1,
            queues: std::thread::available_parallelism()
                .map_or(1, |n| n.get() / 2)
                .clamp(1, 4) as u16,
            queue_size: 128,
            header_digest: false,
            data_digest: false,
            keep_alive: Duration::from_secs(5),
            timeout: None,
            connect_timeout: Duration::from_secs(10),
            reconnect_timeout: Duration::from_secs(10),
        }
    }
}

impl HostOptions {
    fn digests(&self) -> Digests {
        Digests {
            header: self.header_digest,
            data: self.data_digest,
        }
    }
}

/// The link to the target, as the supervisor keeps it.
#[derive(Debug, Clone)]
enum State {
    Up(Arc<Session>),
    Down { since: Instant, why: Arc<str> },
    Closed,
}

struct Inner {
    name: Arc<str>,
    addr: String,
    subnqn: String,
    opts: HostOptions,
    state: watch::Sender<State>,
    /// The namespace as first opened: reconnects must find the same one.
    ns: NsInfo,
    /// Size in blocks (namespace notices update it).
    blocks: Arc<AtomicU64>,
    caps: Capabilities,
    closing: CancellationToken,
}

/// A namespace of a remote NVMe/TCP subsystem, as a block device.
pub struct NvmfDevice {
    inner: Arc<Inner>,
}

impl fmt::Debug for NvmfDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} bytes)", self.inner.name, self.size_bytes())
    }
}

impl Drop for NvmfDevice {
    fn drop(&mut self) {
        self.inner.closing.cancel();
    }
}

impl NvmfDevice {
    /// Connect to subsystem `subnqn` at `addr` (`host:port`) and open namespace `opts.nsid`.
    pub async fn connect(addr: &str, subnqn: &str, opts: HostOptions) -> Result<NvmfDevice> {
        let name: Arc<str> = format!("nvmf://{addr}/{subnqn}").into();
        let blocks = Arc::new(AtomicU64::new(0));
        let s = establish(addr, &name, subnqn, &opts, &blocks)
            .await
            .map_err(|e| setup_error(&name, e))?;
        let caps = Capabilities {
            read_only: s.ns.read_only,
            flush: s.cache(),
            fua: true,
            trim: s.deallocate(),
            write_zeroes: s.write_zeroes(),
            fast_zero: false,
            block_status: false,
            multi_conn: false,
            resize: s.ctrl.oaes & crate::codec::aen::CFG_NS_ATTRIBUTE != 0,
        };
        let ns = s.ns.clone();
        blocks.store(ns.blocks, Ordering::Relaxed);
        let s = Arc::new(s);
        session::start_tasks(&s, &opts);
        let (state, _) = watch::channel(State::Up(s.clone()));
        let inner = Arc::new(Inner {
            name,
            addr: addr.to_string(),
            subnqn: subnqn.to_string(),
            opts,
            state,
            ns,
            blocks,
            caps,
            closing: CancellationToken::new(),
        });
        tokio::spawn(supervise(inner.clone(), s));
        Ok(NvmfDevice { inner })
    }

    /// Tell the controller to shut down (it flushes), wait for it (a few seconds at most),
    /// and close every connection.
    pub async fn close(self) {
        let current = self.inner.state.borrow().clone();
        if let State::Up(s) = current {
            s.shutdown(Duration::from_secs(5)).await;
        }
        self.inner.closing.cancel();
    }

    /// Whether an association is up now.
    pub fn is_connected(&self) -> bool {
        matches!(&*self.inner.state.borrow(), State::Up(s) if !s.link.is_dead())
    }

    /// Wait until an association is up (after a reconnect), at most `limit`.
    pub async fn wait_connected(&self, limit: Duration) -> bool {
        let mut rx = self.inner.state.subscribe();
        tokio::time::timeout(
            limit,
            rx.wait_for(|s| matches!(s, State::Up(s) if !s.link.is_dead())),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    /// The controller ID of the current association.
    pub fn controller_id(&self) -> Option<u16> {
        match &*self.inner.state.borrow() {
            State::Up(s) => Some(s.cntlid),
            _ => None,
        }
    }

    /// The namespace's NGUID.
    pub fn nguid(&self) -> [u8; 16] {
        self.inner.ns.nguid
    }

    /// The namespace's UUID, if the controller reports one.
    pub fn uuid(&self) -> Option<[u8; 16]> {
        self.inner.ns.uuid
    }

    /// The I/O queues of the current association.
    pub fn io_queues(&self) -> usize {
        match &*self.inner.state.borrow() {
            State::Up(s) => s.io.len(),
            _ => 0,
        }
    }

    fn size_bytes(&self) -> u64 {
        self.inner.blocks.load(Ordering::Relaxed) << self.inner.ns.lba_shift
    }

    /// The current association, waiting for a reconnect for as long as `reconnect_timeout`
    /// allows since the target was lost.
    async fn session(&self, op: &Op) -> Result<Arc<Session>> {
        if let State::Up(s) = &*self.inner.state.borrow() {
            if !s.link.is_dead() {
                return Ok(s.clone());
            }
        }
        let mut rx = self.inner.state.subscribe();
        loop {
            let deadline = match &*rx.borrow_and_update() {
                State::Up(s) if !s.link.is_dead() => return Ok(s.clone()),
                State::Up(_) => None,
                State::Down { since, why } => {
                    let limit = self.inner.opts.reconnect_timeout;
                    if since.elapsed() >= limit {
                        return Err(Error::new(
                            ErrorKind::Io,
                            format!(
                                "{op} on {}: the target has been unreachable for {:.1?} (I/O waits {limit:?}): {why}",
                                self.inner.name,
                                since.elapsed()
                            ),
                        ));
                    }
                    Some(*since + limit)
                }
                State::Closed => {
                    return Err(Error::new(
                        ErrorKind::Shutdown,
                        format!("{op} on {}: the device is closed", self.inner.name),
                    ))
                }
            };
            match deadline {
                Some(d) => {
                    tokio::select! {
                        r = rx.changed() => if r.is_err() { return Err(self.closed(op)) },
                        _ = tokio::time::sleep_until(d) => {}
                    }
                }
                None => {
                    if rx.changed().await.is_err() {
                        return Err(self.closed(op));
                    }
                }
            }
        }
    }

    fn closed(&self, op: &Op) -> Error {
        Error::new(
            ErrorKind::Shutdown,
            format!("{op} on {}: the device is closed", self.inner.name),
        )
    }

    /// Wait until the supervisor has replaced association `s`.
    async fn replaced(&self, s: &Arc<Session>) {
        let mut rx = self.inner.state.subscribe();
        let _ = rx
            .wait_for(|st| !matches!(st, State::Up(x) if Arc::ptr_eq(x, s)))
            .await;
    }

    /// Run `f` on the current association, again on the next one when it is lost, under the
    /// call's time limit.
    async fn run<T, F, Fut>(&self, op: Op, f: F) -> Result<T>
    where
        F: Fn(Arc<Session>) -> Fut,
        Fut: Future<Output = std::result::Result<T, Failed>>,
    {
        let timed = self.inner.opts.timeout.is_some();
        let used: Mutex<Option<Arc<Session>>> = Mutex::new(None);
        let work = async {
            let mut transient = 0;
            loop {
                let s = self.session(&op).await?;
                if timed {
                    *used.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
                }
                match f(s.clone()).await {
                    Ok(v) => return Ok(v),
                    Err(Failed::Lost(_)) => self.replaced(&s).await,
                    Err(Failed::Protocol(why)) => {
                        s.link.fail(&why);
                        self.replaced(&s).await;
                    }
                    Err(Failed::Status(st)) if st.code() == Status::ABORTED_SQ_DELETION => {
                        // The controller is going away: the command runs on the next one.
                        self.replaced(&s).await;
                    }
                    Err(Failed::Status(st))
                        if !st.is_dnr()
                            && transient < 3
                            && (st.code() == Status::TRANSIENT_TRANSPORT_ERROR
                                || st.code() == Status::INTERNAL_ERROR) =>
                    {
                        transient += 1;
                    }
                    Err(Failed::Status(st)) => return Err(status_error(&op, &self.inner.name, st)),
                }
            }
        };
        match self.inner.opts.timeout {
            None => work.await,
            Some(t) => match tokio::time::timeout(t, work).await {
                Ok(r) => r,
                Err(_) => {
                    if let Some(s) = used.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        s.link.fail(&format!(
                            "{op}: no answer within {t:?}: resetting the association"
                        ));
                    }
                    Err(Error::new(
                        ErrorKind::TimedOut,
                        format!("{op} on {}: no answer within {t:?}", self.inner.name),
                    ))
                }
            },
        }
    }

    fn writable(&self, what: &str) -> Result<()> {
        if self.inner.caps.read_only {
            Err(read_only_error(what))
        } else {
            Ok(())
        }
    }
}

/// Pieces of `[offset, offset + len)` no longer than `max`.
fn pieces(offset: u64, len: u64, max: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut done = 0;
    while done < len {
        let n = (len - done).min(max);
        out.push((offset + done, n));
        done += n;
    }
    out
}

/// Submit an I/O command on the next queue; a failed status is an error.
async fn io(
    s: &Session,
    cmd: Command,
    payload: Payload,
) -> std::result::Result<queue::Response, Failed> {
    let r = s.queue().submit(cmd, payload).await?;
    if r.completion.status.is_success() {
        Ok(r)
    } else {
        Err(Failed::Status(r.completion.status))
    }
}

async fn read_on(s: Arc<Session>, offset: u64, len: usize) -> std::result::Result<Bytes, Failed> {
    let shift = s.ns.lba_shift;
    let nsid = s.ns.nsid;
    if len <= s.max_transfer as usize {
        let cmd = Command::rw(
            io_opcode::READ,
            0,
            nsid,
            offset >> shift,
            (len >> shift) as u32,
            false,
            Default::default(),
        );
        let buf = BytesMut::with_capacity(len);
        return Ok(io(&s, cmd, Payload::FromController(buf))
            .await?
            .data
            .freeze());
    }
    let parts = pieces(offset, len as u64, u64::from(s.max_transfer));
    // One buffer for the whole read, split so each command fills its own piece in place.
    let mut whole = BytesMut::with_capacity(len);
    let mut bufs = Vec::with_capacity(parts.len());
    for &(off, _) in parts.iter().skip(1).rev() {
        bufs.push(whole.split_off((off - offset) as usize));
    }
    bufs.push(whole);
    bufs.reverse();
    let futs = parts.iter().zip(bufs).map(|(&(off, n), buf)| {
        let s = &s;
        async move {
            let cmd = Command::rw(
                io_opcode::READ,
                0,
                nsid,
                off >> shift,
                (n >> shift) as u32,
                false,
                Default::default(),
            );
            Ok::<BytesMut, Failed>(io(s, cmd, Payload::FromController(buf)).await?.data)
        }
    });
    let mut filled = try_join_all(futs).await?.into_iter();
    let mut out = filled.next().unwrap_or_default();
    for b in filled {
        out.unsplit(b);
    }
    Ok(out.freeze())
}

async fn write_on(
    s: Arc<Session>,
    offset: u64,
    data: Bytes,
    fua: bool,
) -> std::result::Result<(), Failed> {
    let shift = s.ns.lba_shift;
    let nsid = s.ns.nsid;
    if data.len() <= s.max_transfer as usize {
        let cmd = Command::rw(
            io_opcode::WRITE,
            0,
            nsid,
            offset >> shift,
            (data.len() >> shift) as u32,
            fua,
            Default::default(),
        );
        return io(&s, cmd, Payload::ToController(data)).await.map(|_| ());
    }
    let parts = pieces(offset, data.len() as u64, u64::from(s.max_transfer));
    let futs = parts.iter().map(|&(off, n)| {
        let s = &s;
        let start = (off - offset) as usize;
        let chunk = data.slice(start..start + n as usize);
        async move {
            let cmd = Command::rw(
                io_opcode::WRITE,
                0,
                nsid,
                off >> shift,
                (n >> shift) as u32,
                fua,
                Default::default(),
            );
            io(s, cmd, Payload::ToController(chunk)).await.map(|_| ())
        }
    });
    try_join_all(futs).await?;
    Ok(())
}

async fn flush_on(s: Arc<Session>) -> std::result::Result<(), Failed> {
    if !s.cache() {
        return Ok(());
    }
    io(&s, Command::flush(0, s.ns.nsid), Payload::None).await?;
    Ok(())
}

/// Blocks per Dataset Management range at most.
const MAX_RANGE_BLOCKS: u64 = 1 << 31;
/// Ranges per Dataset Management command at most.
const MAX_RANGES: usize = 256;
/// Blocks per Write Zeroes command at most (NLB is 16 bits).
const MAX_ZERO_BLOCKS: u64 = 1 << 16;

async fn trim_on(s: Arc<Session>, offset: u64, len: u64) -> std::result::Result<(), Failed> {
    let shift = s.ns.lba_shift;
    let ranges: Vec<DsmRange> = pieces(offset >> shift, len >> shift, MAX_RANGE_BLOCKS)
        .into_iter()
        .map(|(slba, nlb)| DsmRange {
            attributes: 0,
            nlb: nlb as u32,
            slba,
        })
        .collect();
    let futs = ranges.chunks(MAX_RANGES).map(|group| {
        let s = &s;
        let mut data = Vec::with_capacity(group.len() * 16);
        for r in group {
            r.encode(&mut data);
        }
        let cmd =
            Command::dataset_management(0, s.ns.nsid, group.len() as u32, true, Default::default());
        async move {
            io(s, cmd, Payload::ToController(Bytes::from(data)))
                .await
                .map(|_| ())
        }
    });
    try_join_all(futs).await?;
    Ok(())
}

async fn zero_on(
    s: Arc<Session>,
    offset: u64,
    len: u64,
    opts: ZeroOpts,
) -> std::result::Result<(), Failed> {
    let shift = s.ns.lba_shift;
    let futs = pieces(offset >> shift, len >> shift, MAX_ZERO_BLOCKS)
        .into_iter()
        .map(|(slba, nlb)| {
            let s = &s;
            let cmd =
                Command::write_zeroes(0, s.ns.nsid, slba, nlb as u32, opts.may_trim, opts.fua);
            async move { io(s, cmd, Payload::None).await.map(|_| ()) }
        });
    try_join_all(futs).await?;
    Ok(())
}

#[async_trait]
impl BlockDevice for NvmfDevice {
    fn geometry(&self) -> Geometry {
        let bs = 1u32 << self.inner.ns.lba_shift;
        Geometry {
            size: self.size_bytes(),
            block_size: bs,
            optimal_io_size: self.inner.ns.optimal,
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.caps
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_io(self.geometry(), "read", offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.run(Op::new("read", offset, len as u64), |s| {
            read_on(s, offset, len)
        })
        .await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        self.writable("write")?;
        check_io(self.geometry(), "write", offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.run(Op::new("write", offset, data.len() as u64), |s| {
            write_on(s, offset, data.clone(), opts.fua)
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        self.run(Op::new("flush", 0, 0), flush_on).await
    }

    async fn trim(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        self.writable("trim")?;
        check_io(self.geometry(), "trim", offset, len)?;
        if !self.inner.caps.trim {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "trim on {}: the controller does not support deallocation",
                    self.inner.name
                ),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        self.run(Op::new("trim", offset, len), |s| trim_on(s, offset, len))
            .await?;
        if opts.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        self.writable("write zeroes")?;
        check_io(self.geometry(), "write zeroes", offset, len)?;
        if opts.fast_only {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "write zeroes fast on {}: NVMe does not promise fast zeroing",
                    self.inner.name
                ),
            ));
        }
        if !self.inner.caps.write_zeroes {
            return write_zeroes_by_writing(self, offset, len, opts).await;
        }
        if len == 0 {
            return Ok(());
        }
        self.run(Op::new("write zeroes", offset, len), |s| {
            zero_on(s, offset, len, opts)
        })
        .await
    }
}

/// Watch the association; when it fails, set up a new one with backoff until the device is
/// dropped.
async fn supervise(inner: Arc<Inner>, mut session: Arc<Session>) {
    loop {
        tokio::select! {
            _ = session.link.dead.cancelled() => {}
            _ = inner.closing.cancelled() => {
                session.link.fail("the device was closed");
                inner.state.send_replace(State::Closed);
                return;
            }
        }
        let since = Instant::now();
        let why = session.link.why();
        warn!(device = %inner.name, reason = %why, "NVMe/TCP association lost; reconnecting");
        inner.state.send_replace(State::Down {
            since,
            why: why.clone(),
        });
        drop(session);
        let mut pause = Duration::from_millis(50);
        session = loop {
            let attempt = tokio::select! {
                r = establish(&inner.addr, &inner.name, &inner.subnqn, &inner.opts, &inner.blocks) => r,
                _ = inner.closing.cancelled() => {
                    inner.state.send_replace(State::Closed);
                    return;
                }
            };
            let why: Arc<str> = match attempt {
                Ok(s) if s.ns.same_as(&inner.ns) => {
                    inner.blocks.store(s.ns.blocks, Ordering::Relaxed);
                    break Arc::new(s);
                }
                Ok(s) => {
                    s.link.fail("a different namespace");
                    format!(
                        "the target now serves another namespace under {} (NGUID {:02x?})",
                        inner.subnqn, s.ns.nguid
                    )
                    .into()
                }
                Err(e) => e.message().into(),
            };
            inner.state.send_replace(State::Down { since, why });
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = inner.closing.cancelled() => {
                    inner.state.send_replace(State::Closed);
                    return;
                }
            }
            pause = (pause * 2).min(Duration::from_secs(2));
        };
        session::start_tasks(&session, &inner.opts);
        info!(device = %inner.name, after = ?since.elapsed(), "NVMe/TCP association re-established");
        inner.state.send_replace(State::Up(session.clone()));
    }
}

/// Set up an association within the connect timeout.
async fn establish(
    addr: &str,
    name: &Arc<str>,
    subnqn: &str,
    opts: &HostOptions,
    blocks: &Arc<AtomicU64>,
) -> std::result::Result<Session, SetupError> {
    let s = tokio::time::timeout(
        opts.connect_timeout,
        session::establish(addr, name, subnqn, opts, blocks.clone()),
    )
    .await
    .map_err(|_| {
        SetupError::Transient(format!("no association within {:?}", opts.connect_timeout))
    })??;
    Ok(s)
}

fn setup_error(name: &str, e: SetupError) -> Error {
    match e {
        SetupError::Transient(m) => Error::new(ErrorKind::Io, format!("open {name}: {m}")),
        SetupError::Refused(kind, m) => Error::new(kind, format!("open {name}: {m}")),
    }
}

/// The [`ErrorKind`] a status stands for.
pub fn kind_of(s: Status) -> ErrorKind {
    match s.code() {
        Status::LBA_OUT_OF_RANGE => ErrorKind::OutOfRange,
        Status::CAPACITY_EXCEEDED => ErrorKind::NoSpace,
        Status::INVALID_OPCODE => ErrorKind::Unsupported,
        Status::INVALID_FIELD
        | Status::INVALID_NAMESPACE
        | Status::SGL_OFFSET_INVALID
        | Status::SGL_TYPE_INVALID => ErrorKind::InvalidInput,
        Status::DATA_SGL_LENGTH_INVALID => ErrorKind::TooLarge,
        Status::NAMESPACE_WRITE_PROTECTED | Status::ACCESS_DENIED => ErrorKind::PermissionDenied,
        Status::RESERVATION_CONFLICT => ErrorKind::Conflict,
        Status::ABORTED_SQ_DELETION => ErrorKind::Shutdown,
        _ => ErrorKind::Io,
    }
}

fn status_error(op: &Op, name: &str, s: Status) -> Error {
    Error::new(
        kind_of(s),
        format!("{op} on {name}: the controller answered {s}"),
    )
}

/// What a call was, for its error message.
#[derive(Debug, Clone, Copy)]
struct Op {
    verb: &'static str,
    offset: u64,
    len: u64,
}

impl Op {
    fn new(verb: &'static str, offset: u64, len: u64) -> Op {
        Op { verb, offset, len }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.verb == "flush" {
            f.write_str("flush")
        } else {
            write!(
                f,
                "{} {} bytes at offset {}",
                self.verb, self.len, self.offset
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// URIs

/// The query keys `nvmf://` URIs take.
const KEYS: &[&str] = &[
    "nsid",
    "hostnqn",
    "hostid",
    "hdgst",
    "ddgst",
    "timeout",
    "connect_timeout",
    "reconnect_timeout",
    "kato",
    "queues",
    "queue_size",
];

/// Opens `nvmf://HOST[:PORT]/NQN` (port 4420 by default; IPv6 addresses in brackets).
/// Query keys: `nsid=N` (default 1), `hostnqn=`, `hostid=UUID`, `hdgst=true`, `ddgst=true`,
/// `timeout=SECONDS` (per call), `connect_timeout=SECONDS`, `reconnect_timeout=SECONDS` (how
/// long I/O waits for a lost target), `kato=SECONDS` (keep-alive timeout, 0: none),
/// `queues=N`, `queue_size=N`.
#[derive(Debug, Clone, Default)]
pub struct NvmfOpener {
    options: HostOptions,
}

impl NvmfOpener {
    /// An opener whose devices start from `options` (URI keys override them).
    pub fn new(options: HostOptions) -> NvmfOpener {
        NvmfOpener { options }
    }

    /// The address, subsystem NQN and options `uri` names, consuming its query keys.
    pub fn parse(&self, uri: &mut DeviceUri) -> Result<(String, String, HostOptions)> {
        if uri.scheme != "nvmf" {
            return Err(uri.invalid(&format!(
                "the NVMe/TCP host opens nvmf:// URIs, not {}://",
                uri.scheme
            )));
        }
        let addr = tcp_address(&uri.authority).map_err(|why| uri.invalid(&why))?;
        let nqn = uri.path.strip_prefix('/').unwrap_or(&uri.path).to_string();
        if nqn.is_empty() {
            return Err(uri.invalid(
                "the subsystem NQN is missing: nvmf://HOST[:PORT]/NQN, e.g. nvmf://10.0.0.2/nqn.2026-12.io.strata:vol",
            ));
        }
        let mut o = self.options.clone();
        if let Some(v) = uri.take("nsid") {
            o.nsid = v
                .parse::<u32>()
                .ok()
                .filter(|&n| n != 0 && n != u32::MAX)
                .ok_or_else(|| {
                    uri.invalid(&format!("nsid={v:?}: expected a namespace ID from 1"))
                })?;
        }
        if let Some(v) = uri.take("hostid") {
            o.hostid = parse_uuid(&v)
                .ok_or_else(|| uri.invalid(&format!("hostid={v:?}: expected a UUID")))?;
            o.hostnqn = format!("nqn.2014-08.org.nvmexpress:uuid:{}", format_uuid(&o.hostid));
        }
        if let Some(v) = uri.take("hostnqn") {
            if v.is_empty() || v.len() > crate::codec::MAX_NQN_LEN {
                return Err(uri.invalid(&format!("hostnqn={v:?}: 1 to 223 bytes expected")));
            }
            o.hostnqn = v;
        }
        if let Some(b) = uri.take_bool("hdgst")? {
            o.header_digest = b;
        }
        if let Some(b) = uri.take_bool("ddgst")? {
            o.data_digest = b;
        }
        if let Some(t) = take_seconds(uri, "timeout", false)? {
            o.timeout = Some(t);
        }
        if let Some(t) = take_seconds(uri, "connect_timeout", false)? {
            o.connect_timeout = t;
        }
        if let Some(t) = take_seconds(uri, "reconnect_timeout", true)? {
            o.reconnect_timeout = t;
        }
        if let Some(t) = take_seconds(uri, "kato", true)? {
            o.keep_alive = t;
        }
        if let Some(v) = uri.take("queues") {
            o.queues = v
                .parse::<u16>()
                .ok()
                .filter(|&n| (1..=1024).contains(&n))
                .ok_or_else(|| uri.invalid(&format!("queues={v:?}: expected 1 to 1024")))?;
        }
        if let Some(v) = uri.take("queue_size") {
            o.queue_size =
                v.parse::<u16>().ok().filter(|&n| n >= 2).ok_or_else(|| {
                    uri.invalid(&format!("queue_size={v:?}: expected 2 to 65535"))
                })?;
        }
        uri.finish(KEYS)?;
        Ok((addr, nqn, o))
    }
}

#[async_trait]
impl Opener for NvmfOpener {
    async fn open(&self, mut uri: DeviceUri) -> Result<Arc<dyn BlockDevice>> {
        let (addr, nqn, opts) = self.parse(&mut uri)?;
        Ok(Arc::new(NvmfDevice::connect(&addr, &nqn, opts).await?))
    }
}

fn take_seconds(uri: &mut DeviceUri, key: &str, zero_ok: bool) -> Result<Option<Duration>> {
    let Some(v) = uri.take(key) else {
        return Ok(None);
    };
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0 || (zero_ok && *s == 0.0))
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .map(Some)
        .ok_or_else(|| {
            uri.invalid(&format!(
                "{key}={v:?}: expected a number of seconds{}",
                if zero_ok { "" } else { " above 0" }
            ))
        })
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(u)
}

/// `host:port` from a URI authority: the port defaults to 4420; IPv6 addresses in brackets.
fn tcp_address(authority: &str) -> std::result::Result<String, String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address misses its closing ]")?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or("expected :PORT after the IPv6 address")?,
            ),
        };
        (format!("[{h}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err("write IPv6 addresses in brackets, e.g. nvmf://[::1]:4420/NQN".into())
            }
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err("the host is missing: nvmf://HOST[:PORT]/NQN".into());
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("port {p:?} is not a number from 0 to 65535"))?,
    };
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let o = NvmfOpener::default();
        let mut u = DeviceUri::parse(
            "nvmf://10.0.0.2/nqn.2026-12.io.strata:vol?nsid=2&hdgst=true&ddgst=1&timeout=3&queues=4&kato=0",
        )
        .expect("parse");
        let (addr, nqn, opts) = o.parse(&mut u).expect("valid");
        assert_eq!(addr, "10.0.0.2:4420");
        assert_eq!(nqn, "nqn.2026-12.io.strata:vol");
        assert_eq!(opts.nsid, 2);
        assert!(opts.header_digest && opts.data_digest);
        assert_eq!(opts.timeout, Some(Duration::from_secs(3)));
        assert_eq!(opts.queues, 4);
        assert!(opts.keep_alive.is_zero());

        let mut u = DeviceUri::parse("nvmf://[::1]:4421/n?hostnqn=nqn.x:h").expect("parse");
        let (addr, _, opts) = o.parse(&mut u).expect("valid");
        assert_eq!(addr, "[::1]:4421");
        assert_eq!(opts.hostnqn, "nqn.x:h");

        for bad in [
            "nvmf://h/n?nsid=0",
            "nvmf://h/n?speed=9",
            "nvmf://h/",
            "nvmf://h:99999/n",
            "nvmf://::1/n",
            "nvmf:///n",
            "nvmf://h/n?timeout=0",
            "nvmf://h/n?hostid=xyz",
        ] {
            let mut u = DeviceUri::parse(bad).expect("parse");
            assert!(o.parse(&mut u).is_err(), "{bad} is refused");
        }
        let mut u = DeviceUri::parse("nvmf://h/n?speed=9").expect("parse");
        let e = o.parse(&mut u).expect_err("unknown key");
        assert!(e.to_string().contains("unknown option \"speed\""), "{e}");
    }

    #[test]
    fn host_ids() {
        let o = HostOptions::default();
        assert!(o.hostnqn.starts_with("nqn.2014-08.org.nvmexpress:uuid:"));
        assert_eq!(
            o.hostid,
            HostOptions::default().hostid,
            "one host ID per process"
        );
        assert_eq!(parse_uuid(&format_uuid(&o.hostid)), Some(o.hostid));
    }

    #[test]
    fn statuses_map_to_kinds() {
        assert_eq!(
            kind_of(Status::LBA_OUT_OF_RANGE.dnr()),
            ErrorKind::OutOfRange
        );
        assert_eq!(kind_of(Status::CAPACITY_EXCEEDED), ErrorKind::NoSpace);
        assert_eq!(
            kind_of(Status::NAMESPACE_WRITE_PROTECTED),
            ErrorKind::PermissionDenied
        );
        assert_eq!(kind_of(Status::WRITE_FAULT), ErrorKind::Io);
        assert_eq!(kind_of(Status::INVALID_OPCODE), ErrorKind::Unsupported);
    }
}
