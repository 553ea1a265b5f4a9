//! The image as a block device, and what its owner asks of it.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use bytes::Bytes;
use strata_bdev::{
    check_io, BlockDevice, Capabilities, Extent, Geometry, Result, WriteOpts, ZeroOpts,
};

use super::checkpoint::Mode;
use super::merge::Fill;
use super::read::Src;
use super::{Image, ImageStats};

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
        self.inner.checkpoint(Mode::Complete).await?;
        self.inner.compact_now().await
    }

    /// Stop the checkpoint task and release the write buffer (what is buffered stays there for
    /// the next open). A checkpoint or compaction under way stops at its next step, and one
    /// request it has sent to the object store is waited for, so nothing of this image lands
    /// in the store once this returns. Dropping the image stops its tasks without waiting.
    pub async fn close(mut self) {
        self.inner.life.closed.store(true, Ordering::Release);
        self.inner.life.kick.notify_one();
        self.inner.life.progress.notify_waiters();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
        // The checkpointer is gone, so no compaction starts after this one ends.
        let compaction = self.inner.work.compaction.lock().expect("lock").take();
        if let Some(compaction) = compaction {
            let _ = compaction.await;
        }
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
        if len == 0 {
            return Ok(Bytes::new());
        }
        // The whole pages the range touches; a range within pages is cut out of them.
        let ps = self.inner.page_size as u64;
        let first = offset / ps;
        let end = (offset + len as u64).div_ceil(ps);
        let srcs = self.sources(first, end - first);
        let pages = self
            .inner
            .read_sources(first, &srcs, first * ps, ((end - first) * ps) as usize)
            .await?
            .freeze();
        let at = (offset - first * ps) as usize;
        Ok(pages.slice(at..at + len))
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        check_io(self.geometry(), "write", offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.inner.wait_for_room().await?;
        let _writing = self.inner.txn.writers.read().await;
        let len = data.len() as u64;
        if self.inner.page_aligned(offset, len) {
            let (first, count) = self.inner.first_and_count(offset, len);
            self.inner
                .apply(first, count, |wal| wal.write(first, &data).map(|()| true))?;
        } else {
            self.inner
                .write_unaligned(offset, len, Fill::Data(&data))
                .await?;
        }
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
        let _writing = self.inner.txn.writers.read().await;
        if self.inner.page_aligned(offset, len) {
            let (first, count) = self.inner.first_and_count(offset, len);
            self.inner
                .apply(first, count, |wal| wal.zero(first, count).map(|()| true))?;
        } else {
            self.inner
                .write_unaligned(offset, len, Fill::Zeroes)
                .await?;
        }
        if opts.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_io(self.geometry(), "query block status", offset, len)?;
        let ps = self.inner.page_size as u64;
        let end = offset + len;
        let first = offset / ps;
        let count = (end.div_ceil(ps) - first).min(1 << 20);
        let srcs = self.sources(first, count);
        let mut out: Vec<Extent> = Vec::new();
        for (i, s) in srcs.iter().enumerate() {
            let p = first + i as u64;
            // The part of the page within the range asked about.
            let n = end.min((p + 1) * ps) - offset.max(p * ps);
            let hole = matches!(s, Src::Zero);
            match out.last_mut() {
                Some(e) if e.hole == hole => e.len += n,
                _ => out.push(if hole {
                    Extent::hole(n)
                } else {
                    Extent::data(n)
                }),
            }
            if out.len() >= 1024 {
                break;
            }
        }
        Ok(out)
    }
}
