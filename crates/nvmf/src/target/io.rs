//! NVM I/O commands: Read, Write, Flush, Write Zeroes and Dataset Management, checked against
//! the namespace before the device is touched, then run against it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use strata_bdev::{Error as DevError, ErrorKind, WriteOpts, ZeroOpts};
use tracing::debug;

use super::queue::{CmdFuture, Done};
use super::{Controller, Limits, Namespace};
use crate::codec::{Command, DsmRange, IoCommand, Status, DSM_RANGE_LEN};

/// The broadcast namespace ID (Flush applies to every namespace).
const NSID_ALL: u32 = 0xFFFF_FFFF;

/// A checked I/O command, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoOp {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Zeroes {
        offset: u64,
        len: u64,
        fua: bool,
        deallocate: bool,
    },
    /// Dataset Management: `len` bytes of ranges arrive as data.
    Dsm {
        len: u32,
        ranges: u32,
        deallocate: bool,
    },
}

impl IoOp {
    /// Bytes of data the host sends for this command.
    pub fn data_in(&self) -> u32 {
        match *self {
            IoOp::Write { len, .. } | IoOp::Dsm { len, .. } => len,
            _ => 0,
        }
    }
}

/// Check an I/O command against the namespace; the error is the status to answer with.
pub(crate) fn prepare(
    ns: &Namespace,
    cmd: &Command,
    io: IoCommand,
    limits: &Limits,
) -> Result<IoOp, Status> {
    if cmd.fuse() != 0 {
        return Err(Status::INVALID_FIELD.dnr());
    }
    let nsid_ok = cmd.nsid == ns.nsid || (cmd.nsid == NSID_ALL && io == IoCommand::Flush);
    if !nsid_ok {
        return Err(Status::INVALID_NAMESPACE.dnr());
    }
    let shift = ns.lba_shift;
    let in_range = |slba: u64, nlb: u32| {
        slba.checked_add(u64::from(nlb))
            .is_some_and(|end| end <= ns.blocks())
    };
    let writable = || {
        if ns.is_read_only() {
            Err(Status::NAMESPACE_WRITE_PROTECTED.dnr())
        } else {
            Ok(())
        }
    };
    match io {
        IoCommand::Read(r) | IoCommand::Write(r) => {
            let write = matches!(io, IoCommand::Write(_));
            if write {
                writable()?;
            }
            let len = u64::from(r.nlb) << shift;
            if len > u64::from(limits.max_data_transfer) {
                return Err(Status::INVALID_FIELD.dnr());
            }
            if !in_range(r.slba, r.nlb) {
                return Err(Status::LBA_OUT_OF_RANGE.dnr());
            }
            if u64::from(cmd.dptr.length) != len {
                return Err(Status::DATA_SGL_LENGTH_INVALID.dnr());
            }
            let offset = r.slba << shift;
            let len = len as u32;
            Ok(if write {
                IoOp::Write {
                    offset,
                    len,
                    fua: r.fua,
                }
            } else {
                IoOp::Read { offset, len }
            })
        }
        IoCommand::Flush => Ok(IoOp::Flush),
        IoCommand::WriteZeroes { range, deac } => {
            writable()?;
            if !in_range(range.slba, range.nlb) {
                return Err(Status::LBA_OUT_OF_RANGE.dnr());
            }
            Ok(IoOp::Zeroes {
                offset: range.slba << shift,
                len: u64::from(range.nlb) << shift,
                fua: range.fua,
                deallocate: deac,
            })
        }
        IoCommand::DatasetManagement { ranges, deallocate } => {
            if deallocate {
                writable()?;
            }
            let need = ranges * DSM_RANGE_LEN as u32;
            let len = cmd.dptr.length;
            if len < need || len > 4096 {
                return Err(Status::DATA_SGL_LENGTH_INVALID.dnr());
            }
            Ok(IoOp::Dsm {
                len,
                ranges,
                deallocate,
            })
        }
        // Reservations (and their fencing) come in here when they are implemented.
        IoCommand::Fabrics(_) | IoCommand::Other(_) => Err(Status::INVALID_OPCODE.dnr()),
    }
}

/// The status a device error is answered with.
pub(crate) fn status_of(e: &DevError, write: bool) -> Status {
    match e.kind() {
        ErrorKind::OutOfRange => Status::LBA_OUT_OF_RANGE.dnr(),
        ErrorKind::NoSpace => Status::CAPACITY_EXCEEDED.dnr(),
        ErrorKind::InvalidInput | ErrorKind::NotFound | ErrorKind::AlreadyExists => {
            Status::INVALID_FIELD.dnr()
        }
        ErrorKind::PermissionDenied if write => Status::NAMESPACE_WRITE_PROTECTED.dnr(),
        ErrorKind::PermissionDenied => Status::ACCESS_DENIED.dnr(),
        ErrorKind::Unsupported => Status::INVALID_OPCODE.dnr(),
        ErrorKind::TooLarge => Status::DATA_SGL_LENGTH_INVALID.dnr(),
        ErrorKind::Conflict => Status::RESERVATION_CONFLICT.dnr(),
        // Worth a retry: the device may answer next time.
        ErrorKind::TimedOut => Status::INTERNAL_ERROR,
        ErrorKind::Shutdown => Status::ABORTED_SQ_DELETION,
        _ if write => Status::WRITE_FAULT.dnr(),
        _ => Status::UNRECOVERED_READ_ERROR.dnr(),
    }
}

/// Run a checked command (`data`: what the host sent for it).
pub(crate) fn run(
    ns: Arc<Namespace>,
    ctrl: &Controller,
    cid: u16,
    op: IoOp,
    data: Bytes,
) -> CmdFuture {
    let write_through = ctrl.write_through();
    Box::pin(async move {
        let dev = &ns.device;
        let fail = |e: DevError, write: bool| {
            debug!(cid, op = ?op, error = %e.chain(), "I/O command failed");
            Done::status(cid, status_of(&e, write))
        };
        match op {
            IoOp::Read { offset, len } => match dev.read_at(offset, len as usize).await {
                Ok(d) => {
                    ns.stats.reads.fetch_add(1, Ordering::Relaxed);
                    ns.stats
                        .bytes_read
                        .fetch_add(u64::from(len), Ordering::Relaxed);
                    Done::data(cid, d)
                }
                Err(e) => fail(e, false),
            },
            IoOp::Write { offset, len, fua } => {
                let opts = WriteOpts {
                    fua: fua || write_through,
                };
                match dev.write_at(offset, data, opts).await {
                    Ok(()) => {
                        ns.stats.writes.fetch_add(1, Ordering::Relaxed);
                        ns.stats
                            .bytes_written
                            .fetch_add(u64::from(len), Ordering::Relaxed);
                        Done::ok(cid)
                    }
                    Err(e) => fail(e, true),
                }
            }
            IoOp::Flush => {
                if !dev.capabilities().flush {
                    return Done::ok(cid);
                }
                match dev.flush().await {
                    Ok(()) => Done::ok(cid),
                    Err(e) => fail(e, true),
                }
            }
            IoOp::Zeroes {
                offset,
                len,
                fua,
                deallocate,
            } => {
                let opts = ZeroOpts {
                    fua: fua || write_through,
                    may_trim: deallocate,
                    fast_only: false,
                };
                match dev.write_zeroes(offset, len, opts).await {
                    Ok(()) => Done::ok(cid),
                    Err(e) => fail(e, true),
                }
            }
            IoOp::Dsm {
                ranges: count,
                deallocate,
                ..
            } => {
                let all = DsmRange::decode_all(&data);
                let ranges = &all[..all.len().min(count as usize)];
                let shift = ns.lba_shift;
                let blocks = ns.blocks();
                if ranges.iter().any(|r| {
                    r.slba
                        .checked_add(u64::from(r.nlb))
                        .is_none_or(|end| end > blocks)
                }) {
                    return Done::status(cid, Status::LBA_OUT_OF_RANGE.dnr());
                }
                // Deallocation is advisory: a device that cannot trim keeps the data.
                if !deallocate || !dev.capabilities().trim {
                    return Done::ok(cid);
                }
                for r in ranges.iter().filter(|r| r.nlb > 0) {
                    let opts = WriteOpts { fua: false };
                    if let Err(e) = dev
                        .trim(r.slba << shift, u64::from(r.nlb) << shift, opts)
                        .await
                    {
                        return fail(e, true);
                    }
                }
                Done::ok(cid)
            }
        }
    })
}
