//! Sense data: what a target says of a command that failed (SPC-5 4.4), in fixed or
//! descriptor format, and its place in a SCSI Response's data segment.

use strata_bdev::field::be32;

use crate::codec::CodecError;

/// Sense keys.
pub mod sense_key {
    pub const NO_SENSE: u8 = 0x0;
    pub const RECOVERED_ERROR: u8 = 0x1;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const BLANK_CHECK: u8 = 0x8;
    pub const VENDOR_SPECIFIC: u8 = 0x9;
    pub const COPY_ABORTED: u8 = 0xa;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const VOLUME_OVERFLOW: u8 = 0xd;
    pub const MISCOMPARE: u8 = 0xe;
    pub const COMPLETED: u8 = 0xf;
}

/// Decoded sense data (fixed or descriptor format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// 0x70/0x71 (fixed, current/deferred) or 0x72/0x73 (descriptor).
    pub response_code: u8,
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field, when valid (often the failing LBA).
    pub information: Option<u64>,
}

impl Sense {
    /// A current error in fixed format.
    pub fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            response_code: 0x70,
            key,
            asc,
            ascq,
            information: None,
        }
    }

    /// Fixed-format sense data (18 bytes).
    pub fn encode_fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70 | if self.information.is_some() { 0x80 } else { 0 };
        b[2] = self.key & 0x0f;
        if let Some(i) = self.information {
            b[3..7].copy_from_slice(&(i as u32).to_be_bytes());
        }
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }

    /// Descriptor-format sense data, with an information descriptor when there is one.
    pub fn encode_descriptor(&self) -> Vec<u8> {
        let mut b = vec![0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0];
        if let Some(i) = self.information {
            b.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
            b.extend_from_slice(&i.to_be_bytes());
        }
        b[7] = (b.len() - 8) as u8;
        b
    }

    /// Decode sense data.
    pub fn decode(b: &[u8]) -> Result<Sense, CodecError> {
        let short =
            || CodecError::Malformed(format!("sense data of {} bytes is too short", b.len()));
        let code = b.first().ok_or_else(short)? & 0x7f;
        match code {
            0x70 | 0x71 => {
                if b.len() < 3 {
                    return Err(short());
                }
                let valid = b[0] & 0x80 != 0;
                Ok(Sense {
                    response_code: code,
                    key: b[2] & 0x0f,
                    asc: b.get(12).copied().unwrap_or(0),
                    ascq: b.get(13).copied().unwrap_or(0),
                    information: (valid && b.len() >= 7).then(|| u64::from(be32(b, 3))),
                })
            }
            0x72 | 0x73 => {
                if b.len() < 4 {
                    return Err(short());
                }
                let mut information = None;
                let end = (8 + usize::from(b.get(7).copied().unwrap_or(0))).min(b.len());
                let mut at = 8;
                while at + 2 <= end {
                    let (ty, len) = (b[at], usize::from(b[at + 1]));
                    if ty == 0x00 && len >= 0x0a && at + 12 <= end && b[at + 2] & 0x80 != 0 {
                        let mut i = [0u8; 8];
                        i.copy_from_slice(&b[at + 4..at + 12]);
                        information = Some(u64::from_be_bytes(i));
                    }
                    at += 2 + len;
                }
                Ok(Sense {
                    response_code: code,
                    key: b[1] & 0x0f,
                    asc: b[2],
                    ascq: b[3],
                    information,
                })
            }
            other => Err(CodecError::Malformed(format!(
                "unknown sense data response code {other:#04x}"
            ))),
        }
    }

    /// The sense key's name.
    pub fn key_name(&self) -> &'static str {
        match self.key {
            sense_key::NO_SENSE => "NO SENSE",
            sense_key::RECOVERED_ERROR => "RECOVERED ERROR",
            sense_key::NOT_READY => "NOT READY",
            sense_key::MEDIUM_ERROR => "MEDIUM ERROR",
            sense_key::HARDWARE_ERROR => "HARDWARE ERROR",
            sense_key::ILLEGAL_REQUEST => "ILLEGAL REQUEST",
            sense_key::UNIT_ATTENTION => "UNIT ATTENTION",
            sense_key::DATA_PROTECT => "DATA PROTECT",
            sense_key::BLANK_CHECK => "BLANK CHECK",
            sense_key::VENDOR_SPECIFIC => "VENDOR SPECIFIC",
            sense_key::COPY_ABORTED => "COPY ABORTED",
            sense_key::ABORTED_COMMAND => "ABORTED COMMAND",
            sense_key::VOLUME_OVERFLOW => "VOLUME OVERFLOW",
            sense_key::MISCOMPARE => "MISCOMPARE",
            sense_key::COMPLETED => "COMPLETED",
            _ => "RESERVED",
        }
    }

    /// The name of the additional sense code, for the codes a disk initiator meets.
    pub fn asc_name(&self) -> Option<&'static str> {
        Some(match (self.asc, self.ascq) {
            (0x00, 0x00) => "no additional sense information",
            (0x04, 0x00) => "logical unit not ready, cause not reportable",
            (0x04, 0x01) => "logical unit is in process of becoming ready",
            (0x04, 0x02) => "logical unit not ready, initializing command required",
            (0x04, 0x03) => "logical unit not ready, manual intervention required",
            (0x04, _) => "logical unit not ready",
            (0x0c, 0x00) => "write error",
            (0x11, 0x00) => "unrecovered read error",
            (0x1a, 0x00) => "parameter list length error",
            (0x20, 0x00) => "invalid command operation code",
            (0x21, 0x00) => "logical block address out of range",
            (0x24, 0x00) => "invalid field in CDB",
            (0x25, 0x00) => "logical unit not supported",
            (0x26, 0x00) => "invalid field in parameter list",
            (0x27, 0x00) => "write protected",
            (0x27, 0x07) => "space allocation failed write protect",
            (0x27, _) => "write protected",
            (0x28, 0x00) => "not ready to ready change, medium may have changed",
            (0x29, 0x00) => "power on, reset, or bus device reset occurred",
            (0x29, _) => "power on or reset occurred",
            (0x2a, 0x01) => "mode parameters changed",
            (0x2a, 0x09) => "capacity data has changed",
            (0x2a, _) => "parameters changed",
            (0x3a, _) => "medium not present",
            (0x3f, 0x0e) => "reported LUNs data has changed",
            (0x44, 0x00) => "internal target failure",
            (0x47, _) => "SCSI parity error",
            (0x55, 0x03) => "insufficient resources",
            _ => return None,
        })
    }
}

impl std::fmt::Display for Sense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.key_name())?;
        if let Some(name) = self.asc_name() {
            write!(f, ", {name}")?;
        }
        write!(f, " (ASC {:#04x}, ASCQ {:#04x}", self.asc, self.ascq)?;
        if let Some(i) = self.information {
            write!(f, ", information {i}")?;
        }
        f.write_str(")")
    }
}

/// The sense data carried in a SCSI Response's data segment: a 2-byte length, then the sense.
pub fn sense_of_response(data: &[u8]) -> Option<&[u8]> {
    let len = usize::from(u16::from_be_bytes([*data.first()?, *data.get(1)?]));
    data.get(2..2 + len).filter(|s| !s.is_empty())
}

/// The data segment of a SCSI Response carrying `sense`.
pub fn response_data(sense: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + sense.len());
    b.extend_from_slice(&(sense.len() as u16).to_be_bytes());
    b.extend_from_slice(sense);
    b
}
