//! One request: checked against the protocol and the export, run against the device (or the
//! connection's transaction), and its reply encoded.

use std::future::Future;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use strata_bdev::{
    BlockDevice, Error as DevError, ErrorKind, Extent, Transaction, WriteOpts, ZeroOpts,
};
use tokio::sync::Semaphore;
use tracing::debug;

use super::{Ctx, Reply};
use crate::codec::{self, alloc_flags, cmd, cmd_flags, errno, reply};

/// The meta-context id of `base:allocation`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;
/// Block status descriptors sent per reply at most.
const MAX_EXTENTS: usize = 1 << 16;
/// The largest block status reply: what a BLOCK_STATUS request charges to the byte budget.
pub(super) const MAX_STATUS_REPLY: usize = 4 + 8 * MAX_EXTENTS;
/// The most a BLOCK_STATUS reply describes; the spec lets a reply cover less than was asked,
/// and clients ask again from where it ends. Bounds what one request may cost a device that
/// walks its pages.
pub(crate) const MAX_STATUS_LEN: u64 = 256 << 20;
/// TRIM and WRITE_ZEROES at least this long run off the runtime's workers, as block status
/// does: a device may do work per page for them.
const HEAVY_LEN: u64 = 64 << 20;
/// CPU-heavy device calls a server runs at once.
pub(crate) const HEAVY_PARALLEL: usize = 2;

/// Where a connection runs CPU-heavy device calls: on the blocking pool, one at a time for the
/// connection and [`HEAVY_PARALLEL`] at a time for the server, so that neither a runtime
/// worker nor the other connections wait behind one client's expensive requests.
#[derive(Debug, Clone)]
pub(crate) struct Heavy {
    server: Arc<Semaphore>,
    connection: Arc<Semaphore>,
}

impl Heavy {
    /// The calls of a new connection to a server whose share is `server`.
    pub fn new(server: Arc<Semaphore>) -> Heavy {
        Heavy {
            server,
            connection: Arc::new(Semaphore::new(1)),
        }
    }

    /// Run `call` off the runtime's workers, in turn with the connection's and the server's
    /// other heavy calls.
    async fn run<T: Send + 'static>(
        &self,
        call: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, Failure> {
        let closed = |_| Failure::new(errno::ESHUTDOWN, "the server is shutting down");
        let _mine = self.connection.acquire().await.map_err(closed)?;
        let _ours = self.server.acquire().await.map_err(closed)?;
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || runtime.block_on(call))
            .await
            .map_err(|e| Failure::new(errno::EIO, format!("the device call failed: {e}")))
    }
}

/// An error to send back: the NBD errno and a message for the user.
pub(super) struct Failure {
    errno: u32,
    message: String,
}

impl Failure {
    pub(super) fn new(errno: u32, message: impl Into<String>) -> Failure {
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

pub(super) enum Success {
    Done,
    Data(Bytes),
    Extents(Vec<Extent>),
}

/// Encode the reply to `req`.
pub(super) fn encode(
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
        parts: [h.freeze(), data],
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
pub(super) async fn run(
    ctx: &Ctx,
    req: &codec::Request,
    payload: Option<Bytes>,
) -> Result<Success, Failure> {
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
            let dev = dev.clone();
            let call = async move { dev.trim(offset, length, WriteOpts { fua }).await };
            maybe_heavy(ctx, length, call)
                .await?
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
            let dev = dev.clone();
            let call = async move { dev.write_zeroes(offset, length, opts).await };
            maybe_heavy(ctx, length, call)
                .await?
                .map(|_| Success::Done)
                .map_err(dev_err)
        }
        cmd::BLOCK_STATUS => block_status(ctx, offset, length).await,
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
pub(super) async fn run_txn(
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
                    // The page is the export's preferred I/O size (an image's page).
                    let page = ctx.export.device.geometry().optimal_io_size;
                    let page = u64::from(page).max(ctx.block_size);
                    t.zero(offset, page).await.map_err(err)?;
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

/// Run `call` as a heavy call if `length` makes it one, else here.
async fn maybe_heavy<T: Send + 'static>(
    ctx: &Ctx,
    length: u64,
    call: impl Future<Output = T> + Send + 'static,
) -> Result<T, Failure> {
    if length >= HEAVY_LEN {
        ctx.heavy.run(call).await
    } else {
        Ok(call.await)
    }
}

/// `base:allocation` for at most [`MAX_STATUS_LEN`] bytes from `offset`, computed off the
/// runtime's workers.
async fn block_status(ctx: &Ctx, offset: u64, length: u64) -> Result<Success, Failure> {
    if !ctx.block_status {
        return Err(Failure::new(
            errno::EINVAL,
            "block status: no meta context was selected (NBD_OPT_SET_META_CONTEXT base:allocation)",
        ));
    }
    let dev: Arc<dyn BlockDevice> = ctx.export.device.clone();
    let length = length.min(MAX_STATUS_LEN);
    let ext = ctx
        .heavy
        .run(async move { dev.block_status(offset, length).await })
        .await?
        .map_err(|e| Failure::from_device(e, false))?;
    if ext.is_empty() || ext.iter().any(|e| e.len == 0) {
        return Err(Failure::new(
            errno::EIO,
            "block status: the device returned an empty extent",
        ));
    }
    Ok(Success::Extents(ext))
}
