//! Admin commands: Identify, Get Log Page, Get/Set Features, Keep Alive, Asynchronous Event
//! Request, Abort, and the properties (through the fabrics commands on the admin queue).

use std::net::IpAddr;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::controller::{MAX_AERS, VERSION};
use super::queue::{Done, Exec, QueueCtx};
use super::{ioccsz, Kind, Namespace, ADMIN_QUEUE_ENTRIES};
use crate::codec::identify::{cmic, cntrltype, ctratt, nsfeat, oncs};
use crate::codec::log::{self as logs, adrfam, subtype, treq, trtype, DiscoveryEntry};
use crate::codec::{
    aen, cns, encode_ns_descriptors, encode_ns_list, feature, log_id, AdminCommand, Command,
    DiscoveryLog, IdentifyController, IdentifyNamespace, NsId, SmartLog, Status, IDENTIFY_LEN,
};

/// Run an admin command on an enabled controller.
pub(crate) fn execute(ctx: &std::sync::Arc<QueueCtx>, cmd: &Command, a: AdminCommand) -> Exec {
    let cid = cmd.cid;
    let discovery = ctx.ctrl.subsys.is_discovery();
    let r = match a {
        AdminCommand::Identify { cns, csi, .. } => identify(ctx, cmd, cns, csi),
        AdminCommand::GetLogPage {
            lid,
            rae,
            len,
            offset,
            ..
        } => get_log_page(ctx, cmd, lid, rae, len, offset),
        AdminCommand::GetFeatures { fid, sel, .. } => {
            get_features(ctx, fid, sel).map(|r| Done::result(cid, u64::from(r)))
        }
        AdminCommand::SetFeatures { fid, save, cdw11 } => {
            set_features(ctx, fid, save, cdw11).map(|r| Done::result(cid, u64::from(r)))
        }
        AdminCommand::KeepAlive => Ok(Done::ok(cid)),
        AdminCommand::AsyncEventRequest => {
            return match ctx.ctrl.request_event() {
                Ok(rx) => {
                    let stop = ctx.stop.clone();
                    Exec::Later(Box::pin(async move {
                        tokio::select! {
                            ev = rx => match ev {
                                Ok(dword) => Done::result(cid, u64::from(dword)),
                                Err(_) => Done::silent(cid),
                            },
                            // The queue is closing: the request ends with the association.
                            _ = stop.cancelled() => Done::silent(cid),
                        }
                    }))
                }
                Err(s) => Exec::Now(Done::status(cid, s)),
            };
        }
        // Commands complete quickly here: none is ever aborted (bit 0 set: "not aborted").
        AdminCommand::Abort { .. } if !discovery => Ok(Done::result(cid, 1)),
        _ => Err(Status::INVALID_OPCODE.dnr()),
    };
    Exec::Now(r.unwrap_or_else(|s| Done::status(cid, s)))
}

fn identify(ctx: &QueueCtx, cmd: &Command, cns: u8, csi: u8) -> Result<Done, Status> {
    if cmd.dptr.length as usize != IDENTIFY_LEN {
        return Err(Status::DATA_SGL_LENGTH_INVALID.dnr());
    }
    let subsys = &ctx.ctrl.subsys;
    let active = |nsid: u32| {
        subsys
            .namespace(nsid)
            .ok_or(Status::INVALID_NAMESPACE.dnr())
    };
    let data = match cns {
        cns::CONTROLLER => identify_controller(ctx).encode(),
        _ if subsys.is_discovery() => return Err(Status::INVALID_FIELD.dnr()),
        cns::NAMESPACE => identify_namespace(active(cmd.nsid)?).encode(),
        cns::ACTIVE_NAMESPACES => {
            if cmd.nsid >= 0xFFFF_FFFE {
                return Err(Status::INVALID_NAMESPACE.dnr());
            }
            let ids: Vec<u32> = subsys.namespaces().iter().map(|n| n.nsid).collect();
            encode_ns_list(&ids, cmd.nsid)
        }
        cns::NS_DESCRIPTORS => {
            let ns = active(cmd.nsid)?;
            encode_ns_descriptors(&[NsId::Nguid(ns.nguid), NsId::Uuid(ns.uuid), NsId::Csi(0)])
        }
        // The NVM command set's own structures: nothing beyond the defaults (no limits).
        cns::CS_NAMESPACE if csi == 0 => {
            active(cmd.nsid)?;
            vec![0u8; IDENTIFY_LEN]
        }
        cns::CS_CONTROLLER if csi == 0 => vec![0u8; IDENTIFY_LEN],
        _ => return Err(Status::INVALID_FIELD.dnr()),
    };
    Ok(Done::data(cmd.cid, Bytes::from(data)))
}

fn identify_controller(ctx: &QueueCtx) -> IdentifyController {
    let ctrl = &ctx.ctrl;
    let s = &ctrl.subsys;
    let limits = &ctx.shared.limits;
    let mut id = IdentifyController {
        serial: s.serial.clone(),
        model: s.model.clone(),
        firmware: env!("CARGO_PKG_VERSION").chars().take(8).collect(),
        rab: 6,
        cntlid: ctrl.cntlid,
        ver: VERSION,
        ctratt: ctratt::TBKAS,
        aerl: (MAX_AERS - 1) as u8,
        // Extended data for Get Log Page: offsets and long lengths.
        lpa: 1 << 2,
        sqes: 0x66,
        cqes: 0x44,
        kas: 10,
        sgls: 1 | 1 << 20,
        subnqn: s.nqn.clone(),
        msdbd: 1,
        // Disconnect is supported.
        ofcs: 1,
        ..IdentifyController::default()
    };
    match &s.kind {
        Kind::Discovery => {
            id.cntrltype = cntrltype::DISCOVERY;
            id.oaes = aen::CFG_DISCOVERY_CHANGE;
            id.maxcmd = ADMIN_QUEUE_ENTRIES as u16;
        }
        Kind::Nvm { namespace } => {
            let caps = namespace.device.capabilities();
            id.cntrltype = cntrltype::IO;
            id.cmic = cmic::MULTI_CONTROLLER;
            id.mdts = limits.mdts;
            id.oaes = aen::CFG_NS_ATTRIBUTE;
            id.acl = 3;
            // One read-only firmware slot.
            id.frmw = 1 << 1 | 1;
            id.wctemp = 343;
            id.cctemp = 373;
            id.maxcmd = limits.max_queue_entries.min(u32::from(u16::MAX)) as u16;
            id.nn = namespace.nsid;
            id.oncs = oncs::WRITE_ZEROES;
            if caps.trim {
                id.oncs |= oncs::DATASET_MANAGEMENT;
            }
            if caps.flush {
                // Present, and Flush takes the broadcast NSID.
                id.vwc = 0b111;
            }
            id.nvscc = 1;
            id.ioccsz = ioccsz(limits);
            id.iorcsz = 1;
        }
    }
    id
}

pub(crate) fn identify_namespace(ns: &Namespace) -> IdentifyNamespace {
    let g = ns.device.geometry();
    let caps = ns.device.capabilities();
    let blocks = ns.blocks();
    let per_opt = (u64::from(g.optimal_io_size) >> ns.lba_shift).clamp(1, 1 << 16) as u16;
    IdentifyNamespace {
        nsze: blocks,
        ncap: blocks,
        nuse: blocks,
        nsfeat: if per_opt > 1 { nsfeat::OPTPERF } else { 0 },
        nlbaf: 0,
        flbas: 0,
        nmic: 1,
        // Deallocated blocks read zeroes; Write Zeroes may deallocate.
        dlfeat: if caps.trim { 0b1001 } else { 0 },
        npwg: per_opt - 1,
        nows: per_opt - 1,
        nsattr: u8::from(ns.is_read_only()),
        nguid: ns.nguid,
        lbaf: vec![(0, ns.lba_shift as u8)],
        ..IdentifyNamespace::default()
    }
}

fn get_log_page(
    ctx: &QueueCtx,
    cmd: &Command,
    lid: u8,
    rae: bool,
    len: u64,
    offset: u64,
) -> Result<Done, Status> {
    if u64::from(cmd.dptr.length) != len {
        return Err(Status::DATA_SGL_LENGTH_INVALID.dnr());
    }
    if len > u64::from(ctx.shared.limits.max_data_transfer) || !offset.is_multiple_of(4) {
        return Err(Status::INVALID_FIELD.dnr());
    }
    let ctrl = &ctx.ctrl;
    let log = match (lid, ctrl.subsys.is_discovery()) {
        (log_id::DISCOVERY, true) => {
            let log = discovery_log(ctx);
            ctrl.discovery_log_read(rae);
            log
        }
        (log_id::ERROR, false) => vec![0u8; logs::ERROR_ENTRY_LEN],
        (log_id::SMART, false) => smart_log(ctx).encode(),
        (log_id::FIRMWARE_SLOT, false) => {
            let mut b = vec![0u8; logs::FIRMWARE_SLOT_LEN];
            b[0] = 1;
            let fr = env!("CARGO_PKG_VERSION").as_bytes();
            let n = fr.len().min(8);
            b[8..16].fill(b' ');
            b[8..8 + n].copy_from_slice(&fr[..n]);
            b
        }
        (log_id::CHANGED_NAMESPACES, false) => {
            let (ids, overflow) = ctrl.changed_namespaces(rae);
            if overflow {
                logs::encode_changed_ns(&vec![0; 1025])
            } else {
                logs::encode_changed_ns(&ids)
            }
        }
        _ => return Err(Status::INVALID_LOG_PAGE.dnr()),
    };
    let offset = usize::try_from(offset).map_err(|_| Status::INVALID_FIELD.dnr())?;
    if offset > log.len() {
        return Err(Status::INVALID_FIELD.dnr());
    }
    // Past the end of a log reads as zeroes.
    let mut out = log[offset..log.len().min(offset + len as usize)].to_vec();
    out.resize(len as usize, 0);
    Ok(Done::data(cmd.cid, Bytes::from(out)))
}

fn smart_log(ctx: &QueueCtx) -> SmartLog {
    let (mut reads, mut writes, mut read_bytes, mut written_bytes) = (0u64, 0u64, 0u64, 0u64);
    for ns in ctx.ctrl.subsys.namespaces() {
        reads += ns.stats.reads.load(Ordering::Relaxed);
        writes += ns.stats.writes.load(Ordering::Relaxed);
        read_bytes += ns.stats.bytes_read.load(Ordering::Relaxed);
        written_bytes += ns.stats.bytes_written.load(Ordering::Relaxed);
    }
    // Thousands of 512-byte units, rounded up.
    let units = |bytes: u64| u128::from(bytes.div_ceil(512).div_ceil(1000));
    SmartLog {
        temperature: 300,
        available_spare: 100,
        spare_threshold: 10,
        data_units_read: units(read_bytes),
        data_units_written: units(written_bytes),
        host_reads: u128::from(reads),
        host_writes: u128::from(writes),
        power_cycles: 1,
        power_on_hours: u128::from(ctx.shared.started.elapsed().as_secs() / 3600),
        ..SmartLog::default()
    }
}

fn discovery_log(ctx: &QueueCtx) -> Vec<u8> {
    let ip = ctx.local.ip().to_canonical();
    let family = match ip {
        IpAddr::V4(_) => adrfam::IPV4,
        IpAddr::V6(_) => adrfam::IPV6,
    };
    let entries = ctx
        .shared
        .subsystems
        .read()
        .expect("lock poisoned")
        .values()
        .filter(|s| s.host_allowed(&ctx.ctrl.hostnqn))
        .map(|s| DiscoveryEntry {
            trtype: trtype::TCP,
            adrfam: family,
            subtype: subtype::NVM,
            treq: treq::SECURE_CHANNEL_NOT_REQUIRED | treq::DISABLE_SQFLOW,
            portid: 1,
            cntlid: 0xFFFF,
            asqsz: ADMIN_QUEUE_ENTRIES as u16,
            eflags: 0,
            trsvcid: ctx.local.port().to_string(),
            subnqn: s.nqn.clone(),
            traddr: ip.to_string(),
            sectype: 0,
        })
        .collect();
    DiscoveryLog {
        genctr: ctx.shared.genctr.load(Ordering::Relaxed),
        recfmt: 0,
        entries,
    }
    .encode()
}

fn get_features(ctx: &QueueCtx, fid: u8, sel: u8) -> Result<u32, Status> {
    let ctrl = &ctx.ctrl;
    let discovery = ctrl.subsys.is_discovery();
    let caps = ctrl
        .subsys
        .namespaces()
        .first()
        .map(|n| n.device.capabilities());
    let cache = caps.is_some_and(|c| c.flush);
    let known = match fid {
        feature::KEEP_ALIVE_TIMER | feature::ASYNC_EVENT_CONFIG => true,
        feature::NUMBER_OF_QUEUES | feature::TEMPERATURE_THRESHOLD => !discovery,
        feature::VOLATILE_WRITE_CACHE => cache,
        _ => false,
    };
    if !known {
        return Err(Status::INVALID_FIELD.dnr());
    }
    if sel == 3 {
        // Supported capabilities: changeable, not saveable, not namespace specific.
        return Ok(1 << 2);
    }
    Ok(match fid {
        feature::KEEP_ALIVE_TIMER => ctrl.kato_ms(),
        feature::ASYNC_EVENT_CONFIG => ctrl.aen_config(),
        feature::NUMBER_OF_QUEUES => ctrl.queue_count(),
        feature::TEMPERATURE_THRESHOLD => u32::from(ctrl.temp_threshold()),
        _ => u32::from(!ctrl.write_through()),
    })
}

fn set_features(ctx: &QueueCtx, fid: u8, save: bool, cdw11: u32) -> Result<u32, Status> {
    let ctrl = &ctx.ctrl;
    let discovery = ctrl.subsys.is_discovery();
    if save {
        return Err(Status::FEATURE_NOT_SAVEABLE.dnr());
    }
    match fid {
        feature::KEEP_ALIVE_TIMER => {
            ctrl.set_kato_ms(cdw11);
            Ok(0)
        }
        feature::ASYNC_EVENT_CONFIG => {
            let supported = if discovery {
                aen::CFG_DISCOVERY_CHANGE
            } else {
                aen::CFG_NS_ATTRIBUTE
            };
            ctrl.set_aen_config(cdw11 & supported);
            Ok(0)
        }
        feature::NUMBER_OF_QUEUES if !discovery => {
            ctrl.set_queue_count(cdw11, ctx.shared.limits.max_io_queues)
        }
        feature::TEMPERATURE_THRESHOLD if !discovery => {
            // Only the composite temperature's over-temperature threshold is kept.
            if (cdw11 >> 16) & 0x3F == 0 {
                ctrl.set_temp_threshold(cdw11 as u16);
            }
            Ok(0)
        }
        feature::VOLATILE_WRITE_CACHE if !discovery => {
            let cache = ctrl
                .subsys
                .namespaces()
                .first()
                .is_some_and(|n| n.device.capabilities().flush);
            if !cache {
                return Err(Status::INVALID_FIELD.dnr());
            }
            ctrl.set_write_through(cdw11 & 1 == 0);
            Ok(0)
        }
        _ => Err(Status::INVALID_FIELD.dnr()),
    }
}
