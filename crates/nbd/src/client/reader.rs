//! The reader task: parses replies (simple, or structured chunks, assembled per request) from
//! one buffer, in place, and completes each caller through its oneshot channel. Large read
//! payloads go from the socket straight into the buffer handed to the caller.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use strata_bdev::Extent;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::conn::{Conn, Done, Expect, Failed, InFlight, Outcome, Outgoing, ReadData};
use crate::codec::{self, alloc_flags, errno, reply, ReplyHeader};

/// The reader's buffer grows by this much at a time, so that one read syscall picks up many
/// small replies.
const READ_BUF: usize = 256 << 10;
/// Payload still to come beyond this size is read from the socket straight into its destination.
const DIRECT_READ_MIN: usize = 64 << 10;
/// Error chunks longer than this are a protocol violation (messages are at most 4096 bytes).
const MAX_ERROR_CHUNK: u32 = 1 << 16;
/// Block status chunks longer than this (2^21 extents) are a protocol violation.
const MAX_STATUS_CHUNK: u32 = 4 + 8 * (1 << 21);

pub(super) async fn reader_task<R>(conn: Arc<Conn>, r: R, disconnect: mpsc::WeakSender<Outgoing>)
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
