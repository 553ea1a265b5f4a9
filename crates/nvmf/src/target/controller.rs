//! Controllers: one per host association (an admin queue and its I/O queues), kept in a
//! registry per subsystem under a dynamically chosen ID, with their properties, features,
//! asynchronous events and keep-alive watchdog.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Shared, SubsystemState};
use crate::codec::{aen, log_id, property, Digests, Status};

/// A controller as [`Target::controller_info`](super::Target::controller_info) shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerInfo {
    pub cntlid: u16,
    pub hostnqn: String,
    /// The keep-alive timeout in force (0: none).
    pub keep_alive_ms: u32,
    /// The connected queues, the admin queue (0) first.
    pub queues: Vec<QueueInfo>,
}

/// One connected queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueInfo {
    pub qid: u16,
    pub header_digest: bool,
    pub data_digest: bool,
}

/// Controller IDs are chosen from 1 to this (0xFFF0 and up are reserved).
const MAX_CNTLID: u16 = 0xFFEF;
/// Asynchronous event requests a controller holds at most (AERL + 1).
pub(crate) const MAX_AERS: usize = 4;
/// The temperature threshold a controller starts with, in kelvins.
pub(crate) const DEFAULT_TEMP_THRESHOLD: u16 = 343;
/// NVMe version 1.3.0, which this target implements.
pub(crate) const VERSION: u32 = 0x0001_0300;

/// The controllers of one subsystem.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    controllers: BTreeMap<u16, Arc<Controller>>,
    /// The last ID handed out: IDs are handed out in turn, so one is not reused at once.
    last: u16,
}

impl Registry {
    pub fn all(&self) -> Vec<Arc<Controller>> {
        self.lock().controllers.values().cloned().collect()
    }

    pub fn get(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.lock().controllers.get(&cntlid).cloned()
    }

    /// Register a new controller under a free ID; `None` when every ID is taken.
    pub fn create(&self, make: impl FnOnce(u16) -> Controller) -> Option<Arc<Controller>> {
        let mut r = self.lock();
        let mut id = r.last;
        let mut free = false;
        for _ in 0..MAX_CNTLID {
            id = if id >= MAX_CNTLID { 1 } else { id + 1 };
            if !r.controllers.contains_key(&id) {
                free = true;
                break;
            }
        }
        if !free {
            return None;
        }
        r.last = id;
        let c = Arc::new(make(id));
        r.controllers.insert(id, c.clone());
        Some(c)
    }

    fn remove(&self, cntlid: u16) {
        self.lock().controllers.remove(&cntlid);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.inner.lock().expect("lock poisoned")
    }
}

/// Controller registers.
#[derive(Debug, Default)]
struct Regs {
    cc: u32,
    csts: u32,
}

/// Feature values.
#[derive(Debug)]
struct Features {
    aen_config: u32,
    /// I/O queues granted by Set Features (Number of Queues).
    io_queues: u16,
    temp_threshold: u16,
}

/// Asynchronous events: requests waiting, events waiting for a request, and what the
/// changed-namespace log holds.
#[derive(Debug, Default)]
struct Events {
    waiting: VecDeque<oneshot::Sender<u32>>,
    queued: VecDeque<u32>,
    changed_ns: BTreeSet<u32>,
    /// More than the log can hold changed.
    changed_overflow: bool,
    /// A namespace notice was sent and the host has not read the log yet: no more until then.
    ns_masked: bool,
    discovery_masked: bool,
}

/// One controller.
#[derive(Debug)]
pub(crate) struct Controller {
    pub cntlid: u16,
    pub subsys: Arc<SubsystemState>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    kato_ms: AtomicU32,
    kato_changed: Notify,
    last_seen: AtomicU64,
    ready: AtomicBool,
    /// Writes are made durable before they are answered (the host disabled the write cache).
    write_through: AtomicBool,
    regs: Mutex<Regs>,
    features: Mutex<Features>,
    events: Mutex<Events>,
    /// Connected queues (the admin queue is 0) and their digests.
    queues: Mutex<BTreeMap<u16, Digests>>,
    /// Cancelled when the controller is torn down: every queue's connection closes.
    pub stop: CancellationToken,
}

impl Controller {
    pub fn new(
        cntlid: u16,
        subsys: Arc<SubsystemState>,
        hostnqn: String,
        hostid: [u8; 16],
        kato_ms: u32,
        io_queues: u16,
        now_ms: u64,
    ) -> Controller {
        Controller {
            cntlid,
            subsys,
            hostnqn,
            hostid,
            kato_ms: AtomicU32::new(kato_ms),
            kato_changed: Notify::new(),
            last_seen: AtomicU64::new(now_ms),
            ready: AtomicBool::new(false),
            write_through: AtomicBool::new(false),
            regs: Mutex::new(Regs::default()),
            features: Mutex::new(Features {
                aen_config: 0,
                io_queues,
                temp_threshold: DEFAULT_TEMP_THRESHOLD,
            }),
            events: Mutex::new(Events::default()),
            queues: Mutex::new(BTreeMap::new()),
            stop: CancellationToken::new(),
        }
    }

    /// A command arrived: the host is alive.
    pub fn touch(&self, now_ms: u64) {
        self.last_seen.store(now_ms, Ordering::Relaxed);
    }

    /// CC.EN and CSTS.RDY are set: commands other than fabrics ones may run.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn write_through(&self) -> bool {
        self.write_through.load(Ordering::Relaxed)
    }

    pub fn set_write_through(&self, on: bool) {
        self.write_through.store(on, Ordering::Relaxed);
    }

    pub fn kato_ms(&self) -> u32 {
        self.kato_ms.load(Ordering::Relaxed)
    }

    pub fn set_kato_ms(&self, ms: u32) {
        self.kato_ms.store(ms, Ordering::Relaxed);
        self.kato_changed.notify_one();
    }

    /// End the association: every queue's connection closes, and the ID is free again.
    pub fn teardown(&self, why: &str) {
        if !self.stop.is_cancelled() {
            info!(nqn = %self.subsys.nqn, cntlid = self.cntlid, host = %self.hostnqn, reason = why, "controller torn down");
        }
        self.stop.cancel();
        self.subsys.controllers.remove(self.cntlid);
    }

    /// Tear the controller down when its host sends no command for the keep-alive timeout (and
    /// half of it again as slack for slow hosts, as NVMe allows).
    pub async fn watchdog(self: Arc<Self>, shared: Arc<Shared>) {
        loop {
            let kato = u64::from(self.kato_ms());
            if kato == 0 {
                tokio::select! {
                    _ = self.kato_changed.notified() => continue,
                    _ = self.stop.cancelled() => return,
                    _ = shared.shutdown.cancelled() => return,
                }
            }
            let deadline = self.last_seen.load(Ordering::Relaxed) + kato + kato / 2;
            if shared.now_ms() >= deadline {
                warn!(nqn = %self.subsys.nqn, cntlid = self.cntlid, host = %self.hostnqn, kato_ms = kato,
                    "keep-alive timeout: the host sent nothing in time");
                self.teardown("keep-alive timeout");
                return;
            }
            let at = shared.started + Duration::from_millis(deadline);
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = self.kato_changed.notified() => {}
                _ = self.stop.cancelled() => return,
                _ = shared.shutdown.cancelled() => return,
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Properties

    /// Property Get.
    pub fn property_get(&self, offset: u32, eight: bool, cap: u64) -> Result<u64, Status> {
        let regs = self.regs.lock().expect("lock poisoned");
        match (offset, eight) {
            (property::CAP, true) => Ok(cap),
            (property::VS, false) => Ok(u64::from(VERSION)),
            (property::CC, false) => Ok(u64::from(regs.cc)),
            (property::CSTS, false) => Ok(u64::from(regs.csts)),
            _ => Err(Status::INVALID_FIELD.dnr()),
        }
    }

    /// Property Set: only CC is writable. Enabling checks the queue entry sizes and page size
    /// (a bad one sets CSTS.CFS); disabling resets; a shutdown notification flushes every
    /// namespace (in `shared`'s tasks) and then reports shutdown complete.
    pub fn property_set(
        self: &Arc<Self>,
        offset: u32,
        eight: bool,
        value: u64,
        shared: &Arc<Shared>,
    ) -> Result<(), Status> {
        if offset != property::CC || eight {
            return Err(Status::INVALID_FIELD.dnr());
        }
        let new = value as u32;
        let mut regs = self.regs.lock().expect("lock poisoned");
        let old = regs.cc;
        if new & property::CC_EN != 0 && old & property::CC_EN == 0 {
            let valid = property::cc_iosqes(new) == 6
                && property::cc_iocqes(new) == 4
                && property::cc_mps(new) == 0
                && property::cc_ams(new) == 0
                && property::cc_css(new) == 0;
            if valid {
                regs.csts = property::CSTS_RDY;
                self.ready.store(true, Ordering::Release);
                debug!(cntlid = self.cntlid, "controller enabled");
            } else {
                warn!(
                    cntlid = self.cntlid,
                    cc = new,
                    "controller enable with unsupported CC"
                );
                regs.csts = property::CSTS_CFS;
            }
        } else if new & property::CC_EN == 0 && old & property::CC_EN != 0 {
            regs.csts = 0;
            self.ready.store(false, Ordering::Release);
            debug!(cntlid = self.cntlid, "controller disabled");
        }
        let shn = new & property::CC_SHN_MASK;
        if shn != 0 && old & property::CC_SHN_MASK == 0 {
            regs.csts = (regs.csts & !property::CSTS_SHST_MASK) | property::CSTS_SHST_OCCURRING;
            let ctrl = self.clone();
            shared.tasks.spawn(async move {
                for ns in ctrl.subsys.namespaces() {
                    if ns.device.capabilities().flush {
                        if let Err(e) = ns.device.flush().await {
                            warn!(nqn = %ctrl.subsys.nqn, error = %e.chain(), "flush at controller shutdown");
                        }
                    }
                }
                let mut regs = ctrl.regs.lock().expect("lock poisoned");
                regs.csts =
                    (regs.csts & !property::CSTS_SHST_MASK) | property::CSTS_SHST_COMPLETE;
                debug!(cntlid = ctrl.cntlid, "controller shutdown complete");
            });
        } else if shn == 0 {
            regs.csts &= !property::CSTS_SHST_MASK;
        }
        regs.cc = new;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Queues and features

    /// A queue connected: the admin queue (0) or an I/O queue within the granted count.
    pub fn add_queue(&self, qid: u16, digests: Digests) -> Result<(), Status> {
        if qid > self.features.lock().expect("lock poisoned").io_queues {
            return Err(Status::CONNECT_INVALID_PARAMETERS.dnr());
        }
        let mut q = self.queues.lock().expect("lock poisoned");
        if q.contains_key(&qid) {
            return Err(Status::COMMAND_SEQUENCE_ERROR.dnr());
        }
        q.insert(qid, digests);
        Ok(())
    }

    pub fn remove_queue(&self, qid: u16) {
        self.queues.lock().expect("lock poisoned").remove(&qid);
    }

    /// What a user sees of this controller.
    pub fn info(&self) -> ControllerInfo {
        ControllerInfo {
            cntlid: self.cntlid,
            hostnqn: self.hostnqn.clone(),
            keep_alive_ms: self.kato_ms(),
            queues: self
                .queues
                .lock()
                .expect("lock poisoned")
                .iter()
                .map(|(&qid, d)| QueueInfo {
                    qid,
                    header_digest: d.header,
                    data_digest: d.data,
                })
                .collect(),
        }
    }

    /// Set Features, Number of Queues (0's based counts): grants up to `max`. Only before any
    /// I/O queue exists.
    pub fn set_queue_count(&self, cdw11: u32, max: u16) -> Result<u32, Status> {
        let (nsq, ncq) = (cdw11 as u16, (cdw11 >> 16) as u16);
        if nsq == u16::MAX || ncq == u16::MAX {
            return Err(Status::INVALID_FIELD.dnr());
        }
        if self
            .queues
            .lock()
            .expect("lock poisoned")
            .keys()
            .any(|&q| q > 0)
        {
            return Err(Status::COMMAND_SEQUENCE_ERROR.dnr());
        }
        let granted = (nsq.min(ncq) + 1).min(max);
        self.features.lock().expect("lock poisoned").io_queues = granted;
        Ok(queue_count(granted))
    }

    pub fn queue_count(&self) -> u32 {
        queue_count(self.features.lock().expect("lock poisoned").io_queues)
    }

    pub fn aen_config(&self) -> u32 {
        self.features.lock().expect("lock poisoned").aen_config
    }

    pub fn set_aen_config(&self, v: u32) {
        self.features.lock().expect("lock poisoned").aen_config = v;
    }

    pub fn temp_threshold(&self) -> u16 {
        self.features.lock().expect("lock poisoned").temp_threshold
    }

    pub fn set_temp_threshold(&self, v: u16) {
        self.features.lock().expect("lock poisoned").temp_threshold = v;
    }

    // -----------------------------------------------------------------------------------------
    // Asynchronous events

    /// An Asynchronous Event Request: the receiver yields the event's completion dword 0.
    pub fn request_event(&self) -> Result<oneshot::Receiver<u32>, Status> {
        let (tx, rx) = oneshot::channel();
        let mut ev = self.events.lock().expect("lock poisoned");
        if let Some(e) = ev.queued.pop_front() {
            let _ = tx.send(e);
            return Ok(rx);
        }
        ev.waiting.retain(|w| !w.is_closed());
        if ev.waiting.len() >= MAX_AERS {
            return Err(Status::AER_LIMIT_EXCEEDED.dnr());
        }
        ev.waiting.push_back(tx);
        Ok(rx)
    }

    fn raise(ev: &mut Events, dword: u32) {
        while let Some(w) = ev.waiting.pop_front() {
            match w.send(dword) {
                Ok(()) => return,
                Err(_) => continue,
            }
        }
        ev.queued.push_back(dword);
    }

    /// A namespace's attributes (its size) changed.
    pub fn namespace_changed(&self, nsid: u32) {
        let enabled = self.aen_config() & aen::CFG_NS_ATTRIBUTE != 0;
        let mut ev = self.events.lock().expect("lock poisoned");
        if ev.changed_ns.len() >= 1024 {
            ev.changed_overflow = true;
        } else {
            ev.changed_ns.insert(nsid);
        }
        if enabled && !ev.ns_masked {
            ev.ns_masked = true;
            Controller::raise(
                &mut ev,
                aen::result(
                    aen::TYPE_NOTICE,
                    aen::INFO_NS_CHANGED,
                    log_id::CHANGED_NAMESPACES,
                ),
            );
            debug!(cntlid = self.cntlid, nsid, "namespace attribute notice");
        }
    }

    /// The discovery log changed.
    pub fn discovery_log_changed(&self) {
        if self.aen_config() & aen::CFG_DISCOVERY_CHANGE == 0 {
            return;
        }
        let mut ev = self.events.lock().expect("lock poisoned");
        if !ev.discovery_masked {
            ev.discovery_masked = true;
            Controller::raise(
                &mut ev,
                aen::result(
                    aen::TYPE_NOTICE,
                    aen::INFO_DISCOVERY_CHANGED,
                    log_id::DISCOVERY,
                ),
            );
        }
    }

    /// The changed namespace list; reading it without RAE clears it and re-arms the notice.
    pub fn changed_namespaces(&self, rae: bool) -> (Vec<u32>, bool) {
        let mut ev = self.events.lock().expect("lock poisoned");
        let list = (ev.changed_ns.iter().copied().collect(), ev.changed_overflow);
        if !rae {
            ev.changed_ns.clear();
            ev.changed_overflow = false;
            ev.ns_masked = false;
        }
        list
    }

    /// The host read the discovery log: re-arm its notice unless RAE.
    pub fn discovery_log_read(&self, rae: bool) {
        if !rae {
            self.events.lock().expect("lock poisoned").discovery_masked = false;
        }
    }
}

fn queue_count(n: u16) -> u32 {
    let z = u32::from(n.max(1) - 1);
    z | z << 16
}
