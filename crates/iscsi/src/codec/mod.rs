//! The iSCSI wire format (RFC 7143), as pure functions: bytes in, typed PDUs out, and back. No
//! I/O happens here, so everything is property-tested and fuzzed.
//!
//! A PDU is a 48-byte basic header segment (BHS), optional additional header segments (AHS),
//! an optional header digest, a data segment padded to 4 bytes, and an optional data digest:
//!
//! ```text
//!   BHS (48) │ AHS (4·n) │ [CRC32C of BHS+AHS] │ data │ pad to 4 │ [CRC32C of data+pad]
//! ```
//!
//! [`Header`] is the typed BHS of every PDU an initiator or a target sends (the initiator's
//! NOP-Out, SCSI Command, Task Management, Login, Text, Data-Out and Logout requests; the
//! target's NOP-In, SCSI Response, Task Management, Login, Text and Logout responses, Data-In,
//! R2T, Async Message and Reject). [`Frame`] is a whole PDU; [`encode`] and [`decode`] turn one
//! into bytes and back. The connection reads headers with [`decode_header`] and [`frame_lengths`]
//! so that large data segments go straight into their destination. [`text`] holds the
//! `key=value` negotiation text of Login and Text PDUs, and [`scsi`] the SCSI commands and the
//! parameter data the initiator sends and parses.

mod bhs;
mod header;
pub mod scsi;
pub mod text;

pub use bhs::decode_header;
pub use header::*;

use bytes::{BufMut, Bytes, BytesMut};
use strata_bdev::field::le32;

/// The length of a basic header segment.
pub const BHS_LEN: usize = 48;
/// The length of a CRC32C digest.
pub const DIGEST_LEN: usize = 4;
/// The initiator task tag meaning "no task" (unsolicited NOP-In, Async Message, Reject).
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// The largest data segment the format can describe (24-bit length).
pub const MAX_DATA_SEGMENT: u32 = (1 << 24) - 1;

/// Operation codes (byte 0, low 6 bits).
pub mod opcode {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT_REQUEST: u8 = 0x02;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const TEXT_REQUEST: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Login stages (CSG/NSG).
pub mod stage {
    pub const SECURITY: u8 = 0;
    pub const OPERATIONAL: u8 = 1;
    pub const FULL_FEATURE: u8 = 3;
}

/// Task management functions.
pub mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
}

/// Async Message events.
pub mod async_event {
    /// A SCSI asynchronous event; the data segment carries sense data.
    pub const SCSI: u8 = 0;
    /// The target asks for a logout.
    pub const LOGOUT_REQUESTED: u8 = 1;
    /// The target will drop this connection.
    pub const DROP_CONNECTION: u8 = 2;
    /// The target will drop every connection of the session.
    pub const DROP_SESSION: u8 = 3;
    /// The target asks for parameter renegotiation.
    pub const NEGOTIATE: u8 = 4;
}

/// Task attributes of a SCSI command.
pub mod attr {
    pub const UNTAGGED: u8 = 0;
    pub const SIMPLE: u8 = 1;
    pub const ORDERED: u8 = 2;
    pub const HEAD_OF_QUEUE: u8 = 3;
}

/// A malformed PDU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("header digest mismatch (received {received:#010x}, computed {computed:#010x})")]
    HeaderDigest { received: u32, computed: u32 },
    #[error("data digest mismatch (received {received:#010x}, computed {computed:#010x})")]
    DataDigest { received: u32, computed: u32 },
    #[error("data segment of {len} bytes is over the limit of {max}")]
    TooLong { len: u32, max: u32 },
    #[error("{0}")]
    Malformed(String),
}

/// Whether header and data digests are in use on a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    /// CRC32C over the BHS and AHS.
    pub header: bool,
    /// CRC32C over the data segment and its padding.
    pub data: bool,
}

/// The CRC32C iSCSI uses for digests.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Continue a CRC32C over more bytes.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// The padding after a data segment of `len` bytes.
pub fn padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

const ZERO_PAD: [u8; 4] = [0; 4];

/// The data digest of a segment: CRC32C over the data and its padding.
pub fn data_digest(data: &[u8]) -> u32 {
    crc32c_append(crc32c(data), &ZERO_PAD[..padding(data.len())])
}

/// The lengths a BHS announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lengths {
    /// Bytes of AHS.
    pub ahs: usize,
    /// Bytes of data (without padding).
    pub data: usize,
}

impl Lengths {
    /// Bytes that follow the BHS on the wire: AHS, digests, data and padding.
    pub fn after_bhs(&self, digests: Digests) -> usize {
        let mut n = self.ahs;
        if digests.header {
            n += DIGEST_LEN;
        }
        if self.data > 0 {
            n += self.data + padding(self.data);
            if digests.data {
                n += DIGEST_LEN;
            }
        }
        n
    }
}

/// The AHS and data lengths a BHS announces.
pub fn frame_lengths(bhs: &[u8; BHS_LEN]) -> Lengths {
    Lengths {
        ahs: usize::from(bhs[4]) * 4,
        data: (usize::from(bhs[5]) << 16) | (usize::from(bhs[6]) << 8) | usize::from(bhs[7]),
    }
}

/// A whole PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    /// Additional header segments, a multiple of 4 bytes (empty for every PDU Strata sends).
    pub ahs: Bytes,
    pub data: Bytes,
}

impl Frame {
    /// A PDU with data and no AHS.
    pub fn new(header: Header, data: Bytes) -> Frame {
        Frame {
            header,
            ahs: Bytes::new(),
            data,
        }
    }
}

/// The bytes before the data segment: BHS, AHS and the header digest.
pub fn encode_head(header: &Header, ahs: &[u8], data_len: usize, digests: Digests) -> BytesMut {
    let mut out = BytesMut::with_capacity(BHS_LEN + ahs.len() + DIGEST_LEN);
    out.put_slice(&header.encode(ahs.len(), data_len as u32));
    out.put_slice(ahs);
    if digests.header {
        let crc = crc32c(&out);
        out.put_u32_le(crc);
    }
    out
}

/// The bytes after the data segment: padding and the data digest.
pub fn encode_tail(data: &[u8], digests: Digests) -> ([u8; 8], usize) {
    let mut tail = [0u8; 8];
    let pad = padding(data.len());
    let mut n = pad;
    if digests.data && !data.is_empty() {
        tail[pad..pad + 4].copy_from_slice(&data_digest(data).to_le_bytes());
        n += 4;
    }
    (tail, n)
}

/// Encode a whole PDU into one buffer.
pub fn encode(frame: &Frame, digests: Digests) -> BytesMut {
    let mut out = encode_head(&frame.header, &frame.ahs, frame.data.len(), digests);
    out.put_slice(&frame.data);
    let (tail, n) = encode_tail(&frame.data, digests);
    out.put_slice(&tail[..n]);
    out
}

/// Decode one PDU from the front of `buf`, refusing data segments over `max_data`. Returns the
/// frame and the bytes it took, or `None` when `buf` holds only part of a PDU.
pub fn decode(
    buf: &[u8],
    digests: Digests,
    max_data: u32,
) -> Result<Option<(Frame, usize)>, CodecError> {
    let Some(bhs) = buf.get(..BHS_LEN) else {
        return Ok(None);
    };
    let mut bhs_arr = [0u8; BHS_LEN];
    bhs_arr.copy_from_slice(bhs);
    let lengths = frame_lengths(&bhs_arr);
    if lengths.data > max_data as usize {
        return Err(CodecError::TooLong {
            len: lengths.data as u32,
            max: max_data,
        });
    }
    let total = BHS_LEN + lengths.after_bhs(digests);
    if buf.len() < total {
        return Ok(None);
    }
    let mut at = BHS_LEN + lengths.ahs;
    if digests.header {
        check_header_digest(&buf[..at], le32(buf, at))?;
    }
    let header = decode_header(&bhs_arr)?;
    let ahs = Bytes::copy_from_slice(&buf[BHS_LEN..at]);
    if digests.header {
        at += DIGEST_LEN;
    }
    let data = Bytes::copy_from_slice(&buf[at..at + lengths.data]);
    if lengths.data > 0 {
        let padded = lengths.data + padding(lengths.data);
        if digests.data {
            check_data_digest(&buf[at..at + padded], le32(buf, at + padded))?;
            at += DIGEST_LEN;
        }
        at += padded;
    }
    debug_assert_eq!(at, total);
    Ok(Some((Frame { header, ahs, data }, total)))
}

/// Check the header digest of `head` (BHS and AHS).
pub fn check_header_digest(head: &[u8], received: u32) -> Result<(), CodecError> {
    let computed = crc32c(head);
    if computed == received {
        Ok(())
    } else {
        Err(CodecError::HeaderDigest { received, computed })
    }
}

/// Check the data digest of `padded` (the data segment with its padding).
pub fn check_data_digest(padded: &[u8], received: u32) -> Result<(), CodecError> {
    let computed = crc32c(padded);
    if computed == received {
        Ok(())
    } else {
        Err(CodecError::DataDigest { received, computed })
    }
}

/// The digest bytes as they travel (CRC32C values are sent little-endian, as iSCSI
/// implementations do).
pub fn digest_bytes(crc: u32) -> [u8; 4] {
    crc.to_le_bytes()
}

/// Serial number arithmetic (RFC 1982, 32 bits): `a < b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < (1 << 31)
}

/// Serial number arithmetic: `a <= b`.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// Encode a LUN number in the 8-byte SAM format: peripheral addressing below 256, flat space
/// addressing below 16384.
pub fn encode_lun(lun: u16) -> u64 {
    let lun = u64::from(lun);
    if lun < 256 {
        lun << 48
    } else {
        ((0x40 | ((lun >> 8) & 0x3f)) << 56) | ((lun & 0xff) << 48)
    }
}

/// The LUN number of an 8-byte SAM LUN in peripheral or flat space addressing; `None` for
/// other addressing methods or a multi-level LUN.
pub fn decode_lun(raw: u64) -> Option<u16> {
    let b = raw.to_be_bytes();
    if b[2..].iter().any(|&x| x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0 if b[0] & 0x3f == 0 => Some(u16::from(b[1])),
        1 => Some((u16::from(b[0] & 0x3f) << 8) | u16::from(b[1])),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
