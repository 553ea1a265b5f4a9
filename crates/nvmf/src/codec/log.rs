//! Log pages: error information, SMART / health, changed namespace list and the discovery log.

use super::command::put_str;
use super::identify::{le16, le64, need, ShortData};

/// One error information log entry is this long; Strata reports none (all-zero entries).
pub const ERROR_ENTRY_LEN: usize = 64;
/// The SMART / health information log is this long.
pub const SMART_LEN: usize = 512;
/// The firmware slot information log is this long.
pub const FIRMWARE_SLOT_LEN: usize = 512;
/// The changed namespace list is this long (1024 namespace IDs).
pub const CHANGED_NS_LEN: usize = 4096;
/// The discovery log header, and each of its entries, are this long.
pub const DISCOVERY_RECORD_LEN: usize = 1024;

/// SMART / health information.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmartLog {
    pub critical_warning: u8,
    /// Composite temperature in kelvins.
    pub temperature: u16,
    /// Available spare, percent.
    pub available_spare: u8,
    pub spare_threshold: u8,
    pub percent_used: u8,
    /// Thousands of 512-byte units read (rounded up).
    pub data_units_read: u128,
    pub data_units_written: u128,
    pub host_reads: u128,
    pub host_writes: u128,
    pub power_cycles: u128,
    pub power_on_hours: u128,
    pub unsafe_shutdowns: u128,
    pub media_errors: u128,
    pub error_log_entries: u128,
}

impl SmartLog {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SMART_LEN];
        b[0] = self.critical_warning;
        b[1..3].copy_from_slice(&self.temperature.to_le_bytes());
        b[3] = self.available_spare;
        b[4] = self.spare_threshold;
        b[5] = self.percent_used;
        for (at, v) in [
            (32, self.data_units_read),
            (48, self.data_units_written),
            (64, self.host_reads),
            (80, self.host_writes),
            (112, self.power_cycles),
            (128, self.power_on_hours),
            (144, self.unsafe_shutdowns),
            (160, self.media_errors),
            (176, self.error_log_entries),
        ] {
            b[at..at + 16].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<SmartLog, ShortData> {
        need("SMART log", b, SMART_LEN)?;
        let u128_at = |at: usize| {
            let mut x = [0u8; 16];
            x.copy_from_slice(&b[at..at + 16]);
            u128::from_le_bytes(x)
        };
        Ok(SmartLog {
            critical_warning: b[0],
            temperature: le16(b, 1),
            available_spare: b[3],
            spare_threshold: b[4],
            percent_used: b[5],
            data_units_read: u128_at(32),
            data_units_written: u128_at(48),
            host_reads: u128_at(64),
            host_writes: u128_at(80),
            power_cycles: u128_at(112),
            power_on_hours: u128_at(128),
            unsafe_shutdowns: u128_at(144),
            media_errors: u128_at(160),
            error_log_entries: u128_at(176),
        })
    }
}

/// Encode a changed namespace list: up to 1024 IDs, or 0xFFFFFFFF first when more changed.
pub fn encode_changed_ns(nsids: &[u32]) -> Vec<u8> {
    let mut b = vec![0u8; CHANGED_NS_LEN];
    if nsids.len() > CHANGED_NS_LEN / 4 {
        b[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    } else {
        for (i, n) in nsids.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&n.to_le_bytes());
        }
    }
    b
}

/// Transport types of a discovery entry.
pub mod trtype {
    pub const TCP: u8 = 3;
}

/// Address families of a discovery entry.
pub mod adrfam {
    pub const IPV4: u8 = 1;
    pub const IPV6: u8 = 2;
}

/// Subsystem types of a discovery entry.
pub mod subtype {
    pub const DISCOVERY: u8 = 1;
    pub const NVM: u8 = 2;
    pub const CURRENT_DISCOVERY: u8 = 3;
}

/// Transport requirements (TREQ) of a discovery entry.
pub mod treq {
    /// A secure channel is not required.
    pub const SECURE_CHANNEL_NOT_REQUIRED: u8 = 2;
    /// The subsystem lets hosts disable submission queue flow control.
    pub const DISABLE_SQFLOW: u8 = 4;
}

/// One discovery log entry: how to reach a subsystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryEntry {
    pub trtype: u8,
    pub adrfam: u8,
    pub subtype: u8,
    pub treq: u8,
    pub portid: u16,
    /// 0xFFFF: dynamic controllers.
    pub cntlid: u16,
    /// Admin max submission queue size.
    pub asqsz: u16,
    pub eflags: u16,
    /// The port (service id), e.g. "4420".
    pub trsvcid: String,
    pub subnqn: String,
    /// The address, e.g. "192.0.2.1".
    pub traddr: String,
    /// TCP security type (0: none).
    pub sectype: u8,
}

/// The discovery log page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryLog {
    /// Generation counter: changes whenever the entries do.
    pub genctr: u64,
    pub recfmt: u16,
    pub entries: Vec<DiscoveryEntry>,
}

/// A string padded with spaces (the discovery log's TRSVCID and TRADDR fields).
fn put_spaced(field: &mut [u8], s: &str) {
    field.fill(b' ');
    let n = s.len().min(field.len());
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn field_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).trim_end().to_string()
}

impl DiscoveryLog {
    /// The whole log: the 1024-byte header, then one 1024-byte record per entry.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; DISCOVERY_RECORD_LEN * (1 + self.entries.len())];
        b[0..8].copy_from_slice(&self.genctr.to_le_bytes());
        b[8..16].copy_from_slice(&(self.entries.len() as u64).to_le_bytes());
        b[16..18].copy_from_slice(&self.recfmt.to_le_bytes());
        for (i, e) in self.entries.iter().enumerate() {
            let r = &mut b[DISCOVERY_RECORD_LEN * (i + 1)..DISCOVERY_RECORD_LEN * (i + 2)];
            r[0] = e.trtype;
            r[1] = e.adrfam;
            r[2] = e.subtype;
            r[3] = e.treq;
            r[4..6].copy_from_slice(&e.portid.to_le_bytes());
            r[6..8].copy_from_slice(&e.cntlid.to_le_bytes());
            r[8..10].copy_from_slice(&e.asqsz.to_le_bytes());
            r[10..12].copy_from_slice(&e.eflags.to_le_bytes());
            put_spaced(&mut r[32..64], &e.trsvcid);
            put_str(&mut r[256..512], &e.subnqn);
            put_spaced(&mut r[512..768], &e.traddr);
            r[768] = e.sectype;
        }
        b
    }

    /// Decode a log read from offset 0: the header, and as many whole entries as `b` holds
    /// of those the header counts.
    pub fn decode(b: &[u8]) -> Result<DiscoveryLog, ShortData> {
        need("discovery log", b, 18)?;
        let numrec = le64(b, 8);
        let entries = b
            .get(DISCOVERY_RECORD_LEN..)
            .unwrap_or(&[])
            .chunks_exact(DISCOVERY_RECORD_LEN)
            .take(numrec.min(1 << 16) as usize)
            .map(|r| DiscoveryEntry {
                trtype: r[0],
                adrfam: r[1],
                subtype: r[2],
                treq: r[3],
                portid: le16(r, 4),
                cntlid: le16(r, 6),
                asqsz: le16(r, 8),
                eflags: le16(r, 10),
                trsvcid: field_str(&r[32..64]),
                subnqn: field_str(&r[256..512]),
                traddr: field_str(&r[512..768]),
                sectype: r[768],
            })
            .collect();
        Ok(DiscoveryLog {
            genctr: le64(b, 0),
            recfmt: le16(b, 16),
            entries,
        })
    }

    /// The number of records the header at the start of `b` announces.
    pub fn records(b: &[u8]) -> Option<u64> {
        (b.len() >= 16).then(|| le64(b, 8))
    }
}
