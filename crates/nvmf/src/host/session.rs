//! One association with a controller: the admin queue, the I/O queues, the keep-alive timer
//! and the asynchronous-event loop that follows namespace size changes.
//!
//! ```text
//!   ICReq ─► Connect (admin, new controller) ─► CAP, VS ─► CC.EN=1 ─► CSTS.RDY
//!     ─► Identify controller, namespace ─► Number of Queues ─► AEN config
//!     ─► per I/O queue: ICReq ─► Connect (qid, controller ID)
//! ```

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::queue::{Failed, Link, Payload, Queue, QueueParams, Response};
use super::HostOptions;
use crate::codec::identify::oncs;
use crate::codec::{
    aen, cattr, cns, decode_ns_descriptors, feature, log_id, property, Command, Connect,
    ConnectData, IdentifyController, IdentifyNamespace, NsId, Status, CONNECT_DATA_LEN,
    IDENTIFY_LEN,
};

/// Admin queue entries asked for.
const ADMIN_DEPTH: u16 = 32;
/// The largest transfer per command when the controller sets no limit.
const DEFAULT_MAX_TRANSFER: u32 = 1 << 20;

/// Why an association could not be set up.
#[derive(Debug, Clone)]
pub(crate) enum SetupError {
    /// The target cannot be reached, or broke off: worth retrying.
    Transient(String),
    /// The target refused in a way that retrying will not change (no such subsystem, not
    /// allowed, no such namespace).
    Refused(strata_bdev::ErrorKind, String),
}

impl SetupError {
    pub fn message(&self) -> &str {
        match self {
            SetupError::Transient(m) | SetupError::Refused(_, m) => m,
        }
    }
}

/// What the host knows of the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NsInfo {
    pub nsid: u32,
    pub lba_shift: u32,
    pub blocks: u64,
    pub nguid: [u8; 16],
    pub uuid: Option<[u8; 16]>,
    pub read_only: bool,
    /// Optimal I/O size in bytes.
    pub optimal: u32,
}

impl NsInfo {
    /// The same namespace (a reconnect must find the one it left).
    pub fn same_as(&self, o: &NsInfo) -> bool {
        self.nsid == o.nsid
            && self.lba_shift == o.lba_shift
            && self.nguid == o.nguid
            && self.uuid == o.uuid
    }
}

/// A live association.
#[derive(Debug)]
pub(crate) struct Session {
    pub link: Arc<Link>,
    pub admin: Queue,
    pub io: Vec<Queue>,
    pub cntlid: u16,
    pub ctrl: IdentifyController,
    pub ns: NsInfo,
    /// Bytes per command at most (a multiple of the block size).
    pub max_transfer: u32,
    /// The device's size in blocks, which the event loop updates on namespace notices.
    pub blocks: Arc<AtomicU64>,
    next: AtomicUsize,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.link.fail("the association was closed");
    }
}

impl Session {
    /// The next I/O queue, in turn.
    pub fn queue(&self) -> &Queue {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.io[i % self.io.len()]
    }

    pub fn has(&self, bit: u16) -> bool {
        self.ctrl.oncs & bit != 0
    }

    pub fn write_zeroes(&self) -> bool {
        self.has(oncs::WRITE_ZEROES)
    }

    pub fn deallocate(&self) -> bool {
        self.has(oncs::DATASET_MANAGEMENT)
    }

    /// A volatile write cache: Flush is meaningful.
    pub fn cache(&self) -> bool {
        self.ctrl.vwc & 1 != 0
    }

    /// Tell the controller to shut down (it flushes), wait until it says it has (at most
    /// `limit`), and end the association.
    pub async fn shutdown(&self, limit: Duration) {
        let r = tokio::time::timeout(limit, async {
            let cc = prop_get(&self.admin, property::CC, false).await?;
            let cc = (cc as u32 & !property::CC_SHN_MASK) | 1 << 14;
            prop_set(&self.admin, property::CC, u64::from(cc)).await?;
            loop {
                let csts = prop_get(&self.admin, property::CSTS, false).await? as u32;
                if csts & property::CSTS_SHST_MASK == property::CSTS_SHST_COMPLETE {
                    return Ok::<(), Failed>(());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if !matches!(r, Ok(Ok(()))) {
            debug!("the controller did not confirm its shutdown");
        }
        self.link.fail("the device was closed");
    }
}

/// Submit on the admin queue; a failed status is an error.
pub(crate) async fn admin(q: &Queue, cmd: Command, payload: Payload) -> Result<Response, Failed> {
    let r = q.submit(cmd, payload).await?;
    if r.completion.status.is_success() {
        Ok(r)
    } else {
        Err(Failed::Status(r.completion.status))
    }
}

async fn prop_get(q: &Queue, offset: u32, eight: bool) -> Result<u64, Failed> {
    Ok(
        admin(q, Command::property_get(0, offset, eight), Payload::None)
            .await?
            .completion
            .result,
    )
}

async fn prop_set(q: &Queue, offset: u32, value: u64) -> Result<(), Failed> {
    admin(
        q,
        Command::property_set(0, offset, false, value),
        Payload::None,
    )
    .await?;
    Ok(())
}

async fn identify(q: &Queue, cns: u8, nsid: u32) -> Result<BytesMut, Failed> {
    Ok(admin(
        q,
        Command::identify(0, cns, nsid, 0),
        Payload::FromController(BytesMut::with_capacity(IDENTIFY_LEN)),
    )
    .await?
    .data)
}

/// Identify namespace `nsid`.
pub(crate) async fn identify_ns(q: &Queue, nsid: u32) -> Result<IdentifyNamespace, Failed> {
    let b = identify(q, cns::NAMESPACE, nsid).await?;
    IdentifyNamespace::decode(&b).map_err(|e| Failed::Protocol(e.to_string()))
}

/// Connect a queue: the first command on it.
async fn connect_queue(
    q: &Queue,
    opts: &HostOptions,
    subnqn: &str,
    qid: u16,
    sqsize: u16,
    cntlid: u16,
) -> Result<u16, Failed> {
    let c = Connect {
        recfmt: 0,
        qid,
        sqsize,
        cattr: cattr::DISABLE_SQFLOW,
        kato: if qid == 0 {
            opts.keep_alive.as_millis().min(u128::from(u32::MAX)) as u32
        } else {
            0
        },
    };
    let data = ConnectData {
        hostid: opts.hostid,
        cntlid,
        subnqn: subnqn.to_string(),
        hostnqn: opts.hostnqn.clone(),
    };
    let d = Bytes::copy_from_slice(&data.encode()[..CONNECT_DATA_LEN]);
    let r = q
        .submit(Command::connect(0, &c), Payload::ToController(d))
        .await?;
    if !r.completion.status.is_success() {
        return Err(Failed::Status(r.completion.status));
    }
    Ok(r.completion.result as u16)
}

/// Explain a refused Connect.
fn connect_refusal(s: Status, subnqn: &str, opts: &HostOptions, result: Option<u64>) -> SetupError {
    use strata_bdev::ErrorKind;
    let c = s.code();
    if c == Status::CONNECT_INVALID_HOST {
        return SetupError::Refused(
            ErrorKind::PermissionDenied,
            format!(
                "the target does not allow host {} to connect to {subnqn}",
                opts.hostnqn
            ),
        );
    }
    if c == Status::CONNECT_INVALID_PARAMETERS
        && result.is_some_and(|r| r as u16 == crate::codec::connect_offset::SUBNQN)
    {
        return SetupError::Refused(
            ErrorKind::InvalidInput,
            format!("the target has no subsystem {subnqn}"),
        );
    }
    if c == Status::CONNECT_CONTROLLER_BUSY {
        return SetupError::Transient(format!("connect to {subnqn}: the controller is busy"));
    }
    SetupError::Refused(ErrorKind::Io, format!("connect to {subnqn}: {s}"))
}

fn failed(what: &str, f: Failed) -> SetupError {
    match f {
        Failed::Lost(why) => SetupError::Transient(format!("{what}: {why}")),
        Failed::Status(s) => {
            SetupError::Refused(strata_bdev::ErrorKind::Io, format!("{what}: {s}"))
        }
        Failed::Protocol(why) => SetupError::Transient(format!("{what}: {why}")),
    }
}

/// Set up an association with subsystem `subnqn` at `addr`, for namespace `opts.nsid`.
pub(crate) async fn establish(
    addr: &str,
    name: &Arc<str>,
    subnqn: &str,
    opts: &HostOptions,
    blocks: Arc<AtomicU64>,
) -> Result<Session, SetupError> {
    let link = Arc::new(Link::default());
    let open = |qid: u16, depth: u16, in_capsule: usize, max_read: u32| {
        Queue::open(QueueParams {
            addr: addr.to_string(),
            name: name.clone(),
            qid,
            depth,
            digests: opts.digests(),
            in_capsule,
            max_read,
            link: link.clone(),
        })
    };
    let io_err = |e: std::io::Error| SetupError::Transient(format!("connect to {addr}: {e}"));
    // The admin queue takes 8 KiB in the capsule (the TCP binding's admin capsule size).
    let admin_q = open(0, ADMIN_DEPTH, 8192, 1 << 20).await.map_err(io_err)?;
    let cntlid = match admin_q
        .submit(
            Command::connect(
                0,
                &Connect {
                    recfmt: 0,
                    qid: 0,
                    sqsize: ADMIN_DEPTH - 1,
                    cattr: cattr::DISABLE_SQFLOW,
                    kato: opts.keep_alive.as_millis().min(u128::from(u32::MAX)) as u32,
                },
            ),
            Payload::ToController(Bytes::copy_from_slice(
                &ConnectData {
                    hostid: opts.hostid,
                    cntlid: 0xFFFF,
                    subnqn: subnqn.to_string(),
                    hostnqn: opts.hostnqn.clone(),
                }
                .encode(),
            )),
        )
        .await
    {
        Ok(r) if r.completion.status.is_success() => r.completion.result as u16,
        Ok(r) => {
            return Err(connect_refusal(
                r.completion.status,
                subnqn,
                opts,
                Some(r.completion.result),
            ))
        }
        Err(f) => return Err(failed("connect the admin queue", f)),
    };
    let cap = prop_get(&admin_q, property::CAP, true)
        .await
        .map_err(|f| failed("read CAP", f))?;
    // Enable: NVM command set, 4 KiB pages, 64-byte submission and 16-byte completion entries.
    let cc = property::CC_EN | 6 << 16 | 4 << 20;
    prop_set(&admin_q, property::CC, u64::from(cc))
        .await
        .map_err(|f| failed("enable the controller", f))?;
    let ready_within = Duration::from_millis(500 * (u64::from(property::cap_to(cap)) + 1));
    let ready = tokio::time::timeout(ready_within, async {
        let mut pause = Duration::from_millis(1);
        loop {
            let csts = prop_get(&admin_q, property::CSTS, false).await? as u32;
            if csts & property::CSTS_CFS != 0 {
                return Err(Failed::Protocol(
                    "the controller reports a fatal status after enable".into(),
                ));
            }
            if csts & property::CSTS_RDY != 0 {
                return Ok(());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    })
    .await;
    match ready {
        Ok(Ok(())) => {}
        Ok(Err(f)) => return Err(failed("enable the controller", f)),
        Err(_) => {
            return Err(SetupError::Transient(format!(
                "the controller was not ready within {ready_within:?}"
            )))
        }
    }
    let ctrl = identify(&admin_q, cns::CONTROLLER, 0)
        .await
        .map_err(|f| failed("identify the controller", f))
        .and_then(|b| {
            IdentifyController::decode(&b)
                .map_err(|e| SetupError::Transient(format!("identify the controller: {e}")))
        })?;
    if ctrl.cntlid != cntlid {
        return Err(SetupError::Transient(format!(
            "the controller identifies as {} after connecting as {cntlid}",
            ctrl.cntlid
        )));
    }
    if ctrl.sgls & 3 == 0 {
        return Err(SetupError::Refused(
            strata_bdev::ErrorKind::Unsupported,
            "the controller does not support SGLs".into(),
        ));
    }
    let ns = identify_ns(&admin_q, opts.nsid)
        .await
        .map_err(|f| failed(&format!("identify namespace {}", opts.nsid), f))?;
    if ns.ncap == 0 {
        return Err(SetupError::Refused(
            strata_bdev::ErrorKind::InvalidInput,
            format!("namespace {} of {subnqn} is not active", opts.nsid),
        ));
    }
    let lba_shift = u32::from(ns.lba_shift().ok_or_else(|| {
        SetupError::Refused(
            strata_bdev::ErrorKind::Unsupported,
            format!("namespace {}: no valid LBA format", opts.nsid),
        )
    })?);
    if !(9..=16).contains(&lba_shift) {
        return Err(SetupError::Refused(
            strata_bdev::ErrorKind::Unsupported,
            format!(
                "namespace {}: a {}-byte block size",
                opts.nsid,
                1u64 << lba_shift.min(63)
            ),
        ));
    }
    if ns
        .lbaf
        .get(usize::from(ns.flbas & 0xF))
        .is_some_and(|f| f.0 != 0)
    {
        return Err(SetupError::Refused(
            strata_bdev::ErrorKind::Unsupported,
            format!(
                "namespace {}: metadata formats are not supported",
                opts.nsid
            ),
        ));
    }
    let uuid = match identify(&admin_q, cns::NS_DESCRIPTORS, opts.nsid).await {
        Ok(b) => decode_ns_descriptors(&b).into_iter().find_map(|d| match d {
            NsId::Uuid(u) => Some(u),
            _ => None,
        }),
        // Optional before NVMe 1.3.
        Err(Failed::Status(_)) => None,
        Err(f) => return Err(failed("identify namespace descriptors", f)),
    };
    let bs = 1u32 << lba_shift;
    let optimal = if ns.nows > 0 {
        (u32::from(ns.nows) + 1).saturating_mul(bs)
    } else {
        bs.max(4096)
    };
    let info = NsInfo {
        nsid: opts.nsid,
        lba_shift,
        blocks: ns.nsze,
        nguid: ns.nguid,
        uuid,
        read_only: ns.nsattr & 1 != 0,
        optimal: if optimal.is_power_of_two() {
            optimal
        } else {
            bs.max(4096)
        },
    };
    // MDTS counts minimum pages (4 KiB: CAP.MPSMIN = 0 is all this host uses).
    let mdts = if ctrl.mdts == 0 || ctrl.mdts > 18 {
        DEFAULT_MAX_TRANSFER
    } else {
        (4096u32 << ctrl.mdts).min(DEFAULT_MAX_TRANSFER * 8)
    };
    let max_transfer = (mdts.min(1 << 30) >> lba_shift << lba_shift).max(bs);

    let want = opts.queues.max(1);
    let granted = match admin(
        &admin_q,
        Command::set_features(0, feature::NUMBER_OF_QUEUES, {
            let z = u32::from(want - 1);
            z | z << 16
        }),
        Payload::None,
    )
    .await
    {
        Ok(r) => {
            let r = r.completion.result as u32;
            ((r & 0xFFFF).min(r >> 16) + 1).min(u32::from(want)) as u16
        }
        Err(f) => return Err(failed("set the number of queues", f)),
    };
    if ctrl.oaes & aen::CFG_NS_ATTRIBUTE != 0 {
        if let Err(f) = admin(
            &admin_q,
            Command::set_features(0, feature::ASYNC_EVENT_CONFIG, aen::CFG_NS_ATTRIBUTE),
            Payload::None,
        )
        .await
        {
            debug!(reason = ?f, "namespace notices not enabled");
        }
    }
    let mqes = u32::from(property::cap_mqes(cap)) + 1;
    let depth = u32::from(opts.queue_size)
        .min(mqes)
        .min(if ctrl.maxcmd > 0 {
            u32::from(ctrl.maxcmd)
        } else {
            mqes
        })
        .max(2) as u16;
    let in_capsule = (ctrl.ioccsz as usize * 16).saturating_sub(64);
    let mut io = Vec::with_capacity(usize::from(granted));
    for qid in 1..=granted {
        let q = open(qid, depth, in_capsule, max_transfer)
            .await
            .map_err(io_err)?;
        connect_queue(&q, opts, subnqn, qid, depth - 1, cntlid)
            .await
            .map_err(|f| match f {
                Failed::Status(s) => connect_refusal(s, subnqn, opts, None),
                f => failed(&format!("connect I/O queue {qid}"), f),
            })?;
        io.push(q);
    }
    info!(device = %name, cntlid, queues = granted, depth, blocks = info.blocks,
        block_size = bs, "NVMe/TCP association established");
    Ok(Session {
        link,
        admin: admin_q,
        io,
        cntlid,
        ctrl,
        ns: info,
        max_transfer,
        blocks,
        next: AtomicUsize::new(0),
    })
}

/// Background work of a session: keep-alives, and following namespace changes.
pub(crate) fn start_tasks(s: &Arc<Session>, opts: &HostOptions) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    if !opts.keep_alive.is_zero() {
        let s = s.clone();
        let kato = opts.keep_alive;
        tasks.push(tokio::spawn(async move {
            let link = s.link.clone();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(kato / 2) => {}
                    _ = link.dead.cancelled() => return,
                }
                let r = tokio::select! {
                    r = tokio::time::timeout(kato, admin(&s.admin, Command::keep_alive(0), Payload::None)) => r,
                    _ = link.dead.cancelled() => return,
                };
                match r {
                    Ok(Ok(_)) => {}
                    Ok(Err(Failed::Lost(_))) => return,
                    Ok(Err(f)) => {
                        warn!(reason = ?f, "keep alive refused");
                        link.fail(&format!("keep alive refused: {f:?}"));
                        return;
                    }
                    Err(_) => {
                        link.fail(&format!("no answer to keep alive within {kato:?}"));
                        return;
                    }
                }
            }
        }));
    }
    if s.ctrl.oaes & aen::CFG_NS_ATTRIBUTE != 0 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let link = s.link.clone();
            loop {
                let r = tokio::select! {
                    r = s.admin.submit(Command::async_event_request(0), Payload::None) => r,
                    _ = link.dead.cancelled() => return,
                };
                match r {
                    Ok(r) if r.completion.status.is_success() => {
                        let ev = r.completion.result as u32;
                        if ev & 7 == aen::TYPE_NOTICE && (ev >> 8) & 0xFF == aen::INFO_NS_CHANGED {
                            tokio::select! {
                                _ = namespace_changed(&s) => {}
                                _ = link.dead.cancelled() => return,
                            }
                        } else {
                            debug!(event = ev, "asynchronous event");
                        }
                    }
                    Ok(r) => {
                        debug!(status = %r.completion.status, "asynchronous event requests refused");
                        return;
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    tasks
}

/// A namespace notice: clear the changed list (which re-arms the notice) and re-identify.
async fn namespace_changed(s: &Session) {
    let log = admin(
        &s.admin,
        Command::get_log_page(0, log_id::CHANGED_NAMESPACES, 0xFFFF_FFFF, 4096, 0, false),
        Payload::FromController(BytesMut::with_capacity(4096)),
    )
    .await;
    if let Err(f) = log {
        debug!(reason = ?f, "read the changed namespace list");
    }
    match identify_ns(&s.admin, s.ns.nsid).await {
        Ok(ns) => {
            let old = s.blocks.swap(ns.nsze, Ordering::AcqRel);
            if old != ns.nsze {
                info!(
                    nsid = s.ns.nsid,
                    old_blocks = old,
                    blocks = ns.nsze,
                    "namespace resized"
                );
            }
        }
        Err(f) => debug!(reason = ?f, "identify the namespace after a notice"),
    }
}
