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
//! Backpressure: every request counts against the connection's request limit and charges a byte
//! budget when it is parsed (READ and WRITE their length, BLOCK_STATUS its largest reply, any
//! other a small fixed amount), and releases both when its reply is written; while either is
//! spent the loop reads nothing more, so a client that outruns its device (or stops reading
//! replies) waits in its socket buffer, and what a connection holds is bounded.
//!
//! Device calls that may take long on the CPU (block status, large trims and zeroes: a page
//! store walks its pages) run off the runtime's workers, one at a time per connection and a few
//! at a time per server (`requests`), so one client's expensive requests do not stall others.
//!
//! The connection publishes what it holds (requests and bytes in flight, whether its reading is
//! paused) to the server's counters, and whether it is idle to its slot.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use strata_bdev::wire::{self, Frame, Outbox};
use strata_bdev::Transaction;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::debug;

use crate::codec::{self, cmd, errno};
use crate::server::export::Export;
use crate::server::slots::Activity;

mod requests;

use requests::{encode, run, run_txn, Failure};
pub(crate) use requests::{Heavy, BASE_ALLOCATION_ID, HEAVY_PARALLEL};

/// The least free space offered to each socket read.
const READ_CHUNK: usize = 256 << 10;
/// Loop rounds before the task yields to others even if it could go on.
const MAX_ROUNDS: usize = 64;
/// What a request without a payload charges to the byte budget: its share of what the
/// connection holds for it (the request, its future, its reply).
const REQUEST_COST: usize = 1024;

/// What every request of a connection needs to know.
pub(crate) struct Ctx {
    pub export: Arc<Export>,
    pub structured: bool,
    /// `base:allocation` was negotiated for this export.
    pub block_status: bool,
    pub block_size: u64,
    pub max_payload: u32,
    /// Where CPU-heavy device calls run.
    pub heavy: Heavy,
}

/// What one connection may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// Bytes in flight (see the module's notes on what each request charges).
    pub bytes: usize,
    /// Requests in flight, of any kind.
    pub requests: usize,
}

/// What every connection of a server adds to, for its statistics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub requests: AtomicUsize,
    pub bytes: AtomicUsize,
    /// Connections not read because their budget is spent.
    pub paused: AtomicUsize,
}

/// How a connection is told to stop, and where it reports what it holds.
pub(crate) struct Control {
    /// Stop reading, answer what is in flight, then close.
    pub stop: CancellationToken,
    /// Give up on a client that does not read its replies: drop them, finish the device calls
    /// in flight, and close.
    pub abandon: CancellationToken,
    pub activity: Arc<Activity>,
    pub counters: Arc<Counters>,
}

/// An encoded reply and the in-flight budget it releases once written.
struct Reply {
    /// The header, then the data (possibly none).
    parts: [Bytes; 2],
    charge: usize,
    /// For a request run in order (a transaction's): whether a transaction is open after it.
    serial: Option<bool>,
}

impl Frame for Reply {
    fn parts(&self) -> &[Bytes] {
        &self.parts
    }
}

type RequestFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// Serve requests on `stream` until the client disconnects, sends `NBD_CMD_DISC`, breaks the
/// framing, or `control.stop` fires; in every case but a broken socket or `control.abandon`,
/// each request already read is answered first.
pub(crate) async fn serve<S>(
    stream: S,
    ctx: Arc<Ctx>,
    budget: Budget,
    control: Control,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = Conn {
        out: Outbox::new(stream.is_write_vectored()),
        stream,
        ctx,
        budget: Budget {
            bytes: budget.bytes.max(1),
            requests: budget.requests.max(1),
        },
        in_flight: 0,
        requests_in_flight: 0,
        inbuf: BytesMut::with_capacity(READ_CHUNK),
        discard: 0,
        requests: FuturesUnordered::new(),
        reading: true,
        shutdown: Box::pin(control.stop.cancelled_owned()),
        abandon: Box::pin(control.abandon.cancelled_owned()),
        gave_up: false,
        dropped: 0,
        txn: Arc::new(tokio::sync::Mutex::new(None)),
        in_txn: false,
        serial_busy: false,
        parked: false,
        published: Published::default(),
        activity: control.activity,
        counters: control.counters,
    };
    let result = std::future::poll_fn(|cx| conn.poll(cx)).await;
    conn.unpublish();
    match result {
        Ok(()) if conn.gave_up => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the client read none of its replies in time: {} dropped, the device calls \
                 behind them finished",
                conn.dropped
            ),
        )),
        Ok(()) => wire::shutdown(&mut conn.stream).await,
        Err(e) => Err(e),
    }
}

/// What a connection last added to the server's counters and told its slot.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Published {
    requests: usize,
    bytes: usize,
    paused: bool,
    busy: bool,
}

struct Conn<S> {
    stream: S,
    ctx: Arc<Ctx>,
    budget: Budget,
    /// Bytes charged by requests whose replies are not yet written.
    in_flight: usize,
    /// Requests read whose replies are not yet written.
    requests_in_flight: usize,
    inbuf: BytesMut,
    /// Bytes of a refused oversized write's payload still to skip.
    discard: usize,
    requests: FuturesUnordered<RequestFuture>,
    /// Replies ready to be written.
    out: Outbox<Reply>,
    reading: bool,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    abandon: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The client does not read its replies: they are dropped.
    gave_up: bool,
    /// Replies dropped since.
    dropped: usize,
    /// The open transaction, if any (dropped, i.e. rolled back, with the connection).
    txn: TxnSlot,
    /// A transaction may be open: requests run one at a time, in order.
    in_txn: bool,
    /// A request that runs in order is in flight.
    serial_busy: bool,
    /// The next request must wait for those in flight: stop reading until one completes.
    parked: bool,
    published: Published,
    activity: Arc<Activity>,
    counters: Arc<Counters>,
}

type TxnSlot = Arc<tokio::sync::Mutex<Option<Box<dyn Transaction>>>>;

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = self.poll_rounds(cx);
        self.publish();
        r
    }

    fn poll_rounds(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        for _ in 0..MAX_ROUNDS {
            let mut progress = false;
            if self.reading && self.shutdown.as_mut().poll(cx).is_ready() {
                debug!("told to stop: answering requests in flight, then closing");
                self.reading = false;
            }
            if !self.gave_up && self.abandon.as_mut().poll(cx).is_ready() {
                self.give_up();
                progress = true;
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
                if self.gave_up {
                    self.drop_reply(&reply);
                } else {
                    self.out.push(reply);
                }
                progress = true;
            }
            // Write what is ready, as one batch; each reply written gives back its charge.
            let (mut freed, mut replies) = (0, 0);
            progress |= self.out.poll_send(&mut self.stream, cx, |done| {
                freed += done.charge;
                replies += 1;
            })?;
            self.in_flight -= freed;
            self.requests_in_flight -= replies;
            // Read only for the next request: what the buffer holds is at most one read beyond
            // what the budget lets the connection take.
            if self.reading && self.has_budget() && !self.parked && self.wants_input() {
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
            if !self.reading && self.requests.is_empty() && self.out.is_idle() {
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
        self.in_flight < self.budget.bytes && self.requests_in_flight < self.budget.requests
    }

    /// Stop writing to a client that does not read: drop every reply queued or still to come
    /// (the device calls in flight still finish), read nothing more.
    fn give_up(&mut self) {
        debug!(
            queued = self.out.len(),
            running = self.requests.len(),
            "the client does not read its replies: dropping them"
        );
        self.reading = false;
        self.gave_up = true;
        for r in self.out.take_all() {
            self.drop_reply(&r);
        }
    }

    /// A reply that will never be written gives back what its request charged.
    fn drop_reply(&mut self, r: &Reply) {
        self.dropped += 1;
        self.release(r.charge);
    }

    fn release(&mut self, charge: usize) {
        self.in_flight -= charge;
        self.requests_in_flight -= 1;
    }

    /// Tell the server's counters and the connection's slot what changed since last time.
    fn publish(&mut self) {
        let now = Published {
            requests: self.requests_in_flight,
            bytes: self.in_flight,
            paused: self.reading && !self.has_budget(),
            busy: self.requests_in_flight > 0 || !self.out.is_empty(),
        };
        let was = self.published;
        if now == was {
            return;
        }
        let c = &self.counters;
        adjust(&c.requests, was.requests, now.requests);
        adjust(&c.bytes, was.bytes, now.bytes);
        adjust(&c.paused, usize::from(was.paused), usize::from(now.paused));
        if now.busy != was.busy {
            self.activity.set_busy(now.busy);
        }
        self.published = now;
    }

    /// Take back from the server's counters everything this connection added.
    fn unpublish(&mut self) {
        let c = &self.counters;
        let was = self.published;
        adjust(&c.requests, was.requests, 0);
        adjust(&c.bytes, was.bytes, 0);
        adjust(&c.paused, usize::from(was.paused), 0);
        self.published = Published::default();
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
        wire::poll_read_buf(&mut self.stream, cx, &mut self.inbuf, limit, READ_CHUNK)
    }

    /// Whether the read buffer lacks (part of) the next request, so that reading is the way on.
    fn wants_input(&self) -> bool {
        if self.discard > 0 {
            return self.inbuf.is_empty();
        }
        self.inbuf.len() < codec::REQUEST_LEN || self.payload_remaining() > 0
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
                self.requests_in_flight += 1;
                self.in_flight += REQUEST_COST;
                self.out.push(encode(&self.ctx, &req, Err(f), REQUEST_COST));
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
            cmd::READ | cmd::WRITE => (req.length as usize).max(REQUEST_COST),
            cmd::BLOCK_STATUS => requests::MAX_STATUS_REPLY,
            _ => REQUEST_COST,
        }
        .min(self.budget.bytes);
        self.in_flight += charge;
        self.requests_in_flight += 1;
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
}

fn adjust(counter: &AtomicUsize, was: usize, now: usize) {
    if now > was {
        counter.fetch_add(now - was, Ordering::Relaxed);
    } else if was > now {
        counter.fetch_sub(was - now, Ordering::Relaxed);
    }
}
