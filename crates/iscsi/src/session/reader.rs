//! The task that reads a session's PDUs: data and status for the tasks in flight, R2Ts, pings
//! and the target's asynchronous events.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use strata_bdev::field::be32;
use tokio::io::AsyncRead;
use tracing::{debug, warn};

use super::{Completion, Failure, Kind, Out, Session, Task};
use crate::codec::scsi::{self, Sense};
use crate::codec::{async_event, AsyncMessage, DataIn, Header, R2t, Reject, RESERVED_TAG};
use crate::connection::{ConnError, PduReader};

pub(super) async fn reader_task<R: AsyncRead + Unpin>(s: Arc<Session>, mut r: PduReader<R>) {
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
            Header::DataIn(h) => on_data_in(s, r, h, len).await?,
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
                on_r2t(s, h)?;
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
                if let Some(why) = on_async_event(s, &h, &data) {
                    return Ok(why);
                }
            }
            Header::Reject(h) => {
                let data = r.read_data(len).await?;
                let itt = data.get(16..20).map(|b| be32(b, 0)).unwrap_or(RESERVED_TAG);
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

/// Data-In: append its data to the task's buffer, and finish the task on a status.
async fn on_data_in<R: AsyncRead + Unpin>(
    s: &Session,
    r: &mut PduReader<R>,
    h: DataIn,
    len: usize,
) -> Result<(), ConnError> {
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
    Ok(())
}

/// R2T: send the Data-Out burst the target asks for.
fn on_r2t(s: &Session, h: R2t) -> Result<(), ConnError> {
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
    Ok(())
}

/// An asynchronous message; `Some(why)` when it ends the connection.
fn on_async_event(s: &Session, h: &AsyncMessage, data: &[u8]) -> Option<String> {
    match h.event {
        async_event::SCSI => {
            let sense = scsi::sense_of_response(data).and_then(|b| Sense::decode(b).ok());
            if let Some(sense) = sense {
                if (sense.asc, sense.ascq) == (0x2a, 0x09) {
                    s.capacity_changed.store(true, Ordering::Release);
                }
                debug!(device = %s.name, %sense, "asynchronous event from the target");
            }
        }
        async_event::LOGOUT_REQUESTED => {
            return Some("the target asked for a logout".into());
        }
        async_event::DROP_CONNECTION | async_event::DROP_SESSION => {
            return Some(format!(
                "the target is dropping the connection (will accept a new one in {} s)",
                h.param2
            ));
        }
        async_event::NEGOTIATE => {
            return Some("the target asked for renegotiation".into());
        }
        other => {
            debug!(device = %s.name, event = other, "ignored asynchronous event");
        }
    }
    None
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
