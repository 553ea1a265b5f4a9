//! One queue of the host: a TCP connection with a writer task and a reader task.
//!
//! ```text
//!   callers ──CID (bounded by the queue size)──► in-flight table ◄── reader task
//!      │                                         (one short lock)      ▲  responses, C2HData
//!      └── capsules ──► writer task ◄── H2CData for R2Ts ──────────────┤  (read straight into
//!                       batched vectored writes ──► socket ────────────┘   the caller's buffer)
//! ```
//!
//! Every command takes a command ID from a table sized by the queue size the host asked for in
//! Connect, so no more commands are outstanding than the controller accepts. Small writes carry
//! their data in the capsule; larger ones wait for the controller's R2T, and the reader answers
//! it with H2CData PDUs of at most MAXH2CDATA bytes. Read data lands directly in the buffer of
//! the command, without a copy for large transfers.
//!
//! The queues of one association share a [`Link`]: when any of them fails (a socket error, a
//! protocol violation, a keep-alive or command timeout), every queue stops and every command
//! in flight fails with [`Failed::Lost`], which callers retry on the next association.

use std::io::IoSlice;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::codec::pdu::{
    encode_capsule_cmd, encode_data_header, encode_ic_req, encode_term_req, CMD_HLEN, DIGEST_LEN,
    MIN_MAXH2CDATA,
};
use crate::codec::{
    decode_header, digest, pdu_flags, pdu_type, Command, Completion, DataHeader, Digests, IcReq,
    Limits, PduError, PduHeader, R2t, Role, Sgl, Status,
};

/// The reader's buffer grows by this much at a time.
const READ_BUF: usize = 64 << 10;
/// Payload still to come beyond this size is read from the socket straight into its buffer.
const DIRECT_READ_MIN: usize = 16 << 10;
/// PDUs gathered into one vectored write at most.
const WRITE_BATCH: usize = 64;

/// The association's shared fate: cancelled when any of its queues fails.
#[derive(Debug, Default)]
pub(crate) struct Link {
    pub dead: CancellationToken,
    why: Mutex<Option<Arc<str>>>,
}

impl Link {
    /// End the association (the first reason given is kept).
    pub fn fail(&self, why: &str) -> Arc<str> {
        let why = self
            .why
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| why.into())
            .clone();
        self.dead.cancel();
        why
    }

    /// Why the association ended ("" while it has not).
    pub fn why(&self) -> Arc<str> {
        self.why
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "the connection was closed".into())
    }

    pub fn is_dead(&self) -> bool {
        self.dead.is_cancelled()
    }
}

/// Why a command failed.
#[derive(Debug, Clone)]
pub(crate) enum Failed {
    /// The controller answered with an error status.
    Status(Status),
    /// The association is gone (the command may or may not have run): retry on the next one.
    Lost(Arc<str>),
    /// The answer did not fit the command (the association is ended).
    Protocol(String),
}

/// A completed command: its completion entry and, for commands returning data, the data.
#[derive(Debug)]
pub(crate) struct Response {
    pub completion: Completion,
    pub data: BytesMut,
}

/// What a command carries, each way.
#[derive(Debug)]
pub(crate) enum Payload {
    None,
    /// Data to the controller: in the capsule if small enough, otherwise on R2T.
    ToController(Bytes),
    /// Data from the controller lands in this buffer (length 0, capacity = bytes expected).
    FromController(BytesMut),
}

struct InFlight {
    tx: oneshot::Sender<Result<Response, Failed>>,
    /// Write data the controller asks for with R2T.
    out: Option<Bytes>,
    /// The read buffer; taken out while the reader fills it.
    buf: Option<BytesMut>,
    /// Bytes of data expected from the controller.
    expect: usize,
    _permit: OwnedSemaphorePermit,
}

#[derive(Default)]
struct Table {
    slots: Vec<Option<InFlight>>,
    free: Vec<u16>,
}

impl Table {
    fn take(&mut self, cid: u16) -> Option<InFlight> {
        let e = self.slots.get_mut(usize::from(cid))?.take()?;
        self.free.push(cid);
        Some(e)
    }

    fn get(&mut self, cid: u16) -> Option<&mut InFlight> {
        self.slots.get_mut(usize::from(cid))?.as_mut()
    }
}

/// A PDU on its way to the writer.
struct Outgoing {
    head: [u8; CMD_HLEN + DIGEST_LEN],
    head_len: u8,
    data: Bytes,
    ddgst: Option<[u8; 4]>,
    /// A termination request: the last thing written before the link fails with `last`.
    last: Option<Arc<str>>,
}

/// What the tasks and callers of one queue share.
struct Shared {
    qid: u16,
    name: Arc<str>,
    table: Mutex<Table>,
    permits: Arc<Semaphore>,
    link: Arc<Link>,
    tx: mpsc::UnboundedSender<Outgoing>,
    digests: Digests,
    maxh2cdata: u32,
    /// Data this large or smaller goes in the capsule.
    in_capsule: usize,
}

impl Shared {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fail every command in flight: the association is gone.
    fn drain(&self) {
        let why = self.link.why();
        let drained: Vec<InFlight> = {
            let mut t = self.table();
            let all = t.slots.iter_mut().filter_map(Option::take).collect();
            let n = t.slots.len() as u16;
            t.free = (0..n).rev().collect();
            all
        };
        for e in drained {
            let _ = e.tx.send(Err(Failed::Lost(why.clone())));
        }
    }
}

/// How to open a queue.
pub(crate) struct QueueParams {
    /// `host:port`.
    pub addr: String,
    /// The device, for messages.
    pub name: Arc<str>,
    pub qid: u16,
    /// Commands outstanding at most (the queue size asked for in Connect).
    pub depth: u16,
    pub digests: Digests,
    /// Data up to this size goes in the command capsule.
    pub in_capsule: usize,
    /// The most data one C2HData PDU may carry.
    pub max_read: u32,
    pub link: Arc<Link>,
}

/// One queue.
pub(crate) struct Queue {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} queue {}", self.shared.name, self.shared.qid)
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.shared.link.fail("the device was closed");
    }
}

impl Queue {
    /// Open a TCP connection to `addr` and exchange ICReq/ICResp. Commands (Connect first) can
    /// be submitted right after.
    pub async fn open(p: QueueParams) -> std::io::Result<Queue> {
        let QueueParams {
            addr,
            name,
            qid,
            depth,
            digests,
            in_capsule,
            max_read,
            link,
        } = p;
        let mut s = TcpStream::connect(addr.as_str()).await?;
        s.set_nodelay(true)?;
        let mut b = BytesMut::new();
        encode_ic_req(
            &mut b,
            &IcReq {
                pfv: 0,
                hpda: 0,
                digests,
                maxr2t: 0,
            },
        );
        s.write_all(&b).await?;
        let mut resp = [0u8; crate::codec::pdu::IC_LEN];
        s.read_exact(&mut resp).await?;
        let limits = Limits {
            in_capsule: 0,
            data_pdu: 0,
        };
        let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
        let r = match decode_header(&resp, Role::Host, None, limits) {
            Ok(Some((PduHeader::IcResp(r), _))) => r,
            Ok(_) => return Err(bad("the controller did not answer ICReq with ICResp".into())),
            Err(e) => return Err(bad(format!("ICResp: {e}"))),
        };
        if r.pfv != 0 {
            return Err(bad(format!("ICResp: PDU format version {}", r.pfv)));
        }
        if r.digests != digests {
            return Err(bad(format!(
                "ICResp: the controller answered digests {:?} to a request for {digests:?}",
                r.digests
            )));
        }
        if r.cpda != 0 {
            return Err(bad(format!(
                "ICResp: controller PDU data alignment {} is not supported",
                r.cpda
            )));
        }
        if r.maxh2cdata < MIN_MAXH2CDATA || r.maxh2cdata % 4 != 0 {
            return Err(bad(format!(
                "ICResp: MAXH2CDATA {} is invalid",
                r.maxh2cdata
            )));
        }
        let (rd, wr) = s.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            qid,
            name,
            table: Mutex::new(Table {
                slots: (0..depth).map(|_| None).collect(),
                free: (0..depth).rev().collect(),
            }),
            permits: Arc::new(Semaphore::new(usize::from(depth))),
            link,
            tx,
            digests,
            maxh2cdata: r.maxh2cdata,
            in_capsule,
        });
        tokio::spawn(writer(shared.clone(), wr, rx));
        tokio::spawn(reader(shared.clone(), rd, max_read));
        Ok(Queue { shared })
    }

    /// Submit `cmd` (its CID is chosen here) and wait for the answer.
    pub async fn submit(&self, mut cmd: Command, payload: Payload) -> Result<Response, Failed> {
        let sh = &self.shared;
        let lost = || Failed::Lost(sh.link.why());
        let permit = tokio::select! {
            p = sh.permits.clone().acquire_owned() => p.map_err(|_| lost())?,
            _ = sh.link.dead.cancelled() => return Err(lost()),
        };
        let (tx, rx) = oneshot::channel();
        let (out, buf, expect, capsule) = match payload {
            Payload::None => (None, None, 0, Bytes::new()),
            Payload::ToController(d) => {
                let len = d.len() as u32;
                if d.len() <= sh.in_capsule {
                    cmd.dptr = Sgl::in_capsule(len);
                    (None, None, 0, d)
                } else {
                    cmd.dptr = Sgl::transport(len);
                    (Some(d), None, 0, Bytes::new())
                }
            }
            Payload::FromController(b) => {
                let n = b.capacity();
                cmd.dptr = Sgl::transport(n as u32);
                (None, Some(b), n, Bytes::new())
            }
        };
        {
            let mut t = sh.table();
            // Checked under the lock: a queue that failed has drained its table, and nothing
            // may be left in it after that.
            if sh.link.is_dead() {
                return Err(lost());
            }
            let cid = t.free.pop().ok_or_else(|| {
                Failed::Protocol("no free command ID under a queue permit".into())
            })?;
            cmd.cid = cid;
            t.slots[usize::from(cid)] = Some(InFlight {
                tx,
                out,
                buf,
                expect,
                _permit: permit,
            });
        }
        let mut o = Outgoing {
            head: [0; CMD_HLEN + DIGEST_LEN],
            head_len: 0,
            ddgst: (sh.digests.data && !capsule.is_empty()).then(|| digest(&capsule)),
            data: capsule,
            last: None,
        };
        let mut w = &mut o.head[..];
        encode_capsule_cmd(&mut w, &cmd, o.data.len(), sh.digests);
        o.head_len = (CMD_HLEN + DIGEST_LEN - w.len()) as u8;
        sh.tx.send(o).map_err(|_| lost())?;
        // If this future is dropped (a caller's timeout), the entry stays until the
        // controller answers: the command ID is in use at the controller until then.
        rx.await.unwrap_or_else(|_| Err(lost()))
    }
}

async fn writer(
    sh: Arc<Shared>,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let result: std::io::Result<Option<Arc<str>>> = async {
        loop {
            let n = tokio::select! {
                n = rx.recv_many(&mut batch, WRITE_BATCH) => n,
                _ = sh.link.dead.cancelled() => return Ok(None),
            };
            if n == 0 {
                return Ok(None);
            }
            let last = batch.iter().position(|o| o.last.is_some());
            if let Some(i) = last {
                batch.truncate(i + 1);
            }
            let mut slices = [IoSlice::new(&[]); 3 * WRITE_BATCH];
            let mut n = 0;
            for o in &batch {
                slices[n] = IoSlice::new(&o.head[..usize::from(o.head_len)]);
                n += 1;
                if !o.data.is_empty() {
                    slices[n] = IoSlice::new(&o.data);
                    n += 1;
                }
                if let Some(d) = &o.ddgst {
                    slices[n] = IoSlice::new(d);
                    n += 1;
                }
            }
            let mut s = &mut slices[..n];
            while !s.is_empty() {
                let n = tokio::select! {
                    n = w.write_vectored(s) => n?,
                    _ = sh.link.dead.cancelled() => return Ok(None),
                };
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                IoSlice::advance_slices(&mut s, n);
            }
            let why = last.and_then(|i| batch[i].last.clone());
            batch.clear();
            if why.is_some() {
                return Ok(why);
            }
        }
    }
    .await;
    match result {
        Ok(Some(why)) => {
            sh.link.fail(&why);
        }
        Ok(None) => {}
        Err(e) => {
            let why = sh.link.fail(&format!("write to the controller: {e}"));
            debug!(queue = sh.qid, reason = %why, "NVMe/TCP queue failed");
        }
    }
    let _ = w.shutdown().await;
}

/// Why the reader stopped.
enum Stop {
    Io(std::io::Error),
    /// The controller broke the protocol: terminate with an H2CTermReq.
    Violation(PduError, Vec<u8>),
    /// The controller terminated the connection.
    Terminated(String),
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Stop {
        Stop::Io(e)
    }
}

async fn reader(sh: Arc<Shared>, r: tokio::net::tcp::OwnedReadHalf, max_read: u32) {
    let mut rd = Reader {
        r,
        buf: BytesMut::with_capacity(READ_BUF),
    };
    let stop = tokio::select! {
        s = read_pdus(&sh, &mut rd, max_read) => Some(s),
        _ = sh.link.dead.cancelled() => None,
    };
    match stop {
        None => {}
        Some(Stop::Io(e)) => {
            let why = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the controller closed the connection".to_string()
            } else {
                format!("read from the controller: {e}")
            };
            let why = sh.link.fail(&why);
            debug!(queue = sh.qid, reason = %why, "NVMe/TCP queue failed");
        }
        Some(Stop::Terminated(why)) => {
            warn!(device = %sh.name, queue = sh.qid, reason = %why, "the controller terminated the connection");
            sh.link.fail(&why);
        }
        Some(Stop::Violation(e, header)) => {
            let why: Arc<str> = format!("protocol violation by the controller: {e}").into();
            warn!(device = %sh.name, queue = sh.qid, reason = %why, "terminating the connection");
            let mut b = BytesMut::new();
            encode_term_req(&mut b, Role::Host, e.fes(), e.fei(), &header);
            let mut o = Outgoing {
                head: [0; CMD_HLEN + DIGEST_LEN],
                head_len: b.len().min(CMD_HLEN + DIGEST_LEN) as u8,
                data: Bytes::new(),
                ddgst: None,
                last: Some(why.clone()),
            };
            let n = usize::from(o.head_len);
            o.head[..n].copy_from_slice(&b[..n]);
            if n < b.len() {
                o.data = Bytes::copy_from_slice(&b[n..]);
            }
            if sh.tx.send(o).is_err() {
                sh.link.fail(&why);
            }
            // The writer fails the link once the termination request is out; bound the wait.
            let _ = tokio::time::timeout(Duration::from_secs(5), sh.link.dead.cancelled()).await;
            sh.link.fail(&why);
        }
    }
    sh.drain();
}

struct Reader<R> {
    r: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// Make the buffer hold at least `n` bytes.
    async fn fill(&mut self, n: usize) -> std::io::Result<()> {
        while self.buf.len() < n {
            if self.buf.capacity() - self.buf.len() < READ_BUF / 2 {
                self.buf.reserve(READ_BUF.max(n - self.buf.len()));
            }
            if self.r.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Append `n` bytes of the stream to `dest`: what is buffered, then (for large rests)
    /// straight from the socket.
    async fn read_into(&mut self, dest: &mut BytesMut, mut n: usize) -> std::io::Result<()> {
        let have = n.min(self.buf.len());
        dest.extend_from_slice(&self.buf[..have]);
        self.buf.advance(have);
        n -= have;
        if n >= DIRECT_READ_MIN {
            dest.reserve(n);
            let mut take = (&mut self.r).take(n as u64);
            while n > 0 {
                let got = take.read_buf(dest).await?;
                if got == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                n -= got;
            }
        } else if n > 0 {
            self.fill(n).await?;
            dest.extend_from_slice(&self.buf[..n]);
            self.buf.advance(n);
        }
        Ok(())
    }
}

fn violation(offset: u32, why: String) -> PduError {
    PduError::InvalidField { offset, why }
}

async fn read_pdus<R: AsyncRead + Unpin>(sh: &Shared, rd: &mut Reader<R>, max_read: u32) -> Stop {
    match read_loop(sh, rd, max_read).await {
        Ok(never) => match never {},
        Err(s) => s,
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    sh: &Shared,
    rd: &mut Reader<R>,
    max_read: u32,
) -> Result<std::convert::Infallible, Stop> {
    let limits = Limits {
        in_capsule: 0,
        data_pdu: max_read,
    };
    loop {
        rd.fill(8).await?;
        let (header, layout) = loop {
            match decode_header(&rd.buf, Role::Host, Some(sh.digests), limits) {
                Ok(Some(x)) => break x,
                Ok(None) => {
                    let more = rd.buf.len() + 1;
                    rd.fill(more).await?;
                }
                Err(e) => {
                    let n = rd.buf.len().min(24);
                    return Err(Stop::Violation(e, rd.buf[..n].to_vec()));
                }
            }
        };
        // The header, for a termination request should this PDU turn out to break the rules.
        let mut head_buf = [0u8; 32];
        let head_len = layout.header_len.min(32).min(rd.buf.len());
        head_buf[..head_len].copy_from_slice(&rd.buf[..head_len]);
        let head = || head_buf[..head_len].to_vec();
        let flags = rd.buf[1];
        match header {
            PduHeader::CapsuleResp(c) => {
                rd.buf.advance(layout.total);
                let Some(e) = sh.table().take(c.cid) else {
                    return Err(Stop::Violation(
                        violation(
                            8 + 12,
                            format!("a response to command {}, which is not in flight", c.cid),
                        ),
                        head(),
                    ));
                };
                let data = e.buf.unwrap_or_default();
                if c.status.is_success() && data.len() != e.expect {
                    let why = format!(
                        "command {} succeeded with {} of its {} data bytes",
                        c.cid,
                        data.len(),
                        e.expect
                    );
                    let _ = e.tx.send(Err(Failed::Protocol(why.clone())));
                    return Err(Stop::Violation(violation(8 + 12, why), head()));
                }
                let _ = e.tx.send(Ok(Response {
                    completion: c,
                    data,
                }));
            }
            PduHeader::C2HData(d) => {
                rd.fill(layout.data_offset).await?;
                rd.buf.advance(layout.data_offset);
                let (mut buf, expect) = {
                    let mut t = sh.table();
                    let Some(e) = t.get(d.cccid) else {
                        return Err(Stop::Violation(
                            violation(
                                8,
                                format!("C2HData for command {}, which is not in flight", d.cccid),
                            ),
                            head(),
                        ));
                    };
                    match e.buf.take() {
                        Some(b) => (b, e.expect),
                        None => {
                            return Err(Stop::Violation(
                                violation(
                                    8,
                                    format!("C2HData for command {}, which reads no data", d.cccid),
                                ),
                                head(),
                            ))
                        }
                    }
                };
                let start = buf.len();
                if d.datao as usize != start || start + d.datal as usize > expect {
                    return Err(Stop::Violation(
                        PduError::OutOfRange(format!(
                            "C2HData of {} bytes at offset {} for command {} expecting {} bytes, {} received",
                            d.datal, d.datao, d.cccid, expect, start
                        )),
                        head(),
                    ));
                }
                rd.read_into(&mut buf, d.datal as usize).await?;
                let mut digest_ok = true;
                if layout.data_digest {
                    rd.fill(DIGEST_LEN).await?;
                    digest_ok = digest(&buf[start..])[..] == rd.buf[..DIGEST_LEN];
                    rd.buf.advance(DIGEST_LEN);
                }
                let done = flags & pdu_flags::SUCCESS != 0;
                let mut t = sh.table();
                if !digest_ok {
                    // The data is bad: the command fails, and the association with it (data
                    // integrity on this connection is in doubt).
                    if let Some(e) = t.take(d.cccid) {
                        let _ =
                            e.tx.send(Err(Failed::Status(Status::TRANSIENT_TRANSPORT_ERROR)));
                    }
                    drop(t);
                    return Err(Stop::Terminated(format!(
                        "data digest mismatch in C2HData for command {}",
                        d.cccid
                    )));
                }
                if done {
                    if flags & pdu_flags::LAST_PDU == 0 || buf.len() != expect {
                        drop(t);
                        return Err(Stop::Violation(
                            violation(
                                1,
                                "C2HData SUCCESS before all data, or without LAST_PDU".into(),
                            ),
                            head(),
                        ));
                    }
                    if let Some(e) = t.take(d.cccid) {
                        let _ = e.tx.send(Ok(Response {
                            completion: Completion {
                                cid: d.cccid,
                                sqid: sh.qid,
                                ..Completion::default()
                            },
                            data: buf,
                        }));
                    }
                } else if let Some(e) = t.get(d.cccid) {
                    e.buf = Some(buf);
                }
            }
            PduHeader::R2t(r) => {
                rd.buf.advance(layout.total);
                send_data(sh, &r).map_err(|e| Stop::Violation(e, head()))?;
            }
            PduHeader::C2HTermReq { fes, fei } => {
                rd.fill(layout.total).await?;
                let data = rd.buf[layout.header_len.min(layout.total)..layout.total].to_vec();
                rd.buf.advance(layout.total);
                return Err(Stop::Terminated(format!(
                    "C2HTermReq: fatal error status {fes:#x}, information {fei:#x}, PDU header {data:02x?}"
                )));
            }
            other => {
                return Err(Stop::Violation(
                    violation(0, format!("{other:?} is not a PDU a host receives here")),
                    head(),
                ))
            }
        }
    }
}

/// Answer an R2T with H2CData PDUs of at most MAXH2CDATA bytes each.
fn send_data(sh: &Shared, r: &R2t) -> Result<(), PduError> {
    let data = {
        let mut t = sh.table();
        let e = t.get(r.cccid).ok_or_else(|| {
            violation(
                8,
                format!("R2T for command {}, which is not in flight", r.cccid),
            )
        })?;
        e.out.clone().ok_or_else(|| {
            violation(
                8,
                format!("R2T for command {}, which has no data to send", r.cccid),
            )
        })?
    };
    let (start, len) = (r.r2to as usize, r.r2tl as usize);
    if len == 0 || start.checked_add(len).is_none_or(|end| end > data.len()) {
        return Err(PduError::OutOfRange(format!(
            "R2T for bytes {start}..{} of command {}'s {} bytes",
            start.saturating_add(len),
            r.cccid,
            data.len()
        )));
    }
    let mut off = start;
    let end = start + len;
    while off < end {
        let n = (end - off).min(sh.maxh2cdata as usize);
        let chunk = data.slice(off..off + n);
        let h = DataHeader {
            cccid: r.cccid,
            ttag: r.ttag,
            datao: off as u32,
            datal: n as u32,
        };
        let flags = if off + n == end {
            pdu_flags::LAST_PDU
        } else {
            0
        };
        let mut o = Outgoing {
            head: [0; CMD_HLEN + DIGEST_LEN],
            head_len: 0,
            ddgst: sh.digests.data.then(|| digest(&chunk)),
            data: chunk,
            last: None,
        };
        let mut w = &mut o.head[..];
        encode_data_header(&mut w, pdu_type::H2C_DATA, flags, &h, sh.digests, 0);
        o.head_len = (CMD_HLEN + DIGEST_LEN - w.len()) as u8;
        if sh.tx.send(o).is_err() {
            break;
        }
        off += n;
    }
    Ok(())
}
