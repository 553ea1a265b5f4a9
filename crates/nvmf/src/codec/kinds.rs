//! A command decoded by kind: admin commands by opcode, NVM I/O commands with their block
//! ranges, fabrics commands on either queue (see [`super::fabrics`]), and the Dataset
//! Management ranges.

use strata_bdev::field::{le32, le64};

use super::command::{admin_opcode, io_opcode, Command};
use super::fabrics::Fabrics;

/// An admin command, by opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminCommand {
    Identify {
        cns: u8,
        cntid: u16,
        csi: u8,
    },
    GetLogPage {
        lid: u8,
        lsp: u8,
        /// Retain asynchronous event: reading does not clear the log.
        rae: bool,
        /// Bytes asked for.
        len: u64,
        /// Byte offset into the log.
        offset: u64,
    },
    GetFeatures {
        fid: u8,
        /// 0 current, 1 default, 2 saved, 3 supported capabilities.
        sel: u8,
        cdw11: u32,
    },
    SetFeatures {
        fid: u8,
        save: bool,
        cdw11: u32,
    },
    AsyncEventRequest,
    KeepAlive,
    Abort {
        sqid: u16,
        cid: u16,
    },
    Fabrics(Fabrics),
    Other(u8),
}

impl AdminCommand {
    pub fn parse(c: &Command) -> AdminCommand {
        match c.opcode {
            admin_opcode::IDENTIFY => AdminCommand::Identify {
                cns: c.cdw10 as u8,
                cntid: (c.cdw10 >> 16) as u16,
                csi: (c.cdw11 >> 24) as u8,
            },
            admin_opcode::GET_LOG_PAGE => {
                let numd = u64::from(c.cdw10 >> 16) | u64::from(c.cdw11 & 0xFFFF) << 16;
                AdminCommand::GetLogPage {
                    lid: c.cdw10 as u8,
                    lsp: ((c.cdw10 >> 8) & 0x7F) as u8,
                    rae: c.cdw10 & 1 << 15 != 0,
                    len: (numd + 1) * 4,
                    offset: u64::from(c.cdw12) | u64::from(c.cdw13) << 32,
                }
            }
            admin_opcode::GET_FEATURES => AdminCommand::GetFeatures {
                fid: c.cdw10 as u8,
                sel: ((c.cdw10 >> 8) & 7) as u8,
                cdw11: c.cdw11,
            },
            admin_opcode::SET_FEATURES => AdminCommand::SetFeatures {
                fid: c.cdw10 as u8,
                save: c.cdw10 & 1 << 31 != 0,
                cdw11: c.cdw11,
            },
            admin_opcode::ASYNC_EVENT_REQUEST => AdminCommand::AsyncEventRequest,
            admin_opcode::KEEP_ALIVE => AdminCommand::KeepAlive,
            admin_opcode::ABORT => AdminCommand::Abort {
                sqid: c.cdw10 as u16,
                cid: (c.cdw10 >> 16) as u16,
            },
            admin_opcode::FABRICS => AdminCommand::Fabrics(Fabrics::parse(c)),
            other => AdminCommand::Other(other),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// I/O commands

/// Read and Write: a block range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    pub slba: u64,
    /// Number of blocks (1-based: the wire's 0's based field plus one).
    pub nlb: u32,
    pub fua: bool,
}

/// An NVM I/O command, by opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoCommand {
    Read(BlockRange),
    Write(BlockRange),
    Flush,
    WriteZeroes {
        range: BlockRange,
        /// The blocks may be deallocated.
        deac: bool,
    },
    DatasetManagement {
        /// Number of ranges in the data (1-based).
        ranges: u32,
        /// Attribute: deallocate.
        deallocate: bool,
    },
    Fabrics(Fabrics),
    Other(u8),
}

impl IoCommand {
    pub fn parse(c: &Command) -> IoCommand {
        let range = || BlockRange {
            slba: u64::from(c.cdw10) | u64::from(c.cdw11) << 32,
            nlb: (c.cdw12 & 0xFFFF) + 1,
            fua: c.cdw12 & 1 << 30 != 0,
        };
        match c.opcode {
            io_opcode::READ => IoCommand::Read(range()),
            io_opcode::WRITE => IoCommand::Write(range()),
            io_opcode::FLUSH => IoCommand::Flush,
            io_opcode::WRITE_ZEROES => IoCommand::WriteZeroes {
                range: range(),
                deac: c.cdw12 & 1 << 25 != 0,
            },
            io_opcode::DATASET_MANAGEMENT => IoCommand::DatasetManagement {
                ranges: (c.cdw10 & 0xFF) + 1,
                deallocate: c.cdw11 & 1 << 2 != 0,
            },
            admin_opcode::FABRICS => IoCommand::Fabrics(Fabrics::parse(c)),
            other => IoCommand::Other(other),
        }
    }
}

/// One Dataset Management range (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DsmRange {
    pub attributes: u32,
    /// Length in blocks.
    pub nlb: u32,
    pub slba: u64,
}

/// The size of one [`DsmRange`].
pub const DSM_RANGE_LEN: usize = 16;

impl DsmRange {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.attributes.to_le_bytes());
        out.extend_from_slice(&self.nlb.to_le_bytes());
        out.extend_from_slice(&self.slba.to_le_bytes());
    }

    /// Decode every whole range in `b`.
    pub fn decode_all(b: &[u8]) -> Vec<DsmRange> {
        b.chunks_exact(DSM_RANGE_LEN)
            .map(|r| DsmRange {
                attributes: le32(r, 0),
                nlb: le32(r, 4),
                slba: le64(r, 8),
            })
            .collect()
    }
}
