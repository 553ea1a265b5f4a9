//! The BHS on the wire: [`Header::encode`] and [`decode_header`]. Initiator PDUs have
//! operation codes below 0x20, target PDUs from 0x20 on; each side has its own half here.

use strata_bdev::field::{be16, be32, be64, put_be16, put_be32, put_be64};

use super::header::*;
use super::{opcode, CodecError, BHS_LEN, MAX_DATA_SEGMENT, RESERVED_TAG};

impl Header {
    /// Encode the BHS for a PDU with `ahs_len` bytes of AHS (a multiple of 4, under 1 KiB) and
    /// `data_len` bytes of data.
    pub fn encode(&self, ahs_len: usize, data_len: u32) -> [u8; BHS_LEN] {
        let mut b = [0u8; BHS_LEN];
        b[0] = self.opcode();
        debug_assert!(ahs_len.is_multiple_of(4) && ahs_len / 4 <= 255);
        b[4] = (ahs_len / 4) as u8;
        let dl = data_len.min(MAX_DATA_SEGMENT).to_be_bytes();
        b[5..8].copy_from_slice(&dl[1..]);
        self.encode_request(&mut b);
        self.encode_response(&mut b);
        b
    }

    /// The fields of an initiator PDU (none for a target PDU).
    fn encode_request(&self, b: &mut [u8; BHS_LEN]) {
        match *self {
            Header::NopOut(h) => {
                b[0] |= imm(h.immediate);
                b[1] = 0x80;
                put_be64(b, 8, h.lun);
                put_be32(b, 16, h.itt);
                put_be32(b, 20, h.ttt);
                put_be32(b, 24, h.cmd_sn);
                put_be32(b, 28, h.exp_stat_sn);
            }
            Header::ScsiCommand(h) => {
                b[0] |= imm(h.immediate);
                b[1] = flag(h.final_, 0x80)
                    | flag(h.read, 0x40)
                    | flag(h.write, 0x20)
                    | (h.attr & 0x07);
                put_be64(b, 8, h.lun);
                put_be32(b, 16, h.itt);
                put_be32(b, 20, h.expected_len);
                put_be32(b, 24, h.cmd_sn);
                put_be32(b, 28, h.exp_stat_sn);
                b[32..48].copy_from_slice(&h.cdb);
            }
            Header::TaskMgmtRequest(h) => {
                b[0] |= imm(h.immediate);
                b[1] = 0x80 | (h.function & 0x7f);
                put_be64(b, 8, h.lun);
                put_be32(b, 16, h.itt);
                put_be32(b, 20, h.referenced_tag);
                put_be32(b, 24, h.cmd_sn);
                put_be32(b, 28, h.exp_stat_sn);
                put_be32(b, 32, h.ref_cmd_sn);
                put_be32(b, 36, h.exp_data_sn);
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
                put_be16(b, 14, h.tsih);
                put_be32(b, 16, h.itt);
                put_be16(b, 20, h.cid);
                put_be32(b, 24, h.cmd_sn);
                put_be32(b, 28, h.exp_stat_sn);
            }
            Header::TextRequest(h) => {
                b[0] |= imm(h.immediate);
                b[1] = flag(h.final_, 0x80) | flag(h.continue_, 0x40);
                put_be64(b, 8, h.lun);
                put_be32(b, 16, h.itt);
                put_be32(b, 20, h.ttt);
                put_be32(b, 24, h.cmd_sn);
                put_be32(b, 28, h.exp_stat_sn);
            }
            Header::DataOut(h) => {
                b[1] = flag(h.final_, 0x80);
                put_be64(b, 8, h.lun);
                put_be32(b, 16, h.itt);
                put_be32(b, 20, h.ttt);
                put_be32(b, 28, h.exp_stat_sn);
                put_be32(b, 36, h.data_sn);
                put_be32(b, 40, h.buffer_offset);
            }
            Header::LogoutRequest(h) => {
                b[0] |= imm(h.immediate);
                b[1] = 0x80 | (h.reason & 0x7f);
                put_be32(b, 16, h.itt);
                put_be16(b, 20, h.cid);
                put_be32(b, 24, h.cmd_sn);
                put_be32(b, 28, h.exp_stat_sn);
            }
            _ => {}
        }
    }

    /// The fields of a target PDU (none for an initiator PDU).
    fn encode_response(&self, b: &mut [u8; BHS_LEN]) {
        match *self {
            Header::NopIn(h) => {
                b[1] = 0x80;
                put_be64(b, 8, h.lun);
                put_be32(b, 16, h.itt);
                put_be32(b, 20, h.ttt);
                put_sequence(b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
            }
            Header::ScsiResponse(h) => {
                b[1] = 0x80 | (h.flags & 0x1e);
                b[2] = h.response;
                b[3] = h.status;
                put_be32(b, 16, h.itt);
                put_be32(b, 20, h.snack_tag);
                put_sequence(b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
                put_be32(b, 36, h.exp_data_sn);
                put_be32(b, 40, h.bidi_residual);
                put_be32(b, 44, h.residual);
            }
            Header::TaskMgmtResponse(h) => {
                b[1] = 0x80;
                b[2] = h.response;
                put_be32(b, 16, h.itt);
                put_sequence(b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
            }
            Header::LoginResponse(h) => {
                b[1] = flag(h.transit, 0x80)
                    | flag(h.continue_, 0x40)
                    | ((h.csg & 3) << 2)
                    | (h.nsg & 3);
                b[2] = h.version_max;
                b[3] = h.version_active;
                b[8..14].copy_from_slice(&h.isid);
                put_be16(b, 14, h.tsih);
                put_be32(b, 16, h.itt);
                put_sequence(b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
                b[36] = h.status_class;
                b[37] = h.status_detail;
            }
            Header::TextResponse(h) => {
                b[1] = flag(h.final_, 0x80) | flag(h.continue_, 0x40);
                put_be64(b, 8, h.lun);
                put_be32(b, 16, h.itt);
                put_be32(b, 20, h.ttt);
                put_sequence(b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
            }
            Header::DataIn(h) => {
                b[1] = flag(h.final_, 0x80)
                    | flag(h.ack, 0x40)
                    | (h.flags & 0x06)
                    | flag(h.has_status, 0x01);
                b[3] = h.status;
                put_be64(b, 8, h.lun);
                put_be32(b, 16, h.itt);
                put_be32(b, 20, h.ttt);
                put_sequence(b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
                put_be32(b, 36, h.data_sn);
                put_be32(b, 40, h.buffer_offset);
                put_be32(b, 44, h.residual);
            }
            Header::LogoutResponse(h) => {
                b[1] = 0x80;
                b[2] = h.response;
                put_be32(b, 16, h.itt);
                put_sequence(b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
                put_be16(b, 40, h.time2wait);
                put_be16(b, 42, h.time2retain);
            }
            Header::R2t(h) => {
                b[1] = 0x80;
                put_be64(b, 8, h.lun);
                put_be32(b, 16, h.itt);
                put_be32(b, 20, h.ttt);
                put_sequence(b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
                put_be32(b, 36, h.r2t_sn);
                put_be32(b, 40, h.buffer_offset);
                put_be32(b, 44, h.desired_len);
            }
            Header::AsyncMessage(h) => {
                b[1] = 0x80;
                put_be64(b, 8, h.lun);
                put_be32(b, 16, RESERVED_TAG);
                put_sequence(b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
                b[36] = h.event;
                b[37] = h.vcode;
                put_be16(b, 38, h.param1);
                put_be16(b, 40, h.param2);
                put_be16(b, 42, h.param3);
            }
            Header::Reject(h) => {
                b[1] = 0x80;
                b[2] = h.reason;
                put_be32(b, 16, RESERVED_TAG);
                put_sequence(b, h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn);
                put_be32(b, 36, h.data_sn);
            }
            _ => {}
        }
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

fn put_sequence(b: &mut [u8], stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) {
    put_be32(b, 24, stat_sn);
    put_be32(b, 28, exp_cmd_sn);
    put_be32(b, 32, max_cmd_sn);
}

/// Decode a BHS into its typed header.
pub fn decode_header(b: &[u8; BHS_LEN]) -> Result<Header, CodecError> {
    if b[0] & 0x20 == 0 {
        decode_request(b)
    } else {
        decode_response(b)
    }
}

/// The header of an initiator PDU (operation codes below 0x20).
fn decode_request(b: &[u8; BHS_LEN]) -> Result<Header, CodecError> {
    let op = b[0] & 0x3f;
    let immediate = b[0] & 0x40 != 0;
    let f = b[1] & 0x80 != 0;
    Ok(match op {
        opcode::NOP_OUT => Header::NopOut(NopOut {
            immediate,
            lun: be64(b, 8),
            itt: be32(b, 16),
            ttt: be32(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
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
                lun: be64(b, 8),
                itt: be32(b, 16),
                expected_len: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
                cdb,
            })
        }
        opcode::TASK_MGMT_REQUEST => Header::TaskMgmtRequest(TaskMgmtRequest {
            immediate,
            function: b[1] & 0x7f,
            lun: be64(b, 8),
            itt: be32(b, 16),
            referenced_tag: be32(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
            ref_cmd_sn: be32(b, 32),
            exp_data_sn: be32(b, 36),
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
                tsih: be16(b, 14),
                itt: be32(b, 16),
                cid: be16(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
            })
        }
        opcode::TEXT_REQUEST => Header::TextRequest(TextRequest {
            immediate,
            final_: f,
            continue_: b[1] & 0x40 != 0,
            lun: be64(b, 8),
            itt: be32(b, 16),
            ttt: be32(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
        }),
        opcode::DATA_OUT => Header::DataOut(DataOut {
            final_: f,
            lun: be64(b, 8),
            itt: be32(b, 16),
            ttt: be32(b, 20),
            exp_stat_sn: be32(b, 28),
            data_sn: be32(b, 36),
            buffer_offset: be32(b, 40),
        }),
        opcode::LOGOUT_REQUEST => Header::LogoutRequest(LogoutRequest {
            immediate,
            reason: b[1] & 0x7f,
            itt: be32(b, 16),
            cid: be16(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
        }),
        other => return Err(CodecError::UnknownOpcode(other)),
    })
}

/// The header of a target PDU (operation codes from 0x20): the answers to commands and
/// negotiations here, the others in [`decode_transfer`].
fn decode_response(b: &[u8; BHS_LEN]) -> Result<Header, CodecError> {
    let op = b[0] & 0x3f;
    let f = b[1] & 0x80 != 0;
    let seq = || (be32(b, 24), be32(b, 28), be32(b, 32));
    Ok(match op {
        opcode::NOP_IN => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::NopIn(NopIn {
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
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
                itt: be32(b, 16),
                snack_tag: be32(b, 20),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                exp_data_sn: be32(b, 36),
                bidi_residual: be32(b, 40),
                residual: be32(b, 44),
            })
        }
        opcode::TASK_MGMT_RESPONSE => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::TaskMgmtResponse(TaskMgmtResponse {
                response: b[2],
                itt: be32(b, 16),
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
                tsih: be16(b, 14),
                itt: be32(b, 16),
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
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
            })
        }
        _ => return decode_transfer(b),
    })
}

/// The header of a target PDU that is not an answer to a command or a negotiation: Data-In,
/// Logout Response, R2T, Async Message, Reject.
fn decode_transfer(b: &[u8; BHS_LEN]) -> Result<Header, CodecError> {
    let op = b[0] & 0x3f;
    let f = b[1] & 0x80 != 0;
    let seq = || (be32(b, 24), be32(b, 28), be32(b, 32));
    Ok(match op {
        opcode::DATA_IN => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::DataIn(DataIn {
                final_: f,
                ack: b[1] & 0x40 != 0,
                flags: b[1] & 0x06,
                has_status: b[1] & 0x01 != 0,
                status: b[3],
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                data_sn: be32(b, 36),
                buffer_offset: be32(b, 40),
                residual: be32(b, 44),
            })
        }
        opcode::LOGOUT_RESPONSE => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::LogoutResponse(LogoutResponse {
                response: b[2],
                itt: be32(b, 16),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                time2wait: be16(b, 40),
                time2retain: be16(b, 42),
            })
        }
        opcode::R2T => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::R2t(R2t {
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                r2t_sn: be32(b, 36),
                buffer_offset: be32(b, 40),
                desired_len: be32(b, 44),
            })
        }
        opcode::ASYNC_MESSAGE => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::AsyncMessage(AsyncMessage {
                lun: be64(b, 8),
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                event: b[36],
                vcode: b[37],
                param1: be16(b, 38),
                param2: be16(b, 40),
                param3: be16(b, 42),
            })
        }
        opcode::REJECT => {
            let (stat_sn, exp_cmd_sn, max_cmd_sn) = seq();
            Header::Reject(Reject {
                reason: b[2],
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
                data_sn: be32(b, 36),
            })
        }
        other => return Err(CodecError::UnknownOpcode(other)),
    })
}
