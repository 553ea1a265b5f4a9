//! Changing an open image as a whole: snapshots, resize, flattening a clone.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use strata_bdev::{Error, ErrorKind, Result};

use super::checkpoint::Mode;
use super::sink::SegmentSink;
use super::{Image, SegInfo, SegLoc};
use crate::format::{BaseRef, SnapshotRecord, TOMBSTONE};
use crate::layout::{check_geometry, put_snapshot};
use std::sync::Arc;

impl Image {
    /// Take snapshot `name`: every write acknowledged before the call is in it, and it costs a
    /// checkpoint of what is buffered, no copy.
    pub async fn snapshot(&self, name: &str) -> Result<SnapshotRecord> {
        let inner = &self.inner;
        inner.wal()?;
        inner.check_fenced("snapshot")?;
        inner.checkpoint(Mode::Complete).await?;
        let m = inner.base.read().expect("lock").manifest.clone();
        let rec = put_snapshot(&*inner.store.objects, &m, name).await?;
        tracing::info!(image = %inner.name, snapshot = name, version = m.version, "snapshot taken");
        Ok(rec)
    }

    /// Take snapshot `name` of every image in `images` at one point: writes to all of them wait
    /// while the snapshots are taken, so every write acknowledged before the call is in its
    /// image's snapshot and none acknowledged after the call returns is in any (a
    /// crash-consistent group). The images must be distinct.
    pub async fn snapshot_group(images: &[Arc<Image>], name: &str) -> Result<Vec<SnapshotRecord>> {
        for (i, a) in images.iter().enumerate() {
            if images[..i].iter().any(|b| Arc::ptr_eq(a, b)) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("image {} is named twice in a group snapshot", a.inner.name),
                ));
            }
            a.inner.wal()?;
            a.inner.check_fenced("snapshot")?;
        }
        // Locks are taken in one order (by address), so two groups never wait on each other.
        let mut order: Vec<&Arc<Image>> = images.iter().collect();
        order.sort_by_key(|i| Arc::as_ptr(i) as usize);
        let mut quiet = Vec::with_capacity(order.len());
        for i in order {
            quiet.push(i.inner.txn.writers.write().await);
        }
        let mut out = Vec::with_capacity(images.len());
        for i in images {
            let inner = &i.inner;
            inner.checkpoint(Mode::Complete).await?;
            let m = inner.base.read().expect("lock").manifest.clone();
            out.push(put_snapshot(&*inner.store.objects, &m, name).await?);
        }
        drop(quiet);
        tracing::info!(
            snapshot = name,
            images = images.len(),
            "group snapshot taken"
        );
        Ok(out)
    }

    /// The snapshot this clone reads through to, if it is one.
    pub fn base(&self) -> Option<BaseRef> {
        self.inner.base.read().expect("lock").manifest.base.clone()
    }

    /// Resize to `size` bytes. Growing is always allowed (clients see the new size when they
    /// reconnect); shrinking drops the data beyond the new end and needs `force`. Pages beyond
    /// the end read as zeroes after a later grow.
    pub async fn resize(&self, size: u64, force: bool) -> Result<()> {
        let inner = &self.inner;
        inner.wal()?;
        inner.check_fenced("resize")?;
        check_geometry(size, inner.page_bits)?;
        // No write lands meanwhile, no transaction is open across the change, and no other
        // resize runs: the size read under the lock is the size.
        let _alone = inner.txn.writers.write().await;
        let old = inner.size();
        if size == old {
            return Ok(());
        }
        if size < old && !force {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "shrinking image {} from {old} to {size} bytes drops the data beyond {size}; \
                     force it to go on",
                    inner.name
                ),
            ));
        }
        if inner.txn.open.load(Ordering::Acquire) > 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "resize image {}: transactions are open on it; retry when they end",
                    inner.name
                ),
            ));
        }
        let mut made = Vec::new();
        let mut sinks = Vec::new();
        if size < old {
            // Everything buffered goes to segments, then tombstones hide every mapped page
            // beyond the new end (base pages of a clone included).
            inner.checkpoint(Mode::Complete).await?;
            let new_pages = size >> inner.page_bits;
            let mut beyond: Vec<u64> = inner
                .base
                .read()
                .expect("lock")
                .map
                .iter()
                .filter(|(p, l)| **p >= new_pages && l.slot != TOMBSTONE)
                .map(|(p, _)| *p)
                .collect();
            beyond.sort_unstable();
            let version = inner.base.read().expect("lock").manifest.version;
            let mut sink =
                SegmentSink::new(inner, format!("segments/r{version:016x}-{}", inner.writer))
                    .leased();
            for p in beyond {
                sink.tombstone(p)?;
            }
            made = sink.finish().await?;
            sinks.push(sink);
        }
        let publishing = inner.work.publishing.lock().await;
        let next = inner.next_manifest(|m| {
            m.segments.extend(made.iter().map(|(r, _)| r.clone()));
            m.image_size = size;
        });
        inner.publish(&next).await?;
        for sink in sinks {
            sink.release().await;
        }
        {
            let mut base = inner.base.write().expect("lock");
            for (r, entries) in made {
                let id = base.add_segment(inner.seg_info(&r), entries);
                base.order.push(id);
            }
            base.manifest = next;
        }
        inner.size.store(size, Ordering::Release);
        drop(publishing);
        tracing::info!(image = %inner.name, from = old, to = size, "image resized");
        Ok(())
    }

    /// Copy every page this clone still reads from its base into its own segments, then drop
    /// the base: the clone no longer depends on the snapshot. `progress(done, total)` is called
    /// as pages are copied. Writes go on meanwhile; they win over the copied pages.
    pub async fn flatten(&self, progress: &(dyn Fn(u64, u64) + Send + Sync)) -> Result<()> {
        let inner = &self.inner;
        inner.wal()?;
        inner.check_fenced("flatten")?;
        // Compaction rewrites own segments; it must not run beside this.
        let _turn = inner.work.compacting.lock().await;
        let (live, version) = {
            let base = inner.base.read().expect("lock");
            if base.manifest.base.is_none() {
                return Ok(());
            }
            let own: HashSet<u32> = base.order.iter().copied().collect();
            let mut live: Vec<(u64, SegLoc, Arc<SegInfo>)> = base
                .map
                .iter()
                .filter(|(_, l)| !own.contains(&l.seg) && l.slot != TOMBSTONE)
                .map(|(p, l)| (*p, *l, base.segs[&l.seg].clone()))
                .collect();
            live.sort_unstable_by_key(|(p, _, _)| *p);
            (live, base.manifest.version)
        };
        let total = live.len() as u64;
        progress(0, total);
        let mut sink =
            SegmentSink::new(inner, format!("segments/f{version:016x}-{}", inner.writer)).leased();
        let batch = (inner.store.settings.segment_bytes / inner.page_size as u64).max(1) as usize;
        let mut done = 0;
        for chunk in live.chunks(batch) {
            inner.copy_pages(&mut sink, chunk).await?;
            done += chunk.len() as u64;
            progress(done, total);
        }
        let made = sink.finish().await?;
        let publishing = inner.work.publishing.lock().await;
        // The copies go first: anything the clone wrote itself, before or meanwhile, is newer.
        let next = inner.next_manifest(|m| {
            m.segments = made
                .iter()
                .map(|(r, _)| r.clone())
                .chain(std::mem::take(&mut m.segments))
                .collect();
            m.base = None;
        });
        inner.publish(&next).await?;
        sink.release().await;
        {
            let mut base = inner.base.write().expect("lock");
            let own: HashSet<u32> = base.order.iter().copied().collect();
            let mut order = Vec::new();
            for (r, entries) in made {
                // Only pages still read from the base move to the copies.
                let entries = entries
                    .into_iter()
                    .filter(|e| base.map.get(&e.page).is_some_and(|l| !own.contains(&l.seg)))
                    .collect();
                order.push(base.add_segment(inner.seg_info(&r), entries));
            }
            let keep: HashSet<u32> = own.iter().chain(&order).copied().collect();
            base.map.retain(|_, l| keep.contains(&l.seg));
            base.segs.retain(|id, _| keep.contains(id));
            order.extend_from_slice(&base.order);
            base.order = order;
            base.manifest = next;
        }
        drop(publishing);
        tracing::info!(image = %inner.name, pages = total, "clone flattened");
        Ok(())
    }
}
