//! One connection, which is one queue, driven by a single task.
//!
//! ```text
//!            ┌──────────────── one task, one poll loop ─────────────────────┐
//!  socket ─► │ read ─► PDUs ─► ICReq · Connect · commands · H2CData         │
//!            │                    │ (write without in-capsule data: R2T,    │
//!            │                    │  then its H2CData PDUs)                 │
//!            │                    ▼                                         │
//!            │          command futures (unordered) ─► device               │
//!  socket ◄─ │ vectored write ◄── C2HData, responses, R2Ts ◄──┘             │
//!            └──────────────────────────────────────────────────────────────┘
//! ```
//!
//! As in the NBD server, commands are futures polled by the connection's own task, so a command
//! the device completes at once costs no wakeup, commands pipeline and complete in any order,
//! and one writer batches every PDU ready into one vectored write. Read data goes from the
//! device's buffer to the socket without a copy; write data (in-capsule or H2CData) is split
//! out of the read buffer without one.
//!
//! A PDU that breaks the transport's rules (a bad header, digest or length, data the host was
//! not asked for or beyond MAXH2CDATA) is answered with a C2HTermReq and the connection closes;
//! a command that is merely wrong gets an NVMe status and the queue goes on. The number of
//! commands outstanding is bounded by the queue size the host chose in Connect.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, info, warn};

use super::controller::Controller;
use super::io::{self as iocmd, IoOp};
use super::{admin, Namespace, Shared, ADMIN_IN_CAPSULE, ADMIN_QUEUE_ENTRIES};
use crate::codec::pdu::{
    encode_capsule_resp, encode_data_header, encode_ic_resp, encode_r2t, encode_term_req,
    MAX_TERM_DATA,
};
use crate::codec::{
    cattr, connect_offset, decode_header, digest, pdu_flags, pdu_type, sgl_id, AdminCommand,
    Command, Completion, Connect, ConnectData, DataHeader, Digests, Direction, Fabrics, IcReq,
    IcResp, IoCommand, Limits as PduLimits, PduError, PduHeader, R2t, Role, Status,
};

/// The least free space offered to each socket read.
const READ_CHUNK: usize = 256 << 10;
/// A PDU at least this much larger than what is buffered is read exactly to its end, so its
/// data can be split off without copying what follows.
const EXACT_READ_MIN: usize = 64 << 10;
/// Buffers gathered into one vectored write at most.
const MAX_SLICES: usize = 64;
/// Loop rounds before the task yields to others even if it could go on.
const MAX_ROUNDS: usize = 64;

/// A command in flight.
pub(crate) type CmdFuture = Pin<Box<dyn Future<Output = Done> + Send>>;

/// How a command ended.
#[derive(Debug)]
pub(crate) struct Done {
    pub cid: u16,
    pub status: Status,
    pub result: u64,
    /// Data for the host (C2HData), if any.
    pub data: Bytes,
    /// False: no response (an event request ended by its queue closing).
    pub respond: bool,
}

impl Done {
    pub fn ok(cid: u16) -> Done {
        Done::status(cid, Status::SUCCESS)
    }

    pub fn status(cid: u16, status: Status) -> Done {
        Done {
            cid,
            status,
            result: 0,
            data: Bytes::new(),
            respond: true,
        }
    }

    pub fn result(cid: u16, result: u64) -> Done {
        Done {
            result,
            ..Done::ok(cid)
        }
    }

    pub fn data(cid: u16, data: Bytes) -> Done {
        Done {
            data,
            ..Done::ok(cid)
        }
    }

    pub fn silent(cid: u16) -> Done {
        Done {
            respond: false,
            ..Done::ok(cid)
        }
    }
}

/// A command's outcome now, or later.
pub(crate) enum Exec {
    Now(Done),
    Later(CmdFuture),
}

/// What the commands of a connected queue need.
#[derive(Debug)]
pub(crate) struct QueueCtx {
    pub shared: Arc<Shared>,
    pub ctrl: Arc<Controller>,
    pub qid: u16,
    /// The address the host reached (the discovery log names it).
    pub local: SocketAddr,
    /// Cancelled when the queue stops reading: event requests end.
    pub stop: CancellationToken,
    /// The namespace I/O commands go to (I/O queues of NVM subsystems).
    pub ns: Option<Arc<Namespace>>,
}

enum Phase {
    /// Waiting for ICReq.
    Fresh,
    /// Waiting for Connect.
    Initialized,
    Connected(Arc<QueueCtx>),
}

/// A checked command waiting for its data or its turn.
#[derive(Debug, Clone, Copy)]
enum Op {
    Connect(Connect),
    Admin(AdminCommand),
    Io(IoOp),
}

/// A write whose data arrives in H2CData PDUs after an R2T.
struct Transfer {
    cmd: Command,
    op: Op,
    len: u32,
    received: u32,
    chunks: Vec<Bytes>,
    digest_error: bool,
}

/// PDUs ready to be written; `completes` marks the ones that finish a command.
struct Out {
    parts: [Bytes; 4],
    completes: bool,
}

impl Out {
    fn one(b: Bytes, completes: bool) -> Out {
        Out {
            parts: [b, Bytes::new(), Bytes::new(), Bytes::new()],
            completes,
        }
    }

    fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }
}

/// Serve one connection until the host goes, the association ends or the target shuts down.
pub(crate) async fn serve<S>(
    stream: S,
    shared: Arc<Shared>,
    local: SocketAddr,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut q = Queue {
        vectored: stream.is_write_vectored(),
        stream,
        server_stop: Box::pin(shared.shutdown.clone().cancelled_owned()),
        deadline: Some(Box::pin(tokio::time::sleep(
            shared.limits.handshake_timeout,
        ))),
        shared,
        local,
        phase: Phase::Fresh,
        digests: None,
        align: 4,
        inbuf: BytesMut::with_capacity(READ_CHUNK),
        want: 0,
        arena: BytesMut::with_capacity(8192),
        commands: FuturesUnordered::new(),
        transfers: Vec::new(),
        free_tags: Vec::new(),
        out: VecDeque::new(),
        written: 0,
        unflushed: false,
        reading: true,
        stopping: false,
        aborted: false,
        outstanding: 0,
        depth: ADMIN_QUEUE_ENTRIES as usize,
        sq_entries: 0,
        sq_head: 0,
        sqflow_disabled: false,
        ctrl_stop: None,
        touched: false,
    };
    let result = std::future::poll_fn(|cx| q.poll(cx)).await;
    q.close();
    match result {
        Ok(()) if !q.aborted => match q.stream.shutdown().await {
            Err(e) if e.kind() != std::io::ErrorKind::NotConnected => Err(e),
            _ => Ok(()),
        },
        other => other,
    }
}

struct Queue<S> {
    stream: S,
    vectored: bool,
    shared: Arc<Shared>,
    local: SocketAddr,
    phase: Phase,
    /// Negotiated by ICReq.
    digests: Option<Digests>,
    /// The host's PDU data alignment, in bytes.
    align: usize,
    inbuf: BytesMut,
    /// The length of the incomplete PDU at the head of `inbuf` (0: not known yet).
    want: usize,
    /// Headers are encoded here and split off.
    arena: BytesMut,
    commands: FuturesUnordered<CmdFuture>,
    /// Writes waiting for their data, by transfer tag.
    transfers: Vec<Option<Transfer>>,
    free_tags: Vec<u16>,
    out: VecDeque<Out>,
    /// Bytes of `out.front()` already written.
    written: usize,
    unflushed: bool,
    reading: bool,
    /// The target is shutting down.
    stopping: bool,
    /// Close at once, writing nothing more.
    aborted: bool,
    /// Commands received and not yet answered (their response not yet written).
    outstanding: usize,
    depth: usize,
    sq_entries: u32,
    sq_head: u32,
    sqflow_disabled: bool,
    server_stop: Pin<Box<WaitForCancellationFutureOwned>>,
    ctrl_stop: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// Until Connect: the handshake must finish by then.
    deadline: Option<Pin<Box<Sleep>>>,
    /// A command arrived in this round: the controller's keep-alive clock is touched once.
    touched: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Queue<S> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        for _ in 0..MAX_ROUNDS {
            let mut progress = false;
            if let Some(d) = self.deadline.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the host did not connect a queue in time",
                    )));
                }
            }
            if let Some(stop) = self.ctrl_stop.as_mut() {
                if stop.as_mut().poll(cx).is_ready() {
                    debug!("controller torn down: closing the queue");
                    self.aborted = true;
                    return Poll::Ready(Ok(()));
                }
            }
            if !self.stopping && self.server_stop.as_mut().poll(cx).is_ready() {
                self.begin_shutdown();
                progress = true;
            }
            while self.reading {
                match self.parse_one() {
                    Ok(true) => progress = true,
                    Ok(false) => break,
                    Err((e, header)) => {
                        self.fatal(e, &header);
                        progress = true;
                    }
                }
            }
            if std::mem::take(&mut self.touched) {
                if let Some(c) = self.ctx() {
                    c.ctrl.touch(self.shared.now_ms());
                }
            }
            if self.aborted {
                return Poll::Ready(Ok(()));
            }
            while let Poll::Ready(Some(done)) = self.commands.poll_next_unpin(cx) {
                self.respond(done);
                progress = true;
            }
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
            if self.reading {
                match self.poll_fill(cx) {
                    Poll::Ready(Ok(0)) => {
                        if !self.inbuf.is_empty() {
                            debug!(bytes = self.inbuf.len(), "host closed mid-PDU");
                        }
                        self.stop_reading();
                        // Nothing will come for writes waiting on data.
                        self.transfers.clear();
                        progress = true;
                    }
                    Poll::Ready(Ok(_)) => progress = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            if !self.reading && self.commands.is_empty() && self.out.is_empty() && !self.unflushed {
                return Poll::Ready(Ok(()));
            }
            if !progress {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn ctx(&self) -> Option<&Arc<QueueCtx>> {
        match &self.phase {
            Phase::Connected(c) => Some(c),
            _ => None,
        }
    }

    fn stop_reading(&mut self) {
        self.reading = false;
        if let Some(c) = self.ctx() {
            c.stop.cancel();
        }
    }

    /// The target is shutting down: read nothing more, answer what was read (writes still
    /// waiting for data are aborted), then close.
    fn begin_shutdown(&mut self) {
        debug!("target shutting down: answering commands in flight, then closing");
        self.stopping = true;
        self.stop_reading();
        for t in std::mem::take(&mut self.transfers).into_iter().flatten() {
            self.respond(Done::status(t.cmd.cid, Status::ABORTED_SQ_DELETION));
        }
    }

    /// End the connection for a transport error: a C2HTermReq, then close.
    fn fatal(&mut self, e: PduError, header: &[u8]) {
        warn!(error = %e, "fatal transport error: terminating the connection");
        self.stop_reading();
        self.commands = FuturesUnordered::new();
        self.transfers.clear();
        let mut b = BytesMut::new();
        encode_term_req(&mut b, Role::Controller, e.fes(), e.fei(), header);
        self.out.push_back(Out::one(b.freeze(), false));
    }

    /// The connection is over: release what it held in its controller.
    fn close(&mut self) {
        if let Phase::Connected(ctx) = &self.phase {
            ctx.stop.cancel();
            if ctx.qid == 0 {
                ctx.ctrl.teardown("its admin queue closed");
            } else {
                ctx.ctrl.remove_queue(ctx.qid);
            }
        }
    }

    fn pdu_limits(&self) -> PduLimits {
        let in_capsule = match &self.phase {
            Phase::Connected(c) if c.qid != 0 => self.shared.limits.in_capsule,
            _ => ADMIN_IN_CAPSULE,
        };
        PduLimits {
            in_capsule,
            data_pdu: self.shared.limits.max_h2c_data,
        }
    }

    /// The largest PDU this queue accepts, with room for a read chunk behind it.
    fn largest_pdu(&self) -> usize {
        let l = self.pdu_limits();
        let header = crate::codec::pdu::CMD_HLEN + 2 * crate::codec::pdu::DIGEST_LEN + 256;
        header + l.in_capsule.max(l.data_pdu) as usize
    }

    /// Read more from the socket into `inbuf`.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let rest = self.want.saturating_sub(self.inbuf.len());
        let limit = if rest >= EXACT_READ_MIN {
            rest
        } else {
            READ_CHUNK
        };
        // While nothing is buffered, making room for the largest PDU this queue takes moves no
        // bytes (and reuses the allocation when nothing else holds it). Later, when a large
        // H2CData PDU turns out to be arriving, there is room for all of it after what was
        // read already, which then need not be moved.
        let largest = self.largest_pdu();
        if self.inbuf.is_empty() && self.inbuf.capacity() < largest {
            self.inbuf.reserve(largest);
        }
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

    /// The header of the PDU at the head of `inbuf`, for a termination request.
    fn offending_header(&self) -> Vec<u8> {
        let hlen = self.inbuf.get(2).map_or(8, |&h| usize::from(h));
        let n = hlen.clamp(8, MAX_TERM_DATA).min(self.inbuf.len());
        self.inbuf[..n].to_vec()
    }

    /// Take one whole PDU from `inbuf` and act on it.
    fn parse_one(&mut self) -> Result<bool, (PduError, Vec<u8>)> {
        let decoded = decode_header(
            &self.inbuf,
            Role::Controller,
            self.digests,
            self.pdu_limits(),
        )
        .map_err(|e| (e, self.offending_header()))?;
        let Some((header, layout)) = decoded else {
            self.want = 0;
            return Ok(false);
        };
        if self.inbuf.len() < layout.total {
            self.want = layout.total;
            return Ok(false);
        }
        self.want = 0;
        let flags = self.inbuf[1];
        // The header, for a termination request should this PDU turn out to break the rules.
        let mut head = [0u8; MAX_TERM_DATA];
        let head_len = layout.header_len.min(MAX_TERM_DATA);
        head[..head_len].copy_from_slice(&self.inbuf[..head_len]);
        let r = match header {
            PduHeader::IcReq(r) => {
                self.inbuf.advance(layout.total);
                self.on_ic_req(r)
            }
            PduHeader::H2CTermReq { fes, fei } => {
                let data = &self.inbuf[layout.header_len.min(layout.total)..layout.total];
                info!(fes, fei, header = ?data, "the host terminated the connection (H2CTermReq)");
                self.inbuf.advance(layout.total);
                self.aborted = true;
                self.reading = false;
                Ok(())
            }
            PduHeader::CapsuleCmd(cmd) => {
                let (data, bad) = self.take_pdu(&layout);
                self.on_capsule(cmd, data, bad)
            }
            PduHeader::H2CData(d) => {
                let (data, bad) = self.take_pdu(&layout);
                self.on_h2c_data(d, flags, data, bad)
            }
            other => Err(PduError::InvalidField {
                offset: 0,
                why: format!("{other:?} is not a PDU a controller receives"),
            }),
        };
        r.map(|()| true).map_err(|e| (e, head[..head_len].to_vec()))
    }

    /// Split a whole PDU off `inbuf`: its data (without a copy) and whether its data digest
    /// failed.
    fn take_pdu(&mut self, layout: &crate::codec::Layout) -> (Bytes, bool) {
        if layout.data_len == 0 {
            self.inbuf.advance(layout.total);
            return (Bytes::new(), false);
        }
        self.inbuf.advance(layout.data_offset);
        let data = self.inbuf.split_to(layout.data_len).freeze();
        let bad = layout.data_digest && digest(&data)[..] != self.inbuf[..4];
        self.inbuf
            .advance(layout.total - layout.data_offset - layout.data_len);
        (data, bad)
    }

    fn encode(&mut self, f: impl FnOnce(&mut BytesMut)) -> Bytes {
        self.arena.reserve(256);
        f(&mut self.arena);
        self.arena.split().freeze()
    }

    fn on_ic_req(&mut self, r: IcReq) -> Result<(), PduError> {
        if r.pfv != 0 {
            return Err(PduError::Unsupported {
                offset: 8,
                why: format!("PDU format version {}", r.pfv),
            });
        }
        if r.hpda > 31 {
            return Err(PduError::InvalidField {
                offset: 10,
                why: format!("HPDA {} is above 31", r.hpda),
            });
        }
        self.digests = Some(r.digests);
        self.align = (usize::from(r.hpda) + 1) * 4;
        self.phase = Phase::Initialized;
        debug!(
            header_digest = r.digests.header,
            data_digest = r.digests.data,
            "ICReq"
        );
        let resp = IcResp {
            pfv: 0,
            cpda: 0,
            digests: r.digests,
            maxh2cdata: self.shared.limits.max_h2c_data,
        };
        let b = self.encode(|b| encode_ic_resp(b, &resp));
        self.out.push_back(Out::one(b, false));
        Ok(())
    }

    fn on_capsule(
        &mut self,
        cmd: Command,
        data: Bytes,
        digest_error: bool,
    ) -> Result<(), PduError> {
        if self.outstanding >= self.depth {
            return Err(PduError::Sequence(format!(
                "a command beyond the queue's {} entries",
                self.depth
            )));
        }
        self.outstanding += 1;
        if self.sq_entries > 0 {
            self.sq_head = (self.sq_head + 1) % self.sq_entries;
        }
        self.touched = true;
        if digest_error {
            debug!(cid = cmd.cid, "data digest error in a command capsule");
            self.respond(Done::status(cmd.cid, Status::TRANSIENT_TRANSPORT_ERROR));
            return Ok(());
        }
        let op = match self.classify(&cmd) {
            Ok(Some(op)) => op,
            Ok(None) => return Ok(()),
            Err(s) => {
                self.respond(Done::status(cmd.cid, s));
                return Ok(());
            }
        };
        let need = match op {
            Op::Connect(_) => crate::codec::CONNECT_DATA_LEN as u32,
            Op::Io(io) => io.data_in(),
            Op::Admin(_) => 0,
        };
        match plan_data(&cmd, data, need) {
            Err(s) => self.respond(Done::status(cmd.cid, s)),
            Ok(Data::Ready(d)) => self.execute(&cmd, op, d),
            Ok(Data::Fetch(len)) => self.request_data(cmd, op, len),
        }
        Ok(())
    }

    /// Sort a command out: `Ok(None)` when it was answered here already.
    fn classify(&mut self, cmd: &Command) -> Result<Option<Op>, Status> {
        let ctx = match &self.phase {
            Phase::Connected(c) if !cmd.is_fabrics() => {
                if !c.ctrl.is_ready() {
                    return Err(Status::COMMAND_SEQUENCE_ERROR.dnr());
                }
                if c.qid == 0 {
                    return Ok(Some(Op::Admin(AdminCommand::parse(cmd))));
                }
                let ns = c.ns.as_ref().ok_or(Status::INVALID_OPCODE.dnr())?;
                return iocmd::prepare(ns, cmd, IoCommand::parse(cmd), &self.shared.limits)
                    .map(|op| Some(Op::Io(op)));
            }
            Phase::Connected(c) => c.clone(),
            _ => {
                return match (cmd.is_fabrics(), Fabrics::parse(cmd)) {
                    (true, Fabrics::Connect(c)) => Ok(Some(Op::Connect(c))),
                    _ => Err(Status::COMMAND_SEQUENCE_ERROR.dnr()),
                }
            }
        };
        // A fabrics command on a connected queue.
        let admin = ctx.qid == 0;
        let done = match Fabrics::parse(cmd) {
            Fabrics::Connect(_) => Done::status(cmd.cid, Status::COMMAND_SEQUENCE_ERROR.dnr()),
            Fabrics::PropertyGet { offset, eight } if admin => {
                match ctx.ctrl.property_get(offset, eight, self.cap()) {
                    Ok(v) => Done::result(cmd.cid, v),
                    Err(s) => Done::status(cmd.cid, s),
                }
            }
            Fabrics::PropertySet {
                offset,
                eight,
                value,
            } if admin => match ctx.ctrl.property_set(offset, eight, value, &self.shared) {
                Ok(()) => Done::ok(cmd.cid),
                Err(s) => Done::status(cmd.cid, s),
            },
            Fabrics::PropertyGet { .. } | Fabrics::PropertySet { .. } => {
                Done::status(cmd.cid, Status::INVALID_FIELD.dnr())
            }
            Fabrics::Disconnect { .. } => {
                debug!(qid = ctx.qid, "Disconnect");
                self.stop_reading();
                Done::ok(cmd.cid)
            }
            Fabrics::Other(_) => Done::status(cmd.cid, Status::INVALID_OPCODE.dnr()),
        };
        self.respond(done);
        Ok(None)
    }

    /// CAP: queue entries, the ready timeout (7.5 s), the NVM command set, 4 KiB pages.
    fn cap(&self) -> u64 {
        let mqes = u64::from(self.shared.limits.max_queue_entries - 1);
        mqes | 15 << 24 | 1 << 37
    }

    /// Ask for a write's data with an R2T.
    fn request_data(&mut self, cmd: Command, op: Op, len: u32) {
        let tag = match self.free_tags.pop() {
            Some(t) => t,
            None => {
                self.transfers.push(None);
                (self.transfers.len() - 1) as u16
            }
        };
        self.transfers[usize::from(tag)] = Some(Transfer {
            cmd,
            op,
            len,
            received: 0,
            chunks: Vec::new(),
            digest_error: false,
        });
        let r = R2t {
            cccid: cmd.cid,
            ttag: tag,
            r2to: 0,
            r2tl: len,
        };
        let dg = self.digests.unwrap_or_default();
        let b = self.encode(|b| encode_r2t(b, &r, dg));
        self.out.push_back(Out::one(b, false));
    }

    fn on_h2c_data(
        &mut self,
        d: DataHeader,
        flags: u8,
        data: Bytes,
        digest_error: bool,
    ) -> Result<(), PduError> {
        let slot = self
            .transfers
            .get_mut(usize::from(d.ttag))
            .and_then(Option::as_mut)
            .ok_or_else(|| PduError::InvalidField {
                offset: 10,
                why: format!("H2CData for transfer tag {}, which no R2T gave", d.ttag),
            })?;
        if slot.cmd.cid != d.cccid {
            return Err(PduError::InvalidField {
                offset: 8,
                why: format!(
                    "H2CData for command {} under the transfer tag of command {}",
                    d.cccid, slot.cmd.cid
                ),
            });
        }
        let end = u64::from(d.datao) + u64::from(d.datal);
        if d.datao != slot.received || end > u64::from(slot.len) {
            return Err(PduError::OutOfRange(format!(
                "H2CData of {} bytes at offset {} where bytes {}..{} were asked for",
                d.datal, d.datao, slot.received, slot.len
            )));
        }
        if end == u64::from(slot.len) && flags & pdu_flags::LAST_PDU == 0 {
            debug!(
                cid = d.cccid,
                "the last H2CData of a transfer lacks LAST_PDU"
            );
        }
        slot.received += d.datal;
        slot.digest_error |= digest_error;
        slot.chunks.push(data);
        if slot.received < slot.len {
            return Ok(());
        }
        let t = self.transfers[usize::from(d.ttag)]
            .take()
            .expect("the transfer was just found");
        self.free_tags.push(d.ttag);
        if t.digest_error {
            self.respond(Done::status(t.cmd.cid, Status::TRANSIENT_TRANSPORT_ERROR));
            return Ok(());
        }
        let data = if t.chunks.len() == 1 {
            t.chunks.into_iter().next().unwrap_or_default()
        } else {
            let mut all = BytesMut::with_capacity(t.len as usize);
            for c in &t.chunks {
                all.extend_from_slice(c);
            }
            all.freeze()
        };
        self.execute(&t.cmd, t.op, data);
        Ok(())
    }

    /// Run a command whose data is in.
    fn execute(&mut self, cmd: &Command, op: Op, data: Bytes) {
        match op {
            Op::Connect(c) => {
                let done = self.connect(cmd, c, &data);
                self.respond(done);
            }
            Op::Admin(a) => {
                let Some(ctx) = self.ctx().cloned() else {
                    return self.respond(Done::status(cmd.cid, Status::COMMAND_SEQUENCE_ERROR));
                };
                match admin::execute(&ctx, cmd, a) {
                    Exec::Now(d) => self.respond(d),
                    Exec::Later(f) => self.commands.push(f),
                }
            }
            Op::Io(io) => {
                let Some(f) = self
                    .ctx()
                    .and_then(|c| Some(iocmd::run(c.ns.clone()?, &c.ctrl, cmd.cid, io, data)))
                else {
                    return self.respond(Done::status(cmd.cid, Status::COMMAND_SEQUENCE_ERROR));
                };
                self.commands.push(f);
            }
        }
    }

    /// Connect: a new controller (admin queue) or an I/O queue of an existing one.
    fn connect(&mut self, cmd: &Command, c: Connect, data: &[u8]) -> Done {
        let cid = cmd.cid;
        let invalid = |in_data: bool, offset: u16| Done {
            result: u64::from(in_data) << 16 | u64::from(offset),
            ..Done::status(cid, Status::CONNECT_INVALID_PARAMETERS.dnr())
        };
        if c.recfmt != 0 {
            return Done {
                result: u64::from(connect_offset::RECFMT),
                ..Done::status(cid, Status::CONNECT_INCOMPATIBLE_FORMAT.dnr())
            };
        }
        let d = match ConnectData::decode(data) {
            Ok(d) => d,
            Err(e) => {
                debug!(error = %e, "Connect refused");
                return invalid(true, e.offset);
            }
        };
        let Some(subsys) = self.shared.subsystem(&d.subnqn) else {
            info!(subnqn = %d.subnqn, host = %d.hostnqn, "Connect to an unknown subsystem");
            return invalid(true, connect_offset::SUBNQN);
        };
        if !subsys.host_allowed(&d.hostnqn) {
            warn!(subnqn = %d.subnqn, host = %d.hostnqn, "Connect from a host not on the subsystem's allow list");
            return Done {
                result: 1 << 16 | u64::from(connect_offset::HOSTNQN),
                ..Done::status(cid, Status::CONNECT_INVALID_HOST.dnr())
            };
        }
        let limits = &self.shared.limits;
        let now = self.shared.now_ms();
        let (ctrl, ns) = if c.qid == 0 {
            if d.cntlid != 0xFFFF {
                return invalid(true, connect_offset::CNTLID);
            }
            if c.sqsize == 0 || u32::from(c.sqsize) >= ADMIN_QUEUE_ENTRIES {
                return invalid(false, connect_offset::SQSIZE);
            }
            let kato = if c.kato == 0 && subsys.is_discovery() {
                limits
                    .keep_alive_default
                    .as_millis()
                    .min(u128::from(u32::MAX)) as u32
            } else {
                c.kato
            };
            let made = subsys.controllers.create(|id| {
                Controller::new(
                    id,
                    subsys.clone(),
                    d.hostnqn.clone(),
                    d.hostid,
                    kato,
                    limits.max_io_queues,
                    now,
                )
            });
            let Some(ctrl) = made else {
                return Done::status(cid, Status::CONNECT_CONTROLLER_BUSY);
            };
            let _ = ctrl.add_queue(0, self.digests.unwrap_or_default());
            self.shared
                .tasks
                .spawn(ctrl.clone().watchdog(self.shared.clone()));
            info!(nqn = %subsys.nqn, cntlid = ctrl.cntlid, host = %d.hostnqn,
                hostid = %super::format_uuid(&ctrl.hostid), kato_ms = kato, "controller created");
            (ctrl, None)
        } else {
            if subsys.is_discovery() {
                return invalid(false, connect_offset::QID);
            }
            let Some(ctrl) = subsys.controllers.get(d.cntlid) else {
                return invalid(true, connect_offset::CNTLID);
            };
            if ctrl.hostnqn != d.hostnqn {
                return invalid(true, connect_offset::HOSTNQN);
            }
            if !ctrl.is_ready() {
                return Done::status(cid, Status::COMMAND_SEQUENCE_ERROR.dnr());
            }
            if c.sqsize == 0 || u32::from(c.sqsize) >= limits.max_queue_entries {
                return invalid(false, connect_offset::SQSIZE);
            }
            if let Err(s) = ctrl.add_queue(c.qid, self.digests.unwrap_or_default()) {
                return if s.code() == Status::CONNECT_INVALID_PARAMETERS {
                    invalid(false, connect_offset::QID)
                } else {
                    Done::status(cid, s)
                };
            }
            ctrl.touch(now);
            let ns = subsys.namespaces().into_iter().next();
            (ctrl, ns)
        };
        tracing::Span::current().record("volume", subsys.nqn.as_str());
        tracing::Span::current().record("qid", c.qid);
        self.ctrl_stop = Some(Box::pin(ctrl.stop.clone().cancelled_owned()));
        self.deadline = None;
        self.depth = usize::from(c.sqsize) + 1;
        self.sq_entries = u32::from(c.sqsize) + 1;
        self.sq_head = 1 % self.sq_entries;
        self.sqflow_disabled = c.cattr & cattr::DISABLE_SQFLOW != 0;
        let cntlid = ctrl.cntlid;
        self.phase = Phase::Connected(Arc::new(QueueCtx {
            shared: self.shared.clone(),
            ctrl,
            qid: c.qid,
            local: self.local,
            stop: CancellationToken::new(),
            ns,
        }));
        debug!(qid = c.qid, sqsize = c.sqsize, cntlid, "queue connected");
        Done::result(cid, u64::from(cntlid))
    }

    /// Queue the PDUs that answer a command.
    fn respond(&mut self, d: Done) {
        if !d.respond {
            self.outstanding = self.outstanding.saturating_sub(1);
            return;
        }
        let dg = self.digests.unwrap_or_default();
        let qid = self.ctx().map_or(0, |c| c.qid);
        // Without SQ flow control the head is not reported.
        let sqhd = if self.sqflow_disabled {
            0
        } else {
            self.sq_head as u16
        };
        let comp = Completion {
            result: d.result,
            sqhd,
            sqid: qid,
            cid: d.cid,
            status: d.status,
        };
        if !d.status.is_success() || d.data.is_empty() {
            let b = self.encode(|b| encode_capsule_resp(b, &comp, dg));
            self.out.push_back(Out::one(b, true));
            return;
        }
        // Data, then the response — or, without SQ flow control, the SUCCESS flag instead.
        let success = self.sqflow_disabled;
        let h = DataHeader {
            cccid: d.cid,
            ttag: 0,
            datao: 0,
            datal: d.data.len() as u32,
        };
        let flags = pdu_flags::LAST_PDU | if success { pdu_flags::SUCCESS } else { 0 };
        let align = self.align;
        let head = self.encode(|b| encode_data_header(b, pdu_type::C2H_DATA, flags, &h, dg, align));
        let ddgst = if dg.data {
            let dd = digest(&d.data);
            self.encode(|b| b.extend_from_slice(&dd))
        } else {
            Bytes::new()
        };
        let resp = if success {
            Bytes::new()
        } else {
            self.encode(|b| encode_capsule_resp(b, &comp, dg))
        };
        self.out.push_back(Out {
            parts: [head, d.data, ddgst, resp],
            completes: true,
        });
    }

    /// Write as much of the ready PDUs as the socket takes now.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut n = 0;
        let mut skip = self.written;
        'outer: for o in &self.out {
            for part in &o.parts {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                slices[n] = IoSlice::new(&part[skip..]);
                n += 1;
                skip = 0;
                if n == MAX_SLICES || !self.vectored {
                    break 'outer;
                }
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
                .expect("bytes were written from a queued PDU");
            let left = front.len() - self.written;
            if wrote < left {
                self.written += wrote;
                break;
            }
            wrote -= left;
            self.written = 0;
            let done = self.out.pop_front().expect("front exists");
            if done.completes {
                self.outstanding = self.outstanding.saturating_sub(1);
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Where a command's data is.
enum Data {
    /// In hand (possibly none).
    Ready(Bytes),
    /// To be asked for with an R2T: this many bytes.
    Fetch(u32),
}

/// Check a command's data pointer against its direction and the `need` bytes of data it
/// takes from the host.
fn plan_data(cmd: &Command, capsule: Bytes, need: u32) -> Result<Data, Status> {
    let sgl = cmd.dptr;
    match cmd.direction() {
        Direction::HostToController => {}
        Direction::Bidirectional => return Err(Status::INVALID_FIELD.dnr()),
        dir => {
            if !capsule.is_empty() {
                return Err(Status::INVALID_FIELD.dnr());
            }
            if dir == Direction::ControllerToHost && sgl.length > 0 && sgl.id != sgl_id::TRANSPORT {
                return Err(Status::SGL_TYPE_INVALID.dnr());
            }
            return Ok(Data::Ready(Bytes::new()));
        }
    }
    if need == 0 {
        if !capsule.is_empty() {
            return Err(Status::INVALID_FIELD.dnr());
        }
        return Ok(Data::Ready(Bytes::new()));
    }
    match sgl.id {
        sgl_id::IN_CAPSULE => {
            if sgl.address != 0 {
                return Err(Status::SGL_OFFSET_INVALID.dnr());
            }
            if sgl.length != need || capsule.len() != need as usize {
                return Err(Status::DATA_SGL_LENGTH_INVALID.dnr());
            }
            Ok(Data::Ready(capsule))
        }
        sgl_id::TRANSPORT => {
            if !capsule.is_empty() {
                return Err(Status::INVALID_FIELD.dnr());
            }
            if sgl.length != need {
                return Err(Status::DATA_SGL_LENGTH_INVALID.dnr());
            }
            Ok(Data::Fetch(need))
        }
        _ => Err(Status::SGL_TYPE_INVALID.dnr()),
    }
}
