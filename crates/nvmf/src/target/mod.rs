//! The NVMe/TCP target: subsystems over block devices, served to any NVMe/TCP host.
//!
//! ```text
//!   accept (connection limit) ─► one task per connection = one queue (admin or I/O):
//!
//!     ICReq ─► Connect ─┬─ qid 0: a new controller (dynamic ID) in the subsystem's registry,
//!                       │         its keep-alive watchdog, properties, admin commands, AENs
//!                       └─ qid N: an I/O queue of that controller
//!
//!     read PDUs ─► commands (futures, polled by this task) ─► Arc<dyn BlockDevice>
//!        │  R2T / H2CData for large writes                     │
//!        └────────────── vectored writes ◄── C2HData + responses ┘
//! ```
//!
//! Every subsystem has one namespace (NSID 1) over its device, with an NGUID and UUID that stay
//! the same for the same subsystem name; the discovery subsystem lists every subsystem a host
//! may connect to, at the address that host reached. Data structures are per namespace and per
//! controller so that ANA groups and reservations can be added beside them.

mod admin;
mod controller;
mod io;
mod queue;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strata_bdev::BlockDevice;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::codec::{DISCOVERY_NQN, MAX_NQN_LEN};

pub(crate) use controller::Controller;
pub use controller::{ControllerInfo, QueueInfo};

/// Target settings; [`TargetSettings::default`] holds the documented defaults. Sizes may be
/// written as numbers of bytes or with a unit (`"1M"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TargetSettings {
    /// Entries an I/O queue may have (CAP.MQES + 1); a host asks for at most this many in
    /// Connect. 2 to 65536. Default 128.
    pub max_queue_entries: u32,
    /// I/O queues per controller. Default 8.
    pub max_io_queues: u16,
    /// The most data one H2CData PDU may carry (MAXH2CDATA). At least 4 KiB. Default 1 MiB.
    #[serde(with = "strata_bdev::units::size")]
    pub max_h2c_data: u64,
    /// The largest data transfer of one command (MDTS), a power of two of at least 4 KiB.
    /// Default 1 MiB.
    #[serde(with = "strata_bdev::units::size")]
    pub max_data_transfer: u64,
    /// In-capsule data an I/O command may carry, so that small writes need no R2T (admin
    /// queues always take 8 KiB). Default 8 KiB.
    #[serde(with = "strata_bdev::units::size")]
    pub in_capsule_data_size: u64,
    /// Keep-alive timeout of a discovery controller whose host asks for none, so abandoned
    /// discovery sessions end. Default 120 s. (An I/O controller with a keep-alive timeout of
    /// 0 has none, as NVMe says.)
    pub keep_alive_default_secs: f64,
    /// Connections served at once; further hosts wait in the listen backlog. Default 1024.
    pub max_connections: usize,
    /// Time a new connection has to send ICReq and Connect. Default 30 s.
    pub handshake_timeout_secs: f64,
}

impl Default for TargetSettings {
    fn default() -> TargetSettings {
        TargetSettings {
            max_queue_entries: 128,
            max_io_queues: 8,
            max_h2c_data: 1 << 20,
            max_data_transfer: 1 << 20,
            in_capsule_data_size: 8192,
            keep_alive_default_secs: 120.0,
            max_connections: 1024,
            handshake_timeout_secs: 30.0,
        }
    }
}

/// The admin queue takes this much in-capsule data (the TCP binding's admin capsule size).
pub(crate) const ADMIN_IN_CAPSULE: u32 = 8192;
/// Entries of an admin queue at most.
pub(crate) const ADMIN_QUEUE_ENTRIES: u32 = 32;

/// Settings checked and turned into the numbers the protocol uses.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub max_queue_entries: u32,
    pub max_io_queues: u16,
    pub max_h2c_data: u32,
    pub max_data_transfer: u32,
    /// MDTS: log2 of the transfer limit in 4 KiB pages.
    pub mdts: u8,
    pub in_capsule: u32,
    pub keep_alive_default: Duration,
    pub handshake_timeout: Duration,
}

impl TargetSettings {
    fn limits(&self) -> Result<Limits, TargetError> {
        let bad = |why: String| Err(TargetError::Settings(why));
        if !(2..=65536).contains(&self.max_queue_entries) {
            return bad(format!(
                "max_queue_entries {} is not between 2 and 65536",
                self.max_queue_entries
            ));
        }
        if self.max_io_queues == 0 {
            return bad("max_io_queues must be at least 1".into());
        }
        if self.max_h2c_data < 4096
            || !self.max_h2c_data.is_multiple_of(4)
            || self.max_h2c_data > u64::from(u32::MAX / 2)
        {
            return bad(format!(
                "max_h2c_data {} is not a multiple of 4 between 4 KiB and 2 GiB",
                self.max_h2c_data
            ));
        }
        if !self.max_data_transfer.is_power_of_two()
            || !(4096..=1 << 30).contains(&self.max_data_transfer)
        {
            return bad(format!(
                "max_data_transfer {} is not a power of two between 4 KiB and 1 GiB",
                self.max_data_transfer
            ));
        }
        if !self.in_capsule_data_size.is_multiple_of(16) || self.in_capsule_data_size > 1 << 20 {
            return bad(format!(
                "in_capsule_data_size {} is not a multiple of 16 up to 1 MiB",
                self.in_capsule_data_size
            ));
        }
        let secs = |what: &str, v: f64| {
            Duration::try_from_secs_f64(v)
                .map_err(|_| TargetError::Settings(format!("{what} {v} is not a duration")))
        };
        Ok(Limits {
            max_queue_entries: self.max_queue_entries,
            max_io_queues: self.max_io_queues,
            max_h2c_data: self.max_h2c_data as u32,
            max_data_transfer: self.max_data_transfer as u32,
            mdts: (self.max_data_transfer.trailing_zeros() - 12) as u8,
            in_capsule: self.in_capsule_data_size as u32,
            keep_alive_default: secs("keep_alive_default_secs", self.keep_alive_default_secs)?,
            handshake_timeout: secs("handshake_timeout_secs", self.handshake_timeout_secs)?,
        })
    }
}

/// A subsystem to export: one namespace over `device`.
#[derive(Debug, Clone)]
pub struct Subsystem {
    /// The NVMe Qualified Name hosts connect to (e.g. `nqn.2026-12.io.strata:VOLUME`).
    pub nqn: String,
    /// The device behind namespace 1.
    pub device: Arc<dyn BlockDevice>,
    /// Refuse writes even if the device takes them.
    pub read_only: bool,
    /// The serial number (20 ASCII characters at most); `None`: derived from the NQN.
    pub serial: Option<String>,
    /// The model number (40 ASCII characters at most); `None`: "Strata".
    pub model: Option<String>,
    /// The namespace UUID; `None`: derived from the NQN, so the same name always gets the same
    /// UUID (and NGUID).
    pub uuid: Option<[u8; 16]>,
    /// Host NQNs allowed to connect; `None`: any host.
    pub allowed_hosts: Option<Vec<String>>,
}

impl Subsystem {
    /// A writable subsystem with the defaults for everything else.
    pub fn new(nqn: impl Into<String>, device: Arc<dyn BlockDevice>) -> Subsystem {
        Subsystem {
            nqn: nqn.into(),
            device,
            read_only: false,
            serial: None,
            model: None,
            uuid: None,
            allowed_hosts: None,
        }
    }
}

/// A failed target operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error("invalid NVMe/TCP target settings: {0}")]
    Settings(String),
    #[error("subsystem NQN {nqn:?}: {why}")]
    InvalidNqn { nqn: String, why: &'static str },
    #[error("subsystem {0:?} exists already")]
    AlreadyExists(String),
    #[error("no subsystem {0:?}")]
    NotFound(String),
    #[error("subsystem {nqn:?}: the device's {block_size}-byte block size is not a power of two from 512 to 64 KiB")]
    BlockSize { nqn: String, block_size: u32 },
}

/// A 128-bit FNV-1a hash: stable across builds and platforms, for identifiers derived from names.
pub(crate) fn stable_hash(seed: &[u8], data: &[u8]) -> [u8; 16] {
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013B;
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for &b in seed.iter().chain(data) {
        h ^= u128::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h.to_be_bytes()
}

/// The UUID (version 8: derived by a custom hash) Strata gives a namespace named `nqn`.
pub fn derived_uuid(nqn: &str) -> [u8; 16] {
    let mut u = stable_hash(b"strata namespace uuid\0", nqn.as_bytes());
    u[6] = (u[6] & 0x0F) | 0x80;
    u[8] = (u[8] & 0x3F) | 0x80;
    u
}

/// Format a UUID the usual way (8-4-4-4-12 hex digits).
pub fn format_uuid(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// One namespace: a device, its identity, and its counters. (ANA group membership and
/// reservation state belong here when they come.)
#[derive(Debug)]
pub(crate) struct Namespace {
    pub nsid: u32,
    pub device: Arc<dyn BlockDevice>,
    pub read_only: bool,
    /// log2 of the logical block size.
    pub lba_shift: u32,
    pub uuid: [u8; 16],
    pub nguid: [u8; 16],
    pub stats: NsStats,
}

/// What a namespace has served, for the SMART / health log.
#[derive(Debug, Default)]
pub(crate) struct NsStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

impl Namespace {
    /// Size in logical blocks (read live: a device may grow).
    pub fn blocks(&self) -> u64 {
        self.device.geometry().size >> self.lba_shift
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only || self.device.capabilities().read_only
    }
}

/// What a subsystem is.
#[derive(Debug)]
pub(crate) enum Kind {
    Discovery,
    Nvm { namespace: Arc<Namespace> },
}

/// A subsystem being served, with its controllers.
#[derive(Debug)]
pub(crate) struct SubsystemState {
    pub nqn: String,
    pub kind: Kind,
    pub serial: String,
    pub model: String,
    pub allowed_hosts: Option<Vec<String>>,
    pub controllers: controller::Registry,
}

impl SubsystemState {
    pub fn namespace(&self, nsid: u32) -> Option<&Arc<Namespace>> {
        match &self.kind {
            Kind::Nvm { namespace } if namespace.nsid == nsid => Some(namespace),
            _ => None,
        }
    }

    pub fn namespaces(&self) -> Vec<Arc<Namespace>> {
        match &self.kind {
            Kind::Nvm { namespace } => vec![namespace.clone()],
            Kind::Discovery => Vec::new(),
        }
    }

    pub fn is_discovery(&self) -> bool {
        matches!(self.kind, Kind::Discovery)
    }

    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allowed_hosts
            .as_ref()
            .is_none_or(|hosts| hosts.iter().any(|h| h == hostnqn))
    }
}

/// What every connection shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub limits: Limits,
    pub subsystems: RwLock<BTreeMap<String, Arc<SubsystemState>>>,
    pub discovery: Arc<SubsystemState>,
    /// The discovery log's generation counter.
    pub genctr: AtomicU64,
    pub started: tokio::time::Instant,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

impl Shared {
    pub fn subsystem(&self, nqn: &str) -> Option<Arc<SubsystemState>> {
        if nqn == DISCOVERY_NQN {
            return Some(self.discovery.clone());
        }
        self.subsystems
            .read()
            .expect("lock poisoned")
            .get(nqn)
            .cloned()
    }

    /// Milliseconds since the target started: the keep-alive clock.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Tell discovery controllers that want to know that the log changed.
    fn discovery_changed(&self) {
        self.genctr.fetch_add(1, Ordering::Relaxed);
        for c in self.discovery.controllers.all() {
            c.discovery_log_changed();
        }
    }
}

/// An NVMe/TCP target over a set of subsystems.
#[derive(Debug)]
pub struct Target {
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
}

impl Target {
    /// A target with no subsystems yet (the discovery subsystem is always there).
    pub fn new(settings: TargetSettings) -> Result<Arc<Target>, TargetError> {
        let limits = settings.limits()?;
        let discovery = Arc::new(SubsystemState {
            nqn: DISCOVERY_NQN.to_string(),
            kind: Kind::Discovery,
            serial: serial_of(DISCOVERY_NQN),
            model: "Strata discovery".into(),
            allowed_hosts: None,
            controllers: controller::Registry::default(),
        });
        Ok(Arc::new(Target {
            connections: Arc::new(Semaphore::new(settings.max_connections.max(1))),
            shared: Arc::new(Shared {
                limits,
                subsystems: RwLock::new(BTreeMap::new()),
                discovery,
                genctr: AtomicU64::new(1),
                started: tokio::time::Instant::now(),
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        }))
    }

    /// Export a subsystem. Hosts see it in the discovery log from now on.
    pub fn add_subsystem(&self, s: Subsystem) -> Result<(), TargetError> {
        validate_nqn(&s.nqn)?;
        let bs = s.device.geometry().block_size.max(512);
        if !bs.is_power_of_two() || bs > 65536 {
            return Err(TargetError::BlockSize {
                nqn: s.nqn,
                block_size: bs,
            });
        }
        let uuid = s.uuid.unwrap_or_else(|| derived_uuid(&s.nqn));
        let namespace = Arc::new(Namespace {
            nsid: 1,
            device: s.device,
            read_only: s.read_only,
            lba_shift: bs.trailing_zeros(),
            nguid: stable_hash(b"strata namespace nguid\0", &uuid),
            uuid,
            stats: NsStats::default(),
        });
        let state = Arc::new(SubsystemState {
            serial: s
                .serial
                .map(|v| v.chars().take(20).collect())
                .unwrap_or_else(|| serial_of(&s.nqn)),
            model: s
                .model
                .map(|v| v.chars().take(40).collect())
                .unwrap_or_else(|| "Strata".into()),
            kind: Kind::Nvm { namespace },
            allowed_hosts: s.allowed_hosts,
            controllers: controller::Registry::default(),
            nqn: s.nqn.clone(),
        });
        {
            let mut subs = self.shared.subsystems.write().expect("lock poisoned");
            if subs.contains_key(&s.nqn) {
                return Err(TargetError::AlreadyExists(s.nqn));
            }
            subs.insert(s.nqn.clone(), state);
        }
        info!(nqn = %s.nqn, "NVMe/TCP subsystem added");
        self.shared.discovery_changed();
        Ok(())
    }

    /// Stop exporting a subsystem: its controllers are torn down (their connections close).
    pub fn remove_subsystem(&self, nqn: &str) -> Result<(), TargetError> {
        let removed = self
            .shared
            .subsystems
            .write()
            .expect("lock poisoned")
            .remove(nqn)
            .ok_or_else(|| TargetError::NotFound(nqn.to_string()))?;
        for c in removed.controllers.all() {
            c.teardown("the subsystem was removed");
        }
        info!(nqn, "NVMe/TCP subsystem removed");
        self.shared.discovery_changed();
        Ok(())
    }

    /// The device behind `nqn` changed size: every controller gets a namespace-attribute
    /// notice (an AEN, and namespace 1 in its changed namespace list).
    pub fn resized(&self, nqn: &str) -> Result<(), TargetError> {
        let s = self
            .shared
            .subsystem(nqn)
            .filter(|s| !s.is_discovery())
            .ok_or_else(|| TargetError::NotFound(nqn.to_string()))?;
        for ns in s.namespaces() {
            for c in s.controllers.all() {
                c.namespace_changed(ns.nsid);
            }
            info!(
                nqn,
                nsid = ns.nsid,
                blocks = ns.blocks(),
                "namespace resized"
            );
        }
        Ok(())
    }

    /// The NQNs exported, sorted.
    pub fn subsystems(&self) -> Vec<String> {
        self.shared
            .subsystems
            .read()
            .expect("lock poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// The IDs of the controllers of subsystem `nqn` (the discovery subsystem included).
    pub fn controllers(&self, nqn: &str) -> Vec<u16> {
        self.shared
            .subsystem(nqn)
            .map(|s| s.controllers.all().iter().map(|c| c.cntlid).collect())
            .unwrap_or_default()
    }

    /// The controllers of subsystem `nqn`, with their hosts and queues.
    pub fn controller_info(&self, nqn: &str) -> Vec<ControllerInfo> {
        self.shared
            .subsystem(nqn)
            .map(|s| s.controllers.all().iter().map(|c| c.info()).collect())
            .unwrap_or_default()
    }

    /// Stop accepting, stop reading, answer every command already read (writes waiting for
    /// their data are aborted), close every connection, and wait for it all.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }

    /// A token cancelled when the target shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Serve hosts from a TCP listener until shutdown.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                _ = self.shared.shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // At the limit this host waits, unanswered, until a connection ends.
                    let permit = tokio::select! {
                        _ = self.shared.shutdown.cancelled() => return,
                        p = self.connections.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => return,
                        },
                    };
                    let local = match stream.local_addr() {
                        Ok(a) => a,
                        Err(e) => {
                            debug!(error = %e, "accepted NVMe/TCP connection has no local address");
                            continue;
                        }
                    };
                    // Responses are written in batches already; do not let Nagle delay the last.
                    let _ = stream.set_nodelay(true);
                    self.spawn_connection(stream, local, peer, permit);
                }
                Err(e) => {
                    warn!(error = %e, "accept NVMe/TCP connection");
                    // EMFILE and friends: back off briefly rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn spawn_connection(
        &self,
        stream: tokio::net::TcpStream,
        local: SocketAddr,
        peer: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            "nvmf",
            conn = id,
            peer = %peer,
            volume = tracing::field::Empty,
            qid = tracing::field::Empty
        );
        let shared = self.shared.clone();
        self.shared.tasks.spawn(
            async move {
                debug!("connected");
                match queue::serve(stream, shared, local).await {
                    Ok(()) => debug!("disconnected"),
                    Err(e) => info!(error = %e, "connection ended"),
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}

fn validate_nqn(nqn: &str) -> Result<(), TargetError> {
    let bad = |why| {
        Err(TargetError::InvalidNqn {
            nqn: nqn.to_string(),
            why,
        })
    };
    if nqn.is_empty() {
        return bad("empty");
    }
    if nqn.len() > MAX_NQN_LEN {
        return bad("longer than 223 bytes");
    }
    if nqn.contains('\0') {
        return bad("contains a NUL byte");
    }
    if nqn == DISCOVERY_NQN {
        return bad("the discovery subsystem's NQN is reserved");
    }
    Ok(())
}

/// A 20-character serial number derived from a name.
fn serial_of(nqn: &str) -> String {
    let h = stable_hash(b"strata serial\0", nqn.as_bytes());
    h[..10].iter().map(|b| format!("{b:02x}")).collect()
}

/// The number of in-capsule bytes the identify data advertises (IOCCSZ is in 16-byte units).
pub(crate) fn ioccsz(limits: &Limits) -> u32 {
    (64 + limits.in_capsule) / 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_identities_are_stable_and_distinct() {
        let a = derived_uuid("nqn.2026-12.io.strata:a");
        assert_eq!(a, derived_uuid("nqn.2026-12.io.strata:a"));
        assert_ne!(a, derived_uuid("nqn.2026-12.io.strata:b"));
        assert_eq!(a[6] >> 4, 8, "version 8");
        assert_eq!(a[8] >> 6, 2, "RFC 4122 variant");
        assert_eq!(format_uuid(&a).len(), 36);
        assert_eq!(serial_of("x").len(), 20);
    }

    #[test]
    fn settings_parse_with_units_and_are_checked() {
        let s: TargetSettings = toml::from_str(
            "max_h2c_data = \"64K\"\nmax_data_transfer = 2097152\nkeep_alive_default_secs = 5",
        )
        .expect("parse");
        assert_eq!(s.max_h2c_data, 65536);
        assert_eq!(s.max_data_transfer, 2 << 20);
        assert_eq!(s.limits().expect("valid").mdts, 9);
        assert!(toml::from_str::<TargetSettings>("max_queues = 3").is_err());
        let bad = TargetSettings {
            max_data_transfer: 3 << 20,
            ..TargetSettings::default()
        };
        assert!(bad.limits().is_err());
        let bad = TargetSettings {
            max_h2c_data: 1000,
            ..TargetSettings::default()
        };
        assert!(bad.limits().is_err());
    }
}
