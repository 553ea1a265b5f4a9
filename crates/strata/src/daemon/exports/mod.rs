//! Exports: the wire protocols volumes are served over. Each protocol crate's target is wrapped
//! in an [`Exporter`] here (`nbd.rs`); the manager keeps every volume's exports what its
//! declaration's `exports` says through [`Exports`], and knows no protocol by name beyond
//! [`Protocol`].
//!
//! ```text
//!   Manager ──► Exports ──► NbdExporter ──► strata_nbd::Server (listeners bound in daemon/mod.rs)
//!                      └──► (one Exporter per protocol)
//! ```

mod nbd;

pub use nbd::NbdExporter;

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
}

impl Protocol {
    /// Every protocol the daemon speaks.
    pub const ALL: &'static [Protocol] = &[Protocol::Nbd];

    /// What a volume is exported over when its declaration does not say.
    pub fn defaults() -> BTreeSet<Protocol> {
        Protocol::ALL.iter().copied().collect()
    }

    /// The name used in files, flags and messages.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Nbd => "nbd",
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
}

/// One wire protocol's target, as the manager drives it.
pub trait Exporter: Send + Sync + std::fmt::Debug {
    fn protocol(&self) -> Protocol;

    /// Serve a volume, replacing an export of the same name (connected clients keep theirs).
    fn export(&self, volume: &Exported);

    /// Stop serving a volume to new clients.
    fn unexport(&self, name: &str);

    /// Where clients reach the volume `name`.
    fn addresses(&self, name: &str) -> Vec<String>;

    /// The addresses this protocol's listeners are bound to.
    fn listening(&self) -> Vec<String>;

    /// The volume changed size: tell connected clients where the protocol can.
    fn resized(&self, name: &str) {
        let _ = name;
    }
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

    /// Export `volume` over `protocols`, and over no other.
    pub fn apply(&self, protocols: &BTreeSet<Protocol>, volume: &Exported) {
        for e in &self.exporters {
            if protocols.contains(&e.protocol()) {
                e.export(volume);
            } else {
                e.unexport(&volume.name);
            }
        }
    }

    /// Stop exporting `name` over every protocol.
    pub fn remove(&self, name: &str) {
        for e in &self.exporters {
            e.unexport(name);
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
}
