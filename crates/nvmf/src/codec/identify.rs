//! Identify data: the controller, a namespace, the active namespace list and namespace
//! identification descriptors. Each structure is 4096 bytes on the wire; the fields Strata sets
//! or reads are named, the rest are zero.

use super::command::{put_str, IDENTIFY_LEN};

/// Data that is too short to decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {len} bytes where at least {need} are needed")]
pub struct ShortData {
    pub what: &'static str,
    pub len: usize,
    pub need: usize,
}

pub(crate) fn need(what: &'static str, b: &[u8], need: usize) -> Result<(), ShortData> {
    if b.len() < need {
        Err(ShortData {
            what,
            len: b.len(),
            need,
        })
    } else {
        Ok(())
    }
}

pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// An ASCII field padded with spaces (serial, model, firmware revision).
fn put_ascii(field: &mut [u8], s: &str) {
    field.fill(b' ');
    for (d, c) in field.iter_mut().zip(s.bytes()) {
        *d = if c.is_ascii_graphic() || c == b' ' {
            c
        } else {
            b'_'
        };
    }
}

fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end().to_string()
}

fn nul_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).to_string()
}

/// Controller type (CNTRLTYPE).
pub mod cntrltype {
    pub const IO: u8 = 1;
    pub const DISCOVERY: u8 = 2;
}

/// Optional NVM command support (ONCS) bits.
pub mod oncs {
    pub const DATASET_MANAGEMENT: u16 = 1 << 2;
    pub const WRITE_ZEROES: u16 = 1 << 3;
    pub const RESERVATIONS: u16 = 1 << 5;
}

/// Controller multi-path I/O and namespace sharing capabilities (CMIC) bits.
pub mod cmic {
    pub const MULTI_CONTROLLER: u8 = 1 << 1;
    pub const ANA: u8 = 1 << 3;
}

/// Controller attributes (CTRATT) bits.
pub mod ctratt {
    /// Traffic-based keep alive: any command resets the keep-alive timer.
    pub const TBKAS: u32 = 1 << 6;
}

/// Identify Controller (CNS 01h).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentifyController {
    pub vid: u16,
    pub ssvid: u16,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub rab: u8,
    pub ieee: [u8; 3],
    pub cmic: u8,
    /// Maximum data transfer size: 2^mdts minimum pages (0: no limit).
    pub mdts: u8,
    pub cntlid: u16,
    pub ver: u32,
    /// Optional asynchronous events supported.
    pub oaes: u32,
    pub ctratt: u32,
    pub cntrltype: u8,
    pub fguid: [u8; 16],
    pub oacs: u16,
    /// Abort command limit, 0's based.
    pub acl: u8,
    /// Asynchronous event request limit, 0's based.
    pub aerl: u8,
    pub frmw: u8,
    /// Log page attributes.
    pub lpa: u8,
    /// Error log page entries, 0's based.
    pub elpe: u8,
    pub npss: u8,
    pub wctemp: u16,
    pub cctemp: u16,
    /// Keep alive support: granularity in 100 ms units (0: unsupported).
    pub kas: u16,
    pub sqes: u8,
    pub cqes: u8,
    pub maxcmd: u16,
    /// Number of namespaces (the largest NSID).
    pub nn: u32,
    pub oncs: u16,
    pub fuses: u16,
    pub fna: u8,
    /// Volatile write cache.
    pub vwc: u8,
    pub awun: u16,
    pub awupf: u16,
    pub nvscc: u8,
    pub acwu: u16,
    /// SGL support.
    pub sgls: u32,
    pub mnan: u32,
    pub subnqn: String,
    /// I/O queue command capsule supported size, in 16-byte units.
    pub ioccsz: u32,
    /// I/O queue response capsule supported size, in 16-byte units.
    pub iorcsz: u32,
    /// In-capsule data offset, in 16-byte units.
    pub icdoff: u16,
    /// Fabrics controller attributes (bit 0: static controller model).
    pub fcatt: u8,
    /// Maximum SGL data block descriptors.
    pub msdbd: u8,
    /// Optional fabric commands supported (bit 0: Disconnect).
    pub ofcs: u16,
}

impl IdentifyController {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_LEN];
        b[0..2].copy_from_slice(&self.vid.to_le_bytes());
        b[2..4].copy_from_slice(&self.ssvid.to_le_bytes());
        put_ascii(&mut b[4..24], &self.serial);
        put_ascii(&mut b[24..64], &self.model);
        put_ascii(&mut b[64..72], &self.firmware);
        b[72] = self.rab;
        b[73..76].copy_from_slice(&self.ieee);
        b[76] = self.cmic;
        b[77] = self.mdts;
        b[78..80].copy_from_slice(&self.cntlid.to_le_bytes());
        b[80..84].copy_from_slice(&self.ver.to_le_bytes());
        b[92..96].copy_from_slice(&self.oaes.to_le_bytes());
        b[96..100].copy_from_slice(&self.ctratt.to_le_bytes());
        b[111] = self.cntrltype;
        b[112..128].copy_from_slice(&self.fguid);
        b[256..258].copy_from_slice(&self.oacs.to_le_bytes());
        b[258] = self.acl;
        b[259] = self.aerl;
        b[260] = self.frmw;
        b[261] = self.lpa;
        b[262] = self.elpe;
        b[263] = self.npss;
        b[266..268].copy_from_slice(&self.wctemp.to_le_bytes());
        b[268..270].copy_from_slice(&self.cctemp.to_le_bytes());
        b[320..322].copy_from_slice(&self.kas.to_le_bytes());
        b[512] = self.sqes;
        b[513] = self.cqes;
        b[514..516].copy_from_slice(&self.maxcmd.to_le_bytes());
        b[516..520].copy_from_slice(&self.nn.to_le_bytes());
        b[520..522].copy_from_slice(&self.oncs.to_le_bytes());
        b[522..524].copy_from_slice(&self.fuses.to_le_bytes());
        b[524] = self.fna;
        b[525] = self.vwc;
        b[526..528].copy_from_slice(&self.awun.to_le_bytes());
        b[528..530].copy_from_slice(&self.awupf.to_le_bytes());
        b[530] = self.nvscc;
        b[532..534].copy_from_slice(&self.acwu.to_le_bytes());
        b[536..540].copy_from_slice(&self.sgls.to_le_bytes());
        b[540..544].copy_from_slice(&self.mnan.to_le_bytes());
        put_str(&mut b[768..1024], &self.subnqn);
        b[1792..1796].copy_from_slice(&self.ioccsz.to_le_bytes());
        b[1796..1800].copy_from_slice(&self.iorcsz.to_le_bytes());
        b[1800..1802].copy_from_slice(&self.icdoff.to_le_bytes());
        b[1802] = self.fcatt;
        b[1803] = self.msdbd;
        b[1804..1806].copy_from_slice(&self.ofcs.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<IdentifyController, ShortData> {
        need("identify controller", b, IDENTIFY_LEN)?;
        let mut ieee = [0u8; 3];
        ieee.copy_from_slice(&b[73..76]);
        let mut fguid = [0u8; 16];
        fguid.copy_from_slice(&b[112..128]);
        Ok(IdentifyController {
            vid: le16(b, 0),
            ssvid: le16(b, 2),
            serial: ascii(&b[4..24]),
            model: ascii(&b[24..64]),
            firmware: ascii(&b[64..72]),
            rab: b[72],
            ieee,
            cmic: b[76],
            mdts: b[77],
            cntlid: le16(b, 78),
            ver: le32(b, 80),
            oaes: le32(b, 92),
            ctratt: le32(b, 96),
            cntrltype: b[111],
            fguid,
            oacs: le16(b, 256),
            acl: b[258],
            aerl: b[259],
            frmw: b[260],
            lpa: b[261],
            elpe: b[262],
            npss: b[263],
            wctemp: le16(b, 266),
            cctemp: le16(b, 268),
            kas: le16(b, 320),
            sqes: b[512],
            cqes: b[513],
            maxcmd: le16(b, 514),
            nn: le32(b, 516),
            oncs: le16(b, 520),
            fuses: le16(b, 522),
            fna: b[524],
            vwc: b[525],
            awun: le16(b, 526),
            awupf: le16(b, 528),
            nvscc: b[530],
            acwu: le16(b, 532),
            sgls: le32(b, 536),
            mnan: le32(b, 540),
            subnqn: nul_str(&b[768..1024]),
            ioccsz: le32(b, 1792),
            iorcsz: le32(b, 1796),
            icdoff: le16(b, 1800),
            fcatt: b[1802],
            msdbd: b[1803],
            ofcs: le16(b, 1804),
        })
    }
}

/// Namespace features (NSFEAT) bits.
pub mod nsfeat {
    /// Thin provisioning.
    pub const THIN: u8 = 1;
    /// NPWG, NPWA, NPDG, NPDA and NOWS are valid.
    pub const OPTPERF: u8 = 1 << 4;
}

/// Identify Namespace (CNS 00h).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Size in logical blocks.
    pub nsze: u64,
    /// Capacity in logical blocks (0 marks an inactive namespace).
    pub ncap: u64,
    /// Blocks in use.
    pub nuse: u64,
    pub nsfeat: u8,
    /// Number of LBA formats, 0's based.
    pub nlbaf: u8,
    /// Formatted LBA size: the index of the format in use.
    pub flbas: u8,
    /// Multi-path I/O and sharing (bit 0: may be attached to several controllers).
    pub nmic: u8,
    /// Reservation capabilities.
    pub rescap: u8,
    /// Deallocate logical block features (bits 2:0 = 001b: deallocated blocks read zeroes).
    pub dlfeat: u8,
    /// Preferred write granularity, 0's based, in blocks.
    pub npwg: u16,
    /// Optimal write size, 0's based, in blocks.
    pub nows: u16,
    pub anagrpid: u32,
    /// Namespace attributes (bit 0: write protected).
    pub nsattr: u8,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    /// LBA formats: (metadata size, log2 of the block size).
    pub lbaf: Vec<(u16, u8)>,
}

impl IdentifyNamespace {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_LEN];
        b[0..8].copy_from_slice(&self.nsze.to_le_bytes());
        b[8..16].copy_from_slice(&self.ncap.to_le_bytes());
        b[16..24].copy_from_slice(&self.nuse.to_le_bytes());
        b[24] = self.nsfeat;
        b[25] = self.nlbaf;
        b[26] = self.flbas;
        b[30] = self.nmic;
        b[31] = self.rescap;
        b[33] = self.dlfeat;
        b[64..66].copy_from_slice(&self.npwg.to_le_bytes());
        b[72..74].copy_from_slice(&self.nows.to_le_bytes());
        b[92..96].copy_from_slice(&self.anagrpid.to_le_bytes());
        b[99] = self.nsattr;
        b[104..120].copy_from_slice(&self.nguid);
        b[120..128].copy_from_slice(&self.eui64);
        for (i, (ms, lbads)) in self.lbaf.iter().take(64).enumerate() {
            let f = u32::from(*ms) | u32::from(*lbads) << 16;
            b[128 + 4 * i..132 + 4 * i].copy_from_slice(&f.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<IdentifyNamespace, ShortData> {
        need("identify namespace", b, IDENTIFY_LEN)?;
        let mut nguid = [0u8; 16];
        nguid.copy_from_slice(&b[104..120]);
        let mut eui64 = [0u8; 8];
        eui64.copy_from_slice(&b[120..128]);
        let nlbaf = b[25];
        let lbaf = (0..=usize::from(nlbaf).min(63))
            .map(|i| {
                let f = le32(b, 128 + 4 * i);
                (f as u16, (f >> 16) as u8)
            })
            .collect();
        Ok(IdentifyNamespace {
            nsze: le64(b, 0),
            ncap: le64(b, 8),
            nuse: le64(b, 16),
            nsfeat: b[24],
            nlbaf,
            flbas: b[26],
            nmic: b[30],
            rescap: b[31],
            dlfeat: b[33],
            npwg: le16(b, 64),
            nows: le16(b, 72),
            anagrpid: le32(b, 92),
            nsattr: b[99],
            nguid,
            eui64,
            lbaf,
        })
    }

    /// log2 of the block size of the format in use (None: the index names no format).
    pub fn lba_shift(&self) -> Option<u8> {
        let i = usize::from(self.flbas & 0xF) | usize::from(self.flbas >> 5 & 3) << 4;
        self.lbaf.get(i).map(|f| f.1)
    }
}

/// A namespace identification descriptor (CNS 03h).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NsId {
    Eui64([u8; 8]),
    Nguid([u8; 16]),
    Uuid([u8; 16]),
    /// Command set identifier (0: NVM).
    Csi(u8),
}

impl NsId {
    fn kind(&self) -> u8 {
        match self {
            NsId::Eui64(_) => 1,
            NsId::Nguid(_) => 2,
            NsId::Uuid(_) => 3,
            NsId::Csi(_) => 4,
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            NsId::Eui64(b) => b,
            NsId::Nguid(b) | NsId::Uuid(b) => b,
            NsId::Csi(b) => std::slice::from_ref(b),
        }
    }
}

/// Encode a descriptor list (4096 bytes, ended by an empty descriptor).
pub fn encode_ns_descriptors(ids: &[NsId]) -> Vec<u8> {
    let mut b = Vec::with_capacity(IDENTIFY_LEN);
    for id in ids {
        let v = id.bytes();
        if b.len() + 4 + v.len() + 4 > IDENTIFY_LEN {
            break;
        }
        b.push(id.kind());
        b.push(v.len() as u8);
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(v);
    }
    b.resize(IDENTIFY_LEN, 0);
    b
}

/// Decode a descriptor list; unknown types are skipped, a descriptor of the wrong length for
/// its type or running past the end stops the list.
pub fn decode_ns_descriptors(b: &[u8]) -> Vec<NsId> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= b.len() {
        let (kind, len) = (b[at], usize::from(b[at + 1]));
        if kind == 0 || at + 4 + len > b.len() {
            break;
        }
        let v = &b[at + 4..at + 4 + len];
        let id = match (kind, len) {
            (1, 8) => v.try_into().ok().map(NsId::Eui64),
            (2, 16) => v.try_into().ok().map(NsId::Nguid),
            (3, 16) => v.try_into().ok().map(NsId::Uuid),
            (4, 1) => Some(NsId::Csi(v[0])),
            (1..=4, _) => break,
            _ => None,
        };
        out.extend(id);
        at += 4 + len;
    }
    out
}

/// Encode an active namespace list: the IDs above `after`, ascending, at most 1024.
pub fn encode_ns_list(nsids: &[u32], after: u32) -> Vec<u8> {
    let mut ids: Vec<u32> = nsids.iter().copied().filter(|&n| n > after).collect();
    ids.sort_unstable();
    let mut b = vec![0u8; IDENTIFY_LEN];
    for (i, id) in ids.into_iter().take(IDENTIFY_LEN / 4).enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&id.to_le_bytes());
    }
    b
}

/// Decode a namespace list (ends at the first zero).
pub fn decode_ns_list(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take_while(|&n| n != 0)
        .collect()
}
