//! What the protocol targets do alike on their sockets: messages queued as parts (a header, the
//! device's data without a copy, a digest, …) and written in as few vectored writes as the
//! socket takes, by the one task that owns the connection.
//!
//! ```text
//!  push(frame) ─► Outbox: [frame][frame][frame…]  ─► poll_send ─► socket (writev, then flush)
//!                           ▲ `written` bytes of the first one are out
//!                           └─ each frame written whole is handed back to the caller
//! ```

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffers gathered into one vectored write at most.
pub const MAX_SLICES: usize = 64;

/// A message queued for writing: parts that go out back to back.
pub trait Frame {
    /// The parts, in order; empty ones are skipped.
    fn parts(&self) -> &[Bytes];

    /// Bytes of all the parts.
    fn len(&self) -> usize {
        self.parts().iter().map(Bytes::len).sum()
    }

    /// Whether the frame has no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The messages waiting to go out on one connection, in order, and how far the first one got.
#[derive(Debug)]
pub struct Outbox<F> {
    frames: VecDeque<F>,
    /// Bytes of the first frame already written.
    written: usize,
    /// The socket takes vectored writes (else one part a write).
    vectored: bool,
    /// Bytes were written since the last flush.
    unflushed: bool,
}

impl<F: Frame> Outbox<F> {
    /// An empty outbox for a socket that does (or does not) take vectored writes well.
    pub fn new(vectored: bool) -> Outbox<F> {
        Outbox {
            frames: VecDeque::new(),
            written: 0,
            vectored,
            unflushed: false,
        }
    }

    /// Queue `frame` behind the others.
    pub fn push(&mut self, frame: F) {
        self.frames.push_back(frame);
    }

    /// Frames queued (a partly written one counts).
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Nothing is queued and everything written has been flushed.
    pub fn is_idle(&self) -> bool {
        self.frames.is_empty() && !self.unflushed
    }

    /// Give up on the socket: take every frame queued, a partly written one too, and forget
    /// what is unflushed.
    pub fn take_all(&mut self) -> VecDeque<F> {
        self.written = 0;
        self.unflushed = false;
        std::mem::take(&mut self.frames)
    }

    /// Write what the socket takes now, and flush once everything queued is written. Each
    /// frame written whole is handed to `sent`. `Ok(true)`: bytes were written.
    pub fn poll_send<W>(
        &mut self,
        stream: &mut W,
        cx: &mut Context<'_>,
        sent: impl FnMut(F),
    ) -> std::io::Result<bool>
    where
        W: AsyncWrite + Unpin,
    {
        let mut progress = false;
        if !self.frames.is_empty() {
            match self.poll_write(stream, cx, sent) {
                Poll::Ready(Ok(())) => progress = true,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        if self.frames.is_empty() && self.unflushed {
            match Pin::new(stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        Ok(progress)
    }

    /// One (vectored) write of the frames queued.
    fn poll_write<W>(
        &mut self,
        stream: &mut W,
        cx: &mut Context<'_>,
        mut sent: impl FnMut(F),
    ) -> Poll<std::io::Result<()>>
    where
        W: AsyncWrite + Unpin,
    {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut n = 0;
        let mut skip = self.written;
        'frames: for f in &self.frames {
            for part in f.parts() {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                slices[n] = IoSlice::new(&part[skip..]);
                n += 1;
                skip = 0;
                if n == MAX_SLICES || !self.vectored {
                    break 'frames;
                }
            }
        }
        let result = if self.vectored {
            Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..n])
        } else {
            Pin::new(&mut *stream).poll_write(cx, &slices[0])
        };
        let mut wrote = match result {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(w)) => w,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        self.unflushed = true;
        while let Some(front) = self.frames.front() {
            let left = front.len() - self.written;
            if wrote < left {
                self.written += wrote;
                break;
            }
            wrote -= left;
            self.written = 0;
            if let Some(done) = self.frames.pop_front() {
                sent(done);
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Shut the write side of `stream` down at the end of a connection; a peer that is gone
/// already is no error.
pub async fn shutdown<W: AsyncWrite + Unpin>(stream: &mut W) -> std::io::Result<()> {
    match poll_fn(|cx| Pin::new(&mut *stream).poll_shutdown(cx)).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

/// Read what `stream` has, at most `limit` bytes, into the spare capacity of `buf`, which
/// grows by at least `grow` bytes when less than `limit` is spare: the bytes land once, where a
/// target's framing splits payloads off without copying them. `Ready(Ok(0))` is the end of the
/// stream (or a `limit` of 0).
pub fn poll_read_buf<S: AsyncRead + Unpin>(
    stream: &mut S,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    limit: usize,
    grow: usize,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() - buf.len() < limit {
        buf.reserve(limit.max(grow));
    }
    let spare = &mut buf.spare_capacity_mut()[..limit];
    let mut rb = ReadBuf::uninit(spare);
    match Pin::new(stream).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => {
            let n = rb.filled().len();
            // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + n) };
            Poll::Ready(Ok(n))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::task::Waker;

    struct Parts([Bytes; 2]);

    impl Frame for Parts {
        fn parts(&self) -> &[Bytes] {
            &self.0
        }
    }

    /// A socket that takes at most `room` bytes a write and records them.
    struct Trickle {
        room: usize,
        got: Vec<u8>,
        writes: usize,
        flushes: usize,
    }

    impl Trickle {
        fn new(room: usize) -> Trickle {
            Trickle {
                room,
                got: Vec::new(),
                writes: 0,
                flushes: 0,
            }
        }

        fn take(&mut self, bufs: &[IoSlice<'_>]) -> usize {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.room - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
            }
            self.writes += 1;
            n
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(self.take(&[IoSlice::new(buf)])))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(self.take(bufs)))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }
    }

    fn frame(a: &[u8], b: &[u8]) -> Parts {
        Parts([Bytes::copy_from_slice(a), Bytes::copy_from_slice(b)])
    }

    fn drain(vectored: bool, room: usize) -> (Trickle, Vec<usize>) {
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Outbox::new(vectored);
        out.push(frame(b"head1", b"data-one"));
        out.push(frame(b"h2", b""));
        out.push(frame(b"head3", b"three"));
        let mut sock = Trickle::new(room);
        let mut done = Vec::new();
        while !out.is_idle() {
            out.poll_send(&mut sock, &mut cx, |f| done.push(f.len()))
                .unwrap();
        }
        (sock, done)
    }

    #[test]
    fn every_byte_goes_out_once_in_order_and_frames_complete_in_order() {
        for vectored in [true, false] {
            for room in [1, 3, 7, 100] {
                let (sock, done) = drain(vectored, room);
                assert_eq!(sock.got, b"head1data-oneh2head3three", "{vectored} {room}");
                assert_eq!(done, vec![13, 2, 10]);
                assert_eq!(sock.flushes, 1, "one flush once all is written");
            }
        }
        // Vectored with room to spare: one write for everything.
        assert_eq!(drain(true, 100).0.writes, 1);
        // Not vectored: one part a write.
        assert_eq!(drain(false, 100).0.writes, 5);
    }

    #[test]
    fn giving_up_takes_a_partly_written_frame_too() {
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Outbox::new(true);
        out.push(frame(b"abc", b"def"));
        out.push(frame(b"g", b"h"));
        let mut sock = Trickle::new(2);
        assert!(out.poll_send(&mut sock, &mut cx, |_| {}).unwrap());
        assert_eq!(out.take_all().len(), 2);
        assert!(out.is_idle());
    }
}
