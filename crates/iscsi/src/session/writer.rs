//! The task that writes a session's PDUs: commands in CmdSN order as the target's window
//! admits them, their Data-Out, pings, aborts and the logout, batched into few writes.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{Out, Session, WRITE_BATCH};
use crate::codec::{
    sn_le, tmf, DataOut, Digests, Header, LogoutRequest, NopOut, ScsiCommand, TaskMgmtRequest,
    RESERVED_TAG,
};
use crate::connection::{write_pdus, Encoded};

pub(super) async fn writer_task<W: AsyncWrite + Unpin>(
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
    let mut wr = Writer {
        digests: s.neg.digests,
        max_seg: (s.neg.max_xmit_data_segment as usize).max(512),
        cmd_sn: s.neg.cmd_sn,
        blocked: VecDeque::new(),
        batch: Vec::new(),
        sent: Vec::new(),
    };
    loop {
        let first = if wr.blocked.is_empty() {
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
        let mut queue: Vec<Out> = Vec::with_capacity(wr.blocked.len() + items.len());
        queue.extend(wr.blocked.drain(..));
        queue.extend(items);
        for item in queue {
            wr.encode(s, item, exp_stat_sn);
        }
        if !wr.sent.is_empty() {
            let mut t = s.tasks.lock().expect("lock poisoned");
            for (itt, sn) in wr.sent.drain(..) {
                if let Some(task) = t.map.get_mut(&itt) {
                    task.cmd_sn = Some(sn);
                }
            }
        }
        if !wr.batch.is_empty() {
            write_pdus(w, &wr.batch).await?;
            wr.batch.clear();
        }
    }
}

/// What the writer keeps from one batch of PDUs to the next.
struct Writer {
    digests: Digests,
    /// Data bytes in one PDU at most.
    max_seg: usize,
    /// The CmdSN of the next command.
    cmd_sn: u32,
    /// Commands waiting for the CmdSN window to open, in order.
    blocked: VecDeque<Out>,
    /// PDUs encoded for the next write.
    batch: Vec<Encoded>,
    /// Commands in the batch, with their CmdSN.
    sent: Vec<(u32, u32)>,
}

impl Writer {
    /// Encode `item` into the batch (a command the window does not admit yet waits).
    fn encode(&mut self, s: &Session, item: Out, exp_stat_sn: u32) {
        match item {
            Out::Command {
                itt,
                header,
                immediate_data,
                unsolicited,
            } => self.command(s, itt, header, immediate_data, unsolicited, exp_stat_sn),
            Out::Burst {
                itt,
                lun,
                ttt,
                offset,
                data,
            } => data_out(
                &mut self.batch,
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
                self.max_seg,
                self.digests,
            ),
            Out::Nop { itt, ttt } => self.batch.push(Encoded::new(
                &Header::NopOut(NopOut {
                    immediate: true,
                    lun: 0,
                    itt,
                    ttt,
                    cmd_sn: self.cmd_sn,
                    exp_stat_sn,
                }),
                Bytes::new(),
                self.digests,
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
                    .unwrap_or(self.cmd_sn);
                self.batch.push(Encoded::new(
                    &Header::TaskMgmtRequest(TaskMgmtRequest {
                        immediate: true,
                        function: tmf::ABORT_TASK,
                        lun,
                        itt,
                        referenced_tag: referenced,
                        cmd_sn: self.cmd_sn,
                        exp_stat_sn,
                        ref_cmd_sn,
                        exp_data_sn: 0,
                    }),
                    Bytes::new(),
                    self.digests,
                ))
            }
            Out::Logout { itt } => self.batch.push(Encoded::new(
                &Header::LogoutRequest(LogoutRequest {
                    immediate: true,
                    reason: 0,
                    itt,
                    cid: 0,
                    cmd_sn: self.cmd_sn,
                    exp_stat_sn,
                }),
                Bytes::new(),
                self.digests,
            )),
        }
    }

    /// A SCSI command and its unsolicited Data-Out, if the CmdSN window admits it.
    fn command(
        &mut self,
        s: &Session,
        itt: u32,
        mut header: ScsiCommand,
        immediate_data: Bytes,
        unsolicited: Bytes,
        exp_stat_sn: u32,
    ) {
        let max = s.max_cmd_sn.load(Ordering::Acquire);
        if !self.blocked.is_empty() || !sn_le(self.cmd_sn, max) {
            self.blocked.push_back(Out::Command {
                itt,
                header,
                immediate_data,
                unsolicited,
            });
            return;
        }
        header.cmd_sn = self.cmd_sn;
        header.exp_stat_sn = exp_stat_sn;
        self.sent.push((itt, self.cmd_sn));
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        let offset = immediate_data.len() as u32;
        let lun = header.lun;
        self.batch.push(Encoded::new(
            &Header::ScsiCommand(header),
            immediate_data,
            self.digests,
        ));
        data_out(
            &mut self.batch,
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
            self.max_seg,
            self.digests,
        );
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
