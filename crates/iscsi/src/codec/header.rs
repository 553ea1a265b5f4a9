//! The typed basic header segment (BHS) of every PDU: one struct of fields per PDU, and
//! [`Header`] over them.

use super::{opcode, RESERVED_TAG};

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
