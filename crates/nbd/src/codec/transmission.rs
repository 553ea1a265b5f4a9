//! Transmission: request headers, simple replies, structured reply chunks and their payloads.

use bytes::{BufMut, BytesMut};

use super::*;

/// A transmission request header (the write payload follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parse a 28-byte request header.
pub fn decode_request(b: &[u8]) -> Result<Request, ProtocolError> {
    need("request", b, REQUEST_LEN)?;
    let magic = be_u32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadMagic {
            expected: REQUEST_MAGIC.into(),
            found: magic.into(),
        });
    }
    Ok(Request {
        flags: be_u16(b, 4),
        command: be_u16(b, 6),
        cookie: be_u64(b, 8),
        offset: be_u64(b, 16),
        length: be_u32(b, 24),
    })
}

/// Append a request header.
pub fn encode_request(buf: &mut BytesMut, r: &Request) {
    buf.put_u32(REQUEST_MAGIC);
    buf.put_u16(r.flags);
    buf.put_u16(r.command);
    buf.put_u64(r.cookie);
    buf.put_u64(r.offset);
    buf.put_u32(r.length);
}

/// Append a simple reply header (read data, if any, follows it).
pub fn encode_simple_reply(buf: &mut BytesMut, error: u32, cookie: u64) {
    buf.put_u32(SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(cookie);
}

/// Append a structured reply chunk header; `length` bytes of payload follow it.
pub fn encode_chunk_header(
    buf: &mut BytesMut,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    length: u32,
) {
    buf.put_u32(STRUCTURED_REPLY_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(chunk_type);
    buf.put_u64(cookie);
    buf.put_u32(length);
}

/// Append a whole `NBD_REPLY_TYPE_ERROR` chunk with a message.
pub fn encode_error_chunk(buf: &mut BytesMut, cookie: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    encode_chunk_header(
        buf,
        reply::FLAG_DONE,
        reply::TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    buf.put_u32(error);
    buf.put_u16(msg.len() as u16);
    buf.put_slice(msg);
}

/// A reply header as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        length: u32,
    },
}

impl ReplyHeader {
    /// The cookie of the request it answers.
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }
}

/// Parse a reply header from the start of `b`; `Ok(None)` if more bytes are needed. Returns the
/// header and its length (16 or 20 bytes).
pub fn decode_reply_header(b: &[u8]) -> Result<Option<(ReplyHeader, usize)>, ProtocolError> {
    if b.len() < 4 {
        return Ok(None);
    }
    match be_u32(b, 0) {
        SIMPLE_REPLY_MAGIC if b.len() >= SIMPLE_REPLY_LEN => Ok(Some((
            ReplyHeader::Simple {
                error: be_u32(b, 4),
                cookie: be_u64(b, 8),
            },
            SIMPLE_REPLY_LEN,
        ))),
        STRUCTURED_REPLY_MAGIC if b.len() >= STRUCTURED_REPLY_LEN => Ok(Some((
            ReplyHeader::Chunk {
                flags: be_u16(b, 4),
                chunk_type: be_u16(b, 6),
                cookie: be_u64(b, 8),
                length: be_u32(b, 16),
            },
            STRUCTURED_REPLY_LEN,
        ))),
        SIMPLE_REPLY_MAGIC | STRUCTURED_REPLY_MAGIC => Ok(None),
        other => Err(ProtocolError::BadMagic {
            expected: SIMPLE_REPLY_MAGIC.into(),
            found: other.into(),
        }),
    }
}

/// Parse the payload of an error chunk: the error and its message.
pub fn parse_error_chunk(b: &[u8]) -> Result<(u32, String), ProtocolError> {
    need("error chunk", b, 6)?;
    let len = be_u16(b, 4) as usize;
    need("error chunk message", &b[6..], len)?;
    Ok((
        be_u32(b, 0),
        String::from_utf8_lossy(&b[6..6 + len]).into_owned(),
    ))
}

/// A request header as a fixed array, for writers that gather headers and payloads into one
/// vectored write without a buffer per request.
pub fn request_header(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.command.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.length.to_be_bytes());
    b
}

/// The length of the reply header that starts `b` (16 or 20 bytes), from its first 4 bytes;
/// `Ok(None)` if fewer than 4 bytes are at hand.
pub fn reply_header_len(b: &[u8]) -> Result<Option<usize>, ProtocolError> {
    if b.len() < 4 {
        return Ok(None);
    }
    match be_u32(b, 0) {
        SIMPLE_REPLY_MAGIC => Ok(Some(SIMPLE_REPLY_LEN)),
        STRUCTURED_REPLY_MAGIC => Ok(Some(STRUCTURED_REPLY_LEN)),
        other => Err(ProtocolError::BadMagic {
            expected: SIMPLE_REPLY_MAGIC.into(),
            found: other.into(),
        }),
    }
}

/// Parse the payload of an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: the offset and the hole's size.
pub fn parse_offset_hole(b: &[u8]) -> Result<(u64, u32), ProtocolError> {
    if b.len() != 12 {
        return Err(ProtocolError::Invalid(format!(
            "an NBD_REPLY_TYPE_OFFSET_HOLE chunk is {} bytes; it must be 12",
            b.len()
        )));
    }
    Ok((be_u64(b, 0), be_u32(b, 8)))
}

/// Parse the payload of an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk: error, message and offset.
pub fn parse_error_offset_chunk(b: &[u8]) -> Result<(u32, String, u64), ProtocolError> {
    let (error, message) = parse_error_chunk(b)?;
    let at = 6 + be_u16(b, 4) as usize;
    need("NBD_REPLY_TYPE_ERROR_OFFSET", b, at + 8)?;
    Ok((error, message, be_u64(b, at)))
}

/// One descriptor of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub length: u32,
    pub flags: u32,
}

/// Parse the payload of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: the meta context id and its
/// descriptors (at least one).
pub fn parse_block_status_chunk(b: &[u8]) -> Result<(u32, Vec<BlockDescriptor>), ProtocolError> {
    if b.len() < 12 || !(b.len() - 4).is_multiple_of(8) {
        return Err(ProtocolError::Invalid(format!(
            "an NBD_REPLY_TYPE_BLOCK_STATUS chunk is {} bytes; it must be 4 + 8n with n >= 1",
            b.len()
        )));
    }
    let descriptors = b[4..]
        .chunks_exact(8)
        .map(|d| BlockDescriptor {
            length: be_u32(d, 0),
            flags: be_u32(d, 4),
        })
        .collect();
    Ok((be_u32(b, 0), descriptors))
}
