//! The page-store images the daemon has open, each once: image volumes, and images,
//! snapshots and access-token images that clients ask for by export name.
//!
//! ```text
//!   VOLUME          a configured volume (listed)
//!   STORE/IMAGE     any image of a configured store            ([nbd] images = true)
//!   STORE/IMAGE@S   snapshot S of it, read-only                ([nbd] images = true)
//!   VOLUME@S        snapshot S of an image volume, read-only   ([nbd] images = true)
//!   eyJ….eyJ….sig   an HS256 JWT naming an image by image_id   ([jwt])
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, bail};
use async_trait::async_trait;
use base64::Engine;
use strata_bdev::DeviceUri;
use strata_nbd::{Export, Resolved, Resolver};
use strata_pagestore::{Image, ImageOpener, PageStore};

/// Open images, by `STORE/NAME` (and `STORE/NAME@SNAP` for snapshots).
#[derive(Debug)]
pub struct Images {
    opener: Arc<ImageOpener>,
    open: tokio::sync::Mutex<HashMap<String, Arc<Image>>>,
    /// Image volumes: volume name → `STORE/NAME`.
    volumes: std::sync::RwLock<HashMap<String, String>>,
    jwt: Option<Jwt>,
    serve_images: bool,
}

impl Images {
    pub fn new(opener: Arc<ImageOpener>, jwt: Option<Jwt>, serve_images: bool) -> Arc<Images> {
        Arc::new(Images {
            opener,
            open: tokio::sync::Mutex::new(HashMap::new()),
            volumes: std::sync::RwLock::new(HashMap::new()),
            jwt,
            serve_images,
        })
    }

    /// Open the image an `image://STORE/NAME?…` URI names (once), as volume `volume`.
    pub async fn open_volume(&self, volume: &str, uri: &str) -> strata_bdev::Result<Arc<Image>> {
        let u = DeviceUri::parse(uri)?;
        let key = format!("{}/{}", u.authority, u.path.trim_start_matches('/'));
        let mut open = self.open.lock().await;
        let image = match open.get(&key) {
            Some(i) => i.clone(),
            None => {
                let i = self.opener.open_image(uri).await?;
                open.insert(key.clone(), i.clone());
                i
            }
        };
        self.volumes
            .write()
            .expect("lock poisoned")
            .insert(volume.to_string(), key);
        Ok(image)
    }

    /// Forget that `volume` is an image volume (it was deleted); its image is closed unless
    /// another volume or a client still uses it.
    pub async fn forget_volume(&self, volume: &str) {
        let key = {
            let mut volumes = self.volumes.write().expect("lock poisoned");
            match volumes.remove(volume) {
                Some(k) if !volumes.values().any(|v| *v == k) => k,
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

    /// `STORE/NAME` of an image given as an image volume's name or as `STORE/NAME`.
    pub fn key(&self, image: &str) -> anyhow::Result<(String, String)> {
        if let Some(key) = self.volumes.read().expect("lock poisoned").get(image) {
            let (s, n) = key.split_once('/').expect("keys are STORE/NAME");
            return Ok((s.to_string(), n.to_string()));
        }
        match image.split_once('/') {
            Some((s, n)) if !s.is_empty() && !n.is_empty() => {
                self.opener.store(s)?;
                strata_pagestore::check_name(n)?;
                Ok((s.to_string(), n.to_string()))
            }
            _ => bail!(
                "{image:?} is neither an image volume nor STORE/IMAGE (stores: {})",
                self.opener.store_names().join(", ")
            ),
        }
    }

    pub fn store(&self, store: &str) -> anyhow::Result<Arc<PageStore>> {
        Ok(self.opener.store(store)?)
    }

    /// The image `STORE/NAME`, opening it if it is not open; `create` makes a missing one.
    pub async fn image(
        &self,
        store: &str,
        name: &str,
        create: Option<(u64, u32)>,
    ) -> anyhow::Result<Arc<Image>> {
        let key = format!("{store}/{name}");
        let mut open = self.open.lock().await;
        if let Some(i) = open.get(&key) {
            let page = u64::from(strata_bdev::BlockDevice::geometry(&**i).block_size);
            if let Some((_, bits)) = create.filter(|(_, b)| 1u64 << b != page) {
                bail!(
                    "image {name} exists with pages of {page} bytes; asked for pages of {} bytes",
                    1u64 << bits
                );
            }
            return Ok(i.clone());
        }
        let i = Arc::new(self.store(store)?.open(name, create).await?);
        open.insert(key, i.clone());
        Ok(i)
    }

    /// The open image `STORE/NAME`, if it is open.
    pub async fn if_open(&self, store: &str, name: &str) -> Option<Arc<Image>> {
        self.open
            .lock()
            .await
            .get(&format!("{store}/{name}"))
            .cloned()
    }

    /// Close an image that is about to be deleted: refused if it is a volume or clients use it.
    pub async fn close(&self, store: &str, name: &str) -> anyhow::Result<()> {
        let key = format!("{store}/{name}");
        if self
            .volumes
            .read()
            .expect("lock poisoned")
            .values()
            .any(|k| *k == key)
        {
            bail!("image {key} is a configured volume; remove it from the configuration first");
        }
        let mut open = self.open.lock().await;
        if let Some(i) = open.get(&key) {
            // Ours plus the map's: anything more is a client's connection.
            if Arc::strong_count(i) > 1 {
                bail!("image {key} is in use by clients; disconnect them first");
            }
            if let Some(Ok(image)) = open.remove(&key).map(Arc::try_unwrap) {
                image.close().await;
            }
        }
        open.retain(|k, _| !k.starts_with(&format!("{key}@")));
        Ok(())
    }

    /// Snapshot `snap` of `STORE/NAME`, read-only.
    async fn snapshot(&self, store: &str, name: &str, snap: &str) -> anyhow::Result<Arc<Image>> {
        let key = format!("{store}/{name}@{snap}");
        let mut open = self.open.lock().await;
        if let Some(i) = open.get(&key) {
            return Ok(i.clone());
        }
        let i = Arc::new(self.store(store)?.open_snapshot(name, snap).await?);
        open.insert(key, i.clone());
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

    /// Whether a snapshot is open (exported to a client, or was).
    pub async fn snapshot_open(&self, store: &str, name: &str, snap: &str) -> bool {
        let key = format!("{store}/{name}@{snap}");
        self.open
            .lock()
            .await
            .get(&key)
            .is_some_and(|i| Arc::strong_count(i) > 1)
    }

    /// Drop a deleted snapshot from the open ones.
    pub async fn forget_snapshot(&self, store: &str, name: &str, snap: &str) {
        self.open
            .lock()
            .await
            .remove(&format!("{store}/{name}@{snap}"));
    }

    fn export(name: &str, image: Arc<Image>, writable: bool) -> Arc<Export> {
        Arc::new(Export {
            name: name.to_string(),
            description: String::new(),
            device: image.clone(),
            read_only: !writable,
            transactions: writable.then_some(image as Arc<dyn strata_bdev::Transactional>),
        })
    }

    async fn resolve_name(&self, name: &str) -> anyhow::Result<Option<Resolved>> {
        if let Some(jwt) = &self.jwt {
            if looks_like_jwt(name) {
                let claims = jwt.verify(name)?;
                let bits = claims.page_size_bits;
                let image = self
                    .image(
                        &jwt.store,
                        &claims.image_id,
                        Some((claims.image_size, bits)),
                    )
                    .await
                    .map_err(|e| anyhow!("image {}: {e:#}", claims.image_id))?;
                return Ok(Some(Resolved {
                    export: Self::export(&claims.image_id, image, true),
                    client_id: claims.client_id,
                }));
            }
        }
        if !self.serve_images {
            return Ok(None);
        }
        let (image, snap) = match name.split_once('@') {
            Some((i, s)) => (i, Some(s)),
            None => (name, None),
        };
        if snap.is_none() && !image.contains('/') {
            return Ok(None);
        }
        let Ok((store, image_name)) = self.key(image) else {
            return Ok(None);
        };
        let export = match snap {
            Some(s) => Self::export(name, self.snapshot(&store, &image_name, s).await?, false),
            None => Self::export(name, self.image(&store, &image_name, None).await?, true),
        };
        Ok(Some(Resolved {
            export,
            client_id: None,
        }))
    }
}

#[async_trait]
impl Resolver for Images {
    async fn resolve(&self, name: &str) -> Result<Option<Resolved>, String> {
        self.resolve_name(name).await.map_err(|e| format!("{e:#}"))
    }
}

fn looks_like_jwt(name: &str) -> bool {
    name.split('.').count() == 3
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && name.starts_with("eyJ")
}

/// Verifies access tokens: HS256 JWTs (RFC 7519) as the MVPS transaction engine takes them.
#[derive(Debug)]
pub struct Jwt {
    key: ring::hmac::Key,
    store: String,
}

/// What a token grants.
#[derive(Debug, serde::Deserialize)]
pub struct Claims {
    pub image_id: String,
    pub image_size: u64,
    pub page_size_bits: u32,
    pub exp: u64,
    #[serde(default)]
    pub client_id: Option<String>,
}

impl Jwt {
    pub fn new(secret: &[u8], store: &str) -> Jwt {
        Jwt {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            store: store.to_string(),
        }
    }

    /// Check a token's form, signature, expiry and claims.
    pub fn verify(&self, token: &str) -> anyhow::Result<Claims> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("access token: not a JWT (three base64url parts)");
        };
        let header: serde_json::Value = b64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| anyhow!("access token: malformed header"))?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
            bail!("access token: only HS256-signed tokens are accepted");
        }
        let sig = b64
            .decode(sig)
            .map_err(|_| anyhow!("access token: malformed signature"))?;
        ring::hmac::verify(&self.key, format!("{h}.{p}").as_bytes(), &sig)
            .map_err(|_| anyhow!("access token: bad signature (signed with another secret?)"))?;
        let payload = b64
            .decode(p)
            .map_err(|_| anyhow!("access token: malformed payload"))?;
        let c: Claims =
            serde_json::from_slice(&payload).map_err(|e| anyhow!("access token: claims: {e}"))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if c.exp <= now {
            bail!("access token: expired at {} (now {now})", c.exp);
        }
        let stem = c.image_id.strip_suffix(".mvps-image").unwrap_or("");
        let ok = (1..=64).contains(&stem.len())
            && stem
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
        if !ok {
            bail!(
                "access token: image_id {:?} must be 1 to 64 of A-Z a-z 0-9 - _ followed by .mvps-image",
                c.image_id
            );
        }
        if !(9..=16).contains(&c.page_size_bits) {
            bail!(
                "access token: page_size_bits {} must be 9 to 16",
                c.page_size_bits
            );
        }
        Ok(c)
    }
}
