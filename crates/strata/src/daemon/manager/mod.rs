//! The manager: the daemon's volumes as a live set, and the one door every change goes through.
//! The API, specs, reconciliation, metrics and the CLI's offline commands all call it, so the
//! rules (what may be resized, what depends on what, what must be recorded before it is
//! acknowledged) live here once.
//!
//! ```text
//!   gRPC API (daemon/api) ─┐                 ┌─► volumes: device | nexus | image (open.rs)
//!   specs (spec.rs) ───────┼─► Manager ──────┼─► Exports (daemon/exports): NBD, …
//!   reconcile loop ────────┤   (this file)   ├─► Stores, Images (page stores, images by name)
//!   strata gc / offline ───┘                 └─► StateStore ("volumes/NAME": VolumeDecl as JSON)
//! ```
//!
//! | file | what |
//! | --- | --- |
//! | `decl.rs` | [`VolumeDecl`], the one shape of a volume, and its checks |
//! | `open.rs` | opening a declaration: a device, a nexus restored from its record, an image |
//! | `volumes.rs` | create, delete, resize, exports, declarations |
//! | `children.rs` | a nexus's replicas and rebuilds |
//! | `placement.rs` | where the replicas the daemon places go (files in its pools) |
//! | `images.rs` | page-store images: snapshots, clones, resize, flatten, delete |
//! | `stores.rs` | the page stores ([`Stores`]) |
//! | `reconcile.rs` | making this node what the state store declares, again and again |
//! | `spec.rs` | declarative specs: plan and apply |
//! | `gc.rs` | garbage collection of page stores |
//! | `error.rs` | [`OpError`]: a kind each front end maps, and a message |

mod access;
mod children;
mod decl;
mod error;
pub mod gc;
mod images;
mod open;
mod open_images;
mod placement;
mod reconcile;
pub mod spec;
mod stores;
mod volumes;

pub use access::{create_pools, Caller, Pool};
pub use children::{kind_name, ChildRef};
pub use decl::{
    check_label, check_volume_name, Backing, ImageDecl, ImageKey, NexusDecl, Placed, Protocol,
    VolumeDecl, DEFAULT_PAGE_SIZE, MAX_LABELS, MAX_PLACED, SECTOR,
};
pub use error::{OpError, OpKind, OpResult};
pub use images::{
    check_resize, resize_offline, split_snapshot, ImageInfo, SnapshotDeletion, SnapshotInfo,
};
pub use open::{expand_uri, Parts};
pub use open_images::{Images, ResolvedImage};
pub use placement::PoolSpace;
pub use stores::{StoreDesc, StoreFactory, Stores};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use strata_bdev::{BlockDevice, IoStats, Registry, StatsDevice};
use tracing::warn;

use super::exports::{Exported, Exports};
use super::state::StateStore;

/// A volume the daemon holds.
#[derive(Debug)]
pub struct Managed {
    /// Its name (it never changes; the declaration may).
    pub name: String,
    decl: Mutex<VolumeDecl>,
    /// Declared by the configuration file: the API does not delete or re-export it.
    pub from_config: bool,
    /// What clients get: the volume's device, counted.
    pub device: Arc<StatsDevice>,
    /// What the control plane steers.
    pub parts: Parts,
}

impl Managed {
    pub fn decl(&self) -> VolumeDecl {
        self.decl.lock().expect("lock poisoned").clone()
    }

    fn set_decl(&self, d: VolumeDecl) {
        *self.decl.lock().expect("lock poisoned") = d;
    }

    pub fn stats(&self) -> Arc<IoStats> {
        self.device.stats()
    }

    pub fn nexus(&self) -> Option<&Arc<strata_nexus::Nexus>> {
        match &self.parts {
            Parts::Nexus(n) => Some(n),
            _ => None,
        }
    }

    pub fn image(&self) -> Option<&Arc<strata_pagestore::Image>> {
        match &self.parts {
            Parts::Image(i) => Some(i),
            _ => None,
        }
    }

    /// The volume as protocol targets serve it.
    fn exported(&self, d: &VolumeDecl) -> Exported {
        Exported {
            name: self.name.clone(),
            description: d.description.clone(),
            device: self.device.clone(),
            read_only: d.read_only,
            transactions: match (self.image(), d.read_only) {
                (Some(i), false) => Some(i.clone() as Arc<dyn strata_bdev::Transactional>),
                _ => None,
            },
            nvmf_hosts: d.nvmf_hosts.clone(),
        }
    }
}

/// The live set of volumes; see the module documentation.
#[derive(Debug)]
pub struct Manager {
    /// This node's name: it serves the volumes whose declarations name it.
    pub node: String,
    pub data_dir: PathBuf,
    /// Where remote callers may put local devices.
    pools: Vec<Pool>,
    pub registry: Arc<Registry>,
    pub stores: Arc<Stores>,
    pub images: Arc<Images>,
    pub exports: Exports,
    pub state: Arc<dyn StateStore>,
    pub started: Instant,
    volumes: RwLock<BTreeMap<String, Arc<Managed>>>,
    /// Changes to the set run one at a time.
    changes: tokio::sync::Mutex<()>,
    /// What the last reconciliation could not do, by volume.
    problems: RwLock<BTreeMap<String, String>>,
    /// Replicas reconciliation tried to bring back, and when it may try again.
    retry: Mutex<BTreeMap<(String, String), (Instant, Duration)>>,
    /// The child health last mirrored to the state store, by volume.
    health: Mutex<BTreeMap<String, Vec<u8>>>,
}

const VOLUMES: &str = "volumes/";
const STORES: &str = "stores/";

impl Manager {
    /// A manager for node `node`, with nothing open yet.
    pub fn new(
        node: String,
        data_dir: PathBuf,
        pools: Vec<Pool>,
        registry: Arc<Registry>,
        images: Arc<Images>,
        exports: Exports,
        state: Arc<dyn StateStore>,
    ) -> Arc<Manager> {
        Arc::new(Manager {
            node,
            data_dir,
            pools,
            registry,
            stores: images.stores(),
            images,
            exports,
            state,
            started: Instant::now(),
            volumes: RwLock::new(BTreeMap::new()),
            changes: tokio::sync::Mutex::new(()),
            problems: RwLock::new(BTreeMap::new()),
            retry: Mutex::new(BTreeMap::new()),
            health: Mutex::new(BTreeMap::new()),
        })
    }

    /// What the last reconciliation could not do: `(volume, why)`.
    pub fn problems(&self) -> Vec<(String, String)> {
        self.problems
            .read()
            .expect("lock poisoned")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Vec<Arc<Managed>> {
        self.volumes
            .read()
            .expect("lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    fn lookup(&self, name: &str) -> Option<Arc<Managed>> {
        self.volumes
            .read()
            .expect("lock poisoned")
            .get(name)
            .cloned()
    }

    pub fn get(&self, name: &str) -> OpResult<Arc<Managed>> {
        if let Some(v) = self.lookup(name) {
            return Ok(v);
        }
        let names: Vec<String> = self
            .volumes
            .read()
            .expect("lock poisoned")
            .keys()
            .cloned()
            .collect();
        Err(OpError::not_found(format!(
            "no volume {name:?} (volumes: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )))
    }

    /// Where clients reach `name`, over the protocols it is exported over.
    pub fn addresses(&self, m: &Managed) -> Vec<String> {
        self.exports.addresses(&m.name, &m.decl().exports)
    }

    /// Open what `d` declares, as a volume of this node.
    async fn open_managed(&self, d: &VolumeDecl, from_config: bool) -> OpResult<Arc<Managed>> {
        let opened = self.open_decl(d).await?;
        Ok(Arc::new(Managed {
            name: d.name.clone(),
            decl: Mutex::new(d.clone()),
            from_config,
            device: Arc::new(StatsDevice::new(opened.device)),
            parts: opened.parts,
        }))
    }

    /// Add an opened volume to the set and export it as declared; a protocol that refuses it
    /// is an error (the volume is then closed again).
    async fn insert(&self, m: Arc<Managed>) -> OpResult<()> {
        let d = m.decl();
        let refused = self.exports.apply(&d.exports, &m.exported(&d)).await;
        if !refused.is_empty() {
            self.exports.remove(&m.name).await;
            let name = m.name.clone();
            self.close_opened(m).await;
            return Err(OpError::new(
                OpKind::Unavailable,
                format!("export volume {name:?}: {}", refused.join("; ")),
            ));
        }
        self.volumes
            .write()
            .expect("lock poisoned")
            .insert(m.name.clone(), m);
        Ok(())
    }

    /// Add a volume the configuration file declares (at start).
    pub async fn add_configured(&self, d: &VolumeDecl) -> OpResult<()> {
        let m = self.open_managed(d, true).await?;
        self.insert(m).await
    }

    /// Stop serving a volume, flush it, and forget it; with `forget_record`, its nexus record
    /// too (only when it is deleted: a volume that is declared again must find its replicas'
    /// health, or a stale replica could become the source of a rebuild).
    async fn close_volume(&self, m: Arc<Managed>, forget_record: bool) {
        let name = m.name.clone();
        self.exports.remove(&name).await;
        self.volumes.write().expect("lock poisoned").remove(&name);
        self.health
            .lock()
            .expect("lock poisoned")
            .remove(&format!("health/{}.{name}", self.node));
        if let Err(e) = m.device.flush().await {
            warn!(volume = %name, error = %e.chain(), "flush a closed volume");
        }
        if forget_record && m.nexus().is_some() {
            let path = super::ledger::FileLedger::new(&self.data_dir, &name)
                .path()
                .to_path_buf();
            let _ = std::fs::remove_file(path);
        }
        self.close_opened(m).await;
    }

    /// Let go of a volume that is no longer in the set: an image volume's image is closed
    /// unless something else uses it.
    async fn close_opened(&self, m: Arc<Managed>) {
        let name = m.name.clone();
        let is_image = m.image().is_some();
        drop(m);
        if is_image {
            self.images.forget_volume(&name).await;
        }
    }

    /// Flush every volume (at shutdown); the names of those that failed.
    pub async fn flush_all(&self) -> Vec<String> {
        let mut failed = Vec::new();
        for m in self.volumes() {
            if let Err(e) = m.device.flush().await {
                warn!(volume = %m.name, error = %e.chain(), "flush volume on shutdown");
                failed.push(m.name.clone());
            }
        }
        failed
    }
}
