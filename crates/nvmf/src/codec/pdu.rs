//! The PDUs of the NVMe/TCP transport binding: the common header, each PDU's specific header,
//! header and data digests (CRC32C), and the checks a receiver makes before it trusts a length.
//!
//! ```text
//!  ┌─ CH (8) ─┬─ PSH ──────┬─ HDGST? ─┬─ pad ─┬─ DATA ───────┬─ DDGST? ─┐
//!  │type flags│ per type   │ CRC32C   │       │ PDO.. (DATAL) │ CRC32C   │
//!  │hlen pdo  │            │ of CH+PSH│       │               │ of DATA  │
//!  │plen      │            │          │       │               │          │
//!  └──────────┴────────────┴──────────┴───────┴──────────────┴──────────┘
//!  HLEN = CH + PSH; PDO = where DATA starts; PLEN = everything
//! ```

use bytes::BufMut;

use super::command::{Command, Completion};

/// PDU types.
pub mod pdu_type {
    pub const IC_REQ: u8 = 0x00;
    pub const IC_RESP: u8 = 0x01;
    pub const H2C_TERM_REQ: u8 = 0x02;
    pub const C2H_TERM_REQ: u8 = 0x03;
    pub const CAPSULE_CMD: u8 = 0x04;
    pub const CAPSULE_RESP: u8 = 0x05;
    pub const H2C_DATA: u8 = 0x06;
    pub const C2H_DATA: u8 = 0x07;
    pub const R2T: u8 = 0x09;

    /// A name for messages.
    pub fn name(t: u8) -> &'static str {
        match t {
            IC_REQ => "ICReq",
            IC_RESP => "ICResp",
            H2C_TERM_REQ => "H2CTermReq",
            C2H_TERM_REQ => "C2HTermReq",
            CAPSULE_CMD => "CapsuleCmd",
            CAPSULE_RESP => "CapsuleResp",
            H2C_DATA => "H2CData",
            C2H_DATA => "C2HData",
            R2T => "R2T",
            _ => "unknown PDU",
        }
    }
}

/// Common-header flags.
pub mod pdu_flags {
    /// A header digest follows the header.
    pub const HDGST: u8 = 0x01;
    /// A data digest follows the data.
    pub const DDGST: u8 = 0x02;
    /// H2CData/C2HData: the last data PDU of a transfer.
    pub const LAST_PDU: u8 = 0x04;
    /// C2HData: the command succeeded; no response capsule follows.
    pub const SUCCESS: u8 = 0x08;
}

/// Fatal error statuses of a termination request.
pub mod fes {
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    pub const HEADER_DIGEST_ERROR: u16 = 0x03;
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// ICReq/ICResp `DGST` bits.
pub mod digest_bits {
    pub const HEADER: u8 = 0x01;
    pub const DATA: u8 = 0x02;
}

/// Length of the common header.
pub const CH_LEN: usize = 8;
/// Length of ICReq and ICResp (header only; they carry no data).
pub const IC_LEN: usize = 128;
/// Header length of H2CTermReq and C2HTermReq.
pub const TERM_HLEN: usize = 24;
/// Header length of a command capsule: the common header and a 64-byte submission entry.
pub const CMD_HLEN: usize = 72;
/// Header length of a response capsule: the common header and a 16-byte completion entry.
pub const RESP_HLEN: usize = 24;
/// Header length of H2CData and C2HData.
pub const DATA_HLEN: usize = 24;
/// Header length of R2T.
pub const R2T_HLEN: usize = 24;
/// Length of a digest.
pub const DIGEST_LEN: usize = 4;
/// The most header bytes of the PDU in error that a termination request carries.
pub const MAX_TERM_DATA: usize = 128;
/// The smallest MAXH2CDATA a controller may offer.
pub const MIN_MAXH2CDATA: u32 = 4096;

/// The digests a connection negotiated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

impl Digests {
    /// From an ICReq/ICResp `DGST` byte.
    pub fn from_bits(bits: u8) -> Digests {
        Digests {
            header: bits & digest_bits::HEADER != 0,
            data: bits & digest_bits::DATA != 0,
        }
    }

    /// As an ICReq/ICResp `DGST` byte.
    pub fn bits(self) -> u8 {
        (if self.header { digest_bits::HEADER } else { 0 })
            | (if self.data { digest_bits::DATA } else { 0 })
    }

    /// Bytes a header digest takes (0 or 4).
    pub fn hdgst_len(self) -> usize {
        if self.header {
            DIGEST_LEN
        } else {
            0
        }
    }

    /// Bytes a data digest takes (0 or 4).
    pub fn ddgst_len(self) -> usize {
        if self.data {
            DIGEST_LEN
        } else {
            0
        }
    }
}

/// The CRC32C digest of `data`, as it goes on the wire.
pub fn digest(data: &[u8]) -> [u8; 4] {
    crc32c::crc32c(data).to_le_bytes()
}

/// The CRC32C digest of several pieces, in order.
pub fn digest_of(pieces: &[&[u8]]) -> [u8; 4] {
    pieces
        .iter()
        .fold(0u32, |crc, p| crc32c::crc32c_append(crc, p))
        .to_le_bytes()
}

/// The common header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonHeader {
    pub pdu_type: u8,
    pub flags: u8,
    pub hlen: u8,
    pub pdo: u8,
    pub plen: u32,
}

impl CommonHeader {
    /// Decode the first 8 bytes of `b` (which must hold them).
    pub fn decode(b: &[u8]) -> CommonHeader {
        CommonHeader {
            pdu_type: b[0],
            flags: b[1],
            hlen: b[2],
            pdo: b[3],
            plen: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    fn encode(&self, out: &mut impl BufMut) {
        out.put_u8(self.pdu_type);
        out.put_u8(self.flags);
        out.put_u8(self.hlen);
        out.put_u8(self.pdo);
        out.put_u32_le(self.plen);
    }
}

/// ICReq: the host opens a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcReq {
    /// PDU format version (0: the only one).
    pub pfv: u16,
    /// Host PDU data alignment, in dwords, 0's based.
    pub hpda: u8,
    /// The digests the host asks for.
    pub digests: Digests,
    /// Outstanding R2Ts per command the host accepts, 0's based.
    pub maxr2t: u32,
}

/// ICResp: the controller's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcResp {
    pub pfv: u16,
    /// Controller PDU data alignment, in dwords, 0's based.
    pub cpda: u8,
    /// The digests the connection uses.
    pub digests: Digests,
    /// The most data one H2CData PDU may carry.
    pub maxh2cdata: u32,
}

/// H2CTermReq / C2HTermReq: the sender ends the connection because of a fatal error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TermReq {
    /// Fatal error status ([`fes`]).
    pub fes: u16,
    /// Fatal error information (for an invalid field: its byte offset).
    pub fei: u32,
    /// The header of the PDU in error (at most [`MAX_TERM_DATA`] bytes).
    pub header: Vec<u8>,
}

/// The specific header of H2CData and C2HData.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    /// The command the data belongs to.
    pub cccid: u16,
    /// H2CData: the transfer tag of the R2T; C2HData: reserved (0).
    pub ttag: u16,
    /// Offset of this data in the command's data.
    pub datao: u32,
    /// Length of this data.
    pub datal: u32,
}

/// R2T: the controller asks for a command's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2t {
    pub cccid: u16,
    pub ttag: u16,
    /// Offset of the data asked for in the command's data.
    pub r2to: u32,
    /// Length of the data asked for.
    pub r2tl: u32,
}

/// A PDU's type-specific header, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PduHeader {
    IcReq(IcReq),
    IcResp(IcResp),
    H2CTermReq { fes: u16, fei: u32 },
    C2HTermReq { fes: u16, fei: u32 },
    CapsuleCmd(Command),
    CapsuleResp(Completion),
    H2CData(DataHeader),
    C2HData(DataHeader),
    R2t(R2t),
}

/// Which side decodes: each accepts only the PDUs its peer sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The controller (target) decodes what a host sends.
    Controller,
    /// The host decodes what a controller sends.
    Host,
}

/// Bounds a receiver puts on the PDUs it accepts, checked before any data is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most in-capsule data a command capsule may carry.
    pub in_capsule: u32,
    /// The most data one H2CData (controller) or C2HData (host) PDU may carry.
    pub data_pdu: u32,
}

/// Where a decoded PDU's parts lie, relative to its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Header bytes including the header digest: what [`decode_header`] needs.
    pub header_len: usize,
    /// Where the data starts (0 when there is none).
    pub data_offset: usize,
    /// Length of the data.
    pub data_len: usize,
    /// A data digest follows the data.
    pub data_digest: bool,
    /// The whole PDU (PLEN).
    pub total: usize,
}

/// A fatal transport error: the receiver answers with a termination request and closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("invalid PDU header field at byte {offset}: {why}")]
    InvalidField { offset: u32, why: String },
    #[error("PDU out of sequence: {0}")]
    Sequence(String),
    #[error("header digest mismatch (received {received:#010x}, computed {computed:#010x})")]
    HeaderDigest { received: u32, computed: u32 },
    #[error("data transfer out of range: {0}")]
    OutOfRange(String),
    #[error("data transfer limit exceeded: {len} bytes where at most {limit} are accepted")]
    LimitExceeded { len: u64, limit: u64 },
    #[error("unsupported parameter at byte {offset}: {why}")]
    Unsupported { offset: u32, why: String },
}

impl PduError {
    /// The fatal error status for the termination request.
    pub fn fes(&self) -> u16 {
        match self {
            PduError::InvalidField { .. } => fes::INVALID_HEADER_FIELD,
            PduError::Sequence(_) => fes::PDU_SEQUENCE_ERROR,
            PduError::HeaderDigest { .. } => fes::HEADER_DIGEST_ERROR,
            PduError::OutOfRange(_) => fes::DATA_OUT_OF_RANGE,
            PduError::LimitExceeded { .. } => fes::DATA_LIMIT_EXCEEDED,
            PduError::Unsupported { .. } => fes::UNSUPPORTED_PARAMETER,
        }
    }

    /// The fatal error information for the termination request.
    pub fn fei(&self) -> u32 {
        match self {
            PduError::InvalidField { offset, .. } | PduError::Unsupported { offset, .. } => *offset,
            _ => 0,
        }
    }

    fn field(offset: u32, why: impl Into<String>) -> PduError {
        PduError::InvalidField {
            offset,
            why: why.into(),
        }
    }
}

fn expected_hlen(t: u8) -> Option<usize> {
    Some(match t {
        pdu_type::IC_REQ | pdu_type::IC_RESP => IC_LEN,
        pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ => TERM_HLEN,
        pdu_type::CAPSULE_CMD => CMD_HLEN,
        pdu_type::CAPSULE_RESP => RESP_HLEN,
        pdu_type::H2C_DATA | pdu_type::C2H_DATA => DATA_HLEN,
        pdu_type::R2T => R2T_HLEN,
        _ => return None,
    })
}

fn accepted_by(role: Role, t: u8) -> bool {
    match role {
        Role::Controller => matches!(
            t,
            pdu_type::IC_REQ | pdu_type::H2C_TERM_REQ | pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA
        ),
        Role::Host => matches!(
            t,
            pdu_type::IC_RESP
                | pdu_type::C2H_TERM_REQ
                | pdu_type::CAPSULE_RESP
                | pdu_type::C2H_DATA
                | pdu_type::R2T
        ),
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// Decode the header of the PDU at the start of `buf`.
///
/// `digests` is `None` until the connection is initialized (only ICReq/ICResp are valid then,
/// and never after). Returns `Ok(None)` while `buf` holds too little to decide; the length
/// checks run on the common header alone, so an oversized PDU is refused before its data is
/// read. The header digest is verified; the data digest is left to the caller, who holds the
/// data.
pub fn decode_header(
    buf: &[u8],
    role: Role,
    digests: Option<Digests>,
    limits: Limits,
) -> Result<Option<(PduHeader, Layout)>, PduError> {
    if buf.len() < CH_LEN {
        return Ok(None);
    }
    let ch = CommonHeader::decode(buf);
    let t = ch.pdu_type;
    let Some(hlen) = expected_hlen(t).filter(|_| accepted_by(role, t)) else {
        return Err(PduError::field(
            0,
            format!(
                "PDU type {t:#04x} ({}) is not one a {} receives",
                pdu_type::name(t),
                match role {
                    Role::Controller => "controller",
                    Role::Host => "host",
                }
            ),
        ));
    };
    let is_ic = matches!(t, pdu_type::IC_REQ | pdu_type::IC_RESP);
    let is_term = matches!(t, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ);
    // A termination request may come at any time; everything else in its place.
    match digests {
        None if !is_ic && !is_term => {
            return Err(PduError::Sequence(format!(
                "{} before the connection was initialized",
                pdu_type::name(t)
            )))
        }
        Some(_) if is_ic => {
            return Err(PduError::Sequence(format!(
                "{} on an initialized connection",
                pdu_type::name(t)
            )))
        }
        _ => {}
    }
    if usize::from(ch.hlen) != hlen {
        return Err(PduError::field(
            2,
            format!("HLEN {} where {} has {hlen}", ch.hlen, pdu_type::name(t)),
        ));
    }
    let dg = if is_ic || is_term {
        Digests::default()
    } else {
        digests.unwrap_or_default()
    };
    if !is_ic && !is_term && (ch.flags & pdu_flags::HDGST != 0) != dg.header {
        return Err(PduError::field(
            1,
            if dg.header {
                "HDGSTF is clear but header digests were negotiated"
            } else {
                "HDGSTF is set but header digests were not negotiated"
            },
        ));
    }
    let header_len = hlen + dg.hdgst_len();
    let plen = ch.plen as usize;
    if plen < header_len {
        return Err(PduError::field(
            4,
            format!("PLEN {plen} is shorter than the {header_len}-byte header"),
        ));
    }
    // Length checks on the common header alone, before reading any more.
    let max = match t {
        pdu_type::IC_REQ | pdu_type::IC_RESP => IC_LEN,
        pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ => TERM_HLEN + MAX_TERM_DATA,
        pdu_type::CAPSULE_RESP | pdu_type::R2T => header_len,
        pdu_type::CAPSULE_CMD => {
            let max = header_len + limits.in_capsule as usize + dg.ddgst_len();
            if plen > max && plen > header_len {
                // Data beyond what the connection allows: refused before it is read.
                return Err(PduError::LimitExceeded {
                    len: (plen - header_len) as u64,
                    limit: u64::from(limits.in_capsule),
                });
            }
            max
        }
        _ => {
            let max = header_len + 255 + limits.data_pdu as usize + dg.ddgst_len();
            if plen > max {
                return Err(PduError::LimitExceeded {
                    len: (plen - header_len) as u64,
                    limit: u64::from(limits.data_pdu),
                });
            }
            max
        }
    };
    if plen > max || (is_ic && plen != IC_LEN) {
        return Err(PduError::field(
            4,
            format!("PLEN {plen} is not valid for {}", pdu_type::name(t)),
        ));
    }
    if buf.len() < header_len {
        return Ok(None);
    }
    if dg.header {
        let computed = crc32c::crc32c(&buf[..hlen]);
        let received = le32(buf, hlen);
        if computed != received {
            return Err(PduError::HeaderDigest { received, computed });
        }
    }
    let mut layout = Layout {
        header_len,
        data_offset: 0,
        data_len: 0,
        data_digest: false,
        total: plen,
    };
    let has_data = plen > header_len && !is_ic && !is_term;
    if has_data {
        let pdo = usize::from(ch.pdo);
        if pdo < header_len || pdo > plen {
            return Err(PduError::field(
                3,
                format!("PDO {pdo} is outside the PDU (header {header_len}, PLEN {plen})"),
            ));
        }
        if (ch.flags & pdu_flags::DDGST != 0) != dg.data {
            return Err(PduError::field(
                1,
                if dg.data {
                    "DDGSTF is clear but data digests were negotiated"
                } else {
                    "DDGSTF is set but data digests were not negotiated"
                },
            ));
        }
        let data_len = (plen - pdo)
            .checked_sub(dg.ddgst_len())
            .filter(|&n| n > 0)
            .ok_or_else(|| PduError::field(4, format!("PLEN {plen} leaves no room for data")))?;
        layout.data_offset = pdo;
        layout.data_len = data_len;
        layout.data_digest = dg.data;
    }
    let h = match t {
        pdu_type::IC_REQ => {
            let digests = Digests::from_bits(buf[11]);
            PduHeader::IcReq(IcReq {
                pfv: le16(buf, 8),
                hpda: buf[10],
                digests,
                maxr2t: le32(buf, 12),
            })
        }
        pdu_type::IC_RESP => PduHeader::IcResp(IcResp {
            pfv: le16(buf, 8),
            cpda: buf[10],
            digests: Digests::from_bits(buf[11]),
            maxh2cdata: le32(buf, 12),
        }),
        pdu_type::H2C_TERM_REQ => PduHeader::H2CTermReq {
            fes: le16(buf, 8),
            fei: le32(buf, 10),
        },
        pdu_type::C2H_TERM_REQ => PduHeader::C2HTermReq {
            fes: le16(buf, 8),
            fei: le32(buf, 10),
        },
        pdu_type::CAPSULE_CMD => PduHeader::CapsuleCmd(Command::decode(&buf[CH_LEN..CMD_HLEN])),
        pdu_type::CAPSULE_RESP => {
            PduHeader::CapsuleResp(Completion::decode(&buf[CH_LEN..RESP_HLEN]))
        }
        pdu_type::H2C_DATA | pdu_type::C2H_DATA => {
            let d = DataHeader {
                cccid: le16(buf, 8),
                ttag: le16(buf, 10),
                datao: le32(buf, 12),
                datal: le32(buf, 16),
            };
            if !has_data || d.datal as usize != layout.data_len {
                return Err(PduError::field(
                    16,
                    format!(
                        "DATAL {} does not match the {} data bytes PLEN and PDO leave",
                        d.datal, layout.data_len
                    ),
                ));
            }
            if d.datal > limits.data_pdu {
                return Err(PduError::LimitExceeded {
                    len: u64::from(d.datal),
                    limit: u64::from(limits.data_pdu),
                });
            }
            if t == pdu_type::H2C_DATA {
                PduHeader::H2CData(d)
            } else {
                PduHeader::C2HData(d)
            }
        }
        pdu_type::R2T => PduHeader::R2t(R2t {
            cccid: le16(buf, 8),
            ttag: le16(buf, 10),
            r2to: le32(buf, 12),
            r2tl: le32(buf, 16),
        }),
        _ => unreachable!("the type was checked against the known ones"),
    };
    Ok(Some((h, layout)))
}

/// A whole PDU: its header and, when it has them, its data (checked against its digest) or,
/// for a termination request, the header of the PDU in error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub header: PduHeader,
    /// The common header's flags ([`pdu_flags`]).
    pub flags: u8,
    pub data: Vec<u8>,
    /// The data digest did not match (the PDU is otherwise valid; the command fails).
    pub data_digest_error: bool,
}

/// Decode the whole PDU at the start of `buf`; `Ok(None)` while it is incomplete. Returns the
/// PDU and its length.
pub fn decode_pdu(
    buf: &[u8],
    role: Role,
    digests: Option<Digests>,
    limits: Limits,
) -> Result<Option<(Pdu, usize)>, PduError> {
    let Some((header, layout)) = decode_header(buf, role, digests, limits)? else {
        return Ok(None);
    };
    if buf.len() < layout.total {
        return Ok(None);
    }
    let is_term = matches!(
        header,
        PduHeader::H2CTermReq { .. } | PduHeader::C2HTermReq { .. }
    );
    let (data, data_digest_error) = if is_term {
        (buf[TERM_HLEN..layout.total].to_vec(), false)
    } else if layout.data_len > 0 {
        let d = &buf[layout.data_offset..layout.data_offset + layout.data_len];
        let bad = layout.data_digest
            && digest(d)[..] != buf[layout.data_offset + layout.data_len..layout.total];
        (d.to_vec(), bad)
    } else {
        (Vec::new(), false)
    };
    Ok(Some((
        Pdu {
            header,
            flags: buf[1],
            data,
            data_digest_error,
        },
        layout.total,
    )))
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Write a header: CH (with `plen`), `psh` bytes (HLEN - 8 of them), and the header digest.
fn put_header(
    out: &mut impl BufMut,
    pdu_type: u8,
    flags: u8,
    pdo: u8,
    plen: usize,
    psh: &[u8],
    hdgst: bool,
) {
    let mut h = [0u8; CMD_HLEN];
    let hlen = CH_LEN + psh.len();
    let flags = flags | if hdgst { pdu_flags::HDGST } else { 0 };
    CommonHeader {
        pdu_type,
        flags,
        hlen: hlen as u8,
        pdo,
        plen: plen as u32,
    }
    .encode(&mut &mut h[..CH_LEN]);
    h[CH_LEN..hlen].copy_from_slice(psh);
    out.put_slice(&h[..hlen]);
    if hdgst {
        out.put_slice(&digest(&h[..hlen]));
    }
}

/// Encode an ICReq.
pub fn encode_ic_req(out: &mut impl BufMut, r: &IcReq) {
    let mut psh = [0u8; IC_LEN - CH_LEN];
    psh[0..2].copy_from_slice(&r.pfv.to_le_bytes());
    psh[2] = r.hpda;
    psh[3] = r.digests.bits();
    psh[4..8].copy_from_slice(&r.maxr2t.to_le_bytes());
    put_ic(out, pdu_type::IC_REQ, &psh);
}

/// Encode an ICResp.
pub fn encode_ic_resp(out: &mut impl BufMut, r: &IcResp) {
    let mut psh = [0u8; IC_LEN - CH_LEN];
    psh[0..2].copy_from_slice(&r.pfv.to_le_bytes());
    psh[2] = r.cpda;
    psh[3] = r.digests.bits();
    psh[4..8].copy_from_slice(&r.maxh2cdata.to_le_bytes());
    put_ic(out, pdu_type::IC_RESP, &psh);
}

fn put_ic(out: &mut impl BufMut, t: u8, psh: &[u8; IC_LEN - CH_LEN]) {
    CommonHeader {
        pdu_type: t,
        flags: 0,
        hlen: IC_LEN as u8,
        pdo: 0,
        plen: IC_LEN as u32,
    }
    .encode(out);
    out.put_slice(psh);
}

/// Encode a termination request from `sender` (H2CTermReq from a host, C2HTermReq from a
/// controller), carrying the first bytes of the offending PDU's header.
pub fn encode_term_req(out: &mut impl BufMut, sender: Role, fes: u16, fei: u32, offending: &[u8]) {
    let offending = &offending[..offending.len().min(MAX_TERM_DATA)];
    let t = match sender {
        Role::Host => pdu_type::H2C_TERM_REQ,
        Role::Controller => pdu_type::C2H_TERM_REQ,
    };
    CommonHeader {
        pdu_type: t,
        flags: 0,
        hlen: TERM_HLEN as u8,
        pdo: 0,
        plen: (TERM_HLEN + offending.len()) as u32,
    }
    .encode(out);
    out.put_u16_le(fes);
    out.put_u32_le(fei);
    out.put_slice(&[0u8; TERM_HLEN - CH_LEN - 6]);
    out.put_slice(offending);
}

/// Where data starts in a PDU with a header of `header_len` bytes whose receiver asked for
/// data aligned to `align` bytes (a multiple of 4; 4 or less: no padding).
pub fn data_offset(header_len: usize, align: usize) -> usize {
    if align <= 4 {
        header_len
    } else {
        header_len.div_ceil(align) * align
    }
}

/// Encode a command capsule's header for `cmd` with `data_len` bytes of in-capsule data to
/// follow (then, with data digests, the digest of the data: [`digest`]). Data is placed right
/// after the header (the controller's alignment, CPDA, is 0 for every controller this speaks to).
pub fn encode_capsule_cmd(out: &mut impl BufMut, cmd: &Command, data_len: usize, dg: Digests) {
    let header_len = CMD_HLEN + dg.hdgst_len();
    let (pdo, plen, flags) = if data_len > 0 {
        let ddgst = if dg.data { pdu_flags::DDGST } else { 0 };
        (header_len, header_len + data_len + dg.ddgst_len(), ddgst)
    } else {
        (0, header_len, 0)
    };
    let mut sqe = [0u8; 64];
    cmd.encode(&mut sqe);
    put_header(
        out,
        pdu_type::CAPSULE_CMD,
        flags,
        pdo as u8,
        plen,
        &sqe,
        dg.header,
    );
}

/// Encode a response capsule.
pub fn encode_capsule_resp(out: &mut impl BufMut, c: &Completion, dg: Digests) {
    let mut cqe = [0u8; 16];
    c.encode(&mut cqe);
    put_header(
        out,
        pdu_type::CAPSULE_RESP,
        0,
        0,
        RESP_HLEN + dg.hdgst_len(),
        &cqe,
        dg.header,
    );
}

/// Encode the header of an H2CData or C2HData PDU whose `d.datal` bytes of data follow, after
/// padding to `align` (the receiver's PDU data alignment in bytes); the padding is written
/// here. `flags` holds [`pdu_flags::LAST_PDU`] and [`pdu_flags::SUCCESS`] as needed.
pub fn encode_data_header(
    out: &mut impl BufMut,
    pdu_type: u8,
    flags: u8,
    d: &DataHeader,
    dg: Digests,
    align: usize,
) {
    let header_len = DATA_HLEN + dg.hdgst_len();
    let pdo = data_offset(header_len, align);
    let plen = pdo + d.datal as usize + dg.ddgst_len();
    let mut psh = [0u8; DATA_HLEN - CH_LEN];
    psh[0..2].copy_from_slice(&d.cccid.to_le_bytes());
    psh[2..4].copy_from_slice(&d.ttag.to_le_bytes());
    psh[4..8].copy_from_slice(&d.datao.to_le_bytes());
    psh[8..12].copy_from_slice(&d.datal.to_le_bytes());
    let flags = flags | if dg.data { pdu_flags::DDGST } else { 0 };
    put_header(out, pdu_type, flags, pdo as u8, plen, &psh, dg.header);
    for _ in header_len..pdo {
        out.put_u8(0);
    }
}

/// Encode an R2T.
pub fn encode_r2t(out: &mut impl BufMut, r: &R2t, dg: Digests) {
    let mut psh = [0u8; R2T_HLEN - CH_LEN];
    psh[0..2].copy_from_slice(&r.cccid.to_le_bytes());
    psh[2..4].copy_from_slice(&r.ttag.to_le_bytes());
    psh[4..8].copy_from_slice(&r.r2to.to_le_bytes());
    psh[8..12].copy_from_slice(&r.r2tl.to_le_bytes());
    put_header(
        out,
        pdu_type::R2T,
        0,
        0,
        R2T_HLEN + dg.hdgst_len(),
        &psh,
        dg.header,
    );
}
