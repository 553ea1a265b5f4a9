//! What the device asks a target while opening (and after each reconnection): the first disk
//! LUN, its readiness and capacity, and the limits and features its VPD and mode pages report.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use strata_bdev::{Error, ErrorKind, Result};
use tokio::time::Instant;

use super::{sense_kind, DEFAULT_WRITE_SAME_BLOCKS, MAX_TRANSFER, MAX_UNIT_ATTENTIONS};
use crate::codec::decode_lun;
use crate::codec::scsi::{
    self, device_type, sense_key, status, vpd, BlockLimits, Capacity, Cdb, Inquiry, ModeSense,
    Provisioning,
};
use crate::session::{Command, Completion, Failure, Session};

/// What the target's pages said about sizes and features.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) block: u64,
    pub(super) max_transfer: u64,
    pub(super) unmap: bool,
    pub(super) max_unmap_blocks: u64,
    pub(super) unmap_with_write_same: bool,
    pub(super) max_write_same_blocks: u64,
    pub(super) fua: bool,
    pub(super) write_cache: bool,
    pub(super) read_only: bool,
    pub(super) trim_reads_zero: bool,
}

/// Commands run while opening or checking a device.
#[derive(Clone, Copy)]
pub(super) struct Probe<'a> {
    pub(super) session: &'a Session,
    pub(super) name: &'a str,
    pub(super) deadline: Instant,
    pub(super) timeout: Duration,
}

impl Probe<'_> {
    pub(super) async fn run(
        &self,
        what: &'static str,
        lun: u64,
        cdb: Cdb,
        read_len: usize,
    ) -> Result<Completion> {
        let cmd = Command {
            lun,
            cdb: cdb.encode().0,
            data_out: Bytes::new(),
            read_len,
        };
        match tokio::time::timeout_at(self.deadline, self.session.execute(&cmd)).await {
            Err(_) => Err(Error::new(
                ErrorKind::TimedOut,
                format!(
                    "{what} on {}: no answer within {:?}",
                    self.name, self.timeout
                ),
            )),
            Ok(Err(Failure::Lost(why) | Failure::Refused(why))) => Err(Error::new(
                ErrorKind::Io,
                format!("{what} on {}: {why}", self.name),
            )),
            Ok(Ok(c)) => Ok(c),
        }
    }

    /// Run to a good status, absorbing unit attentions; returns the data.
    pub(super) async fn good(
        &self,
        what: &'static str,
        lun: u64,
        cdb: Cdb,
        read_len: usize,
    ) -> Result<Bytes> {
        for _ in 0..MAX_UNIT_ATTENTIONS {
            let c = self.run(what, lun, cdb, read_len).await?;
            match (c.status, &c.sense) {
                (status::GOOD, _) => return Ok(c.data),
                (status::CHECK_CONDITION, Some(s)) if s.key == sense_key::UNIT_ATTENTION => {}
                (status::CHECK_CONDITION, Some(s)) => {
                    return Err(Error::new(
                        sense_kind(s),
                        format!(
                            "{what} on {}: the target answered CHECK CONDITION: {s}",
                            self.name
                        ),
                    ))
                }
                (st, _) => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!(
                            "{what} on {}: the target answered {}",
                            self.name,
                            scsi::status_name(st)
                        ),
                    ))
                }
            }
        }
        Err(Error::new(
            ErrorKind::Io,
            format!(
                "{what} on {}: unit attention after unit attention",
                self.name
            ),
        ))
    }

    fn bad(&self, what: &str, e: impl fmt::Display) -> Error {
        Error::new(
            ErrorKind::Io,
            format!(
                "{what} on {}: the target's answer is malformed: {e}",
                self.name
            ),
        )
    }

    /// The first LUN that holds a disk.
    pub(super) async fn first_disk(&self) -> Result<u64> {
        let data = self
            .good(
                "report LUNs",
                0,
                Cdb::ReportLuns {
                    select_report: 0,
                    alloc_len: 16 << 10,
                },
                16 << 10,
            )
            .await?;
        let (luns, _) = scsi::decode_report_luns(&data).map_err(|e| self.bad("report LUNs", e))?;
        let mut seen = Vec::new();
        for lun in luns {
            let data = self
                .good(
                    "inquiry",
                    lun,
                    Cdb::Inquiry {
                        evpd: false,
                        page: 0,
                        alloc_len: Inquiry::LEN as u16,
                    },
                    Inquiry::LEN,
                )
                .await?;
            let inq = Inquiry::decode(&data).map_err(|e| self.bad("inquiry", e))?;
            if inq.qualifier == 0 && inq.device_type == device_type::DISK {
                return Ok(lun);
            }
            seen.push(format!(
                "{} (device type {:#04x})",
                decode_lun(lun).map_or_else(|| format!("{lun:#x}"), |l| l.to_string()),
                inq.device_type
            ));
        }
        Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "open {}: the target has no disk LUN (LUNs: {}); name one as iscsi://HOST/IQN/LUN",
                self.name,
                if seen.is_empty() {
                    "none".into()
                } else {
                    seen.join(", ")
                }
            ),
        ))
    }

    pub(super) async fn ready(&self, lun: u64) -> Result<()> {
        self.good("test unit ready", lun, Cdb::TestUnitReady, 0)
            .await
            .map(|_| ())
    }

    pub(super) async fn capacity(&self, lun: u64) -> Result<Capacity> {
        let data = self
            .good(
                "read capacity",
                lun,
                Cdb::ReadCapacity16 {
                    alloc_len: Capacity::LEN as u32,
                },
                Capacity::LEN,
            )
            .await?;
        let c = Capacity::decode(&data).map_err(|e| self.bad("read capacity", e))?;
        if !c.block_len.is_power_of_two() || !(512..=65536).contains(&c.block_len) {
            return Err(self.bad(
                "read capacity",
                format!("a logical block of {} bytes", c.block_len),
            ));
        }
        if c.bytes().is_none() {
            return Err(self.bad("read capacity", format!("{c:?} overflows")));
        }
        Ok(c)
    }

    pub(super) async fn vpd(&self, lun: u64, page: u8, len: usize) -> Result<Bytes> {
        self.good(
            "inquiry",
            lun,
            Cdb::Inquiry {
                evpd: true,
                page,
                alloc_len: len as u16,
            },
            len,
        )
        .await
    }

    pub(super) async fn limits(&self, lun: u64, cap: &Capacity) -> Result<Limits> {
        let block = u64::from(cap.block_len);
        let pages = match self.vpd(lun, vpd::SUPPORTED_PAGES, 255).await {
            Ok(d) => scsi::decode_supported_pages(&d).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let bl = if pages.contains(&vpd::BLOCK_LIMITS) {
            let d = self.vpd(lun, vpd::BLOCK_LIMITS, BlockLimits::LEN).await?;
            BlockLimits::decode(&d).map_err(|e| self.bad("block limits", e))?
        } else {
            BlockLimits::default()
        };
        let prov = if cap.lbpme && pages.contains(&vpd::LOGICAL_BLOCK_PROVISIONING) {
            let d = self
                .vpd(lun, vpd::LOGICAL_BLOCK_PROVISIONING, Provisioning::LEN)
                .await?;
            Provisioning::decode(&d).map_err(|e| self.bad("logical block provisioning", e))?
        } else {
            Provisioning::default()
        };
        let mode = self
            .good(
                "mode sense",
                lun,
                Cdb::ModeSense6 {
                    dbd: true,
                    page: scsi::CACHING_PAGE,
                    subpage: 0,
                    alloc_len: 255,
                },
                255,
            )
            .await
            .ok()
            .and_then(|d| ModeSense::decode(&d).ok())
            .unwrap_or_default();
        let cap_blocks = |n: u64, default: u64| if n == 0 { default } else { n };
        let max_transfer = (cap_blocks(u64::from(bl.max_transfer_len), u64::MAX / block)
            .saturating_mul(block))
        .min(MAX_TRANSFER)
        .max(block);
        Ok(Limits {
            block,
            max_transfer,
            unmap: cap.lbpme && prov.lbpu && bl.max_unmap_lba_count > 0,
            max_unmap_blocks: u64::from(bl.max_unmap_lba_count),
            unmap_with_write_same: cap.lbpme && prov.lbpws,
            max_write_same_blocks: cap_blocks(bl.max_write_same_len, DEFAULT_WRITE_SAME_BLOCKS)
                .min(u64::from(u32::MAX)),
            fua: mode.dpofua,
            write_cache: mode.write_cache.unwrap_or(true),
            read_only: mode.write_protect,
            trim_reads_zero: cap.lbprz || prov.lbprz == 1,
        })
    }
}
