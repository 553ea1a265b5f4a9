//! Submission and completion queue entries, status codes, opcodes, and builders for the admin
//! and NVM I/O commands Strata sends (the fabrics ones are in [`super::fabrics`], the decoding
//! of a command by kind in [`super::kinds`]).

use std::fmt;

use strata_bdev::field::{le16, le32, le64};

/// Admin command opcodes.
pub mod admin_opcode {
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0A;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0C;
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Fabrics commands, on any queue; the type is in byte 4 (`fabrics::fctype`).
    pub const FABRICS: u8 = 0x7F;
}

/// NVM command set I/O opcodes.
pub mod io_opcode {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
    pub const RESERVATION_REGISTER: u8 = 0x0D;
    pub const RESERVATION_REPORT: u8 = 0x0E;
    pub const RESERVATION_ACQUIRE: u8 = 0x11;
    pub const RESERVATION_RELEASE: u8 = 0x15;
}

/// SGL descriptor identifiers (type in the high nibble, subtype in the low one).
pub mod sgl_id {
    /// Data block, offset: data in the command capsule.
    pub const IN_CAPSULE: u8 = 0x01;
    /// Transport data block (NVMe/TCP): data moved by R2T/H2CData or C2HData.
    pub const TRANSPORT: u8 = 0x5A;
}

/// How a command's data moves, from the low two bits of its opcode (or fabrics type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    None,
    HostToController,
    ControllerToHost,
    Bidirectional,
}

impl Direction {
    pub fn of(code: u8) -> Direction {
        match code & 3 {
            0 => Direction::None,
            1 => Direction::HostToController,
            2 => Direction::ControllerToHost,
            _ => Direction::Bidirectional,
        }
    }
}

/// The data pointer of a command: one SGL descriptor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sgl {
    pub address: u64,
    pub length: u32,
    /// Bytes 12–14 (a key for keyed descriptors; reserved otherwise).
    pub reserved: [u8; 3],
    /// Type and subtype ([`sgl_id`]).
    pub id: u8,
}

impl Sgl {
    /// Data of `length` bytes in the capsule.
    pub fn in_capsule(length: u32) -> Sgl {
        Sgl {
            address: 0,
            length,
            reserved: [0; 3],
            id: sgl_id::IN_CAPSULE,
        }
    }

    /// Data of `length` bytes moved by the transport (R2T/H2CData, C2HData).
    pub fn transport(length: u32) -> Sgl {
        Sgl {
            address: 0,
            length,
            reserved: [0; 3],
            id: sgl_id::TRANSPORT,
        }
    }
}

/// A submission queue entry (64 bytes), field by field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Command {
    pub opcode: u8,
    /// FUSE (bits 1:0) and PSDT (bits 7:6).
    pub flags: u8,
    pub cid: u16,
    /// Namespace ID; for fabrics commands, byte 4 is the fabrics type.
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub mptr: u64,
    pub dptr: Sgl,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

impl Command {
    /// Decode 64 bytes (`b` must hold them).
    pub fn decode(b: &[u8]) -> Command {
        let b: &[u8; 64] = b[..64].try_into().expect("64 bytes");
        Command {
            opcode: b[0],
            flags: b[1],
            cid: le16(b, 2),
            nsid: le32(b, 4),
            cdw2: le32(b, 8),
            cdw3: le32(b, 12),
            mptr: le64(b, 16),
            dptr: Sgl {
                address: le64(b, 24),
                length: le32(b, 32),
                reserved: [b[36], b[37], b[38]],
                id: b[39],
            },
            cdw10: le32(b, 40),
            cdw11: le32(b, 44),
            cdw12: le32(b, 48),
            cdw13: le32(b, 52),
            cdw14: le32(b, 56),
            cdw15: le32(b, 60),
        }
    }

    /// Encode into 64 bytes.
    pub fn encode(&self, b: &mut [u8; 64]) {
        b[0] = self.opcode;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.cid.to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[8..12].copy_from_slice(&self.cdw2.to_le_bytes());
        b[12..16].copy_from_slice(&self.cdw3.to_le_bytes());
        b[16..24].copy_from_slice(&self.mptr.to_le_bytes());
        b[24..32].copy_from_slice(&self.dptr.address.to_le_bytes());
        b[32..36].copy_from_slice(&self.dptr.length.to_le_bytes());
        b[36..39].copy_from_slice(&self.dptr.reserved);
        b[39] = self.dptr.id;
        for (i, dw) in [
            self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        ]
        .into_iter()
        .enumerate()
        {
            b[40 + 4 * i..44 + 4 * i].copy_from_slice(&dw.to_le_bytes());
        }
    }

    /// The fabrics command type (byte 4), for opcode [`admin_opcode::FABRICS`].
    pub fn fctype(&self) -> u8 {
        self.nsid as u8
    }

    /// Whether this is a fabrics command.
    pub fn is_fabrics(&self) -> bool {
        self.opcode == admin_opcode::FABRICS
    }

    /// How this command's data moves.
    pub fn direction(&self) -> Direction {
        if self.is_fabrics() {
            Direction::of(self.fctype())
        } else {
            Direction::of(self.opcode)
        }
    }

    /// The fused-operation bits.
    pub fn fuse(&self) -> u8 {
        self.flags & 3
    }

    pub(super) fn base(opcode: u8, cid: u16, nsid: u32, dptr: Sgl) -> Command {
        Command {
            opcode,
            // PSDT 01b: SGLs, which fabrics require of every command (Linux's nvmet refuses
            // anything else with Invalid Field).
            flags: 0x40,
            cid,
            nsid,
            dptr,
            ..Command::default()
        }
    }

    /// Identify, returning 4096 bytes.
    pub fn identify(cid: u16, cns: u8, nsid: u32, csi: u8) -> Command {
        Command {
            cdw10: u32::from(cns),
            cdw11: u32::from(csi) << 24,
            ..Command::base(
                admin_opcode::IDENTIFY,
                cid,
                nsid,
                Sgl::transport(IDENTIFY_LEN as u32),
            )
        }
    }

    /// Get Log Page: `len` bytes (a multiple of 4) of log `lid` from byte `offset`.
    pub fn get_log_page(cid: u16, lid: u8, nsid: u32, len: u32, offset: u64, rae: bool) -> Command {
        let numd = len / 4 - 1;
        Command {
            cdw10: u32::from(lid) | u32::from(rae) << 15 | (numd & 0xFFFF) << 16,
            cdw11: numd >> 16,
            cdw12: offset as u32,
            cdw13: (offset >> 32) as u32,
            ..Command::base(admin_opcode::GET_LOG_PAGE, cid, nsid, Sgl::transport(len))
        }
    }

    /// Set Features with no data.
    pub fn set_features(cid: u16, fid: u8, cdw11: u32) -> Command {
        Command {
            cdw10: u32::from(fid),
            cdw11,
            ..Command::base(admin_opcode::SET_FEATURES, cid, 0, Sgl::default())
        }
    }

    /// Get Features (current value) with no data.
    pub fn get_features(cid: u16, fid: u8) -> Command {
        Command {
            cdw10: u32::from(fid),
            ..Command::base(admin_opcode::GET_FEATURES, cid, 0, Sgl::default())
        }
    }

    /// Keep Alive.
    pub fn keep_alive(cid: u16) -> Command {
        Command::base(admin_opcode::KEEP_ALIVE, cid, 0, Sgl::default())
    }

    /// Asynchronous Event Request.
    pub fn async_event_request(cid: u16) -> Command {
        Command::base(admin_opcode::ASYNC_EVENT_REQUEST, cid, 0, Sgl::default())
    }

    /// Read or Write of `nlb` blocks (at least 1) at `slba`, with `dptr` describing the data.
    pub fn rw(
        opcode: u8,
        cid: u16,
        nsid: u32,
        slba: u64,
        nlb: u32,
        fua: bool,
        dptr: Sgl,
    ) -> Command {
        Command {
            cdw10: slba as u32,
            cdw11: (slba >> 32) as u32,
            cdw12: (nlb - 1) & 0xFFFF | u32::from(fua) << 30,
            ..Command::base(opcode, cid, nsid, dptr)
        }
    }

    /// Flush.
    pub fn flush(cid: u16, nsid: u32) -> Command {
        Command::base(io_opcode::FLUSH, cid, nsid, Sgl::default())
    }

    /// Write Zeroes of `nlb` blocks (at least 1); `deac`: the blocks may be deallocated.
    pub fn write_zeroes(
        cid: u16,
        nsid: u32,
        slba: u64,
        nlb: u32,
        deac: bool,
        fua: bool,
    ) -> Command {
        Command {
            cdw10: slba as u32,
            cdw11: (slba >> 32) as u32,
            cdw12: (nlb - 1) & 0xFFFF | u32::from(deac) << 25 | u32::from(fua) << 30,
            ..Command::base(io_opcode::WRITE_ZEROES, cid, nsid, Sgl::default())
        }
    }

    /// Dataset Management over `ranges` ranges (at least 1), whose data (16 bytes each) is
    /// described by `dptr`; `deallocate`: the AD attribute.
    pub fn dataset_management(
        cid: u16,
        nsid: u32,
        ranges: u32,
        deallocate: bool,
        dptr: Sgl,
    ) -> Command {
        Command {
            cdw10: (ranges - 1) & 0xFF,
            cdw11: u32::from(deallocate) << 2,
            ..Command::base(io_opcode::DATASET_MANAGEMENT, cid, nsid, dptr)
        }
    }
}

/// A completion queue entry (16 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completion {
    /// Command-specific result: dword 0 in the low half, dword 1 in the high half.
    pub result: u64,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
}

impl Completion {
    /// Decode 16 bytes (`b` must hold them).
    pub fn decode(b: &[u8]) -> Completion {
        Completion {
            result: le64(b, 0),
            sqhd: le16(b, 8),
            sqid: le16(b, 10),
            cid: le16(b, 12),
            status: Status::from_field(le16(b, 14) >> 1),
        }
    }

    /// Encode into 16 bytes (the phase bit is 0: fabrics have no completion queue memory).
    pub fn encode(&self, b: &mut [u8; 16]) {
        b[0..8].copy_from_slice(&self.result.to_le_bytes());
        b[8..10].copy_from_slice(&self.sqhd.to_le_bytes());
        b[10..12].copy_from_slice(&self.sqid.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        b[14..16].copy_from_slice(&(self.status.field() << 1).to_le_bytes());
    }
}

/// Status code types.
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
    pub const PATH: u8 = 3;
}

/// A command's status: the 15-bit status field of a completion (SC, SCT, CRD, More, DNR).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Status(u16);

impl Status {
    pub const SUCCESS: Status = Status(0);

    // Generic command status.
    pub const INVALID_OPCODE: Status = Status::new(sct::GENERIC, 0x01);
    pub const INVALID_FIELD: Status = Status::new(sct::GENERIC, 0x02);
    pub const CID_CONFLICT: Status = Status::new(sct::GENERIC, 0x03);
    pub const DATA_TRANSFER_ERROR: Status = Status::new(sct::GENERIC, 0x04);
    pub const INTERNAL_ERROR: Status = Status::new(sct::GENERIC, 0x06);
    pub const ABORT_REQUESTED: Status = Status::new(sct::GENERIC, 0x07);
    pub const ABORTED_SQ_DELETION: Status = Status::new(sct::GENERIC, 0x08);
    pub const INVALID_NAMESPACE: Status = Status::new(sct::GENERIC, 0x0B);
    pub const COMMAND_SEQUENCE_ERROR: Status = Status::new(sct::GENERIC, 0x0C);
    pub const DATA_SGL_LENGTH_INVALID: Status = Status::new(sct::GENERIC, 0x0F);
    pub const SGL_TYPE_INVALID: Status = Status::new(sct::GENERIC, 0x11);
    pub const SGL_OFFSET_INVALID: Status = Status::new(sct::GENERIC, 0x16);
    pub const KEEP_ALIVE_INVALID: Status = Status::new(sct::GENERIC, 0x1A);
    pub const NAMESPACE_WRITE_PROTECTED: Status = Status::new(sct::GENERIC, 0x20);
    pub const TRANSIENT_TRANSPORT_ERROR: Status = Status::new(sct::GENERIC, 0x22);
    pub const LBA_OUT_OF_RANGE: Status = Status::new(sct::GENERIC, 0x80);
    pub const CAPACITY_EXCEEDED: Status = Status::new(sct::GENERIC, 0x81);
    pub const NAMESPACE_NOT_READY: Status = Status::new(sct::GENERIC, 0x82);
    pub const RESERVATION_CONFLICT: Status = Status::new(sct::GENERIC, 0x83);

    // Command-specific status.
    pub const AER_LIMIT_EXCEEDED: Status = Status::new(sct::COMMAND_SPECIFIC, 0x05);
    pub const INVALID_LOG_PAGE: Status = Status::new(sct::COMMAND_SPECIFIC, 0x09);
    pub const FEATURE_NOT_SAVEABLE: Status = Status::new(sct::COMMAND_SPECIFIC, 0x0D);
    pub const CONNECT_INCOMPATIBLE_FORMAT: Status = Status::new(sct::COMMAND_SPECIFIC, 0x80);
    pub const CONNECT_CONTROLLER_BUSY: Status = Status::new(sct::COMMAND_SPECIFIC, 0x81);
    pub const CONNECT_INVALID_PARAMETERS: Status = Status::new(sct::COMMAND_SPECIFIC, 0x82);
    pub const CONNECT_INVALID_HOST: Status = Status::new(sct::COMMAND_SPECIFIC, 0x84);

    // Media and data integrity errors.
    pub const WRITE_FAULT: Status = Status::new(sct::MEDIA, 0x80);
    pub const UNRECOVERED_READ_ERROR: Status = Status::new(sct::MEDIA, 0x81);
    pub const ACCESS_DENIED: Status = Status::new(sct::MEDIA, 0x86);

    /// A status of type `sct` and code `sc`.
    pub const fn new(sct: u8, sc: u8) -> Status {
        Status(sc as u16 | ((sct as u16 & 7) << 8))
    }

    /// The same status with Do Not Retry set.
    pub const fn dnr(self) -> Status {
        Status(self.0 | 1 << 14)
    }

    /// From the 15-bit status field.
    pub const fn from_field(field: u16) -> Status {
        Status(field & 0x7FFF)
    }

    /// The 15-bit status field.
    pub const fn field(self) -> u16 {
        self.0
    }

    pub const fn sc(self) -> u8 {
        self.0 as u8
    }

    pub const fn sct(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }

    /// Do Not Retry.
    pub const fn is_dnr(self) -> bool {
        self.0 & 1 << 14 != 0
    }

    pub const fn is_success(self) -> bool {
        self.sc() == 0 && self.sct() == 0
    }

    /// The status with CRD, More and DNR cleared, to compare with the constants.
    pub const fn code(self) -> Status {
        Status(self.0 & 0x7FF)
    }

    /// What the status means, for messages.
    pub fn description(self) -> &'static str {
        let c = self.code();
        match c {
            Status::SUCCESS => "success",
            Status::INVALID_OPCODE => "invalid command opcode",
            Status::INVALID_FIELD => "invalid field in command",
            Status::CID_CONFLICT => "command ID conflict",
            Status::DATA_TRANSFER_ERROR => "data transfer error",
            Status::INTERNAL_ERROR => "internal error",
            Status::ABORT_REQUESTED => "command abort requested",
            Status::ABORTED_SQ_DELETION => "command aborted due to SQ deletion",
            Status::INVALID_NAMESPACE => "invalid namespace or format",
            Status::COMMAND_SEQUENCE_ERROR => "command sequence error",
            Status::DATA_SGL_LENGTH_INVALID => "data SGL length invalid",
            Status::SGL_TYPE_INVALID => "SGL descriptor type invalid",
            Status::SGL_OFFSET_INVALID => "SGL offset invalid",
            Status::KEEP_ALIVE_INVALID => "keep alive timeout invalid",
            Status::NAMESPACE_WRITE_PROTECTED => "namespace is write protected",
            Status::TRANSIENT_TRANSPORT_ERROR => "transient transport error",
            Status::LBA_OUT_OF_RANGE => "LBA out of range",
            Status::CAPACITY_EXCEEDED => "capacity exceeded",
            Status::NAMESPACE_NOT_READY => "namespace not ready",
            Status::RESERVATION_CONFLICT => "reservation conflict",
            Status::AER_LIMIT_EXCEEDED => "asynchronous event request limit exceeded",
            Status::INVALID_LOG_PAGE => "invalid log page",
            Status::FEATURE_NOT_SAVEABLE => "feature identifier not saveable",
            Status::CONNECT_INCOMPATIBLE_FORMAT => "connect: incompatible format",
            Status::CONNECT_CONTROLLER_BUSY => "connect: controller busy",
            Status::CONNECT_INVALID_PARAMETERS => "connect: invalid parameters",
            Status::CONNECT_INVALID_HOST => "connect: invalid host",
            Status::WRITE_FAULT => "write fault",
            Status::UNRECOVERED_READ_ERROR => "unrecovered read error",
            Status::ACCESS_DENIED => "access denied",
            _ => "unknown status",
        }
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Status(sct {:#x}, sc {:#04x}{}: {})",
            self.sct(),
            self.sc(),
            if self.is_dnr() { ", DNR" } else { "" },
            self.description()
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (status type {:#x}, code {:#04x})",
            self.description(),
            self.sct(),
            self.sc()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Admin commands

/// Identify CNS values.
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NAMESPACES: u8 = 0x02;
    pub const NS_DESCRIPTORS: u8 = 0x03;
    /// I/O command set specific Identify Namespace.
    pub const CS_NAMESPACE: u8 = 0x05;
    /// I/O command set specific Identify Controller.
    pub const CS_CONTROLLER: u8 = 0x06;
}

/// The length of Identify data.
pub const IDENTIFY_LEN: usize = 4096;

/// Log page identifiers.
pub mod log_id {
    pub const ERROR: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    pub const CHANGED_NAMESPACES: u8 = 0x04;
    pub const DISCOVERY: u8 = 0x70;
}

/// Feature identifiers.
pub mod feature {
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0B;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0F;
    pub const HOST_IDENTIFIER: u8 = 0x81;
}

/// Asynchronous event configuration bits (Set Features 0x0B) and the matching event info.
pub mod aen {
    /// Namespace attribute notices.
    pub const CFG_NS_ATTRIBUTE: u32 = 1 << 8;
    /// Discovery log page change notices.
    pub const CFG_DISCOVERY_CHANGE: u32 = 1 << 31;
    /// Event type: notice.
    pub const TYPE_NOTICE: u32 = 2;
    /// Notice: namespace attribute changed.
    pub const INFO_NS_CHANGED: u32 = 0x00;
    /// Notice: discovery log page changed.
    pub const INFO_DISCOVERY_CHANGED: u32 = 0xF0;

    /// The completion dword 0 of an event.
    pub fn result(event_type: u32, info: u32, log_page: u8) -> u32 {
        event_type & 7 | (info & 0xFF) << 8 | u32::from(log_page) << 16
    }
}
