//! The daemon's volumes as a live set: the ones the configuration file declares, and the ones
//! declared in the state store (through the API or a spec), which reconciliation opens and
//! keeps as declared. Every change to the set goes through here, so the API, specs and
//! reconciliation share one implementation and one set of checks.
//!
//! ```text
//!   gRPC API / apply ──► Manager ──► volumes (device | nexus | image)
//!   reconcile loop ───┘     ├──► NBD server exports (StatsDevice over each volume)
//!                           └──► StateStore ("volumes/NAME": VolumeDef as JSON, "stores/NAME")
//! ```
//!
//! `error.rs` (OpError), `decl.rs` (VolumeDef, StoreDesc), `reconcile.rs`, `stores.rs`. A
//! store created through the API is kept as its `strata_pagestore::StoreConfig` (credentials
//! included: protect the state store as you would the credentials).

mod decl;
mod error;
mod reconcile;
mod stores;

pub use decl::{check_volume_name, BackingDef, StoreDesc, VolumeDef, SECTOR};
pub use error::{OpError, OpKind, OpResult};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use strata_bdev::{BlockDevice, IoStats, Registry, StatsDevice};
use strata_nbd::{Export, Server};
use tracing::{info, warn};

use crate::config::VolumeConfig;
use crate::images::Images;
use crate::state::StateStore;
use crate::volume::{self, Volume};

/// A volume the daemon holds.
pub struct Managed {
    pub volume: Arc<Volume>,
    pub def: Mutex<VolumeDef>,
    /// Declared by the configuration file: the API does not delete or re-export it.
    pub from_config: bool,
    /// What clients get: the volume's device, counted.
    pub device: Arc<StatsDevice>,
}

impl Managed {
    pub fn def(&self) -> VolumeDef {
        self.def.lock().expect("lock poisoned").clone()
    }

    pub fn stats(&self) -> Arc<IoStats> {
        self.device.stats()
    }
}

/// The live set of volumes; see the module documentation.
pub struct Manager {
    /// This node's name: it serves the volumes whose records name it.
    pub node: String,
    pub data_dir: PathBuf,
    pub registry: Arc<Registry>,
    pub images: Arc<Images>,
    pub server: Arc<Server>,
    pub state: Arc<dyn StateStore>,
    pub started: Instant,
    volumes: RwLock<BTreeMap<String, Arc<Managed>>>,
    /// Changes to the set run one at a time.
    changes: tokio::sync::Mutex<()>,
    /// NBD listeners as URIs, once bound.
    nbd_uris: RwLock<Vec<String>>,
    /// What the last reconciliation could not do, by volume.
    problems: RwLock<BTreeMap<String, String>>,
    /// Replicas reconciliation tried to bring back, and when it may try again.
    retry: Mutex<BTreeMap<(String, String), (Instant, Duration)>>,
    /// The child health last mirrored to the state store, by volume.
    health: Mutex<BTreeMap<String, Vec<u8>>>,
    /// The page stores, and how to make new ones.
    stores: RwLock<BTreeMap<String, StoreDesc>>,
    store_factory: RwLock<
        Option<(
            crate::serve::StoreFactory,
            Arc<strata_pagestore::ImageOpener>,
        )>,
    >,
}

const VOLUMES: &str = "volumes/";
const STORES: &str = "stores/";

impl Manager {
    pub fn new(
        node: String,
        data_dir: PathBuf,
        registry: Arc<Registry>,
        images: Arc<Images>,
        server: Arc<Server>,
        state: Arc<dyn StateStore>,
    ) -> Arc<Manager> {
        Arc::new(Manager {
            node,
            data_dir,
            registry,
            images,
            server,
            state,
            started: Instant::now(),
            volumes: RwLock::new(BTreeMap::new()),
            changes: tokio::sync::Mutex::new(()),
            nbd_uris: RwLock::new(Vec::new()),
            problems: RwLock::new(BTreeMap::new()),
            retry: Mutex::new(BTreeMap::new()),
            health: Mutex::new(BTreeMap::new()),
            stores: RwLock::new(BTreeMap::new()),
            store_factory: RwLock::new(None),
        })
    }

    /// Hold off reconciliation and other changes to the volume set while a change that spans
    /// a nexus and its declaration (adding or removing a replica) is made.
    pub async fn change_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.changes.lock().await
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

    pub fn set_nbd_uris(&self, uris: Vec<String>) {
        *self.nbd_uris.write().expect("lock poisoned") = uris;
    }

    pub fn nbd_uris(&self) -> Vec<String> {
        self.nbd_uris.read().expect("lock poisoned").clone()
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

    pub fn get(&self, name: &str) -> OpResult<Arc<Managed>> {
        if let Some(v) = self.volumes.read().expect("lock poisoned").get(name) {
            return Ok(v.clone());
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

    /// Where clients reach `name` over NBD.
    pub fn export_uris(&self, name: &str) -> Vec<String> {
        self.nbd_uris()
            .iter()
            .map(|u| match u.split_once("?socket=") {
                Some((_, sock)) => format!("nbd+unix:///{name}?socket={sock}"),
                None => format!("{u}/{name}"),
            })
            .collect()
    }

    fn insert(&self, m: Arc<Managed>) {
        let def = m.def();
        if def.export {
            self.server.add_export(export_of(&m, &def));
        }
        self.volumes
            .write()
            .expect("lock poisoned")
            .insert(def.name.clone(), m);
    }

    /// Add a volume the configuration file declares (at start).
    pub async fn add_configured(&self, c: &VolumeConfig) -> anyhow::Result<()> {
        let vol = volume::open(c, &self.data_dir, &self.registry, &self.images).await?;
        let size = vol.device().geometry().size;
        let def = VolumeDef::from_config(c, size);
        self.insert(managed(vol, def, true));
        Ok(())
    }

    async fn open_def(&self, def: &VolumeDef) -> OpResult<Arc<Managed>> {
        let vol = volume::open(&def.config(), &self.data_dir, &self.registry, &self.images)
            .await
            .map_err(|e| {
                // A device error in the chain says whose fault it is; anything else is a
                // device that could not be reached.
                let kind = e
                    .chain()
                    .find_map(|c| c.downcast_ref::<strata_bdev::Error>())
                    .map_or(OpKind::Unavailable, |d| OpKind::of(d.kind()));
                OpError::new(kind, format!("{e:#}"))
            })?;
        let size = vol.device().geometry().size;
        if def.size > 0 && size < def.size {
            return Err(OpError::invalid(format!(
                "volume {}: its device holds {size} bytes, less than the {} asked for",
                def.name, def.size
            )));
        }
        Ok(managed(vol, def.clone(), false))
    }

    async fn save(&self, def: &VolumeDef) -> OpResult<()> {
        let json = serde_json::to_vec_pretty(def).expect("a VolumeDef serializes");
        self.state
            .put(&format!("{VOLUMES}{}", def.name), &json)
            .await?;
        Ok(())
    }

    /// Store a declaration without opening anything: reconciliation (here, or on the node it
    /// names) makes it real.
    pub async fn declare(&self, def: &VolumeDef) -> OpResult<()> {
        def.validate("")?;
        self.save(def).await
    }

    /// Remove a declaration (of a volume another node serves: that node closes it).
    pub async fn undeclare(&self, name: &str) -> OpResult<()> {
        self.state.delete(&format!("{VOLUMES}{name}")).await?;
        Ok(())
    }

    /// Create and open a volume, export it if asked, and remember it.
    pub async fn create(&self, mut def: VolumeDef) -> OpResult<Arc<Managed>> {
        def.validate("")?;
        def.node = self.node.clone();
        let _changing = self.changes.lock().await;
        if self
            .volumes
            .read()
            .expect("lock poisoned")
            .contains_key(&def.name)
        {
            return Err(OpError::new(
                OpKind::Exists,
                format!("volume {:?} exists", def.name),
            ));
        }
        if !self.state.available().await {
            return Err(OpError::new(
                OpKind::Unavailable,
                format!(
                    "state store {} is unavailable: volumes cannot be created until it is back",
                    self.state.describe()
                ),
            ));
        }
        let m = self.open_def(&def).await?;
        if let Err(e) = self.save(&def).await {
            close(m, &self.images).await;
            return Err(e);
        }
        info!(volume = %def.name, kind = def.kind(), "volume created");
        self.insert(m.clone());
        Ok(m)
    }

    /// Stop serving a volume, flush and close it, and forget it; with `delete_image`, delete
    /// the page-store image behind it too.
    pub async fn delete(&self, name: &str, delete_image: bool) -> OpResult<String> {
        let _changing = self.changes.lock().await;
        let m = self.get(name)?;
        if m.from_config {
            return Err(OpError::precondition(format!(
                "volume {name:?} is declared in the configuration file; remove it there and restart"
            )));
        }
        let def = m.def();
        if delete_image && !matches!(def.backing, BackingDef::Image(_)) {
            return Err(OpError::invalid(format!(
                "volume {name:?} is a {} volume, not an image: delete_image does not apply",
                def.kind()
            )));
        }
        self.state.delete(&format!("{VOLUMES}{name}")).await?;
        let _ = self
            .state
            .delete(&format!("health/{}.{name}", self.node))
            .await;
        self.close_volume(m, true).await;
        let mut msg = format!("volume {name} deleted");
        if let (true, BackingDef::Image(key)) = (delete_image, &def.backing) {
            let (store, img) = key.split_once('/').expect("validated as STORE/IMAGE");
            self.images
                .close(store, img)
                .await
                .map_err(|e| OpError::precondition(format!("{e:#}")))?;
            self.images
                .store(store)
                .map_err(|e| OpError::not_found(format!("{e:#}")))?
                .delete_image(img)
                .await?;
            msg.push_str(&format!(
                ", with image {key}; `strata gc` frees its data after the grace period"
            ));
        }
        info!("{msg}");
        Ok(msg)
    }

    /// Resize a page-store image volume (shrinking needs `force`).
    pub async fn resize(&self, name: &str, size: u64, force: bool) -> OpResult<Arc<Managed>> {
        let _changing = self.changes.lock().await;
        let m = self.get(name)?;
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return Err(OpError::invalid(format!(
                "size: {size} is not a positive multiple of the {SECTOR}-byte block size"
            )));
        }
        let Some(image) = m.volume.image() else {
            return Err(OpError::precondition(format!(
                "volume {name:?} is a {} volume: only page-store image volumes can be resized \
                 (a device or nexus keeps the size of its devices)",
                m.def().kind()
            )));
        };
        let page = u64::from(image.geometry().block_size);
        if !size.is_multiple_of(page) {
            return Err(OpError::invalid(format!(
                "size: {size} is not a multiple of the image's {page}-byte pages"
            )));
        }
        let old = image.geometry().size;
        if size < old && !force {
            return Err(OpError::precondition(format!(
                "shrinking volume {name:?} from {old} to {size} bytes discards the data beyond \
                 the new end; pass force to do it"
            )));
        }
        image.resize(size, force).await?;
        let mut def = m.def();
        def.size = size;
        if !m.from_config {
            self.save(&def).await?;
        }
        *m.def.lock().expect("lock poisoned") = def;
        info!(volume = %name, old, size, "volume resized");
        Ok(m)
    }

    /// Export a volume over NBD, or stop exporting it (clients connected keep their
    /// connection until they close it).
    pub async fn set_export(
        &self,
        name: &str,
        export: bool,
        read_only: Option<bool>,
        description: Option<String>,
    ) -> OpResult<Arc<Managed>> {
        let _changing = self.changes.lock().await;
        let m = self.get(name)?;
        if m.from_config {
            return Err(OpError::precondition(format!(
                "volume {name:?} is declared in the configuration file; its export is changed there"
            )));
        }
        let mut def = m.def();
        if export && def.export {
            return Err(OpError::new(
                OpKind::Exists,
                format!("volume {name:?} is already exported over NBD"),
            ));
        }
        if !export && !def.export {
            return Err(OpError::not_found(format!(
                "volume {name:?} is not exported over NBD"
            )));
        }
        def.export = export;
        if let Some(ro) = read_only {
            def.read_only = ro;
        }
        if let Some(d) = description {
            def.description = d;
        }
        self.save(&def).await?;
        if export {
            self.server.add_export(export_of(&m, &def));
        } else {
            self.server.remove_export(name);
        }
        *m.def.lock().expect("lock poisoned") = def;
        Ok(m)
    }

    /// Refuse a change to a declared volume's replicas while the state store cannot record it
    /// (reconciliation would undo it when the store is back).
    pub async fn check_declarable(&self, name: &str) -> OpResult<()> {
        let m = self.get(name)?;
        if !m.from_config && !self.state.available().await {
            return Err(OpError::new(
                OpKind::Unavailable,
                format!(
                    "state store {} is unavailable: the replicas of {name} cannot change until it \
                     is back (the volume keeps serving)",
                    self.state.describe()
                ),
            ));
        }
        Ok(())
    }

    /// Record a nexus volume's replica list after a change made through the children calls
    /// (made under [`Manager::change_lock`], so that reconciliation does not undo it first).
    pub async fn replicas_changed(&self, name: &str) -> OpResult<()> {
        let m = self.get(name)?;
        let Some(n) = m.volume.nexus() else {
            return Ok(());
        };
        let mut def = m.def();
        def.backing = BackingDef::Nexus(n.status().children.into_iter().map(|c| c.name).collect());
        if !m.from_config {
            self.save(&def).await?;
        }
        *m.def.lock().expect("lock poisoned") = def;
        Ok(())
    }

    /// Stop serving a volume, flush it, and forget it; with `forget_record`, its nexus record
    /// too (only when it is deleted: a volume that is declared again must find its replicas'
    /// health, or a stale replica could become the source of a rebuild).
    async fn close_volume(&self, m: Arc<Managed>, forget_record: bool) {
        let name = m.volume.name.clone();
        self.server.remove_export(&name);
        self.volumes.write().expect("lock poisoned").remove(&name);
        self.health
            .lock()
            .expect("lock poisoned")
            .remove(&format!("health/{}.{name}", self.node));
        if let Err(e) = m.device.flush().await {
            warn!(volume = %name, error = %e.chain(), "flush a closed volume");
        }
        if let Some(n) = m.volume.nexus().filter(|_| forget_record) {
            let path = crate::ledger::FileLedger::new(&self.data_dir, n.name())
                .path()
                .to_path_buf();
            let _ = std::fs::remove_file(path);
        }
        close(m, &self.images).await;
    }

    /// Flush every volume (at shutdown); the names of those that failed.
    pub async fn flush_all(&self) -> Vec<String> {
        let mut failed = Vec::new();
        for m in self.volumes() {
            if let Err(e) = m.device.flush().await {
                warn!(volume = %m.volume.name, error = %e.chain(), "flush volume on shutdown");
                failed.push(m.volume.name.clone());
            }
        }
        failed
    }
}

fn managed(vol: Volume, def: VolumeDef, from_config: bool) -> Arc<Managed> {
    let device = Arc::new(StatsDevice::new(vol.device()));
    Arc::new(Managed {
        volume: Arc::new(vol),
        def: Mutex::new(def),
        from_config,
        device,
    })
}

fn export_of(m: &Managed, def: &VolumeDef) -> Export {
    Export {
        name: def.name.clone(),
        description: def.description.clone(),
        device: m.device.clone(),
        read_only: def.read_only,
        transactions: match (m.volume.image(), def.read_only) {
            (Some(i), false) => Some(i.clone() as Arc<dyn strata_bdev::Transactional>),
            _ => None,
        },
    }
}

/// Close a volume that is no longer served: an image volume's image is released.
async fn close(m: Arc<Managed>, images: &Images) {
    let image = m.volume.image().is_some().then(|| m.volume.name.clone());
    drop(m);
    if let Some(name) = image {
        images.forget_volume(&name).await;
    }
}
