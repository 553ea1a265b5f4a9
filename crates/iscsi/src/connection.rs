//! One iSCSI connection's byte stream, framed into PDUs: a reader that parses headers from a
//! buffer and reads large data segments straight into their destination, and vectored writes
//! of header, data and digests without copying the data.

use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{
    self, check_data_digest, check_header_digest, decode_header, encode_head, encode_tail,
    frame_lengths, padding, CodecError, Digests, Frame, Header, Lengths, BHS_LEN, DIGEST_LEN,
};

/// The reader's buffer grows by this much at a time, so that one read picks up many small PDUs.
const READ_CHUNK: usize = 256 << 10;
/// Data still to come beyond this size is read from the socket straight into its destination.
const DIRECT_READ_MIN: usize = 32 << 10;

/// Why reading or writing PDUs failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the target closed the connection")]
    Closed,
    #[error("malformed PDU from the target: {0}")]
    Codec(#[from] CodecError),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// A parsed header and the lengths of what follows it.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub header: Header,
    pub lengths: Lengths,
}

/// Reads PDUs from a byte stream.
#[derive(Debug)]
pub struct PduReader<R> {
    inner: R,
    buf: BytesMut,
    /// Digests in force (they start after login).
    pub digests: Digests,
    /// The largest data segment accepted (what Strata declared as MaxRecvDataSegmentLength,
    /// or a login-time bound).
    pub max_data: u32,
}

impl<R: AsyncRead + Unpin> PduReader<R> {
    pub fn new(inner: R, max_data: u32) -> PduReader<R> {
        PduReader {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK),
            digests: Digests::default(),
            max_data,
        }
    }

    /// Make sure `n` bytes are buffered.
    async fn fill(&mut self, n: usize) -> Result<(), ConnError> {
        while self.buf.len() < n {
            if self.buf.capacity() - self.buf.len() < n - self.buf.len() {
                self.buf.reserve((n - self.buf.len()).max(READ_CHUNK));
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return Err(ConnError::Closed);
            }
        }
        Ok(())
    }

    /// Read the next header (BHS, AHS, header digest). Its data must be consumed next with
    /// [`read_data`](Self::read_data), [`read_data_into`](Self::read_data_into) or
    /// [`skip_data`](Self::skip_data).
    pub async fn read_head(&mut self) -> Result<Head, ConnError> {
        self.fill(BHS_LEN).await?;
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&self.buf[..BHS_LEN]);
        let lengths = frame_lengths(&bhs);
        if lengths.data > self.max_data as usize {
            return Err(CodecError::TooLong {
                len: lengths.data as u32,
                max: self.max_data,
            }
            .into());
        }
        let head_len = BHS_LEN + lengths.ahs;
        let with_digest = head_len + if self.digests.header { DIGEST_LEN } else { 0 };
        self.fill(with_digest).await?;
        if self.digests.header {
            let d = &self.buf[head_len..with_digest];
            check_header_digest(
                &self.buf[..head_len],
                u32::from_le_bytes([d[0], d[1], d[2], d[3]]),
            )?;
        }
        let header = decode_header(&bhs)?;
        self.buf.advance(with_digest);
        Ok(Head { header, lengths })
    }

    /// Bytes of the data segment on the wire after its data: padding and digest.
    fn trailer(&self, len: usize) -> usize {
        if len == 0 {
            0
        } else {
            padding(len) + if self.digests.data { DIGEST_LEN } else { 0 }
        }
    }

    /// Read a data segment of `len` bytes into `dst` (exactly `len` long), checking its digest.
    pub async fn read_data_into(&mut self, dst: &mut [u8]) -> Result<(), ConnError> {
        let len = dst.len();
        if len == 0 {
            return Ok(());
        }
        let trailer = self.trailer(len);
        let buffered = self.buf.len().min(len);
        dst[..buffered].copy_from_slice(&self.buf[..buffered]);
        self.buf.advance(buffered);
        let rest = len - buffered;
        if rest >= DIRECT_READ_MIN {
            self.inner
                .read_exact(&mut dst[buffered..])
                .await
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => ConnError::Closed,
                    _ => ConnError::Io(e),
                })?;
        } else if rest > 0 {
            self.fill(rest).await?;
            dst[buffered..].copy_from_slice(&self.buf[..rest]);
            self.buf.advance(rest);
        }
        self.fill(trailer).await?;
        if self.digests.data {
            let pad = padding(len);
            let d = &self.buf[pad..pad + DIGEST_LEN];
            let received = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
            let crc = codec::crc32c_append(codec::crc32c(dst), &self.buf[..pad]);
            if crc != received {
                // Checked the same way a whole buffer would be, for the same error.
                let mut padded = dst.to_vec();
                padded.extend_from_slice(&self.buf[..pad]);
                check_data_digest(&padded, received)?;
            }
        }
        self.buf.advance(trailer);
        Ok(())
    }

    /// Read a data segment of `len` bytes onto the end of `dst` (no zero-filling first),
    /// checking its digest.
    pub async fn read_data_append(
        &mut self,
        dst: &mut BytesMut,
        len: usize,
    ) -> Result<(), ConnError> {
        if len == 0 {
            return Ok(());
        }
        let start = dst.len();
        let buffered = self.buf.len().min(len);
        dst.extend_from_slice(&self.buf[..buffered]);
        self.buf.advance(buffered);
        let mut rest = len - buffered;
        if rest >= DIRECT_READ_MIN {
            dst.reserve(rest);
            while rest > 0 {
                let n = (&mut self.inner).take(rest as u64).read_buf(dst).await?;
                if n == 0 {
                    return Err(ConnError::Closed);
                }
                rest -= n;
            }
        } else if rest > 0 {
            self.fill(rest).await?;
            dst.extend_from_slice(&self.buf[..rest]);
            self.buf.advance(rest);
        }
        let trailer = self.trailer(len);
        self.fill(trailer).await?;
        if self.digests.data {
            let pad = padding(len);
            let d = &self.buf[pad..pad + DIGEST_LEN];
            let received = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
            let data = &dst[start..start + len];
            let crc = codec::crc32c_append(codec::crc32c(data), &self.buf[..pad]);
            if crc != received {
                let mut padded = data.to_vec();
                padded.extend_from_slice(&self.buf[..pad]);
                check_data_digest(&padded, received)?;
            }
        }
        self.buf.advance(trailer);
        Ok(())
    }

    /// Read a data segment of `len` bytes.
    pub async fn read_data(&mut self, len: usize) -> Result<Bytes, ConnError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let mut v = BytesMut::zeroed(len);
        self.read_data_into(&mut v).await?;
        Ok(v.freeze())
    }

    /// Read and drop a data segment of `len` bytes (checking its digest).
    pub async fn skip_data(&mut self, len: usize) -> Result<(), ConnError> {
        let mut left = len;
        // Digest checking needs the whole segment; keep memory bounded for a big one.
        if self.digests.data || left <= READ_CHUNK {
            self.read_data(len).await?;
            return Ok(());
        }
        while left > 0 {
            self.fill(1).await?;
            let n = self.buf.len().min(left);
            self.buf.advance(n);
            left -= n;
        }
        let trailer = self.trailer(len);
        self.fill(trailer).await?;
        self.buf.advance(trailer);
        Ok(())
    }

    /// Read a whole PDU (header and data).
    pub async fn read_frame(&mut self) -> Result<Frame, ConnError> {
        let head = self.read_head().await?;
        // AHS were consumed with the header; Strata's targets send none it needs.
        let data = self.read_data(head.lengths.data).await?;
        Ok(Frame::new(head.header, data))
    }

    /// The stream, for shutting it down.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// One PDU ready to be written: its head (BHS, header digest), its data (shared, not copied)
/// and its tail (padding, data digest).
#[derive(Debug, Clone)]
pub struct Encoded {
    head: Bytes,
    data: Bytes,
    tail: [u8; 8],
    tail_len: usize,
}

impl Encoded {
    /// Encode `header` with `data`.
    pub fn new(header: &Header, data: Bytes, digests: Digests) -> Encoded {
        let head = encode_head(header, &[], data.len(), digests).freeze();
        let (tail, tail_len) = encode_tail(&data, digests);
        Encoded {
            head,
            data,
            tail,
            tail_len,
        }
    }

    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.data.len() + self.tail_len
    }

    /// Whether it has no bytes (never: a PDU has a header).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Write `pdus` with as few system calls as the stream allows.
pub async fn write_pdus<W: AsyncWrite + Unpin>(w: &mut W, pdus: &[Encoded]) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(pdus.len() * 3);
    for p in pdus {
        parts.push(&p.head);
        if !p.data.is_empty() {
            parts.push(&p.data);
        }
        if p.tail_len > 0 {
            parts.push(&p.tail[..p.tail_len]);
        }
    }
    let mut first = 0;
    let mut offset = 0;
    while first < parts.len() {
        // At most IOV_MAX (1024) slices per call.
        let end = (first + 1024).min(parts.len());
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(end - first);
        slices.push(IoSlice::new(&parts[first][offset..]));
        for p in &parts[first + 1..end] {
            slices.push(IoSlice::new(p));
        }
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 && first < parts.len() {
            let left = parts[first].len() - offset;
            if n >= left {
                n -= left;
                first += 1;
                offset = 0;
            } else {
                offset += n;
                n = 0;
            }
        }
    }
    w.flush().await
}

/// Write one whole PDU.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
    digests: Digests,
) -> io::Result<()> {
    w.write_all(&codec::encode(frame, digests)).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{NopIn, RESERVED_TAG};

    fn nop(itt: u32) -> Header {
        Header::NopIn(NopIn {
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            stat_sn: 1,
            exp_cmd_sn: 2,
            max_cmd_sn: 3,
        })
    }

    #[tokio::test]
    async fn frames_cross_the_stream_with_and_without_digests() {
        for digests in [
            Digests::default(),
            Digests {
                header: true,
                data: true,
            },
        ] {
            let (a, b) = tokio::io::duplex(4096);
            let big = Bytes::from((0..200_000u32).map(|i| i as u8).collect::<Vec<u8>>());
            let pdus = vec![
                Encoded::new(&nop(1), Bytes::from_static(b"abc"), digests),
                Encoded::new(&nop(2), big.clone(), digests),
                Encoded::new(&nop(3), Bytes::new(), digests),
            ];
            let writer = tokio::spawn(async move {
                let mut a = a;
                write_pdus(&mut a, &pdus).await.unwrap();
                a
            });
            let mut r = PduReader::new(b, 1 << 20);
            r.digests = digests;
            let f = r.read_frame().await.unwrap();
            assert_eq!((f.header.itt(), &f.data[..]), (1, &b"abc"[..]));
            let h = r.read_head().await.unwrap();
            assert_eq!(h.header.itt(), 2);
            let mut dst = vec![0u8; h.lengths.data];
            r.read_data_into(&mut dst).await.unwrap();
            assert_eq!(dst, big);
            let f = r.read_frame().await.unwrap();
            assert_eq!((f.header.itt(), f.data.len()), (3, 0));
            drop(writer.await.unwrap());
            assert!(matches!(r.read_head().await, Err(ConnError::Closed)));
        }
    }

    #[tokio::test]
    async fn a_bad_data_digest_is_an_error() {
        let digests = Digests {
            header: true,
            data: true,
        };
        let mut wire = codec::encode(&Frame::new(nop(1), Bytes::from(vec![7u8; 100])), digests);
        let n = wire.len();
        wire[n - 1] ^= 1;
        let mut r = PduReader::new(&wire[..], 1 << 20);
        r.digests = digests;
        assert!(matches!(
            r.read_frame().await,
            Err(ConnError::Codec(CodecError::DataDigest { .. }))
        ));
    }
}
