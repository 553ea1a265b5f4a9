//! The SCSI commands an initiator of a disk sends (SBC-4, SPC-5) and the data they return:
//! CDBs ([`Cdb`]), READ CAPACITY(16) data, the Block Limits and Logical Block Provisioning VPD
//! pages, standard INQUIRY data, REPORT LUNS data, MODE SENSE(6) data, the UNMAP parameter list
//! and sense data. Each has an encoder and a decoder, so a test target can answer with them too.

use super::CodecError;

/// SCSI status codes.
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const ACA_ACTIVE: u8 = 0x30;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// The name of a SCSI status, for messages.
pub fn status_name(s: u8) -> &'static str {
    match s {
        status::GOOD => "GOOD",
        status::CHECK_CONDITION => "CHECK CONDITION",
        status::CONDITION_MET => "CONDITION MET",
        status::BUSY => "BUSY",
        status::RESERVATION_CONFLICT => "RESERVATION CONFLICT",
        status::TASK_SET_FULL => "TASK SET FULL",
        status::ACA_ACTIVE => "ACA ACTIVE",
        status::TASK_ABORTED => "TASK ABORTED",
        _ => "unknown status",
    }
}

/// Operation codes.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const UNMAP: u8 = 0x42;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    /// The service action of READ CAPACITY(16) under SERVICE ACTION IN(16).
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
}

/// VPD page codes.
pub mod vpd {
    pub const SUPPORTED_PAGES: u8 = 0x00;
    pub const BLOCK_LIMITS: u8 = 0xb0;
    pub const LOGICAL_BLOCK_PROVISIONING: u8 = 0xb2;
}

/// A command descriptor block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cdb {
    TestUnitReady,
    Inquiry {
        /// Ask for a VPD page (`page`) instead of the standard data.
        evpd: bool,
        page: u8,
        alloc_len: u16,
    },
    ModeSense6 {
        /// Leave block descriptors out.
        dbd: bool,
        page: u8,
        subpage: u8,
        alloc_len: u8,
    },
    Read16 {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    Write16 {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    SynchronizeCache16 {
        lba: u64,
        /// 0: to the end of the medium.
        blocks: u32,
        immed: bool,
    },
    Unmap {
        anchor: bool,
        param_len: u16,
    },
    WriteSame16 {
        lba: u64,
        blocks: u32,
        /// The blocks may be deallocated.
        unmap: bool,
        /// No data-out buffer: the blocks become zeroes.
        ndob: bool,
    },
    ReadCapacity16 {
        alloc_len: u32,
    },
    ReportLuns {
        select_report: u8,
        alloc_len: u32,
    },
}

impl Cdb {
    /// The CDB bytes (6, 10, 12 or 16), zero-padded to 16, and its length.
    pub fn encode(&self) -> ([u8; 16], usize) {
        let mut c = [0u8; 16];
        let len = match *self {
            Cdb::TestUnitReady => 6,
            Cdb::Inquiry {
                evpd,
                page,
                alloc_len,
            } => {
                c[0] = op::INQUIRY;
                c[1] = u8::from(evpd);
                c[2] = page;
                c[3..5].copy_from_slice(&alloc_len.to_be_bytes());
                6
            }
            Cdb::ModeSense6 {
                dbd,
                page,
                subpage,
                alloc_len,
            } => {
                c[0] = op::MODE_SENSE_6;
                c[1] = if dbd { 0x08 } else { 0 };
                c[2] = page & 0x3f;
                c[3] = subpage;
                c[4] = alloc_len;
                6
            }
            Cdb::Read16 { lba, blocks, fua } | Cdb::Write16 { lba, blocks, fua } => {
                c[0] = if matches!(self, Cdb::Read16 { .. }) {
                    op::READ_16
                } else {
                    op::WRITE_16
                };
                c[1] = if fua { 0x08 } else { 0 };
                c[2..10].copy_from_slice(&lba.to_be_bytes());
                c[10..14].copy_from_slice(&blocks.to_be_bytes());
                16
            }
            Cdb::SynchronizeCache16 { lba, blocks, immed } => {
                c[0] = op::SYNCHRONIZE_CACHE_16;
                c[1] = if immed { 0x02 } else { 0 };
                c[2..10].copy_from_slice(&lba.to_be_bytes());
                c[10..14].copy_from_slice(&blocks.to_be_bytes());
                16
            }
            Cdb::Unmap { anchor, param_len } => {
                c[0] = op::UNMAP;
                c[1] = u8::from(anchor);
                c[7..9].copy_from_slice(&param_len.to_be_bytes());
                10
            }
            Cdb::WriteSame16 {
                lba,
                blocks,
                unmap,
                ndob,
            } => {
                c[0] = op::WRITE_SAME_16;
                c[1] = if unmap { 0x08 } else { 0 } | u8::from(ndob);
                c[2..10].copy_from_slice(&lba.to_be_bytes());
                c[10..14].copy_from_slice(&blocks.to_be_bytes());
                16
            }
            Cdb::ReadCapacity16 { alloc_len } => {
                c[0] = op::SERVICE_ACTION_IN_16;
                c[1] = op::SA_READ_CAPACITY_16;
                c[10..14].copy_from_slice(&alloc_len.to_be_bytes());
                16
            }
            Cdb::ReportLuns {
                select_report,
                alloc_len,
            } => {
                c[0] = op::REPORT_LUNS;
                c[2] = select_report;
                c[6..10].copy_from_slice(&alloc_len.to_be_bytes());
                12
            }
        };
        (c, len)
    }

    /// Decode a CDB this module knows.
    pub fn decode(c: &[u8]) -> Result<Cdb, CodecError> {
        let need = |n: usize| {
            if c.len() < n {
                Err(CodecError::Malformed(format!(
                    "CDB of {} bytes is too short for its operation code",
                    c.len()
                )))
            } else {
                Ok(())
            }
        };
        let first = *c
            .first()
            .ok_or_else(|| CodecError::Malformed("empty CDB".into()))?;
        let u32_at = |at: usize| u32::from_be_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]]);
        let u64_at = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&c[at..at + 8]);
            u64::from_be_bytes(x)
        };
        Ok(match first {
            op::TEST_UNIT_READY => {
                need(6)?;
                Cdb::TestUnitReady
            }
            op::INQUIRY => {
                need(6)?;
                Cdb::Inquiry {
                    evpd: c[1] & 1 != 0,
                    page: c[2],
                    alloc_len: u16::from_be_bytes([c[3], c[4]]),
                }
            }
            op::MODE_SENSE_6 => {
                need(6)?;
                Cdb::ModeSense6 {
                    dbd: c[1] & 0x08 != 0,
                    page: c[2] & 0x3f,
                    subpage: c[3],
                    alloc_len: c[4],
                }
            }
            op::READ_16 | op::WRITE_16 => {
                need(16)?;
                let (lba, blocks, fua) = (u64_at(2), u32_at(10), c[1] & 0x08 != 0);
                if first == op::READ_16 {
                    Cdb::Read16 { lba, blocks, fua }
                } else {
                    Cdb::Write16 { lba, blocks, fua }
                }
            }
            op::SYNCHRONIZE_CACHE_16 => {
                need(16)?;
                Cdb::SynchronizeCache16 {
                    lba: u64_at(2),
                    blocks: u32_at(10),
                    immed: c[1] & 0x02 != 0,
                }
            }
            op::UNMAP => {
                need(10)?;
                Cdb::Unmap {
                    anchor: c[1] & 1 != 0,
                    param_len: u16::from_be_bytes([c[7], c[8]]),
                }
            }
            op::WRITE_SAME_16 => {
                need(16)?;
                Cdb::WriteSame16 {
                    lba: u64_at(2),
                    blocks: u32_at(10),
                    unmap: c[1] & 0x08 != 0,
                    ndob: c[1] & 0x01 != 0,
                }
            }
            op::SERVICE_ACTION_IN_16
                if c.get(1).map(|b| b & 0x1f) == Some(op::SA_READ_CAPACITY_16) =>
            {
                need(16)?;
                Cdb::ReadCapacity16 {
                    alloc_len: u32_at(10),
                }
            }
            op::REPORT_LUNS => {
                need(12)?;
                Cdb::ReportLuns {
                    select_report: c[2],
                    alloc_len: u32_at(6),
                }
            }
            other => {
                return Err(CodecError::Malformed(format!(
                    "unknown SCSI operation code {other:#04x}"
                )))
            }
        })
    }
}

/// READ CAPACITY(16) parameter data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// The address of the last logical block.
    pub last_lba: u64,
    /// Bytes per logical block.
    pub block_len: u32,
    /// Logical blocks per physical block, as a power of two.
    pub physical_exponent: u8,
    /// Logical block provisioning management is enabled (thin provisioning: UNMAP works).
    pub lbpme: bool,
    /// Unmapped blocks read as zeroes.
    pub lbprz: bool,
}

impl Capacity {
    /// The encoded length.
    pub const LEN: usize = 32;

    /// The capacity in bytes (`None` if it overflows).
    pub fn bytes(&self) -> Option<u64> {
        self.last_lba
            .checked_add(1)?
            .checked_mul(u64::from(self.block_len))
    }

    pub fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&self.last_lba.to_be_bytes());
        b[8..12].copy_from_slice(&self.block_len.to_be_bytes());
        b[13] = self.physical_exponent & 0x0f;
        b[14] = if self.lbpme { 0x80 } else { 0 } | if self.lbprz { 0x40 } else { 0 };
        b
    }

    pub fn decode(b: &[u8]) -> Result<Capacity, CodecError> {
        if b.len() < 14 {
            return Err(CodecError::Malformed(format!(
                "READ CAPACITY(16) data of {} bytes is too short",
                b.len()
            )));
        }
        let mut lba = [0u8; 8];
        lba.copy_from_slice(&b[0..8]);
        let flags = b.get(14).copied().unwrap_or(0);
        Ok(Capacity {
            last_lba: u64::from_be_bytes(lba),
            block_len: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            physical_exponent: b[13] & 0x0f,
            lbpme: flags & 0x80 != 0,
            lbprz: flags & 0x40 != 0,
        })
    }
}

/// The Block Limits VPD page (0xB0). Lengths are in logical blocks; 0 means "not reported".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockLimits {
    pub optimal_granularity: u16,
    pub max_transfer_len: u32,
    pub optimal_transfer_len: u32,
    pub max_unmap_lba_count: u32,
    pub max_unmap_descriptors: u32,
    pub optimal_unmap_granularity: u32,
    pub max_write_same_len: u64,
}

impl BlockLimits {
    /// The encoded length (header and the SBC-3 page length 0x3c).
    pub const LEN: usize = 64;

    pub fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[1] = vpd::BLOCK_LIMITS;
        b[3] = 0x3c;
        b[6..8].copy_from_slice(&self.optimal_granularity.to_be_bytes());
        b[8..12].copy_from_slice(&self.max_transfer_len.to_be_bytes());
        b[12..16].copy_from_slice(&self.optimal_transfer_len.to_be_bytes());
        b[20..24].copy_from_slice(&self.max_unmap_lba_count.to_be_bytes());
        b[24..28].copy_from_slice(&self.max_unmap_descriptors.to_be_bytes());
        b[28..32].copy_from_slice(&self.optimal_unmap_granularity.to_be_bytes());
        b[36..44].copy_from_slice(&self.max_write_same_len.to_be_bytes());
        b
    }

    /// Decode the page; fields the target's shorter page leaves out read as 0.
    pub fn decode(b: &[u8]) -> Result<BlockLimits, CodecError> {
        vpd_check(b, vpd::BLOCK_LIMITS)?;
        let page_end = (4 + usize::from(u16::from_be_bytes([b[2], b[3]]))).min(b.len());
        let b = &b[..page_end];
        let u32_at = |at: usize| {
            b.get(at..at + 4)
                .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
                .unwrap_or(0)
        };
        Ok(BlockLimits {
            optimal_granularity: b
                .get(6..8)
                .map(|x| u16::from_be_bytes([x[0], x[1]]))
                .unwrap_or(0),
            max_transfer_len: u32_at(8),
            optimal_transfer_len: u32_at(12),
            max_unmap_lba_count: u32_at(20),
            max_unmap_descriptors: u32_at(24),
            optimal_unmap_granularity: u32_at(28),
            max_write_same_len: b
                .get(36..44)
                .map(|x| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(x);
                    u64::from_be_bytes(a)
                })
                .unwrap_or(0),
        })
    }
}

/// The Logical Block Provisioning VPD page (0xB2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Provisioning {
    /// UNMAP is supported.
    pub lbpu: bool,
    /// WRITE SAME(16) with the UNMAP bit is supported.
    pub lbpws: bool,
    /// WRITE SAME(10) with the UNMAP bit is supported.
    pub lbpws10: bool,
    /// What unmapped blocks read as (0: unspecified, 1: zeroes).
    pub lbprz: u8,
    /// 0: fully provisioned, 1: resource provisioned, 2: thin provisioned.
    pub provisioning_type: u8,
}

impl Provisioning {
    pub const LEN: usize = 8;

    pub fn encode(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[1] = vpd::LOGICAL_BLOCK_PROVISIONING;
        b[3] = 4;
        b[5] = if self.lbpu { 0x80 } else { 0 }
            | if self.lbpws { 0x40 } else { 0 }
            | if self.lbpws10 { 0x20 } else { 0 }
            | ((self.lbprz & 0x07) << 2);
        b[6] = self.provisioning_type & 0x07;
        b
    }

    pub fn decode(b: &[u8]) -> Result<Provisioning, CodecError> {
        vpd_check(b, vpd::LOGICAL_BLOCK_PROVISIONING)?;
        let f = b.get(5).copied().unwrap_or(0);
        Ok(Provisioning {
            lbpu: f & 0x80 != 0,
            lbpws: f & 0x40 != 0,
            lbpws10: f & 0x20 != 0,
            lbprz: (f >> 2) & 0x07,
            provisioning_type: b.get(6).copied().unwrap_or(0) & 0x07,
        })
    }
}

fn vpd_check(b: &[u8], page: u8) -> Result<(), CodecError> {
    if b.len() < 4 {
        return Err(CodecError::Malformed(format!(
            "VPD page {page:#04x} of {} bytes is too short",
            b.len()
        )));
    }
    if b[1] != page {
        return Err(CodecError::Malformed(format!(
            "asked for VPD page {page:#04x}, got {:#04x}",
            b[1]
        )));
    }
    Ok(())
}

/// The list of supported VPD pages (page 0x00).
pub fn decode_supported_pages(b: &[u8]) -> Result<Vec<u8>, CodecError> {
    vpd_check(b, vpd::SUPPORTED_PAGES)?;
    let n = usize::from(u16::from_be_bytes([b[2], b[3]]));
    Ok(b[4..].iter().take(n).copied().collect())
}

/// Encode the supported-pages VPD page.
pub fn encode_supported_pages(pages: &[u8]) -> Vec<u8> {
    let mut b = vec![0, vpd::SUPPORTED_PAGES, 0, pages.len() as u8];
    b.extend_from_slice(pages);
    b
}

/// Peripheral device types.
pub mod device_type {
    pub const DISK: u8 = 0x00;
    pub const NONE: u8 = 0x1f;
    /// Storage array controller (the LUN 0 of many targets).
    pub const CONTROLLER: u8 = 0x0c;
}

/// Standard INQUIRY data (the parts an initiator of a disk looks at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inquiry {
    /// 0: a device is connected; 1: not now; 3: no device can be here.
    pub qualifier: u8,
    pub device_type: u8,
    pub removable: bool,
    pub vendor: String,
    pub product: String,
    pub revision: String,
}

impl Inquiry {
    pub const LEN: usize = 36;

    pub fn encode(&self) -> [u8; 36] {
        let mut b = [b' '; 36];
        b[0] = (self.qualifier << 5) | (self.device_type & 0x1f);
        b[1] = if self.removable { 0x80 } else { 0 };
        b[2] = 0x06; // SPC-4
        b[3] = 0x02; // response data format
        b[4] = 31; // additional length
        b[5] = 0;
        b[6] = 0;
        b[7] = 0x02; // CmdQue
        fill(&mut b[8..16], &self.vendor);
        fill(&mut b[16..32], &self.product);
        fill(&mut b[32..36], &self.revision);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Inquiry, CodecError> {
        if b.len() < 8 {
            return Err(CodecError::Malformed(format!(
                "INQUIRY data of {} bytes is too short",
                b.len()
            )));
        }
        let text = |r: std::ops::Range<usize>| {
            b.get(r)
                .map(|s| String::from_utf8_lossy(s).trim().to_string())
                .unwrap_or_default()
        };
        Ok(Inquiry {
            qualifier: b[0] >> 5,
            device_type: b[0] & 0x1f,
            removable: b[1] & 0x80 != 0,
            vendor: text(8..16),
            product: text(16..32),
            revision: text(32..36),
        })
    }
}

fn fill(dst: &mut [u8], s: &str) {
    for (d, c) in dst.iter_mut().zip(s.bytes().chain(std::iter::repeat(b' '))) {
        *d = if c.is_ascii_graphic() || c == b' ' {
            c
        } else {
            b'?'
        };
    }
}

/// REPORT LUNS parameter data: the raw 8-byte LUNs (see [`super::decode_lun`]).
pub fn encode_report_luns(luns: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + 8 * luns.len());
    b.extend_from_slice(&((luns.len() * 8) as u32).to_be_bytes());
    b.extend_from_slice(&[0; 4]);
    for l in luns {
        b.extend_from_slice(&l.to_be_bytes());
    }
    b
}

/// Decode REPORT LUNS data, taking the LUNs present in `b` (the list may have been cut short
/// by the allocation length; the header's full length is returned too).
pub fn decode_report_luns(b: &[u8]) -> Result<(Vec<u64>, u32), CodecError> {
    if b.len() < 8 {
        return Err(CodecError::Malformed(format!(
            "REPORT LUNS data of {} bytes is too short",
            b.len()
        )));
    }
    let list_len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let luns = b[8..]
        .chunks_exact(8)
        .take(list_len as usize / 8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect();
    Ok((luns, list_len))
}

/// What MODE SENSE(6) for the caching page says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModeSense {
    /// The medium is write-protected.
    pub write_protect: bool,
    /// The DPO and FUA bits are supported.
    pub dpofua: bool,
    /// The caching page was returned and has the write cache enabled.
    pub write_cache: Option<bool>,
}

/// The caching mode page code.
pub const CACHING_PAGE: u8 = 0x08;

impl ModeSense {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; 4];
        b[2] = if self.write_protect { 0x80 } else { 0 } | if self.dpofua { 0x10 } else { 0 };
        if let Some(wce) = self.write_cache {
            let mut page = [0u8; 20];
            page[0] = CACHING_PAGE;
            page[1] = 18;
            page[2] = if wce { 0x04 } else { 0 };
            b.extend_from_slice(&page);
        }
        b[0] = (b.len() - 1) as u8;
        b
    }

    pub fn decode(b: &[u8]) -> Result<ModeSense, CodecError> {
        if b.len() < 4 {
            return Err(CodecError::Malformed(format!(
                "MODE SENSE data of {} bytes is too short",
                b.len()
            )));
        }
        let end = (usize::from(b[0]) + 1).min(b.len());
        let mut at = 4 + usize::from(b[3]);
        let mut write_cache = None;
        while at + 2 <= end {
            let code = b[at] & 0x3f;
            let spf = b[at] & 0x40 != 0;
            let (len, body) = if spf {
                if at + 4 > end {
                    break;
                }
                (
                    usize::from(u16::from_be_bytes([b[at + 2], b[at + 3]])),
                    at + 4,
                )
            } else {
                (usize::from(b[at + 1]), at + 2)
            };
            if code == CACHING_PAGE && !spf {
                if let Some(&f) = b.get(body).filter(|_| body < end) {
                    write_cache = Some(f & 0x04 != 0);
                }
            }
            at = body + len;
        }
        Ok(ModeSense {
            write_protect: b[2] & 0x80 != 0,
            dpofua: b[2] & 0x10 != 0,
            write_cache,
        })
    }
}

/// The UNMAP parameter list for `(lba, blocks)` ranges.
pub fn encode_unmap(ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + 16 * ranges.len());
    let desc_len = (16 * ranges.len()) as u16;
    b.extend_from_slice(&(desc_len + 6).to_be_bytes());
    b.extend_from_slice(&desc_len.to_be_bytes());
    b.extend_from_slice(&[0; 4]);
    for &(lba, n) in ranges {
        b.extend_from_slice(&lba.to_be_bytes());
        b.extend_from_slice(&n.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
    }
    b
}

/// Decode an UNMAP parameter list.
pub fn decode_unmap(b: &[u8]) -> Result<Vec<(u64, u32)>, CodecError> {
    if b.len() < 8 {
        return Err(CodecError::Malformed(format!(
            "UNMAP parameter list of {} bytes is too short",
            b.len()
        )));
    }
    let desc_len = usize::from(u16::from_be_bytes([b[2], b[3]]));
    if 8 + desc_len > b.len() || !desc_len.is_multiple_of(16) {
        return Err(CodecError::Malformed(format!(
            "UNMAP block descriptors of {desc_len} bytes do not fit a list of {} bytes",
            b.len()
        )));
    }
    Ok(b[8..8 + desc_len]
        .chunks_exact(16)
        .map(|d| {
            let mut lba = [0u8; 8];
            lba.copy_from_slice(&d[..8]);
            (
                u64::from_be_bytes(lba),
                u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
            )
        })
        .collect())
}

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
                    information: (valid && b.len() >= 7)
                        .then(|| u64::from(u32::from_be_bytes([b[3], b[4], b[5], b[6]]))),
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
