//! The read path: each page from the write buffer, a segment (through the cache), or zeroes.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use strata_bdev::{Error, ErrorKind, Result};

use super::{Inner, SegInfo, SegLoc};
use crate::cache::BlockKey;
use crate::fileio;
use crate::format::TOMBSTONE;
use crate::layout::obj_err;
use crate::objects::retry;
use crate::wal::Loc;

/// Blocks this reader is fetching; dropping it (done, failed or cancelled) releases whoever
/// waits for them.
struct Claims<'a> {
    inner: &'a Inner,
    keys: Vec<(BlockKey, tokio::sync::watch::Sender<()>)>,
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        let mut fl = self.inner.reads.inflight.lock().expect("lock");
        for (key, _) in &self.keys {
            fl.remove(key);
        }
    }
}

/// Reads starting within this many bytes of where the previous one ended count as sequential
/// (several in flight arrive a little out of order).
const SEQUENTIAL_WINDOW: u64 = 8 << 20;

/// Cache blocks a sequential read fetches beyond what it needs, in each segment it touches.
const READ_AHEAD_BLOCKS: u32 = 4;

/// Segment runs of one read fetched at once.
const READ_FANOUT: usize = 32;

/// A block another reader is fetching (index in the run) and the signal that it is done.
type Wait = (usize, tokio::sync::watch::Receiver<()>);

/// The segment a run of blocks is read from: blocks are numbered from `b0`, and none reaches
/// beyond `end`.
struct Span<'a> {
    seg: u32,
    info: &'a SegInfo,
    b0: u64,
    end: u64,
}

/// The blocks of a run: each one's bytes once known, where it came from, and whether this
/// reader fetches it.
struct BlockRun {
    blocks: Vec<Option<Bytes>>,
    tier: Vec<Tier>,
    mine: Vec<bool>,
}

impl BlockRun {
    pub(super) fn missing(n: usize) -> BlockRun {
        BlockRun {
            blocks: vec![None; n],
            tier: vec![Tier::Store; n],
            mine: vec![false; n],
        }
    }
}

/// Where a cache block came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Store,
    Memory,
    Disk,
}

/// Where one page of a read comes from.
#[derive(Debug, Clone)]
pub(super) enum Src {
    Wal(Arc<File>, u64),
    /// Where in which segment.
    Seg(SegLoc, Arc<SegInfo>),
    Zero,
}

impl Inner {
    /// Put fetched blocks, numbered from `first`, into both cache tiers.
    fn keep_blocks(&self, seg: u32, first: u64, blocks: &[Option<Bytes>]) {
        {
            let mut c = self.reads.cache.lock().expect("lock");
            for (k, b) in blocks.iter().enumerate() {
                if let Some(b) = b {
                    c.put((seg, (first + k as u64) as u32), b.clone());
                }
            }
        }
        if let Some(d) = &self.reads.disk {
            for (k, b) in blocks.iter().enumerate() {
                if let Some(b) = b {
                    d.put((seg, (first + k as u64) as u32), b);
                }
            }
        }
    }

    /// A ranged GET, retried.
    pub(super) async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
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

    pub(super) fn corrupt(&self, page: u64, key: &str) -> Error {
        Error::new(
            ErrorKind::Io,
            format!(
                "read image {}: page {page} fails its checksum in segment {key} (the object is \
                 corrupt); not served",
                self.name
            ),
        )
    }

    /// Pages at consecutive slots of a segment in a directory store, read from its file into
    /// `out` and each checked against its checksum (`pages`: page number and checksum).
    async fn read_local_run(
        &self,
        info: &SegInfo,
        first_slot: u32,
        pages: &[(u64, u32)],
        out: &mut [u8],
    ) -> Result<()> {
        let ps = self.page_size;
        self.read_local(info, u64::from(first_slot) * ps as u64, out)
            .await?;
        for (k, (page, crc)) in pages.iter().enumerate() {
            if crc32c::crc32c(&out[k * ps..(k + 1) * ps]) != *crc {
                return Err(self.corrupt(*page, &info.key));
            }
        }
        self.stats
            .local_pages
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Read `out.len()` bytes at `at` of a segment in a directory store.
    pub(super) async fn read_local(&self, info: &SegInfo, at: u64, out: &mut [u8]) -> Result<()> {
        let local = info.local.as_ref().expect("a segment in a directory store");
        let read = match local.file() {
            Ok(f) => fileio::read_exact_at(f, out, at).await,
            Err(e) => Err(e),
        };
        read.map_err(|e| {
            Error::with_source(
                ErrorKind::Io,
                format!(
                    "read image {}: segment file {}",
                    self.name,
                    local.path.display()
                ),
                e,
            )
        })
    }

    /// Bytes `range` of a segment: from its file in a directory store, else a ranged GET.
    pub(super) async fn segment_range(
        &self,
        info: &SegInfo,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes> {
        if info.local.is_none() {
            return self.get_range(&info.key, range).await;
        }
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.read_local(info, range.start, &mut buf).await?;
        Ok(Bytes::from(buf))
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
        let bb = self.reads.block_bytes;
        let start = u64::from(first_slot) * ps;
        let end = start + pages.len() as u64 * ps;
        let (b0, b1) = (start / bb, (end - 1) / bb + 1);
        let span = Span {
            seg,
            info,
            b0,
            end: info.data_len.max(end),
        };
        // A block from a cache that fails a checksum is dropped and fetched once more.
        for bypass in [false, true] {
            let mut run = if bypass {
                BlockRun::missing((b1 - b0) as usize)
            } else {
                self.cached_blocks(seg, b0, (b1 - b0) as usize)
            };
            let (claims, waits) = self.claim_blocks(&span, &mut run, bypass, b1, ahead);
            self.fetch_mine(&span, &mut run).await?;
            // Done: whoever waits for these blocks finds them in the cache.
            drop(claims);
            self.await_others(&span, &mut run, waits).await?;
            match self.pages_of(&span, &run, start, pages) {
                Ok(out) => return Ok(out),
                Err((page, bi)) if run.tier[bi] != Tier::Store => {
                    tracing::warn!(image = %self.name, page, segment = %info.key,
                        "a cached block fails its checksum; fetching it again");
                    let key = (seg, (b0 + bi as u64) as u32);
                    self.reads.cache.lock().expect("lock").remove(key);
                    if let Some(d) = &self.reads.disk {
                        d.remove(key);
                    }
                }
                Err((page, _)) => return Err(self.corrupt(page, &info.key)),
            }
        }
        unreachable!("the second pass returns")
    }

    /// Blocks `b0..b0 + n` of segment `seg` as the caches have them (memory, then disk).
    fn cached_blocks(&self, seg: u32, b0: u64, n: usize) -> BlockRun {
        let mut run = BlockRun::missing(n);
        let mut c = self.reads.cache.lock().expect("lock");
        for (i, b) in run.blocks.iter_mut().enumerate() {
            *b = c.get((seg, (b0 + i as u64) as u32));
            if b.is_some() {
                run.tier[i] = Tier::Memory;
            }
        }
        drop(c);
        if let Some(d) = &self.reads.disk {
            for (i, b) in run
                .blocks
                .iter_mut()
                .enumerate()
                .filter(|(_, b)| b.is_none())
            {
                let key = (seg, (b0 + i as u64) as u32);
                if let Some(hit) = d.get(key) {
                    self.reads.cache.lock().expect("lock").put(key, hit.clone());
                    *b = Some(hit);
                    run.tier[i] = Tier::Disk;
                }
            }
        }
        run
    }

    /// Of the blocks no cache had, claim those nobody is fetching (and, `ahead`, the
    /// segment's next blocks after `b1` that nobody has or fetches), and list those others
    /// are fetching. With `bypass`, every missing block is fetched here, unclaimed.
    fn claim_blocks<'a>(
        &'a self,
        span: &Span<'_>,
        run: &mut BlockRun,
        bypass: bool,
        b1: u64,
        ahead: u32,
    ) -> (Claims<'a>, Vec<Wait>) {
        let mut claims = Claims {
            inner: self,
            keys: Vec::new(),
        };
        let mut waits = Vec::new();
        let mut fl = self.reads.inflight.lock().expect("lock");
        for i in 0..run.blocks.len() {
            if run.blocks[i].is_some() {
                continue;
            }
            if bypass {
                run.mine[i] = true;
                continue;
            }
            let key = (span.seg, (span.b0 + i as u64) as u32);
            match fl.get(&key) {
                Some(rx) => waits.push((i, rx.clone())),
                None => {
                    let (tx, rx) = tokio::sync::watch::channel(());
                    fl.insert(key, rx);
                    claims.keys.push((key, tx));
                    run.mine[i] = true;
                }
            }
        }
        // Read-ahead: the GET that ends the run also takes the segment's next blocks
        // that nobody has or fetches.
        if !bypass && run.mine.last() == Some(&true) {
            let c = self.reads.cache.lock().expect("lock");
            for b in b1..b1 + u64::from(ahead) {
                let key = (span.seg, b as u32);
                let bb = self.reads.block_bytes;
                if b * bb >= span.info.data_len || c.contains(key) || fl.contains_key(&key) {
                    break;
                }
                let (tx, rx) = tokio::sync::watch::channel(());
                fl.insert(key, rx);
                claims.keys.push((key, tx));
                run.blocks.push(None);
                run.mine.push(true);
                run.tier.push(Tier::Store);
            }
        }
        (claims, waits)
    }

    /// Fetch the blocks this reader claimed, consecutive ones in one GET, and cache them.
    async fn fetch_mine(&self, span: &Span<'_>, run: &mut BlockRun) -> Result<()> {
        let bb = self.reads.block_bytes;
        let mut i = 0;
        while i < run.blocks.len() {
            if !run.mine[i] {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < run.blocks.len() && run.mine[j] {
                j += 1;
            }
            let lo = (span.b0 + i as u64) * bb;
            let hi = ((span.b0 + j as u64) * bb).min(span.end);
            let bytes = self.get_range(&span.info.key, lo..hi).await?;
            for (k, b) in run.blocks[i..j].iter_mut().enumerate() {
                let at = k * bb as usize;
                let block = bytes.slice(at.min(bytes.len())..(at + bb as usize).min(bytes.len()));
                *b = Some(block);
            }
            self.keep_blocks(span.seg, span.b0 + i as u64, &run.blocks[i..j]);
            i = j;
        }
        Ok(())
    }

    /// Wait for the blocks others were fetching; fetch here any they did not cache.
    async fn await_others(
        &self,
        span: &Span<'_>,
        run: &mut BlockRun,
        waits: Vec<Wait>,
    ) -> Result<()> {
        let bb = self.reads.block_bytes;
        for (i, mut rx) in waits {
            // Returns when the fetcher is done (it never sends; it drops its sender).
            let _ = rx.changed().await;
            let key = (span.seg, (span.b0 + i as u64) as u32);
            run.blocks[i] = self.reads.cache.lock().expect("lock").get(key);
            if run.blocks[i].is_none() {
                // Its fetch failed, or the block was evicted already: fetch it here.
                let lo = (span.b0 + i as u64) * bb;
                let hi = (lo + bb).min(span.end);
                run.blocks[i] = Some(self.get_range(&span.info.key, lo..hi).await?);
                self.keep_blocks(span.seg, span.b0 + i as u64, &run.blocks[i..=i]);
            }
        }
        Ok(())
    }

    /// The pages from byte `start` of the segment out of `run`'s blocks, each checked against
    /// its checksum, and counted by where it came from; or the first page that fails and the
    /// index of its block.
    fn pages_of(
        &self,
        span: &Span<'_>,
        run: &BlockRun,
        start: u64,
        pages: &[(u64, u32)],
    ) -> std::result::Result<Vec<Bytes>, (u64, usize)> {
        let ps = self.page_size as u64;
        let bb = self.reads.block_bytes;
        let mut out = Vec::with_capacity(pages.len());
        for (n, (page, crc)) in pages.iter().enumerate() {
            let at = start + n as u64 * ps;
            let bi = (at / bb - span.b0) as usize;
            let block = run.blocks[bi].as_ref().expect("every block was filled");
            let off = (at % bb) as usize;
            let p = block.slice(off.min(block.len())..(off + ps as usize).min(block.len()));
            if p.len() as u64 != ps || crc32c::crc32c(&p) != *crc {
                return Err((*page, bi));
            }
            out.push(p);
        }
        for n in 0..pages.len() as u64 {
            let counter = match run.tier[((start + n * ps) / bb - span.b0) as usize] {
                Tier::Store => &self.stats.cache_misses,
                Tier::Memory => &self.stats.cache_hits,
                Tier::Disk => &self.stats.disk_cache_hits,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Ok(out)
    }

    pub(super) fn sources(&self, first: u64, count: u64) -> Vec<Src> {
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
    pub(super) async fn read_sources(
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
            .reads
            .last_end
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
                    fileio::read_exact_at(f, &mut out[i * ps..(i + n) * ps], *off)
                        .await
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
                    if info.local.is_some() {
                        let at = &mut out[i * ps..(i + n) * ps];
                        inner.read_local_run(info, l.slot, &run, at).await?;
                    } else {
                        runs.push((i, *l, info.clone(), run));
                    }
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
}
