//! Opening an image: its newest manifest, the page maps of its base chain and its own, and its
//! write buffer, replayed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use futures_util::{StreamExt, TryStreamExt};
use strata_bdev::{Error, ErrorKind, Result};

use super::checkpoint::checkpointer;
use super::{seg_info, Base, Image, ImageStats, Inner, Life, ReadState, TxnState, Work};
use crate::cache::{Cache, DiskCache};
use crate::format::{Entry, Manifest};
use crate::layout::{
    base_chain, check_geometry, check_name, create_manifest, latest_manifest, now_secs, read_index,
    read_manifest, read_snapshot,
};
use crate::objects::Objects;
use crate::pagemap::PageMap;
use crate::settings::Settings;
use crate::wal::Wal;

/// A page store: an object store for images and a local directory for their write buffers.
#[derive(Debug, Clone)]
pub struct PageStore {
    pub objects: Arc<dyn Objects>,
    pub buffer_dir: PathBuf,
    pub settings: Settings,
}

/// The page map of `manifest`: the pages of its base chain (oldest ancestor first), then its
/// own segments on top. Only its own segments are in `order` (compaction never touches a base).
async fn load_base(objects: &dyn Objects, manifest: Manifest) -> Result<Base> {
    let chain = base_chain(objects, &manifest).await?;
    let mut base = Base {
        order: Vec::new(),
        segs: HashMap::new(),
        next_seg: 0,
        map: PageMap::default(),
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
                seg_info(objects, &m.image, s, m.page_size_bits),
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
                create_manifest(objects, m).await?
            }
        };
        self.open_manifest(manifest, None).await
    }

    /// Open snapshot `snapshot` of image `name` as a read-only device.
    pub async fn open_snapshot(&self, name: &str, snapshot: &str) -> Result<Image> {
        check_name(name)?;
        check_name(snapshot)?;
        let rec = read_snapshot(&*self.objects, name, snapshot).await?;
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
        let reads = ReadState::new(&self.settings, &name, &dir, page_size, snapshot.is_some())?;
        let writer = format!("{:016x}", rand::random::<u64>());
        let read_only = snapshot.is_some();
        let inner = Arc::new(Inner {
            name: name.clone(),
            store: self.clone(),
            page_bits: manifest.page_size_bits,
            page_size,
            writer,
            snapshot,
            size: AtomicU64::new(manifest.image_size),
            wal,
            base: RwLock::new(base),
            reads,
            life: Life::default(),
            work: Work {
                last_checkpoint: Mutex::new(Instant::now()),
                checkpointing: tokio::sync::Mutex::new(()),
                publishing: tokio::sync::Mutex::new(()),
                compacting: tokio::sync::Mutex::new(()),
                compaction: Mutex::new(None),
            },
            txn: TxnState::default(),
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
                inner.life.kick.notify_one();
            }
            task
        };
        Ok(Image { inner, task })
    }
}

impl ReadState {
    /// The caches of image `name` (whose write buffer is `dir`): memory, and the disk tier
    /// unless the image is a read-only snapshot.
    fn new(
        settings: &Settings,
        name: &str,
        dir: &std::path::Path,
        page_size: usize,
        read_only: bool,
    ) -> Result<ReadState> {
        let block_bytes = settings
            .cache_block_bytes
            .next_multiple_of(page_size as u64)
            .max(page_size as u64);
        let disk_cache = match (settings.disk_cache_bytes, read_only) {
            (0, _) | (_, true) => None,
            (bytes, false) => {
                let path = match &settings.disk_cache_dir {
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
        Ok(ReadState {
            cache: Mutex::new(Cache::new(settings.cache_bytes)),
            disk: disk_cache,
            inflight: Mutex::new(HashMap::new()),
            last_end: AtomicU64::new(u64::MAX),
            block_bytes,
        })
    }
}
