//! Exports: the wire protocols volumes are served over. Each protocol crate's target is wrapped
//! in an [`Exporter`] here (`nbd.rs`, `nvmf.rs`, `vhost_user.rs`); the manager keeps every
//! volume's exports what its declaration's `exports` says through [`Exports`], and knows no
//! protocol by name beyond [`Protocol`].
//!
//! ```text
//!   Manager ──► Exports ──► NbdExporter ───────► strata_nbd::Server       (TCP, unix sockets)
//!                      ├──► NvmfExporter ──────► strata_nvmf::Target      (TCP: NQN per volume)
//!                      └──► VhostUserExporter ─► strata_vhost_user_blk    (a socket per volume)
//! ```

mod nbd;
mod nvmf;
mod vhost_user;

pub use nbd::NbdExporter;
pub use nvmf::{nqn, NvmfExporter};
pub use vhost_user::VhostUserExporter;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strata_bdev::{BlockDevice, Transactional};

/// A wire protocol a volume is exported over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// The NBD protocol (`crates/nbd`).
    Nbd,
    /// NVMe over Fabrics, TCP transport (`crates/nvmf`): a subsystem per volume.
    Nvmf,
    /// vhost-user-blk (`crates/vhost-user-blk`): a unix socket per volume for a VMM.
    VhostUser,
}

impl Protocol {
    /// Every protocol the daemon speaks.
    pub const ALL: &'static [Protocol] = &[Protocol::Nbd, Protocol::Nvmf, Protocol::VhostUser];

    /// What a volume is exported over when its declaration does not say: NBD and NVMe/TCP
    /// (a vhost-user socket, for one VM, is asked for by name).
    pub fn defaults() -> BTreeSet<Protocol> {
        [Protocol::Nbd, Protocol::Nvmf].into()
    }

    /// The name used in files, flags and messages.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Nbd => "nbd",
            Protocol::Nvmf => "nvmf",
            Protocol::VhostUser => "vhost_user",
        }
    }

    pub fn parse(s: &str) -> Result<Protocol, String> {
        Protocol::ALL
            .iter()
            .copied()
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a protocol this daemon speaks ({})",
                    Protocol::ALL
                        .iter()
                        .map(|p| p.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A volume as a protocol target serves it.
#[derive(Clone, Debug)]
pub struct Exported {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    pub read_only: bool,
    /// Page-store images take NBD transactions.
    pub transactions: Option<Arc<dyn Transactional>>,
    /// NVMe/TCP: the host NQNs allowed to connect (none: any host).
    pub nvmf_hosts: Vec<String>,
}

/// One wire protocol's target, as the manager drives it.
#[async_trait::async_trait]
pub trait Exporter: Send + Sync + std::fmt::Debug {
    fn protocol(&self) -> Protocol;

    /// Serve a volume, replacing an export of the same name; the reason it cannot be.
    async fn export(&self, volume: &Exported) -> Result<(), String>;

    /// Stop serving a volume (a no-op when it is not exported).
    async fn unexport(&self, name: &str);

    /// Where clients reach the volume `name`.
    fn addresses(&self, name: &str) -> Vec<String>;

    /// The addresses this protocol's listeners are bound to.
    fn listening(&self) -> Vec<String>;

    /// The volume changed size: tell connected clients where the protocol can.
    fn resized(&self, name: &str) {
        let _ = name;
    }

    /// Stop serving everything (at shutdown): finish what clients asked for, within the
    /// protocol's own limits.
    async fn shutdown(&self) {}
}

/// Every protocol this daemon serves.
#[derive(Debug, Default)]
pub struct Exports {
    exporters: Vec<Arc<dyn Exporter>>,
}

impl Exports {
    pub fn new(exporters: Vec<Arc<dyn Exporter>>) -> Exports {
        Exports { exporters }
    }

    /// The addresses `protocol`'s listeners are bound to (none when it is not served).
    pub fn listening(&self, protocol: Protocol) -> Vec<String> {
        self.exporters
            .iter()
            .filter(|e| e.protocol() == protocol)
            .flat_map(|e| e.listening())
            .collect()
    }

    /// Whether volumes can be exported over `protocol` here.
    pub fn speaks(&self, protocol: Protocol) -> bool {
        self.exporters.iter().any(|e| e.protocol() == protocol)
    }

    /// Export `volume` over `protocols` (replacing what each serves under its name), and over
    /// no other; the protocols that refused it, with why.
    pub async fn apply(&self, protocols: &BTreeSet<Protocol>, volume: &Exported) -> Vec<String> {
        let mut refused = Vec::new();
        for e in &self.exporters {
            if protocols.contains(&e.protocol()) {
                if let Err(why) = e.export(volume).await {
                    refused.push(format!("{}: {why}", e.protocol()));
                }
            } else {
                e.unexport(&volume.name).await;
            }
        }
        refused
    }

    /// Stop exporting `name` over every protocol.
    pub async fn remove(&self, name: &str) {
        for e in &self.exporters {
            e.unexport(name).await;
        }
    }

    /// Where clients reach the volume `name` over `protocols`.
    pub fn addresses(&self, name: &str, protocols: &BTreeSet<Protocol>) -> Vec<String> {
        self.exporters
            .iter()
            .filter(|e| protocols.contains(&e.protocol()))
            .flat_map(|e| e.addresses(name))
            .collect()
    }

    /// Tell every protocol's clients that `name` changed size.
    pub fn resized(&self, name: &str) {
        for e in &self.exporters {
            e.resized(name);
        }
    }

    /// Stop every protocol (at shutdown).
    pub async fn shutdown(&self) {
        for e in &self.exporters {
            e.shutdown().await;
        }
    }
}
