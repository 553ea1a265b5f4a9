//! [`NbdDevice`]: connecting, and the block-device calls as NBD requests (split to the server's
//! limits, under the per-call time limit, their failures described for the user).

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use strata_bdev::{
    check_io, read_only_error, write_zeroes_by_writing, BlockDevice, Capabilities, Error,
    ErrorKind, Extent, Geometry, Result, WriteOpts, ZeroOpts,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::conn::{Conn, Done, Expect, Failed, Outcome, Outgoing, State, Unsent};
use super::negotiate::{negotiate, Negotiated};
use super::reader::reader_task;
use super::writer::writer_task;
use super::{ClientOptions, Target};
use crate::codec::{self, cmd, cmd_flags, errno, tx_flags, BlockSizes, Request};

/// Requests queued for the writer at most; callers wait beyond it.
const QUEUE_DEPTH: usize = 1024;
/// The largest read or write payload sent in one request, even if the server allows more
/// (the spec's interoperable limit, and a bound on the buffer one reply needs).
const MAX_PAYLOAD: u32 = 32 << 20;
/// The largest effect length of one trim, write-zeroes or cache request (a power of two, so a
/// multiple of any minimum block size).
const MAX_EFFECT: u64 = 1 << 31;

/// A block device served by a remote NBD server.
pub struct NbdDevice {
    pub(super) conn: Arc<Conn>,
    tx: mpsc::Sender<Outgoing>,
    /// Cancelled on drop: bounds how long the writer may take to say goodbye.
    closing: CancellationToken,
    /// The writer and the reader.
    tasks: Vec<JoinHandle<()>>,
    export: String,
    description: Option<String>,
    geometry: Geometry,
    flags: u16,
    structured: bool,
    /// The id the server gave `base:allocation`, if it was selected.
    context: Option<u32>,
    /// The largest read or write payload per request (a multiple of the block size).
    max_payload: u64,
    /// The largest trim/zero/cache length per request (a multiple of the block size).
    max_effect: u64,
    timeout: Option<Duration>,
}

impl fmt::Debug for NbdDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} bytes)", self.conn.name, self.geometry.size)
    }
}

impl Drop for NbdDevice {
    fn drop(&mut self) {
        // Dropping `tx` closes the queue: the writer sends what is queued, then NBD_CMD_DISC,
        // then stops the reader. `closing` bounds how long it may try.
        self.closing.cancel();
    }
}

impl NbdDevice {
    /// Connect to `target`, negotiate, and open export `export` (empty: the server's default).
    pub async fn connect(
        target: &Target,
        export: &str,
        options: &ClientOptions,
    ) -> Result<NbdDevice> {
        let name = match target {
            Target::Tcp(addr) => format!("nbd://{addr}/{export}"),
            Target::Unix(path) => format!("nbd+unix:///{export}?socket={}", path.display()),
        };
        let setup = async {
            match target {
                Target::Tcp(addr) => {
                    let mut s = TcpStream::connect(addr.as_str()).await.map_err(|e| {
                        Error::io(
                            format!("connect to NBD server {addr} (export {export:?})"),
                            e,
                        )
                    })?;
                    // Requests are small and latency-bound; batching is the writer's job.
                    let _ = s.set_nodelay(true);
                    let n = negotiate(&mut s, &target.to_string(), export).await?;
                    let (r, w) = s.into_split();
                    Ok((n, Io::Tcp(r, w)))
                }
                Target::Unix(path) => {
                    let mut s = UnixStream::connect(path).await.map_err(|e| {
                        Error::io(
                            format!(
                                "connect to NBD server at unix socket {} (export {export:?})",
                                path.display()
                            ),
                            e,
                        )
                    })?;
                    let n = negotiate(&mut s, &target.to_string(), export).await?;
                    let (r, w) = s.into_split();
                    Ok((n, Io::Unix(r, w)))
                }
            }
        };
        let (negotiated, io) = tokio::time::timeout(options.connect_timeout, setup)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "connect to NBD server {target} (export {export:?}): no answer within {:?}",
                        options.connect_timeout
                    ),
                )
            })??;
        Ok(match io {
            Io::Tcp(r, w) => NbdDevice::start(name, export, negotiated, r, w, options),
            Io::Unix(r, w) => NbdDevice::start(name, export, negotiated, r, w, options),
        })
    }

    /// Negotiate and serve export `export` over an already connected byte stream (e.g. a socket
    /// pair, or a TLS stream). `peer` names the server in messages.
    pub async fn connect_stream<S>(
        mut stream: S,
        peer: &str,
        export: &str,
        options: &ClientOptions,
    ) -> Result<NbdDevice>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let negotiated = tokio::time::timeout(
            options.connect_timeout,
            negotiate(&mut stream, peer, export),
        )
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::TimedOut,
                format!(
                    "negotiate with NBD server {peer} (export {export:?}): no answer within {:?}",
                    options.connect_timeout
                ),
            )
        })??;
        let (r, w) = tokio::io::split(stream);
        Ok(NbdDevice::start(
            format!("{peer}/{export}"),
            export,
            negotiated,
            r,
            w,
            options,
        ))
    }

    fn start<R, W>(
        name: String,
        export: &str,
        n: Negotiated,
        r: R,
        w: W,
        options: &ClientOptions,
    ) -> NbdDevice
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let sizes = n.sizes.unwrap_or(BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: MAX_PAYLOAD,
        });
        // Validated in negotiation: a power of two no larger than 64 KiB.
        let bs = sizes.minimum.max(1);
        let optimal = if sizes.preferred.is_power_of_two() {
            sizes.preferred.max(bs)
        } else {
            4096u32.max(bs)
        };
        let max_payload = u64::from(sizes.maximum.min(MAX_PAYLOAD) / bs * bs).max(u64::from(bs));
        let conn = Arc::new(Conn {
            name: name.into(),
            state: Mutex::new(State::default()),
            dead: CancellationToken::new(),
        });
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let closing = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(writer_task(conn.clone(), w, rx, closing.clone())),
            tokio::spawn(reader_task(conn.clone(), r, tx.downgrade())),
        ];
        debug!(device = %conn.name, size = n.size, flags = n.flags, structured = n.structured,
            block_status = n.context.is_some(), "NBD export connected");
        NbdDevice {
            conn,
            tx,
            closing,
            tasks,
            export: export.to_string(),
            description: n.description,
            geometry: Geometry {
                size: n.size,
                block_size: bs,
                optimal_io_size: optimal,
            },
            flags: n.flags,
            structured: n.structured,
            context: n.context,
            max_payload,
            max_effect: MAX_EFFECT,
            timeout: options.request_timeout,
        }
    }

    /// Disconnect cleanly: send what is queued, then `NBD_CMD_DISC`, and wait until the
    /// connection's tasks have stopped (at most a few seconds if the server stopped reading).
    pub async fn close(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        drop(self);
        for t in tasks {
            let _ = t.await;
        }
    }

    /// The export's name.
    pub fn export_name(&self) -> &str {
        &self.export
    }

    /// The export's description, if the server gave one.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The transmission flags the server advertised (`codec::tx_flags`).
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// Whether structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Whether the connection is still up (false once it was lost or closed).
    pub fn is_connected(&self) -> bool {
        !self.conn.dead.is_cancelled()
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Refuse a write-like call on a read-only export or outside the device.
    fn check_write(&self, verb: &str, offset: u64, len: u64) -> Result<()> {
        if self.has(tx_flags::READ_ONLY) {
            return Err(read_only_error(verb));
        }
        check_io(self.geometry, verb, offset, len)
    }

    fn unsupported(&self, verb: &str, why: &str) -> Error {
        Error::new(
            ErrorKind::Unsupported,
            format!("{verb} on {}: {why}", self.conn.name),
        )
    }

    /// Register a request and queue it for the writer; the receiver yields its outcome.
    async fn send(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Bytes,
        expect: Expect,
    ) -> Result<oneshot::Receiver<Outcome>, Failed> {
        let (cookie, rx) = self.conn.register(expect)?;
        // Until the writer has the request, a cancelled caller must take its entry back: no
        // reply will ever come for it.
        let unsent = Unsent {
            conn: &self.conn,
            cookie: Some(cookie),
        };
        let header = codec::request_header(&Request {
            flags,
            command,
            cookie,
            offset,
            length,
        });
        self.tx
            .send(Outgoing {
                header,
                payload,
                disconnect: false,
            })
            .await
            .map_err(|_| self.conn.lost())?;
        unsent.sent();
        Ok(rx)
    }

    async fn wait(&self, rx: oneshot::Receiver<Outcome>) -> Result<Done, Failed> {
        rx.await.unwrap_or_else(|_| Err(self.conn.lost()))
    }

    async fn call(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        expect: Expect,
    ) -> Result<Done, Failed> {
        let rx = self
            .send(command, flags, offset, length, Bytes::new(), expect)
            .await?;
        self.wait(rx).await
    }

    /// Run `fut` under the per-call time limit and describe its failure as `op`.
    async fn run<T>(&self, op: Op, fut: impl Future<Output = Result<T, Failed>>) -> Result<T> {
        let r = match self.timeout {
            None => fut.await,
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::TimedOut,
                        format!("{op} on {}: no reply within {t:?}", self.conn.name),
                    ))
                }
            },
        };
        r.map_err(|f| self.error(op, f))
    }

    fn error(&self, op: Op, failed: Failed) -> Error {
        let name = &self.conn.name;
        match failed {
            Failed::Server { errno: e, message } => {
                let message = message
                    .filter(|m| !m.is_empty())
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                Error::new(
                    kind_of(e),
                    format!(
                        "{op} on {name}: the server answered {}{message}",
                        errno_name(e)
                    ),
                )
            }
            Failed::BadReply(why) => Error::new(ErrorKind::Io, format!("{op} on {name}: {why}")),
            Failed::Lost(why) => Error::new(
                ErrorKind::Io,
                format!("{op}: the connection to {name} was lost: {why}"),
            ),
            Failed::Shutdown => Error::new(
                ErrorKind::Shutdown,
                format!("{op}: the server of {name} is shutting down"),
            ),
        }
    }

    /// Pieces of `[offset, offset + len)` no longer than `max`.
    fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
        let mut done = 0;
        std::iter::from_fn(move || {
            (done < len).then(|| {
                let n = (len - done).min(max);
                let piece = (offset + done, n);
                done += n;
                piece
            })
        })
    }

    async fn read_pieces(&self, offset: u64, len: usize) -> Result<Bytes, Failed> {
        let mut pending = Vec::new();
        for (off, n) in NbdDevice::pieces(offset, len as u64, self.max_payload) {
            let expect = Expect::Read {
                offset: off,
                len: n as u32,
            };
            let rx = self
                .send(cmd::READ, 0, off, n as u32, Bytes::new(), expect)
                .await?;
            pending.push(rx);
        }
        if pending.len() == 1 {
            if let Some(rx) = pending.pop() {
                return data_of(self.wait(rx).await?);
            }
        }
        let mut out = BytesMut::with_capacity(len);
        for rx in pending {
            out.extend_from_slice(&data_of(self.wait(rx).await?)?);
        }
        Ok(out.freeze())
    }

    async fn write_pieces(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), Failed> {
        let len = data.len() as u64;
        self.send_pieces(cmd::WRITE, 0, offset, len, Some(&data), fua)
            .await
    }

    /// Send `command` over `[offset, offset + len)` in pieces of at most `max_effect`, with FUA
    /// done natively or by a flush after.
    async fn effect_pieces(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), Failed> {
        self.send_pieces(command, flags, offset, len, None, fua)
            .await
    }

    /// Send `command` over `[offset, offset + len)` in pieces (each carrying its slice of
    /// `data` for writes, at most `max_payload`; otherwise at most `max_effect`), wait for all,
    /// and do FUA natively or by a flush after.
    async fn send_pieces(
        &self,
        command: u16,
        mut flags: u16,
        offset: u64,
        len: u64,
        data: Option<&Bytes>,
        fua: bool,
    ) -> Result<(), Failed> {
        let native_fua = fua && self.has(tx_flags::SEND_FUA);
        if native_fua {
            flags |= cmd_flags::FUA;
        }
        let max = if data.is_some() {
            self.max_payload
        } else {
            self.max_effect
        };
        let mut pending = Vec::new();
        for (off, n) in NbdDevice::pieces(offset, len, max) {
            let payload = match data {
                Some(d) => {
                    let start = (off - offset) as usize;
                    d.slice(start..start + n as usize)
                }
                None => Bytes::new(),
            };
            pending.push(
                self.send(command, flags, off, n as u32, payload, Expect::Done)
                    .await?,
            );
        }
        for rx in pending {
            self.wait(rx).await?;
        }
        if fua && !native_fua {
            self.flush_inner().await?;
        }
        Ok(())
    }

    async fn flush_inner(&self) -> Result<(), Failed> {
        if !self.has(tx_flags::SEND_FLUSH) {
            // Without SEND_FLUSH the server has no volatile cache to flush (and must not be sent
            // NBD_CMD_FLUSH).
            return Ok(());
        }
        self.call(cmd::FLUSH, 0, 0, 0, Expect::Done).await?;
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for NbdDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.has(tx_flags::READ_ONLY),
            flush: self.has(tx_flags::SEND_FLUSH),
            fua: self.has(tx_flags::SEND_FUA),
            trim: self.has(tx_flags::SEND_TRIM),
            write_zeroes: self.has(tx_flags::SEND_WRITE_ZEROES),
            fast_zero: self.has(tx_flags::SEND_WRITE_ZEROES) && self.has(tx_flags::SEND_FAST_ZERO),
            block_status: self.context.is_some(),
            multi_conn: self.has(tx_flags::CAN_MULTI_CONN),
            resize: false,
        }
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_io(self.geometry, "read", offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.run(
            Op::new("read", offset, len as u64),
            self.read_pieces(offset, len),
        )
        .await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        let len = data.len() as u64;
        self.check_write("write", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.run(
            Op::new("write", offset, len),
            self.write_pieces(offset, data, opts.fua),
        )
        .await
    }

    async fn flush(&self) -> Result<()> {
        self.run(Op::new("flush", 0, 0), self.flush_inner()).await
    }

    async fn trim(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        self.check_write("trim", offset, len)?;
        if !self.has(tx_flags::SEND_TRIM) {
            return Err(self.unsupported("trim", "the server does not support trim"));
        }
        if len == 0 {
            return Ok(());
        }
        self.run(
            Op::new("trim", offset, len),
            self.effect_pieces(cmd::TRIM, 0, offset, len, opts.fua),
        )
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        self.check_write("write zeroes", offset, len)?;
        if !self.has(tx_flags::SEND_WRITE_ZEROES) {
            return write_zeroes_by_writing(self, offset, len, opts).await;
        }
        if opts.fast_only && !self.has(tx_flags::SEND_FAST_ZERO) {
            return Err(self.unsupported(
                "write zeroes fast",
                "the server does not promise fast zeroing",
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let mut flags = 0;
        if !opts.may_trim {
            flags |= cmd_flags::NO_HOLE;
        }
        if opts.fast_only {
            flags |= cmd_flags::FAST_ZERO;
        }
        self.run(
            Op::new("write zeroes", offset, len),
            self.effect_pieces(cmd::WRITE_ZEROES, flags, offset, len, opts.fua),
        )
        .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_io(self.geometry, "query block status", offset, len)?;
        let Some(context) = self.context else {
            return Ok(vec![Extent::data(len)]);
        };
        if len == 0 {
            return Ok(vec![Extent::data(0)]);
        }
        // One request: the answer may describe a prefix, which the trait allows.
        let bs = u64::from(self.geometry.block_size);
        let n = len.min(u64::from(u32::MAX) / bs * bs) as u32;
        let expect = Expect::Status { len: n, context };
        self.run(Op::new("query block status", offset, len), async {
            match self.call(cmd::BLOCK_STATUS, 0, offset, n, expect).await? {
                Done::Extents(e) => Ok(e),
                _ => Err(Failed::BadReply("the reply carried no extents".into())),
            }
        })
        .await
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_io(self.geometry, "prefetch", offset, len)?;
        if !self.has(tx_flags::SEND_CACHE) || len == 0 {
            // A hint: doing nothing is a correct answer.
            return Ok(());
        }
        self.run(
            Op::new("prefetch", offset, len),
            self.effect_pieces(cmd::CACHE, 0, offset, len, false),
        )
        .await
    }
}

/// What a call was, for its error message.
#[derive(Debug, Clone, Copy)]
struct Op {
    verb: &'static str,
    offset: u64,
    len: u64,
}

impl Op {
    fn new(verb: &'static str, offset: u64, len: u64) -> Op {
        Op { verb, offset, len }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.verb == "flush" {
            f.write_str("flush")
        } else {
            write!(
                f,
                "{} {} bytes at offset {}",
                self.verb, self.len, self.offset
            )
        }
    }
}

fn data_of(done: Done) -> Result<Bytes, Failed> {
    match done {
        Done::Data(b) => Ok(b),
        _ => Err(Failed::BadReply(
            "the reply to a read carried no data".into(),
        )),
    }
}

/// The [`ErrorKind`] of an NBD error number.
fn kind_of(e: u32) -> ErrorKind {
    match e {
        errno::ENOSPC => ErrorKind::NoSpace,
        errno::EPERM => ErrorKind::PermissionDenied,
        errno::EINVAL => ErrorKind::InvalidInput,
        errno::ENOTSUP => ErrorKind::Unsupported,
        errno::EOVERFLOW => ErrorKind::TooLarge,
        errno::ESHUTDOWN => ErrorKind::Shutdown,
        _ => ErrorKind::Io,
    }
}

fn errno_name(e: u32) -> String {
    match e {
        errno::EPERM => "EPERM".into(),
        errno::EIO => "EIO".into(),
        errno::ENOMEM => "ENOMEM".into(),
        errno::EINVAL => "EINVAL".into(),
        errno::ENOSPC => "ENOSPC".into(),
        errno::EOVERFLOW => "EOVERFLOW".into(),
        errno::ENOTSUP => "ENOTSUP".into(),
        errno::ESHUTDOWN => "ESHUTDOWN".into(),
        other => format!("error {other}"),
    }
}

/// The two halves of a connected socket.
enum Io {
    Tcp(
        tokio::net::tcp::OwnedReadHalf,
        tokio::net::tcp::OwnedWriteHalf,
    ),
    Unix(
        tokio::net::unix::OwnedReadHalf,
        tokio::net::unix::OwnedWriteHalf,
    ),
}
