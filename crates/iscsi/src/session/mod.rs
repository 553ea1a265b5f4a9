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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::codec::scsi::Sense;
use crate::codec::{sn_le, sn_lt, Header, ScsiCommand, RESERVED_TAG};
use crate::connection::PduReader;
use crate::login::Negotiated;

/// PDUs gathered into one vectored write at most.
mod reader;
mod writer;

use reader::reader_task;
use writer::writer_task;

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
