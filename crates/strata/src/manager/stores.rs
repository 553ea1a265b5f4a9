//! Page stores added and removed through the API.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use strata_pagestore::StoreConfig;

use super::{BackingDef, Manager, OpError, OpKind, OpResult, StoreDesc, STORES};

impl Manager {
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
    pub async fn create_store(&self, name: &str, sc: StoreConfig) -> OpResult<StoreDesc> {
        strata_pagestore::check_name(name)
            .map_err(|e| OpError::invalid(format!("name: {}", e.chain())))?;
        if let StoreConfig::S3 { bucket, region, .. } = &sc {
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
        let json = serde_json::to_vec_pretty(&sc).expect("a StoreConfig serializes");
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
    pub(super) async fn reconcile_stores(&self) -> OpResult<()> {
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
            let sc: StoreConfig = match serde_json::from_slice(&value) {
                Ok(d) => d,
                Err(e) => {
                    warn!(%key, error = %e, "state store record is not a store; ignored");
                    continue;
                }
            };
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
}
