//! The page stores: the one set of them the daemon has (the configuration's, `local`, and those
//! created through the API and kept in the state store as their `strata_pagestore::StoreConfig`,
//! credentials included: protect the state store as you would the credentials).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use strata_pagestore::{ImageOpener, PageStore, StoreConfig};
use tracing::{info, warn};

use super::{Caller, Manager, OpError, OpKind, OpResult, STORES};

/// A page store, for listing.
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
    fn new(name: &str, sc: &StoreConfig, from_config: bool) -> StoreDesc {
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

/// Makes page stores from store settings, with this node's buffer and cache directories and
/// page-store tunables.
#[derive(Debug, Clone)]
pub struct StoreFactory {
    /// Write buffers go to `buffer_dir/STORE/`.
    pub buffer_dir: PathBuf,
    pub settings: strata_pagestore::Settings,
    /// The disk cache goes to `disk_cache_root/STORE/` (default: beside the write buffers).
    pub disk_cache_root: Option<PathBuf>,
}

impl StoreFactory {
    /// The page store `name` over the object store `sc` describes.
    pub fn build(&self, name: &str, sc: &StoreConfig) -> OpResult<PageStore> {
        let objects = strata_pagestore::Store::open(sc)
            .map_err(|e| OpError::invalid(format!("store {name:?}: {e}")))?;
        // One buffer (and cache) directory per store, so that equal image names never meet.
        let mut settings = self.settings.clone();
        settings.disk_cache_dir = self.disk_cache_root.as_ref().map(|d| d.join(name));
        Ok(PageStore {
            objects: Arc::new(objects),
            buffer_dir: self.buffer_dir.join(name),
            settings,
        })
    }
}

/// Every page store of the daemon, by name.
#[derive(Debug)]
pub struct Stores {
    opener: Arc<ImageOpener>,
    factory: StoreFactory,
    described: RwLock<BTreeMap<String, StoreDesc>>,
}

impl Stores {
    /// The stores a configuration declares.
    pub fn new(factory: StoreFactory, configured: &[(String, StoreConfig)]) -> OpResult<Stores> {
        let stores = Stores {
            opener: Arc::new(ImageOpener::new()),
            factory,
            described: RwLock::new(BTreeMap::new()),
        };
        for (name, sc) in configured {
            stores.add(name, sc, true)?;
        }
        Ok(stores)
    }

    /// Make `name` reachable (`image://NAME/…`); the store built.
    fn add(&self, name: &str, sc: &StoreConfig, from_config: bool) -> OpResult<Arc<PageStore>> {
        let ps = self.factory.build(name, sc)?;
        self.opener.add_store(name, ps);
        self.described
            .write()
            .expect("lock poisoned")
            .insert(name.to_string(), StoreDesc::new(name, sc, from_config));
        Ok(self.opener.store(name)?)
    }

    fn remove(&self, name: &str) {
        self.opener.remove_store(name);
        self.described.write().expect("lock poisoned").remove(name);
    }

    /// What opens `image://STORE/NAME` URIs (nexus replicas may be images).
    pub fn opener(&self) -> Arc<ImageOpener> {
        self.opener.clone()
    }

    /// The store `name`, or an error listing the known ones.
    pub fn get(&self, name: &str) -> strata_bdev::Result<Arc<PageStore>> {
        self.opener.store(name)
    }

    pub fn names(&self) -> Vec<String> {
        self.opener.store_names()
    }

    /// The stores, by name.
    pub fn list(&self) -> Vec<StoreDesc> {
        self.described
            .read()
            .expect("lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    pub fn describe(&self, name: &str) -> Option<StoreDesc> {
        self.described
            .read()
            .expect("lock poisoned")
            .get(name)
            .cloned()
    }
}

impl Manager {
    /// Make a page store reachable (`image://NAME/…`) and remember it.
    pub async fn create_store(
        &self,
        name: &str,
        sc: StoreConfig,
        caller: &Caller,
    ) -> OpResult<StoreDesc> {
        strata_pagestore::check_name(name)
            .map_err(|e| OpError::invalid(format!("name: {}", e.chain())))?;
        match &sc {
            StoreConfig::S3 { bucket, region, .. } => {
                if bucket.is_empty() {
                    return Err(OpError::invalid("s3.bucket is required"));
                }
                if region.is_empty() {
                    return Err(OpError::invalid(
                        "s3.region is required (us-east-1 for most S3-compatible services)",
                    ));
                }
            }
            StoreConfig::Dir { path } => {
                if !path.is_absolute() {
                    return Err(OpError::invalid(format!(
                        "dir.path: {:?} is not an absolute path",
                        path.display()
                    )));
                }
                self.allow_path(caller, "dir.path", path)?;
            }
        }
        let _changing = self.changes.lock().await;
        if self.stores.describe(name).is_some() {
            return Err(OpError::new(
                OpKind::Exists,
                format!("store {name:?} exists"),
            ));
        }
        let ps = self.stores.factory.build(name, &sc)?;
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
        let json = serde_json::to_vec_pretty(&sc).expect("a StoreConfig serializes");
        self.state.put(&format!("{STORES}{name}"), &json).await?;
        self.stores.add(name, &sc, false)?;
        let desc = StoreDesc::new(name, &sc, false);
        info!(store = %name, kind = %desc.kind, location = %desc.location, "store created");
        Ok(desc)
    }

    /// Forget a store the API created (its objects stay where they are). Refused while a
    /// volume uses one of its images or an image of it is open.
    pub async fn delete_store(&self, name: &str) -> OpResult<String> {
        let _changing = self.changes.lock().await;
        let Some(desc) = self.stores.describe(name) else {
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
            .filter(|d| d.image().is_some_and(|k| k.store == name))
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
        self.stores.remove(name);
        let msg = format!(
            "store {name} removed; its objects stay in {}",
            desc.location
        );
        info!("{msg}");
        Ok(msg)
    }

    /// Add the stores the state store declares that are not known yet.
    pub(super) async fn reconcile_stores(&self) -> OpResult<()> {
        for (key, value) in self.state.list(STORES).await? {
            let name = key.trim_start_matches(STORES).to_string();
            if self.stores.describe(&name).is_some() {
                continue;
            }
            let sc: StoreConfig = match serde_json::from_slice(&value) {
                Ok(d) => d,
                Err(e) => {
                    warn!(%key, error = %e, "state store record is not a store; ignored");
                    continue;
                }
            };
            match self.stores.add(&name, &sc, false) {
                Ok(_) => info!(store = %name, "store added as the state store declares"),
                Err(e) => warn!(store = %name, error = %e, "store cannot be opened"),
            }
        }
        Ok(())
    }
}
