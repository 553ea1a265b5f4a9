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

pub mod scsi;
pub mod text;

use bytes::{BufMut, Bytes, BytesMut};

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

/// Fields of a SCSI Command PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    /// No unsolicited Data-Out follows (the F bit).
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub expected_len: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    /// The CDB, zero-padded to 16 bytes (longer CDBs need an AHS, which Strata never sends).
    pub cdb: [u8; 16],
}

/// Fields of a SCSI Response PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScsiResponse {
    /// Bits o, u, O, U (0x10, 0x08, 0x04, 0x02) of byte 1.
    pub flags: u8,
    /// 0: command completed at the target; otherwise the target failed it.
    pub response: u8,
    pub status: u8,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    pub bidi_residual: u32,
    pub residual: u32,
}

/// Residual flags of SCSI Response and Data-In.
pub mod residual {
    pub const BIDI_OVERFLOW: u8 = 0x10;
    pub const BIDI_UNDERFLOW: u8 = 0x08;
    pub const OVERFLOW: u8 = 0x04;
    pub const UNDERFLOW: u8 = 0x02;
}

/// Fields of a Data-Out PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

/// Fields of a Data-In PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataIn {
    pub final_: bool,
    pub ack: bool,
    /// Residual flags (O, U) — meaningful with `has_status`.
    pub flags: u8,
    /// The S bit: this PDU carries the command's status; no SCSI Response follows.
    pub has_status: bool,
    pub status: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub residual: u32,
}

/// Fields of an R2T PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_len: u32,
}

/// Fields of a NOP-Out PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    /// [`RESERVED_TAG`] when answering a target's ping.
    pub itt: u32,
    /// The target's tag when answering its ping, else [`RESERVED_TAG`].
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Fields of a NOP-In PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NopIn {
    pub lun: u64,
    /// The initiator's tag when answering its ping, else [`RESERVED_TAG`].
    pub itt: u32,
    /// A tag to echo in a NOP-Out when the target wants an answer, else [`RESERVED_TAG`].
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Fields of a Login Request PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub continue_: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Fields of a Login Response PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub continue_: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
}

/// Fields of a Text Request PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub continue_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Fields of a Text Response PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextResponse {
    pub final_: bool,
    pub continue_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Fields of a Logout Request PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    /// 0 close the session, 1 close the connection, 2 remove the connection for recovery.
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Fields of a Logout Response PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogoutResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

/// Fields of a Task Management Function Request PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    pub referenced_tag: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

/// Fields of a Task Management Function Response PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    /// 0: function complete; 1: task does not exist; others: refused.
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Fields of an Async Message PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: u64,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub event: u8,
    pub vcode: u8,
    pub param1: u16,
    pub param2: u16,
    pub param3: u16,
}

/// Fields of a Reject PDU (its data segment is the rejected PDU's header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    pub reason: u8,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
}

impl Reject {
    /// What a reject reason code means.
    pub fn reason_name(reason: u8) -> &'static str {
        match reason {
            0x02 => "data digest error",
            0x03 => "SNACK reject",
            0x04 => "protocol error",
            0x05 => "command not supported",
            0x06 => "immediate command rejected",
            0x07 => "task in progress",
            0x08 => "invalid data ack",
            0x09 => "invalid PDU field",
            0x0a => "out of resources",
            0x0b => "negotiation reset",
            0x0c => "waiting for logout",
            _ => "unknown reason",
        }
    }
}

/// The typed basic header segment of every PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

impl Header {
    /// The operation code.
    pub fn opcode(&self) -> u8 {
        match self {
            Header::NopOut(_) => opcode::NOP_OUT,
            Header::ScsiCommand(_) => opcode::SCSI_COMMAND,
            Header::TaskMgmtRequest(_) => opcode::TASK_MGMT_REQUEST,
            Header::LoginRequest(_) => opcode::LOGIN_REQUEST,
            Header::TextRequest(_) => opcode::TEXT_REQUEST,
            Header::DataOut(_) => opcode::DATA_OUT,
            Header::LogoutRequest(_) => opcode::LOGOUT_REQUEST,
            Header::NopIn(_) => opcode::NOP_IN,
            Header::ScsiResponse(_) => opcode::SCSI_RESPONSE,
            Header::TaskMgmtResponse(_) => opcode::TASK_MGMT_RESPONSE,
            Header::LoginResponse(_) => opcode::LOGIN_RESPONSE,
            Header::TextResponse(_) => opcode::TEXT_RESPONSE,
            Header::DataIn(_) => opcode::DATA_IN,
            Header::LogoutResponse(_) => opcode::LOGOUT_RESPONSE,
            Header::R2t(_) => opcode::R2T,
            Header::AsyncMessage(_) => opcode::ASYNC_MESSAGE,
            Header::Reject(_) => opcode::REJECT,
        }
    }

    /// The PDU's name, for messages.
    pub fn name(&self) -> &'static str {
        opcode_name(self.opcode())
    }

    /// The initiator task tag.
    pub fn itt(&self) -> u32 {
        match self {
            Header::NopOut(h) => h.itt,
            Header::ScsiCommand(h) => h.itt,
            Header::TaskMgmtRequest(h) => h.itt,
            Header::LoginRequest(h) => h.itt,
            Header::TextRequest(h) => h.itt,
            Header::DataOut(h) => h.itt,
            Header::LogoutRequest(h) => h.itt,
            Header::NopIn(h) => h.itt,
            Header::ScsiResponse(h) => h.itt,
            Header::TaskMgmtResponse(h) => h.itt,
            Header::LoginResponse(h) => h.itt,
            Header::TextResponse(h) => h.itt,
            Header::DataIn(h) => h.itt,
            Header::LogoutResponse(h) => h.itt,
            Header::R2t(h) => h.itt,
            Header::AsyncMessage(_) | Header::Reject(_) => RESERVED_TAG,
        }
    }

    /// `(StatSN, ExpCmdSN, MaxCmdSN)` of a target PDU that carries them.
    pub fn sequence(&self) -> Option<(u32, u32, u32)> {
        match *self {
            Header::NopIn(h) => Some((h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn)),
            Header::ScsiResponse(h) => Some((h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn)),
            Header::TaskMgmtResponse(h) => Some((h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn)),
            Header::LoginResponse(h) => Some((h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn)),
            Header::TextResponse(h) => Some((h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn)),
            Header::DataIn(h) => Some((h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn)),
            Header::LogoutResponse(h) => Some((h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn)),
            Header::R2t(h) => Some((h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn)),
            Header::AsyncMessage(h) => Some((h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn)),
            Header::Reject(h) => Some((h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn)),
            _ => None,
        }
    }

    /// Whether this target PDU consumes a StatSN (it carries a status): the initiator
    /// acknowledges it with ExpStatSN = StatSN + 1.
    pub fn carries_status(&self) -> bool {
        match self {
            Header::ScsiResponse(_)
            | Header::TaskMgmtResponse(_)
            | Header::LoginResponse(_)
            | Header::TextResponse(_)
            | Header::LogoutResponse(_)
            | Header::AsyncMessage(_)
            | Header::Reject(_) => true,
            Header::DataIn(h) => h.has_status,
            Header::NopIn(h) => h.itt != RESERVED_TAG,
            _ => false,
        }
    }

    /// Encode the BHS for a PDU with `ahs_len` bytes of AHS (a multiple of 4, under 1 KiB) and
    /// `data_len` bytes of data.
    pub fn encode(&self, ahs_len: usize, data_len: u32) -> [u8; BHS_LEN] {
        let mut b = [0u8; BHS_LEN];
        b[0] = self.opcode();
        debug_assert!(ahs_len.is_multiple_of(4) && ahs_len / 4 <= 255);
        b[4] = (ahs_len / 4) as u8;
        let dl = data_len.min(MAX_DATA_SEGMENT).to_be_bytes();
        b[5..8].copy_from_slice(&dl[1..]);
        match *self {
            Header::NopOut(h) => {
                b[0] |= imm(h.immediate);
                b[1] = 0x80;
                put_u64(&mut b, 8, h.lun);
                put_u32(&mut b, 16, h.itt);
                put_u32(&mut b, 20, h.ttt);
                put_u32(&mut b, 24, h.cmd_sn);
                put_u32(&mut b, 28, h.exp_stat_sn);
            }
            Header::ScsiCommand(h) => {
                b[0] |= imm(h.immediate);
                b[1] = flag(h.final_, 0x80)
                    | flag(h.read, 0x40)
                    | flag(h.write, 0x20)
                    | (h.attr & 0x07);
                put_u64(&mut b, 8, h.lun);
                put_u32(&mut b, 16, h.itt);
                put_u32(&mut b, 20, h.expected_len);
                put_u32(&mut b, 24, h.cmd_sn);
                put_u32(&mut b, 28, h.exp_stat_sn);
                b[32..48].copy_from_slice(&h.cdb);
            }
            Header::TaskMgmtRequest(h) => {
                b[0] |= imm(h.immediate);
                b[1] = 0x80 | (h.function & 0x7f);
                put_u64(&mut b, 8, h.lun);
                put_u32(&mut b, 16, h.itt);
                put_u32(&mut b, 20, h.referenced_tag);
                put_u32(&mut b, 24, h.cmd_sn);
                put_u32(&mut b, 28, h.exp_stat_sn);
                put_u32(&mut b, 32, h.ref_cmd_sn);
                put_u32(&mut b, 36, h.exp_data_sn);
            }
            Header::LoginRequest(h) => {
                b[0] |= 0x40;
                b[1] = flag(h.transit, 0x80)
                    | flag(h.continue_, 0x40)
                    | ((h.csg & 3) << 2)
                    | (h.nsg & 3);
                b[2] = h.version_max;
                b[3] = h.version_min;
                b[8..14].copy_from_slice(&h.isid);
                put_u16(&mut b, 14, h.tsih);
                put_u32(&mut b, 16, h.itt);
                put_u16(&mut b, 20, h.cid);
                put_u32(&mut b, 24, h.cmd_sn);
                put_u32(&mut b, 28, h.exp_stat_sn);
            }
            Header::TextRequest(h) => {
                b[0] |= imm(h.immediate);
                b[1] = flag(h.final_, 0x80) | flag(h.continue_, 0x40);
                put_u64(&mut b, 8, h.lun);
                put_u32(&mut b, 16, h.itt);
                put_u32(&mut b, 20, h.ttt);
                put_u32(&mut b, 24, h.cmd_sn);
                put_u32(&mut b, 28, h.exp_stat_sn);
            }
            Header::DataOut(h) => {
                b[1] = flag(h.final_, 0x80);
                put_u64(&mut b, 8, h.lun);
                put_u32(&mut b, 16, h.itt);
                put_u32(&mut b, 20, h.ttt);
                put_u32(&mut b, 28, h.exp_stat_sn);
                put_u32(&mut b, 36, h.data_sn);
                put_u32(&mut b, 40, h.buffer_offset);
            }
            Header::LogoutRequest(h) => {
                b[0] |= imm(h.immediate);
                b[1] = 0x80 | (h.reason & 0x7f);
                put_u32(&mut b, 16, h.itt);
                put_u16(&mut b, 20, h.cid);
                put_u32(&mut b, 24, h.cmd_sn);
                put_u32(&mut b, 28, h.exp_stat_sn);
            }
            Header::NopIn(h) => {
                b[1] = 0x80;
                put_u64(&mut b, 8, h.lun);
                put_u32(&mut b, 16, h.itt);
                put_u32(&mut b, 20, h.ttt);
                put_sequence(&mut b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
            }
            Header::ScsiResponse(h) => {
                b[1] = 0x80 | (h.flags & 0x1e);
                b[2] = h.response;
                b[3] = h.status;
                put_u32(&mut b, 16, h.itt);
                put_u32(&mut b, 20, h.snack_tag);
                put_sequence(&mut b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
                put_u32(&mut b, 36, h.exp_data_sn);
                put_u32(&mut b, 40, h.bidi_residual);
                put_u32(&mut b, 44, h.residual);
            }
            Header::TaskMgmtResponse(h) => {
                b[1] = 0x80;
                b[2] = h.response;
                put_u32(&mut b, 16, h.itt);
                put_sequence(&mut b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
            }
            Header::LoginResponse(h) => {
                b[1] = flag(h.transit, 0x80)
                    | flag(h.continue_, 0x40)
                    | ((h.csg & 3) << 2)
                    | (h.nsg & 3);
                b[2] = h.version_max;
                b[3] = h.version_active;
                b[8..14].copy_from_slice(&h.isid);
                put_u16(&mut b, 14, h.tsih);
                put_u32(&mut b, 16, h.itt);
                put_sequence(&mut b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
                b[36] = h.status_class;
                b[37] = h.status_detail;
            }
            Header::TextResponse(h) => {
                b[1] = flag(h.final_, 0x80) | flag(h.continue_, 0x40);
                put_u64(&mut b, 8, h.lun);
                put_u32(&mut b, 16, h.itt);
                put_u32(&mut b, 20, h.ttt);
                put_sequence(&mut b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
            }
            Header::DataIn(h) => {
                b[1] = flag(h.final_, 0x80)
                    | flag(h.ack, 0x40)
                    | (h.flags & 0x06)
                    | flag(h.has_status, 0x01);
                b[3] = h.status;
                put_u64(&mut b, 8, h.lun);
                put_u32(&mut b, 16, h.itt);
                put_u32(&mut b, 20, h.ttt);
                put_sequence(&mut b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
                put_u32(&mut b, 36, h.data_sn);
                put_u32(&mut b, 40, h.buffer_offset);
                put_u32(&mut b, 44, h.residual);
            }
            Header::LogoutResponse(h) => {
                b[1] = 0x80;
                b[2] = h.response;
                put_u32(&mut b, 16, h.itt);
                put_sequence(&mut b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
                put_u16(&mut b, 40, h.time2wait);
                put_u16(&mut b, 42, h.time2retain);
            }
            Header::R2t(h) => {
                b[1] = 0x80;
                put_u64(&mut b, 8, h.lun);
                put_u32(&mut b, 16, h.itt);
                put_u32(&mut b, 20, h.ttt);
                put_sequence(&mut b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
                put_u32(&mut b, 36, h.r2t_sn);
                put_u32(&mut b, 40, h.buffer_offset);
                put_u32(&mut b, 44, h.desired_len);
            }
            Header::AsyncMessage(h) => {
                b[1] = 0x80;
                put_u64(&mut b, 8, h.lun);
                put_u32(&mut b, 16, RESERVED_TAG);
                put_sequence(&mut b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
                b[36] = h.event;
                b[37] = h.vcode;
                put_u16(&mut b, 38, h.param1);
                put_u16(&mut b, 40, h.param2);
                put_u16(&mut b, 42, h.param3);
            }
            Header::Reject(h) => {
                b[1] = 0x80;
                b[2] = h.reason;
                put_u32(&mut b, 16, RESERVED_TAG);
                put_sequence(&mut b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
                put_u32(&mut b, 36, h.data_sn);
            }
        }
        b
    }
}

/// The name of an operation code, for messages.
pub fn opcode_name(op: u8) -> &'static str {
    match op {
        opcode::NOP_OUT => "NOP-Out",
        opcode::SCSI_COMMAND => "SCSI Command",
        opcode::TASK_MGMT_REQUEST => "Task Management Request",
        opcode::LOGIN_REQUEST => "Login Request",
        opcode::TEXT_REQUEST => "Text Request",
        opcode::DATA_OUT => "SCSI Data-Out",
        opcode::LOGOUT_REQUEST => "Logout Request",
        opcode::NOP_IN => "NOP-In",
        opcode::SCSI_RESPONSE => "SCSI Response",
        opcode::TASK_MGMT_RESPONSE => "Task Management Response",
        opcode::LOGIN_RESPONSE => "Login Response",
        opcode::TEXT_RESPONSE => "Text Response",
        opcode::DATA_IN => "SCSI Data-In",
        opcode::LOGOUT_RESPONSE => "Logout Response",
        opcode::R2T => "R2T",
        opcode::ASYNC_MESSAGE => "Async Message",
        opcode::REJECT => "Reject",
        _ => "unknown PDU",
    }
}

fn imm(immediate: bool) -> u8 {
    flag(immediate, 0x40)
}

fn flag(on: bool, bit: u8) -> u8 {
    if on {
        bit
    } else {
        0
    }
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn put_sequence(b: &mut [u8], stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) {
    put_u32(b, 24, stat_sn);
    put_u32(b, 28, exp_cmd_sn);
    put_u32(b, 32, max_cmd_sn);
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
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

/// Decode a BHS into its typed header.
pub fn decode_header(b: &[u8; BHS_LEN]) -> Result<Header, CodecError> {
    let op = b[0] & 0x3f;
    let immediate = b[0] & 0x40 != 0;
    let f = b[1] & 0x80 != 0;
    let seq = || (u32_at(b, 24), u32_at(b, 28), u32_at(b, 32));
    Ok(match op {
        opcode::NOP_OUT => Header::NopOut(NopOut {
            immediate,
            lun: u64_at(b, 8),
            itt: u32_at(b, 16),
            ttt: u32_at(b, 20),
            cmd_sn: u32_at(b, 24),
            exp_stat_sn: u32_at(b, 28),
        }),
        opcode::SCSI_COMMAND => {
            let mut cdb = [0u8; 16];
            cdb.copy_from_slice(&b[32..48]);
            Header::ScsiCommand(ScsiCommand {
                immediate,
                final_: f,
                read: b[1] & 0x40 != 0,
                write: b[1] & 0x20 != 0,
                attr: b[1] & 0x07,
                lun: u64_at(b, 8),
                itt: u32_at(b, 16),
                expected_len: u32_at(b, 20),
                cmd_sn: u32_at(b, 24),
                exp_stat_sn: u32_at(b, 28),
                cdb,
            })
        }
        opcode::TASK_MGMT_REQUEST => Header::TaskMgmtRequest(TaskMgmtRequest {
            immediate,
            function: b[1] & 0x7f,
            lun: u64_at(b, 8),
            itt: u32_at(b, 16),
            referenced_tag: u32_at(b, 20),
            cmd_sn: u32_at(b, 24),
            exp_stat_sn: u32_at(b, 28),
            ref_cmd_sn: u32_at(b, 32),
            exp_data_sn: u32_at(b, 36),
        }),
        opcode::LOGIN_REQUEST => {
            let mut isid = [0u8; 6];
            isid.copy_from_slice(&b[8..14]);
            Header::LoginRequest(LoginRequest {
                transit: f,
                continue_: b[1] & 0x40 != 0,
                csg: (b[1] >> 2) & 3,
                nsg: b[1] & 3,
                version_max: b[2],
                version_min: b[3],
                isid,
                tsih: u16_at(b, 14),
                itt: u32_at(b, 16),
                cid: u16_at(b, 20),
                cmd_sn: u32_at(b, 24),
                exp_stat_sn: u32_at(b, 28),
            })
        }
        opcode::TEXT_REQUEST => Header::TextRequest(TextRequest {
            immediate,
            final_: f,
            continue_: b[1] & 0x40 != 0,
            lun: u64_at(b, 8),
            itt: u32_at(b, 16),
            ttt: u32_at(b, 20),
            cmd_sn: u32_at(b, 24),
            exp_stat_sn: u32_at(b, 28),
        }),
        opcode::DATA_OUT => Header::DataOut(DataOut {
            final_: f,
            lun: u64_at(b, 8),
            itt: u32_at(b, 16),
            ttt: u32_at(b, 20),
            exp_stat_sn: u32_at(b, 28),
            data_sn: u32_at(b, 36),
            buffer_offset: u32_at(b, 40),
        }),
        opcode::LOGOUT_REQUEST => Header::LogoutRequest(LogoutRequest {
            immediate,
            reason: b[1] & 0x7f,
            itt: u32_at(b, 16),
            cid: u16_at(b, 20),
            cmd_sn: u32_at(b, 24),
            exp_stat_sn: u32_at(b, 28),
        }),
        opcode::NOP_IN => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::NopIn(NopIn {
                lun: u64_at(b, 8),
                itt: u32_at(b, 16),
                ttt: u32_at(b, 20),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
            })
        }
        opcode::SCSI_RESPONSE => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::ScsiResponse(ScsiResponse {
                flags: b[1] & 0x1e,
                response: b[2],
                status: b[3],
                itt: u32_at(b, 16),
                snack_tag: u32_at(b, 20),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                exp_data_sn: u32_at(b, 36),
                bidi_residual: u32_at(b, 40),
                residual: u32_at(b, 44),
            })
        }
        opcode::TASK_MGMT_RESPONSE => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::TaskMgmtResponse(TaskMgmtResponse {
                response: b[2],
                itt: u32_at(b, 16),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
            })
        }
        opcode::LOGIN_RESPONSE => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            let mut isid = [0u8; 6];
            isid.copy_from_slice(&b[8..14]);
            Header::LoginResponse(LoginResponse {
                transit: f,
                continue_: b[1] & 0x40 != 0,
                csg: (b[1] >> 2) & 3,
                nsg: b[1] & 3,
                version_max: b[2],
                version_active: b[3],
                isid,
                tsih: u16_at(b, 14),
                itt: u32_at(b, 16),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                status_class: b[36],
                status_detail: b[37],
            })
        }
        opcode::TEXT_RESPONSE => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::TextResponse(TextResponse {
                final_: f,
                continue_: b[1] & 0x40 != 0,
                lun: u64_at(b, 8),
                itt: u32_at(b, 16),
                ttt: u32_at(b, 20),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
            })
        }
        opcode::DATA_IN => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::DataIn(DataIn {
                final_: f,
                ack: b[1] & 0x40 != 0,
                flags: b[1] & 0x06,
                has_status: b[1] & 0x01 != 0,
                status: b[3],
                lun: u64_at(b, 8),
                itt: u32_at(b, 16),
                ttt: u32_at(b, 20),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                data_sn: u32_at(b, 36),
                buffer_offset: u32_at(b, 40),
                residual: u32_at(b, 44),
            })
        }
        opcode::LOGOUT_RESPONSE => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::LogoutResponse(LogoutResponse {
                response: b[2],
                itt: u32_at(b, 16),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                time2wait: u16_at(b, 40),
                time2retain: u16_at(b, 42),
            })
        }
        opcode::R2T => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::R2t(R2t {
                lun: u64_at(b, 8),
                itt: u32_at(b, 16),
                ttt: u32_at(b, 20),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                r2t_sn: u32_at(b, 36),
                buffer_offset: u32_at(b, 40),
                desired_len: u32_at(b, 44),
            })
        }
        opcode::ASYNC_MESSAGE => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::AsyncMessage(AsyncMessage {
                lun: u64_at(b, 8),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                event: b[36],
                vcode: b[37],
                param1: u16_at(b, 38),
                param2: u16_at(b, 40),
                param3: u16_at(b, 42),
            })
        }
        opcode::REJECT => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::Reject(Reject {
                reason: b[2],
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                data_sn: u32_at(b, 36),
            })
        }
        other => return Err(CodecError::UnknownOpcode(other)),
    })
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
        check_header_digest(&buf[..at], u32_at_le(buf, at))?;
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
            check_data_digest(&buf[at..at + padded], u32_at_le(buf, at + padded))?;
            at += DIGEST_LEN;
        }
        at += padded;
    }
    debug_assert_eq!(at, total);
    Ok(Some((Frame { header, ahs, data }, total)))
}

fn u32_at_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
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
