//! The full feature phase of one logged-in connection: SCSI commands in flight under the CmdSN
//! window, R2T and Data-Out, Data-In straight into the caller's buffer, NOP keep-alive, task
//! aborts and logout.
//!
//! ```text
//!   callers ─register ITT─► tasks (one short lock) ◄─complete by ITT── reader task
//!      │                                                   │  R2T ─► Burst, NOP-In ─► answer
//!      └─Out (unbounded: bounded by queue depth) ─► writer task ◄──────┘
//!                                       assigns CmdSN within MaxCmdSN, batches PDUs
//!                                       into vectored writes
//! ```
//!
//! The outgoing queue has no bound of its own: every item comes from a command holding one of
//! `queue_depth` slots, from an R2T of such a command (at most MaxOutstandingR2T each), or
//! from the keep-alive, so its length is bounded by the queue depth. A reader that waited on a
//! full queue while the target waited on the reader could deadlock; this one never waits.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::codec::scsi::{self, Sense};
use crate::codec::{
    async_event, sn_le, sn_lt, tmf, DataOut, Digests, Header, LogoutRequest, NopOut, Reject,
    ScsiCommand, TaskMgmtRequest, RESERVED_TAG,
};
use crate::connection::{write_pdus, ConnError, Encoded, PduReader};
use crate::login::Negotiated;

/// PDUs gathered into one vectored write at most.
const WRITE_BATCH: usize = 256;

/// One SCSI command as the device layer hands it over.
#[derive(Debug, Clone)]
pub struct Command {
    pub lun: u64,
    pub cdb: [u8; 16],
    /// Data to the target (writes, UNMAP lists, WRITE SAME's block).
    pub data_out: Bytes,
    /// Bytes expected from the target.
    pub read_len: usize,
}

/// A command the target answered.
#[derive(Debug)]
pub struct Completion {
    pub status: u8,
    /// Sense data with CHECK CONDITION.
    pub sense: Option<Sense>,
    /// The raw sense bytes when they could not be decoded.
    pub raw_sense: Option<Bytes>,
    /// Data read (the bytes received, in order).
    pub data: Bytes,
}

/// A command that got no status.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The connection is gone (why); the command may be tried again on a new one.
    Lost(String),
    /// The target refused the command outright (a Reject PDU, or a response code).
    Refused(String),
}

type Reply = Result<Completion, Failure>;

enum Kind {
    Scsi {
        lun: u64,
        /// Data-In so far (it arrives in order), growing to `expected` bytes.
        read: BytesMut,
        expected: usize,
        write: Bytes,
    },
    /// A ping, a task management function or a logout: no data.
    Control,
}

struct Task {
    done: Option<oneshot::Sender<Reply>>,
    kind: Kind,
    /// The CmdSN the writer gave it.
    cmd_sn: Option<u32>,
}

#[derive(Default)]
struct Tasks {
    map: HashMap<u32, Task>,
    next_itt: u32,
}

/// What the writer sends.
enum Out {
    Command {
        itt: u32,
        header: ScsiCommand,
        immediate_data: Bytes,
        /// Unsolicited Data-Out after the command: its data and buffer offset.
        unsolicited: Bytes,
    },
    /// Data-Out answering an R2T.
    Burst {
        itt: u32,
        lun: u64,
        ttt: u32,
        offset: u32,
        data: Bytes,
    },
    Nop {
        itt: u32,
        ttt: u32,
    },
    Abort {
        itt: u32,
        lun: u64,
        referenced: u32,
    },
    Logout {
        itt: u32,
    },
}

/// Settings of a session that do not come from login.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// The device's name, for messages.
    pub name: Arc<str>,
    /// Commands in flight at most.
    pub queue_depth: usize,
    /// How long the connection may stay silent before a NOP-Out ping, and how long the ping
    /// may go unanswered before the connection is dropped.
    pub keepalive: Duration,
}

/// A logged-in connection in the full feature phase.
pub struct Session {
    name: Arc<str>,
    neg: Negotiated,
    tasks: Mutex<Tasks>,
    /// Highest CmdSN the target accepts now (the writer waits beyond it).
    max_cmd_sn: AtomicU32,
    window: Notify,
    exp_stat_sn: AtomicU32,
    out: mpsc::UnboundedSender<Out>,
    dead: CancellationToken,
    why: Mutex<Option<String>>,
    slots: Semaphore,
    /// Set by the reader on every PDU, cleared by the keep-alive.
    heard: AtomicBool,
    /// The target signalled a change of capacity (unit attention or async event).
    capacity_changed: AtomicBool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "iSCSI session to {}", self.name)
    }
}

impl Session {
    /// Start the full feature phase on a logged-in connection.
    pub fn start<R, W>(
        mut reader: PduReader<R>,
        writer: W,
        neg: Negotiated,
        settings: SessionSettings,
    ) -> Arc<Session>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        reader.digests = neg.digests;
        reader.max_data = neg.max_recv_data_segment;
        let (tx, rx) = mpsc::unbounded_channel();
        let session = Arc::new(Session {
            name: settings.name.clone(),
            neg,
            tasks: Mutex::new(Tasks {
                map: HashMap::new(),
                next_itt: 1,
            }),
            max_cmd_sn: AtomicU32::new(neg.max_cmd_sn),
            window: Notify::new(),
            exp_stat_sn: AtomicU32::new(neg.exp_stat_sn),
            out: tx,
            dead: CancellationToken::new(),
            why: Mutex::new(None),
            slots: Semaphore::new(settings.queue_depth.max(1)),
            heard: AtomicBool::new(true),
            capacity_changed: AtomicBool::new(false),
        });
        tokio::spawn(writer_task(session.clone(), writer, rx));
        tokio::spawn(reader_task(session.clone(), reader));
        tokio::spawn(keepalive_task(session.clone(), settings.keepalive));
        debug!(device = %session.name, ?neg, "iSCSI session in full feature phase");
        session
    }

    /// What login settled.
    pub fn negotiated(&self) -> &Negotiated {
        &self.neg
    }

    /// Whether the connection is still up.
    pub fn is_alive(&self) -> bool {
        !self.dead.is_cancelled()
    }

    /// Wait until the connection is gone.
    pub async fn dead(&self) {
        self.dead.cancelled().await
    }

    /// Why the connection is gone.
    pub fn why(&self) -> String {
        self.why
            .lock()
            .expect("lock poisoned")
            .clone()
            .unwrap_or_else(|| "the connection is closed".into())
    }

    /// Whether the target said its capacity changed since the last call.
    pub fn take_capacity_changed(&self) -> bool {
        self.capacity_changed.swap(false, Ordering::AcqRel)
    }

    /// Drop the connection: every task in flight fails with `why`.
    pub fn die(&self, why: impl Into<String>) {
        {
            let mut w = self.why.lock().expect("lock poisoned");
            if w.is_some() {
                return;
            }
            *w = Some(why.into());
        }
        self.dead.cancel();
        self.slots.close();
        let why = self.why();
        let tasks: Vec<Task> = {
            let mut t = self.tasks.lock().expect("lock poisoned");
            t.map.drain().map(|(_, task)| task).collect()
        };
        for t in tasks {
            if let Some(done) = t.done {
                let _ = done.send(Err(Failure::Lost(why.clone())));
            }
        }
    }

    fn lost(&self) -> Failure {
        Failure::Lost(self.why())
    }

    /// Register a task; returns its ITT and the receiver of its reply.
    fn register(&self, kind: Kind) -> Result<(u32, oneshot::Receiver<Reply>), Failure> {
        let (tx, rx) = oneshot::channel();
        let mut t = self.tasks.lock().expect("lock poisoned");
        if self.dead.is_cancelled() {
            return Err(self.lost());
        }
        let mut itt = t.next_itt;
        while itt == RESERVED_TAG || t.map.contains_key(&itt) {
            itt = itt.wrapping_add(1);
        }
        t.next_itt = itt.wrapping_add(1);
        t.map.insert(
            itt,
            Task {
                done: Some(tx),
                kind,
                cmd_sn: None,
            },
        );
        Ok((itt, rx))
    }

    fn send(&self, out: Out) -> Result<(), Failure> {
        self.out.send(out).map_err(|_| self.lost())
    }

    /// Run one SCSI command to its status. Dropping the future (a timeout) aborts the task.
    pub async fn execute(&self, cmd: &Command) -> Reply {
        let _slot = self.slots.acquire().await.map_err(|_| self.lost())?;
        let write = cmd.data_out.clone();
        let len = write.len();
        let (itt, rx) = self.register(Kind::Scsi {
            lun: cmd.lun,
            read: BytesMut::with_capacity(cmd.read_len),
            expected: cmd.read_len,
            write: write.clone(),
        })?;
        let mut pending = Pending {
            session: self,
            itt,
            lun: cmd.lun,
            armed: true,
        };
        let neg = &self.neg;
        // Unsolicited data: immediate data in the command PDU, then Data-Out up to the
        // first burst unless the target wants an R2T first.
        let (immediate, unsolicited) = if len == 0 {
            (0, 0)
        } else {
            let burst = (neg.first_burst as usize).min(len);
            let imm = if neg.immediate_data {
                burst.min(neg.max_xmit_data_segment as usize)
            } else {
                0
            };
            let more = if neg.initial_r2t { 0 } else { burst - imm };
            (imm, more)
        };
        let header = ScsiCommand {
            immediate: false,
            final_: unsolicited == 0,
            read: cmd.read_len > 0,
            write: len > 0,
            attr: crate::codec::attr::SIMPLE,
            lun: cmd.lun,
            itt,
            expected_len: if len > 0 { len } else { cmd.read_len } as u32,
            cmd_sn: 0,
            exp_stat_sn: 0,
            cdb: cmd.cdb,
        };
        self.send(Out::Command {
            itt,
            header,
            immediate_data: write.slice(..immediate),
            unsolicited: write.slice(immediate..immediate + unsolicited),
        })?;
        let reply = rx.await.unwrap_or_else(|_| Err(self.lost()));
        pending.armed = false;
        reply
    }

    /// Send a NOP-Out ping and wait for its NOP-In.
    pub async fn ping(&self) -> Result<(), Failure> {
        let (itt, rx) = self.register(Kind::Control)?;
        let _pending = Control { session: self, itt };
        self.send(Out::Nop {
            itt,
            ttt: RESERVED_TAG,
        })?;
        rx.await.unwrap_or_else(|_| Err(self.lost())).map(|_| ())
    }

    /// Log out (closing the session) and drop the connection, waiting at most `limit`.
    pub async fn logout(&self, limit: Duration) {
        if let Ok((itt, rx)) = self.register(Kind::Control) {
            if self.send(Out::Logout { itt }).is_ok() {
                let _ = tokio::time::timeout(limit, rx).await;
            }
        }
        self.die("logged out");
    }

    /// Take a task out of the map.
    fn take(&self, itt: u32) -> Option<Task> {
        self.tasks.lock().expect("lock poisoned").map.remove(&itt)
    }

    fn complete(&self, itt: u32, reply: Reply) {
        if let Some(t) = self.take(itt) {
            if let Some(done) = t.done {
                let _ = done.send(reply);
            }
        }
    }

    /// Fold the sequence numbers of a target PDU in.
    fn track(&self, header: &Header) {
        let Some((stat_sn, exp_cmd_sn, max_cmd_sn)) = header.sequence() else {
            return;
        };
        if header.carries_status() {
            let next = stat_sn.wrapping_add(1);
            let cur = self.exp_stat_sn.load(Ordering::Acquire);
            if sn_lt(cur, next) {
                self.exp_stat_sn.store(next, Ordering::Release);
            }
        }
        // MaxCmdSN below ExpCmdSN - 1 is invalid and ignored (RFC 7143 4.2.2.1).
        if sn_le(exp_cmd_sn.wrapping_sub(1), max_cmd_sn) {
            let cur = self.max_cmd_sn.load(Ordering::Acquire);
            if sn_lt(cur, max_cmd_sn) {
                self.max_cmd_sn.store(max_cmd_sn, Ordering::Release);
                self.window.notify_one();
            }
        }
    }
}

/// Takes back a SCSI task whose caller went away, and asks the target to abort it.
struct Pending<'a> {
    session: &'a Session,
    itt: u32,
    lun: u64,
    armed: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let s = self.session;
        if s.take(self.itt).is_some() && s.is_alive() {
            // The abort's own answer is consumed by the reader and dropped.
            if let Ok((itt, _rx)) = s.register(Kind::Control) {
                let _ = s.send(Out::Abort {
                    itt,
                    lun: self.lun,
                    referenced: self.itt,
                });
            }
        }
    }
}

/// Takes back a control task whose caller went away.
struct Control<'a> {
    session: &'a Session,
    itt: u32,
}

impl Drop for Control<'_> {
    fn drop(&mut self) {
        self.session.take(self.itt);
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(
    s: Arc<Session>,
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
) {
    let why = tokio::select! {
        r = write_loop(&s, &mut w, &mut rx) => r,
        _ = s.dead.cancelled() => Ok(()),
    };
    if let Err(e) = why {
        s.die(format!("write to the target: {e}"));
    }
    // Tell the target we are gone (a FIN rather than nothing), briefly.
    let _ = tokio::time::timeout(Duration::from_secs(1), w.shutdown()).await;
}

async fn write_loop<W: AsyncWrite + Unpin>(
    s: &Session,
    w: &mut W,
    rx: &mut mpsc::UnboundedReceiver<Out>,
) -> std::io::Result<()> {
    let digests = s.neg.digests;
    let max_seg = (s.neg.max_xmit_data_segment as usize).max(512);
    let mut cmd_sn = s.neg.cmd_sn;
    // Commands waiting for the CmdSN window to open, in order.
    let mut blocked: VecDeque<Out> = VecDeque::new();
    let mut batch: Vec<Encoded> = Vec::new();
    let mut sent: Vec<(u32, u32)> = Vec::new();
    loop {
        let first = if blocked.is_empty() {
            match rx.recv().await {
                Some(o) => Some(o),
                None => return Ok(()),
            }
        } else {
            let window = s.window.notified();
            tokio::select! {
                o = rx.recv() => match o {
                    Some(o) => Some(o),
                    None => return Ok(()),
                },
                _ = window => None,
            }
        };
        let mut items: Vec<Out> = Vec::new();
        items.extend(first);
        while items.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(o) => items.push(o),
                Err(_) => break,
            }
        }
        let exp_stat_sn = s.exp_stat_sn.load(Ordering::Acquire);
        // Blocked commands go first, in order, as far as the window allows.
        let mut queue: Vec<Out> = Vec::with_capacity(blocked.len() + items.len());
        queue.extend(blocked.drain(..));
        queue.extend(items);
        for item in queue {
            match item {
                Out::Command {
                    itt,
                    mut header,
                    immediate_data,
                    unsolicited,
                } => {
                    let max = s.max_cmd_sn.load(Ordering::Acquire);
                    if !blocked.is_empty() || !sn_le(cmd_sn, max) {
                        blocked.push_back(Out::Command {
                            itt,
                            header,
                            immediate_data,
                            unsolicited,
                        });
                        continue;
                    }
                    header.cmd_sn = cmd_sn;
                    header.exp_stat_sn = exp_stat_sn;
                    sent.push((itt, cmd_sn));
                    cmd_sn = cmd_sn.wrapping_add(1);
                    let offset = immediate_data.len() as u32;
                    let lun = header.lun;
                    batch.push(Encoded::new(
                        &Header::ScsiCommand(header),
                        immediate_data,
                        digests,
                    ));
                    data_out(
                        &mut batch,
                        DataOut {
                            final_: false,
                            lun,
                            itt,
                            ttt: RESERVED_TAG,
                            exp_stat_sn,
                            data_sn: 0,
                            buffer_offset: offset,
                        },
                        unsolicited,
                        max_seg,
                        digests,
                    );
                }
                Out::Burst {
                    itt,
                    lun,
                    ttt,
                    offset,
                    data,
                } => data_out(
                    &mut batch,
                    DataOut {
                        final_: false,
                        lun,
                        itt,
                        ttt,
                        exp_stat_sn,
                        data_sn: 0,
                        buffer_offset: offset,
                    },
                    data,
                    max_seg,
                    digests,
                ),
                Out::Nop { itt, ttt } => batch.push(Encoded::new(
                    &Header::NopOut(NopOut {
                        immediate: true,
                        lun: 0,
                        itt,
                        ttt,
                        cmd_sn,
                        exp_stat_sn,
                    }),
                    Bytes::new(),
                    digests,
                )),
                Out::Abort {
                    itt,
                    lun,
                    referenced,
                } => {
                    let ref_cmd_sn = s
                        .tasks
                        .lock()
                        .expect("lock poisoned")
                        .map
                        .get(&referenced)
                        .and_then(|t| t.cmd_sn)
                        .unwrap_or(cmd_sn);
                    batch.push(Encoded::new(
                        &Header::TaskMgmtRequest(TaskMgmtRequest {
                            immediate: true,
                            function: tmf::ABORT_TASK,
                            lun,
                            itt,
                            referenced_tag: referenced,
                            cmd_sn,
                            exp_stat_sn,
                            ref_cmd_sn,
                            exp_data_sn: 0,
                        }),
                        Bytes::new(),
                        digests,
                    ))
                }
                Out::Logout { itt } => batch.push(Encoded::new(
                    &Header::LogoutRequest(LogoutRequest {
                        immediate: true,
                        reason: 0,
                        itt,
                        cid: 0,
                        cmd_sn,
                        exp_stat_sn,
                    }),
                    Bytes::new(),
                    digests,
                )),
            }
        }
        if !sent.is_empty() {
            let mut t = s.tasks.lock().expect("lock poisoned");
            for (itt, sn) in sent.drain(..) {
                if let Some(task) = t.map.get_mut(&itt) {
                    task.cmd_sn = Some(sn);
                }
            }
        }
        if !batch.is_empty() {
            write_pdus(w, &batch).await?;
            batch.clear();
        }
    }
}

/// Data-Out PDUs carrying `data` from `first.buffer_offset`, at most `max_seg` bytes each,
/// the last with the F bit.
fn data_out(batch: &mut Vec<Encoded>, first: DataOut, data: Bytes, max_seg: usize, d: Digests) {
    let mut at = 0;
    let mut sn = 0;
    while at < data.len() {
        let n = (data.len() - at).min(max_seg);
        let h = DataOut {
            final_: at + n == data.len(),
            data_sn: sn,
            buffer_offset: first.buffer_offset + at as u32,
            ..first
        };
        batch.push(Encoded::new(&Header::DataOut(h), data.slice(at..at + n), d));
        at += n;
        sn += 1;
    }
}

async fn reader_task<R: AsyncRead + Unpin>(s: Arc<Session>, mut r: PduReader<R>) {
    let result = tokio::select! {
        r = read_loop(&s, &mut r) => r,
        _ = s.dead.cancelled() => return,
    };
    let why = match result {
        Ok(why) => why,
        Err(ConnError::Closed) => "the target closed the connection".to_string(),
        Err(e) => format!("read from the target: {e}"),
    };
    s.die(why);
}

fn violation(what: impl Into<String>) -> ConnError {
    ConnError::Protocol(what.into())
}

/// Read PDUs until the connection fails or the target ends it; returns why it ended.
async fn read_loop<R: AsyncRead + Unpin>(
    s: &Session,
    r: &mut PduReader<R>,
) -> Result<String, ConnError> {
    loop {
        let head = r.read_head().await?;
        s.heard.store(true, Ordering::Release);
        s.track(&head.header);
        let len = head.lengths.data;
        match head.header {
            Header::DataIn(h) => {
                // Take the destination out of the task so no lock is held while reading.
                let taken = {
                    let mut t = s.tasks.lock().expect("lock poisoned");
                    match t.map.get_mut(&h.itt).map(|t| &mut t.kind) {
                        Some(Kind::Scsi { read, expected, .. }) => {
                            if h.buffer_offset as usize != read.len() {
                                return Err(violation(format!(
                                    "Data-In at offset {} for task {:#x}, expected {}",
                                    h.buffer_offset,
                                    h.itt,
                                    read.len()
                                )));
                            }
                            if read.len() + len > *expected {
                                return Err(violation(format!(
                                    "Data-In of {len} bytes at offset {} for task {:#x} goes \
                                     past its {expected} bytes",
                                    h.buffer_offset, h.itt
                                )));
                            }
                            Some(std::mem::take(read))
                        }
                        Some(Kind::Control) => {
                            return Err(violation(format!(
                                "Data-In for task {:#x}, which reads nothing",
                                h.itt
                            )))
                        }
                        None => None,
                    }
                };
                match taken {
                    Some(mut buf) => {
                        r.read_data_append(&mut buf, len).await?;
                        let mut t = s.tasks.lock().expect("lock poisoned");
                        if let Some(Task {
                            kind: Kind::Scsi { read, .. },
                            ..
                        }) = t.map.get_mut(&h.itt)
                        {
                            *read = buf;
                        }
                    }
                    // A task that timed out: its data goes nowhere.
                    None => r.skip_data(len).await?,
                }
                if h.has_status {
                    if !h.final_ {
                        return Err(violation("Data-In with status but without the F bit"));
                    }
                    finish_scsi(s, h.itt, h.status, Bytes::new());
                }
            }
            Header::ScsiResponse(h) => {
                let data = r.read_data(len).await?;
                if h.response != 0 {
                    s.complete(
                        h.itt,
                        Err(Failure::Refused(format!(
                            "the target failed the command (iSCSI response {:#04x})",
                            h.response
                        ))),
                    );
                } else {
                    finish_scsi(s, h.itt, h.status, data);
                }
            }
            Header::R2t(h) => {
                r.skip_data(len).await?;
                let found = {
                    let t = s.tasks.lock().expect("lock poisoned");
                    match t.map.get(&h.itt).map(|t| &t.kind) {
                        Some(Kind::Scsi { write, lun, .. }) => Some((write.clone(), *lun)),
                        Some(Kind::Control) => {
                            return Err(violation(format!(
                                "R2T for task {:#x}, which writes nothing",
                                h.itt
                            )))
                        }
                        None => None,
                    }
                };
                if let Some((write, lun)) = found {
                    let (at, n) = (h.buffer_offset as usize, h.desired_len as usize);
                    if n == 0 || at.checked_add(n).is_none_or(|end| end > write.len()) {
                        return Err(violation(format!(
                            "R2T for {n} bytes at offset {at} of a {}-byte write",
                            write.len()
                        )));
                    }
                    let _ = s.out.send(Out::Burst {
                        itt: h.itt,
                        lun,
                        ttt: h.ttt,
                        offset: h.buffer_offset,
                        data: write.slice(at..at + n),
                    });
                }
            }
            Header::NopIn(h) => {
                r.skip_data(len).await?;
                if h.ttt != RESERVED_TAG {
                    // The target pings; answer it.
                    let _ = s.out.send(Out::Nop {
                        itt: RESERVED_TAG,
                        ttt: h.ttt,
                    });
                }
                if h.itt != RESERVED_TAG {
                    s.complete(h.itt, Ok(empty_completion()));
                }
            }
            Header::TaskMgmtResponse(h) => {
                r.skip_data(len).await?;
                if h.response > 1 {
                    debug!(device = %s.name, response = h.response, "the target refused a task abort");
                }
                s.complete(h.itt, Ok(empty_completion()));
            }
            Header::LogoutResponse(h) => {
                r.skip_data(len).await?;
                s.complete(h.itt, Ok(empty_completion()));
                return Ok("logged out".into());
            }
            Header::AsyncMessage(h) => {
                let data = r.read_data(len).await?;
                match h.event {
                    async_event::SCSI => {
                        let sense =
                            scsi::sense_of_response(&data).and_then(|b| Sense::decode(b).ok());
                        if let Some(sense) = sense {
                            if (sense.asc, sense.ascq) == (0x2a, 0x09) {
                                s.capacity_changed.store(true, Ordering::Release);
                            }
                            debug!(device = %s.name, %sense, "asynchronous event from the target");
                        }
                    }
                    async_event::LOGOUT_REQUESTED => {
                        return Ok("the target asked for a logout".into());
                    }
                    async_event::DROP_CONNECTION | async_event::DROP_SESSION => {
                        return Ok(format!(
                            "the target is dropping the connection (will accept a new one in {} s)",
                            h.param2
                        ));
                    }
                    async_event::NEGOTIATE => {
                        return Ok("the target asked for renegotiation".into());
                    }
                    other => {
                        debug!(device = %s.name, event = other, "ignored asynchronous event");
                    }
                }
            }
            Header::Reject(h) => {
                let data = r.read_data(len).await?;
                let itt = data
                    .get(16..20)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(RESERVED_TAG);
                let why = format!(
                    "the target rejected the PDU: {} (reason {:#04x})",
                    Reject::reason_name(h.reason),
                    h.reason
                );
                warn!(device = %s.name, "{why}");
                if itt != RESERVED_TAG && s.has_task(itt) {
                    s.complete(itt, Err(Failure::Refused(why)));
                } else if matches!(h.reason, 0x04 | 0x09 | 0x0b) {
                    // A broken exchange that is no single task's: start over.
                    return Ok(why);
                }
            }
            other => {
                return Err(violation(format!(
                    "unexpected {} in the full feature phase",
                    other.name()
                )))
            }
        }
    }
}

impl Session {
    fn has_task(&self, itt: u32) -> bool {
        self.tasks
            .lock()
            .expect("lock poisoned")
            .map
            .contains_key(&itt)
    }
}

fn empty_completion() -> Completion {
    Completion {
        status: scsi::status::GOOD,
        sense: None,
        raw_sense: None,
        data: Bytes::new(),
    }
}

/// Complete a SCSI task with its status and the response's data segment (sense data).
fn finish_scsi(s: &Session, itt: u32, status: u8, response: Bytes) {
    let Some(task) = s.take(itt) else {
        return;
    };
    let data = match task.kind {
        Kind::Scsi { read, .. } => read.freeze(),
        Kind::Control => Bytes::new(),
    };
    let raw = scsi::sense_of_response(&response).map(Bytes::copy_from_slice);
    let sense = raw.as_ref().and_then(|b| Sense::decode(b).ok());
    if let Some(sense) = &sense {
        if sense.key == scsi::sense_key::UNIT_ATTENTION && (sense.asc, sense.ascq) == (0x2a, 0x09) {
            s.capacity_changed.store(true, Ordering::Release);
        }
    }
    if let Some(done) = task.done {
        let _ = done.send(Ok(Completion {
            status,
            sense,
            raw_sense: raw,
            data,
        }));
    }
}

/// Ping the target whenever it has been silent for a while; drop the connection when a ping
/// goes unanswered.
async fn keepalive_task(s: Arc<Session>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = s.dead.cancelled() => return,
        }
        if s.heard.swap(false, Ordering::AcqRel) {
            continue;
        }
        let answered = tokio::select! {
            r = tokio::time::timeout(every, s.ping()) => r,
            _ = s.dead.cancelled() => return,
        };
        match answered {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                s.die(format!(
                    "the target did not answer a NOP-Out ping within {every:?}"
                ));
                return;
            }
        }
    }
}
