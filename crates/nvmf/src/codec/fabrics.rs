//! Fabrics commands: Connect (its fields and its data), Property Get/Set (the controller
//! properties) and Disconnect.

use strata_bdev::field::le16;

use super::command::{admin_opcode, Command, Sgl};

/// Fabrics command types.
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    pub const AUTH_SEND: u8 = 0x05;
    pub const AUTH_RECEIVE: u8 = 0x06;
    pub const DISCONNECT: u8 = 0x08;
}

/// Connect's fields in the submission entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect {
    /// Record format (0).
    pub recfmt: u16,
    /// 0: the admin queue; otherwise an I/O queue.
    pub qid: u16,
    /// Submission queue size, 0's based.
    pub sqsize: u16,
    /// Connect attributes ([`cattr`]).
    pub cattr: u8,
    /// Keep-alive timeout in milliseconds (admin queue; 0: none).
    pub kato: u32,
}

/// Connect attribute bits.
pub mod cattr {
    /// The host disables submission queue flow control (SQHD is not reported).
    pub const DISABLE_SQFLOW: u8 = 0x04;
}

/// Byte offsets of Connect fields, for the "invalid parameter" location in a refusal.
pub mod connect_offset {
    /// In the submission entry.
    pub const RECFMT: u16 = 40;
    pub const QID: u16 = 42;
    pub const SQSIZE: u16 = 44;
    pub const CATTR: u16 = 46;
    pub const KATO: u16 = 48;
    /// In the data.
    pub const HOSTID: u16 = 0;
    pub const CNTLID: u16 = 16;
    pub const SUBNQN: u16 = 256;
    pub const HOSTNQN: u16 = 512;
}

/// A fabrics command, by type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fabrics {
    PropertySet {
        eight: bool,
        offset: u32,
        value: u64,
    },
    PropertyGet {
        eight: bool,
        offset: u32,
    },
    Connect(Connect),
    Disconnect {
        recfmt: u16,
    },
    Other(u8),
}

impl Fabrics {
    pub fn parse(c: &Command) -> Fabrics {
        let eight = c.cdw10 & 7 == 1;
        match c.fctype() {
            fctype::PROPERTY_SET => Fabrics::PropertySet {
                eight,
                offset: c.cdw11,
                value: u64::from(c.cdw12) | u64::from(c.cdw13) << 32,
            },
            fctype::PROPERTY_GET => Fabrics::PropertyGet {
                eight,
                offset: c.cdw11,
            },
            fctype::CONNECT => Fabrics::Connect(Connect {
                recfmt: c.cdw10 as u16,
                qid: (c.cdw10 >> 16) as u16,
                sqsize: c.cdw11 as u16,
                cattr: (c.cdw11 >> 16) as u8,
                kato: c.cdw12,
            }),
            fctype::DISCONNECT => Fabrics::Disconnect {
                recfmt: c.cdw10 as u16,
            },
            other => Fabrics::Other(other),
        }
    }
}

/// The length of Connect's data.
pub const CONNECT_DATA_LEN: usize = 1024;
/// The most bytes of an NQN (not counting its terminating NUL).
pub const MAX_NQN_LEN: usize = 223;

/// Connect's data: who connects, to what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectData {
    pub hostid: [u8; 16],
    /// 0xFFFF on the admin queue (a new controller, dynamic model); the controller's ID on
    /// an I/O queue.
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

/// Why Connect data is invalid: the byte offset of the field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("connect data at byte {offset}: {why}")]
pub struct ConnectDataError {
    pub offset: u16,
    pub why: &'static str,
}

impl ConnectData {
    pub fn encode(&self) -> [u8; CONNECT_DATA_LEN] {
        let mut b = [0u8; CONNECT_DATA_LEN];
        b[0..16].copy_from_slice(&self.hostid);
        b[16..18].copy_from_slice(&self.cntlid.to_le_bytes());
        put_str(&mut b[256..512], &self.subnqn);
        put_str(&mut b[512..768], &self.hostnqn);
        b
    }

    pub fn decode(b: &[u8]) -> Result<ConnectData, ConnectDataError> {
        if b.len() < CONNECT_DATA_LEN {
            return Err(ConnectDataError {
                offset: b.len().min(usize::from(u16::MAX)) as u16,
                why: "shorter than 1024 bytes",
            });
        }
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&b[0..16]);
        Ok(ConnectData {
            hostid,
            cntlid: le16(b, 16),
            subnqn: nqn_field(&b[256..512], connect_offset::SUBNQN)?,
            hostnqn: nqn_field(&b[512..768], connect_offset::HOSTNQN)?,
        })
    }
}

/// Copy `s` into a NUL-padded field, leaving at least one NUL.
pub(crate) fn put_str(field: &mut [u8], s: &str) {
    let n = s.len().min(field.len().saturating_sub(1));
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn nqn_field(b: &[u8], offset: u16) -> Result<String, ConnectDataError> {
    let end = b.iter().position(|&c| c == 0).ok_or(ConnectDataError {
        offset,
        why: "the NQN is not NUL-terminated",
    })?;
    if end == 0 {
        return Err(ConnectDataError {
            offset,
            why: "the NQN is empty",
        });
    }
    if end > MAX_NQN_LEN {
        return Err(ConnectDataError {
            offset,
            why: "the NQN is longer than 223 bytes",
        });
    }
    std::str::from_utf8(&b[..end])
        .map(str::to_string)
        .map_err(|_| ConnectDataError {
            offset,
            why: "the NQN is not UTF-8",
        })
}

/// Controller properties (the fabrics stand-in for registers) and their fields.
pub mod property {
    /// Controller capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version (4 bytes).
    pub const VS: u32 = 0x08;
    /// Controller configuration (4 bytes).
    pub const CC: u32 = 0x14;
    /// Controller status (4 bytes).
    pub const CSTS: u32 = 0x1C;
    /// NVM subsystem reset (4 bytes).
    pub const NSSR: u32 = 0x20;

    /// CC.EN.
    pub const CC_EN: u32 = 1;
    /// CC.SHN (bits 15:14).
    pub const CC_SHN_MASK: u32 = 3 << 14;
    /// CSTS.RDY.
    pub const CSTS_RDY: u32 = 1;
    /// CSTS.CFS.
    pub const CSTS_CFS: u32 = 1 << 1;
    /// CSTS.SHST: shutdown processing occurring.
    pub const CSTS_SHST_OCCURRING: u32 = 1 << 2;
    /// CSTS.SHST: shutdown processing complete.
    pub const CSTS_SHST_COMPLETE: u32 = 2 << 2;
    pub const CSTS_SHST_MASK: u32 = 3 << 2;

    /// CC.CSS (bits 6:4).
    pub fn cc_css(cc: u32) -> u32 {
        (cc >> 4) & 7
    }
    /// CC.MPS (bits 10:7).
    pub fn cc_mps(cc: u32) -> u32 {
        (cc >> 7) & 0xF
    }
    /// CC.AMS (bits 13:11).
    pub fn cc_ams(cc: u32) -> u32 {
        (cc >> 11) & 7
    }
    /// CC.IOSQES (bits 19:16).
    pub fn cc_iosqes(cc: u32) -> u32 {
        (cc >> 16) & 0xF
    }
    /// CC.IOCQES (bits 23:20).
    pub fn cc_iocqes(cc: u32) -> u32 {
        (cc >> 20) & 0xF
    }

    /// CAP.MQES: maximum queue entries, 0's based.
    pub fn cap_mqes(cap: u64) -> u16 {
        cap as u16
    }
    /// CAP.TO: worst-case time to ready, in 500 ms units.
    pub fn cap_to(cap: u64) -> u8 {
        (cap >> 24) as u8
    }
}

/// Builders of the fabrics commands.
impl Command {
    fn fabrics(cid: u16, fctype: u8, dptr: Sgl) -> Command {
        Command::base(admin_opcode::FABRICS, cid, u32::from(fctype), dptr)
    }

    /// Connect, with its 1024 bytes of data in the capsule.
    pub fn connect(cid: u16, c: &Connect) -> Command {
        Command {
            cdw10: u32::from(c.recfmt) | u32::from(c.qid) << 16,
            cdw11: u32::from(c.sqsize) | u32::from(c.cattr) << 16,
            cdw12: c.kato,
            ..Command::fabrics(
                cid,
                fctype::CONNECT,
                Sgl::in_capsule(CONNECT_DATA_LEN as u32),
            )
        }
    }

    /// Property Get of a 4-byte (or with `eight`, 8-byte) property.
    pub fn property_get(cid: u16, offset: u32, eight: bool) -> Command {
        Command {
            cdw10: u32::from(eight),
            cdw11: offset,
            ..Command::fabrics(cid, fctype::PROPERTY_GET, Sgl::default())
        }
    }

    /// Property Set.
    pub fn property_set(cid: u16, offset: u32, eight: bool, value: u64) -> Command {
        Command {
            cdw10: u32::from(eight),
            cdw11: offset,
            cdw12: value as u32,
            cdw13: (value >> 32) as u32,
            ..Command::fabrics(cid, fctype::PROPERTY_SET, Sgl::default())
        }
    }

    /// Disconnect (this queue).
    pub fn disconnect(cid: u16) -> Command {
        Command::fabrics(cid, fctype::DISCONNECT, Sgl::default())
    }
}
