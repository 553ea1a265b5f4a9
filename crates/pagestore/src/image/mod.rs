//! An image: a virtual disk whose pages live in the write buffer until a checkpoint moves them
//! into segment objects named by a new manifest version.
//!
//! ```text
//!  write ─► WAL (append; FLUSH/FUA: commit + fdatasync) ─► answer
//!  read  ─► WAL generations, newest first ─► page map of the manifest (segment, slot) ─► zeroes
//!  checkpoint task: rotate WAL ─► segment objects ─► manifest v+1 (create-only: fencing)
//!                   ─► page map updated ─► WAL generation deleted; compaction when too many segments
//! ```
//!
//! The page map holds, for every page the manifest maps, where its newest version is (one
//! hash-map entry: about 32 bytes per mapped page). Segment indexes are read once, at open and
//! when a segment is made, and not kept.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use strata_bdev::{
    check_io, BlockDevice, Capabilities, Error, ErrorKind, Extent, Geometry, Result, WriteOpts,
    ZeroOpts,
};
use tokio::sync::Notify;

use crate::cache::{BlockKey, Cache, DiskCache};
use crate::failpoint::failpoint;
use crate::format::{self, Entry, Manifest, SegmentBuilder, SegmentRef, FOOTER_LEN, TOMBSTONE};
use crate::objects::{retry, ObjError, Objects};
use crate::wal::{Loc, Wal};

mod admin;
mod txn;
pub use txn::Transaction;
pub(crate) use txn::Versions;

/// Tunables of the page store.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Checkpoint when the active write-buffer generation holds this many bytes (default 64 MiB).
    pub checkpoint_bytes: u64,
    /// Checkpoint buffered writes at least this often (default 30 s).
    pub checkpoint_age: Duration,
    /// Largest segment object, in bytes of page data (default 32 MiB).
    pub segment_bytes: u64,
    /// Writes wait while the write buffer holds more than this (default 512 MiB).
    pub max_buffered_bytes: u64,
    /// Compact when an image has more segments than this (default 24).
    pub max_segments: usize,
    /// Bytes of segment data cached in memory, per image (default 64 MiB).
    pub cache_bytes: u64,
    /// The unit of the read cache and of reads from segments: a miss fetches the aligned block
    /// of this many bytes around it (default 64 KiB; at least one page).
    pub cache_block_bytes: u64,
    /// Bytes of segment data cached in a local file, per image (default 0: no disk tier).
    pub disk_cache_bytes: u64,
    /// Directory of the disk tier's files (`NAME.cache`); default: the image's write-buffer
    /// directory.
    pub disk_cache_dir: Option<PathBuf>,
    /// A transaction open longer than this is rolled back (default 60 s); it bounds how long
    /// one holds the image's write lock.
    pub txn_timeout: Duration,
    /// Bytes a transaction may write before it commits (default 64 MiB).
    pub max_txn_bytes: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            checkpoint_bytes: 64 << 20,
            checkpoint_age: Duration::from_secs(30),
            segment_bytes: 32 << 20,
            max_buffered_bytes: 512 << 20,
            max_segments: 24,
            cache_bytes: 64 << 20,
            cache_block_bytes: 64 << 10,
            disk_cache_bytes: 0,
            disk_cache_dir: None,
            txn_timeout: Duration::from_secs(60),
            max_txn_bytes: 64 << 20,
        }
    }
}

/// A page store: an object store for images and a local directory for their write buffers.
#[derive(Debug, Clone)]
pub struct PageStore {
    pub objects: Arc<dyn Objects>,
    pub buffer_dir: PathBuf,
    pub settings: Settings,
}

/// Where a page of the manifest lives.
#[derive(Debug, Clone, Copy)]
struct SegLoc {
    seg: u32,
    slot: u32,
    crc: u32,
}

/// A segment of the manifest: its object key and the length of its page data.
#[derive(Debug)]
struct SegInfo {
    key: String,
    data_len: u64,
}

#[derive(Debug)]
struct Base {
    manifest: Manifest,
    /// Segment ids of the manifest, oldest first.
    order: Vec<u32>,
    segs: HashMap<u32, Arc<SegInfo>>,
    next_seg: u32,
    map: HashMap<u64, SegLoc>,
}

impl Base {
    /// Give a segment an id and map its entries (newer than every entry mapped so far).
    fn add_segment(&mut self, seg: Arc<SegInfo>, entries: Vec<Entry>) -> u32 {
        let id = self.next_seg;
        self.next_seg += 1;
        self.segs.insert(id, seg);
        for e in entries {
            let loc = SegLoc {
                seg: id,
                slot: e.slot,
                crc: e.crc,
            };
            self.map.insert(e.page, loc);
        }
        id
    }
}

/// Builds segment objects from pages and uploads each once it holds `segment_bytes`.
///
/// An operation that uploads several segments before it publishes them holds a *lease*
/// (`images/NAME/leases/STEM`, refreshed while it works): garbage collection leaves the
/// segments of a live lease alone, however long ago the first was written.
struct SegmentSink<'a> {
    inner: &'a Inner,
    builder: SegmentBuilder,
    /// Key of the segments, relative to the image, before the part number.
    stem: String,
    made: Vec<(SegmentRef, Vec<Entry>)>,
    /// The lease, if the operation takes one, and when it was last written.
    lease: Option<(String, Option<Instant>)>,
}

/// A lease is refreshed this often while its operation uploads.
pub(crate) const LEASE_REFRESH: Duration = Duration::from_secs(60);
/// A lease not refreshed for this long is dead (its operation crashed or failed).
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(600);

impl<'a> SegmentSink<'a> {
    fn new(inner: &'a Inner, stem: String) -> SegmentSink<'a> {
        SegmentSink {
            inner,
            builder: SegmentBuilder::new(inner.page_size),
            stem,
            made: Vec::new(),
            lease: None,
        }
    }

    /// Hold a lease on the segments while they await their manifest.
    fn leased(mut self) -> SegmentSink<'a> {
        let name = self.stem.trim_start_matches("segments/");
        self.lease = Some((format!("images/{}/leases/{name}", self.inner.name), None));
        self
    }

    async fn refresh_lease(&mut self) -> Result<()> {
        let Some((key, last)) = &mut self.lease else {
            return Ok(());
        };
        if last.is_some_and(|t| t.elapsed() < LEASE_REFRESH) {
            return Ok(());
        }
        let objects = &*self.inner.store.objects;
        let body = Bytes::from(format!("{{\"writer\":\"{}\"}}", self.inner.writer));
        retry(
            objects,
            "write lease",
            u32::MAX,
            || self.inner.give_up(),
            || objects.put(key, body.clone()),
        )
        .await
        .map_err(|e| obj_err(&format!("image {}: lease", self.inner.name), e))?;
        *last = Some(Instant::now());
        Ok(())
    }

    /// Upload what is built if it is full, or (`last`) if it holds anything.
    async fn cut(&mut self, last: bool) -> Result<()> {
        let full = self.builder.data_len() as u64 >= self.inner.store.settings.segment_bytes;
        if self.builder.is_empty() || !(full || last) {
            return Ok(());
        }
        self.refresh_lease().await?;
        let done = std::mem::replace(&mut self.builder, SegmentBuilder::new(self.inner.page_size));
        let (object, entries) = done.finish(self.inner.page_bits);
        let key = format!("{}-{}.seg", self.stem, self.made.len());
        let r = self.inner.put_segment(key, object, &entries).await?;
        self.made.push((r, entries));
        Ok(())
    }

    /// Upload the rest; the segments made, in order. Keeps the lease until
    /// [`release`](Self::release), after their manifest is published.
    async fn finish(&mut self) -> Result<Vec<(SegmentRef, Vec<Entry>)>> {
        self.cut(true).await?;
        self.refresh_lease().await?;
        Ok(std::mem::take(&mut self.made))
    }

    /// Drop the lease (the segments are in a published manifest, or abandoned).
    async fn release(self) {
        if let Some((key, Some(_))) = &self.lease {
            let objects = &*self.inner.store.objects;
            if let Err(e) = objects.delete(key).await {
                tracing::warn!(image = %self.inner.name, lease = %key, error = %e,
                    "drop lease; garbage collection drops it once it is stale");
            }
        }
    }
}

/// Counters for one image.
#[derive(Debug, Default)]
pub struct ImageStats {
    pub checkpoints: AtomicU64,
    pub compactions: AtomicU64,
    /// Pages read from cached blocks in memory.
    pub cache_hits: AtomicU64,
    /// Pages read from cached blocks in the disk tier.
    pub disk_cache_hits: AtomicU64,
    /// Pages fetched from the object store.
    pub cache_misses: AtomicU64,
}

struct Inner {
    name: String,
    store: PageStore,
    page_bits: u32,
    page_size: usize,
    /// Bytes; changes with a resize.
    size: AtomicU64,
    /// The write buffer; `None` for a read-only snapshot.
    wal: Option<Wal>,
    /// Which snapshot this read-only view shows, if it is one.
    snapshot: Option<String>,
    base: RwLock<Base>,
    cache: Mutex<Cache>,
    disk_cache: Option<DiskCache>,
    /// Blocks being fetched, so that concurrent readers share one GET.
    inflight: Mutex<HashMap<BlockKey, tokio::sync::watch::Receiver<()>>>,
    /// Where the last read ended, to recognize sequential streams.
    last_read_end: AtomicU64,
    /// Bytes per cache block (a multiple of the page size).
    block_bytes: u64,
    writer: String,
    fenced: Mutex<Option<String>>,
    kick: Notify,
    progress: Notify,
    closed: AtomicBool,
    /// When the active generation last became non-empty (or was last checkpointed).
    last_checkpoint: Mutex<Instant>,
    checkpointing: tokio::sync::Mutex<()>,
    /// Held from computing a manifest version to publishing it and updating the page map:
    /// checkpoints and a compaction running alongside take turns.
    publishing: tokio::sync::Mutex<()>,
    compacting: tokio::sync::Mutex<()>,
    /// The compaction running in the background, if any.
    compaction: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Plain writes hold it shared; a transaction commits, and a resize runs, holding it alone.
    writers: Arc<tokio::sync::RwLock<()>>,
    /// Open transactions and the versions they still read.
    txns: Mutex<Versions>,
    /// Open transactions (read without the lock on the write path).
    open_txns: AtomicU64,
    stats: ImageStats,
}

/// A page-store image, as a block device. Dropping it stops its checkpoint task; what is
/// buffered stays in the write buffer for the next open.
pub struct Image {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "image {}", self.inner.name)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.progress.notify_waiters();
        self.task.abort();
        self.inner.stop_compaction();
    }
}

pub(crate) fn manifest_key(name: &str, version: u64) -> String {
    format!("images/{name}/manifest/{version:020}")
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn seg_info(image: &str, r: &SegmentRef, page_bits: u32) -> Arc<SegInfo> {
    Arc::new(SegInfo {
        key: format!("images/{image}/{}", r.key),
        data_len: r.pages << page_bits,
    })
}

fn obj_err(what: &str, e: ObjError) -> Error {
    Error::new(ErrorKind::Io, format!("{what}: object store: {e}"))
}

/// Check an image name: it becomes part of object keys and a directory name.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!("image name {name:?}: use 1 to 200 of A-Z a-z 0-9 - _ . (not starting with .)"),
        ))
    }
}

/// The manifest versions of `name` in the store, oldest first.
pub(crate) async fn manifest_versions(objects: &dyn Objects, name: &str) -> Result<Vec<u64>> {
    let prefix = format!("images/{name}/manifest/");
    let keys = retry(
        objects,
        "list manifests",
        5,
        || false,
        || objects.list(&prefix),
    )
    .await
    .map_err(|e| obj_err(&format!("list versions of image {name}"), e))?;
    let mut v: Vec<u64> = keys
        .iter()
        .filter_map(|o| o.key.strip_prefix(&prefix)?.parse::<u64>().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Manifest `version` of `name`.
pub(crate) async fn read_manifest(
    objects: &dyn Objects,
    name: &str,
    version: u64,
) -> Result<Manifest> {
    let key = manifest_key(name, version);
    let bytes = retry(objects, "read manifest", 5, || false, || objects.get(&key))
        .await
        .map_err(|e| obj_err(&format!("read version {version} of image {name}"), e))?;
    Manifest::decode(&key, &bytes).map_err(|e| Error::new(ErrorKind::Io, e.to_string()))
}

/// The newest manifest of `name`, if the image exists.
pub(crate) async fn latest_manifest(objects: &dyn Objects, name: &str) -> Result<Option<Manifest>> {
    match manifest_versions(objects, name).await?.last() {
        None => Ok(None),
        Some(&v) => read_manifest(objects, name, v).await.map(Some),
    }
}

/// Clones of clones are followed this deep at most.
const MAX_CHAIN: usize = 32;

/// The manifests `manifest` reads through to: its base, its base's base, …, nearest first.
pub(crate) async fn base_chain(
    objects: &dyn Objects,
    manifest: &Manifest,
) -> Result<Vec<Manifest>> {
    let mut chain: Vec<Manifest> = Vec::new();
    let mut next = manifest.base.clone();
    while let Some(b) = next {
        if chain.len() >= MAX_CHAIN {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "image {}: clones are nested more than {MAX_CHAIN} deep; flatten one",
                    manifest.image
                ),
            ));
        }
        let m = read_manifest(objects, &b.image, b.version)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Io,
                    format!(
                    "image {} is a clone of snapshot {}@{} (version {}), which cannot be read: {}",
                    manifest.image,
                    b.image,
                    b.snapshot,
                    b.version,
                    e.chain()
                ),
                )
            })?;
        next = m.base.clone();
        chain.push(m);
    }
    Ok(chain)
}

/// The page map of `manifest`: the pages of its base chain (oldest ancestor first), then its
/// own segments on top. Only its own segments are in `order` (compaction never touches a base).
async fn load_base(objects: &dyn Objects, manifest: Manifest) -> Result<Base> {
    let chain = base_chain(objects, &manifest).await?;
    let mut base = Base {
        order: Vec::new(),
        segs: HashMap::new(),
        next_seg: 0,
        map: HashMap::new(),
        manifest,
    };
    let levels: Vec<&Manifest> = chain.iter().rev().chain([&base.manifest]).collect();
    let wanted: Vec<(String, u64)> = levels
        .iter()
        .flat_map(|m| {
            m.segments
                .iter()
                .map(|s| (format!("images/{}/{}", m.image, s.key), s.size))
        })
        .collect();
    let mut indexes = futures_util::stream::iter(wanted)
        .map(|(key, size)| async move { read_index(objects, &key, size).await })
        .buffered(8)
        .try_collect::<Vec<Vec<Entry>>>()
        .await?
        .into_iter();
    let own = levels.len() - 1;
    // A base page is visible only below every size the versions above it have had since: a
    // shrink in between (recorded as the smaller size of a snapshot) hides it for good. The
    // image's own entries are all kept, tombstones beyond its end included: they hide base
    // pages should it grow again.
    let mut limits: Vec<u64> = levels
        .iter()
        .map(|m| m.image_size >> m.page_size_bits)
        .collect();
    for i in (0..own).rev() {
        limits[i] = limits[i].min(limits[i + 1]);
    }
    limits[own] = u64::MAX;
    let mut added = Vec::new();
    for (level, m) in levels.iter().enumerate() {
        let level_pages = limits[level];
        for s in &m.segments {
            let entries: Vec<Entry> = indexes
                .next()
                .expect("one index per segment")
                .into_iter()
                .filter(|e| e.page < level_pages)
                .collect();
            added.push((
                level == own,
                seg_info(&m.image, s, m.page_size_bits),
                entries,
            ));
        }
    }
    for (own, info, entries) in added {
        let id = base.add_segment(info, entries);
        if own {
            base.order.push(id);
        }
    }
    Ok(base)
}

/// Read a segment's index: footer, then index, with ranged GETs.
async fn read_index(objects: &dyn Objects, key: &str, size: u64) -> Result<Vec<Entry>> {
    if size < FOOTER_LEN {
        return Err(Error::new(
            ErrorKind::Io,
            format!("segment {key}: only {size} bytes"),
        ));
    }
    let tail = retry(
        objects,
        "read segment footer",
        5,
        || false,
        || objects.get_range(key, size - FOOTER_LEN..size),
    )
    .await
    .map_err(|e| obj_err("read segment footer", e))?;
    let footer =
        format::parse_footer(key, &tail).map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
    let range = footer.index_range();
    if range.end > size - FOOTER_LEN {
        return Err(Error::new(
            ErrorKind::Io,
            format!("segment {key}: index beyond its end"),
        ));
    }
    let index = retry(
        objects,
        "read segment index",
        5,
        || false,
        || objects.get_range(key, range.clone()),
    )
    .await
    .map_err(|e| obj_err("read segment index", e))?;
    format::parse_index(key, &footer, &index).map_err(|e| Error::new(ErrorKind::Io, e.to_string()))
}

/// Check a size and page size for a new image (or a resize).
pub(crate) fn check_geometry(size: u64, bits: u32) -> Result<()> {
    if !(9..=16).contains(&bits) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("page size 2^{bits}: must be 512 bytes to 64 KiB"),
        ));
    }
    if size == 0 || !size.is_multiple_of(1u64 << bits) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "image size {size} must be a positive multiple of the page size {}",
                1u64 << bits
            ),
        ));
    }
    Ok(())
}

impl PageStore {
    /// Open image `name`. With `create` (size, page-size bits) a missing image is created;
    /// an existing one must match it.
    pub async fn open(&self, name: &str, create: Option<(u64, u32)>) -> Result<Image> {
        check_name(name)?;
        let objects = &*self.objects;
        let manifest = match latest_manifest(objects, name).await? {
            Some(m) => {
                if let Some((size, bits)) = create {
                    if m.page_size_bits != bits {
                        return Err(Error::new(
                            ErrorKind::InvalidInput,
                            format!(
                                "image {name} exists with pages of {} bytes; asked for pages \
                                 of {} bytes",
                                1u64 << m.page_size_bits,
                                1u64 << bits
                            ),
                        ));
                    }
                    if m.image_size != size {
                        // The size asked for is what a new image gets; an existing one keeps
                        // its own (it may have been resized).
                        tracing::info!(
                            image = name,
                            size = m.image_size,
                            asked = size,
                            "image exists with another size; serving it at its size"
                        );
                    }
                }
                m
            }
            None => {
                let Some((size, bits)) = create else {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!("image {name} does not exist (give a size to create it)"),
                    ));
                };
                check_geometry(size, bits)?;
                let m = Manifest {
                    image: name.to_string(),
                    version: 1,
                    image_size: size,
                    page_size_bits: bits,
                    segments: Vec::new(),
                    wal_generation: 0,
                    writer: String::new(),
                    created: now_secs(),
                    base: None,
                };
                self.create_manifest(m).await?
            }
        };
        self.open_manifest(manifest, None).await
    }

    /// Publish version 1 of a new image; if someone created it meanwhile, theirs.
    pub(crate) async fn create_manifest(&self, m: Manifest) -> Result<Manifest> {
        let objects = &*self.objects;
        let key = manifest_key(&m.image, 1);
        match objects.put_create(&key, Bytes::from(m.encode())).await {
            Ok(()) => Ok(m),
            Err(ObjError::AlreadyExists(_)) => latest_manifest(objects, &m.image)
                .await?
                .ok_or_else(|| Error::new(ErrorKind::Io, "image vanished")),
            Err(e) => Err(obj_err(&format!("create image {}", m.image), e)),
        }
    }

    /// Open snapshot `snapshot` of image `name` as a read-only device.
    pub async fn open_snapshot(&self, name: &str, snapshot: &str) -> Result<Image> {
        check_name(name)?;
        check_name(snapshot)?;
        let rec = crate::versions::read_snapshot(&*self.objects, name, snapshot).await?;
        let m = read_manifest(&*self.objects, name, rec.version).await?;
        self.open_manifest(m, Some(snapshot.to_string())).await
    }

    /// Open the image `manifest` describes: writable with its write buffer, or (`snapshot`)
    /// a read-only view of exactly this version.
    async fn open_manifest(&self, manifest: Manifest, snapshot: Option<String>) -> Result<Image> {
        let name = manifest.image.clone();
        let base = load_base(&*self.objects, manifest.clone()).await?;
        let page_size = 1usize << manifest.page_size_bits;
        let dir = self.buffer_dir.join(&name);
        let wal = match snapshot {
            Some(_) => None,
            None => {
                let (wal, replayed) = Wal::open(&dir, page_size, manifest.wal_generation)?;
                for (g, r) in &replayed {
                    tracing::info!(
                        image = %name,
                        generation = g,
                        records = r.records,
                        dropped_bytes = r.dropped,
                        "write buffer replayed"
                    );
                }
                Some(wal)
            }
        };
        let block_bytes = self
            .settings
            .cache_block_bytes
            .next_multiple_of(page_size as u64)
            .max(page_size as u64);
        let disk_cache = match (self.settings.disk_cache_bytes, &snapshot) {
            (0, _) | (_, Some(_)) => None,
            (bytes, None) => {
                let path = match &self.settings.disk_cache_dir {
                    Some(d) => d.join(format!("{name}.cache")),
                    None => dir.join("read.cache"),
                };
                let made = match path.parent() {
                    Some(parent) => std::fs::create_dir_all(parent),
                    None => Ok(()),
                };
                let d = made
                    .and_then(|()| DiskCache::open(&path, bytes, block_bytes))
                    .map_err(|e| {
                        Error::with_source(
                            ErrorKind::Io,
                            format!("open image {name}: read cache file {}", path.display()),
                            e,
                        )
                    })?;
                Some(d)
            }
        };
        let writer = format!("{:016x}", rand::random::<u64>());
        let read_only = snapshot.is_some();
        let inner = Arc::new(Inner {
            name: name.clone(),
            store: self.clone(),
            page_bits: manifest.page_size_bits,
            page_size,
            size: AtomicU64::new(manifest.image_size),
            wal,
            snapshot,
            base: RwLock::new(base),
            cache: Mutex::new(Cache::new(self.settings.cache_bytes)),
            disk_cache,
            inflight: Mutex::new(HashMap::new()),
            last_read_end: AtomicU64::new(u64::MAX),
            block_bytes,
            writer,
            fenced: Mutex::new(None),
            kick: Notify::new(),
            progress: Notify::new(),
            closed: AtomicBool::new(false),
            last_checkpoint: Mutex::new(Instant::now()),
            checkpointing: tokio::sync::Mutex::new(()),
            publishing: tokio::sync::Mutex::new(()),
            compacting: tokio::sync::Mutex::new(()),
            compaction: Mutex::new(None),
            writers: Arc::new(tokio::sync::RwLock::new(())),
            txns: Mutex::new(Versions::default()),
            open_txns: AtomicU64::new(0),
            stats: ImageStats::default(),
        });
        tracing::info!(
            image = %name,
            version = manifest.version,
            segments = manifest.segments.len(),
            size = manifest.image_size,
            read_only,
            "image open"
        );
        let task = if read_only {
            tokio::spawn(async {})
        } else {
            let task = tokio::spawn(checkpointer(inner.clone()));
            if !inner.wal().is_ok_and(|w| w.frozen_ids().is_empty()) {
                inner.kick.notify_one();
            }
            task
        };
        Ok(Image { inner, task })
    }
}

/// The background task: checkpoints by size and age, compaction, retries.
async fn checkpointer(inner: Arc<Inner>) {
    loop {
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        inner.maybe_compact_in_background();
        let due = inner.wal().is_ok_and(|wal| {
            let (active, _) = wal.sizes();
            let age = inner.last_checkpoint.lock().expect("lock").elapsed();
            active >= inner.store.settings.checkpoint_bytes
                || (active > 0 && age >= inner.store.settings.checkpoint_age)
                || !wal.frozen_ids().is_empty()
        });
        if due && inner.fenced().is_none() {
            if let Err(e) = inner.checkpoint().await {
                tracing::warn!(image = %inner.name, error = %e.chain(), "checkpoint");
            }
        }
        let tick = Duration::from_secs(1).min(inner.store.settings.checkpoint_age);
        let _ = tokio::time::timeout(tick, inner.kick.notified()).await;
    }
}

impl Inner {
    /// The write buffer, or the error a read-only snapshot answers writes with.
    fn wal(&self) -> Result<&Wal> {
        self.wal.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "snapshot {}@{} is read-only (clone it for a writable copy)",
                    self.name,
                    self.snapshot.as_deref().unwrap_or("?")
                ),
            )
        })
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            size: self.size(),
            block_size: self.page_size as u32,
            optimal_io_size: self.page_size.max(64 * 1024) as u32,
        }
    }

    fn fenced(&self) -> Option<String> {
        self.fenced.lock().expect("lock").clone()
    }

    fn check_fenced(&self, what: &str) -> Result<()> {
        match self.fenced() {
            None => Ok(()),
            Some(why) => Err(Error::new(
                ErrorKind::Io,
                format!("{what} image {}: {why}", self.name),
            )),
        }
    }

    fn give_up(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.fenced().is_some()
    }

    /// Move everything buffered so far into segments and a new manifest.
    async fn checkpoint(&self) -> Result<()> {
        let _turn = self.checkpointing.lock().await;
        let wal = self.wal()?;
        wal.rotate()?;
        *self.last_checkpoint.lock().expect("lock") = Instant::now();
        for g in wal.frozen_ids() {
            self.checkpoint_generation(g).await?;
            self.progress.notify_waiters();
        }
        Ok(())
    }

    fn too_many_segments(&self) -> bool {
        self.base.read().expect("lock").order.len() > self.store.settings.max_segments
    }

    /// Compact, unless a compaction is running already.
    async fn compact_now(&self) -> Result<()> {
        let _turn = self.compacting.lock().await;
        if self.too_many_segments() {
            self.compact().await?;
        }
        Ok(())
    }

    /// Start a compaction in its own task when segments pile up, so that checkpoints (and
    /// the writes waiting for them) go on meanwhile.
    fn maybe_compact_in_background(self: &Arc<Inner>) {
        if !self.too_many_segments() || self.fenced().is_some() {
            return;
        }
        let mut task = self.compaction.lock().expect("lock");
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let inner = self.clone();
        *task = Some(tokio::spawn(async move {
            if let Err(e) = inner.compact_now().await {
                tracing::warn!(image = %inner.name, error = %e.chain(), "compaction");
            }
        }));
    }

    fn stop_compaction(&self) {
        if let Some(t) = self.compaction.lock().expect("lock").take() {
            t.abort();
        }
    }

    /// Upload `objects` as segments under a fresh key each; returns their references.
    async fn put_segment(
        &self,
        key_rel: String,
        object: Vec<u8>,
        entries: &[Entry],
    ) -> Result<SegmentRef> {
        let objects = &*self.store.objects;
        let key = format!("images/{}/{key_rel}", self.name);
        let size = object.len() as u64;
        let data = Bytes::from(object);
        retry(
            objects,
            "upload segment",
            u32::MAX,
            || self.give_up(),
            || objects.put(&key, data.clone()),
        )
        .await
        .map_err(|e| obj_err(&format!("checkpoint image {}", self.name), e))?;
        Ok(SegmentRef {
            key: key_rel,
            size,
            entries: entries.len() as u64,
            pages: entries.iter().filter(|e| e.slot != TOMBSTONE).count() as u64,
        })
    }

    /// Publish `next` as the new manifest version: create-only, so a second writer that took
    /// this version fences us.
    async fn publish(&self, next: &Manifest) -> Result<()> {
        let objects = &*self.store.objects;
        let key = manifest_key(&self.name, next.version);
        let bytes = Bytes::from(next.encode());
        let r = retry(
            objects,
            "publish manifest",
            u32::MAX,
            || self.closed.load(Ordering::Acquire),
            || objects.put_create(&key, bytes.clone()),
        )
        .await;
        match r {
            Ok(()) => Ok(()),
            Err(ObjError::AlreadyExists(_)) => {
                // Ours, if a retried request had in fact succeeded.
                if let Ok(existing) = objects.get(&key).await {
                    if existing == bytes {
                        return Ok(());
                    }
                }
                let why = format!(
                    "another writer published version {} of this image; this server stopped \
                     writing to it (writes buffered here since the last checkpoint stay in {} \
                     and are not published)",
                    next.version,
                    self.store.buffer_dir.join(&self.name).display()
                );
                tracing::error!(image = %self.name, "{why}");
                *self.fenced.lock().expect("lock") = Some(why.clone());
                self.progress.notify_waiters();
                Err(Error::new(ErrorKind::Io, why))
            }
            Err(e) => Err(obj_err(&format!("checkpoint image {}", self.name), e)),
        }
    }

    /// The manifest that follows the current one, changed by `edit`.
    fn next_manifest(&self, edit: impl FnOnce(&mut Manifest)) -> Manifest {
        let mut m = self.base.read().expect("lock").manifest.clone();
        m.version += 1;
        m.writer = self.writer.clone();
        m.created = now_secs();
        edit(&mut m);
        m
    }

    async fn checkpoint_generation(&self, g: u64) -> Result<()> {
        let wal = self.wal()?;
        let Some((file, pages)) = wal.frozen(g) else {
            return Ok(());
        };
        let mut sink = SegmentSink::new(self, format!("segments/{g:016x}-{}", self.writer));
        if pages.len() as u64 * self.page_size as u64 > self.store.settings.segment_bytes {
            sink = sink.leased();
        }
        let mut buf = vec![0u8; self.page_size];
        for (page, loc) in &pages {
            match loc {
                Loc::Data(off) => {
                    file.read_exact_at(&mut buf, *off).map_err(|e| {
                        Error::with_source(
                            ErrorKind::Io,
                            format!("read write buffer of image {}", self.name),
                            e,
                        )
                    })?;
                    sink.builder.page(*page, &buf);
                }
                Loc::Zero => sink.builder.tombstone(*page),
            }
            sink.cut(false).await?;
        }
        let made = sink.finish().await?;
        failpoint("checkpoint-after-segments");
        let publishing = self.publishing.lock().await;
        let next = self.next_manifest(|m| {
            m.segments.extend(made.iter().map(|(r, _)| r.clone()));
            m.wal_generation = g;
        });
        self.publish(&next).await?;
        failpoint("checkpoint-after-manifest");
        sink.release().await;
        let segments = made.len();
        {
            let mut base = self.base.write().expect("lock");
            for (r, entries) in made {
                let id = base.add_segment(seg_info(&self.name, &r, self.page_bits), entries);
                base.order.push(id);
            }
            base.manifest = next;
        }
        drop(publishing);
        wal.retire(g)?;
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(image = %self.name, generation = g, segments, "checkpoint done");
        Ok(())
    }

    /// Merge the oldest segments into as few as the data needs, dropping overwritten pages and
    /// tombstones that hide nothing (a clone keeps its tombstones: they hide its base), then
    /// publish the shorter list.
    async fn compact(&self) -> Result<()> {
        let (victims, live, version) = {
            let base = self.base.read().expect("lock");
            let keep_tombstones = base.manifest.base.is_some();
            let keep = self.store.settings.max_segments / 2;
            let n = base.order.len().saturating_sub(keep.max(1));
            if n < 2 {
                return Ok(());
            }
            let victims: Vec<u32> = base.order[..n].to_vec();
            let mut live: Vec<(u64, SegLoc, Arc<SegInfo>)> = base
                .map
                .iter()
                .filter(|(_, l)| {
                    victims.contains(&l.seg) && (keep_tombstones || l.slot != TOMBSTONE)
                })
                .map(|(p, l)| (*p, *l, base.segs[&l.seg].clone()))
                .collect();
            live.sort_unstable_by_key(|(p, _, _)| *p);
            // Only worth it if the merge leaves fewer objects than it reads.
            let data_pages = live.iter().filter(|(_, l, _)| l.slot != TOMBSTONE).count();
            let out = (data_pages as u64 * self.page_size as u64)
                .div_ceil(self.store.settings.segment_bytes.max(1));
            if out >= victims.len() as u64 {
                return Ok(());
            }
            (victims, live, base.manifest.version)
        };
        let mut sink =
            SegmentSink::new(self, format!("segments/c{version:016x}-{}", self.writer)).leased();
        // One output segment's worth of pages at a time, in page order. Every segment's slots
        // are in page order too, so a batch covers one slot interval of each victim: a few
        // ranged GETs per victim and batch, and no byte of a victim is fetched twice.
        let batch = (self.store.settings.segment_bytes / self.page_size as u64).max(1) as usize;
        for chunk in live.chunks(batch) {
            self.copy_pages(&mut sink, chunk).await?;
        }
        let made = sink.finish().await?;
        failpoint("compaction-after-segments");
        // Checkpoints may have published meanwhile: they only append, so the victims are
        // still the oldest segments, and pages they rewrote stay theirs.
        let _publishing = self.publishing.lock().await;
        let next = self.next_manifest(|m| {
            let rest = m.segments.split_off(victims.len());
            m.segments = made.iter().map(|(r, _)| r.clone()).chain(rest).collect();
        });
        self.publish(&next).await?;
        failpoint("compaction-after-manifest");
        sink.release().await;
        let merged_into = made.len();
        {
            let mut base = self.base.write().expect("lock");
            // Only pages still mapped to a victim move to the merged segments (a checkpoint
            // since may have a newer version); tombstones in victims hid nothing older.
            let entries: Vec<Vec<Entry>> = made
                .iter()
                .map(|(_, entries)| {
                    entries
                        .iter()
                        .filter(|e| {
                            base.map
                                .get(&e.page)
                                .is_some_and(|l| victims.contains(&l.seg))
                        })
                        .copied()
                        .collect()
                })
                .collect();
            base.map.retain(|_, l| !victims.contains(&l.seg));
            let mut order = Vec::new();
            for ((r, _), entries) in made.into_iter().zip(entries) {
                order.push(base.add_segment(seg_info(&self.name, &r, self.page_bits), entries));
            }
            for v in &victims {
                base.segs.remove(v);
            }
            order.extend_from_slice(&base.order[victims.len()..]);
            base.order = order;
            base.manifest = next;
        }
        self.cache
            .lock()
            .expect("lock")
            .forget(|seg| victims.contains(&seg));
        if let Some(d) = &self.disk_cache {
            d.forget(|seg| victims.contains(&seg));
        }
        self.stats.compactions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(image = %self.name, merged = victims.len(), into = merged_into, "compaction done");
        Ok(())
    }

    /// Copy pages (data fetched from their segments, tombstones as they are) into `sink`, in
    /// the order given.
    async fn copy_pages(
        &self,
        sink: &mut SegmentSink<'_>,
        chunk: &[(u64, SegLoc, Arc<SegInfo>)],
    ) -> Result<()> {
        let data: Vec<_> = chunk
            .iter()
            .filter(|(_, l, _)| l.slot != TOMBSTONE)
            .cloned()
            .collect();
        let mut fetched = self.fetch_pages(&data).await?.into_iter();
        for (page, l, _) in chunk {
            if l.slot == TOMBSTONE {
                sink.builder.tombstone(*page);
            } else {
                let d = fetched.next().expect("one fetched page per data page");
                sink.builder.page(*page, &d);
            }
        }
        sink.cut(false).await
    }

    /// Put fetched blocks, numbered from `first`, into both cache tiers.
    fn keep_blocks(&self, seg: u32, first: u64, blocks: &[Option<Bytes>]) {
        {
            let mut c = self.cache.lock().expect("lock");
            for (k, b) in blocks.iter().enumerate() {
                if let Some(b) = b {
                    c.put((seg, (first + k as u64) as u32), b.clone());
                }
            }
        }
        if let Some(d) = &self.disk_cache {
            for (k, b) in blocks.iter().enumerate() {
                if let Some(b) = b {
                    d.put((seg, (first + k as u64) as u32), b);
                }
            }
        }
    }

    /// A ranged GET, retried.
    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        let objects = &*self.store.objects;
        retry(
            objects,
            "read segment",
            4,
            || false,
            || objects.get_range(key, range.clone()),
        )
        .await
        .map_err(|e| obj_err(&format!("read image {}", self.name), e))
    }

    fn corrupt(&self, page: u64, key: &str) -> Error {
        Error::new(
            ErrorKind::Io,
            format!(
                "read image {}: page {page} fails its checksum in segment {key} (the object is \
                 corrupt); not served",
                self.name
            ),
        )
    }

    /// The pages `live` names (any segments, in page order), straight from the object store,
    /// each checked against its checksum. Slots of one segment close together (less than
    /// `COMPACTION_GAP` pages apart) are fetched in one GET.
    async fn fetch_pages(&self, live: &[(u64, SegLoc, Arc<SegInfo>)]) -> Result<Vec<Bytes>> {
        let ps = self.page_size as u64;
        let mut by_seg: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, (_, l, _)) in live.iter().enumerate() {
            by_seg.entry(l.seg).or_default().push(i);
        }
        let mut out = vec![Bytes::new(); live.len()];
        for idx in by_seg.values_mut() {
            idx.sort_unstable_by_key(|&i| live[i].1.slot);
            let info = &live[idx[0]].2;
            let mut k = 0;
            while k < idx.len() {
                let first = live[idx[k]].1.slot;
                let mut n = 1;
                while n + k < idx.len()
                    && live[idx[k + n]].1.slot < live[idx[k + n - 1]].1.slot + COMPACTION_GAP
                {
                    n += 1;
                }
                let last = live[idx[k + n - 1]].1.slot;
                let base = u64::from(first) * ps;
                let bytes = self
                    .get_range(&info.key, base..(u64::from(last) + 1) * ps)
                    .await?;
                for &i in &idx[k..k + n] {
                    let (page, l, _) = &live[i];
                    let at = (u64::from(l.slot) * ps - base) as usize;
                    let b = bytes.slice(at..at + ps as usize);
                    if crc32c::crc32c(&b) != l.crc {
                        return Err(self.corrupt(*page, &info.key));
                    }
                    out[i] = b;
                }
                k += n;
            }
        }
        Ok(out)
    }

    /// Pages at consecutive slots of segment `seg`, through the cache, each checked against
    /// its checksum (`pages`: page number and checksum per slot). A miss fetches the aligned
    /// cache blocks around it, consecutive missing blocks in one GET. The segment is taken
    /// with the page map, so a compaction that drops it meanwhile cannot fail the read: its
    /// objects stay in the store.
    async fn read_segment_run(
        &self,
        seg: u32,
        info: &SegInfo,
        first_slot: u32,
        pages: &[(u64, u32)],
        ahead: u32,
    ) -> Result<Vec<Bytes>> {
        let ps = self.page_size as u64;
        let bb = self.block_bytes;
        let start = u64::from(first_slot) * ps;
        let end = start + pages.len() as u64 * ps;
        let (b0, b1) = (start / bb, (end - 1) / bb + 1);
        // A block from a cache that fails a checksum is dropped and fetched once more.
        for bypass in [false, true] {
            let mut blocks: Vec<Option<Bytes>> = vec![None; (b1 - b0) as usize];
            // Where each block came from: the store, memory, or the disk tier.
            let mut tier = vec![Tier::Store; blocks.len()];
            if !bypass {
                let mut c = self.cache.lock().expect("lock");
                for (i, b) in blocks.iter_mut().enumerate() {
                    *b = c.get((seg, (b0 + i as u64) as u32));
                    if b.is_some() {
                        tier[i] = Tier::Memory;
                    }
                }
                drop(c);
                if let Some(d) = &self.disk_cache {
                    for (i, b) in blocks.iter_mut().enumerate().filter(|(_, b)| b.is_none()) {
                        let key = (seg, (b0 + i as u64) as u32);
                        if let Some(hit) = d.get(key) {
                            self.cache.lock().expect("lock").put(key, hit.clone());
                            *b = Some(hit);
                            tier[i] = Tier::Disk;
                        }
                    }
                }
            }
            // Blocks no cache had: fetch those nobody is fetching, consecutive ones in one GET,
            // and wait for the others.
            let mut claims = Claims {
                inner: self,
                keys: Vec::new(),
            };
            let mut waits = Vec::new();
            let mut mine = vec![false; blocks.len()];
            {
                let mut fl = self.inflight.lock().expect("lock");
                for (i, _) in blocks.iter().enumerate().filter(|(_, b)| b.is_none()) {
                    if bypass {
                        mine[i] = true;
                        continue;
                    }
                    let key = (seg, (b0 + i as u64) as u32);
                    match fl.get(&key) {
                        Some(rx) => waits.push((i, rx.clone())),
                        None => {
                            let (tx, rx) = tokio::sync::watch::channel(());
                            fl.insert(key, rx);
                            claims.keys.push((key, tx));
                            mine[i] = true;
                        }
                    }
                }
                // Read-ahead: the GET that ends the run also takes the segment's next blocks
                // that nobody has or fetches.
                if !bypass && mine.last() == Some(&true) {
                    let c = self.cache.lock().expect("lock");
                    for b in b1..b1 + u64::from(ahead) {
                        let key = (seg, b as u32);
                        if b * bb >= info.data_len || c.contains(key) || fl.contains_key(&key) {
                            break;
                        }
                        let (tx, rx) = tokio::sync::watch::channel(());
                        fl.insert(key, rx);
                        claims.keys.push((key, tx));
                        blocks.push(None);
                        mine.push(true);
                        tier.push(Tier::Store);
                    }
                }
            }
            let mut i = 0;
            while i < blocks.len() {
                if !mine[i] {
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                while j < blocks.len() && mine[j] {
                    j += 1;
                }
                let lo = (b0 + i as u64) * bb;
                let hi = ((b0 + j as u64) * bb).min(info.data_len.max(end));
                let bytes = self.get_range(&info.key, lo..hi).await?;
                for (k, b) in blocks[i..j].iter_mut().enumerate() {
                    let at = k * bb as usize;
                    let block =
                        bytes.slice(at.min(bytes.len())..(at + bb as usize).min(bytes.len()));
                    *b = Some(block);
                }
                self.keep_blocks(seg, b0 + i as u64, &blocks[i..j]);
                i = j;
            }
            // Done: whoever waits for these blocks finds them in the cache.
            drop(claims);
            for (i, mut rx) in waits {
                // Returns when the fetcher is done (it never sends; it drops its sender).
                let _ = rx.changed().await;
                let key = (seg, (b0 + i as u64) as u32);
                blocks[i] = self.cache.lock().expect("lock").get(key);
                if blocks[i].is_none() {
                    // Its fetch failed, or the block was evicted already: fetch it here.
                    let lo = (b0 + i as u64) * bb;
                    let hi = (lo + bb).min(info.data_len.max(end));
                    blocks[i] = Some(self.get_range(&info.key, lo..hi).await?);
                    self.keep_blocks(seg, b0 + i as u64, &blocks[i..=i]);
                }
            }
            let mut out = Vec::with_capacity(pages.len());
            let mut bad = None;
            for (n, (page, crc)) in pages.iter().enumerate() {
                let at = start + n as u64 * ps;
                let bi = (at / bb - b0) as usize;
                let block = blocks[bi].as_ref().expect("every block was filled");
                let off = (at % bb) as usize;
                let p = block.slice(off.min(block.len())..(off + ps as usize).min(block.len()));
                if p.len() as u64 != ps || crc32c::crc32c(&p) != *crc {
                    bad = Some((*page, bi));
                    break;
                }
                out.push(p);
            }
            match bad {
                None => {
                    for n in 0..pages.len() as u64 {
                        let counter = match tier[((start + n * ps) / bb - b0) as usize] {
                            Tier::Store => &self.stats.cache_misses,
                            Tier::Memory => &self.stats.cache_hits,
                            Tier::Disk => &self.stats.disk_cache_hits,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(out);
                }
                Some((page, bi)) if tier[bi] != Tier::Store => {
                    tracing::warn!(image = %self.name, page, segment = %info.key,
                        "a cached block fails its checksum; fetching it again");
                    let key = (seg, (b0 + bi as u64) as u32);
                    self.cache.lock().expect("lock").remove(key);
                    if let Some(d) = &self.disk_cache {
                        d.remove(key);
                    }
                }
                Some((page, _)) => return Err(self.corrupt(page, &info.key)),
            }
        }
        unreachable!("the second pass returns")
    }

    fn sources(&self, first: u64, count: u64) -> Vec<Src> {
        let wal = match &self.wal {
            Some(w) => w.lookup_run(first, count),
            None => vec![None; count as usize],
        };
        let base = self.base.read().expect("lock");
        wal.into_iter()
            .enumerate()
            .map(|(i, w)| match w {
                Some((f, Loc::Data(off))) => Src::Wal(f, off),
                Some((_, Loc::Zero)) => Src::Zero,
                None => match base.map.get(&(first + i as u64)) {
                    Some(l) if l.slot != TOMBSTONE => Src::Seg(*l, base.segs[&l.seg].clone()),
                    _ => Src::Zero,
                },
            })
            .collect()
    }

    /// Read `len` bytes at `offset`, whose pages (from `first`) come from `srcs`.
    async fn read_sources(
        &self,
        first: u64,
        srcs: &[Src],
        offset: u64,
        len: usize,
    ) -> Result<BytesMut> {
        let inner = self;
        let ps = inner.page_size;
        // A read near where the last one ended is part of a stream: read ahead.
        let prev = inner
            .last_read_end
            .swap(offset + len as u64, Ordering::Relaxed);
        let ahead = if offset.abs_diff(prev) <= SEQUENTIAL_WINDOW {
            READ_AHEAD_BLOCKS
        } else {
            0
        };
        let mut out = BytesMut::zeroed(len);
        let mut runs = Vec::new();
        let mut i = 0;
        while i < srcs.len() {
            match &srcs[i] {
                Src::Zero => i += 1,
                Src::Wal(f, off) => {
                    // Consecutive pages at consecutive offsets of one file: one read.
                    let mut n = 1;
                    while let Some(Src::Wal(f2, o2)) = srcs.get(i + n) {
                        if !Arc::ptr_eq(f, f2) || *o2 != off + (n * ps) as u64 {
                            break;
                        }
                        n += 1;
                    }
                    f.read_exact_at(&mut out[i * ps..(i + n) * ps], *off)
                        .map_err(|e| {
                            Error::with_source(
                                ErrorKind::Io,
                                format!("read write buffer of image {}", inner.name),
                                e,
                            )
                        })?;
                    i += n;
                }
                Src::Seg(l, info) => {
                    // Consecutive slots of one segment: one run.
                    let mut run = vec![(first + i as u64, l.crc)];
                    while let Some(Src::Seg(l2, _)) = srcs.get(i + run.len()) {
                        if l2.seg != l.seg || l2.slot != l.slot + run.len() as u32 {
                            break;
                        }
                        run.push((first + (i + run.len()) as u64, l2.crc));
                    }
                    let n = run.len();
                    runs.push((i, *l, info.clone(), run));
                    i += n;
                }
            }
        }
        // The runs' GETs go out together: a read of pages scattered over many segments costs
        // one round trip, not one per segment.
        let fetched: Vec<(usize, Vec<Bytes>)> = futures_util::stream::iter(runs)
            .map(|(i, l, info, run)| async move {
                let pages = inner
                    .read_segment_run(l.seg, &info, l.slot, &run, ahead)
                    .await?;
                Ok::<_, Error>((i, pages))
            })
            .buffer_unordered(READ_FANOUT)
            .try_collect()
            .await?;
        for (i, pages) in fetched {
            for (k, p) in pages.iter().enumerate() {
                out[(i + k) * ps..(i + k + 1) * ps].copy_from_slice(p);
            }
        }
        Ok(out)
    }

    async fn wait_for_room(&self) -> Result<()> {
        loop {
            self.check_fenced("write to")?;
            let (active, total) = self.wal()?.sizes();
            if active >= self.store.settings.checkpoint_bytes {
                self.kick.notify_one();
            }
            if total <= self.store.settings.max_buffered_bytes {
                return Ok(());
            }
            let wait = self.progress.notified();
            self.kick.notify_one();
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::new(
                    ErrorKind::Shutdown,
                    format!("image {} is closing", self.name),
                ));
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
        }
    }

    fn first_and_count(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset >> self.page_bits, len >> self.page_bits)
    }
}

/// Blocks this reader is fetching; dropping it (done, failed or cancelled) releases whoever
/// waits for them.
struct Claims<'a> {
    inner: &'a Inner,
    keys: Vec<(BlockKey, tokio::sync::watch::Sender<()>)>,
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        let mut fl = self.inner.inflight.lock().expect("lock");
        for (key, _) in &self.keys {
            fl.remove(key);
        }
    }
}

/// Compaction fetches dead pages between live ones rather than split a GET at gaps shorter
/// than this (pages): fewer requests for at most this many pages of waste per live page.
const COMPACTION_GAP: u32 = 64;

/// Reads starting within this many bytes of where the previous one ended count as sequential
/// (several in flight arrive a little out of order).
const SEQUENTIAL_WINDOW: u64 = 8 << 20;

/// Cache blocks a sequential read fetches beyond what it needs, in each segment it touches.
const READ_AHEAD_BLOCKS: u32 = 4;

/// Segment runs of one read fetched at once.
const READ_FANOUT: usize = 32;

/// Where a cache block came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Store,
    Memory,
    Disk,
}

/// Where one page of a read comes from.
#[derive(Debug, Clone)]
enum Src {
    Wal(Arc<File>, u64),
    /// Where in which segment.
    Seg(SegLoc, Arc<SegInfo>),
    Zero,
}

impl Image {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The manifest version the image is at.
    pub fn version(&self) -> u64 {
        self.inner.base.read().expect("lock").manifest.version
    }

    /// Segments in the current manifest.
    pub fn segment_count(&self) -> usize {
        self.inner.base.read().expect("lock").order.len()
    }

    pub fn stats(&self) -> &ImageStats {
        &self.inner.stats
    }

    /// Requests made to the image's object store (shared by every image in the store).
    pub fn store_stats(&self) -> &crate::objects::Stats {
        self.inner.store.objects.stats()
    }

    /// Bytes in the write buffer: the active generation, and all of them.
    pub fn buffered_bytes(&self) -> (u64, u64) {
        self.inner.wal.as_ref().map_or((0, 0), |w| w.sizes())
    }

    /// Pages mapped by the manifest and by the write buffer (memory: about 32 bytes each).
    pub fn mapped_pages(&self) -> (usize, usize) {
        (
            self.inner.base.read().expect("lock").map.len(),
            self.inner.wal.as_ref().map_or(0, |w| w.mapped_pages()),
        )
    }

    /// Checkpoint now: everything written so far goes to the object store.
    pub async fn checkpoint(&self) -> Result<()> {
        self.inner.check_fenced("checkpoint")?;
        self.inner.checkpoint().await?;
        self.inner.compact_now().await
    }

    /// Stop the checkpoint task and release the write buffer (what is buffered stays there for
    /// the next open). Dropping does the same without waiting.
    pub async fn close(mut self) {
        self.inner.closed.store(true, Ordering::Release);
        self.task.abort();
        self.inner.stop_compaction();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
    }

    /// Why the image stopped writing, if it did.
    pub fn fenced(&self) -> Option<String> {
        self.inner.fenced()
    }

    fn sources(&self, first: u64, count: u64) -> Vec<Src> {
        self.inner.sources(first, count)
    }
}

#[async_trait]
impl BlockDevice for Image {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.inner.wal.is_none(),
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            block_status: true,
            multi_conn: true,
            resize: self.inner.wal.is_some(),
        }
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_io(self.geometry(), "read", offset, len as u64)?;
        let (first, count) = self.inner.first_and_count(offset, len as u64);
        let srcs = self.sources(first, count);
        Ok(self
            .inner
            .read_sources(first, &srcs, offset, len)
            .await?
            .freeze())
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        check_io(self.geometry(), "write", offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.inner.wait_for_room().await?;
        let _writing = self.inner.writers.read().await;
        let (first, count) = self.inner.first_and_count(offset, data.len() as u64);
        self.inner
            .apply(first, count, |wal| wal.write(first, &data))?;
        if opts.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let Some(wal) = &self.inner.wal else {
            return Ok(());
        };
        self.inner.check_fenced("flush")?;
        wal.flush().await
    }

    async fn trim(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        self.write_zeroes(
            offset,
            len,
            ZeroOpts {
                fua: opts.fua,
                may_trim: true,
                fast_only: false,
            },
        )
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        check_io(self.geometry(), "write zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.inner.wait_for_room().await?;
        let (first, count) = self.inner.first_and_count(offset, len);
        let _writing = self.inner.writers.read().await;
        self.inner
            .apply(first, count, |wal| wal.zero(first, count))?;
        if opts.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_io(self.geometry(), "query block status", offset, len)?;
        let (first, count) = self.inner.first_and_count(offset, len);
        let ps = self.inner.page_size as u64;
        let srcs = self.sources(first, count.min(1 << 20));
        let mut out: Vec<Extent> = Vec::new();
        for s in &srcs {
            let hole = matches!(s, Src::Zero);
            match out.last_mut() {
                Some(e) if e.hole == hole => e.len += ps,
                _ => out.push(if hole {
                    Extent::hole(ps)
                } else {
                    Extent::data(ps)
                }),
            }
            if out.len() >= 1024 {
                break;
            }
        }
        Ok(out)
    }
}
