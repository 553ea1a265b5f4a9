//! An image: a virtual disk whose pages live in the write buffer until a checkpoint moves them
//! into segment objects named by a new manifest version.
//!
//! ```text
//!  write ─► WAL (append; FLUSH/FUA: commit + fdatasync) ─► answer           device.rs
//!  read  ─► WAL generations, newest first ─► page map of the manifest        read.rs
//!           (segment, slot) ─► cache ─► ranged GET ─► zeroes
//!  checkpoint task: rotate WAL ─► segment objects ─► manifest v+1            checkpoint.rs,
//!           (create-only: fencing) ─► page map updated ─► WAL generation      sink.rs
//!           deleted
//!  compaction task, when segments pile up: merge the oldest                  compaction.rs
//!  open: newest manifest ─► base chain ─► page map; replay the WAL           open.rs
//!  snapshot, resize, flatten                                                 admin.rs
//!  transactions                                                              txn.rs
//! ```
//!
//! The page map holds, for every page the manifest maps, where its newest version is (one
//! hash-map entry: about 32 bytes per mapped page). Segment indexes are read once, at open and
//! when a segment is made, and not kept.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use strata_bdev::{Error, ErrorKind, Geometry, Result};
use tokio::sync::Notify;

use crate::cache::{BlockKey, Cache, DiskCache};
use crate::format::{Entry, Manifest, SegmentRef};
use crate::objects::Objects;
use crate::pagemap::PageMap;
use crate::wal::Wal;

mod admin;
mod checkpoint;
mod compaction;
mod device;
mod merge;
mod open;
mod read;
mod sink;
mod txn;
pub use open::PageStore;
pub use txn::Transaction;
pub(crate) use txn::Versions;

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
    /// Its file, when the store is a local directory: read with positioned reads.
    local: Option<LocalSegment>,
}

/// A segment's file in a directory store, opened at its first read.
#[derive(Debug)]
struct LocalSegment {
    path: std::path::PathBuf,
    file: std::sync::OnceLock<Arc<std::fs::File>>,
}

impl LocalSegment {
    fn file(&self) -> std::io::Result<&Arc<std::fs::File>> {
        if let Some(f) = self.file.get() {
            return Ok(f);
        }
        let f = Arc::new(std::fs::File::open(&self.path)?);
        Ok(self.file.get_or_init(|| f))
    }
}

#[derive(Debug)]
struct Base {
    manifest: Manifest,
    /// Segment ids of the manifest, oldest first.
    order: Vec<u32>,
    segs: HashMap<u32, Arc<SegInfo>>,
    next_seg: u32,
    map: PageMap<SegLoc>,
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

fn seg_info(objects: &dyn Objects, image: &str, r: &SegmentRef, page_bits: u32) -> Arc<SegInfo> {
    let key = format!("images/{image}/{}", r.key);
    Arc::new(SegInfo {
        local: objects.local_path(&key).map(|path| LocalSegment {
            path,
            file: std::sync::OnceLock::new(),
        }),
        key,
        data_len: r.pages << page_bits,
    })
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
    /// Pages read straight from segment files (a directory store).
    pub local_pages: AtomicU64,
}

/// The logical block size images show clients.
const LOGICAL_BLOCK: u32 = 512;

/// The state of an open image, shared by its device, its background tasks and its
/// transactions; each group below belongs to the part of the code named beside it.
struct Inner {
    name: String,
    store: PageStore,
    page_bits: u32,
    page_size: usize,
    /// This process's id as a writer: in segment keys and manifests.
    writer: String,
    /// Which snapshot this read-only view shows, if it is one.
    snapshot: Option<String>,
    /// Bytes; changes with a resize.
    size: AtomicU64,
    /// The write buffer; `None` for a read-only snapshot.
    wal: Option<Wal>,
    /// The page map of the current manifest.
    base: RwLock<Base>,
    /// Caches and fetches of segment data (`read.rs`).
    reads: ReadState,
    /// Fencing and closing, and the wakeups between writers and the checkpointer.
    life: Life,
    /// Turns taken by checkpoints and compactions (`checkpoint.rs`, `compaction.rs`).
    work: Work,
    /// Transactions and the write lock (`txn.rs`).
    txn: TxnState,
    stats: ImageStats,
}

/// The read path's caches and bookkeeping.
struct ReadState {
    cache: Mutex<Cache>,
    disk: Option<DiskCache>,
    /// Blocks being fetched, so that concurrent readers share one GET.
    inflight: Mutex<HashMap<BlockKey, tokio::sync::watch::Receiver<()>>>,
    /// Where the last read ended, to recognize sequential streams.
    last_end: AtomicU64,
    /// Bytes per cache block (a multiple of the page size).
    block_bytes: u64,
}

/// Whether the image still writes, and the signals around its write buffer.
#[derive(Default)]
struct Life {
    /// Why the image stopped writing, once another writer fenced it.
    fenced: Mutex<Option<String>>,
    /// Wakes the checkpointer (the buffer grew, or a writer waits for room).
    kick: Notify,
    /// Wakes writers waiting for room (a checkpoint finished, or the image was fenced).
    progress: Notify,
    closed: AtomicBool,
}

/// Background work and the turns it takes.
struct Work {
    /// When the active generation last became non-empty (or was last checkpointed).
    last_checkpoint: Mutex<Instant>,
    checkpointing: tokio::sync::Mutex<()>,
    /// Held from computing a manifest version to publishing it and updating the page map:
    /// checkpoints and a compaction running alongside take turns.
    publishing: tokio::sync::Mutex<()>,
    compacting: tokio::sync::Mutex<()>,
    /// The compaction running in the background, if any.
    compaction: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Transactions' shared state.
#[derive(Default)]
struct TxnState {
    /// Plain writes hold it shared; a transaction commits, and a resize runs, holding it alone.
    writers: Arc<tokio::sync::RwLock<()>>,
    /// Open transactions and the versions they still read.
    versions: Mutex<Versions>,
    /// Open transactions (read without the lock on the write path).
    open: AtomicU64,
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
        self.inner.life.closed.store(true, Ordering::Release);
        self.inner.life.progress.notify_waiters();
        self.task.abort();
        let _ = self.inner.stop_compaction();
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
            // 512-byte logical blocks (what a 512e disk shows): writes of part of a page
            // merge into it (`merge.rs`); whole pages are what the image prefers.
            block_size: LOGICAL_BLOCK.min(self.page_size as u32),
            optimal_io_size: self.page_size as u32,
        }
    }

    fn fenced(&self) -> Option<String> {
        self.life.fenced.lock().expect("lock").clone()
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

    /// An error once the image is closing: long work stops at its next step.
    fn check_open(&self, what: &str) -> Result<()> {
        if self.life.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Shutdown,
                format!("{what} image {}: it is closing", self.name),
            ));
        }
        Ok(())
    }

    fn give_up(&self) -> bool {
        self.life.closed.load(Ordering::Acquire) || self.fenced().is_some()
    }

    /// The segment `r` of this image.
    fn seg_info(&self, r: &SegmentRef) -> Arc<SegInfo> {
        seg_info(&*self.store.objects, &self.name, r, self.page_bits)
    }

    /// Whether a byte range covers whole pages.
    fn page_aligned(&self, offset: u64, len: u64) -> bool {
        let ps = self.page_size as u64;
        offset.is_multiple_of(ps) && len.is_multiple_of(ps)
    }

    fn first_and_count(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset >> self.page_bits, len >> self.page_bits)
    }
}
