//! The NBD client: a [`BlockDevice`] backed by an export on a remote NBD server, over TCP or a
//! unix socket (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`).
//!
//! ```text
//!   callers ──register cookie──► in-flight map ◄──complete by cookie── reader task
//!      │                          (one short lock,                        ▲
//!      └──request (bounded mpsc)──► writer task   never held across await) │
//!                                   │ batched vectored writes              │ replies, parsed in
//!                                   ▼                                      │ place from one buffer
//!                                 socket ──────────────────────────────────┘
//! ```
//!
//! Negotiation is fixed newstyle: structured replies, the `base:allocation` meta context and
//! `NBD_OPT_GO` with block sizes, each optional, with a fall back to `NBD_OPT_EXPORT_NAME` for
//! old servers. In transmission, every caller registers its request under a fresh cookie and
//! hands it to the one writer task, which writes whatever is queued with one vectored write; the
//! one reader task parses replies (simple, or structured chunks which it assembles) and completes
//! the caller through a oneshot channel. Read data is copied at most once in user space, into a
//! buffer of exactly the request's size (large payloads go from the socket straight into it), so
//! a caller that keeps the buffer pins nothing else. Reads and writes over the server's maximum
//! payload are split into requests that are all sent before the first reply is awaited (a split
//! read is gathered with one more copy).
//!
//! Failure is prompt: when the connection dies (EOF, reset, a protocol violation), every request
//! in flight and every later one fails with [`ErrorKind::Io`] saying the connection was lost.
//! A per-call time limit ([`ClientOptions::request_timeout`]) fails a call with
//! [`ErrorKind::TimedOut`] and leaves the connection up; a late reply is read and discarded.
//! Dropping the device sends `NBD_CMD_DISC` after the requests already queued, and stops both
//! tasks; [`NbdDevice::close`] does the same and waits for it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::io::IoSlice;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use strata_bdev::{
    check_io, read_only_error, write_zeroes_by_writing, BlockDevice, Capabilities, DeviceUri,
    Error, ErrorKind, Extent, Geometry, Opener, Result, WriteOpts, ZeroOpts,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::codec::{
    self, alloc_flags, cmd, cmd_flags, errno, info, opt, rep, reply, tx_flags, BlockSizes, Info,
    ReplyHeader, Request,
};

/// The IANA port of NBD, used when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// Requests queued for the writer at most; callers wait beyond it.
const QUEUE_DEPTH: usize = 1024;
/// Requests gathered into one vectored write at most.
const WRITE_BATCH: usize = 64;
/// The reader's buffer grows by this much at a time, so that one read syscall picks up many
/// small replies.
const READ_BUF: usize = 256 << 10;
/// Payload still to come beyond this size is read from the socket straight into its destination.
const DIRECT_READ_MIN: usize = 64 << 10;
/// The largest read or write payload sent in one request, even if the server allows more
/// (the spec's interoperable limit, and a bound on the buffer one reply needs).
const MAX_PAYLOAD: u32 = 32 << 20;
/// The largest effect length of one trim, write-zeroes or cache request (a power of two, so a
/// multiple of any minimum block size).
const MAX_EFFECT: u64 = 1 << 31;
/// Option replies longer than this are a protocol violation.
const MAX_OPTION_REPLY: u32 = 1 << 20;
/// Error chunks longer than this are a protocol violation (messages are at most 4096 bytes).
const MAX_ERROR_CHUNK: u32 = 1 << 16;
/// Block status chunks longer than this (2^21 extents) are a protocol violation.
const MAX_STATUS_CHUNK: u32 = 4 + 8 * (1 << 21);
/// How long a dropped device keeps trying to write its queued requests and `NBD_CMD_DISC`.
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host:port`: a name or an address (IPv6 in brackets).
    Tcp(String),
    /// The path of a unix socket.
    Unix(PathBuf),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(addr) => f.write_str(addr),
            Target::Unix(path) => write!(f, "unix socket {}", path.display()),
        }
    }
}

/// Client settings; [`ClientOptions::default`] holds the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Time limit of each call (`read_at`, `write_at`, …, including its queueing and any split
    /// requests). A call over it fails with [`ErrorKind::TimedOut`]; the connection stays up.
    /// Default: none.
    pub request_timeout: Option<Duration>,
    /// Time limit for connecting and negotiating. Default: 30 s.
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            request_timeout: None,
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// A block device served by a remote NBD server.
pub struct NbdDevice {
    conn: Arc<Conn>,
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

/// What negotiation settled.
#[derive(Debug)]
struct Negotiated {
    size: u64,
    flags: u16,
    structured: bool,
    context: Option<u32>,
    sizes: Option<BlockSizes>,
    description: Option<String>,
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
        if self.has(tx_flags::READ_ONLY) {
            return Err(read_only_error("write"));
        }
        let len = data.len() as u64;
        check_io(self.geometry, "write", offset, len)?;
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
        if self.has(tx_flags::READ_ONLY) {
            return Err(read_only_error("trim"));
        }
        check_io(self.geometry, "trim", offset, len)?;
        if !self.has(tx_flags::SEND_TRIM) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "trim on {}: the server does not support trim",
                    self.conn.name
                ),
            ));
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
        if self.has(tx_flags::READ_ONLY) {
            return Err(read_only_error("write zeroes"));
        }
        check_io(self.geometry, "write zeroes", offset, len)?;
        if !self.has(tx_flags::SEND_WRITE_ZEROES) {
            return write_zeroes_by_writing(self, offset, len, opts).await;
        }
        if opts.fast_only && !self.has(tx_flags::SEND_FAST_ZERO) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "write zeroes fast on {}: the server does not promise fast zeroing",
                    self.conn.name
                ),
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

// ---------------------------------------------------------------------------------------------
// Negotiation

/// Run the fixed newstyle handshake on `s` and enter transmission for `export`.
async fn negotiate<S>(s: &mut S, host: &str, export: &str) -> Result<Negotiated>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ctx = || format!("negotiate with NBD server {host} (export {export:?})");
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::with_source(
                ErrorKind::Io,
                format!("{}: the server closed the connection", ctx()),
                e,
            )
        } else {
            Error::io(ctx(), e)
        }
    };
    let violation = |what: String| {
        Error::new(
            ErrorKind::Io,
            format!("{}: protocol violation: {what}", ctx()),
        )
    };

    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.map_err(io)?;
    let hs = codec::decode_greeting(&greeting).map_err(|e| violation(e.to_string()))?;
    if hs & codec::handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{}: the server does not speak fixed newstyle negotiation",
                ctx()
            ),
        ));
    }
    let no_zeroes = hs & codec::handshake_flags::NO_ZEROES != 0;
    let mut client_flags = codec::client_flags::FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= codec::client_flags::NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes()).await.map_err(io)?;

    let mut out = BytesMut::new();
    // An error reply that ends negotiation whatever the option was.
    let fatal = |reply_type: u32, data: &[u8]| -> Option<Error> {
        let msg = server_message(data);
        match reply_type {
            rep::ERR_TLS_REQD => Some(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "{}: the server requires TLS, which this client does not speak yet{msg}",
                    ctx()
                ),
            )),
            rep::ERR_SHUTDOWN => Some(Error::new(
                ErrorKind::Shutdown,
                format!("{}: the server is shutting down{msg}", ctx()),
            )),
            _ => None,
        }
    };

    // Structured replies: optional.
    send_option(s, &mut out, opt::STRUCTURED_REPLY, &[])
        .await
        .map_err(io)?;
    let (t, data) = read_option_reply(s, opt::STRUCTURED_REPLY)
        .await
        .map_err(io)?
        .map_err(violation)?;
    let structured = match t {
        rep::ACK => true,
        t if rep::is_error(t) => {
            if let Some(e) = fatal(t, &data) {
                return Err(e);
            }
            debug!(
                server = host,
                reply = t,
                "no structured replies: simple replies only"
            );
            false
        }
        t => {
            return Err(violation(format!(
                "reply type {t} to NBD_OPT_STRUCTURED_REPLY"
            )))
        }
    };

    // base:allocation: optional, and only with structured replies.
    let mut context = None;
    if structured {
        let req = codec::MetaRequest {
            export: export.to_string(),
            queries: vec![codec::BASE_ALLOCATION.to_string()],
        };
        send_option(
            s,
            &mut out,
            opt::SET_META_CONTEXT,
            &codec::encode_meta_request(&req),
        )
        .await
        .map_err(io)?;
        loop {
            let (t, data) = read_option_reply(s, opt::SET_META_CONTEXT)
                .await
                .map_err(io)?
                .map_err(violation)?;
            match t {
                rep::META_CONTEXT => {
                    let (id, name) = codec::parse_rep_meta_context(&data)
                        .map_err(|e| violation(e.to_string()))?;
                    if name == codec::BASE_ALLOCATION {
                        context = Some(id);
                    }
                }
                rep::ACK => break,
                t if rep::is_error(t) => {
                    if let Some(e) = fatal(t, &data) {
                        return Err(e);
                    }
                    debug!(
                        server = host,
                        reply = t,
                        "no base:allocation: block status reports all data"
                    );
                    // The spec: disregard contexts sent before an error.
                    context = None;
                    break;
                }
                t => {
                    return Err(violation(format!(
                        "reply type {t} to NBD_OPT_SET_META_CONTEXT"
                    )))
                }
            }
        }
    }

    // GO, or EXPORT_NAME for servers that predate it.
    let go = codec::InfoRequest {
        name: export.to_string(),
        requests: vec![info::NAME, info::DESCRIPTION, info::BLOCK_SIZE],
    };
    send_option(s, &mut out, opt::GO, &codec::encode_info_request(&go))
        .await
        .map_err(io)?;
    let mut export_info = None;
    let mut sizes = None;
    let mut description = None;
    loop {
        let (t, data) = read_option_reply(s, opt::GO)
            .await
            .map_err(io)?
            .map_err(violation)?;
        match t {
            rep::INFO => match codec::parse_info(&data).map_err(|e| violation(e.to_string()))? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize(b) => sizes = Some(b),
                Info::Description(d) => description = Some(d),
                Info::Name(_) | Info::Unknown(_) => {}
            },
            rep::ACK => break,
            rep::ERR_UNSUP => {
                debug!(
                    server = host,
                    "NBD_OPT_GO unsupported: falling back to NBD_OPT_EXPORT_NAME"
                );
                let (size, flags) =
                    export_name(s, &mut out, export, no_zeroes)
                        .await
                        .map_err(|e| {
                            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                                Error::new(
                                    ErrorKind::InvalidInput,
                                    format!(
                                        "export {export:?} not found on {host} (the server closed \
                                     the connection on NBD_OPT_EXPORT_NAME)"
                                    ),
                                )
                            } else {
                                io(e)
                            }
                        })?;
                return Ok(Negotiated {
                    size,
                    flags: effective_flags(flags),
                    structured,
                    // Meta contexts are bound to NBD_OPT_GO.
                    context: None,
                    sizes: None,
                    description: None,
                });
            }
            t if rep::is_error(t) => {
                if let Some(e) = fatal(t, &data) {
                    return Err(e);
                }
                let msg = server_message(&data);
                let (kind, what) = match t {
                    rep::ERR_UNKNOWN => {
                        return Err(Error::new(
                            ErrorKind::InvalidInput,
                            format!("export {export:?} not found on {host}{msg}"),
                        ))
                    }
                    rep::ERR_POLICY => (
                        ErrorKind::PermissionDenied,
                        "the server's policy refuses it",
                    ),
                    rep::ERR_INVALID => (
                        ErrorKind::InvalidInput,
                        "the server calls the request invalid",
                    ),
                    rep::ERR_TOO_BIG => (
                        ErrorKind::InvalidInput,
                        "the request is too big for the server",
                    ),
                    rep::ERR_BLOCK_SIZE_REQD => {
                        (ErrorKind::Io, "the server wants block sizes requested")
                    }
                    _ => (ErrorKind::Io, "the server refused it"),
                };
                return Err(Error::new(
                    kind,
                    format!("{}: open the export: {what} (reply {t:#x}){msg}", ctx()),
                ));
            }
            t => return Err(violation(format!("reply type {t} to NBD_OPT_GO"))),
        }
    }
    let Some((size, flags)) = export_info else {
        return Err(violation(
            "NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into(),
        ));
    };
    if let Some(b) = sizes {
        if !b.minimum.is_power_of_two() || b.minimum > 65536 {
            return Err(violation(format!(
                "minimum block size {} is not a power of two up to 65536",
                b.minimum
            )));
        }
        if b.maximum < b.minimum {
            return Err(violation(format!(
                "maximum payload {} is below the minimum block size {}",
                b.maximum, b.minimum
            )));
        }
    }
    Ok(Negotiated {
        size,
        flags: effective_flags(flags),
        structured,
        context,
        sizes,
        description,
    })
}

/// Transmission flags mean nothing unless `HAS_FLAGS` is set.
fn effective_flags(flags: u16) -> u16 {
    if flags & tx_flags::HAS_FLAGS == 0 {
        0
    } else {
        flags
    }
}

/// ": message" from an option error reply's data, or nothing.
fn server_message(data: &[u8]) -> String {
    let m = String::from_utf8_lossy(data);
    let m = m.trim();
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

async fn send_option<S: AsyncWrite + Unpin>(
    s: &mut S,
    out: &mut BytesMut,
    option: u32,
    data: &[u8],
) -> std::io::Result<()> {
    out.clear();
    codec::encode_option(out, option, data);
    s.write_all(out).await
}

/// Read one option reply to `option`: its type and data. The inner error is a protocol violation.
async fn read_option_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    option: u32,
) -> std::io::Result<std::result::Result<(u32, Vec<u8>), String>> {
    let mut h = [0u8; codec::OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut h).await?;
    let h = match codec::decode_option_reply_header(&h) {
        Ok(h) => h,
        Err(e) => return Ok(Err(format!("option reply: {e}"))),
    };
    if h.option != option {
        return Ok(Err(format!(
            "a reply to option {} where option {option} was asked",
            h.option
        )));
    }
    if h.len > MAX_OPTION_REPLY {
        return Ok(Err(format!(
            "an option reply of {} bytes (at most {MAX_OPTION_REPLY} expected)",
            h.len
        )));
    }
    let mut data = vec![0u8; h.len as usize];
    s.read_exact(&mut data).await?;
    Ok(Ok((h.reply_type, data)))
}

/// `NBD_OPT_EXPORT_NAME`: the server answers with size and flags, or hangs up.
async fn export_name<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    out: &mut BytesMut,
    export: &str,
    no_zeroes: bool,
) -> std::io::Result<(u64, u16)> {
    send_option(s, out, opt::EXPORT_NAME, export.as_bytes()).await?;
    let size = s.read_u64().await?;
    let flags = s.read_u16().await?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        s.read_exact(&mut zeroes).await?;
    }
    Ok((size, flags))
}

// ---------------------------------------------------------------------------------------------
// Transmission: shared state

/// The state callers, the reader and the writer share.
struct Conn {
    /// The device's URI-like name, for messages.
    name: Arc<str>,
    state: Mutex<State>,
    /// Cancelled when the connection is finished: both tasks stop.
    dead: CancellationToken,
}

#[derive(Default)]
struct State {
    next_cookie: u64,
    inflight: HashMap<u64, InFlight>,
    /// Why the connection is finished, once it is.
    lost: Option<Arc<str>>,
    /// The server answered ESHUTDOWN: no new requests, and a soft disconnect once idle.
    server_shutdown: bool,
}

impl Conn {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves a consistent map (every critical section is a
        // single insert, remove or drain); keep going rather than poison every caller.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, expect: Expect) -> Result<(u64, oneshot::Receiver<Outcome>), Failed> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.state();
        if st.server_shutdown {
            return Err(Failed::Shutdown);
        }
        if let Some(why) = &st.lost {
            return Err(Failed::Lost(why.clone()));
        }
        let cookie = st.next_cookie;
        st.next_cookie = st.next_cookie.wrapping_add(1);
        st.inflight.insert(cookie, InFlight::new(expect, tx));
        Ok((cookie, rx))
    }

    fn take(&self, cookie: u64) -> Option<InFlight> {
        self.state().inflight.remove(&cookie)
    }

    /// The failure of a request whose connection is gone.
    fn lost(&self) -> Failed {
        let st = self.state();
        if st.server_shutdown {
            return Failed::Shutdown;
        }
        Failed::Lost(
            st.lost
                .clone()
                .unwrap_or_else(|| "the connection was closed".into()),
        )
    }

    /// Finish the connection: fail every request in flight with `why` and stop both tasks.
    fn fail(&self, why: &str) -> Arc<str> {
        let (why, drained) = {
            let mut st = self.state();
            let why = st.lost.get_or_insert_with(|| why.into()).clone();
            (why, std::mem::take(&mut st.inflight))
        };
        for (_, f) in drained {
            let _ = f.tx.send(Err(Failed::Lost(why.clone())));
        }
        self.dead.cancel();
        why
    }
}

/// Takes back the entry of a request the writer never got.
struct Unsent<'a> {
    conn: &'a Conn,
    cookie: Option<u64>,
}

impl Unsent<'_> {
    fn sent(mut self) {
        self.cookie = None;
    }
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if let Some(cookie) = self.cookie {
            self.conn.take(cookie);
        }
    }
}

/// A request on its way to the writer.
struct Outgoing {
    header: [u8; codec::REQUEST_LEN],
    payload: Bytes,
    /// `NBD_CMD_DISC`: the last thing written.
    disconnect: bool,
}

impl Outgoing {
    fn disconnect() -> Outgoing {
        Outgoing {
            header: codec::request_header(&Request {
                flags: 0,
                command: cmd::DISC,
                cookie: u64::MAX,
                offset: 0,
                length: 0,
            }),
            payload: Bytes::new(),
            disconnect: true,
        }
    }
}

/// What the reply to a request must carry.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Read { offset: u64, len: u32 },
    Status { len: u32, context: u32 },
    Done,
}

/// A successful reply.
#[derive(Debug)]
enum Done {
    Ok,
    Data(Bytes),
    Extents(Vec<Extent>),
}

/// A failed request.
#[derive(Debug)]
enum Failed {
    /// The server answered with an error.
    Server { errno: u32, message: Option<String> },
    /// The reply did not answer the request (e.g. a read with bytes missing); the connection
    /// stays up.
    BadReply(String),
    /// The connection is gone.
    Lost(Arc<str>),
    /// The server said it is shutting down.
    Shutdown,
}

type Outcome = Result<Done, Failed>;

/// A request in flight, and what its reply has delivered so far.
struct InFlight {
    tx: oneshot::Sender<Outcome>,
    expect: Expect,
    data: ReadData,
    extents: Option<Vec<Extent>>,
    error: Option<Failed>,
}

/// The data of a read reply so far.
enum ReadData {
    None,
    /// One chunk (or a simple reply) with all of it.
    Whole(Bytes),
    /// Several chunks: a zeroed buffer, and the ranges filled (start → end, request-relative).
    Parts {
        buf: BytesMut,
        filled: BTreeMap<u64, u64>,
        covered: u64,
    },
}

impl InFlight {
    fn new(expect: Expect, tx: oneshot::Sender<Outcome>) -> InFlight {
        InFlight {
            tx,
            expect,
            data: ReadData::None,
            extents: None,
            error: None,
        }
    }

    /// Whether payload for this request can be skipped: nobody waits, or it already failed.
    fn discarding(&self) -> bool {
        self.tx.is_closed() || self.error.is_some()
    }

    fn record_error(&mut self, e: Failed) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    /// Claim `[rel, rel + n)` of a read for a chunk (which must not overlap an earlier one) and
    /// return the buffer to fill it in.
    fn claim(&mut self, len: u32, rel: u64, n: u64) -> Result<&mut BytesMut, String> {
        let end = rel + n;
        if let ReadData::None = self.data {
            self.data = ReadData::Parts {
                buf: BytesMut::zeroed(len as usize),
                filled: BTreeMap::new(),
                covered: 0,
            };
        }
        match &mut self.data {
            ReadData::Parts {
                buf,
                filled,
                covered,
            } => {
                let before = filled
                    .range(..=rel)
                    .next_back()
                    .is_some_and(|(_, &e)| e > rel);
                let after = filled.range(rel..).next().is_some_and(|(&s, _)| s < end);
                if before || after {
                    return Err(format!("read reply chunks overlap at request offset {rel}"));
                }
                filled.insert(rel, end);
                *covered += n;
                Ok(buf)
            }
            _ => Err(format!("read reply chunks overlap at request offset {rel}")),
        }
    }

    /// The outcome once the last chunk is in.
    fn finish(self) -> (oneshot::Sender<Outcome>, Outcome) {
        let outcome = match (self.error, self.expect) {
            (Some(e), _) => Err(e),
            (None, Expect::Read { len, .. }) => match self.data {
                ReadData::Whole(b) => Ok(Done::Data(b)),
                ReadData::Parts { buf, covered, .. } if covered == u64::from(len) => {
                    Ok(Done::Data(buf.freeze()))
                }
                ReadData::Parts { covered, .. } => Err(Failed::BadReply(format!(
                    "the server's reply held {covered} of the {len} bytes asked for"
                ))),
                ReadData::None => Err(Failed::BadReply(format!(
                    "the server's reply held none of the {len} bytes asked for"
                ))),
            },
            (None, Expect::Status { .. }) => match self.extents {
                Some(e) if !e.is_empty() => Ok(Done::Extents(e)),
                _ => Err(Failed::BadReply(
                    "the server's reply held no base:allocation extents".into(),
                )),
            },
            (None, Expect::Done) => Ok(Done::Ok),
        };
        (self.tx, outcome)
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: the writer

async fn writer_task<W>(
    conn: Arc<Conn>,
    mut w: W,
    mut rx: mpsc::Receiver<Outgoing>,
    closing: CancellationToken,
) where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let grace = async {
        closing.cancelled().await;
        tokio::time::sleep(DISCONNECT_GRACE).await;
    };
    let result = tokio::select! {
        r = write_requests(&mut w, &mut rx) => r,
        _ = conn.dead.cancelled() => return,
        _ = grace => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the device was closed while the server was not reading",
        )),
    };
    match result {
        Ok(()) => {
            conn.fail("the client disconnected");
        }
        Err(e) => {
            let why = conn.fail(&format!("write to the server: {e}"));
            warn!(device = %conn.name, reason = %why, "NBD connection lost");
        }
    }
}

/// Write requests as they come, batched; on a disconnect request or a closed queue (the device
/// was dropped), send `NBD_CMD_DISC` and shut the stream down.
async fn write_requests<W: AsyncWrite + Unpin>(
    w: &mut W,
    rx: &mut mpsc::Receiver<Outgoing>,
) -> std::io::Result<()> {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(WRITE_BATCH);
    let vectored = w.is_write_vectored();
    let mut coalesced = BytesMut::new();
    loop {
        if rx.recv_many(&mut batch, WRITE_BATCH).await == 0 {
            batch.push(Outgoing::disconnect());
        }
        let last = batch.iter().position(|m| m.disconnect);
        if let Some(i) = last {
            // Nothing may follow NBD_CMD_DISC.
            batch.truncate(i + 1);
        }
        if vectored {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
            for m in &batch {
                slices.push(IoSlice::new(&m.header));
                if !m.payload.is_empty() {
                    slices.push(IoSlice::new(&m.payload));
                }
            }
            write_all_vectored(w, &mut slices).await?;
        } else {
            coalesced.clear();
            for m in &batch {
                coalesced.extend_from_slice(&m.header);
                coalesced.extend_from_slice(&m.payload);
            }
            w.write_all(&coalesced).await?;
        }
        w.flush().await?;
        batch.clear();
        if last.is_some() {
            return w.shutdown().await.or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotConnected {
                    Ok(())
                } else {
                    Err(e)
                }
            });
        }
    }
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Transmission: the reader

async fn reader_task<R>(conn: Arc<Conn>, r: R, disconnect: mpsc::WeakSender<Outgoing>)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let mut rd = ReplyReader {
        rd: r,
        buf: BytesMut::with_capacity(READ_BUF),
    };
    let mut partial: HashMap<u64, InFlight> = HashMap::new();
    let why = tokio::select! {
        e = read_replies(&conn, &mut rd, &mut partial, &disconnect) => Some(e),
        _ = conn.dead.cancelled() => None,
    };
    let why = match why {
        Some(e) => {
            let why = conn.fail(&e.to_string());
            if conn.state().server_shutdown {
                debug!(device = %conn.name, reason = %why, "NBD connection closed after ESHUTDOWN");
            } else {
                warn!(device = %conn.name, reason = %why, "NBD connection lost");
            }
            why
        }
        None => conn.fail("the connection was closed"),
    };
    for (_, f) in partial.drain() {
        let _ = f.tx.send(Err(Failed::Lost(why.clone())));
    }
}

/// Why the reader stopped.
#[derive(Debug)]
enum ReadStop {
    Io(std::io::Error),
    Violation(String),
}

impl fmt::Display for ReadStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadStop::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                f.write_str("the server closed the connection")
            }
            ReadStop::Io(e) => write!(f, "read from the server: {e}"),
            ReadStop::Violation(what) => write!(f, "protocol violation: {what}"),
        }
    }
}

impl From<std::io::Error> for ReadStop {
    fn from(e: std::io::Error) -> ReadStop {
        ReadStop::Io(e)
    }
}

fn violation(what: impl Into<String>) -> ReadStop {
    ReadStop::Violation(what.into())
}

/// Parse replies until the connection fails; returns why.
async fn read_replies<R: AsyncRead + Unpin>(
    conn: &Conn,
    rd: &mut ReplyReader<R>,
    partial: &mut HashMap<u64, InFlight>,
    disconnect: &mpsc::WeakSender<Outgoing>,
) -> ReadStop {
    let mut shutting_down = false;
    loop {
        let completed = match read_reply(conn, rd, partial).await {
            Ok(c) => c,
            Err(e) => return e,
        };
        if let Some((tx, outcome)) = completed {
            if matches!(
                outcome,
                Err(Failed::Server {
                    errno: errno::ESHUTDOWN,
                    ..
                })
            ) && !shutting_down
            {
                // The spec: a client that sees ESHUTDOWN initiates a soft disconnect.
                shutting_down = true;
                conn.state().server_shutdown = true;
            }
            let _ = tx.send(outcome);
        }
        if shutting_down && partial.is_empty() && conn.state().inflight.is_empty() {
            if let Some(tx) = disconnect.upgrade() {
                let _ = tx.try_send(Outgoing::disconnect());
            }
            // Stay to read EOF (or stray replies, which are violations).
            shutting_down = false;
        }
    }
}

/// Read one reply message (a simple reply or one chunk); returns the request it completes.
async fn read_reply<R: AsyncRead + Unpin>(
    conn: &Conn,
    rd: &mut ReplyReader<R>,
    partial: &mut HashMap<u64, InFlight>,
) -> Result<Option<(oneshot::Sender<Outcome>, Outcome)>, ReadStop> {
    match rd.header().await? {
        ReplyHeader::Simple { error, cookie } => {
            if partial.contains_key(&cookie) {
                return Err(violation(format!(
                    "a simple reply to cookie {cookie} in the middle of its structured reply"
                )));
            }
            let Some(f) = conn.take(cookie) else {
                return Err(violation(format!(
                    "a reply to cookie {cookie}, which is not in flight"
                )));
            };
            if error != 0 {
                return Ok(Some((
                    f.tx,
                    Err(Failed::Server {
                        errno: error,
                        message: None,
                    }),
                )));
            }
            let outcome = match f.expect {
                Expect::Read { len, .. } => {
                    if f.tx.is_closed() {
                        rd.skip(len as usize).await?;
                        return Ok(None);
                    }
                    Ok(Done::Data(rd.read_bytes(len as usize).await?))
                }
                Expect::Status { .. } => Err(Failed::BadReply(
                    "a simple reply to block status carries no extents".into(),
                )),
                Expect::Done => Ok(Done::Ok),
            };
            Ok(Some((f.tx, outcome)))
        }
        ReplyHeader::Chunk {
            flags,
            chunk_type,
            cookie,
            length,
        } => {
            let mut f = match partial.remove(&cookie) {
                Some(f) => f,
                None => conn.take(cookie).ok_or_else(|| {
                    violation(format!(
                        "a reply chunk for cookie {cookie}, which is not in flight"
                    ))
                })?,
            };
            let done = flags & reply::FLAG_DONE != 0;
            read_chunk(rd, &mut f, chunk_type, length, done).await?;
            if done {
                Ok(Some(f.finish()))
            } else {
                partial.insert(cookie, f);
                Ok(None)
            }
        }
    }
}

/// Read the payload of one structured reply chunk into its request's state.
async fn read_chunk<R: AsyncRead + Unpin>(
    rd: &mut ReplyReader<R>,
    f: &mut InFlight,
    chunk_type: u16,
    length: u32,
    done: bool,
) -> Result<(), ReadStop> {
    match chunk_type {
        reply::TYPE_NONE => {
            if length != 0 || !done {
                return Err(violation(format!(
                    "an NBD_REPLY_TYPE_NONE chunk of {length} bytes{}",
                    if done { "" } else { " without the DONE flag" }
                )));
            }
        }
        reply::TYPE_OFFSET_DATA => {
            let Expect::Read { offset, len } = f.expect else {
                return Err(violation(
                    "read data in the reply to a request other than a read",
                ));
            };
            if length < 9 {
                return Err(violation(format!("an OFFSET_DATA chunk of {length} bytes")));
            }
            let mut at = [0u8; 8];
            rd.copy_to(&mut at).await?;
            let n = u64::from(length - 8);
            let rel = within(u64::from_be_bytes(at), n, offset, len)?;
            if f.discarding() {
                rd.skip(n as usize).await?;
            } else if rel == 0 && n == u64::from(len) && matches!(f.data, ReadData::None) {
                f.data = ReadData::Whole(rd.read_bytes(n as usize).await?);
            } else {
                let buf = f.claim(len, rel, n).map_err(violation)?;
                rd.copy_to(&mut buf[rel as usize..(rel + n) as usize])
                    .await?;
            }
        }
        reply::TYPE_OFFSET_HOLE => {
            let Expect::Read { offset, len } = f.expect else {
                return Err(violation(
                    "a hole in the reply to a request other than a read",
                ));
            };
            if length != 12 {
                return Err(violation(format!("an OFFSET_HOLE chunk of {length} bytes")));
            }
            let payload = rd.read_vec(12).await?;
            let (at, size) =
                codec::parse_offset_hole(&payload).map_err(|e| violation(e.to_string()))?;
            if size == 0 {
                return Err(violation("an OFFSET_HOLE chunk of size 0"));
            }
            let rel = within(at, u64::from(size), offset, len)?;
            if !f.discarding() {
                // The buffer starts zeroed and ranges never overlap: nothing to fill.
                f.claim(len, rel, u64::from(size)).map_err(violation)?;
            }
        }
        reply::TYPE_BLOCK_STATUS => {
            let Expect::Status { len, context } = f.expect else {
                return Err(violation(
                    "block status in the reply to a request other than block status",
                ));
            };
            if length > MAX_STATUS_CHUNK {
                return Err(violation(format!("a block status chunk of {length} bytes")));
            }
            let payload = rd.read_vec(length as usize).await?;
            let (id, descriptors) =
                codec::parse_block_status_chunk(&payload).map_err(|e| violation(e.to_string()))?;
            if id == context {
                if f.extents.is_some() {
                    return Err(violation("two block status chunks for base:allocation"));
                }
                f.extents = Some(extents(&descriptors, len));
            }
        }
        t if t & 0x8000 != 0 => {
            // Every error chunk, known or not, starts with error and message.
            if !(6..=MAX_ERROR_CHUNK).contains(&length) {
                return Err(violation(format!("an error chunk of {length} bytes")));
            }
            let payload = rd.read_vec(length as usize).await?;
            let (e, message) =
                codec::parse_error_chunk(&payload).map_err(|e| violation(e.to_string()))?;
            if t == reply::TYPE_ERROR_OFFSET {
                codec::parse_error_offset_chunk(&payload).map_err(|e| violation(e.to_string()))?;
            }
            f.record_error(Failed::Server {
                // The spec forbids 0 here; it must not read as success.
                errno: if e == 0 { errno::EIO } else { e },
                message: Some(message),
            });
        }
        t => return Err(violation(format!("unknown reply chunk type {t}"))),
    }
    Ok(())
}

/// Check that `[at, at + n)` lies within the request `[offset, offset + len)`; returns `at`
/// relative to the request.
fn within(at: u64, n: u64, offset: u64, len: u32) -> Result<u64, ReadStop> {
    let end = at.checked_add(n);
    if at < offset || end.is_none_or(|end| end > offset + u64::from(len)) {
        return Err(violation(format!(
            "a chunk for {n} bytes at offset {at}, outside the request ({len} bytes at {offset})"
        )));
    }
    Ok(at - offset)
}

/// `base:allocation` descriptors as extents, clipped to the `len` bytes asked for.
fn extents(descriptors: &[codec::BlockDescriptor], len: u32) -> Vec<Extent> {
    let mut left = u64::from(len);
    let mut out = Vec::with_capacity(descriptors.len());
    for d in descriptors {
        if left == 0 {
            break;
        }
        if d.length == 0 {
            continue;
        }
        let n = u64::from(d.length).min(left);
        left -= n;
        out.push(Extent {
            len: n,
            hole: d.flags & alloc_flags::HOLE != 0,
            zero: d.flags & alloc_flags::ZERO != 0,
        });
    }
    out
}

/// The read half with one buffer that replies are parsed from in place.
struct ReplyReader<R> {
    rd: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> ReplyReader<R> {
    /// Make at least `n` bytes available in the buffer.
    async fn fill(&mut self, n: usize) -> std::io::Result<()> {
        while self.buf.len() < n {
            let need = n - self.buf.len();
            if self.buf.capacity() - self.buf.len() < need.max(4096) {
                self.buf.reserve(need.max(READ_BUF));
            }
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    async fn header(&mut self) -> Result<ReplyHeader, ReadStop> {
        self.fill(4).await?;
        let n = codec::reply_header_len(&self.buf)
            .map_err(|e| violation(format!("reply header: {e}")))?
            .unwrap_or(codec::STRUCTURED_REPLY_LEN);
        self.fill(n).await?;
        match codec::decode_reply_header(&self.buf) {
            Ok(Some((h, n))) => {
                self.buf.advance(n);
                Ok(h)
            }
            Ok(None) => Err(violation("a truncated reply header")),
            Err(e) => Err(violation(format!("reply header: {e}"))),
        }
    }

    /// Fill `dest` from the stream: what is buffered first, then a large rest straight from the
    /// socket.
    async fn copy_to(&mut self, dest: &mut [u8]) -> std::io::Result<()> {
        let have = self.buf.len().min(dest.len());
        dest[..have].copy_from_slice(&self.buf[..have]);
        self.buf.advance(have);
        let rest = &mut dest[have..];
        if rest.len() >= DIRECT_READ_MIN {
            self.rd.read_exact(rest).await?;
        } else if !rest.is_empty() {
            self.fill(rest.len()).await?;
            rest.copy_from_slice(&self.buf[..rest.len()]);
            self.buf.advance(rest.len());
        }
        Ok(())
    }

    /// The next `len` bytes in a buffer of their own (not zeroed first, not shared with the
    /// connection's buffer, so a caller keeping it pins nothing else).
    async fn read_bytes(&mut self, len: usize) -> std::io::Result<Bytes> {
        let mut out = BytesMut::with_capacity(len);
        let have = self.buf.len().min(len);
        out.extend_from_slice(&self.buf[..have]);
        self.buf.advance(have);
        let rest = len - have;
        if rest >= DIRECT_READ_MIN {
            while out.len() < len {
                let want = len - out.len();
                if self.rd.read_buf(&mut (&mut out).limit(want)).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        } else if rest > 0 {
            self.fill(rest).await?;
            out.extend_from_slice(&self.buf[..rest]);
            self.buf.advance(rest);
        }
        Ok(out.freeze())
    }

    async fn read_vec(&mut self, len: usize) -> std::io::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.copy_to(&mut v).await?;
        Ok(v)
    }

    async fn skip(&mut self, mut n: usize) -> std::io::Result<()> {
        loop {
            let k = self.buf.len().min(n);
            self.buf.advance(k);
            n -= k;
            if n == 0 {
                return Ok(());
            }
            self.fill(n.min(READ_BUF)).await?;
        }
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

// ---------------------------------------------------------------------------------------------
// URIs

/// Opens `nbd://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH` (the NBD project's URI
/// standard; the export is the path after the first `/`, and may be empty for the server's
/// default). Query keys: `timeout=SECONDS` (per-call time limit), `connect_timeout=SECONDS`, and
/// `socket=` for `nbd+unix`. Register it for both schemes.
#[derive(Debug, Clone, Default)]
pub struct NbdOpener {
    options: ClientOptions,
}

impl NbdOpener {
    /// An opener whose connections start from `options` (URI keys override them).
    pub fn new(options: ClientOptions) -> NbdOpener {
        NbdOpener { options }
    }

    /// The target, export and options `uri` names, consuming its query keys.
    pub fn parse(&self, uri: &mut DeviceUri) -> Result<(Target, String, ClientOptions)> {
        let target = match uri.scheme.as_str() {
            "nbd" => Target::Tcp(tcp_address(&uri.authority).map_err(|why| uri.invalid(&why))?),
            "nbd+unix" => {
                if !uri.authority.is_empty() {
                    return Err(uri.invalid(
                        "nbd+unix URIs name no host: nbd+unix:///EXPORT?socket=/path/to.sock",
                    ));
                }
                match uri.take("socket") {
                    Some(s) if !s.is_empty() => Target::Unix(PathBuf::from(s)),
                    _ => {
                        return Err(uri.invalid(
                            "socket= is required, e.g. nbd+unix:///EXPORT?socket=/run/nbd.sock",
                        ))
                    }
                }
            }
            other => {
                return Err(uri.invalid(&format!(
                    "the NBD client opens nbd:// and nbd+unix:// URIs, not {other}://"
                )))
            }
        };
        let export = uri.path.strip_prefix('/').unwrap_or(&uri.path).to_string();
        let mut options = self.options.clone();
        if let Some(t) = take_seconds(uri, "timeout")? {
            options.request_timeout = Some(t);
        }
        if let Some(t) = take_seconds(uri, "connect_timeout")? {
            options.connect_timeout = t;
        }
        let known: &[&str] = if matches!(target, Target::Unix(_)) {
            &["socket", "timeout", "connect_timeout"]
        } else {
            &["timeout", "connect_timeout"]
        };
        uri.finish(known)?;
        Ok((target, export, options))
    }
}

#[async_trait]
impl Opener for NbdOpener {
    async fn open(&self, mut uri: DeviceUri) -> Result<Arc<dyn BlockDevice>> {
        let (target, export, options) = self.parse(&mut uri)?;
        Ok(Arc::new(
            NbdDevice::connect(&target, &export, &options).await?,
        ))
    }
}

fn take_seconds(uri: &mut DeviceUri, key: &str) -> Result<Option<Duration>> {
    let Some(v) = uri.take(key) else {
        return Ok(None);
    };
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .map(Some)
        .ok_or_else(|| {
            uri.invalid(&format!(
                "{key}={v:?}: expected a number of seconds above 0"
            ))
        })
}

/// `host:port` from a URI authority: the host defaults to localhost, the port to 10809; IPv6
/// addresses are written in brackets.
fn tcp_address(authority: &str) -> std::result::Result<String, String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address misses its closing ]")?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or("expected :PORT after the IPv6 address")?,
            ),
        };
        (format!("[{h}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err(
                    "write IPv6 addresses in brackets, e.g. nbd://[::1]:10809/EXPORT".into(),
                )
            }
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("port {p:?} is not a number from 0 to 65535"))?,
    };
    let host = if host.is_empty() {
        "localhost".to_string()
    } else {
        host
    };
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    /// A scripted server on the other end of an in-memory stream.
    struct Peer {
        s: DuplexStream,
    }

    impl Peer {
        async fn greet(&mut self, flags: u16) {
            let mut b = BytesMut::new();
            codec::encode_greeting(&mut b, flags);
            self.s.write_all(&b).await.unwrap();
            let client_flags = self.s.read_u32().await.unwrap();
            assert_eq!(
                client_flags & !(codec::client_flags::FIXED_NEWSTYLE | u32::from(flags)),
                0,
                "the client sets only flags the server offered"
            );
        }

        async fn option(&mut self) -> (u32, Vec<u8>) {
            let mut h = [0u8; codec::OPTION_HEADER_LEN];
            self.s.read_exact(&mut h).await.unwrap();
            let h = codec::decode_option_header(&h).unwrap();
            let mut d = vec![0u8; h.len as usize];
            self.s.read_exact(&mut d).await.unwrap();
            (h.option, d)
        }

        async fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
            let mut b = BytesMut::new();
            codec::encode_option_reply(&mut b, option, reply_type, data);
            self.s.write_all(&b).await.unwrap();
        }

        /// Answer the usual negotiation: structured replies (or not), base:allocation with id 5,
        /// and GO with `flags`.
        async fn accept(&mut self, structured: bool, flags: u16, size: u64) {
            use codec::handshake_flags::{FIXED_NEWSTYLE, NO_ZEROES};
            self.greet(FIXED_NEWSTYLE | NO_ZEROES).await;
            assert_eq!(self.option().await.0, opt::STRUCTURED_REPLY);
            if structured {
                self.reply(opt::STRUCTURED_REPLY, rep::ACK, &[]).await;
                let (o, d) = self.option().await;
                assert_eq!(o, opt::SET_META_CONTEXT);
                let req = codec::parse_option(o, &d).unwrap();
                assert!(matches!(req, codec::ClientOption::SetMetaContext(r)
                    if r.export == "exp" && r.queries == [codec::BASE_ALLOCATION]));
                let d = codec::encode_rep_meta_context(5, codec::BASE_ALLOCATION);
                self.reply(o, rep::META_CONTEXT, &d).await;
                self.reply(o, rep::ACK, &[]).await;
            } else {
                self.reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, b"no")
                    .await;
            }
            let (o, d) = self.option().await;
            assert_eq!(o, opt::GO);
            let Ok(codec::ClientOption::Go(go)) = codec::parse_option(o, &d) else {
                panic!("GO expected");
            };
            assert_eq!(go.name, "exp");
            assert!(go.requests.contains(&info::BLOCK_SIZE));
            let d = codec::encode_info_export(size, flags | tx_flags::HAS_FLAGS);
            self.reply(o, rep::INFO, &d).await;
            self.reply(o, rep::ACK, &[]).await;
        }

        async fn request(&mut self) -> (Request, Vec<u8>) {
            let mut h = [0u8; codec::REQUEST_LEN];
            self.s.read_exact(&mut h).await.unwrap();
            let r = codec::decode_request(&h).unwrap();
            let mut payload = Vec::new();
            if r.command == cmd::WRITE {
                payload = vec![0u8; r.length as usize];
                self.s.read_exact(&mut payload).await.unwrap();
            }
            (r, payload)
        }

        async fn send(&mut self, b: &[u8]) {
            self.s.write_all(b).await.unwrap();
        }
    }

    const ALL: u16 = tx_flags::SEND_FLUSH
        | tx_flags::SEND_FUA
        | tx_flags::SEND_TRIM
        | tx_flags::SEND_WRITE_ZEROES
        | tx_flags::SEND_FAST_ZERO
        | tx_flags::SEND_CACHE;

    async fn pair(structured: bool, flags: u16, options: ClientOptions) -> (NbdDevice, Peer) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut peer = Peer { s: b };
        let (dev, ()) = tokio::join!(
            NbdDevice::connect_stream(a, "test", "exp", &options),
            peer.accept(structured, flags, 1 << 20)
        );
        (dev.unwrap(), peer)
    }

    fn simple(cookie: u64, error: u32) -> BytesMut {
        let mut b = BytesMut::new();
        codec::encode_simple_reply(&mut b, error, cookie);
        b
    }

    fn data_chunk(cookie: u64, done: bool, offset: u64, data: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        let flags = if done { reply::FLAG_DONE } else { 0 };
        let len = 8 + data.len() as u32;
        codec::encode_chunk_header(&mut b, flags, reply::TYPE_OFFSET_DATA, cookie, len);
        b.put_u64(offset);
        b.put_slice(data);
        b
    }

    fn hole_chunk(cookie: u64, offset: u64, size: u32) -> BytesMut {
        let mut b = BytesMut::new();
        codec::encode_chunk_header(&mut b, 0, reply::TYPE_OFFSET_HOLE, cookie, 12);
        b.put_u64(offset);
        b.put_u32(size);
        b
    }

    fn none_chunk(cookie: u64) -> BytesMut {
        let mut b = BytesMut::new();
        codec::encode_chunk_header(&mut b, reply::FLAG_DONE, reply::TYPE_NONE, cookie, 0);
        b
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    const LIMIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn chunks_are_assembled_and_demultiplexed_by_cookie() {
        let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
        assert!(dev.structured_replies());
        assert!(dev.capabilities().block_status);
        let client = async { tokio::join!(dev.read_at(0, 16384), dev.read_at(65536, 4096)) };
        let server = async {
            let mut reqs = [p.request().await.0, p.request().await.0];
            reqs.sort_by_key(|r| r.offset);
            let (first, second) = (reqs[0], reqs[1]);
            // The second request is answered first, in one chunk.
            p.send(&data_chunk(second.cookie, true, 65536, &pattern(9, 4096)))
                .await;
            // The first in four chunks, out of order: hole, data, data, none.
            p.send(&hole_chunk(first.cookie, 4096, 4096)).await;
            p.send(&data_chunk(first.cookie, false, 8192, &pattern(2, 8192)))
                .await;
            p.send(&data_chunk(first.cookie, false, 0, &pattern(1, 4096)))
                .await;
            p.send(&none_chunk(first.cookie)).await;
        };
        let ((a, b), ()) = tokio::join!(client, server);
        let a = a.unwrap();
        assert_eq!(a[..4096], pattern(1, 4096)[..]);
        assert!(a[4096..8192].iter().all(|&x| x == 0));
        assert_eq!(a[8192..], pattern(2, 8192)[..]);
        assert_eq!(b.unwrap()[..], pattern(9, 4096)[..]);
    }

    #[tokio::test]
    async fn error_chunks_carry_the_servers_message() {
        let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
        let server = async {
            let (r, _) = p.request().await;
            p.send(&data_chunk(r.cookie, false, 0, &pattern(1, 4096)))
                .await;
            let mut b = BytesMut::new();
            codec::encode_chunk_header(&mut b, 0, reply::TYPE_ERROR_OFFSET, r.cookie, 6 + 9 + 8);
            b.put_u32(errno::EIO);
            b.put_u16(9);
            b.put_slice(b"bad block");
            b.put_u64(4096);
            p.send(&b).await;
            p.send(&none_chunk(r.cookie)).await;
            // An unknown error chunk type fails the request but keeps the connection.
            let (r, _) = p.request().await;
            let mut b = BytesMut::new();
            codec::encode_chunk_header(&mut b, reply::FLAG_DONE, 0x8000 + 77, r.cookie, 6 + 4);
            b.put_u32(errno::ENOSPC);
            b.put_u16(4);
            b.put_slice(b"full");
            p.send(&b).await;
            let (r, _) = p.request().await;
            p.send(&simple(r.cookie, 0)).await;
        };
        let client = async {
            let e = dev.read_at(0, 8192).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io);
            assert!(e.to_string().contains("EIO: bad block"), "{e}");
            let e = dev
                .write_at(0, Bytes::from(pattern(0, 512)), WriteOpts::default())
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::NoSpace);
            assert!(e.to_string().contains("ENOSPC: full"), "{e}");
            dev.flush().await.unwrap();
        };
        tokio::join!(client, server);
    }

    #[tokio::test]
    async fn a_short_read_fails_alone() {
        let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
        let server = async {
            let (r, _) = p.request().await;
            p.send(&data_chunk(r.cookie, true, 0, &pattern(1, 2048)))
                .await;
            let (r, _) = p.request().await;
            p.send(&data_chunk(r.cookie, true, 0, &pattern(3, 4096)))
                .await;
        };
        let client = async {
            let e = dev.read_at(0, 4096).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io);
            assert!(e.to_string().contains("2048 of the 4096"), "{e}");
            assert_eq!(
                dev.read_at(0, 4096).await.unwrap()[..],
                pattern(3, 4096)[..]
            );
        };
        tokio::join!(client, server);
        assert!(dev.is_connected());
    }

    /// Each of these breaks the connection: every request in flight and every later one fails
    /// with Io, saying the connection was lost, and nothing hangs.
    #[tokio::test]
    async fn protocol_violations_fail_everything_in_flight() {
        type Bad = fn(&[Request]) -> BytesMut;
        let cases: Vec<(&str, Bad)> = vec![
            ("unknown cookie", |_| simple(999, 0)),
            ("bad magic", |_| {
                BytesMut::from(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..])
            }),
            ("data outside the request", |r| {
                data_chunk(r[0].cookie, true, r[0].offset + 4096, &[1; 4096])
            }),
            ("unknown chunk type", |r| {
                let mut b = BytesMut::new();
                codec::encode_chunk_header(&mut b, reply::FLAG_DONE, 77, r[0].cookie, 0);
                b
            }),
            ("overlapping chunks", |r| {
                let mut b = data_chunk(r[0].cookie, false, r[0].offset, &[1; 2048]);
                b.extend_from_slice(&data_chunk(
                    r[0].cookie,
                    true,
                    r[0].offset + 1024,
                    &[1; 2048],
                ));
                b
            }),
            ("NONE without DONE", |r| {
                let mut b = BytesMut::new();
                codec::encode_chunk_header(&mut b, 0, reply::TYPE_NONE, r[0].cookie, 0);
                b
            }),
            ("truncated by EOF", |r| {
                let mut b = data_chunk(r[0].cookie, true, r[0].offset, &[1; 4096]);
                b.truncate(100);
                b
            }),
        ];
        for (name, bad) in cases {
            let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
            let server = async {
                let mut reqs = Vec::new();
                for _ in 0..3 {
                    reqs.push(p.request().await.0);
                }
                p.send(&bad(&reqs)).await;
                // Hang up (the EOF case needs it; for the others the client already did).
                drop(p);
            };
            let client = async {
                tokio::join!(
                    dev.read_at(0, 4096),
                    dev.read_at(8192, 4096),
                    dev.read_at(16384, 4096)
                )
            };
            let ((a, b, c), ()) =
                tokio::time::timeout(LIMIT, async { tokio::join!(client, server) })
                    .await
                    .unwrap_or_else(|_| panic!("{name}: requests hung"));
            for r in [a, b, c] {
                let e = r.unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Io, "{name}: {e}");
                assert!(
                    e.to_string().contains("connection to test/exp was lost"),
                    "{name}: {e}"
                );
            }
            let e = tokio::time::timeout(LIMIT, dev.flush())
                .await
                .unwrap()
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io, "{name}: {e}");
            assert!(e.to_string().contains("was lost"), "{name}: {e}");
            assert!(!dev.is_connected());
        }
    }

    #[tokio::test]
    async fn eshutdown_makes_a_soft_disconnect() {
        let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
        let server = async {
            let (r, _) = p.request().await;
            let mut b = BytesMut::new();
            codec::encode_error_chunk(&mut b, r.cookie, errno::ESHUTDOWN, "going away");
            p.send(&b).await;
            let (r, _) = p.request().await;
            assert_eq!(r.command, cmd::DISC, "the client says goodbye");
            drop(p);
        };
        let client = async {
            let e = dev.read_at(0, 4096).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Shutdown, "{e}");
        };
        tokio::time::timeout(LIMIT, async { tokio::join!(client, server) })
            .await
            .unwrap();
        let e = dev.read_at(0, 4096).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Shutdown, "{e}");
    }

    #[tokio::test]
    async fn a_timed_out_request_leaves_the_connection_usable() {
        let options = ClientOptions {
            request_timeout: Some(Duration::from_millis(100)),
            ..ClientOptions::default()
        };
        let (dev, mut p) = pair(true, ALL, options).await;
        let (e, (late, _)) = tokio::join!(dev.read_at(0, 4096), p.request());
        let e = e.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        let server = async {
            let (r, _) = p.request().await;
            // The late reply is read and dropped; then the second request's reply.
            p.send(&data_chunk(late.cookie, true, 0, &pattern(1, 4096)))
                .await;
            p.send(&data_chunk(r.cookie, true, 4096, &pattern(2, 4096)))
                .await;
        };
        let (r, ()) = tokio::join!(dev.read_at(4096, 4096), server);
        assert_eq!(r.unwrap()[..], pattern(2, 4096)[..]);
        assert!(dev.is_connected());
    }

    #[tokio::test]
    async fn simple_replies_when_the_server_has_no_structured_replies() {
        let flags = tx_flags::SEND_FLUSH | tx_flags::SEND_WRITE_ZEROES;
        let (dev, mut p) = pair(false, flags, ClientOptions::default()).await;
        assert!(!dev.structured_replies());
        let caps = dev.capabilities();
        assert!(!caps.block_status && !caps.fua && !caps.trim && !caps.fast_zero);
        // No meta context: block status is answered locally as all data.
        assert_eq!(
            dev.block_status(0, 8192).await.unwrap(),
            vec![Extent::data(8192)]
        );
        let server = async {
            let (r, _) = p.request().await;
            assert_eq!(r.command, cmd::READ);
            let mut b = simple(r.cookie, 0);
            b.extend_from_slice(&pattern(4, 100_000));
            p.send(&b).await;
            // A FUA write without SEND_FUA: a write, then a flush.
            let (r, data) = p.request().await;
            assert_eq!((r.command, r.flags), (cmd::WRITE, 0));
            assert_eq!(data, pattern(5, 4096));
            p.send(&simple(r.cookie, 0)).await;
            let (r, _) = p.request().await;
            assert_eq!(r.command, cmd::FLUSH);
            p.send(&simple(r.cookie, errno::ENOSPC)).await;
        };
        let client = async {
            assert_eq!(
                dev.read_at(0, 100_000).await.unwrap()[..],
                pattern(4, 100_000)[..]
            );
            let e = dev
                .write_at(0, Bytes::from(pattern(5, 4096)), WriteOpts { fua: true })
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
            // Without the server's support these fail at once, sending nothing.
            let fast = ZeroOpts {
                fast_only: true,
                ..ZeroOpts::default()
            };
            assert_eq!(
                dev.write_zeroes(0, 4096, fast).await.unwrap_err().kind(),
                ErrorKind::Unsupported
            );
            assert_eq!(
                dev.trim(0, 4096, WriteOpts::default())
                    .await
                    .unwrap_err()
                    .kind(),
                ErrorKind::Unsupported
            );
        };
        tokio::join!(client, server);
    }

    #[tokio::test]
    async fn write_zeroes_flags_and_emulation() {
        let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
        let server = async {
            for want in [cmd_flags::NO_HOLE, cmd_flags::FAST_ZERO | cmd_flags::FUA] {
                let (r, _) = p.request().await;
                assert_eq!((r.command, r.flags), (cmd::WRITE_ZEROES, want));
                p.send(&none_chunk(r.cookie)).await;
            }
        };
        let client = async {
            dev.write_zeroes(0, 4096, ZeroOpts::default())
                .await
                .unwrap();
            let opts = ZeroOpts {
                fua: true,
                may_trim: true,
                fast_only: true,
            };
            dev.write_zeroes(0, 4096, opts).await.unwrap();
        };
        tokio::join!(client, server);

        // A server without WRITE_ZEROES gets writes of zeroes.
        let (dev, mut p) = pair(true, tx_flags::SEND_FLUSH, ClientOptions::default()).await;
        let server = async {
            let (r, data) = p.request().await;
            assert_eq!((r.command, r.length), (cmd::WRITE, 8192));
            assert!(data.iter().all(|&b| b == 0));
            p.send(&none_chunk(r.cookie)).await;
        };
        let (r, ()) = tokio::join!(dev.write_zeroes(0, 8192, ZeroOpts::default()), server);
        r.unwrap();
    }

    #[tokio::test]
    async fn go_unsupported_falls_back_to_export_name() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut p = Peer { s: b };
        let server = async {
            // No NO_ZEROES: the EXPORT_NAME reply carries 124 zero bytes.
            p.greet(codec::handshake_flags::FIXED_NEWSTYLE).await;
            assert_eq!(p.option().await.0, opt::STRUCTURED_REPLY);
            p.reply(opt::STRUCTURED_REPLY, rep::ACK, &[]).await;
            assert_eq!(p.option().await.0, opt::SET_META_CONTEXT);
            p.reply(opt::SET_META_CONTEXT, rep::ACK, &[]).await;
            assert_eq!(p.option().await.0, opt::GO);
            p.reply(opt::GO, rep::ERR_UNSUP, &[]).await;
            assert_eq!(p.option().await, (opt::EXPORT_NAME, b"exp".to_vec()));
            let mut b = BytesMut::new();
            codec::encode_export_name_reply(
                &mut b,
                65536,
                tx_flags::HAS_FLAGS | tx_flags::READ_ONLY,
                false,
            );
            p.send(&b).await;
            let (r, _) = p.request().await;
            p.send(&data_chunk(r.cookie, true, 0, &pattern(7, 512)))
                .await;
        };
        let client = async {
            let dev = NbdDevice::connect_stream(a, "old", "exp", &ClientOptions::default())
                .await
                .unwrap();
            assert_eq!(dev.geometry().size, 65536);
            assert!(dev.capabilities().read_only);
            assert!(!dev.capabilities().block_status);
            assert_eq!(dev.read_at(0, 512).await.unwrap()[..], pattern(7, 512)[..]);
            assert_eq!(
                dev.write_at(0, Bytes::from_static(b"x"), WriteOpts::default())
                    .await
                    .unwrap_err()
                    .kind(),
                ErrorKind::PermissionDenied
            );
        };
        tokio::join!(client, server);
    }

    #[tokio::test]
    async fn negotiation_errors_are_clear() {
        // TLS required.
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut p = Peer { s: b };
        let server = async {
            p.greet(codec::handshake_flags::FIXED_NEWSTYLE).await;
            p.option().await;
            p.reply(opt::STRUCTURED_REPLY, rep::ERR_TLS_REQD, b"use STARTTLS")
                .await;
        };
        let options = ClientOptions::default();
        let (r, ()) = tokio::join!(
            NbdDevice::connect_stream(a, "secure", "exp", &options),
            server
        );
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("requires TLS"), "{e}");

        // No fixed newstyle.
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut p = Peer { s: b };
        let mut g = BytesMut::new();
        codec::encode_greeting(&mut g, 0);
        p.send(&g).await;
        let e = NbdDevice::connect_stream(a, "old", "exp", &ClientOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("fixed newstyle"), "{e}");

        // A server that never answers: the connect time limit.
        let (a, _b) = tokio::io::duplex(1 << 16);
        let options = ClientOptions {
            connect_timeout: Duration::from_millis(50),
            ..ClientOptions::default()
        };
        let e = NbdDevice::connect_stream(a, "mute", "exp", &options)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn drop_and_close_send_disc() {
        let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
        drop(dev);
        let (r, _) = p.request().await;
        assert_eq!(r.command, cmd::DISC);
        let mut rest = Vec::new();
        p.s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing follows NBD_CMD_DISC");

        let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
        let conn = dev.conn.clone();
        let (_, (r, _)) = tokio::join!(dev.close(), p.request());
        assert_eq!(r.command, cmd::DISC);
        assert!(
            conn.dead.is_cancelled(),
            "close returns once the tasks are done"
        );
        assert_eq!(
            Arc::strong_count(&conn),
            1,
            "the tasks let go of the connection"
        );
    }

    #[tokio::test]
    async fn block_status_is_clipped_and_filtered_by_context() {
        let (dev, mut p) = pair(true, ALL, ClientOptions::default()).await;
        let server = async {
            let (r, _) = p.request().await;
            assert_eq!((r.command, r.length), (cmd::BLOCK_STATUS, 16384));
            for (id, extents) in [
                (9u32, vec![(16384u32, 0u32)]),
                (5, vec![(4096, 0), (65536, 3)]),
            ] {
                let mut b = BytesMut::new();
                let len = 4 + 8 * extents.len() as u32;
                let flags = if id == 5 { reply::FLAG_DONE } else { 0 };
                codec::encode_chunk_header(&mut b, flags, reply::TYPE_BLOCK_STATUS, r.cookie, len);
                b.put_u32(id);
                for (l, f) in extents {
                    b.put_u32(l);
                    b.put_u32(f);
                }
                p.send(&b).await;
            }
        };
        let (r, ()) = tokio::join!(dev.block_status(0, 16384), server);
        assert_eq!(
            r.unwrap(),
            vec![Extent::data(4096), Extent::hole(12288)],
            "the last extent is clipped to the request; context 9 is ignored"
        );
    }

    #[test]
    fn tcp_addresses() {
        assert_eq!(tcp_address("").unwrap(), "localhost:10809");
        assert_eq!(tcp_address("h").unwrap(), "h:10809");
        assert_eq!(tcp_address("h:99").unwrap(), "h:99");
        assert_eq!(tcp_address("h:").unwrap(), "h:10809");
        assert_eq!(tcp_address("[::1]").unwrap(), "[::1]:10809");
        assert_eq!(tcp_address("[::1]:7").unwrap(), "[::1]:7");
        assert!(tcp_address("::1").is_err());
        assert!(tcp_address("h:99999").is_err());
        assert!(tcp_address("[::1").is_err());
        assert!(tcp_address("[::1]x").is_err());
    }

    #[test]
    fn uris() {
        let opener = NbdOpener::default();
        let parse = |s: &str| opener.parse(&mut DeviceUri::parse(s).unwrap());

        let (t, e, o) = parse("nbd://example.com/disk%201?timeout=2.5").unwrap();
        assert_eq!(t, Target::Tcp("example.com:10809".into()));
        assert_eq!(e, "disk 1");
        assert_eq!(o.request_timeout, Some(Duration::from_millis(2500)));

        let (t, e, o) = parse("nbd://10.0.0.1:5000/").unwrap();
        assert_eq!(t, Target::Tcp("10.0.0.1:5000".into()));
        assert_eq!(e, "");
        assert_eq!(o, ClientOptions::default());

        let (t, e, _) = parse("nbd://host").unwrap();
        assert_eq!((t, e.as_str()), (Target::Tcp("host:10809".into()), ""));

        // Only the first slash separates: the rest belongs to the export name.
        let (_, e, _) = parse("nbd://host//a/b").unwrap();
        assert_eq!(e, "/a/b");

        let (t, e, o) = parse("nbd+unix:///exp?socket=/run/s.sock&connect_timeout=1").unwrap();
        assert_eq!(t, Target::Unix("/run/s.sock".into()));
        assert_eq!(e, "exp");
        assert_eq!(o.connect_timeout, Duration::from_secs(1));

        let err = |s: &str| parse(s).unwrap_err().to_string();
        assert!(err("nbd+unix:///exp").contains("socket= is required"));
        assert!(err("nbd+unix://host/exp?socket=/s").contains("no host"));
        assert!(err("nbd://h/exp?socket=/s").contains("unknown option \"socket\""));
        assert!(err("nbd://h/exp?tls=1").contains("unknown option \"tls\""));
        assert!(err("nbd://h/exp?timeout=0").contains("timeout"));
        assert!(err("nbd://h/exp?timeout=soon").contains("timeout"));
        assert!(err("nbds://h/exp").contains("not nbds://"));
    }
}
