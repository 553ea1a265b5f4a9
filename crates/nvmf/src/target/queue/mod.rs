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
//!
//! Here: the poll loop and the replies. [`read`]: the PDU reader (framing, digests, ICReq).
//! [`dispatch`]: a command checked, classified and started, Connect among them.
//! [`transfer`]: R2T and the H2CData PDUs that answer it.

mod dispatch;
mod read;
mod transfer;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use strata_bdev::wire::{self, Frame, Outbox};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, warn};

use super::controller::Controller;
use super::io::IoOp;
use super::{Namespace, Shared, ADMIN_QUEUE_ENTRIES};
use crate::codec::pdu::{encode_capsule_resp, encode_data_header, encode_term_req};
use crate::codec::{
    digest, pdu_flags, pdu_type, AdminCommand, Command, Completion, Connect, DataHeader, Digests,
    PduError, Role, Status,
};

/// The least free space offered to each socket read.
const READ_CHUNK: usize = 256 << 10;
/// A PDU at least this much larger than what is buffered is read exactly to its end, so its
/// data can be split off without copying what follows.
const EXACT_READ_MIN: usize = 64 << 10;
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
}

impl Frame for Out {
    fn parts(&self) -> &[Bytes] {
        &self.parts
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
        out: Outbox::new(stream.is_write_vectored()),
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
        Ok(()) if !q.aborted => wire::shutdown(&mut q.stream).await,
        other => other,
    }
}

struct Queue<S> {
    stream: S,
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
    /// PDUs ready to be written.
    out: Outbox<Out>,
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
            let mut answered = 0;
            progress |= self.out.poll_send(&mut self.stream, cx, |done| {
                answered += usize::from(done.completes);
            })?;
            self.outstanding = self.outstanding.saturating_sub(answered);
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
            if !self.reading && self.commands.is_empty() && self.out.is_idle() {
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
        self.out.push(Out::one(b.freeze(), false));
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

    fn encode(&mut self, f: impl FnOnce(&mut BytesMut)) -> Bytes {
        self.arena.reserve(256);
        f(&mut self.arena);
        self.arena.split().freeze()
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
            self.out.push(Out::one(b, true));
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
        self.out.push(Out {
            parts: [head, d.data, ddgst, resp],
            completes: true,
        });
    }
}
