//! The object store under the page store: a local directory or an S3-compatible service (through
//! the `object_store` crate), behind the few calls the page store makes, with request counters,
//! retries with backoff, and a fault-injecting wrapper for tests.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload};

/// A failed object-store request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ObjError {
    #[error("{0}: no such object")]
    NotFound(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    Other(String),
}

pub type ObjResult<T> = std::result::Result<T, ObjError>;

/// One object as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The key, relative to the store's prefix.
    pub key: String,
    pub size: u64,
    /// When it was last written, by the store's clock.
    pub modified: std::time::SystemTime,
}

/// Requests made, for logs, metrics and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    pub gets: AtomicU64,
    pub puts: AtomicU64,
    pub lists: AtomicU64,
    pub deletes: AtomicU64,
    pub bytes_got: AtomicU64,
    pub bytes_put: AtomicU64,
    pub errors: AtomicU64,
    pub retries: AtomicU64,
}

impl Stats {
    /// `(gets, puts, lists, deletes, errors, retries)`.
    pub fn counts(&self) -> [u64; 6] {
        [
            self.gets.load(Ordering::Relaxed),
            self.puts.load(Ordering::Relaxed),
            self.lists.load(Ordering::Relaxed),
            self.deletes.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.retries.load(Ordering::Relaxed),
        ]
    }
}

/// The calls the page store makes. Keys are relative to the store's prefix.
#[async_trait]
pub trait Objects: Send + Sync + fmt::Debug + 'static {
    async fn get(&self, key: &str) -> ObjResult<Bytes>;
    async fn get_range(&self, key: &str, range: Range<u64>) -> ObjResult<Bytes>;
    /// Object size.
    async fn size(&self, key: &str) -> ObjResult<u64>;
    async fn put(&self, key: &str, data: Bytes) -> ObjResult<()>;
    /// Create `key` only if it does not exist ([`ObjError::AlreadyExists`] otherwise).
    async fn put_create(&self, key: &str, data: Bytes) -> ObjResult<()>;
    /// The objects under `prefix`.
    async fn list(&self, prefix: &str) -> ObjResult<Vec<Listed>>;
    async fn delete(&self, key: &str) -> ObjResult<()>;
    fn stats(&self) -> &Stats;
    /// Where `key` lives on this machine, if the store is a local directory: the page store
    /// then writes segments there itself (streamed into a staging file, renamed into place)
    /// and reads them with positioned reads, the kernel's page cache being the cache.
    /// `None` (remote stores, and wrappers that must see every request): every access goes
    /// through the calls above.
    fn local_path(&self, key: &str) -> Option<PathBuf> {
        let _ = key;
        None
    }
}

/// Where images live. Serialized (for the daemon's state store) as an object tagged by
/// `kind`: `{"kind": "dir", "path": …}` or `{"kind": "s3", "bucket": …, …}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StoreConfig {
    /// A local directory (created if missing).
    Dir { path: PathBuf },
    /// An S3-compatible service. Missing credentials are taken from `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`.
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

/// [`Objects`] over an `object_store` implementation.
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The directory, for a directory store.
    root: Option<PathBuf>,
    prefix: String,
    describe: String,
    stats: Stats,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe)
    }
}

fn map_err(key: &str, e: object_store::Error) -> ObjError {
    match e {
        object_store::Error::NotFound { .. } => ObjError::NotFound(key.to_string()),
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            ObjError::AlreadyExists(key.to_string())
        }
        e => ObjError::Other(format!("{key}: {e}")),
    }
}

impl Store {
    /// Open the store `config` describes.
    pub fn open(config: &StoreConfig) -> Result<Store, String> {
        match config {
            StoreConfig::Dir { path } => {
                std::fs::create_dir_all(path)
                    .map_err(|e| format!("create object directory {}: {e}", path.display()))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(path)
                    .map_err(|e| format!("open object directory {}: {e}", path.display()))?
                    .with_fsync(true);
                Ok(Store {
                    inner: Arc::new(fs),
                    root: Some(path.clone()),
                    prefix: String::new(),
                    describe: format!("directory {}", path.display()),
                    stats: Stats::default(),
                })
            }
            StoreConfig::S3 {
                endpoint,
                region,
                bucket,
                prefix,
                access_key_id,
                secret_access_key,
            } => {
                // reqwest builds a TLS configuration even for http:// endpoints.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let key = access_key_id
                    .clone()
                    .or_else(|| std::env::var("AWS_ACCESS_KEY_ID").ok());
                let secret = secret_access_key
                    .clone()
                    .or_else(|| std::env::var("AWS_SECRET_ACCESS_KEY").ok());
                let (Some(key), Some(secret)) = (key, secret) else {
                    return Err(format!(
                        "S3 bucket {bucket}: no credentials: set access_key_id and \
                         secret_access_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                    ));
                };
                let mut b = object_store::aws::AmazonS3Builder::new()
                    .with_region(region)
                    .with_bucket_name(bucket)
                    .with_access_key_id(key)
                    .with_secret_access_key(secret)
                    .with_retry(object_store::RetryConfig {
                        max_retries: 2,
                        retry_timeout: Duration::from_secs(20),
                        backoff: Default::default(),
                    });
                if let Some(ep) = endpoint {
                    b = b
                        .with_endpoint(ep)
                        .with_allow_http(ep.starts_with("http://"));
                }
                let s3 = b.build().map_err(|e| format!("S3 bucket {bucket}: {e}"))?;
                let prefix = prefix.trim_matches('/').to_string();
                Ok(Store {
                    inner: Arc::new(s3),
                    root: None,
                    describe: format!(
                        "s3://{bucket}/{prefix} at {}",
                        endpoint.as_deref().unwrap_or("AWS")
                    ),
                    prefix,
                    stats: Stats::default(),
                })
            }
        }
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn err(&self, key: &str, e: object_store::Error) -> ObjError {
        let e = map_err(key, e);
        if matches!(e, ObjError::Other(_)) {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        e
    }
}

#[async_trait]
impl Objects for Store {
    async fn get(&self, key: &str) -> ObjResult<Bytes> {
        self.stats.gets.fetch_add(1, Ordering::Relaxed);
        let r = self.inner.get(&self.path(key)).await;
        let b = match r {
            Ok(r) => r.bytes().await.map_err(|e| self.err(key, e))?,
            Err(e) => return Err(self.err(key, e)),
        };
        self.stats
            .bytes_got
            .fetch_add(b.len() as u64, Ordering::Relaxed);
        Ok(b)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> ObjResult<Bytes> {
        self.stats.gets.fetch_add(1, Ordering::Relaxed);
        let want = range.end - range.start;
        let b = self
            .inner
            .get_range(&self.path(key), range)
            .await
            .map_err(|e| self.err(key, e))?;
        if b.len() as u64 != want {
            return Err(ObjError::Other(format!(
                "{key}: asked for {want} bytes, got {} (the object is truncated)",
                b.len()
            )));
        }
        self.stats
            .bytes_got
            .fetch_add(b.len() as u64, Ordering::Relaxed);
        Ok(b)
    }

    async fn size(&self, key: &str) -> ObjResult<u64> {
        self.stats.gets.fetch_add(1, Ordering::Relaxed);
        let m = self
            .inner
            .head(&self.path(key))
            .await
            .map_err(|e| self.err(key, e))?;
        Ok(m.size)
    }

    async fn put(&self, key: &str, data: Bytes) -> ObjResult<()> {
        self.stats.puts.fetch_add(1, Ordering::Relaxed);
        let n = data.len() as u64;
        self.inner
            .put(&self.path(key), PutPayload::from_bytes(data))
            .await
            .map_err(|e| self.err(key, e))?;
        self.stats.bytes_put.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    async fn put_create(&self, key: &str, data: Bytes) -> ObjResult<()> {
        self.stats.puts.fetch_add(1, Ordering::Relaxed);
        let n = data.len() as u64;
        self.inner
            .put_opts(
                &self.path(key),
                PutPayload::from_bytes(data),
                PutMode::Create.into(),
            )
            .await
            .map_err(|e| self.err(key, e))?;
        self.stats.bytes_put.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> ObjResult<Vec<Listed>> {
        self.stats.lists.fetch_add(1, Ordering::Relaxed);
        let p = self.path(prefix.trim_end_matches('/'));
        let metas: Vec<_> = self
            .inner
            .list(Some(&p))
            .try_collect()
            .await
            .map_err(|e| self.err(prefix, e))?;
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        Ok(metas
            .into_iter()
            .map(|m| Listed {
                key: m.location.as_ref()[strip..].to_string(),
                size: m.size,
                modified: m.last_modified.into(),
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> ObjResult<()> {
        self.stats.deletes.fetch_add(1, Ordering::Relaxed);
        match self.inner.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(key, e)),
        }
    }

    fn stats(&self) -> &Stats {
        &self.stats
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.root.as_ref().map(|r| r.join(key))
    }
}

/// Fails or delays a fraction of requests (tests).
#[derive(Debug)]
pub struct FaultyObjects {
    inner: Arc<dyn Objects>,
    /// Out of 1000 requests, how many fail.
    pub fail_per_mille: AtomicU64,
    /// Delay added to every request, in microseconds.
    pub delay_us: AtomicU64,
    counter: AtomicU64,
}

impl FaultyObjects {
    pub fn new(inner: Arc<dyn Objects>) -> FaultyObjects {
        FaultyObjects {
            inner,
            fail_per_mille: AtomicU64::new(0),
            delay_us: AtomicU64::new(0),
            counter: AtomicU64::new(0),
        }
    }

    async fn gate(&self, key: &str) -> ObjResult<()> {
        let d = self.delay_us.load(Ordering::Relaxed);
        if d > 0 {
            tokio::time::sleep(Duration::from_micros(d)).await;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // Spread failures evenly: request n fails when the running share falls behind.
        let rate = self.fail_per_mille.load(Ordering::Relaxed);
        if rate > 0 && (n * rate / 1000) != ((n + 1) * rate / 1000) {
            self.inner.stats().errors.fetch_add(1, Ordering::Relaxed);
            return Err(ObjError::Other(format!(
                "{key}: injected object-store failure"
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Objects for FaultyObjects {
    async fn get(&self, key: &str) -> ObjResult<Bytes> {
        self.gate(key).await?;
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> ObjResult<Bytes> {
        self.gate(key).await?;
        self.inner.get_range(key, range).await
    }
    async fn size(&self, key: &str) -> ObjResult<u64> {
        self.gate(key).await?;
        self.inner.size(key).await
    }
    async fn put(&self, key: &str, data: Bytes) -> ObjResult<()> {
        self.gate(key).await?;
        self.inner.put(key, data).await
    }
    async fn put_create(&self, key: &str, data: Bytes) -> ObjResult<()> {
        self.gate(key).await?;
        self.inner.put_create(key, data).await
    }
    async fn list(&self, prefix: &str) -> ObjResult<Vec<Listed>> {
        self.gate(prefix).await?;
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> ObjResult<()> {
        self.gate(key).await?;
        self.inner.delete(key).await
    }
    fn stats(&self) -> &Stats {
        self.inner.stats()
    }
}

/// Retry `op` on [`ObjError::Other`] with exponential backoff (50 ms doubling to 5 s), up to
/// `attempts` times (`u32::MAX`: until it succeeds or `give_up` says so).
pub async fn retry<T, F, Fut>(
    objects: &dyn Objects,
    what: &str,
    attempts: u32,
    give_up: impl Fn() -> bool,
    mut op: F,
) -> ObjResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ObjResult<T>>,
{
    let mut delay = Duration::from_millis(50);
    let mut tried = 0u32;
    loop {
        match op().await {
            Err(ObjError::Other(e)) if tried + 1 < attempts && !give_up() => {
                tried += 1;
                objects.stats().retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, attempt = tried, retry_in = ?delay, "{what}: object store request failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            r => return r,
        }
    }
}
