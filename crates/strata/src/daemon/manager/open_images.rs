//! The page-store images the daemon has open, each once: image volumes, and images, snapshots
//! and access-token images that clients ask for by name.
//!
//! ```text
//!   VOLUME          an image volume (listed)
//!   STORE/IMAGE     any image of a known store                 ([nbd] images = true)
//!   STORE/IMAGE@S   snapshot S of it, read-only                ([nbd] images = true)
//!   VOLUME@S        snapshot S of an image volume, read-only   ([nbd] images = true)
//!   eyJ….eyJ….sig   an HS256 JWT naming an image by image_id   ([jwt])
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use strata_pagestore::Image;
use tracing::info;

use super::{ImageDecl, ImageKey, OpError, OpResult, Stores};
use crate::daemon::jwt::Jwt;

/// What a client's name for an image resolved to.
#[derive(Debug)]
pub struct ResolvedImage {
    /// The name to report (the image id of a token).
    pub name: String,
    pub image: Arc<Image>,
    pub writable: bool,
    /// The token's client id, which scopes a takeover.
    pub client_id: Option<String>,
}

/// Open images, by `STORE/NAME` (and `STORE/NAME@SNAP` for snapshots).
#[derive(Debug)]
pub struct Images {
    stores: Arc<Stores>,
    open: tokio::sync::Mutex<HashMap<String, Arc<Image>>>,
    /// Since when each open image no one uses has been so.
    idle_since: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// Image volumes: volume name → image.
    volumes: std::sync::RwLock<HashMap<String, ImageKey>>,
    jwt: Option<Jwt>,
    serve_images: bool,
    /// Images opened for clients are closed after this long unused.
    idle: std::time::Duration,
}

impl Images {
    pub fn new(
        stores: Arc<Stores>,
        jwt: Option<Jwt>,
        serve_images: bool,
        idle: std::time::Duration,
    ) -> Arc<Images> {
        Arc::new(Images {
            stores,
            open: tokio::sync::Mutex::new(HashMap::new()),
            idle_since: std::sync::Mutex::new(HashMap::new()),
            volumes: std::sync::RwLock::new(HashMap::new()),
            jwt,
            serve_images,
            idle,
        })
    }

    /// The page stores images are opened from.
    pub fn stores(&self) -> Arc<Stores> {
        self.stores.clone()
    }

    /// Open the image `decl` names (once) as volume `volume`, creating it `size` bytes large if
    /// it is missing.
    pub async fn open_volume(
        &self,
        volume: &str,
        decl: &ImageDecl,
        size: Option<u64>,
    ) -> strata_bdev::Result<Arc<Image>> {
        let key = decl.key.to_string();
        let mut open = self.open.lock().await;
        let image = match open.get(&key) {
            Some(i) => i.clone(),
            None => {
                let create = size.map(|s| (s, decl.page_size.trailing_zeros()));
                // An unknown store is a mistake in the declaration.
                let store = self.stores.get(&decl.key.store).map_err(|e| {
                    strata_bdev::Error::new(strata_bdev::ErrorKind::InvalidInput, e.to_string())
                })?;
                let i = Arc::new(store.open(&decl.key.image, create).await?);
                open.insert(key, i.clone());
                i
            }
        };
        self.volumes
            .write()
            .expect("lock poisoned")
            .insert(volume.to_string(), decl.key.clone());
        Ok(image)
    }

    /// Forget that `volume` is an image volume (it was closed); its image is closed unless
    /// another volume or a client still uses it.
    pub async fn forget_volume(&self, volume: &str) {
        let key = {
            let mut volumes = self.volumes.write().expect("lock poisoned");
            match volumes.remove(volume) {
                Some(k) if !volumes.values().any(|v| *v == k) => k.to_string(),
                _ => return,
            }
        };
        let mut open = self.open.lock().await;
        if open.get(&key).is_some_and(|i| Arc::strong_count(i) == 1) {
            if let Some(Ok(image)) = open.remove(&key).map(Arc::try_unwrap) {
                image.close().await;
            }
        }
    }

    /// The image `name` names: an image volume's name, or `STORE/IMAGE` of a known store.
    pub fn key(&self, name: &str) -> OpResult<ImageKey> {
        if name.is_empty() {
            return Err(OpError::invalid("image is required"));
        }
        if let Some(key) = self.volumes.read().expect("lock poisoned").get(name) {
            return Ok(key.clone());
        }
        match ImageKey::parse(name) {
            Ok(key) => {
                self.stores.get(&key.store)?;
                Ok(key)
            }
            Err(_) => Err(OpError::not_found(format!(
                "{name:?} is neither an image volume nor STORE/IMAGE (stores: {})",
                self.stores.names().join(", ")
            ))),
        }
    }

    /// The image `key`, opening it if it is not open; `create` makes a missing one
    /// `(size, page size bits)`.
    pub async fn image(&self, key: &ImageKey, create: Option<(u64, u32)>) -> OpResult<Arc<Image>> {
        let mut open = self.open.lock().await;
        if let Some(i) = open.get(&key.to_string()) {
            let page = super::images::page_bytes(i);
            if let Some((_, bits)) = create.filter(|(_, b)| 1u64 << b != page) {
                return Err(OpError::invalid(format!(
                    "image {key} exists with pages of {page} bytes; asked for pages of {} bytes",
                    1u64 << bits
                )));
            }
            return Ok(i.clone());
        }
        let i = Arc::new(
            self.stores
                .get(&key.store)?
                .open(&key.image, create)
                .await?,
        );
        open.insert(key.to_string(), i.clone());
        Ok(i)
    }

    /// The image `key`, if it is open.
    pub async fn if_open(&self, key: &ImageKey) -> Option<Arc<Image>> {
        self.open.lock().await.get(&key.to_string()).cloned()
    }

    /// Close an image that is about to be deleted: refused if it is a volume or clients use it.
    pub async fn close(&self, key: &ImageKey) -> OpResult<()> {
        if self
            .volumes
            .read()
            .expect("lock poisoned")
            .values()
            .any(|k| k == key)
        {
            return Err(OpError::precondition(format!(
                "image {key} is a volume's; delete the volume (with its image) instead"
            )));
        }
        let name = key.to_string();
        let mut open = self.open.lock().await;
        if let Some(i) = open.get(&name) {
            // Ours plus the map's: anything more is a client's connection.
            if Arc::strong_count(i) > 1 {
                return Err(OpError::precondition(format!(
                    "image {key} is in use by clients; disconnect them first"
                )));
            }
            if let Some(Ok(image)) = open.remove(&name).map(Arc::try_unwrap) {
                image.close().await;
            }
        }
        open.retain(|k, _| !k.starts_with(&format!("{name}@")));
        Ok(())
    }

    /// Snapshot `snap` of `key`, read-only.
    async fn snapshot(&self, key: &ImageKey, snap: &str) -> OpResult<Arc<Image>> {
        let name = format!("{key}@{snap}");
        let mut open = self.open.lock().await;
        if let Some(i) = open.get(&name) {
            return Ok(i.clone());
        }
        let i = Arc::new(
            self.stores
                .get(&key.store)?
                .open_snapshot(&key.image, snap)
                .await?,
        );
        open.insert(name, i.clone());
        Ok(i)
    }

    /// Whether any image (or snapshot) of `store` is in use (by a volume or a client).
    pub async fn open_in(&self, store: &str) -> bool {
        let prefix = format!("{store}/");
        self.open
            .lock()
            .await
            .iter()
            .any(|(k, i)| k.starts_with(&prefix) && Arc::strong_count(i) > 1)
    }

    /// Close the images of `store` nobody uses (before the store goes away).
    pub async fn close_idle_in(&self, store: &str) {
        let prefix = format!("{store}/");
        let idle: Vec<Arc<Image>> = {
            let mut open = self.open.lock().await;
            let keys: Vec<String> = open
                .iter()
                .filter(|(k, i)| k.starts_with(&prefix) && Arc::strong_count(i) == 1)
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| open.remove(k)).collect()
        };
        for i in idle {
            if let Ok(image) = Arc::try_unwrap(i) {
                image.close().await;
            }
        }
    }

    /// Close the images opened for clients (by name, as snapshots, or by token) that no client
    /// has used for the idle time; they are opened again when asked for. Volumes' images stay
    /// open.
    pub async fn close_idle(&self) {
        let idle = self.idle;
        let now = std::time::Instant::now();
        let volumes: std::collections::HashSet<String> = self
            .volumes
            .read()
            .expect("lock poisoned")
            .values()
            .map(ToString::to_string)
            .collect();
        let closing: Vec<Arc<Image>> = {
            let mut open = self.open.lock().await;
            let mut since = self.idle_since.lock().expect("lock poisoned");
            since.retain(|k, _| open.contains_key(k));
            let mut expired = Vec::new();
            for (k, i) in open.iter() {
                if volumes.contains(k) || Arc::strong_count(i) > 1 {
                    since.remove(k);
                } else if now.duration_since(*since.entry(k.clone()).or_insert(now)) >= idle {
                    expired.push(k.clone());
                }
            }
            expired
                .iter()
                .filter_map(|k| {
                    since.remove(k);
                    open.remove(k)
                })
                .collect()
        };
        for i in closing {
            if let Ok(image) = Arc::try_unwrap(i) {
                info!(image = %image.name(), "closing an image no client has used for a while");
                image.close().await;
            }
        }
    }

    /// Whether a snapshot is open (exported to a client, or was).
    pub async fn snapshot_open(&self, key: &ImageKey, snap: &str) -> bool {
        self.open
            .lock()
            .await
            .get(&format!("{key}@{snap}"))
            .is_some_and(|i| Arc::strong_count(i) > 1)
    }

    /// Drop a deleted snapshot from the open ones.
    pub async fn forget_snapshot(&self, key: &ImageKey, snap: &str) {
        self.open.lock().await.remove(&format!("{key}@{snap}"));
    }

    /// The image a client's export name selects, if it names one: an access token (when tokens
    /// are on), `STORE/IMAGE`, or a snapshot `IMAGE@SNAP` (when images are served by name).
    pub async fn resolve(&self, name: &str) -> OpResult<Option<ResolvedImage>> {
        if let Some(jwt) = &self.jwt {
            if Jwt::looks_like(name) {
                let claims = jwt
                    .verify(name)
                    .map_err(|e| OpError::new(super::OpKind::Precondition, format!("{e:#}")))?;
                let key = ImageKey {
                    store: jwt.store().to_string(),
                    image: claims.image_id.clone(),
                };
                let image = self
                    .image(&key, Some((claims.image_size, claims.page_size_bits)))
                    .await
                    .map_err(|e| e.context(&format!("image {}", claims.image_id)))?;
                return Ok(Some(ResolvedImage {
                    name: claims.image_id,
                    image,
                    writable: true,
                    client_id: claims.client_id,
                }));
            }
        }
        if !self.serve_images {
            return Ok(None);
        }
        // With tokens on, a token is the only way to the images tokens name (their ids end in
        // `.mvps-image`) in the tokens' store.
        let token_store = self.jwt.as_ref().map(Jwt::store);
        let (image, snap) = match name.split_once('@') {
            Some((i, s)) => (i, Some(s)),
            None => (name, None),
        };
        if snap.is_none() && !image.contains('/') {
            return Ok(None);
        }
        let Ok(key) = self.key(image) else {
            return Ok(None);
        };
        if token_store == Some(key.store.as_str()) && key.image.ends_with(Jwt::IMAGE_SUFFIX) {
            return Ok(None);
        }
        let (image, writable) = match snap {
            Some(s) => (self.snapshot(&key, s).await?, false),
            None => (self.image(&key, None).await?, true),
        };
        Ok(Some(ResolvedImage {
            name: name.to_string(),
            image,
            writable,
            client_id: None,
        }))
    }
}

/// NBD clients reach images, snapshots and token images by export name.
#[async_trait::async_trait]
impl strata_nbd::Resolver for Images {
    async fn resolve(&self, name: &str) -> Result<Option<strata_nbd::Resolved>, String> {
        let Some(r) = self.resolve(name).await.map_err(|e| e.message)? else {
            return Ok(None);
        };
        Ok(Some(strata_nbd::Resolved {
            export: Arc::new(strata_nbd::Export {
                name: r.name,
                description: String::new(),
                device: r.image.clone(),
                read_only: !r.writable,
                transactions: r
                    .writable
                    .then_some(r.image as Arc<dyn strata_bdev::Transactional>),
            }),
            client_id: r.client_id,
        }))
    }
}
