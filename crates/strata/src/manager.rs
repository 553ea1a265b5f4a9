//! The daemon's volumes as a live set: the ones the configuration file declares, and the ones
//! created through the API (remembered in the state store and reopened at start). Every change
//! to the set goes through here, so the API and spec reconciliation share
//! one implementation and one set of checks.
//!
//! ```text
//!   gRPC API / apply / reconcile ──► Manager ──► volumes (device | nexus | image)
//!                                        ├──► NBD server exports (StatsDevice over each volume)
//!                                        └──► StateStore ("volumes/NAME": VolumeDef as JSON)
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use strata_bdev::{BlockDevice, DeviceUri, IoStats, Registry, StatsDevice};
use strata_nbd::{Export, Server};
use tracing::{info, warn};

use crate::config::VolumeConfig;
use crate::images::Images;
use crate::state::{StateError, StateStore};
use crate::volume::{self, Volume};

/// How an operation failed, so that each front end reports it its own way (gRPC codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Invalid,
    NotFound,
    Exists,
    Precondition,
    Unavailable,
    Unimplemented,
    Internal,
}

/// A failed operation: its kind and a message a person can act on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    pub kind: OpKind,
    pub message: String,
}

impl OpError {
    pub fn new(kind: OpKind, message: impl Into<String>) -> OpError {
        OpError {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> OpError {
        OpError::new(OpKind::Invalid, message)
    }

    pub fn not_found(message: impl Into<String>) -> OpError {
        OpError::new(OpKind::NotFound, message)
    }

    pub fn precondition(message: impl Into<String>) -> OpError {
        OpError::new(OpKind::Precondition, message)
    }
}

impl From<StateError> for OpError {
    fn from(e: StateError) -> OpError {
        let kind = match e {
            StateError::Unavailable { .. } => OpKind::Unavailable,
            StateError::Failed { .. } => OpKind::Internal,
        };
        OpError::new(kind, e.to_string())
    }
}

impl From<strata_bdev::Error> for OpError {
    fn from(e: strata_bdev::Error) -> OpError {
        OpError::new(OpKind::of(e.kind()), e.chain())
    }
}

impl OpKind {
    /// The kind a device or page-store error is.
    pub fn of(kind: strata_bdev::ErrorKind) -> OpKind {
        use strata_bdev::ErrorKind as K;
        match kind {
            K::InvalidInput | K::OutOfRange | K::TooLarge => OpKind::Invalid,
            K::PermissionDenied | K::Conflict => OpKind::Precondition,
            K::Io | K::TimedOut | K::Shutdown | K::NoSpace => OpKind::Unavailable,
            K::Unsupported => OpKind::Unimplemented,
            K::NotFound => OpKind::NotFound,
            K::AlreadyExists => OpKind::Exists,
            _ => OpKind::Internal,
        }
    }
}

impl From<strata_nexus::NexusError> for OpError {
    fn from(e: strata_nexus::NexusError) -> OpError {
        use strata_nexus::NexusError as E;
        let kind = match &e {
            E::NoSuchChild { .. } => OpKind::NotFound,
            E::DuplicateChild { .. } => OpKind::Exists,
            E::InvalidSettings { .. } | E::NoChildren { .. } | E::Incompatible { .. } => {
                OpKind::Invalid
            }
            E::LastHealthy { .. }
            | E::InvalidState { .. }
            | E::NoSource { .. }
            | E::NoRebuild { .. } => OpKind::Precondition,
            _ => OpKind::Internal,
        };
        OpError::new(kind, e.to_string())
    }
}

pub type OpResult<T> = Result<T, OpError>;

/// What a volume is made of, as the API and specs declare it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackingDef {
    /// One device URI.
    Device(String),
    /// The replica URIs of a nexus.
    Nexus(Vec<String>),
    /// A page-store image, `STORE/IMAGE`.
    Image(String),
}

/// A volume as declared: what is stored in the state store, and what specs describe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDef {
    pub name: String,
    /// Bytes; 0 takes the size of existing devices.
    pub size: u64,
    pub backing: BackingDef,
    /// Exported over NBD.
    pub export: bool,
    pub read_only: bool,
    #[serde(default)]
    pub description: String,
    /// The node that serves it (its `[api] node_name`); empty means the node that stored it.
    #[serde(default)]
    pub node: String,
}

/// An object store for page-store images, as the API declares it (and as it is kept in the
/// state store, credentials included: protect the state store as you would the credentials).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StoreDef {
    Dir {
        path: PathBuf,
    },
    S3 {
        #[serde(default)]
        endpoint: Option<String>,
        region: String,
        bucket: String,
        #[serde(default)]
        prefix: String,
        #[serde(default)]
        access_key_id: Option<String>,
        #[serde(default)]
        secret_access_key: Option<String>,
    },
}

impl StoreDef {
    pub fn config(&self) -> strata_pagestore::StoreConfig {
        match self.clone() {
            StoreDef::Dir { path } => strata_pagestore::StoreConfig::Dir { path },
            StoreDef::S3 {
                endpoint,
                region,
                bucket,
                prefix,
                access_key_id,
                secret_access_key,
            } => strata_pagestore::StoreConfig::S3 {
                endpoint,
                region,
                bucket,
                prefix,
                access_key_id,
                secret_access_key,
            },
        }
    }
}

/// A page store the daemon knows, for listing.
#[derive(Debug, Clone)]
pub struct StoreDesc {
    pub name: String,
    /// "dir" or "s3".
    pub kind: String,
    /// The directory, or `s3://bucket/prefix at endpoint` (never credentials).
    pub location: String,
    pub from_config: bool,
}

impl StoreDesc {
    pub fn new(name: &str, sc: &strata_pagestore::StoreConfig, from_config: bool) -> StoreDesc {
        use strata_pagestore::StoreConfig;
        let (kind, location) = match sc {
            StoreConfig::Dir { path } => ("dir", path.display().to_string()),
            StoreConfig::S3 {
                endpoint,
                bucket,
                prefix,
                ..
            } => (
                "s3",
                format!(
                    "s3://{bucket}/{prefix} at {}",
                    endpoint.as_deref().unwrap_or("AWS")
                ),
            ),
        };
        StoreDesc {
            name: name.to_string(),
            kind: kind.into(),
            location,
            from_config,
        }
    }
}

/// Sizes are multiples of this.
pub const SECTOR: u64 = 512;

/// Check a volume name: it is an export name and a state-store key.
pub fn check_volume_name(name: &str) -> OpResult<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        || name.starts_with('.')
    {
        return Err(OpError::invalid(format!(
            "volume name {name:?}: use 1 to 64 letters, digits, . _ - (not starting with .)"
        )));
    }
    Ok(())
}

impl VolumeDef {
    /// Check everything that can be checked without opening anything; `path` prefixes field
    /// names in messages (`volumes[2].`).
    pub fn validate(&self, path: &str) -> OpResult<()> {
        check_volume_name(&self.name).map_err(|e| OpError::invalid(format!("{path}name: {e}")))?;
        if !self.size.is_multiple_of(SECTOR) {
            return Err(OpError::invalid(format!(
                "{path}size: {} is not a multiple of the {SECTOR}-byte block size",
                self.size
            )));
        }
        let check_uri = |field: String, uri: &str| -> OpResult<()> {
            let u = DeviceUri::parse(uri)
                .map_err(|e| OpError::invalid(format!("{path}{field}: {}", e.chain())))?;
            if u.scheme == "image" {
                return Err(OpError::invalid(format!(
                    "{path}{field}: {uri:?}: name a page-store image with `image: STORE/IMAGE`"
                )));
            }
            Ok(())
        };
        match &self.backing {
            BackingDef::Device(uri) => check_uri("device".into(), uri)?,
            BackingDef::Nexus(replicas) => {
                if replicas.is_empty() {
                    return Err(OpError::invalid(format!(
                        "{path}replicas: a nexus volume needs at least one replica"
                    )));
                }
                for (i, r) in replicas.iter().enumerate() {
                    check_uri(format!("replicas[{i}]"), r)?;
                    if replicas[..i].contains(r) {
                        return Err(OpError::invalid(format!(
                            "{path}replicas[{i}]: {r:?} is listed twice"
                        )));
                    }
                }
            }
            BackingDef::Image(key) => {
                let ok = key.split_once('/').is_some_and(|(s, n)| {
                    strata_pagestore::check_name(s).is_ok()
                        && strata_pagestore::check_name(n).is_ok()
                });
                if !ok {
                    return Err(OpError::invalid(format!(
                        "{path}image: {key:?} is not STORE/IMAGE (names of letters, digits, - _ .)"
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn kind(&self) -> &'static str {
        match self.backing {
            BackingDef::Device(_) => "device",
            BackingDef::Nexus(_) => "nexus",
            BackingDef::Image(_) => "image",
        }
    }

    /// The configuration entry that opens it.
    fn config(&self) -> VolumeConfig {
        let mut c = match &self.backing {
            BackingDef::Device(uri) => VolumeConfig::device(&self.name, uri),
            BackingDef::Image(key) => {
                let mut uri = format!("image://{key}");
                if self.size > 0 {
                    uri.push_str(&format!("?size={}", self.size));
                }
                VolumeConfig::device(&self.name, &uri)
            }
            BackingDef::Nexus(replicas) => {
                let mut c = VolumeConfig::device(&self.name, "");
                c.uri = None;
                c.replicas = replicas.clone();
                c
            }
        };
        c.description = self.description.clone();
        c.read_only = self.read_only;
        c.create_size = Some(self.size);
        c
    }

    /// The declaration of a volume the configuration file makes.
    pub fn from_config(c: &VolumeConfig, size: u64) -> VolumeDef {
        let backing = match &c.uri {
            Some(uri) => match uri.strip_prefix("image://") {
                Some(rest) => BackingDef::Image(rest.split('?').next().unwrap_or(rest).to_string()),
                None => BackingDef::Device(uri.clone()),
            },
            None => BackingDef::Nexus(c.replicas.clone()),
        };
        VolumeDef {
            name: c.name.clone(),
            size,
            backing,
            export: true,
            read_only: c.read_only,
            description: c.description.clone(),
            node: String::new(),
        }
    }
}

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

    /// The stores the configuration declares, and how to add more.
    pub fn set_stores(
        &self,
        configured: Vec<StoreDesc>,
        factory: crate::serve::StoreFactory,
        opener: Arc<strata_pagestore::ImageOpener>,
    ) {
        let mut stores = self.stores.write().expect("lock poisoned");
        for d in configured {
            stores.insert(d.name.clone(), d);
        }
        *self.store_factory.write().expect("lock poisoned") = Some((factory, opener));
    }

    /// The page stores, by name.
    pub fn stores(&self) -> Vec<StoreDesc> {
        self.stores
            .read()
            .expect("lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Make a page store reachable (`image://NAME/…`) and remember it.
    pub async fn create_store(&self, name: &str, def: StoreDef) -> OpResult<StoreDesc> {
        strata_pagestore::check_name(name)
            .map_err(|e| OpError::invalid(format!("name: {}", e.chain())))?;
        if let StoreDef::S3 { bucket, region, .. } = &def {
            if bucket.is_empty() {
                return Err(OpError::invalid("s3.bucket is required"));
            }
            if region.is_empty() {
                return Err(OpError::invalid(
                    "s3.region is required (us-east-1 for most S3-compatible services)",
                ));
            }
        }
        let _changing = self.changes.lock().await;
        if self
            .stores
            .read()
            .expect("lock poisoned")
            .contains_key(name)
        {
            return Err(OpError::new(
                OpKind::Exists,
                format!("store {name:?} exists"),
            ));
        }
        let (factory, opener) = self
            .store_factory
            .read()
            .expect("lock poisoned")
            .clone()
            .ok_or_else(|| OpError::new(OpKind::Internal, "stores are not set up yet"))?;
        let sc = def.config();
        let ps = factory
            .build(name, &sc)
            .map_err(|e| OpError::invalid(format!("{e:#}")))?;
        // Reach it once now, so that a wrong endpoint or credentials fail here, not at the
        // first checkpoint.
        match tokio::time::timeout(Duration::from_secs(15), ps.objects.list("images/")).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(OpError::new(
                    OpKind::Unavailable,
                    format!("store {name:?}: cannot list it: {e} (check the endpoint, bucket and credentials)"),
                ))
            }
            Err(_) => {
                return Err(OpError::new(
                    OpKind::Unavailable,
                    format!("store {name:?}: no answer within 15 s (check the endpoint)"),
                ))
            }
        }
        let json = serde_json::to_vec_pretty(&def).expect("a StoreDef serializes");
        self.state.put(&format!("{STORES}{name}"), &json).await?;
        opener.add_store(name, ps);
        let desc = StoreDesc::new(name, &sc, false);
        self.stores
            .write()
            .expect("lock poisoned")
            .insert(name.to_string(), desc.clone());
        info!(store = %name, kind = %desc.kind, location = %desc.location, "store created");
        Ok(desc)
    }

    /// Forget a store the API created (its objects stay where they are). Refused while a
    /// volume uses one of its images or an image of it is open.
    pub async fn delete_store(&self, name: &str) -> OpResult<String> {
        let _changing = self.changes.lock().await;
        let Some(desc) = self
            .stores
            .read()
            .expect("lock poisoned")
            .get(name)
            .cloned()
        else {
            return Err(OpError::not_found(format!("no store {name:?}")));
        };
        if desc.from_config {
            return Err(OpError::precondition(format!(
                "store {name:?} is declared in the configuration file; remove it there and restart"
            )));
        }
        let users: Vec<String> = self
            .records()
            .await?
            .into_iter()
            .filter(
                |d| matches!(&d.backing, BackingDef::Image(k) if k.split('/').next() == Some(name)),
            )
            .map(|d| d.name)
            .collect();
        if !users.is_empty() {
            return Err(OpError::precondition(format!(
                "store {name:?} holds the images of volumes {}; delete them first",
                users.join(", ")
            )));
        }
        if self.images.open_in(name).await {
            return Err(OpError::precondition(format!(
                "images of store {name:?} are open (clients are using them); disconnect them first"
            )));
        }
        self.state.delete(&format!("{STORES}{name}")).await?;
        self.images.close_idle_in(name).await;
        if let Some((_, opener)) = self.store_factory.read().expect("lock poisoned").as_ref() {
            opener.remove_store(name);
        }
        self.stores.write().expect("lock poisoned").remove(name);
        let msg = format!(
            "store {name} removed; its objects stay in {}",
            desc.location
        );
        info!("{msg}");
        Ok(msg)
    }

    /// Add the stores the state store declares that are not known yet.
    async fn reconcile_stores(&self) -> OpResult<()> {
        let records = self.state.list(STORES).await?;
        let Some((factory, opener)) = self.store_factory.read().expect("lock poisoned").clone()
        else {
            return Ok(());
        };
        for (key, value) in records {
            let name = key.trim_start_matches(STORES).to_string();
            if self
                .stores
                .read()
                .expect("lock poisoned")
                .contains_key(&name)
            {
                continue;
            }
            let def: StoreDef = match serde_json::from_slice(&value) {
                Ok(d) => d,
                Err(e) => {
                    warn!(%key, error = %e, "state store record is not a store; ignored");
                    continue;
                }
            };
            let sc = def.config();
            match factory.build(&name, &sc) {
                Ok(ps) => {
                    opener.add_store(&name, ps);
                    self.stores
                        .write()
                        .expect("lock poisoned")
                        .insert(name.clone(), StoreDesc::new(&name, &sc, false));
                    info!(store = %name, "store added as the state store declares");
                }
                Err(e) => warn!(store = %name, error = %format!("{e:#}"), "store cannot be opened"),
            }
        }
        Ok(())
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

    /// The volume records in the state store: `(name, declaration)`.
    pub async fn records(&self) -> OpResult<Vec<VolumeDef>> {
        let mut out = Vec::new();
        for (key, value) in self.state.list(VOLUMES).await? {
            match serde_json::from_slice::<VolumeDef>(&value) {
                Ok(mut d) => {
                    if d.node.is_empty() {
                        d.node = self.node.clone();
                    }
                    out.push(d);
                }
                Err(e) => warn!(%key, error = %e, "state store record is not a volume; ignored"),
            }
        }
        Ok(out)
    }

    /// Make this node's volumes what the state store declares: open the missing ones, add and
    /// remove replicas, grow images, change exports, close the ones no longer declared, and
    /// try again to bring back faulted replicas (with backoff). What cannot be done is logged
    /// and kept in [`Manager::problems`]; the rest goes on.
    pub async fn reconcile(&self) -> OpResult<()> {
        let _changing = self.changes.lock().await;
        self.reconcile_stores().await?;
        let records = self.records().await?;
        let mine: BTreeMap<String, VolumeDef> = records
            .into_iter()
            .filter(|d| d.node == self.node)
            .map(|d| (d.name.clone(), d))
            .collect();
        let mut problems = BTreeMap::new();
        for (name, def) in &mine {
            let current = self
                .volumes
                .read()
                .expect("lock poisoned")
                .get(name)
                .cloned();
            let result = match current {
                None => match self.open_def(def).await {
                    Ok(m) => {
                        info!(volume = %name, kind = def.kind(), "volume opened as the state store declares");
                        self.insert(m);
                        Ok(())
                    }
                    Err(e) => Err(e.message),
                },
                Some(m) if m.from_config => Err(
                    "the configuration file declares this volume too; its declaration wins"
                        .to_string(),
                ),
                Some(m) => self.converge(&m, def).await,
            };
            if let Err(why) = result {
                let known = self.problems.read().expect("lock poisoned").get(name) == Some(&why);
                if !known {
                    warn!(volume = %name, problem = %why, "cannot make the volume what its declaration says; will retry");
                }
                problems.insert(name.clone(), why);
            }
        }
        // Volumes no longer declared here are closed (their data stays).
        let gone: Vec<Arc<Managed>> = self
            .volumes()
            .into_iter()
            .filter(|m| !m.from_config && !mine.contains_key(&m.volume.name))
            .collect();
        for m in gone {
            info!(volume = %m.volume.name, "volume is no longer declared for this node; closing it");
            self.close_volume(m, false).await;
        }
        *self.problems.write().expect("lock poisoned") = problems;
        self.heal().await;
        self.mirror_health().await;
        Ok(())
    }

    /// Change an open volume to match `want` where that is safe.
    async fn converge(&self, m: &Arc<Managed>, want: &VolumeDef) -> Result<(), String> {
        let have = m.def();
        let name = &want.name;
        let same_kind =
            std::mem::discriminant(&have.backing) == std::mem::discriminant(&want.backing);
        match (&have.backing, &want.backing) {
            _ if !same_kind => {
                return Err(format!(
                    "it is a {} volume and the declaration says {}: delete it and create it again",
                    have.kind(),
                    want.kind()
                ))
            }
            (BackingDef::Device(a), BackingDef::Device(b)) if a != b => {
                return Err(format!(
                    "its device is {a}; moving it to {b} is not done in place: copy the data and \
                     create a new volume"
                ))
            }
            (BackingDef::Image(a), BackingDef::Image(b)) if a != b => {
                return Err(format!(
                    "it is image {a}; the declaration names {b}: clone or copy it instead"
                ))
            }
            (BackingDef::Nexus(_), BackingDef::Nexus(wanted)) => {
                let n = m
                    .volume
                    .nexus()
                    .expect("a nexus volume has a nexus")
                    .clone();
                let children: Vec<String> =
                    n.status().children.into_iter().map(|c| c.name).collect();
                for uri in wanted.iter().filter(|u| !children.contains(u)) {
                    let size = Some(n.geometry().size);
                    let dev = crate::volume::open_device(
                        &self.registry,
                        &crate::volume::with_size(uri, size),
                    )
                    .await
                    .map_err(|e| format!("add replica {uri}: {}", e.chain()))?;
                    n.add_child(uri.clone(), dev)
                        .map_err(|e| format!("add replica {uri}: {e}"))?;
                    info!(volume = %name, replica = %uri, "replica added; full rebuild started");
                }
                for uri in children.iter().filter(|u| !wanted.contains(u)) {
                    n.remove_child(uri)
                        .map_err(|e| format!("remove replica {uri}: {e}"))?;
                    info!(volume = %name, replica = %uri, "replica removed");
                }
                n.save_record()
                    .await
                    .map_err(|e| format!("save the nexus record: {e}"))?;
            }
            _ => {}
        }
        let size = m.device.geometry().size;
        if want.size != 0 && want.size != size {
            match m.volume.image() {
                Some(i) if want.size > size => {
                    i.resize(want.size, false)
                        .await
                        .map_err(|e| format!("grow to {} bytes: {}", want.size, e.chain()))?;
                    info!(volume = %name, from = size, to = want.size, "volume grown");
                }
                Some(_) => {
                    return Err(format!(
                        "it holds {size} bytes and the declaration says {}: shrinking discards \
                         data, so it is only done by `strata volume resize --force`",
                        want.size
                    ))
                }
                None => {
                    return Err(format!(
                        "it holds {size} bytes and the declaration says {}: only page-store \
                         image volumes can be resized",
                        want.size
                    ))
                }
            }
        }
        if (have.export, have.read_only, &have.description)
            != (want.export, want.read_only, &want.description)
        {
            self.server.remove_export(name);
            if want.export {
                self.server.add_export(export_of(m, want));
            }
        }
        *m.def.lock().expect("lock poisoned") = want.clone();
        Ok(())
    }

    /// Try to bring back faulted replicas of declared nexus volumes, backing off from 5 s to
    /// 5 min per replica.
    async fn heal(&self) {
        for m in self.volumes().into_iter().filter(|m| !m.from_config) {
            let Some(n) = m.volume.nexus() else { continue };
            for c in n.status().children {
                if !matches!(c.state, strata_nexus::ChildState::Faulted(_)) {
                    continue;
                }
                let key = (m.volume.name.clone(), c.name.clone());
                let now = Instant::now();
                let wait = {
                    let retry = self.retry.lock().expect("lock poisoned");
                    match retry.get(&key) {
                        Some((at, _)) if *at > now => continue,
                        Some((_, wait)) => (*wait * 2).min(Duration::from_secs(300)),
                        None => Duration::from_secs(5),
                    }
                };
                self.retry
                    .lock()
                    .expect("lock poisoned")
                    .insert(key.clone(), (now + wait, wait));
                match self.online(n, &c.name).await {
                    Ok(()) => {
                        info!(volume = %m.volume.name, replica = %c.name, "faulted replica reopened; rebuilding it");
                        self.retry.lock().expect("lock poisoned").remove(&key);
                    }
                    Err(e) => {
                        warn!(volume = %m.volume.name, replica = %c.name, error = %e, retry_in = ?wait, "faulted replica still cannot be reopened")
                    }
                }
            }
        }
    }

    /// Bring a replica back online: a faulted one is closed and reopened from its URI first.
    pub async fn online(&self, n: &Arc<strata_nexus::Nexus>, child: &str) -> OpResult<()> {
        let faulted = matches!(
            n.status().child(child).map(|c| &c.state),
            Some(strata_nexus::ChildState::Faulted(_))
        );
        if faulted {
            // Its device failed: close it (releasing locks and connections), open it again.
            let old = n.close_device(child)?;
            let _ = tokio::task::spawn_blocking(move || drop(old)).await;
            let dev = crate::volume::open_device(&self.registry, child)
                .await
                .map_err(|e| {
                    OpError::new(
                        OpKind::Unavailable,
                        format!("reopen replica {child}: {} (it stays faulted)", e.chain()),
                    )
                })?;
            n.replace_device(child, dev)?;
        }
        n.online_child(child)?;
        n.save_record()
            .await
            .map_err(|e| OpError::new(OpKind::Internal, format!("save the nexus record: {e}")))?;
        Ok(())
    }

    /// Copy the state of this node's nexus volumes to `health/NODE.VOLUME` in the state store,
    /// so that a cluster sees it (the authoritative record, which fences stale replicas, is
    /// the local ledger: a fault must never wait on the network).
    async fn mirror_health(&self) {
        for m in self.volumes() {
            let Some(n) = m.volume.nexus() else { continue };
            let children: Vec<serde_json::Value> = n
                .status()
                .children
                .iter()
                .map(|c| serde_json::json!({"uri": c.name, "state": c.state.to_string()}))
                .collect();
            let value = serde_json::to_vec(&children).expect("JSON serializes");
            let key = format!("health/{}.{}", self.node, m.volume.name);
            if self.health.lock().expect("lock poisoned").get(&key) == Some(&value) {
                continue;
            }
            if self.state.put(&key, &value).await.is_ok() {
                self.health
                    .lock()
                    .expect("lock poisoned")
                    .insert(key, value);
            }
        }
    }

    /// Reconcile now and then every `every`, until the task is dropped.
    pub async fn run(self: Arc<Self>, every: Duration) {
        let mut unavailable = false;
        loop {
            match self.reconcile().await {
                Ok(()) if unavailable => {
                    info!(store = %self.state.describe(), "state store is reachable again");
                    unavailable = false;
                }
                Ok(()) => {}
                Err(e) if !unavailable => {
                    warn!(error = %e, "cannot read the desired state; volumes keep serving and changes are refused until it is back");
                    unavailable = true;
                }
                Err(_) => {}
            }
            tokio::time::sleep(every).await;
        }
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
