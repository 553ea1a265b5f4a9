//! The transmission phase of one connection, driven by a single task.
//!
//! ```text
//!            ┌──────────────── one task, one poll loop ─────────────────┐
//!  socket ─► │ read into inbuf ─► parse ─► request futures (unordered) │
//!            │                               │ complete in any order    │
//!  socket ◄─ │ vectored write ◄── replies ◄──┘                          │
//!            └──────────────────────────────────────────────────────────┘
//! ```
//!
//! Requests run as futures polled by the connection's own task rather than as spawned tasks, and
//! replies are written by the same task: a request the device completes at once (memory, a
//! page-cache hit) costs no thread wakeup at all, requests still pipeline and complete out of
//! order, and the socket is never contended between threads. Write payloads are split out of the
//! read buffer without copying.
//!
//! Transactions (commands 64–67): from BEGIN to COMMIT or ROLLBACK the connection runs one
//! request at a time, in order, against its open transaction (semantics: the README, "Transactions over NBD").
//!
//! Backpressure: every READ and WRITE charges its length to a byte budget when it is parsed and
//! releases it when its reply is written; while the budget is spent the loop reads nothing more,
//! so a client that outruns its device (or stops reading replies) waits in its socket buffer.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use strata_bdev::{Error as DevError, ErrorKind, Extent, Transaction, WriteOpts, ZeroOpts};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::debug;

use crate::codec::{self, alloc_flags, cmd, cmd_flags, errno, reply};
use crate::server::Export;

/// The meta-context id of `base:allocation`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;
/// Block status descriptors sent per reply at most.
const MAX_EXTENTS: usize = 1 << 16;
/// The least free space offered to each socket read.
const READ_CHUNK: usize = 256 << 10;
/// Buffers gathered into one vectored write at most.
const MAX_SLICES: usize = 64;
/// Loop rounds before the task yields to others even if it could go on.
const MAX_ROUNDS: usize = 64;

/// What every request of a connection needs to know.
pub(crate) struct Ctx {
    pub export: Arc<Export>,
    pub structured: bool,
    /// `base:allocation` was negotiated for this export.
    pub block_status: bool,
    pub block_size: u64,
    pub max_payload: u32,
}

/// An encoded reply and the in-flight budget it releases once written.
struct Reply {
    header: Bytes,
    data: Bytes,
    charge: usize,
    /// For a request run in order (a transaction's): whether a transaction is open after it.
    serial: Option<bool>,
}

impl Reply {
    fn len(&self) -> usize {
        self.header.len() + self.data.len()
    }
}

type RequestFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// Serve requests on `stream` until the client disconnects, sends `NBD_CMD_DISC`, breaks the
/// framing, or `shutdown` fires; in every case but a broken socket, each request already read
/// is answered first.
pub(crate) async fn serve<S>(
    stream: S,
    ctx: Arc<Ctx>,
    budget: usize,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = Conn {
        vectored: stream.is_write_vectored(),
        stream,
        ctx,
        budget: budget.max(1),
        in_flight: 0,
        inbuf: BytesMut::with_capacity(READ_CHUNK),
        discard: 0,
        requests: FuturesUnordered::new(),
        out: VecDeque::new(),
        written: 0,
        unflushed: false,
        reading: true,
        shutdown: Box::pin(shutdown.cancelled_owned()),
        txn: Arc::new(tokio::sync::Mutex::new(None)),
        in_txn: false,
        serial_busy: false,
        parked: false,
    };
    let result = std::future::poll_fn(|cx| conn.poll(cx)).await;
    match result {
        Ok(()) => match conn.stream.shutdown().await {
            Err(e) if e.kind() != std::io::ErrorKind::NotConnected => Err(e),
            _ => Ok(()),
        },
        Err(e) => Err(e),
    }
}

struct Conn<S> {
    stream: S,
    vectored: bool,
    ctx: Arc<Ctx>,
    budget: usize,
    /// Bytes charged by requests whose replies are not yet written.
    in_flight: usize,
    inbuf: BytesMut,
    /// Bytes of a refused oversized write's payload still to skip.
    discard: usize,
    requests: FuturesUnordered<RequestFuture>,
    out: VecDeque<Reply>,
    /// Bytes of `out.front()` already written.
    written: usize,
    unflushed: bool,
    reading: bool,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The open transaction, if any (dropped, i.e. rolled back, with the connection).
    txn: TxnSlot,
    /// A transaction may be open: requests run one at a time, in order.
    in_txn: bool,
    /// A request that runs in order is in flight.
    serial_busy: bool,
    /// The next request must wait for those in flight: stop reading until one completes.
    parked: bool,
}

type TxnSlot = Arc<tokio::sync::Mutex<Option<Box<dyn Transaction>>>>;

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        for _ in 0..MAX_ROUNDS {
            let mut progress = false;
            if self.reading && self.shutdown.as_mut().poll(cx).is_ready() {
                debug!("server shutting down: answering requests in flight, then closing");
                self.reading = false;
            }
            // Take new requests while the budget allows.
            while self.reading && self.has_budget() {
                if !self.parse_one()? {
                    break;
                }
                progress = true;
            }
            // Run them, and turn completed requests into replies. This comes before the next
            // read so that a request done at once has released its payload, and the read
            // buffer can be reused in place rather than reallocated.
            while let Poll::Ready(Some(reply)) = self.requests.poll_next_unpin(cx) {
                if let Some(open) = reply.serial {
                    self.serial_busy = false;
                    self.in_txn = open;
                }
                self.parked = false;
                self.out.push_back(reply);
                progress = true;
            }
            // Write what is ready, as one batch.
            if !self.out.is_empty() {
                match self.poll_write(cx) {
                    Poll::Ready(Ok(())) => progress = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            if self.out.is_empty() && self.unflushed {
                match Pin::new(&mut self.stream).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.unflushed = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            if self.reading && self.has_budget() && !self.parked {
                match self.poll_fill(cx) {
                    Poll::Ready(Ok(0)) => {
                        if !self.inbuf.is_empty() || self.discard > 0 {
                            debug!(bytes = self.inbuf.len(), "client closed mid-request");
                        }
                        self.reading = false;
                        progress = true;
                    }
                    Poll::Ready(Ok(_)) => progress = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            if !self.reading && self.requests.is_empty() && self.out.is_empty() && !self.unflushed {
                return Poll::Ready(Ok(()));
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Still busy: let other tasks run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn has_budget(&self) -> bool {
        self.in_flight < self.budget
    }

    /// Read more from the socket into `inbuf`.
    ///
    /// Inside a large write payload the read stops exactly at the payload's end, so the
    /// payload is split off whole and the buffer is empty afterwards: the next `reserve`
    /// reclaims the allocation in place instead of copying over-read bytes to a new one.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let rest_of_payload = self.payload_remaining();
        let limit = if rest_of_payload > 0 {
            rest_of_payload
        } else {
            READ_CHUNK
        };
        if self.inbuf.capacity() - self.inbuf.len() < limit {
            self.inbuf.reserve(limit.max(READ_CHUNK));
        }
        let spare = &mut self.inbuf.spare_capacity_mut()[..limit];
        let mut rb = tokio::io::ReadBuf::uninit(spare);
        match Pin::new(&mut self.stream).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
                unsafe { self.inbuf.set_len(self.inbuf.len() + n) };
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Bytes still missing from the large write at the head of `inbuf` (0 if none).
    fn payload_remaining(&self) -> usize {
        if self.discard > 0 || self.inbuf.len() < codec::REQUEST_LEN {
            return 0;
        }
        match codec::decode_request(&self.inbuf[..codec::REQUEST_LEN]) {
            Ok(r) if r.command == cmd::WRITE && r.length <= self.ctx.max_payload => {
                (codec::REQUEST_LEN + r.length as usize).saturating_sub(self.inbuf.len())
            }
            _ => 0,
        }
    }

    /// Take one whole request from the read buffer, if there is one. Errors only when the
    /// framing is broken.
    fn parse_one(&mut self) -> std::io::Result<bool> {
        if self.discard > 0 {
            let n = self.discard.min(self.inbuf.len());
            self.inbuf.advance(n);
            self.discard -= n;
            return Ok(n > 0);
        }
        if self.inbuf.len() < codec::REQUEST_LEN {
            return Ok(false);
        }
        let req = codec::decode_request(&self.inbuf[..codec::REQUEST_LEN]).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("request: {e}; closing, as framing is lost"),
            )
        })?;
        // A transaction's requests run alone, in order: wait for the ones before.
        let serial = (cmd::is_txn(req.command) || self.in_txn) && req.command != cmd::DISC;
        if serial && (self.serial_busy || !self.requests.is_empty()) {
            // Read no more meanwhile: what waits in the buffer is bounded by one request.
            self.parked = true;
            return Ok(false);
        }
        if req.command == cmd::BEGIN_TXN {
            // What follows BEGIN runs in order behind it, whatever BEGIN answers.
            self.in_txn = true;
        }
        let mut payload = None;
        if req.command == cmd::WRITE {
            if req.length > self.ctx.max_payload {
                // Refuse, and skip the payload so that the stream stays in sync.
                self.inbuf.advance(codec::REQUEST_LEN);
                self.discard = req.length as usize;
                let f = Failure::new(
                    errno::EINVAL,
                    format!(
                        "write: {} bytes is over the {}-byte maximum payload",
                        req.length, self.ctx.max_payload
                    ),
                );
                self.out.push_back(encode(&self.ctx, &req, Err(f), 0));
                return Ok(true);
            }
            let need = codec::REQUEST_LEN + req.length as usize;
            if self.inbuf.len() < need {
                return Ok(false);
            }
            self.inbuf.advance(codec::REQUEST_LEN);
            payload = Some(self.inbuf.split_to(req.length as usize).freeze());
        } else {
            self.inbuf.advance(codec::REQUEST_LEN);
            if req.command == cmd::DISC {
                debug!("client disconnects (NBD_CMD_DISC)");
                self.reading = false;
                return Ok(true);
            }
        }
        let charge = match req.command {
            cmd::READ | cmd::WRITE => (req.length as usize).clamp(1, self.budget),
            _ => 0,
        };
        self.in_flight += charge;
        let ctx = self.ctx.clone();
        if serial {
            self.serial_busy = true;
            let txn = self.txn.clone();
            self.requests.push(Box::pin(async move {
                let mut slot = txn.lock().await;
                let result = run_txn(&ctx, &req, payload, &mut slot).await;
                let mut reply = encode(&ctx, &req, result, charge);
                reply.serial = Some(slot.is_some());
                reply
            }));
            return Ok(true);
        }
        self.requests.push(Box::pin(async move {
            let result = run(&ctx, &req, payload).await;
            encode(&ctx, &req, result, charge)
        }));
        Ok(true)
    }

    /// Write as much of the ready replies as the socket takes now.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut n = 0;
        let mut skip = self.written;
        for r in &self.out {
            for part in [&r.header, &r.data] {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                if n < MAX_SLICES {
                    slices[n] = IoSlice::new(&part[skip..]);
                    n += 1;
                }
                skip = 0;
            }
            if n >= MAX_SLICES || !self.vectored {
                break;
            }
        }
        let result = if self.vectored {
            Pin::new(&mut self.stream).poll_write_vectored(cx, &slices[..n])
        } else {
            Pin::new(&mut self.stream).poll_write(cx, &slices[0])
        };
        let mut wrote = match result {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(w)) => w,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        self.unflushed = true;
        while wrote > 0 {
            let front = self
                .out
                .front()
                .expect("bytes were written from a queued reply");
            let left = front.len() - self.written;
            if wrote < left {
                self.written += wrote;
                break;
            }
            wrote -= left;
            self.written = 0;
            let done = self.out.pop_front().expect("front exists");
            self.in_flight -= done.charge;
        }
        Poll::Ready(Ok(()))
    }
}

/// An error to send back: the NBD errno and a message for the user.
struct Failure {
    errno: u32,
    message: String,
}

impl Failure {
    fn new(errno: u32, message: impl Into<String>) -> Failure {
        Failure {
            errno,
            message: message.into(),
        }
    }

    fn from_device(e: DevError, write_like: bool) -> Failure {
        let errno = match e.kind() {
            ErrorKind::OutOfRange if write_like => errno::ENOSPC,
            kind => errno::from_os(kind.errno()),
        };
        Failure {
            errno,
            message: e.chain(),
        }
    }
}

enum Success {
    Done,
    Data(Bytes),
    Extents(Vec<Extent>),
}

/// Encode the reply to `req`.
fn encode(
    ctx: &Ctx,
    req: &codec::Request,
    result: Result<Success, Failure>,
    charge: usize,
) -> Reply {
    let mut h = BytesMut::with_capacity(32);
    let mut data = Bytes::new();
    match result {
        Ok(Success::Data(d)) => {
            if ctx.structured {
                codec::encode_chunk_header(
                    &mut h,
                    reply::FLAG_DONE,
                    reply::TYPE_OFFSET_DATA,
                    req.cookie,
                    8 + d.len() as u32,
                );
                h.extend_from_slice(&req.offset.to_be_bytes());
            } else {
                codec::encode_simple_reply(&mut h, 0, req.cookie);
            }
            data = d;
        }
        Ok(Success::Extents(extents)) => {
            let mut payload = BytesMut::with_capacity(4 + 8 * extents.len().min(MAX_EXTENTS));
            payload.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
            let max_len = (u64::from(u32::MAX) / ctx.block_size) * ctx.block_size;
            let want_one = req.flags & cmd_flags::REQ_ONE != 0;
            'outer: for e in extents {
                let flags = (if e.hole { alloc_flags::HOLE } else { 0 })
                    | (if e.zero { alloc_flags::ZERO } else { 0 });
                let mut left = e.len;
                while left > 0 {
                    let n = left.min(max_len);
                    payload.extend_from_slice(&(n as u32).to_be_bytes());
                    payload.extend_from_slice(&flags.to_be_bytes());
                    left -= n;
                    if want_one || payload.len() >= 4 + 8 * MAX_EXTENTS {
                        break 'outer;
                    }
                }
            }
            codec::encode_chunk_header(
                &mut h,
                reply::FLAG_DONE,
                reply::TYPE_BLOCK_STATUS,
                req.cookie,
                payload.len() as u32,
            );
            data = payload.freeze();
        }
        Ok(Success::Done) => codec::encode_simple_reply(&mut h, 0, req.cookie),
        Err(f) => {
            debug!(cookie = req.cookie, command = req.command, errno = f.errno, message = %f.message, "request failed");
            if ctx.structured {
                codec::encode_error_chunk(&mut h, req.cookie, f.errno, &f.message);
            } else {
                codec::encode_simple_reply(&mut h, f.errno, req.cookie);
            }
        }
    }
    Reply {
        header: h.freeze(),
        data,
        charge,
        serial: None,
    }
}

/// The flags each command accepts (FUA is valid on all).
fn allowed_flags(command: u16) -> u16 {
    cmd_flags::FUA
        | match command {
            cmd::READ => cmd_flags::DF,
            cmd::WRITE_ZEROES => cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
            cmd::BLOCK_STATUS => cmd_flags::REQ_ONE,
            _ => 0,
        }
}

fn command_name(command: u16) -> &'static str {
    match command {
        cmd::READ => "read",
        cmd::WRITE => "write",
        cmd::FLUSH => "flush",
        cmd::TRIM => "trim",
        cmd::CACHE => "cache",
        cmd::WRITE_ZEROES => "write zeroes",
        cmd::BLOCK_STATUS => "block status",
        cmd::BEGIN_TXN => "begin transaction",
        cmd::COMMIT_TXN => "commit transaction",
        cmd::ROLLBACK_TXN => "roll back transaction",
        cmd::LOCK_TXN => "lock transaction",
        _ => "unknown command",
    }
}

/// Check a request against the protocol and the export: command, flags, range, alignment.
fn validate(ctx: &Ctx, req: &codec::Request) -> Result<(), Failure> {
    let name = command_name(req.command);
    if !matches!(
        req.command,
        cmd::READ
            | cmd::WRITE
            | cmd::FLUSH
            | cmd::TRIM
            | cmd::CACHE
            | cmd::WRITE_ZEROES
            | cmd::BLOCK_STATUS
            | cmd::BEGIN_TXN
            | cmd::COMMIT_TXN
            | cmd::ROLLBACK_TXN
            | cmd::LOCK_TXN
    ) {
        return Err(Failure::new(
            errno::EINVAL,
            format!(
                "command {} is not an NBD command this server knows",
                req.command
            ),
        ));
    }
    let bad_flags = req.flags & !allowed_flags(req.command);
    if bad_flags != 0 {
        return Err(Failure::new(
            errno::EINVAL,
            format!("{name}: flags {bad_flags:#x} are not valid for this command"),
        ));
    }
    if req.flags & cmd_flags::DF != 0 && !ctx.structured {
        return Err(Failure::new(
            errno::EINVAL,
            "read: DF needs structured replies",
        ));
    }
    let dev = &ctx.export.device;
    let write_like = matches!(
        req.command,
        cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM | cmd::BEGIN_TXN
    );
    if write_like && ctx.export.is_read_only() {
        return Err(Failure::new(
            errno::EPERM,
            format!("{name}: export {:?} is read-only", ctx.export.name),
        ));
    }
    let (offset, length) = (req.offset, u64::from(req.length));
    if req.command != cmd::FLUSH && !cmd::is_txn(req.command) {
        if length == 0 {
            return Err(Failure::new(
                errno::EINVAL,
                format!("{name}: a length of 0 is not valid"),
            ));
        }
        if req.command == cmd::READ && req.length > ctx.max_payload {
            return Err(Failure::new(
                errno::EINVAL,
                format!(
                    "read: {length} bytes is over the {}-byte maximum payload",
                    ctx.max_payload
                ),
            ));
        }
        let size = dev.geometry().size;
        if offset.checked_add(length).is_none_or(|end| end > size) {
            let e = if matches!(req.command, cmd::WRITE | cmd::WRITE_ZEROES) {
                errno::ENOSPC
            } else {
                errno::EINVAL
            };
            return Err(Failure::new(
                e,
                format!("{name}: {length} bytes at offset {offset} reach past the end of the export ({size} bytes)"),
            ));
        }
        if !offset.is_multiple_of(ctx.block_size) || !length.is_multiple_of(ctx.block_size) {
            return Err(Failure::new(
                errno::EINVAL,
                format!(
                    "{name}: offset and length must be multiples of {} bytes",
                    ctx.block_size
                ),
            ));
        }
    }
    Ok(())
}

/// Validate a request and run it against the device.
async fn run(ctx: &Ctx, req: &codec::Request, payload: Option<Bytes>) -> Result<Success, Failure> {
    validate(ctx, req)?;
    let dev = &ctx.export.device;
    let fua = req.flags & cmd_flags::FUA != 0;
    let write_like = matches!(req.command, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM);
    let (offset, length) = (req.offset, u64::from(req.length));
    let dev_err = |e| Failure::from_device(e, write_like);
    match req.command {
        cmd::READ => dev
            .read_at(offset, length as usize)
            .await
            .map(Success::Data)
            .map_err(dev_err),
        cmd::WRITE => {
            let data =
                payload.ok_or_else(|| Failure::new(errno::EINVAL, "write: payload missing"))?;
            dev.write_at(offset, data, WriteOpts { fua })
                .await
                .map(|_| Success::Done)
                .map_err(dev_err)
        }
        cmd::FLUSH => dev.flush().await.map(|_| Success::Done).map_err(dev_err),
        cmd::TRIM => {
            if !dev.capabilities().trim {
                // Trim is advisory: without support it is done by doing nothing, as the spec allows.
                return Ok(Success::Done);
            }
            dev.trim(offset, length, WriteOpts { fua })
                .await
                .map(|_| Success::Done)
                .map_err(dev_err)
        }
        cmd::CACHE => dev
            .cache(offset, length)
            .await
            .map(|_| Success::Done)
            .map_err(dev_err),
        cmd::WRITE_ZEROES => {
            let opts = ZeroOpts {
                fua,
                may_trim: req.flags & cmd_flags::NO_HOLE == 0,
                fast_only: req.flags & cmd_flags::FAST_ZERO != 0,
            };
            dev.write_zeroes(offset, length, opts)
                .await
                .map(|_| Success::Done)
                .map_err(dev_err)
        }
        cmd::BLOCK_STATUS => {
            if !ctx.block_status {
                return Err(Failure::new(
                    errno::EINVAL,
                    "block status: no meta context was selected (NBD_OPT_SET_META_CONTEXT base:allocation)",
                ));
            }
            let ext = dev.block_status(offset, length).await.map_err(dev_err)?;
            if ext.is_empty() || ext.iter().any(|e| e.len == 0) {
                return Err(Failure::new(
                    errno::EIO,
                    "block status: the device returned an empty extent",
                ));
            }
            Ok(Success::Extents(ext))
        }
        _ => Err(Failure::new(
            errno::EINVAL,
            format!(
                "{}: no transaction is open on this connection (send BEGIN first)",
                command_name(req.command)
            ),
        )),
    }
}

/// Run a request of a connection that may have a transaction open (`slot`): transaction
/// commands, and reads and writes inside the transaction. Everything else runs as usual.
async fn run_txn(
    ctx: &Ctx,
    req: &codec::Request,
    payload: Option<Bytes>,
    slot: &mut Option<Box<dyn Transaction>>,
) -> Result<Success, Failure> {
    let name = command_name(req.command);
    let none_open = || {
        Failure::new(
            errno::EINVAL,
            format!("{name}: no transaction is open on this connection (send BEGIN first)"),
        )
    };
    // MVPS marks a page as zeroes with a WRITE of length 0 at its offset.
    let tombstone = req.command == cmd::WRITE && req.length == 0 && slot.is_some();
    if !tombstone {
        validate(ctx, req)?;
    }
    let err = |e| Failure::from_device(e, true);
    match req.command {
        cmd::BEGIN_TXN => {
            if slot.is_some() {
                return Err(Failure::new(
                    errno::EINVAL,
                    "begin transaction: one is open on this connection already (COMMIT or ROLLBACK it first)",
                ));
            }
            let Some(t) = &ctx.export.transactions else {
                return Err(Failure::new(
                    errno::EINVAL,
                    format!(
                        "begin transaction: export {:?} does not support transactions (page-store images do)",
                        ctx.export.name
                    ),
                ));
            };
            *slot = Some(t.begin().await.map_err(err)?);
            Ok(Success::Done)
        }
        cmd::COMMIT_TXN => {
            let t = slot.take().ok_or_else(none_open)?;
            t.commit().await.map_err(err)?;
            Ok(Success::Done)
        }
        cmd::ROLLBACK_TXN => {
            slot.take().ok_or_else(none_open)?.rollback().await;
            Ok(Success::Done)
        }
        cmd::LOCK_TXN => {
            let t = slot.as_mut().ok_or_else(none_open)?;
            if t.lock().await.map_err(err)? {
                Ok(Success::Done)
            } else {
                Err(Failure::new(
                    errno::EPERM,
                    "lock transaction: it can no longer commit (a page it read or wrote changed since BEGIN, or it timed out); ROLLBACK it",
                ))
            }
        }
        _ => {
            let Some(t) = slot.as_mut() else {
                return run(ctx, req, payload).await;
            };
            let (offset, length) = (req.offset, u64::from(req.length));
            match req.command {
                cmd::READ => t
                    .read(offset, length as usize)
                    .await
                    .map(Success::Data)
                    .map_err(|e| Failure::from_device(e, false)),
                cmd::WRITE if tombstone => {
                    t.zero(offset, ctx.block_size).await.map_err(err)?;
                    Ok(Success::Done)
                }
                cmd::WRITE => {
                    let data = payload
                        .ok_or_else(|| Failure::new(errno::EINVAL, "write: payload missing"))?;
                    t.write(offset, data).await.map_err(err)?;
                    Ok(Success::Done)
                }
                cmd::TRIM | cmd::WRITE_ZEROES => {
                    t.zero(offset, length).await.map_err(err)?;
                    Ok(Success::Done)
                }
                // FLUSH, CACHE, BLOCK_STATUS: about the export, not the transaction.
                _ => run(ctx, req, payload).await,
            }
        }
    }
}
